"""The Pallas backend: the JAX step with D-RTRL traces routed to Pallas kernels.

``PallasBackend`` adds the ``pallas-select`` pass to the pipeline: it decides per trace
whether the kernels run it (``path=pallas`` / ``pallas-interpret``) and lays those traces
out as the kernels read them (storage dtype, stacked weight states). Emission is the JAX
backend's (:func:`~..step.emit_step`); the traces whose path names the kernels run on the
Pallas rules registered in the trace-rule table (:mod:`.rules`), every other trace on the
JAX rules. The backend itself never changes the IR.
"""
from __future__ import annotations

import dataclasses

from ..base import BACKENDS, Backend, CompiledStep, register_backend
from ..jax_backend import JaxBackend
from ..step import emit_step
from . import rules as _rules  # noqa: F401  (registers the Pallas trace rules)
from ._common import Tiles, platform
from .select import PallasSelectPass, unsupported_traces

__all__ = ["PallasBackend", "AutoBackend"]


@register_backend
class PallasBackend(Backend):
    """JAX backend + Pallas D-RTRL kernels, chosen per trace by the ``pallas-select`` pass.

    Args:
        select: 'auto' (cost model on a GPU; every supported trace in interpret mode),
            'all' (every supported trace) or 'none'.
        trace_dtype: storage of kernel-path traces, 'float32' or 'bfloat16' (math is f32).
        scheme: which threshold of the cost model applies: 'learner' (the custom-VJP step)
            or 'fused' (:func:`fused_online_gradients`).
        cost_model: path of a ``tools/pallas_bench.py`` JSON ('' / None: built-in, or
            ``$BRAINSCALE_PALLAS_COST_MODEL``).
        min_bytes: threshold override (bytes of a trace's kernel arrays).
        interpret: force interpret mode on/off (None: on exactly when there is no usable GPU).
        tiles: a :class:`Tiles` for every launch (default: the cost model's per dtype).
        jit: jit the step (as the JAX backend).
    """
    name = "pallas"

    def __init__(self, select: str = "auto", trace_dtype: str = "float32",
                 scheme: str = "learner", cost_model: str | None = None,
                 min_bytes: float | None = None, interpret: bool | None = None,
                 tiles: Tiles | None = None, jit: bool = True):
        self.select = select
        self.trace_dtype = trace_dtype
        self.scheme = scheme
        self.cost_model = cost_model or ""
        self.min_bytes = min_bytes
        self.interpret = interpret
        self.tiles = tiles
        self.jit = jit

    def pipeline(self) -> tuple:
        return (PallasSelectPass(select=self.select, trace_dtype=self.trace_dtype,
                                 scheme=self.scheme, cost_model=self.cost_model,
                                 min_bytes=self.min_bytes, interpret=self.interpret),)

    def unsupported(self, graph) -> tuple:
        return unsupported_traces(graph)

    def emit(self, graph) -> CompiledStep:
        return emit_step(graph, self, self.jit)


@register_backend
class AutoBackend(Backend):
    """``backend='auto'``: :class:`PallasBackend` on a CUDA GPU with Triton support (cc >= 8);
    on the CPU the native backend (the one-pass D-RTRL kernel, ``docs/native.md``) where its
    kernel builds, else :class:`JaxBackend`. Options go to the Pallas backend; on the CPU
    only ``jit``, ``select='none'`` (every trace on the JAX rules) and ``trace_dtype`` (the
    native kernel's trace storage) apply. The choice and its reason are a note of the
    compiled step."""
    name = "auto"

    def __init__(self, **options):
        plat = platform()
        jit = options.get("jit", True)
        if plat.kind == "gpu":
            self.impl, self.reason = PallasBackend(**options), plat.reason
            return
        # the native backend by name (it imports the Pallas modules: no import back here)
        native = BACKENDS.get("native")
        why = native.unavailable() if native is not None else "the native backend is not loaded"
        if why is None:
            select = "none" if options.get("select") == "none" else "all"
            self.impl = native(select=select, jit=jit,
                               trace_dtype=options.get("trace_dtype", "float32"))
            self.reason = "CPU: the native D-RTRL kernel"
        else:
            self.impl = JaxBackend(jit=jit)
            self.reason = f"{plat.reason}; native kernel: {why}"

    def pipeline(self) -> tuple:
        return self.impl.pipeline()

    def unsupported(self, graph) -> tuple:
        return self.impl.unsupported(graph)

    def emit(self, graph) -> CompiledStep:
        step = self.impl.emit(graph)
        return dataclasses.replace(step, notes=tuple(step.notes) + (
            f"auto backend: {step.backend} ({self.reason})",))
