"""Generic properties every registered loss must have: jit == eager, correct float64
gradients (``check_grads``), ``vmap`` over a leading views axis, dtype policy, finite
values and gradients on degenerate inputs, view symmetry, and no retrace when a traced
hyperparameter changes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tests._harness import assert_tree_close, matrix_specs, spec_params

SPECS = spec_params(matrix_specs())


def _example(spec, batch=8, dim=6, seed=0, dtype=np.float32):
    """The example batch cast to ``dtype``, except the raw (label) arrays."""
    ex = spec.example(np.random.default_rng(seed), batch, dim)
    return tuple(jnp.asarray(x) if i in spec.raw_argnums else jnp.asarray(x, dtype)
                 for i, x in enumerate(ex.batch)), ex.state


def _loss_fn(spec, state, **hyper):
    return lambda *batch: spec.apply(batch, state, **hyper)[0]


def _argnums(spec, n):
    return spec.grad_argnums if spec.grad_argnums is not None else tuple(range(n))


@pytest.mark.parametrize("spec", SPECS)
def test_jit_matches_eager(spec):
    batch, state = _example(spec)
    eager = spec.apply(batch, state)
    jitted = jax.jit(lambda b, s: spec.apply(b, s))(batch, state)
    assert_tree_close(jitted, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.values[0].numeric_grads])
def test_check_grads_float64(spec):
    """(Losses that detach part of their input dependence, such as DCLW's weights, have
    their own gradient tests.)"""
    with jax.enable_x64(True):
        batch, state = _example(spec, batch=5, dim=4, dtype=np.float64)
        if state is not None:
            state = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype.kind == "f" else x,
                                 state)
        f = _loss_fn(spec, state)
        argnums = _argnums(spec, len(batch))

        def g(*diff):
            full = list(batch)
            for i, x in zip(argnums, diff):
                full[i] = x
            return f(*full)

        check_grads(jax.jit(g), tuple(batch[i] for i in argnums), order=1, modes=("rev",),
                    atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_vmap_over_views(spec):
    """A leading axis of independent problems (views, crops, heads) vectorizes."""
    examples = [_example(spec, seed=s) for s in range(3)]
    state = examples[0][1]
    stacked = tuple(jnp.stack(xs) for xs in zip(*[b for b, _ in examples]))
    vmapped = jax.jit(jax.vmap(lambda b: spec.apply(b, state)))(stacked)
    single = jax.jit(lambda b: spec.apply(b, state))
    looped = [single(b) for b, _ in examples]
    expected = jax.tree.map(lambda *xs: jnp.stack(xs), *looped)
    assert_tree_close(vmapped, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("spec", SPECS)
def test_dtype_policy(spec, dtype):
    """Half-precision inputs: float32 loss, finite, close to the float32 result;
    gradients come back in the input dtype and are finite. (Float32 inputs: the
    degenerate-input, jit-vs-eager and golden tests.)"""
    batch, state = _example(spec, dtype=dtype)
    f = _loss_fn(spec, state)
    argnums = _argnums(spec, len(batch))
    loss, grads = jax.jit(jax.value_and_grad(f, argnums=argnums))(*batch)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert np.isfinite(loss)
    for i, g in zip(argnums, grads):
        assert g.dtype == batch[i].dtype
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
    ref = jax.jit(f)(*(x if i in spec.raw_argnums else x.astype(jnp.float32)
                       for i, x in enumerate(batch)))
    np.testing.assert_allclose(loss, ref, rtol=2e-2, atol=2e-2)


def test_float64_in_float64_out():
    with jax.enable_x64(True):
        for spec in matrix_specs():
            batch, state = _example(spec, dtype=np.float64)
            # the traced output's dtype (eval_shape: no compilation of ~50 programs)
            loss = jax.eval_shape(lambda b, s, spec=spec: spec.apply(b, s)[0], batch, state)
            assert loss.dtype == jnp.float64, spec.name


DEGENERATE = {
    "zeros": lambda x, i: np.zeros_like(x),
    "identical_rows": lambda x, i: np.broadcast_to(x[:1], x.shape).copy(),
    "identical_views": lambda x, i: x if i == 0 else None,  # every view = the first
    "large_1e4": lambda x, i: 1e4 * x,
    "tiny_1e-6": lambda x, i: 1e-6 * x,
}


# float16 cannot hold the true gradients of extreme inputs (1/‖x‖ ≈ 1e6 for 1e-6 inputs,
# torch's 1/eps at an exact zero, the 1e8-scale covariance of 1e4 inputs): it is checked
# on the degenerate cases whose gradients it can represent. KoLeo's distance to a duplicate
# is eps (1e-8), so its gradient there is ~1/eps by definition.
KINDS = {jnp.float32: tuple(DEGENERATE), jnp.bfloat16: tuple(DEGENERATE),
         jnp.float16: ("identical_rows", "identical_views")}
F16_OUT_OF_RANGE = {("koleo_loss", "identical_rows")}


@pytest.mark.parametrize("dtype", list(KINDS), ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("spec", SPECS)
def test_degenerate_inputs_are_finite(spec, dtype):
    """Every degenerate kind at once (vmapped over a kinds axis: one compilation)."""
    kinds = [k for k in KINDS[dtype]
             if not (dtype == jnp.float16 and (spec.name, k) in F16_OUT_OF_RANGE)]
    raw, state = _example(spec, dtype=np.float32)
    first = np.asarray(raw[0])
    stacked = []
    for i, x in enumerate(raw):
        if i in spec.raw_argnums:  # labels stay as they are
            stacked.append(jnp.stack([x] * len(kinds)))
            continue
        per_kind = []
        for kind in kinds:
            y = DEGENERATE[kind](np.asarray(x), i)
            per_kind.append(first if y is None else y)
        stacked.append(jnp.asarray(np.stack(per_kind), dtype))
    f = _loss_fn(spec, state)
    argnums = _argnums(spec, len(stacked))
    loss, grads = jax.jit(jax.vmap(jax.value_and_grad(f, argnums=argnums)))(*stacked)
    for j, kind in enumerate(kinds):
        assert np.isfinite(loss[j]), (spec.name, kind, loss[j])
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g[j], np.float32))), (spec.name, kind)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.values[0].symmetric])
def test_symmetric_in_the_views(spec):
    (a, b), state = _example(spec)
    f = jax.jit(lambda x, y: spec.apply((x, y), state)[0])
    np.testing.assert_allclose(f(a, b), f(b, a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.values[0].traced_hyper])
def test_traced_hyperparameters_do_not_retrace(spec):
    batch, state = _example(spec)
    traces = []

    @jax.jit
    def f(batch, hyper):
        traces.append(1)
        return spec.apply(batch, state, **hyper)[0]

    first = {k: jnp.float32(v[0]) for k, v in spec.traced_hyper.items()}
    second = {k: jnp.float32(v[1]) for k, v in spec.traced_hyper.items()}
    l1, l2 = f(batch, first), f(batch, second)
    assert len(traces) == 1
    assert not np.isclose(l1, l2)
    static = {k: v[1] for k, v in spec.traced_hyper.items()}
    python_floats = jax.jit(lambda b: spec.apply(b, state, **static)[0])(batch)
    np.testing.assert_allclose(l2, python_floats, rtol=1e-5)
