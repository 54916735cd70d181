"""The pairwise leading-axis reductions of _numerics (a CPU performance workaround) are
exactly jnp.sum / jnp.max, with jnp.sum's gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sslloss_jax._numerics import max_leading, sum_leading


@pytest.mark.parametrize("shape", [(1, 3), (2, 5), (7, 4, 3), (64, 6), (65, 2, 2)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_pairwise_reductions_equal_jnp(shape, keepdims):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    np.testing.assert_allclose(sum_leading(x, keepdims), jnp.sum(x, 0, keepdims=keepdims),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(max_leading(x, keepdims), jnp.max(x, 0, keepdims=keepdims))
    assert jax.jit(sum_leading, static_argnums=1)(x, keepdims).shape == (
        jnp.sum(x, 0, keepdims=keepdims).shape)


def test_empty_leading_axis():
    assert sum_leading(jnp.zeros((0, 3))).shape == (3,)
    np.testing.assert_array_equal(sum_leading(jnp.zeros((0, 3))), 0.0)
    with pytest.raises(ValueError):
        max_leading(jnp.zeros((0, 3)))


def test_sum_leading_gradient_is_a_broadcast():
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)))
        w = jnp.arange(3.0)
        check_grads(lambda x: jnp.sum(jnp.sin(sum_leading(x)) * w), (x,), order=2,
                    modes=["rev"])
        g = jax.grad(lambda x: jnp.sum(sum_leading(x) * w))(x)
        np.testing.assert_array_equal(g, jnp.broadcast_to(w, x.shape))
