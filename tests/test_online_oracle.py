"""Compiled online gradients and traces vs the dense oracle (tests/oracle.py), step by step.

For every model of ``tests/models.py``, for D-RTRL (``param``) and ES-D-RTRL (``io``,
α = 0.9), unbatched and batched (B = 2): two identically built models, one wrapped by the
compiled algorithm and one driven by :class:`oracle.DenseOracle`, receive the same random
inputs and per-step targets for 20 steps (loss ``sum(out * target)``). At every step

* the loss and all hidden states agree,
* the gradient of EVERY ``ParamState`` agrees (relative tolerance 1e-4, float32),
* the traces agree: io-dim ``learner.etrace_xs`` vs the oracle's ``ε_x`` and
  ``learner.etrace_dfs`` vs the oracle's dense ``ε_f`` (the learner keeps its diagonal);
  param-dim ``learner.etrace_of(param)`` (compact or per-neuron dense layout) vs the oracle's
  dense ``E_q`` rows. Both are compared by rebuilding the dense N×|y| / N×|θ| matrix from the
  learner's trace, so entries the compact layout drops must be zero in the oracle.
"""
from __future__ import annotations

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale

import models
from oracle import DenseOracle

T_STEPS = 20
ALPHA = 0.9
RTOL = 1e-4


def loss_fn(out, target):
    return jnp.sum(out * target)


def _np(x):
    return np.asarray(u.get_mantissa(x) if isinstance(x, u.Quantity) else x)


def _leaves(tree):
    return [_np(l) for l in jax.tree.leaves(tree, is_leaf=lambda a: isinstance(a, u.Quantity))]


def assert_rel_close(actual, expected, what, rtol=RTOL):
    a = np.concatenate([np.ravel(l) for l in _leaves(actual)] or [np.zeros(0)])
    b = np.concatenate([np.ravel(l) for l in _leaves(expected)] or [np.zeros(0)])
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-6)
    err = float(np.max(np.abs(a - b))) / scale if a.size else 0.0
    assert err < rtol, f"{what}: relative error {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------------------
# dense reconstruction of the learner's traces
# ---------------------------------------------------------------------------------------

def _row_offsets(hidden_names):
    """hidden state name -> (row offset, size) in the oracle's flat h."""
    out, p = {}, 0
    for path, shape in hidden_names:
        n = int(np.prod(shape, dtype=int))
        out[".".join(str(s) for s in path)] = (p, n)
        p += n
    return out, p


_COLUMNS_CACHE: dict = {}


def _columns(op, w_leaves_tree, yshape):
    """For a compact-layout op: per leaf, the output neuron (flat index in ``yshape``) that
    each parameter element reaches, from ``op.yw_to_w(one_hot, ones)`` (cached per op)."""
    key = (id(op), tuple(yshape))
    if key not in _COLUMNS_CACHE:
        _COLUMNS_CACHE[key] = (op, _columns_uncached(op, w_leaves_tree, yshape))
    return _COLUMNS_CACHE[key][1]


def _columns_uncached(op, w_leaves_tree, yshape):
    ones = jax.tree.map(jnp.ones_like, w_leaves_tree)
    n_y = int(np.prod(yshape, dtype=int))
    cols = [np.full(np.shape(l), -1, int) for l in jax.tree.leaves(ones)]
    for j in range(n_y):
        onehot = jnp.zeros(n_y, jnp.float32).at[j].set(1.0).reshape(yshape)
        masks = [np.asarray(m) for m in jax.tree.leaves(op.yw_to_w(onehot, ones))]
        for c, m in zip(cols, masks):
            hit = m != 0
            assert np.all(c[hit] == -1), "a parameter element reaches two neurons"
            c[hit] = j
    assert all(np.all(c >= 0) for c in cols), "a parameter element reaches no neuron"
    return cols


def dense_from_param_trace(learner, param_state, rid, gid, tree, offsets, N):
    """Rebuild the oracle's N×|θ| ``E_q`` from the learner's trace of one (relation, group)."""
    g = learner.graph
    rel = g.relation_by_id[rid]
    op_node = g.op_by_name[rel.op]
    grp = g.group_by_id[gid]
    layout = op_node.layout
    w_leaves = [_np(l) for l in jax.tree.leaves(param_state.value)]
    sizes = [l.size for l in w_leaves]
    E = np.zeros((N, sum(sizes)), np.float64)
    learner_leaves = [_np(l) for l in jax.tree.leaves(tree)]
    assert len(learner_leaves) == len(w_leaves)
    ymeta = tuple(op_node.type.shape[1:] if op_node.batched else op_node.type.shape)
    cols = None
    if layout == "compact":
        w_tree = jax.tree.map(lambda a: jnp.asarray(a), param_state.value)
        cols = _columns(param_state.op, w_tree, ymeta)
    o = 0
    for li, (wl, tl) in enumerate(zip(w_leaves, learner_leaves)):
        sz = wl.size
        for i, s in enumerate(grp.states):
            off, n_s = offsets[s]
            if layout == "dense":
                # learner: bshape + yshape + (k,) + leaf.shape
                nb = tl.ndim - len(ymeta) - 1 - wl.ndim
                assert tl.shape[nb + len(ymeta)] == grp.num_state
                block = np.take(tl, i, axis=nb + len(ymeta)).reshape(n_s, sz)
                E[off:off + n_s, o:o + sz] = block
            elif layout == "channel":
                # learner: bshape + yshape + (k,) + leaf.shape without its channel axis; the
                # entries of the other channels are zero
                ca, la = op_node.channel_axis, op_node.param_channel_axes[li]
                nb = tl.ndim - len(ymeta) - 1 - (wl.ndim - 1)
                assert tl.shape[nb + len(ymeta)] == grp.num_state
                blk = np.take(tl, i, axis=nb + len(ymeta))      # bshape + yshape + rest
                C = wl.shape[la]
                full = np.zeros(blk.shape[:nb + len(ymeta)] + wl.shape, np.float64)
                chan = np.indices(ymeta)[ca]                          # channel of each neuron
                for c in range(C):
                    sel = (chan == c).reshape((1,) * nb + ymeta + (1,) * wl.ndim)
                    piece = np.expand_dims(blk, nb + len(ymeta) + la)
                    idx = [slice(None)] * full.ndim
                    idx[nb + len(ymeta) + la] = slice(c, c + 1)
                    full[tuple(idx)] += np.where(sel, piece, 0.0)
                E[off:off + n_s, o:o + sz] = full.reshape(n_s, sz)
            else:
                # learner: bshape + leaf.shape + (k,)
                nb = tl.ndim - wl.ndim - 1
                vals = tl[..., i].reshape(-1, sz)            # (B or 1, sz)
                n_y = n_s // vals.shape[0]
                c = cols[li].ravel()
                for b in range(vals.shape[0]):
                    E[off + b * n_y + c, o + np.arange(sz)] = vals[b]
        o += sz
    return E


def dense_from_df(learner, gid, df, offsets, N, y_size):
    """Rebuild the oracle's N×|y| ``ε_f`` from the learner's (varshape + (k,)) trace."""
    grp = learner.graph.group_by_id[gid]
    F = np.zeros((N, y_size), np.float64)
    df = _np(df)
    for i, s in enumerate(grp.states):
        off, n_s = offsets[s]
        assert n_s == y_size, "ε_f of an op whose output is not the group's neuron shape"
        F[off + np.arange(n_s), np.arange(n_s)] = df[..., i].ravel()
    return F


# ---------------------------------------------------------------------------------------
# the comparison loop
# ---------------------------------------------------------------------------------------

def _out_shape(name, batch, x0):
    m, _ = models.make(name, batch)
    return np.shape(m.update(x0))


def make_learner(model, algo):
    if algo == "param":
        return brainscale.DiagParamDimAlgorithm(model)
    if algo == "io":
        return brainscale.DiagIODimAlgorithm(model, decay_or_rank=ALPHA)
    return brainscale.DiagHybridDimAlgorithm(model, decay_or_rank=ALPHA)


def check_traces(learner, algo, r, params_by_path):
    g = learner.graph
    offsets, N = _row_offsets(r["hidden_names"])
    assert set(offsets) == {h.name for h in g.hidden}
    op_index = {o.name: q for q, o in enumerate(g.ops)}
    tr = r["traces"]
    param_traces = tr if algo == "param" else tr["param"]
    checked = 0
    if algo == "io":
        xs = learner.etrace_xs
        for xname, st in xs.items():
            qs = [op_index[o.name] for o in g.ops if o.x == xname]
            for q in qs:
                assert_rel_close(st.value, tr["x"][q], f"ε_x {xname} (op {q})", rtol=1e-5)
                checked += 1
        for (opname, gid), st in learner.etrace_dfs.items():
            q = op_index[opname]
            path = tuple(g.op_by_name[opname].param.split("."))
            F = tr["f"][(q, path)]
            F_hat = dense_from_df(learner, gid, st.value, offsets, N, F.shape[1])
            # the oracle's rows of other groups must be zero (ε_f only reaches this group)
            rows = np.concatenate([np.arange(offsets[s][0], offsets[s][0] + offsets[s][1])
                                   for s in g.group_by_id[gid].states])
            others = np.setdiff1d(np.arange(N), rows)
            np.testing.assert_allclose(F[others], 0.0, atol=1e-7)
            assert_rel_close(F_hat[rows], F[rows], f"ε_f {opname},{gid}", rtol=1e-5)
            checked += 1
    for p in g.params:
        if p.kind != "etrace":
            continue
        st = params_by_path[tuple(p.name.split("."))]
        for (rid, gid), tree in learner.etrace_of(st).items():
            if isinstance(tree, dict) and set(tree) == {"x", "f"}:
                continue     # io-dim trace (checked above)
            q = op_index[g.relation_by_id[rid].op]
            E = param_traces[(q, tuple(p.name.split(".")))]
            E_hat = dense_from_param_trace(learner, st, rid, gid, tree, offsets, N)
            assert_rel_close(E_hat, E, f"param trace of {p.name} ({rid},{gid})", rtol=1e-5)
            checked += 1
    return checked


def run_case(name, algo, batch, T=T_STEPS, traces=True, seed=0):
    m_learn, x0 = models.make(name, batch, seed)
    m_orc, _ = models.make(name, batch, seed)
    learner = make_learner(m_learn, algo)
    learner.compile_graph(x0)
    params = m_learn.states(brainstate.ParamState)
    orc = DenseOracle(m_orc, x0, algorithm="param" if algo == "param" else "io",
                      decay_or_rank=ALPHA if algo != "param" else None, loss_fn=loss_fn)

    @brainstate.transform.jit
    def step(x, t):
        return brainstate.transform.grad(lambda: loss_fn(learner(x), t), params,
                                         return_value=True)()

    out_shape = _out_shape(name, batch, x0)
    rng = np.random.RandomState(100 + seed)
    hidden_learn = m_learn.states(brainstate.HiddenState)
    hidden_orc = m_orc.states(brainstate.HiddenState)
    n_trace_checks = 0
    for t in range(T):
        x = jnp.asarray(rng.randn(*np.shape(x0)), jnp.float32)
        tgt = jnp.asarray(rng.randn(*out_shape), jnp.float32)
        grads, loss = step(x, tgt)
        r = orc.step(x, target=tgt)
        assert abs(float(loss) - r["loss"]) <= 1e-4 * max(1.0, abs(r["loss"])), (t, loss, r["loss"])
        for k in hidden_learn:
            assert_rel_close(hidden_learn[k].value, hidden_orc[k].value, f"t={t} hidden {k}",
                             rtol=1e-5)
        assert set(grads) == set(r["grads"]) == set(params), (set(grads), set(r["grads"]))
        for k in params:
            assert_rel_close(grads[k], r["grads"][k], f"t={t} grad {'.'.join(map(str, k))}")
        if traces:
            n_trace_checks += check_traces(learner, algo, r, dict(params))
    return learner, n_trace_checks


CASES = [(name, algo, batch) for name in models.MODELS for algo in ("param", "io")
         for batch in (0, 2)]


@pytest.mark.parametrize("name,algo,batch", CASES,
                         ids=[f"{n}-{a}-b{b}" for n, a, b in CASES])
def test_online_vs_oracle(name, algo, batch):
    learner, n_checked = run_case(name, algo, batch)
    # every trace the learner keeps was compared at every step
    n_traces = len({tr for tr in learner.graph.traces if tr.dim != "none"})
    assert n_checked >= T_STEPS * n_traces > 0


def test_lif_param_traces_compact_layout():
    """LIF D-RTRL: the learner keeps the compact (parameter-shaped) trace."""
    learner, _ = run_case("lif_delta", "param", 0, T=3)
    tr = learner.etrace_of(learner.model.syn)
    assert list(tr) == [("R0", "G0")]
    assert {k: v.shape for k, v in tr[("R0", "G0")].items()} == {"weight": (8, 5, 1),
                                                                 "bias": (5, 1)}
    learner, _ = run_case("lif_delta", "param", 2, T=3)
    tr = learner.etrace_of(learner.model.syn)[("R0", "G0")]
    assert {k: v.shape for k, v in tr.items()} == {"weight": (2, 8, 5, 1), "bias": (2, 5, 1)}


def test_conv_param_traces_channel_layout():
    """Conv D-RTRL: the conv kernel keeps the per-neuron trace of its channel's kernel slice
    (the oracle's dense trace is zero elsewhere: checked by run_case), the readout the
    compact one."""
    learner, _ = run_case("conv_snn", "param", 0, T=3)
    tr = learner.etrace_of(learner.model.conv)[("R0", "G0")]
    assert {k: v.shape for k, v in tr.items()} == {"weight": (8, 8, 4, 1, 3, 3, 2),
                                                   "bias": (8, 8, 4, 1)}
    tr = learner.etrace_of(learner.model.out)[("R1", "G1")]
    assert {k: v.shape for k, v in tr.items()} == {"weight": (256, 3, 1), "bias": (3, 1)}


def test_alif_io_traces_two_states():
    learner, _ = run_case("alif", "io", 2, T=3)
    (key,) = learner.etrace_dfs
    assert key == ("%y0", "G0") and learner.etrace_dfs[key].value.shape == (2, 5, 2)
    (xname,) = learner.etrace_xs
    assert learner.etrace_xs[xname].value.shape == (2, 8)
