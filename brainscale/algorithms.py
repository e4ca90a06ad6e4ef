"""The user-facing online-learning algorithms (seed API): the runtime on top of the compiler.

``DiagIODimAlgorithm`` (ES-D-RTRL), ``DiagParamDimAlgorithm`` (D-RTRL) and
``DiagHybridDimAlgorithm`` wrap a brainstate model. An algorithm only *builds a pipeline*:
its choices (policy, decay α, cost-model options, overrides) become options of
``select-dims``. ``compile_graph(*example_inputs)`` runs frontend → passes → backend;
afterwards calling the algorithm advances the model's hidden states *and* the eligibility
traces, and gradients taken with ``brainstate.transform.grad`` through the call are the
online gradients. Traces are brainstate ``ShortTermState``s held by the algorithm, one per
trace array of the IR, so they reset, batch and checkpoint like any other state.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Sequence

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from ._legacy_api import LegacyAPIMixin
from ._stepdata import MultiStepData, has_multi_step, is_step_data
from .errors import BrainscaleError, NotCompiledError
from .pipeline import AlgorithmOptions, build_graph
from .passes.select_dims import decay_from as _decay_and_rank

__all__ = ["ETraceAlgorithm", "DiagIODimAlgorithm", "DiagParamDimAlgorithm",
           "DiagHybridDimAlgorithm", "EligibilityTrace", "decay_from", "online_gradients"]


class EligibilityTrace(brainstate.ShortTermState):
    """A state holding one array of an eligibility trace (``ε``, ``ε_x`` or ``ε_f``)."""


def decay_from(decay_or_rank) -> float:
    """``α`` from ``decay_or_rank``: a float in (0, 1) is α; an int r > 0 gives (r-1)/(r+1)."""
    return _decay_and_rank(decay_or_rank)[0]


def _sig(args, kwargs) -> str:
    leaves = jax.tree.leaves((args, kwargs))
    return ", ".join(f"{jnp.result_type(a)}{list(np.shape(a))}" for a in leaves)


_MAX_DRIVERS = 16


class ETraceAlgorithm(LegacyAPIMixin, brainstate.nn.Module):
    """Base class: compile a model's step and run it with eligibility traces.

    Args:
        model: the brainstate model (``update`` is one time step), with its states
            initialised (``brainstate.nn.init_all_states(model, ...)``).
        decay_or_rank: α of io-dim traces (float in (0,1), or int rank r: α=(r-1)/(r+1)).
        pipeline: passes after ``lower`` (default: ``brainscale.DEFAULT_PIPELINE``); the
            algorithm's options fill its ``select-dims`` (conflicting options are an error).
        backend: 'jax' (default), 'pallas', 'native' (the one-pass D-RTRL CPU kernel,
            ``docs/native.md``), 'auto' (Pallas on a GPU, native on the CPU) or a Backend
            instance.
        param_ratio / memory_budget_mb / dim_overrides: options of ``select-dims``.
        instruments: PassManager instruments (dumps, timing).
        mode: brainscale 0.1's ``brainstate.mixin.Mode`` (``Batching()`` for batched inputs);
            checked against the example inputs of ``compile_graph``. Optional.
        vjp_method: ``'single-step'`` (default: the learning signal of step t is
            ``∂L^t/∂h^t``) or ``'multi-step'``: a call with :class:`MultiStepData` runs a
            window of steps and back-propagates the learning signal through all of them
            (brainscale 0.1's option; see :mod:`brainscale.backends.window`).
        mesh / batch_axis / neuron_axis: a ``jax.sharding.Mesh`` to run on: the ``shard``
            pass splits the batch axis of inputs, states and traces over mesh axis
            ``batch_axis`` (default ``'data'`` when the mesh has it) and the output-neuron axis
            of states, dense weights and their traces over ``neuron_axis`` (default
            ``'model'`` when present); see :meth:`shard`.
        norm_stats: a normalisation between a trace op and the neurons is absorbed into the
            op (``absorb-normalization``): ``'exact'`` (default) differentiates through its
            statistics, ``'constant'`` treats them as constants (the common approximation).
    """

    _policy: str | None = None

    def __init__(self, model, *, decay_or_rank=None, pipeline=None, backend="jax",
                 param_ratio: float | None = None, memory_budget_mb: float | None = None,
                 dim_overrides: dict | None = None, instruments: Sequence = (),
                 name: str | None = None, mode=None, norm_stats: str | None = None,
                 vjp_method: str = "single-step", mesh=None, batch_axis: str | None = None,
                 neuron_axis: str | None = None):
        super().__init__(name=name)
        if not callable(model):
            raise TypeError(f"model must be a callable brainstate module, got {type(model).__name__}")
        self.model = model
        self.decay_or_rank = decay_or_rank
        if decay_or_rank is not None:
            decay_from(decay_or_rank)            # validate early
        self.pipeline = pipeline
        self.backend = backend
        self.param_ratio = param_ratio
        self.memory_budget_mb = memory_budget_mb
        self.dim_overrides = dict(dim_overrides or {})
        self.instruments = tuple(instruments)
        if vjp_method not in ("single-step", "multi-step"):
            raise ValueError(f"vjp_method must be 'single-step' or 'multi-step', got "
                             f"{vjp_method!r}")
        self.mode = mode
        self.norm_stats = norm_stats
        self.vjp_method = vjp_method
        self.mesh, self.batch_axis, self.neuron_axis = mesh, batch_axis, neuron_axis
        self.graph = None
        self.stages: list = []
        self.records: tuple = ()
        self.compile_seconds: float | None = None
        self._step = None
        self._backend_obj = None
        self._traces: tuple = ()
        self._initial: dict = {}
        self._drivers: OrderedDict = OrderedDict()

    # -- compilation ----------------------------------------------------------------------
    def algorithm_options(self) -> AlgorithmOptions:
        """What this algorithm asks of ``select-dims``."""
        return AlgorithmOptions(policy=self._policy, decay_or_rank=self.decay_or_rank,
                                param_ratio=self.param_ratio,
                                memory_budget_mb=self.memory_budget_mb,
                                norm_stats=self.norm_stats,
                                dim_overrides=self.dim_overrides or None,
                                shard=shard_pass(self.mesh, self.batch_axis, self.neuron_axis),
                                who=type(self).__name__)

    def compile_graph(self, *args, **kwargs):
        """Trace one step on example inputs, run the passes and emit the step.

        Call it outside ``jit`` (it creates the trace states). Returns ``self``.
        """
        from .backends import get_backend
        from .backends.base import check_trace_memory
        t0 = time.perf_counter()
        backend = get_backend(self.backend)
        res = build_graph(self.model, *args, pipeline=self.pipeline,
                          instruments=self.instruments, algorithm=self.algorithm_options(),
                          backend=backend, **kwargs)
        self._check_mode(res.graph, _sig(args, kwargs))
        check_trace_memory(res.graph)
        step = backend.emit(res.graph)
        self.compile_seconds = time.perf_counter() - t0
        self.graph, self.stages, self.records = res.graph, list(res.stages), res.records
        self._step = step
        self._backend_obj = backend
        self._traces = tuple(EligibilityTrace(z) for z in step.init_traces())
        self._initial = {p: st.value for p, st in uncovered_states(self.model).items()}
        self._sig = _sig(args, kwargs)
        self._drivers = OrderedDict()
        self._place()
        return self

    def shard(self, mesh, batch_axis: str | None = None, neuron_axis: str | None = None):
        """Run the compiled step on a device mesh (``jax.sharding.Mesh``).

        Runs the ``shard`` pass on the compiled graph (its shardings are then printed per
        array by :meth:`ir`), re-emits the step and places the model's states and the traces
        with those shardings; XLA's SPMD partitioner keeps them between steps and reduces
        the gradients over the batch axis. ``batch_axis`` defaults to ``'data'`` and
        ``neuron_axis`` to ``'model'`` when the mesh has such an axis. Returns ``self``.
        """
        from .passes import PassContext, PassManager, Recorder
        self._require()
        p = shard_pass(mesh, batch_axis, neuron_axis)
        base = self.graph
        if "sharding" in base.facts:           # re-shard from the graph before the 'shard'
            base = next(g for spec, g in reversed(self.stages) if not spec.startswith("shard"))
        rec, ctx = Recorder(), PassContext()
        graph = PassManager((p,), instruments=(rec,)).run(base, ctx)
        self.mesh, self.batch_axis, self.neuron_axis = mesh, p.batch, p.neurons
        self.graph = graph
        self.stages = [s for s in self.stages if not s[0].startswith("shard")] + list(rec.stages)
        self.records = tuple(r for r in self.records if r.name != "shard") + tuple(ctx.records)
        values = tuple(t.value for t in self._traces)
        self._step = self._backend_obj.emit(graph)
        for t, v in zip(self._traces, values):
            t.value = v
        self._drivers = OrderedDict()
        self._place()
        return self

    def _place(self):
        """Bind the mesh to the compiled step and put the states and traces on it with the
        IR's shardings (if the graph has any)."""
        if self.mesh is None or "sharding" not in self.graph.facts:
            return
        self._step.program.bind_mesh(self.mesh)
        b = self._step.binding
        b.place_states(self._bound_states(), self.mesh)
        for t, v in zip(self._traces, b.place_traces(tuple(t.value for t in self._traces),
                                                      self.mesh)):
            t.value = v

    @property
    def decay(self) -> float | None:
        """α of the io-dim traces (from ``decay_or_rank``), None when not given."""
        return None if self.decay_or_rank is None else decay_from(self.decay_or_rank)

    @property
    def log(self) -> list:
        """``[(pass name, message), ...]`` of the last compilation."""
        from .compiled import Compiled
        return Compiled(self.graph, self.stages, self.records, self).log

    @property
    def is_compiled(self) -> bool:
        return self._step is not None

    def _require(self):
        if self._step is None:
            raise NotCompiledError(
                f"{type(self).__name__} is not compiled: call "
                f"`.compile_graph(*example_inputs)` once before using it")

    def _bound_states(self) -> tuple:
        """The model states the compiled step reads, in jaxpr order, bound by path each call.

        A state the model holds under the same path as at ``compile_graph`` but as a new
        object (``brainstate.nn.init_all_states`` again, a ``reset_state`` that builds new
        states) is used in its place: the learner follows the model, it never keeps
        advancing a detached state. States that are not the model's (read from outside it)
        stay bound to the objects the step was compiled with.
        """
        from ._group_states import ComponentView
        info = self.graph.info
        try:
            current = {".".join(str(k) for k in path): st
                       for path, st in self.model.states().items()}
        except Exception:  # noqa: BLE001 - a plain function model has no states()
            return info.states
        out = []
        for st, path in zip(info.states, info.state_paths):
            if isinstance(st, ComponentView):     # a component of a group state
                grp = current.get(st.group_path)
                out.append(st.rebind(grp) if grp is not None and grp is not st.group else st)
                continue
            new = current.get(path, st)
            out.append(st if isinstance(new, EligibilityTrace) else new)
        return tuple(out)

    def _cached_driver(self, key, make: Callable):
        """A jitted driver per key (the loss function object, options), for this compiled
        step; the least recently used is dropped beyond a few entries."""
        cache = self._drivers
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        fn = cache[key] = make()
        while len(cache) > _MAX_DRIVERS:
            cache.popitem(last=False)
        return fn

    # -- running --------------------------------------------------------------------------
    def update(self, *args, **kwargs):
        """Advance the model one step (hidden states and traces); return its output.

        With ``vjp_method='multi-step'``, inputs wrapped in :class:`brainscale.MultiStepData`
        (leading axis = steps) run that window of steps in one call and return the outputs
        stacked over it; :class:`brainscale.SingleStepData` marks an input that is the same
        at every step (see :mod:`brainscale.backends.window`).
        """
        self._require()
        if has_multi_step(args, kwargs):
            return self._run_window(args, kwargs)
        return self._one_step(args, kwargs)

    def _one_step(self, args, kwargs, *extra):
        """One compiled step on ``(args, kwargs)`` (``extra``: further arguments of the step
        function, e.g. a rule's auxiliary inputs); checks shapes, updates states and traces."""
        if any(is_step_data(a) for a in jax.tree.leaves((args, kwargs), is_leaf=is_step_data)):
            args, kwargs = jax.tree.map(lambda a: a.data if is_step_data(a) else a, (args, kwargs),
                                        is_leaf=is_step_data)
        sig = _sig(args, kwargs)
        if sig != self._sig:
            raise BrainscaleError(
                f"{type(self).__name__} was compiled for inputs {self._sig} but got {sig}; a "
                f"changed input shape or batch size needs `.compile_graph(*new_inputs)` (after "
                f"`reset_state(batch_size=...)` for a new batch size)")
        step, b = self._step, self._step.binding
        for tr, a in zip(self._traces, b.arrays):
            if tuple(np.shape(tr.value)) != tuple(a.stored_type.shape):
                raise BrainscaleError(
                    f"trace array {a.id} has shape {np.shape(tr.value)} but the compiled step "
                    f"keeps {a.stored_type}: the batch size changed; call compile_graph with inputs "
                    f"of the new batch size")
        states = self._bound_states()
        theta_t, theta_p, hidden, others = b.gather(states)
        args_l = tuple(jax.tree.leaves((args, kwargs)))
        if self.mesh is not None and "sharding" in self.graph.facts:
            args_l = b.place_args(args_l, self.mesh)
        traces = tuple(t.value for t in self._traces)
        outs, new_hidden, new_others, new_traces = step.fn(theta_t, theta_p, args_l, hidden,
                                                           others, traces, *extra)
        b.scatter(new_hidden, new_others, states)
        for t, v in zip(self._traces, new_traces):
            t.value = v
        return jax.tree.unflatten(self.graph.info.out_treedef, list(outs))

    def __call__(self, *args, **kwargs):
        return self.update(*args, **kwargs)

    def _run_window(self, args, kwargs):
        """A window of steps (multi-step data): see :mod:`brainscale.backends.window`."""
        from .backends.window import make_window
        if self.vjp_method != "multi-step":
            raise BrainscaleError(
                f"{type(self).__name__} got MultiStepData, which needs vjp_method='multi-step' "
                f"(the learning signal back-propagated through the window); with "
                f"vjp_method='single-step' call it once per step")
        wrapped = jax.tree.leaves((args, kwargs), is_leaf=is_step_data)
        mask, leaves, step_leaves = [], [], []
        for w in wrapped:
            multi = isinstance(w, MultiStepData)
            for leaf in jax.tree.leaves(w.data if is_step_data(w) else w):
                mask.append(multi)
                leaves.append(leaf)
                step_leaves.append(leaf[0] if multi else leaf)
        lengths = {int(np.shape(l)[0]) for l, m in zip(leaves, mask) if m}
        if len(lengths) != 1:
            raise BrainscaleError(f"the MultiStepData inputs must have one number of steps on "
                                  f"their leading axis, got {sorted(lengths)}")
        sig = ", ".join(f"{jnp.result_type(a)}{list(np.shape(a))}" for a in step_leaves)
        if sig != self._sig:
            raise BrainscaleError(
                f"{type(self).__name__} was compiled for inputs {self._sig} but one step of the "
                f"window is {sig}; call compile_graph with the inputs of one step")
        fn = self._cached_driver(("window", tuple(mask)),
                                 lambda: make_window(self._step.program, tuple(mask)))
        b = self._step.binding
        states = self._bound_states()
        theta_t, theta_p, hidden, others = b.gather(states)
        traces = tuple(t.value for t in self._traces)
        outs, new_hidden, new_others, new_traces = fn(theta_t, theta_p, tuple(leaves), hidden,
                                                      others, traces)
        b.scatter(new_hidden, new_others, states)
        for t, v in zip(self._traces, new_traces):
            t.value = v
        return jax.tree.unflatten(self.graph.info.out_treedef, list(outs))

    # -- copying --------------------------------------------------------------------------
    def __deepcopy__(self, memo):
        """An independent learner: the model, its states and the traces are copied (the
        compiled step is shared: it holds no state); jitted drivers are rebuilt on use."""
        new = super().__deepcopy__(memo)      # brainstate's graph-aware copy
        new._drivers = OrderedDict()
        return new

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled: brainstate modules and states are not "
            f"picklable (they hold JAX tracing bookkeeping and locks). Save the values instead, "
            f"e.g. values = {{k: st.value for k, st in learner.states().items()}} (the model's "
            f"states and the eligibility traces, keyed by path; picklable), or "
            f"braintools.file.msgpack_save(path, learner.states()), and restore them into a "
            f"learner built and compiled the same way (st.value = values[k]). copy.deepcopy "
            f"works.")

    def reset_state(self, batch_size: int | None = None, **kwargs):
        """Reset the model's states and zero the traces.

        Every module of the model that defines ``reset_state`` is reset with it; a module that
        defines only ``init_state`` (as the README's model does) is re-initialised with it, and
        the fresh values are assigned into the existing state objects, so the compiled step,
        jitted functions holding the states and this learner stay bound to them.
        ``batch_size`` defaults to the batch size the step was compiled for (None when it was
        compiled unbatched). States whose module defines neither method (a model written
        without them) return to the values they had at ``compile_graph``.
        """
        if batch_size is None and self._step is not None:
            batch_size = self.batch_size
        reset_model_states(self.model, batch_size=batch_size, initial=self._initial, **kwargs)
        self.reset_traces()

    @property
    def batch_size(self) -> int | None:
        """The leading batch size the step was compiled for (None: unbatched)."""
        self._require()
        return self.graph.batch_size or None

    def reset_traces(self):
        for t in self._traces:
            t.value = jnp.zeros_like(t.value)
        self._place()

    # -- inspection -----------------------------------------------------------------------
    def trace_states(self) -> dict:
        """``{trace array id: EligibilityTrace}`` (the ids the IR prints: ``T0.1``, ...)."""
        self._require()
        return {a.id: st for a, st in zip(self._step.binding.arrays, self._traces)}

    def _trace_values(self) -> dict:
        """``{trace array id: value}`` in the math dtype (a packed pair unpacked to its
        ``(..., 2)`` states)."""
        return {a.id: a.from_stored(st.value) if a.packed else st.value
                for a, st in zip(self._step.binding.arrays, self._traces)}

    @property
    def etrace_xs(self) -> dict:
        """``{op input value name: ε_x state}`` of the io-dim (ES-D-RTRL) traces."""
        self._require()
        return {a.value: st for a, st in zip(self._step.binding.arrays, self._traces)
                if a.role == "eps_x"}

    @property
    def etrace_dfs(self) -> dict:
        """``{(op output name, hidden group id): ε_f state}`` (trailing axis: group states)."""
        self._require()
        g = self.graph
        return {(g.relation_by_id[a.relation].op, a.group): st
                for a, st in zip(self._step.binding.arrays, self._traces) if a.role == "eps_f"}

    def etrace_of(self, param) -> dict:
        """The traces of a parameter (an ETraceParam state or its name in the IR).

        Returns ``{(relation id, group id): trace}``: for param-dim the parameter-shaped
        tree of ``ε`` (compact: the group's k states on a trailing axis; dense: the
        ``(..., neurons, k, *leaf)`` per-neuron trace; channel: the same with the leaf's
        channel axis dropped, the slice of each neuron's own channel), for io-dim
        ``{'x': ε_x, 'f': ε_f}``.
        """
        self._require()
        g = self.graph
        name = param
        if not isinstance(param, str):
            idx = [i for i, st in enumerate(g.info.states) if st is param]
            if not idx:
                raise BrainscaleError("this parameter is not read by the compiled step")
            name = g.info.state_paths[idx[0]]
        rels = [r for r in g.relations if r.param == name]
        if not rels:
            raise BrainscaleError(f"{name!r} is not a trace parameter of the compiled graph; "
                                  f"trace parameters: "
                                  f"{', '.join(sorted({r.param for r in g.relations}))}")
        values = self._trace_values()
        b = self._step.binding
        out = {}
        for r in rels:
            t = g.trace_of_relation[r.id]
            for gid in r.groups:
                if t.dim == "param":
                    from .ir.layout import batch_shape, neuron_shape
                    op = g.op_by_name[r.op]
                    axis = len(batch_shape(g, gid, op)) + len(neuron_shape(op))
                    per_leaf: dict = {}
                    for a in t.arrays:
                        if a.relation == r.id and a.group == gid:
                            per_leaf.setdefault(a.leaf, {})[a.state] = values[a.id]
                    leaves = []
                    for li in sorted(per_leaf):
                        per = per_leaf[li]
                        if None in per:
                            leaves.append(per[None])
                        else:
                            ax = -1 if t.layout == "compact" else axis
                            leaves.append(jnp.stack([per[s] for s in sorted(per)], axis=ax))
                    out[(r.id, gid)] = b.w_tree(r.param, leaves)
                elif t.dim == "io":
                    x = next(values[a.id] for a in t.arrays if a.role == "eps_x")
                    f = next(values[a.id] for a in t.arrays
                             if a.role == "eps_f" and a.relation == r.id and a.group == gid)
                    out[(r.id, gid)] = {"x": x, "f": f}
        return out

    def ir(self, **settings) -> str:
        """The final IR as text: every trace, its decay α and the arrays the step keeps."""
        self._require()
        from .ir.printer import PrintSettings, print_graph
        return print_graph(self.graph, PrintSettings(**settings))

    def compiled(self):
        """A :class:`brainscale.Compiled` view (stages, records, DOT, report) of this learner."""
        self._require()
        from .compiled import Compiled
        return Compiled(self.graph, self.stages, self.records, self, self.compile_seconds or 0.0)

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

    def __init__(self, model, decay_or_rank=None, **kw):
        if decay_or_rank is None and kw.get("pipeline") is None:
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


def _place_sequence(learner, inputs, targets):
    """``(T, ...)`` inputs with the IR's input shardings; targets split like the batch."""
    from jax.sharding import NamedSharding, PartitionSpec
    b = learner._step.binding
    leaves, treedef = jax.tree.flatten(inputs)
    inputs = jax.tree.unflatten(treedef, list(b.place_args(leaves, learner.mesh, time_axis=True)))
    batch = learner.graph.batch
    ax = learner.batch_axis

    def put(t):
        shape = np.shape(t)
        if ax and batch and len(shape) >= 2 and shape[1] == batch:
            spec = (None, ax) + (None,) * (len(shape) - 2)
            return jax.device_put(t, NamedSharding(learner.mesh, PartitionSpec(*spec)))
        return t
    return inputs, jax.tree.map(put, targets)


def shard_pass(mesh, batch_axis: str | None = None, neuron_axis: str | None = None):
    """The ``shard`` pass for ``mesh`` (None without a mesh), with the default axis names."""
    if mesh is None:
        if batch_axis is not None or neuron_axis is not None:
            raise BrainscaleError("batch_axis / neuron_axis need mesh=jax.sharding.Mesh(...)")
        return None
    from .passes.shard import ShardPass, parse_mesh
    axes = [n for n, _ in parse_mesh(mesh)]
    if batch_axis is None and neuron_axis is None:
        batch_axis = "data" if "data" in axes else None
        neuron_axis = "model" if "model" in axes else None
        if batch_axis is None and neuron_axis is None:
            raise BrainscaleError(
                f"the mesh has axes {axes}: say which one splits the batch (batch_axis=...) "
                f"and/or which one splits the neurons (neuron_axis=...)")
    return ShardPass(mesh=tuple(f"{n}={k}" for n, k in parse_mesh(mesh)), batch=batch_axis,
                     neurons=neuron_axis)


def _own(cls, name: str) -> bool:
    """``cls`` (a Module class) defines ``name`` itself or below ``brainstate.nn.Module``."""
    return getattr(cls, name, None) is not getattr(brainstate.nn.Module, name, None)


def _set_at(root, path: tuple, obj) -> bool:
    """Put ``obj`` at ``path`` (attributes / keys / indices) inside ``root``."""
    parent = root
    for k in path[:-1]:
        parent = parent[k] if isinstance(parent, (dict, list, tuple)) or \
            (not isinstance(k, str) and hasattr(parent, "__getitem__")) else getattr(parent, k)
    last = path[-1]
    if isinstance(parent, (dict, list)) or (not isinstance(last, str)
                                            and hasattr(parent, "__setitem__")):
        parent[last] = obj
    else:
        setattr(parent, last, obj)
    return True


def uncovered_states(model) -> dict:
    """``{path: state}`` of the model's non-parameter states that no ``reset_state`` /
    ``init_state`` resets: their owner (the nearest module holding them) defines neither."""
    if not isinstance(model, brainstate.nn.Module):
        return {}
    nodes = {tuple(p): n for p, n in model.nodes().items()
             if isinstance(n, brainstate.nn.Module)}
    out = {}
    for path, st in model.states().items():
        path = tuple(path)
        if isinstance(st, brainstate.ParamState):
            continue
        owner = next((nodes[path[:i]] for i in range(len(path) - 1, -1, -1)
                      if path[:i] in nodes), None)
        if owner is None or not (_own(type(owner), "reset_state")
                                 or _own(type(owner), "init_state")):
            out[path] = st
    return out


def reset_model_states(model, batch_size: int | None = None, initial: dict | None = None,
                       **kwargs) -> None:
    """Reset ``model``: ``reset_state`` where a module defines one, else ``init_state``.

    A module that defines only ``init_state`` builds new state objects when called; their
    values are assigned into the old objects, which are put back in place, so everything
    bound to the model's states (a compiled learner, jitted functions) stays valid. States
    whose owner defines neither get their value from ``initial`` (``{path: value}``).
    """
    if not isinstance(model, brainstate.nn.Module):
        return
    before = {tuple(p): st for p, st in model.states().items()}
    for path, value in (initial or {}).items():
        if path in before:
            before[path].value = value
    kw = dict(kwargs)
    if batch_size is not None:
        kw["batch_size"] = batch_size
    brainstate.nn.reset_all_states(
        model, node_to_exclude=lambda path, node: not _own(type(node), "reset_state"), **kw)
    brainstate.nn.init_all_states(
        model, node_to_exclude=lambda path, node: _own(type(node), "reset_state")
        or not _own(type(node), "init_state"), **kw)
    for path, new in model.states().items():
        old = before.get(tuple(path))
        if old is None or old is new or type(old) is not type(new):
            continue
        old.value = new.value
        _set_at(model, tuple(path), old)


def start_sequence(learner, inputs, targets, reset: bool):
    """Before a sequence: reset the states and traces (``reset``) and, on a mesh, split the
    ``(T, B, ...)`` inputs and targets over the batch as the IR says."""
    if reset:
        learner.reset_state()
    if learner.mesh is not None and "sharding" in learner.graph.facts:
        inputs, targets = _place_sequence(learner, inputs, targets)
    return inputs, targets


def step_gradient(learner, params: dict, loss_fn: Callable) -> Callable:
    """``one(x, y) -> (grads, loss)``: one step of ``learner`` and the online gradient of
    ``loss_fn(out, y)`` for the ``params`` the step reads (the others have none: brainstate's
    grad refuses a state the function does not read)."""
    read = {id(st) for st in learner._bound_states()}
    used = {k: p for k, p in params.items() if id(p) in read}

    def one(x, y):
        def loss():
            return loss_fn(learner(x), y)
        if not used:
            return {}, loss()
        return brainstate.transform.grad(loss, used, return_value=True)()
    return one


def online_gradients(learner: ETraceAlgorithm, inputs, targets, loss_fn: Callable,
                     params=None, jit: bool = True, chunk: int = 1, reset: bool = True,
                     mesh=None, batch_axis: str | None = None, neuron_axis: str | None = None):
    """Run a sequence through ``learner`` and sum the online gradients over time.

    Args:
        learner: a compiled algorithm.
        inputs: array (or pytree) with a leading time axis ``(T, ...)``.
        targets: array with a leading time axis, passed to ``loss_fn(out_t, target_t)``.
        loss_fn: per-step loss returning a scalar.
        params: dict of ParamStates to differentiate (default: all of the model's).
        chunk: K > 1 runs windows of K steps. The ES-D-RTRL (io-dim) gradients of dense
            ops are summed with one (K·B)-row matrix product instead of K rank-B updates of
            the ``n_in × n_out`` gradient, and the D-RTRL (param-dim) traces of plain
            ``MatMulOp`` relations are advanced and read once per window instead of every step
            (their K steps of Jacobians, ``∂h/∂y``, ``δ`` and inputs enter through
            (K·B)-row products; ``brainscale.backends.drtrl_window``). Both are the same
            sums, reassociated: gradients, traces, states and losses equal the per-step loop
            up to float rounding. The loop then owns the step (no ``brainstate`` grad) and
            keeps K steps of those per-neuron quantities. Only for summed gradients: to
            apply an update every step, use 1. A learner compiled with ``backend='native'``
            (the D-RTRL update and its gradient read in one pass over the trace; the
            ES-D-RTRL gradient added into the sum in place) runs in that loop with any
            ``chunk``, 1 included, unless one of its traces needs the learner's own step
            (``online_driver.driver_error``).
        mesh / batch_axis / neuron_axis: run on a device mesh (see
            :meth:`ETraceAlgorithm.shard`; a learner compiled or sharded with this mesh
            already keeps it). The inputs and targets are split over ``batch_axis`` on their
            batch dimension (axis 1 after time), the states and traces as the IR says; the
            summed gradients equal the single-device ones.
        reset: True (default) starts the sequence from reset model states and zero traces
            (``learner.reset_state()``), so two identical calls give identical results; False
            continues from the current states and traces (a long sequence fed in pieces).

    Returns:
        ``(grads, losses)``: grads summed over time (same keys as ``params``) and the
        per-step losses ``(T,)``. With ``jit`` the loop is compiled with
        ``brainscale.backends.online_driver.driver_compiler_options()`` (on CPU, XLA's
        region-analysis copy insertion, which keeps the carried traces in place, and XLA's
        own matrix products instead of YNNPACK's when the step's dense ops have at most 16
        rows: faster at small batches). Memory
        does not depend on ``T``: the loop is a scan whose body takes the gradient of one
        step only (with ``chunk``, K steps of ``ε_x`` and ``ε_f∘δ``, and of the D-RTRL
        window's ``J``, ``∂h/∂y``, ``δ`` and ``x``, are kept).
    """
    learner._require()
    from .backends.online_driver import (callable_key, check_chunk, drive_online,
                                         driver_compiler_options, driver_error, needs_step_loop,
                                         options_key)
    check_chunk(chunk)
    if mesh is not None and (mesh is not learner.mesh or (batch_axis, neuron_axis) not in (
            (None, None), (learner.batch_axis, learner.neuron_axis))):
        learner.shard(mesh, batch_axis, neuron_axis)
    inputs, targets = start_sequence(learner, inputs, targets, reset)
    prog = learner._step.program
    if chunk != 1 or (needs_step_loop(prog) and driver_error(prog) is None):
        # windows, or a rule only the step-owning loop can call: a one-pass D-RTRL kernel
        # (native / Pallas; it needs δ^t in the step that updates the trace) or the native
        # ES-D-RTRL outer-accumulate (it adds into the running gradient sum)
        return drive_online(learner, inputs, targets, loss_fn, params=params, chunk=chunk,
                            jit=jit)
    if params is None:
        params = learner.model.states(brainstate.ParamState)
    one = step_gradient(learner, params, loss_fn)

    zero = {k: jax.tree.map(jnp.zeros_like, p.value) for k, p in params.items()}

    def body(acc, xy):
        g, l = one(*xy)
        return {k: jax.tree.map(jnp.add, acc[k], g[k]) if k in g else acc[k] for k in acc}, l

    def run(xs, ys):
        return brainstate.transform.scan(body, zero, (xs, ys))

    if jit:
        # one jitted loop per (loss function, parameters, bound states) and compiled step:
        # later calls with an equal loss function reuse it (see callable_key; the cached
        # closure holds ``params`` and the states, so the ids in the key stay unique)
        opts = driver_compiler_options(learner.graph)
        key = ("online", callable_key(loss_fn), tuple((k, id(v)) for k, v in params.items()),
               tuple(map(id, learner._bound_states())), options_key(opts))
        run = learner._cached_driver(key, lambda: brainstate.transform.jit(
            run, compiler_options=opts))
    return run(inputs, targets)
