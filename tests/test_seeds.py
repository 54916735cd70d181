"""Seed-library variants and beyond-lightly losses: fovi SimCLR (pairs_per_sample), nidl
InfoNCE / y-Aware InfoNCE, quadra BYOL regression / SimSiam / IDMM, NNCLR, ReSSL and
VIbCReg against independent NumPy float64 transcriptions of the source formulas, closed
forms on degenerate inputs, queue timing, float64 gradients, half precision and bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sslloss_jax as S

RNG = np.random.default_rng(7)


def _x(*shape):
    return RNG.standard_normal(shape)


def _norm(x, axis=-1, eps=1e-12):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def _lse(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def _log_softmax(x, axis=-1):
    return x - np.expand_dims(_lse(x, axis), axis)


def _close(a, b, rtol=1e-10):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol,
                               atol=1e-12)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------- references
def np_fovi(zi, zj, p, t):
    """fovi SimCLRLoss.compute_logits/forward, transcribed: N = 2·P·B rows, positives on
    the ±P·B off-diagonals, negatives = rows whose image (batch_index) differs."""
    n = 2 * zi.shape[0]
    z = _norm(np.concatenate([zi, zj]))
    sim = z @ z.T / t
    half = n // 2
    pos = np.concatenate([np.diag(sim, half), np.diag(sim, -half)])
    image = np.tile(np.repeat(np.arange(half // p), p), 2)
    mask = image[None, :] != image[:, None]
    neg = sim[mask].reshape(n, -1)
    logits = np.concatenate([pos[:, None], neg], axis=1)
    return -logits[:, 0].mean(), _lse(logits, 1).mean()


def np_y_aware(z1, z2, y, kernel, bw, t):
    """nidl YAwareInfoNCE.forward with labels, transcribed (weights /= weights.sum(axis=1)
    broadcasts: column sums)."""
    n = len(z1)
    s11, s22, s12 = (_norm(a) @ _norm(b).T / t for a, b in ((z1, z1), (z2, z2), (z1, z2)))
    s11 = s11 - 1e8 * np.eye(n)
    s22 = s22 - 1e8 * np.eye(n)
    sim = np.block([[s11, s12], [s12.T, s22]])
    ys = np.tile(y.reshape(n, -1), (2, 1)) / np.sqrt(np.broadcast_to(bw, y.reshape(n, -1)[0].shape))
    d = np.sqrt(((ys[:, None, :] - ys[None, :, :]) ** 2).sum(-1))
    k = {"gaussian": np.exp(-d ** 2 / 2), "epanechnikov": (1 - d ** 2) * (d < 1),
         "exponential": np.exp(-d), "linear": (1 - d) * (d < 1),
         "cosine": np.cos(np.pi * d / 2) * (d < 1)}[kernel]
    w = k * (1 - np.eye(2 * n))
    w = w / w.sum(axis=1)
    return -(w * _log_softmax(sim, 1)).sum() / n


def np_nnclr(z, p, queue, t):
    """solo-learn NNCLR: find_nn on the normalized z, then nnclr_loss_func(nn, p)."""
    zn = _norm(z)
    nn = _norm(queue[np.argmax(zn @ queue.T, axis=1)])
    logits = nn @ _norm(p).T / t
    return np.mean(_lse(logits, 1) - np.diag(logits))


def np_ressl(q, k, queue, tq, tk):
    lq = _log_softmax(_norm(q) @ queue.T / tq, 1)
    pk = np.exp(_log_softmax(_norm(k) @ queue.T / tk, 1))
    return -np.mean(np.sum(pk * lq, axis=1))


def np_vibcreg(z1, z2, lam=25.0, mu=25.0, nu=200.0):
    """solo-learn vibcreg_loss_func, transcribed."""
    sim = np.mean((z1 - z2) ** 2)
    var = sum(np.mean(np.maximum(0, 1 - np.sqrt(z.var(axis=0, ddof=1) + 1e-4))) for z in (z1, z2))
    cov = 0.0
    for z in (z1, z2):
        c = _norm(z - z.mean(0), axis=0)
        m = c.T @ c
        np.fill_diagonal(m, 0.0)
        cov += np.mean(m ** 2)
    return lam * sim + mu * var + nu * cov, (sim, var, cov)


# ----------------------------------------------------------------------------- fovi
@pytest.mark.parametrize("p,b", [(1, 5), (2, 3), (3, 2)])
def test_fovi_simclr_matches_numpy(p, b):
    zi, zj = _x(b * p, 4), _x(b * p, 4)
    terms = jax.jit(lambda a, c: S.fovi_simclr_terms(a, c, pairs_per_sample=p,
                                                     temperature=0.3))(zi, zj)
    _close(list(terms), np_fovi(zi, zj, p, 0.3))


def test_fovi_one_pair_is_ntxent_and_supcon_shares_the_primitive():
    zi, zj = _x(6, 5), _x(6, 5)
    f = jax.jit(lambda a, c: (S.fovi_simclr_loss(a, c), S.ntxent_loss(a, c),
                              S.supcon_loss(jnp.concatenate([a, c]), jnp.tile(jnp.arange(6), 2),
                                            temperature=0.5)))
    fovi, ntxent, supcon = f(zi, zj)
    _close(fovi, ntxent)
    _close(supcon, ntxent)


def test_fovi_one_image_has_no_negatives():
    """A single image with P pairs: every denominator is the positive alone, loss 0."""
    z = _x(3, 4)
    _close(jax.jit(lambda a: S.fovi_simclr_loss(a, 2 * a, pairs_per_sample=3))(z), 0.0)


def test_fovi_check_grads():
    zi, zj = _x(6, 3), _x(6, 3)
    check_grads(jax.jit(lambda a, c: S.fovi_simclr_loss(a, c, pairs_per_sample=3)), (zi, zj),
                order=1, modes=("rev",))


# ----------------------------------------------------------------------------- nidl
@pytest.mark.parametrize("kernel", ["gaussian", "epanechnikov", "exponential", "linear",
                                    "cosine"])
def test_y_aware_matches_numpy_with_vector_bandwidth(kernel):
    z1, z2 = _x(5, 4), _x(5, 4)
    y = RNG.uniform(0, 2, (5, 2))
    bw = np.array([0.5, 2.0])
    loss = jax.jit(lambda a, b, yy: S.y_aware_infonce_loss(a, b, yy, kernel=kernel,
                                                           bandwidth=bw))(z1, z2, y)
    _close(loss, np_y_aware(z1, z2, y, kernel, bw, 0.1))


def test_y_aware_closed_forms():
    z1, z2 = _x(6, 4), _x(6, 4)
    f = jax.jit(lambda a, b, y: S.y_aware_infonce_loss(a, b, y, kernel="linear"))
    infonce = S.infonce_loss(z1, z2)
    # compact kernel, labels further apart than the support: only the other view weighs
    _close(f(z1, z2, 10.0 * np.arange(6)), 2 * infonce)
    _close(S.y_aware_infonce_loss(z1, z2, None), infonce)
    _close(infonce, S.ntxent_loss(z1, z2, temperature=0.1))
    # a zero bandwidth entry ignores that metadata feature (as nidl)
    y = RNG.uniform(0, 2, (6, 2))
    g = jax.jit(lambda a, b, y, h: S.y_aware_infonce_loss(a, b, y, bandwidth=h))
    _close(g(z1, z2, y, jnp.array([1.0, 0.0])), g(z1, z2, y[:, :1], jnp.array(1.0)))


def test_y_aware_check_grads_and_no_label_gradient():
    z1, z2, y = _x(4, 3), _x(4, 3), RNG.uniform(0, 2, (4, 2))
    f = jax.jit(lambda a, b, yy: S.y_aware_infonce_loss(a, b, yy, kernel="gaussian",
                                                        bandwidth=np.array([1.0, 2.0])))
    check_grads(lambda a, b: f(a, b, y), (z1, z2), order=1, modes=("rev",))
    assert np.all(jax.grad(f, argnums=2)(z1, z2, y) == 0)
    # a traced bandwidth gets its gradient through the kernel weights (on one device they
    # enter symmetric_lse_linear's custom VJP), and the views theirs at any bandwidth
    fh = jax.jit(lambda a, b, h: S.y_aware_infonce_loss(a, b, y, kernel="gaussian",
                                                        bandwidth=h))
    check_grads(fh, (z1, z2, jnp.asarray([1.0, 2.0])), order=1, modes=("rev",))
    assert np.all(np.abs(jax.grad(fh, argnums=2)(z1, z2, jnp.asarray([1.0, 2.0]))) > 0)


# ----------------------------------------------------------------------------- quadra
def test_byol_regression_and_simsiam():
    x, y = _x(5, 4), _x(5, 4)
    ref = np.mean(2 - 2 * np.sum(_norm(x) * _norm(y), axis=1))
    f = jax.jit(S.byol_regression_loss)
    _close(f(x, y), ref)
    _close(f(x, y), 2 + 2 * S.negative_cosine_similarity(x, y))
    _close(f(x, 3 * x), 0.0)
    _close(f(x, -x), 4.0)
    p1, p2, z1, z2 = _x(5, 4), _x(5, 4), _x(5, 4), _x(5, 4)
    cos = lambda a, b: np.sum(_norm(a) * _norm(b), axis=1)
    ref = -0.5 * (cos(p1, z2).mean() + cos(p2, z1).mean())  # quadra SimSIAMLoss
    g = jax.jit(jax.value_and_grad(S.simsiam_loss, argnums=(0, 1, 2, 3)))
    loss, grads = g(p1, p2, z1, z2)
    _close(loss, ref)
    _close(loss, S.sym_negative_cosine_similarity_loss((z1, p1), (z2, p2)))
    assert np.all(grads[2] == 0) and np.all(grads[3] == 0) and np.any(grads[0] != 0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_idmm_matches_numpy(eps):
    p, y = 3 * _x(6, 5), RNG.integers(0, 5, 6)
    lp = _log_softmax(p, 1)
    ref = np.mean(-(1 - eps) * lp[np.arange(6), y] - eps * lp.mean(axis=1))
    _close(jax.jit(lambda a, b: S.idmm_loss(a, b, smoothing=eps))(p, y), ref)


def test_idmm_out_of_range_label_is_nan():
    assert np.isnan(jax.jit(S.idmm_loss)(_x(2, 3), jnp.array([0, 3])))


# ----------------------------------------------------------------------------- NNCLR
def _queue(size, dim):
    return S.init_memory_bank(jax.random.key(3), size, dim, jnp.float64)


def test_nnclr_matches_numpy_and_queue_timing():
    z, p = _x(4, 3), _x(4, 3)
    q = _queue(6, 3)
    f = jax.jit(lambda a, b, s: S.nnclr_loss(a, b, s, temperature=0.2))
    loss, new = f(z, p, q)
    _close(loss, np_nnclr(z, p, np.asarray(q.bank), 0.2))  # neighbours: queue before update
    expected = np.asarray(q.bank).copy()
    expected[[0, 1, 2, 3]] = _norm(z)
    _close(new.bank, expected)
    assert int(new.ptr) == 4
    loss2, newer = f(z, p, new)  # wraps around: rows 4, 5, 0, 1
    expected[[4, 5, 0, 1]] = _norm(z)
    _close(newer.bank, expected)
    assert int(newer.ptr) == 2
    _close(loss2, np_nnclr(z, p, np.asarray(new.bank), 0.2))
    frozen = S.nnclr_loss(z, p, q, update=False)[1]
    assert frozen is q


def test_nnclr_gradients_only_reach_p():
    z, p = _x(4, 3), _x(4, 3)
    q = _queue(5, 3)
    f = jax.jit(lambda a, b: S.nnclr_loss(a, b, q)[0])
    gz, _ = jax.grad(f, argnums=(0, 1))(z, p)
    assert np.all(gz == 0)
    check_grads(lambda b: f(z, b), (p,), order=1, modes=("rev",))


# ----------------------------------------------------------------------------- ReSSL
def test_ressl_matches_numpy_and_closed_form():
    q_, k_ = _x(4, 3), _x(4, 3)
    queue = _queue(7, 3)
    f = jax.jit(lambda a, b, s, tq, tk: S.ressl_loss(a, b, s, temperature_q=tq,
                                                     temperature_k=tk))
    loss, new = f(q_, k_, queue, 0.1, 0.04)
    _close(loss, np_ressl(q_, k_, np.asarray(queue.bank), 0.1, 0.04))
    _close(new.bank[:4], _norm(k_))
    # equal distributions: the cross-entropy is the target's entropy
    loss_eq, _ = f(q_, q_, queue, 0.2, 0.2)
    lp = _log_softmax(_norm(q_) @ np.asarray(queue.bank).T / 0.2, 1)
    _close(loss_eq, -np.mean(np.sum(np.exp(lp) * lp, axis=1)))
    g = jax.grad(lambda a, b: f(a, b, queue, 0.1, 0.04)[0], argnums=(0, 1))(q_, k_)
    assert np.all(g[1] == 0)
    check_grads(lambda a: f(a, k_, queue, 0.1, 0.04)[0], (q_,), order=1, modes=("rev",))


# ----------------------------------------------------------------------------- VIbCReg
def test_vibcreg_matches_numpy_both_methods():
    z1, z2 = _x(6, 4), _x(6, 4)  # N > D (feature path) and N < D (Gram path) below
    for a, b in ((z1, z2), (_x(3, 7), _x(3, 7))):
        ref, terms = np_vibcreg(a, b)
        for method in ("gram", "feature"):
            f = jax.jit(lambda x, y, m=method: (S.vibcreg_loss(x, y, method=m),
                                                S.vibcreg_terms(x, y, method=m)))
            loss, t = f(a, b)
            _close(loss, ref)
            _close(list(t), terms)
    same = S.vibcreg_terms(z1, z1)
    _close(same.invariance, 0.0)
    check_grads(jax.jit(S.vibcreg_loss), (z1, z2), order=1, modes=("rev",), rtol=1e-5)


# ----------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_finite(dtype):
    zi, zj = (jnp.asarray(_x(6, 4), dtype) for _ in range(2))
    y = jnp.asarray(RNG.uniform(0, 2, (6, 2)), jnp.float32)
    q = S.init_memory_bank(jax.random.key(0), 8, 4)

    def losses(a, b):
        return jnp.stack([
            S.fovi_simclr_loss(a, b, pairs_per_sample=3),
            S.y_aware_infonce_loss(a, b, y, bandwidth=jnp.array([1.0, 2.0])),
            S.nnclr_loss(a, b, q)[0], S.ressl_loss(a, b, q)[0], S.vibcreg_loss(a, b),
            S.idmm_loss(a, jnp.arange(6) % 4), S.byol_regression_loss(a, b),
        ])

    values, grads = jax.jit(lambda a, b: (losses(a, b),
                                          jax.grad(lambda u, v: jnp.sum(losses(u, v)),
                                                   argnums=(0, 1))(a, b)))(zi, zj)
    assert values.dtype == jnp.float32 and np.all(np.isfinite(values))
    for g in grads:
        assert g.dtype == dtype and np.all(np.isfinite(np.asarray(g, np.float32)))


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    a, b = jnp.asarray(_x(6, 4)), jnp.asarray(_x(6, 4))
    q = _queue(5, 4)
    cases = [
        (lambda: S.fovi_simclr_loss(a, b, pairs_per_sample=4), ValueError,
         r"z_i must have a multiple of pairs_per_sample=4 rows.*\(6, 4\)"),
        (lambda: S.fovi_simclr_loss(a, b, pairs_per_sample=0), ValueError, "pairs_per_sample"),
        (lambda: S.fovi_simclr_loss(a, b, pairs_per_sample=1.5), ValueError, "pairs_per_sample"),
        (lambda: S.fovi_simclr_loss(a, b[:, :3]), ValueError, r"z_i and z_j.*\(6, 3\)"),
        (lambda: S.infonce_loss(a.astype(jnp.int32), b), TypeError, "z1 must have a floating"),
        (lambda: S.y_aware_infonce_loss(a, b, jnp.ones(5)), ValueError, r"labels.*\(5,\)"),
        (lambda: S.y_aware_infonce_loss(a, b, jnp.ones(6), kernel="box"), ValueError, "kernel"),
        (lambda: S.y_aware_infonce_loss(a, b, jnp.ones((6, 2)), bandwidth=jnp.ones(3)),
         ValueError, r"bandwidth.*\(2,\).*\(3,\)"),
        (lambda: S.y_aware_infonce_loss(a, b, jnp.ones(6), bandwidth=-1.0), ValueError,
         "bandwidth must be finite and >= 0"),
        (lambda: S.y_aware_infonce_loss(a, b, jnp.ones(6), bandwidth="scott"), ValueError,
         "bandwidth"),
        (lambda: S.y_aware_infonce_loss(a, b, jnp.ones(6) > 0), TypeError, "labels"),
        (lambda: S.y_aware_infonce_loss(a, b, jnp.ones(6), temperature=0.0), ValueError,
         "temperature"),
        (lambda: S.idmm_loss(a, jnp.ones(6)), TypeError, "y must have an integer dtype"),
        (lambda: S.idmm_loss(a, jnp.arange(5)), ValueError, r"y must have shape \(6,\)"),
        (lambda: S.idmm_loss(a, jnp.arange(6), smoothing=1.5), ValueError, "smoothing"),
        (lambda: S.byol_regression_loss(a, b[:3]), ValueError, r"x and y.*\(3, 4\)"),
        (lambda: S.simsiam_loss(a, b, a, b[:, :2]), ValueError, r"p1 and z2"),
        (lambda: S.nnclr_loss(a, b, _queue(5, 3)), ValueError, "queue.bank has feature"),
        (lambda: S.nnclr_loss(a, b[:, :3], q), ValueError, r"z and p.*\(6, 3\)"),
        (lambda: S.ressl_loss(a, b, q, temperature_q=0.0), ValueError, "temperature_q"),
        (lambda: S.ressl_loss(a, b, q, temperature_k=np.ones(2)), ValueError, "temperature_k"),
        (lambda: S.ressl_loss(a, b, (q.bank, q.ptr)), TypeError, "queue must be a MemoryBank"),
        (lambda: S.vibcreg_loss(a[:1], b[:1]), ValueError, "VIbCReg.*at least 2"),
        (lambda: S.vibcreg_loss(a, b, cov_loss_weight=np.ones(2)), ValueError,
         "cov_loss_weight"),
    ]
    for fn, err, match in cases:
        with pytest.raises(err, match=match):
            fn()
