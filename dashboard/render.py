"""Pictures for the page: colour ramps, PNG data URLs, the deck.gl map and the plotly series chart.

The map is a deck.gl ``OrthographicView`` in the cube CRS (metres from the region's lower-left corner),
so images and polygons line up exactly and nothing is fetched from the internet (no basemap tiles).
"""

from __future__ import annotations

import base64
import io
import json
import math

import geopandas as gpd
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pydeck as pdk
import shapely
from PIL import Image, features
from plotly.subplots import make_subplots
from pydeck.bindings.json_tools import default_serialize

TYPE_COLORS = {"clearcut": (230, 120, 20), "fire": (215, 25, 28), "flood": (30, 110, 235),
               "drought": (200, 170, 0), "crop_failure": (120, 160, 30),
               "unknown": (150, 80, 190)}  # alert fill colour by type (RGB)
WEBP = bool(features.check("webp"))  # Pillow built with libwebp (Chromium, Firefox, Safari show it)
RGB_MAX = 0.3  # reflectance shown as full brightness in true colour
NDVI_STOPS = [(-0.2, (120, 70, 20)), (0.2, (225, 205, 140)), (0.5, (120, 190, 80)), (0.9, (0, 100, 30))]
SCORE_STOPS = [(3.0, (255, 255, 170, 0)), (4.0, (254, 204, 92, 150)), (6.0, (253, 141, 60, 190)),
               (8.0, (240, 59, 32, 220)), (12.0, (189, 0, 38, 240))]  # robust z -> RGBA; below 3: transparent


TOOLTIP = {"html": "<b>{id}</b><br/>{alert_type}, peak score {peak_score}, confidence {confidence}<br/>"
                   "{area_ha} ha, first detected {first_detected}"}  # {name}: a property of the alert feature


def ramp(values: np.ndarray, stops: list[tuple[float, tuple[int, ...]]]) -> np.ndarray:
    """Piecewise-linear colour ramp: values (...) -> uint8 (..., len(colour)); NaN -> all zeros (transparent)."""
    xs = np.array([s for s, _ in stops], float)
    cols = np.array([c for _, c in stops], float)
    v = np.asarray(values, float)
    out = np.stack([np.interp(v, xs, cols[:, k]) for k in range(cols.shape[1])], axis=-1)
    out[~np.isfinite(v)] = 0
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def rgb_rgba(rgb: np.ndarray, gamma: float = 1.0 / 1.3) -> np.ndarray:
    """Reflectance (3, h, w) -> true-colour RGBA (h, w, 4), 0..RGB_MAX stretched, fill transparent."""
    ok = np.isfinite(rgb).all(axis=0)
    v = np.clip(np.nan_to_num(rgb, nan=0.0) / RGB_MAX, 0, 1) ** gamma
    out = np.zeros(rgb.shape[1:] + (4,), np.uint8)
    out[..., :3] = np.round(np.moveaxis(v, 0, -1) * 255)
    out[..., 3] = np.where(ok, 255, 0)
    return out


def ndvi_rgba(ndvi: np.ndarray) -> np.ndarray:
    """NDVI (h, w) -> brown-to-green RGBA; NaN (no clear pixel) transparent."""
    rgb = ramp(ndvi, NDVI_STOPS)
    alpha = np.where(np.isfinite(ndvi), 255, 0).astype(np.uint8)
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def score_rgba(score: np.ndarray) -> np.ndarray:
    """Anomaly score (h, w), robust z -> yellow-to-red RGBA; below 3 and NaN transparent."""
    out = ramp(np.where(np.asarray(score, float) < SCORE_STOPS[0][0], np.nan, score), SCORE_STOPS)
    return out


def png_data_url(rgba: np.ndarray) -> str:
    """An RGBA image (h, w, 4) uint8 as a ``data:image/png;base64,...`` URL."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba), "RGBA").save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_data_url(rgba: np.ndarray, quality: int = 85) -> str:
    """An RGBA image as a compact data URL: lossy WebP (with alpha) where Pillow has it, else JPEG when fully
    opaque, else PNG. A 512 px NDVI image: ~0.7 MB as PNG, a tenth of that as WebP."""
    buf = io.BytesIO()
    if WEBP:
        Image.fromarray(np.ascontiguousarray(rgba), "RGBA").save(buf, format="WEBP", quality=quality, method=0)
        return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()
    if rgba[..., 3].min() == 255:
        Image.fromarray(np.ascontiguousarray(rgba[..., :3]), "RGB").save(buf, format="JPEG", quality=quality)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return png_data_url(rgba)


def outline(rgba: np.ndarray, mask: np.ndarray, color=(255, 255, 0, 255), scale: int = 1) -> np.ndarray:
    """Upsample ``rgba`` by ``scale`` (nearest) and draw the edge of ``mask`` (h, w) on it in ``color``."""
    img = np.repeat(np.repeat(rgba, scale, 0), scale, 1)
    m = np.repeat(np.repeat(mask, scale, 0), scale, 1)
    pad = np.pad(m, 1, constant_values=False)
    edge = m & ~(pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:])
    img[edge] = color
    return img


def to_map(geoms, origin: tuple[float, float], scale: tuple[float, float] = (1.0, 1.0)):
    """Geometries in the cube CRS as map metres: minus ``origin`` (the region's lower-left corner), times
    ``scale`` (metres per CRS unit, :attr:`dashboard.data.Grid.map_scale`), to 0.1 m (plenty on screen, and
    shorter JSON)."""
    return shapely.transform(geoms, lambda c: np.round((c - np.asarray(origin)) * np.asarray(scale), 1))


def alert_features(alerts: gpd.GeoDataFrame, crs: str, origin: tuple[float, float],
                   scale: tuple[float, float] = (1.0, 1.0)) -> dict:
    """Alerts as a GeoJSON FeatureCollection in map metres (:func:`to_map` of their cube-CRS geometry), with
    properties ``id``, ``alert_type``, ``peak_score``, ``confidence``, ``area_ha``, ``first_detected``, RGBA
    ``fill`` (colour by type, opacity by peak score) and ``line``."""
    if len(alerts) == 0:
        return {"type": "FeatureCollection", "features": []}
    geoms = to_map(alerts.geometry.to_crs(crs).to_numpy(), origin, scale)
    score = alerts["peak_score"].to_numpy(float)
    alpha = np.clip(40 + 12 * (score - 3.0), 40, 170).astype(int)  # fill opacity by peak score
    feats = []
    for (_, row), geom, a in zip(alerts.iterrows(), geoms, alpha, strict=True):
        rgb = TYPE_COLORS.get(row["type_guess"], TYPE_COLORS["unknown"])
        feats.append({"type": "Feature", "geometry": geom.__geo_interface__, "properties": {
            "id": row["id"], "alert_type": row["type_guess"], "peak_score": round(float(row["peak_score"]), 2),
            "confidence": round(float(row["confidence"]), 3), "area_ha": round(float(row["area_ha"]), 2),
            "first_detected": str(row["first_detected"])[:10], "fill": [*rgb, int(a)], "line": [*rgb, 255]}})
    return {"type": "FeatureCollection", "features": feats}


class CompactDeck(pdk.Deck):
    """A pydeck Deck whose JSON has no indentation (pydeck indents by 2: three times the bytes to send)."""

    def to_json(self) -> str:
        return json.dumps(self, sort_keys=True, default=default_serialize, separators=(",", ":"))


def fit_zoom(width_m: float, height_m: float, px_w: int = 900, px_h: int = 560) -> float:
    """OrthographicView zoom (log2 pixels per metre) that fits a width_m x height_m region in the chart."""
    return math.log2(0.92 * min(px_w / max(width_m, 1e-9), px_h / max(height_m, 1e-9)))


def map_deck(extent: tuple[float, float], images: list[tuple[str, str, list[float]]], alerts_fc: dict | None,
             selected: dict | None = None) -> pdk.Deck:
    """The map: bitmap layers ``(id, data URL, [left, bottom, right, top] in map metres)``, the alert
    polygons (pickable, layer id ``alerts``) and the selected footprint's outline, over a region of
    ``extent`` = (width, height) metres. No basemap."""
    layers = [pdk.Layer("BitmapLayer", id=lid, image=pdk.types.String(url), bounds=bounds, pickable=False)
              for lid, url, bounds in images]
    if alerts_fc is not None:
        layers.append(pdk.Layer("GeoJsonLayer", id="alerts", data=alerts_fc, pickable=True, stroked=True,
                                filled=True, get_fill_color="properties.fill", get_line_color="properties.line",
                                line_width_min_pixels=1, auto_highlight=True))
    if selected is not None:
        layers.append(pdk.Layer("GeoJsonLayer", id="selected", data=selected, pickable=False, stroked=True,
                                filled=False, get_line_color=[0, 255, 255, 255], line_width_min_pixels=3))
    w, h = extent
    view = pdk.View(type="OrthographicView", controller=True, flip_y=False)
    state = pdk.ViewState(target=[w / 2, h / 2, 0], zoom=fit_zoom(w, h), min_zoom=fit_zoom(w, h) - 2, max_zoom=6)
    return CompactDeck(layers=layers, views=[view], initial_view_state=state, map_provider=None, map_style=None,
                       tooltip=TOOLTIP)


def selected_feature(geom, crs: str, origin: tuple[float, float], scale: tuple[float, float] = (1.0, 1.0)) -> dict:
    """One footprint (shapely, EPSG:4326) as a FeatureCollection in map metres (:func:`to_map`)."""
    g = to_map(gpd.GeoSeries([geom], crs=4326).to_crs(crs).to_numpy(), origin, scale)[0]
    return {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
                                                       "geometry": g.__geo_interface__}]}


def series_figure(title: str, observed: pd.DataFrame, forecasts: pd.DataFrame, scores: pd.DataFrame,
                  event: tuple[np.datetime64, np.datetime64] | None = None, threshold: float = 4.0) -> go.Figure:
    """NDVI through time (observed clear means; forecast p50 with the p10-p90 band per init) over the
    anomaly score of the footprint's patches (max, robust z), the alert's detection period shaded."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.68, 0.32], vertical_spacing=0.06)
    obs = observed.dropna(subset=["ndvi"])
    fig.add_trace(go.Scatter(x=obs["time"], y=obs["ndvi"], mode="lines+markers", name="observed NDVI (clear)",
                             line={"color": "#2b8a3e"}, marker={"size": 5},
                             customdata=np.round(obs["clear_fraction"] * 100),
                             hovertemplate="%{x|%Y-%m-%d}: NDVI %{y:.3f} (%{customdata:.0f} % clear)<extra></extra>"),
                  row=1, col=1)
    for k, (init, g) in enumerate(forecasts.groupby("init_time", sort=True)):
        g = g.sort_values("valid_time").dropna(subset=["p50"])
        if g.empty:
            continue
        day = str(np.datetime64(init, "D"))
        first = k == 0
        fig.add_trace(go.Scatter(x=pd.concat([g["valid_time"], g["valid_time"][::-1]]),
                                 y=pd.concat([g["p90"], g["p10"][::-1]]), fill="toself", mode="lines",
                                 line={"width": 0}, fillcolor="rgba(31,119,180,0.18)", hoverinfo="skip",
                                 name="forecast p10-p90", legendgroup="fc-band", showlegend=first), row=1, col=1)
        fig.add_trace(go.Scatter(x=g["valid_time"], y=g["p50"], mode="lines+markers", name="forecast p50",
                                 legendgroup="fc", showlegend=first, line={"color": "#1f77b4", "dash": "dot"},
                                 marker={"size": 5}, customdata=np.stack([g["p10"], g["p90"]], -1),
                                 hovertemplate=f"init {day} → %{{x|%Y-%m-%d}}: p50 %{{y:.3f}} "
                                               "(p10 %{customdata[0]:.3f}, p90 %{customdata[1]:.3f})<extra></extra>"),
                      row=1, col=1)
    sc = scores.dropna(subset=["score_max"])
    fig.add_trace(go.Scatter(x=sc["time"], y=sc["score_max"], mode="lines+markers", name="anomaly score (max)",
                             line={"color": "#d9480f"}, marker={"size": 5},
                             hovertemplate="%{x|%Y-%m-%d}: score %{y:.2f}<extra></extra>"), row=2, col=1)
    if len(sc):
        fig.add_hline(y=threshold, line={"dash": "dash", "color": "#868e96", "width": 1}, row=2, col=1)
    if event is not None:
        fig.add_vrect(x0=pd.Timestamp(event[0]), x1=pd.Timestamp(event[1]) + pd.Timedelta(hours=12),
                      fillcolor="rgba(255,0,0,0.08)", line_width=0, row="all", col=1)
    fig.update_yaxes(title_text="NDVI", row=1, col=1)
    fig.update_yaxes(title_text="score (z)", row=2, col=1)
    fig.update_layout(title={"text": title}, height=460, margin={"l": 50, "r": 10, "t": 50, "b": 30},
                      legend={"orientation": "h", "y": -0.12}, hovermode="closest")
    return fig
