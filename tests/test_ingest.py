"""Ingestion into the Zarr (Icechunk) cube: round trip, real Landsat pair, append, insert, idempotence,
mosaicking, reprojection, and a killed ingest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from affine import Affine
from conftest import write_tif

from geowm.cube import IngestOptions, cube_checksum, ingest, open_cube
from geowm.cube.store import tree_digest

BANDS = ["B02", "B03", "B04", "B08"]
SIZE = 64
OPTS = dict(tile_size=32, time_chunk=2, scheduler="synchronous")


def make_scene(folder: Path, day: date, seed: int, transform: Affine | None = None, crs: str = "EPSG:32633",
               size: int = SIZE, cloud: bool = True) -> dict:
    """A 4-band uint16 scene plus its SCL mask; returns the arrays written."""
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 10000, (4, size, size)).astype(np.uint16)
    data[:, :3, :5] = 0  # a fill corner
    scl = np.full((size, size), 4, np.uint8)
    if cloud:
        scl[10:20, 10:30] = 9  # a cloud
        scl[40:44, :] = 3  # a shadow
        scl[50:56, 20:40] = 11  # snow: masked by default, like cloud
    stamp = f"{day:%Y%m%d}T103021"
    tags = {"ACQUISITION_DATETIME": f"{day:%Y-%m-%d}T10:30:21Z"}
    write_tif(folder / f"S2T_{stamp}.tif", data, transform=transform, crs=crs, nodata=0, descriptions=BANDS,
              tags=tags)
    write_tif(folder / f"S2T_{stamp}_SCL.tif", scl, transform=transform, crs=crs, nodata=0, descriptions=["SCL"],
              tags=tags)
    return {"data": data, "scl": scl}


def rewrite_scl(folder: Path, day: date, scl: np.ndarray) -> None:
    """Replace the SCL mask :func:`make_scene` wrote for ``day``."""
    write_tif(folder / f"S2T_{day:%Y%m%d}T103021_SCL.tif", scl, nodata=0, descriptions=["SCL"],
              tags={"ACQUISITION_DATETIME": f"{day:%Y-%m-%d}T10:30:21Z"})


def days(n: int, start: date = date(2021, 3, 1), step: int = 5) -> list[date]:
    return [start + timedelta(days=step * i) for i in range(n)]


def raw(cube: Path) -> xr.Dataset:
    """The cube as stored (no CF decoding), loaded."""
    from geowm.cube.store import open_repo

    store = open_repo(cube).readonly_session("main").store
    return xr.open_zarr(store, consolidated=False, mask_and_scale=False).load()


def test_snow_is_masked_by_default_and_unclassified_with_mask_clear(tmp_path):
    src = tmp_path / "src"
    d = days(1)[0]
    written = make_scene(src, d, 0)
    scl = written["scl"]
    scl[25:28, 40:50] = 7  # unclassified: Sen2Cor's cloud edges and thin cloud
    rewrite_scl(src, d, scl)
    ingest(src, tmp_path / "default", IngestOptions(**OPTS))
    ingest(src, tmp_path / "keep", IngestOptions(**OPTS, mask_clear=[4, 5, 6, 7, 11]))
    ingest(src, tmp_path / "strict", IngestOptions(**OPTS, mask_clear=[4, 5, 6]))
    default, keep, strict = (raw(tmp_path / k).valid.isel(time=0).values for k in ("default", "keep", "strict"))
    assert not default[scl == 11].any() and keep[scl == 11].all() and not strict[scl == 11].any()
    assert default[scl == 7].all() and keep[scl == 7].all() and not strict[scl == 7].any()


def test_a_cube_keeps_the_mask_rule_it_was_made_with(tmp_path):
    from geowm.cube import IngestError
    from geowm.cube.info import summarize

    first, second = days(2)
    for d, folder, seed in ((first, "one", 0), (second, "two", 1)):
        scl = make_scene(tmp_path / folder, d, seed)["scl"]
        scl[25:28, 40:50] = 7
        rewrite_scl(tmp_path / folder, d, scl)
    rule = dict(mask_clear=[4, 5, 6], mask_buffer=20.0)
    cube = tmp_path / "cube"
    ingest(tmp_path / "one", cube, IngestOptions(**OPTS, **rule))
    assert summarize(cube)["mask_rules"] == [{"band": "SCL", "clear": [4, 5, 6], "buffer_m": 20.0, "scenes": 1}]
    before = cube_checksum(cube)
    for other in (dict(mask_buffer=0.0), dict(mask_clear=[4, 5, 6, 7]), dict(mask_clear=[4, 5, 6], mask_buffer=10.0)):
        with pytest.raises(IngestError, match="one cube keeps one mask rule") as err:
            ingest(tmp_path / "two", cube, IngestOptions(**OPTS, **other))
        assert "_SCL.tif" in str(err.value) and "clear values 4,5,6, buffer 20 m" in str(err.value)
        assert cube_checksum(cube) == before
    ingest(tmp_path / "two", cube, IngestOptions(**OPTS))  # options left out: the cube's rule
    ingest(tmp_path / "two", tmp_path / "alone", IngestOptions(**OPTS, **rule))
    alone = raw(tmp_path / "alone").valid.isel(time=0).values
    np.testing.assert_array_equal(raw(cube).valid.isel(time=1).values, alone)
    assert summarize(cube)["mask_rules"] == [{"band": "SCL", "clear": [4, 5, 6], "buffer_m": 20.0, "scenes": 2}]
    ingest(tmp_path / "two", tmp_path / "default", IngestOptions(**OPTS))  # a new cube: the defaults
    assert not (raw(cube).valid.isel(time=1).values == raw(tmp_path / "default").valid.isel(time=0).values).all()


def test_mask_buffer_grows_the_mask_across_tiles_and_a_bad_buffer_is_refused(tmp_path):
    from scipy import ndimage

    from geowm.cube import IngestError
    from geowm.cube.grid import CubeGrid
    from geowm.cube.ingest import buffer_pixels

    src = tmp_path / "src"
    d = days(1)[0]
    written = make_scene(src, d, 0)
    scl = written["scl"].copy()
    scl[2:6, 28:31] = 8  # a cloud 2 px short of the tile edge at column 32: its buffer lies in the next tile
    scl[60, 33] = 7  # unclassified: clear by default, so not grown
    rewrite_scl(src, d, scl)
    ingest(src, tmp_path / "b0", IngestOptions(**OPTS))
    ingest(src, tmp_path / "b20", IngestOptions(**OPTS, mask_buffer=20.0))  # 10 m pixels: 2 px
    v0 = raw(tmp_path / "b0").valid.isel(time=0).values
    v2 = raw(tmp_path / "b20").valid.isel(time=0).values
    flagged = ~np.isin(scl, [4, 5, 6, 7])  # cloud, shadow, snow (0, no data, is not in the file's mask)
    dist = ndimage.distance_transform_edt(~flagged)
    np.testing.assert_array_equal(v0, np.isin(scl, [4, 5, 6, 7]) & (written["data"] > 0).all(0))
    np.testing.assert_array_equal(v2, v0 & (dist > 2))
    assert v0[4, 32] and not v2[4, 32] and v2[4, 33]  # across the tile edge: 2 px from the cloud, then 3
    assert v2[60, 31] and v2[60, 33]

    before = cube_checksum(tmp_path / "b0")
    for bad in (-10.0, float("nan"), 1e9):
        with pytest.raises(IngestError, match="--mask-buffer"):
            ingest(src, tmp_path / "b0", IngestOptions(**OPTS, mask_buffer=bad))
    assert cube_checksum(tmp_path / "b0") == before
    utm = CubeGrid("EPSG:32633", Affine(10, 0, 500000, 0, -10, 5400000), 64, 64)
    geo = CubeGrid("EPSG:4326", Affine(0.0001, 0, 10, 0, -0.0001, 50), 64, 64)
    assert [buffer_pixels(utm, m) for m in (0, 5, 20, 25)] == [0, 1, 2, 3]
    assert buffer_pixels(geo, 20) == 2  # 0.0001 degree: 11.1 m at the equator


def _masked_tif(path: Path, how: str) -> None:
    """Bands of 1000 left of column 40 and of 1234 right of it, where a validity mask says no data; no nodata
    value. The mask: an internal per-dataset mask (``GDAL_TIFF_INTERNAL_MASK``) of 4 bands B02, B03, B04, B08, or
    the alpha band of an RGBA file (B04, B03, B02 and alpha)."""
    data = np.full((4, 64, 64), 1000, np.uint16)
    data[:, :, 40:] = 1234  # looks like data: only the mask tells
    mask = np.full((64, 64), 255, np.uint8)
    mask[:, 40:] = 0
    prof = dict(driver="GTiff", width=64, height=64, dtype="uint16", crs="EPSG:32633", tiled=True, blockxsize=32,
                blockysize=32, transform=Affine(10, 0, 500000, 0, -10, 5400000))
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        if how == "internal mask":
            names = ("B02", "B03", "B04", "B08")
            with rasterio.open(path, "w", count=4, **prof) as dst:
                dst.write(data)
                dst.write_mask(mask)
        else:
            names = ("B04", "B03", "B02")
            with rasterio.open(path, "w", count=4, photometric="RGB", alpha="YES", **prof) as dst:
                dst.write(np.concatenate([data[:3], mask[None].astype(np.uint16) * 257]))
        with rasterio.open(path, "r+") as dst:
            for i, name in enumerate(names, start=1):
                dst.set_band_description(i, name)


@pytest.mark.parametrize("how", ["internal mask", "alpha band"])
@pytest.mark.parametrize("grid", ["same grid", "warped"])
def test_a_validity_mask_beside_the_bands_is_no_data(tmp_path, how, grid):
    """A GeoTIFF whose footprint is a mask band (COGs of warped scenes; RGBA files), not a nodata value: the
    pixels it masks are not observations, on the file's own grid and warped; an alpha band is not a cube band."""
    _masked_tif(tmp_path / "src" / "S2X_20230601T100000.tif", how)
    opts = IngestOptions(scheduler="synchronous", **({"crs": "EPSG:32634", "resolution": 10.0} if grid == "warped"
                                                      else {}))
    ingest(tmp_path / "src", tmp_path / "cube", opts)
    ds = open_cube(tmp_path / "cube")
    assert list(ds.band.values) == (["B02", "B03", "B04", "B08"] if how == "internal mask" else ["B02", "B03", "B04"])
    valid, refl = ds.valid.values[0], ds.reflectance.values[0]
    assert valid.sum() > 1500  # the 40 unmasked columns of 64 x 64 px
    np.testing.assert_array_equal(refl[:, valid], 1000)  # nothing of what the mask hides
    if grid == "same grid":
        assert valid[:, :40].all() and not valid[:, 40:].any()


def test_round_trip_exact_values_and_mask(tmp_path):
    src = tmp_path / "src"
    written = {d: make_scene(src, d, i) for i, d in enumerate(days(5))}
    report = ingest(src, tmp_path / "cube", IngestOptions(**OPTS))
    assert len(report.added_times) == 5
    ds = raw(tmp_path / "cube")
    assert list(ds.band.values) == BANDS
    assert ds.sizes == {"time": 5, "band": 4, "y": SIZE, "x": SIZE}
    for i, d in enumerate(days(5)):
        np.testing.assert_array_equal(ds.reflectance.isel(time=i).values, written[d]["data"])
        expected_valid = np.isin(written[d]["scl"], [4, 5, 6, 7]) & (written[d]["data"] > 0).all(0)
        np.testing.assert_array_equal(ds.valid.isel(time=i).values, expected_valid)
    assert str(ds.time.values[0])[:19] == "2021-03-01T10:30:21"
    # decoded view: fill -> NaN, the CRS and transform readable by rioxarray
    dec = open_cube(tmp_path / "cube")
    assert np.isnan(dec.reflectance.isel(time=0, band=0, y=0, x=0).values)
    assert dec.rio.crs.to_epsg() == 32633
    assert tuple(dec.rio.transform())[:6] == (10.0, 0.0, 500000.0, 0.0, -10.0, 5400000.0)
    assert dec.reflectance.chunksizes["y"][0] == 32 and dec.reflectance.chunksizes["time"][0] == 2


def test_real_landsat_pair_into_one_cube(tmp_path, landsat_dir):
    report = ingest(landsat_dir, tmp_path / "cube", IngestOptions(scheduler="local"))
    assert len(report.added_times) == 1 and report.tiles_written > 1
    ds = open_cube(tmp_path / "cube")
    assert ds.rio.crs.to_epsg() == 32621
    assert list(ds.band.values) == ["B2", "B3", "B4"]
    assert list(ds.common_name.values) == ["blue", "green", "red"]  # Landsat 8 OLI, from the product id
    stored = raw(tmp_path / "cube").reflectance.isel(time=0)
    rng = np.random.default_rng(1)
    for row in ("224077", "224078"):  # both footprints present, values equal rasterio reads
        for band in ("B2", "B4"):
            path = next(landsat_dir.glob(f"*_{row}_*_{band}.TIF"))
            with rasterio.open(path) as src:
                arr = src.read(1)
                rr, cc = rng.integers(0, src.height, 400), rng.integers(0, src.width, 400)
                xs, ys = rasterio.transform.xy(src.transform, rr, cc)
            ix = np.searchsorted(ds.x.values, xs)
            iy = np.searchsorted(-ds.y.values, -np.asarray(ys))
            got = stored.sel(band=band).values[iy, ix]
            exp = arr[rr, cc]
            inside = exp > 0
            assert inside.sum() > 100
            # where both scenes overlap the first (by id) wins; compare on pixels the other does not cover
            if row == "224077":
                np.testing.assert_array_equal(got[inside], exp[inside])
            else:
                assert (got[inside] == exp[inside]).mean() > 0.5
    assert float(ds.valid.mean()) > 0.5


def test_append_and_out_of_order_insert_equal_single_ingest(tmp_path):
    all_days = days(7)
    src_all, a, b, c = (tmp_path / n for n in ("all", "a", "b", "c"))
    for i, d in enumerate(all_days):
        make_scene(src_all, d, i)
        make_scene(a if i < 3 else (b if i in (4, 6) else c), d, i)
    ingest(src_all, tmp_path / "ref", IngestOptions(**OPTS))
    ingest(a, tmp_path / "cube", IngestOptions(**OPTS))  # days 0,1,2
    first = raw(tmp_path / "cube")
    ingest(b, tmp_path / "cube", IngestOptions(**OPTS))  # append days 4,6
    mid = raw(tmp_path / "cube")
    np.testing.assert_array_equal(mid.reflectance.values[:3], first.reflectance.values)
    ingest(c, tmp_path / "cube", IngestOptions(**OPTS))  # insert 3 and 5 between existing dates
    got, ref = raw(tmp_path / "cube"), raw(tmp_path / "ref")
    assert (np.diff(got.time.values) > np.timedelta64(0)).all()
    np.testing.assert_array_equal(got.time.values, ref.time.values)
    np.testing.assert_array_equal(got.reflectance.values, ref.reflectance.values)
    np.testing.assert_array_equal(got.valid.values, ref.valid.values)


def test_rerun_changes_nothing(tmp_path):
    src = tmp_path / "src"
    for i, d in enumerate(days(3)):
        make_scene(src, d, i)
    ingest(src, tmp_path / "cube", IngestOptions(**OPTS))
    before, files = cube_checksum(tmp_path / "cube"), tree_digest(tmp_path / "cube")
    report = ingest(src, tmp_path / "cube", IngestOptions(**OPTS))
    assert not report.changed and len(report.skipped_scenes) == 3
    assert cube_checksum(tmp_path / "cube") == before
    assert tree_digest(tmp_path / "cube") == files


def test_mosaic_same_date_valid_beats_cloud(tmp_path):
    src = tmp_path / "src"
    d = date(2021, 5, 1)
    t0 = Affine(10, 0, 500000, 0, -10, 5400000)
    a = make_scene(src / "a", d, 1, transform=t0, cloud=True)
    b = make_scene(src / "b", d, 2, transform=t0 @ Affine.translation(32, 0), cloud=False)
    # b's files get other names so they are separate scenes of the same date
    for p in (src / "b").iterdir():
        p.rename(src / "b" / p.name.replace("S2T_", "S2U_"))
    ingest(src, tmp_path / "cube", IngestOptions(**OPTS))
    ds = raw(tmp_path / "cube")
    assert ds.sizes["time"] == 1 and ds.sizes["x"] == SIZE + 32
    refl = ds.reflectance.isel(time=0).values
    # cloud in a at rows 10:20, cols 10:30 -> outside b; cols 32..63 of a overlap b's cols 0..31
    np.testing.assert_array_equal(refl[:, 12, 12], a["data"][:, 12, 12])  # only a covers: its cloudy value kept
    assert not ds.valid.isel(time=0).values[12, 12]
    np.testing.assert_array_equal(refl[:, 41, 40], b["data"][:, 41, 8])  # a is shadow there, b valid: b wins
    np.testing.assert_array_equal(refl[:, 30, 40], a["data"][:, 30, 40])  # both valid: first by id (a) wins
    np.testing.assert_array_equal(refl[:, 30, 80], b["data"][:, 30, 48])  # only b


def test_source_in_other_crs_is_reprojected(tmp_path):
    src = tmp_path / "src"
    make_scene(src, date(2021, 3, 1), 0)
    ingest(src, tmp_path / "cube", IngestOptions(**OPTS))
    # the same area in UTM 32N (a neighbouring zone), constant values
    from rasterio.warp import transform as warp_transform

    xs, ys = warp_transform("EPSG:32633", "EPSG:32632", [500000], [5400000])
    other = tmp_path / "other"
    t = Affine(20, 0, xs[0] - 400, 0, -20, ys[0] + 400)
    write_tif(other / "X_20210306.tif", np.full((4, 80, 80), 1234, np.uint16), transform=t, crs="EPSG:32632",
              nodata=0, descriptions=BANDS)
    ingest(other, tmp_path / "cube", IngestOptions(**OPTS))
    ds = raw(tmp_path / "cube")
    assert ds.sizes["time"] == 2
    new = ds.reflectance.isel(time=1).values
    covered = new[0] > 0
    assert covered.mean() > 0.3
    assert (new[:, covered] == 1234).all()  # constant field stays constant through bilinear warping
    assert ds.valid.isel(time=1).values[covered].all()  # no mask band: valid wherever covered


def test_killed_ingest_leaves_previous_cube_and_rerun_completes(tmp_path):
    src1, src2 = tmp_path / "s1", tmp_path / "s2"
    for i, d in enumerate(days(2)):
        make_scene(src1, d, i, size=256)
    for i, d in enumerate(days(30, start=date(2021, 4, 1))):
        make_scene(src2, d, 100 + i, size=256)
    cube = tmp_path / "cube"
    opts = "tile_size=32, time_chunk=2, scheduler='synchronous'"
    ingest(src1, cube, IngestOptions(tile_size=32, time_chunk=2, scheduler="synchronous"))
    committed = cube_checksum(cube)
    code = (f"from geowm.cube import ingest, IngestOptions\n"
            f"ingest({str(src2)!r}, {str(cube)!r}, IngestOptions({opts}))\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    chunks = cube / "chunks"
    n0 = len(list(chunks.iterdir()))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(chunks.iterdir())) < n0 + 20 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be killed; make the batch bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(chunks.iterdir())) > n0  # it had written chunks ...
    assert cube_checksum(cube) == committed  # ... yet the cube is its last committed state
    ingest(src2, cube, IngestOptions(tile_size=32, time_chunk=2, scheduler="synchronous"))
    ref = tmp_path / "ref"
    ingest(src1, ref, IngestOptions(tile_size=32, time_chunk=2, scheduler="synchronous"))
    ingest(src2, ref, IngestOptions(tile_size=32, time_chunk=2, scheduler="synchronous"))
    assert cube_checksum(cube) == cube_checksum(ref)


@pytest.mark.parametrize("scheduler", ["threads"])
def test_dask_threads_equal_synchronous(tmp_path, scheduler):
    src = tmp_path / "src"
    for i, d in enumerate(days(4)):
        make_scene(src, d, i)
    ingest(src, tmp_path / "a", IngestOptions(**OPTS))
    ingest(src, tmp_path / "b", IngestOptions(**{**OPTS, "scheduler": scheduler}))
    assert cube_checksum(tmp_path / "a") == cube_checksum(tmp_path / "b")


def test_ingest_imports_no_torch() -> None:
    """Ingest processes and their dask workers import ``geowm.cube`` only: no torch (~0.2 GB resident each)."""
    code = ("import sys, geowm.cube, geowm.cube.ingest, geowm.sources; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('geowm'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
