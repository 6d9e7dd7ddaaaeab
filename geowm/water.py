"""Open water, and open water where a place had none: the spectral signature of a flood.

A flood on farmland after harvest is no surprise to the anomaly scores: a bare field's latent moves a lot at
that time of year anyway (ploughing, sowing), so the patch's own history in the season, and its recurrence cap,
call it normal land use. What no harvest does is put water on the field. So a pixel is **open water** on a clear
look where the normalised difference water index ``NDWI = (green - NIR) / (green + NIR)`` (McFeeters 1996) is
above :data:`WATER_NDWI` and the near-infrared reflectance is below :data:`WATER_MAX_NIR` (water absorbs the near
infrared; snow, cloud and bright surfaces, which can have a positive NDWI, do not). It is **new water** where
it is water now and was seen clear, and never water, in the reference window before (:data:`LOOKBACK_DAYS` to
:data:`EXCLUDE_RECENT_DAYS` before the look): a lake, a river, a wetland that was wet at any time in the last
year and two months, and the shore a partly clouded patch shows, are not new.

This is a spectral rule, not the world model: :func:`geowm.anomaly.detect` takes the larger of it (as a score,
:func:`new_water_score`) and the model's scores.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from geowm.bands import band_roles, common_names_of

WATER_NDWI = 0.0
WATER_MAX_NIR = 0.15
LOOKBACK_DAYS = 425.0  # a year and two months: last year's season, whatever the date
EXCLUDE_RECENT_DAYS = 30.0  # an ongoing flood must not be its own reference
MIN_CLEAR = 0.5  # the patch's share of valid pixels for a look to count (the model's token rule)
TILE_PX = 512  # pixels per side of the blocks read at a time (memory ~ dates x TILE_PX^2 x 14 bytes)


def water_bands(ds: xr.Dataset) -> tuple[str, str] | None:
    """Names of the green and near-infrared bands of a cube Dataset, or None if it lacks either."""
    bands = [str(b) for b in ds["band"].values]
    roles = band_roles(bands, common_names_of(ds), need=("green", "nir"))
    return (bands[roles["green"]], bands[roles["nir"]]) if "green" in roles and "nir" in roles else None


def is_water(green: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """Open water (bool, same shape): NDWI above :data:`WATER_NDWI` and NIR below :data:`WATER_MAX_NIR`.
    Reflectances as physical values (0..1); NaN is not water."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ndwi = (green - nir) / (green + nir)
        return (ndwi > WATER_NDWI) & (nir < WATER_MAX_NIR)


def new_water(ds: xr.Dataset, times, patch: int, lookback_days: float = LOOKBACK_DAYS,
              exclude_recent_days: float = EXCLUDE_RECENT_DAYS, min_clear: float = MIN_CLEAR,
              tile_px: int = TILE_PX) -> xr.DataArray:
    """Share of each patch's clear pixels that are new open water, at each of ``times`` (cube dates).

    ``ds``: a cube Dataset (``reflectance (time, band, y, x)``, ``valid (time, y, x)``) cropped to whole
    ``patch`` x ``patch`` pixel patches. A pixel clear at ``t`` is new water where it is open water then
    (:func:`is_water`), was clear on a look in the reference window ``[t - lookback_days, t - exclude_recent_days]``
    and was never open water on those looks (a pixel never seen in the window is not new: nothing says it was
    dry). Returns (time, py, px) float32 on the patch centres: new-water pixels / clear pixels at ``t``, NaN where
    the patch is less than ``min_clear`` clear. Raises ValueError without a green and a near-infrared band.

    Cost: the looks at ``times`` are read ``tile_px`` x ``tile_px`` pixels at a time, and the reference looks a cube
    time chunk at a time, newest first, only while a pixel that is water now has not been water on them yet
    (:func:`_block_share`): a scheduled run scoring one new acquisition reads a chunk or two of history where
    there are only lakes and rivers, the whole window where there is new water.
    """
    pair = water_bands(ds)
    if pair is None:
        raise ValueError(f"new water needs a green and a near-infrared band; the cube has "
                         f"{[str(b) for b in ds['band'].values]}")
    times = np.asarray(times).astype("datetime64[ns]")
    cube_t = ds["time"].values.astype("datetime64[ns]")
    H, W = ds.sizes["y"] // patch * patch, ds.sizes["x"] // patch * patch
    out = np.full((len(times), H // patch, W // patch), np.nan, np.float32)
    py = ds["y"].values[: H].reshape(-1, patch).mean(axis=1)
    px = ds["x"].values[: W].reshape(-1, patch).mean(axis=1)
    coords = {"time": times, "py": py, "px": px}
    if len(times):
        day = cube_t.astype("datetime64[s]").astype(np.int64) / 86400.0
        t_day = times.astype("datetime64[s]").astype(np.int64) / 86400.0
        at = np.searchsorted(cube_t, times)
        if (at >= len(cube_t)).any() or (cube_t[np.minimum(at, len(cube_t) - 1)] != times).any():
            raise ValueError("new_water: every time must be a date of the cube")
        lo = np.searchsorted(day, t_day - lookback_days, side="left")  # the reference window's looks: [lo, hi)
        hi = np.minimum(np.searchsorted(day, t_day - exclude_recent_days, side="right"), at)
        tile = max(tile_px // patch, 1) * patch
        for y0 in range(0, H, tile):
            for x0 in range(0, W, tile):
                ys, xs = slice(y0, min(y0 + tile, H)), slice(x0, min(x0 + tile, W))
                out[:, ys.start // patch: ys.stop // patch, xs.start // patch: xs.stop // patch] = _block_share(
                    ds.isel(y=ys, x=xs), pair, at, lo, hi, patch, min_clear)
    return xr.DataArray(out, dims=("time", "py", "px"), coords=coords, name="new_water",
                        attrs={"long_name": "share of the patch's clear pixels that are open water and were not in "
                                            f"the {lookback_days:g} to {exclude_recent_days:g} days before",
                               "units": "1"})


def _looks(ds: xr.Dataset, pair: tuple[str, str], index) -> tuple[np.ndarray, np.ndarray]:
    """Open water and clear (both (T, h, w) bool) at the cube's looks ``index`` (an array or a slice)."""
    sub = ds.isel(time=index)
    g = sub["reflectance"].sel(band=pair[0]).astype(np.float32).values
    n = sub["reflectance"].sel(band=pair[1]).astype(np.float32).values
    valid = np.isfinite(g) & np.isfinite(n)
    if "valid" in sub:
        valid &= sub["valid"].values.astype(bool)
    return is_water(g, n) & valid, valid


def _time_chunks(ds: xr.Dataset) -> np.ndarray:
    """Start index of each of the cube's time chunks, and its end: reads are aligned to them."""
    chunks = ds["reflectance"].chunks
    sizes = chunks[0] if chunks else (ds.sizes["time"],)
    return np.concatenate([[0], np.cumsum(sizes)])


def _block_share(ds: xr.Dataset, pair: tuple[str, str], at: np.ndarray, lo: np.ndarray, hi: np.ndarray, patch: int,
                 min_clear: float) -> np.ndarray:
    """:func:`new_water` on one block ``ds`` (whole patches): for each date scored, its look ``at[k]`` and its
    reference looks ``[lo[k], hi[k])``. Returns (len(at), h / patch, w / patch).

    The reference looks are read a cube time chunk at a time, newest first, each at most once for the block, and
    only while some pixel that is water at the look has not been water on a reference look yet: a lake or a river
    is settled by its last clear looks, a flood needs the whole window."""
    H, W = ds.sizes["y"], ds.sizes["x"]
    h, w = H // patch, W // patch

    def per_patch(a: np.ndarray) -> np.ndarray:
        return a.reshape(*a.shape[:-2], h, patch, w, patch).sum(axis=(-3, -1))

    looks, inverse = np.unique(at, return_inverse=True)
    wet_now, clear_now = _looks(ds, pair, looks)
    edges = _time_chunks(ds)
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def chunk(c: int) -> tuple[np.ndarray, np.ndarray]:  # (open water, clear) at chunk c's looks, read once
        if c not in cache:
            wet, clear = _looks(ds, pair, slice(int(edges[c]), int(edges[c + 1])))
            cache[c] = (wet, clear)
        return cache[c]

    new = np.zeros((len(looks), H, W), bool)
    for u in range(len(looks)):
        cand = wet_now[u]
        if not cand.any():
            continue
        ks = np.flatnonzero(inverse == u)
        a, b = int(lo[ks[0]]), int(hi[ks[0]])  # the same look: the same window
        was, seen = np.zeros((H, W), bool), np.zeros((H, W), bool)
        for c in range(min(int(np.searchsorted(edges, b, side="right")) - 1, len(edges) - 2), -1, -1):
            c0, c1 = max(int(edges[c]), a), min(int(edges[c + 1]), b)
            if c1 <= c0:
                if edges[c + 1] <= a:
                    break
                continue
            wet, clear = chunk(c)
            sl = slice(c0 - int(edges[c]), c1 - int(edges[c]))
            was |= wet[sl].any(axis=0)
            seen |= clear[sl].any(axis=0)
            if not (cand & ~was).any():  # every pixel wet now was wet before: nothing is new
                break
        new[u] = cand & seen & ~was
    n_clear = per_patch(clear_now)[inverse]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = per_patch(new)[inverse] / n_clear
    return np.where(n_clear >= min_clear * patch * patch, share, np.nan).astype(np.float32)


# As a score on the scale of the model's scores (geowm.anomaly.ALERT_RULES opens a candidate at 5 and confirms at 4):
# a quarter of a patch newly under water scores 5, a fifth 4; less than a tenth is not scored.
NEW_WATER_SCALE = 20.0
NEW_WATER_MIN = 0.1


def new_water_score(frac: xr.DataArray, scale: float = NEW_WATER_SCALE,
                    min_share: float = NEW_WATER_MIN) -> xr.DataArray:
    """``scale`` x the new-water share (:func:`new_water`) where it is ``min_share`` or more, NaN elsewhere."""
    with np.errstate(invalid="ignore"):
        v = np.where(frac.values >= min_share, scale * frac.values, np.nan).astype(np.float32)
    return frac.copy(data=v).rename("water_score").assign_attrs(
        long_name=f"new open water score: {scale:g} x the patch's share of new open water (from {min_share:g})",
        units="1")
