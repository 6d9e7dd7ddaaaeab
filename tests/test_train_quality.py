"""The `tiny` preset learns on a synthetic cube on CPU in 300 steps (the slowest test of the suite, ~5 minutes): the
latent loss falls, the forecast beats copy-last on held-out windows, the representation does not
collapse, and the land-cover probe on latents beats the same probe on raw pixels (per place: pooled over a
window's clear frames).

The region is the demo's (512 px, two years, seed 7): the model trains on the first 18 months and is
scored on the last six, so it has seen every season once before it forecasts it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from geowm.train import TrainConfig, evaluate_run, train


@pytest.fixture(scope="module")
def demo_region(tmp_path_factory):
    from geowm.cube import IngestOptions, ingest
    from geowm.synth import generate

    root = tmp_path_factory.mktemp("demo")
    generate(root / "region", size=512, start="2021-01-01", end="2022-12-31", seed=7)
    ingest(root / "region" / "stac" / "catalog.json", root / "cube", IngestOptions(scheduler="threads"))
    return root


@pytest.mark.slow
@pytest.mark.timeout(1500)  # synth + ingest + 300 steps + probes + blend check: about 5-10 min on 2 cores
def test_tiny_preset_learns(demo_region, tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(preset="tiny", steps=300, batch_size=8, train_until="2022-06-30", workers=1, seed=0,
                      log_every=1)
    train(str(demo_region / "cube"), run, cfg)
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    losses = np.array([r["loss"] for r in rows])
    # the latent prediction loss falls (the predictor starts as copy-last, so it starts low already)
    assert losses[-50:].mean() < 0.85 * losses[:20].mean(), (losses[:20].mean(), losses[-50:].mean())
    health = [r for r in rows if "health_rankme" in r]
    assert health and not any(r["health_collapse_warning"] for r in health)
    assert health[-1]["health_rankme"] > 8 and health[-1]["health_std_mean"] > 0.2  # far from collapse (1, 0)

    report = evaluate_run(run, landcover=str(demo_region / "region" / "landcover.tif"))
    skill = report["forecast_skill"]
    assert report["held_out_from"].startswith("2022-06-30")
    assert skill["n_target_tokens"] > 500
    assert skill["l1_model"] < skill["l1_copy_last"], skill  # beats copy-the-last-context-latent
    probes = report["probes"]
    # land cover per place (a patch's clear frames in a window, mean and spread): the latents carry the
    # phenology that tells the classes apart better than the same pooling of raw pixels (measured on this
    # region at 300 steps: 0.793 against 0.710). One date alone is ambiguous (cropland vs grassland): per token, the
    # latent and the pixels are close (0.675 and 0.680 with snow masked), both far above the majority class.
    assert probes["landcover_place_accuracy_latent"] > probes["landcover_place_accuracy_raw_pixels"] + 0.03, probes
    assert probes["landcover_place_accuracy_latent"] > probes["landcover_place_accuracy_majority_class"] + 0.4
    assert probes["landcover_accuracy_latent"] > probes["landcover_accuracy_majority_class"] + 0.2
    assert probes["decoder_ndvi_r2"] > 0.5

    # the climatology blend (geowm.calibrate), fitted as `geowm evaluate` does on the first three held-out
    # months, makes the NDVI forecasts of the months after them better than the model alone and than the
    # climatology, over leads 10-30 days (measured on this region at 300 steps: RMSE 0.069 against 0.077 and
    # 0.076; by lead 0.059 / 0.062 / 0.090 against model 0.069 / 0.075 / 0.089 and climatology 0.060 / 0.068 / 0.103)
    from geowm.baselines import BASELINES, ndvi
    from geowm.calibrate import fit_calibration
    from geowm.cube.store import open_cube
    from geowm.evaluate import forecast_skill, held_out_inits
    from geowm.inference import WorldModel

    ds, wm, leads = open_cube(str(demo_region / "cube")), WorldModel(run), (10, 20, 30)
    cal = fit_calibration(wm, ds, start="2022-07-01", until="2022-09-29", leads=leads, n_inits=4, every_days=15,
                          max_px=512, write=False)
    assert cal["used"] and len(cal["inits"]) >= 2, cal
    nd = ndvi(ds).load()
    clim = BASELINES["climatology"]().fit(nd.sel(time=slice(None, "2022-09-28")))
    inits = held_out_inits(ds["time"].values.astype("datetime64[s]"), "2022-09-29", leads, 30)
    skill = forecast_skill(ds, nd, {"blend": wm, "model": wm}, {"climatology": clim}, inits, leads,
                           blends={"blend": cal["weights"]})
    def pooled(method: str) -> float:  # RMSE over all leads' pixels
        by = skill[method].values()
        return float(np.sqrt(sum(v["n_pixels"] * v["rmse"] ** 2 for v in by) / sum(v["n_pixels"] for v in by)))

    assert all(v["n_pixels"] > 10_000 for v in skill["blend"].values()), skill
    assert pooled("blend") < pooled("model") and pooled("blend") < pooled("climatology"), skill
