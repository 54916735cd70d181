"""orbax-checkpoint: every loss state round-trips, and a resumed run continues
bit-identically (4 steps == 2 steps + save + restore + 2 steps), for the pure train steps
of ``examples/train_steps.py`` and for an NNX loss module with its rng stream."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import sslloss_jax as S
import sslloss_jax.nnx as snnx
from sslloss_jax._registry import LOSSES, QUEUE_VARIANTS
from tests.test_train_steps import T, _case, _run


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _save_restore(path, tree):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)
        ckptr.wait_until_finished()
        return ckptr.restore(path, _abstract(tree))


def _assert_identical(actual, expected, msg=""):
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert str(a_def) == str(e_def), msg
    for a, e in zip(a_leaves, e_leaves, strict=True):
        assert np.asarray(a).dtype == np.asarray(e).dtype, msg
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=msg)


def test_every_loss_state_round_trips(tmp_path):
    """All stateful registry entries (and the SwaV queue): values, dtypes and the
    NamedTuple types come back."""
    rng = np.random.default_rng(0)
    states = {s.name: s.example(rng, 8, 4).state for s in LOSSES + QUEUE_VARIANTS
              if s.stateful}
    states["swav_queue"] = S.swav_queue_update(S.init_swav_queue(2, 6, 4),
                                               [jnp.ones((4, 4))] * 2)
    assert {"ntxent_memory_bank_loss", "dino_loss", "tico_loss", "wmse_loss"} <= set(states)
    restored = _save_restore(tmp_path / "states", states)
    for name, state in states.items():
        assert type(restored[name]) is type(state), name
        _assert_identical(restored[name], state, name)


@pytest.mark.parametrize("name", ["moco", "dino", "swav"])
def test_resumed_train_run_is_bit_identical(tmp_path, name):
    with jax.numpy_dtype_promotion("standard"):  # optax is not strict-clean
        step, ts, batches = _case(name)
        jitted = T.jit_step(step)
        expected = _run(jitted, ts, batches)
        step, ts, batches = _case(name)
        ts, first = _run(jitted, ts, batches[:2])
        ts = _save_restore(tmp_path / "ckpt", ts)
        ts, second = _run(jitted, ts, batches[2:])
    _assert_identical((ts, first + second), expected, name)


def _nnx_state(module):
    """The module's state as a plain dict; PRNG keys as their raw key data."""
    pure = nnx.to_pure_dict(nnx.state(module))
    return jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x, pure)


def _nnx_restore(module, path):
    """Restore ``_nnx_state`` into ``module`` (key data wrapped back into keys)."""
    state = nnx.state(module)
    like = nnx.to_pure_dict(state)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, _abstract(_nnx_state(module)))
    restored = jax.tree.map(
        lambda r, x: jax.random.wrap_key_data(r, impl=jax.random.key_impl(x))
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else r, restored, like)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(module, state)


def test_resumed_nnx_module_is_bit_identical(tmp_path):
    """A W-MSE module: running statistics and the per-call key stream (rng count)."""
    rng = np.random.default_rng(0)
    xs = [[jnp.asarray(rng.standard_normal((16, 3)), jnp.float32)] * 2 for _ in range(4)]
    make = lambda seed: snnx.WMSELoss(embedding_dim=3, w_size=8, eps=0.1,
                                      rngs=nnx.Rngs(loss=seed))
    call = nnx.jit(lambda m, x: m(x))
    ref = make(0)
    expected = [call(ref, x) for x in xs]

    m = make(0)
    first = [call(m, x) for x in xs[:2]]
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "nnx", _nnx_state(m))
        ckptr.wait_until_finished()
    resumed = make(123)  # a different stream: everything comes from the checkpoint
    _nnx_restore(resumed, tmp_path / "nnx")
    second = [call(resumed, x) for x in xs[2:]]
    _assert_identical(first + second, expected)
    _assert_identical(_nnx_state(resumed), _nnx_state(ref))
