"""One-pass online training driver: ``fused_online_gradients``.

The learner's custom-VJP step cannot run the one-pass D-RTRL kernel: the new trace must
leave the forward, but the learning signal δ^t it is contracted with only exists in the
backward. This driver owns the whole step instead (same math, same gradients as
``brainscale.online_gradients`` with the JAX backend), so per step and per kernel trace:

1. the forward computes the neuron-level quantities J, df, x (no trace-sized work);
2. δ^t comes from one VJP of the step (the loss's cotangent of the outputs);
3. :func:`~.drtrl.drtrl_multi` reads ε^{t-1} once, writes ε^t in place and adds
   ``Σ δ ε^t`` into the running weight gradient (aliased, no separate add).

ES-D-RTRL (io-dim) matmul gradients are accumulated over windows of ``chunk`` steps: the
scan keeps K steps of ε_x and s = Σ ε_f∘δ and adds them with one (K·B)-row product
(:func:`~.es_chunked.es_accumulate`) instead of K read–modify–writes of the gradient.
"""
from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from ...errors import BrainscaleError
from ..jax_backend import _Emitter, _is_float
from .backend import PallasEmitter, _weight_leaf_index
from .es_chunked import es_accumulate
from .select import _matmul_ok, chain_is_one

__all__ = ["fused_online_gradients", "drive_online"]


def check_chunk(chunk) -> int:
    """The window length K as an int, or a clear error."""
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or int(chunk) < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return int(chunk)


def _io_plan(em):
    """Static description of the io-dim relations: (ti, q, pi, chunkable)."""
    res = []
    for ti, ent in enumerate(em.L.traces):
        if ent[0] != "x":
            continue
        trace = em.g.trace_by_id[ent[1]]
        for rid in trace.relations:
            rel = em.g.relation_by_id[rid]
            q = em.op_index[rel.op]
            if not any(e2[0] == "f" and e2[1] == rid for e2 in em.L.traces):
                continue
            res.append((ti, q, em.tparam_index[rel.param], _matmul_ok(em.ops[q]) is None))
    return res


def _online_step(em: PallasEmitter, theta_t, theta_p, args, hidden, others, traces, y,
                 loss_fn, acc, collect_io: bool):
    """One step: returns (new_hidden, new_others, new_traces, new_acc, loss, io pairs)."""
    info = em.info
    kernel = getattr(em, "kernel", None) or {}
    if kernel:
        em._defer = True        # the forward leaves kernel traces to the one-pass launch
    try:
        (outs, new_hidden, new_others, new_traces), xs = em._forward(
            theta_t, theta_p, args, hidden, others, traces)
        J, DF = em._stash[:2] if kernel else (None, None)
    finally:
        if kernel:
            em._defer = False
    new_traces = list(new_traces)
    outs = list(outs)
    fl = [i for i, o in enumerate(outs) if _is_float(o)]

    def loss_of(*fo):
        full = list(outs)
        for i, v in zip(fl, fo):
            full[i] = v
        return loss_fn(jax.tree.unflatten(info.out_treedef, full), y)
    loss, vjp = jax.vjp(loss_of, *[outs[i] for i in fl])
    cts = vjp(jnp.ones_like(loss))
    ct_outs = [jnp.zeros(()) for _ in outs]
    for i, c in zip(fl, cts):
        ct_outs[i] = c
    ct_hidden = tuple(jnp.zeros_like(h) for h in new_hidden)
    ct_others = tuple(jnp.zeros_like(o) if _is_float(o) else jnp.zeros(()) for o in new_others)
    delta, d_zeta, g_t, g_p, _ = em._learning_signals(theta_t, theta_p, args, hidden, others,
                                                      (tuple(ct_outs), ct_hidden, ct_others, None))
    jax_keys = {k for k in em._param_groups() if k not in kernel}
    em._param_trace_grads(g_t, theta_t, new_traces, delta, groups=jax_keys)
    io_pairs = []
    for (ti, q, pi, c_sig), (ti2, q2, pi2, chunkable) in zip(em._io_signals(new_traces, delta),
                                                             _io_plan(em)):
        if collect_io and chunkable:
            io_pairs.append((new_traces[ti], c_sig))
            continue
        for li, leaf in enumerate(em._xy_to_dw_eqn(q, new_traces[ti], c_sig, theta_t[pi])):
            g_t[pi][li] = g_t[pi][li] + leaf
    em._direct_grads(g_t, theta_t, xs, d_zeta)
    acc_t, acc_p = acc
    new_t = [[a + g.astype(a.dtype) for a, g in zip(at, gt)] for at, gt in zip(acc_t, g_t)]
    new_p = tuple(tuple(a + g.astype(a.dtype) for a, g in zip(ap, gp))
                  for ap, gp in zip(acc_p, g_p))
    if kernel:
        claimed, grad_acc = set(), {}
        for mk, ki in em.kernel.items():
            slot = (ki.pi, _weight_leaf_index(em, ki.pi))
            if slot not in claimed:
                claimed.add(slot)
                grad_acc[mk] = new_t[slot[0]][slot[1]]
        res = em._launch(theta_t, traces, J, DF, xs, delta, True, grad_acc=grad_acc)
        for mk in sorted(res, key=lambda m: m not in grad_acc):   # replacements first
            ki = em.kernel[mk]
            new_map, gleaves = res[mk]
            li_w = _weight_leaf_index(em, ki.pi)
            for ti, leaf in new_map.items():
                new_traces[ti] = leaf.astype(traces[ti].dtype)
            for li, gl in enumerate(gleaves):
                cur = new_t[ki.pi][li]
                if li == li_w and mk in grad_acc:
                    new_t[ki.pi][li] = gl.astype(cur.dtype)
                else:
                    new_t[ki.pi][li] = cur + gl.astype(cur.dtype)
    new_acc = (tuple(tuple(x) for x in new_t), new_p)
    return tuple(new_hidden), tuple(new_others), tuple(new_traces), new_acc, loss, io_pairs


def fused_online_gradients(learner, inputs, targets, loss_fn, params=None, chunk: int = 1,
                           es_impl: str | None = None, jit: bool = True):
    """``brainscale.online_gradients`` with the one-pass D-RTRL kernel and chunked ES gradients.

    Args:
        learner: an algorithm compiled with ``backend='pallas'`` (or a ``PallasBackend``).
        inputs, targets: leading time axis ``(T, ...)``; ``loss_fn(out_t, target_t)``.
        params: dict of ParamStates to return gradients for (default: all of the model's).
        chunk: K, the window of io-dim (ES-D-RTRL) matmul gradients accumulated with one
            (K·B)-row product; 1 accumulates every step. The gradient sum is the same.
        es_impl: 'xla' (cuBLAS GEMM) or 'pallas' (the kernel); default: the cost model's.
        jit: run under ``jax.jit``.

    Returns:
        ``(grads, losses)`` like ``online_gradients``. The model's hidden states and the
        learner's traces are advanced to the end of the sequence.
    """
    learner._require()
    em = getattr(learner._step, "emitter", None)
    if not isinstance(em, PallasEmitter):
        raise BrainscaleError("fused_online_gradients needs a learner compiled with "
                              "backend='pallas' (or a PallasBackend instance)")
    return drive_online(learner, inputs, targets, loss_fn, params, chunk,
                        es_impl or em.cost_model.es_impl, jit)


def drive_online(learner, inputs, targets, loss_fn, params=None, chunk: int = 1,
                 es_impl: str = "xla", jit: bool = True):
    """The step-owning online loop behind :func:`fused_online_gradients` and
    ``brainscale.online_gradients(..., chunk=K)``: works with the JAX backend's emitter
    (chunked ES-D-RTRL gradients, plain XLA) and the Pallas one (plus the one-pass kernel)."""
    learner._require()
    em = getattr(learner._step, "emitter", None)
    if not isinstance(em, _Emitter):
        raise BrainscaleError(f"the learner's backend ({learner._step.backend!r}) has no "
                              f"step-owning driver; use backend='jax' or 'pallas'")
    chunk = check_chunk(chunk)
    if es_impl not in ("xla", "pallas"):
        raise ValueError(f"es_impl must be 'xla' or 'pallas', got {es_impl!r}")
    if params is None:
        params = learner.model.states(brainstate.ParamState)
    info, L, g = em.info, em.L, em.g
    n_arg = info.n_arg_leaves
    state_leaves = []
    for st in info.states:
        state_leaves.extend(jax.tree.leaves(st.value))
    pick = lambda idx: tuple(state_leaves[i - n_arg] for i in idx)  # noqa: E731
    theta_t = tuple(pick(ix) for ix in L.tparam_idx)
    theta_p = tuple(pick(ix) for ix in L.pparam_idx)
    hidden0, others0 = pick(L.hidden_idx), pick(L.other_idx)
    traces0 = tuple(t.value for t in learner._traces)
    hidden_states = {h.state_index for h in g.hidden}
    param_states = {p.state_index for p in g.params}
    other_pos = {inv: p for p, inv in enumerate(L.other_idx)}
    other_map, pos = [], 0
    for si, (a, b) in enumerate(info.state_out_slices):
        if si in hidden_states or si in param_states:
            continue
        ia, _ = info.state_in_slices[si]
        for j in range(b - a):
            if ia + j in other_pos:
                other_map.append((other_pos[ia + j], pos + j))
        pos += b - a
    io_plan = [p for p in _io_plan(em) if p[3]] if chunk > 1 else []

    def one(carry, xy, th_t, th_p, collect):
        hidden, others, traces, acc = carry
        x_t, y_t = xy
        args = tuple(jax.tree.leaves(((x_t,), {})))
        nh, no, nt, acc, loss, io = _online_step(em, th_t, th_p, args, hidden, others, traces,
                                                 y_t, loss_fn, acc, collect)
        others = list(others)
        for p_in, p_out in other_map:
            others[p_in] = no[p_out]
        return (nh, tuple(others), nt, acc), (loss, tuple(io))

    def window(carry, xy, th_t, th_p):
        carry, (losses, io) = jax.lax.scan(lambda c, v: one(c, v, th_t, th_p, True), carry, xy)
        hidden, others, traces, (acc_t, acc_p) = carry
        acc_t = [list(a) for a in acc_t]
        for (ti, q, pi, _), (X, S) in zip(io_plan, io):
            op = em.ops[q]
            w = em._w_tree(pi, th_t[pi])
            weight = w["weight"] if isinstance(w, dict) else w
            chain = None if chain_is_one(op) else op._chain(weight)
            li_w = _weight_leaf_index(em, pi)
            acc_t[pi][li_w] = es_accumulate(X, S, acc_t[pi][li_w], chain, impl=es_impl,
                                            interpret=getattr(em, "interpret", True))
            if isinstance(w, dict) and "bias" in w:
                li_b = int(em._w_tree(pi, list(range(len(th_t[pi]))))["bias"])
                acc_t[pi][li_b] = acc_t[pi][li_b] + S.reshape(-1, S.shape[-1]).sum(0).astype(
                    acc_t[pi][li_b].dtype)
        return (hidden, others, traces, (tuple(tuple(a) for a in acc_t), acc_p)), losses

    def run(th_t, th_p, hidden, others, traces, xs, ys):
        acc = (tuple(tuple(jnp.zeros_like(v) for v in leaves) for leaves in th_t),
               tuple(tuple(jnp.zeros_like(v) for v in leaves) for leaves in th_p))
        carry = (hidden, others, traces, acc)
        T = jax.tree.leaves(xs)[0].shape[0]
        if chunk == 1 or not io_plan:
            carry, (losses, _) = jax.lax.scan(lambda c, v: one(c, v, th_t, th_p, False),
                                              carry, (xs, ys))
            return carry, losses
        n, r = divmod(T, chunk)
        parts = []
        if n:
            # windows are sliced inside the loop: reshaping the (T, ...) inputs into
            # (n, K, ...) would make XLA copy them (temp memory growing with T)
            def win(c, i):
                v = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk),
                                 (xs, ys))
                return window(c, v, th_t, th_p)
            carry, ls = jax.lax.scan(win, carry, jnp.arange(n))
            parts.append(ls.reshape(-1))
        if r:
            tail = jax.tree.map(lambda a: a[n * chunk:], (xs, ys))
            carry, ls = window(carry, tail, th_t, th_p)
            parts.append(ls)
        return carry, jnp.concatenate(parts)

    if jit:
        # one compiled driver per (loss, chunk, impl) and learner: repeated calls reuse it
        cache = em.__dict__.setdefault("_driver_cache", {})
        key = (loss_fn, chunk, es_impl)
        if key not in cache:
            cache[key] = jax.jit(run)
        run = cache[key]
    (hidden, others, traces, (acc_t, acc_p)), losses = run(theta_t, theta_p, hidden0, others0,
                                                           traces0, inputs, targets)
    # write back hidden states, written other states and traces
    for h, v in zip(g.hidden, hidden):
        info.states[h.state_index].value = jax.tree.unflatten(info.state_treedefs[h.state_index], [v])
    for si in getattr(learner, "_written_other", ()):
        ia, ib = info.state_in_slices[si]
        vals = [others[other_pos[i]] for i in range(ia, ib)]
        info.states[si].value = jax.tree.unflatten(info.state_treedefs[si], vals)
    for t, v in zip(learner._traces, traces):
        t.value = v
    grads = {}
    for key, st in params.items():
        val = None
        for pi, p in enumerate(em.tparams):
            if info.states[p.state_index] is st:
                val = jax.tree.unflatten(info.state_treedefs[p.state_index], list(acc_t[pi]))
        for pj, p in enumerate(em.pparams):
            if info.states[p.state_index] is st:
                val = jax.tree.unflatten(info.state_treedefs[p.state_index], list(acc_p[pj]))
        grads[key] = val if val is not None else jax.tree.map(jnp.zeros_like, st.value)
    return grads, losses
