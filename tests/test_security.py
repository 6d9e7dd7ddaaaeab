"""Security: no unpickling of files a user can hand us, services bound to 127.0.0.1 by default, no path from
the browser, and a malicious optimizer state refused by ``torch.load(weights_only=True)``."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("geowm", "catalog", "flows", "dashboard", "benchmarks")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            yield name, node


def _kw(node: ast.Call, key: str):
    return next((k.value for k in node.keywords if k.arg == key), None)


def test_no_unpickling_anywhere_in_the_code():
    """torch.load only with weights_only=True; no pickle-family module, np.load(allow_pickle=True) or
    read_pickle. (Prefect's own task-result cache is the one pickled store: see the README.)"""
    problems = []
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 50
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad = [m for m in mods if m.split(".")[0] in UNSAFE_MODULES]
                if bad:
                    problems.append(f"{where}:{node.lineno}: imports {bad}")
        for name, node in _calls(tree):
            owner = getattr(node.func, "value", None)
            if name == "load" and getattr(owner, "id", "") == "torch":
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if name == "load" and _kw(node, "allow_pickle") is not None:
                ap = _kw(node, "allow_pickle")
                if not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(f"{where}:{node.lineno}: np.load with allow_pickle")
            if name in ("read_pickle", "to_pickle"):
                problems.append(f"{where}:{node.lineno}: {name}")
    assert not problems, "\n".join(problems)


def test_malicious_optimizer_state_is_refused_and_never_executed(tmp_path):
    """An attacker who can write the run directory swaps optimizer.pt for a pickle that runs code, and fixes
    checkpoint.json's SHA-256: resume refuses it (weights_only) with a clear message and runs nothing."""
    import pickle  # noqa: S403 - building the attack, never loading it

    from test_ingest import days, make_scene
    from test_train import FAST
    from typer.testing import CliRunner

    from geowm.cli import app
    from geowm.cube import IngestOptions, ingest
    from geowm.cube.store import tree_digest
    from geowm.train import TrainConfig, _sha256, train

    src = tmp_path / "src"
    for i, d in enumerate(days(6)):
        make_scene(src, d, i, cloud=False)
    ingest(src, tmp_path / "cube", IngestOptions(tile_size=32, scheduler="synchronous"))
    run = tmp_path / "run"
    train(str(tmp_path / "cube"), run, TrainConfig(steps=2, **FAST))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (run / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": Payload(), "step": 2}))
    meta = json.loads((run / "checkpoint.json").read_text())
    meta["optimizer_sha256"] = _sha256(run / "optimizer.pt")
    (run / "checkpoint.json").write_text(json.dumps(meta))
    (tmp_path / "cfg.json").write_text(json.dumps({**FAST, "window": FAST["window"].__dict__, "steps": 4}))
    before = tree_digest(run)
    res = CliRunner().invoke(app, ["train", "--cube", str(tmp_path / "cube"), "--out", str(run), "--resume",
                                   "--config", str(tmp_path / "cfg.json"), "--no-evaluate"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, text
    assert "optimizer.pt: corrupted checkpoint" in text and "weights" in text.lower(), text
    assert not marker.exists()
    assert tree_digest(run) == before


def test_services_bind_loopback_by_default():
    import inspect

    from dashboard.launch import streamlit_argv
    from flows.settings import LOCAL_PREFECT_API_URL
    from geowm.cli import dashboard

    argv = streamlit_argv(Path("/tmp"), 8501)
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    assert inspect.signature(dashboard).parameters["host"].default.default == "127.0.0.1"
    assert LOCAL_PREFECT_API_URL.startswith("http://127.0.0.1:")
    make = (ROOT / "Makefile").read_text()
    server = next(line for line in make.splitlines() if "prefect server start" in line)
    args = shlex.split(server.split("prefect", 2)[-1])
    assert args[args.index("--host") + 1] == "127.0.0.1"


def _listeners() -> set[tuple[int, str, int]]:
    import os

    import psutil

    me = psutil.Process(os.getpid())
    out = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        out |= {(proc.pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return out


@pytest.mark.parametrize("scheduler", ["local", "threads"])
def test_ingest_dask_cluster_listens_on_loopback_only(scheduler):
    """Every socket the ingest's dask cluster opens (scheduler, its HTTP server, workers, nannies) is on
    127.0.0.1, on free ports (no fixed :8787 dashboard)."""
    from geowm.cube.ingest import _Executor

    before = _listeners()
    ex = _Executor(scheduler)
    try:
        new = _listeners() - before
        assert new, "the cluster opened no listening socket?"
        assert all(ip == "127.0.0.1" for _, ip, _ in new), new
        assert 8787 not in {port for _, _, port in new}
        info = ex.client.scheduler_info()
        assert all(re.match(r"(tcp://127\.0\.0\.1:\d+|inproc://)", a) for a in [info["address"], *info["workers"]])
    finally:
        ex.close()
