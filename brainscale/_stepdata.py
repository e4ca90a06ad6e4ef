"""Inputs of one step or of a window of steps (brainscale 0.1's ``SingleStepData`` /
``MultiStepData``).

A learner compiled with ``vjp_method='multi-step'`` that receives a :class:`MultiStepData`
runs the window of steps it holds (leading axis = steps) in one call; the learning signal is
back-propagated through the whole window and the eligibility traces carry the credit from
before it (``docs/design.md``, "Multi-step learning signal"). A :class:`SingleStepData` holds
an input that is the same at every step of the window (or plainly one step's input).
"""
from __future__ import annotations

from typing import Any

import jax

__all__ = ["SingleStepData", "MultiStepData", "is_step_data", "has_multi_step"]


class _StepData:
    __slots__ = ("data",)

    def __init__(self, data: Any):
        self.data = data

    def tree_flatten(self):
        return (self.data,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0])

    def __repr__(self):
        shapes = jax.tree.map(lambda a: tuple(getattr(a, "shape", ())), self.data)
        return f"{type(self).__name__}({shapes})"


@jax.tree_util.register_pytree_node_class
class SingleStepData(_StepData):
    """The input of one time step (or one that is constant over a window)."""


@jax.tree_util.register_pytree_node_class
class MultiStepData(_StepData):
    """Inputs of several consecutive steps, stacked on a leading axis."""


def is_step_data(x) -> bool:
    return isinstance(x, _StepData)


def has_multi_step(args, kwargs) -> bool:
    return any(isinstance(a, MultiStepData) for a in
               jax.tree.leaves((args, kwargs), is_leaf=is_step_data))
