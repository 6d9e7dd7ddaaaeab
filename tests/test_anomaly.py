"""Anomaly scoring: surprise against the forecast made ``lead_days`` earlier, robust normalisation,
the `geowm anomalies` command (alerts + score raster readable by plain geopandas/xarray) and bad input."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

import geowm
from geowm import anomaly
from geowm.anomaly import departure, departure_score, detect, normalise, regional_residual, surprise
from geowm.cli import app
from geowm.forecast import forecast
from geowm.forecast_store import write_forecasts
from geowm.inference import WorldModel

runner = CliRunner()


@pytest.fixture(scope="module")
def surp(synth_cube, tiny_run):
    return surprise(str(synth_cube), str(tiny_run), start="2021-08-01", lead_days=20)


def test_surprise_only_where_clear(surp, synth_cube):
    s = surp["surprise"].values
    assert surp["surprise"].dims == ("time", "py", "px")
    assert np.isfinite(s).mean() > 0.2 and np.nanmin(s) >= -1e-5 and np.nanmax(s) <= 2 + 1e-5
    cloudy = surp["clear_fraction"].values < 0.5  # a mostly cloudy patch is dropped, so it has no surprise
    assert not np.isfinite(s[cloudy]).any()
    cube = geowm.open_cube(synth_cube)
    assert surp.time.values[0] >= np.datetime64("2021-08-01") and surp.time.values[-1] == cube.time.values[-1]


def test_surprise_compares_with_the_forecast_made_lead_days_before(surp, synth_cube, tiny_run):
    cube = geowm.open_cube(synth_cube).load()
    t = surp.time.values[np.isfinite(surp["surprise"]).sum(("py", "px")).values.argmax()]
    recent = (cube.time > t - np.timedelta64(20, "D")) & (cube.time < t)
    assert bool(recent.any())
    changed = cube.copy()
    changed["reflectance"] = cube.reflectance.where(~recent, 0.5)  # what was seen within the lead changes
    a = surprise(cube, str(tiny_run), start=t, end=t, lead_days=20)
    b = surprise(changed, str(tiny_run), start=t, end=t, lead_days=20)
    np.testing.assert_array_equal(a["surprise"].values, b["surprise"].values)
    np.testing.assert_allclose(a["surprise"].values, surp["surprise"].sel(time=t).values[None], atol=1e-5)


def test_departure_is_the_distance_to_the_nearest_clear_latent_a_year_before():
    rng = np.random.default_rng(2)
    times = np.datetime64("2021-01-01") + np.array([0, 10, 20, 40, 365, 375, 400, 460]).astype("timedelta64[D]")
    lat = rng.normal(size=(len(times), 2, 3, 8))
    lat /= np.linalg.norm(lat, axis=-1, keepdims=True)
    green = rng.uniform(0.2, 0.8, (len(times), 2, 3))
    ok = np.ones(lat.shape[:3], bool)
    ok[1, 0, 0] = False  # a cloudy reference is not a reference
    ok[2, 1, 1] = False  # ... so for day 400 this patch has a reference after the day (40) but none before
    ok[5, 1, 2] = False  # a cloudy date has no departure
    at = np.array([4, 5, 6, 7])
    got, change, day_change = departure(lat, ok, times, at, 365.0, 15.0, green)
    n_interp = 0
    for j, k in enumerate(at):
        day = (times - times[k]).astype(int) + 365  # the reference dates: within 15 days of t - 365
        for i in range(2):
            for m in range(3):
                ref = [r for r in range(len(times)) if abs(day[r]) <= 15 and ok[r, i, m]]
                want = min(1 - lat[r, i, m] @ lat[k, i, m] for r in ref) if ref and ok[k, i, m] else np.nan
                np.testing.assert_allclose(got[j, i, m], want, rtol=1e-6, atol=1e-6)
                want = green[k, i, m] - np.mean([green[r, i, m] for r in ref]) if ref and ok[k, i, m] else np.nan
                np.testing.assert_allclose(change[j, i, m], want, rtol=1e-6, atol=1e-6)
                # last year's NDVI on the day itself: linear between the nearest clear reference on each side
                before = [r for r in ref if day[r] <= 0]
                after = [r for r in ref if day[r] >= 0]
                want = np.nan
                if before and after and ok[k, i, m]:
                    b, a = max(before, key=lambda r: day[r]), min(after, key=lambda r: day[r])
                    if a == b:
                        then = green[b, i, m]
                    else:
                        then = green[b, i, m] + (green[a, i, m] - green[b, i, m]) * (0 - day[b]) / (day[a] - day[b])
                        n_interp += 1
                    want = green[k, i, m] - then
                np.testing.assert_allclose(day_change[j, i, m], want, rtol=1e-6, atol=1e-6)
    assert n_interp >= 6  # day 400 (references on days 20 and 40) and the cloudy reference of day 375
    assert np.isnan(got[3]).all()  # day 460: nothing within 15 days of day 95
    assert np.isfinite(got[0]).all() and np.isnan(got[1, 1, 2])
    assert np.isfinite(got[2, 1, 1]) and np.isnan(day_change[2, 1, 1])  # a reference on one side only
    assert departure(lat, ok, times, at, 365.0, 15.0)[1:] == (None, None)  # no NDVI: no change


def test_without_a_reference_a_year_before_the_loss_is_against_the_seasons_lowest_ndvi():
    """A patch with no clear date within the window a year before (last year's season was cloudy) has its NDVI
    change against the lowest clear NDVI within ``loss_window_days`` of that day, not NaN (a surprise score
    that counted in full); a patch with a reference keeps the mean over its references."""
    rng = np.random.default_rng(5)
    times = np.datetime64("2021-01-01") + np.array([0, 30, 70, 100, 150, 365 + 75, 365 + 90]).astype("timedelta64[D]")
    lat = rng.normal(size=(len(times), 2, 3, 8))
    lat /= np.linalg.norm(lat, axis=-1, keepdims=True)
    green = rng.uniform(0.2, 0.8, (len(times), 2, 3))
    ok = np.ones(lat.shape[:3], bool)
    ok[1, 0, 1] = False  # day 30 cloudy: only day 100 is within 60 days of day 75 there
    ok[1, 1, 0] = ok[2, 1, 0] = ok[3, 1, 0] = False  # nothing clear within 60 days of day 75
    ok[5, 1, 2] = False  # not clear at t
    ok[2, :, 2] = False  # day 70 cloudy: no reference within 15 days of day 75 for the third column...
    ok[2, 0, 0] = False  # ... and for this patch
    at = np.array([5, 6])
    dist, change, day_change = departure(lat, ok, times, at, 365.0, 15.0, green, loss_window_days=60.0)
    plain = departure(lat, ok, times, at, 365.0, 15.0, green)
    for i in range(2):
        for m in range(3):
            has_ref = ok[2, i, m]  # day 70 is the one date within 15 days of day 75
            low = [green[r, i, m] for r in (1, 2, 3) if ok[r, i, m]]  # days 30, 70, 100: within 60 of day 75
            if not ok[5, i, m]:
                want = np.nan
            elif has_ref:
                want = green[5, i, m] - green[2, i, m]
            else:
                want = green[5, i, m] - min(low) if low else np.nan
            np.testing.assert_allclose(change[0, i, m], want, rtol=1e-6, atol=1e-6)
            assert np.isfinite(dist[0, i, m]) == (has_ref and ok[5, i, m])  # the latent departure is unchanged
    np.testing.assert_array_equal(dist, plain[0])
    np.testing.assert_array_equal(day_change, plain[2])
    assert np.isfinite(change[0, 0, 2]) and np.isnan(plain[1][0, 0, 2]) and np.isnan(change[0, 1, 0])
    ref = np.isfinite(plain[1])
    np.testing.assert_array_equal(change[ref], plain[1][ref])  # a reference: the mean over it, as before
    # day 455 (day 90 a year before): day 100 within 15 days; day 150 within 60 but a reference exists
    lowest = green[6] - np.where(ok[1:5], green[1:5], 9).min(axis=0)  # days 30 to 150
    np.testing.assert_allclose(change[1], np.where(ok[6] & ok[3], green[6] - green[3], np.where(ok[6], lowest, np.nan)),
                               rtol=1e-6)


def test_surprise_measures_the_loss_without_a_reference_against_the_season_a_year_before(synth_cube, tiny_run):
    """Wired through :func:`surprise`: the dates within ``loss_window_days`` of a year before are encoded, so a
    patch without a reference in the narrow window gets its change against the lowest clear patch NDVI there."""
    from geowm.baselines import ndvi

    t0, lag, win, loss = "2021-09-01", 60.0, 2.0, 30.0
    s = surprise(str(synth_cube), str(tiny_run), start=t0, lead_days=20, departure_lag_days=lag,
                 departure_window_days=win, loss_window_days=loss)
    cube = geowm.open_cube(str(synth_cube))
    p = 8
    H, W = cube.sizes["y"] // p * p, cube.sizes["x"] // p * p
    nd = ndvi(cube.isel(y=slice(0, H), x=slice(0, W))).values
    with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", RuntimeWarning)
        green = np.nanmean(nd.reshape(len(nd), H // p, p, W // p, p), axis=(2, 4))
    valid = cube["valid"].values[:, :H, :W] & np.isfinite(cube["reflectance"].values[:, :, :H, :W]).all(axis=1)
    clear = valid.reshape(len(nd), H // p, p, W // p, p).mean(axis=(2, 4)) >= 0.5
    day = cube.time.values.astype("datetime64[s]").astype(np.int64) / 86400.0
    n_low = 0
    for j, t in enumerate(s.time.values):
        k = int(np.flatnonzero(cube.time.values == t)[0])
        near = np.abs(day - (day[k] - lag))
        ch = s["ndvi_change"].values[j]
        no_ref = clear[k] & ~clear[near <= win].any(axis=0) & clear[near <= loss].any(axis=0)
        if not no_ref.any():
            continue
        low = np.where(clear[near <= loss], green[near <= loss], np.inf).min(axis=0)
        np.testing.assert_allclose(ch[no_ref], (green[k] - low)[no_ref], atol=1e-5)
        assert np.isnan(s["departure"].values[j][no_ref]).all()
        n_low += int(no_ref.sum())
    assert n_low >= 20


def test_the_seasons_lowest_ndvi_is_read_not_encoded(synth_cube, tiny_run):
    """The dates only the wider loss window needs give their patch NDVI without an encoder pass: a scheduled tick
    encodes what it did before."""
    wm = WorldModel(str(tiny_run))
    encoded = []
    real = wm.model.encode

    def counting(pixels, *args, **kwargs):
        encoded.append(int(pixels.shape[0]) * int(pixels.shape[1]))  # windows x dates
        return real(pixels, *args, **kwargs)

    wm.model.encode = counting
    kw = dict(start="2021-10-01", lead_days=20, departure_lag_days=60.0, departure_window_days=5.0)
    narrow = surprise(str(synth_cube), wm, loss_window_days=5.0, **kw)
    n_narrow = sum(encoded)
    encoded.clear()
    wide = surprise(str(synth_cube), wm, loss_window_days=40.0, **kw)
    assert sum(encoded) == n_narrow > 0
    np.testing.assert_array_equal(wide["surprise"].values, narrow["surprise"].values)
    np.testing.assert_array_equal(wide["departure"].values, narrow["departure"].values)
    more = np.isfinite(wide["ndvi_change"].values) & ~np.isfinite(narrow["ndvi_change"].values)
    assert more.sum() >= 10  # patches without a reference within 5 days that have a clear look within 40


def test_departure_score_flags_landscapes_that_lost_vegetation_beyond_the_region():
    rng = np.random.default_rng(3)
    d = 0.2 + rng.normal(0, 0.02, (3, 24, 24))  # a year of weather moved every patch about as far
    change = np.full(d.shape, -0.01)
    d[1, :8, :10] += 0.3  # a drought moved a landscape further and browned it
    change[1, :8, :10] = -0.2
    d[1, 16, 16] += 0.3  # one field harvested earlier than last year: alone
    d[1, 12:18, :6] += 0.3  # last year's drought is over: greener than a year before
    change[1, 12:18, :6] = 0.2
    d[2, :, 2:] = np.nan  # a cloudy date: 48 clear patches
    times = np.datetime64("2022-06-01") + np.arange(3).astype("timedelta64[D]")
    coords = {"time": times}
    da, ch = (xr.DataArray(a, dims=("time", "py", "px"), coords=coords) for a in (d, change))
    z = departure_score(da, ch).values
    assert (z[1, 2:6, 2:8] > 8).all()  # inside the drought (its edges: half the neighbourhood)
    assert z[1, 16, 16] < 3 and np.nanmax(z[1, 12:18, :6]) < 3 and np.nanmax(np.abs(z[0])) < 5
    raw = departure_score(da, neighbourhood=1).values  # the z alone, unsigned
    assert raw[1, 16, 16] > 8 and (raw[1, 12:18, :6] > 8).all()
    assert np.isnan(z[2, :, 2:]).all() and np.isfinite(z[2, :, :2]).all()
    assert np.isnan(departure_score(da, min_patches=49).values[2]).all()  # too few clear patches: no score
    # no NDVI a year before on each side of the day: that patch is not scored and does not count as clear
    ch.values[2, :, 1] = np.nan
    z2 = departure_score(da, ch).values
    assert np.isnan(z2[2, :, 1]).all() and np.isfinite(z2[2, :, 0]).all()
    assert np.isnan(departure_score(da, ch, min_patches=25).values[2]).all()  # 24 patches left


def test_persistent_departure_scores_a_field_that_stays_apart_for_weeks():
    """A patch far from a year before with vegetation lost on 4 clear looks over 20 days or more, after a look
    without it, scores the run's lowest z from the look that completes it; a shorter run (a harvest a week off
    last year's), a run that was there from the first look (older than the scores), a small NDVI loss and a
    run broken by a look that does not hold score nothing; a cloudy look inside a run does not break it. By
    default each look of a run not yet long enough scores a provisional value below the alert thresholds."""
    days = np.arange(12) * 5  # a look every 5 days
    z = np.zeros((12, 1, 7))
    nd = np.full((12, 1, 7), -0.02)
    run = slice(2, 8)  # looks 2..7: 25 days
    z[run, 0, 0], nd[run, 0, 0] = [6, 5, 7, 4, 6, 8], -0.3  # a failed field
    z[2:5, 0, 1], nd[2:5, 0, 1] = 9, -0.5  # three looks: a harvest earlier than last year's
    z[:6, 0, 2], nd[:6, 0, 2] = 9, -0.3  # from the first look on: an older change
    z[run, 0, 3], nd[run, 0, 3] = 9, -0.1  # far from a year before, little vegetation lost
    z[run, 0, 4], nd[run, 0, 4] = 9, -0.3
    z[4, 0, 4] = 1.0  # a look that does not hold ends the run
    z[run, 0, 5], nd[run, 0, 5] = 9, -0.3
    z[4, 0, 5] = nd[4, 0, 5] = np.nan  # a cloudy look inside the run
    z[3:9, 0, 6], nd[3:9, 0, 6] = 9, -0.3  # the same run a look later...
    nd[1:3, 0, 6] = np.nan  # ...after cloudy looks: it began after the clear look 0
    times = np.datetime64("2022-07-01") + days.astype("timedelta64[D]")
    da = lambda a: xr.DataArray(a, dims=("time", "py", "px"), coords={"time": times})  # noqa: E731
    out = anomaly.persistent_departure(da(z), da(nd), provisional=None).values
    np.testing.assert_array_equal(out[:6, 0, 0], np.nan)  # looks 2..5: 4 looks but 15 days
    np.testing.assert_allclose(out[6:8, 0, 0], [4.0, 4.0])  # from look 6 (20 days, 5 looks): the lowest z
    assert np.isnan(out[8:, 0, 0]).all()  # the run is over
    assert np.isnan(out[:, 0, 1:5]).all()
    np.testing.assert_allclose(out[6:8, 0, 5], [9.0, 9.0])  # looks 2, 3, 5, 6 over 20 days: the cloud skipped
    np.testing.assert_allclose(out[7:9, 0, 6], [9.0, 9.0])
    assert np.isnan(out[:7, 0, 6]).all()

    # provisional (the default): every look that holds in a run not yet 4 looks and 20 days long scores
    # min(PERSISTENT_PROVISIONAL, the run's lowest z), also in a run older than the scores; the rest as above
    pro = anomaly.persistent_departure(da(z), da(nd)).values
    v = anomaly.PERSISTENT_PROVISIONAL
    held = {0: [2, 3, 4, 5], 1: [2, 3, 4], 2: [0, 1, 2, 3], 4: [2, 3, 5, 6, 7], 5: [2, 3, 5], 6: [3, 4, 5, 6]}
    for px in range(7):
        want = np.where(np.isfinite(out[:, 0, px]), out[:, 0, px], np.nan)
        want[held.get(px, [])] = v
        np.testing.assert_array_equal(pro[:, 0, px], want.astype(np.float32), err_msg=f"patch {px}")
    # an older change is not scored once its run is long enough: looks 4 and 5 of patch 2 (5-6 looks, 20-25 days)
    assert np.isnan(pro[4:, 0, 2]).all()
    # never more than the run's lowest z so far
    big = anomaly.persistent_departure(da(z), da(nd), provisional=100.0).values
    np.testing.assert_allclose(big[2:6, 0, 0], [6.0, 5.0, 5.0, 4.0])
    # below the thresholds of geowm's alert rules and of AlertRules' defaults: it never opens nor confirms an alert
    from geowm.alerts import AlertRules
    assert v < min(anomaly.ALERT_RULES["confirm_threshold"], AlertRules().confirm_threshold)


def test_detect_scores_the_persistent_departure_too(synth_cube, tiny_run, monkeypatch):
    """The anomaly score is the largest of the surprise, departure and persistent departure scores, the last
    computed from the departure z and the NDVI change that detect returns."""
    monkeypatch.setattr(anomaly, "DEPARTURE_LAG_DAYS", 60.0)  # the test cube has one year: a reference 60 d back
    for name, value in (("Z", 0.5), ("LOSS", 0.02), ("LOOKS", 3), ("DAYS", 10.0)):  # a small cube: let runs hold
        monkeypatch.setattr(anomaly, f"PERSISTENT_{name}", value)
    scores, _ = detect(str(synth_cube), str(tiny_run), "2021-08-01", history_days=150, lead_days=20)
    p = scores["persistent_score"]
    dz = departure_score(scores["departure"], scores["ndvi_change_at_day"], neighbourhood=1)
    np.testing.assert_array_equal(p.values, anomaly.persistent_departure(
        dz, scores["ndvi_change_at_day"], 0.5, 0.02, 3, 10.0).values)
    others = np.fmax(scores["surprise_score"].values, scores["departure_score"].values)
    assert (p.values > others).sum() >= 3
    np.testing.assert_array_equal(scores["score"].values,
                                  np.fmax(np.fmax(others, p.values), scores["water_score"].values))


def test_detect_scores_new_open_water_too(synth_cube, synth_region, tiny_run, monkeypatch):
    """The anomaly score is at least the new open water score (geowm.water); the generator's flood (seed 3,
    grassland, 2021-10-02) gets it on its clear look; ``water=False`` leaves it out and nothing else changes."""
    from geowm.forecast import region
    from geowm.metrics import load_events, patch_labels
    from geowm.water import new_water, new_water_score

    monkeypatch.setattr(anomaly, "DEPARTURE_LAG_DAYS", 60.0)  # the test cube has one year: a reference 60 d back
    kw = dict(history_days=150, lead_days=20)
    wet, _ = detect(str(synth_cube), str(tiny_run), "2021-09-01", **kw)
    dry, _ = detect(str(synth_cube), str(tiny_run), "2021-09-01", water=False, **kw)
    assert "new_water" not in dry and "water_score" not in dry
    t = wet["time"].values
    share = new_water(region(geowm.open_cube(synth_cube), None, 8), t, 8)
    np.testing.assert_array_equal(wet["new_water"].values, share.values)
    np.testing.assert_array_equal(wet["water_score"].values, new_water_score(share).values)
    np.testing.assert_array_equal(wet["score"].values, np.fmax(dry["score"].values, wet["water_score"].values))
    ev = load_events(synth_region / "events.geojson")
    flood = patch_labels(ev[ev["type"] == "flood"], t, wet["py"].values, wet["px"].values, ev.attrs["crs"]).values
    seen = (flood == 1) & np.isfinite(wet["score"].values)
    assert seen.sum() >= 5 and np.median(wet["score"].values[seen]) >= 5.0  # the alert threshold
    assert np.median(dry["score"].values[seen]) < np.median(wet["score"].values[seen])


def test_vegetation_loss_only_scales_a_positive_score_by_the_ndvi_lost():
    score = np.array([6.0, 6.0, 6.0, 6.0, 6.0, -2.0, -2.0, 6.0])
    change = np.array([0.02, 0.0, -0.025, -0.05, -0.3, 0.1, -0.05, np.nan])
    np.testing.assert_allclose(anomaly.vegetation_loss_only(score, change, full=0.1),
                               [0.0, 0.0, 1.5, 3.0, 6.0, -2.0, -2.0, 6.0])
    np.testing.assert_allclose(anomaly.vegetation_loss_only(score, change),  # full 0: the sign alone
                               [0.0, 0.0, 6.0, 6.0, 6.0, -2.0, -2.0, 6.0])


def test_surprise_score_counts_vegetation_loss_only(synth_cube, tiny_run, monkeypatch):
    """With the seasonal terms, a patch's positive surprise score is scaled by its NDVI loss against a year
    before (0 where it is greener, in full from a loss of VEGETATION_LOSS_FULL); the other patches keep the
    surprise score they have without them."""
    monkeypatch.setattr(anomaly, "DEPARTURE_LAG_DAYS", 60.0)  # the test cube has one year: a reference 60 d back
    kw = dict(history_days=150, lead_days=20)
    signed, _ = detect(str(synth_cube), str(tiny_run), "2021-09-01", **kw)
    plain, _ = detect(str(synth_cube), str(tiny_run), "2021-09-01", seasonal=False, **kw)
    z, raw, change = signed["surprise_score"].values, plain["surprise_score"].values, signed["ndvi_change"].values
    full = anomaly.VEGETATION_LOSS_FULL
    greener = change >= 0
    bites = greener & (raw > 0)
    scaled = (change < 0) & (change > -full) & (raw > 0)  # lost less than in full: a part of the score
    assert bites.sum() >= 10 and scaled.sum() >= 10 and (~greener & np.isfinite(raw)).sum() >= 10
    np.testing.assert_array_equal(z[bites], 0.0)
    np.testing.assert_allclose(z[scaled], raw[scaled] * -change[scaled] / full, rtol=1e-5)
    assert (z[scaled] < raw[scaled]).all()
    kept = ~bites & ~scaled
    np.testing.assert_array_equal(z[kept], raw[kept])
    others = np.fmax(signed["departure_score"].values, signed["persistent_score"].values)  # the seasonal scores
    others = np.fmax(others, signed["water_score"].values)  # and new open water, whatever the NDVI did
    assert (signed["score"].values[greener] <= np.fmax(0, others[greener])).all()


def test_surprise_keeps_each_patch_latent_at_its_place(synth_cube, tiny_run):
    """With no lag the departure is a patch's distance to its own latent (0); a wider window can only bring
    a nearer latent."""
    t0 = "2021-08-01"
    same = surprise(str(synth_cube), str(tiny_run), start=t0, lead_days=20, departure_lag_days=0,
                    departure_window_days=0)
    ok = np.isfinite(same["departure"].values)
    assert ok.mean() > 0.2
    np.testing.assert_allclose(same["departure"].values[ok], 0.0, atol=1e-5)
    assert not np.isfinite(same["surprise"].values[~ok]).any()  # a surprise needs the patch's latent too
    assert not np.isfinite(same["departure"].values[same["clear_fraction"].values == 0]).any()
    np.testing.assert_allclose(same["ndvi_change"].values[ok], 0.0, atol=1e-5)  # the patch's own NDVI
    later = surprise(str(synth_cube), str(tiny_run), start=t0, lead_days=20, departure_lag_days=0,
                     departure_window_days=0, departure_from="2021-10-01")  # as detect: none for the history
    before = (later.time < np.datetime64("2021-10-01")).values
    assert before.any() and (~before).any() and not np.isfinite(later["departure"].values[before]).any()
    np.testing.assert_array_equal(later["departure"].values[~before], same["departure"].values[~before])
    np.testing.assert_array_equal(later["surprise"].values, same["surprise"].values)
    narrow, wide = (surprise(str(synth_cube), str(tiny_run), start=t0, lead_days=20, departure_lag_days=30,
                             departure_window_days=w)["departure"].values for w in (5, 20))
    both = np.isfinite(narrow) & np.isfinite(wide)
    assert both.mean() > 0.1 and (wide[both] <= narrow[both] + 1e-6).all() and (wide[both] < narrow[both]).any()
    assert np.nanmax(wide) <= 2 and np.nanmin(wide) >= -1e-5
    np.testing.assert_array_equal(narrow.shape, same["surprise"].shape)


def test_the_departure_does_not_need_a_forecast_context(synth_cube, tiny_run):
    """A date whose block has no 2 clear context dates a lead before it gets no surprise, but what the satellite
    saw is still encoded: its departure is there (the first months of a cube, the months after a long cloudy
    spell and, a year later, the dates that take them as reference)."""
    kw = dict(start="2021-08-01", departure_lag_days=0, departure_window_days=0)
    none = surprise(str(synth_cube), str(tiny_run), lead_days=2000, **kw)  # no context is that old
    some = surprise(str(synth_cube), str(tiny_run), lead_days=20, **kw)
    assert not np.isfinite(none["surprise"].values).any()
    dep, clear = none["departure"].values, none["clear_fraction"].values > 0
    assert np.isfinite(dep).mean() > 0.2 and not np.isfinite(dep[~clear]).any()
    np.testing.assert_allclose(dep[np.isfinite(dep)], 0.0, atol=1e-5)
    has = np.isfinite(some["surprise"].values)
    assert has.mean() > 0.2 and np.isfinite(dep[has]).all()  # every patch-date with a surprise has a departure


def test_year_ago_references_are_encoded_not_predicted(synth_cube, tiny_run):
    """The departure's reference dates only need the observed latent: the predictor runs for the scored
    dates alone, as many times as without the departure."""
    wm = WorldModel(str(tiny_run))
    calls = {"encode": 0, "predict": 0}
    encode, predict = wm.model.encode, wm.model.predict

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += len(args[0]["pixels"] if isinstance(args[0], dict) else args[0])
            return fn(*args, **kwargs)
        return call

    wm.model.encode, wm.model.predict = counted("encode", encode), counted("predict", predict)
    runs = {}
    for lag in (None, 60):
        calls.update(encode=0, predict=0)
        runs[lag] = (surprise(str(synth_cube), wm, start="2021-10-01", lead_days=20, departure_lag_days=lag,
                              departure_window_days=20), dict(calls))
    (plain, n_plain), (dep, n_dep) = runs[None], runs[60]
    assert n_dep["encode"] > n_plain["encode"] > 0  # the references are encoded
    assert n_dep["predict"] == n_plain["predict"] == n_plain["encode"]  # and not predicted
    np.testing.assert_allclose(dep["surprise"].values, plain["surprise"].values, atol=1e-6)
    assert np.isfinite(dep["departure"].values).mean() > 0.1


def test_normalise_against_own_history():
    rng = np.random.default_rng(0)
    times = np.datetime64("2021-01-01") + np.arange(0, 730, 5).astype("timedelta64[D]")
    s = rng.gamma(2.0, 0.01, (len(times), 6, 6)) * np.linspace(1, 5, 6)[None, None, :]  # noisier columns
    s[-1, 2, 2] += 0.5  # an anomaly at the last date
    s[-1, 0, 5] += 0.05  # a small change where the patch is usually noisy
    da = xr.DataArray(s, dims=("time", "py", "px"), coords={"time": times})
    z = normalise(da).values
    assert z[-1, 2, 2] > 10 and abs(z[-1, 0, 5]) < 6
    assert np.nanmedian(np.abs(z[80:-1])) < 1.5  # ordinary dates are ordinary
    part = normalise(da, score_from=times[100]).values  # the dates before are reference only: not scored
    assert not np.isfinite(part[:100]).any()
    np.testing.assert_array_equal(part[100:], z[100:])
    shifted = da.copy()
    shifted[-2] += 0.3  # a scene-wide shift (haze) is removed by the regional residual
    assert np.nanmax(np.abs(regional_residual(shifted).values[-2] - regional_residual(da).values[-2])) < 1e-9


def test_recurring_seasonal_change_is_capped_a_new_one_is_not():
    """Harvest-like change at the same place and season every year stops alerting; a first-time one alerts."""
    rng = np.random.default_rng(1)
    times = np.datetime64("2021-01-01") + np.arange(0, 730, 5).astype("timedelta64[D]")
    s = rng.gamma(2.0, 0.01, (len(times), 4, 4))
    doy = (times - times.astype("datetime64[Y]")).astype(int)
    year2 = times >= np.datetime64("2022-01-01")
    harvest = (doy >= 200) & (doy < 215)  # three dates a year
    s[harvest, 1, 1] += 0.4  # every year at (1, 1)
    s[harvest & year2, 2, 3] += 0.4  # only in the second year at (2, 3): new
    da = xr.DataArray(s, dims=("time", "py", "px"), coords={"time": times})
    z, plain = normalise(da).values, normalise(da, recurrence_margin=None).values
    second = harvest & year2
    assert (plain[second, 1, 1] > 10).all() and (plain[second, 2, 3] > 10).all()  # robust z alone: both alert
    assert (z[second, 1, 1] < 4).all()  # capped: as surprising as the same season a year before
    np.testing.assert_array_equal(z[second, 2, 3], plain[second, 2, 3])  # nothing like it before: unchanged
    early = times < times[0] + np.timedelta64(300, "D")
    np.testing.assert_array_equal(z[early], plain[early])  # no reference a year or more back yet: unchanged


def test_recurrence_cap_looks_back_over_every_earlier_year():
    """The normalisation keeps to its history span; the recurrence cap also sees the years before it, so a
    harvest hidden by clouds last year is still known from the year before."""
    rng = np.random.default_rng(2)
    times = np.datetime64("2021-01-01") + np.arange(0, 1095, 5).astype("timedelta64[D]")
    s = rng.gamma(2.0, 0.01, (len(times), 4, 4))
    doy = (times - times.astype("datetime64[Y]")).astype(int)
    year = times.astype("datetime64[Y]").astype(int) + 1970
    harvest = (doy >= 200) & (doy < 215)
    s[harvest & (year != 2022), 1, 1] += 0.4  # 2021 and 2023; in 2022 clouds hid it
    s[(year == 2022) & (doy >= 180) & (doy < 240), 1, 1] = np.nan
    s[harvest & (year == 2023), 2, 3] += 0.4  # new in 2023
    da = xr.DataArray(s, dims=("time", "py", "px"), coords={"time": times})
    z = normalise(da, reference_from="2022-01-01").values
    late = year >= 2022
    one_year = np.full_like(z, np.nan)
    one_year[late] = normalise(da[late]).values  # without 2021
    third = harvest & (year == 2023)
    assert (one_year[third, 1, 1] > 10).all()  # a year back the harvest was not seen: it alerts
    assert (z[third, 1, 1] < 4).all()  # two years back it was
    assert (z[third, 2, 3] > 10).all() and (one_year[third, 2, 3] > 10).all()  # new change: alerts either way
    plain = normalise(da, reference_from="2022-01-01", recurrence_margin=None).values
    np.testing.assert_allclose(plain[late], normalise(da[late], recurrence_margin=None).values)  # z: one year
    assert not np.isfinite(z[~late]).any()  # the earlier years are reference only


def test_recurrence_cap_takes_the_neighbours_season_where_clouds_hid_the_patchs_own():
    """Leaf fall that surprises a whole forest every autumn does not alert on a patch whose own autumn a year
    before was hidden: its neighbours' autumn caps it. A first-time change on a hidden patch amid ordinary land
    still alerts, and a patch with its own season is capped by its own."""
    rng = np.random.default_rng(3)
    times = np.datetime64("2021-01-01") + np.arange(0, 730, 5).astype("timedelta64[D]")
    s = rng.gamma(2.0, 0.01, (len(times), 8, 12))
    doy = (times - times.astype("datetime64[Y]")).astype(int)
    year2 = times >= np.datetime64("2022-01-01")
    autumn = (doy >= 290) & (doy < 320)
    s[autumn, :, :6] += 0.4  # forest on columns 0-5: leaf fall surprises it every autumn
    hidden = times < np.datetime64("2022-02-01")  # under clouds at (2, 2) and (2, 9): no season of their own
    s[hidden, 2, 2] = s[hidden, 2, 9] = np.nan
    s[autumn & year2, 2, 9] += 0.4  # a first change at (2, 9), amid ordinary land
    da = xr.DataArray(s, dims=("time", "py", "px"), coords={"time": times})
    z = normalise(da).values
    alone = normalise(da, recurrence_neighbourhood=1).values  # the patch's own season only
    second = autumn & year2
    assert (alone[second, 2, 2] > 5).all()  # without a season of its own: leaf fall alerts
    assert (z[second, 2, 2] < 4).all()  # its neighbours' autumn caps it
    assert (z[second, 2, 9] > 5).all()  # nothing like it around: it still alerts
    np.testing.assert_array_equal(z[second, 5, 2], alone[second, 5, 2])  # its own autumn: as before
    assert (z[second, 5, 2] < 4).all()


def test_recurrence_dates_are_earlier_seasons_of_the_scored_dates():
    times = np.datetime64("2021-01-01") + np.arange(0, 1095, 5).astype("timedelta64[D]")
    got = anomaly.recurrence_dates(times, "2023-07-01", "2023-07-31", "2022-07-01").astype("datetime64[D]")
    doy = (got - got.astype("datetime64[Y]")).astype(int)
    assert len(got) and (got < np.datetime64("2022-07-01")).all()
    assert ((doy >= 181 - anomaly.SEASON_DAYS - 1) & (doy <= 211 + anomaly.SEASON_DAYS + 1)).all()
    assert {int(str(g)[:4]) for g in got} == {2021, 2022}  # every earlier year
    assert len(anomaly.recurrence_dates(times, "2021-03-01", "2021-04-01", "2021-02-01")) == 0  # none a year back


def test_detect_caps_with_the_seasons_before_its_history(synth_cube, tiny_run, monkeypatch):
    """detect scores the acquisitions before its history that are in the season of a scored one and old
    enough, and hands them to the normalisation as the recurrence cap's reference only."""
    monkeypatch.setattr(anomaly, "RECURRENCE_AGE_DAYS", 30)  # the test cube has one year
    seen = {}
    normalise = anomaly.normalise

    def spy(surp, **kw):
        seen.update(surp=surp, **kw)
        return normalise(surp, **kw)

    monkeypatch.setattr(anomaly, "normalise", spy)
    scores, _ = detect(str(synth_cube), str(tiny_run), "2021-11-01", history_days=30, lead_days=20, seasonal=False)
    hist0 = np.datetime64("2021-10-02")
    times = seen["surp"]["time"].values
    earlier = times[times < hist0].astype("datetime64[s]")
    cube_times = geowm.open_cube(str(synth_cube))["time"].values
    expect = anomaly.recurrence_dates(cube_times, "2021-11-01", cube_times[-1], hist0)
    assert len(expect) >= 4 and set(earlier) == set(expect)  # September, and January-February across the turn
    # of the year (no context there yet: no surprise); nothing else before the history
    assert np.isfinite(seen["surp"].sel(time=earlier).values).sum() > 100
    assert seen["reference_from"] == hist0 and seen["recurrence_margin"] == anomaly.RECURRENCE_MARGIN
    assert scores["time"].values.min() >= np.datetime64("2021-11-01")  # reference only: not in the output


def test_cli_anomalies_writes_alerts_and_scores(synth_cube, tiny_run, tmp_path):
    store = tmp_path / "fc"
    write_forecasts(forecast(str(synth_cube), str(tiny_run), init="2021-08-01", leads=(10, 20), members=1), store)
    out = tmp_path / "alerts"
    res = runner.invoke(app, ["anomalies", "--cube", str(synth_cube), "--forecasts", str(store), "--out", str(out),
                              "--history-days", "60", "--lead-days", "45", "--catalog", str(tmp_path / "cat")])
    assert res.exit_code == 0, res.output
    alerts = gpd.read_parquet(out / "alerts.parquet")
    assert alerts.crs.to_epsg() == 4326
    assert {"id", "type_guess", "first_detected", "last_seen", "peak_score", "area_ha", "confidence"} <= set(alerts)
    gpd.read_file(out / "alerts.geojson")
    scores = xr.open_zarr(out / "scores.zarr").load()
    assert scores.score.dims == ("time", "y", "x") and scores.time.values[0] >= np.datetime64("2021-08-01")
    assert scores.attrs["geowm:lead_days"] == 45.0  # the forecasts compared with were made 45 days ahead
    assert (out / "surprise.zarr").is_dir()  # a second run takes every acquisition from the surprise record
    again = runner.invoke(app, ["anomalies", "--cube", str(synth_cube), "--forecasts", str(store), "--out", str(out),
                                "--history-days", "60", "--lead-days", "45", "--no-catalog"])
    assert again.exit_code == 0 and "acquisitions encoded: 0," in again.output.replace("\n", " "), again.output
    xr.testing.assert_allclose(xr.open_zarr(out / "scores.zarr").load(), scores, atol=1e-6)
    import pystac  # the CLI keeps the catalog current: an item per alert and one for the score raster

    cat = pystac.Catalog.from_file(str(tmp_path / "cat" / "catalog.json"))
    assert {it.properties["geowm:alert_id"] for it in cat.get_child("alerts").get_items()} == set(alerts["id"])
    assert len(list(cat.get_child("anomaly-scores").get_items())) == 1


def test_cli_anomalies_bad_input(synth_cube, tiny_run, tmp_path):
    cube = geowm.open_cube(synth_cube)
    x0, y1 = float(cube.x[0]), float(cube.y[0])
    store = tmp_path / "fc"
    other = forecast(str(synth_cube), str(tiny_run), init="2021-08-01", leads=(10,), members=1,
                     bbox=(x0, y1 - 640, x0 + 640, y1))
    other = other.assign_coords(x=other.x + 5.0)  # as if made on another cube's grid
    write_forecasts(other, store)
    out = tmp_path / "alerts"
    res = runner.invoke(app, ["anomalies", "--cube", str(synth_cube), "--forecasts", str(store), "--out", str(out),
                              "--catalog", str(tmp_path / "cat")])
    assert res.exit_code == 2 and "another cube grid" in res.output.replace("\n", " ") and not out.exists()
    assert not (tmp_path / "cat").exists()
    res = runner.invoke(app, ["anomalies", "--cube", str(synth_cube), "--forecasts", str(tmp_path / "nope"),
                              "--out", str(out)])
    assert res.exit_code == 2 and "no forecast store" in res.output and not out.exists()
    good = tmp_path / "fc_good"
    write_forecasts(forecast(str(synth_cube), str(tiny_run), init="2021-08-01", leads=(10,), members=1), good)
    for option, value, why in (("--lead-days", "0", "lead_days must be a positive"),
                               ("--lead-days", "-30", "lead_days must be a positive"),
                               ("--lead-days", "nan", "lead_days must be a positive"),
                               ("--history-days", "-1", "history_days must be >= 0")):
        res = runner.invoke(app, ["anomalies", "--cube", str(synth_cube), "--forecasts", str(good), "--out", str(out),
                                  option, value, "--no-catalog"])
        assert res.exit_code == 2 and why in res.output, res.output
        assert not out.exists()


def test_readme_python_quickstart_runs(synth_cube, tiny_run, tmp_path):
    """The README's quickstart for scientists, on the test cube, run, store and alerts."""
    import re
    from pathlib import Path

    from geowm.alerts import empty_alerts, write_alerts

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Python quickstart\s+```python\n(.*?)```", readme, re.S).group(1)
    store, alerts = tmp_path / "fc", tmp_path / "alerts"
    write_forecasts(forecast(str(synth_cube), str(tiny_run), init="2021-08-01", leads=(10,), members=1), store)
    write_alerts(empty_alerts(), alerts)
    for a, b in (("demo/cube", synth_cube), ("demo/runs/tiny", tiny_run), ("demo/forecasts", store),
                 ("demo/alerts", alerts)):
        code = code.replace(f'"{a}"', repr(str(b)))
    assert "demo/" not in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["fc"].ndvi.dims == ("init_time", "lead_time", "quantile", "y", "x")
    hits = scope["geowm"].similar(scope["query"], k=3, among=scope["lat"])
    assert len(hits) == 3 and (hits.score.diff().dropna() <= 1e-9).all() and {"time", "py", "px"} <= set(hits)


def test_cli_evaluate_reports_model_and_baselines(synth_cube, synth_region, tiny_run, tmp_path):
    import json

    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["evaluate", "--cube", str(synth_cube), "--model", str(tiny_run), "--events",
                              str(synth_region / "events.geojson"), "--from", "2021-08-01", "--leads", "10,20",
                              "--init-every", "40", "--history-days", "60", "--json", str(out),
                              "--landcover", str(synth_region / "landcover.tif")])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert set(rep["ndvi_forecast"]) == {"model", "persistence", "climatology", "damped_anomaly", "harmonic",
                                         "bfast"}
    for method in rep["ndvi_forecast"].values():
        assert method["10"]["n_pixels"] > 1000 and 0 < method["10"]["rmse"] < 1
    n = {m: v["10"]["n_pixels"] for m, v in rep["ndvi_forecast"].items()}
    assert len(set(n.values())) == 1  # like for like: the same pixels for every method
    assert set(rep["anomaly_auroc"]) == set(rep["ndvi_forecast"])
    for who in ("harmonic", "bfast"):  # the change detectors' own alerts, scored like the model's
        keys = {"precision", "recall", "f1", "false_alarms_normal_change", "n_alerts"}
        assert keys <= set(rep["baseline_alerts"][who])
    assert rep["labels"]["positive"] > 0
    by_type = rep["anomaly_auroc_by_type"]  # each event type with positives, for the model and every baseline
    typed = {t for t, n in rep["labels"]["positive_by_type"].items() if n}
    assert typed and sum(rep["labels"]["positive_by_type"].values()) >= rep["labels"]["positive"]
    assert set(by_type) == set(rep["anomaly_auroc"]) and all(set(v) == typed for v in by_type.values())
    assert all(0 <= v <= 1 for v in rep["anomaly_auroc"].values())
    parts = rep["anomaly_auroc_model_parts"]  # a one-year cube: no seasonal departure, surprise and new water
    assert set(parts) == {"surprise", "departure", "persistent", "water"}
    assert parts["departure"] is None and parts["persistent"] is None and 0 <= parts["water"] <= 1
    assert "precision" in rep["alerts"] and "NDVI forecast RMSE" in res.output
    assert "each score alone: surprise" in " ".join(res.output.split())
    sim = rep["similar"]  # nearest latents at other places: same land cover more often than chance
    assert sim["n_queries"] >= 50 and sim["k"] == 5 and 0 <= sim["chance"] < 1
    assert sim["share"] > sim["chance"], sim
    assert "share the query's land cover" in " ".join(res.output.split())
    res = runner.invoke(app, ["evaluate", "--cube", str(synth_cube), "--model", str(tiny_run), "--events",
                              str(synth_region / "events.geojson"), "--from", "2030-01-01"])
    assert res.exit_code == 2 and "must lie inside the cube" in res.output.replace("\n", " ")


def test_evaluate_block_by_block_gives_the_whole_region_scores(synth_cube, synth_region, tiny_run, monkeypatch):
    """``block_px``: four 128 px blocks of the 256 px region (fitted, forecast and scored one at a time, so memory
    does not grow with the region) give the scores of one 256 px block: the same pixels, the same AUROC and
    alerts, RMSE to float32 rounding; a size off the model's window grid is refused before anything runs."""
    import geowm.evaluate
    from geowm.evaluate import EVAL_BLOCK_PX, block_size, evaluate
    from geowm.inference import WorldModel

    kw = dict(leads=(10, 20), init_every_days=40, history_days=60, members=2)
    args = (str(synth_cube), str(tiny_run), str(synth_region / "events.geojson"), "2021-08-01")
    whole, blocks = evaluate(*args, block_px=256, **kw), evaluate(*args, block_px=128, **kw)
    assert blocks["inits"] == whole["inits"] and len(whole["inits"]) >= 2
    for method, by_lead in whole["ndvi_forecast"].items():
        for lead, s in by_lead.items():
            b = blocks["ndvi_forecast"][method][lead]
            assert b["n_pixels"] == s["n_pixels"] > 1000, (method, lead)
            assert b["rmse"] == pytest.approx(s["rmse"], rel=1e-6) and b["mae"] == pytest.approx(s["mae"], rel=1e-6)
    for key in ("anomaly_auroc", "anomaly_auroc_by_type", "labels", "alerts", "n_alerts", "baseline_alerts"):
        assert blocks[key] == whole[key], key
    wm = WorldModel(tiny_run)  # 32 px windows
    with pytest.raises(ValueError, match="block_px 100: give a positive multiple of 32 px"):
        evaluate(*args, block_px=100, **kw)
    assert block_size(None, [wm]) == EVAL_BLOCK_PX == 256 and block_size(96, [wm, wm]) == 96
    monkeypatch.setattr(geowm.evaluate, "EVAL_BLOCK_PX", 100)
    assert block_size(None, [wm]) == 128  # the default, rounded up to the window grid
    res = runner.invoke(app, ["evaluate", "--cube", args[0], "--model", args[1], "--events", args[2], "--from",
                              args[3], "--block-px", "0"])
    assert res.exit_code == 2 and "give a positive multiple" in " ".join(res.output.split())


def _same_scores(a: xr.Dataset, b: xr.Dataset) -> None:
    np.testing.assert_array_equal(a["time"].values, b["time"].values)
    for v in ("score", "surprise", "surprise_score", "departure", "ndvi_change", "clear_fraction"):
        np.testing.assert_array_equal(np.isfinite(a[v].values), np.isfinite(b[v].values), err_msg=v)
        np.testing.assert_allclose(a[v].values, b[v].values, atol=1e-5, equal_nan=True, err_msg=v)


def test_a_surprise_record_encodes_only_the_new_acquisitions(synth_region, tiny_run, tmp_path):
    """A cube that grows by the scenes of a few weeks, scored each time with the surprise record: the second run
    encodes nothing, the third the new dates (and the earlier seasons they bring into the recurrence cap) and not
    the history again, with the scores and alerts of a run from scratch."""
    from flows.simulator import release
    from geowm.cube import IngestOptions, ingest

    watched, cube, rec = tmp_path / "watched", tmp_path / "cube", tmp_path / "alerts" / "surprise.zarr"
    release(synth_region, watched, "2021-11-15")
    ingest(watched, cube, IngestOptions(scheduler="threads"))
    kw = dict(history_days=60, lead_days=20)
    first, _ = detect(str(cube), str(tiny_run), "2021-10-01", record=rec, **kw)
    n_first = first.attrs["geowm:computed_dates"]
    assert n_first > first.sizes["time"] and first.attrs["geowm:reused_dates"] == 0  # history included
    assert anomaly.open_record(rec).sizes["time"] == n_first
    again, _ = detect(str(cube), str(tiny_run), "2021-10-01", record=rec, **kw)
    assert again.attrs["geowm:computed_dates"] == 0 and again.attrs["geowm:reused_dates"] == n_first
    _same_scores(again, first)

    new_scenes = release(synth_region, watched, "2021-12-31")
    ingest(watched, cube, IngestOptions(scheduler="threads"))
    grown, alerts = detect(str(cube), str(tiny_run), "2021-10-01", record=rec, **kw)
    scratch, alerts_scratch = detect(str(cube), str(tiny_run), "2021-10-01", **kw)
    n_all = scratch.attrs["geowm:computed_dates"]
    computed, reused = grown.attrs["geowm:computed_dates"], grown.attrs["geowm:reused_dates"]
    assert reused == n_first and computed == n_all - n_first and computed >= len(new_scenes) > 0
    _same_scores(grown, scratch)
    assert len(alerts) == len(alerts_scratch) and set(alerts["id"]) == set(alerts_scratch["id"])
    assert anomaly.open_record(rec).sizes["time"] == n_all


def test_a_surprise_record_is_not_used_where_its_inputs_changed(synth_region, tiny_run, tmp_path):
    """A date's record holds only for the same model settings and the same scenes at that date and before it: a
    replaced scene makes its date and every later one be encoded again, other settings everything, and a record
    that cannot be read is recomputed and replaced with a warning."""
    import rasterio

    from flows.simulator import archive_scenes, release, released
    from geowm.cube import IngestOptions, ingest

    watched, cube, rec = tmp_path / "watched", tmp_path / "cube", tmp_path / "surprise.zarr"
    release(synth_region, watched, "2021-12-31")
    ingest(watched, cube, IngestOptions(scheduler="threads"))
    kw = dict(history_days=60, lead_days=20)
    first, _ = detect(str(cube), str(tiny_run), "2021-10-01", record=rec, **kw)
    n = first.attrs["geowm:computed_dates"]
    times = anomaly.open_record(rec)["time"].values

    # a scene of 2021-11 replaced by other pixels: the dates before it still hold, it and the later ones do not
    november = next(s for s in archive_scenes(synth_region) if s.datetime.month == 11)
    scene = released(watched)[november.id] / f"{november.id}.tif"
    day = np.datetime64(november.datetime.date())
    with rasterio.open(scene) as src:
        data, profile, names, tags = src.read(), src.profile, src.descriptions, src.tags()
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write((data * 0.8).astype(data.dtype))
        dst.descriptions = names
        dst.update_tags(**tags)
    ingest(watched, cube, IngestOptions(scheduler="threads", replace=True))
    after, _ = detect(str(cube), str(tiny_run), "2021-10-01", record=rec, **kw)
    later = int((times >= day).sum())
    assert after.attrs["geowm:computed_dates"] == later and after.attrs["geowm:reused_dates"] == n - later
    _same_scores(after, detect(str(cube), str(tiny_run), "2021-10-01", **kw)[0])

    other, _ = detect(str(cube), str(tiny_run), "2021-10-01", record=rec, history_days=60, lead_days=30)
    assert other.attrs["geowm:reused_dates"] == 0  # another lead: another surprise at every date

    (rec / "zarr.json").write_text("{ not json")
    with pytest.warns(UserWarning, match="surprise record not used"):
        broken, _ = detect(str(cube), str(tiny_run), "2021-10-01", record=rec, **kw)
    assert broken.attrs["geowm:reused_dates"] == 0 and anomaly.open_record(rec).sizes["time"] == n
    rescored, _ = detect(str(cube), str(tiny_run), "2021-10-01", record=rec, rescore=True, **kw)
    assert rescored.attrs["geowm:computed_dates"] == n
