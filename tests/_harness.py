"""Reusable test harnesses: golden fixtures, tree comparison, and the distributed
equivalence check that every loss of every issue goes through."""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sslloss_jax._registry import LossSpec

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
AUTO = jax.sharding.AxisType.Auto


# ----------------------------------------------------------------------------- fixtures
@functools.cache
def golden() -> tuple[list[dict], Mapping[str, np.ndarray]]:
    """The float64 fixtures written by ``tests/golden/make_golden.py``."""
    cases = json.loads((GOLDEN_DIR / "cases.json").read_text())
    with np.load(GOLDEN_DIR / "golden.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return cases, arrays


def golden_cases(*losses: str) -> list[dict]:
    cases, _ = golden()
    return [c for c in cases if c["loss"] in losses]


def golden_array(case: dict, name: str) -> np.ndarray:
    return golden()[1][f"{case['case']}/{name}"]


# ----------------------------------------------------------------------------- comparison
def assert_tree_close(actual: Any, expected: Any, *, rtol: float, atol: float = 0.0,
                      err_msg: str = "") -> None:
    """``np.testing.assert_allclose`` leaf by leaf, with matching tree structures."""
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"tree structures differ: {a_def} vs {e_def} {err_msg}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves, strict=True)):
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol,
            err_msg=f"leaf {i} {err_msg}",
        )


def scaled_atol(expected: Any, rtol: float) -> float:
    """An absolute tolerance of ``rtol`` times the largest magnitude in ``expected``, so
    near-zero entries of a gradient are compared at the scale of the whole array."""
    leaves = [np.abs(np.asarray(x, np.float64)).max() for x in jax.tree.leaves(expected)]
    return rtol * max([1.0, *leaves])


# ----------------------------------------------------------------------------- distributed
def make_mesh(n: int, names: tuple[str, ...] = ("data",), shape: tuple[int, ...] | None = None):
    shape = shape or (n,)
    return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(names),
                         devices=jax.devices()[:n])


def _encoder_loss(spec: LossSpec, hyper: Mapping[str, Any]) -> Callable:
    """``loss(W, xs, state, axis_name) -> (loss, new_state)`` with ``z_k = xs_k @ W``:
    a linear encoder, so parameter gradients are checked as well as input gradients."""

    def loss(w, xs, state, axis_name=None):
        return spec.apply(tuple(x @ w for x in xs), state, axis_name=axis_name, **hyper)

    return loss


def reference_run(spec: LossSpec, w, xs, state, hyper):
    """Single device, global batch: ``(loss, new_state, (dW, dxs))``."""
    f = _encoder_loss(spec, hyper)
    (loss, new_state), grads = jax.jit(
        jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(w, xs, state)
    return loss, new_state, grads


def sharded_run(spec: LossSpec, w, xs, state, hyper, mesh, axis_name):
    """``jax.shard_map`` recipe: ``jax.grad`` inside, no gradient reduction at all."""
    f = _encoder_loss(spec, hyper)
    batch_spec = P(axis_name)

    def step(w, xs, state):
        (loss, new_state), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            w, xs, state, axis_name)
        return loss, new_state, grads

    fn = jax.shard_map(
        step, mesh=mesh,
        in_specs=(P(), batch_spec, P()),
        out_specs=(P(), P(), (P(), batch_spec)),
    )
    return jax.jit(fn)(w, xs, state)


def mapped_run(spec: LossSpec, w, xs, state, hyper, n, mapper: str, axis_name="data"):
    """``pmap`` / named ``vmap`` recipe: ``jax.grad`` inside, then ``pmean`` of the
    parameter gradients (input gradients come out ``axis_size`` times too large and are
    divided by it)."""
    f = _encoder_loss(spec, hyper)

    def step(w, xs, state):
        (loss, new_state), (gw, gx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            w, xs, state, axis_name)
        gw = lax.pmean(gw, axis_name)
        gx = jax.tree.map(lambda g: g / lax.axis_size(axis_name), gx)
        return loss, new_state, (gw, gx)

    split = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), xs)
    # The replicated state is closed over rather than passed with in_axes=None: pmap
    # mis-flattens in_axes when a positional argument is None (seen on jax 0.10-0.12).
    stepped = lambda w, xs: step(w, xs, state)
    if mapper == "pmap":
        mapped = jax.pmap(stepped, axis_name=axis_name, in_axes=(None, 0),
                          devices=jax.devices()[:n])
    else:
        mapped = jax.vmap(stepped, axis_name=axis_name, in_axes=(None, 0))
    loss, new_state, (gw, gx) = mapped(w, split)
    merge = lambda x: x.reshape(-1, *x.shape[2:])
    first = lambda t: jax.tree.map(lambda x: x[0], t)
    # every participant must hold the same loss, parameter gradient and state
    for leaf in jax.tree.leaves((loss, gw, new_state)):
        np.testing.assert_allclose(np.asarray(leaf), np.broadcast_to(np.asarray(leaf)[:1],
                                   np.shape(leaf)), rtol=1e-6, atol=1e-7)
    return first(loss), first(new_state), (first(gw), jax.tree.map(merge, gx))


def jit_sharded_run(spec: LossSpec, w, xs, state, hyper, mesh):
    """``axis_name=None`` under ``jax.jit`` with batch-sharded inputs (Auto mesh)."""
    xs = jax.device_put(xs, NamedSharding(mesh, P("data")))
    return reference_run(spec, w, xs, state, hyper)


def distributed_inputs(spec: LossSpec, *, global_batch=16, d_in=6, d_out=5, seed=0):
    rng = np.random.default_rng(seed)
    ex = spec.example(rng, global_batch, d_in)
    w = jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), jnp.float32)
    if ex.state is not None:  # rebuild state / replicated inputs for the output dimension
        ex = spec.example(np.random.default_rng(seed), global_batch, d_out)
        ex = type(ex)(tuple(rng.standard_normal((*x.shape[:-1], d_in)).astype(np.float32)
                            for x in ex.batch), ex.state)
    return w, tuple(jnp.asarray(x) for x in ex.batch), ex.state


def assert_distributed_equivalent(spec: LossSpec, mode: str, n: int = 4, *,
                                  hyper: Mapping[str, Any] | None = None, rtol: float = 1e-5,
                                  global_batch: int = 16, d_out: int = 5) -> None:
    """The distributed result (loss, new state, gradients w.r.t. the encoder weights and
    the inputs) equals the single-device global-batch result.

    Args:
      mode: ``"shard_map"``, ``"shard_map_2d"`` (a 2-D mesh with a tuple axis name),
        ``"pmap"``, ``"vmap"`` (named vmap) or ``"jit"`` (``axis_name=None`` on sharded
        inputs).
      n: number of devices / participants.
    """
    hyper = dict(hyper or {})
    w, xs, state = distributed_inputs(spec, global_batch=global_batch, d_out=d_out)
    expected = reference_run(spec, w, xs, state, hyper)
    if mode == "shard_map":
        actual = sharded_run(spec, w, xs, state, hyper, make_mesh(n), "data")
    elif mode == "shard_map_2d":
        mesh = make_mesh(n, ("a", "b"), (2, n // 2))
        actual = sharded_run(spec, w, xs, state, hyper, mesh, ("a", "b"))
    elif mode in ("pmap", "vmap"):
        actual = mapped_run(spec, w, xs, state, hyper, n, mode)
    elif mode == "jit":
        actual = jit_sharded_run(spec, w, xs, state, hyper, make_mesh(n))
    else:
        raise ValueError(mode)
    names = ("loss", "new_state", "grads")
    for name, a, e in zip(names, actual, expected, strict=True):
        assert_tree_close(a, e, rtol=rtol, atol=scaled_atol(e, rtol),
                          err_msg=f"{spec.name} {mode} n={n}: {name}")
