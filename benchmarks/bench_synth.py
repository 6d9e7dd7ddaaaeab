"""Synthetic generation: wall time and peak memory of ``geowm.synth.generate`` in a fresh process.

The generator runs in a subprocess (``python -c ...``) so its peak resident set is its own: the
child reports its own VmHWM (``ru_maxrss`` from ``os.wait4`` would include the parent's peak,
which Linux carries over ``exec``). Reported: wall seconds of the subprocess (interpreter start and imports
included), the seconds inside ``generate``, peak RSS, acquisitions and megabytes written. The
output is deleted afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._util import dir_bytes, mb, remove

PARAMS = {
    "full": {"size": 1024, "start": "2021-01-01", "end": "2022-12-31", "seed": 5},
    "quick": {"size": 512, "start": "2021-01-01", "end": "2021-12-31", "seed": 5},
    "smoke": {"size": 96, "start": "2021-01-01", "end": "2021-02-28", "seed": 5},
}

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from geowm.synth import generate
t1 = time.perf_counter()
s = generate(sys.argv[1], size=int(sys.argv[2]), start=sys.argv[3], end=sys.argv[4], seed=int(sys.argv[5]))
t2 = time.perf_counter()
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(json.dumps({"import_s": t1 - t0, "generate_s": t2 - t1, "n_acquisitions": s["n_acquisitions"],
                  "n_fully_cloudy": s["n_fully_cloudy"], "events": s["events"], "vmhwm_kib": hwm[0] if hwm else None}))
"""


def run_child(out: Path, size: int, start: str, end: str, seed: int, log_dir: Path) -> tuple[dict, float, int]:
    """Run the generator in a subprocess. Returns (its summary, wall seconds, peak RSS in bytes)."""
    stdout, stderr = log_dir / "child.out", log_dir / "child.err"
    cmd = [sys.executable, "-c", CHILD, str(out), str(size), start, end, str(seed)]
    with stdout.open("wb") as fo, stderr.open("wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=Path(__file__).resolve().parent.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = stderr.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"generator subprocess exited with {proc.returncode}: {' | '.join(tail)}")
    summary = json.loads(stdout.read_text().strip().splitlines()[-1])
    # the child's own peak (VmHWM of its address space): ru_maxrss carries the parent's peak over exec
    return summary, wall, int(summary.get("vmhwm_kib") or usage.ru_maxrss) * 1024


def run(mode: str, workdir: Path) -> dict:
    p = PARAMS[mode]
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "region"
    remove(out)
    try:
        summary, wall, rss = run_child(out, p["size"], p["start"], p["end"], p["seed"], workdir)
        written = dir_bytes(out)
        scenes = dir_bytes(out / "scenes")
    finally:
        remove(out)
    n = summary["n_acquisitions"]
    headline = {
        "wall_s": round(wall, 2),
        "peak_rss_MiB": round(rss / 2**20, 1),
        "n_acquisitions": n,
        "MB_written": round(mb(written), 1),
        "s_per_acquisition": round(summary["generate_s"] / max(n, 1), 3),
    }
    return {
        "results": {
            "description": (f"`geowm.synth.generate` {p['size']} x {p['size']} px, {p['start']}..{p['end']}, "
                            "in a subprocess (wall time includes interpreter start and imports)."),
            "headline": headline,
            "params": p,
            "generate_s": round(summary["generate_s"], 2),
            "import_s": round(summary["import_s"], 2),
            "n_fully_cloudy": summary["n_fully_cloudy"],
            "events": summary["events"],
            "scenes_MB": round(mb(scenes), 1),
            "write_MBps": round(mb(written) / summary["generate_s"], 2),
            "rss_method": "VmHWM of the child process, reported by itself",
        },
        "targets": {},
    }


if __name__ == "__main__":
    print(json.dumps(run("smoke", Path("benchmarks/work/synth")), indent=1))
