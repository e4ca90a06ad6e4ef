"""Tests of the built-in trace ops (brainscale/ops.py) against numpy brute force."""
from __future__ import annotations

import itertools

import brainevent
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from brainscale.concepts import (ETraceGrad, ETraceOp, ETraceParam, FunctionOp,
                                 MARKER_PREFIX, lookup_op)
from brainscale.ops import ConvOp, ElemWiseOp, LoraOp, MatMulOp, SpMatMulOp

RTOL = 1e-5
ATOL = 1e-5


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def tree_close(a, b, **kw):
    ta, tb = jax.tree.structure(a), jax.tree.structure(b)
    assert ta == tb, (ta, tb)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        close(x, y, **kw)


# Random numbers come from fixed-seed jax.random pools drawn once; slicing them with numpy
# avoids compiling a jax.random kernel for every shape (keeps the file fast).
_NORMAL = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (1 << 15,), jnp.float32))
_UNIFORM = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (1 << 15,), jnp.float32))


def _pool(pool, seed, shape):
    size = int(np.prod(shape, dtype=np.int64))
    start = (seed * 7919) % (len(pool) - size)
    return pool[start:start + size].reshape(shape)


def rand(seed, shape, scale=1.0):
    """Standard-normal float32 array (deterministic in ``seed``)."""
    return jnp.asarray(scale * _pool(_NORMAL, seed, shape))


def bernoulli(seed, p, shape):
    """Boolean numpy array, True with probability ``p`` (deterministic in ``seed``)."""
    return _pool(_UNIFORM, seed, shape) < p


def jax_vjp(op, x, w, dy):
    _, f = jax.vjp(lambda ww: op.xw_to_y(x, ww), w)
    return f(dy)[0]


def marker_names(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [e.params.get("name") for e in jaxpr.jaxpr.eqns
            if e.primitive.name in ("jit", "pjit")]


# element-wise weight functions with numpy values and derivatives
WEIGHT_FNS = {
    "identity": (lambda w: w, lambda w: w, lambda w: np.ones_like(w)),
    "double": (lambda w: 2 * w, lambda w: 2 * w, lambda w: 2 * np.ones_like(w)),
    "tanh": (jnp.tanh, np.tanh, lambda w: 1 - np.tanh(w) ** 2),
}


# =======================================================================================
# MatMulOp
# =======================================================================================

N_IN, N_OUT, B = 5, 4, 3


def _matmul_case(bias: bool, seed=0):
    W = rand(seed, (N_IN, N_OUT))
    w = {"weight": W}
    if bias:
        w["bias"] = rand(seed + 1, (N_OUT,))
    mask = bernoulli(seed + 2, 0.6, (N_IN, N_OUT))
    return w, mask


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("fn_name", ["identity", "double", "tanh"])
@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_matmul_all_options(use_mask, fn_name, before, bias, batched):
    w, mask = _matmul_case(bias)
    jfn, nfn, dfn = WEIGHT_FNS[fn_name]
    op = MatMulOp(weight_mask=mask if use_mask else None, weight_fn=jfn,
                  apply_weight_fn_before_mask=before)
    x = rand(10, (B, N_IN) if batched else (N_IN,))
    dy = rand(11, (B, N_OUT) if batched else (N_OUT,))

    Wn = np.asarray(w["weight"], np.float64)
    m = mask.astype(np.float64) if use_mask else np.ones_like(Wn)
    W_eff = nfn(Wn) * m if before else nfn(Wn * m)   # weight_fn applied exactly once
    xn = np.asarray(x, np.float64)
    xb = xn if batched else xn[None]
    y_ref = np.einsum("bi,ij->bj", xb, W_eff)
    if bias:
        y_ref = y_ref + np.asarray(w["bias"])
    if not batched:
        y_ref = y_ref[0]

    y = op.xw_to_y(x, w)
    assert y.shape == y_ref.shape
    close(y, y_ref)
    close(op(x, w), y_ref)                              # the marked path

    # gradient: outer product, then the mask / weight_fn chain rule
    dyb = np.asarray(dy, np.float64).reshape(-1, N_OUT)
    dW_eff = np.einsum("bi,bj->ij", xb, dyb)
    dW = dfn(Wn) * m * dW_eff if before else dfn(Wn * m) * m * dW_eff
    ref = {"weight": dW}
    if bias:
        ref["bias"] = dyb.sum(0)
    dw = op.xy_to_dw(x, dy, w)
    tree_close(dw, ref)
    tree_close(dw, jax_vjp(op, x, w, dy))


def test_matmul_double_weight_fn_applied_once():
    W = rand(0, (N_IN, N_OUT))
    x = rand(1, (N_IN,))
    for before in (False, True):
        op = MatMulOp(weight_mask=np.ones((N_IN, N_OUT)), weight_fn=lambda w: 2 * w,
                      apply_weight_fn_before_mask=before)
        close(op.xw_to_y(x, {"weight": W}), 2 * np.asarray(x) @ np.asarray(W))


def test_matmul_bare_array_param():
    W = rand(0, (N_IN, N_OUT))
    x = rand(1, (B, N_IN))
    dy = rand(2, (B, N_OUT))
    op = MatMulOp()
    close(op.xw_to_y(x, W), np.asarray(x) @ np.asarray(W))
    close(op(x, W), np.asarray(x) @ np.asarray(W))
    dW = op.xy_to_dw(x, dy, W)
    assert isinstance(dW, jax.Array)
    close(dW, np.asarray(x).T @ np.asarray(dy))
    y = rand(3, (N_OUT,))
    close(op.yw_to_w(y, W), np.asarray(W) * np.asarray(y)[None, :])


def test_matmul_yw_to_w_definition():
    w, _ = _matmul_case(bias=True)
    y = rand(5, (N_OUT,))
    out = MatMulOp().yw_to_w(y, w)
    ref_w = np.zeros((N_IN, N_OUT))
    for i in range(N_IN):
        for j in range(N_OUT):
            ref_w[i, j] = float(w["weight"][i, j]) * float(y[j])
    tree_close(out, {"weight": ref_w, "bias": np.asarray(w["bias"]) * np.asarray(y)})


def test_matmul_compact_trace_identity():
    """For the identity weight_fn, the VJP is yw_to_w(dy, x ⊗ 1): the compact layout."""
    w, _ = _matmul_case(bias=True)
    x = rand(3, (N_IN,))
    dy = rand(4, (N_OUT,))
    op = MatMulOp()
    xw = {"weight": jnp.broadcast_to(x[:, None], (N_IN, N_OUT)), "bias": jnp.ones(N_OUT)}
    tree_close(op.xy_to_dw(x, dy, w), op.yw_to_w(dy, xw))


def test_matmul_quantity():
    W = rand(0, (N_IN, N_OUT)) * u.mV
    b = rand(1, (N_OUT,)) * u.mV
    x = rand(2, (B, N_IN))
    op = MatMulOp(weight_fn=lambda w: 2 * w)
    y = op(x, {"weight": W, "bias": b})
    assert isinstance(y, u.Quantity) and y.unit == u.mV
    close(y.to_decimal(u.mV),
          2 * np.asarray(x) @ np.asarray(W.mantissa) + np.asarray(b.mantissa))
    dw = op.xy_to_dw(x, jnp.ones((B, N_OUT)), {"weight": W, "bias": b})
    close(u.get_mantissa(dw["weight"]), 2 * np.asarray(x).T @ np.ones((B, N_OUT)))
    yw = op.yw_to_w(jnp.ones(N_OUT), {"weight": W, "bias": b})
    assert yw["weight"].unit == u.mV


def test_matmul_errors():
    W = rand(0, (N_IN, N_OUT))
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(5, 4\)"):
        MatMulOp(weight_mask=np.ones((2, 2))).xw_to_y(jnp.ones(N_IN), {"weight": W})
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(5, 4\)"):
        MatMulOp(weight_mask=np.ones((2, 2)))(jnp.ones(N_IN), {"weight": W})
    with pytest.raises(ValueError, match="input shape"):
        MatMulOp().xw_to_y(jnp.ones(3), {"weight": W})
    with pytest.raises(ValueError, match="missing"):
        MatMulOp().xw_to_y(jnp.ones(N_IN), {"bias": jnp.ones(N_OUT)})
    with pytest.raises(ValueError, match="unexpected"):
        MatMulOp().xw_to_y(jnp.ones(N_IN), {"weight": W, "gain": 1.0})
    with pytest.raises(ValueError, match="bias"):
        MatMulOp().xw_to_y(jnp.ones(N_IN), {"weight": W, "bias": jnp.ones(3)})
    with pytest.raises(TypeError):
        MatMulOp(weight_fn=3)
    with pytest.raises(TypeError):
        MatMulOp(weight_mask="abc")
    with pytest.raises(TypeError):
        MatMulOp(apply_weight_fn_before_mask="yes")


def test_matmul_repr():
    r = repr(MatMulOp())
    assert r.startswith("MatMulOp(\n  is_diagonal=False,\n  weight_mask=None,\n  weight_fn=<function")
    assert r.endswith("apply_weight_fn_before_mask=False\n)")
    r = repr(MatMulOp(weight_mask=np.ones((3, 2), bool)))
    assert "weight_mask=bool[3,2]" in r


# =======================================================================================
# ConvOp
# =======================================================================================

def _same_pads(in_size, k_eff, stride):
    out = -(-in_size // stride)
    total = max((out - 1) * stride + k_eff - in_size, 0)
    return (total // 2, total - total // 2)


def _dilate(a, dil, axes):
    for ax, d in zip(axes, dil):
        if d == 1:
            continue
        shape = list(a.shape)
        shape[ax] = (a.shape[ax] - 1) * d + 1
        out = np.zeros(shape, a.dtype)
        idx = [slice(None)] * a.ndim
        idx[ax] = slice(None, None, d)
        out[tuple(idx)] = a
        a = out
    return a


def conv_brute(x, K, strides, padding, lhs_dil, rhs_dil, groups, dy=None):
    """One example, channels last. Returns y, or dK when dy is given (the VJP)."""
    x = np.asarray(x, np.float64)
    K = np.asarray(K, np.float64)
    ns = x.ndim - 1
    sp = list(range(ns))
    xd = _dilate(x, lhs_dil, sp)
    Kd = _dilate(K, rhs_dil, sp)
    k_eff = Kd.shape[:ns]
    if padding == "SAME":
        pads = [_same_pads(xd.shape[i], k_eff[i], strides[i]) for i in sp]
    elif padding == "VALID":
        pads = [(0, 0)] * ns
    else:
        pads = list(padding)
    xp = np.pad(xd, pads + [(0, 0)])
    out_sp = [(xp.shape[i] - k_eff[i]) // strides[i] + 1 for i in sp]
    cin, cout = x.shape[-1], K.shape[-1]
    cin_g, cout_g = cin // groups, cout // groups
    y = np.zeros(out_sp + [cout])
    dKd = np.zeros_like(Kd)
    for o in itertools.product(*[range(n) for n in out_sp]):
        win = xp[tuple(slice(o[i] * strides[i], o[i] * strides[i] + k_eff[i]) for i in sp)]
        for g in range(groups):
            xs = win[..., g * cin_g:(g + 1) * cin_g]
            cs = slice(g * cout_g, (g + 1) * cout_g)
            if dy is None:
                y[o + (cs,)] = np.tensordot(xs, Kd[..., cs], axes=ns + 1)
            else:
                dKd[..., cs] += xs[..., None] * np.asarray(dy, np.float64)[o + (cs,)]
    if dy is None:
        return y
    idx = tuple(slice(None, None, d) for d in rhs_dil)
    return dKd[idx]


CONV_CASES = {
    # name: (example shape, kernel spatial, stride, padding, lhs_dil, rhs_dil, groups, cout)
    "1d_stride2_same": ((9, 2), (3,), (2,), "SAME", (1,), (1,), 1, 3),
    "1d_lhs_dilation_valid": ((6, 2), (3,), (1,), "VALID", (2,), (1,), 1, 2),
    "1d_lhs_dilation_same_stride": ((5, 2), (3,), (2,), "SAME", (2,), (2,), 1, 2),
    "2d_lhs_dilation_explicit": ((4, 3, 2), (2, 2), (1, 1), ((1, 0), (2, 1)), (2, 1), (1, 1), 1, 3),
    "2d_valid_rhsdil_groups2": ((6, 5, 4), (2, 2), (1, 1), "VALID", (1, 1), (2, 1), 2, 4),
    "2d_explicit_pad_stride": ((5, 6, 2), (3, 2), (2, 1), ((1, 2), (0, 1)), (1, 1), (1, 1), 1, 3),
    "3d_same_stride": ((4, 5, 4, 2), (2, 3, 2), (1, 2, 1), "SAME", (1, 1, 1), (1, 1, 1), 1, 2),
    "3d_groups2_dil": ((5, 4, 4, 4), (2, 2, 2), (1, 1, 2), "SAME", (1, 1, 1), (2, 1, 1), 2, 2),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("variant", ["plain", "mask_fn_bias"])
def test_conv_vs_bruteforce(case, batched, variant):
    shape, ks, strides, padding, lhs_dil, rhs_dil, groups, cout = CONV_CASES[case]
    cin = shape[-1]
    kshape = ks + (cin // groups, cout)
    K = rand(1, kshape)
    w = {"weight": K}
    mask = None
    jfn, nfn, dfn = WEIGHT_FNS["identity"]
    if variant == "mask_fn_bias":
        w["bias"] = rand(2, (cout,))
        mask = bernoulli(3, 0.7, kshape)
        jfn, nfn, dfn = WEIGHT_FNS["double"]
    op = ConvOp(jax.ShapeDtypeStruct(shape, jnp.float32), window_strides=strides,
                padding=padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
                feature_group_count=groups, weight_mask=mask, weight_fn=jfn)
    assert op.x_ndim == len(shape)
    x = rand(4, ((B,) if batched else ()) + shape)

    Kn = np.asarray(K, np.float64)
    m = np.ones_like(Kn) if mask is None else mask.astype(np.float64)
    K_eff = nfn(Kn * m)
    xb = np.asarray(x) if batched else np.asarray(x)[None]
    y_ref = np.stack([conv_brute(xe, K_eff, strides, padding, lhs_dil, rhs_dil, groups)
                      for xe in xb])
    if "bias" in w:
        y_ref = y_ref + np.asarray(w["bias"])
    if not batched:
        y_ref = y_ref[0]
    y = op.xw_to_y(x, w)
    assert y.shape == y_ref.shape
    close(y, y_ref, rtol=2e-5, atol=2e-5)
    close(op(x, w), y_ref, rtol=2e-5, atol=2e-5)

    dy = rand(5, y.shape)
    dyb = np.asarray(dy) if batched else np.asarray(dy)[None]
    dK_eff = sum(conv_brute(xe, K_eff, strides, padding, lhs_dil, rhs_dil, groups, dy=de)
                 for xe, de in zip(xb, dyb))
    ref = {"weight": dfn(Kn * m) * m * dK_eff}
    if "bias" in w:
        ref["bias"] = dyb.reshape(-1, cout).sum(0)
    dw = op.xy_to_dw(x, dy, w)
    tree_close(dw, ref, rtol=2e-5, atol=2e-5)
    tree_close(dw, jax_vjp(op, x, w, dy), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("batched", [False, True])
def test_conv_channel_jacobian_is_the_full_jacobian(case, batched):
    """The channel layout's claim and its closed form: ``∂y[n]/∂θ`` is zero outside the
    neuron's channel, and ``channel_jacobian`` (input patches × the mask / weight_fn chain
    factor) is the full Jacobian's slice of that channel; the generic forward-mode default
    of ETraceOp gives the same."""
    from brainscale.concepts import ETraceOp
    shape, ks, strides, padding, lhs_dil, rhs_dil, groups, cout = CONV_CASES[case]
    kshape = ks + (shape[-1] // groups, cout)
    w = {"weight": rand(1, kshape), "bias": rand(2, (cout,))}
    op = ConvOp(jax.ShapeDtypeStruct(shape, jnp.float32), window_strides=strides,
                padding=padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
                feature_group_count=groups, weight_mask=bernoulli(3, 0.7, kshape),
                weight_fn=WEIGHT_FNS["double"][0])
    x = rand(4, ((B,) if batched else ()) + shape)
    n_ax, l_ax = op.channel_axes(w)
    assert (n_ax, l_ax) == (len(shape) - 1, (0, len(kshape) - 1))
    G = jax.jit(op.channel_jacobian)(x, w)
    jac = jax.tree.leaves(jax.jit(jax.jacrev(lambda ww: op.xw_to_y(x, ww)))(w))
    y = op.xw_to_y(x, w)
    chan = np.indices(y.shape)[y.ndim - 1]                     # channel of every neuron
    for g, J, leaf, la in zip(G, jac, jax.tree.leaves(w), l_ax):
        J = np.moveaxis(np.asarray(J), y.ndim + la, -1)         # y + rest + (C,)
        sel = chan.reshape(y.shape + (1,) * (J.ndim - y.ndim)) == np.arange(cout)
        np.testing.assert_array_equal(np.where(sel, 0.0, J), 0.0)
        close(np.sum(np.where(sel, J, 0.0), axis=-1), g, rtol=1e-5, atol=1e-6)
    for g, g_gen in zip(G, jax.jit(lambda xx, ww: ETraceOp.channel_jacobian(op, xx, ww))(x, w)):
        close(g, g_gen, rtol=1e-5, atol=1e-6)


def test_conv_custom_dimension_numbers():
    """Channels-first layout ('NCW', 'OIW', 'NCW') equals the channels-last default."""
    L, C, O = 8, 3, 2
    x = rand(0, (B, L, C))
    K = rand(1, (3, C, O))                       # WIO
    b = rand(2, (O,))
    op_last = ConvOp(jax.ShapeDtypeStruct((L, C), jnp.float32), window_strides=2)
    op_first = ConvOp(jax.ShapeDtypeStruct((C, L), jnp.float32), window_strides=2,
                      dimension_numbers=("NCW", "OIW", "NCW"))
    y_last = op_last(x, {"weight": K, "bias": b})
    y_first = op_first(jnp.swapaxes(x, 1, 2), {"weight": jnp.transpose(K, (2, 1, 0)), "bias": b})
    close(jnp.swapaxes(y_first, 1, 2), y_last)
    y1 = op_first.xw_to_y(jnp.swapaxes(x[0], 0, 1), {"weight": jnp.transpose(K, (2, 1, 0))})
    close(jnp.swapaxes(y1, 0, 1), op_last.xw_to_y(x[0], {"weight": K}))


def test_conv_quantity():
    x = rand(0, (B, 6, 2)) * u.mV
    K = rand(1, (3, 2, 2))
    b = rand(2, (2,)) * u.mV
    op = ConvOp(jax.ShapeDtypeStruct((6, 2), jnp.float32))
    y = op(x, {"weight": K, "bias": b})
    assert isinstance(y, u.Quantity) and y.unit == u.mV
    y0 = op(x.mantissa, {"weight": K, "bias": b.mantissa})
    close(y.mantissa, y0)


def test_conv_errors_and_repr():
    xinfo = jax.ShapeDtypeStruct((6, 6, 2), jnp.float32)
    op = ConvOp(xinfo)
    w = {"weight": rand(0, (3, 3, 2, 4))}
    with pytest.raises(ValueError, match=r"\(6, 5, 2\).*\(6, 6, 2\)"):
        op.xw_to_y(jnp.ones((6, 5, 2)), w)
    with pytest.raises(ValueError, match=r"\(3, 6, 5, 2\).*\(6, 6, 2\)"):
        op.xw_to_y(jnp.ones((3, 6, 5, 2)), w)
    with pytest.raises(ValueError, match="xinfo.shape"):
        op.xw_to_y(jnp.ones((6, 2)), w)
    with pytest.raises(ValueError, match="input channels"):
        op.xw_to_y(jnp.ones((6, 6, 2)), {"weight": rand(0, (3, 3, 3, 4))})
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 3, 2, 4\)"):
        ConvOp(xinfo, weight_mask=np.ones((2, 2))).xw_to_y(jnp.ones((6, 6, 2)), w)
    with pytest.raises(NotImplementedError, match="no compact param-dim layout"):
        op.yw_to_w(jnp.ones(4), w)
    with pytest.raises(ValueError, match="batch_group_count"):
        ConvOp(xinfo, batch_group_count=2)
    with pytest.raises(ValueError, match="padding"):
        ConvOp(xinfo, padding="FULL")
    with pytest.raises(TypeError, match="ShapeDtypeStruct"):
        ConvOp((6, 6, 2))
    assert op.param_trace == "channel" and op.kind == "conv"
    r = repr(op)
    assert r.startswith("ConvOp(\n")
    for field in ("window_strides=(1, 1)", "padding='SAME'", "lhs_dilation=None",
                  "rhs_dilation=None", "feature_group_count=1", "batch_group_count=1",
                  "dimension_numbers=None", "weight_mask=None", "weight_fn=<function",
                  "xinfo=ShapeDtypeStruct(shape=(6, 6, 2)"):
        assert field in r, field


# =======================================================================================
# SpMatMulOp
# =======================================================================================

def _sparse_case(fmt, seed=0):
    dense = np.asarray(rand(seed, (N_IN, N_OUT)))
    keep = bernoulli(seed + 1, 0.5, (N_IN, N_OUT)).copy()
    keep[0, :] = True                          # at least one element per column
    dense = np.where(keep, dense, 0.0).astype(np.float32)
    M = getattr(brainevent, fmt).fromdense(jnp.asarray(dense))
    return dense, M


def _rows_cols(M):
    """(row, col) of every stored element, from the compressed structure."""
    indices, indptr = np.asarray(M.indices), np.asarray(M.indptr)
    major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    if isinstance(M, brainevent.CSR):
        return major, indices
    return indices, major


@pytest.mark.parametrize("fmt", ["CSR", "CSC"])
@pytest.mark.parametrize("fn_name", ["identity", "double", "tanh"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_spmatmul_vs_dense(fmt, fn_name, bias, batched):
    dense, M = _sparse_case(fmt)
    jfn, nfn, dfn = WEIGHT_FNS[fn_name]
    op = SpMatMulOp(M, weight_fn=jfn)
    rows, cols = _rows_cols(M)
    data = np.asarray(M.data, np.float64)
    # the structure helper is right: rebuilding the dense matrix from it
    rebuilt = np.zeros((N_IN, N_OUT))
    rebuilt[rows, cols] = data
    close(rebuilt, dense)
    close(op.column_indices, cols)

    w = {"weight": M.data}
    if bias:
        w["bias"] = rand(7, (N_OUT,))
    x = rand(8, (B, N_IN) if batched else (N_IN,))
    D_eff = np.zeros((N_IN, N_OUT))
    D_eff[rows, cols] = nfn(data)
    y_ref = np.asarray(x, np.float64) @ D_eff
    if bias:
        y_ref = y_ref + np.asarray(w["bias"])
    close(op.xw_to_y(x, w), y_ref)
    close(op(x, w), y_ref)

    dy = rand(9, (B, N_OUT) if batched else (N_OUT,))
    xb = np.asarray(x, np.float64).reshape(-1, N_IN)
    dyb = np.asarray(dy, np.float64).reshape(-1, N_OUT)
    dD = xb.T @ dyb
    ref = {"weight": dfn(data) * dD[rows, cols]}
    if bias:
        ref["bias"] = dyb.sum(0)
    dw = op.xy_to_dw(x, dy, w)
    tree_close(dw, ref)
    tree_close(dw, jax_vjp(op, x, w, dy))


@pytest.mark.parametrize("fmt", ["CSR", "CSC"])
def test_spmatmul_yw_to_w(fmt):
    dense, M = _sparse_case(fmt, seed=3)
    op = SpMatMulOp(M)
    rows, cols = _rows_cols(M)
    y = rand(4, (N_OUT,))
    b = rand(5, (N_OUT,))
    out = op.yw_to_w(y, {"weight": M.data, "bias": b})
    ref = np.array([float(M.data[k]) * float(y[cols[k]]) for k in range(len(cols))])
    tree_close(out, {"weight": ref, "bias": np.asarray(b) * np.asarray(y)})
    close(op.yw_to_w(y, M.data), ref)
    # compact layout identity: the VJP is yw_to_w(dy, x[row])
    x = rand(6, (N_IN,))
    dy = rand(7, (N_OUT,))
    tree_close(op.xy_to_dw(x, dy, {"weight": M.data}),
               op.yw_to_w(dy, {"weight": x[rows]}))


def test_spmatmul_quantity_errors_repr():
    dense, M = _sparse_case("CSR")
    op = SpMatMulOp(M)
    x = rand(1, (N_IN,))
    y = op(x, {"weight": M.data * u.mV})
    assert isinstance(y, u.Quantity) and y.unit == u.mV
    close(y.mantissa, np.asarray(x) @ dense)
    with pytest.raises(TypeError, match="CSR or brainevent.CSC"):
        SpMatMulOp(jnp.asarray(dense))
    with pytest.raises(TypeError, match="CSR or brainevent.CSC"):
        SpMatMulOp(u.sparse.CSR.fromdense(jnp.asarray(dense)))
    with pytest.raises(ValueError, match="data vector"):
        op.xw_to_y(x, {"weight": jnp.ones(3)})
    with pytest.raises(ValueError, match="input shape"):
        op.xw_to_y(jnp.ones(N_IN + 1), {"weight": M.data})
    r = repr(op)
    assert r.startswith("SpMatMulOp(\n") and "sparse_mat=CSR(" in r and "weight_fn=<function" in r


# =======================================================================================
# ElemWiseOp
# =======================================================================================

def test_elemwise():
    fn = lambda tau: jnp.exp(-0.1 / tau)
    op = ElemWiseOp(fn)
    assert op.is_diagonal and op.x_ndim is None and op.param_trace == "compact"
    tau = jnp.asarray(1.0 + _pool(_UNIFORM, 0, (6,)))
    tn = np.asarray(tau, np.float64)
    y_ref = np.exp(-0.1 / tn)
    close(op.xw_to_y(None, tau), y_ref)
    close(op.xw_to_y(jnp.ones(9), tau), y_ref)       # x is ignored
    close(op(None, tau), y_ref)                      # marked path with a None input
    assert any(n.startswith(MARKER_PREFIX) for n in marker_names(lambda t: op(None, t), tau))

    dy = rand(1, (6,))
    dref = np.asarray(dy) * y_ref * 0.1 / tn ** 2
    close(op.xy_to_dw(None, dy, tau), dref)
    close(op.xy_to_dw(None, dy, tau), jax_vjp(op, None, tau, dy))
    # batched cotangents (the compiler vmaps per example)
    dyb = rand(2, (B, 6))
    close(jax.vmap(lambda d: op.xy_to_dw(None, d, tau))(dyb),
          np.asarray(dyb) * y_ref * 0.1 / tn ** 2)
    y = rand(3, (6,))
    close(op.yw_to_w(y, tau), tn * np.asarray(y))
    tree_close(op.yw_to_w(y, {"a": tau}), {"a": tn * np.asarray(y)})
    assert repr(op).startswith("ElemWiseOp(\n  fn=") and "is_diagonal=True" in repr(op)
    with pytest.raises(TypeError):
        ElemWiseOp(None)


# =======================================================================================
# LoraOp
# =======================================================================================

@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("alpha", [None, 0.5])
def test_lora(batched, bias, alpha):
    r = 2
    Bm, Am = rand(0, (N_IN, r)), rand(1, (r, N_OUT))
    w = {"B": Bm, "A": Am}
    if bias:
        w["bias"] = rand(2, (N_OUT,))
    op = LoraOp(alpha)
    a = 1.0 if alpha is None else alpha
    x = rand(3, (B, N_IN) if batched else (N_IN,))
    xb = np.asarray(x, np.float64).reshape(-1, N_IN)
    Bn, An = np.asarray(Bm, np.float64), np.asarray(Am, np.float64)
    y_ref = a * np.einsum("bi,ir,rj->bj", xb, Bn, An)
    if bias:
        y_ref = y_ref + np.asarray(w["bias"])
    if not batched:
        y_ref = y_ref[0]
    close(op.xw_to_y(x, w), y_ref)
    close(op(x, w), y_ref)

    dy = rand(4, (B, N_OUT) if batched else (N_OUT,))
    dyb = np.asarray(dy, np.float64).reshape(-1, N_OUT)
    ref = {"B": a * xb.T @ (dyb @ An.T), "A": a * (xb @ Bn).T @ dyb}
    if bias:
        ref["bias"] = dyb.sum(0)
    dw = op.xy_to_dw(x, dy, w)
    tree_close(dw, ref)
    tree_close(dw, jax_vjp(op, x, w, dy))


def test_lora_errors_repr():
    op = LoraOp()
    assert op.param_trace == "dense" and op.kind == "lora" and op.alpha == 1.0
    with pytest.raises(NotImplementedError, match="no compact"):
        op.yw_to_w(jnp.ones(3), {"B": jnp.ones((4, 2)), "A": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match="B of shape"):
        op.xw_to_y(jnp.ones(4), {"B": jnp.ones((4, 2)), "A": jnp.ones((3, 3))})
    with pytest.raises(ValueError, match="missing"):
        op.xw_to_y(jnp.ones(4), {"B": jnp.ones((4, 2))})
    with pytest.raises(TypeError):
        LoraOp("big")
    assert repr(LoraOp(0.5)) == "LoraOp(\n  is_diagonal=False,\n  alpha=0.5\n)"


# =======================================================================================
# general: marked path, decorator form, custom op, ETraceParam repr, class attributes
# =======================================================================================

def _all_ops():
    dense, M = _sparse_case("CSR")
    conv = ConvOp(jax.ShapeDtypeStruct((6, 2), jnp.float32), window_strides=2)
    return [
        (MatMulOp(weight_mask=np.ones((N_IN, N_OUT))), rand(0, (B, N_IN)),
         {"weight": rand(1, (N_IN, N_OUT)), "bias": rand(2, (N_OUT,))}),
        (conv, rand(3, (B, 6, 2)), {"weight": rand(4, (3, 2, 3)), "bias": rand(5, (3,))}),
        (SpMatMulOp(M), rand(6, (B, N_IN)), {"weight": M.data}),
        (ElemWiseOp(jnp.tanh), None, rand(7, (4,))),
        (LoraOp(), rand(8, (B, N_IN)), {"B": rand(9, (N_IN, 2)), "A": rand(10, (2, N_OUT))}),
    ]


def test_marked_path_matches_xw_to_y():
    for op, x, w in _all_ops():
        close(op(x, w), op.xw_to_y(x, w))
        names = marker_names(lambda xx, ww: op(xx, ww), x, w)
        assert f"{MARKER_PREFIX}{op.op_id}" in names, (type(op).__name__, names)
        assert lookup_op(f"{MARKER_PREFIX}{op.op_id}") is op
        # applying inside jit / vmap still works
        if x is not None:
            close(jax.jit(op)(x, w), op.xw_to_y(x, w))
            close(jax.vmap(op, in_axes=(0, None))(x, w), op.xw_to_y(x, w))


def test_class_attributes():
    expect = {MatMulOp: ("dense", "compact", False), ConvOp: ("conv", "channel", False),
              SpMatMulOp: ("sparse", "compact", False), ElemWiseOp: ("elemwise", "compact", True),
              LoraOp: ("lora", "dense", False)}
    for op, _, _ in _all_ops():
        kind, trace, diag = expect[type(op)]
        assert (op.kind, op.param_trace, op.is_diagonal) == (kind, trace, diag)
        assert isinstance(op, ETraceOp)
    assert MatMulOp.x_ndim == 1 and SpMatMulOp.x_ndim == 1 and LoraOp.x_ndim == 1
    assert ElemWiseOp.x_ndim is None


def test_decorator_form():
    @brainscale.ETraceOp
    def matmul(x, w):
        return x @ w["weight"] + w["bias"]

    assert isinstance(matmul, FunctionOp)
    w = {"weight": rand(0, (N_IN, N_OUT)), "bias": rand(1, (N_OUT,))}
    x = rand(2, (B, N_IN))
    ref = np.asarray(x) @ np.asarray(w["weight"]) + np.asarray(w["bias"])
    close(matmul(x, w), ref)
    close(matmul.xw_to_y(x, w), ref)
    dy = rand(3, (B, N_OUT))
    tree_close(matmul.xy_to_dw(x, dy, w),
               {"weight": np.asarray(x).T @ np.asarray(dy), "bias": np.asarray(dy).sum(0)})


class CustomizedMatMul(brainscale.ETraceOp):
    def xw_to_y(self, x, w):
        return jnp.dot(x, w["weight"]) + w["bias"]

    def yw_to_w(self, y, w):
        return {"weight": jnp.expand_dims(y, -2) * w["weight"], "bias": y * w["bias"]}


def test_custom_op_subclass():
    op = CustomizedMatMul()
    w = {"weight": rand(0, (N_IN, N_OUT)), "bias": rand(1, (N_OUT,))}
    x = rand(2, (N_IN,))
    ref = np.asarray(x) @ np.asarray(w["weight"]) + np.asarray(w["bias"])
    close(op(x, w), ref)
    assert repr(op).startswith("CustomizedMatMul(")
    y = rand(3, (N_OUT,))
    tree_close(op.yw_to_w(y, w), MatMulOp().yw_to_w(y, w))
    dy = rand(4, (N_OUT,))
    tree_close(op.xy_to_dw(x, dy, w), MatMulOp().xy_to_dw(x, dy, w))


def test_etrace_param_repr_and_execute():
    op = MatMulOp()
    w = {"weight": jnp.ones((N_IN, N_OUT)), "bias": jnp.zeros(N_OUT)}
    p = ETraceParam(w, op)
    r = repr(p)
    assert r.startswith("ETraceParam(")
    assert "float32[5,4]" in r and "float32[4]" in r
    assert "gradient=<ETraceGrad.adaptive: 'adaptive'>" in r
    assert "op=MatMulOp(" in r and "is_etrace=True" in r
    assert p.gradient is ETraceGrad.adaptive
    close(p.execute(jnp.ones(N_IN)), 5 * np.ones(N_OUT))


def test_docstring_examples():
    import doctest

    import brainscale.ops as ops_module
    res = doctest.testmod(ops_module, extraglobs={"jax": jax, "jnp": jnp,
                                                  "brainevent": brainevent})
    assert res.attempted > 0 and res.failed == 0, res
