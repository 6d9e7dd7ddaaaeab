"""Ingest from a STAC API: a search of a synthetic region published as Earth Search publishes Sentinel-2 L2A (one
COG per band, ``scl``, a true-colour ``visual`` COG and JPEG 2000 copies that are not read), served by the test
STAC API and range-request file server on 127.0.0.1 (``tests/stac_api.py``, in a process of its own), with 0 and
50 ms added to every answer (a server across the internet). Reported per latency: the dry run (search, item
reading, every file's header: the plan) and the ingest from a new server (GDAL's cache of the first run not
reused), their seconds and HTTP requests, and whether the cube's values equal those of the same items read from
local files."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks._util import remove

PARAMS = {
    "full": {"size": 512, "start": "2021-01-01", "end": "2021-12-31", "seed": 3, "items": 40},
    "quick": {"size": 256, "start": "2021-01-01", "end": "2021-12-31", "seed": 3, "items": 30},
    "smoke": {"size": 96, "start": "2021-05-20", "end": "2021-07-31", "seed": 3, "items": 6},
}
LATENCIES_S = (0.0, 0.05)
COLLECTION = "sentinel-2-l2a"
ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def _server(files: Path, items: Path, latency: float):
    """The test STAC API in a process of its own (it must not share this process's GIL): yields its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.stac_api", str(files), str(items), str(latency)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(30)


def _requests(url: str) -> int:
    with urllib.request.urlopen(f"{url}/_requests", timeout=30) as r:
        return json.loads(r.read())["requests"]


def _ingest(url: str, cube: Path, dry_run: bool) -> tuple[float, int, object]:
    from geowm.cube import IngestOptions, ingest
    from geowm.stacsource import StacSearch

    n0 = _requests(url)
    t0 = time.perf_counter()
    report = ingest(url, cube, IngestOptions(scheduler="threads", search=StacSearch((COLLECTION,)), dry_run=dry_run))
    seconds = time.perf_counter() - t0
    return seconds, _requests(url) - n0 - 1, report


def run(mode: str, workdir: Path) -> dict:
    from geowm.cube import IngestOptions, ingest, open_cube
    from geowm.synth import generate
    from tests.stac_api import earth_search_items

    p = PARAMS[mode]
    workdir.mkdir(parents=True, exist_ok=True)
    region = workdir / f"region_{p['size']}_{p['start']}_{p['end']}_{p['seed']}"
    if not (region / "synth.json").is_file():
        remove(region)
        generate(region, size=p["size"], start=p["start"], end=p["end"], seed=p["seed"])
    files = workdir / "files"
    remove(files)
    items = earth_search_items(region, files, lambda rel: "{base}/files/" + rel, p["items"], COLLECTION)
    served = workdir / "served.json"
    served.write_text(json.dumps(items))
    local = workdir / "items.json"  # the same items, read from the files: the reference cube
    local.write_text(json.dumps({"type": "FeatureCollection", "features": json.loads(
        json.dumps(items).replace("{base}/files/", f"{files.resolve()}/"))}))
    ref_cube = workdir / "cubes" / "local"
    remove(workdir / "cubes")
    ingest(local, ref_cube, IngestOptions(scheduler="threads"))
    ref = open_cube(ref_cube)
    legs = {}
    for latency in LATENCIES_S:
        leg = {}
        for what in ("plan", "ingest"):
            cube = workdir / "cubes" / f"api_{int(latency * 1000)}ms"
            with _server(files, served, latency) as url:  # a new port: nothing cached by GDAL
                seconds, requests, report = _ingest(url, cube, dry_run=what == "plan")
            leg[f"{what}_s"] = round(seconds, 2)
            leg[f"{what}_requests"] = requests
            if what == "ingest":
                got = open_cube(cube)
                leg["dates"] = len(report.added_times)
                leg["source_MB"] = round(report.source_bytes / 1e6, 1)
                leg["values_equal"] = bool(
                    np.array_equal(got["valid"].values, ref["valid"].values)
                    and np.allclose(got["reflectance"].values, ref["reflectance"].values, rtol=0, atol=0,
                                    equal_nan=True))
                remove(cube)
        legs[f"{int(latency * 1000)}ms"] = leg
    remove(workdir / "cubes")
    slow = legs[f"{int(LATENCIES_S[-1] * 1000)}ms"]
    headline = {"items": len(items), "plan_50ms_s": slow["plan_s"], "ingest_50ms_s": slow["ingest_s"],
                "ingest_0ms_s": legs["0ms"]["ingest_s"], "requests_50ms": slow["ingest_requests"]}
    return {
        "results": {
            "description": (f"{len(items)} items of a {p['size']} px synthetic region as Earth Search publishes "
                            "Sentinel-2 L2A (4 band COGs and SCL read per item), from a STAC API on 127.0.0.1 "
                            "with 0 and 50 ms added per HTTP answer; dry run (plan) and ingest (threads) "
                            "each from a new server."),
            "headline": headline,
            "params": p,
            "latency": legs,
            "values_equal": all(leg["values_equal"] for leg in legs.values()),
            "notes": ["values_equal: the cube of each leg equals the cube of the same items read from local "
                      "files: " + ("yes" if all(leg["values_equal"] for leg in legs.values()) else "NO")],
        },
        "targets": {},
    }


if __name__ == "__main__":
    print(json.dumps(run("smoke", Path("benchmarks/work/stac_api")), indent=1, default=str))
