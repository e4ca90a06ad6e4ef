"""DOT (Graphviz) drawing of the etrace IR, written by hand so it is deterministic.

:func:`to_dot` turns a :class:`~brainscale.ir.Graph` into DOT text with no dependency at
all, so drawings can be golden-tested like the text dumps (after torch.fx's
``FxGraphDrawer``, minus pydot). :func:`render` turns that text into SVG/PNG with whichever
``dot`` program is available and says clearly what to install when none is.

What is drawn (colours are fixed per node kind, see ``_COLOR_MAP``):

* each hidden group is a ``subgraph cluster_G0`` labelled ``G0 varshape=[16,64] n=3``
  holding its hidden states (light-blue ellipses); ungrouped states stand alone;
* parameters are boxes: salmon for trace (``etrace``) parameters, a lighter colour for
  plain ones; inputs are light boxes with a slanted side; values are plain ellipses;
* an op application ``%y0 = dense`` is a rounded box with its output type; solid edges
  bring its input value and its parameter;
* a relation ``R0`` is a blue edge from the op to the cluster of each group it reaches;
* a trace is a ``shape=note`` node (id, dim, layout, bytes, reason) joined to its
  parameters by dashed edges;
* a legend cluster explains the shapes.

Node IDs are the IR names, quoted (``"neu.V"``, ``"T0"``; SSA names without their ``%``,
``"y0"``, because Graphviz reserves ``%``-names for anonymous nodes); labels show the full
IR names and escape ``{}<>|"\\``. Source locations appear only with ``show_locs=True`` (or
``PrintSettings(print_locs=True)``) and are shortened to the last two path parts.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from .._fmt import human_bytes
from .printer import PrintSettings, _fmt_val, array_body, trace_fields
from .types import TreeType

__all__ = ["to_dot", "render", "find_renderer", "human_bytes", "RENDER_HINT"]

#: fill colour (and shape) per node kind; fixed so drawings are stable
_COLOR_MAP = {
    "input": "aliceblue",
    "hidden": "lightblue",
    "param": "salmon",           # trace (etrace) parameter: fx's weight colour
    "plain-param": "mistyrose",  # plain parameter: instantaneous gradient only
    "value": "white",
    "op": "lemonchiffon",
    "group": "#eef6fb",
    "trace-io": "#d9f2d9",
    "trace-param": "#fde3c8",
    "trace-none": "#eeeeee",
    "relation": "#1f5fbf",
}

_FONT = "Helvetica"
_ROUNDED = '"rounded,filled"'

#: what to do when no renderer is installed
RENDER_HINT = ("install Graphviz (https://graphviz.org/download/, then `dot -Tsvg {dot} -o {out}`) "
               "or `pip install graphviz-pure` (then `graphviz-pure -Tsvg {dot} -o {out}`)")

# defaults not worth repeating on every parameter node
_DEFAULT_PARAM_ATTRS = {("grad", "adaptive"), ("is_etrace", True)}
# trace attrs that get their own line (the rest are listed as k=v)
_TRACE_OWN_ATTRS = ("bytes", "reason", "layout", "alpha")


# -- text helpers ---------------------------------------------------------------------------
def _esc(text: str) -> str:
    """Escape one label line: backslash and quote for DOT, ``{}<>|`` for record shapes."""
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return re.sub(r"([{}<>|])", r"\\\1", text)


def _label(lines, left: bool = False) -> str:
    """Join escaped lines with DOT line breaks (``\\l`` left-justifies)."""
    lines = [_esc(ln) for ln in lines if ln is not None]
    if left:
        return '"' + "".join(ln + "\\l" for ln in lines) + '"'
    return '"' + "\\n".join(lines) + '"'


def _id(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _node_ids(graph) -> dict[str, str]:
    """DOT node name per IR name: the IR name itself, except that SSA names lose their
    leading ``%`` (Graphviz reserves ``%``-names for anonymous nodes and would print them as
    ``%1``, ``%2`` in SVG titles). Clashes, which only a state named like an SSA value or a
    trace id could cause, get a kind prefix (``value:x0``, ``trace:T0``)."""
    ids: dict[str, str] = {}
    taken: set[str] = set()
    for items in (graph.inputs, graph.hidden, graph.params):
        for it in items:
            ids[it.name] = it.name
            taken.add(it.name)
    taken |= {f"cluster_{g.id}" for g in graph.groups}

    def claim(key: str, cand: str, kind: str):
        if cand in taken or cand.startswith("%"):
            cand = f"{kind}:{cand.lstrip('%')}"
        ids[key] = cand
        taken.add(cand)
    for v in graph.values:
        claim(v.name, v.name[1:] if v.name.startswith("%") else v.name, "value")
    for o in graph.ops:
        claim(o.name, o.name[1:] if o.name.startswith("%") else o.name, "op")
    for r in graph.relations:
        claim(r.id, r.id, "relation")
    for t in graph.traces:
        claim(t.id, t.id, "trace")
    return ids


def _attrs(**kw) -> str:
    """``[k=v, ...]`` in the given order; values are used verbatim (already quoted)."""
    return "[" + ", ".join(f"{k}={v}" for k, v in kw.items() if v is not None) + "]"


def _short_loc(loc) -> str | None:
    """``loc`` text shortened to the last two path parts (fx ``_shorten_file_name``)."""
    if loc is None:
        return None
    text = getattr(loc, "text", str(loc))
    m = re.match(r"^(.*?)(:\d+.*)$", text)
    path, rest = (m.group(1), m.group(2)) if m else (text, "")
    parts = path.replace("\\", "/").split("/")
    return "at " + "/".join(parts[-2:]) + rest


def _type_lines(t) -> list[str]:
    if isinstance(t, TreeType):
        return [f"{k}: {leaf}" for k, leaf in t.fields]
    return [str(t)]


def _trace_layout(t) -> str:
    if t.dim == "param":
        return str(t.layout)
    if t.dim == "io":
        return "eps_x + eps_f"
    return "-"


# -- the drawing ---------------------------------------------------------------------------
def to_dot(graph, settings: PrintSettings = PrintSettings(), show_locs: bool = False,
           legend: bool = True) -> str:
    """Draw ``graph`` as DOT text. Equal graphs always give identical text.

    Args:
        graph: a :class:`~brainscale.ir.Graph` (any stage).
        settings: the text printer's settings; ``print_types`` adds types to labels,
            ``print_attrs`` adds attributes (trace reasons, op classes), ``print_locs``
            acts like ``show_locs``.
        show_locs: add the user's source location (``at file.py:41 (fn)``) to op and value
            labels, shortened to the last two path parts.
        legend: add a legend cluster explaining node shapes and colours.

    Returns:
        The DOT source, ending with a newline.
    """
    s = settings
    locs = show_locs or s.print_locs
    ids = _node_ids(graph)

    def n(name: str) -> str:
        return _id(ids.get(name, name))
    out: list[str] = []
    emit = out.append

    title = [f"{graph.name}", "stages: " + (", ".join(graph.stages) if graph.stages else "(none)")]
    emit(f"// brainscale-ir v1  graph={graph.name}")
    emit("// stages: " + (", ".join(graph.stages) if graph.stages else "(none)"))
    emit(f"digraph {_id(graph.name)} {{")
    emit(f"  graph {_attrs(compound='true', rankdir='TB', newrank='true', labelloc='t', labeljust='l', fontname=_id(_FONT), fontsize='12', nodesep='0.35', ranksep='0.5', label=_label(title, left=True))};")
    emit(f"  node {_attrs(fontname=_id(_FONT), fontsize='11')};")
    emit(f"  edge {_attrs(fontname=_id(_FONT), fontsize='10')};")

    # -- inputs ---------------------------------------------------------------------------
    for i in graph.inputs:
        lines = [f"%{i.name}"] + (_type_lines(i.type) if s.print_types else [])
        emit(f"  {n(i.name)} {_attrs(shape='parallelogram', style='filled', fillcolor=_COLOR_MAP['input'], label=_label(lines))};")

    # -- hidden states, grouped in clusters -------------------------------------------------
    def hidden_node(h, indent):
        lines = [f"%{h.name}"] + (_type_lines(h.type) if s.print_types else [])
        emit(f"{indent}{n(h.name)} {_attrs(shape='ellipse', style='filled', fillcolor=_COLOR_MAP['hidden'], label=_label(lines))};")

    grouped = {st for g in graph.groups for st in g.states}
    for g in graph.groups:
        head = f"{g.id} varshape=[{','.join(map(str, g.varshape))}] n={g.num_state}"
        lines = [head] + ([f"output={g.output}"] if g.output else [])
        if s.print_attrs and g.attrs:
            lines.append(", ".join(f"{k}={_fmt_val(v)}" for k, v in g.attrs))
        emit(f"  subgraph {_id('cluster_' + g.id)} {{")
        emit(f"    graph {_attrs(label=_label(lines), style=_ROUNDED, fillcolor=_id(_COLOR_MAP['group']), color='gray50')};")
        for name in g.states:
            h = graph.hidden_by_name.get(name)
            if h is not None:
                hidden_node(h, "    ")
        emit("  }")
    for h in graph.hidden:
        if h.name not in grouped:
            hidden_node(h, "  ")

    # -- params ---------------------------------------------------------------------------
    for p in graph.params:
        lines = [f"%{p.name}"] + (_type_lines(p.type) if s.print_types else [])
        if p.kind == "plain":
            lines.append("plain")
        if s.print_attrs:
            extra = [(k, v) for k, v in p.attrs if (k, v) not in _DEFAULT_PARAM_ATTRS]
            if extra:
                lines.append(", ".join(f"{k}={_fmt_val(v)}" for k, v in extra))
        color = _COLOR_MAP["param" if p.kind == "etrace" else "plain-param"]
        emit(f"  {n(p.name)} {_attrs(shape='box', style='filled', fillcolor=color, label=_label(lines))};")

    # -- values and ops ---------------------------------------------------------------------
    for v in graph.values:
        lines = [f"{v.name} = value"] + ([str(v.type)] if s.print_types else [])
        if locs:
            lines.append(_short_loc(v.loc))
        emit(f"  {n(v.name)} {_attrs(shape='ellipse', label=_label(lines))};")
    for o in graph.ops:
        lines = [f"{o.name} = {o.kind}"] + ([str(o.type)] if s.print_types else [])
        if s.print_attrs:
            lines.append(o.op_class)
        if locs:
            lines.append(_short_loc(o.loc))
        emit(f"  {n(o.name)} {_attrs(shape='box', style=_ROUNDED, fillcolor=_COLOR_MAP['op'], label=_label(lines))};")

    # -- traces -----------------------------------------------------------------------------
    rel_by_id = graph.relation_by_id
    for t in graph.traces:
        lines = [f"{t.id} = {t.dim}({', '.join(t.relations)})",
                 f"dim={t.dim}  layout={_trace_layout(t)}"
                 + (f"  alpha={_fmt_val(float(t.decay))}" if t.decay is not None else ""),
                 f"bytes={human_bytes(t.nbytes)}"]
        if s.print_types:
            for a in t.arrays:
                st = ((f" as {a.stored_type} (pair)" if a.packed else f" as {a.storage}")
                      if a.storage != a.type.dtype else "")
                lines.append(f"{a.id} {array_body(graph, a)}: {a.type}{st}")
        if s.print_attrs:
            for k, v in trace_fields(t):
                if k not in _TRACE_OWN_ATTRS:
                    lines.append(f"{k}={_fmt_val(v)}")
            reason = t.attr("reason")
            if reason:
                wrapped = textwrap.wrap(f"reason: {reason}", width=44, subsequent_indent="  ")
                lines.extend(wrapped)
        color = _COLOR_MAP.get(f"trace-{t.dim}", "white")
        emit(f"  {n(t.id)} {_attrs(shape='note', style='filled', fillcolor=_id(color), label=_label(lines, left=True))};")

    # -- edges ------------------------------------------------------------------------------
    for v in graph.values:
        for d in v.deps:
            src = d[1:] if d.startswith("%") and d[1:] in graph.hidden_by_name else d
            emit(f"  {n(src)} -> {n(v.name)} {_attrs(color='gray45')};")
    for o in graph.ops:
        if o.x is not None:
            emit(f"  {n(o.x)} -> {n(o.name)};")
        emit(f"  {n(o.param)} -> {n(o.name)};")
    for r in graph.relations:
        text = r.id + (" +direct" if r.direct else "")
        rc = _id(_COLOR_MAP["relation"])
        if not r.groups:
            emit(f"  {n(r.id)} {_attrs(shape='plaintext', fontcolor=rc, label=_label([f'{r.id}: no hidden state']))};")
            emit(f"  {n(r.op)} -> {n(r.id)} {_attrs(color=rc, style='dotted')};")
        for gid in r.groups:
            g = graph.group_by_id.get(gid)
            if g is None or not g.states:
                continue
            emit(f"  {n(r.op)} -> {n(g.states[0])} {_attrs(lhead=_id('cluster_' + gid), color=rc, fontcolor=rc, penwidth='1.5', label=_label([text]))};")
    for t in graph.traces:
        seen: list[str] = []
        for rid in t.relations:
            r = rel_by_id.get(rid)
            if r is not None and r.param not in seen:
                seen.append(r.param)
        for pname in seen:
            emit(f"  {n(pname)} -> {n(t.id)} {_attrs(style='dashed', arrowhead='none', color='gray40')};")

    if legend:
        _legend(emit)
    emit("}")
    return "\n".join(out) + "\n"


def _legend(emit) -> None:
    items = [
        ("input", dict(shape="parallelogram", style="filled", fillcolor=_COLOR_MAP["input"]), "input"),
        ("hidden", dict(shape="ellipse", style="filled", fillcolor=_COLOR_MAP["hidden"]), "hidden state"),
        ("param", dict(shape="box", style="filled", fillcolor=_COLOR_MAP["param"]), "trace param"),
        ("plain", dict(shape="box", style="filled", fillcolor=_COLOR_MAP["plain-param"]), "plain param"),
        ("value", dict(shape="ellipse"), "value"),
        ("op", dict(shape="box", style=_ROUNDED, fillcolor=_COLOR_MAP["op"]), "op application"),
        ("trace_io", dict(shape="note", style="filled", fillcolor=_id(_COLOR_MAP["trace-io"])), "io-dim trace"),
        ("trace_param", dict(shape="note", style="filled", fillcolor=_id(_COLOR_MAP["trace-param"])), "param-dim trace"),
        ("trace_none", dict(shape="note", style="filled", fillcolor=_id(_COLOR_MAP["trace-none"])), "no trace (dim=none)"),
    ]
    emit(f"  subgraph {_id('cluster_legend')} {{")
    emit(f"    graph {_attrs(label=_label(['legend  (blue edge: relation op -> hidden group)']), style='dashed', color='gray60')};")
    names = []
    for key, style, text in items:
        nid = _id(f"__legend_{key}")
        names.append(nid)
        emit(f"    {nid} {_attrs(**style, fontsize='10', label=_label([text]))};")
    # two rows (nodes, then traces) keep the legend narrow
    rows = (names[:6], names[6:])
    for row in rows:
        emit("    { rank=same; " + "; ".join(row) + "; }")
    emit(f"    {rows[0][0]} -> {rows[1][0]} [style=invis];")
    emit("  }")


# -- rendering -----------------------------------------------------------------------------
def _graphviz_pure() -> str | None:
    exe = shutil.which("graphviz-pure")
    if exe:
        return exe
    cand = Path(sys.executable).parent / ("graphviz-pure.exe" if os.name == "nt" else "graphviz-pure")
    return str(cand) if cand.exists() else None


def _run(cmd: list[str], dot_text: str, fmt: str) -> bytes:
    from ..errors import BrainscaleError
    proc = subprocess.run(cmd + [f"-T{fmt}"], input=dot_text.encode(), capture_output=True,
                          timeout=120)
    if proc.returncode != 0 or not proc.stdout:
        raise BrainscaleError(f"{Path(cmd[0]).name} -T{fmt} failed (exit {proc.returncode}): "
                              f"{proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def find_renderer() -> tuple[str, object] | None:
    """The first available DOT renderer as ``(name, fn(dot_text, fmt) -> bytes)``, or None.

    Order: the ``graphviz`` Python package with the system ``dot`` (or ``dot`` alone), then
    the ``graphviz-pure`` binary (on ``PATH`` or next to the running Python).
    ``BRAINSCALE_DOT_RENDERER=dot|graphviz-pure|none`` forces a choice.
    """
    force = os.environ.get("BRAINSCALE_DOT_RENDERER", "").strip().lower()
    if force == "none":
        return None
    dot = shutil.which("dot")
    if dot and force in ("", "dot", "graphviz"):
        try:
            import graphviz  # noqa: F401

            def via_package(text, fmt):
                import graphviz
                return graphviz.Source(text).pipe(format=fmt)
            return "graphviz", via_package
        except ImportError:
            return "dot", lambda text, fmt: _run([dot], text, fmt)
    pure = _graphviz_pure()
    if pure and force in ("", "graphviz-pure"):
        return "graphviz-pure", lambda text, fmt: _run([pure], text, fmt)
    return None


def render(dot_text: str, path: str | os.PathLike, fmt: str | None = None) -> Path | None:
    """Render DOT text to ``path`` (SVG, PNG, PDF, ... from the suffix or ``fmt``).

    Args:
        dot_text: DOT source, e.g. from :func:`to_dot`.
        path: output file; its suffix picks the format unless ``fmt`` is given. A ``.dot``
            path just writes the text.
        fmt: a Graphviz output format (``svg``, ``png``, ``pdf``, ...).

    Returns:
        The written path, or ``None`` when no renderer is installed. In that case the DOT
        text is written next to ``path`` (``.dot`` suffix) and a message saying how to
        render it is printed to stderr.

    Raises:
        BrainscaleError: the renderer exists but failed (its error message is included).
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".") or "svg").lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("dot", "gv"):
        path.write_text(dot_text)
        return path
    found = find_renderer()
    if found is None:
        dot_path = path.with_suffix(".dot")
        dot_path.write_text(dot_text)
        print(f"brainscale: cannot render {path.name}: no Graphviz `dot` program found; wrote "
              f"{dot_path} instead. To render it, "
              + RENDER_HINT.format(dot=dot_path, out=path), file=sys.stderr)
        return None
    name, fn = found
    from ..errors import BrainscaleError
    try:
        data = fn(dot_text, fmt)
    except BrainscaleError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. graphviz.ExecutableNotFound, CalledProcessError
        raise BrainscaleError(f"rendering {path.name} with {name} failed: "
                              f"{type(e).__name__}: {e}") from e
    path.write_bytes(data)
    return path
