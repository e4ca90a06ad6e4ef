"""The only module of brainscale that touches JAX internals.

JAX 0.11 merged ``ClosedJaxpr`` into ``Jaxpr`` (``ClosedJaxpr is Jaxpr``, a closed jaxpr's
``.jaxpr`` is itself, keyword construction ``ClosedJaxpr(jaxpr=..)`` fails). Everything the
rest of the package needs from a jaxpr goes through the helpers below, which never
type-dispatch between the two classes and only construct closed jaxprs positionally.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Sequence

import jax
from jax.extend import core as jcore
from jax.extend import source_info_util

__all__ = [
    "Var", "Literal", "Primitive", "ClosedJaxpr", "Jaxpr", "JaxprEqn",
    "open_jaxpr", "closed_consts", "make_closed", "is_literal", "literal_value",
    "eqn_subjaxprs", "inline_calls", "eval_eqn", "eqn_location", "JIT_NAMES",
    "jax_version",
]

Var = jcore.Var
Literal = jcore.Literal
Primitive = jcore.Primitive
ClosedJaxpr = jcore.ClosedJaxpr
Jaxpr = jcore.Jaxpr
JaxprEqn = jcore.JaxprEqn

#: names of the jit primitive across versions ('pjit' before jax 0.7)
JIT_NAMES = frozenset({"jit", "pjit"})
#: call-like primitives whose body can be inlined without changing semantics
#: (``jax.checkpoint`` / ``jax.remat`` bind ``remat2`` on jax 0.10-0.12; its body is an open
#: jaxpr on 0.10)
_INLINABLE = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "remat2",
                        "checkpoint"})

jax_version = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

# Report the user's frame, not ours or a library's, in error messages and --locs: frames in
# brainscale and in the brain-dynamics libraries a model is written with are skipped.
source_info_util.register_exclusion(os.path.dirname(os.path.abspath(__file__)))


def _exclude_library_frames():
    import importlib.util
    for name in ("brainstate", "braintools", "brainunit", "brainevent", "brainpy",
                 "brainpy_state"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                source_info_util.register_exclusion(os.path.abspath(loc))


_exclude_library_frames()


def open_jaxpr(closed: Any) -> Any:
    """The open jaxpr (invars/eqns/outvars) of a closed one, on any jax version (an open
    jaxpr, e.g. the body of ``jax.checkpoint`` on jax 0.10, is returned as it is)."""
    return getattr(closed, "jaxpr", closed)


def closed_consts(closed: Any) -> list:
    return list(getattr(closed, "consts", ()))


def make_closed(jaxpr: Any, consts: Sequence[Any]) -> Any:
    """Build a closed jaxpr positionally (the keyword form breaks on jax >= 0.11)."""
    return ClosedJaxpr(jaxpr, list(consts))


def is_literal(v: Any) -> bool:
    return isinstance(v, Literal)


def literal_value(v: Any) -> Any:
    return v.val


def eqn_subjaxprs(eqn: Any) -> list:
    """Closed sub-jaxprs held in an equation's params (jit body, cond branches, ...)."""
    out = []
    for val in eqn.params.values():
        vals = val if isinstance(val, (tuple, list)) else (val,)
        for v in vals:
            if hasattr(v, "eqns") or (hasattr(v, "jaxpr") and hasattr(v, "consts")):
                out.append(v)
    return out


#: jax primitive names by what they are, across jax 0.10 - 0.12 (the dependency rules and
#: the inliner are keyed by these; tests/test_rule_table.py checks every one is reachable)
CALL_NAMES = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "remat2",
                        "checkpoint", "custom_jvp_call", "custom_vjp_call",
                        "custom_vjp_call_jaxpr"})


def _is_marked_name(name: str) -> bool:
    from .concepts import MARKER_PREFIX
    return name.startswith(MARKER_PREFIX)


def inline_calls(closed: Any) -> Any:
    """Inline every jit/closed_call equation except trace-op markers, recursively.

    After this, trace-op applications made inside user ``jax.jit`` helpers sit at the top
    level of the returned closed jaxpr, so one flat walk finds all of them. Variables are
    renamed, never copied: a call's outputs become the inlined body's output atoms.
    """
    jaxpr = open_jaxpr(closed)
    new_constvars = list(jaxpr.constvars)
    new_consts = closed_consts(closed)
    eqns: list = []
    env: dict = {}
    seen_consts = set(new_constvars)
    changed = False

    def rd(v):
        if is_literal(v):
            return v
        while not is_literal(v) and v in env:
            v = env[v]
        return v

    def inlinable(e) -> Any:
        if e.primitive.name not in _INLINABLE:
            return None
        if e.primitive.name in JIT_NAMES and _is_marked_name(e.params.get("name", "")):
            return None
        body = e.params.get("jaxpr") or e.params.get("call_jaxpr")
        return body if body is not None and hasattr(open_jaxpr(body), "eqns") else None

    def fresh(o):
        if type(o).__name__ == "DropVar":
            return o
        nv = Var(o.aval)
        env[o] = nv
        return nv

    def walk(eqn_list, depth, outer=None):
        nonlocal changed
        for e in eqn_list:
            if outer is not None and eqn_location(e) is None:
                # an equation of a library's jitted helper (jnp.roll, jnp.cumsum, ...) whose
                # trace kept no user frame: it is where the call was
                e = e.replace(source_info=outer.source_info)
            body = inlinable(e)
            if body is None:
                ins = [rd(v) for v in e.invars]
                # a jitted helper called twice shares its body: give inlined eqns fresh vars
                outs = [fresh(o) for o in e.outvars] if depth else list(e.outvars)
                eqns.append(e.replace(invars=ins, outvars=outs))
                continue
            changed = True
            sub = open_jaxpr(body)
            for cv, c in zip(sub.constvars, closed_consts(body)):
                if cv not in seen_consts:
                    seen_consts.add(cv)
                    new_constvars.append(cv)
                    new_consts.append(c)
            for iv, val in zip(sub.invars, e.invars):
                env[iv] = rd(val)
            walk(sub.eqns, depth + 1, e if eqn_location(e) is not None else outer)
            for ov, sv in zip(e.outvars, sub.outvars):
                env[ov] = rd(sv)

    walk(jaxpr.eqns, 0)
    if not changed:
        return closed
    new = jaxpr.replace(constvars=new_constvars, eqns=eqns,
                        outvars=[rd(v) for v in jaxpr.outvars])
    return make_closed(new, new_consts)


def eval_eqn(eqn: Any, invals: Sequence[Any]) -> list:
    """Evaluate one equation on concrete or traced values (the core of eval_jaxpr).

    ``get_bind_params`` returns ``params`` on recent jax and ``(subfuns, params)`` on older
    releases; both forms are handled. The equation's context (e.g. source info) is entered.
    """
    bp = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bp, tuple) and len(bp) == 2 and isinstance(bp[1], dict):
        subfuns, params = bp
    else:
        subfuns, params = (), bp
    mgr = getattr(getattr(eqn, "ctx", None), "manager", None)
    if mgr is not None:
        with mgr:
            ans = eqn.primitive.bind(*subfuns, *invals, **params)
    else:
        ans = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(ans) if eqn.primitive.multiple_results else [ans]


def eqn_location(eqn: Any) -> str | None:
    """``file:line (function)`` of the user's frame that created an equation, if known.

    Frames inside brainscale are excluded (see ``register_exclusion`` above); the path is
    shortened to its last two parts so dumps do not depend on where the code lives.
    """
    try:
        text = source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - source info is best effort
        return None
    if not text or text.startswith("unknown"):
        return None
    m = re.match(r"^(.*?):(\d+)(?::\d+)?(?:\s+\((.*)\))?$", text.strip())
    if not m:
        return text
    parts = m.group(1).replace("\\", "/").split("/")
    short = "/".join(parts[-2:])
    return f"{short}:{m.group(2)}" + (f" ({m.group(3)})" if m.group(3) else "")


def tree_flatten_with_keys(tree: Any):
    return jax.tree_util.tree_flatten_with_path(tree)


Callable  # re-exported for type hints elsewhere
