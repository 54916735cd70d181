"""TiCo: transformation invariance and covariance contrast, with an explicit covariance state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sslloss_jax import _collectives as coll
from sslloss_jax import _validation as val
from sslloss_jax._numerics import l2_normalize
from sslloss_jax._types import ArrayLike, AxisName

__all__ = ["TiCoState", "init_tico_state", "tico_loss"]


class TiCoState(NamedTuple):
    """State of the TiCo loss.

    Attributes:
      covariance: ``[dim, dim]`` running (EMA) second-moment matrix of the normalized
        first-branch embeddings (lightly's ``TiCoLoss.C``, a plain attribute there).
    """

    covariance: jax.Array


@jax.custom_vjp
def _quadratic_form_sum(z: jax.Array, c: jax.Array) -> jax.Array:
    """``Σ_n z_nᵀ C z_n`` for a symmetric, constant (stop-gradient) ``C``.

    The backward pass reuses the forward's ``Z C``: ``dZ = 2·g·Z C``, one ``N·D²`` matmul
    in all where autodiff of ``sum((Z C) ⊙ Z)`` needs a second one for ``(g Z) Cᵀ``.
    """
    return jnp.sum((z @ c) * z)


def _quadratic_form_fwd(z, c):
    zc = z @ c
    return jnp.sum(zc * z), zc


def _quadratic_form_bwd(zc, g):
    return 2 * g * zc, jnp.zeros((zc.shape[1],) * 2, zc.dtype)


_quadratic_form_sum.defvjp(_quadratic_form_fwd, _quadratic_form_bwd)


def init_tico_state(dim: int, dtype: jnp.dtype = jnp.float32) -> TiCoState:
    """A zero ``[dim, dim]`` covariance (lightly initializes it lazily to zeros)."""
    val.check_state_spec(dtype, dim=dim)
    return TiCoState(jnp.zeros((dim, dim), dtype))


def tico_loss(
    z_a: ArrayLike,
    z_b: ArrayLike,
    state: TiCoState,
    *,
    beta: ArrayLike = 0.9,
    rho: ArrayLike = 8.0,
    update_covariance_matrix: bool = True,
    axis_name: AxisName = None,
) -> tuple[jax.Array, TiCoState]:
    r"""TiCo loss.

    .. math::
        C' = \beta C + (1-\beta)\,\mathrm{sg}\Big(\frac{1}{N}\hat z_a^\top \hat z_a\Big),\qquad
        L = 1 - \frac1N\sum_n \langle \hat z_{a,n}, \hat z_{b,n}\rangle
            + \frac{\rho}{N}\sum_n \hat z_{a,n}^\top C' \hat z_{a,n}

    with L2-normalized rows. The **current** step already uses the blended covariance
    ``C'`` (as lightly); the state is updated to ``C'`` afterwards (stop-gradient) when
    ``update_covariance_matrix`` is True. ``C'`` is a constant for the gradient (lightly's
    buffer is detached too), which lets the backward pass reuse the forward's ``ẑ_a C'``.

    Args:
      z_a, z_b: ``[batch, dim]`` embeddings of the two branches (global batch >= 2).
        ``z_b`` is not detached (as lightly; it usually comes from a momentum encoder).
      state: :class:`TiCoState` with a ``[dim, dim]`` covariance.
      beta: EMA coefficient in [0, 1] (may be traced).
      rho: weight of the covariance-contrast term (may be traced).
      update_covariance_matrix: static; False returns the state unchanged.
      axis_name: optional axis; ``C'`` and both means are over the global batch, so the
        loss and the new state equal the single-device global-batch ones on every device.

    Returns:
      ``(loss, new_state)``.

    References:
      Zhu et al., `TiCo: Transformation Invariance and Covariance Contrast for
      Self-Supervised Visual Representation Learning <https://arxiv.org/abs/2206.10698>`_,
      2022.
    """
    val.check_axis_name(axis_name)
    val.check_in_range(beta, "beta", 0.0, 1.0)
    val.check_scalar_param(rho, "rho")
    z_a = val.as_float_array(z_a, "z_a", ndim=2)
    z_b = val.as_float_array(z_b, "z_b", ndim=2)
    val.check_same_shape(z_a, z_b, "z_a", "z_b")
    b, d = z_a.shape
    n = b * coll.axis_size(axis_name)
    val.check_min_batch(n, 2, "TiCo", z_a.shape)
    if not isinstance(state, TiCoState):
        raise TypeError(f"state must be a TiCoState (see init_tico_state), got {type(state)}")
    if jnp.shape(state.covariance) != (d, d):
        raise ValueError(
            f"state.covariance must have shape ({d}, {d}), got {jnp.shape(state.covariance)}"
        )
    za, zb = l2_normalize(z_a), l2_normalize(z_b)
    cov_old = jnp.asarray(state.covariance)
    batch_cov = lax.stop_gradient(coll.psum(za.T @ za, axis_name) / n)
    cov = beta * cov_old.astype(za.dtype) + (1 - beta) * batch_cov
    invariance = 1.0 - coll.global_mean(jnp.sum(za * zb), b, axis_name)
    contrast = coll.global_mean(_quadratic_form_sum(za, lax.stop_gradient(cov)), b, axis_name)
    loss = invariance + rho * contrast
    new_state = TiCoState(cov.astype(cov_old.dtype)) if update_covariance_matrix else state
    return loss, new_state
