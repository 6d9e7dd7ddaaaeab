"""NetCDF datacubes (an openEO back end's or xarray's ``to_netcdf`` of a time series): one scene per time step,
bands from the variables (or a band dimension), dates from the CF time coordinate, CRS from the grid mapping."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import catalogued_item
from rasterio.crs import CRS

from geowm.cube import IngestError, IngestOptions, cube_checksum, ingest, open_cube
from geowm.netcdf import parse_cf_time_units
from geowm.sources import SourceError, discover

OPTS = dict(tile_size=32, time_chunk=2, scheduler="synchronous")
H, W = 24, 40
TIMES = pd.to_datetime(["2023-01-05T10:20:00", "2023-01-10T10:20:00", "2023-01-20T10:30:00"])
BANDS = ("B02", "B03", "B04", "B08")


def _grid_mapping(epsg: int = 32633) -> xr.DataArray:
    wkt = CRS.from_epsg(epsg).to_wkt()
    return xr.DataArray(0, attrs={"crs_wkt": wkt, "spatial_ref": wkt, "grid_mapping_name": "transverse_mercator"})


def openeo_cube(path, rho: np.ndarray, scl: np.ndarray, *, time_units: str = "days since 1990-01-01",
                calendar: str = "standard") -> None:
    """As openEO's NetCDF output: a variable per band (t, y, x), int16 reflectance with CF scale_factor and
    _FillValue, SCL, x/y in metres and a grid-mapping variable."""
    x = 500000 + 10 * np.arange(W) + 5
    y = 5400000 - 10 * np.arange(H) - 5
    ds = xr.Dataset({b: (("t", "y", "x"), rho[:, i]) for i, b in enumerate(BANDS)}, coords={"t": TIMES, "y": y, "x": x})
    ds["SCL"] = (("t", "y", "x"), scl.astype(np.int16))
    ds["crs"] = _grid_mapping()
    for v in (*BANDS, "SCL"):
        ds[v].attrs["grid_mapping"] = "crs"
    ds.x.attrs.update(standard_name="projection_x_coordinate", units="m")
    ds.y.attrs.update(standard_name="projection_y_coordinate", units="m")
    enc = {b: {"dtype": "int16", "scale_factor": 1e-4, "_FillValue": -9999} for b in BANDS}
    enc["t"] = {"units": time_units, "calendar": calendar, "dtype": "float64"}
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path, engine="scipy", encoding=enc)


def _data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rho = np.round(rng.uniform(0.02, 0.5, (len(TIMES), len(BANDS), H, W)), 4)
    rho[1, :, :3, :] = np.nan  # the swath's edge on the second date
    scl = np.full((len(TIMES), H, W), 4)
    scl[0, 5:12, 10:30] = 9  # cloud
    scl[2, :, 35:] = 3  # shadow
    return rho, scl


def test_an_openeo_netcdf_cube_is_a_scene_per_time_step(tmp_path):
    rho, scl = _data(1)
    openeo_cube(tmp_path / "src" / "openeo_result.nc", rho, scl)
    scenes = discover(tmp_path / "src")
    assert [s.id for s in scenes] == [f"openeo_result_{t:%Y%m%dT%H%M%S}" for t in TIMES]
    assert [s.datetime for s in scenes] == [t.to_pydatetime().replace(tzinfo=UTC) for t in TIMES]
    assert list(scenes[0].bands) == list(BANDS) and scenes[0].mask.name == "SCL"
    assert scenes[0].common_names == {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir"}  # Sentinel-2
    assert scenes[1].bands["B04"].path == f'NETCDF:"{(tmp_path / "src" / "openeo_result.nc").resolve()}":B04'

    ingest(tmp_path / "src", tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    assert ds.sizes == {"time": 3, "band": 4, "y": H, "x": W} and ds.rio.crs.to_epsg() == 32633
    assert ds.reflectance.encoding["dtype"] == np.int16  # as the file stores them, at its scale
    np.testing.assert_allclose(ds.reflectance.values, rho, atol=1e-6)  # the edge (NaN) read back as fill
    covered = ~np.isnan(rho).any(axis=1)
    np.testing.assert_array_equal(ds.valid.values, covered & np.isin(scl, [4, 5, 6, 7]))

    # the catalog names the file and the variable of each band; a re-run ingests nothing
    item = catalogued_item(tmp_path, scenes[0].id)
    assert {k: (a["type"], a["geowm:variable"]) for k, a in item["assets"].items()} == {
        v: ("application/netcdf", v) for v in (*BANDS, "SCL")}
    before = cube_checksum(tmp_path / "cube")
    report = ingest(tmp_path / "src", tmp_path / "cube", IngestOptions(**OPTS))
    assert not report.changed and len(report.skipped_scenes) == 3 and cube_checksum(tmp_path / "cube") == before


def test_a_band_dimension_is_named_by_band_names_and_lat_lon_is_geographic(tmp_path):
    """``reflectance(time, band, lat, lon)`` as xarray writes a DataArray: bands band1..bandN in the order of the
    band dimension, named with --band-names; lat/lon coordinates make an EPSG:4326 grid."""
    rho, _ = _data(2)
    lat = 45.0 - 0.0001 * (np.arange(H) + 0.5)
    lon = 10.0 + 0.0001 * (np.arange(W) + 0.5)
    da = xr.DataArray(np.nan_to_num(rho, nan=0.1).astype(np.float32), dims=("time", "band", "lat", "lon"),
                      coords={"time": TIMES, "band": np.arange(4), "lat": lat, "lon": lon}, name="reflectance")
    da.lat.attrs.update(standard_name="latitude", units="degrees_north")
    da.lon.attrs.update(standard_name="longitude", units="degrees_east")
    da.to_dataset().to_netcdf(tmp_path / "stack.nc", engine="scipy",
                              encoding={"time": {"units": "seconds since 1970-01-01 00:00:00", "dtype": "float64"}})
    (first, *_) = discover(tmp_path / "stack.nc")
    assert list(first.bands) == ["band1", "band2", "band3", "band4"] and not first.common_names
    ingest(tmp_path / "stack.nc", tmp_path / "cube", IngestOptions(**OPTS, band_names=["blue", "green", "red", "nir"]))
    ds = open_cube(tmp_path / "cube")
    assert ds.rio.crs.to_epsg() == 4326 and list(ds.band.values) == ["blue", "green", "nir", "red"]
    np.testing.assert_allclose(ds.reflectance.sel(band="nir").values, np.nan_to_num(rho, nan=0.1)[:, 3], atol=1e-6)
    np.testing.assert_allclose(ds.y.values, lat, atol=1e-9)


@pytest.mark.parametrize("units, calendar, problem", [
    ("days since 1990-01-01", "360_day", "time calendar '360_day' is not supported"),
    ("fortnights since 1990-01-01", "standard", "time units 'fortnights since 1990-01-01' are not"),
])
def test_netcdf_time_it_cannot_read_is_refused_naming_the_file(tmp_path, units, calendar, problem):
    rho, scl = _data(3)
    openeo_cube(tmp_path / "ok" / "a.nc", rho, scl)
    ingest(tmp_path / "ok", tmp_path / "cube", IngestOptions(**OPTS))
    before = cube_checksum(tmp_path / "cube")
    path = tmp_path / "bad" / "b.nc"
    openeo_cube(path, rho, scl)
    ds = xr.open_dataset(path, engine="scipy", decode_times=False).load()
    ds["t"].attrs.update(units=units, calendar=calendar)
    ds.to_netcdf(tmp_path / "bad" / "c.nc", engine="scipy")
    path.unlink()
    with pytest.raises(SourceError, match=f"c.nc .*: {problem}"):
        ingest(tmp_path / "bad", tmp_path / "cube", IngestOptions(**OPTS))
    (tmp_path / "bad" / "c.nc").write_bytes((tmp_path / "ok" / "a.nc").read_bytes()[:500])  # truncated
    with pytest.raises((SourceError, IngestError), match="c.nc"):
        ingest(tmp_path / "bad", tmp_path / "cube", IngestOptions(**OPTS))
    assert cube_checksum(tmp_path / "cube") == before


def test_cf_time_units():
    assert parse_cf_time_units("days since 1990-01-01", "", "f") == (86400.0, datetime(1990, 1, 1, tzinfo=UTC))
    assert parse_cf_time_units("minutes since 2023-01-05 00:00:00", "proleptic_gregorian", "f") == \
        (60.0, datetime(2023, 1, 5, tzinfo=UTC))
    assert parse_cf_time_units("seconds since 1970-01-01T00:00:00Z", "gregorian", "f")[1] == \
        datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_cf_time_units("hours since 2000-1-1 6:0:0", "standard", "f") == \
        (3600.0, datetime(2000, 1, 1, 6, tzinfo=UTC))
    assert parse_cf_time_units("milliseconds since 2023-01-05 10:20:31.024000", "proleptic_gregorian", "f") == \
        (1e-3, datetime(2023, 1, 5, 10, 20, 31, 24000, tzinfo=UTC))  # as xarray writes stackstac's times
    assert parse_cf_time_units("nanoseconds since 2023-01-05", "", "f")[0] == 1e-9
    with pytest.raises(SourceError, match="f: time units 'days after 1990-01-01'"):
        parse_cf_time_units("days after 1990-01-01", "", "f")
    with pytest.raises(SourceError, match="month must be in 1..12"):
        parse_cf_time_units("days since 1990-13-01", "", "f")
