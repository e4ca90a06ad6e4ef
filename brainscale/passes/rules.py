"""Per-primitive dependency rules and the dependency analysis they drive.

For every jaxpr variable the analysis computes a :class:`Dep`:

* ``hid``: hidden states ``h^{t-1}`` it depends on through **element-wise** paths only
  (neuron ``n`` of the variable depends on neuron ``n`` of the state), by IR name;
* ``ys``: trace-op outputs it depends on element-wise (op names ``%y0``, ...);
* ``mixed``: origins that reach it through a path that mixes neurons (a matmul that is not a
  trace op, a reduction, a transpose, ...), each with the first equation that mixed them;
* ``src``: every origin reaching it by any path (for display);
* ``direct``: trace-op outputs reaching it without passing through a new hidden value.

Trace-op equations are the sanctioned mixing points: their output depends on their own op
only. Which primitives are element-wise, shape-preserving or mixing is a rule table
(:data:`DEP_RULES`), extended with :func:`register_dependency_rule` — never a chain of ``if``
on primitive names. A primitive without a rule mixes whatever it reads; that is an error
only if it lies on a path into a hidden state.

Origins are IR names (``("h", "neu.V")``, ``("y", "%y0")``, ``("in", "u0")``), never
positions, so the result does not depend on the order of ``graph.ops``; it is cached per
traced step on exactly what it depends on (the inputs, hidden states and ops of the graph).
"""
from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from .. import _compat as C
from ..errors import BrainscaleError

__all__ = ["Dep", "RuleContext", "DependencyRule", "DEP_RULES", "register_dependency_rule",
           "analyze", "DepAnalysis", "EMPTY", "elementwise_error"]


@dataclass(frozen=True)
class Dep:
    hid: frozenset = frozenset()
    ys: frozenset = frozenset()
    mixed: tuple = ()          # ((origin, eqn_index, reason), ...) sorted, one per origin
    src: frozenset = frozenset()
    direct: frozenset = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.hid or self.ys or self.mixed)


EMPTY = Dep()


def _merge_mixed(*groups) -> tuple:
    out: dict = {}
    for g in groups:
        for origin, eq, why in g:
            if origin not in out:
                out[origin] = (origin, eq, why)
    return tuple(sorted(out.values(), key=lambda t: (str(t[0]), t[1])))


def union(deps: Sequence[Dep]) -> Dep:
    return Dep(frozenset().union(*(d.hid for d in deps)),
               frozenset().union(*(d.ys for d in deps)),
               _merge_mixed(*(d.mixed for d in deps)),
               frozenset().union(*(d.src for d in deps)),
               frozenset().union(*(d.direct for d in deps)))


def mix(deps: Sequence[Dep], eqn_index: int, reason: str) -> Dep:
    """Every element-wise origin of ``deps`` becomes a mixed origin."""
    u = union(deps)
    new = [(("h", n), eqn_index, reason) for n in u.hid] + \
          [(("y", q), eqn_index, reason) for q in u.ys]
    return Dep(frozenset(), frozenset(), _merge_mixed(u.mixed, new), u.src, u.direct)


@dataclass(frozen=True)
class RuleContext:
    eqn: Any
    index: int                 # index of the top-level equation (for error messages)
    in_shapes: tuple
    out_shapes: tuple
    analyze_sub: Callable      # (closed_jaxpr, [Dep]) -> [Dep]


class DependencyRule(Protocol):
    def __call__(self, ctx: RuleContext, deps: list[Dep]) -> list[Dep]: ...


#: primitive name -> rule
DEP_RULES: dict[str, DependencyRule] = {}


def register_dependency_rule(*prims):
    """Decorator registering a rule for primitives (objects with ``.name`` or names)."""
    def deco(fn):
        for p in prims:
            DEP_RULES[getattr(p, "name", p)] = fn
        return fn
    return deco


def _suffix(small: tuple, big: tuple) -> bool:
    """``small`` broadcasts to ``big`` along leading axes only (size-1 leading axes of
    ``small``, which lax inserts for rank promotion, count as missing)."""
    small = tuple(small)
    while small and small[0] == 1 and len(small) > 0:
        small = small[1:]
    return len(small) <= len(big) and tuple(big[len(big) - len(small):]) == small


def elementwise_rule(ctx: RuleContext, deps: list[Dep]) -> list[Dep]:
    out_shape = ctx.out_shapes[0] if ctx.out_shapes else ()
    parts = []
    for d, s in zip(deps, ctx.in_shapes):
        if d.empty or tuple(s) == tuple(out_shape):
            parts.append(d)
            continue
        # a leading-axis broadcast keeps a neuron's identity for op outputs (batch axis)
        if not d.hid and len(s) > 0 and _suffix(tuple(s), tuple(out_shape)):
            parts.append(d)
            continue
        parts.append(mix([d], ctx.index, f"broadcast in '{ctx.eqn.primitive.name}'"))
    u = union(parts) if parts else EMPTY
    return [u] * len(ctx.out_shapes)


def identity_rule(ctx: RuleContext, deps: list[Dep]) -> list[Dep]:
    """Shape changes that keep each element's identity (reshape with equal size, ...)."""
    import numpy as np
    d = deps[0] if deps else EMPTY
    rest = deps[1:]
    if any(not r.empty for r in rest):
        return [mix(deps, ctx.index, ctx.eqn.primitive.name)] * len(ctx.out_shapes)
    if int(np.prod(ctx.in_shapes[0], dtype=np.int64)) == int(np.prod(ctx.out_shapes[0], dtype=np.int64)):
        return [d] * len(ctx.out_shapes)
    return [mix([d], ctx.index, ctx.eqn.primitive.name)] * len(ctx.out_shapes)


def broadcast_rule(ctx: RuleContext, deps: list[Dep]) -> list[Dep]:
    d = deps[0]
    s, o = tuple(ctx.in_shapes[0]), tuple(ctx.out_shapes[0])
    import numpy as np
    if d.empty or int(np.prod(s, dtype=np.int64)) == int(np.prod(o, dtype=np.int64)):
        return [union(deps)]
    dims = tuple(ctx.eqn.params.get("broadcast_dimensions", ()))
    if not d.hid and len(s) > 0 and dims == tuple(range(len(o) - len(s), len(o))) and _suffix(s, o):
        return [union(deps)]
    return [mix(deps, ctx.index, "broadcast_in_dim")]


def mixing_rule(ctx: RuleContext, deps: list[Dep]) -> list[Dep]:
    return [mix(deps, ctx.index, ctx.eqn.primitive.name)] * len(ctx.out_shapes)


def _unsupported_rule(ctx: RuleContext, deps: list[Dep]) -> list[Dep]:
    return [mix(deps, ctx.index, f"unsupported:{ctx.eqn.primitive.name}")] * len(ctx.out_shapes)


def _call_rule(ctx: RuleContext, deps: list[Dep]) -> list[Dep]:
    """custom_jvp_call / custom_vjp_call / remat: analyse the body."""
    subs = C.eqn_subjaxprs(ctx.eqn)
    n_in = len(ctx.eqn.invars)
    for sub in subs:
        if len(C.open_jaxpr(sub).invars) == n_in:
            return ctx.analyze_sub(sub, deps)
    return _unsupported_rule(ctx, deps)


#: set while a custom derivative rule's JVP is analysed
_IN_DERIVATIVE: contextvars.ContextVar = contextvars.ContextVar("_IN_DERIVATIVE", default=False)


def _custom_derivative_rule(ctx: RuleContext, deps: list[Dep]) -> list[Dep]:
    """custom_jvp_call / custom_vjp_call: the primal body and the derivative rule.

    The compiled step is linearised through the *custom* derivative (the user's jvp rule, or
    the JVP derived from a custom_vjp's backward rule), which need not have the primal's
    structure: a backward rule that centres the cotangent across neurons makes an
    element-wise forward mix neurons. Both are analysed (the traced JVP with each tangent
    carrying its primal's dependence) and their dependences united.
    """
    outs = _call_rule(ctx, deps)
    if all(d.empty for d in deps) or _IN_DERIVATIVE.get():
        # nothing reaching it is differentiated; or this is the primal inside a derivative
        # rule being analysed (its own derivative is not taken: no second order)
        return outs
    name = ctx.eqn.primitive.name
    try:
        closed, fl_in, fl_out = C.eqn_jvp_jaxpr(ctx.eqn)
    except BrainscaleError:
        raise                        # a custom_vjp whose backward rule cannot be transposed
    except Exception as e:  # noqa: BLE001 - a derivative JAX cannot trace here
        why = f"{name}: its derivative rule could not be traced ({type(e).__name__})"
        return [union([o, mix(deps, ctx.index, why)]) for o in outs]
    token = _IN_DERIVATIVE.set(True)
    try:
        res = ctx.analyze_sub(closed, list(deps) + [deps[i] for i in fl_in])
    finally:
        _IN_DERIVATIVE.reset(token)
    tangent = dict(zip(fl_out, res[len(ctx.out_shapes):]))
    return [union([o, tangent[i]]) if i in tangent else o for i, o in enumerate(outs)]


def _cond_rule(ctx: RuleContext, deps: list[Dep]) -> list[Dep]:
    branches = ctx.eqn.params["branches"]
    pred, ops = deps[0], deps[1:]
    outs = [ctx.analyze_sub(b, list(ops)) for b in branches]
    res = [union([o[i] for o in outs]) for i in range(len(ctx.out_shapes))]
    if not pred.empty:
        res = [union([r, mix([pred], ctx.index, "cond predicate")]) for r in res]
    return res


def passthrough_rule(ctx: RuleContext, deps: list[Dep]) -> list[Dep]:
    """Output ``i`` is input ``i`` (``optimization_barrier``, ``device_put``)."""
    return [deps[i] if i < len(deps) else EMPTY for i in range(len(ctx.out_shapes))]


def bitcast_rule(ctx: RuleContext, deps: list[Dep]) -> list[Dep]:
    """``bitcast_convert_type``: element-wise between types of one width; between widths the
    shape gains or loses a last axis and entries are split or merged (mixing)."""
    if tuple(ctx.in_shapes[0]) == tuple(ctx.out_shapes[0]):
        return elementwise_rule(ctx, deps)
    return mixing_rule(ctx, deps)


def random_gamma_rule(ctx: RuleContext, deps: list[Dep]) -> list[Dep]:
    """``random_gamma(key, alpha)``: sample ``n`` reads ``alpha[n]`` (element-wise) and the
    whole key (mixing): gamma noise whose shape follows a neuron's state stays per-neuron."""
    key, rest = deps[0], list(deps[1:])
    inner = RuleContext(ctx.eqn, ctx.index, ctx.in_shapes[1:], ctx.out_shapes, ctx.analyze_sub)
    parts = elementwise_rule(inner, rest) if rest else [EMPTY] * len(ctx.out_shapes)
    return [union([p, mix([key], ctx.index, ctx.eqn.primitive.name)]) for p in parts]


# The rule table, audited on jax 0.10.2 and 0.12 against what jax.numpy / jax.lax / jax.nn /
# brainunit.math / braintools.surrogate emit inside a neuron or synapse update (sub-jaxprs
# included). Names that exist only on some versions are marked; tests/test_rule_table.py
# builds a function emitting every name on the installed jax and checks its classification.

#: per-element, shape-preserving (scalar / leading-axis operands broadcast): output entry n
#: depends on the inputs' entry n only
_ELEMENTWISE = """add sub mul div neg max min pow integer_pow exp exp2 log log1p expm1 tanh
logistic sin cos tan sqrt rsqrt cbrt abs sign floor ceil round select_n clamp
convert_element_type erf erfc erf_inv atan2 sinh cosh asinh acosh atanh asin acos atan square
gt ge lt le eq ne and or not xor is_finite nextafter rem stop_gradient copy real imag complex
conj reduce_precision add_any shift_left shift_right_logical shift_right_arithmetic
population_count clz lgamma digamma polygamma igamma igammac igamma_grad_a
zeta bessel_i0e bessel_i1e regularized_incomplete_beta
log2 one_minus_square polynomial
heaviside_surrogate_gradient exprel""".split()
# jax 0.12 only: log2 (jnp.log2), one_minus_square, polynomial (jnp.sinc); library primitives:
# heaviside_surrogate_gradient (braintools.surrogate), exprel (brainunit 0.5: u.math.exprel)
#: keep every element's identity (equal element count, same order): reshape, squeeze,
#: checkpoint_name, with_sharding_constraint
_IDENTITY = "reshape squeeze name sharding_constraint".split()
#: output i is input i
_PASSTHROUGH = "optimization_barrier device_put".split()
#: an output entry reads several input entries (or moves them elsewhere): contractions,
#: reductions, scans along an axis, permutations, slicing / padding / concatenation (jnp.roll
#: is slice + concatenate), gathers and scatters (indexing, .at[]), sorting, pooling
_MIXING = """dot_general conv_general_dilated reduce_sum reduce_max reduce_min reduce_prod
reduce_and reduce_or reduce_xor argmax argmin cumsum cumprod cummax cummin cumlogsumexp
transpose concatenate slice dynamic_slice dynamic_update_slice gather scatter scatter-add
scatter-mul scatter-min scatter-max scatter-sub pad rev sort top_k iota split stack unstack
tile reduce_window_sum reduce_window_max reduce_window_min reduce_window""".split()
# jax 0.12 only: unstack (jnp.unstack)
#: random numbers: every output depends on the whole key (and on nothing else), so noise drawn
#: from a key that depends on no hidden state adds no hidden dependence (``random_gamma``'s
#: shape parameter is read per element: :func:`random_gamma_rule`)
_RANDOM = """random_seed random_bits random_wrap random_unwrap random_split random_fold_in
random_clone threefry2x32 rng_bit_generator rng_uniform""".split()

for _n in _ELEMENTWISE:
    DEP_RULES[_n] = elementwise_rule
for _n in _IDENTITY:
    DEP_RULES[_n] = identity_rule
for _n in _PASSTHROUGH:
    DEP_RULES[_n] = passthrough_rule
for _n in _MIXING + _RANDOM:
    DEP_RULES[_n] = mixing_rule
DEP_RULES["broadcast_in_dim"] = broadcast_rule
DEP_RULES["bitcast_convert_type"] = bitcast_rule
DEP_RULES["random_gamma"] = random_gamma_rule
for _n in C.CALL_NAMES:
    DEP_RULES[_n] = _call_rule
for _n in ("custom_jvp_call",) + tuple(C.CUSTOM_VJP_NAMES):
    DEP_RULES[_n] = _custom_derivative_rule
DEP_RULES["cond"] = _cond_rule
# loops are not analysed: a scan / while_loop on a path into a hidden state is refused (with
# a hint to unroll it); one that only reads inputs or parameters is fine
for _n in ("scan", "while"):
    DEP_RULES[_n] = _unsupported_rule


@dataclass(frozen=True)
class DepAnalysis:
    """Result of :func:`analyze` on a lowered graph, keyed by IR names."""
    hidden_out: dict = field(default_factory=dict)   # hidden name -> Dep of h^t
    op_x: dict = field(default_factory=dict)         # op name -> Dep of its input x
    out_direct: frozenset = frozenset()              # op names reaching outputs directly
    cuts: dict = field(default_factory=dict)         # eqn -> (weight operand, plain params)


def _shapes(vs):
    return tuple(tuple(getattr(v.aval, "shape", ())) for v in vs)


#: linear maps that mix neurons; with a plain-parameter operand they are a *cut* (below)
_LINEAR_MAPS = ("dot_general", "conv_general_dilated")


def _plain_only(d: Dep) -> bool:
    """``d`` comes from plain parameters (and constants) only."""
    return bool(d.src) and not (d.hid or d.ys or d.mixed) and all(k == "p" for k, _ in d.src)


def _cut(eqn, deps) -> int | None:
    """The operand position of the plain weight when ``eqn`` is a linear map applying a plain
    parameter (``brainstate.ParamState``, not a trace parameter) to activity that depends on
    hidden states or op outputs element-wise; else None. Such a map is treated like a trace
    op whose parameter keeps no trace: the paths through it are cut from the element-wise
    analysis (and from J and df), the weight gets its one-step gradient only (and a
    NoTemporalCreditWarning)."""
    if eqn.primitive.name not in _LINEAR_MAPS or len(deps) != 2:
        return None
    for w, a in ((0, 1), (1, 0)):
        if _plain_only(deps[w]) and (deps[a].hid or deps[a].ys) and not deps[a].mixed:
            return w
    return None


def _run(jaxpr, in_deps: list[Dep], top_index: int | None, op_of_eqn: dict,
         hidden_out_vars: dict, env_out: dict | None = None,
         cuts: dict | None = None, x_elementwise: frozenset = frozenset()) -> list[Dep]:
    env: dict = {}
    for v, d in zip(jaxpr.invars, in_deps):
        env[v] = d

    def rd(v):
        return EMPTY if C.is_literal(v) else env.get(v, EMPTY)

    for ei, eqn in enumerate(jaxpr.eqns):
        idx = ei if top_index is None else top_index
        deps = [rd(v) for v in eqn.invars]
        q = op_of_eqn.get(ei) if top_index is None else None
        if q is not None:
            u = union(deps) if deps else EMPTY
            # the op cuts element-wise dependence, but a path that reaches the outputs
            # through this op (and no new hidden value) is still a direct path; an op whose
            # output is element-wise in its input passes the input's dependence through
            x = deps[0] if ei in x_elementwise and deps else EMPTY
            outs = [Dep(x.hid, x.ys | {q}, x.mixed, u.src | {("y", q)}, u.direct | {q})]
        elif cuts is not None and top_index is None and _cut(eqn, deps) is not None:
            w = _cut(eqn, deps)
            cuts[ei] = (w, tuple(sorted(n for _, n in deps[w].src)))
            u = union(deps)
            outs = [Dep(frozenset(), frozenset(), (), u.src, u.direct)] * len(eqn.outvars)
        else:
            rule = DEP_RULES.get(eqn.primitive.name, _unsupported_rule)

            def sub(closed, ds, _idx=idx):
                return _run(C.open_jaxpr(closed), ds, _idx, {}, {})
            ctx = RuleContext(eqn, idx, _shapes(eqn.invars), _shapes(eqn.outvars), sub)
            outs = list(rule(ctx, deps))
            srcs = union(deps) if deps else EMPTY
            outs = [Dep(o.hid, o.ys, o.mixed, o.src | srcs.src, o.direct | srcs.direct)
                    for o in outs]
        for ov, d in zip(eqn.outvars, outs):
            if top_index is None and ov in hidden_out_vars:
                d = Dep(d.hid, d.ys, d.mixed, d.src, frozenset())   # direct paths end at h^t
            env[ov] = d
    if env_out is not None:
        env_out.update(env)
    return [rd(v) for v in jaxpr.outvars]


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def analyze(graph) -> DepAnalysis:
    """Run the dependency analysis on a lowered graph.

    Cached per traced step (``graph.info``) and per what the result depends on: the graph's
    inputs, hidden states and ops (so a pass that reorders or drops ops gets a fresh,
    consistent analysis)."""
    info = graph.info
    if info is None:
        raise ValueError("the graph carries no traced step (StepInfo); lower it with "
                         "brainscale.lower(model, *inputs)")
    key = (graph.inputs, graph.hidden, graph.params, graph.ops)
    per_info = _CACHE.setdefault(info, {})
    cached = per_info.get(key)
    if cached is not None:
        return cached
    jaxpr = C.open_jaxpr(info.jaxpr)
    hid_by_invar = {h.invar: h.name for h in graph.hidden}
    in_by_invar = {i.invar: i.name for i in graph.inputs}
    plain_by_invar = {i: p.name for p in graph.params if p.kind == "plain" for i in p.invars}
    in_deps = []
    for i, v in enumerate(jaxpr.invars):
        if i in hid_by_invar:
            n = hid_by_invar[i]
            in_deps.append(Dep(frozenset({n}), frozenset(), (), frozenset({("h", n)})))
        elif i in in_by_invar:
            in_deps.append(Dep(src=frozenset({("in", in_by_invar[i])})))
        elif i in plain_by_invar:
            # a plain parameter is no origin of the analysis; it is tracked (``src``) so
            # that one on a path into a hidden state can be reported (no temporal credit)
            in_deps.append(Dep(src=frozenset({("p", plain_by_invar[i])})))
        else:
            in_deps.append(EMPTY)
    op_of_eqn = {o.eqn: o.name for o in graph.ops}
    hidden_out_vars = {jaxpr.outvars[h.outvar]: h.name for h in graph.hidden}
    env: dict = {}
    cuts: dict = {}
    _run(jaxpr, in_deps, None, op_of_eqn, hidden_out_vars, env, cuts,
         frozenset(o.eqn for o in graph.ops if o.x_elementwise))

    def rd(v):
        if C.is_literal(v):
            return EMPTY
        if v in env:
            return env[v]
        return in_deps[jaxpr.invars.index(v)] if v in jaxpr.invars else EMPTY

    hidden_out = {h.name: rd(jaxpr.outvars[h.outvar]) for h in graph.hidden}
    op_x = {o.name: (rd(jaxpr.eqns[o.eqn].invars[0]) if o.n_x_leaves else EMPTY)
            for o in graph.ops}
    # outputs: the step's output leaves and written non-hidden states
    hidden_outvars = {h.outvar for h in graph.hidden}
    direct = set()
    for i, ov in enumerate(jaxpr.outvars):
        if i in hidden_outvars:
            continue
        if i >= info.n_out_leaves and ov in jaxpr.invars:
            continue   # an unchanged state
        direct |= set(rd(ov).direct)
    # an op output feeding another op's input without a new hidden value in between also
    # reaches the loss along paths no trace of its own covers (through the other op)
    for o in graph.ops:
        direct |= set(op_x[o.name].direct)
    res = DepAnalysis(hidden_out=hidden_out, op_x=op_x, out_direct=frozenset(direct),
                      cuts=cuts)
    per_info[key] = res
    return res


def elementwise_error(fn: Callable, value: Any, what: str) -> "str | None":
    """None when ``fn(value)`` is element-wise in ``value`` *for every value*, else why not.

    The proof is structural: ``fn`` is traced on abstract values of ``value``'s leaves
    (brainunit quantities keep their unit) and the dependency rules of this module walk its
    jaxpr; the output must have the shape of every leaf and depend on each leaf only at the
    same index. It does not look at the current numbers, so a normalisation that is
    harmless while the weight is zero, or a norm clip while the norm is below its cap, is
    still found. Non-float parameters need no trace and pass.
    """
    import brainunit as u
    import jax
    import jax.numpy as jnp
    import numpy as np

    is_q = lambda l: isinstance(l, u.Quantity)  # noqa: E731
    leaves, treedef = jax.tree.flatten(value, is_leaf=is_q)
    units = [l.unit if is_q(l) else None for l in leaves]
    mants = [u.get_mantissa(l) if is_q(l) else l for l in leaves]
    if not mants or not all(jnp.issubdtype(jnp.result_type(m), jnp.inexact) for m in mants):
        return None
    avals = [jax.ShapeDtypeStruct(tuple(np.shape(m)), jnp.result_type(m)) for m in mants]

    def f(*ms):
        vals = [m if un is None else u.Quantity(m, unit=un) for m, un in zip(ms, units)]
        out = fn(jax.tree.unflatten(treedef, vals))
        return u.get_mantissa(out) if is_q(out) else out
    try:
        closed = C.inline_calls(jax.make_jaxpr(f)(*avals))
    except Exception as e:  # noqa: BLE001 - a function JAX cannot trace
        return f"{what} could not be traced to check that it is element-wise ({type(e).__name__}: {e})"
    jaxpr = C.open_jaxpr(closed)
    if len(jaxpr.outvars) != 1:
        return f"{what} returns {len(jaxpr.outvars)} arrays, not one"
    out_shape = tuple(getattr(jaxpr.outvars[0].aval, "shape", ()))
    for a in avals:
        if tuple(a.shape) != out_shape:
            return f"{what} changes the shape {tuple(a.shape)} -> {out_shape}"
    ins = [Dep(frozenset({f"w{i}"}), src=frozenset({("h", f"w{i}")})) for i in range(len(avals))]
    (out,) = _run(jaxpr, ins, None, {}, {})
    if out.mixed:
        _, eqn_index, reason = out.mixed[0]
        how = reason.split(":", 1)[1] + " (no dependency rule)" if reason.startswith(
            "unsupported:") else reason
        return (f"{what} is not element-wise: its output entries depend on other weight entries "
                f"through '{how}', so the compact trace would drop cross terms")
    return None
