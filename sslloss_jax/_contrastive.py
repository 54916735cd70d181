"""Two-view contrastive losses: NT-Xent (SimCLR), NT-Xent with a memory bank (MoCo), DCL/DCLW."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from sslloss_jax import _collectives as coll
from sslloss_jax import _validation as val
from sslloss_jax._memory_bank import MemoryBankState, check_memory_bank, memory_bank_enqueue
from sslloss_jax._numerics import l2_normalize, masked_logsumexp
from sslloss_jax._types import ArrayLike, AxisName

__all__ = [
    "co2_regularizer",
    "co2_memory_bank_regularizer",
    "ntxent_loss",
    "ntxent_memory_bank_loss",
    "dcl_loss",
    "dclw_loss",
    "negative_mises_fisher_weights",
]


def _check_pair(out0: ArrayLike, out1: ArrayLike, axis_name: AxisName):
    """Validates two (B, D) views and returns them L2-normalized in >= float32."""
    val.check_axis_name(axis_name)
    out0 = val.as_float_array(out0, "out0", ndim=2)
    out1 = val.as_float_array(out1, "out1", ndim=2)
    val.check_same_shape(out0, out1, "out0", "out1")
    return l2_normalize(out0), l2_normalize(out1)


def _candidates(rows: jax.Array, view: jax.Array, sample: jax.Array, n: int,
                exclude_positive: bool) -> jax.Array:
    """(rows, 2N) mask of the columns of ``[z0_all; z1_all]`` an anchor is contrasted with:
    all but itself, and (DCL) all but its positive."""
    cols = jnp.arange(2 * n, dtype=jnp.int32)[None, :]
    mask = cols != (view * n + sample)[:, None]
    if exclude_positive:
        mask &= cols != ((1 - view) * n + sample)[:, None]
    return mask


def _self_candidates(n: int, exclude_positive: bool) -> jax.Array:
    rows = jnp.arange(2 * n, dtype=jnp.int32)
    return _candidates(rows, rows // n, rows % n, n, exclude_positive)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _self_lse(z: jax.Array, temperature: jax.Array, exclude_positive: bool) -> jax.Array:
    """Row logsumexps of ``z zᵀ/τ`` over the candidates, for anchors = keys = ``z``.

    ``z`` is ``[z0; z1]`` (2N, D) on one device. The logits are symmetric, so the custom
    VJP needs one matmul, ``dz = (dL + dLᵀ) z / τ``, where autodiff would do two
    (2 instead of 3 matmuls of (2N)²·D in all). Also differentiable in τ.
    """
    return _self_lse_fwd(z, temperature, exclude_positive)[0]


def _self_lse_fwd(z, temperature, exclude_positive):
    logits = (z @ z.T) / temperature
    lse = masked_logsumexp(logits, _self_candidates(z.shape[0] // 2, exclude_positive), axis=1)
    return lse, (z, temperature, logits, lse)


def _self_lse_bwd(exclude_positive, res, g):
    z, temperature, logits, lse = res
    mask = _self_candidates(z.shape[0] // 2, exclude_positive)
    # dL + dLᵀ without a transpose: the logits and the mask are symmetric, so
    # (dL)ᵀ_ij = g_j exp(L_ij − lse_j); both exponents are <= 0 on candidates.
    sym = jnp.where(mask, g[:, None] * jnp.exp(logits - lse[:, None])
                    + g[None, :] * jnp.exp(logits - lse[None, :]), 0.0)
    dz = (sym @ z) / temperature
    dt = -0.5 * jnp.sum(sym * logits) / temperature
    return dz, dt.astype(temperature.dtype)


_self_lse.defvjp(_self_lse_fwd, _self_lse_bwd)


def _two_view_contrastive(
    z0: jax.Array,
    z1: jax.Array,
    temperature: ArrayLike,
    axis_name: AxisName,
    *,
    exclude_positive: bool,
    pos_weight: jax.Array | None = None,
    symmetric_vjp: bool = True,
) -> jax.Array:
    """Mean over the 2N global anchors of ``lse_{j ∈ cand(i)} s_ij/τ − w_i·s_i,pos/τ``.

    Anchors are the local rows of ``[z0; z1]``; candidates are all 2N global rows of
    ``[z0_all; z1_all]`` except the anchor itself (and, if ``exclude_positive``, except its
    positive, which gives DCL's decoupled denominator). ``pos_weight`` (shape [2B])
    multiplies the positive term. Logits are only ever (2B, 2N): local rows against
    gathered columns. On one device (``axis_name=None``) the symmetric custom VJP of
    :func:`_self_lse` is used unless ``symmetric_vjp=False``.
    """
    b = z0.shape[0]
    anchors = jnp.concatenate([z0, z1], axis=0)  # (2B, D)
    t = jnp.asarray(temperature, anchors.dtype)
    if axis_name is None and symmetric_vjp:
        lse = _self_lse(anchors, t, exclude_positive)
    else:
        n = b * coll.axis_size(axis_name)
        keys = jnp.concatenate([coll.all_gather(z0, axis_name), coll.all_gather(z1, axis_name)])
        rows = jnp.arange(2 * b, dtype=jnp.int32)
        sample = coll.axis_index(axis_name) * b + rows % b  # global sample index of each anchor
        mask = _candidates(rows, rows // b, sample, n, exclude_positive)
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
    return _two_view_contrastive(z0, z1, temperature, axis_name, exclude_positive=False)


def ntxent_memory_bank_loss(
    out0: ArrayLike,
    out1: ArrayLike,
    bank: MemoryBankState,
    *,
    temperature: ArrayLike = 0.5,
    update: bool = True,
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
    # log(e^pos + Σ_m e^{neg_m}) without materializing the concatenated logits
    lse = jnp.logaddexp(pos, masked_logsumexp((z0 @ negatives.T) / temperature, None, axis=1))
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
        z0, z1, temperature, axis_name, exclude_positive=True, pos_weight=weights
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
    )


def _co2_divergence(z0, z1, negatives, t_consistency, axis_name):
    """α-free CO2 term: ½·[KL(q‖p) + KL(p‖q)] averaged over the global batch, where p and
    q are the softmaxes over [positive, negatives] of each view against the other."""
    b = z0.shape[0]

    def pseudo_labels(query, positive, neg_keys, self_mask):
        pos = jnp.sum(query * positive, axis=1, keepdims=True)
        neg = query @ neg_keys.T
        logits = jnp.concatenate([pos, neg], axis=1) / t_consistency
        if self_mask is None:
            return jax.nn.log_softmax(logits, axis=1), None
        where = jnp.concatenate([jnp.ones((b, 1), bool), self_mask], axis=1)
        logp = logits - masked_logsumexp(logits, where, axis=1)[:, None]
        return jnp.where(where, logp, 0.0), where

    if negatives is None:  # the other samples of the (global) batch
        n = b * coll.axis_size(axis_name)
        self_col = coll.axis_index(axis_name) * b + jnp.arange(b, dtype=jnp.int32)
        mask = jnp.arange(n, dtype=jnp.int32)[None, :] != self_col[:, None]
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
