"""The multi-step learning signal (``vjp_method='multi-step'``, brainscale 0.1's name).

A window of ``k`` steps ``t0+1 … t0+k`` runs in one call. Its custom VJP gives the exact
gradient of the window's losses with the state ``h^{t0}`` at the window start held fixed
(back-propagation through the ``k`` steps), plus the credit from before the window through the
eligibility traces kept at ``t0``:

    ∂L/∂θ = ∂L/∂θ |_{h^{t0}}  +  Σ_g  trace_grad(ε^{t0}, δ^{t0}),    δ^{t0} = ∂L/∂h^{t0},

where ``trace_grad`` is the rule of each trace (D-RTRL: ``Σ_i yw_to_w(δ_i, ε_i)``, ES-D-RTRL:
``xy_to_dw(ε_x, Σ_i ε_f,i δ_i)``). The traces are advanced over the window as usual, so the
next window starts from ``ε^{t0+k}``. With zero traces (the first window) this is exact
truncated BPTT; where the traces are exact (D-RTRL on a single layer without recurrent
weights) it equals BPTT over the whole sequence. Memory grows with ``k``, not with the
sequence.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _compat as C
from .signals import is_float, zero_cotangent

__all__ = ["make_window"]


def make_window(prog, multi_mask: tuple):
    """The jitted window function of a compiled step's :class:`~.step.Program`.

    ``multi_mask[i]`` says whether argument leaf ``i`` has the leading window axis. The
    function maps ``(theta_t, theta_p, args, hidden, others, traces)`` (``args``: the leaves,
    multi-step ones with the window axis) to ``(outs, new_hidden, new_others, new_traces)``
    with ``outs`` stacked over the window and the rest as after the last step.
    """
    b, lin = prog.b, prog.lin

    def split(args):
        multi = tuple(a for a, m in zip(args, multi_mask) if m)
        single = tuple(a for a, m in zip(args, multi_mask) if not m)
        return multi, single

    def merge(multi_t, single):
        it_m, it_s = iter(multi_t), iter(single)
        return tuple(next(it_m) if m else next(it_s) for m in multi_mask)

    def forward(theta_t, theta_p, args, hidden, others, traces):
        multi, single = split(args)

        def body(carry, multi_t):
            h, o, tr, _ = carry
            (outs, new_h, new_o, new_tr), _fwd = prog.forward(theta_t, theta_p,
                                                              merge(multi_t, single), h, o, tr)
            return (tuple(new_h), b.carry_others(o, new_o), tuple(new_tr), tuple(new_o)), outs
        new_o0 = _other_outs_like(b, others)
        (h, _o, tr, new_o), outs = jax.lax.scan(body, (tuple(hidden), tuple(others),
                                                       tuple(traces), new_o0), multi)
        return tuple(outs), h, new_o, tr

    def plain(theta_t, theta_p, multi, single, hidden, others):
        """The model alone over the window (no traces): outputs and last hidden values."""
        def body(carry, multi_t):
            h, o = carry
            ins = b.assemble(theta_t, theta_p, merge(multi_t, single), h, o)
            outs = lin.eval(ins)
            new_o = tuple(outs[i] for i in b.other_out)
            return (tuple(outs[i] for i in b.hidden_out), b.carry_others(o, new_o)), \
                tuple(outs[:b.n_out])
        (h, _o), outs = jax.lax.scan(body, (tuple(hidden), tuple(others)), multi)
        return outs, h

    @jax.custom_vjp
    def window(theta_t, theta_p, args, hidden, others, traces):
        return forward(theta_t, theta_p, args, hidden, others, traces)

    def fwd(theta_t, theta_p, args, hidden, others, traces):
        res = (theta_t, theta_p, args, hidden, others, traces)
        return forward(*res), res

    def bwd(res, cts):
        theta_t, theta_p, args, hidden, others, traces = res
        ct_outs, ct_hidden, _ct_others, _ct_traces = cts
        multi, single = split(args)
        f_multi = tuple(is_float(a) for a in multi)
        f_single = tuple(is_float(a) for a in single)

        def diff(th_t, th_p, m_f, s_f, h0):
            it_m, it_s = iter(m_f), iter(s_f)
            m = tuple(next(it_m) if f else a for a, f in zip(multi, f_multi))
            s = tuple(next(it_s) if f else a for a, f in zip(single, f_single))
            return plain(th_t, th_p, m, s, h0, others)
        m_f = tuple(a for a, f in zip(multi, f_multi) if f)
        s_f = tuple(a for a, f in zip(single, f_single) if f)
        (outs, h_last), vjp = jax.vjp(diff, theta_t, theta_p, m_f, s_f, tuple(hidden))
        ct_o = tuple(c if is_float(o) and is_float(c) else jnp.zeros_like(o) if is_float(o)
                     else zero_cotangent(o) for c, o in zip(ct_outs, outs))
        ct_h = tuple(c if is_float(c) else jnp.zeros_like(h) for c, h in zip(ct_hidden, h_last))
        g_t, g_p, g_m, g_s, delta0 = vjp((ct_o, ct_h))
        # the credit from before the window, through the traces at its start
        g_t = [list(x) for x in g_t]
        prog.add_grads(g_t, prog.trace_grads(prog.context(theta_t), list(traces), list(delta0)))
        it_m, it_s = iter(g_m), iter(g_s)
        ct_multi = [next(it_m) if f else zero_cotangent(a) for a, f in zip(multi, f_multi)]
        ct_single = [next(it_s) if f else zero_cotangent(a) for a, f in zip(single, f_single)]
        ct_args = merge(ct_multi, ct_single)
        return (tuple(tuple(x) for x in g_t), tuple(tuple(x) for x in g_p), tuple(ct_args),
                tuple(zero_cotangent(h) for h in hidden),
                tuple(zero_cotangent(o) for o in others),
                tuple(zero_cotangent(t) for t in traces))

    window.defvjp(fwd, bwd)
    return jax.jit(window)


def _other_outs_like(b, others) -> tuple:
    """Zeros shaped like the step's ``new_others`` outputs (the scan carry's initial value)."""
    jaxpr_out = C.open_jaxpr(b.info.jaxpr).outvars
    return tuple(jnp.zeros(jaxpr_out[i].aval.shape, jaxpr_out[i].aval.dtype) for i in b.other_out)
