"""Golden IR dumps after every pass of the default pipeline, for every model of tests/models.py.

``tests/golden/<model>/<NN>-<pass>.ir`` holds the text of stage NN (``00-lower`` …
``06-layout-traces``; the last lists every trace array the compiled step keeps). Regenerate with ``BRAINSCALE_ACCEPT=1 pytest tests/test_golden_pipeline.py``
and review the diff. Besides the text, the tests check structure: every stage verifies,
the networkx view has the expected nodes, printing is deterministic and graphs compare
structurally.
"""
from __future__ import annotations

import dataclasses
import re

import pytest

import brainscale
from helpers import build_graph

import models
from golden import assert_golden

STAGES = ("lower", "absorb-normalization", "hidden-groups", "relations", "select-dims", "fuse-traces",
          "layout-traces")
ALPHA = 0.9

#: (golden directory, model name, batch); batched variants of a few models as well
CASES = [(name, name, 0) for name in models.MODELS] + [
    ("lif_delta_b2", "lif_delta", 2),
    ("alif_b2", "alif", 2),
    ("conv_snn_b2", "conv_snn", 2),
    ("sparse_rec_b2", "sparse_rec", 2),
]


def _build(name, batch, seed=0):
    model, x0 = models.make(name, batch, seed)
    return build_graph(model, x0, policy="auto", decay_or_rank=ALPHA)


def _stage_name(spec: str) -> str:
    return spec.split("{")[0]


@pytest.mark.parametrize("golden,name,batch", CASES, ids=[c[0] for c in CASES])
def test_golden_stages(golden, name, batch):
    graph, stages, log = _build(name, batch)
    assert tuple(_stage_name(s) for s, _ in stages) == STAGES
    assert stages[-1][1] is graph
    for i, (spec, g) in enumerate(stages):
        brainscale.verify(g)
        assert g.stages[-1] == spec
        assert_golden(brainscale.print_graph(g), f"{golden}/{i:02d}-{_stage_name(spec)}")


def _stage(stages, name):
    (g,) = [g for s, g in stages if _stage_name(s) == name]
    return g


def test_lif_delta_relations_print():
    """After ``relations`` the LIF_Delta_Net dump shows its hidden state, the dense op on
    concat(x, spikes), the 1-state group and the relation syn -> %y0 -> G0."""
    _, stages, _ = _build("lif_delta", 0)
    text = brainscale.print_graph(_stage(stages, "relations"))
    lines = [ln.strip() for ln in text.splitlines()]

    def has(pattern):
        assert any(re.fullmatch(pattern, ln) for ln in lines), \
            f"no line matching {pattern!r} in:\n{text}"

    assert lines[1] == "// stages: lower, absorb-normalization, hidden-groups, relations"
    has(r"graph @LIFDeltaNet\.update\(%u0: f32\[3\]\).*\{")
    has(r"hidden %V : f32\[5\]")
    has(r"param  %syn : \{bias: f32\[5\], weight: f32\[8,5\]\}\s+\{kind=etrace.*")
    # the op input is concat(x, spike(V_prev)): it depends on the input and the hidden state
    has(r"%x0 = value\(%V, %u0\) : f32\[8\]\s+\{eqn=\d+\}")
    has(r"%y0 = dense\(%x0, %syn\) : f32\[5\]\s+\{class=MatMulOp, eqn=\d+, layout=compact\}")
    has(r"group G0 = \[%V\] varshape=\[5\] n=1\s+\{recurrent=true\}")
    has(r"rel R0 = %syn -> %y0 -> G0")
    assert not any(ln.startswith("trace ") for ln in lines)   # no traces before select-dims


def test_alif_group_and_gru_relations():
    g, _, _ = _build("alif", 0)
    assert [(grp.id, grp.states, grp.num_state) for grp in g.groups] == [("G0", ("V", "a"), 2)]
    assert [(r.param, r.groups) for r in g.relations] == [("syn", ("G0",))]
    g, _, _ = _build("gru3", 0)
    assert [grp.states for grp in g.groups] == [("l0.h",), ("l1.h",), ("l2.h",)]
    want = {f"l{i}.{w}": (f"G{i}",) for i in range(3) for w in ("Wr", "Wz", "Wx", "Uh")}
    assert {r.param: r.groups for r in g.relations} == want
    # r, z share the op input concat([x, h]) -> one fused io trace per layer
    fused = [t for t in g.traces if len(t.relations) > 1]
    assert len(fused) == 3 and all(t.dim == "io" for t in fused)


def test_conv_and_elemwise_layouts():
    g, _, _ = _build("conv_snn", 0)
    kinds = {o.param: (o.kind, o.layout) for o in g.ops}
    assert kinds == {"conv": ("conv", "channel"), "out": ("dense", "compact")}
    assert [grp.varshape for grp in g.groups] == [(8, 8, 4), (3,)]
    g, _, _ = _build("elemwise_tau", 0)
    (el,) = [o for o in g.ops if o.param == "theta"]
    assert el.kind == "elemwise" and el.x is None
    (t,) = [t for t in g.traces if g.relation_by_id[t.relations[0]].param == "theta"]
    assert t.dim == "param"       # no op input: always param-dim


def test_verify_and_networkx_lif():
    graph, stages, _ = _build("lif_delta", 0)
    for _, g in stages:
        brainscale.verify(g)
    nx = graph.to_networkx()
    arrays = {a.id for a in graph.traces[0].arrays}
    assert set(nx.nodes) == {"u0", "V", "syn", "%x0", "%y0", "G0", "R0", "T0"} | arrays
    kinds = {n: d["kind"] for n, d in nx.nodes(data=True)}
    assert kinds == {"u0": "input", "V": "hidden", "syn": "param", "%x0": "value",
                     "%y0": "op", "G0": "group", "R0": "relation", "T0": "trace",
                     **{a: "array" for a in arrays}}
    assert set(nx.edges) == {("u0", "%x0"), ("V", "%x0"), ("%x0", "%y0"), ("syn", "%y0"),
                             ("%y0", "R0"), ("R0", "G0"), ("V", "G0"), ("R0", "T0")} | \
        {("T0", a) for a in arrays}
    # after `lower` only inputs, hidden states, params, values and ops exist
    nx0 = stages[0][1].to_networkx()
    assert {d["kind"] for _, d in nx0.nodes(data=True)} == {"input", "hidden", "param",
                                                           "value", "op"}


def test_verify_and_networkx_gru3():
    graph, stages, _ = _build("gru3", 0)
    for _, g in stages:
        brainscale.verify(g)
    nx = graph.to_networkx()
    by_kind = {}
    for n, d in nx.nodes(data=True):
        by_kind.setdefault(d["kind"], set()).add(n)
    assert by_kind["hidden"] == {"l0.h", "l1.h", "l2.h"}
    assert by_kind["param"] == {f"l{i}.{w}" for i in range(3) for w in ("Wr", "Wz", "Wx", "Uh")}
    assert by_kind["op"] == {f"%y{i}" for i in range(12)}
    assert by_kind["group"] == {"G0", "G1", "G2"}
    assert by_kind["relation"] == {f"R{i}" for i in range(12)}


@pytest.mark.parametrize("name", list(models.MODELS))
def test_printing_deterministic(name):
    """Two independent compiles of two identically built models print identically."""
    _, s1, _ = _build(name, 0)
    _, s2, _ = _build(name, 0)
    assert [s for s, _ in s1] == [s for s, _ in s2]
    for (_, g1), (_, g2) in zip(s1, s2):
        assert brainscale.print_graph(g1) == brainscale.print_graph(g2)
        assert str(g1) == brainscale.print_graph(g1)


@pytest.mark.parametrize("name", ["lif_delta", "gru3", "conv_snn"])
def test_graph_equality(name):
    model, x0 = models.make(name, 0)
    g1, s1, _ = build_graph(model, x0, policy="auto", decay_or_rank=ALPHA)
    g2, s2, _ = build_graph(model, x0, policy="auto", decay_or_rank=ALPHA)
    # same model compiled twice: structurally equal at every stage, and hashable
    for (_, a), (_, b) in zip(s1, s2):
        assert a == b and hash(a) == hash(b)
    assert g1 is not g2 and g1 == g2
    # consecutive stages differ (each pass adds something)
    for (_, a), (_, b) in zip(s1, s1[1:]):
        assert a != b
    # a different policy gives a different graph
    g3, _, _ = build_graph(model, x0, policy="param")
    assert g3 != g1
    # an identically built second model gives an equal graph (the op objects travel in
    # StepInfo.ops, outside the IR's structural equality)
    model2, x2 = models.make(name, 0)
    g4, _, _ = build_graph(model2, x2, policy="auto", decay_or_rank=ALPHA)
    assert g4 == g1 and g4.info.ops["%y0"] is not g1.info.ops["%y0"]


def test_replace_returns_self_when_unchanged():
    g, _, _ = _build("lif_delta", 0)
    assert g.replace(name=g.name) is g
    assert g.replace(name="other") != g


@pytest.mark.parametrize("name", list(models.MODELS))
def test_op_eqn_indices_point_at_their_marker_equations(name):
    """The golden files compare ``eqn=N`` loosely (jaxpr positions differ across brainstate
    versions); here every op's index must name its own trace-op marker equation."""
    from brainscale import _compat as C
    from brainscale.concepts import MARKER_PREFIX
    graph, _, _ = _build(name, 0)
    eqns = C.open_jaxpr(graph.info.jaxpr).eqns
    assert graph.ops
    for o in graph.ops:
        eqn = eqns[o.eqn]
        assert str(eqn.params.get("name", "")) == \
            f"{MARKER_PREFIX}{graph.op_object(o.name).op_id}", (o.name, eqn)
