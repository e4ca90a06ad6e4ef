"""The rule axes of a trace in the IR (docs/rules.md): typed, printed, verified, set by
``select-dims`` options and consumed by the trace-rule table.

* D-RTRL / ES-D-RTRL traces sit on the default axes, which the IR does not print (their
  dumps are unchanged); every other value is printed on the trace line.
* Combinations that do not form a rule are a ``PipelineError`` (from select-dims options) or
  an ``IRVerificationError`` (a pass that builds one), naming the axis.
* A trace whose rule or learning signal the backend does not run is a ``BackendError``.
* The diagonal rules off the default axes (recursion ``leak`` / ``none``, the κ filter)
  equal literal implementations of their equations, written here on the dense oracle's
  ``J``, ``df`` and ``δ`` (tests/oracle.py).
"""
from __future__ import annotations

import dataclasses

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import brainscale
from brainscale import zoo
from brainscale.backends.rules import rule_key
from brainscale.errors import BackendError, PassError, PipelineError
from brainscale.ir import Trace

import models
from oracle import DenseOracle
from test_online_oracle import assert_rel_close


def loss_fn(out, target):
    return jnp.sum(out * target)


# ---------------------------------------------------------------------------------------
# printing and defaults
# ---------------------------------------------------------------------------------------

def test_presets_sit_on_the_default_axes():
    m, x0 = models.alif(2)
    for algo in ("param", "io", "hybrid"):
        c = brainscale.compile(m, x0, algorithm=algo, decay_or_rank=0.9)
        for t in c.graph.traces:
            assert (t.recursion, t.scope, t.signal, t.filter, t.schedule) == \
                ("jacobian", "diagonal", "symmetric", "none", "step")
            assert t.axes == ()
        text = c.ir()
        for word in ("recursion=", "scope=", "signal=", "filter=", "schedule="):
            assert word not in text


def test_non_default_axes_are_printed_on_the_trace_line():
    m, x0 = models.lif_delta(0)
    c = brainscale.compile(m, x0, algorithm=None, backend="jax-zoo",
                           pipeline="hidden-groups,relations,select-dims{policy=param,"
                                    "recursion=leak,decay=0.8,filter=kappa,kappa=0.5}")
    (t,) = c.graph.traces
    assert (t.recursion, t.filter, t.kappa, t.decay) == ("leak", "kappa", 0.5, 0.8)
    line = next(ln for ln in c.ir().splitlines() if ln.lstrip().startswith("trace T0"))
    assert "layout=compact, alpha=0.8, recursion=leak, filter=kappa, kappa=0.5" in line
    roles = [a.role for a in t.arrays]
    assert roles == ["eps", "eps", "eps_bar", "eps_bar"]
    assert "array T0.2 = eps_bar(R0 -> G0, leaf=bias, state=%V)" in c.ir()

    learner = zoo.RTRLAlgorithm(models.gru3(0)[0]).compile_graph(models.gru3(0)[1])
    text = learner.ir()
    assert "scope=coupled" in text and "= m(R0 -> G0, leaf=bias, state=%l0.h)" in text
    # one influence trace per parameter, with arrays for every hidden state
    assert {t.dim for t in learner.graph.traces} == {"param"}
    assert len(learner.graph.traces) == len({r.param for r in learner.graph.relations})


# ---------------------------------------------------------------------------------------
# invalid combinations
# ---------------------------------------------------------------------------------------

BAD = [
    ("policy=io,decay=0.9,scope=coupled", "scope=coupled"),
    ("policy=param,filter=kappa", "filter=kappa"),
    ("policy=param,kappa=0.5", "kappa"),
    ("policy=io,decay=0.9,filter=kappa,kappa=0.5", "filter=kappa"),
    ("policy=random,scope=group", "dim=random"),
    ("policy=param,snap_n=3", "snap_n"),
    ("policy=param,scope=sparse", "scope=sparse"),
    ("policy=param,recursion=leak", "recursion=leak"),
    ("policy=param,scope=coupled,recursion=leak,decay=0.5", "recursion=jacobian"),
    ("policy=param,scope=coupled,signal=random", "signal=symmetric"),
    ("policy=param,schedule=window", "window"),
    ("policy=param,scope=diagonal,signal=telepathy", "signal"),
    ("policy=param,readout=sometimes", "readout must be one of trace, step"),
    ("policy=param,scope=coupled,readout=trace", "readout=step"),
    ("policy=random,scope=coupled,readout=trace", "dim=random reads its gradient"),
    ("policy=param,filter=kappa,kappa=0.5,readout=step", "filter=kappa"),
    ("policy=param,signal=random,readout=step", "signal=random has no such cotangent"),
    ("policy=param,signal=modulatory,readout=step", "signal=modulatory"),
]


@pytest.mark.parametrize("options,needle", BAD, ids=[b[0] for b in BAD])
def test_invalid_combination_is_a_pipeline_error_naming_the_axis(options, needle):
    m, x0 = models.lif_delta(0)
    with pytest.raises(PipelineError) as e:
        brainscale.compile(m, x0, algorithm=None, backend="jax-zoo",
                           pipeline=f"hidden-groups,relations,select-dims{{{options}}}")
    assert needle in str(e.value), str(e.value)


def test_verifier_names_the_axis_of_a_trace_a_pass_built():
    @brainscale.function_pass("zoo-test-bad-axes", requires={"trace-arrays"}, register=False)
    def bad(graph, ctx):
        t = graph.traces[0]
        return graph.replace(traces=(dataclasses.replace(t, scope="coupled"),)
                             + graph.traces[1:])
    m, x0 = models.lif_delta(0)
    with pytest.raises(PassError) as e:
        brainscale.compile(m, x0, algorithm=None,
                           pipeline=["hidden-groups", "relations", "select-dims{policy=param}",
                                     "layout-traces", bad])
    assert "scope=coupled keeps a dense influence matrix: it needs layout=dense" in str(e.value)


def test_vocabulary_is_checked_on_the_node():
    with pytest.raises(ValueError, match="Trace scope must be one of"):
        Trace("T0", "param", ("R0",), layout="compact", scope="global")
    with pytest.raises(ValueError, match="Trace dim must be one of"):
        Trace("T0", "rank1", ("R0",))


# ---------------------------------------------------------------------------------------
# the rule table
# ---------------------------------------------------------------------------------------

def test_rule_key_carries_the_non_default_axes():
    assert rule_key(Trace("T0", "param", ("R0",), layout="compact")) == \
        ("param", "compact", "jax")
    assert rule_key(Trace("T0", "param", ("R0",), layout="dense", scope="coupled")) == \
        ("param", "dense", "jax", (("scope", "coupled"),))
    assert rule_key(Trace("T0", "io", ("R0",), shared_x="%x0", decay=0.5, signal="random")) == \
        ("io", None, "jax", (("signal", "random"),))


def test_verifier_refuses_two_readouts_on_one_parameter():
    """readout=step takes a parameter's whole instantaneous gradient from the step's VJP, so
    a pass that gives one of its traces another read-out is refused."""
    class Shared(brainstate.nn.Module):         # one weight, two ops
        def __init__(self):
            super().__init__()
            self.w = brainscale.ETraceParam({"weight": jnp.eye(3) * 0.5},
                                            brainscale.MatMulOp())
            self.v = brainscale.ETraceState(jnp.ones(3) * 0.1)

        def update(self, x):
            self.v.value = 0.9 * self.v.value + self.w.execute(x) + self.w.execute(
                jnp.tanh(self.v.value))
            return self.v.value
    m, x0 = Shared(), jnp.ones(3)
    g = brainscale.compile(m, x0, algorithm=None, backend="jax-zoo",
                           pipeline="hidden-groups,relations,select-dims{policy=param},"
                                    "layout-traces").graph
    ids = [t.id for t in g.traces if t.dim != "none"]
    assert len(ids) == 2, g          # the weight has two traces
    first = ids[0]

    @brainscale.function_pass("zoo-test-mixed-readout2", requires={"trace-arrays"},
                              register=False)
    def mixed2(graph, ctx):
        ts = [dataclasses.replace(t, readout="step") if t.id == first else t
              for t in graph.traces]
        return graph.replace(traces=tuple(ts))
    with pytest.raises(PassError, match="every trace of one parameter needs the same readout"):
        brainscale.compile(m, x0, algorithm=None, backend="jax-zoo",
                           pipeline=["hidden-groups", "relations", "select-dims{policy=param}",
                                     "layout-traces", mixed2])


@pytest.mark.parametrize("options,needle", [
    ("policy=param,readout=step", "readout=step (the last step exact"),
    ("policy=param,signal=random", "signal=random, a learning signal the step of backend 'jax'"),
    ("policy=param,scope=coupled", "needs a step that passes its rules the full step"),
])
def test_backend_without_the_rule_says_which_backend_has_it(options, needle):
    m, x0 = models.lif_delta(0)
    learner = brainscale.ETraceAlgorithm(
        m, pipeline=f"hidden-groups,relations,select-dims{{{options}}}")
    with pytest.raises(BackendError) as e:
        learner.compile_graph(x0)
    assert needle in str(e.value) and "jax-zoo" in str(e.value)


def test_zoo_rules_refuse_drivers_that_compute_the_symmetric_signal():
    m, x0 = models.lif_delta(2)
    learner = zoo.EPropAlgorithm(m, feedback="random").compile_graph(x0)
    xs = jnp.ones((4,) + x0.shape)
    with pytest.raises(BackendError, match="signal=random, but this driver"):
        brainscale.online_gradients(learner, xs, xs[..., :1] * 0 + jnp.ones((4, 2, 5)),
                                    loss_fn, chunk=2)
    dni = zoo.DNIAlgorithm(models.lif_delta(2)[0]).compile_graph(x0)
    with pytest.raises(BackendError, match="signal=synthetic, but this driver"):
        brainscale.online_gradients(dni, xs, jnp.ones((4, 2, 5)), loss_fn, chunk=2)
    stepped = zoo.RuleAlgorithm(models.lif_delta(2)[0], policy="param",
                                readout="step").compile_graph(x0)
    with pytest.raises(BackendError, match="readout=step, which reads the previous trace"):
        brainscale.online_gradients(stepped, xs, jnp.ones((4, 2, 5)), loss_fn, chunk=2)


# ---------------------------------------------------------------------------------------
# diagonal rules off the default axes vs their literal equations
# ---------------------------------------------------------------------------------------

class LiteralDiagonal:
    """The literal equations of the diagonal rules on the oracle's dense quantities.

    param-dim: ``E ← R E + D G`` with ``R = J`` (jacobian), ``α I`` (leak), ``0`` (none);
    ``Ē ← κ Ē + E`` (kappa); ``∇ = δᵀ(Ē or E) + xy_to_dw(x, c)``.
    io-dim: ``ε_x ← a ε_x + x``, ``ε_f ← a R ε_f + (1−a) D`` (``a = α``; none: ``a = 0``,
    leak: ``R = I``); ``∇ = vjp_w(op(ε_x, ·))(δᵀ ε_f) + xy_to_dw(x, c)``.
    """

    def __init__(self, orc, model, dim, recursion, alpha=None, kappa=None):
        self.orc, self.model, self.dim = orc, model, dim
        self.recursion, self.alpha, self.kappa = recursion, alpha, kappa
        self.E, self.Ebar, self.ex, self.ef = {}, {}, {}, {}
        self.params = {tuple(k): v for k, v in model.states(brainstate.ParamState).items()}

    def step(self, x, target):
        orc = self.orc
        r = orc.step(x, target=target)
        J, delta = r["J"].astype(np.float64), r["delta"].astype(np.float64)
        N = J.shape[0]
        grads = {}
        for op in orc._ops:
            q, path = op.index, orc._paths[op.param_idx]
            w = [jnp.asarray(l) for l in jax.tree.leaves(self.params[path].value)]
            xq = r["x"][q]
            wflat, unravel = ravel_pytree(w)
            D = r["D"][q].astype(np.float64)
            c = jnp.asarray(r["direct"][q])
            _, vjp_w = jax.vjp(lambda ww: op.apply(xq, ww), w)
            g = [np.asarray(v, np.float64) for v in vjp_w(c.astype(op.y_var.aval.dtype))[0]]
            R = {"jacobian": J, "leak": (self.alpha or 0.) * np.eye(N),
                 "none": np.zeros((N, N))}[self.recursion]
            if self.dim == "param":
                G = np.asarray(jax.jacfwd(lambda wf: jnp.ravel(op.apply(xq, unravel(wf))))(wflat),
                               np.float64)
                E = R @ self.E.get(q, np.zeros((N, wflat.size))) + D @ G
                self.E[q] = E
                if self.kappa is not None:
                    E = self.Ebar[q] = self.kappa * self.Ebar.get(q, 0.) + E
                flat = delta @ E
                tr = [np.asarray(l) for l in jax.tree.leaves(unravel(jnp.asarray(flat)))]
            else:
                a = 0.0 if self.recursion == "none" else self.alpha
                Rf = np.eye(N) if self.recursion == "leak" else J
                ex = [a * p + np.asarray(v, np.float64) for p, v in
                      zip(self.ex.get(q, [0.] * len(xq)), xq)]
                self.ex[q] = ex
                ef = a * (Rf @ self.ef.get(q, np.zeros_like(D))) + (1 - a) * D
                self.ef[q] = ef
                sig = jnp.reshape(jnp.asarray(delta @ ef, jnp.float32), op.y_shape)
                _, vjp_e = jax.vjp(lambda ww: op.apply([jnp.asarray(e, jnp.float32) for e in ex],
                                                       ww), w)
                tr = [np.asarray(v, np.float64) for v in vjp_e(sig)[0]]
            acc = grads.get(path, [0.] * len(w))
            grads[path] = [a_ + t_ + g_ for a_, t_, g_ in zip(acc, tr, g)]
        return {k: jax.tree.unflatten(jax.tree.structure(self.params[k].value), v)
                for k, v in grads.items()}, r


CASES = [("lif_delta", "param", "leak", None), ("alif", "param", "none", None),
         ("alif", "param", "jacobian", 0.6), ("alif", "param", "leak", 0.5),
         ("alif", "io", "leak", None), ("lif_delta", "io", "none", None)]


@pytest.mark.parametrize("batch", [0, 2])
@pytest.mark.parametrize("name,dim,recursion,kappa", CASES,
                         ids=[f"{n}-{d}-{r}-k{k}" for n, d, r, k in CASES])
def test_diagonal_rule_equals_its_literal_equations(name, dim, recursion, kappa, batch):
    alpha = 0.7
    m, x0 = models.make(name, batch)
    m_ref, _ = models.make(name, batch)
    kw = dict(policy=dim, recursion=recursion)
    if recursion == "leak" or (dim == "io" and recursion != "none"):
        kw["decay_or_rank"] = alpha
    if kappa is not None:
        kw.update(filter="kappa", kappa=kappa)
    learner = zoo.RuleAlgorithm(m, **kw).compile_graph(x0)
    (t,) = [t for t in learner.graph.traces if t.dim != "none"]
    assert (t.dim, t.recursion, t.filter) == (dim, recursion, "kappa" if kappa else "none")
    orc = DenseOracle(m_ref, x0, algorithm="param", loss_fn=loss_fn)
    ref = LiteralDiagonal(orc, m_ref, dim, recursion, alpha, kappa)
    params = m.states(brainstate.ParamState)

    @brainstate.transform.jit
    def step(x, tgt):
        return brainstate.transform.grad(lambda: loss_fn(learner(x), tgt), params)()

    rng = np.random.RandomState(3)
    out_shape = np.shape(models.make(name, batch)[0].update(x0))
    for s in range(6):
        x = jnp.asarray(rng.randn(*np.shape(x0)), jnp.float32)
        tgt = jnp.asarray(rng.randn(*out_shape), jnp.float32)
        g = step(x, tgt)
        g_ref, _ = ref.step(x, tgt)
        for k in params:
            assert_rel_close(g[k], g_ref[k], f"step {s} {k}", rtol=2e-5)


def test_etrace_of_shows_the_filtered_and_the_influence_traces():
    m, x0 = models.alif(2)
    out = zoo.EPropAlgorithm(models.alif(2)[0], kappa=0.5).compile_graph(x0)
    out(x0)
    (tr,) = out.etrace_of(out.model.syn).values()
    for k in ("bias", "weight"):       # kappa_at='output': ē of dz/dh · ε, no state axis
        assert tr["eps_bar"][k].shape == (2,) + m.syn.value[k].shape
        assert tr["eps"][k].shape == (2,) + m.syn.value[k].shape + (2,)
    learner = zoo.EPropAlgorithm(m, kappa=0.5, kappa_at="state").compile_graph(x0)
    learner(x0)
    (tr,) = learner.etrace_of(m.syn).values()
    # after one step from zero: ē = ε
    for k in ("bias", "weight"):
        np.testing.assert_allclose(tr["eps_bar"][k], tr["eps"][k])
        assert tr["eps"][k].shape == m.syn.value[k].shape[:0] + (2,) + \
            m.syn.value[k].shape + (2,)
    learner(x0)
    assert not np.allclose(tr["eps_bar"]["weight"], learner.etrace_of(m.syn)[("R0", "G0")]
                           ["eps_bar"]["weight"])
    rt = zoo.RTRLAlgorithm(models.alif(2)[0]).compile_graph(x0)
    rt(x0)
    inf = rt.etrace_of(rt.model.syn)["influence"]
    assert set(inf) == {"V", "a"}
    assert inf["V"]["weight"].shape == (2, 5, 8, 5)          # (batch, neurons) + leaf


def test_rules_page_runs_and_quotes_what_it_prints(capsys):
    """docs/rules.md: its code runs as written and the IR lines it quotes are printed."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "rules.md").read_text()
    ns: dict = {}
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
        exec(compile(code, f"rules.md[python block {i}]", "exec"), ns)
    printed = capsys.readouterr().out
    quoted = re.search(r"```text\n(.*?)```", text, flags=re.S).group(1)
    for line in quoted.splitlines():
        assert line in printed, line
    assert np.all(np.isfinite(np.asarray(ns["losses"])))


def test_a_schedule_is_printed_and_read_by_train_online_without_a_warning():
    import warnings
    m, x0 = models.lif_delta(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = brainscale.compile(m, x0, algorithm=None, backend="jax-zoo",
                               pipeline="hidden-groups,relations,"
                                        "select-dims{policy=param,schedule=window,window=5}")
    assert "schedule=window" in c.ir()
    assert set(brainscale.update_schedule(c.learner).values()) == {"window=5"}
