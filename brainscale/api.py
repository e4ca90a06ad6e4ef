"""Programmatic compile API: ``brainscale.compile(model, *example_inputs, ...)``."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import BrainscaleError
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
    stages = [("lower", g0)] + rec.stages
    log = [("lower", f"{len(g0.hidden)} hidden state(s), {len(g0.params)} param(s), "
                     f"{len(g0.ops)} trace op(s) in {t_lower * 1e3:.1f} ms")] + list(ctx.log)
    log += [(name, f"{sec * 1e3:.2f} ms") for name, sec in rec.times]
    return graph, stages, log


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
