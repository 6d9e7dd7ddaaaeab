"""The geowm STAC catalog: collections of the source scenes, the cubes, the forecasts and the alerts.

- ``update_catalog(catalog_dir, cube)`` is called after each ingest (``geowm ingest`` does it): one item per
  ingested scene (footprint, datetime, file assets, projection) and one item per cube (datacube extension:
  dimensions, variables, extent; the Icechunk snapshot it describes). Scene items already present are left
  as they are; the cube item is rewritten.
- ``add_forecasts(catalog_dir, store)`` (``geowm forecast`` does it): one item per init of a forecast store
  (forecast extension: ``forecast:reference_datetime`` is the init; datacube extension: the store's
  dimensions and variables; the model run, config hash and cube snapshot it was made from).
- ``add_alerts(catalog_dir, alerts_dir)`` (``geowm anomalies`` does it): one item per alert (its polygon,
  first detection to last sighting, type guess, peak score, area, confidence) and one item for the
  anomaly score raster of the folder.

A product's items are replaced as a whole each time (an alert that merged into another disappears, with
its item file); the items of other products are left as they are. Every file is replaced whole (written
aside, then renamed), parents after their children, so a save cut short leaves the catalog readable.
Every object validates against the STAC core schemas (``validate_catalog``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pystac
import rasterio
from pystac.extensions.datacube import DatacubeExtension, Dimension, DimensionType, Variable, VariableType
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from rasterio.warp import transform_bounds
from shapely.geometry import box, mapping

from geowm.atomic import atomic_write_text
from geowm.scene import footprint, is_url, is_vector_mask, local_file, netcdf_variable
from geowm.sources import source_crs
from geowm.zarrcube import open_raster, zarr_ref

CATALOG_ID = "geowm"
SOURCES = "sources"
CUBES = "cubes"
FORECASTS = "forecasts"
ALERTS = "alerts"
SCORES = "anomaly-scores"
FORECAST_EXTENSION = "https://stac-extensions.github.io/forecast/v0.2.0/schema.json"
ZARR = "application/vnd+zarr"
EPOCH_EXTENT = pystac.Extent(pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
                             pystac.TemporalExtent([[None, None]]))


def _open_or_create(catalog_dir: Path) -> pystac.Catalog:
    root = catalog_dir / "catalog.json"
    if root.exists():
        try:
            return pystac.Catalog.from_file(str(root))
        except (pystac.STACError, pystac.STACTypeError, ValueError) as exc:  # ValueError: not JSON
            raise ValueError(f"{root}: not a STAC catalog this can add to ({exc}); left as it is") from exc
    return pystac.Catalog(CATALOG_ID, "geowm: source scenes, data cubes, forecasts and alerts",
                          title="geowm catalog")


def _collection(cat: pystac.Catalog, cid: str, description: str) -> pystac.Collection:
    existing = cat.get_child(cid)
    if existing is not None:
        return existing  # type: ignore[return-value]
    coll = pystac.Collection(cid, description, extent=EPOCH_EXTENT.clone(), license="other")
    cat.add_child(coll)
    return coll


def _footprint(paths: list[str]) -> dict:
    """:func:`geowm.scene.footprint` of a scene's files, opened (cubes from before ingest recorded it)."""
    parts = []
    for p in paths:
        if is_vector_mask(p):  # a GML cloud mask: polygons inside the footprint of the scene's bands
            continue
        with open_raster(p) as src:
            parts.append((source_crs(src, p).to_string(), tuple(src.transform)[:6], src.width, src.height))
    return footprint(parts)


def _scene_item(src: dict) -> pystac.Item:
    files = list(src["files"])
    where = src.get("footprint") or _footprint(files)  # recorded at ingest: no source is opened again
    geom, bbox, proj = where["geometry"], where["bbox"], where["proj"]
    dt = datetime.fromisoformat(src["datetime"])
    item = pystac.Item(src["id"], geom, bbox, dt, properties={})
    for f in files:
        key = Path(f).stem
        archive = local_file(f)
        if (variable := netcdf_variable(f)) is not None:  # a variable of a NetCDF datacube: the file, and which
            key = variable
            asset = pystac.Asset(str(Path(archive).absolute()), media_type="application/netcdf", roles=["data"],
                                 extra_fields={"geowm:variable": variable})
        elif (ref := zarr_ref(f)) is not None:  # a variable of a Zarr datacube: the store, and which variable
            key = ref[1]
            asset = pystac.Asset(str(Path(archive).absolute()), media_type="application/vnd+zarr", roles=["data"],
                                 extra_fields={"geowm:variable": ref[1]})
        elif archive != f:  # a file inside a zip archive (a Sentinel-2 SAFE .zip): the archive, and the file in it
            asset = pystac.Asset(str(Path(archive).absolute()), media_type="application/zip", roles=["data"],
                                 extra_fields={"geowm:archive_member": f[len(f"/vsizip/{archive}/"):]})
        else:
            bare = f.split("?")[0] if is_url(f) else f  # a URL's query (a signature) does not name the format
            media = (pystac.MediaType.JPEG2000 if bare.lower().endswith(".jp2") else
                     "application/gml+xml" if is_vector_mask(bare) else pystac.MediaType.GEOTIFF)
            asset = pystac.Asset(f if is_url(f) else str(Path(f).absolute()), media_type=media, roles=["data"])
        item.add_asset(key, asset)
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
        **_spatial_dims([left, bottom, right, top], res, epsg, s["crs"]),
    }
    dc.variables = {
        "reflectance": Variable({"dimensions": ["time", "band", "y", "x"], "type": VariableType.DATA,
                                 "description": "band values as ingested"}),
        "valid": Variable({"dimensions": ["time", "y", "x"], "type": VariableType.DATA,
                           "description": "observed, not cloud, not fill"}),
    }
    if epsg:
        ProjectionExtension.ext(item, add_if_missing=True).epsg = epsg
    asset = pystac.Asset(str(Path(cube).absolute()), media_type="application/vnd+zarr", roles=["data"],
                         title="Icechunk repository (Zarr v3)", extra_fields={"icechunk:branch": "main"})
    item.add_asset("cube", asset)
    # what each band is (STAC eo common names, where the cube records them), as geowm's STAC reader reads them
    EOExtension.ext(asset, add_if_missing=True).bands = [
        Band.create(name=b, common_name=c or None)
        for b, c in zip(s["bands"], s["common_names"] or [""] * len(s["bands"]), strict=True)]
    return item


def default_catalog_dir(cube: str | Path) -> Path | None:
    """The catalog beside a local cube (``CUBE/../catalog``); None for a cube on object storage."""
    return None if "://" in str(cube) else Path(cube).parent / "catalog"


def _href(path: str | Path) -> str:
    return str(path) if "://" in str(path) else str(Path(path).absolute())


def _iso(t) -> str:
    """A datetime64 / timestamp as RFC 3339 in UTC (``...Z``)."""
    return str(np.datetime_as_string(np.datetime64(t, "s"), unit="s")) + "Z"


def _grid_extent(ds, crs: str) -> tuple[dict, list[float], list[float], int | None]:
    """Footprint (GeoJSON, EPSG:4326), its bbox and the (left, bottom, right, top) bounds in ``crs`` of the cell
    centres ``ds.x, ds.y``, and the CRS's EPSG code (or None)."""
    xs, ys = ds["x"].values.astype(float), ds["y"].values.astype(float)
    hx = abs(xs[1] - xs[0]) / 2 if len(xs) > 1 else 0.0
    hy = abs(ys[1] - ys[0]) / 2 if len(ys) > 1 else hx
    bounds = [xs.min() - hx, ys.min() - hy, xs.max() + hx, ys.max() + hy]
    bbox = list(transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21))
    return mapping(box(*bbox)), bbox, [float(v) for v in bounds], rasterio.crs.CRS.from_user_input(crs).to_epsg()


def _spatial_dims(bounds: list[float], step: float, epsg: int | None, crs: str, names=("y", "x")) -> dict:
    left, bottom, right, top = bounds
    ref = epsg or crs
    return {names[0]: Dimension({"type": DimensionType.SPATIAL, "axis": "y", "extent": [bottom, top], "step": -step,
                                 "reference_system": ref}),
            names[1]: Dimension({"type": DimensionType.SPATIAL, "axis": "x", "extent": [left, right], "step": step,
                                 "reference_system": ref})}


def _variables(ds) -> dict:
    return {name: Variable({"dimensions": list(var.dims), "type": VariableType.DATA,
                            **({"description": var.attrs["long_name"]} if "long_name" in var.attrs else {}),
                            **({"unit": var.attrs["units"]} if "units" in var.attrs else {})})
            for name, var in ds.data_vars.items()}


def _forecast_items(store: str) -> list[pystac.Item]:
    import dask

    from geowm.forecast_store import open_forecasts

    fc = open_forecasts(store)
    with dask.config.set(scheduler="synchronous"):  # a few coordinates: never a task on a flow's cluster
        valid_times = fc["valid_time"].values
    crs = fc["spatial_ref"].attrs.get("crs_wkt") if "spatial_ref" in fc.coords else None
    if not crs:
        raise ValueError(f"{store}: the forecast store has no CRS (spatial_ref); cannot place it in the catalog")
    geom, bbox, bounds, epsg = _grid_extent(fc, crs)
    res = abs(float(fc["x"][1] - fc["x"][0])) if fc.sizes["x"] > 1 else 0.0
    patch = fc.sizes["x"] // fc.sizes["px"] if fc.sizes.get("px") else None
    leads = [float(v) / 86400e9 for v in fc["lead_time"].values.astype("int64")]
    name = Path(str(store).rstrip("/")).name
    snapshots = fc.attrs.get("geowm:cube_snapshots", {})
    items = []
    for i, init in enumerate(fc["init_time"].values):
        valid = valid_times[i]
        key = str(np.datetime64(init, "s"))
        props = {"forecast:reference_datetime": _iso(init), "start_datetime": _iso(valid.min()),
                 "end_datetime": _iso(valid.max()), "geowm:lead_days": leads,
                 "geowm:run_id": fc.attrs.get("geowm:run_id"), "geowm:config_hash": fc.attrs.get("geowm:config_hash"),
                 "geowm:cube_snapshot": snapshots.get(key) or None}
        item = pystac.Item(f"{name}-{key.replace(':', '').replace('-', '')}", geom, bbox, None, properties=props,
                           stac_extensions=[FORECAST_EXTENSION])
        dc = DatacubeExtension.ext(item, add_if_missing=True)
        dims = {"init_time": Dimension({"type": DimensionType.TEMPORAL, "extent": [_iso(init), _iso(init)]}),
                "lead_time": Dimension({"type": "lead_time", "values": [f"P{d:g}D" if d == int(d) else
                                                                        f"PT{round(d * 86400)}S" for d in leads]})}
        if "quantile" in fc.dims:
            dims["quantile"] = Dimension({"type": "quantile", "values": [float(q) for q in fc["quantile"].values]})
        dims.update(_spatial_dims(bounds, res, epsg, crs))
        if patch:
            dims.update(_spatial_dims(bounds, res * patch, epsg, crs, names=("py", "px")))
        if "latent" in fc.dims:
            dims["latent"] = Dimension({"type": "latent", "extent": [0, fc.sizes["latent"] - 1]})
        dc.dimensions = dims
        dc.variables = _variables(fc)
        if epsg:
            ProjectionExtension.ext(item, add_if_missing=True).epsg = epsg
        item.add_asset("forecasts", pystac.Asset(
            _href(store), media_type=ZARR, roles=["data"], title="forecast store: Icechunk repository (Zarr v3)",
            extra_fields={"icechunk:branch": "main", "icechunk:snapshot": fc.attrs.get("geowm:store_snapshot"),
                          "geowm:init_index": i}))
        items.append(item)
    return items


def _alert_items(alerts_dir: Path) -> tuple[list[pystac.Item], list[pystac.Item]]:
    """Items of one alerts folder: one per alert, and one for its score raster (none when it has none)."""
    from geowm.alerts import open_alerts
    from geowm.anomaly import open_scores

    folder = Path(alerts_dir)
    name = folder.absolute().name
    assets = {}
    for key, file, media, title in (("geojson", "alerts.geojson", pystac.MediaType.GEOJSON, "alerts (GeoJSON)"),
                                    ("geoparquet", "alerts.parquet", "application/vnd.apache.parquet",
                                     "alerts (GeoParquet)"),
                                    ("scores", "scores.zarr", ZARR, "anomaly score raster (Zarr v3)")):
        if (folder / file).exists():
            assets[key] = pystac.Asset(_href(folder / file), media_type=media, roles=["data"], title=title)
    if not assets:
        raise FileNotFoundError(f"{folder}: no alerts.geojson, alerts.parquet or scores.zarr here")
    alerts = []
    if "geojson" in assets or "geoparquet" in assets:
        try:
            gdf = open_alerts(folder)
        except Exception as exc:  # a truncated or foreign file: name it
            file = folder / ("alerts.parquet" if "geoparquet" in assets else "alerts.geojson")
            raise ValueError(f"{file}: cannot read the alerts ({exc})") from exc
        for row in gdf.itertuples(index=False):
            geom = row.geometry
            first, last = pd.Timestamp(row.first_detected), pd.Timestamp(row.last_seen)
            item = pystac.Item(f"{name}-{row.id}", mapping(geom), list(geom.bounds), first.to_pydatetime().replace(
                tzinfo=UTC), properties={
                "start_datetime": _iso(first.to_datetime64()), "end_datetime": _iso(last.to_datetime64()),
                "geowm:alert_id": row.id, "geowm:type_guess": row.type_guess, "geowm:peak_score": float(row.peak_score),
                "geowm:area_ha": float(row.area_ha), "geowm:confidence": float(row.confidence)})
            for key, asset in assets.items():
                item.add_asset(key, asset.clone())
            alerts.append(item)
    scores = []
    if "scores" in assets:
        sc = open_scores(folder / "scores.zarr")
        crs = sc["spatial_ref"].attrs.get("crs_wkt") if "spatial_ref" in sc.coords else None
        if crs and sc.sizes.get("time", 0) and sc.sizes["x"] and sc.sizes["y"]:
            geom, bbox, bounds, epsg = _grid_extent(sc, crs)
            times = sc["time"].values
            item = pystac.Item(f"{name}-scores", geom, bbox, None, properties={
                "start_datetime": _iso(times.min()), "end_datetime": _iso(times.max()), "geowm:n_alerts": len(alerts)})
            dc = DatacubeExtension.ext(item, add_if_missing=True)
            step = abs(float(sc["x"][1] - sc["x"][0])) if sc.sizes["x"] > 1 else 0.0
            dc.dimensions = {"time": Dimension({"type": DimensionType.TEMPORAL,
                                                "extent": [_iso(times.min()), _iso(times.max())]}),
                             **_spatial_dims(bounds, step, epsg, crs)}
            dc.variables = _variables(sc)
            if epsg:
                ProjectionExtension.ext(item, add_if_missing=True).epsg = epsg
            for key, asset in assets.items():
                item.add_asset(key, asset.clone())
            scores.append(item)
    return alerts, scores


def _replace(coll: pystac.Collection, href: str, new: list[pystac.Item]) -> list[Path]:
    """Swap the items of ``coll`` that have an asset at ``href`` or under it (one product's items) for ``new``;
    returns the files of the items that went and did not come back (deleted once the catalog is saved). A new
    item whose id another product's item holds (two folders of one name) gets the product's digest appended."""
    import hashlib

    def owned(it: pystac.Item) -> bool:
        return any(a.href == href or a.href.startswith(href.rstrip("/") + "/") for a in it.assets.values())

    old = {it.id: it for it in coll.get_items() if owned(it)}
    for it in old.values():
        coll.remove_item(it.id)
    taken = {it.id for it in coll.get_items()}
    suffix = hashlib.sha1(href.encode()).hexdigest()[:8]
    for it in new:
        if it.id in taken:
            it.id = f"{it.id}-{suffix}"
        coll.add_item(it)
    keep = {it.id for it in new}
    return [Path(it.get_self_href()) for i, it in old.items() if i not in keep and it.get_self_href()]


class _AtomicStacIO(pystac.stac_io.DefaultStacIO):
    """Writes each JSON file of the catalog whole (:func:`geowm.atomic.atomic_write_text`)."""

    def write_text_to_href(self, href: str, txt: str) -> None:
        path = Path(pystac.utils.safe_urlparse(href).path)  # a local catalog: a path or a file:// href
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, txt)


def _save(cat: pystac.Catalog, catalog_dir: Path, gone: list[Path] = ()) -> Path:
    """Save the catalog, each file replaced whole. pystac writes items and children before their parents, and
    the files of items that left are deleted last, so a save cut short (a full disk, a kill) leaves every file
    valid and every link of the previous catalog.json resolving."""
    cat.normalize_hrefs(str(catalog_dir))
    cat.save(pystac.CatalogType.SELF_CONTAINED, stac_io=_AtomicStacIO())
    for f in gone:  # an item that left the catalog leaves no file behind (only files inside the catalog)
        if f.is_file() and catalog_dir.absolute() in f.absolute().parents:
            f.unlink()
            if f.parent != catalog_dir.absolute() and not any(f.parent.iterdir()):
                f.parent.rmdir()
    return catalog_dir / "catalog.json"


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
    return _save(cat, catalog_dir)


def add_forecasts(catalog_dir: str | Path, store: str | Path) -> Path:
    """(Re)write the items of a forecast store, one per init; returns the catalog.json path."""
    catalog_dir = Path(catalog_dir)
    items = _forecast_items(str(store))  # read first: a store that cannot be read changes nothing
    cat = _open_or_create(catalog_dir)
    coll = _collection(cat, FORECASTS, "geowm forecast stores: latent and decoded forecasts by init and lead "
                                       "(Zarr v3 / Icechunk), one item per init")
    gone = _replace(coll, _href(store), items)
    coll.update_extent_from_items()
    return _save(cat, catalog_dir, gone)


def add_alerts(catalog_dir: str | Path, alerts_dir: str | Path) -> Path:
    """(Re)write the items of an alerts folder: one per alert and one for its score raster; returns the
    catalog.json path."""
    catalog_dir = Path(catalog_dir)
    alerts, scores = _alert_items(Path(alerts_dir))  # read first: a broken folder changes nothing
    cat = _open_or_create(catalog_dir)
    gone = []
    for cid, description, items in (
            (ALERTS, "geowm alerts: confirmed anomalies as polygons, one item per alert", alerts),
            (SCORES, "geowm anomaly score rasters (time, y, x; robust z per patch), one item per alerts folder",
             scores)):
        coll = _collection(cat, cid, description)
        gone += _replace(coll, _href(alerts_dir), items)
        if any(True for _ in coll.get_items()):
            coll.update_extent_from_items()
    return _save(cat, catalog_dir, gone)


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
