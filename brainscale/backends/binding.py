"""The one binding between the IR, the traced jaxpr and the model's live states.

:class:`StepBinding` is built once per compiled step from the graph (and its
:class:`~brainscale.ir.StepInfo`). It knows where every value of the step lives in the jaxpr
(arguments, hidden states, trace and plain parameters, other states) and which trace arrays
the step keeps (``graph.traces[*].arrays``, in order). Everything that moves values between
the model, the traces and the compiled function goes through it: the learner, the online
drivers and the backends never index jaxpr slots themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from .. import _compat as C

__all__ = ["StepBinding", "mantissa_treedef"]


def mantissa_treedef(value):
    """The pytree structure of a parameter value with brainunit quantities as their mantissa."""
    try:
        import brainunit as u
        value = jax.tree.map(lambda l: u.get_mantissa(l), value,
                             is_leaf=lambda l: isinstance(l, u.Quantity))
    except Exception:  # noqa: BLE001
        pass
    return jax.tree.structure(value)


@dataclass(frozen=True)
class StepBinding:
    """Where the step's values live; see the module docstring.

    Attributes (indices are jaxpr invar / outvar positions):
        arg_idx: the step's argument leaves.
        hidden_idx / hidden_out: per hidden state (``graph.hidden`` order).
        tparams / tparam_idx: trace parameter names and their leaves' invars.
        pparams / pparam_idx: plain parameters likewise.
        other_idx: every other invar (states the step reads and does not trace).
        other_out: outvars of states that are neither hidden nor parameters.
        written_other: indices into ``info.states`` of such states the step writes.
        arrays: every trace array of the graph, in trace order.
    """
    graph: Any = field(repr=False, compare=False)
    n_in: int
    arg_idx: tuple
    hidden_idx: tuple
    hidden_out: tuple
    tparams: tuple
    tparam_idx: tuple
    pparams: tuple
    pparam_idx: tuple
    other_idx: tuple
    other_out: tuple
    n_out: int
    written_other: tuple
    w_treedefs: tuple = field(repr=False)
    arrays: tuple
    state_avals: tuple = field(repr=False, default=())  # per state: ((shape, dtype), ...)

    @classmethod
    def build(cls, graph) -> "StepBinding":
        info = graph.info
        jaxpr = C.open_jaxpr(info.jaxpr)
        n_in = len(jaxpr.invars)
        tps = [p for p in graph.params if p.kind == "etrace"]
        pps = [p for p in graph.params if p.kind == "plain"]
        used = set(range(info.n_arg_leaves)) | {h.invar for h in graph.hidden}
        for p in tps + pps:
            used |= set(p.invars)
        hidden_states = {h.state_index for h in graph.hidden}
        param_states = {p.state_index for p in graph.params}
        other_out, written = [], []
        for si, (a, b) in enumerate(info.state_out_slices):
            if si in hidden_states or si in param_states:
                continue
            other_out.extend(range(a, b))
            ia, _ = info.state_in_slices[si]
            if any(jaxpr.outvars[o] is not jaxpr.invars[ia + j] for j, o in enumerate(range(a, b))):
                written.append(si)
        return cls(graph=graph, n_in=n_in, arg_idx=tuple(range(info.n_arg_leaves)),
                   hidden_idx=tuple(h.invar for h in graph.hidden),
                   hidden_out=tuple(h.outvar for h in graph.hidden),
                   tparams=tuple(p.name for p in tps),
                   tparam_idx=tuple(tuple(p.invars) for p in tps),
                   pparams=tuple(p.name for p in pps),
                   pparam_idx=tuple(tuple(p.invars) for p in pps),
                   other_idx=tuple(i for i in range(n_in) if i not in used),
                   other_out=tuple(other_out), n_out=info.n_out_leaves,
                   written_other=tuple(written),
                   w_treedefs=tuple(mantissa_treedef(info.states[p.state_index].value)
                                    for p in tps),
                   arrays=tuple(a for t in graph.traces for a in t.arrays),
                   state_avals=tuple(
                       tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in jaxpr.invars[a:b])
                       for a, b in info.state_in_slices))

    # -- lookups --------------------------------------------------------------------------
    @property
    def info(self):
        return self.graph.info

    def tparam_pos(self, name: str) -> int:
        return self.tparams.index(name)

    def w_tree(self, name_or_pos, leaves):
        """The parameter tree of a trace parameter from its leaves (mantissas)."""
        pi = name_or_pos if isinstance(name_or_pos, int) else self.tparam_pos(name_or_pos)
        return jax.tree.unflatten(self.w_treedefs[pi], list(leaves))

    def array_pos(self, array_id: str) -> int:
        for i, a in enumerate(self.arrays):
            if a.id == array_id:
                return i
        raise KeyError(array_id)

    # -- the compiled function's inputs ---------------------------------------------------
    def assemble(self, theta_t, theta_p, args, hidden, others) -> list:
        """The jaxpr's invals from the step's structured inputs."""
        ins = [None] * self.n_in
        for i, v in zip(self.arg_idx, args):
            ins[i] = v
        for i, v in zip(self.hidden_idx, hidden):
            ins[i] = v
        for idx, leaves in zip(self.tparam_idx, theta_t):
            for i, v in zip(idx, leaves):
                ins[i] = v
        for idx, leaves in zip(self.pparam_idx, theta_p):
            for i, v in zip(idx, leaves):
                ins[i] = v
        for i, v in zip(self.other_idx, others):
            ins[i] = v
        return ins

    def state_leaves(self, states=None) -> list:
        """The flat leaves of the step's states (jaxpr invars after the arguments)."""
        states = self.info.states if states is None else states
        out = []
        for st in states:
            out.extend(jax.tree.leaves(st.value))
        return out

    def check_states(self, states) -> None:
        """A clear error when a state's value no longer has the compiled structure, shape or
        dtype (a new batch size after ``reset_state(batch_size=...)``, a re-created state)."""
        from ..errors import BrainscaleError
        info = self.info
        for st, path, want in zip(states, info.state_paths, self.state_avals):
            leaves = jax.tree.leaves(st.value)
            got = tuple((tuple(jnp.shape(l)), str(jnp.result_type(l))) for l in leaves)
            if got == want:
                continue
            fmt = lambda avs: ", ".join(f"{d}{list(s)}" for s, d in avs) or "nothing"  # noqa: E731
            batch = " (the batch size changed: recompile with inputs of the new batch size)" \
                if len(got) == len(want) and all(len(g[0]) == len(w[0]) and g[0][1:] == w[0][1:]
                                                 for g, w in zip(got, want)) else ""
            raise BrainscaleError(
                f"state {path!r} holds {fmt(got)} but the step was compiled for {fmt(want)}"
                f"{batch}; call compile_graph(*example_inputs) again")

    def gather(self, states=None):
        """``(theta_t, theta_p, hidden, others)`` read from the live states."""
        states = self.info.states if states is None else states
        self.check_states(states)
        leaves = self.state_leaves(states)
        n_arg = len(self.arg_idx)
        pick = lambda idx: tuple(leaves[i - n_arg] for i in idx)  # noqa: E731
        return (tuple(pick(ix) for ix in self.tparam_idx),
                tuple(pick(ix) for ix in self.pparam_idx),
                pick(self.hidden_idx), pick(self.other_idx))

    def scatter(self, new_hidden, new_others, states=None) -> None:
        """Write new hidden values and the other states the step wrote back to the model."""
        info = self.info
        states = info.states if states is None else states
        for h, v in zip(self.graph.hidden, new_hidden):
            states[h.state_index].value = jax.tree.unflatten(info.state_treedefs[h.state_index],
                                                             [v])
        if self.written_other:
            pos, vals = 0, {}
            hidden_states = {h.state_index for h in self.graph.hidden}
            param_states = {p.state_index for p in self.graph.params}
            for si, (a, b) in enumerate(info.state_out_slices):
                if si in hidden_states or si in param_states:
                    continue
                vals[si] = list(new_others[pos:pos + (b - a)])
                pos += b - a
            for si in self.written_other:
                states[si].value = jax.tree.unflatten(info.state_treedefs[si], vals[si])

    def carry_others(self, others, new_others) -> tuple:
        """The next step's ``others`` (invars) from this step's outputs of non-hidden,
        non-parameter states (a step-owning loop carries written states this way)."""
        info = self.info
        pos_in = {inv: p for p, inv in enumerate(self.other_idx)}
        hidden_states = {h.state_index for h in self.graph.hidden}
        param_states = {p.state_index for p in self.graph.params}
        out, pos = list(others), 0
        for si, (a, b) in enumerate(info.state_out_slices):
            if si in hidden_states or si in param_states:
                continue
            ia, _ = info.state_in_slices[si]
            for j in range(b - a):
                if ia + j in pos_in:
                    out[pos_in[ia + j]] = new_others[pos + j]
            pos += b - a
        return tuple(out)

    # -- placement on a device mesh (the IR's shardings, from the 'shard' pass) ------------
    @staticmethod
    def _sharding(mesh, spec):
        from jax.sharding import NamedSharding, PartitionSpec
        return NamedSharding(mesh, PartitionSpec(*spec))

    def place_states(self, states, mesh) -> None:
        """Put the hidden states and parameters on ``mesh`` with their IR shardings."""
        from .._group_states import ComponentView
        for h in self.graph.hidden:
            st = states[h.state_index]
            if h.sharding is not None and not isinstance(st, ComponentView):
                st.value = jax.device_put(st.value, self._sharding(mesh, h.sharding))
        for p in self.graph.params:
            if p.sharding is None:
                continue
            st = states[p.state_index]
            leaves, treedef = jax.tree.flatten(st.value)
            placed = [jax.device_put(l, self._sharding(mesh, sp if sp is not None else ()))
                      for l, sp in zip(leaves, p.sharding)]
            st.value = jax.tree.unflatten(treedef, placed)

    def place_traces(self, values, mesh) -> tuple:
        """Trace array values on ``mesh`` with their IR shardings."""
        return tuple(jax.device_put(v, self._sharding(mesh, a.stored_sharding))
                     if a.sharding is not None else v for v, a in zip(values, self.arrays))

    def place_args(self, leaves, mesh, time_axis: bool = False) -> tuple:
        """The step's argument leaves on ``mesh`` (``time_axis``: a leading axis of steps)."""
        out = []
        for v, inp in zip(leaves, self.graph.inputs):
            if inp.sharding is None:
                out.append(v)
                continue
            spec = ((None,) if time_axis else ()) + tuple(inp.sharding)
            out.append(jax.device_put(v, self._sharding(mesh, spec)))
        return tuple(out)

    def init_traces(self) -> tuple:
        """Zero trace arrays, one per :class:`~brainscale.ir.TraceArray`, in storage dtype."""
        return tuple(jnp.zeros(a.stored_type.shape, a.storage) for a in self.arrays)
