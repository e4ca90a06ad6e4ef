"""The Pallas backend: the JAX backend's step with D-RTRL traces routed to Pallas kernels.

``PallasBackend`` emits the same custom-VJP step as :class:`~brainscale.backends.JaxBackend`
(same learning signals, same io-dim and JAX-path traces) but, for every param-dim trace that
the ``pallas-select`` pass sent to ``path=pallas``:

* forward: one :func:`~.drtrl.drtrl_multi` launch per group of equal-shaped traces updates the
  weight traces in place (decay by J + new outer product);
* backward: one launch per group contracts them with the learning signal δ.

The bias leaves of such traces (O(B·O·k), negligible) stay on the op's fused JAX rules.
A custom VJP cannot write the trace from its backward, where δ is known, so this is three
trace passes per step, like the JAX path; :func:`.driver.fused_online_gradients` runs the
one-pass kernel instead (docs/pallas.md, "Design").
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ...errors import BackendError
from ..base import Backend, CompiledStep, register_backend
from ..jax_backend import JaxBackend, _Emitter
from ._common import Tiles, platform
from .cost_model import load_cost_model
from .drtrl import DrtrlItem, drtrl_multi, drtrl_tiles
from .select import PallasSelectPass, chain_is_one, kernel_instances, unsupported_traces

__all__ = ["PallasBackend", "AutoBackend", "PallasEmitter"]

sg = jax.lax.stop_gradient


@dataclass
class _KInfo:
    """A kernel-path (relation, group) of a param-dim trace."""
    trace: str
    rid: str
    gid: str
    q: int              # op index
    pi: int             # trace-param index
    idxs: tuple         # indices of all its leaves in the layout's traces
    w_idx: int          # index of the weight leaf's trace
    storage: str
    key: tuple          # launch key (B, I, O, k, storage)
    has_c: bool


class PallasEmitter(_Emitter):
    """:class:`_Emitter` with kernel-path D-RTRL traces (see the module docstring)."""

    def __init__(self, graph, decay, jit, cost_model, tiles: Tiles | None = None):
        self.cost_model = cost_model
        self.tiles_override = tiles
        self._skip_kernel = False      # hide kernel traces from _param_groups (JAX rules)
        self._defer = False            # forward leaves kernel traces alone (one-pass driver)
        self._stash = None             # (J, DF, xs) of the last traced forward
        self.interpret = graph.attr("pallas_mode", "interpret") != "gpu"
        super().__init__(graph, decay, jit)

    # -- layout: kernel traces, their storage dtype and launch groups ----------------------
    def _layout(self):
        g = self.g
        self.kernel: dict = {}
        self.launches: dict = {}
        plan = []
        self._kernel_weight = set()
        for t in g.traces:
            if t.attr("path") != "pallas":
                continue
            inst, why = kernel_instances(g, t)
            if why:
                raise BackendError(f"trace {t.id} is marked path=pallas but the kernels cannot "
                                   f"handle it: {why}")
            storage = t.attr("storage", inst[0].dtype if inst else "float32")
            for i in inst:
                pi = self.tparam_index[g.relation_by_id[i.rid].param]
                self._kernel_weight.add((i.rid, i.gid, _weight_leaf_index(self, pi)))
                plan.append((t, i, pi, storage))
        # the kernel's weight trace keeps its k states in one (B, I, O, k) array; every
        # other leaf (the bias) keeps the JAX layout, one array per state
        super()._layout()
        entries = list(self.L.traces)
        for t, i, pi, storage in plan:
            q = self.op_index[g.relation_by_id[i.rid].op]
            slots = self.pslots[(i.rid, i.gid)]
            idxs = tuple(sorted(slots.values()))
            for ti in idxs:
                entries[ti] = entries[ti][:-1] + (jnp.dtype(storage).name,)
            key = (i.B, i.I, i.O, i.k, storage)
            w_idx = slots[(_weight_leaf_index(self, pi), "all")]
            ki = _KInfo(t.id, i.rid, i.gid, q, pi, idxs, w_idx, storage, key,
                        not chain_is_one(self.ops[q]))
            self.kernel[(i.rid, i.gid)] = ki
            self.launches.setdefault(key, []).append((i.rid, i.gid))
        self.L.traces = tuple(entries)

    def _merged_states(self, rid, gid, li) -> bool:
        return (rid, gid, li) in self._kernel_weight

    def _tiles(self, storage: str) -> Tiles:
        return self.tiles_override or self.cost_model.tiles_for(storage)

    def _param_groups(self) -> dict:
        res = super()._param_groups()
        if self._skip_kernel:
            res = {k: v for k, v in res.items() if k not in self.kernel}
        return res

    # -- the kernel launches -------------------------------------------------------------
    def _leaf_names(self, ki) -> dict | None:
        """``{leaf name: leaf index}`` of a dict parameter, None for a bare weight."""
        tree = self._w_tree(ki.pi, list(range(len(self.L.tparam_idx[ki.pi]))))
        return {k: int(v) for k, v in tree.items()} if isinstance(tree, dict) else None

    def _bias_tree(self, ki, traces):
        """The per-state trees (a list of k) of the non-weight leaves, or None."""
        names = self._leaf_names(ki)
        if not names or len(names) == 1:
            return None
        slots = self.pslots[(ki.rid, ki.gid)]
        return [{n: traces[slots[(li, si)]] for n, li in names.items() if n != "weight"}
                for si in range(ki.key[3])]

    def _launch(self, theta_t, eps, J, DF, xs, delta, update: bool, grad_acc=None):
        """Run every launch group. ``eps`` holds the traces to read (old ones for an update,
        new ones for a pure contraction). Returns ``{(rid, gid): ({trace index: new trace} |
        None, grad leaves | None)}`` covering weight (kernel) and bias (op's JAX rules)."""
        res = {}
        grad = delta is not None
        for key, members in self.launches.items():
            items = []
            for mk in members:
                ki = self.kernel[mk]
                w = self._w_tree(ki.pi, theta_t[ki.pi])
                it = DrtrlItem(eps[ki.w_idx])
                if update:
                    it.J = J[ki.gid]
                    it.df = DF[(ki.q, ki.gid)]
                    it.x = sg(xs[ki.q])
                    if ki.has_c:
                        it.c = self.ops[ki.q]._chain(w["weight"] if isinstance(w, dict) else w)
                if grad:
                    it.delta = self._group_delta(ki.gid, delta)
                    if grad_acc is not None and mk in grad_acc:
                        it.grad_acc = grad_acc[mk]
                items.append(it)
            outs = drtrl_multi(items, update=update, grad=grad, tiles=self._tiles(key[-1]),
                               interpret=self.interpret)
            for mk, (e_new, g_w) in zip(members, outs):
                ki = self.kernel[mk]
                op = self.ops[ki.q]
                w = self._w_tree(ki.pi, theta_t[ki.pi])
                names = self._leaf_names(ki) or {"weight": 0}
                slots = self.pslots[mk]
                rest = self._bias_tree(ki, eps)
                new_map = grad_leaves = None
                if update:
                    new_map = {ki.w_idx: e_new}
                    if rest is not None:
                        x = sg(xs[ki.q])
                        rest = op.drtrl_update(rest, J[ki.gid], DF[(ki.q, ki.gid)], x, w)
                        for si, tree in enumerate(rest):
                            for n, v in tree.items():
                                ti = slots[(names[n], si)]
                                new_map[ti] = v.astype(eps[ti].dtype)
                if grad:
                    grad_leaves = [None] * len(names)
                    grad_leaves[names["weight"]] = g_w
                    if rest is not None:
                        for n, v in op.drtrl_grad(rest, self._group_delta(ki.gid, delta),
                                                  w).items():
                            grad_leaves[names[n]] = v
                res[mk] = (new_map, grad_leaves)
        return res

    # -- forward / backward hooks ----------------------------------------------------------
    def _update_traces(self, theta_t, traces, J, DF, xs):
        self._stash = (J, DF, xs)
        self._skip_kernel = True
        try:
            out = super()._update_traces(theta_t, traces, J, DF, xs)
        finally:
            self._skip_kernel = False
        if self._defer or not self.kernel:
            return out
        for mk, (new_map, _) in self._launch(theta_t, traces, J, DF, xs, None, True).items():
            for ti, leaf in new_map.items():
                out[ti] = leaf.astype(traces[ti].dtype)
        return out

    def _param_trace_grads(self, g_t, theta_t, new_traces, delta, groups=None):
        jax_keys = {k for k in _Emitter._param_groups(self) if k not in self.kernel}
        if groups is not None:
            jax_keys &= set(groups)
        super()._param_trace_grads(g_t, theta_t, new_traces, delta, groups=jax_keys)
        if not self.kernel or (groups is not None and not set(groups) & set(self.kernel)):
            return
        for mk, (_, gl) in self._launch(theta_t, new_traces, None, None, None, delta,
                                         False).items():
            ki = self.kernel[mk]
            for li, leaf in enumerate(gl):
                g_t[ki.pi][li] = g_t[ki.pi][li] + leaf.astype(g_t[ki.pi][li].dtype)

    # -- assembly ------------------------------------------------------------------------
    def notes(self) -> tuple:
        g = self.g
        mode = "interpret" if self.interpret else "gpu (Triton)"
        out = [f"pallas mode: {mode}; cost model: {self.cost_model.source}"]
        for t in g.traces:
            line = f"{t.id} ({t.dim}): path={t.attr('path', 'jax')}"
            if t.attr("path") == "pallas":
                for (rid, gid), ki in self.kernel.items():
                    if ki.trace == t.id:
                        B, I, O, k, st = ki.key
                        tl = drtrl_tiles(B, I, O, k, self._tiles(st))
                        lid = list(self.launches).index(ki.key)
                        line += (f"; {rid}/{gid} launch L{lid} (x{len(self.launches[ki.key])}) "
                                 f"B={B} I={I} O={O} k={k} storage={st} tiles "
                                 f"bb={tl['bb']} bi={tl['bi']} bo={tl['bo']} grid={tl['grid']}"
                                 f"{' padded' if tl['padded'] else ''}"
                                 f"{' chain' if ki.has_c else ''}")
            out.append(line + f" — {t.attr('path_reason', '')}")
        return tuple(out)

    def build(self) -> CompiledStep:
        step = super().build()
        step.backend = "pallas"
        step.notes = tuple(step.notes) + self.notes()
        return step


def _weight_leaf_index(em, pi) -> int:
    tree = em._w_tree(pi, list(range(em.w_treedef[pi].num_leaves)))
    if isinstance(tree, dict):
        return int(tree["weight"])
    return 0


@register_backend
class PallasBackend(Backend):
    """JAX backend + Pallas D-RTRL kernels, chosen per trace by the ``pallas-select`` pass.

    Args:
        select: 'auto' (cost model on a GPU; every supported trace in interpret mode),
            'all' (every supported trace) or 'none'.
        trace_dtype: storage of kernel-path traces, 'float32' or 'bfloat16' (math is f32).
        scheme: which threshold of the cost model applies: 'learner' (the custom-VJP step)
            or 'fused' (:func:`fused_online_gradients`).
        cost_model: path of a ``tools/pallas_bench.py`` JSON ('' / None: built-in, or
            ``$BRAINSCALE_PALLAS_COST_MODEL``).
        min_bytes: threshold override (bytes of a trace's kernel arrays).
        interpret: force interpret mode on/off (None: on exactly when there is no usable GPU).
        tiles: a :class:`Tiles` for every launch (default: the cost model's per dtype).
        jit: jit the step (as the JAX backend).
    """
    name = "pallas"

    def __init__(self, select: str = "auto", trace_dtype: str = "float32",
                 scheme: str = "learner", cost_model: str | None = None,
                 min_bytes: float | None = None, interpret: bool | None = None,
                 tiles: Tiles | None = None, jit: bool = True):
        self.select = select
        self.trace_dtype = trace_dtype
        self.scheme = scheme
        self.cost_model = cost_model or ""
        self.min_bytes = min_bytes
        self.interpret = interpret
        self.tiles = tiles
        self.jit = jit

    def pipeline(self) -> tuple:
        return (PallasSelectPass(select=self.select, trace_dtype=self.trace_dtype,
                                 scheme=self.scheme, cost_model=self.cost_model,
                                 min_bytes=self.min_bytes, interpret=self.interpret),)

    def unsupported(self, graph) -> tuple:
        return unsupported_traces(graph)

    def prepare(self, graph):
        """The graph after this backend's pipeline (run here when the caller did not)."""
        if "backend-paths" in graph.facts:
            return graph
        from ...passes.base import PassManager
        return PassManager(self.pipeline()).run(graph)

    def emit(self, graph, decay: float | None = None) -> CompiledStep:
        if "trace-dims" not in graph.facts:
            raise BackendError("the graph has no trace dims: run the 'select-dims' pass "
                               "(part of the default pipeline) before emitting")
        if graph.info is None:
            raise BackendError("the graph carries no traced step (StepInfo)")
        graph = self.prepare(graph)
        return PallasEmitter(graph, decay, self.jit, load_cost_model(self.cost_model),
                             self.tiles).build()


@register_backend
class AutoBackend(Backend):
    """``backend='auto'``: :class:`PallasBackend` on a CUDA GPU with Triton support (cc >= 8),
    :class:`JaxBackend` elsewhere. Options go to the Pallas backend."""
    name = "auto"

    def __init__(self, **options):
        plat = platform()
        self.impl = PallasBackend(**options) if plat.kind == "gpu" else \
            JaxBackend(jit=options.get("jit", True))
        self.reason = plat.reason

    def pipeline(self) -> tuple:
        return self.impl.pipeline()

    def unsupported(self, graph) -> tuple:
        return self.impl.unsupported(graph)

    def emit(self, graph, decay: float | None = None) -> CompiledStep:
        step = self.impl.emit(graph, decay)
        step.notes = tuple(step.notes) + (f"auto backend: {step.backend} ({self.reason})",)
        return step
