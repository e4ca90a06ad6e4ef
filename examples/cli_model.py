"""A small two-layer spiking network for ``brainscale-opt`` (and the README picture).

Layer 1 is a recurrent adaptive LIF layer: hidden states ``V`` (membrane) and ``a``
(adaptation) couple element-wise, so the compiler groups them (one hidden group, ``n=2``).
It has an input weight ``w_in`` (with bias) and a recurrent weight ``w_rec``, both dense,
plus a plain (non-trace) parameter ``threshold``. Layer 2 is a leaky readout with one
output neuron (hidden state ``r``) and a weight ``w_out`` without bias.

With the hybrid algorithm the ``select-dims`` cost model picks io-dim traces (ES-D-RTRL)
for the two big recurrent-layer weights and a param-dim trace (D-RTRL) for the readout,
whose parameter-space trace is not larger than its io-dim one. Try::

    brainscale-opt examples/cli_model.py:make --algorithm hybrid --decay 0.9 --report
    python tools/brainscale_opt.py examples/cli_model.py:make --out dumps --svg
"""
from __future__ import annotations

import braintools
import brainstate
import jax.numpy as jnp
import numpy as np

import brainscale


class ALIFLayer(brainstate.nn.Module):
    """Recurrent adaptive LIF neurons with a sigmoid surrogate spike."""

    def __init__(self, n_in: int, n_rec: int, seed: int = 0):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.w_in = brainscale.ETraceParam(
            {"weight": jnp.asarray(rng.randn(n_in, n_rec) / np.sqrt(n_in), jnp.float32),
             "bias": jnp.zeros(n_rec, jnp.float32)}, brainscale.MatMulOp())
        self.w_rec = brainscale.ETraceParam(
            {"weight": jnp.asarray(rng.randn(n_rec, n_rec) / np.sqrt(n_rec), jnp.float32)},
            brainscale.MatMulOp())
        self.threshold = brainstate.ParamState(jnp.ones(n_rec, jnp.float32))
        self.V = brainscale.ETraceState(jnp.zeros(n_rec, jnp.float32))
        self.a = brainscale.ETraceState(jnp.zeros(n_rec, jnp.float32))
        self.spike_fn = braintools.surrogate.Sigmoid()

    def update(self, x):
        spk = self.spike_fn(self.V.value - self.threshold.value - 0.2 * self.a.value)
        current = self.w_in.execute(x) + self.w_rec.execute(spk)
        v = 0.9 * self.V.value + current - spk
        self.V.value = v
        new_spk = self.spike_fn(v - self.threshold.value - 0.2 * self.a.value)
        self.a.value = 0.95 * self.a.value + new_spk
        return new_spk


class LeakyReadout(brainstate.nn.Module):
    """``r_t = 0.8 r_{t-1} + spk_t @ w_out``."""

    def __init__(self, n_rec: int, n_out: int, seed: int = 1):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.w_out = brainscale.ETraceParam(
            {"weight": jnp.asarray(rng.randn(n_rec, n_out) / np.sqrt(n_rec), jnp.float32)},
            brainscale.MatMulOp())
        self.r = brainscale.ETraceState(jnp.zeros(n_out, jnp.float32))

    def update(self, spk):
        self.r.value = 0.8 * self.r.value + self.w_out.execute(spk)
        return self.r.value


class TwoLayerSNN(brainstate.nn.Module):
    """Recurrent adaptive LIF layer followed by a leaky readout."""

    def __init__(self, n_in: int = 8, n_rec: int = 32, n_out: int = 1):
        super().__init__()
        self.alif = ALIFLayer(n_in, n_rec)
        self.out = LeakyReadout(n_rec, n_out)

    def update(self, x):
        return self.out(self.alif(x))


def make(n_in: int = 8, n_rec: int = 32, n_out: int = 1):
    """Factory for ``brainscale-opt``: returns ``(model, example_input)``."""
    return TwoLayerSNN(n_in, n_rec, n_out), jnp.ones((n_in,), jnp.float32)
