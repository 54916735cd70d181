"""A registry of the public losses: what each one is, its counterparts in the PyTorch
libraries, how it behaves under ``axis_name``, and how to build example inputs.

The test suite (generic jit / grad / vmap / dtype / distributed checks), the benchmarks
and the README loss table all read this one list, so adding a loss is one entry here.

Run ``python -m sslloss_jax._registry`` to print the README table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import sslloss_jax as S
from sslloss_jax._types import AxisName

__all__ = ["LossSpec", "Example", "LOSSES", "QUEUE_VARIANTS", "TILED_VARIANTS", "get",
           "markdown_table"]


@dataclasses.dataclass(frozen=True)
class Example:
    """Example inputs of a loss.

    Attributes:
      batch: arrays whose axis 0 is the batch (sharded under ``axis_name``).
      state: the initial state of a stateful loss, or other replicated inputs (e.g.
        prototypes, queue scores) that the uniform ``apply`` passes in its state slot and
        returns unchanged; ``None`` if there are none.
    """

    batch: tuple[np.ndarray, ...]
    state: Any = None


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One public loss.

    Attributes:
      name: public function name in ``sslloss_jax``.
      family: module family (contrastive, redundancy, similarity, ...).
      counterparts: library -> name of the equivalent there (lightly, fovi, quadra, nidl).
      stateful: whether the loss takes and returns a state.
      distributed: what ``axis_name`` does for this loss.
      apply: ``apply(batch, state, axis_name=..., **hyper) -> (loss, new_state | None)``;
        a uniform calling convention over the loss's real signature.
      example: ``example(rng, batch, dim) -> Example``.
      traced_hyper: hyperparameters that may be traced scalars, with two test values.
      min_batch: smallest global batch the loss accepts.
      grad_argnums: the batch arrays that receive a gradient (``None``: all of them).
      symmetric: whether swapping the two views leaves the loss unchanged.
      numeric_grads: whether finite differences see the same function as autodiff
        (False when the loss detaches a quantity computed from its inputs, as DCLW's
        weights: autodiff then rightly differs from finite differences).
      raw_argnums: batch arrays that are not embeddings (integer labels): sharded with the
        batch, but the generic tests pass them through as they are (no encoder, no dtype
        cast, no degenerate transform, no gradient).
    """

    name: str
    family: str
    counterparts: Mapping[str, str]
    stateful: bool
    distributed: str
    apply: Callable[..., tuple[jax.Array, Any]]
    example: Callable[[np.random.Generator, int, int], Example]
    traced_hyper: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    min_batch: int = 1
    grad_argnums: tuple[int, ...] | None = None
    symmetric: bool = False
    numeric_grads: bool = True
    variant: str = ""
    raw_argnums: tuple[int, ...] = ()

    @property
    def id(self) -> str:
        """A test id: the name, plus the variant for alternative configurations."""
        return f"{self.name}[{self.variant}]" if self.variant else self.name

    @property
    def fn(self) -> Callable[..., Any]:
        return getattr(S, self.name)


def _two_views(rng: np.random.Generator, batch: int, dim: int) -> Example:
    x0 = rng.standard_normal((batch, dim)).astype(np.float32)
    x1 = (x0 + 0.5 * rng.standard_normal((batch, dim))).astype(np.float32)
    return Example((x0, x1))


def _four_views(rng: np.random.Generator, batch: int, dim: int) -> Example:
    return Example(_two_views(rng, batch, dim).batch + _two_views(rng, batch, dim).batch)


def _bank_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    key = jax.random.key(int(rng.integers(2**31)))
    return Example(_two_views(rng, batch, dim).batch, S.init_memory_bank(key, 3 * batch + 1, dim))


def _dino_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    views = tuple(rng.standard_normal((batch, dim)).astype(np.float32) for _ in range(5))
    return Example(views, S.init_dino_state(dim))


def _apply_dino(batch, state, *, axis_name: AxisName = None, **hyper):
    """Two global crops (teacher and first two student views) and one local crop."""
    return S.dino_loss(list(batch[:2]), list(batch[2:]), state, axis_name=axis_name, **hyper)


def _tico_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    ex = _two_views(rng, batch, dim)
    cov = rng.standard_normal((dim, dim)).astype(np.float32)
    return Example(ex.batch, S.TiCoState(jnp.asarray(cov @ cov.T / dim)))


def _apply_tico(batch, state, *, axis_name: AxisName = None, **hyper):
    z_a, z_b = batch
    return S.tico_loss(z_a, z_b, state, axis_name=axis_name, **hyper)


def _swav_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    crops = tuple(rng.standard_normal((batch, dim)).astype(np.float32) for _ in range(3))
    return Example(crops)


def _apply_swav(batch, state=None, *, axis_name: AxisName = None, **hyper):
    """Two high-resolution crops and one low-resolution crop."""
    return S.swav_loss(list(batch[:2]), list(batch[2:]), axis_name=axis_name, **hyper), None


def _swav_queue_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    queue = rng.standard_normal((2, 8, dim)).astype(np.float32)  # replicated queue scores
    return Example(_swav_example(rng, batch, dim).batch, jnp.asarray(queue))


def _apply_swav_queue(batch, queue, *, axis_name: AxisName = None, **hyper):
    loss = S.swav_loss(list(batch[:2]), list(batch[2:]), queue, axis_name=axis_name, **hyper)
    return loss, queue


def _msn_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    views = tuple(rng.standard_normal((batch, dim)).astype(np.float32) for _ in range(3))
    return Example(views, jnp.asarray(rng.standard_normal((7, dim)), jnp.float32))


def _msn_apply(fn):
    """Two anchor views and the targets; the prototypes ride in the state slot
    (replicated, returned unchanged)."""

    def apply(batch, prototypes, *, axis_name: AxisName = None, **hyper):
        return fn(list(batch[:2]), batch[2], prototypes, axis_name=axis_name,
                  **hyper), prototypes

    return apply


def _patch_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    tokens = tuple(rng.standard_normal((batch, 4, dim)).astype(np.float32) for _ in range(2))
    return Example(tokens, S.init_ibot_state(dim))


def _apply_ibot(plus_plus: bool):
    """Teacher and student tokens; the mask is derived from the teacher's values
    (deterministic and identical however the batch is sharded)."""

    def apply(batch, state, *, axis_name: AxisName = None, **hyper):
        teacher, student = batch
        mask = lax.stop_gradient(teacher[..., 0]) > 0 if hasattr(teacher, "shape") else None
        if plus_plus:
            return S.ibot_plus_plus_patch_loss(teacher, student, state, mask,
                                               axis_name=axis_name, **hyper)
        return S.ibot_patch_loss(teacher, student, mask, state, axis_name=axis_name, **hyper)  # type: ignore[arg-type]

    return apply


def _stateless(fn: Callable[..., jax.Array]) -> Callable[..., tuple[jax.Array, None]]:
    def apply(batch, state=None, *, axis_name: AxisName = None, **hyper):
        del state
        return fn(*batch, axis_name=axis_name, **hyper), None

    return apply


def _apply_bank(batch, state, *, axis_name: AxisName = None, **hyper):
    out0, out1 = batch
    return S.ntxent_memory_bank_loss(out0, out1, state, axis_name=axis_name, **hyper)


def _apply_sym(batch, state=None, *, axis_name: AxisName = None, **hyper):
    z0, p0, z1, p1 = batch
    return S.sym_negative_cosine_similarity_loss((z0, p0), (z1, p1), axis_name=axis_name,
                                                 **hyper), None


_GATHER = "negatives all-gathered; global mean"
_STATS = "global batch statistics"
_MEAN = "global mean"

LOSSES: tuple[LossSpec, ...] = (
    LossSpec(
        "ntxent_loss", "contrastive",
        {"lightly": "NTXentLoss", "fovi": "SimCLRLoss(pairs_per_sample=1)", "quadra": "SimCLRLoss",
         "nidl": "InfoNCE"},
        False, _GATHER, _stateless(S.ntxent_loss), _two_views, {"temperature": (0.5, 0.2)},
        symmetric=True,
    ),
    LossSpec(
        "ntxent_memory_bank_loss", "contrastive",
        {"lightly": "NTXentLoss(memory_bank_size=(n, d))"},
        True, "global mean; global batch enqueued on every device", _apply_bank,
        _bank_example, {"temperature": (0.5, 0.2)},
    ),
    LossSpec(
        "dcl_loss", "contrastive", {"lightly": "DCLLoss", "nidl": "DCLLoss"},
        False, _GATHER, _stateless(S.dcl_loss), _two_views, {"temperature": (0.1, 0.3)},
        min_batch=2, symmetric=True,
    ),
    LossSpec(
        "dclw_loss", "contrastive", {"lightly": "DCLWLoss", "nidl": "DCLWLoss"},
        False, _GATHER + "; weights over the global batch", _stateless(S.dclw_loss),
        _two_views, {"temperature": (0.1, 0.3), "sigma": (0.5, 1.0)}, min_batch=2,
        symmetric=True, numeric_grads=False,
    ),
    LossSpec(
        "negative_cosine_similarity", "similarity",
        {"lightly": "NegativeCosineSimilarity", "quadra": "BYOLRegressionLoss (2 + 2×)"},
        False, _MEAN, _stateless(S.negative_cosine_similarity), _two_views,
        symmetric=True,
    ),
    LossSpec(
        "sym_negative_cosine_similarity_loss", "similarity",
        {"lightly": "SymNegCosineSimilarityLoss (removed in 1.6)", "quadra": "SimSIAMLoss"},
        False, _MEAN, _apply_sym, _four_views, grad_argnums=(1, 3),
    ),
    LossSpec(
        "hypersphere_loss", "similarity",
        {"lightly": "HypersphereLoss", "quadra": "align_loss + uniform_loss"},
        False, "uniformity over all global pairs; global mean", _stateless(S.hypersphere_loss),
        _two_views, {"t": (1.0, 2.0), "lam": (1.0, 0.5)}, symmetric=True,
    ),
    LossSpec(
        "alignment_loss", "similarity", {"quadra": "align_loss", "nidl": "alignment_score"},
        False, _MEAN, _stateless(S.alignment_loss), _two_views, {"alpha": (2.0, 1.5)},
        symmetric=True,
    ),
    LossSpec(
        "uniformity_loss", "similarity", {"quadra": "uniform_loss", "nidl": "uniformity_score"},
        False, "all global pairs", _stateless(S.uniformity_loss),
        lambda rng, b, d: Example(_two_views(rng, b, d).batch[:1]), {"t": (2.0, 1.0)},
    ),
    LossSpec(
        "barlow_twins_loss", "redundancy",
        {"lightly": "BarlowTwinsLoss", "fovi": "BarlowTwinsLoss", "nidl": "BarlowTwinsLoss",
         "quadra": "BarlowTwinsLoss"},
        False, _STATS + " (as SyncBN); Gram or D×D reduction by shape",
        _stateless(S.barlow_twins_loss), _two_views, {"lambda_param": (5e-3, 1e-2)},
        min_batch=2, symmetric=True,
    ),
    LossSpec(
        "vicreg_loss", "redundancy",
        {"lightly": "VICRegLoss", "fovi": "VicRegLoss", "quadra": "VICRegLoss"},
        False, _STATS + " for all three terms", _stateless(S.vicreg_loss), _two_views,
        {"lambda_param": (25.0, 10.0), "mu_param": (25.0, 5.0), "nu_param": (1.0, 2.0)},
        min_batch=2, symmetric=True,
    ),
)

LOSSES += (
    LossSpec(
        "dino_loss", "distillation",
        {"lightly": "DINOLoss", "quadra": "DinoDistillationLoss", "nidl": "DINOLoss"},
        True, "global mean; center from the global batch mean", _apply_dino, _dino_example,
        {"teacher_temp": (0.04, 0.07), "student_temp": (0.1, 0.2),
         "center_momentum": (0.9, 0.5)},
        grad_argnums=(2, 3, 4),
    ),
    LossSpec(
        "tico_loss", "covariance", {"lightly": "TiCoLoss"},
        True, "covariance and means over the global batch", _apply_tico, _tico_example,
        {"beta": (0.9, 0.5), "rho": (8.0, 4.0)}, min_batch=2, numeric_grads=False,
    ),
    LossSpec(
        "koleo_loss", "similarity", {"lightly": "KoLeoLoss"},
        False, "nearest neighbours over the global batch (DINOv3)",
        _stateless(S.koleo_loss), lambda rng, b, d: Example(_two_views(rng, b, d).batch[:1]),
        min_batch=2,
    ),
)

LOSSES += (
    LossSpec(
        "swav_loss", "clustering", {"lightly": "SwaVLoss"},
        False, "Sinkhorn sums and the mean over the global batch", _apply_swav,
        _swav_example, {"temperature": (0.1, 0.2), "sinkhorn_epsilon": (0.05, 0.1)},
        numeric_grads=False,
    ),
)

LOSSES += (
    LossSpec(
        "msn_loss", "clustering", {"lightly": "MSNLoss"},
        False, "Sinkhorn sums, means and the regularizer's mean probability over the "
        "global batch", _msn_apply(S.msn_loss), _msn_example,
        {"temperature": (0.1, 0.2), "target_sharpen_temperature": (0.25, 0.5),
         "regularization_weight": (1.0, 3.0)}, grad_argnums=(0, 1),
    ),
    LossSpec(
        "pmsn_loss", "clustering", {"lightly": "PMSNLoss"},
        False, "as msn_loss", _msn_apply(S.pmsn_loss), _msn_example,
        {"temperature": (0.1, 0.2), "power_law_exponent": (0.25, 0.5)}, grad_argnums=(0, 1),
    ),
)

def _apply_co2_bank(batch, state, *, axis_name: AxisName = None, **hyper):
    out0, out1 = batch
    return S.co2_memory_bank_regularizer(out0, out1, state, axis_name=axis_name, **hyper)


LOSSES += (
    LossSpec(
        "co2_regularizer", "contrastive", {"lightly": "CO2Regularizer (detached there)"},
        False, "negatives all-gathered; global mean", _stateless(S.co2_regularizer),
        _two_views, {"alpha": (1.0, 0.5), "t_consistency": (0.05, 0.2)}, min_batch=2,
        symmetric=True,
    ),
    LossSpec(
        "co2_memory_bank_regularizer", "contrastive",
        {"lightly": "CO2Regularizer(memory_bank_size=(n, d))"},
        True, "global mean; global batch enqueued on every device", _apply_co2_bank,
        _bank_example, {"t_consistency": (0.05, 0.2)},
    ),
)

LOSSES += (
    LossSpec(
        "ibot_patch_loss", "distillation", {"lightly": "IBOTPatchLoss"},
        True, "global mean over images; center from the global masked tokens",
        _apply_ibot(False), _patch_example,
        {"teacher_temp": (0.04, 0.07), "center_momentum": (0.9, 0.5)}, grad_argnums=(1,),
    ),
    LossSpec(
        "ibot_plus_plus_patch_loss", "distillation", {"lightly": "IBOTPlusPlusPatchLoss"},
        True, "global mean over images; center from all global tokens", _apply_ibot(True),
        _patch_example, {"teacher_temp": (0.04, 0.07), "visible_loss_weight": (1.0, 0.3)},
        grad_argnums=(1,),
    ),
)

LOSSES += (
    LossSpec(
        "capi_loss", "clustering", {"lightly": "CAPILoss"},
        False, "Sinkhorn shift (pmax) and batch sums (psum) over the global batch; global mean",
        _stateless(S.capi_loss), lambda rng, b, d: Example(_patch_example(rng, b, d).batch),
        {"teacher_temperature": (0.06, 0.1), "student_temperature": (0.12, 0.2)},
        grad_argnums=(1,),
    ),
)

def _wmse_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    """Two views; the dimension is capped at batch // 2 (W-MSE needs w_size >= 2·dim)."""
    k = max(1, min(dim, batch // 2))
    x0 = rng.standard_normal((batch, k)).astype(np.float32)
    x1 = (x0 + 0.5 * rng.standard_normal((batch, k))).astype(np.float32)
    return Example((x0, x1), S.init_wmse_state(k))


def _apply_wmse(batch, state, *, axis_name: AxisName = None, **hyper):
    """The views as a sequence; by default the global batch is one sub-batch, eps = 0.1
    (degenerate inputs stay finite) and a fixed, replicated key."""
    n = lax.axis_size(axis_name) if isinstance(axis_name, (str, tuple)) else 1
    shape = np.shape(batch[0])
    hyper = {"eps": 0.1, "embedding_dim": shape[-1], "w_size": shape[0] * n, **hyper}
    key = hyper.pop("key", jax.random.key(0))
    return S.wmse_loss(list(batch), state, key, axis_name=axis_name, **hyper)


LOSSES += (
    LossSpec(
        "wmse_loss", "whitening", {"lightly": "WMSELoss"}, True,
        "sub-batches drawn from the gathered global batch (same key on every device); "
        "whitening and running statistics of the global batch",
        _apply_wmse, _wmse_example, {"eps": (0.1, 0.3)}, min_batch=2, symmetric=True,
    ),
)


def _labeled_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    """Embeddings and integer labels with about two rows per class (some classes have a
    single row: anchors without a positive)."""
    x = rng.standard_normal((batch, dim)).astype(np.float32)
    return Example((x, rng.integers(0, max(1, batch // 2), batch).astype(np.int32)))


LOSSES += (
    LossSpec(
        "supcon_loss", "contrastive", {},
        False, "keys and labels all-gathered; mean over the global anchors with a positive",
        _stateless(S.supcon_loss), _labeled_example, {"temperature": (0.1, 0.3)},
        grad_argnums=(0,), raw_argnums=(1,),
    ),
    LossSpec(
        "mocov3_loss", "contrastive", {},
        False, "keys all-gathered (stop-gradient); global mean",
        _stateless(S.mocov3_loss), _two_views, {"temperature": (0.2, 0.5)}, grad_argnums=(0,),
    ),
    LossSpec(
        "clip_loss", "two-tower", {},
        False, "both directions: local rows against the other tower all-gathered; global mean",
        _stateless(S.clip_loss), _two_views,
        {"temperature": (0.07, 0.2)}, symmetric=True,
    ),
    LossSpec(
        "siglip_loss", "two-tower", {},
        False, "local rows against the all-gathered z_b; global sum / global batch",
        _stateless(S.siglip_loss), _two_views,
        {"t": (float(np.log(10.0)), 1.0), "b": (-10.0, -5.0)}, symmetric=True,
    ),
)

# ---- issue 4 (part): VICRegL, DetCon, DirectCLR, MACL, MMCR, FroSSL, EMP-SSL
def _vicregl_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    """Three views (two global, one local) of (batch, 2, 3, dim) local maps, then their
    (batch, 2, 3, 2) grids (raw arrays: coordinates, used only for matching)."""
    maps = tuple(rng.standard_normal((batch, 2, 3, dim)).astype(np.float32) for _ in range(3))
    grids = tuple(rng.uniform(0, 1, (batch, 2, 3, 2)).astype(np.float32) for _ in range(3))
    return Example(maps + grids)


def _apply_vicregl(batch, state=None, *, axis_name: AxisName = None, **hyper):
    """Global embeddings = the spatial means of the local maps; views 0, 1 global, 2 local."""
    maps, grids = batch[:3], batch[3:]
    pool = lambda m: jnp.mean(m, axis=tuple(range(1, m.ndim - 1))) if hasattr(m, "ndim") else m
    feats = [(pool(m), m) for m in maps]
    return S.vicregl_loss(feats[:2], list(grids[:2]), feats[2:], list(grids[2:]),
                          axis_name=axis_name, **hyper), None


def _region_example(n_views: int):
    def example(rng: np.random.Generator, batch: int, dim: int) -> Example:
        views = tuple(rng.standard_normal((batch, 4, dim)).astype(np.float32)
                      for _ in range(n_views))
        masks = tuple(rng.integers(0, 3, (batch, 4)).astype(np.int32) for _ in range(2))
        return Example(views + masks)

    return example


def _apply_directclr(batch, state=None, *, axis_name: AxisName = None, **hyper):
    """loss_dim=3 (below the example dimension), so the truncation is exercised."""
    return S.directclr_loss(*batch, axis_name=axis_name, **{"loss_dim": 3, **hyper}), None


def _directclr_bank_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    key = jax.random.key(int(rng.integers(2**31)))
    return Example(_two_views(rng, batch, dim).batch,
                   S.init_memory_bank(key, 3 * batch + 1, min(3, dim)))


def _apply_directclr_bank(batch, state, *, axis_name: AxisName = None, **hyper):
    out0, out1 = batch
    return S.directclr_memory_bank_loss(out0, out1, state, axis_name=axis_name,
                                        **{"loss_dim": 3, **hyper})


def _mmcr_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    online = rng.standard_normal((batch, 2, dim)).astype(np.float32)
    return Example((online, (online + 0.5 * rng.standard_normal(online.shape)).astype(
        np.float32)))


def _views_list(fn: Callable[..., jax.Array]) -> Callable[..., tuple[jax.Array, None]]:
    """The batch arrays as lightly's list of views."""

    def apply(batch, state=None, *, axis_name: AxisName = None, **hyper):
        return fn(list(batch), axis_name=axis_name, **hyper), None

    return apply


LOSSES += (
    LossSpec(
        "vicregl_loss", "redundancy", {"lightly": "VICRegLLoss"},
        False, "matching within each image; invariance, variance and covariance (global "
        "and matched local features) over the global batch", _apply_vicregl,
        _vicregl_example, {"lambda_param": (25.0, 10.0), "alpha": (0.75, 0.5)},
        min_batch=2, grad_argnums=(0, 1, 2), raw_argnums=(3, 4, 5),
    ),
    LossSpec(
        "detcon_b_loss", "region", {"lightly": "DetConBLoss"},
        False, "targets all-gathered (lightly's default gather_distributed=True); global mean",
        _stateless(S.detcon_b_loss), _region_example(4), {"temperature": (0.1, 0.3)},
        grad_argnums=(0, 1, 2, 3), raw_argnums=(4, 5),
    ),
    LossSpec(
        "detcon_s_loss", "region", {"lightly": "DetConSLoss"},
        False, "views all-gathered as targets; global mean",
        _stateless(S.detcon_s_loss), _region_example(2), {"temperature": (0.1, 0.3)},
        grad_argnums=(0, 1), raw_argnums=(2, 3),
    ),
    LossSpec(
        "directclr_loss", "contrastive", {"lightly": "DirectCLRLoss"},
        False, _GATHER, _apply_directclr, _two_views, {"temperature": (0.5, 0.2)},
        symmetric=True,
    ),
    LossSpec(
        "directclr_memory_bank_loss", "contrastive",
        {"lightly": "DirectCLRLoss(memory_bank_size=(n, d))"},
        True, "global mean; global batch enqueued on every device", _apply_directclr_bank,
        _directclr_bank_example, {"temperature": (0.5, 0.2)},
    ),
    LossSpec(
        "macl_loss", "contrastive", {"lightly": "MACLLoss"},
        False, _GATHER + "; alignment A over the global batch", _stateless(S.macl_loss),
        _two_views, {"temperature": (0.1, 0.3), "alpha": (0.5, 0.2)}, min_batch=2,
        symmetric=True, numeric_grads=False,
    ),
    LossSpec(
        "mmcr_loss", "spectral", {"lightly": "MMCRLoss"},
        False, "per-sample nuclear norms local; SVD of the gathered centroids",
        _stateless(S.mmcr_loss), _mmcr_example, {"lmda": (5e-3, 0.1)}, symmetric=True,
    ),
    LossSpec(
        "frossl_loss", "spectral", {"lightly": "FroSSLLoss"},
        False, "column norms and covariances of the global batch (gathered Gram or D×D psum)",
        _views_list(S.frossl_loss), _two_views, {"invariance_weight": (1.0, 2.0)},
        symmetric=True,
    ),
    LossSpec(
        "emp_ssl_loss", "spectral", {"lightly": "EMPSSLLoss (coding-rate sign fixed)"},
        False, "coding rate of the global batch (gathered Gram or D×D psum); global mean",
        _views_list(S.emp_ssl_loss), _two_views, {"inv_coef": (200.0, 100.0),
                                                  "tcr_eps": (0.2, 0.5)},
        symmetric=True,
    ),
)

def _three_views(rng: np.random.Generator, batch: int, dim: int) -> Example:
    """Two global views and one local view ``[batch, dim]`` of the same samples."""
    x = rng.standard_normal((batch, dim)).astype(np.float32)
    return Example(tuple((x + 0.5 * rng.standard_normal((batch, dim))).astype(np.float32)
                         for _ in range(3)))


def _random_apply(fn, **defaults):
    """Views as sequences (global: the first two, local: the third), a fixed replicated
    PRNG key (the same on every device) and few slices, so the tests stay fast."""

    def apply(batch, state=None, *, axis_name: AxisName = None, **hyper):
        del state
        key = hyper.pop("key", jax.random.key(0))
        hyper = {**defaults, **hyper}
        if fn is S.sigreg:
            return fn(list(batch), key, axis_name=axis_name, **hyper), None
        return fn(list(batch[2:]), list(batch[:2]), key, axis_name=axis_name, **hyper), None

    return apply


def _lewm_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    """``(embeddings, predicted, target)``, each ``[B, 3, D]`` (equal shapes, so the
    generic "identical views" case applies)."""
    emb = rng.standard_normal((batch, 3, dim)).astype(np.float32)
    pred = (emb + 0.3 * rng.standard_normal((batch, 3, dim))).astype(np.float32)
    return Example((emb, pred, (emb + 0.1 * rng.standard_normal((batch, 3, dim))).astype(
        np.float32)))


def _apply_lewm(batch, state=None, *, axis_name: AxisName = None, **hyper):
    embeddings, predicted, target = batch
    key = hyper.pop("key", jax.random.key(0))
    hyper = {"sigreg_num_vectors": 32, **hyper}
    return S.lewm_loss(predicted, target, embeddings, key, axis_name=axis_name, **hyper), None


def _dense_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    """Student and teacher tokens ``[batch, 5, dim]``."""
    s = rng.standard_normal((batch, 5, dim)).astype(np.float32)
    return Example((s, (s + rng.standard_normal((batch, 5, dim))).astype(np.float32)))


def _apply_paka(batch, state=None, *, axis_name: AxisName = None, **hyper):
    """The mask (about 16 % of the tokens) is derived from the teacher's values."""
    student, teacher = batch
    mask = lax.stop_gradient(teacher[..., 0]) > 1.0 if hasattr(teacher, "shape") else None
    return S.patch_kernel_alignment_loss(student, teacher, mask, axis_name=axis_name,
                                         **hyper), None


LOSSES += (
    LossSpec(
        "sigreg", "slicing", {"lightly": "SIGReg"},
        False, "cos/sin sums psum-ed, N the global count; slices from one key on every "
        "device (lightly: broadcast from rank 0)",
        _random_apply(S.sigreg, num_vectors=32), _two_views,
    ),
    LossSpec(
        "lejepa_loss", "slicing", {"lightly": "LeJEPALoss"},
        False, "SIGReg and invariance over the global batch; slices from one key",
        _random_apply(S.lejepa_loss, sigreg_num_vectors=32), _three_views,
        {"lambda_param": (0.05, 0.5)},
    ),
    LossSpec(
        "lewm_loss", "slicing", {"lightly": "LeWMLoss"},
        False, "prediction mean and SIGReg over the global batch; slices from one key",
        _apply_lewm, _lewm_example, {"lambda_param": (0.1, 0.5)}, grad_argnums=(0, 1),
    ),
    LossSpec(
        "visreg_loss", "slicing", {"lightly": "VISRegLoss"},
        False, "views gathered: every term (sort included) on the global batch; slices "
        "from one key", _random_apply(S.visreg_loss, num_slices=32), _three_views,
        {"lambda_param": (0.9, 0.6), "lambda_scale": (1.0, 2.0)}, min_batch=2,
        numeric_grads=False,  # the shape term detaches the std (as lightly)
    ),
    LossSpec(
        "patch_kernel_alignment_loss", "dense", {"lightly": "PatchKernelAlignmentLoss"},
        False, "per-image CKA local; mean over the global valid images (subsampling "
        "scores drawn for the global batch)", _apply_paka, _dense_example,
        grad_argnums=(0,),
    ),
)

# ---- issue 4 (part): seed variants (fovi, nidl, quadra), NNCLR, ReSSL, VIbCReg
def _apply_fovi_simclr(batch, state=None, *, axis_name: AxisName = None, **hyper):
    """Two pairs per image (rows 2n, 2n+1 of each view) when the rows pair up, so the
    same-image exclusion is exercised (the distributed tests' local batches are even)."""
    z_i, z_j = batch
    pairs = 2 if np.shape(z_i)[0] % 2 == 0 else 1
    return S.fovi_simclr_loss(z_i, z_j, axis_name=axis_name,
                              **{"pairs_per_sample": pairs, **hyper}), None


def _metadata_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    """Two views and one continuous metadata value per sample (raw: no gradient)."""
    return Example(_two_views(rng, batch, dim).batch
                   + (rng.uniform(0.0, 3.0, batch).astype(np.float32),))


def _instance_example(rng: np.random.Generator, batch: int, dim: int) -> Example:
    """Logits over ``dim`` instances and integer instance labels."""
    return Example((rng.standard_normal((batch, dim)).astype(np.float32),
                    rng.integers(0, dim, batch).astype(np.int32)))


def _queue_apply(fn):
    def apply(batch, state, *, axis_name: AxisName = None, **hyper):
        a, b = batch
        return fn(a, b, state, axis_name=axis_name, **hyper)

    return apply


LOSSES += (
    LossSpec(
        "fovi_simclr_loss", "contrastive",
        {"fovi": "SimCLRLoss(pairs_per_sample=P) (sum of its tuple)"},
        False, _GATHER + "; other views of the same image excluded", _apply_fovi_simclr,
        _two_views, {"temperature": (0.5, 0.2)}, symmetric=True,
    ),
    LossSpec(
        "infonce_loss", "contrastive", {"nidl": "InfoNCE"},
        False, _GATHER + " (= ntxent_loss, τ = 0.1)", _stateless(S.infonce_loss), _two_views,
        {"temperature": (0.1, 0.3)}, symmetric=True,
    ),
    LossSpec(
        "y_aware_infonce_loss", "contrastive", {"nidl": "YAwareInfoNCE"},
        False, "keys and metadata all-gathered; kernel weights and their sums over the "
        "global batch", _stateless(S.y_aware_infonce_loss), _metadata_example,
        {"temperature": (0.1, 0.3), "bandwidth": (1.0, 0.5)}, grad_argnums=(0, 1),
        raw_argnums=(2,),
    ),
    LossSpec(
        "byol_regression_loss", "similarity", {"quadra": "BYOLRegressionLoss"},
        False, _MEAN, _stateless(S.byol_regression_loss), _two_views, symmetric=True,
    ),
    LossSpec(
        "simsiam_loss", "similarity", {"quadra": "SimSIAMLoss"},
        False, _MEAN, _stateless(S.simsiam_loss), _four_views, grad_argnums=(0, 1),
    ),
    LossSpec(
        "idmm_loss", "classification", {"quadra": "IDMMLoss"},
        False, _MEAN, _stateless(S.idmm_loss), _instance_example, {"smoothing": (0.1, 0.3)},
        grad_argnums=(0,), raw_argnums=(1,),
    ),
    LossSpec(
        "nnclr_loss", "contrastive", {},
        True, "nearest neighbours from the replicated queue; predictions all-gathered; "
        "global mean; global batch enqueued on every device", _queue_apply(S.nnclr_loss),
        _bank_example, {"temperature": (0.1, 0.3)}, grad_argnums=(1,),
    ),
    LossSpec(
        "ressl_loss", "contrastive", {},
        True, "global mean; global keys enqueued on every device", _queue_apply(S.ressl_loss),
        _bank_example, {"temperature_q": (0.1, 0.2), "temperature_k": (0.04, 0.07)},
        grad_argnums=(0,),
    ),
    LossSpec(
        "vibcreg_loss", "redundancy", {},
        False, _STATS + " for all three terms", _stateless(S.vibcreg_loss), _two_views,
        {"sim_loss_weight": (25.0, 10.0), "var_loss_weight": (25.0, 5.0),
         "cov_loss_weight": (200.0, 100.0)}, min_batch=2, symmetric=True,
    ),
)

# Not in the README table (same loss); exercises the queue in the generic tests.
QUEUE_VARIANTS = (
    LossSpec(
        "swav_loss", "clustering", {"lightly": "SwaVLoss(queue_outputs=...)"},
        False, "queue split across devices", _apply_swav_queue, _swav_queue_example,
        {"temperature": (0.1, 0.2)}, numeric_grads=False, variant="queue",
    ),
)

_BY_NAME = {spec.name: spec for spec in LOSSES}


def get(name: str) -> LossSpec:
    """The spec of the public loss ``name``."""
    return _BY_NAME[name]


#: Tile edge of the tiled variants: small, so the test batches span several tiles and the
#: last one is padded.
_TILED_BLOCK = 3


def _tiled_variant(spec: LossSpec) -> LossSpec:
    def apply(batch, state=None, *, axis_name: AxisName = None, **hyper):
        return spec.apply(batch, state, axis_name=axis_name, implementation="tiled",
                          block_size=_TILED_BLOCK, **hyper)

    return dataclasses.replace(
        spec, family="tiled", apply=apply, variant="tiled",
        distributed="ring: key blocks passed around the devices (ppermute), never gathered")


# Not in the README table (same losses); the memory-linear tiled / ring path of every loss
# that has one, through the whole generic matrix (jit, gradients, vmap, dtypes, degenerate
# inputs and the distributed harness).
TILED_VARIANTS = tuple(_tiled_variant(get(name)) for name in (
    "ntxent_loss", "ntxent_memory_bank_loss", "dcl_loss", "dclw_loss", "infonce_loss",
    "supcon_loss", "mocov3_loss", "clip_loss", "siglip_loss"))


_LIBS = ("lightly", "fovi", "quadra", "nidl")


def markdown_table() -> str:
    """The README loss table."""
    head = "| sslloss_jax | family | state | `axis_name` | " + " | ".join(_LIBS) + " |"
    rows = [head, "|" + "---|" * (4 + len(_LIBS))]
    for s in LOSSES:
        libs = " | ".join(f"`{s.counterparts[k]}`" if k in s.counterparts else "—" for k in _LIBS)
        state = "yes" if s.stateful else "—"
        rows.append(f"| `{s.name}` | {s.family} | {state} | {s.distributed} | {libs} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table())
