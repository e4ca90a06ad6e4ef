"""Frontend: trace one step of a brainstate model and lower its jaxpr into the etrace IR.

The frontend works from the jaxpr only, so whatever the user writes inside ``update``
(helpers, nested modules, ``jax.jit``-ed functions, ``vmap``) is seen. It

1. traces the step with ``brainstate.transform.StatefulFunction`` (all states returned),
2. inlines every ``jit`` call except trace-op markers (see :mod:`brainscale.concepts`),
3. classifies the states: hidden states (``brainstate.HiddenState``, written by the step),
   trace parameters (``ETraceParam`` whose leaves feed a marker), plain parameters,
4. creates one :class:`~brainscale.ir.Op` per marker equation and one
   :class:`~brainscale.ir.Value` per distinct op input.

The result is the ``lower`` stage; analyses are passes.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable

import brainstate
import jax
import numpy as np

from . import _compat as C
from ._group_states import group_states_of, split_group_states
from .concepts import ETraceParam, is_hidden_state, lookup_op
from .errors import UnsupportedModelError
from .ir import Graph, HiddenState, Input, Loc, Op, Param, StepInfo, TensorType, Value, attrs
from .ir.layout import channel_axes_error
from .ir.types import TreeType

__all__ = ["lower", "lower_ops", "trace_step", "state_names"]


def state_names(model: Any) -> dict[int, str]:
    """Map ``id(state)`` to its dotted path inside ``model`` (e.g. ``'neu.V'``)."""
    out: dict[int, str] = {}
    if isinstance(model, brainstate.graph.Node) or hasattr(model, "states"):
        try:
            for path, st in model.states().items():
                out.setdefault(id(st), ".".join(str(p) for p in path))
        except Exception:  # noqa: BLE001 - a plain function has no states()
            pass
    return out


def _unit_of(value: Any) -> str | None:
    try:
        import brainunit as u
        if isinstance(value, u.Quantity):
            unit = value.unit
            if getattr(unit, "is_unitless", False) or str(unit) in ("", "1"):
                return None
            return str(unit)
    except Exception:  # noqa: BLE001
        return None
    return None


def trace_step(fn: Callable, *args, **kwargs):
    """Trace ``fn(*args, **kwargs)`` as one step; return (closed jaxpr, states, StatefulFunction)."""
    sf = brainstate.transform.StatefulFunction(fn, return_only_write=False)
    sf.make_jaxpr(*args, **kwargs)
    closed = sf.get_jaxpr(*args, **kwargs)
    states = tuple(sf.get_states(*args, **kwargs))
    return closed, states, sf


def _loc(eqn) -> Loc | None:
    text = C.eqn_location(eqn)
    return Loc(text) if text else None


def _param_type(value: Any) -> TensorType | TreeType:
    import brainunit as u
    is_q = lambda l: isinstance(l, u.Quantity)  # noqa: E731 - a Quantity is one leaf here
    leaves = jax.tree_util.tree_flatten_with_path(value, is_leaf=is_q)[0]
    fields = []
    for path, leaf in leaves:
        key = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        mant = u.get_mantissa(leaf) if is_q(leaf) else leaf
        mant = np.asarray(mant) if not hasattr(mant, "shape") else mant
        fields.append((key, TensorType(tuple(int(d) for d in np.shape(mant)),
                                       np.dtype(getattr(mant, "dtype", np.float32)).name,
                                       _unit_of(leaf))))
    if len(fields) == 1 and fields[0][0] == "":
        return fields[0][1]
    return TreeType(tuple(fields))


def compact_layout_error(op, value, layout: str = "compact") -> str | None:
    """Why ``op`` may not keep a ``layout`` (compact or channel) param-dim trace of the
    parameter ``value``, or None.

    Legal only when proven for every weight value: the op must define ``yw_to_w``
    (:meth:`~brainscale.ETraceOp.compact_layout_error`; for the channel layout its
    :meth:`~brainscale.ETraceOp.channel_axes`) and every function of the parameter it
    declares element-wise (:meth:`~brainscale.ETraceOp.elementwise_maps`) must be so on
    its jaxpr (:func:`brainscale.passes.rules.elementwise_error`).
    """
    from .passes.rules import elementwise_error
    why = op.channel_layout_error(value) if layout == "channel" else \
        op.compact_layout_error(value)
    if why:
        return why
    for what, fn, v in op.elementwise_maps(value):
        why = elementwise_error(fn, v, what)
        if why:
            return why
    return None


def _x_elementwise_error(op, x_aval, w_value) -> str | None:
    """Why ``y = op(x, w)`` is not element-wise in ``x`` (for every ``x``), or None: the
    claim ``op.x_elementwise`` is proven on the jaxpr of ``xw_to_y`` in ``x``."""
    import jax.numpy as jnp
    from .passes.rules import elementwise_error
    dtype = x_aval.dtype if jnp.issubdtype(x_aval.dtype, jnp.inexact) else jnp.float32
    x0 = jnp.zeros(tuple(x_aval.shape), dtype)      # the structure, on a float input
    return elementwise_error(lambda xx: op.xw_to_y(xx, w_value), x0,
                             f"{type(op).__name__} in its input")


def lower_ops(jaxpr, states, paths, in_slices) -> tuple:
    """Ops, op-input values, params and the batch size of a step's (inlined, open) jaxpr.

    ``states``, ``paths`` and ``in_slices`` describe the step's states (as in
    :class:`~brainscale.ir.StepInfo`). Returns ``(ops, values, params, batch, op_objects)``.
    Also used by passes that rewrite the step's jaxpr (``absorb-normalization``).
    """
    invar_index = {v: i for i, v in enumerate(jaxpr.invars)}
    leaf_owner: dict[int, tuple[int, int]] = {}   # invar index -> (state index, leaf index)
    for si, (a, b) in enumerate(in_slices):
        for k in range(a, b):
            leaf_owner[k] = (si, k - a)
    ops, values = [], []
    op_objects: dict[str, Any] = {}
    value_of_var: dict[Any, str] = {}
    etrace_states: set[int] = set()
    for ei, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name not in C.JIT_NAMES:
            continue
        op = lookup_op(eqn.params.get("name", ""))
        if op is None:
            continue
        ins = list(eqn.invars)
        # the parameter leaves are the trailing inputs and must all be one ETraceParam's leaves
        owner = None
        if ins and not C.is_literal(ins[-1]) and ins[-1] in invar_index:
            owner = leaf_owner.get(invar_index[ins[-1]])
        st = states[owner[0]] if owner else None
        if st is None or not isinstance(st, ETraceParam):
            raise UnsupportedModelError(
                f"the parameter of trace op {type(op).__name__} at {C.eqn_location(eqn) or '?'} "
                f"is not the value of an ETraceParam: pass `param.value` (or call "
                f"`param.execute(x)`) directly; transform weights with the op's weight_fn instead "
                f"of before the call")
        a, b = in_slices[owner[0]]
        n_w = b - a
        w_vars = ins[len(ins) - n_w:]
        if len(ins) < n_w or any(C.is_literal(v) or invar_index.get(v) != a + k
                                 for k, v in enumerate(w_vars)):
            raise UnsupportedModelError(
                f"trace op {type(op).__name__} at {C.eqn_location(eqn) or '?'} must receive the "
                f"whole value of ETraceParam {paths[owner[0]]!r} unchanged")
        etrace_states.add(owner[0])
        x_vars = ins[:len(ins) - n_w]
        if len(x_vars) > 1:
            raise UnsupportedModelError(
                f"trace op {type(op).__name__} at {C.eqn_location(eqn) or '?'} takes "
                f"{len(x_vars)} input arrays; an op input x must be a single array")
        x_name = None
        batched = False
        if x_vars:
            xv = x_vars[0]
            if C.is_literal(xv):
                raise UnsupportedModelError(
                    f"trace op {type(op).__name__} at {C.eqn_location(eqn) or '?'} receives a "
                    f"Python constant as input; pass an array")
            x_name = value_of_var.get(xv)
            if x_name is None:
                x_name = f"%x{len(values)}"
                value_of_var[xv] = x_name
                producer = next((k for k, e in enumerate(jaxpr.eqns[:ei]) if xv in e.outvars), None)
                values.append(Value(x_name, TensorType.from_aval(xv.aval), producer,
                                    loc=_loc(jaxpr.eqns[producer]) if producer is not None else None))
            xnd = len(xv.aval.shape)
            if op.x_ndim is not None:
                if xnd == op.x_ndim + 1:
                    batched = True
                elif xnd != op.x_ndim:
                    raise UnsupportedModelError(
                        f"trace op {type(op).__name__} at {C.eqn_location(eqn) or '?'} got an input "
                        f"of shape {tuple(xv.aval.shape)}; it expects rank {op.x_ndim} (one example) "
                        f"or {op.x_ndim + 1} (a leading batch axis)")
        if len(eqn.outvars) != 1:
            raise UnsupportedModelError(
                f"trace op {type(op).__name__} at {C.eqn_location(eqn) or '?'} returns "
                f"{len(eqn.outvars)} arrays; xw_to_y must return one array")
        y_aval = eqn.outvars[0].aval
        kind = op.kind if op.kind in ("dense", "conv", "sparse", "elemwise", "lora", "function") \
            else "custom"
        layout, why, ch_axes = op.param_trace, None, (None, ())
        if op.param_trace in ("compact", "channel"):
            why = compact_layout_error(op, st.value, op.param_trace)
            if why:
                # exact per-output-neuron trace instead of a compact one that drops terms
                layout = "dense"
            elif layout == "channel":
                n_ax, l_ax = op.channel_axes(st.value)
                ch_axes = (int(n_ax), tuple(int(a) for a in l_ax))
                why = channel_axes_error(
                    tuple(y_aval.shape)[1:] if batched else tuple(y_aval.shape),
                    [np.shape(l) for l in jax.tree.leaves(st.value)], *ch_axes)
                if why:
                    why = f"{type(op).__name__}.channel_axes: {why}"
                    layout, ch_axes = "dense", (None, ())
        elif op.param_trace != "dense":
            raise UnsupportedModelError(
                f"{type(op).__name__}.param_trace is {op.param_trace!r}; it must be 'compact', "
                f"'channel' or 'dense'")
        op_name = f"%y{len(ops)}"
        op_objects[op_name] = op
        x_ew = bool(getattr(op, "x_elementwise", False)) and bool(x_vars)
        if x_ew:
            why_not = _x_elementwise_error(op, x_vars[0].aval, st.value)
            if why_not is not None:
                x_ew = False
                import warnings
                warnings.warn(
                    f"{type(op).__name__}.x_elementwise=True is not taken for "
                    f"{paths[owner[0]]} ({_loc(eqn)}): {why_not}. The op's input is treated "
                    f"as for any trace op (paths through it are cut); set x_elementwise=False "
                    f"or make xw_to_y element-wise in x.", UserWarning, stacklevel=2)
        ops.append(Op(op_name, kind, type(op).__name__, x_name, paths[owner[0]],
                      TensorType.from_aval(y_aval), ei, len(x_vars), batched, layout, why,
                      x_elementwise=x_ew, loc=_loc(eqn), channel_axis=ch_axes[0],
                      param_channel_axes=ch_axes[1]))

    # -- params ---------------------------------------------------------------------------
    params = []
    for si, st in enumerate(states):
        if not isinstance(st, brainstate.ParamState) or is_hidden_state(st):
            continue
        a, b = in_slices[si]
        if si in etrace_states:
            at = attrs(grad=st.gradient.value, is_etrace=bool(st.is_etrace))
            params.append(Param(paths[si], _param_type(st.value), "etrace", tuple(range(a, b)), si, at))
        else:
            params.append(Param(paths[si], _param_type(st.value), "plain", tuple(range(a, b)), si))

    # batch size: all batched ops must agree on the leading axis
    batch = 0
    for o in ops:
        if o.batched:
            b0 = graph_batch = values[[v.name for v in values].index(o.x)].type.shape[0]
            if batch and b0 != batch:
                raise UnsupportedModelError(
                    f"trace ops disagree on the batch size ({batch} vs {graph_batch})")
            batch = b0
    # an op with an unbatched input beside batched ones (a shared context) is broadcast over
    # the batch: its traces keep one example axis per group (relations checks the shapes)

    return tuple(ops), tuple(values), tuple(params), int(batch), op_objects


def lower(model: Any, *args, name: str | None = None, fn: Callable | None = None,
          **kwargs) -> Graph:
    """Trace one step of ``model`` on example inputs and lower it to the IR (stage ``lower``).

    Args:
        model: a ``brainstate.nn.Module`` (its ``__call__``/``update`` is the step) or any
            callable reading brainstate states.
        *args, **kwargs: example inputs of one step (batched or not).
        name: graph name (default: the model's class name + '.update').
        fn: the step function to trace (default: ``model``).

    Returns:
        The ``lower``-stage :class:`~brainscale.ir.Graph`, with a :class:`StepInfo`.

    Raises:
        UnsupportedModelError: when a trace op's parameter is not an ``ETraceParam`` value.
    """
    fn = model if fn is None else fn
    # group states are traced as one hidden state per component (see _group_states)
    with split_group_states(group_states_of(model)) as components:
        closed, states, sf = trace_step(fn, *args, **kwargs)
    closed = C.inline_calls(closed)
    jaxpr = C.open_jaxpr(closed)
    names = state_names(model)
    names.update({k: path for k, (path, _) in components.items()})
    if name is None:
        name = f"{type(model).__name__}.update" if not callable(model) or hasattr(model, "states") \
            else getattr(model, "__name__", "step")

    arg_leaves, args_treedef = jax.tree.flatten((args, kwargs))
    n_arg = len(arg_leaves)
    out_shapes, _ = sf.get_out_shapes(*args, **kwargs)
    out_treedef = jax.tree.structure(out_shapes)
    n_out = out_treedef.num_leaves

    # state slices into invars / outvars
    in_slices, out_slices, treedefs, paths = [], [], [], []
    pos_in, pos_out = n_arg, n_out
    used_names: set[str] = set()
    for i, st in enumerate(states):
        leaves, td = jax.tree.flatten(st.value)
        n = len(leaves)
        in_slices.append((pos_in, pos_in + n))
        out_slices.append((pos_out, pos_out + n))
        pos_in += n
        pos_out += n
        treedefs.append(td)
        nm = names.get(id(st)) or (st.name if getattr(st, "name", None) else f"{type(st).__name__}{i}")
        while nm in used_names:
            nm = nm + "_"
        used_names.add(nm)
        paths.append(nm)
    if pos_in != len(jaxpr.invars) or pos_out != len(jaxpr.outvars):
        raise UnsupportedModelError(
            f"internal: traced jaxpr has {len(jaxpr.invars)} inputs / {len(jaxpr.outvars)} outputs "
            f"but the states account for {pos_in} / {pos_out}")

    # -- inputs ---------------------------------------------------------------------------
    inputs = tuple(Input(f"u{i}", TensorType.from_aval(jaxpr.invars[i].aval, _unit_of(leaf)), i)
                   for i, leaf in enumerate(arg_leaves))

    # -- hidden states --------------------------------------------------------------------
    hidden, constant_hidden = [], []
    for si, st in enumerate(states):
        if not is_hidden_state(st):
            continue
        a, b = in_slices[si]
        oa, ob = out_slices[si]
        if b - a != 1:
            raise UnsupportedModelError(
                f"hidden state {paths[si]!r} holds {b - a} arrays; a hidden state must hold one "
                f"array (use several HiddenStates, or brainstate.HiddenGroupState)")
        outv = jaxpr.outvars[oa]
        if outv is jaxpr.invars[a]:
            continue   # read but never written: a constant of this step
        if not np.issubdtype(np.dtype(jaxpr.invars[a].aval.dtype), np.inexact):
            # an integer / boolean state (refractory counter, last-spike flag): no derivative
            # flows through it, so it is a constant of the trace computation (zero tangent),
            # carried and written back like any other non-hidden state
            constant_hidden.append(paths[si])
            continue
        hidden.append(HiddenState(paths[si], TensorType.from_aval(jaxpr.invars[a].aval,
                                                                  _unit_of(st.value)),
                                  a, oa, si))

    ops, values, params, batch, op_objects = lower_ops(jaxpr, states, paths, in_slices)

    # the compiled step reads and writes the components of the live group states
    states = tuple(components[id(st)][1] if id(st) in components else st for st in states)
    info = StepInfo(closed, MappingProxyType(op_objects), states, tuple(paths), tuple(treedefs),
                    n_arg, args_treedef, out_treedef, n_out, tuple(out_slices), tuple(in_slices))
    notes = attrs(constant_hidden=tuple(f"%{n}" for n in constant_hidden)) if constant_hidden \
        else ()
    g = Graph(name=name, inputs=inputs, hidden=tuple(hidden), params=params,
              values=values, ops=ops, batch=batch, attrs=notes, info=info)
    return g.with_stage("lower", frozenset({"lowered"}))
