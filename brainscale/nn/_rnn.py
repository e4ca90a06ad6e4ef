"""Recurrent cells written for online learning, with brainscale 0.1's equations and names.

Every hidden state is a :class:`brainscale.ETraceState` and every weight an
:class:`brainscale.ETraceParam` applied through a trace op whose output has the shape of the
hidden states (one op per gate, never one wide op split into gates: ``split`` mixes
neurons). Gates combine op outputs element-wise, so each weight reaches the hidden states
element-wise and gets an eligibility trace -- except where a gate's output enters another
op's *input* (a weight feeding a weight): the compiler then gives that weight the
instantaneous gradient only (trace dim ``none``, ``NoTemporalCreditWarning``).

Constructors, defaults, parameter names and equations are brainscale 0.1's, so 0.1 models
and checkpoints carry over; this package's earlier variants, which trace every weight, stay
behind options:

=================  ==============  ===  ========================================================
cell               hidden group    k    every weight traced?
=================  ==============  ===  ========================================================
ValinaRNNCell      [h]             1    yes
GRUCell            [h]             1    0.1 (``reset_after=False``): ``Wr`` feeds ``Wh``: none;
                                        ``reset_after=True``: yes
MGUCell            [h]             1    0.1: ``Wf`` partly (gate traced, the ``Wh`` path not);
                                        ``reset_after=True``: yes
LSTMCell           [c, h]          2    yes
URLSTMCell         [c, h]          2    yes (untied forget bias via ``ElemWiseOp``)
MinimalRNNCell     [h]             1    0.1 (``gate_input='z'``): ``phi`` partly;
                                        ``gate_input='x'``: yes
MiniGRU, MiniLSTM  [h]             1    yes
LRUCell            [h_re, h_im]    2    yes (complex, 0.1); ``complex_valued=False``: ``[h]``
=================  ==============  ===  ========================================================

All cells take 0.1's ``param_type=`` (``brainscale.ETraceParam`` by default;
``brainscale.NonTempParam`` for instantaneous gradients only).
"""
from __future__ import annotations

from typing import Callable, Optional

import braintools
import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

from ..concepts import ETraceParam, ETraceState
from ..legacy import ElemWiseParam
from ..ops import ElemWiseOp
from ._base import get_activation, make_param, to_size
from ._linear import Linear

__all__ = ["RNNCell", "ValinaRNNCell", "GRUCell", "MGUCell", "LSTMCell", "URLSTMCell",
           "MinimalRNNCell", "MiniGRU", "MiniLSTM", "LRUCell"]


def _cat(*xs):
    return u.math.concatenate(xs, axis=-1)


def _identity(p):
    return p


class RNNCell(brainstate.nn.RNNCell):
    """Base of the recurrent cells: sizes, activation and the hidden-state helpers.

    Subclasses list their hidden states in ``_state_names`` (created with the shape
    ``state_size``, by default ``out_size``, from ``state_init``).

    Example::

        >>> cell = brainscale.nn.ValinaRNNCell(3, 4)
        >>> isinstance(cell, brainscale.nn.RNNCell), isinstance(cell, brainstate.nn.RNNCell)
        (True, True)
    """

    _state_names = ("h",)

    def __init__(self, in_size, out_size, state_init=braintools.init.ZeroInit(),
                 activation="tanh", name: Optional[str] = None,
                 param_type: type = ETraceParam):
        super().__init__(name=name)
        self.in_size = to_size(in_size, "in_size")
        self.out_size = to_size(out_size, "out_size")
        self.state_size = self.out_size
        self.num_in = self.in_size[-1]
        self.num_out = self.out_size[-1]
        self._state_initializer = state_init
        self.activation = get_activation(activation) if activation is not None else None
        self.param_type = param_type

    def init_state(self, batch_size: int = None, **kwargs):
        for n in self._state_names:
            setattr(self, n, ETraceState(braintools.init.param(
                self._state_initializer, self.state_size, batch_size)))

    def reset_state(self, batch_size: int = None, **kwargs):
        for n in self._state_names:
            getattr(self, n).value = braintools.init.param(self._state_initializer,
                                                           self.state_size, batch_size)

    def _linear(self, n_in, w_init, b_init, n_out=None):
        return Linear(n_in, self.num_out if n_out is None else n_out, w_init=w_init,
                      b_init=b_init, param_type=self.param_type)


class ValinaRNNCell(RNNCell):
    r"""Vanilla RNN cell ``h = act(W [x, h] + b)`` (the seed's and 0.1's spelling "Valina").

    Args (0.1's order): ``in_size, out_size, state_init=ZeroInit(), w_init=XavierNormal(),
    b_init=ZeroInit(), activation='relu', name=None, param_type=ETraceParam``. Parameter:
    ``W`` (a :class:`Linear`).

    Example::

        >>> cell = brainscale.nn.ValinaRNNCell(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell, batch_size=2)
        >>> cell(jnp.ones((2, 3))).shape
        (2, 4)
    """

    def __init__(self, in_size, out_size, state_init=braintools.init.ZeroInit(),
                 w_init=braintools.init.XavierNormal(), b_init=braintools.init.ZeroInit(),
                 activation="relu", name: Optional[str] = None, param_type: type = ETraceParam):
        super().__init__(in_size, out_size, state_init, activation, name, param_type)
        self.W = self._linear(self.num_in + self.num_out, w_init, b_init)

    def update(self, x):
        self.h.value = self.activation(self.W(_cat(x, self.h.value)))
        return self.h.value


class GRUCell(RNNCell):
    r"""Gated recurrent unit (Cho et al. 2014).

    .. math::
        z = σ(W_z [x, h] + b_z), \quad r = σ(W_r [x, h] + b_r), \quad
        h' = (1 - z) ⊙ h + z ⊙ \tilde h

    with the candidate

    * ``reset_after=False`` (default, brainscale 0.1 and the classic form):
      :math:`\tilde h = act(W_h [x, r ⊙ h] + b)`. ``W_r``'s output reaches ``h`` only
      through ``W_h``'s op input (a weight feeding a weight): the compiler gives ``W_r`` the
      instantaneous gradient only (dim ``none``) and warns with
      ``brainscale.NoTemporalCreditWarning``.
    * ``reset_after=True`` (the cuDNN/Keras form):
      :math:`\tilde h = act(W_x x + b + r ⊙ (U_h h + b_u))`. Every weight reaches ``h``
      element-wise and gets a trace (parameters ``Wz, Wr, Wx, Uh``).

    Args (0.1's): ``in_size, out_size, w_init=Orthogonal(), b_init=ZeroInit(),
    state_init=ZeroInit(), activation='tanh', name=None, param_type=ETraceParam``, plus
    ``reset_after``. Parameters ``Wz, Wr, Wh`` (0.1's names).

    Example (the seed's 3-layer GRU uses ``GRUCell(n_in, n_rec)``)::

        >>> cell = brainscale.nn.GRUCell(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell)
        >>> cell(jnp.ones(3)).shape
        (4,)
    """

    def __init__(self, in_size, out_size, w_init=braintools.init.Orthogonal(),
                 b_init=braintools.init.ZeroInit(), state_init=braintools.init.ZeroInit(),
                 activation="tanh", name: Optional[str] = None, param_type: type = ETraceParam,
                 *, reset_after: bool = False):
        super().__init__(in_size, out_size, state_init, activation, name, param_type)
        n_xh = self.num_in + self.num_out
        self.reset_after = bool(reset_after)
        self.Wz = self._linear(n_xh, w_init, b_init)
        self.Wr = self._linear(n_xh, w_init, b_init)
        if self.reset_after:
            self.Wx = self._linear(self.num_in, w_init, b_init)
            self.Uh = self._linear(self.num_out, w_init, b_init)
        else:
            self.Wh = self._linear(n_xh, w_init, b_init)

    def update(self, x):
        old_h = self.h.value
        xh = _cat(x, old_h)
        z = jax.nn.sigmoid(self.Wz(xh))
        r = jax.nn.sigmoid(self.Wr(xh))
        if self.reset_after:
            cand = self.activation(self.Wx(x) + r * self.Uh(old_h))
        else:
            cand = self.activation(self.Wh(_cat(x, r * old_h)))
        h = (1. - z) * old_h + z * cand
        self.h.value = h
        return h


class MGUCell(RNNCell):
    r"""Minimal gated unit (Zhou et al. 2016): one forget gate ``f`` plays GRU's ``z`` and ``r``.

    .. math:: f = σ(W_f [x, h] + b_f), \quad h' = (1 - f) ⊙ h + f ⊙ \tilde h

    with :math:`\tilde h = act(W_h [x, f ⊙ h] + b)` (``reset_after=False``, default, 0.1:
    ``W_f`` reaches ``h`` element-wise through the gate *and* through ``W_h``'s op input;
    only the first path is traced) or :math:`act(W_x x + b + f ⊙ (U_h h + b_u))`
    (``reset_after=True``: every weight traced).

    Args (0.1's): ``in_size, out_size, w_init=Orthogonal(), b_init=ZeroInit(),
    state_init=ZeroInit(), activation='tanh', name=None, param_type=ETraceParam``, plus
    ``reset_after``. Parameters ``Wf, Wh``.

    Example::

        >>> cell = brainscale.nn.MGUCell(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell)
        >>> cell(jnp.ones(3)).shape
        (4,)
    """

    def __init__(self, in_size, out_size, w_init=braintools.init.Orthogonal(),
                 b_init=braintools.init.ZeroInit(), state_init=braintools.init.ZeroInit(),
                 activation="tanh", name: Optional[str] = None, param_type: type = ETraceParam,
                 *, reset_after: bool = False):
        super().__init__(in_size, out_size, state_init, activation, name, param_type)
        n_xh = self.num_in + self.num_out
        self.reset_after = bool(reset_after)
        self.Wf = self._linear(n_xh, w_init, b_init)
        if self.reset_after:
            self.Wx = self._linear(self.num_in, w_init, b_init)
            self.Uh = self._linear(self.num_out, w_init, b_init)
        else:
            self.Wh = self._linear(n_xh, w_init, b_init)

    def update(self, x):
        old_h = self.h.value
        f = jax.nn.sigmoid(self.Wf(_cat(x, old_h)))
        if self.reset_after:
            cand = self.activation(self.Wx(x) + f * self.Uh(old_h))
        else:
            cand = self.activation(self.Wh(_cat(x, f * old_h)))
        h = (1. - f) * old_h + f * cand
        self.h.value = h
        return h


class LSTMCell(RNNCell):
    r"""Long short-term memory cell (Zaremba et al. 2014).

    .. math::
        i, g, f, o = W_{i,g,f,o} [x, h] + b, \quad
        c' = σ(f + 1) ⊙ c + σ(i) ⊙ act(g), \quad h' = σ(o) ⊙ act(c')

    (the ``+ 1`` is the forget-gate bias offset of Jozefowicz et al. 2015). Four gate ops
    ``Wi, Wg, Wf, Wo``. ``c`` and ``h`` are coupled per neuron: one hidden group of ``k=2``.

    Args (0.1's): ``in_size, out_size, w_init=XavierNormal(), b_init=ZeroInit(),
    state_init=ZeroInit(), activation='tanh', name=None, param_type=ETraceParam``.

    Example::

        >>> cell = brainscale.nn.LSTMCell(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell)
        >>> cell(jnp.ones(3)).shape
        (4,)
    """

    _state_names = ("c", "h")

    def __init__(self, in_size, out_size, w_init=braintools.init.XavierNormal(),
                 b_init=braintools.init.ZeroInit(), state_init=braintools.init.ZeroInit(),
                 activation="tanh", name: Optional[str] = None, param_type: type = ETraceParam):
        super().__init__(in_size, out_size, state_init, activation, name, param_type)
        n_xh = self.num_in + self.num_out
        self.Wi = self._linear(n_xh, w_init, b_init)
        self.Wg = self._linear(n_xh, w_init, b_init)
        self.Wf = self._linear(n_xh, w_init, b_init)
        self.Wo = self._linear(n_xh, w_init, b_init)

    def update(self, x):
        h, c = self.h.value, self.c.value
        xh = _cat(x, h)
        i, g, f, o = self.Wi(xh), self.Wg(xh), self.Wf(xh), self.Wo(xh)
        c = jax.nn.sigmoid(f + 1.) * c + jax.nn.sigmoid(i) * self.activation(g)
        h = jax.nn.sigmoid(o) * self.activation(c)
        self.c.value = c
        self.h.value = h
        return h


class URLSTMCell(RNNCell):
    r"""LSTM with the UR gating mechanism (Gu et al. 2020, "Improving the gating mechanism").

    .. math::
        f, r, u, o = W_{f,r,u,o} [x, h], \quad
        f_g = σ(f + b), \quad r_g = σ(r - b), \quad
        g = 2 r_g f_g + (1 - 2 r_g) f_g^2, \\
        c' = g ⊙ c + (1 - g) ⊙ act(u), \quad h' = σ(o) ⊙ act(c')

    The untied forget bias ``b`` (``self.bias``, initialised to ``-log(1/U - 1)`` with
    ``U ~ Uniform(1/n, 1 - 1/n)``) is an ETraceParam applied through ``ElemWiseOp`` (so it
    is traced too). Gate ops ``Wu, Wf, Wr, Wo`` (0.1's names; no gate biases). Hidden group
    ``[c, h]``, ``k=2``.

    Args (0.1's): ``in_size, out_size, w_init=XavierNormal(), state_init=ZeroInit(),
    activation='tanh', name=None, param_type=ETraceParam``.

    Example::

        >>> cell = brainscale.nn.URLSTMCell(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell)
        >>> cell(jnp.ones(3)).shape
        (4,)
    """

    _state_names = ("c", "h")

    def __init__(self, in_size, out_size, w_init=braintools.init.XavierNormal(),
                 state_init=braintools.init.ZeroInit(), activation="tanh",
                 name: Optional[str] = None, param_type: type = ETraceParam):
        super().__init__(in_size, out_size, state_init, activation, name, param_type)
        n_xh = self.num_in + self.num_out
        self.Wu = self._linear(n_xh, w_init, None)
        self.Wf = self._linear(n_xh, w_init, None)
        self.Wr = self._linear(n_xh, w_init, None)
        self.Wo = self._linear(n_xh, w_init, None)
        n = self.num_out
        uu = brainstate.random.uniform(1 / n, 1 - 1 / n, (n,)) if n > 2 else jnp.full((n,), 0.5)
        self.bias = make_param(param_type, -jnp.log(1 / uu - 1), ElemWiseOp(_identity),
                               "URLSTMCell bias")

    def update(self, x):
        h, c = self.h.value, self.c.value
        xh = _cat(x, h)
        b = self.bias.execute(None)
        f_g = jax.nn.sigmoid(self.Wf(xh) + b)
        r_g = jax.nn.sigmoid(self.Wr(xh) - b)
        g = 2 * r_g * f_g + (1 - 2 * r_g) * f_g ** 2
        c = g * c + (1 - g) * self.activation(self.Wu(xh))
        h = jax.nn.sigmoid(self.Wo(xh)) * self.activation(c)
        self.c.value = c
        self.h.value = h
        return h


class MinimalRNNCell(RNNCell):
    r"""MinimalRNN (Chen 2017).

    .. math:: z = φ(x), \quad u = σ(W_u [z, h] + b_u), \quad h' = u ⊙ h + (1 - u) ⊙ z

    As in brainscale 0.1, ``φ`` (``self.phi``) is by default a :class:`Linear` ``x → h``
    (no activation) and the update gate ``W_u`` reads ``[z, h]`` (``gate_input='z'``).
    ``φ``'s output then reaches ``h`` element-wise (traced) *and* through ``W_u``'s op
    input (not traced: a weight feeding a weight). ``gate_input='x'`` gates on ``[x, h]``
    instead (this package's earlier cell, with ``activation='tanh'``: ``z = tanh(φ(x))``),
    so every weight is traced.

    Args: 0.1's ``in_size, out_size, w_init=Orthogonal(), b_init=ZeroInit(),
    state_init=ZeroInit(), phi=None, name=None, param_type=ETraceParam``; keyword-only
    ``gate_input`` (``'z'`` or ``'x'``) and ``activation`` (applied to ``φ(x)``, default
    none).

    Example::

        >>> cell = brainscale.nn.MinimalRNNCell(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell)
        >>> cell(jnp.ones(3)).shape
        (4,)
    """

    def __init__(self, in_size, out_size, w_init=braintools.init.Orthogonal(),
                 b_init=braintools.init.ZeroInit(), state_init=braintools.init.ZeroInit(),
                 phi: Optional[Callable] = None, name: Optional[str] = None,
                 param_type: type = ETraceParam, *, gate_input: str = "z", activation=None):
        super().__init__(in_size, out_size, state_init, activation, name, param_type)
        if gate_input not in ("z", "x"):
            raise ValueError(f"MinimalRNNCell: gate_input must be 'z' (0.1: the gate reads "
                             f"[phi(x), h]) or 'x' (the gate reads [x, h]), got {gate_input!r}")
        self.gate_input = gate_input
        if phi is None:
            phi = self._linear(self.num_in, w_init, b_init)
        elif not callable(phi):
            raise TypeError(f"MinimalRNNCell: phi must be callable (x -> features of size "
                            f"{self.num_out}), got {phi!r}")
        self.phi = phi
        n_gate = (self.num_out if gate_input == "z" else self.num_in) + self.num_out
        self.W_u = self._linear(n_gate, w_init, b_init)

    def update(self, x):
        old_h = self.h.value
        z = self.phi(x)
        if self.activation is not None:
            z = self.activation(z)
        gate = jax.nn.sigmoid(self.W_u(_cat(z if self.gate_input == "z" else x, old_h)))
        h = gate * old_h + (1. - gate) * z
        self.h.value = h
        return h


class MiniGRU(RNNCell):
    r"""Minimal GRU of brainscale 0.1: one update gate on ``[x, h]``, a linear candidate.

    .. math:: z = σ(W_z [x, h] + b_z), \quad h' = (1 - z) ⊙ h + z ⊙ (W_x x + b_x)

    Ops ``W_x`` and ``W_z``; every weight reaches ``h`` element-wise and is traced.

    Args (0.1's): ``in_size, out_size, w_init=Orthogonal(), b_init=ZeroInit(),
    state_init=ZeroInit(), name=None, param_type=ETraceParam``.

    Example::

        >>> cell = brainscale.nn.MiniGRU(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell, batch_size=2)
        >>> cell(jnp.ones((2, 3))).shape
        (2, 4)
    """

    def __init__(self, in_size, out_size, w_init=braintools.init.Orthogonal(),
                 b_init=braintools.init.ZeroInit(), state_init=braintools.init.ZeroInit(),
                 name: Optional[str] = None, param_type: type = ETraceParam):
        super().__init__(in_size, out_size, state_init, None, name, param_type)
        self.W_x = self._linear(self.num_in, w_init, b_init)
        self.W_z = self._linear(self.num_in + self.num_out, w_init, b_init)

    def update(self, x):
        old_h = self.h.value
        z = jax.nn.sigmoid(self.W_z(_cat(x, old_h)))
        h = (1. - z) * old_h + z * self.W_x(x)
        self.h.value = h
        return h


class MiniLSTM(RNNCell):
    r"""Minimal LSTM of brainscale 0.1: forget and input gates on ``[x, h]``, a linear
    candidate.

    .. math:: f = σ(W_f [x, h] + b_f), \quad i = σ(W_i [x, h] + b_i), \quad
              h' = f ⊙ h + i ⊙ (W_x x + b_x)

    (no normalisation of ``f`` and ``i``, as in 0.1). Ops ``W_x``, ``W_f``, ``W_i``; every
    weight is traced.

    Args (0.1's): ``in_size, out_size, w_init=Orthogonal(), b_init=ZeroInit(),
    state_init=ZeroInit(), name=None, param_type=ETraceParam``.

    Example::

        >>> cell = brainscale.nn.MiniLSTM(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell)
        >>> cell(jnp.ones(3)).shape
        (4,)
    """

    def __init__(self, in_size, out_size, w_init=braintools.init.Orthogonal(),
                 b_init=braintools.init.ZeroInit(), state_init=braintools.init.ZeroInit(),
                 name: Optional[str] = None, param_type: type = ETraceParam):
        super().__init__(in_size, out_size, state_init, None, name, param_type)
        self.W_x = self._linear(self.num_in, w_init, b_init)
        self.W_f = self._linear(self.num_in + self.num_out, w_init, b_init)
        self.W_i = self._linear(self.num_in + self.num_out, w_init, b_init)

    def update(self, x):
        old_h = self.h.value
        xh = _cat(x, old_h)
        f = jax.nn.sigmoid(self.W_f(xh))
        i = jax.nn.sigmoid(self.W_i(xh))
        h = f * old_h + i * self.W_x(x)
        self.h.value = h
        return h


def _glorot(shape):
    """0.1's LRU projection init: ``N(0, 1) / sqrt(fan_in)``."""
    return brainstate.random.randn(*shape) / np.sqrt(shape[0])


def _ring_nu_log(r_min, r_max, n):
    """``ν_log`` with ``|λ| = exp(-exp(ν_log))`` uniform on the ring ``[r_min, r_max]``."""
    uu = brainstate.random.uniform(size=(n,))
    return jnp.log(-0.5 * jnp.log(uu * (r_max ** 2 - r_min ** 2) + r_min ** 2))


class LRUCell(RNNCell):
    r"""Linear recurrent unit (Orvieto et al. 2023), complex-valued as in brainscale 0.1.

    .. math::
        h' = λ ⊙ h + e^{γ_{log}} ⊙ (B x), \quad
        λ = \exp(-e^{ν_{log}} + i\, e^{θ_{log}}), \quad
        y = \mathrm{Re}[C h] + D ⊙ x

    with complex ``h = h_re + i h_im``, ``B = B_re + i B_im`` (``d_model → d_hidden``),
    ``C = C_re + i C_im`` (``d_hidden → d_model``) and the skip ``D`` (``d_model``). ``h_re``
    and ``h_im`` are the hidden states (one group of ``k=2`` per hidden unit: the rotation
    couples them); ``ν_log``, ``θ_log``, ``γ_log`` and ``D`` are :class:`brainscale.ElemWiseParam`
    (param-dim traces), ``B_re``/``B_im``/``C_re``/``C_im`` bias-free :class:`Linear` layers.
    ``|λ|`` is initialised uniformly on the ring ``[r_min, r_max]``, the phase uniformly on
    ``[0, max_phase]`` and ``γ = sqrt(1 - |λ|²)`` (the LRU normalisation). The output has
    ``d_model`` features.

    The recurrence is the complex product written out (``h_im'`` uses the previous
    ``h_re``); brainscale 0.1's code read the already updated ``h_re`` there, which is not
    the documented equation.

    Args:
        d_model: input and output features.
        d_hidden: hidden (complex) units.
        r_min, r_max: ring of ``|λ|`` at initialisation (0.1's defaults 0 and 1).
        max_phase: largest initial phase.
        complex_valued: ``False`` gives this package's earlier real-valued cell
            ``h' = λ ⊙ h + γ ⊙ (B x + b)``, ``λ = exp(-exp(ν))``, output ``activation(h)`` of
            ``d_hidden`` features (parameters ``nu``, ``gamma_log``, ``B``; the keywords
            below apply to it only).
        w_init, b_init, state_init, normalize, activation, name: for
            ``complex_valued=False`` (``normalize=False`` drops ``γ``).

    Example::

        >>> cell = brainscale.nn.LRUCell(3, 8)
        >>> _ = brainstate.nn.init_all_states(cell, batch_size=2)
        >>> cell(jnp.ones((2, 3))).shape
        (2, 3)
        >>> real = brainscale.nn.LRUCell(3, 4, r_min=0.4, r_max=0.99, complex_valued=False)
        >>> _ = brainstate.nn.init_all_states(real)
        >>> real(jnp.ones(3)).shape
        (4,)
    """

    def __init__(self, d_model: int, d_hidden: int, r_min: float = 0.0, r_max: float = 1.0,
                 max_phase: float = 6.28, *, complex_valued: bool = True,
                 w_init=braintools.init.XavierNormal(), b_init=braintools.init.ZeroInit(),
                 state_init=braintools.init.ZeroInit(), normalize: bool = True,
                 activation="identity", name: Optional[str] = None):
        self.complex_valued = bool(complex_valued)
        super().__init__(d_model, d_hidden, state_init if not complex_valued
                         else braintools.init.ZeroInit(), activation, name)
        if not 0. <= r_min < r_max <= 1.:
            raise ValueError(f"LRUCell: need 0 <= r_min < r_max <= 1, got r_min={r_min}, "
                             f"r_max={r_max}")
        self.d_model, self.d_hidden = self.num_in, self.num_out
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        n = self.d_hidden
        if self.complex_valued:
            self._state_names = ("h_re", "h_im")
            self.out_size = self.in_size          # the output has d_model features
            theta_log = jnp.log(max_phase * brainstate.random.uniform(size=(n,)))
            nu_log = _ring_nu_log(r_min, r_max, n)
            self.theta_log = ElemWiseParam(theta_log)
            self.nu_log = ElemWiseParam(nu_log)
            self.gamma_log = ElemWiseParam(0.5 * jnp.log(1. - jnp.exp(-2. * jnp.exp(nu_log))))
            self.B_re = Linear(self.d_model, n, w_init=_glorot, b_init=None)
            self.B_im = Linear(self.d_model, n, w_init=_glorot, b_init=None)
            self.C_re = Linear(n, self.d_model, w_init=_glorot, b_init=None)
            self.C_im = Linear(n, self.d_model, w_init=_glorot, b_init=None)
            self.D = ElemWiseParam(brainstate.random.randn(self.d_model))
        else:
            self.normalize = bool(normalize)
            self.B = self._linear(self.num_in, w_init, b_init)
            nu = _ring_nu_log(r_min, r_max, n)
            self.nu = ETraceParam(nu, ElemWiseOp(_lru_lambda))
            self.gamma_log = None
            if self.normalize:
                self.gamma_log = ETraceParam(0.5 * jnp.log(1. - _lru_lambda(nu) ** 2),
                                             ElemWiseOp(jnp.exp))

    def update(self, x):
        if not self.complex_valued:
            old_h = self.h.value
            lam = self.nu.execute(None)
            inp = self.B(x)
            if self.gamma_log is not None:
                inp = self.gamma_log.execute(None) * inp
            h = lam * old_h + inp
            self.h.value = h
            return self.activation(h)
        h_re, h_im = self.h_re.value, self.h_im.value
        # per-unit factors (d_hidden,), broadcast over a batch by the products below
        mag = jnp.exp(-jnp.exp(self.nu_log.execute()))
        phase = jnp.exp(self.theta_log.execute())
        gamma = jnp.exp(self.gamma_log.execute())
        a_cos, a_sin = mag * jnp.cos(phase), mag * jnp.sin(phase)
        new_re = a_cos * h_re - a_sin * h_im + gamma * self.B_re(x)
        new_im = a_sin * h_re + a_cos * h_im + gamma * self.B_im(x)
        self.h_re.value, self.h_im.value = new_re, new_im
        return self.C_re(new_re) - self.C_im(new_im) + x * self.D.execute()


def _lru_lambda(nu):
    return jnp.exp(-jnp.exp(nu))
