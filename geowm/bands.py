"""Band-name conventions shared by the probes, baselines and alerts (no heavy imports)."""

from __future__ import annotations

RED_NIR = (("B04", "B08"), ("B4", "B5"), ("red", "nir"), ("RED", "NIR"))  # Sentinel-2, Landsat 8/9, common names


def ndvi_bands(bands: list[str]) -> tuple[int, int] | None:
    """Indexes of the red and near-infrared bands by name (Sentinel-2, Landsat 8/9, common names)."""
    for red, nir in RED_NIR:
        if red in bands and nir in bands:
            return bands.index(red), bands.index(nir)
    return None
