"""Sharding checks on 4 virtual CPU devices, run by tests/test_sharding.py in a fresh process
(``--xla_force_host_platform_device_count`` must be set before JAX starts).

Prints one JSON line per case: the worst relative gradient difference to one device, the
partition specs of the traces and hidden states after the run, and per-device bytes.
"""
from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # noqa: E402

import brainstate  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import brainscale  # noqa: E402
import models  # noqa: E402

B, N, T = 4, 8, 6


def build(name):
    """Models of tests/models.py with N = 8 neurons (divisible by the mesh axes)."""
    rng = np.random.RandomState(1000)
    if name == "lif":
        return models.LIFDeltaNet(3, N, batch=B), jnp.asarray(rng.randn(B, 3), jnp.float32)
    if name == "alif":
        return models.ALIFNet(3, N, batch=B), jnp.asarray(rng.randn(B, 3), jnp.float32)
    if name == "gru":
        return models.GRUNet(sizes=(3, N, N, 4), batch=B), jnp.asarray(rng.randn(B, 3),
                                                                        jnp.float32)
    if name == "sparse":
        return models.SparseRecNet(3, N, batch=B), jnp.asarray(rng.randn(B, 3), jnp.float32)
    raise ValueError(name)


def learner(net, algo, **kw):
    from brainscale import zoo
    if algo == "param":
        return brainscale.DiagParamDimAlgorithm(net, **kw)
    if algo == "rtrl":            # influence blocks m (scope coupled)
        return zoo.RTRLAlgorithm(net, **kw)
    if algo == "eprop_k":         # kappa-filtered copies eps_bar
        return zoo.EPropAlgorithm(net, kappa=0.8, **kw)
    if algo == "uoro":            # rank-1 factors u_h, u_p
        return zoo.UOROAlgorithm(net, seed=3, **kw)
    return brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9, **kw)


def loss(o, y):
    return jnp.sum((o - y) ** 2)


def spec(x):
    return [None if a is None else str(a) for a in x.sharding.spec] + \
        [None] * (np.ndim(x) - len(x.sharding.spec))


def per_device_bytes(x):
    return int(x.addressable_shards[0].data.nbytes)


def case(name, algo, mesh_shape, names, how):
    mesh = Mesh(np.array(jax.devices()[:int(np.prod(mesh_shape))]).reshape(mesh_shape), names)
    net1, x0 = build(name)
    net2, _ = build(name)
    rng = np.random.RandomState(0)
    xs = jnp.asarray(rng.randn(T, *np.shape(x0)), jnp.float32)
    ys = jnp.asarray(rng.randn(T, *np.shape(build(name)[0].update(x0))), jnp.float32)
    l1 = learner(net1, algo).compile_graph(x0)
    g1, losses1 = brainscale.online_gradients(l1, xs, ys, loss)
    if how == "compile":      # per-step use: compiled on the mesh, stepped with grad
        l2 = learner(net2, algo, mesh=mesh).compile_graph(x0)
        params = net2.states(brainstate.ParamState)
        g2 = None
        for t in range(T):
            g = brainstate.transform.grad(lambda: loss(l2(xs[t]), ys[t]), params)()
            g2 = g if g2 is None else jax.tree.map(jnp.add, g2, g)
    else:                     # online_gradients(mesh=...)
        l2 = learner(net2, algo).compile_graph(x0)
        g2, _ = brainscale.online_gradients(l2, xs, ys, loss, mesh=mesh)
    err = 0.0
    for k in g1:
        for a, b in zip(jax.tree.leaves(g1[k]), jax.tree.leaves(g2[k])):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            err = max(err, float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(a))), 1e-30))
    arrays = l2._step.binding.arrays
    # the IR's sharding of the allocated array (a packed pair of states drops the state axis)
    traces = {a.id: {"ir": [None if s is None else s for s in (a.stored_sharding or ())],
                     "placed": spec(t.value), "bytes": int(t.value.nbytes),
                     "device_bytes": per_device_bytes(t.value)}
              for a, t in zip(arrays, l2._traces)}
    hidden = {k: spec(st.value) for k, st in
              (("/".join(map(str, p)), s) for p, s in net2.states(brainstate.HiddenState).items())}
    weights = {"/".join(map(str, p)): [spec(l) for l in jax.tree.leaves(s.value)]
               for p, s in net2.states(brainstate.ParamState).items()}
    nse = {o.name: l2.graph.op_object(o.name).nse for o in l2.graph.ops if o.kind == "sparse"}
    return {"name": name, "algo": algo, "mesh": list(names), "how": how, "err": err, "nse": nse,
            "traces": traces, "hidden": hidden, "weights": weights, "ir": l2.ir()}


def windows():
    """online_gradients(chunk=3) and a multi-step window on a data-parallel mesh."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    out = {}
    for how in ("chunk", "multi-step", "train"):
        res = []
        for m in (None, mesh):
            net, x0 = build("lif")
            rng = np.random.RandomState(0)
            xs = jnp.asarray(rng.randn(T, *np.shape(x0)), jnp.float32)
            ys = jnp.asarray(rng.randn(T, B, N), jnp.float32)
            if how == "train":      # train_online, an SGD update after every step: the weights
                import braintools
                lr = learner(net, "param", mesh=m).compile_graph(x0)
                params = net.states(brainstate.ParamState)
                opt = braintools.optim.SGD(lr=0.1)
                opt.register_trainable_weights(params)
                brainscale.train_online(lr, opt, xs, ys, loss)
                g = {k: p.value for k, p in params.items()}
            elif how == "chunk":
                lr = learner(net, "io", mesh=m).compile_graph(x0)
                g, _ = brainscale.online_gradients(lr, xs, ys, loss, chunk=3)
            else:
                lr = learner(net, "param", mesh=m, vjp_method="multi-step").compile_graph(x0)
                params = net.states(brainstate.ParamState)
                g = brainstate.transform.grad(lambda: jnp.sum(jax.vmap(loss)(
                    lr(brainscale.MultiStepData(xs)), ys)), params)()
            res.append((g, [spec(t.value) for t in lr._traces] if m is not None else None))
        (g1, _), (g2, specs) = res
        err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) /
                  max(float(np.max(np.abs(np.asarray(a)))), 1e-30)
                  for k in g1 for a, b in zip(jax.tree.leaves(g1[k]), jax.tree.leaves(g2[k])))
        out[how] = {"err": err, "specs": specs}
    return {"windows": out}


def memory():
    """XLA's memory analysis of one compiled step, one device vs data-parallel on four."""
    out = {}
    for devices in (1, 4):
        net = models.LIFDeltaNet(16, 64, batch=8)
        x0 = jnp.ones((8, 16), jnp.float32)
        mesh = Mesh(np.array(jax.devices()[:devices]), ("data",)) if devices > 1 else None
        lr = learner(net, "param", mesh=mesh).compile_graph(x0)
        b = lr._step.binding
        theta_t, theta_p, hidden, others = b.gather(lr._bound_states())
        args = b.place_args((x0,), mesh) if mesh is not None else (x0,)
        traces = tuple(t.value for t in lr._traces)
        mem = jax.jit(lr._step.fn).lower(theta_t, theta_p, args, hidden, others,
                                         traces).compile().memory_analysis()
        out[devices] = {"argument": int(mem.argument_size_in_bytes),
                        "output": int(mem.output_size_in_bytes),
                        "temp": int(mem.temp_size_in_bytes),
                        "traces": sum(int(t.value.addressable_shards[0].data.nbytes)
                                      for t in lr._traces)}
    return {"memory": out}


def main():
    assert len(jax.devices()) >= 4, jax.devices()
    print(json.dumps(memory()), flush=True)
    print(json.dumps(windows()), flush=True)
    cases = []
    for name in ("lif", "alif", "gru", "sparse"):
        for algo in ("param", "io"):
            cases.append((name, algo, (4,), ("data",), "online"))
            cases.append((name, algo, (2, 2), ("data", "model"), "compile"))
    for args in cases:
        print(json.dumps(case(*args)), flush=True)
    # the rule zoo's arrays (m, eps_bar, u_h, u_p), data parallel, stepped per call
    for name, algo in (("lif", "rtrl"), ("alif", "eprop_k"), ("alif", "uoro")):
        print(json.dumps(dict(case(name, algo, (4,), ("data",), "compile"), zoo=True)),
              flush=True)


if __name__ == "__main__":
    main()
