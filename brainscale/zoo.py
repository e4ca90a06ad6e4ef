"""The algorithm zoo: online learning rules as points on the trace-rule axes.

Every rule here is an :class:`~brainscale.algorithms.ETraceAlgorithm` (same
``compile_graph`` / call / ``etrace_of`` / ``reset_state`` API) that only *builds a
pipeline*: its choices become options of ``select-dims`` (the factorisation ``policy`` and
the axes ``recursion``, ``scope``, ``signal``, ``filter``, ``schedule`` with their
coefficients), so ``learner.ir()`` prints them on every trace, and the step is emitted by
the ``jax-zoo`` backend (:mod:`brainscale.backends.zoo_step`), which runs every rule of the
trace-rule table. docs/rules.md places every rule on the axes and says when to use which.

=========================  ================================================================
class (braintrace name)    rule
=========================  ================================================================
:class:`RTRLAlgorithm`     exact RTRL: dense influence matrix over every hidden state,
                           full step Jacobian (``scope=coupled``); equals BPTT
:class:`SnApAlgorithm`     SnAp-n (``SnAp``): the influence kept on its n-step pattern
:class:`UOROAlgorithm`     UORO (``UORO``, ``RandomProjectionVjpAlgorithm``): unbiased
                           rank-1 estimate of RTRL (``policy=random``)
:class:`EPropAlgorithm`    e-prop (``EProp``): D-RTRL's eligibility, symmetric or fixed
                           random feedback (``signal=random``), optional κ filter at the
                           neurons' outputs (``filter=kappa_out``, the paper's) or per
                           state (``filter=kappa``, braintrace's)
:class:`OSTLAlgorithm`     OSTL: the trace of the layer's own states with
                           (``scope=group``) or without the recurrent term
                           (``OSTLRecurrent``: braintrace's form, the D-RTRL trace with
                           each neuron's block of the full step Jacobian, ``scope=block``;
                           and ``OSTLFeedforward``, braintrace's: pp_prop with
                           α = 1e-6, or ``keep_dynamics=True``: the diagonal trace)
:class:`ThreeFactorAlgorithm`  three-factor (``ThreeFactor``): eligibility x a modulator
                           the caller supplies (``signal=modulatory``)
:class:`DNIAlgorithm`      eligibility traces plus a synthetic gradient of the future
                           losses trained online (``DNI``, ``signal=synthetic``)
=========================  ================================================================
"""
from __future__ import annotations

import dataclasses
from typing import Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from ._stepdata import has_multi_step
from .algorithms import ETraceAlgorithm
from .errors import BrainscaleError, PipelineError
from .ir.nodes import INFLUENCE_SCOPES, TRACE_AXES
from .passes.base import parse_pipeline
from .passes.select_dims import SelectDimsPass

__all__ = ["RuleAlgorithm", "RTRLAlgorithm", "SnApAlgorithm", "UOROAlgorithm",
           "EPropAlgorithm", "OSTLAlgorithm", "ThreeFactorAlgorithm", "DNIAlgorithm",
           "SnAp", "UORO", "RandomProjectionVjpAlgorithm", "EProp", "OSTLRecurrent",
           "OSTLFeedforward", "ThreeFactor", "DNI", "RULE_OPTIONS"]

#: the select-dims options a rule algorithm sets (the axes and their coefficients)
RULE_OPTIONS = tuple(TRACE_AXES) + ("kappa", "snap_n", "window")   # readout is an axis


class _RandomKey(brainstate.ShortTermState):
    """The PRNG key a random-projection (UORO) learner draws its Rademacher vectors from."""


def _zoo_backend(backend, feedback_seed: int):
    from .backends import JaxBackend, get_backend
    from .backends.native import NativeBackend, NativeZooBackend
    from .backends.zoo_step import ZooBackend
    if backend == "auto":               # what 'auto' picks here, as the zoo's step
        backend = get_backend("auto").impl
        if type(backend) is JaxBackend:
            backend = "jax"
    if backend in ("jax", "jax-zoo", None):
        return ZooBackend(feedback_seed=feedback_seed)
    if backend == "native" or type(backend) is NativeBackend:
        # the zoo's step (aux inputs, every signal) with the native kernel's selection
        return NativeZooBackend(select=getattr(backend, "select", "all"),
                                jit=getattr(backend, "jit", True), feedback_seed=feedback_seed,
                                **{k: getattr(backend, k) for k in (
                                    "trace_dtype", "io_min_size", "io_min_rows")
                                   if hasattr(backend, k)})
    return backend


class RuleAlgorithm(ETraceAlgorithm):
    """An online rule given by its axes (the base of the zoo; usable directly).

    Args:
        model: the brainstate model (states initialised).
        policy: the factorisation ``select-dims`` chooses: 'param', 'io', 'auto' (hybrid)
            or 'random' (UORO).
        recursion, scope, signal, filter, schedule, kappa, snap_n, window, readout: the rule
            axes (docs/rules.md); None leaves the default (D-RTRL's; ``readout``: ``step`` for
            the exact scopes, else ``trace``).
        feedback_seed: seed of the fixed random feedback weights (``signal='random'``).
        key_seed: seed of the random key of random-projection traces.
        **kw: the options of :class:`~brainscale.algorithms.ETraceAlgorithm`
            (``decay_or_rank``, ``pipeline``, ``backend``, ``memory_budget_mb``,
            ``dim_overrides``, ``instruments``, ...). ``backend='jax'`` means ``'jax-zoo'``,
            ``backend='native'`` the zoo's step with the native D-RTRL kernel, ``'auto'``
            the zoo's form of what it picks.

    Raises:
        PipelineError: the axes do not form a rule, or conflict with the pipeline's
            ``select-dims`` (at ``compile_graph``).
    """

    _policy: str | None = None
    _rule_axes: dict = {}

    def __init__(self, model, *, policy: str | None = None, recursion: str | None = None,
                 scope: str | None = None, signal: str | None = None, filter: str | None = None,
                 schedule: str | None = None, kappa: float | None = None,
                 snap_n: int | None = None, window: int | None = None,
                 readout: str | None = None, feedback_seed: int = 0, key_seed: int = 0, **kw):
        if kw.get("vjp_method", "single-step") != "single-step":
            raise BrainscaleError(
                f"{type(self).__name__} runs one step per call (vjp_method='single-step'): "
                f"its learning signal and traces are per step; multi-step windows run the "
                f"diagonal rules (DiagParamDimAlgorithm / DiagIODimAlgorithm) only")
        self.feedback_seed = int(feedback_seed)
        kw["backend"] = _zoo_backend(kw.get("backend", "jax"), self.feedback_seed)
        super().__init__(model, **kw)
        if policy is not None:
            self._policy = policy
        given = dict(recursion=recursion, scope=scope, signal=signal, filter=filter,
                     schedule=schedule, kappa=kappa, snap_n=snap_n, window=window,
                     readout=readout)
        self.rule_axes = {**self._rule_axes, **{k: v for k, v in given.items() if v is not None}}
        self._user_pipeline = self.pipeline
        self._key = _RandomKey(jax.random.PRNGKey(int(key_seed)))
        self._sg: dict = {}

    # -- the pipeline ---------------------------------------------------------------------
    def rule_pipeline(self) -> tuple:
        """The passes this rule compiles with: the user's pipeline (default:
        ``DEFAULT_PIPELINE``) with the rule's axes in every ``select-dims``.

        Raises:
            PipelineError: a ``select-dims`` of the pipeline sets an axis to another value,
                or the pipeline has none.
        """
        from .passes import DEFAULT_PIPELINE
        passes = parse_pipeline(self._user_pipeline if self._user_pipeline is not None
                                else DEFAULT_PIPELINE)
        if not any(isinstance(p, SelectDimsPass) for p in passes):
            raise PipelineError(
                f"{type(self).__name__} sets the rule axes of select-dims, but the pipeline "
                f"{', '.join(p.spec() for p in passes)} has none; add 'select-dims'")
        defaults = {f: SelectDimsPass.__dataclass_fields__[f].default for f in RULE_OPTIONS}
        out = []
        for p in passes:
            if isinstance(p, SelectDimsPass):
                kw, bad = {}, []
                for k, want in self.rule_axes.items():
                    mine = getattr(p, k)
                    if mine != defaults[k] and mine != want:
                        bad.append(f"{k}={mine} in the pipeline vs {k}={want} from "
                                   f"{type(self).__name__}")
                    kw[k] = want
                if bad:
                    raise PipelineError(f"the pipeline's {p.spec()} conflicts with "
                                        f"{type(self).__name__}: {'; '.join(bad)}. Set the "
                                        f"axis in one place only")
                p = dataclasses.replace(p, **kw)
            out.append(p)
        return tuple(out)

    def compile_graph(self, *args, **kwargs):
        """Compile as :meth:`ETraceAlgorithm.compile_graph`, with the rule's axes in
        ``select-dims`` and the ``jax-zoo`` backend. Returns ``self``."""
        self.pipeline = self.rule_pipeline()
        try:
            super().compile_graph(*args, **kwargs)
        finally:
            self.pipeline = self._user_pipeline
        self._init_synthetic()
        return self

    # -- per-call auxiliary inputs ------------------------------------------------------
    def _init_synthetic(self):
        prog = self._step.program
        shapes = prog.synthetic_shapes() if hasattr(prog, "synthetic_shapes") else {}
        self._sg = {gid: brainstate.ParamState({"weight": jnp.zeros((n, n), jnp.float32),
                                                "bias": jnp.zeros((n,), jnp.float32)})
                    for gid, (_, n) in shapes.items()}

    def _aux(self, modulator=None) -> dict:
        aux: dict = {}
        prog = self._step.program
        if getattr(prog, "needs_key", lambda: False)():
            key, sub = jax.random.split(self._key.value)
            self._key.value = key
            aux["key"] = sub
        if modulator is not None:
            aux["modulator"] = jnp.asarray(modulator)
        if self._sg:
            aux["sg"] = {gid: st.value for gid, st in self._sg.items()}
        return aux

    def update(self, *args, modulator=None, **kwargs):
        """Advance the model one step (hidden states and traces); return its output.

        ``modulator`` is the third factor of a ``signal=modulatory`` rule
        (:class:`ThreeFactorAlgorithm`) for this step.
        """
        self._require()
        if has_multi_step(args, kwargs):
            raise BrainscaleError(f"{type(self).__name__} runs one step per call; call it once "
                                  f"per step instead of with MultiStepData")
        return self._one_step(args, kwargs, self._aux(modulator))

    def __call__(self, *args, **kwargs):
        return self.update(*args, **kwargs)

    # -- inspection -----------------------------------------------------------------------
    def etrace_of(self, param) -> dict:
        """The traces of a parameter, as :meth:`ETraceAlgorithm.etrace_of`; a κ-filtered
        trace gives ``{'eps': ε, 'eps_bar': ē}`` per (relation, group) (``filter=kappa_out``:
        ``ē`` is the filtered eligibility trace at the output, without a state axis), and an
        influence or
        random-projection trace the dict of :meth:`influence_of` under ``'influence'``."""
        self._require()
        g = self.graph
        name = param if isinstance(param, str) else self._param_name(param)
        traces = {g.trace_of_relation[r.id].id: g.trace_of_relation[r.id]
                  for r in g.relations if r.param == name}
        if any(t.dim == "random" or t.scope in INFLUENCE_SCOPES for t in traces.values()):
            return {"influence": self.influence_of(name)}
        if not any(t.filter in ("kappa", "kappa_out") for t in traces.values()):
            return super().etrace_of(param)
        values = self._trace_values()
        out: dict = {}
        for t in traces.values():
            for role in ("eps", "eps_bar"):
                per: dict = {}
                for a in t.arrays:
                    if a.role == role:
                        per.setdefault((a.relation, a.group), {}).setdefault(a.leaf, {})[
                            a.state] = values[a.id]
                for key, leaves in per.items():
                    stacked = [v[None] if None in v else jnp.stack([v[s] for s in sorted(v)], -1)
                               for _, v in sorted(leaves.items())]
                    out.setdefault(key, {})[role] = self._step.binding.w_tree(name, stacked)
        return out

    def influence_of(self, param) -> dict:
        """The influence matrix of a parameter under an influence scope:
        ``{hidden state name: {leaf name: ∂h/∂θ_leaf}}`` (per example: ``varshape + leaf``);
        for a random projection (UORO) the rank-1 product ``s̃ θ̃ᵀ``."""
        self._require()
        g = self.graph
        name = param if isinstance(param, str) else self._param_name(param)
        t = next((t for t in g.traces for rid in t.relations
                  if g.relation_by_id[rid].param == name), None)
        if t is None or not any(a.role in ("m", "u_h") for a in t.arrays):
            raise BrainscaleError(f"{name!r} has no influence trace (scope group / coupled / "
                                  f"sparse, or dim random) in the compiled graph")
        from .ir.layout import param_leaves
        leaves = param_leaves(g, name)
        values = self._trace_values()
        out: dict = {}
        if t.dim == "random":
            ps = {a.leaf: values[a.id] for a in t.arrays if a.role == "u_p"}
            lead = 1 if g.batch else 0
            for a in t.arrays:
                if a.role != "u_h":
                    continue
                h = g.group_by_id[a.group].states[a.state]
                s = values[a.id]
                out[h] = {}
                for li, (ln, lt) in enumerate(leaves):
                    p = ps[li]
                    if lead:
                        m = jax.vmap(jnp.multiply.outer)(s, p)
                    else:
                        m = jnp.multiply.outer(s, p)
                    out[h][ln or "value"] = m
            return out
        for a in t.arrays:
            h = g.group_by_id[a.group].states[a.state]
            out.setdefault(h, {})[leaves[a.leaf][0] or "value"] = values[a.id]
        return out

    def _param_name(self, param) -> str:
        g = self.graph
        idx = [i for i, st in enumerate(g.info.states) if st is param]
        if not idx:
            raise BrainscaleError("this parameter is not read by the compiled step")
        return g.info.state_paths[idx[0]]

    def feedback_weights(self) -> dict:
        """``{op output name: [B leaves]}``: the fixed random feedback weights of
        ``signal='random'`` (empty otherwise), shaped like each op's parameter leaves."""
        self._require()
        return dict(getattr(self._step.program, "feedback", {}))


class RTRLAlgorithm(RuleAlgorithm):
    """Exact real-time recurrent learning.

    Every trace parameter keeps its influence matrix ``∂h/∂θ`` on every hidden state,
    updated with the full step Jacobian (the recurrent weights' paths included):
    ``M^t = ∂F/∂h^{t-1} M^{t-1} + ∂F/∂θ``; the gradient at step ``t`` is
    ``∂L^t/∂θ|_{h^{t-1}} + ∂L^t/∂h^{t-1} M^{t-1}``, so the sum over a sequence equals BPTT's.
    Memory ``B · N · |θ|`` and ``|θ|`` JVPs per step (``select-dims`` prints the bytes): for
    small networks and as the exact reference of the other rules.

    Example::

        learner = brainscale.zoo.RTRLAlgorithm(net)
        learner.compile_graph(x0)
        grads, losses = brainscale.online_gradients(learner, xs, ys, loss_fn)
    """
    _policy = "param"
    _rule_axes = {"scope": "coupled"}


class SnApAlgorithm(RuleAlgorithm):
    """SnAp-n (Menick et al. 2021): RTRL's influence matrix kept on the entries a parameter
    reaches within ``n`` steps of the step's Jacobian pattern (``scope=sparse``). SnAp-1 keeps
    the immediate pattern; as ``n`` grows it approaches RTRL, and at full support (``n`` at
    least the longest path, 2 for a dense recurrent layer) equals it. Stored dense.

    Args:
        model: the brainstate model.
        n: the SnAp order (int >= 1).
    """
    _policy = "param"

    def __init__(self, model, n: int = 2, **kw):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
            raise ValueError(f"SnAp order n must be an int >= 1, got {n!r}")
        super().__init__(model, scope="sparse", snap_n=int(n), **kw)
        self.n = int(n)


class UOROAlgorithm(RuleAlgorithm):
    """Unbiased Online Recurrent Optimization (Tallec & Ollivier 2017): a rank-1 estimate
    ``s̃ θ̃ᵀ`` of RTRL's influence matrix per example, refreshed with random signs each step
    (``policy=random``): memory ``O(N + |θ|)`` per example, gradient unbiased (its mean
    over random keys is RTRL's), variance growing with the sequence.

    Args:
        model: the brainstate model.
        seed: seed of the random key (the learner carries the key as a state).
    """
    _policy = "random"
    _rule_axes = {"scope": "coupled"}

    def __init__(self, model, seed: int = 0, **kw):
        super().__init__(model, key_seed=seed, **kw)


class EPropAlgorithm(RuleAlgorithm):
    """e-prop (Bellec et al. 2020): the per-synapse eligibility trace (D-RTRL's diagonal
    trace) times a learning signal broadcast from the loss.

    Args:
        model: the brainstate model.
        feedback: 'symmetric' (the learning signal is ``∂L^t/∂h^t``, through the real
            readout weights) or 'random' (through fixed random feedback weights ``B`` of the
            same shapes, feedback alignment: no weight transport).
        kappa: 0 (no filter) or the low-pass factor κ in (0, 1) of the filtered eligibility
            trace that the gradient reads.
        kappa_at: where the filter acts. ``'output'`` (default, the paper): on the
            eligibility trace at the neuron's output ``z`` (its spike),
            ``ē ← κ ē + ∂z/∂h · ε``, contracted with ``L = ∂E/∂z`` (``filter=kappa_out``;
            the output is proven on the model's structure, and a model without one is a
            clear error). ``'state'``: on the eligibility vector of each state,
            ``ē ← κ ē + ε``, contracted with ``∂E/∂h`` (``filter=kappa``, as braintrace's
            EProp does). The two agree when ``∂z/∂h`` is constant.
        feedback_seed: seed of ``B``.
    """
    _policy = "param"

    def __init__(self, model, feedback: str = "symmetric", kappa: float = 0.0,
                 kappa_at: str = "output", **kw):
        if feedback not in ("symmetric", "random"):
            raise ValueError(f"feedback must be 'symmetric' or 'random', got {feedback!r}")
        if kappa_at not in ("output", "state"):
            raise ValueError(f"kappa_at must be 'output' (the paper's filter of dz/dh * eps) "
                             f"or 'state' (each state's eps), got {kappa_at!r}")
        kappa = float(kappa)
        if not 0.0 <= kappa < 1.0:
            raise ValueError(f"kappa must lie in [0, 1), got {kappa}")
        axes = {"signal": feedback}
        if kappa > 0:
            axes.update(filter="kappa_out" if kappa_at == "output" else "kappa", kappa=kappa)
        super().__init__(model, **axes, **kw)
        self.feedback, self.kappa, self.kappa_at = feedback, kappa, kappa_at


class OSTLAlgorithm(RuleAlgorithm):
    """Online spatio-temporal learning (Bohnstingl et al. 2022): a temporal trace of each
    layer's own states times the spatial learning signal ``∂L^t/∂h^t`` (which crosses
    layers within the step).

    Args:
        model: the brainstate model.
        recurrent: True keeps the recurrent term: the trace of a parameter is its influence
            on the states of the groups its op drives, propagated with the full Jacobian
            inside them (``scope=group``; exact, equal to BPTT, for a single recurrent layer);
            False keeps each neuron's own dynamics only (the diagonal trace, D-RTRL's; exact
            for a single layer without recurrent weights).
    """
    _policy = "param"

    def __init__(self, model, recurrent: bool = True, **kw):
        super().__init__(model, **({"scope": "group"} if recurrent else {}), **kw)
        self.recurrent = bool(recurrent)


class ThreeFactorAlgorithm(RuleAlgorithm):
    """Three-factor learning: the eligibility trace (D-RTRL's) times a modulator the caller
    supplies (``signal=modulatory``): ``Δθ ∝ Σ_i m_i ε_i`` with ``m`` in place of
    ``∂L/∂h`` (dopamine, a reward prediction error). Pass it per step,
    ``learner(x, modulator=m)`` (a scalar or an array broadcastable to each hidden state), or
    set a standing value with ``modulator=`` / :attr:`modulator`. The gradient of any loss of
    the output through the call is then the modulated eligibility for trace parameters
    (plain parameters keep their loss gradient).
    """
    _policy = "param"

    def __init__(self, model, modulator: Any = None, **kw):
        super().__init__(model, signal="modulatory", **kw)
        self.modulator = modulator

    def update(self, *args, modulator=None, **kwargs):
        m = modulator if modulator is not None else self.modulator
        if m is None:
            raise BrainscaleError("ThreeFactorAlgorithm needs a modulator: learner(x, "
                                  "modulator=m), or set learner.modulator")
        return super().update(*args, modulator=m, **kwargs)


class DNIAlgorithm(RuleAlgorithm):
    """Eligibility traces with a synthetic gradient (Jaderberg et al. 2017), trained online.

    Each hidden group with a trace gets a linear synthetic-gradient module
    ``ĝ(h) = h W + b`` (its states stacked, per example) predicting ``∂(future losses)/∂h``.
    The learning signal is that of ``L^t + ĝ(h^t)·h^t`` (``signal=synthetic``): the step's
    loss plus the predicted future losses. The module is regressed online on its
    bootstrapped target ``∂(L^t + ĝ(h^t)·h^t)/∂h^{t-1}``: the gradient returned for its
    parameters (:meth:`synthetic_params`, zero-initialised) is that of
    ``½‖ĝ(h^{t-1}) − target‖²``. Train them with the model's parameters, e.g.
    ``online_gradients(learner, xs, ys, loss, params={**net.states(ParamState),
    **learner.synthetic_params()})``.

    Args:
        model: the brainstate model (states initialised).
        readout: how the traces turn into gradients. ``'step'`` (default, printed
            ``readout=step``): the last step exact, ``∂(L^t + ĝ·h^t)/∂θ`` at fixed
            ``h^{t-1}`` plus the target above contracted with the previous trace
            ``ε^{t-1}``; the VJP it needs is the one the target already takes, and every
            path of the step (through the recurrent weights too) counts, as in braintrace's
            one-step windows. ``'trace'``: the signal ``∂L^t/∂h^t + ĝ(h^t)`` times the new
            trace ``ε^t`` (D-RTRL's read-out).
        **kw: the options of :class:`RuleAlgorithm`.
    """
    _policy = "param"

    def __init__(self, model, readout: str = "step", **kw):
        super().__init__(model, signal="synthetic", readout=readout, **kw)

    def synthetic_params(self) -> dict:
        """``{('synthetic', group id): ParamState}`` of the synthetic-gradient modules."""
        self._require()
        return {("synthetic", gid): st for gid, st in self._sg.items()}


# -- braintrace's names ------------------------------------------------------------------
class SnAp(SnApAlgorithm):
    """braintrace's name for :class:`SnApAlgorithm` (``SnAp(model, n=2)``)."""


class UORO(UOROAlgorithm):
    """braintrace's name for :class:`UOROAlgorithm`; ``projection_key`` is the seed."""

    def __init__(self, model, projection_key: int = 42, **kw):
        super().__init__(model, seed=int(projection_key), **kw)


RandomProjectionVjpAlgorithm = UORO


class EProp(EPropAlgorithm):
    """braintrace's name and behaviour for :class:`EPropAlgorithm`: ``kappa_filter_decay`` is
    κ, filtering each state's eligibility vector as braintrace's EProp does
    (``kappa_at='state'``), and ``random_feedback_key`` (an int) the seed of the random
    feedback weights."""

    def __init__(self, model, feedback: str = "symmetric", kappa_filter_decay: float = 0.0,
                 random_feedback_key: int | None = None, kappa_at: str = "state", **kw):
        if feedback == "random" and random_feedback_key is None:
            raise ValueError("feedback='random' requires random_feedback_key=<int seed>")
        super().__init__(model, feedback=feedback, kappa=kappa_filter_decay, kappa_at=kappa_at,
                         feedback_seed=int(random_feedback_key or 0), **kw)


class OSTLRecurrent(OSTLAlgorithm):
    """braintrace's name and behaviour: braintrace's ``OSTLRecurrent`` ('with-H' regime) is
    its per-parameter D-RTRL trace with ``recurrence_scope='coupled'``: the hidden Jacobian
    of each neuron is the per-neuron block of the *full* step Jacobian, paths through the
    recurrent weights' inputs included (a unit's own output feeding back through its weight
    ``W[n, n]``). So is this alias by default (``scope=block``; the block assembled from
    D-RTRL's forward where the structure allows, see :mod:`brainscale.backends.block`, else
    one JVP of the step per neuron and state). ``recurrence_scope='diagonal'`` is D-RTRL's
    trace (``OSTLAlgorithm(model, recurrent=False)``), which cuts those paths: the same
    gradient on the LIF / ALIF benchmark nets (cosine 1.0000), slightly different on a GRU
    (cosine 0.99); see benchmarks/README.md "The rule zoo".

    Args:
        recurrence_scope: 'coupled' (default, braintrace's) or 'diagonal', see above.
        full_recurrence: True takes the paper's full recurrent term instead
            (``OSTLAlgorithm(model)``, ``scope=group``: the influence on the layer's states
            through the full Jacobian, exact for a single recurrent layer, memory
            ``B·N·|θ|``: small layers only).
    """

    def __init__(self, model, full_recurrence: bool = False,
                 recurrence_scope: str = "coupled", **kw):
        if recurrence_scope not in ("diagonal", "coupled"):
            raise ValueError(f"recurrence_scope must be 'diagonal' (D-RTRL's trace) or "
                             f"'coupled' (the per-neuron block of the full step Jacobian, "
                             f"braintrace's), got {recurrence_scope!r}")
        if full_recurrence:
            recurrence_scope = "diagonal"     # the influence matrix keeps every path anyway
        if recurrence_scope == "coupled":
            kw["scope"] = "block"
        super().__init__(model, recurrent=bool(full_recurrence), **kw)
        self.full_recurrence = bool(full_recurrence)
        self.recurrence_scope = recurrence_scope


class OSTLFeedforward(OSTLAlgorithm):
    """braintrace's name and behaviour: braintrace's ``OSTLFeedforward`` ('without-H') is its
    input x output (pp_prop) trace with a negligible decay (α = 1e-6): the eligibility is
    ``≈ df ⊗ x`` of the current step, each neuron's own dynamics dropped. This alias computes
    that limit exactly: the input x output trace with ``recursion='none'`` (``ε_x ← x``,
    ``ε_f ← df``; printed ``recursion=none``), which differs from braintrace's by the α =
    1e-6 leak (a relative 1e-6) and skips the recursion. ``decay_or_rank=α`` keeps the
    leaky ES-D-RTRL trace with that α instead (``decay_or_rank=1e-6`` is braintrace's to
    float rounding). ``keep_dynamics=True`` keeps each neuron's dynamics
    (``OSTLAlgorithm(model, recurrent=False)``, the diagonal per-parameter trace: exact,
    equal to BPTT, on a feed-forward SNN).
    """

    def __init__(self, model, decay_or_rank: float | int | None = None,
                 keep_dynamics: bool = False, **kw):
        if keep_dynamics:
            super().__init__(model, recurrent=False, **kw)
        elif decay_or_rank is None:
            super().__init__(model, recurrent=False, policy="io", recursion="none", **kw)
        else:
            super().__init__(model, recurrent=False, policy="io", decay_or_rank=decay_or_rank,
                             **kw)
        self.keep_dynamics = bool(keep_dynamics)


class ThreeFactor(ThreeFactorAlgorithm):
    """braintrace's name for :class:`ThreeFactorAlgorithm`."""


class DNI(DNIAlgorithm):
    """braintrace's name for :class:`DNIAlgorithm`."""

