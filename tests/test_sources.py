"""Scene discovery: dates and band names from STAC, GeoTIFF tags and file names; grouping; the tile grid."""

from __future__ import annotations

from datetime import UTC, datetime

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
    ("S2_20210101T103021.tif", ("S2_20210101T103021", None)), ("B02.tif", ("B02", None)),
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
    write_tif(tmp_path / "x_20200518_QA_PIXEL.tif", np.ones((8, 8), np.uint16))
    with pytest.raises(SourceError, match="QA_PIXEL.*--mask-clear"):
        discover(tmp_path, mask_band="QA_PIXEL")
    s = discover(tmp_path, mask_band="qa_pixel", mask_clear=[21824])[0]
    assert s.mask.name == "QA_PIXEL" and s.mask_clear == {21824} and list(s.bands) == ["B2"]
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
