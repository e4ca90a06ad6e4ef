"""Modules the compiler cannot trace exactly: the documented fallback or the clear error.

* A weight feeding another weight (GRU's classic candidate ``W_h [x, r ⊙ h]``, the default
  since GRUCell follows brainscale 0.1): it compiles; ``W_r``'s op output reaches ``h`` only
  through ``W_h``'s op, so the IR gives it dim ``none`` with its reason, compiling warns
  (``NoTemporalCreditWarning``) and it gets the instantaneous gradient (which still equals
  the oracle's, whose traces follow the same rule). ``reset_after=True`` traces every weight.
* A normalisation between a trace op and a hidden state (``Linear → LayerNorm → LIF``):
  the compiler's ``absorb-normalization`` pass makes op + statistics one composite op. With
  0.1's parameter layout the LayerNorm's affine is itself a trace op (``ScaleOp``) reading
  the normalised value, so the Linear's weight then feeds another op: never silently, it
  gets a trace or the warning; ``param_type=NonTempParam`` keeps the affine out of the trace
  and the Linear's weight traced.
* ``ScaleShift`` on an op's *input*: its ElemWiseOp outputs reach hidden states only
  through the op, so its parameters get dim ``none`` as well.
"""
from __future__ import annotations

import os
import sys
import warnings

import brainstate
import braintools
import brainunit as u
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import brainscale  # noqa: E402
import brainscale.nn as bnn  # noqa: E402
from test_nn_oracle import (_fast_xla_compiles, compare_with_oracle, continuous,  # noqa: E402,F401
                            trace_dims)

NONE_REASON = "output reaches hidden states only through the input of trace op(s)"


@pytest.mark.parametrize("alg", ["param", "io"])
def test_weight_feeding_weight_is_instantaneous(alg):
    with pytest.warns(brainscale.NoTemporalCreditWarning, match="Wr"):
        learner, rel, scale = compare_with_oracle(
            lambda: bnn.GRUCell(3, 4), continuous(3), alg, None)     # reset_after=False
    dims = trace_dims(learner)
    assert dims == {"Wz.weight_op": alg, "Wr.weight_op": "none", "Wh.weight_op": alg}
    ir = learner.ir()
    line = next(l for l in ir.splitlines() if l.strip().startswith("trace") and "none(" in l)
    assert NONE_REASON in line, ir
    assert "-> (no hidden state)" in ir
    assert scale[("Wr", "weight_op")] > 0       # it still learns (instantaneously)


def test_reset_after_gru_traces_every_weight():
    net = bnn.GRUCell(3, 4, reset_after=True)
    brainstate.nn.init_all_states(net)
    learner = brainscale.DiagParamDimAlgorithm(net).compile_graph(jnp.ones(3))
    assert set(trace_dims(learner).values()) == {"param"}


class NormBetween(brainstate.nn.Module):
    def __init__(self, **ln):
        super().__init__()
        self.lin = bnn.Linear(3, 4, w_init=braintools.init.KaimingNormal(unit=u.mA))
        self.ln = bnn.LayerNorm(4, **ln)
        self.neu = bnn.LIF(4)

    def update(self, x):
        return self.neu(self.ln(self.lin(x)) * u.mA)


def _compile_between(cls, **ln):
    net = NormBetween(**ln)
    brainstate.nn.init_all_states(net)
    kw = {} if cls == "DiagParamDimAlgorithm" else {"decay_or_rank": 0.9}
    learner = getattr(brainscale, cls)(net, **kw)
    with brainstate.environ.context(dt=1. * u.ms):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            learner.compile_graph(jnp.ones(3))
    return learner, [w for w in caught if issubclass(w.category,
                                                     brainscale.NoTemporalCreditWarning)]


@pytest.mark.parametrize("cls", ["DiagParamDimAlgorithm", "DiagIODimAlgorithm"])
def test_layernorm_between_op_and_neuron_is_never_silent(cls):
    """0.1's layout (the affine is a ScaleOp): the Linear's weight is traced through the
    normalisation, or compiling says that it is not."""
    learner, warned = _compile_between(cls)
    dims = trace_dims(learner)
    assert dims["ln.weight"] == "param"                 # the affine: ETraceGrad.full
    if dims["lin.weight_op"] == "none":
        assert any("lin.weight_op" in str(w.message) for w in warned), learner.ir()
    else:
        assert dims["lin.weight_op"] == ("param" if cls == "DiagParamDimAlgorithm" else "io")


@pytest.mark.parametrize("cls", ["DiagParamDimAlgorithm", "DiagIODimAlgorithm"])
def test_layernorm_between_with_nontemp_affine_traces_the_op(cls):
    """``param_type=NonTempParam`` (same parameter layout) keeps the affine out of the trace:
    op + statistics become one composite op and the Linear's weight keeps its trace."""
    learner, warned = _compile_between(cls, param_type=brainscale.NonTempParam)
    assert not warned
    assert trace_dims(learner) == {"lin.weight_op": "param" if cls == "DiagParamDimAlgorithm"
                                   else "io"}
    assert "class=MatMulOp+norm" in learner.ir()


class ScaleShiftOnInput(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.ss = bnn.ScaleShift(3)
        self.lin = bnn.Linear(3, 4, w_init=braintools.init.KaimingNormal(2., unit=u.mA))
        self.neu = bnn.LIF(4)

    def update(self, x):
        return self.neu(self.lin(self.ss(x)))


def test_scaleshift_on_input_is_instantaneous():
    net = ScaleShiftOnInput()
    brainstate.nn.init_all_states(net)
    with brainstate.environ.context(dt=1. * u.ms):
        learner = brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9).compile_graph(jnp.ones(3))
    dims = trace_dims(learner)
    assert dims == {"ss.scale": "none", "ss.shift": "none", "lin.weight_op": "io"}
