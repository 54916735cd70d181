"""The Flax wrappers (``sslloss_jax.nnx``, ``sslloss_jax.linen``) against the pure functions.

The consistency test is parameterized from the registry (``LOSSES`` + ``QUEUE_VARIANTS``),
so a new loss is covered as soon as it has a registry entry; a registry entry without a
wrapper fails ``test_every_registry_entry_has_wrappers``. No per-loss code: while the
registry's ``spec.apply`` runs, the pure function is replaced by a *shim* that builds the
wrapper with the same hyperparameters and state and calls it with the same arrays.
"""

from __future__ import annotations

import contextlib
import inspect
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import sslloss_jax as S
from sslloss_jax import _wrappers as W
from sslloss_jax import linen as L
from sslloss_jax import nnx as N
from sslloss_jax._registry import LOSSES, QUEUE_VARIANTS
from tests._harness import (
    assert_tree_close,
    make_mesh,
    matrix_specs,
    merge_raw,
    scaled_atol,
    split_raw,
)

SPECS = LOSSES + QUEUE_VARIANTS
INFO = {wi.fn_name: wi for wi in W.infos()}


# ----------------------------------------------------------------------------- shims
def _split_call(wi: W.WrapperInfo, args, kwargs):
    """The pure call's arrays, hyperparameters, state and key, by name."""
    a = inspect.signature(wi.fn).bind(*args, **kwargs).arguments
    arrays = {p.name: a[p.name] for p in wi.arrays if p.name in a}
    hyper = {k: a[k] for k in wi.hypers if k in a}
    state = a.get(wi.state_param) if wi.state_param else None
    key = a.get(wi.key_param) if wi.key_param else None
    return arrays, hyper, state, key


def _nnx_shim(wi: W.WrapperInfo, per_call: frozenset[str]):
    """Hyperparameters in ``per_call`` go to the call, the others to the constructor."""
    cls = N.LOSS_CLASSES[wi.fn_name]

    def shim(*args, **kwargs):
        arrays, hyper, state, key = _split_call(wi, args, kwargs)
        ctor = {k: v for k, v in hyper.items() if k not in per_call}
        call = {k: v for k, v in hyper.items() if k in per_call}
        module = cls(**ctor, **({"state": state} if wi.stateful else {}))
        out = module(**arrays, **call, **({"key": key} if wi.key_param else {}))
        return (out, module.loss_state.get_value()) if wi.stateful else out

    return shim


def _linen_shim(wi: W.WrapperInfo, per_call: frozenset[str]):
    """The other split: hyperparameters in ``per_call`` go to the constructor."""
    cls = L.LOSS_CLASSES[wi.fn_name]

    def shim(*args, **kwargs):
        arrays, hyper, state, key = _split_call(wi, args, kwargs)
        ctor = {k: v for k, v in hyper.items() if k in per_call}
        call = {k: v for k, v in hyper.items() if k not in per_call}
        extra = {"key": key} if wi.key_param else {}
        if not wi.stateful:
            return cls(**ctor).apply({}, **arrays, **call, **extra)
        out, variables = cls(**ctor).apply({L.COLLECTION: {"state": state}}, **arrays,
                                           **call, **extra, mutable=[L.COLLECTION])
        return out, variables[L.COLLECTION]["state"]

    return shim


_SHIM_CALLS: list[str] = []


@contextlib.contextmanager
def _patched(spec, shim):
    """Replace the pure function by ``shim`` wherever ``spec.apply`` finds it: the
    ``sslloss_jax`` attribute (looked up at call time) and the closure cells of the
    registry's helpers (``_stateless(S.f)`` etc., which captured the function)."""
    original = getattr(S, spec.name)
    cells, applies = [], [spec.apply]
    while applies:  # variants (e.g. the tiled ones) wrap the base entry's apply
        for c in applies.pop().__closure__ or ():
            if c.cell_contents is original:
                cells.append(c)
            elif hasattr(c.cell_contents, "apply"):
                applies.append(c.cell_contents.apply)
    def counted(*args, **kwargs):
        _SHIM_CALLS.append(spec.name)
        return shim(*args, **kwargs)

    setattr(S, spec.name, counted)
    for c in cells:
        c.cell_contents = counted
    try:
        yield
    finally:
        setattr(S, spec.name, original)
        for c in cells:
            c.cell_contents = original


def _inputs(spec, batch=8, dim=6, seed=0):
    ex = spec.example(np.random.default_rng(seed), batch, dim)
    return tuple(jnp.asarray(x) for x in ex.batch), ex.state


@pytest.mark.parametrize("spec", matrix_specs(), ids=lambda s: s.id)
def test_nnx_and_linen_equal_the_pure_function(spec):
    """Loss, input gradients and new state: NNX == Linen == the pure function (one jit
    traces all three), with non-default hyperparameters (split between constructor and
    call)."""
    wi = INFO[spec.name]
    batch, state = _inputs(spec)
    hyper = {k: v[1] for k, v in spec.traced_hyper.items()}
    per_call = frozenset(hyper)
    enc, raw = split_raw(spec, batch)

    def value_and_grad(enc):
        f = lambda enc: spec.apply(merge_raw(spec, enc, raw), state, **hyper)
        return jax.value_and_grad(f, has_aux=True)(enc)

    @jax.jit
    def all_three(enc):
        out = [value_and_grad(enc)]
        for make in (_nnx_shim, _linen_shim):
            with _patched(spec, make(wi, per_call)):
                out.append(value_and_grad(enc))
        return out

    _SHIM_CALLS.clear()
    pure, nnx_out, linen_out = all_three(enc)
    assert _SHIM_CALLS == [spec.name] * 2, "the shims were not called"
    for name, actual in (("nnx", nnx_out), ("linen", linen_out)):
        assert_tree_close(actual, pure, rtol=1e-6, atol=scaled_atol(pure, 1e-6),
                          err_msg=f"{spec.id} {name}")


# ----------------------------------------------------------------------------- the classes
def test_every_registry_entry_has_wrappers():
    missing = sorted({s.name for s in SPECS} - set(N.LOSS_CLASSES))
    assert not missing, f"registry entries without a Flax wrapper (add a row to " \
                        f"sslloss_jax/_wrappers.py WRAPPERS): {missing}"
    assert set(N.LOSS_CLASSES) == set(L.LOSS_CLASSES)


@pytest.mark.parametrize("flavour", [N, L], ids=["nnx", "linen"])
def test_generated_classes_are_proper_classes(flavour):
    base = nnx.Module if flavour is N else nn.Module
    names = [c.__name__ for c in flavour.LOSS_CLASSES.values()]
    assert len(names) == len(set(names))
    for fn_name, cls in flavour.LOSS_CLASSES.items():
        wi = INFO[fn_name]
        assert issubclass(cls, base)
        assert cls.__name__ == cls.__qualname__ == wi.class_name
        assert cls.__module__ == flavour.__name__
        assert getattr(flavour, cls.__name__) is cls and cls.__name__ in flavour.__all__
        assert cls.pure_function is getattr(S, fn_name)
        doc = cls.__doc__
        assert f":func:`sslloss_jax.{fn_name}`" in doc
        for k in wi.hypers:
            assert f"  {k}: " in doc, (cls, k)
        if wi.stateful:
            assert wi.state_kind in doc
        assert list(inspect.signature(cls.__call__).parameters)[1:len(wi.arrays) + 1] == [
            p.name for p in wi.arrays]
    for lightly_name in ("NTXentLoss", "DCLLoss", "DCLWLoss", "BarlowTwinsLoss", "VICRegLoss",
                         "DINOLoss", "TiCoLoss", "SwaVLoss", "MSNLoss", "PMSNLoss",
                         "IBOTPatchLoss", "IBOTPlusPlusPatchLoss", "KoLeoLoss", "CAPILoss",
                         "CO2Regularizer", "WMSELoss", "NegativeCosineSimilarity",
                         "HypersphereLoss", "SupConLoss", "CLIPLoss", "SigLIPLoss"):
        assert hasattr(flavour, lightly_name)


def test_nnx_constructor_defaults_and_errors():
    m = N.DINOLoss(output_dim=8)
    assert (m.teacher_temp, m.student_temp, m.center_momentum) == (0.04, 0.1, 0.9)
    assert isinstance(m.loss_state, N.LossState) and isinstance(m.loss_state, nnx.BatchStat)
    assert m.loss_state.get_value().center.shape == (8,)
    with pytest.raises(TypeError, match="output_dim"):
        N.DINOLoss()
    with pytest.raises(TypeError, match="temprature"):
        N.NTXentLoss(temprature=0.1)
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        N.NTXentLoss()(jnp.ones((2, 3)), jnp.ones((2, 3)), temprature=0.1)
    with pytest.raises(TypeError, match="PRNG key"):
        N.NTXentMemoryBankLoss(memory_bank_size=(8, 3))
    with pytest.raises(TypeError, match="target_distribution"):
        N.PMSNCustomLoss()(jnp.ones((2, 4, 3)), jnp.ones((4, 3)), jnp.ones((5, 3)))


def test_import_sslloss_jax_does_not_import_flax():
    code = "import sys, sslloss_jax, sslloss_jax._registry, sslloss_jax._wrappers; " \
           "print([m for m in sys.modules if m.split('.')[0] in ('flax', 'optax', 'orbax')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ----------------------------------------------------------------------------- state / eval
def _dino_inputs(batch=8, k=6, seed=0):
    rng = np.random.default_rng(seed)
    views = [jnp.asarray(rng.standard_normal((batch, k)), jnp.float32) for _ in range(3)]
    return views[:2], views


def test_update_flag_and_linen_init_do_not_touch_the_state():
    teacher, student = _dino_inputs()
    m = N.DINOLoss(output_dim=6)
    before = m.loss_state.get_value()
    m(teacher, student, update=False)
    assert_tree_close(m.loss_state.get_value(), before, rtol=0)
    m.update = False
    m(teacher, student)
    assert_tree_close(m.loss_state.get_value(), before, rtol=0)
    model = nnx.Dict(loss=m)
    model.train(update=True)  # set_attributes through a whole model
    m(teacher, student)
    expected = S.dino_loss(teacher, student, before)[1]
    assert_tree_close(m.loss_state.get_value(), expected, rtol=0)
    model.eval(update=False)
    assert m.update is False

    lm = L.DINOLoss(output_dim=6)
    variables = lm.init(jax.random.key(0), teacher, student)
    assert_tree_close(variables[L.COLLECTION]["state"], S.init_dino_state(6), rtol=0)
    loss = lm.apply(variables, teacher, student, update=False)  # evaluation: not mutable
    np.testing.assert_array_equal(loss, S.dino_loss(teacher, student, S.init_dino_state(6))[0])


@pytest.mark.parametrize("fn_name", ["swav_queue_update", "memory_bank_enqueue"])
def test_queue_modules_return_the_state_before_the_update(fn_name):
    rng = np.random.default_rng(0)
    feats: Any
    sizes: dict[str, Any]
    state0: Any
    if fn_name == "swav_queue_update":
        feats = [jnp.asarray(rng.standard_normal((4, 3)), jnp.float32) for _ in range(2)]
        sizes, state0 = {"n_crops": 2, "size": 6, "dim": 3}, S.init_swav_queue(2, 6, 3)
        nnx_kw: dict = {}
    else:
        feats = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
        sizes = {"memory_bank_size": (6, 3)}
        state0 = S.init_memory_bank(nnx.Rngs(0).params(), 6, 3)
        nnx_kw = {"rngs": nnx.Rngs(0)}
    expected = getattr(S, fn_name)(state0, feats)
    m = N.LOSS_CLASSES[fn_name](**sizes, **nnx_kw)
    assert_tree_close(m(feats), state0, rtol=0)
    assert_tree_close(m.loss_state.get_value(), expected, rtol=0)
    lm = L.LOSS_CLASSES[fn_name](state=state0)
    old, variables = lm.apply({}, feats, mutable=[L.COLLECTION])
    assert_tree_close((old, variables[L.COLLECTION]["state"]), (state0, expected), rtol=0)


def test_rng_streams():
    """NNX draws its per-call key from the module's ``rngs`` ("loss" stream); Linen from
    the ``"loss"`` rng of ``apply``; both are reproducible and a new draw every call."""
    x = [jnp.asarray(np.random.default_rng(0).standard_normal((16, 3)), jnp.float32)] * 2
    kw = {"num_vectors": 8}
    m = N.SIGReg(**kw, rngs=nnx.Rngs(loss=3))
    first, second = m(x), m(x)
    stream = nnx.Rngs(loss=3)
    np.testing.assert_array_equal(first, S.sigreg(x, stream.loss(), **kw))
    np.testing.assert_array_equal(second, S.sigreg(x, stream.loss(), **kw))
    assert first != second
    np.testing.assert_array_equal(N.SIGReg(**kw, rngs=nnx.Rngs(loss=3))(x), first)
    lm = L.SIGReg(**kw)
    a = lm.apply({}, x, rngs={"loss": jax.random.key(1)})
    np.testing.assert_array_equal(a, lm.apply({}, x, rngs={"loss": jax.random.key(1)}))
    assert a != lm.apply({}, x, rngs={"loss": jax.random.key(2)})
    np.testing.assert_array_equal(lm.apply({}, x, key=jax.random.key(5)),
                                  S.sigreg(x, jax.random.key(5), **kw))


# ----------------------------------------------------------------------------- transforms
def test_nnx_jit_value_and_grad_traced_schedule_never_retraces():
    """A model and a DINOLoss under ``nnx.jit`` + ``nnx.value_and_grad``: the gradient is
    w.r.t. the parameters only, the center is updated, and a traced ``teacher_temp``
    changing every step does not retrace."""
    rng = np.random.default_rng(0)
    w0 = jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)
    crops = [jnp.asarray(rng.standard_normal((8, 5)), jnp.float32) for _ in range(3)]

    class Model(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(w0)
            self.loss = N.DINOLoss(output_dim=6)

    traces = []

    @nnx.jit
    def step(model, temp):
        traces.append(1)

        def loss_fn(model):
            z = [c @ model.w[...] for c in crops]
            return model.loss(z[:2], z, teacher_temp=temp)

        return nnx.value_and_grad(loss_fn)(model)

    model, state = Model(), S.init_dino_state(6)
    for epoch in range(3):
        temp = S.dino_teacher_temperature(jnp.float32(epoch), teacher_temp=0.07,
                                          warmup_teacher_temp_epochs=2)
        loss, grads = step(model, temp)

        def pure(w, state=state, temp=temp):
            z = [c @ w for c in crops]
            return S.dino_loss(z[:2], z, state, teacher_temp=temp)

        (expected, state), gw = jax.value_and_grad(pure, has_aux=True)(w0)
        np.testing.assert_allclose(loss, expected, rtol=1e-6)
        np.testing.assert_allclose(grads["w"][...], gw, rtol=1e-5, atol=1e-6)
        assert_tree_close(model.loss.loss_state.get_value(), state, rtol=1e-6, atol=1e-7)
        assert set(nnx.state(grads).keys()) == {"w"}
    assert len(traces) == 1


_SHARDED = {  # constructor of each flavour, call arrays (global batch 16)
    "dino": (lambda F, **kw: F.DINOLoss(output_dim=5, **kw), lambda v: (v[:2], v)),
    "memory_bank": (lambda F, **kw: F.NTXentMemoryBankLoss(
        state=S.init_memory_bank(jax.random.key(0), 20, 5), temperature=0.2, **kw),
        lambda v: (v[0], v[1])),
    "wmse": (lambda F, **kw: F.WMSELoss(
        embedding_dim=5, w_size=16, eps=0.1, **kw,
        **({"rngs": nnx.Rngs(loss=7)} if F is N else {})), lambda v: (v[:2],)),
}


@pytest.mark.parametrize(("case", "flavour"), [("dino", N), ("wmse", N), ("memory_bank", L),
                                               ("wmse", L)],
                         ids=["dino-nnx", "wmse-nnx", "memory_bank-linen", "wmse-linen"])
def test_wrappers_under_shard_map_equal_one_device(case, flavour):
    """Four fake devices, ``axis_name="data"``: the loss and the state after the step
    (with the NNX rng count) equal one device holding the global batch."""
    make, arrays = _SHARDED[case]
    rng = np.random.default_rng(1)
    views = tuple(jnp.asarray(rng.standard_normal((16, 5)), jnp.float32) for _ in range(3))
    mesh = make_mesh(4)
    if flavour is N:
        def run(module, views):
            graphdef, state = nnx.split(module)

            def step(state, views):
                m = nnx.merge(graphdef, state)
                loss = m(*arrays(list(views)))
                return loss, nnx.state(m)

            sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")),
                                    out_specs=(P(), P()))
            loss, new_state = jax.jit(sharded)(state, views)
            return loss, nnx.to_pure_dict(new_state)

        single = make(N)
        loss = single(*arrays(list(views)))
        expected = (loss, nnx.to_pure_dict(nnx.state(single)))
        actual = run(make(N, axis_name="data"), views)
    else:
        def run_linen(module, views, rngs):
            variables = module.init({"params": jax.random.key(0)}, *arrays(list(views)))

            def step(variables, views):
                return module.apply(variables, *arrays(list(views)), rngs=rngs,
                                    mutable=[L.COLLECTION])

            if module.axis_name is None:
                return jax.jit(step)(variables, views)
            sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")),
                                    out_specs=(P(), P()))
            return jax.jit(sharded)(variables, views)

        rngs = {"loss": jax.random.key(3)}
        expected = run_linen(make(L), views, rngs)
        actual = run_linen(make(L, axis_name="data"), views, rngs)
    del_keys = lambda t: jax.tree.map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        else x, t)
    expected, actual = del_keys(expected), del_keys(actual)
    assert_tree_close(actual, expected, rtol=1e-5, atol=scaled_atol(expected, 1e-5),
                      err_msg=case)
