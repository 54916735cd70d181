"""Memory and time of NT-Xent forward + backward against the batch size: the dense path,
the tiled path (``implementation="tiled"``) and, with the oracle venv, lightly's
``NTXentLoss``; plus the ring variant's per-device scratch memory on 8 fake CPU devices.

Every (side, size) runs in its own process, so ``ru_maxrss`` is that size's peak resident
memory (including the runtime's baseline, which the first row shows). Time is one
forward + backward call after compilation (the compile is separate and not timed).

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


def _child(side: str, rows: int, block: int) -> dict:
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
        t = time.perf_counter()
        loss(a, b).backward()
        return {"ms": 1e3 * (time.perf_counter() - t), "baseline_kib": before}
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
    t = time.perf_counter()
    jax.block_until_ready(compiled(a, b))
    return {"ms": 1e3 * (time.perf_counter() - t), "xla_temp_mib": temp / 2**20,
            "baseline_kib": before}


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
    ap.add_argument("--rows", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--dense-max", type=int, default=16384,
                    help="largest row count for the dense path (it needs (2N)² floats)")
    ap.add_argument("--lightly-max", type=int, default=16384)
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
            res = _child(kind, int(args._child[1]), args.block)
            res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps(res))
        return 0

    results = []
    sizes = [int(x) for x in args.rows.split(",")]
    sides = [("tiled", sys.executable, None), ("dense", sys.executable, args.dense_max)]
    if args.lightly_python:
        sides.append(("lightly", args.lightly_python, args.lightly_max))
    print(f"{'side':8} {'rows':>7} {'peak RSS MiB':>13} {'fwd+bwd ms':>11} {'XLA temp MiB':>13}")
    for rows in sizes:
        for side, python, limit in sides:
            if limit is not None and rows > limit:
                continue
            r = run_child(python, [side, str(rows)])
            r.update(side=side, rows=rows)
            results.append(r)
            if "error" in r:
                print(f"{side:8} {rows:7d}  {r['error']}")
            else:
                temp = f"{r['xla_temp_mib']:13.1f}" if "xla_temp_mib" in r else " " * 13
                print(f"{side:8} {rows:7d} {r['peak_rss_mib']:13.0f} {r['ms']:11.0f} {temp}",
                      flush=True)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    p = subprocess.run([sys.executable, __file__, "--_child", "ring", args.ring_rows],
                       capture_output=True, text=True, env=env, cwd=REPO)
    ring = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else []
    print("\n8 fake CPU devices, per-device XLA scratch (MiB) vs local rows:")
    for r in ring:
        print(f"{r['side']:12} {r['local_rows']:6d} {r['xla_temp_mib']:10.1f}")
    results.extend(ring)
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
    ax.axhline(24, color="grey", lw=0.8)
    ax.text(4096, 24.5, "machine RAM (24 GiB): lightly OOM at 32,768 rows", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="rows (2 views), D=128",
           ylabel="peak RSS (GiB), forward + backward", title="NT-Xent memory vs batch")
    ax.legend()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
