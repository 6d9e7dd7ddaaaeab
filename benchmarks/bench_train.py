"""Training-step speed of the JEPA on this machine's CPU, against its measured matmul FLOP/s.

1. Peak: float32 ``torch.matmul`` of two N x N matrices (N = 2048; 1024 in smoke mode), a few
   products per trial, best of several trials -> FLOP/s (2 N^3 per product), with torch's default
   intra-op threads.
2. Training steps of ``JEPA(ModelConfig.preset(p, in_chans=4))`` as ``geowm.train`` runs them
   (forward, backward, grad-norm clip, AdamW with the trainer's two parameter groups, EMA target
   update), after warm-up steps, on random batches shaped like real windows: T = 8 acquisitions of
   4 bands x 64 x 64 px, about 80 % of the pixels valid with the rest covered by rectangular cloud
   blocks (8..32 px), irregular revisits. ``tiny`` with B = 8 (8 x 8 px tubelets) and ``small`` with
   B = 2 (2 x 16 x 16 tubelets); smoke mode only ``tiny`` with B = 2.

Achieved FLOP/s = ``model.flops_per_step((B, T, C, H, W), context_frac)`` / step time, with
``context_frac`` = the step's ``n_context`` / (B x tokens per window), summed over the timed steps.
A diagnostic also counts the matmul FLOPs one step really executes (``torch.utils.flop_counter`` for
the linear layers + attention from the padded token counts), which differ from the
``flops_per_step`` estimate (it assumes every token is valid). Target: ``small`` reaches >= 40 % of
the measured matmul FLOP/s. GPU MFU is not measured here (no GPU on this machine).

Everything runs twice: with torch's default intra-op threads (what ``geowm.train`` gets) and with 1
thread (smoke mode: 1 thread only), each against the matmul peak at the same thread count, measured
before and after the models (a busy machine shows as a gap). A model stops after ``max_timed_s`` of
timed steps (at least 3 kept); s/step and achieved FLOP/s are medians over the timed steps.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks._util import target

PARAMS = {  # mode -> matmul size / trials, models: (preset, batch, warm-up steps, timed steps)
    "full": {"matmul_n": 2048, "matmul_reps": 3, "matmul_trials": 5, "max_timed_s": 60.0,
             "models": [("tiny", 8, 3, 20), ("small", 2, 3, 20)]},
    "quick": {"matmul_n": 2048, "matmul_reps": 2, "matmul_trials": 3, "max_timed_s": 20.0,
              "models": [("tiny", 8, 2, 8), ("small", 2, 2, 8)]},
    "smoke": {"matmul_n": 1024, "matmul_reps": 2, "matmul_trials": 3, "max_timed_s": 5.0,
              "models": [("tiny", 2, 1, 3)]},
}
FRAMES, CHANS, SIZE = 8, 4, 64
VALID_FRAC = 0.8
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-3, 0.05, 1.0  # geowm.train.TrainConfig defaults
TARGET_SMALL_SHARE = 0.4


def matmul_flops(n: int, reps: int, trials: int) -> dict:
    """Best-of-``trials`` float32 FLOP/s of ``reps`` N x N @ N x N products."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    torch.matmul(a, b, out=out)  # warm-up
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"n": n, "reps": reps, "trials": trials, "seconds": [round(t, 4) for t in times],
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


def executed_flops(model, batch: dict, gen) -> tuple[float, dict]:
    """Matmul FLOPs one training step really executes (padded token sets included), and its out dict.

    Linear layers: ``FlopCounterMode``; attention (not counted by it on CPU): 4 B L^2 dim per block
    forward, x3 with backward for the online encoder and predictor, x1 for the no-grad target encoder."""
    from torch.utils.flop_counter import FlopCounterMode

    lengths = {}
    parts = {"encoder": model.encoder.transformer, "target_encoder": model.target_encoder.transformer,
             "predictor": model.predictor.transformer}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: lengths.__setitem__(name, out.shape))
             for name, m in parts.items()]
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            out = model(batch, generator=gen)
            out["loss"].backward()
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    attn = 0.0
    for name, (b, L, dim) in lengths.items():
        depth = len(parts[name].blocks)
        attn += (1 if name == "target_encoder" else 3) * depth * 4.0 * b * L * L * dim
    linear = float(counter.get_total_flops())
    return linear + attn, {"linear": linear, "attention": attn, "out": out,
                           "padded_lengths": {k: int(v[1]) for k, v in lengths.items()}}


def bench_model(preset: str, B: int, warmup: int, steps: int, max_timed_s: float, seed: int = 0) -> dict:
    import torch

    from geowm.model import JEPA
    from geowm.model.config import ModelConfig
    from geowm.model.vit import TokenGrid

    torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset, in_chans=CHANS)
    model = JEPA(cfg)
    model.train()
    opt = _optimizer(model)
    rng = np.random.default_rng(seed)
    batches = [make_batch(rng, B) for _ in range(4)]
    shape = (B, FRAMES, CHANS, SIZE, SIZE)
    n_tokens = B * TokenGrid.of(FRAMES, SIZE, SIZE, cfg).n
    total = warmup + steps
    phases = {"forward": [], "backward": [], "optimizer": [], "ema": []}
    est_flops, n_ctx, n_tgt, token_valid = [], [], [], []
    timed_s = 0.0
    for step in range(total):
        if step > warmup + 2 and timed_s > max_timed_s:  # a slow (busy) machine: stop, keep >= 3 steps
            break
        batch = batches[step % len(batches)]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919)
        t0 = time.perf_counter()
        out = model(batch, generator=gen)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        t3 = time.perf_counter()
        model.update_target(step + 1, 10_000)
        t4 = time.perf_counter()
        if step < warmup:
            continue
        timed_s += t4 - t0
        for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            phases[k].append(dt)
        n_ctx.append(out["n_context"])
        n_tgt.append(out["n_target"])
        est_flops.append(model.flops_per_step(shape, context_frac=out["n_context"] / n_tokens))
        if step == warmup:
            with torch.no_grad():
                _, tv, _ = model.tokens(batch["pixels"], batch["valid"], batch["days"], batch["doy"])
            token_valid.append(float(tv.float().mean()))
    step_s = [sum(v) for v in zip(*phases.values(), strict=True)]
    steps = len(step_s)
    total_s = sum(step_s)
    # median over the timed steps: robust to bursts of other work on the shared cores
    achieved = float(np.median([f / t for f, t in zip(est_flops, step_s, strict=True)]))

    # diagnostic: matmul FLOPs a step executes vs the flops_per_step estimate, on one more step
    batch = batches[0]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + total * 7919)
    exe, info = executed_flops(model, batch, gen)
    est_same = model.flops_per_step(shape, context_frac=info["out"]["n_context"] / n_tokens)
    counts = model.param_counts()
    return {
        "preset": preset, "batch_shape": list(shape), "tokens_per_step": n_tokens,
        "params_trainable": counts["trainable"], "params_target": counts["target_encoder"],
        "warmup_steps": warmup, "timed_steps": steps,
        "s_per_step": float(np.median(step_s)), "mean_s_per_step": total_s / steps,
        "max_s_per_step": max(step_s), "mean_achieved_flops": sum(est_flops) / total_s,
        "phase_s_per_step": {k: round(float(np.median(v)), 5) for k, v in phases.items()},
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "pixel_valid_frac": round(float(np.mean([b["valid"].float().mean() for b in batches])), 3),
        "token_valid_frac": round(token_valid[0], 3) if token_valid else None,
        "context_frac": round(float(np.mean(n_ctx)) / n_tokens, 3),
        "target_frac": round(float(np.mean(n_tgt)) / n_tokens, 3),
        "flops_per_step_estimate": sum(est_flops) / steps, "achieved_flops": achieved,
        "executed_flops_one_step": exe, "flops_per_step_same_step": est_same,
        "executed_vs_estimate": exe / est_same, "executed_attention_share": info["attention"] / exe,
        "padded_lengths": info["padded_lengths"],
        "achieved_executed_flops_approx": achieved * exe / est_same,
    }


def _round_model(r: dict) -> None:
    for k in ("s_per_step", "mean_s_per_step", "max_s_per_step", "executed_vs_estimate", "executed_attention_share",
              "share_of_matmul", "executed_share_of_matmul_approx"):
        r[k] = round(r[k], 4)
    for k in ("flops_per_step_estimate", "achieved_flops", "mean_achieved_flops", "executed_flops_one_step",
              "flops_per_step_same_step", "achieved_executed_flops_approx"):
        r[k] = float(f"{r[k]:.4g}")


def at_threads(p: dict, threads: int) -> dict:
    """Matmul peak (before and after) and every model of ``p`` with ``threads`` intra-op threads."""
    import torch

    saved = torch.get_num_threads()
    load = round(os.getloadavg()[0], 2)
    torch.set_num_threads(threads)
    try:
        mm = matmul_flops(p["matmul_n"], p["matmul_reps"], p["matmul_trials"])
        models = {preset: bench_model(preset, B, warm, steps, p["max_timed_s"])
                  for preset, B, warm, steps in p["models"]}
        after = matmul_flops(p["matmul_n"], p["matmul_reps"], p["matmul_trials"])  # contention check
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
        r["executed_share_of_matmul_approx"] = r["achieved_executed_flops_approx"] / peak
        _round_model(r)
    return {"threads": threads, "load_avg_1m_at_start": load, "matmul": mm, "models": models}


def run(mode: str, workdir: Path) -> dict:
    import torch

    p = PARAMS[mode]
    workdir.mkdir(parents=True, exist_ok=True)
    default = torch.get_num_threads()
    # torch's default (what geowm.train gets), then 1 thread; smoke: 1 thread only (fast on a busy machine)
    threads = [1] if mode == "smoke" else list(dict.fromkeys([default, 1]))
    runs = {f"threads_{t}": at_threads(p, t) for t in threads}

    headline, notes, targets = {}, [], {}
    for k, t in enumerate(threads):
        res = runs[f"threads_{t}"]
        sfx = "" if k == 0 else f"_t{t}"
        mm = res["matmul"]
        headline[f"matmul_GFLOPs{sfx}"] = round(mm["flops"] / 1e9, 2)
        for name, r in res["models"].items():
            headline[f"{name}_s_per_step{sfx}"] = round(r["s_per_step"], 4)
            headline[f"{name}_GFLOPs{sfx}"] = round(r["achieved_flops"] / 1e9, 2)
            headline[f"{name}_share_of_matmul{sfx}"] = round(r["share_of_matmul"], 3)
            if name == "small":
                targets[f"small_share_of_matmul{sfx}"] = target(f"small_share_of_matmul{sfx}",
                                                                headline[f"small_share_of_matmul{sfx}"],
                                                                TARGET_SMALL_SHARE)
        notes.append(f"{t} thread(s): matmul peak {mm['flops'] / 1e9:.1f} GFLOP/s (best of {mm['trials']} trials "
                     f"before and {mm['trials']} after the models: {mm['flops_before_models'] / 1e9:.1f} / "
                     f"{mm['flops_after_models'] / 1e9:.1f}; median trial {mm['median_flops'] / 1e9:.1f})")
        for name, r in res["models"].items():
            ph = r["phase_s_per_step"]
            notes.append(
                f"{t} thread(s), {name} (B={r['batch_shape'][0]}): {r['s_per_step']:.3f} s/step (median of "
                f"{r['timed_steps']}; max {r['max_s_per_step']:.3f}) = forward {ph['forward']:.3f} + backward "
                f"{ph['backward']:.3f} + clip/AdamW {ph['optimizer']:.3f} + EMA {ph['ema']:.3f}; context "
                f"{r['context_frac']:.0%} of tokens, {r['token_valid_frac']:.0%} tokens valid; executed matmul FLOPs "
                f"= {r['executed_vs_estimate']:.2f} x flops_per_step (attention {r['executed_attention_share']:.0%}),"
                f" i.e. ~{r['executed_share_of_matmul_approx']:.0%} of the matmul peak on executed FLOPs")
    if len(threads) > 1:  # more threads slower than one: the cores are oversubscribed (other work)
        many, one = runs[f"threads_{threads[0]}"], runs["threads_1"]
        slow = {n: many["models"][n]["s_per_step"] / one["models"][n]["s_per_step"] for n in many["models"]}
        notes.append(f"{threads[0]} threads vs 1 thread, s/step ratio: "
                     + ", ".join(f"{n} {v:.2f}x" for n, v in slow.items())
                     + f" (1-min load average {many['load_avg_1m_at_start']} / {one['load_avg_1m_at_start']} at "
                     "start). A ratio above 1 means the cores were busy with other work: torch's threads then wait "
                     "for each other at every op, so the default-thread rows measure the contention, not the model")
        results_ratio = {n: round(v, 3) for n, v in slow.items()}
    else:
        results_ratio = None
    notes.insert(0, "GPU MFU is not measured: this machine has no GPU (CPU float32, torch "
                    f"{torch.__version__}, default {default} intra-op threads; headline rows without a suffix use "
                    f"{threads[0]} thread(s), _t1 rows 1 thread). s/step and achieved FLOP/s are medians over the "
                    "timed steps (the cores are shared with other work)")
    return {
        "results": {
            "description": (f"JEPA training steps (forward, backward, clip, AdamW, EMA) on random {FRAMES} x "
                            f"{CHANS} x {SIZE} x {SIZE} windows (~{VALID_FRAC:.0%} pixels valid, cloud blocks) vs "
                            "this CPU's float32 matmul FLOP/s at the same thread count; FLOPs from "
                            "JEPA.flops_per_step at the measured context fraction."),
            "headline": headline,
            "params": {**p, "models": [list(m) for m in p["models"]], "threads": threads},
            "runs": runs,
            "default_threads_vs_1_thread_s_per_step": results_ratio,
            "default_torch_threads": default,
            "cores": os.cpu_count(),
            "gpu_mfu": "not measured (no GPU on this machine)",
            "notes": notes,
        },
        "targets": targets,
    }


if __name__ == "__main__":
    print(json.dumps(run("smoke", Path("benchmarks/work/train_step")), indent=1, default=str))
