"""Vector cloud masks: Sentinel-2's GML masks (a granule's ``QI_DATA/MSK_CLOUDS_B00.gml``, the L1C cloud mask
before processing baseline 04.00, which replaced it by the raster ``MSK_CLASSI_B00.jp2``), read as polygons and
burnt into flag bits on the cube grid: bit 0 opaque cloud, bit 1 cirrus, the bits of ``MSK_CLASSI``.

A GML mask says where the flags are, not what was observed: every pixel it does not flag is clear, and the bands'
own footprint decides coverage.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

import numpy as np

from geowm.cube.grid import CubeGrid, Tile
from geowm.scene import SourceError, local_file, read_bytes

# eop:maskType of a Sentinel-2 MSK_CLOUDS feature -> its flag bit
GML_MASK_TYPES = {"OPAQUE": 0, "CIRRUS": 1}


@dataclass(frozen=True)
class VectorMask:
    """The polygons of one mask file: ``shapes`` (GeoJSON polygon in ``crs``, flag bit); ``crs`` None when the
    file has no polygon (and need not state one)."""

    path: str
    crs: str | None
    shapes: tuple[tuple[dict, int], ...]


def _local(tag: object) -> str:
    return str(tag).rsplit("}", 1)[-1]


def _epsg_of(srs: str) -> str:
    """A GML ``srsName`` as a CRS rasterio reads: ``urn:ogc:def:crs:EPSG:8.7:32756``, ``urn:ogc:def:crs:EPSG::32632``,
    ``EPSG:32632``, ``http://www.opengis.net/gml/srs/epsg.xml#32632``; other forms are passed on as given."""
    if "EPSG" in srs.upper() and (m := re.search(r"(\d+)\s*$", srs)):
        return f"EPSG:{m.group(1)}"
    return srs


def _ring(el, path: str, dim: int) -> list[tuple[float, float]]:
    """The (x, y) vertices of a ``gml:LinearRing`` (its ``gml:posList``; ``srsDimension`` values per vertex)."""
    pos = next((e for e in el.iter() if _local(e.tag) == "posList"), None)
    if pos is None or not (pos.text or "").strip():
        raise SourceError(f"{path}: a polygon ring without coordinates (gml:posList)")
    dim = int(pos.get("srsDimension") or dim)
    try:
        values = [float(v) for v in pos.text.split()]
    except ValueError:
        raise SourceError(f"{path}: a gml:posList value is not a number ({pos.text.strip()[:60]!r})") from None
    if dim < 2 or len(values) % dim or len(values) // dim < 4 or not np.isfinite(values).all():
        raise SourceError(f"{path}: a polygon ring of {len(values)} values is not a closed ring of at least 4 "
                          f"{dim}-dimensional vertices")
    return [(values[i], values[i + 1]) for i in range(0, len(values), dim)]


def _polygons(feature, path: str, dim: int) -> list[dict]:
    out = []
    for poly in (e for e in feature.iter() if _local(e.tag) == "Polygon"):
        rings = {"exterior": [], "interior": []}
        for part in poly:
            if _local(part.tag) in rings:
                rings[_local(part.tag)].append(_ring(part, path, dim))
        if len(rings["exterior"]) != 1:
            raise SourceError(f"{path}: a gml:Polygon with {len(rings['exterior'])} exterior rings (1 expected)")
        out.append({"type": "Polygon", "coordinates": rings["exterior"] + rings["interior"]})
    return out


@functools.lru_cache(maxsize=64)
def _parse(path: str, stamp: tuple[int, int]) -> VectorMask:
    from xml.etree import ElementTree

    import rasterio.crs

    try:
        root = ElementTree.fromstring(read_bytes(path))
    except ElementTree.ParseError as exc:
        raise SourceError(f"{path}: not a readable GML mask ({exc})") from None
    except (OSError, KeyError) as exc:
        raise SourceError(f"{path}: cannot read the mask file ({exc})") from None
    if _local(root.tag) != "Mask":
        raise SourceError(f"{path}: not a Sentinel-2 GML mask (root element {_local(root.tag)!r}, eop:Mask expected)")
    srs = next((e.get("srsName") for e in root.iter() if e.get("srsName")), None)
    corner = next((e.text for e in root.iter() if _local(e.tag) == "lowerCorner" and e.text), None)
    dim = len(corner.split()) if corner else 2
    shapes = []
    for feature in (e for e in root.iter() if _local(e.tag) == "MaskFeature"):
        kind = next(((e.text or "").strip().upper() for e in feature.iter() if _local(e.tag) == "maskType"), "")
        if kind not in GML_MASK_TYPES:
            raise SourceError(f"{path}: mask feature of type {kind or 'none'!r}; known types: "
                              f"{', '.join(GML_MASK_TYPES)}")
        shapes += [(poly, GML_MASK_TYPES[kind]) for poly in _polygons(feature, path, dim)]
    crs = None
    if shapes:
        if srs is None:
            raise SourceError(f"{path}: mask polygons without a coordinate reference system (no srsName)")
        try:
            crs = rasterio.crs.CRS.from_user_input(_epsg_of(srs)).to_string()
        except rasterio.errors.CRSError:
            raise SourceError(f"{path}: unknown coordinate reference system {srs!r}") from None
    return VectorMask(path, crs, tuple(shapes))


def _stamp(path: str) -> tuple[int, int]:
    """(size, mtime) of the file that holds ``path`` (a zip archive's for a member): a changed file is read again."""
    try:
        st = os.stat(local_file(path))
    except OSError as exc:
        raise SourceError(f"{path}: cannot read the mask file ({exc})") from None
    return st.st_size, st.st_mtime_ns


def read_vector_mask(path: str) -> VectorMask:
    """The polygons of a GML mask file (local, or inside a zip as a ``/vsizip/`` path), read once per version of
    the file; raises :class:`~geowm.scene.SourceError` naming the file when it cannot be read."""
    return _parse(path, _stamp(path))


@functools.lru_cache(maxsize=64)
def _in_crs(path: str, stamp: tuple[int, int], crs: str) -> tuple[tuple[dict, int], ...]:
    """The polygons of a mask file in ``crs`` (reprojected once per file and CRS, not per tile)."""
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom

    mask = _parse(path, stamp)
    if not mask.shapes or CRS.from_user_input(mask.crs) == CRS.from_user_input(crs):
        return mask.shapes
    return tuple((transform_geom(mask.crs, crs, geom), bit) for geom, bit in mask.shapes)


def burn_vector_mask(path: str, grid: CubeGrid, tile: Tile) -> np.ndarray:
    """The flag bits of mask file ``path`` on ``tile`` of ``grid`` (int64, y, x): a pixel whose centre lies in a
    polygon of type k has bit k set (``GML_MASK_TYPES``); 0 elsewhere."""
    from rasterio.features import rasterize

    out = np.zeros(tile.shape, np.int64)
    shapes = _in_crs(path, _stamp(path), grid.crs)
    if not shapes:
        return out
    transform = grid.window_transform(tile.y, tile.x)
    for bit in sorted({b for _, b in shapes}):
        burnt = rasterize([g for g, b in shapes if b == bit], out_shape=tile.shape, transform=transform, fill=0,
                          default_value=1, dtype="uint8")
        out |= burnt.astype(np.int64) << bit
    return out
