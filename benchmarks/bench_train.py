"""Training-step speed of the JEPA against this machine's measured matmul FLOP/s (CPU; MFU on CUDA).

1. Peak: ``torch.matmul`` of two N x N matrices in the dtype training computes in (float32 on CPU;
   bfloat16 on CUDA, where ``geowm.train`` runs under bf16 autocast), a few products per trial,
   best of several trials before and after the models -> FLOP/s (2 N^3 per product), at the same
   thread count as the model.
2. Training steps of ``JEPA(ModelConfig.preset(p, in_chans=4))`` as ``geowm.train`` runs them
   (forward under the same autocast, backward, grad-norm clip, AdamW with the trainer's two parameter
   groups, EMA target update), after warm-up steps, on random batches shaped like real windows: T = 8
   acquisitions of 4 bands x 64 x 64 px, about 80 % of the pixels valid with the rest covered by
   rectangular cloud blocks (8..32 px), irregular revisits. CPU: ``tiny`` with B = 8 and ``small``
   with B = 2 (smoke mode only ``tiny`` with B = 2); CUDA: B = 64 and 32.

FLOPs per step are *counted*: after the timed steps, each one is replayed (same batch, same mask
generator seed, so the same tokens are kept and dropped) under ``torch.utils.flop_counter.FlopCounterMode``
with the math attention backend (so attention appears as the matmuls it is; the fused CPU/GPU
attention kernels are not counted by the counter), forward and backward. Achieved FLOP/s = counted
FLOPs / step time, median over the timed steps; share of matmul = achieved / the matmul peak (on
CUDA this is the MFU against the measured bf16 matmul). ``JEPA.flops_per_step`` (an estimate assuming
every token valid) is kept as a diagnostic. Target: ``small`` reaches >= 40 % of the matmul peak.

On CPU, full mode runs everything with torch's default intra-op threads (what ``geowm.train`` gets)
and again with 1 thread (on a busy machine the two differ); quick and smoke modes with 1 thread only
(on shared, busy cores several threads wait for each other at every op). A model stops after ``max_timed_s`` of
timed steps (at least 3 kept). On CUDA the peak allocated memory of each model's steps is recorded.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks._util import target

PARAMS = {  # mode -> matmul size / trials, models: (preset, batch, warm-up steps, timed steps), CPU threads
    "full": {"matmul_n": 2048, "matmul_reps": 3, "matmul_trials": 5, "max_timed_s": 60.0,
             "models": [("tiny", 8, 3, 20), ("small", 2, 3, 20)], "cpu_threads": ("default", 1)},
    "quick": {"matmul_n": 2048, "matmul_reps": 2, "matmul_trials": 3, "max_timed_s": 6.0,
              "models": [("tiny", 8, 1, 4), ("small", 2, 1, 4)], "cpu_threads": (1,)},
    "smoke": {"matmul_n": 1024, "matmul_reps": 2, "matmul_trials": 3, "max_timed_s": 3.0,
              "models": [("tiny", 2, 1, 3)], "cpu_threads": (1,)},
}
CUDA = {"matmul_n": 8192, "matmul_reps": 10, "batch": {"tiny": 64, "small": 32}}  # on a GPU
FRAMES, CHANS, SIZE = 8, 4, 64
VALID_FRAC = 0.8
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-3, 0.05, 1.0  # geowm.train.TrainConfig defaults
TARGET_SMALL_SHARE = 0.4


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(n: int, reps: int, trials: int, device=None, dtype=None) -> dict:
    """Best-of-``trials`` FLOP/s of ``reps`` N x N @ N x N products (float32 on CPU by default)."""
    import torch

    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up
    _sync(device)
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        _sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"n": n, "reps": reps, "trials": trials, "dtype": str(dtype).replace("torch.", ""),
            "device": str(device), "seconds": [round(t, 4) for t in times],
            "flops": 2.0 * n**3 * reps / best, "median_flops": 2.0 * n**3 * reps / float(np.median(times))}


def cloudy_valid(rng: np.random.Generator, B: int, T: int, H: int, W: int, clear: float) -> np.ndarray:
    """(B, T, H, W) bool: per frame, rectangular cloud blocks (8..32 px) until a random cover is reached.

    Frame cover is uniform in [0, 2 (1 - clear)], so ``clear`` of the pixels are valid on average."""
    valid = np.ones((B, T, H, W), bool)
    for b in range(B):
        for t in range(T):
            cover = rng.uniform(0.0, 2.0 * (1.0 - clear))
            v = valid[b, t]
            while 1.0 - v.mean() < cover:
                h, w = rng.integers(8, 33, 2)
                y, x = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
                v[y: y + h, x: x + w] = False
    return valid


def make_batch(rng: np.random.Generator, B: int) -> dict:
    import torch

    gaps = rng.choice([5.0, 5.0, 10.0, 15.0, 20.0], size=(B, FRAMES - 1))
    days = np.concatenate([np.zeros((B, 1)), np.cumsum(gaps, axis=1)], axis=1)
    doy = (rng.integers(1, 366, (B, 1)) + days - 1) % 365 + 1
    return {
        "pixels": torch.from_numpy(rng.standard_normal((B, FRAMES, CHANS, SIZE, SIZE)).astype(np.float32)),
        "valid": torch.from_numpy(cloudy_valid(rng, B, FRAMES, SIZE, SIZE, VALID_FRAC)),
        "days": torch.from_numpy(days.astype(np.float32)),
        "doy": torch.from_numpy(doy.astype(np.float32)),
    }


def _optimizer(model):
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95))


def _autocast(device):
    """The autocast ``geowm.train`` uses: bf16 on CUDA, none on CPU."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def counted_flops(model, batch: dict, gen, device) -> tuple[float, dict]:
    """FLOPs of one training step's forward + backward, counted by ``FlopCounterMode`` with the math
    attention backend (attention as the matmuls it is). Returns (total, per-operator counts)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        with _autocast(device):
            out = model(batch, generator=gen)
        out["loss"].backward()
    model.zero_grad(set_to_none=True)
    by_op = {str(k).split(".")[-1]: int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return float(counter.get_total_flops()), {"by_op": by_op, "n_context": out["n_context"]}


def bench_model(preset: str, B: int, warmup: int, steps: int, max_timed_s: float, seed: int = 0,
                device=None) -> dict:
    import torch

    from geowm.model import JEPA
    from geowm.model.config import ModelConfig
    from geowm.model.vit import TokenGrid

    device = torch.device(device or "cpu")
    cuda = device.type == "cuda"
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset, in_chans=CHANS)
    model = JEPA(cfg).to(device)
    model.train()
    opt = _optimizer(model)
    rng = np.random.default_rng(seed)
    batches = [{k: v.to(device) for k, v in make_batch(rng, B).items()} for _ in range(4)]
    shape = (B, FRAMES, CHANS, SIZE, SIZE)
    n_tokens = B * TokenGrid.of(FRAMES, SIZE, SIZE, cfg).n
    total = warmup + steps
    phases = {"forward": [], "backward": [], "optimizer": [], "ema": []}
    est_flops, n_ctx, n_tgt, token_valid, replay = [], [], [], [], []
    timed_s = 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(total):
        if step > warmup + 2 and timed_s > max_timed_s:  # a slow (busy) machine: stop, keep >= 3 steps
            break
        batch = batches[step % len(batches)]
        gen_seed = seed * 1_000_003 + step * 7919
        gen = torch.Generator().manual_seed(gen_seed)
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device):
            out = model(batch, generator=gen)
        _sync(device)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        _sync(device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        _sync(device)
        t3 = time.perf_counter()
        model.update_target(step + 1, 10_000)
        _sync(device)
        t4 = time.perf_counter()
        if step < warmup:
            continue
        timed_s += t4 - t0
        for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            phases[k].append(dt)
        n_ctx.append(out["n_context"])
        n_tgt.append(out["n_target"])
        replay.append((step % len(batches), gen_seed))
        est_flops.append(model.flops_per_step(shape, context_frac=out["n_context"] / n_tokens))
        if step == warmup:
            with torch.no_grad():
                _, tv, _ = model.tokens(batch["pixels"], batch["valid"], batch["days"], batch["doy"])
            token_valid.append(float(tv.float().mean()))
    cuda_peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    step_s = [sum(v) for v in zip(*phases.values(), strict=True)]
    steps = len(step_s)
    total_s = sum(step_s)

    # replay every timed step (same batch, same mask seed: the same tokens) under the FLOP counter
    t0 = time.perf_counter()
    counted, ops = [], {}
    for (bi, gen_seed), n_c in zip(replay, n_ctx, strict=True):
        f, info = counted_flops(model, batches[bi], torch.Generator().manual_seed(gen_seed), device)
        if info["n_context"] != n_c:
            raise RuntimeError(f"{preset}: replayed step kept {info['n_context']} context tokens, timed step {n_c}")
        counted.append(f)
        for k, v in info["by_op"].items():
            ops[k] = ops.get(k, 0) + v
    replay_s = time.perf_counter() - t0
    # median over the timed steps: robust to bursts of other work on the shared cores
    achieved = float(np.median([f / t for f, t in zip(counted, step_s, strict=True)]))
    estimated = float(np.median([f / t for f, t in zip(est_flops, step_s, strict=True)]))
    counts = model.param_counts()
    counted_total = sum(counted)
    return {
        "preset": preset, "device": str(device), "batch_shape": list(shape), "tokens_per_step": n_tokens,
        "params_trainable": counts["trainable"], "params_target": counts["target_encoder"],
        "warmup_steps": warmup, "timed_steps": steps,
        "s_per_step": float(np.median(step_s)), "mean_s_per_step": total_s / steps,
        "max_s_per_step": max(step_s), "mean_achieved_flops": counted_total / total_s,
        "phase_s_per_step": {k: round(float(np.median(v)), 5) for k, v in phases.items()},
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "pixel_valid_frac": round(float(np.mean([b["valid"].float().mean().item() for b in batches])), 3),
        "token_valid_frac": round(token_valid[0], 3) if token_valid else None,
        "context_frac": round(float(np.mean(n_ctx)) / n_tokens, 3),
        "target_frac": round(float(np.mean(n_tgt)) / n_tokens, 3),
        "counted_flops_per_step": counted_total / steps, "achieved_flops": achieved,
        "counted_flops_by_op_share": {k: round(v / counted_total, 4) for k, v in sorted(ops.items())},
        "flops_per_step_estimate": sum(est_flops) / steps, "estimate_achieved_flops": estimated,
        "counted_vs_estimate": counted_total / sum(est_flops),
        "count_replay_s": round(replay_s, 2),
        "cuda_max_allocated_MiB": None if cuda_peak is None else round(cuda_peak / 2**20, 1),
    }


def _round_model(r: dict) -> None:
    for k in ("s_per_step", "mean_s_per_step", "max_s_per_step", "counted_vs_estimate", "share_of_matmul",
              "estimate_share_of_matmul"):
        r[k] = round(r[k], 4)
    for k in ("counted_flops_per_step", "achieved_flops", "mean_achieved_flops", "flops_per_step_estimate",
              "estimate_achieved_flops"):
        r[k] = float(f"{r[k]:.4g}")


def at_threads(p: dict, threads: int | None, device=None) -> dict:
    """Matmul peak (before and after) and every model of ``p`` with ``threads`` intra-op threads (CPU)
    or on ``device`` (CUDA: bf16 matmul, larger batches)."""
    import torch

    device = torch.device(device or "cpu")
    cuda = device.type == "cuda"
    saved = torch.get_num_threads()
    load = round(os.getloadavg()[0], 2)
    if threads:
        torch.set_num_threads(threads)
    mm_args = ((CUDA["matmul_n"], CUDA["matmul_reps"], p["matmul_trials"]) if cuda
               else (p["matmul_n"], p["matmul_reps"], p["matmul_trials"]))
    dtype = torch.bfloat16 if cuda else torch.float32
    models_spec = [(m, CUDA["batch"].get(m, b) if cuda else b, w, s) for m, b, w, s in p["models"]]
    try:
        mm = matmul_flops(*mm_args, device=device, dtype=dtype)
        models = {preset: bench_model(preset, B, warm, steps, p["max_timed_s"], device=device)
                  for preset, B, warm, steps in models_spec}
        after = matmul_flops(*mm_args, device=device, dtype=dtype)  # contention check
    finally:
        torch.set_num_threads(saved)
    mm["flops_before_models"], mm["flops_after_models"] = mm["flops"], after["flops"]
    mm["seconds"] += after["seconds"]
    mm["flops"] = peak = max(mm["flops"], after["flops"])
    mm["median_flops"] = 2.0 * mm["n"] ** 3 * mm["reps"] / float(np.median(mm["seconds"]))
    for k in ("flops", "median_flops", "flops_before_models", "flops_after_models"):
        mm[k] = float(f"{mm[k]:.4g}")
    for r in models.values():
        r["share_of_matmul"] = r["achieved_flops"] / peak
        r["estimate_share_of_matmul"] = r["estimate_achieved_flops"] / peak
        _round_model(r)
    return {"threads": threads or torch.get_num_threads(), "device": str(device), "load_avg_1m_at_start": load,
            "matmul": mm, "models": models}


def run(mode: str, workdir: Path) -> dict:
    import torch

    p = PARAMS[mode]
    workdir.mkdir(parents=True, exist_ok=True)
    default = torch.get_num_threads()
    cuda = torch.cuda.is_available()
    if cuda:  # MFU on the GPU against its measured bf16 matmul
        runs = {"cuda": at_threads(p, None, "cuda")}
        keys = [("cuda", "")]
    else:  # full: torch's default threads (what geowm.train gets), then 1; quick/smoke: 1 thread (fast when busy)
        threads = list(dict.fromkeys(default if t == "default" else t for t in p["cpu_threads"]))
        runs = {f"threads_{t}": at_threads(p, t) for t in threads}
        keys = [(f"threads_{t}", "" if k == 0 else f"_t{t}") for k, t in enumerate(threads)]

    headline, notes, targets = {}, [], {}
    for key, sfx in keys:
        res = runs[key]
        mm = res["matmul"]
        headline[f"matmul_GFLOPs{sfx}"] = round(mm["flops"] / 1e9, 2)
        for name, r in res["models"].items():
            headline[f"{name}_s_per_step{sfx}"] = round(r["s_per_step"], 4)
            headline[f"{name}_GFLOPs{sfx}"] = round(r["achieved_flops"] / 1e9, 2)
            headline[f"{name}_share_of_matmul{sfx}"] = round(r["share_of_matmul"], 3)
            if cuda:
                headline[f"{name}_mfu"] = round(r["share_of_matmul"], 3)
                headline[f"{name}_cuda_max_allocated_MiB"] = r["cuda_max_allocated_MiB"]
            if name == "small":
                targets[f"small_share_of_matmul{sfx}"] = target(f"small_share_of_matmul{sfx}",
                                                                headline[f"small_share_of_matmul{sfx}"],
                                                                TARGET_SMALL_SHARE)
        where = "CUDA" if cuda else f"{res['threads']} thread(s)"
        notes.append(f"{where}: {mm['dtype']} matmul peak {mm['flops'] / 1e9:.1f} GFLOP/s (N={mm['n']}, best of "
                     f"{mm['trials']} trials before and {mm['trials']} after the models: "
                     f"{mm['flops_before_models'] / 1e9:.1f} / {mm['flops_after_models'] / 1e9:.1f}; median trial "
                     f"{mm['median_flops'] / 1e9:.1f}; 1-min load average {res['load_avg_1m_at_start']} at start)")
        for name, r in res["models"].items():
            ph = r["phase_s_per_step"]
            mem = f"; peak CUDA memory {r['cuda_max_allocated_MiB']} MiB" if cuda else ""
            notes.append(
                f"{where}, {name} (B={r['batch_shape'][0]}): {r['s_per_step']:.3f} s/step (median of "
                f"{r['timed_steps']}; max {r['max_s_per_step']:.3f}) = forward {ph['forward']:.3f} + backward "
                f"{ph['backward']:.3f} + clip/AdamW {ph['optimizer']:.3f} + EMA {ph['ema']:.3f}; "
                f"{r['counted_flops_per_step'] / 1e9:.2f} GFLOP/step counted (attention "
                f"{r['counted_flops_by_op_share'].get('bmm', 0):.0%}), {r['counted_vs_estimate']:.2f} x the "
                f"flops_per_step estimate; context {r['context_frac']:.0%} of tokens, {r['token_valid_frac']:.0%} "
                f"tokens valid{mem}")
    results_ratio = None
    if len(keys) > 1:  # more threads slower than one: the cores are oversubscribed (other work)
        many, one = runs[keys[0][0]], runs["threads_1"]
        slow = {n: many["models"][n]["s_per_step"] / one["models"][n]["s_per_step"] for n in many["models"]}
        notes.append(f"{many['threads']} threads vs 1 thread, s/step ratio: "
                     + ", ".join(f"{n} {v:.2f}x" for n, v in slow.items())
                     + f" (1-min load average {many['load_avg_1m_at_start']} / {one['load_avg_1m_at_start']} at "
                     "start). A ratio above 1 means the cores were busy with other work: torch's threads then wait "
                     "for each other at every op, so the default-thread rows measure the contention, not the model")
        results_ratio = {n: round(v, 3) for n, v in slow.items()}
    if cuda:
        notes.insert(0, f"CUDA ({torch.cuda.get_device_name(0)}), bf16 autocast as geowm.train; share_of_matmul = "
                        "MFU against the measured bf16 matmul peak")
    else:
        notes.insert(0, f"no GPU on this machine: CPU float32, torch {torch.__version__}, {threads[0]} intra-op "
                        f"thread(s) in headline rows without a suffix (default {default}; _t1 rows 1 thread). GPU MFU "
                        "is measured by the same code whenever CUDA is available. s/step and achieved FLOP/s are "
                        "medians over the timed steps (the cores are shared with other work)")
    return {
        "results": {
            "description": (f"JEPA training steps (forward, backward, clip, AdamW, EMA) on random {FRAMES} x "
                            f"{CHANS} x {SIZE} x {SIZE} windows (~{VALID_FRAC:.0%} pixels valid, cloud blocks) on "
                            f"{'CUDA' if cuda else 'CPU'} vs the measured matmul FLOP/s at the same settings; "
                            "FLOPs per step counted with torch.utils.flop_counter.FlopCounterMode on a replay of "
                            "each timed step."),
            "headline": headline,
            "params": {**p, "models": [list(m) for m in p["models"]]},
            "runs": runs,
            "default_threads_vs_1_thread_s_per_step": results_ratio,
            "default_torch_threads": default,
            "device": "cuda" if cuda else "cpu",
            "cores": os.cpu_count(),
            "gpu_mfu": "measured (share_of_matmul)" if cuda else "not measured: no GPU on this machine",
            "notes": notes,
        },
        "targets": targets,
    }


if __name__ == "__main__":
    print(json.dumps(run("smoke", Path("benchmarks/work/train_step")), indent=1, default=str))
