"""``scope='block'``: the per-neuron block of the full step Jacobian, from structure.

The block ``JB[n] = ∂h_n^t/∂h_n^{t-1}`` (``k×k`` per neuron) keeps every path of the step from
a neuron's states back to themselves, through trace-op inputs too. In general it takes one
JVP of the step per neuron and state (:func:`~.linearize.block_jacobian`, ``N·k`` tangents
through the recurrent products). When the structure allows, it is exact at the cost of the
D-RTRL forward plus a gather:

    JB[n] = J[n] + Σ_q  DF_q[n] ⊗ Σ_{p: owner(p) = n} W_q[p, n] · ∂x_q[p]/∂h_n

with ``J`` and ``DF_q`` the cut linearisation's (paths inside the neuron; ``∂h_n/∂y_q[n]``),
``∂x_q/∂h`` the op input's tangent along ``J``'s directions, ``W_q`` the weight of a
``MatMulOp`` and ``owner(p)`` the one neuron of the group an input element ``p`` depends on.
The conditions, all proven on the step's structure when the step is emitted
(:func:`block_plan`), never on values:

* no plain-weight map between hidden states (``graph.cuts`` empty): every path that leaves a
  neuron crosses a trace op;
* every trace op whose output reaches the group element-wise (``∂h/∂y_q`` per neuron) is a
  traced ``MatMulOp`` (``y = x W + b``: its input element ``p`` reaches output ``n`` through
  ``W[p, n]`` only), or has an element-wise input (those paths are in ``J`` already);
* no such op's input depends on the output of an op whose input depends on the group (a
  path crossing two ops, e.g. a GRU reset gate inside the recurrent product, needs the
  general method);
* each input element that depends on the group depends on one neuron of it and on no other
  hidden value (the structural pattern of ``x_q`` on the hidden values of the first
  example, :func:`~.sparsity.jvp_pattern`), and no element of another example depends on
  the first example.

Anything else takes the general method, with a step note saying why.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .. import _compat as C

__all__ = ["block_plan", "structured_block"]


class BlockPlan:
    """The structured extraction of one group's block: per op, the owner neuron (flat index,
    or -1) of every element of one example's input ``x`` (flattened)."""
    __slots__ = ("gid", "ops", "owners", "n")

    def __init__(self, gid, ops, owners, n):
        self.gid, self.ops, self.owners, self.n = gid, ops, owners, n


def _is_matmul(obj) -> bool:
    from ..ops import MatMulOp
    return type(obj) is MatMulOp


def block_plan(program, gid):
    """``(BlockPlan, None)`` when group ``gid``'s block can be assembled from structure (see
    the module docstring), else ``(None, why)``."""
    from ..passes.rules import analyze
    from .sparsity import jvp_pattern
    g, b, lin = program.g, program.b, program.lin
    if g.cuts:
        return None, "plain-weight maps between hidden states (their paths cross no trace op)"
    grp = g.group_by_id[gid]
    dep = analyze(g)
    reach = sorted(set().union(*(dep.hidden_out[s].ys for s in grp.states)))
    traced = {(r.op, gid) for r in lin.traced}
    origins = {("h", s_) for s_ in grp.states}
    # ops whose input depends on the group's states by any path (src is transitive)
    driven = {o.name for o in g.ops if dep.op_x[o.name].src & origins}
    ops = []
    for q in reach:
        o = g.op_by_name[q]
        if o.x_elementwise or not o.n_x_leaves:
            continue                              # its input's paths are in J already
        if (q, gid) not in traced:
            return None, f"op {q} reaches the group but keeps no trace here"
        if not _is_matmul(g.op_object(q)):
            return None, f"op {q} is a {o.op_class} (the structured block needs MatMulOp)"
        twice = sorted(q2 for k_, q2 in dep.op_x[q].src if k_ == "y" and q2 in driven)
        if twice:
            return None, (f"op {q}'s input depends on the output of op(s) {', '.join(twice)}, "
                          f"whose input depends on the group (a path through two ops)")
        if g.batch and not o.batched:
            return None, f"op {q}'s input is shared by every example"
        if tuple(o.type.shape) != tuple(grp.varshape):
            return None, f"op {q}'s output {list(o.type.shape)} is not one value per neuron"
        ops.append(q)
    nb = 1 if g.batch else 0
    vs = tuple(grp.varshape)
    n = int(np.prod(vs[nb:], dtype=np.int64))
    if not ops:
        return BlockPlan(gid, (), {}, n), None
    theta_t, theta_p, hidden, others = b.gather(g.info.states)
    jaxpr = lin.jaxpr
    args = tuple(jnp.zeros(jaxpr.invars[i].aval.shape, jaxpr.invars[i].aval.dtype)
                 for i in b.arg_idx)

    def fun(diff, nondiff):
        th_t, th_p, a, oth, hid = nondiff
        hid = list(hid)
        for k, d in enumerate(diff):
            hid[k] = jnp.concatenate([d[None], hid[k][1:]], 0) if nb else d
        ins = b.assemble(th_t, th_p, a, hid, oth)
        xs = {}

        def on_op(o, eqn, invals):
            xs[o.name] = invals[0]
            return C.eval_eqn(eqn, invals)
        lin.eval(ins, on_op=on_op)
        return [xs[q] for q in ops]
    diff = [jnp.asarray(h)[0] if nb else jnp.asarray(h) for h in hidden]
    try:
        pats = jvp_pattern(fun, diff, [theta_t, theta_p, args, others, list(hidden)])
    except ValueError as e:
        return None, f"the input pattern is too large to prove ({e})"
    sizes = [int(np.prod(np.shape(d), dtype=np.int64)) for d in diff]
    offs = np.cumsum([0] + sizes)
    hid_pos = {h.name: k for k, h in enumerate(g.hidden)}
    mine = [hid_pos[s] for s in grp.states]
    col_neuron = np.full(offs[-1], -1, np.int64)          # column -> neuron of the group
    for k in mine:
        col_neuron[offs[k]:offs[k + 1]] = np.arange(n) if sizes[k] == n else -2
    if (col_neuron[np.concatenate([np.arange(offs[k], offs[k + 1]) for k in mine])] < 0).any():
        return None, "the group's states are not one value per neuron"
    owners = {}
    for q, pat in zip(ops, pats):
        rows = pat.reshape((pat.shape[0], -1, pat.shape[-1])) if nb else \
            pat.reshape((1, -1, pat.shape[-1]))
        if nb and rows[1:].any():
            return None, f"op {q}'s input of other examples depends on the first example"
        r0 = rows[0]                                          # (|x|, n_in)
        own = np.full(r0.shape[0], -1, np.int64)
        for p in range(r0.shape[0]):
            cols = np.nonzero(r0[p])[0]
            if cols.size == 0:
                continue
            neu = col_neuron[cols]
            if (neu < 0).all():
                continue                          # no path from the group through it
            if (neu < 0).any():
                return None, (f"an element of op {q}'s input depends on the group and on "
                              f"hidden values outside it")
            if (neu != neu[0]).any():
                return None, f"an element of op {q}'s input depends on several neurons"
            own[p] = neu[0]
        if (own >= 0).any():              # else no path from the group crosses op q
            owners[q] = own
    return BlockPlan(gid, tuple(owners), owners, n), None


def structured_block(program, plan, fwd, theta_t):
    """``(..., k, k)``: group ``plan.gid``'s block of the full step Jacobian (module
    docstring), from the forward's ``J``, ``DF`` and input tangents ``XT``."""
    import brainunit as u
    from ..ops import _param_dict
    g, b = program.g, program.b
    J = fwd.J[plan.gid]
    bat = (int(g.batch),) if g.batch else ()
    k = J.shape[-1]
    out = J.reshape(bat + (plan.n, k, k))
    for q in plan.ops:
        o = g.op_by_name[q]
        op = g.op_object(q)
        w = b.w_tree(o.param, list(theta_t[b.tparam_pos(o.param)]))
        weight = _param_dict(w, "MatMulOp", ("weight",), allow_bare="weight")["weight"]
        W = jnp.asarray(u.get_mantissa(op.effective_weight(weight)))   # W_eff: (I, n)
        own = plan.owners[q]
        valid = own >= 0
        p_idx = np.nonzero(valid)[0]
        sel = W.reshape(-1, W.shape[-1])[p_idx, own[valid]]            # W[p, owner(p)]
        ct = fwd.XT[(q, plan.gid)]                                     # (*bat, *x1, k)
        ct = ct.reshape(bat + (-1, k))[..., p_idx, :]                  # (*bat, P, k)
        vals = ct * sel[:, None].astype(ct.dtype)
        S = jnp.zeros(bat + (plan.n, k), vals.dtype).at[..., own[valid], :].add(vals)
        df = fwd.DF[(q, plan.gid)].reshape(bat + (plan.n, k))          # ∂h_i/∂y_q
        out = out + df[..., :, None] * S[..., None, :]
    return out.reshape(J.shape)
