"""The dashboard in a real browser: ``geowm dashboard`` on a free port, headless Debian Chromium via Playwright.

Loads the page, waits for the deck.gl map and the plotly chart, checks that no Streamlit exception is
shown and that nothing is fetched from outside the app (no internet needed), clicks an alert on the map
and then picks one in the drill-down list, each time seeing the chart switch to that alert, and saves a
screenshot to ``tests/artifacts/dashboard.png``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dashboard.launch import CHROMIUM, CHROMIUM_ARGS, free_port, start, stop

# CI (.ci/run) sets GEOWM_REQUIRE_BROWSER=1: there a missing browser fails the run instead of skipping
REQUIRED = os.environ.get("GEOWM_REQUIRE_BROWSER") == "1"
sync_api = pytest.importorskip("playwright.sync_api") if not REQUIRED else __import__("playwright.sync_api").sync_api

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
pytestmark = pytest.mark.skipif(not CHROMIUM.exists() and not REQUIRED,
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(dashboard_workdir, tmp_path_factory):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = start(dashboard_workdir, port, tmp_path_factory.mktemp("dash") / "server.log", env=env)  # geowm dashboard
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def map_point(workdir: Path, alerts, target_id: str):
    """A point (map metres from the region's lower-left corner) inside alert ``target_id`` and no other
    alert, and the map's grid."""
    from dashboard.data import grid_of
    from geowm import open_cube

    grid = grid_of(open_cube(workdir / "cube"))
    geoms = alerts.set_index("id").geometry.to_crs(grid.crs)
    others = geoms.drop(target_id).union_all()
    only = geoms[target_id].buffer(-2).difference(others)
    p = only.representative_point()
    return p.x - grid.bounds[0], p.y - grid.bounds[1], grid


def test_dashboard_in_chromium(server, dashboard_workdir):
    from dashboard.render import fit_zoom
    from geowm import open_alerts

    expect = sync_api.expect
    alerts = open_alerts(dashboard_workdir / "alerts").sort_values(["peak_score", "id"], ascending=[False, True])
    top = alerts["id"].iloc[0]
    others = alerts.iloc[1:].sort_values("area_ha", ascending=False)["id"].tolist()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1900})
            outside: list[str] = []
            local = (server, "data:", "blob:")
            page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
            page.goto(server)
            canvas = page.locator("[data-testid='stDeckGlJsonChart'] canvas").first
            canvas.wait_for(timeout=90_000)
            titles = page.locator(".js-plotly-plot .gtitle")

            def chart_shows(alert_id: str) -> None:  # while Streamlit swaps the chart, two may be on the page
                expect(titles.filter(has_text=alert_id).first).to_be_visible(timeout=90_000)
                expect(page.get_by_test_id("stStatusWidget")).to_be_hidden(timeout=60_000)
                expect(titles).to_have_count(1, timeout=30_000)
                expect(titles).to_contain_text(alert_id)

            chart_shows(top)  # the chart, drilled down on the top alert
            expect(page.get_by_test_id("stException")).to_have_count(0)

            # click an alert on the map: its position on the canvas from the map's initial view
            target = next(a for a in others if not alerts.set_index("id").geometry[a].is_empty)
            mx, my, grid = map_point(dashboard_workdir, alerts, target)
            left, bottom, right, top_m = grid.bounds
            w, h = right - left, top_m - bottom
            box = canvas.bounding_box()
            scale = 2 ** fit_zoom(w, h)
            x = box["x"] + box["width"] / 2 + (mx - w / 2) * scale
            y = box["y"] + box["height"] / 2 - (my - h / 2) * scale
            page.mouse.move(x, y)
            time.sleep(0.3)  # deck.gl picks on hover, then on click
            page.mouse.click(x, y)
            chart_shows(target)

            # pick a third alert in the drill-down list
            third = next(a for a in alerts["id"] if a not in (top, target))
            page.get_by_test_id("stSelectbox").filter(has_text="Alert").click()
            page.keyboard.type(third)
            page.keyboard.press("Enter")
            chart_shows(third)
            expect(page.get_by_test_id("stImage")).to_have_count(2, timeout=60_000)  # before/after chips
            expect(page.get_by_test_id("stException")).to_have_count(0)
            traces = page.evaluate("() => document.querySelector('.js-plotly-plot').data.map(t => t.name)")
            assert "observed NDVI (clear)" in traces and "forecast p50" in traces
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert not outside, f"the page fetched from outside the app: {outside[:5]}"
