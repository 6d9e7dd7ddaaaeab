"""Helpers for the crash-safety tests: children that SIGKILL themselves at the n-th traced call, and small inputs.

The children run in a ``multiprocessing`` fork server that imported geowm once (a fresh interpreter per
trial would spend seconds on imports alone). A child counts Python calls in geowm, zarr, icechunk,
xarray, safetensors and torch.serialization, plus calls into Icechunk's native methods, in every
thread; at the n-th it sends itself SIGKILL, so "random points" are spread over the whole write path:
planning, block writes, commits, branch moves, checkpoint files.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import xarray as xr

import geowm.cube.ingest  # noqa: F401  (preloaded in the fork server)
import geowm.forecast_store  # noqa: F401

TRACED = tuple(f"{os.sep}{name}{os.sep}" for name in ("geowm", "zarr", "icechunk", "xarray", "safetensors"))


def _kill_at(n: int) -> list[int]:
    """SIGKILL this process at the n-th traced event; returns the (live) count."""
    lock = threading.Lock()
    seen = [0]

    def prof(frame, event, arg):
        if event == "call":
            name = frame.f_code.co_filename
            if not (any(t in name for t in TRACED) or name.endswith("torch/serialization.py")):
                return
        elif event == "c_call":
            owner = type(getattr(arg, "__self__", None))
            if not owner.__module__.startswith("icechunk") and arg not in (os.replace, os.rename):
                return
        else:
            return
        with lock:
            seen[0] += 1
            if seen[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.setprofile(prof)
    sys.setprofile(prof)
    return seen


def run_child(kind: str, kill_n: int | None, count_file: str | None, kwargs: dict) -> None:
    """Target of a trial process: install the kill hook (unless ``kill_n`` and ``count_file`` are None), then do
    one write of ``kind``."""
    seen = _kill_at(kill_n) if kill_n or count_file else [0]
    if kind == "ingest":
        from geowm.cube import IngestOptions, ingest

        ingest(kwargs["source"], kwargs["cube"], IngestOptions(**kwargs["opts"]))
    elif kind == "ingests":  # several batches one after the other; each outcome written to kwargs["report"]
        from geowm.cube import CubeError, IngestOptions, ingest

        lines = []
        for source in kwargs["sources"]:
            try:
                ingest(source, kwargs["cube"], IngestOptions(**kwargs["opts"]))
                lines.append("ok")
            except CubeError as exc:
                lines.append(f"CubeError: {exc}")
        Path(kwargs["report"]).write_text("\n".join(lines))
    elif kind == "forecast":
        from geowm.forecast_store import write_forecasts

        write_forecasts(fake_forecast(*kwargs["init"]), kwargs["store"])
    elif kind == "train":
        import torch

        from geowm.train import TrainConfig, train

        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        cfg = TrainConfig.from_dict(json.loads(kwargs["cfg"]))
        train(kwargs["cube"], kwargs["run"], cfg, resume=kwargs["resume"])
    sys.setprofile(None)
    threading.setprofile(None)
    if count_file:
        Path(count_file).write_text(str(seen[0]))
    os._exit(0)  # skip interpreter teardown (the fork server's inherited state)


def fake_forecast(init: str, seed: int, size: int = 64, patch: int = 16) -> xr.Dataset:
    """A forecast dataset with the layout of :func:`geowm.forecast.forecast` (two bands, NDVI, latents)."""
    rng = np.random.default_rng(seed)
    leads = np.array([5, 10], "timedelta64[D]").astype("timedelta64[ns]")
    t0 = np.datetime64(init, "ns")
    y = 5400000 - 10 * (np.arange(size) + 0.5)
    x = 500000 + 10 * (np.arange(size) + 0.5)
    n = size // patch
    dims = ("init_time", "lead_time", "quantile", "y", "x")
    shape = (1, len(leads), 3, size, size)
    data = {b: (dims, rng.uniform(0, 0.5, shape).astype("float32")) for b in ("B04", "B08")}
    data["ndvi"] = (dims, rng.uniform(-1, 1, shape).astype("float32"))
    data["embedding"] = (("init_time", "lead_time", "py", "px", "latent"),
                         rng.normal(size=(1, len(leads), n, n, 8)).astype("float32"))
    data["n_context"] = (("init_time", "py", "px"), rng.integers(1, 4, (1, n, n)).astype("int16"))
    coords = {"init_time": [t0], "lead_time": leads, "quantile": [0.1, 0.5, 0.9], "y": y, "x": x,
              "py": y.reshape(-1, patch).mean(1), "px": x.reshape(-1, patch).mean(1),
              "valid_time": (("init_time", "lead_time"), (t0 + leads)[None]),
              "spatial_ref": xr.DataArray(0, attrs={"crs_wkt": "EPSG:32633"})}
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({"geowm:format": "geowm-forecast/1", "geowm:run_id": "tiny@test", "geowm:config_hash": "0" * 16,
                     "geowm:cube_snapshot": f"snap-{seed}"})
    return ds
