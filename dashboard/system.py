"""The system panel: how fresh the workdir is, which model made the forecasts, and the latest Prefect flow runs."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from dashboard.data import Sources

PREFECT_TIMEOUT_S = 1.0  # the Prefect API must answer within this, or the panel says it is not reachable


def _day(t) -> str:
    return str(np.datetime64(t, "s")).replace("T", " ") + " UTC"


def system_status(src: Sources) -> dict[str, str]:
    """Freshness and provenance as label -> text: last ingested acquisition, last forecast init, model run."""
    out: dict[str, str] = {"workdir": str(src.workdir.root)}
    if src.cube is not None:
        times = src.cube["time"].values
        out["last ingested acquisition"] = _day(times[-1]) if len(times) else "none"
        out["acquisitions in cube"] = str(len(times))
        out["cube snapshot"] = str(src.cube.attrs.get("geowm:snapshot", "?"))
    else:
        out["cube"] = src.notes.get("cube", "none")
    fc = src.forecasts
    if fc is not None:
        inits = fc["init_time"].values
        out["last forecast init"] = _day(inits.max()) if len(inits) else "none"
        out["forecast inits"] = str(len(inits))
        out["lead times (days)"] = ", ".join(f"{v / np.timedelta64(1, 'D'):g}" for v in fc["lead_time"].values)
        out["model run id"] = str(fc.attrs.get("geowm:run_id", "?"))
        out["model run"] = str(fc.attrs.get("geowm:model_run", "?"))
        out["forecast store snapshot"] = str(fc.attrs.get("geowm:store_snapshot", "?"))
    else:
        out["forecasts"] = src.notes.get("forecasts", "none")
    if src.alerts is not None:
        out["alerts"] = str(len(src.alerts))
        path = src.workdir.paths["alerts"]
        files = [p for p in (path / "alerts.parquet", path / "alerts.geojson") if p.exists()]
        if files:
            when = dt.datetime.fromtimestamp(max(p.stat().st_mtime for p in files), tz=dt.UTC)
            out["alerts written"] = when.strftime("%Y-%m-%d %H:%M:%S UTC")
    else:
        out["alerts"] = src.notes.get("alerts", "none")
    if src.scores is not None and src.scores.sizes.get("time"):
        out["last scored acquisition"] = _day(src.scores["time"].values[-1])
    return out


def prefect_runs(api_url: str | None, timeout: float = PREFECT_TIMEOUT_S, limit: int = 10) -> tuple[str, pd.DataFrame]:
    """The latest ``limit`` flow runs (newest start first) from the Prefect API at ``api_url``.

    Returns (a one-line status, a table with flow, run, state, start, end, duration_s). Never raises:
    without a URL, or when the API does not answer within ``timeout`` seconds, the table is empty and
    the status says so.
    """
    cols = ["flow", "run", "state", "start", "end", "duration_s"]
    if not api_url:
        return "Prefect API not configured (set PREFECT_API_URL to show flow runs)", pd.DataFrame(columns=cols)
    import httpx

    url = api_url.rstrip("/")
    try:
        httpx.get(f"{url}/health", timeout=timeout).raise_for_status()
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return f"Prefect API not reachable at {url} ({type(exc).__name__})", pd.DataFrame(columns=cols)
    try:
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.sorting import FlowRunSort

        with SyncPrefectClient(url, httpx_settings={"timeout": max(timeout, 5.0)}) as client:
            runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=limit)
            names = {fid: client.read_flow(fid).name for fid in {r.flow_id for r in runs}}
    except Exception as exc:  # noqa: BLE001 - a panel, never a traceback
        return f"Prefect API at {url} answered, but flow runs could not be read: {exc}", pd.DataFrame(columns=cols)
    rows = [{"flow": names.get(r.flow_id, str(r.flow_id)), "run": r.name,
             "state": r.state.name if r.state else "?", "start": r.start_time, "end": r.end_time,
             "duration_s": round(r.total_run_time.total_seconds(), 1) if r.total_run_time else None} for r in runs]
    return f"Prefect API at {url}: {len(rows)} latest flow run(s)", pd.DataFrame(rows, columns=cols)
