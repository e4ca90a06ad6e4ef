#!/usr/bin/env python
"""Conv D-RTRL on the published conv SNN example: the channel layout against the dense one.

The model (brainscale 0.1's N-MNIST-style conv SNN): input ``34 × 34 × 2`` (event frames,
10 % on), ``Conv2d(2 → 8, 3×3, SAME) → LIF → Conv2d(8 → 8, 3×3, SAME) → LIF →`` a leaky
readout of 10 units over the flattened ``34·34·8`` spikes; batch ``B = 4``, ``T = 20`` steps
per batch, float32, a squared-error loss on the readout at every step.

Variants, each a full batch (``T`` calls of a jitted per-step gradient, summed, as a
training loop that applies updates per step would run them; BPTT a jitted gradient of the
scanned loss), timed after one warm-up call, interleaved over ``--rounds``
(``drtrl-dense``, minutes per batch, over ``--dense-rounds``):

* ``drtrl-default``: D-RTRL with the package's default pipeline (run with ``PYTHONPATH`` at
  an older checkout, the before row of a before / after pair: see benchmarks/README.md);
* ``drtrl-channel``: D-RTRL with the conv kernels' channel layout (the default): per output
  neuron the kernel slice of its channel, ``ε`` of ``B·|y|·|θ|/C_out`` elements;
* ``drtrl-dense``: the same graph with every param-dim trace given the dense
  per-output-neuron layout by a user pass (the layout conv D-RTRL had before the channel
  layout: ``B·|y|·|θ|`` elements; ``∂y/∂θ`` now by forward mode, before by reverse mode);
* ``drtrl-channel-bf16``: the channel layout stored in bfloat16 (``layout-traces{storage=bfloat16}``);
* ``es-drtrl``: ES-D-RTRL (``decay_or_rank=0.9``);
* ``bptt``: back-propagation through the ``T`` steps.

Reported per variant: seconds per batch (fastest round) and per step, the trace bytes the IR
prints, and the summed gradient's cosine to BPTT per parameter (min over parameters);
``drtrl-channel`` vs ``drtrl-dense``: the largest relative difference of any gradient leaf
(the two layouts compute the same numbers; no recurrence inside a layer makes D-RTRL equal
BPTT here only for the first layer's input kernel, so cosine < 1 elsewhere is the
algorithm, not the layout).

    python tools/bench_conv.py --out benchmarks/results/cpu/conv-drtrl
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time
from pathlib import Path

import brainstate
import braintools
import jax
import jax.numpy as jnp
import numpy as np

import brainscale
from brainscale import nn as bnn
from brainscale.passes import DEFAULT_PIPELINE, function_pass, layout_trace

HW, C_IN, C, N_OUT = 34, 2, 8, 10


class ConvSNN(brainstate.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        brainstate.random.seed(seed)
        lif = dict(tau=5., R=1., V_th=1., V_reset=0., V_rest=0.,
                   V_initializer=braintools.init.Constant(0.))
        self.c1 = bnn.Conv2d((HW, HW, C_IN), C, 3, w_init=braintools.init.Normal(0.3, 1.0),
                             b_init=braintools.init.ZeroInit())
        self.n1 = bnn.LIF(self.c1.out_size, **lif)
        self.c2 = bnn.Conv2d(self.c1.out_size, C, 3, w_init=braintools.init.Normal(0.25, 0.5),
                             b_init=braintools.init.ZeroInit())
        self.n2 = bnn.LIF(self.c2.out_size, **lif)
        self.ro = bnn.LeakyRateReadout(int(np.prod(self.c2.out_size)), N_OUT, tau=5.)

    def update(self, x):
        z1 = self.n1(self.c1(x))
        z2 = self.n2(self.c2(z1))
        return self.ro(z2.reshape(z2.shape[:-3] + (-1,)))


def loss_fn(out, target):
    return jnp.sum((out - target) ** 2)


@function_pass("bench-conv-dense", requires={"trace-arrays"})
def _to_dense(graph, ctx):
    return graph.replace(traces=tuple(
        layout_trace(graph, dataclasses.replace(t, layout="dense"))
        if t.dim == "param" and t.layout == "channel" else t for t in graph.traces))


def _pipeline(variant):
    pipe = list(DEFAULT_PIPELINE)
    if variant == "drtrl-dense":
        pipe.append("bench-conv-dense")
    if variant == "drtrl-default":
        return None
    if variant == "drtrl-channel-bf16":
        pipe = [p if p != "layout-traces" else "layout-traces{storage=bfloat16}" for p in pipe]
    return pipe


def _data(B, T, seed=0):
    rng = np.random.RandomState(seed)
    xs = (rng.rand(T, B, HW, HW, C_IN) < 0.1).astype(np.float32)
    ys = rng.randn(T, B, N_OUT).astype(np.float32)
    return jnp.asarray(xs), jnp.asarray(ys)


def make_runner(variant, B, xs, ys):
    """``(run, trace_bytes)``; ``run()`` returns ``{param path: grad}`` for one batch."""
    net = ConvSNN()
    brainstate.nn.init_all_states(net, batch_size=B)
    if variant == "bptt":
        params = net.states(brainstate.ParamState)

        def total():
            def body(c, xy):
                return c + loss_fn(net(xy[0]), xy[1]), None
            return brainstate.transform.scan(body, jnp.float32(0.0), (xs, ys))[0]

        @brainstate.transform.jit
        def run():
            brainstate.nn.reset_all_states(net, batch_size=B)
            return brainstate.transform.grad(total, params)()
        return run, 0
    if variant == "es-drtrl":
        learner = brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9)
    else:
        learner = brainscale.DiagParamDimAlgorithm(net, pipeline=_pipeline(variant))
    learner.compile_graph(xs[0])
    nbytes = sum(t.nbytes for t in learner.graph.traces)
    params = net.states(brainstate.ParamState)

    @brainstate.transform.jit
    def step(x, y):
        return brainstate.transform.grad(lambda: loss_fn(learner(x), y), params)()

    def run():
        learner.reset_state()
        acc = None
        for t in range(xs.shape[0]):
            g = step(xs[t], ys[t])
            acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
        return acc
    return run, nbytes


def _flat(g):
    return {".".join(map(str, k)) + "/" + "/".join(map(str, p)): np.asarray(v, np.float64)
            for k, tree in g.items() for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="drtrl-channel,drtrl-dense,drtrl-channel-bf16,"
                                          "es-drtrl,bptt")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dense-rounds", type=int, default=1,
                    help="timed rounds of drtrl-dense (minutes per batch)")
    ap.add_argument("--out", default="outputs/bench_conv")
    a = ap.parse_args(argv)
    brainstate.environ.set(dt=1.0)
    variants = a.variants.split(",")
    xs, ys = _data(a.B, a.T)
    runners, first, rows, grads = {}, {}, {}, {}
    for v in variants:
        t0 = time.perf_counter()
        run, nbytes = make_runner(v, a.B, xs, ys)
        g = jax.block_until_ready(run())
        first[v] = time.perf_counter() - t0
        runners[v], grads[v] = run, {k: val for k, val in _flat(g).items()}
        rows[v] = dict(variant=v, trace_bytes=nbytes, compile_and_first_s=first[v], times=[])
        print(f"  {v}: first call {first[v]:.1f} s", flush=True)
    for rnd in range(a.rounds):
        for v in variants:
            if v == "drtrl-dense" and rnd >= a.dense_rounds:
                continue
            t0 = time.perf_counter()
            jax.block_until_ready(runners[v]())
            rows[v]["times"].append(time.perf_counter() - t0)
            print(f"  round {rnd}: {v} {rows[v]['times'][-1]:.2f} s", flush=True)
    ref = grads.get("bptt")
    for v in variants:
        r = rows[v]
        r["batch_s"] = min(r["times"])
        r["ms_per_step"] = 1e3 * r["batch_s"] / a.T
        if ref is not None and v != "bptt":
            cos = {k: float(np.dot(grads[v][k].ravel(), ref[k].ravel()) /
                            (np.linalg.norm(grads[v][k]) * np.linalg.norm(ref[k]) + 1e-30))
                   for k in ref}
            r["cos_bptt"] = cos
            r["cos_bptt_min"] = min(cos.values())
    if "drtrl-channel" in grads and "drtrl-dense" in grads:
        gc, gd = grads["drtrl-channel"], grads["drtrl-dense"]
        rows["drtrl-channel"]["max_rel_diff_vs_dense"] = max(
            float(np.max(np.abs(gc[k] - gd[k])) / (np.max(np.abs(gd[k])) + 1e-30)) for k in gd)
    base = rows.get("drtrl-dense", {}).get("batch_s")
    print(f"conv SNN 34x34x2 -> conv 8 -> LIF -> conv 8 -> LIF -> readout 10; B={a.B}, T={a.T}, "
          f"jax {jax.__version__}, fastest of {a.rounds} rounds")
    print(f"{'variant':<20}{'s/batch':>9}{'ms/step':>10}{'trace MB':>10}{'vs dense':>10}"
          f"{'cos BPTT (min)':>16}{'first call s':>14}")
    for v in variants:
        r = rows[v]
        sp = f"{base / r['batch_s']:.1f}x" if base else "-"
        cos = f"{r['cos_bptt_min']:.4f}" if "cos_bptt_min" in r else "-"
        print(f"{v:<20}{r['batch_s']:>9.3f}{r['ms_per_step']:>10.2f}"
              f"{r['trace_bytes'] / 2 ** 20:>10.2f}{sp:>10}{cos:>16}"
              f"{r['compile_and_first_s']:>14.2f}")
    if "max_rel_diff_vs_dense" in rows.get("drtrl-channel", {}):
        print(f"drtrl-channel vs drtrl-dense gradients: max relative difference "
              f"{rows['drtrl-channel']['max_rel_diff_vs_dense']:.2e}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                brainscale=os.path.relpath(Path(brainscale.__file__).parent), jax=jax.__version__, python=platform.python_version(),
                machine=platform.machine(), B=a.B, T=a.T, rounds=a.rounds)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=list(rows.values())),
                                                 indent=1))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
