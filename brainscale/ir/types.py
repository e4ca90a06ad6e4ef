"""Static types of IR values: shape + dtype (+ physical unit), trees of them, locations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TensorType", "TreeType", "Loc", "FrozenAttrs", "attrs", "type_of", "short_dtype"]

_SHORT = {
    "float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16",
    "int32": "i32", "int64": "i64", "int8": "i8", "int16": "i16", "uint8": "u8",
    "uint32": "u32", "bool": "bool", "complex64": "c64",
}


def short_dtype(dtype: Any) -> str:
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:       # an extended dtype such as key<fry>
            name = str(dtype)
    return _SHORT.get(name, name)


@dataclass(frozen=True, slots=True)
class TensorType:
    """Type of one array: ``f32[16,64]``, optionally with a brainunit unit ``{mV}``."""
    shape: tuple[int, ...]
    dtype: str                 # numpy dtype name, e.g. 'float32'
    unit: str | None = None    # brainunit unit string, None when dimensionless / unknown

    def __post_init__(self):
        if not all(isinstance(d, int) for d in self.shape):
            raise TypeError(f"TensorType shape must be a tuple of ints, got {self.shape!r}")

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    @classmethod
    def from_aval(cls, aval: Any, unit: str | None = None) -> "TensorType":
        try:
            dtype = np.dtype(aval.dtype).name
        except TypeError:       # an extended dtype (a typed PRNG key, key<fry>): no numpy name
            dtype = str(aval.dtype)
        return cls(tuple(int(d) for d in aval.shape), dtype, unit)

    def __str__(self) -> str:
        s = f"{short_dtype(self.dtype)}[{','.join(str(d) for d in self.shape)}]"
        return s + (f"{{{self.unit}}}" if self.unit else "")


@dataclass(frozen=True, slots=True)
class TreeType:
    """A pytree of tensor types, e.g. ``{bias: f32[64], weight: f32[100,64]}``."""
    fields: tuple[tuple[str, TensorType], ...]   # in pytree flattening order

    @property
    def leaves(self) -> tuple[TensorType, ...]:
        return tuple(t for _, t in self.fields)

    @property
    def size(self) -> int:
        return sum(t.size for t in self.leaves)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.leaves)

    def __str__(self) -> str:
        return "{" + ", ".join(f"{k}: {t}" for k, t in self.fields) + "}"


def type_of(tree_types: list[tuple[str, TensorType]]) -> "TensorType | TreeType":
    """A single unnamed leaf is a TensorType, anything else a TreeType."""
    if len(tree_types) == 1 and tree_types[0][0] == "":
        return tree_types[0][1]
    return TreeType(tuple(tree_types))


@dataclass(frozen=True, slots=True)
class Loc:
    """Source location of the user's code that created a node."""
    text: str   # 'file.py:41 (SNN.update)', shortened to the last two path parts

    def __str__(self) -> str:
        return f'loc("{self.text}")'


FrozenAttrs = tuple  # tuple[tuple[str, scalar | str | tuple], ...], sorted by key


def attrs(**kw: Any) -> FrozenAttrs:
    """Build a frozen, sorted attribute tuple; values must be printable scalars/strings/tuples."""
    for k, v in kw.items():
        if isinstance(v, (list, dict, set)):
            raise TypeError(f"attr {k!r} must be a scalar, string or tuple, got {type(v).__name__}")
    return tuple(sorted(kw.items()))
