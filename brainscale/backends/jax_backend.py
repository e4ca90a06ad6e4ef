"""JAX backend: the compiled online-learning step in plain JAX (jit + custom VJP).

Forward (algorithms.md sections 2-4). One evaluation of the traced step, linearised, where
every trace op computes ``y = op(stop_gradient(x), θ) + ξ``. Tangents of that linear map
give, per hidden group, the element-wise Jacobian ``J`` (one tangent per state index ``j``,
ones on ``h_j^{t-1}`` of every group at once — groups never interact element-wise) and, per
op, ``df`` (ones on ``ξ_q``; ops reaching disjoint groups share one tangent). Paths through a
trace op's input are cut by the ``stop_gradient``: this is the diagonal approximation. No
dense N×N Jacobian is ever formed. The traces are then updated with the rules of the
relation's trace dim (param: D-RTRL; io: ES-D-RTRL).

Backward (custom VJP). The learning signal ``δ_g = ∂L^t/∂h_g^t`` is obtained by one VJP of
``Ω``, a dual evaluation of the step: environment ``m`` computes the step as the model does,
environment ``s`` computes it with the trace-op outputs injected. At every new hidden value
``m`` continues with ``stop_gradient(h_m) + η + (h_s − stop_gradient(h_s))``. So ``∂/∂η`` is the
derivative of the loss w.r.t. ``h^t`` along every path leaving the state's group (through
later layers' trace ops, readouts, ...) while paths into other states of the same group
(already inside ``J``/``df``) are not counted twice; plain parameters and inputs get their
exact instantaneous gradient through ``s``; a zero ``ζ_q`` added to each op output in ``m``
yields the instantaneous signal of paths that reach the outputs without a hidden state.
Trace parameters then get ``Σ_g Σ_i yw_to_w(δ_i, ε_i)`` (param-dim),
``xy_to_dw(ε_x, Σ ε_f ∘ δ)`` (io-dim), plus ``xy_to_dw(x, ζ-signal)`` when the op has direct
paths. Everything runs under ``jax.jit``; memory per step does not depend on time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _compat as C
from ..concepts import MARKER_PREFIX, lookup_op, sum_leading
from ..errors import BackendError
from .base import Backend, CompiledStep, register_backend

__all__ = ["JaxBackend", "StepLayout"]

sg = jax.lax.stop_gradient


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _zero_ct(x):
    if _is_float(x):
        return jnp.zeros(jnp.shape(x), jnp.result_type(x))
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


def _mantissa_treedef(value):
    try:
        import brainunit as u
        value = jax.tree.map(lambda l: u.get_mantissa(l), value,
                             is_leaf=lambda l: isinstance(l, u.Quantity))
    except Exception:  # noqa: BLE001
        pass
    return jax.tree.structure(value)


@dataclass
class StepLayout:
    """Where every value of the step lives (indices into jaxpr invars/outvars, traces)."""
    n_in: int
    arg_idx: tuple
    hidden_idx: tuple            # invar per hidden state (graph.hidden order)
    hidden_out: tuple            # outvar per hidden state
    tparam_idx: tuple            # per etrace param: tuple of invars
    pparam_idx: tuple            # per plain param: tuple of invars
    other_idx: tuple             # remaining invars
    other_out: tuple             # outvars of non-hidden, non-param states
    n_out: int                   # the step's own output leaves
    traces: tuple                # per trace array: (kind, *keys, shape, dtype)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


@register_backend
class JaxBackend(Backend):
    """Emits the compiled step as plain jitted JAX."""
    name = "jax"

    def __init__(self, jit: bool = True):
        self.jit = jit

    def emit(self, graph, decay: float | None = None) -> CompiledStep:
        if "trace-dims" not in graph.facts:
            raise BackendError("the graph has no trace dims: run the 'select-dims' pass "
                               "(part of the default pipeline) before emitting")
        if graph.info is None:
            raise BackendError("the graph carries no traced step (StepInfo)")
        return _Emitter(graph, decay, self.jit).build()


class _Emitter:
    def __init__(self, graph, decay, jit):
        self.g = graph
        self.info = graph.info
        self.closed = self.info.jaxpr
        self.jaxpr = C.open_jaxpr(self.closed)
        self.consts = C.closed_consts(self.closed)
        self.decay = decay
        self.do_jit = jit
        g = graph
        self.ops = [self._op(o) for o in g.ops]
        self.op_index = {o.name: q for q, o in enumerate(g.ops)}
        self.hid_index = {h.name: k for k, h in enumerate(g.hidden)}
        self.tparams = [p for p in g.params if p.kind == "etrace"]
        self.pparams = [p for p in g.params if p.kind == "plain"]
        self.tparam_index = {p.name: i for i, p in enumerate(self.tparams)}
        self.w_treedef = [_mantissa_treedef(self.info.states[p.state_index].value)
                          for p in self.tparams]
        self.dims = {}
        for t in g.traces:
            for rid in t.relations:
                self.dims[rid] = t.dim
        if decay is None and any(t.dim == "io" for t in g.traces):
            raise BackendError("the graph has io-dim traces but no decay α was given "
                               "(DiagIODimAlgorithm(model, decay_or_rank=...))")
        self.batch = int(g.attr("batch", 0) or 0)
        # shared by every evaluation of the jaxpr (forward, Ω): marker equations and the
        # variables holding new hidden values
        self.op_of_eqn = {o.eqn: q for q, o in enumerate(g.ops)}
        self.hid_of_var: dict = {}
        for k, h in enumerate(g.hidden):
            self.hid_of_var.setdefault(self.jaxpr.outvars[h.outvar], []).append(k)
        self._layout()

    def _op(self, o):
        op = lookup_op(f"{MARKER_PREFIX}{o.op_id}")
        if op is None:
            raise BackendError(f"the ETraceOp object of {o.name} no longer exists")
        return op

    # -- layout -------------------------------------------------------------------------
    def _layout(self):
        g, info = self.g, self.info
        n_in = len(self.jaxpr.invars)
        used = set(range(info.n_arg_leaves))
        hidden_idx = tuple(h.invar for h in g.hidden)
        used |= set(hidden_idx)
        tparam_idx = tuple(tuple(p.invars) for p in self.tparams)
        pparam_idx = tuple(tuple(p.invars) for p in self.pparams)
        for t in tparam_idx + pparam_idx:
            used |= set(t)
        other_idx = tuple(i for i in range(n_in) if i not in used)
        hidden_states = {h.state_index for h in g.hidden}
        param_states = {p.state_index for p in g.params}
        other_out = []
        for si, (a, b) in enumerate(info.state_out_slices):
            if si in hidden_states or si in param_states:
                continue
            other_out.extend(range(a, b))
        traces = []
        for t in g.traces:
            if t.dim == "param":
                for rid in t.relations:
                    rel = g.relation_by_id[rid]
                    op = g.op_by_name[rel.op]
                    p = self.tparams[self.tparam_index[rel.param]]
                    dense = dict(op.attrs).get("layout") == "dense"
                    for gid in rel.groups:
                        grp = g.group_by_id[gid]
                        k = grp.num_state
                        bshape = self._batch_shape(grp)
                        yshape = tuple(grp.varshape[len(bshape):])
                        for li, leaf in enumerate(getattr(p.type, "leaves", (p.type,))):
                            if dense:
                                traces.append(("param", rid, gid, li, "all",
                                               bshape + yshape + (k,) + leaf.shape, leaf.dtype))
                            elif self._merged_states(rid, gid, li):
                                traces.append(("param", rid, gid, li, "all",
                                               bshape + leaf.shape + (k,), leaf.dtype))
                            else:
                                # one array per state: each is updated in place
                                for si in range(k):
                                    traces.append(("param", rid, gid, li, si,
                                                   bshape + leaf.shape, leaf.dtype))
            elif t.dim == "io":
                x = t.attr("shared_x") or g.op_by_name[g.relation_by_id[t.relations[0]].op].x
                xt = g.value_by_name[x].type
                # a filtered input is real-valued even when x is boolean/integer spikes
                xdt = xt.dtype if np.issubdtype(np.dtype(xt.dtype), np.inexact) else \
                    g.op_by_name[g.relation_by_id[t.relations[0]].op].type.dtype
                traces.append(("x", t.id, x, xt.shape, xdt))
                for rid in t.relations:
                    rel = g.relation_by_id[rid]
                    for gid in rel.groups:
                        grp = g.group_by_id[gid]
                        traces.append(("f", rid, gid, tuple(grp.varshape) + (grp.num_state,),
                                       g.op_by_name[rel.op].type.dtype))
        self.L = StepLayout(n_in, tuple(range(info.n_arg_leaves)), hidden_idx,
                            tuple(h.outvar for h in g.hidden), tparam_idx, pparam_idx, other_idx,
                            tuple(other_out), info.n_out_leaves, tuple(traces))
        # (relation, group) -> {(leaf index, state index | "all"): trace index}
        self.pslots: dict = {}
        for ti, ent in enumerate(traces):
            if ent[0] == "param":
                self.pslots.setdefault((ent[1], ent[2]), {})[(ent[3], ent[4])] = ti

    def _merged_states(self, rid, gid, li) -> bool:
        """Whether a compact param-dim leaf keeps its k states in one array (trailing axis)
        instead of one array per state (the default, updated in place by XLA)."""
        return False

    def _gather_param(self, key, pi, traces):
        """The traces of a (relation, group): a parameter tree (dense layout, or every leaf
        merged) or, for the compact layout, a list of k per-state parameter trees."""
        slots = self.pslots[key]
        n_leaves = len(self.L.tparam_idx[pi])
        if all((li, "all") in slots for li in range(n_leaves)):
            return self._w_tree(pi, [traces[slots[(li, "all")]] for li in range(n_leaves)])
        k = 1 + max(si for (_, si) in slots if si != "all")
        return [self._w_tree(pi, [traces[slots[(li, si)]] if (li, si) in slots
                                  else traces[slots[(li, "all")]][..., si]
                                  for li in range(n_leaves)]) for si in range(k)]

    def _scatter_param(self, key, new, out, like):
        """Write ``new`` (in :meth:`_gather_param`'s layout) into ``out``, in the dtypes of
        the arrays ``like`` (the old traces)."""
        slots = self.pslots[key]
        if isinstance(new, list):
            for si, tree in enumerate(new):
                for li, leaf in enumerate(jax.tree.leaves(tree)):
                    ti = slots[(li, si)]
                    out[ti] = leaf.astype(like[ti].dtype)
        else:
            for li, leaf in enumerate(jax.tree.leaves(new)):
                ti = slots[(li, "all")]
                out[ti] = leaf.astype(like[ti].dtype)

    def _batch_shape(self, grp) -> tuple:
        """Leading axes of a group's varshape that are batch axes (per-example traces)."""
        return (grp.varshape[0],) if self.batch and grp.varshape and grp.varshape[0] == self.batch \
            else ()

    # -- evaluation ---------------------------------------------------------------------
    def _assemble(self, theta_t, theta_p, args, hidden, others):
        ins = [None] * self.L.n_in
        for i, v in zip(self.L.arg_idx, args):
            ins[i] = v
        for i, v in zip(self.L.hidden_idx, hidden):
            ins[i] = v
        for idx, leaves in zip(self.L.tparam_idx, theta_t):
            for i, v in zip(idx, leaves):
                ins[i] = v
        for idx, leaves in zip(self.L.pparam_idx, theta_p):
            for i, v in zip(idx, leaves):
                ins[i] = v
        for i, v in zip(self.L.other_idx, others):
            ins[i] = v
        return ins

    def _eval(self, ins, on_op=None, on_hidden=None):
        jaxpr = self.jaxpr
        env = {}
        for v, c in zip(jaxpr.constvars, self.consts):
            env[v] = c
        for v, x in zip(jaxpr.invars, ins):
            env[v] = x

        def rd(v):
            return C.literal_value(v) if C.is_literal(v) else env[v]

        op_of_eqn, hid_of_var = self.op_of_eqn, self.hid_of_var
        for ei, eqn in enumerate(jaxpr.eqns):
            invals = [rd(v) for v in eqn.invars]
            q = op_of_eqn.get(ei)
            if q is not None and on_op is not None:
                outs = on_op(q, eqn, invals)
            else:
                outs = C.eval_eqn(eqn, invals)
            for v, val in zip(eqn.outvars, outs):
                if on_hidden is not None and v in hid_of_var:
                    for k in hid_of_var[v]:
                        val = on_hidden(k, val)
                env[v] = val
        return [rd(v) for v in jaxpr.outvars]

    # -- the op math, unit-free, per example ----------------------------------------------
    def _w_tree(self, pi, leaves):
        return jax.tree.unflatten(self.w_treedef[pi], list(leaves))

    def _xy_to_dw_eqn(self, q, x, dy, w_leaves):
        """VJP w.r.t. the param leaves of the marker equation itself (the model's exact op).

        When the op's input is not floating point (e.g. boolean spikes), a float ``ε_x`` cannot
        be fed to the traced equation; the op's own ``xy_to_dw`` is used instead.
        """
        eqn = self.jaxpr.eqns[self.g.ops[q].eqn]
        y_dtype = eqn.outvars[0].aval.dtype
        if x is not None and not jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.inexact) \
                and jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            pi = self.tparam_index[self.g.ops[q].param]
            grads = self.ops[q].xy_to_dw(x, dy.astype(y_dtype), self._w_tree(pi, w_leaves))
            return [g.astype(jnp.result_type(w)) for g, w in zip(jax.tree.leaves(grads), w_leaves)]
        xs = [x] if x is not None else []
        _, vjp = jax.vjp(lambda *w: C.eval_eqn(eqn, xs + list(w))[0], *w_leaves)
        return list(vjp(dy.astype(y_dtype)))

    # -- forward ------------------------------------------------------------------------
    def _forward(self, theta_t, theta_p, args, hidden, others, traces):
        g, L = self.g, self.L
        ins_fixed = self._assemble(theta_t, theta_p, args, [None] * len(hidden), others)
        n_ops = len(g.ops)

        def F(h_prev, xi):
            ins = list(ins_fixed)
            for i, v in zip(L.hidden_idx, h_prev):
                ins[i] = v
            xs = [None] * n_ops

            def on_op(q, eqn, invals):
                nx = g.ops[q].n_x_leaves
                xs[q] = invals[0] if nx else None
                y = C.eval_eqn(eqn, [sg(v) for v in invals[:nx]] + list(invals[nx:]))[0]
                return [y + xi[q]]
            outs = self._eval(ins, on_op=on_op)
            return outs, [x if x is not None else jnp.zeros(()) for x in xs]

        xi0 = tuple(jnp.zeros(o.type.shape, o.type.dtype) for o in g.ops)
        h0 = tuple(hidden)
        dirs_h, dirs_xi, jdir, fdir = self._directions(h0, xi0)
        if dirs_h is None:
            outs, xs = F(h0, xi0)
            tang = None
        else:
            (outs, xs), f_jvp = jax.linearize(F, h0, xi0)
            tang = jax.vmap(lambda th, tx: f_jvp(th, tx)[0])(dirs_h, dirs_xi)
        J, DF = {}, {}
        if tang is not None:
            hid_t = [tang[L.hidden_out[k]] for k in range(len(g.hidden))]
            for grp in g.groups:
                ks = [self.hid_index[s] for s in grp.states]
                if grp.id in jdir:
                    J[grp.id] = jnp.stack([jnp.stack([hid_t[ki][jdir[grp.id][j]] for j in range(len(ks))],
                                                     axis=-1) for ki in ks], axis=-2)
            for (q, gid), d in fdir.items():
                ks = [self.hid_index[s] for s in g.group_by_id[gid].states]
                DF[(q, gid)] = jnp.stack([hid_t[ki][d] for ki in ks], axis=-1)
        new_traces = self._update_traces(theta_t, list(traces), J, DF, xs)
        new_hidden = tuple(outs[i] for i in L.hidden_out)
        new_others = tuple(outs[i] for i in L.other_out)
        step_outs = tuple(outs[:L.n_out])
        return (step_outs, new_hidden, new_others, tuple(new_traces)), xs

    def _directions(self, h0, xi0):
        """Tangent directions: J columns (one per state index) and df (per op colour)."""
        g = self.g
        traced = [r for r in g.relations if self.dims.get(r.id) in ("param", "io")]
        groups_needed = sorted({gid for r in traced for gid in r.groups}, key=lambda s: int(s[1:]))
        if not traced:
            return None, None, {}, {}
        kmax = max(g.group_by_id[gid].num_state for gid in groups_needed)
        dh, dx = [], []
        jdir: dict = {gid: [] for gid in groups_needed}
        for j in range(kmax):
            th = [jnp.zeros_like(h) for h in h0]
            for gid in groups_needed:
                grp = g.group_by_id[gid]
                if j < grp.num_state:
                    k = self.hid_index[grp.states[j]]
                    th[k] = jnp.ones_like(h0[k])
                    jdir[gid].append(len(dh))
            dh.append(th)
            dx.append([jnp.zeros_like(x) for x in xi0])
        # greedy colouring: ops reaching disjoint groups share a direction
        colours: list[tuple[set, list]] = []
        for r in traced:
            q = self.op_index[r.op]
            for c in colours:
                if not (c[0] & set(r.groups)) and q not in c[1]:
                    c[0].update(r.groups)
                    c[1].append(q)
                    break
            else:
                colours.append((set(r.groups), [q]))
        fdir = {}
        for groups, qs in colours:
            tx = [jnp.zeros_like(x) for x in xi0]
            for q in qs:
                tx[q] = jnp.ones_like(xi0[q])
            for r in traced:
                q = self.op_index[r.op]
                if q in qs:
                    for gid in r.groups:
                        fdir[(q, gid)] = len(dh)
            dh.append([jnp.zeros_like(h) for h in h0])
            dx.append(tx)
        stack = lambda seq: tuple(jnp.stack(list(col)) for col in zip(*seq))  # noqa: E731
        return stack(dh), stack(dx), jdir, fdir

    def _update_traces(self, theta_t, traces, J, DF, xs):
        g = self.g
        out = list(traces)
        alpha = self.decay
        for ti, ent in enumerate(self.L.traces):
            kind = ent[0]
            if kind == "x":
                _, tid, xname = ent[:3]
                q = next(i for i, o in enumerate(g.ops) if o.x == xname)
                out[ti] = alpha * traces[ti] + sg(xs[q]).astype(traces[ti].dtype)
            elif kind == "f":
                _, rid, gid = ent[:3]
                q = self.op_index[g.relation_by_id[rid].op]
                Jg, df = J[gid], DF[(q, gid)]
                decayed = jnp.einsum("...ij,...j->...i", Jg, traces[ti])
                out[ti] = (alpha * decayed + (1 - alpha) * df).astype(traces[ti].dtype)
        # param-dim traces: update all leaves of a (relation, group) together
        for rid, gid in self._param_groups():
            rel = g.relation_by_id[rid]
            q = self.op_index[rel.op]
            pi = self.tparam_index[rel.param]
            op, o = self.ops[q], g.ops[q]
            w = self._w_tree(pi, theta_t[pi])
            eps = self._gather_param((rid, gid), pi, traces)
            Jg, df = J[gid], DF[(q, gid)]
            x = sg(xs[q]) if o.n_x_leaves else None
            upd = self._drtrl_compact if isinstance(eps, list) else self._drtrl_dense
            new = upd(op, w, eps, Jg, df, x, self._batch_shape(g.group_by_id[gid]))
            self._scatter_param((rid, gid), new, out, traces)
        return out

    def _param_groups(self) -> dict:
        """``{(relation, group): [trace indices]}`` of the param-dim traces."""
        return {key: sorted(slots.values()) for key, slots in self.pslots.items()}

    @staticmethod
    def _drtrl_compact(op, w, eps, J, df, x, bshape):
        """ε_i ← Σ_j yw_to_w(J[:,i,j], ε_j) + xy_to_dw(x, df[:,i]) (per example); ``eps`` is
        the list of k per-state parameter trees."""
        fused = op.drtrl_update(list(eps), J, df, x, w)
        if fused is not NotImplemented:
            return list(fused)

        def single(eps, J, df, x):
            k = df.shape[-1]
            out = []
            for i in range(k):
                acc = op.xy_to_dw(x, df[..., i], w)
                for j in range(k):
                    acc = _tree_add(acc, op.yw_to_w(J[..., i, j], eps[j]))
                out.append(acc)
            return out
        if bshape:
            return jax.vmap(single)(eps, J, df, x)
        return single(eps, J, df, x)

    @staticmethod
    def _drtrl_dense(op, w, eps, J, df, x, bshape):
        """Per output neuron n: ε[n,i,θ] ← Σ_j J[n,i,j] ε[n,j,θ] + df[n,i] ∂y_n/∂θ."""
        def single(eps, J, df, x):
            G = jax.jacrev(lambda ww: op.xw_to_y(x, ww))(w)    # leaves (*S, *leaf)

            def leaf_update(e, gl):
                nS = df.ndim - 1
                extra = e.ndim - nS - 1
                Je = J.reshape(J.shape + (1,) * extra)
                dec = jnp.sum(Je * jnp.expand_dims(e, axis=nS), axis=nS + 1)
                dfe = df.reshape(df.shape + (1,) * extra)
                return dec + dfe * jnp.expand_dims(gl, axis=nS)
            return jax.tree.map(leaf_update, eps, G)
        if bshape:
            return jax.vmap(single)(eps, J, df, x)
        return single(eps, J, df, x)

    # -- backward -----------------------------------------------------------------------
    def _omega(self, theta_t, theta_p, args, hidden, others):
        """Ω(η, ζ, θ_trace, θ_plain, args) -> non-hidden outputs (see module docstring)."""
        g, L = self.g, self.L
        none_ops = {self.op_index[r.op] for r in g.relations if self.dims.get(r.id) == "none"}
        hidden_c = [sg(h) for h in hidden]
        others_c = [sg(o) if _is_float(o) else o for o in others]

        def omega(eta, zeta, th_t, th_p, a):
            ins = self._assemble(th_t, th_p, a, hidden_c, others_c)
            env_s: dict = {}
            jaxpr = self.jaxpr
            env_m: dict = {}
            for v, c in zip(jaxpr.constvars, self.consts):
                env_m[v] = env_s[v] = c
            for v, x in zip(jaxpr.invars, ins):
                env_m[v] = env_s[v] = x
            op_of_eqn, hid_of_var = self.op_of_eqn, self.hid_of_var

            def rd(env, v):
                return C.literal_value(v) if C.is_literal(v) else env[v]
            for ei, eqn in enumerate(jaxpr.eqns):
                q = op_of_eqn.get(ei)
                if q is not None:
                    inv = [rd(env_m, v) for v in eqn.invars]
                    nx = g.ops[q].n_x_leaves
                    w = inv[nx:] if q in none_ops else [sg(v) for v in inv[nx:]]
                    y = C.eval_eqn(eqn, inv[:nx] + w)[0]
                    env_s[eqn.outvars[0]] = y
                    env_m[eqn.outvars[0]] = y + zeta[q]
                    outs_m = None
                else:
                    outs_m = C.eval_eqn(eqn, [rd(env_m, v) for v in eqn.invars])
                    outs_s = C.eval_eqn(eqn, [rd(env_s, v) for v in eqn.invars])
                    for v, a_, b_ in zip(eqn.outvars, outs_m, outs_s):
                        env_m[v] = a_
                        env_s[v] = b_
                for v in eqn.outvars:
                    for k in hid_of_var.get(v, ()):
                        hm, hs = env_m[v], env_s[v]
                        env_m[v] = sg(hm) + eta[k] + (hs - sg(hs))
            outs = [rd(env_m, v) for v in jaxpr.outvars]
            keep = list(range(L.n_out)) + list(L.other_out)
            return tuple(outs[i] if _is_float(outs[i]) else jnp.zeros(()) for i in keep)
        return omega

    def _backward(self, res, cts):
        theta_t, theta_p, args, hidden, others, traces_old, new_traces, xs = res
        delta, d_zeta, g_t, g_p, g_a = self._learning_signals(theta_t, theta_p, args, hidden,
                                                              others, cts)
        # trace-based gradients
        self._param_trace_grads(g_t, theta_t, new_traces, delta)
        for ti, q, pi, c in self._io_signals(new_traces, delta):
            grads = self._xy_to_dw_eqn(q, new_traces[ti], c, theta_t[pi])
            for li, leaf in enumerate(grads):
                g_t[pi][li] = g_t[pi][li] + leaf
        self._direct_grads(g_t, theta_t, xs, d_zeta)
        ct_args = tuple(ga if _is_float(a) else _zero_ct(a) for ga, a in zip(g_a, args))
        return (tuple(tuple(x) for x in g_t), tuple(tuple(x) for x in g_p), ct_args,
                tuple(_zero_ct(h) for h in hidden), tuple(_zero_ct(o) for o in others),
                tuple(_zero_ct(t) for t in traces_old))

    # The pieces of _backward, separate so that other backends (backends/pallas) can route
    # single traces to their own kernels and reuse the learning signals.
    def _learning_signals(self, theta_t, theta_p, args, hidden, others, cts):
        """δ per hidden state, the ζ-signals of direct paths, and the VJP of Ω:
        ``(delta, d_zeta, g_t (lists, mutable), g_p, g_a)``."""
        ct_outs, ct_hidden, ct_others, _ct_traces = cts
        g = self.g
        omega = self._omega(theta_t, theta_p, args, hidden, others)
        eta0 = tuple(jnp.zeros_like(h) for h in hidden)
        zeta0 = tuple(jnp.zeros(o.type.shape, o.type.dtype) for o in g.ops)
        args_f = tuple(a if _is_float(a) else sg(jnp.asarray(a)) for a in args)
        _, vjp = jax.vjp(lambda e, z, tt, tp, a: omega(e, z, tt, tp, a),
                         eta0, zeta0, tuple(theta_t), tuple(theta_p), args_f)
        keep_cts = tuple(ct_outs) + tuple(ct_others)
        keep_cts = tuple(c if _is_float(c) and jnp.issubdtype(a.dtype, jnp.inexact) else jnp.zeros(())
                         for c, a in zip(keep_cts, self._keep_avals()))
        d_eta, d_zeta, g_t, g_p, g_a = vjp(keep_cts)
        delta = [de + (ch if _is_float(ch) else 0.) for de, ch in zip(d_eta, ct_hidden)]
        return delta, d_zeta, [list(x) for x in g_t], g_p, g_a

    def _param_trace_grads(self, g_t, theta_t, new_traces, delta, groups=None):
        """Add ``Σ_g Σ_i yw_to_w(δ_i, ε_i)`` of the param-dim traces to ``g_t`` (in place);
        ``groups`` restricts it to some ``(relation, group)`` keys of ``_param_groups()``."""
        g = self.g
        for rid, gid in self._param_groups():
            if groups is not None and (rid, gid) not in groups:
                continue
            rel = g.relation_by_id[rid]
            q = self.op_index[rel.op]
            pi = self.tparam_index[rel.param]
            dg = self._group_delta(gid, delta)
            eps = self._gather_param((rid, gid), pi, new_traces)
            w = self._w_tree(pi, theta_t[pi])
            grad = self._contract_param(self.ops[q], w, eps, dg, not isinstance(eps, list),
                                        self._batch_shape(g.group_by_id[gid]))
            for li, leaf in enumerate(jax.tree.leaves(grad)):
                g_t[pi][li] = g_t[pi][li] + leaf.astype(g_t[pi][li].dtype)

    def _io_signals(self, new_traces, delta):
        """Per io-dim relation: ``(index of its ε_x, op index, param index, Σ ε_f ∘ δ)``."""
        g = self.g
        out = []
        for ti, ent in enumerate(self.L.traces):
            if ent[0] != "x":
                continue
            tid = ent[1]
            trace = g.trace_by_id[tid]
            for rid in trace.relations:
                rel = g.relation_by_id[rid]
                q = self.op_index[rel.op]
                pi = self.tparam_index[rel.param]
                c = None
                for tj, e2 in enumerate(self.L.traces):
                    if e2[0] == "f" and e2[1] == rid:
                        contrib = jnp.sum(new_traces[tj] * self._group_delta(e2[2], delta), axis=-1)
                        c = contrib if c is None else c + contrib
                if c is None:
                    continue
                ys = g.ops[q].type.shape
                c = c.reshape(c.shape[len(c.shape) - len(ys):]) if c.shape != tuple(ys) else c
                out.append((ti, q, pi, c))
        return out

    def _direct_grads(self, g_t, theta_t, xs, d_zeta):
        """Instantaneous terms of paths reaching the outputs without a hidden state."""
        g = self.g
        for r in g.relations:
            if not r.direct or self.dims.get(r.id) == "none":
                continue
            q = self.op_index[r.op]
            pi = self.tparam_index[r.param]
            grads = self._xy_to_dw_eqn(q, xs[q] if g.ops[q].n_x_leaves else None, d_zeta[q],
                                       theta_t[pi])
            for li, leaf in enumerate(grads):
                g_t[pi][li] = g_t[pi][li] + leaf

    def _keep_avals(self):
        """Avals of the outputs Ω returns: the step's outputs, then other states' values."""
        outv = self.jaxpr.outvars
        keep = list(range(self.L.n_out)) + list(self.L.other_out)
        return [outv[i].aval for i in keep]

    def _group_delta(self, gid, delta):
        grp = self.g.group_by_id[gid]
        return jnp.stack([delta[self.hid_index[s]] for s in grp.states], axis=-1)

    @staticmethod
    def _contract_param(op, w, eps, dg, dense, bshape):
        if not dense:
            fused = op.drtrl_grad(list(eps), dg, w)
            if fused is not NotImplemented:
                return fused
        if dense:
            def single(eps, dg):
                nS = dg.ndim - 1

                def leaf(e):
                    d = dg.reshape(dg.shape + (1,) * (e.ndim - nS - 1))
                    return jnp.sum(d * e, axis=tuple(range(nS + 1)))
                return jax.tree.map(leaf, eps)
        else:
            def single(eps, dg):
                k = dg.shape[-1]
                acc = None
                for i in range(k):
                    t = op.yw_to_w(dg[..., i], eps[i])
                    acc = t if acc is None else _tree_add(acc, t)
                return acc
        if bshape:
            return sum_leading(lambda b: single(jax.tree.map(lambda e: e[b], eps), dg[b]),
                               bshape[0])
        return single(eps, dg)

    # -- assembly -----------------------------------------------------------------------
    def build(self) -> CompiledStep:
        emitter = self

        @jax.custom_vjp
        def step(theta_t, theta_p, args, hidden, others, traces):
            return emitter._forward(theta_t, theta_p, args, hidden, others, traces)[0]

        def fwd(theta_t, theta_p, args, hidden, others, traces):
            outs, xs = emitter._forward(theta_t, theta_p, args, hidden, others, traces)
            new_traces = outs[3]
            res = (theta_t, theta_p, args, hidden, others, traces, new_traces,
                   tuple(x if x is not None else jnp.zeros(()) for x in xs))
            return outs, res

        def bwd(res, cts):
            return emitter._backward(res, cts)

        step.defvjp(fwd, bwd)
        fn = jax.jit(step) if self.do_jit else step

        def init_traces():
            return tuple(jnp.zeros(ent[-2], ent[-1]) for ent in self.L.traces)

        names = tuple(":".join(str(p) for p in ent[:-2]) for ent in self.L.traces)
        notes = tuple(f"{n}: {tuple(ent[-2])}" for n, ent in zip(names, self.L.traces))
        return CompiledStep(self.g, "jax", fn, init_traces, names, self.L, notes, emitter=self)
