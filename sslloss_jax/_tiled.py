"""Memory-linear contrastive reductions: tiled on one device, ring-distributed across devices.

Every contrastive loss of the library reduces a logit matrix ``L = q kᵀ`` (queries against
keys) row by row: a masked row-logsumexp (NT-Xent, DCL, InfoNCE/CLIP, MoCo v3, SupCon, the
memory bank) or a sum of log-sigmoids (SigLIP). The dense path materializes ``L`` and, for
the backward pass, its softmax: O(Nq·Nk) memory. This module computes the same reductions
block by block (``block × block`` tiles of ``L`` inside ``lax.scan``), with a
``jax.custom_vjp`` whose forward keeps only the inputs and one float per row (the
logsumexp), and whose backward recomputes each tile and accumulates ``dq`` and ``dk``
(as Inf-CL and flash attention do). Memory is O((Nq + Nk)·D + block²) forward **and**
backward: a plain scan without a custom VJP would store every tile for reverse mode.

Masks are never materialized either: each key row carries an integer id (its row in the
global, all-gathered key order; ``-1`` marks padding) and each query the id of itself and,
optionally, of its positive and a class label, so a tile's mask is a comparison of two id
vectors.

Under an ``axis_name`` the **ring** variant never gathers the keys: each device keeps its
queries and passes its key blocks around the ring with ``lax.ppermute`` inside a scan,
accumulating its rows' online logsumexp; the backward pass sends ``dk`` along with ``k``
(ring attention) so that after one more hop every device holds the cotangent of its own
keys. Per-device memory is proportional to the local batch.

Temperature and scale are folded into the queries outside the custom VJP (``q·s``), so
autodiff handles their gradients (including the cross-device sum of an invariant scalar
under ``shard_map``); only the single-device symmetric kernel (queries = keys, NT-Xent and
friends) takes the scale itself, which lets its backward use one matmul per tile instead of
two.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sslloss_jax import _collectives as coll
from sslloss_jax._numerics import symmetric_lse
from sslloss_jax._types import AxisName

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "IMPLEMENTATIONS",
    "Rows",
    "check_implementation",
    "use_tiled",
    "tiled_lse",
    "tiled_self_lse",
    "self_lse",
    "tiled_log_sigmoid_sum",
]

#: Default tile edge: 1024 × 1024 float32 tiles are 4 MiB, large enough for efficient
#: matmuls on CPU and accelerators, small enough for caches and for linear memory.
DEFAULT_BLOCK_SIZE = 1024
IMPLEMENTATIONS = ("auto", "dense", "tiled")
#: ``implementation="auto"`` switches to the tiled path once the logits of one device
#: (rows × columns) exceed this many elements (8 MiB in float32): below it the dense
#: path is as fast or faster; above it the tiled path is faster on CPU and its memory
#: stays linear. The dense path's forward and backward hold two logits-sized arrays, and
#: from 2048 × 2048 on they pass glibc's 32 MiB ``mmap`` threshold, so XLA:CPU maps its
#: temporaries afresh on every call (2-core AMD, NT-Xent forward + backward: 2N = 1024
#: dense 4.1 ms, tiled 5.4; 2N = 2048 dense 25.2 ms, tiled 22.4; 2N = 4096 94 / 84).
AUTO_TILED_ELEMENTS = 2048 * 1024

_NO_ID = -2  # query-side id that matches no key (queries without self or positive)
_PAD_ID = -1  # key-side id of padding rows


def check_implementation(implementation: object, block_size: object) -> None:
    """Validates the ``implementation`` / ``block_size`` keywords (static)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    if (not isinstance(block_size, int) or isinstance(block_size, bool)
            or block_size < 1):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def use_tiled(implementation: str, block_size: int, rows: int, cols: int) -> bool:
    """Validates ``implementation`` / ``block_size`` and says whether they select the
    tiled (or, under an ``axis_name``, ring) path for ``rows × cols`` logits per device
    (static)."""
    check_implementation(implementation, block_size)
    if implementation == "auto":
        return rows * cols > AUTO_TILED_ELEMENTS
    return implementation == "tiled"


class Rows(NamedTuple):
    """Integer metadata of query (or key) rows, shape ``[rows]`` each, int32.

    ``ids``: the row's global id among the keys (keys: its column; queries: itself, so it
    is excluded from its own denominator), or -2 / None for none. ``pos``: the id of the
    query's positive, excluded from the denominator (DCL), or None. ``labels``: class
    labels; positives are the keys with the query's label other than itself.
    """

    ids: jax.Array | None = None
    pos: jax.Array | None = None
    labels: jax.Array | None = None


class _Cfg(NamedTuple):
    """Static configuration of a tiled reduction (hashable: a ``nondiff_argnum``)."""

    exclude_self: bool
    exclude_pos: bool
    labels: bool
    k_grad: bool
    block: int
    axis_name: AxisName


# ---------------------------------------------------------------- blocking and masks
def _blocking(n: int, block: int) -> tuple[int, int]:
    """``(count, size)`` of the blocks covering ``n`` rows with at most ``block`` each and
    the least padding (``count · size - n < count``)."""
    count = max(1, math.ceil(n / block))
    return count, math.ceil(n / count)


def _to_blocks(x: jax.Array | None, count: int, size: int, fill) -> jax.Array | None:
    """Pads axis 0 to ``count · size`` with ``fill`` and reshapes to ``[count, size, ...]``."""
    if x is None:
        return None
    pad = count * size - x.shape[0]
    if pad:
        x = jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), fill, x.dtype)])
    return x.reshape(count, size, *x.shape[1:])


def _from_blocks(x: jax.Array, n: int) -> jax.Array:
    return x.reshape(-1, *x.shape[2:])[:n]


def _id_array(ids: jax.Array | None, n: int) -> jax.Array:
    return jnp.full((n,), _NO_ID, jnp.int32) if ids is None else ids.astype(jnp.int32)


def _query_meta(rows: Rows, n: int, cfg: _Cfg) -> tuple:
    """``(self_ids, pos_ids, labels)`` of the queries (int32 or None), as the config uses."""
    return (_id_array(rows.ids, n) if cfg.exclude_self or cfg.labels else None,
            _id_array(rows.pos, n) if cfg.exclude_pos else None,
            jnp.asarray(rows.labels, jnp.int32) if cfg.labels else None)


def _key_meta(rows: Rows, n: int, cfg: _Cfg) -> tuple:
    ids = jnp.arange(n, dtype=jnp.int32) if rows.ids is None else rows.ids.astype(jnp.int32)
    return ids, (jnp.asarray(rows.labels, jnp.int32) if cfg.labels else None)


def _masks(qm: tuple, km: tuple, rows: int, cfg: _Cfg, transposed: bool = False):
    """``(candidates, positives)`` of one ``rows × cols`` tile (positives None without
    labels), or with ``transposed`` the same masks laid out ``cols × rows`` (the
    symmetric kernel's tile ``(j, i)`` seen from tile ``(i, j)``), built so and not
    transposed."""
    q_self, q_pos, q_lab = qm
    k_id, k_lab = km
    if transposed:
        qa, ka, shape = (lambda v: v[None, :]), (lambda v: v[:, None]), (k_id.shape[0], rows)
    else:
        qa, ka, shape = (lambda v: v[:, None]), (lambda v: v[None, :]), (rows, k_id.shape[0])
    valid = ka(k_id >= 0)
    cand = jnp.broadcast_to(valid, shape)
    if cfg.exclude_self:
        cand = cand & (ka(k_id) != qa(q_self))
    if cfg.exclude_pos:
        cand = cand & (ka(k_id) != qa(q_pos))
    pos = None
    if cfg.labels:
        pos = (qa(q_lab) == ka(k_lab)) & (ka(k_id) != qa(q_self)) & valid
    return cand, pos


# --------------------------------------------------- forward: online row statistics
def _init_stats(qb: jax.Array, cfg: _Cfg):
    # ``*_like`` of the (per-device) data, so that under ``shard_map`` the scan carries
    # have the data's varying-axes type (a fresh constant would be invariant)
    s = jnp.zeros_like(qb[..., 0])
    extra = (s, s) if cfg.labels else None
    return jnp.full_like(s, -jnp.inf), s, extra


def _update_stats(stats, qb, qm, kb, km, scale, cfg: _Cfg):
    """Folds the key blocks ``kb`` ``[nc, bc, D]`` into the online logsumexp (and positive
    sums) of the query blocks ``qb`` ``[nr, br, D]``."""

    def row(args):
        q, m_q, (m, s, extra) = args

        def col(carry, kargs):
            k, m_k = kargs
            cand, pos = _masks(m_q, m_k, q.shape[0], cfg)
            return _fold(carry, _logits(q, k, scale), cand, pos, 1), None

        return lax.scan(col, (m, s, extra), (kb, km))[0]

    return lax.map(row, (qb, qm, stats))


def _fold(stats, logits, cand, pos, axis: int):
    """Folds one tile of logits into the online ``(max, sum of exp, extra)`` of its rows
    (``axis=1``) or of its columns (``axis=0``, the symmetric kernel's other half)."""
    m, s, extra = stats
    m_new = jnp.maximum(m, jnp.max(jnp.where(cand, logits, -jnp.inf), axis=axis))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    s = s * jnp.exp(m - shift) + jnp.sum(
        jnp.where(cand, jnp.exp(logits - jnp.expand_dims(shift, axis)), 0.0), axis=axis)
    if extra is not None:
        extra = (extra[0] + jnp.sum(jnp.where(pos, logits, 0.0), axis=axis),
                 extra[1] + jnp.sum(pos, axis=axis).astype(s.dtype))
    return m_new, s, extra


def _logits(q: jax.Array, k: jax.Array, scale) -> jax.Array:
    g = jnp.matmul(q, k.T)
    return g if scale is None else scale * g


def _finish(stats):
    m, s, extra = stats
    shift = jnp.where(jnp.isfinite(m), m, 0.0)
    lse = jnp.where(s > 0, jnp.log(jnp.where(s > 0, s, 1.0)) + shift, -jnp.inf)
    return lse, extra


# ----------------------------------------------------------------- ring plumbing
def _ring_next(x, axis_name: AxisName):
    """Sends ``x`` (a pytree) from every participant to the next one on the ring."""
    n = coll.axis_size(axis_name)
    if n == 1:
        return x
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda a: lax.ppermute(a, axis_name, perm), x)


def _ring_scan(step, keys, carry, axis_name: AxisName):
    """``step(keys, carry) -> (keys, carry)`` on this device's key blocks, then on every
    other device's, passed along the ring (``axis_size - 1`` hops)."""
    keys, carry = step(keys, carry)
    n = coll.axis_size(axis_name)
    if n > 1:
        def body(c, _):
            return step(_ring_next(c[0], axis_name), c[1]), None

        (keys, carry), _ = lax.scan(body, (keys, carry), None, length=n - 1)
    return keys, carry


# ------------------------------------------------------ generic queries × keys kernel
def tiled_lse(
    q: jax.Array,
    k: jax.Array,
    q_rows: Rows | None = None,
    k_rows: Rows | None = None,
    *,
    exclude_self: bool = False,
    exclude_pos: bool = False,
    k_grad: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    axis_name: AxisName = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Masked row-logsumexp of ``q kᵀ`` in O((Nq + Nk)·D + block²) memory.

    ``lse_i = log Σ_{j ∈ cand(i)} exp(q_i·k_j)`` over the keys that are not padding, not
    the query itself (``exclude_self``: key id ≠ ``q_rows.ids``) and not its positive
    (``exclude_pos``: key id ≠ ``q_rows.pos``). With labels (``q_rows.labels`` and
    ``k_rows.labels``) it also returns ``(pos_sum, n_pos)``: the sum of the logits over
    the positives ``P(i) = {j : label_j = label_i, id_j ≠ ids_i}`` and their count.

    Fold any temperature or scale into ``q`` beforehand. ``k_grad=False`` (static) skips
    the key gradient (keys that are stop-gradient: MoCo v3, memory banks).

    With ``axis_name``, ``q``/``k`` are this device's rows and the keys (with their ids
    and labels) travel around the ring: ``lse`` is over the global keys. ``k_rows.ids``
    must then hold global ids (default: the rows' position in the all-gathered order).
    Queries with no candidate get ``-inf`` and a zero gradient.
    """
    q_rows = Rows() if q_rows is None else q_rows
    k_rows = Rows() if k_rows is None else k_rows
    cfg = _Cfg(exclude_self, exclude_pos, q_rows.labels is not None, k_grad, block_size,
               axis_name)
    if cfg.labels and k_rows.labels is None:
        raise ValueError("tiled_lse: q_rows.labels given without k_rows.labels")
    if axis_name is not None and k_rows.ids is None:
        k_rows = k_rows._replace(ids=coll.global_rows(k.shape[0], axis_name))
    qm = _query_meta(q_rows, q.shape[0], cfg)
    km = _key_meta(k_rows, k.shape[0], cfg)
    return _lse_vjp(cfg, q, k, qm, km)


def _blocks_of(cfg: _Cfg, q, k, qm, km):
    nr, br = _blocking(q.shape[0], cfg.block)
    nc, bc = _blocking(k.shape[0], cfg.block)
    qb = _to_blocks(q, nr, br, 0)
    qmb = tuple(_to_blocks(x, nr, br, _NO_ID) for x in qm)
    kb = _to_blocks(k, nc, bc, 0)
    kmb = (_to_blocks(km[0], nc, bc, _PAD_ID), _to_blocks(km[1], nc, bc, _NO_ID))
    return qb, qmb, (kb, kmb)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lse_vjp(cfg, q, k, qm, km):
    return _lse_fwd(cfg, q, k, qm, km)[0]


def _lse_fwd(cfg, q, k, qm, km):
    qb, qmb, keys = _blocks_of(cfg, q, k, qm, km)
    stats = _init_stats(qb, cfg)

    def step(keys, stats):
        return keys, _update_stats(stats, qb, qmb, keys[0], keys[1], None, cfg)

    _, stats = _ring_scan(step, keys, stats, cfg.axis_name)
    lse, extra = _finish(stats)
    n = q.shape[0]
    lse = _from_blocks(lse, n)
    extra = None if extra is None else tuple(_from_blocks(x, n) for x in extra)
    return (lse, extra), (q, k, qm, km, lse)


def _ring_grads(cfg: _Cfg, q, k, qb, keys, row_xs, coef):
    """``(dq, dk)`` of ``Σ_ij C_ij · q_i·k_j`` with the tile coefficients
    ``C = coef(row_x, logits, key_meta)`` (``row_x``: the per-row-block slice of
    ``row_xs``, e.g. query metadata and cotangents): every tile recomputed, ``dq``
    accumulated locally, ``dk`` travelling with its key blocks around the ring and sent
    home at the end. ``dk`` is zero without ``cfg.k_grad``."""

    def chunk_grads(kb, kmb):
        def row(dk, args):
            qr, row_x = args

            def col(dq, kargs):
                kc, m_k = kargs
                c = coef(row_x, _logits(qr, kc, None), m_k)
                dkc = jnp.matmul(c.T, qr) if cfg.k_grad else None
                return dq + jnp.matmul(c, kc), dkc

            dq, dkc = lax.scan(col, jnp.zeros_like(qr), (kb, kmb))
            return (None if dk is None else dk + dkc), dq

        return lax.scan(row, jnp.zeros_like(kb) if cfg.k_grad else None, (qb, row_xs))

    def step(keys, dq):
        (kb, kmb), dk = keys
        dk_add, dq_add = chunk_grads(kb, kmb)
        return ((kb, kmb), None if dk is None else dk + dk_add), dq + dq_add

    dk0 = jnp.zeros_like(keys[0]) if cfg.k_grad else None
    (_, dk), dq = _ring_scan(step, (keys, dk0), jnp.zeros_like(qb), cfg.axis_name)
    if cfg.k_grad:
        dk = _from_blocks(_ring_next(dk, cfg.axis_name), k.shape[0])  # the last hop home
    else:
        dk = jnp.zeros_like(k)
    return _from_blocks(dq, q.shape[0]), dk


def _lse_bwd(cfg, res, cts):
    q, k, qm, km, lse = res
    g, g_extra = cts
    qb, qmb, keys = _blocks_of(cfg, q, k, qm, km)
    nr, br = qb.shape[:2]
    gb = _to_blocks(g.astype(q.dtype), nr, br, 0)
    lseb = _to_blocks(lse, nr, br, 0)
    gpb = (None if g_extra is None else _to_blocks(g_extra[0].astype(q.dtype), nr, br, 0))

    def coef(row_x, logits, m_k):
        m_q, g_r, lse_r, gp_r = row_x
        cand, pos = _masks(m_q, m_k, logits.shape[0], cfg)
        c = jnp.where(cand, g_r[:, None] * jnp.exp(logits - lse_r[:, None]), 0.0)
        if pos is not None:
            c = c + jnp.where(pos, gp_r[:, None], 0.0)
        return c

    dq, dk = _ring_grads(cfg, q, k, qb, keys, (qmb, gb, lseb, gpb), coef)
    return dq, dk, _none_like(qm), _none_like(km)


def _none_like(meta: tuple) -> tuple:
    return tuple(None for _ in meta)


_lse_vjp.defvjp(_lse_fwd, _lse_bwd)


# ------------------------------------------ symmetric kernel: queries = keys, one device
def tiled_self_lse(
    z: jax.Array,
    scale: jax.Array,
    rows: Rows,
    *,
    exclude_pos: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """:func:`tiled_lse` of ``scale · z zᵀ`` with queries = keys = ``z`` on one device.

    Every row is excluded from its own denominator (``rows.ids``, default its index); the
    masks must be symmetric (``rows.pos`` an involution, labels). The logits are
    symmetric, so the backward pass needs one matmul per tile,
    ``dz = (C + Cᵀ) z · scale``, and no key-gradient accumulator. Differentiable in
    ``scale``.
    """
    n = z.shape[0]
    if rows.ids is None:
        rows = rows._replace(ids=jnp.arange(n, dtype=jnp.int32))
    cfg = _Cfg(True, exclude_pos, rows.labels is not None, True, block_size, None)
    qm = _query_meta(rows, n, cfg)
    km = _key_meta(rows, n, cfg)
    return _self_vjp(cfg, z, scale, qm, km)


def self_lse(
    z: jax.Array,
    temperature: jax.Array,
    rows: Rows,
    *,
    exclude_pos: bool = False,
    implementation: str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """Row logsumexps of ``z zᵀ/τ`` with queries = keys = ``z`` on one device, every row
    excluded from the rows sharing its ``rows.ids`` (itself; a whole class when ids
    repeat) and, with ``exclude_pos``, from ``rows.pos``: :func:`tiled_self_lse` past the
    ``implementation``'s size, else the dense :func:`symmetric_lse` with the same mask
    (one product for the VJP either way). Differentiable in ``τ``."""
    if use_tiled(implementation, block_size, z.shape[0], z.shape[0]):
        return tiled_self_lse(z, 1.0 / temperature, rows, exclude_pos=exclude_pos,
                              block_size=block_size)[0]
    ids = jnp.arange(z.shape[0], dtype=jnp.int32) if rows.ids is None else rows.ids
    return symmetric_lse(z, temperature, _dense_self_mask,
                         (ids, rows.pos if exclude_pos else None))


def _dense_self_mask(ids_pos: tuple[jax.Array, jax.Array | None]) -> jax.Array:
    """:func:`_masks`' candidates for the whole ``N × N`` matrix, queries = keys with ids
    ``ids`` (and positives ``pos``, or None): the tiled kernel's rule, so both paths
    exclude the same pairs."""
    ids, pos = ids_pos
    cfg = _Cfg(True, pos is not None, False, False, ids.shape[0], None)
    return _masks((ids, pos, None), (ids, None), ids.shape[0], cfg)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _self_vjp(cfg, z, scale, qm, km):
    return _self_fwd(cfg, z, scale, qm, km)[0]


def _pairs(count: int) -> tuple[jax.Array, jax.Array]:
    """The block pairs ``(i, j)``, ``i < j``, of the strict upper triangle (static)."""
    i, j = zip(*((i, j) for i in range(count) for j in range(i + 1, count)), strict=True)
    return jnp.asarray(i, jnp.int32), jnp.asarray(j, jnp.int32)


def _take(tree, i):
    return jax.tree_util.tree_map(lambda x: lax.dynamic_index_in_dim(x, i, 0, False), tree)


def _put(tree, i, value):
    return jax.tree_util.tree_map(
        lambda x, v: lax.dynamic_update_index_in_dim(x, v, i, 0), tree, value)


def _tile_masks(qmb, kmb, i, j, size, cfg):
    """``(cand, pos)`` of tile ``(i, j)`` (block i's rows against block j's keys) and of
    tile ``(j, i)`` transposed: the tile's share of block j's rows, padding included."""
    return (*_masks(_take(qmb, i), _take(kmb, j), size, cfg),
            *_masks(_take(qmb, j), _take(kmb, i), size, cfg, transposed=True))


#: From this many blocks the symmetric kernel computes the diagonal tiles and the upper
#: triangle only. With two blocks that saves one tile in four for a second set of
#: reductions (along the columns) and an extra product per tile: NT-Xent with 2N = 2048
#: gained, DetCon-S's 2048 regions lost (20 -> 27 ms; 2 cores), so below it every tile
#: is computed. 2N = 8192 (8 blocks): the kernel alone 300 -> 265 ms, the NT-Xent / DCL
#: benchmark rows 330 -> 285 / 325 -> 297 ms.
_TRIANGLE_MIN_BLOCKS = 3


def _self_fwd(cfg, z, scale, qm, km):
    """The row statistics. From :data:`_TRIANGLE_MIN_BLOCKS` blocks, from the diagonal
    tiles and the strict upper triangle: an off-diagonal tile ``L_ij`` gives block i's
    rows their share and, along its columns, block j's (``L_ji = L_ijᵀ``), so the
    products and ``exp`` passes of the lower triangle are saved (the columns get their
    own maxima and ``exp``). Below it, every tile, row by row."""
    qb, qmb, (_, kmb) = _blocks_of(cfg, z, z, qm, km)
    nb, size = qb.shape[:2]
    stats = _init_stats(qb, cfg)
    if nb < _TRIANGLE_MIN_BLOCKS:
        stats = _update_stats(stats, qb, qmb, qb, kmb, scale, cfg)
    else:
        def diag(args):
            zi, m_q, m_k, stats = args
            cand, pos = _masks(m_q, m_k, size, cfg)
            return _fold(stats, _logits(zi, zi, scale), cand, pos, 1)

        def off(stats, ij):
            i, j = ij
            logits = _logits(_take(qb, i), _take(qb, j), scale)
            cand, pos, cand_t, pos_t = _tile_masks(qmb, kmb, i, j, size, cfg)
            stats = _put(stats, i, _fold(_take(stats, i), logits, cand, pos, 1))
            return _put(stats, j, _fold(_take(stats, j), logits, cand_t, pos_t, 0)), None

        stats = lax.scan(off, lax.map(diag, (qb, qmb, kmb, stats)), _pairs(nb))[0]
    lse, extra = _finish(stats)
    n = z.shape[0]
    lse = _from_blocks(lse, n)
    extra = None if extra is None else tuple(_from_blocks(x, n) for x in extra)
    return (lse, extra), (z, scale, qm, km, lse)


def _self_bwd(cfg, res, cts):
    """``dz = (C + Cᵀ) z · scale`` over the forward's tiles: with the triangle, the
    coefficients of tile ``(i, j)`` are those of ``(j, i)`` transposed, so an
    off-diagonal tile is recomputed once and feeds ``dz_i`` (``S z_j``) and ``dz_j``
    (``Sᵀ z_i``). ``Σ S ⊙ (z_i z_jᵀ) = Σ (S z_j) ⊙ z_i`` gives the scale's cotangent from
    those products."""
    z, scale, qm, km, lse = res
    g, g_extra = cts
    qb, qmb, (_, kmb) = _blocks_of(cfg, z, z, qm, km)
    nb, size = qb.shape[:2]
    gb = _to_blocks(g.astype(z.dtype), nb, size, 0)
    lseb = _to_blocks(lse, nb, size, 0)
    gpb = None if g_extra is None else _to_blocks(g_extra[0].astype(z.dtype), nb, size, 0)
    rows = (gb, lseb, gpb)

    def sym(zi, zj, masks, row_i, row_j):
        """``(C + Cᵀ)`` on tile ``(i, j)``: ``g_i e^{L_ij − lse_i}`` on its candidates
        plus ``g_j e^{L_ij − lse_j}`` on tile (j, i)'s, transposed; positives alike."""
        cand, pos, cand_t, pos_t = masks
        (g_i, lse_i, gp_i), (g_j, lse_j, gp_j) = row_i, row_j
        logits = _logits(zi, zj, scale)
        c = (jnp.where(cand, g_i[:, None] * jnp.exp(logits - lse_i[:, None]), 0.0)
             + jnp.where(cand_t, g_j[None, :] * jnp.exp(logits - lse_j[None, :]), 0.0))
        if pos is not None:
            c = c + jnp.where(pos, gp_i[:, None], 0.0) + jnp.where(pos_t, gp_j[None, :], 0.0)
        return c

    def own_masks(m_q, m_k):  # symmetric tiles' masks but for padding rows (z = 0 there)
        cand, pos = _masks(m_q, m_k, size, cfg)
        return cand, pos, cand, pos

    if nb < _TRIANGLE_MIN_BLOCKS:
        def row(ds, args):
            zi, m_q, row_i = args

            def col(carry, jargs):
                dz, ds = carry
                zj, m_k, row_j = jargs
                dzi = jnp.matmul(sym(zi, zj, own_masks(m_q, m_k), row_i, row_j), zj)
                return (dz + dzi, ds + jnp.sum(dzi * zi)), None

            (dz, ds_r), _ = lax.scan(col, (jnp.zeros_like(zi), jnp.zeros((), z.dtype)),
                                     (qb, kmb, rows))
            return ds + ds_r, dz

        ds, dz = lax.scan(row, jnp.zeros((), z.dtype), (qb, qmb, rows))
    else:
        def diag(args):
            zi, m_q, m_k, row_i = args
            dzi = jnp.matmul(sym(zi, zi, own_masks(m_q, m_k), row_i, row_i), zi)
            return dzi, jnp.sum(dzi * zi)

        # block j's share ``Sᵀ z_i`` accumulates transposed, ``z_iᵀ S`` [D, size]:
        # XLA:CPU multiplies by a transposed left operand 2.3× slower (1024-row tiles)
        zt = jnp.swapaxes(qb, 1, 2)

        def off(carry, ij):
            dz, dzt, ds = carry
            i, j = ij
            zi, zj = _take(qb, i), _take(qb, j)
            c = sym(zi, zj, _tile_masks(qmb, kmb, i, j, size, cfg), _take(rows, i),
                    _take(rows, j))
            dzi = jnp.matmul(c, zj)
            dz = _put(dz, i, _take(dz, i) + dzi)
            dzt = _put(dzt, j, _take(dzt, j) + jnp.matmul(_take(zt, i), c))
            return (dz, dzt, ds + 2 * jnp.sum(dzi * zi)), None

        dz, ds = lax.map(diag, (qb, qmb, kmb, rows))
        dz, dzt, ds = lax.scan(off, (dz, jnp.zeros_like(zt), jnp.sum(ds)), _pairs(nb))[0]
        dz = dz + jnp.swapaxes(dzt, 1, 2)
    dz = _from_blocks(dz, z.shape[0]) * scale
    return dz, (0.5 * ds).astype(scale.dtype), _none_like(qm), _none_like(km)


_self_vjp.defvjp(_self_fwd, _self_bwd)


# ------------------------------------------------------------- SigLIP: log-sigmoid sum
def tiled_log_sigmoid_sum(
    q: jax.Array,
    k: jax.Array,
    q_pos: jax.Array,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    axis_name: AxisName = None,
) -> jax.Array:
    """``Σ_j log σ(y_ij · q_i·k_j)`` per query row, ``y_ij = +1`` iff key ``j`` is the
    query's positive (global key id ``q_pos[i]``), else −1, in O((Nq + Nk)·D + block²)
    memory.

    Fold scale (and a bias, as an extra feature column) into ``q``/``k`` beforehand. With
    ``axis_name`` the keys travel around the ring (ids: position in the gathered order).
    """
    cfg = _Cfg(False, True, False, True, block_size, axis_name)
    km = (coll.global_rows(k.shape[0], axis_name), None)
    qm = (None, q_pos.astype(jnp.int32), None)
    return _sig_vjp(cfg, q, k, qm, km)


def _sig_signs(m_q, m_k):
    """``(valid, y)`` of a SigLIP tile: real keys, and ±1 for positive / negative pairs."""
    valid = (m_k[0] >= 0)[None, :]
    return valid, jnp.where(m_k[0][None, :] == m_q[1][:, None], 1.0, -1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sig_vjp(cfg, q, k, qm, km):
    return _sig_fwd(cfg, q, k, qm, km)[0]


def _sig_fwd(cfg, q, k, qm, km):
    qb, qmb, keys = _blocks_of(cfg, q, k, qm, km)

    def rows_sum(kb, kmb):
        def row(args):
            qr, m_q = args

            def col(acc, kargs):
                logits = _logits(qr, kargs[0], None)
                valid, y = _sig_signs(m_q, kargs[1])
                y = y.astype(logits.dtype)
                return acc + jnp.sum(jnp.where(valid, jax.nn.log_sigmoid(y * logits), 0.0),
                                     axis=1), None

            return lax.scan(col, jnp.zeros_like(qr[:, 0]), (kb, kmb))[0]

        return lax.map(row, (qb, qmb))

    def step(keys, acc):
        return keys, acc + rows_sum(*keys)

    _, acc = _ring_scan(step, keys, jnp.zeros_like(qb[..., 0]), cfg.axis_name)
    return _from_blocks(acc, q.shape[0]), (q, k, qm, km)


def _sig_bwd(cfg, res, g):
    q, k, qm, km = res
    qb, qmb, keys = _blocks_of(cfg, q, k, qm, km)
    gb = _to_blocks(g.astype(q.dtype), qb.shape[0], qb.shape[1], 0)

    def coef(row_x, logits, m_k):
        m_q, g_r = row_x
        valid, y = _sig_signs(m_q, m_k)
        y = y.astype(logits.dtype)
        # d/dL log σ(yL) = y σ(−yL)
        return jnp.where(valid, g_r[:, None] * y * jax.nn.sigmoid(-y * logits), 0.0)

    dq, dk = _ring_grads(cfg, q, k, qb, keys, (qmb, gb), coef)
    return dq, dk, _none_like(qm), _none_like(km)


_sig_vjp.defvjp(_sig_fwd, _sig_bwd)
