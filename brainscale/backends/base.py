"""Backend interface: turn a fully compiled Graph into a runnable, immutable step."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ..errors import BackendError

__all__ = ["Backend", "CompiledStep", "BACKENDS", "register_backend", "get_backend"]

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

    def pipeline(self) -> tuple:
        """Passes appended to the compile pipeline (after ``layout-traces``)."""
        return ()

    def unsupported(self, graph) -> tuple:
        """``((trace id, reason), ...)`` of traces this backend runs on a fallback path."""
        return ()

    @abc.abstractmethod
    def emit(self, graph) -> CompiledStep:
        """Emit the step for ``graph`` (everything it needs is in the IR)."""
