"""The ``jax-zoo`` backend: the JAX step extended for every point of the rule axes.

:class:`ZooProgram` is :class:`~.step.Program` (same binding, linearizer, signals and rule
plan from the trace-rule table) with what the rules of :mod:`brainscale.zoo` need beyond
D-RTRL / ES-D-RTRL:

* **forward**: the full step linearisation (every path, op inputs included) for the
  influence rules (:mod:`.rules_rtrl`: exact RTRL, SnAp-n, OSTL's coupled scope, UORO); the
  diagonal ``J`` / ``df`` are computed only for the diagonal traces;
* **backward**: per trace, the learning signal its ``signal`` axis names —
  ``symmetric`` (``δ = ∂L^t/∂h^t`` from the dual evaluation, as on the ``jax`` backend),
  ``random`` (the same through fixed random feedback weights, :class:`~.signals.FeedbackSignals`),
  ``modulatory`` (the user's modulator in place of δ) or ``synthetic`` (δ plus a learned
  synthetic gradient ``ĝ(h^t)`` of the future losses, DNI) — and, for the influence rules,
  the VJP of the whole step and the old trace arrays (their exact gradient formula);
* an auxiliary per-call input ``aux`` (a dict): ``key`` (a PRNG key for UORO),
  ``modulator`` (three-factor), ``sg`` (the synthetic-gradient parameters, whose cotangent
  is the gradient of their online regression loss).

For a graph of default-axis traces the step computes what the ``jax`` backend's does (the
same rules, the same signals). The step function takes ``aux`` as a 7th argument (optional).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import BackendError
from .base import CompiledStep, register_backend
from .jax_backend import JaxBackend
from .block import block_plan, structured_block
from .linearize import block_jacobian, full_linearize
from .rules import RuleContext
from . import rules_rtrl as _rules_rtrl  # noqa: F401  (registers the influence rules)
from . import rules_zoo as _rules_zoo  # noqa: F401    (registers the diagonal variants)
from .signals import FeedbackSignals, full_vjp, is_float, output_cotangents, zero_cotangent
from .step import Program

__all__ = ["ZooProgram", "ZooBackend", "emit_zoo_step", "LINEAR_IN_X"]

#: op kinds whose output is linear in the input: random feedback replaces their weights
LINEAR_IN_X = ("dense", "sparse", "conv", "lora")


class ZooProgram(Program):
    """:class:`~.step.Program` for every rule axis (see the module docstring)."""

    def __init__(self, graph, backend, feedback_seed: int = 0):
        super().__init__(graph, backend)
        full = [e for e in self.plan if e.rule.needs_program == "full-step"]
        full_rel = {rid for e in full for t in e.traces for rid in t.relations}
        # the diagonal linearisation only for the diagonal traces
        self.lin.traced = [r for r in self.lin.traced if r.id not in full_rel]
        self.needs_full = bool(full)
        #: groups of scope=block traces: the step computes their block of the full Jacobian
        self.block_groups = tuple(dict.fromkeys(
            gid for e in self.plan for t in e.traces if t.scope == "block"
            for rid in t.relations for gid in graph.relation_by_id[rid].groups))
        # per group: the structured block (module block) where proven, else the general one
        self.block_plans, self.block_notes = {}, []
        for gid in self.block_groups:
            plan, why = block_plan(self, gid)
            if plan is None:
                self.block_notes.append(f"scope=block {gid}: one JVP of the step per neuron "
                                        f"and state ({why})")
                continue
            self.block_plans[gid] = plan
            self.block_notes.append(f"scope=block {gid}: structured (J, df and the input "
                                    f"tangents of {', '.join(plan.ops) or 'no op'})")
        self.lin.x_tangents = tuple((q, gid) for gid, pl in self.block_plans.items()
                                    for q in pl.ops)
        #: relations whose gradient is read out through the step's VJP (readout=step): the
        #: influence rules do it themselves (``full_vjp``); for the per-neuron traces the
        #: step contracts the previous arrays with ∂L^t/∂h^{t-1} and adds ∂L^t/∂θ|h
        self.exact_rels = {rid for e in self.plan for t in e.traces if t.readout == "step"
                           for rid in t.relations}
        self.step_read = [i for i, e in enumerate(self.plan)
                          if e.traces[0].readout == "step" and not getattr(e.rule, "full_vjp", False)]
        #: the signals whose full-step VJP the backward takes (symmetric: the step's cotangents;
        #: synthetic: plus ĝ(h^t) at the new states)
        self.vjp_signals = {t.signal for i in self.step_read for t in self.plan[i].traces}
        self.needs_vjp = "symmetric" in self.vjp_signals or any(
            getattr(e.rule, "full_vjp", False) and e.traces[0].readout == "step"
            for e in self.plan)
        self.signals_used = {t.signal for e in self.plan for t in e.traces}
        self.feedback = self._feedback_weights(feedback_seed) \
            if "random" in self.signals_used else {}
        self.fb_sig = FeedbackSignals(graph, self.b, self.lin, self.feedback) \
            if "random" in self.signals_used else None
        self.sg_groups = tuple(sorted(
            {gid for e in self.plan for t in e.traces if t.signal == "synthetic"
             for rid in t.relations for gid in graph.relation_by_id[rid].groups},
            key=lambda s: int(s[1:])))
        for e in self.plan:
            prep = getattr(e.rule, "prepare", None)
            if prep is not None:
                prep(self, e.traces)

    def notes(self) -> tuple:
        return super().notes() + tuple(self.block_notes)

    # -- what the learner must provide -------------------------------------------------
    def _feedback_weights(self, seed: int) -> dict:
        """Fixed random feedback weights ``B`` (same shapes as the op's parameter leaves,
        Gaussian with the leaf's standard deviation) for every op whose input depends on a
        hidden state: the ops the learning signal crosses."""
        g = self.g
        info_states = g.info.states
        hidden = {h.name for h in g.hidden}
        out = {}
        for q, o in enumerate(g.ops):
            if o.x is None or not (set(g.value_by_name[o.x].deps) & hidden):
                continue
            if o.kind not in LINEAR_IN_X:
                raise BackendError(
                    f"signal=random replaces the weights of op {o.name} ({o.op_class}) in the "
                    f"backward by fixed random feedback weights, which needs an op linear in "
                    f"its input ({', '.join(LINEAR_IN_X)}); {o.op_class} is {o.kind}")
            rng = np.random.RandomState(int(seed) * 7919 + q)
            st = info_states[g.param_by_name[o.param].state_index]
            leaves = jax.tree.leaves(st.value)
            out[o.name] = [jnp.asarray(rng.randn(*np.shape(l)) * (float(np.std(np.asarray(l)))
                                                                 or 1.0), jnp.result_type(l))
                           for l in leaves]
        return out

    def synthetic_shapes(self) -> dict:
        """``{group id: (batch, n)}``: the synthetic-gradient module of each group with a
        ``signal=synthetic`` trace maps the group's ``n`` values per example (its states
        stacked) to ``n`` values (a linear map ``(n, n)`` plus a bias)."""
        out = {}
        for gid in self.sg_groups:
            grp = self.g.group_by_id[gid]
            vs = tuple(grp.varshape)
            bat = (int(self.g.batch),) if self.g.batch else ()
            n = int(np.prod(vs[len(bat):], dtype=np.int64)) * grp.num_state
            out[gid] = (bat, n)
        return out

    def needs_key(self) -> bool:
        return any(t.dim == "random" for e in self.plan for t in e.traces)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, theta_t, theta_p, args, hidden, others, traces, skip=lambda e: False,
                aux=None, skip_trace=None):
        b = self.b
        fwd = self.lin.forward(theta_t, theta_p, args, hidden, others)
        step = {"aux": aux, "inputs": (theta_t, theta_p, args, hidden, others)}
        if self.needs_full:
            step["full"] = full_linearize(self.lin, theta_t, theta_p, args, hidden, others)
        if self.block_groups:
            general = tuple(gid for gid in self.block_groups if gid not in self.block_plans)
            step["JB"] = block_jacobian(self.lin, theta_t, theta_p, args, hidden, others,
                                        general) if general else {}
            for gid, plan in self.block_plans.items():
                step["JB"][gid] = structured_block(self, plan, fwd, theta_t)
        ctx = RuleContext(self.g, b, self.sig, tuple(theta_t), fwd, step)
        new_traces = self.update_traces(ctx, list(traces), skip, skip_trace)
        outs = fwd.outs
        new_hidden = [outs[i] for i in b.hidden_out]
        if self.mesh is not None:
            new_traces = [self.constrain(v, a.stored_sharding)
                          for v, a in zip(new_traces, b.arrays)]
            new_hidden = [self.constrain(v, h.sharding) for v, h in zip(new_hidden, self.g.hidden)]
        return ((tuple(outs[:b.n_out]), tuple(new_hidden),
                 tuple(outs[i] for i in b.other_out), tuple(new_traces)), fwd)

    # -- backward --------------------------------------------------------------------------
    def _synthetic(self, sg_params, hidden) -> list:
        """``ĝ(h)`` per hidden state (zero outside the synthetic groups)."""
        out = [jnp.zeros(jnp.shape(h), jnp.result_type(h)) for h in hidden]
        hid_pos = self.lin.hid_pos
        for gid, (bat, n) in self.synthetic_shapes().items():
            grp = self.g.group_by_id[gid]
            ks = [hid_pos[s] for s in grp.states]
            hg = jnp.stack([hidden[k] for k in ks], axis=-1).reshape(bat + (n,))
            p = sg_params[gid]
            pred = (hg @ p["weight"] + p["bias"]).reshape(tuple(grp.varshape) + (len(ks),))
            for i, k in enumerate(ks):
                out[k] = pred[..., i].astype(jnp.result_type(hidden[k]))
        return out

    def _sg_grads(self, sg_params, hidden, target) -> dict:
        """Gradient of ``½ Σ ‖ĝ(h^{t-1}) − target‖²`` for every synthetic module."""
        hid_pos = self.lin.hid_pos
        out = {}
        for gid, (bat, n) in self.synthetic_shapes().items():
            ks = [hid_pos[s] for s in self.g.group_by_id[gid].states]
            hg = jnp.stack([hidden[k] for k in ks], axis=-1).reshape(bat + (n,))
            tg = jnp.stack([target[k] for k in ks], axis=-1).reshape(bat + (n,))
            p = sg_params[gid]
            err = hg @ p["weight"] + p["bias"] - jax.lax.stop_gradient(tg)
            hg2, err2 = hg.reshape(-1, n), err.reshape(-1, n)
            out[gid] = {"weight": (hg2.T @ err2).astype(p["weight"].dtype),
                        "bias": jnp.sum(err2, axis=0).astype(p["bias"].dtype)}
        return out

    def backward(self, res, cts):
        (theta_t, theta_p, args, hidden, others, traces_old, new_traces, xs, new_hidden,
         aux) = res
        aux = aux or {}
        outputs = bool(self.lin.out_var)
        res_sig = self.sig.learning_signals(theta_t, theta_p, args, hidden, others, cts,
                                            outputs=outputs)
        delta, d_zeta, g_t, g_p, g_a = res_sig[:5]
        deltas = {"symmetric": delta}
        d_out = {"symmetric": res_sig[5]} if outputs else {}
        if "random" in self.signals_used:
            res_fb = self.fb_sig.learning_signals(theta_t, theta_p, args, hidden, others, cts,
                                                  outputs=outputs)
            deltas["random"] = res_fb[0]
            if outputs:
                d_out["random"] = res_fb[5]
        if "modulatory" in self.signals_used:
            m = aux.get("modulator")
            if m is None:
                raise BackendError("a signal=modulatory trace needs the modulator: call the "
                                   "learner as learner(x, modulator=m)")
            deltas["modulatory"] = [jnp.broadcast_to(jnp.asarray(m, jnp.result_type(h)),
                                                     jnp.shape(h)) for h in hidden]
        jaxpr = self.lin.jaxpr
        ct_aux = jax.tree.map(zero_cotangent, aux)
        vjps = {}
        if "synthetic" in self.signals_used:
            sgp = aux.get("sg")
            if sgp is None:
                raise BackendError("a signal=synthetic trace needs its synthetic-gradient "
                                   "parameters: call the learner (brainscale.zoo.DNIAlgorithm)")
            ghat = [jax.lax.stop_gradient(v) for v in self._synthetic(sgp, new_hidden)]
            deltas["synthetic"] = [d + gh for d, gh in zip(delta, ghat)]
            # the bootstrapped target of ĝ(h^{t-1}): ∂(L^t + ĝ(h^t)·h^t)/∂h^{t-1}
            vjps["synthetic"] = full_vjp(self.lin, theta_t, theta_p, args, hidden, others,
                                         output_cotangents(self.b, jaxpr, cts,
                                                           extra_hidden=ghat))
            target = vjps["synthetic"][0]
            ct_aux = dict(ct_aux)
            ct_aux["sg"] = self._sg_grads(sgp, hidden, target)
        step = {"aux": aux, "old": {}}
        if outputs:     # filter=kappa_out: L = ∂L^t/∂z^t, and the states' own cotangents
            step["d_out"], step["ct_hidden"] = d_out, cts[1]
        if self.needs_vjp:
            vjps["symmetric"] = step["vjp"] = full_vjp(
                self.lin, theta_t, theta_p, args, hidden, others,
                output_cotangents(self.b, jaxpr, cts))
        for e in self.plan:
            for t, ps in zip(e.traces, e.positions):
                step["old"][t.id] = [traces_old[p] for p in ps]
        ctx = RuleContext(self.g, self.b, self.sig, tuple(theta_t), None, step)
        inst = {}               # readout=step: ∂L^t/∂θ|h of each parameter, once
        for i, e in enumerate(self.plan):
            sig = e.traces[0].signal
            if i in self.step_read:
                # the last step exact: the previous arrays with ∂L^t/∂h^{t-1}
                dh_prev, dtheta = vjps[sig]
                for t in e.traces:
                    for rid in t.relations:
                        pi = self.b.tparam_pos(self.g.relation_by_id[rid].param)
                        inst.setdefault(pi, dtheta[pi])
                self.add_grads(g_t, e.rule.grad(ctx, e.traces,
                                                [[traces_old[p] for p in ps]
                                                 for ps in e.positions], list(dh_prev)))
                continue
            self.add_grads(g_t, e.rule.grad(ctx, e.traces,
                                            [[new_traces[p] for p in ps] for ps in e.positions],
                                            deltas[sig]))
        self.add_grads(g_t, [(pi, li, g) for pi, gs in inst.items() for li, g in enumerate(gs)])
        xs_map = {o.name: x for o, x in zip(self.g.ops, xs)}
        direct = self.sig.direct_grads(theta_t, xs_map, d_zeta)
        exact_params = {self.b.tparam_pos(self.g.relation_by_id[rid].param)
                        for rid in self.exact_rels}
        self.add_grads(g_t, [c for c in direct if c[0] not in exact_params])
        ct_args = tuple(ga if is_float(a) else zero_cotangent(a) for ga, a in zip(g_a, args))
        return (tuple(tuple(x) for x in g_t), tuple(tuple(x) for x in g_p), ct_args,
                tuple(zero_cotangent(h) for h in hidden), tuple(zero_cotangent(o) for o in others),
                tuple(zero_cotangent(t) for t in traces_old), ct_aux)


def emit_zoo_step(graph, backend, jit: bool = True, feedback_seed: int = 0) -> CompiledStep:
    """Emit the ``jax-zoo`` step of a laid-out ``graph`` (see the module docstring)."""
    prog = ZooProgram(graph, backend, feedback_seed)

    @jax.custom_vjp
    def step(theta_t, theta_p, args, hidden, others, traces, aux):
        return prog.forward(theta_t, theta_p, args, hidden, others, traces, aux=aux)[0]

    def fwd(theta_t, theta_p, args, hidden, others, traces, aux):
        outs, f = prog.forward(theta_t, theta_p, args, hidden, others, traces, aux=aux)
        xs = tuple(f.xs[o.name] if f.xs[o.name] is not None else jnp.zeros(()) for o in graph.ops)
        res = (theta_t, theta_p, args, hidden, others, traces, outs[3], xs, outs[1], aux)
        return outs, res

    step.defvjp(fwd, prog.backward)
    run = jax.jit(step) if jit else step

    def fn(theta_t, theta_p, args, hidden, others, traces, aux=None):
        return run(theta_t, theta_p, args, hidden, others, traces, {} if aux is None else aux)

    arrays = prog.b.arrays
    lines = tuple(f"{a.id}: {a.role} {a.stored_type}" for a in arrays)
    return CompiledStep(graph, getattr(backend, "name", str(backend)), fn, prog.b, prog,
                        lines + prog.notes())


@register_backend
class ZooBackend(JaxBackend):
    """The JAX step for every rule axis (see the module docstring)."""
    name = "jax-zoo"
    signals = ("symmetric", "random", "modulatory", "synthetic")
    program_features = ("full-step", "output-signal", "block-jacobian", "step-readout")

    def __init__(self, jit: bool = True, feedback_seed: int = 0):
        super().__init__(jit=jit)
        self.feedback_seed = int(feedback_seed)

    def emit(self, graph) -> CompiledStep:
        return emit_zoo_step(graph, self, self.jit, self.feedback_seed)
