"""Alerts from score cubes (confirmation, polygons, type guess, files) and evaluation metrics, on tiny grids."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from shapely.geometry import box

from geowm.alerts import AlertRules, alerts_from_scores, confirmed, open_alerts, write_alerts
from geowm.metrics import alert_scores, auroc, load_events, patch_labels, rasterize_events

CRS = "EPSG:32633"
N, T = 40, 12
X0, Y0, RES = 500000.0, 5400000.0, 10.0
UTM_K2 = 0.9996**2  # on UTM's central meridian 1 m of grid is 0.9996 m on the ground: area_ha = grid ha / UTM_K2
TIMES = pd.date_range("2021-01-01", periods=T, freq="10D")
X = X0 + RES / 2 + RES * np.arange(N)
Y = Y0 - RES / 2 - RES * np.arange(N)


def scores(fill: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(rng.normal(0, 0.7, (T, N, N)), -2.5, 2.5) + fill


def as_da(s: np.ndarray) -> xr.DataArray:
    return xr.DataArray(s, coords={"time": TIMES, "y": Y, "x": X}, dims=("time", "y", "x"), name="score")


def native_box(r0, r1, c0, c1):
    """Polygon covering grid rows r0..r1-1 and columns c0..c1-1, in the native CRS."""
    return box(X0 + c0 * RES, Y0 - r1 * RES, X0 + c1 * RES, Y0 - r0 * RES)


def test_persistent_jump_gives_one_confirmed_alert():
    s = scores()
    s[4:, 5:15, 5:15] = 8.0  # 100 px = 1 ha
    conf = confirmed(as_da(s))
    assert conf.dtype == bool and conf.dims == ("time", "y", "x")
    assert np.nonzero(conf.values.any(axis=(1, 2)))[0].tolist() == [5]  # confirmed at the 2nd clear obs
    assert int(conf.values[5].sum()) == 100
    assert conf["first_detected"].values[8, 8] == TIMES[4].to_datetime64()
    assert np.isnat(conf["first_detected"].values[30, 30])

    gdf = alerts_from_scores(as_da(s), CRS)
    assert len(gdf) == 1 and gdf.crs.equals("EPSG:4326")
    a = gdf.iloc[0]
    assert a["first_detected"] == TIMES[4] and a["last_seen"] == TIMES[-1]
    assert a["area_ha"] == pytest.approx(1.0 / UTM_K2, rel=1e-5) and a["peak_score"] == pytest.approx(8.0)
    assert 0 < a["confidence"] < 1 and a["type_guess"] == "unknown"
    region = gpd.GeoSeries([native_box(0, N, 0, N)], crs=CRS).to_crs(4326).iloc[0]
    assert region.contains(a.geometry)
    assert gdf.to_crs(CRS).geometry.iloc[0].area == pytest.approx(10_000, rel=1e-3)


@pytest.mark.parametrize("crs, x0, y0, res, ha", [
    # degrees: 30 x 30 cells of 0.0001 deg at 45 N, on the WGS 84 ellipsoid (pyproj.Geod: 7.8859 ha); the grid
    # area in square degrees was 9e-10 ha, so no alert passed the 1 ha minimum
    ("EPSG:4326", 10.0, 45.003, 0.0001, 7.885946),
    ("EPSG:2263", 980000.0, 200000.0, 30.0, 900 * 900 * 0.3048006096**2 / 1e4),  # US survey feet: 7.525 ha
    ("EPSG:3857", 1113194.0, 5621521.0, 30.0, 900 * 900 / 1e4 / 2.0),  # Web Mercator at 45 N: areal scale 2
])
def test_alert_areas_are_ground_areas_in_any_crs(crs, x0, y0, res, ha):
    """An alert's area is its area on the ground whatever the cube's CRS: a geographic grid's cells by their
    latitude, a projected one's in its linear unit and corrected by the projection's areal scale."""
    from geowm.anomaly import ALERT_RULES

    s = scores()
    s[3:, 5:35, 5:35] = 8.0
    x = x0 + res / 2 + res * np.arange(N)
    y = y0 - res / 2 - res * np.arange(N)
    da = xr.DataArray(s, coords={"time": TIMES, "y": y, "x": x}, dims=("time", "y", "x"), name="score")
    gdf = alerts_from_scores(da, crs, AlertRules(**ALERT_RULES))
    assert len(gdf) == 1 and gdf["area_ha"].iloc[0] == pytest.approx(ha, rel=2e-4)
    from pyproj import Geod

    geodesic = abs(Geod(ellps="WGS84").geometry_area_perimeter(gdf.geometry.iloc[0])[0]) / 1e4
    assert gdf["area_ha"].iloc[0] == pytest.approx(geodesic, rel=2e-3)


def test_geowm_rule_has_a_one_hectare_minimum_mapping_unit():
    from geowm.anomaly import ALERT_RULES

    s = scores()
    s[2:, 5:15, 5:15] = 8.0  # 100 px = 1 ha: kept
    s[2:, 25:34, 25:34] = 8.0  # 81 px = 0.81 ha: dropped
    gdf = alerts_from_scores(as_da(s), CRS, AlertRules(**ALERT_RULES))
    assert gdf["area_ha"].tolist() == pytest.approx([1.0 / UTM_K2], rel=1e-5)
    assert len(alerts_from_scores(as_da(s), CRS, AlertRules(**{**ALERT_RULES, "min_area_ha": 0.5}))) == 2


def test_a_candidate_next_to_a_confirmed_cell_is_confirmed_with_it():
    """A clear-cut seen three times on two of its parts, twice on the part between them (a cloud over it the
    third time): one alert over the whole cut, first detected at the first look. Without the neighbour rule the
    two parts are confirmed apart, each under the minimum mapping unit."""
    from geowm.anomaly import ALERT_RULES

    s = scores()
    s[3:6, 5:15, 5:25] = 8.0  # 10 x 20 px cut, seen at dates 3, 4 and 5
    s[5, 5:15, 10:20] = np.nan  # the third look: clouds over its middle
    s[6:, 5:15, 5:25] = 0.0  # the model has seen the cut: no more surprise
    s[3:5, 30:34, 5:30] = 8.0  # a candidate with two looks ...
    s[5:, 30:34, 5:30] = 0.0  # ... dropped at the third: nothing next to it confirmed
    s[4, 15:17, 5:25] = 8.0  # opened the date before the cut's confirmation: one look, too few
    s[5, 15:17, 5:25] = np.nan
    rules = AlertRules(**ALERT_RULES)
    assert rules.neighbours
    conf = confirmed(as_da(s), rules).values
    assert conf[5, 5:15, 5:25].all() and not conf[:, 15:].any()  # the cloudy middle too; not the late opener
    gdf = alerts_from_scores(as_da(s), CRS, rules)
    assert len(gdf) == 1 and gdf["area_ha"].iloc[0] == pytest.approx(2.0 / UTM_K2, rel=1e-5)
    assert gdf["first_detected"].iloc[0] == TIMES[3]
    alone = AlertRules(**{**ALERT_RULES, "neighbours": False})
    assert not confirmed(as_da(s), alone).values[:, 5:15, 10:20].any()
    assert len(alerts_from_scores(as_da(s), CRS, alone)) == 0  # two 0.5 ha pieces under the 1 ha minimum


def test_single_spike_is_not_confirmed():
    s = scores()
    s[3, 20:30, 20:30] = 8.0
    assert not confirmed(as_da(s)).values.any()
    assert len(alerts_from_scores(as_da(s), CRS)) == 0


def test_cloud_gap_does_not_break_confirmation_but_expiry_does():
    s = scores()
    s[4, 5:15, 5:15] = 8.0
    s[5:7, 5:15, 5:15] = np.nan  # cloud
    s[7, 5:15, 5:15] = 6.0
    s[8:, 5:15, 5:15] = 0.0  # back to normal
    s[0, 25:35, 25:35] = 8.0  # candidate ...
    s[1:10, 25:35, 25:35] = np.nan  # ... next clear look 100 days later > max_gap_days
    s[10, 25:35, 25:35] = 8.0
    conf = confirmed(as_da(s))
    assert np.nonzero(conf.values.any(axis=(1, 2)))[0].tolist() == [7]
    gdf = alerts_from_scores(as_da(s), CRS)
    assert len(gdf) == 1
    assert gdf["first_detected"].iloc[0] == TIMES[4] and gdf["last_seen"].iloc[0] == TIMES[7]
    assert gdf["peak_score"].iloc[0] == pytest.approx(8.0)


def test_separate_patches_and_separate_episodes():
    s = scores()
    s[2:, 2:8, 2:8] = 8.0
    s[3:, 30:36, 20:26] = 7.0
    s[2:5, 20:26, 2:8] = 8.0  # first event at this place ...
    s[5:8, 20:26, 2:8] = 0.0
    s[8:, 20:26, 2:8] = 9.0  # ... a second one later
    s[4:, 36:39, 36:39] = 8.0  # 9 px = 0.09 ha < min_area_ha
    gdf = alerts_from_scores(as_da(s), CRS)
    assert len(gdf) == 4 and gdf["id"].is_unique
    assert sorted(gdf["first_detected"]) == sorted([TIMES[2], TIMES[2], TIMES[3], TIMES[8]])
    assert gdf["area_ha"].tolist() == pytest.approx([0.36 / UTM_K2] * 4, rel=1e-5)
    # ids are stable across runs
    assert alerts_from_scores(as_da(s), CRS)["id"].tolist() == gdf["id"].tolist()
    # a stricter rule (two supporting observations) confirms one date later
    strict = AlertRules(confirmations=2)
    assert np.nonzero(confirmed(as_da(s), strict).values[:, 4, 4])[0].tolist() == [4]


def test_files_round_trip(tmp_path):
    s = scores()
    s[2:, 2:8, 2:8] = 8.0
    s[3:, 30:36, 20:26] = 7.0
    gdf = alerts_from_scores(as_da(s), CRS)
    paths = write_alerts(gdf, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alerts.geojson", "alerts.parquet"]
    for back in (gpd.read_file(paths["geojson"]), gpd.read_parquet(paths["parquet"]), open_alerts(tmp_path / "out"),
                 open_alerts(paths["geojson"])):
        assert back.crs.equals("EPSG:4326")
        assert back["id"].tolist() == gdf["id"].tolist()
        assert back["area_ha"].tolist() == pytest.approx(gdf["area_ha"].tolist())
        assert pd.to_datetime(back["first_detected"]).tolist() == gdf["first_detected"].tolist()
        assert back.geometry.iloc[0].equals_exact(gdf.geometry.iloc[0], tolerance=1e-9)


def test_empty_result_writes_valid_files(tmp_path):
    gdf = alerts_from_scores(as_da(scores()), CRS)
    assert len(gdf) == 0 and gdf.crs.equals("EPSG:4326")
    assert list(gdf.columns) == ["id", "type_guess", "first_detected", "last_seen", "peak_score", "area_ha",
                                 "confidence", "geometry"]
    paths = write_alerts(gdf, tmp_path)
    assert json.loads(paths["geojson"].read_text())["features"] == []
    assert len(gpd.read_file(paths["geojson"])) == 0
    back = gpd.read_parquet(paths["parquet"])
    assert len(back) == 0 and list(back.columns) == list(gdf.columns)
    assert list(open_alerts(tmp_path).columns) == list(gdf.columns)


BANDS = ["B02", "B03", "B04", "B08"]
VEGETATION = [0.03, 0.06, 0.04, 0.35]
AFTER = {  # (rows, cols) of the patch, reflectance after the change, expected guess
    "flood": ((2, 10), [0.06, 0.08, 0.05, 0.03]),
    "fire": ((15, 23), [0.03, 0.03, 0.03, 0.06]),
    "clearcut": ((28, 36), [0.08, 0.10, 0.12, 0.22]),
    "drought": ((2, 10, 28, 36), [0.03, 0.06, 0.06, 0.28]),
}


@pytest.mark.parametrize("bands,common", [
    (BANDS, None),  # Sentinel-2 names, a cube without common names
    (["SR_B2", "SR_B3", "SR_B4", "SR_B5"], ["blue", "green", "red", "nir08"]),  # Landsat 8/9 Collection 2
])
def test_type_guess_from_reflectance(bands, common):
    s = scores()
    refl = np.broadcast_to(np.array(VEGETATION)[None, :, None, None], (T, 4, N, N)).copy()
    for (rows, after) in AFTER.values():
        r0, r1 = rows[:2]
        c0, c1 = rows[2:] if len(rows) == 4 else (2, 10)
        s[4:, r0:r1, c0:c1] = 8.0
        refl[4:, :, r0:r1, c0:c1] = np.array(after)[None, :, None, None]
    valid = np.ones((T, N, N), bool)
    valid[5] = False  # a cloudy date does not matter
    obs = xr.Dataset({"reflectance": (("time", "band", "y", "x"), refl), "valid": (("time", "y", "x"), valid)},
                     coords={"time": TIMES, "band": bands, "y": Y, "x": X})
    if common:
        obs = obs.assign_coords(common_name=("band", common))
    gdf = alerts_from_scores(as_da(s), CRS, obs=obs).to_crs(CRS)
    assert len(gdf) == 4
    for kind, (rows, _) in AFTER.items():
        r0, r1 = rows[:2]
        c0, c1 = rows[2:] if len(rows) == 4 else (2, 10)
        hit = gdf[gdf.intersects(native_box(r0, r1, c0, c1).buffer(-1))]
        assert hit["type_guess"].tolist() == [kind]


def test_type_guess_reads_pixels_and_the_first_looks():
    """A burn over part of an alert's footprint (the rest unchanged) is a fire, not a slight loss of greenness
    averaged over it; a flood that recedes after three looks is a flood, though the alert lasts longer."""
    s = scores()
    refl = np.broadcast_to(np.array(VEGETATION)[None, :, None, None], (T, 4, N, N)).copy()
    s[4:, 2:10, 2:10] = 8.0  # the alert's footprint
    refl[4:, :, 2:10, 2:5] = np.array(AFTER["fire"][1])[None, :, None, None]  # 24 of its 64 pixels burnt
    s[4:, 20:28, 20:28] = 8.0
    refl[4:7, :, 20:28, 20:28] = np.array(AFTER["flood"][1])[None, :, None, None]  # water on 3 looks, then gone
    obs = xr.Dataset({"reflectance": (("time", "band", "y", "x"), refl),
                      "valid": (("time", "y", "x"), np.ones((T, N, N), bool))},
                     coords={"time": TIMES, "band": BANDS, "y": Y, "x": X})
    gdf = alerts_from_scores(as_da(s), CRS, obs=obs).to_crs(CRS)
    assert len(gdf) == 2
    for kind, where in (("fire", native_box(2, 10, 2, 10)), ("flood", native_box(20, 28, 20, 28))):
        assert gdf[gdf.intersects(where.buffer(-1))]["type_guess"].tolist() == [kind]


def test_auroc_hand_values():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    # positives {2, 4} vs negatives {1, 3, 2}: 1 + 0 + 0.5 + 3 = 4.5 of 6 pairs
    assert auroc([1, 2, 3, 4, 2, np.nan, 9], [0, 1, 0, 1, 0, 1, -1]) == pytest.approx(0.75)
    assert np.isnan(auroc([1, 2], [1, 1]))


def events_gdf() -> gpd.GeoDataFrame:
    rows = [  # id, type, start, end, anomaly, grid box
        ("1", "clearcut", "2021-03-01", "2021-12-31", True, (0, 10, 0, 10)),
        ("2", "flood", "2021-05-01", "2021-05-20", True, (0, 10, 20, 30)),
        ("3", "mowing", "2021-06-01", "2021-06-01", False, (20, 30, 0, 10)),
        ("4", "mowing", "2021-06-01", "2021-06-01", False, (20, 30, 20, 30)),
    ]
    gdf = gpd.GeoDataFrame(
        {"id": [r[0] for r in rows], "type": [r[1] for r in rows], "start": pd.to_datetime([r[2] for r in rows]),
         "end": pd.to_datetime([r[3] for r in rows]), "anomaly": [r[4] for r in rows]},
        geometry=[native_box(*r[5]) for r in rows], crs=CRS).to_crs(4326)
    gdf.attrs["crs"] = CRS
    return gdf


def test_alert_scores_precision_recall_delay_and_false_alarms():
    alerts = gpd.GeoDataFrame(
        {"id": list("abcde"),
         "first_detected": pd.to_datetime(["2021-03-11", "2021-03-21", "2021-06-06", "2021-04-01", "2021-09-01"])},
        geometry=[native_box(2, 5, 2, 5), native_box(4, 8, 4, 8),  # TP on the clearcut (twice)
                  native_box(22, 25, 2, 5),  # on a mowed field: false alarm on normal change
                  native_box(35, 38, 35, 38),  # nowhere
                  native_box(2, 5, 22, 25)],  # on the flood but 100 days after it ended
        crs=CRS).to_crs(4326)
    r = alert_scores(alerts, events_gdf())
    assert r["precision"] == pytest.approx(2 / 5) and r["recall"] == pytest.approx(1 / 2)
    assert r["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    assert r["median_detection_delay_days"] == pytest.approx(10.0)
    assert r["recall_by_type"] == {"clearcut": 1.0, "flood": 0.0}
    assert r["false_alarms_normal_change"] == {"count": 1, "events": 1, "rate": 0.5, "of": 2}
    empty = alert_scores(alerts.iloc[:0], events_gdf())
    assert empty["recall"] == 0.0 and np.isnan(empty["precision"])
    # scored from 2021-04-15: the clearcut (started 2021-03-01) is ongoing, not missed or detected late;
    # its alerts stay true positives
    r = alert_scores(alerts, events_gdf(), since="2021-04-15")
    assert r["n_events"] == 1 and r["n_events_ongoing"] == 1 and r["recall"] == 0.0
    assert r["precision"] == pytest.approx(2 / 5) and np.isnan(r["median_detection_delay_days"])
    assert r["recall_by_type"] == {"flood": 0.0}
    late = alert_scores(alerts, events_gdf(), since="2021-06-02")  # both mowings ended: no rate to give
    assert late["false_alarms_normal_change"]["of"] == 0 and np.isnan(late["false_alarms_normal_change"]["rate"])
    assert np.isnan(r["type_accuracy"]) and r["type_guesses"] == {}  # these alerts have no type guess


def test_alert_scores_type_accuracy():
    """Type guesses are scored on the true-positive alerts, against the types of the events each one matches."""
    alerts = gpd.GeoDataFrame(
        {"id": list("abcd"), "type_guess": ["clearcut", "drought", "fire", "flood"],
         "first_detected": pd.to_datetime(["2021-03-11", "2021-03-21", "2021-05-03", "2021-06-06"])},
        geometry=[native_box(2, 5, 2, 5), native_box(4, 8, 4, 8),  # on the clearcut: right, wrong
                  native_box(2, 5, 22, 25),  # on the flood, guessed fire: wrong
                  native_box(22, 25, 2, 5)],  # on a mowed field (a false alarm): not scored
        crs=CRS).to_crs(4326)
    r = alert_scores(alerts, events_gdf())
    assert r["n_true_positive_alerts"] == 3 and r["type_accuracy"] == pytest.approx(1 / 3)
    assert r["type_guesses"] == {"clearcut": {"clearcut": 1, "drought": 1}, "flood": {"fire": 1}}


def test_load_events_patch_labels_and_masks(tmp_path):
    path = tmp_path / "events.geojson"
    ev = events_gdf()
    ev["start"], ev["end"] = ev["start"].dt.strftime("%Y-%m-%d"), ev["end"].dt.strftime("%Y-%m-%d")
    doc = json.loads(ev.to_json())
    doc["geowm:crs"] = CRS
    path.write_text(json.dumps(doc))
    ev = load_events(path)
    assert ev.attrs["crs"] == CRS and ev["anomaly"].tolist() == [True, True, False, False]
    like = as_da(scores())[0]
    masks = rasterize_events(ev, like)
    assert [int(m.sum()) for m in masks.values()] == [100, 100, 100, 100]
    times = pd.date_range("2021-02-19", periods=12, freq="10D")  # t2 = 2021-03-11 ...
    lab = patch_labels(ev, times, Y, X)
    assert lab.dtype == np.int8 and lab.dims == ("time", "y", "x")
    clear = lab.values[:, 5, 5]  # clearcut from 2021-03-01: positive for 60 days, then excluded
    assert clear.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1]
    assert lab.values[:, 25, 5].tolist() == [0] * 11 + [-1]  # mowing on 2021-06-01, excluded for 30 days
    assert (lab.values[:, 35, 35] == 0).all()

    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.geojson"):
        load_events(bad)
    del doc["features"][0]["properties"]["anomaly"]
    bad.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="anomaly"):
        load_events(bad)


SOIL = [0.08, 0.11, 0.14, 0.19]  # bare field: NDVI 0.15
CROP = [0.03, 0.06, 0.04, 0.40]  # grown crop: NDVI 0.82
YEARS = pd.date_range("2021-01-01", periods=80, freq="10D")  # two growing seasons and more


def _fields(forest: bool = False) -> np.ndarray:
    """(time, band, N, N) reflectance of fields bare outside May-August and green inside; ``forest``: always
    green."""
    grown = (YEARS.month >= 5) & (YEARS.month <= 8) | forest
    refl = np.where(grown[:, None], np.array(CROP)[None], np.array(SOIL)[None])
    return np.broadcast_to(refl[:, :, None, None], (len(YEARS), 4, N, N)).copy()


def _type_of(refl: np.ndarray, k0: int) -> str:
    """The type guess of an alert on rows and columns 10-18 confirmed from the look ``k0`` on."""
    s = np.clip(np.random.default_rng(0).normal(0, 0.7, (len(YEARS), N, N)), -2.5, 2.5)
    s[k0:k0 + 4, 10:18, 10:18] = 8.0
    obs = xr.Dataset({"reflectance": (("time", "band", "y", "x"), refl),
                      "valid": (("time", "y", "x"), np.ones((len(YEARS), N, N), bool))},
                     coords={"time": YEARS, "band": BANDS, "y": Y, "x": X})
    score = xr.DataArray(s, coords={"time": YEARS, "y": Y, "x": X}, dims=("time", "y", "x"))
    gdf = alerts_from_scores(score, CRS, obs=obs)
    assert len(gdf) == 1
    return gdf["type_guess"].iloc[0]


def test_type_guess_tells_a_failed_field_from_a_clearcut_and_a_drought():
    """On cropland (bare soil and a grown crop in the year before), one field that collapses while the fields
    around it stay green is a crop failure, and so is one whose crop does not grow; every field browning
    together is a drought; the same collapse of land that was never bare is a clear-cut."""
    k0 = int(np.flatnonzero(YEARS >= "2022-07-20")[0])  # mid-season of the second year (4 months of it before)
    end = int(np.flatnonzero(YEARS >= "2022-09-01")[0])
    failed = _fields()
    failed[k0:end, :, 10:18, 10:18] = np.array(SOIL)[:, None, None]
    assert _type_of(failed, k0) == "crop_failure"

    not_grown = _fields()
    spring = int(np.flatnonzero(YEARS >= "2022-05-01")[0])
    not_grown[spring:end, :, 10:18, 10:18] = np.array(SOIL)[:, None, None]  # stays bare all season
    assert _type_of(not_grown, spring + 2) == "crop_failure"

    dry = _fields()
    dry[k0:end, :, :, :] = np.array(SOIL)[:, None, None]  # every field at once
    assert _type_of(dry, k0) == "drought"

    cut = _fields(forest=True)
    cut[k0:, :, 10:18, 10:18] = np.array(SOIL)[:, None, None]
    assert _type_of(cut, k0) == "clearcut"


def test_type_guess_reads_a_thinned_year_of_a_large_box(monkeypatch):
    """A year of looks over a box larger than CROP_YEAR_PX px is read on every k-th row and column: the same
    guesses (with a small limit on these 40 px: the footprint's box and the land around it both thinned)."""
    import geowm.alerts as alerts

    monkeypatch.setattr(alerts, "CROP_YEAR_PX", 37)
    k0 = int(np.flatnonzero(YEARS >= "2022-07-20")[0])
    end = int(np.flatnonzero(YEARS >= "2022-09-01")[0])
    failed = _fields()
    failed[k0:end, :, 10:18, 10:18] = np.array(SOIL)[:, None, None]
    assert _type_of(failed, k0) == "crop_failure"
    dry = _fields()
    dry[k0:end] = np.array(SOIL)[:, None, None]
    assert _type_of(dry, k0) == "drought"
