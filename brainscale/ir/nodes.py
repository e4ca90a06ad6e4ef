"""Immutable nodes of the etrace IR.

Entities refer to each other by stable names (hidden states and params by their brainstate
path, op outputs ``%y{k}`` in jaxpr order, groups ``G{k}``, relations ``R{k}``, traces
``T{k}``), never by object, so replacing one node never invalidates another. All nodes are
frozen dataclasses compared structurally; change them with :func:`replace`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .types import FrozenAttrs, Loc, TensorType, TreeType

__all__ = ["Input", "HiddenState", "Param", "Value", "Op", "HiddenGroup", "Relation",
           "Trace", "TraceArray", "replace", "TRACE_DIMS", "OP_KINDS", "PARAM_KINDS",
           "PARAM_LAYOUTS", "ARRAY_ROLES", "TRACE_AXES", "AXIS_DEFAULTS"]

#: a trace's factorisation: per parameter (param), input x output (io), a rank-1 random
#: projection (random, UORO), or no trace (none)
TRACE_DIMS = ("param", "io", "random", "none")
PARAM_LAYOUTS = ("compact", "channel", "dense")
#: eps / eps_x / eps_f: D-RTRL and ES-D-RTRL; eps_bar: the kappa-filtered copy of an eps
#: array (filter=kappa_out: of the eligibility trace at the group's output, one per leaf); m: one block of a dense influence matrix dh/dtheta (coupled / group / sparse
#: scopes); u_h / u_p: the hidden and parameter factors of a rank-1 (UORO) trace
ARRAY_ROLES = ("eps", "eps_x", "eps_f", "eps_bar", "m", "u_h", "u_p")

#: the rule axes of a trace besides its factorisation (``dim``) and their legal values; the
#: first value is the default (D-RTRL / ES-D-RTRL), which the IR does not print
TRACE_AXES = {
    "recursion": ("jacobian", "leak", "none"),
    "scope": ("diagonal", "group", "coupled", "sparse", "block"),
    "signal": ("symmetric", "random", "modulatory", "synthetic"),
    "filter": ("none", "kappa", "kappa_out"),
    "schedule": ("step", "window", "end"),
    "readout": ("trace", "step"),
}
AXIS_DEFAULTS = {k: v[0] for k, v in TRACE_AXES.items()}
#: scopes that keep an influence matrix over hidden states (``block`` and ``diagonal`` keep
#: the per-neuron trace: they differ only in the hidden Jacobian J)
INFLUENCE_SCOPES = ("group", "coupled", "sparse")
OP_KINDS = ("dense", "conv", "sparse", "elemwise", "lora", "function", "custom")
PARAM_KINDS = ("etrace", "plain")

_ID = {"G": re.compile(r"^G\d+$"), "R": re.compile(r"^R\d+$"), "T": re.compile(r"^T\d+$")}


def replace(node, **kw):
    """``dataclasses.replace`` that returns ``node`` itself when nothing changed (fields
    excluded from equality, such as ``loc``, count as changes too)."""
    if all(getattr(node, k) is v or (getattr(node, k) == v and type(getattr(node, k)) is type(v))
           for k, v in kw.items()):
        return node
    return dataclasses.replace(node, **kw)


def _check_id(prefix: str, value: str):
    if not _ID[prefix].match(value):
        raise ValueError(f"id {value!r} must match {prefix}<number>")


@dataclass(frozen=True, slots=True)
class Input:
    """An external input ``u^t`` of the step (one jaxpr invar)."""
    name: str            # 'u0', 'u1', ... in argument-leaf order
    type: TensorType
    invar: int           # index into the jaxpr invars
    sharding: tuple | None = None   # mesh axis (or None) per dimension; None: not placed


@dataclass(frozen=True, slots=True)
class HiddenState:
    """A hidden state: ``h^{t-1}`` is read from ``invar``, ``h^t`` written to ``outvar``."""
    name: str            # brainstate path, e.g. 'neu.V'
    type: TensorType
    invar: int           # index into the jaxpr invars
    outvar: int          # index into the jaxpr outvars
    state_index: int     # index into the traced states
    sharding: tuple | None = None   # mesh axis (or None) per dimension; None: not placed


@dataclass(frozen=True, slots=True)
class Param:
    """A parameter state read by the step (trace parameter or plain parameter)."""
    name: str                   # brainstate path, e.g. 'syn.comm.weight_op'
    type: TensorType | TreeType
    kind: str                   # 'etrace' (has a trace op) or 'plain'
    invars: tuple[int, ...]     # jaxpr invars of its leaves
    state_index: int
    attrs: FrozenAttrs = ()     # e.g. (('grad', 'adaptive'),)
    sharding: tuple | None = None   # per leaf: mesh axis (or None) per dimension

    def __post_init__(self):
        if self.kind not in ("etrace", "plain"):
            raise ValueError(f"Param kind must be 'etrace' or 'plain', got {self.kind!r}")


@dataclass(frozen=True, slots=True)
class Value:
    """An intermediate value that matters to the analysis (the input ``x`` of an op)."""
    name: str            # '%x0', ...
    type: TensorType
    eqn: int | None      # defining equation (None: a jaxpr invar)
    deps: tuple[str, ...] = ()   # hidden states / inputs it is computed from
    loc: Loc | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Op:
    """One application ``%y = kind(%x, %param)`` of an :class:`~brainscale.ETraceOp`.

    ``layout`` is the most economical param-dim (D-RTRL) trace layout that is exact for this
    op: ``'compact'`` (a parameter-shaped trace per hidden-state component, legal only when
    proven for every weight value), ``'channel'`` (per output neuron, the parameter slice of
    the neuron's channel only: a parameter element whose index along ``param_channel_axes[l]``
    of leaf ``l`` is ``c`` reaches only the neurons whose index along ``channel_axis`` of one
    example's output is ``c``; conv) or ``'dense'`` (the exact per-output-neuron trace,
    always legal); ``layout_reason`` says why an op that could be more economical is not.
    The op object itself travels in :attr:`StepInfo.ops` under :attr:`name`.
    """
    name: str                   # '%y0', ... in jaxpr equation order
    kind: str                   # one of OP_KINDS
    op_class: str               # the ETraceOp subclass name
    x: str | None               # name of the input Value (None for element-wise ops)
    param: str                  # name of the Param
    type: TensorType            # type of y
    eqn: int                    # index of the marker equation in the (inlined) jaxpr
    n_x_leaves: int             # number of jaxpr inputs of the marker eqn that belong to x
    batched: bool               # x carries a leading batch axis
    layout: str = "compact"     # the exact param-dim layout: 'compact' | 'channel' | 'dense'
    layout_reason: str | None = None
    x_elementwise: bool = False  # y is element-wise in x (proven): x's paths pass through
    attrs: FrozenAttrs = ()     # notes only
    loc: Loc | None = field(default=None, compare=False)
    channel_axis: int | None = None        # layout channel: the channel axis of one example's y
    param_channel_axes: tuple[int, ...] = ()   # layout channel: per parameter leaf

    def __post_init__(self):
        if self.kind not in OP_KINDS:
            raise ValueError(f"Op kind must be one of {OP_KINDS}, got {self.kind!r}")
        if self.layout not in PARAM_LAYOUTS:
            raise ValueError(f"Op layout must be one of {PARAM_LAYOUTS}, got {self.layout!r}")
        if (self.layout == "channel") != (self.channel_axis is not None):
            raise ValueError(f"Op {self.name}: channel_axis is set exactly when layout is "
                             f"'channel' (layout={self.layout!r}, channel_axis="
                             f"{self.channel_axis!r})")


@dataclass(frozen=True, slots=True)
class HiddenGroup:
    """Hidden states of one neuron shape coupled element-wise inside a neuron.

    ``output`` names the :class:`Value` ``z`` through which the group's new states reach
    everything else, element-wise per neuron (its spike; :mod:`brainscale.passes.outputs`):
    set for the groups of ``filter=kappa_out`` traces, which filter ``∂z/∂h · ε``.
    """
    id: str                     # 'G0', ...
    states: tuple[str, ...]     # hidden-state names, in jaxpr order
    varshape: tuple[int, ...]   # the common shape (batch axis included)
    attrs: FrozenAttrs = ()
    output: str | None = None   # the Value z of the neuron's output (filter=kappa_out)

    def __post_init__(self):
        _check_id("G", self.id)

    @property
    def num_state(self) -> int:
        return len(self.states)


@dataclass(frozen=True, slots=True)
class Relation:
    """Param → op → the hidden groups its output reaches through element-wise paths."""
    id: str                     # 'R0', ...
    param: str
    op: str                     # op output name '%y0'
    groups: tuple[str, ...]     # may be empty: the output reaches no hidden state
    direct: bool = False        # the output also reaches the step's outputs not via h^t
    attrs: FrozenAttrs = ()

    def __post_init__(self):
        _check_id("R", self.id)


@dataclass(frozen=True, slots=True)
class TraceArray:
    """One array an eligibility trace keeps: what the compiled step allocates and updates.

    * ``role='eps'`` (param-dim, D-RTRL): the trace of one parameter leaf for one
      (relation, group); ``state`` is the index of the group's state it belongs to, or None
      when the group's ``k`` states are stacked (compact: trailing axis; channel and dense: the
      axis after the neuron axes);
    * ``role='eps_x'`` (io-dim, ES-D-RTRL): the low-pass filtered op input ``value``;
    * ``role='eps_f'`` (io-dim): the output trace of one (relation, group), its ``k`` states on
      the trailing axis;
    * ``role='eps_bar'`` (``filter=kappa``): the low-pass filtered copy of the ``eps`` array
      with the same relation, group, leaf and state; (``filter=kappa_out``) the filtered
      eligibility trace ``ē ← κ ē + Σ_i ψ_i ε_i`` (``ψ = ∂z/∂h`` at the group's output) of
      one (relation, group, leaf), ``state=None``, typed as one state's ``eps``;
    * ``role='m'`` (param-dim, scope ``group`` / ``coupled`` / ``sparse``): the influence
      ``∂h/∂θ_leaf`` of one parameter leaf on one hidden state (``group``, ``state``), per
      example: ``varshape + leaf shape``;
    * ``role='u_h'`` / ``'u_p'`` (dim ``random``, UORO): the hidden factor of one hidden state
      (``varshape``) and the parameter factor of one leaf (batch axes + leaf shape).

    ``type`` is the logical type (the math dtype); ``storage`` the dtype the array is kept in.
    A float32 array of ``k = 2`` stacked states stored as ``complex64`` is *packed*: the
    allocated array drops the trailing state axis and keeps state 0 in the real and state 1
    in the imaginary part, so one element-wise fusion reads and writes both states of an
    element in place (``layout-traces{pack_pairs=...}``).
    """
    id: str                     # '<trace id>.<n>', e.g. 'T0.1'
    role: str                   # one of ARRAY_ROLES
    type: TensorType
    storage: str                # numpy dtype name of the stored array
    relation: str | None = None
    group: str | None = None
    leaf: int | None = None     # index into the parameter's leaves (role 'eps')
    state: int | None = None    # index into the group's states; None: all k stacked
    value: str | None = None    # the op input (role 'eps_x')
    sharding: tuple | None = None   # mesh axis (or None) per dimension (the 'shard' pass)

    def __post_init__(self):
        if self.role not in ARRAY_ROLES:
            raise ValueError(f"TraceArray role must be one of {ARRAY_ROLES}, got {self.role!r}")

    @property
    def packed(self) -> bool:
        """A pair of real states kept as one complex array (see the class docstring)."""
        return self.storage.startswith("complex") and not self.type.dtype.startswith("complex")

    @property
    def nbytes(self) -> int:
        return self.stored_type.size * np.dtype(self.storage).itemsize

    @property
    def stored_type(self) -> TensorType:
        """The type of the allocated array (``type`` with the storage dtype; a packed pair
        without its trailing state axis)."""
        shape = tuple(self.type.shape)[:-1] if self.packed else self.type.shape
        return TensorType(shape, self.storage, self.type.unit)

    @property
    def stored_sharding(self) -> tuple | None:
        """``sharding`` of the allocated array (a packed pair drops the state axis)."""
        if self.sharding is None or not self.packed:
            return self.sharding
        return tuple(self.sharding)[:-1]

    def to_stored(self, value):
        """The math-dtype value (``type``) in this array's storage."""
        if self.packed:
            import jax
            return jax.lax.complex(value[..., 0].astype(self.type.dtype),
                                   value[..., 1].astype(self.type.dtype))
        return value.astype(self.storage)

    def from_stored(self, value, state: int | None = None):
        """The stored ``value`` in the math dtype: all of it, or one state of a stacked array
        (``value[..., state]``)."""
        if self.packed:
            import jax.numpy as jnp
            if state is None:
                return jnp.stack([jnp.real(value), jnp.imag(value)], axis=-1)
            return (jnp.real(value) if state == 0 else jnp.imag(value)).astype(self.type.dtype)
        v = value if state is None else value[..., state]
        return v.astype(self.type.dtype)


@dataclass(frozen=True, slots=True)
class Trace:
    """An eligibility trace kept by the compiled step: a point on the rule axes.

    ``dim`` is the factorisation: ``'param'`` (one trace per parameter element: D-RTRL,
    ``layout='compact'`` parameter-shaped, ``'channel'`` per output neuron restricted to the
    neuron's channel, ``'dense'`` per output neuron or, for a non-diagonal
    scope, an influence matrix over hidden states); ``'io'`` (ES-D-RTRL, factorised into
    ``ε_x`` of the op input ``shared_x``, shared by every relation of the trace, and ``ε_f``,
    with decay ``decay`` = α; ``decay_rank`` when α came from a rank r, α = (r-1)/(r+1));
    ``'random'`` (a rank-1 random projection of the influence matrix, UORO); ``'none'`` (the
    parameter gets only its instantaneous gradient).

    The other axes (docs/rules.md), defaults first: ``recursion`` how the previous trace
    enters (``jacobian`` J·ε, ``leak`` α·ε with α = ``decay``, ``none``); ``scope`` which
    hidden-to-hidden paths J keeps (``diagonal`` element-wise inside a neuron, ``group`` the
    full Jacobian inside the groups the op drives, ``coupled`` every hidden state: exact RTRL,
    ``sparse`` the SnAp-n pattern, ``snap_n`` = n; ``block`` the per-neuron trace with J the
    per-neuron k×k block of the *full* step Jacobian, paths through op inputs included); ``signal`` the learning signal
    (``symmetric`` ∂L/∂h, ``random`` through fixed random feedback weights, ``modulatory`` a
    user-supplied third factor, ``synthetic`` plus a learned synthetic gradient);
    ``filter`` (``none``, ``kappa``: ē ← κ ē + ε per state, ``kappa_out``: ē ← κ ē +
    ∂z/∂h · ε at the group's output ``z``, Bellec et al.); ``schedule`` when gradients are
    emitted (``step``, ``window`` of ``window`` steps, ``end`` of the sequence); ``readout``
    how the gradient reads the trace (``trace``: the signal of step t times the new trace,
    ``δ^t · ε^t``; ``step``: the last step exact, ``∂L^t/∂θ|_{h^{t-1}} + ∂L^t/∂h^{t-1} ·
    ε^{t-1}`` with ``∂L^t/∂h^{t-1}`` one VJP of the whole step, as exact RTRL reads its
    influence matrix).

    Every field but ``attrs`` is read by the backends. ``arrays`` is filled by the
    ``layout-traces`` pass (or a backend's variant); shapes and bytes derive from it.
    ``path`` names the backend rule variant that runs the trace (``'jax'``, ``'pallas'``, ...).
    """
    id: str                         # 'T0', ...
    dim: str                        # 'param' | 'io' | 'random' | 'none'
    relations: tuple[str, ...]      # more than one: fused (io) or one parameter's ops
    layout: str | None = None       # param-dim: 'compact' | 'channel' | 'dense'
    shared_x: str | None = None     # io-dim: the op input value whose eps_x the trace keeps
    decay: float | None = None      # io-dim / recursion=leak: alpha
    decay_rank: int | None = None   # io-dim: the rank alpha came from, if any
    path: str = "jax"               # backend rule variant
    arrays: tuple[TraceArray, ...] = ()
    attrs: FrozenAttrs = ()         # notes: reason, costs, ...
    recursion: str = "jacobian"     # 'jacobian' | 'leak' | 'none'
    scope: str = "diagonal"         # 'diagonal' | 'group' | 'coupled' | 'sparse' | 'block'
    signal: str = "symmetric"       # 'symmetric' | 'random' | 'modulatory' | 'synthetic'
    filter: str = "none"            # 'none' | 'kappa' | 'kappa_out'
    schedule: str = "step"          # 'step' | 'window' | 'end'
    readout: str = "trace"          # 'trace' | 'step'
    kappa: float | None = None      # filter=kappa / kappa_out: the low-pass factor
    snap_n: int | None = None       # scope=sparse: the SnAp order n
    window: int | None = None       # schedule=window: steps per window

    def __post_init__(self):
        _check_id("T", self.id)
        if self.dim not in TRACE_DIMS:
            raise ValueError(f"Trace dim must be one of {TRACE_DIMS}, got {self.dim!r}")
        for axis, legal in TRACE_AXES.items():
            v = getattr(self, axis)
            if v not in legal:
                raise ValueError(f"Trace {axis} must be one of {legal}, got {v!r}")

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)

    @property
    def axes(self) -> tuple[tuple[str, Any], ...]:
        """The non-default rule axes and their coefficients, in a fixed order: what the IR
        prints after the dim (``(('scope', 'coupled'),)`` for exact RTRL)."""
        out = tuple((k, getattr(self, k)) for k in TRACE_AXES
                    if getattr(self, k) != AXIS_DEFAULTS[k])
        for k in ("kappa", "snap_n", "window"):
            if getattr(self, k) is not None:
                out += ((k, getattr(self, k)),)
        return out

    @property
    def shapes(self) -> tuple[TensorType, ...]:
        """The stored types of the arrays (empty before ``layout-traces``)."""
        return tuple(a.stored_type for a in self.arrays)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (0 before ``layout-traces`` and for dim 'none')."""
        return sum(a.nbytes for a in self.arrays)
