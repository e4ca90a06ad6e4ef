"""Pass interface, registry, pipeline specs, instruments and the PassManager.

Contract of a pass (after xDSL's ModulePass): it is a pure function ``Graph -> Graph``; its
input verifies and its output must verify; it never mutates its input (nodes are frozen).
Each pass declares the facts it ``requires`` and ``provides``; the manager checks the order
before running anything, verifies the IR after each pass, and wraps failures with the pass
name and the passes that ran before it.
"""
from __future__ import annotations

import abc
import dataclasses
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

from ..errors import BrainscaleError, PassError, PipelineError
from ..ir import Graph, verify
from ..ir.printer import print_graph

__all__ = ["Pass", "FunctionPass", "PassContext", "PassRecord", "PassManager",
           "register_pass", "function_pass", "PASS_REGISTRY", "parse_pipeline", "Instrument",
           "PrintAfterAll", "PrintAfter", "DumpDir", "Timing", "Recorder"]

#: name -> Pass class (filled by @register_pass and @function_pass)
PASS_REGISTRY: dict[str, type] = {}


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: its name, the spec it ran with, its time and its notes."""
    name: str
    spec: str
    seconds: float
    notes: tuple[str, ...] = ()


@dataclass
class PassContext:
    """The log of one compilation: a :class:`PassRecord` per pass that ran.

    Passes add notes with :meth:`note`; the :class:`PassManager` turns them into the
    running pass's record. Everything a pass decides goes into the IR, not here.
    """
    records: list = field(default_factory=list)     # PassRecord, in the order passes ran
    _pending: list = field(default_factory=list, repr=False)

    def note(self, pass_name: str, msg: str):
        """Record a note of the running pass (shown in the compile log and the report)."""
        self._pending.append((pass_name, str(msg)))

    @property
    def log(self) -> list:
        """``[(pass name, note), ...]`` over all records."""
        return [(r.name, n) for r in self.records for n in r.notes]


@dataclass(frozen=True)
class Pass(abc.ABC):
    """A named, pure transformation ``Graph -> Graph``.

    Subclasses set ``name`` (kebab-case, unique), ``requires``/``provides`` (facts), and
    implement :meth:`run`. Options are dataclass fields and print as ``name{opt=value}``.
    """
    name: ClassVar[str] = ""
    requires: ClassVar[frozenset] = frozenset()
    provides: ClassVar[frozenset] = frozenset()

    @abc.abstractmethod
    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        """Return the transformed graph."""

    def spec(self) -> str:
        opts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                opts.append(f"{f.name}={_spec_val(v)}")
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def _spec_val(v) -> str:
    if isinstance(v, (tuple, list)):
        return "[" + ";".join(str(x) for x in v) + "]"
    return str(v)


def register_pass(cls: type) -> type:
    """Class decorator: register a :class:`Pass` subclass under its ``name``."""
    if not getattr(cls, "name", ""):
        raise PipelineError(f"pass class {cls.__name__} has no name")
    if cls.name in PASS_REGISTRY and PASS_REGISTRY[cls.name] is not cls:
        raise PipelineError(f"a pass named {cls.name!r} is already registered "
                            f"({PASS_REGISTRY[cls.name].__name__})")
    PASS_REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class FunctionPass(Pass):
    """A pass made from a plain function ``f(graph, ctx) -> Graph`` (see :func:`function_pass`)."""
    fn: Callable = field(default=None, compare=False)

    def run(self, graph, ctx):
        return self.fn(graph, ctx)

    def spec(self) -> str:
        return self.name


def function_pass(name: str, requires: Iterable[str] = (), provides: Iterable[str] = (),
                  register: bool = True):
    """Decorator turning ``def f(graph, ctx) -> Graph`` into a registered pass class.

    Example::

        @brainscale.function_pass("drop-frozen", requires={"trace-dims"})
        def drop_frozen(graph, ctx):
            return graph
        pipeline = [*brainscale.DEFAULT_PIPELINE, "drop-frozen"]
    """
    def deco(fn):
        cls = type(f"FunctionPass_{re.sub(r'[^0-9a-zA-Z]', '_', name)}", (FunctionPass,), {
            "name": name, "requires": frozenset(requires), "provides": frozenset(provides),
            "__doc__": fn.__doc__, "__annotations__": {},
        })
        cls = dataclass(frozen=True)(cls)
        orig_init = cls.__init__

        def __init__(self, fn_=fn):
            orig_init(self, fn_)
        cls.__init__ = __init__
        if register:
            register_pass(cls)
        cls.fn_impl = staticmethod(fn)
        return cls
    return deco


def _parse_opt(v: str):
    v = v.strip()
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v.lower() == "none":
        return None
    if v.startswith("[") and v.endswith("]"):
        return tuple(x.strip() for x in v[1:-1].split(";") if x.strip())
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def parse_pipeline(spec: str | Iterable[Any]) -> tuple[Pass, ...]:
    """Parse ``"hidden-groups,relations,select-dims{policy=io}"`` (or a list of names,
    ``Pass`` instances or classes) into pass instances."""
    if isinstance(spec, str):
        items, depth, cur = [], 0, ""
        for ch in spec:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                items.append(cur)
                cur = ""
            else:
                cur += ch
        if cur.strip():
            items.append(cur)
        spec = [s.strip() for s in items if s.strip()]
    out = []
    for item in spec:
        if isinstance(item, Pass):
            out.append(item)
            continue
        if isinstance(item, type) and issubclass(item, Pass):
            out.append(item())
            continue
        if not isinstance(item, str):
            raise PipelineError(f"pipeline entries must be pass names, Pass instances or classes; "
                                f"got {item!r}")
        m = re.fullmatch(r"([A-Za-z0-9_\-.]+)(\{(.*)\})?", item)
        if not m:
            raise PipelineError(f"cannot parse pipeline entry {item!r}")
        pname, opts = m.group(1), m.group(3)
        cls = PASS_REGISTRY.get(pname)
        if cls is None:
            raise PipelineError(f"unknown pass {pname!r}; registered passes: "
                                f"{', '.join(sorted(PASS_REGISTRY))}")
        kw = {}
        if opts:
            for kv in opts.split(","):
                if not kv.strip():
                    continue
                if "=" not in kv:
                    raise PipelineError(f"option {kv!r} of pass {pname!r} must be key=value")
                k, v = kv.split("=", 1)
                kw[k.strip()] = _parse_opt(v)
        try:
            out.append(cls(**kw))
        except TypeError as e:
            raise PipelineError(f"bad options for pass {pname!r}: {e}") from None
    return tuple(out)


# -- instruments ----------------------------------------------------------------------------
class Instrument:
    """Hook called around every pass (TVM PassInstrument)."""

    def before(self, graph: Graph, p: Pass) -> None:  # noqa: D401
        pass

    def after(self, graph: Graph, p: Pass, seconds: float) -> None:
        pass


class PrintAfterAll(Instrument):
    def __init__(self, file=None):
        self.file = file

    def after(self, graph, p, seconds):
        print(f"// ----- after {p.spec()} -----\n" + print_graph(graph), file=self.file)


class PrintAfter(Instrument):
    def __init__(self, names: Iterable[str], file=None):
        self.names = set(names)
        self.file = file

    def after(self, graph, p, seconds):
        if p.name in self.names:
            print(f"// ----- after {p.spec()} -----\n" + print_graph(graph), file=self.file)


class Recorder(Instrument):
    """Keeps every stage's graph and the time each pass took."""

    def __init__(self):
        self.stages: list[tuple[str, Graph]] = []
        self.times: list[tuple[str, float]] = []

    def after(self, graph, p, seconds):
        self.stages.append((p.spec(), graph))
        self.times.append((p.spec(), seconds))


class Timing(Recorder):
    """Recorder whose ``report()`` lists time per pass."""

    def report(self) -> str:
        return "\n".join(f"{name:<32} {sec * 1e3:8.2f} ms" for name, sec in self.times)


class DumpDir(Instrument):
    """Writes ``{i:02d}-{stage}.ir`` (and ``.dot``, optionally ``.svg``) for the input graph
    (``00-lower`` after the frontend) and after each pass into ``path``.

    Only files named ``NN-<stage>.ir|dot|svg`` are ever written; nothing else in the folder is
    touched.
    """

    def __init__(self, path: str | os.PathLike, dot: bool = True, svg: bool = False):
        self.path = Path(path)
        self.dot = dot
        self.svg = svg
        self.i = 0

    def _write(self, graph, stage: str):
        self.path.mkdir(parents=True, exist_ok=True)
        stem = f"{self.i:02d}-{stage.split('{')[0]}"
        self.i += 1
        (self.path / f"{stem}.ir").write_text(print_graph(graph))
        if self.dot:
            from ..ir.dot import render, to_dot
            text = to_dot(graph)
            (self.path / f"{stem}.dot").write_text(text)
            if self.svg:
                render(text, self.path / f"{stem}.svg")

    def before(self, graph, p):
        if self.i == 0:
            self._write(graph, graph.stages[-1] if graph.stages else "input")

    def after(self, graph, p, seconds):
        self._write(graph, p.name)


# -- the manager ----------------------------------------------------------------------------
def _verify_default() -> bool:
    return os.environ.get("BRAINSCALE_VERIFY", "1") not in ("0", "false", "")


@dataclass(frozen=True)
class PassManager:
    """Runs a pipeline: static order check, then per pass run → verify → stage → instruments.

    ``passes`` may be a spec string or a list of names / Pass instances / classes; it is
    parsed once into Pass instances.
    """
    passes: tuple = ()
    verify: bool | None = None
    instruments: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "passes", parse_pipeline(self.passes))
        object.__setattr__(self, "instruments", tuple(self.instruments))

    def check_order(self, facts: frozenset) -> None:
        have = set(facts)
        for p in self.passes:
            missing = set(p.requires) - have
            if missing:
                providers = {f: [n for n, c in PASS_REGISTRY.items() if f in getattr(c, "provides", ())]
                             for f in missing}
                hint = "; ".join(f"add {' or '.join(repr(x) for x in v) or 'a pass providing it'} "
                                 f"before it" for v in providers.values())
                raise PipelineError(f"pass {p.name!r} requires {sorted(missing)}, which no earlier "
                                    f"pass provides; {hint}")
            have |= set(p.provides)

    def run(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        self.check_order(graph.facts)
        do_verify = _verify_default() if self.verify is None else self.verify
        done = list(graph.stages)
        for p in self.passes:
            for ins in self.instruments:
                ins.before(graph, p)
            ctx._pending.clear()
            t0 = time.perf_counter()
            try:
                new = p.run(graph, ctx)
                if not isinstance(new, Graph):
                    raise PassError(f"pass {p.name!r} returned {type(new).__name__}, not a Graph")
                if new.info is None and graph.info is not None:
                    new = dataclasses.replace(new, info=graph.info)
                if do_verify:
                    verify(new)
            except BrainscaleError as e:
                if isinstance(e, PassError) and str(e).startswith("pass "):
                    raise
                if isinstance(e, PassError) or type(e).__name__ == "IRVerificationError":
                    raise PassError(f"pass {p.name!r} failed (ran before it: "
                                    f"{', '.join(done) or 'nothing'}): {e}") from e
                raise type(e)(f"{e}\nwhile running pass {p.name!r} (ran before it: "
                              f"{', '.join(done) or 'nothing'})") from e
            except Exception as e:  # noqa: BLE001 - wrap anything a user pass raises
                raise PassError(f"pass {p.name!r} failed (ran before it: "
                                f"{', '.join(done) or 'nothing'}): {type(e).__name__}: {e}") from e
            dt = time.perf_counter() - t0
            notes = tuple(m for _, m in ctx._pending)
            ctx._pending.clear()
            ctx.records.append(PassRecord(p.name, p.spec(), dt, notes))
            new = new.with_stage(p.spec(), frozenset(p.provides))
            graph = new
            done.append(p.spec())
            for ins in self.instruments:
                ins.after(graph, p, dt)
        return graph
