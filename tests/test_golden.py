"""Float64 parity with the PyTorch originals (lightly 1.6.0, nidl 0.0.2, fovi 2.4.0).

Fixtures: ``tests/golden/`` (written by ``make_golden.py`` with the oracle venv; these
tests only read them). Loss values and the gradient of every input that should receive one
must agree to 1e-9 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sslloss_jax as S
from tests._harness import assert_tree_close, golden_array, golden_cases, scaled_atol

RTOL = 1e-9


def _call(loss, kwargs):
    """Maps a fixture's loss name to ``f(*inputs) -> scalar``."""
    fns = {
        "ntxent": S.ntxent_loss,
        "dcl": S.dcl_loss,
        "dclw": S.dclw_loss,
        "negative_cosine_similarity": S.negative_cosine_similarity,
        "hypersphere": S.hypersphere_loss,
        "barlow_twins": S.barlow_twins_loss,
        "vicreg": S.vicreg_loss,
    }
    if loss == "sym_negative_cosine_similarity":
        return lambda z0, p0, z1, p1: S.sym_negative_cosine_similarity_loss((z0, p0), (z1, p1))
    return lambda *xs: fns[loss](*xs, **kwargs)


def _skip_grads(case):
    """Gradients that are deliberately not compared, with the reason."""
    if case["loss"] == "dclw" and case["source"] == "nidl":
        return "nidl does not detach its DCLW weights (lightly and the paper do)"
    if "tiny_norm" in case["case"]:
        return ("torch's cosine_similarity clamps the norm in forward but differentiates "
                "the unclamped norm; we differentiate the clamped forward consistently")
    return None


STATELESS = [c for c in golden_cases("ntxent", "dcl", "dclw", "negative_cosine_similarity",
                                     "sym_negative_cosine_similarity", "hypersphere",
                                     "barlow_twins", "vicreg")]


@pytest.mark.parametrize("case", STATELESS, ids=[c["case"] for c in STATELESS])
def test_value_and_grads(case):
    with jax.enable_x64(True):
        inputs = [jnp.asarray(golden_array(case, n)) for n in case["inputs"]]
        f = _call(case["loss"], case["kwargs"])
        argnums = tuple(range(len(inputs)))
        loss, grads = jax.jit(jax.value_and_grad(f, argnums=argnums))(*inputs)
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(loss, golden_array(case, "loss"), rtol=RTOL, atol=1e-12)
        if _skip_grads(case) is None:
            expected = {n: golden_array(case, f"grad_{n}") for n in case["grads"]}
            actual = {n: grads[case["inputs"].index(n)] for n in case["grads"]}
            assert_tree_close(actual, expected, rtol=RTOL, atol=scaled_atol(expected, RTOL))


VICREG = golden_cases("vicreg")


@pytest.mark.parametrize("case", VICREG, ids=[c["case"] for c in VICREG])
def test_vicreg_terms(case):
    kw = {k: v for k, v in case["kwargs"].items() if k == "eps"}
    weights = (case["kwargs"]["lambda_param"], case["kwargs"]["mu_param"],
               case["kwargs"]["nu_param"])
    with jax.enable_x64(True):
        t = S.vicreg_terms(golden_array(case, "z_a"), golden_array(case, "z_b"), **kw)
        if case["source"] == "fovi":  # fovi's components are already weighted
            names = ("repr_loss", "std_loss", "cov_loss")
            expected = [golden_array(case, n) / w for n, w in zip(names, weights)]
        else:
            expected = [golden_array(case, n) for n in ("invariance", "variance", "covariance")]
        assert_tree_close(list(t), expected, rtol=RTOL, atol=1e-12)


FOVI_BARLOW = [c for c in golden_cases("barlow_twins") if c["source"] == "fovi"]


@pytest.mark.parametrize("case", FOVI_BARLOW, ids=[c["case"] for c in FOVI_BARLOW])
def test_fovi_barlow_with_its_batch_norm_equals_batch_norm_mode(case):
    """fovi's external BatchNorm1d(affine=False) + c/N is our default "batch_norm" mode."""
    with jax.enable_x64(True):
        raw = (golden_array(case, "raw_z1"), golden_array(case, "raw_z2"))
        f = lambda a, b: S.barlow_twins_loss(a, b, lambda_param=case["kwargs"]["lambda_param"])
        loss, grads = jax.value_and_grad(f, argnums=(0, 1))(*raw)
        np.testing.assert_allclose(loss, golden_array(case, "loss_raw"), rtol=RTOL)
        expected = (golden_array(case, "grad_raw_z1"), golden_array(case, "grad_raw_z2"))
        assert_tree_close(grads, expected, rtol=RTOL, atol=scaled_atol(expected, RTOL))


BANK = golden_cases("ntxent_memory_bank")


def _reference_enqueue_wraparound(bank, ptr, rows):
    """Our documented FIFO rule: rows written at ptr, ptr+1, ... modulo the size."""
    bank = bank.copy()
    for i, row in enumerate(rows):
        bank[(ptr + i) % len(bank)] = row
    return bank, (ptr + len(rows)) % len(bank)


@pytest.mark.parametrize("case", BANK, ids=[c["case"] for c in BANK])
def test_memory_bank_multistep(case):
    """Loss, gradients and bank after every step equal lightly's; where lightly drops the
    overflow of a batch that does not fit, our bank wraps around instead (checked against
    a NumPy transcription of that rule), and the losses agree up to that step."""
    tau = case["kwargs"]["temperature"]
    first_overflow = case.get("first_overflow_step") or case["steps"] + 1
    with jax.enable_x64(True):
        state = S.MemoryBankState(jnp.asarray(golden_array(case, "bank0")),
                                  jnp.asarray(golden_array(case, "ptr0"), jnp.int32))
        step = jax.jit(jax.value_and_grad(
            lambda a, b, s: S.ntxent_memory_bank_loss(a, b, s, temperature=tau),
            argnums=(0, 1), has_aux=True))
        for k in range(1, case["steps"] + 1):
            out0, out1 = (golden_array(case, f"step{k}_{n}") for n in ("out0", "out1"))
            old = np.asarray(state.bank)
            (loss, new_state), grads = step(out0, out1, state)
            if k > first_overflow:
                break
            np.testing.assert_allclose(loss, golden_array(case, f"step{k}_loss"), rtol=RTOL)
            expected = (golden_array(case, f"step{k}_grad_out0"),
                        golden_array(case, f"step{k}_grad_out1"))
            assert_tree_close(grads, expected, rtol=RTOL, atol=scaled_atol(expected, RTOL))
            if k < first_overflow:
                np.testing.assert_allclose(new_state.bank, golden_array(case, f"step{k}_bank"),
                                           rtol=RTOL, atol=1e-15)
                assert int(new_state.ptr) == int(golden_array(case, f"step{k}_ptr"))
            else:
                z1 = out1 / np.linalg.norm(out1, axis=1, keepdims=True)
                bank, ptr = _reference_enqueue_wraparound(old, int(state.ptr), z1)
                np.testing.assert_allclose(new_state.bank, bank, rtol=RTOL, atol=1e-15)
                assert int(new_state.ptr) == ptr
            state = new_state


def _named_call(case):
    """``f(named arrays) -> loss`` for the single-step families of the stateful issue."""
    kw = dict(case["kwargs"])
    loss = case["loss"]

    def pick(named, prefix):
        return [named[k] for k in sorted(n for n in named if n.startswith(prefix))]

    if loss == "swav":
        return lambda n: S.swav_loss(pick(n, "high"), pick(n, "low"),
                                     pick(n, "queue") or None, **kw)
    if loss in ("msn", "pmsn", "pmsn_custom"):
        if loss == "pmsn_custom":
            target = jnp.asarray(kw.pop("target_distribution"))
            kw["target_distribution"] = lambda p: target.astype(p.dtype)
        fn = {"msn": S.msn_loss, "pmsn": S.pmsn_loss, "pmsn_custom": S.pmsn_custom_loss}[loss]
        return lambda n: fn(n["anchors"], n["targets"], n["prototypes"], **kw)
    if loss == "capi":
        return lambda n: S.capi_loss(
            n["teacher_logits"], n["student_logits"],
            n["teacher_index"].astype(jnp.int32) if "teacher_index" in n else None, **kw)
    if loss == "koleo":
        return lambda n: S.koleo_loss(n["x"], **kw)
    if loss == "co2":
        return lambda n: S.co2_regularizer(n["out0"], n["out1"], **kw)
    raise KeyError(loss)


# lightly's KoLeo on a batch of one takes the sample as its own neighbour (-log 2e-8);
# koleo_loss rejects a batch without a neighbour instead (documented difference).
SINGLE_STEP = [c for c in golden_cases("swav", "msn", "pmsn", "pmsn_custom", "capi", "koleo",
                                       "co2")
               if not c.get("steps") and c["case"] != "koleo/lightly/closed_b1"]


@pytest.mark.parametrize("case", SINGLE_STEP, ids=[c["case"] for c in SINGLE_STEP])
def test_single_step_value_and_grads(case):
    with jax.enable_x64(True):
        named = {n: jnp.asarray(golden_array(case, n)) for n in case["inputs"]}
        f = _named_call(case)

        def loss_of(diff):
            return f({**named, **diff})

        diff = {n: named[n] for n in case["grads"]}
        loss, grads = jax.jit(jax.value_and_grad(loss_of))(diff)
        np.testing.assert_allclose(loss, golden_array(case, "loss"), rtol=RTOL, atol=1e-12)
        expected = {n: golden_array(case, f"grad_{n}") for n in case["grads"]}
        assert_tree_close(grads, expected, rtol=RTOL, atol=scaled_atol(expected, RTOL))


# ----------------------------------------------------------------------------- multi-step
# The stateful families of the stateful issue, over recorded multi-step sequences: loss,
# the gradients of the inputs that should get one, and the state after every step.


def _steps(case, *names):
    """``[{name: step-k array}]`` for k = 1..steps."""
    return [{n: jnp.asarray(golden_array(case, f"step{k}_{n}")) for n in names}
            for k in range(1, case["steps"] + 1)]


def _views(step, prefix, count):
    return [step[f"{prefix}{v}"] for v in range(count)]


DINO = golden_cases("dino")


@pytest.mark.parametrize("case", DINO, ids=[c["case"] for c in DINO])
def test_dino_multistep(case):
    """lightly through the warm-up epochs and past them (epochs 0, 1, 2, 5 with a 3-epoch
    warm-up) and nidl with stacked ``(V, B, K)`` views and ``epoch=None``: loss, student
    gradients, center after every step (the teacher gets no gradient)."""
    kw = case["kwargs"]
    vt, vs = case["n_teacher_views"], case["n_student_views"]
    stacked = case.get("input_layout") == "stacked"
    names = [f"teacher{v}" for v in range(vt)] + [f"student{u}" for u in range(vs)]
    with jax.enable_x64(True):
        state = S.DINOState(jnp.asarray(golden_array(case, "center0")))

        def f(teacher, student, state, temp):
            if stacked:
                teacher, student = jnp.stack(teacher), jnp.stack(student)
            return S.dino_loss(teacher, student, state, teacher_temp=temp,
                               student_temp=kw["student_temp"],
                               center_momentum=kw["center_momentum"])

        step_fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
        for k, (epoch, step) in enumerate(zip(case["epochs"], _steps(
                case, *names, "loss", "center", "teacher_temp",
                *(f"grad_student{u}" for u in range(vs)))), start=1):
            # The schedule reproduces lightly's float32 temperatures (to float32 round-off);
            # the parity run uses the exact float32 value torch used.
            schedule = S.dino_teacher_temperature(
                None if epoch is None else jnp.float32(epoch),
                warmup_teacher_temp=jnp.float32(kw["warmup_teacher_temp"]),
                teacher_temp=jnp.float32(kw["teacher_temp"]),
                warmup_teacher_temp_epochs=kw["warmup_teacher_temp_epochs"])
            np.testing.assert_allclose(schedule, step["teacher_temp"], rtol=1e-6)
            (loss, state), (g_t, g_s) = step_fn(
                _views(step, "teacher", vt), _views(step, "student", vs), state,
                step["teacher_temp"])
            np.testing.assert_allclose(loss, step["loss"], rtol=RTOL, err_msg=f"step {k}")
            expected = _views(step, "grad_student", vs)
            assert_tree_close(g_s, expected, rtol=RTOL, atol=scaled_atol(expected, RTOL))
            assert all(not np.any(g) for g in g_t)  # stop-gradient teacher
            np.testing.assert_allclose(state.center, step["center"], rtol=RTOL, atol=1e-15)


IBOT = golden_cases("ibot_patch", "ibot_plus_plus_patch")


@pytest.mark.parametrize("case", IBOT, ids=[c["case"] for c in IBOT])
def test_ibot_multistep(case):
    """iBOT on fixed-shape tokens with a boolean mask equals lightly's gather of the masked
    tokens (per-image normalization, center from the masked tokens); iBOT++ with and
    without a mask and ``visible_loss_weight`` 1, 0, 0.5 (center from all tokens)."""
    kw = {k: case["kwargs"][k] for k in ("teacher_temp", "student_temp", "center_momentum")}
    plus = case["loss"] == "ibot_plus_plus_patch"
    suffix = "" if plus else "_dense"
    mask = None
    if not plus or case["has_mask"]:
        mask = jnp.asarray(golden_array(case, "mask")).astype(bool)
    with jax.enable_x64(True):
        state = S.IBOTState(jnp.asarray(golden_array(case, "center0")))
        if plus:
            f = lambda t, s, st: S.ibot_plus_plus_patch_loss(
                t, s, st, mask, visible_loss_weight=case["kwargs"]["visible_loss_weight"], **kw)
        else:
            f = lambda t, s, st: S.ibot_patch_loss(t, s, mask, st, **kw)
        step_fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
        for k, step in enumerate(_steps(case, f"teacher{suffix}", f"student{suffix}", "loss",
                                        f"grad_student{suffix}", "center"), start=1):
            (loss, state), (g_t, g_s) = step_fn(step[f"teacher{suffix}"],
                                                step[f"student{suffix}"], state)
            np.testing.assert_allclose(loss, step["loss"], rtol=RTOL, err_msg=f"step {k}")
            expected = step[f"grad_student{suffix}"]
            np.testing.assert_allclose(g_s, expected, rtol=RTOL,
                                       atol=scaled_atol(expected, RTOL))
            assert not np.any(g_t)
            np.testing.assert_allclose(state.center, step["center"], rtol=RTOL, atol=1e-15)


TICO = golden_cases("tico")


@pytest.mark.parametrize("case", TICO, ids=[c["case"] for c in TICO])
def test_tico_multistep(case):
    """Three steps with and without the covariance update: loss, both gradients (lightly
    does not detach z_b) and the covariance after every step."""
    kw = case["kwargs"]
    with jax.enable_x64(True):
        state = S.TiCoState(jnp.asarray(golden_array(case, "covariance0")))
        for k, (update, step) in enumerate(zip(kw["update_covariance_matrix"], _steps(
                case, "z_a", "z_b", "loss", "grad_z_a", "grad_z_b", "covariance")), start=1):
            f = lambda a, b, st, u=update: S.tico_loss(a, b, st, beta=kw["beta"], rho=kw["rho"],
                                                       update_covariance_matrix=u)
            (loss, state), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
                step["z_a"], step["z_b"], state)
            np.testing.assert_allclose(loss, step["loss"], rtol=RTOL, err_msg=f"step {k}")
            expected = (step["grad_z_a"], step["grad_z_b"])
            assert_tree_close(grads, expected, rtol=RTOL, atol=scaled_atol(expected, RTOL))
            np.testing.assert_allclose(state.covariance, step["covariance"], rtol=RTOL,
                                       atol=1e-15)


CO2_BANK = [c for c in golden_cases("co2") if c.get("steps")]


@pytest.mark.parametrize("case", CO2_BANK, ids=[c["case"] for c in CO2_BANK])
def test_co2_memory_bank_multistep(case):
    """CO2 against a memory bank over three steps: lightly's (detached) value, the
    gradients of a transcription of its formula (lightly has none), the bank after every
    step; past lightly's overflow step the bank wraps around as the NT-Xent bank does."""
    kw = case["kwargs"]
    first_overflow = case.get("first_overflow_step") or case["steps"] + 1
    with jax.enable_x64(True):
        state = S.MemoryBankState(jnp.asarray(golden_array(case, "bank0")),
                                  jnp.asarray(golden_array(case, "ptr0"), jnp.int32))
        step_fn = jax.jit(jax.value_and_grad(
            lambda a, b, s: S.co2_memory_bank_regularizer(a, b, s, **kw), argnums=(0, 1),
            has_aux=True))
        for k, step in enumerate(_steps(case, "out0", "out1", "loss", "lightly_loss",
                                        "grad_out0", "grad_out1", "bank", "ptr"), start=1):
            old = np.asarray(state.bank)
            (loss, new_state), grads = step_fn(step["out0"], step["out1"], state)
            np.testing.assert_allclose(loss, step["lightly_loss"], rtol=RTOL, atol=1e-13)
            np.testing.assert_allclose(loss, step["loss"], rtol=RTOL, atol=1e-13)
            expected = (step["grad_out0"], step["grad_out1"])
            assert_tree_close(grads, expected, rtol=RTOL, atol=scaled_atol(expected, RTOL))
            if k < first_overflow:
                np.testing.assert_allclose(new_state.bank, step["bank"], rtol=RTOL, atol=1e-15)
                assert int(new_state.ptr) == int(step["ptr"])
            else:
                z1 = np.asarray(step["out1"])
                z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
                bank, ptr = _reference_enqueue_wraparound(old, int(state.ptr), z1)
                np.testing.assert_allclose(new_state.bank, bank, rtol=RTOL, atol=1e-15)
                assert int(new_state.ptr) == ptr
            state = new_state


WMSE = golden_cases("wmse")


@pytest.mark.parametrize("case", WMSE, ids=[c["case"] for c in WMSE])
def test_wmse_train_then_eval(case):
    """Two training steps then one evaluation step with lightly's recorded ``randperm``
    draws: loss, input gradient, running mean and covariance after every step, and the
    eval-mode whitening of the last input with the final running statistics."""
    kw = case["kwargs"]
    perm_names = [f"perm{i}" for i in range(kw["w_iter"])]
    with jax.enable_x64(True):
        state = S.WMSEState(jnp.asarray(golden_array(case, "running_mean0")),
                            jnp.asarray(golden_array(case, "running_variance0")))
        for k, (mode, step) in enumerate(zip(case["modes"], _steps(
                case, "input", "loss", "grad_input", "running_mean", "running_variance",
                *perm_names)), start=1):
            perms = jnp.stack([step[n] for n in perm_names]).astype(jnp.int32)
            f = lambda x, st, p=perms, train=(mode == "train"): S.wmse_loss(
                x, st, permutations=p, train=train, **kw)
            (loss, state), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(
                step["input"], state)
            np.testing.assert_allclose(loss, step["loss"], rtol=RTOL, err_msg=f"step {k}")
            np.testing.assert_allclose(grad, step["grad_input"], rtol=RTOL,
                                       atol=scaled_atol(step["grad_input"], RTOL))
            np.testing.assert_allclose(state.mean, step["running_mean"], rtol=RTOL, atol=1e-15)
            np.testing.assert_allclose(state.covariance, step["running_variance"], rtol=RTOL,
                                       atol=1e-15)
        whitened, _ = S.whiten(step["input"], state, momentum=kw["momentum"], eps=kw["eps"],
                               train=False)
        np.testing.assert_allclose(whitened, golden_array(case, "eval_whitened"), rtol=RTOL,
                                   atol=1e-12)


# ----------------------------------------------------------------------------- issue 4 (part)
# VICRegL, DetCon-B/S, DirectCLR, MACL, MMCR, FroSSL, EMP-SSL (lightly, single step).
EXTRA = golden_cases("vicregl", "detcon_b", "detcon_s", "directclr", "macl", "mmcr", "frossl",
                     "emp_ssl")


def _numbered(named, prefix):
    """``named[prefix0], named[prefix1], ...`` in index order."""
    count = sum(1 for k in named if k.startswith(prefix) and k[len(prefix):].isdigit())
    return [named[f"{prefix}{i}"] for i in range(count)]


def _vicregl_views(case, named):
    vg = case["n_global"]
    feats = list(zip(_numbered(named, "g"), _numbered(named, "l"), strict=True))
    grids = _numbered(named, "grid")
    return feats[:vg], grids[:vg], feats[vg:] or None, grids[vg:] or None


def _vicregl_kwargs(case):
    kw = dict(case["kwargs"])
    if "num_matches" in kw:
        kw["num_matches"] = tuple(kw["num_matches"])
    return kw


def _extra_call(case):
    kw = dict(case["kwargs"])
    loss = case["loss"]
    if loss == "vicregl":
        kw = _vicregl_kwargs(case)
        return lambda n: S.vicregl_loss(*_vicregl_views(case, n), **kw)
    if loss in ("detcon_b", "detcon_s"):
        fn = S.detcon_b_loss if loss == "detcon_b" else S.detcon_s_loss
        views = [k for k in case["inputs"] if not k.startswith("mask")]
        return lambda n: fn(*(n[k] for k in views), n["mask_view0"].astype(jnp.int32),
                            n["mask_view1"].astype(jnp.int32), **kw)
    if loss in ("frossl", "emp_ssl"):
        fn = S.frossl_loss if loss == "frossl" else S.emp_ssl_loss
        return lambda n: fn(_numbered(n, "z"), **kw)
    fn = {"directclr": S.directclr_loss, "macl": S.macl_loss, "mmcr": S.mmcr_loss}[loss]
    return lambda n: fn(*(n[k] for k in case["inputs"]), **kw)


def _extra_terms(case):
    """``f(named) -> (terms, expected names)`` for the families whose parts lightly exposes:
    VICRegL's unweighted global terms and local loss (L2 + location), EMP-SSL's two terms."""
    if case["loss"] == "vicregl":
        kw = {k: v for k, v in _vicregl_kwargs(case).items() if k != "alpha"}

        def vicregl(n):
            t = S.vicregl_terms(*_vicregl_views(case, n), **kw)
            return [t.invariance, t.variance, t.covariance, t.local_l2 + t.local_location]

        return vicregl, ("invariance", "variance", "covariance", "local_loss")
    if case["loss"] == "emp_ssl":
        eps = case["kwargs"]["tcr_eps"]
        return (lambda n: list(S.emp_ssl_terms(_numbered(n, "z"), tcr_eps=eps)),
                ("coding_rate", "invariance"))
    return (lambda n: []), ()


@pytest.mark.parametrize("case", EXTRA, ids=[c["case"] for c in EXTRA])
def test_extra_value_grads_and_terms(case):
    """Value, gradients (except where ``skip_grads``: any subgradient is valid there) and,
    where lightly exposes them, the loss's parts; one compilation per case."""
    with jax.enable_x64(True):
        named = {n: jnp.asarray(golden_array(case, n)) for n in case["inputs"]}
        f = _extra_call(case)
        terms, term_names = _extra_terms(case)
        diff = {n: named[n] for n in case["grads"]}

        def loss_and_terms(d):
            full = {**named, **d}
            return f(full), terms(full)

        (loss, parts), grads = jax.jit(jax.value_and_grad(loss_and_terms, has_aux=True))(diff)
        assert loss.dtype == jnp.float64 and loss.shape == ()
        np.testing.assert_allclose(loss, golden_array(case, "loss"), rtol=RTOL, atol=1e-12)
        if not case.get("skip_grads"):
            expected = {n: golden_array(case, f"grad_{n}") for n in case["grads"]}
            assert_tree_close(grads, expected, rtol=RTOL, atol=scaled_atol(expected, RTOL))
        assert_tree_close(parts, [golden_array(case, n) for n in term_names], rtol=RTOL,
                          atol=1e-12)
