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

The learning-signal axis is not a rule's business: the step computes ``δ`` as the trace's
``signal`` says (symmetric on every backend; random feedback, a modulator or a synthetic
gradient on ``jax-zoo``) and the rule contracts it with its arrays.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .linearize import Forward
from .rules import (IORule, ParamChannelRule, ParamCompactRule, ParamDenseRule,
                    register_trace_rule)

__all__ = ["with_recursion", "ParamRecursionRule", "IORecursionRule", "KappaFilterRule"]


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
            tt = dataclasses.replace(t, decay=0.0) if t.recursion == "none" else t
            c = with_recursion(ctx, dataclasses.replace(t, decay=1.0)) \
                if t.recursion == "leak" else with_recursion(ctx, t)
            out.append(IORule.update(self, c, [tt], [vals])[0])
        return out


class KappaFilterRule:
    """Mixin: e-prop's filtered trace. The first half of the arrays is ``ε`` (the base rule's
    arrays), the second half ``ē``; the gradient contracts ``ē``."""

    @staticmethod
    def _split(trace) -> int:
        return sum(1 for a in trace.arrays if a.role == "eps")

    @staticmethod
    def _eps_view(trace):
        n = sum(1 for a in trace.arrays if a.role == "eps")
        return dataclasses.replace(trace, arrays=trace.arrays[:n], filter="none", kappa=None)

    def update(self, ctx, traces, arrays):
        out = []
        for t, vals in zip(traces, arrays):
            n = self._split(t)
            base = self._eps_view(t)
            new_eps = super().update(with_recursion(ctx, t), [base], [list(vals[:n])])[0]
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
