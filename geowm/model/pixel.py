"""The pixel-space generative baseline: the JEPA's encoder and predictor, trained to predict future pixels.

What the benchmark compares the JEPA against (issue 7): the same tokens, masks (:func:`sample_masks`),
encoder and predictor (built from the same :class:`ModelConfig`, ``kind="pixel"``), the same data and
the same training loop (:func:`geowm.train.train`), but the loss is in pixel space:

1. cut the window into tubelet tokens, draw the context / target mask exactly as the JEPA does;
2. the encoder encodes the context tokens; the predictor turns them, plus mask tokens at the targets'
   positions (anchored on the last context latent of their patch), into one vector per target;
3. a linear head maps each vector to the target tubelet's pixels (``t_frames x C x p x p``,
   normalised bands) as a *change* from the last clear context tubelet of the same patch (the head
   starts at zero: the model starts as persistence, as the JEPA's predictor starts as copy-last);
4. loss = mean squared error over the clear pixels of the target tokens.

There is no target encoder and no EMA: the targets are the pixels themselves. ``predict`` forecasts
pixels (and the predictor's vectors) at any date past the context, as ``JEPA.predict`` does latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geowm.model.config import ModelConfig
from geowm.model.jepa import JEPA, rankme
from geowm.model.masks import sample_masks
from geowm.model.vit import (
    Encoder,
    Predictor,
    TokenGrid,
    TokenSet,
    gather_tokens,
    last_seen,
    last_seen_days,
    patchify,
    select_tokens,
    tubelet_positions,
    tubelet_valid_fraction,
)


class PixelForecaster(nn.Module):
    """Encoder + predictor + pixel head. ``PixelForecaster(ModelConfig.preset("tiny", kind="pixel"))``.

    Batch contract as :class:`geowm.model.JEPA` (``pixels``, ``valid``, ``days``, ``doy``).
    """

    _season = JEPA._season  # the same seasonal memory for the predictor as the JEPA's (None when off)
    _predict_tokens = JEPA._predict_tokens  # the same direct prediction per target date

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.predictor = Predictor(cfg)
        self.head = nn.Linear(cfg.dim, cfg.t_frames * cfg.in_chans * cfg.patch**2)
        nn.init.zeros_(self.head.weight)  # start as persistence: the last clear tubelet of the patch
        nn.init.zeros_(self.head.bias)

    # ---- tokens -----------------------------------------------------------------------------------------
    def tokens(self, pixels: Tensor, valid: Tensor, days: Tensor, doy: Tensor) -> tuple[TokenGrid, Tensor, Tensor]:
        """Token grid, token validity (B, N) bool and positions (B, N, 4), as ``JEPA.tokens``."""
        B, T, C, H, W = pixels.shape
        if C != self.cfg.in_chans:
            raise ValueError(f"pixels have {C} bands, the model was built for in_chans={self.cfg.in_chans}")
        grid = TokenGrid.of(T, H, W, self.cfg)
        token_valid = tubelet_valid_fraction(valid, self.cfg.t_frames, self.cfg.patch) >= self.cfg.min_valid_frac
        return grid, token_valid, tubelet_positions(days, doy, grid)

    def _tubelets(self, pixels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, t_frames, C, p, p) normalised pixels (0 where not clear) and (B, N, t_frames, p, p) clear mask."""
        cfg = self.cfg
        x = patchify(pixels, valid, cfg.t_frames, cfg.patch)
        x = x.reshape(*x.shape[:2], cfg.t_frames, cfg.in_chans + 1, cfg.patch, cfg.patch)
        return x[:, :, :, : cfg.in_chans], x[:, :, :, cfg.in_chans] > 0.5

    def _anchor_pixels(self, tubes: Tensor, context: TokenSet, grid: TokenGrid) -> Tensor:
        """Per (slot t incl. "after the window", patch): the pixels of the patch's last context tubelet
        before t, (B, (Tt + 1) Hp Wp, t_frames C p p); zeros where there is none."""
        flat = tubes.reshape(*tubes.shape[:2], -1)
        ctx_pix = TokenSet(gather_tokens(flat, context.index), context.index, context.valid, context.pos)
        anchor, ok = last_seen(ctx_pix, grid)
        return torch.where(ok[..., None], anchor, torch.zeros((), dtype=anchor.dtype, device=anchor.device))

    def _decode(self, pred: Tensor, anchor_pixels: Tensor) -> Tensor:
        """Predictor vectors (B, L, dim) + anchor pixels (B, L, F) -> pixels (B, L, F)."""
        return anchor_pixels + self.head(pred)

    # ---- training -----------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor | int]:
        """One step: ``loss`` (MSE on the clear pixels of the target tokens), ``pred_loss``, ``sigreg`` (0),
        ``n_context``, ``n_target`` (the same keys as ``JEPA.forward``, so one training loop runs both)."""
        cfg = self.cfg
        pixels, valid, days, doy = batch["pixels"], batch["valid"], batch["days"], batch["doy"]
        grid, token_valid, positions = self.tokens(pixels, valid, days, doy)
        context, target = sample_masks(token_valid, grid, cfg, generator)
        t_index, t_valid = select_tokens(target, cfg.token_pad_multiple)
        tubes, clear = self._tubelets(pixels, valid)

        ctx = self.encoder(pixels, valid, positions, context)
        anchor, anchor_ok = last_seen(ctx, grid)
        t_pos = gather_tokens(positions, t_index)
        season = self._season(ctx, grid, t_pos[..., 0], t_index % (grid.h * grid.w),
                              gather_tokens(last_seen_days(ctx, grid), t_index))
        pred = self.predictor(ctx, t_pos, t_valid, batch.get("drivers"), batch.get("drivers_days"),
                              gather_tokens(anchor, t_index), gather_tokens(anchor_ok, t_index), season)
        anchor_pix = gather_tokens(self._anchor_pixels(tubes, ctx, grid), t_index)
        out = self._decode(pred.float(), anchor_pix.float())
        want = gather_tokens(tubes.reshape(*tubes.shape[:2], -1), t_index).float()
        ok = gather_tokens(clear.reshape(*clear.shape[:2], -1), t_index)  # (B, Lt, t p p)
        ok = ok.reshape(*ok.shape[:2], cfg.t_frames, 1, cfg.patch, cfg.patch)
        ok = ok.expand(-1, -1, -1, cfg.in_chans, -1, -1).reshape(want.shape) & t_valid[..., None]
        err = F.mse_loss(out, want, reduction="none")
        loss = torch.where(ok, err, torch.zeros((), device=err.device)).sum() / ok.sum().clamp(min=1)
        return dict(loss=loss, pred_loss=loss.detach(), sigreg=torch.zeros((), device=loss.device),
                    n_context=int(context.sum()), n_target=int(target.sum()))

    def update_target(self, step: int, total_steps: int) -> float:
        """No target encoder: nothing to update (kept so the training loop runs both models); returns 0."""
        return 0.0

    # ---- inference ----------------------------------------------------------------------------------------
    def predict(self, context_batch: dict[str, Tensor], target_days: Tensor,
                target_doy: Tensor) -> tuple[Tensor, Tensor]:
        """Forecast pixels at every patch for each requested date, one direct prediction per date.

        Args: as ``JEPA.predict``.

        Returns:
            pixels (B, K, C, H, W), normalised bands (the last frame of each predicted tubelet);
            vectors (B, K, Hp, Wp, dim): the predictor's outputs (what the forecast store keeps as the
            forecast's embedding).
        """
        cfg, b = self.cfg, context_batch
        pred, ctx, grid = self._predict_tokens(b, target_days, target_doy)
        (B, K), S = target_days.shape, grid.h * grid.w
        tubes, _ = self._tubelets(b["pixels"], b["valid"])
        anchor_pix = self._anchor_pixels(tubes, ctx, grid)[:, grid.t * S:].repeat(1, K, 1)
        out = self._decode(pred.float(), anchor_pix.float())  # (B, K S, t C p p)
        p, C = cfg.patch, cfg.in_chans
        out = out.reshape(B, K, grid.h, grid.w, cfg.t_frames, C, p, p)[:, :, :, :, -1]
        pix = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, K, C, grid.h * p, grid.w * p)
        return pix, pred.reshape(B, K, grid.h, grid.w, cfg.dim)

    # ---- monitoring ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def health(self, batch: dict[str, Tensor]) -> dict[str, float | bool | int]:
        """Spread of the encoder's (layer-normed) latents over the batch's valid tokens, as ``JEPA.health``
        reports for its target encoder (no collapse is possible with a pixel loss: never warns)."""
        pixels, valid = batch["pixels"], batch["valid"]
        _, token_valid, positions = self.tokens(pixels, valid, batch["days"], batch["doy"])
        full = self.encoder(pixels, valid, positions, token_valid)
        z = F.layer_norm(full.x.float(), (self.cfg.dim,))[full.valid]
        if z.shape[0] < 2:
            return dict(std_mean=float("nan"), std_min=float("nan"), rankme=float("nan"), n_tokens=int(z.shape[0]),
                        collapse_warning=False)
        std = z.std(dim=0)
        return dict(std_mean=float(std.mean()), std_min=float(std.min()), rankme=rankme(z), n_tokens=int(z.shape[0]),
                    collapse_warning=False)

    def param_counts(self) -> dict[str, int]:
        """Parameters per part; ``trainable`` = encoder + predictor + head (all of them)."""
        def count(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())

        enc, pred, head = count(self.encoder), count(self.predictor), count(self.head)
        return dict(encoder=enc, predictor=pred, head=head, trainable=enc + pred + head)
