"""``online_gradients(..., chunk=K)``: the step-owning loop with windowed ES-D-RTRL gradients
equals the per-step loop (gradients, losses, traces, hidden states), for every algorithm and
for windows that do not divide T."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import models

ALGOS = {
    "io": lambda net: brainscale.DiagIODimAlgorithm(net, 0.9),
    "param": lambda net: brainscale.DiagParamDimAlgorithm(net),
    "hybrid": lambda net: brainscale.DiagHybridDimAlgorithm(net, 0.9),
}


def _real(a):
    """A packed pair of trace states (complex) as its two real parts."""
    a = jnp.asarray(a)
    return jnp.stack([a.real, a.imag], -1) if jnp.iscomplexobj(a) else a


def rel(a, b) -> float:
    a, b = jnp.asarray(_real(a), jnp.float32), jnp.asarray(_real(b), jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def loss_fn(out, y):
    return jnp.sum(jnp.tanh(jax.tree.leaves(out)[0]) * y)


def sequence(x0, T, seed=0):
    rng = np.random.RandomState(seed)
    xs = jnp.asarray(rng.randn(T, *np.shape(x0)).astype(np.float32))
    ys = jnp.asarray(rng.randn(T).astype(np.float32))
    return xs, ys


def hidden_values(net):
    return [np.asarray(s.value) for s in net.states(brainscale.ETraceState).values()]


@pytest.mark.parametrize("model,batch", [("lif_delta", 3), ("alif", 0), ("gru3", 2),
                                         ("sparse_rec", 0), ("conv_snn", 0)])
@pytest.mark.parametrize("algo", ["io", "param", "hybrid"])
def test_chunked_equals_per_step(model, batch, algo):
    T, K = 7, 3                    # two windows of 3 and a remainder of 1
    net_a, x0 = models.make(model, batch=batch)
    net_b, _ = models.make(model, batch=batch)
    la = ALGOS[algo](net_a).compile_graph(x0)
    lb = ALGOS[algo](net_b).compile_graph(x0)
    xs, ys = sequence(x0, T, seed=5)
    ga, la_loss = brainscale.online_gradients(la, xs, ys, loss_fn)
    gb, lb_loss = brainscale.online_gradients(lb, xs, ys, loss_fn, chunk=K)
    assert ga.keys() == gb.keys() and ga
    worst = 0.0
    for k in ga:
        for a, b in zip(jax.tree.leaves(ga[k]), jax.tree.leaves(gb[k])):
            assert a.shape == b.shape
            worst = max(worst, rel(b, a))
    assert worst < 1e-5, worst
    assert rel(lb_loss, la_loss) < 1e-5
    for a, b in zip(hidden_values(net_a), hidden_values(net_b)):
        assert rel(b, a) < 1e-5
    for ta, tb in zip(la._traces, lb._traces):
        assert rel(tb.value, ta.value) < 1e-5


@pytest.mark.parametrize("algo,model,K,split", [("io", "lif_delta", 4, 4),
                                                ("param", "gru_rh", 3, 5)])
def test_chunked_later_calls_continue_from_the_state(algo, model, K, split):
    """Two chunked calls equal one per-step call over the concatenated sequence: the states
    and traces a call leaves (the windowed D-RTRL traces included) are where the next starts."""
    net_a, x0 = models.make(model, batch=2)
    net_b, _ = models.make(model, batch=2)
    la = ALGOS[algo](net_a).compile_graph(x0)
    lb = ALGOS[algo](net_b).compile_graph(x0)
    xs, ys = sequence(x0, 12, seed=1)
    ga, _ = brainscale.online_gradients(la, xs, ys, loss_fn)
    g1, _ = brainscale.online_gradients(lb, xs[:split], ys[:split], loss_fn, chunk=K)
    g2, _ = brainscale.online_gradients(lb, xs[split:], ys[split:], loss_fn, chunk=K,
                                        reset=False)
    for k in ga:
        for a, b1, b2 in zip(jax.tree.leaves(ga[k]), jax.tree.leaves(g1[k]),
                             jax.tree.leaves(g2[k])):
            assert rel(b1 + b2, a) < 1e-5


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_chunk_must_be_a_positive_int(bad):
    net, x0 = models.make("lif_delta")
    learner = brainscale.DiagIODimAlgorithm(net, 0.9).compile_graph(x0)
    xs, ys = sequence(x0, 4)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        brainscale.online_gradients(learner, xs, ys, loss_fn, chunk=bad)


@pytest.mark.parametrize("chunk", [1, 3])
def test_online_gradients_under_the_callers_jit(chunk):
    """At top level, then inside the caller's own jit (examples/long_delay.py does this),
    then at top level again: the same gradients. The top-level loop is compiled with XLA
    options that JAX refuses on a nested jit, so the nested call must not reuse it."""
    import brainstate
    net, x0 = models.make("alif", batch=2)
    lrn = brainscale.DiagParamDimAlgorithm(net).compile_graph(x0)
    xs, ys = sequence(x0, 7, seed=2)
    runs = [brainscale.online_gradients(lrn, xs, ys, loss_fn, chunk=chunk)[0]]
    nested = brainstate.transform.jit(
        lambda a, b: brainscale.online_gradients(lrn, a, b, loss_fn, chunk=chunk)[0])
    runs.append(nested(xs, ys))
    runs.append(brainscale.online_gradients(lrn, xs, ys, loss_fn, chunk=chunk)[0])
    for g in runs[1:]:
        for k in runs[0]:
            for a, b in zip(jax.tree.leaves(runs[0][k]), jax.tree.leaves(g[k])):
                assert rel(b, a) < 1e-6


def test_online_loops_take_xla_products_at_small_batches():
    """The loops' compiler options switch YNNPACK's matrix-product fusions off when every dense
    op of the step has at most YNN_MAX_ROWS rows (the batch), and only then: an ALIF net of
    batch 2 gets the option, one of batch 32 does not, a conv net (a kernel the measurement did
    not cover) does not; inside the caller's jit there are no options at all. The option
    changes which kernels multiply, not what: the gradients equal the loop compiled without
    any option."""
    from brainscale.backends import online_driver as od
    small, x0 = models.make("alif", batch=2)
    lrn = brainscale.DiagParamDimAlgorithm(small).compile_graph(x0)
    assert od.dense_rows(lrn.graph) == 2
    opts = od.driver_compiler_options(lrn.graph)
    assert opts["xla_cpu_copy_insertion_use_region_analysis"] is True
    if od._ynn_flag_known():
        assert opts["xla_cpu_experimental_ynn_fusion_type"] == ""
    big, xb = models.make("alif", batch=od.YNN_MAX_ROWS * 2)
    lb = brainscale.DiagParamDimAlgorithm(big).compile_graph(xb)
    assert od.dense_rows(lb.graph) == od.YNN_MAX_ROWS * 2
    assert "xla_cpu_experimental_ynn_fusion_type" not in od.driver_compiler_options(lb.graph)
    conv, xc = models.make("conv_snn", batch=2)
    lc = brainscale.DiagParamDimAlgorithm(conv).compile_graph(xc)
    assert od.dense_rows(lc.graph) is None
    assert "xla_cpu_experimental_ynn_fusion_type" not in od.driver_compiler_options(lc.graph)
    seen = []
    jax.jit(lambda v: (seen.append(od.driver_compiler_options(lrn.graph)), v)[1])(1.0)
    assert seen == [None]
    assert od.options_key(opts) != od.options_key(od.driver_compiler_options(lb.graph))
    # the same gradients as the loop compiled without options
    xs, ys = sequence(x0, 6, seed=4)
    twin, _ = models.make("alif", batch=2)
    lt = brainscale.DiagParamDimAlgorithm(twin).compile_graph(x0)
    g_opt, l_opt = brainscale.online_gradients(lrn, xs, ys, loss_fn)
    g_plain, l_plain = brainscale.online_gradients(lt, xs, ys, loss_fn, jit=False)
    assert rel(l_opt, l_plain) < 1e-6
    for k in g_plain:
        for a, b in zip(jax.tree.leaves(g_opt[k]), jax.tree.leaves(g_plain[k])):
            assert rel(a, b) < 1e-5, k
