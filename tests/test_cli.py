"""``brainscale-opt`` (brainscale/cli.py, tools/brainscale_opt.py).

Most tests call ``brainscale.cli.main(argv)`` in-process (fast); one runs the
``tools/brainscale_opt.py`` wrapper in a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from brainscale.cli import main
from brainscale.ir.dot import find_renderer
from brainscale.report import CompileReport

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "examples" / "cli_model.py") + ":make"
STAGES = ["lower", "absorb-normalization", "hidden-groups", "relations", "select-dims",
          "fuse-traces", "layout-traces"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_default_prints_final_ir(capsys):
    code, out, err = run(capsys, MODEL, "--decay", "0.9")
    assert code == 0, err
    assert out.startswith("// brainscale-ir v1  graph=TwoLayerSNN.update\n"
                          "// stages: lower, absorb-normalization, hidden-groups, relations, "
                          "select-dims{decay=0.9}, "
                          "fuse-traces, layout-traces\n")
    assert "trace T0 = io(R0)" in out and "trace T2 = param(R2)" in out
    assert "alpha=0.9" in out and "array T2.0 = eps(R2 -> G1, leaf=weight" in out


def test_print_after(capsys):
    code, out, err = run(capsys, MODEL, "--decay", "0.9", "--print-after", "select-dims",
                         "--print-after", "lower")
    assert code == 0, err
    headers = [ln for ln in out.splitlines() if ln.startswith("// ----- after")]
    assert headers == ["// ----- after lower -----", "// ----- after select-dims{decay=0.9} -----"]
    lower, select = out.split("// ----- after select-dims{decay=0.9} -----")
    assert "// stages: lower\n" in lower and "group G0" not in lower
    assert ("// stages: lower, absorb-normalization, hidden-groups, relations, "
            "select-dims{decay=0.9}\n") in select
    assert "array " not in select            # layout-traces has not run yet


def test_print_after_all_and_pipeline_spec(capsys):
    code, out, err = run(capsys, MODEL, "--decay", "0.9", "--print-after-all", "--pipeline",
                         "hidden-groups,relations,select-dims{policy=io},fuse-traces")
    assert code == 0, err
    headers = [ln for ln in out.splitlines() if ln.startswith("// ----- after")]
    assert headers == ["// ----- after lower -----", "// ----- after hidden-groups -----",
                       "// ----- after relations -----",
                       "// ----- after select-dims{policy=io,decay=0.9} -----",
                       "// ----- after fuse-traces -----",
                       "// ----- after layout-traces -----"]
    final = out.rsplit("// ----- after layout-traces -----", 1)[1]
    assert "trace T2 = io(R2)" in final and "policy=io (ES-D-RTRL)" in final


def test_out_dir(capsys, tmp_path):
    out_dir = tmp_path / "dumps"
    out_dir.mkdir()
    (out_dir / "09-stale.ir").write_text("old")       # a dump of an earlier run: removed
    (out_dir / "notes.txt").write_text("mine")        # not a dump: kept
    argv = [MODEL, "--decay", "0.9", "--out", str(out_dir)]
    svg = find_renderer() is not None
    if svg:
        argv.append("--svg")
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    names = sorted(p.name for p in out_dir.iterdir())
    expected = sorted([f"{i:02d}-{s}.{ext}" for i, s in enumerate(STAGES)
                       for ext in (("ir", "dot", "svg") if svg else ("ir", "dot"))] + ["notes.txt"])
    assert names == expected
    assert (out_dir / "00-lower.ir").read_text().startswith("// brainscale-ir v1")
    assert "// stages: lower\n" in (out_dir / "00-lower.ir").read_text()
    assert 'subgraph "cluster_G0"' in (out_dir / "06-layout-traces.dot").read_text()
    if svg:
        assert "<svg" in (out_dir / "06-layout-traces.svg").read_text()
    assert f"wrote {len(STAGES) * (3 if svg else 2)} file(s)" in err


def test_report_and_json(capsys, tmp_path):
    js = tmp_path / "sub" / "report.json"
    code, out, err = run(capsys, MODEL, "--decay", "0.9", "--report", "--json", str(js))
    assert code == 0, err
    assert out.startswith("compile report: TwoLayerSNN.update  (DiagHybridDimAlgorithm)\n")
    for section in ("hidden states (3) in 2 group(s):", "parameters (3 etrace, 1 plain):",
                    "traces (3):", "total: 800 B", "dimension choices:", "time per pass:",
                    "compile time:"):
        assert section in out, section
    assert "R2   out.w_out   %y2->G1     param  param=128 B io=132 B    param 128B <= io 132B" in out
    assert "// brainscale-ir" not in out               # --report replaces the IR print
    data = json.loads(js.read_text())
    rep = CompileReport.model_validate(data)           # the JSON follows the schema
    assert rep.trace_bytes_total == 800
    assert [t.dim for t in rep.traces] == ["io", "io", "param"]
    assert [c.reason for c in rep.dim_choices][2].startswith("param 128B <= io 132B")
    assert [p.stage.split("{")[0] for p in rep.pass_times] == STAGES
    assert [a.id for a in rep.traces[2].arrays] == ["T2.0"] and rep.traces[0].decay == 0.9


def test_json_to_stdout(capsys):
    code, out, err = run(capsys, MODEL, "--decay", "0.9", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["graph"] == "TwoLayerSNN.update"


def test_custom_pass_in_pipeline_and_draw(capsys, tmp_path):
    target = tmp_path / "final.dot"
    code, out, err = run(capsys, MODEL, "--decay", "0.9", "--draw", str(target), "--pipeline",
                         "hidden-groups,relations,select-dims,fuse-traces,"
                         "force-param-small{max_elems=300}")
    assert code == 0, err
    assert "force-param-small{max_elems=300}" in out.splitlines()[1]
    assert "trace T0 = param(R0)" in out
    assert "reason: force-param-small: \\|theta\\|=288" in target.read_text()  # escaped |


def test_list_passes(capsys):
    code, out, err = run(capsys, "--list-passes")
    assert code == 0
    names = [ln.split()[0] for ln in out.splitlines()]
    assert {"hidden-groups", "relations", "select-dims", "fuse-traces", "force-param-small",
            "drop-frozen"} <= set(names)


@pytest.mark.parametrize("argv,message", [
    ([MODEL, "--decay", "0.9", "--pipeline", "hidden-groups,relatons"],
     "bad --pipeline: unknown pass 'relatons'; registered passes:"),
    ([MODEL, "--decay", "0.9", "--pipeline", "hidden-groups,relations,select-dims{polcy=io}"],
     "bad --pipeline: bad options for pass 'select-dims'"),
    ([MODEL, "--decay", "0.9", "--pipeline", "hidden-groups,select-dims"],
     "pass 'select-dims' requires ['relations'], which no earlier pass provides; "
     "add 'relations' before it"),
    ([MODEL, "--decay", "0.9", "--print-after", "bogus"],
     "--print-after 'bogus' names no stage of the pipeline; stages: lower, absorb-normalization,"),
    ([MODEL[:-len(":make")] + ":nope"],
     "has no factory 'nope'; callables defined there: ALIFLayer, LeakyReadout, TwoLayerSNN, make"),
    ([MODEL[:-len(":make")] + ":ALIFLayer"],
     "factory ALIFLayer() raised TypeError:"),
    (["examples/no_such_file.py:make"], "model file 'examples/no_such_file.py' not found"),
    ([MODEL[:-len(":make")]], "MODEL must be 'path/to/file.py:factory'"),
    ([MODEL, "--algorithm", "io"], "needs decay_or_rank"),
    ([MODEL, "--decay", "1.5"], "must lie in (0, 1)"),
    ([MODEL, "--svg"], "--svg needs --out DIR"),
    ([], "MODEL is required"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("brainscale-opt: error: "), err
    assert message in err
    assert "Traceback" not in err


def test_missing_decay_is_a_usage_error(capsys):
    # hybrid picks io-dim traces for the recurrent layer, which need a decay
    code, out, err = run(capsys, MODEL)
    assert code == 2
    assert "has no decay alpha" in err and "--decay ALPHA" in err


def test_wrapper_script_subprocess():
    env = dict(os.environ, PYTHONPATH="")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "brainscale_opt.py"),
                           "examples/cli_model.py:make", "--decay", "0.9", "--report"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("compile report: TwoLayerSNN.update")
