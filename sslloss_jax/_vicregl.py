"""VICRegL: VICReg on global embeddings plus VICReg on nearest-neighbour-matched local
features (feature-space L2 matching and grid-location matching)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sslloss_jax import _collectives as coll
from sslloss_jax import _validation as val
from sslloss_jax._numerics import argmin_first, upcast
from sslloss_jax._redundancy import variance_covariance, vicreg_terms
from sslloss_jax._types import ArrayLike, AxisName

__all__ = ["VICRegLTerms", "vicregl_terms", "vicregl_loss"]

_Method = Literal["auto", "gram", "feature"]


class VICRegLTerms(NamedTuple):
    """VICRegL's parts. The loss is
    ``α·(λ·invariance + μ·variance + ν·covariance) + (1 − α)·(local_l2 + local_location)``.
    """

    invariance: jax.Array  # global: mean over view pairs of mse(g_a, g_b), unweighted
    variance: jax.Array  # global: mean over all views of the variance hinge, unweighted
    covariance: jax.Array  # global: mean over all views of Σ_{i≠j} C_ij² / D, unweighted
    local_l2: jax.Array  # mean over pairs of the L2-matched VICReg (weights λ, μ, ν/2)
    local_location: jax.Array  # same with location matching (weighted likewise)


def _check_views(features: object, grids: object, kind: str):
    """Validates ``{kind}_view_features`` (pairs (g, l)) and ``{kind}_view_grids``;
    returns ``[(g, l, grid), ...]``."""
    fname, gname = f"{kind}_view_features", f"{kind}_view_grids"
    for name, seq in ((fname, features), (gname, grids)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a sequence (one entry per view), got "
                            f"{type(seq).__name__}")
    assert isinstance(features, (list, tuple)) and isinstance(grids, (list, tuple))
    if len(features) != len(grids):
        raise ValueError(f"{fname} and {gname} must have same length but found "
                         f"{len(features)} and {len(grids)}.")
    views = []
    for i, (pair, grid) in enumerate(zip(features, grids)):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TypeError(f"{fname}[{i}] must be a (global_features, local_features) "
                            f"pair, got {type(pair).__name__}")
        loc = val.as_float_array(pair[1], f"{fname}[{i}][1]", ndim=4)
        glob = val.as_float_array(pair[0], f"{fname}[{i}][0]", ndim=2)
        grid = val.as_float_array(grid, f"{gname}[{i}]", ndim=4)
        if grid.shape != (*loc.shape[:3], 2):
            raise ValueError(f"{gname}[{i}] must have shape {(*loc.shape[:3], 2)} (the grid "
                             f"of {fname}[{i}][1], shape {loc.shape}), got {grid.shape}")
        views.append((glob, loc, grid))
    return views


def _check_consistent(views: list, names: list[str]) -> None:
    """Same global-embedding shape and same batch / local dim across all views."""
    g0, l0, _ = views[0]
    for (g, loc, _), name in zip(views[1:], names[1:]):
        val.check_same_shape(g0, g, f"{names[0]}[0]", f"{name}[0]")
        if loc.shape[0] != l0.shape[0] or loc.shape[-1] != l0.shape[-1]:
            raise ValueError(
                f"{name}[1] must have the batch size and feature dimension of "
                f"{names[0]}[1] {l0.shape}, got {loc.shape}")


def _sq_dist(a: jax.Array, b: jax.Array, *, exact: bool = False) -> jax.Array:
    """(B, Na, Nb) squared Euclidean distances, stop-gradient (only used for matching):
    ``‖a‖² + ‖b‖² − 2⟨a, b⟩`` for features, exact differences (``exact``) for grids."""
    a, b = upcast(lax.stop_gradient(a), lax.stop_gradient(b))
    if exact:
        return jnp.sum(jnp.square(a[:, :, None, :] - b[:, None, :, :]), axis=-1)
    ab = jnp.einsum("bnd,bmd->bnm", a, b)
    return (jnp.sum(jnp.square(a), -1)[:, :, None] + jnp.sum(jnp.square(b), -1)[:, None, :]
            - 2.0 * ab)


def _nearest_neighbors(z_in, z_cand, dist, num_matches):
    """lightly's ``nearest_neighbors``: each input location's nearest candidate, then the
    ``num_matches`` (clipped to the input size) pairs of smallest distance, sorted by
    increasing distance (ties: lowest index first). Returns two (B, k, D) arrays."""
    k = min(num_matches, z_in.shape[1])
    nn = argmin_first(dist, axis=2)  # (B, Na)
    nn_dist = jnp.min(dist, axis=2)
    _, sel = lax.top_k(-nn_dist, k)  # (B, k), ascending distance
    z_sel = jnp.take_along_axis(z_in, sel[..., None], axis=1)
    z_nn = jnp.take_along_axis(z_cand, jnp.take_along_axis(nn, sel, axis=1)[..., None], axis=1)
    return z_sel, z_nn


def vicregl_terms(
    global_view_features: Sequence[tuple[ArrayLike, ArrayLike]],
    global_view_grids: Sequence[ArrayLike],
    local_view_features: Sequence[tuple[ArrayLike, ArrayLike]] | None = None,
    local_view_grids: Sequence[ArrayLike] | None = None,
    *,
    lambda_param: ArrayLike = 25.0,
    mu_param: ArrayLike = 25.0,
    nu_param: ArrayLike = 1.0,
    eps: float = 1e-4,
    num_matches: tuple[int, int] = (20, 4),
    axis_name: AxisName = None,
    method: _Method = "auto",
) -> VICRegLTerms:
    """VICRegL's parts (:class:`VICRegLTerms`); see :func:`vicregl_loss` for the arguments.

    The global terms are unweighted; the local terms are VICReg losses weighted with
    ``(λ, μ, ν/2)`` (the VICRegL convention), as they enter the loss.
    """
    val.check_axis_name(axis_name)
    lam, mu, nu = (val.check_scalar_param(v, name) for name, v in (
        ("lambda_param", lambda_param), ("mu_param", mu_param), ("nu_param", nu_param)))
    val.check_in_range(eps, "eps", 0.0, None)
    if (not isinstance(num_matches, (list, tuple)) or len(num_matches) != 2
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                       for k in num_matches)):
        raise ValueError(f"num_matches must be a pair of positive ints, got {num_matches!r}")
    if (local_view_features is None) != (local_view_grids is None):
        raise ValueError(
            "local_view_features and local_view_grids must either both be set or None but "
            f"found {type(local_view_features)} and {type(local_view_grids)}.")
    glob = _check_views(global_view_features, global_view_grids, "global")
    loc = ([] if local_view_features is None
           else _check_views(local_view_features, local_view_grids, "local"))
    if not glob:
        raise ValueError("global_view_features must contain at least one view, got 0")
    names = ["global_view_features"] * len(glob) + ["local_view_features"] * len(loc)
    names = [f"{n}[{i}]" for n, i in zip(names, [*range(len(glob)), *range(len(loc))])]
    _check_consistent(glob + loc, names)
    pairs = [(a, b) for a in range(len(glob)) for b in range(len(glob) + len(loc)) if a != b]
    if not pairs:
        raise ValueError("VICRegL needs at least two views (two global views, or one global "
                         "and one local view), got one global view and no local views")
    views = glob + loc
    batch = views[0][0].shape[0]
    val.check_min_batch(batch * coll.axis_size(axis_name), 2, "VICRegL (unbiased variance)",
                        views[0][0].shape)

    # ---- global part: invariance over ordered pairs, var/cov over every view
    gs = upcast(*(g for g, _, _ in views))
    inv = sum(coll.global_mean(jnp.sum(jnp.square(gs[a] - gs[b])), gs[a].size, axis_name)
              for a, b in pairs) / len(pairs)
    gs3 = [g[:, None, :] for g in gs]
    moments = coll.global_moments(*gs3, axis_name=axis_name)
    var_cov = [variance_covariance(g, m, eps=eps, gamma=1.0, axis_name=axis_name,
                                   method=method) for g, m in zip(gs3, moments)]
    var = sum(v for v, _ in var_cov) / len(views)
    cov = sum(c for _, c in var_cov) / len(views)

    # ---- local part: nearest-neighbour matching within each image, then VICReg'. The
    # matched pairs of equal shape (over view pairs and directions) go through one vmapped
    # VICReg' per shape: a small program whatever the number of views.
    def vicreg_prime(za, zb):
        t = vicreg_terms(za, zb, eps=eps, axis_name=axis_name, method=method)
        return lam * t.invariance + mu * t.variance + 0.5 * nu * t.covariance

    flat = [(loc_map.reshape(batch, -1, loc_map.shape[-1]), grid.reshape(batch, -1, 2))
            for _, loc_map, grid in views]
    groups: dict[tuple, list] = {}
    for a, b in pairs:
        (za, ga), (zb, gb) = flat[a], flat[b]
        for kind, d_ab, d_ba in (
                ("l2", _sq_dist(za, zb), _sq_dist(zb, za)),
                ("location", _sq_dist(ga, gb, exact=True), _sq_dist(gb, ga, exact=True))):
            for matches in (_nearest_neighbors(za, zb, d_ab, num_matches[0]),
                            _nearest_neighbors(zb, za, d_ba, num_matches[1])):
                groups.setdefault((kind, matches[0].shape), []).append(matches)
    totals: dict[str, jax.Array | float] = {"l2": 0.0, "location": 0.0}
    for (kind, _), items in groups.items():
        z_sel = jnp.stack([x for x, _ in items])
        z_nn = jnp.stack([y for _, y in items])
        totals[kind] = totals[kind] + jnp.sum(jax.vmap(vicreg_prime)(z_sel, z_nn))
    l2, location = 0.5 * totals["l2"], 0.5 * totals["location"]
    parts = (inv, var, cov, l2 / len(pairs), location / len(pairs))
    return VICRegLTerms(*(jnp.asarray(p) for p in parts))


def vicregl_loss(
    global_view_features: Sequence[tuple[ArrayLike, ArrayLike]],
    global_view_grids: Sequence[ArrayLike],
    local_view_features: Sequence[tuple[ArrayLike, ArrayLike]] | None = None,
    local_view_grids: Sequence[ArrayLike] | None = None,
    *,
    lambda_param: ArrayLike = 25.0,
    mu_param: ArrayLike = 25.0,
    nu_param: ArrayLike = 1.0,
    alpha: ArrayLike = 0.75,
    eps: float = 1e-4,
    num_matches: tuple[int, int] = (20, 4),
    axis_name: AxisName = None,
    method: _Method = "auto",
) -> jax.Array:
    r"""VICRegL: VICReg on global embeddings and on matched local features.

    Views: Vg global and Vl local crops, each a pair ``(g, l)`` of a global embedding
    ``[batch, Dg]`` and a local feature map ``[batch, H, W, Dl]`` with its grid of
    coordinates ``[batch, H, W, 2]``. Pairs P: ordered (a, b) with a global, b any other
    view (global–global both ways, global–local; no local–local), |P| = Vg(Vg−1) + Vg·Vl.

    .. math::
        L_g = \lambda\,\operatorname{mean}_{(a,b)\in P}\operatorname{mse}(g_a, g_b)
            + \mu\,\operatorname{mean}_v v(g_v) + \nu\,\operatorname{mean}_v c(g_v)

    with VICReg's variance hinge v and covariance term c (over all Vg + Vl views), and

    .. math::
        L_l = \operatorname{mean}_{(a,b)\in P}\big[\tfrac12(V'(a\to b) + V'(b\to a))_{L2}
            + \tfrac12(V'(a\to b) + V'(b\to a))_{\text{location}}\big]

    where :math:`V'(a\to b)` is VICReg with weights (λ, μ, ν/2) on the matched pairs
    ``[batch, k, Dl]``: for each location of ``l_a`` its nearest location of ``l_b``
    (Euclidean distance of the features, or of the grid coordinates), keeping the k
    pairs of smallest distance per image, sorted by distance, with k =
    ``num_matches[0]`` for a→b and ``num_matches[1]`` for b→a (clipped to H·W; static,
    via ``lax.top_k``). VICReg statistics run over the batch for each match slot.
    :math:`L = \alpha L_g + (1-\alpha) L_l`.

    Args:
      global_view_features: sequence of Vg >= 1 ``(g [batch, Dg], l [batch, H, W, Dl])``.
      global_view_grids: sequence of Vg ``[batch, H, W, 2]`` grids.
      local_view_features: optional sequence of Vl pairs (H, W may differ from the global
        views').
      local_view_grids: their grids; set both local arguments or neither.
      lambda_param, mu_param, nu_param: VICReg weights (may be traced); the local terms
        use ν/2 (lightly's and the official VICRegL code's convention).
      alpha: weight of the global loss (may be traced).
      eps: variance epsilon.
      num_matches: static ``(k_ab, k_ba)`` numbers of matches of the two searches.
      axis_name: optional axis. Matching is within each image (local); the invariance
        means and every variance/covariance (global views and matched local features)
        are over the global batch, so the loss is the single-device global-batch loss.
      method: as in :func:`vicreg_loss` (Gram matrices when the global batch < dim).

    Returns:
      Scalar loss (>= float32). :func:`vicregl_terms` returns the parts.

    Differences from lightly ``VICRegLLoss``: a scalar (lightly returns shape ``(1,)``);
    view pairs are identified by position (lightly compares tensors with ``is not``, so
    passing the same array twice skips that pair there); ties in the matching are broken
    by the lowest index; under ``axis_name`` the invariance terms are global too (lightly
    computes them on the local batch).

    References:
      Bardes et al., `VICRegL: Self-Supervised Learning of Local Visual Features
      <https://arxiv.org/abs/2210.01571>`_, 2022.
    """
    a = val.check_scalar_param(alpha, "alpha")
    t = vicregl_terms(global_view_features, global_view_grids, local_view_features,
                      local_view_grids, lambda_param=lambda_param, mu_param=mu_param,
                      nu_param=nu_param, eps=eps, num_matches=num_matches,
                      axis_name=axis_name, method=method)
    global_loss = lambda_param * t.invariance + mu_param * t.variance + nu_param * t.covariance
    return a * global_loss + (1.0 - a) * (t.local_l2 + t.local_location)
