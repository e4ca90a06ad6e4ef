"""Convolution layers as trace ops (:class:`brainscale.ConvOp`), channels-last.

``in_size`` is the shape of ONE example, channels last: ``(L, C)`` for :class:`Conv1d`,
``(H, W, C)`` for :class:`Conv2d`, ``(D, H, W, C)`` for :class:`Conv3d`. Inputs may carry
one extra leading batch axis. ``out_size`` is computed at construction (``(*spatial',
C_out)``); a neuron group driven by the layer must have that shape.

Traces: a kernel element is shared by every spatial position, so the param-dim (D-RTRL)
trace is *dense* (``|y| · |θ| · k`` elements per example); the io-dim (ES-D-RTRL) trace is
``|x| + |y| · k``. The hybrid algorithm's cost model picks between them.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import braintools
import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from ..concepts import ETraceParam
from ..ops import ConvOp
from ._base import make_param, to_size
from ._linear import _mask_value

__all__ = ["Conv1d", "Conv2d", "Conv3d"]


def _tuple(v, n, what):
    if isinstance(v, (numbers.Integral, np.integer)):
        return (int(v),) * n
    v = tuple(int(a) for a in v)
    if len(v) == 1:
        return v * n
    if len(v) != n:
        raise ValueError(f"{what} must be an int or {n} ints, got {v}")
    return v


def _padding(padding, n, cls):
    """0.1's padding forms: ``'SAME'``/``'VALID'``, an int, one flat ``(lo, hi)`` pair used
    for every spatial dim, one pair per dim, or a one-pair sequence ``[(lo, hi)]``."""
    def is_int(a):
        return isinstance(a, (numbers.Integral, np.integer)) and not isinstance(a, bool)
    if isinstance(padding, str):
        return padding
    if is_int(padding):
        return tuple((int(padding), int(padding)) for _ in range(n))
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(map(is_int, padding)):
        return ((int(padding[0]), int(padding[1])),) * n
    if isinstance(padding, (tuple, list)) and padding and all(
            isinstance(p, (tuple, list)) and len(p) == 2 and all(map(is_int, p)) for p in padding):
        pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
        if len(pairs) == 1:
            return pairs * n
        if len(pairs) == n:
            return pairs
    raise ValueError(f"{cls}: padding must be 'SAME', 'VALID', an int, one (lo, hi) pair, or "
                     f"{n} (lo, hi) pairs (one per spatial dim), got {padding!r}")


class _Conv(brainstate.nn.Module):
    num_spatial_dims: int = 0

    def __init__(self, in_size: Sequence[int], out_channels: int, kernel_size, stride=1,
                 padding="SAME", lhs_dilation=1, rhs_dilation=1, groups: int = 1,
                 w_init=braintools.init.XavierNormal(), b_init=None, w_mask=None,
                 name: Optional[str] = None, param_type: type = ETraceParam):
        super().__init__(name=name)
        n = self.num_spatial_dims
        in_size = to_size(in_size, "in_size")
        if len(in_size) != n + 1:
            raise ValueError(f"{type(self).__name__}: in_size must be one example's shape "
                             f"(*spatial[{n}], channels) with channels last, got {in_size}")
        self.in_size = in_size
        self.in_channels = in_size[-1]
        self.out_channels = int(out_channels)
        if self.in_channels % groups or self.out_channels % groups:
            raise ValueError(f"{type(self).__name__}: in_channels={self.in_channels} and "
                             f"out_channels={self.out_channels} must be divisible by "
                             f"groups={groups}")
        self.kernel_size = _tuple(kernel_size, n, "kernel_size")
        self.stride = _tuple(stride, n, "stride")
        self.lhs_dilation = _tuple(lhs_dilation, n, "lhs_dilation")
        self.rhs_dilation = _tuple(rhs_dilation, n, "rhs_dilation")
        self.groups = int(groups)
        padding = _padding(padding, n, type(self).__name__)
        self.padding = padding
        kshape = self.kernel_size + (self.in_channels // self.groups, self.out_channels)
        self.kernel_shape = kshape
        w_mask = _mask_value(w_mask, kshape, type(self).__name__)
        self.w_mask = w_mask
        params = {"weight": braintools.init.param(w_init, kshape, allow_none=False)}
        if tuple(np.shape(params["weight"])) != kshape:
            raise ValueError(f"{type(self).__name__}: kernel shape "
                             f"{tuple(np.shape(params['weight']))}, expected {kshape}")
        if b_init is not None:
            params["bias"] = braintools.init.param(b_init, (self.out_channels,), allow_none=False)
        op = ConvOp(jax.ShapeDtypeStruct(in_size, jnp.float32), window_strides=self.stride,
                    padding=padding, lhs_dilation=self.lhs_dilation,
                    rhs_dilation=self.rhs_dilation, feature_group_count=self.groups,
                    weight_mask=w_mask)
        self.weight_op = make_param(param_type, params, op, type(self).__name__)
        out = jax.eval_shape(lambda x, w: op.xw_to_y(x, w),
                             jax.ShapeDtypeStruct(in_size, jnp.float32), params)
        self.out_size = tuple(out.shape)

    def update(self, x):
        return self.weight_op.execute(x)


class Conv1d(_Conv):
    r"""1-D convolution, channels last: ``in_size = (L, C)``.

    Args: ``in_size, out_channels, kernel_size, stride=1, padding='SAME', lhs_dilation=1,
    rhs_dilation=1, groups=1, w_init=XavierNormal(), b_init=None, w_mask=None, name,
    param_type=ETraceParam`` (0.1's signature). ``padding`` is ``'SAME'``, ``'VALID'``, an
    int, one ``(lo, hi)`` pair for every spatial dim, or one pair per dim; ``w_mask`` an
    array of the kernel's shape or a callable called with it; ``b_init`` gives a bias of
    shape ``(out_channels,)``.

    Example::

        >>> conv = brainscale.nn.Conv1d((8, 2), 3, kernel_size=3, stride=2)
        >>> conv.out_size
        (4, 3)
        >>> conv(jnp.ones((5, 8, 2))).shape
        (5, 4, 3)
    """
    num_spatial_dims = 1


class Conv2d(_Conv):
    r"""2-D convolution, channels last: ``in_size = (H, W, C)``.

    Example::

        >>> conv = brainscale.nn.Conv2d((6, 6, 1), 2, kernel_size=3, b_init=braintools.init.ZeroInit())
        >>> conv(jnp.ones((6, 6, 1))).shape
        (6, 6, 2)
    """
    num_spatial_dims = 2


class Conv3d(_Conv):
    r"""3-D convolution, channels last: ``in_size = (D, H, W, C)``.

    Example::

        >>> conv = brainscale.nn.Conv3d((4, 4, 4, 1), 2, kernel_size=2, padding='VALID')
        >>> conv.out_size
        (3, 3, 3, 2)
    """
    num_spatial_dims = 3
