"""brainscale 0.1 stored a convolution's bias as ``(1, ..., 1, C_out)``: ConvOp accepts it
(the same gradients as the ``(C_out,)`` layout, in the parameter's own shape) and still
refuses a bias of another size."""
from __future__ import annotations

import brainstate
import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
from models import ConvSNN


def _grads(bias_shape, algo):
    xs = jnp.asarray(np.random.RandomState(3).rand(4, 2, 8, 8, 2) > 0.6, jnp.float32)
    net = ConvSNN(batch=2)
    b = net.conv.value["bias"]
    net.conv.value = {"weight": net.conv.value["weight"], "bias": jnp.reshape(b, bias_shape)}
    alg = (brainscale.DiagParamDimAlgorithm(net) if algo == "param"
           else brainscale.DiagIODimAlgorithm(net, decay_or_rank=0.9))
    learner = alg.compile_graph(xs[0])
    ys = jnp.zeros((4, 2, 3), jnp.float32)
    g, _ = brainscale.online_gradients(learner, xs, ys, lambda o, y: jnp.sum((o - y) ** 2))
    return g[("conv",)]


@pytest.mark.parametrize("algo", ["param", "io"])
def test_01_bias_layout_gives_the_same_gradients(algo):
    new, old = _grads((4,), algo), _grads((1, 1, 4), algo)
    assert old["bias"].shape == (1, 1, 4)
    assert np.abs(np.asarray(new["bias"])).max() > 0
    np.testing.assert_allclose(np.asarray(old["bias"]).reshape(4), np.asarray(new["bias"]),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(old["weight"]), np.asarray(new["weight"]),
                               rtol=1e-5, atol=1e-7)


def test_a_bias_of_another_size_is_refused():
    net = ConvSNN(batch=0)
    net.conv.value = {"weight": net.conv.value["weight"], "bias": jnp.zeros((1, 1, 5))}
    with pytest.raises(Exception, match="bias shape"):
        brainscale.DiagParamDimAlgorithm(net).compile_graph(jnp.zeros((8, 8, 2)))
