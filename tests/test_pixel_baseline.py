"""The pixel-space generative baseline (geowm.model.pixel): trains with geowm.train, forecasts through the store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from geowm.model import JEPA, ModelConfig, PixelForecaster, build_model

SMALL = dict(dim=48, depth=2, heads=2, pred_dim=24, pred_depth=1, pred_heads=2)


def _batch(B=2, T=4, C=4, H=32, W=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(B, T, H, W, generator=g) > 0.1
    return {"pixels": torch.randn(B, T, C, H, W, generator=g) * valid[:, :, None], "valid": valid,
            "days": torch.arange(T, dtype=torch.float32).repeat(B, 1) * 10, "doy": torch.full((B, T), 100.0)}


def test_same_encoder_and_predictor_as_jepa():
    cfg = ModelConfig.preset("tiny", in_chans=4, kind="pixel", **SMALL)
    pixel, jepa = build_model(cfg), JEPA(ModelConfig.preset("tiny", in_chans=4, **SMALL))
    assert isinstance(pixel, PixelForecaster)
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(pixel.encoder) == shapes(jepa.encoder) and shapes(pixel.predictor) == shapes(jepa.predictor)
    with pytest.raises(ValueError, match="kind"):
        ModelConfig.preset("tiny", kind="pixels")


def test_starts_as_persistence_and_predicts_pixels():
    model = PixelForecaster(ModelConfig.preset("tiny", in_chans=4, kind="pixel", **SMALL)).eval()
    b = _batch()
    b["valid"][:] = True
    with torch.no_grad():
        pix, vec = model.predict(b, torch.tensor([[50.0, 70.0]] * 2), torch.tensor([[150.0, 170.0]] * 2))
    assert pix.shape == (2, 2, 4, 32, 32) and vec.shape == (2, 2, 4, 4, 48)
    # a zero head: the forecast is the last clear frame, at every lead
    torch.testing.assert_close(pix[:, 0], b["pixels"][:, -1])
    torch.testing.assert_close(pix[:, 1], b["pixels"][:, -1])
    out = model(b, generator=torch.Generator().manual_seed(0))
    assert out["loss"].ndim == 0 and out["n_target"] > 0 and float(out["pred_loss"]) > 0
    out["loss"].backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_learns_on_a_tiny_region(synth_cube):
    """Windows of the session's small synthetic region, fixed masks: the pixel loss falls as it trains."""
    from geowm.data import CubeReader, CubeWindows, WindowConfig, band_stats, collate

    reader = CubeReader(str(synth_cube))
    ds = CubeWindows(reader, WindowConfig(frames=4, size=32), band_stats(reader, range(len(reader.times))))
    batch = {k: v for k, v in collate([ds[i] for i in range(0, len(ds), max(1, len(ds) // 8))]).items()
             if k in ("pixels", "valid", "days", "doy")}
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny", in_chans=4, kind="pixel", **SMALL))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        out = model(batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["pred_loss"]))
    assert losses[-1] < 0.6 * losses[0], losses


def test_trains_and_forecasts_into_the_store(synth_cube, tmp_path):
    """geowm.train trains it (kind "pixel"); geowm.forecast writes its forecasts to a store open_forecasts reads."""
    import geowm
    from geowm.data import WindowConfig
    from geowm.forecast import forecast
    from geowm.forecast_store import write_forecasts
    from geowm.train import RunError, TrainConfig, evaluate_run, train

    cfg = TrainConfig(steps=6, batch_size=2, workers=0, log_every=1, train_until="2021-09-30",
                      window=WindowConfig(frames=4, size=32), model=dict(kind="pixel", **SMALL))
    run = train(str(synth_cube), tmp_path / "pixel", cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(np.isfinite(r["loss"]) for r in rows)
    assert json.loads((run / "config.json").read_text())["model"]["kind"] == "pixel"
    with pytest.raises(RunError, match="pixel"):
        evaluate_run(run)

    fc = forecast(str(synth_cube), str(run), init="2021-10-01", leads=(10, 20), members=2)
    assert fc.attrs["geowm:decode"] == "pixel"
    nd = fc["ndvi"].sel(quantile=0.5).values
    assert np.isfinite(nd).mean() > 0.9 and np.nanmin(nd) >= -1 and np.nanmax(nd) <= 1
    assert np.isfinite(fc["embedding"].values).all()
    write_forecasts(fc, tmp_path / "forecasts")
    back = geowm.open_forecasts(tmp_path / "forecasts")
    assert {"ndvi", "B04", "B08", "embedding"} <= set(back.data_vars)
    np.testing.assert_allclose(back["ndvi"].values, fc["ndvi"].values)
    assert back.attrs["geowm:run_id"].startswith("pixel@")
