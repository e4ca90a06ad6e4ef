"""Interop: brainpy.state neurons driven by brainscale trace ops compile and match the oracle.

brainscale.nn does not depend on brainpy; these tests only run when brainpy is installed.
"""
from __future__ import annotations

import os
import sys

import brainstate
import braintools
import brainunit as u
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

bp = pytest.importorskip("brainpy.state", reason="brainpy (brainpy.state) is not installed; "
                                                 "the interop tests need it")

import brainscale.nn as bnn  # noqa: E402
from test_nn_oracle import (_fast_xla_compiles, compare_with_oracle, group_sizes,  # noqa: E402,F401
                            positive)


class BrainpyDeltaNet(brainstate.nn.Module):
    """brainpy.state.LIF + brainpy.state.DeltaProj with a brainscale.nn.Linear as comm."""

    def __init__(self, n_in=3, n_rec=4):
        super().__init__()
        self.neu = bp.LIF(n_rec, tau=5. * u.ms, V_th=1. * u.mV)
        self.syn = bp.DeltaProj(
            comm=bnn.Linear(n_in + n_rec, n_rec,
                            w_init=braintools.init.KaimingNormal(2., unit=u.mV)),
            post=self.neu)

    def update(self, x):
        self.syn(u.math.concatenate([x, self.neu.get_spike()], axis=-1))
        return self.neu()


class BrainpyCurrentNet(brainstate.nn.Module):
    """brainpy.state.ALIF (2 states) fed by brainscale.nn.CurrentProj (duck-typed post)."""

    def __init__(self, n_in=3, n_rec=4):
        super().__init__()
        self.neu = bp.ALIF(n_rec, tau=5. * u.ms, tau_a=20. * u.ms, beta=0.5 * u.mV)
        self.proj = bnn.CurrentProj(
            comm=bnn.Linear(n_in, n_rec, w_init=braintools.init.KaimingNormal(3.)),
            out=bnn.CUBA(u.mA), post=self.neu)

    def update(self, x):
        self.proj(x)
        return self.neu()


@pytest.mark.parametrize("alg", ["param", "io"])
@pytest.mark.parametrize("batch", [None, 2], ids=["unbatched", "B2"])
def test_brainpy_lif_with_brainscale_linear(alg, batch):
    learner, rel, scale = compare_with_oracle(BrainpyDeltaNet, positive(3, 1.5), alg, batch)
    assert group_sizes(learner) == [1]
    assert "neu.V" in learner.ir()


@pytest.mark.parametrize("alg", ["param", "io"])
def test_brainpy_alif_with_brainscale_current_proj(alg):
    learner, rel, scale = compare_with_oracle(BrainpyCurrentNet, positive(3, 1.5), alg, None)
    assert group_sizes(learner) == [2]


NUMERIC_TWINS = {
    # brainscale.nn model, brainpy.state twin, input per step, state names
    "IF": (lambda: bnn.IF(3), lambda: bp.IF(3), 3. * u.mA, ("V",)),
    "LIF-hard": (lambda: bnn.LIF(3, spk_reset="hard"), lambda: bp.LIF(3, spk_reset="hard"),
                 3. * u.mA, ("V",)),
    "ALIF": (lambda: bnn.ALIF(3, beta=0.5 * u.mV), lambda: bp.ALIF(3, beta=0.5 * u.mV),
             3. * u.mA, ("V", "a")),
    "GIF": (lambda: bnn.GIF(3, a=0.01 / u.ms, A1=0.1 * u.mA),
            lambda: bp.Gif(3, a=0.01 / u.ms, A1=0.1 * u.mA), 2. * u.mA,
            ("V", "I1", "I2", "V_th")),
    "Izhikevich": (lambda: bnn.Izhikevich(3), lambda: bp.Izhikevich(3), 20. * u.mV / u.ms,
                   ("V", "u")),
    "Expon": (lambda: bnn.Expon(3, g_initializer=braintools.init.ZeroInit(unit=u.mS)),
              lambda: bp.Expon(3), 1. * u.mS, ("g",)),
    "Alpha": (lambda: bnn.Alpha(3, g_initializer=braintools.init.ZeroInit(unit=u.mS)),
              lambda: bp.Alpha(3), 1. * u.mS, ("g", "h")),
}


@pytest.mark.parametrize("name", sorted(NUMERIC_TWINS))
def test_models_agree_with_brainpy_state(name):
    """brainscale.nn's neurons/synapses follow brainpy.state's equations step by step."""
    import numpy as np
    ours_f, theirs_f, inp, states = NUMERIC_TWINS[name]
    ours, theirs = ours_f(), theirs_f()
    brainstate.nn.init_all_states(ours)
    brainstate.nn.init_all_states(theirs)
    T = 60
    xs = inp * (np.linspace(0.5, 3., 3)[None] * (1. + 0.5 * np.sin(np.arange(T) / 5.))[:, None])

    def step(x):
        ours(x)
        theirs(x)
        return ([getattr(ours, s).value for s in states],
                [getattr(theirs, s).value for s in states])

    with brainstate.environ.context(dt=0.1 * u.ms, t=0. * u.ms):
        a_all, b_all = brainstate.transform.jit(
            lambda xs: brainstate.transform.for_loop(step, xs))(xs)
    for s, a, b in zip(states, a_all, b_all):
        np.testing.assert_allclose(u.get_mantissa(a), u.get_mantissa(b), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{name}.{s}")
