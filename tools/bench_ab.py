#!/usr/bin/env python
"""Before/after benchmark of this library's online configurations: two checkouts, one run.

For every configuration of ``tools/bench.py sweep`` (``--models``, ``--N``, ``--algos``,
``--B``, ``--T``; BPTT is left out: it does not use the library) and the extra ones given
with ``--extra MODEL:ALGO:N`` (e.g. ``lif:io_chunk:1024`` for the windowed ES-D-RTRL of
``tools/bench_external.py``), the worker ``tools/bench_ext/worker.py`` runs in a fresh
process once with ``--before``'s ``brainscale`` package and once with ``--after``'s
(``PYTHONPATH``), alternating which goes first, for ``--rounds`` rounds. The table reports
the fastest ``ms_per_step_min`` of each side and their ratio; ``results.json`` keeps every
run. Same machine, same process environment, interleaved: the ratio is what changed.

Example (the before/after table of benchmarks/README.md)::

    git worktree add /tmp/before <old commit>
    python tools/bench_ab.py --before /tmp/before --after . --models lif,alif,gru \\
        --N 128,512,1024 --algos io,param,hybrid --extra lif:io_chunk:256,lif:io_chunk:1024,gru:io_chunk:512 \\
        --out benchmarks/results/cpu/ab-ir-program
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402


def _rev(tree: Path) -> str:
    """The checkout's short commit (+dirty), or, for an exported tree that is not a git
    checkout of its own (``git archive <rev> | tar -x -C .bench_trees/<rev>``), its name."""
    import subprocess
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, cwd=tree, timeout=30).stdout.strip()
        if not top or Path(top).resolve() != Path(tree).resolve():
            return Path(tree).resolve().name
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=tree, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "brainscale"],
                               capture_output=True, text=True, cwd=tree, timeout=30).stdout.strip()
        return (rev or "?") + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def plan(a) -> list:
    sweep = argparse.Namespace(**vars(a))
    sweep.algos = [x for x in a.algos if x != "bptt"]
    sweep.mem_T = []
    jobs = [j for j in bench.plan_sweep(sweep, {"platform": "cpu"}) if not j.get("skip")]
    for spec in a.extra or ():
        model, algo, N = spec.split(":")
        jobs.append({"lib": "ours", "model": model, "algo": algo, "N": int(N), "B": a.B[0],
                     "T": a.T, "layers": 1, "seed": a.seed, "decay": a.decay,
                     "repeats": a.repeats, "run": True, "chunk": a.chunk})
    for j in jobs:
        j.pop("_prio", None)
        j["mem_T"] = []
        j["bandwidth"] = False
    return jobs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="checkout with the old brainscale/")
    p.add_argument("--after", default=str(HERE.parent), help="checkout with the new brainscale/")
    p.add_argument("--out", required=True)
    p.add_argument("--models", type=bench._strs, default=["lif", "alif", "gru"])
    p.add_argument("--algos", type=bench._strs, default=["io", "param", "hybrid"])
    p.add_argument("--N", type=bench._ints, default=[128, 512, 1024])
    p.add_argument("--B", type=bench._ints, default=[16])
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decay", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--call-s", type=float, default=3.0)
    p.add_argument("--param-max-mb", type=float, default=600.0)
    p.add_argument("--extra", type=bench._strs, default=[])
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--work", default=None)
    a = p.parse_args(argv)
    trees = {"before": Path(a.before).resolve(), "after": Path(a.after).resolve()}
    revs = {k: _rev(v) for k, v in trees.items()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = bench.scratch_dir(a, "ab")
    jobs = plan(a)
    print(f"{len(jobs)} configuration(s) x 2 trees x {a.rounds} round(s); before={revs['before']} "
          f"after={revs['after']}", flush=True)
    runs = []
    t0 = time.perf_counter()
    for r in range(a.rounds):
        for i, cfg in enumerate(jobs):
            order = ("before", "after") if (r + i) % 2 == 0 else ("after", "before")
            for side in order:
                env = bench.worker_env("cpu")
                env["PYTHONPATH"] = str(trees[side])
                res = bench.run_worker(cfg, timeout=a.timeout, env=env, workdir=work)
                res["side"], res["round"] = side, r
                runs.append(res)
                ms = res.get("ms_per_step_min")
                print(f"[{time.perf_counter() - t0:7.0f}s] r{r} {side:6s} {cfg['model']:4s} "
                      f"{cfg['algo']:8s} N={cfg['N']:5d} T={cfg['T']:5d}: "
                      f"{'%.4f ms/step' % ms if ms else res.get('error', 'failed')}", flush=True)
    rows, table = [], []
    for cfg in jobs:
        key = (cfg["model"], cfg["algo"], cfg["N"], cfg["B"])
        best = {}
        for side in ("before", "after"):
            ms = [x["ms_per_step_min"] for x in runs if x["side"] == side and x.get("ok")
                  and x.get("ms_per_step_min") and
                  (x["config"]["model"], x["config"]["algo"], x["config"]["N"],
                   x["config"]["B"]) == key]
            best[side] = min(ms) if ms else None
        ratio = best["after"] / best["before"] if best["before"] and best["after"] else None
        rows.append({"model": key[0], "algo": key[1], "N": key[2], "B": key[3], "T": cfg["T"],
                     "before_ms": best["before"], "after_ms": best["after"], "ratio": ratio})
        table.append([key[0], bench.ALGO_NAMES.get(key[1], key[1]), str(key[2]), str(cfg["T"]),
                      bench._fmt(best["before"]), bench._fmt(best["after"]),
                      "–" if ratio is None else f"{ratio:.3f}"])
    md = bench.md_table(["model", "algo", "N", "T", f"before ({revs['before']}) ms/step",
                         f"after ({revs['after']}) ms/step", "after/before"], table)
    meta = {"before": revs["before"], "after": revs["after"], "machine": bench.machine_info(),
            "rounds": a.rounds, "B": a.B, "argv": sys.argv[1:],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs},
                                                 indent=1, default=str))
    (out / "results.md").write_text(f"fastest of {a.rounds} interleaved rounds, B={a.B[0]}, "
                                    f"CPU, ms per step\n\n{md}\n")
    print(md)
    worst = max((r["ratio"] for r in rows if r["ratio"]), default=None)
    if worst is not None:
        print(f"\nworst after/before: {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
