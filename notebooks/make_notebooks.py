"""Generate the notebooks of this folder (stored without outputs; CI executes them).

Run ``python notebooks/make_notebooks.py`` after editing a cell below; the ``.ipynb``
files are build products of this script, so review the notebooks here, as code.
``tests/test_notebooks.py`` executes each one top to bottom with nbclient.
"""

from __future__ import annotations

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).parent

SETUP = """\
import os
os.environ.setdefault("JAX_PLATFORMS", "cpu")
%matplotlib inline
import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
import sslloss_jax as ssl
from sslloss_jax import demo   # digits, augmentations and probes of `python -m sslloss_jax.demo`"""

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

# ----------------------------------------------------------------------------- 01
NOTEBOOKS["01_quickstart"] = [
    ("md", """\
# 01 · Quickstart: SimCLR and VICReg with Flax NNX and optax

Self-supervised training of a small NNX encoder on scikit-learn's bundled digits (8×8
images, no download), with the NNX loss modules of `sslloss_jax.nnx` (thin wrappers of the
pure functions). The labels are only used by the kNN probe at the end. Needs
`pip install -e ".[demo]"`."""),
    ("code", SETUP + """
from flax import nnx
import sslloss_jax.nnx as snnx

x_tr, x_te, y_tr, y_te = demo.load_data()
x_tr.shape, x_te.shape"""),
    ("code", """\
fig, axes = plt.subplots(2, 8, figsize=(10, 2.6))
views = demo.augment(jax.random.key(0), jnp.asarray(x_tr[:8]))
for i in range(8):
    axes[0, i].imshow(x_tr[i], cmap="gray_r"); axes[1, i].imshow(views[i], cmap="gray_r")
    axes[0, i].axis("off"); axes[1, i].axis("off")
axes[0, 0].set_title("images", loc="left"); axes[1, 0].set_title("augmented views", loc="left")
plt.show()"""),
    ("md", """\
An NNX encoder (an MLP with a projection head), an `nnx.Optimizer` and the loss module. The
train step is written once and jitted with `nnx.jit`; the loss module is a plain argument."""),
    ("code", """\
class Encoder(nnx.Module):
    def __init__(self, rngs):
        self.backbone = nnx.Sequential(nnx.Linear(64, 256, rngs=rngs), nnx.relu,
                                       nnx.Linear(256, 128, rngs=rngs))
        self.head = nnx.Sequential(nnx.Linear(128, 256, rngs=rngs), nnx.relu,
                                   nnx.Linear(256, 64, rngs=rngs))

    def __call__(self, x):
        h = self.backbone(x.reshape(x.shape[0], -1))
        return h, self.head(h)


@nnx.jit
def train_step(model, optimizer, loss_fn, images, key):
    k0, k1 = jax.random.split(key)
    x0, x1 = demo.augment(k0, images), demo.augment(k1, images)

    def objective(model):
        return loss_fn(model(x0)[1], model(x1)[1])

    loss, grads = nnx.value_and_grad(objective)(model)
    optimizer.update(model, grads)
    return loss


def train(loss_fn, steps=150, batch=256, seed=0):
    model = Encoder(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(2e-3), wrt=nnx.Param)
    before = np.asarray(model(jnp.asarray(x_tr))[0]), np.asarray(model(jnp.asarray(x_te))[0])
    rng, key, losses = np.random.default_rng(seed), jax.random.key(seed), []
    for _ in range(steps):
        key, sub = jax.random.split(key)
        idx = rng.choice(len(x_tr), batch, replace=False)
        losses.append(float(train_step(model, optimizer, loss_fn, jnp.asarray(x_tr[idx]), sub)))
    after = np.asarray(model(jnp.asarray(x_tr))[0]), np.asarray(model(jnp.asarray(x_te))[0])
    return losses, before, after"""),
    ("code", """\
results = {}
for name, loss_fn in [("SimCLR (NTXentLoss)", snnx.NTXentLoss(temperature=0.2)),
                      ("VICReg (VICRegLoss)", snnx.VICRegLoss())]:
    losses, before, after = train(loss_fn)
    acc0 = demo.probe(before[0], y_tr, before[1], y_te, labels_per_class=5)
    acc1 = demo.probe(after[0], y_tr, after[1], y_te, labels_per_class=5)
    results[name] = losses
    print(f"{name:22s} kNN (5 labels/class): random init {acc0['knn_few']:.3f} -> "
          f"trained {acc1['knn_few']:.3f};  kNN (all labels) {acc0['knn_all']:.3f} -> "
          f"{acc1['knn_all']:.3f}")"""),
    ("code", """\
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for ax, (name, losses) in zip(axes, results.items()):
    ax.plot(losses); ax.set(title=name, xlabel="step", ylabel="loss")
plt.show()"""),
    ("md", """\
The same with the pure functions: `ssl.ntxent_loss(z0, z1, temperature=0.2)` inside any
`jax.jit`-ed step. For a full run with probes and a PNG: `python -m sslloss_jax.demo`."""),
]

# ----------------------------------------------------------------------------- 02
NOTEBOOKS["02_stateful"] = [
    ("md", """\
# 02 · Stateful losses: DINO, MoCo's memory bank, SwaV's queue

The state that PyTorch keeps in module buffers is an explicit `NamedTuple` here: built by
an `init_*` function, passed to the loss, returned updated. Per-step hyperparameters (the
DINO teacher temperature) and switches (SwaV's queue) are traced arrays, so one compiled
step serves the whole run."""),
    ("code", SETUP + """
x_tr, _, _, _ = demo.load_data()
images = jnp.asarray(x_tr[:128])
key = jax.random.key(0)
W = jax.random.normal(key, (64, 32)) / 8.0          # a linear "encoder" keeps it short
encode = lambda w, x: x.reshape(x.shape[0], -1) @ w"""),
    ("md", """\
## DINO: the center and the traced teacher-temperature schedule

`dino_teacher_temperature(epoch, ...)` is a jnp function of a traced epoch: the schedule
lives inside the jitted step and does not retrace."""),
    ("code", """\
steps_per_epoch = 2
sched = lambda step: ssl.dino_teacher_temperature(
    step / steps_per_epoch, warmup_teacher_temp=0.04, teacher_temp=0.07,
    warmup_teacher_temp_epochs=10)

@jax.jit
def dino_step(w, state, step, key):
    crops = [demo.augment(k, images, local=i >= 2) for i, k in enumerate(jax.random.split(key, 4))]
    teacher = [jax.lax.stop_gradient(encode(w, c)) for c in crops[:2]]
    def objective(w):
        return ssl.dino_loss(teacher, [encode(w, c) for c in crops], state,
                             teacher_temp=sched(step))
    (loss, state), g = jax.value_and_grad(objective, has_aux=True)(w)
    return w - 0.05 * g, state, loss

w, state = W, ssl.init_dino_state(32)
temps, centers, losses = [], [], []
for step in range(40):
    w, state, loss = dino_step(w, state, jnp.asarray(step, jnp.float32), jax.random.key(step))
    temps.append(float(sched(step))); centers.append(float(jnp.linalg.norm(state.center)))
    losses.append(float(loss))
print("compilations of dino_step:", dino_step._cache_size())
fig, axes = plt.subplots(1, 3, figsize=(12, 3))
for ax, y, t in zip(axes, [temps, centers, losses],
                    ["teacher temperature", "‖center‖", "DINO loss"]):
    ax.plot(y); ax.set(title=t, xlabel="step")
plt.show()"""),
    ("md", """\
## MoCo: a memory bank of negatives (read before, enqueued after)"""),
    ("code", """\
bank = ssl.init_memory_bank(jax.random.key(1), size=320, dim=32)

@jax.jit
def moco_step(w, w_key, bank, key):
    k0, k1 = jax.random.split(key)
    keys = jax.lax.stop_gradient(encode(w_key, demo.augment(k1, images)))
    def objective(w):
        return ssl.ntxent_memory_bank_loss(encode(w, demo.augment(k0, images)), keys, bank,
                                           temperature=0.2)
    (loss, bank), g = jax.value_and_grad(objective, has_aux=True)(w)
    w = w - 0.05 * g
    w_key = optax.incremental_update(w, w_key, step_size=0.01)   # EMA key encoder
    return w, w_key, bank, loss

w, w_key = W, W
for step in range(6):
    old = bank.bank
    w, w_key, bank, loss = moco_step(w, w_key, bank, jax.random.key(step))
    changed = int(jnp.sum(jnp.any(old != bank.bank, axis=1)))
    print(f"step {step}: loss {float(loss):.3f}  ptr {int(bank.ptr):3d}  "
          f"rows replaced {changed}")"""),
    ("md", """\
## SwaV: a queue of past features switched on at a step

`queue_valid` is a traced boolean: before `start_step` (or while the queue is not yet full)
the queue is ignored, afterwards its scores join the Sinkhorn assignment. Same compiled
step."""),
    ("code", """\
start_step = 4
queue = ssl.init_swav_queue(n_crops=2, size=256, dim=32)
protos = jax.random.normal(jax.random.key(2), (10, 32))
norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)

@jax.jit
def swav_step(w, queue, step, key):
    k = jax.random.split(key, 4)
    crops = [demo.augment(k[i], images, local=i >= 2) for i in range(4)]
    valid = (step >= start_step) & (queue.filled == queue.features.shape[1])
    def objective(w):
        feats = [norm(encode(w, c)) for c in crops]
        scores = lambda f: f @ norm(protos).T
        loss = ssl.swav_loss([scores(f) for f in feats[:2]], [scores(f) for f in feats[2:]],
                             scores(queue.features), queue_valid=valid)
        return loss, feats[:2]
    (loss, high), g = jax.value_and_grad(objective, has_aux=True)(w)
    queue = ssl.swav_queue_update(queue, jax.lax.stop_gradient(high))
    return w - 0.05 * g, queue, loss, valid

w = W
for step in range(8):
    w, queue, loss, valid = swav_step(w, queue, jnp.asarray(step), jax.random.key(step))
    print(f"step {step}: loss {float(loss):.3f}  queue filled {int(queue.filled):3d}/256  "
          f"queue used: {bool(valid)}")
print("compilations of swav_step:", swav_step._cache_size())"""),
]

# ----------------------------------------------------------------------------- 03
NOTEBOOKS["03_distributed"] = [
    ("md", """\
# 03 · Distributed-exact: `shard_map` on 8 (fake CPU) devices

With `axis_name`, each device passes its shard of the batch and gets the loss, the
gradients and the new state of **one device holding the global batch**. The fake devices
must be requested before JAX starts, so the first cell sets `XLA_FLAGS` before importing
jax (restart the kernel if jax was already imported)."""),
    ("code", """\
import os
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
import functools
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
import sslloss_jax as ssl
print(jax.devices())
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))"""),
    ("code", """\
rng = np.random.default_rng(0)
B, D_IN, D = 64, 16, 32                       # global batch 64 = 8 devices x 8
w = jnp.asarray(rng.standard_normal((D_IN, D)) / 4, jnp.float32)
x0 = jnp.asarray(rng.standard_normal((B, D_IN)), jnp.float32)
x1 = x0 + 0.3 * jnp.asarray(rng.standard_normal((B, D_IN)), jnp.float32)
x2 = x0 + 0.3 * jnp.asarray(rng.standard_normal((B, D_IN)), jnp.float32)
bank = ssl.init_memory_bank(jax.random.key(0), 96, D)
dino = ssl.init_dino_state(D)

def objective(w, x0, x1, x2, bank, dino, axis_name=None):
    z0, z1, z2 = x0 @ w, x1 @ w, x2 @ w
    l_ntx = ssl.ntxent_loss(z0, z1, temperature=0.2, axis_name=axis_name)
    l_vic = ssl.vicreg_loss(z0, z1, axis_name=axis_name)
    l_moco, bank = ssl.ntxent_memory_bank_loss(z0, jax.lax.stop_gradient(z1), bank,
                                               temperature=0.2, axis_name=axis_name)
    l_dino, dino = ssl.dino_loss([jax.lax.stop_gradient(z0), jax.lax.stop_gradient(z1)],
                                 [z0, z1, z2], dino, axis_name=axis_name)
    losses = jnp.stack([l_ntx, l_vic, l_moco, l_dino])
    return losses.sum(), (losses, bank, dino)

grad_fn = jax.value_and_grad(objective, has_aux=True)
one = jax.jit(grad_fn)(w, x0, x1, x2, bank, dino)    # one device, the global batch

@jax.jit
@functools.partial(jax.shard_map, mesh=mesh,
                   in_specs=(P(), P("data"), P("data"), P("data"), P(), P()),
                   out_specs=((P(), (P(), P(), P())), P()))
def sharded(w, x0, x1, x2, bank, dino):
    # jax.grad inside: the gradient of the replicated w is psum-ed by shard_map itself
    return grad_fn(w, x0, x1, x2, bank, dino, axis_name="data")

eight = sharded(w, x0, x1, x2, bank, dino)
print("per-device batch:", B // 8)"""),
    ("code", """\
(total1, (losses1, bank1, dino1)), g1 = one
(total8, (losses8, bank8, dino8)), g8 = eight
rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
for name, a, b in [("losses (ntxent, vicreg, moco, dino)", losses1, losses8),
                   ("grad of w", g1, g8), ("memory bank", bank1.bank, bank8.bank),
                   ("bank ptr", bank1.ptr, bank8.ptr), ("DINO center", dino1.center, dino8.center)]:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    print(f"{name:38s} max rel. difference {rel(a, b):.1e}")
print("1 device:", np.round(np.asarray(losses1), 5))
print("8 devices:", np.round(np.asarray(losses8), 5))
np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
np.testing.assert_allclose(g1, g8, rtol=1e-4, atol=1e-6)
np.testing.assert_allclose(bank1.bank, bank8.bank, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(dino1.center, dino8.center, rtol=1e-5, atol=1e-7)

%matplotlib inline
import matplotlib.pyplot as plt
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
axes[0].scatter(np.ravel(g1), np.ravel(g8), s=4)
axes[0].set(title="gradient of w", xlabel="1 device, global batch", ylabel="8 devices, shards")
axes[1].scatter(np.ravel(bank1.bank), np.ravel(bank8.bank), s=4)
axes[1].set(title="memory bank after the step", xlabel="1 device", ylabel="8 devices")
plt.tight_layout(); plt.show()"""),
    ("md", """\
The naive alternative, the local loss of each shard followed by `pmean`, is a different
function (its negatives are only the 8 local samples):"""),
    ("code", """\
@jax.jit
@functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                   out_specs=P())
def local_then_pmean(w, x0, x1):
    return jax.lax.pmean(ssl.ntxent_loss(x0 @ w, x1 @ w, temperature=0.2), "data")

print("global NT-Xent:", float(losses1[0]),
      " local + pmean:", float(local_then_pmean(w, x0, x1)))"""),
]

# ----------------------------------------------------------------------------- 04
NOTEBOOKS["04_large_batch"] = [
    ("md", """\
# 04 · Memory of the contrastive loss vs batch size: dense and tiled

`ntxent_loss(..., implementation="dense")` builds the full `2N × 2N` similarity matrix, so
the memory of a forward + backward pass grows **quadratically** with the batch;
`implementation="tiled"` streams `block_size × block_size` tiles through an online
logsumexp (forward, and a custom VJP that recomputes them backward), so it grows
**linearly**. We measure both without running anything, from XLA's own accounting of the
compiled program (`jax.jit(...).lower(...).compile().memory_analysis()`)."""),
    ("code", SETUP + """
D = 128

def scratch_mib(n, implementation):
    f = jax.jit(jax.value_and_grad(lambda z0, z1: ssl.ntxent_loss(
        z0, z1, temperature=0.2, implementation=implementation, block_size=512),
        argnums=(0, 1)))
    spec = jax.ShapeDtypeStruct((n, D), jnp.float32)
    mem = f.lower(spec, spec).compile().memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    return temp / 2**20 if temp is not None else float("nan")

sizes = {"dense": [256, 512, 1024, 2048, 4096], "tiled": [256, 1024, 4096, 16384, 65536]}
scratch = {impl: [scratch_mib(n, impl) for n in ns] for impl, ns in sizes.items()}
for impl, ns in sizes.items():
    for n, mib in zip(ns, scratch[impl]):
        print(f"{impl:5s} N = {n:6d}: XLA temporaries {mib:9.1f} MiB "
              f"((2N)^2 float32 = {(2 * n) ** 2 * 4 / 2**20:10.1f} MiB)")"""),
    ("code", """\
plt.figure(figsize=(6, 4))
for impl, style in (("dense", "o-"), ("tiled", "s-")):
    plt.loglog(sizes[impl], scratch[impl], style, label=f"{impl}: XLA temporaries (fwd + bwd)")
ns = np.array(sizes["dense"], float)
plt.loglog(ns, (2 * ns) ** 2 * 4 / 2**20, "k--", lw=1, label="one (2N)² float32 matrix")
plt.xlabel("batch N (per view)"); plt.ylabel("MiB"); plt.legend(fontsize=8)
plt.grid(True, which="both", alpha=0.3)
plt.title("ntxent_loss, D = 128, CPU, block 512")
plt.show()
for impl in sizes:
    x, y = np.log(sizes[impl][1:]), np.log(scratch[impl][1:])
    print(f"{impl}: log-log slope {np.polyfit(x, y, 1)[0]:.2f} (1 = linear, 2 = quadratic)")"""),
    ("md", """\
The tiled path's values and gradients equal the dense path's (float32 round-off; ≤ 6e-16
in float64, checked by the test suite), and `"auto"` (the default) switches to it above
2048 × 1024 logits per device. Under `shard_map` with `axis_name` the tiled path becomes a ring
(`lax.ppermute` of key blocks and their gradients), so per-device memory follows the local
batch. Measured peak RSS and time against lightly, up to 131,072 rows:
`benchmarks/memory.py` and `benchmarks/results/*-memory.{txt,png}`."""),
]

# ----------------------------------------------------------------------------- 05
NOTEBOOKS["05_benchmarks"] = [
    ("md", """\
# 05 · Benchmarks: sslloss_jax vs lightly

Plots of the committed results in `benchmarks/results/*.json` (written by
`benchmarks/run.py`: forward + backward, median time per call, the same CPU threads for
both). Nothing is re-measured here. `ratio` is ours / lightly (below 1: we are faster)."""),
    ("code", """\
%matplotlib inline
import json, pathlib
import numpy as np
import matplotlib.pyplot as plt

root = pathlib.Path.cwd()
while not (root / "benchmarks" / "results").is_dir() and root != root.parent:
    root = root.parent
files = sorted((root / "benchmarks" / "results").glob("*-cpu.json"))
print([f.name for f in files])
data = json.loads(files[-1].read_text())
print(data["date"], data["cpu"], data["ours"], data["lightly"])
rows = [r for r in data["rows"]  # rows where both sides have a timing
        if all("median_ms" in r.get("sides", {}).get(s, {}) for s in ("ours", "lightly"))]
len(rows)"""),
    ("code", """\
names = [r["name"] for r in rows]
ours = np.array([r["sides"]["ours"]["median_ms"] for r in rows])
theirs = np.array([r["sides"]["lightly"]["median_ms"] for r in rows])
y = np.arange(len(rows))
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 0.28 * len(rows) + 1.5), sharey=True)
ax0.barh(y - 0.2, ours, 0.4, label="sslloss_jax"); ax0.barh(y + 0.2, theirs, 0.4, label="lightly")
ax0.set_xscale("log"); ax0.set_yticks(y, names, fontsize=7); ax0.invert_yaxis()
ax0.set(xlabel="median ms per forward + backward"); ax0.legend()
ratio = ours / theirs
ax1.barh(y, ratio, color=np.where(ratio < 1, "tab:green", "tab:red"))
ax1.axvline(1, color="k", lw=1); ax1.set_xscale("log"); ax1.set(xlabel="ours / lightly")
fig.tight_layout(); plt.show()
print(f"geometric-mean ratio ours/lightly over {len(rows)} rows: "
      f"{np.exp(np.mean(np.log(ratio))):.3f}; faster on {int(np.sum(ratio < 1))} rows")"""),
    ("code", """\
if len(files) > 1:   # run-to-run spread: the same rows in every committed result file
    runs = [json.loads(f.read_text()) for f in files]
    common = set.intersection(*({r["name"] for r in d["rows"] if "lightly" in r.get("sides", {})}
                                for d in runs))
    for d, f in zip(runs, files):
        rr = {r["name"]: r["sides"]["ours"]["median_ms"] / r["sides"]["lightly"]["median_ms"]
              for r in d["rows"] if r["name"] in common}
        print(f"{f.name:28s} geometric-mean ratio {np.exp(np.mean(np.log(list(rr.values())))):.3f}"
              f" over {len(rr)} rows")"""),
]


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                for kind, src in cells]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids: regenerating gives no diff
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        path = HERE / f"{name}.ipynb"
        nbformat.write(build(name, cells), path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
