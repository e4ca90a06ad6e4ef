"""Base classes of ``brainscale.nn``: input accumulation, neurons and synapses.

Everything here is built on ``brainstate`` alone (no ``brainpy`` dependency).
:class:`Dynamics` adds to ``brainstate.nn.Dynamics`` the input accumulation that
``brainpy.state.Dynamics`` offers (``add_current_input`` / ``add_delta_input`` /
``sum_current_inputs`` / ``sum_delta_inputs``, call-and-pop semantics), so the seed's models
and projections (``DeltaProj`` etc.) work without brainpy. :class:`Neuron` additionally
accepts the seed's old signature ``Neuron(size, keep_size=False, name=..., spk_fun=...,
spk_reset=...)``.

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

__all__ = ["Dynamics", "Neuron", "Synapse", "to_size", "get_activation", "broadcast_like"]


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


def broadcast_like(a, like):
    """``a`` broadcast to ``like``'s shape in one ``broadcast_in_dim``.

    Combining a per-neuron vector (e.g. an ``ElemWiseOp`` output of shape ``(n,)``) with a
    batched array ``(B, n)`` through ``*``/``+`` makes jax emit ``broadcast_in_dim`` to
    ``(1, n)`` and an implicitly broadcasting binary op; brainscale 0.2.0's first dependency
    rules rejected that on a path into a hidden state. The modules broadcast explicitly (one
    full ``broadcast_in_dim``, whose trailing axes keep each neuron's identity) so they
    compile with either rule set.
    """
    import brainunit as u
    shape = tuple(u.math.shape(like))
    if tuple(u.math.shape(a)) == shape:
        return a
    return u.math.broadcast_to(a, shape)


def _label_start(label: str) -> str:
    return f"{label} // "


def _label_key(key: str, label: Optional[str]) -> str:
    return key if label is None else _label_start(label) + str(key)


class Dynamics(brainstate.nn.Dynamics):
    """``brainstate.nn.Dynamics`` with input accumulation (as in ``brainpy.state``).

    Projections register inputs on their target; the target sums them in its ``update``:

    * ``add_current_input(key, inp, label=None)`` / ``sum_current_inputs(init, *args,
      label=None, pop=True, **kw)``: a *callable* input is called with ``*args, **kw``
      (e.g. a conductance-based output with the membrane potential) and stays registered; a
      *value* is added once and then removed (call-and-pop).
    * ``add_delta_input(key, inp, label=None)`` / ``sum_delta_inputs(init, ...)``: the same
      for instantaneous jumps of a state (e.g. ``V += W s``).

    Example::

        >>> import brainunit as u
        >>> d = brainscale.nn.Dynamics(3)
        >>> d.add_delta_input('a', jnp.ones(3))
        >>> d.sum_delta_inputs(jnp.zeros(3))       # the value is popped
        Array([1., 1., 1.], dtype=float32)
        >>> d.sum_delta_inputs(jnp.zeros(3))
        Array([0., 0., 0.], dtype=float32)
    """

    def __init__(self, in_size, name: Optional[str] = None):
        super().__init__(to_size(in_size, "in_size"), name=name)
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


_SENTINEL = object()


class Neuron(Dynamics):
    """Base class of spiking neuron groups.

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
        super().__init__(shape, name=name)
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


class Synapse(Dynamics):
    """Base class of synapse dynamics (hidden states driven by projections).

    Example::

        >>> syn = brainscale.nn.Expon(4, tau=5. * u.ms)
        >>> isinstance(syn, brainscale.nn.Synapse)
        True
    """
