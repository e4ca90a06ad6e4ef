#!/usr/bin/env python
"""Per-step D-RTRL on the native CPU kernel against the JAX rules, the floor and the bound.

For every ``--models`` × ``--N`` the worker (``tools/bench_ext/worker.py``, a fresh process
per configuration) runs, interleaved for ``--rounds`` rounds:

* ``floor``: the forward step plus one instantaneous VJP per step (no traces);
* ``param``: D-RTRL per step on the JAX rules (``online_gradients``, ``chunk=1``);
* ``param_native``: D-RTRL per step with ``backend='native'``, which the step-owning loop
  runs with the one-pass kernel (the trace read once and written once per step).

Both D-RTRL rows measure, in their own process, the machine's copy bandwidth, so
``bound`` = trace elements × the time to read and write one float32 element there
(``copy_bandwidth`` ``loop``). Printed and saved (``results.json`` with every run,
``native.md``): the fastest ``ms_per_step_min`` of each row, its ratio to the bound and to
the floor, and the gradient of the native row against the JAX row (cosine, relative
error), on the same data. With ``--chunk K`` also ``param_chunk`` / ``param_native_chunk``:
the gradient summed over windows of K steps on both backends (windowed D-RTRL,
``backends/drtrl_window.py``). With ``--bf16`` also ``param_native_bf16``: the native
learner with its traces stored in bfloat16 (``NativeBackend(trace_dtype='bfloat16')``),
against the float32 native row and the float32 bound.

    python tools/bench_native.py --models lif,alif,gru --N 512,1024 --T 60 --rounds 3 \\
        --out benchmarks/results/cpu/native-drtrl
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
import sys

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
from bench_external import write_data  # noqa: E402

ALGOS = ("floor", "param", "param_native")
#: with --chunk K: the gradient summed over windows of K steps, JAX rules and native learner
CHUNK_ALGOS = ("param_chunk", "param_native_chunk")


def main(argv=None) -> int:
    import numpy as np
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", type=bench._strs, default=["lif", "alif", "gru"])
    p.add_argument("--N", type=bench._ints, default=[512, 1024])
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--T", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--work", default=None)
    p.add_argument("--chunk", type=int, default=0,
                   help="also time online_gradients(chunk=K) on both backends (0: not)")
    p.add_argument("--bf16", action="store_true",
                   help="also time the native learner with bfloat16 trace storage")
    a = p.parse_args(argv)
    algos = ALGOS + (CHUNK_ALGOS if a.chunk > 1 else ()) + (("param_native_bf16",) if a.bf16
                                                            else ())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    wd = Path(bench.scratch_dir(a, "native"))
    env = bench.worker_env("cpu")
    meta = {"command": "python tools/bench_native.py " + " ".join(argv or sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": bench.machine_info()}
    runs, best, grads = [], {}, {}
    t0 = time.perf_counter()
    for rnd in range(a.rounds):
        for model in a.models:
            for N in a.N:
                data = wd / f"data_{model}_N{N}.npz"
                if rnd == 0:
                    write_data(data, model, N, a.B, a.T, a.seed)
                order = algos if rnd % 2 == 0 else tuple(reversed(algos))
                for algo in order:
                    gp = wd / f"grads_{model}_{N}_{algo}.npz"
                    cfg = {"lib": "ours", "model": model, "algo": algo, "N": N, "B": a.B,
                           "T": a.T, "seed": a.seed, "decay": 0.9, "repeats": a.repeats,
                           "run": True, "data": str(data), "mem_T": [],
                           "grads_out": str(gp) if rnd == 0 and algo != "floor" else None,
                           "bandwidth": algo != "floor", "chunk": a.chunk}
                    r = bench.run_worker(cfg, env=env, workdir=str(wd), timeout=a.timeout)
                    r["round"] = rnd
                    runs.append(r)
                    key = (model, N, algo)
                    ms = r.get("ms_per_step_min") or r.get("ms_per_step")
                    if r.get("ok") and ms:
                        old = best.get(key)
                        bound = None
                        bw = r.get("bandwidth")
                        if bw and r.get("trace_elems"):
                            bound = r["trace_elems"] * bw["ns_per_elem_rw"] * 1e-6
                        if old is None or ms < old["ms"]:
                            best[key] = {"ms": ms, "bound": bound if bound else
                                         (old or {}).get("bound")}
                        elif bound and not old.get("bound"):
                            old["bound"] = bound
                    print(f"[{time.perf_counter() - t0:6.0f}s] round {rnd} {model} N={N} "
                          f"{algo:13s} " + (f"{ms:.3f} ms/step" if r.get("ok") else
                                            f"FAILED {str(r.get('error'))[:300]}"), flush=True)
                if rnd == 0:
                    b_ = wd / f"grads_{model}_{N}_param.npz"
                    for al in algos[2:]:
                        a_ = wd / f"grads_{model}_{N}_{al}.npz"
                        if a_.exists() and b_.exists():
                            key = f"{model}/{N}" + ("" if al == "param_native" else f"/{al}")
                            grads[key] = bench.grad_metrics(dict(np.load(a_)), dict(np.load(b_)))
                # scratch paths are left out: the file names say what each run read
                (out / "results.json").write_text(json.dumps(
                    {"meta": meta, "runs": runs, "grads": grads,
                     "best": {"/".join(map(str, k)): v for k, v in best.items()}},
                    indent=1, default=str).replace(str(wd) + "/", ""))
    lines = [f"# Per-step D-RTRL: native kernel vs JAX rules ({meta['date']})", "",
             f"`{meta['command']}`", "",
             f"B = {a.B}, T = {a.T}, fastest of {a.rounds} interleaved rounds (each the "
             f"minimum of {a.repeats} repeats), ms per step. bound = trace elements × "
             f"read+write time per float32 element (copy bandwidth measured in the same "
             f"process).", "",
             "| model | N | floor | D-RTRL JAX | D-RTRL native | native / JAX | bound | "
             "JAX / bound | native / bound | native / floor | grad rel err (cos) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in a.models:
        for N in a.N:
            fl, pj, pn = (best.get((model, N, al)) for al in ALGOS)
            if not (fl and pj and pn):
                lines.append(f"| {model} | {N} | missing runs | | | | | | | | |")
                continue
            bound = pn["bound"] or pj["bound"]
            g = grads.get(f"{model}/{N}", {})
            rel = max((v["rel"] for v in g.values()), default=float("nan"))
            cos = min((v["cos"] for v in g.values()), default=float("nan"))
            lines.append(
                f"| {model} | {N} | {fl['ms']:.3f} | {pj['ms']:.3f} | {pn['ms']:.3f} | "
                f"{pn['ms'] / pj['ms']:.2f} | {bound:.3f} | {pj['ms'] / bound:.2f} | "
                f"{pn['ms'] / bound:.2f} | {pn['ms'] / fl['ms']:.2f} | {rel:.1e} ({cos:.6f}) |")
    if a.chunk > 1:
        lines += ["", f"Gradient summed over windows of {a.chunk} steps "
                  f"(`online_gradients(chunk={a.chunk})`), ms per step (× bound); grad: the "
                  f"largest relative error against the per-step JAX row.", "",
                  "| model | N | JAX chunk | native chunk | native / JAX | grad rel err |",
                  "|---|---|---|---|---|---|"]
        for model in a.models:
            for N in a.N:
                pj, pn = (best.get((model, N, al)) for al in CHUNK_ALGOS)
                ref = best.get((model, N, "param_native")) or {}
                bound = ref.get("bound") or (pn or {}).get("bound")
                if not (pj and pn and bound):
                    lines.append(f"| {model} | {N} | missing runs | | | |")
                    continue
                g = grads.get(f"{model}/{N}/param_native_chunk", {})
                rel = max((v["rel"] for v in g.values()), default=float("nan"))
                lines.append(f"| {model} | {N} | {pj['ms']:.3f} ({pj['ms'] / bound:.2f}) | "
                             f"{pn['ms']:.3f} ({pn['ms'] / bound:.2f}) | "
                             f"{pn['ms'] / pj['ms']:.2f} | {rel:.1e} |")
    if a.bf16:
        lines += ["", "Native D-RTRL per step with the traces stored in bfloat16 "
                  "(`NativeBackend(trace_dtype='bfloat16')`), ms per step; × bound: the float32 "
                  "bound above; grad: the largest relative error against the float32 JAX row.",
                  "", "| model | N | native f32 | native bf16 | bf16 / f32 | bf16 × f32 bound "
                  "| grad rel err (cos) |", "|---|---|---|---|---|---|---|"]
        for model in a.models:
            for N in a.N:
                pn, pb = (best.get((model, N, al)) for al in ("param_native",
                                                               "param_native_bf16"))
                if not (pn and pb):
                    lines.append(f"| {model} | {N} | missing runs | | | | |")
                    continue
                bound = pn["bound"]
                g = grads.get(f"{model}/{N}/param_native_bf16", {})
                rel = max((v["rel"] for v in g.values()), default=float("nan"))
                cos = min((v["cos"] for v in g.values()), default=float("nan"))
                lines.append(f"| {model} | {N} | {pn['ms']:.3f} | {pb['ms']:.3f} | "
                             f"{pb['ms'] / pn['ms']:.2f} | {pb['ms'] / bound:.2f} | "
                             f"{rel:.1e} ({cos:.6f}) |")
    text = "\n".join(lines) + "\n"
    (out / "native.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
