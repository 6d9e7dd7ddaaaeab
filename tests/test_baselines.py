"""NDVI baselines (geowm.baselines) on small synthetic series made on the fly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from geowm.baselines import BASELINES, Bfast, Climatology, DampedAnomaly, Harmonic, Persistence, ndvi

pytestmark = pytest.mark.filterwarnings("error")  # NaN handling must not warn

NOISE = 0.02


def seasonal(times: pd.DatetimeIndex, trend: float = 0.0) -> np.ndarray:
    """Known NDVI signal (T,): mean 0.5, annual amplitude 0.25, a small semi-annual term, a trend per year."""
    yrs = np.asarray((times - pd.Timestamp("2020-01-01")) / pd.Timedelta(days=1)) / 365.25
    return 0.5 + trend * yrs + 0.25 * np.sin(2 * np.pi * yrs) + 0.05 * np.cos(4 * np.pi * yrs)


def series(start="2020-01-01", end="2022-12-31", trend=0.0, noise=NOISE, cloud=0.3, seed=0) -> xr.DataArray:
    """5-day NDVI series (time, y, x) on a 4 x 5 grid: known signal + noise + random cloud gaps (NaN)."""
    rng = np.random.default_rng(seed)
    times = pd.date_range(start, end, freq="5D")
    truth = seasonal(times, trend)[:, None, None] * np.ones((1, 4, 5))
    vals = truth + noise * rng.standard_normal(truth.shape)
    vals[rng.random(truth.shape) < cloud] = np.nan
    return xr.DataArray(vals.astype(np.float32), dims=("time", "y", "x"),
                        coords={"time": times, "y": 1000.0 - 10 * np.arange(4), "x": 500.0 + 10 * np.arange(5),
                                "spatial_ref": 0}, attrs={"units": "1"})


def test_harmonic_recovers_sinusoid_and_trend():
    hist = series(trend=0.03)
    targets = pd.date_range("2023-01-10", "2023-06-30", freq="20D")
    fc = Harmonic(n_harmonics=2).fit(hist).forecast("2022-12-31", targets)
    assert fc.dims == ("valid_time", "y", "x") and fc.dtype == np.float32
    err = np.abs(fc.values - seasonal(targets, trend=0.03)[:, None, None])
    assert err.mean() < 0.3 * NOISE and err.max() < NOISE
    assert "spatial_ref" not in fc.coords and np.array_equal(fc.x, hist.x)
    assert (fc.lead_time.values > np.timedelta64(0)).all()


def test_climatology_beats_persistence_at_60_days():
    hist = series(seed=1)
    errs = {}
    for cls in (Climatology, Persistence):
        model = cls().fit(hist)
        e = []
        for init in pd.date_range("2022-01-15", "2022-10-15", freq="30D"):
            valid = init + pd.Timedelta(days=60)
            e.append(np.abs(model.forecast(init, [valid]).values[0] - seasonal(pd.DatetimeIndex([valid]))[0]))
        errs[cls.name] = np.mean(e)
    assert errs["climatology"] < 0.5 * errs["persistence"]
    assert errs["climatology"] < 3 * NOISE


def test_damped_anomaly_is_the_climatology_plus_the_last_departure_fading():
    """A dry spell (NDVI 0.1 below the usual) seen in the last clear observation: the forecast is the climatology
    plus that departure times exp(-days since / 30), by hand; it beats the climatology at 10 days while the spell
    lasts, and the score of a new observation is measured against the forecast from the one before it."""
    hist = series(noise=0.0, cloud=0.0).copy()
    times = pd.DatetimeIndex(hist.time.values)
    spell = times >= pd.Timestamp("2022-12-01")
    hist.values[spell] -= 0.1
    hist.values[-1, 0, 0] = np.nan  # one pixel's last clear date is the one before
    init = times[-1]
    targets = init + pd.to_timedelta([10, 30, 90], "D")
    model = DampedAnomaly().fit(hist)
    fc = model.forecast(init, targets).values
    clim = Climatology().fit(hist).forecast(init, targets).values
    for (y, x), last in (((1, 2), times[-1]), ((0, 0), times[-2])):
        vals = hist.values[:, y, x].astype(np.float64)
        at = times.get_loc(last)
        others = np.delete(vals, at)
        others_t = times.delete(at)
        dist = np.abs(others_t.day_of_year.values - last.day_of_year)
        dist = np.minimum(dist, 365.25 - dist)
        departure = vals[at] - others[(dist <= 15) & np.isfinite(others)].mean()
        assert departure < -0.05  # most of the same days in earlier years were wet
        days = (targets - last) / pd.Timedelta(days=1)
        np.testing.assert_allclose(fc[:, y, x], clim[:, y, x] + np.exp(-days / 30) * departure, atol=1e-5)
    truth_10 = seasonal(targets[:1])[0] - 0.1
    assert np.abs(fc[0] - truth_10).mean() < 0.5 * np.abs(clim[0] - truth_10).mean()
    new = hist.isel(time=slice(-2, None)).copy()
    new["time"] = new.time.values + np.timedelta64(10, "D")  # two more dates, 10 days on
    sc = DampedAnomaly().fit(hist).score(new).values
    before = model.forecast(init, [pd.Timestamp(new.time.values[0])]).values[0]
    np.testing.assert_allclose(sc[0, 1, 2], abs(new.values[0, 1, 2] - before[1, 2]) / model.sigma_[7], rtol=1e-4)


def test_persistence_exact_on_constant_series():
    hist = series(noise=0.0) * 0 + 0.7
    model = Persistence().fit(hist)
    fc = model.forecast(hist.time.values[-1], pd.date_range("2023-01-01", periods=3, freq="10D"))
    np.testing.assert_array_equal(fc.values, np.float32(0.7))
    obs = series(start="2023-01-01", end="2023-03-01", noise=0.0, cloud=0.5) * 0 + 0.7
    sc = model.score(obs)
    np.testing.assert_array_equal(sc.values[np.isfinite(obs.values)], 0.0)
    assert np.isnan(sc.values[np.isnan(obs.values)]).all()


def drop_case(cloud_between: bool = False):
    """History 2020-2022; obs in 2023 where pixel (1, 2) drops by 0.5 NDVI from 2023-03-02 on."""
    hist = series(seed=2)
    obs = series(start="2023-01-01", end="2023-06-30", seed=3)
    first = int(np.argmax(obs.time.values >= np.datetime64("2023-03-02")))
    truth = seasonal(obs.time.to_index())
    obs[first] = truth[first]  # every pixel clear on the drop date
    obs[first + 2, 1, 2] = truth[first + 2]  # and the dropping pixel clear two dates later
    if cloud_between:
        obs[first + 1] = np.nan
    obs[first:, 1, 2] -= 0.5
    return hist, obs, first


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_abrupt_drop_scores_high_only_there(name):
    hist, obs, first = drop_case()
    sc = BASELINES[name]().fit(hist).score(obs)
    assert sc.dims == ("time", "y", "x") and sc.dtype == np.float32
    at_drop = sc.values[first]
    if name == "bfast":  # a moving sum over h clear residuals: beyond 3 at once, growing as the window fills
        assert at_drop[1, 2] > 3 and np.nanmax(sc.values[first: first + 8, 1, 2]) > 2 * at_drop[1, 2]
    else:
        assert at_drop[1, 2] > 5
    others = np.delete(at_drop.ravel(), 1 * 5 + 2)
    assert (others < 3).all(), others
    assert (sc.values[np.isfinite(sc.values)] >= 0).all()
    assert np.array_equal(np.isnan(sc.values), np.isnan(obs.values))


def test_breaks_flag_the_confirming_observation():
    hist, obs, first = drop_case(cloud_between=True)
    br = Harmonic().fit(hist).breaks(obs)
    assert br.dtype == bool and br.dims == ("time", "y", "x")
    assert not br.values[first, 1, 2] and not br.values[first + 1, 1, 2]  # first exceedance, then cloud
    assert br.values[first + 2, 1, 2]  # the second consecutive clear exceedance confirms
    assert br.values[:, 1, 2].sum() == 1
    assert br.values.sum() == 1  # unchanged pixels: no break


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_forecast_uses_only_history_up_to_init(name):
    hist = series(seed=4)
    init, targets = pd.Timestamp("2021-11-03"), pd.date_range("2021-12-01", periods=4, freq="30D")
    fc = BASELINES[name]().fit(hist).forecast(init, targets)
    changed = hist.where(hist.time <= init, 0.05)  # rewrite everything after init
    fc2 = BASELINES[name]().fit(changed).forecast(init, targets)
    np.testing.assert_allclose(fc.values, fc2.values, rtol=1e-6)
    assert fc.init_time.values == np.datetime64(init)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_forecast_only_fit_forecasts_the_same(name):
    """``fit(scoring=False)``, what geowm.evaluate refits persistence & co with at every init, skips the scoring
    statistics of the forecasters that use the latest observations, and only theirs; the forecast is the same."""
    hist = series(seed=6)
    init, targets = pd.Timestamp("2022-03-03"), pd.date_range("2022-03-10", periods=4, freq="10D")
    full = BASELINES[name]().fit(hist)
    light = BASELINES[name]().fit(hist, scoring=False)
    np.testing.assert_array_equal(light.forecast(init, targets).values, full.forecast(init, targets).values)
    obs = hist.isel(time=slice(-3, None))
    if BASELINES[name].uses_latest:
        assert not hasattr(light, "sigma_")
        with pytest.raises(RuntimeError, match="scoring=False"):
            light.score(obs)
    else:  # its forecast needs the fit (harmonic coefficients): fitted in full, scores as usual
        np.testing.assert_array_equal(light.score(obs).values, full.score(obs).values)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_all_nan_pixel_gives_nan(name):
    hist = series(seed=5)
    hist[:, 0, 0] = np.nan
    hist[: len(hist.time) - 2, 3, 4] = np.nan  # only two clear obs, at the end: a weak pixel
    model = BASELINES[name]().fit(hist)
    fc = model.forecast(hist.time.values[-1], pd.date_range("2023-01-05", periods=3, freq="15D")).values
    assert np.isnan(fc[:, 0, 0]).all()
    assert np.isfinite(fc[:, 3, 4]).all() == (name not in ("harmonic", "bfast"))  # too few obs even for a mean
    rest = np.ones((4, 5), bool)
    rest[0, 0] = rest[3, 4] = False
    assert np.isfinite(fc[:, rest]).all()
    sc = model.score(series(start="2023-01-01", end="2023-02-01", cloud=0.0, seed=6)).values
    assert np.isfinite(sc[:, rest]).all()
    if name == "persistence":  # the first new obs has nothing before it; later ones do
        assert np.isnan(sc[0, 0, 0]) and np.isfinite(sc[1:, 0, 0]).all()
    else:
        assert np.isnan(sc[:, 0, 0]).all()


def test_persistence_score_uses_earlier_obs():
    hist = series(seed=7)
    obs = series(start="2023-01-01", end="2023-01-31", cloud=0.0, seed=8)
    obs[:, 0, 0] = [0.2] + [0.9] * (len(obs.time) - 1)
    sc = Persistence().fit(hist).score(obs).values[:, 0, 0]
    assert sc[1] > 5 and (sc[2:] == 0).all()  # the jump is news once, then persistence expects it


def cube(bands=("B02", "B03", "B04", "B08")) -> xr.Dataset:
    rng = np.random.default_rng(9)
    refl = rng.uniform(0.01, 0.6, (3, len(bands), 4, 5)).astype(np.float32)
    refl[0, :, 0, 0] = np.nan
    refl[1, 2:, 1, 1] = 0.0  # red + NIR = 0: not finite -> NaN
    valid = rng.random((3, 4, 5)) > 0.2
    return xr.Dataset({"reflectance": (("time", "band", "y", "x"), refl), "valid": (("time", "y", "x"), valid)},
                      coords={"time": pd.date_range("2021-01-01", periods=3, freq="5D"), "band": list(bands),
                              "y": np.arange(4.0), "x": np.arange(5.0)})


def test_ndvi_from_cube():
    ds = cube()
    nd = ndvi(ds)
    assert nd.dims == ("time", "y", "x") and nd.dtype == np.float32 and "band" not in nd.coords
    red, nir = ds.reflectance.sel(band="B04").values, ds.reflectance.sel(band="B08").values
    with np.errstate(invalid="ignore"):
        want = np.where(ds.valid.values, (nir - red) / (nir + red), np.nan)
    want[1, 1, 1] = np.nan
    np.testing.assert_allclose(nd.values, want, rtol=1e-6, equal_nan=True)
    assert np.isnan(nd.values[~ds.valid.values]).all()


def test_ndvi_missing_bands():
    with pytest.raises(ValueError, match="B02.*B03"):
        ndvi(cube(bands=("B02", "B03")))


def bfast_case(drop: float = 0.3):
    """Three years of strongly seasonal history (amplitude 0.25 NDVI, 10x the noise); then half a year in
    which pixel (2, 3) loses ``drop`` NDVI from 2023-03-02 on while the season goes on everywhere."""
    hist = series(seed=8)
    obs = series(start="2023-01-01", end="2023-06-30", seed=9)
    first = int(np.argmax(obs.time.values >= np.datetime64("2023-03-02")))
    obs[first:, 2, 3] -= drop
    return hist, obs, first


def test_bfast_detects_an_abrupt_break_not_the_seasonal_cycle():
    hist, obs, first = bfast_case()
    model = Bfast().fit(hist)
    assert (model.n_terms_ == 8).all() and (model.h_ >= 3).all()  # trend + 3 harmonics, h = 0.25 n
    br = model.breaks(obs)
    assert br.values[:, 2, 3].any()
    hit = int(np.argmax(br.values[:, 2, 3]))
    assert first <= hit <= first + 10, (first, hit)  # confirmed within 50 days (5-day revisits) of the break
    others = br.values.copy()
    others[:, 2, 3] = False
    assert not others.any()  # the seasonal cycle is no break
    sc = model.score(obs).values
    assert np.nanmedian(sc[:first]) < 1.5  # stable: |N(0, 1)|-like before the break
    assert np.ptp(seasonal(obs.time.to_index())) > 5 * NOISE  # the season moves NDVI by many noise levels


def test_bfast_cusum_and_history_window():
    hist, obs, first = bfast_case()
    cusum = Bfast(process="cusum").fit(hist).score(obs).values
    assert np.nanmax(cusum[first:, 2, 3]) > 5 and np.nanmax(np.delete(cusum[:first].reshape(first, -1), 13, 1)) < 4
    short = Bfast(history_years=1.5).fit(hist)
    assert short._times[0] >= pd.Timestamp("2021-06-01") and (short.h_ < Bfast().fit(hist).h_).all()
    with pytest.raises(ValueError, match="process"):
        Bfast(process="ewma")


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_blocks_of_pixels_give_the_same_numbers(name, monkeypatch):
    """The day-of-year climatology runs a block of pixels at a time (bounded memory on large regions): blocks of
    one or a few pixels give the forecasts and scores of one block."""
    import geowm.baselines as gb

    hist = series(seed=9, start="2019-01-01", end="2022-12-31")
    init, targets = "2022-06-03", pd.date_range("2022-06-10", periods=5, freq="9D")
    obs = series(seed=10, start="2023-01-01", end="2023-03-01")
    one = BASELINES[name]().fit(hist)
    ref = one.forecast(init, targets).values, one.score(obs).values
    for values in (len(hist.time) * 3, 1):  # 3 pixels a block; 1 value: one pixel a block
        monkeypatch.setattr(gb, "CHUNK_VALUES", values)
        blocks = BASELINES[name]().fit(hist)
        np.testing.assert_array_equal(blocks.forecast(init, targets).values, ref[0])
        np.testing.assert_array_equal(blocks.score(obs).values, ref[1])
