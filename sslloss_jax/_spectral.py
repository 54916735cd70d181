"""Spectral losses: MMCR (nuclear norms), EMP-SSL (total coding rate) and FroSSL
(Frobenius norm of the trace-normalized covariance).

Each needs a function of a matrix of the **global** batch (singular values, a
log-determinant, a Frobenius norm). Under ``axis_name`` the matrix is either reduced with
a ``psum`` (the D × D form, already replicated) or built on every participant from the
``all_gather``ed batch (the N × N Gram form, or the centroids of MMCR); in the latter case
each participant contributes ``psum(L) / axis_size``, whose gradient routes back through
the gather's ``psum_scatter`` transpose, so value and gradients are those of one device
holding the global batch. As in :mod:`sslloss_jax._redundancy`, the N × N Gram form is
used when the global batch N is smaller than the dimension D (same nonzero spectrum,
O(N²D) instead of O(ND²)).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sslloss_jax import _collectives as coll
from sslloss_jax import _validation as val
from sslloss_jax._numerics import (
    broadcast_leading,
    cosine_similarity,
    mean_leading,
    nuclear_norm,
    safe_sqrt,
    upcast,
)
from sslloss_jax._redundancy import covariance_sq_sum
from sslloss_jax._types import ArrayLike, AxisName

__all__ = [
    "mmcr_loss",
    "EMPSSLTerms",
    "emp_ssl_terms",
    "emp_ssl_loss",
    "frossl_loss",
]

_Method = Literal["auto", "gram", "feature"]
_METHODS = ("auto", "gram", "feature")


def _check_method(method: object) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def _replicated(value: jax.Array, axis_name: AxisName) -> jax.Array:
    """A value every participant computed from gathered inputs, as ``psum(value) / n``:
    the same value, with the gradient of the global-batch function (see module doc)."""
    return coll.global_mean(value, 1, axis_name)


def mmcr_loss(
    online: ArrayLike,
    momentum: ArrayLike,
    *,
    lmda: ArrayLike = 5e-3,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Maximum Manifold Capacity Representations (MMCR) loss.

    With :math:`z_b = [\text{online}_b; \text{momentum}_b]` (the 2k views of sample b,
    shape ``[2k, dim]``) and the centroid matrix :math:`C` whose rows are
    :math:`c_b = \operatorname{mean}_j z_{b,j}`:

    .. math::
        L = -\lVert C\rVert_* + \lambda\,\frac{1}{N}\sum_{b=1}^{N}\lVert z_b\rVert_*

    where :math:`\lVert\cdot\rVert_*` is the nuclear norm (sum of singular values).

    Args:
      online: ``[batch, k, dim]`` online-network outputs (k augmented views per sample).
      momentum: ``[batch, k, dim]`` momentum-network outputs, same shape. Not detached
        (as lightly): apply ``lax.stop_gradient`` yourself for a momentum encoder.
      lmda: λ >= 0, weight of the per-sample nuclear norms (may be traced).
      axis_name: optional axis. The per-sample nuclear norms are local (averaged over the
        global batch); the centroid matrix's nuclear norm is that of the **gathered**
        ``[N, dim]`` centroids, so the loss is the single-device global-batch loss.

    Returns:
      Scalar loss (>= float32).

    Gradients are finite at repeated singular values and at zero (the SVD is
    differentiated through its singular values only, :func:`~sslloss_jax._numerics.nuclear_norm`).
    Each sample's ``[2k, dim]`` views are first reduced to their ``2k × 2k`` triangular
    factor (for 2k <= 16 and 4k <= dim), whose batched SVD is cheap on a GPU too.
    No L2 normalization is applied (the paper normalizes the projections; do it in the
    model, as with lightly).

    Differences from lightly ``MMCRLoss``: same value; a scalar; under ``axis_name`` the
    centroid nuclear norm is over the global batch (lightly has no distributed mode).

    References:
      Yerxa et al., `Learning Efficient Coding of Natural Images with Maximum Manifold
      Capacity Representations <https://arxiv.org/abs/2303.03307>`_, 2023.
    """
    val.check_axis_name(axis_name)
    lam = val.check_in_range(lmda, "lmda", 0.0, None)
    online = val.as_float_array(online, "online", ndim=3)
    momentum = val.as_float_array(momentum, "momentum", ndim=3)
    val.check_same_shape(online, momentum, "online", "momentum")
    online, momentum = upcast(online, momentum)
    z = jnp.concatenate([online, momentum], axis=1)  # (B, 2k, D)
    per_sample = coll.global_mean(jnp.sum(nuclear_norm(z, factor_short=True)), z.shape[0],
                                  axis_name)
    centroids = coll.all_gather(jnp.mean(z, axis=1), axis_name)  # (N, D)
    return -_replicated(nuclear_norm(centroids), axis_name) + lam * per_sample


class EMPSSLTerms(NamedTuple):
    """EMP-SSL terms; the official loss is ``inv_coef·invariance − coding_rate``."""

    coding_rate: jax.Array  # mean_v ½·logdet(I + D/(N·ε)·z_vᵀz_v) (>= 0)
    invariance: jax.Array  # −mean_{v,n} cos(z_vn, mean_v z_vn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _half_logdet_gram(z: jax.Array, alpha: jax.Array, feature: bool) -> jax.Array:
    """``½ logdet(I + α·M)`` per leading index, for ``M = zᵀz`` (``feature``) or ``z zᵀ``
    of ``z [..., N, D]``, as the log-diagonal of the Cholesky factor ``L`` of ``A``.

    ``I + α·M`` has every eigenvalue >= 1 (M is positive semi-definite and α > 0), so the
    factorization cannot fail in float32 and ``A⁻¹`` is bounded by 1 whatever M is
    (repeated or zero eigenvalues included). The VJP is ``α·z A⁻¹`` (``α·A⁻¹ z``) and
    ``½ (n − tr A⁻¹)/α`` for α, with ``A⁻¹ = L⁻ᵀ L⁻¹`` from one triangular inversion:
    autodiff of the Cholesky factorization costs about twice as much (EMP-SSL, 4 views
    of ``256×128``: 2.0 ms against 1.3 ms for the coding rate, jax 0.10, 2 cores).
    """
    return _half_logdet_gram_fwd(z, alpha, feature)[0]


def _half_logdet_gram_fwd(z, alpha, feature):
    zt = jnp.swapaxes(z, -1, -2)
    m = zt @ z if feature else z @ zt
    eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape)
    chol = jnp.linalg.cholesky(eye + alpha * m)
    value = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    return value, (z, alpha, chol)


def _half_logdet_gram_bwd(feature, res, g):
    z, alpha, chol = res
    eye = jnp.broadcast_to(jnp.eye(chol.shape[-1], dtype=chol.dtype), chol.shape)
    chol_inv = lax.linalg.triangular_solve(chol, eye, left_side=True, lower=True)
    a_inv = jnp.swapaxes(chol_inv, -1, -2) @ chol_inv
    gz = z @ a_inv if feature else a_inv @ z
    trace = jnp.trace(a_inv, axis1=-2, axis2=-1)
    g_alpha = jnp.sum(g * 0.5 * (a_inv.shape[-1] - trace)) / alpha
    return (g[..., None, None] * alpha) * gz, jnp.reshape(g_alpha, jnp.shape(alpha))


_half_logdet_gram.defvjp(_half_logdet_gram_fwd, _half_logdet_gram_bwd)


def _coding_rate(z: jax.Array, eps: ArrayLike, axis_name: AxisName, method: str):
    """mean_v ½ logdet(I + D/(N ε) z_vᵀ z_v) for z of shape (V, B, D), global batch N.

    The log-determinant of ``I + α·M`` for the Gram matrix M (V × N × N, from the gathered
    views) or the covariance (V × D × D, psum-reduced), whichever is smaller, as twice the
    log-diagonal of its Cholesky factor (see :func:`_half_logdet_gram`; under
    ``axis_name`` by autodiff through the collectives). Its gradient ``α·(I + α·M)⁻¹``
    stays finite for any M, without the eigendecomposition an eigenvalue form needs.
    """
    v, b, d = z.shape
    n = b * coll.axis_size(axis_name)
    alpha = jnp.asarray(d / (n * eps), z.dtype)
    gram = method == "gram" or (method == "auto" and n < d)
    if axis_name is None:
        return jnp.mean(_half_logdet_gram(z, alpha, not gram))

    def half_logdet(m):
        chol = jnp.linalg.cholesky(jnp.eye(m.shape[-1], dtype=m.dtype)[None] + alpha * m)
        return jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)

    if gram:
        zg = jnp.swapaxes(coll.all_gather(jnp.swapaxes(z, 0, 1), axis_name), 0, 1)  # (V, N, D)
        gram_m = jnp.einsum("vnd,vmd->vnm", zg, zg)
        return _replicated(jnp.mean(half_logdet(gram_m)), axis_name)
    cov = coll.psum(jnp.einsum("vbd,vbe->vde", z, z), axis_name)
    return jnp.mean(half_logdet(cov))


def emp_ssl_terms(
    z_views: ArrayLike | list | tuple,
    *,
    tcr_eps: ArrayLike = 0.2,
    axis_name: AxisName = None,
    method: _Method = "auto",
) -> EMPSSLTerms:
    """The two EMP-SSL terms, unweighted; see :func:`emp_ssl_loss` for the arguments.

    lightly's ``EMPSSLLoss(tcr_eps, inv_coef)(z_views)`` equals
    ``t.coding_rate + inv_coef * t.invariance``.
    """
    val.check_axis_name(axis_name)
    _check_method(method)
    eps = val.check_in_range(tcr_eps, "tcr_eps", 0.0, None, low_inclusive=False)
    z = val.stack_views(z_views, "z_views")
    if z.shape[0] == 0:
        raise ValueError("z_views must contain at least one view, got 0")
    (z,) = upcast(z)
    cos = cosine_similarity(z, broadcast_leading(mean_leading(z), z.shape[0]), axis=-1)  # (V, B)
    invariance = -coll.global_mean(jnp.sum(cos), cos.size, axis_name)
    return EMPSSLTerms(_coding_rate(z, eps, axis_name, method), invariance)


def emp_ssl_loss(
    z_views: ArrayLike | list | tuple,
    *,
    tcr_eps: ArrayLike = 0.2,
    inv_coef: ArrayLike = 200.0,
    tcr_coef: ArrayLike = 1.0,
    axis_name: AxisName = None,
    method: _Method = "auto",
) -> jax.Array:
    r"""EMP-SSL: total coding rate plus multi-patch invariance, with the **official** sign.

    For V views (patches) :math:`z_v` of shape ``[N, D]`` and :math:`\bar z_n =
    \operatorname{mean}_v z_{v,n}` (not normalized):

    .. math::
        R(z_v) = \tfrac12\log\det\Big(I_D + \frac{D}{N\epsilon} z_v^\top z_v\Big),\qquad
        L = \lambda\cdot\Big(-\frac{1}{VN}\sum_{v,n}\cos(z_{v,n}, \bar z_n)\Big)
            - \gamma\cdot\frac1V\sum_v R(z_v)

    with λ = ``inv_coef`` and γ = ``tcr_coef``: the coding rate is **maximized** (the
    official ``TotalCodingRate`` returns ``−½ logdet``), so spread embeddings score
    better than collapsed ones. ε is not squared (as the official code and lightly).
    ``logdet(I_D + α zᵀz) = logdet(I_N + α z zᵀ)``, so the N × N Gram form is used when
    N < D.

    Args:
      z_views: V views, a sequence of ``[batch, dim]`` arrays or one ``[V, batch, dim]``
        array. Not normalized here (the official model L2-normalizes its outputs).
      tcr_eps: ε > 0 of the coding rate (may be traced).
      inv_coef: λ, weight of the invariance term (may be traced).
      tcr_coef: γ, weight of the coding-rate term (the official ``--tcr``, 1). **To
        reproduce lightly's value pass** ``tcr_coef=-1.0`` (lightly adds the coding rate,
        which rewards collapse; see "Differences").
      axis_name: optional axis; the coding rate is that of the global batch (N and
        ``zᵀz`` over all participants) and the invariance term is the global mean.
      method: ``"auto"`` (Gram when the global N < D), ``"gram"`` or ``"feature"``.

    Returns:
      Scalar loss (>= float32). :func:`emp_ssl_terms` returns the unweighted terms.

    Differences from lightly ``EMPSSLLoss``: the coding-rate term enters with the
    official code's negative sign (lightly computes ``+R + λ·inv``, a sign error that
    favours collapse); ``tcr_coef=-1.0`` gives lightly's value exactly. Under
    ``axis_name`` the coding rate uses the global batch (lightly has no distributed mode).

    References:
      Tong et al., `EMP-SSL: Towards Self-Supervised Learning in One Training Epoch
      <https://arxiv.org/abs/2304.03977>`_, 2023 (official code: tsb0601/EMP-SSL).
    """
    lam = val.check_scalar_param(inv_coef, "inv_coef")
    gamma = val.check_scalar_param(tcr_coef, "tcr_coef")
    t = emp_ssl_terms(z_views, tcr_eps=tcr_eps, axis_name=axis_name, method=method)
    return lam * t.invariance - gamma * t.coding_rate


def frossl_loss(
    z_views: ArrayLike | list | tuple,
    *,
    invariance_weight: ArrayLike = 1.0,
    axis_name: AxisName = None,
    method: _Method = "auto",
) -> jax.Array:
    r"""FroSSL: log Frobenius norm of each view's trace-normalized covariance plus a
    mean-view invariance term.

    Each view is L2-normalized **along the batch** (every feature column has unit norm
    over the global batch), :math:`\bar z = \operatorname{mean}_v z_v`, and with
    :math:`G_v = z_v^\top z_v` (or the same-spectrum :math:`z_v z_v^\top`):

    .. math::
        L = \sum_v 2\log\frac{\lVert G_v\rVert_F}{\operatorname{sg}(\operatorname{tr} G_v)}
          + w\sum_v V D\,\operatorname{mse}(z_v, \bar z)

    (summed over views, not averaged; the trace is stop-gradient as lightly's
    ``.item()``, and equals D when no column is zero).

    Args:
      z_views: V >= 2 views, a sequence of ``[batch, dim]`` arrays or ``[V, batch, dim]``.
      invariance_weight: w (may be traced).
      axis_name: optional axis; column norms, covariances and the mse run over the global
        batch (Gram form of the gathered views when the global N < D, else a psum of the
        D × D matrices).
      method: ``"auto"``, ``"gram"`` or ``"feature"``, as in :func:`barlow_twins_loss`.

    Returns:
      Scalar loss (>= float32).

    Differences from lightly ``FroSSLLoss``: an all-zero view gives a finite value (its
    ratio is taken as 1: ``‖G‖_F`` and the trace are clamped at 1e-12; lightly returns
    NaN); under ``axis_name`` all statistics are global (lightly has no distributed mode).

    References:
      Skean et al., `FroSSL: Frobenius Norm Minimization for Self-Supervised Learning
      <https://arxiv.org/abs/2310.02903>`_, 2024.
    """
    val.check_axis_name(axis_name)
    _check_method(method)
    w = val.check_scalar_param(invariance_weight, "invariance_weight")
    z = val.stack_views(z_views, "z_views")
    if z.shape[0] < 2:
        raise ValueError(f"z_views must contain at least two views, got {z.shape[0]}")
    (z,) = upcast(z)
    v, b, d = z.shape
    col_sq = coll.psum(jnp.sum(jnp.square(z), axis=1, keepdims=True), axis_name)  # (V, 1, D)
    z = z / jnp.maximum(safe_sqrt(col_sq), 1e-12)  # torch F.normalize(dim=0)

    frob_sq = jax.vmap(lambda zv: covariance_sq_sum(zv, axis_name, method=method))(z)  # (V,)
    trace = coll.psum(jnp.sum(jnp.square(z), axis=(1, 2)), axis_name)  # (V,)
    eps = 1e-12
    reg = jnp.log(jnp.maximum(frob_sq, eps**2)) - 2.0 * jnp.log(
        jnp.maximum(lax.stop_gradient(trace), eps))
    sq_dev = jnp.sum(jnp.square(z - broadcast_leading(mean_leading(z), v)))
    invariance = v * d * coll.global_mean(sq_dev, b * d, axis_name)
    return jnp.sum(reg) + w * invariance
