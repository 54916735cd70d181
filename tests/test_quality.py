"""The learning-quality table (``benchmarks/quality.py``), run in-process in ``--quick`` mode."""

from __future__ import annotations

import json

import jax
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("optax")
pytest.importorskip("flax")

from tests._harness import load_script


def _load_quality():
    return load_script("benchmarks/quality.py", "quality")


def test_quality_quick_and_merge(tmp_path, capsys):
    quality = _load_quality()
    md, js = tmp_path / "q.md", tmp_path / "q.json"
    # optax / flax are not clean under the suite's strict dtype promotion
    with jax.numpy_dtype_promotion("standard"):
        report = quality.main(["--quick", "--losses", "ntxent", "--md", str(md),
                               "--json", str(js)])
        assert json.loads(js.read_text()) == report
        assert md.read_text() in capsys.readouterr().out
        assert report["rerun"] == {}
        # rerun one more loss into the saved report
        merged = quality.main(["--quick", "--losses", "tico_loss", "--merge", str(js),
                               "--md", str(md)])
    assert json.loads(js.read_text()) == merged
    assert {"date", "command", "versions", "platform", "threshold", "settings",
            "total_seconds", "results", "rerun"} <= set(merged)
    assert merged["settings"] == {"steps": 3, "batch_size": 32, "arch": "mlp", "seeds": [0],
                                  "labels_per_class": 5}
    assert list(merged["results"]) == ["ntxent_loss", "tico_loss"]
    assert list(merged["rerun"]) == ["tico_loss"]
    for r in merged["results"].values():
        assert set(r["mean"]) == {"trained", "random_init", "pixels"}
        assert all(0.0 <= v <= 1.0 for who in r["mean"].values() for v in who.values())
        assert r["margin"] == pytest.approx(r["mean"]["trained"]["knn_few"]
                                            - r["mean"]["random_init"]["knn_few"])
        assert r["beats_random_init"] == (r["margin"] >= quality.THRESHOLD)
        assert len(r["seeds"]) == 1
    text = md.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == ["ntxent_loss", "tico_loss"]
    assert all(row.count("|") == 10 for row in rows)
    assert "≥ 0.02" in text and merged["date"][:10] in text and "`tico_loss`" in text


def test_quality_merge_needs_same_settings(tmp_path):
    quality = _load_quality()
    js = tmp_path / "q.json"
    js.write_text(json.dumps({"settings": {"steps": 1}}))
    with pytest.raises(SystemExit) as e:
        quality.main(["--quick", "--merge", str(js)])
    assert e.value.code == 2
