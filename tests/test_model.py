"""The world model (geowm.model): tokens, 3D RoPE on real dates, dropped cloud tokens, EMA target,
masks, loss on valid targets, forecasting past the window, config, health metrics. Tiny shapes, CPU."""

from __future__ import annotations

import math

import pytest
import torch

from geowm.model import JEPA, ModelConfig, ema_momentum, rankme, sigreg_statistic
from geowm.model.jepa import latent_loss
from geowm.model.masks import forecast_mask, sample_masks, tube_block, tube_mask
from geowm.model.rope import mean_doy
from geowm.model.vit import TokenGrid

# a test-sized model: 2 blocks of width 48 (head dim 24 -> 4 rotary pairs per axis)
SMALL = dict(dim=48, depth=2, heads=2, pred_dim=32, pred_depth=1, pred_heads=2, patch=8, in_chans=3)


def make_model(seed: int = 0, **overrides) -> JEPA:
    torch.manual_seed(seed)
    return JEPA(ModelConfig.preset("tiny", **{**SMALL, **overrides})).eval()


def make_batch(B: int = 2, T: int = 4, C: int = 3, H: int = 32, W: int = 32, seed: int = 0,
               cloud: float = 0.0) -> dict[str, torch.Tensor]:
    """Random normalised bands; irregular dates (gaps 5..40 days); whole-frame clouds with prob ``cloud``."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(5, 41, (B, T), generator=g).float()
    gaps[:, 0] = 0
    days = gaps.cumsum(1)
    valid = (torch.rand(B, T, 1, 1, generator=g) >= cloud).expand(B, T, H, W).clone()
    return dict(pixels=torch.randn(B, T, C, H, W, generator=g), valid=valid, days=days,
                doy=(days + 120) % 365 + 1)


def sharpen(module: torch.nn.Module, factor: float = 8.0) -> None:
    """Scale query and key weights so attention is peaked (at init it is near uniform, blind to positions)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("attn.qkv.weight"):
                p[: 2 * p.shape[1]] *= factor


def encode_online(model: JEPA, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online-encoder latents of all valid tokens: (x (B, L, D), valid (B, L), token_valid (B, N))."""
    _, token_valid, pos = model.tokens(batch["pixels"], batch["valid"], batch["days"], batch["doy"])
    out = model.encoder(batch["pixels"], batch["valid"], pos, token_valid)
    return out.x, out.valid, token_valid


# ---- shapes and tokens ----------------------------------------------------------------------------

@pytest.mark.parametrize("t_frames", [1, 2])
def test_shapes_for_both_tubelet_kinds(t_frames):
    model = make_model(t_frames=t_frames)
    batch = make_batch(B=2, T=4, H=32, W=32)
    Tt, D = 4 // t_frames, model.cfg.dim
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(0))
        lat, tok_valid, pos = model.encode(batch["pixels"], batch["valid"], batch["days"], batch["doy"])
        pred = model.predict(batch, batch["days"][:, -1:] + 30, batch["doy"][:, -1:])
    assert lat.shape == (2, Tt, 4, 4, D) and tok_valid.shape == (2, Tt, 4, 4)
    assert pos.shape == (2, Tt, 4, 4, 4) and pred.shape == (2, 1, 4, 4, D)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["n_target"] > 0 and out["n_context"] > 0
    # a tubelet is dated at its frames' mean date and circular-mean day of year
    days = batch["days"].reshape(2, Tt, t_frames).mean(-1)
    assert torch.allclose(pos[:, :, 0, 0, 0], days)
    assert torch.equal(pos[0, 0, :, :, 1], torch.arange(4.0)[:, None].expand(4, 4))  # patch row
    assert torch.equal(pos[0, 0, :, :, 2], torch.arange(4.0)[None, :].expand(4, 4))  # patch col


def test_mean_doy_is_circular():
    assert float(mean_doy(torch.tensor([360.0, 5.0]))) == pytest.approx(365.125, abs=0.01)
    assert float(mean_doy(torch.tensor([100.0, 110.0]))) == pytest.approx(105.0, abs=1e-3)


def test_window_must_divide_into_tubelets():
    with pytest.raises(ValueError, match="tubelets"):
        make_model(t_frames=2)(make_batch(T=3))


# ---- 3D RoPE on real dates ------------------------------------------------------------------------

def test_rope_uses_real_dates_not_frame_index():
    model = make_model()
    sharpen(model.encoder)
    a = make_batch(B=1, T=4)
    b = {**a, "days": torch.tensor([[0.0, 5.0, 40.0, 45.0]])}
    a["days"] = torch.tensor([[0.0, 10.0, 20.0, 30.0]])
    b["doy"] = a["doy"] = torch.full((1, 4), 150.0)  # same season: only the gaps differ
    with torch.no_grad():
        xa, xa2, xb = encode_online(model, a)[0], encode_online(model, dict(a))[0], encode_online(model, b)[0]
        shifted = encode_online(model, {**a, "days": a["days"] + 100.0})[0]
    assert torch.equal(xa, xa2)  # same dates -> identical
    assert (xa - xb).abs().max() > 1e-2  # same pixels, other gaps -> other latents
    assert torch.allclose(xa, shifted, atol=1e-4)  # rotary: only date differences matter ...
    with torch.no_grad():  # ... and the season enters through the day-of-year encoding
        other_season = encode_online(model, {**a, "doy": a["doy"] + 90.0})[0]
    assert (xa - other_season).abs().max() > 1e-2


# ---- cloudy tokens are dropped --------------------------------------------------------------------

def test_cloud_tokens_are_dropped_not_zero_filled():
    model = make_model()
    batch = make_batch(B=2, T=4, H=32, W=32)
    valid = batch["valid"]
    valid[0, 1] = False  # a whole cloudy frame
    valid[1, 2, :8, :8] = False  # one fully invalid tubelet
    valid[1, 3, 8:16, 8:16] = False
    valid[1, 3, 8:10, 8:16] = True  # a tubelet 25 % valid: below min_valid_frac 0.5, dropped
    x, set_valid, token_valid = encode_online(model, batch)
    assert set_valid.sum(1).tolist() == token_valid.sum(1).tolist() == [48, 62]

    changed = {k: v.clone() for k, v in batch.items()}
    changed["pixels"][0, 1] += 100 * torch.randn_like(changed["pixels"][0, 1])  # under the cloudy frame
    changed["pixels"][1, 2, :, :8, :8] = 1e3
    changed["pixels"][1, 3, :, 8:16, 8:16] = -50.0  # includes the 25 % valid pixels of the dropped tubelet
    x2, set_valid2, _ = encode_online(model, changed)
    assert torch.equal(set_valid, set_valid2)
    assert torch.equal(x[set_valid], x2[set_valid])  # no kept token felt anything
    lat1, tv1, _ = model.encode(batch["pixels"], valid, batch["days"], batch["doy"])
    lat2, _, _ = model.encode(changed["pixels"], valid, batch["days"], batch["doy"])
    assert torch.equal(lat1, lat2) and not tv1[1, 3, 1, 1] and tv1[1, 3, 0, 0]
    # control: the same change on a *kept* tubelet does reach the others through attention
    changed["pixels"][1, 3, :, 16:24, 16:24] = -50.0
    x3, _, _ = encode_online(model, changed)
    assert not torch.equal(x[1][set_valid[1]], x3[1][set_valid[1]])


# ---- EMA target encoder ---------------------------------------------------------------------------

def test_target_encoder_gets_no_gradient_and_follows_by_ema():
    model = make_model().train()
    out = model(make_batch(cloud=0.2), generator=torch.Generator().manual_seed(1))
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target_encoder.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters())
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    old = [p.clone() for p in model.target_encoder.parameters()]
    m = model.update_target(step=10, total_steps=100)
    assert m == pytest.approx(ema_momentum(10, 100, 0.996, 1.0, "cosine"))
    for t_old, t_new, online in zip(old, model.target_encoder.parameters(), model.encoder.parameters(),
                                    strict=True):
        assert torch.allclose(t_new, m * t_old + (1 - m) * online, atol=1e-6)
        assert (t_new - online).abs().sum() < (t_old - online).abs().sum()  # moved toward the online encoder


def test_ema_momentum_schedule():
    for schedule in ("cosine", "linear"):
        ms = [ema_momentum(s, 100, 0.996, 1.0, schedule) for s in range(0, 101, 10)]
        assert ms[0] == pytest.approx(0.996) and ms[-1] == pytest.approx(1.0)
        assert all(a <= b for a, b in zip(ms, ms[1:], strict=False))
    assert ema_momentum(50, 100, 0.99, 1.0, "linear") == pytest.approx(0.995)


# ---- masks ----------------------------------------------------------------------------------------

def test_forecast_mask_is_exactly_the_last_k_slots():
    grid = TokenGrid(6, 4, 5)
    m = forecast_mask(grid, 2)
    assert m[4:].all() and not m[:4].any()
    cfg = ModelConfig.preset("tiny", forecast_mask_prob=1.0, forecast_slots=(1, 3))
    token_valid = torch.ones(16, grid.n, dtype=torch.bool)
    ctx, tgt = sample_masks(token_valid, grid, cfg, torch.Generator().manual_seed(0))
    ks = set()
    for t in tgt.reshape(16, 6, 4, 5):
        slots = t.flatten(1)
        k = int(slots.all(1).sum())
        assert 1 <= k <= 3 and slots[-k:].all() and not slots[:-k].any()  # whole last k slots, nothing else
        ks.add(k)
    assert ks == {1, 2, 3}
    assert not (ctx & tgt).any() and (ctx | tgt).all()


def test_tube_masks_span_all_time_slots_within_scale():
    grid = TokenGrid(4, 16, 16)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = tube_block(grid, (0.1, 0.25), (0.5, 2.0), g)
        assert 0.1 - 0.05 <= h * w / 256 <= 0.25 + 0.05 and 0 <= top <= 16 - h and 0 <= left <= 16 - w
    m = tube_mask(grid, 3, (0.1, 0.25), (0.5, 2.0), g)
    assert torch.equal(m, m[:1].expand_as(m))  # same patches at every date
    assert 0.1 - 0.05 <= m[0].float().mean() <= 3 * 0.25 + 0.05

    cfg = ModelConfig.preset("tiny", forecast_mask_prob=0.0)
    token_valid = torch.rand(8, grid.n, generator=g) > 0.3
    ctx, tgt = sample_masks(token_valid, grid, cfg, torch.Generator().manual_seed(5))
    assert not (ctx & tgt).any() and torch.equal(ctx | tgt, token_valid)
    again = sample_masks(token_valid, grid, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(tgt, again[1]) and torch.equal(ctx, again[0])  # seedable


# ---- loss -----------------------------------------------------------------------------------------

def test_loss_only_on_valid_targets():
    model = make_model(forecast_mask_prob=1.0, forecast_slots=(1, 1))  # targets: the last date
    batch = make_batch(B=2, T=4)
    batch["valid"][0, 3, :8, :8] = False
    batch["valid"][0, 3, :2, :8] = True  # 25 % valid: not a token, so not a target
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(0))
        loss = out["loss"]
        perturbed = {**batch, "pixels": batch["pixels"].clone()}
        perturbed["pixels"][0, 3, :, :8, :8] = 77.0
        loss2 = model(perturbed, generator=torch.Generator().manual_seed(0))["loss"]
        perturbed["pixels"][0, 3, :, 8:16, :8] = 77.0  # a valid target: the loss must see it
        loss3 = model(perturbed, generator=torch.Generator().manual_seed(0))["loss"]
    assert loss == loss2 and loss3 != loss
    assert out["n_target"] == 2 * 16 - 1 and out["n_context"] == 2 * 3 * 16  # the 4 x 4 patches of a date

    pred, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    ok = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    noisy = pred.clone()
    noisy[~ok] = float("nan")
    assert latent_loss(noisy, target, ok) == latent_loss(pred, target, ok)


def test_a_few_steps_reduce_the_loss():
    model = make_model().train()
    batch = make_batch(B=4, T=4, cloud=0.2, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for step in range(15):
        out = model(batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.update_target(step, 1000)
        losses.append(out["loss"].item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_sigreg_term_trains_and_tells_gaussian_from_collapse():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(2000, 32, generator=g)
    collapsed = torch.randn(2000, 1, generator=g) * torch.ones(1, 32) / math.sqrt(32)  # one direction only
    assert sigreg_statistic(gaussian, generator=g) < 0.01 < sigreg_statistic(collapsed, generator=g)
    assert sigreg_statistic(torch.zeros(500, 32), generator=g) > 0.1
    model = make_model(sigreg_weight=0.1)
    out = model(make_batch(), generator=torch.Generator().manual_seed(0))
    assert out["sigreg"] > 0
    assert out["loss"].item() == pytest.approx(float(out["pred_loss"] + 0.1 * out["sigreg"]))
    out["loss"].backward()


def test_bf16_autocast_step():
    model = make_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_batch(cloud=0.2), generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(sigreg_statistic(torch.randn(64, 48)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32


# ---- forecasting ----------------------------------------------------------------------------------

def test_predictor_forecasts_past_the_window_and_uses_drivers():
    model = make_model(drivers_dim=3, pred_anchor=False)  # the transformer path alone (no copy-last skip)
    sharpen(model.predictor)
    batch = make_batch(B=2, T=4)
    last = batch["days"][:, -1:]
    with torch.no_grad():
        leads = model.predict(batch, torch.cat([last + 16, last + 200], 1), torch.full((2, 2), 200.0))
        assert leads.shape == (2, 2, 4, 4, 48) and torch.isfinite(leads).all()
        assert (leads[:, 0] - leads[:, 1]).abs().max() > 1e-3  # the lead (days) matters
        drv = {**batch, "drivers": torch.randn(2, 6, 3),
               "drivers_days": torch.linspace(0, 150, 6).expand(2, 6)}
        with_drivers = model.predict(drv, torch.cat([last + 16, last + 200], 1), torch.full((2, 2), 200.0))
        assert (with_drivers - leads).abs().max() > 1e-3
        assert torch.isfinite(model(drv, generator=torch.Generator().manual_seed(0))["loss"])
    with pytest.raises(ValueError, match="drivers_dim"):
        make_model()(drv)


# ---- config, health, sizes ------------------------------------------------------------------------

def test_config_from_dict_rejects_unknown_keys():
    cfg = ModelConfig.preset("small", in_chans=6)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus.*depthh|depthh.*bogus") as err:
        ModelConfig.from_dict({**cfg.to_dict(), "depthh": 3, "bogus": 1})
    assert "dim" not in str(err.value).split("(known")[0]
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="heads"):
        ModelConfig(dim=100, heads=3)
    tiny, small, base = (ModelConfig.preset(n) for n in ("tiny", "small", "base"))
    assert (tiny.t_frames, small.t_frames, base.t_frames) == (1, 2, 2)
    assert (small.dim, small.depth, small.heads) == (384, 12, 6)
    assert (base.dim, base.depth, base.heads) == (768, 12, 12)


def test_rankme_and_health():
    g = torch.Generator().manual_seed(0)
    assert rankme(torch.randn(512, 64, generator=g)) > 0.8 * 64
    assert rankme(torch.randn(512, 1, generator=g) @ torch.randn(1, 64, generator=g)) < 1.05
    model = make_model()
    h = model.health(make_batch())
    assert set(h) == {"std_mean", "std_min", "rankme", "n_tokens", "collapse_warning"}
    assert h["std_mean"] > 0.3 and h["rankme"] > 10 and h["collapse_warning"] is False
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.zero_()  # a collapsed target encoder: every token maps to the same latent
    h = model.health(make_batch())
    assert h["std_mean"] < 0.05 and h["collapse_warning"] is True


def test_weights_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model(t_frames=2)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    assert not any("freq" in k for k in model.state_dict())  # rotary tables come from the config
    again = JEPA(ModelConfig.from_dict(model.cfg.to_dict()))
    again.load_state_dict(load_file(tmp_path / "model.safetensors"))
    batch = make_batch()
    args = (batch["pixels"], batch["valid"], batch["days"], batch["doy"])
    assert torch.equal(model.encode(*args)[0], again.encode(*args)[0])


def test_param_counts_and_flops():
    model = make_model()
    counts = model.param_counts()
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["target_encoder"] == counts["encoder"]
    f1, f2 = model.flops_per_step((1, 4, 3, 32, 32)), model.flops_per_step((2, 4, 3, 32, 32))
    assert f1 > 0 and f2 == pytest.approx(2 * f1)
    tiny = JEPA(ModelConfig.preset("tiny")).param_counts()["trainable"]
    assert 0.5e6 < tiny < 2e6


def test_anchor_skip_starts_as_copy_last_and_only_uses_the_past():
    """With ``pred_anchor`` the predictor starts near "copy the last latent seen at this patch" (identity
    skip), and a training target's anchor comes only from earlier time slots."""
    from geowm.model.vit import TokenGrid, last_seen

    model = make_model()
    batch = make_batch(B=2, T=4)
    with torch.no_grad():
        grid, token_valid, positions = model.tokens(batch["pixels"], batch["valid"], batch["days"], batch["doy"])
        ctx = model.encoder(batch["pixels"], batch["valid"], positions, token_valid)
        anchor, ok = last_seen(ctx, grid)
        S = grid.h * grid.w
        assert not ok[:, :S].any() and ok[:, S:].all()  # slot 0 has no past; later slots see slot 0
        dense = torch.zeros(2, grid.n, model.cfg.dim).scatter(1, ctx.index[..., None].expand_as(ctx.x), ctx.x)
        torch.testing.assert_close(anchor[:, grid.t * S:], dense[:, (grid.t - 1) * S:])  # after window = last slot
        last = batch["days"][:, -1:]
        pred = model.predict(batch, last + 10, batch["doy"][:, -1:])
        copy = torch.nn.functional.layer_norm(dense[:, (grid.t - 1) * S:], (model.cfg.dim,))
        cos = torch.nn.functional.cosine_similarity(pred.reshape(2, S, -1), copy, dim=-1)
        assert cos.min() > 0.9
    assert isinstance(grid, TokenGrid)


def test_seasonal_memory_finds_the_year_ago_latent_and_starts_as_last_plus_last_years_change():
    """``seasonal_anchor``: each target also sees the latent at its patch one lag before its date (nearest within
    the tolerance) and before its anchor's date; the predictor starts as last + (year-ago target - year-ago anchor)."""
    from geowm.model.vit import last_seen, last_seen_days, year_ago

    model = make_model(seasonal_anchor=True, seasonal_lag_days=100.0, seasonal_tol_days=10.0)
    batch = make_batch(B=2, T=4)
    batch["days"] = torch.tensor([[0.0, 30.0, 100.0, 120.0], [0.0, 60.0, 100.0, 125.0]])
    with torch.no_grad():
        grid, token_valid, positions = model.tokens(batch["pixels"], batch["valid"], batch["days"], batch["doy"])
        ctx = model.encoder(batch["pixels"], batch["valid"], positions, token_valid)
        S = grid.h * grid.w
        dense = torch.zeros(2, grid.n, model.cfg.dim).scatter(1, ctx.index[..., None].expand_as(ctx.x), ctx.x)
        patch = torch.arange(S)[None].expand(2, -1)
        # target day 135: a year ago = day 35 -> slot 1 of sample 0 (day 30, within 10 d); none for sample 1 (day 60)
        at, ok = year_ago(ctx, grid, torch.full((2, S), 135.0), patch, 100.0, 10.0)
        assert ok[0].all() and not ok[1].any()
        torch.testing.assert_close(at[0], dense[0, S: 2 * S])
        days_after = last_seen_days(ctx, grid)[:, grid.t * S:]
        assert (days_after == batch["days"][:, -1:]).all()  # the anchor is the last slot, dated as it
        # day 130 at sample 0: year-ago of the target (day 30, slot 1) and of the anchor (day 120 -> 20: slot 0 at 0 is
        # 20 d away, outside the tolerance) -> no change term; day 110: year-ago target 10 -> slot 0 (0, within 10 d)
        pred = model.predict(batch, torch.tensor([[130.0], [130.0]]), batch["doy"][:, -1:])
        anchor, _ = last_seen(ctx, grid)
        ln = lambda z: torch.nn.functional.layer_norm(z, (model.cfg.dim,))  # noqa: E731
        copy = ln(anchor[:, grid.t * S:])
        cos = torch.nn.functional.cosine_similarity(pred.reshape(2, S, -1), copy, dim=-1)
        assert cos.min() > 0.9  # no seasonal change term without both year-ago latents
        batch["days"][0] = torch.tensor([0.0, 20.0, 100.0, 120.0])  # now the anchor's year-ago (day 20) exists
        grid, token_valid, positions = model.tokens(batch["pixels"], batch["valid"], batch["days"], batch["doy"])
        ctx = model.encoder(batch["pixels"], batch["valid"], positions, token_valid)
        dense = torch.zeros(2, grid.n, model.cfg.dim).scatter(1, ctx.index[..., None].expand_as(ctx.x), ctx.x)
        pred = model.predict(batch, torch.tensor([[100.0], [130.0]]), batch["doy"][:, -1:])[0, 0].reshape(S, -1)
        expect = ln(ln(dense[0, 3 * S:]) + ln(dense[0, :S]) - ln(dense[0, S: 2 * S]))  # last + (day 0 - day 20)
        assert torch.nn.functional.cosine_similarity(pred, expect, dim=-1).min() > 0.9
    assert not hasattr(make_model(seasonal_anchor=False).predictor, "season_out")
