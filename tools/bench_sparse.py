#!/usr/bin/env python
"""Whole-brain-scale sparse networks: online learning on a generated connectome.

A connectome-like network is generated (``numpy``, seeded): ``N`` neurons in ``regions``
blocks, about ``syn_per_neuron`` outgoing synapses each, a fraction ``p_local`` inside the
neuron's own region and the rest to random other regions (block-random, as in a fly brain's
dense local and sparse long-range wiring), stored as one ``brainevent.CSR`` (N × N). Every
neuron is a LIF neuron with an exponential current synapse::

    z   = spike(V - 1)                               (surrogate gradient)
    I   = e^{-dt/τs} I + M(w) · z                    (SpMatMulOp: w is the CSR data vector)
    V   = e^{-dt/τm} (V - z) + (1 - e^{-dt/τm}) (I + u)

A *teacher* with other weights produces a target: the membrane potentials of ``n_read``
neurons driven by the same input ``u``. The student learns its synaptic weights online
(per-step gradients of ``mean((V[read] - target)²)``, Adam) with ES-D-RTRL or D-RTRL, from
the teacher's initial state; the fit is the loss of the last 50 steps against the same run
with the weights frozen.

Measured, per (N, synapses): seconds per step of the forward pass alone (a jitted scan of the
model), of ES-D-RTRL and of D-RTRL (``brainscale.online_gradients``); XLA's memory analysis
(temp bytes: the inputs are arguments) of the whole T-step computation at two sequence lengths
(flat in T for the online rules); the trace bytes; the fit. With ``--devices D`` the same runs on D virtual CPU devices with the
neurons split over a mesh axis (a subprocess sets the XLA flag), reporting per-device bytes.

Examples::

    python tools/bench_sparse.py --N 10000,30000,100000 --syn 100 --out benchmarks/results/cpu/sparse
    python tools/bench_sparse.py --N 100000 --syn 100 --devices 4 --out benchmarks/results/cpu/sparse-mesh
    python tools/bench_sparse.py --preset flywire --out benchmarks/results/gpu-h100/sparse  # GPU

``--preset flywire`` is the FlyWire-scale configuration (139,255 neurons, 55 M synapses,
T = 1000); it runs unchanged on an H100/H200 (jax picks the GPU) and is too large for the
CPU runner's time budget.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PRESETS = {"flywire": {"N": [139255], "syn": 395, "T": 1000, "read": 2000}}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", default="10000,30000,100000")
    p.add_argument("--syn", type=int, default=100, help="synapses per neuron")
    p.add_argument("--regions", type=int, default=50)
    p.add_argument("--p-local", type=float, default=0.8)
    p.add_argument("--T", type=int, default=100, help="steps of the timed run")
    p.add_argument("--mem-T", default="100,1000")
    p.add_argument("--read", type=int, default=1000, help="neurons in the target")
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--algos", default="forward,io,param")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.preset:
        for k, v in PRESETS[a.preset].items():
            setattr(a, k, v)
    if isinstance(a.N, str):
        a.N = [int(x) for x in a.N.split(",")]
    a.mem_T = [int(x) for x in str(a.mem_T).split(",")]
    a.algos = a.algos.split(",")
    return a


# ------------------------------------------------------------------------------- the model
def connectome(N, syn, regions, p_local, seed):
    """CSR arrays (indptr, indices) of a block-random N × N connectome (rows: presynaptic)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    region = np.arange(N) * regions // N
    starts = np.searchsorted(region, np.arange(regions))
    sizes = np.diff(np.append(starts, N))
    n_local = rng.binomial(syn, p_local, size=N)
    rows, cols = [], []
    for r in range(regions):
        pre = np.nonzero(region == r)[0]
        k_loc = n_local[pre]
        rows.append(np.repeat(pre, k_loc))
        cols.append(starts[r] + rng.integers(0, sizes[r], size=int(k_loc.sum())))
        k_far = syn - k_loc
        rows.append(np.repeat(pre, k_far))
        cols.append(rng.integers(0, N, size=int(k_far.sum())))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    key = rows.astype(np.int64) * N + cols
    key = np.unique(key)                         # no duplicate synapse
    key = key[:len(key) - len(key) % 8]          # the synapse axis splits over up to 8 devices
    rows, cols = (key // N).astype(np.int32), (key % N).astype(np.int32)
    indptr = np.zeros(N + 1, np.int32)
    np.add.at(indptr, rows + 1, 1)
    return np.cumsum(indptr).astype(np.int32), cols


def build(N, indptr, indices, seed, scale=1.0, seed_v=0):
    import brainevent
    import brainstate
    import braintools
    import jax.numpy as jnp
    import numpy as np

    import brainscale
    rng = np.random.default_rng(seed)
    v0 = np.random.default_rng(seed_v).random(N) * 0.5
    nse = len(indices)
    fan_in = max(nse / N, 1.0)
    data = (rng.standard_normal(nse) * scale * 2.0 / np.sqrt(fan_in)).astype(np.float32)
    csr = brainevent.CSR((jnp.asarray(data), jnp.asarray(indices), jnp.asarray(indptr)),
                         shape=(N, N))

    class Connectome(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.syn = brainscale.ETraceParam({"weight": jnp.asarray(data)},
                                              brainscale.SpMatMulOp(csr))
            self.V = brainscale.ETraceState(jnp.asarray(v0, jnp.float32))
            self.I = brainscale.ETraceState(jnp.zeros(N, jnp.float32))
            self.spk = braintools.surrogate.Sigmoid(alpha=4.0)
            self.am, self.as_ = float(np.exp(-1 / 10.0)), float(np.exp(-1 / 5.0))

        def update(self, u):
            z = self.spk(self.V.value - 1.0)
            self.I.value = self.as_ * self.I.value + self.syn.execute(z)
            self.V.value = self.am * (self.V.value - z) + (1 - self.am) * (self.I.value + u)
            return self.V.value

    return Connectome()


# ------------------------------------------------------------------------------- measuring
def memory(fn, *args):
    import jax
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    return {"temp": int(m.temp_size_in_bytes), "argument": int(m.argument_size_in_bytes),
            "output": int(m.output_size_in_bytes)}


def timed(fn, *args, reps=3):
    import jax
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return min(ts)


def run_one(a, N):
    import brainstate
    import jax
    import jax.numpy as jnp
    import numpy as np

    import brainscale
    devices = len(jax.devices())
    mesh = None
    if a.devices > 1:
        from jax.sharding import Mesh
        mesh = Mesh(np.array(jax.devices()[:a.devices]), ("model",))
    t_gen = time.perf_counter()
    indptr, indices = connectome(N, a.syn, a.regions, a.p_local, a.seed)
    t_gen = time.perf_counter() - t_gen
    rng = np.random.default_rng(a.seed + 1)
    T = a.T
    u = jnp.asarray(rng.random((max(T, max(a.mem_T), a.train_steps), N)) * 1.6, jnp.float32)
    read = jnp.asarray(np.sort(rng.choice(N, size=min(a.read, N), replace=False)))
    teacher = build(N, indptr, indices, seed=a.seed + 7, seed_v=a.seed)

    def teacher_run(us):
        def body(c, ut):
            return c, teacher.update(ut)[read]
        return brainstate.transform.scan(body, None, us)[1]
    target = brainstate.transform.jit(teacher_run)(u)
    res = {"N": N, "nse": int(len(indices)), "syn_per_neuron": len(indices) / N, "T": T,
           "devices": devices, "generate_s": t_gen}

    def loss(v, tg):
        return jnp.mean((v[read] - tg) ** 2)

    # forward alone: the model over T steps
    if "forward" in a.algos:
        net = build(N, indptr, indices, seed=a.seed, seed_v=a.seed)

        def fwd(us):
            def body(c, ut):
                return c, loss(net.update(ut), 0.0)
            return brainstate.transform.scan(body, None, us)[1]
        f = brainstate.transform.jit(fwd)
        res["forward_s_per_step"] = timed(f, u[:T]) / T
        res["forward_mem"] = {t: _mem_of(lambda us: fwd(us), u[:t]) for t in a.mem_T}
    for algo in [x for x in a.algos if x in ("io", "param")]:
        net = build(N, indptr, indices, seed=a.seed, seed_v=a.seed)
        learner = (brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.98, mesh=mesh)
                   if algo == "io" else brainscale.DiagParamDimAlgorithm(net, mesh=mesh))
        t0 = time.perf_counter()
        learner.compile_graph(u[0])
        r = {"compile_s": time.perf_counter() - t0,
             "trace_bytes": sum(t.nbytes for t in learner.graph.traces),
             "trace_device_bytes": sum(int(t.value.addressable_shards[0].data.nbytes)
                                       for t in learner._traces)}

        def og(us, tg):
            return brainscale.online_gradients(learner, us, tg, loss, reset=False)
        r["s_per_step"] = timed(og, u[:T], target[:T]) / T
        r["mem"] = {t: _mem_of_online(learner, u[:t], target[:t], loss) for t in a.mem_T}
        r["fit"] = fit(learner, net, u, target, loss, a.train_steps)
        res[algo] = r
    return res


def _mem_of(fn, us):
    import brainstate
    sf = brainstate.transform.StatefulFunction(fn)
    sf.make_jaxpr(us)
    vals = [s.value for s in sf.get_states(us)]

    def pure(v, x):
        return sf.jaxpr_call(v, x)
    return memory(pure, vals, us)


def _mem_of_online(learner, us, tg, loss):
    import brainscale
    return _mem_of(lambda x: brainscale.online_gradients(learner, x, tg, loss, reset=False,
                                                          jit=False)[1], us)


def fit(learner, net, u, target, loss, steps, lr=3e-4):
    """Online learning with Adam on the per-step gradients, from the teacher's initial state:
    the mean loss of the last 50 steps against the same run without learning (lr = 0)."""
    import braintools
    import brainstate
    import numpy as np
    if steps <= 0:
        return None
    params = net.states(brainstate.ParamState)
    w0 = {k: p.value for k, p in params.items()}
    out = {"steps": steps, "lr": lr}
    for name, rate in (("frozen", 0.0), ("learned", lr)):
        for k, p in params.items():
            p.value = w0[k]
        learner.reset_state()
        opt = braintools.optim.Adam(lr=rate)
        opt.register_trainable_weights(params)

        @brainstate.transform.jit
        def step(ut, tg):
            g, l = brainstate.transform.grad(lambda: loss(learner(ut), tg), params,
                                             return_value=True)()
            opt.update(g)
            return l
        ls = np.asarray([float(step(u[t], target[t])) for t in range(steps)])
        out[name] = float(ls[-50:].mean())
        out[name + "_finite"] = bool(np.isfinite(ls).all())
    return out


# ------------------------------------------------------------------------------- report
def _mb(b):
    return f"{b / 2 ** 20:.1f}"


def markdown(rows, meta) -> str:
    head = ["N", "synapses", "dev", "forward ms/step", "ES ms/step (×fwd)", "D-RTRL ms/step (×fwd)",
            f"fwd temp MB T={meta['mem_T'][0]}/{meta['mem_T'][-1]}",
            f"ES temp MB T={meta['mem_T'][0]}/{meta['mem_T'][-1]}",
            f"D-RTRL temp MB T={meta['mem_T'][0]}/{meta['mem_T'][-1]}", "ES trace MB/dev",
            "D-RTRL trace MB/dev", "ES fit: loss frozen → learned"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f = r.get("forward_s_per_step")
        fm = r.get("forward_mem", {})

        def tm(m):
            return "/".join(_mb(m[t]["temp"]) for t in meta["mem_T"] if t in m) if m else "–"

        def per(algo):
            x = r.get(algo)
            if not x:
                return "–"
            s = x["s_per_step"] * 1e3
            return f"{s:.2f} ({x['s_per_step'] / f:.2f}×)" if f else f"{s:.2f}"
        io, pa = r.get("io", {}), r.get("param", {})
        fit_ = io.get("fit") or {}
        out.append("| " + " | ".join([
            str(r["N"]), f"{r['nse'] / 1e6:.1f} M", str(r["devices"]),
            f"{f * 1e3:.2f}" if f else "–", per("io"), per("param"),
            tm({int(k): v for k, v in fm.items()}), tm({int(k): v for k, v in io.get("mem", {}).items()}),
            tm({int(k): v for k, v in pa.get("mem", {}).items()}),
            _mb(io["trace_device_bytes"]) if io else "–",
            _mb(pa["trace_device_bytes"]) if pa else "–",
            f"{fit_['frozen']:.3g} → {fit_['learned']:.3g}" if fit_ else "–"]) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    a = parse(argv)
    if a.devices > 1 and not a.child:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={a.devices}").strip()
        return subprocess.call([sys.executable, __file__, *(argv or sys.argv[1:]), "--child"],
                               env=env)
    sys.path.insert(0, str(ROOT))
    import jax
    rows = []
    for N in a.N:
        t0 = time.perf_counter()
        r = run_one(a, N)
        r["wall_s"] = time.perf_counter() - t0
        rows.append(r)
        print(json.dumps(r), flush=True)
    meta = {"argv": sys.argv[1:], "jax": jax.__version__, "platform": jax.devices()[0].platform,
            "device": str(jax.devices()[0].device_kind), "mem_T": a.mem_T,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    md = markdown(rows, meta)
    print(md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1,
                                                     default=str))
        (out / "results.md").write_text(
            f"`python tools/bench_sparse.py {' '.join(x for x in meta['argv'] if x != '--child')}`"
            f" — {meta['device']} ({meta['platform']}), jax {meta['jax']}, {meta['date']}\n\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
