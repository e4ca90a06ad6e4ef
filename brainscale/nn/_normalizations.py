"""Normalisation layers, and where they may sit in an online-learning model.

The compiler's model class requires every path from a trace op's output to a hidden state
to be element-wise over neurons. Hence:

* :class:`ScaleShift` (``y = γ ⊙ x + β``, per feature) is element-wise. Its ``γ`` and ``β``
  are :class:`brainscale.ETraceParam` applied through :class:`brainscale.ElemWiseOp`, so it
  may sit **between** a trace op and a neuron (e.g. ``Linear → ScaleShift → LIF``) and its
  parameters get eligibility traces (param-dim, ``|γ| · k``).
* :class:`LayerNorm` and :class:`RMSNorm` reduce over the feature axis, i.e. they mix
  neurons. They may sit on the **inputs** of a trace op (the op input ``x`` may be anything)
  or **after** the hidden states (in a readout), never between a trace op and the hidden
  state it drives: there the compiler raises :class:`brainscale.UnsupportedModelError`
  naming the reduction. Their parameters are ordinary ``brainstate.ParamState`` (instantaneous
  gradient only).
* Batch normalisation mixes examples of a batch and has running statistics; it is not
  provided (use ``LayerNorm`` on inputs instead).
"""
from __future__ import annotations

from typing import Optional

import braintools
import brainstate
import brainunit as u
import jax.numpy as jnp

from ..concepts import ETraceParam
from ..ops import ElemWiseOp
from ._base import broadcast_like, to_size

__all__ = ["ScaleShift", "LayerNorm", "RMSNorm"]


def _identity(p):
    return p


class ScaleShift(brainstate.nn.Module):
    r"""Per-feature affine map ``y = γ ⊙ x + β``, element-wise and trace-aware.

    ``γ`` (``self.scale``) and ``β`` (``self.shift``) are ETraceParams applied through
    :class:`brainscale.ElemWiseOp` (``y = fn(θ)``), so between a trace op and a neuron
    they get D-RTRL traces. Placed on an op's *input*, their outputs reach hidden states
    only through that op and they get the instantaneous gradient (the IR says ``none``).

    Args:
        in_size: feature shape (the trailing axes of ``x``).
        scale_init, shift_init: initializers (``shift_init=None``: no shift).
        name: module name.

    Example::

        >>> ss = brainscale.nn.ScaleShift(3, scale_init=braintools.init.Constant(2.))
        >>> ss(jnp.ones(3))
        Array([2., 2., 2.], dtype=float32)
    """

    def __init__(self, in_size, scale_init=braintools.init.Constant(1.),
                 shift_init=braintools.init.ZeroInit(), name: Optional[str] = None):
        super().__init__(name=name)
        self.in_size = self.out_size = to_size(in_size, "in_size")
        self.scale = ETraceParam(braintools.init.param(scale_init, self.in_size, allow_none=False),
                                 ElemWiseOp(_identity))
        self.shift = None
        if shift_init is not None:
            self.shift = ETraceParam(
                braintools.init.param(shift_init, self.in_size, allow_none=False),
                ElemWiseOp(_identity))

    def update(self, x):
        y = x * broadcast_like(self.scale.execute(None), x)
        if self.shift is not None:
            y = y + broadcast_like(self.shift.execute(None), y)
        return y


class LayerNorm(brainstate.nn.Module):
    r"""Layer normalisation over the last axis: ``(x − mean) / sqrt(var + eps) · γ + β``.

    Mixes neurons: use it on inputs of a trace op or in a readout, not between a trace op
    and a hidden state (the compiler rejects that with ``UnsupportedModelError``).
    ``γ``/``β`` are ordinary ``brainstate.ParamState``.

    Example::

        >>> ln = brainscale.nn.LayerNorm(4)
        >>> y = ln(jnp.arange(4.))
        >>> bool(abs(float(y.mean())) < 1e-5)
        True
    """

    def __init__(self, in_size, epsilon: float = 1e-6, use_scale: bool = True,
                 use_bias: bool = True, scale_init=braintools.init.Constant(1.),
                 bias_init=braintools.init.ZeroInit(), name: Optional[str] = None):
        super().__init__(name=name)
        self.in_size = self.out_size = to_size(in_size, "in_size")
        self.epsilon = epsilon
        n = self.in_size[-1]
        self.scale = brainstate.ParamState(braintools.init.param(scale_init, (n,))) \
            if use_scale else None
        self.bias = brainstate.ParamState(braintools.init.param(bias_init, (n,))) \
            if use_bias else None

    def update(self, x):
        x = u.get_mantissa(x)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) / jnp.sqrt(var + self.epsilon)
        if self.scale is not None:
            y = y * self.scale.value
        if self.bias is not None:
            y = y + self.bias.value
        return y


class RMSNorm(brainstate.nn.Module):
    r"""RMS normalisation over the last axis: ``x / sqrt(mean(x²) + eps) · γ``.

    Mixes neurons (same placement rules as :class:`LayerNorm`); ``γ`` is an ordinary
    ``brainstate.ParamState``.

    Example::

        >>> rms = brainscale.nn.RMSNorm(2)
        >>> rms(jnp.array([3., 4.])).shape
        (2,)
    """

    def __init__(self, in_size, epsilon: float = 1e-6, use_scale: bool = True,
                 scale_init=braintools.init.Constant(1.), name: Optional[str] = None):
        super().__init__(name=name)
        self.in_size = self.out_size = to_size(in_size, "in_size")
        self.epsilon = epsilon
        n = self.in_size[-1]
        self.scale = brainstate.ParamState(braintools.init.param(scale_init, (n,))) \
            if use_scale else None

    def update(self, x):
        x = u.get_mantissa(x)
        y = x / jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        if self.scale is not None:
            y = y * self.scale.value
        return y
