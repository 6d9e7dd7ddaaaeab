"""Latent forecasts of every patch of a region, decoded to bands and NDVI, with an ensemble spread.

``forecast(cube, model, init=..., leads=...)`` returns the forecast dataset of DESIGN.md for one
init (in memory); :mod:`geowm.forecast_store` appends it to a Zarr store.

How one forecast is made. The region is cut into blocks of the training window size (64 px for the
presets). For each block, the context is the last ``frames - 1`` acquisitions on or before the init
that are at least ``min_frame_clear`` clear there (the training window rule; for models whose tokens span
``t_frames`` acquisitions, the oldest are left out to whole tokens); the predictor then
makes one direct prediction per valid time (no rollout). The ensemble: member 0 uses the whole
context, the others drop a random quarter of its dates, so p10/p50/p90 and the latent spread show how
much the forecast depends on which scenes were seen. Tiles of ``TILE`` px are read and forecast one at a time,
on CUDA several at once (:func:`map_tiles`), so the GPU is fed while the CPU reads and decodes other tiles.

Decoding ("delta" mode, the default): a pixel's forecast is its last clear observed value plus the
*change* from the last observed latent of its patch to the forecast latent, read by the run's change
decoder (a probe fitted on the predictor's own outputs, :mod:`geowm.probes`; for runs without one, the
difference of the two decoded latents), so the probe's per-place bias cancels. Pixels without a clear observation
on their patch's last observed date take the decoded forecast as is ("absolute" mode everywhere).
With a seasonal memory and a year-ago change decoder in the run, each pixel also has a year-ago forecast: the
mean, over the patch's latents within the tolerance of a year before the valid time that are clear at the
pixel, of its observation on that date plus the decoded change since then; the two are blended with the run's
lead-dependent weight (:func:`geowm.probes.blend`), so at long leads the forecast leans on what the place did
a year ago and on how the model expects this year to differ.

Last, where the run has a climatology blend (``calibration.json``, :mod:`geowm.calibrate`), every decoded band
and NDVI is blended with the pixel's day-of-year climatology by the run's lead-dependent weight, plus the
pixel's last observed departure from its climatology, damped with the days since it; the latents are left as
forecast.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from geowm.data import day_of_year, seasonal_index
from geowm.inference import WorldModel

QUANTILES = (0.1, 0.5, 0.9)
LOOKBACK_DAYS = 365  # how far before the init a block's recent context may reach (its seasonal memory: a year more)


class ForecastError(ValueError):
    """A forecast cannot be made as asked; the message names the input and the problem."""


@dataclass
class Block:
    """A block of the region (pixel offsets relative to the region) and its context dates (cube indexes)."""

    y0: int
    x0: int
    h: int
    w: int
    t_index: np.ndarray


def _as_dataset(cube) -> tuple[xr.Dataset, str]:
    if isinstance(cube, xr.Dataset):
        return cube, str(cube.attrs.get("geowm:cube", "<dataset>"))
    from geowm.cube.store import open_cube

    ds = open_cube(cube)
    ds.attrs["geowm:cube"] = str(cube)
    return ds, str(cube)


def region(ds: xr.Dataset, bbox: Sequence[float] | None, patch: int) -> xr.Dataset:
    """The cube cropped to ``bbox`` (minx, miny, maxx, maxy in the cube CRS) and to whole patches."""
    if bbox is not None:
        minx, miny, maxx, maxy = map(float, bbox)
        if not (minx < maxx and miny < maxy):
            raise ForecastError(f"bbox {tuple(bbox)}: need minx < maxx and miny < maxy")
        x, y = ds["x"].values, ds["y"].values
        xs, ys = np.flatnonzero((x >= minx) & (x <= maxx)), np.flatnonzero((y >= miny) & (y <= maxy))
        if len(xs) == 0 or len(ys) == 0:
            raise ForecastError(f"bbox {tuple(bbox)} does not overlap the cube (x {x.min():.1f}..{x.max():.1f}, "
                                f"y {y.min():.1f}..{y.max():.1f})")
        ds = ds.isel(y=slice(ys.min(), ys.max() + 1), x=slice(xs.min(), xs.max() + 1))
    ny, nx = ds.sizes["y"] // patch * patch, ds.sizes["x"] // patch * patch
    if ny == 0 or nx == 0:
        raise ForecastError(f"region of {ds.sizes['y']} x {ds.sizes['x']} px is smaller than one {patch} px patch")
    return ds.isel(y=slice(0, ny), x=slice(0, nx))


def block_grid(H: int, W: int, wm: WorldModel) -> tuple[int, int, list[tuple[int, int]]]:
    """Window-sized blocks covering an H x W px region: (block height, block width, top-left corners);
    the last block of a row or column sits flush with the edge (it may overlap its neighbour)."""
    win, p = wm.window, wm.cfg.patch
    bh, bw = min(win.size, H) // p * p, min(win.size, W) // p * p
    starts = lambda n, b: sorted({*range(0, n - b + 1, b), n - b})  # noqa: E731
    return bh, bw, [(y0, x0) for y0 in starts(H, bh) for x0 in starts(W, bw)]


def lookback_days(wm: WorldModel) -> float:
    """How far before an init a context may reach: the recent look-back, or the seasonal memory's year."""
    if not wm.window.seasonal_frames:
        return LOOKBACK_DAYS
    lag, tol, _ = wm.cfg.seasonal
    return max(LOOKBACK_DAYS, lag + tol + 1)


def whole_tubelets(index: np.ndarray, tf: int, extra: int = 0) -> np.ndarray:
    """``index`` (acquisitions, oldest first) without its oldest entries, so that it and ``extra`` acquisitions
    after it make whole tubelets: the encoder takes tokens of ``tf`` (``t_frames``) acquisitions each."""
    return index[(len(index) + extra) % tf:]


def recent_index(clear: np.ndarray, times: np.ndarray, init: np.datetime64, wm: WorldModel,
                 extra: int = 0) -> np.ndarray:
    """Cube indexes of the last ``frames - 1`` clear acquisitions (``clear`` (T,) bool, at ``times``) on or before
    ``init`` within the look-back (the training window rule), the oldest dropped so that they and ``extra``
    acquisitions after them make whole tubelets (:func:`whole_tubelets`)."""
    init = np.datetime64(init, "s")
    ok = np.flatnonzero(clear & (times <= init))
    recent = ok[times[ok] >= init - np.timedelta64(LOOKBACK_DAYS, "D")][-(wm.window.frames - 1):]
    return whole_tubelets(recent, wm.cfg.t_frames, extra)


def context_index(clear: np.ndarray, times: np.ndarray, init: np.datetime64, until: np.datetime64,
                  wm: WorldModel) -> np.ndarray:
    """Cube indexes of a block's context for forecasting from ``init`` up to ``until``: its recent clear
    acquisitions (:func:`recent_index`), preceded by the window's seasonal memory
    (:func:`geowm.data.seasonal_index`; whole tubelets too)."""
    win = wm.window
    init, until = np.datetime64(init, "s"), np.datetime64(until, "s")
    recent = recent_index(clear, times, init, wm)
    if not win.seasonal_frames or len(recent) == 0:
        return recent
    ok = np.flatnonzero(clear & (times <= init))
    day = (times - times[0]).astype("timedelta64[s]").astype(np.float64) / 86400.0
    at = lambda t: float((t - times[0]).astype("timedelta64[s]").astype(np.float64)) / 86400.0  # noqa: E731
    seas = seasonal_index(ok[ok < recent[0]], day, at(init), at(until), win.seasonal_frames, *wm.cfg.seasonal)
    return np.concatenate([seas[seas >= 0], recent])


def blocks(ds: xr.Dataset, wm: WorldModel, before: np.datetime64, until: np.datetime64 | None = None) -> list[Block]:
    """Cut the region into window-sized blocks and pick each block's context (:func:`context_index`) for
    forecasts from ``before`` up to ``until`` (default ``before``)."""
    win = wm.window
    bh, bw, corners = block_grid(ds.sizes["y"], ds.sizes["x"], wm)
    times = ds["time"].values.astype("datetime64[s]")
    end = np.datetime64(before, "s")
    until = end if until is None else np.datetime64(until, "s")
    t_cand = np.flatnonzero((times <= end) & (times >= end - np.timedelta64(int(lookback_days(wm) * 86400), "s")))
    if len(t_cand) == 0:
        return [Block(y0, x0, bh, bw, np.zeros(0, np.int64)) for y0, x0 in corners]
    valid = ds["valid"].isel(time=t_cand).values  # (T, H, W) bool
    out = []
    for y0, x0 in corners:
        clear = valid[:, y0: y0 + bh, x0: x0 + bw].mean(axis=(1, 2)) >= win.min_frame_clear
        out.append(Block(y0, x0, bh, bw, t_cand[context_index(clear, times[t_cand], end, until, wm)]))
    return out


def read_block(ds: xr.Dataset, wm: WorldModel, b: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Physical values (T, C, h, w), valid (T, h, w), dates (T,) of a block's context."""
    sub = ds.isel(time=b.t_index, y=slice(b.y0, b.y0 + b.h), x=slice(b.x0, b.x0 + b.w))
    refl = band_values(sub, wm.bands)
    return refl, sub["valid"].values.astype(bool), sub["time"].values.astype("datetime64[s]")


def model_inputs(wm: WorldModel, refl: np.ndarray, valid: np.ndarray, times: np.ndarray,
                 target_times: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Batched model inputs for windows (B, T, C, h, w) with dates (B, T) and targets (B, K)."""
    pixels, valid = wm.normalise(refl, valid)
    t0 = times[:, :1]
    to_days = lambda t: ((t - t0).astype("timedelta64[s]").astype(np.float64) / 86400.0).astype(np.float32)  # noqa: E731
    dev = wm.device
    batch = {"pixels": pixels, "valid": valid,
             "days": torch.from_numpy(to_days(times)).to(dev),
             "doy": torch.from_numpy(day_of_year(times.ravel()).reshape(times.shape)).to(dev)}
    tdoy = day_of_year(target_times.ravel()).reshape(target_times.shape)
    return batch, torch.from_numpy(to_days(target_times)).to(dev), torch.from_numpy(tdoy).to(dev)


def last_observed(lat: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patch, the latest valid latent: (B, Hp, Wp, D), its time slot (B, Hp, Wp) and whether any."""
    B, T = ok.shape[:2]
    slot = np.where(ok, np.arange(T)[None, :, None, None], -1).max(axis=1)
    has = slot >= 0
    z = np.take_along_axis(lat, np.maximum(slot, 0)[:, None, ..., None], axis=1)[:, 0]
    return z, slot, has


def _members(n: int, members: int, rng: np.random.Generator, tf: int = 1) -> list[np.ndarray]:
    """Context subsets (positions in 0..n-1) for the ensemble: all dates, then random 3/4 subsets (the number
    dropped rounded up to whole tubelets of ``tf`` acquisitions)."""
    out = [np.arange(n)]
    drop = -(-max(1, n // 4) // tf) * tf
    for _ in range(members - 1):
        keep = np.sort(rng.choice(n, n - drop, replace=False)) if n - drop >= max(2, tf) else np.arange(n)
        out.append(keep)
    return out


def member_quantiles(a: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """``np.quantile(a, qs, axis=0)`` (linear interpolation; NaN where any member is NaN), for the few members of
    an ensemble: one sort along the members instead of a partition per quantile (1.5x faster for a block's
    bands of 4 members)."""
    M = a.shape[0]
    if M == 1:
        return np.repeat(a.astype(np.result_type(a.dtype, np.float64)), len(qs), axis=0)
    s = np.sort(a, axis=0)
    out = np.empty((len(qs), *a.shape[1:]), np.result_type(a.dtype, np.float64))  # as np.quantile's
    for i, q in enumerate(qs):
        pos = q * (M - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, M - 1)
        t = np.float64(pos - lo)  # a float64 scalar: the products in float64, as np.quantile
        below, above = s[lo], s[hi]
        diff = above - below
        # numpy's lerp, so the values equal np.quantile's to the bit
        out[i] = np.where(t >= 0.5, above - diff * (1 - t), below + diff * t) if hi != lo else below
    bad = np.isnan(a).any(axis=0)
    if bad.any():
        out[:, bad] = np.nan
    return out


def _patches_to_pixels(a: np.ndarray, p: int) -> np.ndarray:
    """(..., Hp, Wp, p, p) -> (..., Hp p, Wp p)."""
    *lead, Hp, Wp, _, _ = a.shape
    return np.moveaxis(a, -3, -2).reshape(*lead, Hp * p, Wp * p)


@torch.no_grad()
def forecast(cube, model: WorldModel | str, init=None, leads: Sequence[float] = (5, 10, 20, 30),
             valid_times: Sequence | None = None, bbox: Sequence[float] | None = None, members: int = 8,
             decode: str = "delta", seed: int = 0, batch_size: int = 16, climatology: bool | dict = True,
             progress: Callable[[int, int], None] | None = None) -> xr.Dataset:
    """Forecast one init over a region; returns the forecast dataset (in memory).

    Args:
        cube: a cube path or the Dataset ``geowm.open_cube`` returns.
        model: a run directory or a loaded :class:`WorldModel`.
        init: the init time (context = observations on or before it); default the cube's last date.
        leads: lead times in days (> 0), used when ``valid_times`` is not given.
        valid_times: explicit dates to forecast (after ``init``); lead = valid time - init.
        bbox: (minx, miny, maxx, maxy) in the cube CRS; default the whole cube.
        members: ensemble size (1 = no ensemble: quantiles all equal the single forecast).
        decode: "delta" (last observation + decoded change) or "absolute" (decoded forecast latent); a
            pixel-baseline run (``geowm.model.pixel``) ignores it and forecasts the bands directly.
        climatology: blend with each pixel's climatology (and its damped last departure from it) by the run's
            weights when the run has them (``calibration.json``, :mod:`geowm.calibrate`); a dict gives the
            weights ``[c0, c1, b]`` by variable ("pixels", "ndvi") instead; False gives the model's forecast
            alone.

    Returns:
        Dataset with dims ``init_time`` (1), ``lead_time`` (K, timedelta64), ``quantile`` (0.1, 0.5,
        0.9), ``y, x`` (cube pixels), ``py, px`` (patch centres), ``latent``: one variable per band
        and ``ndvi`` (init_time, lead_time, quantile, y, x; band units as the cube, NDVI unitless),
        ``embedding`` (init_time, lead_time, py, px, latent; the latent forecast, ensemble mean,
        L2-normalised, so similarity is a dot product),
        ``latent_spread`` (init_time, lead_time, py, px; mean per-dimension std over members),
        ``n_context`` (init_time, py, px; context dates used); coord ``valid_time(init_time,
        lead_time)``. NaN where a block had fewer than 2 clear context dates.
    """
    wm = model if isinstance(model, WorldModel) else WorldModel(model)
    ds, name = _as_dataset(cube)
    if decode not in ("delta", "absolute"):
        raise ForecastError(f"decode must be 'delta' or 'absolute', got {decode!r}")
    if members < 1:
        raise ForecastError(f"members must be >= 1, got {members}")
    missing = [b for b in wm.bands if b not in ds["band"].values]
    if missing:
        raise ForecastError(f"{name}: cube lacks band(s) {missing} that model {wm.run} was trained on")
    times = ds["time"].values.astype("datetime64[s]")
    init_t = times[-1] if init is None else np.datetime64(init, "s")
    if init_t < times[0]:
        raise ForecastError(f"{name}: init {init_t} is before the cube starts ({times[0]})")
    if valid_times is not None:
        vt = np.asarray(valid_times, dtype="datetime64[s]")
        if len(vt) == 0 or (vt <= init_t).any():
            raise ForecastError(f"valid times must be after the init {init_t}: got {list(vt)}")
        lead_days = (vt - init_t).astype(np.float64) / 86400.0
    else:
        lead_days = np.asarray(leads, dtype=np.float64)
        if len(lead_days) == 0 or not np.all(np.isfinite(lead_days)) or (lead_days <= 0).any():
            raise ForecastError(f"leads must be positive numbers of days, got {list(leads)}")
        vt = init_t + (lead_days * 86400).astype("timedelta64[s]")
    order = np.argsort(lead_days, kind="stable")
    lead_days, vt = lead_days[order], vt[order]
    p, C, K = wm.cfg.patch, len(wm.bands), len(vt)
    ds = region(ds, bbox, p)
    H, W = ds.sizes["y"], ds.sizes["x"]
    Hp, Wp, D = H // p, W // p, wm.cfg.dim
    nd_rn = wm.probe_meta.get("ndvi_bands") if wm.probes is not None else None
    tile_forecast = _forecast_tile
    if wm.cfg.kind == "pixel":  # the pixel-space baseline forecasts bands directly (geowm.pixel_forecast)
        from geowm.bands import ndvi_bands
        from geowm.pixel_forecast import forecast_tile as tile_forecast

        nd_rn, decode = ndvi_bands(wm.bands, wm.common_names), "pixel"

    out_bands = np.full((C, K, len(QUANTILES), H, W), np.nan, np.float32)
    out_ndvi = np.full((K, len(QUANTILES), H, W), np.nan, np.float32)
    out_lat = np.full((K, Hp, Wp, D), np.nan, np.float32)
    out_spread = np.full((K, Hp, Wp), np.nan, np.float32)
    out_nctx = np.zeros((Hp, Wp), np.int16)
    outs = (out_bands, out_ndvi, out_lat, out_spread, out_nctx)
    back = np.flatnonzero((times <= init_t) & (times >= init_t - np.timedelta64(int(lookback_days(wm) * 86400), "s")))
    n_tiles = -(-H // TILE) * -(-W // TILE)
    weights = dict(climatology) if isinstance(climatology, dict) else wm.climatology_blend() if climatology else {}

    def work(ty: int, tx: int, sub: xr.Dataset) -> None:  # each tile writes its own part of the outputs
        tile_forecast(wm, sub, init_t, vt, members, decode, seed, batch_size, nd_rn, outs, ty, tx)
        if weights:
            from geowm.calibrate import blend_tile

            blend_tile(ds, init_t, vt, lead_days, weights, wm.bands, out_bands, out_ndvi if nd_rn else None,
                       slice(ty, ty + TILE), slice(tx, tx + TILE))

    for n, _ in enumerate(map_tiles(ds, back, work, wm, wm.bands)):
        if progress:
            progress(n + 1, n_tiles)
    out = _dataset(ds, wm, init_t, vt, lead_days, out_bands, out_ndvi if nd_rn else None, out_lat, out_spread,
                   out_nctx, name, decode, members)
    out.attrs["geowm:climatology_blend"] = json.dumps(weights, sort_keys=True)
    return out


TILE = 256  # px: a region is processed by tiles (all its dates in the look-back, in memory; map_tiles)


MAX_TILE_WORKERS = 4


def tile_workers(wm: WorldModel) -> int:
    """How many tiles :func:`map_tiles` works on at once: on CUDA one per 4 CPU cores, up to
    ``MAX_TILE_WORKERS``, so the GPU is fed while other tiles are read, prepared and decoded on the CPU (where
    a GPU run spends most of its time, ``benchmarks/results/gpu``); on the CPU one (torch's own threads use the
    cores already)."""
    if wm.device.type != "cuda":
        return 1
    return max(1, min(MAX_TILE_WORKERS, (os.cpu_count() or 1) // 4))


def _tile(ds: xr.Dataset, t_index: np.ndarray, y0: int, x0: int, bands: Sequence[str] | None = None) -> xr.Dataset:
    """The region's tile at (y0, x0), in memory, at the cube dates ``t_index``: only ``bands`` (default all) are
    kept, and only the chunks that hold them read (a cube's chunks hold all its bands: see ``geowm info``), and
    the reflectance is held as float32 (a cube's decoded values are float64: the scale factor is a JSON number),
    chunk by chunk as it is read."""
    sub = ds[["reflectance", "valid"]].isel(time=t_index, y=slice(y0, y0 + TILE), x=slice(x0, x0 + TILE))
    if bands is not None:
        sub = _with_bands(sub, bands)
    return sub.assign(reflectance=sub["reflectance"].astype(np.float32, copy=False)).load()


def _with_bands(obj, bands: Sequence[str]):
    """``obj`` (a Dataset or DataArray with a ``band`` dim) with ``bands`` in that order: itself where it already
    is (no selection, no copy)."""
    return obj if [str(b) for b in obj["band"].values] == list(bands) else obj.sel(band=list(bands))


def band_values(sub: xr.Dataset, bands: Sequence[str]) -> np.ndarray:
    """``sub``'s reflectance (T, C, H, W) as float32 with ``bands`` in that order; no copy where it already is."""
    return _with_bands(sub["reflectance"], bands).values.astype(np.float32, copy=False)


def map_tiles(ds: xr.Dataset, t_index: np.ndarray, work: Callable, wm: WorldModel,
              bands: Sequence[str] | None = None):
    """``work(y0, x0, sub)`` for every ``TILE`` px tile of the region, ``sub`` its values (``bands``; default all)
    at the cube dates ``t_index`` in memory (the reading is part of the work), :func:`tile_workers` tiles at a
    time on threads, at most twice that many ahead of the one the caller is given; yields the results in tile
    order. ``work`` runs as ``wm``'s inference does: without autograd and in its precision (``wm.autocast()``),
    both entered in the thread that runs it (both hold per thread)."""
    corners = [(y0, x0) for y0 in range(0, ds.sizes["y"], TILE) for x0 in range(0, ds.sizes["x"], TILE)]
    workers = tile_workers(wm)

    def one(y0: int, x0: int):
        sub = _tile(ds, t_index, y0, x0, bands)
        with torch.no_grad(), wm.autocast():
            return work(y0, x0, sub)

    if workers <= 1:
        for y0, x0 in corners:
            yield one(y0, x0)
        return
    with ThreadPoolExecutor(workers) as pool:
        queued = iter(corners)
        pending = deque(pool.submit(one, *yx) for yx in itertools.islice(queued, 2 * workers))
        while pending:
            result = pending.popleft().result()
            nxt = next(queued, None)
            if nxt is not None:
                pending.append(pool.submit(one, *nxt))
            yield result


def member_seed(seed: int, sub: xr.Dataset, b: Block) -> list[int]:
    """The entropy of a block's ensemble draws: ``seed`` and the bits of the block's first pixel centre in the cube
    CRS, so a place gets the same members whatever region it is forecast in (a bbox, one of ``geowm evaluate``'s
    blocks or the whole cube; offsets from the region's corner would differ)."""
    y, x = np.float64(sub["y"].values[b.y0]), np.float64(sub["x"].values[b.x0])
    return [int(seed), int(y.view(np.uint64)), int(x.view(np.uint64))]


def tile_jobs(sub: xr.Dataset, wm: WorldModel, init_t, vt: np.ndarray, members: int, seed: int):
    """A tile's blocks with at least 2 context dates (``todo``), their context data (block -> refl, valid, dates)
    and the ensemble's jobs grouped by context length (length -> [(block, member, context positions)])."""
    todo = [b for b in blocks(sub, wm, init_t, vt.max()) if len(b.t_index) >= 2]
    jobs: dict[int, list[tuple[int, int, np.ndarray]]] = {}
    for i, b in enumerate(todo):
        rng = np.random.default_rng(member_seed(seed, sub, b))
        for m, keep in enumerate(_members(len(b.t_index), members, rng, wm.cfg.t_frames)):
            jobs.setdefault(len(keep), []).append((i, m, keep))
    return todo, {i: read_block(sub, wm, b) for i, b in enumerate(todo)}, jobs


def member_batches(wm: WorldModel, data: dict, jobs: dict, vt: np.ndarray, batch_size: int):
    """Model inputs of the ensemble jobs (:func:`tile_jobs`), ``batch_size`` at a time within one context length:
    yields (jobs of the batch, batch, target days, target day of year)."""
    K = len(vt)
    for _, group in sorted(jobs.items()):
        for g0 in range(0, len(group), batch_size):
            chunk = group[g0: g0 + batch_size]
            refl = np.stack([data[i][0][keep] for i, _, keep in chunk])
            valid = np.stack([data[i][1][keep] for i, _, keep in chunk])
            tt = np.stack([data[i][2][keep] for i, _, keep in chunk])
            yield (chunk, *model_inputs(wm, refl, valid, tt, np.broadcast_to(vt, (len(chunk), K))))


def put_latents(z: np.ndarray, b: Block, outs: tuple, p: int, ty: int, tx: int) -> None:
    """Write a block's forecast vectors ``z`` (M, K, hp, wp, D) of all members into ``outs``: the L2-normalised
    ensemble mean of the unit vectors, their spread (mean per-dimension std) and the context length."""
    _, _, out_lat, out_spread, out_nctx = outs
    hp, wp = z.shape[2:4]
    py0, px0 = (ty + b.y0) // p, (tx + b.x0) // p
    unit = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-6)
    mean = unit.mean(axis=0)
    out_lat[:, py0: py0 + hp, px0: px0 + wp] = mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-6)
    out_spread[:, py0: py0 + hp, px0: px0 + wp] = unit.std(axis=0).mean(axis=-1)
    out_nctx[py0: py0 + hp, px0: px0 + wp] = len(b.t_index)


def _forecast_tile(wm, sub, init_t, vt, members, decode, seed, batch_size, nd_rn, outs, ty, tx) -> None:
    out_bands, out_ndvi = outs[:2]
    p, C, K = wm.cfg.patch, len(wm.bands), len(vt)
    todo, data, jobs = tile_jobs(sub, wm, init_t, vt, members, seed)
    preds: dict[tuple[int, int], np.ndarray] = {}
    anchors: dict[int, tuple] = {}
    for chunk, batch, tdays, tdoy in member_batches(wm, data, jobs, vt, batch_size):
        z = wm.model.predict(batch, tdays, tdoy).float().cpu().numpy()  # (B, K, hp, wp, D)
        for j, (i, m, _) in enumerate(chunk):
            preds[(i, m)] = z[j]
        full = [j for j, (_, m, _) in enumerate(chunk) if m == 0]
        if decode == "delta" and full and wm.probes is not None:  # the last observed latent per patch
            sel = {k: v[full] for k, v in batch.items()}
            lat, ok, pos = wm.model.encode(sel["pixels"], sel["valid"], sel["days"], sel["doy"])
            zo, slot, has = last_observed(lat.float().cpu().numpy(), ok.cpu().numpy())
            season = year_ago_latents(wm, lat, ok, pos, tdays[full])
            for j, jj in enumerate(full):
                anchors[chunk[jj][0]] = (zo[j], slot[j], has[j], None if season is None else
                                         tuple(a[j] for a in season))

    for i, b in enumerate(todo):
        z = np.stack([preds[(i, m)] for m in range(members)])  # (M, K, hp, wp, D)
        M, _, hp, wp, _ = z.shape
        put_latents(z, b, outs, p, ty, tx)
        if wm.probes is None:
            continue
        pix, nd = wm.decode_array(z)  # (M K hp wp, C, p, p), (M K hp wp, p, p)
        pix = _patches_to_pixels(np.moveaxis(pix.reshape(M, K, hp, wp, C, p, p), 4, 2), p)  # M K C h w
        nd = None if nd is None else _patches_to_pixels(nd.reshape(M, K, hp, wp, p, p), p)  # M K h w
        if decode == "delta":
            shape = (M, K, hp, wp, C, p)
            change = _change_pixels(wm.decode_change(z, np.broadcast_to(anchors[i][0], z.shape)), shape)
            season = anchors[i][3]
            s_change = None if season is None else [_change_pixels(
                wm.decode_change(z, np.broadcast_to(za, z.shape), anchor="season"), shape) for za in season[0]]
            pix, nd = _delta(wm, data[i], anchors[i], pix, nd, nd_rn, change, vt, s_change)
        ys, xs = slice(ty + b.y0, ty + b.y0 + b.h), slice(tx + b.x0, tx + b.x0 + b.w)
        out_bands[:, :, :, ys, xs] = np.moveaxis(member_quantiles(pix, QUANTILES), 0, 2).transpose(1, 0, 2, 3, 4)
        if nd is not None:
            out_ndvi[:, :, ys, xs] = np.moveaxis(member_quantiles(nd, QUANTILES), 0, 1)


def _change_pixels(change: tuple | None, shape: tuple) -> tuple | None:
    """A decoded change per patch (bands (N, C, p, p), NDVI (N, p, p); N = M K hp wp) at pixel resolution:
    bands (M, K, C, h, w), NDVI (M, K, h, w); ``shape`` = (M, K, hp, wp, C, p)."""
    if change is None:
        return None
    M, K, hp, wp, C, p = shape
    dpix = None if change[0] is None else \
        _patches_to_pixels(np.moveaxis(change[0].reshape(M, K, hp, wp, C, p, p), 4, 2), p)
    dnd = None if change[1] is None else _patches_to_pixels(change[1].reshape(M, K, hp, wp, p, p), p)
    return dpix, dnd


def year_ago_latents(wm: WorldModel, lat: torch.Tensor, ok: torch.Tensor, pos: torch.Tensor, tdays: torch.Tensor):
    """Per window, target and patch, the observed latents dated within ``seasonal_tol_days`` of a year
    (``seasonal_lag_days``) before the target, nearest first, up to the seasonal memory's size (the year-ago
    anchors of the run's seasonal change decoder): latents (B, A, K, hp, wp, D), their tubelet slots
    (B, A, K, hp, wp) and whether found; None without such a decoder."""
    if wm.season_blend("ndvi") is None and wm.season_blend("pixels") is None:
        return None
    from geowm.probes import year_ago_slot

    lag, tol, tf = wm.cfg.seasonal
    n_anchor = max(1, -(-wm.window.seasonal_frames // tf))
    zs, slots, found = [], [], []
    for _ in range(n_anchor):
        za, sa, fa = [], [], []
        for k in range(tdays.shape[1]):
            taken = torch.zeros_like(ok)
            for prev in slots:  # the anchors already picked for this target
                taken.scatter_(1, prev[:, k, None], True)
            slot, hit = year_ago_slot(pos[..., 0], ok & ~taken, tdays[:, k], lag, tol)
            idx = slot[:, None, :, :, None].expand(-1, 1, -1, -1, lat.shape[-1])
            za.append(torch.gather(lat.float(), 1, idx)[:, 0])
            sa.append(slot)
            fa.append(hit)
        zs.append(torch.stack(za, 1))
        slots.append(torch.stack(sa, 1))
        found.append(torch.stack(fa, 1))
    return (torch.stack(zs, 1).cpu().numpy(), torch.stack(slots, 1).cpu().numpy(),
            torch.stack(found, 1).cpu().numpy())


def _tubelet_obs(refl: np.ndarray, valid: np.ndarray, slot: np.ndarray, has: np.ndarray, p: int, tf: int):
    """Per pixel, the newest clear frame of its patch's tubelet ``slot`` (hp, wp): values (C, h, w), whether
    clear (h, w) and the frame index (h, w) in the block's context."""
    T = refl.shape[0]
    slot_px = np.repeat(np.repeat(slot, p, 0), p, 1)  # h w
    has_px = np.repeat(np.repeat(has, p, 0), p, 1)
    first = np.maximum(slot_px, 0) * tf
    t_px = first.copy()
    for off in range(1, tf):
        f = np.minimum(first + off, T - 1)
        clear = np.take_along_axis(valid, f[None], axis=0)[0] & np.isfinite(
            np.take_along_axis(refl, f[None, None], axis=0)[0]).all(axis=0)
        t_px = np.where(clear & (first + off < T), f, t_px)
    obs = np.take_along_axis(refl, t_px[None, None], axis=0)[0]  # C h w
    obs_ok = np.take_along_axis(valid, t_px[None], axis=0)[0] & has_px & np.isfinite(obs).all(axis=0)
    return obs, obs_ok, t_px


def _ndvi(obs: np.ndarray, rn) -> np.ndarray:
    red, nir = obs[rn[0]], obs[rn[1]]
    return (nir - red) / np.maximum(nir + red, 1e-6)


def _delta(wm: WorldModel, blk: tuple, anchor: tuple, pix: np.ndarray, nd: np.ndarray | None, rn,
           change: tuple | None = None, vt: np.ndarray | None = None, s_change: tuple | None = None) -> tuple:
    """Last clear observation + change since the patch's last observed latent (see module doc): the run's change
    decoder's output ``change`` (pixels M K C h w, NDVI M K h w) when it has one, else the difference of the
    decoded latents. With ``s_change`` (the year-ago decoder's change, same layout) and the valid times ``vt``,
    blended with the year-ago forecast: the pixel's observation a year before each valid time + that change,
    weighted by the run's lead-dependent blend (:func:`geowm.probes.blend`)."""
    from geowm.probes import blend

    refl, valid, times = blk
    z_obs, slot, has = anchor[:3]
    p, tf = wm.cfg.patch, wm.cfg.t_frames
    base_pix, base_nd = wm.decode_array(z_obs)  # (hp wp, C, p, p)
    hp, wp = slot.shape
    base_pix = _patches_to_pixels(np.moveaxis(base_pix.reshape(hp, wp, -1, p, p), 2, 0), p)  # C h w
    obs, obs_ok, t_px = _tubelet_obs(refl, valid, slot, has, p, tf)
    d_pix = change[0] if change is not None and change[0] is not None else pix - base_pix
    season = anchor[3] if len(anchor) > 3 and s_change is not None and vt is not None else None
    if season is not None:  # the year-ago observation of each target and the lead of the last observation
        gap = (vt[:, None, None] - times[t_px][None]).astype("timedelta64[s]").astype(np.float64) / 86400.0  # K h w
        year_ago = [[_tubelet_obs(refl, valid, sl[k], hit[k], p, tf)[:2] for k in range(len(vt))]
                    for sl, hit in zip(season[1], season[2], strict=True)]  # per anchor, per target

    def blended(key, last, part, value):  # last-observation forecast (M K ...) blended with the year-ago one
        w = wm.season_blend(key)
        if season is None or w is None or s_change is None or s_change[0][part] is None:
            return last
        a = blend(w, gap)  # K h w
        out = last.copy()
        for k in range(len(vt)):  # the year-ago forecast: mean over the anchors clear at the pixel
            total, count = np.zeros_like(last[:, k]), np.zeros(last.shape[-2:], np.float32)
            for anchor_obs, sc in zip(year_ago, s_change, strict=True):
                y_obs, y_ok = anchor_obs[k]
                total += np.where(y_ok, value(y_obs) + sc[part][:, k], 0.0)
                count += y_ok
            y_ok = count > 0
            yk = total / np.maximum(count, 1)
            both = obs_ok & y_ok
            out[:, k] = np.where(both, a[k] * last[:, k] + (1 - a[k]) * yk, np.where(y_ok & ~obs_ok, yk, last[:, k]))
        return out

    last = np.where(obs_ok, obs + d_pix, pix)
    pix = blended("pixels", last, 0, lambda o: o[None])
    if nd is not None and rn is not None:
        base_nd = _patches_to_pixels(base_nd.reshape(hp, wp, p, p), p)
        d_nd = change[1] if change is not None and change[1] is not None else nd - base_nd
        last = np.where(obs_ok, _ndvi(obs, rn) + d_nd, nd)
        nd = np.clip(blended("ndvi", last, 1, lambda o: _ndvi(o, rn)), -1, 1)
    return pix, nd


def _dataset(ds, wm, init_t, vt, lead_days, bands, ndvi, lat, spread, nctx, name, decode, members) -> xr.Dataset:
    p = wm.cfg.patch
    y, x = ds["y"].values, ds["x"].values
    lead = (lead_days * 86400 * 1e9).astype("timedelta64[ns]")
    coords = {"init_time": [init_t.astype("datetime64[ns]")], "lead_time": lead, "quantile": list(QUANTILES),
              "y": y, "x": x, "py": y.reshape(-1, p).mean(1), "px": x.reshape(-1, p).mean(1),
              "valid_time": (("init_time", "lead_time"), vt.astype("datetime64[ns]")[None])}
    dims = ("init_time", "lead_time", "quantile", "y", "x")
    data = {b: (dims, bands[c][None]) for c, b in enumerate(wm.bands)}
    if ndvi is not None:
        data["ndvi"] = (dims, ndvi[None])
    data["embedding"] = (("init_time", "lead_time", "py", "px", "latent"), lat[None])
    data["latent_spread"] = (("init_time", "lead_time", "py", "px"), spread[None])
    data["n_context"] = (("init_time", "py", "px"), nctx[None])
    out = xr.Dataset(data, coords=coords)
    if "spatial_ref" in ds.coords:
        out = out.assign_coords(spatial_ref=ds["spatial_ref"])
        for v in out.data_vars:
            if {"y", "x"} <= set(out[v].dims):
                out[v].attrs["grid_mapping"] = "spatial_ref"
    if "ndvi" in out:
        out["ndvi"].attrs.update(long_name="forecast NDVI", units="1")
    out["embedding"].attrs.update(long_name="forecast latent, ensemble mean, L2-normalised", units="1")
    out["latent_spread"].attrs.update(long_name="ensemble spread of the forecast latent (mean per-dim std)")
    out["n_context"].attrs.update(long_name="context acquisitions used")
    out.attrs.update({
        "geowm:format": "geowm-forecast/1", "geowm:model_run": str(wm.run.absolute()), "geowm:run_id": wm.run_id,
        "geowm:config_hash": wm.config_hash, "geowm:cube": name,
        "geowm:cube_snapshot": str(ds.attrs.get("geowm:snapshot", "")), "geowm:decode": decode,
        "geowm:members": int(members), "geowm:patch": int(p), "geowm:precision": wm.precision,
    })
    return out
