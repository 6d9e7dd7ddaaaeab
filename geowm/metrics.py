"""Evaluation of scores and alerts against ground-truth events (synthetic truth or field data).

Ground truth is a GeoJSON FeatureCollection in EPSG:4326 whose top-level ``"geowm:crs"`` names the native CRS;
each feature has properties ``id``, ``type`` (clearcut, fire, flood, drought, harvest, mowing), ``start`` and
``end`` (ISO dates) and ``anomaly`` (True for disturbances, False for normal change that must not be flagged).

Two levels:

- cells (patches / pixels): ``patch_labels`` gives 1 / 0 / -1 (anomaly / nothing / excluded) per
  (time, y, x); ``auroc`` ranks scores of label-1 cells against label-0 cells;
- alerts (polygons): ``alert_scores`` matches alerts to events in space and time and reports precision,
  recall, F1, detection delay, per-type recall and false alarms on normal change (harvest, mowing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import xarray as xr
from rasterio import features
from scipy.stats import rankdata

from geowm.alerts import grid_transform

REQUIRED_PROPERTIES = ("id", "type", "start", "end", "anomaly")
# abrupt, lasting change (a failed crop stays so until its harvest): surprising only for a while after start
PERSISTENT_TYPES = ("clearcut", "fire", "crop_failure")
DAY = pd.Timedelta(days=1)


def load_events(path: str | os.PathLike) -> gpd.GeoDataFrame:
    """Read a ground-truth events GeoJSON -> GeoDataFrame (EPSG:4326), ``start``/``end`` as datetimes.

    The native CRS (``"geowm:crs"``) is kept in ``gdf.attrs["crs"]``. Raises ``ValueError`` naming the file
    on invalid JSON, a missing FeatureCollection or missing properties.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection" or not isinstance(
            doc.get("features"), list):
        raise ValueError(f"{path}: expected a GeoJSON FeatureCollection with a 'features' list")
    for i, feat in enumerate(doc["features"]):
        props = feat.get("properties") or {}
        missing = [k for k in REQUIRED_PROPERTIES if k not in props]
        if missing or not feat.get("geometry"):
            what = f"properties {missing}" if missing else "geometry"
            raise ValueError(f"{path}: feature {i} (id={props.get('id')!r}) lacks {what}")
    if doc["features"]:
        gdf = gpd.GeoDataFrame.from_features(doc["features"], crs="EPSG:4326")
    else:
        gdf = gpd.GeoDataFrame({k: [] for k in REQUIRED_PROPERTIES}, geometry=[], crs="EPSG:4326")
    try:
        gdf["start"] = pd.to_datetime(gdf["start"]).astype("datetime64[ns]")
        gdf["end"] = pd.to_datetime(gdf["end"]).astype("datetime64[ns]")
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: bad start/end date ({e})") from e
    gdf["anomaly"] = gdf["anomaly"].astype(bool)
    gdf["id"] = gdf["id"].astype(str)
    gdf.attrs["crs"] = doc.get("geowm:crs")
    return gdf


def _native(events: gpd.GeoDataFrame, crs: str | None) -> gpd.GeoDataFrame:
    crs = crs or events.attrs.get("crs")
    if crs is None:
        raise ValueError("no CRS given and the events carry none (attrs['crs'])")
    return events.to_crs(crs)


def _masks(geoms, shape: tuple[int, int], transform, all_touched: bool) -> list[np.ndarray]:
    return [features.geometry_mask([g], out_shape=shape, transform=transform, invert=True, all_touched=all_touched)
            if g is not None and not g.is_empty else np.zeros(shape, bool) for g in geoms]


def rasterize_events(events: gpd.GeoDataFrame, like: xr.DataArray, crs: str | None = None,
                     all_touched: bool = False) -> dict[str, np.ndarray]:
    """Per-event cell masks on the grid of ``like`` (dims y, x; cell-centre coords in ``crs``).

    Returns ``{event id: (y, x) bool}``; a cell belongs to an event when its centre lies inside the polygon
    (or, with ``all_touched``, when the polygon touches it). ``crs`` defaults to ``events.attrs["crs"]``.
    """
    ev = _native(events, crs)
    y, x = like["y"].values, like["x"].values
    masks = _masks(ev.geometry, (y.size, x.size), grid_transform(y, x), all_touched)
    return dict(zip(ev["id"].astype(str), masks, strict=True))


def patch_labels(events: gpd.GeoDataFrame, times, y, x, crs: str | None = None, persist_days: float = 60,
                 recovery_days: float = 30) -> xr.DataArray:
    """Cell labels (time, y, x) int8 for scoring: 1 anomaly, 0 no event, -1 excluded.

    An anomaly event (``anomaly`` True) is *active* on ``start <= t <= end``, but for abrupt persistent
    types (clearcut, fire, crop_failure) only on ``start <= t <= start + persist_days``. Label 1 where an anomaly
    is active and covers the cell centre. Label -1 (excluded from AUROC, used for false-alarm rates): cells only partly
    covered by an active anomaly, cells of an anomaly outside its active window but before ``end +
    recovery_days`` (persistent state, recovery), and cells touched by normal change (``anomaly`` False:
    harvest, mowing) on ``start <= t <= end + recovery_days``. 1 wins over -1, -1 over 0.
    """
    times = pd.DatetimeIndex(np.asarray(times, dtype="datetime64[ns]"))
    y, x = np.asarray(y), np.asarray(x)
    ev = _native(events, crs)
    shape = (y.size, x.size)
    transform = grid_transform(y, x)
    pos = np.zeros((times.size, *shape), bool)
    amb = np.zeros((times.size, *shape), bool)
    centre = _masks(ev.geometry, shape, transform, all_touched=False)
    touched = _masks(ev.geometry, shape, transform, all_touched=True)
    for (_, e), cm, tm in zip(ev.iterrows(), centre, touched, strict=True):
        start, end = pd.Timestamp(e["start"]), pd.Timestamp(e["end"])
        if bool(e["anomaly"]):
            act_end = min(end, start + persist_days * DAY) if e["type"] in PERSISTENT_TYPES else end
            act = (times >= start) & (times <= act_end)
            after = (times > act_end) & (times <= end + recovery_days * DAY)
            pos[act] |= cm
            amb[act] |= tm & ~cm
            amb[after] |= tm
        else:
            amb[(times >= start) & (times <= end + recovery_days * DAY)] |= tm
    lab = np.where(pos, 1, np.where(amb, -1, 0)).astype(np.int8)
    return xr.DataArray(lab, coords={"time": times.values, "y": y, "x": x}, dims=("time", "y", "x"),
                        name="label")


def auroc(scores, labels) -> float:
    """Area under the ROC curve by ranks (Mann-Whitney U), ties counted one half.

    ``labels``: 1 / True positive, 0 / False negative; any other value (e.g. -1 from ``patch_labels``) and
    NaN scores are dropped. NaN when either class is empty.
    """
    s = np.asarray(scores, dtype=float).ravel()
    lab = np.asarray(labels).astype(float).ravel()
    if s.shape != lab.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {lab.size}")
    keep = np.isfinite(s) & ((lab == 0) | (lab == 1))
    s, lab = s[keep], lab[keep]
    n_pos, n_neg = int((lab == 1).sum()), int((lab == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    u = ranks[lab == 1].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def false_alarm_rates(scores, labels, threshold: float) -> dict[str, float]:
    """Share of clear cells at or above ``threshold`` among label-0 cells and among label -1 cells."""
    s = np.asarray(scores, dtype=float).ravel()
    lab = np.asarray(labels).ravel()
    out = {}
    for name, val in (("no_event", 0), ("excluded", -1)):
        sel = np.isfinite(s) & (lab == val)
        out[name] = float((s[sel] >= threshold).mean()) if sel.any() else float("nan")
    return out


def _matches(alerts: gpd.GeoDataFrame, events: gpd.GeoDataFrame, before_days: float,
             after_days: float) -> pd.DataFrame:
    """(alert row, event row) pairs that intersect and whose first_detected is in the event's time window."""
    if len(alerts) == 0 or len(events) == 0:
        return pd.DataFrame({"a": pd.Series(dtype=int), "e": pd.Series(dtype=int)})
    a = gpd.GeoDataFrame({"a": np.arange(len(alerts))}, geometry=alerts.geometry.to_crs(events.crs).values,
                         crs=events.crs)
    e = gpd.GeoDataFrame({"e": np.arange(len(events))}, geometry=events.geometry.values, crs=events.crs)
    pairs = gpd.sjoin(a, e, predicate="intersects")[["a", "e"]].reset_index(drop=True)
    fd = pd.to_datetime(alerts["first_detected"]).values[pairs["a"].values]
    start = pd.to_datetime(events["start"]).values[pairs["e"].values]
    end = pd.to_datetime(events["end"]).values[pairs["e"].values]
    ok = (fd >= start - np.timedelta64(int(before_days * 86400), "s")) & (
        fd <= end + np.timedelta64(int(after_days * 86400), "s"))
    return pairs[ok].reset_index(drop=True)


def alert_scores(alerts: gpd.GeoDataFrame, events: gpd.GeoDataFrame, before_days: float = 5,
                 after_days: float = 60, since=None) -> dict:
    """Alert-level skill against ground truth.

    An alert is a true positive when it intersects an anomaly event and its ``first_detected`` lies in
    ``[start - before_days, end + after_days]``; an event is detected when a true-positive alert matches it.
    A false alarm on normal change is an alert that matches no anomaly event but matches (same space and
    time rule) a normal-change event (``anomaly`` False: harvest, mowing). Returns precision (NaN without
    alerts), recall (NaN without anomaly events), f1, counts, ``median_detection_delay_days`` (earliest
    matching first_detected - start, over detected events; NaN if none), ``recall_by_type``,
    ``type_accuracy`` (the share of true-positive alerts whose ``type_guess`` is the type of an event they match;
    NaN without any), ``type_guesses`` (event type -> {guess: true-positive alerts matching such an event}) and
    ``false_alarms_normal_change`` = {count: such alerts, events: normal events hit, rate: share of normal
    events hit}.

    ``since`` (the start of the scored period): anomaly events that began before it cannot be detected on
    time, so they are left out of recall, the delay and ``recall_by_type`` (``n_events_ongoing`` counts
    them); an alert on such a still-active event is still a true positive, not a false alarm. The false-alarm
    rate then counts only the normal events that had not ended before ``since`` (``of``).
    """
    events = events.reset_index(drop=True)
    alerts = alerts.reset_index(drop=True)
    anomaly = events["anomaly"].astype(bool).values
    ano, normal = events[anomaly].reset_index(drop=True), events[~anomaly].reset_index(drop=True)
    tp_pairs = _matches(alerts, ano, before_days, after_days)
    tp_alerts = np.zeros(len(alerts), bool)
    tp_alerts[tp_pairs["a"].values] = True
    detected = np.zeros(len(ano), bool)
    detected[tp_pairs["e"].values] = True
    scored = np.ones(len(ano), bool) if since is None else (
        pd.to_datetime(ano["start"]).values >= np.datetime64(pd.Timestamp(since).tz_localize(None), "ns"))
    n_alerts, n_events = len(alerts), int(scored.sum())
    precision = tp_alerts.sum() / n_alerts if n_alerts else float("nan")
    recall = detected[scored].sum() / n_events if n_events else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else (
        0.0 if n_alerts and n_events else float("nan"))
    delays = []
    if len(tp_pairs):
        fd = pd.to_datetime(alerts["first_detected"]).values[tp_pairs["a"].values]
        per = pd.Series(fd, index=tp_pairs["e"].values).groupby(level=0).min()
        delays = [(per[i] - pd.Timestamp(ano["start"].iloc[i])) / DAY for i in per.index if scored[i]]
    by_type = {str(t): float(detected[scored & (ano["type"] == t).values].mean())
               for t in sorted(ano["type"][scored].unique())}
    guessed: dict[int, tuple[str, set[str]]] = {}  # true-positive alert -> (its guess, the types it matches)
    if len(tp_pairs) and "type_guess" in alerts:
        for a, e in zip(tp_pairs["a"].values, tp_pairs["e"].values, strict=True):
            guessed.setdefault(int(a), (str(alerts["type_guess"].iloc[a]), set()))[1].add(str(ano["type"].iloc[e]))
    confusion: dict[str, dict[str, int]] = {}
    for guess, types in guessed.values():
        for t in types:
            confusion.setdefault(t, {}).setdefault(guess, 0)
            confusion[t][guess] += 1
    fa_pairs = _matches(alerts[~tp_alerts], normal, before_days, after_days)
    n_normal_hit = int(fa_pairs["e"].nunique())
    n_normal = len(normal) if since is None else int(  # normal events still going on when scoring began
        (pd.to_datetime(normal["end"]).values >= np.datetime64(pd.Timestamp(since).tz_localize(None), "ns")).sum())
    return {
        "n_alerts": int(n_alerts), "n_true_positive_alerts": int(tp_alerts.sum()),
        "n_events": int(n_events), "n_detected": int(detected[scored].sum()),
        "n_events_ongoing": int((~scored).sum()),
        "precision": float(precision), "recall": float(recall), "f1": float(f1),
        "median_detection_delay_days": float(np.median(delays)) if delays else float("nan"),
        "recall_by_type": by_type,
        "type_accuracy": (sum(g in types for g, types in guessed.values()) / len(guessed) if guessed
                          else float("nan")),
        "type_guesses": {t: dict(sorted(c.items())) for t, c in sorted(confusion.items())},
        "false_alarms_normal_change": {
            "count": int(fa_pairs["a"].nunique()), "events": n_normal_hit,
            "rate": n_normal_hit / n_normal if n_normal else float("nan"), "of": n_normal},
    }
