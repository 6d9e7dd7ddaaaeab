"""Forecast and anomaly-scoring throughput (km^2 per second) and peak memory, on CPU (CUDA when present).

Set-up (timed apart, ``setup_s``): a synthetic region is generated (kept under the work folder and reused
while its parameters match) and ingested, and a `tiny` model is trained for a few steps with its probes
(throughput does not depend on how well it is trained). Timed, each in a fresh process
(:func:`benchmarks.stages.run_stage`: forked from a forkserver that has imported torch and geowm; peak
RSS reset after the imports; smoke mode runs them in this process): ``geowm.forecast.forecast`` of one
init over the whole region (4 leads, 1 and 4 ensemble members), and ``geowm.anomaly.surprise`` over
the region's acquisitions from ``score_from`` (each scored patch-date is one encoder window + one
prediction). km^2/s counts the region's area once per init (forecast) or once per scored acquisition
(anomaly). A scheduled tick (``geowm.anomaly.detect`` as ``geowm anomalies`` and the pipeline run it, a year
of history, with the surprise record): the region's scenes before its last mostly clear acquisition are
ingested from a watched folder and scored (``anomaly_first_s``: every acquisition encoded), then that
acquisition arrives (one revisit; a clear one, the costly case) and is scored as the pipeline's tick scores
it, from its date (``anomaly_tick_s``: it and its year-ago references encoded, where the cube has them, its
history from the record);
``anomaly_tick_km2_per_s`` counts the region once per new acquisition. Peak memory: the process's peak
resident set while the stage ran (and, on CUDA, the peak allocated GPU memory). ``*_model_share``: the
share of a stage's time spent in the model's calls (``benchmarks.stages.model_clock``); the rest is reading the
cube, choosing contexts, decoding and writing (the model alone: ``bench_model``). Where the device has bfloat16
arithmetic, the 1-member forecast and the surprise are timed again as a pair, fp32 then ``--precision bf16``
(``*_bf16_km2_per_s``; ``*_bf16_speedup``: bf16 over the fp32 run just before it), with the largest departure of
bf16's outputs from fp32's. Full mode uses torch's default
intra-op threads (what ``geowm forecast`` gets); quick and smoke modes 1 thread (on shared, busy cores more
threads mostly wait for each other).
How these costs grow with the region: ``bench_scaling``.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks._util import remove
from benchmarks.stages import run_stage

PARAMS = {
    "full": {"size": 512, "start": "2021-01-01", "end": "2021-12-31", "score_from": "2021-07-01"},
    "quick": {"size": 256, "start": "2021-01-01", "end": "2021-06-30", "score_from": "2021-06-15"},
    "smoke": {"size": 128, "start": "2021-01-01", "end": "2021-04-30", "score_from": "2021-04-01"},
}
SEED = 11
THREADS = {"full": None, "quick": 1, "smoke": 1}  # torch intra-op threads (None: torch's default, as the CLI)


def run(mode: str, workdir: Path) -> dict:
    import time

    import torch

    from benchmarks.bench_ingest import source_region
    from geowm.cube import IngestOptions, ingest
    from geowm.data import WindowConfig
    from geowm.train import TrainConfig, evaluate_run, train

    p = PARAMS[mode]
    workdir.mkdir(parents=True, exist_ok=True)
    setup_s = {}
    t0 = time.perf_counter()
    region, _ = source_region(workdir, p["size"], p["start"], p["end"], SEED)
    setup_s["region"] = time.perf_counter() - t0
    cube, run_dir = workdir / "cube", workdir / "run"
    remove(cube)
    remove(run_dir)
    saved_threads = torch.get_num_threads()
    if THREADS[mode]:
        torch.set_num_threads(THREADS[mode])
    try:
        t0 = time.perf_counter()
        ingest(region / "stac" / "catalog.json", cube, IngestOptions(scheduler="synchronous"))
        setup_s["ingest"] = time.perf_counter() - t0
        window = WindowConfig() if mode != "smoke" else WindowConfig(frames=4, size=32)
        t0 = time.perf_counter()
        train(str(cube), run_dir, TrainConfig(preset="tiny", steps=3, batch_size=2, workers=0, window=window))
        setup_s["train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate_run(run_dir, n_windows=4)
        setup_s["probes"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(saved_threads)
    km2 = (p["size"] * 10 / 1000) ** 2
    here = mode == "smoke"
    results, details = {}, {}
    try:
        for members in (1, 4):
            r = run_stage("forecast", {"cube": str(cube), "run": str(run_dir), "members": members,
                                       "threads": THREADS[mode]}, in_process=here)
            results[f"forecast_m{members}_km2_per_s"] = round(km2 / r["seconds"], 3)
            results[f"forecast_m{members}_peak_rss_MiB"] = round(r["peak_rss_bytes"] / 2**20, 1)
            if r["cuda_max_allocated_bytes"] is not None:
                results[f"forecast_m{members}_cuda_max_allocated_MiB"] = round(r["cuda_max_allocated_bytes"] / 2**20, 1)
            results[f"forecast_m{members}_model_share"] = round(r["model_s"] / r["seconds"], 3)
            details[f"forecast_m{members}"] = {**r, "n": 1}
        r = run_stage("anomaly", {"cube": str(cube), "run": str(run_dir), "start": p["score_from"],
                                  "threads": THREADS[mode]}, in_process=here)
        results["anomaly_km2_per_s"] = round(km2 * r["scored_dates"] / r["seconds"], 3)
        results["anomaly_peak_rss_MiB"] = round(r["peak_rss_bytes"] / 2**20, 1)
        if r["cuda_max_allocated_bytes"] is not None:
            results["anomaly_cuda_max_allocated_MiB"] = round(r["cuda_max_allocated_bytes"] / 2**20, 1)
        results["anomaly_model_share"] = round(r["model_s"] / r["seconds"], 3)
        details["anomaly"] = {**r, "n": r["scored_dates"]}
        results.update(_bf16(cube, run_dir, p["score_from"], km2, THREADS[mode], here, workdir, details))
        first, tick, n_new = _tick(workdir, region, cube, run_dir, p["score_from"], THREADS[mode], here)
        results["anomaly_first_s"] = round(first["seconds"], 2)
        results["anomaly_tick_s"] = round(tick["seconds"], 2)
        results["anomaly_tick_km2_per_s"] = round(km2 * n_new / tick["seconds"], 3)
        results["anomaly_tick_model_share"] = round(tick["model_s"] / tick["seconds"], 3)
        details["anomaly_first"] = {**first, "n": first["computed_dates"]}
        details["anomaly_tick"] = {**tick, "n": n_new}
    finally:
        remove(cube)
        remove(run_dir)
        for name in ("tick_watched", "tick_cube", "tick_alerts"):
            remove(workdir / name)
    device = details["anomaly"]["device"]
    how = "in this process (smoke mode)" if here else "each in a fresh process (peak RSS its own)"
    desc = (f"Synthetic region {p['size']} x {p['size']} px ({km2:.2f} km^2), {p['start']}..{p['end']}, `tiny` model "
            f"on {device}: one forecast init (4 leads; 1 or 4 members) and anomaly surprise for every acquisition "
            f"from {p['score_from']}, {how}; then a scheduled tick with the surprise record (a year of history).")
    notes = [f"{k}: {v['seconds']:.1f} s ({v['cpu_s']:.1f} CPU s, {v['torch_threads']} torch threads) for {v['n']} "
             f"init(s)/acquisition(s), of which {v['model_s']:.1f} s in {v['model_calls']} model calls "
             f"(JEPA.encode / predict); peak RSS "
             f"{v['peak_rss_bytes'] / 2**20:.0f} MiB of which {v['baseline_rss_bytes'] / 2**20:.0f} MiB held before "
             f"the stage (imports); 1-min load average {v['load_avg_1m_at_start']} at start"
             for k, v in details.items()]
    if not any("bf16" in k for k in results):
        notes.append("bf16: not run (the device has no bfloat16 arithmetic, where bf16 is not faster than fp32)")
    return {"results": {"headline": results, "description": desc, "notes": notes, "region_km2": km2,
                        "size_px": p["size"], "params": p, "device": device, "details": details,
                        "setup_s": {k: round(v, 2) for k, v in setup_s.items()}}, "targets": {}}


def _bf16(cube: Path, run_dir: Path, score_from: str, km2: float, threads: int | None, here: bool, workdir: Path,
          details: dict) -> dict:
    """The 1-member forecast and the surprise again at ``--precision bf16``, with their largest departures from
    fp32 (NDVI; cosine distance); only where the device has bfloat16 arithmetic (elsewhere it is not faster)."""
    import numpy as np

    from geowm.inference import has_bf16
    from geowm.train import pick_device

    if not has_bf16(pick_device("auto")):  # the device the stages' models run on
        return {}  # the notes say so
    out, arrays, speed = {}, {}, {}
    for stage, extra in (("forecast", {"members": 1}), ("anomaly", {"start": score_from})):
        for prec in ("fp32", "bf16"):
            path = workdir / f"{stage}_{prec}.npy"
            r = run_stage(stage, {"cube": str(cube), "run": str(run_dir), "threads": threads, "precision": prec,
                                  "save": str(path), **extra}, in_process=here)
            arrays[(stage, prec)] = np.load(path)
            path.unlink()
            n = r.get("scored_dates", 1)
            name = "forecast_m1" if stage == "forecast" else stage
            speed[prec] = km2 * n / r["seconds"]
            details[f"{name}_{prec}_paired"] = {**r, "n": n}
        out[f"{name}_bf16_km2_per_s"] = round(speed["bf16"], 3)
        out[f"{name}_bf16_speedup"] = round(speed["bf16"] / speed["fp32"], 3)  # against the fp32 run just before
    nd = np.abs(arrays[("forecast", "bf16")] - arrays[("forecast", "fp32")])
    sd = np.abs(arrays[("anomaly", "bf16")] - arrays[("anomaly", "fp32")])
    out["forecast_bf16_ndvi_max_abs_dev"] = round(float(np.nanmax(nd)), 5)
    out["forecast_bf16_ndvi_mean_abs_dev"] = round(float(np.nanmean(nd)), 6)
    out["anomaly_bf16_surprise_max_abs_dev"] = round(float(np.nanmax(sd)), 5)
    return out


def _tick(workdir: Path, region: Path, cube: Path, run_dir: Path, start: str, threads: int | None,
          in_process: bool) -> tuple[dict, dict, int]:
    """A scheduled tick (see the module docstring): the first scoring's and the tick's measurements and the
    number of acquisitions the tick brought."""
    import numpy as np

    from flows.simulator import release
    from geowm.cube import IngestOptions, ingest
    from geowm.cube.store import open_cube

    watched, tick_cube, alerts = workdir / "tick_watched", workdir / "tick_cube", workdir / "tick_alerts"
    for d in (watched, tick_cube, alerts):
        remove(d)
    ds = open_cube(cube)
    clear = ds["valid"].mean(("y", "x")).values
    days = ds["time"].values.astype("datetime64[D]")
    cut = days[np.flatnonzero(clear >= 0.5)[-1]]  # the tick brings the last mostly clear acquisition
    args = {"cube": str(tick_cube), "run": str(run_dir), "history_days": 365.0,
            "record": str(alerts / "surprise.zarr"), "threads": threads}

    def arrive(until, score_from) -> dict:  # the scenes up to ``until`` (a UTC day) arrive, are ingested and scored
        release(region, watched, str(until))
        ingest(watched, tick_cube, IngestOptions(scheduler="synchronous"))
        return run_stage("detect", {**args, "start": str(score_from)}, in_process=in_process)

    first = arrive(cut - np.timedelta64(1, "D"), start)
    return first, arrive(cut, cut), int((days == cut).sum())


if __name__ == "__main__":
    print(json.dumps(run("smoke", Path("benchmarks/work/forecast")), indent=1, default=str))
