"""Smoke tests of the benchmark runner (benchmarks/run.py): it covers every registry loss,
and a quick run of two rows produces every column. Timings themselves are never asserted
(they belong to benchmarks, not to tests)."""

from __future__ import annotations

import json

import pytest

from sslloss_jax import _registry
from tests._harness import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/run.py", "bench_run")


def test_every_registry_loss_has_a_row(bench):
    rows = bench.all_rows()
    covered = {r.loss if r.registry else bench.LOSSES[r.loss].ours for r in rows}
    missing = {spec.name for spec in _registry.LOSSES} - covered
    assert not missing, f"losses without a benchmark row: {sorted(missing)}"
    names = [r.name for r in rows]
    assert len(names) == len(set(names)), "row names must be unique (--rows selects by them)"


def test_curated_rows_name_real_functions(bench):
    import sslloss_jax as S

    for key, loss in bench.LOSSES.items():
        assert callable(getattr(S, loss.ours)), key
        assert loss.floor in bench.FLOOR_NOTES, (key, loss.floor)
    for name, floor in bench.REGISTRY_FLOORS.items():
        assert name in {s.name for s in _registry.LOSSES} and floor in bench.FLOOR_NOTES


def test_quick_run_reports_every_column(bench, tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = bench.main(["--quick", "--no-lightly", "--rows", "ntxent b32,mocov3_loss",
                       "--json", str(out_json), "--md", str(out_md)])
    assert code == 0
    data = json.loads(out_json.read_text())
    assert [r["name"] for r in data["rows"]] == ["ntxent b32 d64",
                                                 "mocov3_loss b32 d64 (registry example)"]
    for row in data["rows"]:
        ours = row["sides"]["ours"]
        assert "error" not in ours, ours
        for key in ("median_ms", "min_ms", "compile_ms", "floor_median_ms"):
            assert ours[key] > 0, (row["name"], key)
        assert ours["peak_mib"] >= 0 and ours["program_mib"] > 0
        assert ours["retraces"] == 0
        assert row["roofline"] > 0
    assert any(t["target"].startswith("0 retraces") and t["pass"] for t in data["targets"])
    md = out_md.read_text()
    assert "| row | ours ms |" in md and "roofline" in md and "gram_exp" in md
    assert "ntxent b32 d64" in capsys.readouterr().out


def test_retrace_counter_sees_a_drifting_state(bench):
    import jax.numpy as jnp

    def loss(x, state):  # the new state has another dtype: the next call retraces
        value = jnp.sum(x) * jnp.sum(state).astype(jnp.float32)
        return value, (state + 1).astype(jnp.float16)

    assert bench.count_retraces(loss, (jnp.ones(3),), (jnp.ones(3),), True) >= 1
    same = lambda x, state: (jnp.sum(x * state), state + 1)
    assert bench.count_retraces(same, (jnp.ones(3),), (jnp.ones(3),), True) == 0


def test_merge_picks_each_rows_median_run(bench, tmp_path, capsys):
    """``--merge``: each row comes whole from the run with its median ratio (the upper
    one of an even count; rows without lightly by ours' time), every run's figures are
    kept, and the targets are checked on the merged table."""
    code = bench.main(["--quick", "--no-lightly", "--rows", "ntxent b32",
                       "--json", str(tmp_path / "one.json")])
    assert code == 0
    base = json.loads((tmp_path / "one.json").read_text())
    row = base["rows"][0]

    def run(ratio, ours_ms):
        sides = {"ours": {**row["sides"]["ours"], "median_ms": ours_ms},
                 "lightly": {"median_ms": ours_ms / ratio}}
        reg = {**row, "name": "reg", "ratio": None, "sides": {"ours": sides["ours"]}}
        return {**base, "rows": [{**row, "ratio": ratio, "sides": sides}, reg]}

    paths = []
    for i, (r, ms) in enumerate([(0.5, 5.0), (0.9, 1.0), (0.3, 3.0)]):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run(r, ms)))
    out = tmp_path / "merged.json"
    assert bench.main(["--merge", *map(str, paths), "--json", str(out)]) == 0
    merged = json.loads(out.read_text())
    first, reg = merged["rows"]
    assert first["ratio"] == 0.5 and first["sides"]["ours"]["median_ms"] == 5.0
    assert [r["ratio"] for r in first["runs"]] == [0.5, 0.9, 0.3]
    assert reg["sides"]["ours"]["median_ms"] == 3.0  # the median of 5, 1, 3 ms
    assert merged["merged_runs"] == 3
    assert any(t["target"].startswith("geometric mean") for t in merged["targets"])
    assert "median ratio" in capsys.readouterr().out
    # an even count takes the upper middle (the conservative one)
    assert bench.main(["--merge", *map(str, paths[:2]), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["ratio"] == 0.9


def test_gpu_platform_settings(bench):
    """``--platform gpu``: JAX on CUDA without preallocation (lightly's worker shares the
    device), both workers of a row set up at once, and the report names the GPU; the CPU
    default pins JAX to the CPU. (The GPU run itself needs a GPU: benchmarks/README.)"""
    assert bench.parse_args([]).platform == "cpu"
    assert bench.parse_args(["--platform", "gpu"]).platform == "gpu"
    with pytest.raises(SystemExit):
        bench.parse_args(["--platform", "tpu"])
    cpu, gpu = bench.worker_env("cpu"), bench.worker_env("gpu")
    assert cpu["JAX_PLATFORMS"] == "cpu" and "XLA_PYTHON_CLIENT_PREALLOCATE" not in cpu
    assert gpu["JAX_PLATFORMS"] == "cuda" and gpu["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    meta = {"cpu": {"model": "host", "cores": 16}, "ours": {"device": "NVIDIA H100"},
            "lightly": {}, "settings": {"platform": "gpu"}}
    assert bench.machine(meta).startswith("GPU NVIDIA H100") and "host host" in bench.machine(meta)
    assert bench.machine({**meta, "settings": {}}) == "host (16 cores)"
    # ours' memory on a GPU is XLA's (JAX's allocator peak includes compile-time autotuning)
    row = {"name": "r", "ratio": None, "others_cpu": 0.0,
           "sides": {"ours": {"peak_mib": 130.0, "program_mib": 1.5}}}
    assert bench.table_rows([row], gpu=True)[0][9] == "1.5"
    assert bench.table_rows([row])[0][9] == "130.0"


def test_interrupted_run_can_be_reported(bench, tmp_path, monkeypatch):
    """The JSON written after every row carries the run's meta, so ``--merge`` reports a
    run cut short (as on a lent GPU machine's time limit)."""
    part = tmp_path / "part.json"
    with monkeypatch.context() as m:  # the run stops before its final report
        m.setattr(bench, "finish", lambda *args: 0)
        assert bench.main(["--quick", "--no-lightly", "--rows", "ntxent b32", "--json",
                           str(part)]) == 0
    data = json.loads(part.read_text())
    assert data["partial"] and data["settings"]["platform"] == "cpu" and data["ours"]["jax"]
    assert bench.main(["--merge", str(part), "--md", str(tmp_path / "part.md")]) == 0
    assert "ntxent b32 d64" in (tmp_path / "part.md").read_text()
