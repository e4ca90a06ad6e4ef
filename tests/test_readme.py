"""The README's training example runs as written (extracted from the Markdown)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_training_example():
    blocks = _python_blocks()
    assert blocks, "README.md must contain a python example"
    assert any("compile_graph" in b for b in blocks)


@pytest.mark.parametrize("i", range(len(_python_blocks())))
def test_readme_block_runs(i, capsys):
    code = _python_blocks()[i]
    ns: dict = {}
    exec(compile(code, f"README.md[python block {i}]", "exec"), ns)
    out = capsys.readouterr().out
    assert "loss at the last step" in out or "graph @" in out
