"""NT-Xent, NT-Xent with a memory bank, DCL/DCLW: independent references, closed forms
and the memory bank's FIFO semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import sslloss_jax as S
from tests._harness import assert_tree_close


def _views(b=6, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((b, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, d)), jnp.float32))


def _numpy_ntxent(a, b, tau):
    """SimCLR Algorithm 1 with explicit loops (float64)."""
    z = np.concatenate([a, b]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(a)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        logits = np.array([z[i] @ z[j] / tau for j in range(2 * n) if j != i])
        m = logits.max()
        total += -(z[i] @ z[pos] / tau) + m + np.log(np.exp(logits - m).sum())
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.5, 0.1, -0.7, 0.02])
def test_ntxent_matches_loop_reference_and_optax(tau):
    a, b = _views()
    np.testing.assert_allclose(S.ntxent_loss(a, b, temperature=tau),
                               _numpy_ntxent(np.asarray(a), np.asarray(b), tau), rtol=2e-5)
    if tau > 0:  # optax's ntxent: labels mark positives; same loss for two views
        labels = jnp.concatenate([jnp.arange(6), jnp.arange(6)])
        with jax.numpy_dtype_promotion("standard"):  # optax itself is not strict-clean
            ref = optax.losses.ntxent(jnp.concatenate([a, b]), labels, temperature=tau)
        np.testing.assert_allclose(S.ntxent_loss(a, b, temperature=tau), ref, rtol=2e-5)


def test_ntxent_small_temperature_does_not_overflow():
    """quadra's exp-form SimCLR overflows below τ≈0.012; the logsumexp form does not."""
    a, b = _views()
    loss, grads = jax.value_and_grad(S.ntxent_loss, argnums=(0, 1))(a, b, temperature=1e-3)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("b", [1, 2, 7])
def test_ntxent_collinear_closed_form(b):
    """All embeddings collinear: every logit equal, loss = log(2B − 1)."""
    x = jnp.ones((b, 4))
    np.testing.assert_allclose(S.ntxent_loss(x, 3 * x), np.log(2 * b - 1), rtol=1e-6, atol=1e-7)


def test_memory_bank_collinear_closed_form():
    """A bank full of the same direction: loss = log(M + 1) (lightly's test)."""
    x = jnp.ones((4, 3))
    bank = S.init_memory_bank(jax.random.key(0), 12, 3)
    for _ in range(3):
        _, bank = S.ntxent_memory_bank_loss(x, x, bank)
    loss, _ = S.ntxent_memory_bank_loss(x, x, bank)
    np.testing.assert_allclose(loss, np.log(13), rtol=1e-6)


def test_memory_bank_negatives_are_stop_gradient_and_read_before_update():
    a, b = _views(4, 3)
    bank = S.init_memory_bank(jax.random.key(1), 5, 3)
    g = jax.grad(lambda s: S.ntxent_memory_bank_loss(a, b, s)[0], allow_int=True)(bank)
    assert np.all(np.asarray(g.bank) == 0)
    z0, z1 = (np.asarray(x) / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    logits = np.concatenate([(z0 * z1).sum(1, keepdims=True), z0 @ np.asarray(bank.bank).T], 1)
    ref = np.mean(np.log(np.exp(logits / 0.5).sum(1)) - logits[:, 0] / 0.5)
    np.testing.assert_allclose(S.ntxent_memory_bank_loss(a, b, bank)[0], ref, rtol=1e-5)


def test_memory_bank_update_false_and_eval_shape():
    a, b = _views(4, 3)
    bank = S.init_memory_bank(jax.random.key(1), 5, 3)
    _, same = S.ntxent_memory_bank_loss(a, b, bank, update=False)
    assert same is bank
    shapes = jax.eval_shape(lambda k: S.init_memory_bank(k, 7, 3, jnp.bfloat16),
                            jax.random.key(0))
    assert shapes.bank.shape == (7, 3) and shapes.bank.dtype == jnp.bfloat16
    assert shapes.ptr.shape == () and shapes.ptr.dtype == jnp.int32


def test_init_memory_bank_rows_are_unit_vectors():
    bank = S.init_memory_bank(jax.random.key(3), 64, 16)
    np.testing.assert_allclose(np.linalg.norm(bank.bank, axis=1), 1.0, rtol=1e-6)
    assert int(bank.ptr) == 0


@pytest.mark.parametrize("size,batches", [(5, [2, 2, 2]), (4, [3, 3]), (3, [5]), (4, [4, 1])])
def test_enqueue_is_fifo_with_wraparound(size, batches):
    state = S.MemoryBankState(jnp.zeros((size, 1)), jnp.zeros((), jnp.int32))
    ref, ptr, counter = np.zeros((size, 1)), 0, 1.0
    for b in batches:
        x = np.arange(counter, counter + b, dtype=np.float32)[:, None]
        counter += b
        state = jax.jit(S.memory_bank_enqueue)(state, x)
        for row in x:
            ref[ptr] = row
            ptr = (ptr + 1) % size
        np.testing.assert_array_equal(state.bank, ref)
        assert int(state.ptr) == ptr


def test_memory_bank_accepts_bfloat16_queries():
    """lightly fails for a bf16 query against its float32 bank."""
    a, b = _views(4, 3)
    bank = S.init_memory_bank(jax.random.key(0), 8, 3)
    loss, new = S.ntxent_memory_bank_loss(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), bank)
    assert loss.dtype == jnp.float32 and new.bank.dtype == jnp.float32


def test_dcl_with_constant_weight_fn_is_dcl():
    a, b = _views()
    ones = lambda x, y: jnp.ones(x.shape[0])
    np.testing.assert_allclose(S.dcl_loss(a, b, weight_fn=ones), S.dcl_loss(a, b), rtol=1e-6)


def test_dcl_weight_fn_called_per_direction_on_normalized_inputs():
    a, b = _views()
    calls = []

    def weight_fn(x, y):
        calls.append((np.asarray(x), np.asarray(y)))
        return jnp.full((x.shape[0],), 2.0)

    S.dcl_loss(a, b, weight_fn=weight_fn)
    (x0, y0), (x1, y1) = calls
    np.testing.assert_allclose(np.linalg.norm(x0, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(x0, y1, rtol=1e-6)  # second call swaps the roles
    np.testing.assert_allclose(y0, x1, rtol=1e-6)


def test_dclw_is_dcl_with_negative_mises_fisher_weights():
    a, b = _views()
    w = lambda x, y: S.negative_mises_fisher_weights(x, y, sigma=0.7)
    np.testing.assert_allclose(S.dclw_loss(a, b, sigma=0.7), S.dcl_loss(a, b, weight_fn=w),
                               rtol=1e-6)


def test_negative_mises_fisher_weights_values():
    a, b = _views()
    za, zb = (np.asarray(x) / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    s = (za * zb).sum(1) / 0.5
    ref = 2 - len(s) * np.exp(s) / np.exp(s).sum()
    np.testing.assert_allclose(S.negative_mises_fisher_weights(a, b), ref, rtol=1e-5)
    assert np.isclose(np.mean(S.negative_mises_fisher_weights(a, b)), 1.0)


@pytest.mark.parametrize("sigma", [1e-7, 0.5, 1e4])
def test_negative_mises_fisher_weights_extreme_sigma_finite(sigma):
    a, b = _views()
    assert np.all(np.isfinite(S.negative_mises_fisher_weights(a, b, sigma=sigma)))


def test_dclw_gradient_is_dcl_gradient_with_frozen_weights():
    """DCLW's weights are stop-gradient: its gradient is that of DCL with the weights held
    constant, which check_grads can verify by finite differences."""
    with jax.enable_x64(True):
        a, b = (x.astype(jnp.float64) for x in _views(5, 4))
        w = S.negative_mises_fisher_weights(a, b)
        frozen = lambda x, y: S.dcl_loss(x, y, weight_fn=lambda *_: w)
        check_grads(frozen, (a, b), order=1, modes=("rev",))
        g_dclw = jax.grad(S.dclw_loss, argnums=(0, 1))(a, b)
        g_frozen = jax.grad(frozen, argnums=(0, 1))(a, b)
        for g1, g2 in zip(g_dclw, g_frozen):
            np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("exclude_positive", [False, True])
@pytest.mark.parametrize("tau", [0.5, -0.3, 0.05])
def test_symmetric_vjp_matches_autodiff_path(exclude_positive, tau):
    """One device uses custom VJPs exploiting the symmetric logits (dense, and tiled in
    3-row tiles with padding); both must equal plain autodiff of the masked logsumexp,
    incl. d/dτ."""
    from sslloss_jax._contrastive import _candidates, _two_view_contrastive
    from sslloss_jax._numerics import masked_logsumexp

    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        z0, z1 = (jnp.asarray(rng.standard_normal((5, 3))) for _ in range(2))
        z0, z1 = (z / jnp.linalg.norm(z, axis=1, keepdims=True) for z in (z0, z1))
        w = jnp.asarray(rng.uniform(0.5, 1.5, 10))

        def loss(z0, z1, t, w, impl):
            if impl == "autodiff":
                z = jnp.concatenate([z0, z1])
                rows = jnp.arange(10, dtype=jnp.int32)
                view, sample = rows // 5, rows % 5
                mask = _candidates(view * 5 + sample,
                                   (1 - view) * 5 + sample if exclude_positive else None, 10)
                pos = jnp.concatenate([jnp.sum(z0 * z1, 1)] * 2) / t * w
                return jnp.mean(masked_logsumexp(z @ z.T / t, mask, axis=1) - pos)
            return _two_view_contrastive(z0, z1, t, None, exclude_positive=exclude_positive,
                                         pos_weight=w, implementation=impl, block_size=3)

        grads = [jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(z0, z1, tau, w, impl)
                 for impl in ("autodiff", "dense", "tiled")]
        for g in grads[1:]:
            assert_tree_close(g, grads[0], rtol=1e-10, atol=1e-12)
        for impl in ("dense", "tiled"):
            check_grads(lambda a, b, t, impl=impl: loss(a, b, t, w, impl), (z0, z1, tau),
                        order=1, modes=("rev",))


@pytest.mark.parametrize("block_size", [2, 3, 4, 6, 16])
@pytest.mark.parametrize("loss", ["ntxent", "dcl", "dclw", "supcon"])
def test_tiled_symmetric_kernel_matches_dense(loss, block_size):
    """The one-device tiled kernel, from three blocks on over the diagonal tiles and the
    upper triangle only (an off-diagonal tile serves its rows and, transposed, its
    columns), below over every tile: value and gradients equal the dense path's, with a
    padded last block (11 or 22 rows), labels (SupCon's positives) and excluded
    positives (DCL)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        z0, z1 = (jnp.asarray(rng.standard_normal((11, 5))) for _ in range(2))
        labels = jnp.asarray(rng.integers(0, 4, 11))

        def fn(z0, z1, t, impl):
            kw = dict(temperature=t, implementation=impl, block_size=block_size)
            if loss == "supcon":
                return S.supcon_loss(z0, labels, **kw)
            return getattr(S, f"{loss}_loss")(z0, z1, **kw)

        want = jax.value_and_grad(fn, argnums=(0, 1, 2))(z0, z1, 0.3, "dense")
        got = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)), static_argnums=3)(
            z0, z1, 0.3, "tiled")
        assert_tree_close(got, want, rtol=1e-10, atol=1e-12)


def test_co2_lightly_value_gradient_and_bank():
    r = lambda s, sh: np.random.RandomState(s).standard_normal(sh).astype(np.float32)
    x0, x1 = r(0, (6, 8)), r(1, (6, 8))
    np.testing.assert_allclose(S.co2_regularizer(x0, x1), 3.962177, rtol=1e-5)
    g = jax.grad(S.co2_regularizer, argnums=(0, 1))(x0, x1)
    assert all(np.any(gi != 0) for gi in g)  # lightly's is detached (no gradient)
    np.testing.assert_allclose(S.co2_regularizer(x0, x1, alpha=0.5),
                               0.5 * S.co2_regularizer(x0, x1), rtol=1e-6)
    bank = S.init_memory_bank(jax.random.key(0), 10, 8)
    reg, new = S.co2_memory_bank_regularizer(x0, x1, bank)
    assert reg > 0 and int(new.ptr) == 6
    z0, z1 = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (x0, x1))

    def logp(a, b):
        logits = np.concatenate([(a * b).sum(1, keepdims=True), a @ np.asarray(bank.bank).T], 1)
        logits = logits / 0.05
        return logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                               keepdims=True)) - logits.max(1, keepdims=True)

    p, q = logp(z0, z1), logp(z1, z0)
    ref = 0.5 * np.sum((np.exp(q) - np.exp(p)) * (q - p)) / 6
    np.testing.assert_allclose(reg, ref, rtol=1e-4)
