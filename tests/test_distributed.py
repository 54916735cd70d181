"""Distributed equivalence: every loss under shard_map on 8 devices (a local batch of 2)
gives the loss, the gradients (encoder weights and inputs) and the new state of one device
holding the global batch; one loss per family also runs under shard_map on 1, 2 and 4
devices, pmap and named vmap (4 participants), on a 2-D mesh with a tuple axis name, and
under jit on batch-sharded inputs."""

import pytest

from sslloss_jax._registry import get
from tests._harness import (
    FAMILY_REPRESENTATIVES,
    assert_distributed_equivalent,
    matrix_specs,
    spec_params,
)

SPECS = spec_params(matrix_specs())
# The other device counts, pmap and named vmap, the 2-D mesh and the jit-on-sharded-inputs
# paths exercise the collectives helpers and the transforms rather than per-loss logic:
# one loss per family keeps the suite short (every loss still runs under shard_map on 8
# devices).
REPRESENTATIVES = spec_params(FAMILY_REPRESENTATIVES)


@pytest.mark.parametrize("spec", SPECS)
def test_shard_map(spec):
    assert_distributed_equivalent(spec, "shard_map", 8)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("spec", REPRESENTATIVES)
def test_shard_map_other_device_counts(spec, n):
    assert_distributed_equivalent(spec, "shard_map", n)


@pytest.mark.parametrize("spec", REPRESENTATIVES)
def test_shard_map_tuple_axis_name(spec):
    assert_distributed_equivalent(spec, "shard_map_2d", 4)


@pytest.mark.parametrize("mode", ["pmap", "vmap"])
@pytest.mark.parametrize("spec", REPRESENTATIVES)
def test_pmap_and_named_vmap(spec, mode):
    assert_distributed_equivalent(spec, mode, 4)


@pytest.mark.parametrize("spec", REPRESENTATIVES)
def test_jit_with_batch_sharded_inputs(spec):
    assert_distributed_equivalent(spec, "jit", 8)


@pytest.mark.parametrize("method", ["gram", "feature"])
@pytest.mark.parametrize("name", ["barlow_twins_loss", "vicreg_loss"])
@pytest.mark.parametrize("d_out", [5, 24])
def test_redundancy_reduction_paths(name, method, d_out):
    """Both ways of reducing the correlation matrix (gathered Gram vs psum of D×D) are
    exact, whether the global batch (16) is smaller or larger than the dimension."""
    assert_distributed_equivalent(get(name), "shard_map", 4, hyper={"method": method},
                                  d_out=d_out)


@pytest.mark.parametrize("normalize", ["pearson", "none"])
def test_barlow_variants_distributed(normalize):
    assert_distributed_equivalent(get("barlow_twins_loss"), "shard_map", 4,
                                  hyper={"normalize": normalize})


def test_dclw_local_weights_is_lightlys_per_rank_softmax():
    """``local_weights=True`` is not globally exact by design (lightly's DDP behaviour)."""
    with pytest.raises(AssertionError):
        assert_distributed_equivalent(get("dclw_loss"), "shard_map", 4,
                                      hyper={"local_weights": True})


@pytest.mark.parametrize("name", ["dino_loss", "ibot_plus_plus_patch_loss"])
def test_teacher_softmax_and_cross_entropy_in_row_blocks(name, monkeypatch):
    """DINO and iBOT++ with their row statistics in blocks (forced here with one-row
    blocks; on by default past 32 MiB of logits or for rows of 65536): shard_map gives
    the single-device loss, gradients and state."""
    from sslloss_jax import _numerics

    monkeypatch.setattr(_numerics, "_BLOCKED_BYTES", 0)
    monkeypatch.setattr(_numerics, "_ROW_BLOCK_BYTES", 1)  # one row per block
    assert_distributed_equivalent(get(name), "shard_map", 4)


def test_swav_queue_sinkhorn_in_row_blocks(monkeypatch):
    """SwaV with a queue whose Sinkhorn runs in row-block sweeps (forced here with 2-row
    blocks; on by default past 32 MiB of exp array): the column sums are psum'ed per
    sweep, so shard_map gives the single-device loss and gradients."""
    from sslloss_jax import _clustering
    from sslloss_jax._registry import QUEUE_VARIANTS

    monkeypatch.setattr(_clustering, "_BLOCKED_BYTES", 0)
    monkeypatch.setattr(_clustering, "_BLOCK_BYTES", 2 * 16 * 4)
    assert_distributed_equivalent(QUEUE_VARIANTS[0], "shard_map", 4)
