"""The Pallas backend end to end: selection pass, dumps, learner gradients, driver.

On CPU the kernels run in interpret mode (tiny models); the ``gpu`` tests repeat the
comparisons compiled at sizes where the cost model matters.
"""
from __future__ import annotations

import json

import brainevent
import brainstate
import braintools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import models
from helpers import build_graph
from brainscale.backends import JaxBackend, get_backend
from brainscale.backends.pallas import (PallasBackend, PallasSelectPass, Tiles,
                                        fused_online_gradients)
from brainscale.backends.pallas import _common
from brainscale.backends.pallas import rules as pallas_backend_mod
from brainscale.passes import PASS_REGISTRY, parse_pipeline

ON_GPU = _common.platform().kind == "gpu"
KPATH = "pallas" if ON_GPU else "pallas-interpret"     # the kernel path on this machine
TINY = Tiles(2, 4, 8)       # several programs per grid even on the tiny test models


def kernels(**kw):
    """Every supported trace on the kernel (on a GPU the cost model would keep these tiny
    traces on the JAX path), tiny tiles."""
    return PallasBackend(select="all", tiles=TINY, **kw)


def rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def assert_same_traces(lj, lp):
    """Every trace parameter's traces (``etrace_of``: the user's view, whatever the storage
    layout of the backend) agree between the two learners."""
    names = sorted({r.param for r in lj.graph.relations})
    assert names
    for name in names:
        tj, tp = lj.etrace_of(name), lp.etrace_of(name)
        assert tj.keys() == tp.keys()
        for a, b in zip(jax.tree.leaves(tp), jax.tree.leaves(tj)):
            assert a.shape == b.shape
            assert rel(a, b) < 1e-5


def loss_fn(out, y):
    return jnp.sum(jnp.tanh(jax.tree.leaves(out)[0]) * y)


def sequence(x0, T, seed=0):
    rng = np.random.RandomState(seed)
    xs = jnp.asarray(rng.randn(T, *np.shape(x0)).astype(np.float32))
    ys = jnp.asarray(rng.randn(T).astype(np.float32))
    return xs, ys


def per_step_grads(learner, xs, ys):
    params = learner.model.states(brainstate.ParamState)

    @brainstate.transform.jit
    def one(x, y):
        return brainstate.transform.grad(lambda: loss_fn(learner(x), y), params)()
    return [one(x, y) for x, y in zip(xs, ys)]


def compare(ga, gb, tol=1e-5):
    worst = 0.0
    for k in ga:
        for a, b in zip(jax.tree.leaves(ga[k]), jax.tree.leaves(gb[k])):
            worst = max(worst, rel(a, b))
    assert worst < tol, worst
    return worst


class CountLaunches:
    """Counts drtrl_multi launches at trace time (and the traces per launch)."""

    def __init__(self, monkeypatch):
        self.calls = []
        orig = pallas_backend_mod.drtrl_multi

        def wrapped(items, **kw):
            self.calls.append((len(items), kw.get("update"), kw.get("grad")))
            return orig(items, **kw)
        monkeypatch.setattr(pallas_backend_mod, "drtrl_multi", wrapped)


class TwoPathNet(brainstate.nn.Module):
    """Two equal-shaped dense weights (one plain, one with ``weight_fn=abs``: a chain
    factor) and a sparse recurrent weight into one LIF layer::

        z = spike(V - 1);  V = 0.8 (V - z) + W_a·x + |W_b|·z + M·z
    """

    def __init__(self, n=8, batch=2, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        f = lambda *s: jnp.asarray(rng.randn(*s).astype(np.float32))  # noqa: E731
        self.w_a = brainscale.ETraceParam({"weight": f(n, n) * 0.6, "bias": f(n) * 0.1},
                                          brainscale.MatMulOp())
        self.w_b = brainscale.ETraceParam({"weight": f(n, n) * 0.4},
                                          brainscale.MatMulOp(weight_fn=jnp.abs))
        mask = np.zeros((n, n), bool)
        mask[np.arange(n), (np.arange(n) + 1) % n] = True
        csr = brainevent.CSR.fromdense(jnp.asarray(np.where(mask, rng.randn(n, n), 0.0),
                                                   jnp.float32))
        self.w_s = brainscale.ETraceParam({"weight": jnp.asarray(csr.data)},
                                          brainscale.SpMatMulOp(csr))
        self.V = brainscale.ETraceState(jnp.asarray(rng.rand(batch, n).astype(np.float32)))
        self.spk = braintools.surrogate.Sigmoid()

    def update(self, x):
        z = self.spk(self.V.value - 1.0)
        self.V.value = 0.8 * (self.V.value - z) + self.w_a.execute(x) + \
            self.w_b.execute(z) + self.w_s.execute(z)
        return self.spk(self.V.value - 1.0)


# ---------------------------------------------------------------------------------------

def test_registration_and_pipeline_spec():
    assert isinstance(get_backend("pallas"), PallasBackend)
    from brainscale.backends.native import NativeBackend, available
    auto = get_backend("auto")
    assert isinstance(auto.impl, PallasBackend if ON_GPU else NativeBackend if available()
                      else JaxBackend)
    assert type(get_backend("auto", select="none").impl) is type(auto.impl)
    assert PASS_REGISTRY["pallas-select"] is PallasSelectPass
    (p,) = parse_pipeline("pallas-select{trace_dtype=bfloat16,select=all}")
    assert p == PallasSelectPass(select="all", trace_dtype="bfloat16")
    assert parse_pipeline(p.spec()) == (p,)
    assert PallasBackend(trace_dtype="bfloat16").pipeline() == (
        PallasSelectPass(trace_dtype="bfloat16"),)


@pytest.mark.parametrize("batch", [2, 0])
def test_lif_per_step_gradients_equal_jax_backend(batch, monkeypatch):
    T = 10
    net_j, x0 = models.make("lif_delta", batch=batch)
    net_p, _ = models.make("lif_delta", batch=batch)
    lj = brainscale.DiagParamDimAlgorithm(net_j, backend="jax").compile_graph(x0)
    count = CountLaunches(monkeypatch)
    lp = brainscale.DiagParamDimAlgorithm(net_p, backend=kernels()).compile_graph(x0)
    text = lp._step.as_text()
    assert "path=pallas" in text and ("interpret" in text) != ON_GPU
    xs, ys = sequence(x0, T)
    worst = 0.0
    for a, b in zip(per_step_grads(lj, xs, ys), per_step_grads(lp, xs, ys)):
        worst = max(worst, compare(b, a))
    # one forward launch (update) and one backward launch (contraction) were traced
    assert sorted(set(count.calls)) == [(1, False, True), (1, True, False)], count.calls
    assert_same_traces(lj, lp)


def test_mixed_model_launch_groups_fallback_and_gradients(monkeypatch):
    net_j, net_p = TwoPathNet(), TwoPathNet()
    x0 = jnp.zeros((2, 8), jnp.float32)
    count = CountLaunches(monkeypatch)
    comp = brainscale.compile(net_p, x0, algorithm="param", backend=kernels())
    lj = brainscale.DiagParamDimAlgorithm(net_j).compile_graph(x0)
    g = comp.step.graph
    paths = {t.id: (t.path, t.attr("path_reason"), t.attr("launch")) for t in g.traces}
    dense = [tid for tid, (p, _, _) in paths.items() if p == KPATH]
    assert len(dense) == 2 and paths[dense[0]][2] == paths[dense[1]][2] == "L0"
    (sparse,) = [v for v in paths.values() if v[0] == "jax"]
    assert sparse[1].startswith("unsupported: op kind 'sparse'")
    assert "pallas-select" in g.stages[-1]
    assert comp.learner._step.backend == "pallas"
    rules = {type(e.rule).__name__: [t.id for t in e.traces] for e in comp.step.program.plan}
    assert sorted(rules[next(r for r in rules if r.startswith("Pallas"))]) == sorted(dense)
    assert "launch L0 (x2)" in comp.step.as_text()
    xs, ys = sequence(x0, 5, seed=1)
    for a, b in zip(per_step_grads(lj, xs, ys), per_step_grads(comp.learner, xs, ys)):
        compare(b, a)
    # both dense traces share one launch in the forward and one in the backward
    assert sorted(set(count.calls)) == [(2, False, True), (2, True, False)], count.calls


def test_bf16_trace_storage_learner(capsys):
    T = 10
    net_f, x0 = models.make("lif_delta", batch=2)
    net_b, _ = models.make("lif_delta", batch=2)
    lf = brainscale.DiagParamDimAlgorithm(net_f).compile_graph(x0)
    lb = brainscale.DiagParamDimAlgorithm(
        net_b, backend=kernels(trace_dtype="bfloat16")).compile_graph(x0)
    assert {str(t.value.dtype) for t in lb._traces} == {"bfloat16"}
    assert all(a.storage == "bfloat16" for t in lb._step.graph.traces for a in t.arrays)
    xs, ys = sequence(x0, T)
    gf, _ = brainscale.online_gradients(lf, xs, ys, loss_fn)
    gb, _ = brainscale.online_gradients(lb, xs, ys, loss_fn)
    a = jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(gf)])
    b = jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(gb)])
    cos = float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
    assert cos > 0.999 and rel(b, a) < 2e-2


def test_selection_model_reasons(tmp_path):
    """The pass alone, as on a GPU (interpret=False): size threshold, padding, overrides."""
    net, x0 = models.make("lif_delta", batch=2)   # weight trace (2, 8, 5, 1)
    graph, _, _ = build_graph(net, x0, policy="param")
    assert "trace-arrays" in graph.facts
    run = lambda **kw: brainscale.PassManager((PallasSelectPass(**kw),)).run(graph)  # noqa: E731
    t = run(interpret=False).traces[0]
    assert t.path == "jax" and "no power-of-two tile" in t.attr("path_reason")
    if not ON_GPU:      # without a GPU, 'auto' sends every supported trace to the interpreter
        t = run().traces[0]
        assert t.path == KPATH and "interpret mode" in t.attr("path_reason")
    net2 = TwoPathNet(n=16)
    g2, _, _ = build_graph(net2, jnp.zeros((2, 16)), policy="param")
    run2 = lambda **kw: brainscale.PassManager((PallasSelectPass(**kw),)).run(g2)  # noqa: E731
    small = [t for t in run2(interpret=False).traces if t.attr("path_reason", "").startswith("trace")]
    assert small and all(t.path == "jax" and "XLA is as fast" in t.attr("path_reason")
                         and "builtin" in t.attr("path_reason") for t in small)
    big = [t for t in run2(interpret=False, min_bytes=0).traces if t.path == "pallas"]
    assert len(big) == 2 and all(">=" in t.attr("path_reason") for t in big)
    cm = tmp_path / "pallas_test.json"
    cm.write_text(json.dumps({"device": "TestGPU", "jax": jax.__version__,
                              "selection": {"learner_min_bytes": 1000, "fused_min_bytes": None},
                              "tiles": {"float32": {"bb": 1, "bi": 8, "bo": 16}}}))
    g3 = run2(interpret=False, cost_model=str(cm))
    assert [t.path for t in g3.traces].count("pallas") == 2
    assert "measured: pallas_test.json (TestGPU" in g3.traces[0].attr("path_reason")
    g4 = run2(interpret=False, cost_model=str(cm), scheme="fused")
    assert [t.path for t in g4.traces].count("pallas") == 0
    assert all(t.path == "jax" for t in run2(select="none").traces)
    g5 = run2(trace_dtype="bfloat16")
    assert [{a.storage for a in t.arrays} for t in g5.traces if t.path == KPATH] == \
        [{"bfloat16"}] * 2
    assert g5.attr("pallas_mode") == ("gpu" if ON_GPU else "interpret")
    assert dict(PallasBackend().unsupported(g2))  # the sparse trace is reported


def test_driver_one_pass_param_dim_equals_online_gradients(monkeypatch):
    T = 6
    net_j, x0 = models.make("lif_delta", batch=2)
    net_p, _ = models.make("lif_delta", batch=2)
    lj = brainscale.DiagParamDimAlgorithm(net_j).compile_graph(x0)
    lp = brainscale.DiagParamDimAlgorithm(net_p, backend=kernels()).compile_graph(x0)
    count = CountLaunches(monkeypatch)
    xs, ys = sequence(x0, T, seed=2)
    gj, lossj = brainscale.online_gradients(lj, xs, ys, loss_fn)
    gp, lossp = fused_online_gradients(lp, xs, ys, loss_fn)
    assert count.calls == [(1, True, True)]        # only the one-pass kernel was traced
    compare(gp, gj)
    assert rel(lossp, lossj) < 1e-5
    assert_same_traces(lj, lp)
    assert rel(net_p.V.value, net_j.V.value) < 1e-5


@pytest.mark.parametrize("es_impl", ["xla", "pallas"])
def test_driver_chunked_es_equals_online_gradients(es_impl):
    T, K = 7, 3                                   # two windows of 3 and a remainder of 1
    net_j, x0 = models.make("lif_delta", batch=2)
    net_p, _ = models.make("lif_delta", batch=2)
    lj = brainscale.DiagIODimAlgorithm(net_j, 0.9).compile_graph(x0)
    lp = brainscale.DiagIODimAlgorithm(net_p, 0.9, backend="pallas").compile_graph(x0)
    assert all(t.path == "jax" and t.attr("path_reason").startswith("io-dim")
               for t in lp._step.graph.traces)
    xs, ys = sequence(x0, T, seed=3)
    gj, lossj = brainscale.online_gradients(lj, xs, ys, loss_fn)
    gp, lossp = fused_online_gradients(lp, xs, ys, loss_fn, chunk=K, es_impl=es_impl)
    compare(gp, gj)
    assert rel(lossp, lossj) < 1e-5
    assert_same_traces(lj, lp)


def test_driver_needs_pallas_learner():
    net, x0 = models.make("lif_delta", batch=2)
    lj = brainscale.DiagParamDimAlgorithm(net).compile_graph(x0)
    xs, ys = sequence(x0, 2)
    with pytest.raises(brainscale.BrainscaleError, match="backend='pallas'"):
        fused_online_gradients(lj, xs, ys, loss_fn)


# ---------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------

class BigLIF(brainstate.nn.Module):
    def __init__(self, n_in=128, n=256, batch=16, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        w = rng.randn(n_in + n, n).astype(np.float32) / np.sqrt(n_in + n)
        self.syn = brainscale.ETraceParam({"weight": jnp.asarray(w), "bias": jnp.zeros(n)},
                                          brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.asarray(rng.rand(batch, n).astype(np.float32)))
        self.spk = braintools.surrogate.Sigmoid()

    def update(self, x):
        z = self.spk(self.V.value - 1.0)
        v = self.V.value - z
        self.V.value = v + 0.1 * (-v + self.syn.execute(jnp.concatenate([x, z], -1)))
        return self.spk(self.V.value - 1.0)


@pytest.mark.gpu
def test_gpu_learner_and_driver_equal_jax():
    T = 8
    x0 = jnp.zeros((16, 128), jnp.float32)
    lj = brainscale.DiagParamDimAlgorithm(BigLIF()).compile_graph(x0)
    lp = brainscale.DiagParamDimAlgorithm(BigLIF(), backend=PallasBackend(select="all")).compile_graph(x0)
    ld = brainscale.DiagParamDimAlgorithm(BigLIF(), backend=PallasBackend(select="all")).compile_graph(x0)
    assert "gpu" in lp._step.as_text()
    xs, ys = sequence(x0, T)
    gj, _ = brainscale.online_gradients(lj, xs, ys, loss_fn)
    gp, _ = brainscale.online_gradients(lp, xs, ys, loss_fn)
    gd, _ = fused_online_gradients(ld, xs, ys, loss_fn)
    compare(gp, gj, tol=1e-4)
    compare(gd, gj, tol=1e-4)
