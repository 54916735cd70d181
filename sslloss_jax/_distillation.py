"""Self-distillation losses with a teacher center: DINO (and its temperature schedule)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sslloss_jax import _collectives as coll
from sslloss_jax import _validation as val
from sslloss_jax._numerics import upcast
from sslloss_jax._types import ArrayLike, AxisName

__all__ = [
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
    if not isinstance(output_dim, int) or isinstance(output_dim, bool) or output_dim < 1:
        raise ValueError(f"output_dim must be a positive int, got {output_dim!r}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
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
) -> jax.Array:
    """``m·center + (1 − m)·mean(teacher_out)`` over every axis but the last (stop-gradient).

    Under ``axis_name`` the mean is over the global batch (lightly all-reduces it too).
    Shared by DINO and the iBOT losses.
    """
    x = lax.stop_gradient(teacher_out)
    x = x.reshape(-1, x.shape[-1])
    batch_mean = coll.global_mean(jnp.sum(x, axis=0), x.shape[0], axis_name)
    m = jnp.asarray(momentum)
    return (m * center + (1 - m) * batch_mean.astype(center.dtype)).astype(center.dtype)


def _stack_views(views: Sequence[ArrayLike] | ArrayLike, name: str) -> jax.Array:
    """Accepts a sequence of (B, K) arrays (lightly) or a stacked (V, B, K) array (nidl)."""
    if isinstance(views, (list, tuple)):
        if not views:
            raise ValueError(f"{name} must hold at least one view, got an empty sequence")
        arrays = [val.as_float_array(v, f"{name}[{i}]", ndim=2) for i, v in enumerate(views)]
        for i, a in enumerate(arrays[1:], 1):
            val.check_same_shape(arrays[0], a, f"{name}[0]", f"{name}[{i}]")
        return jnp.stack(arrays)
    return val.as_float_array(views, name, ndim=3)  # type: ignore[arg-type]


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
    t = _stack_views(teacher_out, "teacher_out")
    s = _stack_views(student_out, "student_out")
    if t.shape[1:] != s.shape[1:]:
        raise ValueError(
            "teacher_out and student_out views must have the same (batch, K) shape, got "
            f"{t.shape[1:]} and {s.shape[1:]}"
        )
    if not isinstance(state, DINOState):
        raise TypeError(f"state must be a DINOState (see init_dino_state), got {type(state)}")
    if jnp.shape(state.center) != (t.shape[-1],):
        raise ValueError(
            f"state.center must have shape ({t.shape[-1]},) to match K, "
            f"got {jnp.shape(state.center)}"
        )
    vt, vs = t.shape[0], s.shape[0]
    n_terms = vt * vs - min(vt, vs)
    if n_terms == 0:
        raise ValueError(
            "dino_loss needs at least two views in total (same-index teacher/student pairs "
            f"are skipped), got {vt} teacher and {vs} student view(s)"
        )
    t32, s32, center = upcast(t, s, jnp.asarray(state.center))
    t_probs = jax.nn.softmax(lax.stop_gradient(t32 - center[None, None]) / teacher_temp, axis=-1)
    s_logp = jax.nn.log_softmax(s32 / student_temp, axis=-1)
    cross = -jnp.einsum("tbk,sbk->ts", t_probs, s_logp)  # summed over the local batch
    cross = jnp.where(jnp.eye(vt, vs, dtype=bool), 0.0, cross)
    loss = coll.global_mean(jnp.sum(cross), n_terms * t.shape[1], axis_name)
    new_center = update_center(jnp.asarray(state.center), t, center_momentum, axis_name)
    return loss, DINOState(new_center)
