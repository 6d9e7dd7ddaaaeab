"""From anomaly scores to confirmed alert polygons (GeoJSON / GeoParquet).

Input is a score cube ``score (time, y, x)``: a robust standardised score (:mod:`geowm.anomaly`: how far
what the satellite saw departs from what the model expected, or from a year before, in robust z units), NaN
where the cell was not clear-sky.

Confirmation (forest-alert style, as GLAD / RADD): per cell and in time order, a clear observation with
``score >= threshold`` opens a *candidate*; it becomes an *alert* once ``confirmations`` further clear
observations reach ``confirm_threshold`` (cloudy dates in between are skipped, not counted against it). A
clear observation below ``confirm_threshold`` drops the candidate; a candidate expires when its next
supporting clear observation comes more than ``max_gap_days`` after it opened. With ``neighbours`` (the
default), a cell's confirmation also confirms the candidates connected to it through 8-neighbours that are one
supporting observation short: a disturbance is one piece of ground, and clouds often hide part of it on the
look that would confirm it (the forecast context soon includes the change, and its surprise fades, so a
later look may no longer support it). An alert stays open while
clear observations stay ``>= confirm_threshold`` and closes at the first clear one below; the cell can then
raise a new alert later. ``first_detected`` is the date the candidate opened, not the confirmation date.

Grouping: the open alert episodes form a (time, y, x) volume; cells are linked in space (8-neighbours, on the
same date) and in time (same cell, consecutive dates, cloudy gaps inside an episode filled). Each connected
piece is one alert: its footprint is the union of its cells over time, ``first_detected`` the earliest cell
detection, ``last_seen`` the latest date with a score ``>= confirm_threshold``.

Type guess (only with ``obs``), from the median footprint reflectance before (up to ``120`` days before
``first_detected``) and after (``first_detected .. last_seen``), NDVI = (B08-B04)/(B08+B04),
NDWI = (B03-B08)/(B03+B08), vis = mean of B02/B03/B04; first rule that holds wins:

- ``flood``: NDWI rises by more than 0.3 and ends above 0 (green brighter than NIR: open water);
- ``fire``: NIR falls below 60 % of before, and after the scar is dark: NIR < 0.15 and vis < 0.10;
- ``crop_failure`` (cropland: most footprint pixels showed bare soil, NDVI < 0.25, and a grown crop, NDVI > 0.5,
  in the year before): NDVI falls by more than 0.15, since before or against the same weeks a year before (a crop
  that collapsed, or did not grow), and the footprint's median loss exceeds that of the cropland around it
  (within 50 px) by 0.15: one field failed, where a drought browns them all;
- ``clearcut`` (not cropland): NDVI falls by more than 0.25 and the visible brightens by more than 20 % (bare
  soil);
- ``drought``: NDVI falls by more than 0.05 and the alert lasts at least 30 days (slow, spread out);
- ``unknown``: anything else, or not enough clear observations / bands.

Confidence = (1 - exp(-peak_score / threshold)) * (1 - 0.5 ** n_obs), with ``n_obs`` the number of dates
with a supporting observation: in [0, 1), increasing in both peak score and supporting observations.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import xarray as xr
from affine import Affine
from rasterio import features
from scipy import ndimage
from shapely import make_valid
from shapely.geometry import shape
from shapely.ops import unary_union

from geowm.atomic import atomic_write, atomic_write_text
from geowm.bands import band_roles, common_names_of

ALERT_COLUMNS = ["id", "type_guess", "first_detected", "last_seen", "peak_score", "area_ha", "confidence"]
ALERT_TYPES = ("clearcut", "fire", "flood", "drought", "crop_failure", "unknown")
DAY = np.timedelta64(1, "D")
EIGHT = np.ones((3, 3), bool)  # 8-neighbourhood


@dataclass
class AlertRules:
    """Thresholds of the confirmation rule (scores in robust z units, times in days, areas in hectares)."""

    threshold: float = 4.0  # score that opens a candidate
    confirm_threshold: float = 3.0  # score a following clear observation needs to support it
    confirmations: int = 1  # further supporting clear observations needed to confirm
    min_area_ha: float = 0.1
    max_gap_days: float = 90  # a candidate expires if not confirmed within this many days
    # a candidate one supporting observation short of confirmation is confirmed with a confirmed 8-neighbour
    # (the same disturbance seen through a gap in the clouds next to it)
    neighbours: bool = True


def grid_transform(y: np.ndarray, x: np.ndarray) -> Affine:
    """Affine transform of a regular grid from its cell-centre coordinates (at least 2 cells per axis)."""
    y, x = np.asarray(y, dtype=float), np.asarray(x, dtype=float)
    if y.size < 2 or x.size < 2:
        raise ValueError("grid_transform needs at least 2 cells along y and x to know the cell size")
    dx, dy = x[1] - x[0], y[1] - y[0]
    return Affine(dx, 0.0, x[0] - dx / 2, 0.0, dy, y[0] - dy / 2)


def _days(times) -> np.ndarray:
    times = np.asarray(times, dtype="datetime64[ns]")
    return ((times - times[0]) / DAY).astype(float) if times.size else np.zeros(0)


def _track(s: np.ndarray, days: np.ndarray, rules: AlertRules,
           shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Run the per-cell confirmation state machine; loop over time, vectorised over cells.

    s: (T, P) scores, NaN = not clear; ``shape``: the (ny, nx) grid of the P cells (for
    ``rules.neighbours``). Returns ``confirmed`` (T, P) bool (True on the confirmation date) and
    ``episode`` (T, P) int32: the alert episode id (1, 2, ... per cell) on every date the cell is inside a
    confirmed alert (from first detection to last supporting observation), 0 elsewhere.
    """
    T, P = s.shape
    state = np.zeros(P, np.int8)  # 0 idle, 1 candidate, 2 alert
    ep_id = np.zeros(P, np.int32)  # counter of candidates per cell = id of the current one
    start_day = np.zeros(P)
    n_conf = np.zeros(P, np.int32)
    mark = np.zeros((T, P), np.int32)  # episode id on supporting observations
    ok = np.zeros((T + 1, P), bool)  # ok[i, p]: candidate i of cell p was confirmed
    confirmed = np.zeros((T, P), bool)
    cols = np.arange(P)
    for t in range(T):
        v = s[t]
        clear = np.isfinite(v)
        hi = clear & (v >= rules.confirm_threshold)
        state[(state == 1) & clear & (days[t] - start_day > rules.max_gap_days)] = 0  # expired
        was_alert = state == 2
        cand = state == 1
        sup = cand & hi
        n_conf[sup] += 1
        mark[t, sup] = ep_id[sup]
        conf = sup & (n_conf >= rules.confirmations)
        state[cand & clear & ~hi] = 0  # dropped
        state[conf] = 2
        if rules.neighbours and conf.any():
            near = ((state == 1) & (n_conf >= rules.confirmations - 1)  # one supporting observation short
                    & (days[t] - start_day <= rules.max_gap_days))
            grown = conf
            while True:  # spread through connected candidates
                more = near & ~grown & ndimage.binary_dilation(grown.reshape(shape), EIGHT).ravel()
                if not more.any():
                    break
                grown = grown | more
            state[grown] = 2
            conf = grown
        keep = was_alert & hi
        mark[t, keep] = ep_id[keep]
        state[was_alert & clear & ~hi] = 0  # alert closes
        new = (state == 0) & clear & (v >= rules.threshold)
        ep_id[new] += 1
        start_day[new] = days[t]
        n_conf[new] = 0
        mark[t, new] = ep_id[new]
        if rules.confirmations <= 0:
            state[new] = 2
            conf = conf | new
        else:
            state[new] = 1
        confirmed[t] = conf
        ok[ep_id[conf], cols[conf]] = True
    ep = np.where(np.take_along_axis(ok, mark, axis=0), mark, 0)
    # fill cloudy gaps between supporting observations of the same episode
    tt = np.arange(T)[:, None]
    last = np.maximum.accumulate(np.where(ep > 0, tt, -1), axis=0)
    nxt = np.minimum.accumulate(np.where(ep > 0, tt, T)[::-1], axis=0)[::-1]
    ff = np.where(last >= 0, np.take_along_axis(ep, np.clip(last, 0, T - 1), axis=0), 0)
    bf = np.where(nxt < T, np.take_along_axis(ep, np.clip(nxt, 0, T - 1), axis=0), 0)
    episode = np.where((ff > 0) & (ff == bf), ff, 0).astype(np.int32)
    return confirmed, episode


def confirmed(score: xr.DataArray, rules: AlertRules = AlertRules()) -> xr.DataArray:
    """Confirmed alerts per cell: (time, y, x) bool, True on the date a cell's alert is confirmed.

    The per-cell first detection of its first alert is attached as coordinate ``first_detected (y, x)``
    (datetime64, NaT where the cell never alerts).
    """
    score = score.transpose("time", "y", "x")
    T, ny, nx = score.shape
    times = score["time"].values.astype("datetime64[ns]")
    conf, episode = _track(score.values.reshape(T, -1).astype(float), _days(times), rules, (ny, nx))
    first = np.full(ny * nx, np.datetime64("NaT", "ns"))
    ever = episode.any(axis=0)
    first[ever] = times[np.argmax(episode > 0, axis=0)[ever]]
    out = xr.DataArray(conf.reshape(T, ny, nx), coords=score.coords, dims=("time", "y", "x"), name="confirmed")
    return out.assign_coords(first_detected=(("y", "x"), first.reshape(ny, nx)))


def empty_alerts(crs="EPSG:4326") -> gpd.GeoDataFrame:
    """An alerts table with no rows but the full schema."""
    df = pd.DataFrame({
        "id": pd.Series(dtype=str), "type_guess": pd.Series(dtype=str),
        "first_detected": pd.Series(dtype="datetime64[ns]"), "last_seen": pd.Series(dtype="datetime64[ns]"),
        "peak_score": pd.Series(dtype=float), "area_ha": pd.Series(dtype=float),
        "confidence": pd.Series(dtype=float)})
    return gpd.GeoDataFrame(df, geometry=gpd.GeoSeries([], crs=crs), crs=crs)


WGS84_A, WGS84_F = 6378137.0, 1 / 298.257223563  # the ellipsoid geographic cell areas are measured on


def _zone_area(lat_deg: np.ndarray) -> np.ndarray:
    """Area (m^2) of the WGS 84 ellipsoid between the equator and latitude ``lat_deg``, per radian of longitude."""
    e2 = WGS84_F * (2 - WGS84_F)
    e, s = np.sqrt(e2), np.sin(np.radians(lat_deg))
    return WGS84_A**2 * (1 - e2) / 2 * (s / (1 - e2 * s**2) + np.log((1 + e * s) / (1 - e * s)) / (2 * e))


@functools.lru_cache(maxsize=8)
def _projection(crs: str):
    """(pyproj CRS, transformer to lon/lat, Proj) of ``crs``, built once per CRS (an alert run measures many
    footprints)."""
    from pyproj import CRS, Proj, Transformer

    c = CRS.from_user_input(crs)
    if c.is_geographic:
        return c, None, None
    return c, Transformer.from_crs(c, 4326, always_xy=True), Proj(c)


def ground_area_ha(foot: np.ndarray, transform: Affine, crs: str) -> float:
    """Area on the ground (hectares) of the cells ``foot`` (bool, rows x cols) of a north-up grid whose cell (0, 0)
    has its top-left corner at ``transform`` in ``crs``. Geographic CRS (degrees): each row's cells measured on the
    WGS 84 ellipsoid between their parallels (cells shrink towards the poles). Projected CRS: the grid area in its
    linear unit (metres, US survey feet...) divided by the projection's areal scale at the footprint's centre
    (1.0008 on a UTM central meridian; about 2 for Web Mercator at 45 degrees), where pyproj knows it."""
    c, to_lonlat, proj = _projection(str(crs))
    counts = foot.sum(axis=1).astype(float)
    if c.is_geographic:
        edges = transform.f + transform.e * np.arange(foot.shape[0] + 1)
        cell_m2 = np.abs(np.diff(_zone_area(edges))) * np.radians(abs(transform.a))
        return float((counts * cell_m2).sum()) / 1e4
    unit = c.axis_info[0].unit_conversion_factor if c.axis_info else 1.0
    area = float(counts.sum()) * abs(transform.a * transform.e) * unit**2
    rows, cols = np.nonzero(foot)
    if rows.size:
        x, y = transform @ (cols.mean() + 0.5, rows.mean() + 0.5)
        try:
            scale = float(proj.get_factors(*to_lonlat.transform(x, y)).areal_scale)
        except Exception:  # noqa: BLE001 - a projection pyproj cannot give factors for: its grid area
            scale = 1.0
        if np.isfinite(scale) and scale > 0:
            area /= scale
    return area / 1e4


def _footprint_polygon(mask: np.ndarray, transform: Affine):
    polys = [shape(g) for g, val in features.shapes(mask.astype(np.uint8), mask=mask, connectivity=8,
                                                     transform=transform) if val == 1]
    return make_valid(unary_union(polys))


def _band_index(obs: xr.Dataset) -> dict[str, int]:
    """Index of the blue, green, red and near-infrared bands of ``obs`` (by common name, else by name)."""
    return band_roles(obs["reflectance"]["band"].values, common_names_of(obs))


TYPE_AFTER_DAYS = 30  # a footprint's type is read from its clear looks within this many days of first detection
TYPE_ABRUPT_SHARE = 1.0  # an abrupt change (flood, fire, clear-cut) names the alert where its pixels are at least
# this many times the pixels that only lost some greenness (drought-like decline)
# Cropland: a pixel whose clear looks in the year before the alert show bare soil (NDVI below CROP_BARE_NDVI, between
# two crops) and a grown crop (above CROP_GREEN_NDVI). On the demo region (seed 7, July 2021 to June 2022, every 4th
# pixel): the lowest NDVI of crop fields 0.13-0.18 (10th-90th percentile), of forest (deciduous included) 0.46-0.73,
# of grassland 0.21-0.34 (median 0.27); urban and bare land never reach 0.5. A failed field of another region (seed
# 12) had a median lowest NDVI of 0.18 over its patches, many pixels above 0.2.
CROP_BARE_NDVI = 0.25
CROP_GREEN_NDVI = 0.5
CROP_RING_PX = 50  # px around the footprint whose cropland tells a failed field (it alone lost) from a drought
CROP_LOSS = 0.15  # NDVI a failed crop lost, since before or against the same weeks a year before
CROP_LOCAL_LOSS = 0.15  # the footprint's median NDVI loss exceeds its surrounding cropland's by this much: local
CROP_YEAR_PX = 65536  # a year of looks is read at most this many px of a box (every k-th row and column)


def _guess_type(obs: xr.Dataset, rows: np.ndarray, cols: np.ndarray, foot: np.ndarray,
                first: np.datetime64, last: np.datetime64) -> str:
    """Type guess for one footprint; ``rows``/``cols`` map obs y/x to score-grid indices (-1 = outside)."""
    bands = _band_index(obs)
    if not {"green", "red", "nir"} <= set(bands):
        return "unknown"
    r_in = np.nonzero((rows >= 0) & foot.any(axis=1)[np.clip(rows, 0, None)])[0]
    c_in = np.nonzero((cols >= 0) & foot.any(axis=0)[np.clip(cols, 0, None)])[0]
    if r_in.size == 0 or c_in.size == 0:
        return "unknown"
    ys, xs = slice(r_in.min(), r_in.max() + 1), slice(c_in.min(), c_in.max() + 1)
    omask = foot[rows[ys]][:, cols[xs]] & (rows[ys] >= 0)[:, None] & (cols[xs] >= 0)[None, :]
    t = obs["time"].values.astype("datetime64[ns]")
    names = [b for b in ("blue", "green", "red", "nir") if b in bands]

    def looks(tsel: np.ndarray, ys: slice, xs: slice, mask: np.ndarray) -> np.ndarray | None:
        """The clear looks of the pixels ``mask`` of the box ``ys, xs`` at the dates ``tsel``: (t, band, px), NaN
        where not clear; None without a date."""
        if not tsel.any():
            return None
        sub = obs.isel(time=np.nonzero(tsel)[0], y=ys, x=xs)
        refl = sub["reflectance"].isel(band=[bands[b] for b in names]).values[..., mask]  # (t, b, px)
        valid = sub["valid"].values[..., mask] if "valid" in sub else np.isfinite(refl).all(axis=1)
        return np.where(valid[:, None, :], refl, np.nan)

    def median_refl(tsel: np.ndarray, ys: slice = ys, xs: slice = xs, mask: np.ndarray = omask) -> np.ndarray | None:
        """Each pixel's median over its clear looks at the dates ``tsel``: (band, px), NaN without one."""
        refl = looks(tsel, ys, xs, mask)
        if refl is None:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(refl, axis=0)

    def nd(m: np.ndarray) -> np.ndarray:
        b = dict(zip(names, m, strict=True))
        return (b["nir"] - b["red"]) / (b["nir"] + b["red"] + 1e-6)

    before_t = (t < first) & (t >= first - 120 * DAY)
    before = median_refl(before_t)
    # the change's signature: its first clear looks (a flood recedes, a burn greens up), the whole alert if none
    end = min(last, first + TYPE_AFTER_DAYS * DAY)
    after_t = (t >= first) & (t <= end)
    after = median_refl(after_t)
    if after is None or not np.isfinite(after).all():  # pixels without a clear look then: the whole alert's
        whole = median_refl((t >= first) & (t <= last))
        after = whole if after is None or whole is None else np.where(np.isfinite(after).all(axis=0), after, whole)
    if before is None or after is None:
        return "unknown"
    seen = np.isfinite(before).all(axis=0) & np.isfinite(after).all(axis=0)
    if not seen.any():
        return "unknown"

    def idx(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        b = dict(zip(names, m[:, seen], strict=True))
        g, r, n = b["green"], b["red"], b["nir"]
        vis = np.mean([b[k] for k in ("blue", "green", "red") if k in b], axis=0)
        return (n - r) / (n + r + 1e-6), (g - n) / (g + n + 1e-6), vis, n

    ndvi_b, ndwi_b, vis_b, nir_b = idx(before)
    ndvi_a, ndwi_a, vis_a, nir_a = idx(after)
    flood = (ndwi_a - ndwi_b > 0.3) & (ndwi_a > 0)
    fire = ~flood & (nir_a < 0.6 * nir_b) & (nir_a < 0.15) & (vis_a < 0.10)
    H, W = obs.sizes["y"], obs.sizes["x"]  # the land around the footprint, for cropland's regional change
    ry = slice(max(ys.start - CROP_RING_PX, 0), min(ys.stop + CROP_RING_PX, H))
    rx = slice(max(xs.start - CROP_RING_PX, 0), min(xs.stop + CROP_RING_PX, W))
    inside = (foot[np.clip(rows[ry], 0, None)][:, np.clip(cols[rx], 0, None)]
              & (rows[ry] >= 0)[:, None] & (cols[rx] >= 0)[None, :])
    ring = ~ndimage.binary_dilation(inside, iterations=3)
    when = {"year": (t < first) & (t >= first - 365 * DAY), "before": before_t, "after": after_t,
            "ago": (t >= first - 365 * DAY) & (t <= end - 365 * DAY)}
    crop = _failed_crop(looks, median_refl, nd, when, (ys, xs, omask), (ry, rx, ring), seen, before, after)
    crop = ~flood & ~fire & crop if crop is not None else None
    if crop is not None:  # cropland: a field's collapse or a crop that did not grow is a crop failure, no clear-cut
        clearcut = np.zeros_like(flood)
    else:
        crop = np.zeros_like(flood)
        clearcut = ~flood & ~fire & (ndvi_a - ndvi_b < -0.25) & (vis_a > 1.2 * vis_b)
    decline = ~flood & ~fire & ~clearcut & ~crop & (ndvi_a - ndvi_b < -0.05)
    abrupt = {"flood": int(flood.sum()), "fire": int(fire.sum()), "clearcut": int(clearcut.sum()),
              "crop_failure": int(crop.sum())}
    kind = max(abrupt, key=abrupt.get)
    # an abrupt change is what the alert is about where it covers as many pixels as the slow decline around it
    if abrupt[kind] > 0 and abrupt[kind] >= TYPE_ABRUPT_SHARE * int(decline.sum()):
        return kind
    if decline.sum() > 0 and (last - first) / DAY >= 30:
        return "drought"
    return "unknown"


def _failed_crop(looks, median_refl, nd, when: dict, box: tuple, ring_box: tuple, seen: np.ndarray,
                 before: np.ndarray, after: np.ndarray) -> np.ndarray | None:
    """For :func:`_guess_type`: None where the footprint is not cropland (fewer than half its pixels showed bare
    soil and a grown crop in the year before the alert); else, per seen pixel, whether its crop failed: it lost
    more than ``CROP_LOSS`` NDVI, since before or against the same weeks a year before (a crop that collapsed,
    or did not grow), and the footprint's median loss exceeds that of the cropland around it (``ring_box``) by
    ``CROP_LOCAL_LOSS`` (all False where it does not: a drought browns every field, a failure one).
    ``when``: date masks ``year``, ``before``, ``after`` and ``ago`` (the after dates a year earlier); ``box`` and
    ``ring_box``: (rows, columns, pixel mask) of the footprint and of the land around it; ``before`` / ``after``:
    the footprint's median looks (band, px)."""

    def thin(ys: slice, xs: slice, mask: np.ndarray) -> tuple[slice, slice, np.ndarray]:
        """Every ``k``-th row and column of a box larger than ``CROP_YEAR_PX`` px (a year of its looks is read)."""
        k = max(1, int(np.ceil(np.sqrt(mask.size / CROP_YEAR_PX))))
        return slice(ys.start, ys.stop, k), slice(xs.start, xs.stop, k), mask[::k, ::k]

    def cropland(ys: slice, xs: slice, mask: np.ndarray) -> np.ndarray | None:
        """Per pixel of ``mask``, whether its clear looks of the year before show bare soil and a grown crop."""
        refl = looks(when["year"], ys, xs, mask)
        if refl is None:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            v = nd(refl.transpose(1, 0, 2))
            return (np.nanmin(v, axis=0) < CROP_BARE_NDVI) & (np.nanmax(v, axis=0) > CROP_GREEN_NDVI)

    field = cropland(*thin(*box))
    if field is None or not field.size or field.mean() < 0.5:
        return None

    def loss(ys: slice, xs: slice, mask: np.ndarray, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        """Per pixel, the larger of its NDVI loss since before and against the same weeks a year before."""
        ago = median_refl(when["ago"], ys, xs, mask)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.fmax(nd(before) - nd(after), nd(ago) - nd(after) if ago is not None else np.nan)

    lost = loss(*box, before, after)[seen]
    ring_box = thin(*ring_box)
    around_field = cropland(*ring_box)
    rb, ra = median_refl(when["before"], *ring_box), median_refl(when["after"], *ring_box)
    if around_field is not None and rb is not None and ra is not None:
        around = loss(*ring_box, rb, ra)[around_field]
        around = around[np.isfinite(around)]
        if around.size >= 20 and np.nanmedian(lost) - np.median(around) < CROP_LOCAL_LOSS:
            return np.zeros(lost.shape, bool)
    return lost > CROP_LOSS


def _obs_index(obs_coord: np.ndarray, edge0: float, step: float, n: int) -> np.ndarray:
    i = np.floor((np.asarray(obs_coord, dtype=float) - edge0) / step).astype(int)
    return np.where((i >= 0) & (i < n), i, -1)


def alerts_from_scores(score: xr.DataArray, crs: str, rules: AlertRules = AlertRules(),
                       obs: xr.Dataset | None = None) -> gpd.GeoDataFrame:
    """Confirmed alerts as polygons in EPSG:4326, one row per spatio-temporally connected alert.

    score: (time, y, x) robust z scores, NaN = not clear; ``y``/``x`` cell centres in ``crs`` (any unit).
    obs: optional Dataset with ``reflectance (time, band, y, x)`` (0..1) and ``valid (time, y, x)``, on the
    score grid or a finer one, used for ``type_guess``. Columns: ``ALERT_COLUMNS`` + geometry.
    """
    score = score.transpose("time", "y", "x")
    T, ny, nx = score.shape
    if T == 0 or ny < 2 or nx < 2:
        return empty_alerts()
    times = score["time"].values.astype("datetime64[ns]")
    values = score.values.astype(float)
    _, episode = _track(values.reshape(T, -1), _days(times), rules, (ny, nx))
    active = episode.reshape(T, ny, nx) > 0
    if not active.any():
        return empty_alerts()
    transform = grid_transform(score["y"].values, score["x"].values)
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    structure[0, 1, 1] = structure[2, 1, 1] = True
    labels, n = ndimage.label(active, structure=structure)
    if obs is not None:
        rows = _obs_index(obs["y"].values, transform.f, transform.e, ny)
        cols = _obs_index(obs["x"].values, transform.c, transform.a, nx)
    records, geoms = [], []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        sub = labels[sl] == k
        foot = sub.any(axis=0)
        area = ground_area_ha(foot, transform @ Affine.translation(sl[2].start, sl[1].start), crs)
        if area < rules.min_area_ha - 1e-9:
            continue
        sc = values[sl]
        supported = (sub & np.isfinite(sc)).any(axis=(1, 2))
        first, last = times[sl[0].start], times[sl[0].start + np.nonzero(supported)[0].max()]
        peak = float(np.nanmax(np.where(sub, sc, np.nan)))
        n_obs = int(supported.sum())
        r0, c0 = sl[1].start, sl[2].start
        geom = _footprint_polygon(foot, transform @ Affine.translation(c0, r0))
        full = np.zeros((ny, nx), bool)
        full[sl[1], sl[2]] = foot
        kind = _guess_type(obs, rows, cols, full, first, last) if obs is not None else "unknown"
        cx, cy = geom.centroid.x, geom.centroid.y
        digest = hashlib.sha1(f"{np.datetime_as_string(first, 'D')}|{cx:.0f}|{cy:.0f}|{crs}".encode()).hexdigest()
        conf = (1 - np.exp(-max(peak, 0.0) / max(rules.threshold, 1e-6))) * (1 - 0.5 ** n_obs)
        records.append(dict(id=f"alert-{digest[:12]}", type_guess=kind, first_detected=first, last_seen=last,
                            peak_score=peak, area_ha=round(area, 6), confidence=float(conf)))
        geoms.append(geom)
    if not records:
        return empty_alerts()
    gdf = gpd.GeoDataFrame(pd.DataFrame.from_records(records, columns=ALERT_COLUMNS), geometry=geoms, crs=crs)
    gdf = gdf.to_crs("EPSG:4326").sort_values(["first_detected", "id"]).reset_index(drop=True)
    for col in ("first_detected", "last_seen"):
        gdf[col] = gdf[col].astype("datetime64[ns]")
    return gdf


def write_alerts(gdf: gpd.GeoDataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``alerts.geojson`` and ``alerts.parquet`` (GeoParquet) in EPSG:4326, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if gdf.crs is None:
        raise ValueError("alerts GeoDataFrame has no CRS")
    gdf = gdf.to_crs("EPSG:4326") if not gdf.crs.equals("EPSG:4326") else gdf
    text_df = gdf.copy()
    for col in text_df.columns:
        if col != "geometry" and pd.api.types.is_datetime64_any_dtype(text_df[col]):
            text_df[col] = text_df[col].dt.strftime("%Y-%m-%dT%H:%M:%S")
    doc = json.loads(text_df.to_json(na="null", drop_id=True)) if len(text_df) else \
        {"type": "FeatureCollection", "features": []}
    paths = {"geojson": out / "alerts.geojson", "parquet": out / "alerts.parquet"}

    atomic_write_text(paths["geojson"], json.dumps(doc))
    atomic_write(paths["parquet"], lambda tmp: gdf.to_parquet(tmp, index=False))
    return paths


def open_alerts(path: str | os.PathLike) -> gpd.GeoDataFrame:
    """Read alerts from ``alerts.parquet`` / ``alerts.geojson`` or a folder holding them (parquet preferred)."""
    path = Path(path)
    if path.is_dir():
        path = path / "alerts.parquet" if (path / "alerts.parquet").exists() else path / "alerts.geojson"
    if not path.exists():
        raise FileNotFoundError(f"no alerts file at {path}")
    gdf = gpd.read_parquet(path) if path.suffix == ".parquet" else gpd.read_file(path)
    if len(gdf) == 0:
        return empty_alerts()
    if gdf.crs is None:
        gdf = gdf.set_crs("EPSG:4326")
    for col in ("first_detected", "last_seen"):
        if col in gdf:
            gdf[col] = pd.to_datetime(gdf[col]).astype("datetime64[ns]")
    return gdf[[c for c in ALERT_COLUMNS if c in gdf] + ["geometry"]]
