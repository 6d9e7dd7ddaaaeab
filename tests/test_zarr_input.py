"""Zarr datacubes (xarray's ``to_zarr``, stackstac / odc-stac exports) as sources, Zarr format 2 and 3: one scene
per time step, bands from the variables or a band dimension, dates from the CF time coordinate, CRS from the grid
mapping, read with zarr-python (GDAL 3.10 does not read format 3)."""

from __future__ import annotations

import shutil
from datetime import UTC

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import catalogued_item
from rasterio.crs import CRS

from geowm.cube import IngestError, IngestOptions, cube_checksum, ingest, open_cube
from geowm.cube.reader import ReadError
from geowm.sources import SourceError, discover
from geowm.zarrcube import ZarrRaster

OPTS = dict(tile_size=32, time_chunk=2, scheduler="synchronous")
H, W = 24, 40
TIMES = pd.to_datetime(["2023-01-05T10:20:00", "2023-01-10T10:20:00", "2023-01-20T10:30:00"])
BANDS = ("B02", "B03", "B04", "B08")


def _data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rho = np.round(rng.uniform(0.02, 0.5, (len(TIMES), len(BANDS), H, W)), 4)
    rho[1, :, :3, :] = np.nan  # the swath's edge on the second date
    scl = np.full((len(TIMES), H, W), 4)
    scl[0, 5:12, 10:30] = 9  # cloud
    scl[2, :, 35:] = 3  # shadow
    return rho, scl


def band_per_variable(path, rho: np.ndarray, scl: np.ndarray, zarr_format: int, *, chunks: int = 16,
                      times: pd.DatetimeIndex = TIMES, shards: tuple[int, int, int] | None = None) -> None:
    """As xarray writes a Dataset of one variable per band (``time, y, x``): int16 reflectance with CF scale_factor,
    add_offset and _FillValue, SCL, x/y pixel centres in metres and rioxarray's ``spatial_ref`` grid mapping."""
    x = 500000 + 10 * np.arange(W) + 5
    y = 5400000 - 10 * np.arange(H) - 5
    ds = xr.Dataset({b: (("time", "y", "x"), rho[:, i]) for i, b in enumerate(BANDS)},
                    coords={"time": times, "y": y, "x": x})
    ds["SCL"] = (("time", "y", "x"), scl.astype(np.uint8))
    wkt = CRS.from_epsg(32633).to_wkt()
    ds.coords["spatial_ref"] = xr.DataArray(0, attrs={"crs_wkt": wkt, "spatial_ref": wkt})
    for v in (*BANDS, "SCL"):
        ds[v].attrs["grid_mapping"] = "spatial_ref"
    enc = {b: {"dtype": "int16", "scale_factor": 1e-4, "add_offset": -0.1, "_FillValue": -9999,
               "chunks": (1, chunks, chunks), **({"shards": shards} if shards else {})} for b in BANDS}
    ds.to_zarr(path, mode="w", zarr_format=zarr_format, encoding=enc, consolidated=False)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_zarr_datacube_is_a_scene_per_time_step(tmp_path, zarr_format):
    rho, scl = _data(1)
    store = tmp_path / "src" / "s2_series.zarr"
    band_per_variable(store, rho, scl, zarr_format)
    scenes = discover(tmp_path / "src")  # a folder holding the store, and the store itself, alike
    assert [s.id for s in scenes] == [s.id for s in discover(store)] == [
        f"s2_series_{t:%Y%m%dT%H%M%S}" for t in TIMES]
    assert [s.datetime for s in scenes] == [t.to_pydatetime().replace(tzinfo=UTC) for t in TIMES]
    assert list(scenes[0].bands) == list(BANDS) and scenes[0].mask.name == "SCL"
    assert scenes[0].common_names == {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir"}
    assert scenes[1].bands["B04"].path == f'ZARR:"{store.resolve()}":/B04' and scenes[1].bands["B04"].index == 2

    ingest(tmp_path / "src", tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    assert ds.sizes == {"time": 3, "band": 4, "y": H, "x": W} and ds.rio.crs.to_epsg() == 32633
    assert ds.reflectance.encoding["dtype"] == np.int16  # as the store holds them, at its scale and offset
    np.testing.assert_allclose(ds.reflectance.values, rho, atol=1e-6)  # the edge (fill) read back as fill
    np.testing.assert_allclose(ds.x.values[[0, -1]], [500005, 500395])
    assert ds.y.values[0] == 5399995
    covered = ~np.isnan(rho).any(axis=1)
    np.testing.assert_array_equal(ds.valid.values, covered & np.isin(scl, [4, 5, 6, 7]))

    # the catalog names the store and the variable of each band; a re-run ingests nothing
    item = catalogued_item(tmp_path, scenes[0].id)
    assert {k: (a["type"], a["geowm:variable"]) for k, a in item["assets"].items()} == {
        v: ("application/vnd+zarr", v) for v in (*BANDS, "SCL")}
    assert item["properties"]["proj:code"] == "EPSG:32633"
    before = cube_checksum(tmp_path / "cube")
    report = ingest(tmp_path / "src", tmp_path / "cube", IngestOptions(**OPTS))
    assert not report.changed and len(report.skipped_scenes) == 3 and cube_checksum(tmp_path / "cube") == before

    # a store re-delivered with other values is a changed source: refused naming it, then read again with replace
    rho2 = rho.copy()
    rho2[2, 2] += 0.01
    band_per_variable(store, rho2, scl, zarr_format)
    with pytest.raises(IngestError, match=r"s2_series\.zarr.*already in the cube with other content"):
        ingest(tmp_path / "src", tmp_path / "cube", IngestOptions(**OPTS))
    assert cube_checksum(tmp_path / "cube") == before
    report = ingest(tmp_path / "src", tmp_path / "cube", IngestOptions(**OPTS, replace=True))
    assert report.changed
    np.testing.assert_allclose(open_cube(tmp_path / "cube").reflectance.values, rho2, atol=1e-6)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_store_grown_by_appending_dates_adds_them(tmp_path, zarr_format):
    """``to_zarr(append_dim="time")``, the way a Zarr series grows: the next ingest adds the new date and skips the
    dates already in the cube (each scene is fingerprinted by its own time step's values, not by the store)."""
    rho, scl = _data(5)
    store = tmp_path / "series.zarr"
    band_per_variable(store, rho[:2], scl[:2], zarr_format, times=TIMES[:2])
    assert ingest(store, tmp_path / "cube", IngestOptions(**OPTS)).added_times
    band_per_variable(tmp_path / "next.zarr", rho[2:], scl[2:], zarr_format, times=TIMES[2:])
    nxt = xr.open_zarr(tmp_path / "next.zarr", consolidated=False)
    for v in nxt.variables.values():
        v.encoding = {}  # the store's encoding applies
    nxt.to_zarr(store, append_dim="time", consolidated=False)
    report = ingest(store, tmp_path / "cube", IngestOptions(**OPTS))
    assert len(report.added_times) == 1 and len(report.skipped_scenes) == 2
    np.testing.assert_allclose(open_cube(tmp_path / "cube").reflectance.values, rho, atol=1e-6)


@pytest.mark.parametrize("layout", ["v2", "v3", "v3-sharded"])
def test_dates_already_ingested_are_checked_without_reading_their_values(tmp_path, monkeypatch, layout):
    """A re-ingest of a store compares the size and time of the chunk (or shard) files of each date it holds, as a
    file's size and mtime are compared: unchanged dates are not read again; a date rewritten in place is read,
    and refused as other content; a date appended is read alone."""
    rho, scl = _data(6)
    store = tmp_path / "series.zarr"
    fmt = 2 if layout == "v2" else 3
    shards = (2, 24, 40) if layout == "v3-sharded" else None
    band_per_variable(store, rho[:2], scl[:2], fmt, chunks=8, times=TIMES[:2], shards=shards)
    ingest(store, tmp_path / "cube", IngestOptions(**OPTS))
    reads: list[tuple[str, int]] = []
    real = ZarrRaster.read

    def counted(self, index, window=None):
        reads.append((self.name, index))
        return real(self, index, window)

    monkeypatch.setattr(ZarrRaster, "read", counted)
    report = ingest(store, tmp_path / "cube", IngestOptions(**OPTS))
    assert not report.changed and len(report.skipped_scenes) == 2 and reads == []
    # a date appended: only its values are read (its fingerprint and pixels); sharded, it starts a new shard
    band_per_variable(tmp_path / "next.zarr", rho[2:], scl[2:], fmt, chunks=8, times=TIMES[2:], shards=shards)
    nxt = xr.open_zarr(tmp_path / "next.zarr", consolidated=False).load()  # in memory: a shard takes it whole
    for v in nxt.variables.values():
        v.encoding = {}
    nxt.to_zarr(store, append_dim="time", consolidated=False)
    report = ingest(store, tmp_path / "cube", IngestOptions(**OPTS))
    assert len(report.added_times) == 1 and len(report.skipped_scenes) == 2
    assert {i for _, i in reads} == {3}  # 1-based time steps: the third
    # a date rewritten in place with other values: its chunks changed, it is read and refused
    reads.clear()
    import zarr

    g = zarr.open_group(store, mode="r+")
    g["B04"][0, 16:, 32:] = g["B04"][0, 16:, 32:] + 1  # the last chunk: sharded, inside shard 0's one object
    with pytest.raises(IngestError, match="already in the cube with other content"):
        ingest(store, tmp_path / "cube", IngestOptions(**OPTS))
    assert {i for _, i in reads} == {1}  # the date rewritten is read (and refused first); not the others


def test_the_dry_run_names_the_store(tmp_path):
    from typer.testing import CliRunner

    from geowm.cli import app

    rho, scl = _data(7)
    band_per_variable(tmp_path / "series.zarr", rho, scl, 3)
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "series.zarr"), "--cube", str(tmp_path / "cube"),
                                   "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "series_20230105T102000  2023-01-05T10:20:00  (5 variables of series.zarr)" in res.output
    assert not (tmp_path / "cube").exists()


def test_a_band_dimension_of_names_south_up_lat_lon(tmp_path, tif):
    """``(time, band, lat, lon)`` as stackstac and odc-stac load it, with the band coordinate naming the bands
    (``red``, ``nir``...) and latitude stored south to north: named bands, an EPSG:4326 grid, rows north-up."""
    rho, _ = _data(2)
    rho = np.nan_to_num(rho, nan=0.1).astype(np.float32)
    lat = 45.0 - 0.0001 * H + 0.0001 * (np.arange(H) + 0.5)  # ascending: the first row is the southernmost
    lon = 10.0 + 0.0001 * (np.arange(W) + 0.5)
    da = xr.DataArray(rho[:, :, ::-1], dims=("time", "band", "latitude", "longitude"),
                      coords={"time": TIMES, "band": ["blue", "green", "red", "nir"], "latitude": lat,
                              "longitude": lon}, name="stackstac")
    da.to_dataset().to_zarr(tmp_path / "stack.zarr", mode="w", consolidated=True)  # Zarr 3, consolidated
    (first, *_) = discover(tmp_path / "stack.zarr")
    assert list(first.bands) == ["blue", "green", "nir", "red"]
    assert first.common_names == {"blue": "blue", "green": "green", "red": "red", "nir": "nir"}
    src = ZarrRaster(first.bands["nir"].path)
    assert src.count == 12 and src.crs.to_epsg() == 4326 and src.transform.e < 0
    ingest(tmp_path / "stack.zarr", tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    assert ds.rio.crs.to_epsg() == 4326 and list(ds.band.values) == ["blue", "green", "nir", "red"]
    np.testing.assert_allclose(ds.reflectance.sel(band="nir").values, rho[:, 3], atol=1e-6)
    np.testing.assert_allclose(ds.y.values, lat[::-1], atol=1e-9)

    # warped onto a UTM cube, as the same pixels in GeoTIFFs are (each tile reads the window it needs)
    from affine import Affine
    for t, when in enumerate(TIMES):
        tif(tmp_path / "tifs" / f"stack_{when:%Y%m%dT%H%M%S}.tif", rho[t], crs="EPSG:4326",
                  transform=Affine(0.0001, 0, 10.0, 0, -0.0001, 45.0), descriptions=["blue", "green", "red", "nir"])
    utm = dict(OPTS, crs="EPSG:32632", resolution=5.0)
    ingest(tmp_path / "stack.zarr", tmp_path / "utm_zarr", IngestOptions(**utm))
    ingest(tmp_path / "tifs", tmp_path / "utm_tif", IngestOptions(**utm))
    a, b = open_cube(tmp_path / "utm_zarr"), open_cube(tmp_path / "utm_tif")
    assert a.sizes == b.sizes and a.sizes["x"] > W and a.rio.crs.to_epsg() == 32632
    np.testing.assert_array_equal(a.valid.values, b.valid.values)
    assert a.valid.values.mean() > 0.5
    np.testing.assert_allclose(a.reflectance.values, b.reflectance.values, atol=1e-6, equal_nan=True)


def _refuse(tmp_path, make_bad, match: str) -> None:
    rho, scl = _data(3)
    band_per_variable(tmp_path / "ok" / "a.zarr", rho, scl, 3)
    ingest(tmp_path / "ok", tmp_path / "cube", IngestOptions(**OPTS))
    before = cube_checksum(tmp_path / "cube")
    bad = tmp_path / "bad" / "b.zarr"  # later dates: a new part of the series
    band_per_variable(bad, rho, scl, 3, times=TIMES + pd.Timedelta(days=60))
    make_bad(bad)
    with pytest.raises((SourceError, IngestError, ReadError), match=match):  # the CLI: one line, exit 2
        ingest(tmp_path / "bad", tmp_path / "cube", IngestOptions(**OPTS))
    assert cube_checksum(tmp_path / "cube") == before


def _rewrite(store, change) -> None:
    ds = xr.open_zarr(store, decode_times=False, mask_and_scale=False, consolidated=False).load()
    shutil.rmtree(store)
    change(ds).to_zarr(store, mode="w", consolidated=False)


@pytest.mark.parametrize("case, match", [
    ("irregular x", r"b\.zarr \(B02\): coordinate 'x' is not evenly spaced"),
    ("east to west", r"b\.zarr \(B02\): coordinate 'x' decreases"),
    ("no crs", r"b\.zarr.*B02.*has no CRS"),
    ("duplicate dates", r"b\.zarr \(B02\): duplicate time values"),
    ("corrupt chunk", r"b\.zarr.*B03.*failed while reading pixels"),
    ("not a store", r"b\.zarr: not a readable Zarr store"),
    ("360-day calendar", r"b\.zarr \(B02\): time calendar '360_day' is not supported"),
])
def test_zarr_input_it_cannot_read_is_refused_naming_the_store(tmp_path, case, match):
    def make_bad(store):
        if case == "irregular x":
            _rewrite(store, lambda ds: ds.assign_coords(x=ds.x.values + np.r_[0, np.zeros(W - 2), 3.0]))
        elif case == "east to west":
            _rewrite(store, lambda ds: ds.isel(x=slice(None, None, -1)))
        elif case == "no crs":
            def no_crs(ds):
                ds = ds.drop_vars("spatial_ref")
                for v in (*BANDS, "SCL"):
                    ds[v].attrs.pop("grid_mapping", None)
                return ds
            _rewrite(store, no_crs)
        elif case == "duplicate dates":
            _rewrite(store, lambda ds: ds.assign_coords(time=ds.time.copy(data=ds.time.values[[0, 1, 1]])))
        elif case == "corrupt chunk":
            chunk = next(p for p in sorted((store / "B03").rglob("*")) if p.is_file() and p.name != "zarr.json")
            chunk.write_bytes(chunk.read_bytes()[:7])
        elif case == "not a store":
            (store / "zarr.json").write_text("{ not json")
        else:
            _rewrite(store, lambda ds: ds.assign(time=ds.time.assign_attrs(calendar="360_day")))
    _refuse(tmp_path, make_bad, match)


def test_a_watched_folder_holding_a_zarr_datacube_has_its_scenes(prefect_api, tmp_path):
    """The scheduled pipeline's discovery sees a Zarr store in the watched folder (a folder, not a file, so before
    it was 'no scenes yet'), and an empty watched folder still has none."""
    from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

    from flows.tasks import discover_scenes

    watched = tmp_path / "watched"
    watched.mkdir()
    with temporary_settings(updates={PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
        assert discover_scenes(str(watched)) == []
        rho, scl = _data(4)
        band_per_variable(watched / "delivery" / "series.zarr", rho, scl, 3)
        scenes = discover_scenes(str(watched))
    assert [s["id"] for s in scenes] == [f"series_{t:%Y%m%dT%H%M%S}" for t in TIMES]


def test_a_stackstac_float64_stack_with_its_scl_band_is_a_float32_cube(tmp_path):
    """stackstac's default: one float64 array (time, band, y, x), NaN outside the footprint, SCL among the bands of
    the band coordinate, times to the millisecond. SCL is taken as the mask; the new cube stores float32 (half the
    bytes; reflectance needs no more digits), and a later float64 delivery appends to it."""
    rng = np.random.default_rng(6)
    rho = rng.uniform(0.02, 0.5, (len(TIMES), 4, H, W))
    scl = np.full((len(TIMES), 1, H, W), 4.0)
    scl[0, 0, :10] = 9.0  # cloud
    data = np.concatenate([rho, scl], axis=1)
    data[1, :, :, :5] = np.nan  # outside the footprint
    times = TIMES + pd.to_timedelta([24, 500, 0], unit="ms")
    wkt = CRS.from_epsg(32633).to_wkt()

    def save(path, t):
        da = xr.DataArray(data[t], dims=("time", "band", "y", "x"), name="stackstac-3f2a9c", coords={
            "time": times[t], "band": [*BANDS, "SCL"], "y": 5400000 - 10 * np.arange(H) - 5.0,
            "x": 500000 + 10 * np.arange(W) + 5.0, "spatial_ref": xr.DataArray(0, attrs={"crs_wkt": wkt})})
        da.to_dataset().to_zarr(path, mode="w", consolidated=False)

    save(tmp_path / "first.zarr", slice(0, 2))
    scenes = discover(tmp_path / "first.zarr")
    assert scenes[0].mask.name == "SCL" and list(scenes[0].bands) == list(BANDS)
    assert scenes[0].datetime == times[0].to_pydatetime().replace(tzinfo=UTC)  # to the millisecond
    ingest(tmp_path / "first.zarr", tmp_path / "cube", IngestOptions(**OPTS))
    save(tmp_path / "second.zarr", slice(2, 3))
    ingest(tmp_path / "second.zarr", tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    assert ds.reflectance.dtype == np.float32 and ds.sizes["time"] == 3
    np.testing.assert_allclose(ds.reflectance.values, rho.astype(np.float32) * np.where(
        np.isnan(data[:, :4]), np.nan, 1), rtol=1e-7)
    np.testing.assert_allclose(ds.valid.values.mean(axis=(1, 2)), [(H - 10) / H, (W - 5) / W, 1.0])
