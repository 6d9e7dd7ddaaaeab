"""Scene discovery: a folder of GeoTIFF/COG files or a STAC catalog/collection/item -> Scene records.

A :class:`Scene` is one acquisition footprint: its date, the files and band indexes that hold each
band, and optionally a quality/cloud mask band. Nothing here reads pixels; :mod:`geowm.cube` does.

Rules (documented in the README):

* **Date**: STAC ``datetime`` (or ``start_datetime``), else the GeoTIFF tags ``ACQUISITION_DATETIME``
  then ``TIFFTAG_DATETIME``, else the file name (``YYYYMMDDTHHMMSS`` or ``YYYYMMDD``; the first match,
  which for Landsat product ids is the acquisition date).
* **Band names**: STAC ``eo:bands``/``bands`` names, else the GeoTIFF band descriptions, else the
  file-name suffix (``*_B2.TIF`` -> ``B2``), else ``band1``, ``band2``...
* **Grouping of a folder**: files whose names differ only by a band suffix form one scene
  (Landsat style, one file per band); a multi-band file is a scene of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

RASTER_SUFFIXES = (".tif", ".tiff")
RASTER_MEDIA_HINTS = ("image/tiff", "image/geotiff", "application=geotiff", "cloud-optimized")

# a band-like last token of a file stem: B2, B02, B8A, SR_B4, SCL, QA_PIXEL, Fmask, mask, cloud...
_BAND_SUFFIX = re.compile(
    r"(?:^|_)((?:SR_|ST_)?B\d{1,2}A?|SCL|QA(?:_[A-Z]+)?|BQA|FMASK|MASK|CLOUD(?:_?MASK)?)$", re.IGNORECASE
)
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")  # STAC item ids become folder and file names in the catalog
_DT_FULL = re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})(?!\d)")
_DT_DATE = re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)")

# mask bands recognised without --mask-band, and which of their values mean "clear observation"
KNOWN_MASKS: dict[str, frozenset[int]] = {
    # Sentinel-2 L2A: vegetation, not vegetated, water, unclassified. Unclassified (7) holds cloud edges and thin
    # cloud too: --mask-clear 4,5,6 masks it (better NDVI forecasts on one held-out region, worse detection on
    # another: README, "Held-out evaluation"). Snow (11) is masked like cloud, as vegetation and disturbance
    # products do (a snow cover says nothing about the land cover under it and is weather, not a change of
    # state); pass --mask-clear 4,5,6,7,11 to keep it.
    "SCL": frozenset({4, 5, 6, 7}),
}


class SourceError(ValueError):
    """Bad input: the message names the file (or STAC document) and the problem."""


@dataclass(frozen=True)
class BandRef:
    """One band of one file: ``path`` and 1-based ``index`` inside it, under the cube band ``name``."""

    path: str
    index: int
    name: str


@dataclass
class Scene:
    """One acquisition footprint.

    ``datetime`` is timezone-aware UTC. ``bands`` maps band name -> BandRef; ``mask`` is the quality
    band (or None) with ``mask_clear`` the set of its values that mean a clear observation.
    ``id`` is stable across runs (STAC item id, or the shared file-name stem).
    """

    id: str
    datetime: datetime
    bands: dict[str, BandRef]
    mask: BandRef | None = None
    mask_clear: frozenset[int] = field(default_factory=frozenset)
    origin: str = ""  # the STAC document or file the scene came from, for messages

    @property
    def files(self) -> list[str]:
        refs = list(self.bands.values()) + ([self.mask] if self.mask else [])
        return sorted({r.path for r in refs})


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
    """First ``YYYYMMDDTHHMMSS`` or ``YYYYMMDD`` in a file name, as aware UTC; None if absent/invalid."""
    stem = Path(name).name
    m = _DT_FULL.search(stem)
    if m:
        try:
            return datetime(*map(int, m.groups()), tzinfo=UTC)
        except ValueError:
            pass
    for m in _DT_DATE.finditer(stem):
        try:
            return datetime(*map(int, m.groups()), tzinfo=UTC)
        except ValueError:
            continue
    return None


def band_from_filename(name: str) -> tuple[str, str | None]:
    """Split a file name into (scene key, band suffix or None): ``X_B2.TIF`` -> (``X``, ``B2``)."""
    stem = Path(name).stem
    m = _BAND_SUFFIX.search(stem)
    if not m or m.start(1) == 0:
        return stem, None
    return stem[: m.start(1)].rstrip("_"), m.group(1)


def file_fingerprints(paths: Iterable[str], known: dict[str, list] | None = None) -> dict[str, list] | None:
    """``{path: [size, mtime_ns, sha256]}`` of local files (None if any is a URL). A file whose size and
    mtime equal its entry in ``known`` keeps that entry's SHA-256 unread (the rsync quick check)."""
    import hashlib
    import os

    out = {}
    for p in paths:
        if "://" in p:
            return None
        st = os.stat(p)
        old = (known or {}).get(p)
        if old and old[:2] == [st.st_size, st.st_mtime_ns]:
            out[p] = old
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        out[p] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    return out


def natural_key(name: str) -> tuple:
    """Sort key putting B2 before B10 (digits compared as numbers)."""
    return tuple(int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name))


# ---------------------------------------------------------------- folders of GeoTIFFs


def _tiff_meta(path: Path) -> tuple[int, list[str | None], datetime | None]:
    import rasterio

    try:
        with rasterio.open(path) as src:
            count = src.count
            descriptions = list(src.descriptions)
            tags = src.tags()
    except rasterio.errors.RasterioIOError as exc:
        raise SourceError(f"{path}: not a readable raster ({exc})") from None
    dt = None
    for key in ("ACQUISITION_DATETIME", "DATETIME_ORIGINAL", "TIFFTAG_DATETIME"):
        if tags.get(key):
            dt = parse_datetime_text(tags[key])
            if dt is None:
                raise SourceError(f"{path}: unparseable date in GeoTIFF tag {key}={tags[key]!r}")
            break
    return count, descriptions, dt


def _scenes_from_folder(folder: Path, mask_band: str | None) -> list[Scene]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES)
    if not files:
        raise SourceError(f"{folder}: no GeoTIFF files (*.tif, *.tiff) found")
    groups: dict[str, list[tuple[Path, str | None]]] = {}
    for path in files:
        key, suffix = band_from_filename(path.name)
        groups.setdefault(str(path.parent / key), []).append((path, suffix))
    scenes = []
    for key, members in groups.items():
        bands: dict[str, BandRef] = {}
        dates: list[tuple[datetime, Path]] = []
        for path, suffix in members:
            count, descriptions, dt = _tiff_meta(path)
            for i in range(1, count + 1):
                desc = descriptions[i - 1]
                if desc:
                    name = desc
                elif suffix and count == 1:
                    name = suffix
                elif suffix:
                    name = f"{suffix}_{i}"
                else:
                    name = f"band{i}"
                if name in bands:
                    raise SourceError(f"{path}: band {name!r} also found in {bands[name].path}")
                bands[name] = BandRef(str(path), i, name)
            if dt is None:
                dt = datetime_from_filename(path.name)
            if dt is None:
                raise SourceError(
                    f"{path}: unparseable date: no STAC datetime, no ACQUISITION_DATETIME/TIFFTAG_DATETIME "
                    "tag and no YYYYMMDD or YYYYMMDDTHHMMSS in the file name"
                )
            dates.append((dt, path))
        days = {d.date() for d, _ in dates}
        if len(days) > 1:
            detail = ", ".join(f"{p.name}={d.date()}" for d, p in dates)
            raise SourceError(f"{key}: files of one scene carry different dates ({detail})")
        scenes.append(_with_mask(Scene(Path(key).name, min(d for d, _ in dates), bands, origin=key), mask_band))
    return scenes


# ---------------------------------------------------------------- STAC


def _is_raster_asset(asset) -> bool:
    media = (asset.media_type or "").lower()
    if media:
        return any(h in media for h in RASTER_MEDIA_HINTS)
    return asset.href.lower().endswith(RASTER_SUFFIXES)


def _asset_band_names(asset) -> list[str] | None:
    fields = asset.extra_fields
    bands = fields.get("eo:bands") or fields.get("bands")
    if bands:
        return [b.get("name") for b in bands]
    return None


def _scene_from_item(item, mask_band: str | None, doc: str) -> Scene:
    import rasterio

    if not _SAFE_ID.fullmatch(item.id or "") or set(item.id) == {"."}:
        raise SourceError(f"{doc}: STAC item id {item.id!r} is not a safe name (letters, digits, '.', '_', '-' "
                          "only; it becomes a file name in the geowm catalog)")
    dt = item.datetime or item.common_metadata.start_datetime
    if dt is None:
        raise SourceError(f"{doc}: STAC item {item.id!r} has neither datetime nor start_datetime")
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    bands: dict[str, BandRef] = {}
    for key, asset in sorted(item.assets.items()):
        if not _is_raster_asset(asset):
            continue
        href = asset.get_absolute_href() or asset.href
        if "://" in href and not href.startswith("file://"):
            path = href  # a URL: rasterio/GDAL reads it through its virtual file systems
        else:
            path = href.removeprefix("file://")
            if not Path(path).is_file():
                raise SourceError(f"{doc}: STAC item {item.id!r} asset {key!r} points at a missing file {path}")
        names = _asset_band_names(asset)
        if names is None:
            try:
                with rasterio.open(path) as src:
                    descriptions = list(src.descriptions)
            except rasterio.errors.RasterioIOError as exc:
                raise SourceError(f"{path}: not a readable raster (STAC item {item.id!r}: {exc})") from None
            names = [d or (key if len(descriptions) == 1 else f"{key}_{i + 1}") for i, d in
                     enumerate(descriptions)]
        for i, name in enumerate(names, start=1):
            if not name:
                raise SourceError(f"{doc}: STAC item {item.id!r} asset {key!r} band {i} has no name")
            bands[name] = BandRef(path, i, name)
    if not bands:
        raise SourceError(f"{doc}: STAC item {item.id!r} has no GeoTIFF/COG asset")
    return _with_mask(Scene(item.id, dt, bands, origin=doc), mask_band)


def _scenes_from_stac(path: Path, mask_band: str | None) -> list[Scene]:
    import pystac

    try:
        json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: invalid STAC JSON ({exc})") from None
    try:
        obj = pystac.read_file(str(path))
    except Exception as exc:  # pystac raises several types for malformed documents
        raise SourceError(f"{path}: invalid STAC document ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, pystac.Item):
        items: Iterable = [obj]
    elif isinstance(obj, pystac.Catalog):  # also Collection
        try:
            items = list(obj.get_items(recursive=True))
        except Exception as exc:
            raise SourceError(f"{path}: cannot read the items of this STAC catalog ({exc})") from None
    else:
        raise SourceError(f"{path}: a STAC catalog, collection or item was expected, got {type(obj).__name__}")
    scenes = [_scene_from_item(it, mask_band, str(path)) for it in items]
    if not scenes:
        raise SourceError(f"{path}: the STAC catalog holds no items")
    return scenes


# ---------------------------------------------------------------- entry point


def _with_mask(scene: Scene, mask_band: str | None) -> Scene:
    """Move the mask band out of ``scene.bands``: the named one, or a known one (SCL) if present."""
    lookup = {n.upper(): n for n in scene.bands}
    if mask_band:
        name = lookup.get(mask_band.upper())
        if name is None:
            raise SourceError(
                f"{scene.origin}: mask band {mask_band!r} not found (bands: {', '.join(sorted(scene.bands))})"
            )
    else:
        name = next((lookup[k] for k in KNOWN_MASKS if k in lookup), None)
    if name is not None:
        scene.mask = scene.bands.pop(name)
        scene.mask_clear = KNOWN_MASKS.get(name.upper(), frozenset())
    return scene


def discover(source: str | Path, mask_band: str | None = None,
             mask_clear: Iterable[int] | None = None) -> list[Scene]:
    """Find the scenes of a folder of GeoTIFFs or of a STAC catalog/collection/item JSON file.

    ``mask_band`` names the quality band (default: SCL if present); ``mask_clear`` gives the mask
    values meaning "clear" (default for SCL: 4, 5, 6, 7, snow masked; required for other mask bands).
    Scenes come back sorted by (datetime, id). Raises :class:`SourceError` on bad input.
    """
    path = Path(source)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.is_dir():
        scenes = _scenes_from_folder(path, mask_band)
    elif path.suffix.lower() == ".json":
        scenes = _scenes_from_stac(path, mask_band)
    elif path.suffix.lower() in RASTER_SUFFIXES:
        scenes = [s for s in _scenes_from_folder(path.parent, mask_band) if path.name.startswith(s.id)]
    else:
        raise SourceError(f"{path}: expected a folder of GeoTIFFs, a .tif file or a STAC .json file")
    for s in scenes:
        if s.mask is not None and mask_clear is not None:
            s.mask_clear = frozenset(int(v) for v in mask_clear)
        if s.mask is not None and not s.mask_clear:
            raise SourceError(
                f"{s.mask.path}: mask band {s.mask.name!r} has no known clear values; pass --mask-clear"
            )
        if not s.bands:
            raise SourceError(f"{s.origin}: scene {s.id!r} has no data bands besides its mask")
    return sorted(scenes, key=lambda s: (s.datetime, s.id))
