"""A plain weight (``brainstate.ParamState``, not a trace parameter) between hidden states.

brainscale 0.1 accepted e.g. brainpy's ``LeakyRateReadout`` (a plain matmul of one layer's
spikes into another hidden state); here it was refused as a non-element-wise path. Now a
linear map applying a plain parameter to activity that depends on hidden states is *cut* like
a trace op whose parameter keeps no trace: the IR lists it (``cuts=[eqn k: %R]``), J and df
leave it out, the learning signal flows through it, and the weight gets its one-step gradient
(with a NoTemporalCreditWarning). Checked:

* the same model with the weight as ``ETraceParam(..., is_etrace=False)`` (a trace op without
  a trace) gives the same gradients for every parameter, both algorithms, batched or not;
* on a layer where D-RTRL is exact (no recurrent weight, a memoryless readout through the
  plain weight) the online gradients equal BPTT;
* mixing that is not a plain-weight map (a roll) is still refused.
"""
from __future__ import annotations

import warnings

import brainstate
import braintools
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from helpers import rel_err
from oracle import bptt_grads


class Readout(brainstate.nn.Module):
    """A LIF layer (recurrent or not) and a readout state driven through a plain weight R."""

    def __init__(self, plain=True, batch=0, recurrent=True, leak=0.8):
        super().__init__()
        rng = np.random.RandomState(0)
        self.recurrent, self.leak = recurrent, leak
        n_in = 3 + (5 if recurrent else 0)
        self.w = brainscale.ETraceParam({"weight": jnp.asarray(rng.randn(n_in, 5), jnp.float32)},
                                        brainscale.MatMulOp())
        R = jnp.asarray(rng.randn(5, 2), jnp.float32)
        self.plain = plain
        self.R = brainstate.ParamState(R) if plain else \
            brainscale.ETraceParam({"weight": R}, brainscale.MatMulOp(), is_etrace=False)
        lead = (batch,) if batch else ()
        self.V = brainscale.ETraceState(jnp.asarray(rng.rand(*lead, 5), jnp.float32))
        self.r = brainscale.ETraceState(jnp.zeros(lead + (2,), jnp.float32))
        self.spk = braintools.surrogate.Sigmoid()

    def update(self, x):
        z = self.spk(self.V.value - 1.0)
        inp = jnp.concatenate([x, z], -1) if self.recurrent else x
        self.V.value = 0.9 * (self.V.value - z) + self.w.execute(inp)
        z2 = self.spk(self.V.value - 1.0)
        drive = z2 @ self.R.value if self.plain else self.R.execute(z2)
        self.r.value = self.leak * self.r.value + drive
        return self.r.value


def _grads(net, algo, xs, tg):
    learner = (brainscale.DiagParamDimAlgorithm(net) if algo == "param"
               else brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", brainscale.NoTemporalCreditWarning)
        learner.compile_graph(xs[0])
    g, _ = brainscale.online_gradients(learner, xs, tg, lambda o, y: jnp.sum((o - y) ** 2))
    return learner, g


def _data(batch, T=8):
    rng = np.random.RandomState(1)
    lead = (batch,) if batch else ()
    return (jnp.asarray(rng.randn(T, *lead, 3), jnp.float32),
            jnp.asarray(rng.randn(T, *lead, 2), jnp.float32))


@pytest.mark.parametrize("algo", ["param", "io"])
@pytest.mark.parametrize("batch", [0, 2])
def test_plain_weight_is_a_trace_op_without_a_trace(algo, batch):
    xs, tg = _data(batch)
    learner, g_plain = _grads(Readout(True, batch), algo, xs, tg)
    _, g_op = _grads(Readout(False, batch), algo, xs, tg)
    assert rel_err(g_plain[("w",)], g_op[("w",)]) < 1e-5
    assert rel_err(g_plain[("R",)], g_op[("R",)]["weight"]) < 1e-5
    g = learner.graph
    assert g.cuts and g.cuts[0][2] == ("R",)
    assert "cuts=[eqn " in learner.ir() and ": %R]" in learner.ir()
    assert [sorted(grp.states) for grp in g.groups] == [["V"], ["r"]]


def test_exact_layer_through_a_plain_readout_equals_bptt():
    xs, tg = _data(0, T=10)
    _, g = _grads(Readout(True, 0, recurrent=False, leak=0.0), "param", xs, tg)
    ref = bptt_grads(Readout(True, 0, recurrent=False, leak=0.0), xs,
                     lambda o, y: jnp.sum((o - y) ** 2), targets=tg)
    for k in ref:
        assert rel_err(g[k], ref[k]) < 1e-5, k


def test_plain_readout_warns_at_the_users_line():
    xs, _ = _data(0)
    with pytest.warns(brainscale.NoTemporalCreditWarning, match="%R") as rec:
        brainscale.DiagParamDimAlgorithm(Readout(True, 0)).compile_graph(xs[0])
    assert rec[0].filename == __file__


class Rolled(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = brainscale.ETraceParam({"weight": jnp.ones((3, 4))}, brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.zeros(4))

    def update(self, x):
        self.V.value = 0.9 * jnp.roll(self.V.value, 1) + self.w.execute(x)
        return self.V.value


def test_other_mixing_is_still_refused():
    with pytest.raises(brainscale.UnsupportedModelError, match="non-element-wise"):
        brainscale.DiagParamDimAlgorithm(Rolled()).compile_graph(jnp.ones(3))
