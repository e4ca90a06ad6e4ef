"""Control flow inside a step: lax.cond is analysed branch by branch (and matches the oracle);
lax.while_loop / lax.scan on a path into a hidden state are rejected with a clear error."""
import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from oracle import DenseOracle


class CondNet(brainstate.nn.Module):
    """The leak depends on a per-step flag (an input), chosen with lax.cond."""

    def __init__(self):
        super().__init__()
        self.w = brainscale.ETraceParam(jax.random.normal(jax.random.PRNGKey(0), (3, 4)) * 0.5,
                                        brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.zeros(4))

    def update(self, x, flag):
        y = self.w.execute(x)
        v = jax.lax.cond(flag > 0, lambda v: 0.9 * v + y, lambda v: 0.5 * jnp.tanh(v) + y,
                         self.V.value)
        self.V.value = v
        return jnp.tanh(v)


class WhileNet(CondNet):
    def update(self, x, flag):
        y = self.w.execute(x)
        v = jax.lax.fori_loop(0, 3, lambda i, v: 0.9 * v, self.V.value + y)
        self.V.value = v
        return v


@pytest.mark.parametrize("alg", ["param", "io"])
def test_cond_in_step_matches_oracle(alg):
    xs = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    flags = jnp.array([1., -1., 1., 1., -1., -1., 1., -1.])
    kw = dict(decay_or_rank=0.9) if alg == "io" else {}
    o = DenseOracle(CondNet(), xs[0], flags[0], algorithm=alg, loss_fn=lambda out: out.sum(), **kw)
    m = CondNet()
    cls = brainscale.DiagIODimAlgorithm if alg == "io" else brainscale.DiagParamDimAlgorithm
    learner = cls(m, **kw).compile_graph(xs[0], flags[0])
    p = m.states(brainstate.ParamState)
    for t in range(8):
        g = brainstate.transform.grad(lambda: learner(xs[t], flags[t]).sum(), p)()
        r = o.step(xs[t], flags[t])
        np.testing.assert_allclose(np.asarray(g[('w',)]), np.asarray(r['grads'][('w',)]),
                                   rtol=1e-5, atol=1e-6)


def test_while_loop_into_hidden_state_is_rejected():
    with pytest.raises(brainscale.UnsupportedPrimitiveError, match="while"):
        brainscale.DiagParamDimAlgorithm(WhileNet()).compile_graph(jnp.ones(3), jnp.ones(()))
