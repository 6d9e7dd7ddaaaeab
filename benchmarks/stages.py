"""One pipeline stage in a fresh process, timed, with its own peak memory.

:func:`run_stage` runs one stage of the data path (``ingest``, ``loader``, ``train``, ``forecast`` or
``anomaly``) in a new process forked from a forkserver that has imported torch and geowm (so the
imports are paid once, and each stage starts from the same clean state; ingest, which needs no
torch, in a spawned process) and returns what
:func:`measure` reports there. The stage's imports happen first; then the process's resident set
is read (``baseline_rss``), its peak resident set is reset (``/proc/self/clear_refs`` = 5, so the
import transient does not count) and, on CUDA, the allocator's peak statistics are reset; the stage
runs (``seconds``); then ``peak_rss`` (VmHWM: the largest resident set while the stage ran, baseline
included) and ``cuda_max_allocated`` are read. Untimed follow-up work (fitting probes after the
smallest training run) comes after the reading.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path

STAGES = ("ingest", "loader", "train", "forecast", "anomaly")


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def model_clock():
    """While open, ``JEPA.encode`` and ``JEPA.predict`` add their wall time (CUDA synchronised before and after:
    the callers copy the results to the CPU at once, so this adds no wait) to the yielded dict's ``model_s``
    and count calls in ``model_calls``: how much of a stage the model's compute is, the rest being reading,
    choosing contexts and decoding."""
    import torch

    from geowm.model import JEPA

    spent = {"model_s": 0.0, "model_calls": 0}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    saved = {name: JEPA.__dict__[name] for name in ("encode", "predict")}

    def clocked(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                spent["model_s"] += time.perf_counter() - t0
                spent["model_calls"] += 1
        return call

    for name, fn in saved.items():
        setattr(JEPA, name, clocked(fn))
    try:
        yield spent
    finally:
        for name, fn in saved.items():
            setattr(JEPA, name, fn)


# ------------------------------------------------------------------------------------------- stages
# each returns (timed work: () -> extra result dict, untimed follow-up or None)


def _ingest(a: dict):
    from benchmarks._util import mb, remove
    from geowm.cube import IngestOptions, ingest

    remove(Path(a["cube"]))

    def work() -> dict:
        r = ingest(a["catalog"], a["cube"], IngestOptions(scheduler=a.get("scheduler", "synchronous")))
        return {"source_MB": round(mb(r.source_bytes), 2), "n_times": len(r.added_times)}
    return work, None


def _loader(a: dict):
    import numpy as np

    from geowm.data import CubeReader, CubeWindows, WindowConfig, loader

    def work() -> dict:
        reader = CubeReader(a["cube"])
        C = reader.shape[1]
        cfg = WindowConfig(frames=a["frames"], size=a["size"], stride_frames=a["frames"])  # one pass, no overlap
        ds = CubeWindows(reader, cfg, {"mean": [0.0] * C, "std": [1.0] * C})
        idx = list(range(len(ds)))
        batches = [idx[k: k + a.get("batch", 8)] for k in range(0, len(idx), a.get("batch", 8))]
        n = px = 0
        for b in loader(ds, batches, workers=0):
            n += b["pixels"].shape[0]
            px += int(np.prod(b["pixels"].shape))
        return {"windows": n, "delivered_MB": round(px * 4 / 1e6, 2)}
    return work, None


def _train(a: dict):
    from benchmarks._util import remove
    from geowm.data import WindowConfig
    from geowm.train import TrainConfig, evaluate_run, train

    remove(Path(a["run"]))
    stamps: list[float] = []
    cfg = TrainConfig(preset=a.get("preset", "tiny"), steps=a["steps"], batch_size=a["batch"], workers=0,
                      window=WindowConfig(frames=a["frames"], size=a["size"]), log_every=a["steps"],
                      checkpoint_every=10**9)

    def work() -> dict:
        t0 = time.perf_counter()
        train(a["cube"], a["run"], cfg, progress=lambda step, total, row: stamps.append(time.perf_counter()))
        per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
        return {"steps": len(stamps), "batch": a["batch"], "first_step_done_s": round(stamps[0] - t0, 3),
                "s_per_step_after_first": None if per_step is None else round(per_step, 4)}

    def probes() -> None:  # untimed: the forecast and anomaly stages decode with the run's probes
        evaluate_run(a["run"], n_windows=4)
    return work, probes if a.get("probes") else None


def _model(a: dict):
    """The stage's model: the run at ``a["precision"]`` (default fp32), on torch's default device."""
    from geowm.inference import WorldModel

    return WorldModel(a["run"], precision=a.get("precision", "fp32"))


def _save(a: dict, values) -> None:
    """Keep a stage's output array where ``a["save"]`` asks (an .npy path), for comparing runs."""
    if a.get("save"):
        import numpy as np

        np.save(a["save"], values)


def _forecast(a: dict):
    from geowm.forecast import forecast

    def work() -> dict:
        with model_clock() as spent:
            fc = forecast(a["cube"], _model(a), leads=tuple(a.get("leads", (5, 10, 20, 30))), members=a["members"])
        _save(a, fc["ndvi"].values)
        return {"members": a["members"], "leads": int(fc.sizes["lead_time"]), "y": int(fc.sizes["y"]),
                "x": int(fc.sizes["x"]), "precision": fc.attrs["geowm:precision"], **spent}
    return work, None


def _anomaly(a: dict):
    from geowm.anomaly import surprise

    def work() -> dict:
        with model_clock() as spent:
            s = surprise(a["cube"], _model(a), start=a["start"])
        _save(a, s["surprise"].values)
        return {"scored_dates": int(s.sizes["time"]), "py": int(s.sizes["py"]), "px": int(s.sizes["px"]),
                "precision": s.attrs["geowm:precision"], **spent}
    return work, None


def _detect(a: dict):
    from geowm.anomaly import detect

    def work() -> dict:
        with model_clock() as spent:
            scores, alerts = detect(a["cube"], a["run"], a["start"], history_days=a["history_days"],
                                    record=a["record"])
        return {"scored_dates": int(scores.sizes["time"]), "computed_dates": int(scores.attrs["geowm:computed_dates"]),
                "reused_dates": int(scores.attrs["geowm:reused_dates"]), "alerts": len(alerts), **spent}
    return work, None


STAGE_FUNCS = {"ingest": _ingest, "loader": _loader, "train": _train, "forecast": _forecast, "anomaly": _anomaly,
               "detect": _detect}
PRELOAD = ["torch", "geowm.cube", "geowm.data", "geowm.train", "geowm.forecast", "geowm.anomaly", "benchmarks.stages"]
NO_TORCH = {"ingest"}  # stages whose real processes do not import torch: a fresh (spawned) process, not the forkserver


def measure(stage: str, args: dict) -> dict:
    """Run ``stage`` in this process and measure it (see the module docstring)."""
    t_start = time.perf_counter()
    work, after = STAGE_FUNCS[stage](args)
    import sys

    torch = sys.modules.get("torch")  # ingest does not import it
    saved_threads = torch.get_num_threads() if torch else None
    if torch and args.get("threads"):  # CPU intra-op threads for this stage (default: torch's default)
        torch.set_num_threads(int(args["threads"]))
    cuda = bool(torch) and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    import_s = time.perf_counter() - t_start
    baseline = _status_kib("VmRSS:")
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    t_cpu = time.process_time()
    try:
        extra = work()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        cpu_s = time.process_time() - t_cpu
        threads = torch.get_num_threads() if torch else None
    finally:
        if torch:
            torch.set_num_threads(saved_threads)
    peak = _status_kib("VmHWM:")
    out = {"stage": stage, "seconds": seconds, "cpu_s": cpu_s, "import_s": import_s,
           "baseline_rss_bytes": None if baseline is None else baseline * 1024,
           "peak_rss_bytes": None if peak is None else peak * 1024, "peak_rss_reset": reset,
           "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "cuda_max_allocated_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
           "torch_threads": threads, **extra}
    if after is not None:
        t1 = time.perf_counter()
        after()
        out["untimed_followup_s"] = time.perf_counter() - t1
    return out


def _child(stage: str, args: dict, conn) -> None:
    try:
        conn.send({"ok": measure(stage, args)})
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        import traceback

        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


_CTX = None


def _context(stage: str):
    """A forkserver that has imported torch and geowm once: each stage then runs in a fresh process forked
    from it (clean peak RSS, baseline = the imports) without paying ~5 s of imports per stage. Stages that
    do not need torch (ingest) run in a spawned process instead, so their memory is what theirs would be."""
    global _CTX
    import multiprocessing as mp

    if stage in NO_TORCH:
        return mp.get_context("spawn")
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def run_stage(stage: str, args: dict, in_process: bool = False, timeout: float = 3600) -> dict:
    """Run ``stage`` in a fresh process forked from the forkserver (or, ``in_process``, here: smoke mode);
    returns :func:`measure`'s dict plus the wall time and the 1-min load average when it started.
    Raises RuntimeError if the stage fails."""
    load = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    if in_process:
        res = measure(stage, args)
    else:
        ctx = _context(stage)
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(stage, args, send), name=f"stage-{stage}")
        proc.start()
        send.close()
        try:
            if not recv.poll(timeout):
                proc.kill()
                raise RuntimeError(f"stage {stage} did not finish in {timeout} s")
            msg = recv.recv()
        except EOFError:
            msg = {"error": f"process died (exit code {proc.exitcode})"}
        finally:
            proc.join()
        if "error" in msg:
            raise RuntimeError(f"stage {stage} failed: {msg['error'].strip().splitlines()[-1]}")
        res = msg["ok"]
    return {**res, "process_wall_s": time.perf_counter() - t0, "load_avg_1m_at_start": load,
            "in_process": in_process}
