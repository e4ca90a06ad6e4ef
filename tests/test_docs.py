"""The code on docs/custom_passes.md runs as written (its blocks in order, one namespace),
and the IR it quotes is what that code prints."""
import pathlib
import re

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _blocks(name):
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


def test_custom_passes_page_runs_and_quotes_what_it_prints(capsys):
    text = (DOCS / "custom_passes.md").read_text()
    blocks = _blocks("custom_passes.md")
    assert blocks
    ns: dict = {}
    outs = []
    for i, code in enumerate(blocks):
        exec(compile(code, f"custom_passes.md[python block {i}]", "exec"), ns)
        outs.append(capsys.readouterr().out)
    assert "array T0.0" in outs[0] and "dense-traces-forgetful" in outs[0]
    assert any("conflicts with DiagParamDimAlgorithm" in o for o in outs)
    quoted = re.search(r"```text\n(  trace T0 = param\(R0\).*?)\n\n", text, flags=re.S).group(1)
    for line in quoted.splitlines():
        assert line in outs[0], line
