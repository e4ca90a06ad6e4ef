#!/usr/bin/env python
"""Gradient fidelity of a normalisation between an op and the neurons: exact vs constant stats.

``absorb-normalization`` turns ``W·x → LayerNorm (no affine) → neurons`` into one composite
op. ``norm_stats='exact'`` (default) keeps the exact per-output-neuron trace;
``norm_stats='constant'`` treats the statistics as constants (the common approximation). For
each model (``ff``: input weights only; ``rec``: input and recurrent weights in one matmul),
N, algorithm (D-RTRL / ES-D-RTRL with α = ``--decay``), statistics option and window W, the
online gradient summed over W steps (``brainscale.online_gradients``, from zero states) is
compared with BPTT over the same W steps: cosine, relative error ``‖g − g_bptt‖ / ‖g_bptt‖``
and norm ratio ``‖g‖ / ‖g_bptt‖`` of the weight.

    python tools/bench_norm.py --N 64,256 --out benchmarks/results/cpu/norm-fidelity
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

import brainscale

N_IN, B = 20, 8


def layer_norm(y, eps=1e-5):
    m = jnp.mean(y, -1, keepdims=True)
    return (y - m) / jnp.sqrt(jnp.mean((y - m) ** 2, -1, keepdims=True) + eps)


class Net(brainstate.nn.Module):
    """``z = 1.5 · LN(W · [x, tanh V]) + 0.2`` drives a 2-state neuron ``(V, a)``."""

    def __init__(self, n, recurrent, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        n_in = N_IN + (n if recurrent else 0)
        self.recurrent = recurrent
        self.w = brainscale.ETraceParam(
            {"weight": jnp.asarray(rng.randn(n_in, n) / np.sqrt(n_in), jnp.float32)},
            brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.zeros((B, n), jnp.float32))
        self.a = brainscale.ETraceState(jnp.zeros((B, n), jnp.float32))

    def update(self, x):
        inp = jnp.concatenate([x, jnp.tanh(self.V.value)], -1) if self.recurrent else x
        z = 1.5 * layer_norm(self.w.execute(inp)) + 0.2
        v, a = self.V.value, self.a.value
        self.V.value = 0.9 * v - 0.2 * a + 0.1 * z
        self.a.value = 0.8 * a + 0.1 * jnp.tanh(v)
        return jnp.tanh(self.V.value)


def loss(out, tg):
    return jnp.sum((out - tg) ** 2)


def _flat(g):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(g)])


def bptt(model, n, xs, ys):
    net = Net(n, model == "rec")
    params = net.states(brainstate.ParamState)

    def total():
        return brainstate.transform.for_loop(lambda x, y: loss(net(x), y), xs, ys).sum()
    return brainstate.transform.grad(total, params)()


def online(model, n, algo, stats, decay, xs, ys):
    net = Net(n, model == "rec")
    alg = (brainscale.DiagParamDimAlgorithm(net, norm_stats=stats) if algo == "param" else
           brainscale.DiagIODimAlgorithm(net, decay_or_rank=decay, norm_stats=stats))
    learner = alg.compile_graph(xs[0])
    ir = learner.ir()
    assert "+norm" in ir and f"stats={stats}" in ir, "the normalisation was not absorbed:\n" + ir
    g, _ = brainscale.online_gradients(learner, xs, ys, loss)
    return g


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", default="64,256")
    p.add_argument("--W", default="10,100")
    p.add_argument("--decay", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/cpu/norm-fidelity")
    a = p.parse_args(argv)
    rows = []
    for model in ("ff", "rec"):
        for n in map(int, a.N.split(",")):
            for W in map(int, a.W.split(",")):
                rng = np.random.RandomState(a.seed)
                xs = jnp.asarray(rng.randn(W, B, N_IN), jnp.float32)
                ys = jnp.asarray(0.5 * rng.randn(W, B, n), jnp.float32)
                ref = _flat(bptt(model, n, xs, ys))
                for algo in ("param", "io"):
                    for stats in ("exact", "constant"):
                        g = _flat(online(model, n, algo, stats, a.decay, xs, ys))
                        nr = float(np.linalg.norm(ref))
                        row = {"model": model, "N": n, "W": W, "algo": algo, "stats": stats,
                               "cosine": float(g @ ref / (np.linalg.norm(g) * nr + 1e-300)),
                               "rel_err": float(np.linalg.norm(g - ref) / nr),
                               "norm_ratio": float(np.linalg.norm(g) / nr)}
                        rows.append(row)
                        print(f"{model:3s} N={n:4d} W={W:3d} {algo:5s} {stats:8s} "
                              f"cos={row['cosine']:.4f} rel={row['rel_err']:.3g} "
                              f"norm={row['norm_ratio']:.3f}", flush=True)
    names = {"param": "D-RTRL", "io": f"ES-D-RTRL α={a.decay}"}
    cmd = "python tools/bench_norm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": cmd, "date": datetime.datetime.now().isoformat(timespec="minutes"),
            "jax": jax.__version__, "brainstate": brainstate.__version__, "B": B,
            "n_in": N_IN}
    md = [f"`{cmd}` — jax {jax.__version__}, brainstate {brainstate.__version__}, B = {B}, "
          f"{meta['date']}", "",
          "| model | N | W | algorithm | stats | cosine | rel. error | norm ratio |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['N']} | {r['W']} | {names[r['algo']]} | {r['stats']} | "
           f"{r['cosine']:.4f} | {r['rel_err']:.3g} | {r['norm_ratio']:.3f} |" for r in rows]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "norm_fidelity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "norm_fidelity.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
