"""ES-D-RTRL chunked weight gradients: the Pallas trio plus the XLA form.

With io-dim traces the weight gradient of a matmul op at step t is
``c ⊙ (ε_x^tᵀ s^t)`` with ``s^t = Σ_i ε_f^t[..., i] ∘ δ^t[..., i]`` (algorithms.md section 4).
Summed over a window of K steps, K rank-B updates of the (I, O) gradient — K
read-modify-writes of ``I·O`` floats — become one product of two (K·B)-row matrices::

    G ← G + c ⊙ (Xᵀ S),   X = [ε_x^1; …; ε_x^K] (K·B, I),  S = [s^1; …; s^K] (K·B, O)

:func:`es_chunked_grad_reference` is that product in XLA (one ``dot_general``: cuBLAS on a
GPU, which the H100 measurements in pallas-notes §2.3 put about 2× ahead of a Triton GEMM
at float32 HIGHEST); :func:`es_chunked_grad` is the Pallas kernel (a program per (bi, bo)
tile of G, looping over row chunks of ``bk`` with ``dot_general``, G aliased in place);
:func:`es_perstep_grad_reference` is the per-step accumulation that chunking replaces.
:func:`es_accumulate` picks one of the first two.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._common import compiler_params, pad_axis, pow2_tile, round_up

__all__ = ["EsTiles", "es_chunked_grad_kernel", "es_chunked_grad", "es_chunked_grad_reference",
           "es_perstep_grad_reference", "es_accumulate"]

f32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST


@dataclass(frozen=True)
class EsTiles:
    """Tiles of the chunked GEMM: (bi, bo) output tile, bk rows per dot (>= 16 for tl.dot).
    64×64×32 with 4 warps and 2 stages fits the H100's shared memory (pallas-notes §2.3)."""
    bi: int = 64
    bo: int = 64
    bk: int = 32
    num_warps: int = 4
    num_stages: int = 2


def es_chunked_grad_kernel(x_ref, s_ref, *refs, nr: int, bk: int, has_c: bool):
    """``g_out = g + c ⊙ Σ_r x[r]ᵀ s[r]`` for one (bi, bo) tile; refs = [c] g g_out."""
    if has_c:
        c_ref, g_ref, o_ref = refs
    else:
        g_ref, o_ref = refs
    bi, bo = o_ref.shape

    def body(r, acc):
        rows = pl.ds(r * bk, bk)
        xs = x_ref[rows, :].astype(f32)
        ss = s_ref[rows, :].astype(f32)
        return acc + jax.lax.dot_general(xs, ss, (((0,), (0,)), ((), ())), precision=_HI,
                                         preferred_element_type=f32)
    acc = jax.lax.fori_loop(0, nr, body, jnp.zeros((bi, bo), f32))
    if has_c:
        acc = acc * c_ref[...].astype(f32)
    o_ref[...] = (g_ref[...].astype(f32) + acc).astype(o_ref.dtype)


def _rows(a, last):
    a = jnp.asarray(a)
    return a.reshape((-1, last))


def es_chunked_grad(eps_x, signal, grad, chain=None, *, tiles: EsTiles | None = None,
                    interpret: bool = False):
    """Pallas: ``grad + chain ⊙ (Xᵀ S)`` with X = ``eps_x`` (K, B, I) or (R, I) and
    S = ``signal`` (K, B, O) or (R, O). ``grad`` (I, O) is updated in place when donated."""
    tiles = tiles or EsTiles()
    I, O = grad.shape
    X, S = _rows(eps_x, I), _rows(signal, O)
    if X.shape[0] != S.shape[0]:
        raise ValueError(f"es_chunked_grad: {X.shape[0]} rows of eps_x but {S.shape[0]} of signal")
    bk = max(16, tiles.bk)
    R = round_up(max(X.shape[0], 1), bk)
    bi, _ = pow2_tile(I, tiles.bi, 16)
    bo, _ = pow2_tile(O, tiles.bo, 16)
    Ip, Op = round_up(I, bi), round_up(O, bo)
    X = pad_axis(pad_axis(X, 0, R), 1, Ip)
    S = pad_axis(pad_axis(S, 0, R), 1, Op)
    G = pad_axis(pad_axis(grad, 0, Ip), 1, Op)
    args = [X, S]
    in_specs = [pl.BlockSpec((R, bi), lambda i, j: (0, i)), pl.BlockSpec((R, bo), lambda i, j: (0, j))]
    w_spec = pl.BlockSpec((bi, bo), lambda i, j: (i, j))
    if chain is not None:
        args.append(pad_axis(pad_axis(chain, 0, Ip), 1, Op))
        in_specs.append(w_spec)
    args.append(G)
    in_specs.append(w_spec)
    kernel = functools.partial(es_chunked_grad_kernel, nr=R // bk, bk=bk, has_c=chain is not None)
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((Ip, Op), grad.dtype), grid=(Ip // bi, Op // bo),
        in_specs=in_specs, out_specs=w_spec, input_output_aliases={len(args) - 1: 0},
        interpret=interpret, name="es_chunked_grad",
        compiler_params=compiler_params(tiles.num_warps, tiles.num_stages))(*args)
    return out[:I, :O]


def es_chunked_grad_reference(eps_x, signal, grad, chain=None):
    """XLA: one (K·B)-row product, ``grad + chain ⊙ (Xᵀ S)`` (float32 HIGHEST)."""
    I, O = grad.shape
    X, S = _rows(eps_x, I).astype(f32), _rows(signal, O).astype(f32)
    upd = jax.lax.dot_general(X, S, (((0,), (0,)), ((), ())), precision=_HI,
                              preferred_element_type=f32)
    if chain is not None:
        upd = upd * chain.astype(f32)
    return (grad.astype(f32) + upd).astype(grad.dtype)


def es_perstep_grad_reference(eps_x, signal, grad, chain=None):
    """The per-step accumulation chunking replaces: K rank-B read-modify-writes of ``grad``
    (a ``scan`` over the leading axis of (K, B, I) / (K, B, O))."""
    def step(g, xs):
        x, s = xs
        return es_chunked_grad_reference(x, s, g, chain), None
    return jax.lax.scan(step, grad, (eps_x, signal))[0]


def es_accumulate(eps_x, signal, grad, chain=None, *, impl: str = "xla",
                  tiles: EsTiles | None = None, interpret: bool = False):
    """Chunked accumulation through ``impl`` = 'xla' (cuBLAS GEMM) or 'pallas' (the kernel)."""
    if impl == "xla":
        return es_chunked_grad_reference(eps_x, signal, grad, chain)
    if impl == "pallas":
        return es_chunked_grad(eps_x, signal, grad, chain, tiles=tiles, interpret=interpret)
    raise ValueError(f"es_accumulate: impl must be 'xla' or 'pallas', got {impl!r}")
