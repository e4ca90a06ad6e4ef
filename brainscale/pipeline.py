"""Frontend + passes: ``build_graph`` lowers a model and runs a pipeline.

This is the layer between the runtime (the algorithm objects) and the compiler parts
(frontend, passes, backends). The algorithm's choices reach the compiler only as options
of ``select-dims`` in the pipeline (:func:`configure_pipeline`), so the printed stages say
exactly what ran; a user pipeline whose ``select-dims`` options conflict with the
algorithm is an error, never silently overridden.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from ._compat import check_jaxlib
from .errors import NoTemporalCreditWarning, PipelineError
from .frontend import lower
from .passes import DEFAULT_PIPELINE, PassContext, PassManager, PassRecord, Recorder
from .passes.base import parse_pipeline
from .passes.layout import LayoutTracesPass
from .passes.select_dims import SelectDimsPass, decay_from

__all__ = ["CompileResult", "build_graph", "configure_pipeline", "full_pipeline",
           "AlgorithmOptions"]


@dataclass(frozen=True)
class CompileResult:
    """The final graph, every stage's graph (``lower`` first) and a record per stage."""
    graph: Any
    stages: tuple            # ((stage spec, Graph), ...)
    records: tuple           # (PassRecord, ...): 'lower' first, then every pass

    @property
    def log(self) -> list:
        """``[(pass name, message), ...]``: the notes of every stage, then its time."""
        out = [(r.name, n) for r in self.records for n in r.notes]
        out += [(r.spec, f"{r.seconds * 1e3:.2f} ms") for r in self.records if r.name != "lower"]
        return out


@dataclass(frozen=True)
class AlgorithmOptions:
    """What an algorithm asks of ``select-dims``; None leaves an option to the pipeline."""
    policy: str | None = None               # 'auto' | 'param' | 'io'
    decay_or_rank: Any = None
    param_ratio: float | None = None
    memory_budget_mb: float | None = None
    dim_overrides: dict | None = None
    norm_stats: str | None = None           # absorb-normalization: 'exact' | 'constant'
    shard: Any = None                       # a ShardPass appended after layout-traces
    who: str = "the algorithm"

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) in (None, {}) for f in dataclasses.fields(self)
                   if f.name != "who")


def _defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(SelectDimsPass)}


def _configure_select(p: SelectDimsPass, opts: AlgorithmOptions) -> SelectDimsPass:
    d = _defaults()
    kw = {f: getattr(p, f) for f in d}
    conflicts = []

    def take(field: str, want):
        mine = getattr(p, field)
        if want is None:
            return
        if mine != d[field] and mine != want:
            conflicts.append(f"{field}={mine} in the pipeline vs {field}={want} from {opts.who}")
        else:
            kw[field] = want if mine == d[field] else mine
    take("policy", opts.policy)
    take("param_ratio", opts.param_ratio)
    take("memory_budget_mb", opts.memory_budget_mb)
    if opts.decay_or_rank is not None:
        alpha, rank = decay_from(opts.decay_or_rank)
        mine_alpha, mine_rank = p.alpha()
        if mine_alpha is not None and abs(mine_alpha - alpha) > 1e-12:
            conflicts.append(f"alpha={mine_alpha:.6g} in the pipeline vs alpha={alpha:.6g} "
                             f"(decay_or_rank={opts.decay_or_rank!r}) from {opts.who}")
        elif mine_alpha is None:
            kw["decay"], kw["rank"] = (None, rank) if rank is not None else (alpha, None)
    if opts.dim_overrides:
        over = p.override_map()
        for name, dim in opts.dim_overrides.items():
            if name in over and over[name] != dim:
                conflicts.append(f"override {name}={over[name]} in the pipeline vs "
                                 f"{name}={dim} from {opts.who}")
            over[name] = dim
        kw["overrides"] = tuple(f"{k}={v}" for k, v in sorted(over.items()))
    if conflicts:
        raise PipelineError(f"the pipeline's {p.spec()} conflicts with {opts.who}: "
                            f"{'; '.join(conflicts)}. Set the option in one place only")
    if kw["policy"] != "auto" and kw["param_ratio"] != d["param_ratio"]:
        raise PipelineError(f"select-dims{{param_ratio={kw['param_ratio']}}} applies only to "
                            f"policy=auto (the hybrid algorithm), but the policy is "
                            f"{kw['policy']!r} ({opts.who}); drop param_ratio or use "
                            f"algorithm='hybrid'")
    return SelectDimsPass(**kw)


def configure_pipeline(pipeline, opts: AlgorithmOptions) -> tuple:
    """The passes of ``pipeline`` with the algorithm's options in every ``select-dims``.

    Raises:
        PipelineError: an option conflicts with the pipeline's, or the pipeline has no
            ``select-dims`` to take the algorithm's choices.
    """
    passes = parse_pipeline(pipeline if pipeline is not None else DEFAULT_PIPELINE)
    PassManager(passes).check_order(frozenset({"lowered"}))   # the plain ordering error first
    if opts.norm_stats is not None:
        passes = _configure_absorb(passes, opts)
        opts = dataclasses.replace(opts, norm_stats=None)
    opts = dataclasses.replace(opts, shard=None)       # full_pipeline places it
    if opts.is_empty():
        return passes
    if not any(isinstance(p, SelectDimsPass) for p in passes):
        raise PipelineError(
            f"the pipeline {', '.join(p.spec() for p in passes)} has no 'select-dims' pass, so "
            f"the choices of {opts.who} (policy, decay, overrides) cannot be applied; add "
            f"'select-dims' (its options are filled in), or use brainscale.compile(..., "
            f"algorithm=None) with a pass of your own that chooses the trace dims")
    return tuple(_configure_select(p, opts) if isinstance(p, SelectDimsPass) else p
                 for p in passes)


def _configure_absorb(passes: tuple, opts: AlgorithmOptions) -> tuple:
    """``norm_stats`` into every ``absorb-normalization`` (a conflicting one is an error)."""
    from .passes.absorb import STATS, AbsorbNormalizationPass
    if opts.norm_stats not in STATS:
        raise PipelineError(f"norm_stats must be one of {', '.join(STATS)}, got "
                            f"{opts.norm_stats!r}")
    if not any(isinstance(p, AbsorbNormalizationPass) for p in passes):
        raise PipelineError(
            f"norm_stats={opts.norm_stats!r} from {opts.who} needs an 'absorb-normalization' "
            f"pass, and the pipeline {', '.join(p.spec() for p in passes)} has none; add it "
            f"before 'hidden-groups'")
    out = []
    for p in passes:
        if isinstance(p, AbsorbNormalizationPass):
            if p.stats != "exact" and p.stats != opts.norm_stats:
                raise PipelineError(f"the pipeline's {p.spec()} conflicts with {opts.who}: "
                                    f"stats={p.stats} in the pipeline vs norm_stats="
                                    f"{opts.norm_stats}. Set the option in one place only")
            p = AbsorbNormalizationPass(stats=opts.norm_stats)
        out.append(p)
    return tuple(out)


def full_pipeline(passes: Sequence, backend=None, shard=None) -> tuple:
    """``passes`` (+ ``layout-traces`` when they choose trace dims but no pass lays the
    traces out) (+ the ``shard`` pass of a mesh) + the backend's passes."""
    passes = tuple(passes)
    if any("trace-dims" in p.provides for p in passes) and \
            not any("trace-arrays" in p.provides for p in passes):
        passes += (LayoutTracesPass(),)
    if shard is not None:
        mine = [p for p in passes if p.name == "shard"]
        if mine and mine[0] != shard:
            raise PipelineError(f"the pipeline's {mine[0].spec()} conflicts with the mesh of "
                                f"the algorithm ({shard.spec()}); set it in one place only")
        if not mine:
            passes += (shard,)
        if backend is not None and not getattr(backend, "supports_mesh", False):
            raise PipelineError(f"sharding over a mesh runs on the 'jax' and 'jax-zoo' "
                                f"backends; backend {getattr(backend, 'name', backend)!r} does "
                                f"not support it")
    if backend is not None:
        passes += tuple(backend.pipeline())
    return passes


def build_graph(model, *args, pipeline=None, instruments: Sequence = (),
                algorithm: AlgorithmOptions | None = None, backend=None,
                **kwargs) -> CompileResult:
    """Lower ``model`` on example inputs and run the pipeline.

    Args:
        model: a brainstate model with initialised states.
        *args, **kwargs: example inputs of one step.
        pipeline: passes after ``lower`` (default ``DEFAULT_PIPELINE``).
        instruments: PassManager instruments.
        algorithm: options an algorithm asks of ``select-dims`` (see
            :func:`configure_pipeline`).
        backend: its ``pipeline()`` passes are appended. ``layout-traces`` is appended
            whenever the pipeline chooses trace dims without laying them out.
    """
    check_jaxlib()
    t0 = time.perf_counter()
    g0 = lower(model, *args, **kwargs)
    t_lower = time.perf_counter() - t0
    passes = configure_pipeline(pipeline, algorithm or AlgorithmOptions())
    passes = full_pipeline(passes, backend, shard=(algorithm or AlgorithmOptions()).shard)
    rec = Recorder()
    ctx = PassContext()
    pm = PassManager(passes, instruments=(rec,) + tuple(instruments))
    graph = pm.run(g0, ctx)
    _warn_no_temporal_credit(graph)
    lower_rec = PassRecord("lower", "lower", t_lower, (
        f"{len(g0.hidden)} hidden state(s), {len(g0.params)} param(s), {len(g0.ops)} trace "
        f"op(s) in {t_lower * 1e3:.1f} ms",))
    return CompileResult(graph, (("lower", g0),) + tuple(rec.stages),
                         (lower_rec,) + tuple(ctx.records))


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
    _warn_plain_params(graph)
    if lost:
        warnings.warn(
            f"{len(lost)} trace parameter(s) reach hidden states only through the input of "
            f"another trace op and get their instantaneous gradient only, without temporal "
            f"credit: {'; '.join(lost)}. The diagonal traces cannot follow a path through "
            f"another weight (docs/design.md, 'Trace dim none'). Restructure the model if these need "
            f"temporal credit (e.g. a GRU with the reset gate applied after the recurrent "
            f"matmul, r*(U·h), as brainscale.nn.GRUCell(reset_after=True) does), or mark them "
            f"is_etrace=False to state the intent and silence this warning.",
            NoTemporalCreditWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """``warnings.warn`` stacklevel of the first caller outside this package."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    f, level = sys._getframe(1), 1
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(pkg + os.sep):
        f, level = f.f_back, level + 1
    return level


def _first_read(graph, invars) -> str:
    """`` (read at file:line)`` of the first equation reading one of the jaxpr ``invars``."""
    from . import _compat as C
    jaxpr = C.open_jaxpr(graph.info.jaxpr)
    vs = {jaxpr.invars[i] for i in invars}
    for eqn in jaxpr.eqns:
        if any(not C.is_literal(v) and v in vs for v in eqn.invars):
            loc = C.eqn_location(eqn)
            return f" (read at {loc})" if loc else ""
    return ""


def _warn_plain_params(graph):
    """Warn about plain ``ParamState``s on a path into a hidden state (they get the one-step
    gradient only) and about a model without any trace parameter."""
    if graph.info is None:
        return
    from .passes.rules import analyze
    if not any(p.kind == "etrace" for p in graph.params):
        warnings.warn(
            "the model has no trace parameter (a brainscale.ETraceParam applied through a trace "
            "op such as MatMulOp): no eligibility trace is kept and every parameter gets its "
            "instantaneous (one-step) gradient only. Wrap the weights that need temporal credit "
            "as brainscale.ETraceParam(value, op) and apply them with param.execute(x).",
            NoTemporalCreditWarning, stacklevel=_user_stacklevel())
        return
    plain = [p for p in graph.params if p.kind == "plain"
             and getattr(graph.info.states[p.state_index], "temporal_credit", True) is not False]
    if not plain:
        return
    dep = analyze(graph)
    reach = set()
    for d in dep.hidden_out.values():
        reach |= {name for kind, name in d.src if kind == "p"}
    lost = [f"%{p.name}{_first_read(graph, p.invars)}" for p in plain if p.name in reach]
    if lost:
        warnings.warn(
            f"{len(lost)} plain parameter(s) (brainstate.ParamState, not ETraceParam) lie on a "
            f"path into hidden states and get their instantaneous (one-step) gradient only, "
            f"without temporal credit: {'; '.join(lost)}. Make them brainscale.ETraceParam "
            f"applied through a trace op (e.g. ETraceParam(w, MatMulOp()).execute(x) for an input "
            f"weight, ElemWiseOp for a per-neuron time constant) to get eligibility traces, or "
            f"use brainscale.NonTempParam to state that the one-step gradient is intended.",
            NoTemporalCreditWarning, stacklevel=_user_stacklevel())
