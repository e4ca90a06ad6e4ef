"""Tiny deterministic brainstate models used across the test suite.

Every factory takes ``batch`` (0 = unbatched, otherwise the hidden states and the input
carry a leading batch axis of that size) and ``seed`` (weights and the example input are
drawn from ``numpy.random.RandomState(seed)``), and returns ``(model, example_input)``:
``model`` is a ``brainstate.nn.Module`` whose ``update(x)`` is one time step and
``example_input`` one step's input. Two calls with the same arguments build identical
models (the online-vs-oracle tests need one instance for the learner and one for the
oracle). All shapes are tiny so the dense oracle (N×N Jacobians) stays fast.

Models (name → factory in :data:`MODELS`):

* ``lif_delta``: the seed's ``LIF_Delta_Net`` pattern (one LIF layer; input =
  concat(x, spike(V_prev)) → ETraceParam({'weight','bias'}, MatMulOp) → V; soft reset).
* ``alif``: a 2-state adaptive LIF (V and adaptation a coupled element-wise).
* ``gru3``: 3 GRU layers written so that every interaction is a trace op:
  ``cand = tanh(Wx·x + r ⊙ (Uh·h))``.
* ``gru_rh``: one GRU layer with the classic ``cand = tanh(Wx·x + U·(r ⊙ h))``, where the
  reset-gate weight reaches the hidden state only through another weight's input.
* ``conv_snn``: 2-D ConvOp on (8, 8, 2) inputs → LIF over (8, 8, 4) neurons → leaky readout.
* ``sparse_rec``: a recurrent LIF layer whose weights are a SpMatMulOp (brainevent CSR).
* ``elemwise_tau``: a leaky layer with a learnable decay ``sigmoid(θ)`` (ElemWiseOp).
* ``lora``: a LoraOp feeding a leaky neuron.

and, for the exactness tests (not in :data:`MODELS`):

* ``single_layer_2state``: input → MatMulOp → a smooth 2-state neuron, no recurrence.
* ``masked_rec``: a recurrent LIF whose MatMulOp has a weight mask.
* ``normed_rec``: the same with a weight_fn that is not element-wise (``3 W / ||W||``).
* ``hybrid_mix``: a big dense input weight, a small sparse recurrent weight and an
  element-wise time constant in one layer (select-dims should mix param-dim and io-dim).
* ``gru_plain_in``: a plain ``ParamState`` input projection feeding a GRU layer.
"""
from __future__ import annotations

import brainevent
import brainstate
import braintools
import jax
import jax.numpy as jnp
import numpy as np

import brainscale

__all__ = ["MODELS", "make", "lif_delta", "alif", "gru3", "gru_rh", "conv_snn", "sparse_rec",
           "elemwise_tau", "lora", "single_layer_2state", "masked_rec", "normed_rec",
           "softmax_tau", "hybrid_mix",
           "gru_plain_in"]


def _f32(a):
    return jnp.asarray(a, jnp.float32)


def _shape(batch: int, *shape: int) -> tuple:
    return ((batch,) if batch else ()) + tuple(shape)


def _input(rng, batch: int, *shape: int, scale: float = 1.0):
    return _f32(rng.randn(*_shape(batch, *shape)) * scale)


# ---------------------------------------------------------------------------------------
# LIF_Delta_Net
# ---------------------------------------------------------------------------------------

class LIFDeltaNet(brainstate.nn.Module):
    """The seed's ``LIF_Delta_Net`` written with brainscale's primitives (unit-free).

    ``V`` is the membrane potential (an ETraceState). One step::

        z_prev = spike(V_prev - V_th)                      # surrogate spike of the old V
        y      = W · concat(x, z_prev) + b                  # ETraceParam, MatMulOp
        V      = V_prev - V_th * z_prev                     # soft reset
        V      = V + (-V + y) * dt / tau                    # leaky integration
        return spike(V - V_th)
    """

    def __init__(self, n_in=3, n_rec=5, batch=0, seed=0, tau=5.0, dt=1.0, V_th=1.0):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.n_in, self.n_rec = n_in, n_rec
        w = np.concatenate([rng.randn(n_in, n_rec) * 2.0 / np.sqrt(n_in),
                            rng.randn(n_rec, n_rec) * 1.0 / np.sqrt(n_rec)], axis=0)
        self.syn = brainscale.ETraceParam({"weight": _f32(w), "bias": _f32(rng.randn(n_rec) * 0.1)},
                                          brainscale.MatMulOp())
        self.V = brainscale.ETraceState(_f32(rng.rand(*_shape(batch, n_rec)) * 0.8))
        self.spk_fun = braintools.surrogate.Sigmoid()
        self.decay = dt / tau
        self.V_th = V_th

    def get_spike(self, V=None):
        V = self.V.value if V is None else V
        return self.spk_fun(V - self.V_th)

    def update(self, x):
        z_prev = self.get_spike()
        inp = jnp.concatenate([x, z_prev], axis=-1)
        y = self.syn.execute(inp)
        v = self.V.value - self.V_th * z_prev
        self.V.value = v + (-v + y) * self.decay
        return self.get_spike()


def lif_delta(batch=0, seed=0):
    rng = np.random.RandomState(seed + 1000)
    model = LIFDeltaNet(3, 5, batch=batch, seed=seed)
    return model, _input(rng, batch, 3)


# ---------------------------------------------------------------------------------------
# ALIF: two coupled hidden states per neuron
# ---------------------------------------------------------------------------------------

class ALIFNet(brainstate.nn.Module):
    """Adaptive LIF: ``V`` and the adaptation ``a`` form one 2-state hidden group.

    ::

        z_prev = spike(V_prev - V_th - beta * a_prev)
        y      = W · concat(x, z_prev) + b
        a      = rho * a_prev + z_prev
        V      = alpha * (V_prev - (V_th + beta * a_prev) * z_prev) + (1 - alpha) * y
        return spike(V - V_th - beta * a)
    """

    def __init__(self, n_in=3, n_rec=5, batch=0, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        w = np.concatenate([rng.randn(n_in, n_rec) * 2.0 / np.sqrt(n_in),
                            rng.randn(n_rec, n_rec) / np.sqrt(n_rec)], axis=0)
        self.syn = brainscale.ETraceParam({"weight": _f32(w), "bias": _f32(rng.randn(n_rec) * 0.1)},
                                          brainscale.MatMulOp())
        self.V = brainscale.ETraceState(_f32(rng.rand(*_shape(batch, n_rec)) * 0.8))
        self.a = brainscale.ETraceState(_f32(rng.rand(*_shape(batch, n_rec)) * 0.2))
        self.spk_fun = braintools.surrogate.Sigmoid()
        self.alpha, self.rho, self.beta, self.V_th = 0.8, 0.9, 0.5, 1.0

    def threshold(self, a):
        return self.V_th + self.beta * a

    def update(self, x):
        v_prev, a_prev = self.V.value, self.a.value
        z_prev = self.spk_fun(v_prev - self.threshold(a_prev))
        y = self.syn.execute(jnp.concatenate([x, z_prev], axis=-1))
        a = self.rho * a_prev + z_prev
        v = self.alpha * (v_prev - self.threshold(a_prev) * z_prev) + (1 - self.alpha) * y
        self.a.value = a
        self.V.value = v
        return self.spk_fun(v - self.threshold(a))


def alif(batch=0, seed=0):
    rng = np.random.RandomState(seed + 1000)
    return ALIFNet(3, 5, batch=batch, seed=seed), _input(rng, batch, 3)


# ---------------------------------------------------------------------------------------
# GRU
# ---------------------------------------------------------------------------------------

def _mm(rng, n_in, n_out, scale=1.0, bias=True):
    v = {"weight": _f32(rng.randn(n_in, n_out) * scale / np.sqrt(n_in))}
    if bias:
        v["bias"] = _f32(rng.randn(n_out) * 0.1)
    return brainscale.ETraceParam(v, brainscale.MatMulOp())


class GRULayer(brainstate.nn.Module):
    """A GRU cell where every interaction is a trace op.

    ::

        r    = sigmoid(Wr · [x, h])
        z    = sigmoid(Wz · [x, h])
        cand = tanh(Wx · x + r * (Uh · h))
        h    = (1 - z) * h + z * cand
    """

    def __init__(self, n_in, n_h, batch, rng):
        super().__init__()
        self.Wr = _mm(rng, n_in + n_h, n_h)
        self.Wz = _mm(rng, n_in + n_h, n_h)
        self.Wx = _mm(rng, n_in, n_h)
        self.Uh = _mm(rng, n_h, n_h, bias=False)
        self.h = brainscale.ETraceState(_f32(rng.randn(*_shape(batch, n_h)) * 0.3))

    def update(self, x):
        h = self.h.value
        xh = jnp.concatenate([x, h], axis=-1)
        r = jax.nn.sigmoid(self.Wr.execute(xh))
        z = jax.nn.sigmoid(self.Wz.execute(xh))
        cand = jnp.tanh(self.Wx.execute(x) + r * self.Uh.execute(h))
        self.h.value = (1 - z) * h + z * cand
        return self.h.value


class GRUNet(brainstate.nn.Module):
    """Three stacked :class:`GRULayer` (3 → 4 → 4 → 3)."""

    def __init__(self, sizes=(3, 4, 4, 3), batch=0, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.l0 = GRULayer(sizes[0], sizes[1], batch, rng)
        self.l1 = GRULayer(sizes[1], sizes[2], batch, rng)
        self.l2 = GRULayer(sizes[2], sizes[3], batch, rng)

    def update(self, x):
        return self.l2(self.l1(self.l0(x)))


def gru3(batch=0, seed=0):
    rng = np.random.RandomState(seed + 1000)
    return GRUNet(batch=batch, seed=seed), _input(rng, batch, 3)


class GRUResetInside(brainstate.nn.Module):
    """The classic GRU candidate ``tanh(Wx · x + U · (r ⊙ h))``.

    The reset gate ``r = sigmoid(Wr · [x, h])`` reaches the hidden state only through the
    input of another trace op (``U``); under the diagonal approximation ``Wr`` then has no
    element-wise path into any hidden state (anchor pitfall 6).
    """

    def __init__(self, n_in=3, n_h=4, batch=0, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.Wr = _mm(rng, n_in + n_h, n_h)
        self.Wz = _mm(rng, n_in + n_h, n_h)
        self.Wx = _mm(rng, n_in, n_h)
        self.U = _mm(rng, n_h, n_h, bias=False)
        self.h = brainscale.ETraceState(_f32(rng.randn(*_shape(batch, n_h)) * 0.3))

    def update(self, x):
        h = self.h.value
        xh = jnp.concatenate([x, h], axis=-1)
        r = jax.nn.sigmoid(self.Wr.execute(xh))
        z = jax.nn.sigmoid(self.Wz.execute(xh))
        cand = jnp.tanh(self.Wx.execute(x) + self.U.execute(r * h))
        self.h.value = (1 - z) * h + z * cand
        return self.h.value


def gru_rh(batch=0, seed=0):
    rng = np.random.RandomState(seed + 1000)
    return GRUResetInside(batch=batch, seed=seed), _input(rng, batch, 3)


# ---------------------------------------------------------------------------------------
# Convolutional SNN
# ---------------------------------------------------------------------------------------

class ConvSNN(brainstate.nn.Module):
    """Conv (3×3, SAME, 2 → 4 channels) → LIF over (8, 8, 4) → leaky readout of 3 units.

    ::

        z_prev = spike(V_prev - 1)
        V      = 0.8 * (V_prev - z_prev) + conv(x, K)        # soft reset
        s      = spike(V - 1)
        o      = 0.9 * o_prev + Wo · flatten(s)              # readout (MatMulOp)
        return o
    """

    def __init__(self, batch=0, seed=0, hw=8, c_in=2, c_out=4, n_out=3):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.hw, self.c_out = hw, c_out
        op = brainscale.ConvOp(xinfo=jax.ShapeDtypeStruct((hw, hw, c_in), jnp.float32),
                               window_strides=(1, 1), padding="SAME")
        self.conv = brainscale.ETraceParam(
            {"weight": _f32(rng.randn(3, 3, c_in, c_out) * 0.6),
             "bias": _f32(rng.randn(c_out) * 0.1)}, op)
        n_flat = hw * hw * c_out
        self.out = _mm(rng, n_flat, n_out, scale=2.0)
        self.V = brainscale.ETraceState(_f32(rng.rand(*_shape(batch, hw, hw, c_out)) * 0.8))
        self.o = brainscale.ETraceState(jnp.zeros(_shape(batch, n_out), jnp.float32))
        self.spk_fun = braintools.surrogate.Sigmoid()
        self.batch = batch

    def update(self, x):
        z_prev = self.spk_fun(self.V.value - 1.0)
        v = 0.8 * (self.V.value - z_prev) + self.conv.execute(x)
        self.V.value = v
        s = self.spk_fun(v - 1.0)
        flat = s.reshape(s.shape[:-3] + (-1,))
        self.o.value = 0.9 * self.o.value + self.out.execute(flat)
        return self.o.value


def conv_snn(batch=0, seed=0):
    rng = np.random.RandomState(seed + 1000)
    return ConvSNN(batch=batch, seed=seed), _input(rng, batch, 8, 8, 2)


# ---------------------------------------------------------------------------------------
# Sparse recurrent network
# ---------------------------------------------------------------------------------------

class SparseRecNet(brainstate.nn.Module):
    """A LIF layer whose input+recurrent weights are one sparse CSR matrix (SpMatMulOp).

    ::

        z_prev = spike(V_prev - 1)
        y      = M(data) · concat(x, z_prev) + b         # SpMatMulOp, CSR of shape (n_in+n, n)
        V      = 0.85 * (V_prev - z_prev) + y
        return tanh(V)
    """

    def __init__(self, n_in=3, n_rec=6, batch=0, seed=0, p=0.5):
        super().__init__()
        rng = np.random.RandomState(seed)
        mask = rng.rand(n_in + n_rec, n_rec) < p
        mask[np.arange(n_rec) % (n_in + n_rec), np.arange(n_rec)] = True   # no empty column
        dense = np.where(mask, rng.randn(n_in + n_rec, n_rec) * 1.2, 0.0).astype(np.float32)
        csr = brainevent.CSR.fromdense(jnp.asarray(dense))
        self.mask = mask
        self.syn = brainscale.ETraceParam({"weight": _f32(csr.data),
                                           "bias": _f32(rng.randn(n_rec) * 0.1)},
                                          brainscale.SpMatMulOp(csr))
        self.V = brainscale.ETraceState(_f32(rng.rand(*_shape(batch, n_rec)) * 0.8))
        self.spk_fun = braintools.surrogate.Sigmoid()

    def update(self, x):
        z_prev = self.spk_fun(self.V.value - 1.0)
        y = self.syn.execute(jnp.concatenate([x, z_prev], axis=-1))
        self.V.value = 0.85 * (self.V.value - z_prev) + y
        return jnp.tanh(self.V.value)


def sparse_rec(batch=0, seed=0):
    rng = np.random.RandomState(seed + 1000)
    return SparseRecNet(batch=batch, seed=seed), _input(rng, batch, 3)


# ---------------------------------------------------------------------------------------
# Element-wise parameter (learnable time constant)
# ---------------------------------------------------------------------------------------

class ElemWiseTauNet(brainstate.nn.Module):
    """A leaky layer with a learnable per-neuron decay ``sigmoid(θ)``.

    ::

        decay = sigmoid(θ)                              # ETraceParam(θ, ElemWiseOp(sigmoid))
        V     = decay * V_prev + W · x + b              # MatMulOp
        return tanh(V)
    """

    def __init__(self, n_in=3, n=5, batch=0, seed=0, fn=jax.nn.sigmoid):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.theta = brainscale.ETraceParam(_f32(rng.randn(n) * 0.5 + 1.5),
                                            brainscale.ElemWiseOp(fn))
        self.w = _mm(rng, n_in, n, scale=1.5)
        self.V = brainscale.ETraceState(_f32(rng.randn(*_shape(batch, n)) * 0.5))

    def update(self, x):
        decay = self.theta.execute(None)
        self.V.value = decay * self.V.value + self.w.execute(x)
        return jnp.tanh(self.V.value)


def elemwise_tau(batch=0, seed=0):
    rng = np.random.RandomState(seed + 1000)
    return ElemWiseTauNet(batch=batch, seed=seed), _input(rng, batch, 3)


def _softmax_decay(theta):
    return 0.95 * jax.nn.softmax(theta) + 0.02


def softmax_tau(batch=0, seed=0):
    """:class:`ElemWiseTauNet` whose ElemWiseOp fn is not element-wise (a softmax over the
    neurons): the op must get the per-neuron layout."""
    rng = np.random.RandomState(seed + 1000)
    return ElemWiseTauNet(batch=batch, seed=seed, fn=_softmax_decay), _input(rng, batch, 3)


# ---------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------

class LoraNet(brainstate.nn.Module):
    """A LoRA adapter (rank 2) feeding a leaky neuron: ``V = 0.9 V + (x·B)·A + b``."""

    def __init__(self, n_in=5, n=4, r=2, batch=0, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.lora = brainscale.ETraceParam({"B": _f32(rng.randn(n_in, r) * 0.7),
                                            "A": _f32(rng.randn(r, n) * 0.7),
                                            "bias": _f32(rng.randn(n) * 0.1)},
                                           brainscale.LoraOp())
        self.V = brainscale.ETraceState(_f32(rng.randn(*_shape(batch, n)) * 0.5))

    def update(self, x):
        self.V.value = 0.9 * self.V.value + self.lora.execute(x)
        return jnp.tanh(self.V.value)


def lora(batch=0, seed=0):
    rng = np.random.RandomState(seed + 1000)
    return LoraNet(batch=batch, seed=seed), _input(rng, batch, 5)


# ---------------------------------------------------------------------------------------
# models for the exactness tests
# ---------------------------------------------------------------------------------------

class SingleLayer2State(brainstate.nn.Module):
    """input → MatMulOp → a smooth 2-state neuron (V, a); no recurrent weights.

    ::

        y = W · x + b
        V = 0.95 * V_prev - 0.3 * a_prev + y
        a = 0.9 * a_prev + 0.1 * tanh(V_prev)
        return tanh(0.1 * V) + 0.05 * V

    With weights of order 3 and inputs of order 1, ``V`` (and so the D-RTRL trace) grows to
    tens: anchor pitfall 1 (trace rescaling) would show.
    """

    def __init__(self, n_in=4, n=5, batch=0, seed=0, w_scale=3.0, spiking=False):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.w = brainscale.ETraceParam({"weight": _f32(rng.randn(n_in, n) * w_scale),
                                         "bias": _f32(rng.randn(n) * 0.5 + 1.0)},
                                        brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.zeros(_shape(batch, n), jnp.float32))
        self.a = brainscale.ETraceState(jnp.zeros(_shape(batch, n), jnp.float32))
        self.spiking = spiking
        self.spk_fun = braintools.surrogate.Sigmoid(alpha=0.5)
        self.V_th = 5.0

    def update(self, x):
        y = self.w.execute(x)
        v_prev, a_prev = self.V.value, self.a.value
        if not self.spiking:
            self.V.value = 0.95 * v_prev - 0.3 * a_prev + y
            self.a.value = 0.9 * a_prev + 0.1 * jnp.tanh(v_prev)
            return jnp.tanh(0.1 * self.V.value) + 0.05 * self.V.value
        # LIF-like: surrogate spikes of the old V, soft reset, spike-driven adaptation
        z_prev = self.spk_fun(v_prev - self.V_th - a_prev)
        self.V.value = 0.95 * (v_prev - self.V_th * z_prev) + y
        self.a.value = 0.9 * a_prev + 0.5 * z_prev
        return self.spk_fun(self.V.value - self.V_th - self.a.value) + 0.05 * self.V.value


def single_layer_2state(batch=0, seed=0, w_scale=3.0, spiking=False):
    rng = np.random.RandomState(seed + 1000)
    return (SingleLayer2State(batch=batch, seed=seed, w_scale=w_scale, spiking=spiking),
            _input(rng, batch, 4))


class MaskedRecNet(brainstate.nn.Module):
    """A recurrent LIF layer with a masked MatMulOp (and ``weight_fn=abs``)."""

    def __init__(self, n_in=3, n=5, batch=0, seed=0, weight_fn=jnp.abs):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.mask = (rng.rand(n_in + n, n) < 0.6).astype(np.float32)
        self.syn = brainscale.ETraceParam(
            {"weight": _f32(rng.randn(n_in + n, n)), "bias": _f32(rng.randn(n) * 0.1)},
            brainscale.MatMulOp(weight_mask=jnp.asarray(self.mask), weight_fn=weight_fn))
        self.V = brainscale.ETraceState(_f32(rng.rand(*_shape(batch, n)) * 0.8))
        self.spk_fun = braintools.surrogate.Sigmoid()

    def update(self, x):
        z_prev = self.spk_fun(self.V.value - 1.0)
        y = self.syn.execute(jnp.concatenate([x, z_prev], axis=-1))
        self.V.value = 0.8 * (self.V.value - z_prev) + 0.5 * y
        return jnp.tanh(self.V.value)


def masked_rec(batch=0, seed=0):
    rng = np.random.RandomState(seed + 1000)
    return MaskedRecNet(batch=batch, seed=seed), _input(rng, batch, 3)


def _frobenius_normalised(w):
    return 3.0 * w / jnp.sqrt(jnp.sum(w * w))


def normed_rec(batch=0, seed=0):
    """:class:`MaskedRecNet` with a weight_fn that is not element-wise (``3 W / ||W||``): the
    compact layout would drop cross terms, so the op must get the per-neuron layout."""
    rng = np.random.RandomState(seed + 1000)
    return MaskedRecNet(batch=batch, seed=seed, weight_fn=_frobenius_normalised), \
        _input(rng, batch, 3)


class HybridMixNet(brainstate.nn.Module):
    """One layer mixing a big dense input weight, a sparse recurrent weight and a learnable
    per-neuron decay, so that select-dims (policy 'auto') picks io-dim for the dense weight
    and param-dim for the other two.

    ::

        z_prev = spike(V_prev - 1)
        V = sigmoid(θ) * (V_prev - z_prev) + W_in · x + M(data) · z_prev
        return tanh(V)
    """

    def __init__(self, n_in=16, n=6, batch=0, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.w_in = _mm(rng, n_in, n, scale=2.0)
        # a fixed sparse ring: nse = n + n/2 = 9 < |x| + |y| = 12, so param-dim is cheaper
        mask = np.zeros((n, n), bool)
        mask[np.arange(n), (np.arange(n) + 1) % n] = True
        mask[np.arange(0, n, 2), (np.arange(0, n, 2) + 2) % n] = True
        csr = brainevent.CSR.fromdense(jnp.asarray(np.where(mask, rng.randn(n, n), 0.0),
                                                   jnp.float32))
        self.w_rec = brainscale.ETraceParam({"weight": _f32(csr.data)}, brainscale.SpMatMulOp(csr))
        self.theta = brainscale.ETraceParam(_f32(rng.randn(n) * 0.5 + 1.5),
                                            brainscale.ElemWiseOp(jax.nn.sigmoid))
        self.V = brainscale.ETraceState(_f32(rng.rand(*_shape(batch, n)) * 0.8))
        self.spk_fun = braintools.surrogate.Sigmoid()

    def update(self, x):
        z_prev = self.spk_fun(self.V.value - 1.0)
        decay = self.theta.execute(None)
        self.V.value = decay * (self.V.value - z_prev) + self.w_in.execute(x) + \
            self.w_rec.execute(z_prev)
        return jnp.tanh(self.V.value)


def hybrid_mix(batch=0, seed=0):
    rng = np.random.RandomState(seed + 1000)
    return HybridMixNet(batch=batch, seed=seed), _input(rng, batch, 16)


#: the models of the golden / oracle suites
MODELS = {
    "lif_delta": lif_delta,
    "alif": alif,
    "gru3": gru3,
    "gru_rh": gru_rh,
    "conv_snn": conv_snn,
    "sparse_rec": sparse_rec,
    "elemwise_tau": elemwise_tau,
    "lora": lora,
}


def make(name: str, batch: int = 0, seed: int = 0):
    """``MODELS[name](batch, seed)`` (also the exactness-only models by name)."""
    extra = {"single_layer_2state": single_layer_2state, "masked_rec": masked_rec,
             "normed_rec": normed_rec, "softmax_tau": softmax_tau,
             "hybrid_mix": hybrid_mix, "gru_plain_in": gru_plain_in}
    return {**MODELS, **extra}[name](batch=batch, seed=seed)


class GRUPlainInput(brainstate.nn.Module):
    """A plain (non-trace) input projection ``P`` feeding a :class:`GRULayer`.

    ``P`` is an ordinary ``brainstate.ParamState``: it must get its instantaneous gradient
    (anchor pitfall 6: braintrace gave it exactly zero).
    """

    def __init__(self, n_in=3, n_p=4, n_h=4, batch=0, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.P = brainstate.ParamState(_f32(rng.randn(n_in, n_p) / np.sqrt(n_in)))
        self.gru = GRULayer(n_p, n_h, batch, rng)

    def update(self, x):
        return self.gru(jnp.tanh(x @ self.P.value))


def gru_plain_in(batch=0, seed=0):
    rng = np.random.RandomState(seed + 1000)
    return GRUPlainInput(batch=batch, seed=seed), _input(rng, batch, 3)
