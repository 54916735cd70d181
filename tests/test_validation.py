"""Bad input is rejected at trace time with a ValueError/TypeError that names the
argument and what it got: never a silent NaN, a broadcast or an XLA error."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sslloss_jax as S
from sslloss_jax._registry import LOSSES, QUEUE_VARIANTS

SPECS = [pytest.param(s, id=s.id) for s in (*LOSSES, *QUEUE_VARIANTS)]


def _batch(spec, b=6, d=4):
    ex = spec.example(np.random.default_rng(0), b, d)
    return [jnp.asarray(x) for x in ex.batch], ex.state


def _apply_jit(spec, batch, state, **hyper):
    """Validation must fire while tracing, so everything runs under jit."""
    return jax.jit(lambda b: spec.apply(tuple(b), state, **hyper))(batch)


@pytest.mark.parametrize("spec", SPECS)
def test_integer_inputs(spec):
    batch, state = _batch(spec)
    batch[0] = batch[0].astype(jnp.int32)
    with pytest.raises(TypeError, match="floating dtype.*int32"):
        _apply_jit(spec, batch, state)


@pytest.mark.parametrize("spec", SPECS)
def test_wrong_rank(spec):
    batch, state = _batch(spec)
    batch = [x if i in spec.raw_argnums else x[:, 0] for i, x in enumerate(batch)]
    with pytest.raises(ValueError, match=r"rank.*" + re.escape(str(batch[0].shape))):
        _apply_jit(spec, batch, state)


@pytest.mark.parametrize("spec", [s for s in SPECS if len(s.values[0].example(
    np.random.default_rng(0), 2, 2).batch) > 1])
def test_mismatched_shapes(spec):
    batch, state = _batch(spec)
    good = batch[-1].shape
    batch[-1] = jnp.concatenate([batch[-1], batch[-1][..., :1]], axis=-1)
    with pytest.raises(ValueError, match=re.escape(str(good)) + ".*"
                       + re.escape(str(batch[-1].shape))):
        _apply_jit(spec, batch, state)


@pytest.mark.parametrize("spec", SPECS)
def test_empty_batch(spec):
    batch, state = _batch(spec)
    batch = [x[:0] for x in batch]
    with pytest.raises(ValueError, match=r"empty.*" + re.escape(str(batch[0].shape))):
        _apply_jit(spec, batch, state)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.values[0].min_batch > 1])
def test_batch_of_one_where_a_statistic_needs_two(spec):
    batch, state = _batch(spec, b=1)
    with pytest.raises(ValueError, match="at least 2 samples.*global batch of 1"):
        _apply_jit(spec, batch, state)


@pytest.mark.parametrize("spec", SPECS)
def test_python_lists_are_rejected(spec):
    batch, state = _batch(spec)
    batch[0] = np.asarray(batch[0]).tolist()
    with pytest.raises(TypeError, match="must be an array, got a list"):
        spec.apply(tuple(batch), state)


@pytest.mark.parametrize("spec", SPECS)
def test_bad_axis_name(spec):
    batch, state = _batch(spec)
    with pytest.raises(TypeError, match="axis_name"):
        spec.apply(tuple(batch), state, axis_name=["data"])


@pytest.mark.parametrize("name", ["ntxent_loss", "dcl_loss", "dclw_loss"])
@pytest.mark.parametrize("tau,match", [(0.0, "Illegal temperature"),
                                       (-5e-9, "Illegal temperature"),
                                       (float("nan"), "finite"),
                                       (np.ones(2), "scalar")])
def test_bad_temperature(name, tau, match):
    a, b = _batch(LOSSES[0])[0]
    with pytest.raises(ValueError, match=match):
        getattr(S, name)(a, b, temperature=tau)


def test_traced_temperature_is_accepted_but_must_be_scalar():
    a, b = _batch(LOSSES[0])[0]
    assert np.isfinite(jax.jit(lambda t: S.ntxent_loss(a, b, temperature=t))(0.3))
    with pytest.raises(ValueError, match="scalar"):
        jax.jit(lambda t: S.ntxent_loss(a, b, temperature=t))(jnp.ones(3))


def test_memory_bank_errors():
    a, b = _batch(LOSSES[0])[0]
    bank = S.init_memory_bank(jax.random.key(0), 8, 3)
    with pytest.raises(ValueError, match="feature dimension 3 but the inputs have 4"):
        S.ntxent_memory_bank_loss(a, b, bank)
    with pytest.raises(TypeError, match="MemoryBankState"):
        S.ntxent_memory_bank_loss(a, b, (bank.bank, bank.ptr))
    with pytest.raises(ValueError, match="ptr must be a scalar"):
        S.memory_bank_enqueue(S.MemoryBankState(jnp.zeros((8, 4)), jnp.zeros(2, jnp.int32)), a)
    for kw, err in [({"size": 0, "dim": 3}, ValueError), ({"size": 4, "dim": -1}, ValueError),
                    ({"size": 4.0, "dim": 3}, ValueError),
                    ({"size": 4, "dim": 3, "dtype": jnp.int32}, TypeError)]:
        with pytest.raises(err):
            S.init_memory_bank(jax.random.key(0), **kw)


def test_loss_specific_hyperparameters():
    a, b = _batch(LOSSES[0])[0]
    with pytest.raises(ValueError, match="normalize must be one of"):
        S.barlow_twins_loss(a, b, normalize="sync")
    with pytest.raises(ValueError, match="eps must be in"):
        S.vicreg_loss(a, b, eps=-1.0)
    with pytest.raises(ValueError, match="Illegal sigma"):
        S.dclw_loss(a, b, sigma=0.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        S.alignment_loss(a, b, alpha=0.0)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        S.negative_cosine_similarity(a, b, axis=2)
    with pytest.raises(TypeError, match="weight_fn must be callable"):
        S.dcl_loss(a, b, weight_fn=3.0)
    with pytest.raises(ValueError, match=r"weight_fn must return shape \(\) or \(6,\)"):
        S.dcl_loss(a, b, weight_fn=lambda x, y: jnp.ones(3))
    with pytest.raises(TypeError, match=r"out0 must be a pair \(z, p\)"):
        S.sym_negative_cosine_similarity_loss(a, (a, b))
