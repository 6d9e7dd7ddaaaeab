"""geowm's Prefect flows: ingest, train, forecast, the scheduled pipeline and the new-scenes simulator.

``pipeline_flow`` is one tick of the living system::

    discover new scenes -> ingest -> forecast (init = the cube's last date, one task per tile on Dask)
    -> anomaly scores of the new acquisitions -> alerts of the whole record
    -> STAC catalog (the new scenes, the cube, the forecast store's inits, the alerts and score raster)

Nothing is processed twice: the ledger (:mod:`flows.ledger`) records the scenes a run finished,
ingest skips scenes already in the cube, the forecast store replaces an init that is written again,
and the scores of re-scored dates replace the old ones. A run that finds nothing new completes at
once with ``{"nothing_new": true}``. The surprise record ``ALERTS/surprise.zarr`` keeps what every tick
encoded, the history included, so a tick encodes its new acquisitions and their year-ago references only
(``geowm.anomaly.detect``'s ``record``).

Outputs a dashboard reads: the cube, the forecast store, ``ALERTS/alerts.geojson``,
``ALERTS/alerts.parquet`` and ``ALERTS/scores.zarr`` (the merged record: ``geowm.open_alerts(ALERTS)``,
``geowm.open_scores(ALERTS)``), ``STATE_DIR/ledger.json`` (which run processed which scene).

Per-tile parallelism: the flows run their tile tasks on ``prefect_dask.DaskTaskRunner``: a local
cluster on 127.0.0.1, or the existing cluster in ``GEOWM_DASK_ADDRESS`` (see :mod:`flows.settings`).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from catalog.stac import default_catalog_dir
from flows import ledger
from flows import tasks as t
from flows.settings import FORECAST_FLOW, INGEST_FLOW, PIPELINE_FLOW, SIMULATE_FLOW, TRAIN_FLOW, dask_runner_options

DEFAULT_LEADS = [5.0, 10.0, 20.0, 30.0]
# the local Dask cluster's INFO chatter (every connection, worker start and stop) would drown each run's log
logging.getLogger("distributed").setLevel(logging.WARNING)


def _local(path: str, what: str) -> Path:
    if "://" in str(path):
        raise ValueError(f"{path}: give a local --{what} folder for cubes on object storage")
    return Path(path).parent


def default_state_dir(cube: str) -> Path:
    """Where a cube's pipeline keeps its ledger and persisted task results: ``pipeline`` beside the cube."""
    return _local(cube, "state-dir") / "pipeline"


def default_catalog(cube: str) -> Path:
    """The STAC catalog beside a local cube (``catalog.stac.default_catalog_dir``, as ``geowm ingest`` uses)."""
    path = default_catalog_dir(cube)
    if path is None:
        raise ValueError(f"{cube}: give a local --catalog folder for cubes on object storage")
    return path


@flow(name=INGEST_FLOW)
def ingest_flow(source: str, cube: str, catalog: str | None = None, scheduler: str | None = None,
                tile_size: int = 256, search: dict | None = None) -> dict:
    """Ingest the new scenes of a folder of GeoTIFFs or a STAC catalog (with ``search``: the new items of the STAC
    API at ``source``, :func:`flows.tasks.stac_search`) into a cube, then update the STAC catalog (default:
    ``catalog`` beside the cube). Re-running changes nothing."""
    report = t.ingest_scenes(source, cube, scheduler or t.default_ingest_scheduler(), tile_size, search)
    if report["added_times"]:
        report["catalog"] = t.update_stac(str(catalog or default_catalog(cube)), cube, source)
    return report


@flow(name=TRAIN_FLOW)
def train_flow(cube: str, run: str, preset: str = "tiny", steps: int | None = 400, minutes: float | None = None,
               train_until: str | None = None, landcover: str | None = None, device: str = "auto",
               config: dict | None = None, eval_windows: int = 64) -> dict:
    """Train (or resume, or skip when finished) a model run on a cube, then fit its probes and score it.

    ``steps`` optimizer steps, or ``minutes`` of wall-clock budget instead; ``config`` adds other
    :class:`geowm.train.TrainConfig` keys. Multi-GPU: ``geowm train`` under torchrun (infra/README.md).
    """
    cfg = {**(config or {}), "preset": preset, "device": device}
    if minutes is not None:  # a wall-clock budget replaces the step count
        steps = None
    cfg.update({k: v for k, v in (("steps", steps), ("minutes", minutes), ("train_until", train_until))
                if v is not None})
    return t.train_model(cube, run, cfg, landcover=landcover, device=device, eval_windows=eval_windows)


def _forecast_tiles(cube: str, snapshot: str, model: str, init: str, leads: list[float], members: int,
                    tile_px: int | None, device: str, precision: str, results: Path) -> tuple:
    """Submit one forecast task per tile, combine the tiles; returns (dataset, n tiles, n cached).
    Tile results persist under ``results`` (the cache a re-run reuses)."""
    from geowm.cube.store import read_state

    key = t.model_key(model)  # first: a missing or foreign run directory fails here with a clear message
    patch = t.model_patch(model)
    size = tile_px or read_state(cube).grid.tile_size
    boxes = t.tile_boxes(cube, snapshot, size, patch)
    tile_task = t.forecast_tile.with_options(result_storage=results)
    futures = [tile_task.submit(cube, snapshot, str(model), key, box, init, list(leads), members, device, precision)
               for box in boxes]
    parts = [f.result() for f in futures]
    cached = sum(1 for f in futures if f.state.name == "Cached")
    get_run_logger().info("forecast init %s: %d tile(s) of %d px, %d from cache", init, len(boxes), size, cached)
    return t.combine_tiles(parts), len(boxes), cached


@flow(name=FORECAST_FLOW, task_runner=DaskTaskRunner(**dask_runner_options()))
def forecast_flow(cube: str, model: str, store: str, init: str | None = None, leads: list[float] | None = None,
                  members: int = 4, tile_px: int | None = None, state_dir: str | None = None,
                  device: str = "cpu", catalog: str | None = None, precision: str = "fp32") -> dict:
    """Forecast one init (default: the cube's last date) tile by tile, write it to the forecast store and
    add the store's inits to the STAC catalog (default: ``catalog`` beside a local cube).

    Tiles are ``tile_px`` squares (default: the cube's tile size); a tile's forecast is cached on
    (cube snapshot, model fingerprint, init, leads, members), so a re-run only recomputes missing tiles.
    """
    state = t.cube_state(cube)
    if not state["exists"]:
        raise ValueError(f"{cube}: no geowm cube here; ingest scenes first (ingest_flow or geowm ingest)")
    results = Path(state_dir or default_state_dir(cube)) / "results"
    init = init or state["times"][-1]
    fc, n_tiles, cached = _forecast_tiles(cube, state["snapshot"], model, init, list(leads or DEFAULT_LEADS),
                                          members, tile_px, device, precision, results)
    commit = t.write_forecast(fc, store)
    cat_dir = catalog or default_catalog_dir(cube)  # none beside a cube on object storage unless given
    cat = t.update_stac(str(cat_dir), store=store) if cat_dir else None
    return {"init": init, "tiles": n_tiles, "tiles_cached": cached, "commit": commit, "store": store,
            "catalog": cat}


@flow(name=PIPELINE_FLOW, task_runner=DaskTaskRunner(**dask_runner_options()))
def pipeline_flow(source: str, cube: str, model: str, store: str, alerts: str, state_dir: str | None = None,
                  catalog: str | None = None, leads: list[float] | None = None, members: int = 4,
                  history_days: float = 365.0, threshold: float = 5.0, confirm_threshold: float = 4.0,
                  confirmations: int = 2, min_area_ha: float = 1.0, tile_px: int | None = None,
                  ingest_scheduler: str | None = None,
                  device: str = "cpu", search: dict | None = None, precision: str = "fp32") -> dict:
    """One tick: new scenes of ``source`` -> cube -> forecast -> anomaly scores -> alerts -> STAC catalog.

    Args:
        source: the watched folder of GeoTIFFs or STAC catalog/collection JSON, or with ``search`` the URL of
            a STAC API.
        search: ``{collections, bbox, start, max_cloud, max_items}``: each tick searches the API for the items
            from the cube's last date (``start`` for an empty cube) on (:func:`flows.tasks.stac_search`).
        cube, model, store, alerts: the cube, the trained run directory, the forecast store and the
            alerts folder (``alerts.geojson``, ``alerts.parquet``, ``scores.zarr``, ``surprise.zarr``).
        state_dir: the ledger and persisted task results (default: ``pipeline`` beside the cube).
        catalog: STAC catalog folder (default ``catalog`` beside the cube).
        leads: forecast lead times in days; members: ensemble size.
        history_days: days before the first new acquisition scored as each patch's history.
        threshold, confirm_threshold, confirmations, min_area_ha: alert rule (robust z units, hectares;
            geowm.alerts.AlertRules).
        tile_px: forecast tile size in pixels (default: the cube's tile size).
        device, precision: where and in what arithmetic the model runs (geowm.inference: fp32, bf16, tf32 on
            CUDA, or auto).

    Returns the run's ledger record: ``scenes`` processed (ids) and their ``dates``, ``init``,
    ``acquisitions_encoded`` and ``acquisitions_reused`` (from the surprise record; history included),
    ``n_alerts`` and ``new_alert_ids``, or ``nothing_new: True``.
    """
    log = get_run_logger()
    work = Path(state_dir) if state_dir else default_state_dir(cube)
    started = datetime.now(UTC)
    run_id = str(flow_run.id or "local")
    record = {"run": f"{started:%Y%m%dT%H%M%S}-{run_id[:8]}", "flow_run_id": run_id,
              "started": started.isoformat(), "scenes": []}
    with ledger.state_lock(work):
        before = t.cube_state(cube)
        doc = ledger.start(work, cube, [s["id"] for s in before["scenes"]])
        found = t.discover_scenes(source, search, cube)
        known = {s["id"] for s in before["scenes"]}
        unseen = [s["id"] for s in found if s["id"] not in known]
        record["ingested"] = []
        if unseen:
            report = t.ingest_scenes(source, cube, ingest_scheduler or t.default_ingest_scheduler(), 256, search)
            record["ingested"] = report["added_times"]
        state = t.cube_state(cube) if unseen else before
        todo = ledger.pending(doc, state["scenes"])
        if not todo:
            log.info("nothing new: %d scene(s) in %s, all in the cube and processed", len(found), source)
            record.update(nothing_new=True, finished=datetime.now(UTC).isoformat())
            ledger.commit(work, doc, record)
            return record
        log.info("%d new scene(s): %s .. %s", len(todo), todo[0]["datetime"], todo[-1]["datetime"])
        init = state["times"][-1]
        results = work / "results"
        fc, n_tiles, cached = _forecast_tiles(cube, state["snapshot"], model, init, list(leads or DEFAULT_LEADS),
                                              members, tile_px, device, precision, results)
        commit = t.write_forecast(fc, store)
        start = str(np.datetime64(todo[0]["datetime"].replace("+00:00", ""), "s"))
        score_task = t.score_anomalies.with_options(result_storage=results)
        scores = score_task(cube, state["snapshot"], str(model), t.model_key(model), start, history_days, device,
                            str(Path(alerts) / "surprise.zarr"), precision)
        published = t.publish_alerts(scores, alerts, cube, state["snapshot"], threshold, confirm_threshold,
                                     confirmations, min_area_ha)
        cat = t.update_stac(str(catalog or default_catalog(cube)), cube, source, store, alerts)
        record.update(scenes=[s["id"] for s in todo], dates=[s["datetime"] for s in todo], init=init,
                      snapshot=state["snapshot"], forecast_commit=commit, tiles=n_tiles, tiles_cached=cached,
                      scored_from=start, acquisitions_encoded=int(scores.attrs.get("geowm:computed_dates", -1)),
                      acquisitions_reused=int(scores.attrs.get("geowm:reused_dates", -1)),
                      n_alerts=published["n_alerts"], new_alert_ids=published["new_ids"],
                      catalog=cat, finished=datetime.now(UTC).isoformat())
        ledger.commit(work, doc, record)
        t.prune_results(results)
    log.info("processed %d scene(s); forecast init %s; %d alert(s), %d new", len(todo), init,
             published["n_alerts"], len(published["new_ids"]))
    return record


@flow(name=SIMULATE_FLOW)
def simulate_flow(archive: str, watched: str, days: float = 5.0, stac: bool = False) -> dict:
    """Advance the new-scenes simulator by ``days`` and release the archive scenes that became visible
    into ``watched`` (see :mod:`flows.simulator`)."""
    from flows.simulator import advance

    report = advance(archive, watched, days=days, stac=stac)
    get_run_logger().info("simulated today %s: %d new scene(s), %d still to come", report["today"],
                          len(report["released"]), report["n_remaining"])
    return report
