"""Similarity-based losses without negatives: negative cosine (SimSiam/BYOL) and the
hypersphere alignment/uniformity losses (Wang & Isola)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from sslloss_jax import _collectives as coll
from sslloss_jax import _validation as val
from sslloss_jax._numerics import (
    argmax_first,
    cosine_similarity,
    l2_normalize,
    masked_logsumexp,
    reduce_halving,
    runtime_scalar,
    safe_norm,
    sq_dists,
    upcast,
)
from sslloss_jax._types import ArrayLike, AxisName

__all__ = [
    "negative_cosine_similarity",
    "sym_negative_cosine_similarity_loss",
    "alignment_loss",
    "uniformity_loss",
    "hypersphere_loss",
    "koleo_loss",
    "byol_regression_loss",
    "simsiam_loss",
]


def _batch_mean(per_sample: jax.Array, axis_name: AxisName) -> jax.Array:
    """Mean of all entries; under ``axis_name`` the mean over the global batch."""
    return coll.global_mean(jnp.sum(per_sample), per_sample.size, axis_name)


def negative_cosine_similarity(
    x0: ArrayLike,
    x1: ArrayLike,
    *,
    axis: int = 1,
    eps: float = 1e-8,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""``−mean cos(x0, x1)`` along ``axis`` (SimSiam / BYOL criterion).

    .. math:: L = -\operatorname{mean}\frac{\langle x_0, x_1\rangle}
              {\max(\lVert x_0\rVert,\epsilon)\max(\lVert x_1\rVert,\epsilon)}

    No stop-gradient (as lightly's ``NegativeCosineSimilarity``); use
    :func:`sym_negative_cosine_similarity_loss` for the SimSiam form that detaches the
    targets.

    Args:
      x0, x1: arrays of the same rank whose shapes are equal or broadcast through size-1
        axes (batch first).
      axis: the feature axis the cosine is taken over (lightly's ``dim``).
      eps: lower bound of each norm.
      axis_name: optional axis; the mean is then over the global batch.

    Returns:
      Scalar loss in ``[-1, 1]``.
    """
    val.check_axis_name(axis_name)
    x0 = val.as_float_array(x0, "x0", min_ndim=1)
    x1 = val.as_float_array(x1, "x1", min_ndim=1)
    if x0.ndim != x1.ndim:
        raise ValueError(f"x0 and x1 must have the same rank, got {x0.shape} and {x1.shape}")
    try:
        jnp.broadcast_shapes(x0.shape, x1.shape)
    except ValueError as err:
        raise ValueError(f"x0 and x1 shapes must broadcast, got {x0.shape} and {x1.shape}") from err
    if not -x0.ndim <= axis < x0.ndim:
        raise ValueError(
            f"axis {axis} is out of range for inputs of rank {x0.ndim} (x0 has shape {x0.shape})"
        )
    return -_batch_mean(cosine_similarity(x0, x1, axis=axis, eps=eps), axis_name)


def _unpack_pair(out: Sequence[ArrayLike], name: str) -> tuple[ArrayLike, ArrayLike]:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"{name} must be a pair (z, p), got {type(out).__name__}")
    return out[0], out[1]


def sym_negative_cosine_similarity_loss(
    out0: Sequence[ArrayLike],
    out1: Sequence[ArrayLike],
    *,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Symmetrized SimSiam loss with stop-gradient on the projections ``z``.

    .. math:: L = -\tfrac12\cos(p_0, \mathrm{sg}(z_1)) - \tfrac12\cos(p_1, \mathrm{sg}(z_0))

    Args:
      out0: ``(z0, p0)``: projection and prediction of view 0, each ``[batch, dim]``.
      out1: ``(z1, p1)`` for view 1.
      axis_name: optional axis; mean over the global batch.

    Returns:
      Scalar loss (lightly's deprecated ``SymNegCosineSimilarityLoss``, eps 1e-8).
    """
    z0, p0 = _unpack_pair(out0, "out0")
    z1, p1 = _unpack_pair(out1, "out1")
    arrays = {n: val.as_float_array(a, n, ndim=2) for n, a in
              (("z0", z0), ("p0", p0), ("z1", z1), ("p1", p1))}
    for n in ("p0", "z1", "p1"):
        val.check_same_shape(arrays["z0"], arrays[n], "z0", n)
    def half(p: jax.Array, z: jax.Array) -> jax.Array:
        return 0.5 * negative_cosine_similarity(
            p, lax.stop_gradient(z), axis=-1, axis_name=axis_name)

    return half(arrays["p0"], arrays["z1"]) + half(arrays["p1"], arrays["z0"])


def _safe_pow(sq: jax.Array, alpha: ArrayLike) -> jax.Array:
    """``(sq)^(alpha/2)`` for ``sq >= 0`` with a finite (zero) gradient at ``sq = 0``."""
    pos = sq > 0
    return jnp.where(pos, jnp.power(jnp.where(pos, sq, 1.0), alpha / 2.0), 0.0)


def alignment_loss(
    x: ArrayLike, y: ArrayLike, *, alpha: ArrayLike = 2.0, axis_name: AxisName = None
) -> jax.Array:
    r"""Alignment ``mean_i ‖x_i − y_i‖^α`` (Wang & Isola; quadra's ``align_loss``).

    Inputs are used as given (normalize them first, as the paper does).

    Args:
      x, y: ``[batch, dim]``.
      alpha: exponent α > 0.
      axis_name: optional axis; mean over the global batch.
    """
    val.check_axis_name(axis_name)
    val.check_in_range(alpha, "alpha", 0.0, None, low_inclusive=False)
    x = val.as_float_array(x, "x", ndim=2)
    y = val.as_float_array(y, "y", ndim=2)
    val.check_same_shape(x, y, "x", "y")
    x, y = upcast(x, y)
    sq = jnp.sum(jnp.square(x - y), axis=1)
    return _batch_mean(_safe_pow(sq, alpha), axis_name)


def uniformity_loss(x: ArrayLike, *, t: ArrayLike = 2.0, axis_name: AxisName = None) -> jax.Array:
    r"""Uniformity ``log mean_{i≠j} exp(−t‖x_i − x_j‖²)`` (Wang & Isola; quadra's ``uniform_loss``).

    Computed from Gram matrices as a masked logsumexp (stable for any t), over the pairs
    of the global batch under ``axis_name``. Defined for a batch of one (no pairs): 0.

    Args:
      x: ``[batch, dim]`` (normalize first, as the paper does).
      t: the kernel scale (quadra / paper default 2; lightly's hypersphere uses 1).
      axis_name: optional axis.
    """
    val.check_axis_name(axis_name)
    t_arr = val.check_scalar_param(t, "t")
    x = val.as_float_array(x, "x", ndim=2)
    (x,) = upcast(x)
    b = x.shape[0]
    n = b * coll.axis_size(axis_name)
    if n < 2:
        return jnp.zeros((), x.dtype)
    if axis_name is None:
        return _pair_lse(x, t_arr.astype(x.dtype)) - math.log(n * (n - 1))
    keys = coll.all_gather(x, axis_name)
    own = coll.own_columns(coll.global_rows(b, axis_name), n)
    lse = masked_logsumexp(-t_arr * sq_dists(x, keys), ~own, axis=1)
    lse = coll.global_logsumexp(jax.nn.logsumexp(lse), axis_name)
    return lse - math.log(n * (n - 1))


@jax.custom_vjp
def _pair_lse(x: jax.Array, t: jax.Array) -> jax.Array:
    """``log Σ_{i≠j} exp(−t‖x_i − x_j‖²)`` over the rows of ``x [n, D]`` (one device).

    The weights ``P_ij = exp(−t·d²_ij − lse)`` of its gradient are symmetric, so the VJP
    is ``dx = −4t·(r ⊙ x − P x)`` (``r`` the row sums of P) and ``dt = −Σ P ⊙ d²``:
    one product and no transpose, where autodiff through a symmetric Gram adds ``g + gᵀ``
    (a transposing pass) and the row logsumexps' own backward passes. Rows are shifted
    by their maxima (stable for any t); the forward pass's shifted ``exp`` is the
    residual, so ``P`` is a per-row rescaling of it (one ``exp`` pass in all)."""
    return _pair_lse_fwd(x, t)[0]


def _pair_lse_fwd(x, t):
    n = x.shape[0]
    d2 = sq_dists(x, x)
    y = jnp.where(coll.own_columns(jnp.arange(n, dtype=jnp.int32), n), -jnp.inf, -t * d2)
    top = reduce_halving(y, 1, jnp.maximum, jnp.max)  # [n, 1]; −inf for a lone row
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.exp(y - top)  # 0 on the diagonal
    rows = jnp.log(jnp.sum(e, axis=1, keepdims=True)) + top
    lse = jax.nn.logsumexp(rows)
    return lse, (x, t, d2, e, top, lse)


def _pair_lse_bwd(res, g):
    x, t, d2, e, top, lse = res
    p = e * jnp.exp(top - lse)  # P_ij = exp(−t·d²_ij − lse): a row rescaling of e
    px = jnp.matmul(p, x, precision=lax.Precision.HIGHEST)
    # the coefficient a runtime scalar: a constant one would be written out as an array
    # the size of x for the fused product (see runtime_scalar)
    dx = runtime_scalar(-4.0 * t * g) * (jnp.sum(p, axis=1)[:, None] * x - px)
    return dx, jnp.reshape(-g * jnp.sum(p * d2), jnp.shape(t)).astype(t.dtype)


_pair_lse.defvjp(_pair_lse_fwd, _pair_lse_bwd)


def hypersphere_loss(
    z_a: ArrayLike,
    z_b: ArrayLike,
    *,
    t: ArrayLike = 1.0,
    lam: ArrayLike = 1.0,
    alpha: ArrayLike = 2.0,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Alignment + uniformity on the hypersphere (lightly's ``HypersphereLoss``).

    .. math:: L = \mathrm{align}_\alpha(\hat z_a, \hat z_b)
              + \lambda\,\tfrac12\left(\mathrm{unif}_t(\hat z_a) + \mathrm{unif}_t(\hat z_b)\right)

    with L2-normalized inputs (eps 1e-12), see :func:`alignment_loss` and
    :func:`uniformity_loss`.

    Differences from lightly: defined for a batch of one (uniformity 0; lightly returns
    NaN) and finite gradients for identical views with ``alpha < 2``.

    References:
      Wang & Isola, `Understanding Contrastive Representation Learning through Alignment
      and Uniformity on the Hypersphere <https://arxiv.org/abs/2005.10242>`_, 2020.
    """
    val.check_scalar_param(lam, "lam")
    z_a = val.as_float_array(z_a, "z_a", ndim=2)
    z_b = val.as_float_array(z_b, "z_b", ndim=2)
    val.check_same_shape(z_a, z_b, "z_a", "z_b")
    x, y = l2_normalize(z_a), l2_normalize(z_b)
    unif = sum(uniformity_loss(v, t=t, axis_name=axis_name) for v in (x, y))
    return alignment_loss(x, y, alpha=alpha, axis_name=axis_name) + lam * unif / 2.0


def koleo_loss(
    x: ArrayLike, *, p: float = 2, eps: float = 1e-8, axis_name: AxisName = None
) -> jax.Array:
    r"""KoLeo (Kozachenko-Leonenko) differential-entropy regularizer (DINOv2).

    .. math:: L = -\frac1N\sum_i \log\big(\lVert \hat x_i - \hat x_{\mathrm{nn}(i)}
              + \epsilon\rVert_p + \epsilon\big)

    with rows L2-normalized (``eps``), the nearest neighbour by cosine similarity among the
    other rows, and lightly's double ``eps`` (torch's ``PairwiseDistance`` adds it to the
    difference, then once more before the log).

    Args:
      x: ``[batch, dim]`` (global batch >= 2).
      p: the norm of the distance (>= 1).
      eps: see above.
      axis_name: optional axis: neighbours are searched over the **global** batch (DINOv3's
        distributed KoLeo; lightly searches each rank's batch) and the mean is global.

    Returns:
      Scalar loss.

    References:
      Sablayrolles et al., `Spreading vectors for similarity search
      <https://arxiv.org/abs/1806.03198>`_, 2019; Oquab et al., DINOv2, 2023.
    """
    val.check_axis_name(axis_name)
    if not isinstance(p, (int, float)) or p < 1:
        raise ValueError(f"p must be a number >= 1, got {p!r}")
    x = val.as_float_array(x, "x", ndim=2)
    b = x.shape[0]
    val.check_min_batch(b * coll.axis_size(axis_name), 2, "KoLeo (a nearest neighbour)",
                        x.shape)
    z = l2_normalize(x, eps=eps)
    keys = coll.all_gather(z, axis_name)
    sim = z @ lax.stop_gradient(keys).T
    sim = jnp.where(coll.own_columns(coll.global_rows(b, axis_name), keys.shape[0]), -2.0,
                    sim)
    nn = argmax_first(lax.stop_gradient(sim), axis=1)
    diff = z - keys[nn] + eps
    if p == 2:
        dist = safe_norm(diff, axis=1)
    else:
        a = jnp.abs(diff)
        pos = jnp.sum(a, axis=1) > 0
        dist = jnp.where(pos, jnp.sum(jnp.where(pos[:, None], a, 1.0) ** p, axis=1) ** (1 / p),
                         0.0)
    return -_batch_mean(jnp.log(dist + eps), axis_name)


# ---- issue 4 (part): quadra's BYOL regression and SimSiam losses ------------------------


def byol_regression_loss(x: ArrayLike, y: ArrayLike, *, axis_name: AxisName = None) -> jax.Array:
    r"""BYOL's regression loss ``2 − 2·mean cos(x, y)`` (quadra ``BYOLRegressionLoss``).

    .. math:: L = \frac{1}{N}\sum_i \big\lVert \hat x_i - \hat y_i \big\rVert^2
              = 2 - \frac{2}{N}\sum_i \langle \hat x_i, \hat y_i\rangle,
              \qquad \hat x = x / \max(\lVert x\rVert, 10^{-12})

    i.e. ``2 + 2 · negative_cosine_similarity(x, y, eps=1e-12)`` (``F.normalize``'s eps).
    No stop-gradient (as quadra's loss; its BYOL module detaches the target ``y``): pass
    ``lax.stop_gradient(target)`` and symmetrize the two views yourself.

    Args:
      x: ``[batch, dim]`` online predictions.
      y: ``[batch, dim]`` targets (momentum encoder projections).
      axis_name: optional axis; the mean over the global batch.

    Returns:
      Scalar loss in ``[0, 4]``.

    References:
      Grill et al., `Bootstrap Your Own Latent
      <https://arxiv.org/abs/2006.07733>`_, 2020 (Eq. 2).
    """
    val.check_axis_name(axis_name)
    xx = val.as_float_array(x, "x", ndim=2)
    yy = val.as_float_array(y, "y", ndim=2)
    val.check_same_shape(xx, yy, "x", "y")
    return 2.0 + 2.0 * negative_cosine_similarity(xx, yy, axis=-1, eps=1e-12,
                                                  axis_name=axis_name)


def simsiam_loss(
    p1: ArrayLike,
    p2: ArrayLike,
    z1: ArrayLike,
    z2: ArrayLike,
    *,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""The SimSiam loss in quadra's argument order (quadra ``SimSIAMLoss``).

    .. math:: L = -\tfrac12\cos(p_1, \mathrm{sg}(z_2)) - \tfrac12\cos(p_2, \mathrm{sg}(z_1))

    (batch means, cosine eps 1e-8) — exactly
    ``sym_negative_cosine_similarity_loss((z1, p1), (z2, p2))``.

    Args:
      p1, p2: ``[batch, dim]`` predictions of the two views.
      z1, z2: ``[batch, dim]`` projections of the two views; **stop-gradient** here.
      axis_name: optional axis; the mean over the global batch.

    Returns:
      Scalar loss in ``[-1, 1]``.

    Differences from quadra: quadra's ``SimSIAMLoss.forward`` does not detach ``z`` (its
    SimSiam module passes ``z.detach()``); here the stop-gradient is part of the loss, as
    in the paper.

    References:
      Chen and He, `Exploring Simple Siamese Representation Learning
      <https://arxiv.org/abs/2011.10566>`_, 2021 (Algorithm 1).
    """
    arrays = [val.as_float_array(a, n, ndim=2)
              for n, a in (("p1", p1), ("p2", p2), ("z1", z1), ("z2", z2))]
    for n, a in zip(("p2", "z1", "z2"), arrays[1:], strict=True):
        val.check_same_shape(arrays[0], a, "p1", n)
    a_p1, a_p2, a_z1, a_z2 = arrays
    return sym_negative_cosine_similarity_loss((a_z1, a_p1), (a_z2, a_p2), axis_name=axis_name)
