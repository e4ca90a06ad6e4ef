"""``brainstate.HiddenGroupState`` / ``HiddenTreeState``: one hidden state per component.

A group state keeps the ``n`` hidden variables of a neuron stacked on its last axis
(``(..., n)``); models read and write them with ``get_value(i | name)`` /
``set_value({i | name: v})``. In the jaxpr that is a slice and a scatter along the last
axis, which the dependency analysis would rightly call non-element-wise. So the step is
traced with each group state *split*: while tracing, the state's ``get_value`` /
``set_value`` read and write one ``brainstate.HiddenState`` per component, and the traced
step sees ``n`` ordinary hidden states (named ``<path>[<index or name>]`` in the IR), which
the ``hidden-groups`` pass then groups as the neuron's coupled states. After tracing, each
component is replaced by a :class:`ComponentView`, which reads and writes that component of
the live group state, so the compiled step runs on the model's own state object.

Reading or writing the whole stacked ``.value`` inside the step still works, but the stack
and its slices mix the components through ``concatenate`` / ``slice``: on a path into a
hidden state the compiler refuses it and the message says to use ``get_value`` /
``set_value``.
"""
from __future__ import annotations

import contextlib
from typing import Any

import brainstate
import brainunit as u
import jax.numpy as jnp

__all__ = ["ComponentView", "split_group_states", "group_states_of"]


def group_states_of(model) -> dict:
    """``{path: state}`` of the ``HiddenGroupState``s (and ``HiddenTreeState``s) of ``model``."""
    try:
        items = model.states().items()
    except Exception:  # noqa: BLE001 - a plain function model has no states()
        return {}
    return {".".join(str(p) for p in path): st for path, st in items
            if isinstance(st, brainstate.HiddenGroupState)}


def _names(st) -> list[str]:
    """Component labels: the tree names of a HiddenTreeState, else the indices."""
    index2name = getattr(st, "index2name", None)
    n = st.value.shape[-1]
    if isinstance(st, brainstate.HiddenTreeState) and index2name:
        return [str(index2name[i]) for i in range(n)]
    return [str(i) for i in range(n)]


def _index(st, item) -> int:
    n = len(_COMPONENTS[id(st)]) if id(st) in _COMPONENTS else st.value.shape[-1]
    if isinstance(item, str):
        if item not in st.name2index:
            raise KeyError(f"hidden state name {item!r} not found; names: {sorted(st.name2index)}")
        return st.name2index[item]
    if not isinstance(item, int):
        raise TypeError(f"{type(st).__name__} components are indexed by int or str, got "
                        f"{type(item).__name__}")
    if not -n <= item < n:
        raise IndexError(f"index {item} out of range for {n} hidden states")
    return item % n


def _unit_of(st, idx):
    """The unit a component is read and written in (HiddenTreeState: its own unit; a
    HiddenGroupState of a Quantity: the Quantity's unit, kept in the stored value)."""
    index2unit = getattr(st, "index2unit", None)
    if isinstance(st, brainstate.HiddenTreeState) and index2unit:
        unit = index2unit[idx]
        return None if unit.dim.is_dimensionless else unit
    return None


def _to_stored(st, idx, v):
    """A written component in the stored representation (the mantissa of a tree state)."""
    unit = _unit_of(st, idx)
    if isinstance(st, brainstate.HiddenTreeState):
        if unit is None:
            return jnp.asarray(u.get_magnitude(v))
        return u.Quantity(v).to(unit).mantissa
    return v


class _SplitMixin:
    """The methods installed on a group state's class while the step is traced (see the
    module doc); copied into a subclass of the state's own class."""

    @property
    def value(self):
        comps = _COMPONENTS[id(self)]
        return u.math.stack([c.value for c in comps], axis=-1)

    @value.setter
    def value(self, v):
        comps = _COMPONENTS[id(self)]
        for i, c in enumerate(comps):
            c.value = v[..., i]

    def get_value(self, item):
        idx = _index(self, item)
        val = _COMPONENTS[id(self)][idx].value
        unit = _unit_of(self, idx)
        return val if unit is None else val * unit

    def set_value(self, val):
        if isinstance(val, (tuple, list)):
            val = dict(enumerate(val))
        if not isinstance(val, dict):
            raise TypeError(f"{type(self).__name__}.set_value() takes a dict or a sequence of "
                            f"hidden states, got {type(val).__name__}")
        comps = _COMPONENTS[id(self)]
        for k, v in val.items():
            idx = _index(self, k)
            new = _to_stored(self, idx, v)
            if tuple(u.math.shape(new)) != tuple(u.math.shape(comps[idx].value)):
                raise ValueError(f"the shape of the hidden state should be "
                                 f"{tuple(u.math.shape(comps[idx].value))}, got "
                                 f"{tuple(u.math.shape(new))}")
            comps[idx].value = new


_SPLIT_CLASSES: dict = {}
#: id(group state) -> its component HiddenStates, while a step is traced
_COMPONENTS: dict = {}


def _split_class(cls):
    if cls not in _SPLIT_CLASSES:
        ns = {k: v for k, v in vars(_SplitMixin).items()
              if k in ("value", "get_value", "set_value")}
        # a subclass of the state's own class only (a mixin base would change the layout)
        _SPLIT_CLASSES[cls] = type(cls)(f"_Split{cls.__name__}", (cls,), ns)
    return _SPLIT_CLASSES[cls]


class ComponentView:
    """Component ``index`` of a live group state, read and written as a state's ``.value``
    (what the compiled step binds in place of the traced component)."""

    def __init__(self, group, index: int, group_path: str, label: str):
        self.group = group
        self.index = index
        self.group_path = group_path
        self.label = label

    @property
    def value(self):
        return self.group.value[..., self.index]

    @value.setter
    def value(self, v):
        cur = self.group.value
        if isinstance(cur, u.Quantity):
            mant = cur.mantissa.at[..., self.index].set(u.Quantity(v).to(cur.unit).mantissa)
            self.group.value = u.Quantity(mant, unit=cur.unit)
        else:
            self.group.value = cur.at[..., self.index].set(v)

    def rebind(self, group) -> "ComponentView":
        return ComponentView(group, self.index, self.group_path, self.label)

    def __repr__(self):
        return f"ComponentView({self.group_path}[{self.label}])"


@contextlib.contextmanager
def split_group_states(groups: dict):
    """While active, each group state in ``groups`` (``{path: state}``) reads and writes one
    ``HiddenState`` per component. Yields ``{id(component): (path, view)}``."""
    out: dict[int, Any] = {}
    restore = []
    try:
        for path, st in groups.items():
            raw = st.value
            labels = _names(st)
            comps = [brainstate.HiddenState(raw[..., i]) for i in range(len(labels))]
            restore.append((st, type(st)))
            _COMPONENTS[id(st)] = comps
            object.__setattr__(st, "__class__", _split_class(type(st)))
            for i, (c, lab) in enumerate(zip(comps, labels)):
                out[id(c)] = (f"{path}[{lab}]", ComponentView(st, i, path, lab))
        yield out
    finally:
        for st, cls in restore:
            object.__setattr__(st, "__class__", cls)
            _COMPONENTS.pop(id(st), None)
