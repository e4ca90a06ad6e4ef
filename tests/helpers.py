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


def run_result_script(code: str, timeout: float = 600):
    """Run ``code`` in a fresh CPU Python process (e.g. one that enables float64 before
    importing brainscale) and return the JSON it prints after ``RESULT``."""
    import json
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])
