"""How each stage's cost grows with region size: 1x, 4x, 16x area; target linear or better.

For each region side s (quick 128 / 256 / 512 px, full 256 / 512 / 1024, smoke 64 / 128) a synthetic
region (``geowm.synth.generate``, same seed and dates at every size; kept under the work folder and
reused while its parameters match) goes through the data path, each stage in a fresh process
(:mod:`benchmarks.stages`: forked from a forkserver that has imported torch and geowm, peak RSS
reset, then the timed stage; smoke mode runs the stages in this process, to be fast):

Every stage runs on one core (ingest ``scheduler="synchronous"``, torch with 1 intra-op thread): the
exponents should measure the code, not how busy the shared cores were.

* ``ingest``: ``geowm.cube.ingest`` of every scene;
* ``loader``: open the cube, index its windows (``CubeWindows``, non-overlapping: stride = frames) and read
  every window once through ``geowm.data.loader`` (0 workers, batches of 8): one pass over the region;
* ``train``: ``geowm.train.train`` (``tiny``, a fixed number of steps, 0 loader workers): normalisation
  statistics, window index, the steps and the checkpoint. The steps themselves do not depend on the
  region; a training *epoch* has as many windows as the loader's pass;
* ``forecast``: ``geowm.forecast.forecast`` of one init over the whole region (4 leads);
* ``anomaly``: ``geowm.anomaly.surprise`` of every acquisition from ``score_from`` over the whole region.

Forecast and anomaly use the run trained at the smallest size (with probes fitted, untimed). The
exponent k of cost ~ area^k is the least-squares slope of log(cost) on log(area) over the sizes;
the segment slopes (between consecutive sizes) are reported too. Time: the stage process's CPU
seconds (one core; what it would take on an idle core) and its wall seconds (which on shared,
busy cores also count waiting for a core). Memory: the stage's peak resident set above what the
process held after its imports (the imports, ~0.5 GB with torch, do not grow with the region), and
the peak itself. Targets: CPU-time and memory exponents <= 1.1 for every stage.
A log-log plot goes to ``scaling.png`` next to the JSON.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from benchmarks._util import remove, target_max
from benchmarks.stages import STAGES, run_stage

PARAMS = {
    "full": {"sizes": (256, 512, 1024), "start": "2021-01-01", "end": "2021-06-30", "score_from": "2021-06-01",
             "frames": 8, "win": 64, "train_steps": 6, "train_batch": 8, "members": 4, "repeats": 2},
    "quick": {"sizes": (128, 256, 512), "start": "2021-03-01", "end": "2021-06-30", "score_from": "2021-06-20",
              "frames": 8, "win": 64, "train_steps": 2, "train_batch": 4, "members": 1, "repeats": 1},
    "smoke": {"sizes": (64, 128), "start": "2021-03-01", "end": "2021-05-15", "score_from": "2021-05-01",
              "frames": 4, "win": 32, "train_steps": 2, "train_batch": 2, "members": 1, "repeats": 1},
}
SEED = 11
PIXEL_M = 10.0  # synthetic pixels are 10 m
MAX_EXPONENT = 1.1
MIN_MEMORY_MIB = 1.0  # memory above baseline is floored here before taking logs
THREADS = 1  # torch intra-op threads per stage: one core, so the exponents measure the code, not the contention


def fit_exponent(area: list[float], cost: list[float]) -> float:
    """Least-squares slope of log(cost) on log(area)."""
    x, y = np.log(np.asarray(area, float)), np.log(np.asarray(cost, float))
    return float(np.polyfit(x, y, 1)[0])


def segment_exponents(area: list[float], cost: list[float]) -> list[float]:
    return [float(math.log(cost[i + 1] / cost[i]) / math.log(area[i + 1] / area[i])) for i in range(len(area) - 1)]


def _best(runs: list[dict]) -> dict:
    """The fastest of repeated runs of one stage (the least disturbed by other work on the machine)."""
    return min(runs, key=lambda r: r["seconds"])


def stage_args(stage: str, p: dict, cube: Path, catalog: Path, run_dir: Path, infer_run: Path,
               first: bool) -> dict:
    return {**_stage_args(stage, p, cube, catalog, run_dir, infer_run, first), "threads": THREADS}


def _stage_args(stage: str, p: dict, cube: Path, catalog: Path, run_dir: Path, infer_run: Path,
                first: bool) -> dict:
    if stage == "ingest":
        return {"catalog": str(catalog), "cube": str(cube), "scheduler": "synchronous"}
    if stage == "loader":
        return {"cube": str(cube), "frames": p["frames"], "size": p["win"]}
    if stage == "train":
        return {"cube": str(cube), "run": str(run_dir), "steps": p["train_steps"], "batch": p["train_batch"],
                "frames": p["frames"], "size": p["win"], "probes": first}
    if stage == "forecast":
        return {"cube": str(cube), "run": str(infer_run), "members": p["members"]}
    return {"cube": str(cube), "run": str(infer_run), "start": p["score_from"]}


def plot(path: Path, sizes: list[int], per_stage: dict, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    area = np.array([(s * PIXEL_M / 1000) ** 2 for s in sizes])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    for ax, key, exp_key, label in ((axes[0], "cpu_seconds", "cpu_time_exponent", "stage CPU time (s, one core)"),
                                    (axes[1], "memory_MiB", "memory_exponent",
                                     "peak RSS above post-import baseline (MiB)")):
        for stage, r in per_stage.items():
            y = np.array(r[key], float)
            ax.loglog(area, y, "o-", label=f"{stage} (k={r[exp_key]:.2f})")
        ref = np.array(per_stage[next(iter(per_stage))][key], float)
        ax.loglog(area, ref[0] * area / area[0], "k:", lw=1, label="linear (k=1) reference")
        ax.set_xlabel("region area (km$^2$)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"geowm stage cost vs region area ({mode}; sides {', '.join(map(str, sizes))} px; "
                 "cost ~ area^k, target k <= 1.1)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(mode: str, workdir: Path) -> dict:
    from benchmarks.bench_ingest import source_region

    p = PARAMS[mode]
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = list(p["sizes"])
    raw: dict[str, dict[int, list[dict]]] = {s: {} for s in STAGES}
    regions = {}
    infer_run = workdir / "runs" / f"s{sizes[0]}"
    try:
        for k, size in enumerate(sizes):
            region, gen_s = source_region(workdir, size, p["start"], p["end"], SEED)
            regions[size] = {"generated_s": None if gen_s is None else round(gen_s, 2), "reused": gen_s is None,
                             "n_acquisitions": len(json.loads((region / "synth.json").read_text())["acquisitions"])}
            cube = workdir / "cubes" / f"s{size}"
            for stage in STAGES:
                run_dir = workdir / "runs" / f"s{size}"
                for rep in range(p["repeats"]):
                    args = stage_args(stage, p, cube, region / "stac" / "catalog.json", run_dir, infer_run,
                                      first=k == 0 and rep == p["repeats"] - 1)
                    r = run_stage(stage, args, in_process=mode == "smoke")
                    raw[stage].setdefault(size, []).append(r)
                    print(f"[scaling] {size} px {stage}: {r['seconds']:.2f} s, peak RSS "
                          f"{r['peak_rss_bytes'] / 2**20:.0f} MiB (load {r['load_avg_1m_at_start']})", flush=True)
    finally:
        remove(workdir / "cubes")
        for size in sizes[1:]:
            remove(workdir / "runs" / f"s{size}")

    area = [(s * PIXEL_M / 1000) ** 2 for s in sizes]
    per_stage, headline, targets, notes = {}, {}, {}, []
    for stage in STAGES:
        best = [_best(raw[stage][s]) for s in sizes]
        secs = [b["seconds"] for b in best]
        cpu = [max(b["cpu_s"], 1e-3) for b in best]
        peak = [b["peak_rss_bytes"] / 2**20 for b in best]
        above = [max((b["peak_rss_bytes"] - b["baseline_rss_bytes"]) / 2**20, MIN_MEMORY_MIB) for b in best]
        r = {"seconds": [round(x, 3) for x in secs], "cpu_seconds": [round(x, 3) for x in cpu],
             "peak_rss_MiB": [round(x, 1) for x in peak],
             "memory_MiB": [round(x, 1) for x in above],
             "baseline_rss_MiB": [round(b["baseline_rss_bytes"] / 2**20, 1) for b in best],
             "time_exponent": fit_exponent(area, secs), "cpu_time_exponent": fit_exponent(area, cpu),
             "memory_exponent": fit_exponent(area, above),
             "peak_rss_exponent": fit_exponent(area, peak),
             "time_segment_exponents": [round(x, 3) for x in segment_exponents(area, secs)],
             "cpu_time_segment_exponents": [round(x, 3) for x in segment_exponents(area, cpu)],
             "memory_segment_exponents": [round(x, 3) for x in segment_exponents(area, above)],
             "all_seconds": {str(s): [round(x["seconds"], 3) for x in raw[stage][s]] for s in sizes},
             "load_avg_1m": {str(s): [x["load_avg_1m_at_start"] for x in raw[stage][s]] for s in sizes},
             "import_s": [round(b["import_s"], 2) for b in best],
             "cuda_max_allocated_MiB": [None if b["cuda_max_allocated_bytes"] is None
                                        else round(b["cuda_max_allocated_bytes"] / 2**20, 1) for b in best],
             "details": {str(s): {k: v for k, v in b.items() if k not in ("stage",)} for s, b in zip(sizes, best,
                                                                                                      strict=True)}}
        for key in ("time_exponent", "cpu_time_exponent", "memory_exponent", "peak_rss_exponent"):
            r[key] = round(r[key], 3)
        per_stage[stage] = r
        headline[f"{stage}_cpu_time_exponent"] = r["cpu_time_exponent"]
        headline[f"{stage}_time_exponent"] = r["time_exponent"]
        headline[f"{stage}_memory_exponent"] = r["memory_exponent"]
        headline[f"{stage}_s_at_largest"] = round(secs[-1], 3)
        headline[f"{stage}_peak_rss_MiB_at_largest"] = round(peak[-1], 1)
        if best[-1]["cuda_max_allocated_bytes"] is not None:
            headline[f"{stage}_cuda_max_allocated_MiB_at_largest"] = r["cuda_max_allocated_MiB"][-1]
        for key in ("cpu_time_exponent", "memory_exponent"):
            targets[f"{stage}_{key}"] = target_max(f"{stage}_{key}", r[key], MAX_EXPONENT)

    # throughputs at the largest size
    big = {st: per_stage[st]["details"][str(sizes[-1])] for st in STAGES}
    km2 = area[-1]
    headline["ingest_MBps_at_largest"] = round(big["ingest"]["source_MB"] / big["ingest"]["seconds"], 2)
    headline["loader_windows_per_s_at_largest"] = round(big["loader"]["windows"] / big["loader"]["seconds"], 1)
    headline["forecast_km2_per_s_at_largest"] = round(km2 / big["forecast"]["seconds"], 3)
    headline["anomaly_km2_per_s_at_largest"] = round(km2 * big["anomaly"]["scored_dates"]
                                                     / big["anomaly"]["seconds"], 3)
    throughput = {
        "ingest_MBps": [round(per_stage["ingest"]["details"][str(s)]["source_MB"] / per_stage["ingest"]["seconds"][i],
                              2) for i, s in enumerate(sizes)],
        "loader_windows": [per_stage["loader"]["details"][str(s)]["windows"] for s in sizes],
        "loader_windows_per_s": [round(per_stage["loader"]["details"][str(s)]["windows"]
                                       / per_stage["loader"]["seconds"][i], 1) for i, s in enumerate(sizes)],
        "forecast_km2_per_s": [round(a / per_stage["forecast"]["seconds"][i], 3) for i, a in enumerate(area)],
        "anomaly_km2_per_s": [round(a * per_stage["anomaly"]["details"][str(s)]["scored_dates"]
                                    / per_stage["anomaly"]["seconds"][i], 3) for i, (a, s) in
                              enumerate(zip(area, sizes, strict=True))],
    }
    png = workdir / "scaling.png"
    plot(png, sizes, per_stage, mode)

    slow = [st for st in STAGES if not targets[f"{st}_cpu_time_exponent"]["met"]]
    heavy = [st for st in STAGES if not targets[f"{st}_memory_exponent"]["met"]]
    seg = {st: ", ".join(f"{x:.2f}" for x in per_stage[st]["cpu_time_segment_exponents"]) for st in STAGES}
    notes.append("CPU-time exponents (fit over all sizes; segments between consecutive sizes): " + "; ".join(
        f"{st} {per_stage[st]['cpu_time_exponent']:.2f} ({seg[st]})" for st in STAGES))
    notes.append("targets are on CPU time (the stage process's own CPU seconds, one core): on shared cores wall "
                 "time also measures how long the process waited for a core; wall-time exponents (*_time_exponent) "
                 "are reported beside them: " + "; ".join(f"{st} {per_stage[st]['time_exponent']:.2f}"
                                                          for st in STAGES))
    notes.append("memory above the post-import baseline (MiB, per size): " + "; ".join(
        f"{st} {' / '.join(f'{x:.0f}' for x in per_stage[st]['memory_MiB'])}" for st in STAGES)
        + f" (baseline after imports ~{per_stage['forecast']['baseline_rss_MiB'][-1]:.0f} MiB)")
    notes.append("every stage linear or better in time and memory" if not slow and not heavy else
                 f"above linear: time {', '.join(slow) or 'none'}; memory {', '.join(heavy) or 'none'}")
    notes.append("exponents below 1 come from fixed costs (opening the cube, loading the model, the training steps, "
                 "which do not depend on the region); the segment exponent of the two largest sizes is the closest "
                 "to the asymptotic growth")
    how = "in the benchmark's process (smoke mode)" if mode == "smoke" else "in its own process"
    notes.append(f"each stage {how} ({mode}: {p['repeats']} run(s) per stage and size, fastest kept); "
                 "the 1-min load average when each started is in the JSON (cores shared with other work)")
    device = big["forecast"]["device"]
    return {
        "results": {
            "description": (f"Synthetic regions of {', '.join(f'{s} x {s}' for s in sizes)} px "
                            f"({', '.join(f'{a:g}' for a in area)} km^2), {p['start']}..{p['end']}, every stage in "
                            f"its own process on {device}, one core (loader pass over all non-overlapping "
                            f"{p['frames']} x {p['win']} px windows; train tiny {p['train_steps']} steps, batch "
                            f"{p['train_batch']}; forecast 1 init, 4 leads, {p['members']} member(s); anomaly "
                            f"surprise from {p['score_from']}): cost ~ area^k."),
            "headline": headline,
            "params": {**p, "sizes": sizes, "seed": SEED},
            "area_km2": area,
            "regions": {str(s): v for s, v in regions.items()},
            "stages": per_stage,
            "throughput": throughput,
            "device": device,
            "cores": os.cpu_count(),
            "notes": notes,
        },
        "targets": targets,
        "artifacts": [str(png)],
    }


if __name__ == "__main__":
    print(json.dumps(run("smoke", Path("benchmarks/work/scaling")), indent=1, default=str))
