# ruff: noqa: E501
"""Float64 golden fixtures for the lightly losses that draw random numbers in ``forward``:
SIGReg, LeJEPA, LeWM, VISReg, PatchKernelAlignment and DSE.

Run from the repository root with the oracle venv (see ../shared/oracle/README.md):

    PY=$HOME/.cache/sslloss-oracle/venv/bin/python
    $PY tests/golden/make_golden_random.py [--oracle-dir DIR] [--out-dir DIR]

Writes ``golden_random.npz`` and ``cases_random.json`` next to this file, in the record
format of ``make_golden.py`` (whose helpers it imports: ``add_case``, ``randn``, ...).
Every torch random draw made inside a call (``torch.randn`` slices, ``torch.rand`` token
scores, k-means++ ``torch.randint``/``torch.multinomial``) is recorded by wrapping the
torch function around the call and stored, so the JAX functions can be fed the same draws.
Deterministic: inputs from seeded ``np.random.RandomState``, each call preceded by
``torch.manual_seed``.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_golden as mg  # noqa: E402  (parses the same --oracle-dir/--out-dir arguments)
import numpy as np  # noqa: E402
import torch  # noqa: E402

L = mg.L
F64 = mg.F64
from lightly.loss.regularizer import DSERegularizer  # noqa: E402

SEED0 = 31000


@contextmanager
def recording(name: str, drawn: list):
    """Wraps ``torch.<name>`` so that every value it returns is appended to ``drawn``."""
    orig = getattr(torch, name)

    def wrapped(*a, **k):
        r = orig(*a, **k)
        drawn.append(r.detach().clone())
        return r

    setattr(torch, name, wrapped)
    try:
        yield
    finally:
        setattr(torch, name, orig)


def float64_buffers(sig) -> None:
    """Rebuilds SIGReg's t/phi/weights in float64 with lightly's own formulas (lightly
    builds them in float32 at construction, so ``.to(float64)`` keeps float32-rounded
    values; the JAX grid is exact in the compute dtype)."""
    knots = sig.t.numel()
    t_max = float(sig.t[-1])
    t = torch.linspace(0, t_max, knots, dtype=F64)
    dt = t_max / (knots - 1)
    w = torch.full((knots,), 2 * dt, dtype=F64)
    w[[0, -1]] = dt
    window = torch.exp(-t.square() / 2.0)
    sig.t, sig.phi, sig.weights = t, window, w * window


def gen_sigreg() -> None:
    configs = [  # (shape, knots, t_max, num_vectors)
        ((2, 6, 5), 17, 3.0, 32),
        ((7, 4), 9, 2.0, 16),
        ((3, 2, 5, 4), 17, 3.0, 8),
    ]
    for ci, (shape, knots, t_max, nv) in enumerate(configs):
        case = f"sigreg/lightly/shape{'x'.join(map(str, shape))}_k{knots}_t{t_max:g}_s{nv}"
        x = mg.randn(SEED0 + ci, shape)
        mod = L.SIGReg(knots=knots, t_max=t_max, num_vectors=nv).to(F64)
        f32 = {}
        with torch.no_grad():  # lightly's float32-built buffers, same draws (for the notes)
            torch.manual_seed(SEED0 + ci)
            f32["loss_float32_buffers"] = mod(mg.leaf(x, False))
        float64_buffers(mod)
        drawn: list = []

        def fn(proj, mod=mod, drawn=drawn, ci=ci, f32=f32):
            torch.manual_seed(SEED0 + ci)
            with recording("randn", drawn):
                loss = mod(proj)
            assert len(drawn) == 1
            return loss, {"slices": drawn[0], **f32}

        mg.add_case(case, "sigreg", "lightly",
                    f"SIGReg(knots={knots}, t_max={t_max}, num_vectors={nv}).to(float64)(proj)",
                    {"knots": knots, "t_max": t_max, "num_vectors": nv}, {"proj": x}, fn,
                    ["proj"],
                    notes="slices = the raw torch.randn(D, num_vectors) draw (normalized per column "
                          "inside). t/phi/weights rebuilt in float64 (lightly's are float32-rounded); "
                          "loss_float32_buffers = lightly as constructed, same draws.")


def gen_lejepa() -> None:
    configs = [(0.05, 64), (0.5, 16), (1.0, 8), (0.0, 8)]
    local, glob = mg.randn(22, (3, 6, 8)), mg.randn(23, (2, 6, 8))
    for ci, (lam, nv) in enumerate(configs):
        case = f"lejepa/lightly/l3_g2_n6_d8_lam{lam:g}_s{nv}"
        mod = L.LeJEPALoss(lambda_param=lam, sigreg_num_vectors=nv).to(F64)
        float64_buffers(mod.sigreg)
        drawn: list = []

        def fn(local_proj, global_proj, mod=mod, drawn=drawn, ci=ci):
            torch.manual_seed(SEED0 + 100 + ci)
            with recording("randn", drawn):
                loss = mod(local_proj=local_proj, global_proj=global_proj)
            inv = L.lejepa_loss.lejepa_invariance_loss(
                all_proj=torch.cat([global_proj, local_proj]), global_proj=global_proj)
            return loss, {"slices": drawn[0], "invariance": inv}

        mg.add_case(case, "lejepa", "lightly",
                    f"LeJEPALoss(lambda_param={lam}, sigreg_num_vectors={nv}).to(float64)"
                    "(local_proj=..., global_proj=...)",
                    {"lambda_param": lam, "sigreg_num_vectors": nv},
                    {"local_proj": local, "global_proj": glob}, fn, ["local_proj", "global_proj"],
                    notes="inputs: lightly.md §5 recipe (s22 local, s23 global); slices = raw "
                          "torch.randn(D, S); SIGReg buffers rebuilt in float64.")


def gen_lewm() -> None:
    configs = [(0.1, False, 32), (0.5, True, 16)]
    for ci, (lam, norm, nv) in enumerate(configs):
        case = f"lewm/lightly/b5_t4_d6_lam{lam:g}_norm{int(norm)}_s{nv}"
        emb = mg.randn(SEED0 + 200 + ci, (5, 4, 6))
        pred = emb[:, 1:] + 0.3 * mg.randn(SEED0 + 210 + ci, (5, 3, 6))
        mod = L.LeWMLoss(lambda_param=lam, normalize=norm, sigreg_num_vectors=nv).to(F64)
        float64_buffers(mod.sigreg)
        drawn: list = []

        def fn(predicted, target, embeddings, mod=mod, drawn=drawn, ci=ci):
            torch.manual_seed(SEED0 + 220 + ci)
            with recording("randn", drawn):
                loss = mod(predicted=predicted, target=target, embeddings=embeddings)
            return loss, {"slices": drawn[0]}

        mg.add_case(case, "lewm", "lightly",
                    f"LeWMLoss(lambda_param={lam}, normalize={norm}, sigreg_num_vectors={nv})"
                    ".to(float64)(predicted=..., target=..., embeddings=...)",
                    {"lambda_param": lam, "normalize": norm, "sigreg_num_vectors": nv},
                    {"predicted": pred, "target": emb[:, 1:].copy(), "embeddings": emb}, fn,
                    ["predicted", "target", "embeddings"],
                    notes="slices = raw torch.randn(D, S); target is detached in lightly (grad_target is "
                          "zero); embeddings is a separate leaf (SIGReg over the batch, per time step).")


@contextmanager
def float64_quantiles():
    """VISReg builds its Gaussian quantile positions with ``torch.arange(...,
    dtype=torch.float32)``; this makes that one call float64 (everything else unchanged),
    so the quantiles are float64 as the JAX ones."""
    orig = torch.arange

    def arange(*a, **k):
        if k.get("dtype") is torch.float32:
            k["dtype"] = torch.float64
        return orig(*a, **k)

    torch.arange = arange
    try:
        yield
    finally:
        torch.arange = orig


def gen_visreg() -> None:
    local, glob = mg.randn(22, (3, 6, 8)), mg.randn(23, (2, 6, 8))
    const = glob.copy()
    const[:, :, 2] = 0.7  # a zero-variance feature in every global view
    configs = [  # (name, local, global, lambda, slices, scale, shape, center, eps)
        ("default", local, glob, 0.9, 64, 1.0, 1.0, 1.0, 1e-4),
        ("weights", local, glob, 0.6, 16, 0.5, 2.0, 0.0, 1e-3),
        ("no_local", local[:0], glob, 0.9, 16, 1.0, 1.0, 1.0, 1e-4),
        ("zero_var_feature", local[:1], const, 0.9, 16, 1.0, 1.0, 1.0, 1e-4),
    ]
    for ci, (name, lp, gp, lam, ns, ls, lsh, lc, eps) in enumerate(configs):
        case = f"visreg/lightly/{name}_l{lp.shape[0]}_g{gp.shape[0]}_s{ns}"
        mod = L.VISRegLoss(lambda_param=lam, num_slices=ns, lambda_scale=ls, lambda_shape=lsh,
                           lambda_center=lc, eps=eps)
        drawn: list = []

        def fn(local_proj, global_proj, mod=mod, drawn=drawn, ci=ci):
            torch.manual_seed(SEED0 + 300 + ci)
            with torch.no_grad():
                f32q = mod.forward_components(local_proj=local_proj, global_proj=global_proj)
            torch.manual_seed(SEED0 + 300 + ci)
            with recording("randn", drawn), float64_quantiles():
                c = mod.forward_components(local_proj=local_proj, global_proj=global_proj)
            assert len(drawn) == 1
            return c.total, {"slices": drawn[0], "pred": c.pred, "scale": c.scale, "shape": c.shape,
                             "center": c.center, "loss_float32_quantiles": f32q.total}

        inputs = {"local_proj": lp, "global_proj": gp}
        mg.add_case(case, "visreg", "lightly",
                    f"VISRegLoss(lambda_param={lam}, num_slices={ns}, lambda_scale={ls}, "
                    f"lambda_shape={lsh}, lambda_center={lc}, eps={eps}).forward_components(...)",
                    {"lambda_param": lam, "num_slices": ns, "lambda_scale": ls,
                     "lambda_shape": lsh, "lambda_center": lc, "eps": eps},
                    inputs, fn, ["local_proj", "global_proj"],
                    notes="slices = raw torch.randn(D, num_slices); the quantile positions made "
                          "float64 (lightly: float32, then cast; loss_float32_quantiles is lightly "
                          "unpatched with the same draws). Outputs pred/scale/shape/center are the "
                          "unweighted components.", hard=name == "zero_var_feature")


@contextmanager
def no_float32_cast():
    """PatchKernelAlignmentLoss casts to float32 with ``Tensor.float()``; this makes that a
    no-op for float64 tensors, giving lightly's algorithm in float64."""
    orig = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == F64 else orig(self, *a, **k)
    try:
        yield
    finally:
        torch.Tensor.float = orig


def gen_paka() -> None:
    T3, S3 = mg.randn(7, (2, 5, 8)), mg.randn(8, (2, 5, 8))
    m2 = np.array([[True, False, True, False, False], [False, False, False, True, True]])
    big_s, big_t = mg.randn(SEED0 + 400, (3, 9, 4)), mg.randn(SEED0 + 401, (3, 9, 4))
    m3 = mg.randn(SEED0 + 402, (3, 9)) > 0.6
    m3[2, :8] = True  # one image with a single valid token (excluded)
    configs = [  # (name, student, teacher, mask, max_tokens)
        ("published", T3, S3, None, None),
        ("published_mask", T3, S3, m2, None),
        ("max_tokens", big_s, big_t, None, 5),
        ("max_tokens_mask", big_s, big_t, m3, 4),
        ("all_masked", T3, S3, np.ones((2, 5), bool), None),
    ]
    for ci, (name, st, te, mask, mt) in enumerate(configs):
        case = f"patch_kernel_alignment/lightly/{name}_b{st.shape[0]}_n{st.shape[1]}"
        mod = L.PatchKernelAlignmentLoss(max_tokens=mt)
        drawn: list = []
        tmask = None if mask is None else torch.tensor(mask)

        def fn(student_features, teacher_features, mod=mod, drawn=drawn, ci=ci, tmask=tmask):
            s32 = student_features.detach().clone().requires_grad_(True)
            torch.manual_seed(SEED0 + 500 + ci)
            l32 = mod(s32, teacher_features.detach(), tmask)
            (g32,) = torch.autograd.grad(l32, [s32], allow_unused=True)
            g32 = torch.zeros_like(s32) if g32 is None else g32
            torch.manual_seed(SEED0 + 500 + ci)
            with recording("rand", drawn), no_float32_cast():
                loss = mod(student_features, teacher_features, tmask)
            extras = {"lightly_loss": l32.double(), "lightly_grad_student_features": g32}
            if drawn:
                extras["scores"] = drawn[0]
            return loss, extras

        inputs = {"student_features": st, "teacher_features": te}
        if mask is not None:
            mg.ARRAYS[f"{case}/mask"] = mask.astype(np.float64)
        mg.add_case(case, "patch_kernel_alignment", "lightly",
                    f"PatchKernelAlignmentLoss(max_tokens={mt})(student, teacher, mask)",
                    {"max_tokens": mt}, inputs, fn, ["student_features", "teacher_features"],
                    notes="loss/grads: lightly's algorithm in float64 (Tensor.float() made a no-op); "
                          "lightly_loss/lightly_grad_student_features: lightly as is (float32 kernels). "
                          "scores = the torch.rand(B, N) draw of the subsampling; mask (0/1) in "
                          "static_keys when present.",
                    static_keys=["mask"] if mask is not None else [],
                    hard=name == "all_masked")


def gen_dse() -> None:
    configs = [  # (shape, kwargs)
        ((4, 8, 5), {}),
        ((10, 4, 3), {"local_clusters": 2, "global_clusters": 6, "weight": 0.5}),
        ((5, 6, 4), {"normalize": False, "local_clusters": 3, "global_clusters": 9,
                     "max_kmeans_iters": 3}),
    ]
    for ci, (shape, kw) in enumerate(configs):
        b, n, d = shape
        case = f"dse/lightly/b{b}_n{n}_d{d}_" + ("_".join(f"{k}{v}" for k, v in kw.items()) or "default")
        mod = DSERegularizer(**kw)
        x = mg.randn(SEED0 + 600 + ci, shape)
        runs: list = []
        orig_init = mod._kmeans_plus_plus_init

        def init(x_, k_, runs=runs, orig_init=orig_init):
            ints: list = []
            mult: list = []
            with recording("randint", ints), recording("multinomial", mult):
                c = orig_init(x_, k_)
            runs.append([int(ints[0])] + [int(m) for m in mult])
            return c

        def fn(representations, mod=mod, runs=runs, init=init, ci=ci):
            torch.manual_seed(SEED0 + 700 + ci)
            other: list = []
            mod._kmeans_plus_plus_init = init
            with recording("randint", other):
                loss = mod(representations)
            del mod._kmeans_plus_plus_init
            # every randint outside the seeding would be an empty-cluster re-seed
            assert len(other) == sum(1 for _ in runs), ("empty cluster re-seeded", len(other))
            return loss, {}

        mg.add_case(case, "dse", "lightly", f"DSERegularizer(**{kw})(representations)", kw,
                    {"representations": x}, fn, ["representations"],
                    notes="local_init (B, k_l) / global_init (G, k_g) = the k-means++ seeds lightly "
                          "drew (first randint, then the multinomial draws), in call order: one run "
                          "per image, then one per group; no empty cluster was re-seeded.")
        lc, gc = kw.get("local_clusters", 3), kw.get("global_clusters", 24)
        g = max(gc // lc, 1)
        n_groups = len(range(0, b, g))
        assert len(runs) == b + n_groups
        k_gmax = max(len(r) for r in runs[b:])
        glob = np.zeros((n_groups, k_gmax))
        for i, r in enumerate(runs[b:]):
            glob[i, :len(r)] = r
        mg.ARRAYS[f"{case}/local_init"] = np.asarray(runs[:b], np.float64)
        mg.ARRAYS[f"{case}/global_init"] = glob
        mg.CASES[-1]["static_keys"] = ["local_init", "global_init"]


def main() -> None:
    t0 = time.time()
    out_dir = Path(mg.ARGS.out_dir)
    gen_sigreg()
    gen_lejepa()
    gen_lewm()
    gen_visreg()
    gen_paka()
    gen_dse()
    names = [c["case"] for c in mg.CASES]
    assert len(names) == len(set(names))
    for c in mg.CASES:
        for k in c["inputs"] + [f"grad_{g}" for g in c["grads"]] + c["outputs"] + c.get("static_keys", []):
            a = mg.ARRAYS[f"{c['case']}/{k}"]
            assert np.all(np.isfinite(a)) and a.dtype == np.float64, (c["case"], k)
    np.savez_compressed(out_dir / "golden_random.npz", **mg.ARRAYS)
    (out_dir / "cases_random.json").write_text(json.dumps(mg.CASES, indent=1) + "\n")
    size = (out_dir / "golden_random.npz").stat().st_size + (out_dir / "cases_random.json").stat().st_size
    print(f"skipped: {mg.SKIPPED}")
    print(f"wrote {len(mg.CASES)} cases, {len(mg.ARRAYS)} arrays, {size / 1024:.1f} KiB "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
