"""Graph-wide invariants of the etrace IR (local ones are checked by each node)."""
from __future__ import annotations

from ..errors import IRVerificationError
from .printer import print_graph

__all__ = ["verify"]


def _fail(graph, msg: str, needle: str | None = None):
    text = print_graph(graph)
    excerpt = ""
    if needle:
        lines = text.splitlines()
        for i, ln in enumerate(lines):
            if needle in ln:
                lo, hi = max(0, i - 2), min(len(lines), i + 3)
                marked = [("> " if j == i else "  ") + lines[j] for j in range(lo, hi)]
                excerpt = "\n" + "\n".join(marked)
                break
    raise IRVerificationError(f"invalid IR: {msg}{excerpt}")


def verify(graph) -> None:
    """Check the invariants every pass must preserve.

    Raises:
        IRVerificationError: naming the first violated invariant with an IR excerpt.
    """
    names: dict[str, str] = {}
    for kind, items in (("input", graph.inputs), ("hidden", graph.hidden),
                        ("param", graph.params), ("value", graph.values), ("op", graph.ops)):
        for it in items:
            if it.name in names:
                _fail(graph, f"name {it.name!r} is defined twice ({names[it.name]} and {kind})",
                      it.name)
            names[it.name] = kind
    for o in graph.ops:
        if o.param not in graph.param_by_name:
            _fail(graph, f"op {o.name} uses unknown param {o.param!r}", o.name)
        if graph.param_by_name[o.param].kind != "etrace":
            _fail(graph, f"op {o.name} applies param {o.param!r} which is not an etrace param",
                  o.name)
        if o.x is not None and o.x not in graph.value_by_name:
            _fail(graph, f"op {o.name} reads unknown value {o.x!r}", o.name)
    for v in graph.values:
        for d in v.deps:
            if d not in names:
                _fail(graph, f"value {v.name} depends on unknown {d!r}", v.name)
    seen: dict[str, str] = {}
    for g in graph.groups:
        if not g.states:
            _fail(graph, f"group {g.id} is empty", f"group {g.id}")
        for s in g.states:
            h = graph.hidden_by_name.get(s)
            if h is None:
                _fail(graph, f"group {g.id} holds unknown hidden state {s!r}", f"group {g.id}")
            if s in seen:
                _fail(graph, f"hidden state {s!r} is in groups {seen[s]} and {g.id}", f"group {g.id}")
            seen[s] = g.id
            if tuple(h.type.shape) != tuple(g.varshape):
                _fail(graph, f"group {g.id} varshape {list(g.varshape)} differs from the shape "
                             f"{list(h.type.shape)} of its state {s!r}", f"group {g.id}")
    if len({g.id for g in graph.groups}) != len(graph.groups):
        _fail(graph, "group ids are not unique")
    for r in graph.relations:
        if r.op not in graph.op_by_name:
            _fail(graph, f"relation {r.id} names unknown op {r.op!r}", f"rel {r.id}")
        if graph.op_by_name[r.op].param != r.param:
            _fail(graph, f"relation {r.id} pairs {r.op} with {r.param!r} but the op applies "
                         f"{graph.op_by_name[r.op].param!r}", f"rel {r.id}")
        y = graph.op_by_name[r.op].type.shape
        for gid in r.groups:
            g = graph.group_by_id.get(gid)
            if g is None:
                _fail(graph, f"relation {r.id} names unknown group {gid!r}", f"rel {r.id}")
            vs = tuple(g.varshape)
            if tuple(vs[len(vs) - len(y):]) != tuple(y):
                _fail(graph, f"relation {r.id}: op output {list(y)} does not match the neuron "
                             f"shape {list(vs)} of {gid}", f"rel {r.id}")
    covered: dict[str, str] = {}
    for t in graph.traces:
        if not t.relations:
            _fail(graph, f"trace {t.id} has no relation", f"trace {t.id}")
        for rid in t.relations:
            if rid not in graph.relation_by_id:
                _fail(graph, f"trace {t.id} names unknown relation {rid!r}", f"trace {t.id}")
            if rid in covered:
                _fail(graph, f"relation {rid} is traced by both {covered[rid]} and {t.id}",
                      f"trace {t.id}")
            covered[rid] = t.id
        if t.dim == "io":
            for rid in t.relations:
                op = graph.op_by_name[graph.relation_by_id[rid].op]
                if op.x is None:
                    _fail(graph, f"trace {t.id} is io-dim but op {op.name} has no input x "
                                 f"(element-wise ops need a param-dim trace)", f"trace {t.id}")
    if "trace-dims" in graph.facts:
        for r in graph.relations:
            if r.id not in covered:
                _fail(graph, f"relation {r.id} has no trace after select-dims", f"rel {r.id}")
