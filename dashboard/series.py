"""Drill-down data: a footprint (an alert or a tile) on the cube grid, and its series through time.

Observed NDVI (clear observations only), forecast NDVI p10/p50/p90 of every init, the anomaly score of
the patches under the footprint, and before/after image chips. NDVI unitless, scores robust z,
reflectance 0..1; every read is limited to the window around the footprint.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import geopandas as gpd
import numpy as np
import pandas as pd
import xarray as xr
from affine import Affine
from rasterio import features

from dashboard.data import (
    CHIP_CLEAR_MIN,
    CHIP_MIN_PX,
    SERIES_CLEAR_MIN,
    CubeInfo,
    Grid,
    WorkdirError,
    grid_of,
)
from geowm.bands import common_names_of, ndvi_bands, rgb_bands


@dataclass(frozen=True)
class Region:
    """A footprint on the cube grid: ``mask`` (h, w) over the cube window ``rows`` x ``cols``."""

    label: str
    rows: slice
    cols: slice
    mask: np.ndarray
    first_detected: np.datetime64 | None = None
    last_seen: np.datetime64 | None = None


def alert_region(grid: Grid, alert: pd.Series, min_px: int = CHIP_MIN_PX) -> Region:
    """The alert's footprint rasterised on the cube grid, in a window padded by half its size (>= min_px)."""
    geom = gpd.GeoSeries([alert.geometry], crs=4326).to_crs(grid.crs).iloc[0]
    rows, cols = grid.window(geom.bounds)
    size = max(rows.stop - rows.start, cols.stop - cols.start, 1)
    rows, cols = grid.window(geom.bounds, pad=max(size / 2, (min_px - size) / 2))
    t = grid.transform @ Affine.translation(cols.start, rows.start)
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    mask = features.geometry_mask([geom], shape, t, invert=True)
    if not mask.any():  # thinner than a pixel
        mask = features.geometry_mask([geom], shape, t, invert=True, all_touched=True)
    return Region(str(alert["id"]), rows, cols, mask, np.datetime64(alert["first_detected"], "ns"),
                  np.datetime64(alert["last_seen"], "ns"))


def tile_region(info: CubeInfo, name: str) -> Region:
    """The whole tile ``row_col`` of the cube's tile grid."""
    r, c = (int(v) for v in name.split("_"))
    ts = info.tile_size
    rows = slice(r * ts, min((r + 1) * ts, len(info.grid.y)))
    cols = slice(c * ts, min((c + 1) * ts, len(info.grid.x)))
    if rows.start >= rows.stop or cols.start >= cols.stop:
        raise WorkdirError(f"tile {name} is outside the cube")
    return Region(f"tile {name}", rows, cols, np.ones((rows.stop - rows.start, cols.stop - cols.start), bool))


def observed_ndvi(cube: xr.Dataset, region: Region, min_clear: float = SERIES_CLEAR_MIN) -> pd.DataFrame:
    """Mean NDVI of the footprint's valid pixels per acquisition, for every cube date.

    Columns: ``time``, ``ndvi`` (NaN when less than ``min_clear`` of the footprint is valid: clear
    observations only), ``clear_fraction`` (valid share of the footprint), ``window_clear_fraction``
    (valid share of the whole window, used to pick chips).
    """
    rn = ndvi_bands([str(b) for b in cube["band"].values], common_names_of(cube))
    sub = cube.isel(y=region.rows, x=region.cols)
    times = sub["time"].values.astype("datetime64[ns]")
    ok = sub["valid"]
    m = xr.DataArray(region.mask, dims=("y", "x"), coords={"y": sub["y"], "x": sub["x"]})
    if rn is None:
        win = ok.mean(("y", "x")).values
        return pd.DataFrame({"time": times, "ndvi": np.nan, "clear_fraction": np.nan, "window_clear_fraction": win})
    red, nir = (sub["reflectance"].isel(band=i).astype("float32") for i in rn)
    ok = ok & np.isfinite(red) & np.isfinite(nir) & (nir + red > 1e-6)
    nd = ((nir - red) / (nir + red)).where(ok & m)
    n_ok, nd_sum, win = dask.compute((ok & m).sum(("y", "x")), nd.sum(("y", "x")), ok.mean(("y", "x")))
    n_ok, nd_sum = np.asarray(n_ok, float), np.asarray(nd_sum, float)
    frac = n_ok / max(int(region.mask.sum()), 1)
    mean = np.where((frac >= min_clear) & (n_ok > 0), nd_sum / np.maximum(n_ok, 1), np.nan)
    return pd.DataFrame({"time": times, "ndvi": mean, "clear_fraction": frac,
                         "window_clear_fraction": np.asarray(win, float)})


def _on(grid: Grid, cube_grid: Grid, region: Region) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows and columns of ``grid`` (same CRS, cells of any size) under the footprint, and the mask there:
    a cell is in the footprint when a footprint pixel's centre falls in it."""
    if len(grid.y) < 2 or len(grid.x) < 2:
        return np.zeros(0, int), np.zeros(0, int), np.zeros((0, 0), bool)
    t = grid.transform
    fr = np.floor((cube_grid.y[region.rows] - t.f) / t.e).astype(int)
    fc = np.floor((cube_grid.x[region.cols] - t.c) / t.a).astype(int)
    ri, ci = np.nonzero(region.mask)
    r, c = fr[ri], fc[ci]
    inside = (r >= 0) & (r < len(grid.y)) & (c >= 0) & (c < len(grid.x))
    r, c = r[inside], c[inside]
    rows, cols = np.unique(r), np.unique(c)
    mask = np.zeros((rows.size, cols.size), bool)
    mask[np.searchsorted(rows, r), np.searchsorted(cols, c)] = True
    return rows, cols, mask


def forecast_ndvi(forecasts: xr.Dataset, cube_grid: Grid, region: Region) -> pd.DataFrame:
    """Footprint-mean forecast NDVI per init and lead: columns ``init_time``, ``lead_days``,
    ``valid_time``, ``p10``, ``p50``, ``p90`` (means over the footprint of each pixel's quantile)."""
    cols_out = ["init_time", "lead_days", "valid_time", "p10", "p50", "p90"]
    if "ndvi" not in forecasts:
        return pd.DataFrame(columns=cols_out)
    rows, cols, mask = _on(grid_of(forecasts), cube_grid, region)
    if not mask.any():
        return pd.DataFrame(columns=cols_out)
    sub = forecasts["ndvi"].isel(y=slice(rows[0], rows[-1] + 1), x=slice(cols[0], cols[-1] + 1))
    sub = sub.isel(y=rows - rows[0], x=cols - cols[0])
    qs = {name: float(sub["quantile"].sel(quantile=q, method="nearest")) for name, q in
          (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))}
    vals = np.asarray(sub.transpose("init_time", "lead_time", "quantile", "y", "x").values, float)[..., mask]
    with np.errstate(all="ignore"):
        mean = np.where(np.isfinite(vals).any(-1), np.nansum(vals, -1) / np.maximum(np.isfinite(vals).sum(-1), 1),
                        np.nan)  # (init, lead, quantile)
    qidx = {k: int(np.flatnonzero(sub["quantile"].values == v)[0]) for k, v in qs.items()}
    inits, leads = sub["init_time"].values, sub["lead_time"].values
    vt = forecasts["valid_time"].values
    recs = [{"init_time": inits[i], "lead_days": leads[k] / np.timedelta64(1, "D"), "valid_time": vt[i, k],
             **{name: mean[i, k, q] for name, q in qidx.items()}}
            for i in range(len(inits)) for k in range(len(leads))]
    return pd.DataFrame.from_records(recs, columns=cols_out)


def score_series(scores: xr.Dataset, cube_grid: Grid, region: Region) -> pd.DataFrame:
    """Anomaly score of the patches under the footprint per scored date: ``time``, ``score_max``,
    ``score_mean`` (robust z; NaN where no patch was clear), ``n_patches`` (clear patches)."""
    rows, cols, mask = _on(grid_of(scores), cube_grid, region)
    times = scores["time"].values.astype("datetime64[ns]")
    if not mask.any() or times.size == 0:
        return pd.DataFrame({"time": times, "score_max": np.nan, "score_mean": np.nan, "n_patches": 0})
    sub = scores["score"].isel(y=slice(rows[0], rows[-1] + 1), x=slice(cols[0], cols[-1] + 1))
    vals = np.asarray(sub.isel(y=rows - rows[0], x=cols - cols[0]).transpose("time", "y", "x").values,
                      float)[:, mask]
    n = np.isfinite(vals).sum(axis=1)
    with np.errstate(all="ignore"):
        vmax = np.where(n > 0, np.nanmax(np.where(np.isfinite(vals), vals, -np.inf), axis=1), np.nan)
        vmean = np.where(n > 0, np.nansum(vals, axis=1) / np.maximum(n, 1), np.nan)
    return pd.DataFrame({"time": times, "score_max": vmax, "score_mean": vmean, "n_patches": n})


def chip_dates(observed: pd.DataFrame, first: np.datetime64, last: np.datetime64,
               min_clear: float = CHIP_CLEAR_MIN) -> tuple[np.datetime64 | None, np.datetime64 | None]:
    """Before: the latest acquisition before ``first`` with a clear window. After: the clearest one in
    [first, last], else the first clear one after ``first``. (None where there is none.)"""
    t = observed["time"].to_numpy().astype("datetime64[ns]")
    c = observed["window_clear_fraction"].to_numpy()
    first, last = np.datetime64(first, "ns"), np.datetime64(last, "ns")
    before = np.flatnonzero((t < first) & (c >= min_clear))
    during = np.flatnonzero((t >= first) & (t <= last) & (c >= min_clear))
    later = np.flatnonzero((t >= first) & (c >= min_clear))
    after = during[np.argmax(c[during])] if during.size else later[0] if later.size else None
    return (t[before[-1]] if before.size else None), (t[after] if after is not None else None)


def chip(cube: xr.Dataset, region: Region, when: np.datetime64) -> np.ndarray | None:
    """Red/green/blue reflectance (3, h, w) of the region's window at acquisition ``when`` (None without RGB)."""
    rgb = rgb_bands([str(b) for b in cube["band"].values], common_names_of(cube))
    if rgb is None:
        return None
    sub = cube["reflectance"].sel(time=np.datetime64(when, "ns"), band=rgb).isel(y=region.rows, x=region.cols)
    return np.asarray(sub.astype("float32").values)
