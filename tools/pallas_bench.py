#!/usr/bin/env python
"""Measure the Pallas D-RTRL / ES-D-RTRL kernels on this machine's GPU; print a table, save JSON.

    python tools/pallas_bench.py --out benchmarks/results/pallas_<device>.json

Sections (``--sections``, default all):

* ``copy``   — the card's copy bandwidth: ``x ← x + 1`` over a donated scan carry (read +
  write), the best of the sizes >= 256 MB.
* ``tune``   — a few tile configurations of the one-pass kernel at about 1 GB (f32, bf16); the
  fastest goes to the JSON's ``"tiles"`` and is used by the sweep.
* ``drtrl``  — per-step time and achieved bandwidth for trace sizes from 0.1 to 10 GB (f32,
  B=16, k=1; the bf16 columns use the same shapes): the JAX path (the MatMulOp rules the JAX
  backend runs), the one-pass kernel (``drtrl_step``, 2 trace passes), the learner's two
  kernels (``drtrl_update`` + ``drtrl_grad``, 3 passes), bf16 storage. The crossovers give
  the JSON's ``"selection"`` (``learner_min_bytes``, ``fused_min_bytes``) that
  ``PallasBackend(cost_model=<json>)`` loads.
* ``e2e``    — end-to-end per-step time of the LIF and GRU benchmark models
  (``tools/bench_models.py``), D-RTRL, with the JAX backend, the Pallas backend (learner,
  ``select='auto'`` and ``'all'``) and ``fused_online_gradients``.
* ``bf16``   — LIF model: bf16 vs f32 trace storage, per-step time and the cosine similarity
  of 1000-step accumulated gradients to the f32 ones.
* ``es``     — ES-D-RTRL gradient accumulation at n_in = n_out = 4096, B = 64: per step
  (K rank-B updates) vs chunked (one (K·B)-row product, XLA and Pallas).

Every timing is the median over ``--reps`` calls of a jitted ``lax.scan`` of T steps with the
traces as the (donated) carry, divided by T. Targets checked: one-pass kernel >= 85 % of copy
bandwidth from 0.5 GB and never slower than the JAX path where selected; bf16 >= 1.7× f32
from 0.5 GB with cosine >= 0.999; chunked >= 2× per-step at 4096/4096/B=64.

Without a GPU the kernels run in interpret mode: use ``--quick`` (tiny sizes) to check the
script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as _pyplatform
import statistics
import sys
import time
from functools import partial

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import brainscale  # noqa: E402
from brainscale.backends.pallas import (PallasBackend, Tiles, drtrl_grad, drtrl_step,  # noqa: E402
                                        drtrl_update, es_chunked_grad,
                                        es_chunked_grad_reference, fused_online_gradients)
from brainscale.backends.pallas import _common  # noqa: E402

GB = 1e9
MB = 1e6


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------

def block(x):
    jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)
    return x


def time_scan(step, carry, consts, T, reps):
    """Median seconds per step of ``carry = step(carry, *consts)`` run T times in a scan.

    The carry is donated, so XLA updates it in place; the result is fed back in.
    """
    @partial(jax.jit, donate_argnums=(0,))
    def run(c, *k):
        return jax.lax.scan(lambda cc, _: (step(cc, *k), None), c, None, length=T)[0]
    carry = block(run(carry, *consts))           # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        carry = block(run(carry, *consts))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / T, carry


def fmt_ms(s):
    return "-" if s is None else f"{s * 1e3:8.3f}"


def safe(fn, *a, **k):
    """Run a measurement; an error (e.g. out of memory, a lowering failure) becomes a note."""
    try:
        return fn(*a, **k), None
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(f"    ! {msg}", flush=True)
        return None, msg


def free(*xs):
    for x in xs:
        for a in jax.tree.leaves(x):
            try:
                a.delete()
            except Exception:  # noqa: BLE001
                pass


# ---------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------

def bench_copy(sizes_gb, T, reps):
    rows = []
    for s in sizes_gb:
        n = int(s * GB / 4)
        x = jnp.zeros((n,), jnp.float32)
        t, x = time_scan(lambda c: c + 1.0, x, (), T, reps)
        bw = 2 * n * 4 / t
        rows.append(dict(bytes=n * 4, step_s=t, bandwidth_GBps=bw / GB))
        print(f"  copy {n * 4 / GB:7.3f} GB  {fmt_ms(t)} ms  {bw / GB:8.1f} GB/s", flush=True)
        free(x)
    big = [r["bandwidth_GBps"] for r in rows if r["bytes"] >= 256 * MB] or \
        [r["bandwidth_GBps"] for r in rows]
    return dict(rows=rows, bandwidth_GBps=max(big))


def drtrl_inputs(B, I, O, k, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    eps = (jax.random.normal(ks[0], (B, I, O, k), jnp.float32) * 0.1).astype(dtype)
    J = jax.random.uniform(ks[1], (B, O, k, k), jnp.float32) * 0.9
    df = jax.random.normal(ks[2], (B, O, k), jnp.float32)
    x = jax.random.normal(ks[3], (B, I), jnp.float32)
    d = jax.random.normal(ks[4], (B, O, k), jnp.float32)
    g = jnp.zeros((I, O), jnp.float32)
    return eps, g, (J, df, x, d)


def jax_path_step(carry, J, df, x, d):
    """The JAX backend's D-RTRL rules for one compact MatMulOp trace (update + contraction)."""
    eps, g = carry
    op = brainscale.MatMulOp()
    w = {"weight": jnp.zeros(eps.shape[1:3], jnp.float32)}
    new = op.drtrl_update({"weight": eps}, J, df, x, w)["weight"].astype(eps.dtype)
    return new, g + op.drtrl_grad({"weight": new}, d, w)["weight"]


def pallas_one_pass(tiles, interpret):
    def step(carry, J, df, x, d):
        eps, g = carry
        return drtrl_step(eps, J, df, x, d, None, g, tiles=tiles, interpret=interpret)
    return step


def pallas_two_kernels(tiles, interpret):
    def step(carry, J, df, x, d):
        eps, g = carry
        new = drtrl_update(eps, J, df, x, tiles=tiles, interpret=interpret)
        return new, drtrl_grad(new, d, g, tiles=tiles, interpret=interpret)
    return step


TUNE_CONFIGS = [Tiles(2, 32, 128, 4, 2), Tiles(1, 32, 128, 4, 2), Tiles(2, 16, 128, 4, 2),
                Tiles(4, 32, 128, 8, 2), Tiles(1, 64, 128, 8, 2), Tiles(2, 32, 64, 4, 2),
                Tiles(1, 32, 256, 8, 2), Tiles(2, 32, 128, 4, 1), Tiles(2, 64, 64, 4, 2)]


def bench_tune(B, N, T, reps, interpret, configs):
    best = {}
    rows = []
    for dtype in ("float32", "bfloat16"):
        res = []
        for tl in configs:
            eps, g, consts = drtrl_inputs(B, N, N, 1, dtype)
            out, err = safe(time_scan, pallas_one_pass(tl, interpret), (eps, g), consts, T, reps)
            t = out[0] if out else None
            free(eps, g, out)
            rows.append(dict(dtype=dtype, tiles=tl.__dict__, step_s=t, error=err))
            print(f"  tune {dtype:8s} {tl}  {fmt_ms(t)} ms", flush=True)
            if t is not None:
                res.append((t, tl))
        if res:
            best[dtype] = min(res, key=lambda r: r[0])[1].__dict__
    return dict(rows=rows, B=B, N=N), best


def bench_drtrl(shapes, T, reps, interpret, tiles_by_dtype, copy_bw):
    rows = []
    for (B, N) in shapes:
        row = dict(B=B, I=N, O=N, k=1, bytes_f32=B * N * N * 4)
        for dtype in ("float32", "bfloat16"):
            tl = Tiles(**tiles_by_dtype[dtype]) if dtype in tiles_by_dtype else Tiles()
            nbytes = B * N * N * jnp.dtype(dtype).itemsize
            for name, step in (("jax", jax_path_step), ("pallas1", pallas_one_pass(tl, interpret)),
                               ("pallas2", pallas_two_kernels(tl, interpret))):
                if dtype == "bfloat16" and name == "pallas2":
                    continue
                eps, g, consts = drtrl_inputs(B, N, N, 1, dtype)
                out, err = safe(time_scan, step, (eps, g), consts, T, reps)
                free(eps, g, out)
                key = f"{name}_{'f32' if dtype == 'float32' else 'bf16'}"
                t = out[0] if out else None
                row[key + "_s"] = t
                if err:
                    row[key + "_error"] = err
                if t is not None and name == "pallas1":
                    bw = 2 * nbytes / t / GB
                    row[key + "_GBps"] = bw
                    row[key + "_of_copy"] = bw / copy_bw if copy_bw else None
        r = row
        print(f"  {r['bytes_f32'] / GB:6.2f} GB B={B:3d} N={N:6d} | jax {fmt_ms(r.get('jax_f32_s'))} "
              f"| 1-pass {fmt_ms(r.get('pallas1_f32_s'))} ({(r.get('pallas1_f32_of_copy') or 0) * 100:5.1f}% copy) "
              f"| 2-kern {fmt_ms(r.get('pallas2_f32_s'))} | bf16 jax {fmt_ms(r.get('jax_bf16_s'))} "
              f"1-pass {fmt_ms(r.get('pallas1_bf16_s'))}", flush=True)
        rows.append(row)
    return rows


def crossover(rows, kernel_key, jax_key="jax_f32_s"):
    """Smallest measured trace size from which the kernel is never slower than the JAX path."""
    ok = None
    for r in sorted(rows, key=lambda r: -r["bytes_f32"]):
        tk, tj = r.get(kernel_key), r.get(jax_key)
        if tk is None or tj is None or tk > tj:
            break
        ok = r["bytes_f32"]
    return ok


def _load_bench_models():
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import bench_models  # noqa: E402 - tools/bench_models.py
    return bench_models


def _grads_vec(grads):
    return jnp.concatenate([jnp.ravel(v).astype(jnp.float32) for v in jax.tree.leaves(grads)])


def learner_runner(learner, loss_fn):
    """``online_gradients`` with the jitted scan built once (it re-jits on every call)."""
    import brainstate
    params = learner.model.states(brainstate.ParamState)
    zero = {k: jax.tree.map(jnp.zeros_like, p.value) for k, p in params.items()}

    def body(acc, xy):
        x, y = xy
        g, l = brainstate.transform.grad(lambda: loss_fn(learner(x), y), params,
                                         return_value=True)()
        return {k: jax.tree.map(jnp.add, acc[k], g[k]) for k in acc}, l
    return brainstate.transform.jit(lambda xs, ys: brainstate.transform.scan(body, zero, (xs, ys)))


def time_calls(fn, reps):
    block(fn())                                    # compile + warm up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        block(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


E2E_VARIANTS = (("jax", lambda: "jax", False),
                ("pallas_auto", lambda: PallasBackend(), False),
                ("pallas_all", lambda: PallasBackend(select="all"), False),
                ("fused_auto", lambda: PallasBackend(scheme="fused"), True),
                ("fused_all", lambda: PallasBackend(select="all", scheme="fused"), True))


def bench_e2e(models, N, B, T, reps):
    bm = _load_bench_models()
    rows = []
    for model in models:
        xs, ys = bm.make_inputs(model, T, B)
        xs, ys = jnp.asarray(xs), jnp.asarray(ys)
        row = dict(model=model, N=N, B=B, T=T)
        for name, make_backend, driver in E2E_VARIANTS:
            def run():
                backend = make_backend()
                net = bm.build("ours", model, bm.make_weights(model, N), bm.make_hidden(model, N, B))
                learner = brainscale.DiagParamDimAlgorithm(net, backend=backend)
                learner.compile_graph(xs[0])
                if driver:
                    fn = lambda: fused_online_gradients(learner, xs, ys, bm.loss_fn)  # noqa: E731
                else:
                    runner = learner_runner(learner, bm.loss_fn)
                    fn = lambda: runner(xs, ys)  # noqa: E731
                t = time_calls(fn, reps) / T
                paths = [f"{t_.id}:{t_.path}" for t_ in learner._step.graph.traces] \
                    if backend != "jax" else []
                return t, paths
            out, err = safe(run)
            row[f"{name}_s"] = out[0] if out else None
            if out:
                row[f"{name}_paths"] = out[1]
            if err:
                row[f"{name}_error"] = err
            print(f"  e2e {model:4s} N={N} B={B} {name:12s} {fmt_ms(row[f'{name}_s'])} ms/step "
                  f"{' '.join(out[1]) if out else ''}", flush=True)
        rows.append(row)
    return rows


def bench_bf16_lif(N, B, T):
    """bf16 vs f32 trace storage on the LIF model (one-pass driver, every trace on the
    kernel): time per step, and cosine of the T-step gradient sums to the f32 ones."""
    bm = _load_bench_models()
    xs, ys = bm.make_inputs("lif", T, B)
    xs, ys = jnp.asarray(xs), jnp.asarray(ys)
    res = dict(model="lif", N=N, B=B, T=T)
    grads = {}
    for dtype in ("float32", "bfloat16"):
        def run():
            net = bm.build("ours", "lif", bm.make_weights("lif", N), bm.make_hidden("lif", N, B))
            learner = brainscale.DiagParamDimAlgorithm(
                net, backend=PallasBackend(select="all", scheme="fused", trace_dtype=dtype))
            learner.compile_graph(xs[0])
            block(fused_online_gradients(learner, xs, ys, bm.loss_fn))    # compile
            learner.reset_traces()                   # same start for the timed run
            for name, v in bm.make_hidden("lif", N, B).items():
                getattr(net, name).value = jnp.asarray(v)
            t0 = time.perf_counter()
            g, _ = block(fused_online_gradients(learner, xs, ys, bm.loss_fn))
            return (time.perf_counter() - t0) / T, g
        out, err = safe(run)
        key = "f32" if dtype == "float32" else "bf16"
        res[f"{key}_step_s"] = out[0] if out else None
        if err:
            res[f"{key}_error"] = err
        if out:
            grads[key] = _grads_vec(out[1])
    if "f32" in grads and "bf16" in grads:
        a, b = grads["f32"], grads["bf16"]
        res["cosine"] = float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
        res["rel_err"] = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
    if res.get("f32_step_s") and res.get("bf16_step_s"):
        res["speedup"] = res["f32_step_s"] / res["bf16_step_s"]
    print(f"  bf16 LIF N={N} B={B} T={T}: f32 {fmt_ms(res.get('f32_step_s'))} ms, bf16 "
          f"{fmt_ms(res.get('bf16_step_s'))} ms, speedup {res.get('speedup', float('nan')):.2f}, "
          f"cosine {res.get('cosine', float('nan')):.6f}", flush=True)
    return res


def bench_es(N, B, Ks, reps, interpret):
    rows = []
    hi = jax.lax.Precision.HIGHEST
    for K in Ks:
        ks = jax.random.split(jax.random.key(K), 3)
        X = jax.random.normal(ks[0], (K, B, N), jnp.float32)
        S = jax.random.normal(ks[1], (K, B, N), jnp.float32)
        G = jnp.zeros((N, N), jnp.float32)

        def per_step(g, X, S):
            def body(gg, xs):
                x, s = xs
                return gg + jax.lax.dot_general(x, s, (((0,), (0,)), ((), ())), precision=hi), None
            return jax.lax.scan(body, g, (X, S))[0]
        row = dict(n_in=N, n_out=N, B=B, K=K)
        for name, fn in (("per_step", per_step),
                         ("chunked_xla", lambda g, X, S: es_chunked_grad_reference(X, S, g)),
                         ("chunked_pallas", lambda g, X, S: es_chunked_grad(X, S, g,
                                                                            interpret=interpret))):
            out, err = safe(time_scan, fn, G, (X, S), 1, reps)
            row[f"{name}_s_per_step"] = out[0] / K if out else None
            if out:
                G = out[1]
            if err:
                row[f"{name}_error"] = err
        if row.get("per_step_s_per_step") and row.get("chunked_xla_s_per_step"):
            row["speedup_xla"] = row["per_step_s_per_step"] / row["chunked_xla_s_per_step"]
        if row.get("per_step_s_per_step") and row.get("chunked_pallas_s_per_step"):
            row["speedup_pallas"] = row["per_step_s_per_step"] / row["chunked_pallas_s_per_step"]
        print(f"  es N={N} B={B} K={K:3d}: per-step {fmt_ms(row['per_step_s_per_step'])} | chunked "
              f"xla {fmt_ms(row['chunked_xla_s_per_step'])} ({row.get('speedup_xla', 0):.2f}x) | "
              f"pallas {fmt_ms(row['chunked_pallas_s_per_step'])} "
              f"({row.get('speedup_pallas', 0):.2f}x)  ms/step", flush=True)
        free(X, S, G)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------

def sweep_shapes(min_gb, max_gb, B=16):
    targets = [g for g in (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0) if min_gb <= g <= max_gb]
    shapes = []
    for g in targets:
        N = int(round(np.sqrt(g * GB / (B * 4)) / 128)) * 128
        shapes.append((B, max(N, 128)))
    return shapes


def targets_check(res):
    out = {}
    copy_bw = res.get("copy", {}).get("bandwidth_GBps")
    rows = res.get("drtrl", [])
    big = [r for r in rows if r["bytes_f32"] >= 0.5 * GB]
    if big and copy_bw:
        fr = [r.get("pallas1_f32_of_copy") for r in big]
        out["one_pass_ge_85pct_copy_from_0.5GB"] = bool(all(f is not None and f >= 0.85 for f in fr))
        sp = [r["pallas1_f32_s"] / r["pallas1_bf16_s"] for r in big
              if r.get("pallas1_f32_s") and r.get("pallas1_bf16_s")]
        out["bf16_ge_1.7x_from_0.5GB"] = bool(sp and min(sp) >= 1.7)
        out["bf16_speedups"] = sp
    sel = res.get("selection", {})
    if rows:
        out["one_pass_never_slower_than_jax_where_selected"] = all(
            r.get("pallas1_f32_s") is not None and r.get("jax_f32_s") is not None
            and r["pallas1_f32_s"] <= r["jax_f32_s"] for r in rows
            if sel.get("fused_min_bytes") is not None and r["bytes_f32"] >= sel["fused_min_bytes"])
    b = res.get("bf16_lif")
    if b and "cosine" in b:
        out["bf16_cosine_ge_0.999"] = b["cosine"] >= 0.999
    es = [r for r in res.get("es", []) if r.get("speedup_xla")]
    if es:
        out["chunked_ge_2x_per_step"] = max(max(r.get("speedup_xla", 0), r.get("speedup_pallas") or 0)
                                            for r in es) >= 2.0
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/"
                                                "pallas_<device>.json)")
    ap.add_argument("--sections", default="copy,tune,drtrl,e2e,bf16,es")
    ap.add_argument("--min-gb", type=float, default=0.1)
    ap.add_argument("--max-gb", type=float, default=10.0)
    ap.add_argument("--T", type=int, default=10, help="steps per timed scan")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--e2e-N", type=int, default=1024)
    ap.add_argument("--e2e-B", type=int, default=64)
    ap.add_argument("--e2e-T", type=int, default=20)
    ap.add_argument("--bf16-T", type=int, default=1000)
    ap.add_argument("--es-K", default="8,16,32")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check of the script)")
    ap.add_argument("--merge", action="store_true",
                    help="update the sections of an existing --out file (split runs)")
    args = ap.parse_args(argv)

    plat = _common.platform()
    interpret = plat.interpret
    dev = jax.devices()[0]
    device = str(getattr(dev, "device_kind", dev.platform))
    sections = set(args.sections.split(","))
    res = dict(device=device, platform=plat.kind, compute_capability=plat.compute_capability,
               jax=jax.__version__, jaxlib=getattr(__import__("jaxlib"), "__version__", "?"),
               python=_pyplatform.python_version(), interpret=interpret,
               date=time.strftime("%Y-%m-%d %H:%M:%S"), args=vars(args))
    print(f"device: {device} ({plat.reason}); jax {jax.__version__}", flush=True)
    if interpret and not args.quick:
        print("no usable GPU: the kernels would run in interpret mode; use --quick", flush=True)
        return 2
    if args.quick:
        copy_sizes, shapes = [0.001], [(2, 32), (2, 64)]
        tune_B, tune_N, e2e = (2, 64), dict(N=16, B=2, T=4), None
        bf16 = dict(N=16, B=2, T=20)
        es = dict(N=64, B=4, Ks=[2, 4])
        configs = TUNE_CONFIGS[:2]
        args.reps = min(args.reps, 2)
        args.T = min(args.T, 2)
    else:
        copy_sizes = [0.064, 0.256, 1.0, 2.0]
        shapes = sweep_shapes(args.min_gb, args.max_gb)
        tune_B, e2e = (16, 4096), dict(N=args.e2e_N, B=args.e2e_B, T=args.e2e_T)
        bf16 = dict(N=args.e2e_N, B=args.e2e_B, T=args.bf16_T)
        es = dict(N=4096, B=64, Ks=[int(k) for k in args.es_K.split(",")])
        configs = TUNE_CONFIGS
    copy_bw = None
    if "copy" in sections:
        print("copy bandwidth", flush=True)
        res["copy"] = bench_copy(copy_sizes, args.T, args.reps)
        copy_bw = res["copy"]["bandwidth_GBps"]
    tiles = {}
    if "tune" in sections:
        print("tile tuning (one-pass kernel)", flush=True)
        res["tune"], tiles = bench_tune(*tune_B, args.T, args.reps, interpret, configs)
        res["tiles"] = tiles
    if "drtrl" in sections:
        print("D-RTRL per step (f32 trace sizes; bf16 on the same shapes)", flush=True)
        res["drtrl"] = bench_drtrl(shapes, args.T, args.reps, interpret, tiles, copy_bw)
        res["selection"] = dict(
            learner_min_bytes=crossover(res["drtrl"], "pallas2_f32_s"),
            fused_min_bytes=crossover(res["drtrl"], "pallas1_f32_s"),
            es_impl="xla", note="smallest measured f32 trace size from which the kernel is "
                                "never slower than the JAX path (null: never)")
    if "e2e" in sections and e2e:
        print("end to end (D-RTRL, per step)", flush=True)
        res["e2e"] = bench_e2e(("lif", "gru"), e2e["N"], e2e["B"], e2e["T"], args.reps)
    elif "e2e" in sections and args.quick:
        print("end to end (quick)", flush=True)
        res["e2e"] = bench_e2e(("lif",), 16, 2, 3, 2)
    if "bf16" in sections:
        print("bf16 vs f32 storage, LIF", flush=True)
        res["bf16_lif"] = bench_bf16_lif(bf16["N"], bf16["B"], bf16["T"])
    if "es" in sections:
        print("ES-D-RTRL chunked vs per-step accumulation", flush=True)
        res["es"] = bench_es(es["N"], es["B"], es["Ks"], args.reps, interpret)
    if "es" in sections and "es_impl" in res.get("selection", {}):
        rows = [r for r in res["es"] if r.get("chunked_pallas_s_per_step")]
        if rows and all(r["chunked_pallas_s_per_step"] < r["chunked_xla_s_per_step"] for r in rows):
            res["selection"]["es_impl"] = "pallas"
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"pallas_{device.replace(' ', '_').lower()}.json")
    if args.merge and os.path.exists(out):
        with open(out) as f:
            old = json.load(f)
        runs = old.get("runs", []) + [res["args"]]
        old.update({k: v for k, v in res.items() if k not in ("args",)})
        if "selection" in old and "es" in res and "es_impl" not in res.get("selection", {}):
            rows = [r for r in res["es"] if r.get("chunked_pallas_s_per_step")]
            old["selection"]["es_impl"] = "pallas" if rows and all(
                r["chunked_pallas_s_per_step"] < r["chunked_xla_s_per_step"] for r in rows) else "xla"
        res = old
        res["runs"] = runs
    res["targets"] = targets_check(res)
    print("targets:", json.dumps(res["targets"]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1, default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o))
    print(f"saved {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
