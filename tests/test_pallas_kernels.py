"""Pallas kernels against their pure-JAX references and the JAX backend's rules.

On CPU every kernel runs in interpret mode on tiny shapes (the interpreter is slow); the
same checks at GPU-sized shapes run compiled (Triton) under the ``gpu`` marker. Inputs are
fresh random numbers each run (the seed is in the failure message). float32 must agree to
1e-5 relative (max |Δ| / max |ref|); bfloat16 storage errors are printed and bounded.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from brainscale.backends.pallas import (DrtrlItem, Tiles, drtrl_grad, drtrl_multi,
                                        drtrl_reference, drtrl_step, drtrl_update,
                                        es_chunked_grad, es_chunked_grad_reference,
                                        es_perstep_grad_reference)
from brainscale.backends.pallas import _common

F32_TOL = 1e-5
BF16_TOL = 2e-2
ON_GPU = _common.platform().kind == "gpu"


def rel(a, b) -> float:
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % (2 ** 31))


def make_inputs(seed, B, I, O, k, storage="float32", chain=False, acc=False, batched=True):
    rng = np.random.RandomState(seed)
    b = (B,) if batched else ()
    f = lambda *s: jnp.asarray(rng.randn(*s).astype(np.float32))  # noqa: E731
    d = dict(eps=f(*b, I, O, k).astype(storage), J=f(*b, O, k, k) * 0.5, df=f(*b, O, k),
             x=f(*b, I), delta=f(*b, O, k))
    d["c"] = jnp.asarray((rng.rand(I, O) < 0.6).astype(np.float32)) * f(I, O) if chain else None
    d["grad_acc"] = f(I, O) if acc else None
    return d


def matmul_rules(inp, mask=None):
    """The JAX backend's fused MatMulOp rules on the same inputs (c = mask when given)."""
    op = brainscale.MatMulOp(weight_mask=mask)
    I, O = inp["eps"].shape[-3], inp["eps"].shape[-2]
    w = {"weight": jnp.ones((I, O), jnp.float32)}
    eps = inp["eps"].astype(jnp.float32)                   # (.., I, O, k) -> k per-state trees
    k = eps.shape[-1]
    new = op.drtrl_update([{"weight": eps[..., i]} for i in range(k)], inp["J"], inp["df"],
                          inp["x"], w)
    g = op.drtrl_grad(new, inp["delta"], w)["weight"]
    return jnp.stack([n["weight"] for n in new], axis=-1), g


# ---------------------------------------------------------------------------------------
# interpret mode (CPU) and compiled (GPU): the one-pass step
# ---------------------------------------------------------------------------------------

STEP_CASES = {
    # name: (B, I, O, k, tiles, chain, acc, batched)
    "grid2x2_loop": (4, 8, 16, 1, Tiles(2, 4, 8), False, False, True),
    "nondiv_batch1_k2": (1, 7, 5, 2, Tiles(2, 4, 8), True, True, True),
    "unbatched_k3": (1, 6, 12, 3, Tiles(1, 2, 4), False, True, False),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_drtrl_step_matches_reference_and_jax_rules(case):
    B, I, O, k, tiles, chain, acc, batched = STEP_CASES[case]
    seed = fresh_seed()
    inp = make_inputs(seed, B, I, O, k, chain=chain, acc=acc, batched=batched)
    fn = jax.jit(functools.partial(drtrl_step, tiles=tiles, interpret=not ON_GPU))
    e1, g1 = fn(inp["eps"], inp["J"], inp["df"], inp["x"], inp["delta"], inp["c"], inp["grad_acc"])
    e2, g2 = drtrl_reference(inp["eps"], inp["J"], inp["df"], inp["x"], inp["delta"], inp["c"],
                             inp["grad_acc"])
    assert e1.shape == inp["eps"].shape and e1.dtype == inp["eps"].dtype
    assert rel(e1, e2) < F32_TOL, (case, seed)
    assert rel(g1, g2) < F32_TOL, (case, seed)
    # the JAX backend's MatMulOp rules (c = the mask's chain factor)
    if chain:
        mask = inp["c"]
        e3, g3 = matmul_rules(inp, mask=mask)
    else:
        e3, g3 = matmul_rules(inp)
    if acc:
        g3 = g3 + inp["grad_acc"]
    assert rel(e1, e3) < F32_TOL, (case, seed)
    assert rel(g1, g3) < F32_TOL, (case, seed)


def test_update_only_and_grad_only_match():
    seed = fresh_seed()
    inp = make_inputs(seed, 3, 8, 8, 2)
    tiles = Tiles(1, 4, 8)
    interp = not ON_GPU

    @jax.jit
    def both(eps, J, df, x, delta):
        new = drtrl_update(eps, J, df, x, tiles=tiles, interpret=interp)
        return new, drtrl_grad(new, delta, tiles=tiles, interpret=interp)
    e1, g1 = both(inp["eps"], inp["J"], inp["df"], inp["x"], inp["delta"])
    e2, _ = drtrl_reference(inp["eps"], inp["J"], inp["df"], inp["x"], grad=False)
    _, g2 = drtrl_reference(e2, delta=inp["delta"], update=False)
    e3, g3 = matmul_rules(inp)
    assert rel(e1, e2) < F32_TOL and rel(g1, g2) < F32_TOL, seed
    assert rel(e1, e3) < F32_TOL and rel(g1, g3) < F32_TOL, seed


def test_several_traces_in_one_launch():
    seed = fresh_seed()
    ins = [make_inputs(seed + i, 2, 4, 8, 1, chain=(i == 1), acc=(i == 2)) for i in range(3)]
    items = [DrtrlItem(d["eps"], d["J"], d["df"], d["x"], d["c"], d["delta"], d["grad_acc"])
             for d in ins]
    fn = jax.jit(lambda its: drtrl_multi(its, tiles=Tiles(2, 4, 8), interpret=not ON_GPU))
    jaxpr = jax.make_jaxpr(lambda its: drtrl_multi(its, tiles=Tiles(2, 4, 8),
                                                   interpret=not ON_GPU))(items)
    calls = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert len(calls) == 1                       # one launch for the three traces
    aliases = dict(calls[0].params["input_output_aliases"])
    assert len(aliases) == 4                     # 3 traces + 1 gradient accumulator in place
    outs = fn(items)
    for d, (e1, g1) in zip(ins, outs):
        e2, g2 = drtrl_reference(d["eps"], d["J"], d["df"], d["x"], d["delta"], d["c"],
                                 d["grad_acc"])
        assert rel(e1, e2) < F32_TOL and rel(g1, g2) < F32_TOL, seed


def test_bf16_storage_f32_math(capsys):
    seed = fresh_seed()
    inp = make_inputs(seed, 2, 8, 16, 2, storage="bfloat16")
    fn = jax.jit(functools.partial(drtrl_step, tiles=Tiles(2, 8, 8), interpret=not ON_GPU))
    e1, g1 = fn(inp["eps"], inp["J"], inp["df"], inp["x"], inp["delta"])
    assert e1.dtype == jnp.bfloat16 and g1.dtype == jnp.float32
    # same bf16 inputs, float32 math: differences are the bf16 rounding of the output
    e2, g2 = drtrl_reference(inp["eps"], inp["J"], inp["df"], inp["x"], inp["delta"])
    # the all-f32 computation (f32 trace in, f32 out)
    e3, g3 = drtrl_reference(inp["eps"].astype(jnp.float32), inp["J"], inp["df"], inp["x"],
                             inp["delta"])
    err_ref, err_f32, g_err = rel(e1, e2), rel(e1, e3), rel(g1, g3)
    assert err_ref < BF16_TOL and err_f32 < BF16_TOL, seed
    assert g_err < F32_TOL, seed        # the gradient is contracted before the bf16 rounding


def test_in_place_under_jit_and_scan():
    """T steps with the trace and the gradient accumulator as the scan carry."""
    seed = fresh_seed()
    T, B, I, O, k = 4, 2, 8, 8, 1
    rng = np.random.RandomState(seed)
    f = lambda *s: jnp.asarray(rng.randn(*s).astype(np.float32))  # noqa: E731
    seq = dict(J=f(T, B, O, k, k) * 0.5, df=f(T, B, O, k), x=f(T, B, I), delta=f(T, B, O, k))
    eps0, g0 = jnp.zeros((B, I, O, k)), jnp.zeros((I, O))

    def run(step):
        def body(carry, s):
            e, g = carry
            return step(e, s["J"], s["df"], s["x"], s["delta"], None, g), None
        return jax.jit(lambda e, g: jax.lax.scan(body, (e, g), seq)[0])(eps0, g0)
    e1, g1 = run(functools.partial(drtrl_step, tiles=Tiles(2, 4, 8), interpret=not ON_GPU))
    e2, g2 = run(lambda *a: drtrl_reference(*a))
    assert rel(e1, e2) < F32_TOL and rel(g1, g2) < F32_TOL, seed


ES_CASES = {"nondiv_chain": (3, 5, 20, 12, True), "batch1": (4, 1, 16, 16, False)}


@pytest.mark.parametrize("case", list(ES_CASES))
def test_es_chunked_matches_reference_and_per_step(case):
    K, B, I, O, chain = ES_CASES[case]
    seed = fresh_seed()
    rng = np.random.RandomState(seed)
    f = lambda *s: jnp.asarray(rng.randn(*s).astype(np.float32))  # noqa: E731
    X, S, G = f(K, B, I), f(K, B, O), f(I, O)
    c = f(I, O) if chain else None
    g1 = jax.jit(functools.partial(es_chunked_grad, interpret=not ON_GPU))(X, S, G, c)
    g2 = es_chunked_grad_reference(X, S, G, c)
    g3 = es_perstep_grad_reference(X, S, G, c)
    assert rel(g1, g2) < F32_TOL and rel(g2, g3) < F32_TOL, (case, seed)


# ---------------------------------------------------------------------------------------
# Triton lowering on a CPU-only host (catches power-of-two and lowering errors; jax 0.10.x)
# ---------------------------------------------------------------------------------------

def _lower_cuda(fn, *args):
    try:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        if ("GPU" in msg and ("found" in msg or "supported" in msg)) or "cuda" in msg.lower() \
                and "platform" in msg.lower():
            pytest.skip(f"this jax cannot lower for CUDA without a GPU: {msg[:120]}")
        raise


@pytest.mark.parametrize("k,storage", [(1, "float32"), (2, "bfloat16")])
def test_triton_lowering_default_tiles(k, storage):
    if ON_GPU:
        pytest.skip("covered by the GPU tests")
    B, I, O = 8, 64, 256
    s = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.float32)  # noqa: E731
    eps = jax.ShapeDtypeStruct((B, I, O, k), jnp.dtype(storage))
    args = (eps, s(B, O, k, k), s(B, O, k), s(B, I), s(B, O, k), s(I, O), s(I, O))
    txt = _lower_cuda(lambda *a: drtrl_step(*a), *args)
    assert "triton" in txt.lower() or "__gpu$xla.gpu.triton" in txt
    _lower_cuda(lambda e, J, df, x: drtrl_update(e, J, df, x), *args[:4])
    _lower_cuda(lambda e, d: drtrl_grad(e, d), eps, s(B, O, k))
    _lower_cuda(lambda X, S, G, c: es_chunked_grad(X, S, G, c), s(4, 16, 128), s(4, 16, 128),
                s(128, 128), s(128, 128))
    two = lambda *a: drtrl_multi([DrtrlItem(*a[:5], a[5], a[6]),  # noqa: E731
                                  DrtrlItem(a[0], *a[1:4], None, a[5])])
    _lower_cuda(two, eps, s(B, O, k, k), s(B, O, k), s(B, I), s(I, O), s(B, O, k), s(I, O))


# ---------------------------------------------------------------------------------------
# GPU: the same checks compiled, at sizes where the tiles matter
# ---------------------------------------------------------------------------------------

GPU_CASES = [(16, 256, 512, 1, "float32"), (8, 200, 300, 2, "float32"),
             (16, 256, 512, 1, "bfloat16"), (1, 1024, 1024, 1, "float32")]


@pytest.mark.gpu
@pytest.mark.parametrize("B,I,O,k,storage", GPU_CASES)
def test_gpu_drtrl_compiled(B, I, O, k, storage, capsys):
    seed = fresh_seed()
    inp = make_inputs(seed, B, I, O, k, storage=storage, chain=True, acc=True)
    e1, g1 = jax.jit(drtrl_step)(inp["eps"], inp["J"], inp["df"], inp["x"], inp["delta"],
                                 inp["c"], inp["grad_acc"])
    e2, g2 = drtrl_reference(inp["eps"], inp["J"], inp["df"], inp["x"], inp["delta"], inp["c"],
                             inp["grad_acc"])
    tol = F32_TOL if storage == "float32" else BF16_TOL
    assert rel(e1, e2) < tol and rel(g1, g2) < F32_TOL * 10, seed
    e3 = jax.jit(drtrl_update)(inp["eps"], inp["J"], inp["df"], inp["x"], inp["c"])
    g3 = jax.jit(drtrl_grad)(e3, inp["delta"], inp["grad_acc"])
    e4, _ = drtrl_reference(inp["eps"], inp["J"], inp["df"], inp["x"], c=inp["c"], grad=False)
    _, g4 = drtrl_reference(e4, delta=inp["delta"], grad_acc=inp["grad_acc"], update=False)
    assert rel(e3, e4) < tol and rel(g3, g4) < F32_TOL * 10, seed


@pytest.mark.gpu
def test_gpu_es_chunked_compiled():
    seed = fresh_seed()
    rng = np.random.RandomState(seed)
    f = lambda *s: jnp.asarray(rng.randn(*s).astype(np.float32))  # noqa: E731
    X, S, G, c = f(8, 64, 512), f(8, 64, 384), f(512, 384), f(512, 384)
    g1 = jax.jit(es_chunked_grad)(X, S, G, c)
    g2 = es_chunked_grad_reference(X, S, G, c)
    assert rel(g1, g2) < F32_TOL * 10, seed
