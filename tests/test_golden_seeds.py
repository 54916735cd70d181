"""Float64 parity with the seed libraries: fovi 2.4.0 ``SimCLRLoss`` (pairs_per_sample 1, 2,
3), nidl 0.0.2 ``InfoNCE`` and ``YAwareInfoNCE`` (every kernel, scalar and vector
bandwidths, no labels), and torch's ``F.cross_entropy(label_smoothing=...)``, which is
quadra's ``IDMMLoss``.

Fixtures: ``tests/golden/cases_seeds.json`` + ``golden_seeds.npz`` (written by
``make_golden_seeds.py``). Values (and fovi's two terms) and the gradients of the inputs
that receive one agree to 1e-9 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sslloss_jax as S
from tests._harness import assert_tree_close, golden_array, golden_cases, scaled_atol

RTOL = 1e-9
LOSSES = ("fovi_simclr", "infonce", "y_aware_infonce", "idmm")
CASES = golden_cases(*LOSSES)


def _fn(case):
    """``(f(*differentiable inputs) -> (loss, extra outputs), names of those inputs)``.

    The extras are compared with the fixture's own outputs: fovi's two terms, and for nidl's
    InfoNCE the plain ``ntxent_loss`` at the same temperature (the wrapper is exact)."""
    kw = dict(case["kwargs"])
    loss = case["loss"]
    if loss == "fovi_simclr":
        def fovi(zi, zj):
            t = S.fovi_simclr_terms(zi, zj, **kw)
            return S.fovi_simclr_loss(zi, zj, **kw), {"num_sim": t.num_sim,
                                                      "num_entropy": t.num_entropy}
        return fovi, ("z_i", "z_j")
    if loss == "infonce":
        return (lambda z1, z2: (S.infonce_loss(z1, z2, **kw),
                                {"loss": S.ntxent_loss(z1, z2, **kw)})), ("z1", "z2")
    if loss == "y_aware_infonce":
        labels = golden_array(case, "labels") if "labels" in case["inputs"] else None
        if isinstance(kw["bandwidth"], list):
            kw["bandwidth"] = np.asarray(kw["bandwidth"])
        return (lambda z1, z2: (S.y_aware_infonce_loss(z1, z2, labels, **kw), {})), ("z1", "z2")
    if loss == "idmm":
        y = golden_array(case, "y").astype(np.int32)
        return (lambda p: (S.idmm_loss(p, y, **kw), {})), ("p",)
    raise KeyError(loss)


def test_the_fixture_set_is_there():
    assert {c["loss"] for c in CASES} == set(LOSSES)
    assert sorted({c["kwargs"]["pairs_per_sample"] for c in golden_cases("fovi_simclr")}) == [
        1, 2, 3]
    kernels = {c["kwargs"]["kernel"] for c in golden_cases("y_aware_infonce")}
    assert kernels == {"gaussian", "epanechnikov", "exponential", "linear", "cosine"}
    assert len(CASES) == 22


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_value_and_grads(case):
    with jax.enable_x64(True):
        f, names = _fn(case)
        inputs = [jnp.asarray(golden_array(case, n)) for n in names]
        (loss, extras), grads = jax.jit(jax.value_and_grad(
            f, argnums=tuple(range(len(names))), has_aux=True))(*inputs)
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(loss, golden_array(case, "loss"), rtol=RTOL, atol=1e-12)
        for name, value in extras.items():
            np.testing.assert_allclose(value, golden_array(case, name), rtol=RTOL, atol=1e-12,
                                       err_msg=name)
        expected = {n: golden_array(case, f"grad_{n}") for n in case["grads"]}
        actual = {n: grads[names.index(n)] for n in case["grads"]}
        assert_tree_close(actual, expected, rtol=RTOL, atol=scaled_atol(expected, RTOL))
