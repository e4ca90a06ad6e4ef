"""The compiled learner under brainstate's transforms: grad, jit, vmap, scan/for_loop."""
import brainstate
import braintools
import jax
import jax.numpy as jnp
import numpy as np

import brainscale
from brainscale import ETraceParam, ETraceState, MatMulOp


class Net(brainstate.nn.Module):
    def __init__(self, batch=None):
        super().__init__()
        self.w = ETraceParam({'weight': jax.random.normal(jax.random.PRNGKey(0), (7, 4)) * 0.5,
                              'bias': jnp.zeros(4)}, MatMulOp())
        self.V = ETraceState(jnp.zeros(4) if batch is None else jnp.zeros((batch, 4)))

    def update(self, x):
        spk = braintools.surrogate.Sigmoid()(self.V.value - 1.)
        v = self.V.value * 0.9 + self.w.execute(jnp.concatenate([x, spk], -1)) - spk
        self.V.value = v
        return v


B = 3
XS = jax.random.normal(jax.random.PRNGKey(1), (6, B, 3))


def test_vmap_over_unbatched_learner_equals_batched_learner():
    netb = Net(B)
    lb = brainscale.DiagParamDimAlgorithm(netb).compile_graph(XS[0])
    pb = netb.states(brainstate.ParamState)
    net = Net()
    lv = brainscale.DiagParamDimAlgorithm(net).compile_graph(XS[0, 0])
    pv = net.states(brainstate.ParamState)
    batched = [net.V] + list(lv._traces)
    for s in batched:
        s.value = jnp.broadcast_to(s.value, (B,) + s.value.shape)
    for t in range(XS.shape[0]):
        gb = brainstate.transform.grad(lambda: jnp.sum(lb(XS[t])), pb)()

        def loss_v():
            f = brainstate.transform.vmap(lambda x: lv(x), in_states=batched, out_states=batched)
            return jnp.sum(f(XS[t]))
        gv = brainstate.transform.grad(loss_v, pv)()
        for k in ('weight', 'bias'):
            np.testing.assert_allclose(gv[('w',)][k], gb[('w',)][k], rtol=1e-5, atol=1e-6)


def test_online_gradients_scan_equals_python_loop():
    loss = lambda out, y: jnp.sum(out * y)  # noqa: E731
    ys = jax.random.normal(jax.random.PRNGKey(2), (XS.shape[0], B, 4))
    n1, n2 = Net(B), Net(B)
    l1 = brainscale.DiagIODimAlgorithm(n1, decay_or_rank=0.9).compile_graph(XS[0])
    l2 = brainscale.DiagIODimAlgorithm(n2, decay_or_rank=0.9).compile_graph(XS[0])
    g_scan, losses = brainscale.online_gradients(l1, XS, ys, loss)
    p2 = n2.states(brainstate.ParamState)
    step = brainstate.transform.jit(
        lambda x, y: brainstate.transform.grad(lambda: loss(l2(x), y), p2)())
    acc = None
    for t in range(XS.shape[0]):
        g = step(XS[t], ys[t])
        acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
    assert losses.shape == (XS.shape[0],)
    for k in ('weight', 'bias'):
        np.testing.assert_allclose(g_scan[('w',)][k], acc[('w',)][k], rtol=1e-5, atol=1e-6)


def test_for_loop_and_jit_advance_states_and_traces():
    net = Net(B)
    learner = brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9).compile_graph(XS[0])
    outs = brainstate.transform.jit(lambda xs: brainstate.transform.for_loop(learner, xs))(XS)
    assert outs.shape == (XS.shape[0], B, 4)
    (eps_x,) = learner.etrace_xs.values()
    assert float(jnp.abs(eps_x.value).sum()) > 0
    learner.reset_state(batch_size=B) if hasattr(net, 'init_state') else learner.reset_traces()
    assert float(jnp.abs(eps_x.value).sum()) == 0
