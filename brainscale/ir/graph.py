"""The IR module: one compiled model step."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .nodes import HiddenGroup, HiddenState, Input, Op, Param, Relation, Trace, Value
from .types import FrozenAttrs

__all__ = ["Graph", "StepInfo"]


@dataclass(frozen=True, eq=False)
class StepInfo:
    """What the backend needs besides the IR: the traced jaxpr, the op objects, the states.

    Not part of the IR's structural equality (two graphs of the same model compare equal
    whatever objects the tracer produced).
    """
    jaxpr: Any                     # closed jaxpr of one step, trace-op calls inlined
    ops: Any                       # Mapping op name ('%y0') -> ETraceOp object
    states: tuple                  # brainstate states in jaxpr order (references)
    state_paths: tuple             # their names (paths) in the same order
    state_treedefs: tuple          # pytree structure of each state's value
    n_arg_leaves: int              # jaxpr invars [0, n) are the step's argument leaves
    args_treedef: Any              # treedef of (args, kwargs)
    out_treedef: Any               # treedef of the step's output
    n_out_leaves: int
    state_out_slices: tuple        # per state: (start, stop) into jaxpr outvars
    state_in_slices: tuple         # per state: (start, stop) into jaxpr invars


@dataclass(frozen=True)
class Graph:
    """An etrace IR graph: entities in deterministic order plus the passes that ran."""
    name: str
    inputs: tuple[Input, ...] = ()
    hidden: tuple[HiddenState, ...] = ()
    params: tuple[Param, ...] = ()
    values: tuple[Value, ...] = ()
    ops: tuple[Op, ...] = ()
    groups: tuple[HiddenGroup, ...] = ()
    relations: tuple[Relation, ...] = ()
    traces: tuple[Trace, ...] = ()
    batch: int = 0                     # leading batch size of the batched ops (0: unbatched)
    mesh: tuple = ()                   # ((axis name, size), ...) the shardings refer to
    cuts: tuple = ()                   # ((eqn, weight operand, (plain params)), ...): plain-
                                       # weight linear maps the linearisation cuts
    stages: tuple[str, ...] = ()
    facts: frozenset = frozenset()     # facts established by passes ('groups', ...)
    attrs: FrozenAttrs = ()            # notes only (backends read typed fields)
    info: StepInfo | None = field(default=None, compare=False, repr=False)

    # -- functional updates ------------------------------------------------------------
    def replace(self, **kw) -> "Graph":
        """Functional update; returns ``self`` when every given field is unchanged."""
        if all(getattr(self, k) is v for k, v in kw.items()):
            return self
        return dataclasses.replace(self, **kw)

    def with_stage(self, spec: str, provides: frozenset = frozenset()) -> "Graph":
        return dataclasses.replace(self, stages=self.stages + (spec,),
                                   facts=self.facts | frozenset(provides))

    # -- lookups -------------------------------------------------------------------------
    @cached_property
    def hidden_by_name(self) -> dict[str, HiddenState]:
        return {h.name: h for h in self.hidden}

    @cached_property
    def param_by_name(self) -> dict[str, Param]:
        return {p.name: p for p in self.params}

    @cached_property
    def op_by_name(self) -> dict[str, Op]:
        return {o.name: o for o in self.ops}

    @cached_property
    def value_by_name(self) -> dict[str, Value]:
        return {v.name: v for v in self.values}

    @cached_property
    def group_by_id(self) -> dict[str, HiddenGroup]:
        return {g.id: g for g in self.groups}

    @cached_property
    def relation_by_id(self) -> dict[str, Relation]:
        return {r.id: r for r in self.relations}

    @cached_property
    def trace_by_id(self) -> dict[str, Trace]:
        return {t.id: t for t in self.traces}

    @cached_property
    def trace_of_relation(self) -> dict[str, Trace]:
        return {rid: t for t in self.traces for rid in t.relations}

    @cached_property
    def array_by_id(self) -> dict:
        return {a.id: a for t in self.traces for a in t.arrays}

    @property
    def batch_size(self) -> int:
        """The leading batch size of the step (0: unbatched): :attr:`batch` (the batched ops'
        batch), else the one per-example axis a hidden group has in front of the neurons of
        an op driving it (an op with an unbatched input feeding batched states)."""
        if self.batch:
            return int(self.batch)
        from .layout import batch_shape
        for r in self.relations:
            for gid in r.groups:
                b = batch_shape(self, gid, self.op_by_name[r.op])
                if len(b) == 1:
                    return int(b[0])
        return 0

    def op_object(self, op_name: str):
        """The :class:`~brainscale.ETraceOp` applied by the op ``op_name`` (from the traced step)."""
        if self.info is None:
            raise ValueError("the graph carries no traced step (StepInfo)")
        return self.info.ops[op_name]

    def group_of(self, hidden_name: str) -> HiddenGroup | None:
        for g in self.groups:
            if hidden_name in g.states:
                return g
        return None

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)

    # -- views ---------------------------------------------------------------------------
    def to_networkx(self):
        """A ``networkx.DiGraph`` view: nodes are IR names with a ``kind`` attribute."""
        import networkx as nx
        g = nx.DiGraph(name=self.name)
        for i in self.inputs:
            g.add_node(i.name, kind="input", type=str(i.type))
        for h in self.hidden:
            g.add_node(h.name, kind="hidden", type=str(h.type))
        for p in self.params:
            g.add_node(p.name, kind="param", type=str(p.type), param_kind=p.kind)
        for v in self.values:
            g.add_node(v.name, kind="value", type=str(v.type))
            for d in v.deps:
                g.add_edge(d, v.name)
        for o in self.ops:
            g.add_node(o.name, kind="op", op_kind=o.kind, type=str(o.type))
            g.add_edge(o.param, o.name)
            if o.x is not None:
                g.add_edge(o.x, o.name)
        for grp in self.groups:
            g.add_node(grp.id, kind="group", varshape=grp.varshape)
            for s in grp.states:
                g.add_edge(s, grp.id, kind="member")
        for r in self.relations:
            g.add_node(r.id, kind="relation")
            g.add_edge(r.op, r.id)
            for gid in r.groups:
                g.add_edge(r.id, gid)
        for t in self.traces:
            g.add_node(t.id, kind="trace", dim=t.dim)
            for rid in t.relations:
                g.add_edge(rid, t.id)
            for a in t.arrays:
                g.add_node(a.id, kind="array", role=a.role, type=str(a.stored_type))
                g.add_edge(t.id, a.id)
        return g

    def __str__(self) -> str:
        from .printer import print_graph
        return print_graph(self)
