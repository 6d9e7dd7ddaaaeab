"""Shared set-up of the skill and efficiency benchmarks: one seeded synthetic region, its cube, and two
training runs with the same budget (the JEPA and the pixel-space generative baseline), snapshotted at
checkpoints along the way.

``prepare(mode, workdir)`` builds everything once and caches it under ``<work>/_skill_shared/<mode>``, keyed
by the parameters and the source of ``geowm`` (a code change rebuilds it), so ``bench_skill`` and
``bench_efficiency`` share the region and the runs in one ``benchmarks.run`` (and either runs alone too).

Training goes through the public ``geowm.train.train`` (same ``TrainConfig`` for both models but
``model.kind``), stopped at each checkpoint step (``stop_at``) and resumed (``resume=True``; the data order
and masks depend only on (seed, step), so the stops change nothing); each checkpoint's run directory is
copied to ``snapshots/<kind>/step_<n>``. Training wall seconds are the sum of the loop's ``step_seconds``
(data loading included, checkpoint writing and start-up not).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("jepa", "pixel")
SMALL = dict(dim=48, depth=2, heads=2, pred_dim=24, pred_depth=1, pred_heads=2)  # smoke mode only

PARAMS: dict[str, dict] = {
    # 1024 x 1024 px (105 km^2), two years: every disturbance type is forced (geowm.synth: size >= 256 and a
    # year or more); train on the first 15 months, hold out the last 9.
    "full": dict(size=1024, start="2021-01-01", end="2022-12-31", seed=21, train_until="2022-03-31",
                 held_from="2022-04-01", preset="tiny", steps=120, batch_size=8, checkpoints=(15, 30, 60, 120),
                 leads=(5, 10, 20, 30), init_every=60, history_days=60, probe_windows=48,
                 eff_px=256, eff_leads=(10, 20, 30), eff_init_every=60, window={}, model={}),
    "quick": dict(size=256, start="2021-01-01", end="2022-12-31", seed=21, train_until="2022-03-31",
                  held_from="2022-04-01", preset="tiny", steps=20, batch_size=8, checkpoints=(5, 10, 20),
                  leads=(5, 10, 20, 30), init_every=90, history_days=60, probe_windows=8,
                  eff_px=128, eff_leads=(10, 30), eff_init_every=90, window={}, model={}),
    "smoke": dict(size=128, start="2021-01-01", end="2021-08-31", seed=21, train_until="2021-05-31",
                  held_from="2021-06-01", preset="tiny", steps=4, batch_size=2, checkpoints=(2, 4),
                  leads=(10, 20), init_every=40, history_days=60, probe_windows=4,
                  eff_px=128, eff_leads=(10, 20), eff_init_every=60, window=dict(frames=4, size=32), model=SMALL),
}


DATA_KEYS = ("size", "start", "end", "seed")
_MEMO: dict[str, dict] = {}  # mode -> set-up made or checked in this process (a later benchmark reuses it)


def _fingerprint(p: dict, sources=("geowm",), this_file: bool = True) -> str:
    h = hashlib.sha256(json.dumps(p, sort_keys=True).encode())
    for f in [Path(__file__)] * this_file + sorted(f for d in sources for f in (ROOT / d).rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def train_config(p: dict, kind: str):
    from geowm.data import WindowConfig
    from geowm.train import TrainConfig

    return TrainConfig(preset=p["preset"], steps=p["steps"], batch_size=p["batch_size"], workers=0, seed=0,
                       train_until=p["train_until"], log_every=1, checkpoint_every=10**9,
                       window=WindowConfig(**p["window"]), model={**p["model"], "kind": kind})


def _train_with_snapshots(cube: Path, run: Path, snaps: Path, p: dict, kind: str) -> list[dict]:
    from geowm.train import train

    cfg = train_config(p, kind)
    out = []
    for i, step in enumerate(p["checkpoints"]):
        train(str(cube), run, cfg, resume=i > 0, stop_at=step)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        dest = snaps / kind / f"step_{step}"
        shutil.copytree(run, dest)
        out.append({"step": step, "run": str(dest), "train_s": round(sum(r["step_seconds"] for r in rows), 2),
                    "loss_last20": sum(r["loss"] for r in rows[-20:]) / len(rows[-20:])})
    return out


def prepare(mode: str, workdir: Path, log=print) -> dict:
    """Region, cube, both runs and their snapshots for ``mode``; cached (see the module doc). Returns
    ``{"params", "region", "cube", "runs": {kind: run dir}, "snapshots": {kind: [{step, run, train_s}]},
    "setup_s": {...}}``."""
    import time

    p = PARAMS[mode]
    if mode in _MEMO:
        return _MEMO[mode]
    root = Path(workdir).parent / "_skill_shared" / mode
    fp = _fingerprint(p)
    meta_path = root / "setup.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp:
            log(f"[skill setup] reusing {root}")
            _MEMO[mode] = meta
            return meta
    from geowm.cube import IngestOptions, ingest
    from geowm.synth import generate
    from geowm.train import evaluate_run

    # the region and cube depend only on the data parameters and the generator / ingest code: kept when only
    # the training or scoring settings changed
    data_fp = _fingerprint({k: p[k] for k in DATA_KEYS}, ("geowm/synth", "geowm/cube"), this_file=False)
    data_path = root / "data.json"
    old_setup = json.loads(meta_path.read_text()).get("setup_s", {}) if meta_path.exists() else {}
    times = {}
    if data_path.exists() and json.loads(data_path.read_text()).get("fingerprint") == data_fp:
        log(f"[skill setup] reusing the region and cube in {root}")
        times.update({k: old_setup[k] for k in ("synth_s", "ingest_s") if k in old_setup})
        for sub in ("runs", "snapshots"):
            shutil.rmtree(root / sub, ignore_errors=True)
        meta_path.unlink(missing_ok=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        t = time.perf_counter()
        generate(root / "region", size=p["size"], start=p["start"], end=p["end"], seed=p["seed"])
        times["synth_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ingest(root / "region" / "stac" / "catalog.json", root / "cube", IngestOptions(scheduler="threads"))
        times["ingest_s"] = time.perf_counter() - t
        data_path.write_text(json.dumps({"fingerprint": data_fp, **{k: p[k] for k in DATA_KEYS}}))
    snapshots = {}
    for kind in KINDS:
        t = time.perf_counter()
        log(f"[skill setup] training {kind} ({p['steps']} steps, checkpoints {p['checkpoints']})")
        snapshots[kind] = _train_with_snapshots(root / "cube", root / "runs" / kind, root / "snapshots", p, kind)
        times[f"train_{kind}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    evaluate_run(root / "runs" / "jepa", n_windows=p["probe_windows"])  # probes: NDVI decoding of the JEPA
    times["probes_s"] = time.perf_counter() - t
    meta = {"fingerprint": fp, "mode": mode, "params": p, "region": str(root / "region"), "cube": str(root / "cube"),
            "runs": {k: str(root / "runs" / k) for k in KINDS}, "snapshots": snapshots,
            "setup_s": {k: round(v, 1) for k, v in times.items()}}
    meta["torch_threads"] = _threads()
    meta_path.write_text(json.dumps(meta, indent=1))
    _MEMO[mode] = meta
    return meta


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def flops_per_step(cube: str, run: str, p: dict, kind: str, n_steps: int = 4) -> float:
    """Mean FLOPs of one training step (forward + backward; ``torch.utils.flop_counter.FlopCounterMode``:
    matmuls, attention) of the run's model on real training batches with the training loop's masks."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from geowm.data import CubeWindows, StepBatchSampler, loader
    from geowm.model import ModelConfig, build_model

    conf = json.loads((Path(run) / "config.json").read_text())
    cfg = train_config(p, kind)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(conf["model"]))
    ds = CubeWindows(cube, cfg.window, conf["data"]["stats"], (None, np.datetime64(conf["data"]["train_until"])),
                     snapshot=conf["data"]["snapshot"])
    total = []
    for step, batch in enumerate(loader(ds, StepBatchSampler(len(ds), cfg.batch_size, cfg.seed, 0, n_steps), 0)):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7919)  # as geowm.train draws masks
        counter = FlopCounterMode(display=False)
        with counter:
            out = model({k: v for k, v in batch.items()}, generator=gen)
            out["loss"].backward()
        model.zero_grad(set_to_none=True)
        total.append(counter.get_total_flops())
    return float(np.mean(total))


def events_summary(events_path: str, held_from: str) -> dict:
    """Ground-truth events per type: in the whole record and starting in the held-out period."""
    from geowm.metrics import load_events

    ev = load_events(events_path)
    held = ev[ev["start"] >= held_from]
    return {"all": {str(k): int(v) for k, v in ev["type"].value_counts().items()},
            "held_out": {str(k): int(v) for k, v in held["type"].value_counts().items()}}
