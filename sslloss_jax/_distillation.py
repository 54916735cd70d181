"""Self-distillation losses with a teacher center: DINO (and its temperature schedule),
iBOT and iBOT++ patch losses."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sslloss_jax import _collectives as coll
from sslloss_jax import _validation as val
from sslloss_jax._numerics import (
    cross_view_entropy,
    soft_cross_entropy,
    softmax_rows,
    sum_leading,
    upcast,
)
from sslloss_jax._types import ArrayLike, AxisName

__all__ = [
    "IBOTState",
    "init_ibot_state",
    "ibot_patch_loss",
    "ibot_plus_plus_patch_loss",
    "DINOState",
    "init_dino_state",
    "dino_loss",
    "dino_teacher_temperature",
    "update_center",
]


class DINOState(NamedTuple):
    """State of the DINO loss.

    Attributes:
      center: ``[output_dim]`` EMA of the teacher outputs, subtracted before the teacher
        softmax (lightly's ``center`` buffer of shape (1, 1, K), here flat).
    """

    center: jax.Array


def init_dino_state(output_dim: int, dtype: jnp.dtype = jnp.float32) -> DINOState:
    """A zero center of dimension ``output_dim`` (lightly's initial buffer)."""
    val.check_state_spec(dtype, output_dim=output_dim)
    return DINOState(jnp.zeros((output_dim,), dtype))


def dino_teacher_temperature(
    epoch: ArrayLike | None,
    *,
    warmup_teacher_temp: ArrayLike = 0.04,
    teacher_temp: ArrayLike = 0.04,
    warmup_teacher_temp_epochs: int = 30,
) -> jax.Array:
    """lightly's DINO teacher-temperature schedule (may be traced: no retrace per step).

    ``linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)[epoch]``
    during the warm-up, ``teacher_temp`` afterwards; ``epoch=None`` gives the final value
    (nidl). The endpoint is reached at ``epoch = warmup_teacher_temp_epochs − 1``, as
    ``torch.linspace``. ``epoch`` may be fractional (a per-step schedule). quadra's
    ``DinoDistillationLoss`` uses ``teacher_temp=0.07`` by default.

    Returns:
      A float32 scalar (float64 under x64 with float64 arguments).
    """
    if not isinstance(warmup_teacher_temp_epochs, int) or warmup_teacher_temp_epochs < 0:
        raise ValueError(
            f"warmup_teacher_temp_epochs must be a non-negative int, "
            f"got {warmup_teacher_temp_epochs!r}"
        )
    start = val.check_scalar_param(warmup_teacher_temp, "warmup_teacher_temp")
    end = val.check_scalar_param(teacher_temp, "teacher_temp")
    dtype = jnp.result_type(float)
    start, end = start.astype(dtype), end.astype(dtype)
    if epoch is None or warmup_teacher_temp_epochs == 0:
        return end
    e = val.check_scalar_param(epoch, "epoch").astype(dtype)
    span = max(warmup_teacher_temp_epochs - 1, 1)
    ramp = start + (end - start) * jnp.clip(e, 0, span) / span
    return jnp.where(e < warmup_teacher_temp_epochs, ramp, end)


def update_center(
    center: jax.Array,
    teacher_out: jax.Array,
    momentum: ArrayLike,
    axis_name: AxisName = None,
    where: jax.Array | None = None,
) -> jax.Array:
    """``m·center + (1 − m)·mean(teacher_out)`` over every axis but the last (stop-gradient).

    Under ``axis_name`` the mean is over the global batch (lightly all-reduces it too).
    ``where`` (the leading axes of ``teacher_out``) restricts the mean to some tokens; if
    no token is selected anywhere, the center is returned unchanged. Shared by DINO and
    the iBOT losses.
    """
    (x,) = upcast(lax.stop_gradient(teacher_out))
    x = x.reshape(-1, x.shape[-1])
    m = jnp.asarray(momentum)
    if where is None:
        batch_mean = coll.global_mean(sum_leading(x), x.shape[0], axis_name)
        return (m * center + (1 - m) * batch_mean.astype(center.dtype)).astype(center.dtype)
    w = where.reshape(-1).astype(x.dtype)
    stats = coll.psum(jnp.concatenate([w @ x, jnp.sum(w)[None]]), axis_name)
    count = stats[-1]
    batch_mean = stats[:-1] / jnp.maximum(count, 1.0)
    updated = (m * center + (1 - m) * batch_mean.astype(center.dtype)).astype(center.dtype)
    return jnp.where(count > 0, updated, center)


def dino_loss(
    teacher_out: Sequence[ArrayLike] | ArrayLike,
    student_out: Sequence[ArrayLike] | ArrayLike,
    state: DINOState,
    *,
    teacher_temp: ArrayLike = 0.04,
    student_temp: ArrayLike = 0.1,
    center_momentum: ArrayLike = 0.9,
    axis_name: AxisName = None,
) -> tuple[jax.Array, DINOState]:
    r"""DINO self-distillation cross entropy with a centered, sharpened teacher.

    .. math::
        L = \frac{1}{n_\text{terms} N}\sum_{t}\sum_{s \ne t}\sum_{n}
            -\operatorname{softmax}\!\Big(\frac{T_{t,n} - c}{\tau_t}\Big)
             \cdot \log\operatorname{softmax}\!\Big(\frac{S_{s,n}}{\tau_s}\Big)

    over all pairs of a teacher view t and a student view s except same-index pairs,
    ``n_terms = V_t·V_s − min(V_t, V_s)``.

    The teacher is stop-gradient (lightly does not detach it; with a momentum teacher the
    result is the same, with a shared teacher it is not). The center ``c`` of ``state`` is
    used for this call and **updated after** it from the raw teacher outputs:
    ``c ← m·c + (1 − m)·mean_{views, batch}(teacher_out)``.

    Args:
      teacher_out: the teacher's outputs: a sequence of ``[batch, K]`` arrays (lightly) or a
        stacked ``[V_t, batch, K]`` array (nidl). Global crops only, as in DINO.
      student_out: the student's outputs, ``V_s`` views of ``[batch, K]``, in the same view
        order (the first ``V_t`` student views are the teacher's crops).
      state: :class:`DINOState` from :func:`init_dino_state` (``K`` features).
      teacher_temp: τ_t (may be traced; see :func:`dino_teacher_temperature` for the
        warm-up schedule).
      student_temp: τ_s.
      center_momentum: m in [0, 1] (may be traced).
      axis_name: optional axis; the loss is the global-batch mean and the center's batch
        mean is global, so the new state is identical on every device.

    Returns:
      ``(loss, new_state)``.

    References:
      Caron et al., `Emerging Properties in Self-Supervised Vision Transformers
      <https://arxiv.org/abs/2104.14294>`_, 2021.
    """
    val.check_axis_name(axis_name)
    val.check_temperature(teacher_temp, "teacher_temp")
    val.check_temperature(student_temp, "student_temp")
    val.check_in_range(center_momentum, "center_momentum", 0.0, 1.0)
    # views given as sequences stay blocks (see val.view_blocks): the student's are never
    # concatenated, the teacher's only inside the (fused) softmax
    t_blocks = val.view_blocks(teacher_out, "teacher_out")
    s_blocks = val.view_blocks(student_out, "student_out")
    for name, blocks in (("teacher_out", t_blocks), ("student_out", s_blocks)):
        if not blocks:
            raise ValueError(f"{name} must hold at least one view, got an empty sequence")
    shape = t_blocks[0].shape[1:]
    if shape != s_blocks[0].shape[1:]:
        raise ValueError(
            "teacher_out and student_out views must have the same (batch, K) shape, got "
            f"{shape} and {s_blocks[0].shape[1:]}"
        )
    if not isinstance(state, DINOState):
        raise TypeError(f"state must be a DINOState (see init_dino_state), got {type(state)}")
    if jnp.shape(state.center) != (shape[-1],):
        raise ValueError(
            f"state.center must have shape ({shape[-1]},) to match K, "
            f"got {jnp.shape(state.center)}"
        )
    vt, vs = (sum(x.shape[0] for x in blocks) for blocks in (t_blocks, s_blocks))
    n_terms = vt * vs - min(vt, vs)
    if n_terms == 0:
        raise ValueError(
            "dino_loss needs at least two views in total (same-index teacher/student pairs "
            f"are skipped), got {vt} teacher and {vs} student view(s)"
        )
    *blocks32, center = upcast(*t_blocks, *s_blocks, jnp.asarray(state.center))
    t32 = lax.stop_gradient(val.concat_views(tuple(blocks32[:len(t_blocks)])))
    t_probs = softmax_rows(t32, teacher_temp, center)
    s32 = tuple(blocks32[len(t_blocks):])
    cross = cross_view_entropy(s32, t_probs, student_temp)  # summed over the pairs
    loss = coll.global_mean(cross, n_terms * shape[0], axis_name)
    new_center = update_center(jnp.asarray(state.center), t32, center_momentum, axis_name)
    return loss, DINOState(new_center)


class IBOTState(NamedTuple):
    """State of the iBOT / iBOT++ patch losses: the ``[output_dim]`` teacher center."""

    center: jax.Array


def init_ibot_state(output_dim: int, dtype: jnp.dtype = jnp.float32) -> IBOTState:
    """A zero center (lightly's ``Center`` buffer)."""
    return IBOTState(init_dino_state(output_dim, dtype).center)


def _patch_inputs(teacher_out, student_out, mask, state, mask_required: bool):
    t = val.as_float_array(teacher_out, "teacher_out", ndim=3)
    s = val.as_float_array(student_out, "student_out", ndim=3)
    val.check_same_shape(t, s, "teacher_out", "student_out")
    b, n, k = t.shape
    if not isinstance(state, IBOTState):
        raise TypeError(f"state must be an IBOTState (see init_ibot_state), got {type(state)}")
    if jnp.shape(state.center) != (k,):
        raise ValueError(f"state.center must have shape ({k},), got {jnp.shape(state.center)}")
    if mask is None:
        if mask_required:
            raise ValueError("mask is required")
        return t, s, None
    m = jnp.asarray(mask)
    if m.dtype != jnp.bool_:
        raise TypeError(f"mask must be boolean, got {m.dtype}")
    if m.shape[:1] != (b,) or math.prod(m.shape[1:]) != n or m.ndim not in (2, 3):
        raise ValueError(
            f"mask must have shape (B, N) or (B, H, W) with H·W = N for outputs of shape "
            f"{t.shape}, got {m.shape}")
    return t, s, m.reshape(b, n)


def _patch_cross_entropy(t, s, center, teacher_temp, student_temp):
    """Per-token CE between the centered, sharpened (stop-gradient) teacher and the student."""
    t32, s32, c = upcast(t, s, center)
    probs = softmax_rows(lax.stop_gradient(t32), teacher_temp, lax.stop_gradient(c))
    return soft_cross_entropy(s32, probs, student_temp)


def _check_patch_hyper(teacher_temp, student_temp, center_momentum, axis_name):
    val.check_axis_name(axis_name)
    val.check_temperature(teacher_temp, "teacher_temp")
    val.check_temperature(student_temp, "student_temp")
    val.check_in_range(center_momentum, "center_momentum", 0.0, 1.0)


def ibot_patch_loss(
    teacher_out: ArrayLike,
    student_out: ArrayLike,
    mask: ArrayLike,
    state: IBOTState,
    *,
    teacher_temp: ArrayLike = 0.04,
    student_temp: ArrayLike = 0.1,
    center_momentum: ArrayLike = 0.9,
    axis_name: AxisName = None,
) -> tuple[jax.Array, IBOTState]:
    r"""iBOT masked-patch loss (as in DINOv2 and lightly's ``IBOTPatchLoss``).

    .. math:: L = \frac1B\sum_b \frac{1}{\max(n_b, 1)}\sum_{i\,\in\,\mathrm{masked}(b)}
              -\operatorname{softmax}\!\Big(\frac{T_{b,i}-c}{\tau_t}\Big)\cdot
               \log\operatorname{softmax}\!\Big(\frac{S_{b,i}}{\tau_s}\Big)

    lightly gathers the masked tokens into a data-dependent ``(M, K)`` array; here the
    outputs keep their fixed ``[B, N, K]`` shape and a boolean mask selects the tokens,
    with exactly lightly's per-image normalization (images without masked tokens count in
    B). The center is used, then updated from the **masked** teacher tokens only
    (unchanged if no token is masked anywhere; lightly would produce NaN).

    Args:
      teacher_out, student_out: ``[B, N, K]`` patch outputs (teacher stop-gradient).
      mask: ``[B, N]`` or ``[B, H, W]`` boolean, True = masked.
      state: :class:`IBOTState`.
      teacher_temp, student_temp, center_momentum: as :func:`dino_loss`.
      axis_name: optional axis: global mean over images, global center statistics.

    Returns:
      ``(loss, new_state)``.

    References:
      Zhou et al., `iBOT: Image BERT Pre-Training with Online Tokenizer
      <https://arxiv.org/abs/2111.07832>`_, 2022.
    """
    _check_patch_hyper(teacher_temp, student_temp, center_momentum, axis_name)
    t, s, m = _patch_inputs(teacher_out, student_out, mask, state, mask_required=True)
    center = jnp.asarray(state.center)
    ce = _patch_cross_entropy(t, s, center, teacher_temp, student_temp)  # (B, N)
    mf = m.astype(ce.dtype)
    per_image = jnp.sum(ce * mf, axis=1) / jnp.maximum(jnp.sum(mf, axis=1), 1.0)
    loss = coll.global_mean(jnp.sum(per_image), t.shape[0], axis_name)
    return loss, IBOTState(update_center(center, t, center_momentum, axis_name, where=m))


def ibot_plus_plus_patch_loss(
    teacher_out: ArrayLike,
    student_out: ArrayLike,
    state: IBOTState,
    mask: ArrayLike | None = None,
    *,
    teacher_temp: ArrayLike = 0.04,
    student_temp: ArrayLike = 0.1,
    center_momentum: ArrayLike = 0.9,
    visible_loss_weight: ArrayLike = 1.0,
    axis_name: AxisName = None,
) -> tuple[jax.Array, IBOTState]:
    r"""iBOT++ patch loss (TIPSv2): masked and visible tokens, each normalized per image.

    Without a mask: the mean CE over all tokens. With a mask:
    :math:`\operatorname{mean}_b(\mathrm{masked}_b + w\cdot\mathrm{visible}_b)`, each a
    per-image mean with its count clamped to >= 1 (lightly's ``IBOTPlusPlusPatchLoss``).
    The center is updated from **all** teacher tokens.

    Args:
      teacher_out, student_out: ``[B, N, K]``.
      state: :class:`IBOTState`.
      mask: optional ``[B, N]`` / ``[B, H, W]`` boolean.
      visible_loss_weight: w (may be traced); 0 recovers the masked-only iBOT term.
      teacher_temp, student_temp, center_momentum, axis_name: as :func:`ibot_patch_loss`.
    """
    _check_patch_hyper(teacher_temp, student_temp, center_momentum, axis_name)
    t, s, m = _patch_inputs(teacher_out, student_out, mask, state, mask_required=False)
    center = jnp.asarray(state.center)
    ce = _patch_cross_entropy(t, s, center, teacher_temp, student_temp)
    b, n = ce.shape
    if m is None:
        loss = coll.global_mean(jnp.sum(ce), b * n, axis_name)
    else:
        mf = m.astype(ce.dtype)
        masked = jnp.sum(ce * mf, axis=1) / jnp.maximum(jnp.sum(mf, axis=1), 1.0)
        visible = jnp.sum(ce * (1 - mf), axis=1) / jnp.maximum(jnp.sum(1 - mf, axis=1), 1.0)
        loss = coll.global_mean(jnp.sum(masked + visible_loss_weight * visible), b, axis_name)
    return loss, IBOTState(update_center(center, t, center_momentum, axis_name))
