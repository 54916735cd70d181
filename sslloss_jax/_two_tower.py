"""Two-tower (image-text style) contrastive losses: CLIP's bidirectional InfoNCE and SigLIP's
pairwise sigmoid loss.

Both take two aligned ``[batch, dim]`` arrays (row i of ``z_a`` and row i of ``z_b`` are a
positive pair; every other pairing is a negative) and a learnable scale. Under ``axis_name``
each device scores its local rows against the all-gathered rows of the other tower (with
gradient), so values and gradients are those of the global batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sslloss_jax import _collectives as coll
from sslloss_jax import _tiled as tiled
from sslloss_jax import _validation as val
from sslloss_jax._numerics import l2_normalize, masked_logsumexp, upcast
from sslloss_jax._types import ArrayLike, AxisName

__all__ = ["clip_loss", "siglip_loss"]

#: CLIP's initial temperature (Radford et al. 2021; open_clip's ``logit_scale`` init is
#: ``log(1 / 0.07)``).
_CLIP_TEMPERATURE = 0.07
#: SigLIP's initial log scale, ``t = log 10`` (Zhai et al. 2023; big_vision's
#: ``temperature_init=10``). The initial bias is −10.
_SIGLIP_LOG_SCALE = math.log(10.0)


def _check_towers(z_a: ArrayLike, z_b: ArrayLike, axis_name: AxisName,
                  normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Validates two aligned ``[batch, dim]`` towers; returns them in the common >= float32
    compute dtype, L2-normalized if ``normalize``."""
    val.check_axis_name(axis_name)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a Python bool (static), got {normalize!r}")
    a = val.as_float_array(z_a, "z_a", ndim=2)
    b = val.as_float_array(z_b, "z_b", ndim=2)
    val.check_same_shape(a, b, "z_a", "z_b")
    a, b = upcast(a, b)
    if normalize:
        a, b = l2_normalize(a), l2_normalize(b)
    return a, b


def clip_loss(
    z_a: ArrayLike,
    z_b: ArrayLike,
    *,
    temperature: ArrayLike | None = None,
    logit_scale: ArrayLike | None = None,
    normalize: bool = True,
    implementation: str = "auto",
    block_size: int = tiled.DEFAULT_BLOCK_SIZE,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""CLIP's symmetric (bidirectional) InfoNCE loss of two towers.

    With :math:`\hat a_i, \hat b_j` the L2-normalized rows and :math:`s` the logit scale,
    the logits are :math:`L_{ij} = s\,\langle \hat a_i, \hat b_j\rangle` and each row is
    classified against the columns and each column against the rows:

    .. math::
        L = \frac{1}{2N}\sum_{i=1}^{N}\Big[
            \Big(\log\sum_j e^{L_{ij}} - L_{ii}\Big)
          + \Big(\log\sum_j e^{L_{ji}} - L_{ii}\Big)\Big]

    i.e. ``(CE(L, arange(N)) + CE(Lᵀ, arange(N))) / 2`` (open_clip ``ClipLoss``, big_vision
    ``bidirectional_contrastive_loss``).

    The scale is given by **exactly one** of ``temperature`` (``s = 1/τ``) or
    ``logit_scale`` (``s`` itself, *already exponentiated*: open_clip and CLIP keep a
    parameter ``log s`` initialised to ``log(1/0.07)`` and pass ``logit_scale.exp()``; pass
    ``jnp.exp(log_scale)`` here). With neither, ``temperature=0.07`` (CLIP's
    initialisation, ``s ≈ 14.29``). Both may be traced scalars; ``logit_scale`` receives a
    gradient, so it can be learned (clamp it to at most 100 outside, as CLIP does).

    Args:
      z_a: ``[batch, dim]`` first tower (e.g. image embeddings).
      z_b: ``[batch, dim]`` second tower (e.g. text embeddings); row i pairs with ``z_a[i]``.
      temperature: τ (``|τ| < 1e-8`` rejected); mutually exclusive with ``logit_scale``.
      logit_scale: the multiplicative scale ``s`` (a finite scalar, may be traced).
      normalize: L2-normalize the rows (static; default True). Pass False for embeddings
        that are normalized already (the loss is then a plain dot-product InfoNCE).
      axis_name: if set, ``z_a``/``z_b`` are this device's shard. Each direction scores
        the local rows against the all-gathered other tower (``a_local·b_allᵀ`` and
        ``b_local·a_allᵀ``, open_clip's ``local_loss=True, gather_with_grad=True``); the
        gathered columns keep their gradient (``all_gather`` transposes to a
        reduce-scatter), so loss and gradients equal the global-batch ones.

      implementation, block_size: ``"auto"``, ``"dense"`` or ``"tiled"`` (memory linear in
        the batch; a ring of devices under ``axis_name``) and the tile edge, static, as in
        :func:`~sslloss_jax.ntxent_loss`.

    Returns:
      Scalar loss (float32, or float64 for float64 inputs).

    References:
      Radford et al., `Learning Transferable Visual Models From Natural Language
      Supervision <https://arxiv.org/abs/2103.00020>`_, 2021 (Figure 3).
    """
    if temperature is not None and logit_scale is not None:
        raise ValueError(
            "clip_loss takes exactly one of temperature or logit_scale, got both "
            f"(temperature={temperature!r}, logit_scale={logit_scale!r})"
        )
    if logit_scale is None:
        temperature = _CLIP_TEMPERATURE if temperature is None else temperature
        val.check_temperature(temperature)
    else:
        val.check_scalar_param(logit_scale, "logit_scale")
    a, b = _check_towers(z_a, z_b, axis_name, normalize)
    if logit_scale is None:
        scale = 1.0 / jnp.asarray(temperature, a.dtype)
    else:
        scale = jnp.asarray(logit_scale).astype(a.dtype)

    pos = scale * jnp.sum(a * b, axis=1)  # L_ii, shape (B,)
    n = a.shape[0] * coll.axis_size(axis_name)
    if tiled.use_tiled(implementation, block_size, a.shape[0], n):
        lse = sum(tiled.tiled_lse(scale * q, k, block_size=block_size, axis_name=axis_name)[0]
                  for q, k in ((a, b), (b, a)))
    elif axis_name is None:  # one N×N matrix serves both directions
        logits = scale * (a @ b.T)
        lse = masked_logsumexp(logits, None, axis=1) + masked_logsumexp(logits, None, axis=0)
    else:
        lse = (masked_logsumexp(scale * (a @ coll.all_gather(b, axis_name).T), None, axis=1)
               + masked_logsumexp(scale * (b @ coll.all_gather(a, axis_name).T), None, axis=1))
    return coll.global_mean(jnp.sum(lse - 2.0 * pos), 2 * a.shape[0], axis_name)


def siglip_loss(
    z_a: ArrayLike,
    z_b: ArrayLike,
    *,
    t: ArrayLike = _SIGLIP_LOG_SCALE,
    b: ArrayLike = -10.0,
    normalize: bool = True,
    implementation: str = "auto",
    block_size: int = tiled.DEFAULT_BLOCK_SIZE,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""SigLIP's pairwise sigmoid loss of two towers.

    Every pair :math:`(i, j)` is an independent binary classification, positive iff
    :math:`i = j`:

    .. math::
        L_{ij} = e^{t}\,\langle \hat a_i, \hat b_j\rangle + b,\qquad
        L = -\frac{1}{N}\sum_{i=1}^{N}\sum_{j=1}^{N}\log\sigma\big(y_{ij} L_{ij}\big),
        \qquad y_{ij} = \begin{cases}+1 & i = j\\ -1 & i \ne j\end{cases}

    as big_vision's SigLIP trainer (``-sum(log_sigmoid(±logits), axis=-1).mean()``).
    **``t`` is the log of the scale** (big_vision's ``t`` parameter; its model multiplies
    by ``exp(t)``), ``b`` the bias; both are learnable: they may be traced and receive
    gradients. The defaults are the paper's initialisation, ``t = log 10`` and ``b = −10``.

    Args:
      z_a: ``[batch, dim]`` first tower (e.g. image embeddings).
      z_b: ``[batch, dim]`` second tower; row i pairs with ``z_a[i]``.
      t: log scale (finite scalar; default ``log(10)``).
      b: bias (finite scalar; default −10).
      normalize: L2-normalize the rows (static; default True). big_vision normalizes in the
        model (``two_towers.py``), so its trainer's loss equals this with normalized inputs;
        normalizing again is a no-op then. Pass False to use the embeddings as given.
      axis_name: if set, ``z_a``/``z_b`` are this device's shard; ``z_b`` is all-gathered
        (with gradient), each device sums the log-sigmoids of its rows against all global
        columns, and the sum is ``psum``'ed and divided by the global batch: the
        global-batch loss and gradients.

      implementation, block_size: ``"auto"``, ``"dense"`` or ``"tiled"`` (memory linear in
        the batch; a ring of devices under ``axis_name``) and the tile edge, static, as in
        :func:`~sslloss_jax.ntxent_loss`.

    Returns:
      Scalar loss (float32, or float64 for float64 inputs).

    References:
      Zhai et al., `Sigmoid Loss for Language Image Pre-Training
      <https://arxiv.org/abs/2303.15343>`_, 2023 (Algorithm 1).
    """
    val.check_scalar_param(t, "t")
    val.check_scalar_param(b, "b")
    z_a, z_b = _check_towers(z_a, z_b, axis_name, normalize)
    dtype = z_a.dtype
    scale = jnp.exp(jnp.asarray(t, dtype))
    rows = z_a.shape[0]
    if tiled.use_tiled(implementation, block_size, rows, rows * coll.axis_size(axis_name)):
        # the bias rides along as one more feature: [e^t·a, 1]·[b, bias] = e^t·a·b + bias
        q = jnp.concatenate([scale * z_a, jnp.ones((rows, 1), dtype)], axis=1)
        k = jnp.concatenate([z_b, jnp.full((rows, 1), jnp.asarray(b, dtype))], axis=1)
        loglik = tiled.tiled_log_sigmoid_sum(q, k, coll.global_rows(rows, axis_name),
                                             block_size=block_size, axis_name=axis_name)
        return coll.global_mean(-jnp.sum(loglik), rows, axis_name)
    logits = scale * (z_a @ coll.all_gather(z_b, axis_name).T) + jnp.asarray(b, dtype)
    positive = coll.own_columns(coll.global_rows(z_a.shape[0], axis_name), logits.shape[1])
    loglik = jax.nn.log_sigmoid(jnp.where(positive, logits, -logits))
    return coll.global_mean(-jnp.sum(loglik), z_a.shape[0], axis_name)
