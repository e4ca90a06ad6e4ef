"""Online learning memory does not grow with the sequence length T.

``brainscale.online_gradients`` runs a scan over T whose body takes the gradient of ONE
step; the traces are the only memory carried across steps. We compile it ahead of time for
T = 100 and T = 10,000 and read XLA's memory analysis: the temporary buffer size must be
the same (the inputs/targets and the per-step losses grow with T, of course: they are
arguments/outputs, not temporaries). A BPTT reference (grad over a scan of the plain model)
must grow with T, which shows the measurement can see growth at all.

On CPU (jax 0.10.2) ``compiled.memory_analysis()`` returns a ``CompiledMemoryStats``, and
``temp_size_in_bytes`` is what we compare. Should a backend return ``None``, the test falls
back to the byte size of the largest ``while``-loop carry in the optimized HLO text (the
state a scan keeps across steps), which must not depend on T either.
"""
from __future__ import annotations

import re

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale

import models

#: memory is measured on what users compile (conftest.py: the rest of the suite skips most
#: of XLA's optimisations)
pytestmark = pytest.mark.optimized


def loss_fn(out, target):
    return jnp.sum(out * target)


def _specs(T, x0, out_shape):
    return (jax.ShapeDtypeStruct((T,) + tuple(np.shape(x0)), jnp.float32),
            jax.ShapeDtypeStruct((T,) + tuple(out_shape), jnp.float32))


def _online_fn(learner):
    def online(xs, ys):
        return brainscale.online_gradients(learner, xs, ys, loss_fn, jit=False)
    return brainstate.transform.jit(online)


def _bptt_fn(model):
    params = model.states(brainstate.ParamState)

    def bptt(xs, ys):
        def total():
            def body(c, xy):
                return c + loss_fn(model(xy[0]), xy[1]), None
            c, _ = brainstate.transform.scan(body, jnp.zeros((), jnp.float32), (xs, ys))
            return c
        return brainstate.transform.grad(total, params)()
    return brainstate.transform.jit(bptt)


def _while_carry_bytes(hlo_text: str, T: int) -> int:
    """Fallback measure: bytes of the largest ``while`` carry tuple in optimized HLO, not
    counting the arrays with a leading axis of length T (the sequence being scanned over
    and the stacked per-step outputs, which are arguments/outputs, not temporaries)."""
    best = 0
    for m in re.finditer(r"= \(([^)]*)\) while\(", hlo_text):
        total = 0
        for dt, dims in re.findall(r"(f32|f64|s32|u32|pred|f16|bf16)\[([\d,]*)\]", m.group(1)):
            shape = [int(d) for d in dims.split(",") if d]
            if shape and shape[0] == T:
                continue
            n = int(np.prod(shape, dtype=np.int64))
            total += n * {"f64": 8, "f16": 2, "bf16": 2, "pred": 1}.get(dt, 4)
        best = max(best, total)
    return best


def _temp_bytes(jitted, *specs) -> tuple[int, str]:
    compiled = jitted.lower(*specs).compile()
    ma = compiled.memory_analysis()
    if ma is not None and getattr(ma, "temp_size_in_bytes", None) is not None:
        return int(ma.temp_size_in_bytes), "memory_analysis"
    T = specs[0].shape[0]
    return _while_carry_bytes(compiled.as_text(), T), "while-carry"


@pytest.mark.parametrize("name,algo,batch", [("lif_delta", "param", 2), ("lif_delta", "io", 2),
                                             ("alif", "io", 0), ("conv_snn", "param", 0)])
def test_online_temp_memory_independent_of_T(name, algo, batch, capsys):
    model, x0 = models.make(name, batch)
    out_shape = np.shape(models.make(name, batch)[0].update(x0))
    learner = (brainscale.DiagParamDimAlgorithm(model) if algo == "param"
               else brainscale.DiagIODimAlgorithm(model, decay_or_rank=0.9))
    learner.compile_graph(x0)
    online = _online_fn(learner)
    sizes = {}
    for T in (100, 10_000):
        sizes[T], how = _temp_bytes(online, *_specs(T, x0, out_shape))
    bptt = _bptt_fn(models.make(name, batch)[0])
    ref = {T: _temp_bytes(bptt, *_specs(T, x0, out_shape))[0] for T in (100, 10_000)}
    assert sizes[100] == sizes[10_000]
    if how == "memory_analysis":
        # BPTT stores the whole history: its temporaries grow about linearly in T
        assert ref[10_000] > 50 * ref[100]
        assert sizes[10_000] < ref[10_000] / 10


def test_while_carry_fallback_measure():
    """The fallback measure (used only if memory_analysis() is unavailable) is itself
    independent of T for the online step."""
    model, x0 = models.lif_delta(2)
    learner = brainscale.DiagParamDimAlgorithm(model)
    learner.compile_graph(x0)
    online = _online_fn(learner)
    sizes = [_while_carry_bytes(online.lower(*_specs(T, x0, (2, 5))).compile().as_text(), T)
             for T in (100, 10_000)]
    assert sizes[0] == sizes[1] > 0


def test_online_gradients_runs_and_sums_per_step_grads():
    """The scan of ``online_gradients`` gives the sum of the per-step gradients."""
    model, x0 = models.lif_delta(0)
    model2, _ = models.lif_delta(0)
    learner = brainscale.DiagIODimAlgorithm(model, decay_or_rank=0.9)
    learner.compile_graph(x0)
    learner2 = brainscale.DiagIODimAlgorithm(model2, decay_or_rank=0.9)
    learner2.compile_graph(x0)
    rng = np.random.RandomState(0)
    T = 7
    xs = jnp.asarray(rng.randn(T, 3), jnp.float32)
    ys = jnp.asarray(rng.randn(T, 5), jnp.float32)
    grads, losses = brainscale.online_gradients(learner, xs, ys, loss_fn)
    assert losses.shape == (T,)
    params = model2.states(brainstate.ParamState)
    acc = None
    for t in range(T):
        g = brainstate.transform.grad(lambda: loss_fn(learner2(xs[t]), ys[t]), params)()
        acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
    for k in acc:
        for a, b in zip(jax.tree.leaves(grads[k]), jax.tree.leaves(acc[k])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
