"""brainscale 0.1's algorithm objects: the aliases compute what the Diag* classes compute, and
``get_etrace_of``, ``param_states`` / ``hidden_states`` / ``other_states`` and
``show_graph`` behave as 0.1 documents them (forms and keys as in ``docs/compat.md``).
"""
from __future__ import annotations

import os

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import models
from brainscale import MultiStepData

#: comparisons at rtol 1e-6 on the hybrid model (a spiking net whose surrogate edges
#: amplify rounding) are checked on what users compile: XLA's optimisations on (conftest.py)
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.optimized]

T = 4


def _xs(x0, T=T, seed=5):
    rng = np.random.RandomState(seed)
    return jnp.asarray(rng.randn(T, *np.shape(x0)), jnp.float32)


def _run(make, name="hybrid_mix", batch=2):
    """Per-step (gradients, loss) of ``sum(out**2)`` for the learner ``make(net)``."""
    net, x0 = models.make(name, batch)
    xs = _xs(x0)
    learner = make(net)
    learner.compile_graph(xs[0])
    params = net.states(brainstate.ParamState)

    @brainstate.transform.jit
    def step(x):
        return brainstate.transform.grad(lambda: jnp.sum(learner(x) ** 2), params,
                                         return_value=True)()

    out = []
    for t in range(T):
        g, loss = step(xs[t])
        out.append((jax.tree.map(np.asarray, g), float(loss)))
    return learner, out


def _assert_same(a, b):
    for (ga, la), (gb, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-6)
        assert set(ga) == set(gb)
        for k in ga:
            for x, y in zip(jax.tree.leaves(ga[k]), jax.tree.leaves(gb[k])):
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=str(k))


@pytest.mark.parametrize("alias,diag", [
    (lambda n: brainscale.ES_D_RTRL(n, 0.9, brainstate.mixin.Batching()),
     lambda n: brainscale.DiagIODimAlgorithm(n, decay_or_rank=0.9)),
    (lambda n: brainscale.D_RTRL(n, brainstate.mixin.Batching()),
     lambda n: brainscale.DiagParamDimAlgorithm(n)),
    (lambda n: brainscale.HybridDimVjpAlgorithm(n, 3),
     lambda n: brainscale.DiagHybridDimAlgorithm(n, decay_or_rank=3)),
], ids=["IODim", "ParamDim", "HybridDim"])
def test_alias_gradients_equal_diag(alias, diag):
    la, ga = _run(alias)
    ld, gd = _run(diag)
    assert la.ir() == ld.ir()                      # the same compiled decisions
    _assert_same(ga, gd)
    assert any(np.any(np.asarray(v) != 0) for g, _ in ga for v in jax.tree.leaves(g))


def test_alias_multi_step_equals_diag():
    def grads(make):
        net, x0 = models.make("elemwise_tau", 2)
        xs = _xs(x0, T=6)
        learner = make(net)
        learner.compile_graph(x0)
        params = net.states(brainstate.ParamState)
        total = None
        for w in range(2):
            xw = xs[3 * w:3 * w + 3]
            g = brainstate.transform.grad(
                lambda: jnp.sum(learner(MultiStepData(xw)) ** 2), params)()
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        return [(jax.tree.map(np.asarray, total), 0.0)]

    _assert_same(grads(lambda n: brainscale.IODimVjpAlgorithm(n, 0.9, vjp_method="multi-step")),
                 grads(lambda n: brainscale.DiagIODimAlgorithm(n, decay_or_rank=0.9,
                                                               vjp_method="multi-step")))


# ---------------------------------------------------------------------------------------
# get_etrace_of
# ---------------------------------------------------------------------------------------

def _stepped(make, name="gru3", batch=2, steps=2):
    net, x0 = models.make(name, batch)
    learner = make(net)
    learner.compile_graph(x0)
    for x in _xs(x0, T=steps):
        learner(x)
    return net, learner


def test_get_etrace_of_io_form():
    net, learner = _stepped(lambda n: brainscale.ES_D_RTRL(n, 0.9))
    xs, dfs = learner.get_etrace_of(net.l0.Wr)
    ref = learner.etrace_of(net.l0.Wr)
    r = next(r for r in learner.graph.relations if r.param == "l0.Wr")
    assert set(dfs) == {(r.op, g) for g in r.groups} == {("%y0", "G0")}
    assert len(xs) == 1
    for k, v in xs.items():
        np.testing.assert_array_equal(v, learner.etrace_xs[k].value)
        np.testing.assert_array_equal(v, ref[(r.id, "G0")]["x"])
        assert np.any(np.asarray(v) != 0)
    for k, v in dfs.items():
        np.testing.assert_array_equal(v, learner.etrace_dfs[k].value)
        np.testing.assert_array_equal(v, ref[(r.id, k[1])]["f"])
        assert np.any(np.asarray(v) != 0)
    # the weight by state, by model.states() path and by IR name
    for w in (("l0", "Wr"), "l0.Wr"):
        xs2, dfs2 = learner.get_etrace_of(w)
        assert set(xs2) == set(xs) and set(dfs2) == set(dfs)


def test_get_etrace_of_param_form():
    net, learner = _stepped(lambda n: brainscale.D_RTRL(n))
    got = learner.get_etrace_of(net.l1.Uh)
    ref = learner.etrace_of(net.l1.Uh)
    r = next(r for r in learner.graph.relations if r.param == "l1.Uh")
    assert set(got) == {(("l1", "Uh"), r.op, g) for g in r.groups}
    for (path, op, gid), v in got.items():
        assert jax.tree.structure(v) == jax.tree.structure(ref[(r.id, gid)])
        for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(ref[(r.id, gid)])):
            np.testing.assert_array_equal(a, b)
        assert np.shape(v["weight"]) == (2, 4, 4, 1)   # (batch, *weight, group states)
        assert np.any(np.asarray(v["weight"]) != 0)


def test_get_etrace_of_hybrid_form():
    net, learner = _stepped(lambda n: brainscale.HybridDimVjpAlgorithm(n, 0.9),
                            name="hybrid_mix")
    xs, dfs, bws = learner.get_etrace_of(net.w_in)        # the dense input weight: io-dim
    assert xs and dfs and not bws
    for w, path in ((net.w_rec, ("w_rec",)), (net.theta, ("theta",))):   # param-dim
        xs, dfs, bws = learner.get_etrace_of(w)
        assert not xs and not dfs and bws
        assert {k[0] for k in bws} == {path}


def test_get_etrace_of_elementwise_weight_under_io_is_a_df_trace():
    net, learner = _stepped(lambda n: brainscale.IODimVjpAlgorithm(n, 0.9), name="elemwise_tau")
    xs, dfs = learner.get_etrace_of(net.theta)
    assert xs == {}
    (key, v), = dfs.items()
    r = next(r for r in learner.graph.relations if r.param == "theta")
    assert key == (r.op, r.groups[0])
    np.testing.assert_array_equal(v, learner.etrace_of(net.theta)[(r.id, r.groups[0])])


def test_get_etrace_of_errors():
    net, learner = _stepped(lambda n: brainscale.D_RTRL(n), name="gru_plain_in")
    with pytest.raises(ValueError, match="not a trace parameter"):
        learner.get_etrace_of(net.P)                       # a plain ParamState
    with pytest.raises(brainscale.BrainscaleError, match="not a trace parameter"):
        learner.get_etrace_of(("gru", "nope"))
    with pytest.raises(ValueError, match="not read by the compiled step"):
        learner.get_etrace_of(brainstate.ParamState(jnp.ones(3)))
    with pytest.raises(TypeError, match="ParamState"):
        learner.get_etrace_of(3)
    fresh = brainscale.D_RTRL(models.gru3()[0])
    with pytest.raises(brainscale.NotCompiledError):
        fresh.get_etrace_of(("l0", "Wr"))


def test_get_etrace_of_param_trace_under_io_points_to_etrace_of():
    net, x0 = models.gru3(2)
    net.l0.Wx.gradient = brainscale.ETraceGrad.full        # forces a param-dim trace
    learner = brainscale.ES_D_RTRL(net, 0.9)
    learner.compile_graph(x0)
    with pytest.raises(brainscale.BrainscaleError, match=r"etrace_of\('l0.Wx'\)"):
        learner.get_etrace_of(net.l0.Wx)
    assert learner.etrace_of(net.l0.Wx)                    # which has it


# ---------------------------------------------------------------------------------------
# param_states / hidden_states / other_states
# ---------------------------------------------------------------------------------------

class CounterNet(brainstate.nn.Module):
    """A trace weight, a plain weight, a hidden state, a non-hidden counter and a parameter
    the step never reads."""

    def __init__(self, n_in=3, n=4):
        super().__init__()
        rng = np.random.RandomState(0)
        self.w = brainscale.ETraceParam({"weight": jnp.asarray(rng.randn(n_in, n), jnp.float32)},
                                        brainscale.MatMulOp())
        self.gain = brainstate.ParamState(jnp.ones(n))
        self.h = brainstate.HiddenState(jnp.zeros(n))
        self.count = brainstate.ShortTermState(jnp.zeros(()))
        self.unused = brainstate.ParamState(jnp.ones(2))

    def update(self, x):
        self.count.value = self.count.value + 1.
        self.h.value = jnp.tanh(self.w.execute(x) + 0.5 * self.h.value) * self.gain.value
        return self.h.value


def test_param_hidden_other_states():
    net = CounterNet()
    learner = brainscale.D_RTRL(net)
    learner.compile_graph(jnp.ones(3))
    ps, hs, os_ = learner.param_states, learner.hidden_states, learner.other_states
    for d in (ps, hs, os_):
        assert isinstance(d, brainstate.util.FlattedDict)
    assert set(ps) == {("w",), ("gain",)}                 # the unread parameter is not there
    assert ps[("w",)] is net.w and ps[("gain",)] is net.gain
    assert set(hs) == {("h",)} and hs[("h",)] is net.h
    assert set(os_) == {("count",)} and os_[("count",)] is net.count
    # the learner follows the model's states when they are re-created
    brainstate.nn.init_all_states(net)
    net.h = brainstate.HiddenState(jnp.zeros(4))
    assert learner.hidden_states[("h",)] is net.h


def test_group_state_appears_once_as_the_group():
    class GroupNet(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = brainscale.ETraceParam({"weight": jnp.full((3, 4), 0.3)},
                                            brainscale.MatMulOp())
            self.st = brainstate.HiddenGroupState(jnp.zeros((4, 2)))

        def update(self, x):
            v, a = self.st.get_value(0), self.st.get_value(1)
            v = 0.9 * v + self.w.execute(x) - a
            a = 0.8 * a + 0.1 * v
            self.st.set_value([v, a])
            return jnp.tanh(v)

    net = GroupNet()
    learner = brainscale.ES_D_RTRL(net, 0.9)
    learner.compile_graph(jnp.ones(3))
    assert set(learner.hidden_states) == {("st",)}
    assert learner.hidden_states[("st",)] is net.st
    assert set(learner.param_states) == {("w",)}


def test_states_need_a_compiled_learner():
    learner = brainscale.D_RTRL(CounterNet())
    for attr in ("param_states", "hidden_states", "other_states"):
        with pytest.raises(brainscale.NotCompiledError):
            getattr(learner, attr)


# ---------------------------------------------------------------------------------------
# show_graph
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled():
    net, x0 = models.gru3()
    learner = brainscale.D_RTRL(net)
    learner.compile_graph(x0)
    return learner


def test_show_graph_prints_the_ir(compiled, capsys, monkeypatch):
    monkeypatch.setenv("BRAINSCALE_DOT_RENDERER", "none")
    assert compiled.show_graph() is None
    out = capsys.readouterr().out
    assert out.startswith(compiled.ir())
    for line in ("group G0 = [%l0.h]", "rel R0 = %l0.Wr -> %y0 -> G0", "trace T0 = param(R0"):
        assert line in out
    assert "no Graphviz renderer found" in out
    msg = compiled.show_graph(verbose=False, return_msg=True)
    assert msg == compiled.ir()
    assert capsys.readouterr().out == ""


def test_show_graph_writes_dot_text(compiled, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINSCALE_DOT_RENDERER", "none")
    path = tmp_path / "g.dot"
    compiled.show_graph(verbose=False, path=path)
    text = path.read_text()
    assert "digraph" in text and "l0.Wr" in text
    assert text == compiled.to_dot()


def test_show_graph_renders_when_a_renderer_exists(compiled, tmp_path, capsys):
    from brainscale.ir.dot import find_renderer
    if os.environ.get("BRAINSCALE_DOT_RENDERER", "").lower() == "none" or find_renderer() is None:
        pytest.skip("no Graphviz renderer installed")
    path = tmp_path / "g.svg"
    compiled.show_graph(verbose=False, path=path)
    assert "<svg" in path.read_text()
    compiled.show_graph()                                  # default: a temp file, printed
    line = [l for l in capsys.readouterr().out.splitlines() if "graph rendered to" in l]
    assert line and os.path.exists(line[0].split("graph rendered to ", 1)[1])


def test_show_graph_needs_a_compiled_learner():
    with pytest.raises(brainscale.NotCompiledError):
        brainscale.D_RTRL(models.gru3()[0]).show_graph()
