"""The geowm STAC catalog: a collection of the source scenes and a collection of cubes.

``update_catalog(catalog_dir, cube)`` is called after each ingest (``geowm ingest`` does it) and keeps
the catalog current: one item per ingested scene (footprint, datetime, file assets, bands,
projection) and one item per cube (datacube extension: dimensions, variables, extent; the Icechunk
snapshot it describes). Items already present are left as they are; the cube item is rewritten.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pystac
import rasterio
from pystac.extensions.datacube import DatacubeExtension, Dimension, DimensionType, Variable, VariableType
from pystac.extensions.projection import ProjectionExtension
from rasterio.warp import transform_bounds, transform_geom
from shapely.geometry import box, mapping

CATALOG_ID = "geowm"
SOURCES = "sources"
CUBES = "cubes"
EPOCH_EXTENT = pystac.Extent(pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
                             pystac.TemporalExtent([[None, None]]))


def _open_or_create(catalog_dir: Path) -> pystac.Catalog:
    root = catalog_dir / "catalog.json"
    if root.exists():
        return pystac.Catalog.from_file(str(root))
    return pystac.Catalog(CATALOG_ID, "geowm: source scenes, data cubes, forecasts and alerts",
                          title="geowm catalog")


def _collection(cat: pystac.Catalog, cid: str, description: str) -> pystac.Collection:
    existing = cat.get_child(cid)
    if existing is not None:
        return existing  # type: ignore[return-value]
    coll = pystac.Collection(cid, description, extent=EPOCH_EXTENT.clone(), license="other")
    cat.add_child(coll)
    return coll


def _footprint(paths: list[str]) -> tuple[dict, list[float], dict]:
    """Union footprint (GeoJSON in EPSG:4326), bbox and projection info of a scene's files."""
    shapes, proj = [], {}
    for p in paths:
        with rasterio.open(p) as src:
            geom = transform_geom(src.crs, "EPSG:4326", mapping(box(*src.bounds)), precision=7)
            shapes.append(geom)
            if not proj:
                proj = {"epsg": src.crs.to_epsg(), "shape": [src.height, src.width],
                        "transform": list(src.transform)[:6]}
    from shapely.geometry import shape
    from shapely.ops import unary_union

    u = unary_union([shape(g) for g in shapes])
    return mapping(u), list(u.bounds), proj


def _scene_item(src: dict) -> pystac.Item:
    files = list(src["files"])
    geom, bbox, proj = _footprint(files)
    dt = datetime.fromisoformat(src["datetime"])
    item = pystac.Item(src["id"], geom, bbox, dt, properties={})
    for f in files:
        key = Path(f).stem
        item.add_asset(key, pystac.Asset(str(Path(f).absolute()), media_type=pystac.MediaType.GEOTIFF,
                                         roles=["data"]))
    if proj.get("epsg"):
        pe = ProjectionExtension.ext(item, add_if_missing=True)
        pe.epsg = proj["epsg"]
        pe.shape = proj["shape"]
        pe.transform = proj["transform"]
    return item


def _cube_item(cube: str) -> pystac.Item:
    from geowm.cube.info import summarize

    s = summarize(cube)
    left, bottom, right, top = s["bounds"]
    bbox = list(transform_bounds(s["crs"], "EPSG:4326", left, bottom, right, top, densify_pts=21))
    geom = mapping(box(*bbox))
    first = datetime.fromisoformat(s["time"]["first"]).replace(tzinfo=UTC)
    last = datetime.fromisoformat(s["time"]["last"]).replace(tzinfo=UTC)
    item = pystac.Item(Path(cube).name, geom, bbox, None,
                       properties={"start_datetime": first.isoformat(), "end_datetime": last.isoformat(),
                                   "geowm:snapshot": s["snapshot"], "geowm:tile_size": s["tiles"]["size_px"]})
    epsg = rasterio.crs.CRS.from_user_input(s["crs"]).to_epsg()
    dc = DatacubeExtension.ext(item, add_if_missing=True)
    res = s["resolution"]
    dc.dimensions = {
        "time": Dimension({"type": DimensionType.TEMPORAL, "extent": [first.isoformat(), last.isoformat()]}),
        "band": Dimension({"type": "bands", "values": s["bands"]}),
        "y": Dimension({"type": DimensionType.SPATIAL, "axis": "y", "extent": [bottom, top], "step": -res,
                        "reference_system": epsg or s["crs"]}),
        "x": Dimension({"type": DimensionType.SPATIAL, "axis": "x", "extent": [left, right], "step": res,
                        "reference_system": epsg or s["crs"]}),
    }
    dc.variables = {
        "reflectance": Variable({"dimensions": ["time", "band", "y", "x"], "type": VariableType.DATA,
                                 "description": "band values as ingested"}),
        "valid": Variable({"dimensions": ["time", "y", "x"], "type": VariableType.DATA,
                           "description": "observed, not cloud, not fill"}),
    }
    if epsg:
        ProjectionExtension.ext(item, add_if_missing=True).epsg = epsg
    item.add_asset("cube", pystac.Asset(str(Path(cube).absolute()), media_type="application/vnd+zarr",
                                        roles=["data"], title="Icechunk repository (Zarr v3)",
                                        extra_fields={"icechunk:branch": "main"}))
    return item


def update_catalog(catalog_dir: str | Path, cube: str | Path, source: str | Path | None = None) -> Path:
    """Add the cube's new source scenes and (re)write its cube item; returns the catalog.json path."""
    from geowm.cube.store import read_state

    catalog_dir = Path(catalog_dir)
    cube = str(cube)
    cat = _open_or_create(catalog_dir)
    sources = _collection(cat, SOURCES, "Source scenes ingested into geowm cubes")
    cubes = _collection(cat, CUBES, "geowm data cubes (time, band, y, x) in Zarr v3 / Icechunk")
    have = {it.id for it in sources.get_items()}
    for src in read_state(cube).sources:
        if src["id"] not in have:
            sources.add_item(_scene_item(src))
    old = cubes.get_item(Path(cube).name)
    if old is not None:
        cubes.remove_item(old.id)
    cubes.add_item(_cube_item(cube))
    for coll in (sources, cubes):
        coll.update_extent_from_items()
    cat.normalize_hrefs(str(catalog_dir))
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    return catalog_dir / "catalog.json"


def validate_catalog(catalog_json: str | Path) -> list[str]:
    """Validate every object of the catalog with stac-validator against the STAC core JSON schemas that
    ship with pystac (offline). Returns the error messages (empty when valid)."""
    import json
    import warnings

    import pystac.validation

    with warnings.catch_warnings():  # the package points at its successor, stac_valid, with the same API
        warnings.simplefilter("ignore", DeprecationWarning)
        from stac_validator import stac_validator

    local = Path(pystac.validation.__file__).parent / "jsonschemas" / "stac-spec"
    schema_map = {}
    for version_dir in local.iterdir():
        for f in version_dir.glob("*.json"):
            for kind in ("item-spec/json-schema", "catalog-spec/json-schema", "collection-spec/json-schema"):
                schema_map[f"https://schemas.stacspec.org/{version_dir.name}/{kind}/{f.name}"] = str(f)
    for f in (local.parent / "geojson").glob("*.json"):
        schema_map[f"https://geojson.org/schema/{f.name}"] = str(f)
    errors = []
    cat = pystac.Catalog.from_file(str(catalog_json))
    objs = [cat, *cat.get_all_collections(), *cat.get_items(recursive=True)]
    for obj in objs:
        path = obj.get_self_href()
        v = stac_validator.StacValidate(path, core=True, schema_map=schema_map)
        if not v.run():
            errors.append(f"{path}: {json.dumps(v.message[-1] if v.message else {})}")
    return errors
