"""Held-out evaluation of the model against the baselines, like for like (``geowm evaluate``).

* **NDVI forecasts**: the first ``calibrate_days`` of the held-out period calibrate each forecaster's blend
  with the pixels' climatology (:func:`geowm.calibrate.fit_calibration` on inits whose valid times end in
  them; the run's own ``calibration.json`` is not used, since the training period flatters the model);
  then inits at cube acquisitions from ``start + calibrate_days`` on, every ``init_every_days``; each
  method forecasts NDVI at ``init + lead``; scored on the clear pixels of the acquisition on that
  day (leads whose valid day has no acquisition are skipped). Persistence uses everything up to the
  init; climatology and harmonic regression are fitted on the history before the first scored init, so
  every method has seen the same dates. Where no blend could be fitted (no year of history before the
  calibration inits) or ``calibrate_days=0``, the models' own forecasts are scored from ``start``.
* **Anomaly scores**: per patch and clear acquisition after ``start``, the model's score
  (:func:`geowm.anomaly.detect`) and each baseline's pixel score averaged over the patch's clear
  pixels; AUROC against the ground-truth labels of :func:`geowm.metrics.patch_labels`, overall and per
  event type (that type's positives against all negatives).
* **Alerts**: the model's confirmed alerts against the events (precision, recall, F1, false alarms on
  harvest/mowing, median detection delay); the same for the change-detecting baselines (harmonic /
  CCDC-style and BFAST-style), whose patch scores go through the same confirmation and polygon machinery
  (:func:`geowm.alerts.alerts_from_scores`) with their own change rule (``k`` and ``consecutive`` of their
  ``breaks``).
* **Other forecasters** (``others``, e.g. the pixel-space baseline of :mod:`geowm.model.pixel`): their NDVI
  forecasts through :func:`geowm.forecast.forecast`, scored at the same inits, leads and pixels as the model.
* **Memory**: the NDVI forecasts and the baselines are read, fitted and scored one ``block_px`` square of the
  region at a time (every method's pixels are independent; the blocks' errors are summed and the baselines'
  patch scores put together before any metric), so the region's size costs time, not memory. The one regional
  number of a baseline, the noise level given to pixels with fewer than 3 clear residuals (the median over the
  pixels), is then the block's median.
* **Latent neighbours** (with a land-cover raster): for random clear, single-class patches of the
  held-out period, the share of their ``k`` nearest latents by cosine (what :func:`geowm.similar`
  ranks), at *other* places and any date, that have the query's land-cover class; with the share two
  random patches would have (chance) for comparison.
"""

from __future__ import annotations

import warnings

import numpy as np

from geowm.anomaly import ALERT_RULES, detect
from geowm.baselines import BASELINES, ndvi
from geowm.cube.reader import Labels
from geowm.forecast import _as_dataset, forecast, region
from geowm.inference import WorldModel
from geowm.metrics import alert_scores, auroc, load_events, patch_labels

# px: evaluate reads, fits and scores the NDVI this many px square at a time (rounded up to a multiple of the
# forecasters' window size). On the skill benchmark's region cut to 512 px (2026-12-03, 2 cores): one 512 px block
# 376 s and 3.6 GiB peak resident set, four 256 px blocks 344 s and 2.2 GiB, the same scores.
EVAL_BLOCK_PX = 256


def _match(times: np.ndarray, t: np.datetime64, tol_days: float = 2.0) -> int | None:
    d = np.abs((times - t).astype("timedelta64[s]").astype(np.float64)) / 86400.0
    i = int(d.argmin())
    return i if d[i] <= tol_days else None


def _patch_mean(a: np.ndarray, p: int) -> np.ndarray:
    T, H, W = a.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a[:, : H // p * p, : W // p * p].reshape(T, H // p, p, W // p, p), axis=(2, 4))


def similar_landcover_share(ds, wm: WorldModel, classes: Labels, start, n_dates: int = 4,
                            n_queries: int = 300, k: int = 5, purity: float = 0.9, seed: int = 0) -> dict:
    """Share of nearest latent neighbours (cosine, other places, any of ``n_dates`` clear dates from ``start``)
    with the query patch's land-cover class.

    ``classes`` is the land cover on ``ds``'s pixel grid (:class:`~geowm.cube.reader.Labels`): a patch on a date
    takes the class of the map that holds at that date; dates no map covers are not picked.
    Patches count when at least ``purity`` of their pixels share one class and the encoder marks them clear.
    Returns ``share`` (mean over ``n_queries`` queries of the same-class share among their ``k`` neighbours),
    ``chance`` (probability that two random counted patches share a class), ``n_queries``, ``k``, ``dates``.
    """
    p, size, tf = wm.cfg.patch, wm.window.size, wm.cfg.t_frames
    H, W = ds.sizes["y"] // size * size, ds.sizes["x"] // size * size
    if H == 0 or W == 0:
        return {"share": None, "chance": None, "n_queries": 0, "k": k, "dates": []}
    times = ds["time"].values.astype("datetime64[s]")
    clear = ds["valid"].isel(y=slice(0, H), x=slice(0, W)).mean(("y", "x")).values
    band = classes.band_of(times)
    cand = [i for i in np.flatnonzero(times >= np.datetime64(start, "s")) if i >= tf - 1 and band[i] >= 0]
    picks: list[int] = []
    for i in sorted(cand, key=lambda i: -clear[i]):  # the clearest dates, at least 20 days apart
        if len(picks) < n_dates and all(abs((times[i] - times[j]).astype(np.int64)) > 20 * 86400 for j in picks):
            picks.append(i)
    picks.sort()
    lat, place, cls = [], [], []
    for i in picks:
        lc = classes.maps[band[i], :H, :W].reshape(H // p, p, W // p, p).transpose(0, 2, 1, 3)
        lc = lc.reshape(H // p, W // p, -1)
        maj = np.array([[np.bincount(c).argmax() for c in row] for row in lc])
        pure = (lc == maj[..., None]).mean(-1) >= purity
        for y0 in range(0, H, size):
            for x0 in range(0, W, size):
                win = ds.isel(time=slice(i - tf + 1, i + 1), y=slice(y0, y0 + size), x=slice(x0, x0 + size))
                z = wm.encode(win).values[-1]  # (size/p, size/p, latent)
                ys, xs = np.mgrid[y0 // p: (y0 + size) // p, x0 // p: (x0 + size) // p]
                ok = np.isfinite(z).all(-1) & pure[ys, xs]
                lat.append(z[ok])
                place.append((ys * (W // p) + xs)[ok])
                cls.append(maj[ys, xs][ok])
    z, place, cls = np.concatenate(lat), np.concatenate(place), np.concatenate(cls)
    if len(z) < k + 2:
        return {"share": None, "chance": None, "n_queries": 0, "k": k, "dates": [str(times[i]) for i in picks]}
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    queries = rng.choice(len(z), min(n_queries, len(z)), replace=False)
    shares = []
    for q in queries:
        sim = z @ z[q]
        sim[place == place[q]] = -np.inf  # other places only: the same place on another date is trivially alike
        top = np.argsort(-sim)[:k]
        shares.append(float((cls[top] == cls[q]).mean()))
    freq = np.bincount(cls) / len(cls)
    return {"share": float(np.mean(shares)), "chance": float((freq ** 2).sum()), "n_queries": int(len(queries)),
            "k": int(k), "n_patches": int(len(z)), "dates": [str(times[i]) for i in picks]}


def held_out_inits(times: np.ndarray, start, leads, init_every_days: float = 30) -> list[np.datetime64]:
    """Inits: cube acquisitions from ``start`` on, ``init_every_days`` apart, whose longest lead is in the cube."""
    max_lead = np.timedelta64(int(max(leads) * 86400), "s")
    inits, last = [], None
    for t in times[(times >= np.datetime64(start, "s")) & (times + max_lead <= times[-1])]:
        if last is None or (t - last) >= np.timedelta64(int(init_every_days * 86400), "s"):
            inits.append(t)
            last = t
    return inits


def forecast_skill(ds, nd, models: dict, fitted: dict, inits, leads, members: int = 1, progress=None,
                   blends: dict | None = None) -> dict:
    """NDVI forecast RMSE/MAE by lead of every model (``geowm.forecast.forecast``) and baseline, like for like.

    ``ds``: the cube region (Dataset); ``nd``: its NDVI (time, y, x), loaded; ``models``: name -> WorldModel
    (JEPA or pixel-baseline run); ``fitted``: name -> baseline fitted on the history (those that forecast from the
    latest observations, ``uses_latest``: persistence, damped anomaly, are refitted at each init on everything up
    to it, so they may be passed unfitted). Each (init, lead) whose valid day has an acquisition is scored on the
    pixels clear that day where *every* method has a forecast. Returns ``{method: {lead: {rmse, mae, n_pixels}}}``
    (lead as ``f"{days:g}"``). ``blends``: name -> climatology blend weights of that model (``forecast``'s
    ``climatology``; default: none, the model alone).
    """
    return skill_scores(skill_sums(ds, nd, models, fitted, inits, leads, members, progress, blends))


def skill_sums(ds, nd, models: dict, fitted: dict, inits, leads, members: int = 1, progress=None,
               blends: dict | None = None, into: dict | None = None) -> dict:
    """The error sums behind :func:`forecast_skill` (same arguments), ``{method: {lead: [n, sum e^2, sum |e|]}}``
    (float64), added to ``into`` when given: one region's sums, or the sum over its blocks (pixels are scored
    independently, so the blocks' sums are the region's)."""
    times = ds["time"].values.astype("datetime64[s]")
    sums = into if into is not None else {m: {float(ld): [0, 0.0, 0.0] for ld in leads} for m in [*models, *fitted]}
    for n, init in enumerate(inits):
        fcs = {name: forecast(ds, m, init=init, leads=leads, members=members,
                              climatology=(blends or {}).get(name, False)) for name, m in models.items()}
        upto = nd.sel(time=slice(None, init.astype("datetime64[ns]")))
        latest = None  # persistence & co, refitted for this init (forecasts only); the previous init's go first
        latest = {key: type(b)().fit(upto, scoring=False) for key, b in fitted.items() if b.uses_latest}
        for j, ld in enumerate(leads):
            k = _match(times, init + np.timedelta64(int(ld * 86400), "s"))
            if k is None:
                continue
            obs = nd.isel(time=k).values
            clear = np.isfinite(obs)
            vt = [times[k]]
            preds = {name: fc["ndvi"].isel(init_time=0, lead_time=j).sel(quantile=0.5).values
                     for name, fc in fcs.items()}
            for key, b in fitted.items():
                preds[key] = latest.get(key, b).forecast(init, vt).values[0]
            ok = clear & np.all([np.isfinite(v) for v in preds.values()], axis=0)
            for m, v in preds.items():
                e = v[ok].astype(np.float64) - obs[ok]
                acc = sums[m][float(ld)]
                acc[0] += len(e)
                acc[1] += float((e ** 2).sum())
                acc[2] += float(np.abs(e).sum())
        if progress:
            progress(n + 1, len(inits))
    return sums


def skill_scores(sums: dict) -> dict:
    """``{method: {lead: {rmse, mae, n_pixels}}}`` from :func:`skill_sums`' sums (None where nothing was scored)."""
    return {m: {f"{ld:g}": {"rmse": float(np.sqrt(se / n)) if n else None, "mae": float(ae / n) if n else None,
                            "n_pixels": int(n)} for ld, (n, se, ae) in by_lead.items()} for m, by_lead in sums.items()}


def block_size(block_px: int | None, forecasters) -> int:
    """The side of :func:`evaluate`'s blocks in px: ``block_px``, or ``EVAL_BLOCK_PX`` rounded up to a multiple of
    every forecaster's (WorldModel's) window size. Raises ValueError when ``block_px`` is not a positive multiple
    of it (a block off the window grid would be forecast in other windows than the whole region)."""
    unit = int(np.lcm.reduce([m.window.size // m.cfg.patch * m.cfg.patch for m in forecasters] or [1]))
    size = -(-EVAL_BLOCK_PX // unit) * unit if block_px is None else block_px
    if not (isinstance(size, (int, np.integer)) and size > 0 and size % unit == 0):
        raise ValueError(f"block_px {size!r}: give a positive multiple of {unit} px (the forecasters' window "
                         "size), so that every block is forecast in the windows of the whole region")
    return int(size)


def eval_blocks(H: int, W: int, size: int) -> list[tuple[slice, slice]]:
    """(rows, columns) of the ``size`` px squares (the last of a row or column smaller) that cover H x W px."""
    return [(slice(y0, min(y0 + size, H)), slice(x0, min(x0 + size, W)))
            for y0 in range(0, H, size) for x0 in range(0, W, size)]


def _before(nd, t: np.datetime64):
    """The NDVI history before ``t``."""
    return nd.sel(time=slice(None, t.astype("datetime64[ns]") - np.timedelta64(1, "s")))


def baseline_alerts(baseline, patch_scores, like, crs: str):
    """Confirmed alerts of a change-detecting baseline (with ``breaks``: harmonic, bfast) from its pixel scores
    averaged per patch, ``patch_scores`` (time, py, px) on the grid of ``like`` (a DataArray with coords
    ``time``, ``py``, ``px``), through :func:`geowm.alerts.alerts_from_scores` with the baseline's change
    rule: threshold = confirm threshold = ``break_k``, ``break_consecutive - 1`` confirmations, and the
    model's minimum mapping unit and neighbour rule."""
    import xarray as xr

    from geowm.alerts import AlertRules, alerts_from_scores

    grid = xr.DataArray(patch_scores, dims=("time", "y", "x"), coords={
        "time": like["time"].values, "y": like["py"].values, "x": like["px"].values})
    rules = AlertRules(threshold=baseline.break_k, confirm_threshold=baseline.break_k,
                       confirmations=baseline.break_consecutive - 1, min_area_ha=ALERT_RULES["min_area_ha"],
                       neighbours=ALERT_RULES["neighbours"])
    return alerts_from_scores(grid, crs, rules)


def evaluate(cube, model: WorldModel | str, events: str, start, leads=(5, 10, 20, 30), init_every_days: float = 10,
             history_days: float = 365.0, bbox=None, members: int = 1, landcover: str | None = None,
             others: dict | None = None, calibrate_days: float = 90.0, block_px: int | None = None,
             progress=None) -> dict:
    """Scores of the model and of each baseline on the period after ``start``; see the module doc.

    ``landcover``: a categorical raster (any grid; read onto the cube's by nearest neighbour) for the
    latent-neighbour check (``similar`` in the report). ``others``: name -> run directory or WorldModel of
    more forecasters (e.g. ``{"pixel": "runs/pixel"}``) scored like the model in ``ndvi_forecast``.
    ``block_px``: the NDVI forecasts and the baselines are read, fitted and scored one square of this many px at
    a time (:func:`eval_blocks`), so memory does not grow with the region; a multiple of every forecaster's
    window size (the same windows, so the same forecasts, as over the whole region); default ``EVAL_BLOCK_PX``
    rounded up to one. Raises ValueError on a bad ``block_px`` or ``start``.
    """
    wm = model if isinstance(model, WorldModel) else WorldModel(model)
    others = {k: v if isinstance(v, WorldModel) else WorldModel(v) for k, v in (others or {}).items()}
    full, name = _as_dataset(cube)
    p = wm.cfg.patch
    ds = region(full, bbox, p)
    start_t = np.datetime64(start, "s")
    times = ds["time"].values.astype("datetime64[s]")
    if start_t <= times[0] or start_t >= times[-1]:
        raise ValueError(f"{name}: --from {start_t} must lie inside the cube ({times[0]} .. {times[-1]})")
    forecasters = {"model": wm, **others}
    block_px = block_size(block_px, forecasters.values())

    # ---- NDVI forecasts by lead, after the calibration days
    from geowm.calibrate import fit_calibration

    score_from, calibration, blends = start_t, {}, {}
    if calibrate_days > 0:
        until = start_t + np.timedelta64(int(calibrate_days * 86400), "s")
        for key, m in forecasters.items():
            calibration[key] = fit_calibration(m, ds, start=start_t, until=until, leads=leads,
                                               n_inits=max(2, int(calibrate_days // 15)), every_days=15, max_px=512,
                                               write=False)
            blends[key] = calibration[key].get("weights", {})
    if any(blends.values()):  # the calibration days are spent: score after them, every method knowing them
        score_from = until
    inits = held_out_inits(times, score_from, leads, init_every_days)

    # ---- the model's anomaly scores and alerts (tile by tile over the region)
    scores, alerts = detect(ds, wm, start_t, history_days=history_days)
    st = scores["time"].values

    # ---- block by block: every forecaster's NDVI errors and the baselines' patch anomaly scores. Each baseline
    # holds its (time, pixel) history, so one block's set of them lives at a time (a 1024 px region's set is
    # several GB); persistence & co are refitted per init in skill_sums
    cuts = eval_blocks(ds.sizes["y"], ds.sizes["x"], block_px)
    total = len(cuts) * len(inits) + 1
    sums = None
    base_scores = {k: np.full((len(st), scores.sizes["py"], scores.sizes["px"]), np.nan, np.float32)
                   for k in BASELINES}
    for c, (ys, xs) in enumerate(cuts):
        sub = ds.isel(y=ys, x=xs)
        nd = ndvi(sub).load()
        step = (lambda n, _, c=c: progress(c * len(inits) + n, total)) if progress else None
        fitted = {k: cls() if cls.uses_latest else cls().fit(_before(nd, score_from)) for k, cls in BASELINES.items()}
        sums = skill_sums(sub, nd, forecasters, fitted, inits, leads, members, step, blends, into=sums)
        fitted = None
        history, obs = _before(nd, start_t), nd.sel(time=st)
        cell = (slice(None), slice(ys.start // p, ys.stop // p), slice(xs.start // p, xs.stop // p))
        for key, cls in BASELINES.items():  # fitted on the history before start, one at a time
            b = None
            b = cls().fit(history)
            base_scores[key][cell] = _patch_mean(b.score(obs).values, p)
        b = nd = history = obs = None
    forecast_scores = skill_scores(sums)

    ev = load_events(events)
    crs = ev.attrs.get("crs")
    labels = patch_labels(ev, st, scores["py"].values, scores["px"].values, crs).values
    types = sorted(set(ev.loc[ev["anomaly"].astype(bool), "type"]))
    by_type = {t: patch_labels(ev[ev["type"] == t], st, scores["py"].values, scores["px"].values, crs).values
               for t in types}  # each type's positives against the same negatives

    def per_type(score: np.ndarray) -> dict:
        return {t: auroc(score.ravel(), np.where(lab_t == 1, 1, np.where(labels == 0, 0, -1)).ravel())
                for t, lab_t in by_type.items() if (lab_t == 1).any()}

    auc = {"model": auroc(scores["score"].values.ravel(), labels.ravel())}
    auc_by_type = {"model": per_type(scores["score"].values)}
    alone = {k: scores[k].values for k in ("surprise_score", "departure_score") if k in scores}
    if "persistent_score" in scores:  # NaN outside a run that holds: 0 wherever a patch-date has a departure
        alone["persistent_score"] = np.where(np.isfinite(scores["departure"].values),
                                             np.fmax(scores["persistent_score"].values, 0.0), np.nan)
    if "water_score" in scores:  # NaN below a tenth of new water: 0 wherever a patch-date has a surprise
        alone["water_score"] = np.where(np.isfinite(scores["surprise"].values),
                                        np.fmax(scores["water_score"].values, 0.0), np.nan)
    parts = {k.removesuffix("_score"): auroc(v.ravel(), labels.ravel()) for k, v in alone.items()}  # each alone
    crs_wkt = ds["spatial_ref"].attrs.get("crs_wkt") if "spatial_ref" in ds.coords else None
    base_alerts = {}
    for key, cls in BASELINES.items():
        auc[key] = auroc(base_scores[key].ravel(), labels.ravel())
        auc_by_type[key] = per_type(base_scores[key])
        if hasattr(cls, "breaks") and crs_wkt:  # change detectors: alerts by their own rule
            found = baseline_alerts(cls(), base_scores[key], scores["score"], crs_wkt)
            base_alerts[key] = {**_jsonable(alert_scores(found, ev, since=start_t)), "n_alerts": int(len(found))}
    similar = None
    if landcover:
        from geowm.cube.reader import read_labels
        from geowm.cube.store import read_state

        lc = read_labels(landcover, read_state(name).grid)
        iy = int(np.argmin(np.abs(full["y"].values - ds["y"].values[0])))
        ix = int(np.argmin(np.abs(full["x"].values - ds["x"].values[0])))
        similar = similar_landcover_share(ds, wm, lc.crop(iy, ix, ds.sizes["y"], ds.sizes["x"]), start_t)
    if progress:
        progress(total, total)
    return {
        "cube": name, "model_run": wm.run_id, "from": str(start_t), "inits": [str(t) for t in inits],
        "ndvi_forecast": forecast_scores, "ndvi_scored_from": str(score_from), "calibration": calibration,
        "anomaly_auroc": auc,
        "anomaly_auroc_by_type": _jsonable(auc_by_type),
        "anomaly_auroc_model_parts": _jsonable(parts),
        "labels": {"positive": int((labels == 1).sum()), "negative": int((labels == 0).sum()),
                   "excluded": int((labels == -1).sum()),
                   "positive_by_type": {t: int((v == 1).sum()) for t, v in by_type.items()}},
        "alerts": _jsonable(alert_scores(alerts, ev, since=start_t)),
        "n_alerts": int(len(alerts)),
        "baseline_alerts": base_alerts,
        "similar": similar,
    }


def _jsonable(d):
    if isinstance(d, dict):
        return {str(k): _jsonable(v) for k, v in d.items()}
    if isinstance(d, (np.floating, float)):
        return None if not np.isfinite(d) else float(d)
    if isinstance(d, np.integer):
        return int(d)
    return d


def table(report: dict) -> str:
    """The report as a plain-text table (RMSE by lead, AUROC, alert scores)."""
    fs = report["ndvi_forecast"]
    leads = list(next(iter(fs.values())).keys())
    lines = ["NDVI forecast RMSE by lead (days), clear pixels",
             f"{'method':<12}" + "".join(f"{ld:>10}" for ld in leads)]
    for m, by in fs.items():
        cells = [f"{by[ld]['rmse']:>10.4f}" if by[ld]["rmse"] is not None else f"{'-':>10}" for ld in leads]
        lines.append(f"{m:<12}" + "".join(cells))
    if report.get("ndvi_scored_from"):
        lines.append(f"(scored from {report['ndvi_scored_from'][:10]}; before it, each model's climatology blend "
                     "was fitted: " + ", ".join(f"{k} {v.get('weights') or 'none'}"
                                                for k, v in (report.get("calibration") or {}).items()) + ")")
    lines.append("")
    auc = report["anomaly_auroc"]
    lines.append("anomaly AUROC (patch level): " + ", ".join(f"{k} {v:.3f}" for k, v in auc.items()))
    if report.get("anomaly_auroc_model_parts"):
        lines.append("  each score alone: " + ", ".join(
            f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in report["anomaly_auroc_model_parts"].items()))
    for who, by in (report.get("anomaly_auroc_by_type") or {}).items():
        if by:
            lines.append(f"  {who} by event type: " + ", ".join(
                f"{t} {v:.3f}" if v is not None else f"{t} -" for t, v in by.items()))
    rows = [("model", report["alerts"], report["n_alerts"])] + [
        (k, v, v.get("n_alerts")) for k, v in (report.get("baseline_alerts") or {}).items()]
    for who, a, n in rows:
        lines.append(f"alerts ({who}): {n}, precision {a.get('precision')}, recall {a.get('recall')}, "
                     f"f1 {a.get('f1')}, median delay {a.get('median_detection_delay_days')} d, "
                     f"type guessed right {a.get('type_accuracy')} {a.get('type_guesses')}, "
                     f"false alarms on normal change {a.get('false_alarms_normal_change')}")
    sim = report.get("similar")
    if sim and sim.get("share") is not None:
        lines.append(f"similar: {sim['share']:.3f} of the {sim['k']} nearest latents (other places) share the "
                     f"query's land cover (chance {sim['chance']:.3f}, {sim['n_queries']} queries)")
    return "\n".join(lines)

