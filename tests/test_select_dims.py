"""select-dims: the cost model, the memory budget and its error."""
import jax.numpy as jnp
import pytest

import brainscale
from brainscale.api import build_graph
from brainscale.passes.select_dims import relation_costs

import models


def test_auto_choice_follows_bytes_and_reports_flops():
    m, x0 = models.hybrid_mix(0)
    g, _, _ = build_graph(m, x0, policy="auto")
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
    total_param = sum(t.attr("bytes") for t in g.traces)
    io_cost = {}
    for r in g.relations:
        io_cost[r.param] = relation_costs(g, r)["io_bytes"]
    budget_mb = (total_param - 1) / 2 ** 20
    m2, x02 = models.hybrid_mix(0)
    pipe = ("hidden-groups", "relations",
            brainscale.passes.SelectDimsPass(policy="param", memory_budget_mb=budget_mb), "fuse-traces")
    g2, _, _ = build_graph(m2, x02, pipeline=pipe)
    moved = [t for t in g2.traces if "memory budget" in str(t.attr("reason"))]
    assert moved, brainscale.print_graph(g2)
    assert sum(t.attr("bytes") for t in g2.traces) <= budget_mb * 2 ** 20


def test_impossible_budget_is_a_clear_error():
    m, x0 = models.hybrid_mix(0)
    pipe = ("hidden-groups", "relations",
            brainscale.passes.SelectDimsPass(policy="auto", memory_budget_mb=1e-9), "fuse-traces")
    with pytest.raises(brainscale.UnsupportedModelError, match="above memory_budget_mb"):
        build_graph(m, x0, pipeline=pipe)
