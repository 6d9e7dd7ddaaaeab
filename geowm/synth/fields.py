"""Random-field helpers shared by the synthetic Earth generator.

Every random draw in :mod:`geowm.synth` comes from :func:`stream`, which derives an independent
``numpy.random.Generator`` from ``(seed, purpose, index)``; the output therefore does not depend
on the order in which the parts are generated (byte-identical pixels for the same seed).
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

# Stable integer tags for the random streams (never Python's salted ``hash``).
STREAMS: dict[str, int] = {
    "landscape": 11,
    "parcels": 12,
    "weather": 21,
    "schedule": 31,
    "clouds": 41,
    "noise": 51,
    "events": 61,
    "crop_failure": 62,
    "phenology": 71,
    "rotation": 72,
}


def stream(seed: int, purpose: str, index: int = 0) -> np.random.Generator:
    """Independent generator for ``purpose`` (a key of :data:`STREAMS`) and an integer ``index``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, STREAMS[purpose], int(index)])


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float,
                 anisotropy: float = 1.0) -> np.ndarray:
    """Gaussian random field with correlation length ``scale_px`` (pixels), standardised.

    White noise is low-pass filtered in the Fourier domain with a Gaussian kernel of standard
    deviation ``scale_px``; the field is generated on a padded grid and cropped so that it does not
    wrap around the edges.

    Args:
        rng: random generator.
        shape: ``(ny, nx)`` output shape in pixels.
        scale_px: correlation length in pixels (> 0).
        anisotropy: ratio of the x to the y correlation length.

    Returns:
        float32 array of ``shape`` with mean 0 and standard deviation 1.
    """
    ny, nx = shape
    pad = int(min(3.0 * scale_px * max(1.0, anisotropy), 2 * max(ny, nx)))
    py, px = sfft.next_fast_len(ny + pad, real=True), sfft.next_fast_len(nx + pad, real=True)
    noise = rng.standard_normal((py, px), dtype=np.float32)
    spec = sfft.rfft2(noise, workers=1)
    ky = np.fft.fftfreq(py).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(px).astype(np.float32)[None, :]
    sy, sx = float(scale_px), float(scale_px) * anisotropy
    kernel = np.exp(-2.0 * np.pi**2 * ((ky * sy) ** 2 + (kx * sx) ** 2)).astype(np.float32)
    field = sfft.irfft2(spec * kernel, s=(py, px), workers=1)[:ny, :nx]
    field = field - field.mean()
    std = float(field.std())
    return (field / (std if std > 0 else 1.0)).astype(np.float32)


def quantile_mask(field: np.ndarray, fraction: float, where: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the ``fraction`` highest values of ``field`` (restricted to ``where``)."""
    vals = field if where is None else field[where]
    if vals.size == 0 or fraction <= 0:
        return np.zeros(field.shape, dtype=bool)
    thr = np.quantile(vals, 1.0 - min(fraction, 1.0))
    mask = field >= thr
    return mask if where is None else mask & where


def logistic(x: np.ndarray | float) -> np.ndarray:
    """Numerically safe logistic function ``1 / (1 + exp(-x))`` in float32."""
    x = np.clip(np.asarray(x, dtype=np.float32), -40.0, 40.0)
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
