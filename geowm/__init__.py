"""geowm: Earth-observation forecasting with a spatiotemporal JEPA world model.

Public entry points for scientists (xarray in, xarray out)::

    import geowm
    cube = geowm.open_cube("demo/cube")      # lazy xarray.Dataset (time, band, y, x)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("geowm")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

from geowm.api import decode, forecast, open_alerts, open_cube, open_forecasts, open_scores, similar  # noqa: E402
from geowm.inference import WorldModel, load_model  # noqa: E402

__all__ = ["open_cube", "open_forecasts", "open_alerts", "open_scores", "load_model", "forecast", "similar", "decode",
           "WorldModel", "__version__"]
