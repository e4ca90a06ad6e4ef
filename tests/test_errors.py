"""Rejection tests: models outside the supported class and API misuse raise clear errors.

The models are defined in this file, so where the compiler reports a source location the
message must name this file (``test_errors.py``).
"""
from __future__ import annotations

import brainstate
import braintools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from helpers import build_graph

import models

THIS_FILE = "test_errors.py"


def _mm(n_in, n, scale=0.3):
    rng = np.random.RandomState(n_in * 10 + n)
    return brainscale.ETraceParam({"weight": jnp.asarray(rng.randn(n_in, n) * scale, jnp.float32),
                                   "bias": jnp.zeros(n, jnp.float32)}, brainscale.MatMulOp())


class _Base(brainstate.nn.Module):
    def __init__(self, n_in=3, n=4):
        super().__init__()
        self.w = _mm(n_in, n)
        self.V = brainscale.ETraceState(jnp.zeros(n, jnp.float32))
        self.spk = braintools.surrogate.Sigmoid()


class LinearLayerNormLIF(_Base):
    """Linear → LayerNorm (mean / variance over the neurons) → LIF (anchor pitfall 3)."""

    def update(self, x):
        y = self.w.execute(x)
        mu = jnp.mean(y, axis=-1, keepdims=True)
        var = jnp.mean((y - mu) ** 2, axis=-1, keepdims=True)
        yn = (y - mu) / jnp.sqrt(var + 1e-5)
        z = self.spk(self.V.value - 1.0)
        self.V.value = 0.9 * (self.V.value - z) + yn
        return self.spk(self.V.value - 1.0)


class LinearLayerNormVarLIF(_Base):
    """The same LayerNorm written with ``jnp.var`` (a jitted helper called with literals)."""

    def update(self, x):
        y = self.w.execute(x)
        yn = (y - jnp.mean(y)) / jnp.sqrt(jnp.var(y) + 1e-5)
        z = self.spk(self.V.value - 1.0)
        self.V.value = 0.9 * (self.V.value - z) + yn
        return self.spk(self.V.value - 1.0)


class LayerNormAndRawOutput(_Base):
    """LayerNorm into V while the raw op output also leaves the step: the normalisation cannot
    be absorbed into the op (its output is used outside it), so the model is refused."""

    def update(self, x):
        y = self.w.execute(x)
        yn = (y - jnp.mean(y, axis=-1, keepdims=True)) / jnp.sqrt(jnp.var(y, axis=-1,
                                                                          keepdims=True) + 1e-5)
        z = self.spk(self.V.value - 1.0)
        self.V.value = 0.9 * (self.V.value - z) + yn
        return self.spk(self.V.value - 1.0), y


#: the default pipeline without the pass that absorbs normalisations
NO_ABSORB = [p for p in brainscale.DEFAULT_PIPELINE if p != "absorb-normalization"]


class PlainMatmulMix(_Base):
    """The hidden state mixes with other neurons' states through a plain (non-trace) matmul."""

    def __init__(self):
        super().__init__()
        self.M = brainstate.ParamState(jnp.eye(4, dtype=jnp.float32) * 0.5)

    def update(self, x):
        self.V.value = 0.9 * self.V.value + self.V.value @ self.M.value + self.w.execute(x)
        return self.V.value


class ShapeMismatchGroup(brainstate.nn.Module):
    """Two hidden states of different shapes, (6,) and (2, 3), coupled element-wise."""

    def __init__(self):
        super().__init__()
        self.w = _mm(3, 6)
        self.V = brainscale.ETraceState(jnp.zeros(6, jnp.float32))
        self.a = brainscale.ETraceState(jnp.zeros((2, 3), jnp.float32))

    def update(self, x):
        v = 0.9 * self.V.value + self.w.execute(x) + self.a.value.reshape(6)
        self.a.value = 0.8 * self.a.value + v.reshape(2, 3)
        self.V.value = v
        return v


class TransformedParam(_Base):
    """The op's parameter is transformed before the call: ``op(x, |w|)``."""

    def update(self, x):
        w = jax.tree.map(jnp.abs, self.w.value)
        self.V.value = 0.9 * self.V.value + self.w.op(x, w)
        return self.V.value


class ScanIntoHidden(_Base):
    """A ``lax.scan`` (three sub-steps) on the path into the hidden state."""

    def update(self, x):
        y = self.w.execute(x)

        def body(v, _):
            return 0.9 * v + y, None
        v, _ = jax.lax.scan(body, self.V.value, None, length=3)
        self.V.value = v
        return v


# ---------------------------------------------------------------------------------------
# model-class violations
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_cls", [LinearLayerNormLIF, LinearLayerNormVarLIF])
def test_layernorm_between_op_and_neuron_is_absorbed_else_rejected(model_cls):
    """Anchor pitfall 3: handled exactly (absorbed into a composite op; tests/
    test_normalization.py checks it against BPTT) or, without the pass, rejected by name.
    ``jnp.var`` is a jitted helper called with literal arguments: inlined the same way."""
    graph, _, _ = build_graph(model_cls(), jnp.ones(3), decay_or_rank=0.9)
    (op,) = graph.ops
    assert op.op_class == "MatMulOp+norm" and op.layout == "dense"
    with pytest.raises(brainscale.UnsupportedModelError,
                       match=r"hidden state %V depends on op output %y0 .*%w.* through a "
                             r"non-element-wise equation 'reduce_sum' \(eqn \d+\)") as ei:
        build_graph(model_cls(), jnp.ones(3), pipeline=NO_ABSORB)
    msg = str(ei.value)
    assert "while running pass 'relations'" in msg
    assert "trace op" in msg      # says how to fix it


def test_layernorm_that_cannot_be_absorbed_is_rejected():
    with pytest.raises(brainscale.UnsupportedModelError,
                       match=r"hidden state %V depends on op output %y0 .*'reduce_sum'"):
        build_graph(LayerNormAndRawOutput(), jnp.ones(3))


def test_plain_matmul_between_hidden_states_is_cut_not_rejected():
    """A plain-weight matmul mixing hidden states is cut like a trace op without a trace
    (tests/test_plain_weights.py checks the gradients); mixing that is not a plain-weight map
    (a roll, a reduction) is still refused."""
    graph, _, _ = build_graph(PlainMatmulMix(), jnp.ones(3), decay_or_rank=0.9)
    assert graph.cuts and graph.cuts[0][2] == ("M",)


def test_group_with_different_shapes_is_rejected():
    with pytest.raises(brainscale.UnsupportedModelError,
                       match=r"hidden states %V \[6\], %a \[2, 3\] are coupled element-wise but "
                             r"have different shapes"):
        build_graph(ShapeMismatchGroup(), jnp.ones(3))


def test_transformed_param_is_rejected():
    with pytest.raises(brainscale.UnsupportedModelError,
                       match=r"the parameter of trace op MatMulOp .* is not the value of an "
                             r"ETraceParam.*weight_fn"):
        build_graph(TransformedParam(), jnp.ones(3))


def test_scan_into_hidden_state_is_rejected():
    with pytest.raises(brainscale.UnsupportedPrimitiveError,
                       match=r"hidden state %V depends on .* through a loop \('scan', eqn "
                             r"\d+\) at tests/test_errors.py:\d+") as ei:
        build_graph(ScanIntoHidden(), jnp.ones(3))
    assert "unroll it" in str(ei.value) and "register a rule" not in str(ei.value)


def test_errors_are_brainscale_errors():
    assert issubclass(brainscale.UnsupportedPrimitiveError, brainscale.UnsupportedModelError)
    assert issubclass(brainscale.UnsupportedModelError, brainscale.BrainscaleError)
    assert issubclass(brainscale.NotCompiledError, brainscale.BrainscaleError)


@pytest.mark.parametrize("model_cls", [LayerNormAndRawOutput, TransformedParam,
                                       ScanIntoHidden])
def test_error_names_user_source_file(model_cls):
    """Where the compiler reports a location, it is the user's line (this file), never
    'unknown location' or '?'."""
    with pytest.raises(brainscale.UnsupportedModelError) as ei:
        build_graph(model_cls(), jnp.ones(3))
    msg = str(ei.value)
    assert THIS_FILE in msg, f"no user location in:\n{msg}"


def test_algorithm_rejects_model_at_compile_graph():
    learner = brainscale.DiagParamDimAlgorithm(LayerNormAndRawOutput())
    with pytest.raises(brainscale.UnsupportedModelError, match="reduce_sum"):
        learner.compile_graph(jnp.ones(3))
    assert not learner.is_compiled


# ---------------------------------------------------------------------------------------
# API misuse
# ---------------------------------------------------------------------------------------

def test_call_before_compile_raises():
    model, x0 = models.lif_delta(0)
    learner = brainscale.DiagParamDimAlgorithm(model)
    with pytest.raises(brainscale.NotCompiledError, match=r"compile_graph"):
        learner(x0)
    with pytest.raises(brainscale.NotCompiledError):
        learner.ir()
    with pytest.raises(brainscale.NotCompiledError):
        learner.etrace_of(model.syn)


def test_different_input_shape_after_compile_raises():
    model, x0 = models.lif_delta(0)
    learner = brainscale.DiagIODimAlgorithm(model, decay_or_rank=0.9)
    learner.compile_graph(x0)
    learner(x0)
    with pytest.raises(brainscale.BrainscaleError, match=r"compile_graph"):
        learner(jnp.ones(4))
    with pytest.raises(brainscale.BrainscaleError, match=r"compile_graph"):
        learner(jnp.ones((2, 3)))


def test_io_dim_without_decay_raises_type_error():
    model, _ = models.lif_delta(0)
    with pytest.raises(TypeError):
        brainscale.DiagIODimAlgorithm(model)                      # missing argument
    with pytest.raises(TypeError, match=r"decay_or_rank"):
        brainscale.DiagIODimAlgorithm(model, decay_or_rank=None)
    with pytest.raises(TypeError, match=r"decay_or_rank"):
        brainscale.DiagIODimAlgorithm(model, decay_or_rank="0.9")
    with pytest.raises(TypeError, match=r"decay_or_rank"):
        brainscale.DiagIODimAlgorithm(model, decay_or_rank=True)


def test_hybrid_choosing_io_without_decay_raises():
    model, x0 = models.lif_delta(0)
    learner = brainscale.DiagHybridDimAlgorithm(model)
    with pytest.raises(brainscale.BrainscaleError, match=r"decay_or_rank"):
        learner.compile_graph(x0)


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.2, 0, -3])
def test_bad_decay_values_raise_value_error(bad):
    model, _ = models.lif_delta(0)
    with pytest.raises(ValueError, match=r"decay_or_rank"):
        brainscale.DiagIODimAlgorithm(model, decay_or_rank=bad)
    with pytest.raises(ValueError, match=r"decay_or_rank"):
        brainscale.DiagHybridDimAlgorithm(model, decay_or_rank=bad)


@pytest.mark.parametrize("good,alpha", [(0.9, 0.9), (0.5, 0.5), (1, 0.0), (3, 0.5), (99, 0.98)])
def test_good_decay_values(good, alpha):
    model, _ = models.lif_delta(0)
    learner = brainscale.DiagIODimAlgorithm(model, decay_or_rank=good)
    assert learner.decay == pytest.approx(alpha)


def test_traces_larger_than_the_device_are_refused_before_allocation(monkeypatch):
    """A D-RTRL graph whose traces exceed the device's memory is a clear error naming the
    expected bytes of the largest traces and the ways out, not an allocation failure."""
    import models
    from brainscale.backends import base
    m, x0 = models.make("conv_snn", 2)
    learner = brainscale.DiagParamDimAlgorithm(m)
    monkeypatch.setattr(base, "device_memory_bytes", lambda device=None: 20000)
    with pytest.raises(brainscale.UnsupportedModelError) as info:
        learner.compile_graph(x0)
    msg = str(info.value)
    assert "the eligibility traces need 44.02 kB (T0 param-dim, layout=channel over conv: " \
           "38.00 kB; T1 param-dim, layout=compact over out: 6.02 kB)" in msg
    assert "more than this device's 19.53 kB" in msg and "storage=bfloat16" in msg
    assert learner._traces == () and learner.graph is None     # nothing allocated
    # the io-dim traces fit
    brainscale.DiagIODimAlgorithm(models.make("conv_snn", 2)[0], decay_or_rank=0.9)\
        .compile_graph(x0)


def test_device_memory_is_known_on_this_machine():
    from brainscale.backends.base import device_memory_bytes
    n = device_memory_bytes()
    assert n is not None and n > 2 ** 28
