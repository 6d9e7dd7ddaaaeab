"""The benchmark harness runs end to end in smoke mode and writes well-formed results (speeds not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("ingest", "synth", "store_choice", "loader", "train_step", "forecast", "dashboard")
KEYS = {"name", "mode", "machine", "started", "seconds", "results", "targets", "status"}
MACHINE_KEYS = {"cpu", "cores", "ram_gib", "python", "platform", "versions", "git_commit"}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench_out")
    work = tmp_path_factory.mktemp("bench_work")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out), "--work", str(work)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.timeout(320)
@pytest.mark.parametrize("name", BENCHMARKS)
def test_result_json(smoke_results: Path, name: str) -> None:
    doc = json.loads((smoke_results / f"{name}.json").read_text())
    assert KEYS <= set(doc), KEYS - set(doc)
    assert doc["name"] == name and doc["mode"] == "smoke"
    assert doc["status"] == "ok", doc["status"]
    assert MACHINE_KEYS <= set(doc["machine"])
    assert doc["machine"]["cores"] >= 1
    headline = doc["results"]["headline"]
    assert headline
    for metric, value in headline.items():
        assert isinstance(value, int | float) and not isinstance(value, bool), (metric, value)
        assert value > 0, (metric, value)
    for t in doc["targets"].values():
        assert {"metric", "target", "value", "met"} <= set(t)
        assert t["metric"] in headline


@pytest.mark.timeout(320)
def test_readme(smoke_results: Path) -> None:
    readme = (smoke_results / "README.md").read_text()
    for name in BENCHMARKS:
        assert f"## {name}" in readme
        doc = json.loads((smoke_results / f"{name}.json").read_text())
        for metric in doc["results"]["headline"]:
            assert any(line.startswith(f"| {metric} |") for line in readme.splitlines()), metric
    assert "Machine:" in readme


@pytest.mark.timeout(320)
def test_correctness_checks(smoke_results: Path) -> None:
    ingest = json.loads((smoke_results / "ingest.json").read_text())["results"]
    assert ingest["cubes_identical"] and ingest["bytes_match"]
    insert = json.loads((smoke_results / "store_choice.json").read_text())["results"]["insert"]
    assert insert["icechunk"]["correct"] and insert["plain_zarr_wal"]["correct"]
    loader = json.loads((smoke_results / "loader.json").read_text())["results"]
    assert loader["same_data_a_b"]  # CubeWindows items equal the normalised raw Zarr read
