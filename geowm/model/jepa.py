"""The spatiotemporal JEPA: online encoder, EMA target encoder, predictor, loss and health metrics.

One training step (``JEPA.forward``), after I-JEPA / V-JEPA 2:

1. cut the window into tubelet tokens; tokens that are mostly cloud or fill do not exist;
2. draw a mask (forecast: the last dates; or tubes through all dates) -> context and target tokens;
3. the EMA target encoder encodes *all* valid tokens; its outputs, layer-normed without affine,
   are the targets (no gradient);
4. the online encoder encodes the context tokens only; the predictor turns them, plus mask tokens
   at the targets' (days, row, col, doy), into predicted latents;
5. loss = smooth L1 (or L1) on valid target tokens [+ ``sigreg_weight`` x SIGReg isotropy term].

After ``optimizer.step()`` the training loop calls ``update_target(step, total_steps)``.

Batch contract (dict of tensors): ``pixels`` (B, T, C, H, W) float32 normalised bands; ``valid``
(B, T, H, W) bool; ``days`` (B, T) float32 days since the window's first date; ``doy`` (B, T) day of
year (1..366); optional ``drivers`` (B, Td, D) with ``drivers_days`` (B, Td).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geowm.model.config import ModelConfig
from geowm.model.masks import sample_masks
from geowm.model.vit import (
    Encoder,
    Predictor,
    TokenGrid,
    gather_tokens,
    last_seen,
    last_seen_days,
    select_tokens,
    tubelet_positions,
    tubelet_valid_fraction,
    year_ago,
)


def ema_momentum(step: int, total_steps: int, start: float, end: float = 1.0,
                 schedule: str = "cosine") -> float:
    """EMA momentum at ``step`` of ``total_steps``: ``start`` at 0, rising to ``end`` at the last step."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * frac
    return end - (end - start) * (math.cos(math.pi * frac) + 1.0) / 2.0


def latent_loss(pred: Tensor, target: Tensor, valid: Tensor, kind: str = "smooth_l1",
                beta: float = 1.0) -> Tensor:
    """Mean over valid tokens of the per-token mean ``smooth_l1`` (or ``l1``) error.

    ``pred``, ``target`` (B, L, D); ``valid`` (B, L) bool. Padded tokens contribute exactly nothing.
    """
    pred, target = pred.float(), target.float()
    if kind == "l1":
        err = (pred - target).abs()
    else:
        err = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    per_token = torch.where(valid, err.mean(dim=-1), torch.zeros((), device=err.device))
    return per_token.sum() / valid.sum().clamp(min=1)


def sigreg_statistic(z: Tensor, n_projections: int = 64, n_points: int = 17, t_max: float = 3.0,
                     generator: torch.Generator | None = None) -> Tensor:
    """SIGReg-style isotropy penalty (after LeJEPA): how far random 1-D projections of ``z`` are from N(0, 1).

    ``z`` (n, D) embeddings are projected onto ``n_projections`` random unit directions. For each
    projection ``p`` the Epps-Pulley statistic compares its empirical characteristic function
    ``phi(t) = mean_j exp(i t p_j)`` with the standard normal's ``exp(-t^2 / 2)``:

        EP = integral over t of |phi(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt

    computed by the trapezoid rule on ``n_points`` in [0, t_max] (doubled: the integrand is even in t).
    Zero iff (in the limit) every projection is standard normal, which forbids collapse to a point
    or a low-dimensional subspace. Returns the mean over projections (a scalar, not scaled by n).
    """
    dirs = torch.randn(z.shape[1], n_projections, generator=generator).to(z.device)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    t = torch.linspace(0.0, t_max, n_points, device=z.device)
    with torch.autocast(z.device.type, enabled=False):  # cos/sin of bf16 products would be too coarse
        pt = (z.float() @ dirs)[..., None] * t  # (n, M, K)
        gauss = torch.exp(-0.5 * t**2)
        err = (pt.cos().mean(0) - gauss) ** 2 + pt.sin().mean(0) ** 2  # (M, K)
        return (2.0 * torch.trapezoid(err * gauss, t, dim=-1)).mean()


@torch.no_grad()
def rankme(z: Tensor, eps: float = 1e-7) -> float:
    """RankMe effective rank of ``z`` (n, D): ``exp(entropy(s / sum(s)))`` of its singular values ``s``.

    Between 1 (rank one) and min(n, D) (all singular values equal).
    """
    s = torch.linalg.svdvals(z.float())
    p = s / (s.sum() + eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


class JEPA(nn.Module):
    """Encoder + EMA target encoder + predictor. ``JEPA(ModelConfig.preset("tiny"))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.predictor = Predictor(cfg)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_encoder.requires_grad_(False)

    # ---- tokens -----------------------------------------------------------------------------------------
    def tokens(self, pixels: Tensor, valid: Tensor, days: Tensor,
               doy: Tensor) -> tuple[TokenGrid, Tensor, Tensor]:
        """Token grid, token validity (B, N) bool and positions (B, N, 4) (days, row, col, doy)."""
        B, T, C, H, W = pixels.shape
        if C != self.cfg.in_chans:
            raise ValueError(f"pixels have {C} bands, the model was built for in_chans={self.cfg.in_chans}")
        grid = TokenGrid.of(T, H, W, self.cfg)
        frac = tubelet_valid_fraction(valid, self.cfg.t_frames, self.cfg.patch)
        token_valid = frac >= self.cfg.min_valid_frac
        return grid, token_valid, tubelet_positions(days, doy, grid)

    @torch.no_grad()
    def _targets(self, pixels: Tensor, valid: Tensor, positions: Tensor, token_valid: Tensor) -> Tensor:
        """Layer-normed target-encoder latents of all valid tokens on the grid: (B, N, dim), 0 elsewhere."""
        full = self.target_encoder(pixels, valid, positions, token_valid)
        h = F.layer_norm(full.x.float(), (self.cfg.dim,))
        h = torch.where(full.valid[..., None], h, torch.zeros((), device=h.device))
        B, N = token_valid.shape
        # full.index is a prefix of a permutation of 0..N-1: scattering writes each grid slot at most once
        dense = h.new_zeros(B, N, self.cfg.dim)
        return dense.scatter(1, full.index[..., None].expand_as(h), h)

    # ---- training -----------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor],
                generator: torch.Generator | None = None) -> dict[str, Tensor | int]:
        """One JEPA step on a batch; returns ``loss`` (to backprop), ``pred_loss``, ``sigreg`` (scalar
        tensors) and ``n_context``, ``n_target`` (ints, tokens in the batch)."""
        cfg = self.cfg
        pixels, valid, days, doy = batch["pixels"], batch["valid"], batch["days"], batch["doy"]
        grid, token_valid, positions = self.tokens(pixels, valid, days, doy)
        context, target = sample_masks(token_valid, grid, cfg, generator)

        dense_targets = self._targets(pixels, valid, positions, token_valid)
        t_index, t_valid = select_tokens(target, cfg.token_pad_multiple)
        t_latents = gather_tokens(dense_targets, t_index)

        ctx = self.encoder(pixels, valid, positions, context)
        anchor, anchor_ok = last_seen(ctx, grid)  # slot t, patch s -> flat index t * S + s, as grid order
        t_pos = gather_tokens(positions, t_index)
        season = self._season(ctx, grid, t_pos[..., 0], t_index % (grid.h * grid.w),
                              gather_tokens(last_seen_days(ctx, grid), t_index))
        pred = self.predictor(ctx, t_pos, t_valid, batch.get("drivers"), batch.get("drivers_days"),
                              gather_tokens(anchor, t_index), gather_tokens(anchor_ok, t_index), season)
        pred_loss = latent_loss(pred, t_latents, t_valid, cfg.loss, cfg.smooth_l1_beta)

        if cfg.sigreg_weight > 0:
            sigreg = sigreg_statistic(ctx.x[ctx.valid], cfg.sigreg_projections, cfg.sigreg_points,
                                      generator=generator)
        else:
            sigreg = torch.zeros((), device=pred_loss.device)
        return dict(loss=pred_loss + cfg.sigreg_weight * sigreg, pred_loss=pred_loss.detach(),
                    sigreg=sigreg.detach(), n_context=int(context.sum()), n_target=int(target.sum()))

    def _season(self, ctx, grid: TokenGrid, days: Tensor, patch: Tensor, anchor_days: Tensor):
        """The predictor's seasonal memory for queries at ``days`` / ``patch`` whose last seen latent is dated
        ``anchor_days`` (all (B, Q)): year-ago latents at both dates (:func:`year_ago`); None when off."""
        cfg = self.cfg
        if not cfg.seasonal_anchor:
            return None
        at_t, ok_t = year_ago(ctx, grid, days, patch, cfg.seasonal_lag_days, cfg.seasonal_tol_days)
        at_a, ok_a = year_ago(ctx, grid, anchor_days, patch, cfg.seasonal_lag_days, cfg.seasonal_tol_days)
        return at_t, ok_t, at_a, ok_a

    @torch.no_grad()
    def update_target(self, step: int, total_steps: int) -> float:
        """EMA update ``target <- m target + (1 - m) online`` with the scheduled momentum; returns ``m``."""
        cfg = self.cfg
        m = ema_momentum(step, total_steps, cfg.ema_start, cfg.ema_end, cfg.ema_schedule)
        for tgt, src in zip(self.target_encoder.parameters(), self.encoder.parameters(), strict=True):
            tgt.lerp_(src.detach(), 1.0 - m)
        return m

    # ---- inference ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pixels: Tensor, valid: Tensor, days: Tensor, doy: Tensor,
               normalize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Observed latents from the target encoder (what inference uses), on the token grid.

        Returns:
            latents (B, Tt, Hp, Wp, dim), layer-normed (the space the predictor forecasts in) unless
            ``normalize=False``; zeros where the token is invalid.
            token_valid (B, Tt, Hp, Wp) bool.
            positions (B, Tt, Hp, Wp, 4): (days, row, col, doy) of each token.
        """
        grid, token_valid, positions = self.tokens(pixels, valid, days, doy)
        if normalize:
            dense = self._targets(pixels, valid, positions, token_valid)
        else:
            full = self.target_encoder(pixels, valid, positions, token_valid)
            x = torch.where(full.valid[..., None], full.x.float(), torch.zeros((), device=full.x.device))
            dense = x.new_zeros(*token_valid.shape, self.cfg.dim)
            dense = dense.scatter(1, full.index[..., None].expand_as(x), x)
        shape = (pixels.shape[0], grid.t, grid.h, grid.w)
        return dense.reshape(*shape, -1), token_valid.reshape(shape), positions.reshape(*shape, 4)

    def _predict_tokens(self, b: dict[str, Tensor], target_days: Tensor, target_doy: Tensor):
        """The predictor's outputs (B, K Hp Wp, dim) for every patch at each target date (see :meth:`predict`),
        with the encoded context and its token grid."""
        grid, token_valid, positions = self.tokens(b["pixels"], b["valid"], b["days"], b["doy"])
        ctx = self.encoder(b["pixels"], b["valid"], positions, token_valid)
        B, K = target_days.shape
        rows = torch.arange(grid.h, device=target_days.device, dtype=torch.float32)
        cols = torch.arange(grid.w, device=target_days.device, dtype=torch.float32)
        shape = (B, K, grid.h, grid.w)
        pos = torch.stack([
            target_days.float()[:, :, None, None].expand(shape),
            rows[None, None, :, None].expand(shape),
            cols[None, None, None, :].expand(shape),
            target_doy.float()[:, :, None, None].expand(shape),
        ], dim=-1).reshape(B, -1, 4)
        ok = torch.ones(pos.shape[:2], dtype=torch.bool, device=pos.device)
        anchor, anchor_ok = last_seen(ctx, grid)
        S = grid.h * grid.w  # every target takes the latest context at its patch ("after the window" slot)
        after, after_ok = anchor[:, grid.t * S:], anchor_ok[:, grid.t * S:]
        patch = torch.arange(S, device=pos.device).repeat(K)[None].expand(B, -1)
        season = self._season(ctx, grid, pos[..., 0], patch,
                              last_seen_days(ctx, grid)[:, grid.t * S:].repeat(1, K))
        pred = self.predictor(ctx, pos, ok, b.get("drivers"), b.get("drivers_days"),
                              after.repeat(1, K, 1), after_ok.repeat(1, K), season)
        return pred, ctx, grid

    def predict(self, context_batch: dict[str, Tensor], target_days: Tensor, target_doy: Tensor) -> Tensor:
        """Forecast latents at every patch for each requested date, in one direct prediction per date.

        Args:
            context_batch: ``pixels``, ``valid``, ``days``, ``doy`` (+ optional ``drivers``,
                ``drivers_days``) of the observed frames; all their valid tokens are the context,
                encoded by the online encoder (as in training).
            target_days: (B, K) days on the origin of ``context_batch["days"]``; may lie past its last date.
            target_doy: (B, K) day of year of each target date.

        Returns:
            (B, K, Hp, Wp, dim) predicted layer-normed latents. Wrap in ``torch.no_grad()`` for inference.
        """
        pred, _, grid = self._predict_tokens(context_batch, target_days, target_doy)
        return pred.reshape(*target_days.shape, grid.h, grid.w, self.cfg.dim)

    # ---- monitoring ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def health(self, batch: dict[str, Tensor]) -> dict[str, float | bool | int]:
        """Collapse watch on the layer-normed target latents of all valid tokens of ``batch``.

        ``std_mean``/``std_min``: per-dimension std over tokens (mean and min over dims); ``rankme``:
        effective rank; ``collapse_warning``: std_mean < ``collapse_std`` or rankme <
        ``collapse_rank_frac`` x min(dim, tokens).
        """
        pixels, valid = batch["pixels"], batch["valid"]
        grid, token_valid, positions = self.tokens(pixels, valid, batch["days"], batch["doy"])
        z = self._targets(pixels, valid, positions, token_valid)[token_valid]
        n = z.shape[0]
        if n < 2:
            return dict(std_mean=float("nan"), std_min=float("nan"), rankme=float("nan"), n_tokens=n,
                        collapse_warning=False)
        std = z.std(dim=0)
        rank = rankme(z)
        cfg = self.cfg
        warn = float(std.mean()) < cfg.collapse_std or rank < cfg.collapse_rank_frac * min(cfg.dim, n)
        return dict(std_mean=float(std.mean()), std_min=float(std.min()), rankme=rank, n_tokens=n,
                    collapse_warning=bool(warn))

    def param_counts(self) -> dict[str, int]:
        """Parameters per part; ``trainable`` = encoder + predictor (the target encoder is an EMA copy)."""
        def count(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())

        enc, pred = count(self.encoder), count(self.predictor)
        return dict(encoder=enc, predictor=pred, target_encoder=count(self.target_encoder),
                    trainable=enc + pred)

    def flops_per_step(self, batch_shape: tuple[int, int, int, int, int],
                       context_frac: float = 0.75) -> float:
        """Approximate training FLOPs of one step for ``batch_shape`` (B, T, C, H, W), all tokens valid.

        Counts matmuls only (2 FLOPs per multiply-add): online encoder on ``context_frac`` of the tokens and
        predictor on all of them, forward + backward (x3); target encoder forward on all tokens (x1).
        """
        cfg = self.cfg
        B, T, C, H, W = batch_shape
        grid = TokenGrid.of(T, H, W, cfg)
        N = grid.n
        n_ctx = context_frac * N
        patch_in = cfg.t_frames * (cfg.in_chans + 1) * cfg.patch**2

        def vit(n: float, dim: int, depth: int) -> float:
            dense = 2 * n * dim * dim * (4 + 2 * cfg.mlp_ratio)  # qkv, proj, mlp
            attn = 4 * n * n * dim  # q k^T and attn v
            return depth * (dense + attn)

        encoder = 2 * n_ctx * patch_in * cfg.dim + vit(n_ctx, cfg.dim, cfg.depth)
        target = 2 * N * patch_in * cfg.dim + vit(N, cfg.dim, cfg.depth)
        predictor = 2 * N * cfg.dim * cfg.pred_dim + vit(N, cfg.pred_dim, cfg.pred_depth)
        return float(B * (3 * (encoder + predictor) + target))
