"""Pass ``fuse-traces``: one ``ε_x`` per distinct op input.

ES-D-RTRL keeps ``ε_x = α ε_x + x`` per op input (algorithms.md section 4); ops reading the
same input (e.g. several layers fed by the same spikes, or a GRU's gates) share it. The
pass merges the io-dim traces whose ops read the same input value into one trace, recorded
as ``shared_x=%x..``; the backend then allocates one ``ε_x`` per trace.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Trace, attrs
from .base import Pass, register_pass

__all__ = ["FuseTracesPass"]


@register_pass
@dataclass(frozen=True)
class FuseTracesPass(Pass):
    """Merge io-dim traces that read the same op input (shared ε_x)."""
    name = "fuse-traces"
    requires = frozenset({"trace-dims"})
    provides = frozenset({"fused-traces"})

    def run(self, graph, ctx):
        by_x: dict[str, list[Trace]] = {}
        order: list = []
        for t in graph.traces:
            if t.dim == "io":
                x = graph.op_by_name[graph.relation_by_id[t.relations[0]].op].x
                if x not in by_x:
                    by_x[x] = []
                    order.append(("io", x))
                by_x[x].append(t)
            else:
                order.append(("other", t))
        out = []
        for kind, item in order:
            if kind == "other":
                out.append(item)
                continue
            ts = by_x[item]
            rels = tuple(r for t in ts for r in t.relations)
            x_shape = ts[0].shapes[0]
            shapes = (x_shape,) + tuple(s for t in ts for s in t.shapes[1:])
            total = sum(int(t.attr("bytes", 0)) for t in ts) - (len(ts) - 1) * x_shape.nbytes
            reasons = sorted({t.attr("reason") for t in ts})
            out.append(Trace("T0", "io", rels, shapes,
                             attrs(shared_x=item, bytes=int(total), reason="; ".join(reasons))))
            if len(ts) > 1:
                ctx.note(self.name, f"{', '.join(rels)} share eps_x of {item}")
        out = tuple(Trace(f"T{i}", t.dim, t.relations, t.shapes, t.attrs) for i, t in enumerate(out))
        return graph.replace(traces=out)
