"""A sensor unlike the optical ones the model was built around: a Sentinel-1-like radar series (VV and VH
backscatter in dB, float32, NaN nodata, no cloud mask, no red or near-infrared band) goes through ingest, training,
forecasting and anomaly scoring, and a flood (backscatter dropping by 6 dB) is the surprise that stands out."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from conftest import write_tif
from shapely.geometry import box

SIZE = 64
FLOOD = (slice(16, 40), slice(24, 48))
FLOOD_FROM = date(2022, 1, 1)


@pytest.fixture(scope="module")
def radar_cube(tmp_path_factory) -> Path:
    return make_radar_cube(tmp_path_factory.mktemp("radar"))


def make_radar_cube(root: Path, crs: str = "EPSG:32633", transform=None) -> Path:
    """64 radar acquisitions on ``write_tif``'s grid (``crs``, ``transform``; default 10 m in UTM 33N), ingested."""
    from geowm.cube import IngestOptions, ingest

    rng = np.random.default_rng(0)
    base = rng.uniform(-14, -8, (SIZE // 16, SIZE // 16)).repeat(16, 0).repeat(16, 1)
    for k in range(64):  # every 12 days from January 2021 into February 2023
        d = date(2021, 1, 3) + timedelta(days=12 * k)
        vv = base + 1.5 * np.sin(2 * np.pi * d.timetuple().tm_yday / 365.0) + rng.normal(0, 0.7, (SIZE, SIZE))
        vh = vv - 7 + rng.normal(0, 0.7, (SIZE, SIZE))
        if d >= FLOOD_FROM:
            vv[FLOOD] -= 6.0
            vh[FLOOD] -= 6.0
        data = np.stack([vv, vh]).astype(np.float32)
        data[:, :, :2] = np.nan  # the swath's edge
        write_tif(root / "src" / f"S1A_IW_GRDH_1SDV_{d:%Y%m%d}T054512_dB.tif", data, nodata=float("nan"),
                  descriptions=["VV", "VH"], crs=crs, transform=transform)
    ingest(root / "src", root / "cube", IngestOptions(tile_size=32, time_chunk=8, scheduler="synchronous"))
    return root / "cube"


def test_a_float_radar_cube_reads_back_its_nodata_and_values(radar_cube):
    from geowm.api import open_cube
    from geowm.data import CubeReader

    ds = open_cube(radar_cube)
    assert list(ds.band.values) == ["VH", "VV"] and ds.reflectance.encoding["dtype"] == np.float32
    reader = CubeReader(str(radar_cube))  # the trainer's reader: a NaN fill, stored base64-encoded by xarray
    assert np.isnan(reader.fill)
    vals, ok = reader.read([0, 30], slice(0, SIZE), slice(0, SIZE))
    assert np.isnan(vals[:, :, :, :2]).all() and not ok[:, :, :2].any()
    assert ok[:, :, 2:].all() and np.isfinite(vals[:, :, :, 2:]).all()
    np.testing.assert_allclose(vals[1], ds.reflectance.isel(time=30).values, equal_nan=True)


def _train(cube: Path, run: Path) -> None:
    from geowm.data import WindowConfig
    from geowm.train import TrainConfig, train

    train(str(cube), run, TrainConfig(steps=20, batch_size=2, workers=0, train_until="2021-12-31",
                                      window=WindowConfig(frames=4, size=32),
                                      model=dict(dim=48, depth=2, heads=2, pred_dim=24, pred_depth=1, pred_heads=2)))


def test_a_radar_series_is_trained_forecast_and_scored(radar_cube, tmp_path):
    from geowm.anomaly import detect
    from geowm.forecast import forecast
    from geowm.train import evaluate_run

    run = tmp_path / "run"
    _train(radar_cube, run)
    evaluate_run(run, n_windows=4)
    fc = forecast(str(radar_cube), str(run), init="2022-01-02", leads=(12, 24), members=2)
    assert "VV" in fc and "VH" in fc and "embedding" in fc  # decoded backscatter and latents; no NDVI to give
    assert bool(np.isfinite(fc["VV"].sel(quantile=0.5).values[..., 4:]).all())
    scores, alerts = detect(str(radar_cube), str(run), "2022-01-01", history_days=200, seasonal=False)
    onset = scores["time"].values[scores["time"].values >= np.datetime64(FLOOD_FROM)][0]
    surprise = scores["surprise"].sel(time=onset).values  # (py, px): the first acquisition of the flood
    patch = SIZE // surprise.shape[0]
    flooded = np.zeros(surprise.shape, bool)
    flooded[FLOOD[0].start // patch: FLOOD[0].stop // patch, FLOOD[1].start // patch: FLOOD[1].stop // patch] = True
    # the flood's patches are the most surprising (those where it cuts through a field most: an even drop across
    # a whole field is the change a briefly trained encoder sees least) and its alerts are the only ones, from its
    # first acquisition
    assert np.nanmax(surprise[flooded]) > 1.5 * np.nanmax(surprise[~flooded])
    assert len(alerts) >= 1 and (alerts["first_detected"] == pd.Timestamp(onset)).all()
    x0, y0 = 500000 + 10 * FLOOD[1].start, 5400000 - 10 * FLOOD[0].stop  # write_tif's grid, EPSG:32633
    area = gpd.GeoSeries([box(x0, y0, x0 + 10 * 24, y0 + 10 * 24)], crs="EPSG:32633").to_crs(alerts.crs).iloc[0]
    assert alerts.intersects(area).all()


def test_a_cube_in_degrees_raises_alerts_of_their_ground_area(tmp_path):
    """A cube on a geographic grid (EPSG:4326, as Earth Engine exports by default): 0.0001 degree cells at 45 N.
    Alert areas are measured on the ellipsoid; in square degrees every alert fell below the 1 ha minimum."""
    from affine import Affine
    from pyproj import Geod

    from geowm.anomaly import detect

    res, lon0, lat0 = 0.0001, 10.0, 45.0
    cube = make_radar_cube(tmp_path, crs="EPSG:4326", transform=Affine(res, 0, lon0, 0, -res, lat0))
    _train(cube, tmp_path / "run")
    _, alerts = detect(str(cube), str(tmp_path / "run"), "2022-01-01", history_days=200, seasonal=False)
    flood = box(lon0 + res * FLOOD[1].start, lat0 - res * FLOOD[0].stop, lon0 + res * FLOOD[1].stop,
                lat0 - res * FLOOD[0].start)
    flood_ha = abs(Geod(ellps="WGS84").geometry_area_perimeter(flood)[0]) / 1e4  # 24 x 24 cells: 4.54 ha
    assert len(alerts) >= 1 and alerts.intersects(flood).all()
    assert 1.0 <= alerts["area_ha"].sum() <= 1.01 * flood_ha
    for geom, ha in zip(alerts.geometry, alerts["area_ha"], strict=True):
        assert ha == pytest.approx(abs(Geod(ellps="WGS84").geometry_area_perimeter(geom)[0]) / 1e4, rel=1e-3)
