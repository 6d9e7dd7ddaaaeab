"""Pixel-level NDVI forecast and anomaly-score baselines that the JEPA world model is compared against.

Every baseline works on per-pixel NDVI series ``(time, y, x)`` that are irregular in time and cloudy
(NaN where not clear), vectorised with numpy over all pixels (loops, where any, run over time only):

* :class:`Persistence`: tomorrow looks like the last clear observation;
* :class:`Climatology`: tomorrow looks like the same day of year in past years;
* :class:`DampedAnomaly`: the climatology plus the last clear departure from it, fading with time;
* :class:`Harmonic`: a CCDC-style per-pixel regression (intercept, linear trend, annual harmonics),
  with CCDC's change rule (:meth:`Harmonic.breaks`);
* :class:`Bfast`: a BFAST-monitor-style season-trend model fitted on a stable history window, with a
  MOSUM (or CUSUM) of the monitoring residuals as its score and break test.

``fit(history)`` takes NDVI up to some date; ``forecast(init_time, valid_times)`` predicts NDVI
``(valid_time, y, x)`` from the history up to ``init_time`` only; ``score(obs)`` turns new observations
into a standardised surprise ``|obs - expected| / sigma`` (dimensionless, >= 0; NaN where obs is not
clear or no expectation exists) where each observation is compared only with what was known before it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from geowm.bands import RED_NIR, common_names_of, ndvi_bands

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution -> its standard deviation
DAYS_PER_YEAR = 365.25
TimesLike = Sequence | np.ndarray | pd.DatetimeIndex | xr.DataArray
CHUNK_VALUES = 2**22  # (time x pixel) values per block where a per-pixel computation is done a block at a time


def ndvi(ds: xr.Dataset) -> xr.DataArray:
    """NDVI ``(time, y, x)`` float32, ``(NIR - red) / (NIR + red)``, from a cube Dataset.

    ``ds`` holds ``reflectance (time, band, y, x)`` (physical reflectance, NaN fill) and optionally
    ``valid (time, y, x)`` (bool clear-sky mask). NaN where not valid or not finite. Lazy if ``ds`` is.
    Raises ValueError naming the bands present if no red/NIR pair is found.
    """
    bands = [str(b) for b in ds["band"].values]
    idx = ndvi_bands(bands, common_names_of(ds))
    if idx is None:
        raise ValueError(f"NDVI needs a red and a near-infrared band (common names red and nir / nir08, or one of "
                         f"{RED_NIR}); cube has {bands}")
    pair = (bands[idx[0]], bands[idx[1]])
    refl = ds["reflectance"]
    red, nir = refl.sel(band=pair[0], drop=True), refl.sel(band=pair[1], drop=True)
    denom = nir + red
    out = (nir - red) / denom.where(denom != 0)
    ok = np.isfinite(out)
    if "valid" in ds:
        ok = ok & ds["valid"].astype(bool)
    out = out.where(ok).astype(np.float32).transpose("time", "y", "x").rename("ndvi")
    out.attrs = {"long_name": "normalised difference vegetation index", "units": "1",
                 "geowm:bands": f"({pair[1]} - {pair[0]}) / ({pair[1]} + {pair[0]})"}
    return out


def _as_times(times: TimesLike) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(np.atleast_1d(np.asarray(times, dtype="datetime64[ns]")))


def _flat(da: xr.DataArray) -> tuple[pd.DatetimeIndex, np.ndarray]:
    """(times, values (T, P) float64 with NaN where not clear) from a (time, y, x) DataArray."""
    if set(da.dims) != {"time", "y", "x"}:
        raise ValueError(f"expected NDVI with dims (time, y, x), got {da.dims}")
    da = da.transpose("time", "y", "x").sortby("time")
    vals = np.asarray(da.values, dtype=np.float64).reshape(da.sizes["time"], -1)
    return _as_times(da["time"].values), np.where(np.isfinite(vals), vals, np.nan)


def _robust_sigma(res: np.ndarray, floor: float, min_count: int = 3) -> np.ndarray:
    """Per pixel MAD * 1.4826 of residuals (T, P) (NaN ignored) -> (P,). Pixels with fewer than
    ``min_count`` residuals take the median over pixels; everything is floored at ``floor``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: handled below
        med = np.nanmedian(res, axis=0)
        sigma = MAD_TO_SIGMA * np.nanmedian(np.abs(res - med), axis=0)
        sigma[np.sum(np.isfinite(res), axis=0) < min_count] = np.nan
        fallback = np.nanmedian(sigma) if np.isfinite(sigma).any() else floor
    return np.fmax(np.where(np.isfinite(sigma), sigma, fallback), floor)


def _last_clear_index(values: np.ndarray, strict: bool) -> np.ndarray:
    """(T, P): the row of the last clear value at or before (``strict``: before) each time; -1 if none."""
    T = len(values)
    idx = np.maximum.accumulate(np.where(np.isfinite(values), np.arange(T)[:, None], -1), axis=0)
    if strict:
        idx = np.concatenate([np.full((1, values.shape[1]), -1), idx[:-1]], axis=0)
    return idx


def _last_clear_row(values: np.ndarray) -> np.ndarray:
    """(P,): the row of each column's last clear value of ``values`` (T, P); -1 if none (the last row of
    :func:`_last_clear_index`, without its (T, P) arrays)."""
    if not len(values):
        return np.full(values.shape[1], -1)
    clear = np.isfinite(values)
    return np.where(clear.any(axis=0), len(values) - 1 - np.argmax(clear[::-1], axis=0), -1)


def _last_clear(values: np.ndarray, strict: bool) -> np.ndarray:
    """(T, P): the last clear value at or before (``strict``: before) each time; NaN if none."""
    idx = _last_clear_index(values, strict)
    got = np.take_along_axis(values, np.maximum(idx, 0), axis=0)
    return np.where(idx >= 0, got, np.nan)


def doy_climatology(times: pd.DatetimeIndex, values: np.ndarray, targets: pd.DatetimeIndex,
                    windows: Sequence[float], leave_one_out: bool = False) -> np.ndarray:
    """Per pixel mean of the clear ``values`` (T, P; NaN where not clear, dated ``times``) within ``windows[0]``
    days of each target's day of year (circular), widening to the next window where that is empty: (V, P),
    NaN where every window is empty. ``leave_one_out``: the targets are ``times`` themselves, and each
    observation is left out of its own mean."""
    dist = np.abs(np.asarray(targets.day_of_year, float)[:, None] - np.asarray(times.day_of_year, float)[None])
    dist = np.minimum(dist, DAYS_PER_YEAR - dist)  # (V, T) circular day-of-year distance
    nears = [(dist <= w).astype(np.float64) for w in windows]
    out = np.full((len(targets), values.shape[1]), np.nan)
    step = max(1, CHUNK_VALUES // max(1, len(times), len(targets)))  # pixels at a time: bounded temporaries
    for c in range(0, values.shape[1], step):
        v = values[:, c:c + step]
        clear = np.isfinite(v)
        x, m = np.where(clear, v, 0.0), clear.astype(np.float64)
        o = out[:, c:c + step]
        for near in nears:
            total, count = near @ x, near @ m  # (V, p)
            if leave_one_out:
                total, count = total - x, count - m
            with np.errstate(invalid="ignore", divide="ignore"):
                o[...] = np.where(np.isnan(o) & (count > 0), total / np.where(count > 0, count, 1), o)
    return out


class Baseline:
    """A per-pixel NDVI forecaster and anomaly scorer (base class; subclasses fill ``_fit``,
    ``_predict`` and ``_expected``). NDVI is dimensionless; times are datetime64."""

    name: str = "baseline"
    uses_latest: bool = False  # forecasts from the observations up to the init (refit at each init to score it)

    def __init__(self, sigma_floor: float = 0.02) -> None:
        self.sigma_floor = sigma_floor  # NDVI units: the smallest noise level a pixel is credited with
        self._history: xr.DataArray | None = None

    def fit(self, history: xr.DataArray, scoring: bool = True) -> Baseline:
        """Fit on NDVI ``history (time, y, x)`` (NaN = not clear). Returns self.

        ``scoring=False``, for a forecaster that uses only the observations up to the init (``uses_latest``:
        refitted at every init to forecast from it), keeps the history without the statistics that :meth:`score`
        needs (noise levels, departures): :meth:`forecast` is the same, at a fraction of the memory."""
        self._times, self._values = _flat(history)
        self._history = history.transpose("time", "y", "x")
        self._shape = (history.sizes["y"], history.sizes["x"])
        self._scoring = scoring or not self.uses_latest
        if self._scoring:
            self._fit()
        return self

    def forecast(self, init_time: str | np.datetime64 | pd.Timestamp, valid_times: TimesLike) -> xr.DataArray:
        """NDVI ``(valid_time, y, x)`` float32 predicted from the history at times <= ``init_time`` only."""
        self._check_fitted()
        init, targets = pd.Timestamp(init_time).as_unit("ns"), _as_times(valid_times)
        keep = np.asarray(self._times <= init)
        pred = self._predict(self._times[keep], self._values[keep], targets)
        out = self._wrap(pred, "valid_time", targets, "NDVI forecast")
        return out.assign_coords(init_time=init.to_datetime64(), lead_time=("valid_time", (targets - init).values))

    def score(self, obs: xr.DataArray) -> xr.DataArray:
        """Anomaly score ``(time, y, x)`` float32 of new NDVI observations ``obs`` (NaN = not clear):
        ``|obs - expected| / sigma`` >= 0, NaN where obs is NaN or nothing is expected there."""
        self._check_fitted(scoring=True)
        times, vals = _flat(obs)
        expected, sigma = self._expected(times, vals)
        out = np.abs(vals - expected) / sigma
        return self._wrap(out, "time", times, "anomaly score (standardised surprise)", units="1")

    def _check_fitted(self, scoring: bool = False) -> None:
        if self._history is None:
            raise RuntimeError(f"{type(self).__name__}: call fit(history) first")
        if scoring and not self._scoring:
            raise RuntimeError(f"{type(self).__name__}: fitted with scoring=False, for forecasts only; "
                               "fit(history) to score")

    def _wrap(self, arr: np.ndarray, dim: str, times: pd.DatetimeIndex, long_name: str,
              units: str | None = None) -> xr.DataArray:
        h = self._history
        coords = {k: c for k, c in h.coords.items() if k != "spatial_ref" and set(c.dims) <= {"y", "x"} and c.dims}
        attrs = {**h.attrs, "long_name": long_name, "geowm:baseline": self.name}
        if units:
            attrs["units"] = units
        return xr.DataArray(arr.reshape(len(times), *self._shape).astype(np.float32), dims=(dim, "y", "x"),
                            coords={dim: times.values, **coords}, attrs=attrs, name=f"{self.name}_{dim}")

    def _fit(self) -> None:
        raise NotImplementedError

    def _predict(self, times: pd.DatetimeIndex, values: np.ndarray, targets: pd.DatetimeIndex) -> np.ndarray:
        """From history (T, P) predict (V, P) at ``targets``."""
        raise NotImplementedError

    def _expected(self, times: pd.DatetimeIndex, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For observations (T, P): expected values (T, P) and noise sigma (P,) or (T, P)."""
        raise NotImplementedError


class Persistence(Baseline):
    """Forecast = the last clear observation up to init. Score = |obs - previous clear value| / robust
    sigma (MAD * 1.4826, floored) of clear-to-clear differences in the history."""

    name = "persistence"
    uses_latest = True

    def _fit(self) -> None:
        self.sigma_ = _robust_sigma(self._values - _last_clear(self._values, strict=True), self.sigma_floor)

    def _predict(self, times, values, targets):
        row = _last_clear_row(values)
        last = values[np.maximum(row, 0), np.arange(values.shape[1])] if len(values) else np.zeros(values.shape[1])
        return np.broadcast_to(np.where(row >= 0, last, np.nan), (len(targets), values.shape[1]))

    def _expected(self, times, values):
        before = np.asarray(self._times < times[0]) if len(times) else np.zeros(len(self._times), bool)
        series = np.concatenate([self._values[before], values], axis=0)  # previous obs of obs count too
        return _last_clear(series, strict=True)[before.sum():], self.sigma_


class Climatology(Baseline):
    """Forecast = per pixel mean of clear history observations within ``half_window`` days of the
    target's day of year (circular), widening to ``fallback_windows`` and then to the pixel mean when
    empty. Score = |obs - climatology| / robust sigma of leave-one-out history residuals."""

    name = "climatology"

    def __init__(self, half_window: float = 15.0, fallback_windows: Sequence[float] = (30.0, 60.0),
                 sigma_floor: float = 0.02) -> None:
        super().__init__(sigma_floor)
        self.windows = (half_window, *fallback_windows, DAYS_PER_YEAR)  # the last one takes every date

    def _clim(self, times, values, targets, leave_one_out: bool = False) -> np.ndarray:
        return doy_climatology(times, values, targets, self.windows, leave_one_out)

    def _fit(self) -> None:
        res = self._values - self._clim(self._times, self._values, self._times, leave_one_out=True)
        self.sigma_ = _robust_sigma(res, self.sigma_floor)

    def _predict(self, times, values, targets):
        return self._clim(times, values, targets)

    def _expected(self, times, values):
        return self._clim(self._times, self._values, times), self.sigma_


class DampedAnomaly(Climatology):
    """Damped anomaly persistence: forecast = climatology + the pixel's last clear departure from its
    climatology, damped by ``exp(-days since that observation / e_folding_days)`` (the departure's own date
    left out of its climatology). What persists of the present fades towards what the place usually looks like
    on that day of year. Score = |obs - that forecast made from the previous clear observation| / robust sigma
    of the same residuals in the history."""

    name = "damped_anomaly"
    uses_latest = True  # its forecast needs every observation up to the init

    def __init__(self, e_folding_days: float = 30.0, half_window: float = 15.0,
                 fallback_windows: Sequence[float] = (30.0, 60.0), sigma_floor: float = 0.02) -> None:
        super().__init__(half_window, fallback_windows, sigma_floor)
        self.e_folding_days = e_folding_days

    def _damped(self, times: pd.DatetimeIndex, departure: np.ndarray, last: np.ndarray,
                targets: pd.DatetimeIndex) -> np.ndarray:
        """(V, P): ``departure`` (T, P) at row ``last`` (V, P; -1: none) damped to each target (0 where none)."""
        got = np.take_along_axis(departure, np.maximum(last, 0), axis=0)
        return self._fade(got, np.asarray(times.asi8, np.float64)[np.maximum(last, 0)], last >= 0, targets)

    def _fade(self, departure: np.ndarray, at: np.ndarray, has: np.ndarray, targets: pd.DatetimeIndex) -> np.ndarray:
        """(V, P): ``departure`` (V or 1, P), observed at ``at`` (ns, same shape), damped to each target; 0 where
        not ``has`` or not finite."""
        age = np.asarray(targets.asi8, np.float64)[:, None] - at
        return np.where(has & np.isfinite(departure), np.exp(-age / 86400e9 / self.e_folding_days) * departure, 0.0)

    def _fit(self) -> None:
        clim = self._clim(self._times, self._values, self._times, leave_one_out=True)
        self.departure_ = self._values - clim  # (T, P), each observation against the others
        last = _last_clear_index(self._values, strict=True)
        res = self._values - (clim + self._damped(self._times, self.departure_, last, self._times))
        self.sigma_ = _robust_sigma(res, self.sigma_floor)

    def _predict(self, times, values, targets):
        T, P = values.shape
        if T == 0:
            return np.full((len(targets), P), np.nan)
        last = _last_clear_row(values)  # (P,)
        departure = np.full(P, np.nan)  # each pixel's, at its last clear date
        for li in np.unique(last[last >= 0]):  # the last clear date of each pixel against its other dates
            cols = np.flatnonzero(last == li)
            others = values[:, cols].copy()
            others[li] = np.nan
            departure[cols] = values[li, cols] - self._clim(times, others, times[li:li + 1])[0]
        at = np.asarray(times.asi8, np.float64)[np.maximum(last, 0)]
        return self._clim(times, values, targets) + self._fade(departure[None], at[None], last >= 0, targets)

    def _expected(self, times, values):
        before = np.asarray(self._times < times[0]) if len(times) else np.zeros(len(self._times), bool)
        all_times = self._times[before].append(times)
        new_dep = values - self._clim(self._times, self._values, times)
        departure = np.concatenate([self.departure_[before], new_dep], axis=0)
        last = _last_clear_index(np.concatenate([self._values[before], values], axis=0), strict=True)
        n = int(before.sum())
        return self._clim(self._times, self._values, times) + self._damped(all_times, departure, last[n:],
                                                                           times), self.sigma_


class Harmonic(Baseline):
    """CCDC-style per pixel ordinary least squares: intercept + linear trend (per year) + ``n_harmonics``
    annual sin/cos pairs, fitted on the clear history. A pixel needs ``obs_per_term`` clear observations
    per coefficient and a year of record for a harmonic model; else it falls back to fewer harmonics, then
    to its mean (>= ``obs_per_term`` obs), else NaN. Score = |residual| / the fit's RMSE (floored)."""

    name = "harmonic"

    def __init__(self, n_harmonics: int = 2, obs_per_term: int = 3, min_span_years: float = 1.0,
                 sigma_floor: float = 0.02) -> None:
        if not 1 <= n_harmonics <= 3:
            raise ValueError(f"n_harmonics must be 1..3, got {n_harmonics}")
        super().__init__(sigma_floor)
        self.n_harmonics, self.obs_per_term, self.min_span_years = n_harmonics, obs_per_term, min_span_years

    def _design(self, times: pd.DatetimeIndex) -> np.ndarray:
        """(T, 2 + 2 n) columns: 1, years since the first history date, sin/cos(2 pi k years)."""
        t = np.asarray((times - self._times[0]) / pd.Timedelta(days=1), float) / DAYS_PER_YEAR
        cols = [np.ones_like(t), t]
        for k in range(1, self.n_harmonics + 1):
            cols += [np.sin(2 * np.pi * k * t), np.cos(2 * np.pi * k * t)]
        return np.stack(cols, axis=1)

    def _ols(self, times, values) -> tuple[np.ndarray, np.ndarray]:
        """Batched least squares -> coefficients (P, 2 + 2 n) (unused terms 0, NaN if no model), n terms (P,)."""
        X, clear = self._design(times), np.isfinite(values)
        m, y = clear.astype(np.float64), np.where(clear, values, 0.0)
        A = np.einsum("tp,ti,tj->pij", m, X, X, optimize=True)  # (P, k, k) normal equations per pixel
        b = np.einsum("tp,ti->pi", m * y, X, optimize=True)
        n = m.sum(axis=0)
        t = X[:, 1][:, None]
        span = np.where(clear, t, -np.inf).max(axis=0) - np.where(clear, t, np.inf).min(axis=0)
        beta, nterms = np.full(b.shape, np.nan), np.zeros(len(n), int)
        for k in [2 + 2 * h for h in range(self.n_harmonics, 0, -1)] + [1]:
            sel = (nterms == 0) & (n >= self.obs_per_term * k) & ((span >= self.min_span_years) | (k == 1))
            if sel.any():
                Ak = A[sel][:, :k, :k] + 1e-9 * np.eye(k)  # a whisker of ridge keeps solve() from failing
                beta[sel] = 0.0
                beta[sel, :k] = np.linalg.solve(Ak, b[sel, :k, None])[..., 0]
                nterms[sel] = k
        return beta, nterms

    def _model(self, beta: np.ndarray, targets: pd.DatetimeIndex) -> np.ndarray:
        return self._design(targets) @ beta.T  # (V, P)

    def _fit(self) -> None:
        self.coef_, self.n_terms_ = self._ols(self._times, self._values)
        res = self._values - self._model(self.coef_, self._times)
        dof = np.maximum(np.isfinite(res).sum(axis=0) - self.n_terms_, 1)
        rmse = np.sqrt(np.nansum(res**2, axis=0) / dof)
        self.rmse_ = np.fmax(np.where(self.n_terms_ > 0, rmse, np.nan), self.sigma_floor)

    def _predict(self, times, values, targets):
        beta, _ = self._ols(times, values) if len(times) < len(self._times) else (self.coef_, None)
        return self._model(beta, targets)

    def _expected(self, times, values):
        return self._model(self.coef_, times), self.rmse_

    break_k, break_consecutive = 3.0, 2  # the change rule's defaults (breaks; alert rules in geowm.evaluate)

    def breaks(self, obs: xr.DataArray, k: float | None = None, consecutive: int | None = None) -> xr.DataArray:
        """CCDC change rule on new observations ``obs (time, y, x)`` NDVI: True (bool, same dims) at the
        clear observation that confirms a run of ``consecutive`` (default ``break_consecutive``) consecutive
        clear observations whose score (|residual| / RMSE) exceeds ``k`` (default ``break_k``). Cloudy
        observations neither extend nor break a run."""
        k = self.break_k if k is None else k
        consecutive = self.break_consecutive if consecutive is None else consecutive
        z = self.score(obs).values.reshape(obs.sizes["time"], -1)
        clear = np.isfinite(z)
        run, out = np.zeros(z.shape[1], int), np.zeros(z.shape, bool)
        for i in range(len(z)):  # a loop over time; all pixels at once
            run = np.where(clear[i], np.where(z[i] > k, run + 1, 0), run)
            out[i] = clear[i] & (run == consecutive)
        times = _as_times(obs.sortby("time")["time"].values)
        da = self._wrap(out, "time", times, f"break: {consecutive} consecutive clear obs beyond {k} sigma")
        return da.astype(bool).rename(f"{self.name}_breaks")


class Bfast(Harmonic):
    """BFAST-monitor-style (Verbesselt et al. 2012): a season-trend model (intercept, linear trend, ``n_harmonics``
    annual harmonics; BFAST's default order 3) fitted per pixel by OLS on the history window (the last
    ``history_years`` of the history; all of it when None), then a moving sum of the residuals of the
    monitoring observations.

    Score of a clear observation = ``|MOSUM| = |sum of the last h clear residuals| / (sigma sqrt(h))``: the
    residuals of the newest ``h`` clear observations (this one and those before it; at the start of monitoring
    the window reaches back into the history), with ``h = max(min_h, round(h_frac * n))`` for a pixel with
    ``n`` clear history observations (BFAST's h = 0.25) and ``sigma`` the history fit's RMSE. Under a stable
    season-trend model it is |N(0, 1)|; an abrupt break pushes it up for as long as the window holds
    post-break residuals. ``process="cusum"`` takes every monitoring residual so far instead
    (``|sum| / (sigma sqrt(n_monitoring))``). :meth:`breaks` (inherited) flags 2 consecutive clear
    observations beyond 4: the moving sum is smooth and autocorrelated, and the extrapolated season-trend
    model drifts over a long monitoring period, so its boundary sits above CCDC's single-residual 3 (as
    BFAST's boundary rises with monitoring time).
    """

    name = "bfast"
    break_k = 4.0

    def __init__(self, n_harmonics: int = 3, history_years: float | None = None, h_frac: float = 0.25,
                 min_h: int = 3, process: str = "mosum", obs_per_term: int = 3, min_span_years: float = 1.0,
                 sigma_floor: float = 0.02) -> None:
        if process not in ("mosum", "cusum"):
            raise ValueError(f"process must be 'mosum' or 'cusum', got {process!r}")
        if not 0.0 < h_frac <= 1.0:
            raise ValueError(f"h_frac must be in (0, 1], got {h_frac}")
        super().__init__(n_harmonics, obs_per_term, min_span_years, sigma_floor)
        self.history_years, self.h_frac, self.min_h, self.process = history_years, h_frac, int(min_h), process

    def _fit(self) -> None:
        if self.history_years is not None and len(self._times):
            keep = np.asarray(self._times >= self._times[-1] - pd.Timedelta(days=self.history_years * DAYS_PER_YEAR))
            self._times, self._values = self._times[keep], self._values[keep]
        super()._fit()
        self.residuals_ = self._values - self._model(self.coef_, self._times)  # (T, P), NaN where not clear
        n = np.isfinite(self.residuals_).sum(axis=0)
        self.h_ = np.maximum(self.min_h, np.rint(self.h_frac * n)).astype(np.int64)

    def score(self, obs: xr.DataArray) -> xr.DataArray:
        """|MOSUM| (or |CUSUM|) of each clear observation of ``obs`` (time, y, x) NDVI; NaN where not clear."""
        self._check_fitted(scoring=True)
        times, vals = _flat(obs)
        res = vals - self._model(self.coef_, times)
        P = res.shape[1]
        out = np.full(res.shape, np.nan)
        sigma = self.rmse_
        if self.process == "cusum":
            total, count = np.zeros(P), np.zeros(P)
            for t in range(len(res)):  # a loop over time; all pixels at once
                ok = np.isfinite(res[t])
                total[ok] += res[t, ok]
                count[ok] += 1
                out[t, ok] = total[ok] / (sigma[ok] * np.sqrt(count[ok]))
        else:
            h = self.h_
            buf = np.zeros((int(h.max()), P), np.float32)  # ring buffer of each pixel's last h clear residuals
            count = np.zeros(P, np.int64)
            cols = np.arange(P)

            def push(r: np.ndarray) -> np.ndarray:
                ok = np.isfinite(r) & (self.n_terms_ > 0)
                buf[(count % h)[ok], cols[ok]] = r[ok]
                count[ok] += 1
                return ok

            for r in self.residuals_:
                push(r)
            for t in range(len(res)):
                ok = push(res[t])
                n = np.minimum(count[ok], h[ok])
                out[t, ok] = buf[:, ok].sum(axis=0) / (sigma[ok] * np.sqrt(n))
        return self._wrap(np.abs(out), "time", times, f"anomaly score (|{self.process.upper()}| of residuals)",
                          units="1")


BASELINES: dict[str, type[Baseline]] = {"persistence": Persistence, "climatology": Climatology,
                                        "damped_anomaly": DampedAnomaly, "harmonic": Harmonic, "bfast": Bfast}
