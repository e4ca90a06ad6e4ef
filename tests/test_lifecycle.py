"""State lifecycle, caching and models the compiler accepts: no silent detachment, no raw crash.

Each test failed before its fix (the docstrings say how):

* states re-created after ``compile_graph`` are followed, not silently detached;
* ``reset_state`` resets a model that defines only ``init_state`` (the README's), keeping the
  state objects; ``online_gradients`` resets by default (``reset=False`` continues);
* the jitted-loop cache of ``online_gradients`` is keyed by what the loss function computes;
* plain ``ParamState``s on a path into hidden states, and models without trace parameters,
  warn at the user's line;
* integer / boolean hidden states, an ``ElemWiseOp``-only batched model, an unbatched op
  input feeding batched states: equal to the dense oracle;
* ``copy.deepcopy`` gives an independent learner, ``pickle`` a clear error; a new batch size
  without recompiling is a clear error.
"""
from __future__ import annotations

import copy
import pickle
import warnings

import brainstate
import braintools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from helpers import flat, rel_err
import models
from oracle import DenseOracle

RTOL = 1e-4




def sum_loss(out, tg):
    return jnp.sum(out * tg)


class InitOnly(brainstate.nn.Module):
    """The README's style: states created in ``init_state`` only, no ``reset_state``."""

    def __init__(self, n_in=3, n=4):
        super().__init__()
        rng = np.random.RandomState(0)
        self.n = n
        self.w = brainscale.ETraceParam({"weight": jnp.asarray(rng.randn(n_in, n), jnp.float32)},
                                        brainscale.MatMulOp())

    def init_state(self, batch_size=None, **kw):
        self.V = brainscale.ETraceState(
            braintools.init.param(braintools.init.Constant(0.5), (self.n,), batch_size))

    def update(self, x):
        self.V.value = 0.9 * self.V.value + self.w.execute(x)
        return jnp.tanh(self.V.value)


def _seq(T, shape, seed=0):
    rng = np.random.RandomState(seed)
    return jnp.asarray(rng.randn(T, *shape), jnp.float32)


# ---------------------------------------------------------------------------------------
# re-created states, reset, online_gradients(reset=...)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [None, 2])
def test_states_recreated_after_compile_are_followed(batch):
    """Before: init_all_states after compile_graph left the learner advancing the old state
    objects while the model's new states stayed frozen."""
    lead = (batch,) if batch else ()
    net = InitOnly()
    brainstate.nn.init_all_states(net, batch)
    learner = brainscale.DiagIODimAlgorithm(net, 0.9).compile_graph(jnp.ones(lead + (3,)))
    brainstate.nn.init_all_states(net, batch)           # new state objects
    fresh = InitOnly()
    brainstate.nn.init_all_states(fresh, batch)
    ref = brainscale.DiagIODimAlgorithm(fresh, 0.9).compile_graph(jnp.ones(lead + (3,)))
    for x in _seq(4, lead + (3,)):
        out, out_ref = learner(x), ref(x)
        np.testing.assert_allclose(out, out_ref, rtol=1e-6)
    np.testing.assert_allclose(net.V.value, fresh.V.value, rtol=1e-6)
    assert float(jnp.abs(net.V.value - 0.5).max()) > 0      # the model's state moved


def test_reset_state_uses_init_state_and_keeps_the_state_objects():
    """Before: learner.reset_state() did nothing for a model defining only init_state."""
    net = InitOnly()
    brainstate.nn.init_all_states(net, 2)
    learner = brainscale.DiagIODimAlgorithm(net, 0.9).compile_graph(jnp.ones((2, 3)))
    V = net.V
    for x in _seq(3, (2, 3)):
        learner(x)
    assert float(jnp.abs(net.V.value - 0.5).max()) > 0.1
    learner.reset_state()
    assert net.V is V                                        # same object, reset value
    np.testing.assert_allclose(net.V.value, np.full((2, 4), 0.5))   # compiled batch size kept
    assert all(float(jnp.abs(t.value).max()) == 0 for t in learner.trace_states().values())


def test_reset_state_restores_compile_time_values_without_reset_methods():
    """A model with neither reset_state nor init_state returns to its values at compile."""
    net, x0 = models.make("lif_delta", batch=2)
    V0 = np.asarray(net.V.value)
    learner = brainscale.DiagIODimAlgorithm(net, 0.9).compile_graph(x0)
    learner(x0)
    assert not np.allclose(net.V.value, V0)
    learner.reset_state()
    np.testing.assert_array_equal(net.V.value, V0)


@pytest.mark.parametrize("chunk", [1, 3])
def test_online_gradients_resets_by_default(chunk):
    """Before: two identical online_gradients calls differed (the second continued)."""
    net = InitOnly()
    brainstate.nn.init_all_states(net, 2)
    learner = brainscale.DiagIODimAlgorithm(net, 0.9).compile_graph(jnp.ones((2, 3)))
    xs, ys = _seq(7, (2, 3)), _seq(7, (2, 4), seed=1)
    g1, l1 = brainscale.online_gradients(learner, xs, ys, sum_loss, chunk=chunk)
    g2, l2 = brainscale.online_gradients(learner, xs, ys, sum_loss, chunk=chunk)
    np.testing.assert_array_equal(l1, l2)
    assert rel_err(g2, g1) == 0
    g3, l3 = brainscale.online_gradients(learner, xs, ys, sum_loss, chunk=chunk, reset=False)
    assert not np.allclose(l3, l1)
    # continuing equals one call over the concatenated sequence
    g4, l4 = brainscale.online_gradients(learner, jnp.concatenate([xs, xs]),
                                         jnp.concatenate([ys, ys]), sum_loss, chunk=chunk)
    np.testing.assert_allclose(l4, np.concatenate([l1, l3]), rtol=1e-5)


def test_online_gradients_cache_is_keyed_by_what_the_loss_computes():
    """Before: the cache was keyed by id(loss_fn): an inline lambda re-jitted every call and
    a new lambda could reuse a dead one's id (and its loop)."""
    net = InitOnly()
    brainstate.nn.init_all_states(net)
    learner = brainscale.DiagIODimAlgorithm(net, 0.9).compile_graph(jnp.ones(3))
    xs, ys = _seq(5, (3,)), _seq(5, (4,), seed=1)
    for _ in range(3):
        brainscale.online_gradients(learner, xs, ys, lambda o, y: jnp.sum((o - y) ** 2))
    assert len(learner._drivers) == 1
    results = []
    for scale in (1.0, 3.0):          # same code, different closure: different results
        _, l = brainscale.online_gradients(learner, xs, ys, lambda o, y: scale * jnp.sum(o * y))
        results.append(np.asarray(l))
    np.testing.assert_allclose(results[1], 3.0 * results[0], rtol=1e-5)
    assert len(learner._drivers) == 3


def test_recompiling_with_another_decay_drops_the_cached_loops():
    net = InitOnly()
    brainstate.nn.init_all_states(net)
    xs, ys = _seq(5, (3,)), _seq(5, (4,), seed=1)
    loss = lambda o, y: jnp.sum((o - y) ** 2)  # noqa: E731
    learner = brainscale.DiagIODimAlgorithm(net, 0.9).compile_graph(jnp.ones(3))
    brainscale.online_gradients(learner, xs, ys, loss)
    learner.decay_or_rank = 0.5
    learner.compile_graph(jnp.ones(3))
    g, _ = brainscale.online_gradients(learner, xs, ys, loss)
    other = InitOnly()
    brainstate.nn.init_all_states(other)
    ref = brainscale.DiagIODimAlgorithm(other, 0.5).compile_graph(jnp.ones(3))
    g_ref, _ = brainscale.online_gradients(ref, xs, ys, loss)
    assert rel_err(g, g_ref) < 1e-6
    assert "alpha=0.5" in learner.ir()


def test_new_batch_size_without_recompiling_is_a_clear_error():
    net = InitOnly()
    brainstate.nn.init_all_states(net, 2)
    learner = brainscale.DiagIODimAlgorithm(net, 0.9).compile_graph(jnp.ones((2, 3)))
    learner.reset_state(batch_size=5)
    with pytest.raises(brainscale.BrainscaleError, match="compile_graph"):
        learner(jnp.ones((2, 3)))
    with pytest.raises(brainscale.BrainscaleError, match="compile_graph"):
        learner(jnp.ones((5, 3)))
    learner.compile_graph(jnp.ones((5, 3)))
    assert learner(jnp.ones((5, 3))).shape == (5, 4)


# ---------------------------------------------------------------------------------------
# copying
# ---------------------------------------------------------------------------------------

def test_deepcopy_is_independent_and_pickle_says_what_to_do():
    """Before: deepcopy shared the cached loops of the original; pickle died on a weakref."""
    net, x0 = models.make("lif_delta")
    learner = brainscale.DiagIODimAlgorithm(net, 0.9).compile_graph(x0)
    xs, ys = _seq(5, (3,)), _seq(5, (5,), seed=1)
    brainscale.online_gradients(learner, xs, ys, sum_loss)
    twin = copy.deepcopy(learner)
    assert twin.model is not learner.model and twin.model.V is not learner.model.V
    g1, l1 = brainscale.online_gradients(learner, xs, ys, sum_loss, reset=False)
    v_after = np.asarray(learner.model.V.value)
    g2, l2 = brainscale.online_gradients(twin, xs, ys, sum_loss, reset=False)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    np.testing.assert_array_equal(learner.model.V.value, v_after)     # untouched by the twin
    with pytest.raises(TypeError, match="cannot be pickled.*learner.states"):
        pickle.dumps(learner)
    values = {k: st.value for k, st in learner.states().items()}
    assert pickle.loads(pickle.dumps(values)).keys() == values.keys()


# ---------------------------------------------------------------------------------------
# warnings
# ---------------------------------------------------------------------------------------

class PlainPaths(brainstate.nn.Module):
    def __init__(self, quiet_tau=False):
        super().__init__()
        self.P = brainstate.ParamState(jnp.ones((3, 4)) * 0.1)            # input weight, jnp.dot
        cls = _QuietParam if quiet_tau else brainstate.ParamState
        self.tau = cls(jnp.full(4, 5.0))                                # learnable time constant
        self.w = brainscale.ETraceParam({"weight": jnp.eye(4) * 0.1}, brainscale.MatMulOp())
        self.ro = brainstate.ParamState(jnp.ones((4, 2)))                # readout: no hidden state
        self.V = brainscale.ETraceState(jnp.zeros(4))

    def update(self, x):
        u = jnp.dot(x, self.P.value)
        self.V.value = self.V.value * (1 - 1 / self.tau.value) + \
            self.w.execute(jnp.tanh(self.V.value)) + u
        return self.V.value @ self.ro.value


class _QuietParam(brainstate.ParamState):
    temporal_credit = False


def test_plain_params_on_hidden_paths_warn_at_the_users_line():
    """Before: a learnable tau and an input weight applied with jnp.dot got the one-step
    gradient only, with no warning."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        brainscale.DiagIODimAlgorithm(PlainPaths(), 0.9).compile_graph(jnp.ones(3))
    msgs = [w for w in rec if issubclass(w.category, brainscale.NoTemporalCreditWarning)]
    assert len(msgs) == 1, [str(w.message) for w in rec]
    text = str(msgs[0].message)
    assert "%P (read at" in text and "%tau (read at" in text and "%ro" not in text
    assert "test_lifecycle.py" in text                       # where each is read
    assert msgs[0].filename == __file__                      # the warning points at the caller
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        brainscale.DiagIODimAlgorithm(PlainPaths(quiet_tau=True), 0.9).compile_graph(jnp.ones(3))
    (w,) = [w for w in rec if issubclass(w.category, brainscale.NoTemporalCreditWarning)]
    assert "%P" in str(w.message) and "%tau" not in str(w.message)


def test_model_without_trace_parameters_warns():
    class Plain(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.P = brainstate.ParamState(jnp.ones((3, 4)))
            self.V = brainstate.HiddenState(jnp.zeros(4))

        def update(self, x):
            self.V.value = 0.9 * self.V.value + x @ self.P.value
            return self.V.value
    with pytest.warns(brainscale.NoTemporalCreditWarning, match="no trace parameter") as rec:
        brainscale.DiagIODimAlgorithm(Plain(), 0.9).compile_graph(jnp.ones(3))
    assert rec[0].filename == __file__


# ---------------------------------------------------------------------------------------
# models the compiler accepts run, and equal the dense oracle
# ---------------------------------------------------------------------------------------

class Refractory(brainstate.nn.Module):
    """An integer refractory counter and a boolean last-spike flag beside a float V."""

    def __init__(self, batch=0, n_in=3, n=4):
        super().__init__()
        rng = np.random.RandomState(0)
        lead = (batch,) if batch else ()
        self.w = brainscale.ETraceParam({"weight": jnp.asarray(rng.randn(n_in + n, n), jnp.float32)},
                                        brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.asarray(rng.rand(*lead, n), jnp.float32))
        self.cnt = brainstate.HiddenState(jnp.zeros(lead + (n,), jnp.int32))
        self.last = brainstate.HiddenState(jnp.zeros(lead + (n,), bool))
        self.spk = braintools.surrogate.Sigmoid()

    def update(self, x):
        z = self.spk(self.V.value - 0.8)
        y = self.w.execute(jnp.concatenate([x, z], axis=-1))
        refractory = self.cnt.value > 0
        v = jnp.where(refractory, 0.0, 0.9 * (self.V.value - 0.8 * z) + y)
        fired = v > 0.8
        self.cnt.value = jnp.where(fired, 2, jnp.maximum(self.cnt.value - 1, 0))
        self.last.value = fired
        self.V.value = v
        return jnp.tanh(v)


class ElemOnly(brainstate.nn.Module):
    """A batched model whose only trace op is an ElemWiseOp (a learnable per-neuron decay)."""

    def __init__(self, batch=2, n=4):
        super().__init__()
        self.th = brainscale.ETraceParam(jnp.linspace(-1.0, 2.0, n), brainscale.ElemWiseOp(jax.nn.sigmoid))
        self.V = brainscale.ETraceState(jnp.full((batch, n) if batch else (n,), 0.3))

    def update(self, x):
        self.V.value = self.th.execute(None) * self.V.value + x
        return jnp.tanh(self.V.value)


class SharedContext(brainstate.nn.Module):
    """An op with an unbatched input (a shared context vector) feeding batched states."""

    def __init__(self, batch=2, n=4):
        super().__init__()
        rng = np.random.RandomState(1)
        self.w = brainscale.ETraceParam({"weight": jnp.asarray(rng.randn(3, n), jnp.float32)},
                                        brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.zeros((batch, n)))

    def update(self, x, c):
        self.V.value = 0.8 * self.V.value + self.w.execute(c) + x
        return jnp.tanh(self.V.value)


class _TransposedOwn(brainscale.ETraceOp):
    """A custom op with its own yw_to_w and no fused rule (the generic, vmapped D-RTRL path)."""

    def xw_to_y(self, x, w):
        return x @ w["weight"].T

    def yw_to_w(self, y, w):
        return {"weight": w["weight"] * y[:, None]}


class MixedBatch(brainstate.nn.Module):
    """A batched input layer beside a custom op on an unbatched, shared context vector."""

    def __init__(self, batch=2, n=4):
        super().__init__()
        rng = np.random.RandomState(2)
        self.w_in = brainscale.ETraceParam({"weight": jnp.asarray(rng.randn(4, n), jnp.float32)},
                                           brainscale.MatMulOp())
        self.w_ctx = brainscale.ETraceParam({"weight": jnp.asarray(rng.randn(n, 3), jnp.float32)},
                                            _TransposedOwn())
        self.V = brainscale.ETraceState(jnp.zeros((batch, n)))

    def update(self, x, c):
        self.V.value = 0.8 * self.V.value + self.w_in.execute(x) + jnp.tanh(self.w_ctx.execute(c))
        return jnp.tanh(self.V.value)


CASES = {
    "mixed-batch": (lambda b: MixedBatch(b), lambda b: [(b, 4), (3,)]),
    "refractory": (lambda b: Refractory(b), lambda b: [((b,) if b else ()) + (3,)]),
    "elem-only": (lambda b: ElemOnly(b), lambda b: [((b,) if b else ()) + (4,)]),
    "shared-context": (lambda b: SharedContext(b), lambda b: [(b, 4), (3,)]),
}


@pytest.mark.parametrize("algo", ["param", "io"])
@pytest.mark.parametrize("name,batch", [("refractory", 0), ("refractory", 2), ("elem-only", 2),
                                        ("shared-context", 2), ("mixed-batch", 2)])
def test_accepted_models_equal_the_oracle(name, batch, algo):
    """Before: 'tangent ... expected float0' (int/bool states), a reshape TypeError (an
    unbatched op input feeding batched states, io-dim), a refusal of an unbatched op input
    beside batched ones."""
    make, shapes = CASES[name]
    net_a, net_b = make(batch), make(batch)
    rng = np.random.RandomState(5)
    T = 8
    seq = [tuple(jnp.asarray(rng.randn(*s) + 0.5, jnp.float32) for s in shapes(batch))
           for _ in range(T)]
    learner = (brainscale.DiagParamDimAlgorithm(net_a) if algo == "param"
               else brainscale.DiagIODimAlgorithm(net_a, decay_or_rank=0.9))
    learner.compile_graph(*seq[0])
    orc = DenseOracle(net_b, *seq[0], algorithm=algo, decay_or_rank=0.9 if algo == "io" else None,
                      loss_fn=sum_loss)
    params = net_a.states(brainstate.ParamState)
    worst, seen = 0.0, set()
    for t in range(T):
        tg = jnp.asarray(rng.randn(*np.shape(net_a.V.value)), jnp.float32)
        g = brainstate.transform.grad(lambda: sum_loss(learner(*seq[t]), tg), params)()
        ref = orc.step(*seq[t], target=tg)
        for k in g:
            if float(np.max(np.abs(flat(ref["grads"][k])))) > 0:
                seen.add(k)
            worst = max(worst, rel_err(g[k], ref["grads"][k]))
        for k, st in net_a.states(brainstate.HiddenState).items():
            np.testing.assert_array_equal(np.asarray(st.value),
                                          np.asarray(net_b.states(brainstate.HiddenState)[k].value))
    assert worst < RTOL, worst
    assert seen == set(params), "a gradient is zero at every step: the test would prove nothing"
    if name == "refractory":
        assert "constant_hidden=[%cnt,%last]" in learner.ir()      # stated in the IR


def test_typed_prng_key_input():
    """Before: a typed key (``jax.random.key``) as a step input crashed lowering with
    ``Cannot interpret 'key<fry>' as a data type``."""
    class Noisy(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = brainscale.ETraceParam({"weight": jnp.ones((3, 4)) * 0.1},
                                            brainscale.MatMulOp())
            self.V = brainscale.ETraceState(jnp.zeros(4))

        def update(self, x, key):
            self.V.value = 0.9 * self.V.value + self.w.execute(x) + \
                0.01 * jax.random.normal(key, (4,))
            return self.V.value
    net = Noisy()
    learner = brainscale.DiagIODimAlgorithm(net, 0.9).compile_graph(jnp.ones(3),
                                                                    jax.random.key(0))
    assert "key<fry>[]" in learner.ir()
    params = net.states(brainstate.ParamState)
    g = brainstate.transform.grad(lambda: jnp.sum(learner(jnp.ones(3), jax.random.key(1))),
                                  params)()
    np.testing.assert_allclose(g[("w",)]["weight"], 0.1, rtol=1e-6)   # (1-α)·1·x at step 1
