"""``backend='native'``: the JAX step with D-RTRL traces on the native CPU kernel (and
``NativeZooBackend``, what ``backend='native'`` means for the algorithms of ``brainscale.zoo``).

Like the Pallas backend it never changes the IR itself: its pass ``native-select``
(:mod:`.select`) records per trace whether the kernel runs it (``path=native``) and lays
those traces out as the kernel reads them. Emission is the JAX backend's
(:func:`~..step.emit_step`); the traces on ``path=native`` run on the native rule
(:mod:`.rules`), every other trace on the JAX rules.
"""
from __future__ import annotations

from ..base import Backend, CompiledStep, register_backend
from ..pallas.select import unsupported_traces
from ..step import emit_step
from ..zoo_step import ZooBackend
from . import rules as _rules  # noqa: F401  (registers the native trace rule)
from .build import why_unavailable
from .select import IO_MIN_ROWS, IO_MIN_SIZE, NativeSelectPass

__all__ = ["NativeBackend", "NativeZooBackend"]


class _NativeSelecting:
    """The options of ``native-select`` a native backend keeps, and its pipeline."""

    def _select_options(self, select, trace_dtype, io_min_size, io_min_rows):
        self.select = select
        self.trace_dtype = trace_dtype
        self.io_min_size = io_min_size
        self.io_min_rows = io_min_rows

    def pipeline(self) -> tuple:
        return (NativeSelectPass(select=self.select, trace_dtype=self.trace_dtype,
                                 io_min_size=self.io_min_size, io_min_rows=self.io_min_rows),)


@register_backend
class NativeBackend(_NativeSelecting, Backend):
    """JAX backend + the native CPU D-RTRL kernel (C++, XLA FFI, built on first use).

    Args:
        select: 'all' (every supported trace takes the kernel) or 'none' (none does).
        jit: jit the step (as the JAX backend).
        trace_dtype: storage of the kernel's D-RTRL traces, 'float32' or 'bfloat16' (half
            the memory and the traffic per step; arithmetic and gradients stay float32).
        io_min_size / io_min_rows: the io-dim (ES-D-RTRL) traces of dense layers take the
            kernel's in-place gradient accumulate from ``I·O`` weight elements and rows of
            ``ε_x`` (examples) up (default 65536 and 4: where it gains on the CPU measured).
    """
    name = "native"

    def __init__(self, select: str = "all", jit: bool = True, trace_dtype: str = "float32",
                 io_min_size: int = IO_MIN_SIZE, io_min_rows: int = IO_MIN_ROWS):
        self.jit = jit
        self._select_options(select, trace_dtype, io_min_size, io_min_rows)

    @staticmethod
    def unavailable() -> str | None:
        """None when the kernel can run here, else why not (``build.why_unavailable``)."""
        return why_unavailable()

    def unsupported(self, graph) -> tuple:
        return unsupported_traces(graph)

    def emit(self, graph) -> CompiledStep:
        return emit_step(graph, self, self.jit)


class NativeZooBackend(_NativeSelecting, ZooBackend):
    """``backend='native'`` for the algorithms of :mod:`brainscale.zoo`: the ``jax-zoo`` step
    (every rule axis and learning signal) with ``native-select``, so the traces on the
    default D-RTRL rule take the native kernel and the others their zoo rules."""
    name = "native-zoo"

    def __init__(self, select: str = "all", jit: bool = True, feedback_seed: int = 0,
                 trace_dtype: str = "float32", io_min_size: int = IO_MIN_SIZE,
                 io_min_rows: int = IO_MIN_ROWS):
        super().__init__(jit=jit, feedback_seed=feedback_seed)
        self._select_options(select, trace_dtype, io_min_size, io_min_rows)
