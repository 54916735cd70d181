"""Generate float64 golden fixtures for sslloss_jax from the PyTorch originals.

Run from the repository root with the oracle venv (see ../shared/oracle/README.md):

    PY=$HOME/.cache/sslloss-oracle/venv/bin/python
    $PY tests/golden/make_golden.py [--oracle-dir DIR] [--out-dir DIR]

Writes ``golden.npz`` (keys ``"<case>/<name>"``) and ``cases.json`` (a list of case
records) next to this file. Deterministic: every input array comes from its own
seeded ``np.random.RandomState``; the only torch draw (the initial memory bank) is
preceded by ``torch.manual_seed``. The test suite reads only the two output files.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- setup


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--oracle-dir",
        default=str(Path(__file__).resolve().parents[3] / "shared" / "oracle"),
        help="directory holding lightly_shim.py (default: <repo>/../shared/oracle)",
    )
    p.add_argument("--out-dir", default=str(HERE), help="where golden.npz / cases.json go")
    return p.parse_args()


ARGS = parse_args()
sys.path.insert(0, ARGS.oracle_dir)

import lightly_shim  # noqa: E402
import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

L = lightly_shim.import_lightly_loss()
import nidl.losses as nidl_losses  # noqa: E402
from fovi.utils import losses as fovi_losses  # noqa: E402  (alias of fovi.training.utils.losses)
from lightly.loss import hypersphere_loss as lightly_hypersphere  # noqa: E402
from lightly.loss import vicreg_loss as lightly_vicreg  # noqa: E402

torch.set_default_dtype(torch.float64)
torch.set_num_threads(2)
F64 = torch.float64

# lightly's DCLW wraps its weights in torch.tensor(tensor) -> UserWarning; SymNegCos is deprecated.
warnings.filterwarnings("ignore", message="To copy construct from a tensor")
# fovi's BarlowTwins calls the non-autograd torch.distributed.all_reduce(c) in place; torch warns at backward and
# passes the gradient through unchanged (correct for world_size=1, checked against lightly's grads).
warnings.filterwarnings("ignore", message="c10d::allreduce_: an autograd kernel was not registered")

ARRAYS: dict[str, np.ndarray] = {}
CASES: list[dict] = []
SKIPPED: list[str] = []


def randn(seed: int, shape: Sequence[int]) -> np.ndarray:
    return np.random.RandomState(seed).standard_normal(tuple(shape)).astype(np.float64)


def leaf(a: np.ndarray, grad: bool = True) -> torch.Tensor:
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=F64, requires_grad=grad)


def to_np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy().astype(np.float64) if t.is_floating_point() else t.detach().cpu().numpy()
    return np.asarray(t, dtype=np.float64)


def all_finite(d: dict[str, np.ndarray]) -> bool:
    return all(np.all(np.isfinite(v)) for v in d.values() if np.issubdtype(np.asarray(v).dtype, np.floating))


def fmt_shape(inputs: dict[str, np.ndarray]) -> str:
    return " ".join(f"{k}{tuple(v.shape)}" for k, v in inputs.items())


def add_case(
    case: str,
    loss: str,
    source: str,
    torch_call: str,
    kwargs: dict,
    inputs: dict[str, np.ndarray],
    fn: Callable[..., object],
    grads: Sequence[str],
    notes: str = "",
    **extra,
) -> None:
    """Runs fn(**leaf tensors) -> loss or (loss, {extra_output_name: tensor}); stores everything."""
    tens = {k: leaf(v) for k, v in inputs.items()}
    res = fn(**tens)
    if isinstance(res, tuple):
        loss_t, extras = res
    else:
        loss_t, extras = res, {}
    assert loss_t.dtype == F64, (case, loss_t.dtype)
    assert loss_t.numel() == 1, (case, loss_t.shape)
    gvals = torch.autograd.grad(loss_t.reshape(()), [tens[g] for g in grads], allow_unused=True)
    data = {k: v for k, v in inputs.items()}
    zero_grads = []
    for g, gv in zip(grads, gvals):
        if gv is None:  # input entirely detached inside the loss
            gv = torch.zeros_like(tens[g])
            zero_grads.append(g)
        data[f"grad_{g}"] = to_np(gv)
    data["loss"] = to_np(loss_t.reshape(()))
    for k, v in extras.items():
        data[k] = to_np(v)
    if not all_finite(data):
        bad = [k for k, v in data.items() if not np.all(np.isfinite(v))]
        msg = f"{case}: torch produced non-finite values in {bad}; left out"
        SKIPPED.append(msg)
        print("SKIP  " + msg)
        return
    for k, v in data.items():
        ARRAYS[f"{case}/{k}"] = np.asarray(v)
    rec = {
        "case": case,
        "loss": loss,
        "source": source,
        "torch_call": torch_call,
        "kwargs": kwargs,
        "inputs": list(inputs.keys()),
        "grads": list(grads),
        "outputs": ["loss"] + list(extras.keys()),
        "notes": notes + (f" grad of {zero_grads} is None in torch (detached); stored as zeros." if zero_grads else ""),
    }
    rec.update(extra)
    CASES.append(rec)
    print(f"ok    {case:58s} loss={float(data['loss']):+.10g}  {fmt_shape(inputs)}")


def skip(case: str, why: str) -> None:
    SKIPPED.append(f"{case}: {why}")
    print(f"SKIP  {case}: {why}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- 1. NTXent


def gen_ntxent() -> None:
    seed = 1000
    for (B, D) in [(1, 3), (4, 8), (7, 16), (16, 5)]:
        a, b = randn(seed, (B, D)), randn(seed + 1, (B, D))
        seed += 2
        for tau in [0.5, 0.1, -0.3]:
            mod = L.NTXentLoss(temperature=tau).to(F64)
            add_case(
                f"ntxent/lightly/b{B}_d{D}_t{tau}",
                "ntxent",
                "lightly",
                f"NTXentLoss(temperature={tau})(out0, out1)",
                {"temperature": tau},
                {"out0": a, "out1": b},
                lambda out0, out1, mod=mod: mod(out0, out1),
                ["out0", "out1"],
                notes=("B=1: no negatives, logits are (2,1), loss is exactly 0 and grads are 0. " if B == 1 else "")
                + ("Negative temperature is accepted by lightly (only |t|<1e-8 raises). " if tau < 0 else ""),
            )
    # hard inputs
    B, D = 6, 5
    a = randn(1100, (B, D))
    b = 2.5 * a  # collinear positives: loss = log(1 + sum exp(...)) with pos logit 1/tau
    add_case(
        "ntxent/lightly/collinear_b6_d5_t0.5",
        "ntxent",
        "lightly",
        "NTXentLoss(temperature=0.5)(out0, out1) with out1 = 2.5*out0",
        {"temperature": 0.5},
        {"out0": a, "out1": b},
        lambda out0, out1: L.NTXentLoss(temperature=0.5).to(F64)(out0, out1),
        ["out0", "out1"],
        notes="hard: out1 is a positive multiple of out0 (positives have cosine 1).",
        hard=True,
    )
    a = randn(1101, (B, D))
    b = randn(1102, (B, D))
    a[2] = 0.0
    b[4] = 1e3 * b[4]
    add_case(
        "ntxent/lightly/zero_row_b6_d5_t0.5",
        "ntxent",
        "lightly",
        "NTXentLoss(temperature=0.5)(out0, out1) with out0[2]=0, out1[4]*=1e3",
        {"temperature": 0.5},
        {"out0": a, "out1": b},
        lambda out0, out1: L.NTXentLoss(temperature=0.5).to(F64)(out0, out1),
        ["out0", "out1"],
        notes="hard: out0[2] is all zeros (F.normalize -> x/max(||x||,1e-12) gives the zero vector; "
        "its gradient is upstream/1e-12, i.e. ~1e11-1e12: compare with rtol only) and out1[4] has norm ~1e3.",
        hard=True,
    )


# --------------------------------------------------------------------------- 2. NTXent + memory bank


def gen_ntxent_memory_bank() -> None:
    for ci, (n, B, D, tau) in enumerate([(8, 4, 5, 0.5), (12, 4, 8, 0.1), (10, 4, 6, 0.2)]):
        case = f"ntxent_memory_bank/lightly/n{n}_b{B}_d{D}_t{tau}"
        torch.manual_seed(2000 + ci)
        mod = L.NTXentLoss(temperature=tau, memory_bank_size=(n, D))
        bank_dtype_at_init = str(mod.memory_bank.bank.dtype)
        mod = mod.to(F64)
        mb = mod.memory_bank
        assert mb.bank.dtype == F64, mb.bank.dtype
        assert tuple(mb.bank.shape) == (n, D)
        data: dict[str, np.ndarray] = {
            "bank0": to_np(mb.bank.clone()),
            "ptr0": np.asarray(int(mb.bank_ptr[0]), dtype=np.int64),
        }
        first_overflow = None
        seed = 2100 + 100 * ci
        for k in range(1, 4):
            a, b = randn(seed, (B, D)), randn(seed + 1, (B, D))
            seed += 2
            ptr_before = int(mb.bank_ptr[0])
            if ptr_before + B > n and first_overflow is None:
                first_overflow = k
            t0, t1 = leaf(a), leaf(b)
            loss = mod(t0, t1)
            g0, g1 = torch.autograd.grad(loss, [t0, t1])
            data.update(
                {
                    f"step{k}_out0": a,
                    f"step{k}_out1": b,
                    f"step{k}_loss": to_np(loss),
                    f"step{k}_grad_out0": to_np(g0),
                    f"step{k}_grad_out1": to_np(g1),
                    f"step{k}_bank": to_np(mb.bank.clone()),
                    f"step{k}_ptr": np.asarray(int(mb.bank_ptr[0]), dtype=np.int64),
                }
            )
        assert all_finite(data)
        for key, v in data.items():
            ARRAYS[f"{case}/{key}"] = np.asarray(v)
        rec = {
            "case": case,
            "loss": "ntxent_memory_bank",
            "source": "lightly",
            "torch_call": f"NTXentLoss(temperature={tau}, memory_bank_size=({n}, {D})).to(torch.float64); 3 calls mod(out0, out1)",
            "kwargs": {"temperature": tau},
            "inputs": [],
            "grads": [],
            "outputs": [],
            "steps": 3,
            "bank_size": [n, D],
            "batch_size": B,
            "overflow_drops": first_overflow is not None,
            "first_overflow_step": first_overflow,
            "notes": (
                f"torch.manual_seed({2000 + ci}) then construct. Bank buffer is created float32 "
                f"(dtype at init: {bank_dtype_at_init}; randn drawn in float64 because of the default dtype, "
                "cast to float32, row-normalized in float32); .to(float64) converts it, so bank0 holds "
                "float32-representable values whose row norms are 1 only to ~1e-7. Step k: negatives = bank "
                "BEFORE step k (stored as step{k-1}_bank / bank0); logits = [<n0_i,n1_i>, n0_i . bank^T]/t, "
                "CE with target 0, mean over B rows (no in-batch negatives, one direction). Then normalized out1 "
                "is enqueued: if ptr+B >= n, bank[ptr:] = n1[:n-ptr] and ptr=0 (rest of batch dropped), else "
                "bank[ptr:ptr+B] = n1 and ptr += B."
            ),
        }
        CASES.append(rec)
        print(
            f"ok    {case:58s} losses="
            + ",".join(f"{float(data[f'step{k}_loss']):.8g}" for k in range(1, 4))
            + f" ptrs={[int(data[f'step{k}_ptr']) for k in range(1, 4)]} overflow_step={first_overflow}"
        )


# --------------------------------------------------------------------------- 3/4. DCL, DCLW

DCL_INPUTS: dict[tuple, dict[str, np.ndarray]] = {}


def dcl_inputs(B: int, D: int) -> dict[str, np.ndarray]:
    if (B, D) not in DCL_INPUTS:
        s = 3000 + 10 * B + D
        DCL_INPUTS[(B, D)] = {"out0": randn(s, (B, D)), "out1": randn(s + 500, (B, D))}
    return DCL_INPUTS[(B, D)]


def gen_dcl() -> None:
    for (B, D) in [(2, 4), (5, 8), (8, 3)]:
        inp = dcl_inputs(B, D)
        for tau in [0.1, 0.5]:
            mod = L.DCLLoss(temperature=tau).to(F64)
            add_case(
                f"dcl/lightly/b{B}_d{D}_t{tau}",
                "dcl",
                "lightly",
                f"DCLLoss(temperature={tau})(out0, out1)",
                {"temperature": tau},
                inp,
                lambda out0, out1, mod=mod: mod(out0, out1),
                ["out0", "out1"],
            )
            for sigma in [0.5, 1.0]:
                mod = L.DCLWLoss(temperature=tau, sigma=sigma).to(F64)
                add_case(
                    f"dclw/lightly/b{B}_d{D}_t{tau}_s{sigma}",
                    "dclw",
                    "lightly",
                    f"DCLWLoss(temperature={tau}, sigma={sigma})(out0, out1)",
                    {"temperature": tau, "sigma": sigma},
                    inp,
                    lambda out0, out1, mod=mod: mod(out0, out1),
                    ["out0", "out1"],
                    notes="weights w = 2 - B*softmax(<n0,n1>/sigma) from normalized DETACHED inputs (torch.tensor wrap).",
                )
    # nidl
    for (B, D, tau) in [(5, 8, 0.1), (8, 3, 0.5)]:
        inp = dcl_inputs(B, D)
        mod = nidl_losses.DCLLoss(temperature=tau).to(F64)
        add_case(
            f"dcl/nidl/b{B}_d{D}_t{tau}",
            "dcl",
            "nidl",
            f"nidl.losses.DCLLoss(temperature={tau})(z1=out0, z2=out1)",
            {"temperature": tau},
            inp,
            lambda out0, out1, mod=mod: mod(out0, out1),
            ["out0", "out1"],
            notes="Same inputs as dcl/lightly; the value should equal lightly's.",
        )
    for (B, D, tau, sigma) in [(5, 8, 0.1, 0.5), (8, 3, 0.5, 1.0)]:
        inp = dcl_inputs(B, D)
        mod = nidl_losses.DCLWLoss(sigma=sigma, temperature=tau).to(F64)
        add_case(
            f"dclw/nidl/b{B}_d{D}_t{tau}_s{sigma}",
            "dclw",
            "nidl",
            f"nidl.losses.DCLWLoss(sigma={sigma}, temperature={tau})(z1=out0, z2=out1)",
            {"temperature": tau, "sigma": sigma},
            inp,
            lambda out0, out1, mod=mod: mod(out0, out1),
            ["out0", "out1"],
            notes="nidl calls pos_weight_fn(z1, z2) with the RAW (unnormalized) inputs and does NOT detach: "
            "w = 2 - B*softmax(cosine_similarity(z1,z2,dim=1)/sigma) keeps its gradient, so these grads differ "
            "from lightly's (weights detached); the loss value equals lightly's.",
            weights_detached=False,
        )


# --------------------------------------------------------------------------- 5/6. Negative cosine


def gen_negcos() -> None:
    configs = [
        ("b4_d8_axis1", (4, 8), 1, None),
        ("b2x3x5_axis2", (2, 3, 5), 2, None),
        ("b2x3x5_axis1", (2, 3, 5), 1, None),
        ("zero_row_b4_d8_axis1", (4, 8), 1, "zero"),
    ]
    for ci, (name, shape, dim, hard) in enumerate(configs):
        x0, x1 = randn(4000 + 2 * ci, shape), randn(4001 + 2 * ci, shape)
        if hard == "zero":
            x0[1] = 0.0
        for eps in [1e-8, 1e-3]:
            mod = L.NegativeCosineSimilarity(dim=dim, eps=eps).to(F64)
            note = ""
            if hard == "zero":
                note = (
                    "hard: x0[1] is all zeros -> cos = 0 for that row; torch clamps EACH norm separately "
                    "(||x||.clamp_min(eps) in-place under no_grad), so grad x0[1] = -(1/N) * x1[1]/||x1[1]|| / eps "
                    "(~1e8 for eps=1e-8) and the norm-path gradient is 0 at a zero vector."
                )
            add_case(
                f"negative_cosine_similarity/lightly/{name}_eps{eps:g}",
                "negative_cosine_similarity",
                "lightly",
                f"NegativeCosineSimilarity(dim={dim}, eps={eps:g})(x0, x1)",
                {"axis": dim, "eps": eps},
                {"x0": x0, "x1": x1},
                lambda x0, x1, mod=mod: mod(x0, x1),
                ["x0", "x1"],
                notes=note,
                **({"hard": True} if hard else {}),
            )
    # tiny (non-zero) norm below eps: exposes torch's "clamp under no_grad" gradient
    x0, x1 = randn(4020, (4, 8)), randn(4021, (4, 8))
    x0[2] = x0[2] / np.linalg.norm(x0[2]) * 1e-4
    mod = L.NegativeCosineSimilarity(dim=1, eps=1e-3).to(F64)
    add_case(
        "negative_cosine_similarity/lightly/tiny_norm_row_b4_d8_axis1_eps0.001",
        "negative_cosine_similarity",
        "lightly",
        "NegativeCosineSimilarity(dim=1, eps=1e-3)(x0, x1) with ||x0[2]|| = 1e-4 < eps",
        {"axis": 1, "eps": 1e-3},
        {"x0": x0, "x1": x1},
        lambda x0, x1: mod(x0, x1),
        ["x0", "x1"],
        notes="hard/quirk: forward uses max(||x0[2]||, eps) = eps, but torch's clamp is an in-place op under "
        "no_grad on a clone of the norm, so the backward still differentiates through ||x0[2]|| (unclamped "
        "d||x||/dx = x/||x||) with the clamped value in the quotient rule: grad = y_hat/eps - (x.y_hat/eps^2) x/||x||, "
        "y_hat = x1/||x1||, times -1/N. A plain max(norm, eps) in JAX gives y_hat/eps only (forward matches, grad does not).",
        hard=True,
    )


def sym_neg_cos(z0, p0, z1, p1):
    # lightly.loss.sym_neg_cos_sim_loss.SymNegCosineSimilarityLoss is NOT in the installed lightly 1.6.0.
    # This is its forward verbatim (lightly commit 0ad74df, last version before removal):
    #   loss = neg_cos(p0, z1)/2 + neg_cos(p1, z0)/2,
    #   neg_cos(x, y) = -F.cosine_similarity(x, y.detach(), dim=-1).mean()
    def neg_cos(x, y):
        return -torch.nn.functional.cosine_similarity(x, y.detach(), dim=-1).mean()

    return neg_cos(p0, z1) / 2 + neg_cos(p1, z0) / 2


def gen_symnegcos() -> None:
    have = hasattr(L, "SymNegCosineSimilarityLoss")
    for ci, (B, D) in enumerate([(4, 8), (6, 3)]):
        inp = {n: randn(5000 + 10 * ci + j, (B, D)) for j, n in enumerate(["z0", "p0", "z1", "p1"])}
        if have:
            mod = L.SymNegCosineSimilarityLoss().to(F64)
            fn = lambda z0, p0, z1, p1, mod=mod: mod((z0, p0), (z1, p1))  # noqa: E731
            src, note = "lightly", ""
        else:
            fn = sym_neg_cos
            src = "lightly-legacy"
            note = (
                "SymNegCosineSimilarityLoss is absent from the installed lightly 1.6.0; the value is computed with "
                "its last upstream forward (commit 0ad74df) reproduced in make_golden.py: "
                "0.5*(-cos(p0, sg z1).mean()) + 0.5*(-cos(p1, sg z0).mean()), cosine over dim=-1, eps=1e-8."
            )
        add_case(
            f"sym_negative_cosine_similarity/{src}/b{B}_d{D}",
            "sym_negative_cosine_similarity",
            src,
            "SymNegCosineSimilarityLoss()((z0, p0), (z1, p1))",
            {},
            inp,
            fn,
            ["z0", "p0", "z1", "p1"],
            notes=note,
        )


# --------------------------------------------------------------------------- 7. Hypersphere


def gen_hypersphere() -> None:
    for (B, D) in [(2, 4), (5, 8), (9, 3)]:
        inp = {"z_a": randn(6000 + 10 * B + D, (B, D)), "z_b": randn(6500 + 10 * B + D, (B, D))}
        for (t, lam, alpha) in [(1.0, 1.0, 2.0), (2.0, 0.5, 2.0), (1.0, 1.0, 3.0)]:
            mod = lightly_hypersphere.HypersphereLoss(t=t, lam=lam, alpha=alpha).to(F64)
            add_case(
                f"hypersphere/lightly/b{B}_d{D}_t{t:g}_lam{lam:g}_a{alpha:g}",
                "hypersphere",
                "lightly",
                f"lightly.loss.hypersphere_loss.HypersphereLoss(t={t:g}, lam={lam:g}, alpha={alpha:g})(z_a, z_b)",
                {"t": t, "lam": lam, "alpha": alpha},
                inp,
                lambda z_a, z_b, mod=mod: mod(z_a, z_b),
                ["z_a", "z_b"],
            )


# --------------------------------------------------------------------------- 8/9/10. Barlow Twins

BT_INPUTS: dict[str, dict[str, np.ndarray]] = {}


def gen_barlow() -> None:
    for (B, D) in [(2, 4), (6, 8), (8, 64), (32, 8), (5, 3)]:
        BT_INPUTS[f"b{B}_d{D}"] = {"z_a": randn(7000 + 100 * B + D, (B, D)), "z_b": randn(7050 + 100 * B + D, (B, D))}
    za, zb = randn(7900, (6, 8)), randn(7901, (6, 8))
    za[:, 2] = 0.7
    zb[:, 5] = -1.3
    BT_INPUTS["const_col_b6_d8"] = {"z_a": za, "z_b": zb}

    for name, inp in BT_INPUTS.items():
        lams = [5e-3] if name.startswith("const") else [5e-3, 0.1]
        for lam in lams:
            mod = L.BarlowTwinsLoss(lambda_param=lam).to(F64)
            add_case(
                f"barlow_twins/lightly/{name}_l{lam:g}",
                "barlow_twins",
                "lightly",
                f"BarlowTwinsLoss(lambda_param={lam:g})(z_a, z_b)",
                {"lambda_param": lam},
                inp,
                lambda z_a, z_b, mod=mod: mod(z_a, z_b),
                ["z_a", "z_b"],
                notes=("hard: z_a[:,2] and z_b[:,5] are constant across the batch (batch_norm maps them to 0 "
                       "because of the +1e-5 in the variance). " if name.startswith("const") else ""),
                **({"hard": True} if name.startswith("const") else {}),
            )
    # nidl: Pearson correlation, unbiased std, no eps
    for name, inp in BT_INPUTS.items():
        lam = 5e-3
        mod = nidl_losses.BarlowTwinsLoss(lambd=lam).to(F64)
        add_case(
            f"barlow_twins/nidl/{name}_l{lam:g}",
            "barlow_twins",
            "nidl",
            f"nidl.losses.BarlowTwinsLoss(lambd={lam:g})(z1=z_a, z2=z_b)",
            {"lambda_param": lam, "normalize": "pearson"},
            inp,
            lambda z_a, z_b, mod=mod: mod(z_a, z_b),
            ["z_a", "z_b"],
            notes="nidl standardizes with (z - mean)/z.std(0) (unbiased, no eps) and c = z1n^T z2n/(N-1): c is the "
            "Pearson correlation matrix.",
        )


def gen_fovi_barlow() -> None:
    for name, lam in [("b6_d8", 5e-3), ("b32_d8", 5e-3), ("b8_d64", 0.1)]:
        raw = BT_INPUTS[name]
        B, D = raw["z_a"].shape
        bn = torch.nn.BatchNorm1d(D, affine=False).to(F64).train()
        z1, z2 = leaf(raw["z_a"]), leaf(raw["z_b"])
        # full fovi call (BN inside), for the record and to check equivalence with the leaf version
        full = fovi_losses.BarlowTwinsLoss(bn, batch_size=B, world_size=1, lambd=lam)(z1, z2)
        gfull = torch.autograd.grad(full, [z1, z2])
        with torch.no_grad():
            bn2 = torch.nn.BatchNorm1d(D, affine=False).to(F64).train()
            za_bn, zb_bn = to_np(bn2(leaf(raw["z_a"], False))), to_np(bn2(leaf(raw["z_b"], False)))
        mod = fovi_losses.BarlowTwinsLoss(torch.nn.Identity(), batch_size=B, world_size=1, lambd=lam)
        out_full = {"loss_raw": full.detach(), "grad_raw_z1": gfull[0], "grad_raw_z2": gfull[1]}

        def fn(z_a, z_b, mod=mod, out_full=out_full, raw=raw):
            return mod(z_a, z_b), {"raw_z1": torch.tensor(raw["z_a"]), "raw_z2": torch.tensor(raw["z_b"]), **out_full}

        add_case(
            f"barlow_twins/fovi/{name}_l{lam:g}",
            "barlow_twins",
            "fovi",
            f"fovi BarlowTwinsLoss(bn=Identity, batch_size={B}, world_size=1, lambd={lam:g})(z_a, z_b) "
            f"with z_a = BatchNorm1d({D}, affine=False, train)(raw_z1)",
            {"lambda_param": lam, "normalize": "none"},
            {"z_a": za_bn, "z_b": zb_bn},
            fn,
            ["z_a", "z_b"],
            notes="Inputs are the BN outputs (train-mode BatchNorm1d, affine=False, biased var, eps 1e-5); "
            "c = z_a^T z_b / (batch_size*world_size), then torch.distributed.all_reduce(c) (1-process gloo group). "
            "Extra outputs: raw_z1/raw_z2 (pre-BN inputs; identical to barlow_twins/lightly/" + name + " inputs), "
            "loss_raw and grad_raw_z1/grad_raw_z2 from the full call fovi BarlowTwinsLoss(BatchNorm1d, ...)(raw_z1, raw_z2).",
            bn_eps=1e-5,
        )


# --------------------------------------------------------------------------- 11/12. VICReg


def gen_vicreg() -> None:
    shapes = [(2, 4), (4, 8), (16, 32), (32, 8), (4, 3, 8), (6, 2, 5)]
    configs = [(25.0, 25.0, 1.0, 1e-4), (10.0, 5.0, 2.0, 1e-3)]
    for si, shape in enumerate(shapes):
        inp = {"z_a": randn(8000 + 2 * si, shape), "z_b": randn(8001 + 2 * si, shape)}
        sname = "x".join(map(str, shape))
        for (lam, mu, nu, eps) in configs:
            mod = L.VICRegLoss(lambda_param=lam, mu_param=mu, nu_param=nu, eps=eps).to(F64)

            def fn(z_a, z_b, mod=mod, eps=eps, lam=lam, mu=mu, nu=nu):
                loss = mod(z_a, z_b)
                inv = lightly_vicreg.invariance_loss(z_a, z_b)
                var = 0.5 * (lightly_vicreg.variance_loss(z_a, eps=eps) + lightly_vicreg.variance_loss(z_b, eps=eps))
                cov = lightly_vicreg.covariance_loss(z_a) + lightly_vicreg.covariance_loss(z_b)
                recomb = lam * inv + mu * var + nu * cov
                r, v = float(recomb.detach()), float(loss.detach())
                assert abs(r - v) <= 1e-12 * max(1.0, abs(v)), (r, v)
                return loss, {"invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}

            add_case(
                f"vicreg/lightly/{sname}_l{lam:g}_m{mu:g}_n{nu:g}_e{eps:g}",
                "vicreg",
                "lightly",
                f"VICRegLoss(lambda_param={lam:g}, mu_param={mu:g}, nu_param={nu:g}, eps={eps:g})(z_a, z_b)",
                {"lambda_param": lam, "mu_param": mu, "nu_param": nu, "eps": eps},
                inp,
                fn,
                ["z_a", "z_b"],
                notes="invariance/variance/covariance are UNWEIGHTED terms from lightly.loss.vicreg_loss."
                "{invariance_loss, variance_loss, covariance_loss}: invariance = mse_loss(z_a,z_b) (mean over all "
                "elements), variance = 0.5*(var_a+var_b), covariance = cov_a+cov_b; loss = l*inv + m*var + n*cov."
                + (" 3-D input: var over dim 0 then mean over the rest; cov per middle index, then mean." if len(shape) == 3 else ""),
            )


def gen_fovi_vicreg() -> None:
    for ci, ((B, D), (sim, std, cov)) in enumerate([((8, 6), (25.0, 25.0, 1.0)), ((16, 32), (10.0, 5.0, 2.0))]):
        inp = {"z_a": randn(9000 + 2 * ci, (B, D)), "z_b": randn(9001 + 2 * ci, (B, D))}
        mod = fovi_losses.VicRegLoss(sim_coeff=sim, std_coeff=std, cov_coeff=cov)

        def fn(z_a, z_b, mod=mod):
            loss, repr_loss, std_loss, cov_loss = mod(z_a, z_b, return_only_loss=False)
            return loss, {"repr_loss": repr_loss.detach(), "std_loss": std_loss.detach(), "cov_loss": cov_loss.detach()}

        add_case(
            f"vicreg/fovi/b{B}_d{D}_l{sim:g}_m{std:g}_n{cov:g}",
            "vicreg",
            "fovi",
            f"fovi VicRegLoss(sim_coeff={sim:g}, std_coeff={std:g}, cov_coeff={cov:g})(z_a, z_b, return_only_loss=False)",
            {"lambda_param": sim, "mu_param": std, "nu_param": cov, "eps": 1e-4},
            inp,
            fn,
            ["z_a", "z_b"],
            notes="fovi returns (loss, repr_loss, std_loss, cov_loss), all ALREADY WEIGHTED: repr_loss = sim_coeff*mse, "
            "std_loss = std_coeff*0.5*(mean relu(1-sqrt(var_a+1e-4)) + same for b), cov_loss = cov_coeff*(offdiag(cov_a)^2.sum()/D "
            "+ same for b); loss = repr_loss + std_loss + cov_loss. eps 1e-4 is hard-coded. Centering goes through "
            "GatherLayer (all_gather) on a 1-process gloo group.",
        )


def gen_fovi_simclr() -> None:
    """fovi SimCLRLoss with pairs_per_sample=1 is NT-Xent: its (num_sim, num_entropy) sum."""
    for ci, (B, D, tau) in enumerate([(6, 8, 0.5), (9, 4, 0.1)]):
        inp = {"out0": randn(9500 + 2 * ci, (B, D)), "out1": randn(9501 + 2 * ci, (B, D))}
        mod = fovi_losses.SimCLRLoss(B, 1, "cpu", tau, 1)

        def fn(out0, out1, mod=mod):
            num_sim, num_entropy = mod(out0, out1)
            return num_sim + num_entropy, {"num_sim": num_sim.detach(),
                                           "num_entropy": num_entropy.detach()}

        add_case(
            f"ntxent/fovi/b{B}_d{D}_t{tau:g}", "ntxent", "fovi",
            f"sum(fovi SimCLRLoss(batch_size={B}, world_size=1, gpu='cpu', temperature={tau:g}, "
            "pairs_per_sample=1)(z_i, z_j))",
            {"temperature": tau}, inp, fn, ["out0", "out1"],
            notes="fovi returns (mean -positive logit, mean logsumexp); their sum is NT-Xent.",
        )


# --------------------------------------------------------------------------- verification


def verify(out_dir: Path) -> None:
    z = np.load(out_dir / "golden.npz")
    cases = json.loads((out_dir / "cases.json").read_text())
    keys = set(z.files)
    used = set()
    names_seen = set()
    for c in cases:
        assert c["case"] not in names_seen, c["case"]
        names_seen.add(c["case"])
        need = [f"{c['case']}/{n}" for n in c["inputs"]]
        need += [f"{c['case']}/grad_{n}" for n in c["grads"]]
        need += [f"{c['case']}/{n}" for n in c["outputs"]]
        if "steps" in c:
            need += [f"{c['case']}/bank0", f"{c['case']}/ptr0"]
            for k in range(1, c["steps"] + 1):
                need += [f"{c['case']}/step{k}_{n}" for n in ("out0", "out1", "loss", "grad_out0", "grad_out1", "bank", "ptr")]
        for k in need:
            assert k in keys, f"missing {k}"
            a = z[k]
            assert np.all(np.isfinite(a)), f"non-finite {k}"
            if np.issubdtype(a.dtype, np.floating):
                assert a.dtype == np.float64, (k, a.dtype)
        used.update(need)
    for k in keys:
        assert np.all(np.isfinite(z[k])), k
        assert k.split("/")[0] + "/" + k.split("/")[1] + "/" + k.split("/")[2] in names_seen, k
    print(f"verify: {len(cases)} cases, {len(keys)} arrays ({len(keys - used)} extra, unreferenced by "
          "inputs/grads/outputs/steps), all present and finite")


def main() -> None:
    t0 = time.time()
    out_dir = Path(ARGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        gen_ntxent()
        gen_ntxent_memory_bank()
        gen_dcl()
        gen_negcos()
        gen_symnegcos()
        gen_hypersphere()
        gen_barlow()
        gen_fovi_barlow()
        gen_vicreg()
        gen_fovi_vicreg()
        gen_fovi_simclr()
    finally:
        tdist.destroy_process_group()
    np.savez_compressed(out_dir / "golden.npz", **ARRAYS)
    (out_dir / "cases.json").write_text(json.dumps(CASES, indent=1) + "\n")
    verify(out_dir)
    fams: dict[str, int] = {}
    for c in CASES:
        key = f"{c['loss']}/{c['source']}"
        fams[key] = fams.get(key, 0) + 1
    print("families:", ", ".join(f"{k}={v}" for k, v in fams.items()))
    print(f"skipped ({len(SKIPPED)}):")
    for s in SKIPPED:
        print("  " + s)
    size = (out_dir / "golden.npz").stat().st_size + (out_dir / "cases.json").stat().st_size
    print(f"wrote {len(CASES)} cases, {len(ARRAYS)} arrays, {size / 1024:.1f} KiB in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
