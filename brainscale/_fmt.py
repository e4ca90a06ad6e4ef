"""Small formatting helpers shared by the printer, the DOT dumper and the report."""
from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(n: int | float) -> str:
    """``60 B``, ``1.5 KiB``, ``12.0 MiB``: binary units, one decimal above bytes."""
    n = float(n)
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    return f"{n:.1f} TiB"  # pragma: no cover
