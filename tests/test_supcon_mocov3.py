"""SupCon (multi-positive SimCLR) and MoCo v3: independent float64 NumPy transcriptions of
the papers' formulas, closed forms on degenerate inputs, the NT-Xent equality, gradients,
dtypes and bad-input errors. (The distributed harness runs on both via the registry.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sslloss_jax as S

# jitted once (temperature traced): the parametrized cases share compilations
supcon = jax.jit(S.supcon_loss)
mocov3 = jax.jit(S.mocov3_loss)


def _normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_supcon(x, labels, tau):
    """Khosla et al. 2020, Eq. 2 (L_out), with loops; anchors without positives skipped."""
    z = _normalize(x)
    n = len(z)
    losses = []
    for i in range(n):
        others = [a for a in range(n) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        log_denom = np.log(sum(np.exp(z[i] @ z[a] / tau) for a in others))
        losses.append(-np.mean([z[i] @ z[p] / tau - log_denom for p in positives]))
    return float(np.mean(losses)) if losses else 0.0


def _numpy_mocov3(q, k, tau):
    """MoCo v3 Algorithm 1: 2τ · CE(q̂ k̂ᵀ/τ, arange(N))."""
    q, k = _normalize(q), _normalize(k)
    n = len(q)
    ce = [-(q[i] @ k[i] / tau) + np.log(sum(np.exp(q[i] @ k[j] / tau) for j in range(n)))
          for i in range(n)]
    return 2 * tau * float(np.mean(ce))


def _data(n=9, d=5, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((n, d)), dtype), rng


LABELINGS = {
    "pairs_and_singletons": np.array([0, 0, 1, 1, 1, 2, 3, 3, 4]),  # 2 and 4: no positive
    "single_class": np.zeros(9, np.int64),
    "random": np.random.default_rng(5).integers(0, 3, 9),
}


# ----------------------------------------------------------------------------- SupCon
@pytest.mark.parametrize("tau", [0.1, 0.5, -0.3])
@pytest.mark.parametrize("labeling", list(LABELINGS))
def test_supcon_matches_numpy_reference(labeling, tau):
    labels = LABELINGS[labeling]
    x, _ = _data()
    np.testing.assert_allclose(supcon(x, jnp.asarray(labels, jnp.int32), temperature=tau),
                               _numpy_supcon(x, labels, tau), rtol=2e-5)
    with jax.enable_x64(True):
        x64, _ = _data(dtype=np.float64)
        np.testing.assert_allclose(
            supcon(x64, jnp.asarray(labels, jnp.int32), temperature=tau),
            _numpy_supcon(x64, labels, tau), rtol=1e-12)


def _supcon_and_ntxent(z0, z1):
    """Both losses and their gradients (one compilation per dtype and shape)."""
    labels = jnp.tile(jnp.arange(z0.shape[0]), 2)
    sup = lambda z0, z1: S.supcon_loss(jnp.concatenate([z0, z1]), labels, temperature=0.3)
    nt = lambda z0, z1: S.ntxent_loss(z0, z1, temperature=0.3)
    return (jax.value_and_grad(sup, argnums=(0, 1))(z0, z1),
            jax.value_and_grad(nt, argnums=(0, 1))(z0, z1))


@pytest.mark.parametrize("b", [1, 6])
def test_supcon_two_views_equals_ntxent(b):
    """NT-Xent is SupCon on [z0; z1] with labels jnp.tile(arange(B), 2): values (and
    gradients) to 1e-6 in float32 and 1e-12 in float64."""
    rng = np.random.default_rng(b)
    a, c = rng.standard_normal((2, b, 7))
    for dtype, rtol in ((jnp.float32, 1e-6), (jnp.float64, 1e-12)):
        with jax.enable_x64(dtype == jnp.float64):
            (l_sup, g_sup), (l_nt, g_nt) = jax.jit(_supcon_and_ntxent)(
                jnp.asarray(a, dtype), jnp.asarray(c, dtype))
            assert l_sup.dtype == dtype
            np.testing.assert_allclose(l_sup, l_nt, rtol=rtol, atol=rtol)
            for gs, gn in zip(g_sup, g_nt):
                np.testing.assert_allclose(gs, gn, rtol=10 * rtol, atol=10 * rtol)


def test_supcon_gradients_float64():
    with jax.enable_x64(True):
        x, _ = _data(dtype=np.float64)
        labels = jnp.asarray(LABELINGS["pairs_and_singletons"])
        f = jax.jit(lambda x, t: S.supcon_loss(x, labels, temperature=t))
        check_grads(f, (x, 0.2), order=1, modes=("rev",), atol=1e-7, rtol=1e-7)


def test_supcon_closed_forms():
    x = jnp.ones((5, 3))
    # identical rows: every softmax is uniform over the N − 1 others
    np.testing.assert_allclose(supcon(x, jnp.zeros(5, jnp.int32)), np.log(4), rtol=1e-6)
    # anchors 0, 1 are positives of each other (1 of 2 others), anchor 2 has none and is
    # excluded from the mean: log 2, not (2/3)·log 2 as when it would count as 0
    np.testing.assert_allclose(supcon(x[:3], jnp.array([7, 7, 3])), np.log(2),
                               rtol=1e-6)


@pytest.mark.parametrize("labels", [np.arange(6), np.array([0])], ids=["all_distinct", "b1"])
def test_supcon_without_positives_is_zero_with_zero_gradients(labels):
    x, _ = _data(n=len(labels))
    f = jax.jit(jax.value_and_grad(lambda x: S.supcon_loss(x, jnp.asarray(labels))))
    loss, grad = f(x)
    assert loss == 0.0 and loss.dtype == jnp.float32
    np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_supcon_view_major_multiview_layout():
    """V views of B images, view-major, labels jnp.tile(arange(B), V): permuting the
    images consistently in every view leaves the loss unchanged; equals the reference."""
    v, b = 3, 4
    x, rng = _data(n=v * b)
    labels = jnp.tile(jnp.arange(b), v)
    loss = supcon(x, labels)
    np.testing.assert_allclose(loss, _numpy_supcon(x, np.asarray(labels), 0.1), rtol=2e-5)
    perm = rng.permutation(b)
    xp = x.reshape(v, b, -1)[:, perm].reshape(v * b, -1)
    np.testing.assert_allclose(supcon(xp, labels), loss, rtol=1e-6)


# ----------------------------------------------------------------------------- MoCo v3
@pytest.mark.parametrize("tau", [0.2, 1.0, -0.5])
def test_mocov3_matches_numpy_reference(tau):
    q, rng = _data(n=7)
    k = q + 0.5 * jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    np.testing.assert_allclose(mocov3(q, k, temperature=tau), _numpy_mocov3(q, k, tau),
                               rtol=2e-5)
    with jax.enable_x64(True):
        q64, k64 = jnp.asarray(q, jnp.float64), jnp.asarray(k, jnp.float64)
        np.testing.assert_allclose(mocov3(q64, k64, temperature=tau),
                                   _numpy_mocov3(q64, k64, tau), rtol=1e-12)


def test_mocov3_gradients_float64_and_keys_are_stop_gradient():
    with jax.enable_x64(True):
        q, rng = _data(n=6, dtype=np.float64)
        k = jnp.asarray(rng.standard_normal(q.shape))
        f = jax.jit(lambda q, t: S.mocov3_loss(q, k, temperature=t))
        check_grads(f, (q, 0.2), order=1, modes=("rev",), atol=1e-7, rtol=1e-7)
        gk = jax.jit(jax.grad(lambda k: S.mocov3_loss(q, k)))(k)
        np.testing.assert_array_equal(gk, np.zeros_like(gk))


def test_mocov3_closed_forms():
    q, _ = _data(n=5)
    # every key identical: uniform softmax, CE = log N, loss = 2τ log N
    k = jnp.ones_like(q)
    np.testing.assert_allclose(mocov3(q, k, temperature=0.2), 0.4 * np.log(5), rtol=1e-6)
    # one query: its only key is the positive, CE = 0
    np.testing.assert_allclose(mocov3(q[:1], -q[:1]), 0.0, atol=1e-7)


def test_mocov3_symmetric_recipe():
    """The symmetric MoCo v3 loss of the docstring is the sum of the two directions."""
    x, rng = _data(n=6)
    q1, q2, k1, k2 = (x + 0.3 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
                      for _ in range(4))
    total = mocov3(q1, k2) + mocov3(q2, k1)
    np.testing.assert_allclose(total, _numpy_mocov3(q1, k2, 0.2) + _numpy_mocov3(q2, k1, 0.2),
                               rtol=2e-5)


# ----------------------------------------------------------------------------- both
def _both(x, labels):
    return (S.supcon_loss(x, labels, temperature=0.2),
            S.mocov3_loss(x[:4], x[4:], temperature=0.2))


def test_jit_matches_eager():
    x, _ = _data(n=8)
    labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 4])
    np.testing.assert_allclose(jax.jit(_both)(x, labels), _both(x, labels), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_give_finite_float32_losses(dtype):
    x, _ = _data(n=8)
    labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 4])
    ref = _both(x, labels)
    for loss, r in zip(jax.jit(_both)(x.astype(dtype), labels), ref):
        assert loss.dtype == jnp.float32 and np.isfinite(loss)
        np.testing.assert_allclose(loss, r, rtol=2e-2)


def test_bad_inputs():
    x, _ = _data(n=6, d=4)
    labels = jnp.arange(6) % 3
    with pytest.raises(TypeError, match="labels must have an integer dtype.*float32"):
        S.supcon_loss(x, labels.astype(jnp.float32))
    with pytest.raises(TypeError, match="labels must be an array, got a list"):
        S.supcon_loss(x, [0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\).*got \(5,\)"):
        S.supcon_loss(x, labels[:5])
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\).*got \(6, 1\)"):
        S.supcon_loss(x, labels[:, None])
    with pytest.raises(ValueError, match=r"embeddings must have rank 2, got shape \(2, 3, 4\)"):
        S.supcon_loss(x.reshape(2, 3, 4), labels)
    with pytest.raises(TypeError, match="embeddings must have a floating dtype.*int32"):
        S.supcon_loss(labels[:, None] * jnp.ones((1, 4), jnp.int32), labels)
    with pytest.raises(ValueError, match="Illegal temperature"):
        S.supcon_loss(x, labels, temperature=0.0)
    with pytest.raises(ValueError, match=r"query and key must have the same shape.*\(6, 4\).*"
                       r"\(5, 4\)"):
        S.mocov3_loss(x, x[:5])
    with pytest.raises(ValueError, match="key must have rank 2"):
        S.mocov3_loss(x, x[0])
    with pytest.raises(TypeError, match="query must have a floating dtype"):
        S.mocov3_loss(x.astype(jnp.int32), x)
    with pytest.raises(ValueError, match="Illegal temperature"):
        S.mocov3_loss(x, x, temperature=-1e-9)
    with pytest.raises(ValueError, match="temperature must be a scalar"):
        jax.jit(lambda t: S.mocov3_loss(x, x, temperature=t))(jnp.ones(2))
