"""Pass ``select-dims``: param-dim (D-RTRL) or io-dim (ES-D-RTRL) per relation.

The cost model counts, per relation, the trace elements each choice keeps for one batch
(``B`` examples, ``k`` = total states of the groups the op reaches):

* param-dim, compact layout: ``B · |θ| · k``; channel layout (conv: per neuron, the kernel
  slice of its channel): ``B · |y| · |θ| · k / C``; dense (per-neuron) layout: ``B · |y| · |θ| · k``;
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

The other rule axes (docs/rules.md) are options too and become fields of every trace:
``recursion`` (jacobian | leak | none), ``scope`` (diagonal | group | coupled | sparse, with
``snap_n`` | block), ``signal`` (symmetric | random | modulatory | synthetic), ``filter`` (none | kappa |
kappa_out, with ``kappa``), ``schedule`` (step | window, with ``window`` | end) and ``readout``
(trace | step; left unset: ``step`` for the exact scopes ``coupled`` / ``sparse`` and
random projections, which read their influence through the step's VJP, else ``trace``);
``policy='random'``
gives rank-1 random-projection (UORO) traces. A non-diagonal scope or a random projection
keeps one trace per *parameter* (all its ops: the influence of a weight is the sum over its
uses) and prices the influence matrix over the hidden states it covers:
``scope=coupled`` (exact RTRL) costs ``B · N · |θ|`` for ``N`` hidden values per example.
Combinations that do not form a rule are a :class:`PipelineError` naming the axis.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PipelineError, UnsupportedModelError
from ..ir import Trace
from ..ir.layout import trace_arrays
from ..ir.nodes import INFLUENCE_SCOPES, TRACE_AXES
from ..ir.verify import axes_error
from .base import Pass, register_pass

__all__ = ["SelectDimsPass", "relation_costs", "decay_from"]


def decay_from(decay_or_rank) -> tuple[float, int | None]:
    """``(α, rank)`` from ``decay_or_rank``: a float in (0, 1) is α (rank None); an int
    r > 0 gives α = (r-1)/(r+1)."""
    if isinstance(decay_or_rank, (bool, np.bool_)):
        raise TypeError("decay_or_rank must be a float in (0, 1) or a positive int")
    if isinstance(decay_or_rank, (int, np.integer)):
        r = int(decay_or_rank)
        if r <= 0:
            raise ValueError(f"decay_or_rank as a rank must be a positive int, got {r}")
        return (r - 1) / (r + 1), r
    if isinstance(decay_or_rank, (float, np.floating)):
        a = float(decay_or_rank)
        if not 0.0 < a < 1.0:
            raise ValueError(f"decay_or_rank as a decay must lie in (0, 1), got {a}")
        return a, None
    raise TypeError(f"decay_or_rank must be a float in (0, 1) or a positive int, "
                    f"got {type(decay_or_rank).__name__}")


def relation_costs(graph, rel) -> dict:
    """Element/byte/FLOP counts of both choices for one relation.

    Bytes are those of the arrays :func:`~brainscale.ir.layout.trace_arrays` gives the
    relation alone (the op's exact param-dim layout; io-dim with its own ``ε_x``), so the
    cost model prices exactly what ``layout-traces`` allocates.
    """
    op = graph.op_by_name[rel.op]
    par = graph.param_by_name[rel.param]
    batch = max(int(graph.batch or 0), 1)
    k = sum(graph.group_by_id[g].num_state for g in rel.groups)
    theta = par.type.size
    y = int(np.prod(op.type.shape[1:] if op.batched else op.type.shape, dtype=np.int64))
    p_arr = trace_arrays(graph, Trace("T0", "param", (rel.id,), layout=op.layout))
    p_el, p_bytes = sum(a.type.size for a in p_arr), sum(a.nbytes for a in p_arr)
    if op.x is not None:
        xt = graph.value_by_name[op.x].type
        x = int(np.prod(xt.shape[1:] if op.batched else xt.shape, dtype=np.int64))
        io_arr = trace_arrays(graph, Trace("T0", "io", (rel.id,), shared_x=op.x, decay=0.5))
        io_el, io_bytes = sum(a.type.size for a in io_arr), sum(a.nbytes for a in io_arr)
    else:
        x, io_el, io_bytes = 0, None, None
    return dict(k=k, theta=theta, x=x, y=y, batch=batch, layout=op.layout,
                param_elems=p_el, param_bytes=p_bytes, io_elems=io_el, io_bytes=io_bytes,
                param_flops=3 * p_el,
                io_flops=None if io_el is None else 3 * io_el + 2 * batch * theta)


def _no_state_reason(graph) -> str:
    """Why an op output that reaches no hidden state keeps no trace."""
    if graph.cuts:    # it may reach states through a cut plain-weight map (cuts=[...])
        return ("output reaches no hidden state except through the cut plain-weight maps "
                "(cuts=[...]): instantaneous gradient only, exact for the model with the cuts")
    return "output reaches no hidden state: its instantaneous gradient is exact"


def with_group_outputs(graph, ctx, who: str, relations):
    """``graph`` with the output ``z`` of every group the relations reach proven and set
    (:mod:`.outputs`): a :class:`~brainscale.ir.Value` per output and ``HiddenGroup.output``
    naming it. Raises UnsupportedModelError for a group without one."""
    from ..ir import TensorType, Value
    from ..ir.nodes import replace as node_replace
    from .outputs import group_output, output_value_name
    values = list(graph.values)
    known = {v.name for v in values}
    groups = {g.id: g for g in graph.groups}
    for gid in dict.fromkeys(g for r in relations for g in r.groups):
        ei, var = group_output(graph, gid)
        name = output_value_name(gid)
        if name not in known:
            values.append(Value(name, TensorType.from_aval(var.aval), ei,
                                deps=tuple(groups[gid].states)))
            known.add(name)
        groups[gid] = node_replace(groups[gid], output=name)
        ctx.note(who, f"{gid}: output {name} (eqn {ei}) for filter=kappa_out")
    return graph.replace(values=tuple(values),
                         groups=tuple(groups[g.id] for g in graph.groups))


@register_pass
@dataclass(frozen=True)
class SelectDimsPass(Pass):
    """Choose io-dim or param-dim traces per relation from a memory cost model.

    Options: ``policy`` ('auto' | 'param' | 'io' | 'random'), ``param_ratio`` (auto only),
    ``memory_budget_mb``, ``overrides`` (``[param=dim;...]``) and the io-dim decay, as
    ``decay`` (α in (0, 1)) or ``rank`` (int r, α = (r-1)/(r+1)); the chosen α is a field of
    every io-dim trace (and of param-dim traces with ``recursion=leak``). The rule axes
    ``recursion``, ``scope``, ``signal``, ``filter``, ``schedule`` and their coefficients
    ``kappa``, ``snap_n``, ``window`` are fields of every trace the pass makes.
    """
    name = "select-dims"
    requires = frozenset({"relations"})
    provides = frozenset({"trace-dims"})
    policy: str = "auto"                  # 'auto' | 'param' | 'io'
    param_ratio: float = 1.0
    memory_budget_mb: float | None = None
    overrides: tuple = ()                 # (('param.path', 'param'|'io'|'none'), ...)
    decay: float | None = None            # alpha of io-dim traces
    rank: int | None = None               # or the rank it comes from
    recursion: str = "jacobian"           # the rule axes (docs/rules.md)
    scope: str = "diagonal"
    signal: str = "symmetric"
    filter: str = "none"
    schedule: str = "step"
    kappa: float | None = None
    snap_n: int | None = None
    window: int | None = None
    readout: str | None = None            # None: 'step' for coupled / sparse / random

    def axes(self) -> dict:
        """The rule axes every trace gets (typed as the Trace fields want them)."""
        out = {k: getattr(self, k) for k in TRACE_AXES}
        if self.readout is None:
            exact = self.scope in ("coupled", "sparse") or self.policy == "random"
            out["readout"] = "step" if exact else "trace"
        out["kappa"] = None if self.kappa is None else float(self.kappa)
        out["snap_n"], out["window"] = self.snap_n, self.window
        return out

    def check_axes(self, alpha) -> None:
        """The option combination forms a rule (else a PipelineError naming the axis)."""
        ax = self.axes()
        for k, legal in TRACE_AXES.items():
            if ax[k] not in legal:
                raise PipelineError(f"select-dims: {k} must be one of {', '.join(legal)}, got "
                                    f"{ax[k]!r}")
        non_diag = self.scope in INFLUENCE_SCOPES or self.policy == "random"
        if non_diag and self.policy not in ("param", "random"):
            raise PipelineError(
                f"select-dims{{scope={self.scope}}} keeps influence matrices, which are "
                f"per-parameter traces: it needs policy=param (or policy=random with "
                f"scope=coupled for UORO), not policy={self.policy}")
        for dim in (("random",) if self.policy == "random" else ("param",) if non_diag
                    else ("param", "io") if self.policy == "auto" else (self.policy,)):
            decayed = self.recursion == "leak" or (dim == "io" and self.recursion != "none")
            layout = None if dim != "param" else "dense" if non_diag else "compact"
            probe = Trace("T0", dim, ("R0",), layout=layout,
                          decay=alpha if decayed else None, **ax)
            why = axes_error(probe)
            if why:
                if dim == "io" and self.policy == "auto":
                    why += " (policy=auto may choose io-dim traces: use policy=param)"
                raise PipelineError(f"select-dims: {why}")

    def alpha(self) -> tuple[float | None, int | None]:
        """``(α, rank)`` of the io-dim traces from the ``decay`` / ``rank`` options."""
        if self.decay is not None and self.rank is not None:
            raise PipelineError(f"select-dims: give decay or rank, not both (decay={self.decay}, "
                                f"rank={self.rank})")
        try:
            if self.rank is not None:
                if isinstance(self.rank, float) and float(self.rank).is_integer():
                    return decay_from(int(self.rank))
                if not isinstance(self.rank, (int, np.integer)):
                    raise TypeError(f"rank must be a positive int, got {self.rank!r}")
                return decay_from(int(self.rank))
            if self.decay is not None:
                return decay_from(float(self.decay))
        except (TypeError, ValueError) as e:
            raise PipelineError(f"select-dims: {e}") from None
        return None, None

    def override_map(self) -> dict:
        over = dict(tuple(o.split("=", 1)) if isinstance(o, str) else tuple(o)
                    for o in self.overrides)
        for name, v in over.items():
            if v not in ("param", "io", "none"):
                raise PipelineError(f"dim override for {name!r} must be 'param', 'io' or "
                                    f"'none', got {v!r}")
        return over

    def run(self, graph, ctx):
        if self.policy not in ("auto", "param", "io", "random"):
            raise PipelineError(f"select-dims policy must be 'auto', 'param', 'io' or 'random', "
                                f"got {self.policy!r}")
        alpha, rank = self.alpha()
        if self.recursion == "leak" and alpha is None:
            raise PipelineError("select-dims{recursion=leak} replaces J by a scalar leak alpha: "
                                "give it with decay=... (or rank=...), e.g. "
                                "select-dims{recursion=leak,decay=0.9}")
        self.check_axes(alpha if alpha is not None else 0.5)
        if self.scope in INFLUENCE_SCOPES or self.policy == "random":
            return self._run_influence(graph, ctx, alpha)
        over = self.override_map()
        for name in over:
            if name not in graph.param_by_name:
                raise UnsupportedModelError(
                    f"dim override names unknown parameter {name!r}; parameters: "
                    f"{', '.join(p.name for p in graph.params if p.kind == 'etrace')}")
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
                    if via else _no_state_reason(graph))
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
            elif self.policy == "random":
                dim, why = "param", "policy=random"          # not reached (_run_influence)
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
        io_rels = [ch[0] for ch in choices if ch[1] == "io"]
        if io_rels and alpha is None and self.recursion != "none":
            raise PipelineError(
                f"select-dims chose io-dim (ES-D-RTRL) traces for "
                f"{', '.join(f'{r.id} (%{r.param})' for r in io_rels)} but has no decay alpha: "
                f"pass decay_or_rank=... to the algorithm (e.g. 0.99 or a rank such as 100), "
                f"or select-dims{{decay=0.99}} / select-dims{{rank=100}}")
        traces = []
        axes = self.axes()
        if any(ch[1] == "io" for ch in choices) and self.filter in ("kappa", "kappa_out"):
            raise PipelineError(
                f"select-dims: filter={self.filter} low-pass filters per-parameter traces, but "
                f"{', '.join(ch[0].id for ch in choices if ch[1] == 'io')} got io-dim: use "
                f"policy=param")
        for i, (rel, dim, why, c) in enumerate(choices):
            op = graph.op_by_name[rel.op]
            fields: dict = {}
            if dim == "param":
                fields["layout"] = op.layout
                if self.recursion == "leak":
                    fields["decay"] = alpha
            elif dim == "io":
                if self.recursion != "none":
                    fields.update(decay=alpha, decay_rank=rank)
                fields["shared_x"] = op.x
            if dim != "none":
                fields.update(axes)
            traces.append(Trace(f"T{i}", dim, (rel.id,), attrs=(("reason", why),), **fields))
            ctx.note(self.name, f"{rel.id} ({rel.param}): {dim} — {why}")
        graph = graph.replace(traces=tuple(traces))
        if self.filter == "kappa_out":
            graph = with_group_outputs(graph, ctx, self.name,
                                       [graph.relation_by_id[rid] for t in traces
                                        if t.dim == "param" for rid in t.relations])
        return graph

    def _run_influence(self, graph, ctx, alpha):
        """One trace per parameter with an influence matrix (scope group / coupled / sparse)
        or a rank-1 random projection of it (policy=random)."""
        over = self.override_map()
        for name in over:
            if name not in graph.param_by_name:
                raise UnsupportedModelError(
                    f"dim override names unknown parameter {name!r}; parameters: "
                    f"{', '.join(p.name for p in graph.params if p.kind == 'etrace')}")
            if over[name] not in ("none", "param" if self.policy == "param" else "random"):
                raise PipelineError(
                    f"dim override {name}={over[name]} under select-dims{{scope={self.scope}}}: "
                    f"a parameter either gets this rule's trace or none")
        dim = "random" if self.policy == "random" else "param"
        axes = self.axes()
        n_per = {g.id: int(np.prod(g.varshape, dtype=np.int64)) * g.num_state
                 for g in graph.groups}
        by_param: dict = {}
        for rel in graph.relations:
            by_param.setdefault(rel.param, []).append(rel)
        traces, total = [], 0
        for pname, rels in by_param.items():
            pa = dict(graph.param_by_name[pname].attrs)
            reach = any(r.groups for r in rels)
            via = any(dict(r.attrs).get("via_ops") for r in rels)
            ids = tuple(r.id for r in rels)
            if not pa.get("is_etrace", True):
                t_dim, why = "none", "is_etrace=False: instantaneous gradient"
            elif over.get(pname) == "none":
                t_dim, why = "none", "user override"
            elif self.scope == "group" and not reach:
                t_dim, why = "none", ("scope=group traces the groups a parameter's ops drive; "
                                      "its ops drive none: instantaneous gradient only")
            elif not reach and not via:
                t_dim, why = "none", _no_state_reason(graph)
            else:
                t_dim, why = dim, ""
            if t_dim == "none":
                for r in rels:
                    traces.append(Trace("T0", "none", (r.id,), attrs=(("reason", why),)))
                ctx.note(self.name, f"{', '.join(ids)} ({pname}): none — {why}")
                continue
            probe = Trace("T0", dim, ids, layout="dense" if dim == "param" else None, **axes)
            arr = trace_arrays(graph, probe)
            nbytes = sum(a.nbytes for a in arr)
            total += nbytes
            theta = graph.param_by_name[pname].type.size
            from ..ir.layout import influence_groups
            n = sum(n_per[g] for g in influence_groups(graph, probe))
            what = {"coupled": "exact RTRL", "group": "the groups its ops drive (OSTL)",
                    "sparse": f"SnAp-{self.snap_n} pattern, stored dense"}.get(self.scope, "")
            if dim == "random":
                why = (f"UORO rank-1 pair over {n} hidden values and |θ|={theta} per example: "
                       f"{nbytes}B (the exact influence would be {n * theta * 4}B)")
            else:
                why = (f"scope={self.scope} ({what}): dh/dθ over {n} hidden values x "
                       f"|θ|={theta} = {nbytes}B")
            traces.append(Trace("T0", dim, ids, layout="dense" if dim == "param" else None,
                                attrs=(("reason", why),), **axes))
            ctx.note(self.name, f"{', '.join(ids)} ({pname}): {dim} — {why}")
        if self.memory_budget_mb is not None and total > self.memory_budget_mb * 2 ** 20:
            raise UnsupportedModelError(
                f"the {self.scope} traces need {total / 2 ** 20:.3f} MB, above "
                f"memory_budget_mb={self.memory_budget_mb}: the influence matrix grows as "
                f"hidden values x parameters; use a diagonal scope (D-RTRL) or a smaller model")
        order = {r.id: i for i, r in enumerate(graph.relations)}
        traces.sort(key=lambda t: order[t.relations[0]])
        traces = [Trace(f"T{i}", t.dim, t.relations, layout=t.layout, attrs=t.attrs,
                        **({k: getattr(t, k) for k in axes} if t.dim != "none" else {}))
                  for i, t in enumerate(traces)]
        return graph.replace(traces=tuple(traces))
