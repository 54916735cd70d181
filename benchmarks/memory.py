"""Memory and time of NT-Xent forward + backward against the batch size: the dense path,
the tiled path (``implementation="tiled"``) and, with the oracle venv, lightly's
``NTXentLoss``; plus the ring variant's per-device scratch memory on 8 fake CPU devices.

Every (side, size) runs in its own process, so ``ru_maxrss`` is that size's peak resident
memory (including the runtime's baseline, which the first row shows). Time is the median of
up to ``--reps`` forward + backward calls after compilation and one warm-up call (fewer
when one call takes longer than ``--budget`` seconds; the count is printed). lightly above
``--lightly-max`` rows runs under an address-space limit of ``--lightly-cap-gib`` so that
running out of memory is a clean allocation error in that process, never the kernel's
OOM killer.

    python benchmarks/memory.py --json benchmarks/results/<date>-memory.json \
        --png benchmarks/results/<date>-memory.png
    # lightly side by side (the oracle venv has torch + lightly):
    python benchmarks/memory.py --lightly-python $HOME/.cache/sslloss-oracle/venv/bin/python

Rows are the 2N rows of ``[out0; out1]`` (N pairs), D = 128, float32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIM = 128


def _timed(call, reps: int, budget: float) -> dict:
    """Warm up once (unless that call alone exceeds the budget), then time up to ``reps``."""
    t = time.perf_counter()
    call()
    first = time.perf_counter() - t
    times = [first] if first > budget else []
    while len(times) < reps and sum(times) < budget:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"ms": 1e3 * times[len(times) // 2], "ms_min": 1e3 * times[0], "reps": len(times)}


def _child(side: str, rows: int, block: int, reps: int, budget: float,
           cap_gib: float | None) -> dict:
    n = rows // 2
    if side == "lightly":
        import torch

        oracle = REPO.parent / "shared" / "oracle"
        if (oracle / "lightly_shim.py").is_file():  # lightly.loss needs a torchvision stub
            sys.path.insert(0, str(oracle))
            import lightly_shim

            lightly_shim.import_lightly_loss()
        from lightly.loss import NTXentLoss

        torch.set_num_threads(os.cpu_count() or 1)
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, DIM, generator=g, requires_grad=True)
        b = torch.randn(n, DIM, generator=g, requires_grad=True)
        loss = NTXentLoss(temperature=0.5)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if cap_gib is not None:
            cap = int(cap_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        return {**_timed(lambda: loss(a, b).backward(), reps, budget),
                "baseline_kib": before}
    import jax
    import jax.numpy as jnp

    import sslloss_jax as S

    if side == "ring":
        raise ValueError(side)
    impl = "tiled" if side == "tiled" else "dense"
    key0, key1 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key0, (n, DIM), jnp.float32)
    b = jax.random.normal(key1, (n, DIM), jnp.float32)
    f = jax.jit(jax.value_and_grad(
        lambda a, b: S.ntxent_loss(a, b, implementation=impl, block_size=block),
        argnums=(0, 1)))
    compiled = f.lower(a, b).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready((a, b))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**_timed(lambda: jax.block_until_ready(compiled(a, b)), reps, budget),
            "xla_temp_mib": temp / 2**20, "baseline_kib": before}


def _ring_child(local_rows: list[int], devices: int, block: int) -> list[dict]:
    """Per-device XLA scratch of the ring (tiled) and all_gather (dense) programs."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import sslloss_jax as S

    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    out = []
    for rows in local_rows:
        n = rows // 2 * devices
        a = jnp.zeros((n, DIM), jnp.float32)
        for impl in ("tiled", "dense"):
            def step(a, b, impl=impl):
                return jax.grad(lambda a, b: S.ntxent_loss(
                    a, b, implementation=impl, block_size=block, axis_name="data"),
                    argnums=(0, 1))(a, b)

            fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("data"), P("data")),
                                       out_specs=(P("data"), P("data"))))
            temp = fn.lower(a, a).compile().memory_analysis().temp_size_in_bytes
            out.append({"side": f"ring-{impl}", "local_rows": rows, "devices": devices,
                        "xla_temp_mib": temp / 2**20})
    return out


def run_child(python: str, args: list[str], env=None, timeout=1800) -> dict:
    cmd = [python, __file__, "--_child", *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                       cwd=REPO)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"rc={p.returncode}: {tail[0][:200]}", "wall_s": wall}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1024,2048,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--dense-max", type=int, default=16384,
                    help="largest row count for the dense path (it needs (2N)² floats)")
    ap.add_argument("--sides", default="tiled,dense,lightly,ring",
                    help="comma-separated subset of tiled, dense, lightly, ring")
    ap.add_argument("--lightly-max", type=int, default=32768,
                    help="largest row count lightly runs without a memory cap")
    ap.add_argument("--lightly-oom-rows", type=int, default=65536,
                    help="one more lightly size, run under --lightly-cap-gib (0: skip)")
    ap.add_argument("--lightly-cap-gib", type=float, default=20.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds of timed calls per (side, size) before stopping early")
    ap.add_argument("--txt", default=None, help="also write the printed table here")
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--lightly-python", default=None)
    ap.add_argument("--ring-rows", default="512,1024,2048,4096")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--_child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child is not None:
        kind = args._child[0]
        if kind == "ring":
            rows = [int(x) for x in args._child[1].split(",")]
            res = _ring_child(rows, 8, args.block)
            print(json.dumps(res))
        else:
            cap = float(args._child[2]) if len(args._child) > 2 else None
            res = _child(kind, int(args._child[1]), args.block, args.reps, args.budget, cap)
            res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps(res))
        return 0

    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    import jax  # versions only; the measurements run in child processes

    say(f"# NT-Xent forward + backward, D={DIM}, float32, block {args.block}; "
        f"{time.strftime('%Y-%m-%d')}, jax {jax.__version__}, {os.cpu_count()} CPUs")
    results = []
    sizes = [int(x) for x in args.rows.split(",")]
    chosen = set(args.sides.split(","))
    sides = [("tiled", sys.executable, None), ("dense", sys.executable, args.dense_max)]
    if args.lightly_python:
        sides.append(("lightly", args.lightly_python, args.lightly_max))
    sides = [side for side in sides if side[0] in chosen]
    timing = ["--reps", str(args.reps), "--budget", str(args.budget)]
    say(f"{'side':8} {'rows':>7} {'peak RSS MiB':>13} {'median ms':>10} {'min ms':>9} "
        f"{'reps':>4} {'XLA temp MiB':>13}")
    for rows in sizes:
        for side, python, limit in sides:
            cap = None
            if limit is not None and rows > limit:
                if side != "lightly" or rows != args.lightly_oom_rows:
                    continue
                cap = args.lightly_cap_gib
            extra = [] if cap is None else [str(cap)]
            r = run_child(python, [side, str(rows), *extra] + timing)
            r.update(side=side, rows=rows, cap_gib=cap)
            results.append(r)
            if "error" in r:
                where = f" (address space capped at {cap:g} GiB)" if cap else ""
                say(f"{side:8} {rows:7d}  failed{where}: {r['error']}")
            else:
                temp = f"{r['xla_temp_mib']:13.1f}" if "xla_temp_mib" in r else " " * 13
                say(f"{side:8} {rows:7d} {r['peak_rss_mib']:13.0f} {r['ms']:10.0f} "
                    f"{r['ms_min']:9.0f} {r['reps']:4d} {temp}")
    if "ring" in chosen:
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
        p = subprocess.run([sys.executable, __file__, "--_child", "ring", args.ring_rows],
                           capture_output=True, text=True, env=env, cwd=REPO)
        if p.returncode != 0:
            say(f"ring failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
        ring = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else []
        say("")
        say("8 fake CPU devices, per-device XLA scratch (MiB) vs local rows:")
        for r in ring:
            say(f"{r['side']:12} {r['local_rows']:6d} {r['xla_temp_mib']:10.1f}")
        results.extend(ring)
    if args.txt:
        Path(args.txt).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.png:
        _plot(results, args.png)
    return 0


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for side, style in (("tiled", "o-"), ("dense", "s--"), ("lightly", "^:")):
        pts = [(r["rows"], r["peak_rss_mib"] / 1024) for r in results
               if r.get("side") == side and "peak_rss_mib" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label={"tiled": "sslloss_jax tiled",
                    "dense": "sslloss_jax dense", "lightly": "lightly NTXentLoss"}[side])
    for r in results:
        if r.get("side") == "lightly" and "error" in r and r.get("cap_gib"):
            ax.plot([r["rows"]], [r["cap_gib"]], "rx", ms=9,
                    label=f"lightly out of memory (capped at {r['cap_gib']:g} GiB)")
    ax.axhline(24, color="grey", lw=0.8)
    ax.text(sorted(r["rows"] for r in results if "rows" in r)[0], 19,
            "machine RAM (24 GiB)", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="rows (2 views), D=128",
           ylabel="peak RSS (GiB), forward + backward", title="NT-Xent memory vs batch")
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.9), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
