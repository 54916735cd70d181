"""Contrastive losses: NT-Xent (SimCLR), NT-Xent with a memory bank (MoCo), DCL/DCLW, CO2,
SupCon (multi-positive SimCLR) and MoCo v3."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sslloss_jax import _collectives as coll
from sslloss_jax import _tiled as tiled
from sslloss_jax import _validation as val
from sslloss_jax._memory_bank import MemoryBankState, check_memory_bank, memory_bank_enqueue
from sslloss_jax._numerics import (
    argmax_first,
    divide_by,
    l2_normalize,
    masked_logsumexp,
    symmetric_lse_linear,
    upcast,
)
from sslloss_jax._types import ArrayLike, AxisName

__all__ = [
    "co2_regularizer",
    "co2_memory_bank_regularizer",
    "ntxent_loss",
    "ntxent_memory_bank_loss",
    "dcl_loss",
    "dclw_loss",
    "negative_mises_fisher_weights",
    "directclr_loss",
    "directclr_memory_bank_loss",
    "macl_loss",
    "supcon_loss",
    "mocov3_loss",
    "FoviSimCLRTerms",
    "fovi_simclr_terms",
    "fovi_simclr_loss",
    "nnclr_loss",
    "ressl_loss",
]


def _check_pair(out0: ArrayLike, out1: ArrayLike, axis_name: AxisName):
    """Validates two (B, D) views and returns them L2-normalized in >= float32."""
    val.check_axis_name(axis_name)
    out0 = val.as_float_array(out0, "out0", ndim=2)
    out1 = val.as_float_array(out1, "out1", ndim=2)
    val.check_same_shape(out0, out1, "out0", "out1")
    return l2_normalize(out0), l2_normalize(out1)


def _candidates(ids: jax.Array, pos: jax.Array | None, cols: int) -> jax.Array:
    """(rows, cols) mask of the columns of ``[z0_all; z1_all]`` an anchor is contrasted
    with: all but itself (column ``ids``), and (DCL) all but its positive (``pos``)."""
    mask = ~coll.own_columns(ids, cols)
    if pos is not None:
        mask &= ~coll.own_columns(pos, cols)
    return mask


def _two_view_contrastive(
    z0: jax.Array,
    z1: jax.Array,
    temperature: ArrayLike,
    axis_name: AxisName,
    *,
    exclude_positive: bool,
    pos_weight: jax.Array | None = None,
    implementation: str = "auto",
    block_size: int = tiled.DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """Mean over the 2N global anchors of ``lse_{j ∈ cand(i)} s_ij/τ − w_i·s_i,pos/τ``.

    Anchors are the local rows of ``[z0; z1]``; candidates are all 2N global rows of
    ``[z0_all; z1_all]`` except the anchor itself (and, if ``exclude_positive``, except its
    positive, which gives DCL's decoupled denominator). ``pos_weight`` (shape [2B])
    multiplies the positive term. Dense: logits are only ever (2B, 2N), local rows against
    gathered columns. On one device :func:`sslloss_jax._tiled.self_lse`: the symmetric
    one-product VJP, dense or tiled (``implementation``); under ``axis_name`` tiled is
    the ring of :mod:`sslloss_jax._tiled`.
    """
    b = z0.shape[0]
    n = b * coll.axis_size(axis_name)
    anchors = jnp.concatenate([z0, z1], axis=0)  # (2B, D)
    t = jnp.asarray(temperature, anchors.dtype)
    rows = jnp.arange(2 * b, dtype=jnp.int32)
    view = rows // b
    sample = coll.axis_index(axis_name) * b + rows % b  # global sample index of each anchor
    self_ids, pos_ids = view * n + sample, (1 - view) * n + sample
    ids = tiled.Rows(ids=self_ids, pos=pos_ids)
    if axis_name is None:
        lse = tiled.self_lse(anchors, t, ids, exclude_pos=exclude_positive,
                             implementation=implementation, block_size=block_size)
    elif tiled.use_tiled(implementation, block_size, 2 * b, 2 * n):
        lse, _ = tiled.tiled_lse(anchors / t, anchors, ids, tiled.Rows(ids=ids.ids),
                                 exclude_self=True, exclude_pos=exclude_positive,
                                 block_size=block_size, axis_name=axis_name)
    else:
        keys = jnp.concatenate([coll.all_gather(z0, axis_name), coll.all_gather(z1, axis_name)])
        mask = _candidates(self_ids, pos_ids if exclude_positive else None, 2 * n)
        lse = masked_logsumexp((anchors @ keys.T) / t, mask, axis=1)

    pos = jnp.sum(z0 * z1, axis=1) / t  # (B,)
    pos = jnp.concatenate([pos, pos])
    if pos_weight is not None:
        pos = pos * pos_weight
    return coll.global_mean(jnp.sum(lse - pos), 2 * b, axis_name)


def ntxent_loss(
    out0: ArrayLike,
    out1: ArrayLike,
    *,
    temperature: ArrayLike = 0.5,
    implementation: str = "auto",
    block_size: int = tiled.DEFAULT_BLOCK_SIZE,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""NT-Xent (normalized temperature-scaled cross entropy), the SimCLR loss.

    Both views are L2-normalized. Each of the 2N samples of ``[out0; out1]`` is an anchor
    whose positive is the other view of the same image and whose negatives are the
    other 2N − 2 samples:

    .. math::
        \ell_i = -\frac{s_{i,p(i)}}{\tau}
                 + \log \sum_{j \ne i} \exp\left(\frac{s_{ij}}{\tau}\right),\qquad
        L = \frac{1}{2N}\sum_{i=1}^{2N} \ell_i,

    with :math:`s_{ij}` the cosine similarity (SimCLR Algorithm 1).

    Args:
      out0: ``[batch, dim]`` projections of the first views.
      out1: ``[batch, dim]`` projections of the second views.
      temperature: τ; may be negative (as lightly) or a traced scalar; ``|τ| < 1e-8`` is
        rejected.
      axis_name: if set, ``out0``/``out1`` are this device's shard and negatives come from
        the global batch (``all_gather``); the returned loss is the global mean, identical
        on every device.
      implementation: ``"auto"`` (default), ``"dense"`` or ``"tiled"`` (static). Dense
        materializes the logits of the local rows against the global batch; tiled computes
        them in ``block_size × block_size`` tiles with a custom VJP, so memory (forward and
        backward) grows linearly with the batch, and under ``axis_name`` passes the key
        blocks around a ring of devices (``lax.ppermute``) instead of gathering them.
        ``"auto"`` picks tiled above 2048 × 1024 logits per device. Both give the same
        value and gradients to float round-off.
      block_size: tile edge of the tiled path (static; default 1024).

    Returns:
      Scalar loss (float32, or float64 for float64 inputs): the mean over the 2N global
      anchors.

    Differences from lightly ``NTXentLoss(memory_bank_size=0)``: same value. Under
    ``axis_name`` it returns the global loss (lightly returns the rank's share and relies
    on DDP averaging). Computed in >= float32 whatever the input dtype. See
    :func:`ntxent_memory_bank_loss` for the memory-bank variant.

    References:
      Chen et al., `A Simple Framework for Contrastive Learning of Visual Representations
      <https://arxiv.org/abs/2002.05709>`_, 2020.
    """
    val.check_temperature(temperature)
    z0, z1 = _check_pair(out0, out1, axis_name)
    return _two_view_contrastive(z0, z1, temperature, axis_name, exclude_positive=False,
                                 implementation=implementation, block_size=block_size)


def ntxent_memory_bank_loss(
    out0: ArrayLike,
    out1: ArrayLike,
    bank: MemoryBankState,
    *,
    temperature: ArrayLike = 0.5,
    update: bool = True,
    implementation: str = "auto",
    block_size: int = tiled.DEFAULT_BLOCK_SIZE,
    axis_name: AxisName = None,
) -> tuple[jax.Array, MemoryBankState]:
    r"""NT-Xent against a memory bank of negatives (MoCo semantics, as lightly).

    .. math::
        \ell_i = -\frac{\langle z^0_i, z^1_i\rangle}{\tau} + \log\Big(
        e^{\langle z^0_i, z^1_i\rangle/\tau} + \sum_{m} e^{\langle z^0_i, q_m\rangle/\tau}\Big),
        \qquad L = \frac{1}{N}\sum_i \ell_i

    One direction only (``out0`` are the queries, ``out1`` the positive keys) and no
    in-batch negatives: the negatives are the bank rows :math:`q_m` **before** this call's
    update (stop-gradient). The bank is read before and updated after the loss.

    Args:
      out0: ``[batch, dim]`` queries.
      out1: ``[batch, dim]`` positive keys (for MoCo, the momentum encoder's output).
      bank: ``MemoryBankState`` from :func:`init_memory_bank` with the same ``dim``.
      temperature: τ (may be negative or traced; ``|τ| < 1e-8`` rejected).
      update: if True (static), enqueue the normalized, stop-gradient ``out1`` into the
        bank (lightly enqueues whenever ``out0.requires_grad``; pass ``update=False`` for
        evaluation).
      axis_name: if set, the loss is the global mean and the enqueued batch is the
        gathered global batch, so replicated banks stay identical.

      implementation, block_size: ``"auto"``, ``"dense"`` or ``"tiled"`` (memory linear in
        the batch; a ring of devices under ``axis_name``) and the tile edge, static, as in
        :func:`ntxent_loss`.
    Returns:
      ``(loss, new_bank)``.

    Differences from lightly: a batch that does not fit before the end of the bank wraps
    around to its start (lightly drops the overflow); under ``axis_name`` the loss is the
    global mean. Any query dtype works (lightly fails for a bfloat16 query against its
    float32 bank).
    """
    val.check_temperature(temperature)
    z0, z1 = _check_pair(out0, out1, axis_name)
    check_memory_bank(bank, z0.shape[1])
    negatives = lax.stop_gradient(bank.bank).astype(z0.dtype)
    pos = jnp.sum(z0 * z1, axis=1) / temperature
    # the bank is replicated: each device scores its queries against all of it, locally
    if tiled.use_tiled(implementation, block_size, z0.shape[0], negatives.shape[0]):
        neg_lse, _ = tiled.tiled_lse(z0 / temperature, negatives, k_grad=False,
                                     block_size=block_size)
    else:
        neg_lse = masked_logsumexp((z0 @ negatives.T) / temperature, None, axis=1)
    # log(e^pos + Σ_m e^{neg_m}) without materializing the concatenated logits
    lse = jnp.logaddexp(pos, neg_lse)
    loss = coll.global_mean(jnp.sum(lse - pos), z0.shape[0], axis_name)
    new_bank = memory_bank_enqueue(bank, z1, axis_name=axis_name) if update else bank
    return loss, new_bank


def negative_mises_fisher_weights(
    out0: ArrayLike,
    out1: ArrayLike,
    *,
    sigma: ArrayLike = 0.5,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""DCLW's negative von Mises-Fisher weights ``w_i = 2 − N·softmax_i(⟨ẑ0_i, ẑ1_i⟩/σ)``.

    Computed on L2-normalized, stop-gradient inputs. With ``axis_name`` the softmax and N
    run over the global batch (so a sharded batch gets the weights of the global batch);
    the result has the local shape ``[batch]``.
    """
    val.check_temperature(sigma, "sigma")
    z0, z1 = _check_pair(out0, out1, axis_name)
    return _nmf_weights(z0, z1, sigma, axis_name)


def _nmf_weights(z0: jax.Array, z1: jax.Array, sigma: ArrayLike, axis_name: AxisName):
    """:func:`negative_mises_fisher_weights` on already normalized, validated views."""
    z0, z1 = lax.stop_gradient(z0), lax.stop_gradient(z1)
    s = jnp.sum(z0 * z1, axis=1) / sigma
    n = z0.shape[0] * coll.axis_size(axis_name)
    lse = coll.global_logsumexp(jax.nn.logsumexp(s), axis_name)
    return 2.0 - n * jnp.exp(s - lse)


def dcl_loss(
    out0: ArrayLike,
    out1: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    weight_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    implementation: str = "auto",
    block_size: int = tiled.DEFAULT_BLOCK_SIZE,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Decoupled contrastive loss (DCL): NT-Xent without the positive in the denominator.

    .. math::
        \ell_i = -w_i\frac{s_{i,p(i)}}{\tau}
                 + \log \sum_{j \notin \{i, p(i)\}} \exp\left(\frac{s_{ij}}{\tau}\right),
        \qquad L = \frac{1}{2N}\sum_{i=1}^{2N}\ell_i

    one logsumexp over all 2N − 2 negatives of both views (Eq. 6 of the paper; lightly
    after #1827), i.e. ``0.5·(mean over out0 anchors + mean over out1 anchors)``.

    Args:
      out0, out1: ``[batch, dim]`` projections of the two views.
      temperature: τ (may be traced; ``|τ| < 1e-8`` rejected).
      weight_fn: optional ``weight_fn(z_anchor, z_positive) -> [batch]`` called on the
        L2-normalized **local** views, once per direction (``(z0, z1)`` then ``(z1, z0)``),
        as lightly's ``weight_fn`` / nidl's ``pos_weight_fn``. It multiplies the positive
        term. For a distributed-exact weight that needs batch statistics, use
        :func:`dclw_loss` or compute the weights with ``axis_name`` yourself.
      axis_name: optional axis; negatives from the global batch, global mean returned.

      implementation, block_size: ``"auto"``, ``"dense"`` or ``"tiled"`` (memory linear in
        the batch; a ring of devices under ``axis_name``) and the tile edge, static, as in
        :func:`ntxent_loss`.
    Returns:
      Scalar loss (>= float32).

    References:
      Yeh et al., `Decoupled Contrastive Learning <https://arxiv.org/abs/2110.06848>`_, 2021.
    """
    val.check_temperature(temperature)
    z0, z1 = _check_pair(out0, out1, axis_name)
    weights = None
    if weight_fn is not None:
        if not callable(weight_fn):
            raise TypeError(f"weight_fn must be callable or None, got {weight_fn!r}")
        w0, w1 = (jnp.asarray(weight_fn(a, b)) for a, b in ((z0, z1), (z1, z0)))
        for w in (w0, w1):
            if w.shape not in ((), (z0.shape[0],)):
                raise ValueError(
                    f"weight_fn must return shape () or ({z0.shape[0]},), got {w.shape}"
                )
        weights = jnp.concatenate([jnp.broadcast_to(w0, (z0.shape[0],)),
                                   jnp.broadcast_to(w1, (z0.shape[0],))]).astype(z0.dtype)
    _check_dcl_batch(z0, axis_name)
    return _two_view_contrastive(
        z0, z1, temperature, axis_name, exclude_positive=True, pos_weight=weights,
        implementation=implementation, block_size=block_size,
    )


def _check_dcl_batch(z0: jax.Array, axis_name: AxisName) -> None:
    val.check_min_batch(
        z0.shape[0] * coll.axis_size(axis_name), 2, "DCL (negatives from other samples)",
        z0.shape,
    )


def dclw_loss(
    out0: ArrayLike,
    out1: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    sigma: ArrayLike = 0.5,
    local_weights: bool = False,
    implementation: str = "auto",
    block_size: int = tiled.DEFAULT_BLOCK_SIZE,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""DCL with negative von Mises-Fisher positive weights (DCLW).

    ``dcl_loss`` with ``w_i = 2 − N·softmax_i(⟨ẑ0_i, ẑ1_i⟩/σ)`` computed from normalized,
    stop-gradient inputs (:func:`negative_mises_fisher_weights`); the weights are
    symmetric, so both directions share them.

    Args:
      out0, out1: ``[batch, dim]`` projections.
      temperature: τ of the contrastive term.
      sigma: σ of the weights (may be traced).
      local_weights: with ``axis_name``, compute the softmax over each device's local batch
        as lightly does under DDP (not equal to the single-device global-batch loss). The
        default uses the global batch, so the distributed loss is exact.
      axis_name: optional axis, as in :func:`dcl_loss`.

      implementation, block_size: ``"auto"``, ``"dense"`` or ``"tiled"`` (memory linear in
        the batch; a ring of devices under ``axis_name``) and the tile edge, static, as in
        :func:`ntxent_loss`.
    Returns:
      Scalar loss.
    """
    val.check_temperature(temperature)
    z0, z1 = _check_pair(out0, out1, axis_name)
    _check_dcl_batch(z0, axis_name)
    val.check_temperature(sigma, "sigma")
    w = _nmf_weights(z0, z1, sigma, None if local_weights else axis_name)
    return _two_view_contrastive(
        z0, z1, temperature, axis_name, exclude_positive=True,
        pos_weight=jnp.concatenate([w, w]).astype(z0.dtype),
        implementation=implementation, block_size=block_size,
    )


def _check_loss_dim(loss_dim: object) -> int:
    if not isinstance(loss_dim, int) or isinstance(loss_dim, bool) or loss_dim < 1:
        raise ValueError(f"loss_dim must be a positive int, got {loss_dim!r}")
    return loss_dim


def _truncated_pair(out0: ArrayLike, out1: ArrayLike, loss_dim: int):
    """DirectCLR's inputs: flattened to (B, ·) and cut to the first ``loss_dim`` features
    (all of them if there are fewer, as torch slicing)."""
    _check_loss_dim(loss_dim)
    x0 = val.as_float_array(out0, "out0", min_ndim=2)
    x1 = val.as_float_array(out1, "out1", min_ndim=2)
    val.check_same_shape(x0, x1, "out0", "out1")
    return tuple(x.reshape(x.shape[0], -1)[:, :loss_dim] for x in (x0, x1))


def directclr_loss(
    out0: ArrayLike,
    out1: ArrayLike,
    *,
    loss_dim: int = 64,
    temperature: ArrayLike = 0.5,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""DirectCLR: NT-Xent on the first ``loss_dim`` features of the representation.

    .. math:: L = \mathrm{NTXent}_\tau\big(\mathrm{flat}(x_0)_{[:, :d_0]},\,
              \mathrm{flat}(x_1)_{[:, :d_0]}\big)

    Each input is flattened to ``[batch, features]`` and truncated to its first
    ``loss_dim`` = :math:`d_0` features (all of them if there are fewer), **then**
    L2-normalized inside :func:`ntxent_loss` (applied to the backbone output, without a
    projection head).

    Args:
      out0, out1: ``[batch, ...]`` representations of the two views (same shape).
      loss_dim: static number of leading features the loss sees (lightly's default 64).
      temperature: τ (default 0.5 as lightly; may be negative or traced; ``|τ| < 1e-8``
        rejected).
      axis_name: optional axis, as in :func:`ntxent_loss` (negatives from the global
        batch, global mean).

    Returns:
      Scalar loss (>= float32). :func:`directclr_memory_bank_loss` is the variant with a
      memory bank (lightly's ``memory_bank_size > 0``).

    Differences from lightly ``DirectCLRLoss``: as :func:`ntxent_loss`; ``out0`` and
    ``out1`` must have the same shape (lightly only needs the truncated shapes to agree).

    References:
      Jing et al., `Understanding Dimensional Collapse in Contrastive Self-supervised
      Learning <https://arxiv.org/abs/2110.09348>`_, 2022.
    """
    z0, z1 = _truncated_pair(out0, out1, loss_dim)
    return ntxent_loss(z0, z1, temperature=temperature, axis_name=axis_name)


def directclr_memory_bank_loss(
    out0: ArrayLike,
    out1: ArrayLike,
    bank: MemoryBankState,
    *,
    loss_dim: int = 64,
    temperature: ArrayLike = 0.5,
    update: bool = True,
    axis_name: AxisName = None,
) -> tuple[jax.Array, MemoryBankState]:
    """DirectCLR with a memory bank: :func:`ntxent_memory_bank_loss` on the truncated
    inputs of :func:`directclr_loss`.

    The bank (from :func:`init_memory_bank`) has ``min(loss_dim, features)`` columns and
    receives the normalized, truncated ``out1``; read before, updated after. Returns
    ``(loss, new_bank)``. Differences from lightly: those of
    :func:`ntxent_memory_bank_loss` (wrap-around enqueue, explicit state).
    """
    z0, z1 = _truncated_pair(out0, out1, loss_dim)
    return ntxent_memory_bank_loss(z0, z1, bank, temperature=temperature, update=update,
                                   axis_name=axis_name)


def macl_loss(
    z0: ArrayLike,
    z1: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    alpha: ArrayLike = 0.5,
    A_0: ArrayLike = 0.0,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Model-aware contrastive loss (MACL): NT-Xent with an alignment-adaptive
    temperature and a reweighting of hard positives.

    With L2-normalized views, :math:`s_{ij}` the cosine similarities of the 2N rows of
    :math:`[z_0; z_1]` and :math:`A = \operatorname{sg}(\operatorname{mean}_i
    \langle z_{0,i}, z_{1,i}\rangle)` (the alignment of the global batch):

    .. math::
        \tau = \tau_0\,(1 + \alpha(A - A_0)),\qquad
        \log P_i = \frac{s_{i,p(i)}}{\tau} - \log\sum_{j\ne i} e^{s_{ij}/\tau},\qquad
        L = \frac{1}{2N}\sum_i -\operatorname{sg}\Big(\frac{1}{1 - P_i + 10^{-8}}\Big)
            \log P_i

    Both A and the weight :math:`V_i = 1/(1 - P_i + 10^{-8})` are stop-gradient, as in
    lightly and the paper.

    Args:
      z0, z1: ``[batch, dim]`` projections of the two views.
      temperature: τ₀ > 0 (may be traced; values below 1e-8 are rejected, as lightly).
      alpha: α in [0, 1], strength of the temperature adaptation (may be traced).
      A_0: the alignment threshold A₀ in [0, 1] (may be traced).
      axis_name: optional axis; negatives from the global batch (``all_gather``), A from
        the global batch (``psum``), global mean returned.

    Returns:
      Scalar loss (>= float32).

    Differences from lightly ``MACLLoss``: same value; under ``axis_name`` the negatives
    and A are global (lightly has no distributed mode); a global batch of one is a
    ``ValueError`` (no negatives; lightly fails inside a ``view``).

    References:
      Huang et al., `Model-Aware Contrastive Learning: Towards Escaping the Dilemmas
      <https://arxiv.org/abs/2207.07874>`_, ICML 2023.
    """
    val.check_axis_name(axis_name)
    val.check_temperature(temperature, positive=True)
    val.check_in_range(alpha, "alpha", 0.0, 1.0)
    val.check_in_range(A_0, "A_0", 0.0, 1.0)
    x0 = val.as_float_array(z0, "z0", ndim=2)
    x1 = val.as_float_array(z1, "z1", ndim=2)
    val.check_same_shape(x0, x1, "z0", "z1")
    b = x0.shape[0]
    n = b * coll.axis_size(axis_name)
    val.check_min_batch(n, 2, "MACL (negatives from other samples)", x0.shape)
    x0, x1 = l2_normalize(x0), l2_normalize(x1)
    dtype = x0.dtype
    pos = jnp.sum(x0 * x1, axis=1)  # (B,)
    align = lax.stop_gradient(coll.global_mean(jnp.sum(pos), b, axis_name))
    t = jnp.asarray(temperature, dtype) * (
        1.0 + jnp.asarray(alpha, dtype) * (align - jnp.asarray(A_0, dtype)))
    anchors = jnp.concatenate([x0, x1], axis=0)  # (2B, D)
    keys = jnp.concatenate([coll.all_gather(x0, axis_name), coll.all_gather(x1, axis_name)])
    rows = jnp.arange(2 * b, dtype=jnp.int32)
    sample = coll.axis_index(axis_name) * b + rows % b
    if axis_name is None:  # anchors = keys: the symmetric one-product VJP
        lse = tiled.self_lse(anchors, t, tiled.Rows(ids=rows), implementation="dense")
    else:
        lse = masked_logsumexp((anchors @ keys.T) / t,
                               _candidates((rows // b) * n + sample, None, 2 * n), axis=1)
    log_p = jnp.concatenate([pos, pos]) / t - lse
    weight = lax.stop_gradient(1.0 / (1.0 - jnp.exp(log_p) + 1e-8))
    return coll.global_mean(jnp.sum(-weight * log_p), 2 * b, axis_name)


def _co2_divergence(z0, z1, negatives, t_consistency, axis_name):
    """α-free CO2 term: ½·[KL(q‖p) + KL(p‖q)] averaged over the global batch, where p and
    q are the softmaxes over [positive, negatives] of each view against the other."""
    b = z0.shape[0]

    def pseudo_labels(query, positive, neg_keys, self_mask):
        query = divide_by(query, t_consistency)  # the logits' scale, on the B rows
        pos = jnp.sum(query * positive, axis=1, keepdims=True)
        neg = query @ neg_keys.T
        logits = jnp.concatenate([pos, neg], axis=1)
        if self_mask is None:
            return jax.nn.log_softmax(logits, axis=1), None
        where = jnp.concatenate([jnp.ones((b, 1), bool), self_mask], axis=1)
        logp = logits - masked_logsumexp(logits, where, axis=1)[:, None]
        return jnp.where(where, logp, 0.0), where

    if negatives is None:  # the other samples of the (global) batch
        n = b * coll.axis_size(axis_name)
        mask = ~coll.own_columns(coll.global_rows(b, axis_name), n)
        p, where = pseudo_labels(z0, z1, coll.all_gather(z1, axis_name), mask)
        q, _ = pseudo_labels(z1, z0, coll.all_gather(z0, axis_name), mask)
    else:
        p, where = pseudo_labels(z0, z1, negatives, None)
        q, _ = pseudo_labels(z1, z0, negatives, None)
    kl = (jnp.exp(q) - jnp.exp(p)) * (q - p)  # KL(q‖p) + KL(p‖q) elementwise
    if where is not None:
        kl = jnp.where(where, kl, 0.0)
    return 0.5 * coll.global_mean(jnp.sum(kl), b, axis_name)


def co2_regularizer(
    out0: ArrayLike,
    out1: ArrayLike,
    *,
    alpha: ArrayLike = 1.0,
    t_consistency: ArrayLike = 0.05,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""CO2 consistency regularizer without a memory bank (negatives: the other samples).

    .. math:: R = \alpha\cdot\tfrac12\big[\mathrm{KL}(q\,\|\,p) + \mathrm{KL}(p\,\|\,q)\big]

    where p (q) is the softmax over ``[⟨z0_i, z1_i⟩, ⟨z0_i, z1_j⟩_{j≠i}] / t`` (roles
    swapped), the KL divergences averaged over the batch (``batchmean``).

    Unlike lightly's ``CO2Regularizer``, which wraps its result in ``torch.tensor`` (no
    gradient since lightly #1766), this is differentiable; the value is lightly's.
    Under ``axis_name`` the negatives are the other samples of the global batch.

    References:
      Wei et al., `CO2: Consistent Contrast for Unsupervised Visual Representation
      Learning <https://arxiv.org/abs/2010.02217>`_, 2021.
    """
    val.check_temperature(t_consistency, "t_consistency")
    val.check_scalar_param(alpha, "alpha")
    z0, z1 = _check_pair(out0, out1, axis_name)
    val.check_min_batch(z0.shape[0] * coll.axis_size(axis_name), 2, "CO2 (in-batch negatives)",
                        z0.shape)
    return alpha * _co2_divergence(z0, z1, None, t_consistency, axis_name)


def co2_memory_bank_regularizer(
    out0: ArrayLike,
    out1: ArrayLike,
    bank: MemoryBankState,
    *,
    alpha: ArrayLike = 1.0,
    t_consistency: ArrayLike = 0.05,
    update: bool = True,
    axis_name: AxisName = None,
) -> tuple[jax.Array, MemoryBankState]:
    """:func:`co2_regularizer` against a memory bank (lightly's ``memory_bank_size > 0``).

    The negatives are the bank rows **before** the update (stop-gradient); the normalized
    ``out1`` is enqueued afterwards (lightly updates on every call). Returns
    ``(regularizer, new_bank)``.
    """
    val.check_temperature(t_consistency, "t_consistency")
    val.check_scalar_param(alpha, "alpha")
    z0, z1 = _check_pair(out0, out1, axis_name)
    check_memory_bank(bank, z0.shape[1])
    negatives = lax.stop_gradient(bank.bank).astype(z0.dtype)
    loss = alpha * _co2_divergence(z0, z1, negatives, t_consistency, axis_name)
    return loss, (memory_bank_enqueue(bank, z1, axis_name=axis_name) if update else bank)


def _check_labels(labels: ArrayLike, name: str, embeddings: jax.Array,
                  embeddings_name: str) -> jax.Array:
    """Integer class labels of shape ``[batch]`` matching ``embeddings`` (``[batch, dim]``)."""
    return val.as_int_array(
        labels, name, embeddings.shape[:1], meaning="class ids",
        context=f"one label per row of {embeddings_name}, shape {embeddings.shape}")


def supcon_loss(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: ArrayLike = 0.1,
    implementation: str = "auto",
    block_size: int = tiled.DEFAULT_BLOCK_SIZE,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Supervised contrastive loss (SupCon, the :math:`L^{sup}_{out}` form), i.e.
    multi-positive SimCLR.

    The rows are L2-normalized. Each row :math:`i` is an anchor; its positives
    :math:`P(i)` are the *other* rows with the same label and its denominator runs over
    :math:`A(i)`, all rows but the anchor itself:

    .. math::
        \ell_i = -\frac{1}{|P(i)|}\sum_{p \in P(i)}
                 \log\frac{\exp(s_{ip}/\tau)}{\sum_{a \in A(i)} \exp(s_{ia}/\tau)},
        \qquad L = \frac{1}{|V|}\sum_{i \in V} \ell_i,\quad V = \{i : |P(i)| > 0\},

    with :math:`s_{ij}` the cosine similarity. **Anchors without a positive are left out
    of the mean** (their loss is undefined); if no anchor has a positive the loss is 0 with
    zero (finite) gradients.

    Multi-view batches: stack the V views of B images view-major,
    ``embeddings = jnp.concatenate([z_view1, ..., z_viewV])`` (shape ``[V·B, dim]``), and
    pass ``labels = jnp.tile(jnp.arange(B), V)`` for self-supervised multi-positive
    SimCLR, or ``jnp.tile(class_ids, V)`` for supervised contrastive learning. With two
    views and ``jnp.tile(jnp.arange(B), 2)`` this is exactly :func:`ntxent_loss`.

    Args:
      embeddings: ``[batch, dim]`` floating projections.
      labels: ``[batch]`` integer labels; rows with equal labels are positives of each other.
      temperature: τ (may be negative or a traced scalar; ``|τ| < 1e-8`` is rejected).
      axis_name: if set, ``embeddings``/``labels`` are this device's shard; the keys and
        their labels are all-gathered (with gradient), so positives and negatives come from
        the global batch, and the mean runs over the valid anchors of the global batch (the
        count is ``psum``'ed). The result is the loss of one device holding the global
        batch, identical on every device.

      implementation, block_size: ``"auto"``, ``"dense"`` or ``"tiled"`` (memory linear in
        the batch; a ring of devices under ``axis_name``) and the tile edge, static, as in
        :func:`ntxent_loss`.
    Returns:
      Scalar loss (float32, or float64 for float64 inputs).

    Differences from the official code (``SupConLoss(contrast_mode="all")``): no
    ``temperature / base_temperature`` factor (1 at the defaults, 0.07 / 0.07); the official
    code counts anchors without positives as 0 in the mean (after its NaN fix), here they are
    excluded. solo-learn's ``simclr_loss_func(z, indexes)`` is this loss with
    ``labels = indexes``.

    References:
      Khosla et al., `Supervised Contrastive Learning
      <https://arxiv.org/abs/2004.11362>`_, 2020 (Eq. 2).
    """
    val.check_temperature(temperature)
    val.check_axis_name(axis_name)
    z = l2_normalize(val.as_float_array(embeddings, "embeddings", ndim=2))
    labels = _check_labels(labels, "labels", z, "embeddings")
    t = jnp.asarray(temperature, z.dtype)

    lse, pos_mean, valid = _multi_positive_terms(z, labels, t, axis_name,
                                                 implementation=implementation,
                                                 block_size=block_size)
    # −mean_p log softmax_p = lse − mean_p logit_p; masked before any reduction, so anchors
    # without positives (whose lse may be −inf for a global batch of one) carry no gradient.
    per_anchor = jnp.where(valid, lse - pos_mean, 0.0)
    total, count = coll.psum((jnp.sum(per_anchor), jnp.sum(valid.astype(z.dtype))), axis_name)
    return total / jnp.maximum(count, 1.0)


def mocov3_loss(
    query: ArrayLike,
    key: ArrayLike,
    *,
    temperature: ArrayLike = 0.2,
    implementation: str = "auto",
    block_size: int = tiled.DEFAULT_BLOCK_SIZE,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""MoCo v3's contrastive term: InfoNCE of queries against the (gathered) keys, × 2τ.

    Queries and keys are L2-normalized; the positive of query :math:`i` is key :math:`i`
    and the negatives are all other keys of the global batch:

    .. math::
        L = \frac{2\tau}{N}\sum_{i=1}^{N}\Big[-\frac{\langle \hat q_i, \hat k_i\rangle}{\tau}
            + \log\sum_{j=1}^{N}\exp\Big(\frac{\langle \hat q_i, \hat k_j\rangle}{\tau}\Big)\Big]

    i.e. ``2τ · cross_entropy(q̂ k̂ᵀ/τ, labels)`` with ``labels`` the global index of each
    query, as the official code (the 2τ factor makes the gradient scale independent of τ).
    **The keys are stop-gradient** (they are the momentum encoder's output; the official
    code gathers them without gradient), so ``key`` receives no gradient.

    The symmetric MoCo v3 loss of two views is
    ``mocov3_loss(q1, k2) + mocov3_loss(q2, k1)``, with ``q`` from the base encoder
    (with predictor) and ``k`` from the momentum encoder.

    Args:
      query: ``[batch, dim]`` queries (base encoder + predictor).
      key: ``[batch, dim]`` keys of the other view (momentum encoder).
      temperature: τ (default 0.2 as MoCo v3 and solo-learn; may be negative or traced;
        ``|τ| < 1e-8`` rejected).
      axis_name: if set, ``query``/``key`` are this device's shard; the keys are
        all-gathered (stop-gradient), the labels are offset by ``axis_index · batch`` and the
        mean runs over the global batch.

      implementation, block_size: ``"auto"``, ``"dense"`` or ``"tiled"`` (memory linear in
        the batch; a ring of devices under ``axis_name``) and the tile edge, static, as in
        :func:`ntxent_loss`.
    Returns:
      Scalar loss (float32, or float64 for float64 inputs).

    References:
      Chen, Xie and He, `An Empirical Study of Training Self-Supervised Vision Transformers
      <https://arxiv.org/abs/2104.02057>`_, 2021 (Algorithm 1; ``moco/builder.py``).
    """
    val.check_temperature(temperature)
    val.check_axis_name(axis_name)
    q = val.as_float_array(query, "query", ndim=2)
    k = val.as_float_array(key, "key", ndim=2)
    val.check_same_shape(q, k, "query", "key")
    q, k = upcast(q, k)
    q, k = l2_normalize(q), lax.stop_gradient(l2_normalize(k))
    t = jnp.asarray(temperature, q.dtype)
    if tiled.use_tiled(implementation, block_size, q.shape[0],
                       q.shape[0] * coll.axis_size(axis_name)):
        lse, _ = tiled.tiled_lse(q / t, k, k_grad=False, block_size=block_size,
                                 axis_name=axis_name)
    else:
        keys = coll.all_gather(k, axis_name)  # (N, D), no gradient to route back
        lse = masked_logsumexp((q @ keys.T) / t, None, axis=1)
    pos = jnp.sum(q * k, axis=1) / t  # the logit at column axis_index·B + i
    return 2.0 * t * coll.global_mean(jnp.sum(lse - pos), q.shape[0], axis_name)


# ---- issue 4 (part): fovi's multi-pair SimCLR, NNCLR and ReSSL --------------------------
# One primitive serves supcon_loss and fovi_simclr_*: anchors = local rows, keys = the
# gathered rows, positives from equal labels, and an optional "same source" exclusion.


def _multi_positive_terms(
    z: jax.Array,
    labels: jax.Array,
    t: jax.Array,
    axis_name: AxisName,
    sources: jax.Array | None = None,
    *,
    implementation: str = "dense",
    block_size: int = tiled.DEFAULT_BLOCK_SIZE,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-anchor terms of a multi-positive contrastive loss over the global batch.

    ``z`` (B, D) are this participant's L2-normalized rows (anchors); the keys are the
    gathered rows of the global batch (with gradient). Anchor ``i`` has positives
    ``P(i) = {j ≠ i : labels_j = labels_i}`` and its denominator runs over
    ``A(i) = {j ≠ i}``, or, with ``sources``, over ``P(i) ∪ {j : sources_j ≠ sources_i}``
    (every other row of the same source, e.g. the other augmentations of the same image,
    is left out of the denominator without being a positive: fovi's ``pairs_per_sample``).

    Returns:
      ``(lse [B], pos_mean [B], valid [B])``: the logsumexp of ``s_ij/τ`` over the
      denominator, the mean positive logit (0 where there is none) and ``|P(i)| > 0``.
      ``implementation`` selects the tiled / ring path (without ``sources``).
    """
    b = z.shape[0]
    if sources is None and tiled.use_tiled(implementation, block_size, b,
                                           b * coll.axis_size(axis_name)):
        rows = tiled.Rows(ids=coll.global_rows(b, axis_name), labels=labels)
        if axis_name is None:
            lse, extra = tiled.tiled_self_lse(z, 1.0 / t, rows, block_size=block_size)
        else:
            lse, extra = tiled.tiled_lse(
                z / t, z, rows, tiled.Rows(ids=rows.ids, labels=labels), exclude_self=True,
                block_size=block_size, axis_name=axis_name)
        assert extra is not None  # labels given: (positive logit sum, positive count)
        pos_sum, n_pos = extra
        return lse, pos_sum / jnp.maximum(n_pos, 1.0), n_pos > 0
    keys = coll.all_gather(z, axis_name)  # (N, D)
    key_labels = coll.all_gather(labels, axis_name)  # (N,)
    key_sources = None if sources is None else coll.all_gather(sources, axis_name)
    ids = coll.global_rows(z.shape[0], axis_name)
    operand = (ids, labels, key_labels, sources, key_sources)
    positives = _multi_positives(operand)  # P(i)
    n_pos = jnp.sum(jnp.where(positives, 1.0, 0.0).astype(z.dtype), axis=1)
    if axis_name is None:  # symmetric logits: a one-product backward pass
        lse, pos_sum = symmetric_lse_linear(z, t, _multi_positive_candidates, operand,
                                            positives, jnp.ones_like(n_pos))
    else:
        logits = (z @ keys.T) / t
        lse = masked_logsumexp(logits, _multi_positive_candidates(operand), axis=1)
        pos_sum = jnp.sum(jnp.where(positives, logits, 0.0), axis=1)
    return lse, pos_sum / jnp.maximum(n_pos, 1.0), n_pos > 0


def _multi_positives(operand) -> jax.Array:
    """:func:`_multi_positive_terms`' positives ``P(i)`` (anchors × global keys)."""
    ids, labels, key_labels, _, _ = operand
    others = ~coll.own_columns(ids, key_labels.shape[0])
    return others & (labels[:, None] == key_labels[None, :])


def _multi_positive_candidates(operand) -> jax.Array:
    """:func:`_multi_positive_terms`' denominator ``A(i)``: all but the anchor, or
    ``P(i)`` and the rows of other sources (symmetric when anchors = keys)."""
    ids, _, key_labels, sources, key_sources = operand
    if sources is None:
        return ~coll.own_columns(ids, key_labels.shape[0])
    return _multi_positives(operand) | (sources[:, None] != key_sources[None, :])


class FoviSimCLRTerms(NamedTuple):
    """fovi's ``SimCLRLoss`` outputs; the loss is ``num_sim + num_entropy``."""

    num_sim: jax.Array  # mean over the 2·P·N anchors of −s_{i,p(i)}/τ
    num_entropy: jax.Array  # mean over the anchors of log Σ_{j ∈ A(i)} exp(s_ij/τ)


def fovi_simclr_terms(
    z_i: ArrayLike,
    z_j: ArrayLike,
    *,
    pairs_per_sample: int = 1,
    temperature: ArrayLike = 0.5,
    axis_name: AxisName = None,
) -> FoviSimCLRTerms:
    r"""fovi's SimCLR loss as its two terms ``(num_sim, num_entropy)``.

    See :func:`fovi_simclr_loss` for the definition and the arguments.

    Returns:
      ``FoviSimCLRTerms(num_sim, num_entropy)``, scalars: the mean negative positive logit
      and the mean log-denominator over the global batch of anchors (fovi's
      ``SimCLRLoss.forward`` tuple); their sum is the loss.
    """
    val.check_temperature(temperature)
    val.check_axis_name(axis_name)
    p = val.check_int(pairs_per_sample, "pairs_per_sample", 1)
    a = val.as_float_array(z_i, "z_i", ndim=2)
    b = val.as_float_array(z_j, "z_j", ndim=2)
    val.check_same_shape(a, b, "z_i", "z_j")
    if a.shape[0] % p:
        raise ValueError(
            f"z_i must have a multiple of pairs_per_sample={p} rows (pairs_per_sample "
            f"consecutive rows per image), got shape {a.shape}"
        )
    m = a.shape[0]
    z = l2_normalize(jnp.concatenate(upcast(a, b), axis=0))  # (2M, D): [z_i; z_j]
    pair = coll.global_rows(m, axis_name)  # global pair index (image-major, P per image)
    labels = jnp.concatenate([pair, pair])
    lse, pos, _ = _multi_positive_terms(z, labels, jnp.asarray(temperature, z.dtype),
                                        axis_name, sources=labels // p)
    sums = coll.psum(jnp.stack([-jnp.sum(pos), jnp.sum(lse)]), axis_name)
    sums = sums / (2 * m * coll.axis_size(axis_name))
    return FoviSimCLRTerms(sums[0], sums[1])


def fovi_simclr_loss(
    z_i: ArrayLike,
    z_j: ArrayLike,
    *,
    pairs_per_sample: int = 1,
    temperature: ArrayLike = 0.5,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""fovi's SimCLR loss: NT-Xent with ``pairs_per_sample`` augmented pairs per image.

    ``z_i`` and ``z_j`` hold the two views of ``N·P`` pairs, **sample-major** as fovi:
    rows ``n·P, …, n·P + P − 1`` are the P pairs of image ``n``, and row ``r`` of ``z_i``
    is paired with row ``r`` of ``z_j``. With ``s_ij`` the cosine similarities of the
    2NP rows of ``[z_i; z_j]``, each row ``i`` is an anchor whose positive ``p(i)`` is
    its pair partner and whose negatives are the rows of **other images** only: the
    other ``2P − 2`` views of the same image are in neither the numerator nor the
    denominator.

    .. math::
        \ell_i = -\frac{s_{i,p(i)}}{\tau} + \log\Big(e^{s_{i,p(i)}/\tau}
                 + \sum_{j:\ \mathrm{img}(j) \ne \mathrm{img}(i)} e^{s_{ij}/\tau}\Big),
        \qquad L = \frac{1}{2NP}\sum_i \ell_i
                 = \texttt{num\_sim} + \texttt{num\_entropy}

    ``pairs_per_sample=1`` is :func:`ntxent_loss`. Built on the primitive of
    :func:`supcon_loss` (labels = pair ids) with a same-image exclusion mask.

    Args:
      z_i: ``[N·P, dim]`` first views, P consecutive rows per image.
      z_j: ``[N·P, dim]`` second views, same layout.
      pairs_per_sample: P, the number of augmented pairs per image (static int >= 1);
        the number of rows must be a multiple of it (on every device).
      temperature: τ (fovi has no default; its configs use 0.5). May be traced or
        negative; ``|τ| < 1e-8`` is rejected.
      axis_name: if set, each device passes its own ``[N_local·P, dim]`` rows (whole
        images: a device never splits an image's pairs); keys are all-gathered with
        gradient and the loss is the global mean, identical on every device.

    Returns:
      Scalar loss (float32, or float64 for float64 inputs).

    Differences from fovi ``SimCLRLoss(batch_size, world_size, gpu, temperature,
    pairs_per_sample)``: a plain function of any batch size (fovi precomputes an
    ``(2PBW)²`` mask for a fixed batch size); returns the sum (see
    :func:`fovi_simclr_terms` for fovi's tuple); under ``axis_name`` each device computes
    only its (local rows × global columns) logits and returns the global loss (every
    fovi rank computes the full ``(2PBW)²`` logits: same value and gradient after DDP,
    replicated work). Computed in >= float32 with a masked logsumexp.

    References:
      Chen et al., `A Simple Framework for Contrastive Learning of Visual Representations
      <https://arxiv.org/abs/2002.05709>`_, 2020; fovi ``fovi/utils/losses.py``.
    """
    t = fovi_simclr_terms(z_i, z_j, pairs_per_sample=pairs_per_sample,
                          temperature=temperature, axis_name=axis_name)
    return t.num_sim + t.num_entropy


def nnclr_loss(
    z: ArrayLike,
    p: ArrayLike,
    queue: MemoryBankState,
    *,
    temperature: ArrayLike = 0.1,
    update: bool = True,
    axis_name: AxisName = None,
) -> tuple[jax.Array, MemoryBankState]:
    r"""NNCLR: InfoNCE between the support-set nearest neighbours of ``z`` and the
    predictions ``p`` of the other view (solo-learn ``nnclr_loss_func``).

    With :math:`\hat z_i` the L2-normalized, stop-gradient projections and :math:`Q` the
    support set (the queue **before** this call's update, stop-gradient),
    :math:`\mathrm{nn}_i = \arg\max_{q \in Q}\langle \hat z_i, q\rangle` (normalized) and
    :math:`\hat p_j` the normalized predictions of the global batch:

    .. math::
        L = \frac{1}{N}\sum_{i=1}^{N}\Big[-\frac{\langle \mathrm{nn}_i, \hat p_i\rangle}{\tau}
            + \log\sum_{j=1}^{N}\exp\Big(\frac{\langle \mathrm{nn}_i, \hat p_j\rangle}{\tau}
            \Big)\Big]

    i.e. ``cross_entropy(nn p̂ᵀ/τ, labels)`` with rank-offset labels; then the normalized
    ``ẑ`` of the global batch is enqueued (read before, updated after). Only ``p``
    receives a gradient. The symmetric NNCLR loss of two views shares the queue read::

        l1, new_queue = nnclr_loss(z1, p2, queue)
        l2, _ = nnclr_loss(z2, p1, queue, update=False)
        loss = 0.5 * (l1 + l2)

    Args:
      z: ``[batch, dim]`` projections used to look up the neighbours (and enqueued).
      p: ``[batch, dim]`` predictions of the other view.
      queue: the support set, a ``MemoryBankState`` from
        ``init_memory_bank(key, queue_size, dim)`` (random unit rows, as solo-learn).
      temperature: τ (solo-learn's function default 0.1; may be traced).
      update: if True (static), enqueue ``ẑ`` (FIFO, wrapping around).
      axis_name: if set, ``p`` is all-gathered with gradient (labels offset by
        ``axis_index · batch``), the loss is the global mean and the gathered global
        ``ẑ`` is enqueued on every device.

    Returns:
      ``(loss, new_queue)``.

    Differences from solo-learn: the queue is an explicit state (solo-learn keeps a
    buffer and asserts ``queue_size % global_batch == 0``; here a batch wraps around);
    solo-learn also stores labels next to the queue for its nn-accuracy metric (not part
    of the loss, left out).

    References:
      Dwibedi et al., `With a Little Help from My Friends: Nearest-Neighbor Contrastive
      Learning of Visual Representations <https://arxiv.org/abs/2104.14548>`_, 2021.
    """
    val.check_temperature(temperature)
    val.check_axis_name(axis_name)
    zz = val.as_float_array(z, "z", ndim=2)
    pp = val.as_float_array(p, "p", ndim=2)
    val.check_same_shape(zz, pp, "z", "p")
    check_memory_bank(queue, zz.shape[1], "queue")
    zz, pp = upcast(zz, pp)
    z_hat = lax.stop_gradient(l2_normalize(zz))
    support = lax.stop_gradient(queue.bank).astype(z_hat.dtype)
    nn = l2_normalize(support[argmax_first(z_hat @ support.T, axis=1)])  # (B, D)
    p_hat = l2_normalize(pp)
    t = jnp.asarray(temperature, p_hat.dtype)
    lse = masked_logsumexp((nn @ coll.all_gather(p_hat, axis_name).T) / t, None, axis=1)
    pos = jnp.sum(nn * p_hat, axis=1) / t  # the logit at column axis_index·B + i
    loss = coll.global_mean(jnp.sum(lse - pos), zz.shape[0], axis_name)
    new_queue = memory_bank_enqueue(queue, z_hat, axis_name=axis_name) if update else queue
    return loss, new_queue


def ressl_loss(
    q: ArrayLike,
    k: ArrayLike,
    queue: MemoryBankState,
    *,
    temperature_q: ArrayLike = 0.1,
    temperature_k: ArrayLike = 0.04,
    update: bool = True,
    axis_name: AxisName = None,
) -> tuple[jax.Array, MemoryBankState]:
    r"""ReSSL's relational loss: the query's similarity distribution over a queue matches
    the (sharper) key's (solo-learn ``ressl_loss_func``).

    With L2-normalized :math:`\hat q_i`, stop-gradient :math:`\hat k_i` and the queue rows
    :math:`u_m` **before** this call's update (stop-gradient):

    .. math::
        L = -\frac{1}{N}\sum_i\sum_m
            \operatorname{softmax}_m\Big(\frac{\langle \hat k_i, u_m\rangle}{\tau_k}\Big)
            \log\operatorname{softmax}_m\Big(\frac{\langle \hat q_i, u_m\rangle}{\tau_q}\Big)

    a cross-entropy, i.e. ``KL(p_k ‖ p_q)`` plus the (constant) entropy of the target.
    The normalized keys of the global batch are enqueued afterwards, as MoCo's bank
    (:func:`ntxent_memory_bank_loss`): the queue is an explicit ``MemoryBankState``.

    Args:
      q: ``[batch, dim]`` queries (online encoder + predictor).
      k: ``[batch, dim]`` keys of the other view (momentum encoder); stop-gradient.
      queue: ``MemoryBankState`` (``init_memory_bank(key, queue_size, dim)``).
      temperature_q: τ_q of the query distribution (0.1).
      temperature_k: τ_k of the target distribution (0.04); both may be traced.
      update: if True (static), enqueue the normalized ``k``.
      axis_name: if set, the loss is the global mean and the gathered global keys are
        enqueued on every device (the loss itself needs no other collective).

    Returns:
      ``(loss, new_queue)``.

    Differences from solo-learn: ``q`` and ``k`` are L2-normalized here (solo-learn's
    ReSSL method normalizes them before calling ``ressl_loss_func``, which does not);
    the queue is explicit state with a wrap-around enqueue.

    References:
      Zheng et al., `ReSSL: Relational Self-Supervised Learning with Weak Augmentation
      <https://arxiv.org/abs/2107.09282>`_, NeurIPS 2021.
    """
    val.check_temperature(temperature_q, "temperature_q")
    val.check_temperature(temperature_k, "temperature_k")
    val.check_axis_name(axis_name)
    qq = val.as_float_array(q, "q", ndim=2)
    kk = val.as_float_array(k, "k", ndim=2)
    val.check_same_shape(qq, kk, "q", "k")
    check_memory_bank(queue, qq.shape[1], "queue")
    qq, kk = upcast(qq, kk)
    q_hat, k_hat = l2_normalize(qq), lax.stop_gradient(l2_normalize(kk))
    u = lax.stop_gradient(queue.bank).astype(q_hat.dtype)
    # scaled rows, then one product each (XLA merges the two products; scales after
    # them would be one logits-sized operand, see divide_by)
    log_q = jax.nn.log_softmax(divide_by(q_hat, temperature_q) @ u.T, axis=1)
    target = jax.nn.softmax(divide_by(k_hat, temperature_k) @ u.T, axis=1)
    loss = coll.global_mean(-jnp.sum(target * log_q), qq.shape[0], axis_name)
    new_queue = memory_bank_enqueue(queue, k_hat, axis_name=axis_name) if update else queue
    return loss, new_queue
