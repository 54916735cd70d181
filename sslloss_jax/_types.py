"""Type aliases shared by the public API."""

from __future__ import annotations

from collections.abc import Hashable

import jax

__all__ = ["Array", "ArrayLike", "AxisName"]

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

#: A mesh / pmap / named-vmap axis name, a tuple of them (reduce over several mesh
#: axes at once, e.g. ``("data", "fsdp")``), or ``None`` for a purely local computation.
AxisName = Hashable | tuple[Hashable, ...] | None
