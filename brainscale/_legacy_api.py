"""Methods of brainscale 0.1's algorithm objects that code written for it calls.

:class:`LegacyAPIMixin` is a base of :class:`brainscale.ETraceAlgorithm`; it must not import
``brainscale.algorithms`` at module level (that module imports this one).
"""
from __future__ import annotations

from .errors import BrainscaleError

__all__ = ["LegacyAPIMixin"]


def _mode_is_batching(mode) -> bool:
    import brainstate
    has = getattr(mode, "has", None)
    return bool(has(brainstate.mixin.Batching)) if callable(has) else \
        isinstance(mode, brainstate.mixin.Batching)


class LegacyAPIMixin:
    """brainscale 0.1 names on the algorithm object (``mode=``, ...)."""

    mode = None

    def _check_mode(self, graph, signature: str = "") -> None:
        """``mode=brainstate.mixin.Batching()`` (0.1's way of saying the inputs carry a batch
        axis) must agree with the example inputs (``signature``: their dtypes and shapes) the
        step was compiled on."""
        mode = self.mode
        if mode is None:
            return
        import brainstate
        if not isinstance(mode, brainstate.mixin.Mode):
            raise TypeError(f"mode must be a brainstate.mixin.Mode (e.g. "
                            f"brainstate.mixin.Batching()), got {type(mode).__name__}: {mode!r}")
        batching = _mode_is_batching(mode)
        if batching and not graph.batch:
            raise BrainscaleError(
                f"mode={mode!r} says the inputs are batched, but the example inputs "
                f"({signature}) give no trace op a batch axis; pass inputs with a leading batch "
                f"axis (and states initialised with init_all_states(model, batch_size)), or drop "
                f"mode=")
        if not batching and graph.batch:
            raise BrainscaleError(
                f"mode={mode!r} is not batching, but the example inputs ({signature}) carry a "
                f"batch axis of size {graph.batch}; pass mode=brainstate.mixin.Batching() or "
                f"unbatched inputs")
