#!/usr/bin/env python
"""One benchmark configuration, in a fresh process, in whichever environment runs it.

Usage: ``python tools/bench_ext/worker.py CONFIG.json`` (written by ``tools/bench.py`` or
``tools/bench_external.py``). The same file runs in this project's environment
(``lib='ours'``) and, as a subprocess, in the external virtual environments
(``lib='brainscale010'`` with the published brainscale 0.1.0, ``lib='braintrace'`` with
braintrace 0.2.x). It only needs brainstate, braintools, jax, numpy and the library being
measured; the model code comes from ``tools/bench_models.py``.

Config keys: ``lib, model, algo ('bptt'|'io'|'param'|'hybrid', and for ours 'io_chunk' /
'param_chunk': ES-D-RTRL / D-RTRL summed with ``online_gradients(chunk=...)``, 'io_native':
ES-D-RTRL with ``backend='native'`` (the per-step gradient added in place), 'param_native':
D-RTRL with ``backend='native'`` (one kernel pass per step; 'param_native_bf16' with the
traces stored in bfloat16), 'param_native_chunk' the same
learner with ``chunk``; the rules of ``brainscale.zoo``:
``ZOO_ALGOS``, several also in braintrace), chunk (default 16), N, B, T, layers,
seed, decay, repeats, run`` (execute, or only compile for the memory analysis), ``mem_T`` (more
sequence lengths for the XLA memory analysis, compile only), ``bandwidth`` (also measure the
copy bandwidth), ``build_warm`` (time ``compile_graph`` cold and warm), ``data`` (optional
.npz with ``w:*`` weights, ``h:*`` initial hidden values, ``xs``, ``ys``), ``grads_out``
(optional .npz for the gradients), ``profile_out`` (optional JSON: the time of every XLA
operation of one profiled call, from ``jax.profiler``'s Perfetto trace), ``out`` (result JSON). ``{"bandwidth_only": true}`` only
measures the bandwidth; ``{"fidelity": true, ...}`` runs :func:`fidelity`.

Measured:
* ``build_s``: the library's graph compilation before XLA (``compile_graph``);
* ``trace_s``: tracing the whole T-step gradient function to a jaxpr;
* ``xla_s``: ``jax.jit(pure).lower(...).compile()``;
* ``memory``: ``compiled.memory_analysis()`` (temp/argument/output/... bytes);
* ``times_s``: wall time of each repeat of the compiled function (after one warm-up call),
  ``ms_per_step`` = median / T;
* ``rss_peak_mb`` (``ru_maxrss`` of this process) and, on GPU, the device's peak bytes;
* ``trace_elems``: elements in the eligibility-trace states (what D-RTRL reads and writes
  every step), and with ``bandwidth``, the machine's copy bandwidth measured here.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.dirname(HERE)
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

warnings.filterwarnings("ignore")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _shim_brainscale010():
    """brainscale 0.1.0 calls two names that current jax removed (anchor-pitfalls item 9).

    ``jax.tree_leaves`` -> ``jax.tree.leaves``; ``jax.core.get_aval`` -> ``jax.typeof`` (its
    result still has ``at_least_vspace`` on jax 0.10). Nothing else of the package is touched.
    """
    import jax
    import jax.core
    if not hasattr(jax, "tree_leaves"):
        jax.tree_leaves = jax.tree.leaves
    if not hasattr(jax.core, "get_aval"):
        jax.core.get_aval = jax.typeof


def _versions(lib):
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for p in ("jax", "jaxlib", "brainstate", "braintools", "brainunit", "numpy"):
        try:
            out[p] = md.version(p)
        except Exception:  # noqa: BLE001
            pass
    pkg = {"ours": "brainscale", "brainscale010": "brainscale", "braintrace": "braintrace"}[lib]
    try:
        out[pkg] = md.version(pkg)
    except Exception:  # noqa: BLE001
        out[pkg] = "?"
    return out


def _device():
    import jax
    d = jax.devices()[0]
    return {"platform": d.platform, "kind": getattr(d, "device_kind", ""),
            "count": jax.device_count()}


def copy_bandwidth(n_bytes: int = 256 * 2 ** 20, repeats: int = 7, loop: int = 10) -> dict:
    """The machine's copy bandwidth on ``n_bytes`` of float32, two ways.

    * ``oneshot``: a jitted ``x * 1.0`` (a fresh output buffer each call, so it includes
      first-touch page faults of the new allocation);
    * ``loop`` (the one used as D-RTRL's bound): ``lax.fori_loop`` of ``loop`` iterations of
      ``x = x * s`` in one jitted call, buffers reused -- the steady state of a scan that
      reads and rewrites a trace every step.

    ``ns_per_elem_rw`` is the time to read and write one float32 element once.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    n = n_bytes // 4
    x = jnp.ones((n,), jnp.float32)
    s = jnp.float32(1.0)
    one = jax.jit(lambda a: a * 1.0)
    many = jax.jit(lambda a, s: jax.lax.fori_loop(0, loop, lambda i, y: y * s, a))
    one(x).block_until_ready()
    many(x, s).block_until_ready()
    out = {"bytes": n * 4}
    for name, fn, k in (("oneshot", lambda: one(x), 1), ("loop", lambda: many(x, s), loop)):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn().block_until_ready()
            ts.append(time.perf_counter() - t0)
        t = float(np.median(ts)) / k
        out[name] = {"copy_s": t, "rw_GBps": 2 * n * 4 / t / 1e9, "ns_per_elem_rw": t / n * 1e9}
    out["rw_GBps"] = out["loop"]["rw_GBps"]
    out["ns_per_elem_rw"] = out["loop"]["ns_per_elem_rw"]
    del x
    return out


#: rows that time a plain brainstate computation (no online learner): BPTT, the forward
#: step alone, and the floor (forward + one instantaneous VJP per step, no traces)
NO_LEARNER = ("bptt", "fwd", "floor")

#: the rules of brainscale.zoo the worker runs (ours), and braintrace's same rule
ZOO_ALGOS = ("rtrl", "snap1", "snap2", "uoro", "eprop", "eprop_rf", "eprop_k", "eprop_kz",
             "ostl", "ostl_ff", "ostl_ffc", "ostl_ffd", "ostl_bt", "ostl_cpl", "three_factor",
             "dni", "dni_tr")
#: ``ostl_bt``: ``OSTLRecurrent(recurrence_scope='diagonal')``, the D-RTRL trace; ``ostl``
#: (the paper's full recurrent term) has no braintrace counterpart
#: ``eprop_k``: κ = 0.9 on each state's trace (braintrace's EProp); ``eprop_kz``: the paper's
#: filter at the neuron's output (ours only); ``ostl_cpl``: OSTLRecurrent with braintrace's
#: coupled recurrence scope (our scope=block), braintrace's OSTLRecurrent beside it
BRAINTRACE_ZOO = {"snap2": "SnAp", "eprop": "EProp", "eprop_rf": "EProp", "eprop_k": "EProp",
                  "ostl_bt": "OSTLRecurrent", "ostl_cpl": "OSTLRecurrent",
                  "ostl_ff": "OSTLFeedforward", "uoro": "UORO",
                  "three_factor": "ThreeFactor", "dni": "DNI"}


def _zoo_learner(algo, net):
    from brainscale import zoo
    if algo == "rtrl":
        return zoo.RTRLAlgorithm(net)
    if algo in ("snap1", "snap2"):
        return zoo.SnApAlgorithm(net, n=int(algo[-1]))
    if algo == "uoro":
        return zoo.UOROAlgorithm(net, seed=0)
    if algo == "eprop":
        return zoo.EPropAlgorithm(net)
    if algo == "eprop_rf":
        return zoo.EPropAlgorithm(net, feedback="random")
    if algo == "eprop_k":
        return zoo.EPropAlgorithm(net, kappa=0.9, kappa_at="state")
    if algo == "eprop_kz":
        return zoo.EPropAlgorithm(net, kappa=0.9, kappa_at="output")
    if algo == "ostl":
        return zoo.OSTLAlgorithm(net, recurrent=True)
    if algo in ("ostl_ff", "ostl_ffc"):   # braintrace's form (its α = 1e-6 -> 0); ffc: chunk=16
        return zoo.OSTLFeedforward(net)
    if algo == "ostl_ffd":            # each neuron's dynamics kept (ours only)
        return zoo.OSTLFeedforward(net, keep_dynamics=True)
    if algo == "ostl_bt":             # the D-RTRL trace (the alias's default until 2026-12-06)
        return zoo.OSTLRecurrent(net, recurrence_scope="diagonal")
    if algo == "ostl_cpl":            # braintrace's form, the alias's default
        return zoo.OSTLRecurrent(net, recurrence_scope="coupled")
    if algo == "three_factor":
        return zoo.ThreeFactorAlgorithm(net, modulator=1.0)
    if algo == "dni":                 # readout=step (the last step exact), the default
        return zoo.DNIAlgorithm(net)
    if algo == "dni_tr":              # readout=trace: (δ + ĝ) · ε^t
        return zoo.DNIAlgorithm(net, readout="trace")
    raise ValueError(algo)


def _learner(lib, algo, net, decay, x0):
    import brainstate
    if lib == "ours" and algo in ZOO_ALGOS:
        lr = _zoo_learner(algo, net)
    elif lib == "ours":
        import brainscale as L
        if algo in ("io", "io_chunk"):
            lr = L.DiagIODimAlgorithm(net, decay_or_rank=decay)
        elif algo == "io_native":       # the per-step gradient on the native outer-accumulate
            lr = L.DiagIODimAlgorithm(net, decay_or_rank=decay, backend="native")
        elif algo in ("param", "param_chunk"):
            lr = L.DiagParamDimAlgorithm(net)
        elif algo in ("param_native", "param_native_chunk"):   # the native CPU kernel
            lr = L.DiagParamDimAlgorithm(net, backend="native")
        elif algo == "param_native_bf16":     # the same, traces stored in bfloat16
            from brainscale.backends.native import NativeBackend
            lr = L.DiagParamDimAlgorithm(net, backend=NativeBackend(trace_dtype="bfloat16"))
        elif algo == "hybrid":
            lr = L.DiagHybridDimAlgorithm(net, decay_or_rank=decay)
        else:
            raise ValueError(algo)
    elif lib == "brainscale010":
        import brainscale as L
        if not str(getattr(L, "__version__", "")).startswith("0.1."):
            raise RuntimeError(f"expected the published brainscale 0.1.x, imported "
                               f"{getattr(L, '__version__', '?')} from {L.__file__}")
        mode = brainstate.mixin.Batching()
        if algo == "io":
            lr = L.IODimVjpAlgorithm(net, decay_or_rank=decay, mode=mode)
        elif algo == "param":
            lr = L.ParamDimVjpAlgorithm(net, mode=mode)
        elif algo == "hybrid":
            lr = L.HybridDimVjpAlgorithm(net, decay_or_rank=decay, mode=mode)
        else:
            raise ValueError(algo)
    elif lib == "braintrace":
        import braintrace as L
        if algo == "io":
            lr = L.pp_prop(net, decay_or_rank=decay)
        elif algo == "param":
            lr = L.D_RTRL(net)
        elif algo == "snap2":
            lr = L.SnAp(net, n=2)
        elif algo == "eprop":
            lr = L.EProp(net)
        elif algo == "eprop_rf":
            lr = L.EProp(net, feedback="random",
                         random_feedback_key=brainstate.random.split_key())
        elif algo == "eprop_k":
            lr = L.EProp(net, kappa_filter_decay=0.9)
        elif algo in ("ostl_bt", "ostl_cpl"):
            lr = L.OSTLRecurrent(net)
        elif algo == "ostl_ff":
            lr = L.OSTLFeedforward(net)
        elif algo == "uoro":          # one step per call, as ours (its default is a window)
            lr = L.UORO(net, projection_key=0, vjp_method="single-step")
        elif algo == "three_factor":
            lr = L.ThreeFactor(net, modulator=1.0)
        elif algo == "dni":
            # multi-step only (its vjp_method must be 'multi-step'); fed one plain step per
            # call (no MultiStepData): a one-step window, the closest to ours (per step).
            # Its synthetic cotangent reaches plain (non-trace) parameters only; its trace
            # parameters get its multi-step D_RTRL gradient. The synthesiser needs the
            # compiled graph's group shapes: attached below.
            lr = L.DNI(net)
        else:
            raise ValueError(f"braintrace has no {algo!r} algorithm")
    else:
        raise ValueError(lib)
    t0 = time.perf_counter()
    lr.compile_graph(x0)
    if lib == "braintrace" and algo == "dni":
        # its default synthesiser (scale=0.0: zero weight and bias), so the injected exit
        # cotangent is zero, as ours with its zero-initialised synthetic-gradient module
        lr.attach_synthesizer(L.SyntheticGradient(lr.group_signal_shapes()))
    return lr, time.perf_counter() - t0


def _trace_states(lib, learner, net):
    import numpy as np
    if lib == "ours":
        sts = list(learner._traces)
    else:
        mine = {id(s) for s in net.states().values()}
        synth = getattr(learner, "synthesizer", None)     # braintrace DNI: not a trace
        if synth is not None:
            mine |= {id(s) for s in synth.states().values()}
        sts = [s for s in learner.states().values() if id(s) not in mine]
    import jax
    elems = 0
    shapes = []
    for s in sts:
        for leaf in jax.tree.leaves(s.value):
            dt = np.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype
            if jax.dtypes.issubdtype(dt, jax.dtypes.prng_key):    # a random key, not a trace
                continue
            if jax.dtypes.issubdtype(dt, np.floating):
                elems += int(np.prod(np.shape(leaf)))
                shapes.append(list(np.shape(leaf)))
            elif jax.dtypes.issubdtype(dt, np.complexfloating):   # a packed pair of states
                elems += 2 * int(np.prod(np.shape(leaf)))
                shapes.append(list(np.shape(leaf)) + [2])
    return elems, shapes


def _memory(compiled) -> dict:
    mem = {}
    try:
        ma = compiled.memory_analysis()
        for a in dir(ma):
            if a.endswith("_in_bytes"):
                mem[a.replace("_size_in_bytes", "").replace("_in_bytes", "")] = int(getattr(ma, a))
    except Exception as e:  # noqa: BLE001
        mem["error"] = repr(e)
    return mem


def _flat_grads(g) -> dict:
    """``{'<attr>.<key>': np.ndarray}`` from a grads dict keyed by state paths."""
    import numpy as np
    out = {}
    for k, v in dict(g).items():
        attr = k[-1] if isinstance(k, tuple) else str(k).split(".")[-1]
        for key, leaf in dict(v).items():
            out[f"{attr}.{key}"] = np.asarray(leaf)
    return out


def run(cfg: dict) -> dict:
    res = {"config": cfg, "ok": False}
    lib = cfg["lib"]
    if lib == "brainscale010":
        _shim_brainscale010()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import brainstate
    import bench_models as bm
    res["versions"] = _versions(lib)
    res["device"] = _device()
    res["rss_after_import_mb"] = _rss_mb()

    model, N, B, T = cfg["model"], int(cfg["N"]), int(cfg["B"]), int(cfg["T"])
    layers, seed = int(cfg.get("layers", 1)), int(cfg.get("seed", 0))
    algo, decay = cfg["algo"], float(cfg.get("decay", 0.99))
    do_run = bool(cfg.get("run", True))
    if cfg.get("data"):
        d = np.load(cfg["data"])
        w = {k[2:]: d[k] for k in d.files if k.startswith("w:")}
        h = {k[2:]: d[k] for k in d.files if k.startswith("h:")}
        xs_np, ys_np = d["xs"], d["ys"]
        T = xs_np.shape[0]
    else:
        w = bm.make_weights(model, N, seed, layers)
        h = bm.make_hidden(model, N, B, seed, layers)
        xs_np = ys_np = None
        if do_run or cfg.get("grads_out"):
            xs_np, ys_np = bm.make_inputs(model, T, B, seed)

    net = bm.build(lib, model, w, h, layers)
    params = net.states(brainstate.ParamState)
    x0 = jnp.zeros((B, bm.N_IN), jnp.float32)
    if algo in NO_LEARNER:
        learner, build_s = None, 0.0
    else:
        if cfg.get("build_warm"):
            # a first compile_graph on an identical throw-away net: the cold number includes
            # the process's first JAX tracing; the second one is the steady-state cost
            net_w = bm.build(lib, model, w, h, layers)
            _, res["build_cold_s"] = _learner(lib, algo, net_w, decay, x0)
            del net_w
        learner, build_s = _learner(lib, algo, net, decay, x0)
        res["trace_elems"], res["trace_shapes"] = _trace_states(lib, learner, net)
    res["build_s"] = build_s
    loss_fn = bm.loss_fn

    def per_step_sum(step):
        """``(xs, ys) -> (Σ_t ∂loss(step(x_t), y_t)/∂θ, Σ_t loss)``: the gradient of each
        step's loss alone (whatever ``step`` does with it: the plain model holds its hidden
        states constant, an online learner adds its traces), summed in a scan."""
        def fn(xs, ys):
            zero = {k: jax.tree.map(jnp.zeros_like, p.value) for k, p in params.items()}

            def body(acc, xy):
                x, y = xy
                g, l = brainstate.transform.grad(lambda: loss_fn(step(x), y), params,
                                                 return_value=True)()
                return {k: jax.tree.map(jnp.add, acc[k], g[k]) for k in acc}, l
            g, ls = brainstate.transform.scan(body, zero, (xs, ys))
            return g, ls.sum()
        return fn

    if algo == "fwd":
        # the forward step alone: what every rule pays before any learning
        def fn(xs, ys):
            ls = brainstate.transform.for_loop(lambda x, y: loss_fn(net(x), y), xs, ys)
            return {}, ls.sum()
    elif algo == "floor":
        # the per-step floor of any online rule: the forward step plus one instantaneous VJP
        # (the gradient of this step's loss w.r.t. the weights, hidden states held constant),
        # accumulated over the sequence; no traces
        fn = per_step_sum(net)
    elif algo == "bptt":
        def fn(xs, ys):
            def total():
                ls = brainstate.transform.for_loop(lambda x, y: loss_fn(net(x), y), xs, ys)
                return ls.sum()
            g, l = brainstate.transform.grad(total, params, return_value=True)()
            return g, l
    elif lib == "ours":
        import brainscale

        # io_chunk / param_chunk: ES-D-RTRL / D-RTRL summed over windows of `chunk` steps
        chunk = int(cfg.get("chunk", 16)) if algo in ("io_chunk", "param_chunk",
                                                       "param_native_chunk", "ostl_ffc") else 1

        def fn(xs, ys):
            g, ls = brainscale.online_gradients(learner, xs, ys, loss_fn, params=params,
                                                jit=False, chunk=chunk)
            return g, ls.sum()
    else:
        fn = per_step_sum(learner)

    if xs_np is not None:
        xs, ys = jnp.asarray(xs_np), jnp.asarray(ys_np)
    else:
        xs = jax.ShapeDtypeStruct((T, B, bm.N_IN), jnp.float32)
        ys = jax.ShapeDtypeStruct((T, B, bm.N_OUT), jnp.float32)

    sf = brainstate.transform.StatefulFunction(fn)
    t0 = time.perf_counter()
    sf.make_jaxpr(xs, ys)
    res["trace_s"] = time.perf_counter() - t0
    states = sf.get_states(xs, ys)
    vals = [s.value for s in states]

    def pure(vals, xs, ys):
        return sf.jaxpr_call(vals, xs, ys)

    t0 = time.perf_counter()
    opts = None
    if lib == "ours" and algo != "bptt":
        # what online_gradients compiles its loop with (jit=True); the floor and forward rows
        # with the same options, so that online / floor compares like with like
        from brainscale.backends.online_driver import driver_compiler_options
        # the floor and forward rows run the bench models' dense layers on B rows
        opts = (driver_compiler_options(rows=B) if algo in NO_LEARNER
                else driver_compiler_options(learner.graph))
    compiled = jax.jit(pure, compiler_options=opts).lower(vals, xs, ys).compile()
    res["xla_s"] = time.perf_counter() - t0
    if cfg.get("hlo_out"):      # the optimised HLO, for a per-op breakdown
        with open(cfg["hlo_out"], "w") as fh:
            fh.write(compiled.as_text())
    res["memory"] = _memory(compiled)
    res["memory_by_T"] = {str(T): res["memory"]}
    res["rss_after_compile_mb"] = _rss_mb()

    if do_run:
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(vals, xs, ys))
        res["first_call_s"] = time.perf_counter() - t0
        ts = []
        for _ in range(int(cfg.get("repeats", 3))):
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(vals, xs, ys))
            ts.append(time.perf_counter() - t0)
        res["times_s"] = ts
        if ts:
            res["ms_per_step"] = float(np.median(ts)) / T * 1e3
            res["ms_per_step_min"] = float(np.min(ts)) / T * 1e3
        else:   # repeats = 0: gradients only; the first call includes XLA's first run
            res["ms_per_step"] = None
        res["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        _, (g, lsum) = out
        res["loss_sum"] = float(lsum)
        fg = _flat_grads(g)
        res["grad_finite"] = bool(all(np.all(np.isfinite(v)) for v in fg.values()))
        if cfg.get("grads_out"):
            np.savez(cfg["grads_out"], **fg)
        if cfg.get("profile_out"):
            res["profile"] = _profile(compiled, (vals, xs, ys), T, cfg["profile_out"])
        del out
    res["rss_peak_mb"] = _rss_mb()
    # XLA memory analysis at other sequence lengths (compile only, after the RSS reading)
    for T2 in cfg.get("mem_T", ()):
        if int(T2) == T:
            continue
        a2 = (jax.ShapeDtypeStruct((int(T2), B, bm.N_IN), jnp.float32),
              jax.ShapeDtypeStruct((int(T2), B, bm.N_OUT), jnp.float32))
        try:
            c2 = jax.jit(pure, compiler_options=opts).lower(vals, *a2).compile()
            res["memory_by_T"][str(int(T2))] = _memory(c2)
            del c2
        except Exception as e:  # noqa: BLE001
            res["memory_by_T"][str(int(T2))] = {"error": repr(e)[:300]}
    try:
        st = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in st:
            res["device_peak_mb"] = st["peak_bytes_in_use"] / 2 ** 20
    except Exception:  # noqa: BLE001
        pass
    if cfg.get("bandwidth"):
        gpu = res["device"]["platform"] != "cpu"
        res["bandwidth"] = copy_bandwidth((1024 if gpu else 256) * 2 ** 20)
    res["ok"] = True
    return res


def fidelity(cfg: dict) -> dict:
    """Online gradients against BPTT for one (model, N) over several windows, one process.

    For each window W: BPTT of ``Σ_{t<W} L^t`` and, for every algorithm (and decay), the sum
    of the per-step online gradients over the same W steps, from the same initial state.
    Returns per-parameter cosine / relative error / norm ratio.
    """
    lib = cfg.get("lib", "ours")
    if lib == "brainscale010":
        _shim_brainscale010()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import brainstate
    import bench_models as bm
    model, N, B = cfg["model"], int(cfg["N"]), int(cfg["B"])
    seed, layers = int(cfg.get("seed", 0)), int(cfg.get("layers", 1))
    w = bm.make_weights(model, N, seed, layers)
    h = bm.make_hidden(model, N, B, seed, layers)
    windows = [int(x) for x in cfg["windows"]]
    xs_all, ys_all = bm.make_inputs(model, max(windows), B, seed)
    x0 = jnp.zeros((B, bm.N_IN), jnp.float32)
    out = {"config": cfg, "ok": True, "versions": _versions(lib), "rows": []}

    def bptt(W):
        net = bm.build(lib, model, w, h, layers)
        params = net.states(brainstate.ParamState)

        @brainstate.transform.jit
        def f(xs, ys):
            def total():
                return brainstate.transform.for_loop(
                    lambda x, y: bm.loss_fn(net(x), y), xs, ys).sum()
            return brainstate.transform.grad(total, params)()
        return _flat_grads(f(jnp.asarray(xs_all[:W]), jnp.asarray(ys_all[:W])))

    def online(algo, decay, W):
        net = bm.build(lib, model, w, h, layers)
        params = net.states(brainstate.ParamState)
        lr, _ = _learner(lib, algo, net, decay, x0)

        @brainstate.transform.jit
        def f(xs, ys):
            zero = {k: jax.tree.map(jnp.zeros_like, p.value) for k, p in params.items()}

            def body(acc, xy):
                g = brainstate.transform.grad(lambda: bm.loss_fn(lr(xy[0]), xy[1]), params)()
                return {k: jax.tree.map(jnp.add, acc[k], g[k]) for k in acc}, None
            return brainstate.transform.scan(body, zero, (xs, ys))[0]
        return _flat_grads(f(jnp.asarray(xs_all[:W]), jnp.asarray(ys_all[:W])))

    for W in windows:
        ref = bptt(W)
        for algo in cfg["algos"]:
            decays = list(cfg["decays"]) if algo in ("io", "hybrid") else [None]
            for d in decays:
                row = {"model": model, "N": N, "B": B, "W": W, "algo": algo, "decay": d}
                try:
                    g = online(algo, d if d is not None else 0.99, W)
                    m = {}
                    for k in ref:
                        x = np.asarray(g[k], np.float64).ravel()
                        y = np.asarray(ref[k], np.float64).ravel()
                        nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
                        m[k] = {"cos": float(x @ y / (nx * ny)) if nx > 0 and ny > 0 else
                                (1.0 if nx == ny else 0.0),
                                "rel": float(np.linalg.norm(x - y) / ny) if ny > 0 else nx,
                                "norm_ratio": nx / ny if ny > 0 else None}
                    row["metrics"] = m
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                out["rows"].append(row)
    return out


def _profile(compiled, args, T: int, out_path: str) -> str:
    """Run ``compiled`` once under ``jax.profiler.trace`` and write the time of every XLA
    operation (thunk) to ``out_path`` (JSON: name -> [total µs, count], per call of T
    steps), from the profiler's Perfetto trace. Returns ``out_path``."""
    import glob
    import gzip
    import tempfile
    import jax
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(compiled(*args))
        (path,) = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as fh:
            data = json.load(fh)
    events = data["traceEvents"] if isinstance(data, dict) else data
    ops: dict = {}
    for e in events:
        name = e.get("name", "")
        # host-side Python and runtime frames are not XLA operations
        if e.get("ph") != "X" or name.startswith(("$", "end: ")) or "::" in name \
                or name.startswith(("PjitFunction", "ThreadpoolListener", "ParseArguments",
                                    "Handle ", "Wait for", "AllocateOutputBuffers",
                                    "PythonRefManager")):
            continue
        t = ops.setdefault(name, [0.0, 0])
        t[0] += float(e.get("dur", 0.0))
        t[1] += 1
    with open(out_path, "w") as fh:
        json.dump(dict(T=T, ops=ops), fh, indent=0)
    return out_path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        cfg = json.load(f)
    try:
        if cfg.get("fidelity"):
            res = fidelity(cfg)
        elif cfg.get("bandwidth_only"):
            res = {"config": cfg, "ok": True, "device": _device(),
                   "bandwidth": copy_bandwidth(int(cfg.get("bytes", 256 * 2 ** 20)))}
        else:
            res = run(cfg)
    except Exception as e:  # noqa: BLE001
        res = {"config": cfg, "ok": False, "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()[-4000:], "rss_peak_mb": _rss_mb()}
    with open(cfg["out"], "w") as f:
        json.dump(res, f, indent=1)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
