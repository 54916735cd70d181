"""Float64 parity with lightly 1.6.0 for the losses that draw random numbers in forward
(SIGReg, LeJEPA, LeWM, VISReg, PatchKernelAlignment, DSE), fed lightly's recorded draws.

Fixtures: ``tests/golden/cases_random.json`` + ``golden_random.npz`` (written by
``make_golden_random.py``). Values and input gradients agree to 1e-9 relative. lightly's
PatchKernelAlignment computes its kernels in float32: the fixtures hold its algorithm run
in float64 (compared at 1e-9) and its as-is float32 value and gradient (compared at 1e-5).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sslloss_jax as S
from tests._harness import assert_tree_close, golden_array, golden_cases, scaled_atol

RTOL = 1e-9
F32_RTOL = 1e-5


def _fn(case):
    """``f(*inputs) -> loss`` with lightly's recorded draws fed explicitly."""
    kw = dict(case["kwargs"])
    loss = case["loss"]
    if loss == "sigreg":
        return lambda proj: S.sigreg(proj, slices=golden_array(case, "slices"), **kw)
    if loss == "lejepa":
        return lambda lp, gp: S.lejepa_loss(lp, gp, slices=golden_array(case, "slices"), **kw)
    if loss == "lewm":
        return lambda p, t, e: S.lewm_loss(p, t, e, slices=golden_array(case, "slices"), **kw)
    if loss == "visreg":
        return lambda lp, gp: S.visreg_loss(lp, gp, slices=golden_array(case, "slices"), **kw)
    if loss == "patch_kernel_alignment":
        mask = (jnp.asarray(golden_array(case, "mask")) > 0.5
                if "mask" in case.get("static_keys", []) else None)
        scores = golden_array(case, "scores") if "scores" in case["outputs"] else None
        return lambda s, t: S.patch_kernel_alignment_loss(s, t, mask, scores=scores, **kw)
    if loss == "dse":
        init = (golden_array(case, "local_init").astype(np.int32),
                golden_array(case, "global_init").astype(np.int32))
        return lambda r: S.dse_regularizer(r, kmeans_init=init, **kw)
    raise KeyError(loss)


CASES = golden_cases("sigreg", "lejepa", "lewm", "visreg", "patch_kernel_alignment", "dse")


def test_the_fixture_set_is_there():
    assert {c["loss"] for c in CASES} == {"sigreg", "lejepa", "lewm", "visreg",
                                          "patch_kernel_alignment", "dse"}
    assert len(CASES) == 21


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_value_and_grads(case):
    with jax.enable_x64(True):
        inputs = [jnp.asarray(golden_array(case, n)) for n in case["inputs"]]
        f = _fn(case)
        argnums = tuple(range(len(inputs)))
        loss, grads = jax.jit(jax.value_and_grad(f, argnums=argnums))(*inputs)
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(loss, golden_array(case, "loss"), rtol=RTOL, atol=1e-13)
        expected = {n: golden_array(case, f"grad_{n}") for n in case["grads"]}
        actual = dict(zip(case["inputs"], grads, strict=True))
        for n, e in expected.items():
            if e.size == 0:  # VISReg without local views
                assert actual[n].shape == e.shape
                continue
            assert_tree_close(actual[n], e, rtol=RTOL, atol=scaled_atol(e, RTOL),
                              err_msg=f"{case['case']} grad_{n}")


VISREG = golden_cases("visreg")


@pytest.mark.parametrize("case", VISREG, ids=[c["case"] for c in VISREG])
def test_visreg_terms(case):
    with jax.enable_x64(True):
        lp, gp = (jnp.asarray(golden_array(case, n)) for n in case["inputs"])
        terms = jax.jit(lambda a, b: S.visreg_terms(a, b, slices=golden_array(case, "slices"),
                                                    **case["kwargs"]))(lp, gp)
        for name in ("pred", "scale", "shape", "center"):
            np.testing.assert_allclose(getattr(terms, name), golden_array(case, name),
                                       rtol=RTOL, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(terms.total, golden_array(case, "loss"), rtol=RTOL)
        # lightly's own float32 quantiles move the value by ~1e-8 only
        np.testing.assert_allclose(terms.total, golden_array(case, "loss_float32_quantiles"),
                                   rtol=1e-6)


SIGREG = golden_cases("sigreg")


@pytest.mark.parametrize("case", SIGREG, ids=[c["case"] for c in SIGREG])
def test_sigreg_against_lightlys_float32_buffers(case):
    """lightly's grid/weights are float32-rounded: the difference stays ~1e-7."""
    with jax.enable_x64(True):
        loss = jax.jit(_fn(case))(jnp.asarray(golden_array(case, "proj")))
        np.testing.assert_allclose(loss, golden_array(case, "loss_float32_buffers"), rtol=1e-6)


PAKA = golden_cases("patch_kernel_alignment")


@pytest.mark.parametrize("case", PAKA, ids=[c["case"] for c in PAKA])
def test_patch_kernel_alignment_against_lightlys_float32(case):
    """lightly as is (float32 kernels): the float32 computation agrees at 1e-5."""
    inputs = [jnp.asarray(golden_array(case, n), jnp.float32) for n in case["inputs"]]
    loss, grad = jax.jit(jax.value_and_grad(_fn(case)))(*inputs)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, golden_array(case, "lightly_loss"), rtol=F32_RTOL,
                               atol=1e-6)
    e = golden_array(case, "lightly_grad_student_features")
    np.testing.assert_allclose(grad, e, rtol=1e-4, atol=scaled_atol(e, 1e-4))
