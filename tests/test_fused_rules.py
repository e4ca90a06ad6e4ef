"""Fused param-dim rules (MatMulOp) and sum_leading equal the generic definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainscale.concepts import ETraceOp, sum_leading
from brainscale.ops import MatMulOp


@pytest.mark.parametrize("n,group", [(1, 8), (3, 8), (8, 8), (9, 8), (16, 8), (100, 8),
                                     (7, 3), (5, 1)])
def test_sum_leading_equals_sum(n, group):
    x = jax.random.normal(jax.random.PRNGKey(n), (n, 5, 4))
    tree = sum_leading(lambda b: {"a": x[b], "b": 2 * x[b, 0]}, n, group=group)
    np.testing.assert_allclose(tree["a"], x.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tree["b"], 2 * x[:, 0].sum(0), rtol=1e-5, atol=1e-5)


def _generic_update(op, eps, J, df, x, w):
    """The definition, per example: ε_i ← Σ_j yw_to_w(J_ij, ε_j) + xy_to_dw(x, df_i)."""
    k = df.shape[-1]
    out = []
    for i in range(k):
        acc = op.xy_to_dw(x, df[..., i], w)
        for j in range(k):
            acc = jax.tree.map(jnp.add, acc, op.yw_to_w(J[..., i, j], eps[j]))
        out.append(acc)
    return out


def _generic_grad(op, eps, delta, w):
    k = delta.shape[-1]
    acc = None
    for i in range(k):
        t = op.yw_to_w(delta[..., i], eps[i])
        acc = t if acc is None else jax.tree.map(jnp.add, acc, t)
    return acc


@pytest.mark.parametrize("batch", [0, 3, 10])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("opt", ["plain", "mask", "fn", "both"])
def test_matmul_fused_rules_match_generic(batch, k, opt):
    n_in, n = 5, 4
    keys = jax.random.split(jax.random.PRNGKey(batch * 10 + k), 8)
    mask = jax.random.uniform(keys[0], (n_in, n)) > 0.3
    kw = {"plain": {}, "mask": {"weight_mask": mask}, "fn": {"weight_fn": lambda v: 2 * v ** 3},
          "both": {"weight_mask": mask, "weight_fn": jnp.tanh}}[opt]
    op = MatMulOp(**kw)
    w = {"weight": jax.random.normal(keys[1], (n_in, n)), "bias": jax.random.normal(keys[2], (n,))}
    lead = (batch,) if batch else ()
    ew = jax.random.normal(keys[3], (k,) + lead + (n_in, n))
    eb = jax.random.normal(keys[4], (k,) + lead + (n,))
    eps = [{"weight": ew[i], "bias": eb[i]} for i in range(k)]
    J = jax.random.normal(keys[5], lead + (n, k, k))
    df = jax.random.normal(keys[6], lead + (n, k))
    x = jax.random.normal(keys[7], lead + (n_in,))
    fused = op.drtrl_update(eps, J, df, x, w)
    if batch:
        ref = jax.vmap(lambda e, j, d, xx: _generic_update(op, e, j, d, xx, w))(eps, J, df, x)
    else:
        ref = _generic_update(op, eps, J, df, x, w)
    assert isinstance(fused, list) and len(fused) == k
    for i in range(k):
        for key in ("weight", "bias"):
            np.testing.assert_allclose(fused[i][key], ref[i][key], rtol=1e-5, atol=1e-5)
    delta = jax.random.normal(keys[0], lead + (n, k))
    g = op.drtrl_grad(eps, delta, w)
    if batch:
        gr = jax.tree.map(lambda l: l.sum(0), jax.vmap(lambda e, d: _generic_grad(op, e, d, w))(eps, delta))
    else:
        gr = _generic_grad(op, eps, delta, w)
    for key in ("weight", "bias"):
        np.testing.assert_allclose(g[key], gr[key], rtol=1e-5, atol=1e-5)
