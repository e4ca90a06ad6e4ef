"""Pass ``pallas-select``: which path each trace takes in the Pallas backend, and why.

The Pallas backend never changes the IR; this pass (returned by ``PallasBackend.pipeline()``)
records its per-trace decisions as trace attributes, so they show in every dump:

* ``path=pallas|jax`` and ``path_reason=...`` — the kernels cannot handle the trace (op kind,
  layout, dtype, shape), or the cost model says XLA is as fast for its size, or interpret mode;
* ``storage=float32|bfloat16`` — the storage dtype of a kernel-path trace (math is float32);
* ``launch=L0[,L1]`` — kernel launch group per (relation, group): equal-shaped traces of one
  step share a launch.

The graph gets ``pallas_mode=gpu|interpret`` and ``pallas_scheme=learner|fused``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import jax.numpy as jnp

from ...concepts import MARKER_PREFIX, lookup_op
from ...errors import PipelineError
from ...ir import attrs as mk_attrs
from ...passes.base import Pass, register_pass
from ._common import SUPPORTED_STORAGE, platform
from .cost_model import load_cost_model
from .drtrl import drtrl_plan

__all__ = ["PallasSelectPass", "KernelInstance", "kernel_instances", "unsupported_traces"]


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


def _matmul_ok(op) -> str | None:
    from ...ops import MatMulOp
    if not isinstance(op, MatMulOp):
        return f"op class {type(op).__name__}: the kernels cover MatMulOp only"
    for meth in ("xw_to_y", "drtrl_update", "drtrl_grad", "effective_weight", "_chain"):
        if getattr(type(op), meth) is not getattr(MatMulOp, meth):
            return f"{type(op).__name__} overrides MatMulOp.{meth}"
    return None


def chain_is_one(op) -> bool:
    """True when ``∂W_eff/∂W`` is 1 (no mask, the default identity ``weight_fn``)."""
    from ...ops import MatMulOp
    default = inspect.signature(MatMulOp.__init__).parameters["weight_fn"].default
    return op.weight_mask is None and op.weight_fn is default


def _weight_leaf(ptype):
    """``(leaf index, TensorType)`` of the matmul weight in the parameter's leaves."""
    fields = getattr(ptype, "fields", None)
    if fields is None:
        return 0, ptype
    for i, (name, t) in enumerate(fields):
        if name.strip("[]'\"") == "weight":
            return i, t
    return None, None


def kernel_instances(graph, trace) -> tuple[list, str | None]:
    """The kernel instances of a param-dim trace, or ``([], reason)`` when unsupported."""
    if trace.dim != "param":
        return [], f"dim={trace.dim}"
    if trace.attr("layout", "compact") != "compact":
        return [], f"layout={trace.attr('layout')}: dense per-output-neuron traces have no kernel"
    batch = int(graph.attr("batch", 0) or 0)
    out = []
    for rid in trace.relations:
        rel = graph.relation_by_id[rid]
        o = graph.op_by_name[rel.op]
        if o.kind != "dense":
            return [], f"op kind {o.kind!r}: the kernels cover dense matmul only"
        op = lookup_op(f"{MARKER_PREFIX}{o.op_id}")
        if op is None:
            return [], "the op object no longer exists"
        why = _matmul_ok(op)
        if why:
            return [], why
        p = graph.param_by_name[rel.param]
        li, wt = _weight_leaf(p.type)
        if wt is None or len(wt.shape) != 2:
            return [], "no 2-D weight leaf"
        if wt.dtype not in SUPPORTED_STORAGE:
            return [], f"weight dtype {wt.dtype}: the kernels take float32/bfloat16 only"
        I, O = wt.shape
        for gid in rel.groups:
            grp = graph.group_by_id[gid]
            vs = tuple(grp.varshape)
            bshape = vs[:1] if batch and vs and vs[0] == batch else ()
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


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:.3g}MB"


@register_pass
@dataclass(frozen=True)
class PallasSelectPass(Pass):
    """Choose the Pallas kernel or the JAX path per trace; record path, reason, storage."""
    name = "pallas-select"
    requires = frozenset({"trace-dims"})
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
        launches: dict = {}
        new_traces = []
        for t in graph.traces:
            a = dict(t.attrs)
            if t.dim == "none":
                a.update(path="jax", path_reason="dim=none: instantaneous gradient only")
            elif t.dim == "io":
                a.update(path="jax", path_reason=(
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
                    path, reason = "pallas", "select=all"
                elif interp:
                    path, reason = "pallas", f"{plat.reason}; every supported trace takes the kernel"
                elif pads:
                    i = pads[0]
                    path, reason = "jax", (f"I={i.I}, O={i.O}: no power-of-two tile divides them, "
                                           f"the kernel would copy the trace to pad it")
                elif nbytes >= thr:
                    path, reason = "pallas", (f"trace {_mb(nbytes)} >= {_mb(thr)} "
                                              f"({self.scheme} scheme; {model.source})")
                else:
                    path, reason = "jax", (f"trace {_mb(nbytes)} < {_mb(thr)}: XLA is as fast "
                                           f"({self.scheme} scheme; {model.source})")
                if path == "pallas" and interp and self.select != "auto":
                    reason += "; interpret mode"
                a.update(path=path, path_reason=reason)
                if path == "pallas":
                    a["storage"] = self.trace_dtype
                    ids = []
                    for i in inst:
                        key = (i.B, i.I, i.O, i.k, self.trace_dtype)
                        launches.setdefault(key, f"L{len(launches)}")
                        ids.append(launches[key])
                    a["launch"] = ",".join(dict.fromkeys(ids))
                ctx.note(self.name, f"{t.id}: {path} — {reason}")
            new_traces.append(type(t)(t.id, t.dim, t.relations, t.shapes, mk_attrs(**a)))
        gattrs = dict(graph.attrs)
        gattrs.update(pallas_mode="interpret" if interp else "gpu", pallas_scheme=self.scheme)
        return graph.replace(traces=tuple(new_traces), attrs=mk_attrs(**gattrs))
