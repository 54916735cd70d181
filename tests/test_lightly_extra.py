"""VICRegL, DetCon-B/S, DirectCLR, MACL, MMCR, FroSSL and EMP-SSL: lightly's published
float32 values, the behaviours that differ from lightly on purpose (EMP-SSL's sign,
DetCon's float16 masking), gradients at degenerate spectra, bad inputs and degenerate
inputs. Float64 parity with the PyTorch code is in ``test_golden.py``; the generic
properties and the distributed equivalence come from the registry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sslloss_jax as S
from sslloss_jax._registry import get
from tests._harness import assert_distributed_equivalent, assert_matches_reference


def _r(seed, shape):
    """lightly.md §5's recipe: float32 standard normals from ``RandomState(seed)``."""
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


X0, X1 = _r(0, (6, 8)), _r(1, (6, 8))
P0, P1, G0, G1 = (_r(s, (2, 4, 8)) for s in (18, 19, 20, 21))
M0 = np.array([[0, 1, 1, 2], [3, 0, 3, 1]], np.int32)
M1 = np.array([[1, 0, 2, 2], [0, 3, 1, 1]], np.int32)


def _vicregl_two_global():
    ga, la, gb, lb = _r(24, (4, 8)), _r(25, (4, 3, 3, 8)), _r(26, (4, 8)), _r(27, (4, 3, 3, 8))
    return [(ga, la), (gb, lb)], [_r(28, (4, 3, 3, 2)), _r(29, (4, 3, 3, 2))]


PUBLISHED = {  # lightly.md §5 (lightly, float32, CPU), rounded to 6 significant digits
    "directclr": (lambda: S.directclr_loss(X0, X1, loss_dim=4), 2.562427),
    "macl": (lambda: S.macl_loss(X0, X1), 3.906007),
    "frossl": (lambda: S.frossl_loss([X0, X1]), -0.935111),
    "emp_ssl_lightly_sign": (lambda: S.emp_ssl_loss([X0, X1], tcr_coef=-1.0), -143.431030),
    "mmcr": (lambda: S.mmcr_loss(X0.reshape(3, 2, 8), X1.reshape(3, 2, 8)), -5.806994),
    "detcon_b": (lambda: S.detcon_b_loss(P0, P1, G0, G1, M0, M1), 8.997408),
    "detcon_s": (lambda: S.detcon_s_loss(P0, P1, M0, M1), 10.968142),
    "vicregl": (lambda: S.vicregl_loss(*_vicregl_two_global()), 63.893585),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_lightly_published_float32_values(name):
    fn, expected = PUBLISHED[name]
    loss = jax.jit(fn)()
    assert loss.dtype == jnp.float32 and loss.shape == ()  # lightly's VICRegL: shape (1,)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


# ----------------------------------------------------------------------------- EMP-SSL
def test_emp_ssl_official_sign_penalizes_collapse():
    """With identical views (equal invariance), spread embeddings must score better than
    collapsed ones under the official sign, and worse under lightly's (its bug)."""
    rng = np.random.default_rng(0)
    spread = rng.standard_normal((16, 8)).astype(np.float32)
    spread /= np.linalg.norm(spread, axis=1, keepdims=True)
    collapsed = np.broadcast_to(spread[:1], spread.shape).copy()
    loss = lambda z, **kw: float(S.emp_ssl_loss([z, z], **kw))
    assert loss(collapsed) > loss(spread) + 1.0
    assert loss(collapsed, tcr_coef=-1.0) < loss(spread, tcr_coef=-1.0)
    t_spread, t_collapsed = S.emp_ssl_terms([spread, spread]), S.emp_ssl_terms([collapsed] * 2)
    assert t_spread.coding_rate > t_collapsed.coding_rate > 0
    np.testing.assert_allclose([t_spread.invariance, t_collapsed.invariance], -1.0, rtol=1e-6)


def test_emp_ssl_lightly_value_is_a_documented_formula():
    t = S.emp_ssl_terms([X0, X1])
    np.testing.assert_allclose(t.coding_rate + 200.0 * t.invariance, -143.431030, rtol=1e-5)
    np.testing.assert_allclose(S.emp_ssl_loss([X0, X1]), 200.0 * t.invariance - t.coding_rate,
                               rtol=1e-6)


@pytest.mark.parametrize("name", ["emp_ssl_loss", "frossl_loss"])
def test_gram_and_feature_forms_agree(name):
    """B < D (Gram) and B > D (D × D) and the forced forms give the same value."""
    fn = getattr(S, name)
    for shape in [(4, 10), (12, 3)]:
        views = [_r(40 + i, shape) for i in range(3)]
        with jax.enable_x64(True):
            v64 = [v.astype(np.float64) for v in views]
            ref = fn(v64, method="feature")
            np.testing.assert_allclose(fn(v64, method="gram"), ref, rtol=1e-12)
            np.testing.assert_allclose(fn(v64), ref, rtol=1e-12)


@pytest.mark.parametrize("feature", [False, True])
def test_half_logdet_gram_value_and_gradients(feature):
    """EMP-SSL's coding rate: the custom VJP (``α z A⁻¹`` and ``½(n − tr A⁻¹)/α``) against
    autodiff of ``½ slogdet``, in z and in α, for both products."""
    from sslloss_jax._spectral import _half_logdet_gram

    def reference(z, alpha):
        m = jnp.swapaxes(z, -1, -2) @ z if feature else z @ jnp.swapaxes(z, -1, -2)
        return 0.5 * jnp.linalg.slogdet(jnp.eye(m.shape[-1])[None] + alpha * m)[1]

    with jax.enable_x64(True):
        rng = np.random.default_rng(11)
        z = jnp.asarray(rng.standard_normal((3, 6, 4)))
        w = jnp.asarray(rng.standard_normal(3))
        assert_matches_reference(lambda z, a: _half_logdet_gram(z, a, feature), reference,
                                 (z, jnp.asarray(0.7)), w)


@pytest.mark.parametrize("method", ["gram", "feature"])
@pytest.mark.parametrize("name", ["emp_ssl_loss", "frossl_loss"])
def test_both_forms_are_distributed_exact(name, method):
    """Gathered N × N Gram or psum-reduced D × D: both equal the global-batch loss (the
    registry's run covers ``auto``)."""
    assert_distributed_equivalent(get(name), "shard_map", 4, hyper={"method": method},
                                  d_out=24 if method == "gram" else 5)


# ----------------------------------------------------------------------------- MMCR
def _mmcr_grads(online, momentum):
    return jax.jit(jax.value_and_grad(S.mmcr_loss, argnums=(0, 1)))(online, momentum)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mmcr_gradient_is_finite_at_zero(dtype):
    z = jnp.zeros((4, 2, 5), dtype)
    loss, grads = _mmcr_grads(z, z)
    assert float(loss) == 0.0
    for g in grads:
        assert g.dtype == dtype and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_mmcr_gradient_at_repeated_singular_values():
    """Per-sample matrices with orthonormal rows (σ = (1, 1)) and orthogonal centroids of
    equal norm (σ = (1/√2, 1/√2)): the gradient is finite and is the analytic one,
    d‖X‖_*/dX = U Vᵀ (= X for orthonormal rows, √2·C for the centroids)."""
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))[0].T  # rows orthonormal
    online, momentum = q[0::2, None, :], q[1::2, None, :]  # (B=2, k=1, D=4)
    c = 0.5 * (online + momentum)
    lam = 5e-3
    with jax.enable_x64(True):
        loss, (g_on, g_mom) = _mmcr_grads(jnp.asarray(online), jnp.asarray(momentum))
        np.testing.assert_allclose(loss, -np.sqrt(2.0) + lam * 2.0, rtol=1e-12)
        # dL/dz_bj = -(1/2k)·(U Vᵀ)(C)_b + (λ/B)·(U Vᵀ)(z_b)_j
        np.testing.assert_allclose(g_on, -0.5 * np.sqrt(2.0) * c + 0.5 * lam * online,
                                   atol=1e-12)
        np.testing.assert_allclose(g_mom, -0.5 * np.sqrt(2.0) * c + 0.5 * lam * momentum,
                                   atol=1e-12)
        # rank-deficient samples (a zero singular value, repeated rows): still finite
        _, grads = _mmcr_grads(jnp.asarray(np.repeat(online, 2, 1)),
                               jnp.asarray(np.repeat(online, 2, 1)))
        assert all(np.all(np.isfinite(g)) for g in grads)


def test_nuclear_norm_matches_numpy():
    from sslloss_jax._numerics import nuclear_norm

    x = _r(50, (3, 4, 6))
    np.testing.assert_allclose(nuclear_norm(x), np.linalg.norm(x, "nuc", axis=(1, 2)),
                               rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4, 6), (6, 4), (2, 5, 5), (3, 2, 9), (7, 3),
                                   (2, 4, 40)])
def test_nuclear_norm_derivatives_are_those_of_the_singular_values(shape):
    """The custom JVP (one thin SVD of the tall orientation, ``U Vᵀ``; for a short side of
    at most half the long one, the SVD of the triangular factor) against autodiff of
    ``svd(compute_uv=False)``, in both modes and by finite differences (float64)."""
    from sslloss_jax._numerics import _oriented, nuclear_norm

    assert _oriented(jnp.zeros(shape))[2] == (2 * min(shape[-2:]) <= max(shape[-2:]))
    factored = functools.partial(nuclear_norm, factor_short=True)

    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(len(shape)).standard_normal(shape))
        reference = lambda x: jnp.sum(jnp.linalg.svd(x, compute_uv=False), axis=-1)  # noqa: E731
        w = jnp.asarray(np.random.default_rng(1).standard_normal(shape[:-2]))
        dx = jnp.ones_like(x)
        for fn in (nuclear_norm, factored):
            assert_matches_reference(fn, reference, (x,), w)
            check_grads(fn, (x,), order=1, modes=["fwd"])
            np.testing.assert_allclose(jax.jvp(fn, (x,), (dx,))[1],
                                       jax.jvp(reference, (x,), (dx,))[1], rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nuclear_norm_of_few_long_rows_is_exact_when_rank_deficient(dtype):
    """The triangular-factor path (``factor_short``: MMCR's per-sample views) on collapsed
    samples: repeated, proportional and zero rows. The value is numpy's to a few ulps of
    ``‖x‖`` (no squared condition number, as a Gram-matrix eigenvalue form would have)
    and the gradient is a unit-norm subgradient ``U Vᵀ`` of the nonzero part."""
    from sslloss_jax._numerics import _row_qr, nuclear_norm

    with jax.enable_x64(dtype == np.float64):
        rng = np.random.default_rng(3)
        a = rng.standard_normal((5, 1, 128))
        x = np.concatenate([a, 2 * a, a + 1e-3 * rng.standard_normal(a.shape),
                            np.zeros_like(a)], axis=1).astype(dtype)  # [5, 4, 128], rank 2
        x[0] = 0.0
        ref = np.linalg.norm(x.astype(np.float64), "nuc", axis=(1, 2))
        nuc = functools.partial(nuclear_norm, factor_short=True)
        got = np.asarray(nuc(jnp.asarray(x)), np.float64)
        scale = np.linalg.norm(x.astype(np.float64), axis=(1, 2))
        np.testing.assert_allclose(got, ref, atol=8 * np.finfo(dtype).eps * scale.max())
        q, r = _row_qr(jnp.asarray(x))
        np.testing.assert_allclose(np.swapaxes(r, -1, -2) @ q, x,
                                   atol=8 * np.finfo(dtype).eps * scale.max())
        g = np.asarray(jax.grad(lambda x: jnp.sum(nuc(x)))(jnp.asarray(x)))
        assert np.all(np.isfinite(g)) and np.all(g[0] == 0)
        # ‖U Vᵀ‖₂ <= 1 and <U Vᵀ, x> = ‖x‖_* (Euler: the norm is 1-homogeneous)
        assert np.all(np.linalg.norm(g, 2, axis=(1, 2)) <= 1 + 1e-4)
        np.testing.assert_allclose(np.sum(g * x, axis=(1, 2)), ref, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- DetCon
def test_detcon_float16_is_finite_and_close_to_float32():
    """lightly subtracts 1e9 (inf in float16); the where mask has no large constant."""
    half = [x.astype(np.float16) for x in (P0, P1, G0, G1)]
    loss, grads = jax.jit(jax.value_and_grad(
        lambda *v: S.detcon_b_loss(*v, M0, M1, temperature=0.05), argnums=(0, 1, 2, 3)))(*half)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    for g in grads:
        assert g.dtype == jnp.float16 and np.all(np.isfinite(np.asarray(g, np.float32)))
    ref = S.detcon_b_loss(*(x.astype(np.float32) for x in half), M0, M1, temperature=0.05)
    np.testing.assert_allclose(loss, ref, rtol=1e-3)


def test_detcon_without_positives_is_zero_with_zero_gradients():
    """Disjoint region ids in the two views: every weight is 0 (lightly: exactly 0)."""
    m1 = M1 + 10
    loss, grads = jax.value_and_grad(lambda p0, p1: S.detcon_s_loss(p0, p1, M0, m1),
                                     argnums=(0, 1))(P0, P1)
    assert float(loss) == 0.0
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_detcon_s_is_detcon_b_with_shared_views():
    np.testing.assert_allclose(S.detcon_s_loss(P0, P1, M0, M1),
                               S.detcon_b_loss(P0, P1, P0, P1, M0, M1), rtol=1e-6)


# ----------------------------------------------------------------------------- DirectCLR
def test_directclr_is_ntxent_on_the_truncated_inputs():
    x0, x1 = _r(60, (5, 2, 4)), _r(61, (5, 2, 4))
    np.testing.assert_allclose(S.directclr_loss(x0, x1, loss_dim=3, temperature=0.2),
                               S.ntxent_loss(x0.reshape(5, 8)[:, :3], x1.reshape(5, 8)[:, :3],
                                             temperature=0.2), rtol=1e-6)
    # loss_dim larger than the feature count keeps everything (torch slicing)
    np.testing.assert_allclose(S.directclr_loss(x0, x1),
                               S.ntxent_loss(x0.reshape(5, 8), x1.reshape(5, 8)), rtol=1e-6)


def test_directclr_memory_bank_is_the_ntxent_bank_on_truncated_inputs():
    bank = S.init_memory_bank(jax.random.key(0), 7, 3)
    loss, new = S.directclr_memory_bank_loss(X0, X1, bank, loss_dim=3)
    ref_loss, ref_new = S.ntxent_memory_bank_loss(X0[:, :3], X1[:, :3], bank)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(new.bank, ref_new.bank, rtol=1e-6)
    assert int(new.ptr) == int(ref_new.ptr) == 6


# ----------------------------------------------------------------------------- VICRegL
def test_vicregl_num_matches_is_clipped_and_terms_recombine():
    feats, grids = _vicregl_two_global()

    @jax.jit
    def run(feats, grids):
        t = S.vicregl_terms(feats, grids)
        recombined = 0.75 * (25 * t.invariance + 25 * t.variance + t.covariance) + 0.25 * (
            t.local_l2 + t.local_location)
        return (S.vicregl_loss(feats, grids, num_matches=(50, 40)),
                S.vicregl_loss(feats, grids, num_matches=(9, 9)),
                S.vicregl_loss(feats, grids), recombined)

    big, clipped, loss, recombined = run(feats, grids)
    np.testing.assert_allclose(big, clipped, rtol=1e-6)
    np.testing.assert_allclose(loss, recombined, rtol=1e-6)


# ----------------------------------------------------------------------------- bad inputs
def _vicregl_call(**overrides):
    feats, grids = _vicregl_two_global()
    args = {"global_view_features": feats, "global_view_grids": grids, **overrides}
    kw = {k: args.pop(k) for k in list(args) if k not in (
        "global_view_features", "global_view_grids", "local_view_features", "local_view_grids")}
    return lambda: S.vicregl_loss(**args, **kw)


BAD = {
    "vicregl_lengths": (_vicregl_call(global_view_grids=_vicregl_two_global()[1][:1]),
                        ValueError, "global_view_features and global_view_grids must have same"),
    "vicregl_local_half": (_vicregl_call(local_view_grids=[_r(0, (4, 3, 3, 2))]),
                           ValueError, "local_view_features and local_view_grids must either"),
    "vicregl_grid_shape": (_vicregl_call(global_view_grids=[_r(0, (4, 3, 3, 2)),
                                                            _r(1, (4, 3, 2, 2))]),
                           ValueError, r"global_view_grids\[1\] must have shape \(4, 3, 3, 2\)"),
    "vicregl_not_a_pair": (_vicregl_call(global_view_features=[_r(0, (4, 8))] * 2),
                           TypeError, r"global_view_features\[0\] must be a \(global_features"),
    "vicregl_one_view": (_vicregl_call(global_view_features=_vicregl_two_global()[0][:1],
                                       global_view_grids=_vicregl_two_global()[1][:1]),
                         ValueError, "at least two views"),
    "vicregl_num_matches": (_vicregl_call(num_matches=(0, 4)), ValueError, "num_matches"),
    "vicregl_global_dim": (_vicregl_call(global_view_features=[
        (_r(0, (4, 8)), _r(1, (4, 3, 3, 8))), (_r(2, (4, 7)), _r(3, (4, 3, 3, 8)))]),
        ValueError, r"global_view_features\[0\]\[0\] and global_view_features\[1\]\[0\]"),
    "detcon_float_mask": (lambda: S.detcon_b_loss(P0, P1, G0, G1, M0.astype(np.float32), M1),
                          TypeError, "mask_view0 must have an integer dtype"),
    "detcon_mask_shape": (lambda: S.detcon_s_loss(P0, P1, M0, M1[:, :3]),
                          ValueError, r"mask_view1 must have shape \(2, 4\)"),
    "detcon_view_shape": (lambda: S.detcon_b_loss(P0, P1, G0, G1[:, :3], M0, M1),
                          ValueError, "pred_view0 and target_view1 must have the same shape"),
    "detcon_temperature": (lambda: S.detcon_s_loss(P0, P1, M0, M1, temperature=0.0),
                           ValueError, "Illegal temperature"),
    "directclr_loss_dim": (lambda: S.directclr_loss(X0, X1, loss_dim=0), ValueError,
                           "loss_dim must be a positive int"),
    "directclr_shapes": (lambda: S.directclr_loss(X0, X1[:, :5]), ValueError,
                         r"out0 and out1 must have the same shape"),
    "macl_temperature": (lambda: S.macl_loss(X0, X1, temperature=-0.1), ValueError,
                         "temperature must be positive"),
    "macl_alpha": (lambda: S.macl_loss(X0, X1, alpha=1.5), ValueError, r"alpha must be in \[0"),
    "macl_A_0": (lambda: S.macl_loss(X0, X1, A_0=-0.1), ValueError, r"A_0 must be in \[0"),
    "macl_batch_of_one": (lambda: S.macl_loss(X0[:1], X1[:1]), ValueError, "at least 2 samples"),
    "mmcr_lmda": (lambda: S.mmcr_loss(P0, P1, lmda=-1.0), ValueError, r"lmda must be in \[0"),
    "mmcr_shapes": (lambda: S.mmcr_loss(P0, P1[:, :3]), ValueError,
                    "online and momentum must have the same shape"),
    "mmcr_rank": (lambda: S.mmcr_loss(X0, X1), ValueError, "online must have rank 3"),
    "frossl_one_view": (lambda: S.frossl_loss([X0]), ValueError, "at least two views"),
    "frossl_method": (lambda: S.frossl_loss([X0, X1], method="svd"), ValueError,
                      "method must be one of"),
    "emp_ssl_eps": (lambda: S.emp_ssl_loss([X0, X1], tcr_eps=0.0), ValueError,
                    r"tcr_eps must be in \(0"),
    "emp_ssl_no_view": (lambda: S.emp_ssl_loss([]), ValueError, "at least one view"),
    "emp_ssl_view_shapes": (lambda: S.emp_ssl_loss([X0, X1[:4]]), ValueError,
                            r"z_views\[0\] and z_views\[1\] must have the same shape"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_name_the_argument(name):
    fn, err, match = BAD[name]
    with pytest.raises(err, match=match):
        fn()


def test_frossl_zero_view_is_finite():
    """lightly divides 0 by a zero trace (NaN); the clamped ratio is 1 (log 1 = 0)."""
    loss, grads = jax.value_and_grad(lambda a, b: S.frossl_loss([a, b]), argnums=(0, 1))(
        np.zeros_like(X0), X1)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("path", ["dense", "tiled"])
@pytest.mark.parametrize("temperature", [0.1, -0.3])
def test_detcon_s_symmetric_path_equals_both_directions(temperature, path, monkeypatch):
    """DetCon-S on one device (one symmetric logits matrix: dense with a custom VJP, or
    the tiled kernel with the region classes as ids, in 4-row tiles) against the two
    directions of DetCon-B with pred = target: value and gradients in the views and in τ
    (float64; repeated region ids, several regions per id, ids of any value)."""
    from sslloss_jax import _region, _tiled

    if path == "tiled":
        monkeypatch.setattr(_tiled, "AUTO_TILED_ELEMENTS", 0)
        monkeypatch.setattr(_tiled, "DEFAULT_BLOCK_SIZE", 4)
    rng = np.random.default_rng(13)
    with jax.enable_x64(True):
        v0, v1 = (jnp.asarray(rng.standard_normal((3, 5, 4))) for _ in range(2))
        m0, m1 = (jnp.asarray(rng.integers(0, 3, (3, 5))) for _ in range(2))
        m1 = m1 * 1000003 - 7  # region ids need not be small or nonnegative

        def ours(v0, v1, t):
            return _region._detcon_s_single(v0, v1, m0, m1, t)

        def reference(v0, v1, t):
            return _region._detcon(v0, v1, v0, v1, m0, m1, t, None)

        t = jnp.asarray(temperature)
        np.testing.assert_allclose(ours(v0, v1, t), reference(v0, v1, t), rtol=1e-12)
        got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(v0, v1, t)
        want = jax.grad(reference, argnums=(0, 1, 2))(v0, v1, t)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        check_grads(ours, (v0, v1, t), order=1, modes=["rev"])
