"""Numerical primitives shared by every loss (one home for each of them).

Policy: similarity matrices, softmax / logsumexp, norms and batch statistics are computed
in at least float32 (float64 stays float64), whatever the input dtype; norms and square
roots have finite gradients at zero; masked reductions use ``where=`` rather than large
constants, so half precision cannot overflow.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from sslloss_jax._collectives import match_vma

__all__ = [
    "compute_dtype",
    "upcast",
    "safe_norm",
    "safe_sqrt",
    "l2_normalize",
    "cosine_similarity",
    "masked_logsumexp",
    "symmetric_lse",
    "symmetric_lse_linear",
    "scaled_logsumexp",
    "softmax_rows",
    "lead_ones",
    "runtime_scalar",
    "divide_by",
    "soft_cross_entropy",
    "cross_view_entropy",
    "sum_leading",
    "max_leading",
    "mean_leading",
    "broadcast_leading",
    "argmax_first",
    "argmin_first",
    "reduce_halving",
    "sq_dists",
    "offdiag_sq_sum",
    "cross_diag",
    "nuclear_norm",
    "argsort_stable",
    "sort_and_argsort",
    "unpermute",
    "sym_gram",
    "matmul_nt",
]


def compute_dtype(*xs: jax.Array) -> jnp.dtype:
    """The dtype losses compute in: the widest input float type, at least float32.

    Written without JAX's type promotion so it also holds under
    ``jax_numpy_dtype_promotion="strict"`` and for mixed half/single inputs.
    """
    widest = max((jnp.dtype(x.dtype) for x in xs), key=lambda d: d.itemsize)
    return widest if widest.itemsize >= 4 else jnp.dtype(jnp.float32)


def upcast(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """Casts every input to the common :func:`compute_dtype`."""
    dtype = compute_dtype(*xs)
    return tuple(x.astype(dtype) for x in xs)


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(max(x, 0))`` whose gradient is 0 (not inf/NaN) where ``x <= 0``."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def safe_norm(x: jax.Array, axis: int | tuple[int, ...] = -1, keepdims: bool = False):
    """Euclidean norm with a zero (finite) gradient at the origin."""
    return safe_sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(‖x‖, eps)`` as ``torch.nn.functional.normalize``, in >= float32.

    Finite gradients everywhere, including at ``x = 0`` (where the output is 0).
    """
    (x,) = upcast(x)
    return x / jnp.maximum(safe_norm(x, axis=axis, keepdims=True), eps)


def cosine_similarity(x0: jax.Array, x1: jax.Array, axis: int = -1,
                      eps: jax.typing.ArrayLike = 1e-8) -> jax.Array:
    """``⟨x0, x1⟩ / (max(‖x0‖, eps) · max(‖x1‖, eps))`` along ``axis`` (torch semantics),
    in >= float32, the inputs broadcast against each other.

    The normalized inputs are never arrays of their own: the value is three row
    reductions in one pass over ``x0`` and ``x1``, and a closed-form JVP (so forward,
    reverse and higher-order modes all work) whose transpose is one fused pass per
    input, ``g·(x1/(‖x0‖‖x1‖) − cos·x0/‖x0‖²)``. Autodiff through two
    :func:`l2_normalize` calls wrote both normalized arrays and took several more passes
    (negative cosine similarity of two ``256×2048`` arrays, value and gradient: 0.52 →
    0.28 ms, jax 0.10, 2 cores). Where a norm is clamped at ``eps`` it is a constant, as
    in torch, and its gradient is ``x1/(eps·‖x1‖)``; the gradient is finite at zero.
    """
    x0, x1 = jnp.broadcast_arrays(*upcast(x0, x1))
    axis = axis + x0.ndim if -x0.ndim <= axis < 0 else axis
    return _cosine(x0, x1, jnp.asarray(eps, x0.dtype), axis)


def _cosine_parts(x0, x1, eps, axis):
    n0, n1 = safe_norm(x0, axis=axis), safe_norm(x1, axis=axis)
    c0, c1 = jnp.maximum(n0, eps), jnp.maximum(n1, eps)
    inv = 1 / (c0 * c1)
    return jnp.sum(x0 * x1, axis=axis) * inv, n0 > eps, n1 > eps, c0, c1, inv


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _cosine(x0, x1, eps, axis):
    return _cosine_parts(x0, x1, eps, axis)[0]


@_cosine.defjvp
def _cosine_jvp(axis, primals, tangents):
    x0, x1, eps = primals
    t0, t1, t_eps = tangents
    cos, on0, on1, c0, c1, inv = _cosine_parts(x0, x1, eps, axis)
    # ∂cos = ⟨t0, x1⟩/(c0 c1) − cos·∂c0/c0 (and symmetrically), where ∂c0 = ⟨x0, t0⟩/‖x0‖
    # while ‖x0‖ > eps (c0 = ‖x0‖) and ∂eps once clamped.
    k0 = jnp.where(on0, cos / (c0 * c0), 0.0)
    k1 = jnp.where(on1, cos / (c1 * c1), 0.0)
    k_eps = jnp.where(on0, 0.0, cos / c0) + jnp.where(on1, 0.0, cos / c1)
    row = lambda s: jnp.expand_dims(s, axis)
    d0 = jnp.sum(t0 * (row(inv) * x1 - row(k0) * x0), axis=axis)
    d1 = jnp.sum(t1 * (row(inv) * x0 - row(k1) * x1), axis=axis)
    return cos, d0 + d1 - k_eps * t_eps


def masked_logsumexp(
    logits: jax.Array, where: jax.Array | None, axis: int | tuple[int, ...] = -1
) -> jax.Array:
    """``log Σ_{j: where_j} exp(logits_j)`` in >= float32 with a stop-gradient max shift.

    Entries outside ``where`` neither contribute to the value nor receive gradient, and
    their values may be anything (including inf/NaN). A row with no valid entry gives
    ``-inf`` with a zero gradient.
    """
    (logits,) = upcast(logits)
    if where is None:
        return jax.nn.logsumexp(logits, axis=axis)
    return scaled_logsumexp(logits, None, axis, where=where)


def scaled_logsumexp(x: jax.Array, t: jax.typing.ArrayLike | None,
                     axis: int | tuple[int, ...] = -1, *,
                     where: jax.Array | None = None) -> jax.Array:
    """``logsumexp(x / t, axis)`` (over the ``where`` entries, as
    :func:`masked_logsumexp`) for a scalar ``t`` of either sign (``None``: 1), shifted in
    ``x``'s units: ``exp((x − s)/t)`` with ``s`` the row max of ``x`` for ``t > 0``, the
    min for ``t < 0``. So ``x / t`` is never an array of its own: XLA:CPU writes out an
    operand shared by the max and the sum passes (DINO/SwaV-sized rows 1.5× slower, and a
    temporary the size of ``x``)."""
    (x,) = upcast(x)
    t = None if t is None else jnp.asarray(t, x.dtype)
    if where is not None:  # masked entries: −inf after the scaling, whatever they held
        x = jnp.where(where, x, -_sign(t, x.dtype) * jnp.inf)
    return _shifted_lse(x, t, axis, lambda e: jnp.sum(e, axis=axis, keepdims=True))


def _sign(t: jax.Array | None, dtype) -> jax.Array:
    """−1 for a negative temperature, else 1."""
    return jnp.ones((), dtype) if t is None else jnp.where(t < 0, -1.0, 1.0).astype(dtype)


def _shifted_lse(x: jax.Array, t: jax.Array | None, axis, total: Callable) -> jax.Array:
    """:func:`scaled_logsumexp`'s shifted form, ``total(e)`` summing ``e = exp((x − s)/t)``
    over ``axis`` (kept) — a reduction, or :func:`_row_lse`'s product with ones. The
    scaling is :func:`divide_by` (a runtime scalar inside the fused pass); ``t=None``
    for none."""
    sign = _sign(t, x.dtype)
    s = lax.stop_gradient(sign * jnp.max(sign * x, axis=axis, keepdims=True))
    s = jnp.where(jnp.isfinite(s), s, 0.0)
    y, top = (x - s, s) if t is None else (divide_by(x - s, t), s / t)
    return jnp.squeeze(jnp.log(total(jnp.exp(y))) + top, axis)


def runtime_scalar(x: jax.typing.ArrayLike) -> jax.Array:
    """``x`` (a scalar) behind an ``optimization_barrier``: a value XLA cannot constant-fold.

    XLA:CPU (jax 0.10 and 0.12) hands a YNNPACK fusion (a fused elementwise-and-reduce
    pass) a broadcast compile-time constant as an operand of its own, written out first
    as an array the size of the pass: ``x / 0.1`` with a Python-float temperature costs
    a full-size array of 10s on every call (SwaV's ``2 × 256 × 3000`` high-resolution
    crops under jax 0.10, all eight crops, 23 MiB, under jax 0.12; MSN's ``704 × 1024``
    logits), where a runtime scalar is broadcast inside the fusion. The barrier must hold
    the scalar the fusion reads: ``1 / runtime_scalar(t)`` is a computed scalar, which
    XLA writes out again (SwaV 6.8 → 8.4 ms), so the reciprocal goes inside
    (:func:`_reciprocal`). Differentiable and batchable as the identity.
    """
    return lax.optimization_barrier(jnp.asarray(x))


def divide_by(x: jax.Array, t: jax.typing.ArrayLike) -> jax.Array:
    """``x / t`` for a scalar ``t`` (a temperature) divided by as a :func:`runtime_scalar`,
    so that a constant ``t`` is not written out as an array the size of ``x``. A true
    division, rounded as ``x / t`` (a product with ``1/t`` rounds twice, and under a small
    temperature the softmaxes built from it differ by ~1e-6 in float32)."""
    return x / runtime_scalar(jnp.asarray(t, x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def symmetric_lse(z: jax.Array, temperature: jax.Array,
                  candidates: Callable[[object], jax.Array], operand: object = None) -> jax.Array:
    """Row logsumexps of ``z zᵀ/τ`` over the boolean ``[R, R]`` mask
    ``candidates(operand)``, which must be symmetric (``z [R, D]``; ``operand`` a pytree
    of arrays the mask is built from, no gradient).

    The logits and the mask are symmetric, so the VJP forms ``dL + dLᵀ`` elementwise,
    ``(dL)ᵀ_ij = g_j e^{L_ij − lse_j}`` (both exponents <= 0 on candidates), and needs one
    product, ``dz = (dL + dLᵀ) z / τ``: two matmuls of ``R²·D`` for forward and backward
    where autodiff does three. Also differentiable in τ. (The contrastive losses' and
    DetCon-S's single-device logits; :func:`symmetric_lse_linear` adds a weighted sum of
    the logits.)
    """
    return _symmetric_lse_fwd(z, temperature, candidates, operand)[0]


def _symmetric_lse_fwd(z, temperature, candidates, operand):
    gram = z @ z.T  # the unscaled logits are the residual (no second R×R array)
    lse = scaled_logsumexp(gram, temperature, 1, where=candidates(operand))
    return lse, (z, temperature, operand, gram, lse)


def _symmetric_lse_bwd(candidates, res, g):
    z, temperature, operand, gram, lse = res
    dz, dt, _ = _symmetric_backward(z, temperature, candidates(operand), gram, lse, g)
    return dz, dt, None


def _symmetric_backward(z, temperature, mask, gram, lse, g_lse, extra=None):
    """The one-product backward pass shared by :func:`symmetric_lse` and
    :func:`symmetric_lse_linear`: ``dz = (dL + dLᵀ) z / τ`` with ``dL + dLᵀ`` formed
    elementwise (the logsumexps' part, plus ``extra``, a linear term's part, if given),
    the temperature's cotangent ``−½ Σ (dL + dLᵀ) ⊙ L / τ``, and the logits ``L``."""
    logits = gram * _reciprocal(temperature)
    sym = (g_lse[:, None] * jnp.exp(logits - lse[:, None])
           + g_lse[None, :] * jnp.exp(logits - lse[None, :]))
    if extra is not None:
        sym = sym + extra
    sym = jnp.where(mask, sym, 0.0)
    dz = (sym @ z) / temperature
    dt = -0.5 * jnp.sum(sym * logits) / temperature
    return match_vma(dz, z), match_vma(dt.astype(temperature.dtype), temperature), logits


symmetric_lse.defvjp(_symmetric_lse_fwd, _symmetric_lse_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def symmetric_lse_linear(z: jax.Array, temperature: jax.Array,
                         candidates: Callable[[object], jax.Array], operand: object,
                         s: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    r""":func:`symmetric_lse` and, over the same mask ``M = candidates(operand)``, the
    row sums of the logits weighted by ``A_ij = s_ij c_j``:

    .. math:: \mathrm{lse}_i = \log\sum_{j \in M_i} e^{L_{ij}},\qquad
              \mathrm{lin}_i = \sum_{j \in M_i} s_{ij}\,c_j\,L_{ij},\qquad
              L = z z^\top / \tau

    with ``s [R, R]`` symmetric, float or boolean (e.g. a kernel between the rows' labels,
    or a positives mask) and ``c [R]`` a per-column scale (e.g. a normalizer). Since ``Aᵀ_ij =
    s_ij c_i``, the VJP adds ``s_ij (g_i c_j + g_j c_i)`` (``g`` the cotangent of
    ``lin``) to :func:`symmetric_lse`'s elementwise ``dL + dLᵀ`` and keeps its single
    backward product: a weighted contrastive loss ``Σ_i r_i lse_i − lin_i`` (SupCon's
    positives, y-Aware InfoNCE's kernel weights) then costs two matmuls of ``R²·D``
    where autodiff of ``z zᵀ`` does three. Differentiable in ``z``, ``τ``, ``s`` and
    ``c`` (cotangents nobody uses are dead code under ``jit``). Build a block-repeated
    ``s`` with ``jnp.block`` rather than ``jnp.tile``: XLA:CPU fuses a tile's 4-D index
    into the R×R passes unvectorized (``R = 512``: 0.97 ms against 0.2 for the pass).

    Returns:
      ``(lse [R], lin [R])``.
    """
    return _symmetric_lse_linear_fwd(z, temperature, candidates, operand, s, c)[0]


def _symmetric_lse_linear_fwd(z, temperature, candidates, operand, s, c):
    lse, (z, temperature, operand, gram, lse) = _symmetric_lse_fwd(
        z, temperature, candidates, operand)
    lin = jnp.sum(jnp.where(candidates(operand), _weighted(s, c[None, :] * gram), 0.0),
                  axis=1) / temperature
    return (lse, lin), (z, temperature, operand, gram, lse, s, c)


def _weighted(s, x):
    """``s ⊙ x``; a boolean ``s`` selects (no float copy of the mask)."""
    return jnp.where(s, x, 0.0) if s.dtype == jnp.bool_ else s * x


def _symmetric_lse_linear_bwd(candidates, res, g):
    z, temperature, operand, gram, lse, s, c = res
    g_lse, g_lin = g
    mask = candidates(operand)
    dz, dt, logits = _symmetric_backward(
        z, temperature, mask, gram, lse, g_lse,
        _weighted(s, g_lin[:, None] * c[None, :] + c[:, None] * g_lin[None, :]))
    gl = jnp.where(mask, g_lin[:, None] * logits, 0.0)  # ∂lin_i/∂A_ij = L_ij
    dc = jnp.sum(_weighted(s, gl), axis=0)
    ds = None if s.dtype == jnp.bool_ else match_vma(gl * c[None, :], s)
    return dz, dt, None, ds, match_vma(dc, c)


symmetric_lse_linear.defvjp(_symmetric_lse_linear_fwd, _symmetric_lse_linear_bwd)


#: Logits above this many bytes, or with rows of :data:`_WIDE_ROW` or more, take their
#: row statistics in blocks (:func:`_row_lse`; see :func:`cross_view_entropy`).
_BLOCKED_BYTES = 32 * 2**20
#: See :data:`_BLOCKED_BYTES`.
_WIDE_ROW = 65536
#: About this many bytes of rows per block of :func:`_row_lse`.
_ROW_BLOCK_BYTES = 4 * 2**20


def soft_cross_entropy(logits: jax.Array, targets: jax.Array,
                       temperature: jax.typing.ArrayLike = 1.0) -> jax.Array:
    """``−Σ_k targets_k · log_softmax(logits / temperature)_k`` per row (last axis), in
    >= float32.

    Computed as ``(Σ_k targets_k)·logsumexp(y) − Σ_k targets_k·y`` with ``y = logits/τ``:
    the same value for any non-negative targets (rows need not sum to one, e.g. a sum of
    several views' codes), with one ``exp`` pass forward and one backward instead of the
    ``log_softmax`` materialization (about 1.5× faster on CPU for wide rows, as DINO's
    K = 65536 and SwaV's 3000 prototypes). A custom VJP keeps only the unscaled
    ``logits`` (the caller's array: no temporary), the targets and row statistics, and
    recomputes ``y`` and the softmax in the backward pass (see
    :func:`cross_view_entropy`). ``targets`` get gradients too,
    ``g·(lse − y)``, and ``temperature`` one (it may be traced); stop-gradient the targets
    where the loss detaches them.
    """
    logits, targets = upcast(logits, targets)
    t = jnp.asarray(temperature, logits.dtype)
    return _soft_ce(logits, targets, t)


def _blocked(x: jax.Array) -> bool:
    """Whether :func:`_row_lse` and :func:`softmax_rows` go in row blocks."""
    return x.shape[-1] >= _WIDE_ROW or x.size * x.dtype.itemsize > _BLOCKED_BYTES


def _row_lse(x: jax.Array, t: jax.Array, center: jax.Array | None = None) -> jax.Array:
    """:func:`scaled_logsumexp` of ``x − center`` over the last axis (``center``: an
    optional ``[K]`` vector), for the custom VJPs' forward passes and detached targets.

    Past :data:`_BLOCKED_BYTES`, or for rows of :data:`_WIDE_ROW` or more, in blocks of
    about :data:`_ROW_BLOCK_BYTES` (a ``lax.map`` over a reshape), each block's max,
    ``exp`` and row sums (a product with ones) taken while it is in cache, the center
    subtracted inside. XLA:CPU's fused ``exp`` and row sum over DINO's ``[8·64, 65536]``
    student logits wrote the ``exp`` out (128 MiB, page-faulted on every call: 160 ms);
    the blocks take 18 ms. Smaller arrays with narrower rows are as fast or faster
    unblocked (SwaV's ``8 × 256 × 3000``: 2.3 against 2.5 ms)."""
    if not _blocked(x):
        return scaled_logsumexp(
            x if center is None else x - lead_ones(center, x.ndim), t)
    lead, k = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, k)
    size = max(1, min(rows, _ROW_BLOCK_BYTES // (k * x.dtype.itemsize)))
    # whole blocks of a reshape (a slice would be a copy), unless the largest divisor of
    # the rows is far below the block size (a prime count: blocks of one row, one loop
    # step each); then the whole blocks of a slice and the remainder
    even = next(d for d in range(size, 0, -1) if rows % d == 0)
    if 4 * even >= size:
        size = even
    full = rows // size
    ones = jnp.ones((k,), x.dtype)

    def block(xb):
        if center is not None:
            xb = xb - center[None]
        return _shifted_lse(xb, t, -1, lambda e: (e @ ones)[:, None])

    head = x2 if full * size == rows else x2[:full * size]
    out = lax.map(block, head.reshape(full, size, k)).reshape(-1)
    if full * size < rows:
        out = jnp.concatenate([out, block(x2[full * size:])])
    return out.reshape(lead)


def lead_ones(v: jax.Array, ndim: int) -> jax.Array:
    """A ``[K]`` vector as ``[1, …, 1, K]`` of ``ndim`` axes (explicit rank promotion)."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def softmax_rows(x: jax.Array, t: jax.typing.ArrayLike,
                 center: jax.Array | None = None) -> jax.Array:
    """``softmax((x − center) / t)`` over the last axis, in >= float32 (DINO's and
    iBOT's teacher targets; differentiable, the blocked path by autodiff of its loop).

    Where :func:`_row_lse` goes in blocks, the probabilities are ``exp((x − center)/t −
    lse)`` from its row statistics: one elementwise expression, which XLA fuses into its
    consumers (the cross entropy's forward product and backward pass) instead of writing
    it out. ``jax.nn.softmax`` is one fusion that writes the ``exp`` and then the
    probabilities: iBOT++'s ``64 × 64 × 8192`` teacher, 128 MiB of temporaries then,
    none now; DINO's two ``64 × 65536`` teacher views, two 32 MiB arrays then."""
    (x,) = upcast(x)
    t = jnp.asarray(t, x.dtype)
    c = 0.0 if center is None else lead_ones(center, x.ndim)
    if not _blocked(x):
        return jax.nn.softmax(divide_by(x - c, t), axis=-1)
    # an elementwise expression (no fused reduction reads it: a constant t is no array)
    return jnp.exp((x - c) / t - _row_lse(x, t, center)[..., None])


def _soft_ce_parts(logits, targets, t):
    lse = _row_lse(logits, t)
    mass = jnp.sum(targets, axis=-1)
    dots = jnp.sum(targets * logits, axis=-1)
    if _blocked(logits):
        # per-row sums, not fused into the caller's total: a reduction to a scalar runs
        # on one thread, and under jax 0.12 this one took 82 ms of iBOT++'s step (jax
        # 0.10: 10 ms); with the barrier the step takes 113 ms instead of 190 (jax 0.12)
        dots = lax.optimization_barrier(dots)
    return mass * lse - dots / t, (logits, targets, t, lse, mass)


@jax.custom_vjp
def _soft_ce(logits: jax.Array, targets: jax.Array, t: jax.Array) -> jax.Array:
    return _soft_ce_parts(logits, targets, t)[0]


def _ce_cotangents(g, y, targets, lse, mass):
    """Cotangents of ``mass·lse(y) − Σ targets·y`` per row, the softmax recomputed:
    ``g·(mass·softmax − targets)`` for ``y``, ``g·(lse − y)`` for targets of its shape."""
    g, lse = g[..., None], lse[..., None]
    return g * (mass[..., None] * jnp.exp(y - lse) - targets), g * (lse - y)


def _reciprocal(t):
    """``1/t`` as a :func:`runtime_scalar`, for the backward passes' scaling of the
    logits: a constant ``1/t`` broadcast would be written out as a logits-sized array for
    their fused reductions (CAPI: a 16 MiB constant, 5 ms per call). (Formerly a
    ``[rows, 1]`` column ``1/t + 0·lse``, the same values.)"""
    return runtime_scalar(1 / t)


def _scaled_cotangents(d_y, y, t):
    """For ``y = logits / t``: the cotangents of ``logits`` and of the scalar ``t``."""
    return d_y / t, (-jnp.sum(d_y * y) / t).astype(t.dtype)


def _soft_ce_bwd(res, g):
    logits, targets, t, lse, mass = res
    y = logits * _reciprocal(t)
    d_y, d_targets = _ce_cotangents(g, y, targets, lse, mass)
    d_logits, d_t = _scaled_cotangents(d_y, y, t)
    return (match_vma(d_logits, logits), match_vma(d_targets, targets), match_vma(d_t, t))


_soft_ce.defvjp(_soft_ce_parts, _soft_ce_bwd)


def cross_view_entropy(logits: jax.Array | tuple[jax.Array, ...], targets: jax.Array,
                       temperature: jax.typing.ArrayLike = 1.0) -> jax.Array:
    """The multi-crop pairing of DINO and SwaV: the scalar
    ``Σ_v Σ_rows soft_cross_entropy(logits[v] / τ, Σ_{t ≠ v} targets[t])`` for
    ``logits [V, ..., K]`` and ``targets [T, ..., K]`` (every view predicts every target
    view but its own; views ``v >= T`` predict all of them): the sum of the cross
    entropies over all pairs with different indices, without a ``[T, V]`` table of
    pairwise terms. ``logits`` may also be a tuple of blocks of views (``[V_j, ..., K]``,
    in view order, e.g. SwaV's high- and low-resolution crops): they are never
    concatenated, and each gets its own gradient.

    With ``y = logits/τ``, ``tot = Σ_t targets[t]`` and the target masses
    ``m_t = Σ_k targets[t]_k``, view v contributes
    ``Σ_rows (Σ_t m_t − m_v)·lse(y[v]) − ⟨tot, y[v]⟩ + ⟨targets[v], y[v]⟩`` (the last
    term only for ``v < T``). The per-view targets ``[V, ..., K]`` are never built, and
    both inner products are matrix-vector products over the flattened rows (XLA:CPU's
    fused multiply-and-row-sum against a ``tot`` broadcast over the views is 7× slower:
    4.3 ms against 0.6 for SwaV's six ``256 × 3000`` low-resolution crops).

    A custom VJP keeps only the unscaled inputs and ``[V, ...]`` row statistics, and its
    backward writes ``g·(mass·softmax − tot + targets[v])/τ`` in one pass, recomputing
    ``y`` and the softmax: autodiff stores ``y``, the softmax and a zero-padded copy of
    the own-view gradient. Every such temporary the size of ``logits`` costs twice on
    CPU: XLA:CPU allocates its temporaries as one buffer per call, and glibc maps a
    buffer above 32 MiB afresh on every call, each page faulted and zeroed (here
    ~0.25 ms per MiB). SwaV, 2+6 crops, K = 3000: 76 MiB of temporaries with the
    per-view targets built, 56 with autodiff, 26 with the scaled logits stored, 12 now.
    Past :data:`_BLOCKED_BYTES`, or for rows of :data:`_WIDE_ROW` or more, the forward
    row statistics are taken in blocks (:func:`_row_lse`), and targets made by
    :func:`softmax_rows` from such statistics need not be stored: XLA recomputes them
    inside the forward product and the backward pass where they have no other use.
    iBOT++'s ``64 × 64 × 8192`` tokens: 128 → 0 MiB of temporaries, 134–144 → 107–113
    ms (before: autodiff, the student's softmax stored). DINO's 8 + 2 crops of
    ``64 × 65536``: 112 → 48 MiB (the teacher's probabilities, summed over its views,
    stay), 111–135 → ~100 ms.
    """
    *cast, targets = upcast(*(logits if isinstance(logits, tuple) else (logits,)), targets)
    blocks = tuple(cast)
    t = jnp.asarray(temperature, targets.dtype)
    return _cross_view(blocks, targets, t)


def _pad_views(x: jax.Array, n: int) -> jax.Array:
    """``x[:n]`` zero-padded along axis 0 to ``n`` rows."""
    x = x[:n]
    return jnp.pad(x, ((0, n - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def _view_blocks(blocks: tuple[jax.Array, ...], n_targets: int):
    """``(start, own)`` per block: its first view's index and its number of views that
    have a target of their own (index < ``n_targets``)."""
    out, start = [], 0
    for x in blocks:
        out.append((start, max(0, min(x.shape[0], n_targets - start))))
        start += x.shape[0]
    return out


def _flat_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``Σ a·b`` over all elements of two equal-sized arrays, as a matrix-vector
    product (``[1, n] · [n]``) rather than a fused multiply-and-reduce."""
    return jnp.dot(a.reshape(1, -1), b.reshape(-1))[0]


def _cross_view_parts(blocks, targets, t):
    tot = sum_leading(targets)
    own_mass = jnp.sum(targets, axis=-1)
    total_mass = sum_leading(own_mass)[None]
    value, stats = jnp.zeros((), t.dtype), []
    for x, (start, m) in zip(blocks, _view_blocks(blocks, targets.shape[0])):
        n = x.shape[0]
        mass = total_mass - _pad_views(own_mass[start:start + m], n)
        lse = _row_lse(x, t)
        # ⟨tot, x[v]⟩ summed over the views: [V, rows] · [rows] (a GEMV, no broadcast)
        cross = jnp.sum(jnp.dot(x.reshape(n, -1), tot.reshape(-1)))
        if m:
            cross = cross - _flat_dot(x[:m], targets[start:start + m])
        value = value + jnp.sum(mass * lse) - cross / t
        stats.append((lse, mass))
    return value, (blocks, targets, t, tuple(stats), tot)


@jax.custom_vjp
def _cross_view(blocks: tuple[jax.Array, ...], targets: jax.Array, t: jax.Array) -> jax.Array:
    return _cross_view_parts(blocks, targets, t)[0]


def _cross_view_bwd(res, g):
    blocks, targets, t, stats, tot = res
    n_targets = targets.shape[0]
    d_blocks, d_t, a_own = [], jnp.zeros((), t.dtype), []
    a_sum = jnp.zeros(targets.shape[1:], targets.dtype)
    for x, (start, m), (lse, mass) in zip(blocks, _view_blocks(blocks, n_targets), stats):
        y = x * _reciprocal(t)
        gv = jnp.broadcast_to(g, lse.shape)
        # every view against the total, then its own targets added back (views v < T)
        d, a = _ce_cotangents(gv, y, tot[None], lse, mass)
        if m:
            head = d[:m] + g * targets[start:start + m]
            d = jnp.concatenate([head, d[m:]]) if m < x.shape[0] else head
        d_x, d_tj = _scaled_cotangents(d, y, t)
        d_blocks.append(d_x)
        d_t = d_t + d_tj
        a_sum = a_sum + sum_leading(a)
        a_own.append(a[:m])
    # d/d targets[t] = Σ_{v ≠ t} g·(lse_v − y[v])
    own = jnp.concatenate(a_own) if len(a_own) > 1 else a_own[0]
    return (tuple(match_vma(d, x) for d, x in zip(d_blocks, blocks)),
            match_vma(a_sum[None] - _pad_views(own, n_targets), targets), match_vma(d_t, t))


_cross_view.defvjp(_cross_view_parts, _cross_view_bwd)


def _halve(x: jax.Array, op: Callable[[jax.Array, jax.Array], jax.Array],
           rows: int = 1) -> jax.Array:
    """``op``-reduction over axis 0 by repeated halving, down to at most ``rows`` rows:
    contiguous elementwise passes over shrinking halves (an odd last row is carried to the
    next level)."""
    while x.shape[0] > rows:
        h = x.shape[0] // 2
        y = op(x[:h], x[h:2 * h])
        x = jnp.concatenate([y, x[2 * h:]]) if x.shape[0] % 2 else y
    return x


def _leading_sum(x: jax.Array) -> jax.Array:
    """Σ over axis 0: one add for two rows, else a ``ones @ x`` matrix-vector product
    over the flattened rest (float32 accumulation, full precision on accelerators)."""
    if x.shape[0] <= 2:
        return _halve(x, jnp.add)[0]
    acc = x.dtype if jnp.finfo(x.dtype).bits >= 32 else jnp.dtype(jnp.float32)
    ones = jnp.ones((x.shape[0],), x.dtype)
    out = jnp.dot(ones, x.reshape(x.shape[0], -1), precision=lax.Precision.HIGHEST,
                  preferred_element_type=acc)
    return out.reshape(x.shape[1:]).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sum_leading(x: jax.Array, n: int) -> jax.Array:
    return _leading_sum(x)


def _sum_leading_fwd(x, n):
    return _leading_sum(x), None


def _sum_leading_bwd(n, _, g):
    return (jnp.broadcast_to(g[None], (n, *g.shape)),)  # one broadcast, not a product


_sum_leading.defvjp(_sum_leading_fwd, _sum_leading_bwd)


#: Smallest size (elements) from which :func:`sum_leading` sums as a product.
_LEADING_MIN = 65536


def sum_leading(x: jax.Array, keepdims: bool = False) -> jax.Array:
    """``jnp.sum(x, axis=0)`` of a floating array, as ``ones @ x`` (a matrix-vector
    product over the flattened trailing axes) where that is faster; the gradient is a
    broadcast, as for ``jnp.sum``.

    XLA:CPU reduces a leading axis slowly: ``(64, 65536)`` or ``(7, 256, 3000)`` take
    20–25 ms with ``jnp.sum(axis=0)``, 0.3–1.4 ms as a pairwise tree of halving adds and
    0.2–0.3 ms as the product; iBOT++'s center mean over ``(4096, 8192)`` teacher tokens
    16 ms, 16 ms pairwise (12 levels, each a pass) and 4 ms as the product (jax 0.10,
    2 cores). Two rows are one add; arrays under :data:`_LEADING_MIN` elements keep
    ``jnp.sum``, which fuses into its neighbours.
    """
    n = x.shape[0]
    if n < 2 or x.size < _LEADING_MIN or not jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.sum(x, axis=0, keepdims=keepdims)
    out = _sum_leading(x, n)
    return out[None] if keepdims else out


def max_leading(x: jax.Array) -> jax.Array:
    """``jnp.max(x, axis=0)`` (no gradient: for shifts), fast on XLA:CPU: halving
    ``maximum`` passes down to at most :data:`_MAX_LOOP_ROWS` rows, then a loop over
    those. A reduction of the leading axis runs 8 ms for CAPI's ``(64, 64, 1024)``
    logits; the halving passes alone are fast but XLA fuses the last levels into every
    consumer element (its ``exp``: 15 ms), which the loop's boundary prevents."""
    x = _halve(lax.stop_gradient(x), jnp.maximum, _MAX_LOOP_ROWS)
    if x.shape[0] == 1:
        return x[0]
    return lax.fori_loop(1, x.shape[0], lambda i, m: jnp.maximum(m, x[i]), x[0])


#: Rows left to :func:`max_leading`'s loop.
_MAX_LOOP_ROWS = 8


def mean_leading(x: jax.Array) -> jax.Array:
    """``jnp.mean(x, axis=0)`` as :func:`sum_leading` (the gradient a broadcast)."""
    return sum_leading(x) / x.shape[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_leading(x: jax.Array, n: int) -> jax.Array:
    """``x`` repeated ``n`` times along a new leading axis, ``[n, *x.shape]``, whose
    gradient is :func:`sum_leading` of the cotangent.

    Broadcasting ``x[None]`` against ``[n, ...]`` (a mean over views subtracted from each
    view) transposes to a sum over that leading axis, which XLA:CPU runs slowly once the
    kept part has 32768 elements or more: 0.2 ms for 2 views of ``256×128`` and 0.7 ms
    for 8, against 0.01–0.03 ms pairwise (jax 0.10, 2 cores).
    """
    return jnp.broadcast_to(x[None], (n, *x.shape))


def _broadcast_leading_fwd(x, n):
    return broadcast_leading(x, n), None


def _broadcast_leading_bwd(n, _, g):
    return (sum_leading(g),)


broadcast_leading.defvjp(_broadcast_leading_fwd, _broadcast_leading_bwd)


def _arg_extreme(x: jax.Array, axis: int, pair: Callable, extreme: Callable) -> jax.Array:
    axis = axis % x.ndim
    m = reduce_halving(x, axis, pair, extreme)
    hit = x == m
    if jnp.issubdtype(x.dtype, jnp.inexact):
        hit = hit | jnp.isnan(x)  # as argmax/argmin: a NaN row's first NaN
    itype = jax.dtypes.canonicalize_dtype(jnp.int64)  # argmax's: int64 only under x64
    iota = lax.broadcasted_iota(itype, x.shape, axis)
    first = jnp.where(hit, iota, jnp.asarray(x.shape[axis], itype))
    return jnp.squeeze(reduce_halving(first, axis, jnp.minimum, jnp.min), axis)


#: Widest axis that :func:`reduce_halving` reduces by halving, and the width it stops at.
_HALVING_MAX = 1024
_HALVING_LEAF = 8


def reduce_halving(x: jax.Array, axis: int, pair: Callable, reduce: Callable) -> jax.Array:
    """``reduce(x, axis=axis, keepdims=True)`` for an associative elementwise ``pair``
    (``jnp.maximum`` with ``jnp.max``, ``jnp.minimum`` with ``jnp.min``): up to
    :data:`_HALVING_MAX` wide, first ``pair`` of the two halves of the axis until at most
    :data:`_HALVING_LEAF` remain (an odd last element carried along), which XLA fuses
    into one elementwise pass, then ``reduce`` of those.

    XLA:CPU hands a reduction to YNNPACK, which splits even a ``(256, 256)`` row max
    over its threads and waits for them: 60–110 µs where the halving takes 25, on 2
    cores under jax 0.10 and 0.12. Wider axes keep ``reduce``: each output element
    would read the whole row through a tree of that many slices. The same value (a NaN
    as ``pair`` and XLA's reduction treat it). (The contrastive logsumexps' shift,
    :func:`scaled_logsumexp`, gained nothing this way at ``512 × 512`` and keeps
    ``jnp.max``.)"""
    axis = axis % x.ndim
    n = x.shape[axis]
    if n > _HALVING_MAX:
        return reduce(x, axis=axis, keepdims=True)
    while n > _HALVING_LEAF:
        h = n // 2
        y = pair(lax.slice_in_dim(x, 0, h, axis=axis), lax.slice_in_dim(x, h, 2 * h, axis=axis))
        x = y if n % 2 == 0 else jnp.concatenate(
            [y, lax.slice_in_dim(x, 2 * h, n, axis=axis)], axis=axis)
        n = x.shape[axis]
    return reduce(x, axis=axis, keepdims=True)


def argmax_first(x: jax.Array, axis: int = -1) -> jax.Array:
    """``jnp.argmax(x, axis)`` (same dtype; the first index among ties; a NaN counts as the
    maximum) as a max and a masked min: two vectorized reductions.

    XLA:CPU lowers ``argmax``'s (value, index) variadic reduce to a scalar loop: 0.22 ms
    for a ``(256, 256)`` similarity against 0.09 ms as two reductions and 0.04 ms as two
    :func:`reduce_halving` (jax 0.10, 2 cores), where the ``256×256×128`` product that
    made it takes 0.2 (KoLeo, NNCLR, VICRegL's matching, PaKa's k-means; KoLeo's step
    0.39 → 0.31 ms). Integer output, so no gradient, as ``argmax``.
    """
    return _arg_extreme(x, axis, jnp.maximum, jnp.max)


def argmin_first(x: jax.Array, axis: int = -1) -> jax.Array:
    """``jnp.argmin(x, axis)`` the same way (see :func:`argmax_first`)."""
    return _arg_extreme(x, axis, jnp.minimum, jnp.min)


def sq_dists(x: jax.Array, y: jax.Array) -> jax.Array:
    """``‖x_i − y_j‖²`` (``[N, M]`` for ``x [N, D]``, ``y [M, D]``) as
    ``‖x_i‖² + ‖y_j‖² − 2⟨x_i, y_j⟩`` (one full-precision product), clamped at 0:
    torch ``cdist``'s matmul form (DSE's k-means, uniformity)."""
    d2 = (jnp.sum(jnp.square(x), -1)[:, None] + jnp.sum(jnp.square(y), -1)[None, :]
          - 2.0 * jnp.matmul(x, y.T, precision=lax.Precision.HIGHEST))
    return jnp.maximum(d2, 0.0)


def offdiag_sq_sum(c: jax.Array) -> jax.Array:
    """Σ_{i≠j} c_ij² over the last two axes (exact masking, no cancellation)."""
    d = c.shape[-1]
    mask = ~jnp.eye(d, dtype=bool)
    return jnp.sum(jnp.where(mask, jnp.square(c), 0.0), axis=(-2, -1))


def cross_diag(a: jax.Array, b: jax.Array) -> jax.Array:
    """diag(aᵀb) for a, b of shape (N, ..., D): Σ_n a[n]·b[n] per feature, shape (..., D)."""
    return jnp.sum(a * b, axis=0)


def nuclear_norm(x: jax.Array, *, factor_short: bool = False) -> jax.Array:
    """Σ σ_i(x), the nuclear norm over the last two axes (batched), in >= float32.

    Differentiated through the singular values only: the JVP is ``Σ (U Vᵀ) ⊙ dX``
    (``diag(Uᵀ dX V)`` summed), i.e. the gradient is ``U Vᵀ``, with none of the
    ``1/(σ_i² − σ_j²)`` factors of the singular vectors' derivative. It is therefore
    finite at repeated singular values and at ``x = 0`` (where it is a valid subgradient,
    ``‖U Vᵀ‖₂ <= 1``). Plain evaluation computes the singular values only; under
    differentiation one thin SVD with vectors, of the tall orientation (the transpose of
    a wide matrix), gives both: autodiff of ``svd(compute_uv=False)`` cost 2.4× more for
    MMCR's ``[256, 128]`` centroids and 1.6× for its ``[256, 4, 128]`` samples (jax 0.10,
    2 cores).

    With ``factor_short``, a matrix whose short side ``k`` is at most ``_SMALL_SIDE`` (16)
    and at most half its long side, as MMCR's per-sample ``[2k, D]`` views, is first
    reduced to its ``k × k`` triangular factor (:func:`_row_qr`, plain vector operations)
    and only that factor goes through an SVD: the same singular values, and on a GPU
    cuSOLVER's batched Jacobi SVD of small matrices instead of one Jacobi SVD per matrix
    with full ``D × D`` vectors (on an H100, 2026-12-05: MMCR with ``[256, 2, 128]``
    inputs took 89 ms, autodiff of the SVDs of 256 matrices of ``2 × 128`` alone 51 ms;
    on 2 CPU cores the factored path is 10–30% faster). Where ``x``
    is rank-deficient the gradient is then another valid subgradient than LAPACK's
    (the null directions come from the factorization's round-off, not from LAPACK's
    completion of ``U``), so the default keeps the plain SVD: DSE's zero-padded clusters
    match lightly's gradients that way.
    """
    (x,) = upcast(x)
    return _nuclear_norm(x, factor_short)


#: Short side up to which :func:`nuclear_norm` takes the SVD of the triangular factor.
_SMALL_SIDE = 16


def _oriented(x: jax.Array, factor_short: bool = True) -> tuple[jax.Array, bool, bool]:
    """``(b, tall, small)``: ``x`` as ``[..., k, M]`` with ``k <= M`` (transposed if ``x``
    is ``tall``), and whether to take :func:`_row_qr` first (``factor_short`` and ``k``
    small enough)."""
    tall = x.shape[-2] > x.shape[-1]
    b = jnp.swapaxes(x, -1, -2) if tall else x
    k, m = b.shape[-2:]
    return b, tall, factor_short and k <= _SMALL_SIDE and 2 * k <= m


def _row_qr(b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``b = Rᵀ Q`` for ``b [..., k, M]`` with small ``k``: ``Q [..., k, M]`` with
    orthonormal rows, ``R [..., k, k]`` upper triangular with a non-negative diagonal
    (``b``'s transpose is ``Qᵀ R``, its thin QR factorization), so ``R`` has ``b``'s
    singular values. Modified Gram–Schmidt over the rows, each orthogonalized twice
    ("twice is enough"): ``Q`` is orthonormal to working precision and ``R``'s singular
    values are ``b``'s to within a few ulps of ``‖b‖``. A row in the span of the earlier
    ones (a rank-deficient ``b``) gets ``R_ii`` of that order and a unit or zero row.

    Multiplies and sums along the rows, unrolled over ``k``: exact float32 on GPUs (no
    TF32 dots) and fused on the CPU (as batched ``[i, M]`` dots, or along the columns of
    the transpose, it took 4–5× longer, 2 cores). Not meant to be differentiated.
    """
    k = b.shape[-2]
    qs: list[jax.Array] = []
    cols: list[jax.Array] = []
    for i in range(k):
        v = b[..., i, :]
        dots = [jnp.zeros(b.shape[:-2], b.dtype)] * i
        for _ in range(2):
            for j in range(i):
                c = jnp.sum(qs[j] * v, axis=-1)
                v = v - c[..., None] * qs[j]
                dots[j] = dots[j] + c
        norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=-1))
        qs.append(v / jnp.where(norm > 0, norm, 1.0)[..., None])
        cols.append(jnp.stack([*dots, norm, *[jnp.zeros_like(norm)] * (k - i - 1)], axis=-1))
    return jnp.stack(qs, axis=-2), jnp.stack(cols, axis=-1)


def _svd_operand(x: jax.Array, factor_short: bool
                 ) -> tuple[jax.Array, jax.Array | None, bool]:
    """``(m, q, tall)``: a matrix ``m`` with ``x``'s singular values whose SVD
    ``m = U S Vᵀ`` gives ``x``'s polar factor, for ``b`` = ``x`` in its wide orientation
    (``x = bᵀ`` where ``tall``): ``m = bᵀ`` (one thin SVD of the tall orientation, the
    faster one), polar(b) = ``(U Vᵀ)ᵀ``; or, for a short side small enough,
    ``m = R`` of :func:`_row_qr`'s ``b = Rᵀ Q``, polar(b) = ``(U Vᵀ)ᵀ Q``."""
    b, tall, small = _oriented(x, factor_short)
    if small:
        q, r = _row_qr(b)
        return r, q, tall
    return jnp.swapaxes(b, -1, -2), None, tall


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _nuclear_norm(x: jax.Array, factor_short: bool) -> jax.Array:
    m, _, _ = _svd_operand(x, factor_short)
    return jnp.sum(jnp.linalg.svd(m, compute_uv=False), axis=-1)


@_nuclear_norm.defjvp
def _nuclear_norm_jvp(factor_short, primals, tangents):
    (x,), (dx,) = primals, tangents
    m, q, tall = _svd_operand(x, factor_short)
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    polar = jnp.swapaxes(jnp.matmul(u, vt, precision=lax.Precision.HIGHEST), -1, -2)
    if q is not None:
        polar = jnp.matmul(polar, q, precision=lax.Precision.HIGHEST)
    polar = jnp.swapaxes(polar, -1, -2) if tall else polar
    return jnp.sum(s, axis=-1), jnp.sum(polar * dx, axis=(-2, -1))


@jax.custom_vjp
def matmul_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ bᵀ`` for ``a [M, D]``, ``b [N, D]`` whose VJP forms ``b``'s cotangent as
    ``(aᵀ g)ᵀ``: the product in the ``[D, N]`` layout, then a ``D × N`` transpose (an
    ``optimization_barrier`` keeps XLA from folding it back into a ``gᵀ a`` dot, which
    XLA:CPU runs about 2× slower than a plain one at 2048 × 2048 × 128). Not for a
    replicated ``b`` against device-varying ``a`` inside ``shard_map`` (its cotangent
    must be reduced as autodiff's transpose does)."""
    return a @ b.T


def _matmul_nt_fwd(a, b):
    return matmul_nt(a, b), (a, b)


def _matmul_nt_bwd(res, g):
    a, b = res
    return match_vma(g @ b, a), match_vma(lax.optimization_barrier(a.T @ g).T, b)


matmul_nt.defvjp(_matmul_nt_fwd, _matmul_nt_bwd)


#: Largest ``M`` for which :func:`sym_gram`'s VJP symmetrizes ``g`` in one fused pass.
_SYM_FUSED_MAX = 256


@jax.custom_vjp
def sym_gram(z: jax.Array) -> jax.Array:
    """``z zᵀ`` over the last two axes (``[..., M, D] -> [..., M, M]``, batched), in full
    precision.

    Its VJP is one product, ``(g + gᵀ) z``, where autodiff of ``z @ z.T`` differentiates
    both operands separately (two products of the same size, then a sum): for the
    per-image token kernels of PaKa that is one batched matmul less of three. Above
    :data:`_SYM_FUSED_MAX` rows XLA:CPU's fused ``g + gᵀ`` reads ``gᵀ`` column by column
    (1024 × 1024: 3.5 ms against 0.1 ms for ``2·g``), so there the VJP is
    ``g z + (zᵀ g)ᵀ``, the second product kept in the ``[D, M]`` layout it is cheap in
    (an ``optimization_barrier``; XLA would otherwise fold the transpose back into a
    ``gᵀ z`` dot, 2× slower).
    """
    return jnp.einsum("...md,...nd->...mn", z, z, precision=lax.Precision.HIGHEST)


def _sym_gram_fwd(z):
    return sym_gram(z), z


def _sym_gram_bwd(z, g):
    hi = lax.Precision.HIGHEST
    if g.shape[-1] <= _SYM_FUSED_MAX:
        g = g + jnp.swapaxes(g, -1, -2)
        return (jnp.einsum("...mn,...nd->...md", g, z, precision=hi),)
    gt_z = lax.optimization_barrier(jnp.einsum("...nd,...nm->...dm", z, g, precision=hi))
    return (jnp.einsum("...mn,...nd->...md", g, z, precision=hi)
            + jnp.swapaxes(gt_z, -1, -2),)


sym_gram.defvjp(_sym_gram_fwd, _sym_gram_bwd)


#: Largest array :func:`unpermute` addresses by flat int32 positions.
_FLAT_INDEX_MAX = 2**31 - 1


def unpermute(g: jax.Array, perm: jax.Array, axis: int = -1) -> jax.Array:
    """The inverse of ``take_along_axis(·, perm, axis)`` for ``perm`` a permutation along
    ``axis``: ``out`` with ``out[…, perm[…, i, …], …] = g[…, i, …]``.

    One flat scatter of unique indices, where autodiff of ``take_along_axis``
    scatter-adds with batched indices (VISReg's ``[8, 4096, 256]`` sorted slices: 44 ms
    against 73 ms, jax 0.10, 2 cores); past int32 flat positions a batched scatter-add.
    Rows that are not permutations give undefined results (as a repeated index would
    need an add).
    """
    axis = axis % g.ndim
    if g.size > _FLAT_INDEX_MAX:  # flat int32 positions would overflow: batched scatter-add
        idx = [lax.broadcasted_iota(jnp.int32, perm.shape, d) for d in range(perm.ndim)]
        idx[axis] = perm.astype(jnp.int32)
        return jnp.zeros_like(g).at[tuple(idx)].add(g)
    stride = math.prod(g.shape[axis + 1:])
    # the flat position of each element with its coordinate along `axis` replaced by perm
    start = jnp.arange(g.size, dtype=jnp.int32).reshape(g.shape)
    shift = perm.astype(jnp.int32) - lax.broadcasted_iota(jnp.int32, g.shape, axis)
    flat = start + shift * stride
    out = jnp.zeros((g.size,), g.dtype).at[flat.reshape(-1)].set(
        g.reshape(-1), unique_indices=True, mode="promise_in_bounds")
    return out.reshape(g.shape)




def _order_keys(x: jax.Array) -> jax.Array:
    """Unsigned integers of ``x``'s width ordered as ``jnp.sort`` orders ``x``: ``-0.0``
    equal to ``0.0`` and every NaN after ``+inf`` (jax's canonicalization)."""
    x = jnp.where(x == 0, jnp.zeros((), x.dtype), x)
    x = jnp.where(jnp.isnan(x), jnp.full((), jnp.nan, x.dtype), x)
    utype = jnp.uint32 if x.dtype.itemsize == 4 else jnp.uint64
    u = lax.bitcast_convert_type(x, utype)
    sign = jnp.asarray(1 << (8 * x.dtype.itemsize - 1), utype)
    return jnp.where(u & sign, ~u, u | sign)  # negatives reversed, below the positives


def _bitonic_sort(x: jax.Array, axis: int) -> jax.Array:
    """Ascending sort of an integer array along ``axis`` by a bitonic sorting network.

    Every compare-exchange stage is an elementwise ``minimum``/``maximum`` of two halves
    of the array, vectorized over the axes after ``axis`` (the lanes): for VISReg's
    ``[8, 256, 512]`` int32 chunk the 36 stages take 3 ms where ``lax.sort`` takes 19 ms
    along the last axis and 34 ms along the middle one (jax 0.10, 2 cores; XLA:CPU's sort
    runs a comparator per row on one thread). A length that is not a power of two is
    padded with the dtype's maximum, which sorts last; the values are plain integers, so
    equal ones are interchangeable and stability does not arise.
    """
    shape, n = x.shape, x.shape[axis]
    lead, lanes = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    size = 1 << max(0, (n - 1).bit_length())
    y = x.reshape(lead, n, lanes)
    if size != n:
        y = jnp.pad(y, ((0, 0), (0, size - n), (0, 0)),
                    constant_values=jnp.iinfo(x.dtype).max)

    def exchange(y: jax.Array, half: int, mirrored: bool) -> jax.Array:
        # pairs (i, i + half) inside blocks of 2·half; mirrored: (i, 2·half − 1 − i)
        blocks = y.reshape(lead, size // (2 * half), 2, half, lanes)
        a, b = blocks[:, :, 0], blocks[:, :, 1]
        if mirrored:
            b = jnp.flip(b, axis=2)
        lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
        if mirrored:
            hi = jnp.flip(hi, axis=2)
        return jnp.stack([lo, hi], axis=2).reshape(lead, size, lanes)

    block = 2
    while block <= size:  # merge sorted runs of block/2 into runs of block
        y = exchange(y, block // 2, True)
        half = block // 4
        while half >= 1:
            y = exchange(y, half, False)
            half //= 2
        block *= 2
    return y[:, :n].reshape(shape)


#: lanes (the product of the axes after the sorted one) from which the bitonic network
#: replaces ``lax.sort``
_BITONIC_MIN_LANES = 8


def _sort_ints(x: jax.Array, axis: int) -> jax.Array:
    """Ascending sort of distinct-or-interchangeable integers along ``axis``."""
    if math.prod(x.shape[axis + 1:]) >= _BITONIC_MIN_LANES:
        return _bitonic_sort(x, axis)
    return lax.sort(x, dimension=axis)


def _radix_argsort(keys: jax.Array, itype, bits: int, width: int, axis: int) -> jax.Array:
    """Exact stable argsort of unsigned order keys by LSD passes (see argsort_stable)."""
    digit = width - 1 - bits  # digit bits beside the position in a signed int of `width`
    pos = lax.broadcasted_iota(itype, keys.shape, axis)
    mask = jnp.asarray((1 << bits) - 1, itype)
    perm = pos  # the order after the passes so far: least significant digit first
    for shift in range(0, width, digit):
        d = ((keys >> shift) & jnp.asarray((1 << digit) - 1, keys.dtype)).astype(itype)
        d = d if shift == 0 else jnp.take_along_axis(d, perm, axis=axis,
                                                      mode="promise_in_bounds")
        order = _sort_ints((d << bits) | pos, axis) & mask
        perm = order if shift == 0 else jnp.take_along_axis(perm, order, axis=axis,
                                                            mode="promise_in_bounds")
    return perm


def _transposition_phase(keys: jax.Array, perm: jax.Array, first: int, axis: int):
    """One phase of odd-even transposition sort along ``axis``: the pairs ``(i, i + 1)``
    for ``i = first, first + 2, …`` are swapped where strictly inverted (so equal keys
    keep their order: the sort is stable)."""
    n = keys.shape[axis]
    m = (n - first) // 2
    lo, hi = first, first + 2 * m
    if m == 0:
        return keys, perm
    paired = keys.shape[:axis] + (m, 2) + keys.shape[axis + 1:]

    def pairs(a: jax.Array) -> tuple[jax.Array, jax.Array]:
        p = lax.slice_in_dim(a, lo, hi, axis=axis).reshape(paired)
        return lax.index_in_dim(p, 0, axis + 1, False), lax.index_in_dim(p, 1, axis + 1, False)

    left, right = pairs(keys)
    swap = left > right

    def settle(a: jax.Array) -> jax.Array:
        left, right = pairs(a)
        mid = jnp.stack([jnp.where(swap, right, left), jnp.where(swap, left, right)],
                        axis=axis + 1).reshape(keys.shape[:axis] + (2 * m,) + keys.shape[axis + 1:])
        return jnp.concatenate([lax.slice_in_dim(a, 0, lo, axis=axis), mid,
                                lax.slice_in_dim(a, hi, n, axis=axis)], axis=axis)

    return settle(keys), settle(perm)


#: odd-even rounds tried after the prefix sort before the exact radix passes take over
_FIXUP_ROUNDS = 8


def argsort_stable(x: jax.Array, axis: int = -1) -> jax.Array:
    """``jnp.argsort(x, axis=axis, stable=True)`` of a float array from one single-operand
    integer sort and a short exact fix-up.

    XLA:CPU sorts plain integers several times faster than floats under jax's total-order
    comparator, or than any multi-operand sort (which ``jnp.argsort`` and the gradient of
    ``jnp.sort`` are): for ``(8, 4096, 256)`` float32 (the VISReg row of ``benchmarks/``,
    jax 0.10, 2 cores) one int32 sort takes about 0.3 s, ``jnp.argsort`` 2.5–4.5 s. When
    ``axis`` is not the last one and the axes after it hold at least
    :data:`_BITONIC_MIN_LANES` elements, the integer sorts are a bitonic network
    vectorized over those axes (:func:`_bitonic_sort`), another 6× faster.

    The order-preserving integer key of ``x`` has its ``b = bit_length(n - 1)`` lowest
    bits replaced by the position, and one sort of these distinct integers orders the
    elements by the key's top bits, ties by position. Only elements whose keys agree in
    the top bits (relative differences below about ``2**(b - 23)`` in float32) can be
    out of order; rounds of odd-even transposition sort on the full keys (adjacent
    strict inversions swapped, so the order stays stable) settle them, as long as any
    inversion is left, for at most :data:`_FIXUP_ROUNDS` rounds. If one is still left
    after those (many nearly equal values), the exact LSD radix passes run instead
    (``ceil(w / (w - 1 - b))`` single-operand sorts of one digit each; under ``vmap``
    that choice becomes a ``select``, so the radix passes then always run). Ties keep their
    index order, ``-0.0 == 0.0``, NaNs last, as ``jnp.argsort``. Other float widths go
    through float32 (an exact, order-preserving cast); an axis too long for 8-bit
    digits falls back to ``jnp.argsort``.
    """
    return _sorted_keys_and_order(x, axis)[1]


def sort_and_argsort(x: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """``(sorted x, order)`` along ``axis``: :func:`argsort_stable`'s ``order`` and the
    values ``take_along_axis(x, order)``, read back from the sorted integer keys instead
    of gathered a second time (``-0.0`` comes back as ``0.0`` and NaNs as the canonical
    NaN, as ``jnp.sort`` canonicalizes them)."""
    keys, order, ftype = _sorted_keys_and_order(x, axis)
    if keys is None:  # jnp.argsort's fallback
        return jnp.take_along_axis(x, order, axis=axis % x.ndim), order
    width = 8 * ftype.itemsize
    utype = jnp.uint32 if width == 32 else jnp.uint64
    sign = jnp.asarray(1 << (width - 1), utype)
    u = lax.bitcast_convert_type(keys, utype) ^ sign  # back to the unsigned order keys
    u = jnp.where(u & sign, u ^ sign, ~u)  # the inverse of _order_keys
    return lax.bitcast_convert_type(u, ftype).astype(x.dtype), order


def _sorted_keys_and_order(x: jax.Array, axis: int):
    """:func:`argsort_stable`'s work: ``(sorted signed keys, order, key float dtype)``, the
    keys ``None`` where ``jnp.argsort`` runs instead."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"argsort_stable: expected a floating array, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("argsort_stable: expected an array with at least one axis, got a scalar")
    axis = axis % x.ndim
    if x.dtype.itemsize not in (4, 8):
        x = x.astype(jnp.float32)
    n, width = x.shape[axis], 8 * x.dtype.itemsize
    bits = max(1, (n - 1).bit_length())
    if n <= 1 or width - 1 - bits < 8:  # more than 4 (float32) or 8 (float64) passes
        return None, jnp.argsort(x, axis=axis, stable=True), x.dtype
    itype = jnp.int32 if width == 32 else jnp.int64
    keys = _order_keys(x)
    # the unsigned keys' order as signed integers (flip the top bit)
    signed = lax.bitcast_convert_type(keys ^ jnp.asarray(1 << (width - 1), keys.dtype), itype)
    pos = lax.broadcasted_iota(itype, x.shape, axis)
    mask = jnp.asarray((1 << bits) - 1, itype)
    order = _sort_ints((signed & ~mask) | pos, axis) & mask
    take = functools.partial(jnp.take_along_axis, axis=axis, mode="promise_in_bounds")
    ks = take(signed, order)

    def inverted(ks):
        return jnp.any(lax.slice_in_dim(ks, 0, n - 1, axis=axis)
                       > lax.slice_in_dim(ks, 1, n, axis=axis))

    def cond(carry):
        return (carry[2] < _FIXUP_ROUNDS) & carry[3]

    def one_round(carry):
        ks, perm, rounds, _ = carry
        ks, perm = _transposition_phase(ks, perm, 0, axis)
        ks, perm = _transposition_phase(ks, perm, 1, axis)
        return ks, perm, rounds + 1, inverted(ks)

    # the inversion flag is carried, so each state is checked once
    ks, order, _, left = lax.while_loop(
        cond, one_round, (ks, order, jnp.zeros((), jnp.int32), inverted(ks)))

    def radix():
        perm = _radix_argsort(keys, itype, bits, width, axis)
        return take(signed, perm), perm

    ks, order = lax.cond(left, radix, lambda: (ks, order))
    return ks, order, x.dtype
