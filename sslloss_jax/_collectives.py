"""Collectives over an optional named axis: the only place losses talk to other devices.

Every helper takes ``axis_name`` (``None``, a name, or a tuple of names) and degenerates to
the local computation when it is ``None``. Inside ``jax.shard_map``, ``jax.pmap`` or a
named ``jax.vmap`` they reduce over the devices of that axis.

Gradient routing: ``lax.all_gather`` transposes to ``psum_scatter`` and ``lax.psum`` to a
broadcast, so a loss written as "local rows against gathered columns, then ``psum`` of the
local sum divided by the global count" has exactly the gradient of the single-device
global-batch loss under ``shard_map`` (see ``docs/ARCHITECTURE.md`` for the pmap recipe).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sslloss_jax._types import AxisName

__all__ = [
    "axis_size",
    "axis_index",
    "all_gather",
    "all_gather_invariant",
    "psum",
    "pmax",
    "global_mean",
    "global_logsumexp",
    "Moments",
    "global_moments",
    "match_vma",
]


def axis_size(axis_name: AxisName) -> int:
    """Number of participants of ``axis_name`` (1 for ``None``); static at trace time."""
    if axis_name is None:
        return 1
    return int(lax.axis_size(axis_name))


def axis_index(axis_name: AxisName) -> jax.Array | int:
    """This participant's index along ``axis_name`` (0 for ``None``)."""
    if axis_name is None:
        return 0
    return lax.axis_index(axis_name)


def global_rows(local_batch: int, axis_name: AxisName) -> jax.Array:
    """Global batch index of each local row, ``axis_index·B + arange(B)`` (int32): where
    this participant's rows sit among the rows of an :func:`all_gather` (the labels of a
    local-rows × gathered-columns cross-entropy, the ids of ring-passed key blocks)."""
    return axis_index(axis_name) * local_batch + jnp.arange(local_batch, dtype=jnp.int32)


def own_columns(rows: jax.Array, n: int) -> jax.Array:
    """``[len(rows), n]`` boolean: column j of ``n`` gathered rows is row i itself
    (``j == rows[i]``, e.g. ``rows = global_rows(b, axis_name)``), the self pairs that a
    local-rows × gathered-columns similarity excludes (on one device, the diagonal), or,
    given the rows' partners' ids, their positives."""
    return rows[:, None] == jnp.arange(n, dtype=jnp.int32)[None, :]


def all_gather(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Concatenates every participant's ``x`` along axis 0 (differentiable).

    The result is ordered by ``axis_index``, so this participant's rows start at
    ``axis_index(axis_name) * x.shape[0]``.
    """
    if axis_name is None:
        return x
    return lax.all_gather(x, axis_name, axis=0, tiled=True)


def psum_gather(x: jax.Array, axis_name: AxisName, axis: int = 0) -> jax.Array:
    """Every participant's ``x`` concatenated along ``axis`` (in ``axis_index`` order), as
    a ``psum`` of zero-padded blocks.

    Unlike :func:`all_gather`, the result is provably identical on every participant, so it
    can be returned with a replicated ``out_specs=P()`` from a ``shard_map`` with
    ``check_vma=True`` on every supported JAX version, and it also works under ``pmap`` and
    named ``vmap``. Differentiable: under ``shard_map`` the transpose hands every
    participant the (replicated) cotangent of its own block, under ``pmap``/named ``vmap``
    ``axis_size`` times that (the usual recipe). Meant for small arrays (it communicates
    the whole result).
    """
    if axis_name is None:
        return x
    b = x.shape[axis]
    shape = list(x.shape)
    shape[axis] = axis_size(axis_name) * b
    full = jnp.zeros(shape, x.dtype)
    full = lax.dynamic_update_slice_in_dim(full, x, axis_index(axis_name) * b, axis=axis)
    return lax.psum(full, axis_name)


def all_gather_invariant(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """:func:`psum_gather` along axis 0 for values that carry no gradient (state updates,
    e.g. a batch enqueued into a memory bank)."""
    return psum_gather(lax.stop_gradient(x), axis_name)


def psum(x, axis_name: AxisName):
    """``lax.psum`` that is the identity for ``axis_name=None`` (works on pytrees)."""
    if axis_name is None:
        return x
    return lax.psum(x, axis_name)


def pmax(x, axis_name: AxisName):
    """``lax.pmax`` that is the identity for ``axis_name=None``. Not differentiable:
    only use it on ``stop_gradient`` values (shifts, thresholds)."""
    if axis_name is None:
        return x
    return lax.pmax(lax.stop_gradient(x), axis_name)


def global_mean(local_sum: jax.Array, local_count: int, axis_name: AxisName) -> jax.Array:
    """``psum(local_sum) / (local_count * axis_size)``: the mean over the global batch.

    ``local_count`` is static and equal on every participant (shard_map blocks have equal
    shapes), so the global count is known without a collective.
    """
    return psum(local_sum, axis_name) / (local_count * axis_size(axis_name))


def global_logsumexp(lse_local: jax.Array, axis_name: AxisName) -> jax.Array:
    """Combines per-participant log-sum-exps into the global one (differentiable).

    ``log Σ_d exp(lse_d)`` with a stop-gradient max shift, so it is exact and stable
    whatever the magnitudes; ``-inf`` entries are allowed.
    """
    if axis_name is None:
        return lse_local
    m = pmax(lse_local, axis_name)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return m + jnp.log(psum(jnp.exp(lse_local - m), axis_name))


class Moments(NamedTuple):
    """First and second central moments of a global batch (per feature)."""

    mean: jax.Array  # shape (1, *x.shape[1:]) (keeps the batch axis for broadcasting)
    m2: jax.Array  # Σ_n (x_n - mean)², shape (1, *x.shape[1:])
    n: int  # global number of samples (static)


def global_moments(*xs: jax.Array, axis_name: AxisName) -> tuple[Moments, ...]:
    """Mean and centered sum of squares over axis 0 of the global batch, for each input.

    Two passes, so there is no ``E[x²] − E[x]²`` cancellation: a ``psum`` of the stacked
    local sums gives the means, then a ``psum`` of the stacked centered sums of squares
    gives M2. The statistics of all inputs share those two collectives (inputs of equal
    shape are stacked; otherwise each is reduced on its own). Differentiable, and the
    results are identical (replicated) on every participant.
    """
    b = xs[0].shape[0]
    count = b * axis_size(axis_name)

    def reduce(parts):
        if len({p.shape for p in parts}) == 1:
            return list(psum(jnp.stack(parts), axis_name))
        return [psum(p, axis_name) for p in parts]

    means = [m / count for m in reduce([jnp.sum(x, axis=0, keepdims=True) for x in xs])]
    m2s = reduce([jnp.sum(jnp.square(x - m), axis=0, keepdims=True) for x, m in zip(xs, means)])
    return tuple(Moments(m, v, count) for m, v in zip(means, m2s, strict=True))


def _varying_axes(x: jax.Array) -> frozenset | None:
    """The manual mesh axes ``x`` varies along inside ``shard_map`` (empty outside), or
    None where JAX has no such types (``manual_axis_type.varying``; ``vma`` in earlier
    versions)."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return None
    aval = typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    vma = getattr(aval, "vma", None)
    return None if vma is None else frozenset(vma)


def match_vma(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """A custom VJP's ``cotangent`` for ``primal``, summed (``psum``) over the manual mesh
    axes it varies along but ``primal`` does not: under ``shard_map`` a replicated
    operand (a temperature, prototypes) met per-device data, which autodiff transposes
    to that sum. The identity outside ``shard_map``, where the types agree, and on JAX
    versions without varying-axes types."""
    ct, pr = _varying_axes(cotangent), _varying_axes(primal)
    if ct is None or pr is None or not ct - pr:
        return cotangent
    return lax.psum(cotangent, tuple(sorted(ct - pr)))
