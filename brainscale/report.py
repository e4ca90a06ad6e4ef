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

import re
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from .ir.dot import human_bytes

__all__ = ["CompileReport", "HiddenInfo", "GroupInfo", "ParamInfo", "TraceInfo", "DimChoice",
           "PassTime", "report_dict", "build_report", "compile_report"]

_MS = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*ms\s*$")
_LOWER_MS = re.compile(r"in ([0-9]+(?:\.[0-9]+)?) ms")


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


class TraceInfo(_Model):
    """One eligibility trace kept by the compiled step."""
    id: str
    dim: str = Field(description="'param' | 'io' | 'none'")
    relations: list[str]
    params: list[str]
    layout: Optional[str] = None
    shapes: list[str]
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


def _pass_times(log) -> list[PassTime]:
    out = []
    for entry in log or ():
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            continue
        stage, msg = entry
        msg = str(msg)
        m = _MS.match(msg)
        if m:
            out.append(PassTime(stage=str(stage), ms=float(m.group(1))))
        elif stage == "lower":
            m = _LOWER_MS.search(msg)
            if m:
                out.append(PassTime(stage="lower", ms=float(m.group(1))))
    return out


def _unpack(compiled):
    """``(graph, log, compile_seconds, algorithm)`` from a Compiled, an algorithm or a Graph."""
    from .ir import Graph
    if isinstance(compiled, Graph):
        return compiled, [], None, None
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
    return graph, list(getattr(compiled, "log", []) or []), secs, algo


def build_report(compiled) -> CompileReport:
    """The validated :class:`CompileReport` of a compiled model (see :func:`report_dict`)."""
    from .passes.select_dims import relation_costs
    graph, log, secs, algo = _unpack(compiled)
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
        b = t.attr("bytes")
        b = int(b) if b is not None else sum(s.nbytes for s in t.shapes)
        layout = t.attr("layout") if t.dim == "param" else ("eps_x + eps_f" if t.dim == "io" else None)
        traces.append(TraceInfo(
            id=t.id, dim=t.dim, relations=list(t.relations), params=pnames,
            layout=None if layout is None else str(layout), shapes=[str(s) for s in t.shapes],
            bytes=b, bytes_human=human_bytes(b), reason=t.attr("reason"),
            attrs={k: _jsonable(v) for k, v in t.attrs if k not in ("bytes", "reason", "layout")}))
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
        pass_times=_pass_times(log), compile_seconds=secs)


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
             t.bytes_human] for t in rep.traces]
    out += _table([["id", "dim", "relations", "params", "layout", "bytes"]] + rows)
    exact = f" ({rep.trace_bytes_total} B)" if rep.trace_bytes_total >= 1024 else ""
    out.append(f"  total: {rep.trace_bytes_total_human}{exact}")
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
