"""``brainscale-opt``: compile a model from a Python file and inspect every stage.

The ``xdsl-opt`` / ``mlir-opt`` analogue for the etrace compiler::

    brainscale-opt examples/cli_model.py:make --decay 0.9 \\
        --pipeline "hidden-groups,relations,select-dims{policy=io},fuse-traces" \\
        --print-after select-dims --out dumps/ --svg --report --json report.json

``MODEL`` is ``path/to/file.py:factory`` (or ``package.module:factory``); the factory is
called without arguments and returns ``(model, example_inputs_tuple)`` or
``(model, example_input)``. The file is imported first, so passes it registers can be named
in ``--pipeline``; ``--load`` imports more such files or modules. The shipped example
passes (:mod:`brainscale.passes.examples`) are always available.

Without ``--print-after``/``--print-after-all``/``--report`` the final IR is printed. Exit
codes: 0 success, 1 the compiler rejected the model (message on stderr), 2 bad usage (a
missing file or factory, a bad pipeline spec, ...).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "load_factory", "UsageError"]

PROG = "brainscale-opt"
_DUMP_NAME = re.compile(r"^\d\d-[A-Za-z0-9_.\-]+\.(ir|dot|svg)$")


class UsageError(Exception):
    """A problem with the command line or the model file (exit code 2)."""


# -- loading -------------------------------------------------------------------------------
def _import_file(path: Path, what: str):
    if not path.exists():
        raise UsageError(f"{what} {str(path)!r} not found")
    if path.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a directory, not a Python file")
    # Import under the file's own name when free, so that ``--load my_passes.py`` and an
    # ``import my_passes`` in the model file share one module (registering passes once).
    mod_name = path.stem
    existing = sys.modules.get(mod_name)
    if existing is not None:
        if Path(getattr(existing, "__file__", "") or "").resolve() == path.resolve():
            return existing
        mod_name = "_brainscale_opt_" + re.sub(r"\W", "_", str(path.resolve()))
    elif not mod_name.isidentifier():
        mod_name = "_brainscale_opt_" + re.sub(r"\W", "_", str(path.resolve()))
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{what} {str(path)!r} cannot be imported (not a .py file?)")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    if folder not in sys.path:          # let the file import its siblings
        sys.path.insert(0, folder)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - report the user's error without our traceback
        sys.modules.pop(mod_name, None)
        raise UsageError(f"importing {what} {str(path)!r} failed: {_describe(e)}") from e
    return module


def _describe(e: BaseException) -> str:
    """``TypeError: message (at file.py:12 in fn)`` for an exception from user code."""
    import traceback
    where = ""
    frames = traceback.extract_tb(e.__traceback__) if e.__traceback__ else []
    if isinstance(e, SyntaxError) and e.filename:
        where = f" (at {Path(e.filename).name}:{e.lineno})"
    elif frames:
        f = frames[-1]
        where = f" (at {Path(f.filename).name}:{f.lineno} in {f.name})"
    return f"{type(e).__name__}: {e}{where}"


def _import(target: str, what: str):
    """Import ``target``: a path to a ``.py`` file or a dotted module name."""
    if target.endswith(".py") or os.sep in target or "/" in target:
        return _import_file(Path(target), what)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and target.startswith(e.name):
            raise UsageError(f"{what} {target!r} not found (neither a file nor an importable "
                             f"module)") from None
        raise


def load_factory(spec: str):
    """Call the factory named by ``FILE.py:factory`` and return ``(model, example_inputs)``.

    Raises:
        UsageError: bad spec, missing file or factory, or a factory returning something else.
    """
    if ":" not in spec or spec.endswith(":"):
        raise UsageError(f"MODEL must be 'path/to/file.py:factory' (or 'module:factory'), "
                         f"got {spec!r}")
    target, name = spec.rsplit(":", 1)
    if not target:
        raise UsageError(f"MODEL {spec!r} names no file before ':'")
    module = _import(target, "model file")
    factory = getattr(module, name, None)
    if factory is None:
        avail = sorted(k for k, v in vars(module).items()
                       if callable(v) and not k.startswith("_") and
                       getattr(v, "__module__", None) == module.__name__)
        raise UsageError(f"{target} has no factory {name!r}; callables defined there: "
                         f"{', '.join(avail) or '(none)'}")
    if not callable(factory):
        raise UsageError(f"{target}:{name} is a {type(factory).__name__}, not a callable factory")
    try:
        result = factory()
    except Exception as e:  # noqa: BLE001 - the factory is user code
        raise UsageError(f"factory {name}() raised {_describe(e)}") from e
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise UsageError(f"factory {name}() must return (model, example_inputs_tuple) or "
                         f"(model, example_input), got {type(result).__name__}"
                         + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
    model, inputs = result
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    return model, inputs


# -- dumping -------------------------------------------------------------------------------
class _StageDumper:
    """Instrument printing / writing every stage, ``lower`` included, as it is produced."""

    def __init__(self, args, settings, out: Path | None):
        self.print_all = args.print_after_all
        self.print_names = set(args.print_after or ())
        self.settings = settings
        self.locs = args.locs
        self.out = out
        self.svg = args.svg
        self.i = 0
        self.written: list[Path] = []

    # Instrument protocol (duck-typed: see brainscale.passes.base.Instrument)
    def before(self, graph, p):
        if self.i == 0:
            self.stage("lower", "lower", graph)

    def after(self, graph, p, seconds):
        if self.i == 0:   # pragma: no cover - before() always runs first
            self.stage("lower", "lower", graph)
        self.stage(p.name, p.spec(), graph)

    def stage(self, name: str, spec: str, graph):
        from .ir.dot import render, to_dot
        from .ir.printer import print_graph
        i = self.i
        self.i += 1
        if self.print_all or name in self.print_names or spec in self.print_names:
            print(f"// ----- after {spec} -----")
            print(print_graph(graph, self.settings), end="", flush=True)
        if self.out is not None:
            stem = f"{i:02d}-{name}"
            ir_path = self.out / f"{stem}.ir"
            ir_path.write_text(print_graph(graph, self.settings))
            text = to_dot(graph, self.settings, show_locs=self.locs)
            dot_path = self.out / f"{stem}.dot"
            dot_path.write_text(text)
            self.written += [ir_path, dot_path]
            if self.svg:
                svg = render(text, self.out / f"{stem}.svg")
                if svg is None:
                    self.svg = False   # render() already said how to fix it; say it once
                else:
                    self.written.append(svg)


def _prepare_out(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {str(path)!r} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():      # stale dumps of an earlier run; nothing else is touched
        if f.is_file() and _DUMP_NAME.match(f.name):
            f.unlink()


# -- arguments -----------------------------------------------------------------------------
def _decay(text: str):
    try:
        return int(text) if re.fullmatch(r"[0-9]+", text) else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a decay in (0, 1) or an integer rank, "
                                         f"got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Compile a brainstate model for online learning and dump the IR after "
                    "each pass (text, DOT, SVG), a compile report and its JSON.",
        epilog="example: brainscale-opt examples/cli_model.py:make --decay 0.9 --out dumps "
               "--svg --report")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="path/to/file.py:factory; factory() returns (model, example_inputs)")
    p.add_argument("--algorithm", choices=("io", "param", "hybrid"), default=None,
                   help="io = ES-D-RTRL, param = D-RTRL, hybrid = chosen per parameter "
                        "(default: the policy of the pipeline's select-dims, else hybrid)")
    p.add_argument("--decay", type=_decay, default=None, metavar="ALPHA",
                   help="decay of io-dim traces in (0, 1), or an integer rank "
                        "(needed when io-dim traces are chosen)")
    p.add_argument("--pipeline", "-p", default=None, metavar="SPEC",
                   help='passes after lower, e.g. "hidden-groups,relations,'
                        'select-dims{policy=io},fuse-traces" (default: the built-in pipeline)')
    p.add_argument("--print-after", action="append", metavar="PASS",
                   help="print the IR after PASS (a pass name or 'lower'; repeatable)")
    p.add_argument("--print-after-all", action="store_true", help="print the IR after every stage")
    p.add_argument("--out", metavar="DIR",
                   help="write NN-<pass>.ir and NN-<pass>.dot for every stage (00-lower first)")
    p.add_argument("--svg", action="store_true", help="with --out, also render NN-<pass>.svg")
    p.add_argument("--draw", action="append", metavar="FILE",
                   help="draw the final graph to FILE (.dot, .svg, .png, ...; repeatable)")
    p.add_argument("--report", action="store_true", help="print the compile report")
    p.add_argument("--json", metavar="FILE", help="write the compile report as JSON ('-': stdout)")
    p.add_argument("--locs", action="store_true", help="show source locations in IR and drawings")
    p.add_argument("--load", action="append", metavar="FILE_OR_MODULE",
                   help="import a file or module first (e.g. one registering custom passes)")
    p.add_argument("--list-passes", action="store_true",
                   help="list the registered passes and exit (no MODEL needed)")
    return p


def _list_passes() -> str:
    from .passes import PASS_REGISTRY
    lines = []
    for name in sorted(PASS_REGISTRY):
        cls = PASS_REGISTRY[name]
        doc = (cls.__doc__ or "").strip().splitlines()
        req = ",".join(sorted(getattr(cls, "requires", ()))) or "-"
        lines.append(f"{name:<22} requires={req:<22} {doc[0] if doc else ''}".rstrip())
    return "\n".join(lines)


def _err(msg: str, code: int) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``brainscale-opt`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # argparse already printed usage and the message
        return int(e.code or 0)

    from .errors import BrainscaleError, PipelineError
    from .ir.printer import PrintSettings
    from .passes import DEFAULT_PIPELINE, parse_pipeline
    from .passes import examples as _examples  # noqa: F401 - registers the example passes

    try:
        for target in args.load or ():
            _import(target, "--load")
        if args.list_passes:
            print(_list_passes())
            return 0
        if not args.model:
            raise UsageError("MODEL is required (path/to/file.py:factory)")
        if args.svg and not args.out:
            raise UsageError("--svg needs --out DIR")
        model, inputs = load_factory(args.model)
        try:
            passes = parse_pipeline(args.pipeline if args.pipeline is not None
                                    else DEFAULT_PIPELINE)
        except PipelineError as e:
            raise UsageError(f"bad --pipeline: {e}") from None
        names = {"lower", "layout-traces"} | {p.name for p in passes} | {p.spec() for p in passes}
        for n in args.print_after or ():
            if n not in names:
                raise UsageError(f"--print-after {n!r} names no stage of the pipeline; stages: "
                                 f"lower, {', '.join(p.spec() for p in passes)}")
        out = Path(args.out) if args.out else None
        if out is not None:
            _prepare_out(out)
    except UsageError as e:
        return _err(str(e), 2)

    settings = PrintSettings(print_locs=args.locs)
    dumper = _StageDumper(args, settings, out)
    import brainscale
    try:
        compiled = brainscale.compile(model, *inputs, algorithm=args.algorithm,
                                      decay_or_rank=args.decay,
                                      pipeline=passes if args.pipeline is not None else None,
                                      instruments=[dumper])
    except PipelineError as e:
        msg = str(e)
        if "no decay alpha" in msg:
            msg = msg.replace("pass decay_or_rank=...", "pass decay_or_rank=... (--decay ALPHA)")
        return _err(msg, 2)
    except BrainscaleError as e:
        msg = str(e)
        if "decay_or_rank" in msg:
            msg += "\n(on the command line: --decay ALPHA)"
        return _err(msg, 1)
    except (TypeError, ValueError) as e:
        if "decay_or_rank" in str(e):
            return _err(f"{e} (use --decay ALPHA)", 2)
        raise
    if dumper.i == 0:      # an empty pipeline: no pass ran, so dump 'lower' now
        dumper.stage("lower", "lower", compiled.stages[0][1])

    from .report import compile_report, report_dict
    from .ir.dot import render, to_dot
    for target in args.draw or ():
        path = render(to_dot(compiled.graph, settings, show_locs=args.locs), target)
        if path is not None:
            print(f"{PROG}: wrote {path}", file=sys.stderr)
    if args.report:
        print(compile_report(compiled), end="")
    if args.json:
        text = json.dumps(report_dict(compiled), indent=2) + "\n"
        if args.json == "-":
            print(text, end="")
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text)
    if out is not None:
        print(f"{PROG}: wrote {len(dumper.written)} file(s) to {out}", file=sys.stderr)
    if not (args.print_after or args.print_after_all or args.report or args.json == "-"):
        from .ir.printer import print_graph
        print(print_graph(compiled.graph, settings), end="")
    return 0


if __name__ == "__main__":   # pragma: no cover
    sys.exit(main())
