"""Synthetic Earth generator: a Sentinel-2-like image time series with weather and ground truth.

>>> from geowm.synth import generate
>>> summary = generate("region", size=256, start="2021-01-01", end="2021-12-31", seed=3)  # doctest: +SKIP
"""

from .generator import generate, recorded_parameters
from .landscape import BANDS, CLASSES

__all__ = ["generate", "recorded_parameters", "BANDS", "CLASSES"]
