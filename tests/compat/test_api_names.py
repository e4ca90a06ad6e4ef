"""brainscale 0.1's public names: each exists, has 0.1's signature and defaults, and ``mode=``
is accepted and checked against the example inputs.

The expected signatures are brainscale 0.1's published API (its reference docs and the
constructor arguments its examples use); see ``docs/compat.md``.
"""
from __future__ import annotations

import inspect
import warnings

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import brainscale.legacy as legacy
import models

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NAMES = ["IODimVjpAlgorithm", "ES_D_RTRL", "ParamDimVjpAlgorithm", "D_RTRL",
         "HybridDimVjpAlgorithm", "ElemWiseParam", "NonTempParam", "FakeETraceParam",
         "FakeElemWiseParam", "SingleStepData", "MultiStepData", "EligibilityTrace"]

_ = inspect.Parameter.empty
# 0.1's leading parameters (name, default); ours may take further keyword options after them
SIGNATURES = {
    "IODimVjpAlgorithm": [("model", _), ("decay_or_rank", _), ("mode", None), ("name", None),
                          ("vjp_method", "single-step")],
    "ParamDimVjpAlgorithm": [("model", _), ("mode", None), ("name", None),
                             ("vjp_method", "single-step")],
    "HybridDimVjpAlgorithm": [("model", _), ("decay_or_rank", _), ("mode", None),
                              ("name", None), ("vjp_method", "single-step")],
    "ElemWiseParam": [("weight", _), ("op", "<identity>"), ("name", None)],
    "NonTempParam": [("value", _), ("op", _), ("name", None)],
    "FakeETraceParam": [("value", _), ("op", _)],
    "FakeElemWiseParam": [("weight", _), ("op", "<identity>"), ("name", None)],
    "SingleStepData": [("data", _)],
    "MultiStepData": [("data", _)],
}


@pytest.mark.parametrize("name", NAMES)
def test_name_at_top_level(name):
    obj = getattr(brainscale, name)
    assert isinstance(obj, type)
    if name != "EligibilityTrace":
        assert getattr(legacy, name) is obj
    assert name in dir(brainscale)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_and_defaults(name):
    # brainstate modules and states have a metaclass __call__: read __init__ (less self)
    init = inspect.signature(getattr(brainscale, name).__init__)
    params = [p for p in list(init.parameters.values())[1:]
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    want = SIGNATURES[name]
    got = [(p.name, p.default) for p in params[:len(want)]]
    for (gn, gd), (wn, wd) in zip(got, want):
        assert gn == wn, (name, got, want)
        if wd == "<identity>":
            assert callable(gd) and gd(3.5) == 3.5
        else:
            assert gd == wd, (name, gn, gd, wd)
    assert len(got) == len(want), (name, got)
    # anything beyond 0.1's parameters is keyword-only or **kwargs (0.1 calls stay valid)
    for p in params[len(want):]:
        assert p.kind == p.KEYWORD_ONLY, (name, p)


@pytest.mark.parametrize("old,new", [("ETraceGroupState", "HiddenGroupState"),
                                     ("ETraceTreeState", "HiddenTreeState")])
def test_grouped_state_aliases_warn_and_are_brainstates(old, new):
    with pytest.warns(DeprecationWarning, match=f"brainstate.{new}"):
        assert getattr(brainscale, old) is getattr(brainstate, new)
    assert issubclass(brainscale.ETraceState, brainstate.HiddenState)
    with pytest.raises(AttributeError, match="no attribute 'ETraceNopeState'"):
        brainscale.ETraceNopeState  # noqa: B018


def test_algorithm_aliases_are_the_diag_classes():
    assert brainscale.ES_D_RTRL is brainscale.IODimVjpAlgorithm
    assert brainscale.D_RTRL is brainscale.ParamDimVjpAlgorithm
    assert issubclass(brainscale.IODimVjpAlgorithm, brainscale.DiagIODimAlgorithm)
    assert issubclass(brainscale.ParamDimVjpAlgorithm, brainscale.DiagParamDimAlgorithm)
    assert issubclass(brainscale.HybridDimVjpAlgorithm, brainscale.DiagHybridDimAlgorithm)
    assert issubclass(brainscale.ElemWiseParam, brainscale.ETraceParam)
    assert issubclass(brainscale.NonTempParam, brainstate.ParamState)
    assert not issubclass(brainscale.NonTempParam, brainscale.ETraceParam)
    assert not issubclass(brainscale.FakeETraceParam, brainstate.State)
    assert not issubclass(brainscale.FakeElemWiseParam, brainstate.State)
    assert issubclass(brainscale.EligibilityTrace, brainstate.ShortTermState)


@pytest.mark.parametrize("cls,args,new", [
    ("IODimVjpAlgorithm", (0.9,), "DiagIODimAlgorithm"),
    ("ES_D_RTRL", (0.9,), "DiagIODimAlgorithm"),
    ("ParamDimVjpAlgorithm", (), "DiagParamDimAlgorithm"),
    ("D_RTRL", (), "DiagParamDimAlgorithm"),
    ("HybridDimVjpAlgorithm", (0.9,), "DiagHybridDimAlgorithm"),
])
def test_algorithm_alias_warns_with_new_name(cls, args, new):
    net, _x = models.gru3()
    with pytest.warns(DeprecationWarning, match=new) as rec:
        getattr(brainscale, cls)(net, *args)
    assert rec[0].filename == __file__               # points at the constructing line


def test_positional_arguments_as_in_01():
    net, _x = models.gru3()
    batching = brainstate.mixin.Batching()
    io = brainscale.IODimVjpAlgorithm(net, 0.9, batching, "io", "multi-step")
    assert (io.decay, io.mode, io.name, io.vjp_method) == (0.9, batching, "io", "multi-step")
    pd = brainscale.ParamDimVjpAlgorithm(net, batching, "pd")
    assert (pd.mode, pd.name, pd.vjp_method) == (batching, "pd", "single-step")
    hy = brainscale.HybridDimVjpAlgorithm(net, 4)
    assert hy.decay == pytest.approx(0.6)          # rank r: (r-1)/(r+1)
    assert hy.mode is None


def test_decay_or_rank_is_required_and_checked():
    net, _x = models.gru3()
    with pytest.raises(TypeError, match="decay_or_rank"):
        brainscale.IODimVjpAlgorithm(net)
    with pytest.raises(TypeError, match="decay_or_rank"):
        brainscale.HybridDimVjpAlgorithm(net, None)
    with pytest.raises(ValueError):
        brainscale.ES_D_RTRL(net, 1.5)
    with pytest.raises(ValueError):
        brainscale.ES_D_RTRL(net, 0)


def test_vjp_method_checked():
    net, _x = models.gru3()
    with pytest.raises(ValueError, match="vjp_method"):
        brainscale.D_RTRL(net, vjp_method="two-step")


# ---------------------------------------------------------------------------------------
# mode=
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda net, mode: brainscale.ES_D_RTRL(net, 0.9, mode=mode),
    lambda net, mode: brainscale.D_RTRL(net, mode=mode),
    lambda net, mode: brainscale.DiagHybridDimAlgorithm(net, decay_or_rank=0.9, mode=mode),
], ids=["ES_D_RTRL", "D_RTRL", "DiagHybridDimAlgorithm"])
def test_mode_checked_against_example_input(make):
    batching = brainstate.mixin.Batching()
    net_b, xb = models.gru3(batch=2)
    net_u, xu = models.gru3(batch=0)
    # agreeing modes compile; the learner keeps the mode it was given
    for net, x, mode in [(net_b, xb, batching), (net_u, xu, brainstate.mixin.Mode()),
                         (net_b, xb, None), (net_u, xu, None),
                         (net_b, xb, brainstate.mixin.JointMode(brainstate.mixin.Training(),
                                                                batching))]:
        learner = make(net, mode)
        assert learner.mode is mode
        learner.compile_graph(x)
        assert np.all(np.isfinite(np.asarray(learner(x))))
    with pytest.raises(brainscale.BrainscaleError, match="says the inputs are batched"):
        make(net_u, batching).compile_graph(xu)
    with pytest.raises(brainscale.BrainscaleError, match="carry a batch axis of size 2"):
        make(net_b, brainstate.mixin.Mode()).compile_graph(xb)


def test_mode_type_and_axis_checked_at_construction():
    net, _x = models.gru3()
    with pytest.raises(TypeError, match="brainstate.mixin.Mode"):
        brainscale.D_RTRL(net, mode="batching")
    with pytest.raises(TypeError, match="brainstate.mixin.Mode"):
        brainscale.DiagParamDimAlgorithm(net, mode=True)
    with pytest.raises(ValueError, match="leading axis"):
        brainscale.ES_D_RTRL(net, 0.9, mode=brainstate.mixin.Batching(batch_axis=1))


class _SharedDecay(brainstate.nn.Module):
    """Batched hidden states whose only trace op (a per-neuron decay) has no batch axis."""

    def __init__(self, n=4, batch=2):
        super().__init__()
        self.theta = brainscale.ElemWiseParam(jnp.linspace(-1., 1., n), jax.nn.sigmoid)
        self.V = brainstate.HiddenState(jnp.zeros((batch, n)) if batch else jnp.zeros(n))

    def update(self, x):
        self.V.value = self.theta.execute() * self.V.value + x
        return self.V.value


def test_mode_batching_when_no_op_is_batched():
    """The batch is read from the hidden groups too: an unbatched op into batched states."""
    learner = brainscale.D_RTRL(_SharedDecay(batch=2), mode=brainstate.mixin.Batching())
    learner.compile_graph(jnp.ones((2, 4)))
    assert learner.graph.batch == 0 and learner.batch_size == 2
    with pytest.raises(brainscale.BrainscaleError, match="batch axis of size 2"):
        brainscale.D_RTRL(_SharedDecay(batch=2), mode=brainstate.mixin.Mode()).compile_graph(
            jnp.ones((2, 4)))
    with pytest.raises(brainscale.BrainscaleError, match="says the inputs are batched"):
        brainscale.D_RTRL(_SharedDecay(batch=0), mode=brainstate.mixin.Batching()).compile_graph(
            jnp.ones(4))


# ---------------------------------------------------------------------------------------
# SingleStepData / MultiStepData
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ["SingleStepData", "MultiStepData"])
def test_step_data_is_a_pytree_holding_data(cls):
    C = getattr(brainscale, cls)
    data = {"a": jnp.ones((3, 2)), "b": jnp.zeros(4)}
    d = C(data)
    assert d.data is data
    leaves, treedef = jax.tree.flatten(d)
    assert len(leaves) == 2
    back = jax.tree.unflatten(treedef, leaves)
    assert type(back) is C and set(back.data) == {"a", "b"}
    doubled = jax.tree.map(lambda a: a * 2, C(jnp.ones(3)))
    assert type(doubled) is C and np.allclose(doubled.data, 2.0)


def test_no_unexpected_warnings_from_data_classes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        brainscale.SingleStepData(jnp.ones(2))
        brainscale.MultiStepData(jnp.ones((3, 2)))
