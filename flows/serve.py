"""Serve geowm's deployments on schedules against a Prefect API (``geowm serve``).

Deployments (flow name / deployment name):

- ``geowm-pipeline/pipeline``: the ingest -> forecast -> alerts tick, on an interval or cron schedule;
- ``geowm-ingest/ingest``, ``geowm-forecast/forecast``, ``geowm-train/train``: on demand
  (``prefect deployment run geowm-forecast/forecast``), with this pipeline's paths as defaults;
- ``geowm-simulate/simulate`` (with ``--simulate-archive``): releases N more days of synthetic scenes
  into the watched folder on the same schedule (the living demo).

The API is ``PREFECT_API_URL``; unset, a local server at http://127.0.0.1:4200/api, started with
``prefect server start --host 127.0.0.1 --port 4200`` (SQLite in ``$PREFECT_HOME``). The flows run
in subprocesses of this one, one at a time (a tick that outlasts the interval delays the next).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from flows.settings import LOCAL_PREFECT_API_URL

SERVER_HINT = ("start a local server with `prefect server start --host 127.0.0.1 --port 4200` (SQLite in "
               "$PREFECT_HOME) and `export PREFECT_API_URL=http://127.0.0.1:4200/api`, or point PREFECT_API_URL "
               "at your server")


class ApiUnreachable(RuntimeError):
    """No Prefect API answers at the configured URL; the message says which URL and how to start one."""


def api_url() -> str:
    """The Prefect API URL to use: ``PREFECT_API_URL`` (environment or Prefect profile), else the local default."""
    from prefect.settings import get_current_settings

    url = os.environ.get("PREFECT_API_URL") or get_current_settings().api.url
    return str(url or LOCAL_PREFECT_API_URL).rstrip("/")


def check_api(url: str | None = None, timeout_s: float = 5.0) -> str:
    """Raise :class:`ApiUnreachable` unless ``{url}/health`` answers; returns the URL checked."""
    url = (url or api_url()).rstrip("/")
    local = urllib.parse.urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")
    opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if local else []))  # no proxy locally
    try:
        with opener.open(f"{url}/health", timeout=timeout_s) as resp:
            body = resp.read().decode(errors="replace")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiUnreachable(f"no Prefect API at {url} ({reason}); {SERVER_HINT}") from None
    if body.strip() not in ("true", "True"):
        raise ApiUnreachable(f"{url}/health answered {body[:80]!r}, not a healthy Prefect API; {SERVER_HINT}")
    return url


@dataclass
class ServeConfig:
    """What ``geowm serve`` deploys. Paths as the flows take them; interval in seconds."""

    source: str
    cube: str
    model: str
    store: str
    alerts: str
    state_dir: str | None = None
    catalog: str | None = None
    interval_s: float | None = 3600.0
    cron: str | None = None
    pipeline: dict = field(default_factory=dict)  # other pipeline_flow parameters (leads, history_days, ...)
    simulate_archive: str | None = None
    simulate_days: float = 5.0


def build_deployments(cfg: ServeConfig) -> list:
    """The RunnerDeployments of :class:`ServeConfig` (module-path entrypoints: ``flows.pipeline.*``)."""
    from prefect.types.entrypoint import EntrypointType

    from flows.pipeline import forecast_flow, ingest_flow, pipeline_flow, simulate_flow, train_flow

    if (cfg.interval_s is None) == (cfg.cron is None):
        raise ValueError("give exactly one schedule: an interval in seconds or a cron expression")
    if cfg.interval_s is not None and cfg.interval_s <= 0:
        raise ValueError(f"interval {cfg.interval_s}: must be > 0 seconds")
    schedule = {"interval": cfg.interval_s} if cfg.interval_s is not None else {"cron": cfg.cron}
    mod = {"entrypoint_type": EntrypointType.MODULE_PATH}
    paths = {k: v for k, v in dict(state_dir=cfg.state_dir, catalog=cfg.catalog).items() if v is not None}
    state = {"state_dir": cfg.state_dir} if cfg.state_dir else {}
    model_run = {k: cfg.pipeline[k] for k in ("device", "precision") if k in cfg.pipeline}  # where and how it runs
    pipe_params = dict(source=cfg.source, cube=cfg.cube, model=cfg.model, store=cfg.store, alerts=cfg.alerts,
                      **paths, **cfg.pipeline)
    deps = [
        pipeline_flow.to_deployment("pipeline", parameters=pipe_params, tags=["geowm"], **schedule, **mod),
        ingest_flow.to_deployment("ingest", parameters=dict(source=cfg.source, cube=cfg.cube,
                                                            **({"catalog": cfg.catalog} if cfg.catalog else {}),
                                                            **({"search": cfg.pipeline["search"]}
                                                               if cfg.pipeline.get("search") else {})),
                                  tags=["geowm"], **mod),
        forecast_flow.to_deployment("forecast", parameters=dict(cube=cfg.cube, model=cfg.model, store=cfg.store,
                                                                **state, **model_run),
                                    tags=["geowm"], **mod),
        train_flow.to_deployment("train", parameters=dict(cube=cfg.cube, run=cfg.model), tags=["geowm"], **mod),
    ]
    if cfg.simulate_archive:
        deps.append(simulate_flow.to_deployment(
            "simulate", parameters=dict(archive=cfg.simulate_archive, watched=cfg.source, days=cfg.simulate_days),
            tags=["geowm", "demo"], **schedule, **mod))
    return deps


def serve(cfg: ServeConfig, url: str | None = None) -> None:
    """Check the API, then serve the deployments until interrupted (SIGINT/SIGTERM)."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = check_api(url)
    deployments = build_deployments(cfg)
    os.environ["PREFECT_API_URL"] = url  # the flow-run subprocesses inherit it, default URL included
    with temporary_settings(updates={PREFECT_API_URL: url}):
        prefect_serve(*deployments, limit=1)
