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
        super()._layout()
        g = self.g
        entries = list(self.L.traces)
        self.kernel: dict = {}
        self.launches: dict = {}
        for t in g.traces:
            if t.attr("path") != "pallas":
                continue
            inst, why = kernel_instances(g, t)
            if why:
                raise BackendError(f"trace {t.id} is marked path=pallas but the kernels cannot "
                                   f"handle it: {why}")
            storage = t.attr("storage", inst[0].dtype if inst else "float32")
            for i in inst:
                rel = g.relation_by_id[i.rid]
                q = self.op_index[rel.op]
                pi = self.tparam_index[rel.param]
                idxs = tuple(ti for ti, e in enumerate(entries)
                             if e[0] == "param" and e[1] == i.rid and e[2] == i.gid)
                li_w = _weight_leaf_index(self, pi)
                w_idx = next(ti for ti in idxs if entries[ti][3] == li_w)
                for ti in idxs:
                    entries[ti] = entries[ti][:-1] + (jnp.dtype(storage).name,)
                key = (i.B, i.I, i.O, i.k, storage)
                ki = _KInfo(t.id, i.rid, i.gid, q, pi, idxs, w_idx, storage, key,
                            not chain_is_one(self.ops[q]))
                self.kernel[(i.rid, i.gid)] = ki
                self.launches.setdefault(key, []).append((i.rid, i.gid))
        self.L.traces = tuple(entries)

    def _tiles(self, storage: str) -> Tiles:
        return self.tiles_override or self.cost_model.tiles_for(storage)

    def _param_groups(self) -> dict:
        res = super()._param_groups()
        if self._skip_kernel:
            res = {k: v for k, v in res.items() if k not in self.kernel}
        return res

    # -- the kernel launches -------------------------------------------------------------
    def _bias_tree(self, ki, leaves):
        """The parameter tree of ``leaves`` without its weight (None for a bare weight)."""
        tree = self._w_tree(ki.pi, leaves)
        if not isinstance(tree, dict):
            return None
        rest = {k: v for k, v in tree.items() if k != "weight"}
        return rest or None

    def _full_leaves(self, ki, weight_value, rest):
        tree = dict(rest) if rest else {}
        if isinstance(self._w_tree(ki.pi, [None] * len(ki.idxs)), dict):
            tree["weight"] = weight_value
            return jax.tree.leaves(tree, is_leaf=lambda v: v is None)
        return [weight_value]

    def _launch(self, theta_t, eps, J, DF, xs, delta, update: bool, grad_acc=None):
        """Run every launch group. ``eps`` holds the traces to read (old ones for an update,
        new ones for a pure contraction). Returns ``{(rid, gid): (new leaves | None,
        grad leaves | None)}`` covering weight (kernel) and bias (op's JAX rules)."""
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
                rest = self._bias_tree(ki, [eps[i] for i in ki.idxs])
                new_leaves = grad_leaves = None
                if update:
                    new_rest = None
                    if rest is not None:
                        x = sg(xs[ki.q])
                        new_rest = op.drtrl_update(rest, J[ki.gid], DF[(ki.q, ki.gid)], x, w)
                        new_rest = {k: v.astype(eps[ki.w_idx].dtype) for k, v in new_rest.items()}
                    new_leaves = self._full_leaves(ki, e_new, new_rest)
                    rest = new_rest
                if grad:
                    g_rest = None
                    if rest is not None:
                        g_rest = op.drtrl_grad(rest, self._group_delta(ki.gid, delta), w)
                    grad_leaves = self._full_leaves(ki, g_w, g_rest)
                res[mk] = (new_leaves, grad_leaves)
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
        for mk, (leaves, _) in self._launch(theta_t, traces, J, DF, xs, None, True).items():
            for ti, leaf in zip(self.kernel[mk].idxs, leaves):
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
        step.emitter = self
        return step


def _weight_leaf_index(em, pi) -> int:
    tree = em._w_tree(pi, list(range(len(em.L.tparam_idx[pi]))))
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
