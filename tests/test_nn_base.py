"""Unit tests of brainscale.nn's building blocks (no compilation)."""
from __future__ import annotations

import brainevent
import brainstate
import braintools
import brainunit as u
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import brainscale.nn as bnn
from brainscale.nn._base import _InputAccumulation

#: the base of bnn.Dynamics (brainpy.state.Dynamics when brainpy is installed) and the
#: fallback used without brainpy: both must give the same input accumulation
BASES = [bnn.Dynamics, _InputAccumulation]


# ------------------------------------------------------------------ input accumulation
@pytest.mark.parametrize("base", BASES, ids=["Dynamics", "fallback"])
def test_delta_inputs_call_and_pop(base):
    d = base(3)
    d.add_delta_input("a", jnp.ones(3))
    d.add_delta_input("b", lambda: 2. * jnp.ones(3))
    np.testing.assert_allclose(d.sum_delta_inputs(jnp.zeros(3)), 3.)
    assert list(d.delta_inputs) == ["b"]                      # the value was popped
    np.testing.assert_allclose(d.sum_delta_inputs(jnp.zeros(3)), 2.)   # callables stay
    d.add_delta_input("c", jnp.ones(3))
    np.testing.assert_allclose(d.sum_delta_inputs(jnp.zeros(3), pop=False), 3.)
    assert "c" in d.delta_inputs


@pytest.mark.parametrize("base", BASES, ids=["Dynamics", "fallback"])
def test_current_inputs_args_labels_and_errors(base):
    d = base(2)
    d.add_current_input("g", lambda v: 2. * v)
    d.add_current_input("x", jnp.ones(2), label="exc")
    d.add_current_input("y", 10. * jnp.ones(2), label="inh")
    out = d.sum_current_inputs(jnp.zeros(2), jnp.ones(2), label="exc")
    np.testing.assert_allclose(out, 1.)                       # only the 'exc' input
    out = d.sum_current_inputs(jnp.zeros(2), jnp.ones(2))
    np.testing.assert_allclose(out, 12.)                      # 2·v + 10; 'exc' was popped
    assert d.get_input("g")(3.) == 6.
    # messages: the fallback's, or brainpy.state's
    with pytest.raises(ValueError, match="already used|has been defined"):
        d.add_current_input("g", lambda v: v)
    with pytest.raises(ValueError, match="not registered|is not in"):
        d.get_input("nope")
    d.add_current_input("bad", "not a number")
    with pytest.raises(ValueError, match="bad"):
        d.sum_current_inputs(jnp.zeros(2), jnp.ones(2))
    assert base(4).sum_current_inputs(1.) == 1.


# ------------------------------------------------------------------ Neuron signatures
class _Toy(bnn.Neuron):
    def init_state(self, batch_size=None, **kw):
        self.V = brainscale.ETraceState(braintools.init.param(jnp.zeros, self.varshape, batch_size))

    def get_spike(self, V=None):
        V = self.V.value if V is None else V
        return self.spk_fun(V - 1.)


def test_neuron_signatures():
    n = _Toy(4)
    assert n.varshape == (4,) and n.num == 4 and n.spk_reset == "soft"
    assert isinstance(n.spk_fun, braintools.surrogate.InvSquareGrad)
    n = _Toy((2, 3), braintools.surrogate.ReluGrad(), "hard", name="toy")
    assert n.varshape == (2, 3) and n.spk_reset == "hard" and n.name == "toy"
    # the seed's signature: size, keep_size (keyword or positional), name, spk_fun, spk_reset
    assert _Toy((2, 3), keep_size=False).varshape == (6,)
    assert _Toy((2, 3), keep_size=True).varshape == (2, 3)
    assert _Toy((2, 3), False).varshape == (6,)
    assert _Toy(size=5, keep_size=False, spk_reset="hard").varshape == (5,)
    with pytest.raises(ValueError, match="spk_reset"):
        _Toy(3, spk_reset="zero")
    with pytest.raises(TypeError, match="once"):
        _Toy(3, size=3)
    with pytest.raises(TypeError, match="unexpected"):
        _Toy(3, foo=1)
    with pytest.raises(TypeError, match="callable"):
        _Toy(3, spk_fun=1.5)
    with pytest.raises(NotImplementedError):
        bnn.Neuron(3).get_spike()


# ------------------------------------------------------------------ states
STATEFUL = {
    "IF": (lambda: bnn.IF(3), ("V",)),
    "LIF": (lambda: bnn.LIF(3), ("V",)),
    "ALIF": (lambda: bnn.ALIF(3), ("V", "a")),
    "GIF": (lambda: bnn.GIF(3), ("V", "I1", "I2", "V_th")),
    "Izhikevich": (lambda: bnn.Izhikevich(3), ("V", "u")),
    "Expon": (lambda: bnn.Expon(3), ("g",)),
    "Alpha": (lambda: bnn.Alpha(3), ("g", "h")),
    "ValinaRNNCell": (lambda: bnn.ValinaRNNCell(2, 3), ("h",)),
    "GRUCell": (lambda: bnn.GRUCell(2, 3), ("h",)),
    "MGUCell": (lambda: bnn.MGUCell(2, 3), ("h",)),
    "LSTMCell": (lambda: bnn.LSTMCell(2, 3), ("c", "h")),
    "URLSTMCell": (lambda: bnn.URLSTMCell(2, 3), ("c", "h")),
    "MinimalRNNCell": (lambda: bnn.MinimalRNNCell(2, 3), ("h",)),
    "MiniGRU": (lambda: bnn.MiniGRU(2, 3), ("h",)),
    "MiniLSTM": (lambda: bnn.MiniLSTM(2, 3), ("h",)),
    "LRUCell": (lambda: bnn.LRUCell(2, 3), ("h_re", "h_im")),
    "LRUCell-real": (lambda: bnn.LRUCell(2, 3, complex_valued=False), ("h",)),
    "LeakyRateReadout": (lambda: bnn.LeakyRateReadout(2, 3), ("r",)),
    "LeakySpikeReadout": (lambda: bnn.LeakySpikeReadout(2, 3), ("V",)),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_states_init_and_reset(name):
    make, names = STATEFUL[name]
    m = make()
    brainstate.nn.init_all_states(m, batch_size=2)
    hidden = m.states(brainstate.HiddenState)
    assert sorted(k[-1] for k in hidden) == sorted(names)
    for st in hidden.values():
        assert isinstance(st, brainscale.ETraceState)
        assert u.math.shape(st.value) == (2, 3)
    init = {k: st.value for k, st in hidden.items()}
    for st in hidden.values():
        st.value = st.value + (1. * u.get_unit(st.value) if isinstance(st.value, u.Quantity) else 1.)
    brainstate.nn.reset_all_states(m, batch_size=2)
    for k, st in hidden.items():
        np.testing.assert_allclose(u.get_mantissa(st.value), u.get_mantissa(init[k]))
    brainstate.nn.reset_all_states(m)
    assert all(u.math.shape(st.value) == (3,) for st in hidden.values())


# ------------------------------------------------------------------ neuron dynamics
def test_lif_soft_and_hard_reset_and_units():
    with brainstate.environ.context(dt=0.1 * u.ms):
        for reset, expect in (("soft", 1.5 - 1.), ("hard", 0.)):
            neu = bnn.LIF(1, tau=5. * u.ms, V_th=1. * u.mV, spk_reset=reset)
            brainstate.nn.init_all_states(neu)
            neu.V.value = jnp.array([1.5]) * u.mV             # above threshold: spike
            assert float(neu.get_spike()[0]) == 1.
            neu()                                              # reset, then decay
            decay = float(np.exp(-0.1 / 5.))
            np.testing.assert_allclose(neu.V.value.to_decimal(u.mV), [expect * decay], rtol=1e-5)


def test_lif_current_and_delta_inputs():
    with brainstate.environ.context(dt=1. * u.ms):
        neu = bnn.LIF(2, tau=5. * u.ms, V_th=100. * u.mV)
        brainstate.nn.init_all_states(neu)
        neu.add_delta_input("d", jnp.array([1., 2.]) * u.mV)
        neu(1. * u.mA)
        drift = 1. - np.exp(-1. / 5.)                          # R I = 1 mV
        np.testing.assert_allclose(neu.V.value.to_decimal(u.mV), [drift + 1., drift + 2.],
                                   rtol=1e-5)


# ------------------------------------------------------------------ layers
def test_linear_seed_arguments_and_mask():
    w = u.math.concatenate([braintools.init.KaimingNormal(unit=u.mV)([3, 2]),
                            braintools.init.KaimingNormal(unit=u.mV)([2, 2])], axis=0)
    lin = bnn.Linear(5, 2, w_init=w, b_init=braintools.init.ZeroInit(unit=u.mV))
    assert isinstance(lin.weight_op, brainscale.ETraceParam)
    assert isinstance(lin.weight_op.op, brainscale.MatMulOp)
    assert set(lin.weight_op.value) == {"weight", "bias"}
    y = lin(jnp.ones(5))
    assert y.unit == u.mV
    np.testing.assert_allclose(y.to_decimal(u.mV), w.to_decimal(u.mV).sum(0), rtol=1e-5)
    # the default zero bias takes the weight's unit
    assert bnn.Linear(5, 2, w_init=w).weight_op.value["bias"].unit == u.mV
    assert "bias" not in bnn.Linear(5, 2, b_init=None).weight_op.value
    mask = np.array([[1, 0], [0, 1], [1, 1]], bool)
    lin = bnn.Linear(3, 2, w_init=jnp.ones((3, 2)), w_mask=mask)
    np.testing.assert_allclose(lin(jnp.ones(3)), [2., 2.])
    with pytest.raises(ValueError, match="shape"):
        bnn.Linear(3, 2, w_init=jnp.ones((2, 2)))


def test_signed_linear_dale():
    sign = jnp.array([1., -1., 1.])
    lin = bnn.SignedWLinear(3, 2, w_init=jnp.array([[1., -2.], [3., 4.], [-1., 1.]]), w_sign=sign)
    np.testing.assert_allclose(lin(jnp.array([1., 0., 0.])), [1., 2.])
    np.testing.assert_allclose(lin(jnp.array([0., 1., 0.])), [-3., -4.])
    lin2 = bnn.SignedWLinear(3, 2, w_init=-jnp.ones((3, 2)))
    np.testing.assert_allclose(lin2(jnp.ones(3)), [3., 3.])
    with pytest.raises(ValueError, match="w_sign"):
        bnn.SignedWLinear(3, 2, w_sign=jnp.ones(4))


def test_sparse_linear_inputs():
    dense = jnp.array([[1., 0.], [0., 2.], [3., 0.]])
    x = jnp.array([1., 1., 1.])
    for mat in (brainevent.CSR.fromdense(dense), brainevent.CSC.fromdense(dense), dense,
                u.sparse.CSR.fromdense(dense)):
        lin = bnn.SparseLinear(mat, b_init=braintools.init.Constant(0.5))
        np.testing.assert_allclose(lin(x), [4.5, 2.5])
        assert lin.out_size == (2,)


def test_lora_and_conv_shapes():
    base = bnn.Linear(4, 3, w_init=jnp.ones((4, 3)), b_init=None)
    lora = bnn.LoRA(4, 2, 3, base_module=base)
    np.testing.assert_allclose(lora(jnp.ones(4)), [4., 4., 4.])    # A = 0 at init
    assert bnn.Conv1d((9, 2), 4, 3, stride=2).out_size == (5, 4)
    assert bnn.Conv2d((5, 5, 1), 2, 3, padding="VALID").out_size == (3, 3, 2)
    assert bnn.Conv3d((3, 3, 3, 2), 2, 2, groups=2).out_size == (3, 3, 3, 2)
    with pytest.raises(ValueError, match="channels last"):
        bnn.Conv2d((5, 5), 2, 3)
    with pytest.raises(ValueError, match="divisible"):
        bnn.Conv1d((5, 3), 2, 3, groups=2)


def test_norms_and_scale_shift():
    x = jnp.array([[1., 2., 3., 4.], [2., 2., 2., 6.]])
    for layout in ("weight", "split"):
        y = bnn.LayerNorm(4, param_layout=layout)(x)
        np.testing.assert_allclose(y.mean(-1), 0., atol=1e-5)
        np.testing.assert_allclose(y.std(-1), 1., rtol=1e-3)
        y = bnn.RMSNorm(4, param_layout=layout)(x)
        np.testing.assert_allclose(jnp.sqrt(jnp.mean(y ** 2, -1)), 1., rtol=1e-4)
    split = bnn.LayerNorm(4, param_layout="split")
    assert type(split.scale) is brainstate.ParamState and type(split.bias) is brainstate.ParamState
    with pytest.raises(ValueError, match="param_layout"):
        bnn.LayerNorm(4, param_layout="nope")
    with pytest.raises(ValueError, match="in_size"):
        bnn.LayerNorm(4)(jnp.ones(3))
    ss = bnn.ScaleShift(4, scale_init=braintools.init.Constant(2.),
                        shift_init=braintools.init.Constant(1.))
    np.testing.assert_allclose(ss(x), 2 * x + 1)
    assert isinstance(ss.scale, brainscale.ETraceParam)
    assert isinstance(ss.scale.op, brainscale.ElemWiseOp)
    assert bnn.ScaleShift(4, shift_init=None).shift is None


def test_synout_needs_binding_and_projection_checks():
    out = bnn.COBA(E=0. * u.mV)
    with pytest.raises(ValueError, match="before its post"):
        out(0. * u.mV)
    with pytest.raises(TypeError, match="add_delta_input"):
        bnn.DeltaProj(comm=bnn.Linear(2, 2), post=object())
    with pytest.raises(TypeError, match="SynOut"):
        bnn.CurrentProj(comm=bnn.Linear(2, 2), out=lambda v: v, post=bnn.LIF(2))


def test_activation_lookup_and_rnn_options():
    assert bnn.ValinaRNNCell(2, 3, activation="gelu").activation is not None
    with pytest.raises(ValueError, match="unknown activation"):
        bnn.GRUCell(2, 3, activation="nope")
    with pytest.raises(ValueError, match="r_min"):
        bnn.LRUCell(2, 3, r_min=0.9, r_max=0.5)
    cell = bnn.LRUCell(2, 3, r_min=0.4, r_max=0.99, complex_valued=False)
    lam = np.asarray(jnp.exp(-jnp.exp(cell.nu.value)))
    assert np.all((lam >= 0.4 - 1e-6) & (lam <= 0.99 + 1e-6))
    assert not hasattr(bnn.GRUCell(2, 3, reset_after=False), "Uh")
    assert not hasattr(bnn.GRUCell(2, 3), "Uh")                    # 0.1's default
    assert hasattr(bnn.GRUCell(2, 3, reset_after=True), "Uh")
    with pytest.raises(ValueError, match="gate_input"):
        bnn.MinimalRNNCell(2, 3, gate_input="h")
