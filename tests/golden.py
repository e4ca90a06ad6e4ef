"""Golden-file comparison for IR dumps (expecttest-style accept-and-review loop).

``assert_golden(text, name)`` compares ``text`` with ``tests/golden/<name>.ir`` (``name`` may
contain ``/``; a name ending in an extension is used as is). With ``BRAINSCALE_ACCEPT=1`` (or
``pytest --accept``) the file is (re)written instead and the check passes; reviewers read
the git diff. On a mismatch the assertion shows a unified diff.

Equation indices (``eqn=N`` attributes) are positions in the jaxpr of the model's step,
which depends on the brainstate/jax versions (brainstate 0.6 emits one equation fewer than
0.5.4 before the first trace op), so they are compared as ``eqn=#``; every other character
must match. Tests that need the index itself check it against the jaxpr directly.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

__all__ = ["GOLDEN_DIR", "assert_golden", "golden_path", "accepting"]

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def accepting() -> bool:
    return os.environ.get("BRAINSCALE_ACCEPT", "") not in ("", "0", "false")


def golden_path(name: str) -> Path:
    p = GOLDEN_DIR / name
    return p if p.suffix else p.with_suffix(".ir")


def _normalize(text: str) -> str:
    return re.sub(r"\beqn=\d+", "eqn=#", text)


def assert_golden(text: str, name: str) -> None:
    """Compare ``text`` with the golden file ``name`` (rewrite it when accepting).

    Raises:
        AssertionError: with a unified diff when the texts differ, or when the golden file
            does not exist yet (run with ``BRAINSCALE_ACCEPT=1`` to create it).
    """
    path = golden_path(name)
    if accepting():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return
    if not path.exists():
        raise AssertionError(f"golden file {path} does not exist; run with BRAINSCALE_ACCEPT=1 "
                             f"(or pytest --accept) to create it, then review it")
    expected = path.read_text()
    if _normalize(expected) != _normalize(text):
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), text.splitlines(keepends=True),
            fromfile=f"golden/{path.relative_to(GOLDEN_DIR)}", tofile="actual"))
        raise AssertionError(f"output differs from the golden file {path}; if the change is "
                             f"intended, rerun with BRAINSCALE_ACCEPT=1 and review the diff:\n"
                             f"{diff}")
