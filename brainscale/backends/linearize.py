"""The forward of the compiled step: one linearised evaluation giving ``J`` and ``df``.

One evaluation of the traced step where every trace op computes
``y = op(stop_gradient(x), θ) + ξ`` is linearised. Tangents of that linear map give, per
hidden group, the element-wise Jacobian ``J`` (one tangent per state index ``j``, ones on
``h_j^{t-1}`` of every group at once: groups never interact element-wise) and, per
(op, group), ``df`` (ones on ``ξ_q``; ops reaching disjoint groups share one tangent). Paths
through a trace op's input are cut by the ``stop_gradient``: the diagonal approximation. No
dense N×N Jacobian is ever formed (algorithms.md sections 2-4; docs/design.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _compat as C

__all__ = ["Linearizer", "Forward", "sg", "StepLinearization", "step_function", "full_linearize",
           "block_jacobian", "output_vars"]

sg = jax.lax.stop_gradient


class Forward:
    """What one forward evaluation gives the trace rules.

    ``outs``: every jaxpr output; ``xs``: op name -> its input ``x`` (None for ops without
    one); ``J``: group id -> ``(..., k, k)``; ``DF``: (op name, group id) -> ``(..., k)``;
    ``PSI``: group id -> ``(..., k)``, ``ψ = ∂z^t/∂h^t`` at the group's output ``z`` (only
    for the groups of ``filter=kappa_out`` traces); ``XT``: (op name, group id) ->
    ``x.shape + (k,)``, the tangent of the op's input along ``J``'s direction ``j`` (ones on
    state ``j`` of every group; only for the ops of :attr:`Linearizer.x_tangents`).
    """
    __slots__ = ("outs", "xs", "J", "DF", "PSI", "XT")

    def __init__(self, outs, xs, J, DF, PSI=None, XT=None):
        self.outs, self.xs, self.J, self.DF = outs, xs, J, DF
        self.PSI = {} if PSI is None else PSI
        self.XT = {} if XT is None else XT


class Linearizer:
    """Evaluates the traced step of ``graph`` (see the module docstring)."""

    def __init__(self, graph, binding):
        self.g = graph
        self.b = binding
        self.closed = graph.info.jaxpr
        self.jaxpr = C.open_jaxpr(self.closed)
        self.consts = C.closed_consts(self.closed)
        self.op_of_eqn = {o.eqn: o for o in graph.ops}
        #: plain-weight linear maps the IR cuts: eqn -> the plain weight's operand position
        self.cut_weight = {e: w for e, w, _ in graph.cuts}
        self.hid_pos = {h.name: k for k, h in enumerate(graph.hidden)}
        self.hid_of_var: dict = {}
        for k, h in enumerate(graph.hidden):
            self.hid_of_var.setdefault(self.jaxpr.outvars[h.outvar], []).append(k)
        traced = {rid for t in graph.traces if t.dim in ("param", "io") for rid in t.relations}
        self.traced = [r for r in graph.relations if r.id in traced]
        #: groups whose output z the forward differentiates (filter=kappa_out): id -> var
        self.out_var = output_vars(graph, self.jaxpr)
        #: (op name, group id) pairs whose input tangent along J's directions the forward
        #: returns (``Forward.XT``; set by a program that needs it, e.g. scope=block)
        self.x_tangents: tuple = ()

    # -- evaluation ---------------------------------------------------------------------
    def eval(self, ins, on_op=None, on_hidden=None, cut: bool = False,
             captured: dict | None = None) -> list:
        """Evaluate the jaxpr on ``ins``; ``on_op(op, eqn, invals) -> outs`` replaces trace-op
        equations, ``on_hidden(k, value) -> value`` sees every new hidden value; with ``cut``
        the activity operand of every cut plain-weight map (``graph.cuts``) is
        ``stop_gradient``-ed (paths through it leave J and df, as through a trace op's
        input); ``captured`` (a dict var -> None) receives the value of each of its
        variables (after ``on_hidden``)."""
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
            o = op_of_eqn.get(ei)
            if o is not None and on_op is not None:
                outs = on_op(o, eqn, invals)
            elif cut and ei in self.cut_weight:
                w = self.cut_weight[ei]
                outs = C.eval_eqn(eqn, [v if i == w else sg(v) for i, v in enumerate(invals)])
            else:
                outs = C.eval_eqn(eqn, invals)
            for v, val in zip(eqn.outvars, outs):
                if on_hidden is not None and v in hid_of_var:
                    for k in hid_of_var[v]:
                        val = on_hidden(k, val)
                env[v] = val
                if captured is not None and v in captured:
                    captured[v] = val
        return [rd(v) for v in jaxpr.outvars]

    def forward(self, theta_t, theta_p, args, hidden, others) -> Forward:
        g, b = self.g, self.b
        ins_fixed = b.assemble(theta_t, theta_p, args, [None] * len(hidden), others)
        names = [o.name for o in g.ops]
        pos = {n: i for i, n in enumerate(names)}
        cap_vars = list(self.out_var.values())

        def F(h_prev, xi, o=None):
            ins = list(ins_fixed)
            for i, v in zip(b.hidden_idx, h_prev):
                ins[i] = v
            xs = {}

            def on_op(o_, eqn, invals):
                nx = o_.n_x_leaves
                xs[o_.name] = invals[0] if nx else None
                x_in = invals[:nx] if o_.x_elementwise else [sg(v) for v in invals[:nx]]
                y = C.eval_eqn(eqn, list(x_in) + list(invals[nx:]))[0]
                return [y + xi[pos[o_.name]]]
            if o is None:
                outs = self.eval(ins, on_op=on_op, cut=True)
                return outs, [xs[n] if xs.get(n) is not None else jnp.zeros(()) for n in names]
            captured = dict.fromkeys(cap_vars)
            outs = self.eval(ins, on_op=on_op, cut=True, captured=captured,
                             on_hidden=lambda k, val: val + o[k].astype(val.dtype))
            return (outs, [xs[n] if xs.get(n) is not None else jnp.zeros(()) for n in names],
                    [captured[v] for v in cap_vars])

        xi0 = tuple(jnp.zeros(o.type.shape, o.type.dtype) for o in g.ops)
        h0 = tuple(hidden)
        dirs_h, dirs_xi, jdir, fdir = self._directions(h0, xi0)
        PSI = {}
        if self.out_var:
            # ψ = ∂z^t/∂h^t: a perturbation o_k added to every new hidden value, tangents of
            # ones on o at state j of every output group at once (z is element-wise in its own
            # group's new states only: proven by the verifier), read at each group's z
            gids = list(self.out_var)
            o0 = tuple(jnp.zeros(jnp.shape(h), jnp.result_type(h)) for h in h0)
            kmax = max(g.group_by_id[gid].num_state for gid in gids)
            zh = [jnp.zeros_like(h) for h in h0]
            zx = [jnp.zeros_like(x) for x in xi0]
            dh = [] if dirs_h is None else [[c[i] for c in dirs_h] for i in range(len(dirs_h[0]))]
            dx = [] if dirs_h is None else [[c[i] for c in dirs_xi] for i in range(len(dirs_h[0]))]
            n_old = len(dh)
            do = [zh] * n_old
            for j in range(kmax):
                to = list(zh)
                for gid in gids:
                    grp = g.group_by_id[gid]
                    if j < grp.num_state:
                        k = self.hid_pos[grp.states[j]]
                        to[k] = jnp.ones_like(h0[k])
                do.append(to)
            dh += [zh] * kmax
            dx += [zx] * kmax
            (outs, xs, zs), f_jvp = jax.linearize(F, h0, xi0, o0)
            tang, tx, tz = jax.vmap(f_jvp)(_stack(dh), _stack(dx), _stack(do))
            PSI = {gid: jnp.stack([tz[i][n_old + j] for j in range(g.group_by_id[gid].num_state)],
                                  axis=-1) for i, gid in enumerate(gids)}
            if dirs_h is None:
                tang = None
        elif dirs_h is None:
            outs, xs = F(h0, xi0)
            tang = None
        else:
            (outs, xs), f_jvp = jax.linearize(F, h0, xi0)
            if self.x_tangents:
                tang, tx = jax.vmap(lambda th, t: f_jvp(th, t))(dirs_h, dirs_xi)
            else:
                tang = jax.vmap(lambda th, t: f_jvp(th, t)[0])(dirs_h, dirs_xi)
        J, DF = {}, {}
        if tang is not None:
            hid_t = [tang[b.hidden_out[k]] for k in range(len(g.hidden))]
            for grp in g.groups:
                ks = [self.hid_pos[s] for s in grp.states]
                if grp.id in jdir:
                    J[grp.id] = jnp.stack(
                        [jnp.stack([hid_t[ki][jdir[grp.id][j]] for j in range(len(ks))], axis=-1)
                         for ki in ks], axis=-2)
            for (q, gid), d in fdir.items():
                ks = [self.hid_pos[s] for s in g.group_by_id[gid].states]
                DF[(q, gid)] = jnp.stack([hid_t[ki][d] for ki in ks], axis=-1)
        XT = {}
        if tang is not None and self.x_tangents:
            for q, gid in self.x_tangents:
                t = tx[pos[q]]
                XT[(q, gid)] = jnp.stack([t[jdir[gid][j]] for j in range(len(jdir[gid]))],
                                         axis=-1)
        xs_map = {o.name: (xs[i] if o.n_x_leaves else None) for i, o in enumerate(g.ops)}
        return Forward(outs, xs_map, J, DF, PSI, XT)

    def _directions(self, h0, xi0):
        """Tangent directions: J columns (one per state index) and df (per op colour)."""
        g = self.g
        traced = self.traced
        if not traced:
            return None, None, {}, {}
        groups_needed = sorted({gid for r in traced for gid in r.groups}, key=lambda s: int(s[1:]))
        op_pos = {o.name: q for q, o in enumerate(g.ops)}
        kmax = max(g.group_by_id[gid].num_state for gid in groups_needed)
        dh, dx = [], []
        jdir: dict = {gid: [] for gid in groups_needed}
        for j in range(kmax):
            th = [jnp.zeros_like(h) for h in h0]
            for gid in groups_needed:
                grp = g.group_by_id[gid]
                if j < grp.num_state:
                    k = self.hid_pos[grp.states[j]]
                    th[k] = jnp.ones_like(h0[k])
                    jdir[gid].append(len(dh))
            dh.append(th)
            dx.append([jnp.zeros_like(x) for x in xi0])
        # greedy colouring: ops reaching disjoint groups share a direction
        colours: list[tuple[set, list]] = []
        for r in traced:
            for c in colours:
                if not (c[0] & set(r.groups)) and r.op not in c[1]:
                    c[0].update(r.groups)
                    c[1].append(r.op)
                    break
            else:
                colours.append((set(r.groups), [r.op]))
        fdir = {}
        for groups, ops in colours:
            tx = [jnp.zeros_like(x) for x in xi0]
            for name in ops:
                tx[op_pos[name]] = jnp.ones_like(xi0[op_pos[name]])
            for r in traced:
                if r.op in ops:
                    for gid in r.groups:
                        fdir[(r.op, gid)] = len(dh)
            dh.append([jnp.zeros_like(h) for h in h0])
            dx.append(tx)
        return _stack(dh), _stack(dx), jdir, fdir


def _stack(seq):
    """Directions (a list of per-input lists) as one batch of tangents per input."""
    return tuple(jnp.stack(list(col)) for col in zip(*seq))


def output_vars(graph, jaxpr) -> dict:
    """``{group id: jaxpr var of its output z}`` for the groups of ``filter=kappa_out`` traces
    (``HiddenGroup.output`` names a Value whose equation computes ``z``)."""
    gids = dict.fromkeys(gid for t in graph.traces if t.filter == "kappa_out"
                         for rid in t.relations for gid in graph.relation_by_id[rid].groups)
    out = {}
    for gid in gids:
        v = graph.value_by_name[graph.group_by_id[gid].output]
        out[gid] = jaxpr.eqns[v.eqn].outvars[0]
    return out


# -- the full step (every path, op inputs included): influence-matrix rules ----------------
class StepLinearization:
    """The step linearised in the old hidden states and the trace parameters, with every
    path kept (op inputs included, nothing cut): what exact RTRL, SnAp, OSTL's coupled
    scope and UORO propagate their influence with.

    ``outs``: every jaxpr output; ``jvp(dh, dtheta)``: the output tangents for hidden-state
    tangents ``dh`` (one per ``graph.hidden``) and trace-parameter tangents ``dtheta`` (one
    tuple of leaves per trace parameter), linear and vmappable (the backward's counterpart is
    :func:`brainscale.backends.signals.full_vjp`).
    """
    __slots__ = ("outs", "jvp")

    def __init__(self, outs, jvp):
        self.outs, self.jvp = outs, jvp


def step_function(lin, theta_p, args, others):
    """``F(hidden, theta_t) -> all jaxpr outputs`` of ``lin``'s step, the rest held fixed."""
    b = lin.b

    def F(hidden, theta_t):
        ins = b.assemble(theta_t, theta_p, args, list(hidden), others)
        return tuple(lin.eval(ins))
    return F


def full_linearize(lin, theta_t, theta_p, args, hidden, others) -> StepLinearization:
    """Linearise the whole step at the current values (see :class:`StepLinearization`)."""
    F = step_function(lin, theta_p, args, others)
    primals = (tuple(hidden), tuple(tuple(t) for t in theta_t))
    outs, f_jvp = jax.linearize(F, *primals)
    return StepLinearization(outs, f_jvp)


def block_jacobian(lin, theta_t, theta_p, args, hidden, others, gids,
                   batch_size: int = 64) -> dict:
    """``{group id: (..., k, k)}``: per neuron ``n``, the ``k×k`` block ``∂h_n^t/∂h_n^{t-1}`` of
    the **full** step Jacobian — every path kept, through trace-op inputs and plain weights
    too (``scope='block'``; the ``J`` of the cut linearisation keeps only the paths inside a
    neuron). Extracted exactly with one JVP of the step per (neuron, state) of the group (all
    examples at once; examples never interact), ``batch_size`` directions per vmapped batch,
    so the cost is ``N·k`` tangent evaluations of the step per group, not a dense ``N×N``
    Jacobian in memory."""
    g, b = lin.g, lin.b
    F = step_function(lin, theta_p, args, others)
    theta = tuple(tuple(t) for t in theta_t)
    h0 = tuple(hidden)
    bat = (int(g.batch),) if g.batch else ()
    out = {}
    for gid in gids:
        grp = g.group_by_id[gid]
        ks = [lin.hid_pos[s] for s in grp.states]
        k = len(ks)
        idx = [b.hidden_out[ki] for ki in ks]
        # only the group's new states: the readout and other groups leave the linear map
        _, f_jvp = jax.linearize(lambda h, idx=idx: tuple(F(h, theta)[i] for i in idx), h0)
        vs = tuple(grp.varshape)
        nshape = vs[len(bat):]
        n = int(np.prod(nshape, dtype=np.int64))

        def column(d, ks=ks, k=k, vs=vs, nshape=nshape, n=n, f_jvp=f_jvp):
            ni, j = d // k, d % k
            onehot = (jnp.arange(n) == ni).reshape(nshape)
            th = [jnp.zeros_like(h) for h in h0]
            for jj, ki in enumerate(ks):
                th[ki] = jnp.broadcast_to((onehot & (j == jj)).astype(h0[ki].dtype), vs)
            tang = f_jvp(tuple(th))
            # row i of column (ni, j): output state i at neuron ni, every example
            return jnp.stack([tg.reshape(bat + (n,))[..., ni] for tg in tang], axis=-1)
        cols = jax.lax.map(column, jnp.arange(n * k), batch_size=min(batch_size, n * k))
        cols = cols.reshape((n, k) + bat + (k,))                          # (n, j, *bat, i)
        nb = len(bat)
        blk = jnp.transpose(cols, tuple(range(2, 2 + nb)) + (0, 2 + nb, 1))  # (*bat, n, i, j)
        out[gid] = blk.reshape(bat + nshape + (k, k))
    return out
