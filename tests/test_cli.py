"""The command line end to end on a small region, with relative paths as a user types them."""

from __future__ import annotations

import json

import pystac
from typer.testing import CliRunner

from catalog.stac import validate_catalog
from geowm.cli import app

runner = CliRunner()


def test_synth_ingest_info_with_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["synth", "region", "--size", "96", "--start", "2021-05-01", "--end", "2021-06-30",
                              "--seed", "5"])
    assert res.exit_code == 0, res.output
    n = json.loads(res.stdout)["n_acquisitions"]
    res = runner.invoke(app, ["ingest", "region/stac/catalog.json", "--cube", "work/cube", "--scheduler", "threads"])
    assert res.exit_code == 0, res.output
    assert "ingested" in res.stderr and "work/catalog/catalog.json" in res.stderr
    res = runner.invoke(app, ["info", "work/cube", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["dims"] == {"time": n, "band": 4, "y": 96, "x": 96}
    assert info["common_names"] == ["blue", "green", "red", "nir"]  # from the synthetic STAC items' eo:bands
    assert info["crs"] == "EPSG:32633" and info["resolution"] == 10.0 and info["tiles"]["count"] == 1
    assert info["time"]["median_gap_days"] == 5.0
    assert 0 < info["clear_fraction"]["mean"] < 1 and len(info["clear_fraction_by_date"]) == n
    assert validate_catalog(tmp_path / "work" / "catalog" / "catalog.json") == []
    cat = pystac.Catalog.from_file(str(tmp_path / "work" / "catalog" / "catalog.json"))
    assert len(list(cat.get_child("sources").get_items())) == n
    res = runner.invoke(app, ["info", "work/cube"])  # the human-readable table
    assert res.exit_code == 0 and "EPSG:32633" in res.stdout and "B02 (blue), B03 (green)" in res.stdout
    res = runner.invoke(app, ["ingest", "region/stac/catalog.json", "--cube", "work/cube"])
    assert res.exit_code == 0 and "nothing new" in res.stderr
    # the region on a grid in degrees (as Earth Engine exports by default): bounds shown to its resolution
    res = runner.invoke(app, ["ingest", "region/stac/catalog.json", "--cube", "work/deg", "--crs", "EPSG:4326",
                              "--resolution", "0.0001", "--scheduler", "synchronous", "--no-catalog"])
    assert res.exit_code == 0, res.output
    west, south, east, north = json.loads(runner.invoke(app, ["info", "work/deg", "--json"]).stdout)["bounds"]
    res = runner.invoke(app, ["info", "work/deg"])
    assert f"{west:.5f}, {south:.5f}, {east:.5f}, {north:.5f}" in res.stdout, res.stdout  # was "15.0, 48.7, 15.0, 48.8"


def test_info_on_a_folder_that_is_not_a_cube(tmp_path):
    (tmp_path / "x").mkdir()
    res = runner.invoke(app, ["info", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no geowm cube here" in res.output
