"""Held-out skill of the latent forecast against the trivial "copy the last context latent" baseline.

For each window of T acquisitions, the last ``k`` are targets and the first ``T - k`` the context.
Observed target latents come from the target encoder on the whole window (as in training); the
model's forecast comes from ``JEPA.predict`` on the context alone, one direct prediction per target
date; the baseline copies, per patch, the latent of the last valid context date, encoded from the
context alone (no look at the future). Errors are the mean absolute latent difference over the
target patches that are valid and have a baseline.
"""

from __future__ import annotations

import numpy as np
import torch

from geowm.data import CubeWindows, collate
from geowm.model import JEPA


@torch.no_grad()
def forecast_vs_copy_last(model: JEPA, ds: CubeWindows, windows: list[int], k: int = 2,
                          device: torch.device | str = "cpu", batch_size: int = 8) -> dict[str, float]:
    """L1 latent error of the model's forecast and of copy-last, over held-out windows; lower is better."""
    model.eval()
    errs_model, errs_copy, cos_model, cos_copy = [], [], [], []
    tf = model.cfg.t_frames
    for b0 in range(0, len(windows), batch_size):
        batch = collate([ds[i] for i in windows[b0: b0 + batch_size]])
        batch = {key: v.to(device) for key, v in batch.items() if key in ("pixels", "valid", "days", "doy")}
        T = batch["pixels"].shape[1]
        n_ctx = T - k * tf
        lat, ok, _ = model.encode(batch["pixels"], batch["valid"], batch["days"], batch["doy"])
        ctx = {key: v[:, :n_ctx] for key, v in batch.items()}
        ctx_lat, ctx_ok, _ = model.encode(ctx["pixels"], ctx["valid"], ctx["days"], ctx["doy"])
        target_days = batch["days"][:, n_ctx::tf]
        target_doy = batch["doy"][:, n_ctx::tf]
        pred = model.predict(ctx, target_days, target_doy)  # (B, k, Hp, Wp, D)
        last = torch.zeros_like(ctx_lat[:, 0])
        has = torch.zeros_like(ctx_ok[:, 0])
        for t in range(ctx_lat.shape[1]):
            last = torch.where(ctx_ok[:, t, ..., None], ctx_lat[:, t], last)
            has |= ctx_ok[:, t]
        target, target_ok = lat[:, -k:], ok[:, -k:]
        sel = target_ok & has[:, None]
        copy = last[:, None].expand_as(target)
        errs_model.append((pred.float() - target).abs().mean(-1)[sel].cpu().numpy())
        errs_copy.append((copy - target).abs().mean(-1)[sel].cpu().numpy())
        cos = torch.nn.functional.cosine_similarity
        cos_model.append(cos(pred.float(), target, dim=-1)[sel].cpu().numpy())
        cos_copy.append(cos(copy, target, dim=-1)[sel].cpu().numpy())
    em, ec = np.concatenate(errs_model), np.concatenate(errs_copy)
    return {
        "n_target_tokens": int(len(em)),
        "l1_model": float(em.mean()), "l1_copy_last": float(ec.mean()),
        "cosine_model": float(np.concatenate(cos_model).mean()),
        "cosine_copy_last": float(np.concatenate(cos_copy).mean()),
        "model_better_share": float((em < ec).mean()),
    }
