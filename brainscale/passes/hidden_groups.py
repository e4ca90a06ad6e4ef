"""Pass ``hidden-groups``: which hidden states couple element-wise inside a neuron.

Two hidden states belong to the same group when the new value of one depends on the old
value of the other through element-wise paths (the group's ``J`` is then a k×k block per
neuron, algorithms.md section 2). Groups are the connected components of that relation;
their members must share one shape. A hidden state reached from another hidden state
through a path that mixes neurons (other than a trace op) is outside the supported model
class and is rejected, naming the states, the equation and the user's source line.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import _compat as C
from ..errors import UnsupportedModelError, UnsupportedPrimitiveError
from ..ir import HiddenGroup, attrs
from .base import Pass, register_pass
from .rules import analyze

__all__ = ["HiddenGroupsPass", "describe_origin", "mixing_error"]


def describe_origin(graph, origin) -> str:
    kind, i = origin
    if kind == "h":
        return f"hidden state %{graph.hidden[i].name}"
    if kind == "y":
        o = graph.ops[i]
        return f"op output {o.name} (= {o.kind}(.., %{o.param}))"
    return f"input %{graph.inputs[i].name}" if kind == "in" else str(origin)


def mixing_error(graph, target: str, mixed) -> Exception:
    origin, eqn_index, reason = mixed[0]
    jaxpr = C.open_jaxpr(graph.info.jaxpr)
    eqn = jaxpr.eqns[eqn_index]
    loc = C.eqn_location(eqn) or "unknown location"
    src = describe_origin(graph, origin)
    if reason.startswith("unsupported:"):
        prim = reason.split(":", 1)[1]
        return UnsupportedPrimitiveError(
            f"{target} depends on {src} through '{prim}' (eqn {eqn_index}), which has no etrace "
            f"dependency rule, at {loc}. If '{prim}' is element-wise, register a rule with "
            f"@brainscale.passes.register_dependency_rule('{prim}'); lax.scan/while_loop on a "
            f"path into a hidden state are not supported: unroll the loop or move it out of "
            f"the step")
    return UnsupportedModelError(
        f"{target} depends on {src} through a non-element-wise equation '{reason}' (eqn "
        f"{eqn_index}) at {loc}. brainscale supports models whose hidden states interact "
        f"only through trace ops (ETraceParam/ETraceOp); apply this interaction through a trace "
        f"op, or move it after the hidden states (e.g. into a readout)")


@register_pass
@dataclass(frozen=True)
class HiddenGroupsPass(Pass):
    """Group hidden states coupled element-wise; reject cross-neuron hidden paths."""
    name = "hidden-groups"
    requires = frozenset({"lowered"})
    provides = frozenset({"groups"})

    def run(self, graph, ctx):
        dep = analyze(graph)
        n = len(graph.hidden)
        parent = list(range(n))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for k, h in enumerate(graph.hidden):
            d = dep.hidden_out[h.name]
            bad = [m for m in d.mixed if m[0][0] == "h"]
            if bad:
                raise mixing_error(graph, f"hidden state %{h.name}", bad)
            for j in d.hid:
                parent[find(j)] = find(k)
        comps: dict[int, list[int]] = {}
        for k in range(n):
            comps.setdefault(find(k), []).append(k)
        groups = []
        for members in sorted(comps.values(), key=lambda m: m[0]):
            shapes = {graph.hidden[k].type.shape for k in members}
            if len(shapes) > 1:
                desc = ", ".join(f"%{graph.hidden[k].name} {list(graph.hidden[k].type.shape)}"
                                 for k in members)
                raise UnsupportedModelError(
                    f"hidden states {desc} are coupled element-wise but have different shapes; "
                    f"states of one neuron must share one shape")
            names = tuple(graph.hidden[k].name for k in members)
            self_dep = any(k in dep.hidden_out[graph.hidden[k].name].hid or
                           any(j in members for j in dep.hidden_out[graph.hidden[k].name].hid)
                           for k in members)
            groups.append(HiddenGroup(f"G{len(groups)}", names, graph.hidden[members[0]].type.shape,
                                      attrs(recurrent=bool(self_dep))))
        ctx.note(self.name, f"{len(groups)} hidden group(s) from {n} hidden state(s)")
        return graph.replace(groups=tuple(groups))
