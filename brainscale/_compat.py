"""The only module of brainscale that touches JAX internals.

JAX 0.11 merged ``ClosedJaxpr`` into ``Jaxpr`` (``ClosedJaxpr is Jaxpr``, a closed jaxpr's
``.jaxpr`` is itself, keyword construction ``ClosedJaxpr(jaxpr=..)`` fails). Everything the
rest of the package needs from a jaxpr goes through the helpers below, which never
type-dispatch between the two classes and only construct closed jaxprs positionally.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, Sequence

import jax
from jax.extend import core as jcore
from jax.extend import source_info_util

__all__ = [
    "Var", "Literal", "Primitive", "ClosedJaxpr", "Jaxpr", "JaxprEqn",
    "open_jaxpr", "closed_consts", "make_closed", "is_literal", "literal_value",
    "eqn_subjaxprs", "inline_calls", "eval_eqn", "eqn_location", "JIT_NAMES", "CALL_NAMES",
    "LIBRARY_PACKAGES", "library_paths", "primitive_names", "eqn_jvp_jaxpr", "jax_version",
    "check_jaxlib",
]

Var = jcore.Var
Literal = jcore.Literal
Primitive = jcore.Primitive
ClosedJaxpr = jcore.ClosedJaxpr
Jaxpr = jcore.Jaxpr
JaxprEqn = jcore.JaxprEqn

#: names of the jit primitive across versions ('pjit' before jax 0.7)
JIT_NAMES = frozenset({"jit", "pjit"})
#: call-like primitives whose body can be inlined without changing semantics: jit (pjit on
#: old jax), ``closed_call`` (renamed ``eval_jaxpr`` in jax 0.12, where ``closed_call_p`` is an
#: alias of it), and ``jax.checkpoint`` / ``jax.remat``, which bind ``remat2`` (its body is
#: an open jaxpr on jax 0.10)
_INLINABLE = frozenset({"jit", "pjit", "closed_call", "eval_jaxpr", "remat2"})

jax_version = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

#: jaxlib releases with a known CPU miscompile of patterns our compiled steps contain, the
#: XLA flag that turns the faulty fusion off, and the public report. jaxlib 0.10.2 fuses
#: ``a * sum(a * b, axis)`` over operands batched on >= 2 axes into a wrong YNN kernel
#: (e.g. the vmapped VJP of a normalisation in an exact per-neuron trace: relative errors
#: of 0.1-1.4 where float32 rounding gives 1e-7).
_BAD_JAXLIB = {(0, 10, 2): ("--xla_cpu_experimental_ynn_fusion_type=", "jax-ml/jax#39103")}
_JAXLIB_CHECKED = False


def _jaxlib_version() -> tuple:
    import jaxlib
    return tuple(int(p) for p in jaxlib.__version__.split(".")[:3] if p.isdigit())


def check_jaxlib(version: tuple | None = None, flags: str | None = None,
                 platform: str | None = None) -> str | None:
    """Warn (once per process) when the installed jaxlib miscompiles on the CPU.

    Returns the warning's text, or None when this jaxlib / backend / ``XLA_FLAGS`` is fine.
    Arguments override what is installed (for tests).
    """
    global _JAXLIB_CHECKED
    probe = version is None and flags is None and platform is None
    if probe and _JAXLIB_CHECKED:
        return None
    version = _jaxlib_version() if version is None else tuple(version)
    bad = _BAD_JAXLIB.get(version)
    if bad is None:
        return None
    flag, report = bad
    flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
    if flag.split("=")[0] in flags:
        return None
    platform = jax.default_backend() if platform is None else platform
    if platform != "cpu":
        return None
    if probe:
        _JAXLIB_CHECKED = True
    v = ".".join(map(str, version))
    msg = (f"jaxlib {v} computes wrong results on the CPU for patterns brainscale's compiled "
           f"steps contain ({report}: 'a * sum(a * b)' batched over two or more axes; e.g. "
           f"exact traces through a normalisation come out with relative errors of 0.1-1). "
           f"Install another jax/jaxlib (brainscale excludes {v}: pip install 'jax!={v}' "
           f"'jaxlib!={v}'), or turn the faulty fusion off before jax starts: "
           f"XLA_FLAGS='{flag}' (set in the environment before importing jax).")
    from .errors import JaxlibMiscompileWarning
    import warnings
    warnings.warn(msg, JaxlibMiscompileWarning, stacklevel=4)
    return msg

#: packages whose frames are never "the user's line": brainscale itself and the libraries a
#: model is written with (brainunit is implemented in ``saiunit`` on brainunit >= 0.5).
#: jax excludes its own frames and the standard library.
LIBRARY_PACKAGES = ("brainscale", "brainstate", "braintools", "brainunit", "saiunit",
                    "brainevent", "brainpy", "brainpy_state", "jax", "jaxlib")


def _package_dirs(name: str) -> list[str]:
    import importlib.util
    try:
        spec = importlib.util.find_spec(name)      # does not import the package
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    out = []
    for loc in spec.submodule_search_locations:
        for p in {os.path.abspath(loc), os.path.realpath(loc)}:
            out.append(p.rstrip(os.sep) + os.sep)  # a sibling 'brainstate_x/' stays the user's
    return out


def library_paths() -> tuple[str, ...]:
    """Directory prefixes (ending in a path separator) whose frames are skipped when a
    source location is reported (:func:`eqn_location`), for every installed package of
    :data:`LIBRARY_PACKAGES`."""
    return tuple(p for name in LIBRARY_PACKAGES for p in _package_dirs(name))


# Report the user's frame, not ours or a library's, in error messages and --locs: the first
# frame outside the packages above (jax skips its own and the standard library's). An
# equation's traceback ends at the traced function, so a launcher (the brainscale-opt script,
# a test runner) never appears in it; a model made only of library modules has no location.
for _p in dict.fromkeys(library_paths()):
    source_info_util.register_exclusion(_p)


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


#: call-like primitives (a body jaxpr whose outputs are the equation's), across jax releases
#: ('pjit' and 'custom_vjp_call_jaxpr' are older releases' names); those in ``_INLINABLE``
#: are inlined by :func:`inline_calls`, the custom-derivative ones are analysed through their
#: primal body and their derivative rule (tests/test_rule_table.py checks every name that
#: exists on the installed jax is one or the other)
CALL_NAMES = frozenset({"jit", "pjit", "closed_call", "eval_jaxpr", "remat2",
                        "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


def primitive_names() -> frozenset:
    """Names of the primitives defined by the installed jax and brain-dynamics libraries
    (module-level ``Primitive`` objects of their loaded modules): which names of the rule
    tables exist on this version."""
    names = set()
    roots = tuple(LIBRARY_PACKAGES)
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or mod_name.split(".", 1)[0] not in roots:
            continue
        for val in list(getattr(mod, "__dict__", {}).values()):
            if isinstance(val, Primitive):
                names.add(val.name)
    return frozenset(names)


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


#: custom_vjp applications across jax versions (evaluated with a derived JVP by eval_eqn)
CUSTOM_VJP_NAMES = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})


def eval_eqn(eqn: Any, invals: Sequence[Any]) -> list:
    """Evaluate one equation on concrete or traced values (the core of eval_jaxpr).

    ``get_bind_params`` returns ``params`` on recent jax and ``(subfuns, params)`` on older
    releases; both forms are handled. The equation's context (e.g. source info) is entered.
    A ``jax.custom_vjp`` application also gets forward-mode derivatives (the compiled step is
    linearised): see :func:`_eval_custom_vjp`.
    """
    if eqn.primitive.name in CUSTOM_VJP_NAMES:
        return _eval_custom_vjp(eqn, invals)
    return _bind(eqn, invals)


def _eval_custom_vjp(eqn: Any, invals: Sequence[Any]) -> list:
    """A ``jax.custom_vjp`` application that JAX can also differentiate forward.

    JAX refuses forward-mode autodiff of a custom_vjp function, yet the compiled step is
    linearised (``jax.linearize``) to get the traces' Jacobians. The user's backward rule is
    linear in the cotangent, so its transpose is the JVP that matches it exactly:
    ``t_out = (v -> vjp(v))^T (t_in)`` (``jax.linear_transpose``). Reverse mode through the
    result transposes back to the user's rule, so both directions agree with BPTT. A backward
    rule JAX cannot transpose (it branches on the cotangent, calls back to Python, ...) is an
    error naming the function's line.
    """
    from .errors import UnsupportedPrimitiveError

    float_in = [i for i, x in enumerate(invals) if _is_float(x)]

    def call(*args):
        return tuple(_bind(eqn, args))

    f = jax.custom_jvp(call)

    def jvp(primals, tangents):
        outs, vjp_fn = jax.vjp(call, *primals)

        def vjp_float(cts):                 # cotangents of the float inputs only
            res = vjp_fn(tuple(cts))
            return tuple(res[i] for i in float_in)
        float_outs = [i for i, o in enumerate(outs) if _is_float(o)]
        try:
            transposed = jax.linear_transpose(
                lambda *cts: vjp_float(_fill(cts, float_outs, outs)),
                *[outs[i] for i in float_outs])
            t_float = transposed(tuple(tangents[i] for i in float_in))
        except Exception as e:  # noqa: BLE001 - JAX's reason is kept in the message
            raise UnsupportedPrimitiveError(
                f"the jax.custom_vjp function at {eqn_location(eqn) or 'unknown location'} "
                f"needs a forward-mode derivative (brainscale linearises the step), derived by "
                f"transposing its backward rule, which failed ({type(e).__name__}: {e}). Write "
                f"the backward rule as a function linear in the cotangent, or define the "
                f"function with jax.custom_jvp (for a surrogate spike: braintools.surrogate)"
            ) from e
        t_it = iter(t_float)
        return outs, tuple(next(t_it) if _is_float(o) else _float0_like(o) for o in outs)

    f.defjvp(jvp)
    return list(f(*invals))


def eqn_jvp_jaxpr(eqn: Any) -> tuple[Any, list[int], list[int]]:
    """The JVP of one equation as a closed jaxpr, with its custom derivative rule traced.

    Inputs are the equation's primal inputs followed by tangents of its float inputs; outputs
    are its primal outputs followed by tangents of its float outputs. Returns ``(closed
    jaxpr, float input positions, float output positions)``. For ``custom_jvp_call`` this is
    the user's jvp rule, for ``custom_vjp_call`` the JVP derived from the backward rule (see
    :func:`eval_eqn`): what the compiled step's linearisation really differentiates, so the
    dependency analysis can check that it is element-wise like the primal body.
    """
    import numpy as np
    avals = [v.aval for v in eqn.invars]
    fl_in = [i for i, a in enumerate(avals) if _is_float_dtype(a.dtype)]
    fl_out = [i for i, v in enumerate(eqn.outvars) if _is_float_dtype(v.aval.dtype)]
    n = len(avals)

    def f(*args):
        prim, tan = args[:n], iter(args[n:])
        tangents = [next(tan) if i in fl_in else np.zeros(a.shape, jax.dtypes.float0)
                    for i, a in enumerate(avals)]
        outs, touts = jax.jvp(lambda *a: tuple(eval_eqn(eqn, a)), tuple(prim), tuple(tangents))
        return (*outs, *(touts[i] for i in fl_out))

    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    specs += [jax.ShapeDtypeStruct(avals[i].shape, avals[i].dtype) for i in fl_in]
    return jax.make_jaxpr(f)(*specs), fl_in, fl_out


def _is_float_dtype(dtype: Any) -> bool:
    try:
        return bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))
    except TypeError:       # extended dtypes (PRNG keys)
        return False


def _is_float(x: Any) -> bool:
    return jax.numpy.issubdtype(jax.numpy.result_type(x), jax.numpy.inexact)


def _fill(cts, float_outs, outs):
    """Cotangents for every output: the given ones for float outputs, float0 zeros else."""
    full, it = [], iter(cts)
    pos = set(float_outs)
    for i, o in enumerate(outs):
        full.append(next(it) if i in pos else _float0_like(o))
    return full


def _float0_like(x):
    import numpy as np
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


def _bind(eqn: Any, invals: Sequence[Any]) -> list:
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
