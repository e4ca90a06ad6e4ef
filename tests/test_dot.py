"""DOT dumper (brainscale/ir/dot.py): golden DOT text, structure, escaping, rendering.

Golden files live in ``tests/golden_dot/``; ``BRAINSCALE_ACCEPT=1`` (or ``pytest --accept``)
rewrites them, reviewers read the git diff.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from pathlib import Path

import braintools
import brainstate
import jax.numpy as jnp
import pytest

import brainscale
from brainscale.errors import BrainscaleError
from brainscale.ir import Loc, PrintSettings
from brainscale.ir.dot import _esc, find_renderer, human_bytes, render, to_dot

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOLDEN_DOT = HERE / "golden_dot"


def _accepting() -> bool:
    return os.environ.get("BRAINSCALE_ACCEPT", "") not in ("", "0", "false")


def assert_golden_dot(text: str, name: str) -> None:
    path = GOLDEN_DOT / name
    if _accepting():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return
    assert path.exists(), f"{path} missing; run with BRAINSCALE_ACCEPT=1 to create it"
    expected = path.read_text()
    if expected != text:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"golden_dot/{name}", "actual"))
        raise AssertionError(f"DOT differs from {path} (BRAINSCALE_ACCEPT=1 to accept):\n{diff}")


# -- models ---------------------------------------------------------------------------------
class Net(brainstate.nn.Module):
    """One 2-state neuron group fed by concat(x, spikes): a single io-dim trace."""

    def __init__(self, n_in=3, n=4):
        super().__init__()
        self.w = brainscale.ETraceParam({'weight': jnp.ones((n_in + n, n)) * 0.1,
                                         'bias': jnp.zeros(n)}, brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.zeros(n))
        self.a = brainscale.ETraceState(jnp.zeros(n))

    def update(self, x):
        spk = braintools.surrogate.Sigmoid()(self.V.value - 1.)
        y = self.w.execute(jnp.concatenate([x, spk], -1))
        v = self.V.value * 0.9 + y - spk - 0.5 * self.a.value
        self.V.value = v
        self.a.value = self.a.value * 0.95 + braintools.surrogate.Sigmoid()(v - 1.)
        return v


def load_cli_model():
    spec = importlib.util.spec_from_file_location("_bs_cli_model", ROOT / "examples" / "cli_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def net():
    return brainscale.compile(Net(), jnp.ones(3), algorithm="hybrid", decay_or_rank=0.9)


@pytest.fixture(scope="module")
def snn():
    model, x = load_cli_model().make()
    return brainscale.compile(model, x, algorithm="hybrid", decay_or_rank=0.9)


# -- golden text ----------------------------------------------------------------------------
def test_golden_dot_net(net):
    assert_golden_dot(to_dot(net.graph), "net_hybrid.dot")


def test_golden_dot_cli_model(snn):
    assert_golden_dot(to_dot(snn.graph), "cli_model_hybrid.dot")


def test_deterministic(snn):
    model, x = load_cli_model().make()
    again = brainscale.compile(model, x, algorithm="hybrid", decay_or_rank=0.9)
    assert to_dot(again.graph) == to_dot(snn.graph)
    assert snn.to_dot() == to_dot(snn.graph)


# -- structure ------------------------------------------------------------------------------
def test_structure(snn):
    text = to_dot(snn.graph)
    assert text.startswith("// brainscale-ir v1  graph=TwoLayerSNN.update\n")
    assert 'subgraph "cluster_G0" {' in text
    assert 'label="G0 varshape=[32] n=2\\nrecurrent=true"' in text
    assert 'subgraph "cluster_G1" {' in text
    # hidden states: light-blue ellipses inside their cluster
    g0 = text.split('subgraph "cluster_G0" {')[1].split("  }")[0]
    assert '"alif.V" [shape=ellipse, style=filled, fillcolor=lightblue' in g0
    assert '"alif.a"' in g0
    # params: salmon for trace params, lighter for plain ones
    assert '"alif.w_rec" [shape=box, style=filled, fillcolor=salmon' in text
    assert '"alif.threshold" [shape=box, style=filled, fillcolor=mistyrose' in text
    # op applications: rounded boxes labelled '%y0 = dense' + type
    assert '"y0" [shape=box, style="rounded,filled", fillcolor=lemonchiffon, ' \
           'label="%y0 = dense\\nf32[32]\\nMatMulOp"]' in text
    # relations: op -> group cluster, labelled with the relation id
    assert '"y1" -> "alif.V" [lhead="cluster_G0"' in text and 'label="R1"' in text
    # traces: notes with id, dim, layout, bytes and reason, dashed edges to their params
    assert '"T2" [shape=note' in text
    assert "dim=param  layout=compact\\lbytes=128 B" in text
    assert "reason: param 128B \\<= io 132B" in text
    assert '"alif.w_in" -> "T0" [style=dashed, arrowhead=none' in text
    assert 'subgraph "cluster_legend"' in text
    assert text.count("{") == text.count("}") + text.count("\\{") - text.count("\\}")


def test_settings_and_legend(net):
    bare = to_dot(net.graph, PrintSettings(print_types=False, print_attrs=False), legend=False)
    assert "f32[" not in bare.split("digraph", 1)[1]
    assert "reason:" not in bare and "cluster_legend" not in bare
    assert "reason: io 60B \\< param 256B" in to_dot(net.graph)


def test_every_stage_draws(net):
    for name, g in net.stages:
        text = to_dot(g)
        assert text.endswith("}\n"), name
    lower = to_dot(net.stages[0][1])
    assert "cluster_G0" not in lower and '"V" [shape=ellipse' in lower


def test_locs_only_on_request(net):
    g = net.graph
    # dataclasses.replace: loc is not part of node equality (ir.replace would keep the old node)
    op = dataclasses.replace(g.ops[0], loc=Loc("/home/someone/project/models/net.py:57 (Net.update)"))
    g = dataclasses.replace(g, ops=(op,))
    assert "net.py" not in to_dot(g)
    assert "at models/net.py:57 (Net.update)" in to_dot(g, show_locs=True)
    assert "at models/net.py:57 (Net.update)" in to_dot(g, PrintSettings(print_locs=True))
    assert "/home/someone" not in to_dot(g, show_locs=True)


def test_escaping():
    assert _esc('{a|b} <c> "d" e\\f') == '\\{a\\|b\\} \\<c\\> \\"d\\" e\\\\f'
    from brainscale.ir import Graph
    text = to_dot(Graph(name='we"ird{name}'), legend=False)
    assert 'digraph "we\\"ird{name}" {' in text
    assert 'label="we\\"ird\\{name\\}\\l' in text


def test_human_bytes():
    assert human_bytes(60) == "60 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 2 ** 20) == "3.0 MiB"
    assert human_bytes(5 * 2 ** 30) == "5.0 GiB"


# -- rendering ------------------------------------------------------------------------------
needs_renderer = pytest.mark.skipif(find_renderer() is None,
                                    reason="no Graphviz dot / graphviz-pure installed")


@needs_renderer
def test_render_svg_contains_nodes(snn, tmp_path):
    out = render(to_dot(snn.graph), tmp_path / "g.svg")
    assert out == tmp_path / "g.svg"
    svg = out.read_text()
    assert "<svg" in svg
    for name in ("y0", "y2", "x1", "alif.V", "out.r", "alif.w_rec", "T0", "T2", "cluster_G0"):
        assert f"<title>{name}</title>" in svg, name          # node names (SVG tooltips)
    for label in ("%y0 = dense", "%alif.V", "%out.w_out", "T2 = param(R2)"):
        assert f">{label}</text>" in svg, label                # labels show the IR names
    assert "G0 varshape=[32] n=2" in svg
    assert "reason: param 128B &lt;= io 132B" in svg


@needs_renderer
def test_render_png_and_compiled_render(net, tmp_path):
    out = net.render(tmp_path / "net.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_renderer
def test_render_error_is_reported(tmp_path):
    with pytest.raises(BrainscaleError, match="failed"):
        render("digraph { a -> ; }", tmp_path / "bad.svg")


def test_render_without_renderer(net, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BRAINSCALE_DOT_RENDERER", "none")
    assert render(to_dot(net.graph), tmp_path / "g.svg") is None
    assert (tmp_path / "g.dot").read_text() == to_dot(net.graph)
    err = capsys.readouterr().err
    assert "no Graphviz `dot` program found" in err
    assert "pip install graphviz-pure" in err and "install Graphviz" in err


def test_render_dot_suffix_writes_text(net, tmp_path):
    assert render(to_dot(net.graph), tmp_path / "g.dot") == tmp_path / "g.dot"
    assert (tmp_path / "g.dot").read_text().startswith("// brainscale-ir v1")


@pytest.mark.skipif(os.name == "nt" or find_renderer() is None or
                    find_renderer()[0] != "graphviz-pure", reason="needs graphviz-pure, POSIX")
def test_render_prefers_graphviz_package_with_system_dot(net, tmp_path, monkeypatch):
    pytest.importorskip("graphviz")
    from brainscale.ir.dot import _graphviz_pure
    shim = tmp_path / "bin" / "dot"          # a system `dot` stand-in backed by graphviz-pure
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{_graphviz_pure()}" "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert find_renderer()[0] == "graphviz"
    out = render(to_dot(net.graph), tmp_path / "g.svg")
    assert "<title>y0</title>" in out.read_text()
    monkeypatch.setenv("BRAINSCALE_DOT_RENDERER", "graphviz-pure")
    assert find_renderer()[0] == "graphviz-pure"
