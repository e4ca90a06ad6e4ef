"""Test configuration shared by the whole suite.

* ``BRAINSCALE_VERIFY=1``: the PassManager verifies the IR after every pass.
* ``--accept`` (or ``BRAINSCALE_ACCEPT=1``): golden files are rewritten instead of compared
  (see ``tests/golden.py``).
* marker ``gpu``: skipped unless JAX sees a GPU.
* ``tests/`` is put on ``sys.path`` so tests can ``import models, oracle, golden``.
"""
from __future__ import annotations

import os
import sys

os.environ["BRAINSCALE_VERIFY"] = "1"

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--accept", action="store_true", default=False,
                     help="rewrite golden files (same as BRAINSCALE_ACCEPT=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: longer tests")
    if config.getoption("--accept", default=False):
        os.environ["BRAINSCALE_ACCEPT"] = "1"


def _has_gpu() -> bool:
    try:
        import jax
        return any(d.platform == "gpu" for d in jax.devices())
    except Exception:  # noqa: BLE001 - no backend at all means no GPU
        return False


def pytest_collection_modifyitems(config, items):
    if not any("gpu" in item.keywords for item in items):
        return
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU; jax.devices() has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
