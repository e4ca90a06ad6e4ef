"""Every code cell of the two seed documents runs, unchanged apart from forced renames.

The seeds (``key-concepts.zh.md`` and ``etraceop-tutorial.zh.md``, this project's own design
documents) are not part of a clean clone, so their code cells are copied here, each marked
with its section and ``In [n]`` number. The only changes are the renames today's
brainstate / braintools force:

* ``bst.surrogate`` → ``braintools.surrogate`` and ``bst.init`` → ``braintools.init``
  (brainstate 0.5 moved them to braintools);
* ``bst.nn.Neuron`` → ``brainscale.nn.Neuron`` in the customised LIF (§3.1):
  ``brainstate.nn.Neuron`` is now ``brainpy.state.Neuron``, which no longer takes the
  seed's ``keep_size``; ``brainscale.nn.Neuron`` does, and is a ``brainpy.state.Neuron``.

``bst.nn.DeltaProj`` (§2) stays: on brainstate 0.5-0.6 it is ``brainpy.state.DeltaProj``
(with a DeprecationWarning), which accepts ``brainscale.nn`` neurons when brainpy is
installed. Output cells of the notebooks (reprs with memory addresses) are not code; the
tests check the same facts (shapes, field names, the trace values of In [19]-[20]).
"""
from __future__ import annotations

import os
import sys
import warnings
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

needs_brainpy = pytest.mark.skipif(not brainscale.nn.HAS_BRAINPY,
                                   reason="bst.nn.DeltaProj is brainpy.state's (not installed)")
# brainstate's warning on its deprecated alias bst.nn.DeltaProj (-> brainpy.state.DeltaProj)
pytestmark = pytest.mark.filterwarnings("ignore:'brainstate.nn.DeltaProj' is deprecated")


# ======================================================================================
# key-concepts.zh.md
# ======================================================================================

# ------------------------------------------------------------------ key-concepts In [11]
# import brainstate as bst
# import brainunit as u
#
# import brainscale
# (the module imports above)


# ------------------------------------------------------------------ key-concepts §2, In [12]
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
        self.syn = bst.nn.DeltaProj(
            # 使用 brainscale.nn 内的 Linear 模型
            comm=brainscale.nn.Linear(n_in + n_rec, n_rec, w_init=w_init, b_init=braintools.init.ZeroInit(unit=u.mV)),
            post=self.neu
        )

    def update(self, spk):
        inp = u.math.concatenate([spk, self.neu.get_spike()], axis=-1)
        self.syn(inp)
        self.neu()
        return self.neu.get_spike()


# ------------------------------------------------------------------ key-concepts §2, In [13]
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


# ------------------------------------------------------------------ key-concepts §3.1, In [14]
# (``import jax`` and ``from typing import Callable`` are the module imports above)
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


# ------------------------------------------------------------------ key-concepts §3.2, In [15]
def generate_weight(
    n_in, n_out, init: Callable = braintools.init.KaimingNormal()
) -> brainscale.ETraceParam:
    weight = init([n_in, n_out])
    bias = braintools.init.ZeroInit()([n_out])

    # 这里是最关键的一步，我们定义了一个 ETraceParam 类，用于描述权重矩阵和偏置向量
    return brainscale.ETraceParam({'weight': weight, 'bias': bias})


# ------------------------------------------------------------------ key-concepts §3.3 (fenced)
# The signature listing of an op (its body is ``pass``); it runs as written.
def op(
    x: jax.Array,
    param: brainscale.ETraceParam
) -> jax.Array:
    pass


# ------------------------------------------------------------------ key-concepts §3.3, In [16]
@brainscale.ETraceOp
def matmul(x, w):
    weight = w['weight']
    bias = w['bias']
    return x @ weight + bias


# ------------------------------------------------------------------ key-concepts §3.4, In [17]
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


# ------------------------------------------------------------------ key-concepts §4, In [18]-[20]
def cells_18_to_20():
    """The cells In [18], [19], [20] in order; returns (model, out, printed etrace_xs,
    printed etrace_dfs)."""
    # In [18]
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

    # In [19]
    with bst.environ.context(dt=0.1 * u.ms):

        out = model(example_input)

    # 通过调用 model.etrace_xs 可以获取模型对突触前神经活动追踪的 eligibility trace
    xs_repr = repr(bst.util.PrettyMapping(model.etrace_xs))

    # In [20]
    # 通过调用 model.etrace_dfs 可以获取模型对突触后神经活动追踪的 eligibility trace
    dfs_repr = repr(bst.util.PrettyMapping(model.etrace_dfs))
    return model, example_input, out, xs_repr, dfs_repr


@needs_brainpy
def test_key_concepts_cells_18_to_20_lif_delta_net():
    """§2 In [12] (with the brainpy/brainstate DeltaProj) compiled and run by §4."""
    model, example_input, out, xs_repr, dfs_repr = cells_18_to_20()
    assert isinstance(model.model.syn, bst.nn.DeltaProj)          # brainpy's projection
    assert out.shape == (10,)
    assert "EligibilityTrace" in xs_repr and "EligibilityTrace" in dfs_repr
    # one input trace ε_x over [spk, rec spikes] (20) and one ε_f over the 10 LIF neurons
    (xs,) = model.etrace_xs.values()
    assert xs.value.shape == (20,)
    (dfs,) = model.etrace_dfs.values()
    assert int(np.prod(dfs.value.shape)) == 10
    # the notebook's values: after one step from a zero state ε_x = x and ε_f = 1 - α = 0.01
    np.testing.assert_allclose(np.asarray(xs.value)[:10], np.asarray(example_input, np.float32))
    alpha = brainscale.decay_from(0.99)
    np.testing.assert_allclose(np.ravel(np.asarray(dfs.value)), (1 - alpha) * 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.ravel(np.asarray(dfs.value)), 0.01, rtol=1e-5)


def test_key_concepts_cell_13_gru_net():
    with bst.environ.context(dt=0.1 * u.ms):
        model = GRU_Net(10, 8, 4, 3)
        bst.nn.init_all_states(model)
        model = brainscale.DiagIODimAlgorithm(model, decay_or_rank=0.99)
        example_input = bst.random.random(10) < 0.1
        with pytest.warns(brainscale.NoTemporalCreditWarning, match="Wr"):
            model.compile_graph(example_input)
        out = model(example_input)
    assert out.shape == (4,)
    assert len(model.graph.groups) == 3
    # GRUCell is brainscale 0.1's (reset gate inside W_h [x, r ⊙ h]): each W_r feeds W_h's
    # input and gets the instantaneous gradient; W_z and W_h get io traces
    dims = {}
    rel = {r.id: r.param for r in model.graph.relations}
    for t in model.graph.traces:
        for rid in t.relations:
            dims[rel[rid]] = t.dim
    assert {d for p, d in dims.items() if p.endswith("Wr.weight_op")} == {"none"}
    assert {d for p, d in dims.items() if not p.endswith("Wr.weight_op")} == {"io"}
    assert len(model.etrace_xs) > 0 and len(model.etrace_dfs) > 0


class CustomNet(bst.nn.Module):
    """The seed's customised pieces (§3.1 LIF, §3.2 generate_weight, §3.3 matmul, §3.4
    Linear) in one network (our composition: the seed shows the pieces)."""

    def __init__(self, n_in, n_rec):
        super().__init__()
        self.neu = LIF(n_rec)
        self.ff = Linear(n_in, n_rec, w_init=braintools.init.KaimingNormal(2.))
        self.rec = generate_weight(n_rec, n_rec)

    def update(self, spk):
        current = self.ff(spk) + matmul(self.neu.get_spike(), self.rec.value)
        return self.neu(current * u.mA)


def test_key_concepts_cells_14_to_17_custom_pieces():
    assert op(jnp.ones(2), None) is None          # §3.3's signature listing
    neu = LIF(5)                       # the seed's signature: size, keep_size=False
    assert neu.varshape == (5,) and neu.keep_size is False
    assert LIF((2, 3)).varshape == (6,)          # keep_size=False flattens, as brainstate did
    assert LIF((2, 3), keep_size=True).varshape == (2, 3)
    w = generate_weight(3, 2)
    assert isinstance(w, brainscale.ETraceParam) and set(w.value) == {"weight", "bias"}
    assert isinstance(matmul, brainscale.ETraceOp)
    np.testing.assert_allclose(matmul(jnp.ones(3), w.value), jnp.ones(3) @ w.value["weight"])
    lin = Linear((3,), (2,))
    assert isinstance(lin.weight_op, brainscale.ETraceParamOp)
    with bst.environ.context(dt=0.1 * u.ms):
        model = CustomNet(10, 6)
        bst.nn.init_all_states(model)
        model = brainscale.DiagIODimAlgorithm(model, decay_or_rank=0.99)
        example_input = bst.random.random(10) < 0.1
        model.compile_graph(example_input)
        out = model(example_input)
    assert out.shape == (6,)
    assert len(model.etrace_xs) == 2 and len(model.etrace_dfs) == 2
    assert "neu.V" in model.ir()


@needs_brainpy
def test_custom_lif_is_a_brainpy_neuron_for_brainstate_projections():
    """The §3.1 LIF (a brainscale.nn.Neuron) is the post of ``bst.nn.DeltaProj``."""
    import brainpy.state as bp
    neu = LIF(4)
    assert isinstance(neu, bp.Neuron)

    class Net(bst.nn.Module):
        def __init__(self):
            super().__init__()
            self.neu = neu
            self.syn = bst.nn.DeltaProj(comm=brainscale.nn.Linear(
                3, 4, w_init=braintools.init.KaimingNormal(2., unit=u.mV)), post=self.neu)

        def update(self, x):
            self.syn(x)
            return self.neu()

    with bst.environ.context(dt=1. * u.ms):
        net = Net()
        bst.nn.init_all_states(net)
        learner = brainscale.DiagParamDimAlgorithm(net).compile_graph(jnp.ones(3))
        assert learner(jnp.ones(3)).shape == (4,)
    assert "neu.V" in learner.ir()


@pytest.mark.parametrize("alg", ["param", "io"])
def test_seed_models_match_oracle_with_bool_inputs(alg):
    """LIF_Delta_Net (with brainpy's DeltaProj when installed) and the customised-LIF net on
    BOOL spike inputs, against the oracle.

    (CustomNet's feed-forward op reads the bool input itself; under ES-D-RTRL the oracle
    evaluates that op on the float trace ε_x, which its bool-typed marker equation rejects,
    so that one combination is fed float 0/1 spikes instead.)
    """
    T = 6
    rng = np.random.RandomState(0)
    spikes = jnp.asarray(rng.rand(T, 10) < 0.5)
    loss = lambda out, tg: jnp.sum((u.get_mantissa(out) - tg) ** 2)  # noqa: E731
    makers = [("custom", lambda: CustomNet(10, 6))]
    if brainscale.nn.HAS_BRAINPY:
        makers.insert(0, ("delta", lambda: LIF_Delta_Net(10, 6, ff_scale=4., rec_scale=2.)))
    for name, make in makers:
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


# ======================================================================================
# etraceop-tutorial.zh.md
# ======================================================================================

def test_etraceop_tutorial_cells():
    # ------------------------------------------------------------------ In [35]
    import brainevent
    import brainstate
    import jax
    import jax.numpy as jnp

    import brainscale

    reprs = {}

    # ------------------------------------------------------------------ MatMulOp, In [36]
    # 标准矩阵乘法

    reprs[36] = brainscale.ETraceParam(
        {
            'weight': brainstate.random.rand(4, 5),
            'bias': brainstate.random.rand(5)
        },
        brainscale.MatMulOp()
    )

    # ------------------------------------------------------------------ MatMulOp, In [37]
    # 带掩码的矩阵乘法（实现稀疏连接）

    reprs[37] = brainscale.ETraceParam(
        {
            'weight': brainstate.random.rand(4, 5),
            'bias': brainstate.random.rand(5)
        },
        brainscale.MatMulOp(
            weight_mask=brainstate.random.rand(4, 5) > 0.5
        )
    )

    # ------------------------------------------------------------------ MatMulOp, In [38]
    # 对权重应用函数变换

    reprs[38] = brainscale.ETraceParam(
        {
            'weight': brainstate.random.rand(4, 5),
            'bias': brainstate.random.rand(5)
        },
        brainscale.MatMulOp(
            weight_fn=jnp.abs   # 确保权重为正
        )
    )

    # ------------------------------------------------------------------ MatMulOp, In [39]
    # 同时使用掩码和权重函数
    reprs[39] = brainscale.ETraceParam(
        {
            'weight': brainstate.random.rand(4, 5),
            'bias': brainstate.random.rand(5)
        },
        brainscale.MatMulOp(
            weight_fn=jnp.abs,
            weight_mask=brainstate.random.rand(4, 5) > 0.5
        )
    )

    # ------------------------------------------------------------------ ConvOp, In [40]
    # 以2D卷积为例
    reprs[40] = brainscale.ETraceParam(
        {
            'weight': brainstate.random.rand(3, 3),
            'bias': jnp.zeros(16)
        },
        brainscale.ConvOp(
            xinfo=jax.ShapeDtypeStruct((32, 3, 3), jnp.float32),  # (height, width, channels)
            window_strides=[1, 1],
            padding='SAME',
        )
    )

    # ------------------------------------------------------------------ ConvOp, In [41]
    # 以2D卷积为例
    reprs[41] = brainscale.ETraceParam(
        {
            'weight': brainstate.random.rand(3, 3),
            'bias': jnp.zeros(16)
        },
        brainscale.ConvOp(
            xinfo=jax.ShapeDtypeStruct((32, 3, 3), jnp.float32),
            window_strides=[1, 1],
            padding='SAME',
            weight_mask=brainstate.random.rand(3, 3) > 0.5
        )
    )

    # ------------------------------------------------------------------ ConvOp, In [42]
    # 以2D卷积为例
    reprs[42] = brainscale.ETraceParam(
        {
            'weight': brainstate.random.rand(3, 3),
            'bias': jnp.zeros(16)
        },
        brainscale.ConvOp(
            xinfo=jax.ShapeDtypeStruct((32, 3, 3), jnp.float32),
            window_strides=[1, 1],
            padding='SAME',
            weight_fn=jnp.abs
        )
    )

    # ------------------------------------------------------------------ ConvOp, In [43]
    # 以2D卷积为例
    reprs[43] = brainscale.ETraceParam(
        {
            'weight': brainstate.random.rand(3, 3),
            'bias': jnp.zeros(16)
        },
        brainscale.ConvOp(
            xinfo=jax.ShapeDtypeStruct((32, 3, 3), jnp.float32),
            window_strides=[1, 1],
            padding='SAME',
            weight_mask=brainstate.random.rand(3, 3) > 0.5,
            weight_fn=jnp.abs,
        )
    )

    # ------------------------------------------------------------------ SpMatMulOp, In [44]
    data = jnp.where(
        brainstate.random.rand(100, 100) < 0.2,
        brainstate.random.rand(100, 100),
        0.
    )
    csr = brainevent.CSR.fromdense(data)

    # ------------------------------------------------------------------ SpMatMulOp, In [45]
    reprs[45] = brainscale.ETraceParam(
        {'weight': brainstate.random.rand(100)},
        brainscale.SpMatMulOp(csr)
    )

    # ------------------------------------------------------------------ SpMatMulOp, In [46]
    reprs[46] = brainscale.ETraceParam(
        {'weight': brainstate.random.rand(100)},
        brainscale.SpMatMulOp(csr, weight_fn=jnp.abs)
    )

    # ------------------------------------------------------------------ ElemWiseOp, In [47]
    reprs[47] = brainscale.ETraceParam(
        brainstate.random.rand(4),
        brainscale.ElemWiseOp(jnp.abs)  # 绝对值操作
    )

    # ------------------------------------------------------------------ ElemWiseOp, In [48]
    reprs[48] = brainscale.ETraceParam(
        brainstate.random.rand(4),
        brainscale.ElemWiseOp(jnp.exp)  # 指数操作
    )

    # ------------------------------------------------------------------ ElemWiseOp, In [49]
    # 使用自定义的lambda函数

    reprs[49] = brainscale.ETraceParam(
        brainstate.random.rand(4),
        brainscale.ElemWiseOp(lambda x: x ** 2 + 1.)  # 自定义函数
    )

    # ------------------------------------------------------------------ custom op, In [50]
    class CustomizedMatMul(brainscale.ETraceOp):
        """
        一个自定义的矩阵乘法资格迹算子。
        它实现了 y = x @ w['weight'] + w['bias'] 的计算。
        """
        def xw_to_y(self, x, w: dict):
            """
            前向传播：计算 y = x @ weight + bias
            """
            return jnp.dot(x, w['weight']) + w['bias']

        def yw_to_w(self, y, w: dict):
            """
            参数更新（用于资格迹）：计算学习信号如何影响权重和偏置。
            这类似于计算梯度 dL/dw = dL/dy * dy/dw。
            """

            # 对于权重 w['weight']，其梯度是输入 x 和输出梯度 y 的外积。
            # 这里，我们将 y 的维度从 (B, D_out) 扩展到 (B, 1, D_out)，
            # 将 x 的维度从 (B, D_in) 扩展到 (B, D_in, 1)，
            # 从而通过广播乘法 (x[..., None] * y[:, None, :]) 实现外积的批处理计算。
            # 此处为了简化，我们以一种更抽象的方式来表示这种依赖关系。
            y_expanded = jnp.expand_dims(y, axis=-2) # 形状变为 (..., 1, D_out)
            return {
                'weight': y_expanded * w['weight'], # 示例性的更新规则
                'bias': y * w['bias'] # 示例性的更新规则
            }

    # ------------------------------------------------------------------ custom op, In [51]
    # 1. 实例化自定义算子
    my_op = CustomizedMatMul()

    # 2. 使用ETraceParam将算子与具体参数关联
    param = brainscale.ETraceParam(
        {
            'weight': brainstate.random.rand(4, 5),  # D_in=4, D_out=5
            'bias': brainstate.random.rand(5)
        },
        my_op # 将自定义算子实例传入
    )

    # 3. 在模型中使用 (模拟)
    # 创建一些模拟的输入数据
    dummy_input = brainstate.random.rand(1, 4) # Batch=1, D_in=4

    # brainscale的运行器会自动调用 op.xw_to_y(dummy_input, param.value)
    # 我们可以手动调用来验证
    output = my_op.xw_to_y(dummy_input, param.value)

    print("自定义算子实例化:")
    print(param)
    print("\n前向计算输出:")
    print(output)
    print("输出形状:", output.shape)

    # ------------------------------------------------------------------ the outputs' facts
    for n in (36, 37, 38, 39):
        r = repr(reprs[n])
        assert "op=MatMulOp(" in r and "float32[4,5]" in r and "is_etrace=True" in r, r
    assert "weight_mask=None" in repr(reprs[36]) and "weight_mask=None" not in repr(reprs[37])
    for n in (40, 41, 42, 43):
        r = repr(reprs[n])
        assert "op=ConvOp(" in r and "float32[16]" in r and "(32, 3, 3)" in r, r
    assert "weight_mask=None" not in repr(reprs[41])
    for n in (45, 46):
        assert "op=SpMatMulOp(" in repr(reprs[n]) and "float32[100]" in repr(reprs[n])
    for n in (47, 48, 49):
        assert "op=ElemWiseOp(" in repr(reprs[n]) and "is_diagonal=True" in repr(reprs[n])
    assert "gradient=<ETraceGrad.adaptive: 'adaptive'>" in repr(reprs[36])
    assert output.shape == (1, 5)
    np.testing.assert_allclose(output, dummy_input @ param.value["weight"] + param.value["bias"],
                               rtol=1e-6)
    assert "CustomizedMatMul(" in repr(param)
    # the custom op's rule is MatMulOp's
    y = jnp.arange(5.)
    ref = brainscale.MatMulOp().yw_to_w(y, param.value)
    for k in ref:
        np.testing.assert_allclose(my_op.yw_to_w(y, param.value)[k], ref[k])
