"""brainscale 0.1's parameter kinds: ``NonTempParam`` (instantaneous gradient, checked against a
hand-computed one-step gradient), ``ElemWiseParam`` (against the dense oracle, both
algorithms, batched and unbatched), ``FakeETraceParam`` / ``FakeElemWiseParam`` (constants).
"""
from __future__ import annotations

import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from brainscale.concepts import MARKER_PREFIX
from oracle import DenseOracle

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DECAY = 0.9
RTOL = 1e-4


def _f32(a):
    return jnp.asarray(a, jnp.float32)


def _shape(batch, *s):
    return ((batch,) if batch else ()) + s


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(l, np.float64)) for l in jax.tree.leaves(tree)])


def _learner(net, alg):
    if alg == "param":
        return brainscale.ParamDimVjpAlgorithm(net)
    return brainscale.IODimVjpAlgorithm(net, DECAY)


def sq(out, target):
    return jnp.sum((out - target) ** 2)


def against_oracle(make, alg, batch, n_in=3, T=6, seed=0):
    """Per step, the learner's gradient of every ParamState equals the dense oracle's.

    Returns the per-step (learner gradients, model states before the step, inputs, targets).
    """
    net_a, net_b = make(batch), make(batch)
    rng = np.random.RandomState(seed + 11)
    xs = _f32(rng.randn(T, *_shape(batch, n_in)))
    learner = _learner(net_a, alg)
    learner.compile_graph(xs[0])
    out_shape = np.shape(net_b.update(xs[0]))
    net_b = make(batch)                                # update() above advanced its states
    targets = _f32(rng.randn(T, *out_shape))
    orc = DenseOracle(net_b, xs[0], algorithm=alg,
                      decay_or_rank=DECAY if alg == "io" else None, loss_fn=sq)
    params = net_a.states(brainstate.ParamState)

    @brainstate.transform.jit
    def step(x, tg):
        return brainstate.transform.grad(lambda: sq(learner(x), tg), params,
                                         return_value=True)()

    history = []
    for t in range(T):
        before = {k: st.value for k, st in net_a.states(brainstate.HiddenState).items()}
        g, loss = step(xs[t], targets[t])
        ref = orc.step(xs[t], target=targets[t])
        assert float(loss) == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
        assert set(g) == set(ref["grads"])
        for k in g:
            a, b = _flat(g[k]), _flat(ref["grads"][k])
            assert np.max(np.abs(a - b)) <= RTOL * max(np.max(np.abs(b)), 1e-6), (t, k)
        history.append((g, before, xs[t], targets[t]))
    return learner, net_a, history


# ---------------------------------------------------------------------------------------
# NonTempParam
# ---------------------------------------------------------------------------------------

class NonTempNet(brainstate.nn.Module):
    """``h = tanh(W·(P·x) + g ⊙ h_prev)``: the input projection ``P`` and the recurrent gain
    ``g`` are NonTempParams (or ``param_cls``), ``W`` a trace parameter.

    (A NonTempParam matrix between hidden states, ``U·h_prev``, is outside the models the
    compiler takes: hidden states interact only element-wise or through trace ops.)
    """

    def __init__(self, batch=0, n_in=3, m=4, n=5, seed=0, param_cls=None):
        super().__init__()
        rng = np.random.RandomState(seed)
        cls = brainscale.NonTempParam if param_cls is None else param_cls
        self.P = cls({"weight": _f32(rng.randn(n_in, m))}, brainscale.MatMulOp())
        self.g = cls(_f32(rng.rand(n) * 0.8 + 0.2), lambda h, w: h * w)
        self.w = brainscale.ETraceParam({"weight": _f32(rng.randn(m, n)),
                                         "bias": _f32(rng.randn(n) * 0.1)},
                                        brainscale.MatMulOp())
        self.h = brainstate.HiddenState(_f32(rng.randn(*_shape(batch, n)) * 0.5))

    def update(self, x):
        self.h.value = jnp.tanh(self.w.execute(self.P.execute(x)) + self.g.execute(self.h.value))
        return self.h.value


@pytest.mark.parametrize("alg", ["param", "io"])
@pytest.mark.parametrize("batch", [0, 2])
def test_nontempparam_gets_its_exact_instantaneous_gradient(alg, batch):
    learner, net, history = against_oracle(lambda b: NonTempNet(b), alg, batch)
    assert {p.name: p.kind for p in learner.graph.params} == \
        {"w": "etrace", "P": "plain", "g": "plain"}
    assert [r.param for r in learner.graph.relations] == ["w"]      # no trace op for P, g
    f64 = lambda a: np.asarray(a, np.float64)                       # noqa: E731
    P, g, W, b = (f64(net.P.value["weight"]), f64(net.g.value), f64(net.w.value["weight"]),
                  f64(net.w.value["bias"]))
    for grads, before, x, tg in history:
        # by hand, with h_prev held fixed: h = tanh((x P) W + b + g h_prev)
        x, h_prev = f64(x), f64(before[("h",)])
        h = np.tanh((x @ P) @ W + b + g * h_prev)
        delta = 2 * (h - f64(tg)) * (1 - h ** 2)                    # dL/d(pre-activation)
        want_g = (delta * h_prev).reshape(-1, h.shape[-1]).sum(0)
        want_P = x.reshape(-1, P.shape[0]).T @ (delta @ W.T).reshape(-1, P.shape[1])
        for got, want in ((grads[("g",)], want_g), (grads[("P",)]["weight"], want_P)):
            # float32 step vs float64 by hand: relative to the gradient's scale
            assert np.max(np.abs(f64(got) - want)) <= 1e-5 * np.max(np.abs(want)), (got, want)


def test_nontempparam_states_the_intent_plain_paramstate_warns():
    x = jnp.ones(3)

    def compile_and_collect(net):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            brainscale.DiagParamDimAlgorithm(net).compile_graph(x)
        return [w for w in rec if issubclass(w.category, brainscale.NoTemporalCreditWarning)]

    class PlainParam(brainstate.ParamState):
        """A plain ParamState applying the same op (what NonTempParam is, less the intent)."""

        def __init__(self, value, op):
            super().__init__(value)
            self.op = op.xw_to_y if isinstance(op, brainscale.ETraceOp) else op

        def execute(self, x):
            return self.op(x, self.value)

    assert compile_and_collect(NonTempNet(param_cls=brainscale.NonTempParam)) == []
    warned = compile_and_collect(NonTempNet(param_cls=PlainParam))
    assert len(warned) == 1
    assert "%P" in str(warned[0].message) and "%g" in str(warned[0].message)


def test_nontempparam_api():
    p = brainscale.NonTempParam(jnp.ones((2, 3)), lambda x, w: x @ w, name="p")
    assert p.temporal_credit is False and p.name == "p"
    np.testing.assert_allclose(p.execute(jnp.ones(2)), 2 * jnp.ones(3))
    q = brainscale.NonTempParam({"weight": jnp.ones((2, 3))}, brainscale.MatMulOp())
    np.testing.assert_allclose(q.execute(jnp.ones(2)), 2 * jnp.ones(3))
    # the op is applied without the compiler's trace-op marker (an ETraceParam's is marked)
    marked = brainscale.ETraceParam({"weight": jnp.ones((2, 3))}, brainscale.MatMulOp())

    def marker_calls(param):
        eqns = jax.make_jaxpr(param.execute)(jnp.ones(2)).jaxpr.eqns
        return [e for e in eqns if str(e.params.get("name", "")).startswith(MARKER_PREFIX)]

    assert len(marker_calls(marked)) == 1 and marker_calls(q) == []
    with pytest.raises(TypeError, match="NonTempParam op"):
        brainscale.NonTempParam(jnp.ones(2), op=3)


# ---------------------------------------------------------------------------------------
# ElemWiseParam
# ---------------------------------------------------------------------------------------

class ElemTauNet(brainstate.nn.Module):
    """``V = fn(θ) * V_prev + W·x``, ``out = tanh(V)``, with θ an ElemWiseParam."""

    def __init__(self, batch=0, n_in=3, n=5, seed=0, tree=False):
        super().__init__()
        rng = np.random.RandomState(seed)
        if tree:      # a pytree weight: decay = sigmoid(a) * b, element-wise in both leaves
            self.tau = brainscale.ElemWiseParam(
                {"a": _f32(rng.randn(n) + 1.5), "b": _f32(rng.rand(n) * 0.2 + 0.8)},
                lambda w: jax.nn.sigmoid(w["a"]) * w["b"])
        else:
            self.tau = brainscale.ElemWiseParam(_f32(rng.randn(n) * 0.5 + 1.5), jax.nn.sigmoid)
        self.w = brainscale.ETraceParam({"weight": _f32(rng.randn(n_in, n) * 1.5)},
                                        brainscale.MatMulOp())
        self.V = brainstate.HiddenState(_f32(rng.randn(*_shape(batch, n)) * 0.5))

    def update(self, x):
        self.V.value = self.tau.execute() * self.V.value + self.w.execute(x)
        return jnp.tanh(self.V.value)


@pytest.mark.parametrize("alg", ["param", "io"])
@pytest.mark.parametrize("batch", [0, 2])
@pytest.mark.parametrize("tree", [False, True], ids=["array", "pytree"])
def test_elemwiseparam_against_the_dense_oracle(alg, batch, tree):
    learner, _net, history = against_oracle(lambda b: ElemTauNet(b, tree=tree), alg, batch)
    kinds = {r.param: learner.graph.trace_of_relation[r.id].dim for r in learner.graph.relations}
    assert kinds["tau"] == "param"                 # element-wise: always param-dim (grad full)
    assert any(np.any(np.asarray(l) != 0) for g, *_ in history for l in jax.tree.leaves(g[("tau",)]))


def test_elemwiseparam_api():
    p = brainscale.ElemWiseParam(jnp.zeros(3))
    assert isinstance(p.op, brainscale.ElemWiseOp)
    assert p.gradient == brainscale.ETraceGrad.full
    np.testing.assert_allclose(p.execute(), jnp.zeros(3))           # identity by default
    q = brainscale.ElemWiseParam(jnp.zeros(3), brainscale.ElemWiseOp(jnp.exp), name="q")
    np.testing.assert_allclose(q.execute(), jnp.ones(3))
    assert q.name == "q"
    with pytest.raises(TypeError, match="ElemWiseOp"):
        brainscale.ElemWiseParam(jnp.zeros((3, 3)), brainscale.MatMulOp())
    with pytest.raises(TypeError, match="ElemWiseOp"):
        brainscale.ElemWiseParam(jnp.zeros(3), op="exp")


# ---------------------------------------------------------------------------------------
# FakeETraceParam / FakeElemWiseParam
# ---------------------------------------------------------------------------------------

class FakeNet(brainstate.nn.Module):
    """``V = fn(θ) ⊙ V_prev + W·x + U·x`` with the decay θ and the second input weight U
    switched between trained and fixed.

    (A fixed matrix between hidden states, ``U·f(V_prev)``, is outside the models the compiler
    takes, as for any non-trace op: see docs/compat.md.)
    """

    def __init__(self, fake: bool, batch=2, n_in=3, n=5):
        super().__init__()
        rng = np.random.RandomState(1)
        theta, w = _f32(rng.randn(n) + 1.5), {"weight": _f32(rng.randn(n_in, n))}
        u = {"weight": _f32(rng.randn(n_in, n) * 0.3), "bias": _f32(rng.randn(n) * 0.1)}
        if fake:
            self.tau = brainscale.FakeElemWiseParam(theta, brainscale.ElemWiseOp(jax.nn.sigmoid))
            self.u = brainscale.FakeETraceParam(u, brainscale.MatMulOp())
        else:
            self.tau = brainscale.ElemWiseParam(theta, jax.nn.sigmoid)
            self.u = brainscale.ETraceParam(u, brainscale.MatMulOp())
        self.w = brainscale.ETraceParam(w, brainscale.MatMulOp())
        self.V = brainstate.HiddenState(jnp.zeros(_shape(batch, n)))

    def update(self, x):
        self.V.value = self.tau.execute() * self.V.value + self.w.execute(x) + self.u.execute(x)
        return jnp.tanh(self.V.value)


def test_fake_params_are_constants_of_the_step():
    xs = _f32(np.random.RandomState(2).randn(3, 2, 3))
    outs = {}
    for fake in (False, True):
        net = FakeNet(fake)
        learner = brainscale.D_RTRL(net)
        learner.compile_graph(xs[0])
        params = net.states(brainstate.ParamState)
        grads = None
        for x in xs:
            grads, out = brainstate.transform.grad(lambda: jnp.sum(learner(x) ** 2), params,
                                                   return_value=True)()
        outs[fake] = out
        if fake:
            assert set(params) == {("w",)}
            assert set(learner.param_states) == {("w",)}
            assert [r.param for r in learner.graph.relations] == ["w"]
            assert np.any(np.asarray(grads[("w",)]["weight"]) != 0)
        else:
            assert set(params) == {("w",), ("tau",), ("u",)}
    np.testing.assert_allclose(outs[True], outs[False], rtol=1e-6)   # same forward


def test_fake_params_api():
    f = brainscale.FakeETraceParam(jnp.ones((2, 3)), lambda x, w: x @ w)
    assert f.temporal_credit is False
    np.testing.assert_allclose(f.execute(jnp.ones(2)), 2 * jnp.ones(3))
    e = brainscale.FakeElemWiseParam(jnp.zeros(3), name="e")
    np.testing.assert_allclose(e.execute(), jnp.zeros(3))
    assert e.name == "e"
    np.testing.assert_allclose(brainscale.FakeElemWiseParam(jnp.zeros(3), jnp.exp).execute(),
                               jnp.ones(3))
    with pytest.raises(TypeError, match="ElemWiseOp"):
        brainscale.FakeElemWiseParam(jnp.zeros(3), brainscale.MatMulOp())
    with pytest.raises(TypeError, match="FakeETraceParam op"):
        brainscale.FakeETraceParam(jnp.zeros(3), None)
