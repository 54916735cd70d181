"""Clustering losses built on one Sinkhorn-Knopp primitive: SwaV (with an explicit queue)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sslloss_jax import _collectives as coll
from sslloss_jax import _validation as val
from sslloss_jax._memory_bank import MemoryBankState, init_memory_bank, memory_bank_enqueue
from sslloss_jax._numerics import masked_logsumexp, upcast
from sslloss_jax._types import ArrayLike, AxisName

__all__ = [
    "sinkhorn",
    "swav_loss",
    "SwaVQueueState",
    "init_swav_queue",
    "swav_queue_update",
]


def _global_count(valid: jax.Array | None, local: int, axis_name: AxisName) -> jax.Array:
    if valid is None:
        return jnp.asarray(float(local * coll.axis_size(axis_name)))
    return coll.psum(jnp.sum(valid.astype(jnp.float32)), axis_name)


def sinkhorn(
    scores: ArrayLike,
    *,
    iterations: int = 3,
    epsilon: ArrayLike = 0.05,
    prototype_marginals: ArrayLike | None = None,
    valid: ArrayLike | None = None,
    stable: bool = True,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Sinkhorn-Knopp equipartition of samples over prototypes (SwaV, MSN, CAPI).

    Starting from :math:`Q = \exp(S/\epsilon)`, alternately rescales each prototype's
    total over the (global) batch to its marginal and each sample's codes to sum to one;
    returns the codes, one distribution over prototypes per sample.

    With ``stable=True`` (default) it runs in the log domain in >= float32: no overflow
    for large scores, small ``epsilon`` or half-precision inputs. ``stable=False`` runs
    lightly's unshifted algorithm (``exp(S/ε)`` normalized by its total, then the loop):
    the same values in exact arithmetic, but ``exp`` overflows to inf/NaN once
    ``S/ε`` exceeds ~88 in float32 (e.g. cosine scores with ε < 0.012).

    Args:
      scores: ``[batch, K]`` sample-prototype scores (stop-gradient them for SwaV codes).
      iterations: number of (prototype, sample) normalization rounds (static, >= 0).
      epsilon: entropic regularization ε (may be traced).
      prototype_marginals: ``[K]`` non-negative target mass per prototype (e.g. a power
        law, as PMSN and VISSL), normalized internally; ``None`` is uniform.
      valid: optional ``[batch]`` boolean: rows that take part (others get zero codes and
        do not count), e.g. a queue that is not in use yet.
      stable: see above.
      axis_name: optional axis: the prototype totals and the sample count are over the
        global batch (``psum``), so the codes equal those of the global batch.

    Returns:
      ``[batch, K]`` codes in the compute dtype; each valid row sums to 1.
    """
    val.check_axis_name(axis_name)
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    val.check_temperature(epsilon, "epsilon", positive=True)
    (s,) = upcast(val.as_float_array(scores, "scores", ndim=2))
    b, k = s.shape
    log_r = jnp.zeros((k,), s.dtype)
    if prototype_marginals is not None:
        r = val.as_float_array(prototype_marginals, "prototype_marginals", ndim=1)
        if r.shape != (k,):
            raise ValueError(f"prototype_marginals must have shape ({k},), got {r.shape}")
        r = r.astype(s.dtype)
        log_r = jnp.log(r / jnp.sum(r)) + math.log(k)  # mean 1 on a log scale, as uniform
    mask = None
    if valid is not None:
        mask = jnp.asarray(valid)
        if mask.shape != (b,) or mask.dtype != jnp.bool_:
            raise ValueError(f"valid must be a boolean [{b}] array, got {mask.dtype} {mask.shape}")
    n = _global_count(mask, b, axis_name).astype(s.dtype)
    cells = None if mask is None else jnp.broadcast_to(mask[:, None], s.shape)
    if stable:
        return _sinkhorn_log(s / epsilon, log_r, n, cells, iterations, axis_name)
    return _sinkhorn_lightly(s / epsilon, log_r, n, cells, iterations, axis_name)


def _sinkhorn_log(logits, log_r, n, cells, iterations, axis_name):
    def total_lse(x):  # log of the global sum over valid cells
        return coll.global_logsumexp(masked_logsumexp(x, cells, axis=(0, 1)), axis_name)

    def one_round(_, x):
        per_proto = coll.global_logsumexp(masked_logsumexp(x, cells, axis=0), axis_name)
        x = x - per_proto[None, :] + log_r[None, :]
        return x - masked_logsumexp(x, cells, axis=1)[:, None] - jnp.log(n)

    x = logits - total_lse(logits)
    x = lax.fori_loop(0, iterations, one_round, x)
    q = jnp.exp(x + jnp.log(n))
    return q if cells is None else jnp.where(cells, q, 0.0)


def _sinkhorn_lightly(logits, log_r, n, cells, iterations, axis_name):
    """lightly's ``sinkhorn``: exp without a shift, then the same normalizations."""
    q = jnp.exp(logits)
    if cells is not None:
        q = jnp.where(cells, q, 0.0)
    q = q / coll.psum(jnp.sum(q), axis_name)
    r = jnp.exp(log_r)[None, :]

    def one_round(_, q):
        q = q / coll.psum(jnp.sum(q, axis=0, keepdims=True), axis_name) * r
        col = jnp.sum(q, axis=1, keepdims=True)
        q = q / (col if cells is None else jnp.where(cells[:, :1], col, 1.0))
        return q / n

    return lax.fori_loop(0, iterations, one_round, q) * n


class SwaVQueueState(NamedTuple):
    """SwaV's feature queue: one FIFO of past (projected, normalized) features per
    high-resolution crop, scored with the *current* prototypes at each step.

    Attributes:
      features: ``[n_crops, size, dim]``.
      ptr: ``[]`` int32 next write position (shared by the crops).
      filled: ``[]`` int32 number of rows written so far, saturating at ``size``.
    """

    features: jax.Array
    ptr: jax.Array
    filled: jax.Array


def init_swav_queue(
    n_crops: int, size: int, dim: int, dtype: jnp.dtype = jnp.float32
) -> SwaVQueueState:
    """An empty queue (``filled = 0``) of ``n_crops × size`` rows of dimension ``dim``."""
    if not isinstance(n_crops, int) or n_crops < 1:
        raise ValueError(f"n_crops must be a positive int, got {n_crops!r}")
    bank = init_memory_bank(jax.random.key(0), size, dim, dtype)
    return SwaVQueueState(jnp.zeros((n_crops, size, dim), dtype), bank.ptr,
                          jnp.zeros((), jnp.int32))


def swav_queue_update(
    state: SwaVQueueState, features: Sequence[ArrayLike] | ArrayLike, *,
    axis_name: AxisName = None,
) -> SwaVQueueState:
    """Enqueues this step's features (one ``[batch, dim]`` per crop; stop-gradient).

    FIFO with wrap-around (see :func:`memory_bank_enqueue`); under ``axis_name`` the global
    batch is enqueued on every device.
    """
    feats = _stack_views(features, "features")
    if feats.shape[0] != state.features.shape[0]:
        raise ValueError(
            f"features has {feats.shape[0]} crops but the queue holds {state.features.shape[0]}"
        )
    new = [memory_bank_enqueue(MemoryBankState(q, state.ptr), f, axis_name=axis_name)
           for q, f in zip(state.features, feats, strict=True)]
    added = feats.shape[1] * coll.axis_size(axis_name)
    filled = jnp.minimum(state.filled + added, state.features.shape[1]).astype(jnp.int32)
    return SwaVQueueState(jnp.stack([m.bank for m in new]), new[0].ptr, filled)


def _stack_views(views, name: str, ndim: int = 2) -> jax.Array:
    if isinstance(views, (list, tuple)):
        arrays = [val.as_float_array(v, f"{name}[{i}]", ndim=ndim) for i, v in enumerate(views)]
        for i, a in enumerate(arrays[1:], 1):
            val.check_same_shape(arrays[0], a, f"{name}[0]", f"{name}[{i}]")
        if not arrays:
            return jnp.zeros((0, 0, 0))
        return jnp.stack(arrays)
    return val.as_float_array(views, name, ndim=ndim + 1)


def swav_loss(
    high_resolution_outputs: Sequence[ArrayLike] | ArrayLike,
    low_resolution_outputs: Sequence[ArrayLike] | ArrayLike = (),
    queue_outputs: Sequence[ArrayLike] | ArrayLike | None = None,
    *,
    temperature: ArrayLike = 0.1,
    sinkhorn_iterations: int = 3,
    sinkhorn_epsilon: ArrayLike = 0.05,
    queue_valid: ArrayLike | None = None,
    stable_sinkhorn: bool = True,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""SwaV swapped-prediction loss with Sinkhorn codes.

    For each high-resolution crop i, codes :math:`q_i` = Sinkhorn of its (stop-gradient)
    scores, optionally stacked with the queue's scores; every other crop v predicts them:

    .. math::
        L = \frac{1}{V_h}\sum_i \frac{1}{V-1}\sum_{v\ne i}
            -\frac1N\sum_n q_{i,n}\cdot\log\operatorname{softmax}(z_{v,n}/\tau)

    Args:
      high_resolution_outputs: ``V_h`` arrays ``[batch, K]`` (scores = features ·
        prototypesᵀ) or a stacked ``[V_h, batch, K]``.
      low_resolution_outputs: ``V_l`` arrays ``[batch, K]`` (may be empty).
      queue_outputs: optional queue scores, one ``[Q, K]`` per high-resolution crop: the
        queue features of :class:`SwaVQueueState` scored with the current prototypes.
        Under ``axis_name`` the queue is replicated and each device uses its
        ``Q / axis_size`` slice, so the global problem holds it once.
      temperature: τ of the softmax (may be traced).
      sinkhorn_iterations, sinkhorn_epsilon: Sinkhorn settings.
      queue_valid: optional traced bool scalar or ``[Q]`` mask: queue rows that take part
        (``state.filled``-based or ``step >= start``), so switching the queue on needs no
        retrace.
      stable_sinkhorn: False runs lightly's unshifted Sinkhorn (see :func:`sinkhorn`).
      axis_name: optional axis; Sinkhorn sums and the loss are over the global batch.

    Returns:
      Scalar loss (lightly returns shape (1,)).

    References:
      Caron et al., `Unsupervised Learning of Visual Features by Contrasting Cluster
      Assignments <https://arxiv.org/abs/2006.09882>`_, 2020.
    """
    val.check_axis_name(axis_name)
    val.check_temperature(temperature)
    high = _stack_views(high_resolution_outputs, "high_resolution_outputs")
    vh, b, k = high.shape
    low = _stack_views(low_resolution_outputs, "low_resolution_outputs")
    if low.size and low.shape[1:] != (b, k):
        raise ValueError(
            f"low_resolution_outputs views must have shape {(b, k)}, got {low.shape[1:]}")
    crops = jnp.concatenate([high, low]) if low.size else high
    n_crops = crops.shape[0]
    if n_crops < 2:
        raise ValueError(f"swav_loss needs at least two crops in total, got {n_crops}")
    high32, crops32 = upcast(high, crops)
    codes_in = lax.stop_gradient(high32)
    valid = None
    if queue_outputs is not None:
        queue = _stack_views(queue_outputs, "queue_outputs")
        if queue.shape[0] != vh or queue.shape[2] != k:
            raise ValueError(
                f"queue_outputs must hold {vh} arrays of shape (Q, {k}), got {queue.shape}")
        w = coll.axis_size(axis_name)
        if queue.shape[1] % w:
            raise ValueError(
                f"the queue size {queue.shape[1]} must be a multiple of the axis size {w}")
        qs = queue.shape[1] // w
        queue = lax.dynamic_slice_in_dim(queue, coll.axis_index(axis_name) * qs, qs, axis=1)
        codes_in = jnp.concatenate([codes_in, lax.stop_gradient(queue).astype(codes_in.dtype)],
                                   axis=1)
        valid = jnp.ones((b + qs,), bool)
        if queue_valid is not None:
            qv = jnp.asarray(queue_valid, bool)
            if qv.ndim == 1:
                qv = lax.dynamic_slice_in_dim(qv, coll.axis_index(axis_name) * qs, qs)
            valid = valid.at[b:].set(jnp.broadcast_to(qv, (qs,)))
    codes = jax.vmap(lambda s: sinkhorn(
        s, iterations=sinkhorn_iterations, epsilon=sinkhorn_epsilon, valid=valid,
        stable=stable_sinkhorn, axis_name=axis_name))(codes_in)[:, :b]  # (V_h, B, K)
    logp = jax.nn.log_softmax(crops32 / temperature, axis=-1)  # (V, B, K)
    cross = -jnp.einsum("ibk,vbk->iv", codes, logp)  # summed over the local batch
    cross = jnp.where(jnp.eye(vh, n_crops, dtype=bool), 0.0, cross)
    return coll.global_mean(jnp.sum(cross), b * (n_crops - 1) * vh, axis_name)
