"""Probes on frozen latents: a decoder to band values / NDVI and a linear land-cover classifier.

Probes make latents readable in physical units and measure representation quality. Both are fitted
after training on tokens of training windows and scored on tokens of held-out windows:

* **decoder**: ridge regression from a token's latent (target encoder, layer-normed) to the
  normalised pixel values of its patch (C x p x p) and to its per-pixel NDVI (p x p);
* **land cover**: multinomial logistic regression from the latent to the patch's majority class,
  compared with the same classifier on the raw pixels of the same patch and date (the baseline a
  representation must beat); with a per-year map (:class:`geowm.cube.reader.Labels`), the class of the
  year of the window's last date, since rotated fields grow another crop each year;
* **change decoder** (for forecasts): ridge regression from a patch's forecast latent and its last
  observed latent to the change of its pixels and NDVI between the last clear context date and the
  target date, fitted on the predictor's own outputs (context = the first dates of a training window,
  target = its last date, so gaps span one to several revisits). A forecast is then the last clear
  observation plus this change; scored against "no change" (persistence) on held-out windows;
* **year-ago change decoder** (runs with a seasonal memory): the same regression from the forecast latent and
  the patch's latent observed about a year (``seasonal_lag_days``) before the target, to the change since that
  date. A forecast is then also the year-ago observation plus this change, and the two are blended with a
  weight of the last-observation forecast that falls with its age (``w = c0 + c1 gap / 30``, least squares on
  training windows); kept where the blend beats the last-observation forecast on held-out windows.

Saved in the run directory as ``probes.safetensors`` (weights) and ``probes.json`` (scores, band and
class names).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from geowm.atomic import atomic_write, atomic_write_text
from geowm.bands import ndvi_bands
from geowm.cube.reader import Labels
from geowm.data import CubeWindows
from geowm.model import JEPA


@torch.no_grad()
def token_features(model: JEPA, ds: CubeWindows, windows: list[int], device: torch.device,
                   landcover: Labels | None = None, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Per valid token of the given windows: latent (n, dim), raw patch pixels (n, C p p, normalised),
    NDVI per pixel (n, p p) if red/NIR are known, land-cover majority class (n,) if given (of the map that holds
    at the window's last date, the date its forecast targets; -1 where no map covers it), window id (n,) and
    place id (n,): the same for every frame of one patch of one window."""
    cfg = model.cfg
    p = cfg.patch
    mean, std = ds.mean[:, 0, 0], ds.std[:, 0, 0]
    rn = ndvi_bands(ds.reader.bands, ds.reader.common_names)
    out: dict[str, list] = {"latent": [], "pixels": [], "ndvi": [], "landcover": [], "window": [], "place": []}
    for b0 in range(0, len(windows), batch_size):
        idx = windows[b0: b0 + batch_size]
        items = [ds[i] for i in idx]
        batch = {k: torch.stack([it[k] for it in items]).to(device) for k in ("pixels", "valid", "days", "doy")}
        lat, ok, _ = model.encode(batch["pixels"], batch["valid"], batch["days"], batch["doy"])
        B, T, C, H, W = batch["pixels"].shape
        Tt, Hp, Wp = lat.shape[1:4]
        pix = batch["pixels"].reshape(B, T, C, Hp, p, Wp, p).permute(0, 1, 3, 5, 2, 4, 6)  # B T Hp Wp C p p
        pv = batch["valid"].reshape(B, T, Hp, p, Wp, p).permute(0, 1, 2, 4, 3, 5)  # B T Hp Wp p p
        if cfg.t_frames > 1:  # a tubelet's first frame stands for it
            pix, pv = pix[:, :: cfg.t_frames], pv[:, :: cfg.t_frames]
        keep = ok & (pv.float().mean(dim=(-1, -2)) > 0.99)  # fully clear patches only, for clean targets
        out["latent"].append(lat[keep].float().cpu().numpy())
        px = pix[keep].float().cpu().numpy()  # n C p p (normalised)
        out["pixels"].append(px.reshape(len(px), -1))
        if rn is not None:
            phys = px * std[None, :, None, None] + mean[None, :, None, None]
            red, nir = phys[:, rn[0]], phys[:, rn[1]]
            out["ndvi"].append(((nir - red) / np.maximum(nir + red, 1e-6)).reshape(len(px), -1))
        kept = keep.cpu().numpy()
        wid = np.asarray(idx)[:, None, None, None]
        out["window"].append(np.broadcast_to(wid, kept.shape)[kept])
        out["place"].append(np.broadcast_to(wid * (Hp * Wp) + np.arange(Hp * Wp).reshape(Hp, Wp), kept.shape)[kept])
        if landcover is not None:
            # the land cover of the window's last date: a place's class in the year it is seen (crops rotate)
            band = landcover.band_of(ds.reader.times[[int(it["t_index"].max()) for it in items]])
            yx = np.stack([it["yx"].numpy() for it in items])
            for j in range(B):
                y0, x0 = yx[j]
                maj = np.full((Hp, Wp), -1, np.int64)
                if band[j] >= 0:
                    lc = landcover.maps[band[j], y0: y0 + H, x0: x0 + W]
                    lc = lc.reshape(Hp, p, Wp, p).transpose(0, 2, 1, 3).reshape(Hp, Wp, -1)
                    maj = np.array([[np.bincount(c).argmax() for c in row] for row in lc])
                out["landcover"].append(np.broadcast_to(maj, kept[j].shape)[kept[j]])
    return {k: np.concatenate(v) for k, v in out.items() if v}


def year_ago_slot(days: torch.Tensor, ok: torch.Tensor, target_days: torch.Tensor, lag: float,
                  tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch, the observed tubelet dated nearest ``target_days - lag``: token days (B, Tt) or (B, Tt, Hp, Wp),
    ``ok`` (B, Tt, Hp, Wp), ``target_days`` (B,) -> slot (B, Hp, Wp) and whether it lies within ``tol`` days."""
    if days.dim() == 2:
        days = days[:, :, None, None].expand_as(ok)
    gap = (days - (target_days[:, None, None, None] - lag)).abs()
    gap = torch.where(ok, gap, torch.full((), float("inf"), device=gap.device))
    best, slot = gap.min(dim=1)
    return slot, best <= tol


def _gather_slot(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """x (B, T, Hp, Wp, ...) at the per-patch index ``slot`` (B, Hp, Wp) along T -> (B, Hp, Wp, ...)."""
    idx = slot[:, None].reshape(*slot.shape[:1], 1, *slot.shape[1:], *([1] * (x.dim() - 4)))
    return torch.gather(x, 1, idx.expand(-1, 1, *x.shape[2:]))[:, 0]


@torch.no_grad()
def change_features(model: JEPA, ds: CubeWindows, windows: list[int], device: torch.device, batch_size: int = 8,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Per target patch: ``feature`` (n, 2 dim) = [forecast latent, last observed context latent] and the change
    from the patch's last observed context date to the target date of its normalised pixels (n, C p p) and
    NDVI (n, p p, if red/NIR are known). Context: the first 2..T-1 tubelets of a window (drawn per batch);
    target: its last tubelet. Only patches fully clear on both dates count.

    With a seasonal memory, also the **year-ago** anchor of the same targets: ``season_feature`` = [forecast
    latent, the context latent of the patch dated nearest a year (``seasonal_lag_days``) before the target,
    within ``seasonal_tol_days``], the change from that date (``season_pixels``, ``season_ndvi``), and
    ``pair`` (n,) marking the targets that have both anchors (``season_rows`` maps ``pair`` targets to their row
    in the season arrays), so the two forecasts can be weighed against each other."""
    p, tf = model.cfg.patch, model.cfg.t_frames
    mean, std = ds.mean[:, 0, 0], ds.std[:, 0, 0]
    rn = ndvi_bands(ds.reader.bands, ds.reader.common_names)
    rng = np.random.default_rng(seed)
    keys = ("feature", "pixels", "ndvi", "gap_days", "season_feature", "season_pixels", "season_ndvi", "pair",
            "season_rows")
    out: dict[str, list] = {k: [] for k in keys}
    n_season = 0

    def nd(x):
        phys = x * std[None, :, None, None] + mean[None, :, None, None]
        red, nir = phys[:, rn[0]], phys[:, rn[1]]
        return ((nir - red) / np.maximum(nir + red, 1e-6)).reshape(len(x), p * p)

    for b0 in range(0, len(windows), batch_size):
        items = [ds[i] for i in windows[b0: b0 + batch_size]]
        batch = {k: torch.stack([it[k] for it in items]).to(device) for k in ("pixels", "valid", "days", "doy")}
        B, T, C, H, W = batch["pixels"].shape
        Tt, Hp, Wp = T // tf, H // p, W // p
        s0 = -(-ds.cfg.seasonal_frames // tf)  # the seasonal memory's slots come first: always context
        n_ctx = int(rng.integers(min(s0 + 2, Tt - 1), Tt)) * tf
        ctx = {k: v[:, :n_ctx] for k, v in batch.items()}
        lat, ok, _ = model.encode(ctx["pixels"], ctx["valid"], ctx["days"], ctx["doy"])
        tgt = (Tt - 1) * tf
        pred = model.predict(ctx, batch["days"][:, tgt: tgt + 1], batch["doy"][:, tgt: tgt + 1])[:, 0].float()
        slot = torch.where(ok, torch.arange(ok.shape[1], device=ok.device)[None, :, None, None], -1).amax(1)
        has = slot >= 0
        idx = slot.clamp(min=0)
        last = _gather_slot(lat.float(), idx)
        pix = batch["pixels"].reshape(B, T, C, Hp, p, Wp, p).permute(0, 1, 3, 5, 2, 4, 6)  # B T Hp Wp C p p
        pv = batch["valid"].reshape(B, T, Hp, p, Wp, p).permute(0, 1, 2, 4, 3, 5).float().mean(dim=(-1, -2))
        frame = idx * tf  # the anchor: first frame of the last observed tubelet, per patch
        anc_pix = _gather_slot(pix, frame)
        anc_ok = _gather_slot(pv, frame) > 0.99
        keep = has & anc_ok & (pv[:, tgt] > 0.99)
        anc_day = torch.gather(batch["days"], 1, frame.reshape(B, -1)).reshape(B, Hp, Wp)
        gap = batch["days"][:, tgt, None, None] - anc_day
        out["feature"].append(torch.cat([pred, last], -1)[keep].cpu().numpy())
        a, b = anc_pix[keep].cpu().numpy(), pix[:, tgt][keep].cpu().numpy()  # n C p p (normalised)
        out["pixels"].append((b - a).reshape(len(a), C * p * p))
        out["gap_days"].append(gap[keep].cpu().numpy())
        if rn is not None:
            out["ndvi"].append(nd(b) - nd(a))
        if model.cfg.seasonal_anchor:  # the year-ago anchor of the same targets
            lag, tol, _ = model.cfg.seasonal
            first_frame = ctx["days"][:, ::tf][:, :lat.shape[1]]
            ys, y_ok = year_ago_slot(first_frame, ok & (pv[:, :n_ctx:tf][:, :lat.shape[1]] > 0.99),
                                     batch["days"][:, tgt], lag, tol)
            s_keep = y_ok & (pv[:, tgt] > 0.99)
            s_pix = _gather_slot(pix, ys * tf)[s_keep].cpu().numpy()
            b_s = pix[:, tgt][s_keep].cpu().numpy()
            out["season_feature"].append(torch.cat([pred, _gather_slot(lat.float(), ys)], -1)[s_keep].cpu().numpy())
            out["season_pixels"].append((b_s - s_pix).reshape(len(s_pix), C * p * p))
            if rn is not None:
                out["season_ndvi"].append(nd(b_s) - nd(s_pix))
            rows = torch.full(s_keep.shape, -1, dtype=torch.long, device=s_keep.device)
            rows[s_keep] = torch.arange(int(s_keep.sum()), device=s_keep.device) + n_season
            n_season += int(s_keep.sum())
            out["pair"].append((s_keep[keep]).cpu().numpy())
            out["season_rows"].append(rows[keep & s_keep].cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


def blend_weights(e_last: np.ndarray, e_season: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """Weight ``w(gap) = c0 + c1 gap / 30`` of the last-observation forecast against the year-ago one (``1 - w``)
    that minimises the squared error of ``w e_last + (1 - w) e_season`` (errors (n, k), gap (n,) days): least
    squares for (c0, c1)."""
    d = (e_last - e_season).astype(np.float64)
    g = np.broadcast_to((gap / 30.0)[:, None], d.shape)
    x = np.stack([d.ravel(), (d * g).ravel()], 1)
    c, *_ = np.linalg.lstsq(x, -e_season.astype(np.float64).ravel(), rcond=None)
    return c.astype(np.float32)


def blend(w: np.ndarray, gap) -> np.ndarray:
    """The weight of the last-observation forecast at ``gap`` days (see :func:`blend_weights`), in [0, 1]."""
    return np.clip(w[0] + w[1] * np.asarray(gap, np.float32) / 30.0, 0.0, 1.0)


def ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge regression with intercept: returns (W (d, k), b (k,))."""
    xm, ym = x.mean(0), y.mean(0)
    xc = (x - xm).astype(np.float64)
    w = np.linalg.solve(xc.T @ xc + alpha * len(x) * np.eye(x.shape[1]), xc.T @ (y - ym))
    return w.astype(np.float32), (ym - xm @ w).astype(np.float32)


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    return float(1.0 - ((y - pred) ** 2).sum() / max(((y - y.mean(0)) ** 2).sum(), 1e-12))


def _labelled(tok: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tokens whose land-cover class is known (``tok["landcover"] >= 0``)."""
    keep = tok["landcover"] >= 0
    return {k: v[keep] for k, v in tok.items()}


def place_features(x: np.ndarray, tok: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Token features ``x`` (n, d) pooled per place (``tok["place"]``): the mean and the standard deviation over
    its clear frames (m, 2 d), and the place's land-cover class (m,)."""
    from scipy import sparse

    _, inv = np.unique(tok["place"], return_inverse=True)
    member = sparse.csr_matrix((np.ones(len(inv)), (inv, np.arange(len(inv)))))  # places x tokens
    count = np.asarray(member.sum(axis=1))
    x = x.astype(np.float64)
    mean = member @ x / count
    std = np.sqrt(np.maximum(member @ (x ** 2) / count - mean ** 2, 0.0))
    labels = np.zeros(len(count), np.int64)
    labels[inv] = tok["landcover"]
    return np.hstack([mean, std]).astype(np.float32), labels


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, steps: int = 300,
                 weight_decay: float = 1e-4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial logistic regression on standardised features (LBFGS). Returns W, b, mu, sigma."""
    g = torch.Generator().manual_seed(seed)
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy(((x - mu) / sigma).astype(np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    lin = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.normal_(lin.weight, std=0.01, generator=g)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), yt) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin.weight.detach().numpy(), lin.bias.detach().numpy(), mu.astype(np.float32), sigma.astype(np.float32)


def predict_logistic(x, w, b, mu, sigma) -> np.ndarray:
    return (((x - mu) / sigma) @ w.T + b).argmax(1)


def _fit_season(trc: dict, tec: dict, key: str, w: np.ndarray, b: np.ndarray, scores: dict, tensors: dict) -> None:
    """The year-ago change decoder of ``key`` and its blend with the last-observation change the forecasts use
    (``feature @ w + b``: the change decoder, or the difference of the decoded latents where that decoder is not
    kept), kept only where the blend beats the last-observation forecast alone on held-out windows (targets with
    both anchors)."""
    sk = f"season_{key}"
    if sk not in trc or len(trc["season_feature"]) <= 2 * trc["season_feature"].shape[1]:
        return
    if not tec.get("pair", np.zeros(0, bool)).any() or not trc["pair"].any():
        return
    ws, bs = ridge(trc["season_feature"], trc[sk], alpha=0.1)

    def errors(d):  # forecast errors of both anchors on the targets that have both
        pair = d["pair"]
        e_last = d["feature"][pair] @ w + b - d[key][pair]
        e_season = d["season_feature"][d["season_rows"]] @ ws + bs - d[sk][d["season_rows"]]
        return e_last, e_season, d["gap_days"][pair]

    bw = blend_weights(*errors(trc))
    e_last, e_season, gap = errors(tec)
    a = blend(bw, gap)[:, None]
    rmse = lambda e: float(np.sqrt((e ** 2).mean()))  # noqa: E731
    scores[f"season_{key}_rmse_last"], scores[f"season_{key}_rmse_year_ago"] = rmse(e_last), rmse(e_season)
    scores[f"season_{key}_rmse_blend"] = rmse(a * e_last + (1 - a) * e_season)
    scores[f"season_{key}_blend"] = [float(v) for v in bw]
    scores[f"season_{key}_n_test"] = int(len(gap))
    scores[f"season_{key}_used"] = scores[f"season_{key}_rmse_blend"] < scores[f"season_{key}_rmse_last"]
    if scores[f"season_{key}_used"]:
        tensors.update({f"season_{key}_w": torch.from_numpy(ws), f"season_{key}_b": torch.from_numpy(bs),
                        f"season_{key}_blend": torch.from_numpy(bw)})


def fit_probes(model: JEPA, train_ds: CubeWindows, test_ds: CubeWindows, run: Path, device: torch.device,
               landcover: Labels | None = None, class_names: dict[int, str] | None = None,
               n_windows: int = 64, seed: int = 0) -> dict:
    """Fit the probes on ``train_ds`` windows, score them on ``test_ds`` windows, save them in ``run``."""
    rng = np.random.default_rng(seed)
    pick = lambda ds: sorted(rng.choice(len(ds), min(n_windows, len(ds)), replace=False).tolist())  # noqa: E731
    tr = token_features(model, train_ds, pick(train_ds), device, landcover)
    te = token_features(model, test_ds, pick(test_ds), device, landcover)
    tensors: dict[str, torch.Tensor] = {}
    scores: dict = {"n_train_tokens": int(len(tr["latent"])), "n_test_tokens": int(len(te["latent"]))}
    w, b = ridge(tr["latent"], tr["pixels"])
    tensors.update(decoder_pixels_w=torch.from_numpy(w), decoder_pixels_b=torch.from_numpy(b))
    scores["decoder_pixels_r2"] = r2(te["pixels"], te["latent"] @ w + b)
    if "ndvi" in tr:
        w, b = ridge(tr["latent"], tr["ndvi"])
        tensors.update(decoder_ndvi_w=torch.from_numpy(w), decoder_ndvi_b=torch.from_numpy(b))
        pred = te["latent"] @ w + b
        scores["decoder_ndvi_r2"] = r2(te["ndvi"], pred)
        scores["decoder_ndvi_rmse"] = float(np.sqrt(((te["ndvi"] - pred) ** 2).mean()))
    pick4 = lambda ds: sorted(rng.choice(len(ds), min(4 * n_windows, len(ds)), replace=False).tolist())  # noqa: E731
    trc = change_features(model, train_ds, pick4(train_ds), device, seed=seed)
    tec = change_features(model, test_ds, pick4(test_ds), device, seed=seed + 1)
    scores["n_change_train_tokens"], scores["n_change_test_tokens"] = len(trc["feature"]), len(tec["feature"])
    if len(trc["feature"]) > 2 * trc["feature"].shape[1] and len(tec["feature"]):
        for key in ("pixels", "ndvi"):
            if key not in trc:
                continue
            w, b = ridge(trc["feature"], trc[key], alpha=0.1)
            pred = tec["feature"] @ w + b
            rmse, rmse0 = float(np.sqrt(((tec[key] - pred) ** 2).mean())), float(np.sqrt((tec[key] ** 2).mean()))
            scores[f"change_{key}_rmse"], scores[f"change_{key}_rmse_no_change"] = rmse, rmse0  # no change: persistence
            scores[f"change_{key}_used"] = rmse < rmse0  # kept only where it beats persistence on held-out windows
            if rmse < rmse0:
                tensors.update({f"change_{key}_w": torch.from_numpy(w), f"change_{key}_b": torch.from_numpy(b)})
            elif f"decoder_{key}_w" in tensors:  # forecasts then use the difference of the decoded latents
                dec = tensors[f"decoder_{key}_w"].numpy()
                w, b = np.concatenate([dec, -dec]), np.zeros(dec.shape[1], np.float32)
            else:
                continue
            _fit_season(trc, tec, key, w, b, scores, tensors)
        scores["change_gap_days_median"] = float(np.median(tec["gap_days"]))
    if landcover is not None and "landcover" in tr:  # tokens at dates no land-cover map covers are left out
        tr, te = _labelled(tr), _labelled(te)  # (the probes above are fitted; only land cover follows)
    if landcover is not None and "landcover" in tr and len(tr["landcover"]) and len(te["landcover"]):
        n_classes = int(max(tr["landcover"].max(), te["landcover"].max())) + 1
        for name, key in (("latent", "latent"), ("raw_pixels", "pixels")):
            wc, bc, mu, sigma = fit_logistic(tr[key], tr["landcover"], n_classes, seed=seed)
            acc = float((predict_logistic(te[key], wc, bc, mu, sigma) == te["landcover"]).mean())
            scores[f"landcover_accuracy_{name}"] = acc
            if name == "latent":
                tensors.update(landcover_w=torch.from_numpy(wc), landcover_b=torch.from_numpy(bc),
                               landcover_mu=torch.from_numpy(mu), landcover_sigma=torch.from_numpy(sigma))
        majority = np.bincount(tr["landcover"]).argmax()
        scores["landcover_accuracy_majority_class"] = float((te["landcover"] == majority).mean())
        # per place: land cover is a property of a place over a season, not of one date (cropland and grassland
        # differ in phenology), so the probe also classifies each patch of a window from the mean and spread
        # of its clear frames, the same pooling for latents and raw pixels
        for name, key in (("latent", "latent"), ("raw_pixels", "pixels")):
            (xtr, ytr), (xte, yte) = place_features(tr[key], tr), place_features(te[key], te)
            wc, bc, mu, sigma = fit_logistic(xtr, ytr, n_classes, seed=seed)
            scores[f"landcover_place_accuracy_{name}"] = float((predict_logistic(xte, wc, bc, mu, sigma) == yte).mean())
        scores["landcover_place_accuracy_majority_class"] = float((yte == np.bincount(ytr).argmax()).mean())
        scores["n_train_places"], scores["n_test_places"] = int(len(ytr)), int(len(yte))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(run / "probes.safetensors", lambda p: save_file(tensors, str(p)))
    meta = {"scores": scores, "bands": train_ds.reader.bands, "ndvi_bands": ndvi_bands(train_ds.reader.bands,
                                                                                 train_ds.reader.common_names),
            "patch": model.cfg.patch, "classes": class_names or {}}
    atomic_write_text(run / "probes.json", json.dumps(meta, indent=1))
    return scores


def load_probes(run: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(run / "probes.safetensors")), json.loads((run / "probes.json").read_text())
