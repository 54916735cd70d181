"""The CPU performance workarounds of _numerics are exact: the pairwise leading-axis
reductions are jnp.sum / jnp.max with jnp.sum's gradient, and the radix argsort is
jnp.argsort(stable=True)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sslloss_jax._numerics import argsort_stable, max_leading, sum_leading


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


def _with_special_values(x: np.ndarray) -> np.ndarray:
    """Ties (all equal, repeated values, integers), signed zeros, infinities and NaNs."""
    x = x.copy()
    x[1], x[2, ::2], x[3] = 0.0, 1.5, np.round(x[3])
    if x.shape[-1] >= 6:
        x[4, :6] = [np.nan, -np.inf, -0.0, 0.0, np.inf, -np.nan]
    return x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n", [1, 2, 3, 6, 255, 256, 257, 5000, 40000])
def test_argsort_stable_equals_jnp_argsort(dtype, n):
    # 40000 needs three passes in float32 (15-bit digits beside 16 position bits).
    x = jnp.asarray(_with_special_values(np.random.default_rng(n).standard_normal((5, n))),
                    dtype)
    want = jnp.argsort(x, axis=-1, stable=True)
    np.testing.assert_array_equal(argsort_stable(x), want)
    np.testing.assert_array_equal(jax.jit(argsort_stable)(x), want)


def test_argsort_stable_float64_batched_and_vmapped():
    with jax.enable_x64(True):
        x = jnp.asarray(_with_special_values(np.random.default_rng(2).standard_normal((5, 300))))
        x = jnp.stack([x, -x])  # [2, 5, 300]
        want = jnp.argsort(x, axis=-1, stable=True)
        np.testing.assert_array_equal(argsort_stable(x), want)
        np.testing.assert_array_equal(jax.vmap(argsort_stable)(x), want)


def test_argsort_stable_rejects_integers():
    with pytest.raises(TypeError, match="floating"):
        argsort_stable(jnp.arange(4))
