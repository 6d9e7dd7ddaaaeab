"""A run's decoded forecasts blended with each pixel's own climatology, weighted by lead, fitted by a backtest.

The decoded forecast of :mod:`geowm.forecast` starts from what the patch last looked like (and a year
before) and adds the change the model expects. The further ahead, the less that extrapolation knows
and the more what the place usually looks like on that day of year is worth: operational forecasts
lean on climatology at long leads for the same reason. So a run may carry a lead-dependent weight
``a(lead) = clip(c0 + c1 lead / 30, 0, 1)`` (:func:`geowm.probes.blend`; ``c1 <= 0``: what the initial
state tells can only fade with lead) and the forecast becomes

    a(lead) x model + (1 - a(lead)) x climatology

per pixel, band and NDVI, where the climatology is the pixel's mean clear value within 15 days (else
30) of the valid time's day of year, over the cube's dates on or before the init (the
``climatology`` baseline's rule, :func:`geowm.baselines.doy_climatology`, without its whole-year
fallback); pixels without one keep the model's forecast. The blend is affine with ``a >= 0``, so it
maps the ensemble's quantiles exactly.

:func:`fit_calibration` fits ``(c0, c1)`` by least squares on a backtest inside the run's training
period (inits with a year of history before them, valid dates on or before ``train_until``), so no
held-out date is seen, and keeps the blend only where it beats the model alone there. It writes
``calibration.json`` in the run: the weights, the backtest's RMSE by lead of the model, the climatology
and the blend, and why not, when no blend is kept. The training period flatters the model (it has seen
those dates), so ``geowm calibrate --from DATE`` refits on observations the model was not trained on,
and ``geowm evaluate`` fits its own blend on the first days of the held-out period and scores after them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import xarray as xr

CALIBRATION = "calibration.json"
CLIM_WINDOWS = (15.0, 30.0)  # days either side of the valid day of year: the climatology baseline's first two
HISTORY_DAYS = 365  # a backtest init needs this much cube before it (a year-ago season for the climatology)


def climatology(ds: xr.Dataset, init, valid_times: np.ndarray, bands: Sequence[str],
                with_ndvi: bool = True) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The climatology of every pixel of ``ds`` (a cube region, lazy) at ``valid_times`` (K,) from its clear
    dates on or before ``init``: band values (C, K, H, W) in the order of ``bands`` and, ``with_ndvi``, NDVI
    (K, H, W) from their red and NIR bands (else None); NaN where no clear date is within ``CLIM_WINDOWS[-1]``
    days of the day of year. None when the cube has no such date at all."""
    times = pd.DatetimeIndex(ds["time"].values)
    targets = pd.DatetimeIndex(np.asarray(valid_times, "datetime64[ns]"))
    dist = np.abs(np.asarray(targets.day_of_year, float)[:, None] - np.asarray(times.day_of_year, float)[None])
    near = (np.minimum(dist, 365.25 - dist) <= CLIM_WINDOWS[-1]).any(axis=0)
    idx = np.flatnonzero(near & (times <= pd.Timestamp(np.datetime64(init, "ns"))))
    if len(idx) == 0:
        return None
    from geowm.baselines import doy_climatology, ndvi

    sub = ds[["reflectance", "valid"]].isel(time=idx).sel(band=list(bands)).load()
    refl = sub["reflectance"].values.astype(np.float64)  # T C H W
    T, C, H, W = refl.shape
    clear = sub["valid"].values.astype(bool) & np.isfinite(refl).all(axis=1)
    refl = np.where(clear[:, None], refl, np.nan)
    at = times[idx]
    pix = doy_climatology(at, refl.reshape(T, -1), targets, CLIM_WINDOWS).reshape(len(targets), C, H, W)
    nd = None
    if with_ndvi:
        v = ndvi(sub).values.astype(np.float64)  # T H W, NaN where not clear
        nd = doy_climatology(at, v.reshape(T, -1), targets, CLIM_WINDOWS).reshape(len(targets), H, W)
    return np.moveaxis(pix, 1, 0).astype(np.float32), None if nd is None else nd.astype(np.float32)


def blend_tile(ds: xr.Dataset, init, valid_times: np.ndarray, lead_days: np.ndarray, weights: dict,
               bands: Sequence[str], out_bands: np.ndarray, out_ndvi: np.ndarray | None,
               ys: slice, xs: slice) -> None:
    """Blend the forecast arrays of the region's rows ``ys`` and columns ``xs`` in place with their climatology:
    ``out_bands`` (C, K, Q, H, W) with ``weights["pixels"]``, ``out_ndvi`` (K, Q, H, W) with ``weights["ndvi"]``
    (a key that is missing is left as is)."""
    from geowm.probes import blend

    clim = climatology(ds.isel(y=ys, x=xs), init, valid_times, bands, out_ndvi is not None)
    if clim is None:
        return
    for key, out, c in (("pixels", out_bands, clim[0]), ("ndvi", out_ndvi, clim[1])):
        if key not in weights or out is None or c is None:
            continue
        a = blend(np.asarray(weights[key], np.float32), lead_days)[:, None, None, None]  # K 1 1 1
        view = out[..., ys, xs]  # (C,) K Q h w
        c = c[..., :, None, :, :]  # (C,) K 1 h w
        view[...] = np.where(np.isfinite(c) & np.isfinite(view), a * view + (1 - a) * c, view)


def _backtest_inits(times: np.ndarray, until: np.datetime64, max_lead: float, n_inits: int,
                    every_days: float) -> list[np.datetime64]:
    """Up to ``n_inits`` cube dates, ``every_days`` apart counting back from the last one whose longest lead is
    on or before ``until``, each with ``HISTORY_DAYS`` of cube before it."""
    lead = np.timedelta64(int(max_lead * 86400), "s")
    cand = times[(times >= times[0] + np.timedelta64(HISTORY_DAYS, "D")) & (times + lead <= until)]
    picked: list[np.datetime64] = []
    for t in cand[::-1]:
        if len(picked) == n_inits:
            break
        if not picked or picked[-1] - t >= np.timedelta64(int(every_days * 86400), "s"):
            picked.append(t)
    return picked[::-1]


def fit_calibration(run, cube=None, start=None, until=None, leads: Sequence[float] = (5, 10, 20, 30),
                    n_inits: int = 6, every_days: float = 30, max_px: int = 256, write: bool = True,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Fit a run's climatology blend on a backtest; returns the report and (``write``) saves it as the run's
    ``calibration.json``.

    The backtest forecasts (one member, no blend) from up to ``n_inits`` cube dates ``every_days`` apart,
    counting back from the last one whose longest lead ends on or before ``until`` (default: the run's
    ``train_until``), from ``start`` on (default: any), each with ``HISTORY_DAYS`` of cube before it, over the
    central ``max_px`` square of ``cube`` (default: the run's cube; a path or the Dataset of a region). Each
    lead's forecast and climatology are compared with the clear observations of the acquisition within 2 days
    of its valid time; bands in units of the run's band standard deviations. The default period is the run's
    training period, where the model has seen the answers: its skill there is optimistic, mostly at long
    leads, so after training refit on observations that came later (``geowm calibrate --from``).
    ``{"used": false, "reason": ...}`` when there is no such init or the blend does not help.
    """
    from geowm.cube.store import open_cube
    from geowm.forecast import region
    from geowm.inference import WorldModel

    wm = run if isinstance(run, WorldModel) else WorldModel(run)
    data = wm.config["data"]
    if cube is None:
        ds = open_cube(data["cube"], snapshot=data.get("snapshot"))
    else:
        ds = cube if isinstance(cube, xr.Dataset) else open_cube(cube)
    H, W = ds.sizes["y"], ds.sizes["x"]
    y0, x0 = max(0, (H - max_px) // 2), max(0, (W - max_px) // 2)
    ds = region(ds.isel(y=slice(y0, y0 + max_px), x=slice(x0, x0 + max_px)), None, wm.cfg.patch)
    times = ds["time"].values.astype("datetime64[s]")
    if until is None:
        until = np.datetime64(data["train_until"], "s") if data.get("train_until") else times[-1]
    until = np.datetime64(until, "s")
    leads = sorted(float(v) for v in leads)
    inits = _backtest_inits(times, until, leads[-1], n_inits, every_days)
    if start is not None:
        inits = [t for t in inits if t >= np.datetime64(start, "s")]
    report: dict = {"used": False, "leads": leads, "inits": [str(t) for t in inits], "windows": list(CLIM_WINDOWS),
                    "period": [None if start is None else str(np.datetime64(start, "s")), str(until)]}
    if len(inits) < 2:
        report["reason"] = (f"needs 2 backtest inits with {HISTORY_DAYS} days of cube before them and "
                            f"{leads[-1]:g} days after them up to {until}; found {len(inits)}")
    else:
        report.update(_backtest(wm, ds, inits, leads, progress))
    if write:
        (wm.run / CALIBRATION).write_text(json.dumps(report, indent=1))
    return report


def _backtest(wm, ds: xr.Dataset, inits, leads, progress) -> dict:
    """Forecast errors of the model and the climatology on ``inits`` x ``leads`` -> weights and RMSE by lead."""
    from geowm.bands import ndvi_bands
    from geowm.baselines import ndvi
    from geowm.evaluate import _match
    from geowm.forecast import TILE, forecast
    from geowm.probes import blend, blend_weights

    times = ds["time"].values.astype("datetime64[s]")
    rn = ndvi_bands(wm.bands)
    band_idx = [list(ds["band"].values).index(b) for b in wm.bands]
    std = wm.std[:, None]
    err = {key: {"model": [], "clim": [], "lead": []} for key in ("pixels", "ndvi")}

    def add(key, model, clim, obs, ok, ld):
        both = ok & np.isfinite(model).all(0) & np.isfinite(clim).all(0) & np.isfinite(obs).all(0)
        err[key]["model"].append((model[:, both] - obs[:, both]).T)
        err[key]["clim"].append((clim[:, both] - obs[:, both]).T)
        err[key]["lead"].append(np.full(int(both.sum()), ld))

    for n, init in enumerate(inits):
        fc = forecast(ds, wm, init=init, leads=leads, members=1, climatology=False)
        found = [(j, ld, _match(times, init + np.timedelta64(int(ld * 86400), "s"))) for j, ld in enumerate(leads)]
        found = [(j, ld, k) for j, ld, k in found if k is not None]  # leads whose valid day has an acquisition
        if not found:
            continue
        ks = [k for _, _, k in found]
        obs = ds["reflectance"].isel(time=ks).values[:, band_idx]  # V C H W
        clear = ds["valid"].isel(time=ks).values.astype(bool)  # V H W
        obs_nd = ndvi(ds.isel(time=ks)).values if rn is not None else None  # V H W
        for ty in range(0, ds.sizes["y"], TILE):
            for tx in range(0, ds.sizes["x"], TILE):
                ys, xs = slice(ty, ty + TILE), slice(tx, tx + TILE)
                clim = climatology(ds.isel(y=ys, x=xs), init, times[ks], wm.bands, rn is not None)  # all leads
                if clim is None:
                    continue
                for v, (j, ld, _) in enumerate(found):
                    lead_fc = fc.isel(init_time=0, lead_time=j).sel(quantile=0.5)
                    model = np.stack([lead_fc[b].values[ys, xs] for b in wm.bands])
                    add("pixels", model / std[..., None], clim[0][:, v] / std[..., None],
                        obs[v][:, ys, xs] / std[..., None], clear[v, ys, xs], ld)
                    if obs_nd is not None and clim[1] is not None and "ndvi" in fc:
                        add("ndvi", lead_fc["ndvi"].values[None, ys, xs], clim[1][v:v + 1], obs_nd[None, v, ys, xs],
                            clear[v, ys, xs], ld)
        if progress:
            progress(n + 1, len(inits))
    weights, scores = {}, {}
    rmse = lambda e: float(np.sqrt((e ** 2).mean())) if e.size else None  # noqa: E731
    for key, parts in err.items():
        if sum(len(v) for v in parts["lead"]) < 100:
            continue
        e_m, e_c, lead = (np.concatenate(parts[p]) for p in ("model", "clim", "lead"))
        w = blend_weights(e_m, e_c, lead)
        if w[1] > 0:  # what the initial state tells fades with lead: a weight rising with lead is a fit to noise
            w = blend_weights(e_m, e_c, np.zeros_like(lead))  # the best constant weight (c1 = 0)
        a = blend(w, lead)[:, None]
        e_b = a * e_m + (1 - a) * e_c
        scores[key] = {f"{ld:g}": {"model": rmse(e_m[lead == ld]), "climatology": rmse(e_c[lead == ld]),
                                   "blend": rmse(e_b[lead == ld]), "n": int((lead == ld).sum())} for ld in leads}
        scores[key]["all"] = {"model": rmse(e_m), "climatology": rmse(e_c), "blend": rmse(e_b)}
        if rmse(e_b) < rmse(e_m):
            weights[key] = [float(v) for v in w]
    out = {"used": bool(weights), "weights": weights, "backtest": scores}
    if not weights:
        out["reason"] = "the blend did not beat the model alone on the backtest"
    return out
