"""``fused_online_gradients``: the online driver with the one-pass D-RTRL kernel.

The learner's custom-VJP step cannot run the one-pass D-RTRL kernel: the new trace must
leave the forward, but the learning signal δ^t it is contracted with only exists in the
backward. The backend-neutral step-owning driver (:func:`~..online_driver.drive_online`)
owns the whole step instead (same math, same gradients as ``brainscale.online_gradients``),
and the Pallas rule's ``one_pass`` reads ε^{t-1} once, writes ε^t in place and adds
``Σ δ ε^t`` into the running weight gradient. ES-D-RTRL matmul gradients are summed over
windows of ``chunk`` steps with the XLA GEMM or the Pallas kernel (:mod:`.es_chunked`).
"""
from __future__ import annotations

import functools

from ...errors import BrainscaleError
from ..online_driver import drive_online
from ._common import platform
from .es_chunked import es_accumulate

__all__ = ["fused_online_gradients"]


def fused_online_gradients(learner, inputs, targets, loss_fn, params=None, chunk: int = 1,
                           es_impl: str | None = None, jit: bool = True, reset: bool = True):
    """``brainscale.online_gradients`` with the one-pass D-RTRL kernel and chunked ES gradients.

    Args:
        learner: an algorithm compiled with ``backend='pallas'`` (or a ``PallasBackend``).
        inputs, targets: leading time axis ``(T, ...)``; ``loss_fn(out_t, target_t)``.
        params: dict of ParamStates to return gradients for (default: all of the model's).
        chunk: K, the window of io-dim (ES-D-RTRL) matmul gradients accumulated with one
            (K·B)-row product; 1 accumulates every step. The gradient sum is the same.
        es_impl: 'xla' (cuBLAS GEMM) or 'pallas' (the kernel); default: the cost model's.
        jit: run under ``jax.jit``.
        reset: start from reset states and zero traces (as ``online_gradients``).

    Returns:
        ``(grads, losses)`` like ``online_gradients``. The model's hidden states and the
        learner's traces are advanced to the end of the sequence.
    """
    from .backend import PallasBackend
    from .cost_model import load_cost_model
    learner._require()
    backend = learner._backend_obj
    if not isinstance(backend, PallasBackend) and not isinstance(
            getattr(backend, "impl", None), PallasBackend):
        raise BrainscaleError("fused_online_gradients needs a learner compiled with "
                              "backend='pallas' (or a PallasBackend instance)")
    backend = getattr(backend, "impl", backend)
    impl = es_impl or load_cost_model(backend.cost_model).es_impl
    if impl not in ("xla", "pallas"):
        raise ValueError(f"es_impl must be 'xla' or 'pallas', got {impl!r}")
    interpret = backend.interpret if backend.interpret is not None else platform().interpret
    window = _window_impl(impl, bool(interpret))
    if reset:
        learner.reset_state()
    return drive_online(learner, inputs, targets, loss_fn, params=params, chunk=chunk,
                        window_impl=window, jit=jit)


@functools.lru_cache(maxsize=None)
def _window_impl(impl: str, interpret: bool):
    """One window function per (impl, mode), so the driver's jit cache sees a stable key."""
    def window(X, S, grad, chain):
        return es_accumulate(X, S, grad, chain, impl=impl, interpret=interpret)
    window.__name__ = f"es_window_{impl}{'_interpret' if interpret else ''}"
    return window
