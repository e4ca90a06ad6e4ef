"""``vjp_method='multi-step'`` with ``MultiStepData`` (brainscale 0.1's multi-step learning signal).

A window of K steps in one call: its gradient is back-propagation through the window with the
state at its start held fixed, plus ``trace_grad(ε^{t0}, ∂L/∂h^{t0})`` for the credit from
before it (brainscale/backends/window.py). Checked here:

* one window over the whole sequence is exact BPTT (zero traces), for a recurrent model,
  both algorithms, batched and unbatched;
* several windows on a layer where D-RTRL is exact equal BPTT over the whole sequence;
* several windows on a recurrent model equal the equation itself, computed by hand from
  BPTT inside the window and the learner's traces at the window start;
* misuse: MultiStepData without vjp_method='multi-step', windows of different lengths.
"""
from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from helpers import rel_err
import models
from brainscale import MultiStepData, SingleStepData
from oracle import bptt_grads


def sq(out, tg):
    return jnp.sum((out - tg) ** 2)




def _data(name, batch, T, seed=0):
    net, x0 = models.make(name, batch)
    rng = np.random.RandomState(seed)
    xs = jnp.asarray(rng.randn(T, *np.shape(x0)), jnp.float32)
    tg = jnp.asarray(rng.randn(T, *np.shape(net.update(x0))), jnp.float32)
    return xs, tg


def _learner(net, algo):
    if algo == "param":
        return brainscale.DiagParamDimAlgorithm(net, vjp_method="multi-step")
    return brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9, vjp_method="multi-step")


def _windows(name, batch, algo, xs, tg, K):
    net, x0 = models.make(name, batch)
    learner = _learner(net, algo).compile_graph(x0)
    params = net.states(brainstate.ParamState)
    total = None
    for w in range(len(xs) // K):
        xw, tw = xs[w * K:(w + 1) * K], tg[w * K:(w + 1) * K]
        g = brainstate.transform.grad(
            lambda: jnp.sum(jax.vmap(sq)(learner(MultiStepData(xw)), tw)), params)()
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return learner, net, total


@pytest.mark.parametrize("algo", ["param", "io"])
@pytest.mark.parametrize("name,batch", [("lif_delta", 0), ("alif", 2), ("gru3", 0)])
def test_one_window_over_the_sequence_is_bptt(name, batch, algo):
    T = 8
    xs, tg = _data(name, batch, T)
    _, _, g = _windows(name, batch, algo, xs, tg, K=T)
    ref = bptt_grads(models.make(name, batch)[0], xs, sq, targets=tg)
    for k in ref:
        assert rel_err(g[k], ref[k]) < 1e-5, k


@pytest.mark.parametrize("batch", [0, 2])
def test_windows_on_an_exact_layer_equal_bptt(batch):
    T, K = 9, 3
    xs, tg = _data("single_layer_2state", batch, T)
    _, _, g = _windows("single_layer_2state", batch, "param", xs, tg, K)
    ref = bptt_grads(models.make("single_layer_2state", batch)[0], xs, sq, targets=tg)
    for k in ref:
        assert rel_err(g[k], ref[k]) < 1e-5, k


def test_windows_on_a_recurrent_layer_follow_the_equation():
    """Window 2 of LIF D-RTRL == BPTT inside it (h^{t0} fixed) + Σ yw_to_w(δ^{t0}, ε^{t0})."""
    K = 4
    xs, tg = _data("lif_delta", 0, 2 * K, seed=3)
    net, x0 = models.make("lif_delta", 0)
    learner = _learner(net, "param").compile_graph(x0)
    learner(MultiStepData(xs[:K]))                               # window 1: states and traces
    eps = learner.etrace_of(net.syn)[("R0", "G0")]             # ε^{t0}: {'weight','bias'}
    h0 = {k: st.value for k, st in net.states(brainstate.HiddenState).items()}
    params = net.states(brainstate.ParamState)
    g = brainstate.transform.grad(
        lambda: jnp.sum(jax.vmap(sq)(learner(MultiStepData(xs[K:])), tg[K:])), params)()
    # the reference, by hand on a fresh copy of the model placed at t0
    ref_net, _ = models.make("lif_delta", 0)
    hidden = ref_net.states(brainstate.HiddenState)
    for k, v in h0.items():
        hidden[k].value = v

    def window_loss():
        return sum(sq(ref_net.update(xs[K + t]), tg[K + t]) for t in range(K))
    g_in = brainstate.transform.grad(window_loss, ref_net.states(brainstate.ParamState))()
    for k, v in h0.items():
        hidden[k].value = v
    delta0 = brainstate.transform.grad(window_loss, hidden)()[("V",)]     # ∂L/∂h^{t0}
    op = net.syn.op
    pre = op.yw_to_w(delta0, {"weight": eps["weight"][..., 0], "bias": eps["bias"][..., 0]})
    expect = jax.tree.map(jnp.add, g_in[("syn",)], pre)
    assert rel_err(g[("syn",)], expect) < 1e-5
    assert rel_err(pre, g_in[("syn",)]) > 1e-3          # the trace term is not negligible here


def test_single_step_data_and_misuse():
    net, x0 = models.make("lif_delta", 0)
    learner = brainscale.DiagParamDimAlgorithm(net).compile_graph(x0)
    out = learner(SingleStepData(x0))                      # a wrapped single step works
    assert np.shape(out) == (5,)
    with pytest.raises(brainscale.BrainscaleError, match="vjp_method='multi-step'"):
        learner(MultiStepData(jnp.stack([x0, x0])))
    net, x0 = models.make("lif_delta", 0)
    learner = _learner(net, "param").compile_graph(x0)
    assert np.shape(learner(MultiStepData(jnp.stack([x0] * 3)))) == (3, 5)
    with pytest.raises(brainscale.BrainscaleError, match="compiled for inputs"):
        learner(MultiStepData(jnp.ones((3, 4))))
    with pytest.raises(ValueError, match="vjp_method must be"):
        brainscale.DiagParamDimAlgorithm(net, vjp_method="both")
