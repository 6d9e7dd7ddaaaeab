"""Names, ports and environment variables shared by the flows, ``geowm serve`` and ``infra/``.

``infra/docker-compose.yml`` and ``infra/prefect.yaml`` use these exact names (tests check it), so a
container reaches the Prefect API and the Dask scheduler by the compose service names below.
"""

from __future__ import annotations

import logging
import os

# --- Prefect ---------------------------------------------------------------------------------------
PREFECT_PORT = 4200
LOCAL_PREFECT_API_URL = f"http://127.0.0.1:{PREFECT_PORT}/api"  # `prefect server start --host 127.0.0.1`
COMPOSE_PREFECT_SERVICE = "prefect-server"  # docker-compose service running `prefect server start`

# flow names (``@flow(name=...)``) and deployment names (``flow.to_deployment(name=...)``, prefect.yaml)
INGEST_FLOW = "geowm-ingest"
TRAIN_FLOW = "geowm-train"
FORECAST_FLOW = "geowm-forecast"
PIPELINE_FLOW = "geowm-pipeline"
SIMULATE_FLOW = "geowm-simulate"
DEPLOYMENTS = {  # deployment name -> (flow name, entrypoint)
    "pipeline": (PIPELINE_FLOW, "flows/pipeline.py:pipeline_flow"),
    "ingest": (INGEST_FLOW, "flows/pipeline.py:ingest_flow"),
    "forecast": (FORECAST_FLOW, "flows/pipeline.py:forecast_flow"),
    "train": (TRAIN_FLOW, "flows/pipeline.py:train_flow"),
    "simulate": (SIMULATE_FLOW, "flows/pipeline.py:simulate_flow"),
}
WORK_POOL = "geowm-process"  # infra/prefect.yaml: a `process` work pool served by `prefect worker start`

# --- Dask ------------------------------------------------------------------------------------------
DASK_ADDRESS_ENV = "GEOWM_DASK_ADDRESS"  # tcp://host:8786 of an existing cluster; unset = local cluster
DASK_WORKERS_ENV = "GEOWM_DASK_WORKERS"  # local cluster: worker count (default: min(4, cores))
DASK_PROCESSES_ENV = "GEOWM_DASK_PROCESSES"  # local cluster: 1 = worker processes (default), 0 = threads
DASK_SCHEDULER_PORT = 8786
COMPOSE_DASK_SERVICE = "dask-scheduler"  # docker-compose service running `dask scheduler`
COMPOSE_DASK_ADDRESS = f"tcp://{COMPOSE_DASK_SERVICE}:{DASK_SCHEDULER_PORT}"

# --- retries ---------------------------------------------------------------------------------------
RETRIES = 3  # I/O tasks: attempts after the first
RETRY_BACKOFF_ENV = "GEOWM_RETRY_BACKOFF_S"  # first retry delay in seconds (then x2, x4); default 2


def retry_backoff_s() -> float:
    """First retry delay of I/O tasks in seconds (``GEOWM_RETRY_BACKOFF_S``, default 2)."""
    text = os.environ.get(RETRY_BACKOFF_ENV, "2")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{RETRY_BACKOFF_ENV}={text!r}: expected a number of seconds") from None
    if value < 0:
        raise ValueError(f"{RETRY_BACKOFF_ENV}={text!r}: must be >= 0")
    return value


def dask_runner_options() -> dict:
    """Keyword arguments for ``prefect_dask.DaskTaskRunner`` from the environment.

    ``GEOWM_DASK_ADDRESS`` set: connect to that existing cluster. Otherwise a ``LocalCluster`` on
    127.0.0.1 (no dashboard) with ``GEOWM_DASK_WORKERS`` workers (default min(4, cores)), worker
    processes unless ``GEOWM_DASK_PROCESSES=0`` (threads in the flow process).
    """
    address = os.environ.get(DASK_ADDRESS_ENV, "").strip()
    if address:
        if "://" not in address:
            raise ValueError(f"{DASK_ADDRESS_ENV}={address!r}: expected a scheduler address like "
                             f"tcp://host:{DASK_SCHEDULER_PORT}")
        return {"address": address}
    workers_text = os.environ.get(DASK_WORKERS_ENV, str(min(4, os.cpu_count() or 1)))
    processes_text = os.environ.get(DASK_PROCESSES_ENV, "1")
    if not workers_text.isdigit() or int(workers_text) < 1:
        raise ValueError(f"{DASK_WORKERS_ENV}={workers_text!r}: expected a positive integer")
    if processes_text not in ("0", "1"):
        raise ValueError(f"{DASK_PROCESSES_ENV}={processes_text!r}: expected 0 or 1")
    processes = processes_text == "1"
    return {"cluster_kwargs": local_cluster_kwargs(int(workers_text), processes)}


def local_cluster_kwargs(n_workers: int, processes: bool) -> dict:
    """``distributed.LocalCluster`` keywords: every listening socket on 127.0.0.1 (scheduler, workers and
    their HTTP servers, on free ports), one thread per worker, quiet logs."""
    kwargs = {"n_workers": n_workers, "threads_per_worker": 1, "processes": processes,
              "dashboard_address": "127.0.0.1:0", "worker_dashboard_address": "127.0.0.1:0",
              "silence_logs": logging.WARNING}
    if processes:
        kwargs["host"] = "127.0.0.1"
    return kwargs
