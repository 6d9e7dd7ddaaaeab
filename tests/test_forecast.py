"""Forecasts: the dataset contract, context only up to the init, the store (append, insert, replace,
plain xarray), and bad input (another grid, init before the cube, leads not positive)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import geowm
from geowm.cli import app
from geowm.cube.store import tree_digest
from geowm.forecast import ForecastError, forecast
from geowm.forecast_store import ForecastStoreError, open_forecasts, write_forecasts

runner = CliRunner()
INIT = "2021-07-01"


@pytest.fixture(scope="module")
def fc(synth_cube, tiny_run):
    return forecast(str(synth_cube), str(tiny_run), init=INIT, leads=(5, 10, 30), members=3)


def test_forecast_dataset_contract(fc, synth_cube, tiny_run):
    cube = geowm.open_cube(synth_cube)
    assert fc.ndvi.dims == ("init_time", "lead_time", "quantile", "y", "x")
    assert fc.embedding.dims == ("init_time", "lead_time", "py", "px", "latent")
    assert list(fc["quantile"].values) == [0.1, 0.5, 0.9]
    assert (fc.lead_time.values.astype("timedelta64[D]").astype(int) == [5, 10, 30]).all()
    assert (fc.valid_time.values[0] == np.datetime64(INIT) + fc.lead_time.values).all()
    assert fc.sizes["y"] == cube.sizes["y"] and np.allclose(fc.x.values, cube.x.values)
    for band in cube.band.values:
        assert fc[str(band)].dims == fc.ndvi.dims
    nd = fc.ndvi.values
    assert np.isfinite(nd).mean() > 0.9 and np.nanmax(np.abs(nd)) <= 1
    assert (nd[:, :, 0] <= nd[:, :, 1] + 1e-6).all() and (nd[:, :, 1] <= nd[:, :, 2] + 1e-6).all()
    norms = np.linalg.norm(fc.embedding.values, axis=-1)
    np.testing.assert_allclose(norms[np.isfinite(norms)], 1.0, atol=1e-4)
    assert float(fc.latent_spread.max()) > 0  # the ensemble members differ
    assert int(fc.n_context.max()) == 3  # frames - 1 of the run's window
    assert fc.attrs["geowm:run_id"].startswith("tiny@") and len(fc.attrs["geowm:config_hash"]) == 16
    assert fc.attrs["geowm:cube_snapshot"] == cube.attrs["geowm:snapshot"]
    assert fc.spatial_ref.attrs["crs_wkt"] == cube.spatial_ref.attrs["crs_wkt"]


def test_forecast_sees_nothing_after_the_init(fc, synth_cube, tiny_run):
    cube = geowm.open_cube(synth_cube).load()
    after = cube.time > np.datetime64(INIT)
    cube["reflectance"] = cube.reflectance.where(~after, 0.9)  # the future looks completely different
    again = forecast(cube, str(tiny_run), init=INIT, leads=(5, 10, 30), members=3)
    np.testing.assert_array_equal(again.ndvi.values, fc.ndvi.values)
    np.testing.assert_array_equal(again.embedding.values, fc.embedding.values)


def test_a_region_gets_the_members_of_the_whole_cube_there(fc, synth_cube, tiny_run):
    """The ensemble's random context subsets follow the place, not the region's corner: a bbox on the window grid
    (rows 64-191, columns 96-223; 32 px windows) forecasts what the whole cube's forecast holds there, quantiles
    and spread too (geowm evaluate forecasts a region block by block)."""
    cube = geowm.open_cube(synth_cube)
    x, y = cube.x.values, cube.y.values
    bbox = (x[96], min(y[64], y[191]), x[223], max(y[64], y[191]))
    part = forecast(str(synth_cube), str(tiny_run), init=INIT, leads=(5, 10, 30), members=3, bbox=bbox)
    p = fc.sizes["y"] // fc.sizes["py"]  # the run's patch
    whole = fc.isel(y=slice(64, 192), x=slice(96, 224), py=slice(64 // p, 192 // p), px=slice(96 // p, 224 // p))
    assert part.sizes["y"] == part.sizes["x"] == 128 and np.allclose(part.x.values, whole.x.values)
    for var in ("ndvi", "embedding", "latent_spread"):
        np.testing.assert_allclose(part[var].values, whole[var].values, rtol=1e-4, atol=1e-5, err_msg=var)
    assert np.isfinite(part.ndvi.values).mean() > 0.9 and float(part.latent_spread.max()) > 0


def test_store_append_insert_replace_and_plain_xarray(fc, synth_cube, tiny_run, tmp_path):
    store = tmp_path / "fc"
    write_forecasts(fc, store)
    later = forecast(str(synth_cube), str(tiny_run), init="2021-08-01", leads=(5, 10, 30), members=1)
    earlier = forecast(str(synth_cube), str(tiny_run), init="2021-06-01", leads=(5, 10, 30), members=1)
    write_forecasts(later, store)
    write_forecasts(earlier, store)  # older than the newest: inserted in order
    ds = open_forecasts(store)
    assert [str(t)[:10] for t in ds.init_time.values] == ["2021-06-01", "2021-07-01", "2021-08-01"]
    np.testing.assert_array_equal(ds.ndvi.sel(init_time="2021-06-01").values, earlier.ndvi.values[0])
    np.testing.assert_array_equal(ds.ndvi.sel(init_time="2021-07-01").values, fc.ndvi.values[0])
    assert (ds.valid_time.values[:, 0].astype("datetime64[D]").astype(str) ==
            ["2021-06-06", "2021-07-06", "2021-08-06"]).all()
    # re-running an init replaces it (here with another ensemble size -> other quantiles, and a climatology blend)
    redo = forecast(str(synth_cube), str(tiny_run), init=INIT, leads=(5, 10, 30), members=1,
                    climatology={"ndvi": [0.5, 0.0]})
    write_forecasts(redo, store)
    ds = open_forecasts(store)
    assert ds.sizes["init_time"] == 3
    np.testing.assert_array_equal(ds.ndvi.sel(init_time=INIT).values, redo.ndvi.values[0])
    assert set(ds.attrs["geowm:cube_snapshots"]) == {"2021-06-01T00:00:00", "2021-07-01T00:00:00",
                                                     "2021-08-01T00:00:00"}
    assert ds.attrs["geowm:climatology_blends"] == {"2021-06-01T00:00:00": "{}", "2021-07-01T00:00:00":
                                                    '{"ndvi": [0.5, 0.0]}', "2021-08-01T00:00:00": "{}"}
    code = ("import icechunk, xarray as xr; "
            f"repo = icechunk.Repository.open(icechunk.local_filesystem_storage({str(store)!r})); "
            "ds = xr.open_zarr(repo.readonly_session('main').store, consolidated=False); "
            "print(dict(ds.sizes)['init_time'], ds.ndvi.dims, float(ds.ndvi.isel(init_time=0).mean()))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1].startswith("3 ('init_time', 'lead_time', 'quantile', 'y', 'x')")


def test_bad_input_leaves_the_store_alone(fc, synth_cube, tiny_run, tmp_path):
    store = tmp_path / "fc"
    write_forecasts(fc, store)
    before = tree_digest(store)
    cube = geowm.open_cube(synth_cube)
    x0, y1 = float(cube.x[0]), float(cube.y[0])
    other = forecast(str(synth_cube), str(tiny_run), init=INIT, leads=(5, 10, 30), members=1,
                     bbox=(x0, y1 - 1000, x0 + 1000, y1))
    with pytest.raises(ForecastStoreError, match="another grid"):
        write_forecasts(other, store)
    other_leads = forecast(str(synth_cube), str(tiny_run), init=INIT, leads=(5, 10), members=1)
    with pytest.raises(ForecastStoreError, match="lead times"):
        write_forecasts(other_leads, store)
    with pytest.raises(ForecastError, match="before the cube starts"):
        forecast(str(synth_cube), str(tiny_run), init="2019-01-01")
    with pytest.raises(ForecastError, match="positive"):
        forecast(str(synth_cube), str(tiny_run), init=INIT, leads=(0, 10))
    assert tree_digest(store) == before
    for args, msg in ((["--init", "2019-01-01"], "before the cube starts"), (["--leads", "-5,10"], "positive"),
                      (["--bbox", f"{x0},{y1 - 640},{x0 + 640},{y1}"], "another grid")):
        res = runner.invoke(app, ["forecast", "--cube", str(synth_cube), "--model", str(tiny_run),
                                  "--out", str(store), "--members", "1", *args])
        assert res.exit_code == 2 and msg in res.output.replace("\n", " "), res.output
    assert tree_digest(store) == before
    fresh = tmp_path / "never"
    res = runner.invoke(app, ["forecast", "--cube", str(synth_cube), "--model", str(tiny_run), "--out", str(fresh),
                              "--init", "2019-01-01", "--catalog", str(tmp_path / "cat")])
    assert res.exit_code == 2 and not fresh.exists() and not (tmp_path / "cat").exists()


def test_cli_forecast_writes_the_store(synth_cube, tiny_run, tmp_path):
    store = tmp_path / "fc"
    res = runner.invoke(app, ["forecast", "--cube", str(synth_cube), "--model", str(tiny_run), "--out", str(store),
                              "--init", INIT, "--leads", "10,20", "--members", "2", "--catalog", str(tmp_path / "cat")])
    assert res.exit_code == 0, res.output
    ds = open_forecasts(store)
    assert ds.sizes["init_time"] == 1 and ds.sizes["lead_time"] == 2
    assert str(ds.init_time.values[0])[:10] == INIT
    import pystac

    (item,) = pystac.Catalog.from_file(str(tmp_path / "cat" / "catalog.json")).get_child("forecasts").get_items()
    assert item.properties["forecast:reference_datetime"].startswith(INIT)  # the CLI keeps the catalog current


def test_change_decoder_adds_its_change_to_the_last_clear_observation(synth_cube, tiny_run):
    """Delta decoding with a change decoder: forecast = last clear observation + decoded change. With a decoder
    that says "no change" the forecast is persistence; one that says +0.1 NDVI moves it by exactly 0.1."""
    import torch

    from geowm.baselines import Persistence, ndvi
    from geowm.inference import WorldModel

    wm = WorldModel(tiny_run, "cpu")
    D, p, C = wm.cfg.dim, wm.cfg.patch, len(wm.bands)
    base = {k: v for k, v in wm.probes.items() if not k.startswith("change_")}

    def with_change(c: float):
        wm.probes = {**base, "change_ndvi_w": torch.zeros(2 * D, p * p), "change_ndvi_b": torch.full((p * p,), c),
                     "change_pixels_w": torch.zeros(2 * D, C * p * p), "change_pixels_b": torch.zeros(C * p * p)}
        return forecast(str(synth_cube), wm, init=INIT, leads=(10,), members=1).ndvi.sel(quantile=0.5).values[0, 0]

    still, up = with_change(0.0), with_change(0.1)
    cube = geowm.open_cube(synth_cube)
    pers = Persistence().fit(ndvi(cube).sel(time=slice(None, INIT)).load()).forecast(
        INIT, [np.datetime64(INIT) + np.timedelta64(10, "D")]).values[0]
    same = np.isclose(still, pers, atol=1e-4)
    assert same.mean() > 0.5, same.mean()  # most pixels: anchored on their last clear observation
    inner = same & (np.abs(still) < 0.85)
    np.testing.assert_allclose(up[inner] - still[inner], 0.1, atol=1e-4)


def test_package_names_resolve_lazily() -> None:
    """``geowm.forecast`` is the API function even after the submodule of that name was imported first, and the
    public names and submodules resolve on first use."""
    code = ("import geowm.anomaly, geowm.forecast as gf, geowm, geowm.api; "
            "assert geowm.forecast is geowm.api.forecast is gf and callable(geowm.forecast); "
            "assert geowm.open_cube is geowm.api.open_cube and geowm.WorldModel.__name__ == 'WorldModel'; "
            "assert geowm.sources.discover and set(geowm.__all__) <= set(dir(geowm))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def seasonal_run(synth_cube, tmp_path_factory):
    """A few steps of a model with a seasonal memory (lag 120 days: the session cube spans one year), probed."""
    from geowm.data import WindowConfig
    from geowm.train import TrainConfig, evaluate_run, train

    run = tmp_path_factory.mktemp("runs") / "seasonal"
    cfg = TrainConfig(steps=6, batch_size=2, workers=0, train_until="2021-09-30",
                      window=WindowConfig(frames=4, size=32, seasonal_frames=2),
                      model=dict(dim=48, depth=2, heads=2, pred_dim=24, pred_depth=1, pred_heads=2,
                                 seasonal_anchor=True, seasonal_lag_days=120.0, seasonal_tol_days=30.0))
    train(str(synth_cube), run, cfg)
    evaluate_run(run, n_windows=16)
    return run


def test_place_features_pool_a_places_frames():
    """The per-place land-cover probe's features: mean and spread over each place's frames, its class."""
    from geowm.probes import place_features

    x = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [7.0, 1.0], [9.0, 1.0]], np.float32)
    tok = {"place": np.array([4, 4, 9, 2, 2]), "landcover": np.array([1, 1, 3, 0, 0])}
    feat, labels = place_features(x, tok)
    order = {2: 0, 4: 1, 9: 2}  # places sorted by id
    assert labels.tolist() == [0, 1, 3]
    np.testing.assert_allclose(feat[order[4]], [2.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(feat[order[9]], [5.0, 5.0, 0.0, 0.0])
    np.testing.assert_allclose(feat[order[2]], [8.0, 1.0, 1.0, 0.0])


def test_per_year_labels_follow_the_windows_year(tiny_run, synth_cube, tif, tmp_path):
    """A crop-type map per year (bands named by year, as the USDA Cropland Data Layer or geowm's croptype.tif):
    the probe labels a window's tokens with the map of the window's year, not another year's; years no band
    covers give no label; a multi-band raster whose bands are not named by years is refused, naming the file."""
    import json

    import torch

    from geowm.cube.reader import ReadError, read_labels
    from geowm.cube.store import read_state
    from geowm.data import CubeWindows, WindowConfig
    from geowm.inference import WorldModel
    from geowm.probes import token_features

    grid = read_state(synth_cube).grid
    ones = np.ones((grid.height, grid.width), np.uint8)
    classes = json.dumps({"1": "forest", "3": "crop_summer", "4": "grassland"})
    path = tif(tmp_path / "croptype.tif", np.stack([ones * 3, ones * 4]), crs=grid.crs, transform=grid.transform,
               descriptions=["2020", "2021"], tags={"CLASSES": classes})
    labels = read_labels(str(path), grid)
    assert labels.years == (2020, 2021) and labels.maps.shape == (2, grid.height, grid.width)
    assert labels.classes[4] == "grassland"
    dates = np.array(["2020-07-01", "2021-01-01T00:00", "2021-12-31T23:59", "2022-03-01"], "datetime64[s]")
    assert labels.band_of(dates).tolist() == [0, 1, 1, -1]

    wm = WorldModel(tiny_run, device="cpu")
    conf = wm.config
    ds = CubeWindows(str(synth_cube), WindowConfig(**conf["train"]["window"]), conf["data"]["stats"])
    tok = token_features(wm.model, ds, [0, len(ds) // 2, len(ds) - 1], torch.device("cpu"), labels)
    assert len(tok["landcover"]) > 0 and set(tok["landcover"].tolist()) == {4}  # the session cube is 2021

    other = read_labels(str(tif(tmp_path / "old.tif", np.stack([ones, ones * 3]), crs=grid.crs,
                                transform=grid.transform, descriptions=["2018", "2019"])), grid)
    tok = token_features(wm.model, ds, [0, len(ds) - 1], torch.device("cpu"), other)
    assert set(tok["landcover"].tolist()) == {-1}  # no map for 2021: no label

    single = read_labels(str(tif(tmp_path / "lc.tif", ones * 3, crs=grid.crs, transform=grid.transform)), grid)
    assert single.years is None and single.band_of(dates).tolist() == [0, 0, 0, 0]
    for name, desc in (("unnamed.tif", None), ("twice.tif", ["2021", "2021"])):
        bad = tif(tmp_path / name, np.stack([ones, ones]), crs=grid.crs, transform=grid.transform, descriptions=desc)
        with pytest.raises(ReadError, match=rf"{name}.*not distinct years"):
            read_labels(str(bad), grid)
    # from the command line: refused before any training, nothing written
    res = CliRunner().invoke(app, ["train", "--cube", str(synth_cube), "--out", str(tmp_path / "run"), "--steps",
                                   "1", "--landcover", str(tmp_path / "unnamed.tif")])
    assert res.exit_code != 0 and "unnamed.tif" in res.output and not (tmp_path / "run").exists(), res.output


def test_year_ago_slot_and_blend_weights():
    """The year-ago anchor is the observed tubelet nearest ``target - lag`` within ``tol``; the blend weight of
    two forecasts with independent errors is the inverse-variance one, and it follows the lead."""
    import torch

    from geowm.probes import blend, blend_weights, year_ago_slot

    days = torch.tensor([[0.0, 10.0, 40.0, 100.0]])
    ok = torch.ones(1, 4, 2, 2, dtype=torch.bool)
    ok[0, 1, 0, 0] = False  # patch (0, 0) was not seen on day 10
    slot, hit = year_ago_slot(days, ok, torch.tensor([112.0]), 100.0, 15.0)  # nearest day 12
    assert slot[0].tolist() == [[0, 1], [1, 1]] and hit.all()  # (0, 0): day 0 is 12 days off, still within 15
    slot, hit = year_ago_slot(days, ok, torch.tensor([112.0]), 100.0, 5.0)
    assert not hit[0, 0, 0] and hit[0, 1, 1]
    rng = np.random.default_rng(0)
    n = 20000
    gap = rng.uniform(0, 60, n)
    e_last = rng.normal(0, 1, (n, 1)) * (0.2 + gap[:, None] / 60)  # the last observation ages with the lead
    e_season = rng.normal(0, 0.6, (n, 1))
    w = blend_weights(e_last, e_season, gap)
    for g in (5.0, 30.0, 55.0):
        s_last = 0.2 + g / 60
        assert abs(float(blend(w, g)) - 0.36 / (0.36 + s_last ** 2)) < 0.12
    assert blend(w, 5.0) > blend(w, 55.0)


def test_seasonal_decoder_blends_the_year_ago_observation(synth_cube, seasonal_run):
    """A run with a seasonal memory fits a year-ago change decoder; forecasting with it, a blend weight of 0 on
    the last observation gives the mean of the pixel's observations about a lag before the valid time plus the
    decoded change, and a weight of 1 gives the last-observation forecast unchanged."""
    import json

    import torch

    from geowm.baselines import ndvi
    from geowm.inference import WorldModel

    scores = json.loads((seasonal_run / "probes.json").read_text())["scores"]
    assert scores.get("season_ndvi_n_test", 0) > 0, scores  # year-ago pairs were found and scored
    wm = WorldModel(seasonal_run, "cpu")
    D, p = wm.cfg.dim, wm.cfg.patch
    base = {k: v for k, v in wm.probes.items() if not k.startswith(("change_", "season_"))}
    lead, init = 20.0, np.datetime64("2021-08-15")
    vt = init + np.timedelta64(int(lead), "D")

    def run(blend_w, c):
        wm.probes = {**base, "change_ndvi_w": torch.zeros(2 * D, p * p), "change_ndvi_b": torch.zeros(p * p),
                     "season_ndvi_w": torch.zeros(2 * D, p * p), "season_ndvi_b": torch.full((p * p,), c),
                     "season_ndvi_blend": torch.tensor(blend_w)}
        return forecast(str(synth_cube), wm, init=str(init), leads=(lead,), members=1).ndvi.sel(
            quantile=0.5).values[0, 0]

    wm.probes = {**base, "change_ndvi_w": torch.zeros(2 * D, p * p), "change_ndvi_b": torch.zeros(p * p)}
    plain = forecast(str(synth_cube), wm, init=str(init), leads=(lead,), members=1).ndvi.sel(quantile=0.5).values[0, 0]
    nd = ndvi(geowm.open_cube(synth_cube)).sel(time=slice(vt - np.timedelta64(150, "D"), vt - np.timedelta64(90, "D")))
    # all weight on the last observation: unchanged, except pixels without one, which take their year-ago value
    last_only = run([1.0, 0.0], 0.0)
    other = ~np.isclose(last_only, plain, atol=1e-6)
    assert other.mean() < 0.05, other.mean()
    year_ago, up = run([0.0, 0.0], 0.0), run([0.0, 0.0], 0.1)
    with np.errstate(all="ignore"):  # the mean of the pixel's clear observations about a lag back
        seen = (year_ago >= np.nanmin(nd.values, 0) - 1e-4) & (year_ago <= np.nanmax(nd.values, 0) + 1e-4)
    np.testing.assert_allclose(year_ago[other], last_only[other], atol=1e-6)
    moved = ~np.isclose(year_ago, plain, atol=1e-4)
    assert moved.mean() > 0.3, moved.mean()
    assert seen[moved].mean() > 0.95, seen[moved].mean()
    inner = moved & (np.abs(year_ago) < 0.85)
    np.testing.assert_allclose(up[inner] - year_ago[inner], 0.1, atol=1e-4)


def test_normalise_on_the_model_device_zeroes_what_is_not_valid(tiny_run):
    import torch

    wm = geowm.load_model(tiny_run, device="cpu")
    rng = np.random.default_rng(0)
    refl = rng.uniform(0, 5000, (2, 3, len(wm.bands), 8, 8)).astype(np.float32)
    refl[0, 1, 2, 3, 4] = np.nan
    valid = rng.random((2, 3, 8, 8)) > 0.2
    norm, ok = wm.normalise(refl, valid)
    assert isinstance(norm, torch.Tensor) and norm.device == wm.device and norm.dtype == torch.float32
    want_ok = valid & np.isfinite(refl).all(axis=2)
    assert not want_ok[0, 1, 3, 4] and want_ok.mean() > 0.7
    want = np.where(want_ok[:, :, None], (refl - wm.mean[:, None, None]) / wm.std[:, None, None], 0).astype(np.float32)
    np.testing.assert_array_equal(ok.numpy(), want_ok)
    np.testing.assert_array_equal(norm.numpy(), want)


@pytest.mark.parametrize("members", [1, 2, 3, 4, 8])
def test_member_quantiles_equal_numpys(members):
    from geowm.forecast import QUANTILES, member_quantiles

    a = np.random.default_rng(members).standard_normal((members, 3, 2, 16, 16)).astype(np.float32)
    a[0, 1, 0, 2, 3] = np.nan
    want = np.quantile(a, QUANTILES, axis=0)
    got = member_quantiles(a, QUANTILES)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # to the bit, NaN where a member is NaN


def test_tiles_worked_on_at_once_give_the_same_forecast_and_surprise(synth_cube, tiny_run, monkeypatch):
    """On CUDA several tiles are worked on at once (forecast.tile_workers); the result is the one-at-a-time one."""
    import importlib
    import threading

    ga, gf = importlib.import_module("geowm.anomaly"), importlib.import_module("geowm.forecast")  # modules, not
    # the functions geowm re-exports under these names

    monkeypatch.setattr(gf, "TILE", 128)  # the 256 px session region in 4 tiles
    kw = dict(init=INIT, leads=(5, 30), members=3)
    one_f = forecast(str(synth_cube), str(tiny_run), **kw)
    one_s = ga.surprise(str(synth_cube), str(tiny_run), start="2021-08-01", end="2021-09-15")
    seen = set()
    for mod, name in ((gf, "_forecast_tile"), (ga, "_surprise_tile")):
        real = getattr(mod, name)

        def spy(*a, _real=real, **k):
            seen.add(threading.get_ident())
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, spy)
    monkeypatch.setattr(gf, "tile_workers", lambda wm: 3)  # map_tiles asks it, for forecasts and surprise alike
    par_f = forecast(str(synth_cube), str(tiny_run), **kw)
    par_s = ga.surprise(str(synth_cube), str(tiny_run), start="2021-08-01", end="2021-09-15")
    assert len(seen) > 1 and threading.get_ident() not in seen  # worker threads did the tiles
    assert {"ndvi", "embedding", "latent_spread"} <= set(one_f.data_vars)
    assert {"surprise", "clear_fraction"} <= set(one_s.data_vars)
    for one, par in ((one_f, par_f), (one_s, par_s)):
        assert set(par.data_vars) == set(one.data_vars)
        for v in one.data_vars:
            np.testing.assert_array_equal(par[v].values, one[v].values, err_msg=v)


def test_a_band_the_model_does_not_use_is_never_read(synth_cube, tiny_run):
    """Tiles are read with the model's bands only (a cube may hold many more), as float32: a band whose chunks
    fail when read leaves forecasts and surprise as they were. The patch NDVI of the departures still reads red
    and near-infrared, which this model has."""
    import importlib

    import dask.array as dsa
    import xarray as xr

    ga, gf = importlib.import_module("geowm.anomaly"), importlib.import_module("geowm.forecast")
    cube = geowm.open_cube(synth_cube)

    def unreadable(block):
        raise OSError("band X was read")

    r = cube["reflectance"]
    r = r.assign_coords({c: r[c].compute() for c in r.coords if c not in r.dims})  # lazy strings do not concat
    bad = dsa.map_blocks(unreadable, dsa.zeros((r.sizes["time"], 1, r.sizes["y"], r.sizes["x"]),
                                               chunks=(1, 1, 64, 64), dtype=r.dtype), dtype=r.dtype)
    extra = xr.DataArray(bad, dims=r.dims, coords={**{d: r[d] for d in ("time", "y", "x")}, "band": ["X"]})
    if "common_name" in r.coords:
        extra = extra.assign_coords(common_name=("band", [""]))
    wide = xr.Dataset({"reflectance": xr.concat([extra, r], "band"), "valid": cube["valid"]},
                      attrs=cube.attrs)  # X first: the model's bands are not in order
    assert list(wide["band"].values) == ["X", *r["band"].values]
    sub = gf._tile(wide, np.arange(3), 0, 0, [str(b) for b in r["band"].values])
    assert sub["reflectance"].dtype == np.float32 and list(sub["band"].values) == list(r["band"].values)
    with pytest.raises(OSError, match="band X"):
        gf._tile(wide, np.arange(3), 0, 0)
    kw = dict(init=INIT, leads=(5, 30), members=2)
    np.testing.assert_array_equal(forecast(wide, str(tiny_run), **kw)["ndvi"].values,
                                  forecast(cube, str(tiny_run), **kw)["ndvi"].values)
    span = dict(start="2021-08-01", end="2021-09-15")
    a, b = ga.surprise(wide, str(tiny_run), **span), ga.surprise(cube, str(tiny_run), **span)
    for v in ("surprise", "departure", "ndvi_change"):
        np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)
