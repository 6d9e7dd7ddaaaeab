"""Windows from the cube, training (resume, DDP), run directories and their bad inputs, load_model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from geowm import data
from geowm.cli import app
from geowm.cube import IngestOptions, ingest
from geowm.cube.store import tree_digest
from geowm.data import CubeReader, CubeWindows, StepBatchSampler, WindowConfig, band_stats
from geowm.train import RunError, TrainConfig, train

runner = CliRunner()
FAST = dict(batch_size=2, log_every=1, health_every=2, checkpoint_every=3, workers=0,
            window=WindowConfig(frames=4, size=32), model=dict(dim=48, depth=2, heads=2, pred_dim=24,
                                                                   pred_depth=1, pred_heads=2))


def test_windows_have_real_dates_and_enough_clear_sky(synth_cube):
    reader = CubeReader(str(synth_cube))
    stats = band_stats(reader, range(len(reader.times)))
    cfg = WindowConfig(frames=6, size=64, min_frame_clear=0.4)
    ds = CubeWindows(reader, cfg, stats)
    assert len(ds) > 20
    for i in np.linspace(0, len(ds) - 1, 10).astype(int):
        it = ds[int(i)]
        assert it["pixels"].shape == (6, 4, 64, 64) and it["valid"].shape == (6, 64, 64)
        t = it["t_index"].numpy()
        real = (reader.times[t] - reader.times[t[0]]).astype("timedelta64[s]").astype(float) / 86400
        np.testing.assert_allclose(it["days"].numpy(), real, atol=1e-3)  # real gaps, not frame numbers
        assert (np.diff(real) >= 4.9).all() and real[-1] <= cfg.max_span_days
        assert (it["valid"].float().mean(dim=(1, 2)) >= 0.4).all()  # cloudy dates skipped
        assert torch.all(it["pixels"][~it["valid"][:, None].expand_as(it["pixels"])] == 0)
    gaps = np.concatenate([np.diff(ds[i]["days"].numpy()) for i in range(0, len(ds), 7)])
    assert gaps.max() > 5.5  # irregular series reach the model as irregular gaps


def test_windows_from_memory_equal_the_zarr_reads(synth_cube):
    """A cube that fits in the reader's memory limit is read once and windows are cut from memory, with the same
    values; one that does not fit is read block by block; a loader worker gets the limit with the reader."""
    import pickle

    stats = band_stats(CubeReader(str(synth_cube)), range(10))
    cfg = WindowConfig(frames=4, size=32, seasonal_frames=2)
    on_disk = CubeWindows(CubeReader(str(synth_cube)), cfg, stats)
    reader = CubeReader(str(synth_cube), memory_mb=1024)
    in_memory = CubeWindows(reader, cfg, stats)
    assert on_disk.windows[5][2].tolist() == in_memory.windows[5][2].tolist() and len(on_disk) > 50
    for i in range(0, len(on_disk), max(1, len(on_disk) // 25)):
        a, b = on_disk[i], in_memory[i]
        assert all(torch.equal(a[k], b[k]) for k in a), i
    assert isinstance(reader._memory[0], np.ndarray) and reader._memory[0].shape == reader.shape
    assert on_disk.reader._memory is None  # no limit: never loaded whole
    too_small = CubeReader(str(synth_cube), memory_mb=(reader.refl.nbytes + reader.valid.nbytes) / 1e6 * 0.99)
    too_small.read([0, 1], slice(0, 8), slice(0, 8))
    assert too_small._memory is None
    copy = pickle.loads(pickle.dumps(reader))  # as a spawned loader worker receives it: the limit, not the arrays
    assert copy.memory_mb == 1024 and copy._memory is None and len(pickle.dumps(reader)) < 10_000
    assert CubeWindows(str(synth_cube), cfg, stats).reader.memory_mb == data.WINDOW_CACHE_MB > 0


def test_bad_window_cache_setting_fails_before_the_run_exists(synth_cube, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOWM_WINDOW_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="GEOWM_WINDOW_CACHE_MB='lots'"):
        train(str(synth_cube), tmp_path / "run", TrainConfig(steps=2, **FAST))
    assert not (tmp_path / "run").exists()
    res = runner.invoke(app, ["train", "--cube", str(synth_cube), "--out", str(tmp_path / "run"), "--steps", "2"])
    assert res.exit_code == 2 and "GEOWM_WINDOW_CACHE_MB" in res.output and not (tmp_path / "run").exists()
    monkeypatch.setenv("GEOWM_WINDOW_CACHE_MB", "0")
    assert data.window_cache_mb() == 0.0


def test_normalisation_and_time_range(synth_cube):
    reader = CubeReader(str(synth_cube))
    stats = band_stats(reader, range(len(reader.times)))
    cut = reader.times[len(reader.times) // 2]
    ds = CubeWindows(reader, WindowConfig(frames=4, size=64), stats, (None, cut))
    assert max(int(w[2].max()) for w in ds.windows) <= len(reader.times) // 2
    vals = torch.cat([ds[i]["pixels"][ds[i]["valid"][:, None].expand(-1, 4, -1, -1)] for i in range(0, len(ds), 5)])
    assert abs(float(vals.mean())) < 0.5 and 0.5 < float(vals.std()) < 2.0


def test_step_sampler_depends_only_on_seed_step_rank():
    a = list(StepBatchSampler(100, 4, seed=1, start_step=0, total_steps=6))
    b = list(StepBatchSampler(100, 4, seed=1, start_step=3, total_steps=6))
    assert a[3:] == b
    assert list(StepBatchSampler(100, 4, 1, 0, 6, rank=1)) != a


def test_resume_continues_exactly(synth_cube, tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        cfg = TrainConfig(steps=6, **FAST)
        train(str(synth_cube), tmp_path / "full", cfg)
        train(str(synth_cube), tmp_path / "part", cfg, stop_at=3)
        assert json.loads((tmp_path / "part" / "checkpoint.json").read_text())["step"] == 3
        train(str(synth_cube), tmp_path / "part", cfg, resume=True)
    finally:
        torch.use_deterministic_algorithms(False)
    rows = lambda p: {r["step"]: r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())}  # noqa: E731
    full, part = rows(tmp_path / "full"), rows(tmp_path / "part")
    assert sorted(part) == list(range(1, 7))
    assert [part[s] for s in range(4, 7)] == [full[s] for s in range(4, 7)]  # bit-identical losses after resume


def test_ddp_two_processes_gloo(synth_cube, tmp_path):
    cfg = {"steps": 4, "batch_size": 2, "workers": 0, "log_every": 1, "window": {"frames": 4, "size": 32},
           "model": FAST["model"]}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "geowm", "train", "--cube", str(synth_cube), "--out", str(tmp_path / "run"),
                          "--config", str(tmp_path / "cfg.json"), "--device", "cpu", "--no-evaluate"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["world_size"] == 2 for r in rows)
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_tiny_window_cube_is_refused(tmp_path):
    from test_ingest import days, make_scene

    src = tmp_path / "src"
    for i, d in enumerate(days(3)):
        make_scene(src, d, i, cloud=False)
    ingest(src, tmp_path / "cube", IngestOptions(tile_size=32, scheduler="synchronous"))
    res = runner.invoke(app, ["train", "--cube", str(tmp_path / "cube"), "--out", str(tmp_path / "run"),
                              "--steps", "2"])
    assert res.exit_code == 2 and "fewer than one window of 8 frames" in " ".join(res.output.split())
    assert not (tmp_path / "run").exists()


def test_config_with_unknown_keys_is_refused(synth_cube, tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"steps": 2, "learning_rate": 0.1}))
    res = runner.invoke(app, ["train", "--cube", str(synth_cube), "--out", str(tmp_path / "run"),
                              "--config", str(tmp_path / "cfg.json")])
    assert res.exit_code == 2 and "unknown training config keys: learning_rate" in res.output
    (tmp_path / "cfg.json").write_text(json.dumps({"steps": 2, "window": {"frame": 3}}))
    res = runner.invoke(app, ["train", "--cube", str(synth_cube), "--out", str(tmp_path / "run"),
                              "--config", str(tmp_path / "cfg.json")])
    assert res.exit_code == 2 and "unknown window config keys: frame" in res.output
    assert not (tmp_path / "run").exists()


def test_checkpoint_from_other_config_and_corrupted_checkpoint(synth_cube, tmp_path):
    run = tmp_path / "run"
    train(str(synth_cube), run, TrainConfig(steps=2, **FAST))
    before = tree_digest(run)
    other = dict(FAST, model=dict(FAST["model"], dim=64))
    with pytest.raises(RunError, match="different config"):
        train(str(synth_cube), run, TrainConfig(steps=2, **other), resume=True)
    with pytest.raises(RunError, match="a run already exists here"):
        train(str(synth_cube), run, TrainConfig(steps=2, **FAST))
    assert tree_digest(run) == before
    # a resized model behind an unchanged config.json: caught when loading the weights
    conf = json.loads((run / "config.json").read_text())
    from geowm.model import JEPA, ModelConfig
    from geowm.train import load_weights

    with pytest.raises(RunError, match="different model config"):
        load_weights(run, JEPA(ModelConfig.from_dict({**conf["model"], "depth": 3})))
    raw = bytearray((run / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (run / "model.safetensors").write_bytes(bytes(raw))
    corrupted = tree_digest(run)
    with pytest.raises(RunError, match="corrupted checkpoint"):
        train(str(synth_cube), run, TrainConfig(steps=4, **FAST), resume=True)
    assert tree_digest(run) == corrupted


def test_load_model_encode_predict_decode(synth_cube, tmp_path):
    import geowm
    from geowm.train import evaluate_run

    run = tmp_path / "run"
    train(str(synth_cube), run, TrainConfig(steps=3, **FAST))
    evaluate_run(run, n_windows=4)
    wm = geowm.load_model(run)
    cube = geowm.open_cube(synth_cube)
    window = cube.isel(time=slice(10, 14), y=slice(0, 64), x=slice(32, 96))
    lat = wm.encode(window)
    assert lat.dims == ("time", "py", "px", "latent") and lat.shape == (4, 8, 8, 48)
    np.testing.assert_allclose(lat.px.values[0], window.x.values[:8].mean())
    fc = wm.predict(window, [cube.time.values[15], cube.time.values[20]])
    assert fc.shape == (2, 8, 8, 48) and (fc.time.values == cube.time.values[[15, 20]].astype("datetime64[s]")).all()
    dec = wm.decode(fc)
    assert dec.reflectance.dims == ("time", "band", "y", "x") and dec.reflectance.shape == (2, 4, 64, 64)
    np.testing.assert_allclose(dec.x.values, window.x.values, atol=1e-6)
    assert "ndvi" in dec and float(np.abs(dec.ndvi).max()) <= 1


def test_seasonal_index_picks_clear_dates_a_lag_before_the_span():
    from geowm.data import seasonal_index

    day = np.arange(0, 400, 5).astype(float)  # a 5-day revisit
    series = np.flatnonzero(day % 10 == 0)  # every other date clear
    idx = seasonal_index(series[day[series] < 300], day, 330.0, 350.0, 4, 300.0, 20.0)
    got = day[idx[idx >= 0]]
    assert len(got) == 4 and got.min() >= 10 and got.max() <= 70 and (np.diff(got) > 0).all()
    assert set(idx[idx >= 0]) <= set(series)
    few = seasonal_index(series[day[series] < 300], day, 330.0, 330.0, 4, 300.0, 5.0)  # 25..35: 30 only
    assert list(few[:3]) == [-1, -1, -1] and day[few[3]] == 30
    assert (seasonal_index(series, day, 330.0, 350.0, 4, 300.0, 20.0, multiple=2) >= 0).sum() % 2 == 0
    assert len(seasonal_index(series, day, 5.0, 9.0, 4, 300.0, 20.0)) == 4  # nothing a lag back: all padding
    assert len(seasonal_index(series, day, 330.0, 350.0, 0, 300.0, 20.0)) == 0


def test_windows_carry_a_seasonal_memory_from_before_the_time_range(synth_cube):
    """With ``seasonal_frames`` each window starts with clear dates one lag before its last dates (padding where
    there are none), and held-out windows may draw that memory from before their time range (the past)."""
    reader = CubeReader(str(synth_cube))
    stats = band_stats(reader, range(len(reader.times)))
    cut = reader.times[len(reader.times) // 2]
    cfg = WindowConfig(frames=4, size=64, seasonal_frames=2)
    ds = CubeWindows(reader, cfg, stats, (cut, None), seasonal=(120.0, 30.0, 1))
    day = reader.times.astype("datetime64[s]").astype(np.int64) / 86400.0
    with_memory = 0
    for i in range(0, len(ds), 3):
        it = ds[i]
        t = it["t_index"].numpy()
        assert it["pixels"].shape == (6, 4, 64, 64)
        seas, recent = t[:2], t[2:]
        assert (reader.times[recent] >= cut).all()
        pad = seas < 0
        assert not it["valid"][:2][pad].any() and (it["pixels"][:2][pad] == 0).all()
        assert (np.diff(it["days"].numpy()) >= 0).all()
        real = seas[~pad]
        if len(real):
            with_memory += 1
            assert (real < recent[0]).all()
            lo, hi = day[recent[-3]] - 120 - 30, day[recent[-1]] - 120 + 30
            assert ((day[real] >= lo - 1) & (day[real] <= hi + 1)).all()  # whole days
            assert (it["valid"][:2][~pad].float().mean(dim=(1, 2)) >= cfg.min_frame_clear).all()
    assert with_memory > 0
    assert any(reader.times[w[2][w[2] >= 0][0]] < cut for w in ds.windows)  # memory from before the range


def test_cli_refuses_corrupted_checkpoint_files_and_another_config(synth_cube, tmp_path):
    """Through the CLI: exit 2, a message naming the file or option and the problem, the run untouched."""
    run = tmp_path / "run"
    train(str(synth_cube), run, TrainConfig(steps=2, **FAST))
    cfg = {**FAST, "window": FAST["window"].__dict__, "steps": 4}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    base = ["train", "--cube", str(synth_cube), "--out", str(run), "--resume", "--no-evaluate",
            "--config", str(tmp_path / "cfg.json")]

    def refused(args, *expected):
        before = tree_digest(run)
        res = runner.invoke(app, args)
        text = " ".join(res.output.split())
        assert res.exit_code == 2, text
        for e in expected:
            assert e in text, f"{e!r} not in {text!r}"
        assert tree_digest(run) == before

    refused([*base, "--batch-size", "3"], str(run), "checkpoint from a different config (batch_size differ)")
    good = (run / "optimizer.pt").read_bytes()
    (run / "optimizer.pt").write_bytes(good[: len(good) // 2])  # cut off
    refused(base, "optimizer.pt", "corrupted")
    (run / "optimizer.pt").write_bytes(good)
    (run / "checkpoint.json").write_text('{"step": 2, "model_sha')
    refused(base, "checkpoint.json: corrupted checkpoint")
    refused(["forecast", "--cube", str(synth_cube), "--model", str(run), "--out", str(tmp_path / "fc")],
            "checkpoint.json: corrupted checkpoint")
    assert not (tmp_path / "fc").exists()
