"""Static landscape: the grid, the land-cover map, agricultural parcels and per-pixel spectra.

All arrays are ``(y, x)`` = ``(size, size)`` pixels of 10 m on a UTM grid; reflectances are
surface reflectance in [0, 1] for the bands B02, B03, B04, B08 (blue, green, red, NIR).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from affine import Affine
from scipy import ndimage

from .fields import quantile_mask, smooth_field, stream

BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B08")
COMMON_NAMES: tuple[str, ...] = ("blue", "green", "red", "nir")
CLASSES: dict[int, str] = {1: "forest", 2: "crop_winter", 3: "crop_summer", 4: "grassland",
                           5: "urban", 6: "water", 7: "bare"}
FOREST, CROP_WINTER, CROP_SUMMER, GRASSLAND, URBAN, WATER, BARE = 1, 2, 3, 4, 5, 6, 7

# Endmember spectra, surface reflectance (B02, B03, B04, B08).
SOIL = np.array([0.070, 0.100, 0.140, 0.200], np.float32)
VEG_CROP = np.array([0.030, 0.070, 0.030, 0.480], np.float32)
VEG_GRASS = np.array([0.035, 0.075, 0.040, 0.400], np.float32)
VEG_DECID = np.array([0.030, 0.060, 0.030, 0.420], np.float32)
VEG_CONIF = np.array([0.020, 0.040, 0.020, 0.280], np.float32)
FOREST_FLOOR = np.array([0.040, 0.060, 0.070, 0.160], np.float32)
URBAN_SURF = np.array([0.100, 0.110, 0.120, 0.150], np.float32)
WATER_SURF = np.array([0.035, 0.045, 0.025, 0.012], np.float32)
BARE_SURF = np.array([0.160, 0.200, 0.240, 0.290], np.float32)
SNOW = np.array([0.850, 0.840, 0.820, 0.720], np.float32)
CHAR = np.array([0.035, 0.040, 0.050, 0.070], np.float32)
TURBID_WATER = np.array([0.060, 0.080, 0.070, 0.035], np.float32)
SLASH = np.array([0.060, 0.080, 0.100, 0.190], np.float32)
WET_SOIL = np.array([0.050, 0.070, 0.090, 0.140], np.float32)


@dataclass(frozen=True)
class Grid:
    """A north-up square grid of ``size`` x ``size`` pixels of ``res`` metres in ``crs``."""

    size: int
    x0: float = 500_000.0
    y0: float = 5_400_000.0
    res: float = 10.0
    crs: str = "EPSG:32633"

    @property
    def transform(self) -> Affine:
        """Affine pixel -> map transform (top-left origin)."""
        return Affine(self.res, 0.0, self.x0, 0.0, -self.res, self.y0)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` in metres."""
        ext = self.size * self.res
        return (self.x0, self.y0 - ext, self.x0 + ext, self.y0)

    @property
    def area_km2(self) -> float:
        return (self.size * self.res / 1000.0) ** 2


@dataclass
class Landscape:
    """Static description of the region.

    Attributes:
        grid: the pixel grid.
        landcover: uint8 ``(H, W)`` class codes (see :data:`CLASSES`), crops as in the record's first year.
        parcel: int32 ``(H, W)`` agricultural parcel index, -1 outside crop/grassland.
        parcel_class: uint8 ``(n_parcels,)`` land-cover code of each parcel in the record's first year (crops
            rotate: :attr:`geowm.synth.phenology.Phenology.klass` has every year's).
        parcel_size: int64 ``(n_parcels,)`` pixel count of each parcel.
        decid: float32 ``(H, W)`` deciduous share of forest pixels (0 evergreen .. 1 deciduous).
        cover: float32 ``(H, W)`` static vegetation cover of urban/bare/water pixels (0..1).
        fc_scale: float32 ``(H, W)`` multiplicative within-field cover texture (field edges < 1).
        soil: float32 ``(4, H, W)`` background (non-vegetation) spectrum.
        veg: float32 ``(4, H, W)`` green-vegetation spectrum.
        dist_water: float32 ``(H, W)`` distance to the nearest water pixel, pixels.
        dry_soil: float32 ``(H, W)`` standardised field, high = low water-holding capacity.
    """

    grid: Grid
    landcover: np.ndarray
    parcel: np.ndarray
    parcel_class: np.ndarray
    parcel_size: np.ndarray
    decid: np.ndarray
    cover: np.ndarray
    fc_scale: np.ndarray
    soil: np.ndarray
    veg: np.ndarray
    dist_water: np.ndarray
    dry_soil: np.ndarray

    @property
    def n_parcels(self) -> int:
        return int(self.parcel_class.size)


def _hash01(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic uniform [0, 1) values from integer pairs (splitmix64-style mixing)."""
    with np.errstate(over="ignore"):
        x = (a.astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ \
            (b.astype(np.int64).view(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)) ^ np.uint64(salt)
        x ^= x >> np.uint64(31)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(29)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(32)
    return ((x >> np.uint64(11)).astype(np.float64) / float(1 << 53)).astype(np.float32)


def _voronoi_fields(rng: np.random.Generator, size: int) -> np.ndarray:
    """Elongated Voronoi cells from a jittered, rotated grid of seeds: int64 ``(H, W)`` cell keys."""
    angle = rng.uniform(-0.6, 0.6)
    scale = rng.uniform(0.8, 1.3)
    sx, sy = 26.0 * scale, 15.0 * scale
    salt = int(rng.integers(0, 2**62))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (np.cos(angle) * xx + np.sin(angle) * yy) / sx
    v = (-np.sin(angle) * xx + np.cos(angle) * yy) / sy
    del xx, yy
    ci, cj = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    best = np.full(u.shape, np.inf, np.float32)
    key = np.zeros(u.shape, np.int64)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            gi, gj = ci + di, cj + dj
            su = gi + 0.1 + 0.8 * _hash01(gi, gj, salt)
            sv = gj + 0.1 + 0.8 * _hash01(gj, gi, salt + 1)
            d2 = (u - su) ** 2 + (v - sv) ** 2
            closer = d2 < best
            best = np.where(closer, d2, best)
            key = np.where(closer, gi * 1_000_003 + gj, key)
    return key


def make_landscape(size: int, seed: int) -> Landscape:
    """Build the static landscape of a region.

    Forest and water are smooth coherent patches (thresholded Gaussian random fields), urban areas
    are clustered villages, the rest is cut into agricultural parcels of a few hectares assigned to
    winter crop, summer crop or grassland.

    Args:
        size: grid side in pixels.
        seed: random seed.

    Returns:
        the :class:`Landscape`.
    """
    grid = Grid(size)
    rng = stream(seed, "landscape")
    shape = (size, size)
    forest_f = 0.7 * smooth_field(rng, shape, 90.0) + 0.5 * smooth_field(rng, shape, 22.0)
    water_f = smooth_field(rng, shape, 40.0) + 0.3 * smooth_field(rng, shape, 8.0)
    urban_f = smooth_field(rng, shape, 60.0) + 0.7 * smooth_field(rng, shape, 9.0)
    bare_f = smooth_field(rng, shape, 12.0) + 0.8 * smooth_field(rng, shape, 80.0)

    lc = np.zeros(shape, np.uint8)
    water = quantile_mask(water_f, rng.uniform(0.04, 0.06))
    lc[water] = WATER
    forest = quantile_mask(forest_f, rng.uniform(0.24, 0.32), ~water)
    lc[forest] = FOREST
    free = lc == 0
    lc[quantile_mask(urban_f, rng.uniform(0.05, 0.08) * (size * size) / max(free.sum(), 1), free)] = URBAN
    free = lc == 0
    lc[quantile_mask(bare_f, 0.015 * (size * size) / max(free.sum(), 1), free)] = BARE
    ag = lc == 0

    # Agricultural parcels.
    prng = stream(seed, "parcels")
    cells = _voronoi_fields(prng, size)
    _, inv = np.unique(cells[ag], return_inverse=True)
    parcel = np.full(shape, -1, np.int32)
    parcel[ag] = inv.astype(np.int32)
    n = int(inv.max()) + 1 if inv.size else 0
    parcel_size = np.bincount(inv, minlength=n).astype(np.int64) if n else np.zeros(0, np.int64)
    u = prng.random(n)
    parcel_class = np.where(u < 0.36, CROP_WINTER, np.where(u < 0.66, CROP_SUMMER, GRASSLAND)).astype(np.uint8)
    lc[ag] = parcel_class[parcel[ag]]

    # Field boundaries: pixels whose right or lower neighbour is another parcel.
    edge = np.zeros(shape, bool)
    edge[:, :-1] |= parcel[:, :-1] != parcel[:, 1:]
    edge[:-1, :] |= parcel[:-1, :] != parcel[1:, :]
    edge &= ag
    fc_scale = (1.0 + 0.05 * smooth_field(rng, shape, 2.0)).astype(np.float32)
    fc_scale[edge] *= 0.7

    decid = (1.0 / (1.0 + np.exp(-1.8 * smooth_field(rng, shape, 25.0)))).astype(np.float32)
    cover = np.zeros(shape, np.float32)
    green = np.clip(0.12 + 0.08 * smooth_field(rng, shape, 4.0), 0.0, 0.35)
    cover[lc == URBAN] = green[lc == URBAN]
    cover[lc == BARE] = 0.02

    # Spectra: soil brightness varies per parcel and slightly per pixel.
    bright = np.ones(shape, np.float32)
    if n:
        pb = prng.uniform(0.8, 1.25, n).astype(np.float32)
        bright[ag] = pb[parcel[ag]]
    bright *= (1.0 + 0.04 * smooth_field(rng, shape, 3.0)).astype(np.float32)
    soil = np.empty((4, size, size), np.float32)
    veg = np.empty((4, size, size), np.float32)
    for b in range(4):
        s = SOIL[b] * bright
        s[lc == FOREST] = FOREST_FLOOR[b]
        s[lc == URBAN] = URBAN_SURF[b] * bright[lc == URBAN]
        s[lc == WATER] = WATER_SURF[b]
        s[lc == BARE] = BARE_SURF[b] * bright[lc == BARE]
        soil[b] = s
        v = np.full(shape, VEG_CROP[b], np.float32)
        v[lc == GRASSLAND] = VEG_GRASS[b]
        fmask = lc == FOREST
        v[fmask] = decid[fmask] * VEG_DECID[b] + (1.0 - decid[fmask]) * VEG_CONIF[b]
        veg[b] = v
    # Water colour varies a little (turbidity), smoothly.
    turb = np.clip(0.5 + 0.3 * smooth_field(rng, shape, 20.0), 0.0, 1.0)
    for b in range(4):
        soil[b][water] = WATER_SURF[b] + turb[water] * (TURBID_WATER[b] - WATER_SURF[b]) * 0.4

    dist_water = ndimage.distance_transform_edt(~water).astype(np.float32) if water.any() \
        else np.full(shape, np.float32(1e6))
    dry_soil = smooth_field(rng, shape, max(size / 5.0, 20.0))
    return Landscape(grid, lc, parcel, parcel_class, parcel_size, decid, cover, fc_scale, soil, veg,
                     dist_water, dry_soil)


def crop_map(land: Landscape, parcel_class: np.ndarray) -> np.ndarray:
    """The land-cover map with every agricultural parcel set to ``parcel_class`` (its crop in some year):
    uint8 ``(H, W)``."""
    lc = land.landcover.copy()
    ag = land.parcel >= 0
    lc[ag] = parcel_class[land.parcel[ag]]
    return lc
