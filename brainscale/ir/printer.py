"""Deterministic, stable text form of the IR (golden-tested).

Rules: one entity per line in fixed sections (inputs, hidden, params, values, ops, groups,
relations, traces); SSA values are ``%name``; types are spelled like jaxpr (``f32[16,64]``);
attributes go in a trailing ``{k=v}`` with sorted keys; locations only with
``PrintSettings(print_locs=True)``; a header lists the stages that ran.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from .types import Loc, short_dtype

__all__ = ["PrintSettings", "print_graph", "fmt_attrs", "PP_RULES", "trace_fields", "array_body",
           "fmt_spec"]


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
    a = (("class", o.op_class), ("eqn", o.eqn), ("layout", o.layout))
    if o.layout_reason:
        a += (("layout_reason", o.layout_reason),)
    if o.channel_axis is not None:
        a += (("channel_axis", o.channel_axis), ("param_channel_axes", tuple(o.param_channel_axes)))
    if o.batched:
        a += (("batched", True),)
    if o.x_elementwise:
        a += (("x_elementwise", True),)
    a = tuple(sorted(a + tuple(o.attrs)))
    return _line(f"{o.name} = {o.kind}({x}, %{o.param}) : {o.type}", a, o.loc, s)


#: per-node-kind printing rules (extend to print custom node kinds); filled below
PP_RULES: dict[str, Callable] = {"value": _value_line, "op": _op_line}


def print_graph(graph, settings: PrintSettings = PrintSettings()) -> str:
    """Render ``graph`` as text. Equal graphs always print identically."""
    s = settings
    lines = ["// brainscale-ir v1  graph=" + graph.name,
             "// stages: " + (", ".join(graph.stages) if graph.stages else "(none)")]
    sig = ", ".join(f"%{i.name}: {i.type}" + (f"{{shard={fmt_spec(i.sharding)}}}"
                                              if i.sharding is not None else "")
                    for i in graph.inputs)
    head = f"graph @{graph.name}({sig})"
    gdict = dict(graph.attrs, batch=graph.batch)
    if graph.mesh:
        gdict["mesh"] = tuple(f"{n}:{k}" for n, k in graph.mesh)
    if graph.cuts:
        gdict["cuts"] = tuple(f"eqn {e}: " + " ".join(f"%{p}" for p in ps)
                              for e, _, ps in graph.cuts)
    gattrs = tuple(sorted(gdict.items()))
    if s.print_attrs and gattrs:
        head += " " + fmt_attrs(gattrs)
    lines.append(head + " {")
    for h in graph.hidden:
        lines.append(_line(f"hidden %{h.name} : {h.type}", _shard_attr(h.sharding), None, s))
    for p in graph.params:
        a = (("kind", p.kind),) + tuple(p.attrs)
        if p.sharding is not None:
            a += (("shard", tuple(fmt_spec(x) for x in p.sharding)),)
        lines.append(_line(f"param  %{p.name} : {p.type}", a, None, s))
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
                           f" n={g.num_state}" + (f" output={g.output}" if g.output else ""),
                           g.attrs, None, s))
    if graph.relations:
        lines.append("")
    for r in graph.relations:
        tgt = ", ".join(r.groups) if r.groups else "(no hidden state)"
        a = tuple(sorted(((("direct", True),) if r.direct else ()) + tuple(r.attrs)))
        lines.append(_line(f"rel {r.id} = %{r.param} -> {r.op} -> {tgt}", a, None, s))
    if graph.traces:
        lines.append("")
    laid_out = "trace-arrays" in graph.facts
    for t in graph.traces:
        lines.append(PP_RULES["trace"](graph, t, s, laid_out))
        for a in t.arrays:
            lines.append(PP_RULES["array"](graph, t, a, s))
    lines.append("}")
    return "\n".join(lines) + "\n"


def trace_fields(t, laid_out: bool = False) -> tuple:
    """The typed fields of a trace (and its derived bytes), in a fixed order, then its note
    attributes sorted by key: what the trace line prints.

    The rule axes (:attr:`Trace.axes`) print only where they differ from their defaults
    (jacobian recursion, diagonal scope, symmetric signal, no filter, per-step schedule:
    D-RTRL and ES-D-RTRL), so the common traces keep short lines and every other rule reads
    as the axes it changes, e.g. ``{layout=dense, scope=coupled, bytes=...}``."""
    typed = []
    if t.layout is not None:
        typed.append(("layout", t.layout))
    if t.decay is not None:
        typed.append(("alpha", float(t.decay)))
    if t.decay_rank is not None:
        typed.append(("rank", int(t.decay_rank)))
    if t.shared_x is not None:
        typed.append(("shared_x", t.shared_x))
    typed.extend(t.axes)
    if t.path != "jax":
        typed.append(("path", t.path))
    if t.arrays or laid_out:
        typed.append(("bytes", t.nbytes))
    return tuple(typed) + tuple(sorted(t.attrs))


def _trace_line(graph, t, s, laid_out=False):
    return _line(f"trace {t.id} = {t.dim}({', '.join(t.relations)})", trace_fields(t, laid_out),
                 None, s)


def _state_names(graph, a) -> str:
    g = graph.group_by_id.get(a.group)
    if g is None:
        return "?"
    if a.state is not None:
        return f"state=%{g.states[a.state]}" if 0 <= a.state < len(g.states) else f"state={a.state}"
    return "states=[" + ",".join(f"%{n}" for n in g.states) + "]"


def array_body(graph, a) -> str:
    """``eps(R0 -> G0, leaf=weight, state=%V)``-style description of a trace array."""
    if a.role == "eps_x":
        return f"eps_x({a.value})"
    parts = [f"{a.relation} -> {a.group}" if a.group is not None else f"{a.relation}"]
    if a.role in ("eps", "eps_bar", "m", "u_p") and a.leaf is not None:
        rel = graph.relation_by_id.get(a.relation)
        p = graph.param_by_name.get(rel.param) if rel is not None else None
        fields = getattr(getattr(p, "type", None), "fields", None)
        if fields is not None and 0 <= a.leaf < len(fields):
            parts.append(f"leaf={fields[a.leaf][0]}")
        elif fields is not None:
            parts.append(f"leaf={a.leaf}")
    if a.group is not None:
        g = graph.group_by_id.get(a.group)
        if a.role == "eps_bar" and a.state is None and g is not None and g.output is not None \
                and a.type.shape[-1:] != (g.num_state,):
            parts.append(f"at={g.output}")          # filter=kappa_out: dz/dh . eps at z
        else:
            parts.append(_state_names(graph, a))
    return f"{a.role}({', '.join(parts)})"


def fmt_spec(spec) -> str:
    """``[data,.,model]``: the mesh axis of each dimension ('.' = not sharded)."""
    return "[" + ",".join("." if x is None else str(x) for x in spec) + "]"


def _shard_attr(spec) -> tuple:
    return () if spec is None else (("shard", fmt_spec(spec)),)


def _array_line(graph, t, a, s):
    # a packed pair prints the allocated array: storage=c64[B,I,O] (state 0 real, 1 imag)
    stored = str(a.stored_type) if a.packed else short_dtype(a.storage)
    extra = (("storage", stored),) if a.storage != a.type.dtype else ()
    extra += _shard_attr(a.sharding)
    body = f"  array {a.id} = {array_body(graph, a)}"
    if s.print_types:
        body += f" : {a.type}"
    return _line(body, extra, None, s)


PP_RULES["trace"] = _trace_line
PP_RULES["array"] = _array_line
