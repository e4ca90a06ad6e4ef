"""Exception hierarchy of brainscale.

Every error the compiler raises on purpose derives from :class:`BrainscaleError`, so a
caller can catch them all; each message says what is wrong and how to fix it.
"""
from __future__ import annotations

__all__ = [
    "BrainscaleError",
    "IRVerificationError",
    "PassError",
    "PipelineError",
    "UnsupportedModelError",
    "UnsupportedPrimitiveError",
    "BackendError",
    "NotCompiledError",
    "NoTemporalCreditWarning",
    "JaxlibMiscompileWarning",
]


class BrainscaleError(Exception):
    """Base class of all brainscale errors."""


class IRVerificationError(BrainscaleError):
    """The IR violates an invariant (raised by :func:`brainscale.ir.verify`)."""


class PassError(BrainscaleError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class PipelineError(BrainscaleError):
    """A pipeline is ill-formed (unknown pass, missing requirement, bad spec string)."""


class UnsupportedModelError(BrainscaleError):
    """The model is outside the class the compiler handles (algorithms.md section 1)."""


class UnsupportedPrimitiveError(UnsupportedModelError):
    """A primitive on a path from a hidden state has no dependency rule."""


class BackendError(BrainscaleError):
    """A backend cannot emit the compiled graph."""


class NotCompiledError(BrainscaleError):
    """An algorithm was used before ``compile_graph`` was called."""


class NoTemporalCreditWarning(UserWarning):
    """A trace parameter whose op output reaches hidden states only through the input of
    another trace op (a weight feeding a weight, e.g. a GRU reset gate inside ``U·(r⊙h)``)
    gets its exact instantaneous gradient but no temporal credit (trace dim ``none``)."""


class JaxlibMiscompileWarning(RuntimeWarning):
    """The installed jaxlib is known to compute wrong results on the CPU for patterns the
    compiled step contains (jaxlib 0.10.2: ``a * sum(a * b)`` batched over >= 2 axes,
    jax-ml/jax#39103). Gradients may be silently wrong until jaxlib is changed or the
    faulty fusion is turned off (the warning says how)."""
