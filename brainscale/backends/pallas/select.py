"""Pass ``pallas-select``: which path each trace takes in the Pallas backend, and why.

The Pallas backend never changes the IR; this pass (returned by ``PallasBackend.pipeline()``)
records its per-trace decisions as trace attributes, so they show in every dump:

* ``path=pallas`` (compiled Triton), ``path=pallas-interpret`` (the kernel in interpret
  mode, no usable GPU) or ``jax``, and the note ``path_reason=...`` — the kernels cannot
  handle the trace (op kind, layout, dtype, shape), or the cost model says XLA is as fast
  for its size;
* a kernel-path trace is laid out again: its arrays are stored in ``trace_dtype`` (math is
  float32) and the weight leaf keeps its k states stacked, ``(B, I, O, k)``, as the kernel
  reads them; the bias leaves stay one array per state;
* the note ``launch=L0[,L1]`` — kernel launch group per (relation, group): equal-shaped
  traces of one step share a launch (:func:`launch_groups`, which the rule uses too).

The graph gets the notes ``pallas_mode=gpu|interpret`` and ``pallas_scheme=learner|fused``.
It runs after ``layout-traces`` (it needs the arrays).
"""
from __future__ import annotations

from dataclasses import dataclass, replace as dc_replace

import jax.numpy as jnp

from ...errors import PipelineError
from ...ir import attrs as mk_attrs
from ...passes.base import Pass, register_pass
from ...passes.layout import layout_trace
from ..rules import plain_matmul_error
from ._common import SUPPORTED_STORAGE, platform
from .cost_model import load_cost_model
from .drtrl import drtrl_plan

__all__ = ["PallasSelectPass", "KernelInstance", "kernel_instances", "unsupported_traces",
           "launch_groups", "weight_leaf", "KERNEL_PATHS"]

#: the trace paths the Pallas kernels run (compiled / interpret mode)
KERNEL_PATHS = ("pallas", "pallas-interpret")


@dataclass(frozen=True)
class KernelInstance:
    """One (relation, group) of a param-dim trace as the D-RTRL kernel sees it."""
    trace: str
    rid: str
    gid: str
    B: int          # 1 for unbatched traces
    I: int
    O: int
    k: int
    dtype: str      # the parameter's dtype (the JAX path's storage)


def weight_leaf(ptype):
    """``(leaf index, leaf name, TensorType)`` of the matmul weight in a parameter's leaves."""
    fields = getattr(ptype, "fields", None)
    if fields is None:
        return 0, "", ptype
    for i, (name, t) in enumerate(fields):
        if name.strip("[]'\"") == "weight":
            return i, name, t
    return None, None, None


def kernel_instances(graph, trace) -> tuple[list, str | None]:
    """The kernel instances of a param-dim trace, or ``([], reason)`` when unsupported."""
    if trace.dim != "param":
        return [], f"dim={trace.dim}"
    if trace.layout != "compact":
        return [], f"layout={trace.layout}: per-output-neuron traces have no kernel"
    batch = int(graph.batch or 0)
    out = []
    for rid in trace.relations:
        rel = graph.relation_by_id[rid]
        o = graph.op_by_name[rel.op]
        if o.kind != "dense":
            return [], f"op kind {o.kind!r}: the kernels cover dense matmul only"
        why = plain_matmul_error(graph.op_object(rel.op))
        if why:
            return [], f"{why}; the kernels cover the built-in MatMulOp"
        p = graph.param_by_name[rel.param]
        li, _, wt = weight_leaf(p.type)
        if wt is None or len(wt.shape) != 2:
            return [], "no 2-D weight leaf"
        if wt.dtype not in SUPPORTED_STORAGE:
            return [], f"weight dtype {wt.dtype}: the kernels take float32/bfloat16 only"
        I, O = wt.shape
        for gid in rel.groups:
            grp = graph.group_by_id[gid]
            vs = tuple(grp.varshape)
            bshape = vs[:1] if batch and vs and vs[0] == batch else ()
            if bshape and not o.batched:
                return [], ("an unbatched op input feeding batched states: the kernels take "
                            "one input row per example")
            ys = vs[len(bshape):]
            if ys != (O,):
                return [], f"neuron shape {list(ys)} of {gid} is not ({O},)"
            out.append(KernelInstance(trace.id, rid, gid, bshape[0] if bshape else 1, I, O,
                                      grp.num_state, wt.dtype))
    return out, None


def unsupported_traces(graph) -> tuple:
    """``((trace id, reason), ...)`` for param-dim traces the kernels cannot handle."""
    res = []
    for t in graph.traces:
        if t.dim == "param":
            _, why = kernel_instances(graph, t)
            if why:
                res.append((t.id, why))
    return tuple(res)


def launch_groups(graph, traces=None) -> dict:
    """``{(B, I, O, k, storage): [(trace id, relation, group), ...]}`` of the kernel-path
    traces (``traces``: those to consider, default all of the graph), in order: equal keys
    share one kernel launch."""
    out: dict = {}
    for t in (graph.traces if traces is None else traces):
        if t.path not in KERNEL_PATHS:
            continue
        inst, _ = kernel_instances(graph, t)
        wli = weight_leaf(graph.param_by_name[graph.relation_by_id[t.relations[0]].param].type)[0]
        storage = next((a.storage for a in t.arrays if a.leaf == wli), inst[0].dtype if inst
                       else "float32")
        for i in inst:
            out.setdefault((i.B, i.I, i.O, i.k, storage), []).append((t.id, i.rid, i.gid))
    return out


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:.3g}MB"


@register_pass
@dataclass(frozen=True)
class PallasSelectPass(Pass):
    """Choose the Pallas kernel or the JAX path per trace; record path, reason, storage."""
    name = "pallas-select"
    requires = frozenset({"trace-arrays"})
    provides = frozenset({"backend-paths"})
    select: str = "auto"            # 'auto' (cost model / interpret) | 'all' | 'none'
    trace_dtype: str = "float32"    # storage of kernel-path traces
    scheme: str = "learner"         # 'learner' (custom-VJP step) | 'fused' (one-pass driver)
    cost_model: str = ""            # '' built-in (or $BRAINSCALE_PALLAS_COST_MODEL), or a JSON
    min_bytes: float | None = None  # overrides the cost model's threshold
    interpret: bool | None = None   # None: interpret mode exactly when there is no usable GPU

    def run(self, graph, ctx):
        if self.select not in ("auto", "all", "none"):
            raise PipelineError(f"pallas-select: select must be 'auto', 'all' or 'none', "
                                f"got {self.select!r}")
        if self.trace_dtype not in SUPPORTED_STORAGE:
            raise PipelineError(f"pallas-select: trace_dtype must be one of {SUPPORTED_STORAGE}, "
                                f"got {self.trace_dtype!r}")
        if self.scheme not in ("learner", "fused"):
            raise PipelineError(f"pallas-select: scheme must be 'learner' or 'fused', "
                                f"got {self.scheme!r}")
        plat = platform()
        interp = plat.interpret if self.interpret is None else bool(self.interpret)
        model = load_cost_model(self.cost_model)
        thr = model.threshold(self.scheme) if self.min_bytes is None else float(self.min_bytes)
        itemsize = jnp.dtype(self.trace_dtype).itemsize
        kernel_path = "pallas-interpret" if interp else "pallas"
        new_traces = []
        for t in graph.traces:
            a = dict(t.attrs)
            path = "jax"
            if t.dim == "none":
                a.update(path_reason="dim=none: instantaneous gradient only")
            elif t.dim == "io":
                a.update(path_reason=(
                    "io-dim: the per-step ES-D-RTRL gradient is one XLA GEMM; windows of K "
                    "steps: pallas.fused_online_gradients(chunk=K)"))
            else:
                inst, why = kernel_instances(graph, t)
                nbytes = sum(i.B * i.I * i.O * i.k for i in inst) * itemsize
                pads = [i for i in inst if drtrl_plan(i.B, i.I, i.O, model.tiles_for(
                    self.trace_dtype))[3:] != (i.I, i.O)]
                if why:
                    path, reason = "jax", f"unsupported: {why}"
                elif self.select == "none":
                    path, reason = "jax", "select=none"
                elif self.select == "all":
                    path, reason = kernel_path, "select=all"
                elif interp:
                    path, reason = kernel_path, f"{plat.reason}; every supported trace takes the kernel"
                elif pads:
                    i = pads[0]
                    path, reason = "jax", (f"I={i.I}, O={i.O}: no power-of-two tile divides them, "
                                           f"the kernel would copy the trace to pad it")
                elif nbytes >= thr:
                    path, reason = kernel_path, (f"trace {_mb(nbytes)} >= {_mb(thr)} "
                                                 f"({self.scheme} scheme; {model.source})")
                else:
                    path, reason = "jax", (f"trace {_mb(nbytes)} < {_mb(thr)}: XLA is as fast "
                                           f"({self.scheme} scheme; {model.source})")
                if path != "jax" and interp and self.select != "auto":
                    reason += "; interpret mode"
                a.update(path_reason=reason)
                ctx.note(self.name, f"{t.id}: {path} — {reason}")
            t = dc_replace(t, path=path, attrs=mk_attrs(**a))
            if path in KERNEL_PATHS:
                wname = weight_leaf(graph.param_by_name[
                    graph.relation_by_id[t.relations[0]].param].type)[1]
                t = layout_trace(graph, t, storage=self.trace_dtype, stacked_leaves=(wname,))
            new_traces.append(t)
        graph = graph.replace(traces=tuple(new_traces))
        ids = {key: f"L{i}" for i, key in enumerate(launch_groups(graph))}
        launch_of: dict = {}
        for key, members in launch_groups(graph).items():
            for tid, _, _ in members:
                launch_of.setdefault(tid, []).append(ids[key])
        new_traces = [dc_replace(t, attrs=mk_attrs(**dict(t.attrs), launch=",".join(
            dict.fromkeys(launch_of[t.id])))) if t.id in launch_of else t for t in graph.traces]
        gattrs = dict(graph.attrs)
        gattrs.update(pallas_mode="interpret" if interp else "gpu", pallas_scheme=self.scheme)
        return graph.replace(traces=tuple(new_traces), attrs=mk_attrs(**gattrs))
