"""Region-level contrastive losses: DetCon-B and DetCon-S.

Every image contributes M mask-pooled region embeddings per view, with an integer region
id each. A region's positives are the regions with the same id in the **other** view of
the same image; everything else is a negative, except the same-id regions of the same view
of the same image (itself included), which are **excluded** with a ``where`` mask (lightly
subtracts 1e9, which overflows float16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sslloss_jax import _collectives as coll
from sslloss_jax import _tiled as tiled
from sslloss_jax import _validation as val
from sslloss_jax._numerics import (
    argmax_first,
    l2_normalize,
    masked_logsumexp,
    matmul_nt,
    upcast,
)
from sslloss_jax._types import ArrayLike, AxisName

__all__ = ["detcon_b_loss", "detcon_s_loss"]


def _check_mask(mask: ArrayLike, name: str, like: jax.Array, like_name: str) -> jax.Array:
    """Integer region ids of shape ``like.shape[:2]`` (``[batch, regions]``)."""
    return val.as_int_array(
        mask, name, like.shape[:2], meaning="region ids",
        context=f"the batch and region axes of {like_name}, shape {like.shape}")


def _check_views(arrays: dict[str, ArrayLike]) -> list[jax.Array]:
    out = [val.as_float_array(x, name, ndim=3) for name, x in arrays.items()]
    names = list(arrays)
    for name, x in zip(names[1:], out[1:]):
        val.check_same_shape(out[0], x, names[0], name)
    return out


def _direction(p_x, t_y, t_y_all, t_x_all, mask_x, mask_y, temperature, axis_name):
    """Σ over the local (b, i) of lightly's weighted cross-entropy for view x → y.

    Candidates of row (b, i): every region of every image of view y (the positives among
    them: same image, same id) and of view x except the same-id regions of image b. Both
    views' candidates are scored in one product and one masked logsumexp; the positives
    lie in image b's own block, scored against the local ``t_y``.
    """
    b, m = p_x.shape[:2]
    n = t_y_all.shape[0]
    own = coll.own_columns(coll.global_rows(b, axis_name), n)  # (B, N): the image itself
    same_xy = mask_x[:, :, None] == mask_y[:, None, :]  # (B, M, M)
    same_xx = mask_x[:, :, None] == mask_x[:, None, :]
    excluded = own[:, None, :, None] & same_xx[:, :, None, :]  # (B, M, N, M)
    valid = jnp.concatenate([jnp.ones_like(excluded), ~excluded], axis=2)  # (B, M, 2N, M)
    candidates = jnp.concatenate([t_y_all, t_x_all]).reshape(-1, p_x.shape[-1])
    logits = matmul_nt(p_x.reshape(b * m, -1), candidates) / temperature  # (B·M, 2N·M)
    lse = masked_logsumexp(logits, valid.reshape(b * m, -1), axis=-1).reshape(b, m)
    own_xy = jnp.einsum("bid,bjd->bij", p_x, t_y) / temperature  # (B, M, M)
    n_pos = jnp.sum(same_xy, axis=2).astype(lse.dtype)
    pos_sum = jnp.sum(jnp.where(same_xy, own_xy, 0.0), axis=2)
    # Σ_j labels_j log_softmax_j with labels = positives / max(#pos, 1)
    log_lik = (pos_sum - n_pos * lse) / jnp.maximum(n_pos, 1.0)
    obj_area = jnp.sum(same_xx, axis=2).astype(lse.dtype)  # >= 1 (the region itself)
    weight = (n_pos > 1e-3).astype(lse.dtype) / jnp.maximum(obj_area, 1e-8)
    return jnp.sum(-weight * log_lik)


def _region_classes(ids: jax.Array, regions: int) -> jax.Array:
    """Class ids of the stacked rows ``[view0; view1]`` (``ids [R]``, ``R = 2·B·M``): rows
    of one (view, image) block with the same region id share the index of the block's
    first such row, so a row's excluded same-view regions are the rows of its class
    (nonnegative and below ``R`` whatever the region ids' values)."""
    blocks = ids.reshape(-1, regions)  # [2B, M]
    first = argmax_first(blocks[:, :, None] == blocks[:, None, :], axis=2)  # [2B, M]
    start = jnp.arange(blocks.shape[0], dtype=jnp.int32)[:, None] * regions
    return (start + first.astype(jnp.int32)).reshape(-1)


def _detcon_s_single(v0, v1, m0, m1, temperature) -> jax.Array:
    """DetCon-S on one device: :func:`_detcon` with ``pred = target``, both directions
    from one symmetric logsumexp (the same value and gradients)."""
    v0, v1 = upcast(v0, v1)
    b, m, d = v0.shape
    xv = jnp.stack([l2_normalize(v0), l2_normalize(v1)])  # [2, B, M, D]
    t = jnp.asarray(temperature, xv.dtype)
    ids = jnp.stack([m0, m1])  # [2, B, M]
    # Both directions are rows of one symmetric matrix (view 0's candidates: all of view 1
    # and view 0 minus the same-id regions of its image; and vice versa), whose VJP needs
    # one product where the two [B·M, R] directions take three. Past the contrastive
    # losses' "auto" size, the tiled kernel (its "self" ids are the region classes): no
    # R×R array at all (R = 2048: 40 MiB of temporaries and 29 ms dense, 20 ms tiled).
    z = xv.reshape(2 * b * m, d)
    classes = _region_classes(ids.reshape(-1).astype(jnp.int32), m)
    lse = tiled.self_lse(z, t, tiled.Rows(ids=classes), block_size=tiled.DEFAULT_BLOCK_SIZE)
    own = jnp.einsum("vbid,vbjd->vbij", xv, xv[::-1]) / t  # each view against the other's
    same = ids[:, :, :, None] == ids[::-1][:, :, None, :]  # positives: same image and id
    n_pos = jnp.sum(same, axis=-1).astype(lse.dtype).reshape(-1)
    pos_sum = jnp.sum(jnp.where(same, own, 0.0), axis=-1).reshape(-1)
    log_lik = (pos_sum - n_pos * lse) / jnp.maximum(n_pos, 1.0)
    area = jnp.sum(ids[:, :, :, None] == ids[:, :, None, :], axis=-1).astype(lse.dtype)
    weight = (n_pos > 1e-3).astype(lse.dtype) / jnp.maximum(area.reshape(-1), 1e-8)
    return jnp.sum(-weight * log_lik) / (b * m)


def _detcon(p0, p1, t0, t1, m0, m1, temperature, axis_name) -> jax.Array:
    p0, p1, t0, t1 = upcast(p0, p1, t0, t1)
    p0, p1, t0, t1 = (l2_normalize(x) for x in (p0, p1, t0, t1))
    t0_all, t1_all = coll.all_gather(t0, axis_name), coll.all_gather(t1, axis_name)
    t = jnp.asarray(temperature, p0.dtype)
    total = (_direction(p0, t1, t1_all, t0_all, m0, m1, t, axis_name)
             + _direction(p1, t0, t0_all, t1_all, m1, m0, t, axis_name))
    return coll.global_mean(total, p0.shape[0] * p0.shape[1], axis_name)


def detcon_b_loss(
    pred_view0: ArrayLike,
    pred_view1: ArrayLike,
    target_view0: ArrayLike,
    target_view1: ArrayLike,
    mask_view0: ArrayLike,
    mask_view1: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""DetCon-B: region-level contrastive loss between a prediction and a target branch.

    All embeddings are L2-normalized. For view x (paired with the other view y), region
    i of image b and its positives :math:`P = \{(b, j) : m^y_{bj} = m^x_{bi}\}`:

    .. math::
        \ell^x_{bi} = -\frac{\mathbb 1[|P|>0]}{A^x_{bi}}\,\frac{1}{|P|}\sum_{(b,j)\in P}
        \log\frac{e^{\langle p^x_{bi}, t^y_{bj}\rangle/\tau}}
        {\sum_{(c,k)} e^{\langle p^x_{bi}, t^y_{ck}\rangle/\tau}
         + \sum_{(c,k)\notin E} e^{\langle p^x_{bi}, t^x_{ck}\rangle/\tau}}

    where the sums over (c, k) run over every region of every image of the global batch,
    :math:`E = \{(b, k): m^x_{bk} = m^x_{bi}\}` (same view, same image, same id, itself
    included) and :math:`A^x_{bi} = |E|` is the region's area weight.
    :math:`L = \operatorname{mean}_{b,i}\ell^0_{bi} + \operatorname{mean}_{b,i}\ell^1_{bi}`
    (a sum of the two directions).

    Args:
      pred_view0, pred_view1: ``[batch, regions, dim]`` prediction-branch region
        embeddings of the two views.
      target_view0, target_view1: ``[batch, regions, dim]`` target-branch embeddings.
        Not detached (as lightly): stop-gradient them yourself for a BYOL-style target.
      mask_view0, mask_view1: ``[batch, regions]`` integer region ids (repeats allowed).
      temperature: τ (may be negative or traced; ``|τ| < 1e-8`` is rejected).
      axis_name: optional axis: the targets are all-gathered (with gradient), as lightly's
        default ``gather_distributed=True``; masks stay local (positives are within an
        image), and the loss is the mean over the global batch, identical everywhere.

    Returns:
      Scalar loss (float32, or float64 for float64 inputs).

    Differences from lightly ``DetConBLoss``: the excluded same-view regions are removed
    with a ``where`` mask instead of subtracting 1e9 (same value; float16/bfloat16
    inputs work, logits in >= float32); under ``axis_name`` the global loss is returned
    (lightly returns each rank's share and relies on DDP averaging).

    References:
      Hénaff et al., `Efficient Visual Pretraining with Contrastive Detection
      <https://arxiv.org/abs/2103.10957>`_, 2021.
    """
    val.check_axis_name(axis_name)
    val.check_temperature(temperature)
    p0, p1, t0, t1 = _check_views({"pred_view0": pred_view0, "pred_view1": pred_view1,
                                   "target_view0": target_view0, "target_view1": target_view1})
    m0 = _check_mask(mask_view0, "mask_view0", p0, "pred_view0")
    m1 = _check_mask(mask_view1, "mask_view1", p0, "pred_view0")
    return _detcon(p0, p1, t0, t1, m0, m1, temperature, axis_name)


def detcon_s_loss(
    view0: ArrayLike,
    view1: ArrayLike,
    mask_view0: ArrayLike,
    mask_view1: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    axis_name: AxisName = None,
) -> jax.Array:
    """DetCon-S (SimCLR-style): :func:`detcon_b_loss` with ``pred = target = view``.

    Gradients flow through both the "prediction" and the "target" use of each view, as in
    lightly (``DetConSLoss`` calls ``DetConBLoss(view0, view1, view0, view1, ...)``).

    Args:
      view0, view1: ``[batch, regions, dim]`` region embeddings of the two views.
      mask_view0, mask_view1: ``[batch, regions]`` integer region ids.
      temperature: τ (may be negative or traced; ``|τ| < 1e-8`` is rejected).
      axis_name: optional axis, as in :func:`detcon_b_loss` (the views are gathered as
        targets).

    Returns:
      Scalar loss.

    Differences from lightly ``DetConSLoss``: as :func:`detcon_b_loss`.

    References:
      Hénaff et al., `Efficient Visual Pretraining with Contrastive Detection
      <https://arxiv.org/abs/2103.10957>`_, 2021.
    """
    val.check_axis_name(axis_name)
    val.check_temperature(temperature)
    v0, v1 = _check_views({"view0": view0, "view1": view1})
    m0 = _check_mask(mask_view0, "mask_view0", v0, "view0")
    m1 = _check_mask(mask_view1, "mask_view1", v0, "view0")
    if axis_name is None:
        return _detcon_s_single(v0, v1, m0, m1, temperature)
    return _detcon(v0, v1, v0, v1, m0, m1, temperature, axis_name)
