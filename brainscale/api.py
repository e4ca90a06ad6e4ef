"""Programmatic compile API: ``brainscale.compile(model, *example_inputs, ...)``."""
from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import BrainscaleError, NoTemporalCreditWarning
from .frontend import lower
from .passes import DEFAULT_PIPELINE, PassContext, PassManager, Recorder
from .passes.select_dims import SelectDimsPass

__all__ = ["build_graph", "compile", "Compiled", "ALGORITHMS"]

#: algorithm name -> (algorithm class name, select-dims policy)
ALGORITHMS = {
    "io": "DiagIODimAlgorithm", "es-d-rtrl": "DiagIODimAlgorithm",
    "param": "DiagParamDimAlgorithm", "d-rtrl": "DiagParamDimAlgorithm",
    "hybrid": "DiagHybridDimAlgorithm",
}


def _configure(passes, policy, param_ratio, memory_budget_mb, dim_overrides):
    out = []
    for p in passes:
        if isinstance(p, SelectDimsPass) and p == SelectDimsPass():
            p = SelectDimsPass(policy=policy, param_ratio=param_ratio,
                               memory_budget_mb=memory_budget_mb)
        out.append(p)
    return tuple(out)


def build_graph(model, *args, policy: str = "auto", pipeline=None, param_ratio: float = 1.0,
                memory_budget_mb=None, dim_overrides=None, instruments: Sequence = (),
                **kwargs):
    """Lower ``model`` and run the pipeline. Returns ``(graph, stages, log)``.

    ``stages`` is a list of ``(stage spec, Graph)`` starting with ``lower``; ``log`` holds the
    passes' notes and timings.
    """
    t0 = time.perf_counter()
    g0 = lower(model, *args, **kwargs)
    t_lower = time.perf_counter() - t0
    rec = Recorder()
    passes = PassManager(pipeline if pipeline is not None else DEFAULT_PIPELINE).passes
    passes = _configure(passes, policy, param_ratio, memory_budget_mb, dim_overrides)
    ctx = PassContext(algorithm=policy, options={"dim_overrides": dict(dim_overrides or {})})
    pm = PassManager(passes, instruments=(rec,) + tuple(instruments))
    graph = pm.run(g0, ctx)
    _warn_no_temporal_credit(graph)
    stages = [("lower", g0)] + rec.stages
    log = [("lower", f"{len(g0.hidden)} hidden state(s), {len(g0.params)} param(s), "
                     f"{len(g0.ops)} trace op(s) in {t_lower * 1e3:.1f} ms")] + list(ctx.log)
    log += [(name, f"{sec * 1e3:.2f} ms") for name, sec in rec.times]
    return graph, stages, log


def _warn_no_temporal_credit(graph):
    """Warn about weights feeding weights: they reach hidden states, yet get dim 'none'."""
    lost = []
    for t in graph.traces:
        if t.dim != "none":       # via_ops exists only on relations that reach no group
            continue
        for rid in t.relations:
            rel = graph.relation_by_id[rid]
            via = dict(rel.attrs).get("via_ops")
            if via and dict(graph.param_by_name[rel.param].attrs).get("is_etrace", True):
                lost.append(f"%{rel.param} (its output {rel.op} feeds {', '.join(via)})")
    if lost:
        warnings.warn(
            f"{len(lost)} trace parameter(s) reach hidden states only through the input of "
            f"another trace op and get their instantaneous gradient only, without temporal "
            f"credit: {'; '.join(lost)}. The diagonal traces cannot follow a path through "
            f"another weight (docs/design.md, 'Trace dim none'). Restructure the model if these need "
            f"temporal credit (e.g. a GRU with the reset gate applied after the recurrent "
            f"matmul, r*(U·h), as brainscale.nn.GRUCell does by default), or mark them "
            f"is_etrace=False to state the intent and silence this warning.",
            NoTemporalCreditWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """``warnings.warn`` stacklevel of the first caller outside this package."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    f, level = sys._getframe(1), 1
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(pkg + os.sep):
        f, level = f.f_back, level + 1
    return level


@dataclass
class Compiled:
    """What :func:`compile` returns: the final IR, every stage, the pass log and the learner."""
    graph: Any
    stages: list
    log: list
    learner: Any
    compile_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def step(self):
        return self.learner._step

    def ir(self, stage: str | None = None, **settings) -> str:
        """Text IR of the final graph, or of the stage whose spec starts with ``stage``."""
        from .ir.printer import PrintSettings, print_graph
        g = self.graph
        if stage is not None:
            found = [gr for name, gr in self.stages if name.split("{")[0] == stage]
            if not found:
                raise BrainscaleError(f"no stage {stage!r}; stages: "
                                      f"{', '.join(n for n, _ in self.stages)}")
            g = found[-1]
        return print_graph(g, PrintSettings(**settings))

    def to_dot(self, **kw) -> str:
        from .ir.dot import to_dot
        return to_dot(self.graph, **kw)

    def render(self, path, **kw):
        from .ir.dot import render, to_dot
        return render(to_dot(self.graph, **kw), path)

    def report(self) -> str:
        from .report import compile_report
        return compile_report(self)

    def __call__(self, *a, **k):
        return self.learner(*a, **k)


def compile(model, *example_inputs, algorithm: str = "hybrid", decay_or_rank=None,
            pipeline=None, backend="jax", instruments: Sequence = (), param_ratio: float = 1.0,
            memory_budget_mb=None, dim_overrides=None, **kwargs) -> Compiled:
    """Compile ``model`` for online learning.

    Args:
        model: a brainstate model with initialised states.
        *example_inputs: inputs of one step (batched or not).
        algorithm: 'io' (ES-D-RTRL), 'param' (D-RTRL) or 'hybrid'.
        decay_or_rank: α (float in (0,1)) or rank (int) of io-dim traces.
        pipeline: passes after ``lower`` (names, spec string or Pass objects).
        backend: 'jax' or a Backend instance.
        instruments: PassManager instruments (``DumpDir``, ``PrintAfterAll``, ``Timing``).

    Returns:
        :class:`Compiled` with ``graph``, ``stages``, ``log``, ``learner`` (the runnable
        algorithm object) and ``report()``.
    """
    from . import algorithms as A
    name = ALGORITHMS.get(str(algorithm).lower())
    if name is None:
        raise BrainscaleError(f"unknown algorithm {algorithm!r}; choose one of "
                              f"{', '.join(sorted(ALGORITHMS))}")
    cls = getattr(A, name)
    kw = dict(pipeline=pipeline, backend=backend, instruments=instruments,
              param_ratio=param_ratio, memory_budget_mb=memory_budget_mb,
              dim_overrides=dim_overrides)
    if cls is A.DiagIODimAlgorithm:
        learner = cls(model, decay_or_rank, **kw)
    elif cls is A.DiagParamDimAlgorithm:
        learner = cls(model, decay_or_rank=decay_or_rank, **kw)
    else:
        learner = cls(model, decay_or_rank=decay_or_rank, **kw)
    learner.compile_graph(*example_inputs, **kwargs)
    return Compiled(learner.graph, learner.stages, learner.log, learner, learner.compile_seconds)
