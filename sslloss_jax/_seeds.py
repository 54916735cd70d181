"""Losses of the seed libraries that fit no other family: nidl's InfoNCE and y-Aware
InfoNCE (kernel-weighted positives from metadata) and quadra's IDMM (instance
discrimination with label smoothing)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sslloss_jax import _collectives as coll
from sslloss_jax import _validation as val
from sslloss_jax._contrastive import _candidates, _check_labels, ntxent_loss
from sslloss_jax._numerics import (
    l2_normalize,
    masked_logsumexp,
    safe_norm,
    symmetric_lse_linear,
    upcast,
)
from sslloss_jax._tiled import DEFAULT_BLOCK_SIZE, _dense_self_mask
from sslloss_jax._types import ArrayLike, AxisName

__all__ = ["infonce_loss", "y_aware_infonce_loss", "idmm_loss", "KERNELS"]


def _check_views(z1: ArrayLike, z2: ArrayLike, axis_name: AxisName):
    val.check_axis_name(axis_name)
    a = val.as_float_array(z1, "z1", ndim=2)
    b = val.as_float_array(z2, "z2", ndim=2)
    val.check_same_shape(a, b, "z1", "z2")
    return a, b


def infonce_loss(
    z1: ArrayLike,
    z2: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    implementation: str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""nidl's ``InfoNCE``: exactly :func:`ntxent_loss` with nidl's names and τ = 0.1.

    .. math::
        L = \frac{1}{2N}\sum_{i=1}^{2N}\Big[-\frac{s_{i,p(i)}}{\tau}
            + \log\sum_{k \ne i} e^{s_{ik}/\tau}\Big]

    over the 2N rows of ``[z1; z2]`` (cosine similarities ``s``; positive ``p(i)``: the
    other view). nidl masks the self-similarity with ``-9e15`` and finds the positives by
    rolling the identity by N; that is NT-Xent over ``2N − 2`` negatives.

    Args:
      z1, z2: ``[batch, dim]`` embeddings of the two views.
      temperature: τ (nidl's default 0.1; may be traced).
      axis_name: optional axis; negatives from the global batch, global mean (nidl has no
        distributed mode).
      implementation, block_size: dense or memory-linear tiled / ring path (static), as in
        :func:`ntxent_loss`.

    Returns:
      Scalar loss.

    References:
      van den Oord et al., `Representation Learning with Contrastive Predictive Coding
      <https://arxiv.org/abs/1807.03748>`_, 2018; Chen et al., SimCLR, 2020.
    """
    a, b = _check_views(z1, z2, axis_name)
    return ntxent_loss(a, b, temperature=temperature, implementation=implementation,
                       block_size=block_size, axis_name=axis_name)


def _epanechnikov(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.abs(x) < 1, 1.0 - jnp.square(x), 0.0)


def _linear(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.abs(x) < 1, 1.0 - x, 0.0)


def _cosine(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.abs(x) < 1, jnp.cos(0.5 * math.pi * x), 0.0)


#: nidl's ``KernelMetric`` kernels, functions of the (bandwidth-scaled) distance.
KERNELS = {
    "gaussian": lambda x: jnp.exp(-0.5 * jnp.square(x)),
    "epanechnikov": _epanechnikov,
    "exponential": lambda x: jnp.exp(-x),
    "linear": _linear,
    "cosine": _cosine,
}


def _check_metadata(labels: ArrayLike, n: int, z1: jax.Array) -> jax.Array:
    """Metadata ``[batch]`` or ``[batch, n_labels]`` (floating or integer) as ``(B, L)``."""
    if isinstance(labels, (list, tuple)):
        raise TypeError(f"labels must be an array, got a {type(labels).__name__}; use "
                        "jnp.asarray(labels)")
    y = jnp.asarray(labels)
    if not (jnp.issubdtype(y.dtype, jnp.floating) or jnp.issubdtype(y.dtype, jnp.integer)):
        raise TypeError(f"labels must be real numbers (metadata), got dtype {y.dtype}")
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise ValueError(
            f"labels must have shape ({n},) or ({n}, n_labels) (one row per sample of z1, "
            f"shape {z1.shape}), got {y.shape}"
        )
    return y.reshape(n, -1)


def _inverse_sqrt_bandwidth(bandwidth: ArrayLike, n_labels: int, dtype) -> jax.Array:
    """``1/sqrt(h)`` per metadata feature (0 where ``h = 0``, as nidl), shape ``[L]``."""
    if isinstance(bandwidth, str):
        raise ValueError(
            f"bandwidth must be a number or a vector of n_labels={n_labels} numbers, got "
            f"{bandwidth!r} (estimate 'scott'/'silverman' bandwidths on the training set "
            "once, e.g. with nidl's KernelMetric, and pass the result)"
        )
    h = jnp.asarray(bandwidth)
    if h.ndim > 1 or (h.ndim == 1 and h.shape[0] != n_labels):
        raise ValueError(
            f"bandwidth must be a scalar or have shape ({n_labels},) (one per metadata "
            f"feature), got shape {h.shape}"
        )
    if not (jnp.issubdtype(h.dtype, jnp.floating) or jnp.issubdtype(h.dtype, jnp.integer)):
        raise TypeError(f"bandwidth must be real, got dtype {h.dtype}")
    try:
        concrete = np.asarray(h)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        concrete = None
    if concrete is not None and (np.any(concrete < 0) or not np.all(np.isfinite(concrete))):
        raise ValueError(f"bandwidth must be finite and >= 0, got {concrete}")
    h = jnp.broadcast_to(h.astype(dtype), (n_labels,))
    pos = h > 0
    return jnp.where(pos, lax.rsqrt(jnp.where(pos, h, 1.0)), 0.0)


def y_aware_infonce_loss(
    z1: ArrayLike,
    z2: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    kernel: str = "gaussian",
    bandwidth: ArrayLike = 1.0,
    temperature: ArrayLike = 0.1,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""y-Aware InfoNCE (nidl ``YAwareInfoNCE``): InfoNCE whose positives are weighted by
    a kernel on continuous metadata ``y`` (e.g. age).

    Over the 2N rows of ``[z1; z2]`` (metadata ``y`` repeated for both views), with
    :math:`s_{ij}` the cosine similarities and
    :math:`\log p_{ij} = s_{ij}/\tau - \log\sum_{k\ne i} e^{s_{ik}/\tau}`:

    .. math::
        w_{ij} = K\big(\lVert H^{-1/2}(y_i - y_j)\rVert\big)\,[i \ne j],\qquad
        L = -\frac{1}{N}\sum_{i=1}^{2N}\sum_{j=1}^{2N}
            \frac{w_{ij}}{\sum_{k} w_{jk}}\log p_{ij}

    with ``H = diag(bandwidth)``. **The weights are divided by the sum of row j (the
    column's sum), not of row i**: this is what nidl and the official y-Aware code
    compute (``weights /= weights.sum(axis=1)`` broadcasts over the last axis), although
    their docstring formula normalizes by row i; the JAX version reproduces the code.
    The scale is 1/N for 2N anchors, so a kernel that is non-zero only between the two
    views of an image gives 2 × :func:`infonce_loss`. With ``labels=None`` the loss is
    plain :func:`infonce_loss` (as nidl).

    Kernels (of the scaled distance ``x >= 0``, :data:`KERNELS`): ``gaussian``
    ``exp(−x²/2)``, ``epanechnikov`` ``(1 − x²)·[x < 1]``, ``exponential`` ``exp(−x)``,
    ``linear`` ``(1 − x)·[x < 1]``, ``cosine`` ``cos(πx/2)·[x < 1]``. Every kernel is 1 at
    0, so each column sum is >= 1 (the other view of the same image).

    Args:
      z1, z2: ``[batch, dim]`` embeddings of the two views (rows are L2-normalized).
      labels: ``[batch]`` or ``[batch, n_labels]`` metadata (floating or integer;
        stop-gradient), or ``None``.
      kernel: one of ``gaussian``, ``epanechnikov``, ``exponential``, ``linear``,
        ``cosine`` (static).
      bandwidth: the diagonal of H (σ² per metadata feature): a scalar or an
        ``[n_labels]`` vector, >= 0 (a 0 entry ignores that feature, as nidl); may be
        traced.
      temperature: τ (0.1; may be traced).
      axis_name: if set, keys and metadata are all-gathered; the weights and their
        column sums are those of the global batch and the loss is the global one.

    Returns:
      Scalar loss (float32, or float64 for float64 embeddings).

    Differences from nidl: computed in JAX (nidl computes the weights in NumPy on the CPU
    with scikit-learn, which is neither jittable nor differentiable through a traced
    bandwidth); the distances are ``‖y_i − y_j‖`` computed directly (scikit-learn's
    ``‖a‖² + ‖b‖² − 2ab`` form can leave ~1e-8 instead of 0 between equal multivariate
    labels); ``'scott'``/``'silverman'`` bandwidths and a full 2-D H are not supported
    (estimate them once on the training set and pass the diagonal); a distributed mode.

    References:
      Dufumier et al., `Contrastive Learning with Continuous Proxy Meta-Data for 3D MRI
      Classification <https://arxiv.org/abs/2106.08808>`_, MICCAI 2021.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {tuple(KERNELS)}, got {kernel!r}")
    a, b = _check_views(z1, z2, axis_name)
    if labels is None:
        return infonce_loss(a, b, temperature=temperature, axis_name=axis_name)
    val.check_temperature(temperature)
    y = _check_metadata(labels, a.shape[0], a)
    a, b = upcast(a, b)
    dtype = a.dtype
    y = lax.stop_gradient(y.astype(dtype)) * _inverse_sqrt_bandwidth(
        bandwidth, y.shape[1], dtype)[None, :]
    k_fn = KERNELS[kernel]

    bl = a.shape[0]
    n = bl * coll.axis_size(axis_name)
    y_all = coll.all_gather(y, axis_name)  # (N, L)
    k = k_fn(safe_norm(y[:, None, :] - y_all[None, :, :], axis=-1))  # (B, N) sample kernel
    self_k = jnp.take_along_axis(k, coll.global_rows(bl, axis_name)[:, None], axis=1)[:, 0]
    # Σ_k w_jk of a row j (either view of sample j): both views' kernels minus the self term
    col_sum = coll.all_gather(2.0 * jnp.sum(k, axis=1) - self_k, axis_name)  # (N,)
    anchors = l2_normalize(jnp.concatenate([a, b], axis=0))  # (2B, D)
    t = jnp.asarray(temperature, dtype)
    rows = jnp.arange(2 * bl, dtype=jnp.int32)
    if axis_name is None:
        # Σ_ij w_ij log p_ij = Σ_i lin_i − r_i lse_i with w_ij = k_ij / c_j, k symmetric:
        # the logits' one-product backward pass (symmetric_lse_linear)
        inv_c = 1.0 / col_sum
        # the views' blocks concatenated, not tiled (see symmetric_lse_linear)
        lse, lin = symmetric_lse_linear(anchors, t, _dense_self_mask, (rows, None),
                                        jnp.block([[k, k], [k, k]]),
                                        jnp.concatenate([inv_c, inv_c]))
        r = 2.0 * (k @ inv_c) - self_k * inv_c  # Σ_{j≠i} w_ij, for either view's row
        r = jnp.concatenate([r, r])
        return -(jnp.sum(lin) - jnp.sum(r * lse)) / n

    w = k / col_sum[None, :]
    weights = jnp.block([[w, w], [w, w]])  # (2B, 2N), rows [z1; z2] local
    keys = l2_normalize(jnp.concatenate([coll.all_gather(a, axis_name),
                                         coll.all_gather(b, axis_name)], axis=0))
    sample = coll.axis_index(axis_name) * bl + rows % bl
    mask = _candidates((rows // bl) * n + sample, None, 2 * n)  # all but the anchor itself
    logits = (anchors @ keys.T) / t
    log_p = logits - masked_logsumexp(logits, mask, axis=1)[:, None]
    total = jnp.sum(jnp.where(mask, weights * log_p, 0.0))
    return -coll.global_mean(total, bl, axis_name)


def idmm_loss(
    p: ArrayLike,
    y: ArrayLike,
    *,
    smoothing: ArrayLike = 0.1,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""IDMM's instance-discrimination loss: cross-entropy with label smoothing on
    instance labels (quadra ``IDMMLoss``, i.e. ``F.cross_entropy(p, y, label_smoothing)``).

    .. math::
        L = \frac{1}{N}\sum_i\Big[-(1-\varepsilon)\log\operatorname{softmax}(p_i)_{y_i}
            - \frac{\varepsilon}{K}\sum_{k=1}^{K}\log\operatorname{softmax}(p_i)_k\Big]

    Args:
      p: ``[batch, num_classes]`` logits (one class per training instance in IDMM).
      y: ``[batch]`` integer instance labels in ``[0, num_classes)``; an out-of-range
        label gives a NaN loss (values cannot be checked at trace time).
      smoothing: ε in [0, 1] (0.1; may be traced).
      axis_name: optional axis; the mean over the global batch.

    Returns:
      Scalar loss (>= float32, log-softmax in >= float32).

    Differences from quadra/torch: no ``ignore_index`` (torch skips labels equal to
    −100) and no class weights.

    References:
      Xu et al., `Improving Instance Discrimination via Mixup and Metric Learning
      <https://arxiv.org/abs/2201.10728>`_, 2022 (IDMM).
    """
    val.check_axis_name(axis_name)
    eps = val.check_in_range(smoothing, "smoothing", 0.0, 1.0)
    (logits,) = upcast(val.as_float_array(p, "p", ndim=2))
    labels = _check_labels(y, "y", logits, "p")
    log_p = jax.nn.log_softmax(logits, axis=1)
    nll = -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=1,
                               mode="fill", fill_value=jnp.nan)[:, 0]
    eps = jnp.asarray(eps, logits.dtype)
    per_sample = (1.0 - eps) * nll - eps * jnp.mean(log_p, axis=1)
    return coll.global_mean(jnp.sum(per_sample), logits.shape[0], axis_name)
