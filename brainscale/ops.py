"""Built-in trace operators: the interactions ``y = op(x, θ)`` models are written with.

Every op here is an :class:`~brainscale.concepts.ETraceOp`: ``op(x, θ)`` applies it through
a marked ``jax.jit`` so the compiler finds it in the jaxpr, ``xw_to_y`` is the math,
``xy_to_dw`` is the VJP of ``θ ↦ xw_to_y(x, θ)`` and, for ops with a compact param-dim
layout, ``yw_to_w`` multiplies a parameter-shaped tree by a vector over the output neurons.

Param-dim (D-RTRL) trace layout of each op (``param_trace``):

* :class:`MatMulOp` (kind ``'dense'``): **compact**. ``W[i, j]`` reaches output neuron ``j``
  only, so a trace of ``W``'s shape, multiplied along the output (last) axis, is exact.
* :class:`SpMatMulOp` (kind ``'sparse'``): **compact**. Stored element ``k`` of the sparse
  matrix reaches output neuron ``col(k)`` only; the trace is a vector of the data's shape.
* :class:`ElemWiseOp` (kind ``'elemwise'``): **compact** and diagonal. ``y = fn(θ)`` is
  element-wise, so the trace has ``θ``'s shape.
* :class:`ConvOp` (kind ``'conv'``): **channel**. A kernel element is shared by every
  spatial position and so reaches many output neurons (no parameter-shaped trace is exact;
  ``yw_to_w`` raises), but only neurons of the output channel it produces: the exact
  per-output-neuron trace keeps, per neuron, the kernel slice of its channel (``C_out``
  times smaller than the dense per-neuron trace; a ``weight_fn`` that is not element-wise
  falls back to the dense layout).
* :class:`LoraOp` (kind ``'lora'``): **dense**. ``B[i, r]`` reaches every output neuron
  through ``A``; same reason as conv.

Parameters are dicts (``{'weight': W, 'bias': b}``, ``{'B': .., 'A': ..}``); leaves may be
``brainunit`` quantities, and units flow through ``y``. ``x`` is one example of rank
``op.x_ndim``, or a batch of them with one extra leading axis; ``yw_to_w`` works on one
example (the compiler maps it over the batch).

On CPU brainevent's default sparse kernels use numba; when numba is not installed and no
CPU backend was chosen, importing this module selects brainevent's pure-JAX ``jax_raw``
kernels for CPU (``brainevent.config.set_backend('cpu', 'jax_raw')``).
"""
from __future__ import annotations

import importlib.util
import numbers
from typing import Any, Callable, Sequence

import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

from .concepts import ETraceOp, mix_states, sum_leading

__all__ = ["MatMulOp", "ConvOp", "SpMatMulOp", "ElemWiseOp", "LoraOp"]


# ---------------------------------------------------------------------------------------
# brainevent setup
# ---------------------------------------------------------------------------------------

try:  # brainevent is only needed by SpMatMulOp
    import brainevent as _be
except Exception:  # pragma: no cover - brainevent is a hard dependency in practice
    _be = None


def _configure_brainevent_cpu():
    """Use brainevent's pure-JAX CPU kernels when numba (its CPU default) is missing."""
    if _be is None:
        return
    try:
        cfg = getattr(_be, "config", None)
        if cfg is None or not hasattr(cfg, "set_backend") or not hasattr(cfg, "get_backend"):
            return
        if cfg.get_backend("cpu") is not None:  # the user chose already
            return
        if importlib.util.find_spec("numba") is not None:
            return
        cfg.set_backend("cpu", "jax_raw")
    except Exception:  # pragma: no cover - never fail the import over this
        pass


_configure_brainevent_cpu()


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

class _Summary:
    """Prints as a fixed string (used to keep reprs of arrays short)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return self.text


def _array_summary(a) -> Any:
    if a is None:
        return None
    return _Summary(str(jax.core.ShapedArray(np.shape(a), jnp.result_type(a))))


def _check_callable(fn, what: str):
    if not callable(fn):
        raise TypeError(f"{what} must be callable, got {type(fn).__name__}: {fn!r}")
    return fn


def _as_mask(mask, op_name: str):
    if mask is None:
        return None
    if isinstance(mask, u.Quantity):
        raise TypeError(f"{op_name}: weight_mask must be a plain (unitless) array, got a "
                        f"Quantity with unit {mask.unit}")
    if not isinstance(mask, (np.ndarray, jax.Array, list, tuple, bool, numbers.Number)):
        raise TypeError(f"{op_name}: weight_mask must be an array (bool or numeric), got "
                        f"{type(mask).__name__}")
    return jnp.asarray(mask)


def _apply_mask(weight, mask, op_name: str):
    if mask is None:
        return weight
    wshape = tuple(np.shape(weight))
    try:
        ok = tuple(np.broadcast_shapes(tuple(mask.shape), wshape)) == wshape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{op_name}: weight_mask shape {tuple(mask.shape)} does not match "
                         f"the weight shape {wshape} (it must equal it or broadcast to it)")
    return weight * mask


def _param_dict(w, op_name: str, required: Sequence[str], optional: Sequence[str] = ("bias",),
                allow_bare: str | None = None) -> dict:
    """Validate a parameter tree and return it as a dict."""
    if not isinstance(w, dict):
        if allow_bare is not None and (isinstance(w, (jax.Array, np.ndarray, u.Quantity))
                                       or hasattr(w, "shape")):
            return {allow_bare: w}
        raise TypeError(f"{op_name} expects a parameter dict with keys {list(required)}"
                        f"{' and optionally ' + str(list(optional)) if optional else ''}, "
                        f"got {type(w).__name__}")
    missing = [k for k in required if k not in w]
    if missing:
        raise ValueError(f"{op_name}: parameter dict is missing {missing}; "
                         f"it has keys {sorted(w)}")
    extra = [k for k in w if k not in required and k not in optional]
    if extra:
        raise ValueError(f"{op_name}: unexpected parameter keys {extra}; allowed keys are "
                         f"{list(required) + list(optional)}")
    return w


def _check_bias(b, n_out: int, op_name: str):
    if tuple(np.shape(b)) != (n_out,):
        raise ValueError(f"{op_name}: bias shape {tuple(np.shape(b))} does not match the "
                         f"number of outputs ({n_out},)")


def _vjp(fn: Callable, w, dy):
    """``∂⟨dy, fn(w)⟩/∂w``, unit-agnostic: the output and ``dy`` are taken as mantissas."""
    _, f_vjp = jax.vjp(lambda ww: u.get_mantissa(fn(ww)), w)
    return f_vjp(u.get_mantissa(dy))[0]


def _identity(w):
    return w


def _elementwise_chain(fn, weight):
    """``∂fn(w)[i]/∂w[i]`` for an element-wise ``fn`` (proven by the frontend): the VJP of
    ones, on mantissas (the factor a mask and ``weight_fn`` put on every weight element)."""
    out, vjp = jax.vjp(lambda ww: u.get_mantissa(fn(ww)), u.get_mantissa(weight))
    return vjp(jnp.ones_like(out))[0]          # ones of the output's dtype


def _no_compact(op_name: str, why: str):
    return NotImplementedError(
        f"{op_name} has no compact param-dim layout ({why}), so yw_to_w is not defined; "
        f"the compiler keeps the dense per-output-neuron param-dim trace for it "
        f"(param_trace='dense') and needs only xy_to_dw.")


# ---------------------------------------------------------------------------------------
# MatMulOp
# ---------------------------------------------------------------------------------------

class MatMulOp(ETraceOp):
    r"""Dense matrix multiplication ``y = x @ W_eff + b``.

    ``W_eff = weight_fn(weight * mask)`` by default, or ``weight_fn(weight) * mask`` with
    ``apply_weight_fn_before_mask=True`` (``weight_fn`` is applied exactly once). The
    parameter is ``{'weight': (n_in, n_out), 'bias': (n_out,)}`` (bias optional) or a bare
    ``(n_in, n_out)`` weight. Quantities are supported (e.g. a weight in ``mV``).

    Param-dim layout: compact, since ``W[i, j]`` only reaches output neuron ``j``;
    :meth:`yw_to_w` broadcasts ``y`` along the output axis.

    Args:
        weight_mask: optional mask (bool or numeric) of the weight's shape (or
            broadcastable to it).
        weight_fn: a function of the (masked) weight array, e.g. ``jnp.abs``.
        apply_weight_fn_before_mask: apply ``weight_fn`` before the mask instead of after.

    Example::

        >>> op = MatMulOp(weight_mask=jnp.ones((3, 2)), weight_fn=jnp.abs)
        >>> w = {'weight': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}
        >>> op(jnp.ones(3), w)
        Array([3., 3.], dtype=float32)
    """

    kind = "dense"
    param_trace = "compact"
    x_ndim = 1

    def __init__(self, weight_mask=None, weight_fn: Callable = _identity,
                 apply_weight_fn_before_mask: bool = False):
        self.weight_mask = _as_mask(weight_mask, "MatMulOp")
        self.weight_fn = _check_callable(weight_fn, "MatMulOp weight_fn")
        if not isinstance(apply_weight_fn_before_mask, (bool, np.bool_)):
            raise TypeError(f"MatMulOp: apply_weight_fn_before_mask must be a bool, got "
                            f"{apply_weight_fn_before_mask!r}")
        self.apply_weight_fn_before_mask = bool(apply_weight_fn_before_mask)
        super().__init__(is_diagonal=False)

    def effective_weight(self, weight):
        """The weight actually multiplied: ``weight_fn`` and the mask applied once."""
        if self.apply_weight_fn_before_mask:
            return _apply_mask(self.weight_fn(weight), self.weight_mask, "MatMulOp")
        return self.weight_fn(_apply_mask(weight, self.weight_mask, "MatMulOp"))

    def xw_to_y(self, x, w):
        """``y = x @ W_eff (+ bias)``; ``x`` is ``(n_in,)`` or ``(batch, n_in)``."""
        p = _param_dict(w, "MatMulOp", ("weight",), allow_bare="weight")
        weight = p["weight"]
        if np.ndim(weight) != 2:
            raise ValueError(f"MatMulOp: weight must be 2-D (n_in, n_out), got shape "
                             f"{tuple(np.shape(weight))}")
        if np.ndim(x) < 1 or np.shape(x)[-1] != np.shape(weight)[0]:
            raise ValueError(f"MatMulOp: input shape {tuple(np.shape(x))} does not match the "
                             f"weight shape {tuple(np.shape(weight))} (x's last axis must be "
                             f"n_in={np.shape(weight)[0]})")
        W = self.effective_weight(weight)
        y = u.math.matmul(x, W)
        if "bias" in p:
            _check_bias(p["bias"], np.shape(W)[-1], "MatMulOp")
            y = y + p["bias"]
        return y

    def yw_to_w(self, y, w):
        """Multiply each leaf by ``y`` along the output axis: ``weight * y[None, :]``,
        ``bias * y``."""
        if isinstance(w, dict):
            out = {}
            for k, v in w.items():
                out[k] = v * u.math.expand_dims(y, -2) if k == "weight" else v * y
            return out
        return w * u.math.expand_dims(y, -2)

    def xy_to_dw(self, x, dy, w):
        """VJP of ``w ↦ xw_to_y(x, w)`` (mask and ``weight_fn`` chain rule included;
        summed over the batch when ``x`` is batched)."""
        return _vjp(lambda ww: self.xw_to_y(x, ww), w, dy)

    def elementwise_maps(self, w):
        """The compact layout needs ``W_eff[a, n]`` to come from ``W[a, n]`` only: the
        frontend proves ``effective_weight`` element-wise on its jaxpr (``w / norm(w)``, a
        norm clip or a transpose is not)."""
        if self.weight_fn is _identity:
            return ()
        p = _param_dict(w, "MatMulOp", ("weight",), allow_bare="weight")
        return (("MatMulOp weight_fn", self.effective_weight, p["weight"]),)

    # Fused param-dim rules. They treat ``weight_fn`` as element-wise (as the compact layout
    # itself does; the frontend's proof sends other weight_fns to the dense layout):
    # ∂W_eff[a, n]/∂W[a, n] = c[a, n] is computed once per step.
    def _chain(self, weight):
        return _elementwise_chain(self.effective_weight, weight)

    def drtrl_update(self, eps, J, df, x, w):
        """ε_i ← Σ_j J[.., n, i, j] ε_j + x[.., a] c[a, n] df[.., n, i] for every state ``i``
        (``eps``: one parameter tree per state); the bias trace likewise with ``x c = 1``.

        Each new ``ε_i`` is one element-wise fusion that reads every ``ε_j`` at the same index
        it writes, so XLA updates the k trace arrays in place (no trace-sized copy)."""
        k = J.shape[-1]

        def leaf_rule(key, es, i):
            if key == "weight":
                cur = x[..., :, None] * (c * df[..., None, :, i])
                return mix_states(J, es, i, 1) + cur
            return mix_states(J, es, i, 0) + df[..., i]
        if isinstance(eps[0], dict):
            c = self._chain(w["weight"]) if "weight" in eps[0] else None
            return [{key: leaf_rule(key, [e[key] for e in eps], i) for key in eps[0]}
                    for i in range(k)]
        c = self._chain(w)
        return [leaf_rule("weight", list(eps), i) for i in range(k)]

    def drtrl_grad(self, eps, delta, w):
        """g_W[a, n] = Σ_batch Σ_i δ[.., n, i] ε_i[.., a, n] (one fused reduction per leaf)."""
        k = delta.shape[-1]

        def contract(es, lead):
            nb = es[0].ndim - 1 - lead          # leading batch axes

            def over_k(b):
                acc = None
                for i in range(k):
                    d = delta[..., i] if b is None else delta2[b, ..., i]
                    e = es[i] if b is None else es2[i][b]
                    t = d.reshape(d.shape[:-1] + (1,) * lead + d.shape[-1:]) * e
                    acc = t if acc is None else acc + t
                return acc
            if nb == 0:
                return over_k(None)
            delta2 = delta.reshape((-1,) + delta.shape[nb:])
            es2 = [e.reshape((-1,) + e.shape[nb:]) for e in es]
            return sum_leading(over_k, es2[0].shape[0])
        if isinstance(eps[0], dict):
            return {key: contract([e[key] for e in eps], 1 if key == "weight" else 0)
                    for key in eps[0]}
        return contract(list(eps), 1)

    def _repr_fields(self):
        return {
            "is_diagonal": self.is_diagonal,
            "weight_mask": _array_summary(self.weight_mask),
            "weight_fn": self.weight_fn,
            "apply_weight_fn_before_mask": self.apply_weight_fn_before_mask,
        }


# ---------------------------------------------------------------------------------------
# ConvOp
# ---------------------------------------------------------------------------------------

_DEFAULT_DN = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def _int_tuple(v, n: int, name: str):
    if v is None:
        return None
    if isinstance(v, numbers.Integral):
        return (int(v),) * n
    v = tuple(int(a) for a in v)
    if len(v) != n:
        raise ValueError(f"ConvOp: {name} must have {n} entries (one per spatial dim), got {v}")
    if any(a < 1 for a in v):
        raise ValueError(f"ConvOp: {name} entries must be >= 1, got {v}")
    return v


class ConvOp(ETraceOp):
    r"""Convolution ``y = conv(x, weight_fn(weight * mask)) + bias`` (channels-last).

    ``xinfo`` describes ONE example: ``(L, C)`` gives a 1-D, ``(H, W, C)`` a 2-D and
    ``(D, H, W, C)`` a 3-D convolution; ``x`` of that shape, or with one more leading batch
    axis. The kernel is ``(*spatial, C_in / feature_group_count, C_out)`` and the optional
    bias ``(C_out,)`` (or brainscale 0.1's ``(1, ..., 1, C_out)``). Implemented with
    :func:`jax.lax.conv_general_dilated`, by default with dimension numbers ``('NWC','WIO','NWC')``, ``('NHWC','HWIO','NHWC')`` or
    ``('NDHWC','DHWIO','NDHWC')``. With custom ``dimension_numbers`` the per-example
    layout is the lhs spec without ``N``, and a batched ``x`` still carries its batch axis
    first. Quantities are supported.

    Param-dim layout: channel. A kernel element is shared by all spatial positions, so it
    reaches many output neurons and no parameter-shaped trace is exact (:meth:`yw_to_w`
    raises); it reaches only the neurons of its own output channel, so the exact
    per-output-neuron trace keeps the kernel slice ``(*spatial, C_in/groups)`` of the
    neuron's channel (:meth:`channel_axes`, :meth:`channel_jacobian`: the input patch the
    neuron sees). A ``weight_fn`` the compiler cannot prove element-wise gives the dense
    per-output-neuron layout instead.

    Args:
        xinfo: a :class:`jax.ShapeDtypeStruct` (anything with ``.shape``) of one example.
        window_strides: int or one int per spatial dim (default 1).
        padding: ``'SAME'``, ``'VALID'``, ``'SAME_LOWER'``, an int, or one ``(lo, hi)``
            pair per spatial dim.
        lhs_dilation: input dilation (transposed conv), int or per spatial dim.
        rhs_dilation: kernel dilation (atrous conv), int or per spatial dim.
        feature_group_count: grouped convolution (``C_in`` and ``C_out`` divisible by it).
        batch_group_count: must be 1 (the op is applied per example, so there is no batch
            to group); kept for signature compatibility.
        dimension_numbers: as for :func:`jax.lax.conv_general_dilated`; None uses the
            channels-last defaults above.
        weight_mask: optional mask of the kernel's shape.
        weight_fn: function of the masked kernel.

    Example::

        >>> op = ConvOp(jax.ShapeDtypeStruct((8, 8, 3), jnp.float32), window_strides=2)
        >>> w = {'weight': jnp.ones((3, 3, 3, 4)), 'bias': jnp.zeros(4)}
        >>> op(jnp.ones((2, 8, 8, 3)), w).shape
        (2, 4, 4, 4)
    """

    kind = "conv"
    param_trace = "channel"

    def __init__(self, xinfo, window_strides=None, padding="SAME", lhs_dilation=None,
                 rhs_dilation=None, feature_group_count: int = 1, batch_group_count: int = 1,
                 dimension_numbers=None, weight_mask=None, weight_fn: Callable = _identity):
        if not hasattr(xinfo, "shape"):
            raise TypeError(f"ConvOp: xinfo must be a jax.ShapeDtypeStruct (shape of one "
                            f"example, channels last), got {type(xinfo).__name__}")
        shape = tuple(int(s) for s in xinfo.shape)
        if len(shape) < 2:
            raise ValueError(f"ConvOp: xinfo.shape must be (*spatial, channels) with at least "
                             f"one spatial dim, got {shape}")
        n_spatial = len(shape) - 1
        if dimension_numbers is None and n_spatial not in _DEFAULT_DN:
            raise ValueError(f"ConvOp: only 1-D, 2-D and 3-D convolutions have default "
                             f"dimension numbers; xinfo.shape {shape} has {n_spatial} spatial "
                             f"dims (pass dimension_numbers explicitly)")
        self.xinfo = xinfo
        self.x_ndim = len(shape)
        self.window_strides = _int_tuple(1 if window_strides is None else window_strides,
                                         n_spatial, "window_strides")
        if isinstance(padding, str):
            p = padding.upper()
            if p not in ("SAME", "VALID", "SAME_LOWER"):
                raise ValueError(f"ConvOp: padding must be 'SAME', 'VALID', 'SAME_LOWER' or "
                                 f"explicit (lo, hi) pairs, got {padding!r}")
            padding = p
        elif isinstance(padding, numbers.Integral):
            padding = ((int(padding), int(padding)),) * n_spatial
        else:
            try:
                padding = tuple((int(lo), int(hi)) for lo, hi in padding)
            except (TypeError, ValueError):
                raise ValueError(f"ConvOp: padding must be a string or one (lo, hi) pair per "
                                 f"spatial dim, got {padding!r}") from None
            if len(padding) != n_spatial:
                raise ValueError(f"ConvOp: padding needs {n_spatial} (lo, hi) pairs, got "
                                 f"{padding}")
        self.padding = padding
        self.lhs_dilation = _int_tuple(lhs_dilation, n_spatial, "lhs_dilation")
        self.rhs_dilation = _int_tuple(rhs_dilation, n_spatial, "rhs_dilation")
        if not isinstance(feature_group_count, numbers.Integral) or feature_group_count < 1:
            raise ValueError(f"ConvOp: feature_group_count must be a positive int, got "
                             f"{feature_group_count!r}")
        self.feature_group_count = int(feature_group_count)
        if batch_group_count != 1:
            raise ValueError(f"ConvOp: batch_group_count must be 1, got {batch_group_count!r}; "
                             f"the op is applied to one example at a time, so there is no "
                             f"batch to split into groups")
        self.batch_group_count = 1
        self.dimension_numbers = dimension_numbers
        self.weight_mask = _as_mask(weight_mask, "ConvOp")
        self.weight_fn = _check_callable(weight_fn, "ConvOp weight_fn")
        super().__init__(is_diagonal=False)

    def _dn(self, weight_ndim: int):
        spec = self.dimension_numbers
        if spec is None:
            spec = _DEFAULT_DN[self.x_ndim - 1]
        rank = self.x_ndim + 1
        if weight_ndim != rank:
            raise ValueError(f"ConvOp: kernel must have {rank} dims (*spatial, C_in/groups, "
                             f"C_out) for inputs of one-example shape "
                             f"{tuple(self.xinfo.shape)}, got {weight_ndim} dims")
        return jax.lax.conv_dimension_numbers((1,) * rank, (1,) * rank, spec)

    def _explicit_padding(self, lhs_shape, rhs_shape, dn):
        """The padding for lax; string padding becomes explicit pairs when the input is
        dilated (lax only accepts explicit padding for ``lhs_dilation != 1``)."""
        if not isinstance(self.padding, str) or self.lhs_dilation is None \
                or all(d == 1 for d in self.lhs_dilation):
            return self.padding
        rd = self.rhs_dilation or (1,) * len(self.lhs_dilation)
        in_sizes = [(lhs_shape[a] - 1) * d + 1 for a, d in zip(dn.lhs_spec[2:], self.lhs_dilation)]
        k_sizes = [(rhs_shape[a] - 1) * d + 1 for a, d in zip(dn.rhs_spec[2:], rd)]
        return tuple(tuple(int(v) for v in pair) for pair in jax.lax.padtype_to_pads(
            in_sizes, k_sizes, self.window_strides, self.padding))

    def _lax_conv(self, lhs, rhs, dn):
        """:func:`jax.lax.conv_general_dilated` with this op's strides, padding, dilations
        and groups (``lhs`` with its batch axis, mantissas)."""
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides=self.window_strides,
            padding=self._explicit_padding(lhs.shape, rhs.shape, dn),
            lhs_dilation=self.lhs_dilation, rhs_dilation=self.rhs_dilation,
            dimension_numbers=dn, feature_group_count=self.feature_group_count,
            batch_group_count=self.batch_group_count)

    def xw_to_y(self, x, w):
        """Convolve one example ``x`` (shape ``xinfo.shape``) or a batch of them."""
        p = _param_dict(w, "ConvOp", ("weight",), allow_bare="weight")
        ex_shape = tuple(self.xinfo.shape)
        xshape = tuple(np.shape(x))
        if len(xshape) == len(ex_shape):
            batched = False
        elif len(xshape) == len(ex_shape) + 1:
            batched = True
        else:
            raise ValueError(f"ConvOp: input shape {xshape} must be xinfo.shape {ex_shape} "
                             f"(one example) or (batch, *{ex_shape})")
        if xshape[int(batched):] != ex_shape:
            raise ValueError(f"ConvOp: input shape {xshape} does not match xinfo.shape "
                             f"{ex_shape}" + (" (after the leading batch axis)" if batched
                                              else ""))
        kernel = self._kernel(p["weight"])
        dn = self._dn(np.ndim(kernel))
        lhs_b, lhs_f = dn.lhs_spec[0], dn.lhs_spec[1]
        rhs_o, rhs_i = dn.rhs_spec[0], dn.rhs_spec[1]
        out_b, out_f = dn.out_spec[0], dn.out_spec[1]

        x_m, x_unit = u.split_mantissa_unit(x)
        k_m, k_unit = u.split_mantissa_unit(kernel)
        lhs = jnp.moveaxis(x_m, 0, lhs_b) if batched else jnp.expand_dims(x_m, lhs_b)
        c_in = lhs.shape[lhs_f]
        if k_m.shape[rhs_i] * self.feature_group_count != c_in:
            raise ValueError(f"ConvOp: kernel shape {tuple(k_m.shape)} has "
                             f"{k_m.shape[rhs_i]} input channels per group, but the input has "
                             f"{c_in} channels and feature_group_count="
                             f"{self.feature_group_count} (needs C_in/groups="
                             f"{c_in / self.feature_group_count:g})")
        if k_m.shape[rhs_o] % self.feature_group_count:
            raise ValueError(f"ConvOp: kernel output channels {k_m.shape[rhs_o]} must be "
                             f"divisible by feature_group_count={self.feature_group_count}")
        dtype = jnp.promote_types(lhs.dtype, k_m.dtype)
        lhs, k_m = lhs.astype(dtype), k_m.astype(dtype)
        y = self._lax_conv(lhs, k_m, dn)
        y = u.maybe_decimal(y * (x_unit * k_unit))
        if "bias" in p:
            b = p["bias"]
            n_o = k_m.shape[rhs_o]
            if not (np.ndim(b) == y.ndim - 1 and tuple(np.shape(b)) == (1,) * (y.ndim - 2) + (n_o,)):
                _check_bias(b, n_o, "ConvOp")   # (C_out,), or 0.1's (1, ..., 1, C_out)
            bshape = [1] * y.ndim
            bshape[out_f] = k_m.shape[rhs_o]
            y = y + u.math.reshape(b, bshape)
        y = u.math.moveaxis(y, out_b, 0)
        if not batched:
            y = y[0]
        return y

    def yw_to_w(self, y, w):
        """Not defined: conv has no compact param-dim layout (raises)."""
        raise _no_compact("ConvOp", "each kernel element is shared by all spatial positions "
                                    "and reaches many output neurons")

    def _kernel(self, weight):
        return self.weight_fn(_apply_mask(weight, self.weight_mask, "ConvOp"))

    def _out_channel_axis(self, dn) -> int:
        """The channel axis of ONE example's output (xw_to_y moves the batch axis first)."""
        out_b, out_f = dn.out_spec[0], dn.out_spec[1]
        return out_f - (1 if out_b < out_f else 0)

    def channel_axes(self, w):
        """The output channel axis of one example's ``y``; the kernel's ``O`` axis and the
        bias's channel axis (its last)."""
        p = _param_dict(w, "ConvOp", ("weight",), allow_bare="weight")
        dn = self._dn(np.ndim(p["weight"]))
        if not isinstance(w, dict):
            return self._out_channel_axis(dn), (dn.rhs_spec[0],)
        axes = {"weight": dn.rhs_spec[0]}
        if "bias" in p:
            axes["bias"] = np.ndim(p["bias"]) - 1
        return self._out_channel_axis(dn), tuple(axes[k] for k in sorted(p))

    def elementwise_maps(self, w):
        """The channel layout needs the conv kernel ``weight_fn(weight * mask)[.., c]`` to
        come from ``weight[.., c]`` only: the frontend proves it element-wise."""
        if self.weight_fn is _identity:
            return ()
        p = _param_dict(w, "ConvOp", ("weight",), allow_bare="weight")
        return (("ConvOp weight_fn", self._kernel, p["weight"]),)

    def channel_jacobian(self, x, w):
        """The input patch each output neuron sees (times ``∂kernel/∂weight`` of an
        element-wise ``weight_fn`` and the mask): ``∂y[.., n]/∂weight[.., c(n)]`` with the
        kernel's ``O`` axis dropped, and 1 for the bias. The patches come from one
        convolution of ``x`` with an identity kernel under the op's own strides, padding,
        dilations, groups and dimension numbers (``x`` mantissas, one example or a batch)."""
        p = _param_dict(w, "ConvOp", ("weight",), allow_bare="weight")
        weight = u.get_mantissa(p["weight"])
        dn = self._dn(np.ndim(weight))
        rhs_o = dn.rhs_spec[0]
        lhs_b, out_b = dn.lhs_spec[0], dn.out_spec[0]
        x = u.get_mantissa(x)
        batched = np.ndim(x) == len(self.xinfo.shape) + 1
        lhs = jnp.moveaxis(x, 0, lhs_b) if batched else jnp.expand_dims(x, lhs_b)
        n_grp = self.feature_group_count
        c_out = weight.shape[rhs_o]
        rest = tuple(np.delete(weight.shape, rhs_o))
        n_p = int(np.prod(rest, dtype=np.int64))
        dtype = jnp.promote_types(lhs.dtype, weight.dtype)
        eye = jnp.moveaxis(jnp.eye(n_p, dtype=dtype).reshape(rest + (n_p,)), -1, rhs_o)
        eye = jnp.concatenate([eye] * n_grp, axis=rhs_o) if n_grp > 1 else eye
        lhs = lhs.astype(dtype)
        pt = self._lax_conv(lhs, eye, dn)                           # channel: (group, patch)
        pt = jnp.moveaxis(pt, out_b, 0)
        cax = self._out_channel_axis(dn) + 1
        pt = jnp.moveaxis(pt, cax, -1)                              # (N, *S without c, G*P)
        lead = pt.shape[:-1]
        pt = pt.reshape(lead + (n_grp, 1, n_p))
        pt = jnp.broadcast_to(pt, lead + (n_grp, c_out // n_grp, n_p)).reshape(lead + (c_out, n_p))
        pt = jnp.moveaxis(pt, -2, cax)
        pt = pt.reshape(pt.shape[:-1] + rest)                     # (N, *S, *rest)
        if self.weight_fn is not _identity or self.weight_mask is not None:
            chain = jnp.moveaxis(_elementwise_chain(self._kernel, weight), rhs_o, 0)  # (C_out, *rest)
            shape = [1] * (pt.ndim - len(rest))
            shape[cax] = c_out
            pt = pt * chain.reshape(tuple(shape) + rest)
        if not batched:
            pt = pt[0]
        if not isinstance(w, dict):
            return [pt]
        s_shape = pt.shape[:pt.ndim - len(rest)]
        out = {"weight": pt}
        if "bias" in p:
            b_rest = (1,) * (np.ndim(p["bias"]) - 1)
            out["bias"] = jnp.ones(s_shape + b_rest, pt.dtype)
        return [out[k] for k in sorted(out)]

    def xy_to_dw(self, x, dy, w):
        """VJP of ``w ↦ xw_to_y(x, w)`` (summed over the batch when ``x`` is batched)."""
        return _vjp(lambda ww: self.xw_to_y(x, ww), w, dy)

    def _repr_fields(self):
        return {
            "is_diagonal": self.is_diagonal,
            "window_strides": self.window_strides,
            "padding": self.padding,
            "lhs_dilation": self.lhs_dilation,
            "rhs_dilation": self.rhs_dilation,
            "feature_group_count": self.feature_group_count,
            "batch_group_count": self.batch_group_count,
            "dimension_numbers": self.dimension_numbers,
            "weight_mask": _array_summary(self.weight_mask),
            "weight_fn": self.weight_fn,
            "xinfo": self.xinfo,
        }


# ---------------------------------------------------------------------------------------
# SpMatMulOp
# ---------------------------------------------------------------------------------------

def _sparse_classes():
    if _be is None:
        return ()
    return tuple(c for c in (getattr(_be, "CSR", None), getattr(_be, "CSC", None))
                 if c is not None)


class SpMatMulOp(ETraceOp):
    r"""Sparse matrix multiplication ``y = x @ M(weight_fn(weight)) + b``.

    ``sparse_mat`` is a :class:`brainevent.CSR` or :class:`brainevent.CSC` of shape
    ``(n_in, n_out)``; it fixes the sparsity structure, and the parameter
    ``{'weight': (nse,), 'bias': (n_out,)}`` (bias optional; a bare data vector is accepted
    too) supplies the stored values (``M(d)`` is ``sparse_mat`` with data ``d``). The product
    uses brainevent's kernels, which are differentiable with respect to the data.

    Param-dim layout: compact. Stored element ``k`` lies in column ``col(k)`` and reaches
    output neuron ``col(k)`` only, so :meth:`yw_to_w` is ``weight * y[col]``.

    Args:
        sparse_mat: the brainevent CSR/CSC matrix (its data is the initial weight).
        weight_fn: function of the data vector, e.g. ``jnp.abs``.

    Example::

        >>> M = brainevent.CSR.fromdense(jnp.eye(3))
        >>> op = SpMatMulOp(M)
        >>> op(jnp.arange(3.), {'weight': M.data})
        Array([0., 1., 2.], dtype=float32)
    """

    kind = "sparse"
    param_trace = "compact"
    x_ndim = 1

    def __init__(self, sparse_mat, weight_fn: Callable = _identity):
        classes = _sparse_classes()
        if not classes or not isinstance(sparse_mat, classes):
            raise TypeError(
                f"SpMatMulOp: sparse_mat must be a brainevent.CSR or brainevent.CSC matrix, got "
                f"{type(sparse_mat).__module__}.{type(sparse_mat).__name__}. (brainevent "
                f"removed COO; build a CSR with brainevent.CSR.fromdense(dense) or "
                f"brainevent.CSR((data, indices, indptr), shape=...), or convert COO indices "
                f"with brainevent.coo2csr.)")
        if len(sparse_mat.shape) != 2:
            raise ValueError(f"SpMatMulOp: sparse_mat must be 2-D, got shape {sparse_mat.shape}")
        self.sparse_mat = sparse_mat
        self.weight_fn = _check_callable(weight_fn, "SpMatMulOp weight_fn")
        self._col = self._column_indices()
        super().__init__(is_diagonal=False)

    @property
    def n_in(self) -> int:
        return int(self.sparse_mat.shape[0])

    @property
    def n_out(self) -> int:
        return int(self.sparse_mat.shape[1])

    @property
    def nse(self) -> int:
        return int(self.sparse_mat.indices.shape[0])

    def _column_indices(self):
        """The output-neuron (column) index of each stored element."""
        m = self.sparse_mat
        if isinstance(m, _be.CSR):
            return jnp.asarray(m.indices)
        # CSC: element k belongs to column j with indptr[j] <= k < indptr[j + 1]
        try:
            indptr = np.asarray(m.indptr)
            return jnp.asarray(np.repeat(np.arange(self.n_out, dtype=np.int32),
                                         np.diff(indptr)))
        except Exception:  # traced structure
            return jnp.repeat(jnp.arange(self.n_out, dtype=jnp.int32), jnp.diff(m.indptr),
                              total_repeat_length=self.nse)

    @property
    def column_indices(self):
        """Column (output neuron) of each stored element, shape ``(nse,)``."""
        return self._col

    #: above this many stored elements the structure is hidden from XLA's constant folding
    fold_limit: int = 1 << 16

    def _with_data(self, data):
        m = self.sparse_mat
        indices, indptr = m.indices, m.indptr
        if self.nse > self.fold_limit:
            # the structure is a constant of the traced step; XLA would constant-fold the
            # kernel's index arithmetic on it, which takes minutes at 10^7 synapses (and saves
            # a third of a step); the barrier keeps the compile in seconds
            indices, indptr = jax.lax.optimization_barrier((jnp.asarray(indices),
                                                           jnp.asarray(indptr)))
        return type(m)((data, indices, indptr), shape=m.shape, backend=m.backend,
                       buffers=m.buffers, check_structure=False)

    def xw_to_y(self, x, w):
        """``y = x @ M(weight_fn(weight)) (+ bias)``; ``x`` is ``(n_in,)`` or
        ``(batch, n_in)``."""
        p = _param_dict(w, "SpMatMulOp", ("weight",), allow_bare="weight")
        data = self.weight_fn(p["weight"])
        if tuple(np.shape(data)) != (self.nse,):
            raise ValueError(f"SpMatMulOp: weight (after weight_fn) must be the data vector of "
                             f"shape ({self.nse},) (one value per stored element), got "
                             f"{tuple(np.shape(data))}")
        if np.ndim(x) not in (1, 2) or np.shape(x)[-1] != self.n_in:
            raise ValueError(f"SpMatMulOp: input shape {tuple(np.shape(x))} does not match the "
                             f"sparse matrix shape {tuple(self.sparse_mat.shape)}; expected "
                             f"({self.n_in},) or (batch, {self.n_in})")
        x_m, x_unit = u.split_mantissa_unit(x)
        d_m, d_unit = u.split_mantissa_unit(data)
        dtype = jnp.promote_types(x_m.dtype, d_m.dtype)
        y = x_m.astype(dtype) @ self._with_data(d_m.astype(dtype))
        y = u.maybe_decimal(y * (x_unit * d_unit))
        if "bias" in p:
            _check_bias(p["bias"], self.n_out, "SpMatMulOp")
            y = y + p["bias"]
        return y

    def yw_to_w(self, y, w):
        """``weight * y[col]`` (element ``k`` feeds output ``col(k)``), ``bias * y``."""
        if isinstance(w, dict):
            return {k: (v * y[..., self._col] if k == "weight" else v * y) for k, v in w.items()}
        return w * y[..., self._col]

    def xy_to_dw(self, x, dy, w):
        """VJP of ``w ↦ xw_to_y(x, w)`` with respect to the data vector (and bias)."""
        return _vjp(lambda ww: self.xw_to_y(x, ww), w, dy)

    def elementwise_maps(self, w):
        """As :meth:`MatMulOp.elementwise_maps`: ``weight_fn`` must act element-wise on the
        data vector."""
        if self.weight_fn is _identity:
            return ()
        p = _param_dict(w, "SpMatMulOp", ("weight",), allow_bare="weight")
        return (("SpMatMulOp weight_fn", self.weight_fn, p["weight"]),)

    def _repr_fields(self):
        return {
            "is_diagonal": self.is_diagonal,
            "sparse_mat": self.sparse_mat,
            "weight_fn": self.weight_fn,
        }


# ---------------------------------------------------------------------------------------
# ElemWiseOp
# ---------------------------------------------------------------------------------------

class ElemWiseOp(ETraceOp):
    r"""An element-wise function of the parameter alone: ``y = fn(θ)``.

    There is no input: ``x`` is ignored (call ``op(None, θ)``). ``fn`` must be element-wise
    (``y`` has ``θ``'s shape and ``y[i]`` depends on ``θ[i]`` only), e.g. a learnable
    time constant ``fn = lambda tau: jnp.exp(-dt / tau)``.

    Param-dim layout: compact and diagonal; :meth:`yw_to_w` is ``θ * y``.

    Args:
        fn: the element-wise function of the parameter.

    Example::

        >>> op = ElemWiseOp(jnp.exp)
        >>> op(None, jnp.zeros(3))
        Array([1., 1., 1.], dtype=float32)
    """

    kind = "elemwise"
    is_diagonal = True
    param_trace = "compact"
    x_ndim = None

    def __init__(self, fn: Callable):
        self.fn = _check_callable(fn, "ElemWiseOp fn")
        super().__init__(is_diagonal=True)

    def xw_to_y(self, x, w):
        """``y = fn(w)``; ``x`` is ignored."""
        return self.fn(w)

    def yw_to_w(self, y, w):
        """``w * y`` (same shape)."""
        return jax.tree.map(lambda leaf: leaf * y, w,
                            is_leaf=lambda a: isinstance(a, u.Quantity))

    def xy_to_dw(self, x, dy, w):
        """VJP of ``fn`` at ``w`` with cotangent ``dy``."""
        return _vjp(self.fn, w, dy)

    def elementwise_maps(self, w):
        """``fn`` must be element-wise in every leaf of the parameter (proven on its jaxpr)."""
        return (("ElemWiseOp fn", self.fn, w),)

    def _repr_fields(self):
        return {"fn": self.fn, "is_diagonal": self.is_diagonal}


# ---------------------------------------------------------------------------------------
# LoraOp
# ---------------------------------------------------------------------------------------

class LoraOp(ETraceOp):
    r"""Low-rank adapter ``y = alpha * (x @ B) @ A + bias``.

    The parameter is ``{'B': (n_in, r), 'A': (r, n_out), 'bias': (n_out,)}`` (bias
    optional).

    Param-dim layout: dense. ``B[i, r]`` reaches every output neuron through ``A``, so no
    parameter-shaped trace is exact; :meth:`yw_to_w` raises.

    Args:
        alpha: scale of the low-rank product (default 1.0).

    Example::

        >>> op = LoraOp(alpha=0.5)
        >>> w = {'B': jnp.ones((4, 2)), 'A': jnp.ones((2, 3))}
        >>> op(jnp.ones(4), w)
        Array([4., 4., 4.], dtype=float32)
    """

    kind = "lora"
    param_trace = "dense"
    x_ndim = 1

    def __init__(self, alpha=None):
        if alpha is None:
            alpha = 1.0
        if not isinstance(alpha, numbers.Number) and not (hasattr(alpha, "shape")
                                                          and np.ndim(alpha) == 0):
            raise TypeError(f"LoraOp: alpha must be a scalar, got {alpha!r}")
        self.alpha = alpha
        super().__init__(is_diagonal=False)

    def xw_to_y(self, x, w):
        """``y = alpha * (x @ B) @ A (+ bias)``; ``x`` is ``(n_in,)`` or ``(batch, n_in)``."""
        p = _param_dict(w, "LoraOp", ("B", "A"))
        B, A = p["B"], p["A"]
        if np.ndim(B) != 2 or np.ndim(A) != 2 or np.shape(B)[1] != np.shape(A)[0]:
            raise ValueError(f"LoraOp: need B of shape (n_in, r) and A of shape (r, n_out), "
                             f"got B {tuple(np.shape(B))} and A {tuple(np.shape(A))}")
        if np.ndim(x) < 1 or np.shape(x)[-1] != np.shape(B)[0]:
            raise ValueError(f"LoraOp: input shape {tuple(np.shape(x))} does not match B's "
                             f"shape {tuple(np.shape(B))} (x's last axis must be "
                             f"n_in={np.shape(B)[0]})")
        y = self.alpha * u.math.matmul(u.math.matmul(x, B), A)
        if "bias" in p:
            _check_bias(p["bias"], np.shape(A)[1], "LoraOp")
            y = y + p["bias"]
        return y

    def yw_to_w(self, y, w):
        """Not defined: LoRA has no compact param-dim layout (raises)."""
        raise _no_compact("LoraOp", "each element of B reaches every output neuron through A")

    def xy_to_dw(self, x, dy, w):
        """VJP of ``w ↦ xw_to_y(x, w)`` for ``B``, ``A`` and ``bias``."""
        return _vjp(lambda ww: self.xw_to_y(x, ww), w, dy)

    def _repr_fields(self):
        return {"is_diagonal": self.is_diagonal, "alpha": self.alpha}
