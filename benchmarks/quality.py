"""Learning-quality table: does every loss of the demo actually teach the encoder something?

For each loss in :data:`sslloss_jax.demo.ADAPTERS` (or a chosen subset), one after another
in this process, :func:`sslloss_jax.demo.run` trains the demo's small Flax encoder on the
unlabeled training split of scikit-learn's digits with the same fixed budget (steps, batch,
architecture; the learning rate and the other hyperparameters are the adapter's), and
probes its representation on the held-out split:

- **kNN, few labels** (k=5, cosine, ``labels_per_class`` labels per class, mean of 5 label
  draws): the informative column, compared with the *same* encoder at its random
  initialization and with raw pixels;
- a linear probe (ridge classifier, every label) of the trained encoder.

The margin is trained minus random-init few-label kNN accuracy (mean over seeds). A loss
"beats random init" when the margin is at least :data:`THRESHOLD`; one that does not is
either a bug (sign, stop-gradient, state timing, wrong inputs) or a hyperparameter to
document. Everything runs on CPU.

Run from the repository root (needs the ``demo`` extra)::

    python benchmarks/quality.py                       # every loss, the default budget
    python benchmarks/quality.py --losses ntxent_loss,dino_loss --seeds 0,1
    python benchmarks/quality.py --md results/q.md --json results/q.json
    python benchmarks/quality.py --losses dino_loss --merge results/q.json
    python benchmarks/quality.py --quick               # smoke test: 2 losses, a few steps

``--merge PATH`` reruns the chosen losses, replaces their rows in the JSON report at
``PATH`` (written by an earlier run with the same settings), records them as rerun, and
writes the merged report back to ``PATH`` (and to ``--md``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

THRESHOLD = 0.02  # minimum margin (trained - random init, few-label kNN) to "beat" it
QUICK_LOSSES = ("ntxent_loss", "byol_regression_loss")
METRICS = ("knn_few", "knn_all", "linear")


def run_loss(name: str, *, steps: int, batch_size: int, arch: str, seeds: Sequence[int],
             labels_per_class: int) -> dict[str, Any]:
    """Train and probe one loss for every seed; the per-seed results and their means."""
    from sslloss_jax import demo

    adapter = demo.ADAPTERS[name]
    per_seed = []
    for seed in seeds:
        r = demo.run(name, steps=steps, batch_size=batch_size, out=None, seed=seed, arch=arch,
                     labels_per_class=labels_per_class, progress=False, log=lambda s: None)
        tail = r.losses[-10:]
        per_seed.append({"seed": seed, "trained": r.trained, "random_init": r.random_init,
                         "pixels": r.pixels, "first_loss": r.losses[0],
                         "final_loss": statistics.fmean(tail), "train_seconds": r.train_seconds,
                         "total_seconds": r.total_seconds})
    mean = {who: {m: statistics.fmean([s[who][m] for s in per_seed]) for m in METRICS}
            for who in ("trained", "random_init", "pixels")}
    margin = mean["trained"]["knn_few"] - mean["random_init"]["knn_few"]
    return {"note": adapter.note, "lr": adapter.lr, "seeds": per_seed, "mean": mean,
            "margin": margin, "beats_random_init": margin >= THRESHOLD,
            "train_seconds": sum(s["train_seconds"] for s in per_seed)}


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table with a header stating the settings and threshold."""
    s = report["settings"]
    lpc = s["labels_per_class"]
    seeds = ",".join(map(str, s["seeds"]))
    lines = [
        f"# Learning quality of the demo losses ({report['date'][:10]})",
        "",
        f"`{report['command']}`: {s['arch']} encoder, {s['steps']} steps, batch "
        f"{s['batch_size']}, seed(s) {seeds} (accuracies are means over seeds); "
        f"jax {report['versions']['jax']}, flax {report['versions']['flax']}, optax "
        f"{report['versions']['optax']}, {report['platform']}; total wall time "
        f"{report['total_seconds'] / 60:.1f} min.",
        "",
        f"Held-out accuracy on the digits test split. kNN-{lpc}: k=5 cosine kNN with {lpc} "
        "labels per class (mean of 5 label draws); linear: ridge probe with every label. "
        f"Margin = trained − random init (kNN-{lpc}); a loss beats random init when the "
        f"margin is ≥ {report['threshold']:.2f}.",
    ]
    if report.get("rerun"):
        lines += ["", "Rerun after adapter changes and merged: "
                  + ", ".join(f"`{k}` ({v})" for k, v in sorted(report["rerun"].items())) + "."]
    lines += [
        "",
        f"| loss | note | kNN-{lpc} trained | random init | raw pixels | margin | "
        "linear trained | train s | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in report["results"].items():
        m = r["mean"]
        verdict = "beats random init" if r["beats_random_init"] else "**DOES NOT**"
        lines.append(
            f"| `{name}` | {r['note']} | {m['trained']['knn_few']:.3f} | "
            f"{m['random_init']['knn_few']:.3f} | {m['pixels']['knn_few']:.3f} | "
            f"{r['margin']:+.3f} | {m['trained']['linear']:.3f} | {r['train_seconds']:.0f} | "
            f"{verdict} |")
    failing = [k for k, r in report["results"].items() if not r["beats_random_init"]]
    lines += ["", f"{len(report['results']) - len(failing)} of {len(report['results'])} "
              "losses beat random init" + (f"; not: {', '.join(failing)}." if failing else ".")]
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    import flax
    import jax
    import optax
    import sklearn

    return {"python": platform.python_version(), "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__,
            "sklearn": sklearn.__version__}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/quality.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--losses", help="comma-separated loss names (default: every adapter)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--arch", choices=["cnn", "mlp"], default="cnn",
                   help="encoder (default cnn)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--labels-per-class", type=int, default=5,
                   help="labels per class of the few-label kNN probe (default 5)")
    p.add_argument("--json", type=Path, help="write the full report as JSON")
    p.add_argument("--md", type=Path, help="write the markdown table")
    p.add_argument("--merge", type=Path,
                   help="rerun the chosen losses into this existing JSON report")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {', '.join(QUICK_LOSSES)} (unless --losses), 3 steps, "
                        "batch 32, mlp encoder")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line; returns the report (the dict written as JSON)."""
    from tqdm.auto import tqdm

    from sslloss_jax import demo

    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.arch = 3, 32, "mlp"
    try:
        names = ([demo.resolve_loss(n.strip()) for n in args.losses.split(",")] if args.losses
                 else list(QUICK_LOSSES) if args.quick else list(demo.ADAPTERS))
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as e:
        parser.error(str(e))
    settings = {"steps": args.steps, "batch_size": args.batch_size, "arch": args.arch,
                "seeds": seeds, "labels_per_class": args.labels_per_class}
    base = None
    if args.merge:
        base = json.loads(args.merge.read_text())
        if base["settings"] != settings:
            parser.error(f"--merge: {args.merge} has settings {base['settings']}, "
                         f"this run {settings}")

    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    bar = tqdm(names, desc="losses", unit="loss")
    for name in bar:
        bar.set_postfix_str(name)
        results[name] = r = run_loss(name, **settings)
        bar.write(f"{name:38s} trained {r['mean']['trained']['knn_few']:.3f}  random init "
                  f"{r['mean']['random_init']['knn_few']:.3f}  margin {r['margin']:+.3f}  "
                  f"{r['train_seconds']:.0f} s")
    bar.close()
    elapsed = time.perf_counter() - t0
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None
                                                         else argv)
    if base is None:
        report = {"date": now, "command": command.strip(), "versions": _versions(),
                  "platform": platform.platform(), "threshold": THRESHOLD,
                  "settings": settings, "total_seconds": elapsed, "results": results,
                  "rerun": {}}
    else:
        report = base
        report["results"].update(results)
        report["rerun"].update({name: now for name in results})
        report["rerun_seconds"] = report.get("rerun_seconds", 0.0) + elapsed
    if args.merge:
        args.merge.write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    markdown = render_markdown(report)
    if args.md:
        args.md.write_text(markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
