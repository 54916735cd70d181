"""Float64 golden fixtures for the seed-library variants: fovi's ``SimCLRLoss`` with
``pairs_per_sample`` = 1, 2, 3, nidl's ``InfoNCE`` and ``YAwareInfoNCE`` (every kernel,
scalar and vector bandwidths, ``labels=None``) and ``F.cross_entropy(label_smoothing=...)``
(what quadra's ``IDMMLoss`` calls; quadra itself is not installable).

Run from the repository root with the oracle venv (see ../shared/oracle/README.md):

    PY=$HOME/.cache/sslloss-oracle/venv/bin/python
    $PY tests/golden/make_golden_seeds.py [--oracle-dir DIR] [--out-dir DIR]

Writes ``golden_seeds.npz`` and ``cases_seeds.json`` next to this file, in the record
format of ``make_golden.py`` (whose helpers it imports). Deterministic: every input comes
from its own seeded ``np.random.RandomState`` (no torch draws). Integer labels are stored
as float64 arrays (cast them back with ``astype(int)``); metadata labels get no gradient.
Multivariate y-Aware metadata lie on a dyadic grid, so scikit-learn's
``‖a‖² + ‖b‖² − 2ab`` distances are exact there (otherwise equal labels can come out
~1e-8 apart, which the linear and exponential kernels see at first order).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_golden as mg  # noqa: E402  (parses the same --oracle-dir/--out-dir arguments)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

fovi_losses = mg.fovi_losses
nidl_losses = mg.nidl_losses
SEED0 = 47000


def gen_fovi_simclr() -> None:
    seed = SEED0
    for (B, P, D, tau) in [(3, 1, 5, 0.5), (4, 2, 6, 0.5), (3, 2, 4, 0.1), (2, 3, 5, 0.3),
                           (4, 3, 3, 1.0)]:
        inp = {"z_i": mg.randn(seed, (B * P, D)), "z_j": mg.randn(seed + 1, (B * P, D))}
        seed += 2
        mod = fovi_losses.SimCLRLoss(B, 1, "cpu", tau, P)

        def fn(z_i, z_j, mod=mod):
            num_sim, num_entropy = mod(z_i, z_j)
            return num_sim + num_entropy, {"num_sim": num_sim.detach(),
                                           "num_entropy": num_entropy.detach()}

        mg.add_case(
            f"fovi_simclr/fovi/b{B}_p{P}_d{D}_t{tau:g}", "fovi_simclr", "fovi",
            f"sum(fovi SimCLRLoss(batch_size={B}, world_size=1, gpu='cpu', temperature={tau:g}, "
            f"pairs_per_sample={P})(z_i, z_j))",
            {"pairs_per_sample": P, "temperature": tau}, inp, fn, ["z_i", "z_j"],
            notes="z_i/z_j are sample-major: rows n*P..n*P+P-1 are the P pairs of image n. "
            "fovi returns (num_sim, num_entropy); the loss is their sum.",
        )


def gen_infonce() -> None:
    seed = SEED0 + 100
    for (B, D, tau) in [(5, 4, 0.1), (8, 6, 0.5), (2, 3, 0.2)]:
        inp = {"z1": mg.randn(seed, (B, D)), "z2": mg.randn(seed + 1, (B, D))}
        seed += 2
        mod = nidl_losses.InfoNCE(temperature=tau)
        mg.add_case(
            f"infonce/nidl/b{B}_d{D}_t{tau:g}", "infonce", "nidl",
            f"nidl InfoNCE(temperature={tau:g})(z1, z2)", {"temperature": tau}, inp,
            lambda z1, z2, mod=mod: mod(z1, z2), ["z1", "z2"],
            notes="nidl masks the self-similarity with -9e15 (exactly NT-Xent in float64).",
        )


def gen_y_aware() -> None:
    seed = SEED0 + 200
    B, D = 6, 5
    cases = []
    for kernel in ("gaussian", "epanechnikov", "exponential", "linear", "cosine"):
        cases.append((kernel, 1.0, "uniform1d"))
    cases += [("gaussian", 2.0, "uniform1d"), ("linear", 0.5, "uniform1d"),
              ("gaussian", [1.0, 4.0], "grid2d"), ("epanechnikov", [4.0, 16.0], "grid2d"),
              ("gaussian", 1.0, "none")]
    for ci, (kernel, bw, ltype) in enumerate(cases):
        inp = {"z1": mg.randn(seed + 3 * ci, (B, D)), "z2": mg.randn(seed + 3 * ci + 1, (B, D))}
        rs = np.random.RandomState(seed + 3 * ci + 2)
        if ltype == "uniform1d":
            inp["labels"] = rs.uniform(0.0, 3.0, B)
        elif ltype == "grid2d":  # dyadic values: exact squared distances in scikit-learn
            inp["labels"] = rs.randint(0, 12, (B, 2)).astype(np.float64) / 4.0
        mod = nidl_losses.YAwareInfoNCE(kernel=kernel, bandwidth=bw, temperature=0.1)

        def fn(z1, z2, labels=None, mod=mod):
            return mod(z1, z2, labels)

        bw_name = "x".join(f"{v:g}" for v in bw) if isinstance(bw, list) else f"{bw:g}"
        mg.add_case(
            f"y_aware_infonce/nidl/{kernel}_bw{bw_name}_{ltype}", "y_aware_infonce", "nidl",
            f"nidl YAwareInfoNCE(kernel={kernel!r}, bandwidth={bw!r}, temperature=0.1)"
            f"(z1, z2, {'labels' if ltype != 'none' else 'None'})",
            {"kernel": kernel, "bandwidth": bw, "temperature": 0.1}, inp, fn, ["z1", "z2"],
            notes="labels (metadata) are detached by nidl; weights normalized by the column sums "
            "(nidl's `weights /= weights.sum(axis=1)`).",
        )


def gen_idmm() -> None:
    seed = SEED0 + 300
    for (B, K, eps) in [(6, 10, 0.1), (5, 5, 0.0), (7, 4, 0.5), (4, 6, 1.0)]:
        rs = np.random.RandomState(seed)
        inp = {"p": 3.0 * mg.randn(seed + 1, (B, K)),
               "y": rs.randint(0, K, B).astype(np.float64)}
        seed += 2
        mg.add_case(
            f"idmm/torch/b{B}_k{K}_s{eps:g}", "idmm", "torch",
            f"F.cross_entropy(p, y.long(), label_smoothing={eps:g}) (quadra IDMMLoss(smoothing))",
            {"smoothing": eps}, inp,
            lambda p, y, eps=eps: F.cross_entropy(p, y.detach().long(), label_smoothing=eps),
            ["p"], notes="y holds integer class ids stored as float64.",
        )


def main() -> None:
    t0 = time.time()
    out_dir = Path(mg.ARGS.out_dir)
    torch.set_num_threads(2)
    gen_fovi_simclr()
    gen_infonce()
    gen_y_aware()
    gen_idmm()
    names = [c["case"] for c in mg.CASES]
    assert len(names) == len(set(names))
    for c in mg.CASES:
        for k in c["inputs"] + [f"grad_{g}" for g in c["grads"]] + c["outputs"]:
            a = mg.ARRAYS[f"{c['case']}/{k}"]
            assert np.all(np.isfinite(a)) and a.dtype == np.float64, (c["case"], k)
    np.savez_compressed(out_dir / "golden_seeds.npz", **mg.ARRAYS)
    (out_dir / "cases_seeds.json").write_text(json.dumps(mg.CASES, indent=1) + "\n")
    size = sum((out_dir / f).stat().st_size for f in ("golden_seeds.npz", "cases_seeds.json"))
    print(f"skipped: {mg.SKIPPED}")
    print(f"wrote {len(mg.CASES)} cases, {len(mg.ARRAYS)} arrays, {size / 1024:.1f} KiB "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
