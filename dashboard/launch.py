"""Start the dashboard: ``python dashboard/launch.py --workdir DIR [--port 8501] [--host 127.0.0.1]``.

This is ``streamlit run dashboard/app.py --server.address HOST --server.port PORT --server.headless true
--browser.gatherUsageStats false -- --workdir DIR`` (Streamlit's own command-line entry point; also no
file watcher and no "Deploy" toolbar: an analysts' tool, not a development server), run in a process
that has already imported geowm and the libraries the page uses (torch, xarray, geopandas, plotly,
pydeck: several seconds on a small machine), so the first browser visit does not wait for imports.
``geowm dashboard`` runs this file.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
APP = HERE / "app.py"
# Debian's Chromium and the flags it runs headless with here (tests and benchmarks; never a downloaded browser)
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def streamlit_argv(workdir: Path, port: int = 8501, host: str = "127.0.0.1") -> list[str]:
    """The ``streamlit run`` arguments (without the program name) that serve the app on host:port."""
    return ["run", str(APP), "--server.address", host, "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--client.toolbarMode", "minimal", "--", "--workdir", str(workdir)]


def preload() -> None:
    """Import what the page imports, so the first session does not pay for it."""
    import plotly.graph_objects  # noqa: F401
    import pydeck  # noqa: F401

    import geowm  # noqa: F401  (torch, xarray, icechunk)
    from dashboard import data, render, series, system  # noqa: F401


def keep_warm(workdir: Path) -> None:
    """Fill the page's caches for the default view once the Streamlit runtime exists, then again each time the
    workdir is re-opened (``cache.REFRESH_S``), so the first visit, and the first after new data, reads nothing."""
    import logging

    from streamlit.runtime import Runtime

    while not Runtime.exists():
        time.sleep(0.1)
    # the caches are used outside a page run here: Streamlit's "missing ScriptRunContext" notice is expected
    logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").setLevel(logging.ERROR)
    from dashboard import cache, views

    every_s = cache.REFRESH_S

    last = None
    while True:
        t0 = time.perf_counter()
        try:
            views.warm(str(workdir))
            msg = "caches warm"
        except Exception as exc:  # noqa: BLE001 - the page shows problems itself; warming is best effort
            msg = f"warming the caches failed: {exc}"
        if msg != last or time.perf_counter() - t0 > 1.0:  # say it once, and whenever new data took time
            print(f"dashboard: {msg} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        last = msg
        time.sleep(every_s)


def start(workdir: Path, port: int, log: Path, timeout: float = 120.0,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Run ``geowm dashboard --workdir WORKDIR --port PORT`` (this Python's) in a new process group, output to
    ``log``; return once it answers on ``/_stcore/health``. Raises RuntimeError (with the log's tail) if it
    exits or does not answer within ``timeout`` seconds."""
    exe = Path(sys.executable).parent / "geowm"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "geowm"]
    proc = subprocess.Popen([*cmd, "dashboard", "--workdir", str(workdir), "--port", str(port)],
                            env=env, stdout=Path(log).open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"geowm dashboard exited ({proc.returncode}): {Path(log).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"geowm dashboard did not answer within {timeout} s: {Path(log).read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    """End a server from :func:`start`: its whole process group, SIGTERM then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="geowm dashboard", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True, help="folder with cube/, forecasts/, alerts/")
    ap.add_argument("--port", type=int, default=8501)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--no-warm", action="store_true", help="do not fill the caches in the background")
    args = ap.parse_args(argv)
    if str(HERE.parent) not in sys.path:  # a source checkout: make the dashboard package importable
        sys.path.insert(0, str(HERE.parent))
    preload()
    from streamlit.web import cli

    if not args.no_warm:
        threading.Thread(target=keep_warm, args=(args.workdir.resolve(),), daemon=True,
                         name="geowm-dashboard-warm").start()
    sys.argv = ["streamlit", *streamlit_argv(args.workdir.resolve(), args.port, args.host)]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
