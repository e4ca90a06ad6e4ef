"""Test configuration shared by the whole suite.

* ``BRAINSCALE_VERIFY=1``: the PassManager verifies the IR after every pass.
* ``--accept`` (or ``BRAINSCALE_ACCEPT=1``): golden files are rewritten instead of compared
  (see ``tests/golden.py``).
* marker ``gpu``: skipped unless JAX sees a GPU.
* marker ``optimized``: compiled with XLA's optimisations (the rest of the suite skips most
  of them for speed: ``JAX_DISABLE_MOST_OPTIMIZATIONS``; ``BRAINSCALE_TEST_OPTIMIZE=1``
  turns them on everywhere).
* ``tests/`` is put on ``sys.path`` so tests can ``import models, oracle, golden``.
"""
from __future__ import annotations

import os
import sys

os.environ["BRAINSCALE_VERIFY"] = "1"
# XLA's optimisation passes preserve what a program computes; the suite compiles thousands
# of small programs, and skipping most of those passes makes it ~15 % faster. Tests marked
# ``optimized`` (memory measurements) compile as users do, and BRAINSCALE_TEST_OPTIMIZE=1
# compiles everything as users do. Set before jax is imported (workers and subprocesses
# inherit it).
if os.environ.get("BRAINSCALE_TEST_OPTIMIZE") != "1":
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

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
    config.addinivalue_line("markers", "optimized: compiled with XLA's optimisations on")
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


@pytest.fixture(autouse=True)
def _optimized_compile(request):
    """Tests marked ``optimized`` compile with XLA's optimisations (see the top)."""
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    import jax
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)
