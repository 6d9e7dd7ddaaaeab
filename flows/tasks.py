"""Prefect tasks wrapping geowm's public functions (geowm never imports this package).

I/O tasks retry up to 3 times with exponential backoff (2 s, 4 s, 8 s; ``GEOWM_RETRY_BACKOFF_S``
sets the first delay) but only on transient errors: ``OSError`` (a dropped mount, a network read)
and a cube locked by another writer. Bad input (``ValueError`` subclasses naming the file) fails at
once. The expensive pure tasks (a tile's forecast, the anomaly scores) are cached on their inputs
(cube path and Icechunk snapshot id, model fingerprint, dates, options) plus the task's source code,
with results persisted under ``STATE_DIR/results`` for 24 h: a re-run of a killed flow reuses them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import xarray as xr
from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.tasks import exponential_backoff

from flows.settings import DASK_ADDRESS_ENV, RETRIES, local_cluster_kwargs, retry_backoff_s

RESULT_TTL = timedelta(hours=24)


def is_transient(exc: BaseException | None) -> bool:
    """True for errors worth retrying: OS-level I/O errors and a cube held by another writer."""
    from geowm.cube.store import CubeError

    if isinstance(exc, OSError):
        return True
    return isinstance(exc, CubeError) and "another process is writing" in str(exc)


def retry_transient(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's retry_condition_fn signature
    """Prefect ``retry_condition_fn``: retry only when the failure is transient (see :func:`is_transient`)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as err:  # noqa: BLE001 - we only classify it
            exc = err
    return is_transient(exc)


# I/O tasks always run (never cached, even with PREFECT_RESULTS_PERSIST_BY_DEFAULT: the cube changes under them)
IO = dict(retries=RETRIES, retry_delay_seconds=exponential_backoff(backoff_factor=retry_backoff_s()),
          retry_jitter_factor=0.2, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
CACHED = dict(cache_policy=INPUTS + TASK_SOURCE, persist_result=True, cache_expiration=RESULT_TTL)


def default_ingest_scheduler() -> str:
    """Where ingest blocks run: the existing Dask cluster in ``GEOWM_DASK_ADDRESS``, else ``"local"``: a
    cluster of threads in the flow process, bound to 127.0.0.1, for the duration of the ingest."""
    return os.environ.get(DASK_ADDRESS_ENV, "").strip() or "local"


def model_key(run: str | Path) -> str:
    """Fingerprint (SHA-256, 16 hex) of a run's config, checkpoint and probes: changes when it is retrained."""
    run = Path(run)
    if not (run / "config.json").is_file():
        from geowm.train import RunError

        raise RunError(f"{run}: not a geowm run directory (no config.json); train one with geowm train")
    h = hashlib.sha256()
    for name in ("config.json", "checkpoint.json", "probes.json", "probes.safetensors"):
        p = run / name
        h.update(name.encode())
        h.update(p.read_bytes() if p.is_file() else b"-")
    return h.hexdigest()[:16]


def model_patch(run: str | Path) -> int:
    """The model's patch size in pixels (from the run's config.json)."""
    return int(json.loads((Path(run) / "config.json").read_text())["model"]["patch"])


@functools.lru_cache(maxsize=2)
def _world_model(run: str, key: str, device: str, precision: str = "fp32"):  # noqa: ARG001 - key: retraining
    from geowm.inference import WorldModel

    return WorldModel(run, device, precision)


# ------------------------------------------------------------------------------------------ cube I/O


@task(name="cube-state", **IO)
def cube_state(cube: str) -> dict:
    """What the cube holds now: ``exists``, ``snapshot``, ``times`` (ISO, sorted), ``scenes`` ({id, datetime})."""
    from geowm.cube.store import cube_exists, read_state

    if not cube_exists(cube):
        return {"exists": False, "snapshot": None, "times": [], "scenes": []}
    state = read_state(cube)
    return {"exists": True, "snapshot": state.snapshot, "times": [str(t) for t in state.times],
            "scenes": [{"id": s["id"], "datetime": s["datetime"]} for s in state.sources]}


def stac_search(search: dict | None, cube: str):
    """The STAC API search of a scheduled ingest (:class:`geowm.stacsource.StacSearch`), or None.

    ``search``: ``collections`` (ids), ``bbox`` (degrees), ``start`` (the first date to ingest), ``max_cloud``,
    ``max_items``, ``sign`` (tokens are fetched anew each tick). Its window runs from the cube's last date
    (``start`` while the cube is empty) to now, so each tick asks only for what is new; the items of the last date
    come back and are skipped by id."""
    if not search:
        return None
    from geowm.stacsource import StacSearch, collections_of

    unknown = set(search) - {"collections", "bbox", "start", "max_cloud", "max_items", "sign"}
    if unknown:
        raise ValueError(f"search: unknown keys {sorted(unknown)} (collections, bbox, start, max_cloud, max_items, "
                         "sign)")
    times = cube_state.fn(cube)["times"] if cube else []
    start = str(times[-1])[:10] if times else search.get("start")
    bbox = search.get("bbox")
    return StacSearch(collections_of(search.get("collections")), tuple(bbox) if bbox else None,
                      f"{start}/.." if start else None, search.get("max_cloud"),
                      int(search.get("max_items") or 1000), search.get("sign"))


@task(name="discover-scenes", **IO)
def discover_scenes(source: str, search: dict | None = None, cube: str | None = None) -> list[dict]:
    """Scenes of a watched folder or STAC catalog, or of a STAC API searched from ``cube``'s last date
    (:func:`stac_search`) (``{id, datetime}``, by date); reads headers only.

    A watched folder that exists but holds no raster or SAFE archive yet has no scenes (a normal state before
    the first delivery), and so has a search that matches no item yet; a missing folder or catalog is an error
    naming the path."""
    from geowm.sources import ARCHIVE_SUFFIXES, NETCDF_SUFFIXES, RASTER_SUFFIXES, ZARR_SUFFIXES, discover
    from geowm.stacsource import NoItems

    if search:
        query = stac_search(search, cube or "")
        try:
            scenes = discover(source, search=query)
        except NoItems as exc:
            get_run_logger().info("no new item yet: %s", exc)
            return []
        get_run_logger().info("%d item(s) from %s (%s)", len(scenes), source, query.describe())
        return [{"id": s.id, "datetime": s.datetime.isoformat()} for s in scenes]
    path = Path(source)
    kinds = RASTER_SUFFIXES + ARCHIVE_SUFFIXES + NETCDF_SUFFIXES
    if path.is_dir() and not any(p.suffix.lower() in kinds if p.is_file() else p.suffix.lower() in ZARR_SUFFIXES
                                 for p in [path, *path.rglob("*")]):
        get_run_logger().warning("no scenes yet in %s", source)
        return []
    scenes = discover(source)
    get_run_logger().info("%d scene(s) in %s", len(scenes), source)
    return [{"id": s.id, "datetime": s.datetime.isoformat()} for s in scenes]


@task(name="ingest", **IO)
def ingest_scenes(source: str, cube: str, scheduler: str = "local", tile_size: int = 256,
                  search: dict | None = None) -> dict:
    """Ingest the scenes of ``source`` (with ``search``: the items a STAC API returns, :func:`stac_search`) not
    yet in ``cube`` (one atomic commit; a re-run changes nothing). A new cube covers the search's bbox.

    ``scheduler``: ``"local"`` (threads in this process, loopback only), a Dask scheduler address, or
    geowm's ``"synchronous"``/``"threads"``."""
    from geowm.cube.ingest import IngestOptions, ingest

    query = stac_search(search, cube)
    opts = IngestOptions(scheduler=scheduler, tile_size=tile_size, search=query, bbox=query.bbox if query else None)
    if scheduler == "local":  # threads in this process, every socket on loopback (geowm's "threads" mode
        from distributed import LocalCluster  # leaves the cluster's HTTP server on all interfaces)

        with LocalCluster(**local_cluster_kwargs(max(1, os.cpu_count() or 1), processes=False)) as cluster:
            report = ingest(source, cube, replace(opts, scheduler=cluster.scheduler_address))
    else:
        report = ingest(source, cube, opts)
    log = get_run_logger()
    if report.changed:
        log.info("ingested %d date(s) into %s in %.1f s (snapshot %s)", len(report.added_times), cube,
                 report.seconds, report.snapshot)
    else:
        log.info("nothing to ingest: %d scene(s) already in %s", len(report.skipped_scenes), cube)
    return {"added_times": report.added_times, "skipped": len(report.skipped_scenes), "snapshot": report.snapshot,
            "seconds": report.seconds}


@task(name="update-catalog", **IO)
def update_stac(catalog: str, cube: str | None = None, source: str | None = None, store: str | None = None,
                alerts: str | None = None) -> str:
    """Keep the STAC catalog current: the cube's new scenes and its state (``cube``), the inits of a forecast
    store (``store``), the alerts and score raster of an alerts folder (``alerts``); returns catalog.json."""
    from catalog.stac import add_alerts, add_forecasts, update_catalog

    root = None
    if cube is not None:
        root = update_catalog(catalog, cube, source)
    if store is not None:
        root = add_forecasts(catalog, store)
    if alerts is not None:
        root = add_alerts(catalog, alerts)
    if root is None:
        raise ValueError("update_stac: nothing to catalogue (give a cube, a forecast store or an alerts folder)")
    return str(root)


# ------------------------------------------------------------------------------------------ forecasts


def tile_boxes(cube: str, snapshot: str | None, tile_px: int, patch: int) -> list[tuple[float, float, float, float]]:
    """Bounding boxes (minx, miny, maxx, maxy in the cube CRS) of ``tile_px`` square tiles covering the
    cube; tiles narrower than one patch (which a whole-cube forecast crops away too) are left out."""
    from geowm.cube.store import open_cube

    if tile_px < patch or tile_px % patch:
        raise ValueError(f"tile_px {tile_px}: must be a multiple of the model's {patch} px patch")
    ds = open_cube(cube, snapshot)
    x, y = ds["x"].values, ds["y"].values
    q = abs(float(x[1] - x[0])) / 4 if len(x) > 1 else 0.25
    usable_h, usable_w = len(y) // patch * patch, len(x) // patch * patch
    boxes = []
    for r in range(0, usable_h, tile_px):
        for c in range(0, usable_w, tile_px):
            ys, xs = y[r: min(r + tile_px, usable_h)], x[c: min(c + tile_px, usable_w)]
            boxes.append((float(xs.min()) - q, float(ys.min()) - q, float(xs.max()) + q, float(ys.max()) + q))
    return boxes


@task(name="forecast-tile", retries=1, retry_condition_fn=retry_transient, **CACHED)
def forecast_tile(cube: str, snapshot: str, model: str, model_fingerprint: str, bbox: tuple, init: str,
                  leads: list[float], members: int, device: str = "cpu", precision: str = "fp32") -> xr.Dataset:
    """The forecast dataset (geowm.forecast.forecast) of one tile of the cube at a fixed snapshot."""
    from geowm.cube.store import open_cube
    from geowm.forecast import forecast

    ds = open_cube(cube, snapshot)
    ds.attrs["geowm:cube"] = cube
    wm = _world_model(str(model), model_fingerprint, device, precision)
    # Read the tile in this task with local threads: xarray computing through the Dask cluster from inside
    # a task secedes the worker thread, and then Prefect loses the persisted result of the next task run
    # on that worker (seen with prefect 3.9 + prefect-dask 0.3.7: its cache entry was never written).
    with dask.config.set(scheduler="threads"):
        return forecast(ds, wm, init=init, leads=leads, bbox=bbox, members=members)


def combine_tiles(parts: list[xr.Dataset]) -> xr.Dataset:
    """One forecast dataset from per-tile forecasts of the same init and leads (tiles must not overlap)."""
    if not parts:
        raise ValueError("no tile forecasts to combine")
    first = parts[0]
    for p in parts[1:]:
        if not (np.array_equal(p["init_time"].values, first["init_time"].values)
                and np.array_equal(p["lead_time"].values, first["lead_time"].values)):
            raise ValueError("tile forecasts of different inits or leads cannot be combined")
    spatial = ("y", "x", "py", "px")
    full = {}
    for d in spatial:
        vals = np.unique(np.concatenate([p[d].values for p in parts]))
        descending = len(first[d]) > 1 and first[d].values[0] > first[d].values[-1]
        full[d] = vals[::-1] if descending else vals
    index = {d: pd.Index(full[d]) for d in spatial}
    data = {}
    for name, var in first.data_vars.items():
        shape = [len(full[d]) if d in spatial else n for d, n in zip(var.dims, var.shape, strict=True)]
        fill = np.nan if np.issubdtype(var.dtype, np.floating) else 0
        out = np.full(shape, fill, var.dtype)
        for p in parts:
            pv = p[name]
            idx = [index[d].get_indexer(p[d].values) if d in spatial else np.arange(n)
                   for d, n in zip(pv.dims, pv.shape, strict=True)]
            out[np.ix_(*idx)] = pv.values
        data[name] = xr.Variable(var.dims, out, var.attrs)
    coords = {k: v for k, v in first.coords.items() if not set(v.dims) & set(spatial)}
    coords.update({d: (d, full[d], first[d].attrs) for d in spatial})
    return xr.Dataset(data, coords=coords, attrs=dict(first.attrs))


@task(name="write-forecast", **IO)
def write_forecast(fc: xr.Dataset, store: str) -> str:
    """Add (or replace) the forecast's init in the forecast store; returns the commit id."""
    from geowm.forecast_store import write_forecasts

    commit = write_forecasts(fc, store)
    get_run_logger().info("forecast init %s -> %s (commit %s)", str(fc["init_time"].values[0])[:19], store, commit)
    return commit


# ------------------------------------------------------------------------------------------ anomalies


@task(name="score-anomalies", retries=1, retry_condition_fn=retry_transient, **CACHED)
def score_anomalies(cube: str, snapshot: str, model: str, model_fingerprint: str, start: str,
                    history_days: float, device: str = "cpu", record: str | None = None,
                    precision: str = "fp32") -> xr.Dataset:
    """Anomaly scores (geowm.anomaly.detect) of the acquisitions from ``start`` on, on the patch grid.

    ``record``: the surprise record (``ALERTS/surprise.zarr``) the acquisitions scored at earlier ticks are taken
    from, the history included, and that is updated: a tick encodes its new acquisitions and their year-ago
    references only."""
    from geowm.anomaly import detect
    from geowm.cube.store import open_cube

    ds = open_cube(cube, snapshot)
    ds.attrs["geowm:cube"] = cube
    wm = _world_model(str(model), model_fingerprint, device, precision)
    with dask.config.set(scheduler="threads"):  # as forecast_tile: never sub-tasks from inside a task
        scores, _ = detect(ds, wm, start, history_days=history_days,  # alerts: from the merged record below
                           record=record)
        return scores.load()


def merge_scores(old: xr.Dataset | None, new: xr.Dataset, where: str) -> xr.Dataset:
    """The score record (dims time, y, x) with ``new`` (time, py, px) added; its dates replace old ones."""
    new = new.rename(py="y", px="x")
    if old is None:
        return new
    if not (old.sizes["y"] == new.sizes["y"] and old.sizes["x"] == new.sizes["x"]
            and np.allclose(old["y"].values, new["y"].values) and np.allclose(old["x"].values, new["x"].values)):
        raise ValueError(f"{where}: holds scores on another grid ({old.sizes['y']} x {old.sizes['x']} patches) "
                         f"than the new ones ({new.sizes['y']} x {new.sizes['x']}); use another alerts folder")
    old = old.load()
    keep = old.sel(time=~old["time"].isin(new["time"].values))
    merged = xr.concat([keep, new], dim="time", coords="minimal", compat="override").sortby("time")
    merged.attrs = {**new.attrs, "geowm:from": str(merged["time"].values[0])[:19]}
    return merged


@task(name="publish-alerts", **IO)
def publish_alerts(scores: xr.Dataset, alerts_dir: str, cube: str, snapshot: str, threshold: float,
                   confirm_threshold: float, confirmations: int = 2, min_area_ha: float = 1.0) -> dict:
    """Merge the new scores into ``alerts_dir/scores.zarr`` and rewrite the alerts of the whole record.

    Alerts are recomputed from every score since the pipeline began (confirmation needs the
    observations on both sides of a tick), so an event confirmed across two ticks is one alert with
    a stable id. Returns ``{"n_alerts", "ids", "new_ids", "n_dates"}``.
    """
    from geowm.alerts import AlertRules, alerts_from_scores, open_alerts, write_alerts
    from geowm.anomaly import open_scores, write_scores
    from geowm.cube.store import open_cube

    out = Path(alerts_dir)
    path = out / "scores.zarr"
    old = open_scores(path) if path.is_dir() else None
    merged = merge_scores(old, scores, str(path))
    for v in merged.variables.values():
        v.encoding = {}
    before = set(open_alerts(out)["id"]) if (out / "alerts.parquet").exists() else set()
    ds = open_cube(cube, snapshot)
    t0 = merged["time"].values[0] - np.timedelta64(120, "D")  # the type guess looks up to 120 days back
    obs = ds[["reflectance", "valid"]].sel(time=slice(t0, None))
    crs = ds["spatial_ref"].attrs.get("crs_wkt")
    rules = AlertRules(threshold=threshold, confirm_threshold=confirm_threshold, confirmations=confirmations,
                       min_area_ha=min_area_ha)
    alerts = alerts_from_scores(merged["score"], crs, rules, obs=obs)
    write_scores(merged.rename(y="py", x="px"), path)
    write_alerts(alerts, out)
    ids = [str(i) for i in alerts["id"]]
    get_run_logger().info("%d alert(s) (%d new) from %d scored date(s) -> %s", len(ids),
                          len(set(ids) - before), merged.sizes["time"], out)
    return {"n_alerts": len(ids), "ids": ids, "new_ids": sorted(set(ids) - before), "n_dates": merged.sizes["time"]}


def prune_results(results: str | Path, older_than_s: float = RESULT_TTL.total_seconds()) -> int:
    """Delete persisted task results older than ``older_than_s`` seconds; returns how many."""
    root = Path(results)
    if not root.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    n = 0
    for p in root.iterdir():
        if p.is_file() and p.stat().st_mtime < cutoff:
            p.unlink(missing_ok=True)
            n += 1
    return n


# ------------------------------------------------------------------------------------------ training


@task(name="train-model", retries=1, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def train_model(cube: str, run: str, config: dict, landcover: str | None = None, device: str = "auto",
                eval_windows: int = 64) -> dict:
    """Train a run (geowm.train.train) and evaluate it; resumes an interrupted run, skips a finished one.

    ``config`` holds :class:`geowm.train.TrainConfig` keys (e.g. ``{"preset": "tiny", "steps": 400}``);
    ``eval_windows`` held-out windows score the run afterwards.
    After the probes, the run's climatology blend is fitted (:func:`geowm.calibrate.fit_calibration`).
    Returns ``{"run", "step", "total_steps", "trained", "eval", "calibration"}``.
    """
    from geowm.train import TrainConfig, evaluate_run, train

    log = get_run_logger()
    path = Path(run)
    cfg = TrainConfig.from_dict(dict(config))
    ckpt = path / "checkpoint.json"
    meta = json.loads(ckpt.read_text()) if ckpt.is_file() else None
    trained = False
    if meta is None or int(meta["step"]) < int(meta["total_steps"]):
        resume = meta is not None
        log.info("%s run %s on %s", "resuming" if resume else "training", path, cube)
        train(cube, path, cfg, resume=resume)
        meta = json.loads(ckpt.read_text())
        trained = True
    else:
        log.info("run %s already trained (%d steps); not retraining", path, meta["step"])
    if trained or not (path / "eval.json").is_file():
        from geowm.calibrate import fit_calibration

        report = evaluate_run(path, landcover=landcover, n_windows=eval_windows, device=device)
        fit_calibration(path)
    else:
        report = json.loads((path / "eval.json").read_text())
    cal = path / "calibration.json"
    return {"run": str(path), "step": int(meta["step"]), "total_steps": int(meta["total_steps"]), "trained": trained,
            "eval": report, "calibration": json.loads(cal.read_text()) if cal.is_file() else None}
