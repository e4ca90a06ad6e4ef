"""Trace ops whose output is element-wise in their input (``ETraceOp.x_elementwise``).

A normalisation's affine written as a trace op (brainscale 0.1's layout: one ``ETraceParam``
``{'scale', 'bias'}`` applied by ``brainscale.nn.ScaleOp``) sits between the previous op and
the neurons. Before: the previous op reached the neurons only through the affine's input, so
its weight got trace dim ``none`` (one-step gradient only) and a warning. Now the claim
``x_elementwise`` is proven on the op's jaxpr, the IR marks the op (``x_elementwise=true``),
and the previous op's relation reaches the neurons through it. Checked:

* Linear → LayerNorm statistics → ScaleOp → 2-state neuron, one layer without recurrent
  weights: D-RTRL equals BPTT for every parameter;
* a recurrent layer: the same model with the affine written from element-wise ops
  (``ElemWiseOp``) gives the same gradients, and that model equals the dense oracle;
* ``brainscale.nn.LayerNorm`` (0.1 layout) between a Linear and a LIF keeps the Linear's trace;
* a claim that is false (an op mixing its input) is not taken.
"""
from __future__ import annotations

import warnings

import brainstate
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import brainscale.nn as bnn
from helpers import rel_err
from oracle import DenseOracle, bptt_grads

N_IN, N, T = 3, 5, 8


def layer_norm(y, eps=1e-5):
    m = jnp.mean(y, -1, keepdims=True)
    return (y - m) / jnp.sqrt(jnp.mean((y - m) ** 2, -1, keepdims=True) + eps)


class Net(brainstate.nn.Module):
    """``V, a`` driven by ``γ ⊙ LN(W [x, tanh V]) + β``: the affine as one ScaleOp trace op
    (``affine='op'``) or from element-wise ops (``affine='elementwise'``)."""

    def __init__(self, affine="op", recurrent=False, batch=0):
        super().__init__()
        rng = np.random.RandomState(0)
        n_in = N_IN + (N if recurrent else 0)
        self.recurrent, self.affine = recurrent, affine
        self.w = brainscale.ETraceParam({"weight": jnp.asarray(rng.randn(n_in, N), jnp.float32)},
                                        brainscale.MatMulOp())
        g = jnp.asarray(1.0 + 0.3 * rng.randn(N), jnp.float32)
        b = jnp.asarray(0.2 * rng.randn(N), jnp.float32)
        if affine == "op":
            self.ln = brainscale.ETraceParam({"scale": g, "bias": b}, bnn.ScaleOp((N,)))
        else:
            self.g = brainscale.ETraceParam(g, brainscale.ElemWiseOp(lambda v: v))
            self.b = brainscale.ETraceParam(b, brainscale.ElemWiseOp(lambda v: v))
        lead = (batch,) if batch else ()
        self.V = brainscale.ETraceState(jnp.asarray(rng.rand(*lead, N) * 0.5, jnp.float32))
        self.a = brainscale.ETraceState(jnp.zeros(lead + (N,), jnp.float32))

    def update(self, x):
        inp = jnp.concatenate([x, jnp.tanh(self.V.value)], -1) if self.recurrent else x
        z = layer_norm(self.w.execute(inp))
        if self.affine == "op":
            z = self.ln.execute(z)
        else:
            z = z * self.g.execute(None) + self.b.execute(None)
        v, a = self.V.value, self.a.value
        self.V.value = 0.9 * v - 0.2 * a + z
        self.a.value = 0.8 * a + 0.1 * jnp.tanh(v)
        return jnp.tanh(self.V.value)


def sq(o, t):
    return jnp.sum((o - t) ** 2)


def _seq(batch, seed=1):
    rng = np.random.RandomState(seed)
    lead = (batch,) if batch else ()
    return (jnp.asarray(rng.randn(T, *lead, N_IN), jnp.float32),
            jnp.asarray(rng.randn(T, *lead, N), jnp.float32))


def _affine(g, net_kind):
    """(γ, β) gradients from either parameter layout."""
    if net_kind == "op":
        return g[("ln",)]["scale"], g[("ln",)]["bias"]
    return g[("g",)], g[("b",)]


@pytest.mark.parametrize("batch", [0, 2])
def test_single_layer_drtrl_equals_bptt_through_the_affine_op(batch):
    xs, tg = _seq(batch)
    net = Net("op", batch=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", brainscale.NoTemporalCreditWarning)
        learner = brainscale.DiagParamDimAlgorithm(net).compile_graph(xs[0])
    ops = {o.op_class: o for o in learner.graph.ops}
    assert ops["ScaleOp"].x_elementwise and "x_elementwise=true" in learner.ir()
    assert all(t.dim == "param" for t in learner.graph.traces)       # no dim 'none'
    g, _ = brainscale.online_gradients(learner, xs, tg, sq)
    ref = bptt_grads(Net("op", batch=batch), xs, sq, targets=tg)
    for k in ref:
        assert rel_err(g[k], ref[k]) < 1e-5, k


@pytest.mark.parametrize("algo", ["param", "io"])
def test_recurrent_layer_equals_the_elementwise_model_and_its_oracle(algo):
    batch = 2
    xs, tg = _seq(batch)

    def learner_of(net):
        return (brainscale.DiagParamDimAlgorithm(net) if algo == "param"
                else brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9))
    net_op, net_ew = Net("op", True, batch), Net("elementwise", True, batch)
    l_op, l_ew = learner_of(net_op).compile_graph(xs[0]), learner_of(net_ew).compile_graph(xs[0])
    orc = DenseOracle(Net("elementwise", True, batch), xs[0], algorithm="param", loss_fn=sq)
    p_op, p_ew = net_op.states(brainstate.ParamState), net_ew.states(brainstate.ParamState)
    for t in range(T):
        g_op = brainstate.transform.grad(lambda: sq(l_op(xs[t]), tg[t]), p_op)()
        g_ew = brainstate.transform.grad(lambda: sq(l_ew(xs[t]), tg[t]), p_ew)()
        ref = orc.step(xs[t], target=tg[t])["grads"]
        assert rel_err(g_op[("w",)], g_ew[("w",)]) < 1e-5, t
        if algo == "param":    # under io the ScaleOp (it has an input) gets an io-dim trace,
            # the ElemWiseOps (no input) the D-RTRL rule: their own gradients differ by design
            for a, b in zip(_affine(g_op, "op"), _affine(g_ew, "elementwise")):
                assert rel_err(a, b) < 1e-5, t
        if algo == "param":    # under io the oracle sees the LayerNorm inline, the learners
            # an absorbed composite (test_normalization checks that composite against it)
            assert rel_err(g_ew[("w",)], ref[("w",)]) < 1e-4, t


def test_nn_layernorm_between_a_linear_and_a_lif_keeps_the_linear_trace():
    class LNNet(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = bnn.Linear(N_IN, N)
            self.ln = bnn.LayerNorm(N)
            self.V = brainscale.ETraceState(jnp.zeros(N))

        def update(self, x):
            self.V.value = 0.9 * self.V.value + self.ln(self.fc(x))
            return jnp.tanh(self.V.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", brainscale.NoTemporalCreditWarning)
        learner = brainscale.DiagParamDimAlgorithm(LNNet()).compile_graph(jnp.ones(N_IN))
    dims = {learner.graph.relation_by_id[r].param: t.dim for t in learner.graph.traces
            for r in t.relations}
    assert all(d == "param" for d in dims.values()), dims
    assert any("+norm" in o.op_class for o in learner.graph.ops)


def test_a_false_claim_is_not_taken():
    class Mixes(bnn.ScaleOp):
        def xw_to_y(self, x, w):
            return jnp.roll(x, 1) * w["scale"]          # not element-wise in x

    class M(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.s = brainscale.ETraceParam({"scale": jnp.ones(N)}, Mixes((N,)))
            self.V = brainscale.ETraceState(jnp.zeros(N))

        def update(self, x):
            self.V.value = 0.9 * self.V.value + self.s.execute(x)
            return self.V.value
    with pytest.warns(UserWarning, match="x_elementwise=True is not taken"):
        learner = brainscale.DiagParamDimAlgorithm(M()).compile_graph(jnp.ones(N))
    assert not learner.graph.ops[0].x_elementwise
    assert "x_elementwise=true" not in learner.ir()
