"""Reusable test harnesses: golden fixtures, tree comparison, and the distributed
equivalence check that every loss of every issue goes through."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sslloss_jax._registry import LOSSES, QUEUE_VARIANTS, TILED_VARIANTS, LossSpec

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
REPO = pathlib.Path(__file__).resolve().parents[1]
AUTO = jax.sharding.AxisType.Auto


def load_script(relative_path: str, name: str) -> types.ModuleType:
    """The repository script at ``relative_path`` (not a package module) imported as
    ``name``; registered in ``sys.modules``, which its dataclasses need."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
    assert spec is not None and spec.loader is not None, relative_path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the matrix
ALL_SPECS: tuple[LossSpec, ...] = (*LOSSES, *QUEUE_VARIANTS, *TILED_VARIANTS)
#: The first registry entry of each family: the per-transform checks whose logic lives in
#: shared helpers (collectives, wrappers) rather than in each loss run on these only.
FAMILY_REPRESENTATIVES: tuple[LossSpec, ...] = tuple(
    {s.family: s for s in reversed(ALL_SPECS)}[f] for f in dict.fromkeys(s.family
                                                                       for s in ALL_SPECS))


def matrix_specs() -> tuple[LossSpec, ...]:
    """The registry entries the generic per-loss tests run on: all of them, or one per
    family with ``SSLLOSS_TEST_MATRIX=families`` (CI's second, newest-JAX leg, which checks
    compatibility while the first leg runs the whole matrix)."""
    mode = os.environ.get("SSLLOSS_TEST_MATRIX", "full")
    if mode not in ("full", "families"):
        raise ValueError(f"SSLLOSS_TEST_MATRIX must be 'full' or 'families', got {mode!r}")
    return ALL_SPECS if mode == "full" else FAMILY_REPRESENTATIVES


def spec_params(specs) -> list:
    return [pytest.param(s, id=s.id) for s in specs]


# ----------------------------------------------------------------------------- fixtures
@functools.cache
def golden() -> tuple[list[dict], Mapping[str, np.ndarray]]:
    """The float64 fixtures of every set in ``tests/golden/``: ``cases.json`` +
    ``golden.npz`` (written by ``make_golden.py``) and any ``cases_<set>.json`` +
    ``golden_<set>.npz`` pair (written by ``make_golden_<set>.py``). Case names are unique
    across sets."""
    cases: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    for case_file in sorted(GOLDEN_DIR.glob("cases*.json")):
        suffix = case_file.stem[len("cases"):]
        cases += json.loads(case_file.read_text())
        with np.load(GOLDEN_DIR / f"golden{suffix}.npz") as data:
            arrays.update((k, data[k]) for k in data.files)
    names = [c["case"] for c in cases]
    assert len(names) == len(set(names)), "duplicate golden case names across sets"
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


def assert_matches_reference(fn: Callable, reference: Callable, args: tuple, weights: Any
                             ) -> None:
    """A primitive against its plain-formula reference, in the caller's (float64) dtype:
    the values, ``check_grads`` of ``Σ tanh(fn(*args))·weights`` and its jitted gradients
    in every argument against autodiff of the reference."""
    from jax.test_util import check_grads

    np.testing.assert_allclose(fn(*args), reference(*args), rtol=1e-12, atol=1e-12)
    argnums = tuple(range(len(args)))
    f = lambda *a: jnp.sum(jnp.tanh(fn(*a)) * weights)  # noqa: E731
    check_grads(f, args, order=1, modes=["rev"])
    want = jax.grad(lambda *a: jnp.sum(jnp.tanh(reference(*a)) * weights), argnums)(*args)
    assert_tree_close(jax.jit(jax.grad(f, argnums))(*args), want, rtol=1e-10, atol=1e-12)


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


def split_raw(spec: LossSpec, batch: tuple) -> tuple[tuple, tuple]:
    """``(encoded, raw)``: the batch arrays that go through the encoder (and get gradients)
    and those passed as they are (``spec.raw_argnums``, e.g. integer labels)."""
    raw = tuple(x for i, x in enumerate(batch) if i in spec.raw_argnums)
    return tuple(x for i, x in enumerate(batch) if i not in spec.raw_argnums), raw


def merge_raw(spec: LossSpec, encoded: tuple, raw: tuple) -> tuple:
    """Inverse of :func:`split_raw`: the batch in the loss's argument order."""
    enc, rw = iter(encoded), iter(raw)
    n = len(encoded) + len(raw)
    return tuple(next(rw) if i in spec.raw_argnums else next(enc) for i in range(n))


def _encoder_loss(spec: LossSpec, hyper: Mapping[str, Any]) -> Callable:
    """``loss(W, xs, raw, state, axis_name) -> (loss, new_state)`` with ``z_k = xs_k @ W``:
    a linear encoder, so parameter gradients are checked as well as input gradients.
    ``raw`` (see :func:`split_raw`) reaches the loss unchanged."""

    def loss(w, xs, raw, state, axis_name=None):
        batch = merge_raw(spec, tuple(x @ w for x in xs), raw)
        return spec.apply(batch, state, axis_name=axis_name, **hyper)

    return loss


def reference_run(spec: LossSpec, w, xs, state, hyper):
    """Single device, global batch: ``(loss, new_state, (dW, dxs))`` (``dxs`` for the
    encoded batch arrays only)."""
    f = _encoder_loss(spec, hyper)
    xs, raw = split_raw(spec, xs)
    (loss, new_state), grads = jax.jit(
        jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(w, xs, raw, state)
    return loss, new_state, grads


def sharded_run(spec: LossSpec, w, xs, state, hyper, mesh, axis_name):
    """``jax.shard_map`` recipe: ``jax.grad`` inside, no gradient reduction at all."""
    f = _encoder_loss(spec, hyper)
    batch_spec = P(axis_name)
    xs, raw = split_raw(spec, xs)

    def step(w, xs, raw, state):
        (loss, new_state), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            w, xs, raw, state, axis_name)
        return loss, new_state, grads

    fn = jax.shard_map(
        step, mesh=mesh,
        in_specs=(P(), batch_spec, batch_spec, P()),
        out_specs=(P(), P(), (P(), batch_spec)),
    )
    return jax.jit(fn)(w, xs, raw, state)


def mapped_run(spec: LossSpec, w, xs, state, hyper, n, mapper: str, axis_name="data"):
    """``pmap`` / named ``vmap`` recipe: ``jax.grad`` inside, then ``pmean`` of the
    parameter gradients (input gradients come out ``axis_size`` times too large and are
    divided by it)."""
    f = _encoder_loss(spec, hyper)

    def step(w, xs, raw, state):
        (loss, new_state), (gw, gx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            w, xs, raw, state, axis_name)
        gw = lax.pmean(gw, axis_name)
        gx = jax.tree.map(lambda g: g / lax.axis_size(axis_name), gx)
        return loss, new_state, (gw, gx)

    split = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), xs)
    split, raw = split_raw(spec, split)
    # The replicated state is closed over rather than passed with in_axes=None: pmap
    # mis-flattens in_axes when a positional argument is None (seen on jax 0.10-0.12).
    stepped = lambda w, xs, raw: step(w, xs, raw, state)
    if mapper == "pmap":
        mapped = jax.pmap(stepped, axis_name=axis_name, in_axes=(None, 0, 0),
                          devices=jax.devices()[:n])
    else:
        mapped = jax.vmap(stepped, axis_name=axis_name, in_axes=(None, 0, 0))
    loss, new_state, (gw, gx) = mapped(w, split, raw)
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
        ex = type(ex)(tuple(x if i in spec.raw_argnums else
                            rng.standard_normal((*x.shape[:-1], d_in)).astype(np.float32)
                            for i, x in enumerate(ex.batch)), ex.state)
    return w, tuple(jnp.asarray(x) for x in ex.batch), ex.state


_REFERENCES: dict[tuple, Any] = {}


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
    key = (spec.id, repr(sorted(hyper.items())), global_batch, d_out)
    if key not in _REFERENCES:  # the same single-device run for every mode and n
        _REFERENCES[key] = reference_run(spec, w, xs, state, hyper)
    expected = _REFERENCES[key]
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


def concatenations(fn: Callable, *args: Any) -> list[str]:
    """The result types of the concatenations in ``jax.jit(fn)``'s lowered program, e.g.
    ``tensor<3x6x8xf32>``: a kernel that keeps views as blocks has none of the stack."""
    text = jax.jit(fn).lower(*args).as_text()
    return [line.rsplit("->", 1)[-1].strip() for line in text.splitlines()
            if "stablehlo.concatenate" in line]
