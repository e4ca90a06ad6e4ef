"""D-RTRL advanced once per window (``online_gradients(..., chunk=K)``, backends/drtrl_window).

The windowed form reassociates the per-step sums (module docstring of
``brainscale.backends.drtrl_window``), so gradients, losses, final traces and hidden states
equal the per-step loop up to float rounding, for every model (traces the window cannot run
stay per step in the same loop), for windows that do not divide T, that equal it and that
are longer than the sequence, and for sequences fed in pieces.
"""
from __future__ import annotations

import jax
import pytest

import brainscale
import models
from brainscale.backends.drtrl_window import DrtrlWindow, window_trace_error
from test_online_chunked import hidden_values, loss_fn, rel, sequence


def _pair(name, batch):
    net_a, x0 = models.make(name, batch=batch)
    net_b, _ = models.make(name, batch=batch)
    return (net_a, brainscale.DiagParamDimAlgorithm(net_a).compile_graph(x0),
            net_b, brainscale.DiagParamDimAlgorithm(net_b).compile_graph(x0), x0)


def _windowed(learner) -> set:
    return DrtrlWindow(learner._step.program).ids


def _assert_same(net_a, la, net_b, lb, ga, gb, loss_a, loss_b, tol=1e-5):
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        for a, b in zip(jax.tree.leaves(ga[k]), jax.tree.leaves(gb[k])):
            assert a.shape == b.shape
            assert rel(b, a) < tol, (k, rel(b, a))
    assert rel(loss_b, loss_a) < tol
    for a, b in zip(hidden_values(net_a), hidden_values(net_b)):
        assert rel(b, a) < tol
    for ta, tb in zip(la._traces, lb._traces):
        assert rel(tb.value, ta.value) < tol


# every model of tests/models.py with a D-RTRL trace, and which of its traces the window runs
# (the others run step by step in the same loop)
CASES = [("lif_delta", 2, "all"), ("alif", 3, "all"), ("gru3", 0, "all"), ("gru_rh", 2, "all"),
         ("masked_rec", 2, "all"), ("single_layer_2state", 2, "all"),
         ("gru_plain_in", 0, "all"), ("hybrid_mix", 2, "some"), ("conv_snn", 0, "some"),
         ("elemwise_tau", 2, "some"), ("softmax_tau", 0, "some"), ("normed_rec", 0, "none"),
         ("sparse_rec", 2, "none"), ("lora", 0, "none")]


@pytest.mark.parametrize("name,batch,windowed", CASES)
def test_windowed_drtrl_equals_per_step(name, batch, windowed):
    net_a, la, net_b, lb, x0 = _pair(name, batch)
    ids = {t.id for t in lb.graph.traces if t.dim == "param"}
    win = _windowed(lb)
    assert win <= ids
    assert {"all": win == ids, "some": win and win != ids, "none": not win}[windowed]
    xs, ys = sequence(x0, 11, seed=3)              # windows of 4, 4 and 3
    ga, loss_a = brainscale.online_gradients(la, xs, ys, loss_fn)
    gb, loss_b = brainscale.online_gradients(lb, xs, ys, loss_fn, chunk=4)
    _assert_same(net_a, la, net_b, lb, ga, gb, loss_a, loss_b)


@pytest.mark.parametrize("K", [1, 6, 9, 40])
def test_window_lengths(K):
    """One step per window, a window equal to T, and a window longer than the sequence."""
    net_a, la, net_b, lb, x0 = _pair("alif", 2)
    xs, ys = sequence(x0, 9, seed=7)
    ga, loss_a = brainscale.online_gradients(la, xs, ys, loss_fn)
    gb, loss_b = brainscale.online_gradients(lb, xs, ys, loss_fn, chunk=K)
    _assert_same(net_a, la, net_b, lb, ga, gb, loss_a, loss_b)


def test_pieces_continue_from_the_traces():
    """The traces a windowed call leaves are those the next call starts from."""
    net_a, la, net_b, lb, x0 = _pair("gru_rh", 2)
    xs, ys = sequence(x0, 12, seed=2)
    ga, _ = brainscale.online_gradients(la, xs, ys, loss_fn)
    g1, _ = brainscale.online_gradients(lb, xs[:5], ys[:5], loss_fn, chunk=3)
    g2, _ = brainscale.online_gradients(lb, xs[5:], ys[5:], loss_fn, chunk=3, reset=False)
    for k in ga:
        for a, b1, b2 in zip(jax.tree.leaves(ga[k]), jax.tree.leaves(g1[k]),
                             jax.tree.leaves(g2[k])):
            assert rel(b1 + b2, a) < 1e-5


def test_long_window_on_a_spiking_net():
    """64 steps in one window (the benchmark's K) stay within float rounding of per step."""
    net_a, la, net_b, lb, x0 = _pair("alif", 4)
    xs, ys = sequence(x0, 64, seed=11)
    ga, loss_a = brainscale.online_gradients(la, xs, ys, loss_fn)
    gb, loss_b = brainscale.online_gradients(lb, xs, ys, loss_fn, chunk=64)
    _assert_same(net_a, la, net_b, lb, ga, gb, loss_a, loss_b, tol=1e-4)


def test_which_traces_are_windowed_and_why_not():
    _, _, _, lb, _ = _pair("sparse_rec", 0)
    prog = lb._step.program
    why = [window_trace_error(prog.g, t, e.rule) for e in prog.plan for t in e.traces]
    assert any("SpMatMulOp" in w for w in why if w)
    _, _, _, lb, _ = _pair("conv_snn", 0)
    prog = lb._step.program
    why = {t.id: window_trace_error(prog.g, t, e.rule) for e in prog.plan for t in e.traces}
    assert [w for w in why.values() if w is None]                  # the readout's MatMulOp
    assert any("channel" in w for w in why.values() if w)          # the conv kernel

    class MyMatMul(brainscale.MatMulOp):
        def xw_to_y(self, x, w):
            return super().xw_to_y(x, w)
    from brainscale.backends.online_driver import plain_matmul_error
    assert "overrides MatMulOp.xw_to_y" in plain_matmul_error(MyMatMul())


def test_io_traces_are_not_windowed_as_drtrl():
    """ES-D-RTRL (io) traces keep their own windowed sum (the io path), not this one."""
    net, x0 = models.make("alif", batch=2)
    lrn = brainscale.DiagIODimAlgorithm(net, 0.9).compile_graph(x0)
    assert not _windowed(lrn)
