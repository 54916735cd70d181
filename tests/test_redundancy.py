"""Barlow Twins and VICReg: Gram vs feature-space paths, invariances, seed variants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sslloss_jax as S


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape)
    return jnp.asarray(a, jnp.float32), jnp.asarray(a + rng.standard_normal(shape), jnp.float32)


SHAPES = [(8, 32), (32, 8), (16, 16)]


@pytest.mark.parametrize("name,shape", [("barlow_twins_loss", s) for s in SHAPES]
                         + [("vicreg_loss", s) for s in [*SHAPES, (6, 3, 10)]])
def test_gram_and_feature_paths_agree_with_gradients(name, shape):
    fn = getattr(S, name)
    a, b = _pair(shape)
    vg = [jax.jit(jax.value_and_grad(lambda x, y, m=m: fn(x, y, method=m), argnums=(0, 1)))(a, b)
          for m in ("gram", "feature", "auto")]
    for loss, grads in vg[1:]:
        np.testing.assert_allclose(loss, vg[0][0], rtol=2e-5)
        for g, g0 in zip(grads, vg[0][1]):
            np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-5 * np.abs(g0).max())


def test_auto_picks_gram_when_batch_is_smaller_than_dim():
    """The Gram path never builds a D×D matrix: its jaxpr has no [D, D] intermediate."""
    a, b = _pair((8, 512))
    for fn in (S.barlow_twins_loss, S.vicreg_loss):
        jaxpr = str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(a, b))
        assert "512,512" not in jaxpr.replace(" ", "")
        jaxpr = str(jax.make_jaxpr(functools.partial(fn, method="feature"))(a, b))
        assert "512,512" in jaxpr.replace(" ", "")


def test_barlow_is_affine_invariant_per_branch():
    """Each branch is standardized with its own statistics (lightly #1806)."""
    a, _ = _pair((16, 6))
    np.testing.assert_allclose(S.barlow_twins_loss(a, a), S.barlow_twins_loss(a, 2 * a + 4),
                               rtol=1e-4)


def test_barlow_terms_weighting_and_perfect_correlation():
    a, b = _pair((16, 6))
    t = S.barlow_twins_terms(a, b)
    np.testing.assert_allclose(S.barlow_twins_loss(a, b, lambda_param=0.3),
                               t.invariance + 0.3 * t.redundancy, rtol=1e-6)
    same = S.barlow_twins_terms(a, a, normalize="pearson")
    assert abs(float(same.invariance)) < 1e-9


def test_barlow_pearson_constant_feature_is_finite():
    a, b = _pair((8, 4))
    a = a.at[:, 1].set(3.0)
    loss, grads = jax.value_and_grad(
        lambda x, y: S.barlow_twins_loss(x, y, normalize="pearson"), argnums=(0, 1))(a, b)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)


def test_barlow_none_mode_accepts_batch_of_one():
    a, b = _pair((1, 4))
    assert np.isfinite(S.barlow_twins_loss(a, b, normalize="none"))


def _quadra_vicreg(z1, z2, lambd, mu, nu, gamma):
    """quadra's VICRegLoss (peers.md §4.1): variance terms summed, not averaged."""
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    n, d = z1.shape
    repr_loss = np.mean((z1 - z2) ** 2)
    std = lambda z: np.sqrt(z.var(axis=0, ddof=1) + 1e-4)
    var = np.mean(np.maximum(gamma - std(z1), 0)) + np.mean(np.maximum(gamma - std(z2), 0))

    def cov(z):
        z = z - z.mean(0)
        c = z.T @ z / (n - 1)
        return ((c**2).sum() - (np.diag(c) ** 2).sum()) / d

    return lambd * repr_loss + mu * var + nu * (cov(z1) + cov(z2))


@pytest.mark.parametrize("gamma", [1.0, 0.5, 4.0])
def test_vicreg_reproduces_quadra_with_doubled_mu(gamma):
    a, b = _pair((12, 7))
    ours = S.vicreg_loss(a, b, lambda_param=25, mu_param=2 * 25, nu_param=1, gamma=gamma)
    np.testing.assert_allclose(ours, _quadra_vicreg(a, b, 25, 25, 1, gamma), rtol=1e-5)


def test_vicreg_terms_weighting():
    a, b = _pair((12, 2, 7))
    t = S.vicreg_terms(a, b)
    np.testing.assert_allclose(
        S.vicreg_loss(a, b, lambda_param=2.0, mu_param=3.0, nu_param=4.0),
        2 * t.invariance + 3 * t.variance + 4 * t.covariance, rtol=1e-6)
