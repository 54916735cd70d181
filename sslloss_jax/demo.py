"""End-to-end demo: self-supervised training of a Flax encoder on real digit images.

``python -m sslloss_jax.demo [--loss NAME] [--steps N] [--batch-size B] [--out DIR]``

The data set is scikit-learn's bundled ``load_digits`` (1797 grey 8×8 images; it ships
inside the wheel, nothing is downloaded), split once into train / test (70 / 30,
stratified, fixed seed). A small Flax Linen encoder (an MLP or a small CNN, a projection
head, optionally a predictor head, learnable prototypes or an EMA teacher when the loss
needs them) is trained with optax on augmented views of the *unlabeled* training images:
random affine jitter (shift with zero padding, small rotation and scale), Gaussian noise
and random erasing, all in JAX inside the jitted step (no flips: digits are not mirror
symmetric). Labels are used only by the probes at the end, which compare the trained
encoder with the same encoder at its random initialization and with raw pixels:

- kNN (k=5, cosine) on the L2-normalized representation, fitted on a few labels per class
  (``--labels-per-class``, averaged over 5 label draws): the label-efficient setting in
  which self-supervised features matter;
- kNN and a linear probe (ridge classifier) with every training label.

A PNG with the loss curve and the accuracies is written to ``--out``. Every loss of the
README table that the demo can feed is accepted (:data:`ADAPTERS`, a small adapter table);
:data:`UNSUPPORTED` lists the others with the reason.

Needs the ``demo`` extra: ``pip install "sslloss-jax[demo]"`` (flax, optax, scikit-learn,
matplotlib, tqdm); ``import sslloss_jax`` itself imports none of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import sslloss_jax as ssl

__all__ = ["ADAPTERS", "UNSUPPORTED", "DemoResult", "main", "run"]

IMAGE = 8


# ----------------------------------------------------------------------------- data
def load_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 ``[N, 8, 8]`` in [0, 1]; a fixed stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, IMAGE, IMAGE)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed,
                                              stratify=y)
    return x_tr, x_te, y_tr, y_te


# ----------------------------------------------------------------------------- augmentations
def _affine(key: jax.Array, img: jax.Array, scale: tuple[float, float]) -> jax.Array:
    """Random rotation (±15°), scale and shift (±1.5 px), bilinear, zero outside."""
    kr, ks, kt = jax.random.split(key, 3)
    angle = jax.random.uniform(kr, (), minval=-0.26, maxval=0.26)
    s = jax.random.uniform(ks, (), minval=scale[0], maxval=scale[1])
    shift = jax.random.uniform(kt, (2,), minval=-1.5, maxval=1.5)
    c = (IMAGE - 1) / 2
    yy, xx = jnp.meshgrid(jnp.arange(IMAGE, dtype=jnp.float32) - c,
                          jnp.arange(IMAGE, dtype=jnp.float32) - c, indexing="ij")
    cos, sin = jnp.cos(angle) / s, jnp.sin(angle) / s
    src_y = cos * yy - sin * xx + c - shift[0]
    src_x = sin * yy + cos * xx + c - shift[1]
    return jax.scipy.ndimage.map_coordinates(img, [src_y, src_x], order=1, mode="constant",
                                             cval=0.0)


def _erase(key: jax.Array, img: jax.Array, p: float) -> jax.Array:
    """With probability ``p``, zero a random rectangle of 2–4 × 2–4 pixels."""
    kp, kh, kw, ky, kx = jax.random.split(key, 5)
    h = jax.random.randint(kh, (), 2, 5)
    w = jax.random.randint(kw, (), 2, 5)
    y0 = jax.random.randint(ky, (), 0, IMAGE - h + 1)
    x0 = jax.random.randint(kx, (), 0, IMAGE - w + 1)
    r = jnp.arange(IMAGE)
    box = ((r[:, None] >= y0) & (r[:, None] < y0 + h)) & ((r[None, :] >= x0)
                                                           & (r[None, :] < x0 + w))
    return jnp.where(box & jax.random.bernoulli(kp, p), 0.0, img)


def augment(key: jax.Array, images: jax.Array, *, local: bool = False) -> jax.Array:
    """One augmented view of ``images [B, 8, 8]``. ``local``: a zoomed-in crop (scale
    1.2–1.6, the "local crop" of DINO / SwaV / LeJEPA) with stronger erasing."""
    scale = (1.2, 1.6) if local else (0.85, 1.15)

    def one(k: jax.Array, img: jax.Array) -> jax.Array:
        ka, kn, ke, kb = jax.random.split(k, 4)
        img = _affine(ka, img, scale)
        img = img * jax.random.uniform(kb, (), minval=0.7, maxval=1.3)  # contrast
        img = img + 0.1 * jax.random.normal(kn, img.shape)
        return _erase(ke, img, 0.7 if local else 0.5)

    return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


# ----------------------------------------------------------------------------- model
def make_model(arch: str, out_dim: int, predictor: bool, hidden: int = 256,
               rep_dim: int = 128, head_norm: str = "layer", cosine_head: int = 0) -> Any:
    """A Linen encoder: ``apply(params, x [B, 8, 8]) -> {"h": representation, "z":
    projection, "p": prediction (if ``predictor``)}``.

    The projector and predictor are ``Dense -> norm -> relu -> Dense`` with ``head_norm``
    ``"layer"`` (LayerNorm) or ``"batch"``: batch normalization with the statistics of the
    batch being applied (every view of the step together) and no running averages, as the
    heads are used in training only (the probes read ``h``). The BYOL/SimSiam family, Barlow
    Twins and VICReg are published with batch-normalized heads. ``cosine_head=K`` appends
    DINO's last layer: ``z`` becomes the K cosines between the L2-normalized projection and
    K learned, L2-normalized prototypes (a weight-normalized linear layer with unit norm).
    """
    import flax.linen as nn

    if head_norm not in ("layer", "batch"):
        raise ValueError(f"head_norm must be 'layer' or 'batch', got {head_norm!r}")

    class BatchNorm(nn.LayerNorm):
        """Flax's normalization over the batch axis (per feature, two-pass variance): batch
        normalization with the applied batch's statistics, no running-average state."""

        reduction_axes: int = 0
        epsilon: float = 1e-5
        use_fast_variance: bool = False

    norm = nn.LayerNorm if head_norm == "layer" else BatchNorm

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
            if arch == "cnn":
                h = x[..., None]
                h = nn.relu(nn.Conv(32, (3, 3))(h))
                h = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(h))
                h = nn.Dense(rep_dim)(h.reshape(h.shape[0], -1))
            else:
                h = nn.relu(nn.Dense(hidden)(x.reshape(x.shape[0], -1)))
                h = nn.Dense(rep_dim)(h)
            z = nn.Dense(out_dim)(nn.relu(norm()(nn.Dense(hidden)(h))))
            if cosine_head:
                w = self.param("prototypes", nn.initializers.normal(1.0),
                               (cosine_head, out_dim))
                z = _n(z) @ _n(w).T
            out = {"h": h, "z": z}
            if predictor:
                out["p"] = nn.Dense(out_dim)(nn.relu(norm()(nn.Dense(hidden)(z))))
            return out

    return Encoder()


# ----------------------------------------------------------------------------- adapters
class Ctx(NamedTuple):
    """What an adapter's loss sees for one step (all arrays of the current batch).

    ``z``/``p``: student projections / predictions of every view (global views first);
    ``t``: stop-gradient EMA-teacher projections of the global views (or ``None``);
    ``protos``: learnable prototypes ``[K, out_dim]`` (or ``None``); ``state``: the loss
    state; ``step``: the traced step counter; ``key``: a per-step PRNG key; ``idx``: the
    training-set indices of the batch (instance labels)."""

    z: list[jax.Array]
    p: list[jax.Array] | None
    t: list[jax.Array] | None
    protos: jax.Array | None
    state: Any
    step: jax.Array
    key: jax.Array
    idx: jax.Array
    steps: int


LossOut = tuple[jax.Array, Any]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How the demo drives one loss: the views and heads it needs, its state, and
    ``loss(ctx) -> (loss, new_state)``."""

    loss: Callable[[Ctx], LossOut]
    note: str
    views: int = 2  # global views
    local_views: int = 0
    out_dim: int | str = 64  # or "instances" (one logit per training image)
    predictor: bool = False
    teacher: bool = False  # EMA teacher of the whole encoder
    prototypes: int = 0
    init_state: Callable[[jax.Array, int, int], Any] | None = None  # (key, batch, out_dim)
    lr: float = 2e-3
    head_norm: str = "layer"  # "batch": batch-normalized projector/predictor (make_model)
    cosine_head: int = 0  # K: DINO's normalized prototype layer on top of z (make_model)


def _n(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _sg(x: Any) -> Any:
    return jax.lax.stop_gradient(x)


def _two(fn: Callable[..., jax.Array], **kw: Any) -> Callable[[Ctx], LossOut]:
    return lambda c: (fn(c.z[0], c.z[1], **kw), c.state)


def _sym_teacher(fn: Callable[..., jax.Array], **kw: Any) -> Callable[[Ctx], LossOut]:
    """BYOL / MoCo v3 style: predictions of one view against the teacher of the other."""
    def loss(c: Ctx) -> LossOut:
        assert c.p is not None and c.t is not None
        return 0.5 * (fn(c.p[0], c.t[1], **kw) + fn(c.p[1], c.t[0], **kw)), c.state

    return loss


def _bank(size: int = 1024) -> Callable[[jax.Array, int, int], Any]:
    return lambda key, batch, dim: ssl.init_memory_bank(key, size, dim)


def _align_uniform(extra: Callable[[jax.Array], jax.Array]) -> Callable[[Ctx], LossOut]:
    def loss(c: Ctx) -> LossOut:
        a, b = _n(c.z[0]), _n(c.z[1])
        return ssl.alignment_loss(a, b) + 0.5 * (extra(a) + extra(b)), c.state

    return loss


def _moco(c: Ctx) -> LossOut:
    assert c.t is not None
    return ssl.ntxent_memory_bank_loss(c.z[0], c.t[1], c.state, temperature=0.2)


def _co2_bank(c: Ctx) -> LossOut:
    assert c.t is not None
    moco, _ = ssl.ntxent_memory_bank_loss(c.z[0], c.t[1], c.state, temperature=0.2,
                                          update=False)
    co2, bank = ssl.co2_memory_bank_regularizer(c.z[0], c.t[1], c.state,
                                                t_consistency=0.2)
    return moco + co2, bank


def _nnclr(c: Ctx) -> LossOut:
    assert c.p is not None
    l1, queue = ssl.nnclr_loss(c.z[0], c.p[1], c.state, temperature=0.2)
    l2, _ = ssl.nnclr_loss(c.z[1], c.p[0], c.state, temperature=0.2, update=False)
    return 0.5 * (l1 + l2), queue


def _ressl(c: Ctx) -> LossOut:
    assert c.p is not None and c.t is not None
    return ssl.ressl_loss(c.p[0], c.t[1], c.state)


def _dino(c: Ctx) -> LossOut:
    assert c.t is not None
    # traced schedule: warm up the teacher temperature over the first third of the run
    epoch = c.step.astype(jnp.float32) * (30.0 / c.steps)
    temp = ssl.dino_teacher_temperature(epoch, warmup_teacher_temp=0.04, teacher_temp=0.06,
                                        warmup_teacher_temp_epochs=10)
    return ssl.dino_loss(c.t, c.z, c.state, teacher_temp=temp)


def _swav(c: Ctx) -> LossOut:
    assert c.protos is not None
    protos = _n(c.protos)
    feats = [_n(f) for f in c.z]
    queue = c.state
    # the queue is switched on (traced flag: no retrace) after a third of the run, once full
    valid = (c.step >= c.steps // 3) & (queue.filled == queue.features.shape[1])
    scores = lambda f: f @ protos.T
    # epsilon 0.03: the official SwaV code's advice when the loss sticks at log K (with
    # lightly's default 0.05 the codes of this demo's nearly collapsed initial features are
    # uniform and the predictions follow them)
    loss = ssl.swav_loss([scores(f) for f in feats[:2]], [scores(f) for f in feats[2:]],
                         scores(queue.features), queue_valid=valid, sinkhorn_epsilon=0.03)
    return loss, ssl.swav_queue_update(queue, _sg(feats[:2]))


def _msn(fn: Callable[..., jax.Array]) -> Callable[[Ctx], LossOut]:
    def loss(c: Ctx) -> LossOut:
        assert c.t is not None and c.protos is not None
        # anchors: the student's other global view and the local views; targets: teacher
        return fn(c.z[1:], c.t[0], c.protos), c.state

    return loss


def _wmse(c: Ctx) -> LossOut:
    batch = c.z[0].shape[0]
    w_size = math.gcd(batch, 128)
    return ssl.wmse_loss(c.z, c.state, c.key, embedding_dim=c.z[0].shape[1], w_size=w_size,
                         eps=1e-3)


def _mmcr(c: Ctx) -> LossOut:
    assert c.t is not None
    online = jnp.stack([_n(z) for z in c.z], axis=1)
    momentum = jnp.stack([_n(t) for t in c.t], axis=1)
    return ssl.mmcr_loss(online, momentum), c.state


def _sigreg(c: Ctx) -> LossOut:
    inv = jnp.mean(jnp.square(c.z[0] - c.z[1]))
    return 0.95 * inv + 0.05 * ssl.sigreg(jnp.stack(c.z), c.key, num_vectors=256), c.state


def _lejepa(c: Ctx) -> LossOut:
    return ssl.lejepa_loss(c.z[2:], c.z[:2], c.key, sigreg_num_vectors=256), c.state


def _visreg(c: Ctx) -> LossOut:
    return ssl.visreg_loss(c.z[2:], c.z[:2], c.key, num_slices=256), c.state


def _lewm(c: Ctx) -> LossOut:
    assert c.p is not None
    emb = jnp.stack(c.z[:2], axis=1)  # the two views as two "frames"
    # SIGReg weight 0.02 (lightly's default 0.1 keeps this demo's embeddings near the
    # random-init level: +0.014 with BN heads, 0.05 gives +0.042, 0.02 +0.059)
    return ssl.lewm_loss(c.p[0][:, None], _sg(c.z[1])[:, None], emb, c.key,
                         sigreg_num_vectors=256, lambda_param=0.02), c.state


def _idmm(c: Ctx) -> LossOut:
    y = c.idx.astype(jnp.int32)
    return 0.5 * (ssl.idmm_loss(c.z[0], y) + ssl.idmm_loss(c.z[1], y)), c.state


def _tico(c: Ctx) -> LossOut:
    return ssl.tico_loss(c.z[0], c.z[1], c.state)


_ntx = lambda a, b: ssl.ntxent_loss(a, b, temperature=0.2)

#: loss name -> how the demo drives it.
ADAPTERS: dict[str, Adapter] = {
    "ntxent_loss": Adapter(_two(ssl.ntxent_loss, temperature=0.2), "SimCLR, tau=0.2"),
    "infonce_loss": Adapter(_two(ssl.infonce_loss), "nidl InfoNCE, tau=0.1"),
    "fovi_simclr_loss": Adapter(_two(ssl.fovi_simclr_loss, temperature=0.2),
                                "fovi SimCLR, one pair per sample"),
    "dcl_loss": Adapter(_two(ssl.dcl_loss, temperature=0.2), "decoupled contrastive"),
    "dclw_loss": Adapter(_two(ssl.dclw_loss, temperature=0.2), "weighted DCL"),
    "directclr_loss": Adapter(_two(ssl.directclr_loss, loss_dim=32), "first 32 dims"),
    "macl_loss": Adapter(_two(ssl.macl_loss, temperature=0.2), "model-aware contrastive"),
    "mocov3_loss": Adapter(_sym_teacher(ssl.mocov3_loss), "MoCo v3: predictor vs EMA keys",
                           predictor=True, teacher=True),
    "clip_loss": Adapter(_two(ssl.clip_loss, temperature=0.1), "the two views as towers"),
    "siglip_loss": Adapter(_two(ssl.siglip_loss), "the two views as towers"),
    "co2_regularizer": Adapter(
        lambda c: (_ntx(c.z[0], c.z[1])
                   + ssl.co2_regularizer(c.z[0], c.z[1], t_consistency=0.2), c.state),
        "added to NT-Xent; t_consistency=0.2 (the default 0.05 does not learn here)"),
    "ntxent_memory_bank_loss": Adapter(_moco, "MoCo: EMA keys, memory bank of 1024",
                                       teacher=True, init_state=_bank()),
    "co2_memory_bank_regularizer": Adapter(_co2_bank,
                                           "added to MoCo (shared bank); t_consistency=0.2",
                                           teacher=True, init_state=_bank()),
    "directclr_memory_bank_loss": Adapter(
        lambda c: ssl.directclr_memory_bank_loss(c.z[0], c.t[1], c.state,  # type: ignore[index]
                                                 loss_dim=32, temperature=0.2),
        "DirectCLR on the first 32 dims, MoCo-style: EMA keys, bank of 1024, tau=0.2",
        teacher=True, init_state=lambda key, batch, dim: ssl.init_memory_bank(key, 1024, 32)),
    "nnclr_loss": Adapter(_nnclr, "NNCLR: nearest neighbours from a queue of 1024, BN heads",
                          predictor=True, init_state=_bank(), head_norm="batch"),
    "ressl_loss": Adapter(_ressl, "ReSSL: EMA keys, queue of 1024, BN heads", predictor=True,
                          teacher=True, init_state=_bank(), head_norm="batch"),
    "negative_cosine_similarity": Adapter(
        _sym_teacher(lambda p, t: ssl.negative_cosine_similarity(p, t)),
        "BYOL: predictor vs EMA teacher, BN heads", predictor=True, teacher=True,
        head_norm="batch"),
    "byol_regression_loss": Adapter(_sym_teacher(ssl.byol_regression_loss),
                                    "BYOL: predictor vs EMA teacher, BN heads",
                                    predictor=True, teacher=True, head_norm="batch"),
    "sym_negative_cosine_similarity_loss": Adapter(
        lambda c: (ssl.sym_negative_cosine_similarity_loss(
            (c.z[0], c.p[0]), (c.z[1], c.p[1])), c.state),  # type: ignore[index]
        "SimSiam (stop-gradient, no teacher), BN heads", predictor=True, head_norm="batch"),
    "simsiam_loss": Adapter(
        lambda c: (ssl.simsiam_loss(c.p[0], c.p[1], c.z[0], c.z[1]),  # type: ignore[index]
                   c.state), "SimSiam (stop-gradient, no teacher), BN heads",
        predictor=True, head_norm="batch"),
    "hypersphere_loss": Adapter(_two(ssl.hypersphere_loss), "alignment + uniformity"),
    "alignment_loss": Adapter(_align_uniform(ssl.uniformity_loss),
                              "alignment_loss + uniformity_loss of both views"),
    "uniformity_loss": Adapter(_align_uniform(ssl.uniformity_loss),
                               "alignment_loss + uniformity_loss of both views"),
    "koleo_loss": Adapter(_align_uniform(lambda x: 0.1 * ssl.koleo_loss(x)),
                          "alignment_loss + 0.1 koleo_loss of both views"),
    "barlow_twins_loss": Adapter(_two(ssl.barlow_twins_loss),
                                 "Barlow Twins: BN heads, 512-d projection", out_dim=512,
                                 head_norm="batch"),
    "vicreg_loss": Adapter(_two(ssl.vicreg_loss), "VICReg: BN heads, 1024-d projection",
                           out_dim=1024, head_norm="batch"),
    "vibcreg_loss": Adapter(_two(ssl.vibcreg_loss), "VIbCReg"),
    "tico_loss": Adapter(_tico, "TiCo: running covariance state, BN heads",
                         init_state=lambda key, batch, dim: ssl.init_tico_state(dim),
                         head_norm="batch"),
    "wmse_loss": Adapter(_wmse, "W-MSE: whitened sub-batches, running statistics",
                         out_dim=16,
                         init_state=lambda key, batch, dim: ssl.init_wmse_state(dim)),
    "frossl_loss": Adapter(lambda c: (ssl.frossl_loss(c.z), c.state),
                           "FroSSL, 2 views, BN heads, 1024-d projection", out_dim=1024,
                           head_norm="batch"),
    "emp_ssl_loss": Adapter(lambda c: (ssl.emp_ssl_loss([_n(z) for z in c.z]), c.state),
                            "EMP-SSL, 4 L2-normalized views (as the official projector)",
                            views=4),
    "mmcr_loss": Adapter(_mmcr, "MMCR: online and EMA views", teacher=True),
    "dino_loss": Adapter(_dino, "DINO: EMA teacher, center, traced temperature schedule, "
                         "2 global + 2 local crops; DINO head (64-d bottleneck, 256 "
                         "normalized prototypes), BN heads", local_views=2, out_dim=64,
                         cosine_head=256, head_norm="batch", teacher=True,
                         init_state=lambda key, batch, dim: ssl.init_dino_state(dim)),
    "swav_loss": Adapter(_swav, "SwaV: 100 prototypes, epsilon 0.03, 2 + 2 crops, queue "
                         "switched on after a third of the run, BN heads", local_views=2,
                         prototypes=100, head_norm="batch",
                         init_state=lambda key, batch, dim: ssl.init_swav_queue(
                             2, 2 * batch, dim)),
    "msn_loss": Adapter(_msn(ssl.msn_loss), "MSN: EMA targets, 30 prototypes, 1 + 2 anchors, "
                        "BN heads", local_views=2, teacher=True, prototypes=30,
                        head_norm="batch"),
    "pmsn_loss": Adapter(_msn(ssl.pmsn_loss), "PMSN: as MSN, power-law prior",
                         local_views=2, teacher=True, prototypes=30, head_norm="batch"),
    "sigreg": Adapter(_sigreg, "invariance + SIGReg (the LeJEPA recipe)"),
    "lejepa_loss": Adapter(_lejepa, "LeJEPA: 2 global + 2 local views, BN heads",
                           local_views=2, head_norm="batch"),
    "visreg_loss": Adapter(_visreg, "VISReg: 2 global + 2 local views, BN heads",
                           local_views=2, head_norm="batch"),
    "lewm_loss": Adapter(_lewm, "LeWM: the two views as two frames, predictor, SIGReg "
                         "weight 0.02, BN heads", predictor=True, head_norm="batch"),
    "idmm_loss": Adapter(_idmm, "instance discrimination: one logit per training image",
                         out_dim="instances"),
}

#: loss name -> why the demo cannot drive it.
UNSUPPORTED: dict[str, str] = {
    "supcon_loss": "needs class labels (supervised contrastive)",
    "y_aware_infonce_loss": "needs continuous metadata y per sample",
    "vicregl_loss": "needs local feature maps and their grid coordinates",
    "detcon_b_loss": "needs region masks of each view",
    "detcon_s_loss": "needs region masks of each view",
    "ibot_patch_loss": "needs masked patch tokens of a ViT",
    "ibot_plus_plus_patch_loss": "needs patch tokens of a ViT",
    "capi_loss": "needs patch tokens of a ViT (token-level clustering)",
    "patch_kernel_alignment_loss": "needs patch tokens of a ViT",
}

DEFAULT_LOSS = "ntxent_loss"


def resolve_loss(name: str) -> str:
    """``"vicreg"`` or ``"vicreg_loss"`` -> ``"vicreg_loss"``; a clear error otherwise."""
    for cand in (name, f"{name}_loss"):
        if cand in ADAPTERS:
            return cand
        if cand in UNSUPPORTED:
            raise ValueError(f"the demo cannot drive {cand!r}: {UNSUPPORTED[cand]}. "
                             f"Choose one of: {', '.join(sorted(ADAPTERS))}")
    raise ValueError(f"unknown loss {name!r}. Choose one of: {', '.join(sorted(ADAPTERS))} "
                     "(the '_loss' suffix may be omitted)")


# ----------------------------------------------------------------------------- probes
def _normalize_np(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def probe(f_tr: np.ndarray, y_tr: np.ndarray, f_te: np.ndarray, y_te: np.ndarray, *,
          labels_per_class: int, seed: int = 0, draws: int = 5) -> dict[str, float]:
    """Held-out accuracies of features: kNN (k=5, on L2-normalized features) with
    ``labels_per_class`` labels per class (mean of ``draws`` label draws), kNN with all
    labels, and a linear probe (a ridge classifier on standardized features, all labels:
    closed form, so the probe takes milliseconds)."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    a, b = _normalize_np(f_tr), _normalize_np(f_te)
    rng = np.random.default_rng(seed)
    few = []
    for _ in range(draws):
        idx = np.concatenate([rng.choice(np.flatnonzero(y_tr == c), labels_per_class,
                                         replace=False) for c in np.unique(y_tr)])
        knn = KNeighborsClassifier(min(5, len(idx))).fit(a[idx], y_tr[idx])
        few.append(knn.score(b, y_te))
    full = KNeighborsClassifier(5).fit(a, y_tr).score(b, y_te)
    linear = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0))
    lin = linear.fit(f_tr, y_tr).score(f_te, y_te)
    return {"knn_few": float(np.mean(few)), "knn_all": float(full), "linear": float(lin)}


# ----------------------------------------------------------------------------- training
class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    loss_state: Any
    teacher: Any
    step: jax.Array


@dataclasses.dataclass
class DemoResult:
    """What :func:`run` returns: the loss per step, the probe accuracies of the trained
    encoder, the randomly initialized one and raw pixels, the PNG path and timings."""

    loss: str
    losses: list[float]
    trained: dict[str, float]
    random_init: dict[str, float]
    pixels: dict[str, float]
    png: str | None
    train_seconds: float
    total_seconds: float


def _build(adapter: Adapter, arch: str, n_train: int, batch: int, steps: int, seed: int):
    import optax

    out_dim = n_train if adapter.out_dim == "instances" else int(adapter.out_dim)
    model = make_model(arch, out_dim, adapter.predictor, head_norm=adapter.head_norm,
                       cosine_head=adapter.cosine_head)
    k_init, k_proto, k_state = jax.random.split(jax.random.key(seed), 3)
    params: dict[str, Any] = {"model": jax.jit(model.init)(k_init,
                                                           jnp.zeros((1, IMAGE, IMAGE)))}
    if adapter.prototypes:
        params["prototypes"] = jax.random.normal(k_proto, (adapter.prototypes, out_dim))
    schedule = optax.warmup_cosine_decay_schedule(0.0, adapter.lr, max(1, steps // 10),
                                                  max(2, steps))
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
    state = TrainState(
        params, jax.jit(optimizer.init)(params),
        adapter.init_state(k_state, batch, adapter.cosine_head or out_dim)
        if adapter.init_state else None,
        jax.tree.map(jnp.copy, params) if adapter.teacher else None,
        jnp.zeros((), jnp.int32))
    n_views = adapter.views + adapter.local_views

    def train_step(ts: TrainState, images: jax.Array, idx: jax.Array, key: jax.Array):
        keys = jax.random.split(key, n_views + 1)
        views = [augment(keys[v], images, local=v >= adapter.views) for v in range(n_views)]
        t_out = None
        if adapter.teacher:
            t_all = model.apply(ts.teacher["model"], jnp.concatenate(views[:adapter.views]))
            t_out = list(jnp.split(_sg(t_all["z"]), adapter.views))

        def objective(params):
            out = model.apply(params["model"], jnp.concatenate(views))
            z = list(jnp.split(out["z"], n_views))
            p = list(jnp.split(out["p"], n_views)) if adapter.predictor else None
            ctx = Ctx(z, p, t_out, params.get("prototypes"), ts.loss_state, ts.step,
                      keys[-1], idx, steps)
            return adapter.loss(ctx)

        (value, new_state), grads = jax.value_and_grad(objective, has_aux=True)(ts.params)
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        teacher = ts.teacher
        if adapter.teacher:
            momentum = 0.99 + 0.01 * ts.step.astype(jnp.float32) / steps  # 0.99 -> 1
            teacher = optax.incremental_update(params, teacher, 1.0 - momentum)
        return TrainState(params, opt_state, _sg(new_state), teacher, ts.step + 1), value

    def features(params: Any, images: np.ndarray) -> np.ndarray:
        return np.asarray(jax.jit(lambda p, x: model.apply(p, x)["h"])(params["model"],
                                                                         images))

    return state, jax.jit(train_step, donate_argnums=0), features


def _plot(path: str, name: str, losses: Sequence[float], accs: dict[str, dict[str, float]],
          labels_per_class: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    ax0.plot(losses, lw=1, alpha=0.4, label="per step")
    w = max(1, len(losses) // 20)
    if len(losses) >= w:
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax0.plot(np.arange(w - 1, len(losses)), smooth, lw=2, label=f"mean of {w}")
    ax0.set(title=f"{name}: training loss", xlabel="step", ylabel="loss")
    ax0.legend()
    metrics = [("knn_few", f"kNN, {labels_per_class} labels/class"), ("knn_all",
               "kNN, all labels"), ("linear", "linear probe")]
    width = 0.27
    for i, (who, res) in enumerate(accs.items()):
        vals = [res[m] for m, _ in metrics]
        bars = ax1.bar(np.arange(3) + (i - 1) * width, vals, width, label=who)
        ax1.bar_label(bars, fmt="%.3f", fontsize=7)
    ax1.set_xticks(np.arange(3), [m[1] for m in metrics])
    ax1.set(title="held-out accuracy (digits test split)", ylim=(0, 1.05))
    ax1.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(loss: str = DEFAULT_LOSS, *, steps: int = 1000, batch_size: int = 256,
        out: str | None = "demo_out", seed: int = 0, arch: str = "cnn",
        labels_per_class: int = 5, progress: bool = True,
        log: Callable[[str], None] = print) -> DemoResult:
    """Train, probe, plot; see the module docstring. ``out=None`` writes no PNG."""
    t_start = time.perf_counter()
    name = resolve_loss(loss)
    adapter = ADAPTERS[name]
    if steps < 1 or batch_size < 4:
        raise ValueError(f"need steps >= 1 and batch_size >= 4, got {steps}, {batch_size}")
    x_tr, x_te, y_tr, y_te = load_data()
    if batch_size > x_tr.shape[0]:
        raise ValueError(f"batch_size must be <= {x_tr.shape[0]}, got {batch_size}")
    ts, train_step, features = _build(adapter, arch, x_tr.shape[0], batch_size, steps, seed)
    init_params = jax.tree.map(np.asarray, ts.params)

    log(f"loss {name} ({adapter.note}); {arch} encoder; {x_tr.shape[0]} train / "
        f"{x_te.shape[0]} test digits; batch {batch_size}, {steps} steps")
    x_dev = jnp.asarray(x_tr)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed + 1)
    order = rng.permutation(x_tr.shape[0])
    pos = 0
    losses: list[float] = []
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), disable=not progress, desc=name, unit="step", leave=False)
    t0 = time.perf_counter()
    for _ in bar:
        if pos + batch_size > order.size:
            order, pos = rng.permutation(x_tr.shape[0]), 0
        idx = jnp.asarray(order[pos:pos + batch_size])
        pos += batch_size
        key, sub = jax.random.split(key)
        ts, value = train_step(ts, x_dev[idx], idx, sub)
        losses.append(float(value))
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    train_seconds = time.perf_counter() - t0
    if not np.all(np.isfinite(losses)):
        log(f"warning: non-finite loss values during training ({name})")

    kw = dict(labels_per_class=labels_per_class, seed=seed)
    accs = {
        "trained": probe(features(ts.params, x_tr), y_tr, features(ts.params, x_te), y_te,
                         **kw),
        "random init": probe(features(init_params, x_tr), y_tr, features(init_params, x_te),
                             y_te, **kw),
        "raw pixels": probe(x_tr.reshape(len(x_tr), -1), y_tr, x_te.reshape(len(x_te), -1),
                            y_te, **kw),
    }
    log(f"trained {steps} steps in {train_seconds:.1f} s; final loss "
        f"{np.mean(losses[-10:]):.4f}")
    log(f"held-out accuracy        kNN {labels_per_class}/class   kNN all   linear")
    for who, res in accs.items():
        log(f"  {who:<20s} {res['knn_few']:10.3f} {res['knn_all']:9.3f} "
            f"{res['linear']:8.3f}")
    png = None
    if out is not None:
        os.makedirs(out, exist_ok=True)
        png = os.path.join(out, f"demo_{name}.png")
        _plot(png, name, losses, accs, labels_per_class)
        log(f"wrote {png}")
    return DemoResult(name, losses, accs["trained"], accs["random init"], accs["raw pixels"],
                      png, train_seconds, time.perf_counter() - t_start)


def _parser() -> argparse.ArgumentParser:
    listing = ", ".join(sorted(ADAPTERS))
    unsupported = "; ".join(f"{k}: {v}" for k, v in sorted(UNSUPPORTED.items()))
    p = argparse.ArgumentParser(
        prog="python -m sslloss_jax.demo",
        description="Self-supervised training of a small Flax encoder on scikit-learn's "
                    "digits with an sslloss_jax loss, then kNN / linear probes against "
                    "the random-init encoder and raw pixels.",
        epilog=f"Supported losses: {listing}. Not supported: {unsupported}.")
    p.add_argument("--loss", default=DEFAULT_LOSS,
                   help=f"loss name ('_loss' suffix optional; default {DEFAULT_LOSS})")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default="demo_out", help="folder of the PNG (default demo_out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=["cnn", "mlp"], default="cnn",
                   help="encoder: a small CNN (default) or an MLP")
    p.add_argument("--labels-per-class", type=int, default=5,
                   help="labels per class of the few-label kNN probe (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the losses and exit")
    return p


def main(argv: Sequence[str] | None = None) -> DemoResult | None:
    """The command line; returns the :class:`DemoResult` (``None`` with ``--list``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        for k in sorted(ADAPTERS):
            print(f"{k:38s} {ADAPTERS[k].note}")
        for k in sorted(UNSUPPORTED):
            print(f"{k:38s} (unsupported: {UNSUPPORTED[k]})")
        return None
    try:
        resolve_loss(args.loss)
    except ValueError as e:
        parser.error(str(e))  # exits with status 2 and the message
    return run(args.loss, steps=args.steps, batch_size=args.batch_size, out=args.out,
               seed=args.seed, arch=args.arch, labels_per_class=args.labels_per_class,
               progress=not args.no_progress)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(sys.argv[1:])
