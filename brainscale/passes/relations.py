"""Pass ``relations``: which hidden groups each trace-op output reaches element-wise.

For every op application ``y = op(x, θ)`` the pass records the groups whose new states
depend on ``y`` through element-wise paths only (``df`` of algorithms.md section 2 is then
diagonal per neuron), whether ``y`` also reaches the step's outputs without passing through
a new hidden state (``direct``: an instantaneous gradient term), and the op input's
origins. An op output that reaches a hidden state through a path mixing neurons (e.g.
Linear → LayerNorm → LIF) is rejected with the equation and source line: such a weight
would otherwise silently get a wrong (zero) trace gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedModelError
from ..ir import Relation, Value, replace
from .base import Pass, register_pass
from .hidden_groups import mixing_error
from .rules import analyze

__all__ = ["RelationsPass"]


def _origin_names(graph, src) -> tuple[str, ...]:
    order = {"h": 0, "in": 1, "y": 2}
    pos = {n: i for i, n in enumerate([h.name for h in graph.hidden] +
                                      [i.name for i in graph.inputs] +
                                      [o.name for o in graph.ops])}
    return tuple(name for kind, name in sorted(
        (o for o in src if o[0] in order), key=lambda o: (order[o[0]], pos.get(o[1], 0))))


@register_pass
@dataclass(frozen=True)
class RelationsPass(Pass):
    """Relate each param → op output → hidden groups; reject non-element-wise paths."""
    name = "relations"
    requires = frozenset({"groups"})
    provides = frozenset({"relations"})

    def run(self, graph, ctx):
        dep = analyze(graph)
        group_of = {s: g.id for g in graph.groups for s in g.states}
        reach: dict[str, list[str]] = {o.name: [] for o in graph.ops}
        for h in graph.hidden:
            d = dep.hidden_out[h.name]
            bad = [m for m in d.mixed if m[0][0] == "y"]
            if bad:
                raise mixing_error(graph, f"hidden state %{h.name}", bad)
            for q in d.ys:
                gid = group_of[h.name]
                if gid not in reach[q]:
                    reach[q].append(gid)
        rels = []
        for o in graph.ops:
            gids = tuple(sorted(reach[o.name], key=lambda g: int(g[1:])))
            for gid in gids:
                vs = graph.group_by_id[gid].varshape
                ys = o.type.shape
                if tuple(vs[len(vs) - len(ys):]) != tuple(ys):
                    raise UnsupportedModelError(
                        f"op output {o.name} of %{o.param} has shape {list(ys)} but reaches the "
                        f"hidden group {gid} of shape {list(vs)} element-wise; an op's output "
                        f"must have the neuron shape of the states it drives")
            attrs = ()
            if not gids:
                # a weight feeding a weight (GRU reset gate inside U·(r⊙h)): the output
                # reaches hidden states only through the input of other trace ops
                via = tuple(o2.name for o2 in graph.ops
                            if o2.name != o.name and reach[o2.name]
                            and ("y", o.name) in dep.op_x[o2.name].src)
                if via:
                    attrs = (("via_ops", via),)
            rels.append(Relation(f"R{len(rels)}", o.param, o.name, gids,
                                 o.name in dep.out_direct, attrs=attrs))
        values = tuple(replace(v, deps=self._deps(graph, dep, v)) for v in graph.values)
        ctx.note(self.name, f"{len(rels)} relation(s)")
        return graph.replace(relations=tuple(rels), values=values)

    @staticmethod
    def _deps(graph, dep, v: Value):
        for o in graph.ops:
            if o.x == v.name:
                return _origin_names(graph, dep.op_x[o.name].src)
        return v.deps
