"""Sanity checks of the dense reference oracle (tests/oracle.py) itself."""
from __future__ import annotations

import os
import sys

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from oracle import DenseOracle, alpha_of, bptt_grads  # noqa: E402
from brainscale.concepts import ETraceOp, ETraceParam, FunctionOp  # noqa: E402


@ETraceOp
def mm(x, w):
    return x @ w["weight"] + w["bias"]


class Leaky(brainstate.nn.Module):
    """input -> ETraceParam(mm) -> V_t = 0.9 V_{t-1} + y_t -> out = tanh(V_t + b) (+ c·y_t)."""

    def __init__(self, n_in, n_out, batch=None, direct=0.0, unit=None, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.w = ETraceParam({"weight": jnp.asarray(rng.randn(n_in, n_out) * 0.5, jnp.float32),
                              "bias": jnp.asarray(rng.randn(n_out) * 0.1, jnp.float32)}, op=mm)
        self.b = brainstate.ParamState(jnp.asarray(rng.randn(n_out) * 0.1, jnp.float32))
        shape = (n_out,) if batch is None else (batch, n_out)
        v0 = jnp.zeros(shape, jnp.float32)
        self.unit = unit
        self.V = brainstate.HiddenState(v0 if unit is None else v0 * unit)
        self.direct = direct

    def update(self, x):
        y = self.w.execute(x)
        if self.unit is None:
            self.V.value = 0.9 * self.V.value + y
            v = self.V.value
        else:
            self.V.value = 0.9 * self.V.value + y * self.unit
            v = self.V.value.to_decimal(self.unit)
        return jnp.tanh(v + self.b.value) + self.direct * y


class TwoState(brainstate.nn.Module):
    """A smooth 2-state neuron group (V, a) fed by one matmul op; no recurrent weights."""

    def __init__(self, n_in, n_out, seed=1):
        super().__init__()
        rng = np.random.RandomState(seed)
        op = FunctionOp(lambda x, w: x @ w)
        self.w = ETraceParam(jnp.asarray(rng.randn(n_in, n_out) * 0.5, jnp.float32), op=op)
        self.V = brainstate.HiddenState(jnp.zeros(n_out))
        self.a = brainstate.HiddenState(jnp.zeros(n_out))

    def update(self, x):
        y = self.w.execute(x)
        v = 0.9 * self.V.value + y - 0.5 * self.a.value
        self.a.value = 0.8 * self.a.value + 0.2 * jnp.tanh(v)
        self.V.value = v
        return jnp.tanh(v)


def _loss(out, target):
    return jnp.sum(out * target)


def _data(T, n_in, n_out, batch=None, seed=3):
    rng = np.random.RandomState(seed)
    xs_shape = (T, n_in) if batch is None else (T, batch, n_in)
    tg_shape = (T, n_out) if batch is None else (T, batch, n_out)
    xs = jnp.asarray(rng.randn(*xs_shape), jnp.float32)
    tg = jnp.asarray(rng.randn(*tg_shape), jnp.float32)
    return xs, tg


def _run_oracle(model, xs, tg, **kw):
    orc = DenseOracle(model, xs[0], loss_fn=_loss, **kw)
    total, last = None, None
    for t in range(len(xs)):
        last = orc.step(xs[t], target=tg[t])
        g = {k: np.asarray(u.get_mantissa(v)) if not isinstance(v, dict)
             else {kk: np.asarray(u.get_mantissa(vv)) for kk, vv in v.items()}
             for k, v in last["grads"].items()}
        if total is None:
            total = g
        else:
            for k in total:
                if isinstance(total[k], dict):
                    total[k] = {kk: total[k][kk] + g[k][kk] for kk in total[k]}
                else:
                    total[k] = total[k] + g[k]
    return orc, total, last


def _flat(tree):
    if isinstance(tree, dict):
        return np.concatenate([np.ravel(np.asarray(u.get_mantissa(tree[k]))) for k in sorted(tree)])
    return np.ravel(np.asarray(u.get_mantissa(tree)))


def _assert_close_rel(a, b, rtol=1e-5):
    a, b = _flat(a), _flat(b)
    assert a.shape == b.shape
    scale = max(np.max(np.abs(b)), 1e-12)
    err = np.max(np.abs(a - b)) / scale
    assert err < rtol, f"relative error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("batch,direct,unit", [(None, 0.0, None), (2, 0.0, None),
                                               (None, 0.5, None), (2, 0.0, u.mV)])
def test_drtrl_equals_bptt_single_layer(batch, direct, unit):
    T, n_in, n_out = 15, 3, 4
    xs, tg = _data(T, n_in, n_out, batch)
    model = Leaky(n_in, n_out, batch=batch, direct=direct, unit=unit)
    ref = bptt_grads(model, xs, _loss, targets=tg)
    assert set(ref) == {("w",), ("b",)}
    orc, total, last = _run_oracle(model, xs, tg, algorithm="param")
    assert set(total) == {("w",), ("b",)}
    assert orc.trace_param_paths == [("w",)] and orc.plain_param_paths == [("b",)]
    _assert_close_rel(total[("w",)], ref[("w",)])
    _assert_close_rel(total[("b",)], ref[("b",)])
    n = n_out * (batch or 1)
    assert last["J"].shape == (n, n)
    np.testing.assert_allclose(last["J"], 0.9 * np.eye(n), rtol=1e-6, atol=1e-7)
    assert last["hidden_names"] == [(("V",), (n_out,) if batch is None else (batch, n_out))]
    (key,) = last["traces"]
    assert key == (0, ("w",)) and last["traces"][key].shape == (n, n_in * n_out + n_out)
    # the oracle advanced the model's hidden state
    assert np.abs(np.asarray(u.get_mantissa(model.V.value))).sum() > 0


def test_drtrl_equals_bptt_two_state_group():
    T, n_in, n_out = 15, 3, 4
    xs, tg = _data(T, n_in, n_out)
    model = TwoState(n_in, n_out)
    ref = bptt_grads(model, xs, _loss, targets=tg)
    orc, total, last = _run_oracle(model, xs, tg, algorithm="param")
    assert orc.N == 2 * n_out
    _assert_close_rel(total[("w",)], ref[("w",)])


def test_esdrtrl_step1_formula_and_shapes():
    n_in, n_out, B = 3, 4, 2
    alpha = 0.7
    xs, tg = _data(3, n_in, n_out, B)
    model = Leaky(n_in, n_out, batch=B)
    orc = DenseOracle(model, xs[0], algorithm="io", decay_or_rank=alpha, loss_fn=_loss)
    r1 = orc.step(xs[0], target=tg[0])
    N = B * n_out
    assert r1["delta"].shape == (N,)
    assert r1["traces"]["x"][0].shape == (B, n_in)
    assert r1["traces"]["f"][(0, ("w",))].shape == (N, B * n_out)
    assert not r1["traces"]["param"]
    # literal formula at t=1: (1-α) x ⊗ (df∘δ), df = diag(D) reshaped like y (D = I here)
    D = r1["D"][0]
    np.testing.assert_allclose(D, np.eye(N), atol=1e-7)
    df = np.diag(D).reshape(B, n_out)
    sig = df * r1["delta"].reshape(B, n_out)
    x = np.asarray(xs[0])
    gw = (1 - alpha) * np.einsum("bi,bj->ij", x, sig)
    gb = (1 - alpha) * sig.sum(0)
    np.testing.assert_allclose(r1["grads"][("w",)]["weight"], gw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r1["grads"][("w",)]["bias"], gb, rtol=1e-5, atol=1e-7)
    # δ at t=1 is ∂L/∂V = (1 - tanh²(V + b)) * target
    V = np.asarray(model.V.value)
    dl = (1 - np.tanh(V + np.asarray(model.b.value)) ** 2) * np.asarray(tg[0])
    np.testing.assert_allclose(r1["delta"], dl.ravel(), rtol=1e-5, atol=1e-7)
    # step 2: ε_x = α x1 + x2 ; ε_f = α J ε_f + (1-α) D
    r2 = orc.step(xs[1], target=tg[1])
    np.testing.assert_allclose(r2["traces"]["x"][0], alpha * x + np.asarray(xs[1]), rtol=1e-6)
    ef = alpha * 0.9 * (1 - alpha) * np.eye(N) + (1 - alpha) * np.eye(N)
    np.testing.assert_allclose(r2["traces"]["f"][(0, ("w",))], ef, rtol=1e-6, atol=1e-7)


def test_alpha_of_rank():
    assert alpha_of(0.9) == 0.9
    assert alpha_of(3) == pytest.approx(0.5)
    assert alpha_of(1) == 0.0


@ETraceOp
def _mm_plain(x, w):
    return x @ w


_elemwise = FunctionOp(lambda x, w: w, is_diagonal=True)


@jax.jit
def _jit_helper(x, w):
    return jnp.sin(_mm_plain(x, w))


class EdgeModel(brainstate.nn.Module):
    """Op inside a user jax.jit helper, one param applied twice, an element-wise op (x=None)."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.w = ETraceParam(jnp.asarray(rng.randn(3, 4) * 0.5, jnp.float32), op=_mm_plain)
        self.tau = ETraceParam(jnp.asarray(rng.rand(4), jnp.float32), op=_elemwise)
        self.V = brainstate.HiddenState(jnp.zeros(4))

    def update(self, x):
        y1 = _jit_helper(x, self.w.value)
        y2 = self.w.execute(2.0 * x)
        d = self.tau.op(None, self.tau.value)
        self.V.value = 0.9 * self.V.value + y1 + y2 + 0.1 * d * self.V.value
        return jnp.tanh(self.V.value)


def test_edge_cases_markers_shared_param_elementwise():
    T = 10
    xs, tg = _data(T, 3, 4, seed=5)
    model = EdgeModel()
    ref = bptt_grads(model, xs, _loss, targets=tg)
    orc, total, _ = _run_oracle(model, xs, tg, algorithm="param")
    assert orc.op_params == [(0, ("w",)), (1, ("w",)), (2, ("tau",))]
    _assert_close_rel(total[("w",)], ref[("w",)])
    _assert_close_rel(total[("tau",)], ref[("tau",)])
    # io: the element-wise op (no x) follows the D-RTRL rule, so it stays exact
    model = EdgeModel()
    orc, total, last = _run_oracle(model, xs, tg, algorithm="io", decay_or_rank=0.9)
    assert set(last["traces"]["x"]) == {0, 1}
    assert set(last["traces"]["param"]) == {(2, ("tau",))}
    _assert_close_rel(total[("tau",)], ref[("tau",)])


class PlainIntoHidden(brainstate.nn.Module):
    """A plain ParamState ``c`` feeding the hidden state: it gets the instantaneous gradient."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.w = ETraceParam(jnp.asarray(rng.randn(3, 4) * 0.5, jnp.float32), op=_mm_plain)
        self.c = brainstate.ParamState(jnp.asarray(rng.randn(4) * 0.1, jnp.float32))
        self.V = brainstate.HiddenState(jnp.zeros(4))

    def update(self, x):
        self.V.value = 0.9 * self.V.value + self.w.execute(x) + self.c.value
        return jnp.tanh(self.V.value)


def test_plain_param_feeding_hidden_gets_instantaneous_gradient():
    xs, tg = _data(4, 3, 4, seed=7)
    model = PlainIntoHidden()
    orc = DenseOracle(model, xs[0], algorithm="param", loss_fn=_loss)
    for t in range(4):
        r = orc.step(xs[t], target=tg[t])
        # ∂L^t/∂c through h^t only (∂h^t/∂c = I): equals δ^t
        np.testing.assert_allclose(r["grads"][("c",)], r["delta"], rtol=1e-6, atol=1e-7)
        # reference in float64; 1 - tanh(V)^2 in float32 cancels where tanh(V) is near 1, so
        # its absolute error is a few float32 ulps of 1 times |target| (jaxlib releases
        # differ there by ~3e-7), whatever the relative error of the small result
        V = np.asarray(model.V.value, np.float64)
        np.testing.assert_allclose(r["delta"], (1 - np.tanh(V) ** 2) * np.asarray(tg[t]),
                                   rtol=1e-5, atol=1e-6)
