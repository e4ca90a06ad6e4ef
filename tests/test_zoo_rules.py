"""e-prop, OSTL, three-factor and DNI against literal implementations of their equations.

* ``EPropAlgorithm`` on Bellec et al. (2020)'s recurrent LIF and adaptive-LIF networks
  (reset with a stopped gradient, piecewise-linear pseudo-derivative ψ, a linear readout):
  the gradient equals ``Σ_t L^t_j e^t_ji`` with the eligibility vectors of the paper's
  Methods (LIF: ``ε ← α ε + z_pre``; ALIF: ``ε_v ← α ε_v + z_pre``,
  ``ε_a ← ψ ε_v + (ρ − ψβ) ε_a``, ``e = ψ(ε_v − β ε_a)``) and ``L = B (y − y*)``, with
  ``B = W_outᵀ`` (symmetric) or the learner's fixed random feedback weights; with the κ
  filter, the filtered eligibility vector ``ē ← κ ē + ε`` (docs/rules.md).
* ``OSTLAlgorithm``: with the recurrent term, equal to BPTT on a single recurrent layer
  (Bohnstingl et al.: gradient-equivalent for shallow networks) and, on two layers, equal to
  the literal per-layer traces ``E_l ← J_ll E_l + ∂s_l/∂θ_l`` times the spatial signal
  ``∂L^t/∂s_l^t``; without it, equal to BPTT on a feed-forward SNN.
* ``ThreeFactorAlgorithm``: ``Σ_t m^t · E^t`` with the dense D-RTRL trace of the oracle.
* ``DNIAlgorithm``: ``(δ + ĝ(h^t)) · E^t`` and the synthetic module's regression gradient on
  its bootstrapped target ``∂(L^t + ĝ(h^t)·h^t)/∂h^{t-1}``, written out on a leaky RNN.
"""
from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dataclasses

import brainscale
from brainscale import zoo
from brainscale.passes import DEFAULT_PIPELINE, function_pass, layout_trace

import models
from oracle import DenseOracle, bptt_grads
from test_online_oracle import assert_rel_close

ALPHA, RHO, BETA, V_TH, GAMMA = 0.8, 0.9, 0.5, 1.0, 0.3
N_IN, N_REC, N_OUT = 3, 6, 2


def mse(out, target):
    return 0.5 * jnp.sum((out - target) ** 2)


@jax.custom_jvp
def spike(x):
    """Heaviside of the scaled voltage, with Bellec's pseudo-derivative γ·max(0, 1−|x|)."""
    return (x > 0).astype(x.dtype)


@spike.defjvp
def _spike_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return spike(x), GAMMA * jnp.maximum(0.0, 1.0 - jnp.abs(x)) * dx


def _shape(batch, *s):
    return ((batch,) if batch else ()) + s


class BellecNet(brainstate.nn.Module):
    """Bellec et al. (2020), Methods: LIF (``adaptive=False``) or ALIF neurons, input and
    recurrent weights, a linear readout of the spikes.

    ::

        a^t = ρ a^{t-1} + z^{t-1}                                  (ALIF only)
        v^t = α v^{t-1} + W_in x^t + W_rec z^{t-1} − sg(z^{t-1}) v_th
        z^t = H((v^t − v_th − β a^t) / v_th),   y^t = W_out z^t + b
    """

    def __init__(self, batch=0, seed=0, adaptive=False):
        super().__init__()
        rng = np.random.RandomState(seed)
        f = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        self.w_in = brainscale.ETraceParam({"weight": f(rng.randn(N_IN, N_REC) * 1.5)},
                                           brainscale.MatMulOp())
        self.w_rec = brainscale.ETraceParam({"weight": f(rng.randn(N_REC, N_REC) * 0.8)},
                                            brainscale.MatMulOp())
        self.w_out = brainscale.ETraceParam({"weight": f(rng.randn(N_REC, N_OUT)),
                                             "bias": f(rng.randn(N_OUT) * 0.1)},
                                            brainscale.MatMulOp())
        self.v = brainscale.ETraceState(f(rng.rand(*_shape(batch, N_REC)) * 1.5))
        self.adaptive = adaptive
        if adaptive:
            self.a = brainscale.ETraceState(f(rng.rand(*_shape(batch, N_REC)) * 0.5))

    def thr(self, a):
        return V_TH + BETA * a if self.adaptive else V_TH

    def update(self, x):
        a_prev = self.a.value if self.adaptive else 0.0
        z_prev = spike((self.v.value - self.thr(a_prev)) / V_TH)
        v = ALPHA * self.v.value + self.w_in.execute(x) + self.w_rec.execute(z_prev) \
            - jax.lax.stop_gradient(z_prev) * V_TH
        if self.adaptive:
            a = RHO * a_prev + z_prev
            self.a.value = a
        else:
            a = 0.0
        self.v.value = v
        return self.w_out.execute(spike((v - self.thr(a)) / V_TH))


def eprop_reference(net_ref, xs, ys, B=None, kappa=0.0, kappa_at="output", v_loss=False):
    """Bellec et al. (2020)'s e-prop, written out (no autodiff): the summed weight gradient.
    With ``kappa``: the paper's filtered eligibility trace ``ē ← κ ē + e``, ``e = ψ ε``
    (``kappa_at='output'``), or the filtered eligibility vector ``ē ← κ ē + ε`` read as
    ``ψ ē`` (``'state'``, braintrace's EProp). ``v_loss``: the loss also adds ``Σ v^t``,
    whose gradient reaches the weights through ``v``'s own eligibility vector ``ε_v``."""
    W_in = np.asarray(net_ref.w_in.value["weight"], np.float64)
    W_rec = np.asarray(net_ref.w_rec.value["weight"], np.float64)
    W_out = np.asarray(net_ref.w_out.value["weight"], np.float64)
    b_out = np.asarray(net_ref.w_out.value["bias"], np.float64)
    B = W_out if B is None else np.asarray(B, np.float64)          # (N_REC, N_OUT)
    v = np.asarray(net_ref.v.value, np.float64)
    a = np.asarray(net_ref.a.value, np.float64) if net_ref.adaptive else np.zeros_like(v)
    thr = lambda a: V_TH + BETA * a if net_ref.adaptive else V_TH + 0 * a  # noqa: E731
    psi_of = lambda v, a: GAMMA / V_TH * np.maximum(0, 1 - np.abs((v - thr(a)) / V_TH))  # noqa: E731
    z = ((v - thr(a)) / V_TH > 0).astype(np.float64)
    psi = psi_of(v, a)
    # eligibility vectors per (presynaptic input, postsynaptic neuron): (..., n_pre, N_REC)
    ev = {"in": 0., "rec": 0.}
    ea = {"in": 0., "rec": 0.}
    bar = {"in": 0., "rec": 0.}
    g = {"in": 0., "rec": 0., "out": 0., "b": 0.}
    for x, y_star in zip(np.asarray(xs, np.float64), np.asarray(ys, np.float64)):
        pre = {"in": x, "rec": z}
        a_new = RHO * a + z
        v = ALPHA * v + x @ W_in + z @ W_rec - z * V_TH
        for k in ev:                                        # ε^t from ψ^{t-1} (old state)
            ev_old = ev[k]
            ev[k] = ALPHA * ev_old + pre[k][..., :, None]
            if net_ref.adaptive:
                ea[k] = psi[..., None, :] * ev_old + (RHO - psi[..., None, :] * BETA) * ea[k]
        a = a_new
        psi = psi_of(v, a)
        z = ((v - thr(a)) / V_TH > 0).astype(np.float64)
        y = z @ W_out + b_out
        err = y - y_star
        L = err @ B.T                                       # learning signal (…, N_REC)
        for k in ev:
            vec = ev[k] - BETA * ea[k] if net_ref.adaptive else ev[k]
            if kappa and kappa_at == "output":      # the paper: F_κ(ψ ε)
                bar[k] = kappa * bar[k] + psi[..., None, :] * vec
                e = bar[k]
            elif kappa:   # the filtered eligibility vector (docs/rules.md)
                bar[k] = kappa * bar[k] + vec
                e = psi[..., None, :] * bar[k]
            else:
                e = psi[..., None, :] * (ev[k] - BETA * ea[k] if net_ref.adaptive else ev[k])
            g[k] = g[k] + np.sum((L[..., None, :] * e).reshape(-1, *e.shape[-2:]), axis=0)
            if v_loss:
                g[k] = g[k] + np.sum(np.broadcast_to(ev[k], e.shape).reshape(-1, *e.shape[-2:]),
                                     axis=0)
        g["out"] = g["out"] + z.reshape(-1, N_REC).T @ err.reshape(-1, N_OUT)
        g["b"] = g["b"] + err.reshape(-1, N_OUT).sum(0)
    return g


def _data(batch, T, seed=1):
    rng = np.random.RandomState(seed)
    xs = jnp.asarray(rng.randn(T, *_shape(batch, N_IN)) * 1.5, jnp.float32)
    ys = jnp.asarray(rng.randn(T, *_shape(batch, N_OUT)), jnp.float32)
    return xs, ys


# every (neuron, feedback, filter) once, batched and unbatched in turn
EPROP = [(adaptive, fb, kappa, at, (i + adaptive) % 2 * 2) for adaptive in (False, True)
         for i, (fb, kappa, at) in enumerate((("symmetric", 0.0, "output"),
                                              ("random", 0.0, "output"),
                                              ("symmetric", 0.6, "output"),
                                              ("random", 0.6, "output"),
                                              ("symmetric", 0.6, "state")))]


@pytest.mark.parametrize("adaptive,feedback,kappa,kappa_at,batch", EPROP,
                         ids=[f"{'alif' if a else 'lif'}-{f}-k{k}{'' if not k else '-' + at}-b{b}"
                              for a, f, k, at, b in EPROP])
def test_eprop_equals_bellec_equations(adaptive, feedback, kappa, kappa_at, batch):
    T = 15
    net, net_ref = BellecNet(batch, adaptive=adaptive), BellecNet(batch, adaptive=adaptive)
    xs, ys = _data(batch, T)
    learner = zoo.EPropAlgorithm(net, feedback=feedback, kappa=kappa, kappa_at=kappa_at,
                                 feedback_seed=3)
    learner.compile_graph(xs[0])
    axes = {t.signal for t in learner.graph.traces if t.dim != "none"}
    assert axes == {feedback}
    filters = {t.filter for t in learner.graph.traces if t.dim != "none"}
    assert filters == {"none" if not kappa else "kappa_out" if kappa_at == "output" else "kappa"}
    B = None
    if feedback == "random":
        fbw = learner.feedback_weights()
        out_op = next(o.name for o in learner.graph.ops if o.param == "w_out")
        B = fbw[out_op][1]                  # leaves in pytree order: bias, weight
        assert np.shape(B) == (N_REC, N_OUT)
        assert not np.allclose(B, net.w_out.value["weight"])
    grads, _ = brainscale.online_gradients(learner, xs, ys, mse)
    ref = eprop_reference(net_ref, xs, ys, B=B, kappa=kappa, kappa_at=kappa_at)
    assert float(np.abs(ref["rec"]).max()) > 1e-3          # the recurrent weights learn
    assert_rel_close(grads[("w_in",)]["weight"], ref["in"], "W_in", rtol=1e-5)
    assert_rel_close(grads[("w_rec",)]["weight"], ref["rec"], "W_rec", rtol=1e-5)
    assert_rel_close(grads[("w_out",)]["weight"], ref["out"], "W_out", rtol=1e-5)
    assert_rel_close(grads[("w_out",)]["bias"], ref["b"], "b_out", rtol=1e-5)


def _relayout(layout):
    def run(graph, ctx):
        out = [layout_trace(graph, dataclasses.replace(t, layout=layout))
               if t.dim == "param" else t for t in graph.traces]
        return graph.replace(traces=tuple(out))
    return run


_EPROP_DENSE = function_pass("test-eprop-to-dense", requires={"trace-arrays"})(_relayout("dense"))


@pytest.mark.parametrize("adaptive", [False, True])
def test_eprop_output_filter_is_proven_printed_and_runs_dense(adaptive):
    """The output z is proven on the structure (the spike of the new states), printed on the
    group, and the dense per-neuron layout computes the paper's gradient too."""
    xs, ys = _data(2, 12)
    ref = eprop_reference(BellecNet(2, adaptive=adaptive), xs, ys, kappa=0.7)
    learner = zoo.EPropAlgorithm(BellecNet(2, adaptive=adaptive), kappa=0.7,
                                 pipeline=[*DEFAULT_PIPELINE, "test-eprop-to-dense"])
    learner.compile_graph(xs[0])
    g = learner.graph
    grp = g.groups[0]
    z = g.value_by_name[grp.output]
    jaxpr = g.info.jaxpr.jaxpr
    assert jaxpr.eqns[z.eqn].primitive.name.startswith("custom_jvp")      # the spike
    text = learner.ir()
    assert f"output={grp.output}" in text and f"at={grp.output}" in text and "layout=dense" in text
    grads, _ = brainscale.online_gradients(learner, xs, ys, mse)
    assert_rel_close(grads[("w_rec",)]["weight"], ref["rec"], "W_rec", rtol=1e-5)
    assert_rel_close(grads[("w_in",)]["weight"], ref["in"], "W_in", rtol=1e-5)


@pytest.mark.parametrize("adaptive", [False, True])
def test_eprop_output_filter_with_a_loss_on_the_states(adaptive):
    """A loss that reads the new membrane potential itself adds its D-RTRL term ∂L/∂v · ε_v
    beside the paper's L · ē (the learning signal at z does not carry it)."""
    xs, ys = _data(2, 10)
    net = BellecNet(2, adaptive=adaptive)
    learner = zoo.EPropAlgorithm(net, kappa=0.6).compile_graph(xs[0])
    params = net.states(brainstate.ParamState)

    @brainstate.transform.jit
    def step(x, y):
        return brainstate.transform.grad(lambda: mse(learner(x), y) + jnp.sum(net.v.value),
                                         params)()
    acc = None
    for x, y in zip(xs, ys):
        g = step(x, y)
        acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
    ref = eprop_reference(BellecNet(2, adaptive=adaptive), xs, ys, kappa=0.6, v_loss=True)
    assert_rel_close(acc[("w_rec",)]["weight"], ref["rec"], "W_rec", rtol=1e-5)
    assert_rel_close(acc[("w_in",)]["weight"], ref["in"], "W_in", rtol=1e-5)


class _TwoWayALIF(BellecNet):
    """ALIF whose adaptation also leaves the step by itself: no single output of the neuron."""

    def update(self, x):
        y = super().update(x)
        return y + jnp.sum(self.a.value, axis=-1, keepdims=True)


def _wrong_output(graph, ctx):
    grp = graph.groups[0]
    x_prev = next(v.name for v in graph.values if v.name != grp.output and v.eqn is not None
                  and v.type.shape == tuple(grp.varshape))
    return graph.replace(groups=(dataclasses.replace(grp, output=x_prev),) + graph.groups[1:])


_WRONG_OUTPUT = function_pass("test-wrong-output", requires={"trace-arrays"})(_wrong_output)


def test_eprop_output_filter_errors():
    from brainscale.errors import BackendError, PassError, PipelineError, UnsupportedModelError
    xs, _ = _data(2, 3)
    # no value every path of the group passes through
    with pytest.raises(UnsupportedModelError, match=r"no output z for filter=kappa_out.*"
                                                    r"kappa_at='state'"):
        zoo.EPropAlgorithm(_TwoWayALIF(2, adaptive=True), kappa=0.5).compile_graph(xs[0])
    # ... while the per-state filter needs none
    zoo.EPropAlgorithm(_TwoWayALIF(2, adaptive=True), kappa=0.5,
                       kappa_at="state").compile_graph(xs[0])
    # a user pass naming another value as the output: the verifier re-proves it
    with pytest.raises(PassError, match=r"output %x\d is defined by eqn \d+; the value every "
                                        r"path .* set output to that value"):
        zoo.EPropAlgorithm(BellecNet(2), kappa=0.5,
                           pipeline=[*DEFAULT_PIPELINE, "test-wrong-output"]).compile_graph(xs[0])
    # the axis combination
    with pytest.raises(PipelineError, match="signal=modulatory gives no such signal"):
        zoo.RuleAlgorithm(BellecNet(2), policy="param", signal="modulatory",
                          filter="kappa_out", kappa=0.5).compile_graph(xs[0])
    # a backend whose step has no learning signal at the outputs
    with pytest.raises(BackendError, match="learning signal at the neurons' outputs"):
        brainscale.DiagParamDimAlgorithm(
            BellecNet(2), pipeline=["absorb-normalization", "hidden-groups", "relations",
                                    "select-dims{policy=param,filter=kappa_out,kappa=0.5}",
                                    "fuse-traces", "layout-traces"]).compile_graph(xs[0])


# ---------------------------------------------------------------------------------------
# OSTL
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [0, 2])
@pytest.mark.parametrize("name", ["lif_delta", "alif"])
def test_ostl_recurrent_equals_bptt_on_one_layer(name, batch):
    T = 10
    m, x0 = models.make(name, batch)
    m_ref, _ = models.make(name, batch)
    rng = np.random.RandomState(2)
    xs = jnp.asarray(rng.randn(T, *np.shape(x0)), jnp.float32)
    ys = jnp.asarray(rng.randn(T, *np.shape(models.make(name, batch)[0].update(x0))), jnp.float32)
    learner = zoo.OSTLAlgorithm(m, recurrent=True).compile_graph(x0)
    assert {t.scope for t in learner.graph.traces if t.dim != "none"} == {"group"}
    g, _ = brainscale.online_gradients(learner, xs, ys, mse)
    ref = bptt_grads(m_ref, xs, mse, targets=ys)
    for k in ref:
        assert_rel_close(g[k], ref[k], f"OSTL vs BPTT {k}", rtol=1e-5)


@pytest.mark.parametrize("batch", [0, 2])
def test_ostl_feedforward_equals_bptt_on_a_feedforward_snn(batch):
    T = 12
    m, x0 = models.single_layer_2state(batch, spiking=True)
    m_ref, _ = models.single_layer_2state(batch, spiking=True)
    rng = np.random.RandomState(4)
    xs = jnp.asarray(rng.randn(T, *np.shape(x0)), jnp.float32)
    ys = jnp.asarray(rng.randn(T, *np.shape(models.single_layer_2state(batch, spiking=True)[0]
                                            .update(x0))), jnp.float32)
    learner = zoo.OSTLFeedforward(m, keep_dynamics=True).compile_graph(x0)
    g, _ = brainscale.online_gradients(learner, xs, ys, mse)
    ref = bptt_grads(m_ref, xs, mse, targets=ys)
    for k in ref:
        assert_rel_close(g[k], ref[k], f"OSTL feed-forward vs BPTT {k}", rtol=1e-5)
    # the alias's default is braintrace's form, each neuron's dynamics dropped: the io trace
    # without recursion (ε_x = x, ε_f = df), the α -> 0 limit of braintrace's pp_prop with
    # α = 1e-6; with decay_or_rank=1e-6, our ES-D-RTRL at that decay. Neither equals BPTT.
    m2, _ = models.single_layer_2state(batch, spiking=True)
    m3, _ = models.single_layer_2state(batch, spiking=True)
    m4, _ = models.single_layer_2state(batch, spiking=True)
    bt = zoo.OSTLFeedforward(m2).compile_graph(x0)
    assert {(t.dim, t.recursion) for t in bt.graph.traces if t.dim != "none"} == \
        {("io", "none")}
    assert "recursion=none" in bt.ir()
    g2, _ = brainscale.online_gradients(bt, xs, ys, mse)
    g3, _ = brainscale.online_gradients(
        brainscale.DiagIODimAlgorithm(m3, decay_or_rank=1e-6).compile_graph(x0), xs, ys, mse)
    g4, _ = brainscale.online_gradients(
        zoo.OSTLFeedforward(m4, decay_or_rank=1e-6).compile_graph(x0), xs, ys, mse)
    for k in g3:
        assert_rel_close(g2[k], g3[k], f"OSTLFeedforward vs ES-D-RTRL(1e-6) {k}", rtol=2e-5)
        assert_rel_close(g4[k], g3[k], f"OSTLFeedforward(1e-6) vs ES-D-RTRL {k}", rtol=1e-6)
        assert not np.allclose(np.asarray(jax.tree.leaves(g2[k])[0]),
                               np.asarray(jax.tree.leaves(ref[k])[0]), rtol=1e-3)


class TwoLayer(brainstate.nn.Module):
    """Two recurrent leaky tanh layers: ``s_l = 0.7 s_l + tanh(W_l [in_l, s_l^{t-1}])``, the
    second reading the first's new state; the output is the second's state."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        f = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        self.w1 = brainscale.ETraceParam({"weight": f(rng.randn(2 + 3, 3) * 0.8)},
                                         brainscale.MatMulOp())
        self.w2 = brainscale.ETraceParam({"weight": f(rng.randn(3 + 2, 2) * 0.8)},
                                         brainscale.MatMulOp())
        self.s1 = brainscale.ETraceState(f(rng.randn(3) * 0.3))
        self.s2 = brainscale.ETraceState(f(rng.randn(2) * 0.3))

    def update(self, x):
        s1 = 0.7 * self.s1.value + jnp.tanh(self.w1.execute(jnp.concatenate([x, self.s1.value])))
        s2 = 0.7 * self.s2.value + jnp.tanh(self.w2.execute(jnp.concatenate([s1, self.s2.value])))
        self.s1.value, self.s2.value = s1, s2
        return s2


def _two_layer_pure(s1p, s2p, x, w1, w2):
    s1 = 0.7 * s1p + jnp.tanh(jnp.concatenate([x, s1p]) @ w1)
    s2 = 0.7 * s2p + jnp.tanh(jnp.concatenate([s1, s2p]) @ w2)
    return s1, s2


def test_ostl_two_layers_equals_per_layer_traces():
    net, ref_net = TwoLayer(), TwoLayer()
    learner = zoo.OSTLAlgorithm(net).compile_graph(jnp.zeros(2))
    w1 = jnp.asarray(ref_net.w1.value["weight"])
    w2 = jnp.asarray(ref_net.w2.value["weight"])
    s1, s2 = jnp.asarray(ref_net.s1.value), jnp.asarray(ref_net.s2.value)
    params = net.states(brainstate.ParamState)

    @brainstate.transform.jit
    def step(x, t):
        return brainstate.transform.grad(lambda: mse(learner(x), t), params)()

    E1, E2 = jnp.zeros((3, w1.size)), jnp.zeros((2, w2.size))
    rng = np.random.RandomState(5)
    for _ in range(8):
        x = jnp.asarray(rng.randn(2), jnp.float32)
        tgt = jnp.asarray(rng.randn(2), jnp.float32)
        f1 = lambda s1p, w: _two_layer_pure(s1p, s2, x, w.reshape(w1.shape), w2)[0]  # noqa: E731
        # layer 2 with the first layer's new state held fixed
        s1_new = _two_layer_pure(s1, s2, x, w1, w2)[0]
        f2 = lambda s2p, w: 0.7 * s2p + jnp.tanh(  # noqa: E731
            jnp.concatenate([s1_new, s2p]) @ w.reshape(w2.shape))
        J11, D1 = jax.jacfwd(f1, argnums=(0, 1))(s1, w1.ravel())
        J22, D2 = jax.jacfwd(f2, argnums=(0, 1))(s2, w2.ravel())
        E1, E2 = J11 @ E1 + D1, J22 @ E2 + D2
        # spatial learning signals at this step: ∂L^t/∂s_l^t
        loss_of = lambda s1n: mse(0.7 * s2 + jnp.tanh(jnp.concatenate([s1n, s2]) @ w2), tgt)  # noqa: E731
        d1 = jax.grad(loss_of)(s1_new)
        s2_new = f2(s2, w2.ravel())
        d2 = s2_new - tgt
        g = step(x, tgt)
        assert_rel_close(g[("w1",)]["weight"], (d1 @ E1).reshape(w1.shape), "W1", rtol=1e-5)
        assert_rel_close(g[("w2",)]["weight"], (d2 @ E2).reshape(w2.shape), "W2", rtol=1e-5)
        s1, s2 = s1_new, s2_new


# ---------------------------------------------------------------------------------------
# three-factor
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,batch", [("lif_delta", 0), ("alif", 2)])
def test_three_factor_equals_modulated_eligibility(name, batch):
    m, x0 = models.make(name, batch)
    m_ref, _ = models.make(name, batch)
    learner = zoo.ThreeFactorAlgorithm(m).compile_graph(x0)
    assert {t.signal for t in learner.graph.traces if t.dim != "none"} == {"modulatory"}
    orc = DenseOracle(m_ref, x0, algorithm="param", loss_fn=lambda o: jnp.sum(o))
    params = m.states(brainstate.ParamState)

    @brainstate.transform.jit
    def step(x, mod):
        return brainstate.transform.grad(lambda: jnp.sum(learner(x, modulator=mod)), params)()

    rng = np.random.RandomState(6)
    n = int(np.prod(np.shape(m.V.value)))
    for s in range(6):
        x = jnp.asarray(rng.randn(*np.shape(x0)), jnp.float32)
        # a scalar reward, then a per-neuron modulator
        mod = jnp.asarray(rng.randn(), jnp.float32) if s % 2 == 0 else \
            jnp.asarray(rng.randn(*np.shape(m.V.value)), jnp.float32)
        g = step(x, mod)
        r = orc.step(x)
        mvec = np.concatenate([np.broadcast_to(np.asarray(mod), np.shape(m.V.value)).ravel()]
                              * (len(r["hidden_names"])))
        assert mvec.size == sum(int(np.prod(s_)) for _, s_ in r["hidden_names"]) == \
            n * len(r["hidden_names"])
        ((_, path),) = [(k, p) for k, p in r["traces"]]
        E = r["traces"][(0, path)]
        flat = mvec @ E
        want = jax.tree.unflatten(jax.tree.structure(m_ref.syn.value),
                                  [flat[:5], flat[5:].reshape(8, 5)])
        assert_rel_close(g[("syn",)], want, f"step {s}", rtol=1e-5)


def test_three_factor_needs_its_modulator():
    m, x0 = models.lif_delta(0)
    learner = zoo.ThreeFactorAlgorithm(m).compile_graph(x0)
    with pytest.raises(brainscale.BrainscaleError, match="needs a modulator"):
        learner(x0)
    learner.modulator = 0.5
    learner(x0)                      # a standing modulator


# ---------------------------------------------------------------------------------------
# DNI
# ---------------------------------------------------------------------------------------

class LeakyRNN(brainstate.nn.Module):
    """``h = 0.8 h + 0.2 tanh(W [x, h] + b)``; the output is ``h``."""

    def __init__(self, batch=0, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        f = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        self.w = brainscale.ETraceParam({"weight": f(rng.randn(2 + 4, 4)),
                                         "bias": f(rng.randn(4) * 0.1)}, brainscale.MatMulOp())
        self.h = brainscale.ETraceState(f(rng.randn(*_shape(batch, 4)) * 0.5))

    def update(self, x):
        h = self.h.value
        self.h.value = 0.8 * h + 0.2 * jnp.tanh(self.w.execute(jnp.concatenate([x, h], -1)))
        return self.h.value


@pytest.mark.parametrize("readout", ["step", "trace"])
@pytest.mark.parametrize("batch", [0, 2])
def test_dni_equals_literal_synthetic_gradient_equations(batch, readout):
    """``readout='trace'``: ``(δ + ĝ(h^t)) · E^t``; ``'step'`` (the default): the last step
    exact, ``∂(L^t + ĝ·h^t)/∂θ|_{h^{t-1}} + target · E^{t-1}``."""
    net, ref = LeakyRNN(batch), LeakyRNN(batch)
    x0 = jnp.zeros(_shape(batch, 2))
    learner = zoo.DNIAlgorithm(net, **({} if readout == "step" else {"readout": readout}))
    learner.compile_graph(x0)
    assert ("readout=step" in learner.ir()) == (readout == "step")
    (sg_state,) = learner.synthetic_params().values()
    rng = np.random.RandomState(8)
    A = jnp.asarray(rng.randn(4, 4) * 0.3, jnp.float32)
    c = jnp.asarray(rng.randn(4) * 0.1, jnp.float32)
    sg_state.value = {"weight": A, "bias": c}
    params = {**net.states(brainstate.ParamState), **learner.synthetic_params()}

    @brainstate.transform.jit
    def step(x, t):
        return brainstate.transform.grad(lambda: jnp.sum(learner(x) * t), params)()

    W, b = ref.w.value["weight"], ref.w.value["bias"]
    h = jnp.asarray(ref.h.value)

    def F(hp, x, W, b):
        return 0.8 * hp + 0.2 * jnp.tanh(jnp.concatenate([x, hp], -1) @ W + b)

    def ghat(h):
        return h @ A + c
    theta = jnp.concatenate([b, W.ravel()])
    E = jnp.zeros(np.shape(h) + (theta.size,))
    for s in range(6):
        x = jnp.asarray(rng.randn(*_shape(batch, 2)), jnp.float32)
        tgt = jnp.asarray(rng.randn(*_shape(batch, 4)), jnp.float32)
        # D-RTRL trace: J = 0.8 (element-wise), df ∂y/∂θ with y = [x, h] W + b
        pre = jnp.concatenate([x, h], -1)
        y = pre @ W + b
        df = 0.2 * (1 - jnp.tanh(y) ** 2)                                  # (..., 4)
        dy = jnp.concatenate([jnp.broadcast_to(jnp.eye(4), np.shape(h) + (4,)),
                              jnp.einsum("...i,jk->...jik", pre, jnp.eye(4)).reshape(
                                  np.shape(h) + (-1,))], -1)             # (..., 4, |θ|)
        E_old, E = E, 0.8 * E + df[..., None] * dy
        h_new = F(h, x, W, b)
        sig = tgt + ghat(h_new)                                            # δ + ĝ(h^t)
        # the synthetic module's target
        _, vjp = jax.vjp(lambda hp: F(hp, x, W, b), h)
        (target,) = vjp(tgt + ghat(h_new))
        if readout == "trace":
            g_theta = jnp.einsum("...n,...nc->c", sig, E)
        else:       # ∂/∂θ at fixed h^{t-1} (every path) + the target with the old trace
            _, vjp_t = jax.vjp(lambda b_, W_: F(h, x, W_, b_), b, W)
            gb, gW = vjp_t(sig)
            g_theta = jnp.concatenate([gb, gW.ravel()]) + \
                jnp.einsum("...n,...nc->c", target, E_old)
            if s:   # the two read-outs differ once there is a previous trace
                assert not np.allclose(g_theta, jnp.einsum("...n,...nc->c", sig, E),
                                       rtol=1e-3)
        # the synthetic module's regression gradient
        err = ghat(h) - target
        gA = h.reshape(-1, 4).T @ err.reshape(-1, 4)
        gc = err.reshape(-1, 4).sum(0)
        g = step(x, tgt)
        assert_rel_close(g[("w",)]["bias"], g_theta[:4], f"step {s} bias", rtol=1e-5)
        assert_rel_close(g[("w",)]["weight"], g_theta[4:].reshape(6, 4), f"step {s} W",
                         rtol=1e-5)
        gs = g[("synthetic", "G0")]
        assert_rel_close(gs["weight"], gA, f"step {s} synthetic weight", rtol=1e-5)
        assert_rel_close(gs["bias"], gc, f"step {s} synthetic bias", rtol=1e-5)
        h = h_new


# ---------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------

def test_ostl_recurrent_alias_is_braintraces_d_rtrl_trace():
    """braintrace's OSTLRecurrent is its D-RTRL trace with the coupled (block) hidden
    Jacobian: the alias's default; recurrence_scope='diagonal' gives D-RTRL's gradients."""
    T = 6
    m, x0 = models.alif(2)
    m_ref, _ = models.alif(2)
    rng = np.random.RandomState(5)
    xs = jnp.asarray(rng.randn(T, *np.shape(x0)), jnp.float32)
    ys = jnp.asarray(rng.randn(T, 2, 5), jnp.float32)
    alias = zoo.OSTLRecurrent(models.alif(2)[0]).compile_graph(x0)
    assert {t.scope for t in alias.graph.traces if t.dim != "none"} == {"block"}
    assert zoo.OSTLRecurrent(models.alif(2)[0], full_recurrence=True).compile_graph(
        x0).graph.traces[0].scope == "group"
    g, _ = brainscale.online_gradients(
        zoo.OSTLRecurrent(m, recurrence_scope="diagonal").compile_graph(x0), xs, ys, mse)
    ref, _ = brainscale.online_gradients(
        brainscale.DiagParamDimAlgorithm(m_ref).compile_graph(x0), xs, ys, mse)
    for k in ref:
        assert_rel_close(g[k], ref[k], f"OSTLRecurrent vs D-RTRL {k}", rtol=1e-6)


def _steps_vs_oracle(name, batch, x0, learner, other, orc, seed, rtol):
    """Step ``learner`` and ``other`` (compiled on two copies of a model) and the oracle 8
    times; every gradient of ``learner`` equals the oracle's; returns how far ``other``'s
    are from ``learner``'s (largest relative difference)."""
    from test_online_oracle import _out_shape, loss_fn
    params = learner.model.states(brainstate.ParamState)
    params_o = other.model.states(brainstate.ParamState)

    def stepper(lr, ps):
        @brainstate.transform.jit
        def step(x, t):
            return brainstate.transform.grad(lambda: loss_fn(lr(x), t), ps)()
        return step
    step, step_o = stepper(learner, params), stepper(other, params_o)
    rng = np.random.RandomState(seed)
    shape = _out_shape(name, batch, x0)
    differs = 0.0
    for t in range(8):
        x = jnp.asarray(rng.randn(*np.shape(x0)), jnp.float32)
        tgt = jnp.asarray(rng.randn(*shape), jnp.float32)
        g, go = step(x, tgt), step_o(x, tgt)
        r = orc.step(x, target=tgt)
        for k in params:
            assert_rel_close(g[k], r["grads"][k], f"t={t} {k}", rtol=rtol)
            for a, b in zip(jax.tree.leaves(g[k]), jax.tree.leaves(go[k])):
                differs = max(differs, float(np.abs(np.asarray(a) - np.asarray(b)).max()
                                             / (np.abs(np.asarray(a)).max() + 1e-12)))
    return differs


BLOCK = [("lif_delta", 0), ("alif", 2), ("gru_rh", 2)]


@pytest.mark.parametrize("name,batch", BLOCK, ids=[f"{n}-b{b}" for n, b in BLOCK])
def test_block_scope_equals_the_oracle_with_the_full_jacobians_blocks(name, batch):
    """scope=block: D-RTRL's trace with J the per-neuron block of the *full* step Jacobian
    (jacfwd of the whole step, masked to same-neuron entries), per step, against the dense
    oracle; and it differs from D-RTRL's cut J (the recurrent weights' own-neuron paths)."""
    from test_online_oracle import loss_fn
    m, x0 = models.make(name, batch)
    m_ref, _ = models.make(name, batch)
    m_cut, _ = models.make(name, batch)
    learner = zoo.RuleAlgorithm(m, policy="param", scope="block").compile_graph(x0)
    assert {t.scope for t in learner.graph.traces if t.dim != "none"} == {"block"}
    assert "scope=block" in learner.ir()
    cut = brainscale.DiagParamDimAlgorithm(m_cut).compile_graph(x0)
    orc = DenseOracle(m_ref, x0, algorithm="param", loss_fn=loss_fn, jacobian="block")
    assert _steps_vs_oracle(name, batch, x0, learner, cut, orc, seed=11, rtol=1e-4) > 1e-3


STRUCT = [("gru3", 2), ("alif", 0), ("elemwise_tau", 2), ("single_layer_2state", 2),
          ("masked_rec", 2)]


@pytest.mark.parametrize("name,batch", STRUCT, ids=[f"{n}-b{b}" for n, b in STRUCT])
def test_block_scope_structured_equals_one_jvp_per_neuron(name, batch, monkeypatch):
    """Where the structure allows (brainscale/backends/block.py), the block is assembled from
    J, df and the op inputs' tangents; it equals the general extraction (one JVP of the step
    per neuron and state) on multi-layer and multi-state nets."""
    from test_online_oracle import _out_shape, loss_fn
    import brainscale.backends.zoo_step as zs

    def grads(structured):
        if not structured:
            monkeypatch.setattr(zs, "block_plan", lambda prog, gid: (None, "forced"))
        m, x0 = models.make(name, batch)
        lr = zoo.RuleAlgorithm(m, policy="param", scope="block").compile_graph(x0)
        notes = [n for n in lr._step.notes if n.startswith("scope=block")]
        assert notes and all(("structured" in n) == structured for n in notes), notes
        ps = m.states(brainstate.ParamState)
        step = brainstate.transform.jit(
            lambda x, t: brainstate.transform.grad(lambda: loss_fn(lr(x), t), ps)())
        rng = np.random.RandomState(3)
        shape = _out_shape(name, batch, x0)
        out = []
        for _ in range(6):
            x = jnp.asarray(rng.randn(*np.shape(x0)), jnp.float32)
            out.append(step(x, jnp.asarray(rng.randn(*shape), jnp.float32)))
        return out
    fast, slow = grads(True), grads(False)
    for t, (a, b) in enumerate(zip(fast, slow)):
        for k in a:
            assert_rel_close(a[k], b[k], f"t={t} {k}", rtol=1e-5)


def test_block_scope_errors():
    from brainscale.errors import BackendError, PipelineError
    m, x0 = models.lif_delta(2)
    with pytest.raises(PipelineError, match="scope=block needs dim=param"):
        zoo.RuleAlgorithm(m, policy="io", scope="block", decay_or_rank=0.9).compile_graph(x0)
    with pytest.raises(BackendError, match="block of the full step Jacobian"):
        brainscale.DiagParamDimAlgorithm(
            m, pipeline=["absorb-normalization", "hidden-groups", "relations",
                         "select-dims{policy=param,scope=block}", "fuse-traces",
                         "layout-traces"]).compile_graph(x0)


def test_braintrace_names_and_compile_names():
    m, x0 = models.lif_delta(0)
    cases = [(zoo.SnAp(m, n=2), {"scope": "sparse", "snap_n": 2}),
             (zoo.UORO(m, projection_key=3), {"scope": "coupled"}),
             (zoo.EProp(m, feedback="random", kappa_filter_decay=0.5, random_feedback_key=1),
              {"signal": "random", "filter": "kappa", "kappa": 0.5}),
             (zoo.OSTLRecurrent(m), {"scope": "block"}),
             (zoo.OSTLRecurrent(m, recurrence_scope="diagonal"), {"scope": "diagonal"}),
             (zoo.OSTLRecurrent(m, full_recurrence=True), {"scope": "group"}),
             (zoo.OSTLFeedforward(m, keep_dynamics=True), {}),
             (zoo.ThreeFactor(m), {"signal": "modulatory"}),
             (zoo.DNI(m), {"signal": "synthetic"})]
    for learner, axes in cases:
        learner.compile_graph(x0)
        (t,) = learner.graph.traces
        for k, v in axes.items():
            assert getattr(t, k) == v, (type(learner).__name__, k)
    assert zoo.RandomProjectionVjpAlgorithm is zoo.UORO
    for name, cls in (("rtrl", zoo.RTRLAlgorithm), ("eprop", zoo.EPropAlgorithm),
                      ("uoro", zoo.UOROAlgorithm), ("ostl", zoo.OSTLAlgorithm)):
        c = brainscale.compile(models.lif_delta(0)[0], x0, algorithm=name)
        assert type(c.learner) is cls
    with pytest.raises(ValueError, match="random_feedback_key"):
        zoo.EProp(m, feedback="random")
    with pytest.raises(ValueError, match="SnAp order"):
        zoo.SnApAlgorithm(m, n=0)


# ---------------------------------------------------------------------------------------
# readout=step: the last step exact
# ---------------------------------------------------------------------------------------

READOUT = [("lif_delta", 0, "param"), ("alif", 2, "param"), ("gru_rh", 2, "param"),
           ("alif", 2, "io"), ("gru_rh", 0, "io"), ("sparse_rec", 2, "param")]


@pytest.mark.parametrize("name,batch,policy", READOUT,
                         ids=[f"{n}-b{b}-{p}" for n, b, p in READOUT])
def test_step_readout_equals_the_oracle(name, batch, policy):
    """readout=step: ``∂L^t/∂θ`` at fixed ``h^{t-1}`` (every path of the step) plus
    ``∂L^t/∂h^{t-1}`` (the whole step's VJP) times the previous trace, per step, against the
    dense oracle written with autodiff of the whole step; D-RTRL (param) and ES-D-RTRL (io)
    traces; and it differs from the usual read-out δ^t · ε^t."""
    from test_online_oracle import loss_fn
    kw = {} if policy == "param" else {"decay_or_rank": 0.9}
    m, x0 = models.make(name, batch)
    m_ref, _ = models.make(name, batch)
    m_tr, _ = models.make(name, batch)
    learner = zoo.RuleAlgorithm(m, policy=policy, readout="step", **kw).compile_graph(x0)
    assert {t.readout for t in learner.graph.traces if t.dim != "none"} == {"step"}
    assert "readout=step" in learner.ir()
    usual = zoo.RuleAlgorithm(m_tr, policy=policy, **kw).compile_graph(x0)
    orc = DenseOracle(m_ref, x0, algorithm=policy, loss_fn=loss_fn, readout="step", **kw)
    assert _steps_vs_oracle(name, batch, x0, learner, usual, orc, seed=12, rtol=2e-4) > 1e-3


def test_step_readout_on_group_scope_and_exact_scopes():
    """OSTL's group scope takes readout=step too (the old influence of its groups through
    the step's VJP); the exact scopes read out that way by default (printed), and a trace
    that would read them otherwise is refused."""
    from test_online_oracle import loss_fn
    m, x0 = models.make("alif", 2)
    g_step = zoo.OSTLAlgorithm(m, readout="step").compile_graph(x0)
    assert {(t.scope, t.readout) for t in g_step.graph.traces if t.dim != "none"} == \
        {("group", "step")}
    rt = zoo.RTRLAlgorithm(models.make("alif", 2)[0]).compile_graph(x0)
    assert "readout=step" in rt.ir()
    # on one recurrent layer the group scope is exact with either read-out: both equal BPTT
    xs = jnp.asarray(np.random.RandomState(3).randn(6, *np.shape(x0)), jnp.float32)
    from test_online_oracle import _out_shape
    ys = jnp.asarray(np.random.RandomState(4).randn(6, *_out_shape("alif", 2, x0)),
                     jnp.float32)
    g, _ = brainscale.online_gradients(g_step, xs, ys, loss_fn)
    m_ref, _ = models.make("alif", 2)
    ref = bptt_grads(m_ref, list(xs), loss_fn, targets=list(ys))
    for k in g:
        assert_rel_close(g[k], ref[k], f"OSTL readout=step vs BPTT {k}", rtol=1e-4)
    with pytest.raises(brainscale.PipelineError, match="readout=step"):
        zoo.RTRLAlgorithm(models.make("alif", 2)[0], readout="trace").compile_graph(x0)
