"""When a D-RTRL trace takes the Pallas kernel instead of the JAX path: a recorded cost model.

A D-RTRL step is bandwidth-bound, so the model is a size threshold per execution scheme,
with the tiles to use:

* ``learner_min_bytes`` — the learner's custom-VJP step runs two kernels (update in the
  forward, contraction in the backward: three trace passes, as the JAX path does); they
  beat XLA's fusions only for large traces.
* ``fused_min_bytes`` — the one-pass step of :func:`fused_online_gradients` (two trace
  passes against the JAX path's three).

The built-in numbers come from the H100 measurements of ``docs/pallas-notes`` §2.3 (jax
0.11.2, float32): Triton tiles 0–20 % slower than XLA up to 67 MB and 5–13 % faster from
268 MB. ``tools/pallas_bench.py`` measures the crossovers on the card at hand and writes
them (``"selection"``) into its JSON; load that file with
``PallasBackend(cost_model=path)`` or the environment variable
``BRAINSCALE_PALLAS_COST_MODEL``. Every selection records the model's ``source``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ._common import Tiles

__all__ = ["CostModel", "BUILTIN", "load_cost_model"]

MiB = 2 ** 20


@dataclass(frozen=True)
class CostModel:
    source: str                         # where the numbers come from (printed in dumps)
    learner_min_bytes: float            # two-kernel learner path from this trace size up
    fused_min_bytes: float              # one-pass driver kernel from this trace size up
    tiles: dict = field(default_factory=dict)   # storage dtype name -> Tiles
    es_impl: str = "xla"                # chunked ES-D-RTRL GEMM: 'xla' (cuBLAS) or 'pallas'

    def tiles_for(self, dtype: str) -> Tiles:
        return self.tiles.get(dtype, Tiles())

    def threshold(self, scheme: str) -> float:
        return self.learner_min_bytes if scheme == "learner" else self.fused_min_bytes


BUILTIN = CostModel(
    source="builtin: pallas-notes 2.3, H100 jax 0.11.2 f32 (Triton >= XLA from 268 MB; "
           "one-pass threshold modelled, not measured)",
    learner_min_bytes=256 * MiB,
    fused_min_bytes=64 * MiB,
    tiles={"float32": Tiles(bb=2, bi=32, bo=128, num_warps=4, num_stages=2),
           "bfloat16": Tiles(bb=2, bi=32, bo=128, num_warps=4, num_stages=2)},
)

_CACHE: dict = {}


def load_cost_model(path: str | None = None) -> CostModel:
    """The built-in model, or the ``"selection"`` / ``"tiles"`` of a pallas_bench JSON.

    ``path`` None or '' falls back to ``$BRAINSCALE_PALLAS_COST_MODEL``, then the built-in.
    """
    path = path or os.environ.get("BRAINSCALE_PALLAS_COST_MODEL", "")
    if not path:
        return BUILTIN
    if path in _CACHE:
        return _CACHE[path]
    with open(path) as f:
        data = json.load(f)
    sel = data.get("selection", {})
    tiles = dict(BUILTIN.tiles)
    for dt, t in (data.get("tiles") or {}).items():
        tiles[dt] = Tiles(**{k: int(v) for k, v in t.items() if k in Tiles.__dataclass_fields__})
    def num(key):   # null / missing: the kernel never won on the measured sizes
        v = sel.get(key)
        return float("inf") if v is None else float(v)
    model = CostModel(
        source=f"measured: {os.path.basename(path)} ({data.get('device', '?')}, "
               f"jax {data.get('jax', '?')})",
        learner_min_bytes=num("learner_min_bytes"), fused_min_bytes=num("fused_min_bytes"),
        tiles=tiles, es_impl=str(sel.get("es_impl", "xla")))
    _CACHE[path] = model
    return model
