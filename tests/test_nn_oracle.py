"""Every brainscale.nn module, compiled by both algorithms, against the dense oracle.

For each case two identical models are built with the same seed: one is compiled by
``DiagParamDimAlgorithm`` / ``DiagIODimAlgorithm(decay_or_rank=0.9)``, the other is run by
``tests/oracle.py``'s ``DenseOracle``. At every step the gradient of every ParamState (trace
parameters and plain ones) of the per-step loss must agree, batched (B=2) and unbatched.
Sizes are tiny (≤ 8 neurons per group, T = 6 steps) to keep the file fast.
"""
from __future__ import annotations

import os
import sys

import brainevent
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import brainscale  # noqa: E402
import brainscale.nn as bnn  # noqa: E402
from oracle import DenseOracle  # noqa: E402

RTOL = 1e-4
DECAY = 0.9
T_STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def _fast_xla_compiles():
    """These tests compile ~120 tiny programs: XLA's optimisation passes dominate their
    cost, so they are switched off for this module only (float32 results agree well within
    the tolerance either way)."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


# ---------------------------------------------------------------------------------------
# harness
# ---------------------------------------------------------------------------------------

def _flat(tree):
    leaves = jax.tree.leaves(tree, is_leaf=lambda a: isinstance(a, u.Quantity))
    return np.concatenate([np.ravel(np.asarray(u.get_mantissa(l), np.float64)) for l in leaves])


def sq_loss(out, target):
    return jnp.sum((u.get_mantissa(out) - target) ** 2)


def make_learner(net, alg):
    if alg == "param":
        return brainscale.DiagParamDimAlgorithm(net)
    return brainscale.DiagIODimAlgorithm(net, decay_or_rank=DECAY)


def compare_with_oracle(make, xs_fn, alg, batch, T=T_STEPS, dt=1. * u.ms, loss=sq_loss,
                        seed=0, rtol=RTOL, allow_zero=()):
    """Run learner and oracle side by side; return (learner, rel_err, grad_scale).

    ``make()`` builds the model; ``xs_fn(T, batch)`` gives the inputs ``(T, [B,] ...)``.
    Asserts the losses and, per ParamState, ``max_t |g - g_oracle| <= rtol · max_t |g_oracle|``
    and that the oracle's gradient is not identically zero (except params in ``allow_zero``).
    """
    with brainstate.environ.context(dt=dt):
        brainstate.random.seed(seed)
        net_a = make()
        brainstate.random.seed(seed)
        net_b = make()
        brainstate.nn.init_all_states(net_a, batch_size=batch)
        brainstate.nn.init_all_states(net_b, batch_size=batch)
        xs = xs_fn(T, batch)
        learner = make_learner(net_a, alg)
        learner.compile_graph(xs[0])
        out_shape = brainstate.transform.eval_shape(lambda: net_a.update(xs[0])).shape
        rng = np.random.RandomState(seed + 7)
        targets = jnp.asarray(rng.randn(T, *out_shape), jnp.float32)
        orc = DenseOracle(net_b, xs[0], algorithm=alg,
                          decay_or_rank=DECAY if alg == "io" else None, loss_fn=loss)
        params = net_a.states(brainstate.ParamState)

        @brainstate.transform.jit
        def step(x, tg):
            return brainstate.transform.grad(lambda: loss(learner(x), tg), params,
                                             return_value=True)()

        err, scale = {}, {}
        for t in range(T):
            g, lv = step(xs[t], targets[t])
            ref = orc.step(xs[t], target=targets[t])
            assert abs(float(lv) - ref["loss"]) <= 1e-4 * max(1., abs(ref["loss"])), \
                (t, float(lv), ref["loss"])
            assert set(g) == set(ref["grads"]), (set(g), set(ref["grads"]))
            for k in g:
                a, b = _flat(g[k]), _flat(ref["grads"][k])
                err[k] = max(err.get(k, 0.), float(np.max(np.abs(a - b))))
                scale[k] = max(scale.get(k, 0.), float(np.max(np.abs(b))))
    rel = {k: err[k] / max(scale[k], 1e-30) for k in err}
    for k in rel:
        name = "/".join(map(str, k))
        if name not in allow_zero:
            assert scale[k] > 0, f"{name}: the oracle gradient is zero at every step (dead model?)"
        assert rel[k] <= rtol, f"{name}: relative error {rel[k]:.3g} > {rtol} (scale {scale[k]:.3g})"
    return learner, rel, scale


def group_sizes(learner):
    return sorted(len(g.states) for g in learner.graph.groups)


def trace_dims(learner):
    """``{param name: dim}`` from the compiled graph."""
    rel = {r.id: r.param for r in learner.graph.relations}
    out = {}
    for t in learner.graph.traces:
        for rid in t.relations:
            out.setdefault(rel[rid], set()).add(t.dim)
    return {k: "/".join(sorted(v)) for k, v in out.items()}


def continuous(n, scale=1.0, offset=0.0, seed=3):
    def xs(T, batch):
        rng = np.random.RandomState(seed)
        shape = (T,) + ((batch,) if batch else ()) + (n if isinstance(n, tuple) else (n,))
        return jnp.asarray(offset + scale * rng.randn(*shape), jnp.float32)
    return xs


def positive(n, scale=1.0, seed=3):
    def xs(T, batch):
        rng = np.random.RandomState(seed)
        shape = (T,) + ((batch,) if batch else ()) + (n if isinstance(n, tuple) else (n,))
        return jnp.asarray(scale * rng.rand(*shape), jnp.float32)
    return xs


# ---------------------------------------------------------------------------------------
# test models
# ---------------------------------------------------------------------------------------

class WithUnit(brainstate.nn.Module):
    """``layer(x) * unit`` (gives a unitless trace-op layer the unit of a potential)."""

    def __init__(self, layer, unit):
        super().__init__()
        self.layer = layer
        self.unit = unit

    def update(self, x):
        return self.layer(x) * self.unit


class DeltaNet(brainstate.nn.Module):
    """The seed's pattern: concat[x, spikes] → comm → DeltaProj → neuron; returns spikes."""

    def __init__(self, neuron, comm_fn, n_in=3, n_rec=4, recurrent=True):
        super().__init__()
        self.recurrent = recurrent
        self.neu = neuron(n_rec)
        n = n_in + n_rec if recurrent else n_in
        self.syn = bnn.DeltaProj(comm=comm_fn(n, n_rec), post=self.neu)

    def update(self, x):
        if self.recurrent:
            x = u.math.concatenate([x, self.neu.get_spike()], axis=-1)
        self.syn(x)
        return self.neu()


class CurrentNet(brainstate.nn.Module):
    """x → CurrentProj(comm, out) → neuron (current input); returns spikes."""

    def __init__(self, neuron, comm, out, n_in=3, n_rec=4):
        super().__init__()
        self.neu = neuron(n_rec)
        self.proj = bnn.CurrentProj(comm=comm(n_in, n_rec), out=out, post=self.neu)

    def update(self, x):
        self.proj(x)
        return self.neu()


class SynNet(brainstate.nn.Module):
    """x → AlignPostProj(Linear, synapse, out) → LIF; returns spikes."""

    def __init__(self, syn, out, n_in=3, n_rec=4):
        super().__init__()
        self.neu = bnn.LIF(n_rec, R=1. * u.kohm, tau=5. * u.ms, V_th=1. * u.mV)
        self.proj = bnn.AlignPostProj(
            comm=bnn.Linear(n_in, n_rec, w_init=braintools.init.KaimingNormal(2., unit=u.mS)),
            syn=syn(n_rec), out=out, post=self.neu)

    def update(self, x):
        self.proj(x)
        return self.neu()


class ConvNet(brainstate.nn.Module):
    """x → Conv → DeltaProj → LIF over the conv's output shape (feed-forward)."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.neu = bnn.LIF(conv.out_size, tau=5. * u.ms,
                           spk_fun=braintools.surrogate.Sigmoid(2.))
        self.proj = bnn.DeltaProj(comm=WithUnit(conv, u.mV), post=self.neu)

    def update(self, x):
        self.proj(x)
        return self.neu()


class ScaleShiftNet(brainstate.nn.Module):
    """x → Linear → ScaleShift → LIF (the affine sits between op and neuron: traced)."""

    def __init__(self, n_in=3, n_rec=4):
        super().__init__()
        self.lin = bnn.Linear(n_in, n_rec, w_init=braintools.init.KaimingNormal(2., unit=u.mV))
        self.ss = bnn.ScaleShift(n_rec, scale_init=braintools.init.Constant(1.2),
                                 shift_init=braintools.init.Constant(0.1 * u.mV))
        self.neu = bnn.LIF(n_rec)

    def update(self, x):
        return self.neu(self.ss(self.lin(x)) / u.ohm)


class NormNet(brainstate.nn.Module):
    """LayerNorm on the input of the op, RMSNorm in the readout after the hidden states."""

    def __init__(self, n_in=3, n_rec=4):
        super().__init__()
        self.ln = bnn.LayerNorm(n_in, scale_init=braintools.init.Constant(1.5))
        self.lin = bnn.Linear(n_in, n_rec, w_init=braintools.init.KaimingNormal(2., unit=u.mV))
        self.neu = bnn.LIF(n_rec)
        self.rms = bnn.RMSNorm(n_rec)

    def update(self, x):
        spk = self.neu(self.lin(self.ln(x)) / u.ohm)
        return self.rms(spk + 0.1 * jnp.arange(spk.shape[-1]))


class ReadoutNet(brainstate.nn.Module):
    """x → Linear → LIF → [LeakyRateReadout, LeakySpikeReadout] (outputs concatenated)."""

    def __init__(self, n_in=3, n_rec=4, n_out=2):
        super().__init__()
        self.lin = bnn.Linear(n_in, n_rec, w_init=braintools.init.KaimingNormal(2., unit=u.mA),
                              b_init=braintools.init.Constant(1.5 * u.mA))
        self.neu = bnn.LIF(n_rec)
        self.rate = bnn.LeakyRateReadout(n_rec, n_out, tau=5. * u.ms)
        self.spike = bnn.LeakySpikeReadout(n_rec, n_out, tau=3. * u.ms,
                                           w_init=braintools.init.KaimingNormal(3., unit=u.mV))

    def update(self, x):
        spk = self.neu(self.lin(x))
        return u.math.concatenate([self.rate(spk), self.spike(spk)], axis=-1)


def _mv_linear(n_in, n_out, **kw):
    return bnn.Linear(n_in, n_out, w_init=braintools.init.KaimingNormal(2., unit=u.mV),
                      b_init=braintools.init.ZeroInit(unit=u.mV), **kw)


def _masked_linear(n_in, n_out):
    mask = np.random.RandomState(5).rand(n_in, n_out) < 0.7
    return _mv_linear(n_in, n_out, w_mask=mask)


def _signed_linear(n_in, n_out):
    sign = np.where(np.arange(n_in) % 3 == 2, -1., 1.)
    return bnn.SignedWLinear(n_in, n_out, w_init=braintools.init.KaimingNormal(2., unit=u.mV),
                             w_sign=sign)


def _sparse_linear(n_in, n_out):
    rng = np.random.RandomState(6)
    dense = np.where(rng.rand(n_in, n_out) < 0.6, rng.randn(n_in, n_out) * 1.5, 0.)
    dense[0] = 1.0
    return WithUnit(bnn.SparseLinear(brainevent.CSR.fromdense(jnp.asarray(dense, jnp.float32)),
                                     b_init=braintools.init.ZeroInit()), u.mV)


def _lora(n_in, n_out):
    # B is zero by default (0.1), which makes A's gradient zero: start both non-zero
    return WithUnit(bnn.LoRA(n_in, 2, n_out, B_init=braintools.init.LecunNormal(),
                             A_init=braintools.init.Normal(0., 1.), alpha=1.5), u.mV)


def _lif(**kw):
    return lambda n: bnn.LIF(n, tau=5. * u.ms, **kw)


CASES = {
    # name: (make, inputs, dt, expected group sizes)
    "LIF-soft": (lambda: DeltaNet(_lif(), _mv_linear), positive(3, 1.5), 1. * u.ms, [1]),
    "LIF-hard-masked": (lambda: DeltaNet(_lif(spk_reset="hard"), _masked_linear),
                        positive(3, 1.5), 1. * u.ms, [1]),
    "IF-CUBA": (lambda: CurrentNet(lambda n: bnn.IF(n, tau=5. * u.ms),
                                   lambda i, o: bnn.Linear(i, o, w_init=braintools.init.KaimingNormal(3.)),
                                   bnn.CUBA(u.mA)), positive(3, 1.5), 1. * u.ms, [1]),
    "ALIF": (lambda: DeltaNet(lambda n: bnn.ALIF(n, tau=5. * u.ms, tau_a=20. * u.ms,
                                                 beta=0.5 * u.mV), _mv_linear),
             positive(3, 1.5), 1. * u.ms, [2]),
    "GIF": (lambda: CurrentNet(
        lambda n: bnn.GIF(n, R=1. * u.ohm, tau=5. * u.ms, V_rest=0. * u.mV, V_reset=0. * u.mV,
                          V_th_inf=1. * u.mV, V_th_reset=1.2 * u.mV,
                          V_th_initializer=braintools.init.Constant(1. * u.mV),
                          a=0.1 / u.ms, b=0.2 / u.ms, A1=0.2 * u.mA, A2=-0.1 * u.mA,
                          V_initializer=braintools.init.Constant(0. * u.mV)),
        lambda i, o: bnn.Linear(i, o, w_init=braintools.init.KaimingNormal(3.)),
        bnn.CUBA(u.mA)), positive(3, 1.5), 1. * u.ms, [4]),
    "Izhikevich-hard": (lambda: CurrentNet(
        lambda n: bnn.Izhikevich(n, spk_fun=braintools.surrogate.Sigmoid(1.)),
        lambda i, o: bnn.Linear(i, o, w_init=braintools.init.KaimingNormal(3.)),
        bnn.CUBA(10. * u.mV / u.ms)), positive(3, 2.), 0.5 * u.ms, [2]),
    "Izhikevich-soft": (lambda: CurrentNet(
        lambda n: bnn.Izhikevich(n, spk_fun=braintools.surrogate.Sigmoid(1.), spk_reset="soft"),
        lambda i, o: bnn.Linear(i, o, w_init=braintools.init.KaimingNormal(3.)),
        bnn.CUBA(10. * u.mV / u.ms)), positive(3, 2.), 0.5 * u.ms, [2]),
    "COBA-CurrentProj": (lambda: CurrentNet(
        lambda n: bnn.LIF(n, R=1. * u.kohm, tau=5. * u.ms),
        lambda i, o: bnn.Linear(i, o, w_init=braintools.init.KaimingNormal(2., unit=u.mS),
                                b_init=None),
        bnn.COBA(E=3. * u.mV)), positive(3, 1.5), 1. * u.ms, [1]),
    "Expon-COBA": (lambda: SynNet(
        lambda n: bnn.Expon(n, tau=3. * u.ms, g_initializer=braintools.init.ZeroInit(unit=u.mS)),
        bnn.COBA(E=3. * u.mV)), positive(3, 1.5), 1. * u.ms, [2]),
    "Alpha-CUBA": (lambda: SynNet(
        lambda n: bnn.Alpha(n, tau=2. * u.ms, g_initializer=braintools.init.ZeroInit(unit=u.mS)),
        bnn.CUBA(2. * u.mV)), positive(3, 1.5), 1. * u.ms, [3]),
    "SignedWLinear": (lambda: DeltaNet(_lif(), _signed_linear), positive(3, 1.5), 1. * u.ms, [1]),
    "SparseLinear": (lambda: DeltaNet(_lif(), _sparse_linear), positive(3, 1.5), 1. * u.ms, [1]),
    "LoRA": (lambda: DeltaNet(_lif(), _lora), positive(3, 1.0), 1. * u.ms, [1]),
    "Conv1d": (lambda: ConvNet(bnn.Conv1d((4, 2), 2, kernel_size=3, stride=2,
                                          w_init=braintools.init.KaimingNormal(2.),
                                          b_init=braintools.init.ZeroInit())),
               positive((4, 2), 1.5), 1. * u.ms, [1]),
    "Conv2d": (lambda: ConvNet(bnn.Conv2d((3, 3, 1), 2, kernel_size=2, stride=2,
                                          w_init=braintools.init.KaimingNormal(2.))),
               positive((3, 3, 1), 1.5), 1. * u.ms, [1]),
    "Conv3d": (lambda: ConvNet(bnn.Conv3d((2, 2, 2, 1), 1, kernel_size=2,
                                          w_init=braintools.init.KaimingNormal(2.),
                                          b_init=braintools.init.ZeroInit())),
               positive((2, 2, 2, 1), 1.5), 1. * u.ms, [1]),
    "ScaleShift": (lambda: ScaleShiftNet(), positive(3, 1.5), 1. * u.ms, [1]),
    "LayerNorm-RMSNorm": (lambda: NormNet(), continuous(3), 1. * u.ms, [1]),
    "LeakyRate-LeakySpikeReadout": (lambda: ReadoutNet(), positive(3, 1.5), 1. * u.ms, [1, 1, 1]),
    "ValinaRNNCell": (lambda: bnn.ValinaRNNCell(3, 4, activation="tanh"), continuous(3),
                      1. * u.ms, [1]),
    # the cells' brainscale 0.1 defaults (GRUCell's W_r: dim none, see NONE_DIMS) are in
    # tests/compat/test_nn_compat_oracle.py; here this package's fully traced variants
    "GRUCell-reset-after": (lambda: bnn.GRUCell(3, 4, reset_after=True), continuous(3),
                            1. * u.ms, [1]),
    "MGUCell-reset-after": (lambda: bnn.MGUCell(3, 4, reset_after=True), continuous(3),
                            1. * u.ms, [1]),
    "MGUCell": (lambda: bnn.MGUCell(3, 4), continuous(3), 1. * u.ms, [1]),
    "LSTMCell": (lambda: bnn.LSTMCell(3, 4), continuous(3), 1. * u.ms, [2]),
    "URLSTMCell": (lambda: bnn.URLSTMCell(3, 4), continuous(3), 1. * u.ms, [2]),
    "MinimalRNNCell-x": (lambda: bnn.MinimalRNNCell(3, 4, gate_input="x", activation="tanh"),
                         continuous(3), 1. * u.ms, [1]),
    "LRUCell-real": (lambda: bnn.LRUCell(3, 4, r_min=0.4, r_max=0.99, complex_valued=False),
                     continuous(3), 1. * u.ms, [1]),
}

#: variants of a module tested above, and neuron / synapse / cell dynamics whose ops are plain
#: dense layers: only two configurations each (param-dim unbatched and io-dim batched) to
#: keep the file fast; the batching of their ops is what the remaining four-configuration
#: cases (convolutions, LoRA, sparse, signed, scale-shift, normalisations, GRU, LSTM) and
#: tests/test_online_oracle.py cover. GRUCell(reset_after=False), the default, is in
#: test_nn_fallback.py and tests/compat (its W_r has dim 'none').
VARIANTS = {"LIF-hard-masked", "Izhikevich-soft", "MGUCell", "ALIF", "Alpha-CUBA",
            "COBA-CurrentProj", "Expon-COBA", "GIF", "IF-CUBA", "Izhikevich-hard", "LIF-soft",
            "LeakyRate-LeakySpikeReadout", "MinimalRNNCell-x", "ValinaRNNCell", "URLSTMCell",
            "MGUCell-reset-after", "LRUCell-real"}
CONFIGS = [(case, alg, batch) for case in sorted(CASES)
           for alg, batch in (("param", None), ("param", 2), ("io", None), ("io", 2))
           if case not in VARIANTS or (alg, batch) in (("param", None), ("io", 2))]


#: trace parameters whose op output feeds another op's input or no hidden state (dim none):
#: the normalisations' affine (a ScaleOp, 0.1's layout) on an op input / in a readout
NONE_DIMS = {"LayerNorm-RMSNorm": {"ln.weight", "rms.scale"}}


def _config_id(c):
    return f"{c[0]}-{c[1]}-{'B2' if c[2] else 'unbatched'}"


@pytest.mark.parametrize("case,alg,batch", CONFIGS, ids=[_config_id(c) for c in CONFIGS])
def test_module_matches_oracle(case, alg, batch):
    make, xs, dt, groups = CASES[case]
    learner, rel, scale = compare_with_oracle(make, xs, alg, batch, dt=dt)
    assert group_sizes(learner) == groups, learner.ir()
    dims = trace_dims(learner)
    for p, d in dims.items():
        if p in NONE_DIMS.get(case, ()):
            assert d == "none", (p, d, learner.ir())
        elif p.endswith("nu") or p.endswith("gamma_log") or p.endswith("bias") \
                or p.startswith("ss."):
            # ElemWiseOp parameters (no op input) always take param-dim
            assert d == "param", (p, d)
        else:
            assert d == alg, (p, d, learner.ir())
