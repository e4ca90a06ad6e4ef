"""Pass ``native-select``: which traces the native CPU D-RTRL kernel runs, and why.

Returned by ``NativeBackend.pipeline()``; it runs after ``layout-traces`` and records its
decisions in the IR, so ``learner.ir()`` shows them:

* ``path=native`` on every param-dim compact trace of built-in dense ``MatMulOp`` relations
  (what :func:`~..pallas.select.kernel_instances` accepts), laid out as the kernel reads it:
  float32 storage, the weight's k states stacked ``(B, I, O, k)``;
* ``path=jax`` with ``path_reason=...`` on every other trace (io-dim, LoRA, sparse, conv,
  per-output-neuron layouts, traces off the default rule axes, ...), which the JAX rules
  run;
* the graph note ``native=available`` (``native=select=none`` with ``select='none'``).

``select='none'`` keeps every trace on the JAX rules (an A/B switch). The pass refuses to
run where the kernel cannot be built (no C++ compiler, a non-CPU default device): a learner
compiled for ``backend='native'`` never falls back silently.
"""
from __future__ import annotations

from dataclasses import dataclass, replace as dc_replace

from ...errors import PipelineError
from ...ir import attrs as mk_attrs
from ...passes.base import Pass, register_pass
from ...passes.layout import layout_trace
from ..pallas.select import kernel_instances, weight_leaf
from ..rules import rule_key
from .build import why_unavailable

__all__ = ["NativeSelectPass", "NATIVE_PATH"]

NATIVE_PATH = "native"


@register_pass
@dataclass(frozen=True)
class NativeSelectPass(Pass):
    """Route the traces the native kernel supports to it; record path, reason, storage."""
    name = "native-select"
    requires = frozenset({"trace-arrays"})
    provides = frozenset({"backend-paths"})
    select: str = "all"             # 'all' (every supported trace) | 'none'

    def run(self, graph, ctx):
        if self.select not in ("all", "none"):
            raise PipelineError(f"native-select: select must be 'all' or 'none', "
                                f"got {self.select!r}")
        # select='none' uses no kernel: it is not built for it
        why = why_unavailable() if self.select != "none" else None
        if why:
            raise PipelineError(f"native-select: {why}")
        new_traces = []
        for t in graph.traces:
            a = dict(t.attrs)
            path = "jax"
            if t.dim == "none":
                reason = "dim=none: instantaneous gradient only"
            elif t.dim != "param":
                reason = f"dim={t.dim}: the native kernel runs param-dim D-RTRL traces"
            elif len(rule_key(t)) > 3:
                axes = ", ".join(f"{k}={v}" for k, v in rule_key(t)[3])
                reason = (f"rule axes {axes}: the native kernel runs the default D-RTRL rule "
                          f"(compact, diagonal, symmetric signal, read out from the trace)")
            else:
                _, bad = kernel_instances(graph, t)
                if bad:
                    reason = f"unsupported: {bad}"
                elif self.select == "none":
                    reason = "select=none"
                else:
                    path, reason = NATIVE_PATH, "native CPU kernel (one pass per step)"
            a.update(path_reason=reason)
            ctx.note(self.name, f"{t.id}: {path} — {reason}")
            t = dc_replace(t, path=path, attrs=mk_attrs(**a))
            if path == NATIVE_PATH:
                wname = weight_leaf(graph.param_by_name[
                    graph.relation_by_id[t.relations[0]].param].type)[1]
                t = layout_trace(graph, t, storage="float32", stacked_leaves=(wname,))
            new_traces.append(t)
        gattrs = dict(graph.attrs)
        gattrs.update(native="available" if self.select != "none" else "select=none")
        return graph.replace(traces=tuple(new_traces), attrs=mk_attrs(**gattrs))
