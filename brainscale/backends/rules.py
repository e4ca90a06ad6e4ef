"""The trace-rule table: how each kind of trace is updated and turned into gradients.

A rule runs the traces whose ``(dim, layout, path)`` it is registered for (``layout`` is
None for io-dim traces), and, for a trace off the default rule axes (docs/rules.md), its
non-default axes: the key is then ``(dim, layout, path, ((axis, value), ...))`` (see
:func:`rule_key`). The learning-signal axis is not part of a rule: a rule registered without
it runs a trace with any ``signal`` the backend computes (``Backend.signals``: the plain JAX
and Pallas backends compute ``symmetric``; the ``jax-zoo`` backend of
:mod:`brainscale.backends.zoo_step` every value). It reads the trace arrays the IR lists (``Trace.arrays``, in their
storage dtype) and returns new values for exactly those arrays, and the gradient terms
they give. Rules are looked up per trace when a step is emitted; a backend adds platform
variants by registering rules under its own ``path`` (the way ``mlir.register_lowering``
takes a ``platform``), e.g. the Pallas backend registers ``('param', 'compact', 'pallas')``.

The JAX rules (path ``'jax'``) implement algorithms.md sections 3-4:

* ``('param', 'compact')``: ``ε_i ← Σ_j yw_to_w(J[:,i,j], ε_j) + xy_to_dw(x, df[:,i])`` per
  example (or the op's fused ``drtrl_update``), gradient ``Σ_i yw_to_w(δ_i, ε_i)``;
* ``('param', 'channel')``: the same per output neuron ``n`` on the slice ``θ[.., c(n)]`` of its
  channel (the rest is zero at every step), ``∂y_n/∂θ`` restricted to it from the op's
  ``channel_jacobian``, gradient summed over the neurons of each channel;
* ``('param', 'dense')``: the exact per-output-neuron trace
  ``ε[n,i,θ] ← Σ_j J[n,i,j] ε[n,j,θ] + df[n,i] ∂y_n/∂θ``, gradient ``Σ_n,i δ[n,i] ε[n,i,θ]``;
* ``('io', None)``: ``ε_x ← α ε_x + x``, ``ε_f ← α J ε_f + (1-α) df``, gradient
  ``xy_to_dw(ε_x, Σ_i ε_f[:,i] δ_i)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ..concepts import param_jacobian, sum_leading
from ..errors import BackendError
from ..ir.layout import batch_shape, neuron_shape
from .linearize import sg

__all__ = ["TraceRule", "RuleContext", "ParamBlock", "TRACE_RULES", "register_trace_rule",
           "rule_key", "make_rule", "RULE_AXES", "backend_signals", "check_signal",
           "param_blocks", "drtrl_compact", "drtrl_dense", "drtrl_channel", "contract_channel",
           "contract_param", "plain_matmul_error", "chain_is_one", "ParamCompactRule",
           "ParamDenseRule", "ParamChannelRule", "IORule"]

#: (dim, layout | None, path) -> factory ``(backend) -> TraceRule``
TRACE_RULES: dict[tuple, Callable[[Any], "TraceRule"]] = {}


#: rule axes that select a rule (the learning signal and the schedule do not: see above)
RULE_AXES = ("recursion", "scope", "filter")


def _axes_key(axes) -> tuple:
    return tuple(sorted((k, v) for k, v in dict(axes).items()))


def register_trace_rule(dim: str, layout: str | None = None, path: str = "jax", **axes):
    """Decorator registering a rule factory (a class taking the backend) for a trace kind;
    ``axes`` are its non-default rule axes (e.g. ``scope='coupled'``)."""
    bad = [k for k in axes if k not in RULE_AXES]
    if bad:
        raise ValueError(f"register_trace_rule: {bad} do not select a rule; rule axes are "
                         f"{', '.join(RULE_AXES)}")
    key = (dim, layout, path) + ((_axes_key(axes),) if axes else ())

    def deco(factory):
        TRACE_RULES[key] = factory
        return factory
    return deco


def rule_key(trace) -> tuple:
    """``(dim, layout, path)`` plus, for a trace off the default axes, its non-default rule
    axes and learning signal: the key a step groups traces by (one rule call per key)."""
    from ..ir.nodes import AXIS_DEFAULTS
    base = (trace.dim, trace.layout if trace.dim == "param" else None, trace.path)
    extra = {k: getattr(trace, k) for k in RULE_AXES + ("signal", "readout")
             if getattr(trace, k) != AXIS_DEFAULTS[k]}
    return base + ((_axes_key(extra),) if extra else ())


def backend_signals(backend) -> frozenset:
    """The learning signals a backend's step computes (``symmetric`` unless it says more)."""
    return frozenset(getattr(backend, "signals", ("symmetric",)))


def make_rule(trace, backend) -> "TraceRule":
    """The rule that runs ``trace`` on ``backend``, or a BackendError naming the trace."""
    from ..ir.nodes import AXIS_DEFAULTS
    name = getattr(backend, "name", backend)
    if trace.signal not in backend_signals(backend):
        raise BackendError(
            f"trace {trace.id} has signal={trace.signal}, a learning signal the step of "
            f"backend {name!r} does not compute (it computes "
            f"{', '.join(sorted(backend_signals(backend)))}); compile with backend='jax-zoo' "
            f"or with an algorithm of brainscale.zoo (e.g. EPropAlgorithm, ThreeFactorAlgorithm)")
    extra = {k: getattr(trace, k) for k in RULE_AXES if getattr(trace, k) != AXIS_DEFAULTS[k]}
    key = (trace.dim, trace.layout if trace.dim == "param" else None, trace.path) + \
        ((_axes_key(extra),) if extra else ())
    factory = TRACE_RULES.get(key)
    if factory is None:
        def fmt(k):
            s = f"{k[0]}/{k[1] or '-'}/{k[2]}"
            return s + "".join(f" {a}={v}" for a, v in k[3]) if len(k) > 3 else s
        known = ", ".join(sorted(fmt(k) for k in TRACE_RULES))
        axes = "".join(f", {a}={v}" for a, v in extra.items())
        raise BackendError(
            f"trace {trace.id} (dim={trace.dim}, layout={trace.layout}, path={trace.path}{axes}) "
            f"has no trace rule on backend {name!r}; registered rules "
            f"(dim/layout/path axes): {known}")
    rule = factory(backend)
    need = getattr(rule, "needs_program", None)
    if need and need not in getattr(backend, "program_features", ()):
        raise BackendError(
            f"trace {trace.id} ({', '.join(f'{a}={v}' for a, v in trace.axes) or trace.dim}) "
            f"needs a step that {rule.needs_program_why}; backend {name!r} does not emit one. "
            f"Compile with backend='jax-zoo' or an algorithm of brainscale.zoo (e.g. "
            f"RTRLAlgorithm)")
    if trace.readout == "step" and "step-readout" not in getattr(backend, "program_features", ()):
        raise BackendError(
            f"trace {trace.id} has readout=step (the last step exact: its gradient reads the "
            f"previous trace through one VJP of the whole step); the step of backend {name!r} "
            f"does not compute that VJP. Compile with backend='jax-zoo' or an algorithm of "
            f"brainscale.zoo (e.g. DNIAlgorithm, RuleAlgorithm(model, readout='step'))")
    return rule


@dataclass(frozen=True)
class RuleContext:
    """What a rule may read: the graph, the binding, the op VJPs, the parameters and (in
    the forward) ``fwd`` = :class:`~brainscale.backends.linearize.Forward`.

    A step that runs rules needing more (``TraceRule.needs_program``, the ``jax-zoo``
    backend) fills ``step``: a dict with the step's inputs, its full linearisation
    (forward), the old trace arrays and the cotangents and full-step VJP (backward), and the
    auxiliary per-call inputs (random keys, a modulator, synthetic-gradient parameters).
    """
    graph: Any
    binding: Any
    signals: Any
    theta_t: tuple
    fwd: Any = None
    step: Any = None

    def op(self, op_name: str):
        return self.graph.op_object(op_name)

    def w(self, param_name: str):
        pi = self.binding.tparam_pos(param_name)
        return self.binding.w_tree(pi, self.theta_t[pi])


class TraceRule:
    """Base class of trace rules (see the module docstring).

    ``update(ctx, traces, arrays)`` gets the traces this rule runs and, per trace, the list
    of its current array values (``Trace.arrays`` order); it returns the new values, same
    structure. ``grad(ctx, traces, arrays, delta)`` gets the new values and the learning
    signal (one array per hidden state) and returns ``[(param position, leaf, gradient)]``.
    ``check(graph, trace)`` may refuse a trace at emit time (a message, or None).
    A rule may define ``one_pass(ctx, traces, arrays, delta, grad_acc)`` (update and grad
    from the old arrays in one sweep, for step-owning drivers). An io-dim rule may define
    ``step_accumulate(eps_x, signal, grad, chain) -> grad`` (the contract of
    :func:`~.online_driver.window_accumulate`): the step-owning loop then adds each
    plain-matmul relation's per-step gradient into the running sum with it; with
    ``step_accumulate_multi([(eps_x, signal, grad, chain), ...]) -> [grad, ...]`` it adds
    all of a step's in one call.
    """
    name = "rule"
    one_pass = None
    step_accumulate = None
    step_accumulate_multi = None
    #: a program feature the rule needs beyond the plain step (None: runs anywhere); the
    #: backend lists the features its step offers in ``program_features``
    needs_program: str | None = None
    needs_program_why: str = ""

    def __init__(self, backend=None):
        self.backend = backend

    def check(self, graph, trace) -> str | None:
        return None

    def update(self, ctx: RuleContext, traces: Sequence, arrays: Sequence[list]) -> list:
        raise NotImplementedError(f"{type(self).__name__} must implement update()")

    def grad(self, ctx: RuleContext, traces: Sequence, arrays: Sequence[list], delta) -> list:
        raise NotImplementedError(f"{type(self).__name__} must implement grad()")

    def notes(self, graph, traces) -> tuple:
        return ()


def plain_matmul_error(op) -> str | None:
    """None when ``op`` is a :class:`~brainscale.MatMulOp` whose math is the built-in one
    (so its weight gradient is ``c ⊙ (xᵀ s)``), else why not."""
    from ..ops import MatMulOp
    if not isinstance(op, MatMulOp):
        return f"op class {type(op).__name__}: only MatMulOp has the (x, s) product form"
    for meth in ("xw_to_y", "drtrl_update", "drtrl_grad", "effective_weight", "_chain"):
        if getattr(type(op), meth) is not getattr(MatMulOp, meth):
            return f"{type(op).__name__} overrides MatMulOp.{meth}"
    return None


def chain_is_one(op) -> bool:
    """True when ``∂W_eff/∂W`` is 1 (no mask, the default identity ``weight_fn``)."""
    import inspect
    from ..ops import MatMulOp
    default = inspect.signature(MatMulOp.__init__).parameters["weight_fn"].default
    return op.weight_mask is None and op.weight_fn is default


# -- param-dim blocks ------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamBlock:
    """One (relation, group) of a param-dim trace and the positions of its arrays in the
    trace's array list."""
    rid: str
    gid: str
    op: str
    param: str
    k: int
    n_leaves: int
    bshape: tuple
    nS: int                    # len(batch axes) + len(neuron axes) (the dense layout's k axis)
    slots: tuple               # ((leaf, state | None, position, TraceArray), ...)

    def _lookup(self):
        return {(li, si): (pos, a) for li, si, pos, a in self.slots}

    def gather(self, binding, values, dense: bool):
        """Compact: a list of k parameter trees (one per state); dense: one tree with the k
        states stacked. Values are cast to their math dtype."""
        lk = self._lookup()
        if not dense:
            per = []
            for si in range(self.k):
                leaves = []
                for li in range(self.n_leaves):
                    if (li, si) in lk:
                        pos, a = lk[(li, si)]
                        leaves.append(a.from_stored(values[pos]))
                    else:
                        pos, a = lk[(li, None)]
                        leaves.append(a.from_stored(values[pos], si))
                per.append(binding.w_tree(self.param, leaves))
            return per
        leaves = []
        for li in range(self.n_leaves):
            if (li, None) in lk:
                pos, a = lk[(li, None)]
                leaves.append(a.from_stored(values[pos]))
            else:
                parts = [lk[(li, si)][1].from_stored(values[lk[(li, si)][0]])
                         for si in range(self.k)]
                leaves.append(jnp.stack(parts, axis=self.nS))
        return binding.w_tree(self.param, leaves)

    def scatter(self, new, dense: bool) -> dict:
        """``{position: value}`` for the block's arrays from :meth:`gather`'s layout."""
        out = {}
        if not dense:
            per_leaf = [jax.tree.leaves(tree) for tree in new]          # [state][leaf]
            for li, si, pos, a in self.slots:
                if si is not None:
                    out[pos] = per_leaf[si][li]
                else:
                    out[pos] = jnp.stack([per_leaf[s][li] for s in range(self.k)], axis=-1)
            return out
        leaves = jax.tree.leaves(new)
        for li, si, pos, a in self.slots:
            out[pos] = leaves[li] if si is None else jnp.take(leaves[li], si, axis=self.nS)
        return out


def leaf_index(graph, pname: str, leaf_name: str) -> int | None:
    """The index of leaf ``leaf_name`` among parameter ``pname``'s leaves (a bare array is
    the weight, leaf 0), or None when it has no such leaf."""
    fields = getattr(graph.param_by_name[pname].type, "fields", None)
    if fields is None:
        return 0 if leaf_name == "weight" else None
    return next((i for i, (n, _) in enumerate(fields) if n == leaf_name), None)


def param_blocks(graph, trace) -> list[ParamBlock]:
    """The (relation, group) blocks of a param-dim trace, in array order."""
    order, slots = [], {}
    for pos, a in enumerate(trace.arrays):
        key = (a.relation, a.group)
        if key not in slots:
            order.append(key)
            slots[key] = []
        slots[key].append((a.leaf, a.state, pos, a))
    out = []
    for rid, gid in order:
        rel = graph.relation_by_id[rid]
        op = graph.op_by_name[rel.op]
        bshape = batch_shape(graph, gid, op)
        p = graph.param_by_name[rel.param]
        n_leaves = len(getattr(p.type, "leaves", (p.type,)))
        out.append(ParamBlock(rid, gid, rel.op, rel.param, graph.group_by_id[gid].num_state,
                              n_leaves, bshape, len(bshape) + len(neuron_shape(op)),
                              tuple(slots[(rid, gid)])))
    return out


def check_signal(ctx, traces) -> None:
    """A trace whose learning signal is not ``symmetric``, or whose read-out is not
    ``trace``, gets its δ from a step that computes that signal (``ctx.step`` set, the
    jax-zoo backend); a driver that computes the symmetric δ itself (chunked online
    gradients, multi-step windows) must not run it."""
    if ctx.step is None:
        for t in traces:
            if t.signal != "symmetric":
                raise BackendError(
                    f"trace {t.id} has signal={t.signal}, but this driver computes the "
                    f"symmetric learning signal itself (online_gradients(chunk=K>1), "
                    f"multi-step windows): run the learner one step per call (chunk=1)")
            if t.readout != "trace":
                raise BackendError(
                    f"trace {t.id} has readout={t.readout}, which reads the previous trace "
                    f"through one VJP of the whole step; this driver (online_gradients("
                    f"chunk=K>1), multi-step windows) reads δ^t · ε^t: run the learner one "
                    f"step per call (chunk=1)")


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _x_axis(x, bshape, x_batched):
    """vmap axis of the op input: 0 when it carries the batch axis, None when one unbatched
    input (a shared context) feeds every example of a batched group."""
    return 0 if x is not None and bshape and x_batched else None


def drtrl_compact(op, w, eps, J, df, x, bshape, x_batched=True):
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
        return jax.vmap(single, in_axes=(0, 0, 0, _x_axis(x, bshape, x_batched)))(eps, J, df, x)
    return single(eps, J, df, x)


def _per_neuron_update(eps, J, df, G):
    """ε[n,i,p] ← Σ_j J[n,i,j] ε[n,j,p] + df[n,i] G[n,p] per leaf (``n`` the leading batch and
    neuron axes of ``df``; ``G`` a tree like ``eps`` without the state axis)."""
    def leaf_update(e, gl):
        nS = df.ndim - 1
        extra = e.ndim - nS - 1
        Je = J.reshape(J.shape + (1,) * extra)
        dec = jnp.sum(Je * jnp.expand_dims(e, axis=nS), axis=nS + 1)
        dfe = df.reshape(df.shape + (1,) * extra)
        return dec + dfe * jnp.expand_dims(gl, axis=nS)
    return jax.tree.map(leaf_update, eps, G)


def drtrl_channel(op, w, eps, J, df, x, bshape, x_batched=True, axes=None):
    """Per output neuron n of channel c(n): ε[n,i,p] ← Σ_j J[n,i,j] ε[n,j,p] + df[n,i] G[n,p]
    with ``G[n,p] = ∂y_n/∂θ[p, c(n)]`` (:meth:`~brainscale.ETraceOp.channel_jacobian`, for
    the whole batch at once): the dense rule on the entries it can make non-zero.

    ``axes`` are the IR's ``(channel_axis, param_channel_axes)`` of the op, which laid out the
    arrays; the op's ``channel_jacobian`` slices by the axes it declares, so they must agree."""
    if axes is not None:
        mine = op.channel_axes(w)
        mine = None if mine is None else (int(mine[0]), tuple(int(a) for a in mine[1]))
        if mine != (axes[0], tuple(axes[1])):
            raise BackendError(
                f"the IR gives {type(op).__name__} channel_axis={axes[0]}, param_channel_axes="
                f"{list(axes[1])}, but the op declares {mine}: its channel Jacobian would be "
                f"sliced along other axes than the trace arrays; a pass changed the op's "
                f"channel axes (keep the frontend's, or lay the trace out dense)")
    G = op.channel_jacobian(x, w)
    if bshape and not (x_batched and x is not None):     # one input shared by every example
        G = [g.reshape((1,) * len(bshape) + g.shape) for g in G]
    return _per_neuron_update(eps, J, df, jax.tree.unflatten(jax.tree.structure(eps), G))


def contract_channel(eps, dg, bshape, channel_axis: int, leaf_axes):
    """``g[.., c, ..] = Σ_batch Σ_{n: c(n)=c} Σ_i δ[n,i] ε[n,i,p]`` per leaf, the channel put
    back at the leaf's channel axis (``eps`` one tree, states stacked after the neurons)."""
    nb = len(bshape)
    leaves, tdef = jax.tree.flatten(eps)
    nS = dg.ndim - 1 - nb

    def single(e_l, d, la):
        extra = e_l.ndim - nS - 1
        dd = d.reshape(d.shape + (1,) * extra)
        axes = tuple(a for a in range(nS + 1) if a != channel_axis)
        g = jnp.sum(dd * e_l, axis=axes)                       # (C, *rest)
        return jnp.moveaxis(g, 0, la)
    out = []
    for e_l, la in zip(leaves, leaf_axes):
        if nb:
            e2 = e_l.reshape((-1,) + e_l.shape[nb:])
            d2 = dg.reshape((-1,) + dg.shape[nb:])
            out.append(sum_leading(lambda b, e2=e2, d2=d2, la=la: single(e2[b], d2[b], la),
                                   e2.shape[0]))
        else:
            out.append(single(e_l, dg, la))
    return jax.tree.unflatten(tdef, out)


def drtrl_dense(op, w, eps, J, df, x, bshape, x_batched=True):
    """Per output neuron n: ε[n,i,θ] ← Σ_j J[n,i,j] ε[n,j,θ] + df[n,i] ∂y_n/∂θ.

    ``∂y/∂θ`` is the Jacobian of ``xw_to_y`` per example, or of the whole batch at once when
    the op defines ``batch_jacobian(x, w)`` (an op whose output is computed for the batch
    as a whole, e.g. an absorbed normalisation)."""
    def single(eps, J, df, x):
        G = param_jacobian(lambda ww: op.xw_to_y(x, ww), w)                  # (*S, *leaf)
        return _per_neuron_update(eps, J, df, G)
    if bshape:
        batch_jac = getattr(op, "batch_jacobian", None)
        if batch_jac is not None and x_batched:
            return jax.vmap(_per_neuron_update)(eps, J, df, batch_jac(x, w))
        return jax.vmap(single, in_axes=(0, 0, 0, _x_axis(x, bshape, x_batched)))(eps, J, df, x)
    return single(eps, J, df, x)


def contract_param(op, w, eps, dg, dense: bool, bshape):
    """The param-dim gradient ``Σ_batch Σ_i yw_to_w(δ_i, ε_i)`` (compact, ``eps`` a list of k
    trees) or ``Σ_batch Σ_n,i δ[n,i] ε[n,i,θ]`` (dense, ``eps`` one stacked tree)."""
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


def contract_packed(binding, blk, values, dg):
    """The compact gradient of a block whose 2 states are packed in complex arrays (ops in
    ``PAIR_OPS``): ``Σ_batch Re(conj(δ_0 + iδ_1)[.., n] · z[.., n])`` per leaf, reading the
    complex array once (taking its real and imaginary parts first would materialise both
    inside the batch loop)."""
    nb = len(blk.bshape)
    D = jnp.conj(jax.lax.complex(dg[..., 0], dg[..., 1]))            # (*bshape, *neurons)
    lk = blk._lookup()
    leaves = []
    for li in range(blk.n_leaves):
        pos, a = lk[(li, None)]         # the verifier: a block is packed whole or not at all
        z = values[pos]
        lead = z.ndim - D.ndim                                        # leaf's leading axes
        dd = D.reshape(D.shape[:nb] + (1,) * lead + D.shape[nb:])
        if nb:
            z2 = z.reshape((-1,) + z.shape[nb:])
            d2 = dd.reshape((-1,) + dd.shape[nb:])
            g = sum_leading(lambda b: d2[b] * z2[b], z2.shape[0])
        else:
            g = dd * z
        leaves.append(jnp.real(g).astype(a.type.dtype))
    return binding.w_tree(blk.param, leaves)


class _ParamRule(TraceRule):
    dense = False          # per-neuron arrays (layouts channel and dense), states stacked
    channel = False        # layout channel

    def update(self, ctx, traces, arrays):
        fwd = ctx.fwd
        out = []
        for t, vals in zip(traces, arrays):
            new = list(vals)
            for blk in param_blocks(ctx.graph, t):
                op = ctx.op(blk.op)
                o = ctx.graph.op_by_name[blk.op]
                eps = blk.gather(ctx.binding, vals, self.dense)
                x = sg(fwd.xs[blk.op]) if o.n_x_leaves else None
                args = (op, ctx.w(blk.param), eps, fwd.J[blk.gid], fwd.DF[(blk.op, blk.gid)],
                        x, blk.bshape, o.batched)
                if self.channel:
                    res = drtrl_channel(*args, axes=(o.channel_axis, o.param_channel_axes))
                else:
                    res = (drtrl_dense if self.dense else drtrl_compact)(*args)
                for pos, v in blk.scatter(res, self.dense).items():
                    new[pos] = v
            out.append(new)
        return out

    def grad(self, ctx, traces, arrays, delta):
        check_signal(ctx, traces)
        out = []
        for t, vals in zip(traces, arrays):
            for blk in param_blocks(ctx.graph, t):
                dg = ctx.signals.group_delta(blk.gid, delta)
                if self.channel:
                    o = ctx.graph.op_by_name[blk.op]
                    grad = contract_channel(blk.gather(ctx.binding, vals, True), dg, blk.bshape,
                                            o.channel_axis, o.param_channel_axes)
                elif not self.dense and any(a.packed for _, _, _, a in blk.slots):
                    grad = contract_packed(ctx.binding, blk, vals, dg)
                else:
                    eps = blk.gather(ctx.binding, vals, self.dense)
                    grad = contract_param(ctx.op(blk.op), ctx.w(blk.param), eps, dg,
                                          self.dense, blk.bshape)
                pi = ctx.binding.tparam_pos(blk.param)
                out.extend((pi, li, leaf) for li, leaf in enumerate(jax.tree.leaves(grad)))
        return out


@register_trace_rule("param", "compact")
class ParamCompactRule(_ParamRule):
    """D-RTRL with parameter-shaped traces (one per state, or stacked)."""
    name = "param/compact"


@register_trace_rule("param", "dense")
class ParamDenseRule(_ParamRule):
    """D-RTRL with the exact per-output-neuron trace."""
    name = "param/dense"
    dense = True


@register_trace_rule("param", "channel")
class ParamChannelRule(_ParamRule):
    """D-RTRL with the exact per-output-neuron trace of the neuron's channel slice (conv)."""
    name = "param/channel"
    dense = True
    channel = True


def _small_matvec(J, v):
    """``J[.., i, j] v[.., j]`` summed over ``j`` for the k × k per-neuron Jacobian, written
    element-wise: a batched ``dot`` of 2 × 2 blocks is its own (slow) operation on XLA CPU,
    while this fuses with the trace update around it."""
    k = J.shape[-1]
    acc = J[..., 0] * v[..., None, 0]
    for j in range(1, k):
        acc = acc + J[..., j] * v[..., None, j]
    return acc


@register_trace_rule("io")
class IORule(TraceRule):
    """ES-D-RTRL: ``ε_x`` of the shared op input and ``ε_f`` per (relation, group)."""
    name = "io"

    @staticmethod
    def _parts(trace):
        x_pos = next(i for i, a in enumerate(trace.arrays) if a.role == "eps_x")
        fs = [(i, a) for i, a in enumerate(trace.arrays) if a.role == "eps_f"]
        return x_pos, fs

    def update(self, ctx, traces, arrays):
        fwd, g = ctx.fwd, ctx.graph
        out = []
        for t, vals in zip(traces, arrays):
            alpha = float(t.decay)
            new = list(vals)
            x_pos, fs = self._parts(t)
            ax = t.arrays[x_pos]
            first = g.relation_by_id[t.relations[0]].op
            x = sg(fwd.xs[first]).astype(ax.type.dtype)
            new[x_pos] = alpha * vals[x_pos].astype(ax.type.dtype) + x
            for pos, a in fs:
                op = g.relation_by_id[a.relation].op
                Jg, df = fwd.J[a.group], fwd.DF[(op, a.group)]
                new[pos] = alpha * _small_matvec(Jg, vals[pos].astype(a.type.dtype)) \
                    + (1 - alpha) * df
            out.append(new)
        return out

    def signals(self, ctx, traces, arrays, delta) -> list:
        """``[(trace, relation id, ε_x value, Σ_g Σ_i ε_f ∘ δ), ...]``: the io-dim gradient of a
        relation is ``xy_to_dw(ε_x, signal)`` (a step-owning driver may sum these in windows)."""
        check_signal(ctx, traces)
        g = ctx.graph
        out = []
        for t, vals in zip(traces, arrays):
            x_pos, fs = self._parts(t)
            ex = vals[x_pos].astype(t.arrays[x_pos].type.dtype)
            for rid in t.relations:
                c = None
                for pos, a in fs:
                    if a.relation != rid:
                        continue
                    ef = vals[pos].astype(a.type.dtype)
                    ds = ctx.signals.group_delta_parts(a.group, delta)
                    contrib = ef[..., 0] * ds[0]
                    for i in range(1, len(ds)):
                        contrib = contrib + ef[..., i] * ds[i]
                    c = contrib if c is None else c + contrib
                if c is None:
                    continue
                ys = tuple(g.op_by_name[g.relation_by_id[rid].op].type.shape)
                if c.shape != ys:
                    # the op output is broadcast over leading (batch) axes of the group: an
                    # unbatched op feeding batched states; its signal is the sum over them
                    lead = c.ndim - len(ys)
                    c = jnp.sum(c, axis=tuple(range(lead))) if lead > 0 else c
                    c = c.reshape(ys)
                out.append((t, rid, ex, c))
        return out

    def grad(self, ctx, traces, arrays, delta):
        out = []
        for t, rid, ex, c in self.signals(ctx, traces, arrays, delta):
            rel = ctx.graph.relation_by_id[rid]
            pi = ctx.binding.tparam_pos(rel.param)
            grads = ctx.signals.xy_to_dw_eqn(rel.op, ex, c, ctx.theta_t[pi])
            out.extend((pi, li, leaf) for li, leaf in enumerate(grads))
        return out
