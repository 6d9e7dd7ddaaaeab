"""Forecast and anomaly-scoring throughput (km^2 per second) and peak memory, on CPU (CUDA when present).

Set-up (not timed): a synthetic region is generated and ingested, and a `tiny` model is trained for a
few steps with its probes (throughput does not depend on how well it is trained). Timed, each in a
fresh subprocess whose peak resident set (VmHWM) it reports itself: ``geowm.forecast.forecast`` of
one init over the whole region (4 leads, 1 and 4 ensemble members), and ``geowm.anomaly.surprise``
over the region's acquisitions (each scored patch-date is one encoder window + one prediction).
km^2/s counts the region's area once per init (forecast) or once per scored acquisition (anomaly).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks._util import remove

PARAMS = {
    "full": {"size": 512, "start": "2021-01-01", "end": "2021-12-31", "score_from": "2021-07-01"},
    "quick": {"size": 256, "start": "2021-01-01", "end": "2021-12-31", "score_from": "2021-10-01"},
    "smoke": {"size": 128, "start": "2021-01-01", "end": "2021-04-30", "score_from": "2021-04-01"},
}

CHILD = """
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from geowm.forecast import forecast
from geowm.anomaly import surprise
cube, run, what, arg = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
t1 = time.perf_counter()
if what == "forecast":
    fc = forecast(cube, run, leads=(5, 10, 20, 30), members=int(arg))
    n = 1
else:
    s = surprise(cube, run, start=arg)
    n = int(s.sizes["time"])
t2 = time.perf_counter()
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(json.dumps({"import_s": t1 - t0, "seconds": t2 - t1, "n": n, "vmhwm_kib": hwm[0] if hwm else None}))
"""


def _child(args: list[str], log: Path) -> tuple[dict, int]:
    with (log / "child.out").open("wb") as fo, (log / "child.err").open("wb") as fe:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=fo, stderr=fe,
                                cwd=Path(__file__).resolve().parent.parent)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (log / "child.err").read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"subprocess failed: {' | '.join(tail)}")
    r = json.loads((log / "child.out").read_text().strip().splitlines()[-1])
    # the child's own peak (VmHWM of its address space): ru_maxrss would carry the parent's peak over exec
    return r, int(r["vmhwm_kib"] or usage.ru_maxrss) * 1024


def run(mode: str, workdir: Path) -> dict:
    from geowm.cube import IngestOptions, ingest
    from geowm.data import WindowConfig
    from geowm.synth import generate
    from geowm.train import TrainConfig, evaluate_run, train

    p = PARAMS[mode]
    remove(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    generate(workdir / "region", size=p["size"], start=p["start"], end=p["end"], seed=11)
    cube = workdir / "cube"
    ingest(workdir / "region" / "stac" / "catalog.json", cube, IngestOptions(scheduler="threads"))
    run_dir = workdir / "run"
    window = WindowConfig() if mode != "smoke" else WindowConfig(frames=4, size=32)
    train(str(cube), run_dir, TrainConfig(preset="tiny", steps=3, batch_size=2, workers=0, window=window))
    evaluate_run(run_dir, n_windows=4)
    km2 = (p["size"] * 10 / 1000) ** 2
    results, details = {}, {}
    for members in (1, 4):
        r, rss = _child([str(cube), str(run_dir), "forecast", str(members)], workdir)
        results[f"forecast_m{members}_km2_per_s"] = km2 / r["seconds"]
        results[f"forecast_m{members}_peak_rss_MiB"] = rss / 2**20
        details[f"forecast_m{members}"] = {**r, "peak_rss_bytes": rss}
    r, rss = _child([str(cube), str(run_dir), "anomaly", p["score_from"]], workdir)
    results["anomaly_km2_per_s"] = km2 * r["n"] / r["seconds"]
    results["anomaly_peak_rss_MiB"] = rss / 2**20
    details["anomaly"] = {**r, "peak_rss_bytes": rss}
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    desc = (f"Synthetic region {p['size']} x {p['size']} px ({km2:.1f} km^2), {p['start']}..{p['end']}, `tiny` model "
            f"on {device}: one forecast init (4 leads; 1 or 4 members) and anomaly surprise for every acquisition "
            f"from {p['score_from']}, each in a fresh subprocess (peak RSS its own).")
    notes = [f"{k}: {v['seconds']:.1f} s for {v['n']} init(s)/acquisition(s) (+{v['import_s']:.1f} s imports)"
             for k, v in details.items()]
    remove(workdir)
    return {"results": {"headline": results, "description": desc, "notes": notes, "region_km2": km2,
                        "size_px": p["size"], "device": device, "details": details}, "targets": {}}
