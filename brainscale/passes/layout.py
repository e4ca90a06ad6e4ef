"""Pass ``layout-traces`` and the helpers every pass uses to build consistent traces.

``layout-traces`` (last in the default pipeline) turns each :class:`~brainscale.ir.Trace`
into the typed arrays the compiled step allocates (:class:`~brainscale.ir.TraceArray`, see
:mod:`brainscale.ir.layout` for their types). After it the printed IR lists every array;
the backends allocate exactly those, in their storage dtype, and run the rule of the
trace's ``(dim, layout, path)``.

A pass that changes a trace after ``layout-traces`` must lay it out again
(:func:`layout_trace`), or the verifier rejects the graph naming the trace; :func:`retrace`
builds a trace over some relations with a given dim and lays it out when the graph already
has arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, replace as dc_replace

from ..errors import PipelineError
from ..ir import Trace
from ..ir.layout import FLOAT_STORAGE, trace_arrays
from .base import Pass, register_pass

__all__ = ["LayoutTracesPass", "trace_arrays", "layout_trace", "retrace", "renumber_traces"]


def layout_trace(graph, trace: Trace, **options) -> Trace:
    """``trace`` with its arrays computed by :func:`~brainscale.ir.layout.trace_arrays`
    (``options``: ``storage``, ``split_states``, ``stacked_leaves``, ``pack_pairs``)."""
    return dc_replace(trace, arrays=trace_arrays(graph, trace, **options))


def _common_decay(graph, relation_ids, decay, decay_rank):
    if decay is not None:
        return float(decay), decay_rank
    old = {(t.decay, t.decay_rank) for rid in relation_ids
           for t in [graph.trace_of_relation.get(rid)] if t is not None and t.dim == "io"}
    if not old:
        old = {(t.decay, t.decay_rank) for t in graph.traces if t.dim == "io"}
    if len(old) == 1:
        return next(iter(old))
    raise PipelineError(f"an io-dim trace over {', '.join(relation_ids)} needs a decay alpha: "
                        f"pass decay=... to retrace (the graph has "
                        f"{'no io-dim trace to take it from' if not old else 'several'})")


def retrace(graph, relation_ids, dim: str, reason: str, *, decay: float | None = None,
            decay_rank: int | None = None, layout: str | None = None,
            extra_attrs: dict | None = None) -> Trace:
    """A consistent :class:`Trace` of ``dim`` over ``relation_ids`` (id ``T0``: renumber
    later with :func:`renumber_traces`).

    param-dim traces take the ops' exact layout (``compact`` or ``channel`` when every op has
    it, else ``dense``)
    unless ``layout`` is given; io-dim traces share the ``ε_x`` of the ops' one input and take
    ``decay`` (default: the α the relations' current io trace has, else the graph's single α).
    When the graph already has arrays (``layout-traces`` ran), the trace is laid out.

    Args:
        graph: the graph the relations belong to.
        relation_ids: the relations the trace covers (io-dim ones must read the same input).
        dim: ``'param'``, ``'io'`` or ``'none'``.
        reason: why the trace has this dim (shown in dumps and reports).
        decay, decay_rank: io-dim α (and the rank it came from).
        layout: param-dim layout (``'compact'`` / ``'channel'`` / ``'dense'``).
        extra_attrs: further note attributes.

    Returns:
        The new trace.
    """
    rels = [graph.relation_by_id[r] for r in relation_ids]
    ops = [graph.op_by_name[r.op] for r in rels]
    a = dict(extra_attrs or {})
    a["reason"] = reason
    fields: dict = {}
    if dim == "param":
        fields["layout"] = layout or next(
            (lay for lay in ("compact", "channel") if all(o.layout == lay for o in ops)),
            "dense")
    elif dim == "io":
        xs = {o.x for o in ops}
        if len(xs) != 1 or None in xs:
            raise PipelineError(f"an io-dim trace over {', '.join(relation_ids)} needs one "
                                f"shared op input, got {sorted(map(str, xs))}")
        fields["shared_x"] = xs.pop()
        fields["decay"], fields["decay_rank"] = _common_decay(graph, relation_ids, decay,
                                                              decay_rank)
    elif dim != "none":
        raise PipelineError(f"trace dim must be 'param', 'io' or 'none', got {dim!r}")
    t = Trace("T0", dim, tuple(relation_ids), attrs=tuple(sorted(a.items())), **fields)
    if "trace-arrays" in graph.facts:
        t = layout_trace(graph, t)
    return t


def renumber_traces(traces) -> tuple[Trace, ...]:
    """Give traces the ids ``T0, T1, ...`` in their order (their arrays follow)."""
    out = []
    for i, t in enumerate(traces):
        tid = f"T{i}"
        arrays = tuple(dc_replace(a, id=f"{tid}.{j}") for j, a in enumerate(t.arrays))
        out.append(dc_replace(t, id=tid, arrays=arrays))
    return tuple(out)


@register_pass
@dataclass(frozen=True)
class LayoutTracesPass(Pass):
    """Lay out every trace as typed arrays (what the compiled step allocates).

    Options: ``storage`` stores every array in that dtype (math stays in the array's type,
    e.g. ``layout-traces{storage=bfloat16}``); ``split_states=false`` keeps the k states of a
    param-dim trace stacked in one array instead of one array per state; ``pack_pairs``
    (default on) keeps the 2 states of a compact trace of a 2-state group in one complex
    array (printed ``storage=c64``), which the update rewrites in place.
    """
    name = "layout-traces"
    requires = frozenset({"trace-dims"})
    provides = frozenset({"trace-arrays"})
    storage: str | None = None
    split_states: bool = True
    pack_pairs: bool = True

    def run(self, graph, ctx):
        if self.storage is not None and self.storage not in FLOAT_STORAGE:
            raise PipelineError(f"layout-traces: storage must be one of "
                                f"{', '.join(FLOAT_STORAGE)}, got {self.storage!r}")
        traces = tuple(layout_trace(graph, t, storage=self.storage,
                                    split_states=bool(self.split_states),
                                    pack_pairs=bool(self.pack_pairs))
                       for t in graph.traces)
        n = sum(len(t.arrays) for t in traces)
        total = sum(t.nbytes for t in traces)
        ctx.note(self.name, f"{n} array(s), {total} B in {len(traces)} trace(s)")
        return graph.replace(traces=traces)
