"""brainscale.nn's brainscale-0.1 modules and options, compiled by both algorithms, against
the dense oracle (and BPTT where the algorithm is exact).

Each case builds two identical models (same seed): one compiled by ``DiagParamDimAlgorithm``
/ ``DiagIODimAlgorithm(decay_or_rank=0.9)``, one run by ``tests/oracle.py``'s
``DenseOracle``; the gradients of every ParamState must agree at every step (see
``tests/test_nn_oracle.py``, whose harness this file uses). Each module runs under both
algorithms and both batch modes, as param-dim unbatched and io-dim batched (the oracle is
slow, so configurations are paired and several 0.1 options share one network).
Normalisations sit where they are plain computations: on a trace op's input and in a
readout (between an op and a neuron is the compiler's normalisation support, see
tests/test_nn_fallback.py). GRUCell's and MGUCell's 0.1 forms are also in
tests/test_nn_fallback.py / tests/test_nn_oracle.py, URLSTMCell in tests/test_nn_oracle.py.
"""
from __future__ import annotations

import warnings

import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import brainscale.nn as bnn
from oracle import bptt_grads
from test_nn_oracle import (_fast_xla_compiles, compare_with_oracle, continuous,  # noqa: F401
                            group_sizes, positive, trace_dims)

T = 3
TWO = [("param", None), ("io", 2)]


def _run(make, xs, alg, batch, **kw):
    with warnings.catch_warnings():
        # 0.1's GRU/MGU/MinimalRNN feed a gate into another op's input on purpose
        warnings.simplefilter("ignore", brainscale.NoTemporalCreditWarning)
        return compare_with_oracle(make, xs, alg, batch, T=T, **kw)


def _expect_dims(learner, alg, none=(), param=()):
    """Every trace parameter's dim: ``none`` for those listed, ``param`` for ElemWiseOp /
    ETraceGrad.full ones listed in ``param``, else the algorithm's."""
    want = {"param": "param", "io": "io"}[alg]
    for p, d in trace_dims(learner).items():
        exp = "none" if p in none else "param" if p in param else want
        assert d == exp, (p, d, exp, learner.ir())


# ---------------------------------------------------------------------------------------
# recurrent cells (0.1's equations and defaults)
# ---------------------------------------------------------------------------------------

CELLS = {
    # name: (make, groups, params with dim none, params always param-dim, configs)
    "GRUCell": (lambda: bnn.GRUCell(3, 3), [1], {"Wr.weight_op"}, (), [("io", 2)]),
    "MinimalRNNCell": (lambda: bnn.MinimalRNNCell(3, 3), [1], (), (), TWO),
    "MiniGRU": (lambda: bnn.MiniGRU(3, 3), [1], (), (), TWO),
    "MiniLSTM": (lambda: bnn.MiniLSTM(3, 3), [1], (), (), TWO),
    # C_re, C_im and D read the hidden states into the output only (no relation: none)
    "LRUCell": (lambda: bnn.LRUCell(3, 2), [2], {"C_re.weight_op", "C_im.weight_op", "D"},
                {"nu_log", "theta_log", "gamma_log"}, TWO),
}
CELL_CONFIGS = [(n, alg, b) for n in sorted(CELLS) for alg, b in CELLS[n][4]]


@pytest.mark.parametrize("name,alg,batch", CELL_CONFIGS, ids=lambda v: str(v))
def test_cell_matches_oracle(name, alg, batch):
    make, groups, none, param, _ = CELLS[name]
    learner, rel, scale = _run(make, continuous(3), alg, batch)
    assert group_sizes(learner) == groups, learner.ir()
    _expect_dims(learner, alg, none, param)


def test_complex_lru_d_rtrl_equals_bptt():
    """The LRU recurrence is diagonal and linear: D-RTRL is exact, so online gradients
    summed over a sequence equal BPTT's (every parameter, readout ones included)."""
    loss = lambda out: jnp.sum(out ** 2)  # noqa: E731
    xs = jnp.asarray(np.random.RandomState(1).randn(6, 2, 3), jnp.float32)
    brainstate.random.seed(3)
    a = bnn.LRUCell(3, 4, r_min=0.5, r_max=0.95)
    brainstate.random.seed(3)
    b = bnn.LRUCell(3, 4, r_min=0.5, r_max=0.95)
    brainstate.nn.init_all_states(a, batch_size=2)
    brainstate.nn.init_all_states(b, batch_size=2)
    learner = brainscale.DiagParamDimAlgorithm(a).compile_graph(xs[0])
    params = a.states(brainstate.ParamState)
    step = brainstate.transform.jit(
        lambda x: brainstate.transform.grad(lambda: loss(learner(x)), params)())
    total = None
    for t in range(len(xs)):
        g = step(xs[t])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    ref = bptt_grads(b, xs, loss)
    assert set(total) == set(ref)
    for k in total:
        for x, y in zip(jax.tree.leaves(total[k]), jax.tree.leaves(ref[k])):
            assert float(jnp.max(jnp.abs(y))) > 0, k
            np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(y))),
                                       err_msg=str(k))


# ---------------------------------------------------------------------------------------
# normalisations on an op's input and in a readout
# ---------------------------------------------------------------------------------------

class InputAndReadoutNorm(brainstate.nn.Module):
    """``pre`` on the op's input (reshaped flat), LIF, ``post`` after the hidden states."""

    def __init__(self, pre, post, n_in, n_rec=3):
        super().__init__()
        self.pre = pre
        self.lin = bnn.Linear(n_in, n_rec, w_init=braintools.init.KaimingNormal(2., unit=u.mV))
        self.neu = bnn.LIF(n_rec, spk_fun=braintools.surrogate.Sigmoid(2.))
        self.post = post

    def update(self, x):
        z = self.pre(x)
        z = jnp.reshape(z, z.shape[:z.ndim - len(self.pre.in_size)] + (-1,))
        spk = self.neu(self.lin(z) / u.ohm)
        return self.post(spk + 0.1 * jnp.arange(spk.shape[-1]))


_AFF = dict(scale_init=braintools.init.Uniform(0.5, 1.5),
            bias_init=braintools.init.Uniform(-0.2, 0.2))
_BN_AFF = dict(scale_initializer=braintools.init.Uniform(0.5, 1.5),
               bias_initializer=braintools.init.Uniform(-0.2, 0.2))

def _same(s):
    return s


NORMS = {
    # name: (make, input shape, [(fit, alg, batch), ...])
    "LayerNorm-RMSNorm": (lambda: InputAndReadoutNorm(
        bnn.LayerNorm(4, **_AFF), bnn.RMSNorm(3, scale_init=braintools.init.Uniform(0.5, 1.5)),
        4), 4, [(None, "param", None)]),
    "RMSNorm-LayerNorm": (lambda: InputAndReadoutNorm(
        bnn.RMSNorm(4, scale_init=braintools.init.Uniform(0.5, 1.5)), bnn.LayerNorm(3, **_AFF),
        4), 4, [(None, "io", 2)]),
    # a readout group of 2 spike values is ill-conditioned in float32 with eps=1e-6
    "GroupNorm": (lambda: InputAndReadoutNorm(
        bnn.GroupNorm(4, num_groups=2, **_AFF),
        bnn.GroupNorm(3, num_groups=None, group_size=3, epsilon=1e-2, **_AFF), 4), 4,
        [(None, "param", 2)]),
    # one unbatched example has no batch statistics of a 0-d BatchNorm (they normalise to 0)
    "BatchNorm0d": (lambda: InputAndReadoutNorm(bnn.BatchNorm0d(4, **_BN_AFF),
                                                bnn.BatchNorm0d(3, **_BN_AFF), 4),
                    4, [(True, "io", 2), (False, "param", None)]),
    "BatchNorm1d": (lambda: InputAndReadoutNorm(bnn.BatchNorm1d((2, 2), **_BN_AFF), _same, 4),
                    (2, 2), [(True, "param", None)]),
    "BatchNorm2d": (lambda: InputAndReadoutNorm(bnn.BatchNorm2d((2, 1, 2), **_BN_AFF), _same, 4),
                    (2, 1, 2), [(True, "io", 2)]),
    "BatchNorm3d": (lambda: InputAndReadoutNorm(bnn.BatchNorm3d((1, 2, 1, 2), **_BN_AFF),
                                                _same, 4),
                    (1, 2, 1, 2), [(False, "io", 2)]),
}
NORM_CONFIGS = [(n,) + c for n in sorted(NORMS) for c in NORMS[n][2]]


@pytest.mark.parametrize("name,fit,alg,batch", NORM_CONFIGS, ids=lambda v: str(v))
def test_norm_on_input_and_readout_matches_oracle(name, fit, alg, batch):
    make, shape, _ = NORMS[name]
    with brainstate.environ.context(fit=fit):
        learner, rel, scale = _run(make, continuous(shape, 1., 0.5), alg, batch)
    # the affine (a ScaleOp) feeds the Linear's input or no hidden state: instantaneous
    dims = trace_dims(learner)
    assert dims.pop("lin.weight_op") == alg
    assert set(dims.values()) <= {"none"}, learner.ir()


def test_batchnorm_running_statistics_are_states_outside_the_trace():
    """In training (fit=True) the compiled step updates the running statistics like the
    plain model does; they are not hidden states and get no trace."""
    make, shape, _ = NORMS["BatchNorm0d"]
    xs = continuous(4, 1., 0.5)(3, 2)
    with brainstate.environ.context(fit=True, dt=1. * u.ms):
        brainstate.random.seed(0)
        net = make()
        brainstate.random.seed(0)
        ref = make()
        brainstate.nn.init_all_states(net, batch_size=2)
        brainstate.nn.init_all_states(ref, batch_size=2)
        learner = brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9).compile_graph(xs[0])
        for t in range(3):
            learner(xs[t])
            ref(xs[t])
    hidden = {".".join(map(str, k)) for k in net.states(brainstate.HiddenState)}
    assert hidden == {"neu.V"}
    for m in ("pre", "post"):
        for s in ("running_mean", "running_var"):
            a = getattr(getattr(net, m), s).value
            b = getattr(getattr(ref, m), s).value
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            assert not np.allclose(a, 0. if s == "running_mean" else 1.)


# ---------------------------------------------------------------------------------------
# 0.1's smaller options
# ---------------------------------------------------------------------------------------

def _coo(n_in, n_out):
    """An unsorted brainunit COO (its data is reordered row-major by SparseLinear)."""
    rng = np.random.RandomState(4)
    mask = rng.rand(n_in, n_out) < 0.6
    mask[0] = True
    row, col = np.nonzero(mask)
    perm = rng.permutation(row.size)
    data = jnp.asarray(rng.randn(row.size) * 1.5, jnp.float32)[perm]
    return u.sparse.COO((data, jnp.asarray(row[perm]), jnp.asarray(col[perm])),
                        shape=(n_in, n_out))


class Layers(brainstate.nn.Module):
    """0.1's layer options in one network: SparseLinear(COO) and Linear(w_mask=<callable>)
    drive one LIF group (recurrently), read out by LeakyRateReadout(r_init=) and
    LeakySpikeReadout(V_init=). (LoRA's 0.1 scaling only changes its op's constant:
    tests/compat/test_nn_compat_api.py; its traces are in tests/test_nn_oracle.py.)"""

    def __init__(self, n_in=3, n=3):
        super().__init__()
        sg = braintools.surrogate.Sigmoid(2.)
        self.neu = bnn.LIF(n, tau=5. * u.ms, spk_fun=sg)
        self.sparse = bnn.SparseLinear(_coo(n_in + n, n), b_init=braintools.init.Constant(0.5))
        self.masked = bnn.Linear(n_in + n, n, w_init=braintools.init.KaimingNormal(2.),
                                 b_init=braintools.init.Constant(1.5),
                                 w_mask=lambda s: np.random.RandomState(2).rand(*s) < 0.7)
        self.proj = bnn.DeltaProj(comm=lambda x: (self.sparse(x) + self.masked(x)) * u.mV,
                                  post=self.neu)
        self.rate = bnn.LeakyRateReadout(n, 2, tau=5. * u.ms,
                                         r_init=braintools.init.Constant(0.3))
        self.out = bnn.LeakySpikeReadout(n, 2, tau=3. * u.ms,
                                         w_init=braintools.init.KaimingNormal(3., unit=u.mV),
                                         V_init=braintools.init.Constant(0.8 * u.mV), spk_fun=sg)

    def update(self, x):
        self.proj(u.math.concatenate([x, self.neu.get_spike()], axis=-1))
        s = self.neu()
        return u.math.concatenate([self.rate(s), self.out(s)], axis=-1)


class ConvPad(brainstate.nn.Module):
    """Conv2d with 0.1's flat padding ``(1, 1)`` and a callable ``w_mask``."""

    def __init__(self):
        super().__init__()
        self.conv = bnn.Conv2d((3, 3, 1), 2, kernel_size=3, padding=(1, 1),
                               w_init=braintools.init.KaimingNormal(2.),
                               w_mask=lambda shape: jnp.ones(shape).at[0, 0].set(0.))
        self.neu = bnn.LIF(self.conv.out_size, tau=5. * u.ms,
                           spk_fun=braintools.surrogate.Sigmoid(2.))
        self.proj = bnn.DeltaProj(comm=lambda x: self.conv(x) * u.mV, post=self.neu)

    def update(self, x):
        self.proj(x)
        return self.neu()


class NonTemp(brainstate.nn.Module):
    """The input Linear as ``param_type=NonTempParam`` (no trace, instantaneous gradient)
    beside a traced recurrent one."""

    def __init__(self):
        super().__init__()
        self.ff = bnn.Linear(3, 4, w_init=braintools.init.KaimingNormal(2.),
                             param_type=brainscale.NonTempParam)
        self.rec = bnn.Linear(4, 4, w_init=braintools.init.KaimingNormal(1.))
        self.neu = bnn.LIF(4, spk_fun=braintools.surrogate.Sigmoid(2.))

    def update(self, x):
        return self.neu((self.ff(x) + self.rec(self.neu.get_spike())) * u.mA)


SMALL = {
    # name: (make, inputs, configs, expected dims ('ALG': the algorithm's))
    # the ops' io/param rules are tested in tests/test_nn_oracle.py; here 0.1's constructors
    "layers": (Layers, positive(3, 1.5), [("param", None)],
               {"sparse.weight_op": "ALG", "masked.weight_op": "ALG", "rate.weight_op": "ALG",
                "out.weight_op": "ALG"}),
    "Conv2d-flat-padding": (ConvPad, positive((3, 3, 1), 1.5), [("param", None)],
                            {"conv.weight_op": "ALG"}),
    "Linear-NonTempParam": (NonTemp, positive(3, 1.5), [("io", 2)], {"rec.weight_op": "ALG"}),
}
SMALL_CONFIGS = [(n, alg, b) for n in sorted(SMALL) for alg, b in SMALL[n][2]]


@pytest.mark.parametrize("name,alg,batch", SMALL_CONFIGS, ids=lambda v: str(v))
def test_small_options_match_oracle(name, alg, batch):
    make, xs, _, dims = SMALL[name]
    learner, rel, scale = _run(make, xs, alg, batch)
    assert trace_dims(learner) == {k: alg if v == "ALG" else v for k, v in dims.items()}, \
        learner.ir()


# ---------------------------------------------------------------------------------------
# brainpy.state projections driving brainscale.nn neurons and synapses
# ---------------------------------------------------------------------------------------

class BrainpyProjections(brainstate.nn.Module):
    """brainpy's projections with brainscale.nn posts, synapses and outputs, one group each:
    ``brainstate.nn.DeltaProj`` (brainpy's) → LIF, ``brainpy.state.CurrentProj`` + CUBA →
    ALIF, ``brainpy.state.AlignPostProj`` with ``Expon.desc`` / ``COBA.desc`` (brainpy's
    shared form) → LIF, and with ``Alpha`` / ``CUBA`` instances → LIF."""

    def __init__(self, n_in=3, n=2):
        import brainpy.state as bp
        super().__init__()
        kn = braintools.init.KaimingNormal
        g0 = braintools.init.ZeroInit(unit=u.mS)
        sg = braintools.surrogate.Sigmoid(2.)
        self.n1 = bnn.LIF(n, tau=5. * u.ms, spk_fun=sg)
        self.p1 = brainstate.nn.DeltaProj(comm=bnn.Linear(n_in, n, w_init=kn(2., unit=u.mV)),
                                          post=self.n1)
        self.n2 = bnn.ALIF(n, tau=5. * u.ms, tau_a=20. * u.ms, beta=0.5 * u.mV, spk_fun=sg)
        self.p2 = bp.CurrentProj(comm=bnn.Linear(n_in, n, w_init=kn(3.)), out=bnn.CUBA(u.mA),
                                 post=self.n2)
        self.n3 = bnn.LIF(n, R=1. * u.kohm, tau=5. * u.ms, spk_fun=sg)
        self.p3 = bp.AlignPostProj(comm=bnn.Linear(n_in, n, w_init=kn(2., unit=u.mS)),
                                   syn=bnn.Expon.desc(n, tau=3. * u.ms, g_initializer=g0),
                                   out=bnn.COBA.desc(E=3. * u.mV), post=self.n3)
        self.n4 = bnn.LIF(n, R=1. * u.kohm, tau=5. * u.ms, spk_fun=sg)
        self.p4 = bp.AlignPostProj(comm=bnn.Linear(n_in, n, w_init=kn(2., unit=u.mS)),
                                   syn=bnn.Alpha(n, tau=2. * u.ms, g_initializer=g0),
                                   out=bnn.CUBA(2. * u.mV), post=self.n4)

    def update(self, x):
        outs = []
        for p, n in ((self.p1, self.n1), (self.p2, self.n2), (self.p3, self.n3),
                     (self.p4, self.n4)):
            p(x)
            outs.append(n())
        return u.math.concatenate(outs, axis=-1)


@pytest.mark.skipif(not bnn.HAS_BRAINPY, reason="brainpy (brainpy.state) is not installed")
@pytest.mark.filterwarnings("ignore:'brainstate.nn.DeltaProj' is deprecated")
@pytest.mark.parametrize("alg,batch", [("io", 2)], ids=lambda v: str(v))
def test_brainpy_projections_with_brainscale_modules_match_oracle(alg, batch):
    learner, rel, scale = _run(BrainpyProjections, positive(3, 1.5), alg, batch)
    # DeltaProj: [V]; CurrentProj: ALIF [V, a]; AlignPostProj: [g, V] and [g, h, V]
    assert group_sizes(learner) == [1, 2, 2, 3], learner.ir()
    assert set(trace_dims(learner).values()) == {alg}
    assert len(trace_dims(learner)) == 4
