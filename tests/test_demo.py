"""The end-to-end demo (``python -m sslloss_jax.demo``), run in-process with tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("optax")
pytest.importorskip("flax")

from sslloss_jax import demo  # noqa: E402
from sslloss_jax._registry import LOSSES  # noqa: E402

TINY = ["--steps", "3", "--batch-size", "32", "--arch", "mlp", "--no-progress",
        "--labels-per-class", "3"]


def _main(argv):
    # optax / flax are not clean under the suite's strict dtype promotion
    with jax.numpy_dtype_promotion("standard"):
        return demo.main(argv)


def _check(result, tmp_path, name):
    assert result.loss == name
    assert len(result.losses) == 3
    assert all(abs(v) < 1e6 for v in result.losses)  # finite
    for accs in (result.trained, result.random_init, result.pixels):
        assert set(accs) == {"knn_few", "knn_all", "linear"}
        assert all(0.0 <= v <= 1.0 for v in accs.values())
    assert result.png == os.path.join(str(tmp_path), f"demo_{name}.png")
    with open(result.png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("loss", ["ntxent", "dino_loss", "swav_loss"])
def test_demo_tiny(loss, tmp_path, capsys):
    result = _main(["--loss", loss, "--out", str(tmp_path), *TINY])
    name = demo.resolve_loss(loss)
    _check(result, tmp_path, name)
    out = capsys.readouterr().out
    for line in ("trained", "random init", "raw pixels", "wrote"):
        assert line in out
    assert f"{result.trained['knn_all']:.3f}" in out


def test_bad_loss_name(capsys):
    with pytest.raises(SystemExit) as e:
        _main(["--loss", "not_a_loss", *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown loss 'not_a_loss'" in err and "vicreg_loss" in err and "dino_loss" in err


def test_unsupported_loss_names_reason(capsys):
    with pytest.raises(SystemExit):
        _main(["--loss", "detcon_b", *TINY])
    assert "region masks" in capsys.readouterr().err
    with pytest.raises(ValueError, match="class labels"):
        demo.run("supcon_loss", steps=1, out=None)


def test_every_registry_loss_is_supported_or_explained():
    names = {spec.name for spec in LOSSES}
    assert names == set(demo.ADAPTERS) | set(demo.UNSUPPORTED)
    assert not set(demo.ADAPTERS) & set(demo.UNSUPPORTED)


def test_default_config_learns():
    """The default run (CNN encoder, NT-Xent, batch 256) with fewer steps beats the same
    encoder at its random initialization on the few-label kNN probe."""
    with jax.numpy_dtype_promotion("standard"):
        result = demo.run(steps=100, out=None, progress=False, log=lambda s: None)
    assert result.trained["knn_few"] > result.random_init["knn_few"] + 0.04, result


def test_import_sslloss_jax_stays_light():
    code = ("import sys, sslloss_jax; bad = [m for m in ('flax', 'optax', 'sklearn', "
            "'matplotlib', 'tqdm', 'sslloss_jax.demo') if m in sys.modules]; "
            "assert not bad, bad")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_model_head_options():
    """head_norm="batch" normalizes the head's hidden layer with the applied batch's
    statistics; cosine_head=K gives K cosines (DINO's normalized prototype layer)."""
    import jax.numpy as jnp
    import numpy as np

    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 8, 8)), jnp.float32)
    with jax.numpy_dtype_promotion("standard"):
        model = demo.make_model("mlp", 12, True, head_norm="batch", cosine_head=20)
        params = model.init(jax.random.key(0), x)
        out, inter = model.apply(params, x, capture_intermediates=True)
        assert out["z"].shape == (16, 20) and out["p"].shape == (16, 12)
        assert float(jnp.max(jnp.abs(out["z"]))) <= 1.0 + 1e-6
        normed = inter["intermediates"]["BatchNorm_0"]["__call__"][0]  # scale 1, bias 0
        np.testing.assert_allclose(jnp.mean(normed, 0), 0.0, atol=1e-5)
        np.testing.assert_allclose(jnp.std(normed, 0), 1.0, rtol=1e-3)
        # the probes read h, which the batch statistics of the heads never reach
        np.testing.assert_allclose(model.apply(params, x[:4])["h"], out["h"][:4], rtol=1e-6)
    with pytest.raises(ValueError, match="head_norm"):
        demo.make_model("mlp", 12, False, head_norm="group")
