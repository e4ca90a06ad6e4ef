"""The user-facing online-learning algorithms (seed API) on top of the compiler.

``DiagIODimAlgorithm`` (ES-D-RTRL), ``DiagParamDimAlgorithm`` (D-RTRL) and
``DiagHybridDimAlgorithm`` wrap a brainstate model. ``compile_graph(*example_inputs)`` runs
frontend → passes → backend; afterwards calling the algorithm advances the model's hidden
states *and* the eligibility traces, and gradients taken with ``brainstate.transform.grad``
through the call are the online gradients. Traces are brainstate ``ShortTermState``s held by
the algorithm, so they reset, batch and checkpoint like any other state.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from .errors import BrainscaleError, NotCompiledError, UnsupportedModelError

__all__ = ["ETraceAlgorithm", "DiagIODimAlgorithm", "DiagParamDimAlgorithm",
           "DiagHybridDimAlgorithm", "EligibilityTrace", "decay_from", "online_gradients"]


class EligibilityTrace(brainstate.ShortTermState):
    """A state holding one array of an eligibility trace (``ε``, ``ε_x`` or ``ε_f``)."""


def decay_from(decay_or_rank) -> float:
    """``α`` from ``decay_or_rank``: a float in (0, 1) is α; an int r > 0 gives (r-1)/(r+1)."""
    if isinstance(decay_or_rank, bool):
        raise TypeError("decay_or_rank must be a float in (0, 1) or a positive int")
    if isinstance(decay_or_rank, (int, np.integer)):
        r = int(decay_or_rank)
        if r <= 0:
            raise ValueError(f"decay_or_rank as a rank must be a positive int, got {r}")
        return (r - 1) / (r + 1)
    if isinstance(decay_or_rank, (float, np.floating)):
        a = float(decay_or_rank)
        if not 0.0 < a < 1.0:
            raise ValueError(f"decay_or_rank as a decay must lie in (0, 1), got {a}")
        return a
    raise TypeError(f"decay_or_rank must be a float in (0, 1) or a positive int, "
                    f"got {type(decay_or_rank).__name__}")


def _sig(args, kwargs) -> str:
    leaves = jax.tree.leaves((args, kwargs))
    return ", ".join(f"{jnp.result_type(a)}{list(np.shape(a))}" for a in leaves)


class ETraceAlgorithm(brainstate.nn.Module):
    """Base class: compile a model's step and run it with eligibility traces.

    Args:
        model: the brainstate model (``update`` is one time step), with its states
            initialised (``brainstate.nn.init_all_states(model, ...)``).
        policy: 'param' | 'io' | 'auto' (the ``select-dims`` policy).
        decay_or_rank: α of io-dim traces (float in (0,1), or int rank r: α=(r-1)/(r+1)).
        pipeline: passes after ``lower`` (default: ``brainscale.DEFAULT_PIPELINE``).
        backend: 'jax' (default) or a Backend instance.
        param_ratio / memory_budget_mb / dim_overrides: options of ``select-dims``.
        instruments: PassManager instruments (dumps, timing).
    """

    _policy = "auto"

    def __init__(self, model, *, decay_or_rank=None, pipeline=None, backend="jax",
                 param_ratio: float = 1.0, memory_budget_mb: float | None = None,
                 dim_overrides: dict | None = None, instruments: Sequence = (),
                 name: str | None = None):
        super().__init__(name=name)
        if not callable(model):
            raise TypeError(f"model must be a callable brainstate module, got {type(model).__name__}")
        self.model = model
        self.decay = None if decay_or_rank is None else decay_from(decay_or_rank)
        self.pipeline = pipeline
        self.backend = backend
        self.param_ratio = param_ratio
        self.memory_budget_mb = memory_budget_mb
        self.dim_overrides = dict(dim_overrides or {})
        self.instruments = tuple(instruments)
        self.graph = None
        self.stages: list = []
        self.log: list = []
        self.compile_seconds: float | None = None
        self._step = None
        self._traces: tuple = ()

    # -- compilation ----------------------------------------------------------------------
    def compile_graph(self, *args, **kwargs):
        """Trace one step on example inputs, run the passes and emit the step.

        Call it outside ``jit`` (it creates the trace states). Returns ``self``.
        """
        from .api import build_graph
        from .backends import get_backend
        from .passes import DEFAULT_PIPELINE, parse_pipeline
        t0 = time.perf_counter()
        backend = get_backend(self.backend)
        pipeline = parse_pipeline(self.pipeline if self.pipeline is not None else DEFAULT_PIPELINE)
        pipeline += tuple(backend.pipeline())   # backend decisions are passes: they show in dumps
        graph, stages, log = build_graph(
            self.model, *args, policy=self._policy, pipeline=pipeline,
            param_ratio=self.param_ratio, memory_budget_mb=self.memory_budget_mb,
            dim_overrides=self.dim_overrides, instruments=self.instruments, **kwargs)
        if any(t.dim == "io" for t in graph.traces) and self.decay is None:
            raise BrainscaleError(
                f"{type(self).__name__} chose io-dim (ES-D-RTRL) traces for "
                f"{', '.join(t.id for t in graph.traces if t.dim == 'io')} but no decay was given: "
                f"pass decay_or_rank=... (e.g. 0.99 or a rank such as 100)")
        step = backend.emit(graph, decay=self.decay)
        self.compile_seconds = time.perf_counter() - t0
        self.graph, self.stages, self.log = graph, stages, log
        self._step = step
        self._traces = tuple(EligibilityTrace(z) for z in step.init_traces())
        self._sig = _sig(args, kwargs)
        self._prepare_io()
        return self

    def _prepare_io(self):
        info, L = self.graph.info, self._step.layout
        self._written_other = []
        jx = self.graph.info.jaxpr.jaxpr if hasattr(self.graph.info.jaxpr, "jaxpr") else None
        hidden_states = {h.state_index for h in self.graph.hidden}
        param_states = {p.state_index for p in self.graph.params}
        for si, (a, b) in enumerate(info.state_out_slices):
            if si in hidden_states or si in param_states:
                continue
            ia, _ = info.state_in_slices[si]
            outs = jx.outvars[a:b]
            ins = jx.invars[ia:ia + (b - a)]
            if any(o is not i for o, i in zip(outs, ins)):
                self._written_other.append(si)

    @property
    def is_compiled(self) -> bool:
        return self._step is not None

    def _require(self):
        if self._step is None:
            raise NotCompiledError(
                f"{type(self).__name__} is not compiled: call "
                f"`.compile_graph(*example_inputs)` once before using it")

    # -- running --------------------------------------------------------------------------
    def update(self, *args, **kwargs):
        """Advance the model one step (hidden states and traces); return its output."""
        self._require()
        sig = _sig(args, kwargs)
        if sig != self._sig:
            raise BrainscaleError(
                f"{type(self).__name__} was compiled for inputs {self._sig} but got {sig}; a "
                f"changed input shape or batch size needs `.compile_graph(*new_inputs)` (after "
                f"`reset_state(batch_size=...)` for a new batch size)")
        info, L = self.graph.info, self._step.layout
        leaves = list(jax.tree.leaves((args, kwargs)))
        for st in info.states:
            leaves.extend(jax.tree.leaves(st.value))
        if len(leaves) != L.n_in:
            raise BrainscaleError(
                f"the model's states changed structure since compile_graph ({len(leaves)} leaves, "
                f"compiled for {L.n_in}); call compile_graph again")
        for tr, tmpl in zip(self._traces, self._step.layout.traces):
            if tuple(np.shape(tr.value)) != tuple(tmpl[-2]):
                raise BrainscaleError(
                    f"trace shape {np.shape(tr.value)} differs from the compiled {tmpl[-2]}: the "
                    f"batch size changed; call compile_graph with inputs of the new batch size")
        pick = lambda idx: tuple(leaves[i] for i in idx)  # noqa: E731
        theta_t = tuple(pick(ix) for ix in L.tparam_idx)
        theta_p = tuple(pick(ix) for ix in L.pparam_idx)
        args_l = pick(L.arg_idx)
        hidden = pick(L.hidden_idx)
        others = pick(L.other_idx)
        traces = tuple(t.value for t in self._traces)
        outs, new_hidden, new_others, new_traces = self._step.fn(
            theta_t, theta_p, args_l, hidden, others, traces)
        for h, v in zip(self.graph.hidden, new_hidden):
            st = info.states[h.state_index]
            st.value = jax.tree.unflatten(info.state_treedefs[h.state_index], [v])
        if self._written_other:
            pos = 0
            vals = {}
            for si, (a, b) in enumerate(info.state_out_slices):
                if any(p.state_index == si for p in self.graph.params) or \
                        any(h.state_index == si for h in self.graph.hidden):
                    continue
                vals[si] = list(new_others[pos:pos + (b - a)])
                pos += b - a
            for si in self._written_other:
                info.states[si].value = jax.tree.unflatten(info.state_treedefs[si], vals[si])
        for t, v in zip(self._traces, new_traces):
            t.value = v
        return jax.tree.unflatten(info.out_treedef, list(outs))

    def __call__(self, *args, **kwargs):
        return self.update(*args, **kwargs)

    def reset_state(self, batch_size: int | None = None, **kwargs):
        """Reset the model's states (``brainstate.nn.reset_all_states``) and zero the traces."""
        kw = dict(kwargs)
        if batch_size is not None:
            kw["batch_size"] = batch_size
        brainstate.nn.reset_all_states(self.model, **kw)
        self.reset_traces()

    def reset_traces(self):
        for t in self._traces:
            t.value = jnp.zeros_like(t.value)

    # -- inspection -----------------------------------------------------------------------
    def _named(self, kind):
        self._require()
        out = {}
        for t, ent in zip(self._traces, self._step.layout.traces):
            if ent[0] == kind:
                out[ent[2] if kind == "x" else (self.graph.relation_by_id[ent[1]].op, ent[2])] = t
        return out

    @property
    def etrace_xs(self) -> dict:
        """``{op input value name: ε_x state}`` of the io-dim (ES-D-RTRL) traces."""
        return self._named("x")

    @property
    def etrace_dfs(self) -> dict:
        """``{(op output name, hidden group id): ε_f state}`` (trailing axis: group states)."""
        return self._named("f")

    def etrace_of(self, param) -> dict:
        """The traces of a parameter (an ETraceParam state or its name in the IR).

        Returns ``{(relation id, group id): trace}``: for param-dim the parameter-shaped
        tree of ``ε`` (trailing axis k), for io-dim ``{'x': ε_x, 'f': ε_f}``.
        """
        self._require()
        name = param
        if not isinstance(param, str):
            idx = [i for i, st in enumerate(self.graph.info.states) if st is param]
            if not idx:
                raise BrainscaleError("this parameter is not read by the compiled step")
            name = self.graph.info.state_paths[idx[0]]
        rels = [r for r in self.graph.relations if r.param == name]
        if not rels:
            raise BrainscaleError(f"{name!r} is not a trace parameter of the compiled graph; "
                                  f"trace parameters: "
                                  f"{', '.join(sorted({r.param for r in self.graph.relations}))}")
        out = {}
        ents = list(zip(self._traces, self._step.layout.traces))
        for r in rels:
            for gid in r.groups:
                slots: dict = {}
                for t, e in ents:
                    if e[0] == "param" and e[1] == r.id and e[2] == gid:
                        slots.setdefault(e[3], {})[e[4]] = t.value
                if slots:
                    # per leaf: one array ("all") or one per state, shown stacked (trailing k)
                    leaves = [per["all"] if "all" in per else
                              jnp.stack([per[si] for si in sorted(per)], axis=-1)
                              for _, per in sorted(slots.items())]
                    p = self.graph.param_by_name[name]
                    from .backends.jax_backend import _mantissa_treedef
                    st = self.graph.info.states[p.state_index]
                    out[(r.id, gid)] = jax.tree.unflatten(_mantissa_treedef(st.value), leaves)
                    continue
                f = [t.value for t, e in ents if e[0] == "f" and e[1] == r.id and e[2] == gid]
                tr = next((tt for tt in self.graph.traces if r.id in tt.relations), None)
                x = [t.value for t, e in ents if e[0] == "x" and tr is not None and e[1] == tr.id]
                if f:
                    out[(r.id, gid)] = {"x": x[0], "f": f[0]}
        return out

    def ir(self, **settings) -> str:
        """The final IR as text."""
        self._require()
        from .ir.printer import PrintSettings, print_graph
        return print_graph(self.graph, PrintSettings(**settings))

    def compiled(self):
        """A :class:`brainscale.Compiled` view (stages, log, DOT, report) of this learner."""
        self._require()
        from .api import Compiled
        return Compiled(self.graph, self.stages, self.log, self, self.compile_seconds or 0.0)

    def to_dot(self, **kw) -> str:
        """DOT text of the compiled graph (see :func:`brainscale.ir.dot.to_dot`)."""
        return self.compiled().to_dot(**kw)

    def render(self, path, **kw):
        """Render the compiled graph to ``path`` (SVG/PNG), or write the .dot and say how."""
        return self.compiled().render(path, **kw)

    def report(self) -> str:
        """The compile report: states, params, traces, bytes, dim choices, time per pass."""
        return self.compiled().report()


class DiagIODimAlgorithm(ETraceAlgorithm):
    """ES-D-RTRL: io-dim traces, memory O(B·(|x|+|y|·k)).

    Example::

        model = brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.99)
        model.compile_graph(x0)
        out = model(x_t)
    """
    _policy = "io"

    def __init__(self, model, decay_or_rank, **kw):
        if decay_or_rank is None:
            raise TypeError("DiagIODimAlgorithm needs decay_or_rank (float α in (0,1) or int rank)")
        super().__init__(model, decay_or_rank=decay_or_rank, **kw)


class DiagParamDimAlgorithm(ETraceAlgorithm):
    """D-RTRL: param-dim traces, memory O(B·|θ|·k); exact for non-recurrent layers."""
    _policy = "param"

    def __init__(self, model, **kw):
        super().__init__(model, **kw)


class DiagHybridDimAlgorithm(ETraceAlgorithm):
    """Per parameter D-RTRL or ES-D-RTRL, chosen by the ``select-dims`` cost model."""
    _policy = "auto"

    def __init__(self, model, decay_or_rank=None, **kw):
        super().__init__(model, decay_or_rank=decay_or_rank, **kw)


def online_gradients(learner: ETraceAlgorithm, inputs, targets, loss_fn: Callable,
                     params=None, jit: bool = True, chunk: int = 1):
    """Run a sequence through ``learner`` and sum the online gradients over time.

    Args:
        learner: a compiled algorithm.
        inputs: array (or pytree) with a leading time axis ``(T, ...)``.
        targets: array with a leading time axis, passed to ``loss_fn(out_t, target_t)``.
        loss_fn: per-step loss returning a scalar.
        params: dict of ParamStates to differentiate (default: all of the model's).
        chunk: K > 1 sums the ES-D-RTRL (io-dim) gradients of dense ops over windows of K
            steps with one (K·B)-row matrix product instead of K rank-B updates of the
            ``n_in × n_out`` gradient (same sum up to float rounding; faster when the
            gradient is large). The loop then owns the step (no ``brainstate`` grad); the
            per-step traces, states and losses are the same. Only for summed gradients:
            to apply an update every step, use 1.

    Returns:
        ``(grads, losses)``: grads summed over time (same keys as ``params``) and the
        per-step losses ``(T,)``. Memory does not depend on ``T``: the loop is a scan whose
        body takes the gradient of one step only (with ``chunk``, K steps of ``ε_x`` and
        ``ε_f∘δ`` are kept).
    """
    learner._require()
    from .backends.pallas.driver import check_chunk, drive_online
    if check_chunk(chunk) != 1:
        return drive_online(learner, inputs, targets, loss_fn, params=params, chunk=chunk,
                            es_impl="xla", jit=jit)
    if params is None:
        params = learner.model.states(brainstate.ParamState)

    def one(x, y):
        def loss():
            return loss_fn(learner(x), y)
        g, l = brainstate.transform.grad(loss, params, return_value=True)()
        return g, l

    zero = {k: jax.tree.map(jnp.zeros_like, p.value) for k, p in params.items()}

    def body(acc, xy):
        g, l = one(*xy)
        return {k: jax.tree.map(jnp.add, acc[k], g[k]) for k in acc}, l

    def run(xs, ys):
        return brainstate.transform.scan(body, zero, (xs, ys))

    if jit:
        # one jitted driver per (learner, loss, params): later calls reuse the compiled loop
        key = (id(loss_fn), tuple(params.keys()))
        cache = learner.__dict__.setdefault("_online_cache", {})
        if key not in cache:
            cache[key] = brainstate.transform.jit(run)
        run = cache[key]
    return run(inputs, targets)
