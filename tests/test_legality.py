"""The compact param-dim layout is legal only when proven, never when probed on current values.

Issue items covered (each test failed before the fix, as its docstring says):

* a custom ``ETraceOp`` that defines only ``xw_to_y`` gets the exact dense layout, not a
  default ``yw_to_w`` assuming an ``(in, out)`` weight;
* a ``weight_fn`` / ``ElemWiseOp.fn`` that is not element-wise is found from its jaxpr for
  every weight value: a normalisation compiled while the weight is zero and a max-norm clip
  compiled below its cap get the dense layout, and D-RTRL stays equal to BPTT on a single
  non-recurrent layer after training moves the weights;
* element-wise functions keep the compact layout (no regression).
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

RTOL = 1e-4




# ---------------------------------------------------------------------------------------
# 1. a custom op without yw_to_w
# ---------------------------------------------------------------------------------------

class TransposedMatMul(brainscale.ETraceOp):
    """``y = x @ W.T``: the seed tutorial's way (only ``xw_to_y``), weight ``(out, in)``."""

    def xw_to_y(self, x, w):
        return x @ w["weight"].T


class RecLayer(brainstate.nn.Module):
    """``V = 0.9 V + op(concat(x, tanh V))``; out = tanh V (recurrent, so D-RTRL is the
    diagonal approximation and is checked against the dense oracle)."""

    def __init__(self, op, w, n, batch=0):
        super().__init__()
        self.w = brainscale.ETraceParam({"weight": jnp.asarray(w, jnp.float32)}, op)
        self.V = brainscale.ETraceState(jnp.zeros((batch, n) if batch else (n,), jnp.float32))

    def update(self, x):
        inp = jnp.concatenate([x, jnp.tanh(self.V.value)], axis=-1)
        self.V.value = 0.9 * self.V.value + self.w.execute(inp)
        return jnp.tanh(self.V.value)


def _oracle_run(make, x_shape, algo, T=8, seed=0):
    """Per-step gradients of learner and DenseOracle; returns the worst relative error."""
    net_a, net_b = make(), make()
    rng = np.random.RandomState(seed)
    xs = jnp.asarray(rng.randn(T, *x_shape), jnp.float32)
    learner = (brainscale.DiagParamDimAlgorithm(net_a) if algo == "param"
               else brainscale.DiagIODimAlgorithm(net_a, decay_or_rank=0.9))
    learner.compile_graph(xs[0])
    loss = lambda out, tg: jnp.sum(out * tg)  # noqa: E731
    orc = DenseOracle(net_b, xs[0], algorithm=algo, decay_or_rank=0.9 if algo == "io" else None,
                      loss_fn=loss)
    params = net_a.states(brainstate.ParamState)
    worst = 0.0
    for t in range(T):
        tg = jnp.asarray(rng.randn(*np.shape(net_a.V.value)), jnp.float32)
        g = brainstate.transform.grad(lambda: loss(learner(xs[t]), tg), params)()
        ref = orc.step(xs[t], target=tg)
        for k in g:
            worst = max(worst, rel_err(g[k], ref["grads"][k]))
    return learner, worst


@pytest.mark.parametrize("n_in,n", [(4, 4), (3, 5)], ids=["square", "non-square"])
@pytest.mark.parametrize("batch", [0, 2])
def test_custom_op_without_yw_to_w_gets_the_exact_dense_layout(n_in, n, batch):
    """Before: the default yw_to_w broadcast y along the last axis of the (out, in) weight;
    square W gave D-RTRL gradients ~100 % off, non-square W a broadcasting TypeError."""
    rng = np.random.RandomState(1)
    w = rng.randn(n, n_in + n) * 0.5

    def make():
        return RecLayer(TransposedMatMul(), w, n, batch)
    x_shape = ((batch,) if batch else ()) + (n_in,)
    learner, err = _oracle_run(make, x_shape, "param")
    (op,) = learner.graph.ops
    assert op.layout == "dense" and "defines no yw_to_w" in op.layout_reason
    assert "layout=dense" in learner.ir()
    assert err < RTOL, err
    _, err_io = _oracle_run(make, x_shape, "io")
    assert err_io < RTOL, err_io


def test_custom_op_with_its_own_yw_to_w_stays_compact():
    class Own(TransposedMatMul):
        def yw_to_w(self, y, w):
            return {"weight": w["weight"] * y[:, None]}
    rng = np.random.RandomState(2)
    w = rng.randn(4, 7) * 0.5
    learner, err = _oracle_run(lambda: RecLayer(Own(), w, 4), (3,), "param")
    assert learner.graph.ops[0].layout == "compact"
    assert err < RTOL, err


# ---------------------------------------------------------------------------------------
# 2. weight functions proven element-wise on their jaxpr
# ---------------------------------------------------------------------------------------

def _normalise(w):
    return 2.0 * w / (jnp.sqrt(jnp.sum(w * w)) + 1e-3)


def _max_norm_clip(w, cap=1.0):
    norm = jnp.sqrt(jnp.sum(w * w, axis=0, keepdims=True))
    return w * jnp.minimum(1.0, cap / (norm + 1e-12))


class SingleLayer(brainstate.nn.Module):
    """input → MatMulOp(weight_fn) → a leaky 2-state neuron, no recurrent weight: D-RTRL
    equals BPTT exactly here (algorithms.md section 3) when its trace is exact."""

    def __init__(self, w, weight_fn, n):
        super().__init__()
        self.w = brainscale.ETraceParam({"weight": jnp.asarray(w, jnp.float32)},
                                        brainscale.MatMulOp(weight_fn=weight_fn))
        self.V = brainscale.ETraceState(jnp.zeros(n, jnp.float32))
        self.a = brainscale.ETraceState(jnp.zeros(n, jnp.float32))

    def update(self, x):
        y = self.w.execute(x)
        v, a = self.V.value, self.a.value
        self.V.value = 0.9 * v - 0.2 * a + y
        self.a.value = 0.8 * a + 0.1 * jnp.tanh(v)
        return jnp.tanh(self.V.value)


@pytest.mark.parametrize("fn,w0,moved", [
    (_normalise, "zeros", "randn"),           # harmless while W = 0 (the gradient is 2/eps·I)
    (_max_norm_clip, "small", "large"),       # harmless below the cap
], ids=["normalise-at-zero", "max-norm-below-cap"])
def test_non_elementwise_weight_fn_is_found_for_every_weight_value(fn, w0, moved):
    """Before: the JVP probe at the compile-time weights saw an element-wise map and chose the
    compact layout; after training moved the weights D-RTRL was 50-70 % off BPTT."""
    n_in, n, T = 3, 4, 10
    rng = np.random.RandomState(3)
    start = {"zeros": np.zeros((n_in, n)), "small": 0.01 * rng.randn(n_in, n)}[w0]
    net = SingleLayer(start, fn, n)
    learner = brainscale.DiagParamDimAlgorithm(net)
    xs = jnp.asarray(rng.randn(T, n_in), jnp.float32)
    learner.compile_graph(xs[0])
    (op,) = learner.graph.ops
    assert op.layout == "dense", op
    assert "not element-wise" in op.layout_reason
    # training moves the weights out of the harmless region
    later = {"randn": rng.randn(n_in, n), "large": 3.0 * rng.randn(n_in, n)}[moved]
    net.w.value = {"weight": jnp.asarray(later, jnp.float32)}
    loss = lambda out, tg: jnp.sum((out - tg) ** 2)  # noqa: E731
    tgs = jnp.asarray(rng.randn(T, n), jnp.float32)
    g, _ = brainscale.online_gradients(learner, xs, tgs, loss)
    ref_net = SingleLayer(later, fn, n)
    ref = bptt_grads(ref_net, xs, loss, targets=tgs)
    assert rel_err(g["w",], ref["w",]) < 1e-4


@pytest.mark.parametrize("fn", [jnp.abs, jnp.tanh, lambda w: 2 * w ** 3,
                                lambda w: jnp.where(w > 0, w, 0.1 * w)],
                         ids=["abs", "tanh", "cube", "leaky"])
def test_elementwise_weight_fn_keeps_the_compact_layout(fn):
    net = SingleLayer(np.zeros((3, 4)), fn, 4)
    learner = brainscale.DiagParamDimAlgorithm(net).compile_graph(jnp.ones(3))
    assert learner.graph.ops[0].layout == "compact", learner.graph.ops[0].layout_reason


class ElemDecay(brainstate.nn.Module):
    def __init__(self, fn, theta):
        super().__init__()
        self.th = brainscale.ETraceParam(jnp.asarray(theta, jnp.float32), brainscale.ElemWiseOp(fn))
        self.V = brainscale.ETraceState(jnp.zeros(4, jnp.float32))

    def update(self, x):
        self.V.value = self.th.execute(None) * self.V.value + x
        return self.V.value


def test_elemwise_op_fn_proven_not_probed():
    """``fn(θ) = θ / (1 + Σθ²)`` compiled at θ = 0 looks element-wise to a JVP there."""
    learner = brainscale.DiagParamDimAlgorithm(
        ElemDecay(lambda t: t / (1.0 + jnp.sum(t * t)), np.zeros(4))).compile_graph(jnp.ones(4))
    assert learner.graph.ops[0].layout == "dense"
    learner = brainscale.DiagParamDimAlgorithm(
        ElemDecay(jax.nn.sigmoid, np.zeros(4))).compile_graph(jnp.ones(4))
    assert learner.graph.ops[0].layout == "compact"


def test_elementwise_error_names_the_equation():
    from brainscale.passes.rules import elementwise_error
    why = elementwise_error(_normalise, jnp.zeros((3, 4)), "MatMulOp weight_fn")
    assert why is not None and "MatMulOp weight_fn is not element-wise" in why
    assert "reduce_sum" in why
    assert elementwise_error(jnp.tanh, jnp.zeros((3, 4)), "f") is None
    assert "changes the shape" in elementwise_error(lambda w: w.T, jnp.zeros((3, 4)), "f")


# ---------------------------------------------------------------------------------------
# the channel layout of a custom op
# ---------------------------------------------------------------------------------------

class HandConv1d(brainscale.ETraceOp):
    """A 'VALID' 1-D convolution written by hand, ``y[l, c] = Σ_{k,i} x[l+k, i] W[k, i, c]``,
    declaring its channel axes: the channel layout with the default (forward-mode)
    ``channel_jacobian``."""
    param_trace = "channel"
    x_ndim = 2

    def __init__(self, axes=None):
        self.axes = axes
        super().__init__()

    def xw_to_y(self, x, w):
        W = w["weight"]
        L = x.shape[-2] - W.shape[0] + 1
        return sum(jnp.einsum("...li,ic->...lc", x[..., k:k + L, :], W[k])
                   for k in range(W.shape[0])) + w["bias"]

    def channel_axes(self, w):
        return self.axes if self.axes is not None else (1, (0, 2))


class ConvLayer(brainstate.nn.Module):
    def __init__(self, op, batch):
        super().__init__()
        rng = np.random.RandomState(2)
        self.w = brainscale.ETraceParam({"weight": jnp.asarray(rng.randn(3, 2, 4), jnp.float32),
                                         "bias": jnp.asarray(rng.randn(4), jnp.float32)}, op)
        lead = (batch,) if batch else ()
        self.V = brainscale.ETraceState(jnp.zeros(lead + (5, 4), jnp.float32))
        self.a = brainscale.ETraceState(jnp.zeros(lead + (5, 4), jnp.float32))

    def update(self, x):
        y = self.w.execute(x)
        self.V.value = 0.9 * self.V.value - 0.2 * self.a.value + y
        self.a.value = 0.8 * self.a.value + 0.1 * jnp.tanh(self.V.value)
        return jnp.tanh(self.V.value)


@pytest.mark.parametrize("batch", [0, 2])
def test_custom_op_declaring_channel_axes_gets_the_channel_layout(batch):
    """D-RTRL with the channel layout of a custom op (the generic forward-mode channel
    Jacobian) equals BPTT on a single non-recurrent layer."""
    rng = np.random.RandomState(3)
    lead = (batch,) if batch else ()
    xs = jnp.asarray(rng.randn(6, *lead, 7, 2), jnp.float32)
    learner = brainscale.DiagParamDimAlgorithm(ConvLayer(HandConv1d(), batch))
    learner.compile_graph(xs[0])
    (op,) = learner.graph.ops
    assert (op.layout, op.channel_axis, op.param_channel_axes) == ("channel", 1, (0, 2))
    grads, _ = brainscale.online_gradients(learner, xs, jnp.zeros((6, *lead, 5, 4)),
                                           lambda o, t: jnp.sum(o * o))
    ref = bptt_grads(ConvLayer(HandConv1d(), batch), xs, lambda o: jnp.sum(o * o))
    assert rel_err(grads[("w",)], ref[("w",)]) < 1e-5


def test_custom_op_with_channel_axes_that_do_not_fit_gets_the_dense_layout():
    learner = brainscale.DiagParamDimAlgorithm(ConvLayer(HandConv1d(axes=(1, (0, 5))), 0))
    learner.compile_graph(jnp.zeros((7, 2)))
    (op,) = learner.graph.ops
    assert op.layout == "dense" and "leaf axis 5 is out of range" in op.layout_reason
    assert op.channel_axis is None


def test_custom_op_with_channel_axes_of_the_wrong_size_gets_the_dense_layout():
    learner = brainscale.DiagParamDimAlgorithm(ConvLayer(HandConv1d(axes=(0, (0, 2))), 0))
    learner.compile_graph(jnp.zeros((7, 2)))
    (op,) = learner.graph.ops
    assert op.layout == "dense" and "a leaf of shape (4,) has 4 entries on axis 0, the output 5 channels" in \
        op.layout_reason


def test_a_pass_that_moves_the_channel_axes_is_refused_by_the_backend():
    """The IR's channel axes lay out the arrays; the op's channel Jacobian slices along the
    axes the op declares. A user pass that changes them (to axes of the right size, which the
    verifier accepts) gets a BackendError naming both, not a wrongly sliced trace."""
    import dataclasses
    from brainscale.passes import DEFAULT_PIPELINE, function_pass, layout_trace

    @function_pass("test-swap-channel-axes", requires={"trace-arrays"})
    def swap(graph, ctx):
        ops = tuple(dataclasses.replace(o, param_channel_axes=(0, 1)) if o.layout == "channel"
                    else o for o in graph.ops)
        g = graph.replace(ops=ops)
        return g.replace(traces=tuple(layout_trace(g, t) for t in g.traces))

    net = ConvLayer(HandConv1d(), 0)
    rng = np.random.RandomState(5)
    net.w.value = {"weight": jnp.asarray(rng.randn(3, 4, 4), jnp.float32),
                   "bias": jnp.asarray(rng.randn(4), jnp.float32)}
    learner = brainscale.DiagParamDimAlgorithm(
        net, pipeline=[*DEFAULT_PIPELINE, "test-swap-channel-axes"])
    learner.compile_graph(jnp.zeros((7, 4)))
    assert "param_channel_axes=[0,1]" in learner.ir()
    with pytest.raises(brainscale.BackendError, match=r"the IR gives HandConv1d channel_axis=1, "
                                                      r"param_channel_axes=\[0, 1\], but the op "
                                                      r"declares \(1, \(0, 2\)\)"):
        learner(jnp.zeros((7, 4)))
