"""``Compiled``: what ``brainscale.compile`` returns (and ``learner.compiled()``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import BrainscaleError

__all__ = ["Compiled"]


@dataclass
class Compiled:
    """The final IR, every stage, the pass records and the runnable learner.

    Attributes:
        graph: the final :class:`~brainscale.ir.Graph` (what the step runs).
        stages: ``[(stage spec, Graph), ...]`` from ``lower`` on.
        records: one :class:`~brainscale.passes.PassRecord` per stage (name, spec, seconds,
            notes).
        learner: the compiled algorithm object (call it to run a step).
        compile_seconds: lower + passes + backend.
    """
    graph: Any
    stages: list
    records: tuple
    learner: Any
    compile_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def log(self) -> list:
        """``[(pass name, message), ...]``: every stage's notes, then its time."""
        out = [(r.name, n) for r in self.records for n in r.notes]
        out += [(r.spec, f"{r.seconds * 1e3:.2f} ms") for r in self.records if r.name != "lower"]
        return out

    @property
    def step(self):
        return self.learner._step

    def ir(self, stage: str | None = None, **settings) -> str:
        """Text IR of the final graph, or of the stage whose spec starts with ``stage``."""
        from .ir.printer import PrintSettings, print_graph
        g = self.graph
        if stage is not None:
            found = [gr for name, gr in self.stages if name.split("{")[0] == stage]
            if not found:
                raise BrainscaleError(f"no stage {stage!r}; stages: "
                                      f"{', '.join(n for n, _ in self.stages)}")
            g = found[-1]
        return print_graph(g, PrintSettings(**settings))

    def to_dot(self, **kw) -> str:
        from .ir.dot import to_dot
        return to_dot(self.graph, **kw)

    def render(self, path, **kw):
        from .ir.dot import render, to_dot
        return render(to_dot(self.graph, **kw), path)

    def report(self) -> str:
        from .report import compile_report
        return compile_report(self)

    def __call__(self, *a, **k):
        return self.learner(*a, **k)
