"""Graph-wide invariants of the etrace IR (local ones are checked by each node)."""
from __future__ import annotations

from ..errors import IRVerificationError
from .layout import check_trace_arrays
from .nodes import AXIS_DEFAULTS, PARAM_LAYOUTS
from .printer import print_graph

__all__ = ["verify", "axes_error"]


def _fail(graph, msg: str, needle: str | None = None):
    text = print_graph(graph)
    excerpt = ""
    if needle:
        lines = text.splitlines()
        for i, ln in enumerate(lines):
            if needle in ln:
                lo, hi = max(0, i - 2), min(len(lines), i + 3)
                marked = [("> " if j == i else "  ") + lines[j] for j in range(lo, hi)]
                excerpt = "\n" + "\n".join(marked)
                break
    raise IRVerificationError(f"invalid IR: {msg}{excerpt}")


def verify(graph) -> None:
    """Check the invariants every pass must preserve.

    Raises:
        IRVerificationError: naming the first violated invariant with an IR excerpt.
    """
    _verify_sharding(graph)
    names: dict[str, str] = {}
    for kind, items in (("input", graph.inputs), ("hidden", graph.hidden),
                        ("param", graph.params), ("value", graph.values), ("op", graph.ops)):
        for it in items:
            if it.name in names:
                _fail(graph, f"name {it.name!r} is defined twice ({names[it.name]} and {kind})",
                      it.name)
            names[it.name] = kind
    for o in graph.ops:
        if o.param not in graph.param_by_name:
            _fail(graph, f"op {o.name} uses unknown param {o.param!r}", o.name)
        if graph.param_by_name[o.param].kind != "etrace":
            _fail(graph, f"op {o.name} applies param {o.param!r} which is not an etrace param",
                  o.name)
        if o.x is not None and o.x not in graph.value_by_name:
            _fail(graph, f"op {o.name} reads unknown value {o.x!r}", o.name)
        if o.layout == "channel":
            why = _channel_error(graph, o)
            if why:
                _fail(graph, f"op {o.name} has layout=channel but {why}", o.name)
        if graph.info is not None and o.name not in graph.info.ops:
            _fail(graph, f"op {o.name} has no op object in the traced step (StepInfo.ops); "
                         f"ops must keep the names the frontend gave them", o.name)
    for v in graph.values:
        for d in v.deps:
            if d not in names:
                _fail(graph, f"value {v.name} depends on unknown {d!r}", v.name)
    seen: dict[str, str] = {}
    for g in graph.groups:
        if not g.states:
            _fail(graph, f"group {g.id} is empty", f"group {g.id}")
        for s in g.states:
            h = graph.hidden_by_name.get(s)
            if h is None:
                _fail(graph, f"group {g.id} holds unknown hidden state {s!r}", f"group {g.id}")
            if s in seen:
                _fail(graph, f"hidden state {s!r} is in groups {seen[s]} and {g.id}", f"group {g.id}")
            seen[s] = g.id
            if tuple(h.type.shape) != tuple(g.varshape):
                _fail(graph, f"group {g.id} varshape {list(g.varshape)} differs from the shape "
                             f"{list(h.type.shape)} of its state {s!r}", f"group {g.id}")
    if len({g.id for g in graph.groups}) != len(graph.groups):
        _fail(graph, "group ids are not unique")
    for r in graph.relations:
        if r.op not in graph.op_by_name:
            _fail(graph, f"relation {r.id} names unknown op {r.op!r}", f"rel {r.id}")
        if graph.op_by_name[r.op].param != r.param:
            _fail(graph, f"relation {r.id} pairs {r.op} with {r.param!r} but the op applies "
                         f"{graph.op_by_name[r.op].param!r}", f"rel {r.id}")
        y = graph.op_by_name[r.op].type.shape
        for gid in r.groups:
            g = graph.group_by_id.get(gid)
            if g is None:
                _fail(graph, f"relation {r.id} names unknown group {gid!r}", f"rel {r.id}")
            vs = tuple(g.varshape)
            if tuple(vs[len(vs) - len(y):]) != tuple(y):
                _fail(graph, f"relation {r.id}: op output {list(y)} does not match the neuron "
                             f"shape {list(vs)} of {gid}", f"rel {r.id}")
    covered: dict[str, str] = {}
    for t in graph.traces:
        _verify_trace(graph, t, covered)
    readouts: dict = {}
    for t in graph.traces:
        if t.dim == "none":
            continue
        for rid in t.relations:
            r = graph.relation_by_id.get(rid)
            if r is None:
                continue
            other = readouts.setdefault(r.param, (t.id, t.readout))
            if other[1] != t.readout:
                _fail(graph, f"traces {other[0]} and {t.id} of parameter {r.param!r} have "
                             f"readout={other[1]} and readout={t.readout}: readout=step takes "
                             f"the parameter's whole instantaneous gradient from the step's "
                             f"VJP, so every trace of one parameter needs the same readout",
                      f"trace {t.id} =")
    if "trace-dims" in graph.facts:
        for r in graph.relations:
            if r.id not in covered:
                _fail(graph, f"relation {r.id} has no trace after select-dims", f"rel {r.id}")
    if "trace-arrays" in graph.facts:
        for t in graph.traces:
            if t.dim != "none" and not t.arrays:
                _fail(graph, f"trace {t.id} has no arrays after layout-traces: lay it out with "
                             f"brainscale.passes.layout_trace(graph, trace) (or rerun "
                             f"'layout-traces' after the pass that built it)", f"trace {t.id} =")


#: trace note keys that would read like (and print over) a typed field
_TYPED_KEYS = ("layout", "shared_x", "alpha", "decay", "rank", "decay_rank", "path", "bytes",
               "arrays", "storage", "recursion", "scope", "signal", "filter", "schedule",
               "kappa", "snap_n", "window", "readout")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def axes_error(t) -> str | None:
    """Why the rule axes of trace ``t`` do not form a rule (None when they do).

    The message names the axis (and the value) that is wrong and says what fits; the
    verifier prefixes the trace, ``select-dims`` the relations it was choosing for.
    """
    nondefault = [f"{k}={getattr(t, k)}" for k in AXIS_DEFAULTS if getattr(t, k) != AXIS_DEFAULTS[k]]
    if t.dim == "none":
        if nondefault or t.kappa is not None or t.snap_n is not None or t.window is not None:
            return (f"dim=none keeps no trace, so it has no rule axes, but it sets "
                    f"{', '.join(nondefault) or 'coefficients'}; drop them")
        return None
    # coefficients belong to their axis value
    if (t.filter in ("kappa", "kappa_out")) != (t.kappa is not None):
        return (f"filter={t.filter} with kappa={t.kappa}: filter=kappa / kappa_out needs the "
                f"low-pass factor kappa in (0, 1), and kappa needs filter=kappa or kappa_out")
    if t.kappa is not None and not 0.0 < float(t.kappa) < 1.0:
        return f"filter={t.filter} needs kappa in (0, 1), got kappa={t.kappa}"
    if (t.scope == "sparse") != (t.snap_n is not None):
        return (f"scope={t.scope} with snap_n={t.snap_n}: scope=sparse needs the SnAp order "
                f"snap_n (an int >= 1), and snap_n needs scope=sparse")
    if t.snap_n is not None and not _positive_int(t.snap_n):
        return f"scope=sparse needs snap_n to be an int >= 1, got snap_n={t.snap_n!r}"
    if (t.schedule == "window") != (t.window is not None):
        return (f"schedule={t.schedule} with window={t.window}: schedule=window needs the "
                f"number of steps per window (window=K), and window needs schedule=window")
    if t.window is not None and not _positive_int(t.window):
        return f"schedule=window needs window to be an int >= 1, got window={t.window!r}"
    # the recursion and its decay
    if t.recursion == "leak" and (t.decay is None or not 0.0 < float(t.decay) < 1.0):
        return (f"recursion=leak replaces J by a scalar leak alpha: it needs decay alpha in "
                f"(0, 1), got decay={t.decay!r}")
    if t.dim == "param" and t.recursion != "leak" and t.decay is not None:
        return (f"recursion={t.recursion} on a param-dim trace has no decay, but decay="
                f"{t.decay} is set: drop it, or use recursion=leak")
    if t.dim == "io" and t.recursion == "none" and t.decay is not None:
        return (f"recursion=none keeps no previous trace, so decay={t.decay} has no effect on "
                f"the io-dim trace; drop it (or use recursion=leak / jacobian)")
    # scope
    if t.scope != "diagonal":
        if t.dim == "io":
            return (f"scope={t.scope} needs dim=param: an io-dim trace factorises eps into "
                    f"eps_x x eps_f along the op's own neurons and cannot hold the influence on "
                    f"other neurons' states; use scope=diagonal, or dim=param")
        if t.recursion != "jacobian":
            return (f"scope={t.scope} chooses which paths of the hidden-to-hidden Jacobian the "
                    f"trace keeps, so it needs recursion=jacobian, not recursion={t.recursion}")
        if t.dim == "param" and t.layout != "dense" and t.scope != "block":
            return (f"scope={t.scope} keeps a dense influence matrix: it needs layout=dense, "
                    f"not layout={t.layout}")
        if t.filter != "none":
            return (f"filter={t.filter} applies to a diagonal per-parameter trace (e-prop); "
                    f"scope={t.scope} needs filter=none")
        if t.signal != "symmetric" and t.scope not in ("group", "block"):
            return (f"scope={t.scope} is exact up to its pattern: its gradient is the full VJP "
                    f"of the step with the trace, so it needs signal=symmetric, not "
                    f"signal={t.signal}")
    if t.dim == "random":
        if t.scope != "coupled":
            return (f"dim=random (UORO) projects the exact influence matrix: it needs "
                    f"scope=coupled, not scope={t.scope}")
        if t.layout is not None or t.shared_x is not None or t.decay is not None:
            return "dim=random keeps a rank-1 pair u_h, u_p: it sets no layout, shared_x or decay"
    # the read-out: the exact scopes read their influence through the step's VJP
    exact = t.dim == "random" or t.scope in ("coupled", "sparse")
    if exact and t.readout != "step":
        what = "dim=random" if t.dim == "random" else f"scope={t.scope}"
        return (f"{what} reads its gradient as ∂L/∂θ|h + ∂L/∂h^(t-1) · M^(t-1) through the "
                f"full VJP of the step (readout=step), not readout={t.readout}")
    if t.readout == "step":
        if t.filter != "none":
            return (f"readout=step reads the previous trace through the step's VJP, but "
                    f"filter={t.filter} reads the filtered trace with the signal of step t: "
                    f"use readout=trace with a filter, or filter=none")
        if t.signal not in ("symmetric", "synthetic"):
            return (f"readout=step takes the exact cotangent of the step's loss (plus ĝ for "
                    f"signal=synthetic) back through the step; signal={t.signal} has no such "
                    f"cotangent: use readout=trace")
    if t.filter in ("kappa", "kappa_out") and t.dim != "param":
        return (f"filter={t.filter} low-pass filters a per-parameter trace; dim={t.dim} keeps "
                f"factors whose filtered sum is not a product of filtered factors: use "
                f"dim=param")
    if t.filter == "kappa_out":
        if t.signal not in ("symmetric", "random"):
            return (f"filter=kappa_out contracts the filtered eligibility trace with the "
                    f"learning signal at the neuron's output, L = dE/dz (symmetric or "
                    f"through random feedback); signal={t.signal} gives no such signal: use "
                    f"filter=kappa")
        if t.layout not in ("compact", "dense"):
            return (f"filter=kappa_out runs on the compact and dense layouts, not "
                    f"layout={t.layout}; use layout=dense, or filter=kappa")
    return None


#: structural proofs the verifier runs again on every graph, registered by the layer that owns
#: the analysis (the IR does not import the passes): name -> ``fn(graph, gid) -> why | None``
STRUCTURAL_PROOFS: dict = {}


def group_output_error(graph, gid) -> str | None:
    """Why group ``gid``'s ``output`` is not the value the structure proves (None if it is):
    set, a value of the graph, defined by the equation that computes the proven ``z``
    (the proof: ``STRUCTURAL_PROOFS['group-output']``, registered by
    :mod:`brainscale.passes.outputs`)."""
    grp = graph.group_by_id[gid]
    if grp.output is None:
        return (f"group {gid} has no output: run select-dims with filter=kappa_out (it sets "
                f"the groups' outputs), or set HiddenGroup.output to its Value")
    if graph.value_by_name.get(grp.output) is None:
        return f"group {gid} names output {grp.output}, which is not a value of the graph"
    proof = STRUCTURAL_PROOFS.get("group-output")
    if proof is None:
        return ("no proof of a group's output is registered (import brainscale.passes): "
                "the output cannot be verified")
    return proof(graph, gid)


def _channel_error(graph, o) -> str | None:
    """Why an op's channel axes do not fit its output and parameter types, or None."""
    from .layout import channel_axes_error, neuron_shape, param_leaves
    return channel_axes_error(neuron_shape(o), [lt.shape for _, lt in param_leaves(graph, o.param)],
                              o.channel_axis, o.param_channel_axes)


def _verify_trace(graph, t, covered) -> None:
    here = f"trace {t.id} ="
    for k, _ in t.attrs:
        if k in _TYPED_KEYS:
            _fail(graph, f"trace {t.id} has a note attribute {k!r}, which shadows the typed "
                         f"field the backends read; set the Trace field instead "
                         f"(dataclasses.replace(trace, ...), then layout_trace)", here)
    if not t.relations:
        _fail(graph, f"trace {t.id} has no relation", here)
    for rid in t.relations:
        if rid not in graph.relation_by_id:
            _fail(graph, f"trace {t.id} names unknown relation {rid!r}", here)
        if rid in covered:
            _fail(graph, f"relation {rid} is traced by both {covered[rid]} and {t.id}", here)
        covered[rid] = t.id
    why = axes_error(t)
    if why:
        _fail(graph, f"trace {t.id}: {why}", here)
    rels = [graph.relation_by_id[rid] for rid in t.relations]
    ops = [graph.op_by_name[r.op] for r in rels]
    if t.filter == "kappa_out":
        for gid in dict.fromkeys(g for r in rels for g in r.groups):
            why = group_output_error(graph, gid)
            if why:
                _fail(graph, f"trace {t.id} has filter=kappa_out, but {why}", here)
    influence = t.dim == "random" or (t.dim == "param" and t.scope in ("coupled", "sparse"))
    if t.dim != "none" and not influence:
        for r in rels:
            if not r.groups:
                _fail(graph, f"trace {t.id} is {t.dim}-dim but relation {r.id} reaches no hidden "
                             f"group, so there is nothing to trace: give it dim none", here)
    if t.dim == "param":
        if t.layout not in PARAM_LAYOUTS:
            _fail(graph, f"trace {t.id} is param-dim with layout={t.layout!r}; it must be one "
                         f"of {', '.join(PARAM_LAYOUTS)}", here)
        if t.layout == "compact":
            for o in ops:
                if o.layout != "compact":
                    why = f" ({o.layout_reason})" if o.layout_reason else ""
                    alt = "channel or dense" if o.layout == "channel" else "dense"
                    _fail(graph, f"trace {t.id} asks for layout=compact, but op {o.name} "
                                 f"({o.op_class}) is exact only with the {alt} per-output-"
                                 f"neuron layout{why}; use layout={o.layout} for {t.id}", here)
        if t.layout == "channel":
            for o in ops:
                if o.layout != "channel":
                    why = f" ({o.layout_reason})" if o.layout_reason else ""
                    _fail(graph, f"trace {t.id} asks for layout=channel, but op {o.name} "
                                 f"({o.op_class}) has layout={o.layout}: its parameter elements "
                                 f"are not proven to reach one output channel each{why}; use "
                                 f"layout={'dense' if o.layout == 'dense' else o.layout + ' or dense'}"
                                 f" for {t.id}", here)
        if t.shared_x is not None or t.decay_rank is not None:
            _fail(graph, f"trace {t.id} is param-dim but sets io-dim fields (shared_x / "
                         f"decay_rank)", here)
    elif t.dim == "io":
        for o in ops:
            if o.x is None:
                _fail(graph, f"trace {t.id} is io-dim but op {o.name} has no input x "
                             f"(element-wise ops need a param-dim trace)", here)
        if t.shared_x is None:
            _fail(graph, f"trace {t.id} is io-dim but has no shared_x (the op input whose "
                         f"eps_x it keeps)", here)
        for o in ops:
            if o.x != t.shared_x:
                _fail(graph, f"trace {t.id} shares eps_x of {t.shared_x}, but op {o.name} reads "
                             f"{o.x}; io-dim relations of one trace must read the same input",
                      here)
        if t.recursion != "none" and (t.decay is None or not 0.0 < float(t.decay) < 1.0):
            _fail(graph, f"trace {t.id} is io-dim and needs a decay alpha in (0, 1), got "
                         f"{t.decay!r}: select-dims{{decay=...}} (or decay_or_rank=... of the "
                         f"algorithm) sets it", here)
        if t.decay_rank is not None:
            r = int(t.decay_rank)
            if r <= 0 or abs((r - 1) / (r + 1) - float(t.decay)) > 1e-12:
                _fail(graph, f"trace {t.id} has decay={t.decay} but decay_rank={t.decay_rank}, "
                             f"which gives alpha=(r-1)/(r+1)={(r - 1) / (r + 1) if r > 0 else '?'}",
                      here)
        if t.layout is not None:
            _fail(graph, f"trace {t.id} is io-dim but has layout={t.layout!r} (param-dim only)",
                  here)
    elif t.dim == "none":
        if t.layout is not None or t.shared_x is not None or t.decay is not None:
            _fail(graph, f"trace {t.id} has dim none but sets layout / shared_x / decay", here)
    if t.arrays or "trace-arrays" in graph.facts:
        why = check_trace_arrays(graph, t)
        if why:
            _fail(graph, f"trace {t.id} ({t.dim}{', layout=' + t.layout if t.layout else ''}): "
                         f"{why}. Recompute its arrays with brainscale.passes.layout_trace(graph, "
                         f"trace) after changing it", here)


def _check_spec(graph, what: str, shape, spec, needle) -> None:
    sizes = dict(graph.mesh)
    if len(spec) != len(shape):
        _fail(graph, f"{what} has sharding {list(spec)} for {len(shape)} dimension(s)", needle)
    used = [a for a in spec if a is not None]
    if len(set(used)) != len(used):
        _fail(graph, f"{what} shards two dimensions over one mesh axis ({list(spec)})", needle)
    for d, a in zip(shape, spec):
        if a is None:
            continue
        if a not in sizes:
            _fail(graph, f"{what} is sharded over mesh axis {a!r}, which the graph's mesh "
                         f"{[n for n, _ in graph.mesh]} does not have", needle)
        if d % sizes[a]:
            _fail(graph, f"{what}: dimension of size {d} does not divide over mesh axis {a!r} "
                         f"of size {sizes[a]}", needle)


def _verify_sharding(graph) -> None:
    """Shardings (``shard`` pass) name the graph's mesh axes, one per dimension, dividing."""
    for i in graph.inputs:
        if i.sharding is not None:
            _check_spec(graph, f"input %{i.name}", i.type.shape, i.sharding, f"%{i.name}")
    for h in graph.hidden:
        if h.sharding is not None:
            _check_spec(graph, f"hidden state %{h.name}", h.type.shape, h.sharding,
                        f"hidden %{h.name}")
    for p in graph.params:
        if p.sharding is None:
            continue
        leaves = [t for _, t in p.type.fields] if hasattr(p.type, "fields") else [p.type]
        if len(p.sharding) != len(leaves):
            _fail(graph, f"param %{p.name} has {len(p.sharding)} leaf sharding(s) for "
                         f"{len(leaves)} leaves", f"param  %{p.name}")
        for t, spec in zip(leaves, p.sharding):
            if spec is not None:
                _check_spec(graph, f"param %{p.name}", t.shape, spec, f"param  %{p.name}")
    for t in graph.traces:
        for a in t.arrays:
            if a.sharding is not None:
                _check_spec(graph, f"trace array {a.id}", a.type.shape, a.sharding,
                            f"array {a.id} =")
