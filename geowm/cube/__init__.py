"""The Zarr data cube: one Icechunk-versioned Zarr v3 store per region, dims (time, band, y, x)."""

from geowm.cube.grid import CubeGrid, Tile
from geowm.cube.ingest import IngestError, IngestOptions, IngestReport, ingest
from geowm.cube.store import CubeError, cube_checksum, open_cube

__all__ = ["CubeGrid", "Tile", "IngestError", "IngestOptions", "IngestReport", "ingest", "CubeError",
           "cube_checksum", "open_cube"]
