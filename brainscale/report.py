"""Compile report: what the compiler decided for a model and what it costs.

:func:`report_dict` collects, from a :class:`~brainscale.Compiled` (or a compiled algorithm,
or a bare :class:`~brainscale.ir.Graph`), the hidden states and groups, the parameters
(trace or plain), every trace with its bytes, every per-relation dimension choice with the
reason the ``select-dims`` pass recorded and both candidate costs, the time each pass took
and the total compile time. The data is validated and serialised by the pydantic model
:class:`CompileReport`, so the JSON written by ``brainscale-opt --json`` has a fixed,
documented schema (``CompileReport.model_json_schema()``). :func:`compile_report` renders
the same data as text.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from ._fmt import human_bytes

__all__ = ["CompileReport", "HiddenInfo", "GroupInfo", "ParamInfo", "TraceInfo", "ArrayInfo",
           "DimChoice", "PassTime", "report_dict", "build_report", "compile_report"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HiddenInfo(_Model):
    """One hidden state."""
    name: str
    type: str = Field(description="e.g. 'f32[16,64]'")
    group: Optional[str] = Field(None, description="hidden group id, None before hidden-groups")


class GroupInfo(_Model):
    """One hidden group (states coupled element-wise inside a neuron)."""
    id: str
    states: list[str]
    varshape: list[int]
    num_state: int


class ParamInfo(_Model):
    """One parameter read by the step."""
    name: str
    kind: str = Field(description="'etrace' (has a trace op) or 'plain'")
    type: str
    size: int = Field(description="number of elements")
    nbytes: int
    attrs: dict[str, Any] = {}


class ArrayInfo(_Model):
    """One array a trace keeps (what the compiled step allocates)."""
    id: str
    role: str = Field(description="'eps' | 'eps_x' | 'eps_f'")
    what: str = Field(description="e.g. 'eps(R0 -> G0, leaf=weight, state=%V)'")
    type: str = Field(description="logical type, e.g. 'f32[16,64]'")
    storage: str = Field(description="dtype the array is stored in")
    bytes: int


class TraceInfo(_Model):
    """One eligibility trace kept by the compiled step."""
    id: str
    dim: str = Field(description="'param' | 'io' | 'none'")
    relations: list[str]
    params: list[str]
    layout: Optional[str] = None
    decay: Optional[float] = Field(None, description="alpha of an io-dim trace")
    decay_rank: Optional[int] = None
    path: str = Field("jax", description="backend rule variant")
    shapes: list[str]
    arrays: list[ArrayInfo] = []
    bytes: int
    bytes_human: str
    reason: Optional[str] = None
    attrs: dict[str, Any] = {}


class DimChoice(_Model):
    """The trace dimension chosen for one relation and why."""
    relation: str
    param: str
    op: str
    groups: list[str]
    dim: str
    trace: str
    reason: Optional[str] = None
    param_bytes: Optional[int] = Field(None, description="cost of a param-dim trace")
    io_bytes: Optional[int] = Field(None, description="cost of an io-dim trace (None: no op input)")


class PassTime(_Model):
    """Wall time of one stage (``lower`` is the frontend)."""
    stage: str
    ms: float


class CompileReport(_Model):
    """Everything :func:`compile_report` prints, as a JSON-serialisable model."""
    graph: str
    algorithm: Optional[str] = None
    stages: list[str]
    hidden: list[HiddenInfo]
    groups: list[GroupInfo]
    params: list[ParamInfo]
    traces: list[TraceInfo]
    trace_bytes_total: int
    trace_bytes_total_human: str
    dim_choices: list[DimChoice]
    pass_times: list[PassTime]
    compile_seconds: Optional[float] = None


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _pass_times(records) -> list[PassTime]:
    return [PassTime(stage=str(r.spec), ms=float(r.seconds) * 1e3) for r in records or ()]


def _unpack(compiled):
    """``(graph, records, compile_seconds, algorithm)`` from a Compiled, an algorithm or a
    Graph."""
    from .ir import Graph
    if isinstance(compiled, Graph):
        return compiled, (), None, None
    graph = getattr(compiled, "graph", None)
    if graph is None:
        raise TypeError(f"compile_report needs a brainscale.Compiled, a compiled algorithm or a "
                        f"Graph, got {type(compiled).__name__}")
    if getattr(compiled, "learner", None) is not None:
        algo = type(compiled.learner).__name__
    elif hasattr(compiled, "_step"):         # an ETraceAlgorithm itself
        algo = type(compiled).__name__
    else:
        algo = None
    secs = getattr(compiled, "compile_seconds", None)
    return graph, tuple(getattr(compiled, "records", ()) or ()), secs, algo


def build_report(compiled) -> CompileReport:
    """The validated :class:`CompileReport` of a compiled model (see :func:`report_dict`)."""
    from .passes.select_dims import relation_costs
    from .ir.printer import array_body
    graph, records, secs, algo = _unpack(compiled)
    hidden = [HiddenInfo(name=h.name, type=str(h.type),
                         group=(graph.group_of(h.name).id if graph.group_of(h.name) else None))
              for h in graph.hidden]
    groups = [GroupInfo(id=g.id, states=list(g.states), varshape=list(g.varshape),
                        num_state=g.num_state) for g in graph.groups]
    params = [ParamInfo(name=p.name, kind=p.kind, type=str(p.type), size=int(p.type.size),
                        nbytes=int(p.type.nbytes), attrs={k: _jsonable(v) for k, v in p.attrs})
              for p in graph.params]
    traces, trace_of = [], {}
    for t in graph.traces:
        pnames = []
        for rid in t.relations:
            trace_of[rid] = t
            r = graph.relation_by_id.get(rid)
            if r is not None and r.param not in pnames:
                pnames.append(r.param)
        b = int(t.nbytes)
        layout = t.layout if t.dim == "param" else ("eps_x + eps_f" if t.dim == "io" else None)
        arrays = [ArrayInfo(id=a.id, role=a.role, what=array_body(graph, a), type=str(a.type),
                            storage=a.storage, bytes=int(a.nbytes)) for a in t.arrays]
        traces.append(TraceInfo(
            id=t.id, dim=t.dim, relations=list(t.relations), params=pnames, layout=layout,
            decay=None if t.decay is None else float(t.decay), decay_rank=t.decay_rank,
            path=t.path, shapes=[str(s) for s in t.shapes], arrays=arrays,
            bytes=b, bytes_human=human_bytes(b), reason=t.attr("reason"),
            attrs={k: _jsonable(v) for k, v in t.attrs if k != "reason"}))
    choices = []
    for r in graph.relations:
        t = trace_of.get(r.id)
        try:
            c = relation_costs(graph, r)
            pb, ib = int(c["param_bytes"]), (None if c["io_bytes"] is None else int(c["io_bytes"]))
        except Exception:  # noqa: BLE001 - costs are informative; a custom graph may lack them
            pb = ib = None
        choices.append(DimChoice(relation=r.id, param=r.param, op=r.op, groups=list(r.groups),
                                 dim=t.dim if t else "(no trace)", trace=t.id if t else "",
                                 reason=t.attr("reason") if t else None,
                                 param_bytes=pb, io_bytes=ib))
    total = sum(t.bytes for t in traces)
    return CompileReport(
        graph=graph.name, algorithm=algo, stages=list(graph.stages), hidden=hidden,
        groups=groups, params=params, traces=traces, trace_bytes_total=total,
        trace_bytes_total_human=human_bytes(total), dim_choices=choices,
        pass_times=_pass_times(records), compile_seconds=secs)


def report_dict(compiled) -> dict:
    """The compile report as a JSON-serialisable dict (the :class:`CompileReport` schema).

    Args:
        compiled: a :class:`~brainscale.Compiled`, a compiled algorithm object or a Graph
            (then without timings).

    Returns:
        ``CompileReport.model_dump(mode='json')``: plain dicts, lists, strings and numbers.
    """
    return build_report(compiled).model_dump(mode="json")


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip() for r in rows]


def compile_report(compiled) -> str:
    """A human-readable compile report (see :func:`report_dict` for the data).

    Args:
        compiled: a :class:`~brainscale.Compiled`, a compiled algorithm object or a Graph.

    Returns:
        Text with sections: hidden states, parameters, traces (bytes each and total),
        dimension choices with their reasons, time per pass and compile time.
    """
    rep = build_report(compiled)
    out = [f"compile report: {rep.graph}" + (f"  ({rep.algorithm})" if rep.algorithm else ""),
           "stages: " + (", ".join(rep.stages) or "(none)"), ""]
    out.append(f"hidden states ({len(rep.hidden)}) in {len(rep.groups)} group(s):")
    rows = [[h.name, h.type, h.group or "-"] for h in rep.hidden]
    out += _table([["name", "type", "group"]] + rows)
    for g in rep.groups:
        out.append(f"  {g.id}: varshape=[{','.join(map(str, g.varshape))}] n={g.num_state}  "
                   f"[{', '.join(g.states)}]")
    n_et = sum(p.kind == "etrace" for p in rep.params)
    out += ["", f"parameters ({n_et} etrace, {len(rep.params) - n_et} plain):"]
    rows = [[p.name, p.kind, p.type, str(p.size)] for p in rep.params]
    out += _table([["name", "kind", "type", "elements"]] + rows)
    out += ["", f"traces ({len(rep.traces)}):"]
    rows = [[t.id, t.dim, ",".join(t.relations), ",".join(t.params), t.layout or "-",
             "-" if t.decay is None else f"{t.decay:.6g}", str(len(t.arrays)), t.bytes_human]
            for t in rep.traces]
    out += _table([["id", "dim", "relations", "params", "layout", "alpha", "arrays", "bytes"]]
                  + rows)
    exact = f" ({rep.trace_bytes_total} B)" if rep.trace_bytes_total >= 1024 else ""
    out.append(f"  total: {rep.trace_bytes_total_human}{exact}")
    arrays = [a for t in rep.traces for a in t.arrays]
    if arrays:
        out += ["", f"trace arrays ({len(arrays)}, what the compiled step allocates):"]
        rows = [[a.id, a.what, a.type, a.storage, human_bytes(a.bytes)] for a in arrays]
        out += _table([["id", "array", "type", "storage", "bytes"]] + rows)
    out += ["", "dimension choices:"]
    rows = []
    for c in rep.dim_choices:
        costs = f"param={'-' if c.param_bytes is None else human_bytes(c.param_bytes)} " \
                f"io={'-' if c.io_bytes is None else human_bytes(c.io_bytes)}"
        rows.append([c.relation, c.param, f"{c.op}->{','.join(c.groups) or '-'}", c.dim,
                     costs, c.reason or ""])
    out += _table([["rel", "param", "op->groups", "dim", "costs", "reason"]] + rows)
    out += ["", "time per pass:"]
    out += _table([[p.stage, f"{p.ms:.2f} ms"] for p in rep.pass_times]) or ["  (not recorded)"]
    if rep.compile_seconds is not None:
        out.append(f"compile time: {rep.compile_seconds * 1e3:.1f} ms (lower + passes + backend)")
    return "\n".join(out) + "\n"
