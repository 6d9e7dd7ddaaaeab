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
from geowm.calibrate import CALIBRATION, climatology, fit_calibration
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
    _, nd = climatology(cube, np.datetime64(INIT), vt, bands)
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


def test_forecast_blends_with_the_climatology_by_the_lead_weight(cube, tiny_run):
    """climatology={"ndvi": [c0, c1]}: NDVI = a (model) + (1 - a) climatology with a = c0 + c1 lead / 30 (clipped),
    for every quantile, where a climatology exists; the model's own forecast elsewhere; bands untouched without
    a "pixels" weight."""
    leads = (5, 10, 30)  # 31 Aug: no date on or before 1 Aug within 30 days of its day of year
    raw = forecast(cube, str(tiny_run), init=INIT, leads=leads, members=3, climatology=False)
    mixed = forecast(cube, str(tiny_run), init=INIT, leads=leads, members=3, climatology={"ndvi": [0.9, -0.6]})
    assert json.loads(mixed.attrs["geowm:climatology_blend"]) == {"ndvi": [0.9, -0.6]}
    assert json.loads(raw.attrs["geowm:climatology_blend"]) == {}
    vt = mixed["valid_time"].values[0]
    bands = WorldModel(tiny_run).bands
    _, clim = climatology(cube, np.datetime64(INIT), vt, bands)
    for j, a in enumerate((0.9 - 0.6 * 5 / 30, 0.9 - 0.6 * 10 / 30, 0.9 - 0.6 * 30 / 30)):
        m = mixed["ndvi"].isel(init_time=0, lead_time=j).values
        r, c = raw["ndvi"].isel(init_time=0, lead_time=j).values, clim[j][None]
        has = np.isfinite(c) & np.isfinite(r)
        if j == 2:
            assert not has.any()
            np.testing.assert_array_equal(m, r)
            continue
        assert has.mean() > 0.5
        np.testing.assert_allclose(m[np.broadcast_to(has, m.shape)],
                                   (a * r + (1 - a) * c)[np.broadcast_to(has, m.shape)], atol=1e-5)
        np.testing.assert_array_equal(m[~np.broadcast_to(has, m.shape)], r[~np.broadcast_to(has, m.shape)])
        assert np.abs(m - r)[np.broadcast_to(has, m.shape)].max() > 1e-3  # the blend did something
    for b in bands:
        np.testing.assert_array_equal(mixed[b].values, raw[b].values)


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
