"""User passes: the shipped examples (brainscale/passes/examples.py), function passes,
registration, pipelines, dumps, and broken passes caught by the verifier."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from brainscale.errors import IRVerificationError, PassError, PipelineError, UnsupportedModelError
from brainscale.ir import replace
from brainscale.passes import DEFAULT_PIPELINE, parse_pipeline
from brainscale.passes.examples import DropFrozenPass, ForceParamSmallPass
from brainscale.passes.select_dims import relation_costs

ROOT = Path(__file__).resolve().parent.parent


class SharedInput(brainstate.nn.Module):
    """A leaky layer whose spikes feed both its recurrent weight and a readout (one ε_x)."""

    def __init__(self, n_in=3, n=6, n_out=2, seed=0):
        super().__init__()
        rng = np.random.RandomState(seed)
        f = lambda *s: jnp.asarray(rng.randn(*s) * 0.5, jnp.float32)  # noqa: E731
        self.w_in = brainscale.ETraceParam({"weight": f(n_in, n)}, brainscale.MatMulOp())
        self.w_rec = brainscale.ETraceParam({"weight": f(n, n)}, brainscale.MatMulOp())
        self.w_out = brainscale.ETraceParam({"weight": f(n, n_out)}, brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.zeros(n))
        self.r = brainscale.ETraceState(jnp.zeros(n_out))

    def update(self, x):
        s = jax.nn.sigmoid(self.V.value - 0.5)
        self.V.value = 0.9 * self.V.value + self.w_in.execute(x) + self.w_rec.execute(s)
        self.r.value = 0.8 * self.r.value + self.w_out.execute(s)
        return self.r.value


XS = jnp.asarray(np.random.RandomState(5).randn(4, 3), jnp.float32)


def loss_fn(out):
    return jnp.sum(out ** 2)


def compile_shared(pipeline=None, **kw):
    model = SharedInput()
    kw.setdefault("algorithm", "io")
    c = brainscale.compile(model, XS[0], decay_or_rank=0.9, pipeline=pipeline, **kw)
    return model, c


def run_grads(model, c, steps=3):
    """Per-step online gradients of every parameter."""
    params = {"w_in": model.w_in, "w_rec": model.w_rec, "w_out": model.w_out}
    out = []
    for t in range(steps):
        g = brainstate.transform.grad(lambda: loss_fn(c(XS[t])), params)()
        out.append(jax.tree.map(np.asarray, g))
    return out


def trace_table(graph):
    return [(t.dim, t.relations, t.shapes, t.nbytes) for t in graph.traces]


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# -- force-param-small ----------------------------------------------------------------------
def test_force_param_small_splits_a_fused_trace():
    _, base = compile_shared()
    assert [(t.dim, t.relations) for t in base.graph.traces] == [("io", ("R0",)),
                                                                ("io", ("R1", "R2"))]
    model, c = compile_shared([*DEFAULT_PIPELINE, "force-param-small{max_elems=12}"])
    g = c.graph
    assert g.stages[-1] == "force-param-small{max_elems=12}"
    # w_out (6x2 = 12 elements) leaves the shared eps_x trace; w_rec keeps it
    assert [(t.id, t.dim, t.relations) for t in g.traces] == [
        ("T0", "io", ("R0",)), ("T1", "io", ("R1",)), ("T2", "param", ("R2",))]
    assert g.traces[1].shared_x == base.graph.traces[1].shared_x
    assert g.traces[2].attr("reason") == "force-param-small: |theta|=12 <= 12"
    # shapes and bytes: exactly what select-dims/fuse-traces give when asked for param-dim
    _, ref = compile_shared(dim_overrides={"w_out": "param"})
    assert trace_table(g) == trace_table(ref.graph)
    assert g.traces[2].nbytes == relation_costs(g, g.relation_by_id["R2"])["param_bytes"]
    brainscale.verify(g)
    # the compiled step runs, gradients are finite and equal those of the same IR
    grads = run_grads(model, c)
    for gr in grads:
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(gr))
    ref_model, ref = compile_shared(dim_overrides={"w_out": "param"})
    assert_trees_close(grads, run_grads(ref_model, ref))


def test_force_param_small_before_fusion_and_as_instance():
    pipeline = ["hidden-groups", "relations", "select-dims",
                ForceParamSmallPass(max_elems=18), "fuse-traces"]
    _, c = compile_shared(pipeline)
    assert [(t.dim, t.relations) for t in c.graph.traces] == [
        ("param", ("R0",)), ("io", ("R1",)), ("param", ("R2",))]
    assert "force-param-small{max_elems=18}" in c.graph.stages
    assert ("force-param-small", "R0 (w_in): io -> param") in c.log


def test_force_param_small_on_cli_model():
    spec = importlib.util.spec_from_file_location("_bs_cli_model2", ROOT / "examples" / "cli_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, x = mod.make()
    c = brainscale.compile(model, x, algorithm="hybrid", decay_or_rank=0.9,
                           pipeline=[*DEFAULT_PIPELINE, "force-param-small{max_elems=300}"])
    assert [t.dim for t in c.graph.traces] == ["param", "io", "param"]
    params = model.states(brainstate.ParamState)
    for t in range(3):
        g = brainstate.transform.grad(lambda: jnp.sum(c(x * (t + 1)) ** 2), params)()
        assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(g))


# -- drop-frozen ----------------------------------------------------------------------------
def test_drop_frozen_gives_the_instantaneous_gradient():
    model, c = compile_shared([*DEFAULT_PIPELINE, "drop-frozen{params=[w_out]}"], algorithm="hybrid")
    g = c.graph
    t = next(t for t in g.traces if "R2" in t.relations)
    assert (t.dim, t.shapes, t.nbytes) == ("none", (), 0)
    assert t.attr("reason") == "drop-frozen: instantaneous gradient only"
    assert all("R2" not in t2.relations for t2 in g.traces if t2 is not t)   # split off
    # reference: the plain model's one-step gradient with the previous state held fixed
    ref = SharedInput()
    for step in range(4):
        ref.V.value, ref.r.value = model.V.value, model.r.value
        g_ref = brainstate.transform.grad(lambda: loss_fn(ref.update(XS[step])),
                                          {"w_out": ref.w_out})()
        g_on = brainstate.transform.grad(lambda: loss_fn(c(XS[step])),
                                         {"w_out": model.w_out})()
        assert_trees_close(g_on["w_out"], g_ref["w_out"])
        assert np.any(np.abs(np.asarray(g_on["w_out"]["weight"])) > 1e-4)
    np.testing.assert_allclose(model.r.value, ref.r.value, rtol=1e-6)


def test_drop_frozen_equals_a_none_override():
    model, c = compile_shared([*DEFAULT_PIPELINE, "drop-frozen{params=[w_rec;w_out]}"])
    ref_model, ref = compile_shared(dim_overrides={"w_rec": "none", "w_out": "none"})
    assert [(t.dim, t.relations, t.shapes) for t in c.graph.traces] == \
        [(t.dim, t.relations, t.shapes) for t in ref.graph.traces]
    assert_trees_close(run_grads(model, c), run_grads(ref_model, ref))


def test_drop_frozen_unknown_parameter():
    with pytest.raises(UnsupportedModelError) as info:
        compile_shared([*DEFAULT_PIPELINE, "drop-frozen{params=[w_nope]}"], algorithm="hybrid")
    assert str(info.value) == (
        "drop-frozen names unknown trace parameter(s) 'w_nope'; trace parameters: "
        "w_in, w_out, w_rec\n"
        "while running pass 'drop-frozen' (ran before it: lower, absorb-normalization, "
        "hidden-groups, relations, select-dims{decay=0.9}, fuse-traces, layout-traces)")


def test_example_specs_round_trip_and_order_check():
    for spec in ("drop-frozen{params=[a.w;b.w]}", "force-param-small{max_elems=64}",
                 "force-param-small"):
        (p,) = parse_pipeline(spec)
        assert p.spec() == spec
    assert parse_pipeline("drop-frozen{params=[a;b]}")[0] == DropFrozenPass(params=("a", "b"))
    with pytest.raises(PipelineError, match=r"pass 'drop-frozen' requires \['trace-dims'\], "
                                            r"which no earlier pass provides; add 'select-dims'"):
        compile_shared(["hidden-groups", "relations", "drop-frozen"])


def test_duplicate_registration_is_an_error():
    with pytest.raises(PipelineError, match="a pass named 'drop-frozen' is already registered"):
        @brainscale.register_pass
        @dataclasses.dataclass(frozen=True)
        class Other(brainscale.Pass):
            name = "drop-frozen"

            def run(self, graph, ctx):
                return graph


# -- function passes, dumps -----------------------------------------------------------------
@brainscale.function_pass("test-count-trace-bytes", requires={"trace-dims"})
def count_trace_bytes(graph, ctx):
    """Note the total trace bytes; change nothing."""
    ctx.note("test-count-trace-bytes", f"{sum(t.nbytes for t in graph.traces)} B")
    return graph


def test_function_pass_by_name_with_dumps(tmp_path):
    dump = brainscale.DumpDir(tmp_path)
    _, c = compile_shared("hidden-groups,relations,select-dims,fuse-traces,layout-traces,"
                          "test-count-trace-bytes", instruments=[dump])
    assert c.graph.stages[-1] == "test-count-trace-bytes"
    assert ("test-count-trace-bytes", f"{sum(t.nbytes for t in c.graph.traces)} B") in c.log
    assert any(name == "test-count-trace-bytes" and msg.endswith(" ms") for name, msg in c.log)
    written = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".ir")
    assert written[-1].endswith("-test-count-trace-bytes.ir")
    text = (tmp_path / written[-1]).read_text()
    assert text.splitlines()[1].endswith("fuse-traces, layout-traces, test-count-trace-bytes")
    assert sum(t.nbytes for t in c.graph.traces) > 0


# -- broken passes ----------------------------------------------------------------------------
@brainscale.function_pass("test-break-relation", requires={"relations"}, register=False)
def break_relation(graph, ctx):
    r = graph.relations[0]
    return graph.replace(relations=(replace(r, groups=("G7",)),) + graph.relations[1:])


@brainscale.function_pass("test-break-trace", requires={"trace-dims"}, register=False)
def break_trace(graph, ctx):
    t = graph.traces[0]
    return graph.replace(traces=(replace(t, relations=("R9",)),) + graph.traces[1:])


def test_broken_relation_is_caught_by_the_verifier():
    with pytest.raises(PassError) as info:
        compile_shared([*DEFAULT_PIPELINE, break_relation()], algorithm="hybrid")
    lines = str(info.value).splitlines()
    assert lines[0] == ("pass 'test-break-relation' failed (ran before it: lower, "
                        "absorb-normalization, hidden-groups, relations, select-dims{decay=0.9}, "
                        "fuse-traces, layout-traces): invalid IR: relation R0 names unknown "
                        "group 'G7'")
    assert any(ln.startswith(">") and "rel R0 = %w_in -> %y0 -> G7" in ln for ln in lines[1:])
    assert isinstance(info.value.__cause__, IRVerificationError)


def test_broken_trace_is_caught_by_the_verifier():
    with pytest.raises(PassError) as info:
        compile_shared(["hidden-groups", "relations", "select-dims", break_trace(), "fuse-traces"],
                       algorithm="hybrid")
    lines = str(info.value).splitlines()
    assert lines[0] == ("pass 'test-break-trace' failed (ran before it: lower, hidden-groups, "
                        "relations, select-dims{decay=0.9}): invalid IR: trace T0 names unknown "
                        "relation 'R9'")
    assert any(ln.startswith(">") and "trace T0 = io(R9)" in ln for ln in lines[1:])
