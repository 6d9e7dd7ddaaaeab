"""The records scene discovery makes (:class:`Scene`, :class:`BandRef`, :class:`SourceError`) and the paths they
hold: local files, files inside zip archives (GDAL's ``/vsizip/``), variables of NetCDF files (GDAL's
``NETCDF:"<file>":<variable>``) and of Zarr stores (``ZARR:"<store>":/<variable>``), URLs (``https://``,
``s3://``: GDAL's ``/vsicurl/``, ``/vsis3/``), and vector masks. Shared by
discovery (:mod:`geowm.sources`), product conventions (:mod:`geowm.products`), the pixel reader (:mod:`geowm.cube`)
and the catalog; nothing here reads pixels.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf")  # datacubes: a scene per time step (geowm.netcdf)
VECTOR_MASK_SUFFIXES = (".gml",)
# CF units of latitude and longitude coordinates (lower case; NetCDF and Zarr datacubes without a grid mapping)
LAT_UNITS = frozenset({"degrees_north", "degree_north", "degree_n", "degrees_n", "degreen", "degreesn"})
LON_UNITS = frozenset({"degrees_east", "degree_east", "degree_e", "degrees_e", "degreee", "degreese"})
VSIZIP_PATH = re.compile(r"^/vsizip/(/?.+?\.zip)(?:/(.*))?$", re.IGNORECASE)  # /vsizip//abs/a.zip/member
_NETCDF_SUBDATASET = re.compile(r'^NETCDF:"(.+)":([^":]+)$', re.IGNORECASE)  # a variable of a NetCDF file, as GDAL
ZARR_VARIABLE = re.compile(r'^ZARR:"(.+)":/?([^":]+)$', re.IGNORECASE)  # a variable of a Zarr store, as GDAL names it

# How GDAL reads URLs: retry what a busy object store answers (429, 502, 503, 504) with a growing delay, and give up
# on a stalled connection instead of hanging an ingest. HTTP-only settings; the user's own environment wins.
for _key, _value in (("GDAL_HTTP_MAX_RETRY", "5"), ("GDAL_HTTP_RETRY_DELAY", "1"), ("GDAL_HTTP_TIMEOUT", "120"),
                     ("GDAL_HTTP_CONNECTTIMEOUT", "30")):
    os.environ.setdefault(_key, _value)


class SourceError(ValueError):
    """Bad input: the message names the file (or STAC document) and the problem."""


@dataclass(frozen=True)
class BandRef:
    """One band of one file: ``path`` and 1-based ``index`` inside it, under the cube band ``name``; index 0 (masks
    only): every band of the file, a 0/1 flag layer each, read as bit ``k - 1`` of band ``k`` (Sentinel-2's
    ``MSK_CLASSI``), or the flag polygons of a GML mask (``MSK_CLOUDS``, :mod:`geowm.cube.vector_mask`).
    ``scale`` and ``offset`` turn its values into physical ones (reflectance = value * scale + offset) where the
    file's own GeoTIFF scale/offset tags do not: from the STAC item's ``raster:bands``, or the product's
    published convention (Landsat Collection 2 Level-2); None: the file's tags. ``own_scaling``: that scale and
    offset are the scene's own (Landsat Level-1, by its sun elevation), so no integer encoding fits a series of
    such scenes: a new cube stores float32."""

    path: str
    index: int
    name: str
    scale: float | None = None
    offset: float | None = None
    own_scaling: bool = False


@dataclass
class Scene:
    """One acquisition footprint.

    ``datetime`` is timezone-aware UTC. ``bands`` maps band name -> BandRef; ``mask`` is the quality
    band (or None), read either by value (``mask_clear``: the values that mean a clear observation) or bit by
    bit (``mask_bits``: the bits that flag a pixel as not clear, e.g. cloud and shadow of Landsat's QA_PIXEL).
    ``id`` is stable across runs (STAC item id, or the shared file-name stem).
    """

    id: str
    datetime: datetime
    bands: dict[str, BandRef]
    mask: BandRef | None = None
    mask_clear: frozenset[int] = field(default_factory=frozenset)
    mask_bits: frozenset[int] = field(default_factory=frozenset)
    origin: str = ""  # the STAC document or file the scene came from, for messages
    common_names: dict[str, str] = field(default_factory=dict)  # band name -> STAC common name, where known

    @property
    def files(self) -> list[str]:
        refs = list(self.bands.values()) + ([self.mask] if self.mask else [])
        return sorted({r.path for r in refs})


def says_lat_lon(kinds: set[str]) -> bool:
    """Whether the CF ``units`` and ``standard_name`` values (lower case) of a raster's coordinates name latitude
    and longitude: a grid in degrees on WGS 84 (EPSG:4326) when nothing else gives its CRS."""
    return bool(kinds & (LAT_UNITS | {"latitude"}) and kinds & (LON_UNITS | {"longitude"}))


def is_url(source: str | Path) -> bool:
    """Whether ``source`` is a URL (``https://``, ``s3://``...), not a local path (``file://`` is local)."""
    text = str(source)
    return "://" in text and not text.startswith("file://")


OPEN_THREADS = 8  # reads of URLs at once (item documents, file headers, a block's dates): their round trips overlap


def io_map(fn, items, overlap: bool) -> list:
    """``[fn(x) for x in items]``, on ``OPEN_THREADS`` threads when ``overlap`` (what waits on the network: URLs);
    results in order, and the first item's error in order is the one raised, as one by one."""
    items = list(items)
    if not overlap or len(items) < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(OPEN_THREADS) as pool:
        return list(pool.map(fn, items))


SIGNATURE_PARAMS = ("sig=", "x-amz-signature=", "signature=")  # Azure SAS, S3 and other presigned URLs


def public_href(path: str) -> str:
    """``path`` as a record may keep it: a URL signed for reading (an Azure SAS token, a presigned S3 URL) without
    its query, which expires and grants access; anything else as it is."""
    if is_url(path) and "?" in path:
        base, _, query = path.partition("?")
        if any(p in query.lower() for p in SIGNATURE_PARAMS):
            return base
    return path


def footprint(parts: list[tuple[str, tuple[float, ...], int, int]]) -> dict:
    """A scene's footprint from its rasters, each ``(crs, affine transform (6), width, height)``: ``geometry``
    (GeoJSON, EPSG:4326, the union of their bounds), ``bbox``, and ``proj`` (``epsg``, ``shape``, ``transform``
    of the first), as its STAC item states them."""
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom
    from shapely.geometry import box, mapping, shape
    from shapely.ops import unary_union

    shapes, proj = [], {}
    for crs, transform, width, height in parts:
        t = Affine(*transform[:6])
        xs, ys = (t.c, t.c + t.a * width), (t.f, t.f + t.e * height)
        shapes.append(shape(transform_geom(crs, "EPSG:4326", mapping(box(min(xs), min(ys), max(xs), max(ys))),
                                           precision=7)))
        if not proj:
            proj = {"epsg": CRS.from_user_input(crs).to_epsg(), "shape": [height, width], "transform": list(t)[:6]}
    u = unary_union(shapes)
    return {"geometry": mapping(u), "bbox": list(u.bounds), "proj": proj}


def open_url_raster(path: str):
    """rasterio's dataset for a raster URL, opened without listing the folder it lies in (GDAL would otherwise
    request the object store's listing for side-car files a COG does not have)."""
    import rasterio

    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
        return rasterio.open(path)


def local_file(path: str) -> str:
    """The local file that holds ``path``: the zip archive of a ``/vsizip/`` path, the file of a GDAL NetCDF
    subdataset (``NETCDF:"<file>":<variable>``), the store folder of a Zarr variable (``ZARR:"<store>":/<var>``),
    else ``path`` itself."""
    m = VSIZIP_PATH.match(path) or _NETCDF_SUBDATASET.match(path) or ZARR_VARIABLE.match(path)
    return m.group(1) if m else path


def is_vector_mask(path: str) -> bool:
    """Whether the mask file at ``path`` holds polygons (GML: :mod:`geowm.cube.vector_mask`) rather than pixels."""
    return path.lower().endswith(VECTOR_MASK_SUFFIXES)


def netcdf_variable(path: str) -> str | None:
    """The variable of a GDAL NetCDF subdataset path (``NETCDF:"<file>":<variable>``), else None."""
    m = _NETCDF_SUBDATASET.match(path)
    return m.group(2) if m else None


def read_bytes(path: str) -> bytes:
    """The content of a local file, or of a file inside a zip archive given as a GDAL ``/vsizip/`` path."""
    import zipfile

    m = VSIZIP_PATH.match(path)
    if m is None:
        return Path(path).read_bytes()
    try:
        with zipfile.ZipFile(m.group(1)) as z:
            return z.read(m.group(2) or "")
    except zipfile.BadZipFile as exc:
        raise OSError(f"not a readable zip archive ({exc})") from None
