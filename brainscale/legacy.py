"""brainscale 0.1's public names, with 0.1's signatures and defaults.

Code written for the published brainscale 0.1 runs on this package with these names
(``docs/compat.md`` lists each name, what it maps to and what differs):

* the algorithms ``IODimVjpAlgorithm`` (= ``ES_D_RTRL``), ``ParamDimVjpAlgorithm``
  (= ``D_RTRL``) and ``HybridDimVjpAlgorithm`` are subclasses of :class:`DiagIODimAlgorithm`,
  :class:`DiagParamDimAlgorithm` and :class:`DiagHybridDimAlgorithm` taking 0.1's
  constructor arguments (``decay_or_rank`` positional, ``mode=``, ``name=``,
  ``vjp_method=``); constructing one warns (``DeprecationWarning``) with the new name;
* the parameter kinds ``ElemWiseParam``, ``NonTempParam``, ``FakeETraceParam`` and
  ``FakeElemWiseParam``;
* ``SingleStepData`` / ``MultiStepData`` (the inputs of ``vjp_method='multi-step'``).
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Callable

import brainstate

from ._stepdata import MultiStepData, SingleStepData
from .algorithms import DiagHybridDimAlgorithm, DiagIODimAlgorithm, DiagParamDimAlgorithm
from .concepts import ETraceGrad, ETraceOp, ETraceParam
from .ops import ElemWiseOp

__all__ = ["IODimVjpAlgorithm", "ES_D_RTRL", "ParamDimVjpAlgorithm", "D_RTRL",
           "HybridDimVjpAlgorithm", "ElemWiseParam", "NonTempParam", "FakeETraceParam",
           "FakeElemWiseParam", "SingleStepData", "MultiStepData"]


def _caller_stacklevel() -> int:
    """``warnings.warn`` stacklevel of the first frame outside brainscale and brainstate (the
    line constructing the algorithm, past brainstate's module metaclass)."""
    skip = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                 for m in (sys.modules[__package__], brainstate))
    f, level = sys._getframe(1), 1
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(skip):
        f, level = f.f_back, level + 1
    return level


def _renamed(old: str, new: str) -> None:
    warnings.warn(f"brainscale.{old} is brainscale 0.1's name; use brainscale.{new} (same "
                  f"arguments as keywords; see docs/compat.md)", DeprecationWarning,
                  stacklevel=_caller_stacklevel())


def _identity(w):
    return w


# ---------------------------------------------------------------------------------------
# algorithms
# ---------------------------------------------------------------------------------------

class IODimVjpAlgorithm(DiagIODimAlgorithm):
    """brainscale 0.1's ES-D-RTRL learner (io-dim traces): :class:`DiagIODimAlgorithm`.

    Args:
        model: the brainstate model (one time step per call).
        decay_or_rank: α of the traces, a float in (0, 1), or an int rank r (α = (r-1)/(r+1)).
        mode: ``brainstate.mixin.Batching()`` for inputs with a leading batch axis; None
            infers it from the example inputs. Checked by ``compile_graph``.
        name: the module name.
        vjp_method: ``'single-step'`` or ``'multi-step'`` (calls with
            :class:`MultiStepData` back-propagate the learning signal through the window).
        **kwargs: further :class:`DiagIODimAlgorithm` options (``backend=``, ...).
    """

    def __init__(self, model, decay_or_rank: float | int, mode=None, name: str | None = None,
                 vjp_method: str = "single-step", **kwargs):
        _renamed("IODimVjpAlgorithm / ES_D_RTRL", "DiagIODimAlgorithm")
        if decay_or_rank is None:
            raise TypeError("IODimVjpAlgorithm needs decay_or_rank: a float α in (0, 1) or an "
                            "int rank r > 0")
        super().__init__(model, decay_or_rank=decay_or_rank, mode=mode, name=name,
                         vjp_method=vjp_method, **kwargs)


class ParamDimVjpAlgorithm(DiagParamDimAlgorithm):
    """brainscale 0.1's D-RTRL learner (param-dim traces): :class:`DiagParamDimAlgorithm`.

    Args:
        model: the brainstate model (one time step per call).
        mode: ``brainstate.mixin.Batching()`` for inputs with a leading batch axis; None
            infers it from the example inputs. Checked by ``compile_graph``.
        name: the module name.
        vjp_method: ``'single-step'`` or ``'multi-step'``.
        **kwargs: further :class:`DiagParamDimAlgorithm` options.
    """

    def __init__(self, model, mode=None, name: str | None = None,
                 vjp_method: str = "single-step", **kwargs):
        _renamed("ParamDimVjpAlgorithm / D_RTRL", "DiagParamDimAlgorithm")
        super().__init__(model, mode=mode, name=name, vjp_method=vjp_method, **kwargs)


class HybridDimVjpAlgorithm(DiagHybridDimAlgorithm):
    """brainscale 0.1's hybrid learner: :class:`DiagHybridDimAlgorithm`.

    Each weight gets a param-dim or an io-dim trace. 0.1 chose param-dim when
    ``|x| + |y| > B·|θ|`` (and for element-wise weights, ``grad='full'``); here the
    ``select-dims`` cost model chooses (bytes, then flops per step; ``grad=`` and element-wise
    weights are honoured the same way), so a weight may get the other kind than under 0.1.
    ``learner.ir()`` prints each choice and its reason.

    Args: as :class:`IODimVjpAlgorithm`.
    """

    def __init__(self, model, decay_or_rank: float | int, mode=None, name: str | None = None,
                 vjp_method: str = "single-step", **kwargs):
        _renamed("HybridDimVjpAlgorithm", "DiagHybridDimAlgorithm")
        if decay_or_rank is None:
            raise TypeError("HybridDimVjpAlgorithm needs decay_or_rank: a float α in (0, 1) or "
                            "an int rank r > 0")
        super().__init__(model, decay_or_rank=decay_or_rank, mode=mode, name=name,
                         vjp_method=vjp_method, **kwargs)


ES_D_RTRL = IODimVjpAlgorithm
D_RTRL = ParamDimVjpAlgorithm


# ---------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------

def _elemwise_op(op, who: str) -> ElemWiseOp:
    if isinstance(op, ElemWiseOp):
        return op
    if isinstance(op, ETraceOp):
        raise TypeError(f"{who} op must be an ElemWiseOp or a function of the weight alone "
                        f"(fn(w) -> y), got the {type(op).__name__} {op!r}; for an op with an "
                        f"input use ETraceParam(weight, op)")
    if not callable(op):
        raise TypeError(f"{who} op must be an ElemWiseOp or a callable fn(w) -> y, got "
                        f"{type(op).__name__}")
    return ElemWiseOp(op)


def _plain_fn(op, who: str) -> Callable:
    """An op applied without the compiler's trace-op marker: ``op.xw_to_y`` for an
    ETraceOp, the callable itself otherwise."""
    if isinstance(op, ETraceOp):
        return op.xw_to_y
    if not callable(op):
        raise TypeError(f"{who} op must be an ETraceOp or a callable op(x, w) -> y, got "
                        f"{type(op).__name__}")
    return op


class ElemWiseParam(ETraceParam):
    r"""A trace parameter applied element-wise to the hidden states: ``y = fn(θ)``.

    An :class:`ETraceParam` with an :class:`ElemWiseOp` (always a param-dim trace,
    ``grad='full'``, as in 0.1). ``fn`` must be element-wise: ``fn(θ)`` has the shape of the
    hidden states it acts on and entry ``i`` depends on ``θ[i]`` only, e.g. a per-neuron
    decay ``ElemWiseParam(tau, lambda tau: jnp.exp(-dt / tau))``. ``θ`` may be a pytree.

    Args:
        weight: the parameter value.
        op: an :class:`ElemWiseOp` or the function ``fn(θ) -> y`` (default: identity).
        name: the state name.

    ``param.execute()`` returns ``fn(θ)``, marked for the compiler.
    """

    def __init__(self, weight, op: ElemWiseOp | Callable = _identity, name: str | None = None):
        super().__init__(weight, _elemwise_op(op, "ElemWiseParam"), grad=ETraceGrad.full,
                         name=name)

    def execute(self, x=None):
        """``fn(θ)`` (``x`` is ignored; 0.1 called it without arguments)."""
        return self.op(None, self.value)


class NonTempParam(brainstate.ParamState):
    r"""A parameter with its op that gets no temporal credit: its gradient is the
    instantaneous one, :math:`\sum_t \partial L^t / \partial \theta` through step t alone.

    The op is applied without the trace-op marker, so the compiler sees a plain parameter
    (no eligibility trace). ``temporal_credit = False`` states the intent: the compiler does
    not warn that this parameter lies on a path into hidden states.

    Args:
        value: the parameter value.
        op: an :class:`ETraceOp` (its ``xw_to_y`` is used) or a callable ``op(x, w) -> y``.
        name: the state name.
    """

    temporal_credit = False

    def __init__(self, value, op: ETraceOp | Callable, name: str | None = None, **kwargs):
        super().__init__(value, name=name, **kwargs)
        self.op = _plain_fn(op, "NonTempParam")

    def execute(self, x):
        """``op(x, value)``."""
        return self.op(x, self.value)


class FakeETraceParam:
    """A fixed (not trained) weight with the interface of :class:`ETraceParam`.

    Not a state: ``value`` is a constant of the compiled step and gets no gradient; 0.1 used
    it to switch a weight off training without changing the model code.

    Args:
        value: the weight.
        op: an :class:`ETraceOp` (its ``xw_to_y`` is used) or a callable ``op(x, w) -> y``.
    """

    temporal_credit = False

    def __init__(self, value, op: ETraceOp | Callable):
        self.value = value
        self.op = _plain_fn(op, "FakeETraceParam")

    def execute(self, x):
        """``op(x, value)``."""
        return self.op(x, self.value)

    def __repr__(self):
        return f"{type(self).__name__}(value={self.value!r}, op={self.op!r})"


class FakeElemWiseParam:
    """A fixed (not trained) element-wise weight with the interface of
    :class:`ElemWiseParam`: ``execute()`` returns ``fn(value)``, a constant of the step.

    Args:
        weight: the weight.
        op: an :class:`ElemWiseOp` or a function ``fn(w) -> y`` (default: identity).
        name: kept for 0.1's signature.
    """

    temporal_credit = False

    def __init__(self, weight, op: ElemWiseOp | Callable = _identity, name: str | None = None):
        if isinstance(op, ETraceOp):
            op = _elemwise_op(op, "FakeElemWiseParam").fn
        elif not callable(op):
            raise TypeError(f"FakeElemWiseParam op must be an ElemWiseOp or a callable "
                            f"fn(w) -> y, got {type(op).__name__}")
        self.value = weight
        self.op = op
        self.name = name

    def execute(self, x=None):
        """``fn(value)`` (``x`` is ignored)."""
        return self.op(self.value)

    def __repr__(self):
        return f"{type(self).__name__}(value={self.value!r}, op={self.op!r})"
