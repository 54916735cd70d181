"""Clustering losses built on Sinkhorn-Knopp: SwaV (with an explicit queue), MSN/PMSN, CAPI."""

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
from sslloss_jax._numerics import (
    cross_view_entropy,
    divide_by,
    l2_normalize,
    lead_ones,
    masked_logsumexp,
    matmul_nt,
    max_leading,
    soft_cross_entropy,
    sum_leading,
    upcast,
)
from sslloss_jax._types import ArrayLike, AxisName

__all__ = [
    "capi_loss",
    "msn_loss",
    "pmsn_loss",
    "pmsn_custom_loss",
    "power_law_distribution",
    "sinkhorn",
    "swav_loss",
    "SwaVQueueState",
    "init_swav_queue",
    "swav_queue_update",
]


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

    With ``stable=True`` (default) it never overflows, in >= float32: when the (global)
    range of ``S/ε`` fits the exponent range of the compute dtype (below 50 in float32,
    e.g. cosine scores with ε >= 0.04), it runs lightly's multiplicative algorithm on
    ``exp(S/ε − max)`` (one ``exp`` pass, then matrix-vector products; past 32 MiB of
    that array, sweeps over row blocks that recompute their ``exp`` once per round and
    never store the whole); otherwise it runs in the log domain (an ``exp`` pass per
    half-iteration). All are the same function in exact arithmetic. ``stable=False``
    runs lightly's unshifted algorithm (``exp(S/ε)`` normalized by its total, then the
    loop): ``exp`` overflows to inf/NaN once ``S/ε`` exceeds ~88 in float32 (e.g. cosine
    scores with ε < 0.012), and small codes underflow.

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
    val.check_int(iterations, "iterations", 0)
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
    return _sinkhorn(s / epsilon, log_r, mask, iterations, stable, axis_name)


# Largest global range of S/ε for which the shifted multiplicative Sinkhorn is used:
# exp(−range) stays far from underflow and the scalings far from overflow.
_SHIFTED_RANGE = {jnp.dtype(jnp.float32): 50.0, jnp.dtype(jnp.float64): 300.0}
#: Sinkhorn rounds up to this many are unrolled (see :func:`_rounds`).
_UNROLL_MAX = 8
#: Past this many bytes of ``exp`` array, the shifted Sinkhorn runs in row blocks
#: (:func:`_sinkhorn_scaling_blocked`): XLA:CPU would write it out, and glibc maps such
#: a buffer afresh on every call. Blocks of about :data:`_BLOCK_BYTES` stay in cache.
_BLOCKED_BYTES = 32 * 2**20
_BLOCK_BYTES = 3 * 2**20


def _rounds(one_round, iterations: int, init):
    """``lax.fori_loop(0, iterations, one_round, init)``, unrolled for up to
    :data:`_UNROLL_MAX` rounds: XLA:CPU copies a ``while`` loop's loop-invariant operands
    (the ``exp`` array every round reads) into its carried state on every call, and
    cannot fuse across its boundary."""
    if iterations > _UNROLL_MAX:
        return lax.fori_loop(0, iterations, one_round, init)
    for i in range(iterations):
        init = one_round(i, init)
    return init


def _sinkhorn(logits, log_r, mask, iterations, stable, axis_name, rows=None, scale=None):
    """Sinkhorn of ``[..., batch, K]`` logits ``S/ε``, independently per leading index.

    ``mask``: optional ``[..., batch]`` valid rows. One branch decision (a scalar, the
    same on every device) covers all leading indices, so a stack of problems (SwaV's
    crops) is not turned into a ``select`` of both branches. ``rows``: return only the
    codes of the first ``rows`` rows (SwaV drops its queue's), which spares writing the
    others. ``logits`` may be a tuple of blocks along the batch axis and ``scale`` a
    positive factor (``1/ε``): both are applied inside the branches, fused into their
    first pass, so neither the concatenation nor the scaled logits are written out as
    the ``cond``'s operand (SwaV with a 3840-row queue: 94 MiB each).
    """
    parts = logits if isinstance(logits, tuple) else (logits,)

    def full(parts):
        x = jnp.concatenate(parts, axis=-2) if len(parts) > 1 else parts[0]
        return x if scale is None else x * scale

    shape = parts[0].shape[:-2] + (sum(p.shape[-2] for p in parts), parts[0].shape[-1])
    dtype = parts[0].dtype
    blocked = math.prod(shape) * jnp.dtype(dtype).itemsize > _BLOCKED_BYTES
    log_r = lead_ones(log_r, len(shape))
    n = (jnp.asarray(float(shape[-2] * coll.axis_size(axis_name)), dtype)
         if mask is None else
         coll.psum(jnp.sum(mask.astype(dtype), axis=-1), axis_name)[..., None, None])
    rows = shape[-2] if rows is None else rows
    if not stable:
        return _sinkhorn_scaling(full(parts), log_r, n, mask, iterations, axis_name, rows)
    cells = None if mask is None else jnp.broadcast_to(mask[..., None], shape)
    top, bottom = _global_range(parts, cells, axis_name)
    if scale is not None:
        top, bottom = top * scale, bottom * scale
    fits = top - bottom <= _SHIFTED_RANGE.get(jnp.dtype(dtype), 50.0)
    shift = jnp.where(jnp.isfinite(top), top, 0.0)

    def scaling(p):
        if blocked:
            return _sinkhorn_scaling_blocked(p, scale, shift, log_r, n, mask, iterations,
                                             axis_name, rows)
        return _sinkhorn_scaling(full(p) - shift, log_r, n, mask, iterations, axis_name, rows)

    return lax.cond(
        fits,
        scaling,
        lambda p: _sinkhorn_log(full(p), log_r, n, cells, iterations, axis_name, rows),
        parts)


def _global_range(parts: tuple, where: jax.Array | None, axis_name: AxisName):
    """(max, min) over the ``where`` cells of every device of the blocks ``parts``
    (concatenated along axis -2): per block a max and a min reduction."""
    lo, hi = jnp.asarray(-jnp.inf, parts[0].dtype), jnp.asarray(jnp.inf, parts[0].dtype)
    tops, bottoms, start = [], [], 0
    for x in parts:
        cells = None if where is None else where[..., start:start + x.shape[-2], :]
        start += x.shape[-2]
        # one pass for both (a variadic reduce) per row, XLA:CPU splits rows over its
        # threads; a reduction to a scalar runs on one (SwaV's 3840-row queue: 2 passes
        # over 92 MB, 5 ms, against 2.5)
        top, bottom = lax.reduce(
            (x if cells is None else jnp.where(cells, x, lo),
             x if cells is None else jnp.where(cells, x, hi)), (lo, hi),
            lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])), (x.ndim - 1,))
        tops.append(jnp.max(top))
        bottoms.append(jnp.min(bottom))
    top, neg_bottom = coll.pmax(jnp.stack([jnp.max(jnp.stack(tops)),
                                           -jnp.min(jnp.stack(bottoms))]), axis_name)
    return top, -neg_bottom


def _sinkhorn_log(logits, log_r, n, cells, iterations, axis_name, rows):
    def total_lse(x):  # log of the global sum over valid cells
        return coll.global_logsumexp(masked_logsumexp(x, cells, axis=(-2, -1)), axis_name)

    def one_round(_, x):
        per_proto = coll.global_logsumexp(masked_logsumexp(x, cells, axis=-2), axis_name)
        x = x - per_proto[..., None, :] + log_r
        return x - masked_logsumexp(x, cells, axis=-1)[..., None] - jnp.log(n)

    x = logits - total_lse(logits)[..., None, None]
    x = _rounds(one_round, iterations, x)
    q = jnp.exp(x[..., :rows, :] + jnp.log(n))
    return q if cells is None else jnp.where(cells[..., :rows, :], q, 0.0)


def _column_targets(log_r, n, lead: tuple, k: int) -> jax.Array:
    """The column targets ``r·n/K`` (``[*lead, K]``) of the scaling algorithms: total n,
    as the rows' total, so u and v stay bounded over any number of rounds; their overall
    scale, the first 1/ΣQ and every 1/n cancel in the row step, so the codes are
    lightly's."""
    count = n if n.ndim == 0 else n[..., 0]
    return jnp.broadcast_to(jnp.exp(log_r[..., 0, :]), lead + (k,)) * (count / k)


def _sinkhorn_scaling_blocked(parts, scale, shift, log_r, n, mask, iterations, axis_name,
                              rows):
    """:func:`_sinkhorn_scaling` of ``exp(concat(parts)·scale − shift)`` without that
    array: each sweep runs over row blocks of about :data:`_BLOCK_BYTES` (a ``scan``,
    the blocks sliced from the inputs in place), recomputing a block's ``exp`` and
    taking from it, while it is in cache, both the row sums with the current ``v`` (so
    its ``u``) and its share of the next column sums ``uᵀE``. A round's two passes over
    ``E`` are one sweep over the inputs, and ``E`` (SwaV with a 3840-row queue:
    ``2 × 4096 × 3000``, 94 MiB, written and page-faulted on every call) is never
    stored: its ``exp`` is recomputed once per round instead. Rounds ``0 … T−1``:
    sweep 0 gives ``c = 1ᵀE``; sweep t gives ``u_t = 1/(E v_t)`` and ``c = u_tᵀE``; the
    last round's ``u`` is needed on the returned ``rows`` only (``parts[0]``'s first)."""
    lead, k = parts[0].shape[:-2], parts[0].shape[-1]
    p_count = math.prod(lead)
    xs = [x.reshape(p_count, x.shape[-2], k) for x in parts]
    valid = None if mask is None else mask.reshape(p_count, -1)
    scale = jnp.ones((), shift.dtype) if scale is None else scale

    def block_exp(x):
        return jnp.exp(x * scale - shift)

    def sweep(v):
        """Column sums ``Σ_b u_b E_b`` (``u = 1`` when ``v`` is None, else
        ``1/(E v)``), ``[P, K]``, over every block of every part."""
        # ``zeros_like`` of the (per-device) data: under shard_map the scan carry has the
        # data's varying-axes type
        c = jnp.zeros_like(xs[0][:, 0, :])
        start = 0
        for x in xs:
            m = x.shape[1]
            size = max(1, min(m, _BLOCK_BYTES // (k * x.dtype.itemsize)))
            full, rem = divmod(m, size)

            def block(c, pi, lo, size, x=x, start=start):
                pi, lo = jnp.asarray(pi, jnp.int32), jnp.asarray(lo, jnp.int32)
                zero = jnp.zeros((), jnp.int32)
                e = block_exp(lax.dynamic_slice(x, (pi, lo, zero), (1, size, k))[0])
                ok = (None if valid is None
                      else lax.dynamic_slice(valid, (pi, start + lo), (1, size))[0])
                if ok is not None:  # invalid rows: no mass, whatever they hold
                    e = jnp.where(ok[:, None], e, 0.0)
                u = (jnp.ones((size,), e.dtype) if v is None
                     else 1.0 / (e @ lax.dynamic_index_in_dim(v, pi, 0, keepdims=False)))
                if ok is not None:
                    u = jnp.where(ok, u, 0.0)
                return lax.dynamic_update_index_in_dim(
                    c, lax.dynamic_index_in_dim(c, pi, 0, keepdims=False) + u @ e, pi, 0)

            def step(c, j, full=full, size=size, block=block):
                return block(c, j // full, (j % full) * size, size), None

            if full:
                c = lax.scan(step, c, jnp.arange(p_count * full, dtype=jnp.int32))[0]
            for pi in range(p_count) if rem else ():
                c = block(c, pi, full * size, rem)
            start += m
        return coll.psum(c, axis_name)

    r = _column_targets(log_r, n, lead, k).reshape(p_count, k)
    e_rows = block_exp(xs[0][:, :rows])  # [P, rows, K]
    keep = None if valid is None else valid[:, :rows, None]
    if keep is not None:
        e_rows = jnp.where(keep, e_rows, 0.0)
    c = sweep(None)
    if iterations == 0:
        codes = e_rows * (n.reshape(-1, 1, 1) if n.ndim else n) / jnp.sum(
            c, axis=-1)[:, None, None]
    else:
        for t in range(1, iterations + 1):
            v = r / c
            if t < iterations:
                c = sweep(v)
        row = jnp.einsum("pbk,pk->pb", e_rows, v)
        if keep is not None:
            row = jnp.where(keep[..., 0], row, 1.0)
        codes = e_rows / row[..., None] * v[:, None, :]
    if keep is not None:
        codes = jnp.where(keep, codes, 0.0)
    return codes.reshape(lead + (rows, k))


def _sinkhorn_scaling(logits, log_r, n, mask, iterations, axis_name, rows):
    """lightly's multiplicative algorithm, ``Q = exp(L) / ΣQ``, then per round
    ``Q ← Q / colsum(Q) · r``, ``Q ← Q / rowsum(Q) / n``, and finally ``n·Q``, carried
    as row and column scalings of ``exp(L)``, ``n·Q = diag(u)·exp(L)·diag(v)``: one
    ``exp`` pass and two matrix-vector products per round."""
    e = jnp.exp(logits)
    if mask is not None:
        e = jnp.where(mask[..., None], e, 0.0)
    if iterations == 0:
        total = coll.psum(jnp.sum(e, axis=(-2, -1), keepdims=True), axis_name)
        return e[..., :rows, :] * (n / total)
    # Column targets r·n/K (total n, as the rows' total) keep u and v bounded over any
    # number of rounds; their overall scale, the first 1/ΣQ and every 1/n cancel in the
    # row step, so the codes are lightly's.
    r = _column_targets(log_r, n, e.shape[:-2], e.shape[-1])
    u = jnp.ones_like(e[..., 0])

    def one_round(_, uv):
        u, _ = uv
        v = r / coll.psum(jnp.einsum("...b,...bk->...k", u, e), axis_name)
        row = jnp.einsum("...bk,...k->...b", e, v)
        if mask is not None:
            row = jnp.where(mask, row, 1.0)
        return 1.0 / row, v

    u, v = _rounds(one_round, iterations, (u, jnp.zeros_like(r)))
    return e[..., :rows, :] * u[..., :rows, None] * v[..., None, :]


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
    val.check_state_spec(dtype, n_crops=n_crops)
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
    feats = val.stack_views(features, "features")
    if feats.shape[0] != state.features.shape[0]:
        raise ValueError(
            f"features has {feats.shape[0]} crops but the queue holds {state.features.shape[0]}"
        )
    new = [memory_bank_enqueue(MemoryBankState(q, state.ptr), f, axis_name=axis_name)
           for q, f in zip(state.features, feats, strict=True)]
    added = feats.shape[1] * coll.axis_size(axis_name)
    filled = jnp.minimum(state.filled + added, state.features.shape[1]).astype(jnp.int32)
    return SwaVQueueState(jnp.stack([m.bank for m in new]), new[0].ptr, filled)


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
    # the crops stay blocks (one per array given), never concatenated: a copy of every
    # crop's scores forward and of their gradients backward
    high_blocks = val.view_blocks(high_resolution_outputs, "high_resolution_outputs")
    if not high_blocks:
        raise ValueError("high_resolution_outputs must hold at least one crop, got none")
    b, k = high_blocks[0].shape[1:]
    vh = sum(x.shape[0] for x in high_blocks)
    low_blocks = val.view_blocks(low_resolution_outputs, "low_resolution_outputs")
    if low_blocks and low_blocks[0].shape[1:] != (b, k):
        raise ValueError(
            f"low_resolution_outputs views must have shape {(b, k)}, got "
            f"{low_blocks[0].shape[1:]}")
    n_crops = vh + sum(x.shape[0] for x in low_blocks)
    if n_crops < 2:
        raise ValueError(f"swav_loss needs at least two crops in total, got {n_crops}")
    blocks32 = upcast(*high_blocks, *low_blocks)
    high32 = blocks32[:len(high_blocks)]
    codes_high = lax.stop_gradient(val.concat_views(high32))  # (V_h, B, K), no gradient
    codes_in: jax.Array | tuple[jax.Array, ...] = codes_high
    valid = None
    if queue_outputs is not None:
        queue = val.stack_views(queue_outputs, "queue_outputs")
        if queue.shape[0] != vh or queue.shape[2] != k:
            raise ValueError(
                f"queue_outputs must hold {vh} arrays of shape (Q, {k}), got {queue.shape}")
        w = coll.axis_size(axis_name)
        if queue.shape[1] % w:
            raise ValueError(
                f"the queue size {queue.shape[1]} must be a multiple of the axis size {w}")
        qs = queue.shape[1] // w
        queue = lax.dynamic_slice_in_dim(queue, coll.axis_index(axis_name) * qs, qs, axis=1)
        codes_in = (codes_high, lax.stop_gradient(queue).astype(codes_high.dtype))
        if queue_valid is not None:  # without it every row is valid: no mask at all
            qv = jnp.asarray(queue_valid, bool)
            if qv.ndim == 1:
                qv = lax.dynamic_slice_in_dim(qv, coll.axis_index(axis_name) * qs, qs)
            valid = jnp.ones((b + qs,), bool).at[b:].set(jnp.broadcast_to(qv, (qs,)))
    val.check_temperature(sinkhorn_epsilon, "sinkhorn_epsilon", positive=True)
    val.check_int(sinkhorn_iterations, "sinkhorn_iterations", 0)
    eps = jnp.asarray(sinkhorn_epsilon, codes_high.dtype)
    codes = _sinkhorn(codes_in, jnp.zeros((k,), codes_high.dtype),
                      None if valid is None else jnp.broadcast_to(valid, (vh, valid.shape[0])),
                      sinkhorn_iterations, stable_sinkhorn, axis_name, rows=b,
                      scale=1 / eps)  # (V_h, B, K)
    cross = cross_view_entropy(blocks32, codes, temperature)  # summed over pairs
    return coll.global_mean(cross, b * (n_crops - 1) * vh, axis_name)


def _msn_terms(anchors, targets, prototypes, target_sharpen_temperature, temperature,
               sinkhorn_iterations, axis_name):
    """Cross entropy to the (sharpened, Sinkhorn-balanced, stop-gradient) target codes,
    the anchors' log-probabilities and their global mean probability."""
    val.check_axis_name(axis_name)
    val.check_temperature(temperature, positive=True)
    val.check_temperature(target_sharpen_temperature, "target_sharpen_temperature",
                          positive=True)
    val.check_int(sinkhorn_iterations, "sinkhorn_iterations", 0)
    if isinstance(anchors, (list, tuple)):  # a sequence of [batch, D] views
        views = val.stack_views(anchors, "anchors")
        shown = f"anchors[0] {views.shape[1:]}"
        anchors = views.reshape(-1, views.shape[-1])
    else:
        anchors = val.as_float_array(anchors, "anchors", ndim=2)
        shown = f"anchors {anchors.shape}"
    targets = val.as_float_array(targets, "targets", ndim=2)
    prototypes = val.as_float_array(prototypes, "prototypes", ndim=2)
    b, d = targets.shape
    if anchors.shape[1] != d or prototypes.shape[1] != d:
        raise ValueError(
            "anchors, targets and prototypes must share the feature dimension, got "
            f"{shown}, targets {targets.shape} and prototypes {prototypes.shape}")
    if anchors.shape[0] % b:
        raise ValueError(
            f"anchors must hold a whole number of views of the {b} targets (view-major), "
            f"got shape {anchors.shape}")
    a, t, p = (l2_normalize(x) for x in (anchors, targets, prototypes))
    a, t, p = upcast(a, t, p)
    # the temperatures scale the (few) rows before the products: XLA merges the anchors'
    # and the targets' products into one, and two scales after it were one logits-sized
    # operand (divide_by)
    a = divide_by(a, temperature)
    # matmul_nt's VJP only on one device: under shard_map the replicated prototypes'
    # cotangent must go through autodiff's transpose of the implicit broadcast
    logits = matmul_nt(a, p) if axis_name is None else a @ p.T
    anchor_logp = jax.nn.log_softmax(logits, axis=1)
    t = divide_by(t, temperature * target_sharpen_temperature)
    target_logp = jax.nn.log_softmax(lax.stop_gradient(t @ p.T), axis=1)
    codes = (sinkhorn(target_logp, iterations=sinkhorn_iterations, epsilon=1.0,
                      axis_name=axis_name) if sinkhorn_iterations else jnp.exp(target_logp))
    n = anchors.shape[0]  # view-major: Σ_v codes·logp_v = codes·Σ_v logp_v, no tiling
    logp_sum = sum_leading(anchor_logp.reshape(n // b, b, -1))
    ce = coll.global_mean(-jnp.sum(lax.stop_gradient(codes) * logp_sum), n, axis_name)
    mean_probs = coll.global_mean(sum_leading(jnp.exp(anchor_logp)), n, axis_name)
    return ce, anchor_logp, mean_probs


def _xlogx(p: jax.Array) -> jax.Array:
    """``p·log p`` with 0·log 0 = 0 and a finite gradient at 0."""
    pos = p > 0
    return jnp.where(pos, p * jnp.log(jnp.where(pos, p, 1.0)), 0.0)


def _msn_total(ce, anchor_logp, reg, regularization_weight, entropy_weight, axis_name):
    loss = ce + regularization_weight * reg
    if entropy_weight:
        entropy = -jnp.sum(jnp.exp(anchor_logp) * anchor_logp)
        loss = loss + entropy_weight * coll.global_mean(entropy, anchor_logp.shape[0], axis_name)
    return loss


def msn_loss(
    anchors: ArrayLike,
    targets: ArrayLike,
    prototypes: ArrayLike,
    *,
    target_sharpen_temperature: ArrayLike = 0.25,
    temperature: ArrayLike = 0.1,
    sinkhorn_iterations: int = 3,
    regularization_weight: ArrayLike = 1.0,
    entropy_weight: ArrayLike = 0.0,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Masked Siamese Networks loss (MSN).

    Anchor probabilities :math:`a = \operatorname{softmax}(\hat x\hat P^\top/\tau)`; target
    codes: the (stop-gradient) target probabilities sharpened by ``T`` and balanced by
    Sinkhorn; cross entropy averaged over anchors, plus the mean-entropy maximization
    regularizer :math:`\sum_k \bar a_k\log\bar a_k + \log K` and, optionally, the official
    config's anchor-entropy term (``entropy_weight``; lightly issue #1792).

    Args:
      anchors: ``[views·batch, D]`` view-major (rows ``v·B .. (v+1)·B − 1`` are view v),
        as lightly, or a sequence of ``[batch, D]`` views (the form to use under
        ``axis_name``: each device passes its own views).
      targets: ``[batch, D]``.
      prototypes: ``[K, D]`` (learnable).
      target_sharpen_temperature: T (lightly's forward argument).
      temperature: τ > 0.
      sinkhorn_iterations: 0 disables Sinkhorn.
      regularization_weight: weight of the mean-entropy regularizer.
      entropy_weight: weight of the mean anchor entropy (0: off, as lightly).
      axis_name: optional axis: Sinkhorn sums, the means, and the regularizer's mean
        anchor probability :math:`\bar a` are over the global batch (official MSN; lightly
        uses each rank's local mean).

    References:
      Assran et al., `Masked Siamese Networks for Label-Efficient Learning
      <https://arxiv.org/abs/2204.07141>`_, 2022.
    """
    ce, logp, mean_probs = _msn_terms(anchors, targets, prototypes, target_sharpen_temperature,
                                      temperature, sinkhorn_iterations, axis_name)
    reg = jnp.sum(_xlogx(mean_probs)) + math.log(mean_probs.shape[0])
    return _msn_total(ce, logp, reg, regularization_weight, entropy_weight, axis_name)


def _kl_to_target(target: jax.Array, mean_probs: jax.Array) -> jax.Array:
    """KL(target ‖ mean_probs) = Σ π (log π − log p̄), safe where π = 0."""
    safe = jnp.where(mean_probs > 0, mean_probs, 1.0)
    return jnp.sum(_xlogx(target) - jnp.where(target > 0, target * jnp.log(safe), 0.0))


def pmsn_custom_loss(
    anchors: ArrayLike,
    targets: ArrayLike,
    prototypes: ArrayLike,
    *,
    target_distribution,
    target_sharpen_temperature: ArrayLike = 0.25,
    temperature: ArrayLike = 0.1,
    sinkhorn_iterations: int = 3,
    regularization_weight: ArrayLike = 1.0,
    entropy_weight: ArrayLike = 0.0,
    axis_name: AxisName = None,
) -> jax.Array:
    """MSN with the regularizer ``KL(π ‖ ā)`` to a prior ``π = target_distribution(ā)``.

    ``target_distribution`` maps the ``[K]`` mean anchor probabilities to a ``[K]``
    distribution (lightly's ``PMSNCustomLoss``); see :func:`msn_loss` for the rest.
    """
    if not callable(target_distribution):
        raise TypeError(f"target_distribution must be callable, got {target_distribution!r}")
    ce, logp, mean_probs = _msn_terms(anchors, targets, prototypes, target_sharpen_temperature,
                                      temperature, sinkhorn_iterations, axis_name)
    target = jnp.asarray(target_distribution(mean_probs))
    if target.shape != mean_probs.shape:
        raise ValueError(
            f"target_distribution must return shape {mean_probs.shape}, got {target.shape}")
    reg = _kl_to_target(lax.stop_gradient(target).astype(mean_probs.dtype), mean_probs)
    return _msn_total(ce, logp, reg, regularization_weight, entropy_weight, axis_name)


def power_law_distribution(
    size: int, exponent: ArrayLike = 0.25, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """``π_k ∝ k^(−exponent)`` for ``k = 1..size`` in prototype order (PMSN's prior)."""
    k = jnp.arange(1, size + 1, dtype=dtype)
    p = k ** (-jnp.asarray(exponent, dtype))
    return p / jnp.sum(p)


def pmsn_loss(
    anchors: ArrayLike,
    targets: ArrayLike,
    prototypes: ArrayLike,
    *,
    target_sharpen_temperature: ArrayLike = 0.25,
    temperature: ArrayLike = 0.1,
    sinkhorn_iterations: int = 3,
    regularization_weight: ArrayLike = 1.0,
    power_law_exponent: ArrayLike = 0.25,
    entropy_weight: ArrayLike = 0.0,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""Prior-matching MSN (PMSN): :func:`pmsn_custom_loss` with a power-law prior.

    The regularizer is :math:`\mathrm{KL}(\pi\,\|\,\bar a)` with
    :math:`\pi_k \propto k^{-\alpha}` (lightly's docstring says KL(ā, π) but computes this).

    References:
      Assran et al., `The Hidden Uniform Cluster Prior in Self-Supervised Learning
      <https://arxiv.org/abs/2210.07277>`_, 2022.
    """
    return pmsn_custom_loss(
        anchors, targets, prototypes,
        target_distribution=lambda p: power_law_distribution(p.shape[0], power_law_exponent,
                                                             p.dtype),
        target_sharpen_temperature=target_sharpen_temperature, temperature=temperature,
        sinkhorn_iterations=sinkhorn_iterations, regularization_weight=regularization_weight,
        entropy_weight=entropy_weight, axis_name=axis_name)


def _positional_sinkhorn(logits: jax.Array, iterations: int, axis_name: AxisName,
                         eps: float = 1e-8) -> jax.Array:
    """CAPI's Sinkhorn-Knopp (lightly's ``sinkhorn_knopp``): one problem per token position.

    ``logits`` is ``[B, S, K]``; shifted by its max over the global batch per (position,
    cluster) (``pmax``, so ``exp`` cannot overflow), then alternately normalized over the
    global batch and over clusters, with lightly's ``+1e-8`` in the denominators.

    Carried as scalings of ``E = exp(L − shift)``, ``Q = E · a[s, k] · c[s, b]`` (as
    :func:`_sinkhorn_scaling`): the batch step ``a ← a / (a · Σ_b E·c + ε)``, the cluster
    step ``c ← c / (c · Σ_k E·a + ε)``, which is lightly's ``Q / (ΣQ + ε)`` exactly. Both
    weighted sums are contractions (``dot``) of ``E``, so each round reads ``E`` twice and
    writes nothing of its size (XLA:CPU runs the same sums as elementwise products and
    reductions ~10× slower); the rounds are unrolled (:func:`_rounds`). ``E`` is made in
    the ``[S, B, K]`` layout (the exp fused into one transposing pass over the logits):
    both contractions are then batched over the leading S, where in the ``[B, S, K]``
    layout XLA:CPU copied ``E`` into ``[S, K, B]`` for its dots (CAPI row: 30 → 21 ms).
    Returns ``Q`` as ``[B, S, K]`` (a transpose its consumers fuse).
    """
    x = jnp.swapaxes(logits, 0, 1)  # [S, B, K]: per position, a [B, K] problem
    shift = coll.pmax(max_leading(logits)[:, None], axis_name)  # [S, 1, K], batch max
    e = jnp.exp(x - shift)
    hi = lax.Precision.HIGHEST

    def one_round(_, ac):
        a, c = ac
        col = coll.psum(jnp.einsum("sbk,sb->sk", e, c, precision=hi), axis_name)
        a = a / (a * col + eps)  # [S, K]
        c = c / (c * jnp.einsum("sbk,sk->sb", e, a, precision=hi) + eps)  # [S, B]
        return a, c

    # initial carries typed as the loop's outputs (replicated a, per-device c) for shard_map
    a, c = _rounds(one_round, iterations, (jnp.ones_like(shift[:, 0]), jnp.ones_like(e[..., 0])))
    return jnp.swapaxes(e * a[:, None] * c[..., None], 0, 1)


def capi_loss(
    teacher_logits: ArrayLike,
    student_logits: ArrayLike,
    teacher_index: ArrayLike | None = None,
    *,
    teacher_temperature: ArrayLike = 0.06,
    student_temperature: ArrayLike = 0.12,
    sinkhorn_iterations: int = 3,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""CAPI clustering loss: student tokens predict Sinkhorn assignments of teacher tokens.

    Teacher logits (stop-gradient, divided by τ_t) are balanced per token position by
    :func:`_positional_sinkhorn`; ``teacher_index`` picks, for each student token, the
    teacher position it predicts. The loss is the mean cross entropy over all
    ``[B, N_s]`` student tokens of the global batch.

    Args:
      teacher_logits: ``[B, N_t, K]``.
      student_logits: ``[B, N_s, K]`` (``N_s = N_t`` when ``teacher_index`` is None).
      teacher_index: optional ``[B, N_s]`` integer positions into ``N_t``.
      teacher_temperature, student_temperature: τ_t, τ_s (may be traced).
      sinkhorn_iterations: static, >= 0.
      axis_name: optional axis: the Sinkhorn shift (``pmax``) and batch sums (``psum``)
        and the mean are global.

    References:
      Darcet et al., `Cluster and Predict Latent Patches for Improved Masked Image
      Modeling <https://arxiv.org/abs/2502.08769>`_, 2025.
    """
    val.check_axis_name(axis_name)
    val.check_temperature(teacher_temperature, "teacher_temperature")
    val.check_temperature(student_temperature, "student_temperature")
    val.check_int(sinkhorn_iterations, "sinkhorn_iterations", 0)
    t = val.as_float_array(teacher_logits, "teacher_logits", ndim=3)
    s = val.as_float_array(student_logits, "student_logits", ndim=3)
    if t.shape[0] != s.shape[0] or t.shape[2] != s.shape[2]:
        raise ValueError(
            "teacher_logits and student_logits must share batch and cluster axes, got "
            f"{t.shape} and {s.shape}")
    t32, s32 = upcast(t, s)
    assignments = _positional_sinkhorn(lax.stop_gradient(t32) / teacher_temperature,
                                       sinkhorn_iterations, axis_name)
    if teacher_index is None:
        if t.shape[1] != s.shape[1]:
            raise ValueError(
                "without teacher_index the teacher and student token counts must match, "
                f"got {t.shape} and {s.shape}")
    else:
        idx = jnp.asarray(teacher_index)
        if not jnp.issubdtype(idx.dtype, jnp.integer):
            raise TypeError(f"teacher_index must be integer, got {idx.dtype}")
        if idx.shape != s.shape[:2]:
            raise ValueError(f"teacher_index must have shape {s.shape[:2]}, got {idx.shape}")
        assignments = jnp.take_along_axis(assignments, idx[..., None].astype(jnp.int32), axis=1)
    ce = soft_cross_entropy(s32, assignments, student_temperature)
    return coll.global_mean(jnp.sum(ce), ce.size, axis_name)
