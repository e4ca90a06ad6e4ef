"""The physical layout of eligibility traces: which arrays a trace keeps, and their types.

This is IR semantics, shared by the ``layout-traces`` pass (which fills
:attr:`Trace.arrays <brainscale.ir.Trace.arrays>`), the verifier (which checks that a
trace's arrays cover its relations, groups, leaves and states with the right types) and
the backends' trace rules (which read the arrays, never re-derive them).

Array types, with ``B`` the batch axes of a group (``varshape`` minus the op's neuron shape
``S``), ``k`` the number of states of the group and ``θ_l`` one parameter leaf:

=========  =================================  =========================================
role       layout / state                     shape
=========  =================================  =========================================
``eps``    compact, one state ``i``           ``B + θ_l``
``eps``    compact, states stacked            ``B + θ_l + (k,)``
``eps``    channel, one state ``i``           ``B + S + θ_l∖c`` (``θ_l`` without its
                                              channel axis ``Op.param_channel_axes[l]``)
``eps``    channel, states stacked            ``B + S + (k,) + θ_l∖c``
``eps``    dense, one state ``i``             ``B + S + θ_l``
``eps``    dense, states stacked              ``B + S + (k,) + θ_l``
``eps_x``  (io) the op input ``x``            ``x.shape`` (real-valued even for spikes)
``eps_f``  (io) one (relation, group)         ``varshape + (k,)``
``eps_bar``  ``filter=kappa``: as its ``eps``    the type of that ``eps`` array
``eps_bar``  ``filter=kappa_out``: one per     one state's ``eps`` type (``state=None``)
             (relation, group, leaf)
``m``      scope group/coupled/sparse: one    ``varshape + θ_l`` (``varshape`` of the
           hidden state (group, state), leaf  state's group, batch axis included)
``u_h``    dim random: one hidden state       ``varshape``
``u_p``    dim random: one parameter leaf     ``(batch,) + θ_l`` (``θ_l`` unbatched)
=========  =================================  =========================================

A trace with a non-diagonal scope or a random projection covers one parameter (all its
relations): its influence reaches hidden states its ops do not drive directly. Scope
``coupled`` / ``sparse`` and dim ``random`` keep arrays for every hidden group of the graph,
scope ``group`` for the groups the parameter's ops drive.
"""
from __future__ import annotations

from typing import Collection

import numpy as np

from .nodes import INFLUENCE_SCOPES, TraceArray
from .types import TensorType, TreeType

__all__ = ["trace_arrays", "check_trace_arrays", "batch_shape", "neuron_shape",
           "channel_axes_error",
           "param_leaves", "eps_type", "eps_x_type", "eps_f_type", "m_type", "u_h_type",
           "u_p_type", "influence_groups", "FLOAT_STORAGE"]

#: dtypes a trace array may be stored in (the math is done in the array's type dtype)
FLOAT_STORAGE = ("float32", "float64", "float16", "bfloat16")
#: storage of a packed pair of states, by math dtype (TraceArray.packed)
PAIR_STORAGE = {"float32": "complex64", "float64": "complex128"}
#: ops whose compact trace rule runs on a packed pair: their per-state contraction
#: ``yw_to_w(δ_i, ε_i)`` is δ broadcast over the leaf's leading axes times ε, so
#: ``Σ_i δ_i ε_i = Re(conj(δ_0 + iδ_1) · (ε_0 + iε_1))`` reads the complex array directly
PAIR_OPS = frozenset({"MatMulOp"})


def channel_axes_error(out_shape, leaf_shapes, channel_axis: int, leaf_axes) -> str | None:
    """Why channel axes do not fit one example's output shape and the parameter's leaf
    shapes (the channel layout's structural claim needs one axis per leaf, in range, with as
    many entries as the output has channels), or None."""
    s = tuple(out_shape)
    if len(leaf_axes) != len(leaf_shapes):
        return (f"{len(leaf_axes)} leaf axes {list(leaf_axes)} for a parameter of "
                f"{len(leaf_shapes)} leaves")
    if not 0 <= channel_axis < len(s):
        return f"neuron axis {channel_axis} is not an axis of one example's output {list(s)}"
    for a, shape in zip(leaf_axes, leaf_shapes):
        shape = tuple(shape)
        if not 0 <= a < len(shape):
            return f"leaf axis {a} is out of range for a leaf of shape {shape}"
        if shape[a] != s[channel_axis]:
            return (f"a leaf of shape {shape} has {shape[a]} entries on axis {a}, the output "
                    f"{s[channel_axis]} channels")
    return None


def _float_dtype(dtype: str, fallback: str = "float32") -> str:
    try:
        return dtype if np.issubdtype(np.dtype(dtype), np.inexact) else fallback
    except TypeError:      # bfloat16 is not a numpy builtin on every numpy
        return dtype if dtype in FLOAT_STORAGE else fallback


def neuron_shape(op) -> tuple[int, ...]:
    """The op's output shape without its batch axis: the shape of one example's neurons."""
    s = tuple(op.type.shape)
    return s[1:] if op.batched else s


def batch_shape(graph, group_id: str, op) -> tuple[int, ...]:
    """Leading axes of a group's varshape that the op's neurons do not have: per-example
    axes of the trace (the batch axis, for a batched model)."""
    vs = tuple(graph.group_by_id[group_id].varshape)
    return vs[:len(vs) - len(neuron_shape(op))]


def param_leaves(graph, param_name: str) -> tuple[tuple[str, TensorType], ...]:
    """``((leaf name, type), ...)`` of a parameter, in pytree order (a bare array: one
    leaf named '')."""
    t = graph.param_by_name[param_name].type
    return t.fields if isinstance(t, TreeType) else (("", t),)


def eps_type(graph, relation_id: str, group_id: str, leaf: int, layout: str,
             state: int | None) -> TensorType:
    """The type of a param-dim (D-RTRL) array (see the module table)."""
    rel = graph.relation_by_id[relation_id]
    op = graph.op_by_name[rel.op]
    _, lt = param_leaves(graph, rel.param)[leaf]
    k = graph.group_by_id[group_id].num_state
    b = batch_shape(graph, group_id, op)
    if layout == "compact":
        shape = b + tuple(lt.shape) + (() if state is not None else (k,))
    elif layout == "dense":
        shape = b + neuron_shape(op) + (() if state is not None else (k,)) + tuple(lt.shape)
    elif layout == "channel":
        if op.layout != "channel" or leaf >= len(op.param_channel_axes):
            raise ValueError(f"op {op.name} ({op.op_class}) has no channel axes (layout="
                             f"{op.layout}): a channel-layout trace needs an op with the "
                             f"channel layout")
        rest = tuple(d for i, d in enumerate(lt.shape) if i != op.param_channel_axes[leaf])
        shape = b + neuron_shape(op) + (() if state is not None else (k,)) + rest
    else:
        raise ValueError(f"param-dim layout must be 'compact', 'channel' or 'dense', got "
                         f"{layout!r}")
    return TensorType(shape, _float_dtype(lt.dtype))


def eps_x_type(graph, value_name: str, op) -> TensorType:
    """The type of an ``ε_x`` array: the op input's shape, real-valued (the filtered input
    of boolean or integer spikes is not a spike)."""
    xt = graph.value_by_name[value_name].type
    return TensorType(tuple(xt.shape), _float_dtype(xt.dtype, _float_dtype(op.type.dtype)))


def eps_f_type(graph, group_id: str, op) -> TensorType:
    g = graph.group_by_id[group_id]
    return TensorType(tuple(g.varshape) + (g.num_state,), _float_dtype(op.type.dtype))


def m_type(graph, group_id: str, leaf_type: TensorType) -> TensorType:
    """The type of an influence block ``∂h/∂θ_leaf`` (role ``m``) of one hidden state."""
    g = graph.group_by_id[group_id]
    return TensorType(tuple(g.varshape) + tuple(leaf_type.shape), _float_dtype(leaf_type.dtype))


def u_h_type(graph, group_id: str) -> TensorType:
    """The type of a UORO hidden factor (role ``u_h``): the state's shape."""
    g = graph.group_by_id[group_id]
    dt = graph.hidden_by_name[g.states[0]].type.dtype
    return TensorType(tuple(g.varshape), _float_dtype(dt))


def u_p_type(graph, leaf_type: TensorType) -> TensorType:
    """The type of a UORO parameter factor (role ``u_p``): one per example."""
    b = (int(graph.batch),) if graph.batch else ()
    return TensorType(b + tuple(leaf_type.shape), _float_dtype(leaf_type.dtype))


def influence_groups(graph, trace) -> tuple[str, ...]:
    """The hidden groups a non-diagonal (or random) trace keeps influence arrays for."""
    if trace.dim == "random" or trace.scope in ("coupled", "sparse"):
        return tuple(g.id for g in graph.groups)
    want = {gid for rid in trace.relations for gid in graph.relation_by_id[rid].groups}
    return tuple(g.id for g in graph.groups if g.id in want)


def _is_influence(trace) -> bool:
    return trace.dim == "random" or (trace.dim == "param" and trace.scope in INFLUENCE_SCOPES)


def trace_arrays(graph, trace, *, storage: str | None = None, split_states: bool = True,
                 stacked_leaves: Collection[str] = (),
                 pack_pairs: bool = False) -> tuple[TraceArray, ...]:
    """The arrays ``trace`` keeps, in a canonical order, with ids ``<trace id>.<n>``.

    Args:
        graph: the graph the trace belongs to (its relations, ops, groups, params).
        trace: a :class:`~brainscale.ir.Trace` with ``dim``, ``relations`` and, for param-dim,
            ``layout``, for io-dim ``shared_x`` set.
        storage: dtype to store every array in (default: its math dtype).
        split_states: compact param-dim: one array per state of a group (each updated in
            place), instead of the k states stacked in one array. Dense traces keep the k
            states stacked (their rule contracts over that axis).
        stacked_leaves: names of parameter leaves whose k states stay stacked even when
            ``split_states`` (a backend kernel that wants ``(B, I, O, k)``).
        pack_pairs: compact param-dim traces with the default rule axes: a group of k = 2
            states keeps each leaf in one complex array (state 0 real, state 1 imaginary)
            instead of two real ones, so that the update, which reads both states of an
            element, runs in place (XLA CPU copies two separate arrays every step). Only
            where the math dtype is float32/float64 and ``storage`` is not set.

    Returns:
        The arrays; empty for dim ``'none'``.
    """
    out: list[TraceArray] = []

    def add(role, ttype, st=None, **kw):
        st = st or storage or ttype.dtype
        out.append(TraceArray(f"{trace.id}.{len(out)}", role, ttype, st, **kw))

    if _is_influence(trace):
        rid = trace.relations[0]
        leaves = param_leaves(graph, graph.relation_by_id[rid].param)
        for gid in influence_groups(graph, trace):
            for si in range(graph.group_by_id[gid].num_state):
                if trace.dim == "random":
                    add("u_h", u_h_type(graph, gid), relation=rid, group=gid, state=si)
                    continue
                for li, (_, lt) in enumerate(leaves):
                    add("m", m_type(graph, gid, lt), relation=rid, group=gid, leaf=li, state=si)
        if trace.dim == "random":
            for li, (_, lt) in enumerate(leaves):
                add("u_p", u_p_type(graph, lt), relation=rid, leaf=li)
    elif trace.dim == "param":
        layout = trace.layout or "compact"
        for rid in trace.relations:
            rel = graph.relation_by_id[rid]
            leaves = param_leaves(graph, rel.param)
            for gid in rel.groups:
                k = graph.group_by_id[gid].num_state
                # a 2-state block is packed whole (every leaf) or not at all
                pair = [eps_type(graph, rid, gid, li, layout, None) for li in range(len(leaves))]
                if (pack_pairs and split_states and layout == "compact" and k == 2
                        and storage is None and not stacked_leaves and trace.axes == ()
                        and trace.path == "jax"
                        and graph.op_by_name[rel.op].op_class in PAIR_OPS
                        and all(tt.dtype in PAIR_STORAGE for tt in pair)):
                    for li, tt in enumerate(pair):
                        add("eps", tt, PAIR_STORAGE[tt.dtype], relation=rid, group=gid,
                            leaf=li, state=None)
                    continue
                for li, (lname, _) in enumerate(leaves):
                    split = split_states and layout == "compact" and lname not in stacked_leaves
                    for si in (range(k) if split else (None,)):
                        add("eps", eps_type(graph, rid, gid, li, layout, si), relation=rid,
                            group=gid, leaf=li, state=si)
        if trace.filter == "kappa":
            for a in list(out):
                add("eps_bar", a.type, relation=a.relation, group=a.group, leaf=a.leaf,
                    state=a.state)
        elif trace.filter == "kappa_out":
            for key in dict.fromkeys((a.relation, a.group, a.leaf) for a in list(out)):
                add("eps_bar", eps_type(graph, key[0], key[1], key[2], layout, 0),
                    relation=key[0], group=key[1], leaf=key[2], state=None)
    elif trace.dim == "io":
        first = graph.op_by_name[graph.relation_by_id[trace.relations[0]].op]
        x = trace.shared_x or first.x
        add("eps_x", eps_x_type(graph, x, first), value=x)
        for rid in trace.relations:
            rel = graph.relation_by_id[rid]
            op = graph.op_by_name[rel.op]
            for gid in rel.groups:
                add("eps_f", eps_f_type(graph, gid, op), relation=rid, group=gid)
    return tuple(out)


def _fmt_key(graph, a) -> str:
    if a.role == "eps_x":
        return f"eps_x of {a.value}"
    where = f"{a.relation}/{a.group}" if a.group is not None else f"{a.relation}"
    if a.role in ("eps", "eps_bar", "m", "u_p") and a.relation in graph.relation_by_id and a.leaf is not None:
        leaves = param_leaves(graph, graph.relation_by_id[a.relation].param)
        if 0 <= a.leaf < len(leaves):
            where += f" leaf {leaves[a.leaf][0] or '(array)'}"
    if a.state is not None:
        where += f" state {a.state}"
    return f"{a.role} of {where}"


def check_trace_arrays(graph, trace) -> str | None:
    """None when ``trace.arrays`` cover exactly what its dim/layout/relations need, with the
    right types; otherwise what is wrong (the verifier prefixes the trace id)."""
    arrays = trace.arrays
    for i, a in enumerate(arrays):
        if a.id != f"{trace.id}.{i}":
            return f"array {i} has id {a.id!r}, expected {trace.id}.{i} (renumber the arrays)"
        if a.packed:
            if (a.storage != PAIR_STORAGE.get(a.type.dtype) or a.role != "eps"
                    or a.state is not None or trace.layout != "compact"
                    or not a.type.shape or a.type.shape[-1] != 2):
                return (f"array {a.id} is a packed pair ({a.storage}); only a compact eps "
                        f"array of 2 stacked states (state=None, trailing axis 2) in "
                        f"float32/float64 may be stored as complex64/complex128")
            rel = graph.relation_by_id.get(a.relation)
            op = graph.op_by_name.get(rel.op) if rel is not None else None
            if op is None or op.op_class not in PAIR_OPS:
                return (f"array {a.id} is a packed pair, but its op "
                        f"{getattr(op, 'op_class', '?')} has no packed-pair rule (only "
                        f"{', '.join(sorted(PAIR_OPS))}); keep its states in float arrays")
            if any(b.relation == a.relation and b.group == a.group and not b.packed
                   for b in arrays if b.role == "eps"):
                return (f"array {a.id} is a packed pair, but other leaves of relation "
                        f"{a.relation} / group {a.group} are not: pack every leaf or none")
        elif a.storage not in FLOAT_STORAGE:
            return (f"array {a.id} is stored as {a.storage!r}; trace storage must be one of "
                    f"{', '.join(FLOAT_STORAGE)} (or a packed pair of 2 states: "
                    f"{', '.join(PAIR_STORAGE.values())})")
    if trace.dim == "none":
        return None if not arrays else (f"dim=none keeps no arrays, but it has "
                                        f"{len(arrays)}; drop them")
    if _is_influence(trace):
        return _check_canonical(graph, trace)
    if trace.dim == "param" and trace.filter == "kappa":
        eps = tuple(a for a in arrays if a.role == "eps")
        bars = tuple(a for a in arrays if a.role != "eps")
        if [a.role for a in arrays] != ["eps"] * len(eps) + ["eps_bar"] * len(bars):
            return "a kappa-filtered trace keeps its eps arrays, then one eps_bar per eps array"
        if [(a.relation, a.group, a.leaf, a.state, a.type) for a in eps] != \
                [(a.relation, a.group, a.leaf, a.state, a.type) for a in bars]:
            return "its eps_bar arrays must mirror its eps arrays (same keys and types, in order)"
        arrays = eps
    if trace.dim == "param" and trace.filter == "kappa_out":
        eps = tuple(a for a in arrays if a.role == "eps")
        bars = tuple(a for a in arrays if a.role != "eps")
        if [a.role for a in arrays] != ["eps"] * len(eps) + ["eps_bar"] * len(bars):
            return ("a kappa_out-filtered trace keeps its eps arrays, then one eps_bar per "
                    "(relation, group, leaf)")
        keys = list(dict.fromkeys((a.relation, a.group, a.leaf) for a in eps))
        want = [(r, g, l, None, eps_type(graph, r, g, l, trace.layout, 0)) for r, g, l in keys]
        if [(a.relation, a.group, a.leaf, a.state, a.type) for a in bars] != want:
            return ("its eps_bar arrays must be one per (relation, group, leaf) of its eps "
                    "arrays, in order, with state=None and one state's eps type")
        arrays = eps
    need: dict = {}      # coverage key -> expected type
    if trace.dim == "param":
        layout = trace.layout
        for a in arrays:
            if a.role != "eps":
                return f"array {a.id} has role {a.role}, but a param-dim trace keeps only eps arrays"
            if a.relation not in trace.relations:
                return f"array {a.id} belongs to relation {a.relation!r}, not one of the trace's"
            rel = graph.relation_by_id[a.relation]
            if a.group not in rel.groups:
                return f"array {a.id} names group {a.group!r}, which {a.relation} does not reach"
            n_leaves = len(param_leaves(graph, rel.param))
            k = graph.group_by_id[a.group].num_state
            if a.leaf is None or not 0 <= a.leaf < n_leaves:
                return f"array {a.id} names leaf {a.leaf!r}; %{rel.param} has {n_leaves} leaf(s)"
            if a.state is not None and not 0 <= a.state < k:
                return f"array {a.id} names state {a.state}; {a.group} has {k} state(s)"
            want = eps_type(graph, a.relation, a.group, a.leaf, layout, a.state)
            if a.type != want:
                return (f"{_fmt_key(graph, a)} is {a.type} ({a.id}) but layout={layout} needs "
                        f"{want}")
            states = range(k) if a.state is None else (a.state,)
            for s in states:
                key = (a.relation, a.group, a.leaf, s)
                if key in need:
                    return f"{_fmt_key(graph, a)} is covered twice ({need[key]} and {a.id})"
                need[key] = a.id
        for rid in trace.relations:
            rel = graph.relation_by_id[rid]
            for gid in rel.groups:
                for li, (lname, _) in enumerate(param_leaves(graph, rel.param)):
                    for s in range(graph.group_by_id[gid].num_state):
                        if (rid, gid, li, s) not in need:
                            return (f"no array holds eps of {rid}/{gid} leaf "
                                    f"{lname or '(array)'} state {s}")
        return None
    # io
    xs = [a for a in arrays if a.role == "eps_x"]
    if len(xs) != 1:
        return f"an io-dim trace keeps exactly one eps_x array, it has {len(xs)}"
    first = graph.op_by_name[graph.relation_by_id[trace.relations[0]].op]
    if xs[0].value != trace.shared_x:
        return f"its eps_x array {xs[0].id} filters {xs[0].value}, but shared_x={trace.shared_x}"
    want = eps_x_type(graph, trace.shared_x, first)
    if xs[0].type != want:
        return f"eps_x array {xs[0].id} is {xs[0].type}, but {trace.shared_x} needs {want}"
    seen = set()
    for a in arrays:
        if a.role == "eps_x":
            continue
        if a.role != "eps_f":
            return f"array {a.id} has role {a.role}, but an io-dim trace keeps eps_x and eps_f"
        if a.relation not in trace.relations:
            return f"array {a.id} belongs to relation {a.relation!r}, not one of the trace's"
        rel = graph.relation_by_id[a.relation]
        if a.group not in rel.groups:
            return f"array {a.id} names group {a.group!r}, which {a.relation} does not reach"
        if a.state is not None or a.leaf is not None:
            return f"eps_f array {a.id} keeps the k states stacked (no state or leaf index)"
        want = eps_f_type(graph, a.group, graph.op_by_name[rel.op])
        if a.type != want:
            return f"{_fmt_key(graph, a)} is {a.type} ({a.id}) but needs {want}"
        if (a.relation, a.group) in seen:
            return f"{_fmt_key(graph, a)} is covered twice"
        seen.add((a.relation, a.group))
    for rid in trace.relations:
        for gid in graph.relation_by_id[rid].groups:
            if (rid, gid) not in seen:
                return f"no eps_f array for {rid}/{gid}"
    return None


def _check_canonical(graph, trace) -> str | None:
    """Influence / random-projection arrays must be exactly :func:`trace_arrays`'s (any
    float storage)."""
    rels = [graph.relation_by_id[r] for r in trace.relations]
    params = {r.param for r in rels}
    if len(params) != 1:
        return (f"a {trace.dim}-dim trace with scope={trace.scope} covers one parameter, but "
                f"its relations apply {sorted(params)}")
    p = params.pop()
    missing = [r.id for r in graph.relations if r.param == p and r.id not in trace.relations]
    if missing:
        return (f"it must cover every relation of %{p} (the influence of a parameter is the "
                f"sum over its ops), but {', '.join(missing)} are not in it")
    want = trace_arrays(graph, trace)
    if len(want) != len(trace.arrays):
        return f"it needs {len(want)} arrays ({_roles(want)}), it has {len(trace.arrays)}"
    for a, w in zip(trace.arrays, want):
        if (a.role, a.relation, a.group, a.leaf, a.state, a.value) != \
                (w.role, w.relation, w.group, w.leaf, w.state, w.value):
            return f"array {a.id} should be {_fmt_key(graph, w)}, not {_fmt_key(graph, a)}"
        if a.type != w.type:
            return f"{_fmt_key(graph, a)} is {a.type} ({a.id}) but needs {w.type}"
    return None


def _roles(arrays) -> str:
    out: dict = {}
    for a in arrays:
        out[a.role] = out.get(a.role, 0) + 1
    return ", ".join(f"{n} {r}" for r, n in out.items())
