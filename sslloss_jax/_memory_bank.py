"""A FIFO memory bank (MoCo queue) as an explicit, functional state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sslloss_jax import _collectives as coll
from sslloss_jax import _validation as val
from sslloss_jax._numerics import l2_normalize
from sslloss_jax._types import ArrayLike, AxisName

__all__ = ["MemoryBankState", "init_memory_bank", "memory_bank_enqueue"]


class MemoryBankState(NamedTuple):
    """State of a FIFO memory bank.

    Attributes:
      bank: ``[size, dim]`` stored rows (lightly's ``feature_dim_first=False`` layout).
      ptr: ``[]`` int32, the row the next enqueued sample is written to.
    """

    bank: jax.Array
    ptr: jax.Array


def init_memory_bank(
    key: jax.Array, size: int, dim: int, dtype: jnp.dtype = jnp.float32
) -> MemoryBankState:
    """Builds a bank of ``size`` random unit rows of dimension ``dim`` (as lightly).

    Pure and shape-polymorphic in nothing: works under ``jax.jit`` and ``jax.eval_shape``.
    Use the same ``key`` on every device so that a distributed bank starts identical.

    Args:
      key: a PRNG key (``jax.random.key`` or a legacy uint32 key).
      size: number of rows, ``>= 1``.
      dim: feature dimension, ``>= 1``.
      dtype: storage dtype (lightly always stores float32).

    Returns:
      ``MemoryBankState(bank=[size, dim], ptr=0)``.
    """
    val.check_state_spec(dtype, size=size, dim=dim)
    bank = l2_normalize(jax.random.normal(key, (size, dim), jnp.float32), axis=-1)
    return MemoryBankState(bank.astype(dtype), jnp.zeros((), jnp.int32))


def check_memory_bank(state: MemoryBankState, dim: int, name: str = "bank") -> None:
    """Validates a bank's structure and that its rows have dimension ``dim``."""
    if not isinstance(state, MemoryBankState):
        raise TypeError(
            f"{name} must be a MemoryBankState (see init_memory_bank), got {type(state).__name__}"
        )
    bank = jnp.asarray(state.bank)
    if bank.ndim != 2 or bank.shape[0] < 1:
        raise ValueError(f"{name}.bank must have shape (size, dim), got {bank.shape}")
    if bank.shape[1] != dim:
        raise ValueError(
            f"{name}.bank has feature dimension {bank.shape[1]} but the inputs have {dim}"
        )
    if not jnp.issubdtype(bank.dtype, jnp.floating):
        raise TypeError(f"{name}.bank must be floating, got {bank.dtype}")
    if jnp.shape(state.ptr) != ():
        raise ValueError(f"{name}.ptr must be a scalar, got shape {jnp.shape(state.ptr)}")


def memory_bank_enqueue(
    state: MemoryBankState, x: ArrayLike, *, axis_name: AxisName = None
) -> MemoryBankState:
    """Writes the rows of ``x`` into the bank, first in first out.

    The rows are written at ``ptr, ptr+1, ...`` **modulo the bank size** (they wrap
    around to the start; lightly instead drops the rows that do not fit before the end and
    resets the pointer to 0). If more rows arrive than the bank holds, only the newest
    ``size`` are kept. ``x`` is stop-gradient.

    With ``axis_name``, the batches of all participants are gathered (in ``axis_index``
    order) and the same global batch is enqueued on every device, so replicated banks
    stay identical (lightly's ``gather_distributed=True``).

    Args:
      state: the bank.
      x: ``[batch, dim]`` rows to enqueue (cast to the bank dtype).
      axis_name: optional axis to gather the batch over.

    Returns:
      The new state; ``ptr`` advanced by the (global) batch size modulo ``size``.
    """
    val.check_axis_name(axis_name)
    x = val.as_float_array(x, "x", ndim=2)
    check_memory_bank(state, x.shape[1], "state")
    x = coll.all_gather_invariant(x, axis_name).astype(state.bank.dtype)
    size = state.bank.shape[0]
    b = x.shape[0]
    ptr = jnp.asarray(state.ptr, jnp.int32)
    if b >= size:  # only the newest `size` rows survive
        start = ptr + (b - size)
        x = x[b - size :]
        idx = (start + jnp.arange(size, dtype=jnp.int32)) % size
    else:
        idx = (ptr + jnp.arange(b, dtype=jnp.int32)) % size
    bank = state.bank.at[idx].set(x, unique_indices=True)
    return MemoryBankState(bank, ((ptr + b) % size).astype(jnp.int32))

