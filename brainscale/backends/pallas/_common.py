"""Shared helpers of the Pallas kernels: platform, tiles, padding, compiler parameters.

Everything here keeps to the portable Pallas subset of jax 0.10 – 0.12 (see
``docs/pallas.md``): ``ref[...]`` indexing with ``pl.ds`` and integer indices,
``pl.program_id``, ``lax.fori_loop``, ``input_output_aliases``; never ``pl.load`` /
``pl.store`` / ``pl.dot``. Backend modules (``pallas.triton``) are imported lazily, inside
:func:`compiler_params`, because importing them warns on jax >= 0.11.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

__all__ = ["Platform", "platform", "Tiles", "pow2_tile", "pad_axis", "round_up",
           "compiler_params", "SUPPORTED_STORAGE"]

#: trace storage dtypes the kernels accept (arithmetic is always float32)
SUPPORTED_STORAGE = ("float32", "bfloat16")


@dataclass(frozen=True)
class Platform:
    """Where the kernels would run: ``kind`` is 'gpu' (Triton lowering) or 'interpret'."""
    kind: str                 # 'gpu' | 'interpret'
    device: str               # e.g. 'NVIDIA H100 80GB HBM3' or 'cpu'
    compute_capability: str   # '9.0' on an H100, '' elsewhere
    reason: str               # why this kind (printed in the dumps)

    @property
    def interpret(self) -> bool:
        return self.kind == "interpret"


@functools.lru_cache(maxsize=None)
def platform() -> Platform:
    """Detect the default device once.

    A CUDA GPU of compute capability >= 8.0 runs the kernels through the Triton lowering;
    anything else (CPU, TPU, older or ROCm GPUs) runs them in interpret mode.
    """
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover - no backend at all
        return Platform("interpret", "none", "", "no JAX device: interpret mode")
    kind = str(getattr(dev, "device_kind", dev.platform))
    if dev.platform == "gpu":
        cc = str(getattr(dev, "compute_capability", "") or "")
        try:
            major = int(cc.split(".")[0])
        except ValueError:
            major = 0
        if major >= 8:
            return Platform("gpu", kind, cc, f"GPU {kind} (cc {cc}): Triton lowering")
        return Platform("interpret", kind, cc,
                        f"GPU {kind} (cc {cc or '?'}) has no Triton Pallas lowering "
                        f"(needs CUDA cc >= 8.0): interpret mode")
    return Platform("interpret", dev.platform, "",
                    f"no GPU ({dev.platform}): interpret mode, for tests only")


@dataclass(frozen=True)
class Tiles:
    """Block sizes of the D-RTRL kernels: a program owns a (bi, bo) tile of the weight and
    walks the batch in chunks of bb. All three are powers of two (Triton)."""
    bb: int = 2
    bi: int = 32
    bo: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("bb", "bi", "bo"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"Tiles.{name} must be a power of two, got {v}")


def pow2_tile(dim: int, target: int, minimum: int = 1) -> tuple[int, bool]:
    """A power-of-two tile ``minimum <= t <= target`` for an axis of length ``dim``.

    Picks the tile that needs the least zero padding (ties: the larger tile), so a
    power-of-two divisor is used whenever there is one. Returns ``(t, needs_pad)``.
    """
    minimum = max(1, minimum)
    best = None
    t = minimum
    while t <= max(target, minimum):
        padded = -(-dim // t) * t
        if best is None or padded <= best[1]:
            best = (t, padded)
        t *= 2
    return best[0], best[1] != dim


def pad_axis(a, axis: int, size: int):
    """Zero-pad ``a`` along ``axis`` to ``size`` (no-op when already that size)."""
    n = a.shape[axis]
    if n == size:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - n)
    return jnp.pad(a, widths)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def compiler_params(num_warps: int = 4, num_stages: int = 2):
    """Explicit Triton compiler parameters.

    Always passed, so the lowering does not depend on the jax version's default (Triton
    up to 0.8, Mosaic GPU 0.9 – 0.11.0, Triton again from 0.11.2).
    """
    from jax.experimental.pallas import triton as pltriton  # lazy: warns on jax >= 0.11
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
