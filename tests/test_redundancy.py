"""Barlow Twins and VICReg: Gram vs feature-space paths, invariances, seed variants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sslloss_jax as S
from tests._harness import assert_matches_reference


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


@pytest.mark.parametrize("feature", [False, True])
@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 8)])
def test_gram_sq_both_forms_value_and_gradients(shape, feature):
    """The square sum of a covariance from either product, batched, with its 2-matmul VJP."""
    from sslloss_jax._redundancy import _gram_sq

    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        a = jnp.asarray(rng.standard_normal(shape))
        w = jnp.asarray(rng.standard_normal(shape[:-2]))
        assert_matches_reference(lambda a: _gram_sq(a, feature) / 100.0,
                                 lambda a: jnp.sum(jnp.square(a @ jnp.swapaxes(a, -1, -2)),
                                                   axis=(-2, -1)) / 100.0, (a,), w)


def test_auto_picks_gram_when_batch_is_smaller_than_dim():
    """The Gram path never builds a D×D matrix: its jaxpr has no [D, D] intermediate."""
    a, b = _pair((8, 512))
    for fn in (S.barlow_twins_loss, S.vicreg_loss):
        jaxpr = str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(a, b))
        assert "512,512" not in jaxpr.replace(" ", "")
        jaxpr = str(jax.make_jaxpr(functools.partial(fn, method="feature"))(a, b))
        assert "512,512" in jaxpr.replace(" ", "")


def _standardized_reference(z, mode, eps):
    """``(Â Âᵀ, Â, m2)`` of one branch by the plain formula (autodiff reference)."""
    n = z.shape[0]
    centered = z - jnp.mean(z, axis=0, keepdims=True)
    m2 = jnp.sum(jnp.square(centered), axis=0, keepdims=True)
    if mode == "batch_norm":
        a = centered / jnp.sqrt(m2 / n + eps)
    elif mode == "pearson":
        ok = m2 > 0
        a = jnp.where(ok, centered / jnp.sqrt(jnp.where(ok, m2, 1.0) / (n - 1)), 0.0)
    else:
        a = centered
    return a @ a.T, a, m2[0]


@pytest.mark.parametrize("mode", ["batch_norm", "pearson", "center"])
@pytest.mark.parametrize("two", [True, False])
@pytest.mark.parametrize("d,chunk_bytes", [(15, None), (15, 6 * 8 * 3), (17, 6 * 8 * 3)])
def test_standardized_grams_match_autodiff_of_the_definition(mode, two, d, chunk_bytes,
                                                             monkeypatch):
    """The chunked single-device Gram primitive of Barlow Twins and VICReg: every output
    and its hand-written VJP (through the means and the m2-dependent scale) against
    autodiff of the plain formula, in float64, over one chunk, several, and several with
    a smaller remainder; the
    ``eps`` gradient too (batch_norm; zero in the other modes)."""
    from sslloss_jax import _redundancy as R

    if chunk_bytes is not None:
        monkeypatch.setattr(R, "_CHUNK_BYTES", chunk_bytes)
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        za, zb = (jnp.asarray(rng.standard_normal((6, d))) for _ in range(2))
        if chunk_bytes is not None:  # 5 chunks of 3 columns, and one of 2 for d = 17
            assert R._chunk_size(d, 6, 8) == 3

        def flat(ga, gb, cross, m2a, m2b):
            parts = [ga.ravel(), m2a] + ([gb.ravel(), cross, m2b] if two else [])
            return jnp.concatenate(parts) / 10.0

        def ours(za, zb, eps):
            return flat(*R._standardized_grams(za, zb if two else None, eps, mode))

        def reference(za, zb, eps):
            ga, a, m2a = _standardized_reference(za, mode, eps)
            gb, b, m2b = _standardized_reference(zb, mode, eps)
            return flat(ga, gb, jnp.sum(a * b, axis=0), m2a, m2b)

        eps = jnp.asarray(0.3)  # large enough for its gradient (batch_norm) to register
        w = jnp.asarray(rng.standard_normal(ours(za, zb, eps).shape))
        assert_matches_reference(ours, reference, (za, zb, eps), w)


def test_barlow_traced_eps_and_its_gradient():
    """``eps`` may be traced (no retrace per value) and gets its gradient on the chunked
    Gram path, equal to the feature path's."""
    a, b = _pair((6, 20))
    fns = [jax.jit(jax.grad(lambda e, m=m: S.barlow_twins_loss(a, b, eps=e, method=m)))
           for m in ("gram", "feature")]
    for e in (1e-5, 0.5):
        np.testing.assert_allclose(fns[0](e), fns[1](e), rtol=1e-4)
    assert abs(float(fns[0](0.5))) > 0


def test_standardized_grams_pearson_constant_column_gradient():
    """A constant feature on the Gram path: finite, and the same gradient as the
    feature path (zero through the constant column's standardization)."""
    a, b = _pair((6, 20))
    a = a.at[:, 3].set(2.0)
    grads = [jax.grad(lambda x, y, m=m: S.barlow_twins_loss(x, y, normalize="pearson",
                                                            method=m), argnums=(0, 1))(a, b)
             for m in ("gram", "feature")]
    for g, g0 in zip(*grads):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-6 * np.abs(g0).max())


@pytest.mark.parametrize("fn", [S.barlow_twins_loss, S.vicreg_loss])
def test_gram_path_temporaries_stay_small(fn):
    """Barlow Twins and VICReg at 256 × 8192 (value and gradients): the chunked Gram path
    keeps XLA's temporaries far below glibc's 32 MiB mmap threshold (autodiff of the
    whole-array standardization needed 48–65 MiB)."""
    a = jax.ShapeDtypeStruct((256, 8192), jnp.float32)
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(a, a).compile()
    mem = compiled.memory_analysis()
    if mem is None or getattr(mem, "temp_size_in_bytes", None) is None:
        pytest.skip("this backend reports no memory analysis")
    assert mem.temp_size_in_bytes < 24 * 2**20


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


def test_tico_gradient_is_that_of_the_formula_with_a_frozen_batch_covariance():
    """TiCo detaches its batch second moment; with beta=1 nothing is detached and
    finite differences apply, and for any beta the gradient equals the formula's with the
    blended covariance held constant."""
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        a, b = (x.astype(jnp.float64) for x in _pair((6, 4)))
        state = S.init_tico_state(4, jnp.float64)._replace(covariance=jnp.eye(4) * 0.3)
        check_grads(lambda x, y: S.tico_loss(x, y, state, beta=1.0)[0], (a, b), order=1,
                    modes=("rev",))
        za = a / jnp.linalg.norm(a, axis=1, keepdims=True)
        frozen = 0.5 * state.covariance + 0.5 * za.T @ za / 6

        def formula(x, y):
            x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
            y = y / jnp.linalg.norm(y, axis=1, keepdims=True)
            return 1 - jnp.mean(jnp.sum(x * y, 1)) + 8.0 * jnp.mean(jnp.sum((x @ frozen) * x, 1))

        g = jax.grad(lambda x, y: S.tico_loss(x, y, state, beta=0.5)[0], argnums=(0, 1))(a, b)
        g_ref = jax.grad(formula, argnums=(0, 1))(a, b)
        for gi, ri in zip(g, g_ref):
            np.testing.assert_allclose(gi, ri, rtol=1e-10, atol=1e-12)
