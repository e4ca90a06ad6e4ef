"""Spiking neuron models: IF, LIF, ALIF, GIF, Izhikevich.

Every neuron is element-wise over its neurons (the model class of the compiler): its hidden
states (:class:`brainscale.ETraceState`) form one hidden group of ``k`` states per neuron
(LIF/IF: ``k=1``; ALIF, Izhikevich: ``k=2``; GIF: ``k=4``). Inputs arrive through the
projections' current/delta inputs (or the ``x`` argument of ``update``); the only
interactions between neurons are the trace ops of the layers feeding them.

ODEs are integrated with ``brainstate.nn.exp_euler_step`` with the step
``brainstate.environ.get_dt()``, so models run inside
``with brainstate.environ.context(dt=0.1 * u.ms):``. Units follow brainpy.state: time
constants in ms, potentials in mV, resistance in ohm, currents in mA.
"""
from __future__ import annotations

from typing import Callable, Optional

import braintools
import brainstate
import brainunit as u
import jax
import jax.numpy as jnp

from ..concepts import ETraceState
from ._base import Neuron

__all__ = ["IF", "LIF", "ALIF", "GIF", "Izhikevich"]


def _state(init, varshape, batch_size):
    return ETraceState(braintools.init.param(init, varshape, batch_size))


class IF(Neuron):
    r"""Integrate-and-fire neuron ``tau dV/dt = -V + R I``; spikes when ``V > V_th``.

    Hidden states: ``V`` (group of ``k=1``). Soft reset subtracts ``V_th``; hard reset
    subtracts ``V`` itself (gradient stopped), i.e. resets to 0.

    Example::

        >>> neu = brainscale.nn.IF(4, tau=5. * u.ms)
        >>> _ = brainstate.nn.init_all_states(neu)
        >>> with brainstate.environ.context(dt=0.1 * u.ms):
        ...     neu(5. * u.mA).shape
        (4,)
    """

    def __init__(self, in_size, R=1. * u.ohm, tau=5. * u.ms, V_th=1. * u.mV,
                 V_initializer: Callable = braintools.init.Constant(0. * u.mV),
                 spk_fun: Callable = braintools.surrogate.ReluGrad(), spk_reset: str = "soft",
                 name: Optional[str] = None):
        super().__init__(in_size, spk_fun=spk_fun, spk_reset=spk_reset, name=name)
        self.R = braintools.init.param(R, self.varshape)
        self.tau = braintools.init.param(tau, self.varshape)
        self.V_th = braintools.init.param(V_th, self.varshape)
        self.V_initializer = V_initializer

    def init_state(self, batch_size: int = None, **kwargs):
        self.V = _state(self.V_initializer, self.varshape, batch_size)

    def reset_state(self, batch_size: int = None, **kwargs):
        self.V.value = braintools.init.param(self.V_initializer, self.varshape, batch_size)

    def get_spike(self, V=None):
        V = self.V.value if V is None else V
        return self.spk_fun((V - self.V_th) / self.V_th)

    def update(self, x=0. * u.mA):
        last_v = self.V.value
        last_spk = self.get_spike(last_v)
        V_th = self.V_th if self.spk_reset == "soft" else jax.lax.stop_gradient(last_v)
        V = last_v - V_th * last_spk
        dv = lambda v: (-v + self.R * self.sum_current_inputs(x, v)) / self.tau
        V = brainstate.nn.exp_euler_step(dv, V)
        V = self.sum_delta_inputs(V)
        self.V.value = V
        return self.get_spike(V)


class LIF(Neuron):
    r"""Leaky integrate-and-fire neuron (the seed's LIF).

    .. math:: \tau \frac{dV}{dt} = -V + V_{rest} + R I, \qquad
              z = \mathcal{H}\!\left(\frac{V - V_{th}}{V_{th} - V_{reset}}\right)

    Hidden states: ``V`` (group of ``k=1``). Reset at the start of the next step: soft
    (``V -= (V_th - V_reset) z``) or hard (``V -= (V - V_reset) z`` with the gradient of
    ``V`` in the reset term stopped). Delta inputs (``DeltaProj``) are added to ``V`` after
    integration; current inputs (``CurrentProj`` / ``AlignPostProj``) enter ``R I``.

    Args (seed signature): ``in_size``, ``R``, ``tau``, ``V_th``, ``V_reset``, ``V_rest``,
    ``V_initializer``, ``spk_fun``, ``spk_reset``, ``name``.

    Example::

        >>> neu = brainscale.nn.LIF(4, tau=5. * u.ms, V_th=1. * u.mV, spk_reset='hard')
        >>> _ = brainstate.nn.init_all_states(neu, batch_size=2)
        >>> with brainstate.environ.context(dt=0.1 * u.ms):
        ...     neu(20. * u.mA).shape
        (2, 4)
    """

    def __init__(self, in_size, R=1. * u.ohm, tau=5. * u.ms, V_th=1. * u.mV,
                 V_reset=0. * u.mV, V_rest=0. * u.mV,
                 V_initializer: Callable = braintools.init.Constant(0. * u.mV),
                 spk_fun: Callable = braintools.surrogate.ReluGrad(), spk_reset: str = "soft",
                 name: Optional[str] = None):
        super().__init__(in_size, spk_fun=spk_fun, spk_reset=spk_reset, name=name)
        self.R = braintools.init.param(R, self.varshape)
        self.tau = braintools.init.param(tau, self.varshape)
        self.V_th = braintools.init.param(V_th, self.varshape)
        self.V_rest = braintools.init.param(V_rest, self.varshape)
        self.V_reset = braintools.init.param(V_reset, self.varshape)
        self.V_initializer = V_initializer

    def init_state(self, batch_size: int = None, **kwargs):
        self.V = _state(self.V_initializer, self.varshape, batch_size)

    def reset_state(self, batch_size: int = None, **kwargs):
        self.V.value = braintools.init.param(self.V_initializer, self.varshape, batch_size)

    def get_spike(self, V=None):
        V = self.V.value if V is None else V
        return self.spk_fun((V - self.V_th) / (self.V_th - self.V_reset))

    def update(self, x=0. * u.mA):
        last_v = self.V.value
        last_spk = self.get_spike(last_v)
        V_th = self.V_th if self.spk_reset == "soft" else jax.lax.stop_gradient(last_v)
        V = last_v - (V_th - self.V_reset) * last_spk
        dv = lambda v: (-v + self.V_rest + self.R * self.sum_current_inputs(x, v)) / self.tau
        V = brainstate.nn.exp_euler_step(dv, V)
        V = self.sum_delta_inputs(V)
        self.V.value = V
        return self.get_spike(V)


class ALIF(Neuron):
    r"""Adaptive LIF: a LIF whose threshold rises by ``beta * a`` after each spike.

    .. math:: \tau \dot V = -V + V_{rest} + R I, \quad \tau_a \dot a = -a, \quad
              a \leftarrow a + z, \quad
              z = \mathcal{H}\!\left(\frac{V - V_{th} - \beta a}{V_{th} - V_{reset}}\right)

    Hidden states: ``V`` and ``a``, coupled per neuron through the spike: one hidden group
    of ``k=2``.

    Example::

        >>> neu = brainscale.nn.ALIF(4, tau=5. * u.ms, tau_a=50. * u.ms)
        >>> _ = brainstate.nn.init_all_states(neu)
        >>> with brainstate.environ.context(dt=0.1 * u.ms):
        ...     neu(20. * u.mA).shape
        (4,)
    """

    def __init__(self, in_size, R=1. * u.ohm, tau=5. * u.ms, tau_a=100. * u.ms,
                 V_th=1. * u.mV, V_reset=0. * u.mV, V_rest=0. * u.mV, beta=0.1 * u.mV,
                 spk_fun: Callable = braintools.surrogate.ReluGrad(), spk_reset: str = "soft",
                 V_initializer: Callable = braintools.init.Constant(0. * u.mV),
                 a_initializer: Callable = braintools.init.Constant(0.),
                 name: Optional[str] = None):
        super().__init__(in_size, spk_fun=spk_fun, spk_reset=spk_reset, name=name)
        self.R = braintools.init.param(R, self.varshape)
        self.tau = braintools.init.param(tau, self.varshape)
        self.tau_a = braintools.init.param(tau_a, self.varshape)
        self.V_th = braintools.init.param(V_th, self.varshape)
        self.V_reset = braintools.init.param(V_reset, self.varshape)
        self.V_rest = braintools.init.param(V_rest, self.varshape)
        self.beta = braintools.init.param(beta, self.varshape)
        self.V_initializer = V_initializer
        self.a_initializer = a_initializer

    def init_state(self, batch_size: int = None, **kwargs):
        self.V = _state(self.V_initializer, self.varshape, batch_size)
        self.a = _state(self.a_initializer, self.varshape, batch_size)

    def reset_state(self, batch_size: int = None, **kwargs):
        self.V.value = braintools.init.param(self.V_initializer, self.varshape, batch_size)
        self.a.value = braintools.init.param(self.a_initializer, self.varshape, batch_size)

    def get_spike(self, V=None, a=None):
        V = self.V.value if V is None else V
        a = self.a.value if a is None else a
        return self.spk_fun((V - self.V_th - self.beta * a) / (self.V_th - self.V_reset))

    def update(self, x=0. * u.mA):
        last_v, last_a = self.V.value, self.a.value
        last_spk = self.get_spike(last_v, last_a)
        V_th = self.V_th if self.spk_reset == "soft" else jax.lax.stop_gradient(last_v)
        V = last_v - (V_th - self.V_reset) * last_spk
        a = last_a + last_spk
        dv = lambda v: (-v + self.V_rest + self.R * self.sum_current_inputs(x, v)) / self.tau
        V = brainstate.nn.exp_euler_step(dv, V)
        a = brainstate.nn.exp_euler_step(lambda a_: -a_ / self.tau_a, a)
        self.V.value = self.sum_delta_inputs(V)
        self.a.value = a
        return self.get_spike(self.V.value, self.a.value)


class GIF(Neuron):
    r"""Generalised integrate-and-fire neuron (Mihalas & Niebur 2009).

    .. math::
        \tau \dot V &= -(V - V_{rest}) + R (I_1 + I_2 + I), \qquad
        \dot I_j = -k_j I_j, \\
        \dot\theta &= a (V - V_{rest}) - b (\theta - \theta_\infty), \qquad
        z = \mathcal{H}\!\left(\frac{V - \theta}{\theta - V_{reset}}\right)

    On a spike: ``V`` is reset (soft: ``V -= (θ - V_reset) z``), ``I_j ← R_j I_j + A_j`` and
    ``θ ← max(θ_reset, θ)``. Hidden states ``V``, ``I1``, ``I2`` and ``V_th`` (θ) are coupled
    per neuron: one hidden group of ``k=4``.

    Example::

        >>> neu = brainscale.nn.GIF(4)
        >>> _ = brainstate.nn.init_all_states(neu)
        >>> with brainstate.environ.context(dt=0.1 * u.ms):
        ...     neu(2. * u.mA).shape
        (4,)
    """

    def __init__(self, in_size, R=20. * u.ohm, tau=20. * u.ms, V_rest=-70. * u.mV,
                 V_reset=-70. * u.mV, V_th_inf=-50. * u.mV, V_th_reset=-60. * u.mV,
                 V_th_initializer: Callable = braintools.init.Constant(-50. * u.mV),
                 a=0. / u.ms, b=0.01 / u.ms, k1=0.2 / u.ms, k2=0.02 / u.ms,
                 R1=0., R2=1., A1=0. * u.mA, A2=0. * u.mA,
                 V_initializer: Callable = braintools.init.Constant(-70. * u.mV),
                 I1_initializer: Callable = braintools.init.Constant(0. * u.mA),
                 I2_initializer: Callable = braintools.init.Constant(0. * u.mA),
                 spk_fun: Callable = braintools.surrogate.ReluGrad(), spk_reset: str = "soft",
                 name: Optional[str] = None):
        super().__init__(in_size, spk_fun=spk_fun, spk_reset=spk_reset, name=name)
        p = lambda v: braintools.init.param(v, self.varshape)  # noqa: E731
        self.R, self.tau, self.V_rest, self.V_reset = p(R), p(tau), p(V_rest), p(V_reset)
        self.V_th_inf, self.V_th_reset = p(V_th_inf), p(V_th_reset)
        self.a, self.b, self.k1, self.k2 = p(a), p(b), p(k1), p(k2)
        self.R1, self.R2, self.A1, self.A2 = p(R1), p(R2), p(A1), p(A2)
        self.V_initializer = V_initializer
        self.I1_initializer = I1_initializer
        self.I2_initializer = I2_initializer
        self.V_th_initializer = V_th_initializer

    def _inits(self):
        return (("V", self.V_initializer), ("I1", self.I1_initializer),
                ("I2", self.I2_initializer), ("V_th", self.V_th_initializer))

    def init_state(self, batch_size: int = None, **kwargs):
        for name, init in self._inits():
            setattr(self, name, _state(init, self.varshape, batch_size))

    def reset_state(self, batch_size: int = None, **kwargs):
        for name, init in self._inits():
            getattr(self, name).value = braintools.init.param(init, self.varshape, batch_size)

    def get_spike(self, V=None, V_th=None):
        V = self.V.value if V is None else V
        V_th = self.V_th.value if V_th is None else V_th
        return self.spk_fun((V - V_th) / (V_th - self.V_reset))

    def update(self, x=0. * u.mA):
        last_v, last_i1, last_i2, last_th = (self.V.value, self.I1.value, self.I2.value,
                                             self.V_th.value)
        spk = self.get_spike(last_v, last_th)
        th = last_th if self.spk_reset == "soft" else jax.lax.stop_gradient(last_v)
        V = last_v - (th - self.V_reset) * spk
        I1 = last_i1 + spk * (self.R1 * last_i1 + self.A1 - last_i1)
        I2 = last_i2 + spk * (self.R2 * last_i2 + self.A2 - last_i2)
        V_th = last_th + spk * (u.math.maximum(self.V_th_reset, last_th) - last_th)
        I1 = brainstate.nn.exp_euler_step(lambda i: -self.k1 * i, I1)
        I2 = brainstate.nn.exp_euler_step(lambda i: -self.k2 * i, I2)
        V_th = brainstate.nn.exp_euler_step(
            lambda t: self.a * (V - self.V_rest) - self.b * (t - self.V_th_inf), V_th)
        dv = lambda v: (-(v - self.V_rest) + self.R * (I1 + I2 + self.sum_current_inputs(x, v))
                        ) / self.tau
        V = self.sum_delta_inputs(brainstate.nn.exp_euler_step(dv, V))
        self.V.value, self.I1.value, self.I2.value, self.V_th.value = V, I1, I2, V_th
        return self.get_spike(V, V_th)


class Izhikevich(Neuron):
    r"""Izhikevich neuron.

    .. math:: \dot V = 0.04 V^2 + 5 V + 140 - u + I, \qquad \dot u = a (b V - u)

    (``V`` in mV, time in ms). A spike (``V > V_th``) resets ``V`` to ``c`` and adds ``d``
    to ``u``. Hidden states ``V`` and ``u``: one hidden group of ``k=2``. The default reset
    is ``'hard'`` (``V ← c`` through ``where``); with ``spk_reset='soft'`` the reset is
    differentiable: ``V -= (V - c) z`` with ``V`` in the reset term not stopped.

    Example::

        >>> neu = brainscale.nn.Izhikevich(4)
        >>> _ = brainstate.nn.init_all_states(neu)
        >>> with brainstate.environ.context(dt=0.1 * u.ms):
        ...     neu(10. * u.mV / u.ms).shape
        (4,)
    """

    def __init__(self, in_size, a=0.02 / u.ms, b=0.2 / u.ms, c=-65. * u.mV,
                 d=8. * u.mV / u.ms, V_th=30. * u.mV,
                 V_initializer: Callable = braintools.init.Constant(-65. * u.mV),
                 u_initializer: Callable = braintools.init.Constant(0. * u.mV / u.ms),
                 spk_fun: Callable = braintools.surrogate.ReluGrad(), spk_reset: str = "hard",
                 name: Optional[str] = None):
        super().__init__(in_size, spk_fun=spk_fun, spk_reset=spk_reset, name=name)
        p = lambda v: braintools.init.param(v, self.varshape)  # noqa: E731
        self.a, self.b, self.c, self.d, self.V_th = p(a), p(b), p(c), p(d), p(V_th)
        self.p1 = 0.04 / (u.ms * u.mV)
        self.p2 = 5. / u.ms
        self.p3 = 140. * u.mV / u.ms
        self.V_initializer = V_initializer
        self.u_initializer = u_initializer

    def init_state(self, batch_size: int = None, **kwargs):
        self.V = _state(self.V_initializer, self.varshape, batch_size)
        self.u = _state(self.u_initializer, self.varshape, batch_size)

    def reset_state(self, batch_size: int = None, **kwargs):
        self.V.value = braintools.init.param(self.V_initializer, self.varshape, batch_size)
        self.u.value = braintools.init.param(self.u_initializer, self.varshape, batch_size)

    def get_spike(self, V=None):
        V = self.V.value if V is None else V
        return self.spk_fun((V - self.V_th) / self.V_th)

    def update(self, x=0. * u.mV / u.ms):
        last_v, last_u = self.V.value, self.u.value
        spk = self.get_spike(last_v)
        if self.spk_reset == "hard":
            # a full array for c: a scalar reaches the jitted ``where`` as a literal argument,
            # which brainscale 0.2.0's first jaxpr inliner could not handle
            c = self.c * jnp.ones(u.math.shape(last_v), u.math.get_dtype(u.get_mantissa(last_v)))
            V = u.math.where(spk > 0., c, last_v)
        else:
            V = last_v - (last_v - self.c) * spk
        u_val = last_u + self.d * spk

        def dv(v):
            return (self.p1 * v * v + self.p2 * v + self.p3 - u_val
                    + self.sum_current_inputs(x, v))

        V_new = self.sum_delta_inputs(brainstate.nn.exp_euler_step(dv, V))
        # as brainpy.state: the recovery variable sees the updated potential
        u_new = brainstate.nn.exp_euler_step(lambda w: self.a * (self.b * V_new - w), u_val)
        self.V.value, self.u.value = V_new, u_new
        return self.get_spike(V_new)
