"""What the dashboard shows, read from a geowm workdir through geowm's public API (no Streamlit here).

Units: reflectance 0..1, NDVI unitless (-1..1), anomaly scores in robust z units, areas in hectares,
grid coordinates in the cube CRS (its units: metres, feet or degrees; ``Grid.map_scale`` turns them into the map's
metres), alert geometries in EPSG:4326 (lon/lat degrees).
Reads are lazy (dask) and reduced before they reach memory: a map image is block-averaged to at most
``MAP_MAX_PX`` pixels a side; a series reads only the window around its footprint.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import xarray as xr
from affine import Affine

import geowm
from geowm.alerts import grid_transform
from geowm.bands import common_names_of, ndvi_bands, rgb_bands

ENV_VAR = "GEOWM_WORKDIR"
COMPONENTS = ("cube", "forecasts", "alerts")  # fixed folder names inside a workdir
MAP_MAX_PX = 512  # map images are block-averaged to at most this many pixels a side
IMAGE_CLEAR_MIN = 0.6  # "latest clear" acquisition: at least this share of the region's pixels valid
SERIES_CLEAR_MIN = 0.5  # an acquisition enters an observed series when this share of the footprint is valid
CHIP_CLEAR_MIN = 0.8  # a before/after chip needs this share of its window valid
CHIP_MIN_PX = 48  # chips show at least this many cube pixels a side


class WorkdirError(ValueError):
    """The workdir cannot be used; the message says why."""


def workdir_from(argv: Sequence[str], env: Mapping[str, str]) -> Path | None:
    """The workdir named on the app's command line (``-- --workdir DIR``), else by ``$GEOWM_WORKDIR``.

    Never from the browser (URL or widgets): the page cannot make the server read another folder.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--workdir")
    args, _ = parser.parse_known_args(list(argv))
    text = args.workdir or env.get(ENV_VAR)
    return Path(text).expanduser().resolve() if text else None


@dataclass(frozen=True)
class Workdir:
    """The components found in a workdir: ``paths`` (name -> folder inside root), ``notes`` (name -> why not)."""

    root: Path
    paths: dict[str, Path]
    notes: dict[str, str]


def locate(root: str | os.PathLike) -> Workdir:
    """Find ``cube/``, ``forecasts/`` and ``alerts/`` in ``root``; a link that leads outside it is ignored."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise WorkdirError(f"workdir {root} does not exist or is not a folder")
    paths, notes = {}, {}
    for name in COMPONENTS:
        real = (root / name).resolve()
        if not (root / name).exists():
            notes[name] = f"no {name}/ in {root}"
        elif root not in real.parents:
            notes[name] = f"{name}/ leads to {real}, outside the workdir: ignored"
        else:
            paths[name] = real
    return Workdir(root, paths, notes)


@dataclass
class Sources:
    """The opened workdir: lazy datasets, the alerts table, and a note per component that is missing."""

    workdir: Workdir
    cube: xr.Dataset | None = None
    forecasts: xr.Dataset | None = None
    scores: xr.Dataset | None = None
    alerts: gpd.GeoDataFrame | None = None
    notes: dict[str, str] = field(default_factory=dict)  # "cube", "forecasts", "scores", "alerts" -> message
    version: str = ""  # changes whenever any component changes (cache key)


def _mtime(path: Path) -> str:
    try:
        return str(path.stat().st_mtime_ns)
    except OSError:
        return "-"


def open_sources(root: str | os.PathLike) -> Sources:
    """Open every component of the workdir through geowm's API; what is missing or unreadable becomes a note."""
    wd = locate(root)
    src = Sources(wd, notes=dict(wd.notes))
    if "cube" in wd.paths:
        try:
            src.cube = geowm.open_cube(wd.paths["cube"])
        except Exception as exc:  # noqa: BLE001 - shown on the page, never a traceback
            src.notes["cube"] = f"cube/ cannot be opened: {exc}"
    if "forecasts" in wd.paths:
        try:
            src.forecasts = geowm.open_forecasts(wd.paths["forecasts"])
        except Exception as exc:  # noqa: BLE001
            src.notes["forecasts"] = f"forecasts/ cannot be opened: {exc}"
    alerts_dir = wd.paths.get("alerts")
    if alerts_dir is not None:
        try:
            src.alerts = geowm.open_alerts(alerts_dir)
        except FileNotFoundError:
            src.notes["alerts"] = f"no alerts.parquet or alerts.geojson in {alerts_dir}"
        except Exception as exc:  # noqa: BLE001
            src.notes["alerts"] = f"alerts cannot be read: {exc}"
        try:
            src.scores = geowm.open_scores(alerts_dir)
        except FileNotFoundError:
            src.notes["scores"] = f"no scores.zarr in {alerts_dir}"
        except Exception as exc:  # noqa: BLE001
            src.notes["scores"] = f"scores.zarr cannot be read: {exc}"
    else:
        src.notes.setdefault("scores", src.notes.get("alerts", "no alerts/"))
    parts = [str(src.cube.attrs.get("geowm:snapshot")) if src.cube is not None else "-",
             str(src.forecasts.attrs.get("geowm:store_snapshot")) if src.forecasts is not None else "-"]
    if alerts_dir is not None:
        parts += [_mtime(alerts_dir / n) for n in ("alerts.parquet", "alerts.geojson", "scores.zarr/zarr.json")]
    src.version = "|".join(parts)
    return src


# ----------------------------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Grid:
    """A north-up grid: cell centres ``x`` (increasing) and ``y`` (decreasing), in the units of ``crs``."""

    x: np.ndarray
    y: np.ndarray
    crs: str

    @property
    def transform(self) -> Affine:
        return grid_transform(self.y, self.x)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the CRS."""
        t = self.transform
        return (t.c, t.f + t.e * len(self.y), t.c + t.a * len(self.x), t.f)

    @property
    def map_scale(self) -> tuple[float, float]:
        """Metres per CRS unit along x and y, for the map (drawn in metres from the region's lower-left corner): a
        projected CRS's linear unit (1 for metres, 0.3048 for feet); for a geographic one, a degree of longitude
        and of latitude at the region's middle latitude (the map is then a local equirectangular view)."""
        from pyproj import CRS

        try:
            crs = CRS.from_user_input(self.crs) if self.crs else None
        except Exception:  # noqa: BLE001 - an unreadable CRS: draw its units as they are
            crs = None
        if crs is None:
            return (1.0, 1.0)
        if crs.is_geographic:
            lat = np.radians(0.5 * (self.bounds[1] + self.bounds[3]))
            # WGS 84: metres per degree of longitude and of latitude at ``lat``
            return (111412.84 * np.cos(lat) - 93.5 * np.cos(3 * lat),
                    111132.92 - 559.82 * np.cos(2 * lat) + 1.175 * np.cos(4 * lat))
        unit = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
        return (float(unit), float(unit))

    def window(self, bounds: tuple[float, float, float, float], pad: float = 0.0) -> tuple[slice, slice]:
        """Rows and columns of the cells that touch ``bounds`` (CRS units) grown by ``pad`` cells, clipped."""
        inv = ~self.transform
        c0, r0 = inv @ (bounds[0], bounds[3])
        c1, r1 = inv @ (bounds[2], bounds[1])
        rows = slice(max(int(np.floor(min(r0, r1) - pad)), 0), min(int(np.ceil(max(r0, r1) + pad)), len(self.y)))
        cols = slice(max(int(np.floor(min(c0, c1) - pad)), 0), min(int(np.ceil(max(c0, c1) + pad)), len(self.x)))
        return rows, cols


def grid_of(ds: xr.Dataset) -> Grid:
    """The grid of a cube, forecast store or score raster (CRS from its ``spatial_ref``)."""
    crs = str(ds["spatial_ref"].attrs.get("crs_wkt", "")) if "spatial_ref" in ds.coords else ""
    return Grid(np.asarray(ds["x"].values, float), np.asarray(ds["y"].values, float), crs)


@dataclass(frozen=True)
class CubeInfo:
    """What the page needs to know about the cube (metadata only)."""

    times: np.ndarray  # datetime64[ns], sorted
    bands: list[str]
    grid: Grid
    tile_size: int  # px
    snapshot: str

    def tiles(self) -> list[str]:
        """Tile names ``row_col`` (row-major), as the cube's tile grid names them."""
        ts, (h, w) = self.tile_size, (len(self.grid.y), len(self.grid.x))
        return [f"{r}_{c}" for r in range(-(-h // ts)) for c in range(-(-w // ts))]


def cube_info(cube: xr.Dataset) -> CubeInfo:
    return CubeInfo(cube["time"].values.astype("datetime64[ns]"), [str(b) for b in cube["band"].values],
                    grid_of(cube), int(cube.attrs.get("geowm:tile_size", 256)), str(cube.attrs.get("geowm:snapshot")))


# ---------------------------------------------------------------------------------------------- alerts


@dataclass(frozen=True)
class AlertFilter:
    """Sidebar filters. Dates: an alert is kept when its [first_detected, last_seen] overlaps [start, end]."""

    types: tuple[str, ...] | None = None  # None: every type
    min_score: float = -np.inf  # peak score, robust z
    min_confidence: float = 0.0  # 0..1
    start: date | None = None
    end: date | None = None
    min_area_ha: float = 0.0
    max_area_ha: float = np.inf


def filter_alerts(alerts: gpd.GeoDataFrame, flt: AlertFilter) -> gpd.GeoDataFrame:
    """The alerts that pass ``flt``, sorted by peak score (highest first)."""
    keep = (alerts["peak_score"] >= flt.min_score) & (alerts["confidence"] >= flt.min_confidence)
    keep &= (alerts["area_ha"] >= flt.min_area_ha) & (alerts["area_ha"] <= flt.max_area_ha)
    if flt.types is not None:
        keep &= alerts["type_guess"].isin(flt.types)
    if flt.end is not None:
        keep &= alerts["first_detected"] < pd.Timestamp(flt.end) + pd.Timedelta(days=1)
    if flt.start is not None:
        keep &= alerts["last_seen"] >= pd.Timestamp(flt.start)
    return alerts[keep].sort_values(["peak_score", "id"], ascending=[False, True])


def alerts_table(alerts: gpd.GeoDataFrame) -> pd.DataFrame:
    """One row per alert for the table: id, type, dates, peak score, confidence, area (ha), centroid lon/lat."""
    cen = alerts.geometry.to_crs(alerts.estimate_utm_crs()).centroid.to_crs(4326) if len(alerts) else alerts.geometry
    return pd.DataFrame({
        "id": alerts["id"].to_numpy(), "type": alerts["type_guess"].to_numpy(),
        "first_detected": alerts["first_detected"].dt.date.to_numpy(),
        "last_seen": alerts["last_seen"].dt.date.to_numpy(),
        "peak_score": alerts["peak_score"].round(2).to_numpy(), "confidence": alerts["confidence"].round(3).to_numpy(),
        "area_ha": alerts["area_ha"].round(2).to_numpy(),
        "lon": np.round(cen.x.to_numpy(), 6) if len(alerts) else [], "lat": np.round(cen.y.to_numpy(), 6)
        if len(alerts) else []})


def alerts_csv(alerts: gpd.GeoDataFrame) -> bytes:
    """The table as CSV (UTF-8), with each footprint as WKT in EPSG:4326 (``geometry_wkt``)."""
    table = alerts_table(alerts)
    table["geometry_wkt"] = alerts.geometry.to_wkt().to_numpy() if len(alerts) else []
    return table.to_csv(index=False).encode()


def alerts_geojson(alerts: gpd.GeoDataFrame) -> str:
    """The alerts as a GeoJSON FeatureCollection (EPSG:4326, dates as ISO 8601 text)."""
    out = alerts.to_crs(4326).copy()
    for col in ("first_detected", "last_seen"):
        out[col] = out[col].dt.strftime("%Y-%m-%dT%H:%M:%S")
    return out.to_json(na="null", drop_id=True) if len(out) else '{"type": "FeatureCollection", "features": []}'


# ---------------------------------------------------------------------------------------------- images


def coarsen_factor(h: int, w: int, max_px: int = MAP_MAX_PX) -> int:
    """Smallest integer block size that brings an h x w image to at most ``max_px`` a side."""
    return max(1, -(-max(h, w) // max_px))


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """NaN-aware mean over f x f blocks of the last two axes (edges padded): (..., h, w) -> (..., h/f, w/f)."""
    if f == 1:
        return a
    h, w = a.shape[-2:]
    a = np.pad(a.astype(np.float32), [(0, 0)] * (a.ndim - 2) + [(0, -h % f), (0, -w % f)], constant_values=np.nan)
    blocks = a.reshape(*a.shape[:-2], a.shape[-2] // f, f, a.shape[-1] // f, f)
    n = np.isfinite(blocks).sum(axis=(-3, -1))
    with np.errstate(invalid="ignore"):
        return np.where(n > 0, np.nansum(blocks, axis=(-3, -1)) / np.maximum(n, 1), np.nan).astype(np.float32)


def clear_fractions(cube: xr.Dataset, t_index: Sequence[int], max_px: int = MAP_MAX_PX) -> np.ndarray:
    """Share of valid pixels (0..1) of each listed acquisition, on a subsample of at most max_px a side."""
    f = coarsen_factor(cube.sizes["y"], cube.sizes["x"], max_px)
    v = cube["valid"].isel(time=list(t_index), y=slice(None, None, f), x=slice(None, None, f))
    return np.asarray(v.mean(("y", "x")).values, float)


def latest_clear(cube: xr.Dataset, min_clear: float = IMAGE_CLEAR_MIN) -> int:
    """Index of the latest acquisition with at least ``min_clear`` valid pixels (else the clearest one).

    Walks back one time chunk at a time, so usually only the last chunk of ``valid`` is read.
    """
    n = cube.sizes["time"]
    step = int(cube["valid"].chunksizes["time"][0]) if cube["valid"].chunks else 8
    best, best_frac = n - 1, -1.0
    for end in range(n, 0, -step):
        idx = list(range(max(end - step, 0), end))
        frac = clear_fractions(cube, idx)
        ok = np.flatnonzero(frac >= min_clear)
        if ok.size:
            return idx[int(ok[-1])]
        if frac.max() > best_frac:
            best, best_frac = idx[int(np.argmax(frac))], float(frac.max())
    return best


def scene(cube: xr.Dataset, t: int, max_px: int = MAP_MAX_PX) -> dict[str, np.ndarray | float | None]:
    """One acquisition, block-averaged to at most ``max_px`` a side.

    Returns ``rgb`` (3, h, w) reflectance of red/green/blue over all pixels, clouds included (None when
    the cube lacks those bands), ``ndvi`` (h, w) mean NDVI of the valid pixels (NaN where none; None
    without red/NIR), ``clear`` (h, w) share of valid pixels, and ``clear_fraction`` (the whole region).
    Read in strips of whole chunk rows, so memory stays at a few strips whatever the region's size.
    """
    bands = [str(b) for b in cube["band"].values]
    H, W = cube.sizes["y"], cube.sizes["x"]
    f = coarsen_factor(H, W, max_px)
    rgb, rn = rgb_bands(bands, common_names_of(cube)), ndvi_bands(bands, common_names_of(cube))
    need = sorted({bands.index(b) for b in rgb or []} | set(rn or ()))
    chunk = int(cube["reflectance"].chunksizes["y"][0]) if cube["reflectance"].chunks else 256
    strip = -(-chunk // f) * f
    parts: dict[str, list[np.ndarray]] = {"clear": [], "rgb": [], "ndvi": []}
    one = cube.isel(time=t)
    for y0 in range(0, H, strip):
        ys = slice(y0, min(y0 + strip, H))
        valid = np.asarray(one["valid"].isel(y=ys).values, bool)
        parts["clear"].append(block_mean(valid[None].astype(np.float32), f)[0])
        refl = np.asarray(one["reflectance"].isel(band=need, y=ys).values, np.float32) if need else None
        if rgb:
            parts["rgb"].append(block_mean(refl[[need.index(bands.index(b)) for b in rgb]], f))
        if rn:
            red, nir = refl[need.index(rn[0])], refl[need.index(rn[1])]
            with np.errstate(invalid="ignore", divide="ignore"):
                nd = np.where(valid & (nir + red > 1e-6), (nir - red) / (nir + red), np.nan)
            parts["ndvi"].append(block_mean(nd[None], f)[0])
    clear = np.concatenate(parts["clear"], axis=0)
    return {"clear": clear, "clear_fraction": float(np.nanmean(clear)) if clear.size else 0.0,
            "rgb": np.concatenate(parts["rgb"], axis=1) if rgb else None,
            "ndvi": np.concatenate(parts["ndvi"], axis=0) if rn else None}


def score_image(scores: xr.Dataset, when: np.datetime64 | None = None) -> tuple[np.ndarray | None, str]:
    """The score raster (y, x) on its patch grid: at the last scored date on or before ``when``, or the
    peak over all scored dates when ``when`` is None. Returns (values or None, a label saying which)."""
    times = scores["time"].values.astype("datetime64[ns]")
    if times.size == 0:
        return None, "no scored acquisition"
    if when is None:
        return np.asarray(scores["score"].max("time").values, float), \
            f"peak score {str(times[0])[:10]} .. {str(times[-1])[:10]}"
    i = int(np.searchsorted(times, np.datetime64(when, "ns"), side="right")) - 1
    if i < 0:
        return None, f"no score on or before {str(when)[:10]} (first scored {str(times[0])[:10]})"
    return np.asarray(scores["score"].isel(time=i).values, float), f"score on {str(times[i])[:10]}"
