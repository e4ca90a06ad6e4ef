"""Three of brainscale 0.1's published examples, ported with renames only, run for a few steps.

Each keeps the structure of the published example (its model classes, trainer loop and the 0.1
calls: ``ParamDimVjpAlgorithm(..., mode=Batching())``, ``ES_D_RTRL(..., decay_or_rank,
mode=...)``, ``D_RTRL(net)`` + ``show_graph()``, compiling inside ``jit``, auto-batching with
``vmap_new_states`` + ``brainstate.nn.Vmap``) at toy sizes. The only changes are the renames
today's brainstate / braintools force (``brainstate.compile`` / ``augment`` → ``transform``,
``brainstate.functional.clip_grad_norm`` → ``brainstate.nn.clip_grad_norm``) and
``brainscale.nn.LIF`` → ``brainpy.state.LIF`` (0.1's ``brainscale.nn.LIF`` *was*
``brainpy.state.LIF``, with a DeprecationWarning saying so), and in the batching tutorial
``brainstate.nn.LeakyRateReadout`` → ``brainscale.nn.LeakyRateReadout`` (the class 0.1 also
shipped; brainpy.state's applies a plain weight between two hidden states, which the compiler
refuses, see ``docs/compat.md``).

1. quickstart "RNN online learning": a GRU network on the copying task, D-RTRL vs BPTT;
2. tutorial "batching": a recurrent LIF network, ES-D-RTRL with manual batching
   (``mode=Batching()``) and with automatic batching (``vmap_new_states``);
3. tutorial "show_graph": ``D_RTRL(net).show_graph()`` on a LIF delta network and a
   multi-layer GIF network with exponential synapses, then a few online steps.
"""
from __future__ import annotations

import warnings

import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale

bp = pytest.importorskip("brainpy.state", reason="brainpy (brainpy.state) is not installed; "
                         "0.1's examples use its neurons and projections")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _values(states):
    return {k: np.asarray(u.get_mantissa(v.value) if not isinstance(v.value, dict) else
                          jax.tree.leaves(v.value)[0]) for k, v in states.items()}


def _changed(before, after):
    return any(not np.allclose(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------
# 1. quickstart: GRU on the copying task
# ---------------------------------------------------------------------------------------

class CopyTask:
    """Ten random digits (1..8), a delay, then ten recall cues (9); one-hot inputs."""

    def __init__(self, time_lag: int, batch_size: int, seed: int = 0):
        self.seq_length = time_lag + 20
        self.batch_size = batch_size
        self.rng = np.random.RandomState(seed)

    def __iter__(self):
        while True:
            ids = np.zeros([self.batch_size, self.seq_length], dtype=int)
            ids[:, :10] = self.rng.randint(1, 9, (self.batch_size, 10))
            ids[:, -10:] = 9
            x = np.zeros([self.batch_size, self.seq_length, 10])
            for i in range(self.batch_size):
                x[i, np.arange(self.seq_length), ids[i]] = 1.
            yield x, ids[:, :10]


class GRUNet(brainstate.nn.Module):
    def __init__(self, n_in, n_rec, n_out, n_layer):
        super().__init__()
        layers = []
        for _ in range(n_layer):
            layers.append(brainscale.nn.GRUCell(n_in, n_rec))
            n_in = n_rec
        self.layer = brainstate.nn.Sequential(*layers)
        self.readout = brainscale.nn.Linear(n_rec, n_out)

    def update(self, x):
        return self.readout(self.layer(x))


class CopyTrainer:
    def __init__(self, target, opt, n_epochs, n_seq, batch_size):
        self.target = target
        self.opt = opt
        opt.register_trainable_weights(self.target.states().subset(brainstate.ParamState))
        self.n_epochs, self.n_seq, self.batch_size = n_epochs, n_seq, batch_size

    def f_train(self):
        losses = []
        for i, (x, y) in enumerate(CopyTask(self.n_seq, self.batch_size)):
            if i == self.n_epochs:
                break
            x = jnp.asarray(np.transpose(x, (1, 0, 2)), jnp.float32)   # [time, batch, 10]
            y = jnp.asarray(np.transpose(y, (1, 0)))                  # [10, batch]
            losses.append(float(self.batch_train(x, y)))
        return np.asarray(losses)


class OnlineCopyTrainer(CopyTrainer):
    @brainstate.transform.jit(static_argnums=(0,))
    def batch_train(self, inputs, target):
        weights = self.target.states(brainstate.ParamState)
        brainstate.nn.init_all_states(self.target, inputs.shape[1])
        # 0.1: the data carry a batch axis, said with mode=
        model = brainscale.ParamDimVjpAlgorithm(self.target, mode=brainstate.mixin.Batching())
        model.compile_graph(inputs[0])

        def etrace_loss(inp, tar):
            out = model(inp)
            return braintools.metric.softmax_cross_entropy_with_integer_labels(out, tar).mean(), out

        def etrace_grad(prev_grads, x):
            inp, tar = x
            f_grad = brainstate.transform.grad(etrace_loss, weights, has_aux=True,
                                               return_value=True)
            cur_grads, local_loss, out = f_grad(inp, tar)
            return jax.tree.map(lambda a, b: a + b, prev_grads, cur_grads), (out, local_loss)

        def etrace_train(inputs_):
            grads = jax.tree.map(jnp.zeros_like, {k: v.value for k, v in weights.items()})
            grads, (outs, losses) = brainstate.transform.scan(etrace_grad, grads,
                                                              (inputs_, target))
            self.opt.update(grads)
            return losses.mean()

        n_sim = self.n_seq + 10
        brainstate.transform.for_loop(model, inputs[:n_sim])      # states and traces only
        return etrace_train(inputs[n_sim:])                       # then learn online


class BPTTCopyTrainer(CopyTrainer):
    @brainstate.transform.jit(static_argnums=(0,))
    def batch_train(self, inputs, targets):
        brainstate.nn.init_all_states(self.target, inputs.shape[1])
        weights = self.target.states(brainstate.ParamState)

        def run_step(inp, tar):
            out = self.target(inp)
            return out, braintools.metric.softmax_cross_entropy_with_integer_labels(out, tar).mean()

        def bptt_loss():
            n_sim = self.n_seq + 10
            brainstate.transform.for_loop(self.target, inputs[:n_sim])
            outs, losses = brainstate.transform.for_loop(run_step, inputs[n_sim:], targets)
            return losses.mean(), outs

        grads, loss, _ = brainstate.transform.grad(bptt_loss, weights, has_aux=True,
                                                   return_value=True)()
        self.opt.update(grads)
        return loss


@pytest.mark.parametrize("trainer", [OnlineCopyTrainer, BPTTCopyTrainer], ids=["online", "bptt"])
def test_quickstart_gru_copying_task(trainer):
    brainstate.random.seed(0)
    net = GRUNet(10, 8, 10, 1)
    before = _values(net.states(brainstate.ParamState))
    t = trainer(target=net, opt=braintools.optim.Adam(0.01), n_epochs=2, n_seq=2, batch_size=4)
    losses = t.f_train()
    assert losses.shape == (2,) and np.all(np.isfinite(losses))
    assert 1.0 < losses[0] < 4.0                      # about log(10) for an untrained net
    assert _changed(before, _values(net.states(brainstate.ParamState)))


# ---------------------------------------------------------------------------------------
# 2. tutorial: batching (manual with mode=Batching(), automatic with vmap)
# ---------------------------------------------------------------------------------------

class LIFNet(brainstate.nn.Module):
    """Input and recurrent spikes → one dense delta projection → LIF → leaky readout."""

    def __init__(self, n_in, n_hidden, n_out):
        super().__init__()
        self.neu = bp.LIF(n_hidden)                        # 0.1: brainscale.nn.LIF
        rec_init = braintools.init.KaimingNormal(unit=u.mV)
        ff_init = braintools.init.KaimingNormal(unit=u.mV)
        self.syn = brainstate.nn.DeltaProj(
            comm=brainscale.nn.Linear(
                n_in + n_hidden, n_hidden,
                w_init=u.math.concatenate([ff_init([n_in, n_hidden]),
                                           rec_init([n_hidden, n_hidden])], axis=0),
                b_init=braintools.init.ZeroInit(unit=u.mV)),
            post=self.neu)
        # 0.1's tutorial: brainstate.nn.LeakyRateReadout (brainpy.state's, a plain ParamState
        # matmul between two hidden states, which the compiler refuses: docs/compat.md)
        self.out = brainscale.nn.LeakyRateReadout(n_hidden, n_out)

    def update(self, x):
        self.syn(u.math.concatenate([x, self.neu.get_spike()], axis=-1))
        return self.out(self.neu())


class ManualBatchingTrainer:
    def __init__(self, n_in, n_hidden, n_out):
        self.model = LIFNet(n_in, n_hidden, n_out)
        self.optimizer = braintools.optim.Adam(lr=1e-2)
        self.optimizer.register_trainable_weights(self.model.states(brainstate.ParamState))

    @brainstate.transform.jit(static_argnums=0)
    def train(self, inputs, targets):
        brainstate.nn.init_all_states(self.model, batch_size=inputs.shape[1])
        model = brainscale.ES_D_RTRL(self.model, decay_or_rank=0.9,
                                     mode=brainstate.mixin.Batching())
        model.compile_graph(inputs[0])
        weights = self.model.states(brainstate.ParamState)

        def etrace_loss(inp):
            out = model(inp)
            loss = braintools.metric.softmax_cross_entropy_with_integer_labels(out, targets).mean()
            return loss, out

        def etrace_step(prev_grads, x):
            f_grad = brainstate.transform.grad(etrace_loss, weights, has_aux=True,
                                               return_value=True)
            cur_grads, local_loss, out = f_grad(x)
            return jax.tree.map(lambda a, b: a + b, prev_grads, cur_grads), (out, local_loss)

        grads = jax.tree.map(u.math.zeros_like, weights.to_dict_values())
        grads, (outs, losses) = brainstate.transform.scan(etrace_step, grads, inputs)
        grads = brainstate.nn.clip_grad_norm(grads, 1.0)
        self.optimizer.update(grads)
        return losses.mean()


class AutoBatchingTrainer(ManualBatchingTrainer):
    @brainstate.transform.jit(static_argnums=0)
    def train(self, inputs, targets):
        model = brainscale.ES_D_RTRL(self.model, decay_or_rank=0.9)

        @brainstate.transform.vmap_new_states(axis_size=inputs.shape[1], state_tag="new")
        def init():
            brainstate.nn.init_all_states(self.model)
            model.compile_graph(inputs[0, 0])             # one example, no batch axis

        init()
        vmap_model = brainstate.nn.Vmap(model, vmap_states="new")
        weights = self.model.states(brainstate.ParamState)

        def etrace_loss(inp):
            out = vmap_model(inp)
            loss = braintools.metric.softmax_cross_entropy_with_integer_labels(out, targets).mean()
            return loss, out

        def etrace_step(prev_grads, x):
            f_grad = brainstate.transform.grad(etrace_loss, weights, has_aux=True,
                                               return_value=True)
            cur_grads, local_loss, out = f_grad(x)
            return jax.tree.map(lambda a, b: a + b, prev_grads, cur_grads), (out, local_loss)

        grads = jax.tree.map(u.math.zeros_like, weights.to_dict_values())
        grads, (outs, losses) = brainstate.transform.scan(etrace_step, grads, inputs)
        grads = brainstate.nn.clip_grad_norm(grads, 1.0)
        self.optimizer.update(grads)
        return losses.mean()


def test_tutorial_batching_manual_and_automatic():
    n_time, n_batch, n_in, n_hidden, n_out = 5, 4, 6, 8, 3
    with brainstate.environ.context(dt=1.0 * u.ms):
        brainstate.random.seed(1)
        xs = brainstate.random.rand(n_time, n_batch, n_in) * 3.
        ys = brainstate.random.randint(0, n_out, n_batch)
        losses = {}
        for cls in (ManualBatchingTrainer, AutoBatchingTrainer):
            brainstate.random.seed(2)
            trainer = cls(n_in, n_hidden, n_out)
            weights = trainer.model.states(brainstate.ParamState)
            before = _values(weights)
            losses[cls.__name__] = [float(trainer.train(xs, ys)) for _ in range(2)]
            assert np.all(np.isfinite(losses[cls.__name__]))
            assert _changed(before, _values(weights))
    # the same model, data and initial weights: both ways of batching give the same first loss
    assert losses["ManualBatchingTrainer"][0] == pytest.approx(losses["AutoBatchingTrainer"][0],
                                                               rel=1e-5)


# ---------------------------------------------------------------------------------------
# 3. tutorial: show_graph
# ---------------------------------------------------------------------------------------

class LIF_Delta_Net(brainstate.nn.Module):
    def __init__(self, n_in, n_rec, n_out, tau_mem=5. * u.ms, tau_o=5. * u.ms, V_th=1. * u.mV,
                 spk_fun=braintools.surrogate.ReluGrad(), spk_reset: str = "soft",
                 rec_scale: float = 1., ff_scale: float = 1.):
        super().__init__()
        self.neu = bp.LIF(n_rec, tau=tau_mem, spk_fun=spk_fun, spk_reset=spk_reset, V_th=V_th)
        rec_init = braintools.init.KaimingNormal(rec_scale, unit=u.mV)
        ff_init = braintools.init.KaimingNormal(ff_scale, unit=u.mV)
        w_init = u.math.concatenate([ff_init([n_in, n_rec]), rec_init([n_rec, n_rec])], axis=0)
        self.syn = brainstate.nn.DeltaProj(
            comm=brainscale.nn.Linear(n_in + n_rec, n_rec, w_init=w_init,
                                      b_init=braintools.init.ZeroInit(unit=u.mV)),
            post=self.neu)
        self.out = brainscale.nn.LeakyRateReadout(in_size=n_rec, out_size=n_out, tau=tau_o,
                                                  w_init=braintools.init.KaimingNormal())

    def update(self, spk):
        self.syn(u.math.concatenate([spk, self.neu.get_spike()], axis=-1))
        return self.out(self.neu())


with warnings.catch_warnings():          # brainstate.nn.Neuron is brainpy.state.Neuron now
    warnings.simplefilter("ignore", DeprecationWarning)
    _Neuron = brainstate.nn.Neuron


class GIF(_Neuron):
    """Generalised integrate-and-fire: membrane V and an adaptation current I2."""

    def __init__(self, size, V_rest=0. * u.mV, V_th_inf=1. * u.mV, R=1. * u.ohm,
                 tau=20. * u.ms, tau_I2=50. * u.ms, A2=0. * u.mA,
                 V_initializer=braintools.init.ZeroInit(unit=u.mV),
                 I2_initializer=braintools.init.ZeroInit(unit=u.mA),
                 spike_fun=braintools.surrogate.ReluGrad(), spk_reset: str = "soft",
                 name: str = None):
        super().__init__(size, name=name, spk_fun=spike_fun, spk_reset=spk_reset)
        self.V_rest = braintools.init.param(V_rest, self.varshape, allow_none=False)
        self.V_th_inf = braintools.init.param(V_th_inf, self.varshape, allow_none=False)
        self.R = braintools.init.param(R, self.varshape, allow_none=False)
        self.tau = braintools.init.param(tau, self.varshape, allow_none=False)
        self.tau_I2 = braintools.init.param(tau_I2, self.varshape, allow_none=False)
        self.A2 = braintools.init.param(A2, self.varshape, allow_none=False)
        self._V_initializer = V_initializer
        self._I2_initializer = I2_initializer

    def init_state(self):
        self.V = brainstate.HiddenState(braintools.init.param(self._V_initializer, self.varshape))
        self.I2 = brainstate.HiddenState(braintools.init.param(self._I2_initializer, self.varshape))

    def update(self, x=0.):
        last_spk = jax.lax.stop_gradient(self.get_spike())
        last_V = self.V.value - self.V_th_inf * last_spk
        last_I2 = self.I2.value - self.A2 * last_spk
        I2 = brainstate.nn.exp_euler_step(lambda i2: - i2 / self.tau_I2, last_I2)
        V = brainstate.nn.exp_euler_step(
            lambda v, Iext: (- v + self.V_rest + self.R * Iext) / self.tau, last_V, x + I2)
        self.I2.value = I2
        self.V.value = V
        inp = self.V.value - self.V_th_inf
        return jax.nn.standardize(u.get_magnitude(inp))

    def get_spike(self, V=None):
        V = self.V.value if V is None else V
        return self.spk_fun((V - self.V_th_inf) / self.V_th_inf)


class GifLayer(brainstate.nn.Module):
    def __init__(self, n_in, n_rec, ff_scale=1., rec_scale=1., tau_neu=5. * u.ms,
                 tau_syn=5. * u.ms, tau_I2=5. * u.ms, A2=1. * u.mA):
        super().__init__()
        ff_init = braintools.init.KaimingNormal(ff_scale, unit=u.mA)
        rec_init = braintools.init.KaimingNormal(rec_scale, unit=u.mA)
        w = u.math.concatenate([ff_init((n_in, n_rec)), rec_init((n_rec, n_rec))], axis=0)
        self.ir2r = brainscale.nn.Linear(n_in + n_rec, n_rec, w_init=w,
                                         b_init=braintools.init.ZeroInit(unit=u.mA))
        self.exp = brainscale.nn.Expon(n_rec, tau=tau_syn,
                                       g_initializer=braintools.init.ZeroInit(unit=u.mA))
        self.r = GIF(n_rec, V_rest=0. * u.mV, V_th_inf=1. * u.mV, A2=A2, tau=tau_neu,
                     tau_I2=brainstate.random.uniform(100. * u.ms, tau_I2 * 1.5, n_rec))

    def update(self, spikes):
        cond = self.ir2r(u.math.concatenate([spikes, self.r.get_spike()], axis=-1))
        return self.r(self.exp(cond))


class GifNet(brainstate.nn.Module):
    def __init__(self, n_in, n_rec: list, n_out, tau_o=5. * u.ms):
        super().__init__()
        self.layers = []
        for n in n_rec:
            self.layers.append(GifLayer(n_in, n))
            n_in = n
        self.out = brainscale.nn.LeakyRateReadout(n_in, n_out, tau=tau_o,
                                                  w_init=braintools.init.KaimingNormal())

    def update(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def _online_steps(model, net, xs):
    weights = net.states(brainstate.ParamState)

    @brainstate.transform.jit
    def step(x):
        return brainstate.transform.grad(lambda: jnp.sum(u.get_mantissa(model(x)) ** 2),
                                         weights)()

    return [step(x) for x in xs][-1]


def test_tutorial_show_graph(capsys):
    with brainstate.environ.context(dt=0.1 * u.ms):
        brainstate.random.seed(3)
        net = LIF_Delta_Net(n_in=10, n_rec=20, n_out=5)
        brainstate.nn.init_all_states(net)
        model = brainscale.D_RTRL(net)
        model.compile_graph(brainstate.random.rand(10))
        model.show_graph()
        text = capsys.readouterr().out
        assert "group G0 = [%neu.V]" in text
        assert "rel R0 = %syn.comm.weight_op -> %y0 -> G0" in text

        net2 = GifNet(n_in=10, n_rec=[6, 6, 6], n_out=5)
        brainstate.nn.init_all_states(net2)
        model2 = brainscale.D_RTRL(net2)
        model2.compile_graph(brainstate.random.rand(10))
        model2.show_graph()
        text = capsys.readouterr().out
        for i in range(3):          # each layer: synapse, V and I2 in one group of three states
            group = next(l for l in text.splitlines()
                         if l.strip().startswith("group") and f"%layers.{i}.r.V" in l)
            assert f"%layers.{i}.r.I2" in group and f"%layers.{i}.exp.g" in group
            assert "n=3" in group

        xs = brainstate.random.rand(3, 10)
        for m, n in ((model, net), (model2, net2)):
            grads = _online_steps(m, n, xs)
            leaves = [np.asarray(u.get_mantissa(l)) for l in jax.tree.leaves(grads)]
            assert leaves and all(np.all(np.isfinite(l)) for l in leaves)
            assert any(np.any(l != 0) for l in leaves)


# ---------------------------------------------------------------------------------------
# docs/compat.md's example
# ---------------------------------------------------------------------------------------

def test_compat_page_example_runs(capsys, monkeypatch):
    import pathlib
    import re
    monkeypatch.setenv("BRAINSCALE_DOT_RENDERER", "none")
    page = pathlib.Path(__file__).resolve().parents[2] / "docs" / "compat.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) == 1
    ns: dict = {}
    exec(compile(blocks[0], "compat.md[python block 0]", "exec"), ns)
    assert "graph @Net.update" in capsys.readouterr().out
    xs, dfs = ns["xs"], ns["dfs"]
    assert len(xs) == 1 and len(dfs) == 1
    assert np.shape(next(iter(dfs.values()))) == (4, 8, 1)     # (batch, neurons, states)
