"""Backend interface: turn a fully compiled Graph into a runnable step."""
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


@dataclass
class CompiledStep:
    """The emitted step.

    ``fn(theta_trace, theta_plain, args, hidden, others, traces) ->
    (outs, new_hidden, new_others, new_traces)`` is jitted and has a custom VJP whose
    backward returns online gradients for the parameters and the inputs.
    """
    graph: Any
    backend: str
    fn: Callable
    init_traces: Callable            # () -> list of zero trace arrays
    trace_names: tuple               # one name per trace array (for etrace_xs / etrace_dfs)
    layout: Any = None               # backend-specific description of the arrays
    notes: tuple = field(default_factory=tuple)
    emitter: Any = None              # the object that emitted ``fn`` (step-owning drivers)

    def __call__(self, *a, **k):
        return self.fn(*a, **k)

    def as_text(self) -> str:
        from ..ir.printer import print_graph
        lines = [print_graph(self.graph).rstrip(), f"// backend: {self.backend}"]
        lines += [f"//   {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


class Backend(abc.ABC):
    """A backend never changes the IR; backend-specific rewrites are passes (``pipeline``)."""
    name: ClassVar[str] = ""

    def pipeline(self) -> tuple:
        return ()

    def unsupported(self, graph) -> tuple:
        return ()

    @abc.abstractmethod
    def emit(self, graph, decay: float | None = None) -> CompiledStep:
        """Emit the step for ``graph`` (``decay`` = α of io-dim traces)."""
