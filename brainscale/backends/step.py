"""Emission of the compiled online-learning step from a laid-out graph.

A :class:`Program` is the step of one graph as data: the :class:`~.binding.StepBinding`,
the :class:`~.linearize.Linearizer` (forward: ``J``, ``df``, op inputs), the
:class:`~.signals.Signals` (backward: ``δ``, instantaneous gradients) and the plan, which
maps every trace to the rule of its ``(dim, layout, path)`` from the trace-rule table
(:mod:`.rules`). :func:`emit_step` wraps a program into a jitted function with a custom VJP:
the forward advances hidden states and trace arrays, the backward returns the online
gradients. Nothing here looks at anything but the graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..errors import BackendError
from .base import CompiledStep
from .binding import StepBinding
from .linearize import Linearizer
from .rules import RuleContext, TraceRule, make_rule, rule_key
from .signals import Signals, is_float, zero_cotangent

__all__ = ["Program", "PlanEntry", "emit_step", "check_emittable"]


@dataclass(frozen=True)
class PlanEntry:
    """The traces one rule runs, with the positions of their arrays in the step's list."""
    rule: TraceRule
    traces: tuple
    positions: tuple            # per trace: positions into binding.arrays


def check_emittable(graph) -> None:
    if graph.info is None:
        raise BackendError("the graph carries no traced step (StepInfo); lower it with "
                           "brainscale.lower(model, *inputs)")
    if "trace-dims" not in graph.facts:
        raise BackendError("the graph has no trace dims: run the 'select-dims' pass "
                           "(part of the default pipeline) before emitting")
    if "trace-arrays" not in graph.facts:
        raise BackendError("the graph's traces have no arrays: run the 'layout-traces' pass "
                           "(last in the default pipeline) before emitting")


class Program:
    """The step of ``graph`` on ``backend`` (see the module docstring)."""

    def __init__(self, graph, backend):
        check_emittable(graph)
        self.g = graph
        self.b = StepBinding.build(graph)
        self.lin = Linearizer(graph, self.b)
        self.sig = Signals(graph, self.b, self.lin)
        rules: dict = {}
        groups: dict = {}
        pos = 0
        for t in graph.traces:
            n = len(t.arrays)
            positions = tuple(range(pos, pos + n))
            pos += n
            if t.dim == "none":
                continue
            key = rule_key(t)
            if key not in rules:
                rules[key] = make_rule(t, backend)
            why = rules[key].check(graph, t)
            if why:
                raise BackendError(f"trace {t.id} (dim={t.dim}, layout={t.layout}, "
                                   f"path={t.path}): {why}")
            groups.setdefault(key, ([], []))
            groups[key][0].append(t)
            groups[key][1].append(positions)
        self.plan = tuple(PlanEntry(rules[k], tuple(ts), tuple(ps))
                          for k, (ts, ps) in groups.items())

    # -- the device mesh (runtime: the IR names its axes and sizes) ----------------------
    mesh = None

    def bind_mesh(self, mesh) -> None:
        """Run on ``mesh``: its axes and sizes must be those the graph was sharded for; the
        new traces and hidden states then keep the IR's shardings inside the step."""
        from ..passes.shard import parse_mesh
        if tuple(parse_mesh(mesh)) != tuple(self.g.mesh):
            raise BackendError(f"the mesh {parse_mesh(mesh)} is not the one the graph was "
                               f"sharded for ({tuple(self.g.mesh)}); shard again")
        self.mesh = mesh

    def constrain(self, v, spec):
        """``v`` laid out as ``spec`` (mesh axis per dimension) on the bound mesh."""
        if spec is None or self.mesh is None:
            return v
        from jax.sharding import NamedSharding, PartitionSpec
        return jax.lax.with_sharding_constraint(v, NamedSharding(self.mesh, PartitionSpec(*spec)))

    # -- pieces ---------------------------------------------------------------------------
    def context(self, theta_t, fwd=None) -> RuleContext:
        return RuleContext(self.g, self.b, self.sig, tuple(theta_t), fwd)

    def _selected(self, skip, skip_trace):
        """``(entry, traces, positions)`` per plan entry not skipped, without the traces
        ``skip_trace`` takes out (a driver that advances those itself)."""
        for e in self.plan:
            if skip(e):
                continue
            sel = [(t, ps) for t, ps in zip(e.traces, e.positions)
                   if skip_trace is None or not skip_trace(t)]
            if sel:
                yield e, [t for t, _ in sel], [ps for _, ps in sel]

    def update_traces(self, ctx, traces, skip=lambda entry: False, skip_trace=None) -> list:
        """New trace arrays (storage dtypes); entries with ``skip(entry)`` and traces with
        ``skip_trace(trace)`` keep the old ones."""
        new = list(traces)
        arrays = self.b.arrays
        for e, ts, pss in self._selected(skip, skip_trace):
            outs = e.rule.update(ctx, ts, [[traces[p] for p in ps] for ps in pss])
            for ps, vals in zip(pss, outs):
                for p, v in zip(ps, vals):
                    new[p] = arrays[p].to_stored(v)
        return new

    def trace_grads(self, ctx, traces, delta, skip=lambda entry: False, skip_trace=None) -> list:
        """``[(param position, leaf, gradient), ...]`` of every rule from the new traces."""
        out = []
        for e, ts, pss in self._selected(skip, skip_trace):
            out.extend(e.rule.grad(ctx, ts, [[traces[p] for p in ps] for ps in pss], delta))
        return out

    def forward(self, theta_t, theta_p, args, hidden, others, traces, skip=lambda e: False,
                skip_trace=None):
        """``((outs, new_hidden, new_others, new_traces), fwd)``. On a mesh (the graph has
        shardings) the new traces and hidden states keep exactly the IR's shardings."""
        b = self.b
        fwd = self.lin.forward(theta_t, theta_p, args, hidden, others)
        new_traces = self.update_traces(self.context(theta_t, fwd), list(traces), skip,
                                        skip_trace)
        outs = fwd.outs
        new_hidden = [outs[i] for i in b.hidden_out]
        if self.mesh is not None:
            new_traces = [self.constrain(v, a.stored_sharding)
                          for v, a in zip(new_traces, b.arrays)]
            new_hidden = [self.constrain(v, h.sharding) for v, h in zip(new_hidden, self.g.hidden)]
        return ((tuple(outs[:b.n_out]), tuple(new_hidden),
                 tuple(outs[i] for i in b.other_out), tuple(new_traces)), fwd)

    @staticmethod
    def add_grads(g_t, contributions) -> None:
        for pi, li, leaf in contributions:
            g_t[pi][li] = g_t[pi][li] + leaf.astype(g_t[pi][li].dtype)

    def backward(self, res, cts):
        theta_t, theta_p, args, hidden, others, traces_old, new_traces, xs = res
        delta, d_zeta, g_t, g_p, g_a = self.sig.learning_signals(theta_t, theta_p, args, hidden,
                                                                 others, cts)
        ctx = self.context(theta_t)
        self.add_grads(g_t, self.trace_grads(ctx, list(new_traces), delta))
        xs_map = {o.name: x for o, x in zip(self.g.ops, xs)}
        self.add_grads(g_t, self.sig.direct_grads(theta_t, xs_map, d_zeta))
        ct_args = tuple(ga if is_float(a) else zero_cotangent(a) for ga, a in zip(g_a, args))
        return (tuple(tuple(x) for x in g_t), tuple(tuple(x) for x in g_p), ct_args,
                tuple(zero_cotangent(h) for h in hidden), tuple(zero_cotangent(o) for o in others),
                tuple(zero_cotangent(t) for t in traces_old))

    def notes(self) -> tuple:
        out = []
        for e in self.plan:
            out.append(f"rule {e.rule.name}: {', '.join(t.id for t in e.traces)}")
            out.extend(e.rule.notes(self.g, e.traces))
        return tuple(out)


def emit_step(graph, backend, jit: bool = True, notes: tuple = ()) -> CompiledStep:
    """Emit the compiled step of a laid-out ``graph`` with the rules of ``backend``."""
    prog = Program(graph, backend)

    @jax.custom_vjp
    def step(theta_t, theta_p, args, hidden, others, traces):
        return prog.forward(theta_t, theta_p, args, hidden, others, traces)[0]

    def fwd(theta_t, theta_p, args, hidden, others, traces):
        outs, f = prog.forward(theta_t, theta_p, args, hidden, others, traces)
        xs = tuple(f.xs[o.name] if f.xs[o.name] is not None else jnp.zeros(()) for o in graph.ops)
        res = (theta_t, theta_p, args, hidden, others, traces, outs[3], xs)
        return outs, res

    step.defvjp(fwd, prog.backward)
    fn = jax.jit(step) if jit else step
    arrays = prog.b.arrays
    lines = tuple(f"{a.id}: {a.role} {a.stored_type}" for a in arrays)
    return CompiledStep(graph, getattr(backend, "name", str(backend)), fn, prog.b, prog,
                        lines + prog.notes() + tuple(notes))
