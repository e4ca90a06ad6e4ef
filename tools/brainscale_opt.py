"""``python tools/brainscale_opt.py MODEL [options]``: run ``brainscale-opt`` from a checkout.

A thin wrapper around :func:`brainscale.cli.main` (the ``brainscale-opt`` console script),
usable without installing the package; see ``brainscale-opt --help`` for the options.
"""
from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from brainscale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
