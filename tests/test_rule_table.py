"""The dependency-rule table (brainscale/passes/rules.py), entry by entry, on the installed jax.

For every primitive name of the table a tiny neuron update ``V = fn(V, x) + W·x`` is built
whose jaxpr contains that primitive on the hidden path. Each case asserts that (a) the name
really appears in the traced jaxpr (so the entry is reachable on this jax version) and
(b) the analysis classifies it as the table says: an element-wise / identity / pass-through
primitive keeps ``V``'s per-neuron dependence, a mixing primitive makes ``V`` mixed *at that
primitive*, a call or ``cond`` is analysed through its body, a loop on the hidden path is
refused, and random numbers drawn from a key that does not depend on ``V`` add nothing.
A case is skipped only when its name is not a primitive of the installed jax (an older or
newer release's name), and says so.

Before the audit, ``jnp.log2`` (jax 0.12's ``log2``), ``lax.polynomial`` (``jnp.sinc`` on 0.12),
Bessel / gamma-family functions, ``lax.complex``, ``optimization_barrier``, ``device_put``,
``with_sharding_constraint``, ``checkpoint_name``, ``bitcast_convert_type``, ``random_gamma`` and
the ``eval_jaxpr`` call of jax 0.12 had no rule: they mixed every neuron ("no etrace
dependency rule"), so updates using them were refused. Custom derivatives were analysed
through their primal body only, and a ``jax.custom_vjp`` function in ``update`` crashed the
first learner call (the step is linearised; JAX has no forward mode for custom_vjp).
"""
from __future__ import annotations

import braintools
import brainstate
import brainunit as u
import jax
import jax.ad_checkpoint
import jax.extend.core.primitives as P
import jax.extend.random
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from brainscale import _compat as C
from brainscale.passes import rules as R
from brainscale.passes.rules import DEP_RULES, analyze, elementwise_error

N = 4
F32 = jnp.float32
EXISTING = C.primitive_names()


class OneNeuron(brainstate.nn.Module):
    """``V = fn(V, x) + W·x``: the primitive under test sits on the path ``V^{t-1} -> V^t``."""

    def __init__(self, fn):
        super().__init__()
        self.w = brainscale.ETraceParam(jnp.full((3, N), 0.1, F32), brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.linspace(-0.5, 0.5, N, dtype=F32))
        self.fn = fn

    def update(self, x):
        y = self.w.execute(x)
        self.V.value = jnp.asarray(self.fn(self.V.value, x), F32) + y
        return self.V.value


def dep_of_v(fn):
    """The analysis' dependence of ``V^t`` for the update ``fn``."""
    graph = brainscale.lower(OneNeuron(fn), jnp.ones(3, F32))
    return analyze(graph).hidden_out["V"]


def traced_names(fn) -> set:
    """Every primitive name in the jaxpr of ``fn``, sub-jaxprs (calls, branches) included."""
    out: set = set()

    def walk(j):
        for e in C.open_jaxpr(j).eqns:
            out.add(e.primitive.name)
            for sub in C.eqn_subjaxprs(e):
                walk(sub)
    walk(jax.make_jaxpr(fn)(jnp.zeros(N, F32), jnp.ones(3, F32)))
    return out


def _int(v):
    return v.astype(jnp.int32)


def _key():
    return jax.random.key(0)


def _sharding():
    # jax 0.12.1 deprecates constructing SingleDeviceSharding directly
    make = getattr(jax.sharding, "make_single_device_sharding", None)
    if make is not None:
        return make(jax.devices()[0])
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


# name -> fn(v, x); V flows into the output only through the named primitive's rule
ELEMENTWISE = {
    "add": lambda v, x: v + 1.0, "sub": lambda v, x: v - 1.0, "mul": lambda v, x: v * 2.0,
    "div": lambda v, x: v / 2.0, "neg": lambda v, x: lax.neg(v),
    "max": lambda v, x: jnp.maximum(v, 0.0), "min": lambda v, x: jnp.minimum(v, 0.0),
    "pow": lambda v, x: lax.pow(v, jnp.full_like(v, 2.5)),
    "integer_pow": lambda v, x: lax.integer_pow(v, 3),
    "exp": lambda v, x: lax.exp(v), "exp2": lambda v, x: lax.exp2(v),
    "log": lambda v, x: lax.log(v + 2.0), "log1p": lambda v, x: lax.log1p(v + 1.0),
    "expm1": lambda v, x: lax.expm1(v), "tanh": lambda v, x: lax.tanh(v),
    "logistic": lambda v, x: lax.logistic(v), "sin": lambda v, x: lax.sin(v),
    "cos": lambda v, x: lax.cos(v), "tan": lambda v, x: lax.tan(v),
    "sqrt": lambda v, x: lax.sqrt(v + 1.0), "rsqrt": lambda v, x: lax.rsqrt(v + 1.0),
    "cbrt": lambda v, x: lax.cbrt(v), "abs": lambda v, x: lax.abs(v),
    "sign": lambda v, x: lax.sign(v), "floor": lambda v, x: lax.floor(v),
    "ceil": lambda v, x: lax.ceil(v), "round": lambda v, x: lax.round(v),
    "select_n": lambda v, x: lax.select_n(v > 0, v, -v),
    "clamp": lambda v, x: lax.clamp(-0.2, v, 0.2),
    "convert_element_type": lambda v, x: v.astype(jnp.float16),
    "erf": lambda v, x: lax.erf(v), "erfc": lambda v, x: lax.erfc(v),
    "erf_inv": lambda v, x: lax.erf_inv(v * 0.5),
    "atan2": lambda v, x: lax.atan2(v, jnp.ones_like(v)),
    "sinh": lambda v, x: lax.sinh(v), "cosh": lambda v, x: lax.cosh(v),
    "asinh": lambda v, x: lax.asinh(v), "acosh": lambda v, x: lax.acosh(v + 2.0),
    "atanh": lambda v, x: lax.atanh(v * 0.5), "asin": lambda v, x: lax.asin(v * 0.5),
    "acos": lambda v, x: lax.acos(v * 0.5), "atan": lambda v, x: lax.atan(v),
    "square": lambda v, x: lax.square(v),
    "gt": lambda v, x: lax.gt(v, jnp.zeros_like(v)), "ge": lambda v, x: lax.ge(v, jnp.zeros_like(v)),
    "lt": lambda v, x: lax.lt(v, jnp.zeros_like(v)), "le": lambda v, x: lax.le(v, jnp.zeros_like(v)),
    "eq": lambda v, x: lax.eq(v, jnp.zeros_like(v)), "ne": lambda v, x: lax.ne(v, jnp.zeros_like(v)),
    "and": lambda v, x: lax.bitwise_and(_int(v), _int(v * 2)),
    "or": lambda v, x: lax.bitwise_or(_int(v), _int(v * 2)),
    "xor": lambda v, x: lax.bitwise_xor(_int(v), _int(v * 2)),
    "not": lambda v, x: lax.bitwise_not(_int(v)),
    "is_finite": lambda v, x: lax.is_finite(v),
    "nextafter": lambda v, x: lax.nextafter(v, jnp.ones_like(v)),
    "rem": lambda v, x: lax.rem(v, jnp.full_like(v, 0.3)),
    "stop_gradient": lambda v, x: lax.stop_gradient(v),
    "copy": lambda v, x: jnp.copy(v),
    "real": lambda v, x: lax.real(lax.complex(v, v)),
    "imag": lambda v, x: lax.imag(lax.complex(v, v)),
    "complex": lambda v, x: lax.real(lax.complex(v, v)),
    "conj": lambda v, x: lax.real(lax.conj(lax.complex(v, v))),
    "reduce_precision": lambda v, x: lax.reduce_precision(v, 5, 10),
    "add_any": lambda v, x: P.add_jaxvals_p.bind(v, v),
    "shift_left": lambda v, x: lax.shift_left(_int(v), jnp.ones(N, jnp.int32)),
    "shift_right_logical": lambda v, x: lax.shift_right_logical(_int(v), jnp.ones(N, jnp.int32)),
    "shift_right_arithmetic": lambda v, x: lax.shift_right_arithmetic(_int(v),
                                                                      jnp.ones(N, jnp.int32)),
    "population_count": lambda v, x: lax.population_count(_int(v)),
    "clz": lambda v, x: lax.clz(_int(v)),
    "lgamma": lambda v, x: lax.lgamma(v + 2.0), "digamma": lambda v, x: lax.digamma(v + 2.0),
    "polygamma": lambda v, x: lax.polygamma(jnp.ones_like(v), v + 2.0),
    "igamma": lambda v, x: lax.igamma(v + 2.0, v + 1.0),
    "igammac": lambda v, x: lax.igammac(v + 2.0, v + 1.0),
    "igamma_grad_a": lambda v, x: lax.igamma_grad_a(v + 2.0, v + 1.0),
    "zeta": lambda v, x: lax.zeta(v + 2.0, v + 1.0),
    "bessel_i0e": lambda v, x: lax.bessel_i0e(v), "bessel_i1e": lambda v, x: lax.bessel_i1e(v),
    "regularized_incomplete_beta": lambda v, x: lax.betainc(v + 2.0, v + 3.0, lax.logistic(v)),
    "log2": lambda v, x: jnp.log2(v + 2.0),
    "one_minus_square": lambda v, x: lax.one_minus_square(v),
    "polynomial": lambda v, x: lax.polynomial(v, [1.0, 2.0, 3.0]),
    "heaviside_surrogate_gradient": lambda v, x: braintools.surrogate.Sigmoid()(v),
    "exprel": lambda v, x: u.math.exprel(v),
    # identity of elements
    "reshape": lambda v, x: v.reshape(2, N // 2).reshape(N),
    "squeeze": lambda v, x: lax.squeeze(lax.reshape(v, (1, N)), (0,)),
    "name": lambda v, x: jax.ad_checkpoint.checkpoint_name(v, "v"),
    "sharding_constraint": lambda v, x: lax.with_sharding_constraint(v, _sharding()),
    # output i is input i (the input x goes through position 1 and is reduced: no V there)
    "optimization_barrier": lambda v, x: (lambda a, b: a + b.sum())(
        *lax.optimization_barrier((v, x))),
    "device_put": lambda v, x: jax.device_put(v),
    # broadcast of equal size, bitcast between one width, gamma noise shaped by V
    "broadcast_in_dim": lambda v, x: lax.broadcast_in_dim(v, (1, N), (1,)).reshape(N),
    "bitcast_convert_type": lambda v, x: lax.bitcast_convert_type(
        lax.bitcast_convert_type(v, jnp.int32), F32),
    "random_gamma": lambda v, x: jax.random.gamma(_key(), v + 2.0),
}

# name -> fn(v, x) whose FIRST equation mixing V's neurons is that primitive
MIXING = {
    "dot_general": lambda v, x: jnp.full((N, N), 0.1, F32) @ v,
    "conv_general_dilated": lambda v, x: lax.conv_general_dilated(
        v.reshape(1, 1, N), jnp.ones((1, 1, 3), F32), (1,), "SAME").reshape(N),
    "reduce_sum": lambda v, x: v + jnp.sum(v), "reduce_max": lambda v, x: v + jnp.max(v),
    "reduce_min": lambda v, x: v + jnp.min(v), "reduce_prod": lambda v, x: v + jnp.prod(v),
    "reduce_and": lambda v, x: v + jnp.all(v > 0), "reduce_or": lambda v, x: v + jnp.any(v > 0),
    "reduce_xor": lambda v, x: v + lax.reduce_xor(_int(v), (0,)),
    "argmax": lambda v, x: v + jnp.argmax(v), "argmin": lambda v, x: v + jnp.argmin(v),
    "cumsum": lambda v, x: lax.cumsum(v), "cumprod": lambda v, x: lax.cumprod(v),
    "cummax": lambda v, x: lax.cummax(v), "cummin": lambda v, x: lax.cummin(v),
    "cumlogsumexp": lambda v, x: lax.cumlogsumexp(v),
    "transpose": lambda v, x: v.reshape(2, N // 2).T.reshape(N),
    "concatenate": lambda v, x: jnp.concatenate([v, v])[:N],
    "slice": lambda v, x: jnp.pad(v[1:], (0, 1)),
    "dynamic_slice": lambda v, x: lax.dynamic_slice(v, (jnp.argmax(x),), (N,)),
    "dynamic_update_slice": lambda v, x: lax.dynamic_update_slice(jnp.zeros(N + 2, F32), v,
                                                                  (jnp.argmax(x),))[:N],
    "gather": lambda v, x: v[jnp.array([3, 2, 1, 0])],
    "scatter": lambda v, x: jnp.zeros(N, F32).at[jnp.array([3, 2, 1, 0])].set(v),
    "scatter-add": lambda v, x: jnp.zeros(N, F32).at[jnp.array([3, 2, 1, 0])].add(v),
    "scatter-mul": lambda v, x: jnp.ones(N, F32).at[jnp.array([3, 2, 1, 0])].multiply(v),
    "scatter-min": lambda v, x: jnp.zeros(N, F32).at[jnp.array([3, 2, 1, 0])].min(v),
    "scatter-max": lambda v, x: jnp.zeros(N, F32).at[jnp.array([3, 2, 1, 0])].max(v),
    "scatter-sub": lambda v, x: jnp.zeros(N, F32).at[jnp.array([3, 2, 1, 0])].subtract(v),
    "pad": lambda v, x: jnp.pad(v, 1)[1:N + 1], "rev": lambda v, x: v[::-1],
    "sort": lambda v, x: jnp.sort(v), "top_k": lambda v, x: lax.top_k(v, N)[0],
    "split": lambda v, x: jnp.concatenate(jnp.split(v, 2)[::-1]),
    "stack": lambda v, x: jnp.stack([v, v]).sum(0),
    "unstack": lambda v, x: jnp.concatenate(jnp.unstack(v.reshape(2, N // 2))),
    "tile": lambda v, x: jnp.tile(v, 2)[:N],
    "reduce_window_sum": lambda v, x: lax.reduce_window(v, 0.0, lax.add, (2,), (1,), "SAME"),
    "reduce_window_max": lambda v, x: lax.reduce_window(v, -jnp.inf, lax.max, (2,), (1,),
                                                        "SAME"),
    "reduce_window_min": lambda v, x: lax.reduce_window(v, jnp.inf, lax.min, (2,), (1,),
                                                        "SAME"),
    "reduce_window": lambda v, x: lax.reduce_window(v, 1.0, lax.mul, (2,), (1,), "SAME"),
    # size-changing broadcast, bitcast across widths
    "broadcast_in_dim": lambda v, x: jnp.broadcast_to(v, (3, N)).sum(0),
    "bitcast_convert_type": lambda v, x: lax.bitcast_convert_type(
        lax.bitcast_convert_type(v, jnp.uint8), F32),
}

# primitives without inputs: present, and they add no dependence
CONSTANT = {"iota": lambda v, x: v + lax.iota(F32, N)}

# random numbers from a fixed key: V stays per-neuron (noise inside update is fine)
RANDOM = {
    "random_seed": lambda v, x: v + jax.random.normal(_key(), (N,)),
    "random_bits": lambda v, x: v + jax.random.uniform(_key(), (N,)),
    "random_wrap": lambda v, x: v + jax.random.normal(
        jax.random.wrap_key_data(jnp.zeros(2, jnp.uint32)), (N,)),
    "random_unwrap": lambda v, x: v + jax.random.key_data(_key()).sum().astype(F32),
    "random_split": lambda v, x: v + jax.random.normal(jax.random.split(_key())[0], (N,)),
    "random_fold_in": lambda v, x: v + jax.random.normal(jax.random.fold_in(_key(), 3), (N,)),
    "random_clone": lambda v, x: v + jax.random.normal(jax.random.clone(_key()), (N,)),
    "threefry2x32": lambda v, x: v + 1e-9 * jax.extend.random.threefry_2x32(
        jnp.zeros(2, jnp.uint32), jnp.arange(N, dtype=jnp.uint32)).astype(F32),
    "rng_bit_generator": lambda v, x: v + 1e-9 * lax.rng_bit_generator(
        jnp.zeros(4, jnp.uint32), (N,))[1].astype(F32),
    "rng_uniform": lambda v, x: v + lax.rng_uniform(0.0, 1.0, (N,)),
}


def _custom_jvp(body):
    f = jax.custom_jvp(body)
    f.defjvp(lambda p, t: (body(*p), jax.jvp(body, p, t)[1]))
    return f


def _custom_vjp(body):
    f = jax.custom_vjp(body)
    f.defvjp(lambda a: (body(a), a), lambda a, g: (jax.vjp(body, a)[1](g)[0],))
    return f


def _closed_call(body):
    return lambda v, x: P.closed_call_p.bind(v, call_jaxpr=jax.make_jaxpr(body)(v))[0]


# call-like and control-flow names -> wrap(body): an update applying ``body`` to V
CALLS = {
    "jit": lambda body: (lambda v, x: jax.jit(body)(v)),
    "remat2": lambda body: (lambda v, x: jax.checkpoint(body)(v)),
    "custom_jvp_call": lambda body: (lambda v, x: _custom_jvp(body)(v)),
    "custom_vjp_call": lambda body: (lambda v, x: _custom_vjp(body)(v)),
    "eval_jaxpr": _closed_call,           # jax 0.12's name of closed_call_p
    "cond": lambda body: (lambda v, x: lax.cond(x[0] > 0, body, lambda a: a * 0.5, v)),
    # names on older jax releases (absent on 0.10 - 0.12, kept so their jaxprs are analysed)
    "pjit": lambda body: (lambda v, x: jax.jit(body)(v)),
    "custom_vjp_call_jaxpr": lambda body: (lambda v, x: _custom_vjp(body)(v)),
}
ELEMENTWISE_BODY = lambda a: jnp.sin(a) * 2.0  # noqa: E731
MIXING_BODY = lambda a: jnp.cumsum(a)          # noqa: E731

LOOPS = {
    "scan": (lambda v, x: lax.scan(lambda c, _: (c * 0.9, None), v, None, length=2)[0],
             lambda v, x: v + lax.scan(lambda c, _: (c * 0.9, None), x, None, length=2)[0].sum()),
    "while": (lambda v, x: lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] * 0.9, c[1] + 1),
                                          (v, 0))[0],
              lambda v, x: v + lax.while_loop(lambda c: c[1] < 3,
                                              lambda c: (c[0] * 0.9, c[1] + 1), (x, 0))[0].sum()),
}


def _require(name):
    if name not in EXISTING:
        pytest.skip(f"'{name}' is not a primitive on jax {jax.__version__} "
                    f"(brainunit {u.__version__}, braintools {braintools.__version__})")


def _assert_present(name, fn):
    names = traced_names(fn)
    assert name in names, f"'{name}' does not appear in the jaxpr of its case: {sorted(names)}"


def _assert_kept(fn, what):
    d = dep_of_v(fn)
    assert "V" in d.hid and not d.mixed, (
        f"{what}: V should keep its per-neuron dependence, got hid={set(d.hid)} "
        f"mixed={d.mixed}")


def _assert_mixed_at(fn, reason, what):
    d = dep_of_v(fn)
    mixed = {origin: why for origin, _, why in d.mixed}
    assert ("h", "V") in mixed, f"{what}: V should be mixed, got hid={set(d.hid)}"
    assert mixed[("h", "V")] == reason, (
        f"{what}: V should first be mixed by '{reason}', got '{mixed[('h', 'V')]}'")


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_elementwise_identity_and_passthrough_entries(name):
    _require(name)
    fn = ELEMENTWISE[name]
    _assert_present(name, fn)
    _assert_kept(fn, name)


@pytest.mark.parametrize("name", sorted(MIXING))
def test_mixing_entries(name):
    _require(name)
    fn = MIXING[name]
    _assert_present(name, fn)
    _assert_mixed_at(fn, name, name)


@pytest.mark.parametrize("name", sorted(CONSTANT) + sorted(RANDOM))
def test_constant_and_random_entries_add_no_dependence(name):
    """Noise drawn inside ``update`` (from a key that does not depend on V) is fine."""
    _require(name)
    fn = {**CONSTANT, **RANDOM}[name]
    _assert_present(name, fn)
    _assert_kept(fn, name)


class NoisyNeuron(brainstate.nn.Module):
    """Leaky neurons with input noise drawn in ``update`` from the model's own RandomState."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(1)
        self.w = brainscale.ETraceParam(jnp.asarray(rng.randn(3, N) * 0.5, F32),
                                        brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.zeros(N, F32))
        self.rng = brainstate.random.RandomState(0)

    def update(self, x):
        noise = self.rng.normal(size=(N,)) * 0.3
        self.V.value = 0.9 * jnp.tanh(self.V.value) + self.w.execute(x) + noise
        return self.V.value


def test_noise_inside_update_compiles_and_matches_bptt():
    """brainstate's RandomState inside ``update`` (random_bits & co. on a key state): not
    refused, the key advances every step, and D-RTRL equals BPTT on the same noise (no
    recurrent weight: the diagonal traces are exact)."""
    from oracle import bptt_grads
    xs = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    m = NoisyNeuron()
    learner = brainscale.DiagParamDimAlgorithm(m).compile_graph(xs[0])
    m.rng.seed(0)
    p = m.states(brainstate.ParamState)
    got = sum(np.asarray(brainstate.transform.grad(lambda: jnp.sum(learner(x) ** 2), p)()[("w",)])
              for x in xs)
    ref_model = NoisyNeuron()
    ref_model.rng.seed(0)
    ref = bptt_grads(ref_model, xs, lambda out: jnp.sum(out ** 2))[("w",)]
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-5, atol=1e-6)
    key = np.asarray(jax.random.key_data(m.rng.value))
    learner(xs[0])
    assert not np.array_equal(np.asarray(jax.random.key_data(m.rng.value)), key)


def test_random_output_depends_on_its_key():
    """A key made from V carries V's dependence into every random number (mixed)."""
    def fn(v, x):
        keys = jax.random.wrap_key_data(lax.bitcast_convert_type(v.reshape(2, 2), jnp.uint32))
        return lax.bitcast_convert_type(jax.random.key_data(keys), F32).reshape(N)
    _assert_present("random_wrap", fn)
    _assert_mixed_at(fn, "random_wrap", "random_wrap")


@pytest.mark.parametrize("name", sorted(set(CALLS) | {"closed_call"}))
def test_call_and_cond_entries_analyse_their_body(name):
    _require(name)
    if name in ("closed_call", "eval_jaxpr"):
        if P.closed_call_p.name != name:
            pytest.skip(f"'{name}' never appears in a jaxpr on jax {jax.__version__}: "
                        f"closed_call_p is named '{P.closed_call_p.name}' here")
        if name == "closed_call":
            pytest.skip("no public API binds closed_call_p on this jax (only jax's own "
                        "rewrites emit it): test_closed_call_equation_is_inlined builds one")
    kept, mixed = CALLS[name](ELEMENTWISE_BODY), CALLS[name](MIXING_BODY)
    _assert_present(name, kept)
    _assert_kept(kept, f"{name} around an element-wise body")
    _assert_mixed_at(mixed, "cumsum", f"{name} around a cumsum")


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_loops_are_refused_only_on_a_hidden_path(name):
    _require(name)
    into_hidden, input_only = LOOPS[name]
    _assert_present(name, into_hidden)
    _assert_mixed_at(into_hidden, f"unsupported:{name}", name)
    _assert_kept(input_only, f"{name} over the input only")
    with pytest.raises(brainscale.UnsupportedPrimitiveError,
                       match=rf"through a loop \('{name}', eqn \d+\) .*is not analysed"):
        brainscale.DiagParamDimAlgorithm(OneNeuron(into_hidden)).compile_graph(jnp.ones(3))


def test_closed_call_equation_is_inlined():
    """``closed_call_p`` ('closed_call' on jax 0.10, 'eval_jaxpr' on 0.12) is inlined: built
    here from a jit equation (no public API binds it on jax 0.10)."""
    x = jnp.linspace(-1.0, 1.0, N, dtype=F32)
    closed = jax.make_jaxpr(lambda v: jax.jit(jnp.sin)(v) * 2.0)(x)
    jaxpr = C.open_jaxpr(closed)
    call = jaxpr.eqns[0]
    assert call.primitive.name in C.JIT_NAMES
    body = call.params.get("jaxpr")
    eqn = call.replace(primitive=P.closed_call_p, params={"call_jaxpr": body})
    built = C.make_closed(jaxpr.replace(eqns=[eqn] + list(jaxpr.eqns[1:])), C.closed_consts(closed))
    assert C.open_jaxpr(built).eqns[0].primitive.name == P.closed_call_p.name
    assert P.closed_call_p.name in C.CALL_NAMES and P.closed_call_p.name in DEP_RULES
    inlined = C.inline_calls(built)
    assert [e.primitive.name for e in C.open_jaxpr(inlined).eqns] == ["sin", "mul"]
    np.testing.assert_allclose(jax.extend.core.jaxpr_as_fun(inlined)(x)[0],
                               np.sin(np.asarray(x)) * 2.0, rtol=1e-6)


# ------------------------------------------------------- custom derivatives: the rule is read
def _normalising_vjp():
    """Identity forward; the backward rule centres the cotangent across neurons."""
    f = jax.custom_vjp(lambda a: a * 1.0)
    f.defvjp(lambda a: (a * 1.0, None), lambda _, g: (g - jnp.mean(g),))
    return f


def _mixing_jvp():
    """Identity forward; the jvp rule adds the mean tangent (a cross-neuron derivative)."""
    f = jax.custom_jvp(lambda a: a * 1.0)
    f.defjvp(lambda p, t: (p[0] * 1.0, t[0] + jnp.mean(t[0])))
    return f


@pytest.mark.parametrize("make,prim", [(_normalising_vjp, "custom_vjp_call"),
                                       (_mixing_jvp, "custom_jvp_call")])
def test_custom_derivative_that_mixes_neurons_is_found(make, prim):
    """The step is linearised through the custom rule: an element-wise primal with a mixing
    derivative must count as mixing (reason: the first mixing equation of the rule), or the
    diagonal traces would silently drop the cross terms."""
    f = make()
    fn = lambda v, x: f(v)  # noqa: E731
    _assert_present(prim, fn)
    d = dep_of_v(fn)
    assert ("h", "V") in {origin for origin, _, _ in d.mixed}, d
    with pytest.raises(brainscale.UnsupportedModelError, match="reduce_sum"):
        brainscale.DiagParamDimAlgorithm(OneNeuron(fn)).compile_graph(jnp.ones(3))


class CustomVjpSpiking(brainstate.nn.Module):
    """A LIF-like layer with a jax.custom_vjp surrogate spike (the common pre-braintools
    pattern) or the same surrogate written with jax.custom_jvp."""

    def __init__(self, kind):
        super().__init__()
        rng = np.random.RandomState(0)
        self.w = brainscale.ETraceParam(jnp.asarray(rng.randn(3, N), F32), brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.asarray(rng.rand(N) * 0.5, F32))
        self.spike = _surrogate_vjp() if kind == "vjp" else _surrogate_jvp()

    def update(self, x):
        z = self.spike(self.V.value - 0.5)
        self.V.value = 0.8 * self.V.value * (1.0 - z) + self.w.execute(x)
        return self.spike(self.V.value - 0.5)


def _sg(v):
    return 1.0 / (1.0 + 4.0 * jnp.abs(v)) ** 2


def _surrogate_vjp():
    f = jax.custom_vjp(lambda v: (v > 0).astype(v.dtype))
    f.defvjp(lambda v: ((v > 0).astype(v.dtype), v), lambda v, g: (g * _sg(v),))
    return f


def _surrogate_jvp():
    f = jax.custom_jvp(lambda v: (v > 0).astype(v.dtype))
    f.defjvp(lambda p, t: ((p[0] > 0).astype(p[0].dtype), t[0] * _sg(p[0])))
    return f


def _online(kind, alg, xs):
    m = CustomVjpSpiking(kind)
    kw = {"decay_or_rank": 0.9} if alg == "io" else {}
    cls = brainscale.DiagIODimAlgorithm if alg == "io" else brainscale.DiagParamDimAlgorithm
    learner = cls(m, **kw).compile_graph(xs[0])
    p = m.states(brainstate.ParamState)
    return np.stack([np.asarray(brainstate.transform.grad(
        lambda: jnp.sum(learner(x) * jnp.arange(1.0, N + 1)), p)()[("w",)]) for x in xs])


def test_custom_vjp_surrogate_in_update_matches_bptt_and_custom_jvp():
    """Before: every learner call died with JAX's "can't apply forward-mode autodiff (jvp) to
    a custom_vjp function" (the step is linearised). Now the JVP is the transpose of the
    backward rule: D-RTRL equals BPTT here (no recurrent weight: the diagonal is exact), and
    both algorithms equal the same surrogate written with jax.custom_jvp."""
    from oracle import bptt_grads
    xs = jax.random.normal(jax.random.PRNGKey(2), (6, 3)) * 2.0
    loss = lambda out: jnp.sum(out * jnp.arange(1.0, N + 1))  # noqa: E731
    ref = bptt_grads(CustomVjpSpiking("vjp"), xs, loss)[("w",)]
    got = {(kind, alg): _online(kind, alg, xs) for kind in ("vjp", "jvp") for alg in ("param", "io")}
    assert np.abs(got["vjp", "param"]).max() > 1e-3
    np.testing.assert_allclose(got["vjp", "param"].sum(0), np.asarray(ref), rtol=1e-5, atol=1e-6)
    for alg in ("param", "io"):
        np.testing.assert_allclose(got["vjp", alg], got["jvp", alg], rtol=1e-6, atol=1e-7)


def test_custom_vjp_with_a_backward_rule_jax_cannot_transpose_is_a_clear_error():
    f = jax.custom_vjp(lambda v: (v > 0).astype(v.dtype))
    f.defvjp(lambda v: ((v > 0).astype(v.dtype), v),
             lambda v, g: (jnp.where(g > 0, g, 0.0) * _sg(v),))   # not linear in g
    with pytest.raises(brainscale.UnsupportedPrimitiveError,
                       match=r"jax.custom_vjp function at tests/test_rule_table.py:\d+ .*"
                             r"transposing its backward rule.*jax.custom_jvp"):
        brainscale.DiagParamDimAlgorithm(OneNeuron(lambda v, x: f(v))).compile_graph(
            jnp.ones(3))


# ------------------------------------------------------------------------------ the table
def _table_names() -> set:
    return {n for n, rule in DEP_RULES.items() if getattr(rule, "__module__", "") == R.__name__}


def test_every_table_entry_has_a_case():
    cases = (set(ELEMENTWISE) | set(MIXING) | set(CONSTANT) | set(RANDOM) | set(CALLS)
             | {"closed_call"} | set(LOOPS))
    missing = _table_names() - cases
    assert not missing, f"rule-table entries without a test case: {sorted(missing)}"
    stale = cases - _table_names()
    assert not stale, f"test cases for names the table does not have: {sorted(stale)}"


def test_every_call_name_of_this_jax_has_a_rule_or_is_inlined():
    assert C.JIT_NAMES <= C.CALL_NAMES
    present = {n for n in C.CALL_NAMES | C.JIT_NAMES if n in EXISTING}
    assert {"jit", "remat2", "custom_jvp_call", "custom_vjp_call"} <= present
    custom = {"custom_jvp_call"} | C.CUSTOM_VJP_NAMES
    for n in present:
        want = R._custom_derivative_rule if n in custom else R._call_rule
        assert DEP_RULES.get(n) is want, f"call primitive '{n}' has no call rule"
    # jit / closed_call / checkpoint are inlined: the analysis sees their bodies directly
    for wrap in (jax.jit, jax.checkpoint, jax.remat):
        closed = C.inline_calls(jax.make_jaxpr(lambda v: wrap(jnp.sin)(v))(jnp.zeros(N)))
        assert [e.primitive.name for e in C.open_jaxpr(closed).eqns] == ["sin"]


# -------------------------------------------------- what updates emit, on this jax version
def _surrogates():
    out = {}
    for name in sorted(dir(braintools.surrogate)):
        cls = getattr(braintools.surrogate, name)
        if isinstance(cls, type) and name[0].isupper() and name != "Surrogate":
            try:
                inst = cls()
                inst(jnp.zeros(N, F32))
            except Exception:  # noqa: BLE001 - needs arguments / not a surrogate
                continue
            out[f"braintools.surrogate.{name}"] = inst
    return out


COMMON_ELEMENTWISE = {
    **{f"jnp.{n}": getattr(jnp, n) for n in
       "exp exp2 expm1 log1p tanh sin cos sqrt cbrt abs sign floor ceil round trunc rint square "
       "negative reciprocal sinh cosh arcsinh arctan isfinite isnan isinf signbit fabs sinc "
       "log2 log10 deg2rad nan_to_num".split()},
    "jnp.power": lambda v: jnp.power(v, 3), "jnp.where": lambda v: jnp.where(v > 0, v, 0.0),
    "jnp.clip": lambda v: jnp.clip(v, -0.5, 0.5), "jnp.mod": lambda v: jnp.mod(v, 0.3),
    "jnp.heaviside": lambda v: jnp.heaviside(v, 0.5), "jnp.hypot": lambda v: jnp.hypot(v, 1.0),
    "jnp.logaddexp": lambda v: jnp.logaddexp(v, 1.0), "jnp.copysign": lambda v: jnp.copysign(v, -1.0),
    "jnp.isclose": lambda v: jnp.isclose(v, 0.0),
    **{f"jax.nn.{n}": getattr(jax.nn, n) for n in
       "sigmoid relu relu6 elu selu gelu celu leaky_relu hard_tanh hard_sigmoid hard_swish "
       "log_sigmoid soft_sign softplus silu mish".split() if hasattr(jax.nn, n)},
    "jax.nn.gelu(exact)": lambda v: jax.nn.gelu(v, approximate=False),
    **{f"u.math.{n}": getattr(u.math, n) for n in "exp tanh sin abs sqrt relu sigmoid".split()},
    "u.math.where": lambda v: u.math.where(v > 0, v, 0.0),
    "quantity arithmetic": lambda v: ((u.Quantity(v, unit=u.mV) * 2 + 1 * u.mV) / u.mV),
    "jax.random.bernoulli": lambda v: jax.random.bernoulli(_key(), jax.nn.sigmoid(v)) * v,
    "jax.random.normal": lambda v: v + jax.random.normal(_key(), v.shape),
    **_surrogates(),
}
COMMON_MIXING = {
    "jnp.roll": lambda v: jnp.roll(v, 1), "jnp.cumsum": jnp.cumsum, "jnp.mean": lambda v: v - jnp.mean(v),
    "jnp.var": lambda v: v / jnp.var(v), "jax.nn.softmax": jax.nn.softmax,
    "jax.nn.standardize": jax.nn.standardize, "jnp.sort": jnp.sort, "jnp.flip": jnp.flip,
    "jnp.linalg.norm": lambda v: v / jnp.linalg.norm(v), "jnp.diff": lambda v: jnp.diff(v, prepend=0.0),
    "jnp.convolve": lambda v: jnp.convolve(v, jnp.ones(3), mode="same"),
    "u.math.sum": lambda v: v + u.math.sum(v),
}


def test_common_update_functions_have_rules_and_the_right_class():
    """Everything jax.numpy / jax.nn / brainunit / braintools' surrogates emit in these
    functions has a rule (none falls to the mix-everything default), and the analysis proves
    the element-wise ones element-wise and finds the mixing in the others."""
    unruled = {}
    for label, f in {**COMMON_ELEMENTWISE, **COMMON_MIXING}.items():
        for n in traced_names(lambda v, x, f=f: f(v)) - set(DEP_RULES):
            unruled.setdefault(n, []).append(label)
    assert not unruled, f"primitives without a dependency rule (first users): {unruled}"
    v = jnp.linspace(-0.5, 0.5, N, dtype=F32)
    for label, f in COMMON_ELEMENTWISE.items():
        assert elementwise_error(lambda a, f=f: jnp.asarray(f(a), F32), v, label) is None, label
    for label, f in COMMON_MIXING.items():
        err = elementwise_error(lambda a, f=f: jnp.asarray(f(a), F32), v, label)
        assert err is not None and "not element-wise" in err, label
