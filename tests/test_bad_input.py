"""Bad input to ``geowm ingest``: a clear error naming the file and the problem, a non-zero exit, and the
existing cube and catalog byte-for-byte unchanged."""

from __future__ import annotations

import json
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from conftest import write_tif
from test_ingest import BANDS, days, make_scene
from typer.testing import CliRunner

from geowm.cli import app
from geowm.cube.store import tree_digest

runner = CliRunner()


@pytest.fixture
def existing(tmp_path) -> Path:
    """A workspace with a committed cube (2 dates) and its catalog."""
    src = tmp_path / "good"
    for i, d in enumerate(days(2)):
        make_scene(src, d, i)
    res = runner.invoke(app, ["ingest", str(src), "--cube", str(tmp_path / "cube"), "--tile-size", "32",
                              "--scheduler", "synchronous"])
    assert res.exit_code == 0, res.output
    return tmp_path


def run_bad(ws: Path, source: Path, *expected: str) -> str:
    before = (tree_digest(ws / "cube"), tree_digest(ws / "catalog"))
    res = runner.invoke(app, ["ingest", str(source), "--cube", str(ws / "cube"), "--scheduler", "synchronous"])
    text = " ".join((res.stderr or res.output).split())
    assert res.exit_code == 2, text
    assert "error:" in text
    for e in expected:
        assert e in text, f"{e!r} not in {text!r}"
    assert (tree_digest(ws / "cube"), tree_digest(ws / "catalog")) == before
    return text


def test_truncated_geotiff(existing):
    bad = existing / "bad"
    make_scene(bad, date(2021, 6, 1), 9)
    f = next(p for p in bad.iterdir() if not p.name.endswith("_SCL.tif"))
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) * 2 // 3])
    text = run_bad(existing, bad, f.name)
    assert "truncated" in text or "not a readable raster" in text


def test_non_raster_file_with_tif_name(existing):
    bad = existing / "bad"
    bad.mkdir()
    (bad / "S2T_20210601T103021.tif").write_text("this is not a GeoTIFF\n")
    run_bad(existing, bad, "S2T_20210601T103021.tif", "not a readable raster")


def test_geotiff_without_crs(existing):
    bad = existing / "bad"
    write_tif(bad / "S2T_20210601T103021.tif", np.ones((4, 16, 16), np.uint16), crs=None, descriptions=BANDS)
    run_bad(existing, bad, "S2T_20210601T103021.tif", "no CRS")


def test_no_overlap_with_cube(existing):
    bad = existing / "bad"
    far = Affine(10, 0, 900000, 0, -10, 5000000)
    make_scene(bad, date(2021, 6, 1), 9, transform=far)
    run_bad(existing, bad, "S2T_20210601T103021", "does not overlap the cube")


def test_missing_band(existing):
    bad = existing / "bad"
    write_tif(bad / "S2T_20210601T103021.tif", np.ones((3, 16, 16), np.uint16), descriptions=BANDS[:3])
    run_bad(existing, bad, "S2T_20210601T103021", "missing band(s) B08")


def test_unparseable_date(existing):
    bad = existing / "bad"
    write_tif(bad / "scene_without_date.tif", np.ones((4, 16, 16), np.uint16), descriptions=BANDS)
    run_bad(existing, bad, "scene_without_date.tif", "unparseable date")


def test_unparseable_date_tag(existing):
    bad = existing / "bad"
    write_tif(bad / "S2T_20210601.tif", np.ones((4, 16, 16), np.uint16), descriptions=BANDS,
              tags={"TIFFTAG_DATETIME": "yesterday"})
    run_bad(existing, bad, "S2T_20210601.tif", "unparseable date", "TIFFTAG_DATETIME")


def test_invalid_stac_json(existing):
    bad = existing / "bad"
    bad.mkdir()
    (bad / "catalog.json").write_text('{"type": "Catalog", "id": ')
    run_bad(existing, bad / "catalog.json", "catalog.json", "invalid STAC JSON")


def test_stac_not_a_stac_document(existing):
    bad = existing / "bad"
    bad.mkdir()
    (bad / "item.json").write_text(json.dumps({"hello": "world"}))
    run_bad(existing, bad / "item.json", "item.json", "invalid STAC")


def test_stac_asset_missing(existing):
    import pystac

    bad = existing / "bad"
    bad.mkdir()
    item = pystac.Item("s1", {"type": "Point", "coordinates": [15.0, 48.7]}, [15.0, 48.7, 15.0, 48.7],
                       datetime(2021, 6, 1),
                       properties={})
    item.add_asset("data", pystac.Asset(str(bad / "gone.tif"), media_type=pystac.MediaType.COG, roles=["data"]))
    item.set_self_href(str(bad / "item.json"))
    item.save_object()
    run_bad(existing, bad / "item.json", "item.json", "gone.tif", "missing file")


def test_duplicate_date_from_other_scene(existing):
    bad = existing / "bad"
    make_scene(bad, days(2)[1], 77)
    for p in bad.iterdir():
        p.rename(bad / p.name.replace("S2T_", "S2X_"))
    run_bad(existing, bad, "already in the cube")


def test_unexpected_dtype(existing):
    bad = existing / "bad"
    write_tif(bad / "S2T_20210601T103021.tif", np.ones((4, 16, 16), np.float32), descriptions=BANDS)
    run_bad(existing, bad, "S2T_20210601T103021.tif", "unexpected dtype float32")


def test_corrupt_block_data_fails_during_read_and_cleans_up(existing):
    """Header fine, compressed bytes garbled: found only while reading pixels, after chunks were written."""
    import rasterio

    bad = existing / "bad"
    for i, d in enumerate(days(3, start=date(2021, 6, 1))):
        make_scene(bad, d, 50 + i)
    f = sorted(p for p in bad.iterdir() if not p.name.endswith("_SCL.tif"))[-1]
    with rasterio.open(f) as src:
        off = int(src.get_tag_item("BLOCK_OFFSET_2_2", "TIFF", bidx=1))
        size = int(src.get_tag_item("BLOCK_SIZE_2_2", "TIFF", bidx=1))
    raw = bytearray(f.read_bytes())
    raw[off: off + size] = bytes([0xFF]) * size
    f.write_bytes(bytes(raw))
    run_bad(existing, bad, f.name, "failed while reading pixels")


def test_missing_source_path(existing):
    run_bad(existing, existing / "nowhere", "nowhere", "no such file or folder")
