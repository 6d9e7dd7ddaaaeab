"""Landsat Level-1 deliveries as USGS ships them: the metadata file beside the bands (``_MTL.txt``, ``_MTL.json``,
``_MTL.xml``) gives the top-of-atmosphere rescaling of each band and the sun elevation that makes it reflectance, and
Collection 1's ``BQA`` band is the cloud mask."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tif

from geowm.cube import IngestOptions, cube_checksum, ingest, open_cube
from geowm.products import landsat_mtl_scaling
from geowm.sources import SourceError, discover

OPTS = dict(tile_size=32, time_chunk=2, scheduler="synchronous")
SIZE = 48

# Collection 1 BQA (OLI): 2720 = low confidence of cloud (bit 5), shadow (7), snow (9) and cirrus (11): clear
BQA = {"clear": 2720, "fill": 1, "terrain": 2720 | 2, "saturated": 2720 | 0b1100, "cloud": 2800,
       "cloud_medium": 2720 - 32 + 64, "shadow": 2720 | 256, "snow": 2720 | 1024, "cirrus": 2720 | 4096}
BQA_CLEAR = {"clear", "saturated"}


def _mtl_txt(groups: dict[str, dict[str, object]], root: str) -> str:
    lines = [f"GROUP = {root}"]
    for group, values in groups.items():
        lines.append(f"  GROUP = {group}")
        lines += [f"    {k} = {v}" for k, v in values.items()]
        lines.append(f"  END_GROUP = {group}")
    return "\n".join(lines + [f"END_GROUP = {root}", "END", ""])


def _rescaling(mult: dict[str, float], add: dict[str, float], thermal: tuple[str, ...] = ()) -> dict[str, object]:
    out: dict[str, object] = {}
    for b in list(mult) + list(thermal):
        out[f"RADIANCE_MULT_BAND_{b}"] = 1.2e-2
        out[f"RADIANCE_ADD_BAND_{b}"] = -60.0
    for b in mult:
        out[f"REFLECTANCE_MULT_BAND_{b}"] = f"{mult[b]:.4E}"
        out[f"REFLECTANCE_ADD_BAND_{b}"] = f"{add[b]:.6f}"
    return out


def _scene(folder: Path, product: str, dns: dict[str, np.ndarray], qa: np.ndarray | None, mtl: str | None,
           fmt: str = "txt", collection2: bool = False) -> None:
    for band, arr in dns.items():
        write_tif(folder / f"{product}_{band}.TIF", arr, nodata=None)
    if qa is not None:
        write_tif(folder / f"{product}_BQA.TIF", qa.astype(np.uint16))
    if mtl is not None:
        (folder / f"{product}_MTL.{fmt}").write_text(mtl)


def _bqa() -> tuple[np.ndarray, np.ndarray]:
    names = list(BQA)
    rows = np.repeat(np.arange(len(names)), -(-SIZE // len(names)))[:SIZE]
    qa = np.array([BQA[names[r]] for r in rows])[:, None].repeat(SIZE, 1)
    clear = np.array([names[r] in BQA_CLEAR for r in rows])[:, None].repeat(SIZE, 1)
    return qa, clear


def _oli_dns(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"B{i}": rng.integers(6000, 30000, (SIZE, SIZE)).astype(np.uint16) for i in (2, 3, 4, 5)}


def test_collection1_oli_level1_is_rescaled_by_its_mtl_and_masked_by_bqa(tmp_path):
    product = "LC08_L1TP_224077_20200518_20200527_01_T1"
    dns, (qa, clear) = _oli_dns(0), _bqa()
    mult = {str(b): 2.0e-5 for b in range(1, 10)}
    add = {str(b): -0.1 for b in range(1, 10)}
    mtl = _mtl_txt({"METADATA_FILE_INFO": {"ORIGIN": '"Image courtesy of the U.S. Geological Survey"'},
                    "IMAGE_ATTRIBUTES": {"SUN_AZIMUTH": 35.1, "SUN_ELEVATION": 38.5},
                    "RADIOMETRIC_RESCALING": _rescaling(mult, add, thermal=("10", "11"))}, "L1_METADATA_FILE")
    sun = math.sin(math.radians(38.5))
    _scene(tmp_path / "src", product, dns, qa, mtl)
    (scene,) = discover(tmp_path / "src")
    assert scene.id == product and scene.mask.name == "BQA"
    assert scene.mask_bits == {0, 1, 4, 6, 8, 10, 12} and (scene.mask.scale, scene.mask.offset) == (None, None)
    assert set(scene.bands) == set(dns) and all(
        (r.scale, r.offset) == pytest.approx((2e-5 / sun, -0.1 / sun)) and r.own_scaling for r in scene.bands.values())
    ingest(tmp_path / "src", tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    assert list(ds.common_name.values) == ["blue", "green", "red", "nir08"]
    # each scene's sun elevation scales it: one integer encoding cannot hold a series, so the cube is float32
    assert ds.reflectance.encoding["dtype"] == np.float32
    for b, dn in dns.items():  # top-of-atmosphere reflectance, not digital numbers
        np.testing.assert_allclose(ds.reflectance.sel(band=b).isel(time=0).values, (dn * 2e-5 - 0.1) / sun,
                                   rtol=1e-6)
    # BQA: fill, terrain occlusion, cloud, medium or high confidence of cloud, shadow, snow and cirrus are out
    np.testing.assert_array_equal(ds.valid.isel(time=0).values, clear)
    # the next scene, under a higher sun, joins the series as reflectance
    later, dns2 = "LC08_L1TP_224077_20200603_20200610_01_T1", _oli_dns(9)
    _scene(tmp_path / "src2", later, dns2, qa, mtl.replace("SUN_ELEVATION = 38.5", "SUN_ELEVATION = 52.0"))
    ingest(tmp_path / "src2", tmp_path / "cube", IngestOptions(**OPTS))
    got = open_cube(tmp_path / "cube").reflectance.sel(band="B4").values
    np.testing.assert_allclose(got[1], (dns2["B4"] * 2e-5 - 0.1) / math.sin(math.radians(52.0)), rtol=1e-6)
    np.testing.assert_allclose(got[0], (dns["B4"] * 2e-5 - 0.1) / sun, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["txt", "json", "xml"])
def test_collection2_level1_metadata_in_each_of_its_formats(tmp_path, fmt):
    product = "LC09_L1TP_224077_20230601_20230602_02_T1"
    mult = {"2": 2.0e-5, "3": 2.0e-5, "4": 2.0e-5, "5": 2.0e-5}
    add = dict.fromkeys(mult, -0.1)
    groups = {"PRODUCT_CONTENTS": {"PROCESSING_LEVEL": "L1TP"}, "IMAGE_ATTRIBUTES": {"SUN_ELEVATION": 61.25},
              "LEVEL1_RADIOMETRIC_RESCALING": _rescaling(mult, add, thermal=("10",)),
              "LEVEL1_THERMAL_CONSTANTS": {"K1_CONSTANT_BAND_10": 774.8853}}
    if fmt == "txt":
        text = _mtl_txt(groups, "LANDSAT_METADATA_FILE")
    elif fmt == "json":  # USGS writes every value as a string
        text = json.dumps({"LANDSAT_METADATA_FILE": {g: {k: str(v) for k, v in kv.items()}
                                                     for g, kv in groups.items()}})
    else:
        body = "".join(f"<{g}>" + "".join(f"<{k}>{v}</{k}>" for k, v in kv.items()) + f"</{g}>"
                       for g, kv in groups.items())
        text = f'<?xml version="1.0" encoding="UTF-8"?><LANDSAT_METADATA_FILE>{body}</LANDSAT_METADATA_FILE>'
    path = tmp_path / f"{product}_MTL.{fmt}"
    path.write_text(text)
    scaling, sun = landsat_mtl_scaling(path), math.sin(math.radians(61.25))
    assert scaling["B4"] == pytest.approx((2e-5 / sun, -0.1 / sun))
    assert scaling["B10"] == (1.2e-2, -60.0)  # thermal: radiance, no sun
    dns = _oli_dns(1)
    dns["B10"] = np.full((SIZE, SIZE), 30000, np.uint16)
    _scene(tmp_path, product, dns, None, None)
    (scene,) = discover(tmp_path)
    assert scene.bands["B5"].scale == pytest.approx(2e-5 / sun) and scene.bands["B10"].scale == 1.2e-2
    ingest(tmp_path, tmp_path / "cube", IngestOptions(**OPTS))  # thermal left out of a new cube
    ds = open_cube(tmp_path / "cube")
    assert list(ds.band.values) == ["B2", "B3", "B4", "B5"] and ds.reflectance.encoding["dtype"] == np.float32
    np.testing.assert_allclose(ds.reflectance.sel(band="B5").isel(time=0).values, (dns["B5"] * 2e-5 - 0.1) / sun,
                               rtol=1e-6)


def test_landsat7_level1_bands_of_several_scales_make_a_float_cube(tmp_path):
    """TM/ETM+ Level-1 rescales each band by its own factor, which changes from scene to scene: one integer
    encoding cannot hold them, so a new cube stores physical values as float32; its gain-suffixed thermal band
    (``B6_VCID_1``) is a band of the scene, not a scene of its own."""
    rng = np.random.default_rng(2)
    folders, dns = [], []
    for k, (day, f, elevation) in enumerate((("20000518", 1.0, 41.0), ("20000603", 1.05, 37.5))):
        product = f"LE07_L1TP_224077_{day}_20200918_01_T1"
        mult = {"1": 1.18e-3 * f, "2": 1.22e-3 * f, "3": 1.03e-3 * f, "4": 1.31e-3 * f, "5": 1.02e-3 * f,
                "7": 9.1e-4 * f}
        add = {"1": -0.0059, "2": -0.0125, "3": -0.0099, "4": -0.0118, "5": -0.0077, "7": -0.0061}
        scene = {f"B{b}": rng.integers(1, 255, (SIZE, SIZE)).astype(np.uint8) for b in mult}
        scene |= {"B6_VCID_1": np.full((SIZE, SIZE), 120, np.uint8), "B6_VCID_2": np.full((SIZE, SIZE), 140, np.uint8)}
        mtl = _mtl_txt({"PRODUCT_METADATA": {"SPACECRAFT_ID": '"LANDSAT_7"'},
                        "IMAGE_ATTRIBUTES": {"SUN_ELEVATION": elevation},
                        "RADIOMETRIC_RESCALING": _rescaling(mult, add, thermal=("6_VCID_1", "6_VCID_2"))},
                       "L1_METADATA_FILE")
        _scene(tmp_path / f"s{k}", product, scene, None, mtl)
        folders.append(tmp_path / f"s{k}")
        dns.append((scene, mult, add, math.sin(math.radians(elevation))))
    (scene,) = discover(folders[0])
    assert set(scene.bands) == {"B1", "B2", "B3", "B4", "B5", "B7", "B6_VCID_1", "B6_VCID_2"}
    assert scene.common_names["B6_VCID_1"] == "lwir" and scene.common_names["B4"] == "nir08"
    for folder in folders:
        ingest(folder, tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    assert list(ds.band.values) == ["B1", "B2", "B3", "B4", "B5", "B7"]  # thermal left out of a new cube
    assert ds.reflectance.encoding["dtype"] == np.float32 and ds.sizes["time"] == 2
    for t, (scene_dns, mult, add, sun) in enumerate(dns):
        for b in ("B1", "B4", "B7"):
            n = b[1:]
            np.testing.assert_allclose(ds.reflectance.sel(band=b).isel(time=t).values,
                                       (scene_dns[b] * mult[n] + add[n]) / sun, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("content, problem", [
    (_mtl_txt({"RADIOMETRIC_RESCALING": {"REFLECTANCE_MULT_BAND_4": "2.0E-05"}}, "L1_METADATA_FILE"),
     "REFLECTANCE_MULT_BAND_4 is given but not REFLECTANCE_ADD_BAND_4"),
    (_mtl_txt({"RADIOMETRIC_RESCALING": {"REFLECTANCE_MULT_BAND_4": "x", "REFLECTANCE_ADD_BAND_4": "-0.1"}},
              "L1_METADATA_FILE"), "'x' / REFLECTANCE_ADD_BAND_4 '-0.1' are not numbers"),
    (_mtl_txt({"RADIOMETRIC_RESCALING": {"REFLECTANCE_MULT_BAND_4": "0", "REFLECTANCE_ADD_BAND_4": "-0.1"}},
              "L1_METADATA_FILE"), "need a finite, non-zero scale"),
    (_mtl_txt({"IMAGE_ATTRIBUTES": {"SUN_ELEVATION": "40.1"}}, "L1_METADATA_FILE"), "no RADIOMETRIC_RESCALING"),
    (_mtl_txt({"IMAGE_ATTRIBUTES": {"SUN_ELEVATION": "40.1"},
               "RADIOMETRIC_RESCALING": {"REFLECTANCE_MULT_BAND_2": "2.0E-05", "REFLECTANCE_ADD_BAND_2": "-0.1"}},
              "L1_METADATA_FILE"), "no REFLECTANCE_MULT_BAND / RADIANCE_MULT_BAND for band B4"),
    (_mtl_txt({"RADIOMETRIC_RESCALING": {"REFLECTANCE_MULT_BAND_4": "2.0E-05", "REFLECTANCE_ADD_BAND_4": "-0.1"}},
              "L1_METADATA_FILE"), "SUN_ELEVATION None is not a number"),
    (_mtl_txt({"IMAGE_ATTRIBUTES": {"SUN_ELEVATION": "-3.5"},
               "RADIOMETRIC_RESCALING": {"REFLECTANCE_MULT_BAND_4": "2.0E-05", "REFLECTANCE_ADD_BAND_4": "-0.1"}},
              "L1_METADATA_FILE"), "SUN_ELEVATION -3.5 is not between 0 and 90 degrees"),
])
def test_bad_landsat_metadata_is_refused_naming_it(tmp_path, content, problem):
    from typer.testing import CliRunner

    from geowm.cli import app

    good = "LC08_L1TP_224077_20200518_20200527_01_T1"
    _scene(tmp_path / "a", good, {"B4": _oli_dns(3)["B4"]}, None, _mtl_txt(
        {"IMAGE_ATTRIBUTES": {"SUN_ELEVATION": 40.0}, "RADIOMETRIC_RESCALING": _rescaling({"4": 2e-5}, {"4": -0.1})},
        "L1_METADATA_FILE"))
    ingest(tmp_path / "a", tmp_path / "cube", IngestOptions(**OPTS))
    before = cube_checksum(tmp_path / "cube")
    bad = "LC08_L1TP_224077_20200603_20200610_01_T1"
    _scene(tmp_path / "b", bad, {"B4": _oli_dns(4)["B4"]}, None, content)
    with pytest.raises(SourceError, match=f"{bad}_MTL.txt: .*{problem}"):
        discover(tmp_path / "b")
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "b"), "--cube", str(tmp_path / "cube"),
                                   "--scheduler", "synchronous", "--no-catalog"])
    assert res.exit_code == 2 and f"{bad}_MTL.txt" in res.output, res.output
    assert cube_checksum(tmp_path / "cube") == before


def test_a_level1_scene_without_its_metadata_keeps_its_numbers_and_level2_ignores_it(tmp_path):
    """Without an MTL file nothing states a Level-1 band's scale (taken at the cube's, as any untagged GeoTIFF);
    a Level-2 product keeps its published surface-reflectance scale whatever its MTL says."""
    l1 = "LC08_L1TP_224077_20200518_20200527_01_T1"
    _scene(tmp_path / "l1", l1, _oli_dns(5), None, None)
    (scene,) = discover(tmp_path / "l1")
    assert all(r.scale is None and r.offset is None for r in scene.bands.values())
    l2 = "LC08_L2SP_224077_20200518_20200820_02_T1"
    dns = {f"SR_{b}": v for b, v in _oli_dns(6).items()}
    mtl = _mtl_txt({"LEVEL1_RADIOMETRIC_RESCALING": _rescaling({"4": 2e-5}, {"4": -0.1})}, "LANDSAT_METADATA_FILE")
    _scene(tmp_path / "l2", l2, dns, None, mtl)
    (scene,) = discover(tmp_path / "l2")
    assert (scene.bands["SR_B4"].scale, scene.bands["SR_B4"].offset) == (2.75e-5, -0.2)
