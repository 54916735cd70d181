"""Benchmark of sslloss_jax against lightly (PyTorch) on the CPU (default) or a GPU
(``--platform gpu``): forward + backward time, compile time and peak memory per (loss, shape)
row. See benchmarks/README.md.

Design: for each row, one fresh worker process per side (``--_worker``) imports its framework,
builds the inputs and the jitted (or eager) forward+backward step, measures the peak RSS of
one call, warms up, and then answers "run one repetition" requests over a pipe. The parent
alternates the two workers (ours, lightly, ours, lightly, ...), so machine noise hits both
sides alike, and reports medians. Only one worker computes at a time.

On a GPU (``--platform gpu``) both sides run there: JAX without preallocation, lightly's
modules and inputs moved to CUDA and each step synchronized; memory is the device's, not
the host's RSS (lightly's peak above its inputs, ours XLA's temporaries and outputs: see
:func:`peak_mib_of`). The two workers of a row set up at the same time (the host has cores
to spare) and are then timed one after the other as on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform as host
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
ORACLE = REPO.parent / "shared" / "oracle"
T = TypeVar("T")
DEFAULT_ORACLE_PYTHON = Path.home() / ".cache/sslloss-oracle/venv/bin/python"


@dataclasses.dataclass(frozen=True)
class Loss:
    ours: str  # function name in sslloss_jax
    lightly: str  # class name in lightly.loss (dotted for submodules); "" = none
    kwargs: dict  # hyperparameters, identical on both sides
    kind: str = "pair"  # how inputs are built and passed: see make_inputs / build_*
    floor: str | None = "gram_exp"  # the unavoidable operations: see FLOORS
    ours_kwargs: dict = dataclasses.field(default_factory=dict)  # ours only (e.g. impl)
    student_first: bool = False  # token kinds: (student, teacher) argument order, not reverse


LOSSES = {
    "ntxent": Loss("ntxent_loss", "NTXentLoss", {"temperature": 0.5}),
    "dcl": Loss("dcl_loss", "DCLLoss", {"temperature": 0.1}),
    "dclw": Loss("dclw_loss", "DCLWLoss", {"temperature": 0.1, "sigma": 0.5}),
    "barlow": Loss("barlow_twins_loss", "BarlowTwinsLoss", {"lambda_param": 5e-3},
                   floor="gram"),
    "vicreg": Loss("vicreg_loss", "VICRegLoss", {}, floor="gram"),
    "negcos": Loss("negative_cosine_similarity", "NegativeCosineSimilarity", {}, floor=None),
    "hypersphere": Loss("hypersphere_loss", "hypersphere_loss.HypersphereLoss", {},
                        floor="gram_exp_views"),
    "ntxent_bank": Loss("ntxent_memory_bank_loss", "NTXentLoss", {"temperature": 0.5},
                        floor="bank_exp"),
    "tico": Loss("tico_loss", "TiCoLoss", {"beta": 0.9, "rho": 8.0}, kind="tico",
                 floor="tico"),
    "dino": Loss("dino_loss", "DINOLoss", {"teacher_temp": 0.04, "student_temp": 0.1,
                                           "center_momentum": 0.9}, kind="dino", floor="lse"),
    "swav": Loss("swav_loss", "SwaVLoss", {"temperature": 0.1, "sinkhorn_iterations": 3,
                                           "sinkhorn_epsilon": 0.05}, kind="swav", floor="lse"),
    "msn": Loss("msn_loss", "MSNLoss", {"temperature": 0.1, "sinkhorn_iterations": 3,
                                        "regularization_weight": 1.0}, kind="msn",
                floor="proj_lse"),
    "pmsn": Loss("pmsn_loss", "PMSNLoss", {"temperature": 0.1, "sinkhorn_iterations": 3,
                                           "power_law_exponent": 0.25}, kind="msn",
                 floor="proj_lse"),
    "ntxent_dense": Loss("ntxent_loss", "NTXentLoss", {"temperature": 0.5},
                         ours_kwargs={"implementation": "dense"}),
    "directclr": Loss("directclr_loss", "DirectCLRLoss", {"loss_dim": 64, "temperature": 0.5}),
    "macl": Loss("macl_loss", "MACLLoss", {"temperature": 0.1, "alpha": 0.5, "A_0": 0.0}),
    "koleo": Loss("koleo_loss", "KoLeoLoss", {}, kind="single", floor="gram"),
    "frossl": Loss("frossl_loss", "FroSSLLoss", {}, kind="views", floor="cov"),
    "emp_ssl": Loss("emp_ssl_loss", "EMPSSLLoss", {"tcr_eps": 0.2, "inv_coef": 200.0},
                    kind="views", floor="cov"),
    "mmcr": Loss("mmcr_loss", "MMCRLoss", {"lmda": 5e-3}, kind="mmcr", floor=None),
    "wmse": Loss("wmse_loss", "WMSELoss", {}, kind="wmse", floor="cov"),
    "sigreg": Loss("sigreg", "lejepa_loss.SIGReg", {}, kind="proj", floor="slices"),
    "lejepa": Loss("lejepa_loss", "LeJEPALoss", {}, kind="jepa", floor="slices"),
    "visreg": Loss("visreg_loss", "VISRegLoss", {}, kind="jepa", floor="slices"),
    "paka": Loss("patch_kernel_alignment_loss", "PatchKernelAlignmentLoss", {}, kind="tokens",
                 floor="kernel", student_first=True),
    "capi": Loss("capi_loss", "CAPILoss", {}, kind="tokens", floor="lse"),
    "ibotpp": Loss("ibot_plus_plus_patch_loss", "IBOTPlusPlusPatchLoss",
                   {"teacher_temp": 0.04, "student_temp": 0.1, "center_momentum": 0.9},
                   kind="ibotpp", floor="lse"),
    "detcon_s": Loss("detcon_s_loss", "DetConSLoss", {"temperature": 0.1}, kind="region"),
}


def shape_kwargs(row: Row) -> dict:
    """Hyperparameters that follow the row's shape, the same on both sides."""
    if LOSSES[row.loss].kind == "wmse":
        return {"embedding_dim": row.dim, "w_size": min(256, row.batch)}
    return {}


@dataclasses.dataclass(frozen=True)
class Row:
    loss: str
    batch: int
    dim: int
    bank: int = 0  # memory bank (NT-Xent) or queue (SwaV) rows
    k: int = 0  # prototypes (SwaV, MSN); DINO's K is ``dim``
    # DINO/SwaV: (global/high, local/low) crops; MSN: (1, anchor views - 1); views kinds
    # (FroSSL, EMP-SSL, MMCR, SIGReg): (views, 0)
    crops: tuple[int, int] = (0, 0)
    tokens: int = 0  # patch tokens per image (token kinds) or regions (DetCon)

    @property
    def registry(self) -> bool:
        """A row of the registry's example configuration, ours only (no lightly twin)."""
        return self.loss not in LOSSES

    @property
    def name(self) -> str:
        if self.registry:
            return f"{self.loss} b{self.batch} d{self.dim} (registry example)"
        name = f"{self.loss} b{self.batch} d{self.dim}"
        if self.tokens:
            name += f" t{self.tokens}"
        if self.k:
            name += f" k{self.k}"
        if any(self.crops):
            name += f" {self.crops[0]}+{self.crops[1]}"
        if self.bank:
            name += f" {'queue' if self.loss == 'swav' else 'bank'}{self.bank}"
        return name


ROWS = [
    Row("ntxent", 256, 128),
    Row("ntxent", 1024, 128),
    Row("ntxent", 4096, 128),
    Row("dcl", 256, 128),
    Row("dcl", 4096, 128),
    Row("dclw", 256, 128),
    Row("barlow", 256, 2048),
    Row("barlow", 256, 8192),
    Row("vicreg", 256, 2048),
    Row("vicreg", 256, 8192),
    Row("negcos", 256, 2048),
    Row("hypersphere", 256, 128),
    Row("ntxent_bank", 256, 128, 4096),
    Row("dino", 64, 65536, crops=(2, 6)),
    Row("swav", 256, 128, k=3000, crops=(2, 6)),
    Row("swav", 256, 128, 3840, k=3000, crops=(2, 6)),
    Row("tico", 256, 256),
    Row("tico", 256, 2048),
    Row("msn", 64, 256, k=1024, crops=(1, 10)),
    # the scale issue: "ntxent b4096" (8192 rows) is above the "auto" threshold, so tiled;
    # this row forces the dense path at the same shape
    Row("ntxent_dense", 4096, 128),
    # one row per remaining loss that lightly has
    Row("pmsn", 64, 256, k=1024, crops=(1, 10)),
    Row("directclr", 256, 128),
    Row("macl", 256, 128),
    Row("koleo", 256, 128),
    Row("frossl", 256, 128, crops=(2, 0)),
    Row("emp_ssl", 256, 128, crops=(4, 0)),
    Row("mmcr", 256, 128, crops=(2, 0)),
    Row("wmse", 256, 128),
    Row("sigreg", 256, 128, crops=(2, 0)),
    Row("lejepa", 256, 128, crops=(2, 6)),
    Row("visreg", 256, 128, crops=(2, 6)),
    Row("paka", 64, 256, tokens=64),
    Row("capi", 64, 1024, tokens=64),
    Row("ibotpp", 64, 8192, tokens=64),
    Row("detcon_s", 64, 128, tokens=16),
]

# Targets on ours/lightly time ratios (lower is better).
GEOMEAN_TARGET, MAX_RATIO_TARGET, BIG_D_SPEEDUP, ROOFLINE_TARGET = 0.2, 0.8, 25.0, 1.3
BIG_D_ROWS = ("barlow b256 d8192", "vicreg b256 d8192")
BUSY_WARNING = 0.1  # CPU fraction used by other processes that makes timings unreliable


def registry_rows(batch: int = 256, dim: int = 128) -> list[Row]:
    """One ours-only row per registry loss that no curated row above covers, at the
    registry's example configuration (``LossSpec.example(rng, batch, dim)``)."""
    from sslloss_jax import _registry

    covered = {LOSSES[r.loss].ours for r in ROWS}
    return [Row(spec.name, batch, dim) for spec in _registry.LOSSES
            if spec.name not in covered]


def all_rows() -> list[Row]:
    return ROWS + registry_rows()


def quick_rows(rows: list[Row]) -> list[Row]:
    small = (Row(r.loss, min(r.batch, 32), min(r.dim, 16 if r.loss == "wmse" else 64),
                 min(r.bank, 128), min(r.k, 64), r.crops, min(r.tokens, 8)) for r in rows)
    return list(dict.fromkeys(small))


# --------------------------------------------------------------------------------------------
# Worker side: one process, one side, one row.


def _unit(x):
    import numpy as np

    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_inputs(row: Row) -> dict:
    """The row's float32 inputs, by name; the same arrays feed both sides.

    ``pair``: two correlated views ``x0, x1`` (B, D). ``dino``: ``teacher`` (Vg, B, K) and
    ``student`` (Vg + Vl, B, K) logits. ``swav``: ``high`` (Vh, B, K) and ``low``
    (Vl, B, K), the scores of the high- and low-resolution crops (two backbone passes) of
    normalized features against normalized prototypes (cosines, as SwaV's), and
    ``queue`` (Vh, Q, K) when the row has a queue. ``msn``: view-major ``anchors``
    (V·B, D), ``targets`` (B, D), ``prototypes`` (K, D).
    """
    import numpy as np

    rng = np.random.default_rng(0)
    if row.registry:
        raise ValueError(f"{row.name}: registry rows build their inputs in the worker")
    kind = LOSSES[row.loss].kind
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    vg, vl = row.crops
    if kind in ("pair", "tico", "wmse", "single"):
        x0 = normal(row.batch, row.dim)
        out = {"x0": x0, "x1": x0 + np.float32(0.5) * normal(row.batch, row.dim)}
        return {"x0": x0} if kind == "single" else out
    if kind in ("views", "proj", "jepa"):
        x = normal(row.batch, row.dim)
        views = np.stack([x + np.float32(0.5) * normal(row.batch, row.dim)
                          for _ in range(vg + vl)])
        return {"views": views} if kind != "jepa" else {"global": views[:vg],
                                                        "local": views[vg:]}
    if kind == "mmcr":
        online = normal(row.batch, vg, row.dim)
        return {"online": online, "momentum": online + np.float32(0.5) * online.std()
                * normal(row.batch, vg, row.dim)}
    if kind in ("tokens", "ibotpp"):
        teacher = normal(row.batch, row.tokens, row.dim)
        return {"student": teacher + normal(row.batch, row.tokens, row.dim),
                "teacher": teacher}
    if kind == "region":
        views = normal(2, row.batch, row.tokens, row.dim)
        masks = rng.integers(0, 4, (2, row.batch, row.tokens)).astype(np.int64)
        return {"views": views, "masks": masks}
    if kind == "dino":
        return {"teacher": normal(vg, row.batch, row.dim),
                "student": normal(vg + vl, row.batch, row.dim)}
    if kind == "swav":
        protos = _unit(normal(row.k, row.dim))
        crops = _unit(normal(vg + vl, row.batch, row.dim)) @ protos.T
        out = {"high": crops[:vg], "low": crops[vg:]}  # two backbone passes (resolutions)
        if row.bank:
            out["queue"] = _unit(normal(vg, row.bank, row.dim)) @ protos.T
        return out
    if kind == "msn":
        return {"anchors": normal((vg + vl) * row.batch, row.dim),
                "targets": normal(row.batch, row.dim), "prototypes": normal(row.k, row.dim)}
    raise ValueError(kind)


def import_ours(threads: int, platform: str = "cpu") -> dict:
    import jax
    import jaxlib

    import sslloss_jax

    try:
        backend = jax.default_backend()
    except Exception as err:  # JAX_PLATFORMS=cuda without a CUDA plugin: a bare assert
        raise RuntimeError(f"JAX has no {platform} backend (JAX_PLATFORMS="
                           f"{os.environ.get('JAX_PLATFORMS')}): {type(err).__name__} "
                           f"{err}") from err
    if platform == "gpu" and backend != "gpu":
        raise RuntimeError(f"--platform gpu, but JAX's default backend is {backend!r}")
    x = jax.numpy.ones((512, 512))  # start XLA's thread pool before measuring memory
    jax.block_until_ready(jax.jit(lambda x: jax.numpy.tanh(x @ x).sum())(x))
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "sslloss_jax": sslloss_jax.__version__, "backend": backend,
            **({"device": jax.devices()[0].device_kind} if platform == "gpu" else {})}


def ours_step(row: Row, arrays: dict):
    """``(fn, diff, rest, has_aux)``: the loss as ``fn(*diff, *rest)``, differentiated in
    ``diff``. Teachers, targets and queues get no gradient (they need none). With
    ``has_aux`` the loss returns ``(value, new_state)`` and the state is one of ``rest``."""
    import functools

    import jax
    import jax.numpy as jnp

    import sslloss_jax as S

    if row.registry:
        return registry_step(row)
    spec = LOSSES[row.loss]
    fn = functools.partial(getattr(S, spec.ours), **spec.kwargs, **spec.ours_kwargs)
    a = {k: jnp.asarray(v) for k, v in arrays.items()}
    key = jax.random.key(0)
    if spec.kind == "pair":
        rest = (S.init_memory_bank(jax.random.key(0), row.bank, row.dim),) if row.bank else ()
        return fn, (a["x0"], a["x1"]), rest, bool(row.bank)
    if spec.kind == "tico":
        return fn, (a["x0"], a["x1"]), (S.init_tico_state(row.dim),), True
    if spec.kind == "single":
        return fn, (a["x0"],), (), False
    if spec.kind in ("views", "proj"):
        if spec.kind == "proj":
            return (lambda views, key: fn(views, key)), (a["views"],), (key,), False
        return (lambda views: fn(list(views))), (a["views"],), (), False
    if spec.kind == "mmcr":
        return fn, (a["online"], a["momentum"]), (), False
    if spec.kind == "wmse":
        loss = lambda x0, x1, state, key: fn([x0, x1], state, key, **shape_kwargs(row))
        return loss, (a["x0"], a["x1"]), (S.init_wmse_state(row.dim), key), True
    if spec.kind == "jepa":
        loss = lambda glob, local, key: fn(local, glob, key)
        return loss, (a["global"], a["local"]), (key,), False
    if spec.kind == "tokens":
        loss = fn if spec.student_first else (lambda st, te: fn(te, st))
        return loss, (a["student"],), (a["teacher"],), False
    if spec.kind == "ibotpp":
        loss = lambda student, teacher, state: fn(teacher, student, state)
        return loss, (a["student"],), (a["teacher"], S.init_ibot_state(row.dim)), True
    if spec.kind == "region":
        masks = a["masks"].astype(jnp.int32)
        return (lambda v, m: fn(v[0], v[1], m[0], m[1])), (a["views"],), (masks,), False
    if spec.kind == "dino":
        loss = lambda student, teacher, state: fn(teacher, student, state)
        return loss, (a["student"],), (a["teacher"], S.init_dino_state(row.dim)), True
    if spec.kind == "swav":
        if row.bank:
            return fn, (a["high"], a["low"]), (a["queue"],), False
        return fn, (a["high"], a["low"]), (), False
    if spec.kind == "msn":
        loss = lambda anchors, prototypes, targets: fn(anchors, targets, prototypes)
        return loss, (a["anchors"], a["prototypes"]), (a["targets"],), False
    raise ValueError(spec.kind)


def registry_spec(row: Row):
    from sslloss_jax import _registry

    return next(spec for spec in _registry.LOSSES if spec.name == row.loss and not spec.variant)


def registry_step(row: Row):
    """A registry loss at its example configuration, through its uniform ``apply``:
    gradients to ``grad_argnums`` (all float arrays by default), the state threaded."""
    import jax.numpy as jnp
    import numpy as np

    spec = registry_spec(row)
    ex = spec.example(np.random.default_rng(0), row.batch, row.dim)
    batch = [jnp.asarray(b) for b in ex.batch]
    grad = [i for i in (spec.grad_argnums or range(len(batch))) if i not in spec.raw_argnums]
    other = [i for i in range(len(batch)) if i not in grad]

    def fn(*args):
        full = [None] * len(batch)
        for i, x in zip(grad + other, args[:-1], strict=True):
            full[i] = x
        return spec.apply(tuple(full), args[-1])

    return fn, tuple(batch[i] for i in grad), (*(batch[i] for i in other), ex.state), True


# The operations a loss's best formulation cannot avoid, as a bare jitted program on the
# row's own arrays (its forward and backward matrix products, exp/log passes): the
# denominator of the roofline column. ``None``: the row is not matmul- or exp-dominated
# (elementwise, SVD, sorting, matching); the reason is printed instead.
FLOOR_NOTES = {
    None: "not matmul/exp-dominated",
    "gram_exp": "X·Xᵀ, exp, (·)·X over both views stacked",
    "gram_exp_views": "X·Xᵀ, exp, (·)·X per view",
    "cross_exp": "A·Bᵀ, exp, (·)·B and (·)ᵀ·A",
    "bank_exp": "Q·[K; bank]ᵀ, exp, (·)·[K; bank]",
    "gram": "two views' Gram (B<D) or cross-covariance (B≥D) forward and backward",
    "cov": "per view Z·Zᵀ·Z (B<D) or Z·(ZᵀZ) (B≥D)",
    "tico": "ZᵀZ and Z·C' (2 B·D² products)",
    "lse": "logsumexp of the student (+ its gradient), exp of the teacher",
    "proj_lse": "anchors·protosᵀ logsumexp forward and backward, exp of targets·protosᵀ",
    "slices": "projections X·A forward and backward, with one cos and one sin of every "
              "projection forward and backward (SIGReg, LeJEPA: the other knots follow by "
              "angle addition) or one int32 sort of every slice along its view's batch "
              "(VISReg: the bitonic network, in the loss's chunks of slices; the loss's exact "
              "argsort takes one such sort, a gather and a fix-up check)",
    "kernel": "per-image token kernels of both sides and the backward product",
}
REGISTRY_FLOORS = {
    "infonce_loss": "gram_exp", "fovi_simclr_loss": "gram_exp", "co2_regularizer": "gram_exp",
    "y_aware_infonce_loss": "gram_exp", "supcon_loss": "gram_exp", "uniformity_loss": "gram_exp",
    "mocov3_loss": "cross_exp", "clip_loss": "cross_exp", "siglip_loss": "cross_exp",
    "co2_memory_bank_regularizer": "bank_exp", "directclr_memory_bank_loss": "bank_exp",
    "ressl_loss": "bank_exp", "nnclr_loss": "bank_exp", "ibot_patch_loss": "lse",
    "idmm_loss": "lse", "vibcreg_loss": "cov",
}


def floor_kind(row: Row) -> str | None:
    return REGISTRY_FLOORS.get(row.loss) if row.registry else LOSSES[row.loss].floor


def floor_step(row: Row, diff: tuple, rest: tuple) -> Callable[[], object] | None:
    """The jitted floor program of the row (see FLOOR_NOTES), or None."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    kind = floor_kind(row)
    if kind is None:
        return None
    # the row's float inputs: what gets a gradient, and (registry rows) the other views
    views = [x for x in (*diff, *(rest[:-1] if row.registry else ()))
             if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
             and x.ndim >= 2]
    flat = [x.reshape(-1, x.shape[-1]) for x in views]
    if not row.registry and "loss_dim" in LOSSES[row.loss].kwargs:
        flat = [x[:, :LOSSES[row.loss].kwargs["loss_dim"]] for x in flat]

    def gram_exp(x):
        return jnp.exp(x @ x.T) @ x

    if kind == "gram_exp":
        fn, args = (lambda *xs: gram_exp(jnp.concatenate(xs))), flat
    elif kind == "gram_exp_views":
        fn, args = (lambda *xs: [gram_exp(x) for x in xs]), flat
    elif kind == "cross_exp":
        def fn(a, b):
            e = jnp.exp(a @ b.T)
            return e @ b, e.T @ a
        args = flat[:2]
    elif kind == "bank_exp":
        bank = next(x for x in rest if hasattr(x, "bank")).bank
        fn = lambda q, k, bank: (jnp.exp(q @ jnp.concatenate([k, bank]).T)
                                 @ jnp.concatenate([k, bank]))
        args = (*(x[:, : bank.shape[1]] for x in flat[:2]), bank)  # DirectCLR: loss_dim
    elif kind in ("gram", "cov"):
        def one(x):
            return (x @ x.T) @ x if x.shape[0] < x.shape[1] else x @ (x.T @ x)

        if kind == "gram" and len(flat) == 2:  # Barlow/VICReg: both views, both directions
            def fn(a, b):
                if a.shape[0] < a.shape[1]:
                    m = (a @ a.T) * (b @ b.T)
                    return m @ a, m @ b
                c = a.T @ b
                return b @ c.T, a @ c
        elif kind == "gram":  # KoLeo: one Gram matrix and its row maxima
            fn = lambda x: jnp.max(x @ x.T, axis=1)
        else:
            fn = lambda *xs: [one(x) for x in xs]
        args = flat
    elif kind == "tico":
        fn, args = (lambda a, c: a @ (c + a.T @ a)), (flat[0], rest[0].covariance)
    elif kind == "lse":
        students = diff  # SwaV: the high- and low-resolution crops
        teacher = [x for x in rest if isinstance(x, jax.Array)
                   and jnp.issubdtype(x.dtype, jnp.floating)]
        if not teacher and row.loss == "swav":  # the high-resolution crops' codes
            teacher = [students[0]]
        lse_grad = jax.grad(lambda s: jax.nn.logsumexp(s, axis=-1).sum())
        ns = len(students)
        fn, args = (lambda *a: ([lse_grad(s) for s in a[:ns]],
                                [jnp.exp(x).sum() for x in a[ns:]])), (*students, *teacher)
    elif kind == "proj_lse":
        anchors, protos = diff
        targets = rest[0]
        g = jax.grad(lambda a, p: jax.nn.logsumexp(a @ p.T, axis=-1).sum(), argnums=(0, 1))
        fn, args = (lambda a, p, t: (g(a, p), jnp.exp(t @ p.T).sum())), (anchors, protos,
                                                                         targets)
    elif kind == "slices":
        x = jnp.concatenate([v.reshape(-1, v.shape[-1]) for v in diff])
        visreg = LOSSES[row.loss].ours == "visreg_loss"
        s = 4096 if visreg else 1024
        a = jax.random.normal(jax.random.key(1), (x.shape[-1], s), x.dtype)
        if visreg:  # the shape term sorts every slice's projections along its view's batch
            from sslloss_jax._numerics import _bitonic_sort

            def chunk(x, a_c):  # one integer sort (the bitonic network) feeding the backward
                p, vjp = jax.vjp(lambda x: jnp.einsum("vnd,ds->vns", x, a_c), x)
                keys = _bitonic_sort(lax.bitcast_convert_type(p, jnp.int32), 1)
                return vjp(keys.astype(p.dtype))[0]

            def g(x, a):  # in the loss's chunks of slices
                from sslloss_jax._slicing import split_slices

                x = x.reshape(-1, row.batch, x.shape[-1])
                chunks, rest = split_slices(a, x.shape[0], row.batch, x.dtype)
                parts = [] if chunks is None else [lax.map(lambda a_c: chunk(x, a_c),
                                                           chunks).sum(0)]
                return sum(parts + ([] if rest is None else [chunk(x, rest)]))
        else:  # the other knots' cos/sin follow by angle addition (multiply-adds)
            g = jax.grad(lambda x, a: jnp.sum(jnp.cos(x @ a)) + jnp.sum(jnp.sin(x @ a)))
        fn, args = g, (x, a)
    elif kind == "kernel":
        def fn(s, t):
            ks, kt = s @ jnp.swapaxes(s, -1, -2), t @ jnp.swapaxes(t, -1, -2)
            return (ks * kt) @ s
        args = (diff[0], rest[0])
    else:
        raise ValueError(kind)
    compiled = jax.jit(fn).lower(*args).compile()
    call = lambda: jax.block_until_ready(compiled(*args))
    call.cost = xla_cost(compiled)  # type: ignore[attr-defined]
    return call


def xla_cost(compiled) -> dict:
    """XLA's static cost estimate of a compiled program (flops, transcendentals, bytes)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend/version provides it
        return {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    keys = ("flops", "transcendentals", "bytes accessed")
    return {k: float(cost[k]) for k in keys if cost and k in cost}


def count_retraces(fn, diff: tuple, rest: tuple, has_aux: bool, steps: int = 3) -> int:
    """Traces of a ``jax.jit`` train step over ``steps`` calls, minus the first one. The
    new state is fed back (where ``rest`` holds an input of the same pytree structure), as
    a training loop does, so a state whose dtype, weak type or shape drifts shows here."""
    import jax

    traces = 0

    def counted(*args):
        nonlocal traces
        traces += 1
        return fn(*args)

    step = jax.jit(jax.value_and_grad(counted, argnums=tuple(range(len(diff))),
                                      has_aux=has_aux))
    rest = list(rest)
    for _ in range(steps):
        out, _ = step(*diff, *rest)
        if has_aux and out[1] is not None:
            aux = out[1]
            where = [i for i, r in enumerate(rest)
                     if jax.tree.structure(r) == jax.tree.structure(aux)]
            if where:
                rest[where[0]] = aux
        jax.block_until_ready(out)
    return traces - 1


def build_ours(row: Row, arrays: dict, platform: str = "cpu"
               ) -> tuple[Callable[[], object], dict]:
    import jax

    del platform  # the worker's JAX_PLATFORMS (worker_env) makes it JAX's default device

    fn, diff, rest, has_aux = ours_step(row, arrays)
    args = (*diff, *rest)
    step = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(diff))), has_aux=has_aux))
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    info: dict = {"compile_ms": 1e3 * (time.perf_counter() - t0)}
    mem = compiled.memory_analysis()
    if mem is not None and getattr(mem, "temp_size_in_bytes", None) is not None:
        info["xla_temp_mib"] = mem.temp_size_in_bytes / 2**20
        # what the program allocates beyond its inputs: temporaries and (unaliased) outputs
        info["program_mib"] = (mem.temp_size_in_bytes + mem.output_size_in_bytes
                               - getattr(mem, "alias_size_in_bytes", 0)) / 2**20
    info["retraces"] = count_retraces(fn, diff, rest, has_aux)
    info["floor"] = floor_kind(row)
    info["cost"] = xla_cost(compiled)
    floor = floor_step(row, diff, rest)
    if floor is not None:
        info["floor_cost"] = floor.cost  # type: ignore[attr-defined]
    call = lambda: jax.block_until_ready(compiled(*args))
    return call, {**info, "floor_call": floor}


def import_lightly(threads: int, platform: str = "cpu") -> dict:
    import torch

    torch.set_num_threads(threads)
    if platform == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("--platform gpu, but torch.cuda.is_available() is False")
    if (ORACLE / "lightly_shim.py").is_file():  # lightly.loss needs a torchvision stub here
        sys.path.insert(0, str(ORACLE))
        import lightly_shim

        lightly_shim.import_lightly_loss()
    import lightly
    import lightly.loss.hypersphere_loss  # noqa: F401

    x = torch.ones(512, 512, device=torch_device(platform))  # start the OpenMP threads
    torch.tanh(x @ x).sum().item()  # (or CUDA's context) before measuring memory
    return {"torch": torch.__version__, "lightly": lightly.__version__,
            "torch_threads": torch.get_num_threads(),
            **({"device": torch.cuda.get_device_name()} if platform == "gpu" else {})}


def torch_device(platform: str):
    import torch

    return torch.device("cuda" if platform == "gpu" else "cpu")


def build_lightly(row: Row, arrays: dict, platform: str = "cpu"
                  ) -> tuple[Callable[[], object], dict]:
    """lightly's module called as its users do; ``.backward()`` into the inputs that get a
    gradient on our side. Stateful modules (DINO's center, TiCo's C) update on every call,
    as ours return their new state. On a GPU the module (its buffers: centers, memory
    banks) and the inputs live there and each step ends with a synchronize."""
    import operator

    import lightly.loss
    import torch

    torch.manual_seed(0)
    spec = LOSSES[row.loss]
    kwargs = dict(spec.kwargs)
    if row.bank and spec.kind == "pair":
        kwargs["memory_bank_size"] = (row.bank, row.dim)
    if spec.kind == "dino":
        kwargs = {"output_dim": row.dim, "warmup_teacher_temp": kwargs["teacher_temp"], **kwargs}
    if spec.kind == "ibotpp":
        kwargs["output_dim"] = row.dim
    kwargs.update(shape_kwargs(row))
    if spec.lightly.startswith("lejepa_loss."):
        import lightly.loss.lejepa_loss  # noqa: F401
    device = torch_device(platform)
    criterion = operator.attrgetter(spec.lightly)(lightly.loss)(**kwargs)
    if isinstance(criterion, torch.nn.Module):
        criterion = criterion.to(device)
    t = {k: torch.from_numpy(v.copy()).to(device) for k, v in arrays.items()}
    if spec.kind in ("pair", "tico", "mmcr"):
        a, b = ("online", "momentum") if spec.kind == "mmcr" else ("x0", "x1")
        leaves = [t[a], t[b]]
        call = lambda: criterion(t[a], t[b])
    elif spec.kind == "single":
        leaves = [t["x0"]]
        call = lambda: criterion(t["x0"])
    elif spec.kind == "wmse":  # sample-major: view i in rows i·B..(i+1)·B
        leaves = [t["x0"], t["x1"]]
        call = lambda: criterion(torch.cat([t["x0"], t["x1"]]))
    elif spec.kind in ("views", "proj"):
        leaves = [t["views"]]
        call = lambda: criterion(list(t["views"]) if spec.kind == "views" else t["views"])
    elif spec.kind == "jepa":
        leaves = [t["global"], t["local"]]
        call = lambda: criterion(local_proj=t["local"], global_proj=t["global"])
    elif spec.kind in ("tokens", "ibotpp"):
        leaves = [t["student"]]
        call = ((lambda: criterion(t["student"], t["teacher"])) if spec.student_first
                else (lambda: criterion(t["teacher"], t["student"])))
    elif spec.kind == "region":
        leaves = [t["views"]]
        call = lambda: criterion(t["views"][0], t["views"][1], t["masks"][0], t["masks"][1])
    elif spec.kind == "dino":
        leaves = [t["student"]]
        call = lambda: criterion(list(t["teacher"]), list(t["student"]), epoch=0)
    elif spec.kind == "swav":
        leaves = [t["high"], t["low"]]
        queue = list(t["queue"]) if "queue" in t else None
        call = lambda: criterion(list(t["high"]), list(t["low"]), queue)
    elif spec.kind == "msn":
        leaves = [t["anchors"], t["prototypes"]]
        call = lambda: criterion(t["anchors"], t["targets"], t["prototypes"])
    else:
        raise ValueError(spec.kind)
    for leaf in leaves:
        leaf.requires_grad_(True)

    def step():
        for leaf in leaves:  # as optimizer.zero_grad(set_to_none=True)
            leaf.grad = None
        call().sum().backward()  # SwaV returns shape (1,)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, {}


SIDES = {"ours": (import_ours, build_ours), "lightly": (import_lightly, build_lightly)}


def reset_peak_rss() -> bool:
    """Resets the peak RSS (VmHWM, and so ru_maxrss) to the current RSS; Linux only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mib_of(fn: Callable[[], T], side: str = "ours", platform: str = "cpu"
                ) -> tuple[T, float]:
    """``fn()`` and its peak memory increase (MiB) over the memory in use just before it:
    on the CPU the process's RSS; on a GPU the device memory of the side's allocator.

    torch's peak counter is reset first. JAX's (``peak_bytes_in_use``) cannot be: ours is
    the peak since the worker started, which includes the buffers of XLA's autotuning
    at compile time (about 130 MiB on an H100 for the smallest rows), so the table shows
    ours' ``program_mib`` (XLA's temporaries and outputs) on a GPU instead."""
    if platform == "cpu":
        reset_peak_rss()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        out = fn()
        return out, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    if side == "ours":
        import jax

        device = jax.local_devices()[0]
        before = device.memory_stats()["bytes_in_use"]
        out = fn()
        return out, (device.memory_stats()["peak_bytes_in_use"] - before) / 2**20
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - before) / 2**20


def time_calls(step: Callable[[], object], n: int) -> float:
    """Mean seconds per call of ``n`` back-to-back calls (one repetition)."""
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def warm_up_calls(call_s: float, seconds: float) -> int:
    """How many untimed calls of ``call_s`` seconds each fill about ``seconds`` (0 for a
    call longer).

    Each repetition starts with that many calls, after the quiet gap and before the timed
    calls, so that each side is timed in the steady state of a training loop. After the
    other side's repetition and the gap, a runtime whose idle threads sleep rather than
    spin runs slower for a while (2-vCPU VM, 2026-12-05: ours TiCo b256 d256 took
    0.80-0.84 ms per call against 0.62-0.65 ms with 100-200 ms of warm-up calls, and about
    0.64 ms alone back to back; NT-Xent b256 1.7 against 1.1-1.2 ms; lightly's rows less
    so, but PaKa 7.4 against 6.2-6.6 ms; a single-threaded numpy loop shows no such
    effect). A call longer than ``seconds`` amortizes the wake-up by itself.
    """
    return int(seconds / call_s) if seconds > 0 else 0


def warm_allocator() -> None:
    """Frees one mapped 31 MiB block, so glibc's dynamic mmap threshold starts near its
    32 MiB maximum, as in a training process that has long held and freed large arrays.

    glibc maps every block above the threshold (128 KiB at start) afresh, so each of its
    pages faults and is zeroed on every use, and raises the threshold only when such a
    block of up to 32 MiB is freed. In a fresh worker the first buffers of a few MiB would
    thus be mapped per call for a while (about 0.2 ms per MiB here), on both sides alike.
    Both workers run this before anything else.
    """
    import numpy as np

    block = np.ones((31 << 20) // 8)
    del block


def worker(side: str, config: dict) -> None:
    warm_allocator()
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # protocol channel; stray prints -> stderr
    os.dup2(2, 1)

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    platform = config["platform"]
    cpus = sorted(os.sched_getaffinity(0))
    if platform == "cpu" and len(cpus) > config["threads"]:  # same cores for XLA and torch
        os.sched_setaffinity(0, cpus[: config["threads"]])
    sys.path.insert(0, str(REPO))
    import_side, build = SIDES[side]
    try:
        versions = import_side(config["threads"], platform)
    except Exception as err:  # reported to the parent
        send({"error": f"{type(err).__name__}: {err}", "stage": "import"})
        return
    try:
        row = Row(**{**config["row"], "crops": tuple(config["row"]["crops"])})
        arrays = {} if row.registry else make_inputs(row)
        (step, extra), setup_mib = peak_mib_of(lambda: build(row, arrays, platform), side,
                                               platform)
        floor = extra.pop("floor_call", None)
        _, peak_mib = peak_mib_of(step, side, platform)  # first call after compilation
        info = {"versions": versions, **extra, "setup_peak_mib": setup_mib, "peak_mib": peak_mib}
        inner = lambda call_s: max(1, min(config["max_inner"],
                                          math.ceil(config["rep_s"] / call_s)))
        call_s = time_calls(step, 1)  # second call: sizes the repetitions and warm-ups
        info["inner"] = inner(call_s)
        info["warm_calls"] = warm_up_calls(call_s, config["warmup_s"])
        if floor is not None:
            floor()
            info["floor_inner"] = inner(time_calls(floor, 1))
    except Exception as err:  # reported to the parent
        send({"error": f"{type(err).__name__}: {err}", "stage": "setup"})
        return
    send(info)
    for _ in sys.stdin:  # one repetition of the loss, then one of its floor (same process)
        t0 = time.perf_counter()
        for _ in range(info["warm_calls"]):
            step()
        warm_s = time.perf_counter() - t0
        msg = {"s": time_calls(step, info["inner"])}
        if floor is not None:
            msg["floor_s"] = time_calls(floor, info["floor_inner"])
        send({**msg, "warm_s": warm_s})


# --------------------------------------------------------------------------------------------
# Parent side.


class WorkerError(RuntimeError):
    def __init__(self, message: str, stage: str = "run"):
        super().__init__(message)
        self.stage = stage


def worker_env(platform: str) -> dict[str, str]:
    """A worker's environment: this repo importable and JAX on ``platform``; on a GPU, JAX
    allocates as it goes instead of taking 75% of the device up front, which the lightly
    worker beside it needs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    env["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda"}[platform]
    if platform == "gpu":
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


class Worker:
    """A ``--_worker`` child process for one (side, row); ``rep()`` times one repetition.
    With ``wait=False`` the constructor only starts it: :meth:`wait_ready` then waits for
    its set-up (so several workers can set up at once)."""

    def __init__(self, python: str, side: str, config: dict, timeout: float = 600.0,
                 wait: bool = True):
        self.timeout = timeout
        self.log = tempfile.TemporaryFile(mode="w+")
        env = worker_env(config["platform"])
        try:
            self.proc = subprocess.Popen(
                [python, str(Path(__file__).resolve()), "--_worker", side, json.dumps(config)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                env=env)
        except OSError as err:
            self.log.close()
            raise WorkerError(str(err), "import") from err
        self.info: dict = {}
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Waits for the worker's set-up report (``info``); closes it if it failed."""
        try:
            self.info = self._recv()
        except WorkerError:
            self.close()
            raise

    def _recv(self) -> dict:
        """The worker's next message; a worker silent for ``timeout`` seconds is killed
        (a hung program must cost one row, not the run)."""
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            raise WorkerError(f"no answer within {self.timeout:g} s (killed)")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = self.log.read()[-2000:]
            raise WorkerError(f"worker exited with {self.proc.returncode}:\n{tail}")
        msg = json.loads(line)
        if "error" in msg:
            raise WorkerError(msg["error"], msg["stage"])
        return msg

    def rep(self) -> dict:
        """One repetition: ``{"s": seconds per call[, "floor_s": the floor's]}``."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self._recv()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.log):
            stream.close()


def median_time(reps: dict[str, Callable[[], dict]], *, budget_s: float, min_reps: int,
                max_reps: int, gap_s: float = 0.0) -> dict[str, dict]:
    """Calls the ``reps`` round-robin (A B A B ...) and returns each one's median, min and
    samples (and those of its floor program, where it reports one).

    Every repetition starts after ``gap_s`` seconds of quiet, so the other side's runtime
    threads have gone idle: torch's OpenMP workers spin-wait after each parallel region,
    and back to back they took CPU from the next repetition (SwaV with its queue: ours
    87 ms right after lightly's repetitions, 34 ms alone or after a 50 ms gap). The
    worker then makes its untimed warm-up calls (:func:`warm_up_calls`) before the timed
    ones.

    Stops after ``max_reps`` rounds, or after ``min_reps`` rounds once some side has spent
    ``budget_s`` seconds in timed calls. Each rep returns ``{"s": seconds per call,
    "floor_s"?: ..., "warm_s"?: seconds of its untimed warm-up calls}``.
    """
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in reps}
    spent = dict.fromkeys(reps, 0.0)
    for n in range(1, max_reps + 1 if reps else 1):
        for key, rep in reps.items():
            time.sleep(gap_s)
            t0 = time.perf_counter()
            got = rep()
            spent[key] += time.perf_counter() - t0 - got.pop("warm_s", 0.0)
            for what, sec in got.items():
                samples[key].setdefault(what, []).append(sec)
        if n >= min_reps and max(spent.values()) >= budget_s:
            break
    out: dict[str, dict] = {}
    for key, by in samples.items():
        res = out[key] = {}
        for what, prefix in (("s", ""), ("floor_s", "floor_")):
            if what in by:
                res.update({f"{prefix}median_ms": 1e3 * statistics.median(by[what]),
                            f"{prefix}min_ms": 1e3 * min(by[what]),
                            f"{prefix}samples_ms": [1e3 * v for v in by[what]]})
    return out


def bench_row(row: Row, pythons: dict[str, str], args) -> dict[str, dict]:
    """Measures one row on every side in ``pythons``; drops a side whose import fails."""
    config = {"row": dataclasses.asdict(row), "threads": args.threads,
              "rep_s": args.rep_ms / 1e3, "max_inner": args.max_inner,
              "warmup_s": args.warmup_ms / 1e3, "platform": args.platform}
    workers: dict[str, Worker] = {}
    results: dict[str, dict] = {}

    def failed(side: str, err: WorkerError) -> None:
        if err.stage == "import":
            print(f"{side} not found ({pythons.pop(side)}): {err}", file=sys.stderr)
        else:
            results[side] = {"error": str(err)}
            print(f"{row.name}: {side} failed: {err}", file=sys.stderr)

    # On the CPU one worker sets up at a time (its compile time is measured on idle cores);
    # on a GPU both at once, as the host has cores to spare.
    at_once = args.platform != "cpu"
    try:
        for side, python in list(pythons.items()):
            if side == "lightly" and row.registry:
                continue  # registry rows have no lightly twin
            try:
                workers[side] = Worker(python, side, config, args.timeout, wait=not at_once)
            except WorkerError as err:
                failed(side, err)
        for side, w in list(workers.items()) if at_once else ():
            try:
                w.wait_ready()
            except WorkerError as err:
                del workers[side]
                failed(side, err)
        try:
            timed = median_time({s: w.rep for s, w in workers.items()}, budget_s=args.budget,
                                min_reps=args.min_reps, max_reps=args.max_reps,
                                gap_s=args.gap_ms / 1e3)
        except WorkerError as err:  # a worker died or hung mid-row: the row has no timing
            print(f"{row.name}: failed while timing: {err}", file=sys.stderr)
            return {**results, **{side: {"error": f"while timing: {err}"}
                                  for side in workers}}
        for side, w in workers.items():
            results[side] = {**w.info, **timed[side]}
    finally:
        for w in workers.values():
            w.close()
    return results


def ratio(res: dict) -> float | None:
    ours, theirs = res.get("ours", {}), res.get("lightly", {})
    if "median_ms" in ours and "median_ms" in theirs:
        return ours["median_ms"] / theirs["median_ms"]
    return None


def check_targets(results: list[dict]) -> list[dict]:
    ratios = {r["name"]: r["ratio"] for r in results if r["ratio"] is not None}
    if not ratios:
        return []
    vals = list(ratios.values())
    geo = math.exp(statistics.fmean(math.log(v) for v in vals))
    worst = max(ratios, key=ratios.get)
    targets = [
        {"target": f"geometric mean ratio <= {GEOMEAN_TARGET}", "value": geo,
         "pass": geo <= GEOMEAN_TARGET},
        {"target": f"max ratio <= {MAX_RATIO_TARGET} ({worst})", "value": ratios[worst],
         "pass": ratios[worst] <= MAX_RATIO_TARGET},
    ]
    for name in BIG_D_ROWS:
        if name in ratios:
            speedup = 1 / ratios[name]
            targets.append({"target": f"{name} >= {BIG_D_SPEEDUP:g}x faster", "value": speedup,
                            "pass": speedup >= BIG_D_SPEEDUP})
    return targets


def roofline(res: dict) -> float | None:
    ours = res.get("ours", {})
    if "median_ms" in ours and "floor_median_ms" in ours:
        return ours["median_ms"] / ours["floor_median_ms"]
    return None


def check_quality(results: list[dict]) -> list[dict]:
    """Targets that need no lightly: zero retraces, and the roofline on the floor rows."""
    out = []
    traced = [r for r in results if "retraces" in r["sides"].get("ours", {})]
    if traced:
        bad = [r["name"] for r in traced if r["sides"]["ours"]["retraces"] != 0]
        out.append({"target": "0 retraces over repeated steps on every row"
                    + (f" (fails: {', '.join(bad)})" if bad else ""),
                    "value": float(len(bad)), "pass": not bad})
    roofs = {r["name"]: r["roofline"] for r in results if r.get("roofline") is not None}
    if roofs:
        over = sorted((n for n, v in roofs.items() if v > ROOFLINE_TARGET), key=roofs.get)
        out.append({"target": f"roofline <= {ROOFLINE_TARGET} on the {len(roofs)} rows with a "
                    f"floor ({len(over)} above: {', '.join(over) or 'none'})",
                    "value": max(roofs.values()), "pass": not over})
    return out


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


HEAD = ("row", "ours ms", "min ms", "compile ms", "retraces", "lightly ms", "ours/lightly",
        "floor ms", "roofline", "ours MiB", "XLA temp MiB", "lightly MiB", "others CPU")


def table_rows(results: list[dict], gpu: bool = False) -> list[tuple[str, ...]]:
    """The table's cells; on a GPU run ours' memory is XLA's (see :func:`peak_mib_of`)."""
    rows = []
    for r in results:
        o, t = r["sides"].get("ours", {}), r["sides"].get("lightly", {})
        rows.append((r["name"], fmt(o.get("median_ms"), ".3f"), fmt(o.get("min_ms"), ".3f"),
                     fmt(o.get("compile_ms"), ".0f"), fmt(o.get("retraces"), "d"),
                     fmt(t.get("median_ms"), ".3f"), fmt(r["ratio"], ".3f"),
                     fmt(o.get("floor_median_ms"), ".3f"), fmt(r.get("roofline"), ".2f"),
                     fmt(o.get("program_mib" if gpu else "peak_mib"), ".1f"),
                     fmt(o.get("xla_temp_mib"), ".1f"),
                     fmt(t.get("peak_mib"), ".1f"), fmt(100 * r["others_cpu"], ".0f") + "%"))
    return rows


def on_gpu(meta: dict) -> bool:
    """Whether the run (its ``--json`` meta) ran on a GPU; runs before the option: CPU."""
    return meta["settings"].get("platform", "cpu") == "gpu"


def machine(meta: dict) -> str:
    """Where the run ran: the CPU, and on a GPU run the GPU (memory columns are its)."""
    cpu = f"{meta['cpu']['model']} ({meta['cpu']['cores']} cores)"
    if not on_gpu(meta):
        return cpu
    return (f"GPU {meta['ours'].get('device') or meta['lightly'].get('device', '?')} "
            "(memory: ours XLA's temporaries and outputs, lightly torch's peak above the "
            f"inputs), host {cpu}")


def merged_note(meta: dict) -> str:
    n = meta.get("merged_runs")
    return (f"; each row from the one of {n} full runs with the row's median ratio "
            "(`--merge`)") if n else ""


def markdown(results: list[dict], meta: dict, targets: list[dict]) -> str:
    """The report as a markdown table (what the README quotes), then the floors and targets."""
    lines = [f"sslloss_jax benchmark, {meta['date']}: forward+backward, float32, "
             f"{machine(meta)}, {meta['settings']['threads']} threads per side; "
             + ", ".join(f"{k} {v}" for k, v in {**meta["ours"], **meta["lightly"]}.items())
             + merged_note(meta),
             "", "| " + " | ".join(HEAD) + " |", "|---" + "|---:" * (len(HEAD) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results, on_gpu(meta))]
    lines += ["", "Floors (the roofline column's denominator, timed in the same worker):", ""]
    kinds = {r["sides"].get("ours", {}).get("floor", "?") for r in results if "ours" in r["sides"]}
    lines += [f"- `{k}`: {FLOOR_NOTES.get(k, '?')}" for k in sorted(kinds, key=str)]
    lines += ["", *(f"- {'PASS' if t['pass'] else 'FAIL'} {t['target']}: {t['value']:.3f}"
                    for t in targets)]
    misses = roofline_misses(results)
    if misses:
        lines += ["", f"Rows above the roofline target {ROOFLINE_TARGET}, with XLA's static cost "
                  "of ours relative to the floor (flops, transcendentals, bytes accessed):", ""]
        lines += [f"- {m}" for m in misses]
    return "\n".join(lines) + "\n"


def roofline_misses(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        if r.get("roofline") is None or r["roofline"] <= ROOFLINE_TARGET:
            continue
        ours = r["sides"]["ours"]
        cost, floor = ours.get("cost", {}), ours.get("floor_cost", {})
        parts = [f"{k} ×{cost[k] / floor[k]:.2f}" for k in ("flops", "transcendentals",
                                                              "bytes accessed")
                 if cost.get(k) and floor.get(k)]
        out.append(f"{r['name']}: roofline {r['roofline']:.2f}; "
                   f"{', '.join(parts) or 'no cost estimate'}")
    return out


def plot(results: list[dict], path: Path) -> None:
    """Two bar charts per row: ours/lightly time ratio and the roofline ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.25 * len(names) + 1.5), sharey=True)
    for ax, key, target, title in ((axes[0], "ratio", MAX_RATIO_TARGET, "ours / lightly time"),
                                   (axes[1], "roofline", ROOFLINE_TARGET,
                                    "ours / floor time (roofline)")):
        vals = [r.get(key) or 0.0 for r in results]
        ax.barh(range(len(names)), vals, color=["C3" if v > target else "C0" for v in vals])
        ax.axvline(target, color="k", lw=0.8, ls="--")
        ax.set(title=title, xscale="log" if key == "ratio" else "linear")
    axes[0].set_yticks(range(len(names)), names, fontsize=7)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: list[dict], meta: dict, targets: list[dict]) -> str:
    lines = [f"sslloss_jax benchmark {meta['date']}: forward+backward, float32, "
             f"{meta['settings'].get('platform', 'cpu').upper()}",
             f"{machine(meta)}, {meta['settings']['threads']} threads per side; "
             f"python {meta['python']}"
             + merged_note(meta),
             "ours: " + ", ".join(f"{k} {v}" for k, v in meta["ours"].items()),
             "lightly: " + (", ".join(f"{k} {v}" for k, v in meta["lightly"].items())
                            if meta["lightly"] else "not found (only our numbers)"), ""]
    table = [HEAD, *table_rows(results, on_gpu(meta))]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEAD))]
    for row in table:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    errors = [f"  {r['name']} {s}: {v['error']}" for r in results
              for s, v in r["sides"].items() if "error" in v]
    if errors:
        lines += ["", "errors:", *errors]
    busy = [r["name"] for r in results if r["others_cpu"] >= BUSY_WARNING]
    if busy:
        lines += ["", f"WARNING: other processes used >= {BUSY_WARNING:.0%} of the CPU during "
                  f"{', '.join(busy)}: those timings are unreliable (torch's most)"]
    misses = roofline_misses(results)
    if misses:
        lines += ["", "roofline misses (ours/floor in XLA's static cost):", *misses]
    lines.append("")
    if not targets:
        lines.append("targets: not checked (no row has both sides)")
    for t in targets:
        lines.append(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']:.3f}")
    return "\n".join(lines)


def cpu_seconds() -> tuple[float, float, float]:
    """(wall time, CPU seconds used machine-wide, CPU seconds of this process + its children).

    Machine-wide CPU is NaN where /proc/stat is missing. Children count once waited for.
    """
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # not idle/iowait
    except (OSError, ValueError):
        busy = math.nan
    own = sum(getattr(resource.getrusage(who), f) for f in ("ru_utime", "ru_stime")
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return time.perf_counter(), busy, own


def others_fraction(start: tuple[float, float, float]) -> float:
    """Fraction of the machine's CPU used by other processes since ``start``."""
    (t0, busy0, own0), (t1, busy1, own1) = start, cpu_seconds()
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / ((t1 - t0) * (os.cpu_count() or 1))


def wait_idle(max_s: float) -> None:
    """Waits (at most ``max_s`` seconds) until other processes use < BUSY_WARNING of the CPU."""
    deadline = time.perf_counter() + max_s
    while time.perf_counter() < deadline:
        start = cpu_seconds()
        time.sleep(1.0)
        if not others_fraction(start) >= BUSY_WARNING:  # also stops on NaN
            return


def cpu_info() -> dict:
    model = host.processor() or host.machine()
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return {"model": model, "cores": len(os.sched_getaffinity(0)),
            "platform": host.platform()}


def lightly_python(args) -> str | None:
    """The interpreter for the lightly side: --lightly-python, else this one if it has torch."""
    if args.no_lightly:
        return None
    if args.lightly_python:
        return args.lightly_python
    import importlib.util

    if importlib.util.find_spec("torch") and importlib.util.find_spec("lightly"):
        return sys.executable
    print("lightly not found: torch/lightly are not importable here and --lightly-python "
          f"was not given (e.g. {DEFAULT_ORACLE_PYTHON})", file=sys.stderr)
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", help="comma-separated substrings of row names to keep "
                   "(e.g. 'ntxent b256,barlow')")
    p.add_argument("--quick", action="store_true", help="small shapes, 1-2 reps (smoke test)")
    p.add_argument("--json", type=Path, help="write machine-readable results here")
    p.add_argument("--md", type=Path, help="write the table as markdown here")
    p.add_argument("--png", type=Path, help="plot the ratio and roofline columns here")
    p.add_argument("--lightly-python", help="interpreter with torch + lightly for the lightly "
                   "side (default: this one, if it can import them)")
    p.add_argument("--no-lightly", action="store_true", help="time only sslloss_jax")
    p.add_argument("--threads", type=int, default=2, help="cores/threads per side (default 2)")
    p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu",
                   help="where both sides run (default cpu); gpu: JAX on CUDA, lightly's "
                   "modules and inputs moved to CUDA, device memory instead of RSS")
    p.add_argument("--budget", type=float, default=3.0,
                   help="stop once a side spent this many seconds (default 3)")
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=30)
    p.add_argument("--rep-ms", type=float, default=50.0,
                   help="fast calls are batched into repetitions of about this long")
    p.add_argument("--max-inner", type=int, default=1000, help="max calls per repetition")
    p.add_argument("--gap-ms", type=float, default=50.0,
                   help="idle time before each repetition, so the other side's threads have "
                   "stopped spinning (default 50)")
    p.add_argument("--warmup-ms", type=float, default=100.0,
                   help="untimed calls of the same side for about this long after the gap and "
                   "before each repetition (steady state; default 100)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each row, wait up to S seconds for other processes to go idle")
    p.add_argument("--retry-busy", type=int, default=0, metavar="N",
                   help="measure a row again (up to N times) if the machine was busy during it")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a worker may stay silent before it is killed (default 600)")
    p.add_argument("--list", action="store_true", help="list the selected rows and exit")
    p.add_argument("--merge", nargs="+", metavar="RUN.json", help="measure nothing: merge "
                   "full runs (their --json files) into one table, each row from the run "
                   "with its median ratio, and report/write it as a run would")
    p.add_argument("--_worker", nargs=2, metavar=("SIDE", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.min_reps, args.max_reps, args.budget, args.rep_ms = 1, 2, 0.0, 0.0
        args.gap_ms = args.warmup_ms = 0.0
    return args


def merge_runs(runs: list[dict]) -> tuple[list[dict], dict]:
    """One result per row from several full runs (``--json`` files): the run whose
    ours/lightly ratio is the row's median (the upper one of an even count; rows without
    a lightly twin: by ours' median time), with that run's times and samples side by
    side, and every run's ratio and ours' time in ``runs``. On a machine whose neighbours
    slow it down in bursts (here 2–7× for seconds at a time, invisible to ``--wait-idle``),
    a median over runs taken minutes apart is what a single run's median is within a
    row. Rows in the first run's order; meta from the first run, with the dates merged."""
    by_name: dict[str, list[dict]] = {}
    for run in runs:
        for r in run["rows"]:
            by_name.setdefault(r["name"], []).append(r)

    def key(r: dict) -> float:
        if r.get("ratio") is not None:
            return r["ratio"]
        return r["sides"].get("ours", {}).get("median_ms", math.inf)

    merged = []
    for rs in by_name.values():
        pick = sorted(rs, key=key)[len(rs) // 2]
        merged.append({**pick, "runs": [{"ratio": r.get("ratio"), "ours_ms": r["sides"].get(
            "ours", {}).get("median_ms")} for r in rs]})
    meta = {k: v for k, v in runs[0].items() if k not in ("rows", "targets", "partial")}
    meta["date"] = " + ".join(run.get("date", "?") for run in runs)
    meta["merged_runs"] = len(runs)
    return merged, meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(REPO) not in sys.path:  # the rows come from this checkout's registry, installed
        sys.path.insert(0, str(REPO))  # or not (as the workers import it)
    if args._worker:
        worker(args._worker[0], json.loads(args._worker[1]))
        return 0
    if args.merge:
        results, meta = merge_runs([json.loads(Path(f).read_text()) for f in args.merge])
        return finish(results, meta, args)
    rows = quick_rows(all_rows()) if args.quick else all_rows()
    if args.rows:
        keys = [k.strip() for k in args.rows.split(",") if k.strip()]
        rows = [r for r in rows if any(k in r.name for k in keys)]
    if args.list or not rows:
        print("\n".join(r.name for r in rows) or "no row matches --rows")
        return 0 if rows else 2
    pythons = {"ours": sys.executable}
    if python := lightly_python(args):
        pythons["lightly"] = python
    results: list[dict] = []
    versions: dict[str, dict] = {}
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": host.python_version(), "cpu": cpu_info(),
            "ours": {}, "lightly": {},
            "settings": {k: getattr(args, k) for k in
                         ("platform", "threads", "budget", "min_reps", "max_reps", "rep_ms",
                          "gap_ms", "warmup_ms", "quick")}}
    bar = progress(rows)
    for i, row in enumerate(bar, 1):
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(row.name)
        t0 = time.perf_counter()
        for _ in range(1 + args.retry_busy):
            wait_idle(args.wait_idle)
            start = cpu_seconds()
            sides = bench_row(row, pythons, args)
            if not others_fraction(start) >= BUSY_WARNING:
                break
            print(f"{row.name}: machine busy during the row", file=sys.stderr)
        for side, res in sides.items():
            versions.setdefault(side, res.pop("versions", {}))
        meta.update(ours=versions.get("ours", {}), lightly=versions.get("lightly", {}))
        results.append({"name": row.name, **dataclasses.asdict(row), "ratio": ratio(sides),
                        "roofline": roofline(sides), "others_cpu": others_fraction(start),
                        "wall_s": time.perf_counter() - t0, "sides": sides})
        summary = ", ".join(f"{s} {v['median_ms']:.3f} ms" for s, v in sides.items()
                            if "median_ms" in v)
        if args.json:  # after every row, so an interrupted run keeps what it measured (and
            args.json.parent.mkdir(parents=True, exist_ok=True)  # --merge can report it)
            args.json.write_text(json.dumps({**meta, "partial": True, "rows": results},
                                            indent=1))
        line = f"[{i}/{len(rows)}] {row.name}: {summary}"
        if hasattr(bar, "write"):  # above the progress bar, on stderr with it
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)
    return finish(results, meta, args)


def finish(results: list[dict], meta: dict, args: argparse.Namespace) -> int:
    """Checks the targets, prints the report and writes the ``--json/--md/--png`` files."""
    targets = check_targets(results) + check_quality(results)
    print(report(results, meta, targets))
    for path, text in ((args.json, lambda: json.dumps(
            {**meta, "rows": results, "targets": targets}, indent=1)),
            (args.md, lambda: markdown(results, meta, targets))):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text())
    if args.png:
        try:
            plot(results, args.png)
        except ImportError as e:  # the oracle venv has no matplotlib: keep the other outputs
            print(f"no PNG ({e}); plot from an environment with matplotlib: "
                  f"`python benchmarks/run.py --merge {args.json or 'RUN.json'} --png "
                  f"{args.png}`", file=sys.stderr)
    return 0


def progress(rows: list[Row]):
    """A tqdm progress bar over the rows on stderr, or the plain list without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return rows
    return tqdm(rows, unit="row", file=sys.stderr, dynamic_ncols=True)


if __name__ == "__main__":
    sys.exit(main())
