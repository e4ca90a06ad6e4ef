#!/usr/bin/env python
"""Per-operation time of a benchmark configuration, side by side across libraries.

Each configuration runs in a fresh process (``tools/bench_ext/worker.py``, in the library's
own environment for braintrace / brainscale 0.1.0) with ``profile_out``: one call of the
compiled T-step gradient function runs under ``jax.profiler.trace`` and the duration of
every XLA operation (thunk) is read from the profiler's Perfetto trace. Printed per
configuration: the timed ms/step (median of repeats, unprofiled), the profiled total and its
split into the operation groups (dots, ``ynn`` matmul fusions, weight-sized accumulations
``wrapped_add``, copies, the other fusions), and the largest operations, in µs per step;
saved as JSON. The profiler adds overhead per operation: compare configurations with each
other, not with the timed column.

    python tools/profile_ops.py --model gru --N 1024 --runs ours:floor,ours:io,braintrace:io \\
        --out benchmarks/results/cpu/profile-gru1024
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENVS = {"braintrace": ".bench_venvs/braintrace-jax0.10.1",
         "brainscale010": ".bench_venvs/brainscale010-jax0.10.1"}
GROUPS = (("dot", "dot"), ("ynn", "ynn_fusion"), ("accumulate", "wrapped_add"),
          ("copy", "copy"))


def _python(lib: str, venvs: dict) -> str:
    if lib == "ours":
        return sys.executable
    return str(Path(venvs[lib]) / "bin" / "python")


def group_of(name: str) -> str:
    for g, prefix in GROUPS:
        if name.startswith(prefix):
            return g
    return "other"


def run_one(lib, algo, a, work: Path, venvs: dict) -> dict:
    tag = f"{lib}-{algo}"
    cfg = dict(lib=lib, model=a.model, algo=algo, N=a.N, B=a.B, T=a.T, layers=1, seed=0,
               decay=0.9, repeats=a.repeats, run=True,
               profile_out=str(work / f"{tag}.ops.json"), out=str(work / f"{tag}.res.json"))
    (work / f"{tag}.json").write_text(json.dumps(cfg))
    subprocess.run([_python(lib, venvs), str(HERE / "bench_ext" / "worker.py"),
                    str(work / f"{tag}.json")], check=True, capture_output=True)
    res = json.loads((work / f"{tag}.res.json").read_text())
    prof = json.loads((work / f"{tag}.ops.json").read_text())
    T = prof["T"]
    ops = {k: v[0] / T for k, v in prof["ops"].items()}
    groups: dict = {}
    for k, us in ops.items():
        groups[group_of(k)] = groups.get(group_of(k), 0.0) + us
    return dict(lib=lib, algo=algo, ms_per_step=res.get("ms_per_step"),
                profiled_us=sum(ops.values()), groups=groups, n_ops=len(ops),
                top=sorted(ops.items(), key=lambda kv: -kv[1])[:a.top])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gru", choices=("lif", "alif", "gru"))
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", default="ours:floor,ours:io,braintrace:io",
                    help="lib:algo pairs (algo as in tools/bench_ext/worker.py)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every run, keep all")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default="outputs/profile_ops")
    a = ap.parse_args(argv)
    out = Path(a.out)
    work = out / "raw"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for rnd in range(a.rounds):
        for spec in a.runs.split(","):
            lib, algo = spec.split(":")
            r = run_one(lib, algo, a, work, VENVS)
            r["round"] = rnd
            rows.append(r)
            print(f"  round {rnd} {lib}:{algo} {r['ms_per_step']:.3f} ms/step", flush=True)
    names = [g for g, _ in GROUPS] + ["other"]
    print(f"\n{a.model} N={a.N} B={a.B} T={a.T}: µs per step by operation group (profiled)")
    print(f"{'run':<22}{'timed ms':>9}{'profiled':>10}" + "".join(f"{n:>11}" for n in names))
    for r in rows:
        print(f"{r['lib'] + ':' + r['algo']:<22}{r['ms_per_step']:>9.3f}{r['profiled_us']:>10.0f}"
              + "".join(f"{r['groups'].get(n, 0.0):>11.0f}" for n in names))
    for r in rows[:len(a.runs.split(","))]:
        print(f"\n{r['lib']}:{r['algo']} largest operations (µs/step)")
        for k, us in r["top"]:
            print(f"  {us:9.1f}  {k}")
    (out / "profile.json").write_text(json.dumps(dict(
        model=a.model, N=a.N, B=a.B, T=a.T, rows=rows), indent=1))
    print(f"wrote {out / 'profile.json'}")


if __name__ == "__main__":
    main()
