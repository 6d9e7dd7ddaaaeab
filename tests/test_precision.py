"""Inference precision (``--precision``): bfloat16 autocast in every thread that calls the model, close to fp32,
recorded in what it writes; a surprise record is reused only at its own precision; bad choices fail cleanly."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from geowm.cli import app
from geowm.forecast_store import open_forecasts, write_forecasts
from geowm.inference import WorldModel, pick_precision
from geowm.train import RunError

runner = CliRunner()
ga, gf = importlib.import_module("geowm.anomaly"), importlib.import_module("geowm.forecast")  # modules, not the
# functions geowm re-exports under these names
SPAN = dict(start="2021-08-01", end="2021-09-15")


@pytest.fixture(scope="module")
def fp32(synth_cube, tiny_run):
    wm = WorldModel(tiny_run, "cpu")
    return (gf.forecast(str(synth_cube), wm, init="2021-07-01", leads=(5, 30), members=1),
            ga.surprise(str(synth_cube), wm, **SPAN))


def test_bf16_close_to_fp32_and_the_same_in_tile_threads(synth_cube, tiny_run, fp32, monkeypatch):
    """bf16 changes the results a little (it is in effect) and worker threads (CUDA's tiles at once) compute
    exactly what one thread does: autocast is per thread, so each tile enters it itself."""
    wm = WorldModel(tiny_run, "cpu", "bf16")
    assert wm.precision == "bf16"
    fc = gf.forecast(str(synth_cube), wm, init="2021-07-01", leads=(5, 30), members=1)
    s = ga.surprise(str(synth_cube), wm, **SPAN)
    fc32, s32 = fp32
    assert fc.attrs["geowm:precision"] == "bf16" and fc32.attrs["geowm:precision"] == "fp32"
    assert s.attrs["geowm:precision"] == "bf16"
    a, b = s["surprise"].values, s32["surprise"].values
    assert np.array_equal(np.isnan(a), np.isnan(b)) and np.isfinite(a).sum() > 100
    dev = np.nanmax(np.abs(a - b))
    assert 0 < dev < 0.02, dev  # cosine distance, 0..2
    nd = np.abs(fc["ndvi"].values - fc32["ndvi"].values)
    assert 0 < np.nanmax(nd) < 0.05 and np.nanmean(nd) < 0.005, (np.nanmax(nd), np.nanmean(nd))
    cos = (fc["embedding"] * fc32["embedding"]).sum("latent").values
    assert np.nanmin(cos) > 0.99

    monkeypatch.setattr(gf, "TILE", 128)  # the 256 px session region in 4 tiles, 3 at a time
    one = ga.surprise(str(synth_cube), wm, **SPAN)
    monkeypatch.setattr(gf, "tile_workers", lambda wm: 3)
    par = ga.surprise(str(synth_cube), wm, **SPAN)
    np.testing.assert_array_equal(par["surprise"].values, one["surprise"].values)
    np.testing.assert_array_equal(par["surprise"].values, a)  # and what whole tiles of 256 px gave


def test_a_surprise_record_is_reused_only_at_its_precision(synth_cube, tiny_run, fp32):
    rec32 = fp32[1]
    again = ga.surprise(str(synth_cube), WorldModel(tiny_run, "cpu"), reuse=rec32, **SPAN)
    assert again.attrs["geowm:computed_dates"] == 0 and again.attrs["geowm:reused_dates"] > 0
    bf = ga.surprise(str(synth_cube), WorldModel(tiny_run, "cpu", "bf16"), reuse=rec32, **SPAN)
    assert bf.attrs["geowm:reused_dates"] == 0 and bf.attrs["geowm:computed_dates"] == again.attrs[
        "geowm:reused_dates"]


def test_the_store_records_each_inits_precision(synth_cube, tiny_run, tmp_path):
    store = tmp_path / "fc"
    for init, prec in (("2021-06-01", "fp32"), ("2021-07-01", "bf16")):
        wm = WorldModel(tiny_run, "cpu", prec)
        write_forecasts(gf.forecast(str(synth_cube), wm, init=init, leads=(5,), members=1), store)
    ds = open_forecasts(store)
    assert ds.attrs["geowm:precisions"] == {"2021-06-01T00:00:00": "fp32", "2021-07-01T00:00:00": "bf16"}
    assert "geowm:precision" not in ds.attrs


def test_auto_picks_bf16_only_where_the_device_has_it(monkeypatch):
    inf = importlib.import_module("geowm.inference")
    cpu = torch.device("cpu")
    monkeypatch.setattr(inf, "has_bf16", lambda device: False)
    assert pick_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(inf, "has_bf16", lambda device: True)
    assert pick_precision("auto", cpu) == "bf16"
    assert pick_precision("fp32", cpu) == "fp32" and pick_precision("bf16", cpu) == "bf16"
    with pytest.raises(RunError, match="tf32.*CUDA"):
        pick_precision("tf32", cpu)
    with pytest.raises(RunError, match="'fp16'.*fp32, bf16, tf32, auto"):
        pick_precision("fp16", cpu)


@pytest.mark.parametrize("prec, message", [("tf32", "CUDA matrix format"), ("half", "one of fp32, bf16")])
def test_cli_refuses_a_precision_the_machine_cannot_run(synth_cube, tiny_run, tmp_path, prec, message):
    out = tmp_path / "fc"
    res = runner.invoke(app, ["forecast", "--cube", str(synth_cube), "--model", str(tiny_run), "--out", str(out),
                              "--device", "cpu", "--precision", prec, "--no-catalog"])
    assert res.exit_code != 0 and message in res.output, res.output
    assert not out.exists()


def test_flow_tasks_run_the_model_at_the_precision_asked(synth_cube, tiny_run):
    """The scheduled flows' tile task and scoring task pass ``precision`` to the model they load."""
    from flows import tasks
    from geowm.cube.store import open_cube

    snapshot = open_cube(synth_cube).attrs["geowm:snapshot"]
    key = tasks.model_key(tiny_run)
    args = (str(synth_cube), snapshot, str(tiny_run), key)
    fc = tasks.forecast_tile.fn(*args, None, "2021-07-01", [5.0], 1, "cpu", "bf16")
    assert fc.attrs["geowm:precision"] == "bf16"
    scores = tasks.score_anomalies.fn(*args, "2021-09-01", 60.0, "cpu", None, "bf16")
    assert scores.attrs["geowm:precision"] == "bf16"
    assert tasks.score_anomalies.fn(*args, "2021-09-01", 60.0, "cpu").attrs["geowm:precision"] == "fp32"
