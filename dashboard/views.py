"""The parts of the page: sidebar filters, map, drill-down, alerts table and system panel.

Selection: an alert is picked on the map (click), in the table (row) or in the drill-down selectbox;
whichever was used last wins and the other two are reset. The choice lives in ``st.session_state``
(``sel_alert``, ``drill``, ``tile_pick``), never in the URL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date

import geopandas as gpd
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import cache, data, render
from dashboard.system import system_status

IMAGE_KINDS = {"True colour": "rgb", "NDVI": "ndvi", "None": None}
SCORE_MODES = ("Score on the map date", "Peak score", "Off")


@dataclass(frozen=True)
class MapOptions:
    t: int | None  # cube time index shown (None: no cube)
    image: str | None  # "rgb", "ndvi" or None
    score: str  # one of SCORE_MODES


def _bump(name: str) -> None:
    st.session_state[name] = st.session_state.get(name, 0) + 1


def _has_selection(key: str) -> bool:
    state = st.session_state.get(key)
    sel = state.get("selection", {}) if state is not None else {}
    return bool(sel.get("rows") or any(sel.get("indices", {}).values()))


def _pick(alert_id: str | None, source: str) -> None:
    """Select an alert from ``source`` ('map', 'table', 'box'); clear a selection still shown by the others
    (a new widget key: the map then returns to its initial view, so only when it shows one)."""
    if alert_id is None:
        return
    st.session_state["sel_alert"] = alert_id
    st.session_state["drill"] = "Alert"
    st.session_state["alert_pick"] = alert_id
    if source != "map" and _has_selection(f"map-{st.session_state.get('map_gen', 0)}"):
        _bump("map_gen")
    if source != "table" and _has_selection(f"table-{st.session_state.get('table_gen', 0)}"):
        _bump("table_gen")


def _on_map(key: str) -> None:
    objs = st.session_state[key].selection.get("objects", {}).get("alerts", [])
    if objs:
        props = objs[0].get("properties", objs[0])
        _pick(props.get("id"), "map")


def _on_table(key: str) -> None:
    rows = st.session_state[key].selection.get("rows", [])
    ids = st.session_state.get("table_ids", [])
    if rows and rows[0] < len(ids):
        _pick(ids[rows[0]], "table")


def _on_box() -> None:
    _pick(st.session_state.get("alert_pick"), "box")


def _forget_unless(key: str, fits) -> None:
    """Drop the widget state ``key`` (before the widget is drawn) when ``fits(value)`` is false."""
    if key in st.session_state:
        try:
            ok = bool(fits(st.session_state[key]))
        except (TypeError, ValueError, IndexError):
            ok = False
        if not ok:
            del st.session_state[key]


def sidebar(src: data.Sources, info: data.CubeInfo | None) -> tuple[data.AlertFilter, MapOptions]:
    """Filters (alert type, minimum score and confidence, dates, area) and map options (date, layers)."""
    sb = st.sidebar
    sb.header("Alerts")
    alerts = src.alerts
    flt = data.AlertFilter()
    if alerts is not None and len(alerts):
        types = sorted(alerts["type_guess"].unique())
        top = max(float(np.ceil(alerts["peak_score"].max())), 1.0)
        d0, d1 = alerts["first_detected"].min().date(), alerts["last_seen"].max().date()
        amax = max(float(np.ceil(alerts["area_ha"].max() * 10) / 10), 0.1)
        # new alerts can move the ranges: a choice made on older data that no longer fits is reset
        _forget_unless("f_types", lambda v: set(v) <= set(types))
        _forget_unless("f_score", lambda v: 0.0 <= v <= top)
        _forget_unless("f_dates", lambda v: all(d0 <= d <= d1 for d in v))
        _forget_unless("f_area", lambda v: 0.0 <= v[0] <= v[1] <= amax)
        chosen = sb.multiselect("Type", types, default=types, key="f_types")
        min_score = sb.slider("Minimum peak score (z)", 0.0, top, 0.0, 0.5, key="f_score")
        min_conf = sb.slider("Minimum confidence", 0.0, 1.0, 0.0, 0.05, key="f_conf")
        rng = sb.date_input("Active between", (d0, d1), min_value=d0, max_value=d1, key="f_dates")
        start, end = (rng[0], rng[-1]) if isinstance(rng, list | tuple) and rng else (d0, d1)
        area = sb.slider("Area (ha)", 0.0, amax, (0.0, amax), key="f_area")
        flt = data.AlertFilter(tuple(chosen), min_score, min_conf, start, end, area[0], area[1])
    else:
        sb.caption("No alerts to filter.")
    sb.header("Map")
    t = None
    if info is not None and len(info.times):
        days = [str(d)[:10] for d in info.times.astype("datetime64[D]")]
        default = cache.latest_clear(str(src.workdir.root), src.version)
        if st.session_state.get("f_date") not in days:
            st.session_state["f_date"] = days[default]
        day = sb.select_slider("Acquisition", days, key="f_date", help="Default: the latest clear acquisition")
        t = days.index(day)
    kind = sb.radio("Image", list(IMAGE_KINDS), key="f_image", horizontal=True)
    score = sb.radio("Score layer", SCORE_MODES, key="f_scores") if src.scores is not None else "Off"
    return flt, MapOptions(t, IMAGE_KINDS[kind], score)


def frame(src: data.Sources) -> data.Grid | None:
    """The grid the map is drawn in (the cube's, else the forecasts' or the scores')."""
    for ds in (src.cube, src.forecasts, src.scores):
        if ds is not None and ds.sizes.get("x", 0) > 1 and ds.sizes.get("y", 0) > 1:
            return data.grid_of(ds)
    return None


def map_view(src: data.Sources, opts: MapOptions, shown: gpd.GeoDataFrame | None, selected: str | None) -> None:
    """The deck.gl map: acquisition image, score layer and alert polygons; clicking an alert selects it."""
    root, version = str(src.workdir.root), src.version
    grid = frame(src)
    if grid is None:
        st.info("Nothing to map yet: the workdir has no cube, forecasts or scores. Run `geowm ingest` first.")
        return
    left, bottom, right, top = grid.bounds
    origin = (left, bottom)  # map coordinates: metres from the region's lower-left corner
    kx, ky = scale = grid.map_scale  # metres per CRS unit (a cube in degrees or feet)
    images, notes = [], []
    if opts.t is not None and opts.image is not None:
        url, clear = cache.map_image(root, version, opts.t, opts.image)
        day = str(src.cube["time"].values[opts.t])[:10]
        if url is None:
            notes.append(f"the cube has no bands for {opts.image.upper()}")
        else:
            images.append(("scene", url, [0.0, 0.0, (right - left) * kx, (top - bottom) * ky]))
            notes.append(f"{'true colour' if opts.image == 'rgb' else 'NDVI'} {day}, {clear * 100:.0f} % clear")
    if src.scores is not None and opts.score != "Off":
        when = None if opts.score == "Peak score" or opts.t is None else str(src.cube["time"].values[opts.t])
        url, label, (l0, b0, r0, t0) = cache.score_image(root, version, when)
        if url is not None:
            images.append(("scores", url, [(l0 - left) * kx, (b0 - bottom) * ky, (r0 - left) * kx,
                                           (t0 - bottom) * ky]))
        notes.append(label)
    fc = None
    if shown is not None:
        allf = cache.alert_features(root, version, grid.crs, origin, scale)
        keep = set(shown["id"])
        fc = {"type": "FeatureCollection", "features": [f for f in allf["features"] if f["properties"]["id"] in keep]}
        notes.append(f"{len(fc['features'])} alert(s)")
    sel = None
    if selected is not None and src.alerts is not None:
        row = src.alerts[src.alerts["id"] == selected]
        if len(row):
            sel = render.selected_feature(row.geometry.iloc[0], grid.crs, origin, scale)
    deck = render.map_deck(((right - left) * kx, (top - bottom) * ky), images, fc, sel)
    key = f"map-{st.session_state.get('map_gen', 0)}"
    st.pydeck_chart(deck, on_select=lambda: _on_map(key), selection_mode="single-object", key=key, height=560,
                    alt="Map of the region with alert polygons")
    legend = " ".join(f"<span style='color:rgb{c}'>■</span> {t}" for t, c in render.TYPE_COLORS.items())
    st.caption(" · ".join(notes) + f"  \nAlert colour by type ({legend}), opacity by peak score.",
               unsafe_allow_html=True)


def drilldown_view(src: data.Sources, info: data.CubeInfo | None, shown: gpd.GeoDataFrame | None) -> None:
    """Pick an alert or a tile; its NDVI (observed, forecast) and score through time, and alert chips."""
    root, version = str(src.workdir.root), src.version
    st.subheader("Drill-down")
    if info is None:
        st.info("No cube yet: the observed series and chips need `cube/` (run `geowm ingest`).")
        return
    has_alerts = shown is not None and len(shown) > 0
    mode = st.radio("Drill down on", ["Alert", "Tile"], key="drill", horizontal=True,
                    disabled=not has_alerts) if has_alerts else "Tile"
    if mode == "Alert":
        ids = list(shown["id"])
        label = dict(zip(ids, [f"{i} · {t} · score {s:.1f}" for i, t, s in
                               zip(ids, shown["type_guess"], shown["peak_score"], strict=True)], strict=True))
        st.selectbox("Alert", ids, key="alert_pick", format_func=label.get, on_change=_on_box)
        key, kind = st.session_state["alert_pick"], "alert"
        row = shown[shown["id"] == key].iloc[0]
        title = f"{key} · {row['type_guess']} · peak score {row['peak_score']:.1f}"
        event = (np.datetime64(row["first_detected"]), np.datetime64(row["last_seen"]))
    else:
        key = st.selectbox("Tile (row_col)", info.tiles(), key="tile_pick")
        kind, title, event = "tile", f"tile {key}", None
    d = cache.drilldown(root, version, kind, key)
    missing = [what for what, key in (("forecasts (`geowm forecast`)", "forecasts"),
                                      ("anomaly scores (`geowm anomalies`)", "scores")) if d[key] is None]
    if missing:
        st.caption(f"Not in the chart yet: no {' and no '.join(missing)}.")
    empty = pd.DataFrame(columns=["init_time", "lead_days", "valid_time", "p10", "p50", "p90"])
    fig = render.series_figure(title, d["observed"], d["forecasts"] if d["forecasts"] is not None else empty,
                               d["scores"] if d["scores"] is not None else
                               pd.DataFrame(columns=["time", "score_max"]), event)
    st.plotly_chart(fig, key="series", config={"displaylogo": False})
    if kind == "alert":
        cols = st.columns(2)
        for col, (name, img, caption) in zip(cols, cache.chips(root, version, key), strict=True):
            with col:
                if img is None:
                    st.caption(f"{name}: {caption}")
                else:
                    st.image(img, caption=f"{name}: {caption}", width="stretch")


def table_view(src: data.Sources, shown: gpd.GeoDataFrame) -> None:
    """The filtered alerts: sortable, row selection drills down, CSV and GeoJSON downloads."""
    root, version = str(src.workdir.root), src.version
    table = cache.alerts_table(root, version)
    table = table.set_index("id").loc[list(shown["id"])].reset_index()
    st.session_state["table_ids"] = list(table["id"])
    key = f"table-{st.session_state.get('table_gen', 0)}"
    st.dataframe(table, key=key, on_select=lambda: _on_table(key), selection_mode="single-row", hide_index=True,
                 height=min(38 + 35 * len(table), 420),
                 column_config={"peak_score": st.column_config.NumberColumn("peak score", format="%.2f"),
                                "confidence": st.column_config.ProgressColumn("confidence", min_value=0, max_value=1,
                                                                              format="%.2f"),
                                "area_ha": st.column_config.NumberColumn("area (ha)", format="%.2f")})
    stamp = date.today().isoformat()
    c1, c2, _ = st.columns([1, 1, 4])
    # the files are made when a button is clicked, not on every rerun
    c1.download_button("Download CSV", lambda: data.alerts_csv(shown), f"alerts-{stamp}.csv", "text/csv",
                       key="dl_csv", on_click="ignore")
    c2.download_button("Download GeoJSON", lambda: data.alerts_geojson(shown), f"alerts-{stamp}.geojson",
                       "application/geo+json", key="dl_geojson", on_click="ignore")


def system_view(src: data.Sources) -> None:
    """Freshness (last acquisition, last forecast init), model run, and the latest Prefect flow runs."""
    status = system_status(src)
    st.dataframe(pd.DataFrame({"item": list(status), "value": list(status.values())}), hide_index=True,
                 key="system_table")
    msg, runs = cache.prefect(os.environ.get("PREFECT_API_URL"))
    st.caption(msg)
    if len(runs):
        st.dataframe(runs, hide_index=True, key="prefect_runs")


def warm(root: str) -> None:
    """Compute what a first visit shows with the default settings (the latest clear acquisition in true colour,
    its score layer, every alert, the table, the top alert's drill-down and chips), so that visit is served from
    the caches. Run by the launcher in the background at start-up and then periodically (new data)."""
    src = cache.sources(root)
    version, grid = src.version, frame(src)
    info = cache.cube_info(root, version) if src.cube is not None else None
    if info is not None and len(info.times):
        t = cache.latest_clear(root, version)
        cache.map_image(root, version, t, "rgb")
        if src.scores is not None:
            cache.score_image(root, version, str(src.cube["time"].values[t]))
    if src.alerts is not None and len(src.alerts) and grid is not None:
        cache.alert_features(root, version, grid.crs, (grid.bounds[0], grid.bounds[1]), grid.map_scale)
        cache.alerts_table(root, version)
        if info is not None:
            top = data.filter_alerts(src.alerts, data.AlertFilter())["id"].iloc[0]
            cache.drilldown(root, version, "alert", top)
            cache.chips(root, version, top)
    elif info is not None:
        cache.drilldown(root, version, "tile", info.tiles()[0])
