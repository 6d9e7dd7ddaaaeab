"""The scientists' API: labelled arrays in, labelled arrays out (re-exported from ``geowm``).

    import geowm
    cube = geowm.open_cube("demo/cube")                    # xarray.Dataset (time, band, y, x)
    wm = geowm.load_model("demo/runs/tiny")                # encode / predict / decode
    lat = wm.encode(cube.isel(time=slice(0, 8), y=slice(0, 64), x=slice(0, 64)))   # (time, py, px, latent)
    fc = geowm.forecast(cube, wm, bbox=(x0, y0, x1, y1), init="2022-07-01", leads=[10, 20])
    fcs = geowm.open_forecasts("demo/forecasts")           # the forecast store, lazily
    alerts = geowm.open_alerts("demo/alerts")              # GeoDataFrame, EPSG:4326
    scores = geowm.open_scores("demo/alerts")              # anomaly scores (time, y, x) on the patch grid
    hits = geowm.similar(lat.isel(time=-1, py=3, px=4), k=5, among=lat)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from geowm.alerts import open_alerts
from geowm.anomaly import open_scores
from geowm.cube.store import open_cube
from geowm.forecast import forecast
from geowm.forecast_store import open_forecasts
from geowm.inference import WorldModel, load_model

__all__ = ["open_cube", "open_forecasts", "open_alerts", "open_scores", "load_model", "forecast", "similar", "decode"]


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def similar(query: xr.DataArray | np.ndarray, k: int = 10, among: xr.DataArray | None = None,
            exclude_self: bool = True) -> pd.DataFrame:
    """The ``k`` latents in ``among`` nearest to ``query`` by cosine similarity, across places and dates.

    Args:
        query: one latent (``latent`` dim only, e.g. ``lat.isel(time=0, py=3, px=4)``) or a 1-D array.
        among: latents to search, with a ``latent`` dim and any others (``time``/``init_time``,
            ``lead_time``, ``py``, ``px``), e.g. ``wm.encode(...)`` or ``open_forecasts(...).embedding``.
            NaN latents (cloudy patches) are skipped.
        exclude_self: drop exact matches of the query itself (similarity 1 at the query's own coords).

    Returns:
        DataFrame sorted by ``score`` (cosine similarity, -1..1), one row per hit, with a column per
        non-latent coordinate of ``among`` (dates and patch-centre ``py``/``px`` in the cube CRS).
    """
    if among is None:
        raise ValueError("similar: pass the latents to search as among= (e.g. wm.encode(cube.isel(...)))")
    if "latent" not in among.dims:
        raise ValueError(f"similar: among has no 'latent' dim (dims {among.dims})")
    q = np.asarray(query.values if isinstance(query, xr.DataArray) else query, dtype=np.float64).ravel()
    if q.shape[0] != among.sizes["latent"] or not np.isfinite(q).all():
        raise ValueError(f"similar: the query must be one finite latent of {among.sizes['latent']} values")
    flat = among.stack(hit=[d for d in among.dims if d != "latent"]).transpose("hit", "latent")
    z = flat.values.astype(np.float64)
    ok = np.isfinite(z).all(axis=1)
    scores = np.full(len(z), -np.inf)
    scores[ok] = _unit(z[ok]) @ _unit(q)
    if exclude_self and isinstance(query, xr.DataArray):
        same = np.ones(len(z), bool)
        for name, coord in query.coords.items():
            if name in flat["hit"].coords and coord.ndim == 0:
                same &= flat["hit"][name].values == coord.values
        if same.any() and any(n in flat["hit"].coords for n in query.coords):
            scores[same] = -np.inf
    top = np.argsort(-scores, kind="stable")[: min(k, int(np.isfinite(scores).sum()))]
    index = flat["hit"].to_index()[top]
    frame = index.to_frame(index=False) if isinstance(index, pd.MultiIndex) else pd.DataFrame({"hit": index})
    frame.insert(0, "score", scores[top])
    return frame.reset_index(drop=True)


def decode(latents: xr.DataArray, model: WorldModel | str) -> xr.Dataset:
    """Band values (time, band, y, x) and NDVI (time, y, x) from latents (time, py, px, latent)."""
    wm = model if isinstance(model, WorldModel) else load_model(model)
    return wm.decode(latents)
