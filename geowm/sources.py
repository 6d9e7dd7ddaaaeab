"""Scene discovery: a folder of GeoTIFF/COG/JPEG 2000 files, a Sentinel-2 SAFE product or its .zip, a NetCDF
datacube (:mod:`geowm.netcdf`), a Zarr datacube (:mod:`geowm.zarrcube`), or STAC documents and API searches
(:mod:`geowm.stacsource`) -> Scene records (:mod:`geowm.scene`).

A :class:`Scene` is one acquisition footprint: its date, the files and band indexes that hold each
band, and optionally a quality/cloud mask band. How each mission names, scales and masks its files is in
:mod:`geowm.products`. Nothing here reads pixels; :mod:`geowm.cube` does.

Rules (documented in the README):

* **Date**: STAC ``datetime`` (or ``start_datetime``), else the GeoTIFF tags ``ACQUISITION_DATETIME``
  then ``TIFFTAG_DATETIME``, else the file name (``YYYYMMDDTHHMMSS`` or ``YYYYMMDD``; the first match,
  which for Landsat product ids is the acquisition date).
* **Band names**: STAC ``eo:bands``/``bands`` names, else the GeoTIFF band descriptions, else the
  file-name suffix (``*_B2.TIF`` -> ``B2``), else ``band1``, ``band2``...
* **Grouping of a folder**: files whose names differ only by a band suffix form one scene
  (Landsat style, one file per band); a multi-band file is a scene of its own. A Landsat Level-1 product's
  metadata file beside its bands (``*_MTL.txt`` / ``.json`` / ``.xml``) gives their top-of-atmosphere rescaling.
  PlanetScope files of one ``<date>_<time>_<satellite>`` id are one scene: the analytic bands, masked by the udm2.
* **Sentinel-2 SAFE products** (a ``*.SAFE`` folder, or the ``.zip`` it is delivered in, read in place through
  GDAL's ``/vsizip/``): one scene per product, named by it, from the JPEG 2000 band files of ``IMG_DATA``,
  each band at its finest resolution (``R10m`` before ``R20m``); scale and offset from the product metadata
  (``MTD_MSIL2A.xml``: quantification value and, from processing baseline 04.00, ``BOA_ADD_OFFSET``), else
  from the processing baseline in the product name (``_N0400_``: offset -1000). An L1C product (no SCL) is
  masked by its granule's ``QI_DATA/MSK_CLASSI_B00.jp2`` cloud layers, or before baseline 04.00 by the cloud
  polygons of ``QI_DATA/MSK_CLOUDS_B00.gml``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from geowm.bands import band_number, common_name_of, sensor_of
from geowm.products import (
    CLASSI_FILE,
    KNOWN_BIT_MASKS,
    KNOWN_MASKS,
    PLANET_BANDS,
    PLANET_FILE,
    granule_cloud_mask,
    granule_of,
    is_granule_gml_mask,
    landsat_l1_scaling,
    mtl_band,
    planet_scaling,
    product_scaling,
    safe_root,
    safe_scaling,
)
from geowm.scene import (  # noqa: F401 (re-exported: discovery's records, for the modules that take scenes from it)
    NETCDF_SUFFIXES,
    BandRef,
    Scene,
    SourceError,
    is_url,
    is_vector_mask,
    local_file,
    netcdf_variable,
    says_lat_lon,
)
from geowm.stacsource import RASTER_SUFFIXES, StacSearch, scenes_from_stac, search_stac_api
from geowm.zarrcube import ZARR_SUFFIXES, is_zarr_store, scenes_from_zarr

ARCHIVE_SUFFIXES = (".zip",)  # read in place through GDAL's /vsizip/

# a band-like last token of a file stem: B2, B02, B8A, SR_B4, SCL, QA_PIXEL, Fmask, mask, cloud, red, nir08...
_BAND_SUFFIX = re.compile(
    r"(?:^|[_.])((?:SR_|ST_)?B\d{1,2}(?:A|_VCID_[12])?|SCL|QA(?:_[A-Z]+)?|BQA|FMASK|MASK|CLOUD(?:_?MASK)?"
    r"|COASTAL|BLUE|GREEN|RED|YELLOW|REDEDGE\d?|PAN|NIR(?:08|09)?|CIRRUS|SWIR(?:16|22)|LWIR(?:11|12)?)$",
    re.IGNORECASE
)
# auxiliary layers that products ship beside their bands, never read as bands: Landsat Collection 2 surface
# temperature intermediates, aerosol and saturation QA, angle bands (Landsat, HLS), Sentinel-2 L2A aerosol
# optical thickness, water vapour and true-colour preview
AUXILIARY = re.compile(
    r"(?:^|[_.])(?:ST_(?:ATRAN|CDIST|DRAD|EMIS|EMSD|QA|TRAD|URAD)|SR_QA_AEROSOL|QA_AEROSOL|QA_RADSAT|[SV][AZ]A|"
    r"AOT|WVP|VISUAL|TCI|THUMBNAIL|PREVIEW)$", re.IGNORECASE)
# a resolution token ending a file stem (Sentinel-2 L2A: T33UUP_20230601T100559_B04_10m)
_RESOLUTION = re.compile(r"_(\d{1,4})m$", re.IGNORECASE)
_DT_FULL = re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})(?!\d)")
_DT_DOY = re.compile(r"(?<!\d)(\d{4})(\d{3})T(\d{2})(\d{2})(\d{2})(?!\d)")  # HLS: year, day of year, time
_DT_DATE = re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)")
MAX_MASK_BIT = 31


# quality and auxiliary layers as bands of a multi-band file (a Google Earth Engine export of Sentinel-2 or Landsat:
# QA10, QA60, MSK_CLDPRB, TCI_R, AOT, SR_ATMOS_OPACITY, QA_RADSAT...): never chosen as data bands by default
_QUALITY_BAND = re.compile(r"^(?:QA\d*(?:_\w+)?|MSK_\w+|TCI_[RGB]|SR_ATMOS_OPACITY|SR_CLOUD_QA|UDM2?)$", re.IGNORECASE)


def is_auxiliary_band(name: str) -> bool:
    """Whether band ``name`` is a quality or auxiliary layer, not a measurement of the surface (a known mask band,
    ``QA60``, ``MSK_CLDPRB``, ``AOT``, ``TCI_R``, ``VZA``, ...)."""
    upper = name.upper()
    return upper in KNOWN_MASKS or upper in KNOWN_BIT_MASKS or bool(_QUALITY_BAND.match(name) or AUXILIARY.search(name))


def _runs(values: Iterable[int], shortest: int = 8) -> str:
    """Integers as comma-separated values, runs of ``shortest`` or more as ranges: 0..40 -> ``0-40``, 4..7 ->
    ``4,5,6,7`` (the forms ``--mask-clear`` reads)."""
    out, vals = [], sorted(set(values))
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out += [f"{vals[i]}-{vals[j]}"] if j - i + 1 >= shortest else [str(v) for v in vals[i: j + 1]]
        i = j + 1
    return ",".join(out)


def describe_mask_rule(rule: dict) -> str:
    """A mask rule as the cube records it (:func:`geowm.cube.ingest.mask_rule`), in words."""
    how = (f"flag bits {_runs(rule['bits'])} (clear where none is set)" if rule.get("bits")
           else f"clear values {_runs(rule['clear'])}")
    return f"{how}, buffer {rule['buffer_m']:g} m"


# ---------------------------------------------------------------- parsing helpers (pure, tested)


def parse_datetime_text(text: str) -> datetime | None:
    """Parse an ISO 8601 or EXIF-style ("YYYY:MM:DD HH:MM:SS") timestamp to aware UTC, else None."""
    text = text.strip()
    m = re.fullmatch(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})", text)
    if m:
        text = "{}-{}-{}T{}:{}:{}".format(*m.groups())
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def datetime_from_filename(name: str) -> datetime | None:
    """First ``YYYYMMDDTHHMMSS``, ``YYYYDDDTHHMMSS`` (day of year, as HLS names) or ``YYYYMMDD`` in a file
    name, as aware UTC; None if absent/invalid."""
    stem = Path(name).name
    planet = PLANET_FILE.match(Path(name).stem)
    if planet:
        try:
            return datetime(*map(int, planet.groups()[1:7]), tzinfo=UTC)
        except ValueError:
            pass
    m = _DT_FULL.search(stem)
    if m:
        try:
            return datetime(*map(int, m.groups()), tzinfo=UTC)
        except ValueError:
            pass
    m = _DT_DOY.search(stem)
    if m:
        year, doy, hh, mi, ss = map(int, m.groups())
        if 1 <= doy <= (366 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 365):
            return datetime(year, 1, 1, hh, mi, ss, tzinfo=UTC) + timedelta(days=doy - 1)
    for m in _DT_DATE.finditer(stem):
        try:
            return datetime(*map(int, m.groups()), tzinfo=UTC)
        except ValueError:
            continue
    return None


def band_from_filename(name: str) -> tuple[str, str | None]:
    """Split a file name into (scene key, band suffix or None): ``X_B2.TIF`` -> (``X``, ``B2``),
    ``HLS.L30.X.v2.0.Fmask.tif`` -> (``HLS.L30.X.v2.0``, ``Fmask``), ``X_B04_10m.jp2`` -> (``X``, ``B04``) (a
    resolution token after the band), ``red.tif`` -> ("", ``red``) (a file named by its band alone: its folder is
    the scene)."""
    stem = Path(name).stem
    planet = PLANET_FILE.match(stem)  # 20230601_101010_12_2461_3B_udm2_clip -> (20230601_101010_12_2461, udm2)
    if planet:
        return planet.group(1), planet.group(8)
    m = _BAND_SUFFIX.search(_RESOLUTION.sub("", stem))  # T33UUP_..._B04_10m: band B04 (at 10 m)
    if not m:
        return stem, None
    return stem[: m.start(1)].rstrip("_."), m.group(1)


def file_fingerprints(paths: Iterable[str], known: dict[str, list] | None = None,
                      memo: dict[str, list] | None = None) -> dict[str, list] | None:
    """``{path: [size, mtime_ns, sha256]}`` of local files (None if any is a URL); a file inside a zip archive
    (``/vsizip/``) has its archive's, a variable of a NetCDF datacube its file's. A file whose size and mtime
    equal its entry in ``known`` keeps that entry's SHA-256 unread (the rsync quick check). ``memo``: records
    already made (local file -> record), shared by the calls of one ingest so that a NetCDF datacube whose every
    time step is a scene is read once, not once per scene."""
    import hashlib
    import os

    out: dict[str, list] = {}
    done: dict[str, list] = {} if memo is None else memo  # local file -> its record (an archive: once for all)
    for p in paths:
        if "://" in p:
            return None
        local = local_file(p)
        if local not in done:
            st = os.stat(local)
            old = (known or {}).get(p)
            if old and old[:2] == [st.st_size, st.st_mtime_ns]:
                done[local] = old
            else:
                h = hashlib.sha256()
                with open(local, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                done[local] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        out[p] = done[local]
    return out


def scene_fingerprints(scene: Scene, known: dict[str, list] | None = None,
                       memo: dict[str, list] | None = None) -> dict[str, list] | None:
    """:func:`file_fingerprints` of a scene's files, except that a variable of a Zarr datacube is fingerprinted by
    the values of the scene's time step in it: appending dates to a store, or rewriting others, leaves the
    scenes it held as they were (a NetCDF file, written whole, is fingerprinted as a file). The values are read
    only where the objects holding them changed size or time since ``known``
    (:func:`geowm.zarrcube.step_fingerprint`)."""
    from geowm.zarrcube import step_fingerprint, zarr_ref

    refs = [*scene.bands.values(), *([scene.mask] if scene.mask else [])]
    steps = {r.path for r in refs if zarr_ref(r.path) is not None}
    out = file_fingerprints([f for f in scene.files if f not in steps], known, memo)
    if out is None:
        return None
    for path in sorted(steps):
        out[path] = step_fingerprint(path, sorted({r.index for r in refs if r.path == path}), (known or {}).get(path))
    return out


def source_crs(src, path: str):
    """The CRS of open dataset ``src`` (``path``): its own, else, for a NetCDF variable on CF latitude/longitude
    coordinates without a grid mapping (which GDAL leaves without one), EPSG:4326; None when neither."""
    if src.crs is not None:
        return src.crs
    if netcdf_variable(path) is None and not path.lower().endswith(NETCDF_SUFFIXES):
        return None
    tags = {k.lower(): str(v).strip().lower() for k, v in src.tags().items()}
    kinds = {v for k, v in tags.items() if k.endswith("#units") or k.endswith("#standard_name")}
    if says_lat_lon(kinds):
        from rasterio.crs import CRS

        return CRS.from_epsg(4326)
    return None


def natural_key(name: str) -> tuple:
    """Sort key putting B2 before B10 (digits compared as numbers)."""
    return tuple(int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name))


# ---------------------------------------------------------------- folders of GeoTIFFs



def _tiff_meta(path: str | Path) -> tuple[int, list[str | None], datetime | None, list[bool], list[bool]]:
    """Band count, band descriptions, the date of its tags (or None) and, per band, whether it has scale/offset
    tags and whether it is an alpha band (RGBA: the other bands' validity mask, not a band)."""
    import rasterio
    from rasterio.enums import ColorInterp

    try:
        with rasterio.open(path) as src:
            count = src.count
            descriptions = list(src.descriptions)
            tags = src.tags()
            tagged = [(s, o) != (1.0, 0.0) for s, o in zip(src.scales, src.offsets, strict=True)]
            alpha = [c == ColorInterp.alpha for c in src.colorinterp]
    except rasterio.errors.RasterioIOError as exc:
        raise SourceError(f"{path}: not a readable raster ({exc})") from None
    dt = None
    for key in ("ACQUISITION_DATETIME", "DATETIME_ORIGINAL", "TIFFTAG_DATETIME"):
        if tags.get(key):
            dt = parse_datetime_text(tags[key])
            if dt is None:
                raise SourceError(f"{path}: unparseable date in GeoTIFF tag {key}={tags[key]!r}")
            break
    return count, descriptions, dt, tagged, alpha


def _scenes_from_folder(folder: Path, mask_band: str | None) -> list[Scene]:
    from geowm.netcdf import is_netcdf, scenes_from_netcdf

    entries = sorted(folder.rglob("*"))
    stores = [p for p in entries if p.is_dir() and p.suffix.lower() in ZARR_SUFFIXES]
    found = [p for p in entries if p.is_file() and not any(s in p.parents for s in stores)]
    files = [str(p) for p in found if p.suffix.lower() in RASTER_SUFFIXES or is_granule_gml_mask(str(p))]
    unpacked = {Path(root).name for f in files if (root := safe_root(f)) is not None}
    for archive in (p for p in found if p.suffix.lower() in ARCHIVE_SUFFIXES):
        # a product unpacked beside its download is read from its folder, once
        files += [f for f in archive_rasters(archive) if Path(safe_root(f)).name not in unpacked]
    cubes = [s for p in found if is_netcdf(p) for s in scenes_from_netcdf(p, mask_band)]
    cubes += [s for p in stores if not any(o in p.parents for o in stores) for s in scenes_from_zarr(p, mask_band)]
    return (_scenes_from_files(files, mask_band, folder) if files or not cubes else []) + cubes


def _band_files(files: list[str]) -> list[str]:
    """``files`` less auxiliary layers and, inside a Sentinel-2 SAFE product, all but its ``IMG_DATA`` (quality
    masks and previews live beside it)."""
    out = []
    for f in files:
        root = safe_root(f)
        if AUXILIARY.search(_RESOLUTION.sub("", Path(f).stem)):
            continue
        if (planet := PLANET_FILE.match(Path(f).stem)) and planet.group(8).lower() in ("udm", "analyticms_dn_udm",
                                                                                    "visual"):
            continue  # PlanetScope's older usable-data mask (its udm2 is read) and RGB preview
        if root is None or "IMG_DATA" in Path(f).parts[len(Path(root).parts):]:
            out.append(f)
    return out


def archive_rasters(archive: Path) -> list[str]:
    """The raster files of the Sentinel-2 SAFE products inside a zip archive, as GDAL ``/vsizip/`` paths (other
    archives hold no scenes: [])."""
    import zipfile

    try:
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(f"{archive}: not a readable zip archive ({exc})") from None
    return [f"/vsizip/{archive.resolve()}/{n}" for n in names
            if (Path(n).suffix.lower() in RASTER_SUFFIXES and safe_root(n) is not None) or is_granule_gml_mask(n)]


def _file_resolution(path: str) -> float | None:
    """The resolution in metres a file's name states (``..._B04_10m.jp2``: 10), or None."""
    m = _RESOLUTION.search(Path(path).stem)
    return float(m.group(1)) if m else None


def _file_band_names(path: str, suffix: str | None, descriptions: list[str | None]) -> list[str | None]:
    """The names of a file's bands (None: a band not read): a PlanetScope udm2's clear map alone (``UDM2``),
    else the band descriptions, PlanetScope's band order, the file-name suffix (``_2``, ``_3``... after it in a
    multi-band file), else ``band1``, ``band2``..."""
    count, planet = len(descriptions), PLANET_FILE.match(Path(path).stem)
    if planet and planet.group(8).lower() == "udm2":  # its other bands (snow, shadow, haze, cloud...) are in it
        return ["UDM2"] + [None] * (count - 1)
    out: list[str | None] = []
    for i, desc in enumerate(descriptions, start=1):
        if desc:
            out.append(desc)
        elif planet and count in PLANET_BANDS:
            out.append(PLANET_BANDS[count][i - 1])
        elif suffix:
            out.append(suffix if count == 1 else f"{suffix}_{i}")
        else:
            out.append(f"band{i}")
    return out


def _stated_scaling(path: str, name: str, scene_id: str, safe: dict[str, tuple[float, float]] | None,
                    mtl: tuple[Path, dict[str, tuple[float, float]]] | None) -> tuple[float, float, bool] | None:
    """(scale, offset, own_scaling) of band ``name`` of ``path`` as its product states it where the file's tags do
    not: a SAFE product's metadata (``safe``), PlanetScope's published scales, a product convention
    (``PRODUCT_SCALING``), a Landsat Level-1 MTL file (``mtl``: the scene's own, by its sun elevation); else None."""
    if safe is not None:
        found = safe.get(band_number(name))
        return (*found, False) if found else None
    if (found := planet_scaling(path)) is not None:
        return (*found, False)
    if (found := product_scaling(scene_id, name)) is not None:
        return (*found, False)
    if (found := mtl_band(mtl, name, path)) is not None:
        return (*found, True)
    return None


def _scenes_from_files(found: list[str], mask_band: str | None, where: Path) -> list[Scene]:
    """Scenes of raster files (``found``: all of them; auxiliary layers and SAFE quality files are sorted out)."""
    files = _band_files(found)
    qi_masks: dict[tuple[str, str], dict[str, str]] = {}  # (product, granule) -> its cloud masks by band name
    for f in found:
        if (root := safe_root(f)) is not None:
            if CLASSI_FILE.match(Path(f).stem):
                qi_masks.setdefault(granule_of(f, root), {})["MSK_CLASSI"] = f
            elif is_granule_gml_mask(f):
                qi_masks.setdefault(granule_of(f, root), {})["MSK_CLOUDS"] = f
    if not files:
        raise SourceError(f"{where}: no raster files (*.tif, *.tiff, *.jp2, NetCDF datacubes *.nc, Zarr datacubes "
                          "*.zarr, or Sentinel-2 SAFE products in .zip archives) found")
    groups: dict[str, list[tuple[str, str | None]]] = {}
    for path in files:
        key, suffix = band_from_filename(path)  # key "": the file is named by its band alone
        root, parent = safe_root(path), str(Path(path).parent)
        if root is not None:  # a SAFE product: one scene per granule (band files share a stem across R10m, R20m)
            group = f"{root}/{key}"
        else:
            group = str(Path(parent) / key) if key else parent
        groups.setdefault(group, []).append((path, suffix))
    per_product: dict[str, int] = {}
    for group in groups:
        if (root := safe_root(group)) is not None:
            per_product[root] = per_product.get(root, 0) + 1
    scalings: dict[str, dict[str, tuple[float, float]]] = {}
    scenes = []
    for key, members in groups.items():
        root = safe_root(key)
        if root is not None:
            product = Path(root).name[: -len(".SAFE")]
            scene_id = product if per_product[root] == 1 else f"{product}_{Path(key).name}"
            if root not in scalings:
                scalings[root] = safe_scaling(root)
            mtl = None
        else:
            scene_id = Path(key).name
            mtl = landsat_l1_scaling(key, scene_id)
        bands: dict[str, BandRef] = {}
        dates: list[tuple[datetime, str]] = []
        for path, suffix in sorted(members, key=lambda m: _file_resolution(m[0]) or 0.0):  # finest first
            count, descriptions, dt, tagged, alpha = _tiff_meta(path)
            for i, name in enumerate(_file_band_names(path, suffix, descriptions), start=1):
                if name is None or alpha[i - 1]:  # an alpha band masks the others (the reader applies it)
                    continue
                if name in bands:
                    if _file_resolution(path) and _file_resolution(bands[name].path):
                        continue  # the band again at a coarser resolution (Sentinel-2 L2A's R20m, R60m)
                    raise SourceError(f"{path}: band {name!r} also found in {bands[name].path}")
                scaling = None if tagged[i - 1] else _stated_scaling(path, name, scene_id, scalings.get(root), mtl)
                bands[name] = BandRef(path, i, name, *(scaling or ()))
            if dt is None:
                dt = datetime_from_filename(Path(path).name)
            folder_named = root is None and key == str(Path(path).parent)
            if dt is None and folder_named:  # a file named by its band: its folder names the scene
                dt = datetime_from_filename(Path(path).parent.name)
            if dt is None:
                raise SourceError(
                    f"{path}: unparseable date: no STAC datetime, no ACQUISITION_DATETIME/TIFFTAG_DATETIME "
                    "tag and no YYYYMMDD or YYYYMMDDTHHMMSS in the file name"
                    + (" or its folder's" if folder_named else "")
                )
            dates.append((dt, path))
        days = {d.date() for d, _ in dates}
        if len(days) > 1:
            detail = ", ".join(f"{Path(p).name}={d.date()}" for d, p in dates)
            raise SourceError(f"{key}: files of one scene carry different dates ({detail})")
        scene = Scene(scene_id, min(d for d, _ in dates), bands, origin=key)
        if (flag := granule_cloud_mask(qi_masks.get(granule_of(members[0][0], root), {}) if root else {},
                                        bands, mask_band)) is not None:
            bands[flag.name] = flag
        scenes.append(with_mask(name_bands(scene, sensor_of(scene.id, bands=list(bands))), mask_band))
    return scenes


# ---------------------------------------------------------------- entry point


def name_bands(scene: Scene, sensor: str | None) -> Scene:
    """Fill in the common names ``scene`` does not have yet (STAC gives some) from band names and the sensor."""
    for name in scene.bands:
        if name not in scene.common_names and (cn := common_name_of(name, sensor)):
            scene.common_names[name] = cn
    return scene


def scenes_by_time(path: Path, by_time: dict[datetime, dict[str, BandRef]], mask_band: str | None) -> list[Scene]:
    """The scenes of a datacube (a NetCDF file, a Zarr store), one per time step (``by_time``: its bands at each):
    ``<stem>_<YYYYMMDDTHHMMSS>``, with common names and mask found as for files."""
    if not by_time:
        raise SourceError(f"{path}: no variable with a time dimension and y, x (a CF time coordinate, units "
                          "'<unit> since <date>')")
    scenes = []
    for when, bands in sorted(by_time.items()):
        sid = f"{path.stem}_{when:%Y%m%dT%H%M%S}"
        scene = Scene(sid, when, dict(sorted(bands.items())), origin=str(path))
        scenes.append(with_mask(name_bands(scene, sensor_of(sid, bands=list(bands))), mask_band))
    return scenes


def with_mask(scene: Scene, mask_band: str | None) -> Scene:
    """Move the mask band out of ``scene.bands``: the named one, or a known one (``KNOWN_MASKS``, then
    ``KNOWN_BIT_MASKS``: SCL, UDM2, QA_PIXEL, Fmask, BQA, MSK_CLASSI, MSK_CLOUDS, QA60) if present, with its known
    rule."""
    lookup = {n.upper(): n for n in scene.bands}
    if mask_band:
        name = lookup.get(mask_band.upper())
        if name is None:
            raise SourceError(
                f"{scene.origin}: mask band {mask_band!r} not found (bands: {', '.join(sorted(scene.bands))})"
            )
    else:
        name = next((lookup[k] for k in (*KNOWN_MASKS, *KNOWN_BIT_MASKS) if k in lookup), None)
    if name is not None:
        scene.mask = scene.bands.pop(name)
        scene.common_names.pop(name, None)
        scene.mask_clear = KNOWN_MASKS.get(name.upper(), frozenset())
        scene.mask_bits = KNOWN_BIT_MASKS.get(name.upper(), frozenset())
    return scene


def check_band_names(names: Iterable[str], where: str | Path) -> list[str]:
    """``--band-names`` as a list: distinct (case aside), non-empty; else :class:`SourceError`."""
    out = [str(n).strip() for n in names]
    if not out or not all(out) or len({n.upper() for n in out}) != len(out):
        raise SourceError(f"{where}: --band-names {','.join(out)!r}: give one distinct, non-empty name per band")
    return out


def is_unnamed(scene: Scene) -> bool:
    """Whether the bands of ``scene`` carry no names of their own (``band1``, ``band2``... in file order)."""
    refs = sorted([*scene.bands.values(), *([scene.mask] if scene.mask else [])], key=lambda r: r.index)
    return all(r.name == f"band{i}" for i, r in enumerate(refs, start=1))


def assign_band_names(scene: Scene, names: Sequence[str], mask_band: str | None = None) -> Scene:
    """Name the bands of a scene that one multi-band file holds by ``names``, in the file's band order
    (``--band-names``: a stack whose bands carry no descriptions, or carry others). Common names follow from the
    new names (``red``, ``nir``; ``B4`` of a sensor the scene id tells) and the mask from them (``mask_band``, else
    a known mask band such as ``SCL``). A scene of several files, or a file of another band count, is refused
    naming it."""
    refs = [*scene.bands.values(), *([scene.mask] if scene.mask else [])]
    files = sorted({r.path for r in refs})
    if len(files) != 1:
        raise SourceError(f"{scene.origin or files[0]}: --band-names names the bands of a multi-band file, but scene "
                          f"{scene.id!r} is {len(files)} files (one per band, named by their file names)")
    if len(refs) != len(names):
        raise SourceError(f"{files[0]}: {len(refs)} bands, but --band-names gives {len(names)} names "
                          f"({', '.join(names)})")
    in_order = sorted(refs, key=lambda r: r.index)  # a file's bands (a NetCDF time step's: its band dimension)
    scene.bands = {n: replace(r, name=n) for r, n in zip(in_order, names, strict=True)}
    scene.mask, scene.mask_clear, scene.mask_bits, scene.common_names = None, frozenset(), frozenset(), {}
    return with_mask(name_bands(scene, sensor_of(scene.id, bands=list(scene.bands))), mask_band)


def set_mask_rule(scene: Scene, mask_clear: Iterable[int] | None, mask_bits: Iterable[int] | None) -> None:
    """Read ``scene``'s mask by the clear values or the flag bits given (None: keep its rule)."""
    if scene.mask is not None and mask_clear is not None:
        scene.mask_clear, scene.mask_bits = frozenset(int(v) for v in mask_clear), frozenset()
    if scene.mask is not None and mask_bits is not None:
        scene.mask_clear, scene.mask_bits = frozenset(), frozenset(int(b) for b in mask_bits)


def discover(source: str | Path, mask_band: str | None = None, mask_clear: Iterable[int] | None = None,
             mask_bits: Iterable[int] | None = None, band_names: Iterable[str] | None = None,
             search: StacSearch | None = None) -> list[Scene]:
    """Find the scenes of a folder of rasters (GeoTIFF, JPEG 2000, Sentinel-2 SAFE products unpacked or in their
    .zip), of one SAFE .zip, of a NetCDF or Zarr datacube, of a STAC catalog/collection/item/item collection
    (a local file or a URL: :mod:`geowm.stacsource`), or, with ``search``, of the items a STAC API at ``source``
    (its landing page URL) returns for that search.

    ``mask_band`` names the quality band (default: SCL, UDM2, QA_PIXEL, Fmask, BQA, MSK_CLASSI, MSK_CLOUDS or QA60
    if present). It is read by value or bit by bit: ``mask_clear`` gives the values meaning "clear" (default for
    SCL: 4, 5, 6, 7, snow masked), ``mask_bits`` the bits (0 = least significant) that flag a pixel as not clear
    (default for Landsat Collection 2 QA_PIXEL: 0-5, fill, dilated cloud, cirrus, cloud, shadow, snow; for HLS
    Fmask: 1-4, cloud, adjacent, shadow, snow; for Collection 1 BQA: 0, 1, 4, 6, 8, 10, 12); one of the two is
    required for other mask bands, not both. ``band_names`` names the bands of every scene, each a multi-band file,
    in file order (:func:`assign_band_names`).
    Scenes come back sorted by (datetime, id). Raises :class:`SourceError` on bad input.
    """
    if mask_clear is not None and mask_bits is not None:
        raise SourceError(f"{source}: give the mask's clear values (--mask-clear) or its flag bits (--mask-bits), "
                          "not both")
    bits = None if mask_bits is None else frozenset(int(b) for b in mask_bits)
    if bits is not None and (not bits or min(bits) < 0 or max(bits) > MAX_MASK_BIT):
        raise SourceError(f"{source}: mask bits {sorted(bits)}: give bit numbers from 0 (least significant) to "
                          f"{MAX_MASK_BIT}")
    path = Path(source)
    names = None if band_names is None else check_band_names(band_names, source)
    found_mask = None if names else mask_band  # with new names, the mask is looked for among them
    if search is not None:
        if not is_url(source):
            raise SourceError(f"{source}: a STAC API search (--collection) needs the API's URL "
                              "(https://.../v1), not a local path")
        scenes = search_stac_api(str(source), search, found_mask)
    elif is_url(source):
        scenes = scenes_from_stac(str(source), found_mask)
    elif not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    elif is_zarr_store(path):
        scenes = scenes_from_zarr(path, found_mask)
    elif path.is_dir():
        scenes = _scenes_from_folder(path, found_mask)
    elif path.suffix.lower() == ".json":
        scenes = scenes_from_stac(path, found_mask)
    elif path.suffix.lower() in NETCDF_SUFFIXES:
        from geowm.netcdf import scenes_from_netcdf

        scenes = scenes_from_netcdf(path, found_mask)
    elif path.suffix.lower() in RASTER_SUFFIXES:
        scenes = [s for s in _scenes_from_folder(path.parent, found_mask)
                  if path.name.startswith(s.id) or str(path) in s.files]
    elif path.suffix.lower() in ARCHIVE_SUFFIXES:
        files = archive_rasters(path)
        if not files:
            raise SourceError(f"{path}: no Sentinel-2 SAFE product (a *.SAFE folder of band files) in this archive")
        scenes = _scenes_from_files(files, found_mask, path)
    else:
        raise SourceError(f"{path}: expected a folder of GeoTIFFs, a .tif or .jp2 file, a Sentinel-2 SAFE .zip, a "
                          "NetCDF (.nc) or Zarr (.zarr) datacube, or a STAC .json file or URL")
    for s in scenes:
        if names:
            assign_band_names(s, names, mask_band)
        set_mask_rule(s, mask_clear, bits)
        if s.mask is not None and not s.mask_clear and not s.mask_bits:
            raise SourceError(
                f"{s.mask.path}: mask band {s.mask.name!r} has no known rule; pass its clear values (--mask-clear) "
                "or the bits that flag cloud, shadow, ... (--mask-bits)"
            )
        if not s.bands:
            raise SourceError(f"{s.origin}: scene {s.id!r} has no data bands besides its mask")
    return sorted(scenes, key=lambda s: (s.datetime, s.id))
