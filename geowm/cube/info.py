"""Summaries of a cube for ``geowm info``: dims, dates, bands, grid, tiles, clear-sky fractions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geowm.cube.store import open_cube, read_state


def summarize(path: str | Path) -> dict:
    """A JSON-ready summary of the cube at ``path``.

    ``clear_fraction_by_date``: share of pixels with ``valid`` True per date (0..1);
    ``band_fill_fraction``: share of (date, pixel) cells that hold fill per band (0..1).
    """
    state = read_state(path)
    ds = open_cube(path)
    g = state.grid
    clear = ds["valid"].mean(dim=("y", "x")).compute().values if ds.sizes["time"] else np.array([])
    band_fill = ds["reflectance"].isnull().mean(dim=("time", "y", "x")).compute().values
    times = ds["time"].values
    gaps = np.diff(times.astype("datetime64[D]").astype(int)) if len(times) > 1 else np.array([])
    rows, cols = g.n_tiles
    return {
        "cube": str(path),
        "snapshot": state.snapshot,
        "dims": {k: int(v) for k, v in ds.sizes.items()},
        "time": {
            "count": int(len(times)),
            "first": str(times[0].astype("datetime64[s]")) if len(times) else None,
            "last": str(times[-1].astype("datetime64[s]")) if len(times) else None,
            "median_gap_days": float(np.median(gaps)) if len(gaps) else None,
        },
        "bands": state.bands,
        "common_names": state.common_names,  # STAC eo common names ("" unknown), None: not recorded
        "dtype": state.encoding.dtype,
        "crs": ds.rio.crs.to_string() if ds.rio.crs else g.crs,
        "resolution": g.resolution,
        "bounds": list(g.bounds),
        "shape_px": [g.height, g.width],
        "tiles": {"size_px": g.tile_size, "rows": rows, "cols": cols, "count": rows * cols},
        "chunks": {k: int(v[0]) for k, v in ds["reflectance"].chunksizes.items()},
        "sources": len(state.sources),
        "mask_rules": _mask_rules(state.sources),
        "clear_fraction": {
            "mean": float(clear.mean()) if len(clear) else None,
            "min": float(clear.min()) if len(clear) else None,
            "max": float(clear.max()) if len(clear) else None,
            "fully_cloudy_dates": int((clear < 0.05).sum()),
            "clear_dates": int((clear > 0.95).sum()),
        },
        "clear_fraction_by_date": {str(t.astype("datetime64[D]")): round(float(c), 4) for t, c in zip(times, clear,
                                                                                                       strict=True)},
        "band_fill_fraction": {b: round(float(f), 4) for b, f in zip(state.bands, band_fill, strict=True)},
    }


def _mask_rules(sources: list[dict]) -> list[dict]:
    """The mask rules the cube's scenes were ingested with (:func:`geowm.cube.ingest.mask_rule`), each with the
    number of scenes read by it; scenes without a mask band count under ``band`` None, scenes ingested before
    the rule was recorded under ``band`` "unrecorded"."""
    counts: dict[str, tuple[dict, int]] = {}
    for rec in sources:
        rule = rec["mask"] if "mask" in rec else {"band": "unrecorded"}
        rule = rule or {"band": None}
        key = repr(sorted(rule.items()))
        counts[key] = (rule, counts.get(key, (rule, 0))[1] + 1)
    return [{**rule, "scenes": n} for rule, n in counts.values()]
