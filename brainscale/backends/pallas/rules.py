"""The Pallas D-RTRL rule: param-dim compact traces of matmul ops on the kernels.

Registered in the trace-rule table for ``('param', 'compact', 'pallas')`` (compiled Triton)
and ``('param', 'compact', 'pallas-interpret')`` (interpret mode, CPU tests). For every
(relation, group) of its traces the weight leaf's stacked ``(B, I, O, k)`` array goes to
:func:`~.drtrl.drtrl_multi`, one launch per group of equal shapes; the other leaves (the
bias, O(B·O·k)) take the op's fused JAX rules. As a learner step (custom VJP) that is the
update kernel in the forward and the contraction kernel in the backward: three trace
passes, like the JAX rule. ``one_pass`` is the read-once/write-once kernel used by the
step-owning driver (``fused_online_gradients``), where δ is known in the same step.
"""
from __future__ import annotations

import jax

from ..rules import TraceRule, param_blocks, register_trace_rule
from ..linearize import sg
from ..rules import chain_is_one
from ._common import Tiles
from .cost_model import load_cost_model
from .drtrl import DrtrlItem, drtrl_multi, drtrl_tiles
from .select import launch_groups, weight_leaf

__all__ = ["PallasDrtrlRule"]


class PallasDrtrlRule(TraceRule):
    """See the module docstring."""
    name = "param/compact/pallas"
    interpret = False

    def _tiles(self, storage: str) -> Tiles:
        tiles = getattr(self.backend, "tiles", None)
        if tiles is not None:
            return tiles
        model = load_cost_model(getattr(self.backend, "cost_model", "") or "")
        return model.tiles_for(storage)

    def check(self, graph, trace) -> str | None:
        from .select import kernel_instances
        _, why = kernel_instances(graph, trace)
        if why:
            return f"the Pallas kernels cannot run it: {why}"
        for blk in param_blocks(graph, trace):
            wli = weight_leaf(graph.param_by_name[blk.param].type)[0]
            if (wli, None) not in {(li, si) for li, si, _, _ in blk.slots}:
                return (f"the kernel reads the weight trace of {blk.rid}/{blk.gid} with its k "
                        f"states stacked (B, I, O, k), but the IR keeps them as separate "
                        f"arrays; lay it out with stacked_leaves=('weight',) (pallas-select does)")
        return None

    # -- the blocks of one call ---------------------------------------------------------
    def _blocks(self, ctx, traces, arrays):
        g = ctx.graph
        out = []
        for ti, (t, vals) in enumerate(zip(traces, arrays)):
            for blk in param_blocks(g, t):
                leaves = g.param_by_name[blk.param].type
                wli, _, _ = weight_leaf(leaves)
                lk = {(li, si): pos for li, si, pos, _ in blk.slots}
                names = [n for n, _ in getattr(leaves, "fields", (("", leaves),))]
                out.append((ti, blk, wli, lk[(wli, None)], names, lk))
        return out

    def _rest(self, blk, wli, names, lk, vals, arrays_meta):
        """Per-state trees of the non-weight leaves (``[{name: value}] * k``), or None."""
        others = [li for li in range(blk.n_leaves) if li != wli]
        if not others:
            return None
        per = []
        for si in range(blk.k):
            d = {}
            for li in others:
                if (li, si) in lk:
                    pos = lk[(li, si)]
                    d[names[li]] = vals[pos].astype(arrays_meta[pos].type.dtype)
                else:
                    pos = lk[(li, None)]
                    d[names[li]] = vals[pos][..., si].astype(arrays_meta[pos].type.dtype)
            per.append(d)
        return per

    def _launch(self, items, update: bool, grad: bool):
        """One launch of the kernel over equal-shaped traces: ``[(eps_new, grad)]``."""
        storage = str(items[0].eps.dtype)
        return drtrl_multi(items, update=update, grad=grad, tiles=self._tiles(storage),
                           interpret=self.interpret)

    def _run(self, ctx, traces, arrays, delta, update: bool, grad: bool, acc_t=None):
        """Launch the kernels over all blocks; returns (new arrays per trace, gradient terms,
        acc_t)."""
        fwd = ctx.fwd
        blocks = self._blocks(ctx, traces, arrays)
        new = [list(v) for v in arrays]
        terms = []
        groups: dict = {}
        for entry in blocks:
            ti, blk, wli, wpos, names, lk = entry
            eps = arrays[ti][wpos]
            B = eps.shape[0] if eps.ndim == 4 else 1
            key = (B,) + tuple(eps.shape[-3:]) + (str(eps.dtype),)
            groups.setdefault(key, []).append(entry)
        claimed = set()
        for members in groups.values():
            items = []
            for ti, blk, wli, wpos, names, lk in members:
                op = ctx.op(blk.op)
                w = ctx.w(blk.param)
                weight = w["weight"] if isinstance(w, dict) else w
                it = DrtrlItem(arrays[ti][wpos])
                if update:
                    it.J = fwd.J[blk.gid]
                    it.df = fwd.DF[(blk.op, blk.gid)]
                    it.x = sg(fwd.xs[blk.op])
                    if not chain_is_one(op):
                        it.c = op._chain(weight)
                if grad:
                    it.delta = ctx.signals.group_delta(blk.gid, delta)
                    pi = ctx.binding.tparam_pos(blk.param)
                    if acc_t is not None and (pi, wli) not in claimed:
                        claimed.add((pi, wli))
                        it.grad_acc = acc_t[pi][wli]
                items.append(it)
            outs = self._launch(items, update, grad)
            for (ti, blk, wli, wpos, names, lk), it, (e_new, g_w) in zip(members, items, outs):
                op = ctx.op(blk.op)
                w = ctx.w(blk.param)
                pi = ctx.binding.tparam_pos(blk.param)
                meta = traces[ti].arrays
                rest = self._rest(blk, wli, names, lk, arrays[ti], meta)
                if update:
                    new[ti][wpos] = e_new
                    if rest is not None:
                        upd = op.drtrl_update(rest, fwd.J[blk.gid], fwd.DF[(blk.op, blk.gid)],
                                              sg(fwd.xs[blk.op]), w)
                        for si, tree in enumerate(upd):
                            for n, v in tree.items():
                                li = names.index(n)
                                if (li, si) in lk:
                                    new[ti][lk[(li, si)]] = v
                        for li in range(blk.n_leaves):
                            if li != wli and (li, None) in lk:
                                new[ti][lk[(li, None)]] = jax.numpy.stack(
                                    [upd[si][names[li]] for si in range(blk.k)], axis=-1)
                        rest = upd
                if grad:
                    if acc_t is not None and it.grad_acc is not None:
                        acc_t[pi][wli] = g_w.astype(acc_t[pi][wli].dtype)
                    elif acc_t is not None:
                        acc_t[pi][wli] = acc_t[pi][wli] + g_w.astype(acc_t[pi][wli].dtype)
                    else:
                        terms.append((pi, wli, g_w))
                    if rest is not None:
                        dg = ctx.signals.group_delta(blk.gid, delta)
                        for n, v in op.drtrl_grad(rest, dg, w).items():
                            li = names.index(n)
                            if acc_t is not None:
                                acc_t[pi][li] = acc_t[pi][li] + v.astype(acc_t[pi][li].dtype)
                            else:
                                terms.append((pi, li, v))
        return new, terms, acc_t

    # -- the rule -------------------------------------------------------------------------
    def update(self, ctx, traces, arrays):
        return self._run(ctx, traces, arrays, None, True, False)[0]

    def grad(self, ctx, traces, arrays, delta):
        return self._run(ctx, traces, arrays, delta, False, True)[1]

    def one_pass(self, ctx, traces, arrays, delta, acc_t):
        """Update from the old arrays and add the gradient of the new ones into ``acc_t``
        (lists per trace parameter) in one kernel sweep; returns ``(new arrays, acc_t)``."""
        acc_t = [list(a) for a in acc_t]
        new, _, acc_t = self._run(ctx, traces, arrays, delta, True, True, acc_t)
        return new, acc_t

    def notes(self, graph, traces) -> tuple:
        mode = "interpret" if self.interpret else "gpu (Triton)"
        model = load_cost_model(getattr(self.backend, "cost_model", "") or "")
        out = [f"pallas mode: {mode}; cost model: {model.source}"]
        groups = launch_groups(graph)
        keys = list(groups)
        for t in traces:
            line = f"{t.id} ({t.dim}): path={t.path}"
            for key, members in groups.items():
                for tid, rid, gid in members:
                    if tid != t.id:
                        continue
                    B, I, O, k, st = key
                    tl = drtrl_tiles(B, I, O, k, self._tiles(st))
                    line += (f"; {rid}/{gid} launch L{keys.index(key)} (x{len(members)}) "
                             f"B={B} I={I} O={O} k={k} storage={st} tiles "
                             f"bb={tl['bb']} bi={tl['bi']} bo={tl['bo']} grid={tl['grid']}"
                             f"{' padded' if tl['padded'] else ''}"
                             f"{' chain' if not chain_is_one(graph.op_object(graph.relation_by_id[rid].op)) else ''}")
            out.append(line + f" — {t.attr('path_reason', '')}")
        return tuple(out)


@register_trace_rule("param", "compact", "pallas")
class PallasGpuRule(PallasDrtrlRule):
    name = "param/compact/pallas"
    interpret = False


@register_trace_rule("param", "compact", "pallas-interpret")
class PallasInterpretRule(PallasDrtrlRule):
    name = "param/compact/pallas-interpret"
    interpret = True

