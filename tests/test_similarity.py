"""Negative cosine similarity, SimSiam's symmetric form, alignment/uniformity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sslloss_jax as S


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_negative_cosine_broadcasts_size_one_axes_only_within_rank():
    p, z = _x((4, 3, 8)), _x((4, 1, 8), 1)
    ref = -np.mean(np.sum(np.asarray(p) * np.asarray(z), -1)
                   / np.linalg.norm(p, axis=-1) / np.linalg.norm(z, axis=-1))
    np.testing.assert_allclose(S.negative_cosine_similarity(p, z, axis=2), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="same rank"):
        S.negative_cosine_similarity(p, z[:, 0], axis=-1)


def test_sym_negative_cosine_stops_gradient_on_projections():
    z0, p0, z1, p1 = (_x((5, 4), s) for s in range(4))
    f = lambda z0, p0, z1, p1: S.sym_negative_cosine_similarity_loss((z0, p0), (z1, p1))
    g = jax.grad(f, argnums=(0, 1, 2, 3))(z0, p0, z1, p1)
    assert np.all(g[0] == 0) and np.all(g[2] == 0)
    assert np.any(g[1] != 0) and np.any(g[3] != 0)
    expected = 0.5 * S.negative_cosine_similarity(p0, z1) + 0.5 * S.negative_cosine_similarity(
        p1, z0)
    np.testing.assert_allclose(f(z0, p0, z1, p1), expected, rtol=1e-6)


def _np_align(x, y, alpha):
    return np.mean(np.linalg.norm(np.asarray(x) - np.asarray(y), axis=1) ** alpha)


def _np_unif(x, t):
    x = np.asarray(x, np.float64)
    n = len(x)
    d2 = [np.sum((x[i] - x[j]) ** 2) for i in range(n) for j in range(i + 1, n)]
    return np.log(np.mean(np.exp(-t * np.array(d2))))


@pytest.mark.parametrize("alpha", [2.0, 1.0, 3.0])
def test_alignment_matches_quadra_formula(alpha):
    x, y = _x((7, 5)), _x((7, 5), 1)
    np.testing.assert_allclose(S.alignment_loss(x, y, alpha=alpha), _np_align(x, y, alpha),
                               rtol=1e-5)


@pytest.mark.parametrize("t", [2.0, 0.5, 10.0])
def test_uniformity_matches_pdist_formula(t):
    x = _x((9, 4))
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(S.uniformity_loss(x, t=t), _np_unif(x, t), rtol=1e-5)


def test_uniformity_large_scale_is_stable():
    """A plain mean of exp underflows to log(0) = -inf; the logsumexp form does not."""
    x = 30.0 * _x((6, 3))
    assert np.isfinite(S.uniformity_loss(x, t=50.0))


@pytest.mark.parametrize("t", [2.0, 0.3, -0.5])
def test_uniformity_one_device_vjp_equals_autodiff(t):
    """The one-device uniformity's custom VJP (``dx = −4t(r ⊙ x − P x)``, ``dt = −Σ P d²``)
    against autodiff of the pairwise definition, in float64, in x and a traced t; with
    two duplicated rows (their pair's gradient factor x_i − x_j is 0)."""
    from jax.test_util import check_grads

    def ref(x, t):
        d2 = jnp.sum((x[:, None] - x[None]) ** 2, -1)
        off = ~jnp.eye(x.shape[0], dtype=bool)
        return jax.nn.logsumexp(jnp.where(off, -t * d2, -jnp.inf)) - np.log(90.0)

    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(3).standard_normal((10, 4)))
        x = x.at[7].set(x[2])
        t64 = jnp.float64(t)
        f = lambda x, t: S.uniformity_loss(x, t=t)
        np.testing.assert_allclose(f(x, t64), ref(x, t64), rtol=1e-12)
        got, want = jax.grad(f, (0, 1))(x, t64), jax.grad(ref, (0, 1))(x, t64)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        check_grads(jax.jit(f), (x, t64), order=1, modes=["rev"])


def test_hypersphere_batch_of_one_is_defined():
    """lightly returns NaN (mean over zero pairs); here uniformity is 0."""
    a, b = _x((1, 4)), _x((1, 4), 1)
    loss, grads = jax.value_and_grad(S.hypersphere_loss, argnums=(0, 1))(a, b)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
    an, bn = a / jnp.linalg.norm(a), b / jnp.linalg.norm(b)
    np.testing.assert_allclose(loss, _np_align(an, bn, 2.0), rtol=1e-5)


def test_alignment_identical_views_small_alpha_has_finite_gradient():
    x = _x((4, 3))
    g = jax.grad(lambda a, b: S.alignment_loss(a, b, alpha=1.0), argnums=(0, 1))(x, x)
    assert all(np.all(np.isfinite(gi)) for gi in g)
