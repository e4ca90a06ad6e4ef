"""Small helpers shared by the tests."""
from __future__ import annotations

import jax
import numpy as np

from brainscale.pipeline import AlgorithmOptions, build_graph as _build_graph


def build_graph(model, *args, policy=None, pipeline=None, decay_or_rank=None, **kwargs):
    """``(graph, stages, log)`` of ``model`` through ``pipeline`` (default: the default
    pipeline) with ``select-dims`` given ``policy`` / ``decay_or_rank``."""
    res = _build_graph(model, *args, pipeline=pipeline,
                       algorithm=AlgorithmOptions(policy=policy, decay_or_rank=decay_or_rank),
                       **kwargs)
    return res.graph, list(res.stages), res.log


def flat(tree) -> np.ndarray:
    """All leaves of a pytree, raveled into one float64 vector."""
    return np.concatenate([np.ravel(np.asarray(l, np.float64)) for l in jax.tree.leaves(tree)])


def rel_err(a, b) -> float:
    """``max |a - b| / max |b|`` over all leaves (b the reference)."""
    a, b = flat(a), flat(b)
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-30)
