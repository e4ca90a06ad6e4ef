"""Short online-training runs with brainscale.nn models: the loss clearly falls.

Every step takes the online gradient of that step's loss (``brainstate.transform.grad``
through the compiled learner) and applies it with Adam inside a jitted ``for_loop``.
"""
from __future__ import annotations

import brainstate
import braintools
import brainunit as u
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import brainscale.nn as bnn


def _train(learner, params, xs, ys, loss_fn, lr, epochs, batch):
    opt = braintools.optim.Adam(lr=lr)
    opt.register_trainable_weights(params)

    @brainstate.transform.jit
    def run_epoch(xs, ys):
        learner.reset_state(batch_size=batch)

        def body(x, y):
            grads, loss = brainstate.transform.grad(
                lambda: loss_fn(learner(x), y), params, return_value=True)()
            opt.update(grads)
            return loss

        return brainstate.transform.for_loop(body, xs, ys)

    return [float(jnp.mean(run_epoch(xs, ys))) for _ in range(epochs)]


class GRUReg(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = bnn.GRUCell(2, 8)
        self.out = bnn.Linear(8, 1)

    def update(self, x):
        return self.out(self.rnn(x))


@pytest.mark.parametrize("alg", ["param", "io"])
def test_gru_learns_one_step_memory(alg):
    """target_t = x_{t-1}[0]: a GRU must remember the previous input (online, no BPTT)."""
    B, T = 16, 40
    rng = np.random.RandomState(0)
    xs = jnp.asarray(rng.randn(T, B, 2), jnp.float32)
    ys = jnp.concatenate([jnp.zeros((1, B, 1)), xs[:-1, :, :1]], axis=0)
    brainstate.random.seed(0)
    net = GRUReg()
    brainstate.nn.init_all_states(net, batch_size=B)
    learner = (brainscale.DiagParamDimAlgorithm(net) if alg == "param"
               else brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9))
    learner.compile_graph(xs[0])
    losses = _train(learner, net.states(brainstate.ParamState), xs, ys,
                    lambda out, y: jnp.mean((out - y) ** 2), lr=5e-3, epochs=12, batch=B)
    print(alg, [round(v, 3) for v in losses])
    assert losses[-1] < 0.5 * losses[0], losses
    assert max(losses[-3:]) < 0.4, losses


class SpikingClassifier(brainstate.nn.Module):
    """Poisson input → recurrent LIF (DeltaProj) → leaky rate readout."""

    def __init__(self, n_in=10, n_rec=8, n_out=2):
        super().__init__()
        self.neu = bnn.LIF(n_rec, tau=10. * u.ms, V_th=1. * u.mV)
        self.syn = bnn.DeltaProj(
            comm=bnn.Linear(n_in + n_rec, n_rec,
                            w_init=braintools.init.KaimingNormal(2., unit=u.mV)),
            post=self.neu)
        self.out = bnn.LeakyRateReadout(n_rec, n_out, tau=5. * u.ms)

    def update(self, spk):
        self.syn(u.math.concatenate([spk, self.neu.get_spike()], axis=-1))
        return self.out(self.neu())


def test_lif_network_learns_two_patterns():
    """Two fixed input-rate patterns → one-hot readout targets (online ES-D-RTRL)."""
    B, T, n_in = 16, 20, 10
    rng = np.random.RandomState(1)
    rates = np.stack([np.linspace(0.05, 0.6, n_in), np.linspace(0.6, 0.05, n_in)])
    labels = np.arange(B) % 2
    xs = jnp.asarray(rng.rand(T, B, n_in) < rates[labels][None], jnp.float32)
    ys = jnp.asarray(np.broadcast_to(np.eye(2)[labels] * 2., (T, B, 2)), jnp.float32)
    with brainstate.environ.context(dt=1. * u.ms):
        brainstate.random.seed(0)
        net = SpikingClassifier(n_in)
        brainstate.nn.init_all_states(net, batch_size=B)
        learner = brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9)
        learner.compile_graph(xs[0])
        losses = _train(learner, net.states(brainstate.ParamState), xs, ys,
                        lambda out, y: jnp.mean((out - y) ** 2), lr=2e-2, epochs=15, batch=B)
    print([round(v, 3) for v in losses])
    assert losses[-1] < 0.5 * losses[0], losses
