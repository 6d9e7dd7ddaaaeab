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

from geowm.forecast import QUANTILES, member_batches, put_latents, tile_jobs


def forecast_tile(wm, sub, init_t, vt, members, decode, seed, batch_size, nd_rn, outs, ty, tx) -> None:
    """Fill ``outs`` (bands, NDVI, embedding, spread, context counts; see ``geowm.forecast``) for one
    in-memory tile ``sub`` at offset (``ty``, ``tx``) px; ``decode`` is ignored (pixels are forecast as is)."""
    out_bands, out_ndvi = outs[:2]
    p = wm.cfg.patch
    mean, std = wm.mean[:, None, None], wm.std[:, None, None]
    todo, data, jobs = tile_jobs(sub, wm, init_t, vt, members, seed)  # the JEPA's context rule
    pix_out: dict[tuple[int, int], np.ndarray] = {}
    vec_out: dict[tuple[int, int], np.ndarray] = {}
    for chunk, batch, tdays, tdoy in member_batches(wm, data, jobs, vt, batch_size):
        pix, vec = wm.model.predict(batch, tdays, tdoy)  # (B, K, C, h, w) normalised; (B, K, hp, wp, D)
        pix, vec = pix.float().cpu().numpy(), vec.float().cpu().numpy()
        for j, (i, m, _) in enumerate(chunk):
            pix_out[(i, m)] = pix[j] * std + mean  # physical band values
            vec_out[(i, m)] = vec[j]
    for i, b in enumerate(todo):
        put_latents(np.stack([vec_out[(i, m)] for m in range(members)]), b, outs, p, ty, tx)
        pix = np.stack([pix_out[(i, m)] for m in range(members)])  # (M, K, C, h, w)
        ys, xs = slice(ty + b.y0, ty + b.y0 + b.h), slice(tx + b.x0, tx + b.x0 + b.w)
        out_bands[:, :, :, ys, xs] = np.moveaxis(np.quantile(pix, QUANTILES, axis=0), 0, 2).transpose(1, 0, 2, 3, 4)
        if nd_rn is not None:
            red, nir = pix[:, :, nd_rn[0]], pix[:, :, nd_rn[1]]
            nd = np.clip((nir - red) / np.maximum(nir + red, 1e-6), -1, 1)  # (M, K, h, w)
            out_ndvi[:, :, ys, xs] = np.moveaxis(np.quantile(nd, QUANTILES, axis=0), 0, 1)
