"""Source locations point at the user's line; jax.checkpoint inside ``update`` is accepted.

Every location brainscale reports (error messages, ``--locs``, the ``read at`` of warnings,
the file and line of the warnings themselves) must be the first frame outside jax, brainstate,
brainunit (and saiunit, which implements it), braintools, brainevent, brainpy and brainscale:
here, a line of this file, marked ``# LOC:<tag>``.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import brainscale.nn as bnn
from brainscale.cli import main as cli_main
from oracle import DenseOracle

THIS = Path(__file__).resolve()
_SRC = THIS.read_text().splitlines()


def line_of(tag: str) -> int:
    """Line number of the line of this file marked ``# LOC:<tag>``."""
    hits = [i + 1 for i, text in enumerate(_SRC) if text.rstrip().endswith(f"# LOC:{tag}")]
    assert len(hits) == 1, (tag, hits)
    return hits[0]


def where(tag: str) -> str:
    """How brainscale prints that line (the last two path parts, then the line)."""
    return f"tests/{THIS.name}:{line_of(tag)}"


def _w(n_in, n_out, seed):
    rng = np.random.RandomState(seed)
    return jnp.asarray(rng.randn(n_in, n_out) / np.sqrt(n_in), jnp.float32)


# ----------------------------------------------------------------- (a) jax.checkpoint / remat
class CheckpointedLIF(brainstate.nn.Module):
    """A recurrent leaky layer whose neuron update (optionally with the trace ops too) runs
    under ``wrap`` (``jax.checkpoint``, ``jax.remat`` or nothing)."""

    def __init__(self, wrap=None, around_ops=False):
        super().__init__()
        self.w_in = brainscale.ETraceParam(_w(3, 5, 0), brainscale.MatMulOp())
        self.w_rec = brainscale.ETraceParam(_w(5, 5, 1) * 0.5, brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.linspace(0.1, 0.5, 5, dtype=jnp.float32))
        self.spk = braintools.surrogate.Sigmoid()
        self.wrap, self.around_ops = wrap, around_ops

    def update(self, x):
        def neuron(v, cur):
            z = self.spk(v - 0.6)
            return 0.9 * v + cur - 0.6 * z

        def step(v, x):
            cur = self.w_in.execute(x) + self.w_rec.execute(jnp.tanh(v))
            return neuron(v, cur)

        if self.around_ops:
            f = step if self.wrap is None else self.wrap(step)
            v = f(self.V.value, x)
        else:
            cur = self.w_in.execute(x) + self.w_rec.execute(jnp.tanh(self.V.value))
            f = neuron if self.wrap is None else self.wrap(neuron)
            v = f(self.V.value, cur)
        self.V.value = v
        return v


def _online_grads(model, alg, xs):
    kw = {"decay_or_rank": 0.9} if alg == "io" else {}
    cls = brainscale.DiagIODimAlgorithm if alg == "io" else brainscale.DiagParamDimAlgorithm
    learner = cls(model, **kw).compile_graph(xs[0])
    params = model.states(brainstate.ParamState)
    out = []
    for x in xs:
        g = brainstate.transform.grad(lambda: jnp.sum(learner(x) ** 2), params)()
        out.append(np.concatenate([np.ravel(np.asarray(g[k])) for k in sorted(g)]))
    return np.stack(out)


@pytest.mark.parametrize("wrap", [jax.checkpoint, jax.remat], ids=["checkpoint", "remat"])
@pytest.mark.parametrize("around_ops", [False, True], ids=["neuron", "neuron+ops"])
@pytest.mark.parametrize("alg", ["param", "io"])
def test_checkpoint_inside_update_gives_the_same_gradients(wrap, around_ops, alg):
    """Before jax.checkpoint's ``remat2`` was inlined, compile_graph raised
    UnsupportedPrimitiveError "... through 'remat2' ..., which has no etrace dependency rule"."""
    xs = jax.random.normal(jax.random.PRNGKey(3), (5, 3))
    plain = _online_grads(CheckpointedLIF(None, around_ops), alg, xs)
    ckpt = _online_grads(CheckpointedLIF(wrap, around_ops), alg, xs)
    assert np.abs(plain).max() > 1e-3
    np.testing.assert_allclose(ckpt, plain, rtol=1e-5, atol=1e-6)


def test_checkpoint_inside_update_matches_the_dense_oracle():
    xs = jax.random.normal(jax.random.PRNGKey(4), (5, 3))
    m = CheckpointedLIF(jax.checkpoint)
    learner = brainscale.DiagParamDimAlgorithm(m).compile_graph(xs[0])
    oracle = DenseOracle(CheckpointedLIF(jax.checkpoint), xs[0], algorithm="param",
                         loss_fn=lambda out: jnp.sum(out ** 2))
    params = m.states(brainstate.ParamState)
    for x in xs:
        g = brainstate.transform.grad(lambda: jnp.sum(learner(x) ** 2), params)()
        ref = oracle.step(x)["grads"]
        for k in g:
            np.testing.assert_allclose(np.asarray(g[k]), np.asarray(ref[k]), rtol=1e-5,
                                       atol=1e-6)


# --------------------------------------------------- (b) module-based models: the user's line
class NeuronsMixedByALayer(brainstate.nn.Module):
    """brainscale.nn LIF neurons whose potentials a plain brainstate.nn.Linear mixes: the
    dot_general is made inside brainstate / brainunit code, the user's line is the call."""

    def __init__(self):
        super().__init__()
        self.neu = bnn.LIF(4, tau=10. * u.ms, V_th=1. * u.mV)
        self.syn = bnn.DeltaProj(comm=bnn.Linear(3, 4, w_init=braintools.init.KaimingNormal(
            unit=u.mV)), post=self.neu)
        self.mix = brainstate.nn.Linear(4, 4)

    def update(self, x):
        self.syn(x)
        spk = self.neu()
        self.neu.V.value = self.mix(self.neu.V.value / u.mV) * u.mV  # LOC:layer
        return spk


class NeuronsNormalisedByAModule(brainstate.nn.Module):
    """A reduction across neurons inside a library module (brainstate.nn.LayerNorm) on the
    path V^{t-1} -> V^t."""

    def __init__(self):
        super().__init__()
        self.w = brainscale.ETraceParam(_w(3, 4, 2), brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.zeros(4, jnp.float32))
        self.norm = brainstate.nn.LayerNorm(4)

    def update(self, x):
        self.V.value = self.norm(self.V.value) + self.w.execute(x)  # LOC:norm
        return self.V.value


def test_module_model_error_points_at_the_user_line():
    """Before library frames were skipped this said ``at math/_fun_keep_unit.py:239
    (_safe_call)`` (brainunit's implementation, saiunit) or a brainstate frame."""
    with brainstate.environ.context(dt=1. * u.ms):
        net = NeuronsNormalisedByAModule()
        brainstate.nn.init_all_states(net)
        with pytest.raises(brainscale.UnsupportedModelError) as ei:
            brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9).compile_graph(
                jnp.ones(3, jnp.float32))
    msg = str(ei.value)
    assert "'reduce_sum'" in msg, msg
    assert f"at {where('norm')} " in msg, msg


def test_plain_layer_between_states_warns_at_the_user_line():
    """A plain (untraced) ``brainstate.nn.Linear`` mixing hidden states is a cut: the IR
    lists it and a NoTemporalCreditWarning names the user's line, not brainunit's frame."""
    with brainstate.environ.context(dt=1. * u.ms):
        net = NeuronsMixedByALayer()
        brainstate.nn.init_all_states(net)
        with pytest.warns(brainscale.NoTemporalCreditWarning) as rec:
            learner = brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9).compile_graph(
                jnp.ones(3, jnp.float32))
    assert "cuts=[eqn " in learner.ir()
    msgs = [str(r.message) for r in rec
            if issubclass(r.category, brainscale.NoTemporalCreditWarning)]
    assert any("%mix.weight" in m and f"at {where('layer')} " in m for m in msgs), msgs


# ------------------------------------------------------- (c) jnp.roll / jnp.cumsum: the line
class Shifted(brainstate.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.w = brainscale.ETraceParam(_w(3, 4, 5), brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.zeros(4, jnp.float32))
        self.how = how

    def update(self, x):
        y = self.w.execute(x)
        if self.how == "roll":
            v = jnp.roll(self.V.value, 1)  # LOC:roll
        elif self.how == "cumsum":
            v = jnp.cumsum(self.V.value)  # LOC:cumsum
        else:
            v = _my_jitted_shift(self.V.value)  # LOC:jit-helper-call
        self.V.value = 0.9 * v + y
        return self.V.value


@jax.jit
def _my_jitted_shift(v):
    return jnp.roll(v, 1)  # LOC:jit-helper


@pytest.mark.parametrize("how,tag,prim", [("roll", "roll", "slice"),
                                          ("cumsum", "cumsum", "cumsum"),
                                          ("helper", "jit-helper", "slice")])
def test_library_helpers_report_the_calling_line(how, tag, prim):
    """jnp.roll / jnp.cumsum are jitted helpers whose equations carry no user frame; before
    they inherited the call's location the message said ``at unknown location``. Inside the
    user's own jitted helper the helper's line is the user's line."""
    # trace the helpers once elsewhere first: a cached trace must not leak another call site
    jax.make_jaxpr(lambda v: jnp.roll(v, 1) + jnp.cumsum(v) + _my_jitted_shift(v))(jnp.zeros(4))
    with pytest.raises(brainscale.UnsupportedModelError) as ei:
        brainscale.DiagParamDimAlgorithm(Shifted(how)).compile_graph(jnp.ones(3, jnp.float32))
    msg = str(ei.value)
    assert f"'{prim}'" in msg and "unknown location" not in msg, msg
    assert f"at {where(tag)} " in msg, msg


# ------------------------------------------------------------------- (d) brainscale-opt --locs
class UnitNet(brainstate.nn.Module):
    """brainscale.nn modules driven with brainunit calls in the user's update."""

    def __init__(self):
        super().__init__()
        self.neu = bnn.LIF(6, tau=10. * u.ms, V_th=1. * u.mV)
        self.syn = bnn.DeltaProj(comm=bnn.Linear(4 + 6, 6, w_init=braintools.init.KaimingNormal(
            unit=u.mV)), post=self.neu)
        self.out = bnn.LeakyRateReadout(6, 2, tau=5. * u.ms)

    def update(self, spk):
        self.syn(u.math.concatenate([spk, self.neu.get_spike()], axis=-1))  # LOC:cli-concat
        return self.out(self.neu())  # LOC:cli-out


def make_unit_net():
    """``brainscale-opt tests/test_locations.py:make_unit_net`` factory."""
    brainstate.environ.set(dt=1. * u.ms)
    net = UnitNet()
    brainstate.nn.init_all_states(net)
    return net, jnp.zeros(4, jnp.float32)


_LOC = re.compile(r'loc\("([^"]*)"\)')


def test_cli_locs_show_only_user_lines(capsys):
    """Before brainunit's implementation package (saiunit) was skipped, --locs printed
    ``loc("math/_fun_keep_unit.py:239 (_safe_call)")`` for the concatenate."""
    code = cli_main([f"{THIS}:make_unit_net", "--decay", "0.9", "--locs"])
    out, err = capsys.readouterr()
    assert code == 0, err
    locs = _LOC.findall(out)
    assert locs, out
    allowed = {where("cli-concat"), where("cli-out")}
    for loc in locs:
        assert loc.split(" (")[0] in allowed, f"--locs shows a frame outside the model: {loc}"
    assert any(loc.startswith(where("cli-concat")) for loc in locs), locs


# ---------------------------------------------------------- (e) warnings: the user's file:line
class PlainInputWeight(brainstate.nn.Module):
    """An input weight that is a plain ParamState (brainstate.nn.Linear) into a hidden state."""

    def __init__(self):
        super().__init__()
        self.inp = brainstate.nn.Linear(3, 4)
        self.w = brainscale.ETraceParam(_w(4, 4, 6), brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.zeros(4, jnp.float32))

    def update(self, x):
        self.V.value = 0.9 * self.V.value + self.inp(x) + self.w.execute(  # LOC:plain-read
            jnp.tanh(self.V.value))
        return self.V.value


class PlainDotWeight(brainstate.nn.Module):
    """The same with the weight applied by hand with ``jnp.dot``."""

    def __init__(self):
        super().__init__()
        self.W = brainstate.ParamState(_w(3, 4, 7))
        self.w = brainscale.ETraceParam(_w(4, 4, 8), brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.zeros(4, jnp.float32))

    def update(self, x):
        cur = jnp.dot(x, self.W.value)  # LOC:dot-read
        self.V.value = 0.9 * self.V.value + cur + self.w.execute(jnp.tanh(self.V.value))
        return self.V.value


def _compile_graph(model):
    return brainscale.DiagParamDimAlgorithm(model).compile_graph(jnp.ones(3))  # LOC:compile


def _compile_api(model):
    return brainscale.compile(model, jnp.ones(3), algorithm="param")  # LOC:compile-api


@pytest.mark.parametrize("compile_fn,call_tag", [(_compile_graph, "compile"),
                                                 (_compile_api, "compile-api")])
@pytest.mark.parametrize("cls,read_tag", [(PlainInputWeight, "plain-read"),
                                          (PlainDotWeight, "dot-read")])
def test_compile_warnings_carry_the_user_file_and_line(compile_fn, call_tag, cls, read_tag):
    """Before: no warning at all (issue 12 item 5), and for the brainstate.nn.Linear input
    the message said ``read at math/_fun_keep_unit.py:239 (_safe_call)``."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        compile_fn(cls())
    ws = [w for w in rec if issubclass(w.category, brainscale.NoTemporalCreditWarning)]
    assert len(ws) == 1, [str(w.message) for w in rec]
    w = ws[0]
    assert Path(w.filename).resolve() == THIS and w.lineno == line_of(call_tag), \
        (w.filename, w.lineno)
    assert f"read at {where(read_tag)} " in str(w.message), str(w.message)
