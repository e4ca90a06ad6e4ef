"""Pass ``select-dims``: param-dim (D-RTRL) or io-dim (ES-D-RTRL) per relation.

The cost model counts, per relation, the trace elements each choice keeps for one batch
(``B`` examples, ``k`` = total states of the groups the op reaches):

* param-dim, compact layout: ``B · |θ| · k``; dense (per-neuron) layout: ``B · |y| · |θ| · k``;
* io-dim: ``B · (|x| + |y| · k)`` (``|x|`` is shared by every op reading the same input).

Bytes are elements × the element size; FLOPs per step are about 3 per param-dim element
(decay, outer-product add, gradient contraction) and ``3·(|x|+|y|k) + 2·B·|θ|`` for io-dim
(the gradient is a VJP of the op). ``policy='param'`` / ``'io'`` force a choice (ops without an
input, such as ``ElemWiseOp``, always take param-dim); ``policy='auto'`` (the hybrid
algorithm) takes param-dim when it costs at most ``param_ratio`` times the io-dim bytes. A
parameter's own ``ETraceGrad`` (``full`` / ``approx``) overrides the policy, and
``is_etrace=False`` gives an instantaneous gradient only. With ``memory_budget_mb`` the
largest param-dim traces move to io-dim until the total fits (an error if it never does).
Every decision and its reason appears in the dump.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PipelineError, UnsupportedModelError
from ..ir import TensorType, Trace, attrs
from .base import Pass, register_pass

__all__ = ["SelectDimsPass", "relation_costs"]


def relation_costs(graph, rel) -> dict:
    """Element/byte/FLOP counts of both choices for one relation."""
    op = graph.op_by_name[rel.op]
    par = graph.param_by_name[rel.param]
    batch = max(int(graph.attr("batch", 0) or 0), 1)
    k = sum(graph.group_by_id[g].num_state for g in rel.groups)
    theta = par.type.size
    y = int(np.prod(op.type.shape[1:] if op.batched else op.type.shape, dtype=np.int64))
    layout = dict(op.attrs).get("layout", "compact")
    itemsize = np.dtype(op.type.dtype).itemsize
    p_el = batch * theta * k * (y if layout == "dense" else 1)
    if op.x is not None:
        xt = graph.value_by_name[op.x].type
        x = int(np.prod(xt.shape[1:] if op.batched else xt.shape, dtype=np.int64))
        io_el = batch * (x + y * k)
    else:
        x, io_el = 0, None
    return dict(k=k, theta=theta, x=x, y=y, batch=batch, layout=layout, itemsize=itemsize,
                param_elems=p_el, param_bytes=p_el * itemsize,
                io_elems=io_el, io_bytes=None if io_el is None else io_el * itemsize,
                param_flops=3 * p_el,
                io_flops=None if io_el is None else 3 * io_el + 2 * batch * theta)


def _shapes(graph, rel, dim, c) -> tuple[TensorType, ...]:
    op = graph.op_by_name[rel.op]
    par = graph.param_by_name[rel.param]
    dt = op.type.dtype
    b = (c["batch"],) if op.batched or graph.attr("batch", 0) else ()
    out = []
    if dim == "param":
        for gid in rel.groups:
            k = graph.group_by_id[gid].num_state
            for leaf in getattr(par.type, "leaves", (par.type,)):
                if c["layout"] == "dense":
                    yshape = tuple(op.type.shape[1:] if op.batched else op.type.shape)
                    out.append(TensorType(b + yshape + (k,) + leaf.shape, dt))
                else:
                    out.append(TensorType(b + leaf.shape + (k,), dt))
    elif dim == "io":
        xt = graph.value_by_name[op.x].type
        if not np.issubdtype(np.dtype(xt.dtype), np.inexact):   # ε_x of spikes is real-valued
            xt = TensorType(xt.shape, dt)
        out.append(xt)
        for gid in rel.groups:
            g = graph.group_by_id[gid]
            out.append(TensorType(tuple(g.varshape) + (g.num_state,), dt))
    return tuple(out)


@register_pass
@dataclass(frozen=True)
class SelectDimsPass(Pass):
    """Choose io-dim or param-dim traces per relation from a memory cost model."""
    name = "select-dims"
    requires = frozenset({"relations"})
    provides = frozenset({"trace-dims"})
    policy: str = "auto"                  # 'auto' | 'param' | 'io'
    param_ratio: float = 1.0
    memory_budget_mb: float | None = None
    overrides: tuple = ()                 # (('param.path', 'param'|'io'|'none'), ...)

    def run(self, graph, ctx):
        if self.policy not in ("auto", "param", "io"):
            raise PipelineError(f"select-dims policy must be 'auto', 'param' or 'io', "
                                f"got {self.policy!r}")
        over = dict(tuple(o.split("=", 1)) if isinstance(o, str) else o for o in self.overrides)
        over.update(ctx.options.get("dim_overrides", {}))
        for name, v in over.items():
            if name not in graph.param_by_name:
                raise UnsupportedModelError(
                    f"dim override names unknown parameter {name!r}; parameters: "
                    f"{', '.join(p.name for p in graph.params if p.kind == 'etrace')}")
            if v not in ("param", "io", "none"):
                raise PipelineError(f"dim override for {name!r} must be 'param', 'io' or "
                                    f"'none', got {v!r}")
        choices = []
        for rel in graph.relations:
            c = relation_costs(graph, rel)
            par = graph.param_by_name[rel.param]
            pa = dict(par.attrs)
            op = graph.op_by_name[rel.op]
            if not rel.groups:
                via = dict(rel.attrs).get("via_ops")
                dim, why = "none", (
                    f"output reaches hidden states only through the input of trace op(s) "
                    f"{', '.join(via)}: instantaneous gradient only, no temporal credit"
                    if via else "output reaches no hidden state: its instantaneous gradient "
                                "is exact")
            elif not pa.get("is_etrace", True):
                dim, why = "none", "is_etrace=False: instantaneous gradient"
            elif rel.param in over:
                dim, why = over[rel.param], "user override"
            elif pa.get("grad") == "full":
                dim, why = "param", "ETraceGrad.full"
            elif pa.get("grad") == "approx":
                dim, why = "io", "ETraceGrad.approx"
            elif self.policy == "param":
                dim, why = "param", "policy=param (D-RTRL)"
            elif self.policy == "io":
                dim, why = "io", "policy=io (ES-D-RTRL)"
            elif c["io_bytes"] is None:
                dim, why = "param", "no op input"
            elif c["param_bytes"] <= self.param_ratio * c["io_bytes"]:
                dim, why = "param", (f"param {c['param_bytes']}B <= io {c['io_bytes']}B "
                                     f"(flops/step {c['param_flops']} vs {c['io_flops']})")
            else:
                dim, why = "io", (f"io {c['io_bytes']}B < param {c['param_bytes']}B "
                                  f"(flops/step {c['io_flops']} vs {c['param_flops']})")
            if dim == "io" and op.x is None:
                dim, why = "param", why + "; op has no input x, so param-dim"
            choices.append([rel, dim, why, c])
        if self.memory_budget_mb is not None:
            budget = self.memory_budget_mb * 2 ** 20

            def total():
                return sum(ch[3]["param_bytes"] if ch[1] == "param" else
                           (ch[3]["io_bytes"] or 0) if ch[1] == "io" else 0 for ch in choices)
            movable = sorted((ch for ch in choices if ch[1] == "param" and ch[3]["io_bytes"]
                              is not None and ch[0].param not in over),
                             key=lambda ch: -ch[3]["param_bytes"])
            for ch in movable:
                if total() <= budget:
                    break
                ch[1], ch[2] = "io", f"memory budget {self.memory_budget_mb} MB"
            if total() > budget:
                raise UnsupportedModelError(
                    f"the traces need {total() / 2 ** 20:.3f} MB even with io-dim wherever "
                    f"possible, above memory_budget_mb={self.memory_budget_mb}")
        traces = []
        for i, (rel, dim, why, c) in enumerate(choices):
            cost = c["param_bytes"] if dim == "param" else (c["io_bytes"] if dim == "io" else 0)
            a = dict(reason=why, bytes=int(cost))
            if dim == "param":
                a["layout"] = c["layout"]
            traces.append(Trace(f"T{i}", dim, (rel.id,), _shapes(graph, rel, dim, c), attrs(**a)))
            ctx.note(self.name, f"{rel.id} ({rel.param}): {dim} — {why}")
        return graph.replace(traces=tuple(traces))
