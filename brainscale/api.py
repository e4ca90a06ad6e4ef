"""Programmatic compile API: ``brainscale.compile(model, *example_inputs, ...)``.

The only place that picks an algorithm class from a name; everything else is the
algorithm's ``compile_graph`` (runtime → pipeline → frontend / passes / backends).
"""
from __future__ import annotations

from typing import Sequence

from .algorithms import (DiagHybridDimAlgorithm, DiagIODimAlgorithm, DiagParamDimAlgorithm,
                         ETraceAlgorithm)
from .backends import zoo_step as _zoo_step  # noqa: F401  (registers backend 'jax-zoo')
from .compiled import Compiled
from .errors import BrainscaleError
from .passes.base import parse_pipeline
from .passes.select_dims import SelectDimsPass
from .pipeline import build_graph
from .zoo import (DNIAlgorithm, EPropAlgorithm, OSTLAlgorithm, RTRLAlgorithm, RULE_OPTIONS,
                  RuleAlgorithm, SnApAlgorithm, ThreeFactorAlgorithm, UOROAlgorithm)

__all__ = ["compile", "Compiled", "ALGORITHMS", "build_graph"]

#: algorithm name -> algorithm class
ALGORITHMS = {
    "io": DiagIODimAlgorithm, "es-d-rtrl": DiagIODimAlgorithm,
    "param": DiagParamDimAlgorithm, "d-rtrl": DiagParamDimAlgorithm,
    "hybrid": DiagHybridDimAlgorithm,
    "rtrl": RTRLAlgorithm, "snap": SnApAlgorithm, "uoro": UOROAlgorithm,
    "eprop": EPropAlgorithm, "e-prop": EPropAlgorithm, "ostl": OSTLAlgorithm,
    "three-factor": ThreeFactorAlgorithm, "dni": DNIAlgorithm,
}
_BY_POLICY = {"io": DiagIODimAlgorithm, "param": DiagParamDimAlgorithm,
              "auto": DiagHybridDimAlgorithm, "random": UOROAlgorithm}


def _class_for(algorithm, pipeline):
    if algorithm is not None:
        cls = ALGORITHMS.get(str(algorithm).lower())
        if cls is None:
            raise BrainscaleError(f"unknown algorithm {algorithm!r}; choose one of "
                                  f"{', '.join(sorted(ALGORITHMS))}, or None to take the "
                                  f"pipeline's select-dims as it is")
        return cls
    passes = parse_pipeline(pipeline) if pipeline is not None else None
    sel = [p for p in passes or () if isinstance(p, SelectDimsPass)]
    if passes is not None and not sel:
        return ETraceAlgorithm          # the pipeline chooses trace dims its own way
    policies = {p.policy for p in sel} or {"auto"}
    if len(policies) > 1:
        raise BrainscaleError(f"the pipeline's select-dims passes disagree on the policy "
                              f"({', '.join(sorted(policies))}); pass algorithm=...")
    defaults = {f: SelectDimsPass.__dataclass_fields__[f].default for f in RULE_OPTIONS}
    if any(getattr(p, f) != d for p in sel for f, d in defaults.items()):
        return RuleAlgorithm            # the pipeline's select-dims places the rule on axes
    return _BY_POLICY[policies.pop()]


def compile(model, *example_inputs, algorithm: str | None = None, decay_or_rank=None,
            pipeline=None, backend="jax", instruments: Sequence = (),
            param_ratio: float | None = None, memory_budget_mb=None, dim_overrides=None,
            norm_stats: str | None = None, mesh=None, batch_axis: str | None = None,
            neuron_axis: str | None = None, **kwargs) -> Compiled:
    """Compile ``model`` for online learning.

    Args:
        model: a brainstate model with initialised states.
        *example_inputs: inputs of one step (batched or not).
        algorithm: 'io' (ES-D-RTRL), 'param' (D-RTRL), 'hybrid', a rule of
            :mod:`brainscale.zoo` ('rtrl', 'snap', 'uoro', 'eprop', 'ostl', 'three-factor',
            'dni'; with their defaults), or None: the policy and rule axes of the pipeline's
            ``select-dims`` (hybrid when it has none set; with no ``select-dims`` at all, the
            pipeline's own passes choose the trace dims).
        decay_or_rank: α (float in (0,1)) or rank (int) of io-dim traces.
        pipeline: passes after ``lower`` (names, spec string or Pass objects).
        backend: 'jax', 'jax-zoo' (every rule axis; the zoo's default), 'pallas', 'native'
            (the one-pass D-RTRL CPU kernel, ``docs/native.md``), 'auto' or a Backend instance.
        instruments: PassManager instruments (``DumpDir``, ``PrintAfterAll``, ``Timing``).
        param_ratio / memory_budget_mb / dim_overrides: ``select-dims`` options.
        norm_stats: ``absorb-normalization{stats=...}``: ``'exact'`` or ``'constant'``.
        mesh / batch_axis / neuron_axis: shard the step over a ``jax.sharding.Mesh`` (the
            ``shard`` pass; data parallel over ``batch_axis``, neuron parallel over
            ``neuron_axis``).

    Returns:
        :class:`Compiled` with ``graph``, ``stages``, ``records``, ``log``, ``learner`` (the
        runnable algorithm object) and ``report()``.

    Raises:
        PipelineError: the pipeline's options conflict with ``algorithm`` / the options.
    """
    cls = _class_for(algorithm, pipeline)
    kw = dict(pipeline=pipeline, backend=backend, instruments=instruments,
              param_ratio=param_ratio, memory_budget_mb=memory_budget_mb,
              dim_overrides=dim_overrides, norm_stats=norm_stats, mesh=mesh,
              batch_axis=batch_axis, neuron_axis=neuron_axis)
    learner = cls(model, decay_or_rank=decay_or_rank, **kw)
    learner.compile_graph(*example_inputs, **kwargs)
    return learner.compiled()
