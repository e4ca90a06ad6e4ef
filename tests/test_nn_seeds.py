"""The seed documents' models run unchanged apart from imports.

Import changes only: ``bst.nn.Neuron`` → ``brainscale.nn.Neuron``, ``bst.nn.DeltaProj`` →
``brainscale.nn.DeltaProj``, ``bst.init`` → ``braintools.init``, ``bst.surrogate`` →
``braintools.surrogate`` (brainstate moved them out). The model bodies are the seed's.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import brainstate as bst
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import brainscale  # noqa: E402
from oracle import DenseOracle  # noqa: E402
from test_nn_oracle import _fast_xla_compiles  # noqa: E402,F401


# ------------------------------------------------------------------ seed: key-concepts §2
class LIF_Delta_Net(bst.nn.Module):
    def __init__(
        self,
        n_in,
        n_rec,
        tau_mem=5. * u.ms,
        V_th=1. * u.mV,
        spk_fun=braintools.surrogate.ReluGrad(),
        spk_reset: str = 'soft',
        rec_scale: float = 1.,
        ff_scale: float = 1.,
    ):
        super().__init__()

        # 使用 brainscale.nn 内的 LIF 模型
        self.neu = brainscale.nn.LIF(n_rec, tau=tau_mem, spk_fun=spk_fun, spk_reset=spk_reset, V_th=V_th)

        # 构建输入和循环连接权重
        rec_init = braintools.init.KaimingNormal(rec_scale, unit=u.mV)
        ff_init = braintools.init.KaimingNormal(ff_scale, unit=u.mV)
        w_init = u.math.concatenate([ff_init([n_in, n_rec]), rec_init([n_rec, n_rec])], axis=0)

        # 使用 delta 突触投射來构建输入和循环连接
        self.syn = brainscale.nn.DeltaProj(
            # 使用 brainscale.nn 内的 Linear 模型
            comm=brainscale.nn.Linear(n_in + n_rec, n_rec, w_init=w_init, b_init=braintools.init.ZeroInit(unit=u.mV)),
            post=self.neu
        )

    def update(self, spk):
        inp = u.math.concatenate([spk, self.neu.get_spike()], axis=-1)
        self.syn(inp)
        self.neu()
        return self.neu.get_spike()


class GRU_Net(bst.nn.Module):
    def __init__(
        self,
        n_in: int,
        n_rec: int,
        n_out: int,
        n_layer: int,
    ):
        super().__init__()

        # 构建 GRU 层
        self.layers = []
        for i in range(n_layer - 1):
            # 使用 brainscale.nn 内的 GRUCell 模型
            self.layers.append(brainscale.nn.GRUCell(n_in, n_rec))
            n_in = n_rec
        self.layers.append(brainscale.nn.GRUCell(n_in, n_out))

    def update(self, x):
        # 更新 GRU 层
        for layer in self.layers:
            x = layer(x)
        return x


# ------------------------------------------------------------------ seed: key-concepts §3.1
class LIF(brainscale.nn.Neuron):
    """
    Leaky integrate-and-fire neuron model.
    """

    def __init__(
        self,
        size: bst.typing.Size,
        keep_size: bool = False,
        R: bst.typing.ArrayLike = 1. * u.ohm,
        tau: bst.typing.ArrayLike = 5. * u.ms,
        V_th: bst.typing.ArrayLike = 1. * u.mV,
        V_reset: bst.typing.ArrayLike = 0. * u.mV,
        V_rest: bst.typing.ArrayLike = 0. * u.mV,
        V_initializer: Callable = braintools.init.Constant(0. * u.mV),
        spk_fun: Callable = braintools.surrogate.ReluGrad(),
        spk_reset: str = 'soft',
        name: str = None,
    ):
        super().__init__(size, keep_size=keep_size, name=name, spk_fun=spk_fun, spk_reset=spk_reset)

        # parameters
        self.R = braintools.init.param(R, self.varshape)
        self.tau = braintools.init.param(tau, self.varshape)
        self.V_th = braintools.init.param(V_th, self.varshape)
        self.V_rest = braintools.init.param(V_rest, self.varshape)
        self.V_reset = braintools.init.param(V_reset, self.varshape)
        self.V_initializer = V_initializer

    def init_state(self, batch_size: int = None, **kwargs):
        # 这里是最关键的一步，我们定义了一个 ETraceState 类，用于描述膜电位的动力学状态
        self.V = brainscale.ETraceState(braintools.init.param(self.V_initializer, self.varshape, batch_size))

    def reset_state(self, batch_size: int = None, **kwargs):
        self.V.value = braintools.init.param(self.V_initializer, self.varshape, batch_size)

    def get_spike(self, V=None):
        V = self.V.value if V is None else V
        v_scaled = (V - self.V_th) / (self.V_th - self.V_reset)
        return self.spk_fun(v_scaled)

    def update(self, x=0. * u.mA):
        last_v = self.V.value
        lst_spk = self.get_spike(last_v)
        V_th = self.V_th if self.spk_reset == 'soft' else jax.lax.stop_gradient(last_v)
        V = last_v - (V_th - self.V_reset) * lst_spk
        # membrane potential
        dv = lambda v: (-v + self.V_rest + self.R * self.sum_current_inputs(x, v)) / self.tau
        V = bst.nn.exp_euler_step(dv, V)
        V = self.sum_delta_inputs(V)
        self.V.value = V
        return self.get_spike(V)


# ------------------------------------------------------------------ seed: key-concepts §3.2-3.4
def generate_weight(
    n_in, n_out, init: Callable = braintools.init.KaimingNormal()
) -> brainscale.ETraceParam:
    weight = init([n_in, n_out])
    bias = braintools.init.ZeroInit()([n_out])

    # 这里是最关键的一步，我们定义了一个 ETraceParam 类，用于描述权重矩阵和偏置向量
    return brainscale.ETraceParam({'weight': weight, 'bias': bias})


@brainscale.ETraceOp
def matmul(x, w):
    weight = w['weight']
    bias = w['bias']
    return x @ weight + bias


class Linear(bst.nn.Module):
    """
    Linear layer.
    """
    def __init__(
        self,
        in_size: bst.typing.Size,
        out_size: bst.typing.Size,
        w_init: Callable = braintools.init.KaimingNormal(),
    ):
        super().__init__()

        # input and output shape
        self.in_size = in_size
        self.out_size = out_size

        # weights
        weight = braintools.init.param(w_init, [self.in_size[-1], self.out_size[-1]], allow_none=False)

        # operation
        op = lambda x, w: u.math.matmul(x, w)

        # 这里是最关键的一步，我们定义了一个 ETraceParamOp 类，用于描述权重矩阵和操作
        self.weight_op = brainscale.ETraceParamOp(weight, op)

    def update(self, x):
        # ETraceParamOp 的操作
        return self.weight_op.execute(x)


# ------------------------------------------------------------------ a network of the seed's
# customised pieces (our composition: the seed shows the pieces, not a network of them)
class CustomNet(bst.nn.Module):
    def __init__(self, n_in, n_rec):
        super().__init__()
        self.neu = LIF(n_rec)
        self.ff = Linear(n_in, n_rec, w_init=braintools.init.KaimingNormal(2.))
        self.rec = generate_weight(n_rec, n_rec)

    def update(self, spk):
        current = self.ff(spk) + matmul(self.neu.get_spike(), self.rec.value)
        return self.neu(current * u.mA)


def _print_traces(model):
    print(bst.util.PrettyMapping(model.etrace_xs))
    print(bst.util.PrettyMapping(model.etrace_dfs))


def test_lif_delta_net_seed_run(capsys):
    with bst.environ.context(dt=0.1 * u.ms):

        # 定义一个简单的LIF神经元构成的循环神经网络
        model = LIF_Delta_Net(10, 10)
        bst.nn.init_all_states(model)

        # 将该模型输入到在线学习算法中，以期进行在线学习
        model = brainscale.DiagIODimAlgorithm(model, decay_or_rank=0.99)

        # 根据一个输入数据编译模型的eligibility trace，
        # 此后，调用该模型不仅更新模型的状态，还会更新模型的eligibility trace
        example_input = bst.random.random(10) < 0.1
        model.compile_graph(example_input)

    with bst.environ.context(dt=0.1 * u.ms):

        out = model(example_input)

    _print_traces(model)
    printed = capsys.readouterr().out
    assert "ShortTermState" in printed or "EligibilityTrace" in printed
    assert out.shape == (10,)
    # one input trace ε_x over [spk, rec spikes] (20) and one ε_f over the 10 LIF neurons
    (xs,) = model.etrace_xs.values()
    assert xs.value.shape == (20,)
    (dfs,) = model.etrace_dfs.values()
    assert int(np.prod(dfs.value.shape)) == 10
    # the first step after a zero state: ε_x = x (decay·0 + x) and ε_f = (1 - α) df
    np.testing.assert_allclose(np.asarray(xs.value)[:10], np.asarray(example_input, np.float32))
    alpha = brainscale.decay_from(0.99)
    np.testing.assert_allclose(np.ravel(np.asarray(dfs.value)), (1 - alpha) * 1.0, rtol=1e-5)


def test_gru_net_seed_run():
    with bst.environ.context(dt=0.1 * u.ms):
        model = GRU_Net(10, 8, 4, 3)
        bst.nn.init_all_states(model)
        model = brainscale.DiagIODimAlgorithm(model, decay_or_rank=0.99)
        example_input = bst.random.random(10) < 0.1
        model.compile_graph(example_input)
        out = model(example_input)
    _print_traces(model)
    assert out.shape == (4,)
    assert len(model.graph.groups) == 3
    assert {t.dim for t in model.graph.traces} == {"io"}
    assert len(model.etrace_xs) > 0 and len(model.etrace_dfs) > 0


def test_customised_lif_seed_run():
    neu = LIF(5)                       # the seed's signature: size, keep_size=False
    assert neu.varshape == (5,) and neu.keep_size is False
    assert LIF((2, 3)).varshape == (6,)          # keep_size=False flattens, as brainstate did
    assert LIF((2, 3), keep_size=True).varshape == (2, 3)
    with bst.environ.context(dt=0.1 * u.ms):
        model = CustomNet(10, 6)
        bst.nn.init_all_states(model)
        model = brainscale.DiagIODimAlgorithm(model, decay_or_rank=0.99)
        example_input = bst.random.random(10) < 0.1
        model.compile_graph(example_input)
        out = model(example_input)
    _print_traces(model)
    assert out.shape == (6,)
    assert len(model.etrace_xs) == 2 and len(model.etrace_dfs) == 2
    assert "neu.V" in model.ir()


@pytest.mark.parametrize("alg", ["param", "io"])
def test_seed_models_match_oracle_with_bool_inputs(alg):
    """LIF_Delta_Net and the customised-LIF net on BOOL spike inputs, against the oracle.

    (CustomNet's feed-forward op reads the bool input itself; under ES-D-RTRL the oracle
    evaluates that op on the float trace ε_x, which its bool-typed marker equation rejects,
    so that one combination is fed float 0/1 spikes instead.)
    """
    T = 6
    rng = np.random.RandomState(0)
    spikes = jnp.asarray(rng.rand(T, 10) < 0.5)
    loss = lambda out, tg: jnp.sum((u.get_mantissa(out) - tg) ** 2)  # noqa: E731
    for name, make in (("delta", lambda: LIF_Delta_Net(10, 6, ff_scale=4., rec_scale=2.)),
                       ("custom", lambda: CustomNet(10, 6))):
        xs = spikes.astype(jnp.float32) if (name, alg) == ("custom", "io") else spikes
        with bst.environ.context(dt=1. * u.ms):
            bst.random.seed(1)
            net_a = make()
            bst.random.seed(1)
            net_b = make()
            bst.nn.init_all_states(net_a)
            bst.nn.init_all_states(net_b)
            learner = (brainscale.DiagParamDimAlgorithm(net_a) if alg == "param"
                       else brainscale.DiagIODimAlgorithm(net_a, decay_or_rank=0.9))
            learner.compile_graph(xs[0])
            orc = DenseOracle(net_b, xs[0], algorithm=alg,
                              decay_or_rank=0.9 if alg == "io" else None, loss_fn=loss)
            params = net_a.states(bst.ParamState)
            tg = jnp.asarray(rng.randn(T, 6), jnp.float32)
            step = bst.transform.jit(
                lambda x, t: bst.transform.grad(lambda: loss(learner(x), t), params)())
            seen = 0.
            for t in range(T):
                g = step(xs[t], tg[t])
                ref = orc.step(xs[t], target=tg[t])["grads"]
                for k in g:
                    a = np.concatenate([np.ravel(u.get_mantissa(v)) for v in jax.tree.leaves(g[k])])
                    b = np.concatenate([np.ravel(u.get_mantissa(v)) for v in jax.tree.leaves(ref[k])])
                    seen = max(seen, float(np.abs(b).max()))
                    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1., np.abs(b).max()))
            assert seen > 0
