"""Losses built on random one-dimensional slices of the embeddings: SIGReg (LeJEPA,
LeWM) and VISReg.

lightly draws the slice directions from the global torch RNG inside ``forward`` (and, in
SIGReg's distributed mode, broadcasts them from rank 0). Here they come from an explicit
PRNG ``key`` or an explicit ``slices`` matrix (e.g. lightly's recorded ``torch.randn``
draws). A key gives the same draws on every device, so under ``axis_name`` every
participant uses the same slices without a broadcast, as lightly's rank-0 broadcast does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import ndtri

from sslloss_jax import _collectives as coll
from sslloss_jax import _validation as val
from sslloss_jax._collectives import match_vma
from sslloss_jax._numerics import (
    broadcast_leading,
    compute_dtype,
    l2_normalize,
    mean_leading,
    safe_sqrt,
    sort_and_argsort,
    unpermute,
    upcast,
)
from sslloss_jax._types import ArrayLike, AxisName

__all__ = ["sigreg", "lejepa_loss", "lewm_loss", "VISRegTerms", "visreg_terms", "visreg_loss"]

_HIGHEST = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- helpers
def _as_views(x: object, name: str) -> jax.Array:
    """``[V, N, D]`` from an array of rank 3 or a sequence of ``[N, D]`` views."""
    arr = val.stack_views(x, name, ndim=2)
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one view, got shape {arr.shape}")
    return arr


def unit_slices(key: jax.Array | None, slices: ArrayLike | None, dim: int, num: int,
                dtype, *, num_name: str) -> jax.Array:
    """The ``[dim, num]`` matrix of unit-norm slice directions (stop-gradient).

    ``slices`` (raw draws, e.g. lightly's recorded ``torch.randn(dim, num)``) are used
    as given; otherwise ``jax.random.normal(key, (dim, num), dtype)``. Either way every
    column is then divided by its norm, as lightly does. The same key gives the same
    matrix on every device.
    """
    if slices is not None:
        a = val.as_float_array(slices, "slices", ndim=2)
        if a.shape != (dim, num):
            raise ValueError(
                f"slices must have shape (D, {num_name}) = ({dim}, {num}), got {a.shape}"
            )
        a = a.astype(dtype)
    else:
        if key is None:
            raise ValueError(
                "key is required to draw the random slices; pass a PRNG key (the same on "
                "every device) or an explicit slices matrix"
            )
        val.check_key(key)
        a = jax.random.normal(key, (dim, num), dtype)
    return lax.stop_gradient(l2_normalize(a, axis=0))


def _check_sigreg_params(knots: object, t_max: ArrayLike, num: object, num_name: str):
    knots = val.check_int(knots, "knots", 2)
    num = val.check_int(num, num_name, 1)
    tm = val.concrete_scalar(t_max)
    if tm is None or not np.isfinite(tm) or tm <= 0:
        raise ValueError(f"t_max must be a finite Python number greater than zero, got {t_max!r}")
    return knots, float(tm), num


def _sigreg_grid(knots: int, t_max: float, dtype) -> tuple[float, jax.Array, jax.Array]:
    """The knot spacing ``dt`` of ``t = linspace(0, t_max, knots)``, ``phi = exp(-t²/2)``
    and the doubled trapezoid weights times ``phi`` (lightly's buffers), in ``dtype``."""
    t = np.linspace(0.0, t_max, knots)
    dt = t_max / (knots - 1)
    w = np.full((knots,), 2 * dt)
    w[[0, -1]] = dt
    phi = np.exp(-np.square(t) / 2.0)
    return dt, jnp.asarray(phi, dtype), jnp.asarray(w * phi, dtype)


def _angle_steps(x: jax.Array, step: float, knots: int, body, init, xs=None):
    """``lax.scan`` of ``body(carry, (c, s), x_k)`` over ``k = 1 … knots − 1`` with
    ``(c, s) = (cos(k·step·x), sin(k·step·x))`` from the angle-addition recurrence:
    ``c + i·s`` times ``e^{i·step·x}`` from one ``cos`` and one ``sin`` (the round-off
    grows by about one ulp a step). A scan, not an unrolled loop: XLA:CPU would write
    each knot's ``(c, s)`` out (2.7× slower at the SIGReg row's shape). The pair is one
    complex array: the step is one in-place elementwise product, where two real arrays
    (each new one reading both old ones) took two fusions and two copies a knot
    (LeJEPA row 74 → 34 ms, SIGReg 16 → 8.5 ms)."""
    rotation = lax.complex(jnp.cos(step * x), jnp.sin(step * x))

    def scan_body(carry, x_k):
        z, inner = carry
        z = z * rotation
        inner, out = body(inner, (jnp.real(z), jnp.imag(z)), x_k)
        return (z, inner), out

    (_, inner), out = lax.scan(scan_body, (jnp.ones_like(rotation), init), xs,
                               length=knots - 1)
    return inner, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _ecf_sums(x: jax.Array, step: float, knots: int) -> jax.Array:
    """``[2, ..., S, knots]``: ``Σ_n cos(t_k x_n)`` and ``Σ_n sin(t_k x_n)`` over axis -2 of
    ``x [..., n, S]`` at the uniform knots ``t_k = k·step``.

    XLA:CPU evaluates ``cos``/``sin`` of the broadcast ``[..., n, S, knots]`` products
    about 10× slower than this: one ``cos`` and one ``sin`` per element and the
    angle-addition recurrence for the other knots (:func:`_angle_steps`), each knot's
    sums reduced as it is reached. The backward pass runs the same recurrence,
    ``dx = Σ_k t_k (g_sin,k·cos(t_k x) − g_cos,k·sin(t_k x))``.
    """
    return _ecf_fwd(x, step, knots)[0]


def _ecf_fwd(x, step, knots):
    _, (cos_sums, sin_sums) = _angle_steps(
        x, step, knots, lambda inner, cs, _: (inner, (jnp.sum(cs[0], -2), jnp.sum(cs[1], -2))),
        None)
    count = jnp.full((1,) + cos_sums.shape[1:], x.shape[-2], x.dtype)  # k = 0: cos 0 = 1
    cos_sums = jnp.moveaxis(jnp.concatenate([count, cos_sums]), 0, -1)
    sin_sums = jnp.moveaxis(jnp.concatenate([jnp.zeros_like(count), sin_sums]), 0, -1)
    return jnp.stack([cos_sums, sin_sums]), x


def _ecf_bwd(step, knots, x, g):
    g_cos = jnp.moveaxis(g[0, ..., 1:], -1, 0)[..., None, :]  # [K-1, ..., 1, S]
    g_sin = jnp.moveaxis(g[1, ..., 1:], -1, 0)[..., None, :]
    t = jnp.arange(1, knots, dtype=x.dtype) * jnp.asarray(step, x.dtype)

    def accumulate(dx, cs, g_k):
        gc, gs, t_k = g_k
        return dx + t_k * (gs * cs[0] - gc * cs[1]), None

    dx, _ = _angle_steps(x, step, knots, accumulate, jnp.zeros_like(x), (g_cos, g_sin, t))
    return (dx,)


_ecf_sums.defvjp(_ecf_fwd, _ecf_bwd)


#: Elements of the recurrence's ``c + i·s`` array (4 MiB in complex64): the slices are
#: processed in chunks of this size, which stay in cache across the knots (2^18 and 2^19
#: tie at the LeJEPA row; 2^17 is 1.5× and 2^21 2× slower there).
_ECF_CHUNK_ELEMENTS = 2**19


def _ecf_sums_chunked(x: jax.Array, step: float, knots: int) -> jax.Array:
    """:func:`_ecf_sums` over chunks of the slice axis (``lax.map``) when ``x`` is larger
    than :data:`_ECF_CHUNK_ELEMENTS`: each knot reads and writes the recurrence's arrays,
    which then stay cache-resident (LeJEPA's 8 views × 256 × 1024 slices: 103 → 55 ms for
    these sums forward and backward)."""
    n_slices = x.shape[-1]
    target = max(1, _ECF_CHUNK_ELEMENTS // max(1, math.prod(x.shape[:-1])))
    chunk = max(d for d in range(1, min(target, n_slices) + 1) if n_slices % d == 0)
    if chunk == n_slices:
        return _ecf_sums(x, step, knots)
    xs = jnp.moveaxis(x.reshape(x.shape[:-1] + (n_slices // chunk, chunk)), -2, 0)
    out = lax.map(lambda xc: _ecf_sums(xc, step, knots), xs)  # [C, 2, ..., chunk, K]
    out = jnp.moveaxis(out, 0, -3)  # [2, ..., C, chunk, K]
    return out.reshape(out.shape[:-3] + (n_slices, knots))


def _sigreg_core(proj: jax.Array, a: jax.Array, knots: int, t_max: float,
                 axis_name: AxisName) -> jax.Array:
    """SIGReg of ``proj [..., n, D]`` (local rows of the global batch on axis -2)."""
    n_global = proj.shape[-2] * coll.axis_size(axis_name)
    dt, phi, weights = _sigreg_grid(knots, t_max, proj.dtype)
    x = jnp.matmul(proj, a, precision=_HIGHEST)  # [..., n, S]
    sums = coll.psum(_ecf_sums_chunked(x, dt, knots), axis_name)
    cos_mean, sin_mean = sums[0] / n_global, sums[1] / n_global  # [..., S, K]
    lead = (1,) * (cos_mean.ndim - 1)
    err = jnp.square(cos_mean - phi.reshape(lead + (knots,))) + jnp.square(sin_mean)
    statistic = jnp.sum(err * weights.reshape(lead + (knots,)), axis=-1) * n_global  # [..., S]
    return jnp.mean(statistic)


def _invariance(all_proj: jax.Array, global_proj: jax.Array, axis_name: AxisName):
    """LeJEPA's invariance: mean over (views, global batch, D) of (centroid − view)²."""
    v, n, d = all_proj.shape
    centers = broadcast_leading(mean_leading(global_proj), v)
    sq = jnp.sum(jnp.square(centers - all_proj))
    return coll.global_mean(sq, v * n * d, axis_name)


def _local_views_maybe_empty(local_proj: Any, glob: jax.Array) -> jax.Array:
    """VISReg's local views: as :func:`_as_views`, but zero views are allowed."""
    if isinstance(local_proj, (list, tuple)) and len(local_proj) == 0:
        return jnp.zeros((0, *glob.shape[1:]), glob.dtype)
    if not isinstance(local_proj, (list, tuple)) and np.shape(local_proj)[:1] == (0,):
        local = val.as_float_array(jnp.zeros((1, *np.shape(local_proj)[1:]),
                                             jnp.asarray(local_proj).dtype), "local_proj",
                                   ndim=3)[:0]
    else:
        local = val.stack_views(local_proj, "local_proj", ndim=2)
    if local.shape[1:] != glob.shape[1:]:
        raise ValueError(
            "global_proj and local_proj must have matching batch and feature dimensions "
            f"(N, D), got {glob.shape[1:]} and {local.shape[1:]} (shapes {glob.shape} and "
            f"{local.shape})"
        )
    return local


def _check_views(local_proj: object, global_proj: object):
    local = _as_views(local_proj, "local_proj")
    glob = _as_views(global_proj, "global_proj")
    if local.shape[1:] != glob.shape[1:]:
        raise ValueError(
            "global_proj and local_proj must have matching batch and feature dimensions "
            f"(N, D), got {glob.shape[1:]} and {local.shape[1:]} (shapes {glob.shape} and "
            f"{local.shape})"
        )
    return local, glob


# ----------------------------------------------------------------------------- SIGReg
def sigreg(
    proj: ArrayLike | Sequence[ArrayLike],
    key: jax.Array | None = None,
    *,
    knots: int = 17,
    t_max: float = 3.0,
    num_vectors: int = 1024,
    slices: ArrayLike | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""SIGReg (Sketched Isotropic Gaussian Regularization), the LeJEPA regularizer.

    With ``S = num_vectors`` random unit directions ``a_s`` (the columns of ``A``), the
    frequencies ``t_k = linspace(0, t_max, knots)`` and the (doubled) trapezoid weights
    ``w_k = [dt, 2dt, …, 2dt, dt]·e^{-t_k²/2}``, for each leading index (view) and slice

    .. math::
        \mathrm{stat}_s = N \sum_k w_k\Big[\big(\tfrac1N\textstyle\sum_n
            \cos(t_k\,x_n^\top a_s) - e^{-t_k^2/2}\big)^2
            + \big(\tfrac1N\textstyle\sum_n \sin(t_k\,x_n^\top a_s)\big)^2\Big],

    and the loss is the mean of ``stat`` over the slices and the leading (view) axes.
    The statistic is **multiplied by N** (the global batch), as lightly and the
    reference: it grows linearly with the batch size.

    Args:
      proj: ``[..., N, D]`` projections, the batch on axis -2 (e.g. ``[V, N, D]``: each
        view is its own sample set), or a sequence of ``[N, D]`` views.
      key: PRNG key of the slices, ``A = normalize(jax.random.normal(key, (D, S)))``.
        Use the same key on every device (lightly broadcasts ``A`` from rank 0). Not
        needed when ``slices`` is given.
      knots: number of frequencies (>= 2).
      t_max: largest frequency (> 0, a Python number: it shapes the static grid).
      num_vectors: number of slices ``S``.
      slices: optional ``[D, num_vectors]`` raw slice draws (e.g. lightly's recorded
        ``torch.randn``); each column is normalized. Overrides ``key``; must be
        replicated.
      axis_name: optional axis; the batch axis -2 is sharded. The cosine/sine sums are
        ``psum``-ed and ``N`` is the global count: the loss and its gradients are those of
        one device holding the global batch.

    Returns:
      Scalar SIGReg, in the compute dtype (>= float32).

    Raises:
      ValueError: rank < 2, an empty axis, ``knots < 2``, ``t_max <= 0``,
        ``num_vectors < 1``, bad ``slices`` or neither ``key`` nor ``slices``.
      TypeError: non-floating inputs, a bad key.

    Differences from lightly:

    - the slices come from ``key`` or ``slices``, not the global torch RNG, and are in
      the compute dtype (lightly: ``proj.dtype``, bf16 stays bf16);
    - the frequency grid and weights are computed in the compute dtype (lightly builds
      its buffers in float32 at construction);
    - computed in >= float32; views may be passed as a sequence.

    References:
      Balestriero and LeCun, `LeJEPA: Provable and Scalable Self-Supervised Learning
      Without the Heuristics <https://arxiv.org/abs/2511.08544>`_, 2025.
    """
    val.check_axis_name(axis_name)
    if isinstance(proj, (list, tuple)):
        p = _as_views(proj, "proj")
    else:
        p = val.as_float_array(proj, "proj", min_ndim=2)  # type: ignore[arg-type]
    knots, t_max_f, num_vectors = _check_sigreg_params(knots, t_max, num_vectors, "num_vectors")
    (p,) = upcast(p)
    a = unit_slices(key, slices, p.shape[-1], num_vectors, p.dtype, num_name="num_vectors")
    return _sigreg_core(p, a, knots, t_max_f, axis_name)


# ----------------------------------------------------------------------------- LeJEPA
def lejepa_loss(
    local_proj: ArrayLike | Sequence[ArrayLike],
    global_proj: ArrayLike | Sequence[ArrayLike],
    key: jax.Array | None = None,
    *,
    lambda_param: ArrayLike = 0.05,
    sigreg_knots: int = 17,
    sigreg_t_max: float = 3.0,
    sigreg_num_vectors: int = 1024,
    slices: ArrayLike | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""LeJEPA loss: SIGReg of all views plus the invariance to the global centroid.

    With ``all = concat[global_proj, local_proj]`` on the view axis and the centroid
    ``c = mean_g global_proj`` (``[N, D]``, gradients flow into it),

    .. math::
        L = \lambda\,\mathrm{SIGReg}(\text{all})
            + (1 - \lambda)\,\frac{1}{V N D}\sum_{v,n,d}(c_{nd} - \text{all}_{vnd})^2 .

    Args:
      local_proj: ``[V_l >= 1, N, D]`` local-view projections (or a sequence of
        ``[N, D]``).
      global_proj: ``[V_g >= 1, N, D]`` global-view projections (or a sequence).
      key: PRNG key of SIGReg's slices (see :func:`sigreg`); the same on every device.
      lambda_param: weight of SIGReg in [0, 1] (may be traced).
      sigreg_knots, sigreg_t_max, sigreg_num_vectors: SIGReg's ``knots``, ``t_max`` and
        ``num_vectors``.
      slices: optional explicit ``[D, sigreg_num_vectors]`` slice draws (see
        :func:`sigreg`).
      axis_name: optional axis; the batch axis (axis 1) is sharded. Both terms are over
        the global batch.

    Returns:
      Scalar loss in the compute dtype.

    Raises:
      ValueError: wrong ranks, mismatched batch/feature dimensions, no local or no
        global view, ``lambda_param`` outside [0, 1], bad SIGReg parameters or slices.
      TypeError: non-floating inputs, a bad key.

    Differences from lightly:

    - the projections are positional (lightly: keyword-only), views may be sequences;
    - slices from ``key``/``slices`` (see :func:`sigreg`);
    - under ``axis_name`` the invariance term is also over the global batch (lightly's is
      per rank).

    References:
      Balestriero and LeCun, `LeJEPA <https://arxiv.org/abs/2511.08544>`_, 2025.
    """
    val.check_axis_name(axis_name)
    val.check_in_range(lambda_param, "lambda_param", 0.0, 1.0)
    local, glob = _check_views(local_proj, global_proj)
    knots, t_max_f, num = _check_sigreg_params(sigreg_knots, sigreg_t_max, sigreg_num_vectors,
                                               "sigreg_num_vectors")
    local, glob = upcast(local, glob)
    all_proj = jnp.concatenate([glob, local], axis=0)
    a = unit_slices(key, slices, all_proj.shape[-1], num, all_proj.dtype,
                    num_name="sigreg_num_vectors")
    reg = _sigreg_core(all_proj, a, knots, t_max_f, axis_name)
    inv = _invariance(all_proj, glob, axis_name)
    lam = jnp.asarray(lambda_param).astype(all_proj.dtype)
    return lam * reg + (1 - lam) * inv


# ----------------------------------------------------------------------------- LeWM
def _layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """``torch.nn.functional.layer_norm`` over the last axis, no affine (biased var)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps)


def lewm_loss(
    predicted: ArrayLike,
    target: ArrayLike,
    embeddings: ArrayLike,
    key: jax.Array | None = None,
    *,
    lambda_param: ArrayLike = 0.1,
    normalize: bool = False,
    sigreg_knots: int = 17,
    sigreg_t_max: float = 3.0,
    sigreg_num_vectors: int = 1024,
    slices: ArrayLike | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""LeWM (LeWorldModel) loss: next-embedding prediction plus SIGReg.

    .. math::
        L = \frac{1}{B T' D}\sum (\hat z - \mathrm{sg}(z))^2
            + \lambda\,\mathrm{SIGReg}(\text{embeddings}^{\top_{0,1}}),

    where SIGReg (see :func:`sigreg`) treats each time step of ``embeddings [B, T, D]``
    as its own sample set over the batch (lightly moves the batch to axis -2). With
    ``normalize``, both ``predicted`` and ``target`` are layer-normalized (eps 1e-5, no
    affine) before the squared error.

    Args:
      predicted: ``[B, T', D]`` predicted next-frame embeddings.
      target: ``[B, T', D]`` observed next-frame embeddings (stop-gradient).
      embeddings: ``[B, T, D]`` all frame embeddings, batch first.
      key: PRNG key of SIGReg's slices; the same on every device.
      lambda_param: SIGReg weight >= 0 (may be traced).
      normalize: static; layer-normalize inside the prediction loss.
      sigreg_knots, sigreg_t_max, sigreg_num_vectors, slices: see :func:`sigreg`.
      axis_name: optional axis; the batch (axis 0 of every input) is sharded; the
        prediction mean and SIGReg are over the global batch.

    Returns:
      Scalar loss in the compute dtype.

    Raises:
      ValueError: ranks other than 3, ``predicted``/``target`` of different shapes,
        ``embeddings`` with another batch size or feature dimension, a negative
        ``lambda_param``, bad SIGReg parameters or slices.
      TypeError: non-floating inputs, a bad key.

    Differences from lightly:

    - arrays positional (lightly: keyword-only); slices from ``key``/``slices``;
    - under ``axis_name`` the prediction term is over the global batch too;
    - computed in >= float32.

    References:
      `LeWorldModel <https://arxiv.org/abs/2603.19312>`_, 2026.
    """
    val.check_axis_name(axis_name)
    val.check_in_range(lambda_param, "lambda_param", 0.0, None)
    emb = val.as_float_array(embeddings, "embeddings", ndim=3)
    pred = val.as_float_array(predicted, "predicted", ndim=3)
    tgt = val.as_float_array(target, "target", ndim=3)
    val.check_same_shape(pred, tgt, "predicted", "target")
    if emb.shape[0] != pred.shape[0] or emb.shape[-1] != pred.shape[-1]:
        raise ValueError(
            "embeddings must share the batch size and embedding dimension of predicted, "
            f"got {emb.shape} and {pred.shape}"
        )
    knots, t_max_f, num = _check_sigreg_params(sigreg_knots, sigreg_t_max, sigreg_num_vectors,
                                               "sigreg_num_vectors")
    pred, tgt, emb = upcast(pred, tgt, emb)
    tgt = lax.stop_gradient(tgt)
    if normalize:
        pred, tgt = _layer_norm(pred), _layer_norm(tgt)
    prediction = coll.global_mean(jnp.sum(jnp.square(pred - tgt)), pred.size, axis_name)
    a = unit_slices(key, slices, emb.shape[-1], num, emb.dtype, num_name="sigreg_num_vectors")
    reg = _sigreg_core(jnp.swapaxes(emb, 0, 1), a, knots, t_max_f, axis_name)
    return prediction + jnp.asarray(lambda_param).astype(emb.dtype) * reg


# ----------------------------------------------------------------------------- VISReg
class VISRegTerms(NamedTuple):
    """The parts of the VISReg loss (lightly's ``VISRegLossComponents``).

    Attributes:
      total: ``(1 − λ)·pred + λ·(λ_scale·scale + λ_shape·shape + λ_center·center)``.
      pred: the multi-view invariance (LeJEPA's) term.
      scale: unweighted scale term, mean over (views, D) of ``(1 − std)²``.
      shape: unweighted sliced-Wasserstein shape term.
      center: unweighted center term, mean over (views, D) of ``mean_n(z)²``.
    """

    total: jax.Array
    pred: jax.Array
    scale: jax.Array
    shape: jax.Array
    center: jax.Array


#: bytes of one chunk of VISReg's sorted projections ``[V, N, slices]``: the slices are
#: taken in chunks this size, so that XLA:CPU's temporaries (about 12 chunks: the sorting
#: network's keys and indices with their copies) stay under the ~31 MiB past which glibc
#: maps them afresh and every page faults on every call. 2+6 crops of 256 × 128:
#: 28 MiB and 81 ms with 2 MiB chunks, 50 MiB (12,000 faults per call) and 103 ms with
#: 4 MiB, 17 MiB and 83 ms with 1 MiB.
_SLICE_CHUNK_BYTES = 2 << 20


def split_slices(a: jax.Array, views: int, batch: int, dtype: jax.typing.DTypeLike
                 ) -> tuple[jax.Array | None, jax.Array | None]:
    """The slices ``a [D, S]`` in chunks of :data:`_SLICE_CHUNK_BYTES` of ``[views, batch]``
    projections (a multiple of 8 slices): ``(chunks [full, D, size], rest [D, S − full·size])``,
    either None when empty (all of ``a`` is the rest when it fits in one chunk). Shared by
    VISReg's shape term and the benchmark's floor of it."""
    size = max(8, _SLICE_CHUNK_BYTES // (views * batch * jnp.dtype(dtype).itemsize) // 8 * 8)
    num = a.shape[1]
    full = num // size if num > size else 0
    chunks = (a[:, : full * size].reshape(a.shape[0], full, size).transpose(1, 0, 2)
              if full else None)
    return chunks, (a[:, full * size:] if full * size < num else None)


def _sorted_chunk(z: jax.Array, a: jax.Array, quantiles: jax.Array, with_grad: bool):
    """One chunk of slices ``a [D, S_c]``: the sum of ``(sorted(z_v a_s) − q)²`` over
    views, slices and ranks, and (``with_grad``) its gradient in ``z``."""
    p = jnp.einsum("vnd,ds->vns", z, a, precision=_HIGHEST)  # sorted along n, lanes s
    p_sorted, order = sort_and_argsort(p, axis=1)
    r = p_sorted - quantiles[None, :, None]
    sse = jnp.sum(jnp.square(r))
    if not with_grad:
        return sse, None
    return sse, jnp.einsum("vns,ds->vnd", unpermute(2.0 * r, order, axis=1), a,
                           precision=_HIGHEST)


def _sorted_slices(z: jax.Array, a: jax.Array, quantiles: jax.Array, with_grad: bool):
    """:func:`_sorted_chunk` summed over chunks of :data:`_SLICE_CHUNK_BYTES` (a scan over
    the full chunks, then the rest)."""
    chunks, rest = split_slices(a, z.shape[0], z.shape[1], z.dtype)
    sse = jnp.zeros((), z.dtype)
    dz = jnp.zeros_like(z) if with_grad else None
    if chunks is not None:

        def body(carry, a_c):
            c_sse, c_dz = _sorted_chunk(z, a_c, quantiles, with_grad)
            return (carry[0] + c_sse, None if c_dz is None else carry[1] + c_dz), None

        (sse, dz), _ = lax.scan(body, (sse, dz), chunks)
    if rest is not None:
        c_sse, c_dz = _sorted_chunk(z, rest, quantiles, with_grad)
        sse = sse + c_sse
        dz = None if c_dz is None else dz + c_dz
    return sse, dz


@jax.custom_vjp
def _sorted_slice_sse(z: jax.Array, a: jax.Array, quantiles: jax.Array) -> jax.Array:
    r"""``Σ_{v, s, i} (sort(z_v a_s)_i − q_i)²``: ``z [V, N, D]``, unit slices ``a [D, S]``,
    quantiles ``q [N]``; ``a`` and ``q`` get no gradient.

    The projections are made, sorted and reduced per chunk of slices (the ``[V, S, N]``
    array is never whole), and the gradient in ``z``, ``Σ_s unsort(2 r_s) a_sᵀ``, is
    accumulated in the same pass: the residual is ``[V, N, D]`` instead of every slice's
    sort order. Under plain evaluation only the sum is computed.
    """
    return _sorted_slices(z, a, quantiles, False)[0]


def _sorted_slice_sse_fwd(z, a, quantiles):
    sse, dz = _sorted_slices(z, a, quantiles, True)
    return sse, (z, dz, a, quantiles)


def _sorted_slice_sse_bwd(res, g):
    z, dz, a, quantiles = res
    return match_vma(g * dz, z), jnp.zeros_like(a), jnp.zeros_like(quantiles)


_sorted_slice_sse.defvjp(_sorted_slice_sse_fwd, _sorted_slice_sse_bwd)


def visreg_terms(
    local_proj: ArrayLike | Sequence[ArrayLike],
    global_proj: ArrayLike | Sequence[ArrayLike],
    key: jax.Array | None = None,
    *,
    lambda_param: ArrayLike = 0.9,
    num_slices: int = 4096,
    lambda_scale: ArrayLike = 1.0,
    lambda_shape: ArrayLike = 1.0,
    lambda_center: ArrayLike = 1.0,
    eps: ArrayLike = 1e-4,
    slices: ArrayLike | None = None,
    axis_name: AxisName = None,
) -> VISRegTerms:
    r"""The VISReg loss and its parts (lightly's ``VISRegLoss.forward_components``).

    With ``z = concat[global_proj, local_proj]`` (``[V, N, D]``; statistics over the batch
    axis, separately per view), the biased standard deviation ``σ`` and mean ``μ``:

    - ``pred`` = LeJEPA's invariance (see :func:`lejepa_loss`);
    - ``scale`` = mean over (V, D) of ``(1 − σ)²``;
    - ``shape``: ``ẑ = (z − μ) / (sg(σ) + eps)``, projected on ``num_slices`` random unit
      directions and sorted along the batch; the mean of ``(sorted − q_i)²`` with the
      Gaussian quantiles ``q_i = Φ⁻¹(i/(N+1))``, ``i = 1..N`` (the closed-form 1-D
      2-Wasserstein distance);
    - ``center`` = mean over (V, D) of ``μ²``;

    and ``total = (1 − λ)·pred + λ·(λ_scale·scale + λ_shape·shape + λ_center·center)``.

    Args:
      local_proj: ``[V_l, N, D]`` local views (``V_l = 0`` is allowed, as in lightly) or a
        sequence of ``[N, D]``.
      global_proj: ``[V_g >= 1, N, D]`` global views or a sequence.
      key: PRNG key of the slices, ``normalize(jax.random.normal(key, (D, num_slices)))``;
        the same on every device.
      lambda_param: regularization weight in [0, 1] (may be traced).
      num_slices: number of slices.
      lambda_scale, lambda_shape, lambda_center: non-negative weights (may be traced).
      eps: > 0, added to the (stop-gradient) std of the shape normalization.
      slices: optional ``[D, num_slices]`` raw slice draws (lightly's recorded
        ``torch.randn``), normalized per column; overrides ``key``; must be replicated.
      axis_name: optional axis; the batch axis (axis 1) is sharded. The views are
        gathered into the global batch (a differentiable ``psum`` of zero-padded blocks)
        and every term, the sort included, is computed on it: the loss and gradients of
        one device holding the global batch.

    Returns:
      :class:`VISRegTerms` of scalars in the compute dtype.

    Raises:
      ValueError: wrong ranks or shapes, no global view, a (global) batch < 2, weights out
        of range, ``eps <= 0``, ``num_slices < 1``, bad ``slices`` or no ``key``.
      TypeError: non-floating inputs, a bad key.

    Differences from lightly:

    - the slices come from ``key``/``slices`` (lightly: fresh ``torch.randn`` per call and,
      by default, per rank); the quantiles are computed in the compute dtype (lightly:
      float32, then cast);
    - the standard deviation is a safe square root: its gradient is finite (0) at exactly
      zero variance, as torch's ``std`` backward, where ``jnp.std`` gives NaN;
    - under ``axis_name`` every term is on the global batch (lightly: ``pred`` per rank,
      the regularizers gathered only with ``gather_distributed=True``);
    - a global view is required (lightly gives a NaN centroid without one);
    - arrays positional (lightly: keyword-only); computed in >= float32.

    References:
      Wu et al., `VISReg <https://arxiv.org/abs/2606.02572>`_, 2026.
    """
    val.check_axis_name(axis_name)
    val.check_in_range(lambda_param, "lambda_param", 0.0, 1.0)
    for name, w in (("lambda_scale", lambda_scale), ("lambda_shape", lambda_shape),
                    ("lambda_center", lambda_center)):
        val.check_in_range(w, name, 0.0, None)
    val.check_in_range(eps, "eps", 0.0, None, low_inclusive=False)
    num_slices = val.check_int(num_slices, "num_slices", 1)
    glob = _as_views(global_proj, "global_proj")
    local = _local_views_maybe_empty(local_proj, glob)
    n_global = glob.shape[1] * coll.axis_size(axis_name)
    val.check_min_batch(n_global, 2, "VISReg (standard deviation over the batch)", glob.shape)
    dtype = compute_dtype(local, glob)
    local, glob = local.astype(dtype), glob.astype(dtype)
    z = coll.psum_gather(jnp.concatenate([glob, local], axis=0), axis_name, axis=1)  # [V, N, D]
    pred = _invariance(z, z[: glob.shape[0]], None)

    mean = jnp.mean(z, axis=-2, keepdims=True)
    std = safe_sqrt(jnp.mean(jnp.square(z - mean), axis=-2, keepdims=True))
    scale = jnp.mean(jnp.square(1.0 - std))
    center = jnp.mean(jnp.square(mean))

    e = jnp.asarray(eps).astype(dtype)
    z_norm = (z - mean) / (lax.stop_gradient(std) + e)
    a = unit_slices(key, slices, z.shape[-1], num_slices, dtype, num_name="num_slices")
    positions = np.arange(1, n_global + 1, dtype=np.float64) / (n_global + 1)
    quantiles = ndtri(jnp.asarray(positions, dtype))
    shape = _sorted_slice_sse(z_norm, a, quantiles) / (z.shape[0] * num_slices * n_global)

    cast = lambda v: jnp.asarray(v).astype(dtype)  # noqa: E731
    lam = cast(lambda_param)
    reg = (cast(lambda_scale) * scale + cast(lambda_shape) * shape
           + cast(lambda_center) * center)
    total = (1 - lam) * pred + lam * reg
    return VISRegTerms(total, pred, scale, shape, center)


def visreg_loss(
    local_proj: ArrayLike | Sequence[ArrayLike],
    global_proj: ArrayLike | Sequence[ArrayLike],
    key: jax.Array | None = None,
    *,
    lambda_param: ArrayLike = 0.9,
    num_slices: int = 4096,
    lambda_scale: ArrayLike = 1.0,
    lambda_shape: ArrayLike = 1.0,
    lambda_center: ArrayLike = 1.0,
    eps: ArrayLike = 1e-4,
    slices: ArrayLike | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    """The VISReg loss: ``visreg_terms(...).total`` (see :func:`visreg_terms` for the
    math, the arguments and the differences from lightly's ``VISRegLoss``).

    References:
      Wu et al., `VISReg <https://arxiv.org/abs/2606.02572>`_, 2026.
    """
    return visreg_terms(
        local_proj, global_proj, key, lambda_param=lambda_param, num_slices=num_slices,
        lambda_scale=lambda_scale, lambda_shape=lambda_shape, lambda_center=lambda_center,
        eps=eps, slices=slices, axis_name=axis_name,
    ).total
