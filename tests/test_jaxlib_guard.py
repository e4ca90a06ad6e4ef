"""jaxlib 0.10.2 miscompiles ``a * sum(a * b)`` on the CPU (jax-ml/jax#39103).

The exact trace of an op through a normalisation takes the VJP of the normalisation for every
output neuron (a vmap over B·N cotangents): on jaxlib 0.10.2 that fused kernel came out with
relative errors of 0.1-1.4 for ``brainstate.nn.LayerNorm`` at N = 64..127, B = 8, silently.
brainscale excludes that jaxlib (pyproject) and warns when it is used anyway; these tests
fail on an installation that computes the pattern wrong.
"""
from __future__ import annotations

import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from brainscale._compat import check_jaxlib
from helpers import rel_err
from oracle import bptt_grads

N_IN, N, B, T = 20, 64, 8, 8


def test_installed_jaxlib_computes_the_pattern_right():
    rng = np.random.RandomState(0)
    a = rng.randn(8, 64).astype(np.float32)
    b = rng.randn(512, 8, 64).astype(np.float32)
    got = jax.jit(lambda a, b: a[None] * jnp.sum(a[None] * b, 2, keepdims=True))(a, b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref = a64[None] * np.sum(a64[None] * b64, 2, keepdims=True)
    assert rel_err(np.asarray(got, np.float64), ref) < 1e-5, (
        "this jax/jaxlib computes a*sum(a*b) wrong (jax-ml/jax#39103): install another "
        "jaxlib (brainscale's pyproject excludes 0.10.2)")


def test_the_bad_jaxlib_warns_with_the_fix():
    with pytest.warns(brainscale.JaxlibMiscompileWarning,
                      match=r"jaxlib 0\.10\.2 .*jax-ml/jax#39103.*"
                            r"XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type='"):
        check_jaxlib(version=(0, 10, 2), flags="", platform="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the flag turns the faulty fusion off; other platforms and releases are fine
        assert check_jaxlib((0, 10, 2), "--xla_cpu_experimental_ynn_fusion_type=", "cpu") is None
        assert check_jaxlib((0, 10, 2), "", "gpu") is None
        assert check_jaxlib((0, 10, 1), "", "cpu") is None
        assert check_jaxlib((0, 12, 0), "", "cpu") is None


class LNNet(brainstate.nn.Module):
    """``W·x → brainstate.nn.LayerNorm (rsqrt form) → 2-state neuron``, B = 8, N = 64."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.w = brainscale.ETraceParam(
            {"weight": jnp.asarray(rng.randn(N_IN, N) / np.sqrt(N_IN), jnp.float32)},
            brainscale.MatMulOp())
        self.ln = brainstate.nn.LayerNorm((N,), use_scale=False, use_bias=False)
        self.V = brainscale.ETraceState(jnp.asarray(rng.rand(B, N) * 0.5, jnp.float32))
        self.a = brainscale.ETraceState(jnp.zeros((B, N), jnp.float32))

    def update(self, x):
        z = 1.5 * self.ln(self.w.execute(x)) + 0.2
        v, a = self.V.value, self.a.value
        self.V.value = 0.9 * v - 0.2 * a + 0.1 * z
        self.a.value = 0.8 * a + 0.1 * jnp.tanh(v)
        return jnp.tanh(self.V.value)


def test_exact_trace_through_brainstate_layernorm_equals_bptt_at_the_miscompiled_size():
    rng = np.random.RandomState(1)
    xs = jnp.asarray(rng.randn(T, B, N_IN), jnp.float32)
    tgs = jnp.asarray(rng.randn(T, B, N), jnp.float32)

    def loss(out, tg):
        return jnp.sum((out - tg) ** 2)

    learner = brainscale.DiagParamDimAlgorithm(LNNet()).compile_graph(xs[0])
    (op,) = learner.graph.ops
    assert op.op_class == "MatMulOp+norm" and op.layout == "dense"
    g, _ = brainscale.online_gradients(learner, xs, tgs, loss)
    ref = bptt_grads(LNNet(), xs, loss, targets=tgs)
    assert rel_err(g["w",], ref["w",]) < 1e-5
