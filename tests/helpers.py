"""Small helpers shared by the tests."""
from __future__ import annotations

from brainscale.pipeline import AlgorithmOptions, build_graph as _build_graph


def build_graph(model, *args, policy=None, pipeline=None, decay_or_rank=None, **kwargs):
    """``(graph, stages, log)`` of ``model`` through ``pipeline`` (default: the default
    pipeline) with ``select-dims`` given ``policy`` / ``decay_or_rank``."""
    res = _build_graph(model, *args, pipeline=pipeline,
                       algorithm=AlgorithmOptions(policy=policy, decay_or_rank=decay_or_rank),
                       **kwargs)
    return res.graph, list(res.stages), res.log
