"""Methods of brainscale 0.1's algorithm objects that code written for it calls.

:class:`LegacyAPIMixin` is a base of :class:`brainscale.ETraceAlgorithm`: ``mode=`` (checked
against the example inputs), :meth:`~LegacyAPIMixin.show_graph`,
:meth:`~LegacyAPIMixin.get_etrace_of`, :attr:`~LegacyAPIMixin.param_states`,
:attr:`~LegacyAPIMixin.hidden_states` and :attr:`~LegacyAPIMixin.other_states`. Where the
result differs from 0.1 the docstring says so (``docs/compat.md`` has the table).

It must not import ``brainscale.algorithms`` at module level (that module imports this one).
"""
from __future__ import annotations

import os
import re
import sys
import tempfile

from .errors import BrainscaleError

__all__ = ["LegacyAPIMixin"]


class _NoETraceError(BrainscaleError, ValueError):
    """``get_etrace_of`` found no trace (a ``ValueError`` as in 0.1, and a BrainscaleError)."""


def _batching_of(mode):
    """The ``Batching`` part of ``mode`` (itself, or one of a ``JointMode``'s), else None."""
    import brainstate
    if isinstance(mode, brainstate.mixin.Batching):
        return mode
    for m in getattr(mode, "modes", ()) or ():
        if isinstance(m, brainstate.mixin.Batching):
            return m
    has = getattr(mode, "has", None)
    if callable(has) and has(brainstate.mixin.Batching):
        return mode
    return None


def _check_mode_type(mode) -> None:
    import brainstate
    if mode is not None and not isinstance(mode, brainstate.mixin.Mode):
        raise TypeError(f"mode must be a brainstate.mixin.Mode (e.g. brainstate.mixin.Batching() "
                        f"for inputs with a leading batch axis) or None (inferred from the "
                        f"example inputs), got {type(mode).__name__}: {mode!r}")
    batching = _batching_of(mode) if mode is not None else None
    axis = getattr(batching, "batch_axis", 0)
    if batching is not None and axis not in (0, None):
        raise ValueError(f"mode={mode!r} puts the batch on axis {axis}; brainscale takes the "
                         f"batch as the leading axis (0) of inputs and states: move it there "
                         f"(e.g. jnp.moveaxis(x, {axis}, 0)) and pass "
                         f"brainstate.mixin.Batching()")


class LegacyAPIMixin:
    """brainscale 0.1 names on the algorithm object (``mode=``, ``show_graph``, ...)."""

    _mode = None

    # -- mode -----------------------------------------------------------------------------
    @property
    def mode(self):
        """brainscale 0.1's computing mode: ``brainstate.mixin.Batching()`` says the inputs
        and states carry a leading batch axis. None (the default) infers it from the example
        inputs (0.1 took ``brainstate.environ``'s mode, else a non-batching ``Mode()``). A
        given mode is checked against the example inputs by ``compile_graph``."""
        return self._mode

    @mode.setter
    def mode(self, mode) -> None:
        _check_mode_type(mode)
        self._mode = mode

    def _check_mode(self, graph, signature: str = "") -> None:
        """``mode`` must agree with the example inputs (``signature``: their dtypes and shapes)
        the step was compiled on: a batching mode with unbatched inputs, or a non-batching mode
        with batched ones, is an error."""
        mode = self.mode
        if mode is None:
            return
        _check_mode_type(mode)
        batching = _batching_of(mode) is not None
        batch = graph.batch_size
        if batching and not batch:
            raise BrainscaleError(
                f"mode={mode!r} says the inputs are batched, but the example inputs "
                f"({signature}) give no trace op or hidden state a batch axis; pass inputs with "
                f"a leading batch axis (and states initialised with "
                f"brainstate.nn.init_all_states(model, batch_size)), or drop mode= (the batch "
                f"is inferred from the inputs)")
        if not batching and batch:
            raise BrainscaleError(
                f"mode={mode!r} is not batching, but the example inputs ({signature}) carry a "
                f"batch axis of size {batch}; pass mode=brainstate.mixin.Batching(), drop "
                f"mode= (the batch is inferred from the inputs), or pass unbatched inputs")

    # -- states ---------------------------------------------------------------------------
    def _split_states(self) -> tuple[dict, dict, dict]:
        """The states the compiled step reads, split into parameters, hidden states and the
        rest, keyed by their path in ``model.states()`` (a tuple)."""
        import brainstate
        from ._group_states import ComponentView
        self._require()
        try:
            paths = {id(st): tuple(p) for p, st in self.model.states().items()}
        except Exception:  # noqa: BLE001 - a plain function model has no states()
            paths = {}
        params, hidden, other = {}, {}, {}
        seen = set()
        for st, name in zip(self._bound_states(), self.graph.info.state_paths):
            if isinstance(st, ComponentView):          # a component of a group state
                st, name = st.group, st.group_path
            if id(st) in seen or any(st is t for t in self._traces):
                continue
            seen.add(id(st))
            path = paths.get(id(st), tuple(str(name).split(".")))
            if isinstance(st, brainstate.ParamState):
                params[path] = st
            elif isinstance(st, brainstate.HiddenState):
                hidden[path] = st
            else:
                other[path] = st
        flat = brainstate.util.FlattedDict
        return flat(params), flat(hidden), flat(other)

    @property
    def param_states(self):
        """``{path: ParamState}`` of every parameter the compiled step reads (trace parameters
        and plain ones), as a ``brainstate.util.FlattedDict`` keyed by ``model.states()``
        paths, as in 0.1."""
        return self._split_states()[0]

    @property
    def hidden_states(self):
        """``{path: HiddenState}`` of the hidden states the compiled step reads (a
        ``HiddenGroupState`` / ``HiddenTreeState`` appears once, as the group state)."""
        return self._split_states()[1]

    @property
    def other_states(self):
        """``{path: State}`` of the other states the compiled step reads (neither parameters
        nor hidden states)."""
        return self._split_states()[2]

    # -- traces ---------------------------------------------------------------------------
    def _weight_name(self, weight) -> str:
        """The IR name of a parameter given as a state, a ``model.states()`` path or a name."""
        import brainstate
        if isinstance(weight, str):
            return weight
        if isinstance(weight, tuple):
            return ".".join(str(k) for k in weight)
        if isinstance(weight, brainstate.State):
            for st, name in zip(self._bound_states(), self.graph.info.state_paths):
                if st is weight:
                    return name
            raise _NoETraceError(f"{weight!r} is not read by the compiled step")
        raise TypeError(f"weight must be a brainstate.ParamState, its path in model.states() "
                        f"(a tuple) or its IR name, got {type(weight).__name__}")

    def get_etrace_of(self, weight):
        """The eligibility traces of ``weight`` in brainscale 0.1's form.

        ``weight`` is the ``ParamState``, its path in ``model.states()`` (tuple) or its IR
        name. The form follows the algorithm, as in 0.1:

        * io-dim (``IODimVjpAlgorithm`` / ``DiagIODimAlgorithm``): ``(etrace_xs, etrace_dfs)``,
          ``{op input name: ε_x}`` and ``{(op output name, group id): ε_f}`` (the group's
          states on the trailing axis), the keys of :attr:`etrace_xs` / :attr:`etrace_dfs`;
        * param-dim (``ParamDimVjpAlgorithm`` / ``DiagParamDimAlgorithm``):
          ``{(weight path, op output name, group id): ε}``, ``ε`` the parameter-shaped tree of
          :meth:`etrace_of`;
        * hybrid: ``(etrace_xs, etrace_dfs, etrace_bwg)``, the three above.

        0.1 keyed by jaxpr variables and group indices; these keys are the IR's names (the
        ones :meth:`ir` prints). An element-wise weight (``ElemWiseParam``) keeps a
        param-dim trace, also under the io-dim algorithm, where it is returned in
        ``etrace_dfs`` (0.1 kept its df trace there).

        Raises:
            ValueError (a BrainscaleError): the weight keeps no eligibility trace.
        """
        self._require()
        g = self.graph
        name = self._weight_name(weight)
        rels = [r for r in g.relations if r.param == name]
        if not rels:
            known = ", ".join(sorted({r.param for r in g.relations})) or "none"
            raise _NoETraceError(f"{name!r} is not a trace parameter of the compiled graph "
                                 f"(trace parameters: {known})")
        path = self._path_of(name)
        values = self._trace_values()
        per = self.etrace_of(name)
        xs, dfs, bws = {}, {}, {}
        for r in rels:
            t = g.trace_of_relation[r.id]
            for gid in r.groups:
                if t.dim == "io":
                    for a in t.arrays:
                        if a.role == "eps_x":
                            xs[a.value] = values[a.id]
                        elif a.role == "eps_f" and a.relation == r.id and a.group == gid:
                            dfs[(r.op, gid)] = values[a.id]
                elif t.dim == "param":
                    if self._policy == "io" and g.op_by_name[r.op].kind == "elemwise":
                        dfs[(r.op, gid)] = per[(r.id, gid)]
                    else:
                        bws[(path, r.op, gid)] = per[(r.id, gid)]
        if not (xs or dfs or bws):
            dims = ", ".join(sorted({g.trace_of_relation[r.id].dim for r in rels}))
            raise _NoETraceError(f"{name!r} keeps no eligibility trace (trace dim {dims}): it "
                                 f"gets its instantaneous gradient only; see learner.ir()")
        if self._policy == "io":
            if bws:
                raise BrainscaleError(
                    f"{name!r} keeps a param-dim (D-RTRL) trace (grad='full' or dim_overrides), "
                    f"which the io-dim form (etrace_xs, etrace_dfs) has no place for; use "
                    f"learner.etrace_of({name!r})")
            return xs, dfs
        if self._policy == "param":
            if xs or dfs:
                raise BrainscaleError(
                    f"{name!r} keeps an io-dim (ES-D-RTRL) trace (dim_overrides), which the "
                    f"param-dim form has no place for; use learner.etrace_of({name!r})")
            return bws
        return xs, dfs, bws

    def _path_of(self, name: str) -> tuple:
        try:
            for p, st in self.model.states().items():
                if ".".join(str(k) for k in p) == name:
                    return tuple(p)
        except Exception:  # noqa: BLE001 - a plain function model has no states()
            pass
        return tuple(name.split("."))

    # -- display --------------------------------------------------------------------------
    def show_graph(self, verbose: bool = True, return_msg: bool = False, path=None,
                   **settings):
        """Print the compiled IR (hidden groups, weights and the groups they reach, the
        traces and the arrays they keep) and render the graph with Graphviz where a renderer
        is installed.

        Args:
            verbose: print the IR text (0.1's argument).
            return_msg: return the IR text (0.1's argument); otherwise None.
            path: where to render (``.svg``, ``.png``, ``.pdf``; ``.dot`` writes the DOT
                text). Default: when a renderer is found (``brainscale.ir.dot.find_renderer``),
                an SVG in the system temp directory, whose path is printed; in a Jupyter
                kernel it is also displayed inline.
            **settings: :class:`brainscale.PrintSettings` fields for the IR text.

        0.1 printed a summary of hidden groups and weight-to-group relations; the IR holds
        the same and more.
        """
        self._require()
        from .ir.dot import find_renderer, render, to_dot
        msg = self.ir(**settings)
        if verbose:
            print(msg)
        target = path
        if target is None and find_renderer() is not None:
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.graph.name or "graph")
            target = os.path.join(tempfile.gettempdir(), "brainscale-graphs",
                                  f"{stem}-{id(self):x}.svg")
        if target is not None:
            written = render(to_dot(self.graph), target)
            if written is not None:
                if verbose:
                    print(f"brainscale: graph rendered to {written}")
                _display_inline(written)
        elif verbose:
            print("brainscale: no Graphviz renderer found, the graph is not rendered; pass "
                  "show_graph(path='graph.dot') for the DOT text, or install Graphviz's `dot` "
                  "or the `graphviz-pure` package to render it")
        return msg if return_msg else None


def _display_inline(path) -> None:
    """Show a rendered SVG/PNG inline when running in a Jupyter kernel."""
    ip_mod = sys.modules.get("IPython")
    if ip_mod is None:
        return
    try:
        ip = ip_mod.get_ipython()
        if ip is None or "IPKernelApp" not in getattr(ip, "config", {}):
            return
        from IPython.display import SVG, Image, display
        p = str(path)
        display(SVG(filename=p) if p.endswith(".svg") else Image(filename=p))
    except Exception:  # noqa: BLE001 - display is a convenience; the file is written anyway
        return
