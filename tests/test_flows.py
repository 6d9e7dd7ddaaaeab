"""Flows: the new-scenes simulator, the ledger, retries, per-tile forecasts on Dask with cached tiles.

Flow tests run against one Prefect test server per session (``prefect_api`` in conftest.py); the
pipeline against a real ``prefect server start`` and the kill/re-run fault are in test_flows_live.py.
"""

from __future__ import annotations

import filecmp
import json
from datetime import date

import numpy as np
import pytest
import xarray as xr


def _threads(flow_obj):
    """The flow with its Dask task runner on in-process workers (no worker start-up cost in tests)."""
    from prefect_dask import DaskTaskRunner

    from flows.settings import local_cluster_kwargs

    return flow_obj.with_options(task_runner=DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(2, processes=False)))


# ------------------------------------------------------------------------------------------ simulator


def test_release_is_dated_atomic_and_idempotent(synth_region, tmp_path):
    from flows.simulator import SimulatorError, advance, archive_scenes, read_clock, release, released

    watched = tmp_path / "watched"
    scenes = archive_scenes(synth_region)
    first = advance(synth_region, watched, until="2021-02-28")
    expect = [s.id for s in scenes if s.datetime.date() <= date(2021, 2, 28)]
    assert first["released"] == expect and first["today"] == "2021-02-28" and len(expect) >= 5
    assert first["n_visible"] + first["n_remaining"] == len(scenes)
    assert [p.name for p in watched.iterdir()] == ["2021-02-28"]  # one delivery, named after "today"
    for s in scenes[: len(expect)]:  # one folder per scene, both files, byte-identical to the archive
        folder = watched / "2021-02-28" / s.id
        assert sorted(p.name for p in folder.iterdir()) == [f"{s.id}.tif", f"{s.id}_SCL.tif"]
        assert filecmp.cmp(folder / f"{s.id}.tif", s.reflectance, shallow=False)
        assert filecmp.cmp(folder / f"{s.id}_SCL.tif", s.scl, shallow=False)
    assert not (tmp_path / ".watched.staging").exists()  # nothing half-staged is left behind
    assert sorted(released(watched)) == sorted(expect)  # nothing after "today"
    assert release(synth_region, watched, "2021-02-28") == []  # a second release changes nothing

    second = advance(synth_region, watched, days=10)
    assert second["today"] == "2021-03-10" and read_clock(watched) == date(2021, 3, 10)
    assert second["released"] == [s.id for s in scenes if date(2021, 2, 28) < s.datetime.date() <= date(2021, 3, 10)]
    assert sorted(p.name for p in (watched / "2021-03-10").iterdir()) == sorted(second["released"])
    with pytest.raises(SimulatorError, match="does not go back"):
        advance(synth_region, watched, until="2021-03-01")
    with pytest.raises(SimulatorError, match="not a synthetic archive"):
        archive_scenes(tmp_path)
    with pytest.raises(SimulatorError, match="exactly one"):
        advance(synth_region, watched, days=5, until="2021-04-01")


def test_archive_parameters_include_the_generator_options(tmp_path):
    """An archive records the generator's options: one from before they existed was made with them off and is
    replayed; one made with crop rotation is refused for a request without it (it is another region), and so is
    one an older generator made (the same parameters gave other pixels)."""
    from flows.simulator import SimulatorError, make_archive
    from geowm.synth.generator import VERSION

    params = {"size": 64, "start": "2021-01-01", "end": "2021-03-31", "seed": 1}
    old, rotated, older = tmp_path / "old", tmp_path / "rotated", tmp_path / "older"
    for folder, extra, version in ((old, {}, VERSION), (rotated, {"crop_rotation": True, "weather_regimes": False},
                                                       VERSION), (older, {}, VERSION - 1)):
        folder.mkdir()
        (folder / "synth.json").write_text(json.dumps({"parameters": {**params, **extra}, "version": version}))
    assert make_archive(old, **params) == old
    with pytest.raises(SimulatorError, match=f"'version': {VERSION - 1}"):
        make_archive(older, **params)
    with pytest.raises(SimulatorError, match="crop_rotation"):
        make_archive(rotated, **params)
    assert make_archive(rotated, **params, crop_rotation=True) == rotated
    with pytest.raises(SimulatorError, match="archive was generated with"):
        make_archive(old, **params, weather_regimes=True)


def test_simulate_command(synth_region, tmp_path):
    from typer.testing import CliRunner

    from geowm.cli import app

    args = ["simulate", str(tmp_path / "watched"), "--archive", str(synth_region), "--size", "256", "--start",
            "2021-01-01", "--end", "2021-12-31", "--seed", "3"]
    res = CliRunner().invoke(app, [*args, "--until", "2021-01-20"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["today"] == "2021-01-20" and len(report["released"]) == len(list((tmp_path / "watched").glob("*/*")))
    res = CliRunner().invoke(app, [*args, "--days", "5"])
    assert res.exit_code == 0 and json.loads(res.stdout)["today"] == "2021-01-25"
    res = CliRunner().invoke(app, [*args[:-1], "4", "--days", "5"])  # another seed: another region
    assert res.exit_code == 2 and "archive was generated with" in res.stderr


def test_simulate_flow_advances_the_clock(prefect_api, synth_region, tmp_path):
    from flows.pipeline import simulate_flow
    from flows.simulator import released

    first = simulate_flow(str(synth_region), str(tmp_path / "w"), days=10)
    second = simulate_flow(str(synth_region), str(tmp_path / "w"), days=10, stac=True)
    assert first["today"] == "2021-01-10" and second["today"] == "2021-01-20"
    assert sorted(released(tmp_path / "w")) == sorted(first["released"] + second["released"])
    assert not set(first["released"]) & set(second["released"]) and second["released"]
    assert (tmp_path / "w" / "stac" / "collection.json").is_file()


def test_watched_folder_ingests_like_the_stac_catalog(synth_region, synth_cube, tmp_path):
    """Scenes released as plain files (names S2SYN_<date>T<time>.tif, _SCL.tif) are found with the
    same ids, dates, bands and SCL mask as through STAC, and ingest to the same pixels and validity
    as the session cube made from the archive's STAC catalog."""
    from flows.simulator import advance
    from geowm.cube import IngestOptions, ingest, open_cube
    from geowm.sources import discover

    watched = tmp_path / "watched"
    advance(synth_region, watched, until="2021-02-15", stac=True)
    folder = discover(watched)
    stac = [s for s in discover(synth_region / "stac" / "catalog.json") if s.datetime.date() <= date(2021, 2, 15)]
    released_stac = discover(watched / "stac" / "collection.json")
    assert [s.id for s in folder] == [s.id for s in stac] == [s.id for s in released_stac]
    for a, b, c in zip(folder, stac, released_stac, strict=True):
        assert a.datetime == b.datetime == c.datetime
        assert sorted(a.bands) == sorted(b.bands) == sorted(c.bands) == ["B02", "B03", "B04", "B08"]
        assert [a.bands[k].index for k in sorted(a.bands)] == [b.bands[k].index for k in sorted(b.bands)]
        assert a.mask.name == b.mask.name == c.mask.name == "SCL"
        assert a.mask_clear == b.mask_clear == c.mask_clear == frozenset({4, 5, 6, 7})
        assert c.mask.path == a.mask.path  # the collection points at the released files

    cube = tmp_path / "cube"
    ingest(watched, cube, IngestOptions(scheduler="synchronous"))
    mine, ref = open_cube(cube), open_cube(synth_cube)
    ref = ref.sel(time=mine["time"].values)
    assert len(mine["time"]) == len(folder)
    np.testing.assert_array_equal(mine["valid"].values, ref["valid"].values)
    assert mine["valid"].values.any() and not mine["valid"].values.all()  # clouds were masked
    np.testing.assert_array_equal(mine["reflectance"].values, ref["reflectance"].values)


# ------------------------------------------------------------------------------------------ ledger


def test_ledger_baseline_pending_and_no_double_processing(tmp_path):
    from flows import ledger

    doc = ledger.start(tmp_path, "cube", ["a", "b"])
    assert doc["baseline"] == ["a", "b"] and ledger.load(tmp_path) == doc
    scenes = [{"id": i, "datetime": f"2021-01-0{n}T10:00:00+00:00"} for n, i in enumerate("abcd", start=1)]
    assert [s["id"] for s in ledger.pending(doc, scenes)] == ["c", "d"]
    doc = ledger.commit(tmp_path, doc, {"run": "r1", "scenes": ["c"]})
    assert [s["id"] for s in ledger.pending(doc, scenes)] == ["d"]
    doc = ledger.commit(tmp_path, doc, {"run": "r2", "scenes": [], "nothing_new": True})
    assert len(doc["runs"]) == 1 and doc["last_run"]["run"] == "r2"  # idle ticks are not piled up
    with pytest.raises(ledger.LedgerError, match="already processed by run r1"):
        ledger.commit(tmp_path, doc, {"run": "r3", "scenes": ["c"]})
    assert ledger.load(tmp_path)["processed"] == {"c": "r1"}  # the refused commit wrote nothing
    with pytest.raises(ledger.LedgerError, match="belongs to cube cube"):
        ledger.start(tmp_path, "other-cube", [])
    (tmp_path / "ledger.json").write_text("{not json")
    with pytest.raises(ledger.LedgerError, match="corrupt ledger"):
        ledger.load(tmp_path)


# ------------------------------------------------------------------------------------------ tasks


def test_settings_from_environment(monkeypatch):
    from flows.settings import dask_runner_options, retry_backoff_s

    monkeypatch.setenv("GEOWM_DASK_ADDRESS", "tcp://dask-scheduler:8786")
    assert dask_runner_options() == {"address": "tcp://dask-scheduler:8786"}
    monkeypatch.setenv("GEOWM_DASK_ADDRESS", "dask-scheduler")
    with pytest.raises(ValueError, match="GEOWM_DASK_ADDRESS"):
        dask_runner_options()
    monkeypatch.delenv("GEOWM_DASK_ADDRESS")
    monkeypatch.setenv("GEOWM_DASK_WORKERS", "3")
    monkeypatch.setenv("GEOWM_DASK_PROCESSES", "1")
    kw = dask_runner_options()["cluster_kwargs"]
    assert kw["n_workers"] == 3 and kw["processes"] and kw["host"] == "127.0.0.1"
    assert kw["dashboard_address"].startswith("127.0.0.1:") and kw["worker_dashboard_address"].startswith("127.0.0.1:")
    monkeypatch.setenv("GEOWM_DASK_WORKERS", "zero")
    with pytest.raises(ValueError, match="GEOWM_DASK_WORKERS"):
        dask_runner_options()
    monkeypatch.setenv("GEOWM_RETRY_BACKOFF_S", "soon")
    with pytest.raises(ValueError, match="GEOWM_RETRY_BACKOFF_S"):
        retry_backoff_s()


def test_transient_io_error_is_retried_bad_input_is_not(prefect_api, synth_region, tmp_path, monkeypatch):
    """A task whose first read fails with an OSError succeeds on its retry; a bad-input error fails at once."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

    import geowm.sources
    from flows import tasks
    from flows.simulator import release, released
    from geowm.sources import SourceError

    watched = tmp_path / "watched"
    release(synth_region, watched, "2021-01-31")
    real, calls = geowm.sources.discover, []

    def flaky(source, *a, **k):
        calls.append(source)
        if len(calls) == 1:
            raise OSError(5, "Input/output error (the network mount dropped)")
        return real(source, *a, **k)

    monkeypatch.setattr(geowm.sources, "discover", flaky)
    fast = tasks.discover_scenes.with_options(retry_delay_seconds=0.01)

    def probe(source: str):  # a task called on its own runs as a tracked task run (Prefect 3)
        with temporary_settings(updates={PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
            return fast(source, return_state=True)

    state = probe(str(watched))
    assert state.is_completed()
    scenes = state.result()
    assert [s["id"] for s in scenes] == sorted(released(watched))
    assert len(calls) == 2
    assert _final_task_run(get_client, state).run_count == 2

    def bad(source, *a, **k):
        calls.append(source)
        raise SourceError(f"{source}: not a readable raster")

    monkeypatch.setattr(geowm.sources, "discover", bad)
    calls.clear()
    state = probe(str(watched))
    assert state.is_failed() and len(calls) == 1  # not retried
    with pytest.raises(SourceError, match="not a readable raster"):
        state.result()
    assert _final_task_run(get_client, state).run_count == 1


def _final_task_run(get_client, state, timeout_s: float = 60.0):
    """The task run as the API records it once its final state has arrived (task states are sent as events)."""
    import time

    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            try:
                tr = client.read_task_run(state.state_details.task_run_id)
            except ObjectNotFound:  # its creation event has not been stored yet
                tr = None
            if tr is not None and tr.state is not None and tr.state.is_final():
                return tr
            if time.monotonic() > deadline:
                pytest.fail(f"task run {state.state_details.task_run_id} never reached a final state in the API")
            time.sleep(0.5)


def test_retry_condition_classifies_errors():
    from flows.tasks import is_transient
    from geowm.cube.store import CubeError
    from geowm.sources import SourceError

    assert is_transient(OSError("connection reset")) and is_transient(TimeoutError())
    assert is_transient(CubeError("c: another process is writing this cube; re-run when it has finished"))
    assert not is_transient(SourceError("x.tif: not a readable raster"))
    assert not is_transient(CubeError("c: no geowm cube here"))
    assert not is_transient(None)


def test_forecast_flow_tiles_on_dask_equal_the_whole_forecast_and_are_cached(prefect_api, synth_cube, tiny_run,
                                                                             tmp_path, monkeypatch):
    """Per-tile forecasts (4 tiles of 128 px on Dask) combine to exactly the whole-region forecast;
    a re-run, on an existing Dask cluster given by address, takes every tile from the cache and
    replaces the init instead of adding one."""
    from flows.pipeline import forecast_flow
    from geowm.forecast import forecast
    from geowm.forecast_store import open_forecasts

    store, state = tmp_path / "forecasts", tmp_path / "state"
    run = _threads(forecast_flow)
    out = run(str(synth_cube), str(tiny_run), str(store), init="2021-10-01", leads=[5.0, 15.0], members=1,
              tile_px=128, state_dir=str(state))
    assert out["tiles"] == 4 and out["tiles_cached"] == 0 and out["init"] == "2021-10-01"
    whole = forecast(str(synth_cube), str(tiny_run), init="2021-10-01", leads=[5.0, 15.0], members=1)
    got = open_forecasts(store).load()
    assert got.sizes["init_time"] == 1
    for name in whole.data_vars:
        np.testing.assert_allclose(got[name].values, whole[name].values, rtol=1e-6, atol=1e-6, err_msg=name)
        assert np.isfinite(whole[name].values).any()
    for c in ("y", "x", "py", "px", "lead_time", "valid_time"):
        np.testing.assert_array_equal(got[c].values, whole[c].values)
    assert got.attrs["geowm:run_id"] == whole.attrs["geowm:run_id"]

    # the re-run on an existing cluster named by GEOWM_DASK_ADDRESS (as infra/ sets it)
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    from flows.settings import dask_runner_options

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        monkeypatch.setenv("GEOWM_DASK_ADDRESS", cluster.scheduler_address)
        on_cluster = forecast_flow.with_options(task_runner=DaskTaskRunner(**dask_runner_options()))
        again = on_cluster(str(synth_cube), str(tiny_run), str(store), init="2021-10-01", leads=[5.0, 15.0],
                           members=1, tile_px=128, state_dir=str(state))
        ran = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert again["tiles_cached"] == 4
    assert ran == ["forecast_tile"], ran  # the tile tasks ran on that cluster
    assert open_forecasts(store).sizes["init_time"] == 1  # re-written, not duplicated
    assert any((state / "results").iterdir())  # the persisted tile results live in the state dir
    with pytest.raises(ValueError, match="multiple of the model's 8 px patch"):
        run(str(synth_cube), str(tiny_run), str(store), init="2021-10-01", leads=[5.0, 15.0], members=1,
            tile_px=100, state_dir=str(state))


def test_combine_and_merge_refuse_mismatched_inputs():
    from flows.tasks import combine_tiles, merge_scores

    def part(init, x0):
        return xr.Dataset({"ndvi": (("init_time", "lead_time", "y", "x"), np.ones((1, 1, 2, 2), np.float32)),
                           "embedding": (("init_time", "lead_time", "py", "px"), np.ones((1, 1, 1, 1)))},
                          coords={"init_time": [np.datetime64(init, "ns")], "lead_time": [np.timedelta64(5, "D")],
                                  "y": [20.0, 10.0], "x": [x0, x0 + 10.0], "py": [15.0], "px": [x0 + 5.0]})

    both = combine_tiles([part("2021-01-01", 0.0), part("2021-01-01", 20.0)])
    assert both.sizes == {"init_time": 1, "lead_time": 1, "y": 2, "x": 4, "py": 1, "px": 2}
    assert list(both["y"].values) == [20.0, 10.0] and np.isfinite(both["ndvi"].values).all()
    with pytest.raises(ValueError, match="different inits"):
        combine_tiles([part("2021-01-01", 0.0), part("2021-02-01", 20.0)])

    def scores(days, n):
        t = np.datetime64("2021-01-01", "ns") + np.array(days) * np.timedelta64(1, "D")
        v = np.full((len(days), n, n), float(days[0]), np.float32)
        return xr.Dataset({"score": (("time", "py", "px"), v)},
                          coords={"time": t, "py": np.arange(n) * 80.0, "px": np.arange(n) * 80.0})

    old = merge_scores(None, scores([0, 5, 10], 3), "alerts/scores.zarr")
    merged = merge_scores(old, scores([10, 15], 3), "alerts/scores.zarr")
    assert merged.sizes["time"] == 4 and float(merged["score"].isel(time=2).max()) == 10.0
    assert float(merged["score"].isel(time=0).max()) == 0.0  # old dates kept, re-scored ones replaced
    with pytest.raises(ValueError, match="alerts/scores.zarr: holds scores on another grid"):
        merge_scores(old, scores([20], 4), "alerts/scores.zarr")


def test_train_flow_skips_a_finished_run(prefect_api, synth_cube, tmp_path):
    from flows.pipeline import train_flow

    run = tmp_path / "run"
    cfg = dict(batch_size=2, workers=0, window={"frames": 4, "size": 32},
               model=dict(dim=32, depth=1, heads=2, pred_dim=16, pred_depth=1, pred_heads=2))
    first = train_flow(str(synth_cube), str(run), steps=2, train_until="2021-09-30", device="cpu", config=cfg,
                       eval_windows=4)
    assert first["trained"] and first["step"] == 2 and (run / "eval.json").is_file()
    weights = (run / "model.safetensors").read_bytes()
    again = train_flow(str(synth_cube), str(run), steps=2, train_until="2021-09-30", device="cpu", config=cfg,
                       eval_windows=4)
    assert not again["trained"] and again["step"] == 2
    assert (run / "model.safetensors").read_bytes() == weights
    assert json.loads((run / "eval.json").read_text()) == again["eval"]


def test_forecast_store_takes_inits_at_any_time_of_day(synth_cube, tiny_run, tmp_path):
    """The pipeline's inits are acquisition times (10:34:29, then 10:29:48 twenty days later...): the
    store must append, insert and replace them exactly (inferred 'days since' units could not)."""
    from geowm.cube import open_cube
    from geowm.forecast import forecast
    from geowm.forecast_store import open_forecasts, write_forecasts

    ds = open_cube(synth_cube)
    t, x, y = ds["time"].values, ds["x"].values, ds["y"].values
    box = (x[0], y[63], x[63], y[0])
    for init in (t[-10], t[-5], t[-7], t[-5]):  # append, append, insert, replace
        fc = forecast(ds, str(tiny_run), init=str(init)[:19], leads=[5.0], bbox=box, members=1)
        write_forecasts(fc, tmp_path / "store")
    got = open_forecasts(tmp_path / "store")
    np.testing.assert_array_equal(got["init_time"].values, t[[-10, -7, -5]])
    np.testing.assert_array_equal(got["valid_time"].values[:, 0], t[[-10, -7, -5]] + np.timedelta64(5, "D"))


def test_pipeline_before_the_first_delivery_and_with_a_missing_source(prefect_api, tiny_run, tmp_path):
    """An empty watched folder is a normal, quick "nothing new" tick; a missing one fails naming the path."""
    from flows.pipeline import pipeline_flow
    from geowm.sources import SourceError

    watched = tmp_path / "watched"
    watched.mkdir()
    params = dict(source=str(watched), cube=str(tmp_path / "cube"), model=str(tiny_run),
                  store=str(tmp_path / "forecasts"), alerts=str(tmp_path / "alerts"), state_dir=str(tmp_path / "state"))
    record = _threads(pipeline_flow)(**params)
    assert record["nothing_new"] and record["scenes"] == [] and not (tmp_path / "cube").exists()
    doc = json.loads((tmp_path / "state" / "ledger.json").read_text())
    assert doc["baseline"] == [] and doc["runs"] == [] and doc["last_run"]["nothing_new"]
    with pytest.raises(SourceError, match=f"{tmp_path / 'nowhere'}: no such file or folder"):
        _threads(pipeline_flow)(**{**params, "source": str(tmp_path / "nowhere")})
