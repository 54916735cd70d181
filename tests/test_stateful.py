"""DINO (center, schedule), TiCo (covariance) and KoLeo: lightly's published values,
closed forms, state timing, input layouts, donation and schedules without retracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sslloss_jax as S
from tests._harness import concatenations


def _r(seed, shape):
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


TEACHER = [_r(2, (6, 8)), _r(3, (6, 8))]
STUDENT = [_r(4, (6, 8)), _r(5, (6, 8)), _r(6, (6, 8))]


def test_dino_lightly_values_over_two_calls_and_center():
    state = S.init_dino_state(8)
    l1, state = S.dino_loss(TEACHER, STUDENT, state)
    l2, state = S.dino_loss(TEACHER, STUDENT, state)
    np.testing.assert_allclose([l1, l2], [15.626847, 15.627824], rtol=1e-6)
    np.testing.assert_allclose(state.center[:3], [-0.115151, -0.022525, -0.082930], atol=1e-6)
    fresh, _ = S.dino_loss(TEACHER, STUDENT, S.init_dino_state(8), teacher_temp=0.07)
    np.testing.assert_allclose(fresh, 15.636403, rtol=1e-6)


@pytest.mark.parametrize("lists", [False, True])
def test_dino_wide_rows_path_equals_the_default_one(lists, monkeypatch):
    """The path of rows of 65536 or more (blocked row statistics, the teacher's softmax
    from them, the student's softmax recomputed in the backward pass), forced on K = 8:
    the same loss, center and student gradients as the default path (in float64, so the
    two paths agree to rounding whatever XLA's fusions)."""
    from sslloss_jax import _numerics

    f64 = lambda xs: [np.float64(x) for x in xs]  # noqa: E731
    teacher, student = ((f64(TEACHER), f64(STUDENT)) if lists
                        else (np.stack(f64(TEACHER)), np.stack(f64(STUDENT))))

    def run():
        state = S.DINOState(jnp.asarray(np.float64(_r(9, (8,)))))
        f = jax.jit(jax.value_and_grad(lambda s: S.dino_loss(teacher, s, state), has_aux=True))
        return f(jax.tree.map(jnp.asarray, student))

    with jax.enable_x64(True):
        want = run()
        monkeypatch.setattr(_numerics, "_WIDE_ROW", 8)
        monkeypatch.setattr(_numerics, "_ROW_BLOCK_BYTES", 4 * 8 * 8)  # 4-row blocks
        got = run()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_dino_center_is_read_before_and_updated_after():
    state = S.DINOState(jnp.asarray(_r(9, (8,))))
    loss, new = S.dino_loss(TEACHER, STUDENT, state, center_momentum=0.7)
    expected = 0.7 * state.center + 0.3 * np.mean(np.stack(TEACHER), axis=(0, 1))
    np.testing.assert_allclose(new.center, expected, rtol=1e-6)
    t = jax.nn.softmax((np.stack(TEACHER) - np.asarray(state.center)) / 0.04, axis=-1)
    s = jax.nn.log_softmax(np.stack(STUDENT) / 0.1, axis=-1)
    terms = [-(t[i] * s[j]).sum(-1).mean() for i in range(2) for j in range(3) if i != j]
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)


def test_dino_stacked_views_equal_lists_and_teacher_gets_no_gradient():
    state = S.init_dino_state(8)
    as_list = S.dino_loss(TEACHER, STUDENT, state)
    stacked = S.dino_loss(np.stack(TEACHER), np.stack(STUDENT), state)
    for a, b in zip(jax.tree.leaves(as_list), jax.tree.leaves(stacked)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    g_t, g_s = jax.grad(lambda t, s: S.dino_loss(t, s, state)[0], argnums=(0, 1))(
        np.stack(TEACHER), np.stack(STUDENT))
    assert np.all(g_t == 0) and np.any(g_s != 0)


def test_dino_list_views_are_never_stacked_and_get_their_own_gradients():
    """Views given as a list stay blocks: the student's are never concatenated (forward or
    backward), and each gets the stacked input's gradient row."""
    state = S.init_dino_state(8)
    step = jax.value_and_grad(lambda t, s: S.dino_loss(t, s, state)[0], argnums=1)
    value, grads = step(TEACHER, STUDENT)
    value_st, grad_st = step(np.stack(TEACHER), np.stack(STUDENT))
    np.testing.assert_allclose(value, value_st, rtol=1e-6)
    assert len(grads) == 3
    np.testing.assert_allclose(np.stack(grads), grad_st, rtol=1e-5, atol=1e-7)
    concats = concatenations(step, TEACHER, STUDENT)
    assert not [c for c in concats if c.startswith("tensor<3x6x8x")], concats
    assert [c for c in concats if c.startswith("tensor<2x6x8x")]  # the teacher's (probs)


@pytest.mark.parametrize("vt,vs", [(1, 1), (2, 1), (1, 2)])
def test_dino_view_counts(vt, vs):
    state = S.init_dino_state(8)
    if vt * vs - min(vt, vs) == 0:
        with pytest.raises(ValueError, match="at least two views"):
            S.dino_loss(TEACHER[:vt], STUDENT[:vs], state)
    else:
        assert np.isfinite(S.dino_loss(TEACHER[:vt], STUDENT[:vs], state)[0])


def test_dino_state_and_hyperparameter_errors():
    with pytest.raises(ValueError, match=r"state.center must have shape \(8,\)"):
        S.dino_loss(TEACHER, STUDENT, S.init_dino_state(5))
    with pytest.raises(ValueError, match="center_momentum must be in"):
        S.dino_loss(TEACHER, STUDENT, S.init_dino_state(8), center_momentum=1.5)
    with pytest.raises(ValueError, match="Illegal teacher_temp"):
        S.dino_loss(TEACHER, STUDENT, S.init_dino_state(8), teacher_temp=0.0)
    with pytest.raises(ValueError, match=r"same \(batch, K\) shape"):
        S.dino_loss(TEACHER, [x[:4] for x in STUDENT], S.init_dino_state(8))
    with pytest.raises(ValueError, match="output_dim must be a positive int"):
        S.init_dino_state(0)


def test_teacher_temperature_schedule():
    kw = dict(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=4)
    expected = list(np.linspace(0.04, 0.07, 4)) + [0.07, 0.07]
    got = [float(S.dino_teacher_temperature(e, **kw)) for e in range(6)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert float(S.dino_teacher_temperature(None, **kw)) == pytest.approx(0.07)
    assert float(S.dino_teacher_temperature(10)) == pytest.approx(0.04)  # lightly's defaults


def test_per_step_schedule_never_retraces_and_state_can_be_donated():
    traces = []

    @jax.jit
    def step(state, t, s, epoch):
        traces.append(1)
        temp = S.dino_teacher_temperature(epoch, teacher_temp=0.07,
                                          warmup_teacher_temp_epochs=30)
        return S.dino_loss(t, s, state, teacher_temp=temp)

    donating = jax.jit(step.__wrapped__, donate_argnums=0)
    state = S.init_dino_state(8)
    state_d = S.init_dino_state(8)
    for i in range(100):
        epoch = jnp.float32(i * 0.37)
        loss, state = step(state, TEACHER, STUDENT, epoch)
        loss_d, state_d = donating(state_d, TEACHER, STUDENT, epoch)
        assert float(loss) == float(loss_d)
    assert len(traces) <= 2  # at most one trace per jit wrapper, none per step
    np.testing.assert_allclose(state.center, state_d.center)


def test_tico_lightly_values_and_update_flag():
    x0, x1 = _r(0, (6, 8)), _r(1, (6, 8))
    state = S.init_tico_state(8)
    l1, state = S.tico_loss(x0, x1, state)
    l2, state2 = S.tico_loss(x0, x1, state)
    np.testing.assert_allclose([l1, l2], [0.941288, 1.130420], rtol=1e-6)
    _, frozen = S.tico_loss(x0, x1, state, update_covariance_matrix=False)
    assert frozen is state
    with pytest.raises(ValueError, match=r"covariance must have shape \(8, 8\)"):
        S.tico_loss(x0, x1, S.init_tico_state(4))


@pytest.mark.parametrize("x,expected", [
    ([[0.0, 1.0], [0.0, -1.0]], -np.log(2)),
    ([[0.0, 1.0], [1.0, 0.0]], -np.log(np.sqrt(2))),
    ([[0, 1], [1, 0], [1, 1], [-1, 0], [0, -1], [-1, -1]], 0.2674),
])
def test_koleo_closed_forms(x, expected):
    np.testing.assert_allclose(S.koleo_loss(np.asarray(x, np.float32)), expected, rtol=1e-4)


def test_koleo_lightly_value_and_batch_of_one_error():
    np.testing.assert_allclose(S.koleo_loss(_r(0, (6, 8))), 0.016602, rtol=1e-4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        S.koleo_loss(np.ones((1, 3), np.float32))


T3, S3 = _r(7, (2, 5, 8)), _r(8, (2, 5, 8))
M2 = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], bool)


def test_ibot_plus_plus_lightly_values_and_center_from_all_tokens():
    state = S.init_ibot_state(8)
    got = [S.ibot_plus_plus_patch_loss(T3, S3, state)[0],
           S.ibot_plus_plus_patch_loss(T3, S3, state, M2)[0],
           S.ibot_plus_plus_patch_loss(T3, S3, state, M2, visible_loss_weight=0.0)[0]]
    np.testing.assert_allclose(got, [15.578634, 31.582901, 16.855534], rtol=1e-6)
    _, new = S.ibot_plus_plus_patch_loss(T3, S3, state, M2)
    np.testing.assert_allclose(new.center, 0.1 * T3.reshape(-1, 8).mean(0), rtol=1e-5)
    hw = S.ibot_plus_plus_patch_loss(T3[:, :4], S3[:, :4], state, M2[:, :4].reshape(2, 2, 2))
    flat = S.ibot_plus_plus_patch_loss(T3[:, :4], S3[:, :4], state, M2[:, :4])
    np.testing.assert_allclose(hw[0], flat[0], rtol=1e-6)


@pytest.mark.parametrize("loss", ["ibot_patch_loss", "ibot_plus_plus_patch_loss"])
def test_ibot_blocked_path_values_and_gradients(loss, monkeypatch):
    """The path of large logits (the teacher's softmax from blocked row statistics, the
    student's cross entropy with them), forced on 2 x 5 x 8 tokens in blocks of 3 rows:
    lightly's values (as above) and the default path's values and gradients (in float64,
    so the two paths agree to rounding whatever XLA's fusions)."""
    from sslloss_jax import _numerics

    fn = getattr(S, loss)

    def step():
        state = S.IBOTState(jnp.asarray(np.float64(_r(9, (8,)))))
        args = (M2, state) if loss == "ibot_patch_loss" else (state, M2)
        return jax.jit(jax.value_and_grad(lambda s: fn(np.float64(T3), s, *args)[0]))(
            jnp.asarray(np.float64(S3)))

    with jax.enable_x64(True):
        want = step()
        monkeypatch.setattr(_numerics, "_BLOCKED_BYTES", 0)
        monkeypatch.setattr(_numerics, "_ROW_BLOCK_BYTES", 3 * 8 * 8)
        got = step()
    for a, b in zip(got, want, strict=True):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    if loss == "ibot_plus_plus_patch_loss":
        np.testing.assert_allclose(fn(T3, S3, S.init_ibot_state(8), M2)[0], 31.582901,
                                   rtol=2e-6)


def test_ibot_masked_tokens_only_with_per_image_normalization():
    state = S.init_ibot_state(8)
    loss, new = S.ibot_patch_loss(T3, S3, M2, state)
    np.testing.assert_allclose(loss, 16.855534, rtol=1e-6)  # = iBOT++ with w_vis = 0
    np.testing.assert_allclose(new.center, 0.1 * T3[M2].mean(0), rtol=1e-5)
    no_mask_image = M2.copy()
    no_mask_image[1] = False  # an image with no masked token still counts in B
    loss2, _ = S.ibot_patch_loss(T3, S3, no_mask_image, state)
    t = jax.nn.softmax(T3[0][M2[0]] / 0.04, axis=-1)
    s = jax.nn.log_softmax(S3[0][M2[0]] / 0.1, axis=-1)
    np.testing.assert_allclose(loss2, -np.sum(t * s) / 2 / 2, rtol=1e-5)
    none_masked, kept = S.ibot_patch_loss(T3, S3, np.zeros_like(M2), state)
    assert float(none_masked) == 0.0 and np.all(kept.center == state.center)
    g = jax.grad(lambda s: S.ibot_patch_loss(T3, s, M2, state)[0])(S3)
    assert np.all(np.asarray(g)[~M2] == 0)  # visible tokens get no gradient


def test_ibot_errors():
    state = S.init_ibot_state(8)
    with pytest.raises(ValueError, match="mask must have shape"):
        S.ibot_patch_loss(T3, S3, M2[:, :3], state)
    with pytest.raises(TypeError, match="mask must be boolean"):
        S.ibot_patch_loss(T3, S3, M2.astype(np.int32), state)
    with pytest.raises(ValueError, match=r"state.center must have shape \(8,\)"):
        S.ibot_patch_loss(T3, S3, M2, S.init_ibot_state(4))
