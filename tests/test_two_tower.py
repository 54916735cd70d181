"""CLIP and SigLIP two-tower losses: independent float64 NumPy transcriptions of the papers'
formulas, closed forms, learnable scale / bias gradients (also under shard_map), dtypes and
bad-input errors. (The generic and distributed harness tests run on both via the registry.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import sslloss_jax as S
from tests._harness import assert_tree_close, make_mesh

clip = jax.jit(S.clip_loss, static_argnames="normalize")
siglip = jax.jit(S.siglip_loss, static_argnames="normalize")


def _normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_clip(a, b, scale, normalize=True):
    """CLIP Figure 3: (CE over rows + CE over columns) / 2, with loops."""
    a, b = (_normalize(a), _normalize(b)) if normalize else (np.float64(a), np.float64(b))
    n = len(a)
    logits = scale * a @ b.T
    rows = [np.log(sum(np.exp(logits[i, j]) for j in range(n))) - logits[i, i]
            for i in range(n)]
    cols = [np.log(sum(np.exp(logits[j, i]) for j in range(n))) - logits[i, i]
            for i in range(n)]
    return (np.mean(rows) + np.mean(cols)) / 2


def _numpy_siglip(a, b, t, bias, normalize=True):
    """SigLIP Algorithm 1: −Σ_ij log σ(y_ij (e^t ⟨a_i, b_j⟩ + b)) / N, and dL/dt, dL/db."""
    a, b = (_normalize(a), _normalize(b)) if normalize else (np.float64(a), np.float64(b))
    n = len(a)
    loss = dt = db = 0.0
    for i in range(n):
        for j in range(n):
            y = 1.0 if i == j else -1.0
            logit = np.exp(t) * (a[i] @ b[j]) + bias
            loss += np.logaddexp(0.0, -y * logit) / n  # −log σ(y·logit)
            dlogit = -y / (1.0 + np.exp(y * logit)) / n  # d(−log σ(y x))/dx = −y σ(−y x)
            dt += dlogit * np.exp(t) * (a[i] @ b[j])
            db += dlogit
    return loss, dt, db


def _towers(n=6, d=5, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d))
    b = a + 0.7 * rng.standard_normal((n, d))
    return jnp.asarray(a, dtype), jnp.asarray(b, dtype)


# ----------------------------------------------------------------------------- CLIP
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tau", [0.07, 0.5, -1.0])
def test_clip_matches_numpy_reference(tau, normalize):
    a, b = _towers()
    ref = _numpy_clip(a, b, 1 / tau, normalize)
    np.testing.assert_allclose(clip(a, b, temperature=tau, normalize=normalize), ref, rtol=2e-5)
    np.testing.assert_allclose(clip(a, b, logit_scale=1 / tau, normalize=normalize), ref,
                               rtol=2e-5)
    with jax.enable_x64(True):
        a64, b64 = _towers(dtype=np.float64)
        np.testing.assert_allclose(clip(a64, b64, temperature=tau, normalize=normalize),
                                   _numpy_clip(a64, b64, 1 / tau, normalize), rtol=1e-12)


def test_clip_default_is_temperature_007():
    a, b = _towers()
    np.testing.assert_allclose(clip(a, b), clip(a, b, temperature=0.07), rtol=1e-7)
    np.testing.assert_allclose(clip(a, b), _numpy_clip(a, b, 1 / 0.07), rtol=2e-5)


def test_clip_gradients_float64_including_logit_scale():
    with jax.enable_x64(True):
        a, b = _towers(dtype=np.float64)
        f = jax.jit(lambda a, b, s: S.clip_loss(a, b, logit_scale=s))
        check_grads(f, (a, b, 7.0), order=1, modes=("rev",), atol=1e-7, rtol=1e-7)
        f = jax.jit(lambda a, b, t: S.clip_loss(a, b, temperature=t))
        check_grads(f, (a, b, 0.3), order=1, modes=("rev",), atol=1e-7, rtol=1e-7)


def test_clip_closed_forms():
    n = 4
    # all rows identical: every logit equal, both CEs are log N
    x = jnp.ones((n, 3))
    np.testing.assert_allclose(clip(x, 2 * x, temperature=0.1), np.log(n), rtol=1e-6)
    # orthonormal pairs a = b = I: L = s·I, CE = log(e^s + N − 1) − s in both directions
    eye = jnp.eye(n)
    np.testing.assert_allclose(clip(eye, eye, logit_scale=3.0),
                               np.log(np.exp(3.0) + n - 1) - 3.0, rtol=1e-5)
    # one pair: the only column is the positive
    np.testing.assert_allclose(clip(x[:1], -x[:1]), 0.0, atol=1e-7)


# ----------------------------------------------------------------------------- SigLIP
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("t,bias", [(np.log(10.0), -10.0), (1.0, 0.5), (-0.5, 2.0)])
def test_siglip_matches_numpy_reference_value_and_t_b_gradients(t, bias, normalize):
    a, b = _towers()
    ref, dt, db = _numpy_siglip(a, b, t, bias, normalize)
    loss, (gt, gb) = jax.jit(jax.value_and_grad(
        lambda a, b, t, bias: S.siglip_loss(a, b, t=t, b=bias, normalize=normalize),
        argnums=(2, 3)))(a, b, jnp.float32(t), jnp.float32(bias))
    np.testing.assert_allclose(loss, ref, rtol=2e-5)
    np.testing.assert_allclose([gt, gb], [dt, db], rtol=1e-4, atol=1e-6)
    with jax.enable_x64(True):
        a64, b64 = _towers(dtype=np.float64)
        np.testing.assert_allclose(siglip(a64, b64, t=t, b=bias, normalize=normalize),
                                   _numpy_siglip(a64, b64, t, bias, normalize)[0], rtol=1e-12)


def test_siglip_defaults_are_big_vision_init():
    a, b = _towers()
    np.testing.assert_allclose(siglip(a, b), siglip(a, b, t=np.log(10.0), b=-10.0), rtol=1e-7)


def test_siglip_gradients_float64_including_t_and_b():
    with jax.enable_x64(True):
        a, b = _towers(dtype=np.float64)
        f = jax.jit(lambda a, b, t, bias: S.siglip_loss(a, b, t=t, b=bias))
        check_grads(f, (a, b, 1.5, -3.0), order=1, modes=("rev",), atol=1e-7, rtol=1e-7)


def test_siglip_closed_forms():
    n = 5
    # one pair with a = b: logit = e^t + b = 10 − 10 = 0 at the defaults, loss = log 2
    x = jnp.ones((1, 3))
    np.testing.assert_allclose(siglip(x, x), np.log(2.0), rtol=1e-6)
    # zero embeddings: every logit is b; per row one positive and N − 1 negatives
    z = jnp.zeros((n, 3))
    expected = np.logaddexp(0, 10.0) + (n - 1) * np.logaddexp(0, -10.0)
    np.testing.assert_allclose(siglip(z, z), expected, rtol=1e-6)


# ----------------------------------------------------------------------------- both
def _sharded_param_grads(loss, a, b, params, n=4):
    """value_and_grad w.r.t. (z_a, z_b, params) inside shard_map (replicated params)."""
    mesh = make_mesh(n)

    def step(a, b, params):
        return jax.value_and_grad(lambda *args: loss(*args, axis_name="data"),
                                  argnums=(0, 1, 2))(a, b, params)

    fn = jax.shard_map(step, mesh=mesh, in_specs=(P("data"), P("data"), P()),
                       out_specs=(P(), (P("data"), P("data"), P())))
    return jax.jit(fn)(a, b, params)


LEARNABLE = {
    "clip_logit_scale": lambda a, b, p, axis_name=None: S.clip_loss(
        a, b, logit_scale=p["s"], axis_name=axis_name),
    "siglip_t_b": lambda a, b, p, axis_name=None: S.siglip_loss(
        a, b, t=p["t"], b=p["b"], axis_name=axis_name),
}


@pytest.mark.parametrize("name", list(LEARNABLE))
def test_learnable_scale_and_bias_gradients_are_exact_under_shard_map(name):
    """The gradients of the learnable scalars (replicated) and of both towers equal those of
    one device holding the global batch."""
    a, b = _towers(n=8)
    params = {"s": jnp.float32(10.0), "t": jnp.float32(1.2), "b": jnp.float32(-4.0)}
    loss = LEARNABLE[name]
    expected = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(a, b, params)
    actual = _sharded_param_grads(loss, a, b, params)
    assert_tree_close(actual, expected, rtol=1e-5, atol=1e-6)
    learned = ("s",) if name.startswith("clip") else ("t", "b")
    assert all(abs(float(expected[1][2][k])) > 1e-4 for k in learned)  # not trivially 0


def _both(a, b):
    return S.clip_loss(a, b, temperature=0.1), S.siglip_loss(a, b)


def test_jit_matches_eager_and_traced_scale_does_not_retrace():
    a, b = _towers()
    np.testing.assert_allclose(jax.jit(_both)(a, b), _both(a, b), rtol=1e-5, atol=1e-7)
    traces = []

    @jax.jit
    def f(s, t, bias):
        traces.append(1)
        return S.clip_loss(a, b, logit_scale=s), S.siglip_loss(a, b, t=t, b=bias)

    out1, out2 = f(10.0, 1.0, -5.0), f(20.0, 2.0, -3.0)
    assert len(traces) == 1 and not np.allclose(out1, out2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_give_finite_float32_losses(dtype):
    a, b = _towers()
    ref = jax.jit(_both)(a, b)
    losses = jax.jit(_both)(a.astype(dtype), b.astype(dtype))
    for loss, r in zip(losses, ref):
        assert loss.dtype == jnp.float32 and np.isfinite(loss)
        np.testing.assert_allclose(loss, r, rtol=2e-2)
    # a float32 learnable scale with half-precision towers: float32 gradient, finite
    g = jax.jit(jax.grad(lambda s: S.clip_loss(a.astype(dtype), b, logit_scale=s)))(
        jnp.float32(10.0))
    assert g.dtype == jnp.float32 and np.isfinite(g)


def test_bad_inputs():
    a, b = _towers(n=6, d=4)
    with pytest.raises(ValueError, match="exactly one of temperature or logit_scale"):
        S.clip_loss(a, b, temperature=0.1, logit_scale=10.0)
    with pytest.raises(ValueError, match="Illegal temperature"):
        S.clip_loss(a, b, temperature=0.0)
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        S.clip_loss(a, b, logit_scale=float("inf"))
    with pytest.raises(ValueError, match=r"logit_scale must be a scalar, got shape \(2,\)"):
        S.clip_loss(a, b, logit_scale=jnp.ones(2))
    with pytest.raises(ValueError, match="t must be finite"):
        S.siglip_loss(a, b, t=float("nan"))
    with pytest.raises(ValueError, match=r"b must be a scalar, got shape \(1,\)"):
        S.siglip_loss(a, b, b=jnp.ones(1))
    with pytest.raises(ValueError, match="t must be a scalar"):
        jax.jit(lambda t: S.siglip_loss(a, b, t=t))(jnp.ones(3))
    for fn in (S.clip_loss, S.siglip_loss):
        with pytest.raises(ValueError, match=r"z_a and z_b must have the same shape, got "
                           r"\(6, 4\) and \(5, 4\)"):
            fn(a, b[:5])
        with pytest.raises(ValueError, match=r"z_b must have rank 2, got shape \(4,\)"):
            fn(a, b[0])
        with pytest.raises(TypeError, match="z_a must have a floating dtype.*int32"):
            fn(a.astype(jnp.int32), b)
        with pytest.raises(TypeError, match="normalize must be a Python bool"):
            fn(a, b, normalize="yes")
