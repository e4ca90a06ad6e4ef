"""D-RTRL advanced once per window (``online_gradients(..., chunk=K)``, backends/drtrl_window).

The windowed form reassociates the per-step sums (module docstring of
``brainscale.backends.drtrl_window``), so gradients, losses, final traces and hidden states
equal the per-step loop up to float rounding, for every model (traces the window cannot run
stay per step in the same loop), for windows that do not divide T, that equal it and that
are longer than the sequence (sequences fed in pieces: test_online_chunked.py).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import jax
import pytest

import brainscale
import models
from brainscale.backends.drtrl_window import DrtrlWindow, window_trace_error
from helpers import run_result_script
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
# lif_delta, alif, gru3, conv_snn and sparse_rec also run in test_online_chunked.py
RUN = {"gru_rh", "masked_rec", "single_layer_2state", "gru_plain_in", "hybrid_mix",
       "elemwise_tau", "softmax_tau"}


@pytest.mark.parametrize("name,batch,windowed", CASES)
def test_windowed_drtrl_equals_per_step(name, batch, windowed):
    if name not in RUN:
        net_b, x0 = models.make(name, batch=batch)
        lb = brainscale.DiagParamDimAlgorithm(net_b).compile_graph(x0)
    else:
        net_a, la, net_b, lb, x0 = _pair(name, batch)
    ids = {t.id for t in lb.graph.traces if t.dim == "param"}
    win = _windowed(lb)
    assert win <= ids
    assert {"all": win == ids, "some": win and win != ids, "none": not win}[windowed]
    if name not in RUN:
        return
    xs, ys = sequence(x0, 11, seed=3)              # windows of 4, 4 and 3
    ga, loss_a = brainscale.online_gradients(la, xs, ys, loss_fn)
    gb, loss_b = brainscale.online_gradients(lb, xs, ys, loss_fn, chunk=4)
    _assert_same(net_a, la, net_b, lb, ga, gb, loss_a, loss_b)


@pytest.mark.parametrize("K", [6, 40])
def test_window_lengths(K):
    """A window equal to T, and a window longer than the sequence."""
    net_a, la, net_b, lb, x0 = _pair("alif", 2)
    xs, ys = sequence(x0, 9, seed=7)
    ga, loss_a = brainscale.online_gradients(la, xs, ys, loss_fn)
    gb, loss_b = brainscale.online_gradients(lb, xs, ys, loss_fn, chunk=K)
    _assert_same(net_a, la, net_b, lb, ga, gb, loss_a, loss_b)


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


_X64 = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {here!r})
    import brainstate, jax, jax.numpy as jnp, numpy as np
    brainstate.environ.set(precision=64)      # brainstate owns jax_enable_x64 at import
    jax.config.update("jax_enable_x64", True)
    import brainscale, models

    def loss_fn(out, target):
        return jnp.sum(out * target)

    out = {{}}
    for name in ("alif",):
        runs = []
        for chunk in (1, 5):
            m, x0 = models.make(name, 2)
            for st in m.states().values():
                st.value = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), st.value)
            x0 = jnp.asarray(x0, jnp.float64)
            rng = np.random.RandomState(1)
            xs = jnp.asarray(rng.randn(12, *np.shape(x0)))
            ys = jnp.asarray(rng.randn(12, *np.shape(models.make(name, 2)[0].update(x0))))
            learner = brainscale.DiagParamDimAlgorithm(m).compile_graph(x0)
            g, _ = brainscale.online_gradients(learner, xs, ys, loss_fn, chunk=chunk)
            runs.append(np.concatenate([np.ravel(l) for l in jax.tree.leaves(g)]))
        a, b = runs
        assert a.dtype == b.dtype == np.float64
        out[name] = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    print("RESULT" + json.dumps(out))
""")


def test_windowed_equals_per_step_to_float64_rounding():
    """In float64 the reassociated sums agree to ~1e-15: the window changes no term."""
    code = _X64.format(here=str(Path(__file__).parent))
    errs = run_result_script(code)
    assert len(errs) == 1
    for name, err in errs.items():
        assert err < 1e-12, f"{name}: windowed vs per-step relative difference {err:.3g}"
