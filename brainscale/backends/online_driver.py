"""The step-owning online loop, for any emitted step (backend-neutral).

``brainscale.online_gradients(..., chunk=K)`` and the Pallas ``fused_online_gradients``
run a whole ``(T, ...)`` sequence here. The loop owns each step instead of going through
the learner's custom VJP, with the same math and gradients, so per step:

1. the forward computes the neuron-level quantities ``J``, ``df``, ``x`` and updates the
   traces of every rule without a ``one_pass`` method;
2. ``δ^t`` comes from one VJP of the step (the loss's cotangent of the outputs);
3. rules with ``one_pass`` (the Pallas D-RTRL kernel) read ``ε^{t-1}`` once, write ``ε^t``
   and add their gradient into the running sum in the same sweep;
4. io-dim rules with ``step_accumulate`` (the native backend's ES-D-RTRL rule) add each
   plain-matmul relation's rank-B gradient ``ε_xᵀ s`` into the running sum in place.

With ``chunk = K > 1`` the loop runs windows of K steps:

* ES-D-RTRL (io-dim) gradients of plain matmul ops are summed with one (K·B)-row product of
  the K steps of ``ε_x`` and ``s = Σ ε_f∘δ`` instead of K rank-B read-modify-writes of the
  gradient;
* compact D-RTRL traces of plain matmul ops are advanced once per window, and their gradient
  read once per window (:mod:`.drtrl_window`), instead of once per step.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from .drtrl_window import DrtrlWindow
from .rules import IORule, chain_is_one, leaf_index, plain_matmul_error
from .signals import is_float

__all__ = ["drive_online", "build_loop", "grads_by_key", "check_chunk", "driver_error",
           "needs_step_loop", "scan_windows",
           "driver_compiler_options", "options_key", "dense_rows", "YNN_MAX_ROWS",
           "callable_key", "window_accumulate",
           "plain_matmul_error", "chain_is_one"]

_HI = jax.lax.Precision.HIGHEST


def callable_key(fn) -> tuple:
    """A cache key under which two callables compute the same thing: a plain function by its
    code, globals, defaults and closure contents (by identity), a bound method by function
    and instance, a ``functools.partial`` by function and arguments; anything else by
    identity. An inline ``lambda`` written in a loop therefore hits the cache, while a
    closure over a different object misses it. The cache entry keeps ``fn`` (and so every
    object whose id is in the key) alive, so ids are not reused while the key is in use."""
    import types
    if isinstance(fn, types.MethodType):
        return ("method", callable_key(fn.__func__), id(fn.__self__))
    if isinstance(fn, functools.partial):
        return ("partial", callable_key(fn.func), tuple(map(id, fn.args)),
                tuple((k, id(v)) for k, v in sorted(fn.keywords.items())))
    if isinstance(fn, types.FunctionType):
        cells = []
        for c in fn.__closure__ or ():
            try:
                cells.append(id(c.cell_contents))
            except ValueError:          # an empty cell
                cells.append(None)
        return ("function", fn.__code__, id(fn.__globals__), tuple(cells),
                tuple(map(id, fn.__defaults__ or ())),
                tuple((k, id(v)) for k, v in sorted((fn.__kwdefaults__ or {}).items())))
    return ("object", id(fn))


#: XLA CPU's YNNPACK fusions of matrix products are switched off in the online loops when no
#: dense op of the step has more rows than this (``driver_compiler_options``)
YNN_MAX_ROWS = 16
_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"


def dense_rows(graph) -> int | None:
    """The most rows (the product of the output's leading axes: the batch) of a dense op of
    ``graph``; None when the step has no dense op, or an op other than dense and element-wise
    (convolutions, sparse, LoRA, function and custom ops: kernels the measurement behind
    :data:`YNN_MAX_ROWS` did not cover)."""
    kinds = {op.kind for op in graph.ops}
    if "dense" not in kinds or not kinds <= {"dense", "elemwise"}:
        return None
    return max(int(np.prod(op.type.shape[:-1], dtype=np.int64))
               for op in graph.ops if op.kind == "dense")


def driver_compiler_options(graph=None, *, rows: int | None = None) -> dict | None:
    """XLA options the online loops (``online_gradients``, ``train_online``) are compiled
    with, on CPU:

    * copy insertion with region analysis, which lets the loop update its carried traces in
      place instead of copying them (10-25 % per step for windowed D-RTRL, ALIF N = 1024;
      ``benchmarks/README.md``);
    * when every dense op of the step (``graph``, :func:`dense_rows`; or ``rows`` given)
      has at most :data:`YNN_MAX_ROWS` rows: no YNNPACK fusions, so that XLA's own (Eigen)
      kernels run the matrix products. At 8-16 rows they took 0.62-1.01× YNNPACK's time
      (a recurrent ``[B, I]·[I, O]``, ``I·O`` from 0.3 M to 3.5 M), at 32-64 rows mostly
      more (``benchmarks/README.md``, *The matrix products of the online loops*).
      Skipped on a JAX whose XLA does not know the flag.

    None inside another trace (a loop called under the user's own ``jit``): JAX takes compiler
    options on the outermost ``jit`` only, so the caller's options apply there. A cache of
    compiled loops keys on the result (:func:`options_key`)."""
    if jax.default_backend() != "cpu" or not _outside_any_trace():
        return None
    opts = {"xla_cpu_copy_insertion_use_region_analysis": True}
    if rows is None and graph is not None:
        rows = dense_rows(graph)
    if rows is not None and rows <= YNN_MAX_ROWS and _ynn_flag_known():
        opts[_YNN_FLAG] = ""
    return opts


def options_key(opts) -> tuple | None:
    """A hashable form of :func:`driver_compiler_options`' result (for cache keys)."""
    return None if opts is None else tuple(sorted(opts.items()))


@functools.cache
def _ynn_flag_known() -> bool:
    """Whether this XLA takes the YNNPACK fusion option (tried once on a tiny program)."""
    try:
        jax.jit(lambda v: v + 1).lower(np.float32(0)).compile({_YNN_FLAG: ""})
        return True
    except Exception:  # noqa: BLE001 - an XLA without the flag refuses it
        return False


def _outside_any_trace() -> bool:
    """True when no JAX transformation is tracing (so a ``jit`` made now is top level)."""
    try:
        from jax._src import core
        return bool(core.trace_state_clean())
    except (ImportError, AttributeError):     # a JAX without it: no options, always safe
        return False


def driver_error(prog) -> str | None:
    """Why the step-owning loop cannot run ``prog``'s traces, or None when it can.

    The loop computes the symmetric learning signal ``δ^t`` itself and reads ``δ^t · ε^t``,
    so it cannot run a trace whose signal is not symmetric (random feedback, modulatory,
    synthetic), whose read-out is not ``trace``, or a rule that needs the full step program
    (exact RTRL, SnAp-n) or fresh random projections (UORO). ``online_gradients`` /
    ``train_online`` then keep the learner's own step; a direct ``drive_online`` call
    raises (:func:`~.rules.check_signal`, the rules' own refusals)."""
    for e in prog.plan:
        if getattr(e.rule, "needs_program", None):
            return (f"rule {getattr(e.rule, 'name', type(e.rule).__name__)} needs a step that "
                    f"{e.rule.needs_program_why}")
        for t in e.traces:
            if t.signal != "symmetric":
                return f"trace {t.id} has signal={t.signal}"
            if t.readout != "trace":
                return f"trace {t.id} has readout={t.readout}"
            if t.dim == "random":
                return f"trace {t.id} has dim=random (fresh projections every step)"
    return None


def needs_step_loop(prog) -> bool:
    """Whether a rule of ``prog`` needs the step-owning loop to run as compiled: it updates
    its traces and reads their gradient in one pass (``one_pass``: the native and Pallas
    D-RTRL kernels), or adds its per-step gradient into the running sum in place
    (``step_accumulate``: the native ES-D-RTRL rule). Only that loop calls either."""
    return any(getattr(e.rule, "one_pass", None) is not None
               or getattr(e.rule, "step_accumulate", None) is not None for e in prog.plan)


def check_chunk(chunk) -> int:
    """The window length K as an int, or a clear error."""
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or int(chunk) < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return int(chunk)


def window_accumulate(eps_x, signal, grad, chain=None):
    """XLA: ``grad + chain ⊙ (Xᵀ S)`` with X, S the (K·B)-row stacks of ``ε_x`` and ``s``."""
    f32 = jnp.float32
    I, O = grad.shape
    X = eps_x.reshape(-1, I).astype(f32)
    S = signal.reshape(-1, O).astype(f32)
    upd = jax.lax.dot_general(X, S, (((0,), (0,)), ((), ())), precision=_HI,
                              preferred_element_type=f32)
    if chain is not None:
        upd = upd * chain.astype(f32)
    return (grad.astype(f32) + upd).astype(grad.dtype)


def build_loop(prog, loss_fn, chunk: int, window_impl=None) -> SimpleNamespace:
    """The pieces of the step-owning loop of ``prog`` for ``loss_fn`` and windows of ``chunk``
    steps (module docstring), as a namespace of pure functions:

    * ``window(carry, (xs, ys), theta_t, theta_p) -> (carry, losses)``: the steps of one
      window (its length is the inputs' leading axis), with the windowed sums added at its
      end; ``carry = (hidden, others, traces, (acc_t, acc_p))``;
    * ``run(theta_t, theta_p, hidden, others, traces, xs, ys) -> (carry, losses)``: a whole
      sequence (windows of ``chunk`` and the rest);
    * ``zero_acc(theta_t, theta_p)``: zero gradient sums;
    * ``windowed``: whether anything is summed per window (else ``chunk`` changes nothing).
    """
    window_impl = window_impl or window_accumulate
    g, b = prog.g, prog.b
    deferred = lambda e: e.rule.one_pass is not None  # noqa: E731
    io_entries = [e for e in prog.plan if isinstance(e.rule, IORule)]
    # compact D-RTRL traces advanced once per window
    dwin = DrtrlWindow(prog) if chunk > 1 else None
    skip_tr = dwin.skip if dwin else None
    # io-dim relations whose gradient can be summed over windows: plain matmuls
    windowed = set()
    if chunk > 1:
        for e in io_entries:
            for t in e.traces:
                for rid in t.relations:
                    rel = g.relation_by_id[rid]
                    if rel.groups and plain_matmul_error(g.op_object(rel.op)) is None:
                        windowed.add(rid)
    win_order = sorted(windowed, key=lambda r: int(r[1:]))
    # io-dim relations whose per-step gradient the rule adds into the running sum in place
    # (``step_accumulate``, or ``step_accumulate_multi`` for all of a step's at once; a
    # window's product takes those it sums)
    stepped = {}
    for e in io_entries:
        acc_fn = getattr(e.rule, "step_accumulate", None)
        multi_fn = getattr(e.rule, "step_accumulate_multi", None)
        for t in e.traces if acc_fn is not None else ():
            for rid in t.relations:
                rel = g.relation_by_id[rid]
                if rel.groups and plain_matmul_error(g.op_object(rel.op)) is None:
                    stepped[rid] = (acc_fn, multi_fn)

    def owns_io(e, collect):
        """Whether the loop reads this io entry's signals itself (not ``trace_grads``)."""
        return isinstance(e.rule, IORule) and (
            collect or getattr(e.rule, "step_accumulate", None) is not None)

    def relation_slot(acc_t, th_t, rid, S):
        """``(param position, weight leaf index, chain)`` of relation ``rid``; adds ``Σ S``
        into its bias (S: rows of the signal ``s``)."""
        rel = g.relation_by_id[rid]
        op = g.op_object(rel.op)
        pi = b.tparam_pos(rel.param)
        w = b.w_tree(pi, th_t[pi])
        weight = w["weight"] if isinstance(w, dict) else w
        chain = None if chain_is_one(op) else op._chain(weight)
        li_b = leaf_index(g, rel.param, "bias") if isinstance(w, dict) else None
        if li_b is not None:
            acc_t[pi][li_b] = acc_t[pi][li_b] + S.reshape(-1, S.shape[-1]).sum(0).astype(
                acc_t[pi][li_b].dtype)
        return pi, leaf_index(g, rel.param, "weight"), chain

    def add_relation(acc_t, th_t, rid, X, S, impl):
        """``acc += c ⊙ (Xᵀ S)`` for the weight of relation ``rid`` (and ``Σ S`` for its
        bias) with ``impl`` (X, S: rows of ``ε_x`` and ``s``)."""
        pi, li_w, chain = relation_slot(acc_t, th_t, rid, S)
        acc_t[pi][li_w] = impl(X, S, acc_t[pi][li_w], chain)

    def add_stepped(acc_t, th_t, step_io):
        """The per-step products of the ``stepped`` relations: one ``step_accumulate_multi``
        call per rule for all of them (a weight two relations share starts a new call, so
        each call updates a gradient once), else ``step_accumulate`` per relation."""
        batches: dict = {}

        def flush(fn):
            rows = batches.pop(fn, [])
            if rows:
                new = fn([(X, S, acc_t[pi][li], ch) for X, S, (pi, li, ch) in rows])
                for (_, _, (pi, li, _)), v in zip(rows, new):
                    acc_t[pi][li] = v

        for rid, X, S in step_io:
            acc_fn, multi_fn = stepped[rid]
            if multi_fn is None:
                add_relation(acc_t, th_t, rid, X, S, acc_fn)
                continue
            slot = relation_slot(acc_t, th_t, rid, S)
            if any(sl[:2] == slot[:2] for _, _, sl in batches.get(multi_fn, ())):
                flush(multi_fn)
            batches.setdefault(multi_fn, []).append((X, S, slot))
        for fn in list(batches):
            flush(fn)

    def one(carry, xy, th_t, th_p, collect):
        hidden, others, traces, (acc_t, acc_p) = carry
        x_t, y_t = xy
        args = tuple(jax.tree.leaves(((x_t,), {})))
        (outs, new_hidden, new_others, new_traces), fwd = prog.forward(
            th_t, th_p, args, hidden, others, traces, skip=deferred,
            skip_trace=skip_tr if collect else None)
        new_traces = list(new_traces)
        outs = list(outs)
        fl = [i for i, o in enumerate(outs) if is_float(o)]

        def loss_of(*fo):
            full = list(outs)
            for i, v in zip(fl, fo):
                full[i] = v
            return loss_fn(jax.tree.unflatten(g.info.out_treedef, full), y_t)
        loss, vjp = jax.vjp(loss_of, *[outs[i] for i in fl])
        cts = vjp(jnp.ones_like(loss))
        ct_outs = [jnp.zeros(()) for _ in outs]
        for i, c in zip(fl, cts):
            ct_outs[i] = c
        ct_hidden = tuple(jnp.zeros_like(h) for h in new_hidden)
        ct_others = tuple(jnp.zeros_like(o) if is_float(o) else jnp.zeros(()) for o in new_others)
        delta, d_zeta, g_t, g_p, _ = prog.sig.learning_signals(
            th_t, th_p, args, hidden, others, (tuple(ct_outs), ct_hidden, ct_others, None))
        ctx = prog.context(th_t, fwd)
        skip_grad = lambda e: deferred(e) or owns_io(e, collect)  # noqa: E731
        prog.add_grads(g_t, prog.trace_grads(ctx, new_traces, delta, skip=skip_grad,
                                             skip_trace=skip_tr if collect else None))
        pairs, step_io = {}, []
        for e in io_entries:
            if not owns_io(e, collect):
                continue
            vals = [[new_traces[p] for p in ps] for ps in e.positions]
            for t, rid, ex, c in e.rule.signals(ctx, e.traces, vals, delta):
                if collect and rid in windowed:
                    pairs[rid] = (ex, c)
                    continue
                if rid in stepped:
                    step_io.append((rid, ex, c))
                    continue
                rel = g.relation_by_id[rid]
                pi = b.tparam_pos(rel.param)
                grads = prog.sig.xy_to_dw_eqn(rel.op, ex, c, th_t[pi])
                prog.add_grads(g_t, [(pi, li, gr) for li, gr in enumerate(grads)])
        prog.add_grads(g_t, prog.sig.direct_grads(th_t, fwd.xs, d_zeta))
        acc_t = [[a + gg.astype(a.dtype) for a, gg in zip(at, gt)] for at, gt in zip(acc_t, g_t)]
        add_stepped(acc_t, th_t, step_io)
        acc_p = tuple(tuple(a + gg.astype(a.dtype) for a, gg in zip(ap, gp))
                      for ap, gp in zip(acc_p, g_p))
        for e in prog.plan:
            if not deferred(e):
                continue
            # the one-pass traces of this rule that the window does not sum
            keep = [i for i, t in enumerate(e.traces)
                    if not (collect and skip_tr is not None and skip_tr(t))]
            if not keep:
                continue
            trs = [e.traces[i] for i in keep]
            poss = [e.positions[i] for i in keep]
            vals = [[traces[p] for p in ps] for ps in poss]
            new_vals, acc_t = e.rule.one_pass(ctx, trs, vals, delta, acc_t)
            for ps, vs in zip(poss, new_vals):
                for p, v in zip(ps, vs):
                    new_traces[p] = b.arrays[p].to_stored(v)
        others = b.carry_others(others, new_others)
        acc = (tuple(tuple(a) for a in acc_t), acc_p)
        io = tuple(pairs[r] for r in win_order) if collect else ()
        dw = dwin.collect(fwd, delta) if collect and dwin else ()
        return (tuple(new_hidden), others, tuple(new_traces), acc), (loss, io, dw)

    def window(carry, xy, th_t, th_p):
        carry, (losses, io, dw) = jax.lax.scan(lambda c, v: one(c, v, th_t, th_p, True),
                                               carry, xy)
        hidden, others, traces, (acc_t, acc_p) = carry
        acc_t = [list(a) for a in acc_t]
        if dwin:
            traces, acc_t = dwin.apply(th_t, traces, dw, acc_t)
            traces = tuple(traces)
        for rid, (X, S) in zip(win_order, io):
            add_relation(acc_t, th_t, rid, X, S, window_impl)
        return (hidden, others, traces, (tuple(tuple(a) for a in acc_t), acc_p)), losses

    def zero_acc(th_t, th_p):
        return (tuple(tuple(jnp.zeros_like(v) for v in leaves) for leaves in th_t),
                tuple(tuple(jnp.zeros_like(v) for v in leaves) for leaves in th_p))

    def run(th_t, th_p, hidden, others, traces, xs, ys):
        carry = (hidden, others, traces, zero_acc(th_t, th_p))
        if chunk == 1 or not (windowed or dwin):
            carry, (losses, _, _) = jax.lax.scan(lambda c, v: one(c, v, th_t, th_p, False),
                                                 carry, (xs, ys))
            return carry, losses
        return scan_windows(jax.lax.scan, lambda c, v: window(c, v, th_t, th_p), carry,
                            xs, ys, chunk)

    return SimpleNamespace(window=window, run=run, zero_acc=zero_acc,
                           windowed=bool(windowed or dwin))


def scan_windows(scan, window_fn, carry, xs, ys, K: int):
    """``window_fn(carry, (xs_w, ys_w)) -> (carry, losses_w)`` over the consecutive K-step
    windows of ``(xs, ys)`` (leading time axis T), then over the remaining ``T mod K``
    steps; ``scan`` is ``jax.lax.scan`` or ``brainstate.transform.scan`` (when the window
    writes states). Returns ``(carry, losses (T,))``. Windows are sliced inside the loop:
    reshaping the inputs into ``(T // K, K, ...)`` would make XLA copy them (temporary
    memory growing with T)."""
    T = jax.tree.leaves(xs)[0].shape[0]
    n, r = divmod(T, K)
    parts = []
    if n:
        def win(c, i):
            return window_fn(c, jax.tree.map(
                lambda a: jax.lax.dynamic_slice_in_dim(a, i * K, K), (xs, ys)))
        carry, ls = scan(win, carry, jnp.arange(n))
        parts.append(ls.reshape(-1))
    if r:
        carry, ls = window_fn(carry, jax.tree.map(lambda a: a[n * K:], (xs, ys)))
        parts.append(ls)
    return carry, jnp.concatenate(parts)


def grads_by_key(prog, acc_t, acc_p, params: dict, states) -> dict:
    """The gradient sums ``(acc_t, acc_p)`` of :func:`build_loop` by the keys of ``params``
    (a parameter the step does not read gets zeros)."""
    g, b = prog.g, prog.b
    info = g.info
    grads = {}
    for key, st in params.items():
        val = None
        for pi, p in enumerate(b.tparams):
            if states[g.param_by_name[p].state_index] is st:
                val = jax.tree.unflatten(info.state_treedefs[g.param_by_name[p].state_index],
                                         list(acc_t[pi]))
        for pj, p in enumerate(b.pparams):
            if states[g.param_by_name[p].state_index] is st:
                val = jax.tree.unflatten(info.state_treedefs[g.param_by_name[p].state_index],
                                         list(acc_p[pj]))
        grads[key] = val if val is not None else jax.tree.map(jnp.zeros_like, st.value)
    return grads


def drive_online(learner, inputs, targets, loss_fn, params=None, chunk: int = 1,
                 window_impl=None, jit: bool = True):
    """Run ``(T, ...)`` inputs through a compiled learner, summing online gradients.

    Args:
        learner: a compiled algorithm (any backend).
        inputs, targets: leading time axis ``(T, ...)``; ``loss_fn(out_t, target_t)``.
        params: dict of ParamStates to return gradients for (default: all of the model's).
        chunk: K, the window of io-dim matmul gradients summed with one (K·B)-row product
            and of compact D-RTRL traces advanced once (module docstring).
        window_impl: ``(X, S, grad, chain) -> grad`` for a window (default: one XLA GEMM).
        jit: run under ``jax.jit``.

    Returns:
        ``(grads, losses)``; the model's hidden states and the learner's traces are advanced
        to the end of the sequence.
    """
    learner._require()
    step = learner._step
    prog = step.program
    chunk = check_chunk(chunk)
    if params is None:
        params = learner.model.states(brainstate.ParamState)
    b = prog.b
    states = learner._bound_states()
    theta_t, theta_p, hidden0, others0 = b.gather(states)
    traces0 = tuple(t.value for t in learner._traces)
    run = build_loop(prog, loss_fn, chunk, window_impl).run

    if jit:
        opts = driver_compiler_options(learner.graph)
        run = learner._cached_driver(("drive", callable_key(loss_fn), chunk, window_impl,
                                      options_key(opts)),
                                     lambda: jax.jit(run, compiler_options=opts))
    (hidden, others, traces, (acc_t, acc_p)), losses = run(theta_t, theta_p, hidden0, others0,
                                                           traces0, inputs, targets)
    b.scatter(hidden, _others_out(b, others), states)
    for t, v in zip(learner._traces, traces):
        t.value = v
    return grads_by_key(prog, acc_t, acc_p, params, states), losses


def _others_out(b, others) -> tuple:
    """The step's ``new_others`` layout (outputs of non-hidden, non-param states) from the
    carried ``others`` (invars), for :meth:`StepBinding.scatter`."""
    info = b.info
    pos_in = {inv: p for p, inv in enumerate(b.other_idx)}
    hidden_states = {h.state_index for h in b.graph.hidden}
    param_states = {p.state_index for p in b.graph.params}
    out = []
    for si, (a, c) in enumerate(info.state_out_slices):
        if si in hidden_states or si in param_states:
            continue
        ia, _ = info.state_in_slices[si]
        out.extend(others[pos_in[ia + j]] if ia + j in pos_in else None for j in range(c - a))
    return tuple(out)
