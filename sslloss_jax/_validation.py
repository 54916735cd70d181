"""Trace-time input validation shared by every loss.

Everything here inspects only static information (shapes, dtypes, Python scalars), so it
runs once per trace and costs nothing at run time. Values that are traced (for example a
temperature schedule passed as an array under ``jax.jit``) cannot be inspected and are
accepted as they are; they still must be scalars.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sslloss_jax._types import ArrayLike

__all__ = [
    "as_float_array",
    "stack_views",
    "check_axis_name",
    "check_same_shape",
    "concrete_scalar",
    "check_scalar_param",
    "check_temperature",
    "check_in_range",
    "check_min_batch",
    "check_state_spec",
]


def as_float_array(
    x: ArrayLike, name: str, *, ndim: int | None = None, min_ndim: int | None = None
) -> jax.Array:
    """Converts ``x`` to a ``jax.Array`` and checks that it is floating with the given rank.

    Raises:
      TypeError: if ``x`` is not an array of a real floating dtype.
      ValueError: if the rank is wrong or an axis has size 0.
    """
    if isinstance(x, (list, tuple)):
        raise TypeError(
            f"{name} must be an array, got a {type(x).__name__}; stack it first, e.g. "
            f"jnp.stack({name})"
        )
    try:
        arr = jnp.asarray(x)
    except TypeError as err:  # pragma: no cover - defensive, jnp's message is good
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from err
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {arr.dtype} with shape {arr.shape}"
        )
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {arr.shape}")
    if min_ndim is not None and arr.ndim < min_ndim:
        raise ValueError(f"{name} must have rank >= {min_ndim}, got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    return arr


def stack_views(views: object, name: str, *, ndim: int = 2) -> jax.Array:
    """Views given as a sequence of rank-``ndim`` arrays (lightly) or one stacked array of
    rank ``ndim + 1`` (nidl): validated (floating, same shapes) and stacked on axis 0.
    An empty sequence gives an empty ``(0, 0, 0)`` array; callers decide if that is legal.
    """
    blocks = view_blocks(views, name, ndim=ndim)
    return concat_views(blocks) if blocks else jnp.zeros((0,) * (ndim + 1))


def concat_views(blocks: tuple[jax.Array, ...]) -> jax.Array:
    """Non-empty :func:`view_blocks` as one stacked array (a copy only for several)."""
    return jnp.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def view_blocks(views: object, name: str, *, ndim: int = 2) -> tuple[jax.Array, ...]:
    """Views as :func:`stack_views` validates them, but never stacked: a sequence of
    rank-``ndim`` arrays gives one ``[1, ...]`` block per view (a free reshape), one
    stacked array a single block. For losses whose kernels take blocks of views
    (:func:`~sslloss_jax._numerics.cross_view_entropy`): stacking a sequence copies every
    view forward and slices every gradient back out (DINO's 2+6 crops of ``64 × 65536``:
    327 ms a step from a list, 112–119 ms from one array; as blocks 117 ms). An empty
    sequence gives ``()``; callers decide if that is legal.
    """
    if isinstance(views, (list, tuple)):
        arrays = [as_float_array(v, f"{name}[{i}]", ndim=ndim) for i, v in enumerate(views)]
        for i, a in enumerate(arrays[1:], 1):
            check_same_shape(arrays[0], a, f"{name}[0]", f"{name}[{i}]")
        return tuple(a[None] for a in arrays)
    return (as_float_array(views, name, ndim=ndim + 1),)  # type: ignore[arg-type]


def check_same_shape(a: jax.Array, b: jax.Array, name_a: str, name_b: str) -> None:
    """Raises ``ValueError`` unless ``a`` and ``b`` have exactly the same shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}"
        )


def check_axis_name(axis_name: object) -> None:
    """Checks that ``axis_name`` is ``None``, a hashable name or a tuple of names."""
    if axis_name is None:
        return
    names: Sequence[object] = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names or not all(isinstance(n, Hashable) and n is not None for n in names):
        raise TypeError(
            "axis_name must be None, an axis name or a non-empty tuple of axis names, "
            f"got {axis_name!r}"
        )


def concrete_scalar(value: object) -> float | None:
    """Returns ``value`` as a Python float if it is known at trace time, else ``None``."""
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        return float(value)
    try:
        return float(np.asarray(value))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None
    except TypeError:
        return None


def as_int_array(value: object, name: str, shape: tuple[int, ...], *, meaning: str,
                 context: str) -> jax.Array:
    """An integer array of exactly ``shape`` (class ids, region ids, positions).

    ``meaning`` says what the integers are and ``context`` where ``shape`` comes from; both
    appear in the error messages.
    """
    if isinstance(value, (list, tuple)):
        raise TypeError(
            f"{name} must be an array, got a {type(value).__name__}; use jnp.asarray({name})")
    arr = jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(
            f"{name} must have an integer dtype ({meaning}), got {arr.dtype} with shape "
            f"{arr.shape}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({context}), got {arr.shape}")
    return arr


def check_key(key: object) -> None:
    """A single PRNG key: a typed key (``jax.random.key``) or a legacy ``uint32[2]``."""
    dtype = getattr(key, "dtype", None)
    shape = tuple(getattr(key, "shape", ()))
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape:
            raise ValueError(f"key must be a single PRNG key, got shape {shape}")
        return
    if dtype is None or jnp.dtype(dtype) != jnp.uint32 or len(shape) != 1:
        raise TypeError(
            "key must be a PRNG key (jax.random.key(seed) or a legacy uint32 key), got "
            f"{type(key).__name__} with dtype {dtype} and shape {shape}"
        )


def check_int(value: object, name: str, minimum: int) -> int:
    """A static Python (or NumPy) integer >= ``minimum``, not a bool; returns it as ``int``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_scalar_param(value: ArrayLike, name: str) -> jax.Array:
    """Checks that a hyperparameter is a scalar (Python number or 0-d array).

    Traced scalars are accepted, so per-step schedules do not retrace.
    """
    if isinstance(value, (list, tuple)) or np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    arr = jnp.asarray(value)
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real number, got dtype {arr.dtype}")
    v = concrete_scalar(value)
    if v is not None and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return arr


def check_temperature(value: ArrayLike, name: str = "temperature", *, positive: bool = False):
    """Rejects |temperature| < 1e-8 (and, if ``positive``, temperature <= 0)."""
    arr = check_scalar_param(value, name)
    v = concrete_scalar(value)
    if v is not None:
        if abs(v) < 1e-8:
            raise ValueError(f"Illegal {name}: abs({v}) < 1e-8")
        if positive and v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    return arr


def check_in_range(
    value: ArrayLike,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
):
    """Checks ``low <= value <= high`` (bounds optional, inclusive unless told)."""
    arr = check_scalar_param(value, name)
    v = concrete_scalar(value)
    if v is not None:
        bad_low = low is not None and (v < low if low_inclusive else v <= low)
        bad_high = high is not None and (v > high if high_inclusive else v >= high)
        if bad_low or bad_high:
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            brackets = ("[" if low_inclusive else "(", "]" if high_inclusive else ")")
            raise ValueError(
                f"{name} must be in {brackets[0]}{lo}, {hi}{brackets[1]}, got {v}"
            )
    return arr


def check_state_spec(dtype: Any, **sizes: object) -> None:
    """Checks the arguments of an ``init_*`` function: positive int sizes, float dtype."""
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")


def check_min_batch(global_batch: int, minimum: int, what: str, local_shape: tuple) -> None:
    """Checks that the (global) batch is large enough for the statistic ``what`` needs."""
    if global_batch < minimum:
        raise ValueError(
            f"{what} needs a batch of at least {minimum} samples, got a global batch of "
            f"{global_batch} (local shape {local_shape})"
        )
