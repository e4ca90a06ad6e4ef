"""JAX backend: the compiled online-learning step in plain JAX (jit + custom VJP).

The step is :func:`~.step.emit_step` with the JAX trace rules (:mod:`.rules`, path
``'jax'``): the forward (:mod:`.linearize`) evaluates the traced step once, linearised, and
updates every trace array the IR lists; the backward (:mod:`.signals`) gets the learning
signals from one VJP of a dual evaluation and turns the traces into gradients. Everything
runs under ``jax.jit``; memory per step does not depend on time (docs/design.md).
"""
from __future__ import annotations

from .base import Backend, CompiledStep, register_backend
from .step import emit_step

__all__ = ["JaxBackend"]


@register_backend
class JaxBackend(Backend):
    """Emits the compiled step as plain jitted JAX."""
    name = "jax"
    supports_mesh = True     # the step constrains its arrays to the IR's shardings

    def __init__(self, jit: bool = True):
        self.jit = jit

    def emit(self, graph) -> CompiledStep:
        return emit_step(graph, self, self.jit)
