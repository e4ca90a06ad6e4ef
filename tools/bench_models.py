"""The three benchmark models, written once for three online-learning libraries.

Models (``MODELS``), each with ``N_IN = 100`` inputs, ``N`` hidden units per layer,
``N_OUT = 10`` outputs through a leaky readout, batch ``B`` and float32:

* ``lif``  -- recurrent LIF SNN. Per layer: ``y = W·[input, z_prev] + b`` (one trace op),
  soft reset, leaky integration; the readout ``r = 0.9 r + W_out·z`` is a hidden state too.
* ``alif`` -- adaptive LIF SNN: the same wiring with two coupled states per neuron (``V``, ``a``).
* ``gru``  -- GRU network where every weight is a trace op:
  ``r = σ(Wr·[x,h])``, ``z = σ(Wz·[x,h])``, ``c = tanh(Wx·x + r ⊙ (Uh·h))``,
  ``h = (1-z) ⊙ h + z ⊙ c``.

``layers`` stacks that many hidden layers (layer ``l`` reads layer ``l-1``'s output); the
benchmark uses 1 layer, the compile-time table 3.

Weights, initial hidden values, inputs and targets come from ``numpy.random.RandomState``
(whose stream is fixed across numpy versions) via :func:`make_weights` / :func:`make_hidden`
/ :func:`make_inputs`, and are plain dicts of float32 arrays, so the same numbers can be fed
to every library (through ``.npz`` files for the external ones).

This module imports no online-learning library at import time: an *adapter*
(:func:`get_adapter`) says how a library spells a trace parameter, its application and a
hidden state. ``'ours'`` is this repository's ``brainscale``; ``'brainscale010'`` the
published ``brainscale`` 0.1.0; ``'braintrace'`` the published ``braintrace`` 0.2.x. The
external adapters are only ever imported inside their own virtual environments
(``tools/bench_external.py``).
"""
from __future__ import annotations

import numpy as np

__all__ = ["MODELS", "N_IN", "N_OUT", "make_weights", "make_hidden", "make_inputs",
           "get_adapter", "build", "loss_fn", "param_names", "hidden_names"]

MODELS = ("lif", "alif", "gru")
N_IN = 100
N_OUT = 10

# neuron constants
V_TH = 1.0
LIF_DECAY = 0.1          # dt / tau
READOUT_DECAY = 0.9
ALIF_ALPHA, ALIF_RHO, ALIF_BETA = 0.9, 0.95, 0.2


# ---------------------------------------------------------------------------------------
# deterministic data
# ---------------------------------------------------------------------------------------

def _layer_in(l: int, N: int) -> int:
    return N_IN if l == 0 else N


def param_names(model: str, layers: int = 1) -> list:
    """Canonical ``'<attr>.<key>'`` names of every parameter leaf."""
    out = []
    for l in range(layers):
        if model in ("lif", "alif"):
            out += [f"rec{l}.weight", f"rec{l}.bias"]
        elif model == "gru":
            out += [f"Wr{l}.weight", f"Wr{l}.bias", f"Wz{l}.weight", f"Wz{l}.bias",
                    f"Wx{l}.weight", f"Wx{l}.bias", f"Uh{l}.weight"]
        else:
            raise ValueError(f"unknown model {model!r}; choose one of {MODELS}")
    return out + ["out.weight", "out.bias"]


def hidden_names(model: str, layers: int = 1) -> list:
    out = []
    for l in range(layers):
        out += {"lif": [f"V{l}"], "alif": [f"V{l}", f"a{l}"], "gru": [f"h{l}"]}[model]
    return out + ["r"]


def make_weights(model: str, N: int, seed: int = 0, layers: int = 1) -> dict:
    """``{canonical name: float32 array}`` (``weight`` is ``(n_in, n_out)``)."""
    rng = np.random.RandomState(seed)
    w = {}

    def mm(name, n_in, n_out, scale, bias=True, bias_mean=0.0):
        w[f"{name}.weight"] = (rng.randn(n_in, n_out) * scale / np.sqrt(n_in)).astype(np.float32)
        if bias:
            w[f"{name}.bias"] = (bias_mean + 0.1 * rng.randn(n_out)).astype(np.float32)

    for l in range(layers):
        ni = _layer_in(l, N)
        if model in ("lif", "alif"):
            # input part drives the neurons near threshold, recurrent part is balanced
            wi = rng.randn(ni, N) * (3.0 if l == 0 else 2.0) / np.sqrt(ni)
            wr = rng.randn(N, N) * 1.0 / np.sqrt(N)
            w[f"rec{l}.weight"] = np.concatenate([wi, wr], 0).astype(np.float32)
            w[f"rec{l}.bias"] = (0.5 + 0.1 * rng.randn(N)).astype(np.float32)
        elif model == "gru":
            mm(f"Wr{l}", ni + N, N, 1.0)
            mm(f"Wz{l}", ni + N, N, 1.0)
            mm(f"Wx{l}", ni, N, 1.0)
            mm(f"Uh{l}", N, N, 1.0, bias=False)
        else:
            raise ValueError(f"unknown model {model!r}; choose one of {MODELS}")
    mm("out", N, N_OUT, 1.0)
    return w


def make_hidden(model: str, N: int, B: int, seed: int = 0, layers: int = 1) -> dict:
    """Initial hidden values ``{name: (B, n) float32}``."""
    rng = np.random.RandomState(seed + 7919)
    h = {}
    for l in range(layers):
        if model == "lif":
            h[f"V{l}"] = (rng.rand(B, N) * 0.8).astype(np.float32)
        elif model == "alif":
            h[f"V{l}"] = (rng.rand(B, N) * 0.8).astype(np.float32)
            h[f"a{l}"] = (rng.rand(B, N) * 0.2).astype(np.float32)
        else:
            h[f"h{l}"] = (rng.randn(B, N) * 0.3).astype(np.float32)
    h["r"] = np.zeros((B, N_OUT), np.float32)
    return h


def make_inputs(model: str, T: int, B: int, seed: int = 0):
    """``(xs, ys)``: inputs ``(T, B, N_IN)`` (0/1 spikes for the SNNs, Gaussian for the GRU)
    and regression targets ``(T, B, N_OUT)``, float32."""
    rng = np.random.RandomState(seed + 104729)
    if model in ("lif", "alif"):
        xs = (rng.rand(T, B, N_IN) < 0.1).astype(np.float32)
    else:
        xs = rng.randn(T, B, N_IN).astype(np.float32)
    ys = (rng.randn(T, B, N_OUT) * 0.5).astype(np.float32)
    return xs, ys


# ---------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------

class _Adapter:
    name = "?"

    def param(self, value: dict):
        raise NotImplementedError(f"adapter {self.name!r} must define param(value)")

    def apply(self, p, x):
        raise NotImplementedError(f"adapter {self.name!r} must define apply(p, x)")

    def hidden(self, value):
        import brainstate
        return brainstate.HiddenState(value)


class _Ours(_Adapter):
    name = "ours"

    def __init__(self):
        import brainscale
        self.bs = brainscale

    def param(self, value):
        return self.bs.ETraceParam(value, self.bs.MatMulOp())

    def apply(self, p, x):
        return p.execute(x)

    def hidden(self, value):
        return self.bs.ETraceState(value)


class _Brainscale010(_Adapter):
    """Published brainscale 0.1.0: ``ETraceParam(value, MatMulOp())`` + ``brainstate.HiddenState``."""
    name = "brainscale010"

    def __init__(self):
        import brainscale
        self.bs = brainscale

    def param(self, value):
        return self.bs.ETraceParam(value, self.bs.MatMulOp())

    def apply(self, p, x):
        return p.execute(x)


class _Braintrace(_Adapter):
    """Published braintrace 0.2.x: plain ``ParamState`` routed through ``braintrace.matmul``."""
    name = "braintrace"

    def __init__(self):
        import braintrace
        self.bt = braintrace

    def param(self, value):
        import brainstate
        return brainstate.ParamState(value)

    def apply(self, p, x):
        v = p.value
        return self.bt.matmul(x, v["weight"], v.get("bias"))


_ADAPTERS = {"ours": _Ours, "brainscale010": _Brainscale010, "braintrace": _Braintrace}


def get_adapter(lib: str) -> _Adapter:
    try:
        return _ADAPTERS[lib]()
    except KeyError:
        raise ValueError(f"unknown library {lib!r}; choose one of {sorted(_ADAPTERS)}") from None


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------

def _modules():
    import brainstate
    import braintools
    import jax
    import jax.numpy as jnp

    def f32(a):
        return jnp.asarray(a, jnp.float32)

    class _Net(brainstate.nn.Module):
        kind = "?"

        def __init__(self, ad, weights, hidden, layers):
            super().__init__()
            self.ad, self.layers = ad, layers
            self.spk = braintools.surrogate.Sigmoid(alpha=4.0)
            for name in hidden_names(self.kind, layers):
                setattr(self, name, ad.hidden(f32(hidden[name])))
            groups = {}
            for n, v in weights.items():
                attr, key = n.split(".")
                groups.setdefault(attr, {})[key] = f32(v)
            for attr, val in groups.items():
                setattr(self, attr, ad.param(val))

        def readout(self, s):
            r = READOUT_DECAY * self.r.value + self.ad.apply(self.out, s)
            self.r.value = r
            return r

    class LIFNet(_Net):
        kind = "lif"

        def update(self, x):
            inp = x
            for l in range(self.layers):
                Vs = getattr(self, f"V{l}")
                z_prev = self.spk(Vs.value - V_TH)
                y = self.ad.apply(getattr(self, f"rec{l}"), jnp.concatenate([inp, z_prev], -1))
                v = Vs.value - V_TH * z_prev
                V = v + (y - v) * LIF_DECAY
                Vs.value = V
                inp = self.spk(V - V_TH)
            return self.readout(inp)

    class ALIFNet(_Net):
        kind = "alif"

        def update(self, x):
            inp = x
            for l in range(self.layers):
                Vs, As = getattr(self, f"V{l}"), getattr(self, f"a{l}")
                v_prev, a_prev = Vs.value, As.value
                thr = V_TH + ALIF_BETA * a_prev
                z_prev = self.spk(v_prev - thr)
                y = self.ad.apply(getattr(self, f"rec{l}"), jnp.concatenate([inp, z_prev], -1))
                a = ALIF_RHO * a_prev + z_prev
                v = ALIF_ALPHA * (v_prev - thr * z_prev) + (1 - ALIF_ALPHA) * y
                As.value = a
                Vs.value = v
                inp = self.spk(v - V_TH - ALIF_BETA * a)
            return self.readout(inp)

    class GRUNet(_Net):
        kind = "gru"

        def update(self, x):
            inp = x
            for l in range(self.layers):
                hs = getattr(self, f"h{l}")
                h = hs.value
                xh = jnp.concatenate([inp, h], -1)
                r = jax.nn.sigmoid(self.ad.apply(getattr(self, f"Wr{l}"), xh))
                z = jax.nn.sigmoid(self.ad.apply(getattr(self, f"Wz{l}"), xh))
                c = jnp.tanh(self.ad.apply(getattr(self, f"Wx{l}"), inp)
                             + r * self.ad.apply(getattr(self, f"Uh{l}"), h))
                h = (1 - z) * h + z * c
                hs.value = h
                inp = h
            return self.readout(inp)

    return {"lif": LIFNet, "alif": ALIFNet, "gru": GRUNet}


def build(lib: str, model: str, weights: dict, hidden: dict, layers: int = 1):
    """Build ``model`` for library ``lib`` from the given weights and initial hidden values."""
    ad = lib if isinstance(lib, _Adapter) else get_adapter(lib)
    return _modules()[model](ad, weights, hidden, layers)


def loss_fn(out, target):
    """Per-step loss: mean squared error of the readout."""
    import jax.numpy as jnp
    return jnp.mean((out - target) ** 2)
