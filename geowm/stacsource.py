"""Scenes from STAC: a catalog, collection, item or item collection (a saved search: GeoJSON
``FeatureCollection``), as a local file or a URL, or the items a STAC API search returns
(:func:`search_stac_api`: Earth Search, a pgSTAC/stac-fastapi server, any API conforming to STAC API - Item
Search). One scene per item.

Which assets of an item are bands (:func:`_scene_from_item`):

* raster assets only (a GeoTIFF/COG media type, else a ``.tif``/``.tiff``/``.jp2`` href);
* not a rendering: an asset whose roles are only ``visual``/``overview``/``thumbnail`` or whose key is
  ``visual``/``tci`` (Earth Search's and the Planetary Computer's 8-bit true-colour image, whose bands carry the
  names of the reflectance bands) is skipped when the item has other raster assets;
* one asset per band name: a single-band asset over a multi-band one, a GeoTIFF over a JPEG 2000 copy
  (Earth Search's ``red`` and ``red-jp2``), then the asset whose key is the band's name.

Names and common names come from ``eo:bands`` (STAC 1.1 ``bands``), else the file's band descriptions, else
the asset key; scale and offset from ``raster:bands``, else the product's convention. Hrefs that are URLs are
read by GDAL (``/vsicurl/``, ``/vsis3/``); nothing here reads pixels.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from urllib.parse import urljoin

from geowm.bands import COMMON_NAMES, sensor_of
from geowm.products import product_scaling, s2_item_scaling
from geowm.scene import BandRef, Scene, SourceError, io_map, is_url

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2")
RASTER_MEDIA_HINTS = ("image/tiff", "image/geotiff", "application=geotiff", "cloud-optimized")
RENDERING_ROLES = frozenset({"visual", "overview", "thumbnail"})  # pictures of the scene, not its measurements
RENDERING_KEYS = frozenset({"visual", "tci", "rendered_preview", "preview", "thumbnail"})
SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")  # STAC item ids become folder and file names in the catalog
MAX_ITEMS_DEFAULT = 1000


# ---------------------------------------------------------------- assets


def _is_raster_asset(asset) -> bool:
    media = (asset.media_type or "").lower()
    if media:
        return any(h in media for h in RASTER_MEDIA_HINTS)
    return asset.href.lower().split("?")[0].endswith(RASTER_SUFFIXES)


def _is_rendering(key: str, asset) -> bool:
    roles = set(asset.roles or [])
    return key.lower() in RENDERING_KEYS or key.lower().startswith("visual") or bool(roles) and roles <= RENDERING_ROLES


def _asset_bands(asset) -> tuple[list[str], list[str]] | None:
    """The names and common names ("" unknown) of an asset's bands (STAC ``eo:bands``, or 1.1 ``bands``)."""
    fields = asset.extra_fields
    bands = fields.get("eo:bands") or fields.get("bands")
    if bands:
        return ([b.get("name") for b in bands],
                [str(b.get("common_name") or b.get("eo:common_name") or "").lower() for b in bands])
    return None


def _asset_scaling(asset, doc: str) -> list[tuple[float | None, float | None]]:
    """Per band of an asset, (scale, offset) from the STAC raster extension (``raster:bands``, or 1.1 ``bands``
    with ``raster:scale`` / ``raster:offset``); (None, None) where not given."""
    fields = asset.extra_fields
    if fields.get("raster:bands"):
        items = [(b.get("scale"), b.get("offset")) for b in fields["raster:bands"]]
    else:
        items = [(b.get("raster:scale"), b.get("raster:offset")) for b in fields.get("bands") or []]
    out = []
    for scale, offset in items:
        try:
            scale = None if scale is None else float(scale)
            offset = None if offset is None else float(offset)
        except (TypeError, ValueError):
            raise SourceError(
                f"{doc}: asset {asset.href}: raster scale/offset {scale!r}/{offset!r} are not numbers") from None
        if scale is not None and (not math.isfinite(scale) or scale == 0) or \
                offset is not None and not math.isfinite(offset):
            raise SourceError(f"{doc}: asset {asset.href}: raster scale {scale!r} / offset {offset!r}: need a finite, "
                              "non-zero scale and a finite offset")
        out.append((scale, offset))
    return out


def _asset_path(item, key: str, asset, doc: str) -> str:
    """Where GDAL reads an asset: its URL, or its local file (relative hrefs resolved against the item, else the
    document it came in); a missing local file is an error naming it."""
    href = asset.get_absolute_href() or asset.href
    if not is_url(href) and not Path(href.removeprefix("file://")).is_absolute():
        href = urljoin(doc if is_url(doc) else Path(doc).absolute().as_uri(), href)
    if is_url(href):
        return href  # rasterio/GDAL reads it through its virtual file systems
    path = href.removeprefix("file://")
    if not Path(path).is_file():
        raise SourceError(f"{doc}: STAC item {item.id!r} asset {key!r} points at a missing file {path}")
    return path


def _band_names(item, key: str, asset, path: str, doc: str) -> tuple[list[str | None], list[str]]:
    import rasterio

    from geowm.zarrcube import open_raster

    named = _asset_bands(asset)
    if named is not None:
        return named
    try:
        with open_raster(path) as src:
            descriptions = list(src.descriptions)
    except rasterio.errors.RasterioIOError as exc:
        raise SourceError(f"{path}: not a readable raster (STAC item {item.id!r}: {exc})") from None
    return [d or (key if len(descriptions) == 1 else f"{key}_{i + 1}") for i, d in enumerate(descriptions)], []


def _scene_from_item(item, mask_band: str | None, doc: str) -> Scene:
    from geowm.sources import name_bands, with_mask

    if not SAFE_ID.fullmatch(item.id or "") or set(item.id) == {"."}:
        raise SourceError(f"{doc}: STAC item id {item.id!r} is not a safe name (letters, digits, '.', '_', '-' "
                          "only; it becomes a file name in the geowm catalog)")
    dt = item.datetime or item.common_metadata.start_datetime
    if dt is None:
        raise SourceError(f"{doc}: STAC item {item.id!r} has neither datetime nor start_datetime")
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    rasters = [(k, a) for k, a in sorted(item.assets.items()) if _is_raster_asset(a)]
    if any(not _is_rendering(k, a) for k, a in rasters):
        rasters = [(k, a) for k, a in rasters if not _is_rendering(k, a)]
    candidates = []  # (rank, key, band number, name, common name, path, scaling)
    for key, asset in rasters:
        path = _asset_path(item, key, asset, doc)
        names, commons = _band_names(item, key, asset, path, doc)
        scaling = _asset_scaling(asset, doc)
        media = (asset.media_type or "").lower()
        not_tiff = not (any(h in media for h in RASTER_MEDIA_HINTS) if media else
                        path.lower().split("?")[0].endswith((".tif", ".tiff")))
        for i, name in enumerate(names, start=1):
            if not name:
                raise SourceError(f"{doc}: STAC item {item.id!r} asset {key!r} band {i} has no name")
            rank = (len(names) > 1, not_tiff, key.lower() != name.lower())
            common = commons[i - 1] if i <= len(commons) and commons[i - 1] in COMMON_NAMES else None
            candidates.append((rank, key, i, name, common, path, scaling[i - 1] if i <= len(scaling) else None))
    bands: dict[str, BandRef] = {}
    common: dict[str, str] = {}
    for _, _, i, name, cn, path, scaling in sorted(candidates, key=lambda c: (c[0], c[1], c[2])):
        if name in bands:
            continue  # a better copy of this band is taken (single-band, GeoTIFF, its own asset)
        scale, offset = scaling or (None, None)
        if scale is None and offset is None:
            scale, offset = product_scaling(item.id, name) or s2_item_scaling(item, name) or (None, None)
        bands[name] = BandRef(path, i, name, scale, offset)
        if cn:
            common[name] = cn
    if not bands:
        raise SourceError(f"{doc}: STAC item {item.id!r} has no GeoTIFF/COG asset")
    scene = Scene(item.id, dt, dict(sorted(bands.items())), origin=doc, common_names=common)
    return with_mask(name_bands(scene, sensor_of(item.id, item.properties.get("platform"), list(bands))), mask_band)


def _scenes(items: Iterable, mask_band: str | None, doc: str) -> list[Scene]:
    """One scene per item (an item listed twice, by two collections or two pages of a search, once). Items are
    read on threads (:func:`geowm.scene.io_map`): naming the bands of an asset without ``eo:bands`` opens its file,
    a round trip each over the network."""
    unique: dict[str, object] = {}
    for it in items:
        unique.setdefault(it.id, it)  # the first of each id
    return io_map(lambda it: _scene_from_item(it, mask_band, doc), unique.values(), overlap=True)


# ---------------------------------------------------------------- documents


def _read_text(source: str) -> str:
    if not is_url(source):
        try:
            return Path(source.removeprefix("file://")).read_text()
        except OSError as exc:
            raise SourceError(f"{source}: cannot read this STAC document ({exc.strerror or exc})") from None
    import pystac

    try:
        return pystac.StacIO.default().read_text(source)
    except Exception as exc:  # urllib's HTTPError / URLError, timeouts
        raise SourceError(f"{source}: cannot read this STAC document ({type(exc).__name__}: {exc})") from None


def scenes_from_stac(source: str | Path, mask_band: str | None) -> list[Scene]:
    """The scenes of a STAC document, a local file or a URL: an item, a catalog or collection (its items,
    recursively), or an item collection (a GeoJSON ``FeatureCollection`` of items, as a STAC API search returns
    and ``stac-client search --save`` writes)."""
    import pystac

    source = str(source)
    try:
        doc = json.loads(_read_text(source))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{source}: invalid STAC JSON ({exc})") from None
    try:
        if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
            obj = pystac.ItemCollection.from_dict(doc)
        else:
            obj = pystac.read_file(source.removeprefix("file://"))
    except SourceError:
        raise
    except Exception as exc:  # pystac raises several types for malformed documents
        raise SourceError(f"{source}: invalid STAC document ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, pystac.Item):
        items: Iterable = [obj]
    elif isinstance(obj, pystac.ItemCollection):
        items = list(obj)
    elif isinstance(obj, pystac.Catalog):  # also Collection
        try:
            items = list(obj.get_items(recursive=True))
        except Exception as exc:
            raise SourceError(f"{source}: cannot read the items of this STAC catalog ({exc})") from None
    else:
        raise SourceError(f"{source}: a STAC catalog, collection or item was expected, got {type(obj).__name__}")
    scenes = _scenes(items, mask_band, source)
    if not scenes:
        raise SourceError(f"{source}: the STAC document holds no items")
    return scenes


# ---------------------------------------------------------------- STAC API search


@dataclass(frozen=True)
class StacSearch:
    """A STAC API item search: ``collections`` (ids), ``bbox`` (west, south, east, north in degrees, WGS 84),
    ``datetime`` (an RFC 3339 instant or interval, ``2023-01-01/2023-06-30``; open ends ``..``), ``max_cloud``
    (items whose ``eo:cloud_cover`` is above this percentage are left out; items without it are kept, their
    mask decides), ``max_items`` (more matches than this is an error, not a silent cut), ``sign`` (how the
    assets' hrefs are signed: :data:`SIGNERS`; None: the Planetary Computer's SAS tokens for its API)."""

    collections: tuple[str, ...]
    bbox: tuple[float, float, float, float] | None = None
    datetime: str | None = None
    max_cloud: float | None = None
    max_items: int = MAX_ITEMS_DEFAULT
    # how asset hrefs are signed: "planetary-computer" (SAS tokens), "none"; None: the Planetary Computer's for
    # its API, none for others
    sign: str | None = None
    intersects: dict | None = None  # a GeoJSON geometry (EPSG:4326) the items must intersect (--aoi)

    def check(self, where: str) -> None:
        """Raise :class:`SourceError` on a search that cannot be meant (no collection, a bbox off the globe or
        inside out, a cloud cover outside 0-100, no item allowed)."""
        if not self.collections or not all(c.strip() for c in self.collections):
            raise SourceError(f"{where}: --collection: give the id of at least one collection (e.g. sentinel-2-l2a)")
        check_bbox(self.bbox, where)
        if self.max_cloud is not None and not (math.isfinite(self.max_cloud) and 0 <= self.max_cloud <= 100):
            raise SourceError(f"{where}: --max-cloud {self.max_cloud!r}: a percentage, 0 to 100")
        if self.max_items < 1:
            raise SourceError(f"{where}: --max-items {self.max_items}: at least 1")
        if self.sign is not None and self.sign not in SIGNERS:
            raise SourceError(f"{where}: --sign {self.sign!r}: one of {', '.join(SIGNERS)}")

    def describe(self) -> str:
        parts = [f"collections {','.join(self.collections)}"]
        if self.intersects:
            parts.append(f"intersecting a {self.intersects.get('type', 'geometry')}")
        elif self.bbox:
            parts.append(f"bbox {','.join(f'{v:g}' for v in self.bbox)}")
        if self.datetime:
            parts.append(f"datetime {self.datetime}")
        if self.max_cloud is not None:
            parts.append(f"eo:cloud_cover <= {self.max_cloud:g}")
        return ", ".join(parts)


def search_stac_api(url: str, search: StacSearch, mask_band: str | None) -> list[Scene]:
    """The scenes of the items a STAC API (its landing page at ``url``) returns for ``search``, following its
    pages. Raises :class:`SourceError` naming the URL when the API cannot be reached, is not a STAC API with item
    search, refuses the search, matches nothing, or matches more than ``search.max_items``."""
    from pystac_client import Client
    from pystac_client.conformance import ConformanceClasses

    search.check(url)
    try:
        client = Client.open(url, timeout=60)
    except Exception as exc:  # requests' connection errors, APIError, a landing page that is not STAC
        raise SourceError(f"{url}: cannot open this STAC API ({type(exc).__name__}: {exc})") from None
    if not client.conforms_to(ConformanceClasses.ITEM_SEARCH):
        raise SourceError(f"{url}: not a STAC API with item search (its landing page declares no "
                          "https://api.stacspec.org/v1.0.0/item-search conformance); for a static catalog, item "
                          "or item collection, give the document without --collection")
    query = None
    if search.max_cloud is not None and client.conforms_to(ConformanceClasses.QUERY):
        query = {"eo:cloud_cover": {"lte": search.max_cloud}}  # also filtered below, for APIs without query
    try:
        area = {"intersects": search.intersects} if search.intersects else {"bbox": search.bbox}
        found = client.search(collections=list(search.collections), datetime=search.datetime, query=query,
                              max_items=search.max_items + 1, **area)
        items = list(found.items())
    except ValueError as exc:  # pystac-client's own check of the arguments (a datetime it cannot parse)
        raise SourceError(f"{url}: search {search.describe()}: {exc}") from None
    except Exception as exc:  # APIError (the server refused the search), connection errors while paging
        raise SourceError(f"{url}: search {search.describe()} failed ({type(exc).__name__}: {exc})") from None
    if len(items) > search.max_items:
        raise SourceError(f"{url}: more than {search.max_items} items match {search.describe()}; narrow --bbox, "
                          "--datetime or --max-cloud, or raise --max-items")
    if search.max_cloud is not None:
        items = [it for it in items if not _cloudier(it, search.max_cloud)]
    if not items:
        raise NoItems(f"{url}: no item matches {search.describe()}")
    if search.sign == "planetary-computer" or search.sign is None and is_planetary_computer(url):
        sign_planetary_computer(items, url)
    return _scenes(items, mask_band, url)


# ---------------------------------------------------------------- signed hrefs (Microsoft Planetary Computer)

PC_API_HOST = "planetarycomputer.microsoft.com"
PC_SAS_URL = f"https://{PC_API_HOST}/api/sas/v1/token"  # PC_SDK_SAS_URL overrides it, as for Microsoft's own SDK
BLOB_HOST = ".blob.core.windows.net"
SIGNERS = ("planetary-computer", "none")


def is_planetary_computer(url: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(url).hostname or "").endswith(PC_API_HOST)


def sign_planetary_computer(items: Iterable, where: str) -> None:
    """Append a SAS token to the href of every asset in Azure Blob Storage (``<account>.blob.core.windows.net/
    <container>/...``) that has none, as the Planetary Computer's data require: one token per account and
    container, from its token service (``PC_SDK_SAS_URL``; ``PC_SDK_SUBSCRIPTION_KEY`` sent as
    ``Ocp-Apim-Subscription-Key`` when set). A token that cannot be had is an error naming the asset."""
    import os
    import urllib.request
    from urllib.parse import urlparse

    tokens: dict[tuple[str, str], str] = {}
    base = os.environ.get("PC_SDK_SAS_URL", PC_SAS_URL).rstrip("/")
    key = os.environ.get("PC_SDK_SUBSCRIPTION_KEY")
    for item in items:
        for asset in item.assets.values():
            u = urlparse(asset.href)
            if not (u.hostname or "").endswith(BLOB_HOST) or "sig=" in u.query:
                continue
            account, container = u.hostname.split(".")[0], u.path.lstrip("/").split("/")[0]
            if (account, container) not in tokens:
                try:
                    req = urllib.request.Request(f"{base}/{account}/{container}",
                                                 headers={"Ocp-Apim-Subscription-Key": key} if key else {})
                    with urllib.request.urlopen(req, timeout=60) as r:
                        tokens[account, container] = str(json.loads(r.read())["token"]).lstrip("?")
                except Exception as exc:  # connection errors, HTTP errors, an answer without a token
                    raise SourceError(f"{where}: STAC item {item.id!r}: no SAS token for {account}/{container} "
                                      f"from {base} ({type(exc).__name__}: {exc})") from None
            asset.href = f"{asset.href}{'&' if u.query else '?'}{tokens[account, container]}"


def _cloudier(item, max_cloud: float) -> bool:
    cover = item.properties.get("eo:cloud_cover")
    try:
        return cover is not None and float(cover) > max_cloud
    except (TypeError, ValueError):
        return False


class NoItems(SourceError):
    """A STAC API search that matched no item (a scheduled search before the next acquisition is published)."""


def check_bbox(bbox: Sequence[float] | None, where: str) -> None:
    """A ``west, south, east, north`` box in degrees must be on the globe and not inside out (:class:`SourceError`)."""
    if bbox is None:
        return
    w, s, e, n = bbox
    if not all(math.isfinite(v) for v in bbox) or not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
        raise SourceError(f"{where}: --bbox {','.join(f'{v:g}' for v in bbox)}: west,south,east,north in degrees, "
                          "west < east, south < north, within -180..180 and -90..90")


def read_aoi(path: str | Path) -> tuple[dict, tuple[float, float, float, float]]:
    """An area of interest from a vector file (GeoJSON, GeoPackage, shapefile...; any CRS): its union as a GeoJSON
    geometry in EPSG:4326 and that geometry's bounds. :class:`SourceError` naming the file when it cannot be read,
    has no CRS (GeoJSON: WGS 84) or no geometry."""
    import geopandas as gpd
    from shapely.geometry import mapping

    try:
        df = gpd.read_file(path)
    except Exception as exc:  # pyogrio's DataSourceError, OSError, ...
        raise SourceError(f"{path}: --aoi: not a readable vector file ({type(exc).__name__}: {exc})") from None
    df = df[df.geometry.notna() & ~df.geometry.is_empty] if len(df) else df
    if not len(df):
        raise SourceError(f"{path}: --aoi: no geometry in this file")
    if df.crs is None:
        raise SourceError(f"{path}: --aoi: the file states no CRS")
    geom = df.to_crs("EPSG:4326").geometry.union_all()
    w, s, e, n = (float(v) for v in geom.bounds)
    return mapping(geom), (w, s, e, n)


def collections_of(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """Collection ids from ``a,b`` or a list."""
    if text is None:
        return ()
    parts = text.split(",") if isinstance(text, str) else list(text)
    return tuple(p.strip() for p in parts)
