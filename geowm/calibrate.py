"""A run's decoded forecasts blended with each pixel's own climatology and its last observed departure from it,
weighted by lead, fitted by a backtest.

The decoded forecast of :mod:`geowm.forecast` starts from what the patch last looked like (and a year
before) and adds the change the model expects. The further ahead, the less that extrapolation knows
and the more what the place usually looks like on that day of year is worth: operational forecasts
lean on climatology at long leads for the same reason. What is left of the present a month ahead is
mostly how far the place was from its usual state when last seen, fading with time (damped anomaly
persistence). So a run may carry weights ``[c0, c1, b]`` per variable and the forecast becomes

    a(lead) x model + (1 - a(lead)) x climatology + b x exp(-days since the last clear observation / 30)
                                                      x (that observation - its climatology)

with ``a(lead) = clip(c0 + c1 lead / 30, 0, 1)`` (:func:`geowm.probes.blend`; ``c1 <= 0``: what the initial
state tells can only fade with lead; ``b >= 0``), per pixel, band and NDVI (:func:`reference`). The
climatology is the pixel's mean clear value within 15 days (else 30) of the day of year, over the cube's
dates on or before the init (the ``climatology`` baseline's rule, :func:`geowm.baselines.doy_climatology`,
without its whole-year fallback); the departure is that of the pixel's last clear observation within 90
days of the init from its climatology made of the dates before it (0 where none). Pixels without a
climatology keep the model's forecast. The blend is affine with ``a >= 0``, so it maps the ensemble's
quantiles exactly. Weights of two values (older runs) have ``b = 0``.

:func:`fit_calibration` fits the weights by least squares (:func:`fit_weights`) on a backtest inside the
run's training period (inits with a year of history before them, valid dates on or before
``train_until``), so no held-out date is seen, and keeps the blend only where it beats the model alone
there. It writes ``calibration.json`` in the run: the weights, the backtest's RMSE by lead of the model,
the climatology, the climatology with the departure alone and the blend, and why not, when no blend is
kept. The training period flatters the model (it has seen those dates), so ``geowm calibrate --from DATE``
refits on observations the model was not trained on, and ``geowm evaluate`` fits its own blend on the first
days of the held-out period and scores after them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from geowm.atomic import atomic_write_text
from geowm.baselines import doy_climatology

CALIBRATION = "calibration.json"
CLIM_WINDOWS = (15.0, 30.0)  # days either side of the valid day of year: the climatology baseline's first two
ANOMALY_DAYS = 30.0  # e-folding time of a pixel's last observed departure from its climatology
ANOMALY_LOOKBACK = 90.0  # days before the init searched for that last clear observation (3 e-foldings)
HISTORY_DAYS = 365  # a backtest init needs this much cube before it (a year-ago season for the climatology)


@dataclass
class Reference:
    """What a pixel's history says about its valid times, without the model (:func:`reference`): the
    climatology, and the pixel's last observed departure from its climatology, damped with the time since.
    Bands (C, K, H, W) in the order asked, NDVI (K, H, W) or None."""

    clim_bands: np.ndarray  # NaN where no clear date is within CLIM_WINDOWS[-1] days of the day of year
    clim_ndvi: np.ndarray | None
    anom_bands: np.ndarray  # 0 where no clear date within ANOMALY_LOOKBACK days of the init has a climatology
    anom_ndvi: np.ndarray | None


def _damped_departure(at: pd.DatetimeIndex, values: np.ndarray, init: pd.Timestamp,
                      targets: pd.DatetimeIndex) -> np.ndarray:
    """``exp(-(target - t_last) / ANOMALY_DAYS) x (v_last - climatology(t_last))`` per column of ``values`` (T, P;
    NaN where not clear, dated ``at``, all on or before ``init``): (K, P), where ``t_last`` is the column's last
    clear date within ``ANOMALY_LOOKBACK`` days of ``init`` and its climatology is made of the dates before it;
    0 where there is no such date or no climatology at it."""
    out = np.zeros((len(targets), values.shape[1]))
    recent = np.flatnonzero(at >= init - pd.Timedelta(days=ANOMALY_LOOKBACK))
    if len(recent) == 0:
        return out
    clear = np.isfinite(values[recent])
    has = clear.any(axis=0)
    last = recent[len(recent) - 1 - np.argmax(clear[::-1], axis=0)]  # the column's last clear date (if any)
    for li in np.unique(last[has]):
        cols = np.flatnonzero(has & (last == li))
        if li == 0:
            continue  # nothing before it to make a climatology of
        clim = doy_climatology(at[:li], values[:li, cols], at[li:li + 1], CLIM_WINDOWS)[0]
        dep = values[li, cols] - clim
        age = np.asarray((targets - at[li]) / pd.Timedelta(days=1), np.float64)  # K, days since it
        out[:, cols] = np.where(np.isfinite(dep), np.exp(-age / ANOMALY_DAYS)[:, None] * dep[None], 0.0)
    return out


def reference(ds: xr.Dataset, init, valid_times: np.ndarray, bands: Sequence[str],
              with_ndvi: bool = True) -> Reference | None:
    """The climatology and the damped last departure of every pixel of ``ds`` (a cube region, lazy) at
    ``valid_times`` (K,), from its clear dates on or before ``init``; NDVI from the red and NIR bands when
    ``with_ndvi``. None when the cube has no date on or before ``init`` near any day of year needed."""
    times = pd.DatetimeIndex(ds["time"].values)
    init_t = pd.Timestamp(np.datetime64(init, "ns"))
    targets = pd.DatetimeIndex(np.asarray(valid_times, "datetime64[ns]"))
    recent = times[(times <= init_t) & (times >= init_t - pd.Timedelta(days=ANOMALY_LOOKBACK))]
    doys = np.r_[np.asarray(targets.day_of_year, float), np.asarray(recent.day_of_year, float)]  # climatologies needed
    dist = np.abs(doys[:, None] - np.asarray(times.day_of_year, float)[None])
    near = (np.minimum(dist, 365.25 - dist) <= CLIM_WINDOWS[-1]).any(axis=0)
    idx = np.flatnonzero(near & (times <= init_t))
    if len(idx) == 0:
        return None
    from geowm.baselines import ndvi

    sub = ds[["reflectance", "valid"]].isel(time=idx).sel(band=list(bands)).load()
    refl = sub["reflectance"].values.astype(np.float64)  # T C H W
    T, C, H, W = refl.shape
    clear = sub["valid"].values.astype(bool) & np.isfinite(refl).all(axis=1)
    refl = np.where(clear[:, None], refl, np.nan).reshape(T, -1)
    at = times[idx]
    K = len(targets)

    def bands_first(a: np.ndarray) -> np.ndarray:  # (K, C*H*W) -> (C, K, H, W)
        return np.moveaxis(a.reshape(K, C, H, W), 1, 0).astype(np.float32)

    clim_b = bands_first(doy_climatology(at, refl, targets, CLIM_WINDOWS))
    anom_b = bands_first(_damped_departure(at, refl, init_t, targets))
    clim_n = anom_n = None
    if with_ndvi:
        v = ndvi(sub).values.astype(np.float64).reshape(T, -1)  # NaN where not clear
        clim_n = doy_climatology(at, v, targets, CLIM_WINDOWS).reshape(K, H, W).astype(np.float32)
        anom_n = _damped_departure(at, v, init_t, targets).reshape(K, H, W).astype(np.float32)
    return Reference(clim_b, clim_n, anom_b, anom_n)


def blend_tile(ds: xr.Dataset, init, valid_times: np.ndarray, lead_days: np.ndarray, weights: dict,
               bands: Sequence[str], out_bands: np.ndarray, out_ndvi: np.ndarray | None,
               ys: slice, xs: slice) -> None:
    """Blend the forecast arrays of the region's rows ``ys`` and columns ``xs`` in place with their reference
    (:func:`reference`): ``out_bands`` (C, K, Q, H, W) with ``weights["pixels"]``, ``out_ndvi`` (K, Q, H, W) with
    ``weights["ndvi"]`` (a key that is missing is left as is). Weights ``[c0, c1, b]`` (``b``: 0 when absent):
    ``a x forecast + (1 - a) x climatology + b x damped departure`` with ``a = blend([c0, c1], lead)``."""
    from geowm.probes import blend

    ref = reference(ds.isel(y=ys, x=xs), init, valid_times, bands, out_ndvi is not None)
    if ref is None:
        return
    for key, out, c, g in (("pixels", out_bands, ref.clim_bands, ref.anom_bands),
                           ("ndvi", out_ndvi, ref.clim_ndvi, ref.anom_ndvi)):
        if key not in weights or out is None or c is None:
            continue
        w = np.asarray(weights[key], np.float32)
        a = blend(w[:2], lead_days)[:, None, None, None]  # K 1 1 1
        b = float(w[2]) if len(w) > 2 else 0.0
        view = out[..., ys, xs]  # (C,) K Q h w
        c, g = c[..., :, None, :, :], g[..., :, None, :, :]  # (C,) K 1 h w
        view[...] = np.where(np.isfinite(c) & np.isfinite(view), a * view + (1 - a) * c + b * g, view)


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
        atomic_write_text(wm.run / CALIBRATION, json.dumps(report, indent=1))
    return report


def fit_weights(e_model: np.ndarray, e_clim: np.ndarray, anom: np.ndarray, lead: np.ndarray) -> np.ndarray:
    """Blend weights ``[c0, c1, b]`` (:func:`blend_tile`) minimising the squared error of
    ``a e_model + (1 - a) e_clim + b anom`` with ``a = c0 + c1 lead / 30``, by least squares, given the model's
    and the climatology's errors (n, k), the damped departures (n, k) and the leads in days (n,). Two rules
    keep it physical: what the initial state tells can only fade with lead (a ``c1 > 0`` is refitted as 0) and
    a departure persists, it does not turn over (a ``b < 0`` is refitted as 0)."""
    d = (e_model - e_clim).astype(np.float64).ravel()
    g = np.broadcast_to((lead / 30.0)[:, None], e_model.shape).ravel()
    cols = np.stack([d, d * g, anom.astype(np.float64).ravel()], 1)
    target = -e_clim.astype(np.float64).ravel()
    active = [0, 1, 2]
    while True:
        c = np.zeros(3)
        c[active] = np.linalg.lstsq(cols[:, active], target, rcond=None)[0]
        wrong = [i for i in active if (i == 1 and c[i] > 0) or (i == 2 and c[i] < 0)]
        if not wrong:
            return c.astype(np.float32)
        active = [i for i in active if i not in wrong]


def _backtest(wm, ds: xr.Dataset, inits, leads, progress) -> dict:
    """Forecast errors of the model and the climatology, and the damped departures, on ``inits`` x ``leads`` ->
    weights and RMSE by lead of the model, the climatology, the climatology with the departure alone and the
    blend."""
    from geowm.bands import ndvi_bands
    from geowm.baselines import ndvi
    from geowm.evaluate import _match
    from geowm.forecast import TILE, forecast
    from geowm.probes import blend

    times = ds["time"].values.astype("datetime64[s]")
    rn = ndvi_bands(wm.bands, wm.common_names)
    band_idx = [list(ds["band"].values).index(b) for b in wm.bands]
    std = wm.std[:, None]
    err = {key: {"model": [], "clim": [], "anom": [], "lead": []} for key in ("pixels", "ndvi")}

    def add(key, model, clim, anom, obs, ok, ld):
        both = ok & np.isfinite(model).all(0) & np.isfinite(clim).all(0) & np.isfinite(obs).all(0)
        err[key]["model"].append((model[:, both] - obs[:, both]).T)
        err[key]["clim"].append((clim[:, both] - obs[:, both]).T)
        err[key]["anom"].append(anom[:, both].T)
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
                ref = reference(ds.isel(y=ys, x=xs), init, times[ks], wm.bands, rn is not None)  # all leads
                if ref is None:
                    continue
                for v, (j, ld, _) in enumerate(found):
                    lead_fc = fc.isel(init_time=0, lead_time=j).sel(quantile=0.5)
                    model = np.stack([lead_fc[b].values[ys, xs] for b in wm.bands])
                    add("pixels", model / std[..., None], ref.clim_bands[:, v] / std[..., None],
                        ref.anom_bands[:, v] / std[..., None], obs[v][:, ys, xs] / std[..., None], clear[v, ys, xs],
                        ld)
                    if obs_nd is not None and ref.clim_ndvi is not None and "ndvi" in fc:
                        add("ndvi", lead_fc["ndvi"].values[None, ys, xs], ref.clim_ndvi[v:v + 1],
                            ref.anom_ndvi[v:v + 1], obs_nd[None, v, ys, xs], clear[v, ys, xs], ld)
        if progress:
            progress(n + 1, len(inits))
    weights, scores = {}, {}
    rmse = lambda e: float(np.sqrt((e ** 2).mean())) if e.size else None  # noqa: E731
    for key, parts in err.items():
        if sum(len(v) for v in parts["lead"]) < 100:
            continue
        e_m, e_c, g, lead = (np.concatenate(parts[p]) for p in ("model", "clim", "anom", "lead"))
        w = fit_weights(e_m, e_c, g, lead)
        a = blend(w[:2], lead)[:, None]
        e_b = a * e_m + (1 - a) * e_c + w[2] * g
        b_alone = max(0.0, float((g * -e_c).sum() / max((g * g).sum(), 1e-12)))  # the departure without the model
        e_d = e_c + b_alone * g
        parts = {"model": e_m, "climatology": e_c, "climatology_departure": e_d, "blend": e_b}
        scores[key] = {f"{ld:g}": {**{k: rmse(e[lead == ld]) for k, e in parts.items()}, "n": int((lead == ld).sum())}
                       for ld in leads}
        scores[key]["all"] = {k: rmse(e) for k, e in parts.items()}
        scores[key]["departure_weight_alone"] = b_alone
        if rmse(e_b) < rmse(e_m):
            weights[key] = [float(v) for v in w]
    out = {"used": bool(weights), "weights": weights, "backtest": scores, "anomaly_days": ANOMALY_DAYS}
    if not weights:
        out["reason"] = "the blend did not beat the model alone on the backtest"
    return out
