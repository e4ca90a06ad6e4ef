"""A normalisation between a trace op and the neurons (``absorb-normalization``).

Before: ``Linear → LayerNorm → neuron`` was rejected (``reduce_sum`` mixes neurons). Now the
parameter-free part of the normalisation is absorbed into the op:

* exact statistics (default): D-RTRL equals BPTT on a single layer without recurrent weights
  (layer statistics and batch statistics), and equals the dense oracle on a recurrent layer;
  ES-D-RTRL equals the same model written with the composite op by hand (which the oracle
  checks);
* constant statistics (``norm_stats='constant'``): the op keeps its compact layout and equals
  a hand-written op whose statistics are ``stop_gradient``-ed;
* what cannot be absorbed is still refused with the mixing error.
"""
from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from helpers import rel_err
from oracle import DenseOracle, bptt_grads

N_IN, N, T = 3, 5, 8


def layer_norm(y, eps=1e-5, stats_const=False):
    sg = jax.lax.stop_gradient if stats_const else (lambda v: v)
    m = sg(jnp.mean(y, -1, keepdims=True))
    v = sg(jnp.mean((y - jnp.mean(y, -1, keepdims=True)) ** 2, -1, keepdims=True))
    return (y - m) / jnp.sqrt(v + eps)


def var_norm(y, eps=1e-5):
    """LayerNorm with jnp.var (a jitted helper whose divisor is computed from literals)."""
    return (y - jnp.mean(y, -1, keepdims=True)) / jnp.sqrt(jnp.var(y, -1, keepdims=True) + eps)


def batch_norm(y, eps=1e-5):
    m = jnp.mean(y, 0, keepdims=True)
    return (y - m) / jnp.sqrt(jnp.mean((y - m) ** 2, 0, keepdims=True) + eps)


class LNMatMul(brainscale.ETraceOp):
    """The composite op written by hand: ``layer_norm(x @ W)``."""
    param_trace = "dense"

    def __init__(self, stats_const=False):
        self.stats_const = stats_const
        if stats_const:
            self.param_trace = "compact"
        super().__init__()

    def xw_to_y(self, x, w):
        return layer_norm(x @ w["weight"], stats_const=self.stats_const)

    def yw_to_w(self, y, w):
        return {"weight": w["weight"] * y[None, :]}


class Net(brainstate.nn.Module):
    """``z = 1.5 · norm(W · [x, (tanh V)]) + 0.2``, a 2-state neuron (V, a) driven by z."""

    def __init__(self, batch=0, recurrent=False, norm="layer", op=None):
        super().__init__()
        rng = np.random.RandomState(0)
        n_in = N_IN + (N if recurrent else 0)
        self.recurrent, self.norm = recurrent, norm
        self.w = brainscale.ETraceParam({"weight": jnp.asarray(rng.randn(n_in, N), jnp.float32)},
                                        op or brainscale.MatMulOp())
        self.hand_written = op is not None
        lead = (batch,) if batch else ()
        self.V = brainscale.ETraceState(jnp.asarray(rng.rand(*lead, N) * 0.5, jnp.float32))
        self.a = brainscale.ETraceState(jnp.zeros(lead + (N,), jnp.float32))

    def update(self, x):
        inp = jnp.concatenate([x, jnp.tanh(self.V.value)], -1) if self.recurrent else x
        y = self.w.execute(inp)
        if not self.hand_written:
            y = {"layer": layer_norm, "batch": batch_norm, "var": var_norm}[self.norm](y)
        z = 1.5 * y + 0.2
        v, a = self.V.value, self.a.value
        self.V.value = 0.9 * v - 0.2 * a + z
        self.a.value = 0.8 * a + 0.1 * jnp.tanh(v)
        return jnp.tanh(self.V.value)




def _seq(batch, seed=1):
    rng = np.random.RandomState(seed)
    lead = (batch,) if batch else ()
    return (jnp.asarray(rng.randn(T, *lead, N_IN), jnp.float32),
            jnp.asarray(rng.randn(T, *lead, N), jnp.float32))


def sq_loss(out, tg):
    return jnp.sum((out - tg) ** 2)


def test_without_absorption_the_model_is_refused():
    pipe = [p for p in brainscale.DEFAULT_PIPELINE if p != "absorb-normalization"]
    with pytest.raises(brainscale.UnsupportedModelError, match="reduce_sum"):
        brainscale.DiagParamDimAlgorithm(Net(), pipeline=pipe).compile_graph(jnp.ones(N_IN))


@pytest.mark.parametrize("norm,batch", [("layer", 0), ("layer", 2), ("var", 2), ("batch", 3)])
def test_exact_statistics_drtrl_equals_bptt_on_a_single_layer(norm, batch):
    xs, tgs = _seq(batch)
    learner = brainscale.DiagParamDimAlgorithm(Net(batch, norm=norm)).compile_graph(xs[0])
    (op,) = learner.graph.ops
    assert op.op_class == "MatMulOp+norm" and op.layout == "dense"
    assert dict(op.attrs)["stats"] == "exact" and "reduce_sum" in dict(op.attrs)["absorbed"]
    assert "class=MatMulOp+norm" in learner.ir()
    g, _ = brainscale.online_gradients(learner, xs, tgs, sq_loss)
    ref = bptt_grads(Net(batch, norm=norm), xs, sq_loss, targets=tgs)
    assert rel_err(g["w",], ref["w",]) < 1e-5


def _per_step(learner, net, xs, tgs):
    params = net.states(brainstate.ParamState)
    return [brainstate.transform.grad(lambda: sq_loss(learner(xs[t]), tgs[t]), params)()["w",]
            for t in range(T)]


@pytest.mark.parametrize("batch", [0, 2])
def test_exact_statistics_recurrent_drtrl_equals_the_oracle(batch):
    xs, tgs = _seq(batch)
    net = Net(batch, recurrent=True)
    learner = brainscale.DiagParamDimAlgorithm(net).compile_graph(xs[0])
    orc = DenseOracle(Net(batch, recurrent=True), xs[0], algorithm="param", loss_fn=sq_loss)
    mine = _per_step(learner, net, xs, tgs)
    for t in range(T):
        ref = orc.step(xs[t], target=tgs[t])["grads"]["w",]
        assert rel_err(mine[t], ref) < 1e-4, t


@pytest.mark.parametrize("algo", ["param", "io"])
@pytest.mark.parametrize("stats", ["exact", "constant"])
def test_absorbed_op_equals_the_hand_written_composite(algo, stats):
    """Absorbed == the same composite op written by hand == the oracle on the latter."""
    batch = 2
    xs, tgs = _seq(batch)

    def learner_of(net):
        kw = dict(norm_stats=stats)
        return (brainscale.DiagParamDimAlgorithm(net, **kw) if algo == "param"
                else brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9, **kw))
    net_a = Net(batch, recurrent=True)
    la = learner_of(net_a).compile_graph(xs[0])
    assert la.graph.ops[0].layout == ("dense" if stats == "exact" else "compact")
    assert f"stats={stats}" in la.ir()
    net_h = Net(batch, recurrent=True, op=LNMatMul(stats_const=stats == "constant"))
    lh = learner_of(net_h).compile_graph(xs[0])
    ga, gh = _per_step(la, net_a, xs, tgs), _per_step(lh, net_h, xs, tgs)
    orc = DenseOracle(Net(batch, recurrent=True, op=LNMatMul(stats_const=stats == "constant")),
                      xs[0], algorithm=algo, decay_or_rank=0.9 if algo == "io" else None,
                      loss_fn=sq_loss)
    for t in range(T):
        assert rel_err(ga[t], gh[t]) < 1e-5, t
        assert rel_err(gh[t], orc.step(xs[t], target=tgs[t])["grads"]["w",]) < 1e-4, t


def test_norm_stats_options_and_conflicts():
    net = Net()
    learner = brainscale.DiagParamDimAlgorithm(net, norm_stats="constant").compile_graph(
        jnp.ones(N_IN))
    assert learner.graph.stages[1] == "absorb-normalization{stats=constant}"
    with pytest.raises(brainscale.PipelineError, match="norm_stats must be one of"):
        brainscale.DiagParamDimAlgorithm(Net(), norm_stats="approx").compile_graph(jnp.ones(N_IN))
    pipe = ["absorb-normalization{stats=constant}", *brainscale.DEFAULT_PIPELINE[1:]]
    learner = brainscale.DiagParamDimAlgorithm(Net(), pipeline=pipe).compile_graph(jnp.ones(N_IN))
    assert dict(learner.graph.ops[0].attrs)["stats"] == "constant"
    with pytest.raises(brainscale.PipelineError, match="conflicts"):
        brainscale.DiagParamDimAlgorithm(Net(), pipeline=pipe, norm_stats="exact").compile_graph(
            jnp.ones(N_IN))
    with pytest.raises(brainscale.PipelineError, match="needs an 'absorb-normalization'"):
        brainscale.DiagParamDimAlgorithm(Net(), pipeline=list(brainscale.DEFAULT_PIPELINE[1:]),
                                         norm_stats="constant").compile_graph(jnp.ones(N_IN))


class Residual(Net):
    """``norm(y) + y``: a residual inside the absorbed region is part of the composite."""

    def update(self, x):
        y = self.w.execute(x)
        self.V.value = 0.9 * self.V.value + (layer_norm(y) + y)
        self.a.value = 0.8 * self.a.value + 0.1 * jnp.tanh(self.V.value)
        return jnp.tanh(self.V.value)


class TwoUses(Net):
    """``V`` is driven by ``norm(y)`` and ``a`` by ``y`` itself: ``y`` leaves the region."""

    def update(self, x):
        y = self.w.execute(x)
        self.V.value = 0.9 * self.V.value + layer_norm(y)
        self.a.value = 0.8 * self.a.value + y
        return jnp.tanh(self.V.value)


def test_residual_is_absorbed_and_exact():
    xs, tgs = _seq(0)
    learner = brainscale.DiagParamDimAlgorithm(Residual()).compile_graph(xs[0])
    assert "add" in dict(learner.graph.ops[0].attrs)["absorbed"]
    g, _ = brainscale.online_gradients(learner, xs, tgs, sq_loss)
    assert rel_err(g["w",], bptt_grads(Residual(), xs, sq_loss, targets=tgs)["w",]) < 1e-5


def test_what_cannot_be_absorbed_is_still_refused():
    with pytest.raises(brainscale.UnsupportedModelError, match="non-element-wise.*reduce_sum"):
        brainscale.DiagParamDimAlgorithm(TwoUses()).compile_graph(jnp.ones(N_IN))


class BroadcastDecay(brainstate.nn.Module):
    """An unbatched ElemWiseOp output broadcast explicitly to the batch (not a mixing)."""

    def __init__(self, batch=2):
        super().__init__()
        self.th = brainscale.ETraceParam(jnp.linspace(-1.0, 1.0, N), brainscale.ElemWiseOp(jax.nn.sigmoid))
        self.V = brainscale.ETraceState(jnp.full((batch, N), 0.3))

    def update(self, x):
        d = jnp.broadcast_to(self.th.execute(None), (x.shape[0], N))
        self.V.value = d * self.V.value + x
        return jnp.tanh(self.V.value)


def test_a_batch_broadcast_is_not_absorbed():
    """Before: the broadcast counted as mixing, was absorbed into a dense composite and the
    gradient came out B times too large."""
    rng = np.random.RandomState(0)
    xs = jnp.asarray(rng.randn(T, 2, N), jnp.float32)
    tgs = jnp.asarray(rng.randn(T, 2, N), jnp.float32)
    net = BroadcastDecay()
    learner = brainscale.DiagParamDimAlgorithm(net).compile_graph(xs[0])
    assert learner.graph.ops[0].op_class == "ElemWiseOp"
    orc = DenseOracle(BroadcastDecay(), xs[0], algorithm="param", loss_fn=sq_loss)
    params = net.states(brainstate.ParamState)
    for t in range(T):
        g = brainstate.transform.grad(lambda: sq_loss(learner(xs[t]), tgs[t]), params)()
        assert rel_err(g[("th",)], orc.step(xs[t], target=tgs[t])["grads"][("th",)]) < 1e-4


class ConvNormNet(brainstate.nn.Module):
    """``z = layer_norm(conv(x, K))`` over the channels, a 2-state neuron driven by z."""

    def __init__(self, batch):
        super().__init__()
        rng = np.random.RandomState(0)
        op = brainscale.ConvOp(jax.ShapeDtypeStruct((5, 2), jnp.float32))
        self.w = brainscale.ETraceParam(
            {"weight": jnp.asarray(rng.randn(3, 2, 4), jnp.float32),
             "bias": jnp.asarray(rng.randn(4), jnp.float32)}, op)
        lead = (batch,) if batch else ()
        self.V = brainscale.ETraceState(jnp.zeros(lead + (5, 4), jnp.float32))
        self.a = brainscale.ETraceState(jnp.zeros(lead + (5, 4), jnp.float32))

    def update(self, x):
        z = 1.5 * layer_norm(self.w.execute(x)) + 0.2
        self.V.value = 0.9 * self.V.value - 0.2 * self.a.value + z
        self.a.value = 0.8 * self.a.value + 0.1 * jnp.tanh(self.V.value)
        return jnp.tanh(self.V.value)


@pytest.mark.parametrize("stats", ["exact", "constant"])
def test_conv_then_layer_norm(stats):
    """A conv absorbed with a normalisation over its channels: exact statistics mix the
    channels (dense layout, D-RTRL == BPTT on this single layer); constant statistics keep
    the conv's channel layout (the base op's patches times ∂z/∂y), equal to the same graph
    with the trace forced to the dense layout by a user pass."""
    from brainscale.passes import DEFAULT_PIPELINE, function_pass, layout_trace
    import dataclasses

    @function_pass(f"test-conv-norm-dense-{stats}", requires={"trace-arrays"})
    def to_dense(graph, ctx):
        return graph.replace(traces=tuple(
            layout_trace(graph, dataclasses.replace(t, layout="dense")) if t.dim == "param"
            else t for t in graph.traces))
    batch = 2
    rng = np.random.RandomState(4)
    xs = jnp.asarray(rng.randn(T, batch, 5, 2), jnp.float32)
    tgs = jnp.asarray(rng.randn(T, batch, 5, 4), jnp.float32)
    net = ConvNormNet(batch)
    learner = brainscale.DiagParamDimAlgorithm(net, norm_stats=stats).compile_graph(xs[0])
    assert learner.graph.ops[0].layout == ("dense" if stats == "exact" else "channel")
    mine = _per_step(learner, net, xs, tgs)
    if stats == "exact":
        grads = jax.tree.map(lambda *a: sum(a), *mine)
        ref = bptt_grads(ConvNormNet(batch), xs, sq_loss, targets=tgs)
        assert rel_err(grads, ref["w",]) < 1e-5
        return
    net_d = ConvNormNet(batch)
    ld = brainscale.DiagParamDimAlgorithm(
        net_d, norm_stats=stats,
        pipeline=[f"absorb-normalization{{stats={stats}}}", *DEFAULT_PIPELINE[1:],
                  f"test-conv-norm-dense-{stats}"]).compile_graph(xs[0])
    assert ld.graph.traces[0].layout == "dense"
    dense = _per_step(ld, net_d, xs, tgs)
    for t in range(T):
        assert rel_err(mine[t], dense[t]) < 1e-5, t
