"""The world model's own compute in forecasting and anomaly scoring: km^2 per second on CPU or CUDA, by preset,
batch size and precision, with peak memory, and how long a continent (10 million km^2) per revisit would take.

``geowm forecast`` and ``geowm anomalies`` cut a region into blocks of the run's training window
(``WindowConfig``: 64 x 64 px, 8 acquisitions) and call the model on batches of them. Per block:

* **anomaly** (one scored acquisition): ``JEPA.encode`` of the window ending at the acquisition (target encoder,
  ``frames`` dates), ``JEPA.predict`` of that date from the ``frames - 1`` dates before it, and the cosine distance;
* **forecast** (one init, 4 leads, one ensemble member): ``JEPA.predict`` of the 4 valid times from ``frames - 1``
  context dates, and ``JEPA.encode`` of that context (the last observed latents the decoding starts from).

Contexts are cut to whole tokens of ``t_frames`` acquisitions (``small`` and ``base``: 2), as geowm cuts them.

This benchmark times exactly those calls on in-memory tensors (4 bands, 10 m pixels, so a 64 px block is
0.41 km^2; dates 5 days apart; a random cloud rectangle on each date) with a model of each preset at random
initial weights: compute does not depend on what the weights learned. Reading the cube, choosing the context and
decoding are not in it; ``bench_forecast`` times the whole commands. So the numbers here are the ceiling that
the model sets: what a continent per revisit costs on one device when the data path keeps up.

Precision: ``fp32`` is what geowm runs (float32, TF32 off); on CUDA also ``tf32`` (TF32 matrix products) and
``bf16`` (``torch.autocast`` bfloat16, as training on CUDA uses), each with the largest deviation of its
surprise (cosine distance, 0..2) and latents from fp32 on the same inputs. Batches grow by 4x until the
throughput stops rising by 10 %, a call takes longer than ``max_call_s`` or memory runs out. Each timing: one
warm-up call, then calls until ``min_s`` seconds have passed (at least 3), CUDA synchronised; the best batch counts.
Peak memory: the largest CUDA allocation (CUDA) or the process's peak resident set (CPU) during the timed calls.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

PARAMS = {
    "full": {"presets": ("tiny", "small", "base"), "batches": (16, 64, 256, 1024, 4096), "frames": 8, "size": 64,
             "leads": 4, "min_s": 1.0, "max_call_s": 10.0},
    "quick": {"presets": ("tiny", "small"), "batches": (4, 16), "frames": 8, "size": 64, "leads": 4, "min_s": 1.0,
              "max_call_s": 5.0},
    "smoke": {"presets": ("tiny",), "batches": (2, 8), "frames": 4, "size": 32, "leads": 4, "min_s": 0.2,
              "max_call_s": 2.0},
}
BANDS = 4
PIXEL_M = 10.0
CONTINENT_KM2 = 10e6
GAIN = 1.10  # a larger batch must be this much faster to try the next one
SEED = 5


def inputs(batch: int, frames: int, size: int, device, seed: int = SEED) -> dict:
    """A batch of windows as :func:`geowm.forecast.model_inputs` makes them, made on ``device``: normalised pixels
    (B, T, C, S, S), valid (B, T, S, S) with one random cloud rectangle per date (up to half the side each way),
    days from the first date (5 to 15 days apart: revisits go missing) and day of year."""
    import torch

    g = torch.Generator(device).manual_seed(seed)
    pixels = torch.randn((batch, frames, BANDS, size, size), generator=g, device=device)
    corner = torch.randint(0, size, (2, batch, frames, 1, 1), generator=g, device=device)
    extent = torch.randint(0, size // 2 + 1, (2, batch, frames, 1, 1), generator=g, device=device)
    ax = torch.arange(size, device=device)
    rows = (ax[:, None] >= corner[0]) & (ax[:, None] < corner[0] + extent[0])
    cols = (ax[None, :] >= corner[1]) & (ax[None, :] < corner[1] + extent[1])
    valid = ~(rows & cols)
    pixels = pixels * valid[:, :, None]
    steps = 5.0 * torch.randint(1, 4, (batch, frames), generator=g, device=device).float()
    days = torch.cumsum(steps, 1) - steps[:, :1]
    return {"pixels": pixels, "valid": valid, "days": days, "doy": (120.0 + days) % 365.0 + 1.0}


def anomaly_step(model, batch: dict):
    """Surprise of each window's last date (B, hp, wp) and its observed latents (B, hp, wp, D), as
    :func:`geowm.anomaly._surprise_tile` computes them."""
    import torch

    lat, ok, _ = model.encode(batch["pixels"], batch["valid"], batch["days"], batch["doy"])
    obs = lat[:, -1].float()
    T, tf = batch["days"].shape[1], model.cfg.t_frames
    first = T - 1 - (T - 1) // tf * tf  # the context: the dates before the last, in whole tokens
    ctx = {k: v[:, first:-1] for k, v in batch.items()}
    pred = model.predict(ctx, batch["days"][:, -1:], batch["doy"][:, -1:])[:, 0].float()
    d = 1 - torch.nn.functional.cosine_similarity(obs, pred, dim=-1)
    return torch.where(ok[:, -1], d, torch.full_like(d, float("nan"))), obs


def forecast_step(model, batch: dict, leads: int):
    """Forecast latents (B, K, hp, wp, D) at ``leads`` valid times 5..(5 K) days after each window's last date
    (one member) and the context's latents, as :func:`geowm.forecast._forecast_tile` computes them."""
    import torch

    last = batch["days"][:, -1:]
    tdays = last + 5.0 * torch.arange(1, leads + 1, device=last.device, dtype=last.dtype)
    tdoy = (batch["doy"][:, -1:] + tdays - last - 1.0) % 365.0 + 1.0
    pred = model.predict(batch, tdays, tdoy).float()
    lat, _, _ = model.encode(batch["pixels"], batch["valid"], batch["days"], batch["doy"])
    return pred, lat.float()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _precision(name: str, device):
    """A context manager setting ``name``'s matrix precision (and autocast) on ``device``."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def ctx():
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
        try:
            if name == "bf16":
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    yield
            else:
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return ctx()


def time_calls(fn, device, min_s: float) -> tuple[float, int]:
    """Seconds per call of ``fn`` (one warm-up call, then at least 3 calls and ``min_s`` seconds)."""
    fn()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    _sync(device)
    return (time.perf_counter() - t0) / n, n


def _peak_reset(device) -> None:
    import torch

    from benchmarks.stages import _reset_peak_rss

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()


def _peak_mib(device) -> float | None:
    import torch

    from benchmarks.stages import _status_kib

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    kib = _status_kib("VmHWM:")
    return None if kib is None else round(kib / 1024, 1)


def deviation(ref: tuple, other: tuple) -> dict:
    """How far ``other``'s outputs (surprise or forecast latents, then latents) lie from ``ref``'s (fp32):
    the largest absolute difference of the first, and the smallest cosine similarity of matching latents."""
    import torch

    a, b = ref[0].float(), other[0].float()
    both = torch.isfinite(a) & torch.isfinite(b)
    out = {"max_abs_diff": float((a - b).abs()[both].max()) if both.any() else None}
    la, lb = ref[1].reshape(-1, ref[1].shape[-1]), other[1].reshape(-1, other[1].shape[-1])
    keep = la.norm(dim=-1) > 0
    cos = torch.nn.functional.cosine_similarity(la[keep], lb[keep].float(), dim=-1)
    out["min_latent_cosine"] = float(cos.min()) if keep.any() else None
    return out


def bench_preset(preset: str, p: dict, device) -> dict:
    import torch

    from geowm.model import ModelConfig, build_model

    torch.manual_seed(SEED)
    model = build_model(ModelConfig.preset(preset, in_chans=BANDS)).to(device).eval()
    params = sum(x.numel() for x in model.parameters())
    km2_block = (p["size"] * PIXEL_M / 1000.0) ** 2
    precisions = ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32",)
    tf = model.cfg.t_frames
    kernels = {"anomaly": (p["frames"], lambda b: anomaly_step(model, b)),  # context: whole tokens, as geowm's
               "forecast": ((p["frames"] - 1) // tf * tf, lambda b: forecast_step(model, b, p["leads"]))}
    res: dict = {"params": params, "km2_per_block": km2_block, "kernels": {}}
    for kernel, (frames, step) in kernels.items():
        rows, accuracy = [], {}
        with torch.no_grad():
            probe = inputs(p["batches"][0], frames, p["size"], device)
            with _precision("fp32", device):
                ref = step(probe)
            for prec in precisions[1:]:
                with _precision(prec, device):
                    accuracy[prec] = deviation(ref, step(probe))
            del probe, ref
            for prec in precisions:
                best = 0.0
                for B in p["batches"]:
                    row = {"precision": prec, "batch": B}
                    try:
                        batch = inputs(B, frames, p["size"], device)
                        with _precision(prec, device):
                            _peak_reset(device)
                            s, n = time_calls(lambda batch=batch, step=step: step(batch), device, p["min_s"])
                            row["peak_MiB"] = _peak_mib(device)
                    except torch.cuda.OutOfMemoryError:
                        row["out_of_memory"] = True
                        rows.append(row)
                        break
                    finally:
                        batch = None
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    row.update(s_per_call=round(s, 5), calls=n, km2_per_s=round(B * km2_block / s, 3))
                    rows.append(row)
                    gain = row["km2_per_s"] / best if best else float("inf")
                    best = max(best, row["km2_per_s"])
                    if gain < GAIN or s > p["max_call_s"]:
                        break
        res["kernels"][kernel] = {"frames": frames, "runs": rows, "accuracy_vs_fp32": accuracy}
    return res


def best_of(rows: list[dict], precision: str) -> dict | None:
    ok = [r for r in rows if r["precision"] == precision and "km2_per_s" in r]
    return max(ok, key=lambda r: r["km2_per_s"]) if ok else None


def run(mode: str, workdir: Path) -> dict:
    import torch

    p = PARAMS[mode]
    workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    headline, details, table = {}, {}, []
    table.append("| preset | parameters | kernel | precision | best batch | km^2/s | peak MiB | 10 M km^2 takes |")
    table.append("|---|---:|---|---|---:|---:|---:|---:|")
    for preset in p["presets"]:
        r = bench_preset(preset, p, device)
        details[preset] = r
        for kernel, k in r["kernels"].items():
            for prec in ("fp32", "tf32", "bf16"):
                b = best_of(k["runs"], prec)
                if b is None:
                    continue
                minutes = CONTINENT_KM2 / b["km2_per_s"] / 60.0
                headline[f"{preset}_{kernel}_{prec}_km2_per_s"] = b["km2_per_s"]
                if b.get("peak_MiB"):
                    headline[f"{preset}_{kernel}_{prec}_peak_MiB"] = b["peak_MiB"]
                table.append(f"| {preset} | {r['params'] / 1e6:.1f} M | {kernel} | {prec} | {b['batch']} | "
                             f"{b['km2_per_s']:,.1f} | {b.get('peak_MiB') or 'n/a'} | {minutes:,.1f} min |")
    notes = []
    for preset, r in details.items():
        for kernel, k in r["kernels"].items():
            for prec, dev in k["accuracy_vs_fp32"].items():
                what = "surprise" if kernel == "anomaly" else "forecast latent entries"
                notes.append(f"{preset} {kernel} {prec} vs fp32: {what} differ by at most {dev['max_abs_diff']:.2g}; "
                             f"latents' cosine similarity >= {dev['min_latent_cosine']:.5f}")
    desc = (f"The model's calls in `geowm anomalies` (encode the window ending at the scored date + predict it) and "
            f"`geowm forecast` (predict {p['leads']} leads + encode the context) on {name}: blocks of {p['size']} x "
            f"{p['size']} px x {p['frames']} dates, {BANDS} bands, 10 m pixels, random initial weights, in memory "
            f"(reading and decoding excluded: see `forecast`). Continent per revisit = 10 million km^2 / best km^2/s.")
    return {"results": {"headline": headline, "description": desc, "tables": table, "notes": notes,
                        "device": name, "params": p, "details": details}, "targets": {}}


if __name__ == "__main__":
    print(json.dumps(run("smoke", Path("benchmarks/work/model")), indent=1, default=str))
