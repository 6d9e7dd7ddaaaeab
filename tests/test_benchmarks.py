"""The benchmark harness runs end to end in smoke mode and writes well-formed results (speeds not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("ingest", "synth", "store_choice", "loader", "train_step", "forecast", "dashboard", "skill", "efficiency")
KEYS = {"name", "mode", "machine", "started", "seconds", "results", "targets", "status"}
MACHINE_KEYS = {"cpu", "cores", "ram_gib", "python", "platform", "versions", "git_commit"}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench_out")
    work = tmp_path_factory.mktemp("bench_work")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out), "--work", str(work)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.timeout(920)
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


@pytest.mark.timeout(920)
def test_readme(smoke_results: Path) -> None:
    readme = (smoke_results / "README.md").read_text()
    for name in BENCHMARKS:
        assert f"## {name}" in readme
        doc = json.loads((smoke_results / f"{name}.json").read_text())
        for metric in doc["results"]["headline"]:
            assert any(line.startswith(f"| {metric} |") for line in readme.splitlines()), metric
    assert "Machine:" in readme


@pytest.mark.timeout(920)
def test_correctness_checks(smoke_results: Path) -> None:
    ingest = json.loads((smoke_results / "ingest.json").read_text())["results"]
    assert ingest["cubes_identical"] and ingest["bytes_match"]
    insert = json.loads((smoke_results / "store_choice.json").read_text())["results"]["insert"]
    assert insert["icechunk"]["correct"] and insert["plain_zarr_wal"]["correct"]
    loader = json.loads((smoke_results / "loader.json").read_text())["results"]
    assert loader["same_data_a_b"]  # CubeWindows items equal the normalised raw Zarr read


def _png_ok(path: Path) -> None:
    """A complete PNG: signature, IHDR with a non-empty image, IEND at the end; matplotlib reads it back."""
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 300 and height >= 200, (width, height)
    assert data[-8:-4] == b"IEND", path  # the last chunk: the file is complete
    assert mpimg.imread(path).shape[:2] == (height, width)


@pytest.mark.timeout(920)
def test_skill_and_efficiency_files(smoke_results: Path) -> None:
    """Skill and efficiency results carry every method's table and their plots (numbers not asserted)."""
    readme = (smoke_results / "README.md").read_text()
    skill = json.loads((smoke_results / "skill.json").read_text())["results"]
    fs = skill["report"]["ndvi_forecast"]
    assert set(fs) == {"model", "pixel", "persistence", "climatology", "harmonic", "bfast"}
    leads = {f"{ld:g}" for ld in skill["params"]["leads"]}
    for by_lead in fs.values():
        assert set(by_lead) == leads and all({"rmse", "mae", "n_pixels"} <= set(v) for v in by_lead.values())
    assert {"model", "harmonic", "bfast"} <= set(skill["report"]["anomaly_auroc"])
    for who in ("harmonic", "bfast"):
        assert {"precision", "recall", "f1", "false_alarms_normal_change",
                "median_detection_delay_days"} <= set(skill["report"]["baseline_alerts"][who])
    assert {"all", "held_out"} <= set(skill["events"])
    assert "| pixel baseline |" in readme and "| bfast (BFAST-style) |" in readme
    eff = json.loads((smoke_results / "efficiency.json").read_text())["results"]
    for kind in ("jepa", "pixel"):
        c = eff["curves"][kind]
        n = len(eff["params"]["checkpoints"])
        assert len(c["steps"]) == len(c["flops"]) == len(c["train_s"]) == len(c["rmse"]) == n
        assert all(b > a for a, b in zip(c["flops"], c["flops"][1:], strict=False))
        assert eff["flops_per_step"][kind] > 0
    assert {"flops", "train_s"} <= set(eff["ratios"]) and "ratio_pixel_over_jepa" in eff["ratios"]["flops"]
    for doc, png in ((skill, "skill_rmse_by_lead.png"), (eff, "efficiency.png")):
        assert doc["figures"] == [png]
        _png_ok(smoke_results / png)
        assert f"]({png})" in readme
