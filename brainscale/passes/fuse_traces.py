"""Pass ``fuse-traces``: one ``ε_x`` per distinct op input.

ES-D-RTRL keeps ``ε_x = α ε_x + x`` per op input (algorithms.md section 4); ops reading the
same input (e.g. several layers fed by the same spikes, or a GRU's gates) share it. The
pass merges the io-dim traces whose ops read the same input value with the same decay α,
backend path and rule axes (recursion, signal, schedule, ...) into one trace (its
``shared_x``); the backend then keeps one ``ε_x`` per trace. Run after ``layout-traces``, the merged traces are laid out again.
"""
from __future__ import annotations

from dataclasses import dataclass, replace as dc_replace

from ..ir import Trace
from .base import Pass, register_pass
from .layout import layout_trace, renumber_traces

__all__ = ["FuseTracesPass"]


@register_pass
@dataclass(frozen=True)
class FuseTracesPass(Pass):
    """Merge io-dim traces that read the same op input (shared ε_x)."""
    name = "fuse-traces"
    requires = frozenset({"trace-dims"})
    provides = frozenset({"fused-traces"})

    def run(self, graph, ctx):
        by_key: dict[tuple, list[Trace]] = {}
        order: list = []
        for t in graph.traces:
            if t.dim == "io":
                key = (t.shared_x, t.decay, t.decay_rank, t.path, t.axes)
                if key not in by_key:
                    by_key[key] = []
                    order.append(("io", key))
                by_key[key].append(t)
            else:
                order.append(("other", t))
        out = []
        for kind, item in order:
            if kind == "other":
                out.append(item)
                continue
            ts = by_key[item]
            if len(ts) == 1:
                out.append(ts[0])
                continue
            rels = tuple(r for t in ts for r in t.relations)
            reasons = sorted({str(t.attr("reason")) for t in ts if t.attr("reason") is not None})
            notes = {k: v for t in ts for k, v in t.attrs if k != "reason"}
            if reasons:
                notes["reason"] = "; ".join(reasons)
            merged = dc_replace(ts[0], relations=rels, arrays=(),
                                attrs=tuple(sorted(notes.items())))
            if "trace-arrays" in graph.facts:
                merged = layout_trace(graph, merged)
            out.append(merged)
            ctx.note(self.name, f"{', '.join(rels)} share eps_x of {item[0]}")
        return graph.replace(traces=renumber_traces(out))
