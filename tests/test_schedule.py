"""The update-schedule axis, acted on: ``brainscale.train_online`` applies each parameter's
accumulated online gradient when its traces' ``schedule`` says (every step, every K steps,
at the end), checked against a literal Python loop over the same learner class."""
from __future__ import annotations

import dataclasses

import brainstate
import braintools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from brainscale import zoo
from brainscale.errors import BrainscaleError, NotCompiledError

import models

T, B = 8, 2


def _data(x0, seed=0):
    rng = np.random.RandomState(seed)
    xs = jnp.asarray(rng.randn(T, *np.shape(x0)), jnp.float32)
    return xs


def _loss(out, y):
    return jnp.mean((out - y) ** 2)


def _targets(n_out, seed=1):
    return jnp.asarray(np.random.RandomState(seed).rand(T, B, n_out), jnp.float32)


def _params(model):
    return model.states(brainstate.ParamState)


def _values(model):
    return {k: jax.tree.map(np.asarray, p.value) for k, p in _params(model).items()}


def _close(a, b, rtol=2e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        for u, v in zip(jax.tree.leaves(a[k]), jax.tree.leaves(b[k])):
            np.testing.assert_allclose(u, v, rtol=rtol, atol=atol, err_msg=str(k))


def _literal(learner, xs, ys, due, apply):
    """The reference: step by step, sum the per-step online gradient of each parameter and
    call ``apply(key, grads)`` after the steps ``due(key, t)`` says."""
    learner.reset_state()
    params = _params(learner.model)
    sched = brainscale.update_schedule(learner)
    acc = {k: jax.tree.map(jnp.zeros_like, p.value) for k, p in params.items()}
    losses = []
    for t in range(T):
        def loss():
            return _loss(learner(xs[t]), ys[t])
        g, l = brainstate.transform.grad(loss, params, return_value=True)()
        losses.append(float(l))
        acc = {k: jax.tree.map(jnp.add, acc[k], g[k]) for k in acc}
        for key in sorted(set(sched.values())):
            if due(key, t):
                names = [k for k, s in sched.items() if s == key]
                apply(key, {k: acc[k] for k in names})
                for k in names:
                    acc[k] = jax.tree.map(jnp.zeros_like, acc[k])
    return np.asarray(losses)


def _due(key, t):
    if key == "step":
        return True
    if key == "end":
        return t == T - 1
    K = int(key.split("=")[1])
    return (t + 1) % K == 0 or t == T - 1


def _sgd_apply(model, lr):
    params = _params(model)

    def apply(key, grads):
        for k, g in grads.items():
            params[k].value = jax.tree.map(lambda p, d: p - lr * d, params[k].value, g)
    return apply


def _pair(make_learner, make_model):
    """Two identical models, each with its compiled learner."""
    out = []
    for _ in range(2):
        m, x0 = make_model()
        learner = make_learner(m)
        learner.compile_graph(x0)
        out.append((m, learner, x0))
    return out


def _sgd_matches_literal(l1, l2, m1, m2, xs, ys, lr):
    """train_online with SGD on (m1, l1) equals the literal loop on (m2, l2)."""
    opt = braintools.optim.SGD(lr=lr)
    opt.register_trainable_weights(_params(m1))
    losses = brainscale.train_online(l1, opt, xs, ys, _loss)
    ref = _literal(l2, xs, ys, _due, _sgd_apply(m2, lr))
    np.testing.assert_allclose(np.asarray(losses), ref, rtol=2e-5, atol=1e-7)
    _close(_values(m1), _values(m2))
    return ref


def test_step_schedule_updates_after_every_step():
    (m1, l1, x0), (m2, l2, _) = _pair(lambda m: brainscale.DiagParamDimAlgorithm(m),
                                      lambda: models.gru_plain_in(B))
    assert set(brainscale.update_schedule(l1).values()) == {"step"}
    xs, ys = _data(x0), _targets(4)
    ref = _sgd_matches_literal(l1, l2, m1, m2, xs, ys, 0.5)
    # the weights changed during the sequence: neither the losses nor the weights are those
    # of one update with the gradient summed at fixed weights
    m3, _ = models.gru_plain_in(B)
    l3 = brainscale.DiagParamDimAlgorithm(m3)
    l3.compile_graph(x0)
    g, frozen = brainscale.online_gradients(l3, xs, ys, _loss)
    _sgd_apply(m3, 0.5)("step", g)
    assert np.abs(np.asarray(frozen) - ref).max() > 1e-3
    assert max(float(np.abs(u - v).max()) for k in g for u, v in
               zip(jax.tree.leaves(_values(m1)[k]), jax.tree.leaves(_values(m3)[k]))) > 1e-3


def test_window_schedule_applies_every_k_steps_and_at_the_end_with_adam():
    # K = 3 over T = 8: updates after steps 2, 5 and 7 (the last, partial window)
    (m1, l1, x0), (m2, l2, _) = _pair(
        lambda m: zoo.EPropAlgorithm(m, schedule="window", window=3), lambda: models.alif(B))
    assert "schedule=window" in l1.ir() and "window=3" in l1.ir()
    assert set(brainscale.update_schedule(l1).values()) == {"window=3"}
    xs, ys = _data(x0), _targets(5)
    opt1, opt2 = braintools.optim.Adam(lr=0.05), braintools.optim.Adam(lr=0.05)
    opt1.register_trainable_weights(_params(m1))
    opt2.register_trainable_weights(_params(m2))
    calls = []

    def apply(key, grads):
        calls.append(key)
        opt2.update(grads)
    losses = brainscale.train_online(l1, opt1, xs, ys, _loss)
    ref = _literal(l2, xs, ys, _due, apply)
    assert len(calls) == 3
    np.testing.assert_allclose(np.asarray(losses), ref, rtol=2e-5, atol=1e-7)
    _close(_values(m1), _values(m2))
    # Adam's state advanced three times, not eight (a zero gradient would still move it)
    assert int(np.asarray(opt1.step_count.value)) == int(np.asarray(opt2.step_count.value)) == 3


def test_end_schedule_is_the_summed_gradient_applied_once():
    (m1, l1, x0), (m2, l2, _) = _pair(
        lambda m: zoo.RuleAlgorithm(m, policy="param", schedule="end"), lambda: models.alif(B))
    xs, ys = _data(x0), _targets(5)
    opt = braintools.optim.SGD(lr=0.3)
    opt.register_trainable_weights(_params(m1))
    losses = brainscale.train_online(l1, opt, xs, ys, _loss)
    g, ref_losses = brainscale.online_gradients(l2, xs, ys, _loss)
    _sgd_apply(m2, 0.3)("end", g)
    np.testing.assert_allclose(np.asarray(losses), np.asarray(ref_losses), rtol=2e-5,
                               atol=1e-7)
    _close(_values(m1), _values(m2))


def _set_schedule_pass(param_word, schedule, window=None, name="test-schedule-per-trace"):
    @brainscale.function_pass(name, requires={"trace-arrays"}, register=False)
    def per_trace(graph, ctx):
        traces = []
        for t in graph.traces:
            if any(param_word in graph.relation_by_id[r].param for r in t.relations):
                t = dataclasses.replace(t, schedule=schedule, window=window)
            traces.append(t)
        return graph.replace(traces=tuple(traces))
    return per_trace


def test_mixed_schedules_per_trace_with_one_optimizer_per_schedule():
    pipeline = list(brainscale.DEFAULT_PIPELINE) + [_set_schedule_pass("Uh", "window", 4)]
    (m1, l1, x0), (m2, l2, _) = _pair(
        lambda m: brainscale.DiagParamDimAlgorithm(m, pipeline=pipeline),
        lambda: models.gru_plain_in(B))
    sched = brainscale.update_schedule(l1)
    by = {".".join(map(str, k)): v for k, v in sched.items()}
    assert by["gru.Uh"] == "window=4", by
    assert {v for k, v in by.items() if "Uh" not in k} == {"step"}   # P (plain) included
    assert "schedule=window" in l1.ir()
    xs, ys = _data(x0), _targets(4)
    params = _params(m1)
    with pytest.raises(BrainscaleError, match="different update schedules"):
        brainscale.train_online(l1, braintools.optim.SGD(lr=0.1), xs, ys, _loss)
    opts = {}
    for key in ("step", "window=4"):
        opts[key] = braintools.optim.SGD(lr=0.2)
        opts[key].register_trainable_weights({k: p for k, p in params.items()
                                              if sched[k] == key})
    losses = brainscale.train_online(l1, opts, xs, ys, _loss)
    ref = _literal(l2, xs, ys, _due, _sgd_apply(m2, 0.2))
    np.testing.assert_allclose(np.asarray(losses), ref, rtol=2e-5, atol=1e-7)
    _close(_values(m1), _values(m2))


def test_optimizer_mismatches_are_clear_errors():
    pipeline = list(brainscale.DEFAULT_PIPELINE) + [_set_schedule_pass("Uh", "end")]
    m, x0 = models.gru_plain_in(B)
    learner = brainscale.DiagParamDimAlgorithm(m, pipeline=pipeline)
    xs, ys = _data(x0), _targets(4)
    with pytest.raises(NotCompiledError):
        brainscale.train_online(learner, braintools.optim.SGD(lr=0.1), xs, ys, _loss)
    learner.compile_graph(x0)
    sched = brainscale.update_schedule(learner)
    params = _params(m)
    with pytest.raises(BrainscaleError, match=r"optimizer has schedules \['step'\]"):
        brainscale.train_online(learner, {"step": braintools.optim.SGD(lr=0.1)}, xs, ys, _loss)
    everything = braintools.optim.SGD(lr=0.1)
    everything.register_trainable_weights(params)
    end_only = braintools.optim.SGD(lr=0.1)
    end_only.register_trainable_weights({k: p for k, p in params.items() if sched[k] == "end"})
    with pytest.raises(BrainscaleError, match=r"registered on exactly that schedule's "
                                              r"parameters .*it also holds"):
        brainscale.train_online(learner, {"step": everything, "end": end_only}, xs, ys, _loss)
    with pytest.raises(BrainscaleError, match="must have an update"):
        brainscale.train_online(learner, 0.1, xs, ys, _loss)


class _SharedW(brainstate.nn.Module):
    """One weight driving two neuron populations: two relations, two traces."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.w = brainscale.ETraceParam({"weight": jnp.asarray(rng.randn(3, 4), jnp.float32)},
                                        brainscale.MatMulOp())
        self.a = brainscale.ETraceState(jnp.zeros((B, 4)))
        self.b = brainscale.ETraceState(jnp.zeros((B, 4)))

    def update(self, x):
        self.a.value = 0.9 * self.a.value + jnp.tanh(self.w.execute(x))
        self.b.value = 0.5 * self.b.value + jnp.tanh(self.w.execute(2.0 * x))
        return self.a.value + self.b.value


def test_one_parameter_with_two_schedules_is_refused():
    m = _SharedW()

    @brainscale.function_pass("test-schedule-first-trace", requires={"trace-arrays"},
                              register=False)
    def first_only(graph, ctx):
        t0 = dataclasses.replace(graph.traces[0], schedule="end")
        return graph.replace(traces=(t0,) + graph.traces[1:])
    learner = brainscale.DiagParamDimAlgorithm(
        m, pipeline=list(brainscale.DEFAULT_PIPELINE) + [first_only])
    learner.compile_graph(jnp.ones((B, 3)))
    assert len(learner.graph.traces) == 2
    with pytest.raises(BrainscaleError, match=r"parameter w has traces with different update "
                                              r"schedules \(T0: schedule end, T1: schedule step"):
        brainscale.update_schedule(learner)


def test_exact_rtrl_takes_a_window_schedule():
    (m1, l1, x0), (m2, l2, _) = _pair(
        lambda m: zoo.RTRLAlgorithm(m, schedule="window", window=2), lambda: models.lif_delta(B))
    _sgd_matches_literal(l1, l2, m1, m2, _data(x0), _targets(5), 0.5)


@pytest.mark.parametrize("policy,make_model,n_out", [("param", lambda: models.alif(B), 5),
                                                     ("param", lambda: models.gru_plain_in(B), 4),
                                                     ("io", lambda: models.lif_delta(B), 5)])
def test_window_schedule_runs_the_windowed_loop(policy, make_model, n_out):
    """One ``window=K`` schedule whose traces the step-owning loop sums per window (D-RTRL of
    plain matmuls, ES-D-RTRL): train_online runs ``online_gradients(chunk=K)``'s windows and
    updates after each, with the literal loop's losses and weights."""
    (m1, l1, x0), (m2, l2, _) = _pair(
        lambda m: zoo.RuleAlgorithm(m, policy=policy, schedule="window", window=3,
                                    **({"decay_or_rank": 0.9} if policy == "io" else {})),
        make_model)
    xs, ys = _data(x0), _targets(n_out)
    opt1, opt2 = braintools.optim.Adam(lr=0.05), braintools.optim.Adam(lr=0.05)
    opt1.register_trainable_weights(_params(m1))
    opt2.register_trainable_weights(_params(m2))
    losses = brainscale.train_online(l1, opt1, xs, ys, _loss)
    assert any(k[0] == "train-window" for k in l1._drivers)       # the windowed loop ran
    ref = _literal(l2, xs, ys, _due, lambda key, grads: opt2.update(grads))
    np.testing.assert_allclose(np.asarray(losses), ref, rtol=2e-5, atol=1e-7)
    _close(_values(m1), _values(m2))
    assert int(np.asarray(opt1.step_count.value)) == 3
    # a second call reuses the compiled loop and continues from the trained weights
    losses2 = brainscale.train_online(l1, opt1, xs, ys, _loss)
    assert sum(k[0] == "train-window" for k in l1._drivers) == 1
    assert np.abs(np.asarray(losses2) - np.asarray(losses)).max() > 0
