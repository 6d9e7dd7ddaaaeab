"""The encoder and the predictor: ViTs over tubelet tokens with 3D rotary positions.

Token layout. A window ``pixels`` (B, T, C, H, W) is cut into tubelets of ``t_frames x patch x patch``
pixels, giving a grid of ``Tt x Hp x Wp`` tokens (``Tt = T / t_frames``, ``Hp = H / patch``,
``Wp = W / patch``), flattened in (time slot, row, col) order to ``N = Tt Hp Wp``. Each token has a
position (B, N, 4) = (days, row, col, doy): the tubelet's mean date in days from the window start,
its patch row and column, and its mean day of year on the circle.

Dropped tokens. A model never sees tokens that are mostly cloud or fill: each sample keeps a
variable number of tokens, gathered into a set padded to the longest sample of the batch
(``TokenSet``), and padded slots are masked out of attention as keys, so they cannot influence
any kept token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geowm.model.config import ModelConfig
from geowm.model.rope import Rope3D, apply_rope, doy_features, mean_doy


@dataclass(frozen=True)
class TokenGrid:
    """The token grid of a window: ``t`` time slots x ``h`` patch rows x ``w`` patch columns."""

    t: int
    h: int
    w: int

    @property
    def n(self) -> int:
        return self.t * self.h * self.w

    @classmethod
    def of(cls, T: int, H: int, W: int, cfg: ModelConfig) -> TokenGrid:
        """The grid for T frames of H x W px; raises ``ValueError`` when they do not divide into tubelets."""
        if T % cfg.t_frames or H % cfg.patch or W % cfg.patch:
            raise ValueError(f"window T={T}, H={H}, W={W} does not divide into tubelets of "
                             f"{cfg.t_frames} x {cfg.patch} x {cfg.patch}")
        return cls(T // cfg.t_frames, H // cfg.patch, W // cfg.patch)


def patchify(pixels: Tensor, valid: Tensor, t_frames: int, patch: int) -> Tensor:
    """(B, T, C, H, W) pixels and (B, T, H, W) validity -> (B, N, t_frames (C + 1) patch^2) tubelet vectors.

    Invalid pixels are zeroed and the validity itself is appended as an extra channel, so a token
    that is partly cloudy knows which of its pixels are real.
    """
    B, T, C, H, W = pixels.shape
    v = valid.unsqueeze(2).to(pixels.dtype)
    x = torch.cat([pixels * v, v], dim=2)  # (B, T, C + 1, H, W)
    Tt, Hp, Wp = T // t_frames, H // patch, W // patch
    x = x.reshape(B, Tt, t_frames, C + 1, Hp, patch, Wp, patch)
    x = x.permute(0, 1, 4, 6, 2, 3, 5, 7)  # (B, Tt, Hp, Wp, t, C + 1, p, p)
    return x.reshape(B, Tt * Hp * Wp, t_frames * (C + 1) * patch * patch)


def tubelet_valid_fraction(valid: Tensor, t_frames: int, patch: int) -> Tensor:
    """(B, T, H, W) bool -> (B, N) float: fraction of valid pixels in each tubelet."""
    B, T, H, W = valid.shape
    v = valid.reshape(B, T // t_frames, t_frames, H // patch, patch, W // patch, patch).float()
    return v.mean(dim=(2, 4, 6)).reshape(B, -1)


def tubelet_positions(days: Tensor, doy: Tensor, grid: TokenGrid) -> Tensor:
    """(B, T) days and day of year -> (B, N, 4) float32 positions (days, row, col, doy) of each token.

    A tubelet of several frames is dated at the mean of their days and the circular mean of their doy.
    """
    B, T = days.shape
    tf = T // grid.t
    d = days.float().reshape(B, grid.t, tf).mean(-1)  # (B, Tt)
    s = mean_doy(doy.reshape(B, grid.t, tf), dim=-1)  # (B, Tt)
    rows = torch.arange(grid.h, device=days.device, dtype=torch.float32)
    cols = torch.arange(grid.w, device=days.device, dtype=torch.float32)
    shape = (B, grid.t, grid.h, grid.w)
    pos = torch.stack([
        d[:, :, None, None].expand(shape),
        rows[None, None, :, None].expand(shape),
        cols[None, None, None, :].expand(shape),
        s[:, :, None, None].expand(shape),
    ], dim=-1)
    return pos.reshape(B, grid.n, 4)


@dataclass
class TokenSet:
    """A padded set of kept tokens: ``x`` (B, L, D); ``index`` (B, L) long, slot in the full grid of N;
    ``valid`` (B, L) bool, False for padding; ``pos`` (B, L, 4) (days, row, col, doy)."""

    x: Tensor
    index: Tensor
    valid: Tensor
    pos: Tensor


def select_tokens(keep: Tensor, pad_multiple: int = 1) -> tuple[Tensor, Tensor]:
    """(B, N) bool -> ``index`` (B, L) long and ``valid`` (B, L) bool of the kept tokens, in grid order.

    ``L`` is the largest kept count of the batch, rounded up to ``pad_multiple`` (at most N, at least 1);
    padded slots point at some other token and are marked ``valid=False``.
    """
    B, N = keep.shape
    counts = keep.sum(dim=1)
    L = min(N, max(1, math.ceil(int(counts.max()) / pad_multiple) * pad_multiple))
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # kept tokens first
    index = order[:, :L]
    valid = torch.arange(L, device=keep.device)[None, :] < counts[:, None]
    return index, valid


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """(B, N, ...) and (B, L) indices -> (B, L, ...)."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def last_seen(context: TokenSet, grid: TokenGrid) -> tuple[Tensor, Tensor]:
    """For every time slot t (and t = grid.t, "after the window") and patch (row, col): the context latent
    at that patch from the latest time slot before t.

    Returns ``anchor`` (B, (Tt + 1) * Hp * Wp, D), flattened as (slot, row, col), and ``ok`` (same
    without D) bool, False where the patch has no earlier context token.
    """
    B, L, D = context.x.shape
    S = grid.h * grid.w
    x = torch.where(context.valid[..., None], context.x, torch.zeros((), dtype=context.x.dtype,
                                                                     device=context.x.device))
    # index is a prefix of a permutation of the grid: each slot is written at most once
    dense = x.new_zeros(B, grid.n, D).scatter(1, context.index[..., None].expand(B, L, D), x)
    present = torch.zeros(B, grid.n, dtype=torch.bool, device=x.device).scatter(1, context.index, context.valid)
    dense, present = dense.reshape(B, grid.t, S, D), present.reshape(B, grid.t, S)
    last = x.new_zeros(B, S, D)
    seen = torch.zeros(B, S, dtype=torch.bool, device=x.device)
    anchors, oks = [], []
    for t in range(grid.t + 1):
        anchors.append(last)
        oks.append(seen)
        if t < grid.t:
            last = torch.where(present[:, t, :, None], dense[:, t], last)
            seen = seen | present[:, t]
    return torch.stack(anchors, 1).reshape(B, -1, D), torch.stack(oks, 1).reshape(B, -1)


class Attention(nn.Module):
    """Multi-head self-attention with 3D RoPE on queries and keys and a key padding mask."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None) -> Tensor:
        """``x`` (B, L, dim); ``attn_mask`` (B, 1, 1, L) bool, True = may be attended to, or None."""
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads)
        # RoPE on queries and keys together before the heads are moved ahead of the tokens, where each head's
        # channels are contiguous: the same values, 3x faster on CPU than on the permuted views
        qk = apply_rope(qkv[:, :, :2], cos.transpose(1, 2).unsqueeze(2), sin.transpose(1, 2).unsqueeze(2))
        q, k = qk.permute(2, 0, 3, 1, 4)
        v = qkv[:, :, 2].transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, attn_mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of blocks sharing one 3D RoPE; ends with a LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, cfg: ModelConfig):
        super().__init__()
        self.rope = Rope3D(dim // heads, cfg.rope_day_periods, cfg.rope_patch_periods)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor, valid: Tensor | None) -> Tensor:
        """``x`` (B, L, dim), ``pos`` (B, L, >= 3) (days, row, col, ...), ``valid`` (B, L) bool or None."""
        cos, sin = self.rope(pos[..., :3])
        attn_mask = None
        if valid is not None:
            # a sample with no token at all would give an all-masked softmax row (NaN): let it see slot 0
            keys = valid.clone()
            keys[:, 0] |= ~valid.any(dim=1)
            attn_mask = keys[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, cos, sin, attn_mask)
        return self.norm(x)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights (std 0.02), zero biases, residual projections scaled by depth."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for layer, blk in enumerate((b for b in module.modules() if isinstance(b, Block)), start=1):
        blk.attn.proj.weight.data.div_(math.sqrt(2.0 * layer))
        blk.mlp[2].weight.data.div_(math.sqrt(2.0 * layer))


class Encoder(nn.Module):
    """ViT over the kept tubelets of a window; used as the online (context) and the EMA target encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.t_frames * (cfg.in_chans + 1) * cfg.patch**2, cfg.dim)
        self.doy_embed = nn.Linear(2, cfg.dim)
        self.transformer = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg)
        init_weights(self)

    def forward(self, pixels: Tensor, valid: Tensor, positions: Tensor, keep: Tensor) -> TokenSet:
        """Encode the tokens marked in ``keep``.

        Args:
            pixels: (B, T, C, H, W) normalised bands.
            valid: (B, T, H, W) bool, True = clear observation.
            positions: (B, N, 4) (days, row, col, doy) of every token (``tubelet_positions``).
            keep: (B, N) bool, tokens to encode; the others are dropped, never embedded nor attended to.

        Returns:
            ``TokenSet`` with ``x`` (B, L, dim) latents of the kept tokens.
        """
        cfg = self.cfg
        index, ok = select_tokens(keep, cfg.token_pad_multiple)
        patches = gather_tokens(patchify(pixels, valid, cfg.t_frames, cfg.patch), index)
        pos = gather_tokens(positions, index)
        x = self.embed(patches) + self.doy_embed(doy_features(pos[..., 3]))
        return TokenSet(self.transformer(x, pos, ok), index, ok, pos)


def year_ago(context: TokenSet, grid: TokenGrid, days: Tensor, patch: Tensor, lag: float,
             tol: float) -> tuple[Tensor, Tensor]:
    """For each query at ``days`` (B, Q) and patch ``patch`` (B, Q) long (``row * Wp + col``): the context latent at
    that patch whose date is nearest to ``days - lag``. Returns ``x`` (B, Q, D) and ``ok`` (B, Q) bool, False where
    no context token of the patch lies within ``tol`` days of it (``x`` is then some other token: mask it)."""
    S = grid.h * grid.w
    ctx_patch = context.index % S  # (B, L)
    gap = (context.pos[:, None, :, 0] - (days[:, :, None] - lag)).abs()  # (B, Q, L)
    same = (ctx_patch[:, None, :] == patch[:, :, None]) & context.valid[:, None, :]
    gap = torch.where(same, gap, torch.full((), float("inf"), device=gap.device))
    best, j = gap.min(dim=-1)
    return gather_tokens(context.x, j), best <= tol


def last_seen_days(context: TokenSet, grid: TokenGrid) -> Tensor:
    """The date (days) of the latent :func:`last_seen` returns, same layout without D: (B, (Tt + 1) Hp Wp)."""
    days = TokenSet(context.pos[..., :1].to(context.x.dtype), context.index, context.valid, context.pos)
    return last_seen(days, grid)[0][..., 0]


class Predictor(nn.Module):
    """Narrow ViT: context latents + mask tokens at target positions (+ driver tokens) -> target latents.

    A mask token is one learned vector plus the doy encoding of its date; its days, row and col act
    through RoPE, so a forecast at any lead (even past the window) is one direct prediction. Driver
    tokens (weather per period) are a linear projection of ``drivers`` plus a learned flag, placed by
    RoPE at (drivers_days, row 0, col 0).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.dim, cfg.pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(cfg.pred_dim))
        self.doy_embed = nn.Linear(2, cfg.pred_dim)
        if cfg.drivers_dim > 0:
            self.driver_embed = nn.Linear(cfg.drivers_dim, cfg.pred_dim)
            self.driver_flag = nn.Parameter(torch.zeros(cfg.pred_dim))
        if cfg.pred_anchor:
            self.anchor_embed = nn.Linear(cfg.dim, cfg.pred_dim)
            self.anchor_out = nn.Linear(cfg.dim, cfg.dim)  # skip path: predict the change from the anchor
        if cfg.seasonal_anchor:
            self.season_embed = nn.Linear(cfg.dim, cfg.pred_dim)
            self.season_out = nn.Linear(cfg.dim, cfg.dim)  # skip path: last year's change over the same span
        self.transformer = Transformer(cfg.pred_dim, cfg.pred_depth, cfg.pred_heads, cfg.mlp_ratio, cfg)
        self.proj = nn.Linear(cfg.pred_dim, cfg.dim)
        init_weights(self)
        if cfg.pred_anchor:  # start exactly as "copy the last latent seen here"; training learns the change
            nn.init.eye_(self.anchor_out.weight)
            nn.init.zeros_(self.anchor_out.bias)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        if cfg.seasonal_anchor:  # start as "the last latent seen here + last year's change from then to the target"
            nn.init.eye_(self.season_out.weight)
            nn.init.zeros_(self.season_out.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if cfg.drivers_dim > 0:
            nn.init.trunc_normal_(self.driver_flag, std=0.02)

    def forward(self, context: TokenSet, target_pos: Tensor, target_valid: Tensor,
                drivers: Tensor | None = None, drivers_days: Tensor | None = None,
                anchor: Tensor | None = None, anchor_ok: Tensor | None = None,
                season: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """Predict the target encoder's (layer-normed) latents at ``target_pos``.

        Args:
            context: encoded context tokens, ``x`` (B, Lc, dim).
            target_pos: (B, Lt, 4) (days, row, col, doy) of the tokens to predict; days may lie past
                the window.
            target_valid: (B, Lt) bool, False for padding.
            drivers: optional (B, Td, drivers_dim) weather conditioning.
            drivers_days: (B, Td) dates of ``drivers`` (days), required with them.
            anchor, anchor_ok: (B, Lt, dim) the last context latent seen at each target's patch
                (``last_seen``) and whether there is one; used when ``cfg.pred_anchor``.
            season: used when ``cfg.seasonal_anchor``: ``(at_target, ok_target, at_anchor, ok_anchor)``, the
                context latents (B, Lt, dim) seen at each target's patch one ``seasonal_lag_days`` before the
                target's date and before the anchor's date (:func:`year_ago`), and whether they exist.

        Returns:
            (B, Lt, dim) predictions.
        """
        B, Lt = target_valid.shape
        xs = [self.embed(context.x)]
        pos = [context.pos[..., :3]]
        ok = [context.valid]
        if drivers is not None:
            if self.cfg.drivers_dim == 0:
                raise ValueError("batch has drivers but the model was built with drivers_dim=0")
            if drivers_days is None:
                raise ValueError("drivers given without drivers_days")
            xs.append(self.driver_embed(drivers) + self.driver_flag)
            zeros = torch.zeros_like(drivers_days, dtype=torch.float32)
            pos.append(torch.stack([drivers_days.float(), zeros, zeros], dim=-1))
            ok.append(torch.ones(drivers_days.shape, dtype=torch.bool, device=drivers_days.device))
        masks = self.mask_token + self.doy_embed(doy_features(target_pos[..., 3]))
        skip = None
        if self.cfg.pred_anchor and anchor is not None:
            a_norm = F.layer_norm(anchor, (anchor.shape[-1],))
            zero = torch.zeros((), dtype=a_norm.dtype, device=a_norm.device)
            masks = masks + torch.where(anchor_ok[..., None], self.anchor_embed(a_norm), zero)
            skip = torch.where(anchor_ok[..., None], self.anchor_out(a_norm), zero)
        if self.cfg.seasonal_anchor and season is not None:
            at_t, ok_t, at_a, ok_a = season
            st, sa = F.layer_norm(at_t, (at_t.shape[-1],)), F.layer_norm(at_a, (at_a.shape[-1],))
            zero = torch.zeros((), dtype=st.dtype, device=st.device)
            masks = masks + torch.where(ok_t[..., None], self.season_embed(st), zero)
            change = torch.where((ok_t & ok_a)[..., None], self.season_out(st - sa), zero)
            skip = change if skip is None else skip + change
        xs.append(masks)
        pos.append(target_pos[..., :3])
        ok.append(target_valid)
        x = self.transformer(torch.cat(xs, dim=1), torch.cat(pos, dim=1), torch.cat(ok, dim=1))
        out = self.proj(x[:, -Lt:])
        out = out if skip is None else out + skip
        return F.layer_norm(out, (out.shape[-1],)) if self.cfg.pred_out_norm else out
