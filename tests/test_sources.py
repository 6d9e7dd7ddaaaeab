"""Scene discovery: dates and band names from STAC, GeoTIFF tags and file names; grouping; the tile grid."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from conftest import write_tif
from hypothesis import given
from hypothesis import strategies as st

from geowm.cube.grid import CubeGrid
from geowm.sources import (
    SourceError,
    band_from_filename,
    datetime_from_filename,
    discover,
    parse_datetime_text,
)

moments = st.datetimes(min_value=datetime(1972, 1, 1), max_value=datetime(2099, 12, 31)).map(
    lambda d: d.replace(microsecond=0, tzinfo=UTC))


@given(moments, st.sampled_from(["S2A_MSIL2A_", "x_", ""]), st.sampled_from(["_N0509_R022", "_B04", ""]))
def test_filename_datetime_roundtrip(dt, prefix, suffix):
    assert datetime_from_filename(f"{prefix}{dt:%Y%m%dT%H%M%S}{suffix}.tif") == dt
    assert datetime_from_filename(f"{prefix}{dt:%Y%m%d}{suffix}.tif") == dt.replace(hour=0, minute=0, second=0)


@given(moments)
def test_tag_datetime_formats(dt):
    assert parse_datetime_text(f"{dt:%Y:%m:%d %H:%M:%S}") == dt  # TIFFTAG_DATETIME
    assert parse_datetime_text(dt.isoformat().replace("+00:00", "Z")) == dt
    assert parse_datetime_text(dt.astimezone().isoformat()) == dt  # any offset -> UTC


def test_landsat_product_id_takes_acquisition_date():
    name = "LC08_L1TP_224077_20200518_20200601_01_T1_B2.TIF"
    assert datetime_from_filename(name) == datetime(2020, 5, 18, tzinfo=UTC)
    assert band_from_filename(name) == ("LC08_L1TP_224077_20200518_20200601_01_T1", "B2")


@pytest.mark.parametrize("name,expected", [
    ("scene_B8A.tif", ("scene", "B8A")), ("LC09_x_SR_B4.TIF", ("LC09_x", "SR_B4")),
    ("S2_20210101T103021_SCL.tif", ("S2_20210101T103021", "SCL")), ("x_QA_PIXEL.TIF", ("x", "QA_PIXEL")),
    ("S2_20210101T103021.tif", ("S2_20210101T103021", None)), ("B02.tif", ("", "B02")),
    ("HLS.S30.T33UUP.2023152T100559.v2.0.Fmask.tif", ("HLS.S30.T33UUP.2023152T100559.v2.0", "Fmask")),
    ("x_2021_nir08.tif", ("x_2021", "nir08")), ("red.tif", ("", "red")), ("scene_reddish.tif", ("scene_reddish", None)),
    ("T33UUP_20230601T100559_B8A_20m.jp2", ("T33UUP_20230601T100559", "B8A")),  # Sentinel-2 L2A: band, resolution
    ("T33UUP_20230601T100559_SCL_60m.jp2", ("T33UUP_20230601T100559", "SCL")), ("mosaic_30m.tif", ("mosaic_30m", None)),
])
def test_band_suffixes(name, expected):
    assert band_from_filename(name) == expected


@given(st.text(alphabet="abcxyz_-.", max_size=30))
def test_no_date_in_name_gives_none(name):
    assert datetime_from_filename(name + ".tif") is None


@given(st.integers(16, 300), st.integers(1, 700), st.integers(1, 700))
def test_every_pixel_in_exactly_one_tile(tile, h, w):
    g = CubeGrid("EPSG:32633", Affine(10, 0, 0, 0, -10, 0), w, h, tile)
    count = np.zeros((h, w), np.int32)
    names = set()
    for t in g.tiles():
        count[t.y, t.x] += 1
        names.add(t.name)
        assert g.tile(t.name) == t
    assert (count == 1).all()
    assert len(names) == g.n_tiles[0] * g.n_tiles[1]


def test_grid_covering_snaps_to_anchor():
    g = CubeGrid.covering("EPSG:32633", 10, (500003, 5399001, 500597, 5399999), anchor=(0, 0))
    assert g.transform.c == 500000 and g.transform.f == 5400000 and g.width == 60 and g.height == 100
    assert g.aligned_offset("EPSG:32633", Affine(10, 0, 500100, 0, -10, 5399900)) == (10, 10)
    assert g.aligned_offset("EPSG:32633", Affine(10, 0, 500105, 0, -10, 5399900)) is None
    assert g.aligned_offset("EPSG:32632", Affine(10, 0, 500100, 0, -10, 5399900)) is None


def test_folder_groups_band_files_and_multiband_files(tmp_path):
    for b in ("B2", "B3", "B4"):
        write_tif(tmp_path / f"LC08_L1TP_224077_20200518_20200518_01_RT_{b}.TIF", np.ones((8, 8), np.uint16))
    write_tif(tmp_path / "S2_20200523T103021.tif", np.ones((3, 8, 8), np.uint16), descriptions=["B2", "B3", "B4"],
              tags={"ACQUISITION_DATETIME": "2020-05-23T10:31:00Z"})
    scenes = discover(tmp_path)
    assert [s.id for s in scenes] == ["LC08_L1TP_224077_20200518_20200518_01_RT", "S2_20200523T103021"]
    assert sorted(scenes[0].bands) == ["B2", "B3", "B4"] and scenes[0].mask is None
    assert scenes[1].datetime == datetime(2020, 5, 23, 10, 31, tzinfo=UTC)  # tag beats file name
    assert scenes[1].bands["B3"].index == 2


def test_mask_band_needs_clear_values(tmp_path):
    write_tif(tmp_path / "x_20200518_B2.tif", np.ones((8, 8), np.uint16))
    write_tif(tmp_path / "x_20200518_CLOUD.tif", np.ones((8, 8), np.uint16))
    with pytest.raises(SourceError, match="CLOUD.*--mask-clear"):
        discover(tmp_path, mask_band="CLOUD")
    s = discover(tmp_path, mask_band="cloud", mask_clear=[0])[0]
    assert s.mask.name == "CLOUD" and s.mask_clear == {0} and list(s.bands) == ["B2"]
    (tmp_path / "x_20200518_CLOUD.tif").rename(tmp_path / "x_20200518_QA_PIXEL.tif")
    s = discover(tmp_path)[0]  # Landsat Collection 2's QA_PIXEL is known: read bit by bit
    assert s.mask.name == "QA_PIXEL" and s.mask_bits == {0, 1, 2, 3, 4, 5} and not s.mask_clear
    s = discover(tmp_path, mask_clear=[21824])[0]
    assert s.mask_clear == {21824} and not s.mask_bits
    with pytest.raises(SourceError, match="mask band 'Fmask' not found"):
        discover(tmp_path, mask_band="Fmask")


def test_stac_item_bands_and_datetime(tmp_path):
    import pystac

    f = write_tif(tmp_path / "data.tif", np.ones((2, 8, 8), np.uint16))
    item = pystac.Item("it1", {"type": "Point", "coordinates": [15, 48]}, [15, 48, 15, 48],
                       datetime(2022, 7, 1, 10, 0, tzinfo=UTC), properties={})
    item.add_asset("refl", pystac.Asset(str(f), media_type=pystac.MediaType.COG, roles=["data"],
                                        extra_fields={"eo:bands": [{"name": "B04"}, {"name": "B08"}]}))
    item.add_asset("thumb", pystac.Asset(str(tmp_path / "t.png"), media_type=pystac.MediaType.PNG))
    item.set_self_href(str(tmp_path / "item.json"))
    item.save_object()
    (s,) = discover(tmp_path / "item.json")
    assert s.id == "it1" and s.datetime == datetime(2022, 7, 1, 10, tzinfo=UTC)
    assert {n: r.index for n, r in s.bands.items()} == {"B04": 1, "B08": 2}


def test_synthetic_stac_catalog_is_discovered(synth_region):
    scenes = discover(synth_region / "stac" / "catalog.json")
    tifs = [p for p in (synth_region / "scenes").glob("*.tif") if not p.name.endswith("_SCL.tif")]
    assert len(scenes) == len(tifs) > 40
    assert all(sorted(s.bands) == ["B02", "B03", "B04", "B08"] and s.mask.name == "SCL" for s in scenes)
    assert [s.datetime for s in scenes] == sorted(s.datetime for s in scenes)


# ------------------------------------------------------------------------------------------ properties (issue 8)

from hypothesis import HealthCheck, settings  # noqa: E402

stems = st.from_regex(r"[a-z0-9]{1,10}(-[a-z0-9]{1,6}){0,2}", fullmatch=True)
band_names = st.one_of(st.from_regex(r"B(0?[1-9]|1[0-2])A?", fullmatch=True),
                       st.from_regex(r"SR_B[1-7]", fullmatch=True),
                       st.sampled_from(["SCL", "QA_PIXEL", "BQA", "Fmask", "B6_VCID_1", "B6_VCID_2"]))
safe_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True)


@given(stems, band_names, st.sampled_from([".tif", ".TIF", ".tiff"]))
def test_band_suffix_roundtrip(stem, band, ext):
    assert band_from_filename(f"{stem}_{band}{ext}") == (stem, band)
    assert band_from_filename(f"{stem}{ext}") == (stem, None)  # no band token: a multi-band file of its own


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(moments, st.lists(st.from_regex(r"[A-Z][A-Z0-9]{0,5}", fullmatch=True), min_size=1, max_size=4,
                         unique=True).filter(lambda names: not {"SCL"} & set(names)),
       st.sampled_from(["ACQUISITION_DATETIME", "TIFFTAG_DATETIME"]))
def test_geotiff_tags_give_date_and_band_names(tmp_path, dt, names, key):
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    text = dt.strftime("%Y:%m:%d %H:%M:%S") if key == "TIFFTAG_DATETIME" else dt.isoformat()
    write_tif(folder / "scene.tif", np.ones((len(names), 4, 4), np.uint16), descriptions=names, tags={key: text})
    (s,) = discover(folder)
    assert s.datetime == dt  # the tag, not the (dateless) file name
    assert {n: r.index for n, r in s.bands.items()} == {n: i for i, n in enumerate(names, start=1)}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(safe_ids, moments, st.lists(st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,7}", fullmatch=True), min_size=1,
                                   max_size=5, unique_by=str.upper).filter(lambda n: "SCL" not in map(str.upper, n)),
       st.booleans())
def test_stac_item_id_date_and_bands(tmp_path, item_id, dt, names, as_interval):
    import json
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / "data.tif").write_bytes(b"")  # band names come from eo:bands: the file is not opened
    props = ({"datetime": None, "start_datetime": dt.isoformat(), "end_datetime": dt.isoformat()} if as_interval
             else {"datetime": dt.isoformat()})
    item = {"type": "Feature", "stac_version": "1.0.0", "id": item_id, "properties": props,
            "geometry": {"type": "Point", "coordinates": [15.0, 48.0]}, "bbox": [15.0, 48.0, 15.0, 48.0], "links": [],
            "assets": {"refl": {"href": "./data.tif", "type": "image/tiff; application=geotiff",
                                "eo:bands": [{"name": n} for n in names]}},
            "stac_extensions": []}
    if item_id in (".", ".."):
        return
    (folder / "item.json").write_text(json.dumps(item))
    (s,) = discover(folder / "item.json")
    assert s.id == item_id and s.datetime == dt
    assert {n: r.index for n, r in s.bands.items()} == {n: i for i, n in enumerate(names, start=1)}
    assert all(r.path == str(folder / "data.tif") for r in s.bands.values())


@given(st.text(max_size=12), st.sampled_from(["/", "\\", "/../", "..\\", "\x00"]), st.text(max_size=12))
def test_stac_item_ids_with_path_separators_never_pass(a, sep, b):
    from geowm.stacsource import SAFE_ID as _SAFE_ID

    assert not _SAFE_ID.fullmatch(a + sep + b)


@given(st.integers(16, 200), st.integers(1, 600), st.integers(1, 600), st.integers(1, 8), st.integers(1, 4))
def test_ingest_regions_cover_every_pixel_once_in_whole_tiles(tile, h, w, chunks, workers):
    from geowm.cube.ingest import _regions

    g = CubeGrid("EPSG:32633", Affine(10, 0, 0, 0, -10, 0), w, h, tile)
    count = np.zeros((h, w), np.int32)
    for r in _regions(g, chunks, block_bytes_per_row=2 * 4 * w, workers=workers, max_bytes=1 << 16):
        assert r.y.start % tile == 0 and (r.y.stop % tile == 0 or r.y.stop == h)  # whole tile rows
        count[r.y, r.x] += 1
    assert (count == 1).all()
