"""Recurrent cells written for online learning.

Every hidden state is a :class:`brainscale.ETraceState` and every weight an
:class:`brainscale.ETraceParam` applied through a trace op whose output has the shape of the
hidden states (one op per gate, never one wide op split into gates: ``split`` mixes
neurons). Gates combine op outputs element-wise, so each weight reaches the hidden states
element-wise and gets an eligibility trace.

=================  ==============  ======  ============================================
cell               hidden group    k       notes
=================  ==============  ======  ============================================
ValinaRNNCell      [h]             1       ``h = act(W [x, h] + b)``
GRUCell            [h]             1       ``reset_after=True`` (default): every weight
                                           traced; ``reset_after=False`` (brainstate's
                                           ``U (r ⊙ h)``): ``Wr`` feeds ``Wh`` and gets
                                           the instantaneous gradient only (``none``)
MGUCell            [h]             1       same ``reset_after`` choice for ``Wf``
LSTMCell           [c, h]          2       ``h = o ⊙ act(c)`` couples ``c`` and ``h``
URLSTMCell         [c, h]          2       untied gate bias traced via ``ElemWiseOp``
MinimalRNNCell     [h]             1       ``u = σ(U [x, h] + b)``, ``h = u h + (1-u) z``
LRUCell            [h]             1       ``h = λ ⊙ h + γ ⊙ B x``; ``λ``, ``γ`` learnable
                                           through ``ElemWiseOp``
=================  ==============  ======  ============================================

Constructors follow ``brainstate.nn``'s cells: ``(in_size, out_size, w_init, b_init,
state_init, activation, name)``; ``in_size``/``out_size`` may be ints.
"""
from __future__ import annotations

from typing import Optional

import braintools
import brainstate
import brainunit as u
import jax
import jax.numpy as jnp

from ..concepts import ETraceParam, ETraceState
from ..ops import ElemWiseOp
from ._base import broadcast_like, get_activation, to_size
from ._linear import Linear

__all__ = ["RNNCell", "ValinaRNNCell", "GRUCell", "MGUCell", "LSTMCell", "URLSTMCell",
           "MinimalRNNCell", "LRUCell"]


def _cat(*xs):
    return u.math.concatenate(xs, axis=-1)


class RNNCell(brainstate.nn.Module):
    """Base of the recurrent cells: sizes, activation and the ``h`` state helpers.

    Example::

        >>> cell = brainscale.nn.ValinaRNNCell(3, 4)
        >>> isinstance(cell, brainscale.nn.RNNCell)
        True
    """

    _state_names = ("h",)

    def __init__(self, in_size, out_size, state_init=braintools.init.ZeroInit(),
                 activation="tanh", name: Optional[str] = None):
        super().__init__(name=name)
        self.in_size = to_size(in_size, "in_size")
        self.out_size = to_size(out_size, "out_size")
        self.num_in = self.in_size[-1]
        self.num_out = self.out_size[-1]
        self._state_initializer = state_init
        self.activation = get_activation(activation)

    def init_state(self, batch_size: int = None, **kwargs):
        for n in self._state_names:
            setattr(self, n, ETraceState(braintools.init.param(
                self._state_initializer, self.out_size, batch_size)))

    def reset_state(self, batch_size: int = None, **kwargs):
        for n in self._state_names:
            getattr(self, n).value = braintools.init.param(self._state_initializer,
                                                           self.out_size, batch_size)

    def _linear(self, n_in, w_init, b_init):
        return Linear(n_in, self.num_out, w_init=w_init, b_init=b_init)


class ValinaRNNCell(RNNCell):
    r"""Vanilla RNN cell ``h = act(W [x, h] + b)`` (the seed's spelling "Valina").

    Example::

        >>> cell = brainscale.nn.ValinaRNNCell(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell, batch_size=2)
        >>> cell(jnp.ones((2, 3))).shape
        (2, 4)
    """

    def __init__(self, in_size, out_size, state_init=braintools.init.ZeroInit(),
                 w_init=braintools.init.XavierNormal(), b_init=braintools.init.ZeroInit(),
                 activation="relu", name: Optional[str] = None):
        super().__init__(in_size, out_size, state_init, activation, name)
        self.W = self._linear(self.num_in + self.num_out, w_init, b_init)

    def update(self, x):
        self.h.value = self.activation(self.W(_cat(x, self.h.value)))
        return self.h.value


class GRUCell(RNNCell):
    r"""Gated recurrent unit.

    .. math::
        z = σ(W_z [x, h] + b_z), \quad r = σ(W_r [x, h] + b_r), \quad
        h' = (1 - z) ⊙ h + z ⊙ \tilde h

    with the candidate

    * ``reset_after=True`` (default, the cuDNN/Keras form):
      :math:`\tilde h = act(W_x x + b + r ⊙ (U h + b_u))`. Every weight reaches ``h``
      element-wise and gets a trace.
    * ``reset_after=False`` (the classic/brainstate form):
      :math:`\tilde h = act(W_h [x, r ⊙ h] + b)`. ``W_r``'s output reaches ``h`` only
      through ``W_h``'s op (a weight feeding a weight): the compiler gives ``W_r`` the
      instantaneous gradient only (dim ``none`` in the IR).

    Example (the seed's 3-layer GRU uses ``GRUCell(n_in, n_rec)``)::

        >>> cell = brainscale.nn.GRUCell(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell)
        >>> cell(jnp.ones(3)).shape
        (4,)
    """

    def __init__(self, in_size, out_size, w_init=braintools.init.Orthogonal(),
                 b_init=braintools.init.ZeroInit(), state_init=braintools.init.ZeroInit(),
                 activation="tanh", reset_after: bool = True, name: Optional[str] = None):
        super().__init__(in_size, out_size, state_init, activation, name)
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
    r"""Minimal gated unit: one forget gate ``f`` plays GRU's ``z`` and ``r``.

    .. math:: f = σ(W_f [x, h] + b_f), \quad h' = (1 - f) ⊙ h + f ⊙ \tilde h

    with :math:`\tilde h = act(W_x x + b + f ⊙ (U h + b_u))` (``reset_after=True``,
    default; every weight traced) or :math:`act(W_h [x, f ⊙ h] + b)` (``False``: ``W_f``
    reaches ``h`` element-wise through the gate *and* through ``W_h``'s op; only the first
    path is traced).

    Example::

        >>> cell = brainscale.nn.MGUCell(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell)
        >>> cell(jnp.ones(3)).shape
        (4,)
    """

    def __init__(self, in_size, out_size, w_init=braintools.init.Orthogonal(),
                 b_init=braintools.init.ZeroInit(), state_init=braintools.init.ZeroInit(),
                 activation="tanh", reset_after: bool = True, name: Optional[str] = None):
        super().__init__(in_size, out_size, state_init, activation, name)
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
    r"""Long short-term memory cell.

    .. math::
        i, g, f, o = W_{i,g,f,o} [x, h] + b, \quad
        c' = σ(f + 1) ⊙ c + σ(i) ⊙ act(g), \quad h' = σ(o) ⊙ act(c')

    Four gate ops (one per gate). ``c`` and ``h`` are coupled per neuron (``h'`` depends on
    ``c``): one hidden group of ``k=2``.

    Example::

        >>> cell = brainscale.nn.LSTMCell(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell)
        >>> cell(jnp.ones(3)).shape
        (4,)
    """

    _state_names = ("c", "h")

    def __init__(self, in_size, out_size, w_init=braintools.init.XavierNormal(),
                 b_init=braintools.init.ZeroInit(), state_init=braintools.init.ZeroInit(),
                 activation="tanh", name: Optional[str] = None):
        super().__init__(in_size, out_size, state_init, activation, name)
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
        f, r, v, o = W_{f,r,v,o} [x, h], \quad
        f_g = σ(f + b), \quad r_g = σ(r - b), \quad
        g = 2 r_g f_g + (1 - 2 r_g) f_g^2, \\
        c' = g ⊙ c + (1 - g) ⊙ act(v), \quad h' = σ(o) ⊙ act(c')

    The untied forget bias ``b`` is an ETraceParam applied through ``ElemWiseOp`` (so it is
    traced too). Hidden group ``[c, h]``, ``k=2``.

    Example::

        >>> cell = brainscale.nn.URLSTMCell(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell)
        >>> cell(jnp.ones(3)).shape
        (4,)
    """

    _state_names = ("c", "h")

    def __init__(self, in_size, out_size, w_init=braintools.init.XavierNormal(),
                 state_init=braintools.init.ZeroInit(), activation="tanh",
                 name: Optional[str] = None):
        super().__init__(in_size, out_size, state_init, activation, name)
        n_xh = self.num_in + self.num_out
        self.Wf = self._linear(n_xh, w_init, None)
        self.Wr = self._linear(n_xh, w_init, None)
        self.Wv = self._linear(n_xh, w_init, None)
        self.Wo = self._linear(n_xh, w_init, None)
        n = self.num_out
        uu = brainstate.random.uniform(1 / n, 1 - 1 / n, (n,)) if n > 2 else jnp.full((n,), 0.5)
        self.bias = ETraceParam(-jnp.log(1 / uu - 1), ElemWiseOp(lambda b: b))

    def update(self, x):
        h, c = self.h.value, self.c.value
        xh = _cat(x, h)
        b = broadcast_like(self.bias.execute(None), h)
        f_g = jax.nn.sigmoid(self.Wf(xh) + b)
        r_g = jax.nn.sigmoid(self.Wr(xh) - b)
        g = 2 * r_g * f_g + (1 - 2 * r_g) * f_g ** 2
        c = g * c + (1 - g) * self.activation(self.Wv(xh))
        h = jax.nn.sigmoid(self.Wo(xh)) * self.activation(c)
        self.c.value = c
        self.h.value = h
        return h


class MinimalRNNCell(RNNCell):
    r"""MinimalRNN (Chen 2017): ``z = act(W_x x + b)``, ``u = σ(U [x, h] + b_u)``,
    ``h' = u ⊙ h + (1 - u) ⊙ z``.

    The update gate reads ``[x, h]`` (the paper reads ``[z, h]``; reading ``z`` would feed
    ``W_x``'s op output into ``U``'s op, whose path the traces cannot follow).

    Example::

        >>> cell = brainscale.nn.MinimalRNNCell(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell)
        >>> cell(jnp.ones(3)).shape
        (4,)
    """

    def __init__(self, in_size, out_size, w_init=braintools.init.XavierNormal(),
                 b_init=braintools.init.ZeroInit(), state_init=braintools.init.ZeroInit(),
                 activation="tanh", name: Optional[str] = None):
        super().__init__(in_size, out_size, state_init, activation, name)
        self.Wx = self._linear(self.num_in, w_init, b_init)
        self.U = self._linear(self.num_in + self.num_out, w_init, b_init)

    def update(self, x):
        old_h = self.h.value
        z = self.activation(self.Wx(x))
        gate = jax.nn.sigmoid(self.U(_cat(x, old_h)))
        h = gate * old_h + (1. - gate) * z
        self.h.value = h
        return h


def _lru_nu_init(r_min, r_max):
    def init(shape):
        uu = brainstate.random.uniform(0., 1., shape)
        # |λ| uniform on the ring [r_min, r_max]: ν = log(-log|λ|)
        return jnp.log(-0.5 * jnp.log(uu * (r_max ** 2 - r_min ** 2) + r_min ** 2))
    return init


def _lru_lambda(nu):
    return jnp.exp(-jnp.exp(nu))


class LRUCell(RNNCell):
    r"""Real-valued linear recurrent unit (LRU-style diagonal recurrence).

    .. math:: h' = λ ⊙ h + γ ⊙ (B x + b), \qquad λ = e^{-e^{ν}}, \quad γ = e^{γ_{log}}

    ``λ`` is stable (in (0, 1)) for any ``ν``. ``ν`` (``self.nu``) and ``γ_log``
    (``self.gamma_log``, initialised to ``log sqrt(1 - λ²)``, the LRU normalisation;
    ``normalize=False`` drops it) are ETraceParams applied through ``ElemWiseOp``; ``B`` is a
    :class:`Linear`. The recurrence is diagonal: one hidden group ``[h]``, ``k=1``; the
    output is ``activation(h)`` (identity by default).

    Args:
        in_size, out_size: sizes.
        r_min, r_max: ``|λ|`` is initialised uniformly on the ring ``[r_min, r_max]``.
        w_init, b_init: initializers of ``B`` and its bias.

    Example::

        >>> cell = brainscale.nn.LRUCell(3, 4)
        >>> _ = brainstate.nn.init_all_states(cell)
        >>> cell(jnp.ones(3)).shape
        (4,)
    """

    def __init__(self, in_size, out_size, w_init=braintools.init.XavierNormal(),
                 b_init=braintools.init.ZeroInit(), state_init=braintools.init.ZeroInit(),
                 r_min: float = 0.4, r_max: float = 0.99, normalize: bool = True,
                 activation="identity", name: Optional[str] = None):
        super().__init__(in_size, out_size, state_init, activation, name)
        if not 0. <= r_min < r_max < 1.:
            raise ValueError(f"LRUCell: need 0 <= r_min < r_max < 1, got {r_min}, {r_max}")
        self.normalize = bool(normalize)
        self.B = self._linear(self.num_in, w_init, b_init)
        nu = _lru_nu_init(r_min, r_max)((self.num_out,))
        self.nu = ETraceParam(nu, ElemWiseOp(_lru_lambda))
        self.gamma_log = None
        if self.normalize:
            gamma_log = 0.5 * jnp.log(1. - _lru_lambda(nu) ** 2)
            self.gamma_log = ETraceParam(gamma_log, ElemWiseOp(jnp.exp))

    def update(self, x):
        old_h = self.h.value
        lam = broadcast_like(self.nu.execute(None), old_h)
        inp = self.B(x)
        if self.gamma_log is not None:
            inp = broadcast_like(self.gamma_log.execute(None), inp) * inp
        h = lam * old_h + inp
        self.h.value = h
        return self.activation(h)
