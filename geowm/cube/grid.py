"""The cube grid: CRS, affine transform, size, and the fixed tile grid of named ``row_col`` tiles."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from affine import Affine


@dataclass(frozen=True)
class Tile:
    """A named block of the grid: ``name`` is ``"{row}_{col}"``; slices index the cube's y and x."""

    row: int
    col: int
    y: slice
    x: slice

    @property
    def name(self) -> str:
        return f"{self.row}_{self.col}"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y.stop - self.y.start, self.x.stop - self.x.start)


@dataclass(frozen=True)
class CubeGrid:
    """A north-up raster grid. ``transform`` maps (col, row) to the top-left corner of a cell, in CRS units.

    ``tile_size`` (px) is the spatial chunk and the unit of training windows, forecasts and flows.
    """

    crs: str
    transform: Affine
    width: int
    height: int
    tile_size: int = 256

    def __post_init__(self) -> None:
        if self.transform.b != 0 or self.transform.d != 0 or self.transform.e >= 0:
            raise ValueError(f"cube grid must be north-up without rotation, got transform {tuple(self.transform)}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"cube grid must have a positive size, got {self.width} x {self.height} px")
        if self.tile_size < 16:
            raise ValueError(f"tile size must be >= 16 px, got {self.tile_size}")

    @property
    def resolution(self) -> float:
        return float(self.transform.a)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in CRS units."""
        t = self.transform
        return (t.c, t.f + t.e * self.height, t.c + t.a * self.width, t.f)

    @property
    def x(self) -> np.ndarray:
        """Cell-centre x coordinates, shape (width,)."""
        return self.transform.c + (np.arange(self.width) + 0.5) * self.transform.a

    @property
    def y(self) -> np.ndarray:
        """Cell-centre y coordinates (decreasing), shape (height,)."""
        return self.transform.f + (np.arange(self.height) + 0.5) * self.transform.e

    @property
    def n_tiles(self) -> tuple[int, int]:
        return (math.ceil(self.height / self.tile_size), math.ceil(self.width / self.tile_size))

    def tiles(self) -> Iterator[Tile]:
        """Every tile, row-major; edge tiles are clipped to the grid (each pixel in exactly one tile)."""
        rows, cols = self.n_tiles
        s = self.tile_size
        for r in range(rows):
            for c in range(cols):
                yield Tile(r, c, slice(r * s, min((r + 1) * s, self.height)),
                           slice(c * s, min((c + 1) * s, self.width)))

    def tile(self, name: str) -> Tile:
        """The tile called ``row_col``."""
        try:
            r, c = (int(v) for v in name.split("_"))
        except ValueError:
            raise ValueError(f"tile name must be 'row_col', got {name!r}") from None
        rows, cols = self.n_tiles
        if not (0 <= r < rows and 0 <= c < cols):
            raise ValueError(f"tile {name!r} outside the {rows} x {cols} tile grid")
        s = self.tile_size
        return Tile(r, c, slice(r * s, min((r + 1) * s, self.height)), slice(c * s, min((c + 1) * s, self.width)))

    def window_transform(self, rows: slice, cols: slice) -> Affine:
        return self.transform @ Affine.translation(cols.start, rows.start)

    def aligned_offset(self, crs: str, transform: Affine) -> tuple[int, int] | None:
        """(row, col) of a source's top-left pixel in this grid if the source shares CRS, resolution and
        pixel alignment (so it is read without resampling), else None."""
        from rasterio.crs import CRS

        if CRS.from_user_input(crs) != CRS.from_user_input(self.crs):
            return None
        t, g = transform, self.transform
        if t.b or t.d or not math.isclose(t.a, g.a, rel_tol=1e-9) or not math.isclose(t.e, g.e, rel_tol=1e-9):
            return None
        col = (t.c - g.c) / g.a
        row = (t.f - g.f) / g.e
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            return None
        return int(round(row)), int(round(col))

    @classmethod
    def covering(cls, crs: str, resolution: float, bounds: Sequence[float], anchor: tuple[float, float] = (0.0, 0.0),
                 tile_size: int = 256) -> CubeGrid:
        """The smallest grid of ``resolution`` covering ``bounds`` (left, bottom, right, top), with cell
        edges on ``anchor + k * resolution`` so that sources on the same lattice need no resampling."""
        left, bottom, right, top = bounds
        if not (right > left and top > bottom):
            raise ValueError(f"empty bounds {tuple(bounds)}")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        ax, ay = anchor
        x0 = ax + math.floor((left - ax) / resolution + 1e-9) * resolution
        x1 = ax + math.ceil((right - ax) / resolution - 1e-9) * resolution
        y1 = ay + math.ceil((top - ay) / resolution - 1e-9) * resolution
        y0 = ay + math.floor((bottom - ay) / resolution + 1e-9) * resolution
        width = int(round((x1 - x0) / resolution))
        height = int(round((y1 - y0) / resolution))
        return cls(crs, Affine(resolution, 0.0, x0, 0.0, -resolution, y1), width, height, tile_size)
