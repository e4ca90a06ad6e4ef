"""Smoke test of the end-to-end demo (tools/demo.py) in --quick mode.

The quick run trains a tiny recurrent SNN online (ES-D-RTRL) on 128 spike-encoded digits for
one epoch; it checks that the demo runs, writes its outputs and reports sane metrics, not
that it reaches a good accuracy (the full run does; see docs/demo.md).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "tools" / "demo.py"

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _load_demo_module():
    spec = importlib.util.spec_from_file_location("brainscale_demo", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run([sys.executable, str(DEMO), "--out", str(out), "--quick", "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"demo failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return out, proc.stdout


def test_quick_demo_writes_outputs(quick_run):
    out, stdout = quick_run
    for name in ("metrics.json", "training.png", "graph.ir.txt"):
        p = out / name
        assert p.is_file() and p.stat().st_size > 0, f"{name} missing or empty"
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ir = (out / "graph.ir.txt").read_text()
    assert "graph @" in ir and "trace T0 = io(" in ir, ir
    if importlib.util.find_spec("brainscale.ir.dot") is not None:
        dot = (out / "graph.dot").read_text()
        assert "digraph" in dot
    assert "test acc" in stdout and "peak RSS" in stdout


def test_quick_demo_metrics_are_sane(quick_run):
    out, _ = quick_run
    m = json.loads((out / "metrics.json").read_text())
    final = m["final"]
    for key in ("train_acc", "test_acc"):
        assert isinstance(final[key], float) and 0.0 <= final[key] <= 1.0, (key, final[key])
    assert math.isfinite(final["train_loss"]) and final["train_loss"] > 0
    assert m["config"]["quick"] is True and m["config"]["epochs"] == 1
    assert len(m["history"]["test_acc"]) == 1
    assert m["data"]["n_train"] == 128 and m["data"]["n_test"] == 64
    mem = m["trace_memory"]
    assert mem["allocated_bytes"] > 0 and mem["dims"] == ["io"]
    assert mem["planned_bytes"] == mem["allocated_bytes"]
    assert mem["allocated_bytes"] < mem["param_dim_bytes_estimate"]
    assert m["peak_rss_mb"] > 0 and m["wall_seconds"] > 0
    # the online gradient points where the BPTT gradient does (ES-D-RTRL is approximate for
    # the recurrent layer, near exact for the leaky readout)
    align = m["grad_alignment_vs_bptt"]
    assert align, "no gradient alignment recorded"
    for name, v in align.items():
        assert v["cosine"] > (0.9 if name.startswith("out") else 0.5), (name, v)
    for f in m["files"]:
        assert (out / f).is_file(), f


def test_spike_encoding_is_deterministic():
    demo = _load_demo_module()
    a = demo.load_spike_digits(6, seed=3, n_train=20, n_test=10)
    b = demo.load_spike_digits(6, seed=3, n_train=20, n_test=10)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    x_tr, y_tr, x_te, y_te = a
    assert x_tr.shape == (20, 6, 64) and x_te.shape == (10, 6, 64)
    assert set(np.unique(x_tr)) <= {0.0, 1.0}
    assert y_tr.dtype.kind == "i" and 0 <= y_tr.min() and y_tr.max() <= 9


def test_readme_block_is_marked():
    text = DEMO.read_text()
    start = text.index("# --- README example start ---")
    end = text.index("# --- README example end ---")
    block = text[start:end]
    assert start < end
    assert "brainscale.DiagIODimAlgorithm" in block and "compile_graph" in block
