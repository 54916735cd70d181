"""Sinkhorn and SwaV: float64 parity with lightly, stability where lightly overflows,
marginals, masking, the queue and its switch-on without retracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sslloss_jax as S
from sslloss_jax import _clustering as C
from tests._harness import concatenations


def _r(seed, shape, dtype=np.float64):
    return np.random.RandomState(seed).standard_normal(shape).astype(dtype)


def _numpy_sinkhorn(out, iterations=3, eps=0.05):
    """lightly's algorithm in float64."""
    q = np.exp(out / eps).T
    q /= q.sum()
    b = q.shape[1]
    for _ in range(iterations):
        q /= q.sum(1, keepdims=True)
        q /= q.sum(0, keepdims=True)
        q /= b
    return (q * b).T


# lightly 1.6.0 SwaVLoss in float64 on the §5 inputs (s12-s17), computed with
#   T = lambda s, sh: torch.tensor(np.random.RandomState(s).standard_normal(sh))
#   h = [T(12, (6, 5)), T(13, (6, 5))]; l = [T(14, (6, 5)), T(15, (6, 5))]
#   q = [T(16, (4, 5)), T(17, (4, 5))]
#   SwaVLoss()(h, []), SwaVLoss()(h, l), SwaVLoss()(h, l, q)
# (lightly's float32 values in reference/lightly.md §5, 15.943147 / 10.924601 / 10.711697,
# are 0.14 % off: its unshifted float32 Sinkhorn loses the small codes to underflow.)
LIGHTLY_F64 = [15.920565642985625, 10.907155051654655, 10.694701721213509]


@pytest.mark.parametrize("stable", [True, False])
def test_swav_float64_parity_with_lightly(stable):
    h, low, q = [_r(12, (6, 5)), _r(13, (6, 5))], [_r(14, (6, 5)), _r(15, (6, 5))], [
        _r(16, (4, 5)), _r(17, (4, 5))]
    with jax.enable_x64(True):
        got = [S.swav_loss(h, lo, qu, stable_sinkhorn=stable)
               for lo, qu in (([], None), (low, None), (low, q))]
    np.testing.assert_allclose(got, LIGHTLY_F64, rtol=1e-12)


@pytest.mark.parametrize("iterations", [0, 1, 3, 10])
def test_sinkhorn_matches_lightly_algorithm(iterations):
    x = _r(0, (7, 4))
    with jax.enable_x64(True):
        for stable in (True, False):
            np.testing.assert_allclose(
                S.sinkhorn(x, iterations=iterations, stable=stable),
                _numpy_sinkhorn(x, iterations), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("scale", [1.0, 20.0], ids=["scaling_path", "log_domain_path"])
def test_sinkhorn_float32_paths_match_float64_reference(scale):
    """float32: a small score range takes the shifted multiplicative path, a range beyond
    float32's exponent takes the log domain; both equal lightly's algorithm in float64."""
    x = _r(5, (3, 9, 6)) * scale * 0.05  # S/ε spans ~6 or ~120
    stacked = C._sinkhorn(jnp.asarray(x / 0.05, jnp.float32), jnp.zeros((6,), jnp.float32),
                          None, 3, True, None)
    for i in range(3):
        expected = _numpy_sinkhorn(x[i])
        np.testing.assert_allclose(S.sinkhorn(x[i].astype(np.float32)), expected, rtol=2e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(stacked[i], expected, rtol=2e-4, atol=1e-6)


def test_sinkhorn_paths_agree_and_stay_bounded_over_many_rounds():
    logits = jnp.asarray(_r(6, (10, 4)) * 3, jnp.float32)
    log_r = jnp.log(jnp.asarray([[1.0, 2.0, 3.0, 6.0]]) / 3.0)
    for rounds in (1, 7, 400):  # the scalings must not drift to inf/0 over many rounds
        a = C._sinkhorn_scaling(logits - jnp.max(logits), log_r, jnp.float32(10), None, rounds,
                                None, 10)
        b = C._sinkhorn_log(logits, log_r, jnp.float32(10), None, rounds, None, 10)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_sinkhorn_marginals_and_valid_rows():
    x = _r(1, (12, 3))
    r = np.array([1.0, 2.0, 5.0])
    q = np.asarray(S.sinkhorn(x, iterations=500, epsilon=0.5, prototype_marginals=r), np.float64)
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(q.sum(0) / q.sum(), r / r.sum(), rtol=1e-3)
    valid = np.arange(12) < 9
    qm = S.sinkhorn(x, iterations=5, valid=valid)
    assert np.all(np.asarray(qm)[~valid] == 0)
    np.testing.assert_allclose(qm[:9], S.sinkhorn(x[:9], iterations=5), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_swav_does_not_overflow_where_lightly_does(dtype):
    """Cosine scores / ε = 20 / 0.05... with τ-scaled scores of 1/τ = 10: exp overflows."""
    h = [10 * x / np.linalg.norm(x, axis=1, keepdims=True) for x in (_r(3, (8, 6)), _r(4, (8, 6)))]
    h = [jnp.asarray(x, dtype) for x in h]
    loss, g = jax.value_and_grad(lambda a, b: S.swav_loss([a, b]), argnums=(0, 1))(*h)
    assert np.isfinite(loss) and all(np.all(np.isfinite(np.asarray(gi, np.float32))) for gi in g)
    assert not np.isfinite(S.swav_loss(h, stable_sinkhorn=False))  # lightly's algorithm


def test_swav_gradient_is_cross_entropy_with_frozen_codes():
    with jax.enable_x64(True):
        h0, h1, l0 = _r(5, (6, 4)), _r(6, (6, 4)), _r(7, (6, 4))
        codes = [S.sinkhorn(h0), S.sinkhorn(h1)]

        def frozen(h0, h1, l0):
            ce = lambda z, q: -jnp.mean(jnp.sum(q * jax.nn.log_softmax(z / 0.1, axis=1), 1))
            return (ce(h1, codes[0]) + ce(l0, codes[0]) + ce(h0, codes[1]) + ce(l0, codes[1])) / 4

        check_grads(frozen, (h0, h1, l0), order=1, modes=("rev",))
        g = jax.grad(lambda a, b, c: S.swav_loss([a, b], [c]), argnums=(0, 1, 2))(h0, h1, l0)
        g_ref = jax.grad(frozen, argnums=(0, 1, 2))(h0, h1, l0)
        for gi, ri in zip(g, g_ref):
            np.testing.assert_allclose(gi, ri, rtol=1e-10, atol=1e-12)


def test_swav_list_crops_are_never_stacked_and_equal_the_stacked_call():
    """Crops given as lists stay blocks: no concatenation of the low-resolution crops
    (forward or backward); the values and gradients are the stacked call's."""
    high = [_r(20 + i, (6, 5)) for i in range(2)]
    low = [_r(30 + i, (6, 5)) for i in range(3)]
    step = jax.value_and_grad(lambda h, lo: S.swav_loss(h, lo), argnums=(0, 1))
    value, (g_high, g_low) = step(high, low)
    value_st, (g_high_st, g_low_st) = step(np.stack(high), np.stack(low))
    np.testing.assert_allclose(value, value_st, rtol=1e-6)
    np.testing.assert_allclose(np.stack(g_high), g_high_st, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.stack(g_low), g_low_st, rtol=1e-5, atol=1e-7)
    concats = concatenations(step, high, low)
    assert not [c for c in concats if c.startswith("tensor<3x6x5x")], concats


def test_queue_recipe_switches_on_without_retracing():
    """Score the queued features with the current prototypes; use them once the queue
    is full (a traced flag), with one compiled step for the whole run."""
    dim, k, b = 4, 6, 8
    protos = jnp.asarray(_r(8, (k, dim), np.float32))
    state = S.init_swav_queue(2, 16, dim)
    traces = []

    @jax.jit
    def step(state, f0, f1):
        traces.append(1)
        feats = jnp.stack([f0, f1])
        queue_scores = state.features @ protos.T  # (2, Q, K)
        loss = S.swav_loss(list(feats @ protos.T), [], queue_scores,
                           queue_valid=state.filled >= state.features.shape[1])
        return loss, S.swav_queue_update(state, feats)

    losses = []
    for i in range(4):
        f = [jnp.asarray(_r(20 + 2 * i + j, (b, dim), np.float32)) for j in range(2)]
        loss, state = step(state, *f)
        losses.append(float(loss))
        if i < 2:  # queue not full yet: same as no queue
            np.testing.assert_allclose(loss, S.swav_loss([x @ protos.T for x in f]), rtol=1e-5)
    assert len(traces) == 1 and int(state.filled) == 16
    assert losses[2] != pytest.approx(float(S.swav_loss(
        [jnp.asarray(_r(24 + j, (b, dim), np.float32)) @ protos.T for j in range(2)])))


def test_swav_errors():
    h = [_r(0, (4, 3)), _r(1, (4, 3))]
    with pytest.raises(ValueError, match="at least two crops"):
        S.swav_loss(h[:1])
    with pytest.raises(ValueError, match=r"low_resolution_outputs views must have shape \(4, 3\)"):
        S.swav_loss(h, [_r(2, (4, 5))])
    with pytest.raises(ValueError, match="queue_outputs must hold 2 arrays"):
        S.swav_loss(h, [], [_r(3, (5, 3))])
    with pytest.raises(ValueError, match="iterations must be an int >= 0"):
        S.sinkhorn(h[0], iterations=-1)
    with pytest.raises(ValueError, match="epsilon must be positive"):
        S.sinkhorn(h[0], epsilon=-0.1)


def _msn_inputs():
    return _r(9, (12, 8), np.float32), _r(10, (6, 8), np.float32), _r(11, (5, 8), np.float32)


def test_msn_pmsn_lightly_values_and_layouts():
    a, t, p = _msn_inputs()
    np.testing.assert_allclose(
        [S.msn_loss(a, t, p), S.msn_loss(a, t, p, sinkhorn_iterations=0), S.pmsn_loss(a, t, p)],
        [5.208570, 4.633255, 5.269849], rtol=1e-5)
    np.testing.assert_allclose(S.msn_loss([a[:6], a[6:]], t, p), S.msn_loss(a, t, p), rtol=1e-6)
    custom = S.pmsn_custom_loss(a, t, p, target_distribution=lambda m: S.power_law_distribution(5))
    np.testing.assert_allclose(custom, S.pmsn_loss(a, t, p), rtol=1e-6)


def test_pmsn_regularizer_by_hand():
    """PMSN reg of ā = [0.1, 0.3, 0.6] against a power law of exponent 0.25 (lightly)."""
    from sslloss_jax._clustering import _kl_to_target

    pi = np.arange(1, 4) ** -0.25
    pi = pi / pi.sum()
    ref = np.sum(pi * np.log(pi / np.array([0.1, 0.3, 0.6])))
    np.testing.assert_allclose(
        _kl_to_target(S.power_law_distribution(3, 0.25), jnp.array([0.1, 0.3, 0.6])), ref,
        rtol=1e-6)


def test_msn_targets_get_no_gradient_and_entropy_term():
    a, t, p = _msn_inputs()
    g = jax.grad(lambda a, t, p: S.msn_loss(a, t, p), argnums=(0, 1, 2))(a, t, p)
    assert np.all(g[1] == 0) and np.any(g[0] != 0) and np.any(g[2] != 0)
    probs = jax.nn.softmax((a / np.linalg.norm(a, axis=1, keepdims=True))
                           @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T / 0.1, axis=1)
    entropy = -np.mean(np.sum(probs * np.log(probs), 1))
    np.testing.assert_allclose(S.msn_loss(a, t, p, entropy_weight=0.5) - S.msn_loss(a, t, p),
                               0.5 * entropy, rtol=1e-4)


def test_msn_errors():
    a, t, p = _msn_inputs()
    with pytest.raises(ValueError, match="whole number of views"):
        S.msn_loss(a[:10], t, p)
    with pytest.raises(ValueError, match="temperature must be positive"):
        S.msn_loss(a, t, p, temperature=-0.1)
    with pytest.raises(ValueError, match="sinkhorn_iterations must be an int >= 0"):
        S.msn_loss(a, t, p, sinkhorn_iterations=-1)
    with pytest.raises(TypeError, match="target_distribution must be callable"):
        S.pmsn_custom_loss(a, t, p, target_distribution=None)


def test_capi_lightly_values_teacher_detached_and_errors():
    t, s = _r(7, (2, 5, 8), np.float32), _r(8, (2, 5, 8), np.float32)
    idx = np.array([[0, 2, 4], [1, 3, 4]])
    np.testing.assert_allclose([S.capi_loss(t, s), S.capi_loss(t, s[:, :3], idx)],
                               [14.744049, 15.367993], rtol=1e-6)
    g_t, g_s = jax.grad(S.capi_loss, argnums=(0, 1))(t, s)
    assert np.all(g_t == 0) and np.any(g_s != 0)
    with pytest.raises(ValueError, match="token counts must match"):
        S.capi_loss(t, s[:, :3])
    with pytest.raises(TypeError, match="teacher_index must be integer"):
        S.capi_loss(t, s[:, :3], idx.astype(np.float32))


@pytest.mark.parametrize("iterations", [0, 1, 3])
@pytest.mark.parametrize("lead", [(), (3,)])
def test_blocked_scaling_sinkhorn_equals_dense(iterations, lead, monkeypatch):
    """The row-block sweeps (no exp array) against the dense scaling algorithm in float64:
    two parts, invalid rows holding inf and NaN, a problem axis or none, 0-3 rounds,
    codes of the first part's rows only."""
    rng = np.random.default_rng(iterations)
    with jax.enable_x64(True):
        parts = (jnp.asarray(rng.standard_normal(lead + (7, 6))),
                 jnp.asarray(rng.standard_normal(lead + (9, 6))))
        valid = np.ones(lead + (16,), bool)
        valid[..., [2, 10, 11]] = False
        parts = (parts[0].at[..., 2, 0].set(jnp.inf), parts[1].at[..., 3, 1].set(jnp.nan))
        log_r = jnp.asarray(np.log(rng.uniform(0.5, 2.0, 6)))
        args = (log_r, jnp.asarray(valid), iterations, True, None)
        dense = C._sinkhorn(parts, *args, rows=5, scale=jnp.asarray(4.0))
        monkeypatch.setattr(C, "_BLOCKED_BYTES", 0)
        monkeypatch.setattr(C, "_BLOCK_BYTES", 2 * 6 * 8)  # 2-row blocks
        blocked = jax.jit(lambda p: C._sinkhorn(p, *args, rows=5, scale=jnp.asarray(4.0)))(
            parts)
        assert np.all(np.isfinite(blocked))
        np.testing.assert_allclose(blocked, dense, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("blocked", [False, True], ids=["dense", "row_blocks"])
@pytest.mark.parametrize("scale", [0.1, 40.0], ids=["scaling_path", "log_domain_path"])
@pytest.mark.parametrize("partial", [False, True])
def test_swav_queue_blocks_equal_sinkhorn_of_the_concatenation(scale, partial, blocked,
                                                               monkeypatch):
    """The queue enters the Sinkhorn as a second block of rows (never concatenated
    outside its branches); with or without invalid queue rows, on both Sinkhorn paths
    (float32), the loss is that of the codes of the concatenated scores. ``row_blocks``:
    the scaling path in sweeps over 4-row blocks (a scan and a remainder per part)."""
    if blocked:
        monkeypatch.setattr(C, "_BLOCKED_BYTES", 0)
        monkeypatch.setattr(C, "_BLOCK_BYTES", 4 * 5 * 4)
    h = [jnp.asarray(_r(20 + i, (6, 5)) * scale, jnp.float32) for i in range(2)]
    low = [jnp.asarray(_r(22, (6, 5)) * scale, jnp.float32)]
    q = [jnp.asarray(_r(23 + i, (4, 5)) * scale, jnp.float32) for i in range(2)]
    valid_q = np.array([True, False, True, True]) if partial else np.ones(4, bool)
    got = S.swav_loss(h, low, q, queue_valid=jnp.asarray(valid_q) if partial else None)
    valid = np.concatenate([np.ones(6, bool), valid_q])
    codes = [S.sinkhorn(jnp.concatenate([hv, qv]), valid=jnp.asarray(valid))[:6]
             for hv, qv in zip(h, q)]
    ce = lambda z, c: -jnp.mean(jnp.sum(c * jax.nn.log_softmax(z / 0.1, axis=1), 1))  # noqa: E731
    want = (ce(h[1], codes[0]) + ce(low[0], codes[0]) + ce(h[0], codes[1])
            + ce(low[0], codes[1])) / 4
    np.testing.assert_allclose(got, want, rtol=2e-5)
