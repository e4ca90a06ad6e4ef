"""Backend interface: turn a fully compiled Graph into a runnable, immutable step."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ..errors import BackendError

__all__ = ["Backend", "CompiledStep", "BACKENDS", "register_backend", "get_backend",
           "device_memory_bytes", "check_trace_memory"]

BACKENDS: dict[str, type] = {}


def register_backend(cls):
    BACKENDS[cls.name] = cls
    return cls


def get_backend(name_or_backend, **options) -> "Backend":
    if isinstance(name_or_backend, Backend):
        return name_or_backend
    cls = BACKENDS.get(name_or_backend)
    if cls is None:
        raise BackendError(f"unknown backend {name_or_backend!r}; available: "
                           f"{', '.join(sorted(BACKENDS))}")
    return cls(**options)


def device_memory_bytes(device=None) -> int | None:
    """The memory of ``device`` (default: JAX's first device) in bytes: the allocator's limit
    on an accelerator, the machine's physical memory on the CPU; None when unknown."""
    import os
    import jax
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every platform reports
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 2 ** 30), ("MB", 2 ** 20), ("kB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def check_trace_memory(graph, limit: int | None = None) -> None:
    """Refuse, before allocating anything, a graph whose eligibility traces alone exceed the
    device's memory (``limit`` bytes, default :func:`device_memory_bytes`), naming the
    expected bytes of the largest traces and the ways to shrink them. A graph on a device
    mesh is checked per device (its arrays' shardings split them)."""
    if graph.mesh:
        return
    limit = device_memory_bytes() if limit is None else limit
    total = sum(t.nbytes for t in graph.traces)
    if limit is None or total <= limit:
        return
    from ..errors import UnsupportedModelError
    big = sorted(graph.traces, key=lambda t: -t.nbytes)[:3]
    what = "; ".join(
        f"{t.id} {t.dim}-dim{', layout=' + t.layout if t.layout else ''} over "
        f"{', '.join(graph.relation_by_id[r].param for r in t.relations)}: {_fmt_bytes(t.nbytes)}"
        for t in big)
    raise UnsupportedModelError(
        f"the eligibility traces need {_fmt_bytes(total)} ({what}), more than this device's "
        f"{_fmt_bytes(limit)}. Shrink them: io-dim traces (DiagIODimAlgorithm, or "
        f"DiagHybridDimAlgorithm with memory_budget_mb=...), bfloat16 storage "
        f"('layout-traces{{storage=bfloat16}}' in the pipeline halves float32 traces), a "
        f"smaller batch, or a device mesh (shard the batch)")


@dataclass(frozen=True)
class CompiledStep:
    """The emitted step.

    ``fn(theta_trace, theta_plain, args, hidden, others, traces) ->
    (outs, new_hidden, new_others, new_traces)`` is jitted and has a custom VJP whose
    backward returns online gradients for the parameters and the inputs. ``traces`` holds
    one array per :class:`~brainscale.ir.TraceArray` of ``graph`` (``binding.arrays``).
    ``program`` holds the pieces step-owning drivers reuse (linearizer, signals, rule plan).
    """
    graph: Any
    backend: str
    fn: Callable
    binding: Any
    program: Any = field(repr=False)
    notes: tuple = ()

    def __call__(self, *a, **k):
        return self.fn(*a, **k)

    def init_traces(self) -> tuple:
        """Zero trace arrays (the graph's arrays, in their storage dtypes)."""
        return self.binding.init_traces()

    @property
    def arrays(self) -> tuple:
        return self.binding.arrays

    def as_text(self) -> str:
        from ..ir.printer import print_graph
        lines = [print_graph(self.graph).rstrip(), f"// backend: {self.backend}"]
        lines += [f"//   {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


class Backend(abc.ABC):
    """A backend never changes the IR: backend-specific decisions are passes it adds to
    the pipeline (``pipeline()``), and ``emit`` reads only the graph."""
    name: ClassVar[str] = ""
    #: the emitted step runs on a device mesh (places its arrays as the IR's shardings say)
    supports_mesh: ClassVar[bool] = False

    def pipeline(self) -> tuple:
        """Passes appended to the compile pipeline (after ``layout-traces``)."""
        return ()

    def unsupported(self, graph) -> tuple:
        """``((trace id, reason), ...)`` of traces this backend runs on a fallback path."""
        return ()

    @abc.abstractmethod
    def emit(self, graph) -> CompiledStep:
        """Emit the step for ``graph`` (everything it needs is in the IR)."""
