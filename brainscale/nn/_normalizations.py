"""Normalisation layers, with brainscale 0.1's signatures and parameter layout.

The compiler's model class requires every path from a trace op's output to a hidden state
to be element-wise over neurons. Hence:

* :class:`ScaleShift` (``y = γ ⊙ x + β``, per feature) is element-wise. Its ``γ`` and ``β``
  are :class:`brainscale.ETraceParam` applied through :class:`brainscale.ElemWiseOp`, so it
  may sit **between** a trace op and a neuron (e.g. ``Linear → ScaleShift → LIF``) and its
  parameters get eligibility traces (param-dim, ``|γ| · k``).
* :class:`LayerNorm`, :class:`RMSNorm`, :class:`GroupNorm` and :class:`BatchNorm0d` ...
  :class:`BatchNorm3d` reduce over features (BatchNorm: over the batch too) and then apply
  a learnable per-feature affine. As in brainscale 0.1 the affine is ONE parameter
  ``weight = {'scale': γ, 'bias': β}`` (RMSNorm: ``scale = {'scale': γ}``), an
  :class:`brainscale.ETraceParam` applied through :class:`ScaleOp` (``x ⊙ γ + β``, a trace
  op element-wise in its input), so 0.1 checkpoints carry over. Placed on the **input** of a
  trace op or **after** the hidden states (a readout) they are plain computations: the
  affine's output reaches hidden states only through another op's input, or none, and its
  parameter gets the exact instantaneous gradient (IR dim ``none``). Placed **between** a
  trace op and a neuron (``conv → LayerNorm → IF``), it is the compiler's normalisation
  support that decides (see ``docs/nn.md``).
* BatchNorm's running statistics are ``brainstate.BatchState`` objects (0.1's
  ``mean_type``): states outside the trace, updated only when
  ``brainstate.environ`` has ``fit=True`` (training: batch statistics); with ``fit=False``
  (evaluation) the running statistics normalise.

Numerics follow brainstate's (and so 0.1's) layers: statistics in at least float32, the
fast variance ``E[x²] - E[x]²`` clipped at 0 by default (``use_fast_variance=False`` gives
``E[(x - E[x])²]``), ``(x - mean) · rsqrt(var + ε)``. Inputs carrying a unit are normalised
on their mantissa.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Sequence

import braintools
import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

from ..concepts import ETraceOp, ETraceParam
from ..ops import ElemWiseOp
from ._base import make_param, to_size

__all__ = ["ScaleShift", "ScaleOp", "LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm0d",
           "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


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
        # the per-feature factors broadcast over a batch in the products (an explicit
        # broadcast of an op output would read as a reshaping equation after the op)
        y = x * self.scale.execute(None)
        if self.shift is not None:
            y = y + self.shift.execute(None)
        return y


# ---------------------------------------------------------------------------------------
# the affine op
# ---------------------------------------------------------------------------------------

class ScaleOp(ETraceOp):
    r"""The affine of a normalisation layer as a trace op: ``y = x ⊙ scale + bias``.

    The parameter is ``{'scale': γ, 'bias': β}`` (either may be absent), each of the layer's
    feature shape (``in_size`` with 1 on the non-feature axes), broadcast against ``x`` (one
    example of shape ``in_size``, or a leading batch axis). ``y`` is element-wise in ``x``
    and in the parameter.

    Param-dim layout: compact when every parameter element belongs to one output neuron
    (feature shape = ``in_size``, e.g. a LayerNorm over a vector): :meth:`yw_to_w` is
    ``θ ⊙ y``. A parameter shared by several positions (BatchNorm2d's per-channel ``γ``)
    gets the exact per-output-neuron (dense) layout.

    Example::

        >>> op = brainscale.nn.ScaleOp((3,))
        >>> op(jnp.ones(3), {'scale': 2. * jnp.ones(3), 'bias': jnp.ones(3)})
        Array([3., 3., 3.], dtype=float32)
    """

    kind = "custom"
    param_trace = "compact"
    x_elementwise = True      # the affine passes its input's dependence through (proven)

    def __init__(self, in_size):
        self.in_size = to_size(in_size, "in_size")
        self.x_ndim = len(self.in_size)
        super().__init__(is_diagonal=True)

    def xw_to_y(self, x, w):
        if not isinstance(w, dict) or not w or set(w) - {"scale", "bias"}:
            raise ValueError(f"ScaleOp: the parameter must be a dict with 'scale' and/or "
                             f"'bias', got {jax.tree.structure(w)}")
        y = x
        if "scale" in w:
            y = y * w["scale"]
        if "bias" in w:
            y = y + w["bias"]
        return y

    def yw_to_w(self, y, w):
        """``θ ⊙ y`` per leaf (each parameter element feeds one output neuron)."""
        return jax.tree.map(lambda leaf: leaf * y, w,
                            is_leaf=lambda a: isinstance(a, u.Quantity))

    def compact_layout_error(self, w) -> Optional[str]:
        for k, leaf in (w.items() if isinstance(w, dict) else ()):
            if tuple(np.shape(leaf)) != self.in_size:
                return (f"ScaleOp: '{k}' of shape {tuple(np.shape(leaf))} is shared by the "
                        f"positions of an input of shape {self.in_size}: the exact "
                        f"per-output-neuron layout is used")
        return None

    def _repr_fields(self):
        return {"is_diagonal": self.is_diagonal, "in_size": self.in_size}


# ---------------------------------------------------------------------------------------
# statistics and the shared affine
# ---------------------------------------------------------------------------------------

def _axes(axes, ndim: int, what: str) -> tuple:
    axes = (axes,) if isinstance(axes, (numbers.Integral, np.integer)) else tuple(axes)
    out = []
    for a in axes:
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"{what}: axis {a} is out of range for {ndim} dims")
        out.append(a % ndim)
    return tuple(sorted(set(out)))


def _stats(x, axes, *, use_mean=True, fast=True, axis_name=None, axis_index_groups=None,
           mask=None):
    """Mean and variance of ``x`` over ``axes`` (kept as size-1 axes), in >= float32."""
    x = jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))

    def mean(*vs):
        ms = [jnp.mean(v, axis=axes, keepdims=True, where=mask) for v in vs]
        if axis_name is not None:
            ms = [jax.lax.pmean(m, axis_name, axis_index_groups=axis_index_groups) for m in ms]
        return ms

    if not use_mean:
        (var,) = mean(jnp.square(x))
        return jnp.zeros_like(var), var
    if fast:
        mu, mu2 = mean(x, jnp.square(x))
        return mu, jnp.maximum(0., mu2 - jnp.square(mu))
    (mu,) = mean(x)
    (var,) = mean(jnp.square(x - mu))
    return mu, var


def _feature_shape(in_size, feature_axes) -> tuple:
    return tuple(n if i in feature_axes else 1 for i, n in enumerate(in_size))


def _make_affine(owner, in_size, feature_axes, names_inits, param_type, param_layout):
    """The affine parameter(s): one ``weight = {'scale', 'bias'}`` parameter with a
    :class:`ScaleOp` (0.1's layout), or (``param_layout='split'``) plain ParamStates."""
    fshape = _feature_shape(in_size, feature_axes)
    values = {k: braintools.init.param(init, fshape, allow_none=False)
              for k, init in names_inits}
    if param_layout == "split":
        return {k: brainstate.ParamState(v) for k, v in values.items()}
    if param_layout != "weight":
        raise ValueError(f"{type(owner).__name__}: param_layout must be 'weight' (0.1: one "
                         f"parameter {{'scale', 'bias'}}) or 'split' (plain ParamStates), "
                         f"got {param_layout!r}")
    if not values:
        return None
    return make_param(param_type, values, ScaleOp(in_size), type(owner).__name__, grad="full")


def _apply_affine(param, y):
    if param is None:
        return y
    if isinstance(param, dict):       # 'split' layout
        if "scale" in param:
            y = y * param["scale"].value
        if "bias" in param:
            y = y + param["bias"].value
        return y
    return param.execute(y)


class _Norm(brainstate.nn.Module):
    """Shared pieces: sizes, axes, dtype and the affine parameter."""

    def _setup(self, in_size, feature_axes, epsilon, dtype, use_fast_variance, axis_name,
               axis_index_groups):
        self.in_size = self.out_size = to_size(in_size, "in_size")
        self.feature_axes = _axes(feature_axes, len(self.in_size),
                                  f"{type(self).__name__} feature_axes")
        self.epsilon = epsilon
        self.dtype = dtype
        self.use_fast_variance = bool(use_fast_variance)
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups

    def _check_input(self, x, leading_ok: bool = False):
        """Whether ``x`` (the mantissa) carries a leading batch axis; checks its shape
        (``leading_ok``: any number of leading axes)."""
        shape = tuple(np.shape(x))
        n = len(self.in_size)
        if shape[len(shape) - n:] == self.in_size and (
                len(shape) in (n, n + 1) or (leading_ok and len(shape) > n)):
            return len(shape) > n
        raise ValueError(f"{type(self).__name__}: input of shape {shape} must be in_size "
                         f"{self.in_size} (one example) or (batch, *{self.in_size})")

    def _normalize(self, x, mean, var):
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        dtype = self.dtype or brainstate.environ.dftype()
        return jnp.asarray(y, dtype)


class LayerNorm(_Norm):
    r"""Layer normalisation: ``(x - mean) / sqrt(var + ε) ⊙ γ + β``, statistics per example.

    Signature and defaults are brainstate's (and so brainscale 0.1's):
    ``LayerNorm(in_size, reduction_axes=-1, feature_axes=-1, *, epsilon=1e-6, use_bias=True,
    use_scale=True, bias_init=ZeroInit(), scale_init=Constant(1.), axis_name=None,
    axis_index_groups=None, use_fast_variance=True, dtype=None, param_type=ETraceParam)``.
    ``reduction_axes`` index the input as given (the default ``-1``: the last axis);
    ``feature_axes`` index ``in_size`` and give the shape of ``γ``, ``β``.

    Parameter (0.1's layout): ``self.weight = param_type({'scale': γ, 'bias': β},
    op=ScaleOp(in_size))``. ``param_layout='split'`` gives this package's earlier layout,
    plain ``brainstate.ParamState`` ``self.scale`` / ``self.bias``.

    Mixes neurons: use it on inputs of a trace op or in a readout (see the module notes).

    Example::

        >>> ln = brainscale.nn.LayerNorm(4)
        >>> y = ln(jnp.arange(4.))
        >>> bool(abs(float(y.mean())) < 1e-5), sorted(ln.weight.value)
        (True, ['bias', 'scale'])
    """

    def __init__(self, in_size, reduction_axes=-1, feature_axes=-1, *, epsilon: float = 1e-6,
                 use_bias: bool = True, use_scale: bool = True,
                 bias_init: Callable = braintools.init.ZeroInit(),
                 scale_init: Callable = braintools.init.Constant(1.), axis_name=None,
                 axis_index_groups=None, use_fast_variance: bool = True, dtype=None,
                 param_type: type = ETraceParam, param_layout: str = "weight",
                 name: Optional[str] = None):
        super().__init__(name=name)
        self._setup(in_size, feature_axes, epsilon, dtype, use_fast_variance, axis_name,
                    axis_index_groups)
        self.reduction_axes = reduction_axes
        self.use_bias, self.use_scale = bool(use_bias), bool(use_scale)
        self.param_layout = param_layout
        inits = ((("scale", scale_init),) if use_scale else ()) + \
            ((("bias", bias_init),) if use_bias else ())
        p = _make_affine(self, self.in_size, self.feature_axes, inits, param_type, param_layout)
        if param_layout == "split":
            self.scale, self.bias, self._affine = p.get("scale"), p.get("bias"), p
        else:
            self.weight = p

    def _affine_param(self):
        return self._affine if self.param_layout == "split" else self.weight

    def update(self, x, *, mask=None):
        x = u.get_mantissa(x)
        self._check_input(x, leading_ok=True)
        axes = _axes(self.reduction_axes, np.ndim(x), "LayerNorm reduction_axes")
        mean, var = _stats(x, axes, fast=self.use_fast_variance, axis_name=self.axis_name,
                           axis_index_groups=self.axis_index_groups, mask=mask)
        return _apply_affine(self._affine_param(), self._normalize(x, mean, var))


class RMSNorm(_Norm):
    r"""RMS normalisation: ``x / sqrt(mean(x²) + ε) ⊙ γ``, statistics per example.

    Signature and defaults are brainstate's (and 0.1's): ``RMSNorm(in_size, *,
    epsilon=1e-6, dtype=None, use_scale=True, scale_init=Constant(1.), reduction_axes=-1,
    feature_axes=-1, axis_name=None, axis_index_groups=None, use_fast_variance=True,
    param_type=ETraceParam)``. Parameter (0.1's layout): ``self.scale = param_type({'scale':
    γ}, op=ScaleOp(in_size))``; ``param_layout='split'``: a plain ParamState ``self.scale``
    holding ``γ`` (this package's earlier layout).

    Example::

        >>> rms = brainscale.nn.RMSNorm(2)
        >>> rms(jnp.array([3., 4.])).shape, list(rms.scale.value)
        ((2,), ['scale'])
    """

    def __init__(self, in_size, *, epsilon: float = 1e-6, dtype=None, use_scale: bool = True,
                 scale_init: Callable = braintools.init.Constant(1.), reduction_axes=-1,
                 feature_axes=-1, axis_name=None, axis_index_groups=None,
                 use_fast_variance: bool = True, param_type: type = ETraceParam,
                 param_layout: str = "weight", name: Optional[str] = None):
        super().__init__(name=name)
        self._setup(in_size, feature_axes, epsilon, dtype, use_fast_variance, axis_name,
                    axis_index_groups)
        self.reduction_axes = reduction_axes
        self.use_scale = bool(use_scale)
        self.param_layout = param_layout
        inits = (("scale", scale_init),) if use_scale else ()
        p = _make_affine(self, self.in_size, self.feature_axes, inits, param_type, param_layout)
        if param_layout == "split":
            self.scale, self._affine = p.get("scale"), p
        else:
            self.scale = p

    def update(self, x, *, mask=None):
        x = u.get_mantissa(x)
        self._check_input(x, leading_ok=True)
        axes = _axes(self.reduction_axes, np.ndim(x), "RMSNorm reduction_axes")
        mean, var = _stats(x, axes, use_mean=False, axis_name=self.axis_name,
                           axis_index_groups=self.axis_index_groups, mask=mask)
        p = self._affine if self.param_layout == "split" else self.scale
        return _apply_affine(p, self._normalize(x, mean, var))


class GroupNorm(_Norm):
    r"""Group normalisation (Wu & He 2018): channels split into groups, statistics per
    example and group over the group's channels and all other non-batch axes.

    Signature and defaults are brainstate's (and 0.1's): ``GroupNorm(in_size,
    feature_axis=-1, num_groups=32, group_size=None, *, epsilon=1e-6, dtype=None,
    use_bias=True, use_scale=True, bias_init=ZeroInit(), scale_init=Constant(1.),
    reduction_axes=None, axis_name=None, axis_index_groups=None, use_fast_variance=True,
    param_type=ETraceParam)``; give ``num_groups`` or ``group_size`` (then
    ``num_groups=None``). The channel axis is the last one (channels-last). ``in_size`` is
    one example; a leading batch axis is optional (this class, unlike brainstate's, also
    normalises a single example). Parameter (0.1's layout): ``self.weight = {'scale',
    'bias'}`` of shape ``(C,)`` padded with 1s to ``in_size``'s rank.

    Example::

        >>> gn = brainscale.nn.GroupNorm((5, 4), num_groups=2)
        >>> gn(jnp.arange(20.).reshape(5, 4)).shape
        (5, 4)
    """

    def __init__(self, in_size, feature_axis=-1, num_groups: Optional[int] = 32,
                 group_size: Optional[int] = None, *, epsilon: float = 1e-6, dtype=None,
                 use_bias: bool = True, use_scale: bool = True,
                 bias_init: Callable = braintools.init.ZeroInit(),
                 scale_init: Callable = braintools.init.Constant(1.), reduction_axes=None,
                 axis_name=None, axis_index_groups=None, use_fast_variance: bool = True,
                 param_type: type = ETraceParam, name: Optional[str] = None):
        super().__init__(name=name)
        self._setup(in_size, feature_axis, epsilon, dtype, use_fast_variance, axis_name,
                    axis_index_groups)
        if self.feature_axes != (len(self.in_size) - 1,):
            raise ValueError(f"GroupNorm: the channel axis must be the last axis of in_size "
                             f"{self.in_size} (channels-last), got feature_axis={feature_axis}")
        if reduction_axes is not None:
            raise ValueError("GroupNorm: reduction_axes is not supported here; the statistics "
                             "are over all non-batch axes of each group")
        n_ch = self.in_size[-1]
        if (num_groups is None) == (group_size is None):
            raise ValueError("GroupNorm: give num_groups or group_size (to give group_size, "
                             "pass num_groups=None: the default num_groups is 32)")
        if group_size is not None:
            if group_size <= 0 or n_ch % group_size:
                raise ValueError(f"GroupNorm: group_size={group_size} does not divide the "
                                 f"{n_ch} channels")
            num_groups = n_ch // group_size
        elif not isinstance(num_groups, (int, np.integer)) or num_groups <= 0 or n_ch % num_groups:
            raise ValueError(f"GroupNorm: num_groups={num_groups} does not divide the {n_ch} "
                             f"channels")
        self.num_groups, self.group_size = int(num_groups), n_ch // int(num_groups)
        self.use_bias, self.use_scale = bool(use_bias), bool(use_scale)
        inits = ((("scale", scale_init),) if use_scale else ()) + \
            ((("bias", bias_init),) if use_bias else ())
        self.weight = _make_affine(self, self.in_size, self.feature_axes, inits, param_type,
                                   "weight")

    def update(self, x, *, mask=None):
        x = u.get_mantissa(x)
        batched = self._check_input(x)
        shape = tuple(np.shape(x))
        xg = jnp.reshape(x, shape[:-1] + (self.num_groups, self.group_size))
        # every non-batch axis except the group axis (which is second to last)
        axes = tuple(a for a in range(int(batched), xg.ndim) if a != xg.ndim - 2)
        if mask is not None:
            mask = jnp.reshape(mask, shape[:-1] + (self.num_groups, self.group_size))
        mean, var = _stats(xg, axes, fast=self.use_fast_variance, axis_name=self.axis_name,
                           axis_index_groups=self.axis_index_groups, mask=mask)
        y = jnp.reshape(self._normalize(xg, mean, var), shape)
        return _apply_affine(self.weight, y)


class _BatchNorm(_Norm):
    num_spatial_dims: int = 0

    def __init__(self, in_size, feature_axis=-1, *, track_running_stats: bool = True,
                 epsilon: float = 1e-5, momentum: float = 0.99, affine: bool = True,
                 bias_initializer=braintools.init.Constant(0.),
                 scale_initializer=braintools.init.Constant(1.),
                 axis_name: Optional[str | Sequence[str]] = None,
                 axis_index_groups: Optional[Sequence[Sequence[int]]] = None,
                 use_fast_variance: bool = True, name: Optional[str] = None, dtype: Any = None,
                 param_type: type = ETraceParam, mean_type: type = brainstate.BatchState):
        super().__init__(name=name)
        self._setup(in_size, feature_axis, epsilon, dtype, use_fast_variance, axis_name,
                    axis_index_groups)
        cls = type(self).__name__
        if len(self.in_size) != self.num_spatial_dims + 1:
            raise ValueError(f"{cls}: in_size must be one example's shape with "
                             f"{self.num_spatial_dims} spatial axes and the features, "
                             f"got {self.in_size}")
        if affine and not track_running_stats:
            raise ValueError(f"{cls}: affine=True needs track_running_stats=True (as in "
                             f"brainstate and brainscale 0.1)")
        if not 0. <= float(momentum) <= 1.:
            raise ValueError(f"{cls}: momentum must be in [0, 1], got {momentum}")
        self.track_running_stats = bool(track_running_stats)
        self.momentum = float(momentum)
        self.affine = bool(affine)
        fshape = _feature_shape(self.in_size, self.feature_axes)
        sdtype = dtype or brainstate.environ.dftype()
        self.running_mean = self.running_var = None
        if self.track_running_stats:
            self.running_mean = mean_type(jnp.zeros(fshape, sdtype))
            self.running_var = mean_type(jnp.ones(fshape, sdtype))
        self.weight = None
        if self.affine:
            self.weight = _make_affine(self, self.in_size, self.feature_axes,
                                       (("bias", bias_initializer), ("scale", scale_initializer)),
                                       param_type, "weight")

    def update(self, x, mask=None):
        x = u.get_mantissa(x)
        batched = self._check_input(x)
        # statistics over everything but the features (the batch axis included)
        axes = tuple(a for a in range(np.ndim(x))
                     if (a - int(batched)) not in self.feature_axes)

        def batch_stats():
            return _stats(x, axes, fast=self.use_fast_variance, axis_name=self.axis_name,
                          axis_index_groups=self.axis_index_groups, mask=mask)

        if self.track_running_stats:
            fit = brainstate.environ.get("fit", default=None)
            if fit is None:
                raise ValueError(
                    f"{type(self).__name__} needs to know whether it is training: run it inside "
                    f"brainstate.environ.context(fit=True) (batch statistics, running "
                    f"statistics updated) or fit=False (evaluation with the running statistics)")
            if fit:
                mean, var = batch_stats()
                fshape = self.running_mean.value.shape
                m = self.momentum
                self.running_mean.value = m * self.running_mean.value + \
                    (1 - m) * jnp.reshape(mean, fshape)
                self.running_var.value = m * self.running_var.value + \
                    (1 - m) * jnp.reshape(var, fshape)
            else:
                mean, var = self.running_mean.value, self.running_var.value
        else:
            mean, var = batch_stats()
        return _apply_affine(self.weight, self._normalize(x, mean, var))


_BN_DOC = r"""Batch normalisation over {what}.

    Signature and defaults are brainstate's (and brainscale 0.1's): ``{cls}(in_size,
    feature_axis=-1, *, track_running_stats=True, epsilon=1e-5, momentum=0.99, affine=True,
    bias_initializer=Constant(0.), scale_initializer=Constant(1.), axis_name=None,
    axis_index_groups=None, use_fast_variance=True, name=None, dtype=None,
    param_type=ETraceParam, mean_type=brainstate.BatchState)``. ``in_size`` is one example
    ({shape}); the input is that or has a leading batch axis.

    Training (``brainstate.environ.context(fit=True)``): the batch statistics (over the batch
    and the non-feature axes) normalise, and the running statistics ``running_mean`` /
    ``running_var`` (``mean_type`` states, outside the trace) move to them with
    ``running = momentum · running + (1 - momentum) · batch``. Evaluation (``fit=False``):
    the running statistics normalise. With ``track_running_stats=False`` the batch statistics
    always normalise (then ``affine`` must be False). The affine (0.1's layout) is
    ``self.weight = param_type({{'bias', 'scale'}}, op=ScaleOp(in_size))``.

    Example::

{example}
"""


class BatchNorm0d(_BatchNorm):
    num_spatial_dims = 0
    __doc__ = _BN_DOC.format(
        what="feature vectors", cls="BatchNorm0d", shape="``(C,)``",
        example="""        >>> bn = brainscale.nn.BatchNorm0d(3)
        >>> with brainstate.environ.context(fit=True):
        ...     y = bn(jnp.arange(12.).reshape(4, 3))
        >>> bool(jnp.allclose(y.mean(0), 0., atol=1e-5)), bn.running_mean.value.shape
        (True, (3,))""")


class BatchNorm1d(_BatchNorm):
    num_spatial_dims = 1
    __doc__ = _BN_DOC.format(
        what="sequences of feature vectors", cls="BatchNorm1d", shape="``(L, C)``",
        example="""        >>> bn = brainscale.nn.BatchNorm1d((5, 3))
        >>> with brainstate.environ.context(fit=False):
        ...     bn(jnp.ones((2, 5, 3))).shape
        (2, 5, 3)""")


class BatchNorm2d(_BatchNorm):
    num_spatial_dims = 2
    __doc__ = _BN_DOC.format(
        what="images", cls="BatchNorm2d", shape="``(H, W, C)``",
        example="""        >>> bn = brainscale.nn.BatchNorm2d((4, 4, 2))
        >>> with brainstate.environ.context(fit=True):
        ...     bn(jnp.ones((3, 4, 4, 2))).shape
        (3, 4, 4, 2)""")


class BatchNorm3d(_BatchNorm):
    num_spatial_dims = 3
    __doc__ = _BN_DOC.format(
        what="volumes", cls="BatchNorm3d", shape="``(D, H, W, C)``",
        example="""        >>> bn = brainscale.nn.BatchNorm3d((2, 2, 2, 1))
        >>> bn.weight.value['scale'].shape
        (1, 1, 1, 1)""")
