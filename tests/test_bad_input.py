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


def run_bad(ws: Path, source: Path, *expected: str, args: tuple[str, ...] = (), scheduler: str = "synchronous") -> str:
    before = (tree_digest(ws / "cube"), tree_digest(ws / "catalog"))
    res = runner.invoke(app, ["ingest", str(source), "--cube", str(ws / "cube"), "--scheduler", scheduler, *args])
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


@pytest.mark.parametrize("value, shown", [("-10", "-10.0"), ("nan", "nan"), ("1e9", "1000000000.0")])
def test_bad_mask_buffer(existing, value, shown):
    good = existing / "next"
    make_scene(good, date(2021, 6, 1), 9)
    run_bad(existing, good, f"--mask-buffer {shown}", args=("--mask-buffer", value))


@pytest.mark.parametrize("args, shown", [(("--mask-clear", "4,5,6"), "clear values 4,5,6, buffer 0 m"),
                                         (("--mask-buffer", "20"), "clear values 4,5,6,7, buffer 20 m")])
def test_another_mask_rule_than_the_cubes(existing, args, shown):
    good = existing / "next"
    make_scene(good, date(2021, 6, 1), 9)
    run_bad(existing, good, "S2T_20210601T103021_SCL.tif", shown, "were read with clear values 4,5,6,7, buffer 0 m",
            "one cube keeps one mask rule", args=args)


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


@pytest.mark.parametrize("new_cube", [False, True])
def test_complex_values_are_refused(existing, new_cube):
    """Complex values (a SAR single-look complex product): refused naming the file, not a traceback (a ValueError
    from the encoding before)."""
    bad = existing / "bad"
    write_tif(bad / "S2T_20210601T103021.tif", np.ones((4, 16, 16), np.complex64), descriptions=BANDS)
    if new_cube:
        res = runner.invoke(app, ["ingest", str(bad), "--cube", str(existing / "new"), "--scheduler", "synchronous"])
        assert res.exit_code == 2 and "complex64 values" in res.output and not (existing / "new").exists()
    else:
        run_bad(existing, bad, "S2T_20210601T103021.tif", "complex64 values")


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_corrupt_block_data_fails_during_read_and_cleans_up(existing, scheduler):
    """Header fine, compressed bytes garbled: found only while reading pixels, after chunks were written; on a
    dask worker too (the error comes back as itself, not as distributed's bare Exception)."""
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
    run_bad(existing, bad, f.name, "failed while reading pixels", scheduler=scheduler)


def test_missing_source_path(existing):
    run_bad(existing, existing / "nowhere", "nowhere", "no such file or folder")


# ------------------------------------------------------------------------------------------ issue 8 additions


@pytest.mark.parametrize("kind", ["float_nan", "uint16_nodata"])
def test_all_nan_scene(tmp_path, kind):
    """A scene without a single pixel of data (all NaN, or all nodata) is refused, not ingested as a blank date."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    dtype = np.float32 if kind == "float_nan" else np.uint16
    rng = np.random.default_rng(0)
    for d in days(2):
        write_tif(good / f"S2T_{d:%Y%m%d}T103021.tif", rng.uniform(1, 5000, (4, 32, 32)).astype(dtype),
                  nodata=0 if dtype is np.uint16 else None, descriptions=BANDS)
    res = runner.invoke(app, ["ingest", str(good), "--cube", str(tmp_path / "cube"), "--tile-size", "16",
                              "--scheduler", "synchronous"])
    assert res.exit_code == 0, res.output
    empty = np.full((4, 32, 32), np.nan if dtype is np.float32 else 0, dtype)
    write_tif(bad / "S2T_20210601T103021.tif", empty, nodata=0 if dtype is np.uint16 else None, descriptions=BANDS)
    run_bad(tmp_path, bad, "S2T_20210601T103021.tif", "has no data inside the cube", "NaN or nodata")


def test_scene_with_one_all_nan_band(existing):
    bad = existing / "bad"
    data = np.random.default_rng(1).integers(1, 9000, (4, 64, 64)).astype(np.uint16)
    data[3] = 0  # B08 all nodata
    write_tif(bad / "S2T_20210601T103021.tif", data, nodata=0, descriptions=BANDS)
    run_bad(existing, bad, "S2T_20210601T103021.tif", "has no data inside the cube")


def _redeliver_changed(ws: Path) -> Path:
    """The second date's scene delivered again under the same name, with other pixels."""
    again = ws / "again"
    d = days(2)[1]
    make_scene(again, d, 1234)
    return again


def test_same_scene_with_other_content_is_refused(existing):
    again = _redeliver_changed(existing)
    run_bad(existing, again, "S2T_", "already in the cube with other content", "SHA-256", "--replace")


def test_same_scene_same_content_is_skipped(existing):
    """The same files copied elsewhere (other paths and mtimes) are recognised by content: nothing changes."""
    import shutil

    copy = existing / "copy"
    shutil.copytree(existing / "good", copy)
    before = tree_digest(existing / "cube")
    res = runner.invoke(app, ["ingest", str(copy), "--cube", str(existing / "cube"), "--scheduler", "synchronous",
                              "--no-catalog"])
    assert res.exit_code == 0 and "nothing new" in res.output, res.output
    assert tree_digest(existing / "cube") == before


def test_replace_overwrites_the_date(existing):
    from test_ingest import raw

    again = _redeliver_changed(existing)
    res = runner.invoke(app, ["ingest", str(again), "--cube", str(existing / "cube"), "--scheduler", "synchronous",
                              "--replace"])
    assert res.exit_code == 0, res.output
    assert "replaced 1 date(s)" in " ".join(res.output.split())
    ds = raw(existing / "cube")
    assert ds.sizes["time"] == 2
    # equals a cube ingested from the first original date plus the re-delivered one
    ref_src = existing / "ref_src"
    make_scene(ref_src, days(2)[0], 0)
    make_scene(ref_src, days(2)[1], 1234)
    res = runner.invoke(app, ["ingest", str(ref_src), "--cube", str(existing / "ref"), "--tile-size", "32",
                              "--scheduler", "synchronous", "--no-catalog"])
    assert res.exit_code == 0, res.output
    ref = raw(existing / "ref")
    np.testing.assert_array_equal(ds.reflectance.values, ref.reflectance.values)
    np.testing.assert_array_equal(ds.valid.values, ref.valid.values)
    from geowm.cube.store import read_state

    assert [r["id"] for r in read_state(existing / "cube").sources] == [r["id"] for r in read_state(ref_src.parent /
                                                                                                   "ref").sources]
    # a re-run of the replacing batch changes nothing
    before = tree_digest(existing / "cube")
    res = runner.invoke(app, ["ingest", str(again), "--cube", str(existing / "cube"), "--scheduler", "synchronous",
                              "--replace", "--no-catalog"])
    assert res.exit_code == 0 and tree_digest(existing / "cube") == before


def test_replace_date_from_other_scene(existing):
    from test_ingest import raw

    other = existing / "other"
    written = make_scene(other, days(2)[1], 77)
    for p in other.iterdir():
        p.rename(other / p.name.replace("S2T_", "S2X_"))
    res = runner.invoke(app, ["ingest", str(other), "--cube", str(existing / "cube"), "--scheduler", "synchronous",
                              "--replace", "--no-catalog"])
    assert res.exit_code == 0, res.output
    ds = raw(existing / "cube")
    assert ds.sizes["time"] == 2
    np.testing.assert_array_equal(ds.reflectance.isel(time=1).values, written["data"])
    from geowm.cube.store import read_state

    assert [r["id"] for r in read_state(existing / "cube").sources] == ["S2T_20210301T103021", "S2X_20210306T103021"]


def test_out_of_order_dates_are_inserted_in_order(existing):
    """An older date than the cube's newest is not an error: it is inserted and the time axis stays sorted."""
    from test_ingest import raw

    older = existing / "older"
    make_scene(older, date(2021, 2, 1), 5)
    res = runner.invoke(app, ["ingest", str(older), "--cube", str(existing / "cube"), "--scheduler", "synchronous",
                              "--no-catalog"])
    assert res.exit_code == 0, res.output
    times = raw(existing / "cube").time.values
    assert [str(t)[:10] for t in times] == ["2021-02-01", "2021-03-01", "2021-03-06"]


def test_files_of_one_scene_with_different_dates(existing):
    bad = existing / "bad"
    write_tif(bad / "X_20210601_B02.tif", np.ones((16, 16), np.uint16))
    write_tif(bad / "X_20210601_B03.tif", np.ones((16, 16), np.uint16),
              tags={"TIFFTAG_DATETIME": "2021:05:02 10:00:00"})
    run_bad(existing, bad, "X_20210601", "files of one scene carry different dates", "X_20210601_B03.tif=2021-05-02")


def test_absurd_dimensions_are_refused_from_the_header(existing):
    """A header claiming 200 000 x 200 000 px (a sparse file of a few MB) is refused before any pixel is read."""
    import rasterio

    bad = existing / "bad"
    bad.mkdir()
    path = bad / "S2T_20210601T103021.tif"
    with rasterio.open(path, "w", driver="GTiff", width=200_000, height=200_000, count=4, dtype="uint16",
                       crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 5400000), tiled=True,
                       blockxsize=1024, blockysize=1024, sparse_ok=True, interleave="pixel") as dst:
        for i, b in enumerate(BANDS, start=1):
            dst.set_band_description(i, b)
    assert path.stat().st_size < 5e6
    run_bad(existing, bad, "S2T_20210601T103021.tif", "200000 x 200000 px exceeds the limit of 2147483648 px")


def test_max_pixels_is_configurable_and_bounds_a_new_grid(existing, tmp_path):
    bad = existing / "bad"
    make_scene(bad, date(2021, 6, 1), 9)
    run_bad(existing, bad, "64 x 64 px exceeds the limit of 1000 px", "--max-pixels", args=("--max-pixels", "1000"))
    new = tmp_path / "newcube"
    res = runner.invoke(app, ["ingest", str(bad), "--cube", str(new), "--resolution", "0.01", "--no-catalog",
                              "--scheduler", "synchronous"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "new cube grid would be 64000 x 64000 px, above the limit" in text, text
    assert not new.exists()


@pytest.mark.parametrize("item_id", ["../../../outside", "a/b", "..", "x" * 300])
def test_stac_item_id_that_would_become_a_path_outside_the_catalog(existing, item_id):
    import pystac

    bad = existing / "bad"
    f = write_tif(bad / "data.tif", np.ones((4, 16, 16), np.uint16), descriptions=BANDS)
    item = pystac.Item(item_id, {"type": "Point", "coordinates": [15.0, 48.7]}, [15.0, 48.7, 15.0, 48.7],
                       datetime(2021, 6, 1), properties={})
    item.add_asset("data", pystac.Asset(str(f), media_type=pystac.MediaType.COG, roles=["data"]))
    (bad / "item.json").write_text(json.dumps(item.to_dict()))
    run_bad(existing, bad / "item.json", "item.json", "is not a safe name")
