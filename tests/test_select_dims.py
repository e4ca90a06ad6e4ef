"""select-dims: the cost model, the memory budget and its error."""
import jax.numpy as jnp
import pytest

import brainscale
from helpers import build_graph
from brainscale.passes.select_dims import relation_costs

import models


def test_auto_choice_follows_bytes_and_reports_flops():
    m, x0 = models.hybrid_mix(0)
    g, _, _ = build_graph(m, x0, policy="auto", decay_or_rank=0.9)
    for t in g.traces:
        rel = g.relation_by_id[t.relations[0]]
        c = relation_costs(g, rel)
        if "flops/step" in t.attr("reason"):
            want = "param" if c["param_bytes"] <= c["io_bytes"] else "io"
            assert t.dim == want


def test_memory_budget_moves_param_traces_to_io():
    m, x0 = models.hybrid_mix(0)
    g, _, _ = build_graph(m, x0, policy="param")
    assert all(t.dim == "param" for t in g.traces)
    total_param = sum(t.nbytes for t in g.traces)
    io_cost = {}
    for r in g.relations:
        io_cost[r.param] = relation_costs(g, r)["io_bytes"]
    budget_mb = (total_param - 1) / 2 ** 20
    m2, x02 = models.hybrid_mix(0)
    pipe = ("hidden-groups", "relations",
            brainscale.passes.SelectDimsPass(policy="param", memory_budget_mb=budget_mb, decay=0.9), "fuse-traces")
    g2, _, _ = build_graph(m2, x02, pipeline=pipe)
    moved = [t for t in g2.traces if "memory budget" in str(t.attr("reason"))]
    assert moved, brainscale.print_graph(g2)
    assert sum(t.nbytes for t in g2.traces) <= budget_mb * 2 ** 20


def test_impossible_budget_is_a_clear_error():
    m, x0 = models.hybrid_mix(0)
    pipe = ("hidden-groups", "relations",
            brainscale.passes.SelectDimsPass(policy="auto", memory_budget_mb=1e-9), "fuse-traces")
    with pytest.raises(brainscale.UnsupportedModelError, match="above memory_budget_mb"):
        build_graph(m, x0, pipeline=pipe)


def test_weight_feeding_a_weight_warns_and_says_why():
    """Anchor pitfall 6: the GRU reset gate inside U·(r⊙h) reaches h only through U's input.
    It gets its instantaneous gradient (dim none), the IR says why, and compiling warns."""
    import warnings
    m, x0 = models.make("gru_rh")
    with pytest.warns(brainscale.NoTemporalCreditWarning, match=r"%Wr \(its output %y0 feeds %y3\)"):
        g, _, _ = build_graph(m, x0, policy="param")
    (t,) = [t for t in g.traces if t.dim == "none"]
    rel = g.relation_by_id[t.relations[0]]
    assert rel.param == "Wr" and dict(rel.attrs)["via_ops"] == ("%y3",)
    assert "through the input of trace op(s) %y3" in t.attr("reason")
    # the warning points at the caller, not at brainscale's own frames
    m, x0 = models.make("gru_rh")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        brainscale.DiagParamDimAlgorithm(m).compile_graph(x0)
    (rec,) = [r for r in w if r.category is brainscale.NoTemporalCreditWarning]
    assert rec.filename == __file__


def test_no_warning_when_every_weight_is_traced_or_reaches_no_state():
    import warnings
    for name in ("gru3", "lif_delta"):
        m, x0 = models.make(name)
        with warnings.catch_warnings():
            warnings.simplefilter("error", brainscale.NoTemporalCreditWarning)
            build_graph(m, x0, policy="auto", decay_or_rank=0.9)


def test_is_etrace_false_states_the_intent_and_silences_the_warning():
    import warnings
    m, x0 = models.make("gru_rh")
    m.Wr = brainscale.ETraceParam(m.Wr.value, m.Wr.op, is_etrace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", brainscale.NoTemporalCreditWarning)
        g, _, _ = build_graph(m, x0, policy="param")
    assert [t.dim for t in g.traces if "Wr" in {g.relation_by_id[r].param for r in t.relations}] \
        == ["none"]
