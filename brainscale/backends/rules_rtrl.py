"""Influence-matrix trace rules: exact RTRL, SnAp-n, OSTL's coupled scope, and UORO.

These rules keep (an estimate of) the influence matrix ``M = ∂h/∂θ`` of one trace parameter
on hidden states, propagated with the *full* step Jacobian — paths through op inputs (the
recurrent weights) included — from the step's linearisation
(:func:`~brainscale.backends.linearize.full_linearize`). They run on the ``jax-zoo``
backend (:mod:`.zoo_step`), whose step hands them that linearisation in the forward and,
in the backward, the full-step VJP and the old trace arrays (docs/rules.md).

* ``scope='coupled'`` (exact RTRL, arrays ``m`` over every hidden state):
  ``M^t = ∂F/∂h^{t-1} · M^{t-1} + ∂F/∂θ`` (one JVP per parameter element, vmapped), and
  ``∂L^t/∂θ = ∂L^t/∂θ|_{h^{t-1}} + ∂L^t/∂h^{t-1} · M^{t-1}`` (one VJP of the step): the
  exact gradient, equal to BPTT's sum over time;
* ``scope='sparse'`` (SnAp-n): the same with ``M`` kept on the SnAp-n pattern — the entries
  ``(h_i, θ_j)`` that ``θ_j`` reaches within n steps of the step's Jacobian pattern — and
  zero elsewhere; at full support it is exact RTRL. The pattern is structural, proven on
  the step's jaxpr for all values (:mod:`.sparsity`); ``M`` is stored dense;
* ``scope='group'`` (OSTL with the recurrent term): ``M`` over the states of the groups the
  parameter's ops drive, propagated with the full Jacobian *within* those states (other
  states held fixed), and contracted with the step's learning signal δ (the spatial signal
  that crosses layers): exact for a single recurrent layer, OSTL's approximation across
  layers;
* ``dim='random'`` (UORO, Tallec & Ollivier 2017): ``M ≈ s̃ θ̃ᵀ`` per example, with fresh
  Rademacher ``ν`` each step: ``s̃ ← ρ₀ J s̃ + ρ₁ ν``, ``θ̃ ← θ̃/ρ₀ + νᵀ(∂F/∂θ)/ρ₁``,
  ``ρ₀ = √(‖θ̃‖/‖J s̃‖)``, ``ρ₁ = √(‖νᵀ∂F/∂θ‖/‖ν‖)``; the gradient is the exact formula
  with ``M^{t-1}`` replaced by ``s̃ θ̃ᵀ``: an unbiased estimate of RTRL's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import BackendError
from ..ir.layout import influence_groups, param_leaves
from .rules import TraceRule, register_trace_rule
from .signals import zero_cotangent_aval

__all__ = ["InfluenceRule", "UORORule", "snap_pattern"]

_WHY = ("passes its rules the full step linearisation (forward) and the full-step VJP and old "
        "trace arrays (backward)")


def _need(ctx, key: str, what: str):
    step = ctx.step or {}
    if step.get(key) is None:
        raise BackendError(
            f"this trace rule needs {what}, which only the jax-zoo step provides; "
            f"online_gradients(chunk=K>1), multi-step windows and the Pallas drivers run the "
            f"diagonal rules only: use chunk=1 / single steps with a brainscale.zoo algorithm")
    return step[key]


class _Layout:
    """Where one trace's arrays are: per covered hidden state (``graph.hidden`` index), the
    array positions of its leaves; the leaf sizes; the parameter's position."""

    def __init__(self, graph, binding, trace):
        rel = graph.relation_by_id[trace.relations[0]]
        self.param = rel.param
        self.pi = binding.tparam_pos(rel.param)
        leaves = param_leaves(graph, rel.param)
        self.leaf_shapes = [tuple(lt.shape) for _, lt in leaves]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.leaf_shapes]
        self.C = int(sum(self.sizes))
        hid_pos = {h.name: k for k, h in enumerate(graph.hidden)}
        self.covered: list = []          # [(hidden index, varshape, {leaf: pos} | pos)]
        self.p_pos: list = []            # u_p positions (random)
        for pos, a in enumerate(trace.arrays):
            if a.role == "u_p":
                self.p_pos.append(pos)
                continue
            grp = graph.group_by_id[a.group]
            k = hid_pos[grp.states[a.state]]
            if not self.covered or self.covered[-1][0] != k:
                self.covered.append((k, tuple(grp.varshape), {}))
            self.covered[-1][2][a.leaf] = pos
        self.groups = influence_groups(graph, trace)

    def stack(self, vals, k_entry, dtype):
        """``(varshape, C)``: one hidden state's blocks of the influence matrix."""
        k, vs, pos = k_entry
        return jnp.concatenate([vals[pos[li]].astype(dtype).reshape(vs + (-1,))
                                for li in range(len(self.sizes))], axis=-1)

    def unstack(self, m, k_entry) -> dict:
        """``{position: block}`` from a ``(varshape, C)`` matrix."""
        k, vs, pos = k_entry
        out, o = {}, 0
        for li, (shape, n) in enumerate(zip(self.leaf_shapes, self.sizes)):
            out[pos[li]] = m[..., o:o + n].reshape(vs + shape)
            o += n
        return out

    def split(self, flat, theta_leaves) -> list:
        """A size-C vector as the parameter's leaves."""
        out, o = [], 0
        for l, shape, n in zip(theta_leaves, self.leaf_shapes, self.sizes):
            out.append(flat[o:o + n].reshape(shape).astype(jnp.result_type(l)))
            o += n
        return out


def _zeros_like_hidden(hidden):
    return tuple(jnp.zeros(jnp.shape(h), jnp.result_type(h)) for h in hidden)


def snap_pattern(program, trace, n: int) -> dict:
    """The SnAp-n pattern of ``trace``: ``{hidden index: bool (varshape, C)}``, the entries
    ``(h_i, θ_j)`` that ``θ_j`` reaches within ``n`` steps.

    Immediate pattern ``P₁ = |∂h^t/∂θ|`` and the step's hidden-to-hidden pattern
    ``A = |∂h^t/∂h^{t-1}|``, both *structural*: proven on the step's jaxpr for every value of
    the states, inputs and parameters (:func:`~brainscale.backends.sparsity.jvp_pattern`: a
    surrogate derivative that is zero at some states, a silent spike, a weight that happens
    to be zero do not hide a path; the constants of the model, a sparse matrix's structure
    or a fixed mask, do). Then ``P_n = P_{n-1} ∪ A P_{n-1}``.
    """
    from .sparsity import jvp_pattern
    g, b, lin = program.g, program.b, program.lin
    lay = _Layout(g, b, trace)
    theta_t, theta_p, hidden, others = b.gather(g.info.states)
    jaxpr = lin.jaxpr
    arg_avals = [jaxpr.invars[i].aval for i in b.arg_idx]
    args = tuple(jnp.zeros(av.shape, av.dtype) for av in arg_avals)
    nh = len(hidden)

    def step(diff, nondiff):
        th_t, th_p, a, oth = nondiff
        th = list(th_t)
        th[lay.pi] = tuple(diff[nh:])
        ins = b.assemble(tuple(th), th_p, a, list(diff[:nh]), oth)
        outs = lin.eval(ins)
        return [outs[i] for i in b.hidden_out]
    diff = [jnp.asarray(h) for h in hidden] + [jnp.asarray(l) for l in theta_t[lay.pi]]
    try:
        pats = jvp_pattern(step, diff, [theta_t, theta_p, args, others])
    except ValueError as e:
        raise BackendError(
            f"{trace.id}: SnAp-{n}'s structural pattern is too large to prove ({e}); SnAp keeps "
            f"a dense influence matrix and is meant for small networks: use a smaller layer, "
            f"or e-prop / D-RTRL (scope=diagonal) for this size") from None
    sizes = [int(np.prod(np.shape(h), dtype=np.int64)) for h in hidden]
    offs = np.cumsum([0] + sizes)
    rows = np.concatenate([p.reshape(-1, p.shape[-1]) for p in pats], axis=0)
    A, P = rows[:, :offs[-1]], rows[:, offs[-1]:]
    reach, acc = P.copy(), P.copy()
    for _ in range(int(n) - 1):
        reach = (A.astype(np.int64) @ reach.astype(np.int64)) > 0
        acc |= reach
    return {k: acc[offs[k]:offs[k + 1]].reshape(vs + (lay.C,)) for k, vs, _ in lay.covered}


class InfluenceRule(TraceRule):
    """Exact RTRL (``scope='coupled'``), SnAp-n (``'sparse'``) and OSTL's ``'group'`` scope:
    a dense influence matrix per parameter (see the module docstring)."""
    name = "param/dense influence"
    needs_program = "full-step"
    needs_program_why = _WHY
    #: the gradient is the full-step formula (coupled, sparse); group contracts δ
    full_vjp = True

    def __init__(self, backend=None):
        super().__init__(backend)
        self.masks: dict = {}

    def prepare(self, program, traces) -> None:
        """SnAp: the patterns of the sparse-scope traces (constants of the step)."""
        for t in traces:
            if t.scope == "sparse":
                self.masks[t.id] = {k: jnp.asarray(m) for k, m in
                                    snap_pattern(program, t, t.snap_n).items()}

    def notes(self, graph, traces) -> tuple:
        out = []
        for t in traces:
            if t.id in self.masks:
                nnz = sum(int(m.sum()) for m in self.masks[t.id].values())
                tot = sum(int(m.size) for m in self.masks[t.id].values())
                out.append(f"{t.id}: SnAp-{t.snap_n} pattern keeps {nnz} of {tot} entries")
        return tuple(out)

    def update(self, ctx, traces, arrays):
        """``M ← ∂F/∂h · M + ∂F/∂θ``: one JVP of the step per parameter element. The traces
        over every hidden state (coupled, sparse) share one vmapped JVP over all their
        columns; a group-scope trace runs its own, with the other states' tangents zero."""
        lin = _need(ctx, "full", "the full step linearisation")
        theta_t = ctx.step["inputs"][0]
        hidden = ctx.step["inputs"][3]
        b = ctx.binding
        out = [list(v) for v in arrays]
        batches = [[i for i, t in enumerate(traces) if t.scope != "group"]]
        batches += [[i] for i, t in enumerate(traces) if t.scope == "group"]
        for idx in batches:
            if not idx:
                continue
            lays = [_Layout(ctx.graph, b, traces[i]) for i in idx]
            if self._dense_route(ctx.graph, hidden, lays):
                self._update_dense(ctx, lin, traces, arrays, idx, lays, out)
                continue
            cov = {e[0]: e for e in lays[0].covered}       # the same states for the batch
            offs = np.cumsum([0] + [lay.C for lay in lays])
            dh, axes = [], []
            for k, h in enumerate(hidden):
                if k in cov:
                    dt = jnp.result_type(h)
                    dh.append(jnp.concatenate(
                        [lay.stack(arrays[i], {e[0]: e for e in lay.covered}[k], dt)
                         for i, lay in zip(idx, lays)], axis=-1))
                    axes.append(-1)
                else:
                    dh.append(jnp.zeros(jnp.shape(h), jnp.result_type(h)))
                    axes.append(None)
            owner = {lay.pi: (lay, int(o)) for lay, o in zip(lays, offs[:-1])}

            def theta_tangent(col):
                tan = []
                for pi, leaves in enumerate(theta_t):
                    if pi not in owner:
                        tan.append(tuple(jnp.zeros(jnp.shape(l), jnp.result_type(l))
                                         for l in leaves))
                        continue
                    lay, o = owner[pi]
                    tan.append(tuple(lay.split(col[o:o + lay.C], leaves)))
                return tuple(tan)

            def column(col, dh_col):
                tang = lin.jvp(tuple(dh_col), theta_tangent(col))
                return tuple(tang[b.hidden_out[k]] for k in cov)
            dt = jnp.result_type(*[l for lay in lays for l in theta_t[lay.pi]])
            eye = jnp.eye(int(offs[-1]), dtype=dt)
            cols = jax.vmap(column, in_axes=(0, tuple(axes)), out_axes=-1)(eye, tuple(dh))
            for k, m in zip(cov, cols):
                for i, lay, o in zip(idx, lays, offs[:-1]):
                    mt = m[..., int(o):int(o) + lay.C]
                    masks = self.masks.get(traces[i].id)
                    if masks is not None:
                        mt = jnp.where(masks[k], mt, jnp.zeros((), mt.dtype))
                    entry = {e[0]: e for e in lay.covered}[k]
                    for pos, v in lay.unstack(mt, entry).items():
                        out[i][pos] = v
        return out

    @staticmethod
    def _dense_route(graph, hidden, lays) -> bool:
        """Whether to form ``J`` and ``∂F/∂θ`` per example (``N + B·N`` JVPs / VJPs) instead
        of one JVP per parameter element: when that is fewer, and no op couples the
        examples (a batch-statistics normalisation does)."""
        if any(getattr(graph.op_object(o.name), "batch_jacobian", None) is not None
               for o in graph.ops):
            return False
        lead = 1 if graph.batch else 0
        cov = {e[0] for e in lays[0].covered}
        n_ex = sum(int(np.prod(np.shape(h)[lead:], dtype=np.int64))
                   for k, h in enumerate(hidden) if k in cov)
        B = int(graph.batch) if graph.batch else 1
        return n_ex * (B + 1) < sum(lay.C for lay in lays)

    def _update_dense(self, ctx, lin, traces, arrays, idx, lays, out) -> None:
        """``M ← J M + D`` with the per-example step Jacobian ``J`` among the covered hidden
        states (one JVP per hidden value, shared by the examples; the other states' tangents
        zero) and ``D = ∂F/∂θ`` (one VJP per example and covered hidden value)."""
        b, g = ctx.binding, ctx.graph
        theta_t = ctx.step["inputs"][0]
        hidden = ctx.step["inputs"][3]
        lead = (int(g.batch),) if g.batch else ()
        cov = [e[0] for e in lays[0].covered]
        shapes = {k: tuple(np.shape(hidden[k])) for k in cov}
        per = {k: shapes[k][len(lead):] for k in cov}
        sizes = [int(np.prod(per[k], dtype=np.int64)) for k in cov]
        offs = dict(zip(cov, np.cumsum([0] + sizes)[:-1].tolist()))
        n_ex = int(sum(sizes))
        dt = jnp.result_type(*[l for lay in lays for l in theta_t[lay.pi]])
        zero_h = _zeros_like_hidden(hidden)
        zero_th = tuple(tuple(jnp.zeros(jnp.shape(l), jnp.result_type(l)) for l in ls)
                        for ls in theta_t)
        size = dict(zip(cov, sizes))

        def dir_tangent(e):              # a one-hot over one example's covered values
            return tuple(jnp.broadcast_to(e[offs[k]:offs[k] + size[k]].reshape(per[k]),
                                          shapes[k]).astype(jnp.result_type(h))
                         if k in offs else zero_h[k] for k, h in enumerate(hidden))

        def j_col(e):
            tang = lin.jvp(dir_tangent(e), zero_th)
            return jnp.concatenate([tang[b.hidden_out[k]].astype(dt).reshape(lead + (-1,))
                                    for k in cov], axis=-1)
        J = jax.vmap(j_col, out_axes=-1)(jnp.eye(n_ex, dtype=dt))       # (lead, out, in)
        zeros_ct = [zero_cotangent_aval(jax.ShapeDtypeStruct(jnp.shape(o), jnp.result_type(o)))
                    for o in lin.outs]
        transpose = jax.linear_transpose(lambda th: lin.jvp(zero_h, th), zero_th)

        def d_row(e):                    # e: a one-hot over (lead, n_ex)
            cts = list(zeros_ct)
            for k in cov:
                cts[b.hidden_out[k]] = e[..., offs[k]:offs[k] + size[k]].reshape(
                    shapes[k]).astype(jnp.result_type(hidden[k]))
            (dth,) = transpose(tuple(cts))
            return jnp.concatenate([jnp.ravel(l).astype(dt) for lay in lays
                                    for l in dth[lay.pi]])
        rows = int(np.prod(lead, dtype=np.int64)) * n_ex
        D = jax.vmap(d_row)(jnp.eye(rows, dtype=dt).reshape((rows,) + lead + (n_ex,)))
        D = D.reshape(lead + (n_ex, -1))                                   # (lead, n_ex, C)
        offs_c = np.cumsum([0] + [lay.C for lay in lays])
        M = jnp.concatenate(
            [jnp.concatenate([lay.stack(arrays[i], {e[0]: e for e in lay.covered}[k], dt)
                              .reshape(lead + (size[k], lay.C)) for k in cov], axis=-2)
             for i, lay in zip(idx, lays)], axis=-1)                       # (lead, n_ex, C)
        M = jnp.einsum("...ij,...jc->...ic", J, M) + D
        for k in cov:
            mk = M[..., offs[k]:offs[k] + size[k], :].reshape(shapes[k] + (-1,))
            for i, lay, o in zip(idx, lays, offs_c[:-1]):
                mt = mk[..., int(o):int(o) + lay.C]
                masks = self.masks.get(traces[i].id)
                if masks is not None:
                    mt = jnp.where(masks[k], mt, jnp.zeros((), mt.dtype))
                entry = {e[0]: e for e in lay.covered}[k]
                for pos, v in lay.unstack(mt, entry).items():
                    out[i][pos] = v

    def grad(self, ctx, traces, arrays, delta):
        b = ctx.binding
        out = []
        for t, vals in zip(traces, arrays):
            lay = _Layout(ctx.graph, b, t)
            theta_leaves = ctx.theta_t[lay.pi]
            dt = jnp.result_type(*theta_leaves)
            if t.readout == "trace":
                # δ (the spatial signal) with the new influence of the traced groups
                acc = jnp.zeros((lay.C,), dt)
                for entry in lay.covered:
                    m = lay.stack(vals, entry, dt)
                    acc = acc + jnp.sum(delta[entry[0]].astype(dt)[..., None] * m,
                                        axis=tuple(range(m.ndim - 1)))
                out.extend((lay.pi, li, g) for li, g in enumerate(lay.split(acc, theta_leaves)))
                continue
            g_hprev, g_theta = _need(ctx, "vjp", "the full-step VJP")
            old = ctx.step["old"][t.id]
            acc = jnp.zeros((lay.C,), dt)
            for entry in lay.covered:
                m = lay.stack(old, entry, dt)
                acc = acc + jnp.sum(g_hprev[entry[0]].astype(dt)[..., None] * m,
                                    axis=tuple(range(m.ndim - 1)))
            for li, (g_inst, g_prev) in enumerate(zip(g_theta[lay.pi],
                                                      lay.split(acc, theta_leaves))):
                out.append((lay.pi, li, g_inst + g_prev))
        return out


for _scope in ("coupled", "sparse", "group"):
    register_trace_rule("param", "dense", scope=_scope)(InfluenceRule)


class UORORule(TraceRule):
    """UORO: a rank-1 unbiased estimate ``s̃ θ̃ᵀ`` of the influence matrix per example (see
    the module docstring); ``ν`` comes from the step's random key (``aux['key']``)."""
    name = "random uoro"
    needs_program = "full-step"
    needs_program_why = _WHY
    full_vjp = True
    eps = 1e-7

    def update(self, ctx, traces, arrays):
        lin = _need(ctx, "full", "the full step linearisation")
        aux = ctx.step.get("aux") or {}
        key = aux.get("key")
        if key is None:
            raise BackendError("a UORO trace needs a random key each step: call the learner "
                               "(brainscale.zoo.UOROAlgorithm), which draws one")
        theta_t = ctx.step["inputs"][0]
        hidden = ctx.step["inputs"][3]
        b, g = ctx.binding, ctx.graph
        batched = bool(g.batch)
        zeros_ct = [zero_cotangent_aval(jax.ShapeDtypeStruct(jnp.shape(o), jnp.result_type(o)))
                    for o in lin.outs]
        zero_h = _zeros_like_hidden(hidden)
        zero_th = tuple(tuple(jnp.zeros(jnp.shape(l), jnp.result_type(l)) for l in ls)
                        for ls in theta_t)
        transpose = jax.linear_transpose(lin.jvp, zero_h, zero_th)
        out = []
        for t, vals in zip(traces, arrays):
            lay = _Layout(g, b, t)
            kt = jax.random.fold_in(key, int(t.id[1:]))
            s_old = {e[0]: vals[e[2][None]] for e in lay.covered}
            p_old = [vals[pos] for pos in lay.p_pos]
            # J s̃
            dh = tuple(s_old[k].astype(jnp.result_type(h)) if k in s_old else zero_h[k]
                       for k, h in enumerate(hidden))
            tang = lin.jvp(dh, zero_th)
            Js = {k: tang[b.hidden_out[k]] for k in s_old}
            nu = {k: jax.random.rademacher(jax.random.fold_in(kt, k), jnp.shape(hidden[k]),
                                           jnp.result_type(hidden[k])) for k in s_old}

            def nu_dtheta(mask):
                cts = list(zeros_ct)
                for k, v in nu.items():
                    cts[b.hidden_out[k]] = v * mask.reshape(mask.shape + (1,) * (v.ndim - 1)) \
                        if batched else v
                _, dth = transpose(tuple(cts))
                return jnp.concatenate([jnp.ravel(l) for l in dth[lay.pi]])
            dt = jnp.result_type(*theta_t[lay.pi])
            if batched:
                B = int(g.batch)
                nd = jax.vmap(nu_dtheta)(jnp.eye(B, dtype=dt))                  # (B, C)
            else:
                nd = nu_dtheta(jnp.ones((), dt))                                 # (C,)
            lead = (int(g.batch),) if batched else ()
            p_flat = jnp.concatenate([p.astype(dt).reshape(lead + (-1,))
                                      for p in p_old], axis=-1)

            def norm_h(d):        # per example, over every covered state
                tot = 0.
                for v in d.values():
                    v = v.astype(dt)
                    tot = tot + jnp.sum(v * v, axis=tuple(range(len(lead), v.ndim)))
                return jnp.sqrt(tot)
            n_p = jnp.sqrt(jnp.sum(p_flat * p_flat, axis=-1))
            n_js, n_nu = norm_h(Js), norm_h(nu)
            n_nd = jnp.sqrt(jnp.sum(nd * nd, axis=-1))
            rho0 = jnp.sqrt((n_p + self.eps) / (n_js + self.eps))
            rho1 = jnp.sqrt((n_nd + self.eps) / (n_nu + self.eps))

            def per_ex(r, v):     # a per-example scale on a state / leaf
                return r.reshape(r.shape + (1,) * (v.ndim - r.ndim))
            new = list(vals)
            for k, _, pos in lay.covered:
                new[pos[None]] = per_ex(rho0, Js[k]) * Js[k] + per_ex(rho1, nu[k]) * nu[k]
            p_new = p_flat / per_ex(rho0, p_flat) + nd / per_ex(rho1, nd)
            o = 0
            for pos, shape, n in zip(lay.p_pos, lay.leaf_shapes, lay.sizes):
                new[pos] = p_new[..., o:o + n].reshape(lead + shape)
                o += n
            out.append(new)
        return out

    def grad(self, ctx, traces, arrays, delta):
        g_hprev, g_theta = _need(ctx, "vjp", "the full-step VJP")
        b, g = ctx.binding, ctx.graph
        lead = (int(g.batch),) if g.batch else ()
        out = []
        for t, vals in zip(traces, arrays):
            lay = _Layout(g, b, t)
            old = ctx.step["old"][t.id]
            dt = jnp.result_type(*ctx.theta_t[lay.pi])
            proj = 0.
            for k, _, pos in lay.covered:
                s = old[pos[None]].astype(dt)
                gh = g_hprev[k].astype(dt)
                proj = proj + jnp.sum(gh * s, axis=tuple(range(len(lead), s.ndim)))
            p_flat = jnp.concatenate([old[pos].astype(dt).reshape(lead + (-1,))
                                      for pos in lay.p_pos], axis=-1)
            acc = proj[..., None] * p_flat if lead else proj * p_flat
            acc = jnp.sum(acc, axis=0) if lead else acc
            for li, (g_inst, g_prev) in enumerate(zip(g_theta[lay.pi],
                                                      lay.split(acc, ctx.theta_t[lay.pi]))):
                out.append((lay.pi, li, g_inst + g_prev))
        return out


register_trace_rule("random", scope="coupled")(UORORule)
