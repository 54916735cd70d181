"""W-MSE and its whitening: lightly parity (float64, recorded ``randperm`` draws; its §5
float32 value), running statistics and their update order, eval-mode whitening with the
running statistics, gradients, jit, keys and permutations, bad inputs, rank-deficient
sub-batches, half precision and distributed equivalence.

The float64 reference values were computed with lightly 1.6.0 (torch 2.13, CPU) by
``ORACLE_SCRIPT`` at the end of this file: copy its text into a file and run it with the
oracle venv's python (``$HOME/.cache/sslloss-oracle/venv/bin/python``). The suite itself
never imports torch.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from sslloss_jax._registry import Example, LossSpec
from sslloss_jax._whitening import WMSEState, init_wmse_state, whiten, wmse_loss
from tests._harness import assert_distributed_equivalent, assert_matches_reference, make_mesh


def _r(seed, shape, dtype=np.float64):
    return np.random.RandomState(seed).standard_normal(shape).astype(dtype)


def _f64_state(dim):
    return init_wmse_state(dim, jnp.float64)


def _assert_same_state(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _frozen(kw):
    return tuple(sorted((k, tuple(map(tuple, np.asarray(v))) if k == "permutations" else v)
                        for k, v in kw.items()))


@functools.cache
def _jitted_wmse(frozen):
    kw = dict(frozen)
    return jax.jit(lambda x, state, key: wmse_loss(x, state, key, **kw))


def _jwmse(x, state, key=None, **kw):
    """wmse_loss under jit, one compilation per configuration (op-by-op dispatch and
    recompiling identical programs dominate the run time of these small tests)."""
    return _jitted_wmse(_frozen(kw))(x, state, key)


def _jwhiten(x, state, **kw):
    return jax.jit(lambda x, state: whiten(x, state, **kw))(x, state)


def _value_dir_norm(x, state, direction, **kw):
    """(loss, new_state, ⟨∇loss, direction⟩, ‖∇loss‖) as the oracle script records them."""
    (loss, new), g = jax.jit(jax.value_and_grad(lambda x, state: wmse_loss(x, state, **kw),
                                                has_aux=True))(jnp.asarray(x), state)
    return float(loss), new, float(np.sum(np.asarray(g) * direction)), float(np.linalg.norm(g))


# ----------------------------------------------------------------------------- lightly parity
def test_lightly_published_float32_value():
    """reference/lightly.md §5: WMSE(emb=4, w_size=8), input seed 30, train mode."""
    x = _r(30, (16, 4), np.float32)
    loss, _ = jax.jit(lambda x: wmse_loss(x, init_wmse_state(4), embedding_dim=4, w_size=8))(x)
    np.testing.assert_allclose(loss, 2.514417886734009, rtol=1e-6)
    assert loss.dtype == jnp.float32


A_KW = dict(embedding_dim=3, w_size=6, w_iter=2, momentum=0.1)
A_PERMS = ([[8, 0, 5, 9, 7, 4, 2, 10, 3, 1, 11, 6], [2, 3, 11, 4, 1, 9, 6, 0, 5, 7, 8, 10]],
           [[11, 4, 6, 8, 9, 3, 1, 7, 2, 5, 0, 10], [0, 10, 7, 4, 11, 6, 1, 5, 3, 2, 8, 9]])
A_STATE = ([-0.02400683587468136, -0.17856017863926113, -0.07825260056960417],
           [[1.0302602158751455, 0.10566654862577479, 0.2841772297546148],
            [0.10566654862577479, 1.1576563336099883, -0.18112552735112733],
            [0.2841772297546148, -0.18112552735112733, 0.8009054898048462]])


def test_lightly_float64_two_training_steps_then_eval():
    """Two sub-batches, two iterations, lightly's recorded permutations: both training
    losses, their gradients, the running statistics after both steps, then eval mode
    (whitening with those running statistics) on a new batch."""
    with jax.enable_x64(True):
        direction = _r(42, (24, 3))
        state = _f64_state(3)
        got = []
        for seed, perms in zip((40, 41), A_PERMS):
            loss, state, d, norm = _value_dir_norm(_r(seed, (24, 3)), state, direction,
                                                   permutations=perms, **A_KW)
            got.append((loss, d, norm))
        np.testing.assert_allclose(got, [
            (1.3212266458983044, 0.048787848570141255, 0.7810754827855487),
            (1.6201616103276706, 0.5181876743836286, 0.6142729859250404)], rtol=1e-12)
        np.testing.assert_allclose(state.mean, A_STATE[0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(state.covariance, A_STATE[1], rtol=1e-12, atol=1e-15)
        # eval: no key needed, permutations irrelevant, state returned as it is
        loss, new, d, norm = _value_dir_norm(_r(43, (24, 3)), state, direction, train=False,
                                             **A_KW)
        np.testing.assert_allclose([loss, d, norm],
                                   [1.8103375574664167, -0.230981871762455, 0.42934809053993883],
                                   rtol=1e-12)
        _assert_same_state(new, state)


B_KW = dict(embedding_dim=2, w_size=4, num_samples=3, eps=0.2, momentum=0.3)


def test_lightly_float64_three_views_with_shrinkage():
    with jax.enable_x64(True):
        loss, state, d, norm = _value_dir_norm(
            _r(44, (24, 2)), _f64_state(2), _r(45, (24, 2)),
            permutations=[[2, 1, 4, 5, 3, 7, 6, 0]], **B_KW)
        np.testing.assert_allclose([loss, d, norm],
                                   [1.7415033826640798, -0.10593431456327765, 0.4928251274268282],
                                   rtol=1e-12)
        np.testing.assert_allclose(state.mean, [0.03314374710853897, -0.10164682785910864],
                                   rtol=1e-12)
        np.testing.assert_allclose(state.covariance,
                                   [[0.7360970295255929, 0.05748887973442091],
                                    [0.05748887973442091, 0.8386018088078288]], rtol=1e-12)


def test_lightly_float64_eval_without_running_stats_uses_batch_statistics():
    with jax.enable_x64(True):
        state = _f64_state(2)
        loss, new, d, norm = _value_dir_norm(
            _r(44, (24, 2)), state, _r(45, (24, 2)), permutations=[[0, 5, 7, 2, 4, 6, 1, 3]],
            train=False, track_running_stats=False, **B_KW)
        np.testing.assert_allclose([loss, d, norm],
                                   [1.4779943610416932, 0.6047430074964866, 0.6736136160478639],
                                   rtol=1e-12)
        _assert_same_state(new, state)


# ----------------------------------------------------------------------------- whitening
def _np_whiten(x, mean, cov, eps=0.0):
    chol = np.linalg.cholesky((1 - eps) * cov + eps * np.eye(cov.shape[0]))
    return (x - mean) @ np.linalg.inv(chol).T


def test_whiten_train_then_eval_mode():
    with jax.enable_x64(True):
        x = _r(50, (20, 4))
        state = WMSEState(jnp.asarray(_r(51, (4,))), jnp.asarray(np.diag([1.0, 2.0, 3.0, 4.0])))
        z, new = _jwhiten(x, state, momentum=0.25)
        np.testing.assert_allclose(np.cov(np.asarray(z).T), np.eye(4), atol=1e-12)
        np.testing.assert_allclose(z, _np_whiten(x, x.mean(0), np.cov(x.T)), rtol=1e-12)
        np.testing.assert_allclose(new.mean, 0.25 * x.mean(0) + 0.75 * state.mean, rtol=1e-12)
        np.testing.assert_allclose(new.covariance,
                                   0.25 * np.cov(x.T) + 0.75 * state.covariance, rtol=1e-12)
        # eval mode whitens with the running statistics and leaves them unchanged
        z_eval, same = _jwhiten(x, new, train=False, eps=0.1)
        np.testing.assert_allclose(
            z_eval, _np_whiten(x, np.asarray(new.mean), np.asarray(new.covariance), 0.1),
            rtol=1e-12)
        _assert_same_state(same, new)
        z_nt, same = _jwhiten(x, new, train=True, track_running_stats=False)
        np.testing.assert_allclose(z_nt, z, rtol=1e-12)
        _assert_same_state(same, new)


def test_running_statistics_follow_lightlys_update_order():
    """One EMA step per (iteration, sub-batch, view), in that order, with the unshrunk
    sub-batch statistics; the loss does not read the running statistics in train mode."""
    with jax.enable_x64(True):
        x, m = _r(52, (24, 2)), 0.2
        perms = np.stack([np.random.RandomState(s).permutation(8) for s in (1, 2)])
        state = WMSEState(jnp.asarray(_r(53, (2,))), jnp.eye(2))
        loss, new = _jwmse(x, state, embedding_dim=2, w_size=4, w_iter=2, num_samples=3,
                              momentum=m, eps=0.3, permutations=perms)
        views = x.reshape(3, 8, 2)
        mean, cov = np.asarray(state.mean), np.asarray(state.covariance)
        for perm in perms:
            for idx in perm.reshape(-1, 4):
                for v in range(3):
                    sub = views[v, idx]
                    mean = m * sub.mean(0) + (1 - m) * mean
                    cov = m * np.cov(sub.T) + (1 - m) * cov
        np.testing.assert_allclose(new.mean, mean, rtol=1e-12)
        np.testing.assert_allclose(new.covariance, cov, rtol=1e-12)
        other = WMSEState(jnp.ones(2), 3 * jnp.eye(2))
        loss2, _ = _jwmse(x, other, embedding_dim=2, w_size=4, w_iter=2, num_samples=3,
                             momentum=m, eps=0.3, permutations=perms)
        assert float(loss2) == float(loss)


def test_eval_mode_is_whitening_with_the_running_statistics():
    with jax.enable_x64(True):
        x = _r(54, (10, 3))  # 5 samples: no multiple of w_size needed in eval mode
        state = WMSEState(jnp.asarray(_r(55, (3,))),
                          jnp.asarray(np.cov(_r(56, (30, 3)).T)))
        loss, new = _jwmse(x, state, embedding_dim=3, w_size=8, train=False, eps=0.05)
        z = _np_whiten(x, np.asarray(state.mean), np.asarray(state.covariance), 0.05)
        a, b = z[:5], z[5:]
        cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        np.testing.assert_allclose(loss, 2 - 2 * cos.mean(), rtol=1e-12)
        _assert_same_state(new, state)


# ----------------------------------------------------------------------------- API
def test_key_and_permutations():
    x = _r(57, (32, 4), np.float32)
    kw = dict(embedding_dim=4, w_size=8, w_iter=2)
    state = init_wmse_state(4)
    key = jax.random.key(3)
    f = jax.jit(lambda x, key: wmse_loss(x, state, key, **kw))
    loss, new = f(x, key)
    rows = jnp.broadcast_to(jnp.arange(16), (2, 16))
    perms = jax.random.permutation(key, rows, axis=1, independent=True)
    loss_p, new_p = jax.jit(lambda x, p: wmse_loss(x, state, permutations=p, **kw))(x, perms)
    for a, b in zip(jax.tree.leaves((loss, new)), jax.tree.leaves((loss_p, new_p))):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    other, _ = f(x, jax.random.key(4))
    assert not np.isclose(loss, other)
    legacy = jax.eval_shape(f, x, jax.random.PRNGKey(3))  # legacy uint32 keys are accepted
    assert legacy[0].shape == ()
    # the sample-major array and the sequence of views are the same input
    as_views, _ = jax.jit(lambda x, key: wmse_loss([x[:16], x[16:]], state, key, **kw))(x, key)
    np.testing.assert_allclose(as_views, loss, rtol=1e-6)


def test_single_sub_batch_needs_no_key():
    """B = w_size: the grouping is unique, so no permutation is drawn; every iteration
    still updates the running statistics (as lightly)."""
    with jax.enable_x64(True):
        x = _r(71, (16, 3))
        state = WMSEState(jnp.ones(3), 2 * jnp.eye(3))
        kw = dict(embedding_dim=3, w_size=8, w_iter=3, momentum=0.3)
        no_key = _jwmse(x, state, **kw)
        identity = _jwmse(x, state, permutations=np.tile(np.arange(8), (3, 1)), **kw)
        for a, b in zip(jax.tree.leaves(no_key), jax.tree.leaves(identity)):
            np.testing.assert_allclose(a, b, rtol=1e-13)


def test_jit_matches_eager_and_traced_hyperparameters_do_not_retrace():
    x = _r(58, (32, 4), np.float32)
    kw = dict(embedding_dim=4, w_size=8)
    state = init_wmse_state(4)
    key = jax.random.key(0)
    eager = wmse_loss(x, state, key, momentum=0.1, eps=0.1, **kw)
    traces = []

    @jax.jit
    def f(x, state, key, momentum, eps):
        traces.append(1)
        return wmse_loss(x, state, key, momentum=momentum, eps=eps, **kw)

    jitted = f(x, state, key, 0.1, 0.1)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    f(x, state, key, 0.2, 0.3)
    assert len(traces) == 1


def test_gradients_float64():
    """Through the sub-batch statistics, the Cholesky factor and the triangular solve."""
    with jax.enable_x64(True):
        state = WMSEState(jnp.asarray(_r(60, (3,))), jnp.asarray(np.cov(_r(61, (20, 3)).T)))
        key = jax.random.key(1)
        cases = [(36, dict(w_iter=2, num_samples=3, eps=0.2)), (24, dict(train=False, eps=0.1))]
        for rows, kw in cases:
            f = lambda x, kw=kw: wmse_loss(x, state, key, embedding_dim=3, w_size=6, **kw)[0]
            check_grads(jax.jit(f), (_r(59, (rows, 3)),), order=1, modes=("rev",),
                        atol=1e-6, rtol=1e-6)


def test_vmap_over_independent_problems():
    xs = jnp.stack([_r(s, (16, 2), np.float32) for s in (62, 63, 64)])
    state = init_wmse_state(2)
    f = jax.jit(lambda x: wmse_loss(x, state, jax.random.key(0), embedding_dim=2, w_size=4))
    batched = jax.jit(jax.vmap(f))(xs)
    for i in range(3):
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(f(xs[i]))):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs():
    x = jnp.asarray(_r(65, (32, 4), np.float32), jnp.bfloat16)
    state = init_wmse_state(4)
    f = lambda x: wmse_loss(x, state, jax.random.key(0), embedding_dim=4, w_size=8)
    (loss, new), g = jax.jit(jax.value_and_grad(f, has_aux=True))(x)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
    assert new.mean.dtype == jnp.float32
    ref, _ = f(x.astype(jnp.float32))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_rank_deficient_sub_batch_is_finite_with_shrinkage():
    """Duplicated samples make each sub-batch's covariance singular: with eps = 0 its
    Cholesky factor is at the mercy of round-off (NaN, or a finite value on some CPUs'
    LAPACK, as lightly's); any eps > 0 keeps value and gradients finite."""
    base = _r(66, (4, 4), np.float32)
    x = np.concatenate([np.tile(base, (2, 1)), np.tile(base + 0.1, (2, 1))])  # 2 views of 8
    state = init_wmse_state(4)
    f = jax.jit(jax.value_and_grad(
        lambda x, eps: wmse_loss(x, state, embedding_dim=4, w_size=8, eps=eps)[0]))
    loss, g = f(jnp.asarray(x), 1e-3)
    assert np.isfinite(loss) and np.all(np.isfinite(g))
    zeros, gz = f(jnp.zeros((16, 4)), 0.1)
    assert np.isfinite(zeros) and np.all(np.isfinite(gz))


# ----------------------------------------------------------------------------- bad inputs
def _bad(x, state=None, **kw):
    kw = {"embedding_dim": 4, "w_size": 8, **kw}
    state = init_wmse_state(kw["embedding_dim"]) if state is None else state
    return jax.jit(lambda x: wmse_loss(x, state, **kw))(x)


X16 = _r(67, (16, 4), np.float32)


@pytest.mark.parametrize("x,kw,err,match", [
    (X16[:12], {}, ValueError, r"global batch B=6 .*must be a multiple of w_size=8"),
    (_r(67, (24, 4), np.float32), {"key": jax.random.key(0)}, ValueError,
     r"B=12 .*multiple of w_size=8"),
    (X16, {"w_size": 6}, ValueError, "w_size should be at least twice.*w_size=6.*"
     "embedding_dim=4"),
    (X16[:, 0], {}, ValueError, r"x must have rank 2, got shape \(16,\)"),
    (X16.astype(np.int32), {}, TypeError, "x must have a floating dtype.*int32"),
    (X16[:15], {}, ValueError, r"15 rows .*not a multiple of num_samples=2"),
    (X16[:, :3], {}, ValueError, r"embedding_dim=4 features, got views of shape \(8, 3\)"),
    (X16[:2, :1], {"w_size": 2, "embedding_dim": 1}, ValueError,
     "at least 2 samples.*global batch of 1"),
    (np.tile(X16, (2, 1)), {}, ValueError, "key is required"),
    (X16, {"permutations": np.zeros((1, 8), np.int32)}, ValueError,
     r"every row of permutations must be a permutation of range\(8\)"),
    (X16, {"permutations": np.zeros((2, 8), np.int32)}, ValueError,
     r"permutations must have shape \(w_iter, global batch\) = \(1, 8\), got \(2, 8\)"),
    (X16, {"permutations": np.zeros((1, 8))}, TypeError, "permutations must have an integer"),
    (X16, {"key": np.zeros(2, np.float32)}, TypeError, "key must be a PRNG key"),
    (X16, {"momentum": 1.5}, ValueError, r"momentum must be in \[0.0, 1.0\], got 1.5"),
    (X16, {"eps": -0.1}, ValueError, "eps must be in"),
    (X16, {"w_iter": 0}, ValueError, "w_iter must be an int >= 1, got 0"),
    (X16, {"num_samples": 1}, ValueError, "num_samples must be an int >= 2, got 1"),
    ([X16[:8], X16[:8], X16[:8]], {}, ValueError, "sequence of 3 views but num_samples=2"),
    ([X16[:8], X16[:6]], {}, ValueError, r"x\[0\] and x\[1\] must have the same shape"),
    (X16, {"axis_name": ["data"]}, TypeError, "axis_name"),
])
def test_bad_inputs(x, kw, err, match):
    with pytest.raises(err, match=match):
        _bad(x, **kw)


def test_bad_state():
    with pytest.raises(ValueError, match=r"state.mean must have shape \(4,\).*got \(3,\)"):
        _bad(X16, init_wmse_state(3))
    with pytest.raises(ValueError, match=r"state.covariance must have shape \(4, 4\)"):
        _bad(X16, WMSEState(jnp.zeros(4), jnp.eye(3)))
    with pytest.raises(TypeError, match="WMSEState"):
        _bad(X16, (jnp.zeros(4), jnp.eye(4)))
    with pytest.raises(ValueError, match="embedding_dim must be a positive int"):
        init_wmse_state(0)
    with pytest.raises(TypeError, match="floating"):
        init_wmse_state(4, jnp.int32)


# ----------------------------------------------------------------------------- distributed
def _wmse_example(rng, batch, dim):
    """Two views; the dimension is capped at batch // 2 (W-MSE whitens sub-batches of at
    least twice the dimension)."""
    k = max(1, min(dim, batch // 2))
    x0 = rng.standard_normal((batch, k)).astype(np.float32)
    x1 = (x0 + 0.5 * rng.standard_normal((batch, k))).astype(np.float32)
    return Example((x0, x1), init_wmse_state(k))


def _apply_wmse(batch, state, *, axis_name=None, **hyper):
    """The views as a sequence; by default the global batch is one sub-batch, eps = 0.1
    (degenerate inputs stay finite) and a fixed key (replicated: the same permutations
    on every device)."""
    n = lax.axis_size(axis_name) if isinstance(axis_name, (str, tuple)) else 1
    shape = np.shape(batch[0])
    hyper = {"eps": 0.1, "embedding_dim": shape[-1], "w_size": shape[0] * n, **hyper}
    key = hyper.pop("key", jax.random.key(0))
    return wmse_loss(list(batch), state, key, axis_name=axis_name, **hyper)


SPEC = LossSpec(
    "wmse_loss", "whitening", {"lightly": "WMSELoss"}, True,
    "sub-batches drawn from the gathered global batch (same key); whitening replicated",
    _apply_wmse, _wmse_example, {"eps": (0.1, 0.3)}, min_batch=2, symmetric=True,
)


@pytest.mark.parametrize("mode,n", [("shard_map", 1), ("shard_map", 2), ("shard_map", 4),
                                    ("shard_map_2d", 4), ("pmap", 4)])
def test_distributed_equivalence(mode, n):
    """Loss, gradients (encoder weights and inputs) and new state equal the single-device
    global batch of 16; its two sub-batches of 8 (two iterations) mix rows of different
    devices."""
    assert_distributed_equivalent(SPEC, mode, n, hyper={"w_size": 8, "w_iter": 2}, d_out=4)


@pytest.mark.parametrize("train", [True, False])
def test_distributed_sample_major_layout(train):
    """Each device passes its local sample-major [b·V, D] block; the global view v is the
    concatenation of the devices' views v (training and eval mode)."""
    x = _r(68, (2, 16, 4), np.float32)  # (views, global batch, D)
    state = WMSEState(jnp.asarray(_r(72, (4,)), jnp.float32), 2 * jnp.eye(4))
    key = jax.random.key(5)
    kw = dict(embedding_dim=4, w_size=8, momentum=0.5, train=train)
    expected = _jwmse(x.reshape(32, 4), state, key, **kw)
    local = x.reshape(2, 4, 4, 4).transpose(1, 0, 2, 3).reshape(32, 4)  # device-major

    @functools.partial(jax.shard_map, mesh=make_mesh(4), in_specs=(P("data"), P()),
                       out_specs=(P(), P()))
    def sharded(x, state):
        return wmse_loss(x, state, key, axis_name="data", **kw)

    got = jax.jit(sharded)(local, state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_whiten_distributed():
    """whiten(axis_name=...) whitens each device's rows with the global statistics."""
    x, r = _r(69, (16, 3), np.float32), _r(70, (16, 3), np.float32)
    state = init_wmse_state(3)

    def f(x, r, axis_name=None):
        z, new = whiten(x, state, momentum=0.3, axis_name=axis_name)
        s = jnp.sum(z * r)
        return (s if axis_name is None else lax.psum(s, axis_name)), (z, new)

    (v, (z, new)), g = jax.jit(jax.value_and_grad(f, has_aux=True))(x, r)

    @functools.partial(jax.shard_map, mesh=make_mesh(4), in_specs=(P("data"), P("data")),
                       out_specs=((P(), (P("data"), P())), P("data")))
    def sharded(x, r):
        return jax.value_and_grad(functools.partial(f, axis_name="data"), has_aux=True)(x, r)

    got = jax.jit(sharded)(x, r)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(((v, (z, new)), g))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


ORACLE_SCRIPT = r'''
import sys

import numpy as np
import torch

sys.path.insert(0, "/work/shared/oracle")
import lightly_shim  # noqa: E402

L = lightly_shim.import_lightly_loss()
torch.set_default_dtype(torch.float64)
_randperm = torch.randperm
DRAWS = []


def recording_randperm(n, *args, **kwargs):
    p = _randperm(n, *args, **kwargs)
    DRAWS.append(p.tolist())
    return p


torch.randperm = recording_randperm


def r(seed, shape):
    return np.random.RandomState(seed).standard_normal(shape)


def run(module, x, direction):
    DRAWS.clear()
    t = torch.tensor(x, requires_grad=True)
    loss = module(t)
    loss.backward()
    return dict(loss=loss.item(), perms=list(DRAWS), dir=float((t.grad.numpy() * direction).sum()),
                gnorm=float(np.linalg.norm(t.grad.numpy())))


torch.manual_seed(0)
out = {}
# A: 2 sub-batches, 2 iterations, 2 training steps, then eval
m = L.WMSELoss(embedding_dim=3, w_size=6, w_iter=2, momentum=0.1, num_samples=2).double()
out["A1"] = run(m, r(40, (24, 3)), r(42, (24, 3)))
out["A2"] = run(m, r(41, (24, 3)), r(42, (24, 3)))
out["A_state"] = (m.whitening.running_mean.flatten().tolist(),
                  m.whitening.running_variance.tolist())
m.eval()
out["A_eval"] = run(m, r(43, (24, 3)), r(42, (24, 3)))
# B: 3 views, shrinkage eps=0.2
m = L.WMSELoss(embedding_dim=2, w_size=4, num_samples=3, eps=0.2, momentum=0.3).double()
out["B"] = run(m, r(44, (24, 2)), r(45, (24, 2)))
out["B_state"] = (m.whitening.running_mean.flatten().tolist(),
                  m.whitening.running_variance.tolist())
# C: track_running_stats=False in eval mode: batch statistics
m = L.WMSELoss(embedding_dim=2, w_size=4, num_samples=3, eps=0.2,
               track_running_stats=False).double()
m.eval()
out["C"] = run(m, r(44, (24, 2)), r(45, (24, 2)))
# lightly §5 (float32)
torch.set_default_dtype(torch.float32)
m = L.WMSELoss(embedding_dim=4, w_size=8)
out["S5"] = m(torch.tensor(r(30, (16, 4)).astype(np.float32))).item()
for k, v in out.items():
    print(k, "=", repr(v))
'''


_REPEATED_STEP = """
import jax, jax.numpy as jnp, numpy as np
from sslloss_jax import init_wmse_state, wmse_loss
rng = np.random.default_rng(0)
x0 = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
x1 = x0 + 0.5 * jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
step = jax.jit(jax.value_and_grad(
    lambda a, b, s, k: wmse_loss([a, b], s, k, embedding_dim=128, w_size=256),
    argnums=(0, 1), has_aux=True))
state, key = init_wmse_state(128), jax.random.key(0)
for _ in range(400):
    jax.block_until_ready(step(x0, x1, state, key))
print("done")
"""


def test_repeated_train_steps_do_not_hang():
    """Regression: with the whitening solved against xcᵀ, the step's backward ran two
    independent LAPACK trsm calls, and jaxlib 0.10's CPU runtime deadlocked within ~100
    calls (every time on a 2-core machine). The whitening's triangular solves now form one
    chain. Run in a subprocess so a hang is a timeout, not a stuck suite."""
    out = subprocess.run([sys.executable, "-c", _REPEATED_STEP], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-2000:]


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_whiten_batch_vjp_matches_autodiff(eps):
    """The closed-form VJP of the per-group whitening (in x and in eps) against autodiff
    through the Cholesky factorization and the triangular solve."""
    from sslloss_jax import _whitening as W

    def reference(x, e):
        xc = x - jnp.mean(x, axis=-2, keepdims=True)
        return W._whiten_centered(xc, W._cov(xc, x.shape[-2]), e)

    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.standard_normal((3, 2, 12, 4)))
        w = jnp.asarray(rng.standard_normal(x.shape))
        assert_matches_reference(lambda x, e: W._whiten_batch(x, e)[0], reference,
                                 (x, jnp.asarray(eps)), w)
