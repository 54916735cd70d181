"""W-MSE: whitening (Cholesky) of random sub-batches, then a normalized MSE between views.

The whitening of lightly's ``Whitening2d`` is :func:`whiten`; :func:`wmse_loss` is
``WMSELoss``. The running mean and covariance that lightly keeps in module buffers are an
explicit :class:`WMSEState`, and the random sub-batch permutation comes from an explicit
PRNG key (or from explicit ``permutations``, e.g. lightly's recorded ``randperm`` draws).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular

from sslloss_jax import _collectives as coll
from sslloss_jax import _validation as val
from sslloss_jax._numerics import cosine_similarity, upcast
from sslloss_jax._types import ArrayLike, AxisName

__all__ = ["WMSEState", "init_wmse_state", "whiten", "wmse_loss"]

_HIGHEST = lax.Precision.HIGHEST  # covariances feed a Cholesky: no TF32/bf16 passes


class WMSEState(NamedTuple):
    """Running statistics of the whitening (lightly's ``Whitening2d`` buffers).

    Attributes:
      mean: ``[dim]`` running mean (lightly's ``running_mean`` of shape (1, D, 1, 1)).
      covariance: ``[dim, dim]`` running (unshrunk, unbiased) covariance (lightly's
        ``running_variance``).
    """

    mean: jax.Array
    covariance: jax.Array


def init_wmse_state(embedding_dim: int, dtype: jnp.dtype = jnp.float32) -> WMSEState:
    """A zero mean and an identity covariance of dimension ``embedding_dim`` (as lightly).

    Pure: works under ``jax.jit`` and ``jax.eval_shape``.
    """
    val.check_state_spec(dtype, embedding_dim=embedding_dim)
    return WMSEState(jnp.zeros((embedding_dim,), dtype), jnp.eye(embedding_dim, dtype=dtype))


# ----------------------------------------------------------------------------- helpers
def _check_state(state: WMSEState, dim: int, name: str = "state") -> None:
    if not isinstance(state, WMSEState):
        raise TypeError(
            f"{name} must be a WMSEState (see init_wmse_state), got {type(state).__name__}"
        )
    if jnp.shape(state.mean) != (dim,):
        raise ValueError(
            f"{name}.mean must have shape ({dim},) to match the embedding dimension, "
            f"got {jnp.shape(state.mean)}"
        )
    if jnp.shape(state.covariance) != (dim, dim):
        raise ValueError(
            f"{name}.covariance must have shape ({dim}, {dim}), got "
            f"{jnp.shape(state.covariance)}"
        )
    for field in ("mean", "covariance"):
        dt = jnp.asarray(getattr(state, field)).dtype
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"{name}.{field} must be floating, got {dt}")




def _scalar(value: ArrayLike, dtype) -> jax.Array:
    """A validated hyperparameter as a scalar of the compute dtype (strict promotion)."""
    return jnp.asarray(value).astype(dtype)


def _cov(xc: jax.Array, count: int) -> jax.Array:
    """``xcᵀxc / (count − 1)`` over axis -2: ``[..., n, D] -> [..., D, D]``."""
    return jnp.einsum("...nd,...ne->...de", xc, xc, precision=_HIGHEST) / (count - 1)


def _whiten_centered(xc: jax.Array, cov: jax.Array, eps: jax.Array) -> jax.Array:
    """``xc L⁻ᵀ`` with ``L Lᵀ = (1 − eps)·cov + eps·I``: ``[..., n, D]``, ``[..., D, D]``."""
    d = cov.shape[-1]
    if cov.ndim == 2 and xc.ndim > 2:  # one factor for every block: solve them at once
        return _whiten_centered(xc.reshape(-1, d), cov, eps).reshape(xc.shape)
    eye = jnp.broadcast_to(jnp.eye(d, dtype=cov.dtype), cov.shape)
    chol = jnp.linalg.cholesky((1 - eps) * cov + eps * eye)
    # z = xc Wᵀ with W = L⁻¹ (lightly's inv_sqrt), W from one triangular solve against I.
    # Not a solve against xcᵀ: its backward has two independent triangular solves, and
    # jaxlib 0.10's CPU runtime can deadlock running LAPACK trsm calls concurrently (a
    # W-MSE train step hung after ~100 calls; jax 0.12 does not). Here every trsm of the
    # forward and backward pass depends on the previous one.
    w = solve_triangular(chol, eye, lower=True)
    return jnp.einsum("...nd,...ed->...ne", xc, w, precision=_HIGHEST)


def _whiten_batch(x: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Whitening by each group's own statistics: for ``x [..., n, D]`` returns ``(z, mean,
    cov)`` with ``mean [..., 1, D]`` and the unbiased ``cov [..., D, D]`` (both
    stop-gradient: they only feed the running statistics) and ``z = (x − mean) L⁻ᵀ``,
    ``L Lᵀ = (1 − eps)·cov + eps·I``: :func:`_whiten_centered` of the group's statistics,
    with a closed-form VJP.

    With ``G = ∂/∂z``, ``W = L⁻¹`` and ``Φ`` the lower triangle with its diagonal halved
    (the adjoint of the Cholesky factorization's JVP), the cotangent of the centered
    inputs is ``[G + (1 − eps)/(n − 1) · z (Φ(−Gᵀz) + Φ(−Gᵀz)ᵀ)] W``, then centered
    over the group's rows: two ``n·D²`` products and ``Gᵀz`` in place of autodiff's
    triangular solves and Cholesky backward (W-MSE ``256×128``: about 2× faster).
    """
    z, mean, cov = _whiten_batch_core(x, eps)
    return z, lax.stop_gradient(mean), lax.stop_gradient(cov)


@jax.custom_vjp
def _whiten_batch_core(x: jax.Array, eps: jax.Array):
    return _whiten_batch_fwd(x, eps)[0]


def _whiten_batch_fwd(x, eps):
    n, d = x.shape[-2:]
    mean = jnp.mean(x, axis=-2, keepdims=True)
    xc = x - mean
    cov = _cov(xc, n)
    eye = jnp.broadcast_to(jnp.eye(d, dtype=cov.dtype), cov.shape)
    chol = jnp.linalg.cholesky((1 - eps) * cov + eps * eye)
    w = solve_triangular(chol, eye, lower=True)  # against I: see _whiten_centered
    z = jnp.einsum("...nd,...ed->...ne", xc, w, precision=_HIGHEST)
    return (z, mean, cov), (z, w, cov, eps)


def _whiten_batch_bwd(res, cts):
    z, w, cov, eps = res
    g = cts[0]  # mean and cov leave the wrapper stop-gradient: their cotangents are 0
    n, d = z.shape[-2:]
    eye = jnp.broadcast_to(jnp.eye(d, dtype=cov.dtype), cov.shape)
    phi = -jnp.einsum("...nd,...ne->...de", g, z, precision=_HIGHEST)  # −Gᵀz
    phi = jnp.tril(phi) - 0.5 * eye * phi
    sym = phi + jnp.swapaxes(phi, -1, -2)
    inner = g + ((1 - eps) / (n - 1)) * jnp.matmul(z, sym, precision=_HIGHEST)
    gx = jnp.matmul(inner, w, precision=_HIGHEST)
    gx = gx - jnp.mean(gx, axis=-2, keepdims=True)
    # eps: A = (1 − eps)·cov + eps·I, so ∂/∂eps = ⟨Wᵀ Φ W, I − cov⟩ (dropped unless used)
    sig = jnp.swapaxes(w, -1, -2) @ phi @ w
    g_eps = jnp.sum(sig * (eye - cov))
    return gx, jnp.reshape(g_eps, jnp.shape(eps)).astype(jnp.result_type(eps))


_whiten_batch_core.defvjp(_whiten_batch_fwd, _whiten_batch_bwd)


def _ema(state: WMSEState, means: jax.Array, covs: jax.Array, momentum: jax.Array):
    """lightly's sequential update ``r ← m·s_k + (1 − m)·r`` over the stacked statistics
    ``means [K, D]``, ``covs [K, D, D]`` in order k = 0..K−1 (stop-gradient), in closed
    form: ``r_K = (1 − m)^K r_0 + Σ_k m (1 − m)^(K−1−k) s_k``."""
    dtype = means.dtype
    k = means.shape[0]
    decay = 1 - momentum
    weights = momentum * decay ** jnp.arange(k - 1, -1, -1).astype(dtype)  # [K]
    keep = decay**k
    mean0 = jnp.asarray(state.mean)
    cov0 = jnp.asarray(state.covariance)
    mean = keep * mean0.astype(dtype) + jnp.tensordot(weights, lax.stop_gradient(means), 1)
    cov = keep * cov0.astype(dtype) + jnp.tensordot(weights, lax.stop_gradient(covs), 1)
    return WMSEState(mean.astype(mean0.dtype), cov.astype(cov0.dtype))


def _check_hyper(momentum, eps, axis_name) -> None:
    val.check_axis_name(axis_name)
    val.check_in_range(momentum, "momentum", 0.0, 1.0)
    val.check_in_range(eps, "eps", 0.0, 1.0)


# ----------------------------------------------------------------------------- whiten
def whiten(
    x: ArrayLike,
    state: WMSEState,
    *,
    momentum: ArrayLike = 0.01,
    eps: ArrayLike = 0.0,
    train: bool = True,
    track_running_stats: bool = True,
    axis_name: AxisName = None,
) -> tuple[jax.Array, WMSEState]:
    r"""Whitens a batch with the inverse Cholesky factor of its covariance (lightly's
    ``Whitening2d``).

    .. math::
        \mu = \frac1n\sum_k x_k,\quad
        \Sigma = \frac{1}{n-1}\sum_k (x_k-\mu)(x_k-\mu)^\top,\quad
        (1-\epsilon)\Sigma + \epsilon I = L L^\top,\quad
        z_k = L^{-1}(x_k - \mu)

    In training mode (``train=True``) ``μ`` and ``Σ`` are the batch statistics
    (differentiated through, as lightly) and the state is **updated after** use:
    ``mean ← m·μ + (1−m)·mean``, ``covariance ← m·Σ + (1−m)·covariance`` (``Σ`` unshrunk,
    stop-gradient). In eval mode (``train=False``) the state's running statistics are
    **used** instead and returned unchanged. With ``track_running_stats=False`` the batch
    statistics are used in both modes and the state is never updated.

    Args:
      x: ``[batch, dim]`` inputs (global batch >= 2 when batch statistics are used).
      state: :class:`WMSEState` from :func:`init_wmse_state` with ``dim`` features.
      momentum: EMA weight of the new statistics, in [0, 1] (may be traced).
      eps: shrinkage in [0, 1] towards the identity (may be traced); 0 as lightly. Any
        ``eps > 0`` keeps the Cholesky factor defined for a rank-deficient batch (e.g.
        ``batch <= dim``); with ``eps = 0`` such a batch gives NaN (lightly raises).
      train: static; training (batch statistics, state update) or eval mode.
      track_running_stats: static; as lightly's flag.
      axis_name: optional axis; ``μ`` and ``Σ`` are those of the global batch (``psum``),
        so each device gets its rows of the global-batch whitening and the same new state.

    Returns:
      ``(z, new_state)`` with ``z`` of shape ``[batch, dim]`` in the compute dtype
      (at least float32).

    References:
      Ermolov et al., `Whitening for Self-Supervised Representation Learning
      <https://arxiv.org/abs/2007.06346>`_, 2021.
    """
    _check_hyper(momentum, eps, axis_name)
    x = val.as_float_array(x, "x", ndim=2)
    _check_state(state, x.shape[1])
    (x,) = upcast(x)
    dtype = x.dtype
    m, e = _scalar(momentum, dtype), _scalar(eps, dtype)
    use_batch = train or not track_running_stats
    if not use_batch:
        mean = jnp.asarray(state.mean).astype(dtype)[None]
        z = _whiten_centered(x - mean, jnp.asarray(state.covariance).astype(dtype), e)
        return z, state
    n = x.shape[0] * coll.axis_size(axis_name)
    val.check_min_batch(n, 2, "Whitening (unbiased covariance)", x.shape)
    if axis_name is None:
        z, mean, cov = _whiten_batch(x, e)
    else:  # the global statistics: autodiff through the collectives
        mean = coll.psum(jnp.sum(x, axis=0, keepdims=True), axis_name) / n
        xc = x - mean
        cov = coll.psum(jnp.einsum("nd,ne->de", xc, xc, precision=_HIGHEST), axis_name) / (n - 1)
        z = _whiten_centered(xc, cov, e)
    if not (train and track_running_stats):
        return z, state
    return z, _ema(state, mean, cov[None], m)


# ----------------------------------------------------------------------------- W-MSE
def _views(x, num_samples: int) -> list[jax.Array]:
    """The views of ``x``: a sample-major ``[batch·V, D]`` array or a sequence of
    ``[batch, D]`` arrays; validated, not yet upcast."""
    if isinstance(x, (list, tuple)):
        if len(x) != num_samples:
            raise ValueError(
                f"x is a sequence of {len(x)} views but num_samples={num_samples}"
            )
        return list(val.stack_views(x, "x"))
    arr = val.as_float_array(x, "x", ndim=2)
    if arr.shape[0] % num_samples:
        raise ValueError(
            f"x must have batch·num_samples rows (sample-major), but its {arr.shape[0]} rows "
            f"(shape {arr.shape}) are not a multiple of num_samples={num_samples}"
        )
    b = arr.shape[0] // num_samples
    return [arr[i * b : (i + 1) * b] for i in range(num_samples)]


def _check_permutations(permutations: ArrayLike, w_iter: int, batch: int) -> jax.Array:
    if isinstance(permutations, (list, tuple)):
        permutations = np.asarray(permutations)
    perms = jnp.asarray(permutations)
    if not jnp.issubdtype(perms.dtype, jnp.integer):
        raise TypeError(f"permutations must have an integer dtype, got {perms.dtype}")
    if perms.shape != (w_iter, batch):
        raise ValueError(
            f"permutations must have shape (w_iter, global batch) = ({w_iter}, {batch}), "
            f"got {perms.shape}"
        )
    try:  # concrete values are checked; traced ones cannot be and are trusted
        concrete = np.asarray(permutations)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        concrete = None
    if concrete is not None and not np.array_equal(
        np.sort(concrete, axis=1), np.broadcast_to(np.arange(batch), (w_iter, batch))
    ):
        raise ValueError(f"every row of permutations must be a permutation of range({batch})")
    return perms.astype(jnp.int32)


def wmse_loss(
    x: ArrayLike | Sequence[ArrayLike],
    state: WMSEState,
    key: jax.Array | None = None,
    *,
    embedding_dim: int = 128,
    momentum: ArrayLike = 0.01,
    eps: ArrayLike = 0.0,
    track_running_stats: bool = True,
    w_iter: int = 1,
    w_size: int = 256,
    num_samples: int = 2,
    train: bool = True,
    permutations: ArrayLike | None = None,
    axis_name: AxisName = None,
) -> tuple[jax.Array, WMSEState]:
    r"""W-MSE loss: whiten random sub-batches of each view, then a normalized MSE.

    For each of ``w_iter`` iterations ``t`` the batch of ``B`` samples is split by a random
    permutation into ``B / w_size`` sub-batches ``S``; every sub-batch of every view ``v``
    is whitened on its own (see :func:`whiten`),

    .. math::
        z^{v}_{t,k} = L_{t,S,v}^{-1}\,(x^{v}_k - \mu_{t,S,v}),\qquad
        L L^\top = (1-\epsilon)\Sigma_{t,S,v} + \epsilon I,\qquad k \in S,

    with the sub-batch mean ``μ`` and unbiased covariance ``Σ``; then

    .. math::
        L = \frac{1}{w_\text{iter}\binom{V}{2}}\sum_t\sum_{i<j}
            \Big(2 - \frac{2}{B}\sum_k \cos(z^{i}_{t,k}, z^{j}_{t,k})\Big).

    Args:
      x: the ``num_samples`` views of a batch of ``B`` samples: lightly's sample-major
        ``[B·num_samples, embedding_dim]`` array (view ``v`` in rows ``v·B … (v+1)·B − 1``)
        or a sequence of ``num_samples`` arrays ``[B, embedding_dim]``.
      state: :class:`WMSEState` (``embedding_dim`` features). In training mode its running
        statistics are **not used**; they are **updated after** each whitening, in
        lightly's order (iteration, sub-batch, view), with the unshrunk sub-batch
        statistics (stop-gradient). In eval mode (``train=False``) they are **used** to
        whiten every sub-batch and returned unchanged.
      key: PRNG key of the sub-batch permutations (the same on every device): iteration
        ``t`` uses row ``t`` of ``jax.random.permutation(key, rows, axis=1,
        independent=True)`` with ``rows = broadcast_to(arange(B), (w_iter, B))``. Not
        needed (``None``) when ``permutations`` is given, in eval mode with running
        statistics, or when the batch is a single sub-batch (``B = w_size``: the grouping
        is unique and no permutation is drawn).
      embedding_dim: must equal the last axis of ``x``; ``2·embedding_dim <= w_size``.
      momentum: EMA weight of the running statistics, in [0, 1] (may be traced).
      eps: shrinkage in [0, 1] of each covariance towards the identity (may be traced).
        0 as lightly, where a rank-deficient sub-batch has no Cholesky factor (NaN here,
        an error in lightly); any ``eps > 0`` keeps it defined.
      track_running_stats: static; as lightly (False: batch statistics in both modes, no
        update).
      w_iter: number of whitening iterations (independent permutations), averaged.
      w_size: sub-batch size; the (global) batch ``B`` must be a multiple of it.
      num_samples: number of views ``V >= 2``.
      train: static; training mode (lightly's ``module.train()``) or eval mode.
      permutations: optional ``[w_iter, B]`` integer array; row ``t`` is iteration ``t``'s
        permutation of the (global) batch, cut into consecutive sub-batches of
        ``w_size``: exactly lightly's ``torch.randperm(B).view(-1, w_size)``, so recorded
        draws reproduce lightly's value. Overrides ``key``; must be replicated.
      axis_name: optional axis. Each device passes its own views (a local sample-major
        ``[b·V, D]`` block or ``V`` arrays ``[b, D]``); the global batch's view ``v`` is
        the concatenation of every device's view ``v`` in ``axis_index`` order
        (``B = b·axis_size``). The views are gathered into that global batch (a ``psum`` of
        zero-padded blocks), and the permutations (the same key on every device), the
        whitening and the loss are computed on it identically on every device: loss,
        gradients and new state equal those of one device holding the global batch, and
        the loss and state are provably replicated. Costs ``B·V·D`` values of
        communication and the global whitening on every device (small: O(B·V·D²)).

    Returns:
      ``(loss, new_state)``; the loss is a scalar in the compute dtype (float32, or float64
      for float64 inputs).

    Raises:
      ValueError: ``2·embedding_dim > w_size`` (lightly's check), a last axis other than
        ``embedding_dim``, rows not a multiple of ``num_samples``, a (global) batch that is
        not a positive multiple of ``w_size`` (lightly fails inside ``view`` there), bad
        ``permutations`` or a missing ``key``, a state of the wrong shape.
      TypeError: non-floating inputs, a bad key.

    Differences from lightly:

    - the permutations come from ``key`` (or ``permutations``), not the global torch RNG;
    - a batch that is not a multiple of ``w_size`` is rejected with a clear error (lightly
      fails inside ``view``); in eval mode with running statistics nothing depends on
      ``w_size`` and any batch is accepted (lightly still requires ``B >= w_size``);
    - a rank-deficient sub-batch with ``eps = 0`` gives NaN instead of an exception (no
      branching on values); use ``eps > 0``;
    - statistics and whitening in at least float32 (half-precision inputs);
    - the state is returned, not mutated; the views may also be passed as a sequence;
    - only lightly's default ``loss_fn`` (``norm_mse_loss``);
    - under ``axis_name`` the sub-batches are drawn from the global batch (lightly has
      no distributed mode: each DDP rank whitens its own batch).

    References:
      Ermolov et al., `Whitening for Self-Supervised Representation Learning
      <https://arxiv.org/abs/2007.06346>`_, 2021.
    """
    _check_hyper(momentum, eps, axis_name)
    num_samples = val.check_int(num_samples, "num_samples", 2)
    views = _views(x, num_samples)
    local = views[0].shape
    embedding_dim = val.check_int(embedding_dim, "embedding_dim", 1)
    w_iter = val.check_int(w_iter, "w_iter", 1)
    w_size = val.check_int(w_size, "w_size", 1)
    if local[1] != embedding_dim:
        raise ValueError(
            f"x must have embedding_dim={embedding_dim} features, got views of shape {local}"
        )
    use_batch = train or not track_running_stats
    b_global = local[0] * coll.axis_size(axis_name)
    if use_batch:
        val.check_min_batch(b_global, 2, "W-MSE whitening (unbiased covariance)", local)
    if 2 * embedding_dim > w_size:
        raise ValueError(
            "w_size should be at least twice the size of embedding_dim to avoid instability, "
            f"got w_size={w_size} and embedding_dim={embedding_dim}"
        )
    if use_batch and b_global % w_size:
        raise ValueError(
            f"the global batch B={b_global} (views of local shape {local}"
            + (f" on {coll.axis_size(axis_name)} devices" if axis_name is not None else "")
            + f") must be a multiple of w_size={w_size}"
        )
    _check_state(state, embedding_dim)
    groups = b_global // w_size
    perms = None
    if permutations is not None:
        perms = _check_permutations(permutations, w_iter, b_global)
    elif key is not None:
        val.check_key(key)
    if use_batch and perms is None and groups > 1:
        if key is None:
            raise ValueError(
                f"key is required to draw the sub-batches ({groups} sub-batches of "
                f"w_size={w_size}); pass a PRNG key or explicit permutations"
            )
        rows = jnp.broadcast_to(jnp.arange(b_global, dtype=jnp.int32), (w_iter, b_global))
        perms = jax.random.permutation(key, rows, axis=1, independent=True)

    xs = jnp.stack(upcast(*views))  # [V, b, D]
    dtype = xs.dtype
    m, e = _scalar(momentum, dtype), _scalar(eps, dtype)
    xg = coll.psum_gather(xs, axis_name, axis=1)  # [V, B, D], replicated
    v, d = num_samples, embedding_dim

    if not use_batch:  # eval: the running statistics whiten every sub-batch alike
        mean = jnp.asarray(state.mean).astype(dtype).reshape(1, 1, d)
        z = _whiten_centered(xg - mean, jnp.asarray(state.covariance).astype(dtype), e)
        z = z[:, None]  # [V, 1, B, D]: every iteration is the same
        new_state = state
    else:
        if perms is None:  # one sub-batch: every iteration whitens it identically
            xp = xg[:, None]  # [V, 1, B, D]
        else:
            xp = jnp.take(xg, perms, axis=1)  # [V, T, B, D] (rows in permuted order)
        t = xp.shape[1]
        xp = xp.reshape(v, t, groups, w_size, d)
        z, mean, cov = _whiten_batch(xp, e)  # cov: [V, T, G, D, D]
        z = z.reshape(v, t, b_global, d)
        if train and track_running_stats:  # lightly's update order: (t, g, v)
            means = jnp.transpose(mean[..., 0, :], (1, 2, 0, 3)).reshape(-1, d)
            covs = jnp.transpose(cov, (1, 2, 0, 3, 4)).reshape(-1, d, d)
            reps = w_iter // t  # the identical iterations of a single sub-batch
            new_state = _ema(state, jnp.tile(means, (reps, 1)), jnp.tile(covs, (reps, 1, 1)), m)
        else:
            new_state = state

    # Rows of all views share the permutation, so pairs line up; the mean is order-free.
    pairs = [(i, j) for i in range(v) for j in range(i + 1, v)]
    cos = jnp.stack([cosine_similarity(z[i], z[j], eps=1e-12) for i, j in pairs])
    loss = 2.0 - 2.0 * jnp.mean(cos)
    return loss, new_state
