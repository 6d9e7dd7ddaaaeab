"""Streamlit caches around :mod:`dashboard.data`, :mod:`dashboard.series` and :mod:`dashboard.render`.

The opened workdir is a shared resource, re-opened every ``REFRESH_S`` seconds (new ingests, forecasts
and alerts appear without a restart). Everything derived from it is cached under the workdir's
``version`` (cube and forecast snapshots, alert file times), so a change in the data is never served
from a stale cache and navigation over unchanged data reads nothing twice.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import data, render, series
from dashboard.system import prefect_runs

REFRESH_S = 30  # seconds between re-opening the workdir (to pick up new snapshots)


@st.cache_resource(ttl=REFRESH_S, show_spinner=False)
def sources(root: str) -> data.Sources:
    """The opened workdir (shared by every session)."""
    return data.open_sources(root)


@st.cache_data(show_spinner=False, max_entries=4)
def cube_info(root: str, version: str) -> data.CubeInfo:
    return data.cube_info(sources(root).cube)


@st.cache_data(show_spinner="Finding the latest clear acquisition...", max_entries=4)
def latest_clear(root: str, version: str) -> int:
    return data.latest_clear(sources(root).cube)


@st.cache_data(show_spinner=False, max_entries=12)
def _scene(root: str, version: str, t: int) -> dict:
    return data.scene(sources(root).cube, t)


@st.cache_data(show_spinner="Reading the acquisition...", max_entries=24)
def map_image(root: str, version: str, t: int, kind: str) -> tuple[str | None, float]:
    """(data URL of the acquisition ``t`` as 'rgb' or 'ndvi', or None without those bands; clear share 0..1)."""
    sc = _scene(root, version, t)
    arr = sc.get(kind)
    if arr is None:
        return None, float(sc["clear_fraction"])
    rgba = render.rgb_rgba(arr) if kind == "rgb" else render.ndvi_rgba(arr)
    return render.image_data_url(rgba), float(sc["clear_fraction"])


@st.cache_data(show_spinner=False, max_entries=24)
def score_image(root: str, version: str, when: str | None) -> tuple[str | None, str, list[float]]:
    """(data URL of the score layer or None, label, [left, bottom, right, top] in the scores' CRS); ``when``:
    an ISO date (the last score on or before it) or None (the peak over all scored dates)."""
    scores = sources(root).scores
    values, label = data.score_image(scores, None if when is None else np.datetime64(when, "ns"))
    bounds = list(data.grid_of(scores).bounds)
    return (render.image_data_url(render.score_rgba(values)) if values is not None else None), label, bounds


@st.cache_data(show_spinner=False, max_entries=4)
def alert_features(root: str, version: str, crs: str, origin: tuple[float, float],
                   scale: tuple[float, float] = (1.0, 1.0)) -> dict:
    """Every alert as map features (filtered per rerun by id, which is cheap)."""
    return render.alert_features(sources(root).alerts, crs, origin, scale)


@st.cache_data(show_spinner=False, max_entries=4)
def alerts_table(root: str, version: str) -> pd.DataFrame:
    return data.alerts_table(sources(root).alerts)


def _region(root: str, version: str, kind: str, key: str) -> series.Region:
    src = sources(root)
    if kind == "alert":
        row = src.alerts[src.alerts["id"] == key]
        if row.empty:
            raise data.WorkdirError(f"no alert {key}")
        return series.alert_region(data.grid_of(src.cube), row.iloc[0])
    return series.tile_region(cube_info(root, version), key)


@st.cache_data(show_spinner="Reading the series...", max_entries=64)
def drilldown(root: str, version: str, kind: str, key: str) -> dict:
    """Series of an alert (``kind='alert'``, key = its id) or a tile (key = ``row_col``): DataFrames
    ``observed``, ``forecasts``, ``scores``; the footprint ``region``."""
    src = sources(root)
    region = _region(root, version, kind, key)
    grid = data.grid_of(src.cube)
    return {
        "region": region,
        "observed": series.observed_ndvi(src.cube, region),
        "forecasts": series.forecast_ndvi(src.forecasts, grid, region) if src.forecasts is not None else None,
        "scores": series.score_series(src.scores, grid, region) if src.scores is not None else None,
    }


@st.cache_data(show_spinner="Reading the chips...", max_entries=64)
def chips(root: str, version: str, alert_id: str) -> list[tuple[str, np.ndarray | None, str]]:
    """Before/after chips of an alert: (title, RGBA image upsampled with the footprint outlined, or None, caption)."""
    d = drilldown(root, version, "alert", alert_id)
    region, obs = d["region"], d["observed"]
    before, after = series.chip_dates(obs, region.first_detected, region.last_seen)
    clear = dict(zip(obs["time"].to_numpy().astype("datetime64[ns]"), obs["window_clear_fraction"], strict=True))
    scale = max(1, 240 // max(region.mask.shape))
    out = []
    for title, when in (("before", before), ("after", after)):
        if when is None:
            out.append((title, None, "no clear acquisition"))
            continue
        rgb = series.chip(sources(root).cube, region, when)
        img = render.outline(render.rgb_rgba(rgb), region.mask, scale=scale) if rgb is not None else None
        out.append((title, img, f"{str(when)[:10]} ({clear[np.datetime64(when, 'ns')] * 100:.0f} % clear)"))
    return out


@st.cache_data(ttl=15, show_spinner=False)
def prefect(api_url: str | None) -> tuple[str, pd.DataFrame]:
    return prefect_runs(api_url)
