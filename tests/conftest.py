"""Test configuration: 8 fake CPU devices and strict numpy promotion rules.

Both must be set before JAX initializes its backend, so they live here (pytest imports
conftest before any test module). With pytest-xdist every worker is its own process and
gets its own 8 devices.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile hundreds of small programs; XLA's optimization passes dominate their
# run time and do not change what is computed (tolerances absorb fusion round-off).
_fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _fast).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Catch silent broadcasting ([B] vs [B, 1]) and accidental dtype promotion inside the
# library: it must work for users who run with the strictest settings.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
