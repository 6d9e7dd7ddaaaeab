"""The pipeline live: a real ``prefect server start`` with a scheduled deployment fed by the simulator,
and a pipeline run killed mid-way then re-run (no duplicated dates or forecasts).

Both use a small synthetic record (128 px, January to August 2021) replayed by flows.simulator and the
session's ``tiny_run`` model. Every process started here is stopped by its id at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
PIPE = dict(leads=[5.0, 10.0], members=2, history_days=60.0, tile_px=64)


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory) -> Path:
    """A 128 px synthetic record (Jan-Aug 2021), generated once for this module."""
    from flows.simulator import make_archive

    return make_archive(tmp_path_factory.mktemp("archive") / "region", size=128, start="2021-01-01",
                        end="2021-08-31", seed=5)


def _bootstrap(archive: Path, root: Path, until: str) -> dict[str, Path]:
    """Release the record up to ``until`` and ingest it as the cube's history (4 tiles of 64 px)."""
    from flows.simulator import advance
    from geowm.cube import IngestOptions, ingest

    p = {k: root / k for k in ("watched", "cube", "forecasts", "alerts", "pipeline", "catalog")}
    advance(archive, p["watched"], until=until)
    ingest(p["watched"], p["cube"], IngestOptions(scheduler="synchronous", tile_size=64))
    return p


def _params(p: dict[str, Path], model: Path) -> dict:
    return dict(source=str(p["watched"]), cube=str(p["cube"]), model=str(model), store=str(p["forecasts"]),
                alerts=str(p["alerts"]), state_dir=str(p["pipeline"]), catalog=str(p["catalog"]), **PIPE)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               GEOWM_DASK_PROCESSES="0", GEOWM_DASK_WORKERS="2", GEOWM_RETRY_BACKOFF_S="0.2",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO")
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> None:
    """Stop a process we started and every process it started (collected by pid before signalling)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [proc, *children]:
        try:
            p.send_signal(sig)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    try:
        proc.wait(timeout=grace_s)  # reaped by Popen, so its returncode stays readable
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


def _wait(cond, timeout_s: float, what: str, logs: list[Path], every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n" +
                "\n".join(f"--- {p.name} ---\n{_tail(p)}" for p in logs))


def _ledger_runs(state_dir: Path) -> list[dict]:
    path = state_dir / "ledger.json"
    return json.loads(path.read_text())["runs"] if path.exists() else []


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.read().strip() == b"true"
    except OSError:
        return False


def _dates(archive: Path, ids: list[str]) -> list[np.datetime64]:
    from flows.simulator import archive_scenes

    by_id = {s.id: np.datetime64(s.datetime.replace(tzinfo=None), "s") for s in archive_scenes(archive)}
    return [by_id[i] for i in ids]


def test_scheduled_pipeline_on_a_real_prefect_server(small_archive, tiny_run, tmp_path):
    """`prefect server start` (SQLite, 127.0.0.1) + `geowm serve` with a 10 s interval: a scheduled run
    ingests the simulator's new scenes, forecasts from the new last date and raises alerts; after the
    simulator releases more, the next scheduled run processes exactly those."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.simulator import advance
    from geowm import open_alerts, open_forecasts, open_scores
    from geowm.cube.store import read_state

    p = _bootstrap(small_archive, tmp_path, "2021-05-31")
    history = len(read_state(p["cube"]).times)
    batch1 = advance(small_archive, p["watched"], until="2021-06-20")["released"]
    assert batch1

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server_env = _env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
                      PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    procs = []
    try:
        with server_log.open("w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                           "--port", str(port)], env=server_env, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=tmp_path))
        _wait(lambda: _healthy(url), 120, "the Prefect server's /api/health", [server_log])
        cmd = [sys.executable, "-m", "geowm", "serve", "--source", str(p["watched"]), "--cube", str(p["cube"]),
               "--model", str(tiny_run), "--forecasts", str(p["forecasts"]), "--alerts", str(p["alerts"]),
               "--state-dir", str(p["pipeline"]), "--catalog", str(p["catalog"]), "--interval", "10",
               "--leads", "5,10", "--members", "2", "--history-days", "60", "--tile-px", "64",
               # low alert thresholds: the session's model is trained for 6 steps; this checks that alerts
               # are raised and published on schedule, not the detector's quality (test_anomaly.py does)
               "--threshold", "1.2", "--confirm-threshold", "0.8", "--confirmations", "1"]
        with serve_log.open("w") as log:
            procs.append(subprocess.Popen(cmd, env=_env(PREFECT_API_URL=url, PREFECT_HOME=str(tmp_path / "client"),
                                                        PREFECT_RUNNER_POLL_FREQUENCY="2"),
                                          stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        logs = [serve_log, server_log]

        run1 = _wait(lambda: (_ledger_runs(p["pipeline"]) or [None])[0], 240, "the first scheduled run", logs)
        assert run1["scenes"] == batch1
        fr1 = _completed_scheduled_run(url, run1["flow_run_id"], logs)

        times = read_state(p["cube"]).times
        assert len(times) == history + len(batch1) and len(np.unique(times)) == len(times)
        assert set(_dates(small_archive, batch1)) <= set(times)
        inits = open_forecasts(p["forecasts"])["init_time"].values.astype("datetime64[s]")
        assert list(inits) == [times[-1]] and run1["init"] == str(times[-1])
        alerts = open_alerts(p["alerts"])
        assert (p["alerts"] / "alerts.geojson").is_file() and len(alerts) >= 1 and run1["n_alerts"] == len(alerts)
        scored = open_scores(p["alerts"])["time"].values.astype("datetime64[s]")
        assert set(_dates(small_archive, batch1)) <= set(scored)

        batch2 = advance(small_archive, p["watched"], until="2021-07-10")["released"]
        assert batch2 and not set(batch2) & set(batch1)
        run2 = _wait(lambda: (_ledger_runs(p["pipeline"]) + [None, None])[1], 240, "a scheduled run of batch 2", logs)
        assert run2["scenes"] == batch2  # only the new scenes
        fr2 = _completed_scheduled_run(url, run2["flow_run_id"], logs)
        assert fr2.id != fr1.id

        times = read_state(p["cube"]).times
        assert len(times) == history + len(batch1) + len(batch2) and len(np.unique(times)) == len(times)
        inits = open_forecasts(p["forecasts"])["init_time"].values.astype("datetime64[s]")
        assert list(inits) == sorted({np.datetime64(run1["init"]), np.datetime64(run2["init"])})
        assert inits[-1] == times[-1]
        scored = open_scores(p["alerts"])["time"].values.astype("datetime64[s]")
        assert len(np.unique(scored)) == len(scored)
        assert set(_dates(small_archive, batch1 + batch2)) <= set(scored)
        doc = json.loads((p["pipeline"] / "ledger.json").read_text())
        assert sorted(doc["processed"]) == sorted(batch1 + batch2)
        assert [len(r["scenes"]) for r in doc["runs"]] == [len(batch1), len(batch2)]
        # the second tick took what the first one encoded (its history and new dates) from the surprise record, and
        # encoded its own new dates only (this half-year cube has no year-ago references nor earlier seasons)
        assert run1["acquisitions_reused"] == 0 and run1["acquisitions_encoded"] > len(batch1)
        assert run2["acquisitions_encoded"] == len(set(_dates(small_archive, batch2)))
        assert run2["acquisitions_reused"] > 0 and (p["alerts"] / "surprise.zarr").is_dir()
        import pystac  # the runs kept the STAC catalog current: every scene, both inits, the alerts

        cat = pystac.Catalog.from_file(str(p["catalog"] / "catalog.json"))
        assert len(list(cat.get_child("sources").get_items())) == len(times)
        assert sorted(it.properties["forecast:reference_datetime"] for it in cat.get_child("forecasts").get_items()) \
            == [str(t) + "Z" for t in inits]
        assert {it.properties["geowm:alert_id"] for it in cat.get_child("alerts").get_items()} == \
            set(open_alerts(p["alerts"])["id"])
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("geowm-pipeline/pipeline")
            assert dep.schedules and dep.schedules[0].schedule.interval.total_seconds() == 10
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _completed_scheduled_run(url: str, flow_run_id: str, logs: list[Path]):
    """The flow run, once COMPLETED; it must have been created by the scheduler for the pipeline deployment."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        def done():
            fr = client.read_flow_run(flow_run_id)
            return fr if fr.state is not None and fr.state.is_final() else None

        fr = _wait(done, 120, f"flow run {flow_run_id} to finish", logs)
        assert fr.state.is_completed(), fr.state
        assert fr.auto_scheduled, "the run was not created by the schedule"
        dep = client.read_deployment_by_name("geowm-pipeline/pipeline")
        assert fr.deployment_id == dep.id
    return fr


def _threads(flow_obj):
    from prefect_dask import DaskTaskRunner

    from flows.settings import local_cluster_kwargs

    return flow_obj.with_options(task_runner=DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(2, processes=False)))


def test_pipeline_killed_mid_way_reruns_without_duplicates(prefect_api, small_archive, tiny_run, tmp_path):
    """SIGKILL a pipeline run (with its Dask worker processes) right after its ingest committed; the re-run
    forecasts and scores the scenes the killed run left pending, with every date and init exactly once."""
    from flows.pipeline import pipeline_flow
    from flows.simulator import advance
    from geowm import open_alerts, open_forecasts
    from geowm.cube.store import read_state

    p = _bootstrap(small_archive, tmp_path, "2021-05-31")
    history = len(read_state(p["cube"]).times)
    new = advance(small_archive, p["watched"], until="2021-06-30")["released"]
    params = _params(p, tiny_run)
    log = tmp_path / "killed.log"
    code = "import json, sys; from flows.pipeline import pipeline_flow; pipeline_flow(**json.loads(sys.argv[1]))"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(params)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=_env(PREFECT_API_URL=prefect_api, GEOWM_DASK_PROCESSES="1",
                                         PREFECT_HOME=str(tmp_path / "client")))
    try:
        _wait(lambda: proc.poll() is not None or len(read_state(p["cube"]).times) > history, 240,
              "the pipeline's ingest to commit", [log], every_s=0.1)
    finally:
        _stop(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, _tail(log)
    assert len(read_state(p["cube"]).times) == history + len(new)  # the ingest had committed ...
    assert _ledger_runs(p["pipeline"]) == []  # ... and the run did not finish

    record = _threads(pipeline_flow)(**params)
    assert record["scenes"] == new
    times = read_state(p["cube"]).times
    assert len(times) == history + len(new) and len(np.unique(times)) == len(times)
    assert set(_dates(small_archive, new)) <= set(times)
    store = open_forecasts(p["forecasts"])
    assert list(store["init_time"].values.astype("datetime64[s]")) == [times[-1]]
    assert (p["alerts"] / "alerts.parquet").is_file() and record["n_alerts"] == len(open_alerts(p["alerts"]))
    doc = json.loads((p["pipeline"] / "ledger.json").read_text())
    assert sorted(doc["processed"]) == sorted(new) and len(doc["runs"]) == 1

    snap, store_snap = read_state(p["cube"]).snapshot, store.attrs["geowm:store_snapshot"]
    again = _threads(pipeline_flow)(**params)
    assert again.get("nothing_new") and again["scenes"] == []
    assert read_state(p["cube"]).snapshot == snap
    assert open_forecasts(p["forecasts"]).attrs["geowm:store_snapshot"] == store_snap
