"""Trace-op layers: Linear, SignedWLinear, SparseLinear, LoRA.

Each layer holds one :class:`brainscale.ETraceParam` applied through its trace op
(``param.execute(x)``), so the compiler sees the layer as one interaction ``y = op(x, θ)``
and keeps an eligibility trace for it. Weight transforms (masks, Dale's-law signs) live in
the op's ``weight_fn`` / ``weight_mask`` and are never applied to the parameter before the
op call: the op must receive the parameter's whole value.

Traces (for an op output ``y`` driving a hidden group of ``k`` states):

=================  ==============  ===============================  ==========================
layer              op              param-dim trace (D-RTRL)         io-dim trace (ES-D-RTRL)
=================  ==============  ===============================  ==========================
Linear             MatMulOp        compact: ``|W| + |b|`` × k       ``ε_x`` (n_in) + ``ε_f`` (n_out × k)
SignedWLinear      MatMulOp        compact: ``|W|`` × k             same as Linear
SparseLinear       SpMatMulOp      compact: ``nse (+ n_out)`` × k   same as Linear
LoRA               LoraOp          dense: ``n_out × |θ|`` × k       same as Linear
=================  ==============  ===============================  ==========================
"""
from __future__ import annotations

from typing import Callable, Optional

import braintools
import brainstate
import brainunit as u
import jax.numpy as jnp
import numpy as np

from ..concepts import ETraceParam
from ..ops import LoraOp, MatMulOp, SpMatMulOp
from ._base import make_param, to_size

__all__ = ["Linear", "SignedWLinear", "SparseLinear", "LoRA"]


_DEFAULT_B_INIT = braintools.init.ZeroInit()


def _bias_value(b_init, n_out, weight, what):
    """The bias; the default zero bias takes the weight's unit (``x`` is usually unitless)."""
    b = _param_value(b_init, (n_out,), what)
    if b_init is _DEFAULT_B_INIT and isinstance(weight, u.Quantity) and not isinstance(b, u.Quantity):
        b = b * weight.unit
    return b


def _mask_value(w_mask, shape, what):
    """A fixed mask: an array, or a callable called with the weight shape (as in 0.1, e.g.
    an initializer drawing a random connectivity)."""
    if w_mask is None:
        return None
    if callable(w_mask) and not hasattr(w_mask, "shape"):
        w_mask = braintools.init.param(w_mask, shape)
    if np.shape(w_mask) != tuple(shape) and np.ndim(w_mask) != 0:
        try:
            np.broadcast_shapes(np.shape(w_mask), tuple(shape))
        except ValueError:
            raise ValueError(f"{what}: w_mask of shape {tuple(np.shape(w_mask))} does not "
                             f"broadcast to the weight shape {tuple(shape)}") from None
    return w_mask


def _param_value(init, shape, what):
    v = braintools.init.param(init, shape, allow_none=False)
    if tuple(np.shape(v)) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(np.shape(v))}, expected {tuple(shape)}")
    return v


class Linear(brainstate.nn.Module):
    r"""Dense layer ``y = x @ W + b`` as a trace op (:class:`brainscale.MatMulOp`).

    Args:
        in_size, out_size: int or tuple; the last entry is the feature count.
        w_init: initializer or array (may be a ``brainunit`` Quantity, e.g. ``mV``) of shape
            ``(n_in, n_out)``.
        b_init: initializer or array of shape ``(n_out,)``; ``None`` for no bias. The
            default (zeros) takes the weight's unit when ``w_init`` carries one.
        w_mask: optional fixed mask of ``W``'s shape (sparse connectivity), or a callable
            called with the weight shape that returns it (0.1); applied inside the op.
        name: module name.
        param_type: the parameter class (0.1's hook): :class:`brainscale.ETraceParam`
            (default), ``brainscale.NonTempParam`` (instantaneous gradient only) or
            ``brainscale.FakeETraceParam`` (fixed).

    The parameter is ``self.weight_op``, an :class:`brainscale.ETraceParam` holding
    ``{'weight': W, 'bias': b}``.

    Example::

        >>> lin = brainscale.nn.Linear(3, 2, w_init=braintools.init.KaimingNormal(unit=u.mV),
        ...                            b_init=braintools.init.ZeroInit(unit=u.mV))
        >>> lin(jnp.ones(3)).shape
        (2,)
    """

    def __init__(self, in_size, out_size, w_init=braintools.init.KaimingNormal(),
                 b_init=_DEFAULT_B_INIT, w_mask=None, name: Optional[str] = None,
                 param_type: type = ETraceParam):
        super().__init__(name=name)
        self.in_size = to_size(in_size, "in_size")
        self.out_size = to_size(out_size, "out_size")
        n_in, n_out = self.in_size[-1], self.out_size[-1]
        params = {"weight": _param_value(w_init, (n_in, n_out), "Linear weight")}
        if b_init is not None:
            params["bias"] = _bias_value(b_init, n_out, params["weight"], "Linear bias")
        self.w_mask = _mask_value(w_mask, (n_in, n_out), "Linear")
        self.weight_op = make_param(param_type, params, MatMulOp(weight_mask=self.w_mask),
                                    "Linear")

    def update(self, x):
        return self.weight_op.execute(x)


class SignedWLinear(brainstate.nn.Module):
    r"""Dense layer with fixed signs (Dale's law): ``y = x @ (|W| ⊙ sign)``.

    ``sign`` is given per presynaptic neuron (``w_sign`` of shape ``(n_in,)``: +1 for
    excitatory, -1 for inhibitory rows) or per synapse (shape ``(n_in, n_out)``). The sign
    is applied through the op's ``weight_fn`` (``abs(W) * sign``), so the trace parameter
    is ``W`` itself.

    Args:
        in_size, out_size: sizes (the last entry is the feature count).
        w_init: initializer or array of shape ``(n_in, n_out)``.
        w_sign: ``None`` (all positive), ``(n_in,)`` or ``(n_in, n_out)`` signs.
        b_init: optional bias initializer (default: no bias, as in 0.1).
        name: module name.
        param_type: the parameter class (see :class:`Linear`).

    Example::

        >>> sign = jnp.array([1., 1., -1.])
        >>> lin = brainscale.nn.SignedWLinear(3, 2, w_sign=sign)
        >>> lin(jnp.array([0., 0., 1.])) <= 0
        Array([ True,  True], dtype=bool)
    """

    def __init__(self, in_size, out_size, w_init=braintools.init.KaimingNormal(),
                 w_sign=None, b_init=None, name: Optional[str] = None,
                 param_type: type = ETraceParam):
        super().__init__(name=name)
        self.in_size = to_size(in_size, "in_size")
        self.out_size = to_size(out_size, "out_size")
        n_in, n_out = self.in_size[-1], self.out_size[-1]
        if w_sign is not None:
            w_sign = jnp.asarray(u.get_mantissa(w_sign))
            if w_sign.ndim == 1:
                if w_sign.shape[0] != n_in:
                    raise ValueError(f"SignedWLinear: w_sign of shape {w_sign.shape} must have "
                                     f"one sign per presynaptic neuron ({n_in},) or the "
                                     f"weight's shape ({n_in}, {n_out})")
                w_sign = w_sign[:, None]
            elif w_sign.shape not in ((n_in, n_out), ()):
                raise ValueError(f"SignedWLinear: w_sign shape {w_sign.shape} must be ({n_in},) "
                                 f"or ({n_in}, {n_out})")
        self.w_sign = w_sign
        params = {"weight": _param_value(w_init, (n_in, n_out), "SignedWLinear weight")}
        if b_init is not None:
            params["bias"] = _param_value(b_init, (n_out,), "SignedWLinear bias")
        sign = w_sign
        if sign is None:
            weight_fn = u.math.abs
        else:
            weight_fn = lambda w: u.math.abs(w) * sign  # noqa: E731
        self.weight_op = make_param(param_type, params, MatMulOp(weight_fn=weight_fn),
                                    "SignedWLinear")

    def update(self, x):
        return self.weight_op.execute(x)


def _to_brainevent(mat):
    import brainevent
    if isinstance(mat, (brainevent.CSR, brainevent.CSC)):
        return mat
    csr_cls = getattr(getattr(u, "sparse", None), "CSR", None)
    csc_cls = getattr(getattr(u, "sparse", None), "CSC", None)
    if csr_cls is not None and isinstance(mat, csr_cls):
        return brainevent.CSR((mat.data, mat.indices, mat.indptr), shape=mat.shape)
    if csc_cls is not None and isinstance(mat, csc_cls):
        return brainevent.CSC((mat.data, mat.indices, mat.indptr), shape=mat.shape)
    coo_cls = getattr(getattr(u, "sparse", None), "COO", None)
    if coo_cls is not None and isinstance(mat, coo_cls):
        return _coo_to_csr(mat)
    if hasattr(mat, "shape") and np.ndim(mat) == 2 and not hasattr(mat, "todense"):
        return brainevent.CSR.fromdense(mat)
    raise TypeError(f"SparseLinear: spar_mat must be a brainevent.CSR/CSC, a brainunit.sparse "
                    f"CSR/CSC/COO or a dense 2-D array to compress, got "
                    f"{type(mat).__module__}.{type(mat).__name__}")


def _coo_to_csr(mat):
    """A ``brainunit.sparse.COO`` as a brainevent CSR with the same stored elements.

    The CSR keeps one entry per stored COO element (duplicates are kept and summed by the
    product, as in COO); entries are ordered row-major, so the data vector (the trainable
    parameter) keeps the COO's order when the COO is sorted by (row, col), as COOs made by
    ``fromdense`` are."""
    import brainevent
    try:
        row, col = np.asarray(mat.row), np.asarray(mat.col)
    except Exception:  # noqa: BLE001 - traced indices
        raise TypeError("SparseLinear: the COO's row/col indices must be concrete arrays (the "
                        "sparsity structure is fixed at construction)") from None
    n_in = int(mat.shape[0])
    order = np.lexsort((col, row))
    data = mat.data
    if not np.array_equal(order, np.arange(order.size)):
        data = data[order]
    indptr = np.zeros(n_in + 1, dtype=np.int32)
    np.add.at(indptr, row[order] + 1, 1)
    return brainevent.CSR((data, jnp.asarray(col[order], jnp.int32),
                           jnp.asarray(np.cumsum(indptr), jnp.int32)), shape=tuple(mat.shape))


class SparseLinear(brainstate.nn.Module):
    r"""Sparse layer ``y = x @ M + b`` with a fixed sparsity structure (``SpMatMulOp``).

    The structure comes from ``spar_mat`` (a :class:`brainevent.CSR` / ``CSC`` of shape
    ``(n_in, n_out)``; a ``brainunit.sparse`` CSR / CSC / COO or a dense array is converted
    to a brainevent CSR/CSC); the trainable parameter is its data vector ``{'weight': data}``
    (plus ``'bias'`` with ``b_init``). A COO's data keeps its order when the COO is sorted
    row-major (``u.sparse.COO.fromdense``); otherwise it is reordered row-major.

    Args:
        spar_mat: the sparse matrix (0.1 called it ``sparse_mat``; both names work).
        b_init: optional bias initializer (default: no bias).
        in_size: optional input shape (its last entry must be ``n_in``).
        name: module name.
        param_type: the parameter class (see :class:`Linear`).

    Example::

        >>> M = brainevent.CSR.fromdense(jnp.eye(3))
        >>> lin = brainscale.nn.SparseLinear(M)
        >>> lin(jnp.arange(3.))
        Array([0., 1., 2.], dtype=float32)
    """

    def __init__(self, spar_mat=None, b_init=None, in_size=None, name: Optional[str] = None,
                 param_type: type = ETraceParam, *, sparse_mat=None):
        super().__init__(name=name)
        if (spar_mat is None) == (sparse_mat is None):
            raise TypeError("SparseLinear needs the sparse matrix once: spar_mat (or 0.1's "
                            "keyword sparse_mat)")
        mat = _to_brainevent(spar_mat if spar_mat is not None else sparse_mat)
        n_in, n_out = int(mat.shape[0]), int(mat.shape[1])
        self.in_size = to_size(in_size, "in_size") if in_size is not None else (n_in,)
        if self.in_size[-1] != n_in:
            raise ValueError(f"SparseLinear: in_size {self.in_size} does not match the matrix "
                             f"shape {tuple(mat.shape)}")
        self.out_size = self.in_size[:-1] + (n_out,)
        params = {"weight": mat.data}
        if b_init is not None:
            params["bias"] = _param_value(b_init, (n_out,), "SparseLinear bias")
        self.weight_op = make_param(param_type, params, SpMatMulOp(mat), "SparseLinear")

    def update(self, x):
        return self.weight_op.execute(x)


class LoRA(brainstate.nn.Module):
    r"""Low-rank adapter ``y = (alpha / r) · (x @ B) @ A [+ base_module(x)]`` (``LoraOp``).

    Signature, defaults and scaling are brainscale 0.1's: ``B`` starts at zero and ``A``
    LeCun-normal, so the adapter starts at 0 (and ``A``'s gradient is zero until ``B`` moves);
    the product is scaled by ``alpha / lora_rank``.

    Args:
        in_features, lora_rank, out_features: sizes (``in_features`` / ``out_features``
            may be tuples; the last entry counts).
        alpha: the scale numerator, kept as ``self.alpha``.
        base_module: optional module added to the adapter output (e.g. a frozen or
            trainable :class:`Linear`).
        B_init, A_init: initializers of ``B (in, r)`` and ``A (r, out)``.
        param_type: the parameter class (see :class:`Linear`).
        scale_by_rank: ``True`` (0.1): scale by ``alpha / lora_rank``; ``False``: by
            ``alpha`` alone (this package's earlier LoRA).
        name: module name.

    The param-dim trace of LoRA is dense (``B[i, r]`` reaches every output neuron), so
    prefer io-dim (``DiagIODimAlgorithm``) for large layers.

    Example::

        >>> lora = brainscale.nn.LoRA(4, 2, 3, alpha=0.5)
        >>> lora.alpha, lora.weight_op.op.alpha
        (0.5, 0.25)
        >>> bool((lora(jnp.ones(4)) == 0.).all())          # B = 0 at init
        True
    """

    def __init__(self, in_features, lora_rank: int, out_features, *,
                 alpha: float = 1.0, base_module: Optional[Callable] = None,
                 B_init=braintools.init.ZeroInit(), A_init=braintools.init.LecunNormal(),
                 param_type: type = ETraceParam, scale_by_rank: bool = True, in_size=None,
                 name: Optional[str] = None):
        super().__init__(name=name)
        n_in = to_size(in_features, "in_features")[-1]
        n_out = to_size(out_features, "out_features")[-1]
        if not isinstance(lora_rank, (int, np.integer)) or isinstance(lora_rank, bool) \
                or lora_rank <= 0:
            raise ValueError(f"LoRA: lora_rank must be a positive int, got {lora_rank!r}")
        self.in_features, self.lora_rank, self.out_features = in_features, int(lora_rank), \
            out_features
        self.alpha = alpha
        self.scale_by_rank = bool(scale_by_rank)
        self.in_size = to_size(in_size, "in_size") if in_size is not None else (n_in,)
        self.out_size = self.in_size[:-1] + (n_out,)
        if base_module is not None and not callable(base_module):
            raise TypeError(f"LoRA: base_module must be callable, got {base_module!r}")
        self.base_module = base_module
        params = {"B": _param_value(B_init, (n_in, self.lora_rank), "LoRA B"),
                  "A": _param_value(A_init, (self.lora_rank, n_out), "LoRA A")}
        scale = alpha / self.lora_rank if self.scale_by_rank else alpha
        self.weight_op = make_param(param_type, params, LoraOp(scale), "LoRA")

    def update(self, x):
        y = self.weight_op.execute(x)
        if self.base_module is not None:
            y = y + self.base_module(x)
        return y
