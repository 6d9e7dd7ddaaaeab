"""The benchmark harness runs end to end in smoke mode and writes well-formed results (speeds not asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("ingest", "stac_api", "synth", "store_choice", "loader", "train_step", "forecast", "model", "scaling",
              "dashboard", "skill", "efficiency")
PLOTS = {"scaling": ["scaling.png"]}  # benchmark -> the PNG files it must write next to its JSON
SIGNED = ("_exponent",)  # headline metrics that may be zero or negative (fitted exponents)
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
        assert math.isfinite(value), (metric, value)
        assert value > 0 or metric.endswith(SIGNED), (metric, value)
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
    assert ingest["zarr_source"]["values_equal"]  # the same pixels as a Zarr datacube make the same cube
    stac_api = json.loads((smoke_results / "stac_api.json").read_text())["results"]
    assert stac_api["values_equal"]  # items from a STAC API over HTTP make the cube their local files make
    insert = json.loads((smoke_results / "store_choice.json").read_text())["results"]["insert"]
    assert insert["icechunk"]["correct"] and insert["plain_zarr_wal"]["correct"]
    loader = json.loads((smoke_results / "loader.json").read_text())["results"]
    assert loader["same_data_a_b"]  # CubeWindows items equal the normalised raw Zarr read


@pytest.mark.timeout(920)
@pytest.mark.parametrize("name", sorted(PLOTS))
def test_plots(smoke_results: Path, name: str) -> None:
    from PIL import Image

    doc = json.loads((smoke_results / f"{name}.json").read_text())
    readme = (smoke_results / "README.md").read_text()
    for png in PLOTS[name]:
        assert png in doc["artifacts"]
        path = smoke_results / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()  # chunk structure and CRCs
        with Image.open(path) as im:
            im.load()  # decodes the pixels
            assert im.format == "PNG" and im.width >= 400 and im.height >= 200
        assert f"]({png})" in readme


@pytest.mark.timeout(920)
def test_scaling_results(smoke_results: Path) -> None:
    res = json.loads((smoke_results / "scaling.json").read_text())["results"]
    sizes = res["params"]["sizes"]
    assert len(sizes) >= 2 and sizes == sorted(sizes)
    for stage in ("ingest", "loader", "train", "forecast", "anomaly"):
        r = res["stages"][stage]
        assert len(r["seconds"]) == len(sizes) and all(t > 0 for t in r["seconds"])
        assert len(r["peak_rss_MiB"]) == len(sizes) and all(m > 0 for m in r["peak_rss_MiB"])
        assert math.isfinite(r["time_exponent"]) and math.isfinite(r["memory_exponent"])
    assert res["throughput"]["loader_windows"][-1] > res["throughput"]["loader_windows"][0]


def test_fit_exponent() -> None:
    from benchmarks.bench_scaling import fit_exponent, segment_exponents

    area = [1.0, 4.0, 16.0]
    assert fit_exponent(area, [2.0, 8.0, 32.0]) == pytest.approx(1.0)
    assert fit_exponent(area, [3.0, 3.0, 3.0]) == pytest.approx(0.0, abs=1e-12)
    assert fit_exponent(area, [1.0, 8.0, 64.0]) == pytest.approx(1.5)
    assert segment_exponents(area, [1.0, 4.0, 32.0]) == pytest.approx([1.0, 1.5])


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
    assert set(fs) == {"model", "pixel", "persistence", "climatology", "damped_anomaly", "harmonic",
                       "bfast"}
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


def test_benchmark_regions_are_reused(tmp_path):
    """A synthetic source region a benchmark already generated is reused, not generated again (the generator
    records its options in synth.json; the benchmarks' regions have them off), and one generated with other
    parameters is replaced."""
    from benchmarks.bench_ingest import source_region

    out, gen_s = source_region(tmp_path, 64, "2021-01-01", "2021-02-28", 5)
    assert gen_s is not None and (out / "synth.json").exists()
    assert source_region(tmp_path, 64, "2021-01-01", "2021-02-28", 5) == (out, None)
    meta = json.loads((out / "synth.json").read_text())
    meta["parameters"]["crop_rotation"] = True
    (out / "synth.json").write_text(json.dumps(meta))
    assert source_region(tmp_path, 64, "2021-01-01", "2021-02-28", 5)[1] is not None
    meta = json.loads((out / "synth.json").read_text())
    meta["version"] -= 1  # an older generator's region: other pixels for the same parameters
    (out / "synth.json").write_text(json.dumps(meta))
    assert source_region(tmp_path, 64, "2021-01-01", "2021-02-28", 5)[1] is not None
