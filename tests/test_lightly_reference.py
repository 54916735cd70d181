"""lightly's own published numbers (reference/lightly.md §5, float32, CPU) and its DDP
training reference: 10 full-batch SGD steps of a linear model, on one device and on two
(shard_map), land on lightly's final weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sslloss_jax as S
from tests._harness import make_mesh


def _r(seed, shape):
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


X0, X1 = _r(0, (6, 8)), _r(1, (6, 8))

VALUES = [
    ("barlow", lambda: S.barlow_twins_loss(X0, X1), 3.370358),
    ("ntxent_0.5", lambda: S.ntxent_loss(X0, X1, temperature=0.5), 2.162754),
    ("ntxent_0.1", lambda: S.ntxent_loss(X0, X1, temperature=0.1), 3.890141),
    ("dcl", lambda: S.dcl_loss(X0, X1), 3.289179),
    ("dclw", lambda: S.dclw_loss(X0, X1), 5.493535),
    ("negcos", lambda: S.negative_cosine_similarity(X0, X1), -0.268859),
    ("hypersphere", lambda: S.hypersphere_loss(X0, X1), -0.218675),
    ("vicreg", lambda: S.vicreg_loss(X0, X1), 45.169674),
]


@pytest.mark.parametrize("name,fn,expected", VALUES, ids=[v[0] for v in VALUES])
def test_lightly_published_values(name, fn, expected):
    np.testing.assert_allclose(fn(), expected, rtol=1e-5)


W0 = np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 0.7, 0.8, 0.9, 1.0]], np.float32)
X = np.arange(80, dtype=np.float32).reshape(8, 2, 5)
Y = np.arange(32, dtype=np.float32).reshape(8, 2, 2).reshape(8, 4)
FINAL = {
    "ntxent": [[0.1675, 0.2676, 0.3678, 0.4679, 0.5680],
               [0.5763, 0.6742, 0.7721, 0.8700, 0.9679]],
    "dcl": [[0.3288, 0.4244, 0.5200, 0.6155, 0.7111],
            [0.5012, 0.5941, 0.6871, 0.7801, 0.8731]],
}
LOSS = {"ntxent": S.ntxent_loss, "dcl": S.dcl_loss}


def _objective(name, w, x, y, axis_name=None):
    out = jnp.einsum("bvi,oi->bvo", x, w).reshape(x.shape[0], -1)  # torch Linear(5, 2)
    return LOSS[name](out, y, axis_name=axis_name)


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("name", ["ntxent", "dcl"])
def test_lightly_ddp_training_reference(name, devices):
    if devices == 1:
        grad = jax.jit(jax.grad(functools.partial(_objective, name)))
    else:
        grad = jax.jit(jax.shard_map(
            jax.grad(functools.partial(_objective, name, axis_name="data")),
            mesh=make_mesh(devices), in_specs=(P(), P("data"), P("data")), out_specs=P()))
    w = jnp.asarray(W0)
    for _ in range(10):
        w = w - 0.1 * grad(w, X, Y)
    np.testing.assert_allclose(w, FINAL[name], atol=1.5e-4)
