"""The dashboard: data functions against the cube they read, and every view and empty state through AppTest."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import socket
import sys
import threading
import time
from datetime import date
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from shapely.geometry import box
from streamlit.testing.v1 import AppTest

from dashboard import data, render, series, system
from geowm.alerts import empty_alerts, write_alerts

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


def _app(monkeypatch, workdir: Path | None) -> AppTest:
    if workdir is None:
        monkeypatch.delenv(data.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(data.ENV_VAR, str(workdir))
    return AppTest.from_file(APP, default_timeout=120)


def _chart(at: AppTest) -> dict:
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    return json.loads(charts[0].proto.spec)


def _deck(at: AppTest) -> dict:
    decks = at.get("deck_gl_json_chart")
    assert len(decks) == 1
    return json.loads(decks[0].proto.json)


def _system(at: AppTest) -> pd.Series:
    """The system panel's table as item -> value."""
    table = next(d.value for d in at.dataframe if list(d.value.columns) == ["item", "value"])
    return table.set_index("item")["value"]


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


@pytest.fixture(autouse=True)
def keep_main_module():
    """AppTest runs the page as ``sys.modules["__main__"]`` and leaves it there; a later test that starts
    processes by spawn (DataLoader workers, Dask nannies) would then re-run the page in each child."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture(scope="module")
def src(dashboard_workdir) -> data.Sources:
    return data.open_sources(dashboard_workdir)


# ------------------------------------------------------------------------------------------ data


def test_workdir_only_from_command_line_or_env(tmp_path):
    env = {data.ENV_VAR: str(tmp_path / "env")}
    assert data.workdir_from(["app.py", "--workdir", str(tmp_path / "cli")], env) == tmp_path / "cli"
    assert data.workdir_from(["-q", "tests/x.py"], env) == tmp_path / "env"
    assert data.workdir_from(["--work", "elsewhere"], {}) is None  # no abbreviations
    assert data.workdir_from([], {}) is None


def test_locate_ignores_components_that_lead_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    wd = tmp_path / "wd"
    (wd / "forecasts").mkdir(parents=True)
    (wd / "cube").symlink_to(outside)
    found = data.locate(wd)
    assert "cube" not in found.paths and "outside the workdir" in found.notes["cube"]
    assert found.paths["forecasts"] == (wd / "forecasts").resolve()
    assert "no alerts/" in found.notes["alerts"]
    with pytest.raises(data.WorkdirError):
        data.locate(tmp_path / "missing")


def _alerts() -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame({
        "id": ["a", "b", "c", "d"], "type_guess": ["fire", "clearcut", "fire", "flood"],
        "first_detected": pd.to_datetime(["2021-05-01", "2021-06-01", "2021-07-01", "2021-08-01"]),
        "last_seen": pd.to_datetime(["2021-05-20", "2021-06-10", "2021-07-30", "2021-08-01"]),
        "peak_score": [5.0, 9.0, 7.0, 4.0], "area_ha": [0.5, 3.0, 12.0, 1.0], "confidence": [0.4, 0.9, 0.7, 0.2]},
        geometry=[box(15 + i * 0.01, 48.7, 15.005 + i * 0.01, 48.705) for i in range(4)], crs=4326)


def test_filter_alerts():
    a = _alerts()
    assert list(data.filter_alerts(a, data.AlertFilter())["id"]) == ["b", "c", "a", "d"]  # by peak score
    assert list(data.filter_alerts(a, data.AlertFilter(types=("fire",)))["id"]) == ["c", "a"]
    assert list(data.filter_alerts(a, data.AlertFilter(min_score=6, min_confidence=0.8))["id"]) == ["b"]
    assert list(data.filter_alerts(a, data.AlertFilter(min_area_ha=1.0, max_area_ha=5.0))["id"]) == ["b", "d"]
    # active between: [first_detected, last_seen] overlaps [start, end] (whole days)
    flt = data.AlertFilter(start=date(2021, 5, 20), end=date(2021, 7, 1))
    assert list(data.filter_alerts(a, flt)["id"]) == ["b", "c", "a"]


def test_downloads_round_trip(tmp_path):
    a = _alerts()
    csv = pd.read_csv(io.BytesIO(data.alerts_csv(a)))
    assert list(csv["id"]) == list(a["id"]) and csv["geometry_wkt"].str.startswith("POLYGON").all()
    assert np.allclose(csv["lon"], a.to_crs(a.estimate_utm_crs()).centroid.to_crs(4326).x, atol=1e-6)
    (tmp_path / "a.geojson").write_text(data.alerts_geojson(a))
    back = gpd.read_file(tmp_path / "a.geojson")
    assert list(back["id"]) == list(a["id"]) and back.crs.to_epsg() == 4326
    assert list(back["first_detected"].astype(str).str[:10]) == ["2021-05-01", "2021-06-01", "2021-07-01",
                                                                 "2021-08-01"]
    assert json.loads(data.alerts_geojson(a.iloc[:0]))["features"] == []


def test_latest_clear_and_scene(src):
    cube = src.cube
    t = data.latest_clear(cube)
    frac = cube["valid"].mean(("y", "x")).values
    assert frac[t] >= data.IMAGE_CLEAR_MIN and not (frac[t + 1:] >= data.IMAGE_CLEAR_MIN).any()
    sc = data.scene(cube, t, max_px=100)  # 256 px -> blocks of 3 px -> 86 px
    assert sc["rgb"].shape == (3, 86, 86) and sc["ndvi"].shape == (86, 86) and sc["clear"].shape == (86, 86)
    assert abs(sc["clear_fraction"] - frac[t]) < 0.02
    full = data.scene(cube, t, max_px=256)  # no coarsening: equals the cube
    red = cube["reflectance"].isel(time=t).sel(band="B04").values
    assert np.allclose(full["rgb"][0], red, equal_nan=True, atol=1e-6)
    assert np.nanmax(np.abs(full["ndvi"])) <= 1.0


def test_observed_ndvi_is_the_mean_of_clear_pixels(src):
    info = data.cube_info(src.cube)
    region = series.tile_region(info, "0_0")
    obs = series.observed_ndvi(src.cube, region)
    assert len(obs) == src.cube.sizes["time"]
    sub = src.cube.isel(y=region.rows, x=region.cols)
    red, nir = (sub["reflectance"].sel(band=b).values for b in ("B04", "B08"))
    ok = sub["valid"].values & np.isfinite(red) & np.isfinite(nir)
    nd = np.where(ok, (nir - red) / (nir + red), np.nan)
    frac = ok.mean(axis=(1, 2))
    assert np.allclose(obs["clear_fraction"], frac)
    clear = frac >= data.SERIES_CLEAR_MIN
    assert clear.any() and (~clear).any()
    assert np.allclose(obs["ndvi"][clear], np.nanmean(nd[clear], axis=(1, 2)), atol=1e-5)
    assert obs["ndvi"][~clear].isna().all()  # clear observations only


def test_forecast_and_score_series_of_an_alert(src):
    grid = data.grid_of(src.cube)
    alert = src.alerts.sort_values("peak_score").iloc[-1]
    region = series.alert_region(grid, alert)
    assert region.mask.sum() > 0 and region.mask.shape[0] >= data.CHIP_MIN_PX
    fc = series.forecast_ndvi(src.forecasts, grid, region)
    assert len(fc) == src.forecasts.sizes["init_time"] * src.forecasts.sizes["lead_time"]
    assert (fc["valid_time"] == fc["init_time"] + pd.to_timedelta(fc["lead_days"], unit="D")).all()
    ok = fc.dropna()
    assert len(ok) and (ok["p10"] <= ok["p50"] + 1e-6).all() and (ok["p50"] <= ok["p90"] + 1e-6).all()
    # p50 of the first init/lead = the mean of the store's p50 over the footprint pixels
    ys, xs = src.cube["y"].values[region.rows], src.cube["x"].values[region.cols]
    p50 = src.forecasts["ndvi"].isel(init_time=0, lead_time=0).sel(quantile=0.5).sel(y=ys, x=xs).values
    assert np.isclose(fc["p50"].iloc[0], np.nanmean(p50[region.mask]), atol=1e-5)
    sc = series.score_series(src.scores, grid, region)
    assert len(sc) == src.scores.sizes["time"]
    assert (sc["score_max"].dropna() >= sc["score_mean"].dropna() - 1e-6).all()
    if not str(alert["id"]).startswith("truth-"):  # a detected alert: its own cells reached its peak score
        assert sc["score_max"].max() >= alert["peak_score"] - 1e-4
        at_first = sc.loc[sc["time"] == alert["first_detected"], "score_max"]
        assert float(at_first.iloc[0]) >= 4.0  # the default threshold opened it


def test_chip_dates():
    t = pd.to_datetime(["2021-01-01", "2021-01-11", "2021-01-21", "2021-01-31", "2021-02-10"])
    obs = pd.DataFrame({"time": t, "window_clear_fraction": [0.9, 0.5, 0.95, 0.85, 0.99]})
    before, after = series.chip_dates(obs, np.datetime64("2021-01-15"), np.datetime64("2021-02-01"))
    assert str(before)[:10] == "2021-01-01" and str(after)[:10] == "2021-01-21"  # clearest during the alert
    before, after = series.chip_dates(obs, np.datetime64("2020-12-01"), np.datetime64("2020-12-02"))
    assert before is None and str(after)[:10] == "2021-01-01"


def test_every_alert_type_has_its_own_colour():
    from geowm.alerts import ALERT_TYPES

    assert set(render.TYPE_COLORS) == set(ALERT_TYPES)
    assert len(set(render.TYPE_COLORS.values())) == len(ALERT_TYPES)


def test_render_pieces():
    assert (render.score_rgba(np.array([[np.nan, 2.9, 4.0]]))[0, :2] == 0).all()  # below 3 / NaN transparent
    assert render.score_rgba(np.array([[12.0]]))[0, 0, 3] == 240
    img = np.zeros((4, 4, 4), np.uint8)
    img[1:3, 1:3] = 255  # a white opaque square on transparent
    url = render.image_data_url(img)
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))
    assert url.startswith("data:image/webp;base64," if render.WEBP else "data:image/png;base64,")
    assert (back[1:3, 1:3, 3] > 200).all() and (back[0, :, 3] < 50).all()  # transparency survives
    deck = json.loads(render.map_deck((1000.0, 800.0), [("scene", "data:image/png;base64,AA", [0, 0, 1000, 800])],
                                      {"type": "FeatureCollection", "features": []}).to_json())
    assert deck["views"][0]["@@type"] == "OrthographicView" and "mapStyle" not in deck  # no internet basemap
    assert [lay["id"] for lay in deck["layers"]] == ["scene", "alerts"]
    assert deck["layers"][0]["image"] == "data:image/png;base64,AA"  # a literal, not a deck.gl expression
    a = _alerts()
    fc = render.alert_features(a, a.estimate_utm_crs().to_wkt(), (0.0, 0.0))
    assert [f["properties"]["id"] for f in fc["features"]] == list(a["id"])
    names = set(re.findall(r"{(\w+)}", render.TOOLTIP["html"]))
    # the tooltip reads feature properties; a name the Feature itself has ("type") would shadow them
    assert names <= set(fc["features"][0]["properties"]) and not names & {"type", "geometry", "properties"}


def test_the_map_is_drawn_in_metres_whatever_the_cube_crs():
    """A cube in degrees (or feet) is drawn in metres from its lower-left corner: its alerts keep their shape and
    size (in degrees the 0.1-unit rounding made every alert a point, and the region a few pixels wide at the
    deepest zoom)."""
    a = _alerts()
    lon, lat = 15 + 0.0001 * (np.arange(400) + 0.5), 48.72 - 0.0001 * (np.arange(300) + 0.5)
    grid = data.Grid(lon, lat, "EPSG:4326")
    kx, ky = grid.map_scale
    assert kx == pytest.approx(111320 * np.cos(np.radians(48.705)), rel=2e-3) and ky == pytest.approx(111200, rel=1e-3)
    left, bottom = grid.bounds[:2]
    fc = render.alert_features(a, "EPSG:4326", (left, bottom), grid.map_scale)
    xs, ys = np.array(fc["features"][0]["geometry"]["coordinates"][0]).T
    assert xs.max() - xs.min() == pytest.approx(0.005 * kx, abs=0.2)  # 368 m wide, 556 m tall
    assert ys.min() == pytest.approx((48.7 - bottom) * ky, abs=0.2) and ys.max() - ys.min() == pytest.approx(
        0.005 * ky, abs=0.2)
    sel = render.selected_feature(a.geometry.iloc[0], "EPSG:4326", (left, bottom), grid.map_scale)
    assert sel["features"][0]["geometry"]["coordinates"][0] == fc["features"][0]["geometry"]["coordinates"][0]
    w, h = 400 * 0.0001 * kx, 300 * 0.0001 * ky
    deck = json.loads(render.map_deck((w, h), [], fc).to_json())
    assert deck["initialViewState"]["zoom"] < deck["initialViewState"]["maxZoom"]  # the region fills the map
    assert data.Grid(lon, lat, "EPSG:32633").map_scale == (1.0, 1.0)
    assert data.Grid(lon, lat, "EPSG:2263").map_scale == pytest.approx((0.3048006, 0.3048006))


def test_system_status(src):
    s = system.system_status(src)
    assert s["last ingested acquisition"].startswith(str(src.cube["time"].values[-1])[:10])
    assert s["last forecast init"].startswith("2021-09-01")
    assert s["model run id"] == src.forecasts.attrs["geowm:run_id"]
    assert int(s["alerts"]) == len(src.alerts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prefect_panel_never_raises():
    msg, runs = system.prefect_runs(None)
    assert "not configured" in msg and runs.empty
    t0 = time.perf_counter()
    msg, runs = system.prefect_runs(f"http://127.0.0.1:{_free_port()}/api")
    assert "not reachable" in msg and runs.empty and time.perf_counter() - t0 < 5


def test_prefect_panel_lists_runs(monkeypatch):
    """A server that answers /health, and Prefect's client replaced by a fake: the panel asks for the latest
    runs by start time and shows flow name, run, state and duration."""
    import datetime as dt
    from types import SimpleNamespace

    import prefect.client.orchestration as orch
    from prefect.client.schemas.sorting import FlowRunSort

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    asked = {}
    start = dt.datetime(2024, 5, 1, 6, tzinfo=dt.UTC)
    runs = [SimpleNamespace(flow_id="f1", name="brave-owl", state=SimpleNamespace(name="Completed"),
                            start_time=start, end_time=start + dt.timedelta(seconds=42),
                            total_run_time=dt.timedelta(seconds=42))]

    class FakeClient:
        def __init__(self, url, httpx_settings=None):
            asked["url"] = url

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read_flow_runs(self, sort=None, limit=None):
            asked.update(sort=sort, limit=limit)
            return runs

        def read_flow(self, flow_id):
            return SimpleNamespace(name="pipeline")

    monkeypatch.setattr(orch, "SyncPrefectClient", FakeClient)
    try:
        msg, table = system.prefect_runs(f"http://127.0.0.1:{server.server_port}/api")
    finally:
        server.shutdown()
    assert asked["sort"] == FlowRunSort.START_TIME_DESC and asked["limit"] == 10
    assert "1 latest flow run" in msg
    row = table.iloc[0][["flow", "run", "state", "duration_s"]].tolist()
    assert row == ["pipeline", "brave-owl", "Completed", 42.0]


# ------------------------------------------------------------------------------------------ views (AppTest)


def test_app_full_workdir(monkeypatch, dashboard_workdir, src):
    at = _app(monkeypatch, dashboard_workdir).run()
    assert not at.exception
    top = src.alerts.sort_values(["peak_score", "id"], ascending=[False, True])["id"].iloc[0]
    assert top in _chart(at)["layout"]["title"]["text"]  # drill-down defaults to the highest score
    names = [t["name"] for t in _chart(at)["data"]]
    assert {"observed NDVI (clear)", "forecast p50", "forecast p10-p90", "anomaly score (max)"} <= set(names)
    deck = _deck(at)
    ids = [lay["id"] for lay in deck["layers"]]
    assert ids[:1] == ["scene"] and "alerts" in ids and "selected" in ids
    alerts_layer = next(lay for lay in deck["layers"] if lay["id"] == "alerts")
    assert len(alerts_layer["data"]["features"]) == len(src.alerts)
    assert len(at.dataframe[0].value) == len(src.alerts)  # the alerts table
    assert {b.label for b in at.get("download_button")} == {"Download CSV", "Download GeoJSON"}
    assert len(at.image) == 2  # before/after chips
    row = _system(at)
    assert row["last ingested acquisition"].startswith(str(src.cube["time"].values[-1])[:10])
    assert row["model run id"] == src.forecasts.attrs["geowm:run_id"]
    assert "Prefect API" in _texts(at.caption)
    assert not at.info  # nothing missing


def test_app_select_alert_and_tile(monkeypatch, dashboard_workdir, src):
    at = _app(monkeypatch, dashboard_workdir).run()
    other = src.alerts.sort_values("peak_score")["id"].iloc[0]  # the lowest score
    at.selectbox(key="alert_pick").select(other).run()
    assert not at.exception
    assert other in _chart(at)["layout"]["title"]["text"]
    sel = next(lay for lay in _deck(at)["layers"] if lay["id"] == "selected")
    assert len(sel["data"]["features"]) == 1
    at.radio(key="drill").set_value("Tile").run()
    at.selectbox(key="tile_pick").select("0_0").run()
    assert not at.exception and _chart(at)["layout"]["title"]["text"] == "tile 0_0"


def test_app_filters(monkeypatch, dashboard_workdir, src):
    at = _app(monkeypatch, dashboard_workdir).run()
    cut = float(np.median(src.alerts["peak_score"]))
    at.slider(key="f_score").set_value(round(cut * 2) / 2).run()
    table = at.dataframe[0].value
    assert len(table) < len(src.alerts) and (table["peak_score"] >= round(cut * 2) / 2 - 0.01).all()
    kind = src.alerts["type_guess"].iloc[0]
    at.multiselect(key="f_types").set_value([kind]).run()
    assert not at.exception
    assert set(at.dataframe[0].value["type"]) <= {kind}
    at.slider(key="f_score").set_value(at.slider(key="f_score").max).run()  # nothing passes
    assert not at.exception
    assert "No alert matches the filters" in _texts(at.info)
    assert "tile" in _chart(at)["layout"]["title"]["text"]  # drill-down falls back to tiles


def test_app_map_date_and_layers(monkeypatch, dashboard_workdir, src):
    at = _app(monkeypatch, dashboard_workdir).run()
    first = str(src.cube["time"].values[0])[:10]
    at.select_slider(key="f_date").set_value(first).run()
    at.radio(key="f_image").set_value("NDVI").run()
    at.radio(key="f_scores").set_value("Score on the map date").run()
    assert not at.exception
    layers = {lay["id"]: lay for lay in _deck(at)["layers"]}
    assert layers["scene"]["image"].startswith("data:image/")
    assert "scores" not in layers  # nothing scored that early
    assert f"NDVI {first}" in _texts(at.caption) and "no score on or before" in _texts(at.caption)
    at.radio(key="f_image").set_value("None").run()
    assert "scene" not in {lay["id"] for lay in _deck(at)["layers"]}


def test_app_ignores_a_workdir_in_the_url(monkeypatch, dashboard_workdir, tmp_path):
    at = _app(monkeypatch, dashboard_workdir)
    at.query_params["workdir"] = str(tmp_path)
    at.run()
    assert not at.exception and str(dashboard_workdir) in at.markdown[0].value


# ------------------------------------------------------------------------------------------ empty states


def test_app_without_workdir(monkeypatch):
    at = _app(monkeypatch, None).run()
    assert not at.exception and "geowm dashboard --workdir" in _texts(at.info)


def test_app_missing_workdir(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path / "nope").run()
    assert not at.exception and "does not exist" in _texts(at.error)


def test_app_empty_workdir(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path).run()
    assert not at.exception
    text = _texts(at.info)
    for what in ("No cube yet", "No forecasts yet", "No alerts yet", "Nothing to map yet"):
        assert what in text
    assert "no cube/" in _system(at)["cube"]


def test_app_cube_only(monkeypatch, dashboard_workdir, tmp_path):
    shutil.copytree(dashboard_workdir / "cube", tmp_path / "cube")
    at = _app(monkeypatch, tmp_path).run()
    assert not at.exception
    text = _texts(at.info)
    assert "No forecasts yet" in text and "No alerts yet" in text and "No cube yet" not in text
    assert "no forecasts (`geowm forecast`) and no anomaly scores" in _texts(at.caption)  # under the chart
    assert _chart(at)["layout"]["title"]["text"] == "tile 0_0"  # no alerts: drill down on tiles
    assert [lay["id"] for lay in _deck(at)["layers"]] == ["scene"]


def test_app_no_alerts_confirmed(monkeypatch, dashboard_workdir, tmp_path):
    shutil.copytree(dashboard_workdir / "cube", tmp_path / "cube")
    shutil.copytree(dashboard_workdir / "forecasts", tmp_path / "forecasts")
    write_alerts(empty_alerts(), tmp_path / "alerts")
    at = _app(monkeypatch, tmp_path).run()
    assert not at.exception
    assert "confirmed none" in _texts(at.info) and "no anomaly scores" in _texts(at.caption)
    assert not at.get("download_button")


def test_app_alerts_without_cube(monkeypatch, dashboard_workdir, tmp_path, src):
    shutil.copytree(dashboard_workdir / "alerts", tmp_path / "alerts")
    at = _app(monkeypatch, tmp_path).run()
    assert not at.exception
    assert "No cube yet" in _texts(at.info) and "observed series and chips need `cube/`" in _texts(at.info)
    layers = {lay["id"]: lay for lay in _deck(at)["layers"]}  # drawn on the score raster's grid
    assert "scene" not in layers and "scores" in layers
    assert len(layers["alerts"]["data"]["features"]) == len(src.alerts)
    assert len(at.dataframe[0].value) == len(src.alerts)
