"""geowm: Earth-observation forecasting with a spatiotemporal JEPA world model.

Public entry points for scientists (xarray in, xarray out)::

    import geowm
    cube = geowm.open_cube("demo/cube")      # lazy xarray.Dataset (time, band, y, x)

The entry points (``geowm.api``, ``geowm.inference``) are imported on first use, so processes that
only ingest (``import geowm.cube``: the CLI's ingest, dask workers) do not import torch (~0.2 GB
resident and seconds of start-up each).
"""

import importlib
import importlib.util
import sys
import types
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("geowm")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

_PUBLIC = {"open_cube": "geowm.api", "open_forecasts": "geowm.api", "open_alerts": "geowm.api",
           "open_scores": "geowm.api", "load_model": "geowm.api", "forecast": "geowm.api", "similar": "geowm.api",
           "decode": "geowm.api", "WorldModel": "geowm.inference"}
__all__ = ["open_cube", "open_forecasts", "open_alerts", "open_scores", "load_model", "forecast", "similar", "decode",
           "WorldModel", "__version__"]


def __getattr__(name: str):
    """A public entry point (imported now), or a submodule (``geowm.sources`` after a plain ``import geowm``)."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """``geowm.forecast`` names both a submodule and the API function; the function wins (as it did when this
    package imported it eagerly): the import system's ``setattr(geowm, "forecast", <module>)`` is ignored."""

    @property
    def forecast(self):
        return importlib.import_module("geowm.api").forecast

    @forecast.setter
    def forecast(self, value) -> None:
        pass


sys.modules[__name__].__class__ = _Package
