"""The native CPU backend: the one-pass D-RTRL kernel (C++, XLA FFI) and ``backend='native'``.

The kernel is checked against the pure-JAX reference of the Pallas trio (same contract), the
learner against the JAX backend: gradients, losses, traces and hidden states, through the
step-owning loop (``online_gradients`` / ``train_online``, one pass per step) and through
the learner's own step (update in the forward, contraction in the backward). Skipped where
no C++ compiler is found (the kernel is built on first use).
"""
from __future__ import annotations

import braintools
import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import models
from brainscale.backends import native
from brainscale.backends.native import build as native_build
from brainscale.backends.native import select as native_select
from brainscale.backends.pallas.drtrl import DrtrlItem, drtrl_reference
from brainscale.errors import PipelineError

needs_kernel = pytest.mark.skipif(not native.available(),
                                  reason=f"native kernel unavailable: {native.why_unavailable()}")


def rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def arrays(B, I, O, k, c, acc, seed=0):
    rng = np.random.RandomState(seed)
    f = lambda *s: jnp.asarray(rng.randn(*s).astype(np.float32))  # noqa: E731
    lead = (B,) if B else ()
    return dict(eps=f(*lead, I, O, k), J=f(*lead, O, k, k) * 0.5, df=f(*lead, O, k),
                x=f(*lead, I), delta=f(*lead, O, k), c=f(I, O) if c else None,
                grad_acc=f(I, O) if acc else None)


# 4·64·128·2 = 65536 elements: the kernel splits the rows over XLA's thread pool
@needs_kernel
@pytest.mark.parametrize("B,I,O,k,c,acc", [(3, 5, 7, 2, True, True), (2, 4, 6, 1, False, False),
                                           (0, 5, 6, 2, False, True), (4, 9, 5, 3, True, False),
                                           (2, 3, 4, 6, False, True), (4, 64, 128, 2, True, True),
                                           (4, 64, 128, 1, False, True)])
@pytest.mark.parametrize("update,grad", [(True, True), (True, False), (False, True)])
def test_kernel_equals_reference(B, I, O, k, c, acc, update, grad):
    kernel_vs_reference(arrays(B, I, O, k, c, acc), update, grad, tol_stored=2e-6)


def kernel_vs_reference(a, update, grad, tol_stored):
    """The kernel's ``(eps_new, grad)`` against ``drtrl_reference`` on the operands ``a``:
    the same dtypes and shapes, the gradient within 2e-6, the new trace within
    ``tol_stored`` (relative to its largest entry). Returns both."""
    ref = drtrl_reference(a["eps"], a["J"], a["df"], a["x"], a["delta"], a["c"], a["grad_acc"],
                          update=update, grad=grad)
    got = jax.jit(lambda d: native.native_drtrl_multi([DrtrlItem(**d)], update=update,
                                                      grad=grad)[0])(a)
    for r, g in zip(ref, got):
        if r is None:
            assert g is None
            continue
        assert g.shape == r.shape and g.dtype == r.dtype
        assert rel(g, r) < (2e-6 if g.ndim == 2 else tol_stored)
    return ref, got


@needs_kernel
@pytest.mark.parametrize("B,I,O,k,c,acc", [(3, 5, 7, 2, True, True), (4, 64, 128, 2, True, True),
                                           (0, 5, 6, 1, False, False), (2, 3, 4, 6, False, True)])
@pytest.mark.parametrize("update,grad", [(True, True), (True, False), (False, True)])
def test_kernel_bfloat16_storage_equals_reference(B, I, O, k, c, acc, update, grad):
    """A bfloat16 trace: read into float32, updated in float32, contracted before rounding
    and stored rounded to nearest even, as the reference (and the Pallas kernel) does."""
    a = arrays(B, I, O, k, c, acc, seed=21)
    a["eps"] = a["eps"].astype(jnp.bfloat16)
    # the new trace: one bf16 ulp where the two float32 sums round either side of a tie
    ref, got = kernel_vs_reference(a, update, grad, tol_stored=8e-3)
    if update:
        e = got[0].astype(jnp.float32)
        assert float(jnp.mean(e != ref[0].astype(jnp.float32))) < 0.01
    cur = a["eps"].astype(jnp.float32) * 0.5 + 1.0
    J = a["J"]
    ref_da = (jnp.einsum("...nij,...anj->...ani", J, a["eps"].astype(jnp.float32),
                         precision="highest") + cur).astype(jnp.bfloat16)
    got_da = jax.jit(native.native_decay_add)(a["eps"], J, cur)
    assert got_da.dtype == jnp.bfloat16 and rel(got_da, ref_da) < 8e-3


@needs_kernel
def test_kernel_in_a_scan_updates_in_place_and_equals_reference():
    """Twelve steps as a scan carry (the trace and the running gradient aliased to the
    outputs): equal to the reference's scan."""
    a = arrays(4, 64, 128, 2, True, True, seed=3)

    def run(step):
        def body(carry, _):
            e, g = carry
            return step(e, g), None
        return jax.jit(lambda e, g: jax.lax.scan(body, (e, g), None, length=12)[0])(
            a["eps"], a["grad_acc"])

    got = run(lambda e, g: native.native_drtrl_multi(
        [DrtrlItem(e, a["J"], a["df"], a["x"], a["c"], a["delta"], g)])[0])
    ref = run(lambda e, g: drtrl_reference(e, a["J"], a["df"], a["x"], a["delta"], a["c"], g))
    assert rel(got[0], ref[0]) < 1e-5 and rel(got[1], ref[1]) < 1e-5


@needs_kernel
def test_kernel_refuses_bad_input():
    a = arrays(2, 4, 6, 2, False, False)
    with pytest.raises(ValueError, match=r"J has shape \(2, 6, 2\), expected \(2, 6, 2, 2\)"):
        native.native_drtrl_step(a["eps"], a["J"][..., 0], a["df"], a["x"], a["delta"])
    with pytest.raises(ValueError, match="the trace must be float32 or bfloat16, got float16"):
        native.native_drtrl_step(a["eps"].astype(jnp.float16), a["J"], a["df"], a["x"],
                                 a["delta"])
    with pytest.raises(ValueError, match="nothing to do"):
        native.native_drtrl_multi([DrtrlItem(a["eps"])], update=False, grad=False)


def loss_fn(out, y):
    return jnp.sum(jnp.tanh(jax.tree.leaves(out)[0]) * y)


def sequence(x0, T, seed=0):
    rng = np.random.RandomState(seed)
    return (jnp.asarray(rng.randn(T, *np.shape(x0)).astype(np.float32)),
            jnp.asarray(rng.randn(T).astype(np.float32)))


def pair(name, batch, **kw):
    net_j, x0 = models.make(name, batch=batch)
    net_n, _ = models.make(name, batch=batch)
    lj = brainscale.DiagParamDimAlgorithm(net_j, **kw).compile_graph(x0)
    ln = brainscale.DiagParamDimAlgorithm(net_n, backend="native", **kw).compile_graph(x0)
    return (net_j, lj), (net_n, ln), x0


def assert_same(gj, gn, lj, ln, tol=1e-5):
    for k in gj:
        for a, b in zip(jax.tree.leaves(gn[k]), jax.tree.leaves(gj[k])):
            assert rel(a, b) < tol, k
    for name in sorted({r.param for r in lj.graph.relations}):
        for a, b in zip(jax.tree.leaves(ln.etrace_of(name)), jax.tree.leaves(lj.etrace_of(name))):
            assert a.shape == b.shape and rel(a, b) < tol, name


@needs_kernel
@pytest.mark.filterwarnings("ignore::brainscale.errors.NoTemporalCreditWarning")
@pytest.mark.parametrize("name,batch", [("lif_delta", 2), ("alif", 0), ("alif", 2),
                                        ("gru_rh", 2), ("elemwise_tau", 2)])
def test_online_gradients_one_pass_equal_jax(name, batch):
    """``online_gradients`` (chunk=1) on a native learner runs the step-owning loop with the
    one-pass kernel; gradients, losses, traces and states equal the JAX backend's."""
    (net_j, lj), (net_n, ln), x0 = pair(name, batch)
    paths = {t.path for t in ln.graph.traces}
    assert "native" in paths
    xs, ys = sequence(x0, 7, seed=1)
    gj, lossj = brainscale.online_gradients(lj, xs, ys, loss_fn)
    gn, lossn = brainscale.online_gradients(ln, xs, ys, loss_fn)
    assert any(k[0] == "drive" for k in ln._drivers)          # the one-pass loop ran
    assert not any(k[0] == "drive" for k in lj._drivers)      # the JAX learner's own step
    assert rel(lossn, lossj) < 1e-5
    assert_same(gj, gn, lj, ln)
    for a, b in zip(jax.tree.leaves(net_n.states(brainstate.HiddenState)),
                    jax.tree.leaves(net_j.states(brainstate.HiddenState))):
        assert rel(a.value, b.value) < 1e-5


@needs_kernel
def test_learner_step_equals_jax():
    """Called step by step, the learner's custom VJP runs the kernel's update in the forward
    and its contraction in the backward."""
    (net_j, lj), (net_n, ln), x0 = pair("alif", 2)
    xs, ys = sequence(x0, 5, seed=2)
    for learner in (lj, ln):
        learner.reset_state()
    pj = net_j.states(brainstate.ParamState)
    pn = net_n.states(brainstate.ParamState)
    for x, y in zip(xs, ys):
        gj = brainstate.transform.grad(lambda: loss_fn(lj(x), y), pj)()
        gn = brainstate.transform.grad(lambda: loss_fn(ln(x), y), pn)()
        assert_same(gj, gn, lj, ln)


@needs_kernel
@pytest.mark.filterwarnings("ignore::brainscale.errors.NoTemporalCreditWarning")
def test_ir_records_each_traces_path_and_reason():
    (_, _), (_, ln), x0 = pair("elemwise_tau", 2)
    text = ln.ir()
    assert "native-select" in text and "native=available" in text
    by_path = {t.path: t for t in ln.graph.traces}
    assert set(by_path) == {"native", "jax"}
    assert by_path["native"].attr("path_reason") == "native CPU kernel (one pass per step)"
    assert by_path["jax"].attr("path_reason") == ("unsupported: op kind 'elemwise': the "
                                                  "kernels cover dense matmul only")
    # the weight's k states stacked last, float32, as the kernel reads them
    assert "array T1.1 = eps(R1 -> G0, leaf=weight, states=[%V]) : f32[2,3,5,1]" in text
    (_, _), (_, la), _ = pair("alif", 2)
    assert "array T0.2 = eps(R0 -> G0, leaf=weight, states=[%V,%a]) : f32[2,8,5,2]" in la.ir()
    (_, _), (_, lg), _ = pair("gru_rh", 2)
    assert {t.attr("path_reason") for t in lg.graph.traces if t.path == "jax"} == {
        "dim=none: instantaneous gradient only"}
    # select='none': every trace on the JAX rules, and online_gradients keeps the learner's step
    net, x0 = models.make("alif", batch=2)
    lnone = brainscale.DiagParamDimAlgorithm(
        net, backend=native.NativeBackend(select="none")).compile_graph(x0)
    assert {t.path for t in lnone.graph.traces} == {"jax"}
    assert all(t.attr("path_reason") == "select=none" for t in lnone.graph.traces)
    brainscale.online_gradients(lnone, *sequence(x0, 3), loss_fn)
    assert not any(k[0] == "drive" for k in lnone._drivers)


@needs_kernel
def test_train_online_step_schedule_takes_the_one_pass_loop():
    """A per-step schedule (an optimizer step after every step) on a native learner runs
    the one-pass loop one step per window; the same losses and weights as the JAX learner."""
    (net_j, lj), (net_n, ln), x0 = pair("alif", 2)
    train_both_equal(net_j, lj, net_n, ln, x0, seed=4)
    assert any(k[0] == "train-window" for k in ln._drivers)
    assert not any(k[0] == "train-window" for k in lj._drivers)


def train_both_equal(net_j, lj, net_n, ln, x0, seed):
    """``train_online`` with per-step Adam on both learners: equal losses and weights."""
    xs = sequence(x0, 6, seed=seed)[0]
    ys = jnp.asarray(np.random.RandomState(seed + 1).rand(6, 2, 5), jnp.float32)

    def mse(out, y):
        return jnp.mean((out - y) ** 2)
    losses = []
    for net, learner in ((net_j, lj), (net_n, ln)):
        opt = braintools.optim.Adam(lr=0.05)
        opt.register_trainable_weights(net.states(brainstate.ParamState))
        losses.append(np.asarray(brainscale.train_online(learner, opt, xs, ys, mse)))
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-5, atol=1e-7)
    pj, pn = net_j.states(brainstate.ParamState), net_n.states(brainstate.ParamState)
    for k in pj:
        for a, b in zip(jax.tree.leaves(pn[k].value), jax.tree.leaves(pj[k].value)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_no_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("BRAINSCALE_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native_build, "_compiler", lambda: None)
    with pytest.raises(native.NativeUnavailable, match=r"no C\+\+ compiler was found .*"
                                                       r"backend='jax'"):
        native_build.library.__wrapped__()
    # a learner asking for the native backend is refused at compile time, never run on JAX
    monkeypatch.setattr(native_select, "why_unavailable", lambda: "no C++ compiler (test)")
    net, x0 = models.make("alif", batch=2)
    with pytest.raises(PipelineError, match=r"native-select: no C\+\+ compiler \(test\)"):
        brainscale.DiagParamDimAlgorithm(net, backend="native").compile_graph(x0)


@needs_kernel
def test_build_caches_by_source_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("BRAINSCALE_NATIVE_CACHE", str(tmp_path))
    lib = native_build.library.__wrapped__()
    assert lib.parent == tmp_path and lib.name.startswith("drtrl-") and lib.suffix == ".so"
    stamp = lib.stat().st_mtime_ns
    assert native_build.library.__wrapped__() == lib and lib.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]     # no temporary file left


@needs_kernel
def test_zoo_algorithms_on_the_native_backend():
    """``backend='native'`` on a zoo algorithm is the zoo's step with native-select: e-prop's
    default D-RTRL trace takes the kernel (and the one-pass loop), a trace off the default
    rule axes (κ filter) keeps its zoo rule, with the reason in the IR."""
    from brainscale import zoo
    for make, path in ((lambda n, be: zoo.EPropAlgorithm(n, backend=be), "native"),
                       (lambda n, be: zoo.RuleAlgorithm(n, policy="param", filter="kappa",
                                                        kappa=0.9, backend=be), "jax")):
        out = []
        for be in ("jax", "native"):
            net, x0 = models.make("alif", batch=2)
            learner = make(net, be).compile_graph(x0)
            xs, ys = sequence(x0, 5, seed=6)
            out.append((learner, brainscale.online_gradients(learner, xs, ys, loss_fn)))
        (lj, (gj, lossj)), (ln, (gn, lossn)) = out
        assert ln._backend_obj.name == "native-zoo"
        assert [t.path for t in ln.graph.traces] == [path]
        assert any(k[0] == "drive" for k in ln._drivers) == (path == "native")
        if path == "jax":
            assert ln.graph.traces[0].attr("path_reason").startswith("rule axes filter=kappa")
        assert rel(lossn, lossj) < 1e-5
        assert_same(gj, gn, lj, ln)


@needs_kernel
def test_kernel_under_vmap_runs_per_element():
    a = arrays(2, 4, 6, 2, True, True, seed=7)
    stack = {k: jnp.stack([v, 2 * v]) for k, v in a.items()}
    got = jax.jit(jax.vmap(lambda d: native.native_drtrl_multi([DrtrlItem(**d)])[0]))(stack)
    for i in range(2):
        one = {k: v[i] for k, v in stack.items()}
        ref = drtrl_reference(one["eps"], one["J"], one["df"], one["x"], one["delta"], one["c"],
                              one["grad_acc"])
        assert rel(got[0][i], ref[0]) < 2e-6 and rel(got[1][i], ref[1]) < 2e-6


@needs_kernel
def test_auto_backend_takes_the_native_kernel_on_the_cpu(monkeypatch):
    from brainscale.backends import JaxBackend, get_backend
    net, x0 = models.make("alif", batch=2)
    learner = brainscale.DiagParamDimAlgorithm(net, backend="auto").compile_graph(x0)
    assert [t.path for t in learner.graph.traces] == ["native"]
    assert "auto backend: native (CPU: the native D-RTRL kernel)" in learner._step.notes
    # the trace storage option reaches the native kernel on the CPU
    net, x0 = models.make("alif", batch=2)
    lb = brainscale.DiagParamDimAlgorithm(
        net, backend=get_backend("auto", trace_dtype="bfloat16")).compile_graph(x0)
    assert [a.storage for t in lb.graph.traces for a in t.arrays][:1] == ["bfloat16"]
    # a zoo algorithm with 'auto' gets the zoo's step with the kernel
    from brainscale import zoo
    net, x0 = models.make("alif", batch=2)
    ez = zoo.EPropAlgorithm(net, backend="auto").compile_graph(x0)
    assert ez._backend_obj.name == "native-zoo"
    brainscale.online_gradients(ez, *sequence(x0, 3), loss_fn)
    # where the kernel cannot be built, 'auto' is the JAX backend and says why
    monkeypatch.setattr(native.NativeBackend, "unavailable", staticmethod(lambda: "no c++"))
    auto = get_backend("auto")
    assert type(auto.impl) is JaxBackend and auto.reason.endswith("native kernel: no c++")
    net, x0 = models.make("alif", batch=2)
    assert zoo.EPropAlgorithm(net, backend="auto").compile_graph(x0)._backend_obj.name == \
        "jax-zoo"


@needs_kernel
@pytest.mark.parametrize("B,I,O,k", [(3, 5, 7, 2), (0, 4, 6, 1), (2, 64, 128, 2), (2, 3, 4, 6)])
def test_decay_add_equals_reference(B, I, O, k):
    a = arrays(B, I, O, k, False, False, seed=8)
    cur = a["eps"] * 0.5 + 1.0
    ref = jnp.einsum("...nij,...anj->...ani", a["J"], a["eps"], precision="highest") + cur
    assert rel(jax.jit(native.native_decay_add)(a["eps"], a["J"], cur), ref) < 2e-6
    with pytest.raises(ValueError, match="cur has shape"):
        native.native_decay_add(a["eps"], a["J"], cur[..., :1, :])


@needs_kernel
@pytest.mark.filterwarnings("ignore::brainscale.errors.NoTemporalCreditWarning")
@pytest.mark.parametrize("name", ["alif", "gru_rh", "elemwise_tau"])
def test_windows_sum_native_traces(name, monkeypatch):
    """``online_gradients(chunk=K)`` on a native learner sums its native traces per window
    (windowed D-RTRL on the stacked layout, the advance on the kernel) instead of running the
    one-pass kernel every step; equal to the JAX backend per step."""
    from brainscale.backends.drtrl_window import DrtrlWindow
    from brainscale.backends.native import rules as native_rules
    calls = []
    for fn in ("native_drtrl_multi", "native_decay_add"):
        orig = getattr(native_rules, fn)
        monkeypatch.setattr(native_rules, fn, lambda *a, _o=orig, _n=fn, **kw: (
            calls.append(_n), _o(*a, **kw))[1])
    (net_j, lj), (net_n, ln), x0 = pair(name, 2)
    native_ids = {t.id for t in ln.graph.traces if t.path == "native"}
    assert native_ids and native_ids <= DrtrlWindow(ln._step.program).ids
    xs, ys = sequence(x0, 11, seed=9)               # two windows of 4 and a tail of 3
    gj, lossj = brainscale.online_gradients(lj, xs, ys, loss_fn)
    gn, lossn = brainscale.online_gradients(ln, xs, ys, loss_fn, chunk=4)
    assert set(calls) == {"native_decay_add"}      # no per-step kernel pass was traced
    assert rel(lossn, lossj) < 1e-5
    assert_same(gj, gn, lj, ln)


# -- ES-D-RTRL (io-dim) on the native outer-accumulate --------------------------------------

def xla_outer_acc(X, S, G, C):
    from brainscale.backends.online_driver import window_accumulate
    return window_accumulate(X, S, G, C)


@needs_kernel
@pytest.mark.parametrize("lead,I,O,chain", [((16,), 61, 130, False), ((3, 5), 37, 70, True),
                                            ((1,), 5, 3, False), ((0,), 6, 64, True),
                                            ((8,), 96, 256, True), ((4,), 100, 200, False)])
def test_outer_acc_equals_xla(lead, I, O, chain):
    """``G + C ⊙ (Xᵀ S)``: register tiles of 6 rows × 64 columns, the rest of the rows and
    columns, the leading axes flattened into rows; (8, 96, 256) and (4, 100, 200) split the
    rows over the thread pool."""
    rng = np.random.RandomState(11)
    f = lambda *s: jnp.asarray(rng.randn(*s).astype(np.float32))  # noqa: E731
    X, S, G = f(*lead, I), f(*lead, O), f(I, O)
    C = f(I, O) if chain else None
    got = jax.jit(native.native_outer_acc)(X, S, G, C)
    assert got.shape == (I, O) and got.dtype == jnp.float32
    assert rel(got, xla_outer_acc(X, S, G, C)) < 2e-6


@needs_kernel
def test_outer_acc_in_a_scan_and_under_vmap():
    rng = np.random.RandomState(12)
    X = jnp.asarray(rng.randn(9, 4, 40).astype(np.float32))
    S = jnp.asarray(rng.randn(9, 4, 70).astype(np.float32))

    def run(acc):
        return jax.jit(lambda: jax.lax.scan(lambda g, xs: (acc(xs[0], xs[1], g, None), None),
                                            jnp.zeros((40, 70)), (X, S))[0])()
    assert rel(run(native.native_outer_acc), run(xla_outer_acc)) < 2e-6
    G = jnp.ones((3, 40, 70))
    got = jax.jit(jax.vmap(native.native_outer_acc))(X[:3], S[:3], G)
    for i in range(3):
        assert rel(got[i], xla_outer_acc(X[i], S[i], G[i], None)) < 2e-6


@needs_kernel
def test_outer_acc_refuses_bad_input():
    X, S = jnp.ones((4, 5)), jnp.ones((4, 6))
    with pytest.raises(ValueError, match="the gradient must be float32"):
        native.native_outer_acc(X, S, jnp.ones((5, 6), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"must be \(\.\.\., I\) and \(\.\.\., O\) with the same"):
        native.native_outer_acc(X, jnp.ones((3, 6)), jnp.ones((5, 6)))
    with pytest.raises(ValueError, match=r"chain has shape \(6, 5\)"):
        native.native_outer_acc(X, S, jnp.ones((5, 6)), jnp.ones((6, 5)))


@needs_kernel
def test_outer_acc_multi_equals_one_call_per_weight():
    """Several weights in one call (the step's ``step_accumulate_multi``): each result is
    bit for bit the single call's (rows of a weight are never split inside a tile, and a
    narrow weight takes the same tile code), in a scan and under ``vmap`` too; one weight
    is the single call."""
    rng = np.random.RandomState(15)
    f = lambda *s: jnp.asarray(rng.randn(*s).astype(np.float32))  # noqa: E731
    items = [(f(16, 61), f(16, 130), f(61, 130), None),
             (f(3, 5, 7), f(3, 5, 3), f(7, 3), f(7, 3)),
             (f(16, 100), f(16, 512), f(100, 512), f(100, 512)),
             (f(16, 96), f(16, 10), f(96, 10), None)]
    got = jax.jit(native.native_outer_acc_multi)(items)
    assert len(got) == len(items)
    for it, g in zip(items, got):
        assert g.shape == it[2].shape and g.dtype == jnp.float32
        np.testing.assert_array_equal(g, jax.jit(native.native_outer_acc)(*it))
        assert rel(g, xla_outer_acc(*it)) < 2e-6
    (one,) = native.native_outer_acc_multi(items[:1])
    np.testing.assert_array_equal(one, native.native_outer_acc(*items[0]))
    X1, S1, X2, S2 = f(9, 4, 40), f(9, 4, 70), f(9, 4, 64), f(9, 4, 33)

    def run(both):
        def body(gs, xs):
            return both(xs, gs), None
        return jax.jit(lambda: jax.lax.scan(body, (jnp.zeros((40, 70)), jnp.zeros((64, 33))),
                                            (X1, S1, X2, S2))[0])()
    multi = run(lambda xs, gs: tuple(native.native_outer_acc_multi(
        [(xs[0], xs[1], gs[0], None), (xs[2], xs[3], gs[1], None)])))
    single = run(lambda xs, gs: (native.native_outer_acc(xs[0], xs[1], gs[0]),
                                 native.native_outer_acc(xs[2], xs[3], gs[1])))
    for a, b in zip(multi, single):
        np.testing.assert_array_equal(a, b)
    # under vmap (an ensemble of learners): one call per mapped element
    G1, G2 = f(3, 40, 70), f(3, 64, 33)
    got = jax.jit(jax.vmap(lambda a, b, c, d, e, g: native.native_outer_acc_multi(
        [(a, b, c, None), (d, e, g, None)])))(X1[:3], S1[:3], G1, X2[:3], S2[:3], G2)
    for i in range(3):
        np.testing.assert_array_equal(got[0][i], native.native_outer_acc(X1[i], S1[i], G1[i]))
        np.testing.assert_array_equal(got[1][i], native.native_outer_acc(X2[i], S2[i], G2[i]))
    with pytest.raises(ValueError, match="no weights given"):
        native.native_outer_acc_multi([])
    with pytest.raises(ValueError, match="the gradient must be float32"):
        native.native_outer_acc_multi([items[0], (f(4, 5), f(4, 6), jnp.ones((5, 6),
                                                                            jnp.bfloat16), None)])


#: the test models are small: let native-select route their io-dim traces to the kernel
ANY_SIZE = dict(io_min_size=0, io_min_rows=0)


class _Calls(list):
    """The relations the traced outer-accumulate calls took (their ε_x shapes), and the
    number of kernel calls (``kernel``)."""
    kernel = 0


@pytest.fixture
def outer_calls(monkeypatch):
    """Count the outer-accumulate calls the step-owning loop traces."""
    from brainscale.backends.native.rules import NativeIORule
    calls = _Calls()
    orig = NativeIORule.step_accumulate
    orig_multi = NativeIORule.step_accumulate_multi

    def one(*a):
        calls.append(a[0].shape)
        calls.kernel += 1
        return orig(*a)

    def multi(items):
        calls.extend(it[0].shape for it in items)
        calls.kernel += 1
        return orig_multi(items)
    monkeypatch.setattr(NativeIORule, "step_accumulate", staticmethod(one))
    monkeypatch.setattr(NativeIORule, "step_accumulate_multi", staticmethod(multi))
    return calls


def io_pair(name, batch, **native_options):
    net_j, x0 = models.make(name, batch=batch)
    net_n, _ = models.make(name, batch=batch)
    lj = brainscale.DiagIODimAlgorithm(net_j, decay_or_rank=0.9).compile_graph(x0)
    ln = brainscale.DiagIODimAlgorithm(net_n, decay_or_rank=0.9, backend=native.NativeBackend(
        **native_options)).compile_graph(x0)
    return (net_j, lj), (net_n, ln), x0


def assert_same_io(gj, gn, lj, ln, tol=1e-5):
    for k in gj:
        for a, b in zip(jax.tree.leaves(gn[k]), jax.tree.leaves(gj[k])):
            assert rel(a, b) < tol, k
    for attr in ("etrace_xs", "etrace_dfs"):
        tn, tj = getattr(ln, attr), getattr(lj, attr)
        assert set(tn) == set(tj) and tn
        for key in tj:
            assert rel(tn[key].value, tj[key].value) < tol, (attr, key)


@needs_kernel
@pytest.mark.filterwarnings("ignore::brainscale.errors.NoTemporalCreditWarning")
@pytest.mark.parametrize("name,batch", [("lif_delta", 2), ("alif", 0), ("alif", 3),
                                        ("gru_rh", 2), ("elemwise_tau", 2)])
def test_es_online_gradients_on_the_outer_accumulate_equal_jax(name, batch, outer_calls):
    """ES-D-RTRL with ``backend='native'``: ``online_gradients`` runs the step-owning loop and
    adds each dense relation's per-step gradient with the outer-accumulate; gradients,
    losses and traces equal the JAX backend's (per step, and with ``chunk``, where the
    window's XLA product takes over)."""
    (net_j, lj), (net_n, ln), x0 = io_pair(name, batch, **ANY_SIZE)
    io = [t for t in ln.graph.traces if t.dim == "io"]
    assert io and all(t.path == "native" for t in io)
    assert all(t.attr("path_reason") == "native outer-accumulate of the per-step gradient in "
               "the step-owning loop" for t in io)
    xs, ys = sequence(x0, 7, seed=13)
    gj, lossj = brainscale.online_gradients(lj, xs, ys, loss_fn)
    gn, lossn = brainscale.online_gradients(ln, xs, ys, loss_fn)
    n_rel = sum(len(t.relations) for t in io)
    assert len(outer_calls) == n_rel                  # every relation, once in the loop body
    assert outer_calls.kernel == 1                    # all of them in one kernel call
    assert any(k[0] == "drive" for k in ln._drivers)
    assert not any(k[0] == "drive" for k in lj._drivers)
    assert rel(lossn, lossj) < 1e-5
    assert_same_io(gj, gn, lj, ln)
    # windows: the (K·B)-row product, no per-step outer-accumulate
    del outer_calls[:]
    gc, lossc = brainscale.online_gradients(ln, xs, ys, loss_fn, chunk=3)
    assert not outer_calls
    assert rel(lossc, lossj) < 1e-5
    assert_same_io(gj, gc, lj, ln)


class SharedWeightNet(brainstate.nn.Module):
    """One weight read by two ops of the step (``W · tanh(h)`` and ``W · sin(h)``) beside an
    input weight: two relations update the same gradient leaf."""

    def __init__(self, n_in=3, n=5, batch=2, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.W = models._mm(rng, n, n)
        self.Win = models._mm(rng, n_in, n, bias=False)
        self.h = brainscale.ETraceState(jnp.asarray(rng.randn(batch, n).astype(np.float32)))

    def update(self, x):
        h = self.h.value
        self.h.value = 0.8 * h + 0.3 * jnp.tanh(
            self.W.execute(jnp.tanh(h)) + 0.5 * self.W.execute(jnp.sin(h)) + self.Win.execute(x))
        return self.h.value


@needs_kernel
def test_es_shared_weight_takes_one_kernel_call_per_update(outer_calls):
    """Two relations of one weight never share a kernel call (each call updates a gradient
    once): the step splits the calls, and the gradients equal the JAX backend's."""
    learners = []
    for backend in ("jax", native.NativeBackend(**ANY_SIZE)):
        net = SharedWeightNet()
        x0 = jnp.zeros((2, 3), jnp.float32)
        learners.append(brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9,
                                                      backend=backend).compile_graph(x0))
    lj, ln = learners
    io = [t for t in ln.graph.traces if t.dim == "io"]
    assert all(t.path == "native" for t in io)
    rels = [ln.graph.relation_by_id[r] for t in io for r in t.relations]
    assert len(rels) == 3 and len({r.param for r in rels}) == 2
    xs, ys = sequence(jnp.zeros((2, 3)), 6, seed=16)
    gj, lossj = brainscale.online_gradients(lj, xs, ys, loss_fn)
    gn, lossn = brainscale.online_gradients(ln, xs, ys, loss_fn)
    assert len(outer_calls) == 3 and outer_calls.kernel == 2
    assert rel(lossn, lossj) < 1e-5
    assert_same_io(gj, gn, lj, ln)


@needs_kernel
@pytest.mark.filterwarnings("ignore::brainscale.errors.NoTemporalCreditWarning")
def test_es_small_trace_joins_the_steps_kernel_call(monkeypatch, outer_calls):
    """A trace below the size threshold joins the kernel when another io-dim trace of the
    step takes it and its weights are at least ``IO_JOIN_MIN_OUT`` outputs wide; the IR
    says so, and the gradients equal the JAX backend's. Narrower weights stay on XLA."""
    # gru_rh: io-dim traces of Wz (I·O = 28), Wx (12) and U (16); Wr's is dim=none
    size = dict(io_min_size=20, io_min_rows=0)
    (_, _), (_, ln), _ = io_pair("gru_rh", 2, **size)
    io = [t for t in ln.graph.traces if t.dim == "io"]
    assert [t.path for t in io] == ["native", "jax", "jax"]
    assert all(t.attr("path_reason").startswith("io-dim, small (I·O = ") for t in io[1:])
    monkeypatch.setattr(native_select, "IO_JOIN_MIN_OUT", 4)
    (net_j, lj), (net_n, ln), x0 = io_pair("gru_rh", 2, **size)
    io = [t for t in ln.graph.traces if t.dim == "io"]
    assert [t.path for t in io] == ["native"] * 3
    joined = [t.attr("path_reason") for t in io if "in the step's one call" in
              t.attr("path_reason")]
    assert len(joined) == 2 and all("(alone: small (I·O = " in r for r in joined)
    assert "in the step's one call" in str(ln.ir())
    xs, ys = sequence(x0, 7, seed=17)
    gj, lossj = brainscale.online_gradients(lj, xs, ys, loss_fn)
    gn, lossn = brainscale.online_gradients(ln, xs, ys, loss_fn)
    assert len(outer_calls) == 3 and outer_calls.kernel == 1
    assert rel(lossn, lossj) < 1e-5
    assert_same_io(gj, gn, lj, ln)
    # no larger trace in the step: nothing to join, the small ones stay on XLA
    (_, _), (_, l_all_small), _ = io_pair("gru_rh", 2, io_min_size=1000, io_min_rows=0)
    assert all(t.path == "jax" for t in l_all_small.graph.traces if t.dim == "io")


@needs_kernel
def test_es_train_online_per_step_on_the_outer_accumulate(outer_calls):
    (net_j, lj), (net_n, ln), x0 = io_pair("alif", 2, **ANY_SIZE)
    train_both_equal(net_j, lj, net_n, ln, x0, seed=14)
    assert outer_calls and any(k[0] == "train-window" for k in ln._drivers)


@needs_kernel
@pytest.mark.filterwarnings("ignore::brainscale.errors.NoTemporalCreditWarning")
def test_es_ir_paths_and_reasons():
    """Default sizes: the small test models' io-dim traces stay on XLA with the reason; a
    LoRA or sparse op is refused with its reason; ``NativeIORule.check`` refuses a trace a
    user pass routes to the kernel that it cannot take."""
    from brainscale.backends.native.rules import NativeIORule
    (_, _), (_, ln), _ = io_pair("alif", 2)
    (t,) = ln.graph.traces
    assert t.path == "jax" and t.attr("path_reason") == (
        "io-dim, small (I·O = 8·5, 2 rows of eps_x; the kernel gains from I·O ≥ 65536 and "
        "≥ 4 rows): XLA's product is as fast")
    assert "T0 (io): path=jax" not in "\n".join(ln._step.notes)   # jax path: the JAX io rule
    assert not any(k[0] == "drive" for k in ln._drivers)
    for name, kind in (("lora", "lora"), ("sparse_rec", "sparse")):
        (_, _), (_, lx), _ = io_pair(name, 2)
        io = [t for t in lx.graph.traces if t.dim == "io"]
        assert io and all(t.path == "jax" and t.attr("path_reason").startswith(
            f"io-dim, op kind '{kind}': the outer-accumulate covers dense matmul only")
            for t in io)
        assert NativeIORule().check(lx.graph, io[0]).endswith(
            f"op kind '{kind}': the outer-accumulate covers dense matmul only")
    assert NativeIORule().check(ln.graph, t) is None       # small, but the kernel can run it
    # the thresholds are the backend's (and the pass's) options, recorded in the reason
    (_, _), (_, l40), _ = io_pair("alif", 2, io_min_size=40, io_min_rows=2)
    assert [t.path for t in l40.graph.traces] == ["native"]
    (_, _), (_, l3), _ = io_pair("alif", 2, io_min_size=40, io_min_rows=3)
    assert l3.graph.traces[0].attr("path_reason").endswith(
        "(I·O = 8·5, 2 rows of eps_x; the kernel gains from I·O ≥ 40 and ≥ 3 rows): XLA's "
        "product is as fast")
    from brainscale import zoo
    net, x0 = models.make("alif", batch=2)
    ez = zoo.RuleAlgorithm(net, policy="io", decay_or_rank=0.9, backend=native.NativeBackend(
        **ANY_SIZE)).compile_graph(x0)
    assert ez._backend_obj.name == "native-zoo" and ez.graph.traces[0].path == "native"


@needs_kernel
def test_es_takes_the_kernel_at_its_default_sizes(outer_calls):
    """ALIF, 100 inputs, 256 neurons, B = 4: I·O = 356·256 ≥ 65536 and 4 rows of ε_x, so the
    io-dim trace takes the outer-accumulate without any setting; the gradients equal JAX's."""
    nets = [models.ALIFNet(100, 256, batch=4, seed=1) for _ in range(2)]
    x0 = jnp.zeros((4, 100), jnp.float32)
    lj = brainscale.DiagIODimAlgorithm(nets[0], decay_or_rank=0.9).compile_graph(x0)
    ln = brainscale.DiagIODimAlgorithm(nets[1], decay_or_rank=0.9,
                                       backend="native").compile_graph(x0)
    assert [t.path for t in ln.graph.traces] == ["native"]
    xs, ys = sequence(x0, 5, seed=16)
    gj, lossj = brainscale.online_gradients(lj, xs, ys, loss_fn)
    gn, lossn = brainscale.online_gradients(ln, xs, ys, loss_fn)
    assert outer_calls == [(4, 356)]
    assert rel(lossn, lossj) < 1e-5
    assert_same_io(gj, gn, lj, ln)


@needs_kernel
@pytest.mark.filterwarnings("ignore::brainscale.errors.NoTemporalCreditWarning")
@pytest.mark.parametrize("name,algo,batch", [("lif_delta", "param", 2), ("alif", "param", 0),
                                             ("alif", "io", 2), ("gru_rh", "io", 2),
                                             ("gru_rh", "param", 0)])
def test_native_loop_equals_the_dense_oracle(name, algo, batch, outer_calls):
    """The native learner's step-owning loop (one-pass D-RTRL kernel, outer-accumulate for
    ES-D-RTRL) against the dense oracle directly (tests/oracle.py: the literal equations),
    not only against the JAX backend: the summed gradient and every loss over 8 steps."""
    from oracle import DenseOracle
    T, alpha = 8, 0.9
    net, x0 = models.make(name, batch=batch)
    net_o, _ = models.make(name, batch=batch)
    be = native.NativeBackend(**ANY_SIZE)
    if algo == "param":
        learner = brainscale.DiagParamDimAlgorithm(net, backend=be)
    else:
        learner = brainscale.DiagIODimAlgorithm(net, decay_or_rank=alpha, backend=be)
    learner.compile_graph(x0)
    assert "native" in {t.path for t in learner.graph.traces}

    def lsum(out, y):
        return jnp.sum(jax.tree.leaves(out)[0] * y)
    out_shape = np.shape(jax.tree.leaves(models.make(name, batch=batch)[0].update(x0))[0])
    rng = np.random.RandomState(17)
    xs = jnp.asarray(rng.randn(T, *np.shape(x0)).astype(np.float32))
    ys = jnp.asarray(rng.randn(T, *out_shape).astype(np.float32))
    grads, losses = brainscale.online_gradients(learner, xs, ys, lsum)
    assert any(k[0] == "drive" for k in learner._drivers)
    assert bool(outer_calls) == (algo == "io")
    orc = DenseOracle(net_o, x0, algorithm=algo, decay_or_rank=alpha if algo == "io" else None,
                      loss_fn=lsum)
    total, ref_losses = None, []
    for x, y in zip(xs, ys):
        r = orc.step(x, target=y)
        ref_losses.append(r["loss"])
        total = r["grads"] if total is None else jax.tree.map(jnp.add, total, r["grads"])
    np.testing.assert_allclose(np.asarray(losses), np.asarray(ref_losses), rtol=1e-4,
                               atol=1e-5)
    params = net.states(brainstate.ParamState)
    assert set(total) == set(params)
    for k in params:
        flat = [jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(t[k])])
                for t in (grads, total)]
        assert rel(*flat) < 1e-4, k



@needs_kernel
@pytest.mark.filterwarnings("ignore::brainscale.errors.NoTemporalCreditWarning")
@pytest.mark.parametrize("name,batch", [("alif", 2), ("gru_rh", 2)])
def test_bfloat16_traces_equal_the_pallas_kernels(name, batch):
    """``NativeBackend(trace_dtype='bfloat16')``: the kernel's traces are stored in bfloat16
    (the IR says so); per step the gradients equal the Pallas backend's bfloat16 kernel
    (interpret mode, the same rounding points), and per step and with ``chunk`` they stay
    within bfloat16 rounding of the float32 JAX backend."""
    from brainscale.backends.pallas import PallasBackend
    out = {}
    for tag, be in (("jax", "jax"), ("native", native.NativeBackend(trace_dtype="bfloat16")),
                    ("pallas", PallasBackend(trace_dtype="bfloat16", interpret=True))):
        net, x0 = models.make(name, batch=batch)
        learner = brainscale.DiagParamDimAlgorithm(net, backend=be).compile_graph(x0)
        xs, ys = sequence(x0, 7, seed=22)
        out[tag] = (learner, brainscale.online_gradients(learner, xs, ys, loss_fn),
                    brainscale.online_gradients(learner, xs, ys, loss_fn, chunk=3))
    ln = out["native"][0]
    kern = [t for t in ln.graph.traces if t.path == "native"]
    assert kern and all(a.storage == "bfloat16" for t in kern for a in t.arrays)
    assert "{storage=bf16}" in ln.ir()
    assert all(t.value.dtype == jnp.bfloat16 for t in ln._traces if t.value.ndim == 4)

    def err(ga, gb):
        return max(rel(a, b) for k in gb for a, b in zip(jax.tree.leaves(ga[k]),
                                                         jax.tree.leaves(gb[k])))
    (gn, lossn), (gp, lossp), (gj, lossj) = (out[t][1] for t in ("native", "pallas", "jax"))
    assert err(gn, gp) < 1e-5 and rel(lossn, lossp) < 1e-6       # per step
    assert err(gn, gj) < 1e-2 and rel(lossn, lossj) < 1e-5
    # chunk=3: the native traces are summed per window, so they are rounded to bfloat16 once
    # per window instead of every step (the Pallas rule runs one pass every step)
    gc, lossc = out["native"][2]
    assert err(gc, gn) < 1e-2 and err(gc, gj) < 1e-2 and rel(lossc, lossj) < 1e-5


def test_bad_trace_dtype_is_refused():
    net, x0 = models.make("alif", batch=2)
    with pytest.raises(PipelineError, match="trace_dtype must be 'float32' or 'bfloat16', "
                                            "got 'float16'"):
        brainscale.DiagParamDimAlgorithm(
            net, backend=native.NativeBackend(trace_dtype="float16")).compile_graph(x0)


@needs_kernel
@pytest.mark.parametrize("policy", ["param", "io"])
def test_end_schedule_runs_the_step_loop_once_over_the_sequence(policy, outer_calls):
    """``train_online`` with ``schedule='end'`` on a native learner: one window of the whole
    sequence through the step-owning loop (one-pass D-RTRL / outer-accumulate every step,
    nothing kept per step), the summed gradient applied once; equal to the JAX learner."""
    from brainscale import zoo
    kw = dict(policy=policy, schedule="end", **({"decay_or_rank": 0.9} if policy == "io" else {}))
    out = []
    for be in ("jax", native.NativeBackend(**ANY_SIZE)):
        net, x0 = models.make("alif", batch=2)
        out.append((net, zoo.RuleAlgorithm(net, backend=be, **kw).compile_graph(x0)))
    (net_j, lj), (net_n, ln) = out
    assert set(brainscale.update_schedule(ln).values()) == {"end"}
    assert {t.path for t in ln.graph.traces} == {"native"}
    train_both_equal(net_j, lj, net_n, ln, x0, seed=23)
    assert any(k[0] == "train-window" for k in ln._drivers)
    assert not any(k[0] == "train-window" for k in lj._drivers)
    assert bool(outer_calls) == (policy == "io")
