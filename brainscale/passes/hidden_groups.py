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
    kind, name = origin
    if kind == "h":
        return f"hidden state %{name}"
    if kind == "y":
        o = graph.op_by_name.get(name)
        return f"op output {name}" + (f" (= {o.kind}(.., %{o.param}))" if o else "")
    return f"input %{name}" if kind == "in" else str(origin)


def mixing_error(graph, target: str, mixed) -> Exception:
    origin, eqn_index, reason = mixed[0]
    jaxpr = C.open_jaxpr(graph.info.jaxpr)
    eqn = jaxpr.eqns[eqn_index]
    loc = C.eqn_location(eqn) or (f"an equation of {graph.name} that library code emitted "
                                  f"(no line of yours in its trace)")
    src = describe_origin(graph, origin)
    hint = ""
    if any(n.endswith("]") and "[" in n for n in (target, src)):
        hint = (" The states are components of a brainstate HiddenGroupState / "
                "HiddenTreeState: its whole .value stacks and slices them, so read and write "
                "the components with get_value(...) / set_value({...}) instead.")
    if reason.startswith("unsupported:") and reason.split(":", 1)[1] in ("scan", "while"):
        prim = reason.split(":", 1)[1]
        return UnsupportedPrimitiveError(
            f"{target} depends on {src} through a loop ('{prim}', eqn {eqn_index}) at {loc}; "
            f"a lax.scan / while_loop / fori_loop on a path into a hidden state is not analysed "
            f"(its iterations could mix neurons): unroll it (a Python loop, or "
            f"fori_loop(..., unroll=True)) or move it out of the step.{hint}")
    if reason.startswith("unsupported:"):
        prim = reason.split(":", 1)[1]
        return UnsupportedPrimitiveError(
            f"{target} depends on {src} through '{prim}' (eqn {eqn_index}), which has no etrace "
            f"dependency rule, at {loc}. If '{prim}' is element-wise, register a rule with "
            f"@brainscale.passes.register_dependency_rule('{prim}').{hint}")
    return UnsupportedModelError(
        f"{target} depends on {src} through a non-element-wise equation '{reason}' (eqn "
        f"{eqn_index}) at {loc}. brainscale supports models whose hidden states interact "
        f"only through trace ops (ETraceParam/ETraceOp); apply this interaction through a trace "
        f"op, or move it after the hidden states (e.g. into a readout).{hint}")


@register_pass
@dataclass(frozen=True)
class HiddenGroupsPass(Pass):
    """Group hidden states coupled element-wise; reject cross-neuron hidden paths."""
    name = "hidden-groups"
    requires = frozenset({"lowered"})
    provides = frozenset({"groups"})

    def run(self, graph, ctx):
        dep = analyze(graph)
        names = [h.name for h in graph.hidden]
        parent = {n: n for n in names}

        def find(n):
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        for h in graph.hidden:
            d = dep.hidden_out[h.name]
            bad = [m for m in d.mixed if m[0][0] == "h"]
            if bad:
                raise mixing_error(graph, f"hidden state %{h.name}", bad)
            for j in d.hid:
                parent[find(j)] = find(h.name)
        comps: dict[str, list[str]] = {}
        for n in names:
            comps.setdefault(find(n), []).append(n)
        order = {n: i for i, n in enumerate(names)}
        groups = []
        for members in sorted(comps.values(), key=lambda m: order[m[0]]):
            hs = [graph.hidden_by_name[n] for n in members]
            if len({h.type.shape for h in hs}) > 1:
                desc = ", ".join(f"%{h.name} {list(h.type.shape)}" for h in hs)
                raise UnsupportedModelError(
                    f"hidden states {desc} are coupled element-wise but have different shapes; "
                    f"states of one neuron must share one shape")
            self_dep = any(j in members for n in members for j in dep.hidden_out[n].hid)
            groups.append(HiddenGroup(f"G{len(groups)}", tuple(members), hs[0].type.shape,
                                      attrs(recurrent=bool(self_dep))))
        ctx.note(self.name, f"{len(groups)} hidden group(s) from {len(names)} hidden state(s)")
        cuts = tuple((e, w, ps) for e, (w, ps) in sorted(dep.cuts.items()))
        for e, _, ps in cuts:
            ctx.note(self.name, f"eqn {e}: the plain weight {', '.join('%' + p for p in ps)} "
                                f"between hidden states is cut like a trace op without a trace "
                                f"(one-step gradient only)")
        return graph.replace(groups=tuple(groups), cuts=cuts)
