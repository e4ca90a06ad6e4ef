"""Pass ``native-select``: which traces the native CPU D-RTRL kernel runs, and why.

Returned by ``NativeBackend.pipeline()``; it runs after ``layout-traces`` and records its
decisions in the IR, so ``learner.ir()`` shows them:

* ``path=native`` on every param-dim compact trace of built-in dense ``MatMulOp`` relations
  (what :func:`~..pallas.select.kernel_instances` accepts), laid out as the kernel reads it:
  storage ``trace_dtype`` (float32, or bfloat16: half the trace's memory and traffic,
  arithmetic in float32), the weight's k states stacked ``(B, I, O, k)``;
* ``path=native`` on every io-dim (ES-D-RTRL) trace whose relations are all built-in dense
  ``MatMulOp`` s with a float32 2-D weight, at sizes where the kernel is faster
  (``I·O ≥ 65536`` and at least 4 rows of ``ε_x``, i.e. examples, measured in
  ``benchmarks/README.md``; the pass options ``io_min_size`` / ``io_min_rows`` and the
  backend's of the same names change them): the step-owning loop (``online_gradients`` / ``train_online``)
  then adds each step's ``ε_xᵀ s`` into the gradient sum in place with the kernel's
  outer-accumulate (XLA's product + add reads the product back); the learner's own step
  computes the same gradient with XLA;
* ``path=jax`` with ``path_reason=...`` on every other trace (LoRA, sparse, conv,
  per-output-neuron layouts, small io-dim traces, traces off the default rule axes, ...),
  which the JAX rules run;
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
from ..pallas._common import SUPPORTED_STORAGE
from ..pallas.select import kernel_instances, weight_leaf
from ..rules import plain_matmul_error, rule_key
from .build import why_unavailable

__all__ = ["NativeSelectPass", "NATIVE_PATH", "io_native_error", "IO_MIN_SIZE",
           "IO_MIN_ROWS", "IO_JOIN_MIN_OUT"]

NATIVE_PATH = "native"
#: below these the XLA product + add is as fast as the kernel's outer-accumulate (I·O
#: elements of the weight; rows of ε_x, i.e. examples): benchmarks/README.md
IO_MIN_SIZE = 1 << 16
IO_MIN_ROWS = 4
#: a smaller io-dim trace joins the step's kernel call when its weights have at least this
#: many outputs (the kernel's register tile is 64 outputs wide; a narrower weight, e.g. a
#: read-out to 10 classes, runs 3x slower there than on XLA's product)
IO_JOIN_MIN_OUT = 64


def _io_outputs(graph, trace) -> int:
    """The fewest outputs O of the weights of an io-dim trace's relations."""
    return min(int(weight_leaf(graph.param_by_name[graph.relation_by_id[rid].param].type)[2]
                   .shape[-1]) for rid in trace.relations)


def io_native_error(graph, trace, min_size: int = 0, min_rows: int = 0) -> str | None:
    """None when the native outer-accumulate can add the per-step gradients of the io-dim
    ``trace`` (every relation a built-in dense ``MatMulOp`` with a float32 2-D weight, of at
    least ``min_size`` elements ``I·O``, and at least ``min_rows`` rows of ``ε_x``), else why
    not. ``native-select`` asks for the sizes where the kernel gains (:data:`IO_MIN_SIZE`,
    :data:`IO_MIN_ROWS` by default); the rule's own check for none."""
    if trace.dim != "io":
        return f"dim={trace.dim}"
    ex = next((a for a in trace.arrays if a.role == "eps_x"), None)
    if ex is None:
        return "no eps_x array"
    rows = 1
    for d in tuple(ex.type.shape)[:-1]:
        rows *= int(d)
    for rid in trace.relations:
        rel = graph.relation_by_id[rid]
        o = graph.op_by_name[rel.op]
        if o.kind != "dense":
            return f"op kind {o.kind!r}: the outer-accumulate covers dense matmul only"
        why = plain_matmul_error(graph.op_object(rel.op))
        if why:
            return f"{why}; the outer-accumulate covers the built-in MatMulOp"
        if not rel.groups:
            return f"relation {rid} drives no hidden group"
        _, _, wt = weight_leaf(graph.param_by_name[rel.param].type)
        if wt is None or len(wt.shape) != 2:
            return f"relation {rid}: no 2-D weight leaf"
        if str(wt.dtype) != "float32":
            return f"relation {rid}: weight dtype {wt.dtype}, the outer-accumulate adds float32"
        I, O = (int(d) for d in wt.shape)
        if I * O < min_size or rows < min_rows:
            return (f"small (I·O = {I}·{O}, {rows} rows of eps_x; the kernel gains from "
                    f"I·O ≥ {min_size} and ≥ {min_rows} rows): XLA's product is as fast")
    return None


@register_pass
@dataclass(frozen=True)
class NativeSelectPass(Pass):
    """Route the traces the native kernel supports to it; record path, reason, storage."""
    name = "native-select"
    requires = frozenset({"trace-arrays"})
    provides = frozenset({"backend-paths"})
    select: str = "all"             # 'all' (every supported trace) | 'none'
    trace_dtype: str = "float32"    # storage of native-path D-RTRL traces: float32 | bfloat16
    io_min_size: int = IO_MIN_SIZE  # io-dim traces take the outer-accumulate from I·O ...
    io_min_rows: int = IO_MIN_ROWS  # ... and this many rows of ε_x (examples) up

    def run(self, graph, ctx):
        if self.select not in ("all", "none"):
            raise PipelineError(f"native-select: select must be 'all' or 'none', "
                                f"got {self.select!r}")
        if self.trace_dtype not in SUPPORTED_STORAGE:
            raise PipelineError(f"native-select: trace_dtype must be "
                                f"{' or '.join(map(repr, SUPPORTED_STORAGE))}, "
                                f"got {self.trace_dtype!r}")
        # select='none' uses no kernel: it is not built for it
        why = why_unavailable() if self.select != "none" else None
        if why:
            raise PipelineError(f"native-select: {why}")
        # a small io-dim trace joins the kernel when another of the step takes it: its
        # product is then one more weight in the step's one outer-accumulate call
        # (``step_accumulate_multi``), where alone it would pay a call of its own
        io_bad = {t.id: io_native_error(graph, t, self.io_min_size, self.io_min_rows)
                  for t in graph.traces if t.dim == "io" and len(rule_key(t)) <= 3}
        io_big = self.select != "none" and any(v is None for v in io_bad.values())
        new_traces = []
        for t in graph.traces:
            a = dict(t.attrs)
            path = "jax"
            if t.dim == "none":
                reason = "dim=none: instantaneous gradient only"
            elif len(rule_key(t)) > 3:
                axes = ", ".join(f"{k}={v}" for k, v in rule_key(t)[3])
                reason = (f"rule axes {axes}: the native kernel runs the default D-RTRL rule "
                          f"(compact, diagonal, symmetric signal, read out from the trace)")
            elif t.dim == "io":
                bad = io_bad[t.id]
                if bad and io_big and io_native_error(graph, t) is None \
                        and _io_outputs(graph, t) >= IO_JOIN_MIN_OUT:
                    path, reason = NATIVE_PATH, (
                        f"native outer-accumulate, in the step's one call with the larger "
                        f"io-dim traces (alone: {bad})")
                elif bad:
                    reason = f"io-dim, {bad}"
                elif self.select == "none":
                    reason = "select=none"
                else:
                    path, reason = NATIVE_PATH, ("native outer-accumulate of the per-step "
                                                 "gradient in the step-owning loop")
            elif t.dim != "param":
                reason = f"dim={t.dim}: the native kernel runs param-dim D-RTRL and io-dim " \
                         f"ES-D-RTRL traces"
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
            if path == NATIVE_PATH and t.dim == "param":
                wname = weight_leaf(graph.param_by_name[
                    graph.relation_by_id[t.relations[0]].param].type)[1]
                t = layout_trace(graph, t, storage=self.trace_dtype, stacked_leaves=(wname,))
            new_traces.append(t)
        gattrs = dict(graph.attrs)
        gattrs.update(native="available" if self.select != "none" else "select=none")
        return graph.replace(traces=tuple(new_traces), attrs=mk_attrs(**gattrs))
