"""Structural first-order dependency patterns, proven on a jaxpr instead of probed on values.

``jvp_pattern(fun, diff, nondiff)`` says which output elements of ``fun`` can depend, to first
order, on which elements of the ``diff`` inputs, for *any* values of the inputs: the union of
the Jacobian's nonzero patterns over all input values (an over-approximation where the
analysis cannot tell). It interprets the jaxpr of ``jax.jvp(fun)`` abstractly:

* a primal value is *known* (computed from constants of the function only: a sparse matrix's
  indices, a mask) or a *magnitude* pattern (1 where the value may be nonzero at some input,
  0 where it is zero for every input: a masked weight ``w * mask`` keeps the mask's zeros);
* a tangent value is an indicator ``value.shape + (n_in,)``: 1 where the element may depend
  on input element ``j``. Tangent code is linear in the tangents; every primitive is applied
  to the indicators (and to the magnitudes of its primal coefficients) with subtraction and
  negation turned into addition, so no two terms cancel: a sum of nonnegative products is
  positive exactly where a structural path exists.

Primitives outside the tables (control flow, random bits, a custom kernel with unknown index
operands, ...) make their outputs depend on every element of every tangent input: never a
missed dependency, sometimes a denser pattern.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import _compat as C

__all__ = ["jvp_pattern"]

#: element-wise maps with f(0) = 0 (a zero stays zero); linear in the tangent too
_ZERO_KEEPING_UNARY = frozenset({
    "neg", "convert_element_type", "copy", "copy_p", "abs", "sign", "sin", "tan", "tanh",
    "sinh", "asin", "atan", "asinh", "atanh", "sqrt", "cbrt", "expm1", "log1p", "erf",
    "square", "reduce_precision", "floor", "ceil", "round", "real", "imag", "conj",
    "stop_gradient", "integer_pow"})
#: unary maps that are linear (the tangent code uses them on tangents)
_LINEAR_UNARY = frozenset({"neg", "convert_element_type", "copy", "copy_p", "reduce_precision",
                           "real", "imag", "conj"})
#: a sum of the operands' patterns
_ADDITIVE = frozenset({"add", "sub", "add_any", "max", "min", "or"})
#: a product: zero where either operand is
_PRODUCT = frozenset({"mul", "and"})
#: structural / multilinear maps evaluated on the patterns themselves (integer operands must
#: be known: indices of a gather, a sparse matrix's structure)
_STRUCTURAL = frozenset({
    "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice",
    "concatenate", "pad", "rev", "reduce_sum", "reduce_max", "reduce_min", "dot_general",
    "conv_general_dilated", "cumsum", "dynamic_slice", "dynamic_update_slice", "gather",
    "scatter-add", "scatter_add", "select_and_scatter_add", "csrmm", "csrmv", "coomm",
    "coomv", "optimization_barrier"})
#: structural maps where a primal float operand is a coefficient (its magnitude enters);
#: in the others a primal operand beside tangents is a zero of the linear code
_COEFFICIENT = frozenset({"dot_general", "conv_general_dilated", "csrmm", "csrmv", "coomm",
                          "coomv"})
#: equations that call one sub-jaxpr on their operands
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint"})
#: calls whose derivative is a custom rule, not their body's: read through for primal values
#: only (a surrogate spike's body has a zero derivative, its rule does not)
_CUSTOM_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})

_K, _M, _T = "known", "mag", "tan"


def _aval(v):
    return v.aval


def _is_float(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _mag_of(val, aval) -> jnp.ndarray:
    kind, x = val
    if kind == _M:
        return x
    if kind == _K:
        return (jnp.abs(jnp.asarray(x)) != 0).astype(jnp.float32).reshape(aval.shape)
    raise AssertionError(kind)


def _ones(aval):
    return jnp.ones(aval.shape, jnp.float32)


def _params(eqn):
    params = dict(eqn.params)
    if "preferred_element_type" in params and params["preferred_element_type"] is not None:
        params["preferred_element_type"] = jnp.float32
    if eqn.primitive.name == "convert_element_type":
        params["new_dtype"] = jnp.float32
    return params


def _bind(eqn, operands, axes=None):
    """``eqn``'s primitive on ``operands`` (vmapped over the pattern axis where ``axes``)."""
    prim, params = eqn.primitive, _params(eqn)

    def call(*ops):
        out = prim.bind(*ops, **params)
        return list(out) if prim.multiple_results else [out]
    if axes is None:
        return call(*operands)
    return jax.vmap(call, in_axes=axes, out_axes=-1)(*operands)


def _sub_jaxpr(eqn, tangents: bool):
    subs = C.eqn_subjaxprs(eqn)
    name = eqn.primitive.name
    if (name not in _CALLS and (tangents or name not in _CUSTOM_CALLS)) or len(subs) != 1:
        return None
    sub = subs[0]
    jaxpr = C.open_jaxpr(sub)
    if len(jaxpr.invars) != len(eqn.invars):
        return None
    return jaxpr, C.closed_consts(sub)


class _Interp:
    def __init__(self, n: int):
        self.n = n

    # -- fallbacks ----------------------------------------------------------------------
    def dense(self, eqn, vals):
        """Every output element depends on every element any tangent operand depends on."""
        deps = jnp.zeros((self.n,), jnp.float32)
        for kind, x in vals:
            if kind == _T:
                deps = jnp.maximum(deps, x.reshape(-1, self.n).max(axis=0))
        out = []
        for v in eqn.outvars:
            a = _aval(v)
            if _is_float(a):
                out.append((_T, jnp.broadcast_to(deps, a.shape + (self.n,))))
            else:
                out.append((_M, _ones(a)))
        return out

    # -- one equation -------------------------------------------------------------------
    def eqn(self, eqn, vals):
        sub = _sub_jaxpr(eqn, any(k == _T for k, _ in vals))
        if sub is not None:
            return self.run(sub[0], sub[1], vals)
        if C.eqn_subjaxprs(eqn):           # control flow, custom rules with tangents
            if any(k == _T for k, _ in vals):
                return self.dense(eqn, vals)
            if all(k == _K for k, _ in vals):
                return self.known(eqn, vals)
            return [(_M, _ones(_aval(v))) for v in eqn.outvars]
        if not any(k == _T for k, _ in vals):
            if all(k == _K for k, _ in vals):
                return self.known(eqn, vals)
            return self.primal(eqn, vals)
        return self.tangent(eqn, vals)

    def known(self, eqn, vals):
        try:
            outs = C.eval_eqn(eqn, [x for _, x in vals])
        except Exception:  # noqa: BLE001 - an effect / a primitive that will not evaluate
            return [(_M, _ones(_aval(v))) for v in eqn.outvars]
        return [(_K, o) for o in outs]

    def _ints_known(self, eqn, vals) -> bool:
        return all(k == _K for (k, _), v in zip(vals, eqn.invars) if not _is_float(_aval(v)))

    def primal(self, eqn, vals):
        name = eqn.primitive.name
        avals = [_aval(v) for v in eqn.invars]
        outs = [_aval(v) for v in eqn.outvars]
        try:
            if name in _ZERO_KEEPING_UNARY and len(vals) == 1:
                if name == "integer_pow" and eqn.params.get("y", 1) <= 0:
                    return [(_M, _ones(outs[0]))]
                return [(_M, _mag_of(vals[0], avals[0]).reshape(outs[0].shape))]
            if name in _PRODUCT:
                m = _mag_of(vals[0], avals[0]) * _mag_of(vals[1], avals[1])
                return [(_M, jnp.broadcast_to(m, outs[0].shape))]
            if name in _ADDITIVE or name == "select_n":
                ops = vals[1:] if name == "select_n" else vals
                oavals = avals[1:] if name == "select_n" else avals
                m = sum(_mag_of(v, a) for v, a in zip(ops, oavals))
                return [(_M, (jnp.broadcast_to(m, outs[0].shape) > 0).astype(jnp.float32))]
            if name == "div":
                return [(_M, jnp.broadcast_to(_mag_of(vals[0], avals[0]), outs[0].shape))]
            if name in _STRUCTURAL and self._ints_known(eqn, vals):
                ops = [_mag_of(v, a) if _is_float(a) else x
                       for (v, a, x) in zip(vals, avals, [x for _, x in vals])]
                res = _bind(eqn, ops)
                return [(_M, (jnp.abs(r) > 0).astype(jnp.float32)) if _is_float(a)
                        else (_M, _ones(a)) for r, a in zip(res, outs)]
        except Exception:  # noqa: BLE001 - a rule that does not fit this use: be safe
            pass
        return [(_M, _ones(a)) for a in outs]

    def tangent(self, eqn, vals):
        name = eqn.primitive.name
        avals = [_aval(v) for v in eqn.invars]
        n_tan = sum(k == _T for k, _ in vals)
        try:
            if name in _LINEAR_UNARY and len(vals) == 1:
                a = _aval(eqn.outvars[0])
                if not _is_float(a):
                    return [(_M, _ones(a))]
                return [(_T, vals[0][1].reshape(a.shape + (self.n,)))]
            out_shape = _aval(eqn.outvars[0]).shape + (self.n,)

            def spread(x, a):      # an operand's pattern on the output (jax broadcasts
                return jnp.broadcast_to(x.reshape(a.shape + (self.n,)), out_shape)  # rank 0)
            if name == "mul" and n_tan == 1:           # tangent x coefficient
                (t, ta), (c, ca) = sorted(zip(vals, avals), key=lambda p: p[0][0] != _T)
                mag = jnp.broadcast_to(_mag_of(c, ca), out_shape[:-1])[..., None]
                return [(_T, spread(t[1], ta) * mag)]
            if name == "div" and n_tan == 1 and vals[0][0] == _T:     # tangent / coefficient
                return [(_T, spread(vals[0][1], avals[0]))]
            if name in ("add", "sub", "add_any", "select_n"):
                ops = list(zip(vals, avals))[1 if name == "select_n" else 0:]
                acc = jnp.zeros(out_shape, jnp.float32)
                for (k, x), a in ops:
                    if k == _T:
                        acc = jnp.maximum(acc, spread(x, a))
                return [(_T, acc)]
            if name in _STRUCTURAL and self._ints_known(eqn, vals):
                ops, axes = [], []
                for (k, x), a in zip(vals, avals):
                    if k == _T:
                        ops.append(x)
                        axes.append(-1)
                    elif not _is_float(a):
                        ops.append(x)
                        axes.append(None)
                    elif name in _COEFFICIENT:
                        ops.append(_mag_of((k, x), a))
                        axes.append(None)
                    else:                                    # a zero of the linear code
                        ops.append(jnp.zeros(a.shape, jnp.float32))
                        axes.append(None)
                res = _bind(eqn, ops, axes)
                return [(_T, (jnp.abs(r) > 0).astype(jnp.float32)) if _is_float(_aval(v))
                        else (_M, _ones(_aval(v))) for r, v in zip(res, eqn.outvars)]
        except Exception:  # noqa: BLE001 - a rule that does not fit this use: be safe
            pass
        return self.dense(eqn, vals)

    # -- a jaxpr ------------------------------------------------------------------------
    def run(self, jaxpr, consts, in_vals):
        env = {}
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = (_K, c)
        for v, x in zip(jaxpr.invars, in_vals):
            env[v] = x

        def rd(v):
            return (_K, C.literal_value(v)) if C.is_literal(v) else env[v]
        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn, [rd(v) for v in eqn.invars])
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [rd(v) for v in jaxpr.outvars]


def jvp_pattern(fun: Callable, diff: Sequence, nondiff: Sequence = (),
                max_elements: int = 1 << 28) -> list:
    """The structural first-order dependency of ``fun(diff, nondiff)``'s outputs on ``diff``.

    Args:
        fun: ``fun(diff_list, nondiff_list) -> list of arrays``.
        diff: float arrays the pattern's columns run over (flattened, concatenated in order).
        nondiff: other inputs (their values are never used: any value is allowed).
        max_elements: refuse (ValueError) when one pattern would exceed this many elements.

    Returns:
        per output, a bool ``np.ndarray`` of shape ``out.shape + (n_in,)``, ``n_in`` the total
        size of ``diff``: True where the output element may depend on the input element.
    """
    diff = [jnp.asarray(d) for d in diff]
    nondiff = list(nondiff)
    sizes = [int(np.prod(np.shape(d), dtype=np.int64)) for d in diff]
    n = int(sum(sizes))
    closed = jax.make_jaxpr(lambda d, nd, t: jax.jvp(lambda dd: fun(list(dd), nd),
                                                     (tuple(d),), (tuple(t),)))(
        tuple(diff), nondiff, tuple(jnp.zeros_like(d) for d in diff))
    jaxpr = C.open_jaxpr(closed)
    big = max((int(np.prod(v.aval.shape, dtype=np.int64)) for e in jaxpr.eqns
               for v in e.outvars if hasattr(v.aval, "shape")), default=0)
    if big * n > max_elements:
        raise ValueError(f"a structural pattern of {big} x {n} elements exceeds "
                         f"max_elements={max_elements}")
    n_nd = len(jax.tree.leaves(nondiff))
    vals = [(_M, _ones(v.aval)) for v in jaxpr.invars[:len(diff) + n_nd]]
    off = 0
    eye = jnp.eye(n, dtype=jnp.float32)
    for d, s in zip(diff, sizes):
        vals.append((_T, eye[off:off + s].reshape(np.shape(d) + (n,))))
        off += s
    outs = _Interp(n).run(jaxpr, C.closed_consts(closed), vals)
    n_out = len(outs) // 2
    res = []
    for (kind, x), v in zip(outs[n_out:], jaxpr.outvars[n_out:]):
        shape = tuple(v.aval.shape)
        if kind == _T:
            res.append(np.asarray(x).reshape(shape + (n,)) > 0)
        else:                                        # a tangent the function never touches
            res.append(np.zeros(shape + (n,), bool))
    return res
