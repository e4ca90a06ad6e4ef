"""The IR is the program: what ``learner.ir()`` prints is what the compiled step runs.

* the trace arrays the step allocates are exactly the ``array`` lines of the printed IR
  (ids, shapes, storage dtypes), on every backend;
* a user pass that changes a trace's dim, layout or storage is either rejected by the
  verifier with a message naming the trace, or runs what it printed, with gradients equal
  to the dense oracle of the printed trace dims;
* reordering ``graph.ops`` in a pass changes nothing; α is printed; the algorithm's options
  and a user pipeline's ``select-dims`` options never silently override each other;
* backends take the graph only; the package has no import cycle.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import models
from brainscale.errors import BackendError, PassError, PipelineError
from brainscale.ir import replace
from brainscale.ir.types import short_dtype
from brainscale.passes import DEFAULT_PIPELINE, function_pass, layout_trace, renumber_traces, retrace
from oracle import DenseOracle

#: oracle comparisons at rtol 1e-5 on the hybrid model (a spiking net whose surrogate edges
#: amplify rounding) are checked on what users compile: XLA's optimisations on (conftest.py)
pytestmark = pytest.mark.optimized

ROOT = Path(__file__).resolve().parent.parent
ALPHA = 0.9
_ARRAY = re.compile(r"^\s+array (T\d+\.\d+) = .*? : (\w+)\[([0-9,]*)\]"
                    r"(?:\s+\{storage=(\w+)(?:\[([0-9,]*)\])?\})?\s*$")


def printed_arrays(text: str) -> list:
    """``[(id, shape, storage dtype)]`` of the ``array`` lines of a printed IR."""
    out = []
    for ln in text.splitlines():
        m = _ARRAY.match(ln)
        if m:
            # a packed pair prints its allocated shape with the storage: storage=c64[2,5]
            dims = m.group(5) if m.group(5) is not None else m.group(3)
            shape = tuple(int(d) for d in dims.split(",") if d)
            out.append((m.group(1), shape, m.group(4) or m.group(2)))
    return out


def allocated_arrays(learner) -> list:
    return [(a.id, tuple(st.value.shape), short_dtype(st.value.dtype))
            for a, st in zip(learner._step.binding.arrays, learner._traces)]


def loss_fn(out, target):
    return jnp.sum((jax.tree.leaves(out)[0] - target) ** 2)


def _out_shape(model, x0):
    """The step's output shape (runs one step of a throwaway model)."""
    return np.shape(jax.tree.leaves(model.update(x0))[0])


def assert_close(a, b, what, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(float(np.max(np.abs(y))), 1e-6)
        err = float(np.max(np.abs(x - y))) / scale
        assert err <= rtol or float(np.max(np.abs(x - y))) <= atol, f"{what}: rel err {err:.3g}"


def run_vs_oracles(name, batch, learner_of, T=5, seed=0):
    """Per step, the learner's gradient of every parameter equals the dense oracle of the
    trace dim the *printed* IR gives that parameter (param / io, or none: both oracles'
    instantaneous part is not separable, so such parameters are skipped)."""
    m_learn, x0 = models.make(name, batch, seed)
    learner = learner_of(m_learn, x0)
    g = learner.graph
    dims = {}
    for t in g.traces:
        for rid in t.relations:
            dims[tuple(g.relation_by_id[rid].param.split("."))] = t.dim
    oracles = {}
    for dim in sorted(set(dims.values()) - {"none"}):
        m_orc, _ = models.make(name, batch, seed)
        oracles[dim] = (m_orc, DenseOracle(m_orc, x0, algorithm=dim,
                                           decay_or_rank=ALPHA if dim == "io" else None,
                                           loss_fn=loss_fn))
    params = m_learn.states(brainstate.ParamState)

    @brainstate.transform.jit
    def step(x, tgt):
        return brainstate.transform.grad(lambda: loss_fn(learner(x), tgt), params)()

    rng = np.random.RandomState(7)
    out_shape = _out_shape(models.make(name, batch, seed)[0], x0)
    checked = 0
    for t in range(T):
        x = jnp.asarray(rng.randn(*np.shape(x0)), jnp.float32)
        tgt = jnp.asarray(rng.randn(*out_shape), jnp.float32)
        grads = step(x, tgt)
        ref = {dim: orc.step(x, target=tgt)["grads"] for dim, (_, orc) in oracles.items()}
        for k, dim in dims.items():
            if dim == "none":
                continue
            assert_close(grads[k], ref[dim][k], f"t={t} {'.'.join(k)} ({dim})")
            checked += 1
    assert allocated_arrays(learner) == printed_arrays(learner.ir())
    return learner, checked


# -- allocated == printed ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("algo", ["param", "io", "hybrid"])
def test_allocated_arrays_are_the_printed_arrays(name, algo):
    m, x0 = models.make(name, 2)
    c = brainscale.compile(m, x0, algorithm=algo, decay_or_rank=ALPHA)
    printed = printed_arrays(c.learner.ir())
    assert printed == allocated_arrays(c.learner)
    assert len(printed) == len(c.learner._traces) == sum(len(t.arrays) for t in c.graph.traces)
    assert sum(t.nbytes for t in c.graph.traces) == sum(
        int(np.prod(st.value.shape)) * st.value.dtype.itemsize for st in c.learner._traces)


def test_allocated_arrays_are_the_printed_arrays_on_pallas():
    from brainscale.backends.pallas import PallasBackend, Tiles
    m, x0 = models.make("alif", 2)
    learner = brainscale.DiagParamDimAlgorithm(
        m, backend=PallasBackend(select="all", trace_dtype="bfloat16", tiles=Tiles(2, 4, 8)))
    learner.compile_graph(x0)
    text = learner.ir()
    assert "path=pallas" in text and "storage=bf16" in text
    assert printed_arrays(text) == allocated_arrays(learner)
    # the kernel's weight trace keeps the k states stacked; the bias one array per state
    (t,) = learner.graph.traces
    assert [(a.leaf, a.state) for a in t.arrays] == [(0, 0), (0, 1), (1, None)]


# -- user passes that change a trace ---------------------------------------------------------
def _set_layout(layout, relayout):
    def run(graph, ctx):
        out = []
        for t in graph.traces:
            if t.dim == "param":
                t = dataclasses.replace(t, layout=layout)
                if relayout:
                    t = layout_trace(graph, t)
            out.append(t)
        return graph.replace(traces=tuple(out))
    return run


_DENSE = function_pass("test-to-dense", requires={"trace-arrays"})(_set_layout("dense", True))
_DENSE_STALE = function_pass("test-to-dense-stale", requires={"trace-arrays"})(
    _set_layout("dense", False))
_COMPACT = function_pass("test-to-compact", requires={"trace-arrays"})(_set_layout("compact", True))


def test_layout_change_without_new_arrays_is_rejected():
    m, x0 = models.make("lif_delta", 0)
    with pytest.raises(PassError) as info:
        brainscale.compile(m, x0, algorithm="param",
                           pipeline=[*DEFAULT_PIPELINE, "test-to-dense-stale"])
    msg = str(info.value)
    assert "pass 'test-to-dense-stale'" in msg and "trace T0 (param, layout=dense)" in msg
    assert "eps of R0/G0 leaf bias state 0 is f32[5] (T0.0) but layout=dense needs f32[5,5]" \
        in msg and "layout_trace" in msg


@pytest.mark.parametrize("name,batch", [("lif_delta", 0), ("alif", 2), ("sparse_rec", 2),
                                        ("elemwise_tau", 0), ("conv_snn", 2)])
def test_dense_layout_from_a_user_pass_runs_what_it_prints(name, batch):
    def make(m, x0):
        lr = brainscale.DiagParamDimAlgorithm(m, pipeline=[*DEFAULT_PIPELINE, "test-to-dense"])
        return lr.compile_graph(x0)
    learner, checked = run_vs_oracles(name, batch, make)
    assert checked > 0
    assert all(t.layout == "dense" for t in learner.graph.traces if t.dim == "param")
    assert "layout=dense" in learner.ir()


def test_compact_layout_on_a_conv_op_is_rejected():
    m, x0 = models.make("conv_snn", 0)
    with pytest.raises(PassError) as info:
        brainscale.compile(m, x0, algorithm="param", pipeline=[*DEFAULT_PIPELINE, "test-to-compact"])
    msg = str(info.value)
    assert "trace T0 asks for layout=compact, but op %y0 (ConvOp) is exact only with the " \
        "channel or dense per-output-neuron layout" in msg and "use layout=channel" in msg


_CHANNEL = function_pass("test-to-channel", requires={"trace-arrays"})(_set_layout("channel", False))


def test_channel_layout_on_a_matmul_op_is_rejected():
    m, x0 = models.make("lif_delta", 0)
    with pytest.raises(PassError) as info:
        brainscale.compile(m, x0, algorithm="param", pipeline=[*DEFAULT_PIPELINE, "test-to-channel"])
    msg = str(info.value)
    assert "trace T0 asks for layout=channel, but op %y0 (MatMulOp) has layout=compact" in msg
    assert "use layout=compact or dense for T0" in msg


def test_conv_channel_layout_is_the_default_and_what_runs():
    m, x0 = models.make("conv_snn", 2)
    learner = brainscale.DiagParamDimAlgorithm(m)
    learner.compile_graph(x0)
    conv = learner.graph.ops[0]
    assert (conv.layout, conv.channel_axis, conv.param_channel_axes) == ("channel", 2, (0, 3))
    text = learner.ir()
    assert "layout=channel" in text and "param_channel_axes=[0,3]" in text
    assert printed_arrays(text) == allocated_arrays(learner)
    t0 = learner.graph.traces[0]
    assert [a.type.shape for a in t0.arrays] == [(2, 8, 8, 4, 1), (2, 8, 8, 4, 1, 3, 3, 2)]


@function_pass("test-bf16", requires={"trace-arrays"})
def _bf16(graph, ctx):
    return graph.replace(traces=tuple(layout_trace(graph, t, storage="bfloat16")
                                      for t in graph.traces))


@pytest.mark.parametrize("algo", ["param", "io"])
def test_storage_change_from_a_user_pass_is_what_runs(algo):
    m, x0 = models.make("alif", 2)
    m2, _ = models.make("alif", 2)
    lb = brainscale.compile(m, x0, algorithm=algo, decay_or_rank=ALPHA,
                            pipeline=[*DEFAULT_PIPELINE, "test-bf16"]).learner
    lf = brainscale.compile(m2, x0, algorithm=algo, decay_or_rank=ALPHA).learner
    assert printed_arrays(lb.ir()) == allocated_arrays(lb)
    assert {short_dtype(t.value.dtype) for t in lb._traces} == {"bf16"}
    assert "storage=bf16" in lb.ir()
    pb, pf = m.states(brainstate.ParamState), m2.states(brainstate.ParamState)
    rng = np.random.RandomState(3)
    for t in range(4):
        x = jnp.asarray(rng.randn(*np.shape(x0)), jnp.float32)
        gb = brainstate.transform.grad(lambda: loss_fn(lb(x), 0.0), pb)()
        gf = brainstate.transform.grad(lambda: loss_fn(lf(x), 0.0), pf)()
        assert_close(gb, gf, f"t={t} bf16 vs f32", rtol=3e-2, atol=1e-3)


@function_pass("test-io-to-param", requires={"trace-arrays"})
def _io_to_param(graph, ctx):
    out = []
    for t in graph.traces:
        if t.dim == "io" and graph.relation_by_id[t.relations[0]].param == "syn":
            out.append(retrace(graph, t.relations, "param", "test: io -> param"))
        else:
            out.append(t)
    return graph.replace(traces=renumber_traces(out))


@function_pass("test-io-to-param-stale", requires={"trace-arrays"})
def _io_to_param_stale(graph, ctx):
    return graph.replace(traces=tuple(
        dataclasses.replace(t, dim="param", layout="compact", shared_x=None, decay=None)
        if t.dim == "io" else t for t in graph.traces))


def test_dim_change_from_a_user_pass():
    m, x0 = models.make("lif_delta", 2)
    with pytest.raises(PassError) as info:
        brainscale.compile(m, x0, algorithm="io", decay_or_rank=ALPHA,
                           pipeline=[*DEFAULT_PIPELINE, "test-io-to-param-stale"])
    assert "trace T0 (param, layout=compact): array T0.0 has role eps_x" in str(info.value)

    def make(m, x0):
        return brainscale.DiagIODimAlgorithm(
            m, decay_or_rank=ALPHA, pipeline=[*DEFAULT_PIPELINE, "test-io-to-param"]
        ).compile_graph(x0)
    learner, checked = run_vs_oracles("lif_delta", 2, make)
    assert [t.dim for t in learner.graph.traces] == ["param"] and checked > 0


def test_hybrid_mix_per_parameter_dims_match_their_oracles():
    def make(m, x0):
        return brainscale.DiagHybridDimAlgorithm(m, decay_or_rank=ALPHA).compile_graph(x0)
    learner, checked = run_vs_oracles("hybrid_mix", 0, make)
    assert {t.dim for t in learner.graph.traces} >= {"param", "io"} and checked > 0


# -- passes are Graph -> Graph ---------------------------------------------------------------
@function_pass("test-reverse-ops")
def _reverse_ops(graph, ctx):
    return graph.replace(ops=graph.ops[::-1])


@pytest.mark.parametrize("where", [2, 5])
def test_reordering_ops_in_a_pass_changes_nothing(where):
    pipeline = list(DEFAULT_PIPELINE)
    pipeline.insert(where - 1, "test-reverse-ops")
    m, x0 = models.make("gru3", 0)
    m2, _ = models.make("gru3", 0)
    c = brainscale.compile(m, x0, algorithm="hybrid", decay_or_rank=ALPHA, pipeline=pipeline)
    ref = brainscale.compile(m2, x0, algorithm="hybrid", decay_or_rank=ALPHA)
    key = lambda g: sorted((r.param, r.op, r.groups, g.trace_of_relation[r.id].dim)  # noqa: E731
                           for r in g.relations)
    assert key(c.graph) == key(ref.graph)
    p1, p2 = m.states(brainstate.ParamState), m2.states(brainstate.ParamState)
    rng = np.random.RandomState(1)
    for t in range(3):
        x = jnp.asarray(rng.randn(*np.shape(x0)), jnp.float32)
        g1 = brainstate.transform.grad(lambda: loss_fn(c(x), 0.0), p1)()
        g2 = brainstate.transform.grad(lambda: loss_fn(ref(x), 0.0), p2)()
        assert_close(g1, g2, f"t={t}")


def test_dependency_analysis_is_keyed_by_names():
    from brainscale.passes import analyze
    m, x0 = models.make("gru3", 0)
    g = brainscale.lower(m, x0)
    a = analyze(g)
    b = analyze(g.replace(ops=g.ops[::-1]))
    assert a.hidden_out == b.hidden_out and a.op_x == b.op_x and a.out_direct == b.out_direct
    assert all(isinstance(n, str) for d in a.hidden_out.values() for n in d.hid | d.ys)


# -- alpha in the IR ---------------------------------------------------------------------------
@pytest.mark.parametrize("decay_or_rank,alpha_text", [(0.9, "alpha=0.9,"), (19, "alpha=0.9, ")])
def test_alpha_is_printed_drawn_and_reported(decay_or_rank, alpha_text):
    from brainscale.report import report_dict
    m, x0 = models.make("alif", 0)
    c = brainscale.compile(m, x0, algorithm="io", decay_or_rank=decay_or_rank)
    text = c.learner.ir()
    (t,) = c.graph.traces
    assert t.decay == pytest.approx(0.9)
    assert alpha_text in text.splitlines()[[i for i, ln in enumerate(text.splitlines())
                                             if ln.strip().startswith("trace T0")][0]]
    if isinstance(decay_or_rank, int):
        assert "rank=19" in text and t.decay_rank == 19
        assert "select-dims{policy=io,rank=19}" in text
    else:
        assert "select-dims{policy=io,decay=0.9}" in text
    assert "alpha=0.9" in c.to_dot()
    rep = report_dict(c)
    assert rep["traces"][0]["decay"] == pytest.approx(0.9)
    assert [a["id"] for a in rep["traces"][0]["arrays"]] == ["T0.0", "T0.1"]


# -- algorithm options vs the pipeline ------------------------------------------------------
@function_pass("test-own-dims", requires={"relations"}, provides={"trace-dims"})
def _own_dims(graph, ctx):
    return graph.replace(traces=renumber_traces(
        retrace(graph, (r.id,), "param", "test: own choice") for r in graph.relations))


@pytest.mark.parametrize("kw,pipeline,needle", [
    (dict(algorithm="param"), "select-dims{param_ratio=0.5}",
     "select-dims{param_ratio=0.5} applies only to policy=auto"),
    (dict(algorithm="param"), "select-dims{policy=io,decay=0.9}",
     "policy=io in the pipeline vs policy=param from DiagParamDimAlgorithm"),
    (dict(algorithm="io", decay_or_rank=0.5), "select-dims{decay=0.9}",
     "alpha=0.9 in the pipeline vs alpha=0.5"),
    (dict(algorithm="hybrid", decay_or_rank=0.9, dim_overrides={"syn": "param"}),
     "select-dims{overrides=[syn=io]}", "override syn=io in the pipeline vs syn=param"),
    (dict(algorithm="io", decay_or_rank=0.9), "hidden-groups,relations,test-own-dims",
     "has no 'select-dims' pass"),
])
def test_pipeline_options_conflicting_with_the_algorithm_raise(kw, pipeline, needle):
    m, x0 = models.make("lif_delta", 0)
    if "select-dims" in pipeline:
        pipeline = f"hidden-groups,relations,{pipeline},fuse-traces"
    with pytest.raises(PipelineError) as info:
        brainscale.compile(m, x0, pipeline=pipeline, **kw)
    assert needle in str(info.value)


def test_pipeline_options_agreeing_with_the_algorithm_are_used():
    m, x0 = models.make("lif_delta", 0)
    c = brainscale.compile(m, x0, algorithm="io", decay_or_rank=0.9,
                           pipeline="hidden-groups,relations,select-dims{decay=0.9},fuse-traces")
    assert c.graph.traces[0].decay == 0.9 and "layout-traces" in c.graph.stages
    # algorithm=None takes the pipeline's select-dims as it is
    m, x0 = models.make("lif_delta", 0)
    c = brainscale.compile(m, x0, pipeline="hidden-groups,relations,select-dims{policy=io,rank=9}")
    assert type(c.learner).__name__ == "DiagIODimAlgorithm"
    assert c.graph.traces[0].decay == pytest.approx(0.8) and c.graph.traces[0].decay_rank == 9


def test_a_pass_of_ones_own_chooses_the_dims_with_algorithm_none():
    m, x0 = models.make("lif_delta", 0)
    c = brainscale.compile(m, x0, pipeline="hidden-groups,relations,test-own-dims")
    assert type(c.learner) is brainscale.ETraceAlgorithm
    assert [(t.dim, t.layout) for t in c.graph.traces] == [("param", "compact")]
    assert c.graph.stages[-1] == "layout-traces"


def test_io_traces_without_decay_are_a_clear_error():
    m, x0 = models.make("lif_delta", 0)
    with pytest.raises(PipelineError) as info:
        brainscale.DiagHybridDimAlgorithm(m, dim_overrides={"syn": "io"}).compile_graph(x0)
    assert "chose io-dim (ES-D-RTRL) traces for R0 (%syn) but has no decay alpha" in str(info.value)


# -- backends read the graph only --------------------------------------------------------------
def test_backends_take_the_graph_only():
    import inspect
    from brainscale.backends import BACKENDS, JaxBackend
    for cls in BACKENDS.values():
        assert list(inspect.signature(cls.emit).parameters) == ["self", "graph"], cls
    m, x0 = models.make("lif_delta", 0)
    g = brainscale.lower(m, x0)
    g = brainscale.PassManager("hidden-groups,relations,select-dims{policy=param}").run(g)
    with pytest.raises(BackendError, match="run the 'layout-traces' pass"):
        JaxBackend().emit(g)
    step = JaxBackend().emit(brainscale.PassManager("layout-traces").run(g))
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.fn = None
    assert [a.id for a in step.arrays] == ["T0.0", "T0.1"]


def test_note_attributes_cannot_shadow_typed_fields():
    m, x0 = models.make("lif_delta", 0)
    g = brainscale.compile(m, x0, algorithm="param").graph
    t = g.traces[0]
    bad = g.replace(traces=(replace(t, attrs=t.attrs + (("layout", "dense"),)),))
    with pytest.raises(brainscale.IRVerificationError, match="note attribute 'layout'"):
        brainscale.verify(bad)


# -- one direction at the top ------------------------------------------------------------------
def _imports(path: Path, module: str, package: bool, modules) -> set[str]:
    """The brainscale modules a file imports (at any depth of the file): ``from P import n``
    names the module ``P.n`` when there is one, else the package ``P`` itself."""
    tree = ast.parse(path.read_text())
    out = set()
    base = module.split(".") if package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("brainscale")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[:len(base) - node.level + 1]
                mod = ".".join(parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("brainscale"):
                continue
            for a in node.names:
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
    return {m for m in out if m in modules and m != module}


def test_the_package_has_no_import_cycle():
    import networkx as nx
    pkg = ROOT / "brainscale"
    modules = {}
    for p in pkg.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    g = nx.DiGraph()
    for mod, (path, is_pkg) in modules.items():
        g.add_node(mod)
        for target in _imports(path, mod, is_pkg, modules):
            g.add_edge(mod, target)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles: {cycles}"
    # the top runs one way: api -> algorithms -> pipeline -> frontend / passes / backends
    assert not nx.has_path(g, "brainscale.algorithms", "brainscale.api")
    assert not nx.has_path(g, "brainscale.pipeline", "brainscale.algorithms")
    for low in ("brainscale.frontend", "brainscale.passes.base", "brainscale.backends.step",
                "brainscale.ir.graph"):
        assert not nx.has_path(g, low, "brainscale.pipeline"), low
