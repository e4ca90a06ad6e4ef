"""The backward of the compiled step: learning signals from one VJP of a dual evaluation.

The learning signal ``δ_g = ∂L^t/∂h_g^t`` comes from one VJP of ``Ω``, a dual evaluation of
the step: environment ``m`` computes the step as the model does, environment ``s`` computes
it with the trace-op outputs injected. At every new hidden value ``m`` continues with
``stop_gradient(h_m) + η + (h_s − stop_gradient(h_s))``, so ``∂/∂η`` is the derivative of the
loss w.r.t. ``h^t`` along every path leaving the state's group (later layers' trace ops,
readouts, ...) while paths into other states of the same group (already inside ``J``/``df``)
are not counted twice; plain parameters and inputs get their exact instantaneous gradient
through ``s``; a zero ``ζ_q`` added to each op output in ``m`` yields the instantaneous
signal of paths that reach the outputs without a hidden state (docs/design.md section 2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _compat as C
from .linearize import sg

__all__ = ["Signals", "is_float", "zero_cotangent", "FeedbackSignals", "full_vjp",
           "output_cotangents"]


def is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def zero_cotangent(x):
    if is_float(x):
        return jnp.zeros(jnp.shape(x), jnp.result_type(x))
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


class Signals:
    """Learning signals, instantaneous gradients and op VJPs of the step of ``graph``."""

    def __init__(self, graph, binding, linearizer):
        self.g = graph
        self.b = binding
        self.lin = linearizer
        self.jaxpr = linearizer.jaxpr
        self.none_ops = {graph.relation_by_id[rid].op for t in graph.traces if t.dim == "none"
                         for rid in t.relations}
        self.hid_pos = linearizer.hid_pos
        self.feedback: dict = {}     # op name -> fixed feedback leaves (FeedbackSignals)

    def omega(self, hidden, others):
        """Ω(η, ζ, θ_trace, θ_plain, args, ω) -> non-hidden outputs (see the module
        docstring); ``ω`` (optional, one per entry of ``lin.out_var``) is added to each group
        output ``z`` in ``m`` after the group's new values, so ``∂/∂ω = L = ∂L^t/∂z^t``
        (``filter=kappa_out``; every path of the group passes through ``z``)."""
        g, b = self.g, self.b
        none_ops = self.none_ops
        hidden_c = [sg(h) for h in hidden]
        others_c = [sg(o) if is_float(o) else o for o in others]
        op_pos = {o.name: q for q, o in enumerate(g.ops)}
        keep = list(range(b.n_out)) + list(b.other_out)
        lin, feedback = self.lin, self.feedback

        out_pos = {v: i for i, v in enumerate(self.lin.out_var.values())}

        def omega(eta, zeta, th_t, th_p, a, om=()):
            ins = b.assemble(th_t, th_p, a, hidden_c, others_c)
            jaxpr = lin.jaxpr
            env_m: dict = {}
            env_s: dict = {}
            for v, c in zip(jaxpr.constvars, lin.consts):
                env_m[v] = env_s[v] = c
            for v, x in zip(jaxpr.invars, ins):
                env_m[v] = env_s[v] = x

            def rd(env, v):
                return C.literal_value(v) if C.is_literal(v) else env[v]
            for ei, eqn in enumerate(jaxpr.eqns):
                o = lin.op_of_eqn.get(ei)
                if o is not None:
                    inv = [rd(env_m, v) for v in eqn.invars]
                    nx = o.n_x_leaves
                    w = inv[nx:] if o.name in none_ops else [sg(v) for v in inv[nx:]]
                    y = C.eval_eqn(eqn, inv[:nx] + w)[0]
                    if o.name in feedback and nx:
                        yb = C.eval_eqn(eqn, inv[:nx] + list(feedback[o.name]))[0]
                        y = sg(y) + (yb - sg(yb)).astype(y.dtype)
                    if o.x_elementwise:
                        # an element-wise path: in the s environment like any element-wise
                        # equation (its x paths are inside J / df, not counted twice)
                        x_s = [rd(env_s, v) for v in eqn.invars[:nx]]
                        env_s[eqn.outvars[0]] = C.eval_eqn(eqn, x_s + w)[0]
                    else:
                        env_s[eqn.outvars[0]] = y
                    env_m[eqn.outvars[0]] = y + zeta[op_pos[o.name]]
                elif ei in lin.cut_weight:
                    # a cut plain-weight map, like a trace op: the signal of the states
                    # feeding it flows through it to other groups (both environments)
                    outs = C.eval_eqn(eqn, [rd(env_m, v) for v in eqn.invars])
                    for v, a_ in zip(eqn.outvars, outs):
                        env_m[v] = env_s[v] = a_
                else:
                    outs_m = C.eval_eqn(eqn, [rd(env_m, v) for v in eqn.invars])
                    outs_s = C.eval_eqn(eqn, [rd(env_s, v) for v in eqn.invars])
                    for v, a_, b_ in zip(eqn.outvars, outs_m, outs_s):
                        env_m[v] = a_
                        env_s[v] = b_
                for v in eqn.outvars:
                    for k in lin.hid_of_var.get(v, ()):
                        hm, hs = env_m[v], env_s[v]
                        env_m[v] = sg(hm) + eta[k] + (hs - sg(hs))
                    if om and v in out_pos:
                        env_m[v] = env_m[v] + om[out_pos[v]]
            outs = [rd(env_m, v) for v in jaxpr.outvars]
            return tuple(outs[i] if is_float(outs[i]) else jnp.zeros(()) for i in keep)
        return omega

    def keep_avals(self):
        """Avals of the outputs Ω returns: the step's outputs, then other states' values."""
        outv = self.jaxpr.outvars
        keep = list(range(self.b.n_out)) + list(self.b.other_out)
        return [outv[i].aval for i in keep]

    def learning_signals(self, theta_t, theta_p, args, hidden, others, cts,
                         outputs: bool = False):
        """``(delta, d_zeta, g_t, g_p, g_a)``: δ per hidden state, the ζ-signal per op
        (``{op name: array}``), and the instantaneous gradients (``g_t`` as mutable lists);
        with ``outputs`` a sixth item, ``{group id: L}`` with ``L = ∂L^t/∂z^t`` at every
        group output of ``lin.out_var``."""
        ct_outs, ct_hidden, ct_others, _ct_traces = cts
        g = self.g
        omega = self.omega(hidden, others)
        eta0 = tuple(jnp.zeros_like(h) for h in hidden)
        zeta0 = tuple(jnp.zeros(o.type.shape, o.type.dtype) for o in g.ops)
        args_f = tuple(a if is_float(a) else sg(jnp.asarray(a)) for a in args)
        out_var = self.lin.out_var if outputs else {}
        om0 = tuple(jnp.zeros(v.aval.shape, v.aval.dtype) for v in out_var.values())
        _, vjp = jax.vjp(omega, eta0, zeta0, tuple(theta_t), tuple(theta_p), args_f, om0)
        keep_cts = tuple(ct_outs) + tuple(ct_others)
        keep_cts = tuple(c if is_float(c) and jnp.issubdtype(a.dtype, jnp.inexact) else jnp.zeros(())
                         for c, a in zip(keep_cts, self.keep_avals()))
        d_eta, d_zeta, g_t, g_p, g_a, d_om = vjp(keep_cts)
        delta = [de + (ch if is_float(ch) else 0.) for de, ch in zip(d_eta, ct_hidden)]
        d_zeta = {o.name: z for o, z in zip(g.ops, d_zeta)}
        if outputs:
            return (delta, d_zeta, [list(x) for x in g_t], g_p, g_a,
                    dict(zip(out_var, d_om)))
        return delta, d_zeta, [list(x) for x in g_t], g_p, g_a

    def group_delta(self, gid, delta):
        grp = self.g.group_by_id[gid]
        return jnp.stack([delta[self.hid_pos[s]] for s in grp.states], axis=-1)

    def group_delta_parts(self, gid, delta) -> list:
        """``[δ_i]``: the learning signal of each state of group ``gid`` (not stacked: a sum
        over the states then fuses with its consumer instead of writing the stack)."""
        return [delta[self.hid_pos[s]] for s in self.g.group_by_id[gid].states]

    def xy_to_dw_eqn(self, op_name, x, dy, w_leaves) -> list:
        """VJP w.r.t. the param leaves of the marker equation itself (the model's exact op).

        When the op's input is not floating point (e.g. boolean spikes), a float ``ε_x`` cannot
        be fed to the traced equation; the op's own ``xy_to_dw`` is used instead.
        """
        o = self.g.op_by_name[op_name]
        eqn = self.jaxpr.eqns[o.eqn]
        y_dtype = eqn.outvars[0].aval.dtype
        if x is not None and not jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.inexact) \
                and jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            grads = self.g.op_object(op_name).xy_to_dw(x, dy.astype(y_dtype),
                                                       self.b.w_tree(o.param, w_leaves))
            return [gr.astype(jnp.result_type(w)) for gr, w in zip(jax.tree.leaves(grads), w_leaves)]
        xs = [x] if x is not None else []
        _, vjp = jax.vjp(lambda *w: C.eval_eqn(eqn, xs + list(w))[0], *w_leaves)
        return list(vjp(dy.astype(y_dtype)))

    def direct_grads(self, theta_t, xs, d_zeta) -> list:
        """Instantaneous terms of paths reaching the outputs without a hidden state:
        ``[(param position, leaf index, gradient), ...]``."""
        out = []
        for r in self.g.relations:
            if not r.direct or r.op in self.none_ops:
                continue
            pi = self.b.tparam_pos(r.param)
            o = self.g.op_by_name[r.op]
            grads = self.xy_to_dw_eqn(r.op, xs[r.op] if o.n_x_leaves else None, d_zeta[r.op],
                                      theta_t[pi])
            out.extend((pi, li, leaf) for li, leaf in enumerate(grads))
        return out


# -- additions for the rules of brainscale.zoo (jax-zoo backend) -----------------------------
def output_cotangents(binding, jaxpr, cts, extra_hidden=None) -> tuple:
    """Cotangents of every jaxpr output from the step's ``(ct_outs, ct_hidden, ct_others, _)``
    (parameter outputs and non-float outputs get zeros); ``extra_hidden`` is added to the
    hidden states' cotangents (a synthetic gradient)."""
    ct_outs, ct_hidden, ct_others, _ = cts
    outv = jaxpr.outvars
    out = [zero_cotangent_aval(v.aval) for v in outv]
    for i in range(binding.n_out):
        out[i] = _ct(ct_outs[i], outv[i].aval)
    for k, i in enumerate(binding.hidden_out):
        c = _ct(ct_hidden[k], outv[i].aval)
        if extra_hidden is not None:
            c = c + extra_hidden[k].astype(c.dtype)
        out[i] = c
    for c, i in zip(ct_others, binding.other_out):
        out[i] = _ct(c, outv[i].aval)
    return tuple(out)


def zero_cotangent_aval(aval):
    if jnp.issubdtype(aval.dtype, jnp.inexact):
        return jnp.zeros(aval.shape, aval.dtype)
    return np.zeros(aval.shape, dtype=jax.dtypes.float0)


def _ct(c, aval):
    if not jnp.issubdtype(aval.dtype, jnp.inexact):
        return np.zeros(aval.shape, dtype=jax.dtypes.float0)
    if not is_float(c):
        return jnp.zeros(aval.shape, aval.dtype)
    return jnp.broadcast_to(jnp.asarray(c, aval.dtype), aval.shape)


def full_vjp(lin, theta_t, theta_p, args, hidden, others, out_cts):
    """``(dh_prev, dtheta_t)``: the VJP of the whole step (every path kept) in the old hidden
    states and the trace parameters, for the cotangents of all jaxpr outputs: with the step's
    cotangents, ``dtheta_t`` is ``∂L^t/∂θ`` at fixed ``h^{t-1}`` and ``dh_prev`` is
    ``∂L^t/∂h^{t-1}`` (the exact rules add ``dh_prev · M^{t-1}``)."""
    from .linearize import step_function
    F = step_function(lin, theta_p, args, others)
    _, f = jax.vjp(F, tuple(hidden), tuple(tuple(t) for t in theta_t))
    return f(tuple(out_cts))


class FeedbackSignals(Signals):
    """Learning signals through fixed random feedback weights (``signal=random``).

    In the dual evaluation every op with an input computes ``y = op(x, θ)`` in value, but its
    derivative in ``x`` is that of ``op(x, B)`` with the op's fixed random feedback weights
    ``B`` (feedback alignment, as e-prop's random broadcast ``B_jk`` replaces ``W_out^T``):
    ``y = sg(op(x, θ)) + op(x, B) − sg(op(x, B))``. ``feedback`` maps op names to the list of
    ``B`` leaves (shaped like the op's parameter leaves); ops must be linear in ``x``.
    """

    def __init__(self, graph, binding, linearizer, feedback: dict):
        super().__init__(graph, binding, linearizer)
        self.feedback = feedback
