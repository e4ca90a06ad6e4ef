"""examples/long_delay.py runs end to end (tiny configuration): it trains, measures the
training step's memory by trial length, writes its metrics and plots, and BPTT's memory
grows with the trial while the online rule's does not."""
from __future__ import annotations

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_long_delay_example_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("long_delay", ROOT / "examples" / "long_delay.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--quick", "--rules", "param", "--out", str(tmp_path), "--no-progress",
                   "--mem-T", "40,160"])
    assert rc == 0
    d = json.loads((tmp_path / "metrics.json").read_text())
    (r,) = d["results"]
    assert r["name"] == "D-RTRL" and 0.0 <= r["accuracy"] <= 1.0 and len(r["curve"]) >= 2
    mem = d["memory_mb"]
    assert mem["D-RTRL"]["40"] == mem["D-RTRL"]["160"]
    assert mem["BPTT"]["160"] > 2 * mem["BPTT"]["40"]
    assert (tmp_path / "memory.png").exists() and (tmp_path / "accuracy.png").exists()
