"""What users write models with: hidden states, trace parameters and trace operators.

* :class:`ETraceState` marks a hidden state ``h`` (any ``brainstate.HiddenState`` counts too).
* :class:`ETraceParam` is a parameter ``θ`` paired with the :class:`ETraceOp` that applies it.
* :class:`ETraceOp` is the interaction ``y = op(x, θ)`` (``xw_to_y``) together with the two
  maps the trace equations need: ``yw_to_w`` (multiply a parameter-shaped tree by a
  neuron-shaped vector) and ``xy_to_dw`` (the VJP of ``θ ↦ op(x, θ)``).

How the compiler finds trace ops: applying an op calls a ``jax.jit``-wrapped function whose
name starts with :data:`MARKER_PREFIX` and carries the op's registry id. A ``jit`` equation
survives ``jit``, ``vmap`` and module nesting unchanged, so the frontend recognises every
application in the jaxpr however the user nests it, and reads which state leaves are its
parameter from the equation's inputs.
"""
from __future__ import annotations

import enum
import itertools
import threading
import weakref
from typing import Any, Callable

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ETraceState", "ETraceGrad", "ETraceParam", "ETraceParamOp", "ETraceOp",
    "FunctionOp", "is_hidden_state", "MARKER_PREFIX", "lookup_op", "sum_leading", "param_jacobian",
    "mix_states",
]

#: prefix of the jit name that marks a trace-op application in a jaxpr
MARKER_PREFIX = "brainscale_etrace_op__"

_OP_IDS = itertools.count()
_OP_REGISTRY: "weakref.WeakValueDictionary[int, ETraceOp]" = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def lookup_op(jit_name: str) -> "ETraceOp | None":
    """The op whose marker equation has this jit name, or None if it is not a marker."""
    if not jit_name.startswith(MARKER_PREFIX):
        return None
    return _OP_REGISTRY.get(int(jit_name[len(MARKER_PREFIX):]))


class ETraceState(brainstate.HiddenState):
    """A hidden state ``h`` whose eligibility traces the compiler keeps.

    Any ``brainstate.HiddenState`` is treated as a hidden state as well; this class exists
    so models written against the seed API run unchanged.

    Example::

        self.V = brainscale.ETraceState(jnp.zeros(n) * u.mV)
    """


def is_hidden_state(st: Any) -> bool:
    return isinstance(st, brainstate.HiddenState)


class ETraceGrad(enum.Enum):
    """How an :class:`ETraceParam` gets its gradient.

    * ``adaptive``: the algorithm (and, for the hybrid one, the ``select-dims`` cost
      model) decides between a param-dim (D-RTRL) and an io-dim (ES-D-RTRL) trace;
    * ``full``: always a param-dim trace (the more exact D-RTRL rule);
    * ``approx``: always an io-dim trace (the cheaper ES-D-RTRL rule).
    """
    adaptive = "adaptive"
    full = "full"
    approx = "approx"


def _shaped(tree):
    return jax.tree.map(lambda a: jax.core.ShapedArray(jnp.shape(a), jnp.result_type(a)), tree)


def _fmt_value(v) -> str:
    if isinstance(v, dict):
        inner = ",\n".join(f"    {k!r}: {_fmt_value(v[k])}" for k in sorted(v))
        return "{\n" + inner + "\n  }"
    try:
        return str(jax.core.ShapedArray(jnp.shape(v), jnp.result_type(v)))
    except TypeError:
        return repr(v)


class ETraceOp:
    """An interaction operator ``y = xw_to_y(x, w)`` that eligibility traces can follow.

    Subclasses implement :meth:`xw_to_y`; they may override :meth:`yw_to_w` (needed by the
    compact param-dim trace) and :meth:`xy_to_dw` (defaults to a VJP). Calling an op
    ``op(x, w)`` applies it *and* marks the application for the compiler.

    A plain function can be turned into an op with the decorator form::

        @brainscale.ETraceOp
        def matmul(x, w):
            return x @ w['weight'] + w['bias']

    Attributes:
        is_diagonal: True when ``y`` is element-wise in the parameter (``ElemWiseOp``).
        param_trace: layout of the param-dim (D-RTRL) trace. ``'compact'`` stores one
            parameter-shaped tree per hidden-state component (valid when every parameter
            element reaches the output neurons only along the axis ``yw_to_w``
            broadcasts: matmul, sparse, element-wise; the op must define ``yw_to_w``);
            ``'channel'`` stores the exact per-output-neuron trace of the parameter slice
            of the neuron's channel only (every parameter element reaches the output
            neurons of one channel: conv; the op must define :meth:`channel_axes`);
            ``'dense'`` stores the exact per-output-neuron trace (LoRA, any op without
            ``yw_to_w`` or ``channel_axes``).
        x_ndim: rank of one example's input ``x``; one more means a leading batch axis.
    """

    is_diagonal: bool = False
    param_trace: str = "compact"
    x_ndim: int | None = 1
    kind: str = "custom"
    #: ``y`` is element-wise in ``x`` (``y_n`` depends on ``x_n`` only: an affine
    #: ``x ⊙ scale + bias``). Proven on the jaxpr of ``xw_to_y`` when the step is lowered;
    #: then paths through ``x`` stay element-wise (another op's output, or a hidden state,
    #: reaches the neurons through this op with its factor in ``df`` / ``J``) instead of
    #: being cut as a trace op's input normally is.
    x_elementwise: bool = False

    def __new__(cls, *args, **kwargs):
        # decorator form: ETraceOp(fn) -> FunctionOp(fn)
        if cls is ETraceOp and len(args) == 1 and callable(args[0]) and not kwargs:
            return FunctionOp(args[0])
        return super().__new__(cls)

    def __init__(self, is_diagonal: bool | None = None):
        if is_diagonal is not None:
            self.is_diagonal = is_diagonal
        self._register()

    # -- identity / marker -------------------------------------------------------------
    def _register(self):
        if getattr(self, "_op_id", None) is None:
            with _LOCK:
                self._op_id = next(_OP_IDS)
                _OP_REGISTRY[self._op_id] = self

    @property
    def op_id(self) -> int:
        self._register()
        return self._op_id

    def _marked_fn(self) -> Callable:
        fn = self.__dict__.get("_jitted")
        if fn is None:
            op = self

            def apply(x, w):
                return op.xw_to_y(x, w)

            apply.__name__ = f"{MARKER_PREFIX}{self.op_id}"
            apply.__qualname__ = apply.__name__
            fn = jax.jit(apply, keep_unused=True)
            self.__dict__["_jitted"] = fn
        return fn

    def __call__(self, x, w):
        """Apply the op to ``x`` with parameter ``w``, marked for the compiler."""
        return self._marked_fn()(x, w)

    # -- the math ------------------------------------------------------------------------
    def xw_to_y(self, x, w):
        """``y = op(x, w)``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement xw_to_y(x, w) -> y")

    def yw_to_w(self, y, w):
        """Multiply the parameter-shaped tree ``w`` by the neuron-shaped vector ``y``.

        Used by the compact param-dim trace: ``ε ← yw_to_w(J, ε)`` and the gradient
        ``Σ yw_to_w(δ, ε)``. Only an op that knows along which axes its parameter reaches
        its output neurons can define it; an op that does not define it gets the exact
        per-output-neuron (dense) param-dim trace, which needs ``xw_to_y`` only.
        """
        raise NotImplementedError(
            f"{type(self).__name__} defines no yw_to_w, so it has no compact param-dim layout; "
            f"the compiler keeps its exact dense per-output-neuron trace instead")

    def xy_to_dw(self, x, dy, w):
        """``∂⟨dy, op(x, w)⟩/∂w``: the VJP of ``w ↦ op(x, w)`` with cotangent ``dy``."""
        _, vjp = jax.vjp(lambda ww: self.xw_to_y(x, ww), w)
        return vjp(dy)[0]

    def compact_layout_error(self, w) -> str | None:
        """Why the compact param-dim layout would be inexact for this op, or None.

        The default: an op must define its own :meth:`yw_to_w` (the axes along which each
        parameter element reaches the output neurons) to have a compact layout; without it
        the frontend gives the op the exact per-output-neuron layout. Override to refuse
        the compact layout for reasons of your own (return the reason).
        """
        if type(self).yw_to_w is ETraceOp.yw_to_w:
            return (f"{type(self).__name__} defines no yw_to_w: the exact per-output-neuron "
                    f"layout is used (a compact trace would have to assume how the parameter "
                    f"reaches the outputs)")
        return None

    def channel_axes(self, w):
        """``(neuron_axis, leaf_axes)`` for the channel param-dim layout, or None.

        A parameter element whose index along ``leaf_axes[l]`` (one per leaf of ``w`` in
        pytree order) is ``c`` reaches only the output neurons whose index along
        ``neuron_axis`` (an axis of ONE example's output ``y``) is ``c``: a convolution's
        kernel and bias reach the output channel they produce. The per-neuron trace then
        keeps, for each neuron, only the slice of its channel (the other entries are zero
        at every step). The default: None (no such structure)."""
        return None

    def channel_layout_error(self, w) -> str | None:
        """Why this op cannot keep the channel param-dim layout of ``w``, or None. The
        default: it declares no :meth:`channel_axes` (the frontend then checks the declared
        axes against the output and parameter shapes). Override to refuse for reasons of
        your own (return the reason)."""
        if self.channel_axes(w) is None:
            return (f"{type(self).__name__} declares no channel_axes: the exact "
                    f"per-output-neuron layout is used")
        return None

    def channel_jacobian(self, x, w):
        """Per leaf of ``w``: ``∂y[n]/∂θ[..c(n)..]``, the Jacobian of each output neuron
        ``n`` restricted to the parameter slice of its channel ``c(n)``, shaped
        ``y.shape + leaf.shape`` without the leaf's channel axis (``x`` one example or a
        batch; ``y`` likewise). Needs :meth:`channel_axes`.

        The default is exact for any op whose ``channel_axes`` hold: one forward-mode
        derivative per entry ``p`` of the slice, with the tangent 1 at ``(p, c)`` for every
        channel ``c`` at once, gives ``∂y[n]/∂θ[p, c(n)]`` for every neuron (the other
        channels do not reach it). An op can override it with its own closed form
        (:class:`~brainscale.ConvOp` extracts its input patches)."""
        _, l_ax = self.channel_axes(w)
        leaves, tdef = jax.tree.flatten(w)
        out = []
        for li, (leaf, a) in enumerate(zip(leaves, l_ax)):
            rest = tuple(np.delete(np.shape(leaf), a))
            n_rest = int(np.prod(rest, dtype=np.int64))

            def one(p, li=li, leaf=leaf, a=a, rest=rest, n_rest=n_rest):
                t = jnp.expand_dims(jax.nn.one_hot(p, n_rest, dtype=leaf.dtype).reshape(rest), a)
                tangents = [jnp.zeros_like(l) for l in leaves]
                tangents[li] = jnp.broadcast_to(t, np.shape(leaf))
                return jax.jvp(lambda *ls: self.xw_to_y(x, jax.tree.unflatten(tdef, ls)),
                               tuple(leaves), tuple(tangents))[1]
            g = jax.vmap(one)(jnp.arange(n_rest))                    # (n_rest, *y)
            out.append(jnp.moveaxis(g, 0, -1).reshape(g.shape[1:] + rest))
        return out

    def elementwise_maps(self, w) -> tuple:
        """``((description, fn, value), ...)``: functions of the parameter that the compact
        layout assumes act element-wise (e.g. a ``weight_fn``). The frontend proves each one
        structurally on its jaxpr, for every weight value, and uses the dense layout when a
        proof fails. The default has none."""
        return ()

    # -- optional fused param-dim rules (backends use them when an op provides them) ----
    def drtrl_update(self, eps, J, df, x, w):
        """Fused compact D-RTRL update for all examples at once, or ``NotImplemented``.

        ``eps`` is a list of ``k`` parameter-shaped trace trees, one per state of the hidden
        group (leading batch axes if any), ``J`` is ``(..., *S, k, k)``, ``df`` is
        ``(..., *S, k)``, ``x`` the op input. Must return the list of new trees, equal per
        example and state ``i`` to ``Σ_j yw_to_w(J[..., i, j], eps[j]) + xy_to_dw(x, df[..., i], w)``.
        Keeping one array per state lets XLA update each in place. The default returns
        ``NotImplemented`` and the backend maps the generic rule over the batch.
        """
        return NotImplemented

    def drtrl_grad(self, eps, delta, w):
        """Fused ``Σ_batch Σ_i yw_to_w(delta[..., i], eps[i])`` (``eps``: a list of ``k``
        per-state trees, as in :meth:`drtrl_update`), or ``NotImplemented``."""
        return NotImplemented

    # -- printing ------------------------------------------------------------------------
    def _repr_fields(self) -> dict:
        return {"is_diagonal": self.is_diagonal}

    def __repr__(self):
        fields = self._repr_fields()
        if not fields:
            return f"{type(self).__name__}()"
        body = ",\n".join(f"  {k}={_indent(repr(v))}" for k, v in fields.items())
        return f"{type(self).__name__}(\n{body}\n)"


def param_jacobian(fn, w):
    """``∂fn(w)/∂w`` (leaves ``out.shape + leaf.shape``): forward mode (one JVP per parameter
    element) when the parameter has fewer elements than the output, else reverse mode (one
    VJP per output element). The same matrix either way; a conv layer's kernel has far
    fewer elements than its output neurons."""
    n_w = sum(int(l.size) for l in jax.tree.leaves(w))
    n_out = int(jax.eval_shape(fn, w).size)
    return (jax.jacfwd if n_w < n_out else jax.jacrev)(fn)(w)


def mix_states(J, es, i: int, lead: int):
    """``Σ_j J[.., n, i, j] es[j]``: row ``i`` of the per-neuron ``k × k`` matrix ``J``
    (``(..., n, k, k)``) applied to the ``k`` per-state arrays ``es`` (``(..., *lead axes,
    n)``: ``lead`` parameter axes before the neuron axis, e.g. the input axis of a weight),
    written element-wise so that it fuses with the trace update around it."""
    k = J.shape[-1]
    Ji = J[..., i, :].reshape(J.shape[:-3] + (1,) * lead + (J.shape[-3], k))
    acc = Ji[..., 0] * es[0]
    for j in range(1, k):
        acc = acc + Ji[..., j] * es[j]
    return acc


def sum_leading(term: Callable, n: int, group: int = 8):
    """``Σ_{b<n} term(b)`` without materialising the stacked terms.

    XLA on CPU reduces over an outer axis of a large array an order of magnitude slower than
    it streams an element-wise sum, and a ``term(b)`` that broadcasts (e.g. ``δ[b] * ε[b]``)
    would otherwise be written out in full first. Up to ``group`` terms are unrolled into
    one fused element-wise pass. Larger ``n`` runs a ``fori_loop`` over groups of ``group``
    unrolled terms accumulating in place: one fusion reading all ``n`` terms would read from
    ``n`` (times the arrays per term) far-apart memory streams at once, which measured 2-3x
    slower at n = 64 on CPU (D-RTRL gradient contraction, ALIF N = 512: 134 -> 40 ms/step).
    """
    group = max(1, int(group))

    def block(start: int, count: int, acc):
        for j in range(count):
            t = term(start + j)
            acc = t if acc is None else jax.tree.map(jnp.add, acc, t)
        return acc
    if n <= group:
        return block(0, n, None)
    n_groups, rest = divmod(n, group)
    acc = block(0, group, None)
    if n_groups > 1:
        acc = jax.lax.fori_loop(1, n_groups, lambda g, a: block(g * group, group, a), acc)
    if rest:
        acc = block(n_groups * group, rest, acc)
    return acc


def _indent(s: str, n: int = 2) -> str:
    return s.replace("\n", "\n" + " " * n)


class FunctionOp(ETraceOp):
    """An op made from a plain function ``fn(x, w) -> y`` (the decorator form).

    Without a ``yw_to_w`` it cannot use the compact param-dim layout, so its param-dim
    trace is the exact per-neuron one; its io-dim trace needs only the VJP.
    """
    param_trace = "dense"
    kind = "function"

    def __init__(self, fn: Callable, yw_to_w: Callable | None = None, is_diagonal=None,
                 x_ndim: int | None = 1):
        self.fn = fn
        self._yw = yw_to_w
        self.x_ndim = x_ndim
        if yw_to_w is not None:
            self.param_trace = "compact"
        super().__init__(is_diagonal)

    def xw_to_y(self, x, w):
        return self.fn(x, w)

    def yw_to_w(self, y, w):
        if self._yw is None:
            return super().yw_to_w(y, w)
        return self._yw(y, w)

    def compact_layout_error(self, w) -> str | None:
        if self._yw is None:
            return "the function op was given no yw_to_w: the exact per-output-neuron layout is used"
        return None

    def _repr_fields(self):
        return {"fn": self.fn, "is_diagonal": self.is_diagonal}


class ETraceParam(brainstate.ParamState):
    """A trainable parameter whose gradient follows eligibility traces.

    Args:
        value: the parameter (array, Quantity, or a dict of them such as
            ``{'weight': W, 'bias': b}``).
        op: the :class:`ETraceOp` applying it; ``param.execute(x)`` is ``op(x, value)``.
            It may be left out when the model applies an op to ``param.value`` itself.
        grad: an :class:`ETraceGrad` (or its name) choosing the trace kind.
        is_etrace: ``False`` makes it an ordinary parameter (instantaneous gradient only).

    Example::

        w = brainscale.ETraceParam({'weight': W, 'bias': b}, brainscale.MatMulOp())
        y = w.execute(x)
    """

    def __init__(self, value, op: ETraceOp | Callable | None = None, grad=None,
                 name: str | None = None, is_etrace: bool = True):
        super().__init__(value, name=name)
        if op is not None and not isinstance(op, ETraceOp):
            if not callable(op):
                raise TypeError(f"ETraceParam op must be an ETraceOp or a callable (x, w) -> y, "
                                f"got {type(op).__name__}")
            op = FunctionOp(op)
        self.op = op
        if grad is None:
            grad = ETraceGrad.adaptive
        if isinstance(grad, str):
            try:
                grad = ETraceGrad[grad]
            except KeyError:
                raise ValueError(f"grad must be one of {[g.name for g in ETraceGrad]}, "
                                 f"got {grad!r}") from None
        self.gradient = grad
        self.is_etrace = bool(is_etrace)

    def execute(self, x):
        """Apply the parameter's op to ``x``: ``op(x, self.value)``."""
        if self.op is None:
            raise ValueError("this ETraceParam was created without an op; pass op=... or "
                             "apply an ETraceOp to param.value yourself")
        return self.op(x, self.value)

    def __repr__(self):
        return (f"{type(self).__name__}(\n  value={_indent(_fmt_value(self.value))},\n"
                f"  gradient={self.gradient!r},\n  op={_indent(repr(self.op))},\n"
                f"  is_etrace={self.is_etrace}\n)")


class ETraceParamOp(ETraceParam):
    """A parameter together with its op (seed API): ``ETraceParamOp(weight, op)``.

    ``op`` may be an :class:`ETraceOp` or a plain function ``op(x, w) -> y``;
    :meth:`execute` applies it.
    """
