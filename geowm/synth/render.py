"""Surface reflectance of one acquisition date: phenology + disturbances + snow, as ``(4, H, W)``."""

from __future__ import annotations

import numpy as np

from .events import Event, apply_cover, apply_reflectance
from .fields import smooth_field, stream
from .landscape import BARE, FOREST, SNOW, URBAN, WATER, Landscape
from .phenology import Phenology


class SurfaceRenderer:
    """Renders the cloud-free surface of the region on any day (days since 1970-01-01).

    Holds flat ``(H*W,)`` index arrays per class and the endmember difference ``veg - soil``
    ``(4, H*W)`` so that one date costs a few vectorised passes over the image.
    """

    def __init__(self, land: Landscape, pheno: Phenology, events: list[Event], seed: int) -> None:
        self.land, self.pheno, self.events = land, pheno, events
        size = land.grid.size
        self.shape = (size, size)
        lc = land.landcover.ravel()
        self.ag_idx = np.flatnonzero(land.parcel.ravel() >= 0)
        self.ag_parcel = land.parcel.ravel()[self.ag_idx]
        self.forest_idx = np.flatnonzero(lc == FOREST)
        self.forest_decid = land.decid.ravel()[self.forest_idx]
        self.urban_idx = np.flatnonzero(lc == URBAN)
        self.urban_cover = land.cover.ravel()[self.urban_idx]
        self.bare_idx = np.flatnonzero(lc == BARE)
        self.water0 = lc == WATER
        self.soil = land.soil.reshape(4, -1)
        self.veg = land.veg.reshape(4, -1)
        self.diff = self.veg - self.soil
        self.scale = land.fc_scale.ravel()
        self.open_land = (lc != FOREST) & (lc != WATER)
        self.snow_field = smooth_field(stream(seed, "landscape", 5), self.shape, 15.0).ravel()

    def cover(self, day: int) -> np.ndarray:
        """Green-vegetation cover fraction, float32 flat ``(H*W,)``, before disturbances."""
        fc = np.zeros(self.shape[0] * self.shape[1], np.float32)
        leaf = self.pheno.leaf(day)
        if self.ag_idx.size:
            fc[self.ag_idx] = self.pheno.parcel_cover(day)[self.ag_parcel]
        d = self.forest_decid
        fc[self.forest_idx] = 0.9 * (1.0 - d) + d * (0.12 + 0.83 * leaf) * (1.0 - 0.05 * self.pheno.stress_at(day))
        fc[self.urban_idx] = self.urban_cover * (0.6 + 0.4 * leaf)
        fc[self.bare_idx] = 0.02
        fc *= self.scale
        return fc

    def surface(self, day: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Surface reflectance of ``day``.

        Returns:
            ``(refl, water, snow)``: float32 ``(4, H, W)`` reflectance in [0, 1], bool ``(H, W)``
            open-water mask and bool ``(H, W)`` snow mask.
        """
        fc = self.cover(day)
        base_fc = fc.copy()
        apply_cover(self.events, day, fc)
        np.clip(fc, 0.0, 1.0, out=fc)
        refl = self.soil + fc[None] * self.diff
        water = self.water0.copy()
        apply_reflectance(self.events, day, self.pheno.leaf(day), base_fc, self.soil, self.veg, refl, water)
        swe = self.pheno.snow_at(day)
        snow = np.zeros_like(water)
        if swe > 3.0:
            share = min(1.0, swe / 20.0)
            snow = self.open_land & ~water & (self.snow_field < np.quantile(self.snow_field, share))
            refl[:, snow] = 0.85 * SNOW[:, None] + 0.15 * refl[:, snow]
        n = self.shape
        return refl.reshape(4, *n), water.reshape(n), snow.reshape(n)
