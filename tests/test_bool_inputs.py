"""Boolean spike inputs: ES-D-RTRL keeps a float ε_x and matches the oracle."""
import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from oracle import DenseOracle


class M(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = brainscale.ETraceParam(jax.random.normal(jax.random.PRNGKey(0), (3, 2)),
                                        brainscale.MatMulOp())
        self.h = brainscale.ETraceState(jnp.zeros(2))

    def update(self, x):
        self.h.value = 0.9 * jnp.tanh(self.h.value) + self.w.execute(x)
        return self.h.value


@pytest.mark.parametrize("alg", ["io", "param"])
def test_bool_input_matches_oracle(alg):
    xs = jax.random.uniform(jax.random.PRNGKey(1), (6, 3)) < 0.5
    o = DenseOracle(M(), xs[0], algorithm=alg, decay_or_rank=0.9 if alg == "io" else None,
                    loss_fn=lambda out: (out ** 2).sum())
    m = M()
    cls = brainscale.DiagIODimAlgorithm if alg == "io" else brainscale.DiagParamDimAlgorithm
    learner = cls(m, decay_or_rank=0.9) if alg == "io" else cls(m)
    learner.compile_graph(xs[0])
    p = m.states(brainstate.ParamState)
    for t in range(xs.shape[0]):
        g = brainstate.transform.grad(lambda: (learner(xs[t]) ** 2).sum(), p)()
        r = o.step(xs[t])
        np.testing.assert_allclose(np.asarray(g[('w',)]), np.asarray(r['grads'][('w',)]),
                                   rtol=1e-5, atol=1e-6)
    if alg == "io":
        (ex,) = learner.etrace_xs.values()
        assert jnp.issubdtype(ex.value.dtype, jnp.floating)
