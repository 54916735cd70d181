"""CPU benchmark of sslloss_jax against lightly (PyTorch): forward + backward time, compile
time and peak memory per (loss, shape) row. See benchmarks/README.md.

Design: for each row, one fresh worker process per side (``--_worker``) imports its framework,
builds the inputs and the jitted (or eager) forward+backward step, measures the peak RSS of
one call, warms up, and then answers "run one repetition" requests over a pipe. The parent
alternates the two workers (ours, lightly, ours, lightly, ...), so machine noise hits both
sides alike, and reports medians. Only one worker computes at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
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
    lightly: str  # class name in lightly.loss (dotted for submodules)
    kwargs: dict  # hyperparameters, identical on both sides
    kind: str = "pair"  # how inputs are built and passed: see make_inputs / build_*


LOSSES = {
    "ntxent": Loss("ntxent_loss", "NTXentLoss", {"temperature": 0.5}),
    "dcl": Loss("dcl_loss", "DCLLoss", {"temperature": 0.1}),
    "dclw": Loss("dclw_loss", "DCLWLoss", {"temperature": 0.1, "sigma": 0.5}),
    "barlow": Loss("barlow_twins_loss", "BarlowTwinsLoss", {"lambda_param": 5e-3}),
    "vicreg": Loss("vicreg_loss", "VICRegLoss", {}),
    "negcos": Loss("negative_cosine_similarity", "NegativeCosineSimilarity", {}),
    "hypersphere": Loss("hypersphere_loss", "hypersphere_loss.HypersphereLoss", {}),
    "ntxent_bank": Loss("ntxent_memory_bank_loss", "NTXentLoss", {"temperature": 0.5}),
    "tico": Loss("tico_loss", "TiCoLoss", {"beta": 0.9, "rho": 8.0}, kind="tico"),
    "dino": Loss("dino_loss", "DINOLoss", {"teacher_temp": 0.04, "student_temp": 0.1,
                                           "center_momentum": 0.9}, kind="dino"),
    "swav": Loss("swav_loss", "SwaVLoss", {"temperature": 0.1, "sinkhorn_iterations": 3,
                                           "sinkhorn_epsilon": 0.05}, kind="swav"),
    "msn": Loss("msn_loss", "MSNLoss", {"temperature": 0.1, "sinkhorn_iterations": 3,
                                        "regularization_weight": 1.0}, kind="msn"),
}


@dataclasses.dataclass(frozen=True)
class Row:
    loss: str
    batch: int
    dim: int
    bank: int = 0  # memory bank (NT-Xent) or queue (SwaV) rows
    k: int = 0  # prototypes (SwaV, MSN); DINO's K is ``dim``
    # DINO/SwaV: (global/high, local/low) crops; MSN: (1, anchor views - 1)
    crops: tuple[int, int] = (0, 0)

    @property
    def name(self) -> str:
        name = f"{self.loss} b{self.batch} d{self.dim}"
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
]

# Targets on ours/lightly time ratios (lower is better).
GEOMEAN_TARGET, MAX_RATIO_TARGET, BIG_D_SPEEDUP = 0.2, 0.8, 25.0
BIG_D_ROWS = ("barlow b256 d8192", "vicreg b256 d8192")
BUSY_WARNING = 0.1  # CPU fraction used by other processes that makes timings unreliable


def quick_rows(rows: list[Row]) -> list[Row]:
    small = (Row(r.loss, min(r.batch, 32), min(r.dim, 64), min(r.bank, 128), min(r.k, 64),
                 r.crops) for r in rows)
    return list(dict.fromkeys(small))


# --------------------------------------------------------------------------------------------
# Worker side: one process, one side, one row.


def _unit(x):
    import numpy as np

    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_inputs(row: Row) -> dict:
    """The row's float32 inputs, by name; the same arrays feed both sides.

    ``pair``: two correlated views ``x0, x1`` (B, D). ``dino``: ``teacher`` (Vg, B, K) and
    ``student`` (Vg + Vl, B, K) logits. ``swav``: ``crops`` (Vh + Vl, B, K) scores of
    normalized features against normalized prototypes (cosines, as SwaV's), and
    ``queue`` (Vh, Q, K) when the row has a queue. ``msn``: view-major ``anchors``
    (V·B, D), ``targets`` (B, D), ``prototypes`` (K, D).
    """
    import numpy as np

    rng = np.random.default_rng(0)
    kind = LOSSES[row.loss].kind
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    if kind in ("pair", "tico"):
        x0 = normal(row.batch, row.dim)
        return {"x0": x0, "x1": x0 + np.float32(0.5) * normal(row.batch, row.dim)}
    vg, vl = row.crops
    if kind == "dino":
        return {"teacher": normal(vg, row.batch, row.dim),
                "student": normal(vg + vl, row.batch, row.dim)}
    if kind == "swav":
        protos = _unit(normal(row.k, row.dim))
        out = {"crops": _unit(normal(vg + vl, row.batch, row.dim)) @ protos.T}
        if row.bank:
            out["queue"] = _unit(normal(vg, row.bank, row.dim)) @ protos.T
        return out
    if kind == "msn":
        return {"anchors": normal((vg + vl) * row.batch, row.dim),
                "targets": normal(row.batch, row.dim), "prototypes": normal(row.k, row.dim)}
    raise ValueError(kind)


def import_ours(threads: int) -> dict:
    import jax
    import jaxlib

    import sslloss_jax

    x = jax.numpy.ones((512, 512))  # start XLA's thread pool before measuring memory
    jax.block_until_ready(jax.jit(lambda x: jax.numpy.tanh(x @ x).sum())(x))
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "sslloss_jax": sslloss_jax.__version__, "backend": jax.default_backend()}


def ours_step(row: Row, arrays: dict):
    """``(fn, diff, rest, has_aux)``: the loss as ``fn(*diff, *rest)``, differentiated in
    ``diff``. Teachers, targets and queues get no gradient (they need none)."""
    import functools

    import jax
    import jax.numpy as jnp

    import sslloss_jax as S

    spec = LOSSES[row.loss]
    fn = functools.partial(getattr(S, spec.ours), **spec.kwargs)
    a = {k: jnp.asarray(v) for k, v in arrays.items()}
    if spec.kind == "pair":
        rest = (S.init_memory_bank(jax.random.key(0), row.bank, row.dim),) if row.bank else ()
        return fn, (a["x0"], a["x1"]), rest, bool(row.bank)
    if spec.kind == "tico":
        return fn, (a["x0"], a["x1"]), (S.init_tico_state(row.dim),), True
    if spec.kind == "dino":
        loss = lambda student, teacher, state: fn(teacher, student, state)
        return loss, (a["student"],), (a["teacher"], S.init_dino_state(row.dim)), True
    if spec.kind == "swav":
        vh = row.crops[0]
        if row.bank:
            loss = lambda crops, queue: fn(crops[:vh], crops[vh:], queue)
            return loss, (a["crops"],), (a["queue"],), False
        return lambda crops: fn(crops[:vh], crops[vh:]), (a["crops"],), (), False
    if spec.kind == "msn":
        loss = lambda anchors, prototypes, targets: fn(anchors, targets, prototypes)
        return loss, (a["anchors"], a["prototypes"]), (a["targets"],), False
    raise ValueError(spec.kind)


def build_ours(row: Row, arrays: dict) -> tuple[Callable[[], object], dict]:
    import jax

    fn, diff, rest, has_aux = ours_step(row, arrays)
    args = (*diff, *rest)
    step = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(diff))), has_aux=has_aux))
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    info = {"compile_ms": 1e3 * (time.perf_counter() - t0)}
    mem = compiled.memory_analysis()
    if mem is not None and getattr(mem, "temp_size_in_bytes", None) is not None:
        info["xla_temp_mib"] = mem.temp_size_in_bytes / 2**20
    return (lambda: jax.block_until_ready(compiled(*args))), info


def import_lightly(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    if (ORACLE / "lightly_shim.py").is_file():  # lightly.loss needs a torchvision stub here
        sys.path.insert(0, str(ORACLE))
        import lightly_shim

        lightly_shim.import_lightly_loss()
    import lightly
    import lightly.loss.hypersphere_loss  # noqa: F401

    x = torch.ones(512, 512)  # start the OpenMP threads before measuring memory
    torch.tanh(x @ x).sum()
    return {"torch": torch.__version__, "lightly": lightly.__version__,
            "torch_threads": torch.get_num_threads()}


def build_lightly(row: Row, arrays: dict) -> tuple[Callable[[], object], dict]:
    """lightly's module called as its users do; ``.backward()`` into the inputs that get a
    gradient on our side. Stateful modules (DINO's center, TiCo's C) update on every call,
    as ours return their new state."""
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
    criterion = operator.attrgetter(spec.lightly)(lightly.loss)(**kwargs)
    t = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    vg = row.crops[0]
    if spec.kind in ("pair", "tico"):
        leaves = [t["x0"], t["x1"]]
        call = lambda: criterion(t["x0"], t["x1"])
    elif spec.kind == "dino":
        leaves = [t["student"]]
        call = lambda: criterion(list(t["teacher"]), list(t["student"]), epoch=0)
    elif spec.kind == "swav":
        leaves = [t["crops"]]
        queue = list(t["queue"]) if "queue" in t else None
        call = lambda: criterion(list(t["crops"][:vg]), list(t["crops"][vg:]), queue)
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

    return step, {}


SIDES = {"ours": (import_ours, build_ours), "lightly": (import_lightly, build_lightly)}


def reset_peak_rss() -> bool:
    """Resets the peak RSS (VmHWM, and so ru_maxrss) to the current RSS; Linux only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mib_of(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and its peak RSS increase (MiB) over the RSS just before it."""
    reset_peak_rss()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = fn()
    return out, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def time_calls(step: Callable[[], object], n: int) -> float:
    """Mean seconds per call of ``n`` back-to-back calls (one repetition)."""
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def worker(side: str, config: dict) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # protocol channel; stray prints -> stderr
    os.dup2(2, 1)

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > config["threads"]:  # same number of cores for XLA and torch
        os.sched_setaffinity(0, cpus[: config["threads"]])
    sys.path.insert(0, str(REPO))
    import_side, build = SIDES[side]
    try:
        versions = import_side(config["threads"])
    except Exception as err:  # reported to the parent
        send({"error": f"{type(err).__name__}: {err}", "stage": "import"})
        return
    try:
        row = Row(**{**config["row"], "crops": tuple(config["row"]["crops"])})
        arrays = make_inputs(row)
        (step, extra), setup_mib = peak_mib_of(lambda: build(row, arrays))
        _, peak_mib = peak_mib_of(step)  # first call after compilation, fresh process
        once = time_calls(step, 1)  # second call: warm-up, sizes the repetitions
        info = {"versions": versions, **extra, "setup_peak_mib": setup_mib, "peak_mib": peak_mib}
        info["inner"] = max(1, min(config["max_inner"], math.ceil(config["rep_s"] / once)))
    except Exception as err:  # reported to the parent
        send({"error": f"{type(err).__name__}: {err}", "stage": "setup"})
        return
    send(info)
    for _ in sys.stdin:
        send({"s": time_calls(step, info["inner"])})


# --------------------------------------------------------------------------------------------
# Parent side.


class WorkerError(RuntimeError):
    def __init__(self, message: str, stage: str = "run"):
        super().__init__(message)
        self.stage = stage


class Worker:
    """A ``--_worker`` child process for one (side, row); ``rep()`` times one repetition."""

    def __init__(self, python: str, side: str, config: dict):
        self.log = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        try:
            self.proc = subprocess.Popen(
                [python, str(Path(__file__).resolve()), "--_worker", side, json.dumps(config)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                env=env)
        except OSError as err:
            self.log.close()
            raise WorkerError(str(err), "import") from err
        self.info = self._recv()

    def _recv(self) -> dict:
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

    def rep(self) -> float:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self._recv()["s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()
        self.log.close()


def median_time(reps: dict[str, Callable[[], float]], *, budget_s: float, min_reps: int,
                max_reps: int) -> dict[str, dict]:
    """Calls the ``reps`` round-robin (A B A B ...) and returns each one's median and samples.

    Stops after ``max_reps`` rounds, or after ``min_reps`` rounds once some side has spent
    ``budget_s`` seconds. Each rep returns seconds per call.
    """
    samples: dict[str, list[float]] = {k: [] for k in reps}
    spent = dict.fromkeys(reps, 0.0)
    for n in range(1, max_reps + 1):
        for key, rep in reps.items():
            t0 = time.perf_counter()
            samples[key].append(rep())
            spent[key] += time.perf_counter() - t0
        if n >= min_reps and max(spent.values()) >= budget_s:
            break
    return {k: {"median_ms": 1e3 * statistics.median(v), "samples_ms": [1e3 * s for s in v]}
            for k, v in samples.items()}


def bench_row(row: Row, pythons: dict[str, str], args) -> dict[str, dict]:
    """Measures one row on every side in ``pythons``; drops a side whose import fails."""
    config = {"row": dataclasses.asdict(row), "threads": args.threads,
              "rep_s": args.rep_ms / 1e3, "max_inner": args.max_inner}
    workers: dict[str, Worker] = {}
    results: dict[str, dict] = {}
    try:
        for side, python in list(pythons.items()):
            try:
                workers[side] = Worker(python, side, config)
            except WorkerError as err:
                if err.stage == "import":
                    del pythons[side]
                    print(f"{side} not found ({python}): {err}", file=sys.stderr)
                else:
                    results[side] = {"error": str(err)}
                    print(f"{row.name}: {side} failed: {err}", file=sys.stderr)
        timed = median_time({s: w.rep for s, w in workers.items()}, budget_s=args.budget,
                            min_reps=args.min_reps, max_reps=args.max_reps)
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


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def report(results: list[dict], meta: dict, targets: list[dict]) -> str:
    lines = [f"sslloss_jax benchmark {meta['date']}: forward+backward, float32, CPU",
             f"cpu: {meta['cpu']['model']} ({meta['cpu']['cores']} cores), "
             f"{meta['settings']['threads']} threads per side; python {meta['python']}",
             "ours: " + ", ".join(f"{k} {v}" for k, v in meta["ours"].items()),
             "lightly: " + (", ".join(f"{k} {v}" for k, v in meta["lightly"].items())
                            if meta["lightly"] else "not found (only our numbers)"), ""]
    head = ("row", "ours ms", "compile ms", "lightly ms", "ours/lightly", "ours MiB",
            "XLA temp MiB", "lightly MiB", "others CPU")
    table = [head]
    for r in results:
        o, t = r["sides"].get("ours", {}), r["sides"].get("lightly", {})
        table.append((r["name"], fmt(o.get("median_ms"), ".3f"), fmt(o.get("compile_ms"), ".0f"),
                      fmt(t.get("median_ms"), ".3f"), fmt(r["ratio"], ".3f"),
                      fmt(o.get("peak_mib"), ".1f"), fmt(o.get("xla_temp_mib"), ".1f"),
                      fmt(t.get("peak_mib"), ".1f"), fmt(100 * r["others_cpu"], ".0f") + "%"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
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
    model = platform.processor() or platform.machine()
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return {"model": model, "cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform()}


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
    p.add_argument("--lightly-python", help="interpreter with torch + lightly for the lightly "
                   "side (default: this one, if it can import them)")
    p.add_argument("--no-lightly", action="store_true", help="time only sslloss_jax")
    p.add_argument("--threads", type=int, default=2, help="cores/threads per side (default 2)")
    p.add_argument("--budget", type=float, default=3.0,
                   help="stop once a side spent this many seconds (default 3)")
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=30)
    p.add_argument("--rep-ms", type=float, default=50.0,
                   help="fast calls are batched into repetitions of about this long")
    p.add_argument("--max-inner", type=int, default=1000, help="max calls per repetition")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each row, wait up to S seconds for other processes to go idle")
    p.add_argument("--retry-busy", type=int, default=0, metavar="N",
                   help="measure a row again (up to N times) if the machine was busy during it")
    p.add_argument("--list", action="store_true", help="list the selected rows and exit")
    p.add_argument("--_worker", nargs=2, metavar=("SIDE", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.min_reps, args.max_reps, args.budget, args.rep_ms = 1, 2, 0.0, 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        worker(args._worker[0], json.loads(args._worker[1]))
        return 0
    rows = quick_rows(ROWS) if args.quick else ROWS
    if args.rows:
        keys = [k.strip() for k in args.rows.split(",") if k.strip()]
        rows = [r for r in rows if any(k in r.name for k in keys)]
    if args.list or not rows:
        print("\n".join(r.name for r in rows) or "no row matches --rows")
        return 0 if rows else 2
    pythons = {"ours": sys.executable}
    if python := lightly_python(args):
        pythons["lightly"] = python
    results, versions = [], {}
    for i, row in enumerate(rows, 1):
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
        results.append({"name": row.name, **dataclasses.asdict(row), "ratio": ratio(sides),
                        "others_cpu": others_fraction(start),
                        "wall_s": time.perf_counter() - t0, "sides": sides})
        summary = ", ".join(f"{s} {v['median_ms']:.3f} ms" for s, v in sides.items()
                            if "median_ms" in v)
        print(f"[{i}/{len(rows)}] {row.name}: {summary}", file=sys.stderr, flush=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "cpu": cpu_info(),
            "ours": versions.get("ours", {}), "lightly": versions.get("lightly", {}),
            "settings": {k: getattr(args, k) for k in
                         ("threads", "budget", "min_reps", "max_reps", "rep_ms", "quick")}}
    targets = check_targets(results)
    print(report(results, meta, targets))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**meta, "rows": results, "targets": targets}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
