"""optax train steps with sslloss_jax, for copying into your own code.

Each pure step has the signature ``step(ts, batch, *, axis_name=None) -> (ts, loss)`` where
``ts`` is a :class:`TrainState` (parameters, optimizer state, loss state, EMA teacher, step
counter) and ``batch`` a tuple of views ``[B, D_IN]``. Written once for the local shard:

- one device: :func:`jit_step` (``jax.jit`` with ``donate_argnums=0``: the parameters,
  optimizer state and loss state are updated in place);
- data parallel: :func:`shard_map_step` (``jax.shard_map`` over a ``"data"`` mesh axis,
  the batch sharded, everything else replicated; ``jax.grad`` inside and no gradient
  reduction, see the README), equal to one device holding the global batch.

Steps: :func:`simclr_step`, :func:`vicreg_step` (also with the Flax NNX and Linen wrappers:
:func:`nnx_simclr_step`, :func:`linen_simclr_step` and the VICReg ones), :func:`moco_step`
(memory-bank queue of negatives, EMA key encoder), :func:`dino_step` (EMA teacher,
center, a teacher-temperature schedule driven by the traced step counter: one compilation
for the whole run) and :func:`swav_step` (a queue of past features that switches on at a
traced step). ``tests/test_train_steps.py`` runs them all.

optax is not clean under ``jax_numpy_dtype_promotion="strict"``; with that setting, trace
the steps inside ``with jax.numpy_dtype_promotion("standard"):`` (the losses themselves are
strict-clean).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

import sslloss_jax as ssl

D_IN, HIDDEN, D_OUT = 8, 16, 6
optimizer = optax.adam(1e-2)


class TrainState(NamedTuple):
    """Everything a step reads and returns (a pytree: donate it, checkpoint it)."""

    params: Any
    opt_state: Any
    loss_state: Any = None  # memory bank, DINO center, SwaV queue, ... (replicated)
    teacher: Any = None  # EMA teacher / key-encoder parameters
    step: Any = 0  # an int32 array in practice (init_state)


def init_params(key: jax.Array, d_out: int = D_OUT) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (D_IN, HIDDEN)) / D_IN ** 0.5,
            "w2": jax.random.normal(k2, (HIDDEN, d_out)) / HIDDEN ** 0.5}


def encode(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """A two-layer MLP encoder (any model works)."""
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def init_state(key: jax.Array, loss_state: Any = None, *, teacher: bool = False,
               params: Any = None) -> TrainState:
    params = init_params(key) if params is None else params
    # fresh buffers everywhere: the state is donated to the jitted step
    return TrainState(params, optimizer.init(params), loss_state,
                      jax.tree.map(jnp.copy, params) if teacher else None,
                      jnp.zeros((), jnp.int32))


def _apply_grads(ts: TrainState, grads: Any, **changes: Any) -> TrainState:
    updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
    return ts._replace(params=optax.apply_updates(ts.params, updates), opt_state=opt_state,
                       step=ts.step + 1, **changes)


# ----------------------------------------------------------------------------- SimCLR, VICReg
def _two_view_step(loss: Callable[..., jax.Array]):
    def step(ts: TrainState, batch, *, axis_name=None):
        x0, x1 = batch

        def loss_fn(params):
            return loss(encode(params, x0), encode(params, x1), axis_name=axis_name)

        value, grads = jax.value_and_grad(loss_fn)(ts.params)
        return _apply_grads(ts, grads), value

    return step


simclr_step = _two_view_step(functools.partial(ssl.ntxent_loss, temperature=0.5))
vicreg_step = _two_view_step(ssl.vicreg_loss)


# ----------------------------------------------------------------------------- MoCo
MOCO_MOMENTUM = 0.99


def moco_step(ts: TrainState, batch, *, axis_name=None):
    """Query encoder trained, key encoder an EMA of it (``optax.incremental_update``);
    the keys of the global batch are enqueued in the memory bank (``ts.loss_state``)."""
    x_q, x_k = batch
    keys = jax.lax.stop_gradient(encode(ts.teacher, x_k))

    def loss_fn(params):
        return ssl.ntxent_memory_bank_loss(encode(params, x_q), keys, ts.loss_state,
                                           temperature=0.2, axis_name=axis_name)

    (value, bank), grads = jax.value_and_grad(loss_fn, has_aux=True)(ts.params)
    ts = _apply_grads(ts, grads, loss_state=bank)
    teacher = optax.incremental_update(ts.params, ts.teacher, step_size=1 - MOCO_MOMENTUM)
    return ts._replace(teacher=teacher), value


# ----------------------------------------------------------------------------- DINO
STEPS_PER_EPOCH = 2


def dino_schedule(step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Teacher temperature (lightly's linear warm-up) and EMA momentum (cosine to 1), both
    functions of the traced step counter."""
    epoch = step.astype(jnp.float32) / STEPS_PER_EPOCH
    temp = ssl.dino_teacher_temperature(epoch, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                        warmup_teacher_temp_epochs=3)
    momentum = 1 - (1 - 0.996) * (jnp.cos(jnp.pi * jnp.minimum(epoch / 10, 1.0)) + 1) / 2
    return temp, momentum


def dino_step(ts: TrainState, batch, *, axis_name=None):
    """``batch``: two global crops then local crops. The student sees every crop, the EMA
    teacher the global ones; the center lives in ``ts.loss_state``."""
    temp, momentum = dino_schedule(ts.step)
    teacher_out = [encode(ts.teacher, c) for c in batch[:2]]

    def loss_fn(params):
        student_out = [encode(params, c) for c in batch]
        return ssl.dino_loss(teacher_out, student_out, ts.loss_state, teacher_temp=temp,
                             axis_name=axis_name)

    (value, center), grads = jax.value_and_grad(loss_fn, has_aux=True)(ts.params)
    ts = _apply_grads(ts, grads, loss_state=center)
    return ts._replace(teacher=optax.incremental_update(ts.params, ts.teacher,
                                                        1 - momentum)), value


# ----------------------------------------------------------------------------- SwaV
N_PROTOTYPES, SWAV_START = 5, 2


def init_swav_params(key: jax.Array) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    return {**init_params(k1), "prototypes": jax.random.normal(k2, (N_PROTOTYPES, D_OUT))}


def swav_step(ts: TrainState, batch, *, axis_name=None):
    """``batch``: two high-resolution crops then low-resolution ones. The queue
    (``ts.loss_state``, a ``SwaVQueueState``) holds past normalized features of the two
    high-resolution crops; it is scored with the current prototypes and used once full and
    from step ``SWAV_START`` (a traced condition: no retrace)."""
    queue = ts.loss_state

    def loss_fn(params):
        protos = params["prototypes"] / jnp.linalg.norm(params["prototypes"], axis=-1,
                                                        keepdims=True)
        feats = [encode(params, c) for c in batch]
        feats = [f / jnp.linalg.norm(f, axis=-1, keepdims=True) for f in feats]
        scores = lambda f: f @ protos.T
        valid = (ts.step >= SWAV_START) & (queue.filled == queue.features.shape[1])
        loss = ssl.swav_loss([scores(f) for f in feats[:2]], [scores(f) for f in feats[2:]],
                             scores(queue.features), queue_valid=valid, axis_name=axis_name)
        return loss, feats[:2]

    (value, high), grads = jax.value_and_grad(loss_fn, has_aux=True)(ts.params)
    queue = ssl.swav_queue_update(queue, jax.lax.stop_gradient(high), axis_name=axis_name)
    return _apply_grads(ts, grads, loss_state=queue), value


# ----------------------------------------------------------------------------- compiled steps
def jit_step(step: Callable) -> Callable:
    """One device: ``jax.jit`` donating the train state (params, opt state, loss state)."""
    return jax.jit(step, donate_argnums=0)


def shard_map_step(step: Callable, mesh: jax.sharding.Mesh, axis: str = "data") -> Callable:
    """Data parallel: the batch sharded over ``axis``, the train state replicated; the
    loss, gradients and new state are those of one device holding the global batch."""
    sharded = jax.shard_map(functools.partial(step, axis_name=axis), mesh=mesh,
                            in_specs=(P(), P(axis)), out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0)


# ----------------------------------------------------------------------------- Flax wrappers
def nnx_two_view_step(loss_cls_name: str, **hyper: Any):
    """SimCLR / VICReg with Flax NNX: an ``nnx.Module`` encoder, an ``nnx.Optimizer`` and
    the ``sslloss_jax.nnx`` loss module. Returns ``(make, step)``: ``make(params)`` builds
    ``(model, optimizer, loss)`` from a parameter dict, ``step(model, optimizer, loss, x0,
    x1) -> loss value`` (``nnx.jit``, state updated in place)."""
    from flax import nnx

    import sslloss_jax.nnx as snnx

    class Encoder(nnx.Module):
        def __init__(self, params):
            self.w1 = nnx.Param(params["w1"])
            self.w2 = nnx.Param(params["w2"])

        def __call__(self, x):
            return jnp.tanh(x @ self.w1[...]) @ self.w2[...]

    def make(params):
        model = Encoder(params)
        return model, nnx.Optimizer(model, optimizer, wrt=nnx.Param), getattr(
            snnx, loss_cls_name)(**hyper)

    @nnx.jit
    def step(model, opt, loss, x0, x1):
        value, grads = nnx.value_and_grad(lambda m: loss(m(x0), m(x1)))(model)
        opt.update(model, grads)
        return value

    return make, step


def linen_two_view_step(loss_cls_name: str, **hyper: Any):
    """SimCLR / VICReg with Flax Linen: a Linen model whose ``__call__`` returns the loss
    of two views (the ``sslloss_jax.linen`` loss module inside). Returns ``(model,
    step)``; ``step(params, opt_state, x0, x1) -> (params, opt_state, loss)`` is jitted
    with the parameters and optimizer state donated."""
    import flax.linen as nn

    import sslloss_jax.linen as slinen

    class SSLModel(nn.Module):
        @nn.compact
        def __call__(self, x0, x1):
            w1 = self.param("w1", nn.initializers.lecun_normal(), (D_IN, HIDDEN))
            w2 = self.param("w2", nn.initializers.lecun_normal(), (HIDDEN, D_OUT))
            enc = lambda x: jnp.tanh(x @ w1) @ w2
            return getattr(slinen, loss_cls_name)(**hyper)(enc(x0), enc(x1))

    model = SSLModel()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x0, x1):
        value, grads = jax.value_and_grad(
            lambda p: model.apply({"params": p}, x0, x1))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return model, step
