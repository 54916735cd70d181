"""Generate float64 golden fixtures for sslloss_jax from the PyTorch originals.

Run from the repository root with the oracle venv (see ../shared/oracle/README.md):

    PY=$HOME/.cache/sslloss-oracle/venv/bin/python
    $PY tests/golden/make_golden.py [--oracle-dir DIR] [--out-dir DIR]

Writes ``golden.npz`` (keys ``"<case>/<name>"``) and ``cases.json`` (a list of case
records) next to this file. Deterministic: every input array comes from its own
seeded ``np.random.RandomState``; the torch draws (initial memory banks, WMSE's
``torch.randperm``) are preceded by ``torch.manual_seed``. Multi-step records list their
per-step array names in ``step_keys`` and the others in ``static_keys``. The test suite reads only the two output files.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
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
    p.add_argument(
        "--no-preserve",
        action="store_true",
        help="write freshly computed arrays for every key (default: keys already in <out-dir>/golden.npz keep their "
        "committed bytes; torch's CPU kernels differ at the ULP level between machines)",
    )
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


# --------------------------------------------------------------------------- 13+. Stateful / clustering families
#
# Multi-step cases store every array as "<case>/step{k}_<name>" (k = 1..steps) plus step-independent arrays
# ("<case>/<name>", e.g. the initial state). The record lists the per-step names in "step_keys" and the
# step-independent ones in "static_keys"; verify() checks both.


@contextmanager
def default_dtype(dt: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def add_steps_case(
    case: str,
    loss: str,
    source: str,
    torch_call: str,
    kwargs: dict,
    data: dict[str, np.ndarray],
    steps: int,
    step_keys: Sequence[str],
    static_keys: Sequence[str],
    notes: str,
    **extra,
) -> None:
    need = [f"step{k}_{n}" for k in range(1, steps + 1) for n in step_keys] + list(static_keys)
    missing = [n for n in need if n not in data]
    assert not missing, (case, missing)
    unlisted = sorted(set(data) - set(need))
    assert not unlisted, (case, unlisted)
    if not all_finite(data):
        bad = [k for k, v in data.items() if not np.all(np.isfinite(v))]
        msg = f"{case}: torch produced non-finite values in {bad}; left out"
        SKIPPED.append(msg)
        print("SKIP  " + msg)
        return
    for key, v in data.items():
        a = np.asarray(v)
        if np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float64)
        ARRAYS[f"{case}/{key}"] = a
    rec = {
        "case": case,
        "loss": loss,
        "source": source,
        "torch_call": torch_call,
        "kwargs": kwargs,
        "inputs": [],
        "grads": [],
        "outputs": [],
        "steps": steps,
        "step_keys": list(step_keys),
        "static_keys": list(static_keys),
        "notes": notes,
    }
    rec.update(extra)
    CASES.append(rec)
    print(f"ok    {case:58s} losses=" + ",".join(f"{float(data[f'step{k}_loss']):.8g}" for k in range(1, steps + 1)))


def np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def close(a, b, rtol: float = 1e-12, atol: float = 1e-13) -> bool:
    return bool(np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol))


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------- 13. DINO


def dino_reference(T: np.ndarray, S: np.ndarray, c: np.ndarray, tt: float, ts: float) -> float:
    """T (Vt,B,K), S (Vs,B,K), c (K,): lightly's formula in numpy (used only as an assertion)."""
    p = np_softmax((T - c) / tt)
    q = np_log_softmax(S / ts)
    terms = -np.einsum("tbd,sbd->ts", p, q)
    np.fill_diagonal(terms, 0.0)
    n_terms = terms.size - min(terms.shape)
    return float(terms.sum() / (n_terms * T.shape[1]))


def gen_dino() -> None:
    sched = {"warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 3}
    epochs = [0, 1, 2, 5]
    configs = [((2, 3, 4, 8), 0.1, 0.9), ((2, 6, 3, 16), 0.1, 0.9), ((1, 2, 5, 6), 0.2, 0.8)]
    for ci, ((Vt, Vs, B, K), st, cm) in enumerate(configs):
        case = f"dino/lightly/vt{Vt}_vs{Vs}_b{B}_k{K}"
        # Built and called with torch's DEFAULT dtype float32 (what every lightly user has): the schedule is a
        # float32 linspace and torch.tensor(teacher_temp) is float32; inputs/center are float64.
        with default_dtype(torch.float32):
            mod = L.DINOLoss(output_dim=K, student_temp=st, center_momentum=cm, **sched)
        mod = mod.to(F64)
        assert mod.center.dtype == F64 and mod.teacher_temp_schedule.dtype == torch.float32
        data: dict[str, np.ndarray] = {
            "center0": to_np(mod.center.reshape(K)),
            "teacher_temp_schedule": to_np(mod.teacher_temp_schedule),
        }
        seed = 10000 + 100 * ci
        for k, e in enumerate(epochs, 1):
            T = [0.5 * randn(seed + v, (B, K)) for v in range(Vt)]
            S = [randn(seed + Vt + u, (B, K)) for u in range(Vs)]
            seed += Vt + Vs
            tt, ss = [leaf(t) for t in T], [leaf(s) for s in S]
            if e < mod.warmup_teacher_temp_epochs:
                used = float(mod.teacher_temp_schedule[e])
            else:
                used = float(np.float32(mod.teacher_temp))  # torch.tensor(0.07) under a float32 default
            c_before = to_np(mod.center.reshape(K)).copy()
            with default_dtype(torch.float32):
                loss = mod(tt, ss, epoch=e)
            gs = torch.autograd.grad(loss, ss)
            ref = dino_reference(np.stack(T), np.stack(S), c_before, used, st)
            assert abs(ref - float(loss.detach())) <= 1e-13 * abs(ref), (case, k, ref, float(loss.detach()))
            nominal = dino_reference(np.stack(T), np.stack(S), c_before, sched["teacher_temp"] if e >= 3 else
                                     float(np.linspace(0.04, 0.07, 3)[e]), st)
            c_ref = cm * c_before + (1 - cm) * np.stack(T).mean(axis=(0, 1))
            assert close(c_ref, to_np(mod.center.reshape(K)), 1e-14, 1e-15), case
            for v in range(Vt):
                data[f"step{k}_teacher{v}"] = T[v]
            for u in range(Vs):
                data[f"step{k}_student{u}"] = S[u]
                data[f"step{k}_grad_student{u}"] = to_np(gs[u])
            data[f"step{k}_loss"] = to_np(loss)
            data[f"step{k}_center"] = to_np(mod.center.reshape(K))
            data[f"step{k}_teacher_temp"] = np.asarray(used, dtype=np.float64)
            print(f"      step{k} epoch={e} teacher_temp={used!r} |loss(float32 temp) - loss(float64 temp)|="
                  f"{abs(nominal - float(loss.detach())):.2e}")
        step_keys = ([f"teacher{v}" for v in range(Vt)] + [f"student{u}" for u in range(Vs)] + ["loss"]
                     + [f"grad_student{u}" for u in range(Vs)] + ["center", "teacher_temp"])
        add_steps_case(
            case, "dino", "lightly",
            f"DINOLoss(output_dim={K}, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3, "
            f"student_temp={st}, center_momentum={cm}) built under torch default dtype float32, .to(float64); "
            f"4 calls mod([teacher0..], [student0..], epoch=e) for e in {epochs}",
            {"teacher_temp": 0.07, "student_temp": st, "center_momentum": cm, "output_dim": K, **sched},
            data, 4, step_keys, ["center0", "teacher_temp_schedule"],
            notes=(
                "Fresh inputs every step, center carried over. step{k}_teacher_temp is the EXACT temperature lightly "
                "used: epoch < warmup_teacher_temp_epochs -> teacher_temp_schedule[epoch] (a float32 "
                "torch.linspace(0.04, 0.07, 3) = [0.04, 0.055, 0.07] rounded to float32), else "
                "torch.tensor(0.07) (float32 under the default dtype). Loss = sum_{v!=u} -<softmax((T_v - c)/tt), "
                "log_softmax(S_u/ts)> / (n_terms*B), n_terms = Vt*Vs - min(Vt,Vs), c = center BEFORE the step "
                "(center0 / step{k-1}_center). After the loss: c <- m*c + (1-m)*mean_{views,batch}(raw teacher) "
                "(stored (K,), lightly shape (1,1,K)). lightly does NOT detach the teacher; only student grads "
                "are stored (the JAX loss stop-gradients the teacher)."
            ),
            epochs=epochs, n_teacher_views=Vt, n_student_views=Vs, batch_size=B,
        )
    # nidl: stacked (V, B, K) tensors; forward(teacher_out, student_out, epoch=None) -> uses self.teacher_temp
    Vt, Vs, B, K = 2, 4, 3, 8
    case = f"dino/nidl/vt{Vt}_vs{Vs}_b{B}_k{K}"
    with default_dtype(torch.float32):
        mod = nidl_losses.DINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                   warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9)
    mod = mod.to(F64)
    data = {"center0": to_np(mod.center.reshape(K))}
    seed = 10500
    for k in range(1, 3):
        T = 0.5 * randn(seed, (Vt, B, K))
        S = randn(seed + 1, (Vs, B, K))
        seed += 2
        tt, ss = leaf(T), leaf(S)
        c_before = to_np(mod.center.reshape(K)).copy()
        used = float(np.float32(0.07))
        with default_dtype(torch.float32):
            loss = mod(tt, ss)  # epoch=None
        (g,) = torch.autograd.grad(loss, [ss])
        ref = dino_reference(T, S, c_before, used, 0.1)
        assert abs(ref - float(loss.detach())) <= 1e-13 * abs(ref), (case, ref, float(loss.detach()))
        for v in range(Vt):
            data[f"step{k}_teacher{v}"] = T[v]
        for u in range(Vs):
            data[f"step{k}_student{u}"] = S[u]
            data[f"step{k}_grad_student{u}"] = to_np(g[u])
        data[f"step{k}_loss"] = to_np(loss)
        data[f"step{k}_center"] = to_np(mod.center.reshape(K))
        data[f"step{k}_teacher_temp"] = np.asarray(used, dtype=np.float64)
    step_keys = ([f"teacher{v}" for v in range(Vt)] + [f"student{u}" for u in range(Vs)] + ["loss"]
                 + [f"grad_student{u}" for u in range(Vs)] + ["center", "teacher_temp"])
    add_steps_case(
        case, "dino", "nidl",
        f"nidl.losses.DINOLoss(output_dim={K}, warmup_teacher_temp=0.04, teacher_temp=0.07, "
        "warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9) built under default float32, "
        ".to(float64); 2 calls mod(stack(teacher) (Vt,B,K), stack(student) (Vs,B,K)) with epoch=None",
        {"teacher_temp": 0.07, "student_temp": 0.1, "center_momentum": 0.9, "output_dim": K,
         "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 30},
        data, 2, step_keys, ["center0"],
        notes=(
            "nidl takes STACKED (V,B,K) tensors (stored per view with the same key names as dino/lightly: "
            "step{k}_teacher{v} = teacher[v]). With epoch=None nidl uses the FINAL teacher_temp (torch.tensor(0.07), "
            "float32 -> 0.07000000029802322), not the warm-up value. Same formula and center update as lightly "
            "(dist all_reduce/world_size of the batch center, world 1 here). Teacher not detached; student grads only."
        ),
        epochs=[None, None], n_teacher_views=Vt, n_student_views=Vs, batch_size=B, input_layout="stacked",
    )


# --------------------------------------------------------------------------- 14. iBOT / iBOT++


def ibot_reference(Td, Sd, maskf, c, tt, ts) -> float:
    ce = -(np_softmax((Td - c) / tt) * np_log_softmax(Sd / ts)).sum(-1)  # (B,N)
    n = np.maximum(maskf.sum(1), 1.0)
    return float(((ce * maskf).sum(1) / n).sum() / Td.shape[0])


def gen_ibot() -> None:
    # (B, H, W, K, teacher_temp, student_temp, center_momentum, mask rows (B, H*W) as 0/1 strings)
    configs = [
        (3, 2, 3, 8, 0.04, 0.1, 0.9, ["101001", "000000", "111011"]),
        (2, 4, 4, 16, 0.07, 0.2, 0.8, ["0110100110010110", "1111111111111111"]),
    ]
    for ci, (B, H, W, K, tt_, ts, cm, rows) in enumerate(configs):
        N = H * W
        case = f"ibot_patch/lightly/b{B}_h{H}_w{W}_k{K}"
        maskf = np.array([[float(ch) for ch in r] for r in rows], dtype=np.float64)
        mask_t = torch.tensor(maskf.reshape(B, H, W) > 0.5)
        M = int(maskf.sum())
        mod = L.IBOTPatchLoss(output_dim=K, teacher_temp=tt_, student_temp=ts, center_momentum=cm).to(F64)
        assert mod.center.value.dtype == F64
        used = tt_  # torch.tensor(tt_) under the script's float64 default: exact
        data: dict[str, np.ndarray] = {"center0": to_np(mod.center.value.reshape(K)), "mask": maskf}
        seed = 11000 + 100 * ci
        sel = maskf.reshape(-1) > 0.5
        for k in range(1, 3):
            Td = 0.5 * randn(seed, (B, N, K))
            Sd = randn(seed + 1, (B, N, K))
            seed += 2
            Tm, Sm = Td.reshape(B * N, K)[sel], Sd.reshape(B * N, K)[sel]
            assert Tm.shape == (M, K)
            tt, ss = leaf(Tm), leaf(Sm)
            c_before = to_np(mod.center.value.reshape(K)).copy()
            loss = mod(tt, ss, mask_t)
            (g,) = torch.autograd.grad(loss, [ss])
            ref = ibot_reference(Td, Sd, maskf, c_before, used, ts)
            assert abs(ref - float(loss.detach())) <= 1e-13 * abs(ref), (case, ref, float(loss.detach()))
            # what a float32-default user gets on the same float64 tensors (float32 temperature and 1/n_b weights)
            with default_dtype(torch.float32):
                m32 = L.IBOTPatchLoss(output_dim=K, teacher_temp=tt_, student_temp=ts, center_momentum=cm).to(F64)
                m32.center.center = torch.tensor(c_before, dtype=F64).reshape(1, K)
                l32 = float(m32(leaf(Tm, False), leaf(Sm, False), mask_t))
            print(f"      step{k}: a float32-default lightly gives a value {abs(l32 - ref) / abs(ref):.1e} rel. off")
            c_ref = cm * c_before + (1 - cm) * Tm.mean(0)
            assert close(c_ref, to_np(mod.center.value.reshape(K)), 1e-14, 1e-15), case
            gd = np.zeros((B * N, K))
            gd[sel] = to_np(g)
            data.update({
                f"step{k}_teacher_dense": Td, f"step{k}_student_dense": Sd,
                f"step{k}_teacher": Tm, f"step{k}_student": Sm,
                f"step{k}_loss": to_np(loss), f"step{k}_grad_student_dense": gd.reshape(B, N, K),
                f"step{k}_center": to_np(mod.center.value.reshape(K)),
                f"step{k}_teacher_temp": np.asarray(used, dtype=np.float64),
            })
        add_steps_case(
            case, "ibot_patch", "lightly",
            f"IBOTPatchLoss(output_dim={K}, teacher_temp={tt_}, student_temp={ts}, center_momentum={cm})"
            ".to(float64); 2 calls mod(teacher (M,K), student (M,K), mask (B,H,W) bool), torch default dtype float64",
            {"teacher_temp": tt_, "student_temp": ts, "center_momentum": cm, "output_dim": K},
            data, 2,
            ["teacher_dense", "student_dense", "teacher", "student", "loss", "grad_student_dense", "center",
             "teacher_temp"],
            ["center0", "mask"],
            notes=(
                "Dense form for JAX: step{k}_teacher_dense/student_dense (B, N=H*W, K) and mask (B,N) 0/1 "
                "(row-major over (H,W)); torch got only the masked rows, step{k}_teacher/student (M,K) = "
                "dense.reshape(B*N,K)[mask.reshape(-1)==1]. Unmasked dense rows are random filler that must not "
                "matter (also not for the center). Loss = sum_b [sum_{masked i in b} ce_bi / max(n_b,1)] / B with B "
                "counting images with 0 masked tokens; ce = -softmax((t-c)/tt).log_softmax(s/ts). Center (stored "
                "(K,), lightly Center shape (1,K)) updated AFTER the loss with the mean over the M masked teacher "
                "rows: c <- m*c + (1-m)*mean. grad_student_dense is zero at unmasked rows. Teacher not detached in "
                "lightly. DTYPE QUIRK: lightly builds torch.tensor(teacher_temp) AND the weights "
                "1.0/mask.sum().clamp(min=1.0) (an int64 tensor, so the reciprocal is in torch's DEFAULT dtype) in the "
                "default dtype. These fixtures run with default float64, so both are exact (step{k}_teacher_temp == "
                "teacher_temp); a float32-default user gets float32 temperature and float32 1/n_b (value ~1e-8 rel. off)."
            ),
            batch_size=B, height=H, width=W, num_masked=M,
        )

    # iBOT++: (B,N,K) inputs, mask (B,N) or None
    B, N, K, tt_, ts, cm = 3, 6, 8, 0.04, 0.1, 0.9
    maskf = np.array([[1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=np.float64)
    for w_vis, has_mask in [(1.0, False), (1.0, True), (0.0, True), (0.5, True)]:
        case = f"ibot_plus_plus_patch/lightly/b{B}_n{N}_k{K}_" + (f"mask_wvis{w_vis:g}" if has_mask else "nomask")
        mod = L.IBOTPlusPlusPatchLoss(output_dim=K, teacher_temp=tt_, student_temp=ts, center_momentum=cm).to(F64)
        used = tt_
        data = {"center0": to_np(mod.center.value.reshape(K))}
        if has_mask:
            data["mask"] = maskf
        seed = 11500  # same inputs for every variant
        for k in range(1, 3):
            Td = 0.5 * randn(seed, (B, N, K))
            Sd = randn(seed + 1, (B, N, K))
            seed += 2
            tt, ss = leaf(Td), leaf(Sd)
            c_before = to_np(mod.center.value.reshape(K)).copy()
            if has_mask:
                loss = mod(tt, ss, torch.tensor(maskf > 0.5), visible_loss_weight=w_vis)
            else:
                loss = mod(tt, ss)
            (g,) = torch.autograd.grad(loss, [ss])
            ce = -(np_softmax((Td - c_before) / used) * np_log_softmax(Sd / ts)).sum(-1)
            if has_mask:
                nm = np.maximum(maskf.sum(1), 1.0)
                nv = np.maximum((1 - maskf).sum(1), 1.0)
                ref = float(((ce * maskf).sum(1) / nm + w_vis * (ce * (1 - maskf)).sum(1) / nv).mean())
            else:
                ref = float(ce.mean())
            assert abs(ref - float(loss.detach())) <= 1e-13 * abs(ref), (case, ref, float(loss.detach()))
            c_ref = cm * c_before + (1 - cm) * Td.reshape(-1, K).mean(0)
            assert close(c_ref, to_np(mod.center.value.reshape(K)), 1e-14, 1e-15), case
            data.update({
                f"step{k}_teacher": Td, f"step{k}_student": Sd, f"step{k}_loss": to_np(loss),
                f"step{k}_grad_student": to_np(g), f"step{k}_center": to_np(mod.center.value.reshape(K)),
                f"step{k}_teacher_temp": np.asarray(used, dtype=np.float64),
            })
        add_steps_case(
            case, "ibot_plus_plus_patch", "lightly",
            f"IBOTPlusPlusPatchLoss(output_dim={K}, teacher_temp={tt_}, student_temp={ts}, center_momentum={cm}) "
            ".to(float64); 2 calls (torch default dtype float64) mod(teacher (B,N,K), student (B,N,K), "
            + (f"mask (B,N) bool, visible_loss_weight={w_vis:g})" if has_mask else "mask=None)"),
            {"teacher_temp": tt_, "student_temp": ts, "center_momentum": cm, "output_dim": K,
             "visible_loss_weight": w_vis},
            data, 2, ["teacher", "student", "loss", "grad_student", "center", "teacher_temp"],
            ["center0"] + (["mask"] if has_mask else []),
            notes=(
                ("mask=None: loss = mean of ce over all B*N tokens (visible_loss_weight unused). " if not has_mask else
                 "mask (B,N) 0/1: image 1 has NO masked token, image 2 has ALL tokens masked (both counts clamped "
                 "to >= 1). loss = mean_b[sum(ce*m)/max(sum m,1) + w_vis*sum(ce*(1-m))/max(sum(1-m),1)]. ")
                + "Center updated AFTER the loss from ALL B*N teacher tokens (not only masked ones). "
                "teacher_temp = torch.tensor(0.04) in the default dtype (float64 here: exact, = step{k}_teacher_temp); "
                "the mask weights use ce.dtype (no other default-dtype dependence). Same inputs in all four iBOT++ cases."
            ),
            batch_size=B, num_tokens=N, has_mask=has_mask,
        )


# --------------------------------------------------------------------------- 15. KoLeo


def koleo_nn(x: np.ndarray, eps: float) -> np.ndarray:
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    s = xn @ xn.T
    np.fill_diagonal(s, -2.0)
    return np.argmax(s, axis=1)


def gen_koleo() -> None:
    cases = [
        ("b6_d8", randn(12000, (6, 8)), 1e-8, ""),
        ("b16_d4", randn(12001, (16, 4)), 1e-8, ""),
        ("b16_d4_eps1e-3", randn(12001, (16, 4)), 1e-3, ""),
        ("closed_b1", np.array([[1.0]]), 1e-8, "closed form: B=1, the nearest neighbour is the point itself; "
         "loss = -log(||0 + eps|| + eps) = -log(2e-8) = 17.7275; grads exactly 0 (the two paths cancel)."),
        ("closed_antipodal", np.array([[0.0, 1.0], [0.0, -1.0]]), 1e-8, "closed form: -log 2 (up to the eps)."),
        ("closed_orthogonal", np.array([[0.0, 1.0], [1.0, 0.0]]), 1e-8, "closed form: -log sqrt2 (up to the eps)."),
        ("closed_six_points", np.array([[0, 1], [1, 0], [1, 1], [-1, 0], [0, -1], [-1, -1]], dtype=np.float64), 1e-8,
         "closed form 0.2674 (lightly test). Rows 2 ([1,1]) and 5 ([-1,-1]) have EXACT ties between two neighbours "
         "(cos 0.7071 to both axes); torch argmax takes the FIRST max (row 2 -> 0, row 5 -> 3), and the "
         "gradient depends on that choice (value does not)."),
    ]
    for name, x, eps, note in cases:
        mod = L.KoLeoLoss(p=2, eps=eps).to(F64)
        nn_idx = koleo_nn(x, eps)

        def fn(x, mod=mod, nn_idx=nn_idx):
            return mod(x), {"nn_idx": torch.tensor(nn_idx.astype(np.float64))}

        add_case(
            f"koleo/lightly/{name}", "koleo", "lightly", f"KoLeoLoss(p=2, eps={eps:g})(x)",
            {"p": 2, "eps": eps}, {"x": x}, fn, ["x"],
            notes=(note + " " if note else "") + "x_hat = x/max(||x||, eps); S = x_hat x_hat^T with diagonal := -2; "
            "nn = argmax_j S_ij (first max on ties; stored as nn_idx, float64 ints); d_i = ||x_hat_i - x_hat_nn + eps||_2 "
            "(torch PairwiseDistance adds eps to the DIFFERENCE, every component); loss = -mean log(d_i + eps).",
            **({"hard": True} if name == "closed_six_points" else {}),
        )


# --------------------------------------------------------------------------- 16. TiCo


def gen_tico() -> None:
    configs = [((8, 4), 0.9, 8.0, [True, True, True]), ((5, 16), 0.5, 2.0, [True, True, True]),
               ((8, 4), 0.9, 8.0, [True, False, True])]
    for ci, ((B, D), beta, rho, upd) in enumerate(configs):
        case = f"tico/lightly/b{B}_d{D}_beta{beta:g}_rho{rho:g}" + ("_noupdate2" if not upd[1] else "")
        mod = L.TiCoLoss(beta=beta, rho=rho)
        data: dict[str, np.ndarray] = {"covariance0": np.zeros((D, D))}
        C = np.zeros((D, D))
        seed = 12500 + 10 * (ci if ci < 2 else 0)  # case 3 reuses case 1's inputs
        for k in range(1, 4):
            za, zb = randn(seed, (B, D)), randn(seed + 1, (B, D))
            seed += 2
            ta, tb = leaf(za), leaf(zb)
            loss = mod(ta, tb, update_covariance_matrix=upd[k - 1])
            ga, gb = torch.autograd.grad(loss, [ta, tb])
            na = za / np.linalg.norm(za, axis=1, keepdims=True)
            nb = zb / np.linalg.norm(zb, axis=1, keepdims=True)
            Ccur = beta * C + (1 - beta) * (na.T @ na) / B
            ref = 1.0 - (na * nb).sum(1).mean() + rho * ((na @ Ccur) * na).sum(1).mean()
            assert abs(ref - float(loss.detach())) <= 1e-13 * abs(ref), (case, ref, float(loss.detach()))
            if upd[k - 1]:
                C = Ccur
            assert close(C, to_np(mod.C), 1e-14, 1e-15), case
            data.update({
                f"step{k}_z_a": za, f"step{k}_z_b": zb, f"step{k}_loss": to_np(loss),
                f"step{k}_grad_z_a": to_np(ga), f"step{k}_grad_z_b": to_np(gb), f"step{k}_covariance": to_np(mod.C),
            })
        add_steps_case(
            case, "tico", "lightly",
            f"TiCoLoss(beta={beta:g}, rho={rho:g}); 3 calls mod(z_a, z_b, update_covariance_matrix=u) for u in {upd}",
            {"beta": beta, "rho": rho, "update_covariance_matrix": upd},
            data, 3, ["z_a", "z_b", "loss", "grad_z_a", "grad_z_b", "covariance"], ["covariance0"],
            notes=(
                "kwargs.update_covariance_matrix is the PER-STEP list. C starts as None -> zeros (covariance0). Each "
                "call: n = F.normalize rows; Bm = (n_a^T n_a).detach()/B; C_cur = beta*C + (1-beta)*Bm is used in THIS "
                "step's loss = 1 - mean<n_a,n_b> + rho*mean n_a^T C_cur n_a; afterwards C <- C_cur.detach() only if "
                "update_covariance_matrix (step{k}_covariance = C after the step; with update False it equals the "
                "previous one). grad_z_b: lightly does NOT detach z_b (it comes from the momentum encoder), so "
                "grad_z_b is the gradient of the invariance term only; the JAX loss may stop-gradient z_b - compare "
                "grad_z_a always, grad_z_b only if z_b is not stop-gradiented. C is a plain attribute (float64 here)."
            ),
            batch_size=B,
        )


# --------------------------------------------------------------------------- 17. SwaV


def unit_rows(seed: int, shape) -> np.ndarray:
    x = randn(seed, shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def gen_swav() -> None:
    from lightly.loss import swav_loss as lightly_swav

    B, K, D, Q = 6, 5, 8, 8
    configs = [
        (2, 0, False, 3, 0.1, 0.05),
        (2, 4, False, 3, 0.1, 0.05),
        (2, 2, True, 3, 0.1, 0.05),
        (2, 0, False, 0, 0.1, 0.05),
        (2, 2, True, 0, 0.2, 0.03),
        (3, 2, False, 3, 0.2, 0.03),
    ]
    protos = unit_rows(13000, (K, D))
    for ci, (nh, nl, queue, iters, tau, eps) in enumerate(configs):
        case = f"swav/lightly/h{nh}_l{nl}_" + (f"q{Q}_" if queue else "") + f"it{iters}_t{tau:g}_e{eps:g}"
        s = 13100 + 50 * ci
        inp = {f"high{i}": unit_rows(s + i, (B, D)) @ protos.T for i in range(nh)}
        inp.update({f"low{j}": unit_rows(s + 10 + j, (B, D)) @ protos.T for j in range(nl)})
        if queue:
            inp.update({f"queue{i}": unit_rows(s + 20 + i, (Q, D)) @ protos.T for i in range(nh)})
        mod = L.SwaVLoss(temperature=tau, sinkhorn_iterations=iters, sinkhorn_epsilon=eps)

        def fn(nh=nh, nl=nl, queue=queue, mod=mod, iters=iters, eps=eps, tau=tau, **t):
            hi = [t[f"high{i}"] for i in range(nh)]
            lo = [t[f"low{j}"] for j in range(nl)]
            qu = [t[f"queue{i}"] for i in range(nh)] if queue else None
            loss = mod(hi, lo, qu)
            assert tuple(loss.shape) == (1,)
            codes = {}
            for i in range(nh):
                o = hi[i].detach()
                if queue:
                    o = torch.cat((o, qu[i].detach()))
                codes[f"codes{i}"] = lightly_swav.sinkhorn(o, iterations=iters, epsilon=eps)[:B]
            # the loss re-assembled from the codes (checks the codes are the ones used)
            n_crops = nh + nl
            ref = 0.0
            for i in range(nh):
                q = to_np(codes[f"codes{i}"])
                sub = 0.0
                for z in [to_np(h) for v, h in enumerate(hi) if v != i] + [to_np(x) for x in lo]:
                    sub += -np.mean(np.sum(q * np_log_softmax(z / tau), axis=1))
                ref += sub / (n_crops - 1)
            ref /= nh
            assert abs(ref - float(loss.detach())) <= 1e-13 * abs(ref), (ref, float(loss.detach()))
            return loss, codes

        add_case(
            case, "swav", "lightly",
            f"SwaVLoss(temperature={tau:g}, sinkhorn_iterations={iters}, sinkhorn_epsilon={eps:g})"
            f"([high0..{nh - 1}], [" + (f"low0..{nl - 1}" if nl else "") + "], "
            + ("[queue0..]" if queue else "None") + ")",
            {"temperature": tau, "sinkhorn_iterations": iters, "sinkhorn_epsilon": eps},
            inp, fn, [f"high{i}" for i in range(nh)] + [f"low{j}" for j in range(nl)],
            notes=(
                "Inputs are scores = unit features @ unit prototypes^T (in [-1,1]; lightly has no max-shift before "
                "exp(s/eps)). codes{i} (B,K) = lightly.loss.swav_loss.sinkhorn(cat(high_i.detach(), queue_i), "
                "iterations, epsilon)[:B]: Q = exp(s/eps)^T (K x n), Q /= sum(Q), n = B(+Q); per iteration "
                "Q /= rowsum (per prototype); Q /= colsum; Q /= n; finally Q *= n, transpose. "
                + ("sinkhorn_iterations=0: codes = n*exp(s/eps)/sum(exp) (rows do NOT sum to 1). " if iters == 0 else "")
                + "loss_i = sum over other high crops v!=i and all low crops of -mean_b sum_k q_i log_softmax(z_v/tau), "
                "divided by (n_crops-1); loss = mean_i loss_i. torch returns shape (1,) (stored as a scalar). "
                "Codes are detached; no gradient reaches the queue."
            ),
            n_high=nh, n_low=nl, queue=queue, queue_size=Q if queue else 0,
        )


# --------------------------------------------------------------------------- 18. MSN / PMSN


def gen_msn() -> None:
    from lightly.loss import msn_loss as lightly_msn
    from lightly.loss import pmsn_loss as lightly_pmsn

    configs = [
        # (B, Va, D, K, temperature, sinkhorn_iterations, regularization_weight, target_sharpen_temperature, e)
        (4, 2, 8, 5, 0.1, 3, 1.0, 0.25, 0.25),
        (6, 3, 16, 10, 0.2, 5, 0.5, 0.5, 0.5),
        (4, 2, 8, 5, 0.1, 0, 1.0, 0.25, 0.25),
    ]
    custom = np.array([0.4, 0.25, 0.15, 0.12, 0.08])
    for ci, (B, Va, D, K, tau, iters, reg, ts, e) in enumerate(configs):
        s = 14000 + 10 * (ci if ci < 2 else 0)  # the sinkhorn_iterations=0 case reuses config 0's inputs
        inp = {"anchors": randn(s, (B * Va, D)), "targets": randn(s + 1, (B, D)), "prototypes": randn(s + 2, (K, D))}

        def target_probs(targets, prototypes, tau=tau, ts=ts, iters=iters):
            with torch.no_grad():
                t = torch.nn.functional.normalize(targets, dim=1)
                p = torch.nn.functional.normalize(prototypes, dim=1)
                tp = lightly_msn.sharpen(lightly_msn.prototype_probabilities(t, p, tau), ts)
                if iters > 0:
                    tp = lightly_msn.sinkhorn(tp, iterations=iters)
                return tp

        variants = [("msn", L.MSNLoss(temperature=tau, sinkhorn_iterations=iters, regularization_weight=reg), {}),
                    ("pmsn", L.PMSNLoss(temperature=tau, sinkhorn_iterations=iters, regularization_weight=reg,
                                        power_law_exponent=e), {"power_law_exponent": e})]
        if K == len(custom):
            variants.append(("pmsn_custom", lightly_pmsn.PMSNCustomLoss(
                target_distribution=lambda p: torch.tensor(custom, dtype=p.dtype), temperature=tau,
                sinkhorn_iterations=iters, regularization_weight=reg), {"target_distribution": custom.tolist()}))
        for lname, mod, kx in variants:
            case = f"{lname}/lightly/b{B}_va{Va}_d{D}_k{K}_t{tau:g}_it{iters}_r{reg:g}_ts{ts:g}" + (
                f"_e{e:g}" if lname == "pmsn" else "")

            def fn(anchors, targets, prototypes, mod=mod, ts=ts, lname=lname, e=e, K=K, tp_fn=target_probs):
                loss = mod(anchors, targets, prototypes, target_sharpen_temperature=ts)
                extras = {"target_probs": tp_fn(targets, prototypes)}
                if lname == "pmsn":
                    extras["target_distribution"] = lightly_pmsn._power_law_distribution(K, e, anchors.device)
                    assert extras["target_distribution"].dtype == F64
                if lname == "pmsn_custom":
                    extras["target_distribution"] = torch.tensor(custom)
                return loss, extras

            kwargs = {"temperature": tau, "sinkhorn_iterations": iters, "regularization_weight": reg,
                      "target_sharpen_temperature": ts, **kx}
            add_case(
                case, lname, "lightly",
                {"msn": "MSNLoss", "pmsn": "PMSNLoss", "pmsn_custom": "PMSNCustomLoss"}[lname]
                + f"({', '.join(f'{a}={b}' for a, b in kwargs.items() if a != 'target_sharpen_temperature')})"
                f"(anchors, targets, prototypes, target_sharpen_temperature={ts:g})",
                kwargs, inp, fn, ["anchors", "prototypes"],
                notes=(
                    "anchors (B*Va, D) view-major. All three inputs F.normalize'd. p = softmax(a P^T/tau). Target "
                    "branch under no_grad (target_probs output = (B,K) after sharpen p^(1/ts)/sum and Sinkhorn, "
                    "before repeat((Va,1))): "
                    + ("Sinkhorn skipped (iterations=0). " if iters == 0 else
                       "Sinkhorn on (K,B): /= total; per iteration /= rowsum, /= K, /= colsum, /= B; then *= B. ")
                    + "CE = mean_anchors sum_k log(p^(-t)). p_bar = mean_anchors p (local). "
                    + {"msn": "reg = sum p_bar log p_bar + log K (written -sum log(p_bar^(-p_bar)) + log K).",
                       "pmsn": "reg = kl_div(log p_bar, pi, 'sum') = sum pi (log pi - log p_bar) = KL(pi||p_bar), "
                               "pi_k = k^-e / sum in prototype index order; pi is computed in torch's DEFAULT dtype "
                               "(float64 in this script, float32 for a normal user) and stored as target_distribution.",
                       "pmsn_custom": "reg = sum pi (log pi - log p_bar) with the fixed pi = kwargs.target_distribution "
                                      "(not renormalized by lightly; stored as target_distribution)."}[lname]
                    + " loss = CE + regularization_weight*reg. Targets get no gradient (not stored)."
                ),
                batch_size=B, anchor_views=Va,
            )


# --------------------------------------------------------------------------- 19. CAPI


def gen_capi() -> None:
    from lightly.loss import capi_loss as lightly_capi

    configs = [
        # (B, Nt, Np, K, tt, ts, iters, with_index)
        (3, 5, 5, 6, 0.06, 0.12, 3, False),
        (3, 5, 3, 6, 0.06, 0.12, 3, True),
        (4, 6, 4, 8, 0.1, 0.2, 5, True),
        (3, 5, 5, 6, 0.06, 0.12, 0, False),
    ]
    for ci, (B, Nt, Np, K, tt, ts, iters, with_index) in enumerate(configs):
        case = f"capi/lightly/b{B}_nt{Nt}_np{Np}_k{K}_tt{tt:g}_ts{ts:g}_it{iters}" + ("_index" if with_index else "")
        s = 15000 + 10 * ci
        inp = {"teacher_logits": randn(s, (B, Nt, K)), "student_logits": randn(s + 1, (B, Np, K))}
        if with_index:
            rs = np.random.RandomState(s + 2)
            inp["teacher_index"] = np.stack([np.sort(rs.choice(Nt, Np, replace=False)) for _ in range(B)]).astype(np.float64)
        mod = L.CAPILoss(teacher_temperature=tt, student_temperature=ts, sinkhorn_iterations=iters)

        def fn(teacher_logits, student_logits, teacher_index=None, mod=mod, tt=tt, iters=iters):
            idx = None if teacher_index is None else teacher_index.detach().long()
            loss = mod(teacher_logits, student_logits, idx)
            a = lightly_capi.sinkhorn_knopp(teacher_logits.detach() / tt, iterations=iters)
            return loss, {"assignments": a}

        add_case(
            case, "capi", "lightly",
            f"CAPILoss(teacher_temperature={tt:g}, student_temperature={ts:g}, sinkhorn_iterations={iters})"
            "(teacher_logits, student_logits, " + ("teacher_index.long())" if with_index else "None)"),
            {"teacher_temperature": tt, "student_temperature": ts, "sinkhorn_iterations": iters},
            inp, fn, ["student_logits"],
            notes=(
                "assignments (B,Nt,K) = lightly.loss.capi_loss.sinkhorn_knopp(teacher/tt): per sequence position "
                "q = exp(x - max over the batch); per iteration q /= (sum over batch + 1e-8); q /= (sum over K + 1e-8). "
                + ("iterations=0: assignments = exp(x - batch max), NOT normalized. " if iters == 0 else "")
                + ("teacher_index (B,Np) holds int values stored as float64 (cast to long for torch); targets = "
                   "assignments gathered along the token axis AFTER Sinkhorn over all Nt tokens. " if with_index else
                   "No index: student and teacher tokens aligned (Np = Nt). ")
                + "loss = mean over (B,Np) of -sum_k a*log_softmax(student/ts). Teacher detached (grad not stored)."
            ),
        )


# --------------------------------------------------------------------------- 20. CO2


def co2_reference(out0, out1, bank, alpha: float, t: float) -> torch.Tensor:
    """Transcription of lightly's CO2Regularizer.forward WITHOUT the final torch.tensor(...) (keeps autograd).
    bank: (n, D) negatives before the step (detached), or None."""
    n0 = torch.nn.functional.normalize(out0, dim=1)
    n1 = torch.nn.functional.normalize(out1, dim=1)

    def pseudo(a, b):
        Bsz = a.shape[0]
        l_pos = (a * b).sum(1, keepdim=True)
        if bank is None:
            l_neg = (a @ b.t()).masked_select(~torch.eye(Bsz, dtype=torch.bool)).view(Bsz, Bsz - 1)
        else:
            l_neg = a @ bank.t()
        return torch.log_softmax(torch.cat([l_pos, l_neg], 1) / t, -1)

    p, q = pseudo(n0, n1), pseudo(n1, n0)

    def kl(inp, tgt):  # KLDivLoss(reduction="batchmean", log_target=True)(inp, tgt)
        return (tgt.exp() * (tgt - inp)).sum() / inp.shape[0]

    return alpha * 0.5 * (kl(p, q) + kl(q, p))


def gen_co2() -> None:
    from lightly.loss.regularizer import CO2Regularizer

    note_common = (
        "lightly returns torch.tensor(alpha*0.5*div): a NEW leaf, detached (no gradient). The stored grads are "
        "REFERENCE gradients from make_golden.co2_reference, a transcription of lightly's forward without the final "
        "torch.tensor wrap, run with autograd on the same tensors; its value equals lightly's (asserted to 1e-13). "
        "n0, n1 = F.normalize; logits_p = [<n0,n1>, negatives]/t, logits_q = [<n1,n0>, negatives']/t; "
        "p, q = log_softmax; div = KL_batchmean(p,q) + KL_batchmean(q,p) with log targets, "
        "KLDivLoss(inp, tgt) = sum(exp(tgt)*(tgt-inp))/B; loss = alpha*0.5*div. "
    )
    for ci, (B, D, alpha, t) in enumerate([(6, 8, 1.0, 0.05), (5, 4, 0.5, 0.2)]):
        inp = {"out0": randn(16000 + 2 * ci, (B, D)), "out1": randn(16001 + 2 * ci, (B, D))}
        mod = CO2Regularizer(alpha=alpha, t_consistency=t, memory_bank_size=0)

        def fn(out0, out1, mod=mod, alpha=alpha, t=t):
            lv = mod(out0, out1)
            assert not lv.requires_grad and lv.dtype == F64
            ref = co2_reference(out0, out1, None, alpha, t)
            assert abs(float(ref.detach()) - float(lv)) <= 1e-13 * abs(float(lv)), (float(ref.detach()), float(lv))
            return ref, {"lightly_loss": lv}

        add_case(
            f"co2/lightly/b{B}_d{D}_a{alpha:g}_t{t:g}", "co2", "lightly",
            f"CO2Regularizer(alpha={alpha:g}, t_consistency={t:g}, memory_bank_size=0)(out0, out1)",
            {"alpha": alpha, "t_consistency": t}, inp, fn, ["out0", "out1"],
            grads_from="reference transcription (lightly's value is detached)",
            notes=note_common + "No bank: negatives of p are n0 @ n1^T off-diagonal (B-1 per row), of q n1 @ n0^T "
            "off-diagonal; gradients flow through those negatives. lightly_loss = lightly's (detached) value.",
        )
    # with a memory bank, 3 steps
    for ci, (n, B, D, alpha, t) in enumerate([(8, 4, 5, 1.0, 0.1), (10, 4, 6, 0.5, 0.2)]):
        case = f"co2/lightly/bank_n{n}_b{B}_d{D}_a{alpha:g}_t{t:g}"
        torch.manual_seed(16100 + ci)
        mod = CO2Regularizer(alpha=alpha, t_consistency=t, memory_bank_size=(n, D)).to(F64)
        mb = mod.memory_bank
        assert mb.bank.dtype == F64
        data: dict[str, np.ndarray] = {"bank0": to_np(mb.bank.clone()),
                                       "ptr0": np.asarray(int(mb.bank_ptr[0]), dtype=np.int64)}
        seed = 16200 + 100 * ci
        first_overflow = None
        for k in range(1, 4):
            a, b = randn(seed, (B, D)), randn(seed + 1, (B, D))
            seed += 2
            if int(mb.bank_ptr[0]) + B > n and first_overflow is None:  # rows dropped (as ntxent_memory_bank)
                first_overflow = k
            t0, t1 = leaf(a), leaf(b)
            bank_before = mb.bank.clone().detach()
            ref = co2_reference(t0, t1, bank_before, alpha, t)
            lv = mod(t0, t1)
            assert not lv.requires_grad
            assert abs(float(ref.detach()) - float(lv)) <= 1e-13 * abs(float(lv)), (case, float(ref.detach()), float(lv))
            g0, g1 = torch.autograd.grad(ref, [t0, t1])
            data.update({
                f"step{k}_out0": a, f"step{k}_out1": b, f"step{k}_loss": to_np(ref), f"step{k}_lightly_loss": to_np(lv),
                f"step{k}_grad_out0": to_np(g0), f"step{k}_grad_out1": to_np(g1),
                f"step{k}_bank": to_np(mb.bank.clone()), f"step{k}_ptr": np.asarray(int(mb.bank_ptr[0]), dtype=np.int64),
            })
        add_steps_case(
            case, "co2", "lightly",
            f"torch.manual_seed({16100 + ci}); CO2Regularizer(alpha={alpha:g}, t_consistency={t:g}, "
            f"memory_bank_size=({n}, {D})).to(torch.float64); 3 calls mod(out0, out1)",
            {"alpha": alpha, "t_consistency": t},
            data, 3, ["out0", "out1", "loss", "lightly_loss", "grad_out0", "grad_out1", "bank", "ptr"],
            ["bank0", "ptr0"],
            notes=note_common + (
                "Bank: negatives = bank BEFORE the step (bank0 / step{k-1}_bank), detached, the SAME negatives for p "
                "and q (no in-batch negatives). The bank is queried/updated with normalized out1 on EVERY call "
                "(update=True, even under no_grad; unlike NTXent it does not check requires_grad); FIFO as in the "
                "NTXent bank: if ptr+B >= n: bank[ptr:] = n1[:n-ptr], ptr = 0 (rest dropped), else bank[ptr:ptr+B] = n1, "
                "ptr += B. bank0 is float32-representable (created float32, .to(float64)). step{k}_loss = reference "
                "value (== step{k}_lightly_loss)."
            ),
            bank_size=[n, D], batch_size=B, first_overflow_step=first_overflow,
            grads_from="reference transcription (lightly's value is detached)",
        )


# --------------------------------------------------------------------------- 21. WMSE


def np_whiten(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = x.mean(0)
    xc = x - m
    cov = xc.T @ xc / (x.shape[0] - 1)
    Lc = np.linalg.cholesky((1 - eps) * cov + eps * np.eye(x.shape[1]))
    return np.linalg.solve(Lc, xc.T).T, m, cov


def gen_wmse() -> None:
    configs = [
        # (embedding_dim, w_size, w_iter, num_samples, B per view, momentum, eps)
        (4, 8, 1, 2, 8, 0.01, 0.0),
        (4, 8, 2, 2, 16, 0.1, 0.0),
        (4, 8, 1, 3, 16, 0.05, 0.1),
    ]
    orig_randperm = torch.randperm
    for ci, (Dm, ws, wit, ns, bs, mom, eps) in enumerate(configs):
        case = f"wmse/lightly/d{Dm}_ws{ws}_wit{wit}_ns{ns}_b{bs}_m{mom:g}_e{eps:g}"
        mod = L.WMSELoss(embedding_dim=Dm, momentum=mom, eps=eps, w_iter=wit, w_size=ws, num_samples=ns).to(F64)
        wh = mod.whitening
        data: dict[str, np.ndarray] = {"running_mean0": to_np(wh.running_mean.reshape(Dm)),
                                       "running_variance0": to_np(wh.running_variance)}
        rm, rv = data["running_mean0"].copy(), data["running_variance0"].copy()
        torch.manual_seed(17000 + ci)
        A = randn(17100 + ci, (Dm, Dm)) + 2 * np.eye(Dm)
        seed = 17200 + 100 * ci
        modes = ["train", "train", "eval"]
        drawn: list[torch.Tensor] = []

        def rp(*a, drawn=drawn, **k):
            r = orig_randperm(*a, **k)
            drawn.append(r.clone())
            return r

        for k, mode in enumerate(modes, 1):
            x = randn(seed, (ns * bs, Dm)) @ A + 0.3 * randn(seed + 1, (1, Dm))
            seed += 2
            mod.train(mode == "train")
            drawn.clear()
            tx = leaf(x)
            torch.randperm = rp
            try:
                loss = mod(tx)
            finally:
                torch.randperm = orig_randperm
            (g,) = torch.autograd.grad(loss, [tx])
            assert len(drawn) == wit
            # numpy re-computation, including the order of the running-stat updates
            tot = 0.0
            for perm in drawn:
                pm = perm.numpy()
                z = np.empty_like(x)
                for idx in pm.reshape(-1, ws):
                    for i in range(ns):
                        rows = idx + i * bs
                        if mode == "train":
                            zz, m, cov = np_whiten(x[rows], eps)
                            rm = mom * m + (1 - mom) * rm
                            rv = mom * cov + (1 - mom) * rv
                        else:
                            Lc = np.linalg.cholesky((1 - eps) * rv + eps * np.eye(Dm))
                            zz = np.linalg.solve(Lc, (x[rows] - rm).T).T
                        z[rows] = zz
                for i in range(ns - 1):
                    for j in range(i + 1, ns):
                        x0, x1 = z[i * bs:(i + 1) * bs], z[j * bs:(j + 1) * bs]
                        x0 = x0 / np.linalg.norm(x0, axis=1, keepdims=True)
                        x1 = x1 / np.linalg.norm(x1, axis=1, keepdims=True)
                        tot += 2 - 2 * (x0 * x1).sum(1).mean()
            ref = tot / (wit * ns * (ns - 1) // 2)
            assert abs(ref - float(loss.detach())) <= 1e-11 * abs(ref), (case, k, ref, float(loss.detach()))
            assert close(rm, to_np(wh.running_mean.reshape(Dm)), 1e-12, 1e-14), case
            assert close(rv, to_np(wh.running_variance), 1e-12, 1e-14), case
            data.update({f"step{k}_input": x, f"step{k}_loss": to_np(loss), f"step{k}_grad_input": to_np(g),
                         f"step{k}_running_mean": to_np(wh.running_mean.reshape(Dm)),
                         f"step{k}_running_variance": to_np(wh.running_variance)})
            for i, perm in enumerate(drawn):
                data[f"step{k}_perm{i}"] = perm.numpy().astype(np.float64)
        # one direct eval-mode Whitening2d call on the last input
        with torch.no_grad():
            data["eval_whitened"] = to_np(wh(leaf(data[f"step{len(modes)}_input"], False)))
        Lc = np.linalg.cholesky((1 - eps) * rv + eps * np.eye(Dm))
        assert close(np.linalg.solve(Lc, (data[f"step{len(modes)}_input"] - rm).T).T, data["eval_whitened"], 1e-11, 1e-12)
        add_steps_case(
            case, "wmse", "lightly",
            f"WMSELoss(embedding_dim={Dm}, momentum={mom:g}, eps={eps:g}, w_iter={wit}, w_size={ws}, num_samples={ns})"
            f".to(float64); torch.manual_seed({17000 + ci}); mod.train() x2 calls, then mod.eval() x1 call mod(input); "
            "then eval-mode mod.whitening(step3_input)",
            {"embedding_dim": Dm, "w_size": ws, "w_iter": wit, "num_samples": ns, "momentum": mom, "eps": eps},
            data, 3, ["input", "loss", "grad_input", "running_mean", "running_variance"]
            + [f"perm{i}" for i in range(wit)],
            ["running_mean0", "running_variance0", "eval_whitened"],
            notes=(
                "input (ns*B, D) sample-major (view i = rows i*B..(i+1)*B). step{k}_perm{i} = the torch.randperm(B) "
                "actually drawn in w-iteration i (int values stored as float64); sub-batches are consecutive chunks "
                "of w_size of it (perm.view(-1, w_size)), applied to EACH view separately (rows idx + v*B). Whitening "
                "of a sub-batch: m = mean, cov = xc^T xc/(n-1), W = L^-1 with L = cholesky((1-eps)cov + eps I), "
                "z = xc W^T. Train mode: after EVERY whitening call (order: w-iteration, sub-batch in perm order, "
                "view) running_mean <- mom*m + (1-mom)*running_mean and running_variance <- mom*cov + "
                "(1-mom)*running_variance (stored after the step; running_mean is (D,), lightly shape (1,D,1,1)). "
                "Eval mode (step 3): m = running_mean, cov = running_variance, stats unchanged, the permutation "
                "still drawn but irrelevant. loss = sum over w-iterations and view pairs i<j of "
                "(2 - 2*mean_b cos(z_i,z_j)) / (w_iter*num_pairs). eval_whitened = Whitening2d in eval mode on "
                "step3_input (rows whitened with the final running stats)."
            ),
            modes=modes, batch_size=bs,
        )


# --------------------------------------------------------------------------- 22+. Issue 4 (part): VICRegL, DetCon,
# DirectCLR, MACL, MMCR, FroSSL, EMP-SSL (single-step add_case layout)


def gen_vicregl() -> None:
    configs = [
        # (tag, B, Vg, Vl, (Hg, Wg), (Hl, Wl), Dg, Dl, kwargs)
        ("2g_b4_h3", 4, 2, 0, (3, 3), None, 8, 8, {}),
        ("2g2l_b5", 5, 2, 2, (3, 3), (2, 2), 6, 5,
         {"lambda_param": 10.0, "mu_param": 5.0, "nu_param": 2.0, "alpha": 0.5, "num_matches": [4, 2]}),
        ("1g2l_b3", 3, 1, 2, (2, 3), (2, 2), 4, 6, {"num_matches": [3, 3], "eps": 1e-3}),
        ("3g_b2_h2", 2, 3, 0, (2, 2), None, 5, 4, {"nu_param": 2.0, "alpha": 0.25}),
        ("2g1l_b2_h1", 2, 2, 1, (1, 1), (1, 1), 3, 3, {}),
    ]
    for ci, (tag, B, Vg, Vl, hw_g, hw_l, Dg, Dl, kw) in enumerate(configs):
        s = 20000 + 100 * ci
        inp: dict[str, np.ndarray] = {}
        for v in range(Vg + Vl):
            hw = hw_g if v < Vg else hw_l
            inp[f"g{v}"] = randn(s + 10 * v, (B, Dg))
            inp[f"l{v}"] = randn(s + 10 * v + 1, (B, *hw, Dl))
            inp[f"grid{v}"] = randn(s + 10 * v + 2, (B, *hw, 2))
        torch_kw = dict(kw)
        if "num_matches" in torch_kw:
            torch_kw["num_matches"] = tuple(torch_kw["num_matches"])
        mod = L.VICRegLLoss(**torch_kw).to(F64)

        def fn(mod=mod, Vg=Vg, Vl=Vl, **t):
            gf = [(t[f"g{v}"], t[f"l{v}"]) for v in range(Vg)]
            gg = [t[f"grid{v}"] for v in range(Vg)]
            lf = [(t[f"g{v}"], t[f"l{v}"]) for v in range(Vg, Vg + Vl)] or None
            lg = [t[f"grid{v}"] for v in range(Vg, Vg + Vl)] or None
            loss = mod(gf, gg, lf, lg)
            inv = mod._global_invariance_loss(gf, lf)
            var, cov = mod._global_variance_and_covariance_loss(gf, lf)
            local = mod._local_loss(gf, gg, lf, lg)
            return loss, {"invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach(),
                          "local_loss": local.detach()}

        add_case(
            f"vicregl/lightly/{tag}", "vicregl", "lightly",
            f"VICRegLLoss({', '.join(f'{k}={v}' for k, v in torch_kw.items())})"
            "(global_view_features=[(g_v, l_v)], global_view_grids=[grid_v], local_view_features, local_view_grids)",
            kw, inp, fn, [n for n in inp if not n.startswith("grid")],
            notes="Views 0..n_global-1 are global, the rest local; l_v (B,H,W,Dl), grid_v (B,H,W,2) random "
            "(no distance ties). Output shape (1,) stored as a scalar. invariance/variance/covariance = lightly's "
            "_global_invariance_loss / _global_variance_and_covariance_loss (unweighted; var, cov averaged over all "
            "views); local_loss = _local_loss (L2 + location terms summed, averaged over the ordered pairs, VICReg "
            "with nu/2). Grids get no gradient (matching only)."
            + (" hard: B=2 (smallest batch) and H=W=1 (one location, num_matches clipped to 1)." if "h1" in tag else ""),
            n_global=Vg, n_local=Vl, hard="h1" in tag,
        )


@contextmanager
def detcon_float64_masks():
    """lightly's ``_same_mask`` returns ``.float()`` (float32 whatever the inputs), so the area weights
    1/obj_area are float32-rounded (1/3, 1/5, ... off by ~3e-8 relative). Patched to the default dtype (float64
    here) for the fixtures; the unpatched value is stored as ``lightly_loss``."""
    from lightly.loss import detcon_loss as lightly_detcon

    orig = lightly_detcon._same_mask
    lightly_detcon._same_mask = lambda a, b: orig(a, b).to(torch.get_default_dtype())
    try:
        yield
    finally:
        lightly_detcon._same_mask = orig


def gen_detcon() -> None:
    m0 = np.array([[0, 1, 1, 2], [3, 0, 3, 1]], np.float64)
    m1 = np.array([[1, 0, 2, 2], [0, 3, 1, 1]], np.float64)
    configs = [
        # (tag, B, M, D, tau, masks or n_ids)
        ("b2_m4_d8_t0.1", 2, 4, 8, 0.1, (m0, m1)),
        ("b3_m5_d6_t0.5", 3, 5, 6, 0.5, 3),
        ("b4_m3_d4_t-0.2", 4, 3, 4, -0.2, 4),
        ("b2_m3_d5_t0.1_one_region", 2, 3, 5, 0.1, 1),
        ("b1_m1_d3_t0.1", 1, 1, 3, 0.1, 1),
        ("b3_m4_d4_t0.1_disjoint", 3, 4, 4, 0.1, "disjoint"),
    ]
    for ci, (tag, B, M, D, tau, masks) in enumerate(configs):
        s = 21000 + 100 * ci
        if isinstance(masks, tuple):
            mk0, mk1 = masks
        elif masks == "disjoint":  # ids of view 1 never occur in view 0: no positives anywhere
            rs = np.random.RandomState(s + 9)
            mk0 = rs.randint(0, 3, (B, M)).astype(np.float64)
            mk1 = rs.randint(3, 6, (B, M)).astype(np.float64)
        else:
            rs = np.random.RandomState(s + 9)
            mk0 = rs.randint(0, masks, (B, M)).astype(np.float64)
            mk1 = rs.randint(0, masks, (B, M)).astype(np.float64)
        hard = "one_region" in tag or "disjoint" in tag or B == 1
        views = {n: randn(s + i, (B, M, D)) for i, n in enumerate(["pred_view0", "pred_view1", "target_view0", "target_view1"])}
        modb = L.DetConBLoss(temperature=tau).to(F64)
        add_case(
            f"detcon_b/lightly/{tag}", "detcon_b", "lightly", f"DetConBLoss(temperature={tau})(p0, p1, t0, t1, m0, m1)",
            {"temperature": tau}, {**views, "mask_view0": mk0, "mask_view1": mk1},
            lambda mod=modb, **t: detcon_call(mod, t, ["pred_view0", "pred_view1", "target_view0", "target_view1"]),
            ["pred_view0", "pred_view1", "target_view0", "target_view1"],
            notes="masks (B,M) hold integer region ids stored as float64 (cast to long for torch). loss/grads: "
            "lightly with _same_mask patched to float64 (its .float() rounds the 1/area weights to float32); "
            "lightly_loss = the unpatched value (agrees to ~3e-8). "
            "gather_distributed=True (default) but world size 1: no gather. Same-view same-region logits get -1e9. "
            + ("hard: every region has the same id. " if "one_region" in tag else "")
            + ("hard: disjoint ids, no positives: every weight is 0 and the loss is exactly 0. " if "disjoint" in tag else "")
            + ("hard: B=1, M=1. " if B == 1 else ""),
            hard=hard,
        )
        mods = L.DetConSLoss(temperature=tau).to(F64)
        add_case(
            f"detcon_s/lightly/{tag}", "detcon_s", "lightly", f"DetConSLoss(temperature={tau})(view0, view1, m0, m1)",
            {"temperature": tau}, {"view0": views["pred_view0"], "view1": views["pred_view1"], "mask_view0": mk0, "mask_view1": mk1},
            lambda mod=mods, **t: detcon_call(mod, t, ["view0", "view1"]),
            ["view0", "view1"],
            notes="DetConS = DetConB(view0, view1, view0, view1): gradients through both uses.",
            hard=hard,
        )


def detcon_call(mod, t: dict, views: list[str]):
    masks = (t["mask_view0"].detach().long(), t["mask_view1"].detach().long())
    with torch.no_grad():
        unpatched = mod(*(t[v] for v in views), *masks)
    with detcon_float64_masks():
        loss = mod(*(t[v] for v in views), *masks)
    assert abs(float(loss) - float(unpatched)) <= 1e-7 * max(1.0, abs(float(loss))), (float(loss), float(unpatched))
    return loss, {"lightly_loss": unpatched}


def gen_directclr() -> None:
    configs = [((6, 8), 4, 0.5), ((5, 3, 4), 7, 0.2), ((4, 6), 64, 0.5), ((7, 10), 10, -0.3), ((1, 5), 3, 0.5)]
    for ci, (shape, ld, tau) in enumerate(configs):
        s = 22000 + 10 * ci
        inp = {"out0": randn(s, shape), "out1": randn(s + 1, shape)}
        mod = L.DirectCLRLoss(loss_dim=ld, temperature=tau).to(F64)
        add_case(
            f"directclr/lightly/{'x'.join(map(str, shape))}_ld{ld}_t{tau}", "directclr", "lightly",
            f"DirectCLRLoss(loss_dim={ld}, temperature={tau})(out0, out1)", {"loss_dim": ld, "temperature": tau},
            inp, lambda out0, out1, mod=mod: mod(out0, out1), ["out0", "out1"],
            notes="flatten(start_dim=1)[:, :loss_dim] then NTXent; grads are 0 beyond loss_dim. "
            + ("loss_dim > features: all features kept. " if ld > int(np.prod(shape[1:])) else "")
            + ("hard: B=1 (no negatives, loss 0). " if shape[0] == 1 else ""),
            hard=shape[0] == 1,
        )


def gen_macl() -> None:
    configs = [(6, 8, 0.1, 0.5, 0.0), (5, 4, 0.3, 1.0, 0.5), (8, 16, 0.05, 0.0, 0.0), (2, 3, 0.1, 0.5, 0.2)]
    for ci, (B, D, tau, alpha, a0) in enumerate(configs):
        s = 23000 + 10 * ci
        inp = {"z0": randn(s, (B, D)), "z1": randn(s + 1, (B, D))}
        mod = L.MACLLoss(temperature=tau, alpha=alpha, A_0=a0).to(F64)
        add_case(
            f"macl/lightly/b{B}_d{D}_t{tau}_a{alpha}_A{a0}", "macl", "lightly",
            f"MACLLoss(temperature={tau}, alpha={alpha}, A_0={a0})(z0, z1)",
            {"temperature": tau, "alpha": alpha, "A_0": a0}, inp, lambda z0, z1, mod=mod: mod(z0, z1), ["z0", "z1"],
            notes="A = mean(pos) and V = 1/(1-P+1e-8) are detached in torch.",
        )
    B, D = 4, 6
    z0 = randn(23100, (B, D))
    mod = L.MACLLoss().to(F64)
    add_case(
        "macl/lightly/collinear_b4_d6", "macl", "lightly", "MACLLoss()(z0, 3*z0 + tiny noise)", {},
        {"z0": z0, "z1": 3.0 * z0 + 1e-3 * randn(23101, (B, D))}, lambda z0, z1, mod=mod: mod(z0, z1), ["z0", "z1"],
        notes="hard: nearly collinear positives (A close to 1, tau = 0.15).", hard=True,
    )


def gen_mmcr() -> None:
    configs = [(3, 2, 8, 5e-3), (4, 1, 5, 0.1), (2, 3, 10, 0.0), (5, 2, 3, 5e-3), (1, 2, 4, 5e-3), (6, 2, 4, 1.0)]
    for ci, (B, k, D, lmda) in enumerate(configs):
        s = 24000 + 10 * ci
        inp = {"online": randn(s, (B, k, D)), "momentum": randn(s + 1, (B, k, D))}
        mod = L.MMCRLoss(lmda=lmda).to(F64)
        add_case(
            f"mmcr/lightly/b{B}_k{k}_d{D}_l{lmda:g}", "mmcr", "lightly", f"MMCRLoss(lmda={lmda:g})(online, momentum)",
            {"lmda": lmda}, inp, lambda online, momentum, mod=mod: mod(online, momentum), ["online", "momentum"],
            notes="No normalization, no detach (momentum gets a gradient). "
            + ("2k > D: per-sample matrices have rank D. " if 2 * k > D else "")
            + ("hard: B=1, the centroid matrix is one row. " if B == 1 else ""),
            hard=B == 1,
        )
    mod = L.MMCRLoss().to(F64)
    add_case(
        "mmcr/lightly/zeros_b3_k2_d4", "mmcr", "lightly", "MMCRLoss()(zeros, zeros)", {"lmda": 5e-3},
        {"online": np.zeros((3, 2, 4)), "momentum": np.zeros((3, 2, 4))},
        lambda online, momentum, mod=mod: mod(online, momentum), ["online", "momentum"],
        notes="hard: all zeros, loss 0. Gradients stored but not compared (skip_grads): any U V^T is a "
        "subgradient there (torch's and ours are finite but need not agree).", hard=True, skip_grads=True,
    )


def gen_frossl() -> None:
    configs = [(2, 6, 8, 1.0), (3, 10, 4, 0.5), (2, 5, 5, 2.0), (4, 3, 7, 1.0), (2, 1, 4, 1.0)]
    for ci, (V, B, D, w) in enumerate(configs):
        s = 25000 + 10 * ci
        inp = {f"z{v}": randn(s + v, (B, D)) for v in range(V)}
        mod = L.FroSSLLoss(invariance_weight=w).to(F64)
        add_case(
            f"frossl/lightly/v{V}_b{B}_d{D}_w{w:g}", "frossl", "lightly", f"FroSSLLoss(invariance_weight={w:g})([z_v])",
            {"invariance_weight": w}, inp, lambda mod=mod, V=V, **t: mod([t[f"z{v}"] for v in range(V)]), list(inp),
            notes=("B > D: D x D covariance. " if B > D else "B <= D: B x B Gram. ")
            + "The trace is .item() (detached). "
            + ("hard: B=1 (every normalized column is +-1). " if B == 1 else ""),
            hard=B == 1,
        )


def gen_emp_ssl() -> None:
    from lightly.loss import emp_ssl_loss as lightly_emp

    configs = [(2, 6, 8, 0.2, 200.0), (3, 10, 4, 0.5, 50.0), (4, 5, 5, 0.2, 200.0), (2, 3, 12, 1.0, 1.0)]
    for ci, (V, B, D, eps, lam) in enumerate(configs):
        s = 26000 + 10 * ci
        inp = {f"z{v}": randn(s + v, (B, D)) for v in range(V)}
        cases = [(f"emp_ssl/lightly/v{V}_b{B}_d{D}_e{eps:g}_i{lam:g}", inp, False)]
        if ci == 0:  # collapsed: every row of every view the same vector
            row = randn(s + 50, (1, D))
            cases.append((f"emp_ssl/lightly/collapsed_v{V}_b{B}_d{D}", {f"z{v}": np.repeat(row, B, 0) for v in range(V)}, True))
        for case, data, hard in cases:
            mod = L.EMPSSLLoss(tcr_eps=eps, inv_coef=lam).to(F64)

            def fn(mod=mod, V=V, eps=eps, **t):
                z = [t[f"z{v}"] for v in range(V)]
                zz = torch.stack(z)
                return mod(z), {"coding_rate": lightly_emp.tcr_loss(zz, eps=eps).detach(),
                                "invariance": lightly_emp.invariance_loss(zz).detach()}

            add_case(
                case, "emp_ssl", "lightly", f"EMPSSLLoss(tcr_eps={eps:g}, inv_coef={lam:g})([z_v])",
                {"tcr_eps": eps, "inv_coef": lam, "tcr_coef": -1.0}, data, fn, list(data),
                notes="lightly's sign: loss = +coding_rate + inv_coef*invariance (the official code subtracts the "
                "coding rate); kwargs carry tcr_coef=-1.0, which reproduces it in sslloss_jax. coding_rate = "
                "tcr_loss = 0.5*mean_v logdet(I + D/(B*eps) z_v^T z_v), invariance = -mean cos(z_v, mean_v z_v). "
                + ("hard: collapsed input (identical rows and views). " if hard else ""),
                hard=hard,
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
        if "step_keys" in c:
            need += [f"{c['case']}/{n}" for n in c["static_keys"]]
            need += [f"{c['case']}/step{k}_{n}" for k in range(1, c["steps"] + 1) for n in c["step_keys"]]
        elif "steps" in c:
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


def preserve_existing(path: Path) -> None:
    """Keeps the committed bytes of every array that is already in ``path`` (same key, shape and dtype), so that
    adding cases never rewrites old fixtures. Reruns on one machine are bit-identical, but torch's CPU kernels
    (SIMD paths, BLAS) differ between machines at the ULP level; the largest deviation is reported."""
    if ARGS.no_preserve or not path.exists():
        return
    kept, worst = 0, (0.0, "")
    with np.load(path) as old:
        for k in old.files:
            if k in ARRAYS and old[k].shape == ARRAYS[k].shape and old[k].dtype == ARRAYS[k].dtype:
                a, b = np.asarray(old[k]), ARRAYS[k]
                if np.issubdtype(a.dtype, np.floating) and a.size:
                    dev = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-300))
                    worst = max(worst, (dev, k))
                ARRAYS[k] = a
                kept += 1
    print(f"preserved {kept} committed arrays; largest deviation of the recomputed ones (relative to each array's "
          f"max): {worst[0]:.2e} ({worst[1]})")


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
        gen_dino()
        gen_ibot()
        gen_koleo()
        gen_tico()
        gen_swav()
        gen_msn()
        gen_capi()
        gen_co2()
        gen_wmse()
        gen_vicregl()
        gen_detcon()
        gen_directclr()
        gen_macl()
        gen_mmcr()
        gen_frossl()
        gen_emp_ssl()
    finally:
        tdist.destroy_process_group()
    preserve_existing(out_dir / "golden.npz")
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
