"""D-RTRL (param-dim) kernels for matmul-like ops: the Pallas trio.

Trace layout (the JAX backend's, algorithms.md section 3, compact ``MatMulOp``)::

    eps   (B, I, O, k)   ε_W[b, a, n, i]           storage float32 or bfloat16
    J     (B, O, k, k)   J[b, n, i, j] = ∂h_{n,i}^t/∂h_{n,j}^{t-1}
    df    (B, O, k)      df[b, n, i]  = ∂h_{n,i}^t/∂y_n^t
    x     (B, I)         the op input x^t
    c     (I, O)         ∂W_eff/∂W (weight_fn' × mask), or None for 1
    delta (B, O, k)      δ[b, n, i]   = ∂L^t/∂h_{n,i}^t

    update:  ε'[b,a,n,i] = Σ_j J[b,n,i,j] ε[b,a,n,j] + x[b,a] c[a,n] df[b,n,i]
    grad:    g[a,n]      = (g_acc[a,n] +) Σ_b Σ_i δ[b,n,i] ε'[b,a,n,i]

One kernel body, three uses:

* ``update=True, grad=True`` — the one-pass step (:func:`drtrl_step`): the trace is read
  once and written once (in place, ``input_output_aliases``), and the weight gradient is
  accumulated from the new values while they are still in registers;
* ``update=True, grad=False`` — the trace update of the learner's forward (:func:`drtrl_update`);
* ``update=False, grad=True`` — the contraction of the learner's backward (:func:`drtrl_grad`).

Several traces of equal shape run in one launch (:func:`drtrl_multi`): each program walks
the same (bi, bo) tile of every trace in turn. A program owns one (bi, bo) tile of the
weight and loops over the batch in chunks of ``bb`` rows inside the kernel, so the batch
reduction never crosses programs (GPU-safe, deterministic). Arithmetic and accumulation are
float32 whatever the storage dtype. I and O are zero-padded to tile multiples only when no
power-of-two tile divides them (zero is neutral for every term); the batch is never padded.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._common import Tiles, compiler_params, pad_axis, pow2_tile, round_up

__all__ = ["DrtrlItem", "drtrl_kernel", "drtrl_multi", "drtrl_step", "drtrl_update", "check_operands",
           "drtrl_grad", "drtrl_reference", "drtrl_tiles", "drtrl_plan"]

f32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST


@dataclass
class DrtrlItem:
    """One trace of a (multi-trace) launch; unused fields are None."""
    eps: jax.Array
    J: jax.Array | None = None
    df: jax.Array | None = None
    x: jax.Array | None = None
    c: jax.Array | None = None
    delta: jax.Array | None = None
    grad_acc: jax.Array | None = None


jax.tree_util.register_dataclass(
    DrtrlItem, data_fields=["eps", "J", "df", "x", "c", "delta", "grad_acc"], meta_fields=[])


# ---------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------

def drtrl_kernel(*refs, n: int, k: int, bb: int, nb: int, has_c: tuple, update: bool,
                 grad: bool, accumulate: tuple):
    """Pallas body. ``refs`` = inputs then outputs; per trace t the inputs are
    ``eps [J df x] [c] [delta] [g_acc]`` and the outputs ``[eps_new] [grad]``."""
    ins, pos = [], 0
    for t in range(n):
        r = {"eps": refs[pos]}
        pos += 1
        if update:
            r["J"], r["df"], r["x"] = refs[pos:pos + 3]
            pos += 3
            if has_c[t]:
                r["c"] = refs[pos]
                pos += 1
        if grad:
            r["delta"] = refs[pos]
            pos += 1
            if accumulate[t]:
                r["g_acc"] = refs[pos]
                pos += 1
        ins.append(r)
    for t in range(n):
        if update:
            ins[t]["out"] = refs[pos]
            pos += 1
        if grad:
            ins[t]["gout"] = refs[pos]
            pos += 1
    cvals = [ins[t]["c"][...].astype(f32) if update and has_c[t] else None for t in range(n)]

    def chunk(ci, accs):
        rows = pl.ds(ci * bb, bb) if nb > 1 else slice(None)
        new_accs = []
        for t in range(n):
            r = ins[t]
            if update:
                es = [r["eps"][rows, :, :, j].astype(f32) for j in range(k)]   # all reads first:
                xv = r["x"][rows, :].astype(f32)[:, :, None]                  # eps and out alias
                vals = []
                for i in range(k):
                    cur = xv * r["df"][rows, :, i].astype(f32)[:, None, :]
                    if cvals[t] is not None:
                        cur = cur * cvals[t][None, :, :]
                    for j in range(k):
                        cur = cur + r["J"][rows, :, i, j].astype(f32)[:, None, :] * es[j]
                    vals.append(cur)
                for i in range(k):
                    r["out"][rows, :, :, i] = vals[i].astype(r["out"].dtype)
            else:
                vals = [r["eps"][rows, :, :, i].astype(f32) for i in range(k)]
            if grad:
                a = accs[t]
                for i in range(k):
                    a = a + jnp.sum(r["delta"][rows, :, i].astype(f32)[:, None, :] * vals[i],
                                    axis=0)
                new_accs.append(a)
        return tuple(new_accs)

    if grad:
        shape = ins[0]["gout"].shape
        accs = tuple(ins[t]["g_acc"][...].astype(f32) if accumulate[t] else jnp.zeros(shape, f32)
                     for t in range(n))
    else:
        accs = ()
    if nb > 1:
        accs = jax.lax.fori_loop(0, nb, chunk, accs)
    else:
        accs = chunk(0, accs)
    if grad:
        for t in range(n):
            ins[t]["gout"][...] = accs[t].astype(ins[t]["gout"].dtype)


# ---------------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------------

def drtrl_plan(B: int, I: int, O: int, tiles: Tiles | None = None,
               min_bi: int = 1, min_bo: int = 8) -> tuple[int, int, int, int, int]:
    """``(bb, bi, bo, I_padded, O_padded)`` for a trace of shape (B, I, O, k).

    ``bb`` is the largest power of two <= ``tiles.bb`` dividing B (the batch is never
    padded); ``bi``/``bo`` are power-of-two divisors of I/O when there are ones
    >= ``min_bi``/``min_bo``, else the axis is padded.
    """
    tiles = tiles or Tiles()
    bb, _ = pow2_tile(B, tiles.bb, 1)
    bi, _ = pow2_tile(I, tiles.bi, min(min_bi, tiles.bi))
    bo, _ = pow2_tile(O, tiles.bo, min(min_bo, tiles.bo))
    return bb, bi, bo, round_up(I, bi), round_up(O, bo)


def drtrl_tiles(B: int, I: int, O: int, k: int, tiles: Tiles | None = None) -> dict:
    """Human-readable summary of :func:`drtrl_plan` (for dumps and the benchmark)."""
    bb, bi, bo, Ip, Op = drtrl_plan(B, I, O, tiles)
    return dict(bb=bb, bi=bi, bo=bo, grid=(Ip // bi, Op // bo), padded=(Ip != I or Op != O))


def _batched(item: DrtrlItem) -> tuple[DrtrlItem, bool]:
    """Give unbatched (I, O, k) traces a batch axis of 1 (a free reshape)."""
    if item.eps.ndim == 4:
        return item, True
    if item.eps.ndim != 3:
        raise ValueError(f"D-RTRL trace must be (B, I, O, k) or (I, O, k), got {item.eps.shape}")
    add = lambda a: None if a is None else a[None]  # noqa: E731
    return DrtrlItem(item.eps[None], add(item.J), add(item.df), add(item.x), item.c,
                     add(item.delta), item.grad_acc), False


def drtrl_multi(items: Sequence[DrtrlItem], *, update: bool = True, grad: bool = True,
                tiles: Tiles | None = None, interpret: bool = False):
    """Run :func:`drtrl_kernel` on several traces of one shape in one launch.

    Returns one ``(eps_new or None, grad or None)`` per item; ``grad`` is float32 (I, O).
    ``eps`` is updated in place when the caller donates it (a ``scan`` carry, or
    ``jit(..., donate_argnums=...)``); otherwise XLA copies it first.
    """
    if not items:
        return []
    if not update and not grad:
        raise ValueError("drtrl_multi: nothing to do (update=False, grad=False)")
    tiles = tiles or Tiles()
    prepared = [_batched(it) for it in items]
    its = [p[0] for p in prepared]
    B, I, O, k = its[0].eps.shape
    for it in its:
        if it.eps.shape != (B, I, O, k) or it.eps.dtype != its[0].eps.dtype:
            raise ValueError("drtrl_multi: all traces of one launch need the same shape and "
                             f"dtype, got {it.eps.shape}/{it.eps.dtype} and "
                             f"{(B, I, O, k)}/{its[0].eps.dtype}")
        check_operands(it, update, grad)
    bb, bi, bo, Ip, Op = drtrl_plan(B, I, O, tiles)
    nb = B // bb
    grid = (Ip // bi, Op // bo)
    n = len(its)
    has_c = tuple(update and it.c is not None for it in its)
    accumulate = tuple(grad and it.grad_acc is not None for it in its)

    eps_spec = pl.BlockSpec((B, bi, bo, k), lambda i, j: (0, i, j, 0))
    J_spec = pl.BlockSpec((B, bo, k, k), lambda i, j: (0, j, 0, 0))
    v_spec = pl.BlockSpec((B, bo, k), lambda i, j: (0, j, 0))
    x_spec = pl.BlockSpec((B, bi), lambda i, j: (0, i))
    w_spec = pl.BlockSpec((bi, bo), lambda i, j: (i, j))

    args, in_specs, out_specs, out_shape, aliases = [], [], [], [], {}
    for t, it in enumerate(its):
        eps_idx = len(args)
        args.append(pad_axis(pad_axis(it.eps, 1, Ip), 2, Op))
        in_specs.append(eps_spec)
        if update:
            args += [pad_axis(it.J, 1, Op), pad_axis(it.df, 1, Op), pad_axis(it.x, 1, Ip)]
            in_specs += [J_spec, v_spec, x_spec]
            if has_c[t]:
                args.append(pad_axis(pad_axis(it.c, 0, Ip), 1, Op))
                in_specs.append(w_spec)
        if grad:
            args.append(pad_axis(it.delta, 1, Op))
            in_specs.append(v_spec)
            if accumulate[t]:
                acc_idx = len(args)
                args.append(pad_axis(pad_axis(it.grad_acc.astype(f32), 0, Ip), 1, Op))
                in_specs.append(w_spec)
        if update:
            aliases[eps_idx] = len(out_shape)
            out_shape.append(jax.ShapeDtypeStruct((B, Ip, Op, k), it.eps.dtype))
            out_specs.append(eps_spec)
        if grad:
            if accumulate[t]:
                aliases[acc_idx] = len(out_shape)
            out_shape.append(jax.ShapeDtypeStruct((Ip, Op), f32))
            out_specs.append(w_spec)
    kernel = functools.partial(drtrl_kernel, n=n, k=k, bb=bb, nb=nb, has_c=has_c,
                               update=update, grad=grad, accumulate=accumulate)
    outs = pl.pallas_call(
        kernel, out_shape=tuple(out_shape), grid=grid, in_specs=in_specs,
        out_specs=tuple(out_specs), input_output_aliases=aliases, interpret=interpret,
        compiler_params=compiler_params(tiles.num_warps, tiles.num_stages),
        name=f"drtrl_{'update' if not grad else 'grad' if not update else 'step'}_x{n}",
    )(*args)
    res, pos = [], 0
    for t, (it, batched) in enumerate(prepared):
        e_new = g = None
        if update:
            e_new = outs[pos][:, :I, :O]
            pos += 1
            if not batched:
                e_new = e_new[0]
        if grad:
            g = outs[pos][:I, :O]
            pos += 1
        res.append((e_new, g))
    return res


def check_operands(it: DrtrlItem, update: bool, grad: bool) -> None:
    """The operands a call needs, with the shapes the batched trace ``(B, I, O, k)`` implies
    (a ValueError naming the first that is missing or misshapen)."""
    B, I, O, k = it.eps.shape
    if update:
        _check(it.J, (B, O, k, k), "J")
        _check(it.df, (B, O, k), "df")
        _check(it.x, (B, I), "x")
        if it.c is not None:
            _check(it.c, (I, O), "c")
    if grad:
        _check(it.delta, (B, O, k), "delta")
        if it.grad_acc is not None:
            _check(it.grad_acc, (I, O), "grad_acc")


def _check(a, shape, name):
    if a is None:
        raise ValueError(f"drtrl: {name} is required for this call")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"drtrl: {name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def drtrl_step(eps, J, df, x, delta, c=None, grad_acc=None, *, tiles: Tiles | None = None,
               interpret: bool = False):
    """One-pass D-RTRL step: returns ``(eps_new, grad)`` reading/writing the trace once."""
    return drtrl_multi([DrtrlItem(eps, J, df, x, c, delta, grad_acc)], update=True, grad=True,
                       tiles=tiles, interpret=interpret)[0]


def drtrl_update(eps, J, df, x, c=None, *, tiles: Tiles | None = None, interpret: bool = False):
    """Trace update only (decay by J + new outer product), in place: returns ``eps_new``."""
    return drtrl_multi([DrtrlItem(eps, J, df, x, c)], update=True, grad=False, tiles=tiles,
                       interpret=interpret)[0][0]


def drtrl_grad(eps, delta, grad_acc=None, *, tiles: Tiles | None = None,
               interpret: bool = False):
    """Contraction only: ``(grad_acc +) Σ_b Σ_i δ[b,n,i] ε[b,a,n,i]`` (float32)."""
    return drtrl_multi([DrtrlItem(eps, delta=delta, grad_acc=grad_acc)], update=False,
                       grad=True, tiles=tiles, interpret=interpret)[0][1]


# ---------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------

def drtrl_reference(eps, J=None, df=None, x=None, delta=None, c=None, grad_acc=None, *,
                    update: bool = True, grad: bool = True):
    """Pure-JAX reference of the kernel (float32 arithmetic, storage dtype kept).

    Returns ``(eps_new or None, grad or None)``.
    """
    batched = eps.ndim == 4
    if not batched:
        eps = eps[None]
        J, df, x, delta = (None if a is None else a[None] for a in (J, df, x, delta))
    e = eps.astype(f32)
    new = None
    if update:
        dec = jnp.einsum("bnij,banj->bani", J.astype(f32), e, precision=_HI)
        cur = x.astype(f32)[:, :, None, None] * df.astype(f32)[:, None, :, :]
        if c is not None:
            cur = cur * c.astype(f32)[None, :, :, None]
        new = dec + cur
    g = None
    if grad:
        src = new if update else e
        g = jnp.einsum("bni,bani->an", delta.astype(f32), src, precision=_HI)
        if grad_acc is not None:
            g = grad_acc.astype(f32) + g
    if new is not None:
        new = new.astype(eps.dtype)
        if not batched:
            new = new[0]
    return new, g
