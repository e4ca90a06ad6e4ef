#!/usr/bin/env python
"""D-RTRL with k = 2 states per neuron: ways to store and update the trace, timed on XLA CPU.

The compact D-RTRL trace of a weight ``W[a, n]`` feeding a 2-state neuron keeps one array per
state, ``ε_i[b, a, n]`` (i = 0, 1), and per step computes

    ε_i ← J[b, n, i, 0] ε_0 + J[b, n, i, 1] ε_1 + x[b, a] df[b, n, i]
    g[a, n] = Σ_b Σ_i δ[b, n, i] ε_i[b, a, n]

(the update of ``MatMulOp.drtrl_update`` and the contraction of ``drtrl_grad``). Each new
``ε_i`` reads both old arrays, so XLA CPU, which emits one fusion per output, cannot write
either in place and copies the loop carry every step. Variants, the same arithmetic:

* ``per-state``: the library's layout today (one f32 array per state);
* ``complex-pair``: both states in one complex64 array (``ε_0`` the real, ``ε_1`` the
  imaginary part): one element-wise fusion reads and writes the same element, so the update
  can run in place; the contraction reads the new array once more (an element-wise reduce);
* ``rows-loop``: a ``fori_loop`` over the batch rows updating each row with
  ``dynamic_update_slice`` (in-place by construction, one small fusion per row);
* ``complex-from-old``: the packed pair, the contraction taken from the old trace (the
  update and the contraction then read the same array: one pass if XLA merged them);
* ``complex-batch-fused``: the packed pair, one loop over the batch rows doing update and
  contraction of a row together (one pass over the trace if the loop ran in place).

Both one-pass attempts are there to show whether XLA CPU can do the update and the
contraction in one pass over the trace (``XLA_FLAGS`` such as
``--xla_cpu_copy_insertion_use_region_analysis=true`` can be tried from the environment).

The bound is reading the trace twice (update, contraction) and writing it once at the copy
bandwidth measured in the same process. Scan over T steps, fastest of ``--repeats``.

    python tools/bench_k2_update.py --N 512,1024 --out benchmarks/results/cpu/k2-update
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _update(es, J, df, x):
    k = len(es)
    out = []
    for i in range(k):
        acc = J[:, None, :, i, 0] * es[0]
        for j in range(1, k):
            acc = acc + J[:, None, :, i, j] * es[j]
        out.append(acc + x[:, :, None] * df[:, None, :, i])
    return out


def _contract(es, d):
    return jnp.sum(sum(d[..., i][:, None, :] * e for i, e in enumerate(es)), axis=0)


def step_per_state(es, inp):
    J, df, x, d = inp
    new = _update(list(es), J, df, x)
    return new, _contract(new, d)


def step_complex(z, inp):
    J, df, x, d = inp
    new = _update([jnp.real(z), jnp.imag(z)], J, df, x)
    z2 = jax.lax.optimization_barrier(jax.lax.complex(new[0], new[1]))
    return z2, _contract([jnp.real(z2), jnp.imag(z2)], d)


def step_rows(es, inp):
    J, df, x, d = inp
    B = J.shape[0]

    def body(b, es):
        sl = lambda a: jax.lax.dynamic_slice_in_dim(a, b, 1, 0)   # noqa: E731
        new = _update([sl(e) for e in es], sl(J), sl(df), sl(x))
        return [jax.lax.dynamic_update_slice_in_dim(e, n, b, 0) for e, n in zip(es, new)]
    es = jax.lax.fori_loop(0, B, body, list(es))
    return es, _contract(es, d)


def step_complex_from_old(z, inp):
    """The contraction rewritten on the *old* trace, so that update and contraction read the
    same array (``Σ_i δ_i ε_i' = Σ_j c_j ε_j + x ⊗ Σ_i δ_i df_i``, ``c_j = Σ_i δ_i J_ij``): a
    sibling pair a multi-output fusion could merge into one pass."""
    J, df, x, d = inp
    e = [jnp.real(z), jnp.imag(z)]
    c = [d[..., 0] * J[..., 0, j] + d[..., 1] * J[..., 1, j] for j in range(2)]
    g = jnp.sum(c[0][:, None, :] * e[0] + c[1][:, None, :] * e[1], axis=0) \
        + x.T @ jnp.sum(d * df, axis=-1)
    new = _update(e, J, df, x)
    return jax.lax.complex(new[0], new[1]), g


def step_complex_batch_fused(z, inp):
    """One pass per example: a ``fori_loop`` over the batch rows updates row b in place and
    adds its contraction while the row is still in cache."""
    J, df, x, d = inp
    B = J.shape[0]

    def body(b, carry):
        z, g = carry
        ix = lambda a: jax.lax.dynamic_index_in_dim(a, b, 0, keepdims=False)   # noqa: E731
        zb = ix(z)
        new = _update([jnp.real(zb)[None], jnp.imag(zb)[None]], ix(J)[None], ix(df)[None],
                      ix(x)[None])
        nb = jax.lax.complex(new[0][0], new[1][0])
        db = ix(d)
        g = g + db[None, :, 0] * new[0][0] + db[None, :, 1] * new[1][0]
        return jax.lax.dynamic_update_index_in_dim(z, nb, b, 0), g
    return jax.lax.fori_loop(0, B, body, (z, jnp.zeros(z.shape[1:], jnp.float32)))


VARIANTS = {"per-state": step_per_state, "complex-pair": step_complex, "rows-loop": step_rows,
            "complex-from-old": step_complex_from_old,
            "complex-batch-fused": step_complex_batch_fused}
COMPLEX = ("complex-pair", "complex-from-old", "complex-batch-fused")


def bandwidth(n_elems: int, repeats: int) -> float:
    """Steady-state read+write bandwidth (bytes/s) of an in-place ``v * c`` on n floats."""
    v = jnp.ones((n_elems,), jnp.float32)
    f = jax.jit(lambda v: v * 1.0001, donate_argnums=0)
    for _ in range(3):
        v = f(v)
    v.block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        v = f(v)
        v.block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * 4 * n_elems / min(ts)


def measure(B, A, N, T, repeats, variants):
    rng = np.random.RandomState(0)
    J = jnp.asarray(rng.rand(T, B, N, 2, 2) * 0.5, jnp.float32)
    df = jnp.asarray(rng.randn(T, B, N, 2), jnp.float32)
    x = jnp.asarray(rng.randn(T, B, A), jnp.float32)
    d = jnp.asarray(rng.randn(T, B, N, 2), jnp.float32)
    zeros = [jnp.zeros((B, A, N), jnp.float32)] * 2
    trace_bytes = 2 * B * A * N * 4
    bw = bandwidth(B * A * N * 2, repeats)
    bound_ms = 3 * trace_bytes / bw * 1e3       # read (update) + write + read (contraction)
    rows, ref = [], None
    for name in variants:
        init = jax.lax.complex(*zeros) if name in COMPLEX else zeros
        f = jax.jit(lambda e, step=VARIANTS[name]: jax.lax.scan(step, e, (J, df, x, d))[1].sum(0))
        c = f.lower(init).compile()
        hlo = c.as_text()
        copies = sum(1 for ln in hlo.splitlines() if " copy(" in ln and f"{A},{N}" in ln)
        out = jax.block_until_ready(c(init))
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(c(init))
            ts.append(time.perf_counter() - t0)
        ms = min(ts) / T * 1e3
        if ref is None:
            ref = out
        rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
        rows.append({"B": B, "A": A, "N": N, "variant": name, "ms_per_step": ms,
                     "bound_ms": bound_ms, "ratio": ms / bound_ms, "trace_copies_in_hlo": copies,
                     "temp_mb": c.memory_analysis().temp_size_in_bytes / 2 ** 20,
                     "rel_diff_vs_per_state": rel, "trace_mb": trace_bytes / 2 ** 20,
                     "bandwidth_GBps": bw / 1e9})
        print(f"N={N:5d} {name:13s} {ms:8.2f} ms/step  bound {bound_ms:6.2f}  ratio "
              f"{ms / bound_ms:5.2f}  trace copies in HLO {copies}  rel diff {rel:.1e}",
              flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", default="512,1024")
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--n-in", type=int, default=100, help="inputs besides the recurrent N")
    p.add_argument("--T", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="benchmarks/results/cpu/k2-update")
    a = p.parse_args(argv)
    rows = []
    for n in [int(v) for v in a.N.split(",")]:
        rows += measure(a.B, a.n_in + n, n, a.T, a.repeats, a.variants.split(","))
    meta = {"command": "python tools/bench_k2_update.py " + " ".join(argv or __import__("sys").argv[1:]),
            "date": datetime.datetime.now().isoformat(timespec="minutes"),
            "jax": jax.__version__, "platform": f"{jax.default_backend()} ({platform.machine()})"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "k2_update.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"`{meta['command']}`", "", f"jax {meta['jax']}, {meta['platform']}, {meta['date']}",
             "", "| N | variant | ms/step | bound ms | ratio | trace-size copies in HLO | "
                 "rel. diff |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['variant']} | {r['ms_per_step']:.2f} | "
                     f"{r['bound_ms']:.2f} | {r['ratio']:.2f} | {r['trace_copies_in_hlo']} | "
                     f"{r['rel_diff_vs_per_state']:.1e} |")
    (out / "k2_update.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
