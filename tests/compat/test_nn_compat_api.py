"""brainscale.nn against brainscale 0.1's documented signatures, defaults and behaviour.

Written here from 0.1's published API (its docstrings, signatures and equations), not copied:
* the cells' constructor signatures, parameter names and one step of their equations,
  recomputed with numpy from the module's own weights (the complex LRU with numpy complex
  numbers);
* the normalisations equal brainstate's layers (0.1's were brainstate's with the affine as an
  ETraceParam): same outputs, same parameter layout, so a checkpoint of one loads into the
  other; BatchNorm's training/evaluation modes and running statistics;
* 0.1's layer and readout keywords; brainpy.state interop and 0.1's forwarded names; and
  ``brainscale.nn`` without brainpy installed (in a subprocess).
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import warnings

import brainevent
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import brainscale.nn as bnn


def _np(a):
    return np.asarray(u.get_mantissa(a), np.float64)


def _sig(cls):
    """``[(name, default or None), ...]`` of the constructor's leading parameters."""
    ps = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return [(p.name, p.default) for p in ps if p.kind is p.POSITIONAL_OR_KEYWORD]


def _sigmoid(x):
    return 1. / (1. + np.exp(-x))


def _lin(layer, x):
    """``x @ W + b`` of a brainscale.nn.Linear, in numpy."""
    w = layer.weight_op.value
    y = x @ _np(w["weight"])
    return y + _np(w["bias"]) if "bias" in w else y


# ---------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------

SIGNATURES = {
    # 0.1's positional parameters and the type of each initializer default
    bnn.ValinaRNNCell: (["in_size", "out_size", "state_init", "w_init", "b_init", "activation",
                         "name", "param_type"], {"w_init": braintools.init.XavierNormal,
                                                 "activation": "relu"}),
    bnn.GRUCell: (["in_size", "out_size", "w_init", "b_init", "state_init", "activation", "name",
                   "param_type"], {"w_init": braintools.init.Orthogonal, "activation": "tanh"}),
    bnn.MGUCell: (["in_size", "out_size", "w_init", "b_init", "state_init", "activation", "name",
                   "param_type"], {"w_init": braintools.init.Orthogonal}),
    bnn.LSTMCell: (["in_size", "out_size", "w_init", "b_init", "state_init", "activation",
                    "name", "param_type"], {"w_init": braintools.init.XavierNormal}),
    bnn.URLSTMCell: (["in_size", "out_size", "w_init", "state_init", "activation", "name",
                      "param_type"], {"w_init": braintools.init.XavierNormal}),
    bnn.MinimalRNNCell: (["in_size", "out_size", "w_init", "b_init", "state_init", "phi",
                          "name", "param_type"], {"w_init": braintools.init.Orthogonal,
                                                  "phi": None}),
    bnn.MiniGRU: (["in_size", "out_size", "w_init", "b_init", "state_init", "name",
                   "param_type"], {"w_init": braintools.init.Orthogonal}),
    bnn.MiniLSTM: (["in_size", "out_size", "w_init", "b_init", "state_init", "name",
                    "param_type"], {"w_init": braintools.init.Orthogonal}),
    bnn.LRUCell: (["d_model", "d_hidden", "r_min", "r_max", "max_phase"],
                  {"r_min": 0.0, "r_max": 1.0, "max_phase": 6.28}),
}


@pytest.mark.parametrize("cls", list(SIGNATURES), ids=lambda c: c.__name__)
def test_cell_signature_and_defaults(cls):
    names, defaults = SIGNATURES[cls]
    sig = _sig(cls)
    assert [n for n, _ in sig] == names
    got = dict(sig)
    for k, v in defaults.items():
        if isinstance(v, type):
            assert type(got[k]) is v, (k, got[k])
        else:
            assert got[k] == v, (k, got[k])
    assert got.get("param_type", brainscale.ETraceParam) is brainscale.ETraceParam
    if cls in (bnn.GRUCell, bnn.MGUCell):
        assert inspect.signature(cls.__init__).parameters["reset_after"].default is False


PARAMS = {
    # the parameter paths of 0.1's cells (a checkpoint's keys)
    "ValinaRNNCell": (lambda: bnn.ValinaRNNCell(2, 3), {"W"}),
    "GRUCell": (lambda: bnn.GRUCell(2, 3), {"Wz", "Wr", "Wh"}),
    "MGUCell": (lambda: bnn.MGUCell(2, 3), {"Wf", "Wh"}),
    "LSTMCell": (lambda: bnn.LSTMCell(2, 3), {"Wi", "Wg", "Wf", "Wo"}),
    "URLSTMCell": (lambda: bnn.URLSTMCell(2, 3), {"Wu", "Wf", "Wr", "Wo", "bias"}),
    "MinimalRNNCell": (lambda: bnn.MinimalRNNCell(2, 3), {"phi", "W_u"}),
    "MiniGRU": (lambda: bnn.MiniGRU(2, 3), {"W_x", "W_z"}),
    "MiniLSTM": (lambda: bnn.MiniLSTM(2, 3), {"W_x", "W_f", "W_i"}),
    "LRUCell": (lambda: bnn.LRUCell(2, 3), {"theta_log", "nu_log", "gamma_log", "B_re", "B_im",
                                            "C_re", "C_im", "D"}),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_cell_parameter_names(name):
    make, names = PARAMS[name]
    params = make().states(brainstate.ParamState)
    assert {k[0] for k in params} == names
    for k, st in params.items():
        assert isinstance(st, brainscale.ETraceParam), k
        if len(k) == 2:
            assert k[1] == "weight_op"


def _step(cell, x, batch=2):
    brainstate.nn.init_all_states(cell, batch_size=batch)
    states = {k[-1]: st for k, st in cell.states(brainstate.HiddenState).items()}
    rng = np.random.RandomState(0)
    for st in states.values():                        # a non-zero previous state
        st.value = jnp.asarray(rng.randn(*st.value.shape), jnp.float32)
    before = {k: _np(st.value) for k, st in states.items()}
    out = cell(x)
    return before, {k: _np(st.value) for k, st in states.items()}, _np(out)


X = np.random.RandomState(1).randn(2, 3).astype(np.float32)


def test_gru_and_mgu_equations_are_0_1s():
    """GRU: z, r = σ(W [x, h]); h' = (1-z) h + z tanh(W_h [x, r h]); MGU: f plays z and r."""
    brainstate.random.seed(0)
    c = bnn.GRUCell(3, 4)
    (h,), (h1,), out = [list(d.values()) if isinstance(d, dict) else d for d in _step(c, X)]
    xh = np.concatenate([X, h], -1)
    z, r = _sigmoid(_lin(c.Wz, xh)), _sigmoid(_lin(c.Wr, xh))
    ref = (1 - z) * h + z * np.tanh(_lin(c.Wh, np.concatenate([X, r * h], -1)))
    np.testing.assert_allclose(h1, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)

    c = bnn.MGUCell(3, 4)
    (h,), (h1,), _ = [list(d.values()) if isinstance(d, dict) else d for d in _step(c, X)]
    f = _sigmoid(_lin(c.Wf, np.concatenate([X, h], -1)))
    ref = (1 - f) * h + f * np.tanh(_lin(c.Wh, np.concatenate([X, f * h], -1)))
    np.testing.assert_allclose(h1, ref, rtol=1e-5, atol=1e-6)


def test_minimal_rnn_mini_gru_mini_lstm_equations_are_0_1s():
    # MinimalRNN: z = phi(x) (a Linear), u = σ(W_u [z, h]), h' = u h + (1-u) z
    c = bnn.MinimalRNNCell(3, 4)
    (h,), (h1,), _ = [list(d.values()) for d in _step(c, X)[:2]] + [None]
    z = _lin(c.phi, X)
    g = _sigmoid(_lin(c.W_u, np.concatenate([z, h], -1)))
    np.testing.assert_allclose(h1, g * h + (1 - g) * z, rtol=1e-5, atol=1e-6)
    # a user phi (0.1's phi=) and the gate on [x, h]
    c = bnn.MinimalRNNCell(3, 4, phi=lambda x: jnp.tanh(x @ jnp.ones((3, 4))), gate_input="x")
    (h,), (h1,), _ = [list(d.values()) for d in _step(c, X)[:2]] + [None]
    z = np.tanh(X @ np.ones((3, 4)))
    g = _sigmoid(_lin(c.W_u, np.concatenate([X, h], -1)))
    np.testing.assert_allclose(h1, g * h + (1 - g) * z, rtol=1e-5, atol=1e-6)
    # MiniGRU: z = σ(W_z [x, h]), h' = (1-z) h + z W_x x
    c = bnn.MiniGRU(3, 4)
    (h,), (h1,), _ = [list(d.values()) for d in _step(c, X)[:2]] + [None]
    z = _sigmoid(_lin(c.W_z, np.concatenate([X, h], -1)))
    np.testing.assert_allclose(h1, (1 - z) * h + z * _lin(c.W_x, X), rtol=1e-5, atol=1e-6)
    # MiniLSTM: f, i = σ(W [x, h]), h' = f h + i W_x x
    c = bnn.MiniLSTM(3, 4)
    (h,), (h1,), _ = [list(d.values()) for d in _step(c, X)[:2]] + [None]
    xh = np.concatenate([X, h], -1)
    f, i = _sigmoid(_lin(c.W_f, xh)), _sigmoid(_lin(c.W_i, xh))
    np.testing.assert_allclose(h1, f * h + i * _lin(c.W_x, X), rtol=1e-5, atol=1e-6)


def test_urlstm_equations_are_0_1s():
    c = bnn.URLSTMCell(3, 4)
    before, after, out = _step(c, X)
    h, cc = before["h"], before["c"]
    xh = np.concatenate([X, h], -1)
    b = _np(c.bias.value)
    fg, rg = _sigmoid(_lin(c.Wf, xh) + b), _sigmoid(_lin(c.Wr, xh) - b)
    g = 2 * rg * fg + (1 - 2 * rg) * fg ** 2
    c1 = g * cc + (1 - g) * np.tanh(_lin(c.Wu, xh))
    np.testing.assert_allclose(after["c"], c1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after["h"], _sigmoid(_lin(c.Wo, xh)) * np.tanh(c1), rtol=1e-5,
                               atol=1e-6)


def test_lru_is_complex_with_output_d_model():
    """h' = λ h + γ B x with complex λ = exp(-e^ν + i e^θ), B = B_re + i B_im;
    y = Re(C h') + D x with C = C_re + i C_im: output d_model."""
    brainstate.random.seed(2)
    c = bnn.LRUCell(3, 5, r_min=0.3, r_max=0.9)
    before, after, out = _step(c, X)
    assert out.shape == (2, 3)
    assert c.in_size == c.out_size == (3,) and c.d_hidden == 5
    h = before["h_re"] + 1j * before["h_im"]
    nu, th, ga = _np(c.nu_log.value), _np(c.theta_log.value), _np(c.gamma_log.value)
    lam = np.exp(-np.exp(nu) + 1j * np.exp(th))
    assert np.all((np.abs(lam) >= 0.3 - 1e-5) & (np.abs(lam) <= 0.9 + 1e-5))
    np.testing.assert_allclose(np.exp(ga), np.sqrt(1 - np.abs(lam) ** 2), rtol=1e-5)
    B = _np(c.B_re.weight_op.value["weight"]) + 1j * _np(c.B_im.weight_op.value["weight"])
    C = _np(c.C_re.weight_op.value["weight"]) + 1j * _np(c.C_im.weight_op.value["weight"])
    h1 = lam * h + np.exp(ga) * (X @ B)
    np.testing.assert_allclose(after["h_re"] + 1j * after["h_im"], h1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, (h1 @ C).real + X * _np(c.D.value), rtol=1e-5, atol=1e-5)
    for k in ("nu_log", "theta_log", "gamma_log", "D"):
        assert type(getattr(c, k)) is brainscale.ElemWiseParam


# ---------------------------------------------------------------------------------------
# normalisations: brainstate's layers (0.1's were brainstate's with an ETraceParam affine)
# ---------------------------------------------------------------------------------------

def _load(dst, src):
    """Copy every ParamState value of ``src`` into ``dst`` by path (a checkpoint)."""
    s = {k: v for k, v in src.states(brainstate.ParamState).items()}
    d = {k: v for k, v in dst.states(brainstate.ParamState).items()}
    assert set(s) == set(d), (set(s), set(d))
    for k in d:
        assert jax.tree.structure(d[k].value) == jax.tree.structure(s[k].value), k
        assert [np.shape(a) for a in jax.tree.leaves(d[k].value)] == \
            [np.shape(a) for a in jax.tree.leaves(s[k].value)], k
        d[k].value = s[k].value


def _random_affine(m):
    rng = np.random.RandomState(5)
    for st in m.states(brainstate.ParamState).values():
        st.value = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, np.shape(a)),
                                                      jnp.float32), st.value)


NORM_PAIRS = {
    "LayerNorm": (lambda: bnn.LayerNorm((5,)), lambda: brainstate.nn.LayerNorm((5,)), (4, 5)),
    "LayerNorm-2d": (lambda: bnn.LayerNorm((3, 5), reduction_axes=(-2, -1), feature_axes=-1),
                     lambda: brainstate.nn.LayerNorm((3, 5), reduction_axes=(-2, -1),
                                                     feature_axes=-1), (2, 3, 5)),
    "RMSNorm": (lambda: bnn.RMSNorm((5,)), lambda: brainstate.nn.RMSNorm((5,)), (4, 5)),
    # brainstate's GroupNorm takes one feature axis and a batch: (B, C)
    "GroupNorm": (lambda: bnn.GroupNorm((6,), num_groups=3),
                  lambda: brainstate.nn.GroupNorm((6,), num_groups=3), (4, 6)),
}


@pytest.mark.parametrize("name", sorted(NORM_PAIRS))
def test_norm_equals_brainstate_and_loads_its_checkpoint(name):
    ours_f, theirs_f, shape = NORM_PAIRS[name]
    ours, theirs = ours_f(), theirs_f()
    _random_affine(theirs)
    _load(ours, theirs)
    attr = "scale" if name == "RMSNorm" else "weight"
    assert isinstance(getattr(ours, attr), brainscale.ETraceParam)
    assert isinstance(getattr(ours, attr).op, bnn.ScaleOp)
    x = jnp.asarray(np.random.RandomState(3).randn(*shape) * 2. + 1., jnp.float32)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_groupnorm_over_spatial_axes_and_one_example():
    """Statistics per example and group, over the group's channels and every other axis
    (brainstate's rule; here also for inputs with spatial axes and without a batch)."""
    gn = bnn.GroupNorm((3, 6), num_groups=2, epsilon=1e-5)
    _random_affine(gn)
    x = np.random.RandomState(0).randn(2, 3, 6).astype(np.float32) * 2. + 1.
    xg = x.reshape(2, 3, 2, 3)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = xg.var(axis=(1, 3), keepdims=True)
    ref = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(2, 3, 6)
    w = gn.weight.value
    ref = ref * _np(w["scale"]) + _np(w["bias"])
    np.testing.assert_allclose(gn(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gn(jnp.asarray(x[1])), ref[1], rtol=1e-4, atol=1e-4)


def test_norm_defaults_are_brainstates():
    for ours, theirs in ((bnn.LayerNorm, brainstate.nn.LayerNorm),
                         (bnn.RMSNorm, brainstate.nn.RMSNorm),
                         (bnn.GroupNorm, brainstate.nn.GroupNorm),
                         (bnn.BatchNorm2d, brainstate.nn.BatchNorm2d)):
        po = inspect.signature(ours.__init__).parameters
        pt = inspect.signature(theirs.__init__).parameters
        for k in ("epsilon", "use_fast_variance", "momentum", "track_running_stats", "affine",
                  "num_groups", "group_size", "reduction_axes", "feature_axes", "feature_axis"):
            if k in pt:
                assert k in po and po[k].default == pt[k].default, (ours.__name__, k)
        assert po["param_type"].default is brainscale.ETraceParam


@pytest.mark.parametrize("cls,shape", [(bnn.BatchNorm0d, (4,)), (bnn.BatchNorm1d, (3, 4)),
                                       (bnn.BatchNorm2d, (2, 3, 4)),
                                       (bnn.BatchNorm3d, (2, 2, 1, 4))],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_batchnorm_train_and_eval_equal_brainstates(cls, shape):
    ours = cls(shape, momentum=0.8)
    theirs = getattr(brainstate.nn, cls.__name__)(shape, momentum=0.8)
    _random_affine(theirs)
    _load(ours, theirs)
    assert isinstance(ours.running_mean, brainstate.BatchState)
    assert not isinstance(ours.running_mean, brainstate.HiddenState)
    rng = np.random.RandomState(4)
    for fit in (True, True, False):
        x = jnp.asarray(rng.randn(3, *shape) * 2. + 1., jnp.float32)
        with brainstate.environ.context(fit=fit):
            np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours.running_mean.value, theirs.running_mean.value,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours.running_var.value, theirs.running_var.value,
                                   rtol=1e-5, atol=1e-6)
    assert ours.weight.value["scale"].shape == (1,) * (len(shape) - 1) + (4,)


def test_batchnorm_needs_fit_and_checks_shapes():
    bn = bnn.BatchNorm1d((3, 4))
    with pytest.raises(ValueError, match="fit=True"):
        bn(jnp.ones((2, 3, 4)))
    with brainstate.environ.context(fit=True), pytest.raises(ValueError, match="in_size"):
        bn(jnp.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="spatial"):
        bnn.BatchNorm2d((3, 4))
    with pytest.raises(ValueError, match="track_running_stats"):
        bnn.BatchNorm0d(4, track_running_stats=False)
    # without running statistics (and without affine) the batch statistics always normalise
    bn = bnn.BatchNorm0d(4, track_running_stats=False, affine=False)
    y = bn(jnp.arange(8.).reshape(2, 4))
    np.testing.assert_allclose(y.mean(0), 0., atol=1e-5)
    with pytest.raises(ValueError, match="group"):
        bnn.GroupNorm(6, num_groups=4)
    with pytest.raises(ValueError, match="num_groups=None"):
        bnn.GroupNorm(6, group_size=2)


def test_split_layout_is_this_packages_earlier_one():
    ln = bnn.LayerNorm(4, param_layout="split", scale_init=braintools.init.Constant(2.))
    assert type(ln.scale) is brainstate.ParamState and type(ln.bias) is brainstate.ParamState
    ref = bnn.LayerNorm(4, scale_init=braintools.init.Constant(2.))
    x = jnp.arange(8.).reshape(2, 4)
    np.testing.assert_allclose(ln(x), ref(x), rtol=1e-6)
    rms = bnn.RMSNorm(4, param_layout="split")
    assert type(rms.scale) is brainstate.ParamState and rms.scale.value.shape == (4,)


# ---------------------------------------------------------------------------------------
# layers and readouts: 0.1's keywords
# ---------------------------------------------------------------------------------------

def test_linear_w_mask_callable_is_called_with_the_weight_shape():
    shapes = []

    def mask(shape):
        shapes.append(tuple(shape))
        return jnp.zeros(shape).at[0].set(1.)
    lin = bnn.Linear(3, 2, w_init=jnp.ones((3, 2)), b_init=None, w_mask=mask)
    assert shapes == [(3, 2)]
    np.testing.assert_allclose(lin(jnp.array([1., 10., 100.])), [1., 1.])
    with pytest.raises(ValueError, match="w_mask"):
        bnn.Linear(3, 2, w_mask=jnp.ones((2, 3)))


@pytest.mark.parametrize("fmt", ["COO", "COO-unsorted", "CSR", "CSC", "COO-mV"])
def test_sparse_linear_takes_brainunit_matrices(fmt):
    rng = np.random.RandomState(7)
    dense = np.where(rng.rand(5, 4) < 0.5, rng.randn(5, 4), 0.).astype(np.float32)
    dense[0, 0] = 1.
    unit = u.mV if fmt.endswith("mV") else None
    d = jnp.asarray(dense) * unit if unit else jnp.asarray(dense)
    if fmt.startswith("COO"):
        row, col = np.nonzero(dense)
        perm = rng.permutation(row.size) if fmt == "COO-unsorted" else np.arange(row.size)
        data = jnp.asarray(dense[row, col][perm])
        mat = u.sparse.COO((data * unit if unit else data, jnp.asarray(row[perm]),
                            jnp.asarray(col[perm])), shape=dense.shape)
    else:
        mat = getattr(u.sparse, fmt).fromdense(d)
    lin = bnn.SparseLinear(mat)
    x = jnp.asarray(rng.rand(2, 5), jnp.float32)
    np.testing.assert_allclose(_np(lin(x)), np.asarray(x) @ dense, rtol=1e-5, atol=1e-6)
    assert lin.out_size == (4,)
    if fmt == "COO":          # a row-major COO keeps its data order (0.1's parameter)
        np.testing.assert_allclose(_np(lin.weight_op.value["weight"]), _np(mat.data))
    lin = bnn.SparseLinear(sparse_mat=mat)            # 0.1's keyword
    np.testing.assert_allclose(_np(lin(x)), np.asarray(x) @ dense, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="once"):
        bnn.SparseLinear(mat, sparse_mat=mat)
    with pytest.raises(TypeError, match="COO"):
        bnn.SparseLinear("not a matrix")


def test_conv_padding_forms():
    x = jnp.asarray(np.random.RandomState(0).randn(5, 6, 2), jnp.float32)
    w = braintools.init.Constant(0.3)
    ref = bnn.Conv2d((5, 6, 2), 3, 3, padding=((1, 1), (1, 1)), w_init=w)
    for pad in ((1, 1), [1, 1], 1, [(1, 1)], ((1, 1),)):
        conv = bnn.Conv2d((5, 6, 2), 3, 3, padding=pad, w_init=w)
        assert conv.out_size == (5, 6, 3), pad
        np.testing.assert_allclose(conv(x), ref(x), rtol=1e-6)
    assert bnn.Conv2d((5, 6, 2), 3, 3, padding=(0, 2)).out_size == (5, 6, 3)   # (lo, hi)
    assert bnn.Conv1d((8, 1), 2, 3, padding=(2, 0)).out_size == (8, 2)
    with pytest.raises(ValueError, match="padding"):
        bnn.Conv2d((5, 6, 2), 3, 3, padding=((1, 1), (1, 1), (1, 1)))
    conv = bnn.Conv1d((8, 2), 2, 3, w_mask=lambda s: jnp.zeros(s))
    np.testing.assert_allclose(conv(jnp.ones((8, 2))), 0.)


def test_lora_alpha_defaults_and_scaling():
    lora = bnn.LoRA(4, 2, 3)
    assert lora.alpha == 1.0 and lora.lora_rank == 2
    np.testing.assert_allclose(lora.weight_op.value["B"], 0.)          # 0.1: B = 0
    assert float(jnp.abs(lora.weight_op.value["A"]).sum()) > 0.         # A: LeCun-normal
    B = jnp.asarray(np.random.RandomState(0).randn(4, 2), jnp.float32)
    A = jnp.asarray(np.random.RandomState(1).randn(2, 3), jnp.float32)
    x = jnp.arange(4.)
    for alpha, by_rank, scale in ((0.5, True, 0.25), (3., True, 1.5), (3., False, 3.)):
        lora = bnn.LoRA(4, 2, 3, alpha=alpha, B_init=B, A_init=A, scale_by_rank=by_rank)
        assert lora.alpha == alpha
        np.testing.assert_allclose(lora(x), scale * (x @ B) @ A, rtol=1e-5)
    base = bnn.Linear(4, 3, w_init=jnp.ones((4, 3)), b_init=None)
    lora = bnn.LoRA((4,), 2, (3,), base_module=base)
    np.testing.assert_allclose(lora(x), base(x))
    with pytest.raises(ValueError, match="lora_rank"):
        bnn.LoRA(4, 0, 3)


def test_readout_keywords_and_spike():
    with brainstate.environ.context(dt=1. * u.ms):
        ro = bnn.LeakyRateReadout(3, 2, r_init=braintools.init.Constant(0.5))
        brainstate.nn.init_all_states(ro, batch_size=2)
        np.testing.assert_allclose(ro.r.value, 0.5)
        assert ro.r_init is ro.r_initializer
        ro = bnn.LeakyRateReadout(3, 2, r_initializer=braintools.init.Constant(0.7))
        brainstate.nn.init_all_states(ro)
        np.testing.assert_allclose(ro.r.value, 0.7)
        with pytest.raises(TypeError, match="not both"):
            bnn.LeakyRateReadout(3, 2, r_init=braintools.init.ZeroInit(),
                                 r_initializer=braintools.init.ZeroInit())
        sp = bnn.LeakySpikeReadout(3, 2, V_init=braintools.init.Constant(2. * u.mV))
        brainstate.nn.init_all_states(sp)
        np.testing.assert_allclose(_np(sp.V.value), 2.)
        np.testing.assert_allclose(sp.spike, [1., 1.])           # 0.1's property: V > V_th
        assert sp.V_init is sp.V_initializer
        with pytest.raises(TypeError, match="not both"):
            bnn.LeakySpikeReadout(3, 2, V_init=braintools.init.ZeroInit(unit=u.mV),
                                  V_initializer=braintools.init.ZeroInit(unit=u.mV))


def test_param_type_keyword():
    W = jnp.asarray(np.random.RandomState(0).randn(3, 2), jnp.float32)
    x = jnp.ones(3)
    for pt in (brainscale.NonTempParam, brainscale.FakeETraceParam):
        lin = bnn.Linear(3, 2, w_init=W, b_init=None, param_type=pt)
        assert type(lin.weight_op) is pt
        np.testing.assert_allclose(lin(x), x @ W, rtol=1e-6)
    assert not bnn.Linear(3, 2, param_type=brainscale.FakeETraceParam).states(
        brainstate.ParamState)
    cell = bnn.GRUCell(2, 3, param_type=brainscale.NonTempParam)
    assert {type(s) for s in cell.states(brainstate.ParamState).values()} == \
        {brainscale.NonTempParam}
    ln = bnn.LayerNorm(4, param_type=brainscale.NonTempParam)
    assert type(ln.weight) is brainscale.NonTempParam
    with pytest.raises(TypeError, match="NonTempParam"):
        bnn.Linear(3, 2, param_type=brainstate.ParamState)


# ---------------------------------------------------------------------------------------
# brainpy.state interop and 0.1's forwarded names
# ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not bnn.HAS_BRAINPY, reason="brainpy (brainpy.state) is not installed")
@pytest.mark.filterwarnings("ignore:'brainstate.nn.DeltaProj' is deprecated")
def test_modules_are_brainpy_state_dynamics():
    import brainpy.state as bp
    for m, base in ((bnn.LIF(2), bp.Neuron), (bnn.IF(2), bp.Neuron), (bnn.ALIF(2), bp.Neuron),
                    (bnn.GIF(2), bp.Neuron), (bnn.Izhikevich(2), bp.Neuron),
                    (bnn.LeakySpikeReadout(2, 2), bp.Neuron), (bnn.Expon(2), bp.Synapse),
                    (bnn.Alpha(2), bp.Synapse), (bnn.COBA(E=0. * u.mV), bp.SynOut),
                    (bnn.CUBA(), bp.SynOut), (bnn.Dynamics(2), bp.Dynamics)):
        assert isinstance(m, base), type(m)
        assert isinstance(m, bp.Dynamics) or isinstance(m, bp.SynOut)
    assert bnn.CUBA(name="out").name == "out"
    # brainstate's and brainpy's projections take them (brainstate.nn.DeltaProj is brainpy's)
    neu = bnn.LIF(2)
    brainstate.nn.DeltaProj(comm=bnn.Linear(3, 2), post=neu)
    bp.CurrentProj(comm=bnn.Linear(3, 2), out=bnn.CUBA(u.mA), post=neu)
    proj = bp.AlignPostProj(comm=bnn.Linear(3, 2), syn=bnn.Expon.desc(2),
                            out=bnn.COBA.desc(E=0. * u.mV), post=neu)
    assert isinstance(proj.syn, bnn.Expon) and isinstance(proj.out, bnn.COBA)
    # and brainscale.nn's projections take brainpy's outputs
    bnn.CurrentProj(comm=bnn.Linear(3, 2), out=bp.CUBA(), post=neu)


def test_forwarded_names():
    with pytest.warns(DeprecationWarning, match="brainstate.nn.ReLU"):
        assert bnn.ReLU is brainstate.nn.ReLU
    with pytest.warns(DeprecationWarning, match="brainstate.nn.Dropout"):
        assert bnn.Dropout is brainstate.nn.Dropout
    with pytest.raises(AttributeError, match="Nope"):
        bnn.Nope  # noqa: B018
    if bnn.HAS_BRAINPY:
        import brainpy.state as bp
        for n in ("DualExpon", "STP", "STD"):
            with pytest.warns(DeprecationWarning, match=f"brainpy.state.{n}"):
                assert getattr(bnn, n) is getattr(bp, n)


_NO_BRAINPY = textwrap.dedent("""
    import sys, warnings
    sys.modules['brainpy'] = None          # as if brainpy were not installed
    sys.modules['brainpy.state'] = None
    import brainstate, braintools, brainunit as u, jax.numpy as jnp
    import brainscale, brainscale.nn as bnn
    assert not bnn.HAS_BRAINPY
    assert bnn.Neuron.__mro__[1:3] == (bnn.Dynamics, bnn._base._InputAccumulation)

    class Net(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.neu = bnn.LIF(4)
            self.syn = bnn.DeltaProj(comm=bnn.Linear(
                7, 4, w_init=braintools.init.KaimingNormal(2., unit=u.mV)), post=self.neu)
            self.out = bnn.AlignPostProj(
                comm=bnn.Linear(3, 4, w_init=braintools.init.KaimingNormal(2., unit=u.mS)),
                syn=bnn.Expon(4, g_initializer=braintools.init.ZeroInit(unit=u.mS)),
                out=bnn.COBA(E=0. * u.mV), post=self.neu)

        def update(self, x):
            self.syn(u.math.concatenate([x, self.neu.get_spike()], axis=-1))
            self.out(x)
            return self.neu()

    with brainstate.environ.context(dt=1. * u.ms):
        net = Net()
        brainstate.nn.init_all_states(net, batch_size=2)
        learner = brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9)
        learner.compile_graph(jnp.ones((2, 3)))
        assert learner(jnp.ones((2, 3))).shape == (2, 4)
    try:
        bnn.STP
    except AttributeError as e:
        assert "pip install brainpy" in str(e)
    else:
        raise AssertionError("bnn.STP without brainpy")
    print("ok")
""")


def test_brainscale_nn_without_brainpy():
    """``brainscale.nn`` imports and compiles with brainpy absent (a fresh interpreter)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _NO_BRAINPY], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
