"""Output writers: Cloud-Optimized GeoTIFFs, STAC catalog, events GeoJSON, weather Zarr, land cover."""

from __future__ import annotations

import json
import warnings
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
import rasterio.features
import shapely
import xarray as xr
from pyproj import Transformer
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from rasterio.io import MemoryFile
from shapely.geometry import mapping, shape

from .events import Event
from .landscape import BANDS, CLASSES, COMMON_NAMES, Grid
from .weather import Weather

COLLECTION_ID = "s2syn"
CENTER_WAVELENGTH_UM = {"B02": 0.490, "B03": 0.560, "B04": 0.665, "B08": 0.842}


@lru_cache(maxsize=1)
def _compression() -> str:
    """ZSTD when the bundled GDAL supports it, else DEFLATE."""
    try:
        with MemoryFile() as mem, mem.open(driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                                           crs="EPSG:32633", transform=rasterio.Affine(10, 0, 0, 0, -10, 0),
                                           compress="zstd") as dst:
            dst.write(np.zeros((1, 8, 8), np.uint8))
        return "zstd"
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return "deflate"


@lru_cache(maxsize=1)
def _has_cog_driver() -> bool:
    with rasterio.Env() as env:
        return "COG" in env.drivers()


def write_cog(path: Path, data: np.ndarray, grid: Grid, descriptions: tuple[str, ...], tags: dict[str, str],
              scale: float | None = None, resampling: str = "average") -> None:
    """Write ``data`` ``(bands, H, W)`` as a Cloud-Optimized GeoTIFF (256 px blocks, nodata 0)."""
    count, h, w = data.shape
    profile: dict[str, Any] = dict(width=w, height=h, count=count, dtype=data.dtype.name, crs=grid.crs,
                                   transform=grid.transform, nodata=0, compress=_compression(), predictor=2)
    if _has_cog_driver():
        profile.update(driver="COG", blocksize=256, overview_resampling=resampling, bigtiff="IF_SAFER")
    else:  # pragma: no cover - GDAL < 3.1
        profile.update(driver="GTiff", tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(descriptions, start=1):
            dst.set_band_description(i, name)
        if scale is not None:
            dst.scales = (scale,) * count
            dst.offsets = (0.0,) * count
        dst.update_tags(**tags)
        if not _has_cog_driver():  # pragma: no cover
            factors = [f for f in (2, 4, 8, 16, 32) if max(h, w) // f >= 128]
            if factors:
                dst.build_overviews(factors, getattr(rasterio.enums.Resampling, resampling))


def datetime_tags(when: datetime) -> dict[str, str]:
    """TIFF tags of an acquisition time (UTC)."""
    return {"TIFFTAG_DATETIME": when.strftime("%Y:%m:%d %H:%M:%S"),
            "ACQUISITION_DATETIME": when.strftime("%Y-%m-%dT%H:%M:%SZ")}


def write_landcover(path: Path, landcover: np.ndarray, grid: Grid, names: tuple[str, ...] = ("landcover",)) -> None:
    """uint8 land-cover COG, ``(H, W)`` or one band per name ``(len(names), H, W)``, with the class table as
    JSON in the ``CLASSES`` tag."""
    data = landcover[None] if landcover.ndim == 2 else landcover
    write_cog(path, data, grid, names, {"CLASSES": json.dumps({str(k): v for k, v in CLASSES.items()})},
              resampling="nearest")


def _to_wgs84(grid: Grid) -> Transformer:
    return Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True)


def footprint(grid: Grid) -> tuple[dict[str, Any], list[float]]:
    """Scene footprint polygon (GeoJSON dict) and bbox in EPSG:4326, edges densified."""
    xmin, ymin, xmax, ymax = grid.bounds
    t = np.linspace(0.0, 1.0, 9)[:-1]
    xs = np.concatenate([xmin + t * (xmax - xmin), np.full(8, xmax), xmax - t * (xmax - xmin), np.full(8, xmin)])
    ys = np.concatenate([np.full(8, ymax), ymax - t * (ymax - ymin), np.full(8, ymin), ymin + t * (ymax - ymin)])
    lon, lat = _to_wgs84(grid).transform(xs, ys)
    ring = [[round(float(a), 7), round(float(b), 7)] for a, b in zip(lon, lat, strict=True)]
    ring.append(ring[0])
    bbox = [round(float(v), 7) for v in (min(lon), min(lat), max(lon), max(lat))]
    return {"type": "Polygon", "coordinates": [ring]}, bbox


def _polygon(mask: np.ndarray, grid: Grid) -> shapely.Geometry:
    geoms = [shape(g) for g, v in rasterio.features.shapes(mask.astype(np.uint8), mask=mask,
                                                           transform=grid.transform) if v == 1]
    return shapely.union_all(geoms).simplify(grid.res * 0.5, preserve_topology=True)


def parcel_polygons(parcel: np.ndarray, wanted: set[int], grid: Grid) -> dict[int, shapely.Geometry]:
    """Native-CRS polygons of the ``wanted`` parcels of the int32 ``(H, W)`` parcel raster."""
    parts: dict[int, list[shapely.Geometry]] = {}
    for g, v in rasterio.features.shapes(parcel, mask=parcel >= 0, transform=grid.transform):
        if int(v) in wanted:
            parts.setdefault(int(v), []).append(shape(g))
    return {k: shapely.union_all(v).simplify(grid.res * 0.5, preserve_topology=True) for k, v in parts.items()}


def write_events(path: Path, events: list[Event], grid: Grid, parcel: np.ndarray,
                 parcel_size: np.ndarray, parcel_names: dict[int, str]) -> dict[str, int]:
    """Write the events as an RFC 7946 FeatureCollection (EPSG:4326); returns counts per type."""
    size = grid.size
    tr = _to_wgs84(grid)
    polys = parcel_polygons(parcel, {e.parcel for e in events if e.parcel >= 0}, grid)
    feats, counts = [], {}
    px_ha = grid.res**2 / 1e4
    for e in events:
        if e.parcel >= 0:
            geom, area = polys.get(e.parcel), float(parcel_size[e.parcel]) * px_ha
            cover = e.land_cover or parcel_names[e.parcel]
        else:
            m = np.zeros(size * size, bool)
            m[e.idx] = True
            geom, area, cover = _polygon(m.reshape(size, size), grid), e.idx.size * px_ha, e.land_cover
        if geom is None or geom.is_empty:
            continue
        g84 = shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
        g84 = shapely.set_precision(g84, 1e-7)
        props = {"id": e.id, "type": e.type, "start": str(np.datetime64(e.start, "D")),
                 "end": str(np.datetime64(e.end, "D")), "anomaly": e.anomaly, "land_cover": cover,
                 "area_ha": round(area, 3), "bbox_native": [round(v, 2) for v in geom.bounds]}
        feats.append({"type": "Feature", "id": e.id, "geometry": mapping(g84), "properties": props})
        counts[e.type] = counts.get(e.type, 0) + 1
    fc = {"type": "FeatureCollection", "geowm:crs": grid.crs, "features": feats}
    path.write_text(json.dumps(fc))
    return counts


def write_weather(path: Path, weather: Weather, first: np.datetime64, last: np.datetime64, crs: str) -> None:
    """Write the daily drivers in ``[first, last]`` as a Zarr v3 store with a CF grid mapping."""
    import rioxarray  # noqa: F401 - registers the .rio accessor

    sel = (weather.days >= first) & (weather.days <= last)
    ds = xr.Dataset(
        {"temperature": (("time", "y", "x"), weather.temperature[sel],
                         {"units": "degC", "long_name": "daily mean 2 m air temperature"}),
         "precipitation": (("time", "y", "x"), weather.precipitation[sel],
                           {"units": "mm/day", "long_name": "daily precipitation"})},
        coords={"time": weather.days[sel].astype("datetime64[ns]"),
                "y": ("y", weather.y, {"units": "m", "standard_name": "projection_y_coordinate"}),
                "x": ("x", weather.x, {"units": "m", "standard_name": "projection_x_coordinate"})},
        attrs={"title": "geowm synthetic weather drivers", "cell_size_m": weather.cell_m},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = ds.rio.write_crs(crs).rio.write_coordinate_system()
        ds = ds.rio.write_transform(ds.rio.transform(recalc=True))
        for v in ds.data_vars:
            ds[v].encoding["chunks"] = (min(366, int(sel.sum())), ds.sizes["y"], ds.sizes["x"])
        ds.to_zarr(path, mode="w", zarr_format=3, consolidated=True)


def write_stac(stac_dir: Path, scenes: list[dict[str, Any]], grid: Grid) -> pystac.Catalog:
    """STAC catalog -> collection ``s2syn`` -> one item per acquisition (self-contained, relative hrefs).

    ``scenes`` holds dicts with ``id``, ``datetime``, ``reflectance`` and ``scl`` (absolute paths)
    and ``cloud_cover`` (percent).
    """
    geom, bbox = footprint(grid)
    times = [s["datetime"] for s in scenes]
    extent = pystac.Extent(pystac.SpatialExtent([bbox]),
                           pystac.TemporalExtent([[min(times), max(times)]] if times else [[None, None]]))
    cat = pystac.Catalog("geowm-synth", "Synthetic Sentinel-2-like region generated by geowm.synth")
    coll = pystac.Collection(COLLECTION_ID, "Synthetic 10 m Sentinel-2 L2A-like surface reflectance (B02, B03, "
                             "B04, B08) with scene classification", extent, license="CC-BY-4.0")
    cat.add_child(coll)
    transform = list(grid.transform)[:6]
    for s in scenes:
        item = pystac.Item(s["id"], geom, bbox, s["datetime"],
                           {"platform": "synthetic-sentinel-2", "constellation": "geowm-synth", "gsd": grid.res})
        EOExtension.ext(item, add_if_missing=True).cloud_cover = float(s["cloud_cover"])
        ProjectionExtension.ext(item, add_if_missing=True).apply(
            code=grid.crs, shape=[grid.size, grid.size], transform=transform, bbox=list(grid.bounds))
        refl = pystac.Asset(str(Path(s["reflectance"]).absolute()), "Surface reflectance x 10000",
                            media_type=pystac.MediaType.COG,
                            roles=["data", "reflectance"])
        item.add_asset("reflectance", refl)
        EOExtension.ext(refl).bands = [Band.create(name=b, common_name=c, center_wavelength=CENTER_WAVELENGTH_UM[b])
                                       for b, c in zip(BANDS, COMMON_NAMES, strict=True)]
        RasterExtension.ext(refl, add_if_missing=True).bands = [
            RasterBand.create(nodata=0, data_type=DataType.UINT16, scale=0.0001, offset=0.0,
                              spatial_resolution=grid.res) for _ in BANDS]
        scl = pystac.Asset(str(Path(s["scl"]).absolute()), "Scene classification (Sentinel-2 L2A codes)",
                           media_type=pystac.MediaType.COG, roles=["data", "cloud-mask"])
        item.add_asset("SCL", scl)
        EOExtension.ext(scl).bands = [Band.create(name="SCL", description="scene classification")]
        RasterExtension.ext(scl).bands = [RasterBand.create(nodata=0, data_type=DataType.UINT8,
                                                            spatial_resolution=grid.res)]
        coll.add_item(item)
    cat.normalize_hrefs(str(Path(stac_dir).absolute()))
    cat.make_all_asset_hrefs_relative()
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    return cat
