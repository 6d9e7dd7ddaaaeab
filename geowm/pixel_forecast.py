"""Forecasts of the pixel-space generative baseline, through the same interface and store as the JEPA's.

``geowm.forecast.forecast(cube, run)`` calls :func:`forecast_tile` when ``run`` is a pixel-baseline run
(``model.kind == "pixel"``, :mod:`geowm.model.pixel`): the same region blocks, context dates, ensemble
members (random context subsets), lead times and output layout (:func:`geowm.forecast._dataset`) as the
JEPA, so :mod:`geowm.evaluate` and the forecast store treat both alike. The bands come out of the model
directly (no probe); NDVI is computed from the forecast red and NIR bands; the ``embedding`` variable holds
the predictor's vectors at the forecast dates (L2-normalised ensemble mean, like the JEPA's latents).
"""

from __future__ import annotations

import numpy as np

from geowm.forecast import QUANTILES, _members, blocks, model_inputs, read_block


def forecast_tile(wm, sub, init_t, vt, members, decode, seed, batch_size, nd_rn, outs, ty, tx) -> None:
    """Fill ``outs`` (bands, NDVI, embedding, spread, context counts; see ``geowm.forecast``) for one
    in-memory tile ``sub`` at offset (``ty``, ``tx``) px; ``decode`` is ignored (pixels are forecast as is)."""
    out_bands, out_ndvi, out_lat, out_spread, out_nctx = outs
    p, K = wm.cfg.patch, len(vt)
    mean, std = wm.mean[:, None, None], wm.std[:, None, None]
    todo = [b for b in blocks(sub, wm, init_t, vt.max()) if len(b.t_index) >= 2]  # the JEPA's context rule
    jobs: dict[int, list[tuple[int, int, np.ndarray]]] = {}  # context length -> (block, member, dates)
    for i, b in enumerate(todo):
        rng = np.random.default_rng([seed, ty + b.y0, tx + b.x0])
        for m, keep in enumerate(_members(len(b.t_index), members, rng)):
            jobs.setdefault(len(keep), []).append((i, m, keep))
    data = {i: read_block(sub, wm, b) for i, b in enumerate(todo)}
    pix_out: dict[tuple[int, int], np.ndarray] = {}
    vec_out: dict[tuple[int, int], np.ndarray] = {}
    for _, group in sorted(jobs.items()):
        for g0 in range(0, len(group), batch_size):
            chunk = group[g0: g0 + batch_size]
            refl = np.stack([data[i][0][keep] for i, _, keep in chunk])
            valid = np.stack([data[i][1][keep] for i, _, keep in chunk])
            tt = np.stack([data[i][2][keep] for i, _, keep in chunk])
            batch, tdays, tdoy = model_inputs(wm, refl, valid, tt, np.broadcast_to(vt, (len(chunk), K)))
            pix, vec = wm.model.predict(batch, tdays, tdoy)  # (B, K, C, h, w) normalised; (B, K, hp, wp, D)
            pix, vec = pix.float().cpu().numpy(), vec.float().cpu().numpy()
            for j, (i, m, _) in enumerate(chunk):
                pix_out[(i, m)] = pix[j] * std + mean  # physical band values
                vec_out[(i, m)] = vec[j]
    for i, b in enumerate(todo):
        z = np.stack([vec_out[(i, m)] for m in range(members)])  # (M, K, hp, wp, D)
        _, _, hp, wp, _ = z.shape
        py0, px0 = (ty + b.y0) // p, (tx + b.x0) // p
        unit = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-6)
        avg = unit.mean(axis=0)
        out_lat[:, py0: py0 + hp, px0: px0 + wp] = avg / np.maximum(np.linalg.norm(avg, axis=-1, keepdims=True), 1e-6)
        out_spread[:, py0: py0 + hp, px0: px0 + wp] = unit.std(axis=0).mean(axis=-1)
        out_nctx[py0: py0 + hp, px0: px0 + wp] = len(b.t_index)
        pix = np.stack([pix_out[(i, m)] for m in range(members)])  # (M, K, C, h, w)
        ys, xs = slice(ty + b.y0, ty + b.y0 + b.h), slice(tx + b.x0, tx + b.x0 + b.w)
        out_bands[:, :, :, ys, xs] = np.moveaxis(np.quantile(pix, QUANTILES, axis=0), 0, 2).transpose(1, 0, 2, 3, 4)
        if nd_rn is not None:
            red, nir = pix[:, :, nd_rn[0]], pix[:, :, nd_rn[1]]
            nd = np.clip((nir - red) / np.maximum(nir + red, 1e-6), -1, 1)  # (M, K, h, w)
            out_ndvi[:, :, ys, xs] = np.moveaxis(np.quantile(nd, QUANTILES, axis=0), 0, 1)
