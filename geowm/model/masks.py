"""Which tokens the predictor sees (context) and which it must predict (targets).

Two kinds of mask over the token grid (Tt time slots x Hp x Wp patches), mixed per sample with
probability ``forecast_mask_prob``:

- **forecast**: the last ``k`` time slots of the window, every patch, are targets (``k`` uniform in
  ``forecast_slots``, leaving at least one context slot). This is the task the model is used for.
- **tube**: a few rectangular blocks of patches (area fraction in ``tube_scale``, height/width in
  ``tube_aspect``) spanning *all* time slots are targets, so the model cannot copy the same place
  from a neighbouring date and must use the surroundings and the dynamics (as V-JEPA's tubes).

Context = valid tokens outside the mask; targets = valid tokens inside it. Masks are drawn on the CPU
from a ``torch.Generator`` (seedable) and returned on the device of ``token_valid``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from geowm.model.config import ModelConfig
from geowm.model.vit import TokenGrid


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def forecast_mask(grid: TokenGrid, k: int) -> Tensor:
    """(Tt, Hp, Wp) bool: True on the last ``k`` time slots, all patches."""
    mask = torch.zeros(grid.t, grid.h, grid.w, dtype=torch.bool)
    mask[grid.t - k :] = True
    return mask


def tube_block(grid: TokenGrid, scale: tuple[float, float], aspect: tuple[float, float],
               generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """One random block ``(top, left, height, width)`` in patches, of area ~``scale`` x Hp Wp."""
    area = _uniform(*scale, generator) * grid.h * grid.w
    ratio = math.exp(_uniform(math.log(aspect[0]), math.log(aspect[1]), generator))  # height / width
    h = min(grid.h, max(1, round(math.sqrt(area * ratio))))
    w = min(grid.w, max(1, round(area / h)))
    top = _randint(0, grid.h - h, generator)
    left = _randint(0, grid.w - w, generator)
    return top, left, h, w


def tube_mask(grid: TokenGrid, n_blocks: int, scale: tuple[float, float], aspect: tuple[float, float],
              generator: torch.Generator | None = None) -> Tensor:
    """(Tt, Hp, Wp) bool: the union of ``n_blocks`` random blocks, each spanning all time slots."""
    mask = torch.zeros(grid.t, grid.h, grid.w, dtype=torch.bool)
    for _ in range(n_blocks):
        top, left, h, w = tube_block(grid, scale, aspect, generator)
        mask[:, top : top + h, left : left + w] = True
    return mask


def sample_mask(grid: TokenGrid, cfg: ModelConfig, generator: torch.Generator | None = None) -> Tensor:
    """One sample's target mask (Tt, Hp, Wp) bool: forecast with probability ``cfg.forecast_mask_prob``,
    else tubes. A window with a single time slot can only get tubes."""
    k_hi = min(cfg.forecast_slots[1], grid.t - 1)
    use_forecast = float(torch.rand((), generator=generator)) < cfg.forecast_mask_prob
    if use_forecast and k_hi >= 1:
        k = _randint(min(cfg.forecast_slots[0], k_hi), k_hi, generator)
        return forecast_mask(grid, k)
    return tube_mask(grid, cfg.tube_blocks, cfg.tube_scale, cfg.tube_aspect, generator)


def sample_masks(token_valid: Tensor, grid: TokenGrid, cfg: ModelConfig,
                 generator: torch.Generator | None = None, max_tries: int = 10) -> tuple[Tensor, Tensor]:
    """Context and target token masks for a batch.

    Args:
        token_valid: (B, N) bool, tokens that are clear enough to exist (``N = Tt Hp Wp``).
        grid: the token grid.
        cfg: mask settings (``forecast_mask_prob``, ``forecast_slots``, ``tube_*``).
        generator: CPU ``torch.Generator`` for reproducible masks.
        max_tries: redraws for a sample whose draw leaves no valid context or no valid target
            (e.g. a forecast over cloudy last dates); the last draw is kept if none succeeds.

    Returns:
        ``(context, target)``, each (B, N) bool on ``token_valid``'s device; disjoint, both within
        ``token_valid``.
    """
    valid_cpu = token_valid.detach().cpu()
    targets = []
    for b in range(valid_cpu.shape[0]):
        for _ in range(max_tries):
            mask = sample_mask(grid, cfg, generator).reshape(-1)
            n_target = int((mask & valid_cpu[b]).sum())
            n_context = int((~mask & valid_cpu[b]).sum())
            if n_target > 0 and n_context > 0:
                break
        targets.append(mask)
    in_mask = torch.stack(targets).to(token_valid.device)
    return token_valid & ~in_mask, token_valid & in_mask
