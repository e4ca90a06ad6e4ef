"""Synapses, synaptic outputs and projections.

* Synapses (hidden states, element-wise): :class:`Expon` (``g``, ``k=1``) and
  :class:`Alpha` (``g``, ``h``, ``k=2``). Their input is a trace op's output (the
  projection adds it as a delta input), so the op drives the synapse's states and, through
  the synaptic output, the post-synaptic neuron's states: synapse and neuron states form one
  hidden group (e.g. Expon → COBA → LIF: ``[g, V]``, ``k=2``).
* Synaptic outputs: :class:`CUBA` (``I = g · scale``) and :class:`COBA` (``I = g (E − V)``,
  element-wise in the post-synaptic potential).
* Projections: :class:`DeltaProj` (``post.V += comm(x)``, the seed pattern),
  :class:`CurrentProj` (``comm(x)`` is the conductance of a synaptic output, read as a
  current by ``post``) and :class:`AlignPostProj` (``comm(x)`` drives a synapse whose state is
  the conductance). ``comm`` is a trace-op layer (:class:`Linear`, :class:`SparseLinear`,
  ...). A projection must run before its ``post`` in the network's ``update``.

Projections only need ``post.add_delta_input`` / ``post.add_current_input``, so
``brainpy.state`` neurons work as ``post`` too (duck typing). In the other direction, when
brainpy is installed the synapses are ``brainpy.state.Synapse`` objects with brainpy's
``AlignPost`` mixin and the outputs are ``brainpy.state.SynOut`` objects, so brainpy's
projections take them (``brainpy.state.AlignPostProj(comm=..., syn=Expon(...) or
Expon.desc(...), out=COBA(...) or COBA.desc(...), post=brainscale.nn.LIF(...))``).
"""
from __future__ import annotations

from typing import Callable, Optional

import braintools
import brainstate
import brainunit as u

from ..concepts import ETraceState
from ._base import Synapse, _bp, _brainpy_mixin

__all__ = ["Expon", "Alpha", "SynOut", "CUBA", "COBA", "DeltaProj", "CurrentProj",
           "AlignPostProj"]

# brainpy's marker of synapses a brainpy AlignPostProj may own (its descriptor form checks it)
_ALIGN_POST = tuple(c for c in (_brainpy_mixin("Expon", "AlignPost"),) if c is not None)
_SYNOUT_BASE = _bp.SynOut if _bp is not None else brainstate.nn.Module


class Expon(Synapse, *_ALIGN_POST):
    r"""Exponential synapse ``tau dg/dt = -g``, inputs added to ``g`` (``k=1``).

    ``g`` has the unit of its inputs: the default initializer is unitless; pass e.g.
    ``g_initializer=braintools.init.ZeroInit(unit=u.mS)`` for conductances in mS.

    Example::

        >>> syn = brainscale.nn.Expon(4, tau=5. * u.ms)
        >>> _ = brainstate.nn.init_all_states(syn)
        >>> with brainstate.environ.context(dt=1. * u.ms):
        ...     g = syn(jnp.ones(4))
        >>> g
        Array([1., 1., 1., 1.], dtype=float32)
    """

    def __init__(self, in_size, name: Optional[str] = None, tau=8.0 * u.ms,
                 g_initializer: Callable = braintools.init.ZeroInit()):
        super().__init__(in_size, name=name)
        self.tau = braintools.init.param(tau, self.varshape)
        self.g_initializer = g_initializer

    def init_state(self, batch_size: int = None, **kwargs):
        self.g = ETraceState(braintools.init.param(self.g_initializer, self.varshape, batch_size))

    def reset_state(self, batch_size: int = None, **kwargs):
        self.g.value = braintools.init.param(self.g_initializer, self.varshape, batch_size)

    def update(self, x=None):
        g = brainstate.nn.exp_euler_step(lambda g: self.sum_current_inputs(-g) / self.tau,
                                         self.g.value)
        g = self.sum_delta_inputs(g)
        if x is not None:
            g = g + x
        self.g.value = g
        return g


class Alpha(Synapse, *_ALIGN_POST):
    r"""Alpha synapse: ``tau dh/dt = -h``, ``tau dg/dt = -g + h``, inputs added to ``h``.

    Hidden states ``g`` and ``h`` form one hidden group (``k=2``); ``g`` is the output.

    Example::

        >>> syn = brainscale.nn.Alpha(4, tau=5. * u.ms)
        >>> _ = brainstate.nn.init_all_states(syn)
        >>> with brainstate.environ.context(dt=1. * u.ms):
        ...     _ = syn(jnp.ones(4))
        ...     g = syn()
        >>> bool((g > 0).all())
        True
    """

    def __init__(self, in_size, name: Optional[str] = None, tau=8.0 * u.ms,
                 g_initializer: Callable = braintools.init.ZeroInit()):
        super().__init__(in_size, name=name)
        self.tau = braintools.init.param(tau, self.varshape)
        self.g_initializer = g_initializer

    def init_state(self, batch_size: int = None, **kwargs):
        self.g = ETraceState(braintools.init.param(self.g_initializer, self.varshape, batch_size))
        self.h = ETraceState(braintools.init.param(self.g_initializer, self.varshape, batch_size))

    def reset_state(self, batch_size: int = None, **kwargs):
        self.g.value = braintools.init.param(self.g_initializer, self.varshape, batch_size)
        self.h.value = braintools.init.param(self.g_initializer, self.varshape, batch_size)

    def update(self, x=None):
        h = brainstate.nn.exp_euler_step(lambda h: -h / self.tau, self.h.value)
        self.g.value = brainstate.nn.exp_euler_step(lambda g, h: (-g + h) / self.tau,
                                                    self.g.value, self.h.value)
        h = self.sum_delta_inputs(h)
        if x is not None:
            h = h + x
        self.h.value = h
        return self.g.value


class SynOut(_SYNOUT_BASE):
    """Base of synaptic outputs: ``bind_cond(g)`` then ``out(V)`` gives the current (a
    ``brainpy.state.SynOut`` when brainpy is installed).

    A projection registers the output object as a callable current input of ``post``;
    ``post.sum_current_inputs(x, V)`` then calls ``out(V)``.

    Example::

        >>> out = brainscale.nn.CUBA(scale=2.)
        >>> out.bind_cond(jnp.ones(2))
        >>> out(None)
        Array([2., 2.], dtype=float32)
    """

    def __init__(self, name: Optional[str] = None):
        # brainpy.state.SynOut.__init__ takes no name: initialise the module directly
        brainstate.nn.Module.__init__(self, name=name)
        self._conductance = None

    def bind_cond(self, conductance):
        """Set the conductance used at the current step."""
        self._conductance = conductance

    def unbind_cond(self):
        self._conductance = None

    def __call__(self, *args, **kwargs):
        if self._conductance is None:
            raise ValueError(f"{type(self).__name__}: no conductance bound at this step; the "
                             f"projection feeding it must run before its post-synaptic "
                             f"neuron (call proj(x) before neuron())")
        return self.update(self._conductance, *args, **kwargs)

    def update(self, conductance, potential=None):
        raise NotImplementedError(f"{type(self).__name__} must implement "
                                  f"update(conductance, potential) -> current (see COBA, CUBA)")


class CUBA(SynOut):
    """Current-based output ``I = g · scale`` (independent of the potential).

    Example::

        >>> out = brainscale.nn.CUBA(scale=u.mA)
        >>> out.bind_cond(jnp.ones(2))
        >>> out(0. * u.mV).to_decimal(u.mA)
        Array([1., 1.], dtype=float32)
    """

    def __init__(self, scale=1., name: Optional[str] = None):
        super().__init__(name=name)
        self.scale = scale

    def update(self, conductance, potential=None):
        return conductance * self.scale


class COBA(SynOut):
    r"""Conductance-based output ``I = g (E − V)``, element-wise in the potential ``V``.

    Example::

        >>> out = brainscale.nn.COBA(E=0. * u.mV)
        >>> out.bind_cond(jnp.ones(2) * u.mS)
        >>> out(-10. * u.mV).to_decimal(u.uA)
        Array([10., 10.], dtype=float32)
    """

    def __init__(self, E, name: Optional[str] = None):
        super().__init__(name=name)
        self.E = E

    def update(self, conductance, potential):
        return conductance * (self.E - potential)


def _check_post(post, method):
    if not callable(getattr(post, method, None)):
        raise TypeError(f"post must be a neuron/synapse group with {method}() "
                        f"(brainscale.nn or brainpy.state), got {type(post).__name__}")


def _check_out(out):
    # brainscale.nn's outputs, or brainpy.state's (ours derive from it when it is installed)
    if not isinstance(out, SynOut if _bp is None else _bp.SynOut):
        raise TypeError(f"out must be a synaptic output, a brainscale.nn.SynOut (CUBA, COBA)"
                        f"{' or a brainpy.state.SynOut' if _bp is not None else ''}, got {out!r}")


def _run_prefetch(prefetch, x):
    for module in prefetch:
        x = (module(*x),)
    if len(x) != 1:
        raise ValueError(f"a projection takes exactly one input, got {len(x)}")
    return x[0]


class DeltaProj(brainstate.nn.Module):
    r"""Delta projection: ``post``'s state jumps by ``comm(x)`` (the seed's pattern).

    ``update(x)`` computes ``y = comm(x)`` and registers it as a delta input of ``post``
    (``post.add_delta_input(self.name, y)``); ``post`` adds it when it updates
    (``V = sum_delta_inputs(V)``). ``comm`` is a trace-op layer, so ``y`` is the op output the
    compiler relates to ``post``'s hidden group.

    Args:
        *prefetch: optional modules applied to the input before ``comm``.
        comm: the trace-op layer (e.g. :class:`Linear`).
        post: the target (anything with ``add_delta_input``).
        label: optional input label.

    Example::

        >>> neu = brainscale.nn.LIF(2)
        >>> proj = brainscale.nn.DeltaProj(comm=brainscale.nn.Linear(3, 2, w_init=braintools.init.KaimingNormal(unit=u.mV)), post=neu)
        >>> _ = brainstate.nn.init_all_states(neu)
        >>> with brainstate.environ.context(dt=0.1 * u.ms):
        ...     _ = proj(jnp.ones(3))
        ...     neu().shape
        (2,)
    """

    def __init__(self, *prefetch, comm: Callable, post, label: Optional[str] = None,
                 name: Optional[str] = None):
        super().__init__(name=name)
        if not callable(comm):
            raise TypeError(f"comm must be callable (a trace-op layer), got {comm!r}")
        _check_post(post, "add_delta_input")
        self.prefetch = prefetch
        self.comm = comm
        self.post = post
        self.label = label

    def update(self, *x):
        y = self.comm(_run_prefetch(self.prefetch, x))
        self.post.add_delta_input(self.name, y, label=self.label)
        return y


class CurrentProj(brainstate.nn.Module):
    r"""Current projection: ``comm(x)`` is the conductance of ``out``, a current of ``post``.

    At construction ``out`` is registered as a callable current input of ``post``;
    ``update(x)`` binds ``g = comm(x)`` to ``out``, and ``post.sum_current_inputs(I, V)``
    adds ``out(V)`` (``g · scale`` for :class:`CUBA`, ``g (E − V)`` for :class:`COBA`).

    Example::

        >>> neu = brainscale.nn.LIF(2)
        >>> proj = brainscale.nn.CurrentProj(comm=brainscale.nn.Linear(3, 2), out=brainscale.nn.CUBA(u.mA), post=neu)
        >>> _ = brainstate.nn.init_all_states(neu)
        >>> with brainstate.environ.context(dt=0.1 * u.ms):
        ...     _ = proj(jnp.ones(3))
        ...     neu().shape
        (2,)
    """

    def __init__(self, *prefetch, comm: Callable, out: SynOut, post,
                 name: Optional[str] = None):
        super().__init__(name=name)
        if not callable(comm):
            raise TypeError(f"comm must be callable (a trace-op layer), got {comm!r}")
        _check_out(out)
        _check_post(post, "add_current_input")
        self.prefetch = prefetch
        self.comm = comm
        self.out = out
        self.post = post
        post.add_current_input(self.name, out)

    def update(self, *x):
        g = self.comm(_run_prefetch(self.prefetch, x))
        self.out.bind_cond(g)
        return g


class AlignPostProj(brainstate.nn.Module):
    r"""Projection through a post-synaptic synapse: ``comm(x)`` → ``syn`` → ``out`` → ``post``.

    ``update(x)`` adds ``comm(x)`` as a delta input of ``syn`` (e.g. :class:`Expon`),
    advances ``syn`` and binds its state as the conductance of ``out`` (registered as a
    current input of ``post``). All of it is element-wise per post-synaptic neuron, so the
    synapse's and the neuron's states form one hidden group driven by ``comm``'s op.

    Example::

        >>> neu = brainscale.nn.LIF(2)
        >>> proj = brainscale.nn.AlignPostProj(
        ...     comm=brainscale.nn.Linear(3, 2, w_init=braintools.init.KaimingNormal(unit=u.mS)),
        ...     syn=brainscale.nn.Expon(2, tau=5. * u.ms, g_initializer=braintools.init.ZeroInit(unit=u.mS)),
        ...     out=brainscale.nn.COBA(E=0. * u.mV), post=neu)
        >>> _ = brainstate.nn.init_all_states(proj)
        >>> _ = brainstate.nn.init_all_states(neu)
        >>> with brainstate.environ.context(dt=0.1 * u.ms):
        ...     _ = proj(jnp.ones(3))
        ...     neu().shape
        (2,)
    """

    def __init__(self, *prefetch, comm: Callable, syn: Synapse, out: SynOut, post,
                 label: Optional[str] = None, name: Optional[str] = None):
        super().__init__(name=name)
        if not callable(comm):
            raise TypeError(f"comm must be callable (a trace-op layer), got {comm!r}")
        _check_post(syn, "add_delta_input")
        _check_out(out)
        _check_post(post, "add_current_input")
        self.prefetch = prefetch
        self.comm = comm
        self.syn = syn
        self.out = out
        self.post = post
        self.label = label
        post.add_current_input(self.name, out, label=label)

    def update(self, *x):
        y = self.comm(_run_prefetch(self.prefetch, x))
        self.syn.add_delta_input(self.name, y)
        g = self.syn()
        self.out.bind_cond(g)
        return g
