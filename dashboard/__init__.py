"""The analysts' dashboard: a Streamlit app over a geowm workdir (``geowm dashboard --workdir DIR``).

A workdir is what ``make demo`` and the flows write: ``cube/`` (the Zarr cube), ``forecasts/`` (the
forecast store), ``alerts/`` (``alerts.parquet``/``alerts.geojson`` and ``scores.zarr``). The app reads
them only through geowm's public API (``open_cube``, ``open_forecasts``, ``open_alerts``,
``open_scores``).

- :mod:`dashboard.data`: pure functions (no Streamlit): locate and open a workdir, filter alerts,
  NDVI / forecast / score series of a region, map images and chips.
- :mod:`dashboard.render`: colour ramps, PNG data URLs, the deck.gl map and the plotly chart.
- :mod:`dashboard.cache`: the Streamlit caches around :mod:`dashboard.data`.
- :mod:`dashboard.views`: one function per part of the page; :mod:`dashboard.app`: the page layout.
- :mod:`dashboard.launch`: the ``geowm dashboard`` launcher (``streamlit run dashboard/app.py``).
"""

from pathlib import Path

APP_PATH = Path(__file__).resolve().parent / "app.py"

__all__ = ["APP_PATH"]
