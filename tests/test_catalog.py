"""The STAC catalog: sources and cubes (ingest), forecasts (forecast) and alerts (anomalies), validated with
stac-validator."""

from __future__ import annotations

import json
import os

import pystac
import pytest
from shapely.geometry import shape
from test_ingest import OPTS, days, make_scene

from catalog.stac import add_alerts, add_forecasts, update_catalog, validate_catalog
from geowm.cube import IngestOptions, ingest


def test_catalog_tracks_ingests_and_validates(tmp_path):
    src = tmp_path / "src"
    for i, d in enumerate(days(3)):
        make_scene(src, d, i)
    ingest(src, tmp_path / "cube", IngestOptions(**OPTS))
    root = update_catalog(tmp_path / "catalog", tmp_path / "cube")
    assert validate_catalog(root) == []
    cat = pystac.Catalog.from_file(str(root))
    sources, cubes = cat.get_child("sources"), cat.get_child("cubes")
    assert len(list(sources.get_items())) == 3
    # each scene's footprint, recorded at ingest, is the one its files give when opened (cubes made before)
    from catalog.stac import _footprint
    from geowm.cube.store import read_state

    for rec in read_state(tmp_path / "cube").sources:
        item = sources.get_item(rec["id"])
        opened = json.loads(json.dumps(_footprint(rec["files"])))
        assert item.geometry == opened["geometry"] == rec["footprint"]["geometry"]
        assert item.bbox == opened["bbox"] and rec["footprint"]["proj"] == opened["proj"]
    (item,) = cubes.get_items()
    dims = item.properties["cube:dimensions"]
    assert dims["band"]["values"] == ["B02", "B03", "B04", "B08"]
    assert dims["x"]["step"] == 10 and dims["x"]["reference_system"] == 32633
    assert dims["time"]["extent"][0].startswith("2021-03-01T10:30:21")
    assert set(item.properties["cube:variables"]) == {"reflectance", "valid"}
    assert "https://stac-extensions.github.io/datacube/" in " ".join(item.stac_extensions)
    # S2T_ scene ids name no sensor, their SCL band does (Sentinel-2): the bands' names with their common names
    assert item.assets["cube"].extra_fields["eo:bands"] == [
        {"name": b, "common_name": c} for b, c in zip(("B02", "B03", "B04", "B08"), ("blue", "green", "red", "nir"),
                                                      strict=True)]
    # a later ingest adds its scenes and moves the cube item forward
    src2 = tmp_path / "src2"
    for i, d in enumerate(days(2, start=days(3)[-1])):
        if i:
            make_scene(src2, d, 10 + i)
    ingest(src2, tmp_path / "cube", IngestOptions(**OPTS))
    update_catalog(tmp_path / "catalog", tmp_path / "cube")
    cat = pystac.Catalog.from_file(str(root))
    assert len(list(cat.get_child("sources").get_items())) == 4
    (item,) = cat.get_child("cubes").get_items()
    assert item.properties["end_datetime"].startswith("2021-03-16")
    assert validate_catalog(root) == []


def test_validator_reports_a_broken_item(tmp_path):
    src = tmp_path / "src"
    make_scene(src, days(1)[0], 0)
    ingest(src, tmp_path / "cube", IngestOptions(**OPTS))
    root = update_catalog(tmp_path / "catalog", tmp_path / "cube")
    item_path = next((tmp_path / "catalog" / "sources").glob("*/*.json"))
    doc = json.loads(item_path.read_text())
    doc["geometry"] = {"type": "Polygon", "coordinates": "nope"}
    item_path.write_text(json.dumps(doc))
    errors = validate_catalog(root)
    assert len(errors) == 1 and item_path.name in errors[0]


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.json"))


def test_forecast_inits_are_catalogued(dashboard_workdir, tmp_path):
    """One item per init of the forecast store: its init as forecast:reference_datetime, the valid times as
    its extent, the store's dims and variables, the store as the asset; re-adding changes nothing."""
    from geowm.forecast_store import open_forecasts

    store = dashboard_workdir / "forecasts"
    fc = open_forecasts(store)
    # one order of variables and dims on every open (the store lists its arrays in no fixed order)
    orders = {(tuple(f.data_vars), tuple(f.sizes)) for f in (open_forecasts(store) for _ in range(12))}
    assert orders == {(("ndvi", "embedding", "latent_spread", "n_context", "B02", "B03", "B04", "B08"),
                       ("init_time", "lead_time", "quantile", "y", "x", "py", "px", "latent"))}
    cat_dir = tmp_path / "catalog"
    root = add_forecasts(cat_dir, store)
    assert validate_catalog(root) == []
    items = sorted(pystac.Catalog.from_file(str(root)).get_child("forecasts").get_items(),
                   key=lambda it: it.properties["forecast:reference_datetime"])
    assert len(items) == fc.sizes["init_time"] == 2
    cube = pystac.Catalog.from_file(str(update_catalog(cat_dir, dashboard_workdir / "cube"))).get_child("cubes")
    (cube_item,) = cube.get_items()
    for item, init, valid in zip(items, fc["init_time"].values, fc["valid_time"].values, strict=True):
        assert item.properties["forecast:reference_datetime"] == str(init)[:19] + "Z"
        assert item.properties["start_datetime"].startswith(str(valid.min())[:19])
        assert item.properties["end_datetime"].startswith(str(valid.max())[:19])
        dims = item.properties["cube:dimensions"]
        assert dims["lead_time"]["values"] == ["P10D", "P20D", "P30D"]
        assert dims["quantile"]["values"] == [0.1, 0.5, 0.9]
        patch = fc.sizes["x"] // fc.sizes["px"]
        assert dims["x"]["step"] == 10 and dims["px"]["step"] == -dims["py"]["step"] == 10 * patch
        assert {"ndvi", "embedding", "latent_spread"} <= set(item.properties["cube:variables"])
        assert item.properties["cube:variables"]["embedding"]["dimensions"] == list(fc["embedding"].dims)
        assert item.properties["geowm:run_id"] == fc.attrs["geowm:run_id"]
        assert item.properties["geowm:cube_snapshot"] == fc.attrs["geowm:cube_snapshots"][str(init)[:19]]
        assert item.properties["proj:code"] == cube_item.properties["proj:code"] == "EPSG:32633"
        assert item.assets["forecasts"].href == str(store.absolute())
        assert shape(item.geometry).buffer(1e-6).contains(shape(cube_item.geometry).intersection(
            shape(item.geometry)))
        assert shape(item.geometry).area > 0.9 * shape(cube_item.geometry).area  # the whole cube was forecast
    before = _files(cat_dir)
    add_forecasts(cat_dir, store)
    assert _files(cat_dir) == before and validate_catalog(root) == []
    assert len(list(pystac.Catalog.from_file(str(root)).get_child("cubes").get_items())) == 1  # left alone


def test_alerts_are_catalogued_and_follow_the_alert_set(dashboard_workdir, tmp_path):
    """One item per alert (its polygon, first detection to last sighting, the alert's fields) and one for the
    score raster; when the alert set changes the items follow it and a dropped alert leaves no file."""
    import shutil

    from geowm.alerts import open_alerts, write_alerts
    from geowm.anomaly import open_scores

    folder = tmp_path / "work" / "alerts"
    shutil.copytree(dashboard_workdir / "alerts", folder)
    alerts = open_alerts(folder)
    assert len(alerts) >= 3
    cat_dir = tmp_path / "catalog"
    root = add_alerts(cat_dir, folder)
    assert validate_catalog(root) == []
    cat = pystac.Catalog.from_file(str(root))
    items = {it.properties["geowm:alert_id"]: it for it in cat.get_child("alerts").get_items()}
    assert set(items) == set(alerts["id"])
    for row in alerts.itertuples():
        it = items[row.id]
        assert shape(it.geometry).equals_exact(row.geometry, 1e-7)
        assert it.properties["start_datetime"] == row.first_detected.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert it.properties["end_datetime"] == row.last_seen.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert it.properties["geowm:type_guess"] == row.type_guess
        assert it.properties["geowm:peak_score"] == pytest.approx(row.peak_score)
        assert it.properties["geowm:area_ha"] == pytest.approx(row.area_ha)
        assert it.assets["geoparquet"].href == str((folder / "alerts.parquet").absolute())
    (scores_item,) = cat.get_child("anomaly-scores").get_items()
    sc = open_scores(folder)
    assert scores_item.properties["start_datetime"] == str(sc.time.values.min())[:19] + "Z"
    assert scores_item.properties["end_datetime"] == str(sc.time.values.max())[:19] + "Z"
    assert set(scores_item.properties["cube:variables"]) == set(sc.data_vars)
    assert scores_item.properties["geowm:n_alerts"] == len(alerts)
    # the alert set changes (one alert merged away): its item and file go, the others stay
    dropped = alerts["id"].iloc[0]
    dropped_file = next(cat_dir.rglob(f"*{dropped}*.json"))
    write_alerts(alerts.iloc[1:], folder)
    add_alerts(cat_dir, folder)
    assert validate_catalog(root) == [] and not dropped_file.exists()
    cat = pystac.Catalog.from_file(str(root))
    assert {it.properties["geowm:alert_id"] for it in cat.get_child("alerts").get_items()} == set(alerts["id"][1:])
    # another folder of the same name (another workdir) keeps its own items beside the first folder's
    other = tmp_path / "elsewhere" / "alerts"
    shutil.copytree(folder, other)
    add_alerts(cat_dir, other)
    cat = pystac.Catalog.from_file(str(root))
    assert len(list(cat.get_child("alerts").get_items())) == 2 * (len(alerts) - 1)
    assert len(list(cat.get_child("anomaly-scores").get_items())) == 2
    assert validate_catalog(root) == []


def test_bad_products_leave_the_catalog_alone(synth_cube, dashboard_workdir, tmp_path):
    from geowm.forecast_store import ForecastStoreError

    cat_dir = tmp_path / "catalog"
    update_catalog(cat_dir, synth_cube)
    before = {p: p.read_bytes() for p in cat_dir.rglob("*.json")}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no alerts.geojson"):
        add_alerts(cat_dir, tmp_path / "empty")
    with pytest.raises(ForecastStoreError, match="no forecast store"):
        add_forecasts(cat_dir, tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "alerts.geojson").write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(Exception, match="alerts.geojson"):
        add_alerts(cat_dir, tmp_path / "broken")
    assert {p: p.read_bytes() for p in cat_dir.rglob("*.json")} == before
    for text in ('{"type": "Feature"}', "not json"):  # a catalog.json that is not a catalog: named, left alone
        (cat_dir / "catalog.json").write_text(text)
        with pytest.raises(ValueError, match="catalog.json: not a STAC catalog"):
            add_forecasts(cat_dir, dashboard_workdir / "forecasts")
        assert (cat_dir / "catalog.json").read_text() == text


def test_a_save_cut_short_leaves_the_catalog_as_it_was(synth_cube, dashboard_workdir, tmp_path):
    """A catalog save that fails part-way (here a file-size limit, as a full disk would) leaves every file of
    the catalog byte for byte as it was and no temporary file behind; the next save works."""
    import subprocess
    import sys
    import textwrap

    cat_dir = tmp_path / "catalog"
    update_catalog(cat_dir, synth_cube)
    add_forecasts(cat_dir, dashboard_workdir / "forecasts")
    before = {p: p.read_bytes() for p in cat_dir.rglob("*") if p.is_file()}
    limit = min(len(b) for p, b in before.items() if p.suffix == ".json") // 2  # every file it writes is larger
    code = textwrap.dedent(f"""
        import resource, signal
        from catalog.stac import add_alerts
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        add_alerts({str(cat_dir)!r}, {str(dashboard_workdir / "alerts")!r})
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert res.returncode != 0 and "File too large" in res.stderr, res.stderr[-2000:]
    assert {p: p.read_bytes() for p in cat_dir.rglob("*") if p.is_file()} == before
    root = add_alerts(cat_dir, dashboard_workdir / "alerts")
    assert validate_catalog(root) == []
    assert len(list(pystac.Catalog.from_file(str(root)).get_child("alerts").get_items())) >= 3
