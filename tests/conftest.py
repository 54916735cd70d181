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


def _legacy_cpu_emitters() -> bool:
    """jaxlib 0.10 (this project's oldest) still has XLA:CPU's legacy (non-MLIR) fusion
    emitters, which compile these small programs about twice as fast; jaxlib 0.12 rejects
    the flag (a fatal error), so it is set only where the installed jaxlib is known to
    have it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(p) for p in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) == (0, 10)


if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    if _legacy_cpu_emitters():
        _fast += " --xla_cpu_use_fusion_emitters=false"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _fast).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Catch silent broadcasting ([B] vs [B, 1]) and accidental dtype promotion inside the
# library: it must work for users who run with the strictest settings.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


# The slowest tests (10-60 s each on 2 cores: end-to-end training, many compilations).
# CI runs them on the main leg; the newest-JAX leg skips them with -m "not slow" (it checks
# compatibility, and the main leg already checks these same code paths).
SLOW_TESTS = (
    "tests/test_demo.py::test_demo_tiny[dino_loss]",
    "tests/test_demo.py::test_demo_tiny[swav_loss]",
    "tests/test_demo.py::test_default_config_learns",
    "tests/test_benchmarks.py::test_quick_run_reports_every_column",
    "tests/test_quality.py",
    "tests/test_golden.py::test_extra_value_grads_and_terms[vicregl",
    "tests/test_contrastive.py::test_dclw_gradient_is_dcl_gradient_with_frozen_weights",
    "tests/test_contrastive.py::test_symmetric_vjp_matches_autodiff_path",
    "tests/test_contrastive.py::test_co2_lightly_value_gradient_and_bank",
    "tests/test_clustering.py::test_swav_gradient_is_cross_entropy_with_frozen_codes",
    "tests/test_clustering.py::test_msn_pmsn_lightly_values_and_layouts",
    "tests/test_clustering.py::test_swav_does_not_overflow_where_lightly_does",
    "tests/test_lightly_extra.py::test_detcon_",
    "tests/test_checkpoint.py::test_resumed_train_run_is_bit_identical",
)


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
