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
    ``patch`` x ``patch`` pixel patches. A pixel counts at ``t`` where it is clear then and was clear on a look in
    the reference window ``[t - lookback_days, t - exclude_recent_days]``; it is new water where it is open water
    at ``t`` (:func:`is_water`) and was never open water on those looks. Returns (time, py, px) float32 on the
    patch centres: new-water pixels / counted pixels, NaN where the patch is less than ``min_clear`` clear at
    ``t`` or fewer than half its clear pixels count (no reference). Raises ValueError without a green and a
    near-infrared band. Read ``tile_px`` x ``tile_px`` pixels at a time.
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
        hi = np.searchsorted(day, t_day - exclude_recent_days, side="right")
        first = int(lo.min())
        span = slice(first, int(at.max()) + 1)
        tile = max(tile_px // patch, 1) * patch
        for y0 in range(0, H, tile):
            for x0 in range(0, W, tile):
                ys, xs = slice(y0, min(y0 + tile, H)), slice(x0, min(x0 + tile, W))
                sub = ds.isel(time=span, y=ys, x=xs)
                g = sub["reflectance"].sel(band=pair[0]).astype(np.float32).values
                n = sub["reflectance"].sel(band=pair[1]).astype(np.float32).values
                valid = np.isfinite(g) & np.isfinite(n)
                if "valid" in sub:
                    valid &= sub["valid"].values.astype(bool)
                out[:, ys.start // patch: ys.stop // patch, xs.start // patch: xs.stop // patch] = _tile_share(
                    is_water(g, n) & valid, valid, at - first, lo - first, hi - first, patch, min_clear)
    return xr.DataArray(out, dims=("time", "py", "px"), coords=coords, name="new_water",
                        attrs={"long_name": "share of the patch's clear pixels that are open water and were not in "
                                            f"the {lookback_days:g} to {exclude_recent_days:g} days before",
                               "units": "1"})


def _tile_share(wet: np.ndarray, valid: np.ndarray, at: np.ndarray, lo: np.ndarray, hi: np.ndarray, patch: int,
                min_clear: float) -> np.ndarray:
    """:func:`new_water` on one block: ``wet`` / ``valid`` (T, H, W) bool over the block's looks; for each date
    scored, its look ``at[k]`` and reference looks ``[lo[k], min(hi[k], at[k]))``. Returns (len(at), H/p, W/p)."""
    _, H, W = valid.shape
    h, w = H // patch, W // patch
    zero = np.zeros((1, H, W), np.int16)
    seen = np.concatenate([zero, np.cumsum(valid, 0, np.int16)])  # looks before each index (int16: 32,767 dates)
    was = np.concatenate([zero, np.cumsum(wet, 0, np.int16)])

    def per_patch(a: np.ndarray) -> np.ndarray:
        return a.reshape(h, patch, w, patch).sum(axis=(1, 3))

    out = np.full((len(at), h, w), np.nan, np.float32)
    for k, j in enumerate(at):
        a, b = max(int(lo[k]), 0), min(max(int(hi[k]), 0), int(j))  # the window ends before the look itself
        clear = valid[j]
        ref = clear & (seen[b] - seen[a] > 0)
        new = ref & wet[j] & (was[b] - was[a] == 0)
        n_clear, n_ref, n_new = per_patch(clear), per_patch(ref), per_patch(new)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = n_new / n_ref
        ok = (n_clear >= min_clear * patch * patch) & (n_ref >= 0.5 * n_clear) & (n_ref > 0)
        out[k] = np.where(ok, frac, np.nan)
    return out


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
