"""D-RTRL traces of a 2-state group packed in one complex array (``layout-traces{pack_pairs}``).

The compact trace of a weight driving a 2-state neuron (ALIF: V and a) keeps its two states in
one complex64 array, state 0 in the real and state 1 in the imaginary part, so that XLA CPU
updates it in place (two real arrays are copied every step; tools/bench_k2_update.py). The IR
says so (``storage=c64[...]``), the step allocates exactly that, and the gradients, traces and
``etrace_of`` are those of the unpacked layout.
"""
from __future__ import annotations

import dataclasses

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import models
from helpers import rel_err

UNPACKED = [*brainscale.DEFAULT_PIPELINE[:-1], "layout-traces{pack_pairs=false}"]


def _loss(out, tgt):
    return jnp.sum((jax.tree.leaves(out)[0] - tgt) ** 2)


def _learner(batch, pipeline=None):
    m, x0 = models.make("alif", batch)
    return m, x0, brainscale.DiagParamDimAlgorithm(m, pipeline=pipeline).compile_graph(x0)


def _out_shape(batch, x0):
    """The step's output shape (one step of a throwaway model)."""
    return np.shape(jax.tree.leaves(models.make("alif", batch)[0].update(x0))[0])


def _packed(learner):
    return [a for t in learner.graph.traces for a in t.arrays if a.packed]


@pytest.mark.parametrize("batch", [0, 2])
def test_alif_pair_is_packed_printed_and_allocated(batch):
    _, _, lrn = _learner(batch)
    packed = _packed(lrn)
    assert packed and all(a.storage == "complex64" and a.state is None for a in packed)
    text = lrn.ir()
    for a in packed:
        assert a.type.shape[-1] == 2 and a.stored_type.shape == a.type.shape[:-1]
        assert f"storage={a.stored_type}" in text
    values = lrn.trace_states()
    for a in packed:
        v = values[a.id].value
        assert v.dtype == jnp.complex64 and v.shape == a.stored_type.shape
    # the same bytes as two float32 arrays
    _, _, ref = _learner(batch, UNPACKED)
    assert not _packed(ref)
    assert sum(t.nbytes for t in lrn.graph.traces) == sum(t.nbytes for t in ref.graph.traces)


@pytest.mark.parametrize("batch", [0, 3])
def test_packed_gradients_and_traces_equal_the_unpacked_layout(batch):
    runs = []
    for pipe in (None, UNPACKED):
        m, x0, lrn = _learner(batch, pipe)
        params = m.states(brainstate.ParamState)
        rng = np.random.RandomState(4)
        out_shape = _out_shape(batch, x0)
        grads = []
        for _ in range(4):
            x = jnp.asarray(rng.randn(*np.shape(x0)), jnp.float32)
            tgt = jnp.asarray(rng.randn(*out_shape), jnp.float32)
            grads.append(brainstate.transform.grad(lambda: _loss(lrn(x), tgt), params)())
        traces = {p: lrn.etrace_of(p) for p in {r.param for r in lrn.graph.relations}}
        runs.append((grads, traces))
    (g_p, tr_p), (g_u, tr_u) = runs
    for a, b in zip(g_p, g_u):
        assert rel_err(a, b) < 1e-6
    assert tr_p.keys() == tr_u.keys()
    for p in tr_p:
        assert rel_err(tr_p[p], tr_u[p]) < 1e-6


def test_online_gradients_chunked_equal_unpacked():
    outs = []
    for pipe in (None, UNPACKED):
        m, x0, lrn = _learner(2, pipe)
        rng = np.random.RandomState(5)
        xs = jnp.asarray(rng.randn(6, *np.shape(x0)), jnp.float32)
        out_shape = _out_shape(2, x0)
        tg = jnp.asarray(rng.randn(6, *out_shape), jnp.float32)
        outs.append([brainscale.online_gradients(lrn, xs, tg, _loss, chunk=c)[0]
                     for c in (1, 3)])
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-6


def test_a_packed_array_where_it_cannot_be_is_a_verifier_error():
    _, _, lrn = _learner(2, UNPACKED)
    g = lrn.graph
    t = next(t for t in g.traces if t.dim == "param")
    a0 = t.arrays[0]
    # one state of a split pair stored as complex: not a stacked pair
    bad = dataclasses.replace(a0, storage="complex64")
    g2 = g.replace(traces=tuple(dataclasses.replace(x, arrays=(bad,) + x.arrays[1:])
                                if x is t else x for x in g.traces))
    with pytest.raises(brainscale.IRVerificationError, match="packed pair"):
        brainscale.verify(g2)


def _with_arrays(g, t, arrays):
    return g.replace(traces=tuple(dataclasses.replace(x, arrays=arrays) if x is t else x
                                  for x in g.traces))


def test_a_packed_pair_needs_an_op_with_a_pair_rule_and_every_leaf_packed():
    _, _, lrn = _learner(2)
    g = lrn.graph
    t = next(t for t in g.traces if any(a.packed for a in t.arrays))
    brainscale.verify(g)                         # as compiled: valid
    # the backend's packed contraction is right for MatMulOp only: another op class is refused
    op_name = g.relation_by_id[t.arrays[0].relation].op
    other = g.replace(ops=tuple(dataclasses.replace(o, op_class="ConvOp")
                                if o.name == op_name else o for o in g.ops))
    with pytest.raises(brainscale.IRVerificationError, match="no packed-pair rule"):
        brainscale.verify(other)
    # one leaf of a block unpacked (per state), the other packed: refused
    packed = [a for a in t.arrays if a.packed]
    assert len(packed) >= 2                      # weight and bias of the MatMulOp
    _, _, ref = _learner(2, UNPACKED)
    rt = next(x for x in ref.graph.traces if x.id == t.id)
    mixed = [packed[0]] + [a for a in rt.arrays if a.leaf != packed[0].leaf]
    mixed = tuple(dataclasses.replace(a, id=f"{t.id}.{i}") for i, a in enumerate(mixed))
    with pytest.raises(brainscale.IRVerificationError, match="pack every leaf or none"):
        brainscale.verify(_with_arrays(g, t, mixed))
