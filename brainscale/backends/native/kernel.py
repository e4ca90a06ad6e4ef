"""The native CPU D-RTRL kernel behind the contract of the Pallas trio.

:func:`native_drtrl_multi` takes and returns what :func:`~..pallas.drtrl.drtrl_multi` does
(:class:`~..pallas.drtrl.DrtrlItem` per trace, ``(eps_new, grad)`` per item), with the
same layout and math (trace storage float32 or bfloat16; arithmetic float32, the
contraction reads the new values before they are rounded for storage). Each item is one XLA FFI call
(``drtrl.cc``): the one-pass step reads ``ε^{t-1}`` once, writes ``ε^t`` in place (the trace
is aliased to the output) and adds ``Σ_b Σ_i δ ε^t`` into the running gradient (aliased
too) while the new values are in registers.

:func:`native_outer_acc` adds a rank-R product ``xᵀ s`` into a weight gradient in place (the
per-step ES-D-RTRL gradient of a dense ``MatMulOp``), with the contract of
:func:`~..online_driver.window_accumulate`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..pallas._common import SUPPORTED_STORAGE
from ..pallas.drtrl import DrtrlItem, _batched, _check, check_operands
from .build import register

__all__ = ["native_drtrl_multi", "native_drtrl_step", "native_decay_add",
           "native_outer_acc", "native_outer_acc_multi"]

f32 = jnp.float32
#: under ``jax.vmap`` (e.g. an ensemble of learners) the kernel runs once per mapped element
VMAP = "sequential"


#: the trace storage the kernel reads and writes, as the Pallas kernels (arithmetic float32)
STORAGE = tuple(jnp.dtype(s) for s in SUPPORTED_STORAGE)


def _storage(eps, what: str):
    if eps.dtype not in STORAGE:
        raise ValueError(f"native {what}: the trace must be float32 or bfloat16, got "
                         f"{eps.dtype}")


def _one(it: DrtrlItem, update: bool, grad: bool):
    B, I, O, k = it.eps.shape
    _storage(it.eps, "D-RTRL kernel")
    check_operands(it, update, grad)
    register()
    ph = jnp.zeros((1, 1), f32)
    eps_t = jax.ShapeDtypeStruct((B, I, O, k), it.eps.dtype)
    g_t = jax.ShapeDtypeStruct((I, O), f32)
    has_c = np.int64(it.c is not None)
    acc = np.int64(it.grad_acc is not None)
    if update:
        c = it.c.astype(f32) if it.c is not None else ph
        args = (it.eps, it.J.astype(f32), it.df.astype(f32), it.x.astype(f32), c)
    if update and grad:
        gacc = it.grad_acc.astype(f32) if it.grad_acc is not None else ph
        aliases = {0: 0, 6: 1} if it.grad_acc is not None else {0: 0}
        e_new, g = jax.ffi.ffi_call("brainscale_drtrl_step", (eps_t, g_t),
                                    input_output_aliases=aliases, vmap_method=VMAP)(
            *args, it.delta.astype(f32), gacc, has_c=has_c, accumulate=acc)
        return e_new, g
    if update:
        e_new = jax.ffi.ffi_call("brainscale_drtrl_update", eps_t,
                                 input_output_aliases={0: 0}, vmap_method=VMAP)(*args,
                                                                              has_c=has_c)
        return e_new, None
    gacc = it.grad_acc.astype(f32) if it.grad_acc is not None else ph
    g = jax.ffi.ffi_call("brainscale_drtrl_grad", g_t,
                         input_output_aliases={2: 0} if it.grad_acc is not None else {},
                         vmap_method=VMAP)(
        it.eps, it.delta.astype(f32), gacc, accumulate=acc)
    return None, g


def native_drtrl_multi(items: Sequence[DrtrlItem], *, update: bool = True, grad: bool = True):
    """:func:`~..pallas.drtrl.drtrl_multi`'s contract on the native CPU kernel: one
    ``(eps_new or None, grad or None)`` per item; ``grad`` is float32 (I, O)."""
    if not update and not grad:
        raise ValueError("native_drtrl_multi: nothing to do (update=False, grad=False)")
    out = []
    for item in items:
        it, batched = _batched(item)
        e_new, g = _one(it, update, grad)
        if e_new is not None and not batched:
            e_new = e_new[0]
        out.append((e_new, g))
    return out


def native_drtrl_step(eps, J, df, x, delta, c=None, grad_acc=None):
    """One-pass D-RTRL step on the native kernel: ``(eps_new, grad)``."""
    return native_drtrl_multi([DrtrlItem(eps, J, df, x, c, delta, grad_acc)])[0]


def native_decay_add(eps, J, cur):
    """``ε'[.., a, n, i] = Σ_j J[.., n, i, j] ε[.., a, n, j] + cur[.., a, n, i]`` in place on
    the native kernel (a window's advance: ``J = Φ_{K,0}``, ``cur`` the window's current
    term). ``eps``: ``(B, I, O, k)`` or ``(I, O, k)``, float32 or bfloat16 (stored rounded);
    ``cur`` the same shape (float32 arithmetic); ``J``: ``(B, O, k, k)`` or ``(O, k, k)``."""
    batched = eps.ndim == 4
    if not batched:
        eps, J, cur = eps[None], J[None], cur[None]
    B, I, O, k = eps.shape
    _storage(eps, "decay-add")
    _check(J, (B, O, k, k), "J")
    _check(cur, (B, I, O, k), "cur")
    register()
    out = jax.ffi.ffi_call("brainscale_drtrl_decay_add",
                           jax.ShapeDtypeStruct(eps.shape, eps.dtype),
                           input_output_aliases={0: 0}, vmap_method=VMAP)(
        eps, J.astype(f32), cur.astype(f32))
    return out if batched else out[0]


def _outer_operands(eps_x, signal, grad, chain):
    """``(X, S, c, grad)`` of one outer-accumulate, checked (float32, rows flattened)."""
    if grad.dtype != f32 or grad.ndim != 2:
        raise ValueError(f"native outer-accumulate: the gradient must be float32 (I, O), got "
                         f"{grad.dtype} {tuple(grad.shape)}")
    I, O = grad.shape
    if eps_x.shape[-1:] != (I,) or signal.shape[-1:] != (O,) or \
            int(np.prod(eps_x.shape[:-1])) != int(np.prod(signal.shape[:-1])):
        raise ValueError(f"native outer-accumulate: eps_x {tuple(eps_x.shape)} and signal "
                         f"{tuple(signal.shape)} must be (..., I) and (..., O) with the same "
                         f"leading shape, for a gradient of shape {(I, O)}")
    if chain is not None:
        _check(chain, (I, O), "chain")
    X = eps_x.reshape(-1, I).astype(f32)
    S = signal.reshape(-1, O).astype(f32)
    c = chain.astype(f32) if chain is not None else jnp.zeros((1, 1), f32)
    return X, S, c, grad


def native_outer_acc(eps_x, signal, grad, chain=None):
    """``grad + chain ⊙ (Xᵀ S)`` in place on the native kernel, with X, S the rows of
    ``eps_x`` ``(..., I)`` and ``signal`` ``(..., O)`` (the contract of
    :func:`~..online_driver.window_accumulate`). ``grad`` (I, O) must be float32: it is
    aliased to the result, which XLA then keeps in place in a loop carry."""
    ops = _outer_operands(eps_x, signal, grad, chain)
    register()
    return jax.ffi.ffi_call("brainscale_outer_acc", jax.ShapeDtypeStruct(grad.shape, f32),
                            input_output_aliases={3: 0}, vmap_method=VMAP)(
        *ops, has_c=np.int64(chain is not None))


def native_outer_acc_multi(items):
    """:func:`native_outer_acc` of several weights in one kernel call: ``items`` is a list of
    ``(eps_x, signal, grad, chain)``, the result the list of new gradients. One call shares
    the thread pool's start-up over every weight of the step (module ``drtrl.cc``)."""
    items = list(items)
    if not items:
        raise ValueError("native outer-accumulate (multi): no weights given")
    if len(items) == 1:
        return [native_outer_acc(*items[0])]
    ops = [_outer_operands(*it) for it in items]
    register()
    outs = jax.ffi.ffi_call(
        "brainscale_outer_acc_multi",
        [jax.ShapeDtypeStruct(it[2].shape, f32) for it in items],
        input_output_aliases={4 * q + 3: q for q in range(len(items))}, vmap_method=VMAP)(
        *[a for op in ops for a in op],
        has_c=np.asarray([it[3] is not None for it in items], np.int64))
    return list(outs)
