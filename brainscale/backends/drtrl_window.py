"""D-RTRL summed over windows of K steps (``online_gradients(..., chunk=K)``).

A compact D-RTRL trace of a plain :class:`~brainscale.MatMulOp` (``W[a, n]`` reaches neuron
``n`` only) follows, per example and neuron, with the group's ``k × k`` Jacobian ``J^t``,
``df^t = ∂h^t/∂y^t`` (``k``-vector) and the chain ``c = ∂W_eff/∂W``,

    ε^t = J^t ε^{t-1} + c ⊙ (x^t ⊗ df^t),          g += Σ_b δ^t · ε^t        (per step).

Over a window ``t = 1 … K`` starting from ``ε^0`` the same sums are, with
``Φ_{t,r} = J^t ⋯ J^{r+1}`` (``Φ_{t,t} = I``) and ``μ_r = Σ_{t≥r} δ^t Φ_{t,r}``
(``μ_r = δ^r + μ_{r+1} J^{r+1}``: one reverse pass over ``k``-vectors),

    Σ_t δ^t · ε^t = μ_0 · ε^0 + c ⊙ Σ_{r,b} x^r ⊗ (μ_r · df^r),          μ_0 = μ_1 J^1,
    ε^K = Φ_{K,0} ε^0 + c ⊙ Σ_r x^r ⊗ (Φ_{K,r} df^r),

(the bias likewise with ``x = 1``): the sum is reassociated, not approximated, so the
gradient and the final traces equal the per-step ones up to float rounding. The trace is
read twice and written once per *window* (a contraction with ``μ_0`` and one update with
``Φ_{K,0}``) instead of read twice and written once per *step*; the per-step inputs enter
through two (K·B)-row matrix products. The window keeps ``J, df, δ`` (``B·N·k²`` floats per
step) and ``x`` of its K steps: memory grows with K, not with the sequence.

Which traces are summed this way is decided from the IR: a trace on the default compact
rule (``('param', 'compact', path)``, default axes; the JAX rule, or the native kernel's
rule, which joins with :func:`allow_window`) whose blocks are all plain MatMulOps with one
neuron axis; every other trace runs step by step in the same loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..concepts import mix_states
from .linearize import sg
from .rules import (ParamCompactRule, chain_is_one, contract_packed, contract_param,
                    leaf_index, param_blocks, plain_matmul_error, rule_key)

__all__ = ["DrtrlWindow", "window_trace_error", "allow_window", "WINDOW_RULES"]

_HI = jax.lax.Precision.HIGHEST


#: rule classes whose traces hold exactly the default compact D-RTRL trace, in any layout
#: :class:`~.rules.ParamBlock` reads (per-state arrays, packed pairs, stacked states); a
#: backend's rule joins with :func:`allow_window` (exact classes: a subclass may change the
#: math)
WINDOW_RULES = {ParamCompactRule}


def allow_window(rule_cls):
    """Let the traces of ``rule_cls`` be summed over windows (class decorator)."""
    WINDOW_RULES.add(rule_cls)
    return rule_cls


def window_trace_error(graph, trace, rule) -> str | None:
    """None when ``trace`` (run by ``rule``) can be summed over windows, else why not."""
    key = rule_key(trace)
    if type(rule) not in WINDOW_RULES or len(key) != 3 or key[:2] != ("param", "compact"):
        return f"rule {getattr(rule, 'name', type(rule).__name__)} with key {key}"
    for blk in param_blocks(graph, trace):
        why = plain_matmul_error(graph.op_object(blk.op))
        if why:
            return why
        if blk.nS != len(blk.bshape) + 1:
            return f"op {blk.op}: more than one neuron axis"
        fields = getattr(graph.param_by_name[blk.param].type, "fields", None)
        if fields is not None and not {n for n, _ in fields} <= {"weight", "bias"}:
            return f"parameter {blk.param}: leaves other than weight and bias"
    return None


def _flat_b(a, nb: int, tail: int):
    """``a`` with its ``nb`` batch axes (after a leading window axis) merged into one
    (size 1 when unbatched); ``tail`` trailing axes kept."""
    K = a.shape[0]
    return a.reshape((K, -1) + a.shape[a.ndim - tail:]) if nb else a[:, None]


class DrtrlWindow:
    """The windowed D-RTRL traces of a :class:`~.step.Program` (see the module docstring)."""

    def __init__(self, prog):
        self.prog = prog
        g = prog.g
        self.ids = set()
        self.blocks = []                    # (the trace's array positions, ParamBlock, rule)
        for e in prog.plan:
            for t, ps in zip(e.traces, e.positions):
                if window_trace_error(g, t, e.rule) is None:
                    self.ids.add(t.id)
                    self.blocks.extend((ps, blk, e.rule) for blk in param_blocks(g, t))
        self.gids = sorted({blk.gid for _, blk, _ in self.blocks})
        self.ops = sorted({blk.op for _, blk, _ in self.blocks})
        self.dfs = sorted({(blk.op, blk.gid) for _, blk, _ in self.blocks})

    def __bool__(self):
        return bool(self.ids)

    def skip(self, trace) -> bool:
        return trace.id in self.ids

    def collect(self, fwd, delta) -> tuple:
        """One step's inputs of the window: ``(J, δ)`` per group, ``df`` per (op, group),
        ``x`` per op (at least float32: spikes become floats, float64 stays; gradients
        stopped)."""
        sig = self.prog.sig

        def f(v):
            v = sg(v)
            return v.astype(jnp.promote_types(v.dtype, jnp.float32))
        J = tuple(f(fwd.J[gid]) for gid in self.gids)
        D = tuple(f(sig.group_delta(gid, delta)) for gid in self.gids)
        DF = tuple(f(fwd.DF[k]) for k in self.dfs)
        X = tuple(f(fwd.xs[o]) for o in self.ops)
        return J, D, DF, X

    def apply(self, theta_t, traces, data, acc_t):
        """Advance the windowed traces over the K steps of ``data`` (``collect``'s outputs
        stacked over the window) and add the window's gradient into ``acc_t``."""
        prog, g, b = self.prog, self.prog.g, self.prog.b
        Js, Ds, DFs, Xs = data
        mu0, mu, phi0, phi = {}, {}, {}, {}
        for gid, Jw, Dw in zip(self.gids, Js, Ds):
            mu0[gid], mu[gid], phi0[gid], phi[gid] = _reverse(Jw, Dw)
        DF = dict(zip(self.dfs, DFs))
        X = dict(zip(self.ops, Xs))
        new = list(traces)
        ctx = prog.context(theta_t)
        for ps, blk, rule in self.blocks:
            op = g.op_object(blk.op)
            w = ctx.w(blk.param)
            weight = w["weight"] if isinstance(w, dict) else w
            chain = None if chain_is_one(op) else op._chain(weight)
            nb = len(blk.bshape)
            df = DF[(blk.op, blk.gid)]                                  # (K, *b, N, k)
            C = jnp.einsum("...i,...i->...", mu[blk.gid], df)          # (K, *b, N)
            V = jnp.einsum("...ij,...j->...i", phi[blk.gid], df)       # (K, *b, N, k)
            x = X[blk.op]                                               # (K, *bx, I)
            if nb and x.ndim == 2:      # one unbatched input feeds a batched group
                x = jnp.broadcast_to(x.reshape((x.shape[0],) + (1,) * nb + x.shape[1:]),
                                     (x.shape[0],) + blk.bshape + x.shape[1:])
            x2 = _flat_b(x, nb, 1)                                      # (K, B, I)
            C2 = _flat_b(C, nb, 1)                                      # (K, B, N)
            V2 = _flat_b(V, nb, 2)                                      # (K, B, N, k)
            vals = [traces[p] for p in ps]                              # this trace's arrays
            # gradient: μ_0 · ε^0 (the trace as it was at the window start) + the window's inputs
            if any(a.packed for _, _, _, a in blk.slots):
                g0 = contract_packed(b, blk, vals, mu0[blk.gid])
            else:
                g0 = contract_param(op, w, blk.gather(b, vals, False), mu0[blk.gid], False,
                                    blk.bshape)
            gw = jnp.einsum("kba,kbn->an", x2, C2, precision=_HI)
            if chain is not None:
                gw = gw * chain
            inputs = {"weight": gw, "bias": C2.sum((0, 1))}
            gin = {key: inputs[key] for key in w} if isinstance(w, dict) else gw
            pi = b.tparam_pos(blk.param)
            for li, (l0, l1) in enumerate(zip(jax.tree.leaves(g0), jax.tree.leaves(gin))):
                acc_t[pi][li] = acc_t[pi][li] + (l0 + l1).astype(acc_t[pi][li].dtype)
            # the trace at the window end; the barrier orders the contraction above before
            # the update, which can then write ε^K over ε^0 (no trace-sized copy)
            g0, vals = jax.lax.optimization_barrier((g0, vals))
            eps = blk.gather(b, vals, False)
            cw = _current(x2, V2, chain, blk.bshape)                   # (*b, I, N, k)
            wpos = _stacked_weight(g, blk)
            stacked = None
            if wpos is not None:
                # the weight's k states stacked (the native kernel's layout): advanced as one
                # array, by the rule's own kernel where it has one (XLA emits the stacked
                # form below as a slow interleaved concatenate: 2.8x the packed pair's pass)
                e_w = b.arrays[ps[wpos]].from_stored(vals[wpos])
                own = getattr(rule, "advance_stacked", None)
                if own is not None:
                    stacked = own(e_w, phi0[blk.gid], cw)
                else:
                    stacked = jnp.stack([mix_states(phi0[blk.gid], [e_w[..., j] for j in
                                                                    range(blk.k)], i, 1)
                                         for i in range(blk.k)], axis=-1) + cw
            res = _advance(eps, phi0[blk.gid], cw, V2, blk.bshape, stacked)
            out = blk.scatter(res, False)
            if wpos is not None:
                out[wpos] = stacked
            for pos, v in out.items():
                a = b.arrays[ps[pos]]
                new[ps[pos]] = prog.constrain(a.to_stored(v), a.stored_sharding)
        return new, acc_t


def _stacked_weight(graph, blk):
    """The block position of the weight's trace array when it keeps the k states stacked
    (``(.., I, N, k)``), else None."""
    wli = leaf_index(graph, blk.param, "weight")
    return next((pos for li, si, pos, a in blk.slots
                 if li == wli and si is None and not a.packed), None)


def _reverse(Jw, Dw):
    """``(μ_0, μ_{1..K}, Φ_{K,0}, Φ_{K,1..K})`` from the window's ``J`` (K, ..., k, k) and
    ``δ`` (K, ..., k): one reverse scan."""
    k = Jw.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(k, dtype=Jw.dtype), Jw.shape[1:])

    def body(carry, jd):
        mu_n, phi_n, J_n = carry                     # μ_{r+1}, Φ_{K,r+1}, J^{r+1}
        J_r, d_r = jd
        mu_r = d_r + jnp.einsum("...i,...ij->...j", mu_n, J_n, precision=_HI)
        phi_r = jnp.einsum("...ij,...jl->...il", phi_n, J_n, precision=_HI)
        return (mu_r, phi_r, J_r), (mu_r, phi_r)
    init = (jnp.zeros_like(Dw[0]), eye, eye)
    (mu1, phi1, J1), (mu, phi) = jax.lax.scan(body, init, (Jw, Dw), reverse=True)
    mu0 = jnp.einsum("...i,...ij->...j", mu1, J1, precision=_HI)
    phi0 = jnp.einsum("...ij,...jl->...il", phi1, J1, precision=_HI)
    return mu0, mu, phi0, phi


def _current(x2, V2, chain, bshape):
    """``c ⊙ Σ_r x^r ⊗ V^r`` with the k states stacked last, ``(*b, I, N, k)``: one GEMM."""
    cw = jnp.einsum("kba,kbni->bani", x2, V2, precision=_HI)
    if chain is not None:
        cw = cw * chain[..., None]
    return cw.reshape(bshape + cw.shape[1:]) if bshape else cw[0]


def _advance(eps, phi0, cw, V2, bshape, stacked=None):
    """``ε_i ← Σ_j Φ_{K,0}[.., n, i, j] ε_j + c ⊙ Σ_r x^r ⊗ V^r_i`` per state ``i`` (``eps``:
    the k per-state parameter trees of :meth:`ParamBlock.gather`; ``cw``: :func:`_current`).
    ``stacked``: the weight's new trace, already advanced with its states stacked (its
    per-state slices are returned for the weight)."""
    k = phi0.shape[-1]

    def new_weight(es, i):
        if stacked is not None:
            return stacked[..., i]
        return mix_states(phi0, es, i, 1) + cw[..., i]

    def new_bias(es, i):
        cb = V2[..., i].sum(0)                                            # (B, N)
        cb = cb.reshape(bshape + cb.shape[1:]) if bshape else cb[0]
        return mix_states(phi0, es, i, 0) + cb

    if isinstance(eps[0], dict):
        return [{key: (new_weight if key == "weight" else new_bias)([e[key] for e in eps], i)
                 for key in eps[0]} for i in range(k)]
    return [new_weight(list(eps), i) for i in range(k)]
