"""End-to-end demo: self-supervised training of a small MLP with sslloss_jax.

Synthetic data: 10 hidden classes, each a random prototype in R^32; a sample is its
prototype plus noise, and an augmented *view* adds more noise and randomly drops features.
The encoder never sees a label. We train it with a self-supervised loss on two views per
sample, data-parallel over 4 (fake CPU) devices with ``jax.shard_map`` and
``axis_name="data"`` — the loss, gradients and memory bank are exactly those of one device
holding the global batch — and report a nearest-centroid probe accuracy of the frozen
embeddings before and after training.

Run: ``python examples/quickstart.py [--loss ntxent|memory_bank|dcl|vicreg|barlow_twins]``
"""

from __future__ import annotations

import argparse
import functools
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sslloss_jax as ssl  # noqa: E402

CLASSES, D_IN, HIDDEN, D_OUT = 10, 32, 128, 32


def make_data(key, prototypes, n):
    kl, kn = jax.random.split(key)
    labels = jax.random.randint(kl, (n,), 0, CLASSES)
    x = prototypes[labels] + 1.5 * jax.random.normal(kn, (n, D_IN))
    return x, labels


def augment(key, x):
    kn, kd = jax.random.split(key)
    keep = jax.random.bernoulli(kd, 0.8, x.shape)
    return jnp.where(keep, x + 0.7 * jax.random.normal(kn, x.shape), 0.0)


def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (D_IN, HIDDEN)) / np.sqrt(D_IN), "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, D_OUT)) / np.sqrt(HIDDEN), "b2": jnp.zeros(D_OUT),
    }


def encode(params, x):
    return jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def make_loss(name):
    """``loss(z0, z1, state, axis_name) -> (loss, new_state)`` for the chosen loss."""
    if name == "memory_bank":
        return lambda z0, z1, bank, ax: ssl.ntxent_memory_bank_loss(
            z0, z1, bank, temperature=0.2, axis_name=ax)
    fn = {
        "ntxent": functools.partial(ssl.ntxent_loss, temperature=0.2),
        "dcl": functools.partial(ssl.dcl_loss, temperature=0.2),
        "vicreg": ssl.vicreg_loss,
        "barlow_twins": ssl.barlow_twins_loss,
    }[name]
    return lambda z0, z1, state, ax: (fn(z0, z1, axis_name=ax), state)


def probe_accuracy(params, x_train, y_train, x_test, y_test):
    """Nearest class centroid on L2-normalized frozen embeddings."""
    def emb(x):
        z = encode(params, x)
        return z / jnp.linalg.norm(z, axis=1, keepdims=True)

    zt = emb(x_train)
    centroids = jnp.stack([zt[y_train == c].mean(0) for c in range(CLASSES)])
    pred = jnp.argmax(emb(x_test) @ centroids.T, axis=1)
    return float(jnp.mean(pred == y_test))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss", default="ntxent",
                        choices=["ntxent", "memory_bank", "dcl", "vicreg", "barlow_twins"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    args = parser.parse_args()

    key = jax.random.key(0)
    k_proto, k_data, k_test, k_params, k_bank, k_aug = jax.random.split(key, 6)
    prototypes = 1.0 * jax.random.normal(k_proto, (CLASSES, D_IN))
    x_train, y_train = make_data(k_data, prototypes, 4096)
    x_test, y_test = make_data(k_test, prototypes, 1024)
    params = init_params(k_params)
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)
    state = ssl.init_memory_bank(k_bank, 1024, D_OUT) if args.loss == "memory_bank" else None
    loss_fn = make_loss(args.loss)

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh,
                       in_specs=(P(), P(), P(), P("data"), P("data")),
                       out_specs=(P(), P(), P(), P()))
    def train_step(params, opt_state, state, x0, x1):
        def objective(p):
            return loss_fn(encode(p, x0), encode(p, x1), state, "data")

        (loss, state), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, loss

    before = probe_accuracy(params, x_train, y_train, x_test, y_test)
    print(f"devices: {jax.device_count()} ({jax.devices()[0].platform}), loss: {args.loss}, "
          f"global batch {args.batch}, {args.steps} steps")
    print(f"probe accuracy of the random encoder: {before:.3f}")
    t0 = time.perf_counter()
    for step in range(args.steps):
        k_aug, k_idx, k0, k1 = jax.random.split(k_aug, 4)
        idx = jax.random.choice(k_idx, x_train.shape[0], (args.batch,), replace=False)
        x = x_train[idx]
        params, opt_state, state, loss = train_step(params, opt_state, state,
                                                    augment(k0, x), augment(k1, x))
        # Wait for the step: XLA's CPU runtime can deadlock when several multi-device
        # programs with collectives are in flight on a machine with few cores.
        loss = float(loss)
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss:9.4f}")
    elapsed = time.perf_counter() - t0
    after = probe_accuracy(params, x_train, y_train, x_test, y_test)
    print(f"probe accuracy after self-supervised training: {after:.3f} "
          f"(was {before:.3f}; {elapsed:.1f} s)")


if __name__ == "__main__":
    main()
