"""The model configuration: one dataclass, three presets (``tiny``, ``small``, ``base``).

A ``ModelConfig`` holds everything needed to rebuild the world model (it is saved in a run's
``config.json``). Build one with ``ModelConfig.preset("tiny", in_chans=5)`` or rebuild a saved one
with ``ModelConfig.from_dict(json.load(f))``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

LOSSES = ("smooth_l1", "l1")
KINDS = ("jepa", "pixel")  # the world model, or the pixel-space generative baseline (geowm.model.pixel)
EMA_SCHEDULES = ("cosine", "linear")


@dataclass
class ModelConfig:
    """Sizes and training knobs of the spatiotemporal JEPA.

    Units: ``patch`` in pixels, ``t_frames`` in acquisitions, day periods in days, patch periods in
    patches, fractions in [0, 1].
    """

    kind: str = "jepa"  # "jepa" or "pixel": same encoder and predictor, trained on future pixels instead of latents
    # input and tokens
    in_chans: int = 4  # bands per acquisition (C)
    patch: int = 8  # tubelet side (px)
    t_frames: int = 1  # acquisitions per tubelet; 1 suits irregular cloudy series, 2 as in V-JEPA 2
    min_valid_frac: float = 0.5  # a tubelet is a token when at least this fraction of its pixels is valid
    # encoder (ViT)
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    # predictor (narrower ViT)
    pred_dim: int = 64
    pred_depth: int = 2
    pred_heads: int = 2
    drivers_dim: int = 0  # D of the optional weather drivers; 0 = the model takes no driver tokens
    pred_anchor: bool = True  # mask tokens also carry the last context latent seen at their (row, col)
    pred_out_norm: bool = True  # layer-norm the predictions (no affine): they live where the targets live
    # seasonal memory: mask tokens also carry the context latent seen at their patch one lag before their date
    # and the change over that lag's year at the patch (needs a window with ``seasonal_frames``, geowm.data)
    seasonal_anchor: bool = False
    seasonal_lag_days: float = 365.0  # days
    seasonal_tol_days: float = 30.0  # the year-ago latent is the context token nearest to date - lag, within this
    # rotary positions: periods of the lowest and highest frequencies (geometric in between)
    rope_day_periods: tuple[float, float] = (4.0, 2000.0)  # days
    rope_patch_periods: tuple[float, float] = (3.0, 200.0)  # patches
    token_pad_multiple: int = 8  # variable-length token sets are padded to a multiple of this
    # masks
    forecast_mask_prob: float = 0.75  # probability that a sample gets a forecast mask (else tube masks)
    forecast_slots: tuple[int, int] = (1, 2)  # k, number of trailing time slots to predict (inclusive)
    tube_blocks: int = 3  # rectangular blocks per tube mask, each spanning all time slots
    tube_scale: tuple[float, float] = (0.1, 0.25)  # area of one block as a fraction of the patch grid
    tube_aspect: tuple[float, float] = (0.5, 2.0)  # block height / width (log-uniform)
    # loss
    loss: str = "l1"  # "l1" (as V-JEPA) or "smooth_l1", on layer-normed target latents
    smooth_l1_beta: float = 1.0
    sigreg_weight: float = 0.0  # weight of the SIGReg isotropy term (LeJEPA); 0 = off
    sigreg_projections: int = 64  # random 1-D directions per step
    sigreg_points: int = 17  # quadrature points of the characteristic-function integral on [0, 3]
    # EMA target encoder
    ema_start: float = 0.996
    ema_end: float = 1.0
    ema_schedule: str = "cosine"  # "cosine" or "linear" in step / total_steps
    # health
    collapse_std: float = 0.05  # warn when the mean per-dimension std of target latents drops below
    collapse_rank_frac: float = 0.05  # warn when RankMe < this fraction of min(dim, tokens)

    def __post_init__(self) -> None:
        for name in ("rope_day_periods", "rope_patch_periods", "forecast_slots", "tube_scale", "tube_aspect"):
            setattr(self, name, tuple(getattr(self, name)))
        problems = []
        if self.dim % self.heads:
            problems.append(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.pred_dim % self.pred_heads:
            problems.append(f"pred_dim {self.pred_dim} is not divisible by pred_heads {self.pred_heads}")
        for name, hd in (("dim/heads", self.dim // self.heads), ("pred_dim/pred_heads",
                                                                  self.pred_dim // self.pred_heads)):
            if hd < 6:
                problems.append(f"{name} = {hd} leaves no rotary pairs for 3 axes (needs >= 6)")
        if self.patch < 1 or self.t_frames < 1 or self.in_chans < 1:
            problems.append("patch, t_frames and in_chans must be >= 1")
        if not 0.0 < self.min_valid_frac <= 1.0:
            problems.append(f"min_valid_frac must be in (0, 1], got {self.min_valid_frac}")
        if not 0.0 <= self.forecast_mask_prob <= 1.0:
            problems.append(f"forecast_mask_prob must be in [0, 1], got {self.forecast_mask_prob}")
        lo, hi = self.forecast_slots
        if not 1 <= lo <= hi:
            problems.append(f"forecast_slots must satisfy 1 <= lo <= hi, got {self.forecast_slots}")
        lo, hi = self.tube_scale
        if not 0.0 < lo <= hi <= 1.0:
            problems.append(f"tube_scale must satisfy 0 < lo <= hi <= 1, got {self.tube_scale}")
        if self.tube_blocks < 1:
            problems.append(f"tube_blocks must be >= 1, got {self.tube_blocks}")
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.ema_schedule not in EMA_SCHEDULES:
            problems.append(f"ema_schedule must be one of {EMA_SCHEDULES}, got {self.ema_schedule!r}")
        if not 0.0 <= self.ema_start <= self.ema_end <= 1.0:
            problems.append(f"need 0 <= ema_start <= ema_end <= 1, got {self.ema_start}, {self.ema_end}")
        if self.seasonal_lag_days <= 0 or self.seasonal_tol_days <= 0:
            problems.append("seasonal_lag_days and seasonal_tol_days must be > 0")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def seasonal(self) -> tuple[float, float, int]:
        """(lag days, tolerance days, frames per tubelet): how windows pick their seasonal memory (geowm.data)."""
        return self.seasonal_lag_days, self.seasonal_tol_days, self.t_frames

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Rebuild from ``to_dict`` output; raises ``ValueError`` naming any key the config does not have."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named size (``tiny``, ``small``, ``base``) with overrides: ``preset("tiny", in_chans=5)``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # CPU, tests, demo: trains in minutes on 8 frames x 4 bands x 64 x 64 windows (8 x 8 patches per frame).
    "tiny": dict(patch=8, t_frames=1, dim=128, depth=4, heads=4, pred_dim=64, pred_depth=2, pred_heads=2,
                 seasonal_anchor=True),
    # GPU: ViT-S/16 encoder with 2 x 16 x 16 tubelets.
    "small": dict(patch=16, t_frames=2, dim=384, depth=12, heads=6, pred_dim=192, pred_depth=6, pred_heads=4,
                  forecast_slots=(1, 2), seasonal_anchor=True),
    # GPU, bf16: ViT-B/16 encoder with 2 x 16 x 16 tubelets.
    "base": dict(patch=16, t_frames=2, dim=768, depth=12, heads=12, pred_dim=384, pred_depth=12, pred_heads=6,
                 forecast_slots=(1, 2), seasonal_anchor=True),
}
