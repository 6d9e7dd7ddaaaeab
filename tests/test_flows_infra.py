"""infra/ and `geowm serve`: compose and prefect.yaml parse and name what the code uses, the deployment
entrypoints import, `prefect deploy` accepts prefect.yaml, and serving without an API fails clearly."""

from __future__ import annotations

import inspect
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from flows import settings as S
from geowm.cli import app

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def _prefect_yaml() -> dict:
    return yaml.safe_load((INFRA / "prefect.yaml").read_text())


def _cmd(service: dict) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def test_compose_services_talk_by_the_names_in_the_code():
    services = _compose()["services"]
    assert set(services) == {"postgres", S.COMPOSE_PREFECT_SERVICE, "prefect-worker", "dashboard",
                             S.COMPOSE_DASK_SERVICE, "dask-worker"}
    assert f"prefect server start --host 0.0.0.0 --port {S.PREFECT_PORT}" in _cmd(services[S.COMPOSE_PREFECT_SERVICE])
    assert f"dask scheduler --host 0.0.0.0 --port {S.DASK_SCHEDULER_PORT}" in _cmd(services[S.COMPOSE_DASK_SERVICE])
    assert _cmd(services["dask-worker"]).startswith(f"dask worker {S.COMPOSE_DASK_ADDRESS} ")
    api = f"http://{S.COMPOSE_PREFECT_SERVICE}:{S.PREFECT_PORT}/api"
    users = [name for name, svc in services.items() if "PREFECT_API_URL" in (svc.get("environment") or {})]
    assert set(users) == {"prefect-worker", "dashboard"}
    assert all(services[n]["environment"]["PREFECT_API_URL"] == api for n in users)
    assert services["prefect-worker"]["environment"][S.DASK_ADDRESS_ENV] == S.COMPOSE_DASK_ADDRESS
    worker = _cmd(services["prefect-worker"])
    assert f"work-pool create {S.WORK_POOL} --type process" in worker and f"--pool {S.WORK_POOL}" in worker
    assert "--prefect-file infra/prefect.yaml" in worker and (INFRA / "prefect.yaml").is_file()
    # PostgreSQL: the server's database URL names the postgres service and its credentials
    pg = services["postgres"]["environment"]
    db = services[S.COMPOSE_PREFECT_SERVICE]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert db == (f"postgresql+asyncpg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/"
                  f"{pg['POSTGRES_DB']}")
    # every published port is on the host's loopback only
    published = [p for svc in services.values() for p in svc.get("ports", [])]
    assert published and all(str(p).startswith("127.0.0.1:") for p in published)
    assert "127.0.0.1:8501:8501" in services["dashboard"]["ports"]
    assert _cmd(services["dashboard"]) == "geowm dashboard --workdir /data --host 0.0.0.0 --port 8501"
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        if name != "postgres":
            assert svc["build"]["dockerfile"] == "infra/Dockerfile" and svc["image"] == "geowm:cpu"


def test_compose_geowm_commands_exist_and_the_image_installs_every_package():
    registered = {c.name or c.callback.__name__ for c in app.registered_commands}
    services = _compose()["services"]
    used = {_cmd(s).split()[1] for s in services.values() if _cmd(s).startswith("geowm ")}
    assert used and used <= registered
    docker = (INFRA / "Dockerfile").read_text()
    assert docker.startswith("#") and "\nFROM python:3.11-slim\n" in docker
    torch_pin = re.search(r"TORCH_SPEC \?= (\S+)", (REPO / "Makefile").read_text()).group(1)
    assert f"pip install {torch_pin} " in docker and "download.pytorch.org/whl/cpu" in docker
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.findall(r'"(\w+)\*"', re.search(r"include = \[(.*?)\]", pyproject).group(1))
    assert set(packages) == {"geowm", "catalog", "flows", "dashboard"}
    for pkg in packages:  # each package is copied into the image before `pip install .`
        assert f"COPY {pkg} ./{pkg}" in docker and (REPO / pkg / "__init__.py").is_file()
    assert docker.index("COPY flows") < docker.index("RUN pip install .")


def test_prefect_yaml_deployments_match_the_flows(monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    doc = _prefect_yaml()
    deps = {d["name"]: d for d in doc["deployments"]}
    assert set(deps) == set(S.DEPLOYMENTS)
    monkeypatch.chdir(REPO)
    for name, (flow_name, entrypoint) in S.DEPLOYMENTS.items():
        d = deps[name]
        assert d["entrypoint"] == entrypoint
        flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)  # imports the module
        assert flow.name == flow_name
        sig = inspect.signature(flow.fn).parameters
        assert set(d["parameters"]) <= set(sig), f"{name}: unknown parameters {set(d['parameters']) - set(sig)}"
        required = {k for k, p in sig.items() if p.default is inspect.Parameter.empty}
        assert required <= set(d["parameters"]), f"{name}: missing required parameters"
        assert d["work_pool"]["name"] == S.WORK_POOL
        assert d["work_pool"]["job_variables"]["env"][S.DASK_ADDRESS_ENV] == S.COMPOSE_DASK_ADDRESS
    assert [s["interval"] for s in deps["pipeline"]["schedules"]] == [3600]
    assert doc["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/app"


def test_prefect_deploy_registers_every_deployment(prefect_api, tmp_path):
    """`prefect deploy --all --prefect-file infra/prefect.yaml` against a real API creates the deployments."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=S.WORK_POOL, type="process"), overwrite=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp_path / "home"),
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    res = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                          str(INFRA / "prefect.yaml")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with get_client(sync_client=True) as client:
        for name, (flow_name, entrypoint) in S.DEPLOYMENTS.items():
            dep = client.read_deployment_by_name(f"{flow_name}/{name}")
            assert dep.entrypoint == entrypoint and dep.work_pool_name == S.WORK_POOL
        pipe = client.read_deployment_by_name(f"{S.PIPELINE_FLOW}/pipeline")
        assert pipe.parameters["cube"] == "/data/cube" and pipe.schedules
        assert pipe.schedules[0].schedule.interval.total_seconds() == 3600
        assert pipe.global_concurrency_limit is not None and pipe.global_concurrency_limit.limit == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket closes


def test_serve_without_a_reachable_api_says_how_to_start_one(tmp_path, monkeypatch):
    from flows.serve import ApiUnreachable, check_api

    url = f"http://127.0.0.1:{_closed_port()}/api"
    with pytest.raises(ApiUnreachable, match=r"no Prefect API at .*prefect server start --host 127\.0\.0\.1"):
        check_api(url, timeout_s=2)
    monkeypatch.setenv("PREFECT_API_URL", url)
    res = CliRunner().invoke(app, ["serve", "--source", str(tmp_path), "--cube", str(tmp_path / "cube"),
                                   "--model", str(tmp_path / "run"), "--forecasts", str(tmp_path / "f"),
                                   "--alerts", str(tmp_path / "a")])
    assert res.exit_code == 2
    assert f"no Prefect API at {url}" in res.stderr and "prefect server start --host 127.0.0.1" in res.stderr


def test_serve_builds_the_deployments_with_schedules():
    from flows.serve import ServeConfig, build_deployments

    cfg = ServeConfig(source="w", cube="c", model="m", store="f", alerts="a", state_dir="s", interval_s=600,
                      pipeline={"history_days": 90.0}, simulate_archive="arch", simulate_days=3)
    deps = {d.name: d for d in build_deployments(cfg)}
    assert set(deps) == set(S.DEPLOYMENTS)
    for name, (flow_name, entrypoint) in S.DEPLOYMENTS.items():
        path, func = entrypoint.split(":")
        module = path.removesuffix(".py").replace("/", ".")
        assert deps[name].entrypoint == f"{module}.{func}" and deps[name].flow_name == flow_name
    pipe = deps["pipeline"]
    assert pipe.schedules[0].schedule.interval.total_seconds() == 600
    assert pipe.parameters == dict(source="w", cube="c", model="m", store="f", alerts="a", state_dir="s",
                                   history_days=90.0)
    assert deps["simulate"].parameters == dict(archive="arch", watched="w", days=3)
    assert not deps["forecast"].schedules and deps["forecast"].parameters["state_dir"] == "s"
    search = {"collections": ["sentinel-2-l2a"], "bbox": [15.0, 48.7, 15.1, 48.8], "start": "2023-04-01",
              "max_cloud": 80.0}
    api = {d.name: d for d in build_deployments(ServeConfig(source="https://stac.example/v1", cube="c", model="m",
                                                            store="f", alerts="a", pipeline={"search": search}))}
    assert api["pipeline"].parameters["search"] == search and api["ingest"].parameters["search"] == search
    gpu = {d.name: d for d in build_deployments(ServeConfig(source="w", cube="c", model="m", store="f", alerts="a",
                                                            pipeline={"device": "cuda", "precision": "bf16"}))}
    for name in ("pipeline", "forecast"):  # both run the model: both where and as asked
        assert gpu[name].parameters["device"] == "cuda" and gpu[name].parameters["precision"] == "bf16"
    cron = build_deployments(ServeConfig(source="w", cube="c", model="m", store="f", alerts="a", interval_s=None,
                                         cron="0 6 * * *"))
    assert cron[0].schedules[0].schedule.cron == "0 6 * * *" and len(cron) == 4
    with pytest.raises(ValueError, match="exactly one schedule"):
        build_deployments(ServeConfig(source="w", cube="c", model="m", store="f", alerts="a", cron="0 6 * * *"))


@pytest.mark.parametrize("flags, message", [(["--precision", "half"], "one of fp32, bf16, tf32, auto"),
                                            (["--device", "gpu"], "one of auto, cpu, cuda"),
                                            (["--device", "cuda"], "no CUDA device is available"),
                                            (["--device", "cpu", "--precision", "tf32"], "TF32 is a CUDA"),
                                            (["--device", "auto", "--precision", "tf32"], "TF32 is a CUDA")])
def test_serve_refuses_a_bad_device_or_precision_before_anything(tmp_path, monkeypatch, flags, message):
    """The served runs execute on this machine (here without CUDA): what it cannot run is refused at the start."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(app, ["serve", "--source", str(tmp_path), "--cube", str(tmp_path / "cube"),
                                   "--model", str(tmp_path / "run"), "--forecasts", str(tmp_path / "f"),
                                   "--alerts", str(tmp_path / "a"), *flags])
    assert res.exit_code == 2 and message in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []
