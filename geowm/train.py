"""Training the JEPA on a cube: one config object, one loop, self-describing run directories.

A run directory holds ``config.json`` (model + training config, bands, normalisation statistics,
tile grid, cube snapshot, code version), ``model.safetensors`` (encoder, EMA target encoder,
predictor), ``optimizer.pt`` (optimizer state and step; loaded with ``weights_only=True``),
``checkpoint.json`` (step and the SHA-256 of the weights) and ``metrics.jsonl``. A checkpoint is written
beside the current one (``*.next``) and moved in place once complete, so a run killed at any point resumes
from its last complete checkpoint.

Data order and masks depend only on (seed, step, rank), so ``--resume`` continues exactly: on CPU
the losses after a resume equal those of an uninterrupted run. DDP: run under ``torchrun`` (gloo
on CPU, NCCL on CUDA); rank 0 writes the run directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from geowm.atomic import atomic_write_text
from geowm.data import CubeReader, CubeWindows, StepBatchSampler, WindowConfig, band_stats, loader, window_cache_mb
from geowm.model import JEPA, ModelConfig, build_model


class RunError(ValueError):
    """A run directory, checkpoint or training config cannot be used; the message says which and why."""


@dataclass
class TrainConfig:
    """Everything a training run needs besides the cube. Units: steps, minutes, days, fractions."""

    preset: str = "tiny"
    steps: int | None = None  # total optimizer steps; or
    minutes: float | None = None  # a wall-clock budget (total steps estimated from the first steps)
    batch_size: int = 8
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_frac: float = 0.05  # cosine decays to lr * min_lr_frac
    warmup_frac: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    train_until: str | None = None  # last date (YYYY-MM-DD) of training windows; later dates are held out
    workers: int = 1  # DataLoader worker processes
    log_every: int = 10
    health_every: int = 50
    checkpoint_every: int = 200
    window: WindowConfig = field(default_factory=lambda: WindowConfig(seasonal_frames=4))
    model: dict = field(default_factory=dict)  # ModelConfig overrides on top of the preset

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Rebuild from JSON; raises :class:`RunError` naming unknown keys (also inside ``window``/``model``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RunError(f"unknown training config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        d = dict(d)
        try:
            if "window" in d:
                wknown = {f.name for f in dataclasses.fields(WindowConfig)}
                bad = sorted(set(d["window"]) - wknown)
                if bad:
                    raise RunError(f"unknown window config keys: {', '.join(bad)} (known: {', '.join(sorted(wknown))})")
                d["window"] = WindowConfig(**d["window"])
            if "model" in d:
                ModelConfig.preset(d.get("preset", "tiny"), **d["model"])  # validates the override keys
            return cls(**d)
        except ValueError as exc:
            raise RunError(str(exc)) from None


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to ``cfg.lr * cfg.min_lr_frac``."""
    warm = max(1, int(cfg.warmup_frac * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, total - warm))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise RunError(f"--device {name!r}: one of auto, cpu, cuda")
    return torch.device(name)


# ------------------------------------------------------------------------------------- run directory


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "checkpoint.json")  # moved in place in this order
NEXT = ".next"  # suffix of the checkpoint being written


def save_checkpoint(run: Path, model: JEPA, opt: torch.optim.Optimizer, step: int, total: int) -> None:
    """Weights (safetensors) and optimizer state as ``*.next``, then ``checkpoint.json.next`` (their SHA-256):
    once that exists the new checkpoint is complete and its files are moved in place (:func:`recover_checkpoint`
    finishes the moves if the process dies between them)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights, optim = run / f"model.safetensors{NEXT}", run / f"optimizer.pt{NEXT}"
    save_file(state, str(weights))
    torch.save({"optimizer": opt.state_dict(), "step": step, "total_steps": total}, optim)
    meta = {"step": step, "total_steps": total, "model_sha256": _sha256(weights), "optimizer_sha256": _sha256(optim)}
    atomic_write_text(run / f"checkpoint.json{NEXT}", json.dumps(meta, indent=1))
    recover_checkpoint(run)


def recover_checkpoint(run: Path) -> None:
    """Finish or drop a checkpoint write that was interrupted (only the run's writer calls this).

    A complete ``checkpoint.json.next`` means its files are complete: they are moved in place. Otherwise
    the partial ``*.next``/``*.tmp`` files are removed and the previous checkpoint stands.
    """
    commit = run / f"checkpoint.json{NEXT}"
    if commit.exists():
        for name in CHECKPOINT_FILES:
            nxt = run / f"{name}{NEXT}"
            if nxt.exists():
                os.replace(nxt, run / name)
    for leftover in [*run.glob(f"*{NEXT}"), *run.glob("*.tmp")]:
        leftover.unlink()


def _read_meta(run: Path) -> dict:
    meta_path, weights = run / "checkpoint.json", run / "model.safetensors"
    if not meta_path.exists() or not weights.exists():
        raise RunError(f"{run}: no complete checkpoint (checkpoint.json and model.safetensors)")
    try:
        return json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{meta_path}: corrupted checkpoint ({exc})") from None


def load_weights(run: Path, model: JEPA) -> dict:
    """Load ``model.safetensors`` into ``model`` after checking it against ``checkpoint.json``."""
    weights = run / "model.safetensors"
    meta = _read_meta(run)
    if _sha256(weights) != meta.get("model_sha256"):
        if (run / f"checkpoint.json{NEXT}").exists():
            raise RunError(f"{run}: a checkpoint is being written (or its writer was killed); retry, or resume "
                           "the training to complete it")
        raise RunError(f"{weights}: corrupted checkpoint (SHA-256 differs from checkpoint.json)")
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise RunError(f"{weights}: corrupted checkpoint ({exc})") from None
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    shapes = [k for k, v in model.state_dict().items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise RunError(f"{weights}: checkpoint from a different model config (missing {sorted(missing)[:3]}, "
                       f"unexpected {sorted(unexpected)[:3]}, shape mismatch {shapes[:3]})")
    model.load_state_dict(state)
    return meta


# ------------------------------------------------------------------------------------- training


def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def prepare(cube: str, run: Path, cfg: TrainConfig, resume: bool) -> dict:
    """The run's config.json content: new (statistics from the cube) or, on resume, the saved one."""
    from geowm.cube.store import read_state

    cfg_path = run / "config.json"
    if resume:
        if not cfg_path.exists():
            raise RunError(f"{run}: --resume but no config.json here")
        try:
            saved = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunError(f"{cfg_path}: unreadable run config ({exc})") from None
        mine = asdict(cfg)
        differs = [k for k in ("preset", "batch_size", "lr", "seed", "window", "model", "train_until")
                   if saved["train"].get(k) != json.loads(json.dumps(mine[k]))]
        if differs:
            raise RunError(f"{run}: checkpoint from a different config ({', '.join(differs)} differ); "
                           "resume with the same options or train into a new --out")
        return saved
    if cfg_path.exists():
        raise RunError(f"{run}: a run already exists here; use --resume or another --out")
    state = read_state(cube)
    times = state.times
    until = np.datetime64(cfg.train_until, "s") + np.timedelta64(86399, "s") if cfg.train_until else times[-1]
    train_idx = np.flatnonzero(times <= until)
    if len(train_idx) < cfg.window.frames:
        raise RunError(f"{cube}: {len(train_idx)} dates up to {str(until)[:10]}, fewer than one window of "
                       f"{cfg.window.frames} frames")
    model_cfg = ModelConfig.preset(cfg.preset, in_chans=len(state.bands), **cfg.model)
    stats = band_stats(CubeReader(cube), train_idx, seed=cfg.seed)
    g = state.grid
    import geowm

    return {
        "geowm_version": geowm.__version__,
        "model": model_cfg.to_dict(),
        "train": json.loads(json.dumps(asdict(cfg))),
        "data": {"cube": str(Path(cube).absolute()), "snapshot": state.snapshot, "bands": state.bands,
                 "common_names": state.common_names,
                 "stats": stats, "train_until": str(until), "grid": {"crs": g.crs, "transform": list(g.transform)[:6],
                                                                     "width": g.width, "height": g.height,
                                                                     "tile_size": g.tile_size}},
    }


def train(cube: str, out: str | Path, cfg: TrainConfig, resume: bool = False,
          progress: Callable[[int, int, dict], None] | None = None, stop_at: int | None = None) -> Path:
    """Train (or resume) a run; returns the run directory. See the module docstring for its contents.

    ``cfg.model["kind"] = "pixel"`` trains the pixel-space generative baseline
    (:mod:`geowm.model.pixel`) instead of the JEPA, with the same data, masks, schedule and budget.

    ``stop_at`` ends this call after that step (with a checkpoint), as an interruption would.
    """
    run = Path(out)
    rank, world = _dist()
    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.steps is None and cfg.minutes is None:
        raise RunError("give --steps or --minutes")
    window_cache_mb()  # a bad $GEOWM_WINDOW_CACHE_MB fails here, before the run directory is written
    conf = prepare(cube, run, cfg, resume)
    torch.manual_seed(cfg.seed)
    model = build_model(ModelConfig.from_dict(conf["model"])).to(device)  # the JEPA, or the pixel baseline
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start, total = 0, cfg.steps
    if resume and rank == 0:
        recover_checkpoint(run)
    if resume and world > 1:
        dist.barrier()
    if resume and (run / "checkpoint.json").exists():  # else killed before its first checkpoint: start over
        meta = load_weights(run, model)
        opt.load_state_dict(_load_optimizer(run, meta, device))
        start, total = int(meta["step"]), int(meta["total_steps"])
    elif resume:
        total = conf.get("total_steps", total)
    if resume and rank == 0:
        _truncate_metrics(run / "metrics.jsonl", start)
    data = conf["data"]
    train_ds = CubeWindows(cube, cfg.window, data["stats"], (None, np.datetime64(data["train_until"])),
                           snapshot=data["snapshot"], seasonal=model.cfg.seasonal)
    if total is None:  # a time budget: measure a few steps on a throwaway copy, then fix the schedule
        total = _estimate_steps(model, opt, train_ds, cfg, device)
        if world > 1:  # every rank must run the same schedule: rank 0's estimate wins
            box = [total]
            dist.broadcast_object_list(box, src=0)
            total = int(box[0])
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        conf["total_steps"] = total
        atomic_write_text(run / "config.json", json.dumps(conf, indent=1))
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    sampler = StepBatchSampler(len(train_ds), cfg.batch_size, cfg.seed, start, total, rank)
    batches = loader(train_ds, sampler, workers=cfg.workers, pin_memory=device.type == "cuda")
    metrics = open(run / "metrics.jsonl", "a") if rank == 0 else None
    deadline = time.time() + cfg.minutes * 60 if cfg.minutes else None
    t_last = time.perf_counter()
    step = start
    for step, batch in enumerate(batches, start=start):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        lr = lr_at(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7919 + rank)
        with autocast:
            out = net(batch, generator=gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        momentum = model.update_target(step + 1, total)
        row = {"step": step + 1, "loss": out["loss"].item(), "pred_loss": float(out["pred_loss"]),
               "sigreg": float(out["sigreg"]), "lr": lr, "ema": momentum, "grad_norm": float(grad_norm),
               "n_context": out["n_context"], "n_target": out["n_target"], "world_size": world}
        if (step + 1) % cfg.health_every == 0 or step + 1 == total:
            row.update({f"health_{k}": v for k, v in model.health(batch).items()})
            if row["health_collapse_warning"]:
                print(f"warning: step {step + 1}: representation collapse suspected "
                      f"(latent std {row['health_std_mean']:.3f}, RankMe {row['health_rankme']:.1f})")
        now = time.perf_counter()
        row["step_seconds"] = now - t_last
        t_last = now
        if metrics and ((step + 1) % cfg.log_every == 0 or "health_rankme" in row or step + 1 == total):
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        if progress:
            progress(step + 1, total, row)
        stop = (deadline is not None and time.time() > deadline) or (stop_at is not None and step + 1 >= stop_at)
        if world > 1 and deadline is not None:  # ranks stop together, or the others hang in all-reduce
            flag = torch.tensor([float(stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == total or stop):
            save_checkpoint(run, model, opt, step + 1, total)
        if stop:
            break
    if metrics:
        metrics.close()
    if world > 1:
        dist.barrier()
    return run


def _load_optimizer(run: Path, meta: dict, device: torch.device) -> dict:
    """The optimizer state of the checkpoint (``weights_only=True``: tensors and plain containers only)."""
    path = run / "optimizer.pt"
    if not path.exists() or _sha256(path) != meta.get("optimizer_sha256"):
        raise RunError(f"{path}: corrupted or missing checkpoint file (SHA-256 differs from checkpoint.json)")
    try:
        return torch.load(path, map_location=device, weights_only=True)["optimizer"]
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise RunError(f"{path}: corrupted checkpoint ({type(exc).__name__}: {exc})") from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the complete rows up to ``step`` (rows after the checkpoint are logged again on resume)."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a kill
            continue
        if row.get("step", 0) <= step:
            rows.append(line + "\n")
    atomic_write_text(path, "".join(rows))


def _estimate_steps(model: JEPA, opt, ds: CubeWindows, cfg: TrainConfig, device: torch.device) -> int:
    import copy

    m, o = copy.deepcopy(model), copy.deepcopy(opt)
    o = type(opt)(m.parameters(), lr=cfg.lr)
    sampler = StepBatchSampler(len(ds), cfg.batch_size, cfg.seed + 1, 0, 4)
    times = []
    for batch in loader(ds, sampler, workers=0):
        t = time.perf_counter()
        out = m({k: v.to(device) for k, v in batch.items()})
        o.zero_grad()
        out["loss"].backward()
        o.step()
        times.append(time.perf_counter() - t)
    per_step = float(np.median(times[1:])) * 1.15  # loader and logging overhead
    return max(10, int(cfg.minutes * 60 / per_step))


def evaluate_run(run: str | Path, landcover: str | None = None, n_windows: int = 64,
                 device: str = "auto") -> dict:
    """After training: fit the probes and score the forecast against copy-last on held-out windows.

    Held-out windows are those after the run's ``train_until`` date (all windows, if nothing is
    after it, with the training ones excluded by index parity). Writes ``eval.json`` in the run.
    """
    from geowm.cube.reader import read_labels
    from geowm.cube.store import read_state
    from geowm.probes import fit_probes
    from geowm.skill import forecast_vs_copy_last

    run = Path(run)
    conf = json.loads((run / "config.json").read_text())
    if conf["model"].get("kind", "jepa") != "jepa":
        raise RunError(f"{run}: a {conf['model']['kind']} baseline run has no latents to probe; it forecasts pixels")
    dev = pick_device(device)
    model = JEPA(ModelConfig.from_dict(conf["model"])).to(dev)
    load_weights(run, model)
    model.eval()
    data, window = conf["data"], WindowConfig(**conf["train"]["window"])
    until = np.datetime64(data["train_until"])
    reader = CubeReader(data["cube"], data["snapshot"], window_cache_mb())  # one copy in memory for both sets
    train_ds = CubeWindows(reader, window, data["stats"], (None, until), seasonal=model.cfg.seasonal)
    try:
        test_ds = CubeWindows(reader, window, data["stats"], (until + np.timedelta64(1, "s"), None),
                              seasonal=model.cfg.seasonal)
    except ValueError:
        test_ds = train_ds
    lc, classes = None, None
    if landcover:
        lc = read_labels(landcover, read_state(data["cube"]).grid)
        classes = lc.classes
    rng = np.random.default_rng(0)
    held = sorted(rng.choice(len(test_ds), min(n_windows, len(test_ds)), replace=False).tolist())
    skill = forecast_vs_copy_last(model, test_ds, held, k=min(2, window.frames // (2 * model.cfg.t_frames)),
                                  device=dev)
    probes = fit_probes(model, train_ds, test_ds, run, dev, lc, classes, n_windows=n_windows)
    report = {"forecast_skill": skill, "probes": probes, "held_out_windows": len(test_ds),
              "held_out_from": str(until) if test_ds is not train_ds else None}
    atomic_write_text(run / "eval.json", json.dumps(report, indent=1))
    return report
