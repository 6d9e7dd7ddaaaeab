"""STAC catalog of geowm sources, cubes, forecasts and alerts (pystac)."""
