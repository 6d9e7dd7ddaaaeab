"""The climatology blend of decoded forecasts (geowm.calibrate): the per-pixel climatology, the blend the
forecast applies, and the backtest that fits it (and refuses to without a year of history)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from geowm.baselines import ndvi
from geowm.calibrate import ANOMALY_DAYS, ANOMALY_LOOKBACK, CALIBRATION, fit_calibration, fit_weights, reference
from geowm.cli import app
from geowm.cube.store import open_cube
from geowm.forecast import forecast
from geowm.inference import WorldModel

runner = CliRunner()
INIT = "2021-08-01"


@pytest.fixture(scope="module")
def cube(synth_cube):
    return open_cube(str(synth_cube)).isel(y=slice(0, 64), x=slice(0, 64))


def test_climatology_is_the_mean_of_clear_values_near_the_day_of_year(cube):
    """At a few pixels, by hand: the mean clear NDVI of the dates on or before the init within 15 days of the valid
    day of year (30 where none), NaN where none within 30; dates after the init never count."""
    vt = np.array(["2021-08-05", "2021-08-25", "2021-09-25"], dtype="datetime64[s]")
    bands = [str(b) for b in cube["band"].values]
    nd = reference(cube, np.datetime64(INIT), vt, bands).clim_ndvi
    obs = ndvi(cube).values  # T y x
    doy = pd.DatetimeIndex(cube["time"].values).day_of_year.values
    before = cube["time"].values <= np.datetime64(INIT)
    checked = 0
    for k, t in enumerate(pd.DatetimeIndex(vt)):
        dist = np.abs(doy - t.day_of_year)
        dist = np.minimum(dist, 365.25 - dist)
        for y, x in [(y, x) for y in range(3, 64, 12) for x in range(5, 64, 12)]:
            series = obs[:, y, x]
            for w in (15, 30):
                sel = before & (dist <= w) & np.isfinite(series)
                if sel.any():
                    assert nd[k, y, x] == pytest.approx(series[sel].mean(), abs=1e-5)
                    checked += 1
                    break
            else:
                assert np.isnan(nd[k, y, x])
    assert checked >= 20  # the August targets have clear July dates at most of these pixels
    assert np.isnan(nd[2]).all()  # 25 Sep: nothing on or before 1 Aug within 30 days of its day of year


def test_damped_departure_is_the_last_clear_departure_fading_with_time(cube):
    """At a few pixels, by hand: the last clear NDVI within 90 days on or before the init, minus the mean of the
    clear dates before it within 15 days of its day of year (30 where none), times exp(-days to the valid time /
    30); 0 where there is no such date or nothing before it to compare with."""
    vt = np.array(["2021-08-05", "2021-08-25"], dtype="datetime64[s]")
    bands = [str(b) for b in cube["band"].values]
    g = reference(cube, np.datetime64(INIT), vt, bands).anom_ndvi
    obs = ndvi(cube).values  # T y x
    times = cube["time"].values.astype("datetime64[s]")
    doy = pd.DatetimeIndex(times).day_of_year.values
    init = np.datetime64(INIT, "s")
    recent = (times <= init) & (times >= init - np.timedelta64(int(ANOMALY_LOOKBACK), "D"))
    checked = 0
    for y, x in [(y, x) for y in range(2, 64, 9) for x in range(4, 64, 9)]:
        series = obs[:, y, x]
        seen = np.flatnonzero(recent & np.isfinite(series))
        expected = 0.0
        if len(seen):
            last = seen[-1]
            dist = np.abs(doy - doy[last])
            dist = np.minimum(dist, 365.25 - dist)
            for w in (15, 30):
                sel = (np.arange(len(times)) < last) & (dist <= w) & np.isfinite(series)
                if sel.any():
                    dep = series[last] - series[sel].mean()
                    days = (vt - times[last]) / np.timedelta64(1, "D")
                    expected = np.exp(-days / ANOMALY_DAYS) * dep
                    checked += 1
                    break
        np.testing.assert_allclose(g[:, y, x], expected, atol=1e-5)
    assert checked >= 30 and np.abs(g).max() > 1e-3


def test_forecast_blends_with_the_climatology_by_the_lead_weight(cube, tiny_run):
    """climatology={"ndvi": [c0, c1, b]}: NDVI = a (model) + (1 - a) climatology + b (damped departure) with
    a = c0 + c1 lead / 30 (clipped), for every quantile, where a climatology exists; the model's own forecast
    elsewhere; bands untouched without a "pixels" weight. Two weights (older runs) mean b = 0."""
    leads = (5, 10, 30)  # 31 Aug: no date on or before 1 Aug within 30 days of its day of year
    raw = forecast(cube, str(tiny_run), init=INIT, leads=leads, members=3, climatology=False)
    mixed = forecast(cube, str(tiny_run), init=INIT, leads=leads, members=3, climatology={"ndvi": [0.9, -0.6, 0.5]})
    assert json.loads(mixed.attrs["geowm:climatology_blend"]) == {"ndvi": [0.9, -0.6, 0.5]}
    assert json.loads(raw.attrs["geowm:climatology_blend"]) == {}
    vt = mixed["valid_time"].values[0]
    bands = WorldModel(tiny_run).bands
    ref = reference(cube, np.datetime64(INIT), vt, bands)
    for j, a in enumerate((0.9 - 0.6 * 5 / 30, 0.9 - 0.6 * 10 / 30, 0.9 - 0.6 * 30 / 30)):
        m = mixed["ndvi"].isel(init_time=0, lead_time=j).values
        r, c, g = raw["ndvi"].isel(init_time=0, lead_time=j).values, ref.clim_ndvi[j][None], ref.anom_ndvi[j][None]
        has = np.broadcast_to(np.isfinite(c) & np.isfinite(r), m.shape)
        if j == 2:
            assert not has.any()
            np.testing.assert_array_equal(m, r)
            continue
        assert has.mean() > 0.5 and np.abs(g).max() > 1e-3
        np.testing.assert_allclose(m[has], (a * r + (1 - a) * c + 0.5 * g)[has], atol=1e-5)
        np.testing.assert_array_equal(m[~has], r[~has])
        assert np.abs(m - r)[has].max() > 1e-3  # the blend did something
    for b in bands:
        np.testing.assert_array_equal(mixed[b].values, raw[b].values)
    two = forecast(cube, str(tiny_run), init=INIT, leads=leads[:1], members=1, climatology={"ndvi": [0.9, -0.6]})
    zero = forecast(cube, str(tiny_run), init=INIT, leads=leads[:1], members=1, climatology={"ndvi": [0.9, -0.6, 0]})
    np.testing.assert_array_equal(two["ndvi"].values, zero["ndvi"].values)


def test_fit_weights_recovers_a_known_blend_and_keeps_it_physical():
    """Errors made from known weights give them back; a weight rising with lead or a departure that turns over is
    refitted as 0 (the others refitted without it)."""
    rng = np.random.default_rng(0)
    n = 20000
    lead = rng.choice([5.0, 10.0, 20.0, 30.0], n)
    truth = rng.normal(0, 0.1, (n, 1))  # what the observation departs from the climatology by
    anom = truth + rng.normal(0, 0.1, (n, 1))  # a noisy sign of it
    e_clim = -truth + rng.normal(0, 0.01, (n, 1))
    model_dep = truth + rng.normal(0, 0.05, (n, 1)) * (1 + lead[:, None] / 10)  # worse with lead
    e_model = e_clim + model_dep
    w = fit_weights(e_model, e_clim, anom, lead)
    a = np.clip(w[0] + w[1] * lead / 30, 0, 1)[:, None]
    blended = a * e_model + (1 - a) * e_clim + w[2] * anom
    assert w[1] < 0 and w[2] > 0  # the model fades with lead; the departure adds what it knows
    best = np.linalg.lstsq(np.stack([(e_model - e_clim).ravel(), ((e_model - e_clim) * lead[:, None] / 30).ravel(),
                                     anom.ravel()], 1), -e_clim.ravel(), rcond=None)[0]
    np.testing.assert_allclose(w, best, rtol=1e-4)
    assert np.sqrt((blended ** 2).mean()) < min(np.sqrt((e_model ** 2).mean()), np.sqrt((e_clim ** 2).mean()))
    rising = e_clim + truth + rng.normal(0, 0.05, (n, 1)) * (1 + (30 - lead[:, None]) / 10)  # better with lead
    w = fit_weights(rising, e_clim, anom, lead)
    assert w[1] == 0 and w[0] > 0
    w = fit_weights(e_model, e_clim, -anom, lead)  # a departure that turns over
    assert w[2] == 0 and w[0] > 0


def test_no_blend_without_a_year_of_history(tiny_run, synth_cube, tmp_path):
    """The session cube covers one year: no backtest init has a year before it, so no blend is fitted; the report
    says why, and forecasts stay the model's own. The CLI says the same, and rejects a bad date."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    report = fit_calibration(run)
    assert report["used"] is False and "365 days" in report["reason"]
    assert json.loads((run / CALIBRATION).read_text()) == report
    fc = forecast(str(synth_cube), str(run), init=INIT, leads=(10,), members=1)
    assert json.loads(fc.attrs["geowm:climatology_blend"]) == {}
    res = runner.invoke(app, ["calibrate", "--model", str(run), "--until", "2021-12-31"])
    assert res.exit_code == 0, res.output
    assert "no blend" in res.output
    res = runner.invoke(app, ["calibrate", "--model", str(run), "--from", "not-a-date"])
    assert res.exit_code != 0 and "cannot parse a date" in res.output
