"""Pass ``shard``: place the step's arrays on a device mesh (data and neuron parallelism).

``shard{mesh=[data=4;model=2],batch=data,neurons=model}`` gives every array of the compiled
step a sharding — the mesh axis (or none) of each dimension — printed in the IR as
``{shard=[data,.,model]}``:

* **batch** (data parallel): the leading batch axis of inputs, hidden states and every trace
  array is split over the ``batch`` mesh axis; gradients are reduced over it by XLA;
* **neurons** (model parallel): the last neuron axis of hidden states, of ``ε_f`` and of
  every param-dim trace whose parameter reaches the output neurons along that axis (a dense
  matmul's weight columns and bias, an element-wise parameter), and of those weights
  themselves, is split over the ``neurons`` mesh axis. A matmul then needs no communication
  for its own trace update (``x`` is replicated, ``ε`` and ``df`` live with their output
  columns); its input is gathered by the matmul as usual. Other ops' parameters (conv, sparse,
  LoRA) and op inputs (``ε_x``) stay replicated along the neuron axis.

The rule zoo's arrays split over ``batch`` like the rest: a κ-filtered ``ē`` as its ``ε``, an
influence block ``m`` (RTRL, SnAp, OSTL) and a UORO hidden factor ``u_h`` along their hidden
state's batch axis, a UORO parameter factor ``u_p`` along its per-example axis; ``m`` and
``u_h`` stay whole along the neurons (the recursion ``J·M`` mixes the coupled states).

A dimension that does not divide over its mesh axis stays replicated (the pass notes it).
The runtime places the states and traces with these shardings (``jax.sharding.NamedSharding``)
and JAX's SPMD partitioner keeps them so between steps; nothing else is distributed by hand.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import PipelineError
from ..ir import replace
from ..ir.layout import batch_shape, neuron_shape, param_leaves
from .base import Pass, register_pass

__all__ = ["ShardPass", "parse_mesh"]

#: op kinds whose parameter leaves reach the output neurons along their last axis
_COLUMN_KINDS = ("dense", "elemwise")


def parse_mesh(mesh) -> tuple:
    """``(('data', 4), ...)`` from ``('data=4', ...)``, a ``jax.sharding.Mesh`` or pairs."""
    if hasattr(mesh, "axis_names") and hasattr(mesh, "shape"):
        return tuple((str(n), int(mesh.shape[n])) for n in mesh.axis_names)
    out = []
    for item in mesh or ():
        if isinstance(item, str):
            name, _, size = item.partition("=")
            if not size.strip().isdigit():
                raise PipelineError(f"shard: mesh entries are 'axis=size', got {item!r}")
            out.append((name.strip(), int(size)))
        else:
            name, size = item
            out.append((str(name), int(size)))
    return tuple(out)


@register_pass
@dataclass(frozen=True)
class ShardPass(Pass):
    """Shard inputs, hidden states, weights and trace arrays over a device mesh."""
    name = "shard"
    requires = frozenset({"trace-arrays"})
    provides = frozenset({"sharding"})
    mesh: tuple = ()                 # ('data=4', 'model=2')
    batch: str | None = None         # mesh axis of the batch dimension
    neurons: str | None = None       # mesh axis of the last neuron dimension

    def run(self, graph, ctx):
        mesh = parse_mesh(self.mesh)
        sizes = dict(mesh)
        if not mesh:
            raise PipelineError("shard needs a mesh: shard{mesh=[data=4],batch=data}")
        for what, ax in (("batch", self.batch), ("neurons", self.neurons)):
            if ax is not None and ax not in sizes:
                raise PipelineError(f"shard: {what}={ax!r} is not an axis of the mesh "
                                    f"{[n for n, _ in mesh]}")
        if self.batch is not None and self.batch == self.neurons:
            raise PipelineError("shard: batch and neurons must be different mesh axes")
        notes: list[str] = []

        def spec(shape, what, batch_dim=None, neuron_dim=None):
            out = [None] * len(shape)
            for dim, ax in ((batch_dim, self.batch), (neuron_dim, self.neurons)):
                if dim is None or ax is None:
                    continue
                if shape[dim] % sizes[ax]:
                    notes.append(f"{what}: dimension {dim} of size {shape[dim]} does not divide "
                                 f"over {ax}={sizes[ax]}, replicated")
                    continue
                out[dim] = ax
            return tuple(out)

        # the batch axes and the neuron axis of each group
        group_b: dict[str, tuple] = {}
        for r in graph.relations:
            for gid in r.groups:
                group_b.setdefault(gid, batch_shape(graph, gid, graph.op_by_name[r.op]))

        def group_dims(gid, shape_len):
            b = group_b.get(gid)
            if b is None:   # a group no op reaches: batched if it leads with the batch size
                vs = graph.group_by_id[gid].varshape
                b = vs[:1] if graph.batch and vs and vs[0] == graph.batch else ()
            bd = 0 if b else None
            nd = shape_len - 1 if shape_len > len(b) else None
            return bd, nd

        hidden = []
        for h in graph.hidden:
            g = graph.group_of(h.name)
            bd, nd = group_dims(g.id, len(h.type.shape)) if g is not None else (None, None)
            hidden.append(replace(h, sharding=spec(h.type.shape, f"%{h.name}", bd, nd)))

        inputs = tuple(replace(i, sharding=spec(
            i.type.shape, f"%{i.name}",
            0 if graph.batch and i.type.shape and i.type.shape[0] == graph.batch else None))
            for i in graph.inputs)

        ops_of: dict[str, list] = {}
        for o in graph.ops:
            ops_of.setdefault(o.param, []).append(o)

        def columns(op, leaf_shape) -> bool:
            """The leaf's last axis splits with the neurons: it reaches the op's output
            neurons along it (dense columns, element-wise, a bias), or it is a sparse op's
            synapse (stored element) axis."""
            ns = neuron_shape(op)
            if op.kind == "sparse" and len(leaf_shape) == 1 and \
                    leaf_shape[0] == graph.op_object(op.name).nse:
                return True
            if not leaf_shape or not ns or leaf_shape[-1] != ns[-1]:
                return False
            return op.kind in _COLUMN_KINDS or tuple(leaf_shape) == tuple(ns)   # a bias

        params = []
        for p in graph.params:
            specs = []
            for n, t in param_leaves(graph, p.name):
                col = p.kind == "etrace" and bool(ops_of.get(p.name)) and \
                    all(columns(o, t.shape) for o in ops_of[p.name])
                specs.append(spec(t.shape, f"%{p.name}.{n}", None,
                                  len(t.shape) - 1 if col else None))
            params.append(replace(p, sharding=tuple(specs)))

        traces = []
        for t in graph.traces:
            arrays = []
            for a in t.arrays:
                shape = a.type.shape
                if a.role == "eps_x":
                    rel = graph.relation_by_id[t.relations[0]]
                    op = graph.op_by_name[rel.op]
                    sp = spec(shape, a.id, 0 if op.batched else None)
                elif a.role in ("m", "u_h"):
                    # an influence block / a UORO hidden factor of one hidden state: the
                    # state's batch axis splits; its neurons stay whole (the recursion
                    # mixes them: J·M over the coupled states)
                    bd, _ = group_dims(a.group, len(graph.group_by_id[a.group].varshape))
                    sp = spec(shape, a.id, bd)
                elif a.role == "u_p":
                    # a UORO parameter factor, one per example: (batch,) + leaf
                    sp = spec(shape, a.id, 0 if graph.batch else None)
                else:
                    rel = graph.relation_by_id[a.relation]
                    op = graph.op_by_name[rel.op]
                    b = batch_shape(graph, a.group, op)
                    bd = 0 if b else None
                    if a.role == "eps_f":
                        nd = len(shape) - 2 if len(shape) - 1 > len(b) else None
                    elif t.layout in ("dense", "channel"):
                        nd = len(b) + len(neuron_shape(op)) - 1 if neuron_shape(op) else None
                    else:
                        _, lt = param_leaves(graph, rel.param)[a.leaf]
                        nd = len(b) + len(lt.shape) - 1 if columns(op, lt.shape) else None
                    sp = spec(shape, a.id, bd, nd)
                arrays.append(dataclasses.replace(a, sharding=sp))
            traces.append(dataclasses.replace(t, arrays=tuple(arrays)))
        ctx.note(self.name, f"mesh {', '.join(f'{n}={k}' for n, k in mesh)}: batch over "
                            f"{self.batch or '-'}, neurons over {self.neurons or '-'}")
        for n in notes:
            ctx.note(self.name, n)
        return graph.replace(inputs=inputs, hidden=tuple(hidden), params=tuple(params),
                             traces=tuple(traces), mesh=mesh)
