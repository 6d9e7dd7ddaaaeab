"""Stacks without metadata (a processing chain's ``stack.tif``, an export that lost it). ``--band-names``: bands
without descriptions get names, common names (so NDVI is known) and their mask band; appends take the names the
cube's first delivery was given. ``--scale`` / ``--offset``: bands whose scale nothing states are read at it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_tif
from typer.testing import CliRunner

from geowm.bands import common_names_of, ndvi_bands
from geowm.cli import app
from geowm.cube import IngestOptions, cube_checksum, ingest, open_cube
from geowm.cube.store import read_state
from geowm.sources import SourceError, discover

OPTS = dict(tile_size=32, time_chunk=2, scheduler="synchronous")
SIZE = 40
NAMES = ["blue", "green", "red", "nir", "cloud"]


def _stack(folder: Path, day: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 5-band uint16 stack (blue, green, red, nir as reflectance x 10000, then a 0/1 cloud flag), no band
    descriptions; returns the reflectance (4, y, x) and the cloud flag."""
    rng = np.random.default_rng(seed)
    rho = rng.uniform(0.02, 0.5, (4, SIZE, SIZE))
    cloud = np.zeros((SIZE, SIZE), np.uint16)
    cloud[seed % 7: seed % 7 + 9, 5:30] = 1
    write_tif(folder / f"stack_{day}.tif", np.concatenate([np.round(rho * 10000), cloud[None]]).astype(np.uint16))
    return rho, cloud.astype(bool)


def test_band_names_name_a_stack_its_common_names_and_its_mask(tmp_path):
    rho, cloud = _stack(tmp_path / "a", "20230105", 1)
    (plain,) = discover(tmp_path / "a")
    assert list(plain.bands) == ["band1", "band2", "band3", "band4", "band5"] and not plain.common_names
    assert ndvi_bands(list(plain.bands), [plain.common_names.get(b, "") for b in plain.bands]) is None

    (scene,) = discover(tmp_path / "a", mask_band="cloud", mask_clear=[0], band_names=NAMES)
    assert list(scene.bands) == NAMES[:4] and scene.mask.name == "cloud" and scene.mask.index == 5
    assert scene.common_names == {n: n for n in NAMES[:4]} and scene.mask_clear == {0}

    ingest(tmp_path / "a", tmp_path / "cube", IngestOptions(**OPTS, band_names=NAMES, mask_band="cloud",
                                                           mask_clear=[0]))
    ds = open_cube(tmp_path / "cube")
    cube_bands = ["blue", "green", "nir", "red"]  # a new cube's bands in name order, as always
    assert list(ds.band.values) == cube_bands and common_names_of(ds) == cube_bands
    assert ndvi_bands(list(ds.band.values), common_names_of(ds)) == (3, 2)
    np.testing.assert_array_equal(ds.valid.isel(time=0).values, ~cloud)
    # no scale tag: the stack's numbers are stored as they are
    np.testing.assert_array_equal(ds.reflectance.sel(band="red").isel(time=0).values, np.round(rho[2] * 10000))

    # the next delivery, ingested without the options (as the pipeline's ingest task does): the cube's names, mask
    # and rule
    rho2, cloud2 = _stack(tmp_path / "b", "20230110", 2)
    ingest(tmp_path / "b", tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    assert ds.sizes["time"] == 2 and list(ds.band.values) == cube_bands
    np.testing.assert_array_equal(ds.valid.isel(time=1).values, ~cloud2)
    np.testing.assert_array_equal(ds.reflectance.sel(band="nir").isel(time=1).values, np.round(rho2[3] * 10000))
    assert [s.get("band_names") for s in read_state(tmp_path / "cube").sources] == [NAMES, NAMES]
    assert [s["mask"]["band"] for s in read_state(tmp_path / "cube").sources] == ["CLOUD", "CLOUD"]


@pytest.mark.parametrize("names, problem", [
    ("blue,green,red", r"stack_20230105.tif: 5 bands, but --band-names gives 3 names"),
    ("blue,green,red,nir,Blue", "give one distinct, non-empty name per band"),
    ("blue,,red,nir,cloud", "give one distinct, non-empty name per band"),
])
def test_band_names_that_do_not_fit_are_refused_and_the_cube_kept(tmp_path, names, problem):
    _stack(tmp_path / "a", "20230105", 1)
    ingest(tmp_path / "a", tmp_path / "cube", IngestOptions(**OPTS, band_names=NAMES, mask_band="cloud",
                                                           mask_clear=[0]))
    before = cube_checksum(tmp_path / "cube")
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "a"), "--cube", str(tmp_path / "cube"), "--band-names",
                                   names, "--replace", "--scheduler", "synchronous", "--no-catalog"])
    assert res.exit_code == 2 and problem.replace("\\", "") in " ".join(res.output.split()), res.output
    assert cube_checksum(tmp_path / "cube") == before


def test_band_names_refuse_a_scene_of_one_file_per_band(tmp_path):
    for band in ("B4", "B5"):
        write_tif(tmp_path / "l" / f"LC08_L2SP_224077_20200518_20200820_02_T1_SR_{band}.TIF",
                  np.full((SIZE, SIZE), 9000, np.uint16), nodata=0)
    with pytest.raises(SourceError, match="names the bands of a multi-band file, but scene .* is 2 files"):
        discover(tmp_path / "l", band_names=["red", "nir"])


def test_scale_and_offset_make_untagged_numbers_reflectance(tmp_path):
    """Without --scale an untagged uint16 stack is stored as its numbers; with --scale 0.0001 --offset -0.1 (Sentinel-2
    from baseline 04.00 exported without its metadata) as reflectance, in a uint16 cube at that scale; an append
    leaving the options out is read at the cube's scale."""
    rng = np.random.default_rng(3)
    rho = rng.uniform(0.02, 0.5, (4, SIZE, SIZE))
    write_tif(tmp_path / "a" / "stack_20230105.tif", np.round(rho * 10000 + 1000).astype(np.uint16))
    opts = dict(OPTS, band_names=NAMES[:4])
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "a"), "--cube", str(tmp_path / "cube"), "--band-names",
                                   ",".join(NAMES[:4]), "--scale", "0.0001", "--offset", "-0.1", "--scheduler",
                                   "synchronous", "--no-catalog"])
    assert res.exit_code == 0, res.output
    ds = open_cube(tmp_path / "cube")
    assert ds.reflectance.encoding["dtype"] == np.uint16
    np.testing.assert_allclose(ds.reflectance.sel(band="red").isel(time=0).values, rho[2], atol=1e-4)
    rho2 = rng.uniform(0.02, 0.5, (4, SIZE, SIZE))
    write_tif(tmp_path / "b" / "stack_20230110.tif", np.round(rho2 * 10000 + 1000).astype(np.uint16))
    ingest(tmp_path / "b", tmp_path / "cube", IngestOptions(**OPTS))  # names and scale: the cube's
    np.testing.assert_allclose(open_cube(tmp_path / "cube").reflectance.sel(band="nir").isel(time=1).values,
                               rho2[3], atol=1e-4)  # its numbers taken at the cube's scale and offset
    ingest(tmp_path / "a", tmp_path / "plain", IngestOptions(**opts))
    np.testing.assert_array_equal(open_cube(tmp_path / "plain").reflectance.sel(band="red").isel(time=0).values,
                                  np.round(rho[2] * 10000 + 1000))
    before = cube_checksum(tmp_path / "cube")
    for bad in (["--scale", "0"], ["--scale", "nan"], ["--offset", "inf"]):
        res = CliRunner().invoke(app, ["ingest", str(tmp_path / "b"), "--cube", str(tmp_path / "cube"), *bad,
                                       "--replace", "--scheduler", "synchronous", "--no-catalog"])
        assert res.exit_code == 2 and bad[0] in res.output, res.output
    assert cube_checksum(tmp_path / "cube") == before


def test_a_cloud_probability_band_masks_by_a_range_of_clear_values(tmp_path):
    """A stack with a cloud probability band (0-100 %, as s2cloudless or Sentinel-2's MSK_CLDPRB give it):
    ``--mask-clear 0-40`` keeps pixels of 40 % or less; the rule is recorded and shown as a range."""
    rng = np.random.default_rng(4)
    rho = rng.uniform(0.02, 0.5, (4, SIZE, SIZE))
    prob = rng.integers(0, 101, (SIZE, SIZE))
    write_tif(tmp_path / "a" / "stack_20230105.tif",
              np.concatenate([np.round(rho * 10000), prob[None]]).astype(np.uint16))
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "a"), "--cube", str(tmp_path / "cube"), "--band-names",
                                   "blue,green,red,nir,cldprb", "--mask-band", "cldprb", "--mask-clear", "0-40",
                                   "--scheduler", "synchronous", "--no-catalog"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(open_cube(tmp_path / "cube").valid.isel(time=0).values, prob <= 40)
    assert read_state(tmp_path / "cube").sources[0]["mask"]["clear"] == list(range(41))
    res = CliRunner().invoke(app, ["info", str(tmp_path / "cube")])
    assert "CLDPRB clear values 0-40, buffer 0 m" in " ".join(res.output.split()), res.output
    for bad in ("40-0", "0-x", "0--5-"):
        res = CliRunner().invoke(app, ["ingest", str(tmp_path / "a"), "--cube", str(tmp_path / "other"),
                                       "--mask-clear", bad])
        assert res.exit_code == 2 and "integers or ranges (0-40)" in res.output, res.output
