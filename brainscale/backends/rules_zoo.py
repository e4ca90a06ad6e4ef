"""Diagonal trace rules off the default axes: scalar-leak and no recursion, the κ filter.

These are D-RTRL's and ES-D-RTRL's rules (:mod:`.rules`) with the hidden-to-hidden factor of
the recursion replaced (docs/rules.md):

* ``recursion='leak'``: ``J`` is replaced by ``α·I`` (α = ``Trace.decay``):
  param-dim ``ε_i ← α ε_i + xy_to_dw(x, df[:,i])``; io-dim ``ε_x ← α ε_x + x``,
  ``ε_f ← α ε_f + (1−α) df``;
* ``recursion='none'``: no previous trace: param-dim ``ε_i ← xy_to_dw(x, df[:,i])``; io-dim
  ``ε_x ← x``, ``ε_f ← df`` (OSTL's feed-forward regime);
* ``filter='kappa'`` (param-dim, e-prop): the trace ``ε`` is updated as its recursion says
  and its filtered copy ``ē ← κ ē + ε`` (arrays ``eps_bar``) is what the gradient reads:
  ``∂L^t/∂θ = Σ_i yw_to_w(δ_i, ē_i)``.

* ``filter='kappa_out'`` (param-dim, e-prop as in Bellec et al. 2020): the filtered
  eligibility trace at the group's output ``z``, ``ē ← κ ē + Σ_i ψ_i ε_i`` with
  ``ψ = ∂z^t/∂h^t`` (``Forward.PSI``), one array per (relation, group, leaf); the gradient
  ``Σ yw_to_w(L, ē) + Σ_i yw_to_w(c_i, ε_i)`` with ``L = ∂L^t/∂z^t`` (the learning signal
  at the output) and ``c`` the cotangent of the new hidden values themselves (zero unless
  the loss reads the states directly). It needs the ``jax-zoo`` step (``L``).

* ``scope='block'`` (any param-dim layout): D-RTRL's rule with ``J`` replaced by the
  per-neuron ``k×k`` block of the *full* step Jacobian (every path, op inputs included:
  :func:`~.linearize.block_jacobian`, computed by the ``jax-zoo`` step into
  ``ctx.step['JB']``); braintrace's ``recurrence_scope='coupled'`` on its per-parameter
  trace (its ``OSTLRecurrent``).

The learning-signal axis is not a rule's business: the step computes ``δ`` as the trace's
``signal`` says (symmetric on every backend; random feedback, a modulator or a synthetic
gradient on ``jax-zoo``) and the rule contracts it with its arrays.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..errors import BackendError
from .linearize import Forward, sg
from .rules import (IORule, ParamChannelRule, ParamCompactRule, ParamDenseRule, contract_param,
                    param_blocks, register_trace_rule)
from .signals import is_float

__all__ = ["with_recursion", "ParamRecursionRule", "IORecursionRule", "KappaFilterRule",
           "KappaOutRule", "BlockScopeRule"]


def with_recursion(ctx, trace):
    """``ctx`` whose ``fwd.J`` is the recursion factor of ``trace``: ``J`` (jacobian),
    ``α·I`` (leak) or ``0`` (none), per group and neuron."""
    if trace.recursion == "jacobian":
        return ctx
    fwd = ctx.fwd
    scale = float(trace.decay) if trace.recursion == "leak" else 0.0
    J = {gid: scale * jnp.broadcast_to(jnp.eye(j.shape[-1], dtype=j.dtype), j.shape)
         for gid, j in fwd.J.items()}
    return dataclasses.replace(ctx, fwd=Forward(fwd.outs, fwd.xs, J, fwd.DF))


class ParamRecursionRule:
    """Mixin: a param-dim rule whose ``J`` is the trace's recursion factor."""

    def update(self, ctx, traces, arrays):
        return [super(ParamRecursionRule, self).update(with_recursion(ctx, t), [t], [vals])[0]
                for t, vals in zip(traces, arrays)]


class IORecursionRule(IORule):
    """ES-D-RTRL with ``recursion='leak'`` (``J`` → ``I``) or ``'none'`` (α = 0)."""
    name = "io/recursion"

    def update(self, ctx, traces, arrays):
        out = []
        for t, vals in zip(traces, arrays):
            if t.recursion == "none":       # ε_x ← x, ε_f ← df: nothing of the old trace
                out.append(self._current(ctx, t, vals))
                continue
            c = with_recursion(ctx, dataclasses.replace(t, decay=1.0))
            out.append(IORule.update(self, c, [t], [vals])[0])
        return out

    def _current(self, ctx, t, vals):
        g, fwd = ctx.graph, ctx.fwd
        new = list(vals)
        x_pos, fs = self._parts(t)
        first = g.relation_by_id[t.relations[0]].op
        new[x_pos] = sg(fwd.xs[first]).astype(t.arrays[x_pos].type.dtype)
        for pos, a in fs:
            op = g.relation_by_id[a.relation].op
            new[pos] = fwd.DF[(op, a.group)].astype(a.type.dtype)
        return new


class _FilteredTrace:
    """Mixin of the filter rules: the first arrays of a trace are the base rule's ``ε``, the
    rest the filtered arrays."""

    @staticmethod
    def _split(trace) -> int:
        return sum(1 for a in trace.arrays if a.role == "eps")

    @classmethod
    def _eps_view(cls, trace):
        return dataclasses.replace(trace, arrays=trace.arrays[:cls._split(trace)],
                                   filter="none", kappa=None)

    def _advance_eps(self, ctx, t, vals):
        """``(n, base view, new ε)``: the base rule's update of the ``ε`` arrays."""
        n = self._split(t)
        base = self._eps_view(t)
        return n, base, super().update(with_recursion(ctx, t), [base], [list(vals[:n])])[0]


class KappaFilterRule(_FilteredTrace):
    """Mixin: e-prop's filtered trace. The first half of the arrays is ``ε`` (the base rule's
    arrays), the second half ``ē``; the gradient contracts ``ē``."""

    def update(self, ctx, traces, arrays):
        out = []
        for t, vals in zip(traces, arrays):
            n, _, new_eps = self._advance_eps(ctx, t, vals)
            k = float(t.kappa)
            bars = [k * vals[n + i].astype(a.type.dtype) + new_eps[i].astype(a.type.dtype)
                    for i, a in enumerate(t.arrays[n:])]
            out.append(list(new_eps) + bars)
        return out

    def grad(self, ctx, traces, arrays, delta):
        out = []
        for t, vals in zip(traces, arrays):
            n = self._split(t)
            # the base rule contracts δ with its arrays: hand it ē in place of ε
            out.extend(super().grad(ctx, [self._eps_view(t)], [list(vals[n:])], delta))
        return out


class KappaOutRule(_FilteredTrace):
    """Mixin: e-prop's filtered eligibility trace at the neurons' outputs (see the module
    docstring). The first arrays are the base rule's ``ε``, then one ``ē`` per (relation,
    group, leaf)."""
    needs_program = "output-signal"
    needs_program_why = ("computes the learning signal at the neurons' outputs "
                         "(L = dE/dz, filter=kappa_out)")

    @staticmethod
    def _bar_pos(trace, n) -> dict:
        return {(a.relation, a.group, a.leaf): n + i for i, a in enumerate(trace.arrays[n:])}

    def _bar_tree(self, ctx, blk, trace, vals, n):
        pos = self._bar_pos(trace, n)
        leaves = [trace.arrays[pos[(blk.rid, blk.gid, li)]].from_stored(
            vals[pos[(blk.rid, blk.gid, li)]]) for li in range(blk.n_leaves)]
        return ctx.binding.w_tree(blk.param, leaves)

    def update(self, ctx, traces, arrays):
        out = []
        for t, vals in zip(traces, arrays):
            n, base, new_eps = self._advance_eps(ctx, t, vals)
            new = list(new_eps) + list(vals[n:])
            pos = self._bar_pos(t, n)
            kap = float(t.kappa)
            for blk in param_blocks(ctx.graph, base):
                op = ctx.op(blk.op)
                psi = ctx.fwd.PSI[blk.gid]                             # (*B, *S, k)
                eps = blk.gather(ctx.binding, new_eps, self.dense)
                if self.dense:
                    def contract(e, _psi=psi, _nS=blk.nS):
                        p = _psi.reshape(_psi.shape + (1,) * (e.ndim - _nS - 1))
                        return jnp.sum(p * e, axis=_nS)
                    e_tree = jax.tree.map(contract, eps)
                else:
                    def single(eps, psi, _op=op):
                        acc = None
                        for i in range(psi.shape[-1]):
                            term = _op.yw_to_w(psi[..., i], eps[i])
                            acc = term if acc is None else jax.tree.map(jnp.add, acc, term)
                        return acc
                    e_tree = jax.vmap(single)(eps, psi) if blk.bshape else single(eps, psi)
                old = jax.tree.leaves(self._bar_tree(ctx, blk, t, vals, n))
                for li, e in enumerate(jax.tree.leaves(e_tree)):
                    p = pos[(blk.rid, blk.gid, li)]
                    new[p] = kap * old[li] + e.astype(old[li].dtype)
            out.append(new)
        return out

    def grad(self, ctx, traces, arrays, delta):
        step = ctx.step
        if step is None or "d_out" not in step:
            raise BackendError(
                f"trace(s) {', '.join(t.id for t in traces)} have filter=kappa_out, whose "
                f"gradient reads the learning signal at the neurons' outputs; this driver does "
                f"not compute it (online_gradients(chunk=K>1), multi-step windows): run the "
                f"learner one step per call")
        hid_pos = {h.name: k for k, h in enumerate(ctx.graph.hidden)}
        out = []
        for t, vals in zip(traces, arrays):
            n = self._split(t)
            base = self._eps_view(t)
            d_out = step["d_out"][t.signal]
            for blk in param_blocks(ctx.graph, base):
                L = d_out[blk.gid]
                states = ctx.graph.group_by_id[blk.gid].states
                direct = jnp.stack(
                    [c if is_float(c) and jnp.ndim(c) else jnp.zeros(jnp.shape(L), L.dtype)
                     for c in (step["ct_hidden"][hid_pos[s]] for s in states)], axis=-1)
                dg = jnp.concatenate([direct.astype(L.dtype), L[..., None]], axis=-1)
                eps = blk.gather(ctx.binding, vals[:n], self.dense)
                bar = self._bar_tree(ctx, blk, t, vals, n)
                op, w = ctx.op(blk.op), ctx.w(blk.param)
                if self.dense:
                    eps_all = jax.tree.map(
                        lambda e, b, _nS=blk.nS: jnp.concatenate(
                            [e, jnp.expand_dims(b.astype(e.dtype), _nS)], axis=_nS), eps, bar)
                    bar_only = jax.tree.map(lambda b, _nS=blk.nS: jnp.expand_dims(b, _nS), bar)
                else:
                    eps_all, bar_only = list(eps) + [bar], [bar]

                def with_direct(eps_all=eps_all, dg=dg, op=op, w=w, blk=blk):
                    return contract_param(op, w, eps_all, dg, self.dense, blk.bshape)

                def without(bar_only=bar_only, L=L, op=op, w=w, blk=blk):
                    return contract_param(op, w, bar_only, L[..., None], self.dense, blk.bshape)
                # the states' own cotangent is zero unless the loss reads them: skip reading
                # the k eps arrays then (a trace-sized pass per step)
                grad = jax.lax.cond(jnp.any(direct != 0), with_direct, without)
                pi = ctx.binding.tparam_pos(blk.param)
                out.extend((pi, li, leaf) for li, leaf in enumerate(jax.tree.leaves(grad)))
        return out


class BlockScopeRule:
    """Mixin: a param-dim rule whose ``J`` is the per-neuron block of the full step Jacobian
    (``scope='block'``, from ``ctx.step['JB']``)."""
    needs_program = "block-jacobian"
    needs_program_why = ("computes the per-neuron block of the full step Jacobian "
                         "(scope=block)")

    def update(self, ctx, traces, arrays):
        JB = (ctx.step or {}).get("JB")
        if JB is None:
            raise BackendError(
                f"trace(s) {', '.join(t.id for t in traces)} have scope=block, but this "
                f"driver computes no block of the full step Jacobian (online_gradients("
                f"chunk=K>1), multi-step windows): run the learner one step per call")
        fwd = ctx.fwd
        c = dataclasses.replace(ctx, fwd=Forward(fwd.outs, fwd.xs, {**fwd.J, **JB}, fwd.DF,
                                                 fwd.PSI))
        return super().update(c, traces, arrays)


for _layout, _base in (("compact", ParamCompactRule), ("channel", ParamChannelRule),
                      ("dense", ParamDenseRule)):
    register_trace_rule("param", _layout, scope="block")(type(
        f"Param{_layout.title()}BlockRule", (BlockScopeRule, _base),
        {"name": f"param/{_layout} scope=block",
         "__doc__": f"D-RTRL ({_layout}) with J the per-neuron block of the full step "
                    f"Jacobian."}))

for _layout, _base in (("compact", ParamCompactRule), ("dense", ParamDenseRule)):
    for _rec in ("jacobian", "leak", "none"):
        _rec_axes = {} if _rec == "jacobian" else {"recursion": _rec}
        register_trace_rule("param", _layout, filter="kappa_out", **_rec_axes)(type(
            f"Param{_layout.title()}{_rec.title()}KappaOutRule", (KappaOutRule, _base),
            {"name": f"param/{_layout} filter=kappa_out" +
                     (f" recursion={_rec}" if _rec_axes else ""),
             "__doc__": f"D-RTRL ({_layout}, recursion={_rec}) with e-prop's filter at the "
                        f"neurons' outputs."}))

for _layout, _base in (("compact", ParamCompactRule), ("channel", ParamChannelRule),
                      ("dense", ParamDenseRule)):
    for _rec in ("jacobian", "leak", "none"):
        _rec_axes = {} if _rec == "jacobian" else {"recursion": _rec}
        if _rec != "jacobian":
            register_trace_rule("param", _layout, **_rec_axes)(type(
                f"Param{_layout.title()}{_rec.title()}Rule", (ParamRecursionRule, _base),
                {"name": f"param/{_layout} recursion={_rec}",
                 "__doc__": f"D-RTRL ({_layout}) with recursion={_rec}."}))
        register_trace_rule("param", _layout, filter="kappa", **_rec_axes)(type(
            f"Param{_layout.title()}{_rec.title()}KappaRule", (KappaFilterRule, _base),
            {"name": f"param/{_layout} filter=kappa" + (f" recursion={_rec}" if _rec_axes else ""),
             "__doc__": f"D-RTRL ({_layout}, recursion={_rec}) with e-prop's kappa filter."}))
for _rec in ("leak", "none"):
    register_trace_rule("io", recursion=_rec)(IORecursionRule)
