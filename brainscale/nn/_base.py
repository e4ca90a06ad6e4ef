"""Base classes of ``brainscale.nn``: input accumulation, neurons and synapses.

When ``brainpy`` (``brainpy.state``) is installed, :class:`Dynamics`, :class:`Neuron` and
:class:`Synapse` are subclasses of ``brainpy.state.Dynamics`` / ``Neuron`` / ``Synapse``:
brainpy's and brainstate's projections (``brainpy.state.DeltaProj``, ``AlignPostProj``,
``CurrentProj``; on brainstate 0.5-0.6 ``brainstate.nn.DeltaProj`` is brainpy's) accept
``brainscale.nn`` neurons and synapses, and the input accumulation is brainpy's own. Without
brainpy they derive from ``brainstate.nn.Dynamics`` with the same input accumulation
(``add_current_input`` / ``add_delta_input`` / ``sum_current_inputs`` /
``sum_delta_inputs``, call-and-pop semantics) written here, so the seed's models and
``brainscale.nn``'s projections work either way. :class:`Neuron` additionally accepts the
seed's old signature ``Neuron(size, keep_size=False, name=..., spk_fun=..., spk_reset=...)``,
which ``brainpy.state.Neuron`` no longer does.

Hidden states of every module in ``brainscale.nn`` are :class:`brainscale.ETraceState`
objects created in ``init_state(batch_size=None)`` and refilled in
``reset_state(batch_size=None)`` (``brainstate.nn.init_all_states(model, batch_size=B)``).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Optional

import braintools
import brainstate
import numpy as np

try:  # brainpy.state: brainpy >= 2.9, or brainpy 2.8 with the brainpy_state package
    import brainpy.state as _bp
except ImportError:  # brainpy is optional: the fallback base below offers the same interface
    _bp = None

__all__ = ["Dynamics", "Neuron", "Synapse", "to_size", "get_activation", "make_param",
           "HAS_BRAINPY"]

#: whether ``brainscale.nn``'s neurons and synapses are ``brainpy.state`` dynamics
HAS_BRAINPY: bool = _bp is not None


def _brainpy_mixin(cls_name: str, mixin: str):
    """brainpy.state's mixin class ``mixin`` (e.g. ``AlignPost``), found on the MRO of its
    public class ``cls_name`` (the mixins are not exported and their module moved between
    brainpy 2.8 and 2.9), or None."""
    if _bp is None:
        return None
    return next((c for c in getattr(_bp, cls_name, object).__mro__ if c.__name__ == mixin), None)


def to_size(size, what: str = "size") -> tuple:
    """``int`` or sequence of ints -> tuple of ints (validated)."""
    if isinstance(size, (numbers.Integral, np.integer)) and not isinstance(size, bool):
        size = (int(size),)
    elif isinstance(size, (list, tuple)):
        if len(size) == 0 or not all(isinstance(s, (numbers.Integral, np.integer))
                                     and not isinstance(s, bool) for s in size):
            raise ValueError(f"{what} must be a positive int or a non-empty tuple of ints, "
                             f"got {size!r}")
        size = tuple(int(s) for s in size)
    else:
        raise TypeError(f"{what} must be a positive int or a tuple of ints, got "
                        f"{type(size).__name__}: {size!r}")
    if any(s <= 0 for s in size):
        raise ValueError(f"{what} must be positive, got {size}")
    return size


def get_activation(activation) -> Callable:
    """An activation given as a name (``'tanh'``, ``'relu'``, ...) or a callable."""
    if isinstance(activation, str):
        fn = getattr(brainstate.nn, activation, None)
        if fn is None or not callable(fn):
            import jax
            fn = getattr(jax.nn, activation, None)
        if fn is None or not callable(fn):
            if activation == "identity":
                return lambda x: x
            raise ValueError(f"unknown activation {activation!r}; give a name from "
                             f"brainstate.nn / jax.nn (e.g. 'tanh', 'relu') or a callable")
        return fn
    if not callable(activation):
        raise TypeError(f"activation must be a name or a callable, got {activation!r}")
    return activation


def make_param(param_type, value, op, what: str, **etrace_kwargs):
    """``param_type(value, op=op)``: brainscale 0.1's ``param_type=`` hook of the layers.

    ``param_type`` is :class:`brainscale.ETraceParam` (the default: an eligibility trace),
    ``brainscale.NonTempParam`` (instantaneous gradient only), ``brainscale.FakeETraceParam``
    (a fixed weight) or any class taking ``(value, op=...)`` with an ``execute`` method.
    ``etrace_kwargs`` (e.g. ``grad='full'``) are passed to ETraceParam subclasses only.
    """
    from ..concepts import ETraceParam
    if not callable(param_type):
        raise TypeError(f"{what}: param_type must be a parameter class such as "
                        f"brainscale.ETraceParam or brainscale.NonTempParam, got {param_type!r}")
    kw = etrace_kwargs if isinstance(param_type, type) and issubclass(param_type, ETraceParam) \
        else {}
    hint = (f"{what}: param_type={getattr(param_type, '__name__', param_type)!r} must take "
            f"(value, op=...) and apply the op in execute(x), like brainscale.ETraceParam, "
            f"NonTempParam or FakeETraceParam (a plain brainstate.ParamState has no op)")
    try:
        param = param_type(value, op=op, **kw)
    except TypeError as e:
        raise TypeError(f"{hint}: {e}") from e
    if not callable(getattr(param, "execute", None)):
        raise TypeError(hint)
    return param


def _label_start(label: str) -> str:
    return f"{label} // "


def _label_key(key: str, label: Optional[str]) -> str:
    return key if label is None else _label_start(label) + str(key)


class _InputAccumulation(brainstate.nn.Dynamics):
    """``brainstate.nn.Dynamics`` with brainpy.state's input accumulation, the base of
    :class:`Dynamics` when brainpy is not installed (see :class:`Dynamics` for the
    semantics)."""

    def __init__(self, in_size, name: Optional[str] = None):
        super().__init__(in_size, name=name)
        self._current_inputs = None
        self._delta_inputs = None

    # -- registration ------------------------------------------------------------------
    @property
    def current_inputs(self) -> Optional[dict]:
        """``{key: callable or value}`` of the registered current inputs (or None)."""
        return self._current_inputs

    @property
    def delta_inputs(self) -> Optional[dict]:
        """``{key: callable or value}`` of the registered delta inputs (or None)."""
        return self._delta_inputs

    def add_current_input(self, key: str, inp, label: Optional[str] = None):
        """Register a current input (a callable, kept; or a value, used once)."""
        key = _label_key(key, label)
        if self._current_inputs is None:
            self._current_inputs = {}
        if key in self._current_inputs and self._current_inputs[key] is not inp:
            raise ValueError(f'current input key "{key}" is already used in {self}')
        self._current_inputs[key] = inp

    def add_delta_input(self, key: str, inp, label: Optional[str] = None):
        """Register a delta input (a callable, kept; or a value, used once)."""
        key = _label_key(key, label)
        if self._delta_inputs is None:
            self._delta_inputs = {}
        if key in self._delta_inputs and self._delta_inputs[key] is not inp:
            raise ValueError(f'delta input key "{key}" is already used in {self}')
        self._delta_inputs[key] = inp

    def get_input(self, key: str):
        """The registered current or delta input under ``key``."""
        for d in (self._current_inputs, self._delta_inputs):
            if d is not None and key in d:
                return d[key]
        raise ValueError(f"input key {key!r} is not registered in {self}")

    # -- summation ---------------------------------------------------------------------
    @staticmethod
    def _sum(store: Optional[dict], kind: str, init, args, label, pop, kwargs):
        if store is None:
            return init
        start = None if label is None else _label_start(label)
        for key in tuple(store.keys()):
            if start is not None and not key.startswith(start):
                continue
            inp = store[key]
            try:
                init = init + (inp(*args, **kwargs) if callable(inp) else inp)
            except Exception as e:  # name the offending input
                raise ValueError(f"error in {kind} input {key!r} ({inp!r}): {e}") from e
            if pop and not callable(inp):
                store.pop(key)
        return init

    def sum_current_inputs(self, init, *args, label: Optional[str] = None, pop: bool = True,
                           **kwargs):
        """``init`` plus every current input (callables get ``*args, **kwargs``)."""
        return self._sum(self._current_inputs, "current", init, args, label, pop, kwargs)

    def sum_delta_inputs(self, init, *args, label: Optional[str] = None, pop: bool = True,
                         **kwargs):
        """``init`` plus every delta input (callables get ``*args, **kwargs``)."""
        return self._sum(self._delta_inputs, "delta", init, args, label, pop, kwargs)


_DynamicsBase = _bp.Dynamics if _bp is not None else _InputAccumulation


class Dynamics(_DynamicsBase):
    """Base of ``brainscale.nn``'s dynamics: a ``brainpy.state.Dynamics`` when brainpy is
    installed, else ``brainstate.nn.Dynamics`` with the same input accumulation.

    Projections register inputs on their target; the target sums them in its ``update``:

    * ``add_current_input(key, inp, label=None)`` / ``sum_current_inputs(init, *args,
      label=None, pop=True, **kw)``: a *callable* input is called with ``*args, **kw``
      (e.g. a conductance-based output with the membrane potential) and stays registered; a
      *value* is added once and then removed (call-and-pop).
    * ``add_delta_input(key, inp, label=None)`` / ``sum_delta_inputs(init, ...)``: the same
      for instantaneous jumps of a state (e.g. ``V += W s``).

    Example::

        >>> d = brainscale.nn.Dynamics(3)
        >>> d.add_delta_input('a', jnp.ones(3))
        >>> d.sum_delta_inputs(jnp.zeros(3))       # the value is popped
        Array([1., 1., 1.], dtype=float32)
        >>> d.sum_delta_inputs(jnp.zeros(3))
        Array([0., 0., 0.], dtype=float32)
    """

    def __init__(self, in_size, name: Optional[str] = None):
        # explicit base call: in Neuron/Synapse the MRO puts brainpy's Neuron/Synapse (whose
        # __init__ takes other arguments) between this class and brainpy.state.Dynamics
        _DynamicsBase.__init__(self, to_size(in_size, "in_size"), name=name)


_SENTINEL = object()


class Neuron(Dynamics, *((_bp.Neuron,) if _bp is not None else ())):
    """Base class of spiking neuron groups (a ``brainpy.state.Neuron`` when brainpy is
    installed).

    Args:
        in_size: the neuron shape (int or tuple).
        spk_fun: surrogate spike function (a ``braintools.surrogate`` object or any
            callable of the scaled potential).
        spk_reset: ``'soft'`` (subtract the threshold) or ``'hard'`` (reset to
            ``V_reset``, the gradient of the reset is stopped).
        name: module name.

    The seed's old signature is accepted as well: ``Neuron(size, keep_size=False,
    name=None, spk_fun=..., spk_reset=...)`` (``size=`` may be a keyword; with
    ``keep_size=False`` a multi-dimensional ``size`` is flattened, as brainstate did).

    Subclasses create their hidden states (:class:`brainscale.ETraceState`) in
    ``init_state`` and implement ``get_spike`` and ``update``.

    Example (the seed's customised LIF, unchanged apart from imports)::

        >>> class MyLIF(brainscale.nn.Neuron):
        ...     def __init__(self, size, keep_size=False, tau=5. * u.ms, V_th=1. * u.mV,
        ...                  spk_fun=braintools.surrogate.ReluGrad(), spk_reset='soft', name=None):
        ...         super().__init__(size, keep_size=keep_size, name=name, spk_fun=spk_fun,
        ...                          spk_reset=spk_reset)
        ...         self.tau, self.V_th = tau, V_th
        ...     def init_state(self, batch_size=None, **kw):
        ...         self.V = brainscale.ETraceState(
        ...             braintools.init.param(braintools.init.Constant(0. * u.mV), self.varshape, batch_size))
        ...     def get_spike(self, V=None):
        ...         V = self.V.value if V is None else V
        ...         return self.spk_fun((V - self.V_th) / self.V_th)
        ...     def update(self, x=0. * u.mV):
        ...         V = self.V.value - self.V_th * self.get_spike()
        ...         V = brainstate.nn.exp_euler_step(lambda v: -v / self.tau, V)
        ...         self.V.value = self.sum_delta_inputs(V + x)
        ...         return self.get_spike()
        >>> neu = MyLIF(4)
        >>> _ = brainstate.nn.init_all_states(neu)
        >>> with brainstate.environ.context(dt=0.1 * u.ms):
        ...     neu(2. * u.mV).shape
        (4,)
    """

    def __init__(self, in_size=_SENTINEL, spk_fun: Callable = _SENTINEL,
                 spk_reset: str = "soft", name: Optional[str] = None, *,
                 size=_SENTINEL, keep_size: Optional[bool] = None, mode: Any = None,
                 **kwargs):
        if kwargs:
            raise TypeError(f"{type(self).__name__}.__init__() got unexpected keyword "
                            f"argument(s) {sorted(kwargs)}")
        # seed signature: Neuron(size, keep_size, ...) -- a bool in spk_fun's slot is keep_size
        if isinstance(spk_fun, (bool, np.bool_)):
            keep_size, spk_fun = bool(spk_fun), _SENTINEL
        if size is not _SENTINEL:
            if in_size is not _SENTINEL:
                raise TypeError("give the neuron shape once: in_size or size, not both")
            in_size = size
        if in_size is _SENTINEL:
            raise TypeError(f"{type(self).__name__} needs in_size (the neuron shape)")
        shape = to_size(in_size, "in_size")
        self.size = shape
        self.keep_size = True if keep_size is None else bool(keep_size)
        if keep_size is False and len(shape) > 1:
            shape = (int(np.prod(shape)),)
        Dynamics.__init__(self, shape, name=name)
        if spk_fun is _SENTINEL:
            spk_fun = braintools.surrogate.InvSquareGrad()
        if not callable(spk_fun):
            raise TypeError(f"spk_fun must be callable (e.g. braintools.surrogate.ReluGrad()), "
                            f"got {spk_fun!r}")
        if spk_reset not in ("soft", "hard"):
            raise ValueError(f"spk_reset must be 'soft' or 'hard', got {spk_reset!r}")
        self.spk_fun = spk_fun
        self.spk_reset = spk_reset
        self.mode = mode

    @property
    def num(self) -> int:
        """Number of neurons (product of the shape)."""
        return int(np.prod(self.varshape))

    def get_spike(self, *args, **kwargs):
        """The (surrogate) spikes of the current state; implemented by subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_spike()")


class Synapse(Dynamics, *((_bp.Synapse,) if _bp is not None else ())):
    """Base class of synapse dynamics (hidden states driven by projections; a
    ``brainpy.state.Synapse`` when brainpy is installed).

    Example::

        >>> syn = brainscale.nn.Expon(4, tau=5. * u.ms)
        >>> isinstance(syn, brainscale.nn.Synapse)
        True
    """
