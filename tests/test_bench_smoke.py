"""Smoke test of the benchmark tool (tools/bench.py) on a tiny configuration.

No external virtual environments are created: only this project's environment is used.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
if str(TOOLS / "bench_ext") not in sys.path:
    sys.path.insert(0, str(TOOLS / "bench_ext"))

import bench  # noqa: E402
import bench_models as bm  # noqa: E402


def test_models_match_their_parameter_names():
    import brainstate
    import jax.numpy as jnp
    for model in bm.MODELS:
        w = bm.make_weights(model, 8, seed=1, layers=2)
        assert sorted(w) == sorted(bm.param_names(model, 2))
        h = bm.make_hidden(model, 8, 3, seed=1, layers=2)
        assert sorted(h) == sorted(bm.hidden_names(model, 2))
        net = bm.build("ours", model, w, h, layers=2)
        out = net(jnp.ones((3, bm.N_IN), jnp.float32))
        assert out.shape == (3, bm.N_OUT)
        got = {k[-1] if isinstance(k, tuple) else k
               for k in net.states(brainstate.ParamState).keys()}
        assert got == {n.split(".")[0] for n in w}
    # deterministic: same seed, same numbers
    a, b = bm.make_inputs("gru", 5, 2, seed=3), bm.make_inputs("gru", 5, 2, seed=3)
    np.testing.assert_array_equal(a[0], b[0])


def test_helpers():
    assert bench.nice_T(1e9, 20, 1000) == 1000
    assert bench.nice_T(75, 20, 1000) == 50
    assert bench.nice_T(1, 20, 1000) == 20
    e = bench.est_param_trace_elems("lif", 32, 4)
    assert e == 4 * ((100 + 32) * 32 + 32 + 32 * 10 + 10)
    m = bench.grad_metrics({"a": np.array([1.0, 2.0])}, {"a": np.array([2.0, 4.0])})
    assert m["a"]["cos"] == pytest.approx(1.0)
    assert m["a"]["norm_ratio"] == pytest.approx(0.5)
    assert m["a"]["rel"] == pytest.approx(0.5)


def test_fidelity_worker_in_process():
    import worker
    out = worker.fidelity({"lib": "ours", "model": "lif", "N": 8, "B": 2, "seed": 0,
                           "windows": [4], "algos": ["param"], "decays": [0.9]})
    (row,) = out["rows"]
    assert "metrics" in row, row
    # the readout is non-recurrent across neurons: D-RTRL is exact for it
    assert row["metrics"]["out.weight"]["cos"] == pytest.approx(1.0, abs=1e-5)
    assert row["metrics"]["out.weight"]["rel"] < 1e-4


def test_sweep_quick(tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, str(TOOLS / "bench.py"), "sweep", "--quick", "--models", "lif",
           "--algos", "bptt,param", "--out", str(out), "--work", str(tmp_path / "work")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                       env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    d = json.loads((out / "sweep.json").read_text())
    res = {r["config"]["algo"]: r for r in d["results"]}
    for algo in ("bptt", "param"):
        r = res[algo]
        assert r["ok"], r
        assert r["ms_per_step"] > 0 and r["grad_finite"]
        assert set(r["memory_by_T"]) == {"20", "40"}
        assert r["memory"]["temp"] > 0 and r["rss_peak_mb"] > 0
    # BPTT's XLA temp memory grows with T, D-RTRL's does not
    b, o = res["bptt"]["memory_by_T"], res["param"]["memory_by_T"]
    assert b["40"]["temp"] > b["20"]["temp"]
    assert o["40"]["temp"] <= o["20"]["temp"] * 1.05 + 4096
    assert res["param"]["trace_elems"] == bench.est_param_trace_elems("lif", 32, 4)
    assert res["param"]["bandwidth"]["rw_GBps"] > 0
    assert d["meta"]["bandwidth"]["rw_GBps"] > 0
    md = (out / "results.md").read_text()
    assert "Time per step" in md and "D-RTRL against the copy bandwidth" in md
    assert "D-RTRL/BPTT" in md
    assert "D-RTRL   /BPTT: time" in p.stdout      # the printed ratios


def test_floor_rows_in_process(tmp_path):
    """The floor row (forward + one instantaneous VJP per step) is BPTT over one step, and
    the forward row runs; both time a plain brainstate computation (no learner)."""
    import worker
    grads = {}
    for algo in ("floor", "bptt", "fwd"):
        gp = str(tmp_path / f"{algo}.npz")
        r = worker.run({"lib": "ours", "model": "alif", "algo": algo, "N": 8, "B": 2, "T": 1,
                        "seed": 0, "repeats": 1, "grads_out": gp})
        assert r["ok"] and r["ms_per_step"] > 0, r
        grads[algo] = dict(np.load(gp))
    assert grads["fwd"] == {}
    assert sorted(grads["floor"]) == sorted(grads["bptt"]) != []
    for k in grads["bptt"]:
        np.testing.assert_allclose(grads["floor"][k], grads["bptt"][k], rtol=1e-5, atol=1e-7)
