"""Two example passes shipped to show how user passes look (``docs/custom_passes.md``).

Both run after ``select-dims`` (they require the ``trace-dims`` fact) and only rewrite the
graph's :class:`~brainscale.ir.Trace` entries; the backends allocate the trace arrays those
entries list, so the compiled step follows whatever the passes decided. Importing this
module registers them:

* ``force-param-small{max_elems=4096}`` turns io-dim (ES-D-RTRL) traces of parameters with
  at most ``max_elems`` elements into param-dim (D-RTRL) traces: for a small weight the
  exact-for-diagonal rule costs little memory. Fused io traces (shared ``ε_x``) are split:
  the small parameters leave, the others keep the shared input trace.
* ``drop-frozen{params=[a;b]}`` gives the named parameters trace dim ``none``: they keep
  only their instantaneous gradient (the gradient through the current step, with the
  previous hidden states held fixed), and no trace memory.

New traces are built with :func:`brainscale.passes.retrace` (and laid out with the same
helper ``layout-traces`` uses when they run after it), so the dumps and
``brainscale-opt --report`` list exactly the arrays the backend allocates. Every change is
recorded in the trace's ``reason`` and in the pass log.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedModelError
from ..ir import Trace
from .base import Pass, register_pass
from .layout import retrace, renumber_traces

__all__ = ["ForceParamSmallPass", "DropFrozenPass"]


def _split(graph, t: Trace, leave: list[str], new_dim: str, reason_of) -> list[Trace]:
    """Move relations ``leave`` out of ``t`` into one ``new_dim`` trace each."""
    keep = [rid for rid in t.relations if rid not in leave]
    out = []
    if keep:
        other = {k: v for k, v in t.attrs if k != "reason"}
        out.append(retrace(graph, keep, t.dim, str(t.attr("reason", "")), decay=t.decay,
                           decay_rank=t.decay_rank, layout=t.layout, extra_attrs=other))
    for rid in leave:
        out.append(retrace(graph, [rid], new_dim, reason_of(rid)))
    return out


@register_pass
@dataclass(frozen=True)
class ForceParamSmallPass(Pass):
    """Switch io-dim traces of small parameters (``<= max_elems`` elements) to param-dim.

    Parameters marked ``ETraceGrad.approx`` (the user asked for io-dim) are left alone.
    """
    name = "force-param-small"
    requires = frozenset({"trace-dims"})
    max_elems: int = 4096

    def run(self, graph, ctx):
        if not isinstance(self.max_elems, int) or self.max_elems < 0:
            raise ValueError(f"max_elems must be a non-negative int, got {self.max_elems!r}")
        traces: list[Trace] = []
        for t in graph.traces:
            if t.dim != "io":
                traces.append(t)
                continue
            small = []
            for rid in t.relations:
                p = graph.param_by_name[graph.relation_by_id[rid].param]
                if p.type.size <= self.max_elems and dict(p.attrs).get("grad") != "approx":
                    small.append(rid)
            if not small:
                traces.append(t)
                continue

            def why(rid):
                p = graph.param_by_name[graph.relation_by_id[rid].param]
                return f"force-param-small: |theta|={p.type.size} <= {self.max_elems}"
            traces.extend(_split(graph, t, small, "param", why))
            for rid in small:
                ctx.note(self.name, f"{rid} ({graph.relation_by_id[rid].param}): io -> param")
        return graph.replace(traces=renumber_traces(traces))


@register_pass
@dataclass(frozen=True)
class DropFrozenPass(Pass):
    """Give the named parameters trace dim ``none`` (instantaneous gradient only).

    Raises:
        UnsupportedModelError: a name is not a trace parameter of the graph.
    """
    name = "drop-frozen"
    requires = frozenset({"trace-dims"})
    params: tuple = ()

    def run(self, graph, ctx):
        names = (self.params,) if isinstance(self.params, str) else tuple(self.params)
        known = {r.param for r in graph.relations}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UnsupportedModelError(
                f"drop-frozen names unknown trace parameter(s) {', '.join(map(repr, unknown))}; "
                f"trace parameters: {', '.join(sorted(known)) or '(none)'}")
        traces: list[Trace] = []
        for t in graph.traces:
            leave = [rid for rid in t.relations
                     if graph.relation_by_id[rid].param in names and t.dim != "none"]
            if not leave:
                traces.append(t)
                continue
            traces.extend(_split(graph, t, leave, "none",
                                 lambda rid: "drop-frozen: instantaneous gradient only"))
            for rid in leave:
                ctx.note(self.name, f"{rid} ({graph.relation_by_id[rid].param}): "
                                    f"{t.dim} -> none")
        return graph.replace(traces=renumber_traces(traces))
