"""Dense (patch-level) objectives: patch kernel alignment (PaKa), the DSE regularizer and
the bilinear ROI resampling that aligns two crops' patch grids.

Random choices (PaKa's token subsampling, DSE's k-means++ seeding) come from an explicit
PRNG ``key`` or explicit draws, identical on every device under ``axis_name``. Shapes are
static: k-means runs a fixed ``max_kmeans_iters`` iterations in ``lax.fori_loop`` and
freezes once converged, which is exactly lightly's early ``break``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sslloss_jax import _collectives as coll
from sslloss_jax import _validation as val
from sslloss_jax._numerics import (
    argmin_first,
    l2_normalize,
    nuclear_norm,
    safe_norm,
    safe_sqrt,
    sq_dists,
    sym_gram,
    upcast,
)
from sslloss_jax._types import ArrayLike, AxisName

__all__ = ["patch_kernel_alignment_loss", "dse_regularizer", "roi_resample_to_grid"]

_HIGHEST = lax.Precision.HIGHEST
_CKA_EPS = 1e-6


def _int_array(x: ArrayLike, name: str, shape: tuple[int, ...]) -> jax.Array:
    arr = jnp.asarray(np.asarray(x) if isinstance(x, (list, tuple)) else x)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    return arr.astype(jnp.int32)


# ----------------------------------------------------------------------------- PaKa
def _centered_kernel(z: jax.Array, w: jax.Array | None) -> jax.Array:
    """Mask-aware ``H (Z Zᵀ) H`` (lightly's ``_double_center`` of the linear kernel):
    ``z [B, M, D]``, ``w [B, M]`` in {0, 1} (``None``: every token valid).

    Double-centering a linear kernel is the kernel of the centered tokens,
    ``(z_i − μ)·(z_j − μ)`` with ``μ`` the mean of the valid tokens, masked by
    ``w_i w_j``: the tokens are centered (``B·M·D``) instead of the kernel's rows,
    columns and total being subtracted (four passes over ``B·M²`` and their backward);
    :func:`sym_gram`'s backward is one batched product.
    """
    if w is None:  # every token valid
        return sym_gram(z - jnp.mean(z, axis=1, keepdims=True))
    n = jnp.maximum(jnp.sum(w, axis=-1), 1.0)  # [B]
    mean = jnp.einsum("bm,bmd->bd", w, z, precision=_HIGHEST) / n[:, None]
    zc = (z - mean[:, None, :]) * w[:, :, None]
    return sym_gram(zc)


def patch_kernel_alignment_loss(
    student_features: ArrayLike,
    teacher_features: ArrayLike,
    mask: ArrayLike | None = None,
    key: jax.Array | None = None,
    *,
    max_tokens: int | None = None,
    scores: ArrayLike | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Patch kernel alignment (PaKa): 1 − CKA between student and teacher token kernels.

    Per image, with the valid tokens ``V`` (``~mask``), the linear kernels
    ``K_s = Z_s Z_sᵀ``, ``K_t = Z_t Z_tᵀ`` (teacher stop-gradient) are double-centered over
    the valid rows and columns (``K̃ = K − row mean − column mean + total mean``, entries of
    invalid tokens zeroed) and

    .. math::
        \ell_b = 1 - \frac{\langle \tilde K_s, \tilde K_t\rangle_F}
            {\sqrt{\max(\langle \tilde K_s, \tilde K_s\rangle_F, 10^{-6})}
             \sqrt{\max(\langle \tilde K_t, \tilde K_t\rangle_F, 10^{-6})}} .

    The loss is the mean of ``ℓ_b`` over the images with at least two valid tokens (a
    differentiable 0 if there is none).

    Args:
      student_features: ``[B, N, D]`` student tokens.
      teacher_features: ``[B, N, D]`` teacher tokens (stop-gradient).
      mask: optional boolean ``[B, N]``; ``True`` marks a token to ignore.
      key: PRNG key of the token subsampling (only used when ``max_tokens < N``): the
        scores of the global batch are ``jax.random.uniform(key, (B_global, N))`` and
        this device takes its rows, so the draw is that of one device holding the global
        batch. The same key on every device.
      max_tokens: static; if ``N > max_tokens``, keep per image the ``max_tokens`` tokens
        of lowest score, invalid tokens last (lightly's random subsampling). ``None`` or
        an int >= 2.
      scores: optional ``[B, N]`` explicit uniform scores of this device's images (e.g.
        lightly's recorded ``torch.rand``); overrides ``key``.
      axis_name: optional axis; the images (axis 0) are sharded. The mean over the valid
        images is a global one (``psum`` of the sum and the count).

    Returns:
      Scalar loss in the compute dtype (>= float32).

    Raises:
      ValueError: ranks other than 3, different shapes, a mask of the wrong shape,
        ``max_tokens < 2``, bad ``scores``, or subsampling without ``key``/``scores``.
      TypeError: non-floating features, a non-boolean mask, a bad key.

    Differences from lightly:

    - the kernels are computed in the compute dtype (float32, or float64 for float64
      inputs; lightly always casts to float32);
    - the subsampling scores come from ``key``/``scores`` (lightly: ``torch.rand``);
    - under ``axis_name`` the mean is over the global set of valid images (lightly has no
      distributed mode: each rank averages its own images).

    References:
      `Patch-Level Kernel Alignment for Dense Self-Supervised Learning (PaKa)
      <https://arxiv.org/abs/2509.05606>`_, 2025.
    """
    val.check_axis_name(axis_name)
    student = val.as_float_array(student_features, "student_features", ndim=3)
    teacher = val.as_float_array(teacher_features, "teacher_features", ndim=3)
    val.check_same_shape(student, teacher, "student_features", "teacher_features")
    b, n, _ = student.shape
    if mask is not None:
        m = jnp.asarray(mask)
        if m.shape != (b, n):
            raise ValueError(f"mask must have shape {(b, n)}, got {m.shape}")
        if m.dtype != jnp.bool_:
            raise TypeError(f"mask must have dtype bool, got {m.dtype}")
        valid = ~m
    else:
        valid = jnp.ones((b, n), bool)
    if max_tokens is not None:
        max_tokens = val.check_int(max_tokens, "max_tokens", 2)
    student, teacher = upcast(student, teacher)
    teacher = lax.stop_gradient(teacher)
    dtype = student.dtype

    if max_tokens is not None and n > max_tokens:
        if scores is not None:
            s = val.as_float_array(scores, "scores", ndim=2)
            if s.shape != (b, n):
                raise ValueError(f"scores must have shape {(b, n)}, got {s.shape}")
            s = s.astype(dtype)
        elif key is not None:
            val.check_key(key)
            full = jax.random.uniform(key, (b * coll.axis_size(axis_name), n), dtype)
            s = lax.dynamic_slice_in_dim(full, coll.axis_index(axis_name) * b, b, axis=0)
        else:
            raise ValueError(
                f"key is required to subsample max_tokens={max_tokens} of N={n} tokens; "
                "pass a PRNG key or explicit scores"
            )
        s = jnp.where(valid, lax.stop_gradient(s), jnp.inf)
        _, idx = lax.top_k(-s, max_tokens)  # the lowest scores, ascending (as torch.topk)
        student = jnp.take_along_axis(student, idx[..., None], axis=1)
        teacher = jnp.take_along_axis(teacher, idx[..., None], axis=1)
        valid = jnp.take_along_axis(valid, idx, axis=1)

    w = None if mask is None else valid.astype(dtype)  # no mask: every (kept) token valid
    k_s, k_t = _centered_kernel(student, w), _centered_kernel(teacher, w)
    hsic_st = jnp.sum(k_s * k_t, axis=(1, 2))
    hsic_ss = jnp.sum(k_s * k_s, axis=(1, 2))
    hsic_tt = jnp.sum(k_t * k_t, axis=(1, 2))
    denom = jnp.sqrt(jnp.maximum(hsic_ss, _CKA_EPS)) * jnp.sqrt(jnp.maximum(hsic_tt, _CKA_EPS))
    loss_per_image = 1.0 - hsic_st / denom
    valid_image = (jnp.sum(valid, axis=-1) >= 2).astype(dtype)
    sums = coll.psum(jnp.stack([jnp.sum(loss_per_image * valid_image), jnp.sum(valid_image)]),
                     axis_name)
    return sums[0] / jnp.maximum(sums[1], 1.0)


# ----------------------------------------------------------------------------- DSE
def _kmeans_pp_init(x: jax.Array, key: jax.Array, k: int) -> jax.Array:
    """k-means++ seeding with D² sampling (lightly's): ``k`` indices into ``x [P, D]``."""
    p = x.shape[0]
    k0, key = jax.random.split(key)
    first = jax.random.randint(k0, (), 0, p, dtype=jnp.int32)
    idx = jnp.zeros((k,), jnp.int32).at[0].set(first)
    mind2 = sq_dists(x, x[first][None])[:, 0]

    def body(j, carry):
        idx, mind2 = carry
        prob = mind2 / (jnp.sum(mind2) + 1e-12)
        prob = jnp.where(jnp.sum(prob) == 0, jnp.full_like(prob, 1.0 / p), prob)
        nxt = jax.random.categorical(jax.random.fold_in(key, j), jnp.log(prob)).astype(jnp.int32)
        idx = idx.at[j].set(nxt)
        return idx, jnp.minimum(mind2, sq_dists(x, x[nxt][None])[:, 0])

    idx, _ = lax.fori_loop(1, k, body, (idx, mind2))
    return idx


def _kmeans(x: jax.Array, init: jax.Array, key: jax.Array | None, iters: int, tol: float):
    """Lloyd's iterations from the centroids ``x[init]`` (``x`` stop-gradient); returns
    ``(centroids [K, D], labels [P])``. Converged (shift < tol) centroids are frozen, as
    lightly's ``break``; an empty cluster is re-seeded with a random point (from ``key``;
    without a key it keeps its centroid)."""
    p, k = x.shape[0], init.shape[0]
    c0 = x[init]

    def body(i, carry):
        c, done = carry
        labels = argmin_first(sq_dists(x, c), axis=1)
        onehot = (labels[:, None] == jnp.arange(k)[None, :]).astype(x.dtype)  # [P, K]
        counts = jnp.sum(onehot, axis=0)
        means = jnp.matmul(onehot.T, x, precision=_HIGHEST) / jnp.maximum(counts, 1.0)[:, None]
        if key is not None:
            fallback = x[jax.random.randint(jax.random.fold_in(key, i), (k,), 0, p, jnp.int32)]
        else:
            fallback = c
        new = jnp.where(counts[:, None] > 0, means, fallback)
        shift = safe_sqrt(jnp.sum(jnp.square(new - c)))
        return jnp.where(done, c, new), done | (shift < tol)

    c, _ = lax.fori_loop(0, iters, body, (c0, jnp.asarray(False)))
    return c, argmin_first(sq_dists(x, c), axis=1)


def _cluster_singular_sums(x: jax.Array, labels: jax.Array, k: int):
    """Per cluster of ``x [P, D]``: the centered singular sum / sqrt(max(n − 1, D)) and
    whether it counts (n > 1). ``([K], [K] bool)``."""
    d = x.shape[-1]
    member = (labels[None, :] == jnp.arange(k)[:, None]).astype(x.dtype)  # [K, P]
    n = jnp.sum(member, axis=1)
    mean = jnp.matmul(member, x, precision=_HIGHEST) / jnp.maximum(n, 1.0)[:, None]
    centered = member[:, :, None] * (x[None] - mean[:, None, :])  # [K, P, D]
    denom = jnp.sqrt(jnp.maximum(n - 1.0, float(d)))
    return nuclear_norm(centered) / denom, n > 1


def dse_regularizer(
    representations: ArrayLike,
    key: jax.Array | None = None,
    *,
    weight: ArrayLike = 1.0,
    normalize: bool = True,
    local_clusters: int = 3,
    global_clusters: int = 24,
    max_kmeans_iters: int = 20,
    tol: float = 1e-4,
    kmeans_init: tuple[ArrayLike, ArrayLike] | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""DSE (Dense Structure Estimator) regularizer: ``−weight · DSE``.

    With the (optionally L2-normalized) tokens ``r [B, N, D]``, ``ā = mean‖r − r̄‖``
    (``r̄`` the mean over all B·N tokens) and the centered singular sum of a cluster
    ``C``, ``σ(C) = Σ svd(C − mean C) / sqrt(max(|C| − 1, D))``:

    - ``intra_image``: k-means (``local_clusters``) on each image's tokens; the mean of
      ``σ`` over its clusters with > 1 member, then the mean over the images that have one;
    - ``inter_batch`` / ``intra_batch``: the images in groups of
      ``max(global_clusters // local_clusters, 1)``; k-means (``global_clusters``) on each
      group's tokens; ``inter`` = mean distance of a token to the nearest centroid other
      than its own (mean over groups with > 1 centroid), ``intra`` = mean of ``σ`` over
      every cluster (of every group) with > 1 member;
    - ``eff_dim = exp(H(s/Σs)) / min(B·N, D)`` with the singular values ``s`` of the
      ``[B·N, D]`` token matrix (eps 1e-12);

    .. math::
        \mathrm{DSE} = \frac{\text{inter}}{ā + ε} + \text{eff\_dim}
            - \tfrac12\Big(\frac{\text{intra\_batch}}{ā + ε}
            + \frac{\text{intra\_image}}{ā + ε}\Big),
        \quad ε = 10^{-12}.

    The k-means runs on stop-gradient tokens (k-means++ seeding, ``max_kmeans_iters``
    Lloyd iterations, stopped once the centroid shift is below ``tol``); the distances
    and singular values carry gradients.

    Args:
      representations: ``[B, N, D]`` dense features (ConvNet maps flattened to tokens).
      key: PRNG key of the k-means++ seeding and of the re-seeding of empty clusters;
        the same on every device. Optional when ``kmeans_init`` is given.
      weight: >= 0 (may be traced).
      normalize: static; L2-normalize the tokens first.
      local_clusters, global_clusters: static cluster counts (>= 1); a run on ``P``
        points uses ``min(k, P)`` clusters.
      max_kmeans_iters: static, >= 1.
      tol: > 0, the centroid-shift threshold.
      kmeans_init: optional explicit seeding ``(local_init, global_init)``: integer
        arrays ``[B_global, min(local_clusters, N)]`` (the initial centroid indices into
        each image's tokens) and ``[G, min(global_clusters, P_max)]`` (into each group's
        ``P`` tokens, ``P_max`` the largest group; a smaller last group uses the first
        ``min(global_clusters, P)`` entries of its row). E.g. lightly's recorded
        ``randint``/``multinomial`` draws. Overrides the seeding from ``key``; without a
        key an empty cluster keeps its previous centroid.
      axis_name: optional axis; the images (axis 0) are sharded. The tokens are
        gathered into the global batch (a differentiable ``psum`` of zero-padded blocks)
        and the regularizer of the global batch is computed identically on every device.

    Returns:
      Scalar ``−weight · DSE`` in the compute dtype (>= float32).

    Raises:
      ValueError: a rank other than 3, an empty axis, out-of-range hyperparameters, bad
        ``kmeans_init``, or neither ``key`` nor ``kmeans_init``.
      TypeError: non-floating input, a bad key, non-integer ``kmeans_init``.

    Differences from lightly:

    - k-means++ and the re-seeding draw from ``key`` (or ``kmeans_init``), not the global
      torch RNG; the loops are a static ``lax.fori_loop`` (jit-compatible);
    - ``weight = 0`` still computes (and returns 0; lightly returns a constant 0);
    - under ``axis_name`` it is the regularizer of the global batch (lightly has no
      distributed mode); computed in >= float32.

    References:
      `Exploring Structural Degradation in Dense Representations for Self-supervised
      Learning <https://arxiv.org/abs/2510.17299>`_, 2025.
    """
    val.check_axis_name(axis_name)
    val.check_in_range(weight, "weight", 0.0, None)
    local_clusters = val.check_int(local_clusters, "local_clusters", 1)
    global_clusters = val.check_int(global_clusters, "global_clusters", 1)
    max_kmeans_iters = val.check_int(max_kmeans_iters, "max_kmeans_iters", 1)
    tol_v = val.concrete_scalar(tol)
    if tol_v is None or not math.isfinite(tol_v) or tol_v <= 0:
        raise ValueError(f"tol must be a finite Python number > 0, got {tol!r}")
    reps = val.as_float_array(representations, "representations", ndim=3)
    (reps,) = upcast(reps)
    if axis_name is not None:
        reps = coll.psum_gather(reps, axis_name)
    b, n, d = reps.shape
    g = max(global_clusters // local_clusters, 1)
    starts = list(range(0, b, g))
    k_l = min(local_clusters, n)
    p_max = min(g, b) * n
    k_gmax = min(global_clusters, p_max)

    local_init = global_init = None
    if kmeans_init is not None:
        if not isinstance(kmeans_init, (tuple, list)) or len(kmeans_init) != 2:
            raise TypeError("kmeans_init must be a pair (local_init, global_init)")
        local_init = _int_array(kmeans_init[0], "kmeans_init[0] (local_init)", (b, k_l))
        global_init = _int_array(kmeans_init[1], "kmeans_init[1] (global_init)",
                                 (len(starts), k_gmax))
    elif key is None:
        raise ValueError(
            "key is required to seed the k-means (k-means++); pass a PRNG key or explicit "
            "kmeans_init"
        )
    if key is not None:
        val.check_key(key)

    if normalize:
        reps = l2_normalize(reps, axis=-1)
    dtype = reps.dtype
    flat = reps.reshape(b * n, d)
    centered = flat - jnp.mean(flat, axis=0, keepdims=True)
    avg_l2 = jnp.mean(safe_norm(centered, axis=-1))
    detached = lax.stop_gradient(reps)

    # intra-image structure: one k-means per image (vmapped)
    def image_term(x, xd, init, run_key):
        rkey: jax.Array | None
        if init is None:
            init = _kmeans_pp_init(xd, jax.random.fold_in(run_key, 0), k_l)
            rkey = jax.random.fold_in(run_key, 1)
        else:
            rkey = None if run_key is None else jax.random.fold_in(run_key, 1)
        _, labels = _kmeans(xd, init, rkey, max_kmeans_iters, tol_v)
        sums, ok = _cluster_singular_sums(x, labels, k_l)
        cnt = jnp.sum(ok.astype(sums.dtype))
        return jnp.sum(jnp.where(ok, sums, 0.0)) / jnp.maximum(cnt, 1.0), cnt > 0

    image_keys = None
    if key is not None:
        image_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, 0), i))(
            jnp.arange(b))
    in_axes = (0, 0, None if local_init is None else 0, None if image_keys is None else 0)
    img_vals, img_ok = jax.vmap(image_term, in_axes=in_axes)(reps, detached, local_init,
                                                             image_keys)
    img_okf = img_ok.astype(dtype)
    intra_image = jnp.sum(img_vals * img_okf) / jnp.maximum(jnp.sum(img_okf), 1.0)

    # batch structure: groups of g images
    inter_terms, intra_sum, intra_cnt = [], jnp.zeros((), dtype), jnp.zeros((), dtype)
    for gi, start in enumerate(starts):
        grp = reps[start:start + g].reshape(-1, d)
        grp_d = lax.stop_gradient(grp)
        k_g = min(global_clusters, grp.shape[0])
        gkey = None if key is None else jax.random.fold_in(jax.random.fold_in(key, 1), gi)
        rkey: jax.Array | None
        if global_init is not None:
            init = global_init[gi, :k_g]
            rkey = None if gkey is None else jax.random.fold_in(gkey, 1)
        else:
            assert gkey is not None
            init = _kmeans_pp_init(grp_d, jax.random.fold_in(gkey, 0), k_g)
            rkey = jax.random.fold_in(gkey, 1)
        cents, labels = _kmeans(grp_d, init, rkey, max_kmeans_iters, tol_v)
        if k_g > 1:
            dist = safe_sqrt(sq_dists(grp, lax.stop_gradient(cents)))  # [P, K]
            own = labels[:, None] == jnp.arange(k_g)[None, :]
            other = jnp.min(jnp.where(own, jnp.inf, dist), axis=1)
            inter_terms.append(jnp.mean(other))
        sums, ok = _cluster_singular_sums(grp, labels, k_g)
        intra_sum = intra_sum + jnp.sum(jnp.where(ok, sums, 0.0))
        intra_cnt = intra_cnt + jnp.sum(ok.astype(dtype))
    inter_batch = jnp.mean(jnp.stack(inter_terms)) if inter_terms else jnp.zeros((), dtype)
    intra_batch = intra_sum / jnp.maximum(intra_cnt, 1.0)

    # effective dimensionality of the (uncentered) token matrix
    s = jnp.linalg.svd(flat, compute_uv=False)
    prob = s / (jnp.sum(s) + 1e-12)
    entropy = -jnp.sum(prob * jnp.log(prob + 1e-12))
    eff_dim = jnp.exp(entropy) / min(b * n, d)

    denom = avg_l2 + 1e-12
    dse = inter_batch / denom + eff_dim - 0.5 * (intra_batch / denom + intra_image / denom)
    return -jnp.asarray(weight).astype(dtype) * dse


# ----------------------------------------------------------------------------- ROI
def _axis_weights(start: jax.Array, bin_size: jax.Array, grid: jax.Array, out: int,
                  size: int, max_grid: int) -> jax.Array:
    """Separable bilinear weights of roi_align along one axis: ``[B, out, size]`` summed
    over the ``grid`` sampling points of every bin (``max_grid`` static upper bound)."""
    it = jnp.arange(max_grid, dtype=start.dtype)
    ph = jnp.arange(out, dtype=start.dtype)
    g = grid[:, None, None]
    pos = (start[:, None, None] + ph[None, :, None] * bin_size[:, None, None]
           + (it[None, None, :] + 0.5) * bin_size[:, None, None] / jnp.maximum(g, 1))
    used = it[None, None, :] < g  # [B, out, max_grid]
    inside = (pos >= -1.0) & (pos <= size)
    y = jnp.maximum(pos, 0.0)
    low = jnp.floor(y).astype(jnp.int32)
    at_edge = low >= size - 1
    low = jnp.where(at_edge, size - 1, low)
    high = jnp.where(at_edge, size - 1, low + 1)
    y = jnp.where(at_edge, low.astype(y.dtype), y)
    frac = y - low.astype(y.dtype)
    keep = (used & inside).astype(y.dtype)
    cells = jnp.arange(size, dtype=jnp.int32).reshape(1, 1, 1, size)
    dt = y.dtype
    w = ((1.0 - frac)[..., None] * (low[..., None] == cells).astype(dt)
         + frac[..., None] * (high[..., None] == cells).astype(dt)) * keep[..., None]
    return jnp.sum(w, axis=2)  # [B, out, size]


def roi_resample_to_grid(
    feature_map: ArrayLike,
    boxes: ArrayLike,
    out_h: int,
    out_w: int,
    *,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> jax.Array:
    r"""Bilinear ROI resampling of one box per sample onto an ``out_h × out_w`` grid.

    The JAX counterpart of lightly's ``roi_resample_to_grid``, i.e. torchvision's
    ``roi_align(feature_map, [i, *boxes[i]], (out_h, out_w), spatial_scale=1,
    sampling_ratio, aligned)``: box ``(x0, y0, x1, y1)`` (minus 0.5 when ``aligned``) is
    cut into ``out_h × out_w`` bins; each bin averages bilinear samples on a regular
    ``g_h × g_w`` grid, ``g = sampling_ratio`` if > 0 else ``ceil(roi_size / out)``
    (adaptive, per box); samples outside ``[-1, H] × [-1, W]`` count as 0 and
    coordinates are clamped to the map. Bilinear interpolation is separable, so the
    output is ``R_y F R_xᵀ / (g_h g_w)`` with per-box ``[out, H]`` and ``[out, W]``
    interpolation matrices.

    Args:
      feature_map: ``[B, C, H, W]`` features (e.g. patch tokens reshaped to the grid).
      boxes: ``[B, 4]`` boxes ``(x0, y0, x1, y1)`` in feature-grid coordinates (``x`` in
        ``[0, W]``, ``y`` in ``[0, H]``), ``x0 <= x1``, ``y0 <= y1``. No gradient flows
        into them (as ``roi_align``).
      out_h, out_w: static output grid size.
      sampling_ratio: static; samples per bin and axis, or <= 0 for torchvision's
        adaptive ``ceil(roi_size / out)`` (lightly's default, -1). The adaptive count is
        data-dependent, so it is bounded statically by ``ceil(H / out_h)`` (resp. W):
        exact for boxes inside the map, as documented by lightly.
      aligned: static; torchvision's half-pixel offset (lightly: True).

    Returns:
      ``[B, out_h·out_w, C]`` in row-major token order, in the compute dtype.

    Raises:
      ValueError: wrong ranks or shapes, mismatched batch sizes, bad output sizes.
      TypeError: non-floating inputs.
    """
    fm = val.as_float_array(feature_map, "feature_map", ndim=4)
    bx = val.as_float_array(boxes, "boxes", ndim=2)
    if bx.shape[1] != 4:
        raise ValueError(f"boxes must have shape (B, 4), got {bx.shape}")
    if bx.shape[0] != fm.shape[0]:
        raise ValueError(
            f"boxes batch size {bx.shape[0]} does not match feature_map batch size "
            f"{fm.shape[0]} (shapes {bx.shape} and {fm.shape})"
        )
    out_h = val.check_int(out_h, "out_h", 1)
    out_w = val.check_int(out_w, "out_w", 1)
    if not isinstance(sampling_ratio, (int, np.integer)) or isinstance(sampling_ratio, bool):
        raise ValueError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    fm, bx = upcast(fm, bx)
    bx = lax.stop_gradient(bx)
    _, _, h, w = fm.shape
    offset = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (bx[:, i] - offset for i in range(4))
    roi_w, roi_h = x1 - x0, y1 - y0
    if not aligned:
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    if sampling_ratio > 0:
        gh = jnp.full(roi_h.shape, sampling_ratio, jnp.int32)
        gw = jnp.full(roi_w.shape, sampling_ratio, jnp.int32)
        max_h = max_w = int(sampling_ratio)
    else:
        gh = jnp.ceil(roi_h / out_h).astype(jnp.int32)
        gw = jnp.ceil(roi_w / out_w).astype(jnp.int32)
        max_h, max_w = max(1, -(-h // out_h)), max(1, -(-w // out_w))
    ry = _axis_weights(y0, bin_h, gh.astype(fm.dtype), out_h, h, max_h)
    rx = _axis_weights(x0, bin_w, gw.astype(fm.dtype), out_w, w, max_w)
    count = jnp.maximum(gh * gw, 1).astype(fm.dtype)
    out = jnp.einsum("bph,bchw,bqw->bpqc", ry, fm, rx, precision=_HIGHEST)
    out = out / count[:, None, None, None]
    return out.reshape(fm.shape[0], out_h * out_w, fm.shape[1])
