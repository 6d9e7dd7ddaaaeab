"""Anomalies: where the satellite sees something the world model did not expect.

For every acquisition date ``t`` and every patch that is clear at ``t``:

1. **surprise** = cosine distance between the observed latent (target encoder on the window ending at
   ``t``: what was actually seen) and the model's forecast latent for ``t``, one direct prediction
   from the clear acquisitions on or before ``t - LEAD_DAYS`` (60 days; the prediction ``geowm
   forecast`` stores for an init that long before ``t``);
2. **surprise score** = the surprise (optionally minus the date's regional median, :func:`regional_residual`)
   normalised robustly against the patch's own history in the same season:
   ``(surprise - median) / (1.4826 MAD)`` over the patch's clear surprises at dates before
   ``t - 30 days`` whose day of year is within 60 days of ``t``'s (all earlier dates, then the
   whole region's history, when too few), with the MAD floored by half the region's median MAD, and
   capped where the patch was as surprising in the same season of an earlier year (recurring land use such
   as harvest and mowing, :func:`normalise`);
3. **departure** = cosine distance between the observed latent at ``t`` and the nearest of the patch's
   observed latents a year before (``t - 365 days``, +-30 days): slow change that builds up inside the
   forecast's context (drought) is no surprise at any lead, but it is far from what the patch was a year
   ago. Its **score** (:func:`departure_score`) is a robust z against the other clear patches of the same
   date, kept only where the patch's NDVI fell below last year's on the same day (interpolated between the
   clear references on each side of it; patches without one on each side are not scored: in spring, a
   reference only after the day is greener for the season alone), then the median over the 9 x 9 patches
   around it (a drought browns a landscape; a field harvested earlier than last year browns alone). The
   surprise score, too, counts vegetation loss only, in proportion to it: a positive score is scaled by the
   patch's NDVI loss against its mean over the references, in full from a loss of 0.1 (0 where the patch is
   greener, :func:`vegetation_loss_only`); a patch without a clear reference (last year's season was cloudy)
   loses vegetation only where it falls below its lowest clear NDVI within 60 days of the day a year before.
   The **persistent departure** score (:func:`persistent_departure`) is the departure's z alone (no
   neighbourhood median) where it stays high, with an NDVI loss, on 4 clear looks over 20 days or more that
   began inside the scores: one field whose crop failed moves alone and is barely a surprise, but stays apart
   for weeks, where a harvest a little off last year's date does for a look or two.
   The anomaly **score** is the largest of the surprise, departure and persistent departure scores, and of
   the **new open water** score (:mod:`geowm.water`, a spectral rule: a flood on a bare field after harvest
   is no surprise to a patch whose latent moves a lot then anyway, but no harvest puts water on it);
4. **alerts** (:mod:`geowm.alerts`): a score above the threshold starts a candidate, further clear
   observations above the confirm threshold confirm it (as forest-alert systems confirm), with its
   connected neighbours one observation short, and confirmed patches are merged into polygons.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from geowm.bands import common_names_of, ndvi_bands
from geowm.baselines import ndvi
from geowm.cube.store import date_sources
from geowm.forecast import (
    TILE,
    _as_dataset,
    band_values,
    block_grid,
    context_index,
    lookback_days,
    map_tiles,
    model_inputs,
    recent_index,
    region,
)
from geowm.inference import WorldModel
from geowm.water import new_water, new_water_score, water_bands

# each observation is compared with the forecast made this long before it. Measured on a held-out year with
# events (512 px, seed 11, tiny model, 400 steps): patch AUROC 0.34 at 10 days, 0.60 at 30, 0.79 at 60,
# 0.80 at 90: an event's new state stays surprising while the context predates it, so the lead must
# outlast the weeks an event is being confirmed and reported; past 60 days the gain is small.
LEAD_DAYS = 60.0
SEASON_DAYS = 60  # history dates within this many days of year of t form the season reference
EXCLUDE_RECENT_DAYS = 30  # the month before t is not reference (an ongoing event must not normalise itself)
MIN_REFERENCE = 6  # fewer reference values: widen to all earlier dates, then to the whole region
# Recurrence: normal land use (harvest, mowing) comes back every year at the same place and season, a
# disturbance does not. A score is capped at RECURRENCE_MARGIN above how far the surprise exceeds the largest
# surprise the patch showed in the same season a year or more before (dates >= RECURRENCE_AGE_DAYS before,
# day of year within SEASON_DAYS; needs RECURRENCE_MIN_REFERENCE of them). Measured on two held-out synthetic
# regions (tiny model, lead 60, 5 / 4 / 2 rule): alerts 66 -> 15 and 297 -> 159, share of harvest and mowing
# events hit 0.089 -> 0.015 and 0.22 -> 0.14, every event still found on the same date, patch AUROC
# 0.991 -> 0.997 and 0.987 -> 0.989; margin 0, the 0.75 quantile in place of the maximum and +-30 days did
# worse on one region or the other, and a reference from the same year let ongoing events cap themselves
# (AUROC 0.71-0.85 on the first). On a third region, not used to choose: alerts 129 -> 67, rate 0.034 -> 0.013.
# The cap looks at every earlier year the cube has, not only the normalisation's history: a harvest that clouds
# hid last year is known from the year before. On the three held-out regions (B with two years before the
# period, A and C with one and a half), with the normalisation still over one year: alerts 4 -> 3, 74 -> 16,
# 16 -> 11; precision 0.50 -> 0.67, 0.09 -> 0.44, 0.31 -> 0.45; share of harvest and mowing events hit
# 0.006 -> 0.006, 0.114 -> 0.019, 0.020 -> 0.009; patch AUROC 0.9961 -> 0.9964, 0.9887 -> 0.9918, 0.9678 ->
# 0.9689; every event still found on the same date. Normalising over the two years as well gave B 33 alerts.
RECURRENCE_AGE_DAYS = 300
RECURRENCE_MARGIN = 3.0
RECURRENCE_MIN_REFERENCE = 3
# A patch whose own season a year or more before was hidden (fewer than RECURRENCE_MIN_REFERENCE clear surprises)
# takes the same-season surprises of the RECURRENCE_NEIGHBOURHOOD x RECURRENCE_NEIGHBOURHOOD patches around it (400
# m at 80 m patches) for its cap: what the land around it did at this time of year. The demo region's autumn 2021 was
# cloudy over much of its deciduous forest, whose leaf fall the tiny model's forecast misses every year (surprise
# 0.3-0.8 in November); without a November reference of their own, those patches alerted in November 2022. Measured
# on the cached surprise of six demo-style regions (512 px, tiny, 400 steps, scored from 2022-07-01; with new open
# water): the demo 4 -> 2 alerts (precision 0.50 -> 1.0; both November forest alerts gone), patch AUROC 0.9868 ->
# 0.9879; seed 12 with crop failures 0.9134 -> 0.9181; seeds 11, 12 (before crop failures), 13 and 22 the same
# alerts and AUROC within 0.0001. Not one patch-date of an anomaly event changed its score (614 scored 5 or more);
# 58 off any event fell below 5. 3 x 3 and 9 x 9 patches: the same alerts, AUROC within 0.002.
RECURRENCE_NEIGHBOURHOOD = 5
# The alert rule geowm uses (geowm.alerts.AlertRules), from a grid on held-out synthetic data (768 px, seed 12,
# 2023): 5 / 4 / 2 confirmations kept every event that 4 / 3 / 1 found and cut the share of harvest and mowing
# events hit by an alert from 0.51 to 0.22.
# The minimum mapping unit, 1 ha (two 80 m patches at 10 m): single-patch alerts were mostly harvests (on B, 96 of
# the 143 alerts off any event were single patches in the September-October harvest). Measured on the three
# held-out regions (with the seasonal departure): alerts 15 -> 4, 163 -> 82, 70 -> 24; precision 0.13 -> 0.50,
# 0.06 -> 0.09, 0.09 -> 0.17; share of harvest and mowing events hit 0.015 -> 0.006, 0.149 -> 0.120, 0.015 ->
# 0.003; every event that began in the periods still found on the same date. 2 ha lost events on B and C.
# The neighbour rule (geowm.alerts.AlertRules.neighbours), with the vegetation-loss sign: alerts 4 -> 4, 69 -> 74,
# 10 -> 16; B's clear-cut whose middle was under clouds on its confirming look found (recall 2/3 -> 3/3).
ALERT_RULES = {"threshold": 5.0, "confirm_threshold": 4.0, "confirmations": 2, "min_area_ha": 1.0, "neighbours": True}
# Seasonal departure (see the module doc). Measured on three held-out synthetic regions (tiny model, 400 steps,
# scored for a year from the end of training, history 365 days): patch AUROC with the surprise score alone ->
# with max(surprise score, departure score): A 0.997 -> 0.995, B 0.989 -> 0.985, C (a drought's last days in
# the held-out period) 0.433 -> 0.942 (drought 0.293 -> 0.931); alerts 15 -> 15, 159 -> 163, 67 -> 70. On
# cached latents, the departure's z alone (no NDVI sign, no neighbourhood median) added 160-230 alerts on A
# and C, mostly grassland a year after A's 2021 drought (greener than last year) and fields harvested at
# other dates; the mean of the year-ago latents in place of the nearest, or a z within k-means clusters of
# them, ranked worse on A or C.
DEPARTURE_LAG_DAYS = 365.0
DEPARTURE_WINDOW_DAYS = 30.0
DEPARTURE_MIN_PATCHES = 16  # fewer clear patches on a date: no departure score (too few to tell normal change)
DEPARTURE_NEIGHBOURHOOD = 9  # patches: the departure score is a median over this window (720 m at 8 x 10 m)
# A patch with no clear look within DEPARTURE_WINDOW_DAYS of a year before (a cloudy season last year) has its
# vegetation loss measured against the lowest NDVI of its clear looks within LOSS_WINDOW_DAYS of that day: what
# it did at this time of year within the season's range (autumn browning, a harvest a few weeks off last
# year's) is no loss; a clear-cut, burn or flood falls below it. Before, such a patch's surprise score counted
# in full. Measured with the demo's commands (512 px, tiny, 400 steps, scored from 2022-07-01) on a region
# whose autumn 2021 was cloudy from 23 September to 22 December (seed 12): alerts 13 -> 3 (precision 0.23 ->
# 1.0, harvest and mowing events hit 12 -> 0 of 488), recall 1.0 and the delay unchanged, patch AUROC 0.9993 ->
# 0.9996; the mean of those looks in place of the lowest: 13 alerts. On the demo region (seed 7) and another
# (seed 22): the same alerts, patch AUROC 0.9911 -> 0.9921 and 0.8595 -> 0.8603; on seed 13 (no event in the
# period) the same 2 alerts. The dates only this window adds are read for their NDVI, not encoded.
LOSS_WINDOW_DAYS = 60.0
# Persistent departure (:func:`persistent_departure`): one field's crop that fails in the growing season moves
# alone (the departure score's neighbourhood median drops it) and is hardly a surprise to the tiny model (on seed
# 12 its surprise scores were below 0.1 for six weeks; the latent forecast of a summer field two months ahead is
# vague), but it stays far from what the field was a year before, with less vegetation, for weeks. A field
# harvested a little earlier or later than last year does so for a look or two. So the departure z of a patch (no
# neighbourhood median) counts on its own where it is >= PERSISTENT_Z with an NDVI loss of PERSISTENT_LOSS or more
# on PERSISTENT_LOOKS consecutive clear looks spanning PERSISTENT_DAYS or more, and the run began after a clear look
# without it (a change older than the scores is no new anomaly); its score is the run's lowest z. Measured on the
# cached scores of six demo-style regions (512 px, tiny, 400 steps, scored from 2022-07-01): seed 12 with crop
# failures found the one that began in the period (recall 0.75 -> 1.0, precision 1.0 -> 1.0, no harvest or mowing
# event hit); the demo region (seed 7) and seeds 11, 13 and 22 (made before crop failures) the same alerts, seed
# 22 one more: a second alert, from December, on a clear-cut the first found in August. Patches it scored off any
# anomaly event: none on seeds 7, 11, 13 and 22, one on seed 12 (with and without crop failures). Runs that must
# begin right after a look near the year before (z < PERSISTENT_Z) lost the crop failure (its NDVI loss dips
# under 0.15 on some looks, and the run could not begin again) and kept seed 22's second alert.
PERSISTENT_Z = 3.0
PERSISTENT_LOSS = 0.15
PERSISTENT_LOOKS = 4
PERSISTENT_DAYS = 20.0
# Provisional persistent departure: a look that holds, in a run not yet PERSISTENT_LOOKS looks or PERSISTENT_DAYS
# long, scores PERSISTENT_PROVISIONAL (at most the run's lowest z), whether or not the run began in the scores.
# It is below the thresholds of geowm's alert rules (5 / 4) and of AlertRules' defaults (4 / 3): it never opens nor
# confirms an alert, but the score raster ranks the patch above normal land while the run builds up, as forest
# alert systems report a probable loss before a confirmed one. Rare off events: on seed 12 with crop failures, 15
# of 111,763 patch-dates off any anomaly event hold on a look (172 of its 276 positive patch-dates). Measured on
# the cached scores of six demo-style regions (the alerts are the same by construction): patch AUROC seed 12 with
# crop failures 0.849 -> 0.913 (the crop failure that began in the period 0.700 -> 0.850), the demo region (seed
# 7, its crop failure 12 days before the scores) 0.9503 -> 0.9841 (0.438 -> 0.855), seed 22 0.8603 -> 0.8629,
# A 0.9973 and B 0.9998 unchanged. 3.0 in place of 2.0 gave the same to 0.0004; 1.0: 0.912 and 0.982; provisional
# looks only on runs that began in the scores: the demo unchanged (0.9503); from a run's second look: seed 12 0.899.
PERSISTENT_PROVISIONAL = 2.0
# The surprise score counts in proportion to the vegetation the patch lost against a year before (its NDVI minus
# its mean over the year-ago references), in full from a loss of VEGETATION_LOSS_FULL: a surprising patch that
# barely browned is most often land use or weather a little off last year's, every event geowm reports removes
# vegetation. Measured on the three held-out regions (detect at e3c2494, scores rescaled): patch AUROC 0.9964 ->
# 0.9974 (A), 0.9946 -> 0.9963 (B), 0.9783 -> 0.9820 (C, drought 0.9740 -> 0.9783); alerts 3 -> 3, 12 -> 11,
# 9 -> 7; harvest and mowing events hit 4 -> 4, 9 -> 9, 7 -> 5; every event that began in the periods found on
# the same date. A full loss of 0.05 / 0.15 / 0.2 / 0.3: A 0.9970 / 0.9975 / 0.9976 / 0.9976, B 0.9958 / 0.9966
# / 0.9967 / 0.9957, C 0.9812 / 0.9824 / 0.9826 / 0.9827 (0 is the sign alone, before). Scaling the departure
# score by the patch's same-day NDVI loss as well helped A and B but lost C's drought (0.9783 -> 0.9654).
VEGETATION_LOSS_FULL = 0.1
# The surprise record (``ALERTS/surprise.zarr``, :func:`write_record`): every date :func:`surprise` computed, the
# history included, so that the next run encodes only what is new. Change this when what surprise() computes
# for a date changes: records of another format are not reused.
RECORD_FORMAT = "geowm-surprise/2"  # 2: ndvi_change with the LOSS_WINDOW_DAYS fallback


def _td(days: float) -> np.timedelta64:
    return np.timedelta64(int(round(days * 86400)), "s")


def _day_doy(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Day number (days since 1970-01-01) and day of year (0-based) of datetime64 ``times``."""
    d = np.asarray(times).astype("datetime64[D]")
    return d.astype(np.int64), (d - d.astype("datetime64[Y]")).astype(np.int64)


def _doy_distance(a: np.ndarray, b) -> np.ndarray:
    """Days between days of year ``a`` and ``b`` across the turn of the year."""
    dd = np.abs(a - b)
    return np.minimum(dd, 365 - dd)


@torch.no_grad()
def surprise(cube, model: WorldModel | str, start=None, end=None, bbox=None, lead_days: float = LEAD_DAYS,
             batch_size: int = 32, departure_lag_days: float | None = DEPARTURE_LAG_DAYS,
             departure_window_days: float = DEPARTURE_WINDOW_DAYS, departure_from=None, also=None,
             loss_window_days: float = LOSS_WINDOW_DAYS, reuse: xr.Dataset | None = None,
             progress: Callable[[int, int], None] | None = None) -> xr.Dataset:
    """Per-patch surprise and seasonal departure at every cube date in [start, end] (default: all dates)
    and at the cube dates among ``also`` (datetime64 array; e.g. earlier seasons for the recurrence cap).

    Returns a Dataset on the patch grid: ``surprise`` (time, py, px; cosine distance 0..2, NaN where
    the patch is not clear or has fewer than 2 clear context dates), ``departure`` (time, py, px; cosine
    distance 0..2 from the nearest observed latent of the patch within ``departure_window_days`` of
    ``t - departure_lag_days``, NaN where none is clear or the patch is not clear at ``t``; omitted when
    ``departure_lag_days`` is None), ``ndvi_change`` (time, py, px; the patch's mean NDVI minus its mean
    over those reference dates, or where none is clear, minus the lowest of its clear NDVI values within
    ``loss_window_days`` of ``t - departure_lag_days``; with ``departure`` where the cube has red and
    near-infrared bands),
    ``ndvi_change_at_day`` (the patch's NDVI minus last year's on the day, linear between the nearest clear
    references on each side of it, NaN without one on each side; with ``ndvi_change``),
    ``departure_scored`` (time; bool, whether the date got a departure: the dates from ``departure_from`` on)
    and ``clear_fraction`` (time, py, px; share of valid pixels), with the cube's ``spatial_ref``.
    ``departure_from`` (default ``start``): the departure is computed for the dates from it on (NaN before);
    the acquisitions a year before those are encoded too.

    ``reuse``: an earlier result (a surprise record, :func:`open_record`) whose dates are taken as they are
    instead of being encoded again, where it was made by the same model (run id and configuration), lead and
    departure settings, on the same patch grid, and from the same scenes at that date and at every cube date
    before it (:func:`geowm.cube.store.date_sources`; what a date's surprise and departure are computed from);
    a date that needs a departure and has none there is computed. ``attrs['geowm:computed_dates']`` and
    ``attrs['geowm:reused_dates']`` count both kinds.
    """
    wm = model if isinstance(model, WorldModel) else WorldModel(model)
    ds, name = _as_dataset(cube)
    p = wm.cfg.patch
    ds = region(ds, bbox, p)
    times = ds["time"].values.astype("datetime64[s]")
    lo = times[0] if start is None else np.datetime64(start, "s")
    hi = times[-1] if end is None else np.datetime64(end, "s")
    scored = (times >= lo) & (times <= hi)
    if not scored.any():
        raise ValueError(f"{name}: no acquisition between {lo} and {hi} (cube {times[0]} .. {times[-1]})")
    if also is not None:
        scored |= np.isin(times, np.asarray(also, "datetime64[s]"))
    dep_from = lo if departure_from is None else max(lo, np.datetime64(departure_from, "s"))
    with_dep = (times >= dep_from) if departure_lag_days is not None else np.zeros(len(times), bool)
    y, x = ds["y"].values, ds["x"].values
    py, px = y.reshape(-1, p).mean(1), x.reshape(-1, p).mean(1)
    key = _record_key(wm, ds, lead_days, departure_lag_days, departure_window_days, loss_window_days)
    sources = date_sources(ds)
    cached = _reusable(reuse, key, sources, py, px)
    have = np.zeros(len(times), bool)  # the dates ``reuse`` holds as needed
    for i, t in enumerate(times):
        row = cached.get(str(t))
        have[i] = row is not None and (row[1] or not with_dep[i])
    todo = scored & ~have  # the dates computed now
    enc = todo.copy()  # the dates encoded
    look = todo.copy()  # the dates read: those encoded, and those whose patch NDVI only is needed (the season's
    # range for the vegetation loss)
    dep_dates = times[todo & with_dep]
    if len(dep_dates):
        lag = _td(departure_lag_days)

        def year_ago(w: float) -> np.ndarray:  # the dates within w days of a year before a departure date
            return (times >= dep_dates.min() - lag - _td(w)) & (times <= dep_dates.max() - lag + _td(w))

        enc |= year_ago(departure_window_days)
        look |= year_ago(max(departure_window_days, loss_window_days))  # holds the encoded ones too
    enc_times, look_times = times[enc], times[look]
    H, W = ds.sizes["y"], ds.sizes["x"]
    Hp, Wp = H // p, W // p
    n_out = int(scored.sum())
    out = np.full((n_out, Hp, Wp), np.nan, np.float32)
    dep = np.full((n_out, Hp, Wp), np.nan, np.float32)
    dgreen = np.full((n_out, Hp, Wp), np.nan, np.float32)
    dday = np.full((n_out, Hp, Wp), np.nan, np.float32)
    clear = np.zeros((n_out, Hp, Wp), np.float32)
    signed = True
    n_tiles = -(-H // TILE) * -(-W // TILE)
    if todo.any():
        rows_now = np.flatnonzero(todo[scored])  # output rows of the dates computed now
        nxt = np.minimum(np.searchsorted(enc_times, times), len(enc_times) - 1)  # the next encoded date of each
        need = np.flatnonzero(((enc_times[nxt] >= times) & (enc_times[nxt] - times <= _td(lookback_days(wm)))) | look)
        at = np.flatnonzero(todo[look])  # the computed dates among those read
        dep_rows = np.flatnonzero(with_dep[look][at])  # those that get a departure

        cube_bands = [str(b) for b in ds["band"].values]
        rn = ndvi_bands(cube_bands, common_names_of(ds)) or ()  # the patch NDVI's bands, when the model lacks them
        read = list(wm.bands) + [cube_bands[i] for i in rn if cube_bands[i] not in wm.bands]

        def work(y0: int, x0: int, sub: xr.Dataset) -> tuple:  # a tile's rows of the outputs (written below)
            s, c, lat, ok, green = _surprise_tile(wm, sub, look_times, lead_days, batch_size, predict=todo[look],
                                                  encode_all=departure_lag_days is not None, encode=enc[look])
            win = (slice(y0 // p, y0 // p + s.shape[1]), slice(x0 // p, x0 // p + s.shape[2]))
            d = None
            if departure_lag_days is not None and len(dep_rows):
                d = departure(lat, ok, look_times, at[dep_rows], departure_lag_days, departure_window_days, green,
                              loss_window_days, clear=c >= wm.cfg.min_valid_frac)
            return win, s[at], c[at], d

        for n, (win, s, c, d) in enumerate(map_tiles(ds, need, work, wm, read)):
            out[(rows_now, *win)], clear[(rows_now, *win)] = s, c
            if d is not None:
                dep[(rows_now[dep_rows], *win)] = d[0]
                signed = signed and d[1] is not None
                if d[1] is not None:
                    dgreen[(rows_now[dep_rows], *win)] = d[1]
                    dday[(rows_now[dep_rows], *win)] = d[2]
            if progress:
                progress(n + 1, n_tiles)
    elif progress:
        progress(n_tiles, n_tiles)
    kept = np.flatnonzero((scored & have)[scored])  # output rows taken from ``reuse``
    if len(kept):
        rows = lambda k: dict(time=[cached[str(t)][0] for t in times[scored][k]])  # noqa: E731
        out[kept], clear[kept] = (reuse[v].isel(rows(kept)).values for v in ("surprise", "clear_fraction"))
        kd = kept[with_dep[scored][kept]]
        if len(kd):
            dep[kd] = reuse["departure"].isel(rows(kd)).values
            if "ndvi_change" in reuse:
                dgreen[kd], dday[kd] = (reuse[v].isel(rows(kd)).values for v in ("ndvi_change", "ndvi_change_at_day"))
            else:
                signed = False
    dims = ("time", "py", "px")
    data = {"surprise": (dims, out), "clear_fraction": (dims, clear)}
    if departure_lag_days is not None:
        data["departure"] = (dims, dep, {
            "long_name": f"cosine distance from the nearest observed latent of the patch {departure_lag_days:g} "
                         f"+- {departure_window_days:g} days before", "units": "1"})
        if signed:
            data["ndvi_change"] = (dims, dgreen, {
                "long_name": f"patch NDVI minus its mean over the clear acquisitions {departure_lag_days:g} "
                             f"+- {departure_window_days:g} days before (none clear: minus the lowest over those "
                             f"+- {loss_window_days:g} days)", "units": "1"})
            data["ndvi_change_at_day"] = (dims, dday, {
                "long_name": f"patch NDVI minus its NDVI {departure_lag_days:g} days before, linear between the "
                             f"nearest clear acquisitions on each side of that day within {departure_window_days:g} "
                             "days", "units": "1"})
    data["departure_scored"] = ("time", with_dep[scored], {"long_name": "whether the date got a departure"})
    res = xr.Dataset(
        data, coords={"time": times[scored].astype("datetime64[ns]"), "py": py, "px": px},
        attrs={"geowm:model_run": str(wm.run.absolute()), "geowm:run_id": wm.run_id, "geowm:cube": name,
               "geowm:precision": wm.precision,
               "geowm:cube_snapshot": str(ds.attrs.get("geowm:snapshot", "")),
               "geowm:computed_dates": int(todo.sum()), "geowm:reused_dates": int(len(kept)), **key})
    if sources is not None:
        res.attrs["geowm:date_sources"] = json.dumps(sources)
    if "spatial_ref" in ds.coords:
        res = res.assign_coords(spatial_ref=ds["spatial_ref"])
    res["surprise"].attrs.update(long_name="cosine distance between observed and forecast latent", units="1")
    return res


def _record_key(wm: WorldModel, ds: xr.Dataset, lead_days: float, departure_lag_days: float | None,
                departure_window_days: float, loss_window_days: float) -> dict[str, str]:
    """What a surprise record's dates depend on besides the scenes: compared in full before any reuse."""
    crs = ds["spatial_ref"].attrs.get("crs_wkt", "") if "spatial_ref" in ds.coords else ""
    settings = {"lead_days": float(lead_days), "departure_lag_days": departure_lag_days,
                "departure_window_days": float(departure_window_days), "loss_window_days": float(loss_window_days)}
    if wm.precision != "fp32":  # records made before precision was a choice were fp32: they stay reusable
        settings["precision"] = wm.precision
    return {"geowm:record": RECORD_FORMAT, "geowm:record_model": f"{wm.run_id} {wm.config_hash}",
            "geowm:record_settings": json.dumps(settings),
            "geowm:record_crs": hashlib.sha256(str(crs).encode()).hexdigest()[:16]}


def _reusable(record: xr.Dataset | None, key: dict[str, str], sources: dict[str, str] | None,
              py: np.ndarray, px: np.ndarray) -> dict[str, tuple[int, bool]]:
    """The dates of ``record`` that still hold (see :func:`surprise`'s ``reuse``): ``{date: (row, has a
    departure)}``, the date as ISO text to the second; empty when nothing does."""
    if record is None or sources is None or any(record.attrs.get(k) != v for k, v in key.items()):
        return {}
    if not (np.array_equal(record["py"].values, py) and np.array_equal(record["px"].values, px)):
        return {}
    try:
        then = json.loads(record.attrs.get("geowm:date_sources", "null")) or {}
    except (TypeError, ValueError):
        return {}
    changed = [d for d in sorted(set(then) | set(sources)) if then.get(d) != sources.get(d)]
    cutoff = changed[0] if changed else None  # this date and every later one may differ
    times = record["time"].values.astype("datetime64[s]")
    flags = record["departure_scored"].values.astype(bool)
    return {str(t): (i, bool(f)) for i, (t, f) in enumerate(zip(times, flags, strict=True))
            if (cutoff is None or str(t) < cutoff) and str(t) in sources}


def departure(lat: np.ndarray, ok: np.ndarray, times: np.ndarray, at: np.ndarray, lag_days: float,
              window_days: float, green: np.ndarray | None = None, loss_window_days: float | None = None,
              clear: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Seasonal departure (len(at), hp, wp): cosine distance of the unit latents ``lat[at]`` (T, hp, wp, D)
    from the nearest clear (``ok``, (T, hp, wp)) latent of the same patch at dates within ``window_days`` of
    ``t - lag_days``; NaN where ``ok`` is False at ``t`` or no such date is clear.

    With ``green`` (T, hp, wp) patch NDVI, also two NDVI changes (else None):

    * ``change``: ``green[t]`` minus its mean over those clear reference dates; with ``loss_window_days``, where
      the patch is clear at ``t`` but has no clear reference, ``green[t]`` minus the lowest NDVI of its clear
      dates (``clear``, (T, hp, wp) bool; default ``ok``) within ``loss_window_days`` of ``t - lag_days`` (NaN
      without one): the season's range a year before, not a loss where the patch stays within it;
    * ``day_change``: ``green[t]`` minus last year's NDVI on the day itself (``t - lag_days``), linear between
      the nearest clear reference before it and the nearest after it; NaN unless there is one on each side.
      A mean over the references that all lie on one side of the day is biased by the season's own change
      (only references after it, in spring: greener than last year on that day).
    """
    day = times.astype("datetime64[s]").astype(np.int64) / 86400.0
    out = np.full((len(at), *lat.shape[1:3]), np.nan, np.float32)
    change = None if green is None else np.full_like(out, np.nan)
    day_change = None if green is None else np.full_like(out, np.nan)
    for j, k in enumerate(at):
        off_day = day - (day[k] - lag_days)
        if green is not None and loss_window_days is not None:  # the season's lowest NDVI, where no reference is
            near = np.flatnonzero(np.abs(off_day) <= loss_window_days)
            usable = (ok if clear is None else clear)[near] & np.isfinite(green[near])
            low = np.where(usable, green[near], np.inf).min(axis=0, initial=np.inf)
            change[j] = np.where(ok[k] & np.isfinite(low), green[k] - low, np.nan)
        ref = np.flatnonzero(np.abs(off_day) <= window_days)
        if len(ref) == 0:
            continue
        dist = 1 - np.einsum("rhwd,hwd->rhw", lat[ref], lat[k])
        dist = np.where(ok[ref], dist, np.inf).min(axis=0)
        out[j] = np.where(ok[k] & np.isfinite(dist), dist, np.nan)
        if green is None:
            continue
        g = np.where(ok[ref], green[ref], np.nan)
        n = np.isfinite(g).sum(axis=0)
        mean = np.where(n > 0, np.nansum(g, axis=0) / np.maximum(n, 1), np.nan)
        change[j] = np.where(np.isfinite(out[j]), green[k] - mean, change[j])
        off = np.broadcast_to(off_day[ref][:, None, None], g.shape)  # days from the day
        seen = np.isfinite(g)
        before = np.where(seen & (off <= 0), off, -np.inf).argmax(axis=0)[None]  # the nearest on each side
        after = np.where(seen & (off >= 0), off, np.inf).argmin(axis=0)[None]
        both = (seen & (off <= 0)).any(axis=0) & (seen & (off >= 0)).any(axis=0)
        gb, ga = np.take_along_axis(g, before, 0)[0], np.take_along_axis(g, after, 0)[0]
        db, da = -np.take_along_axis(off, before, 0)[0], np.take_along_axis(off, after, 0)[0]
        at_day = np.where(db + da > 0, (gb * da + ga * db) / np.maximum(db + da, 1e-9), gb)
        day_change[j] = np.where(np.isfinite(out[j]) & both, green[k] - at_day, np.nan)
    return out, change, day_change


def _surprise_tile(wm: WorldModel, sub: xr.Dataset, score_times: np.ndarray, lead_days: float, batch_size: int,
                   predict: np.ndarray | None = None, encode_all: bool = False, encode: np.ndarray | None = None):
    """For one in-memory tile and each of ``score_times``: surprise (Ts, hp, wp), patch clear fraction
    (Ts, hp, wp), the observed unit latents (Ts, hp, wp, D) float32, where they are clear (Ts, hp, wp) and
    the patch NDVI (Ts, hp, wp; None without red and near-infrared bands). ``predict`` (Ts bool, default all):
    the dates that get a surprise; the others (the departure's year-ago references) are only encoded. ``encode``
    (Ts bool, default all): the dates encoded at all; the others get their clear fraction and NDVI only. A block
    and date without 2 clear context dates ``lead_days`` or more before it get no surprise; with ``encode_all``
    (the departure needs them) they are still encoded, in the window of the context dates they have: what the
    satellite saw does not depend on a forecast (without it, a cube's first months and the months after a
    long cloudy spell lost their latents, and with them the departure of the dates a year later)."""
    p, win, tf = wm.cfg.patch, wm.window, wm.cfg.t_frames
    H, W = sub.sizes["y"] // p * p, sub.sizes["x"] // p * p
    sub = sub.isel(y=slice(0, H), x=slice(0, W))
    times = sub["time"].values.astype("datetime64[s]")
    refl = band_values(sub, wm.bands)  # (T, C, H, W)
    valid = sub["valid"].values.astype(bool) & np.isfinite(refl).all(axis=1)
    bh, bw, blocks = block_grid(H, W, wm)
    frac = np.stack([valid[:, by: by + bh, bx: bx + bw].mean(axis=(1, 2)) for by, bx in blocks], 1)  # (T, nb)
    patch_clear = valid.reshape(len(times), H // p, p, W // p, p).mean(axis=(2, 4))
    out = np.full((len(score_times), H // p, W // p), np.nan, np.float32)
    clear = np.zeros_like(out)
    lats = np.zeros((*out.shape, wm.cfg.dim), np.float32)
    lat_ok = np.zeros(out.shape, bool)
    green = np.full(out.shape, np.nan, np.float32)
    try:  # the patches' mean NDVI over their clear pixels: says whether a departure lost vegetation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            patch_ndvi = np.nanmean(ndvi(sub).values.reshape(len(times), H // p, p, W // p, p), axis=(2, 4))
    except ValueError:  # no red / near-infrared band: departures are not signed
        patch_ndvi = None
    predict = np.ones(len(score_times), bool) if predict is None else np.asarray(predict, bool)
    encode = np.ones(len(score_times), bool) if encode is None else np.asarray(encode, bool)
    jobs: dict[tuple[int, bool], list[tuple[int, int, np.ndarray]]] = {}
    for k, t in enumerate(score_times):
        ti = int(np.searchsorted(times, t))
        if ti >= len(times) or times[ti] != t:
            continue
        clear[k] = patch_clear[ti]
        if patch_ndvi is not None:
            green[k] = patch_ndvi[ti]
        if not encode[k]:
            continue
        for b in range(len(blocks)):
            past = context_index(frac[:ti, b] >= win.min_frame_clear, times[:ti], t - _td(lead_days), t, wm)
            forecastable = len(past) >= 2
            if tf == 1:  # the window the acquisition is seen in: the forecast's context and it
                seen = np.append(past, ti)
            else:  # its tubelet holds the acquisitions just before it: the clear ones before t, and t
                seen = np.append(recent_index(frac[:ti, b] >= win.min_frame_clear, times[:ti], t, wm, extra=1), ti)
            if frac[ti, b] > 0 and len(seen) >= tf and (forecastable or encode_all):
                key = (len(seen), len(past), bool(predict[k]) and forecastable)
                jobs.setdefault(key, []).append((k, b, seen, past))

    def stacked(chunk: list, which: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Values, validity and dates of the jobs' windows at the dates of job field ``which`` (2: seen, 3: past)."""
        sl = [(slice(blocks[b][0], blocks[b][0] + bh), slice(blocks[b][1], blocks[b][1] + bw)) for _, b, _, _ in chunk]
        r = np.stack([refl[job[which], :, ys, xs] for job, (ys, xs) in zip(chunk, sl, strict=True)])
        v = np.stack([valid[job[which], ys, xs] for job, (ys, xs) in zip(chunk, sl, strict=True)])
        return r, v, np.stack([times[job[which]] for job in chunk])

    for (_, _, with_pred), group in sorted(jobs.items()):
        for g0 in range(0, len(group), batch_size):
            chunk = group[g0: g0 + batch_size]
            r, v, tt = stacked(chunk, 2)
            batch, tdays, tdoy = model_inputs(wm, r, v, tt, tt[:, -1:])
            lat, ok, _ = wm.model.encode(batch["pixels"], batch["valid"], batch["days"], batch["doy"])
            obs, obs_ok = lat[:, -1].float(), ok[:, -1]  # the acquisition at t, seen in its window
            obs_ok = obs_ok.cpu().numpy()
            if with_pred:
                if tf == 1:  # the context is the window without its last acquisition
                    ctx = {key: val[:, :-1] for key, val in batch.items()}
                else:
                    rc, vc, tc = stacked(chunk, 3)
                    ctx, tdays, tdoy = model_inputs(wm, rc, vc, tc, tt[:, -1:])
                pred = wm.model.predict(ctx, tdays, tdoy)[:, 0].float()
                d = (1 - torch.nn.functional.cosine_similarity(obs, pred, dim=-1)).cpu().numpy()
            else:
                d = np.full(obs_ok.shape, np.nan, np.float32)
            d[~obs_ok] = np.nan
            unit = torch.nn.functional.normalize(obs, dim=-1).cpu().numpy()
            for j, (k, b, _, _) in enumerate(chunk):
                py0, px0 = blocks[b][0] // p, blocks[b][1] // p
                cell = (k, slice(py0, py0 + bh // p), slice(px0, px0 + bw // p))
                out[cell], lats[cell], lat_ok[cell] = d[j], unit[j], obs_ok[j]
    return out, clear, lats, lat_ok, green if patch_ndvi is not None else None


def normalise(surp: xr.DataArray, season_days: float = SEASON_DAYS, exclude_recent_days: float = EXCLUDE_RECENT_DAYS,
              min_reference: int = MIN_REFERENCE, recurrence_margin: float | None = RECURRENCE_MARGIN,
              reference_from=None, score_from=None,
              recurrence_neighbourhood: int = RECURRENCE_NEIGHBOURHOOD) -> xr.DataArray:
    """Robust z-score of each surprise against the patch's own earlier surprises in the same season.

    ``surp`` is (time, py, px) with NaN where not clear. The reference of date ``t`` is the patch's
    clear values at dates from ``reference_from`` (default: the first) to ``t - exclude_recent_days``
    with day of year within ``season_days``; with fewer than ``min_reference`` of them, all its values in
    that span; with still fewer, every patch's values in the season. With ``recurrence_margin`` (None:
    off), the score is at most ``(surprise - max) / (1.4826 MAD) + recurrence_margin`` over the patch's
    clear surprises in the same season a year or more before ``t`` (``RECURRENCE_AGE_DAYS``), in every
    year ``surp`` has (before ``reference_from`` too), where it has ``RECURRENCE_MIN_REFERENCE`` of them:
    what the patch already did at this time of year (harvest, mowing) does not alert again. A patch with fewer
    (clouds hid its season) is capped by the surprises of the ``recurrence_neighbourhood`` x
    ``recurrence_neighbourhood`` patches around it in those seasons (:func:`_recurrence_cap`; 1: off).
    ``score_from`` (default: every date): the dates before it are reference only and get no score.
    Returns (time, py, px) float32, NaN where ``surp`` is NaN or no reference exists yet.
    """
    s = surp.values.astype(np.float64)
    t = surp["time"].values.astype("datetime64[D]")
    day, doy = _day_doy(t)
    span = np.ones(len(t), bool) if reference_from is None else t >= np.datetime64(reference_from, "D")
    z = np.full_like(s, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, mad_all = _med_mad(s[span])  # the MAD floor: half the median over patches of each patch's MAD
        floor = max(float(np.nanmedian(mad_all)) * 0.5 if np.isfinite(mad_all).any() else 0.0, 1e-4)
        first = 0 if score_from is None else int(np.searchsorted(t, np.datetime64(score_from, "D")))
        for k in range(first, len(t)):
            past = span & (day < day[k] - exclude_recent_days)
            if not past.any() or not np.isfinite(s[k]).any():
                continue
            in_season = _doy_distance(doy, doy[k]) <= season_days
            season = past & in_season
            med, mad = _med_mad(s[season])
            few = np.isfinite(s[season]).sum(axis=0) < min_reference
            wide_med, wide_mad = _med_mad(s[past])
            med, mad = np.where(few, wide_med, med), np.where(few, wide_mad, mad)
            none = few & (np.isfinite(s[past]).sum(axis=0) < min_reference)
            pool = s[season][np.isfinite(s[season])]
            if len(pool) < min_reference:
                pool = s[past][np.isfinite(s[past])]
            if none.any() and len(pool):
                g_med = np.median(pool)
                med = np.where(none, g_med, med)
                mad = np.where(none, np.median(np.abs(pool - g_med)) * 1.4826, mad)
            z[k] = (s[k] - med) / np.maximum(mad, floor)
            if recurrence_margin is not None:
                z[k] = np.minimum(z[k], _recurrence_cap(s, k, in_season & (day < day[k] - RECURRENCE_AGE_DAYS),
                                                        floor, recurrence_margin, recurrence_neighbourhood))
    out = xr.DataArray(z.astype(np.float32), dims=surp.dims, coords=surp.coords, name="score",
                       attrs={"long_name": "anomaly score: robust z of the surprise against the patch's history",
                              "units": "1"})
    return out


def _recurrence_cap(s: np.ndarray, k: int, ref: np.ndarray, floor: float, margin: float,
                    neighbourhood: int = RECURRENCE_NEIGHBOURHOOD, rows_per_chunk: int = 64) -> np.ndarray:
    """The highest score date ``k`` may have given the patches' surprises ``s[ref]`` a year or more before
    in the same season (see :func:`normalise`). A patch with fewer than ``RECURRENCE_MIN_REFERENCE`` of them
    takes those of the ``neighbourhood`` x ``neighbourhood`` patches around it (itself included) where they hold
    that many (1: off); +inf where neither does."""
    cap = np.full(s.shape[1:], np.inf)
    a = s[ref]
    if a.shape[0] == 0:
        return cap
    own = np.isfinite(a).sum(axis=0) >= RECURRENCE_MIN_REFERENCE
    if own.any():
        _, mad = _med_mad(a)
        cap = np.where(own, (s[k] - np.nanmax(a, axis=0)) / np.maximum(mad, floor) + margin, cap)
    if neighbourhood < 2 or own.all():
        return cap
    for r0, r1, win in _windows(a, neighbourhood, rows_per_chunk):  # win: (rows, cols, dates x window)
        lack = ~own[r0:r1]
        if not lack.any():
            continue
        use = lack & (np.isfinite(win).sum(axis=-1) >= RECURRENCE_MIN_REFERENCE)
        if not use.any():
            continue
        w = win[use]
        med = np.nanmedian(w, axis=-1)
        mad = np.nanmedian(np.abs(w - med[:, None]), axis=-1) * 1.4826
        part = cap[r0:r1]  # a view: written in place
        part[use] = (s[k][r0:r1][use] - np.nanmax(w, axis=-1)) / np.maximum(mad, floor) + margin
    return cap


def _med_mad(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if a.shape[0] == 0:
        nan = np.full(a.shape[1:], np.nan)
        return nan, nan
    med = np.nanmedian(a, axis=0)
    return med, np.nanmedian(np.abs(a - med), axis=0) * 1.4826


def regional_residual(surp: xr.DataArray, min_patches: int = 16) -> xr.DataArray:
    """Surprise minus its median over the region's clear patches of the same date (when at least
    ``min_patches`` are clear): haze, illumination and sensor shifts touch a whole scene, events do not."""
    med = surp.median(("py", "px"), skipna=True)
    n = np.isfinite(surp).sum(("py", "px"))
    return surp - med.where(n >= min_patches, 0.0)


def departure_score(dep: xr.DataArray, ndvi_change: xr.DataArray | None = None,
                    min_patches: int = DEPARTURE_MIN_PATCHES,
                    neighbourhood: int = DEPARTURE_NEIGHBOURHOOD) -> xr.DataArray:
    """Seasonal departure score (time, py, px): how much further a patch moved from what it was a year before
    than the region did, where it lost vegetation, over its neighbourhood.

    1. robust z of ``dep`` (:func:`surprise`'s ``departure``, NaN where not clear) against the clear patches of
       the same date: weather moves the whole region's phenology away from last year's, an event moves its
       patches further. The MAD is floored by half the median over dates of the dates' MADs; dates with fewer
       than ``min_patches`` values get NaN;
    2. with ``ndvi_change`` (:func:`surprise`'s ``ndvi_change_at_day``), a patch whose NDVI did not fall below
       last year's scores at most 0: the events geowm reports all lose vegetation, and a patch greener than a
       year before is most often last year's own anomaly (a drought the year before) or normal land use a few
       weeks off last year's dates. A patch without a change (no clear reference on each side of last year's
       day) is not scored, and does not count in step 1;
    3. the median of those scores over the clear patches of the ``neighbourhood`` x ``neighbourhood`` window
       around each clear patch: a drought moves a landscape, a field harvested earlier than last year moves
       alone (abrupt events are what the surprise score is for; a field that stays apart for weeks is what
       :func:`persistent_departure` is for).
    """
    v = dep.values.astype(np.float64)
    if ndvi_change is not None:
        v = np.where(np.isfinite(ndvi_change.values), v, np.nan)
    flat = v.reshape(v.shape[0], -1)
    n = np.isfinite(flat).sum(axis=1)
    z = np.full_like(v, np.nan)
    use = n >= min_patches
    if use.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(flat[use], axis=1)
            mad = np.nanmedian(np.abs(flat[use] - med[:, None]), axis=1) * 1.4826
        floor = max(0.5 * float(np.median(mad)), 1e-4)
        z[use] = (v[use] - med[:, None, None]) / np.maximum(mad, floor)[:, None, None]
    if ndvi_change is not None:
        z = vegetation_loss_only(z, ndvi_change.values)
    if neighbourhood > 1:
        z = np.stack([_nan_median_filter(zk, neighbourhood) if np.isfinite(zk).any() else zk for zk in z])
    return xr.DataArray(z.astype(np.float32), dims=dep.dims, coords=dep.coords, name="departure_score",
                        attrs={"long_name": "seasonal departure score: robust z against the date's clear patches, "
                                            "vegetation loss only, neighbourhood median", "units": "1"})


def persistent_departure(z: xr.DataArray, ndvi_change: xr.DataArray, min_z: float = PERSISTENT_Z,
                         min_loss: float = PERSISTENT_LOSS, looks: int = PERSISTENT_LOOKS,
                         days: float = PERSISTENT_DAYS,
                         provisional: float | None = PERSISTENT_PROVISIONAL) -> xr.DataArray:
    """Persistent departure score (time, py, px): a patch that stays far from what it was a year before, with
    less vegetation, for weeks, while it had not been before (a failed field: alone, so the departure score's
    neighbourhood median does not see it, and barely a surprise).

    ``z``: :func:`departure_score` without the neighbourhood median (``neighbourhood=1``); ``ndvi_change``: the
    patch's NDVI minus its NDVI a year before on the same day (:func:`surprise`'s ``ndvi_change_at_day``). A look
    *holds* where ``z >= min_z`` and ``ndvi_change <= -min_loss``; a look where either is NaN (cloud, no reference)
    is skipped; any other look ends the patch's run. Where the run holds on ``looks`` or more looks spanning
    ``days`` or more, and began after a look that did not hold (a change older than the scores is no new
    anomaly), the score is the run's lowest ``z`` so far. With ``provisional`` (None: off), a look that holds in a
    run shorter than that (fewer looks, fewer days) scores ``min(provisional, the run's lowest z)``, whether or
    not the run began in the scores: evidence building up, kept below the alert thresholds
    (:data:`PERSISTENT_PROVISIONAL`). NaN elsewhere (a run older than the scores once it is long enough).
    """
    zv, nd = z.values.astype(np.float64), ndvi_change.values.astype(np.float64)
    day = (z["time"].values.astype("datetime64[s]").astype(np.int64) / 86400.0)
    shape = zv.shape[1:]
    out = np.full(zv.shape, np.nan, np.float32)
    n = np.zeros(shape, np.int64)
    start = np.zeros(shape)
    low = np.full(shape, np.inf)
    onset = np.zeros(shape, bool)  # the run began after a look that did not hold
    ended = np.zeros(shape, bool)  # a look that did not hold was seen
    for k in range(zv.shape[0]):
        seen = np.isfinite(zv[k]) & np.isfinite(nd[k])
        with np.errstate(invalid="ignore"):
            holds = seen & (zv[k] >= min_z) & (nd[k] <= -min_loss)
        new = holds & (n == 0)
        start[new], low[new], onset[new] = day[k], np.inf, ended[new]
        n[holds] += 1
        low[holds] = np.minimum(low[holds], zv[k][holds])
        stop = seen & ~holds
        n[stop], ended[stop] = 0, True
        long = holds & (n >= looks) & (day[k] - start >= days)
        ok = long & onset
        out[k][ok] = low[ok]
        if provisional is not None:
            young = holds & ~long
            out[k][young] = np.minimum(low[young], provisional)
    return xr.DataArray(out, dims=z.dims, coords=z.coords, name="persistent_score",
                        attrs={"long_name": "persistent departure score: the lowest departure z of a run of looks "
                                            "far from a year before, with vegetation lost, that began in the "
                                            "scores; a provisional score while a run builds up", "units": "1"})


def vegetation_loss_only(score: np.ndarray, ndvi_change: np.ndarray, full: float = 0.0) -> np.ndarray:
    """``score`` capped at 0 where ``ndvi_change`` (same shape; the patch's NDVI minus its NDVI a year before,
    :func:`surprise`) is >= 0: the events geowm reports (clear-cut, fire, flood, drought, crop failure) all lose
    vegetation, while a patch greener than a year before is most often normal land use a few weeks off last
    year's dates (earlier emergence, regrowth) or last year's own anomaly. With ``full`` > 0 (NDVI), a positive
    score is scaled by ``clip(-ndvi_change / full, 0, 1)``: it counts in proportion to the vegetation lost, in
    full from a loss of ``full`` (:data:`VEGETATION_LOSS_FULL` for the surprise score); ``full`` = 0: the sign
    alone. NaN change (no clear reference a year before, no red / near-infrared band): the score is kept."""
    with np.errstate(invalid="ignore"):
        weight = (ndvi_change < 0) if full <= 0 else np.clip(-ndvi_change / full, 0.0, 1.0)
        return np.where(np.isfinite(ndvi_change) & (score > 0), score * weight, score)


def _windows(a: np.ndarray, k: int, rows_per_chunk: int = 64):
    """The values of the ``k`` x ``k`` window around each cell of ``a`` (2-D, or 3-D ``(dates, rows, cols)``: every
    date's values of the window together), NaN beyond the edges, a block of rows at a time: yields ``(r0, r1,
    values)`` with ``values`` ``(r1 - r0, cols, dates x k^2)`` (memory ~ dates x rows_per_chunk x cols x k^2)."""
    a3 = a[None] if a.ndim == 2 else a
    r = k // 2
    pad = np.pad(a3, ((0, 0), (r, r), (r, r)), constant_values=np.nan)
    for r0 in range(0, a3.shape[1], rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, a3.shape[1])
        win = np.lib.stride_tricks.sliding_window_view(pad[:, r0: r1 + 2 * r], (k, k), axis=(1, 2))
        yield r0, r1, np.moveaxis(win, 0, 2).reshape(r1 - r0, a3.shape[2], -1)


def _nan_median_filter(a: np.ndarray, k: int, rows_per_chunk: int = 64) -> np.ndarray:
    """Median of the finite values of the ``k`` x ``k`` window around each finite cell of ``a`` (2-D); NaN
    where ``a`` is NaN. Chunked by rows (:func:`_windows`)."""
    out = np.full_like(a, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for r0, r1, win in _windows(a, k, rows_per_chunk):
            out[r0:r1] = np.nanmedian(win, axis=-1)
    return np.where(np.isfinite(a), out, np.nan)


def detect(cube, model: WorldModel | str, start, end=None, history_days: float = 365.0, bbox=None,
           lead_days: float = LEAD_DAYS, rules=None, regional: bool = False, recurrence: bool = True,
           seasonal: bool = True, water: bool = True, record=None, rescore: bool = False,
           progress: Callable[[int, int], None] | None = None):
    """Surprise, scores and confirmed alerts for the acquisitions in [start, end].

    The patches' history for the normalisation is scored too: ``history_days`` before ``start``.
    ``regional``: subtract each date's regional median surprise first (:func:`regional_residual`; off by
    default: on two held-out synthetic regions it lowered the patch AUROC, 0.991 -> 0.935 and 0.987 -> 0.975,
    as the median of a partly cloudy scene's few clear patches adds noise to every score).
    ``recurrence``: cap the scores of change the patch already showed in the same season a year or more
    before, in every earlier year the cube has (:func:`normalise`): the acquisitions before the history
    that are in the season of a scored one and ``RECURRENCE_AGE_DAYS`` or more before it are scored too
    (:func:`recurrence_dates`), as the cap's reference only.
    ``seasonal``: the surprise score counts in proportion to the patch's vegetation loss against a year before
    (0 where it is greener; :func:`vegetation_loss_only` with :data:`VEGETATION_LOSS_FULL`) and the score is
    the larger of it and the seasonal departure score (:func:`departure_score`); off: the surprise score alone,
    unsigned.
    ``water``: the score is also at least the new open water score (:func:`geowm.water.new_water_score`, a
    spectral rule: the share of the patch's clear pixels that are open water and were not on any clear look in
    the 425 to 30 days before); ``scores`` then hold ``new_water`` (that share) and ``water_score``. A cube
    without a green and a near-infrared band gets neither.
    ``record``: a surprise record (folder, e.g. ``ALERTS/surprise.zarr``; :func:`write_record`): the dates it
    holds that still hold are not encoded again (:func:`surprise`'s ``reuse``: the same model, settings, patch
    grid and scenes), and it is replaced by the record of this run's dates with the other dates it held that
    still hold. A scheduled run that adds a few acquisitions encodes those and their year-ago references, not
    the year of history again. A record that cannot be read is recomputed and replaced (with a warning), as is
    every date with ``rescore``.
    Returns (scores Dataset on the patch grid with ``surprise``, ``surprise_score``, ``departure``,
    ``departure_score`` and ``persistent_score`` (with ``seasonal``), ``new_water`` and ``water_score`` (with
    ``water``), ``score``, ``clear_fraction``; alerts GeoDataFrame in EPSG:4326;
    ``attrs['geowm:computed_dates']`` / ``['geowm:reused_dates']``: the acquisitions encoded now / taken from
    ``record``, the history and the recurrence cap's earlier seasons included; the year-ago references encoded for
    the departure are not counted).
    """
    from geowm.alerts import AlertRules, alerts_from_scores

    if not (np.isfinite(lead_days) and lead_days > 0):
        raise ValueError(f"lead_days must be a positive number of days, not {lead_days:g}: the forecast an "
                         "acquisition is compared with is made from earlier acquisitions")
    if not (np.isfinite(history_days) and history_days >= 0):
        raise ValueError(f"history_days must be >= 0, not {history_days:g}")
    wm = model if isinstance(model, WorldModel) else WorldModel(model)
    ds, name = _as_dataset(cube)
    start_t = np.datetime64(start, "s")
    hist0 = start_t - _td(history_days)
    times = ds["time"].values.astype("datetime64[s]")
    hi = times[-1] if end is None else np.datetime64(end, "s")
    earlier = recurrence_dates(times, start_t, hi, hist0) if recurrence else None
    old = open_record(record) if record is not None and not rescore else None
    sur = surprise(ds, wm, start=hist0, end=end, bbox=bbox, lead_days=lead_days, progress=progress, also=earlier,
                   departure_lag_days=DEPARTURE_LAG_DAYS if seasonal else None, departure_from=start_t, reuse=old)
    z = normalise(regional_residual(sur["surprise"]) if regional else sur["surprise"], reference_from=hist0,
                  recurrence_margin=RECURRENCE_MARGIN if recurrence else None, score_from=start_t)
    if seasonal and "ndvi_change" in sur:
        z = z.copy(data=vegetation_loss_only(z.values, sur["ndvi_change"].values, VEGETATION_LOSS_FULL))
    parts = {"surprise_score": z.rename("surprise_score")}
    score = z
    if seasonal:
        change = sur.get("ndvi_change_at_day")
        parts["departure_score"] = departure_score(sur["departure"], change)
        score = np.fmax(z, parts["departure_score"])
        if change is not None:
            dz = departure_score(sur["departure"], change, neighbourhood=1)
            parts["persistent_score"] = persistent_departure(dz, change, PERSISTENT_Z, PERSISTENT_LOSS,
                                                             PERSISTENT_LOOKS, PERSISTENT_DAYS,
                                                             PERSISTENT_PROVISIONAL)
            score = np.fmax(score, parts["persistent_score"])
        score = score.rename("score")
        score.attrs.update(long_name="anomaly score: the largest of the surprise, seasonal departure and "
                                     "persistent departure scores", units="1")
    scored = sur["time"].values >= start_t.astype("datetime64[ns]")
    reg = region(ds, bbox, wm.cfg.patch)
    if water and water_bands(reg) is not None and scored.any():
        frac = np.full(sur["surprise"].shape, np.nan, np.float32)
        frac[scored] = new_water(reg, sur["time"].values[scored], wm.cfg.patch).values
        parts["new_water"] = sur["surprise"].copy(data=frac).rename("new_water").assign_attrs(
            long_name="share of the patch's clear pixels that are new open water", units="1")
        parts["water_score"] = new_water_score(parts["new_water"])
        score = np.fmax(score, parts["water_score"]).rename("score")
        score.attrs.update(long_name=score.attrs.get("long_name", "anomaly score") + "; at least the new open water "
                                     "score", units="1")
    out = sur.drop_vars("departure_scored").assign(score=score, **parts).sel(
        time=slice(start_t.astype("datetime64[ns]"), None))
    for k in [k for k in out.attrs if k.startswith("geowm:record") or k == "geowm:date_sources"]:
        del out.attrs[k]
    out.attrs.update({"geowm:from": str(start_t), "geowm:lead_days": float(lead_days),
                      "geowm:history_days": float(history_days)})
    crs = ds["spatial_ref"].attrs.get("crs_wkt") if "spatial_ref" in ds.coords else None
    if crs is None:
        raise ValueError(f"{name}: the cube has no CRS (spatial_ref)")
    grid = out["score"].rename(py="y", px="x")
    alerts = alerts_from_scores(grid, crs, rules or AlertRules(**ALERT_RULES), obs=reg.sel(
        time=slice(hist0.astype("datetime64[ns]"), None)))
    if record is not None:
        write_record(merge_record(old, sur), record)
    return out, alerts


def recurrence_dates(times: np.ndarray, start, end, before) -> np.ndarray:
    """The dates among ``times`` before ``before`` that the recurrence cap of the dates in [``start``,
    ``end``] refers to: ``RECURRENCE_AGE_DAYS`` or more before one of them, with day of year within
    ``SEASON_DAYS`` of its (:func:`normalise`). datetime64[s] array, possibly empty."""
    times = np.asarray(times, "datetime64[s]")
    lo, hi, before = (np.datetime64(v, "s") for v in (start, end, before))
    scored, cand = times[(times >= lo) & (times <= hi)], times[times < before]
    if len(scored) == 0 or len(cand) == 0:
        return cand[:0]
    (cday, cdoy), (sday, sdoy) = _day_doy(cand), _day_doy(scored)
    old = cday[:, None] < sday[None] - RECURRENCE_AGE_DAYS
    return cand[(old & (_doy_distance(cdoy[:, None], sdoy[None]) <= SEASON_DAYS)).any(axis=1)]


def _replace_store(ds: xr.Dataset, path, consolidated: bool = True) -> None:
    """``ds`` as a plain Zarr v3 store at ``path``, written beside it and renamed over it: a reader or a failed
    write never sees half a store."""
    import shutil
    import uuid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with warnings.catch_warnings():  # zarr notes that v3 has no consolidated metadata yet: xarray reads it
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            ds.to_zarr(tmp, mode="w", consolidated=consolidated, zarr_format=3)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def write_scores(scores: xr.Dataset, path) -> None:
    """The score raster as a plain Zarr v3 store (``xr.open_zarr(path)``), replaced atomically."""
    _replace_store(scores.rename(py="y", px="x"), path)


def open_record(path) -> xr.Dataset | None:
    """The surprise record at ``path`` (:func:`write_record`), opened lazily; None when there is none, or (with a
    warning) when it cannot be read or is not a record: it is then recomputed and replaced."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        ds = xr.open_zarr(path, consolidated=False)
        if ds.attrs.get("geowm:record") is None or "departure_scored" not in ds:
            raise ValueError("not a geowm surprise record")
        if ds.attrs["geowm:record"] != RECORD_FORMAT:
            raise ValueError(f"format {ds.attrs['geowm:record']}, this geowm writes {RECORD_FORMAT}")
        return ds
    except Exception as exc:  # a cache: never a reason to fail the scoring
        warnings.warn(f"{path}: surprise record not used ({exc}); every date is computed again and the record "
                      "replaced", stacklevel=2)
        return None


def merge_record(old: xr.Dataset | None, new: xr.Dataset) -> xr.Dataset:
    """The record after a run: ``new`` (:func:`surprise`'s result) and the dates of ``old`` that it does not hold
    and that still hold for it (the same model, settings, grid and scenes; see :func:`surprise`'s ``reuse``)."""
    sources = json.loads(new.attrs.get("geowm:date_sources", "null"))
    key = {k: v for k, v in new.attrs.items() if k.startswith("geowm:record")}
    rows = _reusable(old, key, sources, new["py"].values, new["px"].values)
    have = set(new["time"].values.astype("datetime64[s]").astype(str))
    keep = sorted(i for t, (i, _) in rows.items() if t not in have)
    if not keep:
        return new
    names = [v for v in new.data_vars if v in old.data_vars]
    merged = xr.concat([old[names].isel(time=keep).load(), new[names]], dim="time", coords="minimal",
                       compat="override", join="override").sortby("time")
    merged.attrs = dict(new.attrs)
    return merged


def write_record(sur: xr.Dataset, path) -> None:
    """Save a surprise record (:func:`surprise`'s result; :func:`merge_record`) as a plain Zarr v3 store at
    ``path``, replaced atomically. Derived data: deleting it only makes the next run encode everything again."""
    _replace_store(sur, path, consolidated=False)


def open_scores(path) -> xr.Dataset:
    """The anomaly score raster written by ``geowm anomalies`` (``scores.zarr`` or the alerts folder holding it).

    Returns a Dataset on the patch grid: ``score`` (robust z, unitless), ``surprise`` (latent distance)
    and ``clear_fraction`` (0..1), each ``(time, y, x)`` with ``y, x`` patch centres in the cube CRS.
    """
    path = Path(path)
    if path.is_dir() and (path / "scores.zarr").is_dir():
        path = path / "scores.zarr"
    if not path.is_dir():
        raise FileNotFoundError(f"no score raster at {path}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        return xr.open_zarr(path, consolidated=True)
