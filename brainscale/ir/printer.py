"""Deterministic, stable text form of the IR (golden-tested).

Rules: one entity per line in fixed sections (inputs, hidden, params, values, ops, groups,
relations, traces); SSA values are ``%name``; types are spelled like jaxpr (``f32[16,64]``);
attributes go in a trailing ``{k=v}`` with sorted keys; locations only with
``PrintSettings(print_locs=True)``; a header lists the stages that ran.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from .types import Loc

__all__ = ["PrintSettings", "print_graph", "fmt_attrs", "PP_RULES"]


class PrintSettings(NamedTuple):
    print_types: bool = True
    print_locs: bool = False
    print_attrs: bool = True


def _fmt_val(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, tuple):
        return "[" + ",".join(_fmt_val(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def fmt_attrs(attrs) -> str:
    if not attrs:
        return ""
    return "{" + ", ".join(f"{k}={_fmt_val(v)}" for k, v in attrs) + "}"


def _line(body: str, attrs=(), loc: Loc | None = None, s: PrintSettings = PrintSettings(),
          width: int = 44) -> str:
    out = "  " + body
    tail = []
    if s.print_attrs and attrs:
        tail.append(fmt_attrs(attrs))
    if s.print_locs and loc is not None:
        tail.append(str(loc))
    if tail:
        out = out.ljust(width) + "  " + "  ".join(tail)
    return out.rstrip()


def _value_line(v, s):
    deps = ", ".join(d if d.startswith("%") else f"%{d}" for d in v.deps)
    a = (("def", "input"),) if v.eqn is None else (("eqn", v.eqn),)
    return _line(f"{v.name} = value({deps}) : {v.type}", a, v.loc, s)


def _op_line(o, s):
    x = o.x if o.x is not None else "-"
    a = (("class", o.op_class), ("eqn", o.eqn))
    if o.batched:
        a += (("batched", True),)
    a = tuple(sorted(a + tuple(o.attrs)))
    return _line(f"{o.name} = {o.kind}({x}, %{o.param}) : {o.type}", a, o.loc, s)


#: per-node-kind printing rules (extend to print custom node kinds)
PP_RULES: dict[str, Callable] = {"value": _value_line, "op": _op_line}


def print_graph(graph, settings: PrintSettings = PrintSettings()) -> str:
    """Render ``graph`` as text. Equal graphs always print identically."""
    s = settings
    lines = ["// brainscale-ir v1  graph=" + graph.name,
             "// stages: " + (", ".join(graph.stages) if graph.stages else "(none)")]
    sig = ", ".join(f"%{i.name}: {i.type}" for i in graph.inputs)
    head = f"graph @{graph.name}({sig})"
    if s.print_attrs and graph.attrs:
        head += " " + fmt_attrs(graph.attrs)
    lines.append(head + " {")
    for h in graph.hidden:
        lines.append(_line(f"hidden %{h.name} : {h.type}", (), None, s))
    for p in graph.params:
        lines.append(_line(f"param  %{p.name} : {p.type}", (("kind", p.kind),) + tuple(p.attrs),
                           None, s))
    if graph.values or graph.ops:
        lines.append("")
    for v in graph.values:
        lines.append(PP_RULES["value"](v, s))
    for o in graph.ops:
        lines.append(PP_RULES["op"](o, s))
    if graph.groups:
        lines.append("")
    for g in graph.groups:
        members = ", ".join(f"%{n}" for n in g.states)
        lines.append(_line(f"group {g.id} = [{members}] varshape=[{','.join(map(str, g.varshape))}]"
                           f" n={g.num_state}", g.attrs, None, s))
    if graph.relations:
        lines.append("")
    for r in graph.relations:
        tgt = ", ".join(r.groups) if r.groups else "(no hidden state)"
        a = tuple(sorted(((("direct", True),) if r.direct else ()) + tuple(r.attrs)))
        lines.append(_line(f"rel {r.id} = %{r.param} -> {r.op} -> {tgt}", a, None, s))
    if graph.traces:
        lines.append("")
    for t in graph.traces:
        shapes = ", ".join(str(x) for x in t.shapes)
        lines.append(_line(f"trace {t.id} = {t.dim}({', '.join(t.relations)}) : [{shapes}]",
                           t.attrs, None, s))
    lines.append("}")
    return "\n".join(lines) + "\n"
