"""Pass ``absorb-normalization``: a normalisation between a trace op and the neurons.

A model such as ``Linear → LayerNorm → LIF`` mixes neurons between the op output ``y`` and
the hidden states (the statistics of ``y``), which the element-wise model class of
algorithms.md excludes. When the equations after an op that mix neurons depend on nothing
but that op's output (and constants) — a parameter-free normalisation, a fixed projection —
they are *absorbed*: the op and these equations become one composite op
``z = g(op(x, θ))`` whose output reaches the neurons element-wise again. The rewrite is a new
marker equation in place of the old one, and the IR shows the composite op
(``class=MatMulOp+norm``, ``absorbed=[...]``, ``stats=...``).

``stats='exact'`` (the default): ``∂z/∂θ`` is taken through the statistics. The composite has
no parameter-shaped trace (every weight reaches every output through the statistics), so its
param-dim trace is the exact per-output-neuron one (``layout=dense``, priced by
``select-dims``); D-RTRL stays exact on a single layer without recurrent weights.

``stats='constant'``: the common approximation that treats the statistics as constants
(``stop_gradient`` on every input of a mixing equation); ``z_n`` then depends on ``y_n``
alone, the op keeps its compact layout and its fused rules, with ``df`` scaled by
``∂z_n/∂y_n``.

Equations that also read a parameter or a hidden state (the affine scale and shift of a
LayerNorm, a residual) end the absorbed region: they stay element-wise and are handled as
usual. A region with more than one output used later, or the op output itself used outside
it, is left alone (the ``relations`` pass then reports the mixing path).
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from types import MappingProxyType

import brainunit as u
import jax
import jax.numpy as jnp

from .. import _compat as C
from ..concepts import ETraceOp, param_jacobian
from ..errors import PipelineError
from .base import Pass, register_pass
from .rules import Dep, _run

__all__ = ["AbsorbNormalizationPass", "NormalizedOp", "STATS"]

STATS = ("exact", "constant")


class NormalizedOp(ETraceOp):
    """``z = g(op(x, θ))``: a trace op followed by absorbed equations ``g`` (see the module
    docstring). Built by the ``absorb-normalization`` pass, not by users."""

    def __init__(self, base: ETraceOp, eqns: tuple, consts: dict, y_var, z_var,
                 mixing: frozenset, stats: str):
        self.base = base
        self._eqns, self._consts = eqns, consts
        self._y, self._z, self._mixing = y_var, z_var, mixing
        self.stats = stats
        self.x_ndim = base.x_ndim
        self.kind = base.kind
        self.param_trace = "dense" if stats == "exact" else base.param_trace
        super().__init__(base.is_diagonal)

    # -- the math ------------------------------------------------------------------------
    def region(self, y, constant_stats: bool | None = None):
        """``g(y)``; with constant statistics every mixing equation reads stopped gradients."""
        const = self.stats == "constant" if constant_stats is None else constant_stats
        env = dict(self._consts)
        env[self._y] = y

        def rd(v):
            return C.literal_value(v) if C.is_literal(v) else env[v]
        for i, e in enumerate(self._eqns):
            ins = [rd(v) for v in e.invars]
            if const and i in self._mixing:
                ins = [jax.lax.stop_gradient(v) for v in ins]
            for v, o in zip(e.outvars, C.eval_eqn(e, ins)):
                env[v] = o
        return env[self._z]

    def xw_to_y(self, x, w):
        return self.region(u.get_mantissa(self.base.xw_to_y(x, w)))

    def yw_to_w(self, y, w):
        if self.stats != "constant":
            raise NotImplementedError(
                "the composite op of an absorbed normalisation with exact statistics has no "
                "compact param-dim layout (every weight reaches every output through the "
                "statistics); its D-RTRL trace is the dense per-output-neuron one")
        return self.base.yw_to_w(y, w)

    def compact_layout_error(self, w):
        if self.stats != "constant":
            return "the absorbed normalisation mixes the op's outputs (exact statistics)"
        return self.base.compact_layout_error(w)

    def elementwise_maps(self, w):
        return self.base.elementwise_maps(w) if self.stats == "constant" else ()

    def channel_axes(self, w):
        """Constant statistics keep the base op's channels (``g`` is element-wise in y)."""
        if self.stats != "constant" or \
                tuple(self._z.aval.shape) != tuple(self._y.aval.shape):
            return None
        return self.base.channel_axes(w)

    def channel_layout_error(self, w):
        if self.stats != "constant":
            return "the absorbed normalisation mixes the op's outputs (exact statistics)"
        return super().channel_layout_error(w)

    def channel_jacobian(self, x, w):
        """The base op's channel Jacobian times ``∂z_n/∂y_n`` (constant statistics)."""
        scale = self._scale(x, w)
        return [g * scale.reshape(scale.shape + (1,) * (g.ndim - scale.ndim))
                for g in self.base.channel_jacobian(x, w)]

    def _scale(self, x, w):
        """``∂z_n/∂y_n`` with constant statistics (the diagonal of ``g``'s Jacobian)."""
        y = u.get_mantissa(self.base.xw_to_y(x, w))
        return jax.jvp(lambda v: self.region(v, True), (y,), (jnp.ones_like(y),))[1]

    def drtrl_update(self, eps, J, df, x, w):
        """Constant statistics: the base op's update with ``df`` scaled by ``∂z_n/∂y_n``."""
        if self.stats != "constant":
            return NotImplemented
        df = df * self._scale(x, w)[..., None]
        fused = self.base.drtrl_update(eps, J, df, x, w)
        if fused is not NotImplemented:
            return fused
        from ..backends.rules import drtrl_compact     # the generic rule, with the base op
        batched = x is not None and self.x_ndim is not None and jnp.ndim(x) == self.x_ndim + 1
        n_neuron = len(self._z.aval.shape) - (1 if batched else 0)
        bshape = tuple(df.shape[:df.ndim - 1 - n_neuron])
        return drtrl_compact(self.base, w, eps, J, df, x, bshape, batched)

    def drtrl_grad(self, eps, delta, w):
        return self.base.drtrl_grad(eps, delta, w) if self.stats == "constant" else NotImplemented

    def batch_jacobian(self, x, w):
        """``∂z/∂θ`` for a whole batch at once (leaves ``(B, *S, *leaf)``): the absorbed
        equations were traced on the batch, and may mix examples (batch statistics)."""
        return param_jacobian(lambda ww: self.xw_to_y(x, ww), w)

    def _repr_fields(self):
        return {"base": self.base, "stats": self.stats,
                "absorbed": [e.primitive.name for e in self._eqns]}


def _mixing_eqns(eqns, y_var) -> frozenset:
    """Indices (into ``eqns``) of the equations that mix neurons of ``y``: an input depends
    on ``y`` element-wise and an output no longer does, but depends on it through the
    equation (by the dependency rules of :mod:`.rules`). With constant statistics these
    read stopped gradients."""
    # y is an op output (``ys``): a leading-axis broadcast of it (an unbatched op output
    # meeting batched values) keeps each neuron's identity and is no mixing
    env: dict = {y_var: Dep(ys=frozenset({"y"}))}
    jx = types.SimpleNamespace(invars=[y_var], eqns=list(eqns), outvars=[])
    _run(jx, [env[y_var]], None, {}, {}, env)
    out = set()
    for i, e in enumerate(eqns):
        elementwise_in = any("y" in env.get(v, Dep()).ys for v in e.invars
                             if not C.is_literal(v))
        mixed_out = any("y" not in env[v].ys and env[v].mixed for v in e.outvars)
        if elementwise_in and mixed_out:
            out.add(i)
    return frozenset(out)


@dataclass(frozen=True)
class _Region:
    op_name: str
    eqn_indices: tuple          # into the step's jaxpr: the composite's equations, in order
    absorbed: tuple             # those of them that leave the step (not shared constants)
    z_var: object
    mixing: frozenset           # indices into eqn_indices


def find_regions(graph) -> list[_Region]:
    """Per op: the equations after it that read only its output, earlier such equations and
    constants, if they mix neurons and leave exactly one value used later."""
    jaxpr = C.open_jaxpr(graph.info.jaxpr)
    consts = set(jaxpr.constvars)
    eqns = jaxpr.eqns
    op_eqns = {o.eqn for o in graph.ops}
    # values computed from literals and constants only (e.g. jnp.var's divisor), by producer
    const_eqn: dict = {}
    for i, e in enumerate(eqns):
        if i in op_eqns or C.eqn_subjaxprs(e) or getattr(e, "effects", None):
            continue
        if all(C.is_literal(v) or v in consts or v in const_eqn for v in e.invars):
            for v in e.outvars:
                const_eqn[v] = i
    out = []
    for o in graph.ops:
        y = eqns[o.eqn].outvars[0]
        inside, idx = {y}, []
        for i in range(o.eqn + 1, len(eqns)):
            e = eqns[i]
            if i in op_eqns or C.eqn_subjaxprs(e) or i in const_eqn.values():
                continue
            vs = [v for v in e.invars if not C.is_literal(v)]
            if vs and any(v in inside for v in vs) and \
                    all(v in inside or v in consts or v in const_eqn for v in vs):
                idx.append(i)
                inside.update(e.outvars)
        if not idx:
            continue
        taken = set(idx)
        used_later = set()
        for j, e in enumerate(eqns):
            if j in taken or j == o.eqn:
                continue
            used_later.update(v for v in e.invars if not C.is_literal(v) and v in inside)
        used_later.update(v for v in jaxpr.outvars if not C.is_literal(v) and v in inside)
        if len(used_later) != 1 or y in used_later:
            continue
        region_eqns = [eqns[i] for i in idx]
        mixing = _mixing_eqns(region_eqns, y)
        if not mixing:
            continue          # element-wise after the op: nothing to absorb
        (z,) = used_later
        ys, zs = tuple(y.aval.shape), tuple(getattr(z.aval, "shape", ()))
        if len(zs) != len(ys) or (o.batched and zs[:1] != ys[:1]):
            continue          # the output gains or loses axes (a broadcast over a batch, ...)
        # keep only the equations the output needs (with the constants they read)
        need, keep = {z}, []
        for i in sorted(set(idx) | set(const_eqn.values()), reverse=True):
            if any(v in need for v in eqns[i].outvars):
                keep.append(i)
                need.update(v for v in eqns[i].invars if not C.is_literal(v))
        keep = tuple(sorted(keep))
        mixing = _mixing_eqns([eqns[i] for i in keep], y)
        if not mixing:
            continue
        out.append(_Region(o.name, keep, tuple(i for i in keep if i in set(idx)), z, mixing))
    return out


@register_pass
@dataclass(frozen=True)
class AbsorbNormalizationPass(Pass):
    """Absorb parameter-free cross-neuron equations after a trace op into a composite op."""
    name = "absorb-normalization"
    requires = frozenset({"lowered"})
    provides = frozenset()
    stats: str = "exact"

    def run(self, graph, ctx):
        if self.stats not in STATS:
            raise PipelineError(f"absorb-normalization: stats must be one of {', '.join(STATS)}, "
                                f"got {self.stats!r}")
        if "groups" in graph.facts:
            raise PipelineError("absorb-normalization must run before hidden-groups (it "
                                "rewrites the step the analyses read)")
        regions = find_regions(graph)
        if not regions:
            return graph
        info = graph.info
        jaxpr = C.open_jaxpr(info.jaxpr)
        const_vals = dict(zip(jaxpr.constvars, C.closed_consts(info.jaxpr)))
        eqns = list(jaxpr.eqns)
        drop, replace_at = set(), {}
        # the op registry holds ops weakly: keep every composite alive until the new step
        # (which holds them in StepInfo.ops) is lowered
        composites = []
        for r in regions:
            o = graph.op_by_name[r.op_name]
            marker = eqns[o.eqn]
            region_eqns = tuple(eqns[i] for i in r.eqn_indices)
            used_consts = {v: const_vals[v] for e in region_eqns for v in e.invars
                           if not C.is_literal(v) and v in const_vals}
            comp = NormalizedOp(graph.op_object(o.name), region_eqns, used_consts,
                                marker.outvars[0], r.z_var, r.mixing, self.stats)
            composites.append(comp)
            replace_at[o.eqn] = self._marker(info, graph, o, marker, comp, r.z_var)
            drop.update(r.absorbed)
            ctx.note(self.name, f"{o.name}: absorbed {len(region_eqns)} equation(s) "
                                f"({', '.join(sorted({e.primitive.name for e in region_eqns}))}) "
                                f"into {type(comp.base).__name__}+norm, stats={self.stats}")
        new_eqns = [replace_at.get(i, e) for i, e in enumerate(eqns) if i not in drop]
        closed = C.make_closed(jaxpr.replace(eqns=new_eqns), C.closed_consts(info.jaxpr))
        from ..frontend import lower_ops
        ops, values, params, batch, op_objects = lower_ops(
            C.open_jaxpr(closed), info.states, info.state_paths, info.state_in_slices)
        new_ops = []
        for o in ops:
            obj = op_objects[o.name]
            if isinstance(obj, NormalizedOp):
                o = dataclasses.replace(
                    o, op_class=f"{type(obj.base).__name__}+norm",
                    attrs=tuple(sorted(dict(o.attrs, stats=obj.stats, absorbed=tuple(
                        sorted({e.primitive.name for e in obj._eqns}))).items())))
            new_ops.append(o)
        missing = [c for c in composites if c not in op_objects.values()]
        if missing:
            raise PipelineError("absorb-normalization: a composite op was not found in the "
                                "rewritten step (internal error)")
        new_info = dataclasses.replace(info, jaxpr=closed, ops=MappingProxyType(op_objects))
        return graph.replace(ops=tuple(new_ops), values=values, params=params, batch=batch,
                             info=new_info)

    @staticmethod
    def _marker(info, graph, o, marker, comp, z_var):
        """A marker equation applying ``comp`` to the old marker's inputs, writing ``z``."""
        p = graph.param_by_name[o.param]
        si = p.state_index
        treedef = info.state_treedefs[si]
        nx = o.n_x_leaves
        x_avals = [v.aval for v in marker.invars[:nx]]
        w_avals = [v.aval for v in marker.invars[nx:]]

        def f(*flat):
            x = flat[0] if nx else None
            w = jax.tree.unflatten(treedef, list(flat[nx:]))
            return comp(x, w)
        structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in x_avals + w_avals]
        small = C.open_jaxpr(jax.make_jaxpr(f)(*structs))
        calls = [e for e in small.eqns if e.primitive.name in C.JIT_NAMES]
        if len(calls) != 1 or len(small.eqns) != 1:
            raise PipelineError(f"absorb-normalization: the composite op of {o.name} did not "
                                f"trace to one marker equation")
        (eqn,) = calls
        return eqn.replace(invars=list(marker.invars), outvars=[z_var],
                           source_info=marker.source_info)
