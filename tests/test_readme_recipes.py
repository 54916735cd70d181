"""The README's distributed train-step recipes are executed verbatim and must reproduce
single-device training on the global batch (parameters, memory bank, loss)."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sslloss_jax as S
from sslloss_jax._registry import markdown_table
from tests._harness import assert_tree_close, make_mesh

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def _section(title):
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def _recipes(title="Distributed training", **namespace):
    for block in re.findall(r"```python\n(.*?)```", _section(title), re.S):
        exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def _stateful_recipes(**names):
    """The blocks of the stateful section, which rely on the imports of "A first loss"."""
    return _recipes("Stateful losses: DINO schedule and the SwaV queue", jax=jax, jnp=jnp,
                    ssl=S, **names)


def test_readme_loss_table_matches_the_registry():
    table = README.split("<!-- loss-table:start -->\n")[1].split("<!-- loss-table:end -->")[0]
    assert table.strip() == markdown_table().strip()


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax itself is not strict-clean
        yield


@pytest.mark.parametrize("recipe", ["train_step_shard_map", "train_step_pmap", "train_step_jit"])
def test_recipe_matches_single_device_training(recipe):
    ns = _recipes()
    n_dev, batch, d_in, d_out = jax.device_count(), 16, 6, 4
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((d_in, d_out)), jnp.float32)}
    opt_state = ns["optimizer"].init(params)
    bank = ns["ssl"].init_memory_bank(jax.random.key(0), 20, d_out)
    data = [tuple(jnp.asarray(rng.standard_normal((batch, d_in)), jnp.float32)
                  for _ in range(2)) for _ in range(3)]

    def run(step, prepare):
        state = (params, opt_state, bank)
        losses = []
        for x0, x1 in data:
            *state, loss = step(*state, *prepare(x0), *prepare(x1))
            losses.append(float(loss))  # one step at a time (see the README note)
        return state[0], state[2], losses

    reference = run(ns["train_step_jit"], lambda x: (x,))
    if recipe == "train_step_pmap":
        prepare = lambda x: (x.reshape(n_dev, -1, d_in),)
    elif recipe == "train_step_jit":
        prepare = lambda x: (jax.device_put(x, ns["batch_sharding"]),)
    else:
        prepare = lambda x: (x,)
    actual = run(ns[recipe], prepare)
    assert_tree_close(actual, reference, rtol=1e-5, atol=1e-6, err_msg=recipe)
    assert reference[2][0] != reference[2][-1]  # training moved


def test_dino_schedule_recipe_never_retraces():
    """The README's DINO step: a traced epoch drives the schedule, one compilation serves
    every epoch, and the result is dino_loss at lightly's temperature for that epoch."""
    # traces counted by the teacher function (called only while tracing, once per global
    # crop), not by ``_cache_size()``: jax 0.10.2 stops keeping the C++ fast-path entries
    # of new jits once 8192 others are alive in the process (jax-ml/jax#39078), which a
    # long test worker reaches, and the count then reads 0
    traces = []
    ns = _stateful_recipes(teacher_fn=lambda p, c: (traces.append(1), c @ p)[1],
                           student_fn=lambda p, c: c @ p)
    rng = np.random.default_rng(0)
    params = jnp.asarray(rng.standard_normal((6, 16)), jnp.float32)
    crops = [jnp.asarray(rng.standard_normal((4, 6)), jnp.float32) for _ in range(4)]
    state = S.init_dino_state(16)
    for epoch in (0.0, 7.5, 29.0, 40.0):
        loss, new_state = ns["step"](params, state, crops, jnp.float32(epoch))
        temp = S.dino_teacher_temperature(epoch, teacher_temp=0.07)
        expected, expected_state = S.dino_loss([c @ params for c in crops[:2]],
                                               [c @ params for c in crops], state,
                                               teacher_temp=temp)
        np.testing.assert_allclose(loss, expected, rtol=1e-6)
        np.testing.assert_allclose(new_state.center, expected_state.center, rtol=1e-6,
                                   atol=1e-7)
        state = new_state
    assert len(traces) == 2  # one trace: its two global crops


def test_swav_queue_recipe_under_shard_map_equals_one_device():
    """The README's SwaV step with a queue that fills, then switches on at ``start_step``
    (a traced step, no retrace): under shard_map on every device, the loss, the prototype
    gradients and the queue equal one device holding the global batch."""
    ns = _stateful_recipes()
    swav_step = ns["swav_step"]
    n, batch, dim, k, size = jax.device_count(), 16, 8, 12, 32
    rng = np.random.default_rng(1)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    prototypes = jnp.asarray(unit(rng.standard_normal((k, dim))), jnp.float32)
    steps = [[jnp.asarray(unit(rng.standard_normal((batch, dim))), jnp.float32)
              for _ in range(4)] for _ in range(4)]  # 2 high + 2 low crops per step

    traces = []  # per path; not ``_cache_size()`` (see the DINO recipe's test)

    def make(axis_name):
        def run(high, low, protos, queue, step):
            traces.append(axis_name)
            (loss, queue), grad = jax.value_and_grad(
                lambda p: swav_step(high, low, p, queue, step, start_step=2,
                                    axis_name=axis_name), has_aux=True)(protos)
            return loss, queue, grad
        return run

    single = jax.jit(make(None))
    sharded = jax.jit(jax.shard_map(make("data"), mesh=make_mesh(n),
                                    in_specs=(P("data"), P("data"), P(), P(), P()),
                                    out_specs=(P(), P(), P())))
    queues = [ns["ssl"].init_swav_queue(n_crops=2, size=size, dim=dim)] * 2
    losses, compiled = [], []
    for i, crops in enumerate(steps):
        step = jnp.int32(i)
        out = [fn(crops[:2], crops[2:], prototypes, q, step)
               for fn, q in zip((single, sharded), queues, strict=True)]
        assert_tree_close(out[1], out[0], rtol=1e-5, atol=1e-6, err_msg=f"step {i}")
        queues = [o[1] for o in out]
        losses.append(float(out[0][0]))
        compiled.append((traces.count(None), traces.count("data")))
    assert int(queues[0].filled) == size
    # the queue takes part from step 2 on: the loss differs from the queue-free one there
    no_queue = S.swav_loss([c @ prototypes.T for c in steps[2][:2]],
                           [c @ prototypes.T for c in steps[2][2:]])
    assert abs(losses[2] - float(no_queue)) > 1e-4
    # no compilation once the queue state has its steady sharding (after the first step;
    # the replicated output differs from the freshly built queue's placement)
    assert compiled[1:] == [compiled[1]] * 3


def test_flax_section_runs_and_matches_the_pure_function():
    """The README's NNX and Linen snippets: the wrappers update the DINO center as
    dino_loss does, and update=False leaves it alone."""
    rng = np.random.default_rng(2)
    k = 65536
    teacher = [jnp.asarray(rng.standard_normal((2, k)), jnp.float32) for _ in range(2)]
    student = teacher + [jnp.asarray(rng.standard_normal((2, k)), jnp.float32)]
    temp = jnp.float32(0.05)
    ns = _recipes("Flax and optax", teacher_out=teacher, student_out=student, temp=temp,
                  key=jax.random.key(0))
    expected, state = S.dino_loss(teacher, student, S.init_dino_state(k), teacher_temp=temp)
    np.testing.assert_allclose(ns["loss"], S.dino_loss(teacher, student, S.init_dino_state(k))[0],
                               rtol=1e-6)  # the Linen call (default temperature) ran last
    center = ns["loss_fn"].loss_state.get_value().center  # NNX: one update, then eval
    np.testing.assert_allclose(center, state.center, rtol=1e-6, atol=1e-8)
    linen_center = ns["variables"]["loss_state"]["state"].center
    np.testing.assert_allclose(linen_center, state.center, rtol=1e-6, atol=1e-8)


def test_more_recipes_run():
    """The README's "More recipes" block with small inputs: finite losses, and the
    learnable scales of CLIP and SigLIP receive gradients."""
    rng = np.random.default_rng(3)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    b, d = 6, 8
    ns = _recipes("More recipes", jax=jax, jnp=jnp, ssl=S, B=b, z_view1=arr(b, d),
                  z_view2=arr(b, d), z_view3=arr(b, d), img=arr(b, d), txt=arr(b, d),
                  local_views=[arr(b, d)], global_views=[arr(b, d), arr(b, d)],
                  key=jax.random.key(0), step=3, q1=arr(b, d), q2=arr(b, d), k1=arr(b, d),
                  k2=arr(b, d))
    for name in ("loss", "clip", "siglip", "lejepa", "mocov3", "emp_lightly"):
        assert np.isfinite(float(ns[name])), name
    grads = jax.grad(lambda sc: ns["ssl"].clip_loss(ns["img"], ns["txt"],
                                                     logit_scale=jnp.exp(sc["log_scale"]))
                     + ns["ssl"].siglip_loss(ns["img"], ns["txt"], t=sc["t"], b=sc["b"]))(
        ns["scales"])
    assert all(float(jnp.abs(g)) > 0 for g in jax.tree.leaves(grads))


def test_large_batch_recipes_equal_the_dense_loss():
    """The README's tiled recipes (jit on batch-sharded inputs, and the shard_map ring) give
    the dense single-device loss and gradients."""
    ns = _recipes("Large batches: tiled and ring contrastive losses")
    rng = np.random.default_rng(0)
    n = 4 * jax.device_count()
    z0, z1 = (jnp.asarray(rng.standard_normal((n, 8)), jnp.float32) for _ in range(2))
    dense = jax.value_and_grad(
        lambda a, b: S.ntxent_loss(a, b, temperature=0.1, implementation="dense"),
        argnums=(0, 1))(z0, z1)
    put = lambda x: jax.device_put(x, ns["rows"])
    jit_out = ns["loss_and_grads_jit"](put(z0), put(z1))
    ring_out = ns["loss_and_grads_ring"](z0, z1)
    assert_tree_close(jit_out, dense, rtol=1e-5, atol=1e-6, err_msg="jit")
    assert_tree_close(ring_out, dense, rtol=1e-5, atol=1e-6, err_msg="ring")
