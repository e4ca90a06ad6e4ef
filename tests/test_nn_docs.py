"""Every public class of brainscale.nn has a docstring with a runnable example; run them."""
from __future__ import annotations

import doctest
import inspect
import os
import sys

import brainevent
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import brainscale.nn as bnn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_nn_oracle import _fast_xla_compiles  # noqa: E402,F401

PUBLIC = sorted(bnn.__all__)


def _globs():
    return dict(brainscale=brainscale, brainstate=brainstate, braintools=braintools, u=u,
                jax=jax, jnp=jnp, np=np, brainevent=brainevent)


@pytest.mark.parametrize("name", PUBLIC)
def test_docstring_example_runs(name):
    obj = getattr(bnn, name)
    doc = inspect.getdoc(obj)
    assert doc and ">>>" in doc, f"{name} has no runnable example in its docstring"
    test = doctest.DocTestParser().get_doctest(doc, _globs(), name, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    brainstate.random.seed(0)
    runner.run(test)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, f"{name}: {res.failed} of {res.attempted} doctest examples failed"


def test_nn_md_code_runs():
    """docs/nn.md's python blocks run as written, in order, in one namespace."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "docs" / "nn.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    ns: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"nn.md[python block {i}]", "exec"), ns)
    lines = ns["lines"]                 # the last block: NonTempParam keeps the conv traced
    assert any("io(" in l for l in lines), lines
