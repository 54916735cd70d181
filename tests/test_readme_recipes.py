"""The README's distributed train-step recipes are executed verbatim and must reproduce
single-device training on the global batch (parameters, memory bank, loss)."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslloss_jax._registry import markdown_table
from tests._harness import assert_tree_close

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def _section(title):
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def _recipes():
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", _section("Distributed training"), re.S):
        exec(compile(block, "README.md", "exec"), namespace)
    return namespace


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
