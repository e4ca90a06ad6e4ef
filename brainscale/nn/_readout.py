"""Readout layers: a leaky rate integrator and a leaky spiking neuron, each with a trace op.

Both readouts own their input weight (an :class:`brainscale.ETraceParam` with
:class:`brainscale.MatMulOp`) and a hidden state (``r`` or ``V``, ``k=1``), so the readout
weight gets an eligibility trace like any other layer.
"""
from __future__ import annotations

from typing import Callable, Optional

import braintools
import brainstate
import brainunit as u
import jax

from ..concepts import ETraceParam, ETraceState
from ..ops import MatMulOp
from ._base import Neuron, to_size

__all__ = ["LeakyRateReadout", "LeakySpikeReadout"]


_R_INIT = braintools.init.ZeroInit()
_V_INIT = braintools.init.ZeroInit(unit=u.mV)


def _one_of(cls, name, value, default, alias, alias_value):
    """0.1's keyword ``name`` or this package's earlier ``alias`` (not both)."""
    if alias_value is None:
        return value
    if value is not default:
        raise TypeError(f"{cls}: give {name}= or {alias}=, not both")
    return alias_value


class LeakyRateReadout(brainstate.nn.Module):
    r"""Leaky rate readout ``r' = e^{-dt/τ} r + x W``; returns ``r'``.

    Args:
        in_size, out_size: sizes (last entries are the feature counts).
        tau: time constant (the decay uses ``brainstate.environ.get_dt()`` at call time).
        w_init: initializer of ``W`` (``(n_in, n_out)``).
        r_init: initializer of the state ``r`` (0.1's keyword; ``r_initializer`` is
            accepted as well).
        name: module name.

    Hidden state ``r`` (``k=1``), weight ``self.weight_op = ETraceParam({'weight': W},
    MatMulOp())``.

    Example::

        >>> ro = brainscale.nn.LeakyRateReadout(4, 2, tau=5. * u.ms)
        >>> _ = brainstate.nn.init_all_states(ro)
        >>> with brainstate.environ.context(dt=1. * u.ms):
        ...     ro(jnp.ones(4)).shape
        (2,)
    """

    def __init__(self, in_size, out_size, tau=5. * u.ms,
                 w_init: Callable = braintools.init.KaimingNormal(),
                 r_init: Callable = _R_INIT,
                 name: Optional[str] = None, *, r_initializer: Optional[Callable] = None):
        super().__init__(name=name)
        r_initializer = _one_of("LeakyRateReadout", "r_init", r_init, _R_INIT, "r_initializer",
                                r_initializer)
        self.in_size = to_size(in_size, "in_size")
        self.out_size = to_size(out_size, "out_size")
        self.tau = braintools.init.param(tau, self.out_size)
        self.r_init = self.r_initializer = r_initializer
        weight = braintools.init.param(w_init, (self.in_size[-1], self.out_size[-1]),
                                       allow_none=False)
        self.weight_op = ETraceParam({"weight": weight}, MatMulOp())

    @property
    def decay(self):
        return u.math.exp(-brainstate.environ.get_dt() / self.tau)

    def init_state(self, batch_size: int = None, **kwargs):
        self.r = ETraceState(braintools.init.param(self.r_initializer, self.out_size, batch_size))

    def reset_state(self, batch_size: int = None, **kwargs):
        self.r.value = braintools.init.param(self.r_initializer, self.out_size, batch_size)

    def update(self, x):
        r = self.decay * self.r.value + self.weight_op.execute(x)
        self.r.value = r
        return r


class LeakySpikeReadout(Neuron):
    r"""Leaky spiking readout: a LIF neuron group driven by its own weight.

    .. math:: τ \dot V = -V + x W, \qquad z = \mathcal H((V - V_{th}) / V_{th})

    Returns the (surrogate) spikes; ``self.spike`` gives the spikes of the current state.
    Hidden state ``V`` (``k=1``), initialised by ``V_init`` (0.1's keyword;
    ``V_initializer`` is accepted as well); the weight is
    ``self.weight_op = ETraceParam({'weight': W}, MatMulOp())`` with ``W`` in mV by default.

    Example::

        >>> ro = brainscale.nn.LeakySpikeReadout(4, 2, tau=5. * u.ms)
        >>> _ = brainstate.nn.init_all_states(ro)
        >>> with brainstate.environ.context(dt=1. * u.ms):
        ...     ro(jnp.ones(4)).shape
        (2,)
    """

    def __init__(self, in_size, out_size, tau=5. * u.ms, V_th=1. * u.mV,
                 w_init: Callable = braintools.init.KaimingNormal(unit=u.mV),
                 V_init: Callable = _V_INIT,
                 spk_fun: Callable = braintools.surrogate.ReluGrad(), spk_reset: str = "soft",
                 name: Optional[str] = None, *, V_initializer: Optional[Callable] = None):
        V_initializer = _one_of("LeakySpikeReadout", "V_init", V_init, _V_INIT, "V_initializer",
                                V_initializer)
        out = to_size(out_size, "out_size")
        super().__init__(out, spk_fun=spk_fun, spk_reset=spk_reset, name=name)
        self.in_size = to_size(in_size, "in_size")
        self.out_size = out
        self.tau = braintools.init.param(tau, self.varshape)
        self.V_th = braintools.init.param(V_th, self.varshape)
        self.V_init = self.V_initializer = V_initializer
        weight = braintools.init.param(w_init, (self.in_size[-1], out[-1]), allow_none=False)
        self.weight_op = ETraceParam({"weight": weight}, MatMulOp())

    @property
    def varshape(self):
        """The neuron shape (``out_size``)."""
        return self.out_size

    def init_state(self, batch_size: int = None, **kwargs):
        self.V = ETraceState(braintools.init.param(self.V_initializer, self.varshape, batch_size))

    def reset_state(self, batch_size: int = None, **kwargs):
        self.V.value = braintools.init.param(self.V_initializer, self.varshape, batch_size)

    @property
    def spike(self):
        """The (surrogate) spikes of the current state (0.1's property)."""
        return self.get_spike(self.V.value)

    def get_spike(self, V=None):
        V = self.V.value if V is None else V
        return self.spk_fun((V - self.V_th) / self.V_th)

    def update(self, x):
        last_v = self.V.value
        last_spk = self.get_spike(last_v)
        V_th = self.V_th if self.spk_reset == "soft" else jax.lax.stop_gradient(last_v)
        V = last_v - V_th * last_spk
        y = self.weight_op.execute(x)
        dv = lambda v: (-v + self.sum_current_inputs(y, v)) / self.tau
        V = self.sum_delta_inputs(brainstate.nn.exp_euler_step(dv, V))
        self.V.value = V
        return self.get_spike(V)
