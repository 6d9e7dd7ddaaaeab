"""Sensor conventions: band common names (NDVI and true colour by spectral band, not by band number) and
quality bands read bit by bit (Landsat Collection 2 QA_PIXEL, HLS Fmask, ``--mask-bits``)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tif

from geowm.bands import band_roles, common_name_of, ndvi_bands, rgb_bands, sensor_of
from geowm.cube import IngestError, IngestOptions, cube_checksum, ingest, open_cube
from geowm.sources import SourceError, discover

OPTS = dict(tile_size=32, time_chunk=2, scheduler="synchronous")
SIZE = 48

# Landsat Collection 2 QA_PIXEL values (bits: 0 fill, 1 dilated cloud, 3 cloud, 4 shadow, 5 snow, 6 clear, 7 water)
QA_CLEAR, QA_WATER, QA_CLOUD, QA_DILATED, QA_SHADOW, QA_SNOW, QA_FILL = 21824, 21952, 22280, 21826, 23888, 30048, 1


def test_band_common_names_follow_the_sensor():
    assert sensor_of("LC08_L2SP_224077_20200518_20200820_02_T1") == "landsat-oli"
    assert sensor_of("LE07_L2SP_224077_20000518_20200820_02_T1") == "landsat-tm"
    assert sensor_of("HLS.L30.T21JUN.2020139T133512.v2.0") == "hls-l30"
    assert sensor_of("HLS.S30.T21JUN.2020139T133512.v2.0") == "sentinel-2"
    assert sensor_of("S2B_MSIL2A_20230601T100559_N0509_R022_T33UUP_20230601T130000") == "sentinel-2"
    assert sensor_of("anything", platform="landsat-5") == "landsat-tm"
    assert sensor_of("S2T_20210301T103021") is None
    # a band number means another band on another sensor
    assert [common_name_of(b, "landsat-oli") for b in ("SR_B2", "SR_B4", "SR_B5", "B10")] == \
        ["blue", "red", "nir08", "lwir11"]
    assert [common_name_of(b, "landsat-tm") for b in ("SR_B3", "SR_B4", "B5")] == ["red", "nir08", "swir16"]
    assert [common_name_of(b, "sentinel-2") for b in ("B04", "B4", "B08", "B8A")] == ["red", "red", "nir", "nir08"]
    assert [common_name_of(b, "hls-l30") for b in ("B04", "B05")] == ["red", "nir08"]
    assert common_name_of("NIR") == "nir" and common_name_of("B4") == ""
    assert common_name_of("QA_PIXEL", "landsat-oli") == ""
    # NDVI by common name: Sentinel-2's broad NIR before the narrow one; Landsat 5's B4 is its NIR, not red
    assert ndvi_bands(["B04", "B08", "B8A"], ["red", "nir", "nir08"]) == (0, 1)
    assert ndvi_bands(["B3", "B4", "B5"], ["red", "nir08", "swir16"]) == (0, 1)
    assert ndvi_bands(["B4", "B5"], ["nir08", "swir16"]) is None  # by name alone this was (B4, B5): NIR and SWIR
    assert ndvi_bands(["B4", "B5"]) == (0, 1) and ndvi_bands(["B4", "B5"], ["", ""]) == (0, 1)  # old cubes
    assert rgb_bands(["SR_B2", "SR_B3", "SR_B4"], ["blue", "green", "red"]) == ["SR_B4", "SR_B3", "SR_B2"]
    assert band_roles(["SR_B2", "SR_B3", "SR_B4", "SR_B5"], ["blue", "green", "red", "nir08"]) == \
        {"blue": 0, "green": 1, "red": 2, "nir": 3}
    assert band_roles(["B1", "B2", "B3", "B4"], ["blue", "green", "red", "nir08"]) == \
        {"blue": 0, "green": 1, "red": 2, "nir": 3}  # Landsat 5: by name this would be B2, B3, B4, B5
    assert band_roles(["B02", "B03", "B04", "B08"]) == {"blue": 0, "green": 1, "red": 2, "nir": 3}
    assert band_roles(["B1", "B2"]) == {}


def _landsat_c2(folder: Path, product: str, bands: dict[str, np.ndarray], qa: np.ndarray | None) -> None:
    """A Landsat Collection 2 Level-2 scene as USGS delivers it: one file per band, no scale tags."""
    for name, arr in bands.items():
        write_tif(folder / f"{product}_{name}.TIF", arr.astype(np.uint16), nodata=0)
    if qa is not None:
        write_tif(folder / f"{product}_QA_PIXEL.TIF", qa.astype(np.uint16), nodata=1)


def _oli_bands(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"SR_B{i}": rng.integers(7000, 30000, (SIZE, SIZE)) for i in (2, 3, 4, 5)}


def _qa() -> np.ndarray:
    qa = np.full((SIZE, SIZE), QA_CLEAR)
    qa[:8] = QA_WATER  # water is clear
    qa[10:14, 5:30] = QA_CLOUD
    qa[16:18, :] = QA_DILATED
    qa[20:24, 10:20] = QA_SHADOW
    qa[26:30, 30:40] = QA_SNOW
    qa[40:, 40:] = QA_FILL
    return qa


def test_landsat_collection2_scene_is_masked_by_qa_pixel_bits_and_gets_ndvi(tmp_path):
    from geowm.baselines import ndvi
    from geowm.cube.info import summarize

    product = "LC08_L2SP_224077_20200518_20200820_02_T1"
    bands, qa = _oli_bands(0), _qa()
    _landsat_c2(tmp_path / "l8", product, bands, qa)
    # the rest of a USGS delivery: thermal band, surface-temperature intermediates, aerosol and saturation QA
    for aux in ("ST_B10", "ST_TRAD", "ST_QA", "SR_QA_AEROSOL", "QA_RADSAT", "VAA"):
        write_tif(tmp_path / "l8" / f"{product}_{aux}.TIF", np.full((SIZE, SIZE), 300, np.uint16), nodata=0)
    (tmp_path / "l8" / f"{product}_MTL.json").write_text("{}")
    ingest(tmp_path / "l8", tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    assert list(ds.band.values) == ["SR_B2", "SR_B3", "SR_B4", "SR_B5"]
    assert list(ds.common_name.values) == ["blue", "green", "red", "nir08"]
    valid = ds.valid.isel(time=0).values
    np.testing.assert_array_equal(valid, np.isin(qa, [QA_CLEAR, QA_WATER]))  # cloud, dilated, shadow, snow, fill out
    assert summarize(tmp_path / "cube")["mask_rules"] == [
        {"band": "QA_PIXEL", "clear": [], "bits": [0, 1, 2, 3, 4, 5], "buffer_m": 0.0, "scenes": 1}]
    # Collection 2 Level-2 GeoTIFFs carry no scale tags: the product's published scale and offset decode them
    assert ds.reflectance.encoding["scale_factor"] == np.float32(2.75e-5)
    assert ds.reflectance.encoding["add_offset"] == np.float32(-0.2)
    red, nir = (bands[b].astype(np.float64) * 2.75e-5 - 0.2 for b in ("SR_B4", "SR_B5"))
    np.testing.assert_allclose(ds.reflectance.sel(band="SR_B4").isel(time=0).values, red, atol=1e-6)
    got = ndvi(ds).isel(time=0).values
    np.testing.assert_allclose(got[valid], ((nir - red) / (nir + red))[valid], rtol=1e-5)
    assert np.isnan(got[~valid]).all()

    # Landsat 7's SR_B4 is its near-infrared band, its SR_B2 green...: it cannot join a cube of Landsat 8 bands
    rng = np.random.default_rng(1)
    _landsat_c2(tmp_path / "l7", "LE07_L2SP_224077_20200526_20200820_02_T1",
                {f"SR_B{i}": rng.integers(7000, 30000, (SIZE, SIZE)) for i in (1, 2, 3, 4, 5, 7)}, _qa())
    before = cube_checksum(tmp_path / "cube")
    with pytest.raises(IngestError, match=r"band 'SR_B2' of scene 'LE07_\S+' is 'green', but the cube's 'SR_B2' is "
                                          r"'blue'") as err:
        ingest(tmp_path / "l7", tmp_path / "cube", IngestOptions(**OPTS))
    assert "LE07_L2SP_224077_20200526_20200820_02_T1_SR_B2.TIF" in str(err.value)
    assert cube_checksum(tmp_path / "cube") == before
    # and in one batch: refused before anything is written
    with pytest.raises(IngestError, match=r"band 'SR_B4' of scene 'L\w+' is '(red|nir08)', but in scene 'L\w+' \(\S+"
                                          r"_SR_B4.TIF\) it is '(nir08|red)': one band name is one spectral band"):
        ingest(tmp_path, tmp_path / "mixed", IngestOptions(**OPTS, bands=["SR_B4"]))
    assert not (tmp_path / "mixed").exists() or not any((tmp_path / "mixed").iterdir())


def test_hls_names_dates_and_fmask(tmp_path):
    rng = np.random.default_rng(2)
    stem = "HLS.L30.T21JUN.2020139T133512.v2.0"  # 2020, day 139: 18 May
    for b in ("B02", "B03", "B04", "B05"):
        write_tif(tmp_path / "hls" / stem / f"{stem}.{b}.tif", rng.integers(100, 5000, (SIZE, SIZE)).astype(np.int16),
                  nodata=-9999)
    fmask = np.zeros((SIZE, SIZE), np.uint8)  # bits: 1 cloud, 2 adjacent, 3 shadow, 4 snow, 5 water, 6-7 aerosol
    fmask[:5] = 1 << 5  # water: clear
    fmask[5:10] = 1 << 6  # low aerosol: clear
    fmask[10:15] = 1 << 1
    fmask[15:20] = 1 << 2
    fmask[20:25] = 1 << 3
    fmask[25:30] = 1 << 4
    fmask[45:] = 255  # fill
    write_tif(tmp_path / "hls" / stem / f"{stem}.Fmask.tif", fmask, nodata=255)
    (scene,) = discover(tmp_path / "hls")
    assert scene.id == stem and scene.datetime.isoformat() == "2020-05-18T13:35:12+00:00"
    assert scene.mask.name == "Fmask" and scene.mask_bits == {1, 2, 3, 4}
    assert scene.common_names == {"B02": "blue", "B03": "green", "B04": "red", "B05": "nir08"}
    ingest(tmp_path / "hls", tmp_path / "cube", IngestOptions(**OPTS))
    valid = open_cube(tmp_path / "cube").valid.isel(time=0).values
    rows = valid.all(axis=1)
    assert rows[:10].all() and not rows[10:30].any() and rows[30:45].all() and not valid[45:].any()


def test_mask_bits_for_any_quality_band(tmp_path):
    from typer.testing import CliRunner

    from geowm.cli import app

    rng = np.random.default_rng(3)
    qa = np.zeros((SIZE, SIZE), np.uint16)  # 0: no flag; a generic bit mask with 0 = good and no nodata declared
    qa[:6] = 0b100  # bit 2: cloud
    qa[6:12] = 0b1000  # bit 3: something the user keeps
    for d, folder in ((date(2021, 3, 1), "a"), (date(2021, 3, 6), "b")):
        for b in ("red", "nir"):
            write_tif(tmp_path / folder / f"X_{d:%Y%m%d}_{b}.tif", rng.integers(100, 5000, (1, SIZE, SIZE)),
                      dtype="uint16", nodata=0, descriptions=[b])
        write_tif(tmp_path / folder / f"X_{d:%Y%m%d}_MASK.tif", qa)
    first = tmp_path / "a"
    with pytest.raises(SourceError, match="no known rule; pass its clear values .*--mask-bits"):
        discover(first, mask_band="mask")
    with pytest.raises(SourceError, match="not both"):
        discover(first, mask_band="mask", mask_clear=[0], mask_bits=[2])
    with pytest.raises(SourceError, match="bit numbers from 0"):
        discover(first, mask_band="mask", mask_bits=[40])
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", str(first), "--cube", str(tmp_path / "cube"), "--mask-band", "mask",
                              "--mask-bits", "2", "--scheduler", "synchronous", "--no-catalog"])
    assert res.exit_code == 0, res.output
    ds = open_cube(tmp_path / "cube")
    assert list(ds.common_name.values) == ["nir", "red"]
    valid = ds.valid.isel(time=0).values
    assert not valid[:6].any() and valid[6:].all()  # 0 is "no flag", not fill: a bit mask has no implicit fill
    res = runner.invoke(app, ["info", str(tmp_path / "cube")])
    assert "MASK flag bits 2 (clear where none is set), buffer 0 m" in res.output
    before = cube_checksum(tmp_path / "cube")
    res = runner.invoke(app, ["ingest", str(tmp_path / "b"), "--cube", str(tmp_path / "cube"), "--mask-bits", "2,3",
                              "--scheduler", "synchronous", "--no-catalog"])
    assert res.exit_code == 2 and "one cube keeps one mask rule" in res.output and "flag bits 2,3" in res.output
    res = runner.invoke(app, ["ingest", str(tmp_path / "b"), "--cube", str(tmp_path / "cube"), "--mask-bits", "x",
                              "--scheduler", "synchronous", "--no-catalog"])
    assert res.exit_code == 2 and "--mask-bits 'x': expected comma-separated integers" in res.output
    assert cube_checksum(tmp_path / "cube") == before
    res = runner.invoke(app, ["ingest", str(tmp_path / "b"), "--cube", str(tmp_path / "cube"),
                              "--scheduler", "synchronous", "--no-catalog"])  # the cube's mask band and rule
    assert res.exit_code == 0, res.output
    ds = open_cube(tmp_path / "cube")
    assert list(ds.band.values) == ["nir", "red"]
    np.testing.assert_array_equal(ds.valid.isel(time=1).values, valid)


def test_a_folder_per_scene_of_files_named_by_band(tmp_path):
    """As Earth Search / HLS downloads are laid out: ``S2B_33UUP_20230601_0_L2A/red.tif``, ``.../scl.tif``."""
    rng = np.random.default_rng(5)
    for d in (date(2023, 6, 1), date(2023, 6, 6)):
        folder = tmp_path / "src" / f"S2B_33UUP_{d:%Y%m%d}_0_L2A"
        for b in ("blue", "green", "red", "nir"):
            write_tif(folder / f"{b}.tif", rng.integers(100, 5000, (1, SIZE, SIZE)), dtype="uint16", nodata=0)
        scl = np.full((SIZE, SIZE), 4, np.uint8)
        scl[:10] = 9
        write_tif(folder / "scl.tif", scl, nodata=0)
    scenes = discover(tmp_path / "src")
    assert [(s.id, s.datetime.date().isoformat(), sorted(s.bands), s.mask.name) for s in scenes] == [
        ("S2B_33UUP_20230601_0_L2A", "2023-06-01", ["blue", "green", "nir", "red"], "scl"),
        ("S2B_33UUP_20230606_0_L2A", "2023-06-06", ["blue", "green", "nir", "red"], "scl")]
    ingest(tmp_path / "src", tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    assert ds.sizes["time"] == 2 and not ds.valid.isel(y=slice(0, 10)).any() and ds.valid.isel(y=slice(10, None)).all()
    assert rgb_bands(list(ds.band.values), list(ds.common_name.values)) == ["red", "green", "blue"]


def test_stac_common_names_name_the_bands(tmp_path):
    import pystac

    rng = np.random.default_rng(4)
    item = pystac.Item("scene-1", geometry=None, bbox=None, datetime=datetime(2021, 3, 1, 10, 30, tzinfo=UTC),
                       properties={})
    for key, name, common in (("b1", "SR_B3", "red"), ("b2", "SR_B4", "nir"), ("b3", "SR_B2", "green")):
        path = write_tif(tmp_path / "src" / f"{key}.tif", rng.integers(100, 5000, (1, SIZE, SIZE)), dtype="uint16",
                         nodata=0)
        item.add_asset(key, pystac.Asset(str(path), media_type=pystac.MediaType.COG,
                                         extra_fields={"eo:bands": [{"name": name, "common_name": common}]}))
    (tmp_path / "src" / "item.json").write_text(json.dumps(item.to_dict()))
    ingest(tmp_path / "src" / "item.json", tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    assert dict(zip(ds.band.values, ds.common_name.values, strict=True)) == \
        {"SR_B2": "green", "SR_B3": "red", "SR_B4": "nir"}
    from geowm.baselines import ndvi

    assert ndvi(ds).attrs["geowm:bands"] == "(SR_B4 - SR_B3) / (SR_B4 + SR_B3)"


def _stac_item(folder: Path, item_id: str, when: datetime, values: dict[str, np.ndarray], scale: float,
               offset: float) -> Path:
    import pystac

    item = pystac.Item(item_id, geometry=None, bbox=None, datetime=when, properties={"platform": "sentinel-2b"})
    for name, arr in values.items():
        path = write_tif(folder / f"{item_id}_{name}.tif", arr.astype(np.uint16), nodata=0)
        item.add_asset(name, pystac.Asset(str(path), media_type=pystac.MediaType.COG, extra_fields={
            "eo:bands": [{"name": name}], "raster:bands": [{"scale": scale, "offset": offset, "nodata": 0}]}))
    out = folder / f"{item_id}.json"
    out.write_text(json.dumps(item.to_dict()))
    return out


def test_a_series_across_a_change_of_offset_is_harmonised_and_another_scale_refused(tmp_path):
    """Sentinel-2 L2A from processing baseline 04.00 (2022-01-25) adds 1000 to every value (offset -0.1): a
    series across it is stored at the cube's offset, as the same reflectance."""
    rng = np.random.default_rng(6)
    old = {b: rng.integers(1, 6000, (SIZE, SIZE)) for b in ("B04", "B08")}
    new = {b: rng.integers(1001, 7000, (SIZE, SIZE)) for b in ("B04", "B08")}
    new["B04"][:2] = 999  # reflectance below 0 under the new offset: kept as the smallest value, not as fill
    first = _stac_item(tmp_path / "a", "S2B_old", datetime(2022, 1, 20, 10, tzinfo=UTC), old, 1e-4, 0.0)
    second = _stac_item(tmp_path / "b", "S2B_new", datetime(2022, 1, 30, 10, tzinfo=UTC), new, 1e-4, -0.1)
    ingest(first, tmp_path / "cube", IngestOptions(**OPTS))
    ingest(second, tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    assert list(ds.common_name.values) == ["red", "nir"]  # from the STAC platform
    got = ds.reflectance.sel(band="B04").values
    np.testing.assert_allclose(got[0], old["B04"] * 1e-4, atol=1e-6)
    np.testing.assert_allclose(got[1][2:], new["B04"][2:] * 1e-4 - 0.1, atol=1e-6)
    assert np.allclose(got[1][:2], 1e-4) and ds.valid.isel(time=1).all()
    third = _stac_item(tmp_path / "c", "S2B_odd", datetime(2022, 2, 4, 10, tzinfo=UTC), old, 2e-4, 0.0)
    before = cube_checksum(tmp_path / "cube")
    with pytest.raises(IngestError, match=r"S2B_odd_B04.tif: band 'B04' has scale 0.0002 and offset 0, but the cube "
                                          r"stores uint16 values at scale 0.0001 and offset 0"):
        ingest(third, tmp_path / "cube", IngestOptions(**OPTS))
    assert cube_checksum(tmp_path / "cube") == before


@pytest.mark.parametrize("baseline, offset", [("04.00", -0.1), ("05.09", -0.1), ("02.12", 0.0)])
def test_stac_sentinel2_items_with_only_a_processing_baseline_get_its_offset(tmp_path, baseline, offset):
    """Planetary Computer's Sentinel-2 L2A items give ``s2:processing_baseline`` and no ``raster:bands``
    scale/offset; from baseline 04.00 their values carry the -1000 offset all the same."""
    import pystac

    item = pystac.Item("S2B_MSIL2A_20220208T133841_R124_T21JUN_20220210T042536", geometry=None, bbox=None,
                       datetime=datetime(2022, 2, 8, 13, 38, tzinfo=UTC),
                       properties={"platform": "Sentinel-2B", "s2:processing_baseline": baseline})
    for name in ("B04", "B08", "SCL"):
        path = write_tif(tmp_path / f"{name}.tif", np.full((SIZE, SIZE), 4 if name == "SCL" else 2000, np.uint16),
                         nodata=0)
        item.add_asset(name, pystac.Asset(str(path), media_type=pystac.MediaType.COG))
    (tmp_path / "item.json").write_text(json.dumps(item.to_dict()))
    (scene,) = discover(tmp_path / "item.json")
    assert {b: (r.scale, r.offset) for b, r in scene.bands.items()} == {"B04": (1e-4, offset), "B08": (1e-4, offset)}
    assert (scene.mask.scale, scene.mask.offset) == (None, None)  # the mask is classes, never scaled
    ingest(tmp_path / "item.json", tmp_path / "cube", IngestOptions(**OPTS))
    np.testing.assert_allclose(open_cube(tmp_path / "cube").reflectance.sel(band="B04").values, 0.2 + offset,
                               atol=1e-6)


def test_an_earth_engine_export_of_sentinel2_is_recognised_by_its_bands(tmp_path):
    """A Google Earth Engine export is one multi-band GeoTIFF per date, named as the user likes, its bands named
    as in the collection: ``B8A``, ``SCL`` or ``QA60`` make it Sentinel-2 (so ``B8`` is the near-infrared, not
    Landsat 8's ``B5`` convention), its quality layers are the mask or left out, never data bands."""
    from geowm.bands import ndvi_bands

    rng = np.random.default_rng(8)
    names = ["B2", "B3", "B4", "B5", "B8", "B8A", "B10", "AOT", "WVP", "SCL", "TCI_R", "TCI_G", "TCI_B", "MSK_CLDPRB",
             "QA10", "QA60"]
    data = rng.integers(100, 5000, (len(names), SIZE, SIZE)).astype(np.uint16)
    scl = np.full((SIZE, SIZE), 4, np.uint16)
    scl[:10] = 9
    data[names.index("SCL")] = scl
    write_tif(tmp_path / "sr" / "my_field_2023-06-01.tif", data, descriptions=names, tags={
        "ACQUISITION_DATETIME": "2023-06-01T10:05:59Z"})
    (scene,) = discover(tmp_path / "sr")
    assert scene.mask.name == "SCL" and scene.mask_clear == {4, 5, 6, 7}
    assert scene.common_names["B8"] == "nir" and scene.common_names["B5"] == "rededge"
    ingest(tmp_path / "sr", tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    assert list(ds.band.values) == ["B2", "B3", "B4", "B5", "B8", "B8A"]  # no cirrus, AOT, WVP, TCI, MSK, QA
    assert ndvi_bands(list(ds.band.values), list(ds.common_name.values)) == (2, 4)  # B4 and B8, not B4 and B5
    valid = ds.valid.isel(time=0).values
    assert not valid[:10].any() and valid[10:].all()

    # Level-1C: QA60 is the mask, bit 10 opaque cloud and bit 11 cirrus
    qa60 = np.zeros((SIZE, SIZE), np.uint16)
    qa60[:6] = 1 << 10
    qa60[6:12] = 1 << 11
    l1c = np.concatenate([data[:5], qa60[None]])
    write_tif(tmp_path / "toa" / "toa_20230606.tif", l1c, descriptions=["B2", "B3", "B4", "B5", "B8", "QA60"])
    (scene,) = discover(tmp_path / "toa")
    assert scene.mask.name == "QA60" and scene.mask_bits == {10, 11} and scene.common_names["B8"] == "nir"
    ingest(tmp_path / "toa", tmp_path / "toa_cube", IngestOptions(**OPTS))
    valid = open_cube(tmp_path / "toa_cube").valid.isel(time=0).values
    assert not valid[:12].any() and valid[12:].all()


def _planet(folder: Path, scene: str, analytic: np.ndarray, clear: np.ndarray, kind: str = "AnalyticMS_SR",
            tail: str = "_clip") -> None:
    """A PlanetScope ortho scene as an order delivers it: analytic bands, udm2 (8 bands: clear, snow, shadow,
    light haze, heavy haze, cloud, confidence, udm1), the older udm, the Visual image and metadata."""
    write_tif(folder / f"{scene}_3B_{kind}{tail}.tif", analytic.astype(np.uint16), nodata=0)
    udm2 = np.zeros((8, SIZE, SIZE), np.uint8)
    udm2[0] = clear
    udm2[5] = ~clear  # cloud
    udm2[6] = 80
    write_tif(folder / f"{scene}_3B_udm2{tail}.tif", udm2)
    write_tif(folder / f"{scene}_3B_AnalyticMS_DN_udm{tail}.tif", np.zeros((SIZE, SIZE), np.uint8))
    write_tif(folder / f"{scene}_3B_Visual{tail}.tif", np.full((3, SIZE, SIZE), 90, np.uint8))
    (folder / f"{scene}_3B_AnalyticMS_metadata{tail}.xml").write_text("<ps:EarthObservation/>")
    (folder / f"{scene}_metadata.json").write_text("{}")


def test_planetscope_scenes_with_their_udm2(tmp_path):
    """PlanetScope: one scene per ``<date>_<time>_<satellite>`` id, its multi-band analytic file named by
    Planet's bands (blue, green, red, nir; SuperDove's 8), surface reflectance at 0.0001, masked by the clear map
    of its udm2; the older udm, the Visual image and the metadata files are not scenes."""
    from geowm.bands import ndvi_bands

    rng = np.random.default_rng(9)
    clear = np.ones((SIZE, SIZE), bool)
    clear[5:15, 10:30] = False
    values = {}
    for scene in ("20230601_101010_12_2461", "20230606_100515_77_24a1"):
        values[scene] = rng.integers(200, 6000, (4, SIZE, SIZE))
        _planet(tmp_path / "ps", scene, values[scene], clear)
    scenes = discover(tmp_path / "ps")
    assert [s.id for s in scenes] == list(values)
    s = scenes[0]
    assert s.datetime.isoformat() == "2023-06-01T10:10:10+00:00"
    assert list(s.bands) == ["blue", "green", "red", "nir"] and s.mask.name == "UDM2" and s.mask.index == 1
    assert s.mask_clear == {1} and (s.bands["red"].scale, s.bands["red"].offset) == (1e-4, 0.0)
    ingest(tmp_path / "ps", tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    assert ds.sizes["time"] == 2 and list(ds.common_name.values) == ["blue", "green", "nir", "red"]
    assert ndvi_bands(list(ds.band.values), list(ds.common_name.values)) == (3, 2)
    np.testing.assert_allclose(ds.reflectance.sel(band="nir").isel(time=1).values,
                               values["20230606_100515_77_24a1"][3] * 1e-4, atol=1e-6)
    np.testing.assert_array_equal(ds.valid.isel(time=0).values, clear)
    # SuperDove's 8 bands, harmonized to Sentinel-2
    _planet(tmp_path / "sd", "20240510_093012_41_2507", rng.integers(200, 6000, (8, SIZE, SIZE)), clear,
            kind="AnalyticMS_SR_8b", tail="_harmonized_clip")
    (s,) = discover(tmp_path / "sd")
    assert list(s.bands) == ["coastal", "blue", "green_i", "green", "yellow", "red", "rededge", "nir"]
    assert s.common_names["rededge"] == "rededge" and "green_i" not in s.common_names and s.mask.name == "UDM2"


def _s2_scene(folder: Path, product: str, rho: dict[str, np.ndarray], scl: np.ndarray) -> None:
    """A Sentinel-2 L2A scene as GeoTIFFs named by product and band (baseline 05.09: scale 1e-4, offset -0.1 in
    the files' tags), SCL beside them, on the Landsat test grid at 10 m."""
    import rasterio
    from affine import Affine

    for band, arr in {**{b: np.round((v + 0.1) * 10000) for b, v in rho.items()}, "SCL": scl}.items():
        path = folder / f"{product}_{band}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", driver="GTiff", width=SIZE * 3, height=SIZE * 3, count=1, dtype="uint16",
                           crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 5400000), nodata=0) as dst:
            dst.write(np.kron(arr, np.ones((3, 3))).astype(np.uint16)[None])
            if band != "SCL":
                dst.scales, dst.offsets = (1e-4,), (-0.1,)


def test_sensors_share_a_cube_by_common_names(tmp_path):
    """Landsat 8 (SR_B2..SR_B5, QA_PIXEL, 30 m) and Sentinel-2 (B02, B03, B04, B8A, SCL, here 10 m) in one cube,
    asked for by common names: each band one spectral band (nir08: Landsat's B5, Sentinel-2's B8A), reflectance at
    each product's scale (float32: no one integer encoding holds both), each scene masked by its own band; a
    later Landsat scene appended without --bands takes the cube's names."""
    import rasterio
    from affine import Affine

    product = "LC08_L2SP_224077_20200518_20200820_02_T1"
    l8 = _oli_bands(0)
    _landsat_c2(tmp_path / "src" / "l8", product, l8, _qa())
    for path in (tmp_path / "src" / "l8").glob("*.TIF"):  # 30 m pixels on the same origin
        with rasterio.open(path, "r+") as dst:
            dst.transform = Affine(30, 0, 500000, 0, -30, 5400000)
    rng = np.random.default_rng(5)
    s2 = {b: np.round(rng.uniform(0.02, 0.5, (SIZE, SIZE)), 4) for b in ("B02", "B03", "B04", "B8A")}
    scl = np.full((SIZE, SIZE), 4)
    scl[:6] = 9
    _s2_scene(tmp_path / "src" / "s2", "S2B_MSIL2A_20200523T100559_N0509_R022_T33UUP_20200523T130000", s2, scl)
    ingest(tmp_path / "src", tmp_path / "cube", IngestOptions(**OPTS, bands=["blue", "green", "red", "nir08"],
                                                             resolution=30, resampling="average"))
    ds = open_cube(tmp_path / "cube")
    assert list(ds.band.values) == ["blue", "green", "red", "nir08"] and list(ds.common_name.values) == list(
        ds.band.values)
    assert ds.reflectance.encoding["dtype"] == np.float32
    np.testing.assert_allclose(ds.reflectance.sel(band="red").isel(time=0).values,
                               l8["SR_B4"] * 2.75e-5 - 0.2, atol=1e-6)
    np.testing.assert_allclose(ds.reflectance.sel(band="nir08").isel(time=1).values, s2["B8A"], atol=1e-4)
    np.testing.assert_array_equal(ds.valid.isel(time=0).values, np.isin(_qa(), [QA_CLEAR, QA_WATER]))
    np.testing.assert_array_equal(ds.valid.isel(time=1).values, scl != 9)
    _landsat_c2(tmp_path / "next", "LC08_L2SP_224077_20200603_20200820_02_T1", _oli_bands(3), _qa())
    for path in (tmp_path / "next").glob("*.TIF"):
        with rasterio.open(path, "r+") as dst:
            dst.transform = Affine(30, 0, 500000, 0, -30, 5400000)
    ingest(tmp_path / "next", tmp_path / "cube", IngestOptions(**OPTS))
    assert open_cube(tmp_path / "cube").sizes["time"] == 3
