"""Models whose tokens span two acquisitions (``t_frames=2``, the ``small`` and ``base`` presets) forecast and
score anomalies: contexts of any length are cut to whole tubelets (the oldest acquisition dropped), and the
observed latent of a date is the tubelet of the acquisitions that end there."""

from __future__ import annotations

import numpy as np
import pytest

from geowm.anomaly import surprise
from geowm.forecast import forecast, whole_tubelets


@pytest.fixture(scope="module")
def pair_run(synth_cube, tmp_path_factory):
    """A few steps of a model with 2-acquisition tubelets, probed."""
    from geowm.data import WindowConfig
    from geowm.train import TrainConfig, evaluate_run, train

    run = tmp_path_factory.mktemp("runs") / "pairs"
    cfg = TrainConfig(steps=4, batch_size=2, workers=0, train_until="2021-09-30",
                      window=WindowConfig(frames=8, size=32),
                      model=dict(t_frames=2, dim=48, depth=2, heads=2, pred_dim=24, pred_depth=1, pred_heads=2))
    train(str(synth_cube), run, cfg)
    evaluate_run(run, n_windows=8)
    return run


def test_whole_tubelets_drops_the_oldest_acquisitions():
    idx = np.array([3, 5, 8, 9, 12])
    assert whole_tubelets(idx, 1).tolist() == [3, 5, 8, 9, 12]
    assert whole_tubelets(idx, 2).tolist() == [5, 8, 9, 12]
    assert whole_tubelets(idx, 2, extra=1).tolist() == [3, 5, 8, 9, 12]
    assert whole_tubelets(idx[:1], 2).tolist() == []


def test_a_two_acquisition_tubelet_model_forecasts_every_member(synth_cube, pair_run):
    fc = forecast(str(synth_cube), str(pair_run), init="2021-07-01", leads=(5, 30), members=4)
    nd = fc["ndvi"].values
    assert np.isfinite(nd).mean() > 0.9, np.isfinite(nd).mean()
    assert float(fc["latent_spread"].max()) > 0  # members with 3/4 of the context differ from the whole one


def test_a_two_acquisition_tubelet_model_scores_anomalies(synth_cube, pair_run):
    s = surprise(str(synth_cube), str(pair_run), start="2021-08-01", end="2021-10-31", departure_lag_days=120.0)
    v = s["surprise"].values
    clear = s["clear_fraction"].values > 0.9
    assert clear.any()
    assert np.isfinite(v[clear]).mean() > 0.9, np.isfinite(v[clear]).mean()
    assert np.isfinite(s["departure"].values).any()


def test_the_python_api_encodes_whole_tubelets(synth_cube, pair_run):
    import geowm

    wm = geowm.load_model(pair_run)
    cube = geowm.open_cube(synth_cube).isel(time=slice(10, 15), y=slice(0, 32), x=slice(0, 32))
    lat = wm.encode(cube)  # 5 acquisitions: the oldest is left out, 2 tokens of 2
    assert lat.sizes["time"] == 2
    assert list(lat["time"].values) == list(cube["time"].values[[1, 3]])
    pred = wm.predict(cube, cube["time"].values[-1:] + np.timedelta64(10, "D"))
    assert np.isfinite(pred.values).all()
    with pytest.raises(ValueError, match="shorter than one token"):
        wm.encode(cube.isel(time=slice(0, 1)))


def test_evaluate_runs_for_a_two_acquisition_tubelet_model(synth_cube, synth_region, pair_run, tmp_path):
    import json

    from typer.testing import CliRunner

    from geowm.cli import app

    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["evaluate", "--cube", str(synth_cube), "--model", str(pair_run), "--events",
                                   str(synth_region / "events.geojson"), "--from", "2021-08-01", "--leads", "10,20",
                                   "--init-every", "40", "--history-days", "60", "--json", str(out),
                                   "--landcover", str(synth_region / "landcover.tif")])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["ndvi_forecast"]["model"]["10"]["n_pixels"] > 1000
    assert 0 <= rep["anomaly_auroc"]["model"] <= 1
    assert rep["similar"]["n_queries"] >= 50
