"""The output ``z`` of a hidden group: where e-prop's filtered eligibility trace is taken.

Bellec et al. (2020) low-pass filter the *eligibility trace* ``e^t = ∂z^t/∂h^t · ε^t`` at the
neuron's output ``z`` (its spike), and contract it with the learning signal
``L^t = ∂E^t/∂z^t``: ``∂E/∂θ ≈ Σ_t L^t · F_κ(e)^t`` (``filter=kappa_out``). Filtering the
eligibility vector ``ε`` of each state instead (``filter=kappa``) is a different rule unless
``ψ = ∂z/∂h`` is constant.

The output of group ``G`` is proven on the structure of the traced step, never on values:
it is the value ``z`` nearest to the step's outputs such that

1. every path from the group's new values ``h^t`` to the step's outputs, to other groups'
   new values and to other written states passes through ``z`` (``z`` post-dominates
   ``h^t``), so that ``∂E^t/∂h^t = L^t · ∂z^t/∂h^t`` holds exactly;
2. ``z`` is element-wise per neuron in ``h^t`` (neuron ``n`` of ``z`` depends on neuron ``n``
   of the group's states only), has the group's shape and a float dtype, and depends on no
   old hidden value, no trace-op output and no other group's new value (else ``dz/dθ`` has
   terms that ``e`` does not carry);
3. it is the single output of its equation.

When no value qualifies the pass that asks for it raises, saying why; a group whose output is
its new state itself (e.g. a GRU read out directly) gets ``z = h^t`` and ``ψ = 1``.
"""
from __future__ import annotations

import networkx as nx
import numpy as np

from .. import _compat as C
from ..errors import UnsupportedModelError
from ..ir.verify import STRUCTURAL_PROOFS
from .rules import DEP_RULES, EMPTY, Dep, RuleContext, _shapes, _unsupported_rule, union

__all__ = ["group_output", "output_value_name", "output_error"]


def output_value_name(gid: str) -> str:
    """The IR name of the output value of group ``gid`` (``G3`` -> ``%z3``)."""
    return f"%z{gid[1:]}"


def _new_value_deps(graph, jaxpr, group) -> dict:
    """Dependence of every variable on the group's *new* values (origins ``('new', name)``),
    on old hidden values (``('old', name)``), on other groups' new values and on trace-op
    outputs, through the dependency rules of :mod:`.rules`."""
    env: dict = {}
    for h in graph.hidden:
        v = jaxpr.invars[h.invar]
        env[v] = Dep(frozenset({("old", h.name)}), frozenset(), (), frozenset({("h", h.name)}))
    new_vars = {}
    for h in graph.hidden:
        new_vars.setdefault(jaxpr.outvars[h.outvar], []).append(h.name)
    mine = set(group.states)
    op_of_eqn = {o.eqn: o.name for o in graph.ops}

    def rd(v):
        return EMPTY if C.is_literal(v) else env.get(v, EMPTY)

    for ei, eqn in enumerate(jaxpr.eqns):
        deps = [rd(v) for v in eqn.invars]
        if ei in op_of_eqn:
            outs = [Dep(frozenset(), frozenset({op_of_eqn[ei]}), union(deps).mixed if deps else ())]
        else:
            rule = DEP_RULES.get(eqn.primitive.name, _unsupported_rule)

            def sub(closed, ds, _idx=ei):
                from .rules import _run
                return _run(C.open_jaxpr(closed), ds, _idx, {}, {})
            outs = list(rule(RuleContext(eqn, ei, _shapes(eqn.invars), _shapes(eqn.outvars), sub),
                             deps))
        for ov, d in zip(eqn.outvars, outs):
            names = new_vars.get(ov)
            if names:
                kind = "new" if all(n in mine for n in names) else "other"
                d = Dep(frozenset((kind, n) for n in names), frozenset(), (),
                        frozenset({("h", n) for n in names}))
            env[ov] = d
    return env


def _why_not(graph, group, env, var) -> str | None:
    """Why ``var`` is not an element-wise output of ``group`` (None when it is)."""
    d = env.get(var, EMPTY)
    if d.mixed:
        return "it mixes neurons (" + ", ".join(sorted({m[2] for m in d.mixed})) + ")"
    if d.ys:
        return f"it depends on trace-op output(s) {', '.join(sorted(d.ys))} directly"
    bad = sorted(n for k, n in d.hid if k != "new")
    if bad:
        return f"it depends on hidden value(s) {', '.join('%' + n for n in bad)} besides the group's new ones"
    if not d.hid:
        return "it does not depend on the group's states element-wise"
    if tuple(getattr(var.aval, "shape", ())) != tuple(group.varshape):
        return (f"its shape {list(var.aval.shape)} is not the group's "
                f"{list(group.varshape)}")
    if not np.issubdtype(np.dtype(var.aval.dtype), np.floating):
        return f"its dtype {var.aval.dtype} is not a float"
    return None


def group_output(graph, gid: str):
    """``(eqn index, var)`` of the output ``z`` of group ``gid`` (see the module docstring), or
    an :class:`UnsupportedModelError` saying why the group has none."""
    jaxpr = C.open_jaxpr(graph.info.jaxpr)
    group = graph.group_by_id[gid]
    by_name = graph.hidden_by_name
    own_out = {by_name[s].outvar for s in group.states}
    sources = {jaxpr.outvars[i] for i in own_out}
    sinks = {v for i, v in enumerate(jaxpr.outvars) if i not in own_out and not C.is_literal(v)}
    producer: dict = {}
    G = nx.DiGraph()
    SRC, SNK = ("src",), ("snk",)
    for ei, eqn in enumerate(jaxpr.eqns):
        for ov in eqn.outvars:
            producer[ov] = ei
            for iv in eqn.invars:
                if not C.is_literal(iv):
                    G.add_edge(iv, ov)
    for v in sources:
        G.add_edge(SRC, v)
    for v in sinks:
        G.add_edge(v, SNK)
    states = ", ".join("%" + s for s in group.states)
    if SNK not in G or not nx.has_path(G, SRC, SNK):
        raise UnsupportedModelError(
            f"group {gid} ({states}) reaches none of the step's outputs, so it has no output z "
            f"for filter=kappa_out; use filter=kappa (the filter on each state's trace)")
    R = G.reverse(copy=False)
    idom = nx.immediate_dominators(R, SNK)
    chain = []
    d = idom.get(SRC)
    while d is not None and d != SNK:
        chain.append(d)
        d = idom.get(d)
    env = _new_value_deps(graph, jaxpr, group)
    reasons = []
    for var in reversed(chain):          # nearest to the outputs first
        ei = producer.get(var)
        if ei is None:
            continue
        why = _why_not(graph, group, env, var)
        if why is None and len(jaxpr.eqns[ei].outvars) != 1:
            why = "its equation has several outputs"
        if why is None:
            return ei, var
        reasons.append(f"eqn {ei} ({jaxpr.eqns[ei].primitive.name}): {why}")
    if not chain:
        detail = ("its states reach the outputs along separate paths (no single value all "
                  "paths pass through)")
    else:
        detail = "no value on every path qualifies: " + "; ".join(reasons[-3:])
    raise UnsupportedModelError(
        f"group {gid} ({states}) has no output z for filter=kappa_out (e-prop's filter on "
        f"e = dz/dh * eps, Bellec et al. 2020): {detail}. A neuron's output must be one "
        f"element-wise value of its new states through which they reach everything else "
        f"(its spike). Use filter=kappa (EPropAlgorithm(..., kappa_at='state')) to filter "
        f"each state's trace instead")


def output_error(graph, gid) -> str | None:
    """The verifier's check (``STRUCTURAL_PROOFS['group-output']``): None when group
    ``gid``'s ``output`` names the value :func:`group_output` proves, else why not."""
    grp = graph.group_by_id[gid]
    v = graph.value_by_name[grp.output]
    try:
        ei, _ = group_output(graph, gid)
    except UnsupportedModelError as e:
        return str(e)
    if v.eqn != ei:
        return (f"group {gid}'s output {grp.output} is defined by eqn {v.eqn}; the value "
                f"every path of the group passes through, element-wise, is the output of eqn "
                f"{ei}: set output to that value")
    return None


STRUCTURAL_PROOFS["group-output"] = output_error
