"""Specific tests of SIGReg / LeJEPA / LeWM / VISReg (``_slicing``) and PaKa / DSE /
ROI resampling (``_patch``): explicit randomness, lightly's published float32 values,
closed forms, degenerate inputs and bad-input errors. (The generic jit/grad/vmap/dtype/
distributed checks run on their registry entries.)"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sslloss_jax as S
from sslloss_jax._patch import _kmeans, _kmeans_pp_init
from sslloss_jax._registry import Example, LossSpec, get
from tests._harness import assert_distributed_equivalent, assert_matches_reference

KEY = jax.random.key(0)


def randn(seed, shape):
    """lightly.md §5's recipe: ``RandomState(seed).standard_normal(shape)`` in float32."""
    return jnp.asarray(np.random.RandomState(seed).standard_normal(shape).astype(np.float32))


# ----------------------------------------------------------------------------- slices
def test_key_and_explicit_slices_are_the_same_draw():
    x = randn(0, (2, 6, 5))
    draws = jax.random.normal(KEY, (5, 16), jnp.float32)
    a = S.sigreg(x, KEY, num_vectors=16)
    b = S.sigreg(x, slices=draws, num_vectors=16)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # slices are normalized per column: scaling the raw draws changes nothing
    np.testing.assert_allclose(S.sigreg(x, slices=3.0 * draws, num_vectors=16), b, rtol=1e-6)
    lj = S.lejepa_loss(x[:1], x[1:], KEY, sigreg_num_vectors=16)
    np.testing.assert_allclose(lj, S.lejepa_loss(x[:1], x[1:], slices=draws,
                                                 sigreg_num_vectors=16), rtol=1e-6)
    vr = S.visreg_loss(x[:1], x[1:], KEY, num_slices=16)
    np.testing.assert_allclose(vr, S.visreg_loss(x[:1], x[1:], slices=draws, num_slices=16),
                               rtol=1e-6)
    # views as a sequence == stacked
    np.testing.assert_allclose(S.sigreg(list(x), KEY, num_vectors=16), a, rtol=1e-6)


def test_same_key_gives_the_same_slices_on_every_device():
    """Under shard_map each device draws from the same key: the value and gradients equal
    the single-device global batch (PaKa's subsampling scores likewise)."""
    assert_distributed_equivalent(get("sigreg"), "shard_map", 4, hyper={"key": KEY})
    assert_distributed_equivalent(get("visreg_loss"), "shard_map", 2,
                                  hyper={"key": jax.random.key(3)})
    assert_distributed_equivalent(get("patch_kernel_alignment_loss"), "shard_map", 4,
                                  hyper={"key": jax.random.key(1), "max_tokens": 3})


def test_sigreg_scales_with_n_and_is_a_mean_over_views():
    x = randn(1, (2, 64, 4))
    per_view = [S.sigreg(x[i], KEY, num_vectors=8) for i in range(2)]
    np.testing.assert_allclose(S.sigreg(x, KEY, num_vectors=8), np.mean(per_view), rtol=1e-5)
    # identical samples: the empirical CF is cos(t·c): the statistic is N·Σ w (…) ∝ N
    c = jnp.ones((8, 4))
    ratio = S.sigreg(jnp.ones((16, 4)), KEY, num_vectors=8) / S.sigreg(c, KEY, num_vectors=8)
    np.testing.assert_allclose(ratio, 2.0, rtol=1e-5)


# ----------------------------------------------------------------------------- published
def test_lightly_published_float32_values():
    """lightly.md §5 (float32, lightly HEAD): slice-independent values."""
    local, glob = randn(22, (3, 6, 8)), randn(23, (2, 6, 8))
    inv = S.lejepa_loss(local, glob, KEY, lambda_param=0.0, sigreg_num_vectors=4)
    np.testing.assert_allclose(inv, 0.989567, rtol=1e-5)
    terms = S.visreg_terms(local, glob, KEY, num_slices=8)
    np.testing.assert_allclose(terms.pred, 0.989567, rtol=1e-5)
    np.testing.assert_allclose(terms.scale, 0.093385, rtol=1e-5)
    np.testing.assert_allclose(terms.center, 0.138816, rtol=1e-5)
    t3, s3 = randn(7, (2, 5, 8)), randn(8, (2, 5, 8))
    m2 = jnp.array([[True, False, True, False, False], [False, False, False, True, True]])
    np.testing.assert_allclose(S.patch_kernel_alignment_loss(t3, s3), 0.468744, rtol=1e-5)
    np.testing.assert_allclose(S.patch_kernel_alignment_loss(t3, s3, m2), 0.154539, rtol=1e-5)


def test_visreg_closed_forms():
    glob = jnp.full((1, 5, 3), 2.0)
    terms = S.visreg_terms(jnp.zeros((0, 5, 3)), glob, KEY, num_slices=4)
    np.testing.assert_allclose(terms.center, 4.0)
    np.testing.assert_allclose(terms.scale, 1.0)
    np.testing.assert_allclose(terms.pred, 0.0)
    # Vl = 0 as an empty sequence too
    np.testing.assert_allclose(S.visreg_loss([], glob, KEY, num_slices=4), terms.total)


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])
def test_visreg_shape_in_slice_chunks_matches_the_plain_formula(chunk_bytes, monkeypatch):
    """The shape term's chunked sort (8-slice chunks: a scan of 4 and a tail of 5; or one
    chunk) and the gradient it accumulates in the forward equal autodiff of jnp.sort."""
    from jax.scipy.special import ndtri

    from sslloss_jax import _slicing

    monkeypatch.setattr(_slicing, "_SLICE_CHUNK_BYTES", chunk_bytes)
    draws = np.random.RandomState(5).standard_normal((4, 37))

    def reference(z):
        mean = jnp.mean(z, axis=1, keepdims=True)
        std = jnp.sqrt(jnp.mean(jnp.square(z - mean), axis=1, keepdims=True))
        zn = (z - mean) / (jax.lax.stop_gradient(std) + 1e-4)
        a = draws / jnp.linalg.norm(draws, axis=0, keepdims=True)
        p = jnp.sort(jnp.einsum("vnd,ds->vsn", zn, a), axis=-1)
        q = ndtri(jnp.asarray(np.arange(1, z.shape[1] + 1) / (z.shape[1] + 1.0)))
        return jnp.mean(jnp.square(p - q[None, None, :]))

    with jax.enable_x64(True):
        z = jnp.asarray(np.random.RandomState(6).standard_normal((3, 9, 4)))
        shape = lambda z: S.visreg_terms(z[1:], z[:1], slices=draws, num_slices=37).shape  # noqa: E731
        np.testing.assert_allclose(shape(z), reference(z), rtol=1e-12)
        np.testing.assert_allclose(jax.jit(shape)(z), reference(z), rtol=1e-12)
        # the gradient through sg(σ) (so no finite differences here) against autodiff
        np.testing.assert_allclose(jax.jit(jax.grad(shape))(z), jax.grad(reference)(z),
                                   rtol=1e-10, atol=1e-13)
        # the primitive itself (no stop-gradient inside): finite differences too
        a = draws / np.linalg.norm(draws, axis=0, keepdims=True)
        q = ndtri(jnp.asarray(np.arange(1, 10) / 10.0))
        assert_matches_reference(
            lambda z: _slicing._sorted_slice_sse(z, jnp.asarray(a), q),
            lambda z: jnp.sum(jnp.square(jnp.sort(jnp.einsum("vnd,ds->vsn", z, a), axis=-1)
                                         - q[None, None, :])), (z,), 1.0)


# ----------------------------------------------------------------------------- degenerate
def test_zero_variance_gradients_are_finite():
    z = randn(2, (2, 6, 4)).at[:, :, 1].set(0.5)  # one constant feature
    for f in (lambda g: S.visreg_loss(g[:1], g[1:], KEY, num_slices=8),
              lambda g: S.sigreg(g, KEY, num_vectors=8),
              lambda g: S.lejepa_loss(g[:1], g[1:], KEY, sigreg_num_vectors=8)):
        vg = jax.jit(jax.value_and_grad(f))
        for x in (z, jnp.zeros_like(z), jnp.ones_like(z)):
            loss, grad = vg(x)
            assert np.isfinite(loss) and np.all(np.isfinite(grad))
    grad = jax.grad(lambda g: S.visreg_terms(g[:1], g[1:], KEY, num_slices=8).scale)(z)
    # torch's std backward at zero variance is 0: so is ours
    np.testing.assert_array_equal(grad[:, :, 1], 0.0)


def test_patch_kernel_alignment_degenerate():
    s = randn(3, (3, 6, 4))
    np.testing.assert_allclose(S.patch_kernel_alignment_loss(s, 2.0 * s + 1.0), 0.0, atol=1e-5)
    everything = jnp.ones((3, 6), bool)
    loss, g = jax.value_and_grad(S.patch_kernel_alignment_loss)(s, s, everything)
    assert loss == 0.0 and np.all(g == 0.0)
    one_valid = everything.at[0, 0].set(False)  # no image with two valid tokens
    assert S.patch_kernel_alignment_loss(s, s[::-1], one_valid) == 0.0
    loss, g = jax.value_and_grad(S.patch_kernel_alignment_loss)(jnp.zeros_like(s), s)
    assert np.isfinite(loss) and np.all(np.isfinite(g))
    # the teacher gets no gradient
    gt = jax.grad(S.patch_kernel_alignment_loss, argnums=1)(s, s[::-1])
    np.testing.assert_array_equal(gt, 0.0)


def test_patch_kernel_alignment_subsampling():
    s, t = randn(4, (2, 9, 4)), randn(5, (2, 9, 4))
    scores = jax.random.uniform(KEY, (2, 9))
    a = S.patch_kernel_alignment_loss(s, t, key=KEY, max_tokens=4)
    np.testing.assert_allclose(a, S.patch_kernel_alignment_loss(s, t, scores=scores,
                                                                max_tokens=4), rtol=1e-6)
    # the kept tokens are the 4 lowest scores: same as slicing them out by hand
    idx = np.argsort(np.asarray(scores), axis=1)[:, :4]
    take = lambda x: jnp.take_along_axis(x, jnp.asarray(idx)[..., None], axis=1)  # noqa: E731
    np.testing.assert_allclose(a, S.patch_kernel_alignment_loss(take(s), take(t)), rtol=1e-5)
    # max_tokens >= N: no subsampling, no key needed
    np.testing.assert_allclose(S.patch_kernel_alignment_loss(s, t, max_tokens=9),
                               S.patch_kernel_alignment_loss(s, t), rtol=1e-6)


# ----------------------------------------------------------------------------- k-means
def test_kmeans_plus_plus_under_jit_recovers_separated_clusters():
    centers = jnp.array([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    pts = jnp.repeat(centers, 5, axis=0) + 0.1 * randn(6, (15, 2))

    @jax.jit
    def run(x, key):
        init = _kmeans_pp_init(x, key, 3)
        return init, _kmeans(x, init, key, 20, 1e-4)

    init, (cents, labels) = run(pts, KEY)
    assert len(set(np.asarray(init) // 5)) == 3  # D² sampling seeds each cluster once
    labels = np.asarray(labels).reshape(3, 5)
    assert all(len(set(row)) == 1 for row in labels) and len(set(labels[:, 0])) == 3
    np.testing.assert_allclose(np.sort(np.asarray(cents), axis=0),
                               np.sort(np.asarray(centers), axis=0), atol=0.2)


def test_dse_jit_and_explicit_init():
    x = randn(7, (5, 4, 3))
    kw = {"local_clusters": 2, "global_clusters": 6}
    init = (np.tile(np.arange(2), (5, 1)), np.tile(np.arange(6), (2, 1)))

    @jax.jit
    def run(r):
        return (S.dse_regularizer(r, KEY, **kw), S.dse_regularizer(r, kmeans_init=init, **kw),
                S.dse_regularizer(r, KEY, weight=0.5, **kw),
                S.dse_regularizer(r, KEY, weight=0.0, **kw))

    full, explicit, half, zero = run(x)
    assert np.isfinite(full) and np.isfinite(explicit) and zero == 0.0
    np.testing.assert_allclose(half, 0.5 * full, rtol=1e-5)
    g = jax.jit(jax.grad(lambda r: S.dse_regularizer(r, KEY)))(jnp.zeros((2, 3, 4)))
    assert np.all(np.isfinite(g))


def test_dse_distributed_is_the_global_batch_regularizer():
    """Not in the registry: its 8-device shard_map (every device runs the k-means and SVDs
    of the whole gathered batch) stalls XLA's CPU collectives on 2 cores; 2 devices here."""
    spec = LossSpec(
        "dse_regularizer", "dense", {}, False, "",
        lambda batch, state=None, *, axis_name=None, **kw: (
            S.dse_regularizer(batch[0], KEY, axis_name=axis_name, **kw), None),
        lambda rng, b, d: Example((rng.standard_normal((b, 5, d)).astype(np.float32),)))
    assert_distributed_equivalent(spec, "shard_map", 2, global_batch=8)


# ----------------------------------------------------------------------------- ROI
def _np_bilinear(f, y, x):
    """torchvision's ``bilinear_interpolate`` (roi_align_kernel.cpp), for one point."""
    _, h, w = f.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(f.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_high = y_low = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_high = x_low = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * f[:, y_low, x_low] + hy * lx * f[:, y_low, x_high]
            + ly * hx * f[:, y_high, x_low] + ly * lx * f[:, y_high, x_high])


def np_roi_align(fm, boxes, oh, ow, sampling_ratio=-1, aligned=True):
    """An independent loop transcription of torchvision's ``roi_align`` forward (CPU
    kernel), ``spatial_scale=1``, one box per image, then lightly's ``(B, oh·ow, C)``."""
    b, c = fm.shape[:2]
    out = np.zeros((b, c, oh, ow))
    off = 0.5 if aligned else 0.0
    for i in range(b):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        sw, sh = x1 - off, y1 - off
        rw, rh = x2 - off - sw, y2 - off - sh
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / oh, rw / ow
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / oh)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / ow)
        count = max(gh * gw, 1)
        for ph in range(oh):
            for pw in range(ow):
                acc = np.zeros(c)
                for iy in range(gh):
                    y = sh + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = sw + pw * bw + (ix + 0.5) * bw / gw
                        acc += _np_bilinear(fm[i], y, x)
                out[i, :, ph, pw] = acc / count
    return out.reshape(b, c, oh * ow).transpose(0, 2, 1)


BOXES = np.array([[0.0, 0.0, 7.0, 5.0], [1.3, 0.7, 5.9, 4.2], [2.0, 2.0, 2.0, 3.0],
                  [0.0, 3.5, 1.1, 5.0]])


@pytest.mark.parametrize("out", [(2, 3), (3, 3), (1, 1)])
@pytest.mark.parametrize("sampling_ratio,aligned", [(-1, True), (2, True), (-1, False)])
def test_roi_resample_matches_a_numpy_transcription_of_roi_align(out, sampling_ratio, aligned):
    with jax.enable_x64(True):
        fm = np.random.RandomState(9).standard_normal((4, 3, 5, 7))
        got = jax.jit(lambda f, b: S.roi_resample_to_grid(
            f, b, *out, sampling_ratio=sampling_ratio, aligned=aligned))(fm, BOXES)
        want = np_roi_align(fm, BOXES, *out, sampling_ratio=sampling_ratio, aligned=aligned)
        assert got.shape == (4, out[0] * out[1], 3)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_roi_resample_closed_forms_and_gradient():
    const = jnp.full((2, 2, 5, 6), 3.0)
    boxes = jnp.array([[0.0, 0.0, 6.0, 5.0], [1.5, 1.5, 4.5, 3.5]])
    roi = jax.jit(S.roi_resample_to_grid, static_argnums=(2, 3))
    np.testing.assert_allclose(roi(const, boxes, 3, 2), 3.0, rtol=1e-6)
    # a linear image a·x + b·y + c is reproduced at every bin centre (box inside the map)
    yy, xx = np.meshgrid(np.arange(5.0), np.arange(6.0), indexing="ij")
    lin = jnp.asarray(np.broadcast_to(0.7 * xx - 0.4 * yy + 2.0, (1, 1, 5, 6)), jnp.float32)
    box = np.array([[1.5, 1.5, 4.5, 3.5]])
    out = np.asarray(roi(lin, box, 2, 3))[0, :, 0].reshape(2, 3)
    bh, bw = 2.0 / 2, 3.0 / 3
    yc = 1.0 + (np.arange(2) + 0.5) * bh
    xc = 1.0 + (np.arange(3) + 0.5) * bw
    np.testing.assert_allclose(out, 0.7 * xc[None] - 0.4 * yc[:, None] + 2.0, rtol=1e-5)
    # linear in the map, no gradient into the boxes (as roi_align)
    g_fm, g_box = jax.jit(jax.grad(lambda f, b: jnp.sum(S.roi_resample_to_grid(f, b, 2, 2)),
                                   argnums=(0, 1)))(const, boxes)
    assert np.all(np.isfinite(g_fm)) and np.all(g_box == 0.0)
    np.testing.assert_allclose(jnp.sum(g_fm, axis=(1, 2, 3)), [2 * 4.0, 2 * 4.0], rtol=1e-5)


# ----------------------------------------------------------------------------- errors
X3 = randn(10, (2, 6, 4))


@pytest.mark.parametrize("call,err,match", [
    (lambda: S.sigreg(X3, KEY, knots=1), ValueError, "knots"),
    (lambda: S.sigreg(X3, KEY, t_max=0.0), ValueError, "t_max"),
    (lambda: S.sigreg(X3, KEY, num_vectors=0), ValueError, "num_vectors"),
    (lambda: S.sigreg(X3, slices=jnp.ones((3, 1024))), ValueError, r"slices.*\(4, 1024\)"),
    (lambda: S.sigreg(X3), ValueError, "key is required"),
    (lambda: S.sigreg(X3, jnp.ones(3)), TypeError, "key must be a PRNG key"),
    (lambda: S.sigreg(X3[0, 0], KEY), ValueError, r"proj must have rank >= 2.*\(4,\)"),
    (lambda: S.lejepa_loss(X3, X3, KEY, lambda_param=1.5), ValueError, "lambda_param"),
    (lambda: S.lejepa_loss(X3[:, :3], X3, KEY), ValueError,
     r"global_proj and local_proj.*\(6, 4\) and \(3, 4\)"),
    (lambda: S.lejepa_loss(X3[:, 0], X3, KEY), ValueError, "local_proj must have rank 3"),
    (lambda: S.lejepa_loss([], X3, KEY), ValueError, "local_proj must hold at least one"),
    (lambda: S.lewm_loss(X3, X3[:, :5], X3, KEY), ValueError,
     r"predicted and target.*\(2, 6, 4\).*\(2, 5, 4\)"),
    (lambda: S.lewm_loss(X3, X3, X3[:1], KEY), ValueError, "embeddings must share"),
    (lambda: S.lewm_loss(X3, X3, X3, KEY, lambda_param=-1.0), ValueError, "lambda_param"),
    (lambda: S.visreg_loss(X3, X3, KEY, eps=0.0), ValueError, "eps"),
    (lambda: S.visreg_loss(X3, X3, KEY, num_slices=0), ValueError, "num_slices"),
    (lambda: S.visreg_loss(X3, X3, KEY, lambda_shape=-1.0), ValueError, "lambda_shape"),
    (lambda: S.visreg_loss(X3[:, :1], X3[:, :1], KEY), ValueError, "at least 2 samples"),
    (lambda: S.visreg_loss(X3, X3[:, :, :3], KEY), ValueError, "global_proj and local_proj"),
    (lambda: S.patch_kernel_alignment_loss(X3, X3, jnp.ones((2, 5), bool)), ValueError,
     r"mask must have shape \(2, 6\)"),
    (lambda: S.patch_kernel_alignment_loss(X3, X3, jnp.ones((2, 6))), TypeError,
     "mask must have dtype bool"),
    (lambda: S.patch_kernel_alignment_loss(X3, X3, max_tokens=1), ValueError, "max_tokens"),
    (lambda: S.patch_kernel_alignment_loss(X3, X3, max_tokens=3), ValueError,
     "key is required"),
    (lambda: S.patch_kernel_alignment_loss(X3, X3, scores=jnp.ones((2, 5)), max_tokens=3),
     ValueError, r"scores must have shape \(2, 6\)"),
    (lambda: S.patch_kernel_alignment_loss(X3, X3[:, :, :3]), ValueError,
     "student_features and teacher_features"),
    (lambda: S.dse_regularizer(X3, KEY, local_clusters=0), ValueError, "local_clusters"),
    (lambda: S.dse_regularizer(X3, KEY, global_clusters=0), ValueError, "global_clusters"),
    (lambda: S.dse_regularizer(X3, KEY, max_kmeans_iters=0), ValueError, "max_kmeans_iters"),
    (lambda: S.dse_regularizer(X3, KEY, tol=0.0), ValueError, "tol"),
    (lambda: S.dse_regularizer(X3, KEY, weight=-1.0), ValueError, "weight"),
    (lambda: S.dse_regularizer(X3), ValueError, "key is required"),
    (lambda: S.dse_regularizer(X3, kmeans_init=(np.zeros((2, 2), int), np.zeros((1, 12), int))),
     ValueError, r"local_init.*\(2, 3\)"),
    (lambda: S.dse_regularizer(X3[0], KEY), ValueError, r"representations must have rank 3"),
    (lambda: S.roi_resample_to_grid(X3[None], jnp.ones((1, 3)), 2, 2), ValueError,
     r"boxes must have shape \(B, 4\)"),
    (lambda: S.roi_resample_to_grid(X3[None], jnp.ones((2, 4)), 2, 2), ValueError,
     "boxes batch size 2 does not match feature_map batch size 1"),
    (lambda: S.roi_resample_to_grid(X3, jnp.ones((2, 4)), 2, 2), ValueError,
     "feature_map must have rank 4"),
    (lambda: S.roi_resample_to_grid(X3[None], jnp.ones((1, 4)), 0, 2), ValueError, "out_h"),
])
def test_bad_inputs(call, err, match):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize("chunk_elements", [1, 24, 10**9])
def test_sigreg_characteristic_function_recurrence_and_chunks(chunk_elements, monkeypatch):
    # The angle-addition recurrence (any chunking of the slices) against cos/sin of the
    # broadcast products, values and gradients in float64.
    from sslloss_jax import _slicing

    monkeypatch.setattr(_slicing, "_ECF_CHUNK_ELEMENTS", chunk_elements)
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        x = jnp.asarray(rng.standard_normal((3, 4, 6)) * 2)  # [views, n, slices]
        w = jnp.asarray(rng.standard_normal((2, 3, 6, 5)))
        t = jnp.linspace(0.0, 2.0, 5)

        def reference(x):
            xt = x[..., None] * t.reshape(1, 1, 1, -1)
            return jnp.stack([jnp.sum(jnp.cos(xt), axis=-3), jnp.sum(jnp.sin(xt), axis=-3)])

        assert_matches_reference(lambda x: _slicing._ecf_sums_chunked(x, 0.5, 5), reference,
                                 (x,), w)
