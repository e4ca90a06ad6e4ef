"""Influence-matrix rules against BPTT and against each other.

* ``RTRLAlgorithm`` (exact RTRL, scope ``coupled``) equals BPTT — the sum over a sequence of
  its per-step online gradients, reference ``oracle.bptt_grads`` — on the recurrent LIF,
  adaptive-LIF and 3-layer GRU nets of tests/models.py, unbatched and batched: relative
  error < 1e-5 in float32, < 1e-10 in float64 (a subprocess with ``jax_enable_x64``; there
  the one-layer classic GRU stands for the GRU nets). The classic GRU's reset gate reaches
  the state only through another weight, where the diagonal rules have no temporal credit.
* ``SnApAlgorithm``: equal to RTRL at full support; on a sparse recurrent net its error
  decreases with ``n`` and vanishes once the pattern is full; SnAp-1 is not exact.
* ``UOROAlgorithm``: unbiased — the mean of its gradient over random keys converges to
  RTRL's within a statistical bound (``|mean − RTRL| ≤ 5 σ/√S`` per component, and the
  normalised error stays O(1) as S grows fourfold), while D-RTRL's bias is far outside it.
"""
from __future__ import annotations

import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from brainscale import zoo

import models
from helpers import run_result_script
from oracle import bptt_grads

HERE = os.path.dirname(os.path.abspath(__file__))


def loss_fn(out, target):
    return jnp.sum(out * target)


def _data(name, batch, T, seed=1):
    m, x0 = models.make(name, batch)
    out = m.update(x0)
    rng = np.random.RandomState(seed)
    xs = jnp.asarray(rng.randn(T, *np.shape(x0)), jnp.float32)
    ys = jnp.asarray(rng.randn(T, *np.shape(out)), jnp.float32)
    return xs, ys


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(l, np.float64)) for l in jax.tree.leaves(tree)])


def rel_err(a, b) -> float:
    a, b = _flat(a), _flat(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def online(learner_cls, name, batch, xs, ys, **kw):
    m, x0 = models.make(name, batch)
    learner = learner_cls(m, **kw).compile_graph(x0)
    grads, _ = brainscale.online_gradients(learner, xs, ys, loss_fn)
    return learner, grads


@pytest.mark.parametrize("batch", [0, 2])
@pytest.mark.parametrize("name", ["lif_delta", "alif", "gru3", "gru_rh"])
def test_rtrl_equals_bptt_float32(name, batch):
    T = 8
    xs, ys = _data(name, batch, T)
    learner, grads = online(zoo.RTRLAlgorithm, name, batch, xs, ys)
    m_ref, _ = models.make(name, batch)
    ref = bptt_grads(m_ref, xs, loss_fn, targets=ys)
    assert set(grads) == set(ref)
    for k in ref:
        err = rel_err(grads[k], ref[k])
        assert err < 1e-5, f"{name} b{batch} {k}: RTRL vs BPTT relative error {err:.3g}"
    # every trace is an exact influence matrix over all hidden states
    traced = [t for t in learner.graph.traces if t.dim != "none"]
    assert traced and all(t.scope == "coupled" and t.layout == "dense" for t in traced)
    n_hidden = sum(int(np.prod(h.type.shape)) for h in learner.graph.hidden)
    for t in traced:
        theta = learner.graph.param_by_name[learner.graph.relation_by_id[t.relations[0]]
                                            .param].type.size
        assert t.nbytes == 4 * n_hidden * theta            # the memory select-dims states
        assert f"= {t.nbytes}B" in t.attr("reason")


def test_diagonal_rules_are_not_exact_where_rtrl_is():
    """The recurrent nets are where D-RTRL's diagonal approximation shows."""
    T = 12
    xs, ys = _data("lif_delta", 0, T)
    _, g_rtrl = online(zoo.RTRLAlgorithm, "lif_delta", 0, xs, ys)
    _, g_d = online(brainscale.DiagParamDimAlgorithm, "lif_delta", 0, xs, ys)
    assert rel_err(g_d, g_rtrl) > 1e-2


_X64 = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {here!r})
    import brainstate, jax, jax.numpy as jnp, numpy as np
    brainstate.environ.set(precision=64)      # brainstate owns jax_enable_x64 at import
    jax.config.update("jax_enable_x64", True)
    import brainscale, models
    from brainscale import zoo
    from oracle import bptt_grads

    def to64(m):
        for st in m.states().values():
            st.value = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), st.value)
        return m

    def loss_fn(out, target):
        return jnp.sum(out * target)

    out = {{}}
    for name in ("lif_delta", "alif", "gru_rh"):
        for batch in (0, 2):
            m, x0 = models.make(name, batch)
            m_ref, _ = models.make(name, batch)
            to64(m), to64(m_ref)
            x0 = jnp.asarray(x0, jnp.float64)
            rng = np.random.RandomState(1)
            xs = jnp.asarray(rng.randn(10, *np.shape(x0)))
            ys = jnp.asarray(rng.randn(10, *np.shape(models.make(name, batch)[0].update(x0))))
            learner = zoo.RTRLAlgorithm(m).compile_graph(x0)
            assert all(a.type.dtype == "float64" for t in learner.graph.traces for a in t.arrays)
            g, _ = brainscale.online_gradients(learner, xs, ys, loss_fn)
            ref = bptt_grads(m_ref, xs, loss_fn, targets=ys)
            errs = []
            for k in ref:
                a = np.concatenate([np.ravel(l) for l in jax.tree.leaves(g[k])])
                b = np.concatenate([np.ravel(l) for l in jax.tree.leaves(ref[k])])
                assert a.dtype == np.float64
                errs.append(float(np.max(np.abs(a - b)) / np.max(np.abs(b))))
            out[f"{{name}}-b{{batch}}"] = max(errs)
    print("RESULT" + json.dumps(out))
""")


def test_rtrl_equals_bptt_float64():
    code = _X64.format(here=HERE)
    errs = run_result_script(code)
    assert len(errs) == 6
    for case, err in errs.items():
        assert err < 1e-10, f"{case}: RTRL vs BPTT relative error {err:.3g} in float64"


# ---------------------------------------------------------------------------------------
# SnAp-n
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,batch", [("lif_delta", 2), ("gru_rh", 0)])
def test_snap_at_full_support_is_rtrl(name, batch):
    T = 10
    xs, ys = _data(name, batch, T)
    _, g_rtrl = online(zoo.RTRLAlgorithm, name, batch, xs, ys)
    learner, g_snap = online(zoo.SnApAlgorithm, name, batch, xs, ys, n=8)
    notes = "\n".join(learner._step.notes)
    for t in learner.graph.traces:
        if t.dim != "none":
            assert t.scope == "sparse" and t.snap_n == 8
            assert "pattern keeps" in notes
    for k in g_rtrl:
        assert rel_err(g_snap[k], g_rtrl[k]) < 1e-5, k


def _narrow_surrogate_lif():
    """LIF whose surrogate derivative is zero outside |V - V_th| < 0.125 (compact support),
    compiled at V = 0: every spike path has a zero derivative at the compile-time state."""
    import braintools
    m, x0 = models.lif_delta(0)
    m.spk_fun = braintools.surrogate.PiecewiseQuadratic(alpha=8.0)
    m.V.value = jnp.zeros_like(m.V.value)
    return m, x0


def test_snap_pattern_is_structural_not_probed():
    """A path whose derivative is zero at the compile-time state (and at most states) is
    still a path: the SnAp pattern comes from the jaxpr, so at full support it is RTRL."""
    from brainscale.backends.rules_rtrl import snap_pattern
    m, x0 = _narrow_surrogate_lif()
    learner = zoo.SnApAlgorithm(m, n=2).compile_graph(x0)
    (t,) = [t for t in learner.graph.traces if t.dim != "none"]
    # at the compile-time state the step's hidden Jacobian is diagonal (no spike path) ...
    z = jax.jacfwd(lambda v: m.spk_fun(v - 1.0))(jnp.zeros(5))
    assert not np.any(np.asarray(z))
    # ... yet two steps reach every neuron through the recurrent weights: full pattern
    (p2,) = snap_pattern(learner._step.program, t, 2).values()
    assert p2.all()
    (p1,) = snap_pattern(learner._step.program, t, 1).values()
    assert 0 < p1.sum() < p1.size                       # SnAp-1: each neuron's own weights
    T = 20
    rng = np.random.RandomState(3)
    xs = jnp.asarray(rng.randn(T, 3) * 2.0, jnp.float32)
    ys = jnp.asarray(rng.randn(T, 5), jnp.float32)
    grads = {}
    for key, cls, kw in (("rtrl", zoo.RTRLAlgorithm, {}), ("snap", zoo.SnApAlgorithm, {"n": 4})):
        mm, _ = _narrow_surrogate_lif()
        lr = cls(mm, **kw).compile_graph(x0)
        grads[key], _ = brainscale.online_gradients(lr, xs, ys, loss_fn)
    assert rel_err(grads["snap"], grads["rtrl"]) < 1e-5


def test_structural_pattern_rules():
    """jvp_pattern: constants' zeros stay zeros, value-dependent zeros do not, and what it
    cannot analyse (control flow) depends on everything."""
    from brainscale.backends.sparsity import jvp_pattern
    mask = np.array([[1, 0], [0, 1], [1, 1]], np.float32)

    def f(d, nd):
        x, w = d
        y = x @ (w * mask)
        relu = jnp.where(y > 0, y, 0.0)
        looped = jax.lax.fori_loop(0, 2, lambda i, c: c * 0.5, x[:2])
        return [relu, looped]
    relu, looped = jvp_pattern(f, [jnp.zeros(3), jnp.zeros((3, 2))])
    # a custom derivative rule is read, not its body (a surrogate spike's body has none);
    # reached with tangents, such a call depends on all of its operands
    from brainscale.backends import sparsity

    @jax.custom_jvp
    def spike(v):
        return (v > 0).astype(v.dtype)
    spike.defjvp(lambda p, t: (spike(p[0]), t[0] / (1 + jnp.abs(p[0]))))
    (sp,) = jvp_pattern(lambda d, nd: [spike(d[0]) * 2.0], [jnp.zeros(3)])
    np.testing.assert_array_equal(sp, np.eye(3, dtype=bool))
    jp = jax.make_jaxpr(spike)(jnp.zeros(3))
    ((kind, pat),) = sparsity._Interp(3).run(jp.jaxpr, jp.consts, [("tan", jnp.eye(3))])
    assert kind == "tan" and np.asarray(pat).all()
    w_idx = lambda a, n: 3 + 2 * a + n                                     # noqa: E731
    expect = np.zeros((2, 9), bool)
    for n in range(2):
        for a in range(3):
            if mask[a, n]:
                expect[n, a] = expect[n, w_idx(a, n)] = True
    np.testing.assert_array_equal(relu, expect)
    # the loop's outputs depend on all of its operand (x[:2]), not on x[2] or w
    assert looped[:, :2].all() and not looped[:, 2:].any()


def test_snap_approaches_rtrl_as_n_grows():
    """A sparse recurrent LIF: the pattern fills in over a few steps of its recurrence."""
    T = 12
    xs, ys = _data("sparse_rec", 0, T)
    _, g_rtrl = online(zoo.RTRLAlgorithm, "sparse_rec", 0, xs, ys)
    errs, fill = [], []
    for n in (1, 2, 3, 6):
        learner, g = online(zoo.SnApAlgorithm, "sparse_rec", 0, xs, ys, n=n)
        errs.append(max(rel_err(g[k], g_rtrl[k]) for k in g_rtrl))
        masks = learner._step.program.plan[0].rule.masks
        fill.append(sum(int(m.sum()) for ms in masks.values() for m in ms.values()))
    assert errs[0] > 1e-2, errs                       # SnAp-1 is an approximation
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), errs
    assert all(b >= a for a, b in zip(fill, fill[1:])) and fill[0] < fill[-1], fill
    assert errs[-1] < 1e-5, errs                      # the pattern is full by n = 6


# ---------------------------------------------------------------------------------------
# UORO
# ---------------------------------------------------------------------------------------

def _uoro_samples(name, batch, xs, ys, S):
    m, x0 = models.make(name, batch)
    learner = zoo.UOROAlgorithm(m, seed=7).compile_graph(x0)
    samples = []
    for _ in range(S):          # the learner's key advances: a fresh estimate every run
        g, _ = brainscale.online_gradients(learner, xs, ys, loss_fn)
        samples.append(_flat(g))
    return learner, np.stack(samples)


@pytest.mark.parametrize("name,batch,S", [("lif_delta", 0, 1600), ("alif", 2, 800)])
def test_uoro_is_unbiased(name, batch, S):
    T = 4
    xs, ys = _data(name, batch, T)
    _, g_rtrl = online(zoo.RTRLAlgorithm, name, batch, xs, ys)
    _, g_d = online(brainscale.DiagParamDimAlgorithm, name, batch, xs, ys)
    learner, X = _uoro_samples(name, batch, xs, ys, S)
    assert all(t.dim == "random" for t in learner.graph.traces if t.dim != "none")
    exact, diag = _flat(g_rtrl), _flat(g_d)
    assert np.any(X.std(axis=0) > 0)                   # the estimates are random
    z_of = lambda n: np.abs(X[:n].mean(0) - exact) / (X[:n].std(0, ddof=1) / np.sqrt(n) + 1e-12)  # noqa: E731
    # per component within 5 standard errors
    z = z_of(S)
    assert np.max(z) < 5.0, f"max |mean-RTRL|/(sigma/sqrt(S)) = {np.max(z):.2f}"
    # the error shrinks like 1/sqrt(S): the normalised error does not grow with S
    err = lambda n: np.linalg.norm(X[:n].mean(0) - exact)  # noqa: E731
    se = lambda n: np.linalg.norm(X[:n].std(0, ddof=1)) / np.sqrt(n)  # noqa: E731
    for n in (S // 16, S // 4, S):
        assert err(n) < 4.0 * se(n), (n, err(n), se(n))
    assert err(S) < err(S // 16)
    # the bound is tight: a bias of 10% of the gradient would lie far outside it
    print(f"UORO {name}: |mean-RTRL| {err(S):.3g}, sigma/sqrt(S) {se(S):.3g}, "
          f"|RTRL| {np.linalg.norm(exact):.3g}, |D-RTRL - RTRL| {np.linalg.norm(diag - exact):.3g}")
    assert 0.1 * np.linalg.norm(exact) > 4.0 * se(S)


@pytest.mark.parametrize("cls", [zoo.RTRLAlgorithm, zoo.OSTLAlgorithm])
def test_column_route_equals_bptt(cls, monkeypatch):
    """The influence rules have two routes to ``J M + ∂F/∂θ``: per-example Jacobians (the
    small-net default used above) and one JVP per parameter element (chosen when there are
    fewer parameter elements than hidden values x (B + 1)); the second one is exact too."""
    from brainscale.backends.rules_rtrl import InfluenceRule
    monkeypatch.setattr(InfluenceRule, "_dense_route", staticmethod(lambda *a: False))
    T = 8
    xs, ys = _data("alif", 2, T)
    _, grads = online(cls, "alif", 2, xs, ys)
    m_ref, _ = models.make("alif", 2)
    ref = bptt_grads(m_ref, xs, loss_fn, targets=ys)
    for k in ref:
        assert rel_err(grads[k], ref[k]) < 1e-5, k


def test_snap_pattern_too_large_is_a_clear_error(monkeypatch):
    import brainscale.backends.sparsity as sparsity
    real = sparsity.jvp_pattern
    monkeypatch.setattr(sparsity, "jvp_pattern",
                        lambda *a, **k: real(*a, **{**k, "max_elements": 10}))
    m, x0 = models.lif_delta(0)
    with pytest.raises(brainscale.BackendError, match=r"T0: SnAp-2's structural pattern is "
                                                      r"too large to prove .*e-prop / D-RTRL"):
        zoo.SnApAlgorithm(m, n=2).compile_graph(x0)
