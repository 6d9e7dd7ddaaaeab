"""Acquisition schedule, cloud climatology and per-acquisition cloud / shadow / cirrus rendering.

Cloud fractions follow the daily cloudiness index of the weather (rain, season, persistence):
the cloudiest third of acquisitions is fully overcast, the rest partly cloudy or clear. Clouds are
thresholded Gaussian random fields (coherent blobs with soft edges); shadows are the cloud field
shifted away from the sun; cirrus is a streaky thin layer that mostly brightens the blue band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from .fields import smooth_field, stream

REVISIT_DAYS = 5
MISSING_SHARE = 0.07
FULL_SHARE = 1.0 / 3.0
CLOUD_SPECTRUM = np.array([1.0, 0.98, 0.96, 0.94], np.float32)
CIRRUS_SPECTRUM = np.array([1.0, 0.8, 0.65, 0.5], np.float32)
SHADOW_MAX_PX = 120

# Sentinel-2 L2A scene classification codes.
SCL_NODATA, SCL_SHADOW, SCL_VEG, SCL_NOT_VEG, SCL_WATER, SCL_UNCLASSIFIED = 0, 3, 4, 5, 6, 7
SCL_CLOUD_MED, SCL_CLOUD_HIGH, SCL_CIRRUS, SCL_SNOW = 8, 9, 10, 11


def make_schedule(seed: int, start: datetime, end: datetime) -> list[datetime]:
    """Acquisition times every 5 days from ``start`` to ``end``, ~7 % of slots missing, ~10:30 UTC."""
    rng = stream(seed, "schedule")
    n = (end - start).days // REVISIT_DAYS + 1
    keep = np.ones(n, bool)
    n_miss = int(round(MISSING_SHARE * n)) if n >= 10 else 0
    if n_miss:
        keep[rng.choice(np.arange(1, n - 1), size=n_miss, replace=False)] = False
    jitter = rng.integers(-300, 301, n)
    base = datetime(start.year, start.month, start.day, 10, 30, 0)
    return [base + timedelta(days=REVISIT_DAYS * i, seconds=int(jitter[i])) for i in range(n) if keep[i]]


def plan_cloud_fractions(latent: np.ndarray, forced_clear: list[int], seed: int) -> np.ndarray:
    """Cloud fraction of each acquisition from the cloudiness index at its date.

    Args:
        latent: float32 ``(n_acq,)`` cloudiness index (higher = cloudier).
        forced_clear: acquisitions that must be nearly clear (cloud fraction < 0.15).
        seed: random seed.

    Returns:
        float32 ``(n_acq,)`` cloud fractions; 1.0 marks a fully overcast acquisition.
    """
    rng = stream(seed, "clouds", 10**6)
    n = latent.size
    frac = np.zeros(n, np.float32)
    free = np.array([i for i in range(n) if i not in set(forced_clear)], np.int64)
    order = free[np.argsort(-latent[free], kind="stable")]
    n_full = int(round(FULL_SHARE * n))
    frac[order[:n_full]] = 1.0
    rest = order[n_full:]
    if rest.size:
        rank = 1.0 - np.arange(rest.size) / max(rest.size - 1, 1)  # 1 = cloudiest of the rest
        partly = rank > 0.35
        spread = (np.clip(rank - 0.35, 0, None) / 0.65) ** 1.3
        frac[rest] = np.where(partly, 0.06 + 0.70 * spread + rng.uniform(-0.03, 0.03, rest.size),
                              rng.uniform(0.0, 0.025, rest.size))
    for i in forced_clear:
        frac[i] = rng.uniform(0.0, 0.12)
    return np.clip(frac, 0.0, 1.0)


@dataclass
class CloudLayer:
    """Per-acquisition atmosphere: float32 ``(H, W)`` fields.

    ``opacity`` of clouds (0..1), ``shadow`` strength (0..1), ``cirrus`` added reflectance, and
    ``brightness`` of the cloud tops (reflectance, ~0.3-0.6).
    """

    opacity: np.ndarray
    shadow: np.ndarray
    cirrus: np.ndarray
    brightness: np.ndarray
    haze: float


def sun_elevation(when: datetime, lat: float = 48.7) -> float:
    """Approximate solar elevation (degrees) near 10:30 UTC in central Europe."""
    doy = when.timetuple().tm_yday
    decl = 23.44 * math.sin(2 * math.pi * (doy - 81) / 365.0)
    return max(12.0, 90.0 - lat + decl - 6.0)


def render_clouds(size: int, fraction: float, when: datetime, seed: int, index: int,
                  cirrus_allowed: bool = True) -> CloudLayer:
    """Draw the cloud, shadow and (if allowed, 30 % of dates) cirrus layers of one acquisition."""
    rng = stream(seed, "clouds", index)
    shape = (size, size)
    elev = math.radians(sun_elevation(when))
    height = rng.uniform(400.0, 1500.0)
    dist = min(height / math.tan(elev) / 10.0, SHADOW_MAX_PX)
    az = math.radians(rng.uniform(150.0, 170.0))  # sun azimuth; shadows fall opposite (north-west)
    pad_y, pad_x = abs(int(round(dist * math.cos(az)))), abs(int(round(dist * math.sin(az))))
    big = (size + pad_y, size + pad_x)
    scale = rng.uniform(12.0, 50.0)
    f = 0.85 * smooth_field(rng, big, scale) + 0.35 * smooth_field(rng, big, scale / 5.0)
    bright = np.clip(rng.uniform(0.35, 0.55) + 0.08 * f, 0.25, 0.7).astype(np.float32)
    if fraction >= 1.0:
        opac_big = np.clip(0.7 + 0.35 * f, 0.35, 1.0)
    elif fraction <= 0.0:
        opac_big = np.zeros(big, np.float32)
    else:
        core = f[:size, :size]
        thr = np.quantile(core, 1.0 - fraction)
        opac_big = np.clip((f - thr) / 0.6 + 0.15, 0.0, 1.0) * (f > thr - 0.09)
    opac_big = opac_big.astype(np.float32)
    # Image pixel (r, c) is padded pixel (r, c); the cloud casting a shadow on it lies pad_y rows
    # south and pad_x columns east, i.e. at padded (r + pad_y, c + pad_x) (possibly outside the image).
    opacity = opac_big[:size, :size]
    shadow = opac_big[pad_y:, pad_x:] * (fraction < 1.0)
    cirrus = np.zeros(shape, np.float32)
    if rng.random() < 0.3 and fraction < 1.0 and cirrus_allowed:
        g = smooth_field(rng, shape, rng.uniform(35.0, 90.0), anisotropy=rng.uniform(1.5, 3.0))
        cover = rng.uniform(0.1, 0.5)
        thr = np.quantile(g, 1.0 - cover)
        cirrus = (np.clip((g - thr) / 1.2, 0.0, 1.0) * rng.uniform(0.04, 0.1)).astype(np.float32)
    haze = float(rng.uniform(0.0, 0.012))
    return CloudLayer(opacity, shadow.astype(np.float32), cirrus, bright[:size, :size], haze)


def composite(surface: np.ndarray, layer: CloudLayer) -> np.ndarray:
    """Observed reflectance ``(4, H, W)`` float32: shadowed surface, haze, cirrus, then clouds on top."""
    shaded = surface * (1.0 - 0.6 * layer.shadow)[None]
    shaded += (layer.haze * CIRRUS_SPECTRUM)[:, None, None]
    shaded += CIRRUS_SPECTRUM[:, None, None] * layer.cirrus[None]
    a = layer.opacity[None]
    return shaded * (1.0 - a) + a * (CLOUD_SPECTRUM[:, None, None] * layer.brightness[None])


def classify(surface: np.ndarray, water: np.ndarray, snow: np.ndarray, layer: CloudLayer) -> np.ndarray:
    """Scene classification (uint8 ``(H, W)``, Sentinel-2 L2A codes) consistent with what is drawn.

    Cloud edges with opacity < 0.15 are left unflagged (small, realistic mask errors), those in
    [0.08, 0.15) are marked unclassified (7).
    """
    red, nir = surface[2], surface[3]
    ndvi = (nir - red) / np.maximum(nir + red, 1e-6)
    scl = np.where(ndvi > 0.4, SCL_VEG, SCL_NOT_VEG).astype(np.uint8)
    scl[water | ((ndvi < 0.0) & (nir < 0.06))] = SCL_WATER
    scl[snow] = SCL_SNOW
    op = layer.opacity
    scl[(op >= 0.08) & (op < 0.15)] = SCL_UNCLASSIFIED
    scl[(layer.shadow > 0.3) & (op < 0.15)] = SCL_SHADOW
    scl[(layer.cirrus > 0.025) & (op < 0.15)] = SCL_CIRRUS
    scl[op >= 0.15] = SCL_CLOUD_MED
    scl[op >= 0.6] = SCL_CLOUD_HIGH
    return scl
