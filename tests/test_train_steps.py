"""The optax train steps of ``examples/train_steps.py``: SimCLR and VICReg with the pure
functions and both Flax wrappers (identical training), MoCo with a memory bank, DINO with
an EMA teacher, center and traced temperature schedule, SwaV with a queue; ``jax.jit``
with donation (one compilation for the run) and ``jax.shard_map`` on 4 fake devices equal
to one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sslloss_jax as S
from tests._harness import assert_tree_close, load_script, make_mesh

T = load_script("examples/train_steps.py", "train_steps")


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax itself is not strict-clean
        yield


def _batches(n_views, steps=4, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(jnp.asarray(rng.standard_normal((batch, T.D_IN)), jnp.float32)
                  for _ in range(n_views)) for _ in range(steps)]


def _run(step, ts, batches):
    losses = []
    for b in batches:
        ts, loss = step(ts, b)
        losses.append(float(loss))  # one step at a time (see the README note on CPU)
    return ts, losses


_HYPER = {"simclr": ("NTXentLoss", {"temperature": 0.5}), "vicreg": ("VICRegLoss", {})}


@pytest.mark.parametrize("name", sorted(_HYPER))
def test_pure_nnx_and_linen_train_identically(name):
    cls_name, hyper = _HYPER[name]
    params0 = T.init_params(jax.random.key(0))
    batches = _batches(2, steps=3)
    ts, pure_losses = _run(T.jit_step(getattr(T, f"{name}_step")),
                           T.init_state(None, params=jax.tree.map(jnp.copy, params0)),
                           batches)
    assert pure_losses[0] != pure_losses[-1]

    make, nnx_step = T.nnx_two_view_step(cls_name, **hyper)
    model, opt, loss = make(jax.tree.map(jnp.copy, params0))
    nnx_losses = [float(nnx_step(model, opt, loss, *b)) for b in batches]
    np.testing.assert_allclose(nnx_losses, pure_losses, rtol=1e-5)
    assert_tree_close({"w1": model.w1[...], "w2": model.w2[...]}, ts.params, rtol=1e-5,
                      atol=1e-6)

    model, linen_step = T.linen_two_view_step(cls_name, **hyper)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *batches[0])["params"]
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params0)
    params = jax.tree.map(jnp.copy, params0)
    opt_state = T.optimizer.init(params)
    linen_losses = []
    for b in batches:
        params, opt_state, value = linen_step(params, opt_state, *b)
        linen_losses.append(float(value))
    np.testing.assert_allclose(linen_losses, pure_losses, rtol=1e-5)
    assert_tree_close(params, ts.params, rtol=1e-5, atol=1e-6)


def _case(name, seed=0):
    """``(step, initial train state, batches)`` of a stateful example."""
    key = jax.random.key(seed)
    if name == "moco":
        return (T.moco_step, T.init_state(key, S.init_memory_bank(jax.random.key(1), 40,
                                                                  T.D_OUT), teacher=True),
                _batches(2, seed=seed))
    if name == "dino":
        return (T.dino_step, T.init_state(key, S.init_dino_state(T.D_OUT), teacher=True),
                _batches(4, seed=seed))
    if name == "swav":
        return (T.swav_step, T.init_state(key, S.init_swav_queue(2, 16, T.D_OUT),
                                          params=T.init_swav_params(key)),
                _batches(4, seed=seed))
    raise ValueError(name)


@pytest.mark.parametrize("name", ["moco", "dino", "swav"])
def test_stateful_steps_train_with_one_compilation(name):
    step, ts, batches = _case(name)
    traces = []  # counted while tracing; not ``_cache_size()`` (jax-ml/jax#39078: a long
    # test worker can reach the 8192 live entries past which new jits keep none)

    def counted(*args, **kwargs):
        traces.append(1)
        return step(*args, **kwargs)

    jitted = T.jit_step(counted)
    ts, losses = _run(jitted, ts, batches[:1])
    ts, more = _run(jitted, ts, batches[1:])
    losses += more
    assert len(traces) == 1  # traced step counter / schedule: no retrace
    assert np.all(np.isfinite(losses)) and losses[0] != losses[-1]
    assert int(ts.step) == len(batches)
    if name == "moco":
        assert int(ts.loss_state.ptr) == (16 * len(batches)) % 40
    if name == "dino":
        assert float(jnp.abs(ts.loss_state.center).sum()) > 0
        temps = [float(T.dino_schedule(jnp.int32(s))[0]) for s in range(4)]
        assert temps[0] == pytest.approx(0.04) and temps[-1] > temps[0]
    if name == "swav":
        assert int(ts.loss_state.filled) == 16


@pytest.mark.parametrize("name", ["moco", "dino", "swav"])
def test_shard_map_step_equals_one_device(name):
    step, ts, batches = _case(name)
    expected = _run(T.jit_step(step), ts, batches)
    step, ts, batches = _case(name)  # fresh buffers: the first run donated its state
    actual = _run(T.shard_map_step(step, make_mesh(4)), ts, batches)
    assert_tree_close(actual, expected, rtol=1e-5, atol=1e-6, err_msg=name)
