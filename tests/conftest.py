"""Shared fixtures: small data made on the fly, once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_region(tmp_path_factory) -> Path:
    """A small synthetic region (256 px, one year, seed 3), generated once per session."""
    from geowm.synth import generate

    out = tmp_path_factory.mktemp("synth") / "region"
    generate(out, size=256, start="2021-01-01", end="2021-12-31", seed=3)
    return out


@pytest.fixture(scope="session")
def synth_cube(synth_region, tmp_path_factory) -> Path:
    """``synth_region`` ingested into a cube, once per session."""
    from geowm.cube import IngestOptions, ingest

    cube = tmp_path_factory.mktemp("cube") / "cube"
    ingest(synth_region / "stac" / "catalog.json", cube, IngestOptions(scheduler="threads"))
    return cube


@pytest.fixture(scope="session")
def landsat_dir() -> Path:
    """The real Landsat 8 pair shipped in ../shared/data (two adjacent scenes, one date)."""
    here = Path(__file__).resolve().parents[1]
    for cand in (here.parent / "shared" / "data" / "landsat8_224077_224078",
                 here / "shared" / "data" / "landsat8_224077_224078"):
        if cand.is_dir():
            return cand
    pytest.skip("shared Landsat sample data not found beside the checkout")


def write_tif(path: Path, data, *, crs="EPSG:32633", transform=None, nodata=None, descriptions=None,
              tags=None, dtype=None) -> Path:
    """Write a small GeoTIFF (bands, y, x) for tests; ``crs=None`` writes one without georeferencing."""
    import numpy as np
    import rasterio
    from affine import Affine

    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    transform = transform or Affine(10, 0, 500000, 0, -10, 5400000)
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=dtype or data.dtype, tiled=True, blockxsize=16, blockysize=16, compress="deflate")
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    if nodata is not None:
        profile["nodata"] = nodata
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, d in enumerate(descriptions or [], start=1):
            dst.set_band_description(i, d)
        if tags:
            dst.update_tags(**tags)
    return path


def catalogued_item(root: Path, item_id: str) -> dict:
    """Update the STAC catalog ``root/catalog`` from the cube ``root/cube``, check that it validates, and return
    the JSON of its item ``item_id``."""
    import json

    from catalog.stac import update_catalog, validate_catalog

    assert validate_catalog(update_catalog(root / "catalog", root / "cube")) == []
    return next(d for p in (root / "catalog").rglob("*.json") if (d := json.loads(p.read_text())).get("id") == item_id)


@pytest.fixture
def tif():
    """The :func:`write_tif` helper as a fixture."""
    return write_tif


@pytest.fixture(scope="session")
def tiny_run(synth_cube, tmp_path_factory) -> Path:
    """A small model trained for a few steps on ``synth_cube``, with its probes (for inference tests)."""
    from geowm.data import WindowConfig
    from geowm.train import TrainConfig, evaluate_run, train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = TrainConfig(steps=6, batch_size=2, workers=0, train_until="2021-09-30",
                      window=WindowConfig(frames=4, size=32),
                      model=dict(dim=48, depth=2, heads=2, pred_dim=24, pred_depth=1, pred_heads=2))
    train(str(synth_cube), run, cfg)
    evaluate_run(run, n_windows=4)
    return run


@pytest.fixture(scope="session")
def dashboard_workdir(synth_cube, tiny_run, tmp_path_factory) -> Path:
    """A dashboard workdir laid out as ``make demo`` writes it (``cube/``, ``forecasts/``, ``alerts/``), from the
    session fixtures: forecasts of two inits, anomaly scores and confirmed alerts from 2021-10-01.

    The alerts are what ``geowm.anomaly.detect`` confirms (no test data stands in for them).
    """
    import shutil

    from geowm.alerts import write_alerts
    from geowm.anomaly import detect, write_scores
    from geowm.forecast import forecast
    from geowm.forecast_store import write_forecasts

    wd = tmp_path_factory.mktemp("dashboard") / "workdir"
    shutil.copytree(synth_cube, wd / "cube")
    for init in ("2021-08-01", "2021-09-01"):
        write_forecasts(forecast(str(wd / "cube"), str(tiny_run), init=init, leads=(10, 20, 30), members=2),
                        wd / "forecasts")
    # the surprise alone (seasonal=False): the test cube holds one year, so the year-ago references of these dates
    # are its first, context-less months, and a score weighed by the NDVI lost against them leaves too few
    # alerts for the UI tests
    scores, alerts = detect(str(wd / "cube"), str(tiny_run), "2021-10-01", history_days=60, seasonal=False)
    assert len(alerts) >= 3, f"the session model confirmed only {len(alerts)} alert(s); the UI tests need 3"
    write_scores(scores, wd / "alerts" / "scores.zarr")
    write_alerts(alerts, wd / "alerts")
    return wd


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One Prefect test server (temporary SQLite database) for the session's flow tests, with a temporary
    PREFECT_HOME (nothing written to ~/.prefect); yields its API URL."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings(updates={PREFECT_HOME: home, PREFECT_RESULTS_LOCAL_STORAGE_PATH: home / "storage"}):
        with prefect_test_harness(server_startup_timeout=120):
            yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def ctx():
    """A multiprocessing fork server that imported geowm once (``tests/_crash.py``); each ``ctx.Process`` is a
    fresh fork of it, started in a fraction of a second instead of seconds of imports."""
    import multiprocessing as mp
    import os
    from multiprocessing import forkserver

    c = mp.get_context("forkserver")
    c.set_forkserver_preload(["_crash", "geowm.train"])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), saved]))
    try:  # Python 3.11's fork server imports the preload before it applies the parent's sys.path
        forkserver.ensure_running()
    finally:
        os.environ.pop("PYTHONPATH") if saved is None else os.environ.__setitem__("PYTHONPATH", saved)
    return c
