"""The CPU performance workarounds of _numerics are exact: the pairwise leading-axis
reductions are jnp.sum / jnp.max with jnp.sum's gradient, cosine_similarity's closed-form
JVP is autodiff's of two l2_normalize calls, the radix argsort is
jnp.argsort(stable=True), and sym_gram's one-product VJP is autodiff's of z @ z.T."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sslloss_jax import _numerics
from sslloss_jax._numerics import (
    argmax_first,
    argmin_first,
    argsort_stable,
    broadcast_leading,
    cosine_similarity,
    cross_view_entropy,
    divide_by,
    l2_normalize,
    matmul_nt,
    max_leading,
    mean_leading,
    reduce_halving,
    scaled_logsumexp,
    soft_cross_entropy,
    sort_and_argsort,
    sum_leading,
    sym_gram,
    symmetric_lse,
    symmetric_lse_linear,
    unpermute,
)
from tests._harness import assert_matches_reference


@pytest.fixture(params=["product", "plain"])
def sum_path(request, monkeypatch):
    """sum_leading's two paths: a ``ones @ x`` product (one add for two rows) from
    _LEADING_MIN elements, plain below."""
    monkeypatch.setattr(_numerics, "_LEADING_MIN", 0 if request.param == "product" else 2**40)
    return request.param


@pytest.mark.parametrize("shape", [(1, 3), (2, 5), (7, 4, 3), (64, 6), (65, 2, 2)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_sum_leading_equals_jnp(shape, keepdims, sum_path):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    np.testing.assert_allclose(sum_leading(x, keepdims), jnp.sum(x, 0, keepdims=keepdims),
                               rtol=1e-5, atol=1e-5)
    assert jax.jit(sum_leading, static_argnums=1)(x, keepdims).shape == (
        jnp.sum(x, 0, keepdims=keepdims).shape)


@pytest.mark.parametrize("shape", [(1, 3), (2, 5), (7, 4, 3), (9, 2), (64, 6), (65, 2, 2)])
def test_max_leading_equals_jnp(shape):
    x = jnp.asarray(np.random.default_rng(4).standard_normal(shape), jnp.float32)
    np.testing.assert_array_equal(max_leading(x), jnp.max(x, axis=0))
    np.testing.assert_array_equal(jax.jit(max_leading)(x), jnp.max(x, axis=0))
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(max_leading(x)))(x), 0.0)


def test_sum_leading_keeps_low_precision_dtype(sum_path):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((9, 40)), jnp.bfloat16)
    out = sum_leading(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out), np.float32(x).sum(0), rtol=2e-2, atol=2e-2)


def test_empty_leading_axis(sum_path):
    assert sum_leading(jnp.zeros((0, 3))).shape == (3,)
    np.testing.assert_array_equal(sum_leading(jnp.zeros((0, 3))), 0.0)


def test_sum_leading_gradient_is_a_broadcast(sum_path):
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)))
        w = jnp.arange(3.0)
        check_grads(lambda x: jnp.sum(jnp.sin(sum_leading(x)) * w), (x,), order=2,
                    modes=["rev"])
        g = jax.grad(lambda x: jnp.sum(sum_leading(x) * w))(x)
        np.testing.assert_array_equal(g, jnp.broadcast_to(w, x.shape))


def _with_special_values(x: np.ndarray) -> np.ndarray:
    """Ties (all equal, repeated values, integers), signed zeros, infinities and NaNs."""
    x = x.copy()
    x[1], x[2, ::2], x[3] = 0.0, 1.5, np.round(x[3])
    if x.shape[-1] >= 6:
        x[4, :6] = [np.nan, -np.inf, -0.0, 0.0, np.inf, -np.nan]
    return x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n", [1, 2, 3, 6, 255, 256, 257, 5000, 40000])
def test_argsort_stable_equals_jnp_argsort(dtype, n):
    # 40000 needs three passes in float32 (15-bit digits beside 16 position bits).
    x = jnp.asarray(_with_special_values(np.random.default_rng(n).standard_normal((5, n))),
                    dtype)
    want = jnp.argsort(x, axis=-1, stable=True)
    np.testing.assert_array_equal(argsort_stable(x), want)
    np.testing.assert_array_equal(jax.jit(argsort_stable)(x), want)


@pytest.mark.parametrize("n", [7, 256, 300])
def test_argsort_stable_settles_keys_equal_in_their_top_bits(n):
    # Values one ulp apart share the prefix the single sort orders by: a few swapped
    # neighbours are settled by the transposition rounds, a long descending run of them
    # (more rounds than allowed) by the exact radix passes.
    ulps = np.float32(1.0) + np.arange(n, dtype=np.float32) * np.spacing(np.float32(1.0))
    few = ulps.copy()
    few[1::5], few[2::5] = ulps[2::5][: len(few[1::5])], ulps[1::5][: len(few[2::5])]
    rows = np.stack([few, ulps[::-1], np.where(np.arange(n) % 2, ulps, -ulps)])
    x = jnp.asarray(rows)
    want = jnp.argsort(x, axis=-1, stable=True)
    np.testing.assert_array_equal(argsort_stable(x), want)
    np.testing.assert_array_equal(jax.jit(argsort_stable)(x), want)
    np.testing.assert_array_equal(jax.vmap(argsort_stable)(x), want)


def test_argsort_stable_float64_batched_and_vmapped():
    with jax.enable_x64(True):
        x = jnp.asarray(_with_special_values(np.random.default_rng(2).standard_normal((5, 300))))
        x = jnp.stack([x, -x])  # [2, 5, 300]
        want = jnp.argsort(x, axis=-1, stable=True)
        np.testing.assert_array_equal(argsort_stable(x), want)
        np.testing.assert_array_equal(jax.vmap(argsort_stable)(x), want)


@pytest.mark.parametrize("n", [2, 3, 6, 255, 256, 300, 5000])
@pytest.mark.parametrize("lanes", [(8,), (3, 5)])
def test_argsort_stable_along_a_middle_axis(n, lanes):
    """The bitonic network (the axes after the sorted one hold >= 8 lanes), padded to a
    power of two, gives jnp.argsort's order and jnp.sort's values, special values
    included; with fewer lanes lax.sort runs along the axis."""
    rng = np.random.default_rng(n)
    base = _with_special_values(rng.standard_normal((5, n)))
    scales = rng.standard_normal(math.prod(lanes)).reshape(lanes)  # both signs
    x = jnp.asarray(base.reshape(5, n, *(1,) * len(lanes)) * scales, jnp.float32)
    want = jnp.argsort(x, axis=1, stable=True)
    # jitted: eager, the network's log2(n)^2 stages compile one by one (seconds, no coverage)
    values, order = jax.jit(sort_and_argsort, static_argnums=1)(x, 1)
    np.testing.assert_array_equal(order, want)
    np.testing.assert_array_equal(values, jnp.sort(x, axis=1))  # NaNs compare equal here
    few = x[:, :, :1]  # fewer lanes: lax.sort along the middle axis
    np.testing.assert_array_equal(jax.jit(argsort_stable, static_argnums=1)(few, 1),
                                  jnp.argsort(few, axis=1, stable=True))


def test_argsort_stable_middle_axis_settles_near_ties_float64_and_vmap():
    """Keys one ulp apart along the sorted axis: the transposition rounds and (a long
    descending run) the radix passes, both in the bitonic layout; vmap; float64."""
    n = 300
    ulps = np.float32(1.0) + np.arange(n, dtype=np.float32) * np.spacing(np.float32(1.0))
    few = ulps.copy()
    few[1::5], few[2::5] = ulps[2::5][: len(few[1::5])], ulps[1::5][: len(few[2::5])]
    x = jnp.asarray(np.stack([few, ulps[::-1], np.where(np.arange(n) % 2, ulps, -ulps)] * 3,
                             axis=-1))  # [n, 9]
    want = jnp.argsort(x, axis=0, stable=True)
    np.testing.assert_array_equal(jax.jit(argsort_stable, static_argnums=1)(x, 0), want)
    xb = jnp.stack([x, -x])
    np.testing.assert_array_equal(jax.jit(jax.vmap(lambda c: argsort_stable(c, axis=0)))(xb),
                                  jnp.argsort(xb, axis=1, stable=True))
    with jax.enable_x64(True):
        x64 = _with_special_values(np.random.default_rng(3).standard_normal((5, 300))).T
        x64 = jnp.asarray(np.concatenate([x64, -x64], axis=1))  # [300, 10]
        values, order = jax.jit(sort_and_argsort, static_argnums=1)(x64, 0)
        np.testing.assert_array_equal(order, jnp.argsort(x64, axis=0, stable=True))
        np.testing.assert_array_equal(values, jnp.sort(x64, axis=0))
        assert values.dtype == jnp.float64


@pytest.mark.parametrize("n", [1, 2, 5, 64, 100])
def test_bitonic_sort_equals_lax_sort(n):
    rng = np.random.default_rng(n)
    info = np.iinfo(np.int32)
    x = rng.integers(-50, 50, (3, n, 8), dtype=np.int32)  # many equal values
    x[0, 0, :2] = [info.max, info.min]  # the padding value itself is a legal input
    x = jnp.asarray(x)
    np.testing.assert_array_equal(_numerics._bitonic_sort(x, 1), jax.lax.sort(x, dimension=1))
    np.testing.assert_array_equal(jax.jit(_numerics._bitonic_sort, static_argnums=1)(x, 0),
                                  jax.lax.sort(x, dimension=0))


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_unpermute_inverts_take_along_axis(flat, axis, monkeypatch):
    if not flat:
        monkeypatch.setattr(_numerics, "_FLAT_INDEX_MAX", 0)
    rng = np.random.default_rng(4)
    g = jnp.asarray(rng.standard_normal((3, 4, 7)))
    perm = jnp.asarray(np.argsort(rng.standard_normal(g.shape), axis=axis), jnp.int32)
    out = unpermute(g, perm, axis)
    np.testing.assert_array_equal(jnp.take_along_axis(out, perm, axis=axis), g)
    # the transpose of the gather: <take(x, perm), g> == <x, unpermute(g, perm)>
    x = jnp.asarray(rng.standard_normal(g.shape))
    np.testing.assert_allclose(jnp.vdot(jnp.take_along_axis(x, perm, axis=axis), g),
                               jnp.vdot(x, out), rtol=1e-6)


def test_argsort_stable_rejects_integers():
    with pytest.raises(TypeError, match="floating"):
        argsort_stable(jnp.arange(4))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.int32])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_argmax_and_argmin_first_equal_jnp(dtype, axis):
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (7, 37, 5)).astype(dtype)  # many ties; 37: odd halvings
    if jnp.issubdtype(dtype, jnp.floating):
        x[1, 2, :] = np.nan
        x[2, :, 3] = np.nan
        x[3, 4, 1] = np.nan
        x[4, 1, :] = -np.inf
        x[5, :, 0] = np.inf
        x[6, 3, 2] = -0.0
    for ours, ref in ((argmax_first, jnp.argmax), (argmin_first, jnp.argmin)):
        got = jax.jit(ours, static_argnums=1)(jnp.asarray(x), axis)
        assert got.dtype == jnp.argmax(jnp.zeros(2)).dtype
        np.testing.assert_array_equal(got, ref(jnp.asarray(x), axis=axis))
    np.testing.assert_array_equal(jax.vmap(argmax_first)(jnp.asarray(x)),
                                  jnp.argmax(jnp.asarray(x), axis=-1))


@pytest.mark.parametrize("width", [1, 8, 9, 37, 64, 1000, 1025])
def test_reduce_halving_equals_the_reduction(width):
    """Pairwise halving (odd widths carry their last element; past the widest halved
    axis the plain reduction) gives the reduction's value, infinities included. (NaN
    propagation is left to XLA: its own ``max`` of some axes drops a NaN; argmax_first,
    which handles NaN itself, is tested with them above.)"""
    rng = np.random.default_rng(width)
    x = rng.standard_normal((3, width, 4)).astype(np.float32)
    x[2, rng.integers(width), :] = np.inf
    x[2, rng.integers(width), :] = -np.inf
    for pair, reduce, ref in ((jnp.maximum, jnp.max, np.max), (jnp.minimum, jnp.min, np.min)):
        for axis in (1, -1, 0):
            got = jax.jit(reduce_halving, static_argnums=(1, 2, 3))(jnp.asarray(x), axis,
                                                                     pair, reduce)
            np.testing.assert_array_equal(got, ref(x, axis=axis, keepdims=True))


@pytest.mark.parametrize("n_views", [1, 2, 8])
def test_view_mean_deviation_value_and_gradients(n_views):
    """``z − mean_v z`` from :func:`mean_leading` and :func:`broadcast_leading` (whose
    gradient is a pairwise sum) against plain broadcasting."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        z = jnp.asarray(rng.standard_normal((n_views, 6, 5)))
        w = jnp.asarray(rng.standard_normal((n_views, 6, 5)))
        assert_matches_reference(lambda z: z - broadcast_leading(mean_leading(z), n_views),
                                 lambda z: z - jnp.mean(z, axis=0, keepdims=True), (z,), w)
        scale = jnp.arange(1.0, 4.0)[:, None, None]
        assert_matches_reference(lambda x: broadcast_leading(x, 3) * scale,
                                 lambda x: x[None] * scale, (z[0],), w[:1].repeat(3, 0))


def test_matmul_nt_value_and_gradients():
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        a, b = (jnp.asarray(rng.standard_normal(s)) for s in ((5, 3), (7, 3)))
        w = jnp.asarray(rng.standard_normal((5, 7)))
        assert_matches_reference(matmul_nt, lambda a, b: a @ b.T, (a, b), w)


# (300, 3) and (2, 260, 4): above _SYM_FUSED_MAX rows, the two-product VJP
@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 7), (3, 2, 6, 4), (300, 3), (2, 260, 4)])
def test_sym_gram_value_and_gradients(shape):
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        z = jnp.asarray(rng.standard_normal(shape))
        w = jnp.asarray(rng.standard_normal(shape[:-1] + shape[-2:-1]))  # not symmetric
        assert_matches_reference(sym_gram, lambda z: z @ jnp.swapaxes(z, -1, -2), (z,), w)
        if len(shape) >= 3:  # vmap over the leading batch axis: the same gradients
            per_item = jax.vmap(jax.grad(
                lambda zi, wi: jnp.sum(jnp.tanh(sym_gram(zi)) * wi)))(z, w)
            np.testing.assert_allclose(per_item, jax.grad(
                lambda z: jnp.sum(jnp.tanh(sym_gram(z)) * w))(z), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t", [0.3, -0.3, 2.0])
def test_scaled_logsumexp_value_and_gradients(t):
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        x = jnp.asarray(rng.standard_normal((3, 4, 6)) * 3)
        w = jnp.asarray(rng.standard_normal((3, 4)))
        assert_matches_reference(scaled_logsumexp,
                                 lambda x, t: jax.nn.logsumexp(x / t, axis=-1),
                                 (x, jnp.asarray(t)), w)
        # rows with -inf entries, an all -inf row, and large magnitudes (no overflow)
        y = x.at[0, 0, :3].set(-jnp.inf).at[1, 1].set(-jnp.inf).at[2, 2].multiply(1e4)
        want = jax.nn.logsumexp(y / t, axis=-1)
        if t < 0:  # the same cells, mirrored: +inf entries for a negative temperature
            y = -y
            want = jax.nn.logsumexp(y / t, axis=-1)
        np.testing.assert_allclose(scaled_logsumexp(y, jnp.asarray(t)), want, rtol=1e-12)


def test_divide_by_is_division_behind_a_barrier():
    """``divide_by(x, t)`` is ``x / t`` (rounded alike), differentiable in both, batchable
    over ``t``, and its ``t`` is an ``optimization_barrier`` operand (not a constant XLA
    could write out as a full-size array), also for a Python-float ``t`` under ``jit``."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.standard_normal((4, 5)))
        for t in (0.1, -0.3, 2.0):
            np.testing.assert_array_equal(divide_by(x, t), x / t)
            np.testing.assert_array_equal(jax.jit(lambda x, t=t: divide_by(x, t))(x), x / t)
            check_grads(lambda x, t: jnp.sum(jnp.tanh(divide_by(x, t))),
                        (x, jnp.asarray(10 * t)), order=2, modes=("fwd", "rev"))
        ts = jnp.asarray([0.5, 2.0])
        np.testing.assert_allclose(jax.vmap(lambda t: divide_by(x, t))(ts),
                                   x[None] / ts[:, None, None], rtol=1e-15)
    text = jax.jit(lambda x: scaled_logsumexp(x, 0.1)).lower(jnp.ones((2, 3))).as_text()
    assert "optimization_barrier" in text


def _reference_soft_ce(logits, targets):
    return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def _cross_entropy_path(monkeypatch, path: str) -> None:
    """The cross entropies' row statistics: whole-array ("plain"), or in blocks past
    _BLOCKED_BYTES ("large") or for rows of _WIDE_ROW or more ("wide"), here forced
    with blocks of 5 rows of 7 in float64 (so 12 rows go in blocks of 4)."""
    if path == "large":
        monkeypatch.setattr(_numerics, "_BLOCKED_BYTES", 0)
    if path == "wide":
        monkeypatch.setattr(_numerics, "_WIDE_ROW", 1)
    monkeypatch.setattr(_numerics, "_ROW_BLOCK_BYTES", 5 * 7 * 8)


@pytest.mark.parametrize("bound", ["_WIDE_ROW", "_BLOCKED_BYTES"])
def test_row_lse_blocks_match_scaled_logsumexp(bound, monkeypatch):
    monkeypatch.setattr(_numerics, bound, 0)
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 7)) * 30)
        prime = x.reshape(-1, 7)[:13]  # 13 rows: blocks of 5 or 8 and a remainder
        # 15 rows: blocks of 1, 1 (the largest divisor of 15 up to 2), 3, 15, 15
        for rows_per_block in (1, 2, 4, 5, 8, 15, 64):
            monkeypatch.setattr(_numerics, "_ROW_BLOCK_BYTES", rows_per_block * 7 * 8)
            for t in (0.05, -0.3, 2.0):
                for a in (x, prime):
                    np.testing.assert_allclose(
                        jax.jit(lambda a, t: _numerics._row_lse(a, t))(a, jnp.asarray(t)),
                        jax.nn.logsumexp(a / t, axis=-1), rtol=1e-12)
        center = jnp.asarray(np.random.default_rng(1).standard_normal(7) * 30)
        np.testing.assert_allclose(_numerics._row_lse(x, jnp.asarray(0.5), center),
                                   jax.nn.logsumexp((x - center[None, None]) / 0.5, -1),
                                   rtol=1e-12)


@pytest.mark.parametrize("blocked", [False, True])
def test_softmax_rows_matches_softmax(blocked, monkeypatch):
    if blocked:  # every array in blocks, of 2 rows
        monkeypatch.setattr(_numerics, "_BLOCKED_BYTES", 0)
        monkeypatch.setattr(_numerics, "_ROW_BLOCK_BYTES", 2 * 7 * 8)
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        x = jnp.asarray(rng.standard_normal((2, 3, 7)) * 5)
        center = jnp.asarray(rng.standard_normal(7))
        for t in (0.04, 1.5):
            got = jax.jit(lambda *a: _numerics.softmax_rows(*a))(x, jnp.asarray(t), center)
            np.testing.assert_allclose(got, jax.nn.softmax((x - center[None, None]) / t, axis=-1),
                                       rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(_numerics.softmax_rows(x, 0.5),
                                   jax.nn.softmax(x / 0.5, axis=-1), rtol=1e-12)
        check_grads(lambda x, c, t: _numerics.softmax_rows(x, t, c), (x, center,
                    jnp.asarray(0.7)), order=1, modes=["rev"])


@pytest.mark.parametrize("path", ["plain", "large", "wide"])
def test_soft_cross_entropy_value_and_gradients(path, monkeypatch):
    _cross_entropy_path(monkeypatch, path)
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        logits = jnp.asarray(rng.standard_normal((3, 4, 7)) * 2)
        targets = jnp.asarray(rng.uniform(size=(3, 4, 7)))  # rows need not sum to one
        w = jnp.asarray(rng.standard_normal((3, 4)))
        assert_matches_reference(soft_cross_entropy, _reference_soft_ce, (logits, targets), w)
        # with a temperature divisor: its gradient too
        for tau in (jnp.asarray(0.7), jnp.asarray(-0.7)):  # either sign
            assert_matches_reference(soft_cross_entropy,
                                     lambda x, y, t: _reference_soft_ce(x / t, y),
                                     (logits, targets, tau), w)


@pytest.mark.parametrize("path,n_views,n_targets", [
    *(("plain", v, t) for v, t in [(5, 2), (2, 2), (3, 1), (2, 4)]),
    # the blocked row statistics: the most views, and more targets than views
    *((p, v, t) for p in ("large", "wide") for v, t in [(5, 2), (2, 4)]),
])
def test_cross_view_entropy_is_the_sum_over_other_target_views(n_views, n_targets,
                                                               path, monkeypatch):
    _cross_entropy_path(monkeypatch, path)
    with jax.enable_x64(True):
        rng = np.random.default_rng(n_views * 10 + n_targets)
        logits = jnp.asarray(rng.standard_normal((n_views, 4, 7)) * 2)
        targets = jnp.asarray(rng.uniform(size=(n_targets, 4, 7)))

        def reference(logits, targets):  # the [T, V] table of pairwise terms, summed
            return sum(jnp.sum(_reference_soft_ce(logits[v], targets[t]))
                       for v in range(n_views) for t in range(n_targets) if t != v)

        w = jnp.asarray(1.3)
        assert_matches_reference(cross_view_entropy, reference, (logits, targets), w)
        tau = jnp.asarray(0.6)
        for t in (tau, -tau):  # either sign of the temperature
            assert_matches_reference(cross_view_entropy,
                                     lambda x, y, t: reference(x / t, y),
                                     (logits, targets, t), w)
        # the views as blocks (never concatenated), each with its own gradient: split
        # points 1 and 2 give blocks with all, some and none of their views owning a
        # target (every case; later cuts repeat them)
        for cut in range(1, min(n_views, 3)):
            blocks = lambda x, y, t, c=cut: cross_view_entropy((x[:c], x[c:]), y, t)
            assert_matches_reference(blocks, lambda x, y, t: reference(x / t, y),
                                     (logits, targets, tau), w)
            three = lambda x, y, c=cut: cross_view_entropy((x[:1], x[1:c], x[c:]), y)
            if cut > 1:
                assert_matches_reference(three, reference, (logits, targets), w)


def _pair_mask(mask):
    return mask


@pytest.mark.parametrize("t", [0.3, -0.7])
def test_symmetric_lse_linear_matches_autodiff_of_the_definition(t):
    """Both outputs, and gradients in z, τ (either sign), s and c, against autodiff of
    the plain formula (float64; a symmetric mask with more than the diagonal out)."""
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        z = jnp.asarray(rng.standard_normal((6, 4)))
        out = rng.uniform(size=(6, 6)) < 0.3
        mask = jnp.asarray(~(out | out.T) & ~np.eye(6, dtype=bool))
        s0 = rng.uniform(size=(6, 6))
        s = jnp.asarray(s0 + s0.T)  # symmetric weights
        c = jnp.asarray(rng.uniform(0.5, 2.0, size=6))

        def reference(z, t, s, c):
            logits = z @ z.T / t
            lse = jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=1)
            lin = jnp.sum(jnp.where(mask, s * c[None, :] * logits, 0.0), axis=1)
            return jnp.concatenate([lse, lin])

        ours = lambda z, t, s, c: jnp.concatenate(  # noqa: E731
            symmetric_lse_linear(z, t, _pair_mask, mask, s, c))
        w = jnp.asarray(rng.standard_normal(12))
        assert_matches_reference(ours, reference, (z, jnp.asarray(t), s, c), w)
        # its lse is symmetric_lse's
        np.testing.assert_array_equal(ours(z, jnp.asarray(t), s, c)[:6],
                                      symmetric_lse(z, jnp.asarray(t), _pair_mask, mask))


@pytest.mark.parametrize("which", ["soft_ce", "cross_view", "symmetric_lse",
                                   "symmetric_lse_linear", "matmul_nt"])
def test_custom_vjps_under_shard_map_with_replicated_operands(which):
    """A custom VJP inside shard_map (here without an axis_name: a per-device loss, summed
    by the caller) whose replicated operand (temperature, prototypes) meets per-device
    data: its cotangent is the psum over the devices (match_vma), as autodiff gives."""
    from jax.sharding import PartitionSpec as P

    from tests._harness import make_mesh

    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((4, 3, 6)), jnp.float32)  # 4 devices × [3, 6]
    y = jnp.asarray(rng.uniform(size=(4, 3, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)
    t = jnp.asarray(0.7, jnp.float32)
    fns = {
        "soft_ce": lambda x, y, t, w: jnp.sum(soft_cross_entropy(x, y, t)),
        "cross_view": lambda x, y, t, w: cross_view_entropy(x[None], y[None] * 0.5, t)
        + cross_view_entropy((x[None], x[None]), y[None], t),
        "symmetric_lse": lambda x, y, t, w: jnp.sum(symmetric_lse(
            x, t, lambda _: ~jnp.eye(3, dtype=bool))),
        "symmetric_lse_linear": lambda x, y, t, w: jnp.sum(jnp.stack(symmetric_lse_linear(
            x, t, lambda _: ~jnp.eye(3, dtype=bool), None, w[:3, :3] + w[:3, :3].T,
            w[3, :3])) * jnp.asarray([[1.0], [0.5]])),
        "matmul_nt": lambda x, y, t, w: jnp.sum(jnp.tanh(matmul_nt(x, w) * t)),
    }
    f = fns[which]

    def local(x, y, t, w):  # one device's share: its block, the replicated t and w
        return jax.lax.psum(f(x[0], y[0], t, w), "data")

    mesh = make_mesh(4)
    sharded = jax.shard_map(jax.grad(local, argnums=(0, 2, 3)), mesh=mesh,
                            in_specs=(P("data"), P("data"), P(), P()),
                            out_specs=(P("data"), P(), P()))
    got = jax.jit(sharded)(x, y, t, w)
    want = jax.grad(lambda x, y, t, w: sum(f(x[i], y[i], t, w) for i in range(4)),
                    argnums=(0, 2, 3))(x, y, t, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def _cosine_autodiff(x0, x1, axis=-1, eps=1e-8):
    """The definition: autodiff through two torch-style normalizations."""
    return jnp.sum(l2_normalize(x0, axis, eps) * l2_normalize(x1, axis, eps), axis=axis)


def _cosine_cases():
    rng = np.random.default_rng(7)
    x0, x1 = rng.standard_normal((2, 6, 5))
    x0[1] = 0.0  # a zero row: clamped, gradient x1/(eps·‖x1‖)
    x0[2] *= 1e-3  # below eps: clamped, a constant norm
    x1[3] = 2.0 * x0[3]  # parallel: cos = 1
    x1[4] = -x0[4]
    return x0, x1


@pytest.mark.parametrize("axis", [-1, 0])
def test_cosine_similarity_closed_form_jvp_matches_autodiff_float64(axis):
    with jax.enable_x64(True):
        n0, n1 = _cosine_cases()
        x0, x1 = jnp.asarray(n0), jnp.asarray(n1)
        w = jnp.linspace(-1.0, 2.0, 6 if axis == -1 else 5)
        ours = lambda a, b, e: jnp.sum(w * cosine_similarity(a, b, axis, e))
        ref = lambda a, b, e: jnp.sum(w * _cosine_autodiff(a, b, axis, e))
        for e in (1e-8, 1e-2):  # 1e-2 clamps the row scaled by 1e-3 (norm ~2e-3)
            np.testing.assert_allclose(ours(x0, x1, e), ref(x0, x1, e), rtol=1e-13)
            g_ours = jax.grad(ours, argnums=(0, 1, 2))(x0, x1, e)
            g_ref = jax.grad(ref, argnums=(0, 1, 2))(x0, x1, e)
            for a, b in zip(g_ours, g_ref, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
            assert all(bool(jnp.all(jnp.isfinite(g))) for g in g_ours)
        # forward and reverse, second order, away from the clamp's kink
        a, b = jnp.asarray(n0[[0, 3, 4, 5]]), jnp.asarray(n1[[0, 3, 4, 5]])
        w4 = w[:4] if axis == -1 else w
        check_grads(jax.jit(lambda a, b: jnp.sum(w4 * cosine_similarity(a, b, axis))),
                    (a, b), order=2, modes=["fwd", "rev"])


def test_cosine_similarity_broadcasts_upcasts_and_vmaps():
    x0, x1 = (jnp.asarray(v, jnp.float32) for v in _cosine_cases())
    ref = _cosine_autodiff(x0, x1[:1])
    np.testing.assert_allclose(cosine_similarity(x0, x1[:1]), ref, rtol=1e-6, atol=1e-7)
    g = jax.grad(lambda b: jnp.sum(cosine_similarity(x0, b)))(x1[:1])
    g_ref = jax.grad(lambda b: jnp.sum(_cosine_autodiff(x0, b)))(x1[:1])
    assert g.shape == (1, 5)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    half = cosine_similarity(x0.astype(jnp.bfloat16), x1.astype(jnp.bfloat16))
    assert half.dtype == jnp.float32
    vm = jax.vmap(lambda a, b: cosine_similarity(a, b))(x0, x1)
    np.testing.assert_allclose(vm, cosine_similarity(x0, x1), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(cosine_similarity)(x0, x1), cosine_similarity(x0, x1),
                               rtol=1e-6)
