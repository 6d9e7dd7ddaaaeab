"""Positions of tokens: 3D rotary embeddings over (days, row, col) and the day-of-year encoding.

Satellite series are irregular, so time is the real acquisition date (days, float) and not a frame
index: two tokens 35 days apart rotate their queries and keys by the angle of 35 days, whatever
the number of cloudy dates skipped in between. Rotary embeddings only see differences, so the
encoder is blind to absolute time; the season is added separately by ``doy_features`` (sin/cos of
the day of year) through a small linear layer in the encoder and the predictor.

The head dimension is split evenly among the three axes: ``n = head_dim // 6`` frequency pairs per
axis, ``6 n`` rotated channels, the remaining ``head_dim - 6 n`` channels pass through unrotated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

DAYS_PER_YEAR = 365.25


def geometric_frequencies(n: int, periods: tuple[float, float]) -> Tensor:
    """``n`` angular frequencies (rad per unit), periods geometric from ``periods[0]`` to ``periods[1]``."""
    lo, hi = periods
    if n == 1:
        return torch.tensor([2 * math.pi / lo])
    p = lo * (hi / lo) ** (torch.arange(n, dtype=torch.float64) / (n - 1))
    return (2 * math.pi / p).float()


class Rope3D(nn.Module):
    """Rotary angles for positions ``(days, row, col)``.

    Args:
        head_dim: channels per attention head (>= 6).
        day_periods: (shortest, longest) period of the time frequencies, in days.
        patch_periods: (shortest, longest) period of the row and column frequencies, in patches.
    """

    def __init__(self, head_dim: int, day_periods: tuple[float, float], patch_periods: tuple[float, float]):
        super().__init__()
        self.n_pairs = head_dim // 6
        if self.n_pairs < 1:
            raise ValueError(f"head_dim {head_dim} too small for 3D RoPE (needs >= 6)")
        # not persistent: derived from the config, never part of a checkpoint
        n = self.n_pairs
        self.register_buffer("freq_days", geometric_frequencies(n, day_periods), persistent=False)
        self.register_buffer("freq_patch", geometric_frequencies(n, patch_periods), persistent=False)

    def forward(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """``pos`` (B, L, 3) float (days, row, col) -> ``(cos, sin)``, each (B, 1, L, 3 n) float32."""
        pos = pos.float()
        days, row, col = pos[..., 0:1], pos[..., 1:2], pos[..., 2:3]
        ang = torch.cat([days * self.freq_days, row * self.freq_patch, col * self.freq_patch], dim=-1)
        return ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys ``x`` (..., head_dim) by ``cos``/``sin`` (..., m), m = 3 n, broadcast against it
    (``x`` (B, heads, L, head_dim) and ``cos`` (B, 1, L, m); or ``x`` (B, L, 2, heads, head_dim), queries and
    keys at once, and ``cos`` (B, L, 1, 1, m)).

    Channel ``i`` is paired with channel ``i + m`` for ``i < m``; channels ``>= 2 m`` are left as they
    are. Computed in float32 and returned in ``x``'s dtype (bf16 under autocast).
    """
    m = cos.shape[-1]
    xf = x.float()
    x1, x2, rest = xf[..., :m], xf[..., m : 2 * m], xf[..., 2 * m :]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)
    return out.to(x.dtype)


def doy_features(doy: Tensor) -> Tensor:
    """Day of year (..., ) in days (1..366) -> (..., 2) float: ``sin``, ``cos`` of ``2 pi doy / 365.25``."""
    ang = 2 * math.pi * doy.float() / DAYS_PER_YEAR
    return torch.stack([ang.sin(), ang.cos()], dim=-1)


def mean_doy(doy: Tensor, dim: int = -1) -> Tensor:
    """Mean day of year on the circle along ``dim``, in (0, 365.25]: 360 and 5 give ~365.1, not 182.5."""
    ang = 2 * math.pi * doy.float() / DAYS_PER_YEAR
    mean = torch.atan2(ang.sin().mean(dim), ang.cos().mean(dim))
    out = torch.remainder(mean, 2 * math.pi) * DAYS_PER_YEAR / (2 * math.pi)
    return torch.where(out <= 0, out + DAYS_PER_YEAR, out)
