"""Product conventions: how the products of each mission are named, scaled and masked, where their files do not
say so themselves.

* **Sentinel-2 SAFE** products: the product folder of a file, the scale and offset of its bands from the product
  metadata (``MTD_MSIL2A.xml`` / ``MTD_MSIL1C.xml``) or the processing baseline in its name, and an L1C granule's
  cloud mask (``QI_DATA/MSK_CLASSI_B00.jp2``, or before baseline 04.00 the polygons of ``MSK_CLOUDS_B00.gml``);
  the same baseline rule for STAC items that state ``s2:processing_baseline``.
* **Landsat**: Collection 2 Level-2's published scale and offset; a Level-1 product's top-of-atmosphere rescaling
  from the metadata file beside its bands (``_MTL.txt`` / ``.json`` / ``.xml``).
* **PlanetScope**: the names of its scene files, its band order and scales.
* **Quality bands** known by name (``SCL``, ``UDM2``, ``QA_PIXEL``, ``Fmask``, ``BQA``, ``MSK_CLASSI``,
  ``MSK_CLOUDS``, ``QA60``) and the values or bits of each that mean a clear observation.

:mod:`geowm.sources` finds the files and applies these rules; nothing here reads pixels.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from geowm.bands import band_number, sensor_of
from geowm.scene import VSIZIP_PATH, BandRef, SourceError, is_vector_mask

_S2_BASELINE = re.compile(r"_N(\d{2})(\d{2})_")  # processing baseline in a Sentinel-2 product name: _N0400_
S2_QUANTIFICATION = 10000.0  # Sentinel-2 L1C/L2A: reflectance = (value + offset) / 10000
S2_OFFSET_FROM = (4, 0)  # processing baseline 04.00 (25 January 2022) added an offset of -1000 to every band
S2_OFFSET = -1000.0
_S2_BAND_IDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")  # MTD band_id
_IN_SAFE = re.compile(r"^(.*\.SAFE)(?:[/\\]|$)", re.IGNORECASE)  # the last *.SAFE folder of a path

# PlanetScope ortho scene files: <YYYYMMDD_HHMMSS[_NN]_<satellite>>_3B_<asset>[_harmonized][_clip]: the analytic
# bands (AnalyticMS_SR: surface reflectance x 10000; AnalyticMS: radiance x 100; _8b: SuperDove's 8 bands), the
# usable-data mask udm2, and the older udm and the Visual RGB image (not read)
PLANET_FILE = re.compile(r"^((\d{4})(\d{2})(\d{2})_(\d{2})(\d{2})(\d{2})(?:_\d{2})?_[0-9a-f]{4})_[13]B_"
                     r"(AnalyticMS(?:_SR)?(?:_8b)?|udm2|AnalyticMS_DN_udm|udm|Visual)(?:_harmonized)?(?:_clip)?$",
                     re.IGNORECASE)
PLANET_BANDS = {4: ("blue", "green", "red", "nir"),
                8: ("coastal", "blue", "green_i", "green", "yellow", "red", "rededge", "nir")}

# mask bands recognised without --mask-band, and which of their values mean "clear observation"
KNOWN_MASKS: dict[str, frozenset[int]] = {
    # Sentinel-2 L2A: vegetation, not vegetated, water, unclassified. Unclassified (7) holds cloud edges and thin
    # cloud too: --mask-clear 4,5,6 masks it (better NDVI forecasts on one held-out region, worse detection on
    # another: README, "Held-out evaluation"). Snow (11) is masked like cloud, as vegetation and disturbance
    # products do (a snow cover says nothing about the land cover under it and is weather, not a change of
    # state); pass --mask-clear 4,5,6,7,11 to keep it.
    "SCL": frozenset({4, 5, 6, 7}),
    # PlanetScope udm2's first band, its clear map: 1 clear (no cloud, shadow, haze or snow), 0 not
    "UDM2": frozenset({1}),
}
# quality bands read bit by bit, and which of their bits flag a pixel as not clear (clear: none of them set)
KNOWN_BIT_MASKS: dict[str, frozenset[int]] = {
    # Landsat Collection 2 QA_PIXEL (Level-1 and Level-2): 0 fill, 1 dilated cloud, 2 cirrus, 3 cloud,
    # 4 cloud shadow, 5 snow (masked as SCL's snow is); 6 clear and 7 water are kept
    "QA_PIXEL": frozenset({0, 1, 2, 3, 4, 5}),
    # HLS v2 Fmask: 1 cloud, 2 adjacent to cloud or shadow, 3 cloud shadow, 4 snow/ice; 5 water and the
    # aerosol level (6-7) are kept (--mask-bits 1,2,3,4,7 also masks moderate and high aerosol)
    "FMASK": frozenset({1, 2, 3, 4}),
    # Landsat Collection 1 Level-1 BQA (OLI and TM/ETM+): 0 fill, 1 terrain occlusion (TM/ETM+: dropped pixel),
    # 4 cloud; the high bit of each two-bit confidence (medium or high): 6 cloud, 8 cloud shadow, 10 snow/ice,
    # 12 cirrus (OLI; unused on TM/ETM+). Radiometric saturation (2-3) and low confidences are kept.
    "BQA": frozenset({0, 1, 4, 6, 8, 10, 12}),
    # Sentinel-2 L1C from processing baseline 04.00 (QI_DATA/MSK_CLASSI_B00.jp2, 60 m): three 0/1 layers read as
    # bits 0 opaque cloud, 1 cirrus, 2 snow/ice (a granule's mask where the product has no SCL)
    "MSK_CLASSI": frozenset({0, 1, 2}),
    # Sentinel-2 L1C before baseline 04.00 (QI_DATA/MSK_CLOUDS_B00.gml): polygons of type OPAQUE and CIRRUS,
    # burnt into bits 0 and 1 as MSK_CLASSI's (geowm.cube.vector_mask)
    "MSK_CLOUDS": frozenset({0, 1}),
    # Sentinel-2 QA60 (60 m, as Google Earth Engine exports it): 10 opaque cloud, 11 cirrus
    "QA60": frozenset({10, 11}),
}
CLASSI_FILE = re.compile(r"^MSK_CLASSI_B00$", re.IGNORECASE)
# Sentinel-2 L1C before processing baseline 04.00: the granule's cloud polygons, QI_DATA/MSK_CLOUDS_B00.gml (and
# S2A_OPER_MSK_CLOUDS_<...>_B00_MSIL1C.gml in the products of 2015-2016)
_CLOUDS_GML = re.compile(r"^(?:S2[A-D]_OPER_)?MSK_CLOUDS_(?:\w+_)?B00(?:_MSIL1C)?$", re.IGNORECASE)


def planet_scaling(path: str) -> tuple[float, float] | None:
    """(scale, offset) of a PlanetScope analytic file's values: surface reflectance x 10000 (``AnalyticMS_SR``),
    radiance x 100 (``AnalyticMS``); None for other files."""
    planet = PLANET_FILE.match(Path(path).stem)
    if planet and planet.group(8).lower().startswith("analyticms"):
        return (1e-4, 0.0) if "_SR" in planet.group(8).upper() else (0.01, 0.0)
    return None


# ---------------------------------------------------------------- Landsat


# the published scale and offset of products whose GeoTIFFs do not carry them: (scene id, band) patterns
PRODUCT_SCALING = (
    # Landsat Collection 2 Level-2: surface reflectance, and surface temperature in kelvin
    (re.compile(r"^L[COTE]0?\d_L2S[PR]_", re.I), re.compile(r"^SR_B\d+$", re.I), 2.75e-5, -0.2),
    (re.compile(r"^L[COTE]0?\d_L2S[PR]_", re.I), re.compile(r"^ST_B\d+$", re.I), 0.00341802, 149.0),
)


def product_scaling(scene_id: str, band: str) -> tuple[float, float] | None:
    """(scale, offset) of ``band`` by its product's published convention, or None."""
    for scene_re, band_re, scale, offset in PRODUCT_SCALING:
        if scene_re.search(scene_id) and band_re.match(band):
            return scale, offset
    return None


# Landsat Level-1 products (Collection 1 and 2) and their metadata files beside the band files
_LANDSAT_L1 = re.compile(r"^L[COTEM]0?\d_L1(?:TP|GT|GS)_", re.I)
MTL_SUFFIXES = ("_MTL.txt", "_MTL.json", "_MTL.xml")
_MTL_BAND = re.compile(r"B0*(\d{1,2})((?:_VCID_[12])?)", re.I)  # B4 -> "4", B6_VCID_1 -> "6_VCID_1"


def _mtl_groups(path: Path) -> dict[str, dict[str, str]]:
    """The ``KEY = value`` pairs of a Landsat metadata file (``_MTL.txt`` ODL, ``_MTL.json`` or ``_MTL.xml``), by
    the name of the group that holds them."""
    from xml.etree import ElementTree

    text = path.read_text(errors="replace")
    out: dict[str, dict[str, str]] = {}
    if path.suffix.lower() == ".json":
        def walk(obj, group):
            for k, v in obj.items():
                if isinstance(v, dict):
                    walk(v, k)
                else:
                    out.setdefault(group, {})[k] = str(v)
        walk(json.loads(text), "")
    elif path.suffix.lower() == ".xml":
        def visit(el, group):
            for child in el:
                if len(child):
                    visit(child, child.tag)
                else:
                    out.setdefault(group, {})[child.tag] = (child.text or "").strip()
        visit(ElementTree.fromstring(text), "")
    else:
        stack = [""]
        for line in text.splitlines():
            key, eq, value = (p.strip() for p in line.partition("="))
            if not eq:
                continue
            if key == "GROUP":
                stack.append(value)
            elif key == "END_GROUP":
                stack.pop() if len(stack) > 1 else None
            else:
                out.setdefault(stack[-1], {})[key] = value.strip('"')
    return out


def landsat_mtl_scaling(path: str | Path) -> dict[str, tuple[float, float]]:
    """Per band (``B4``, ``B6_VCID_1``), the (scale, offset) USGS gives a Landsat Level-1 product's values in its
    metadata file (Collection 1 ``RADIOMETRIC_RESCALING``, Collection 2 ``LEVEL1_RADIOMETRIC_RESCALING``):
    ``REFLECTANCE_MULT_BAND_n`` / ``REFLECTANCE_ADD_BAND_n`` divided by the sine of ``SUN_ELEVATION``
    (top-of-atmosphere reflectance, as USGS defines it) where given, else ``RADIANCE_MULT`` / ``RADIANCE_ADD``
    (thermal bands: radiance). A file that cannot be read, or holds no rescaling, no sun elevation for its
    reflectance or a value that is not a finite number, is refused."""
    from xml.etree import ElementTree

    path = Path(path)
    try:
        groups = _mtl_groups(path)
    except (OSError, json.JSONDecodeError, ElementTree.ParseError, AttributeError) as exc:
        raise SourceError(f"{path}: unreadable Landsat metadata file ({exc})") from None
    values = {k: v for g, kv in groups.items() if g.upper().endswith("RADIOMETRIC_RESCALING") for k, v in kv.items()}
    sun = next((kv["SUN_ELEVATION"] for kv in groups.values() if "SUN_ELEVATION" in kv), None)
    out: dict[str, tuple[float, float]] = {}
    for kind in ("RADIANCE", "REFLECTANCE"):  # reflectance, where given, over radiance
        for key, text in values.items():
            m = re.fullmatch(kind + r"_MULT_BAND_(\w+)", key, re.I)
            if m is None:
                continue
            add_key = f"{kind}_ADD_BAND_{m.group(1)}"
            try:
                scale, offset = float(text), float(values[add_key])
            except KeyError:
                raise SourceError(f"{path}: {key} is given but not {add_key}") from None
            except ValueError:
                raise SourceError(f"{path}: {key} {text!r} / {add_key} {values[add_key]!r} are not numbers") from None
            if not (math.isfinite(scale) and math.isfinite(offset) and scale != 0):
                raise SourceError(f"{path}: {key} {scale!r} / {add_key} {offset!r}: need a finite, non-zero scale "
                                  "and a finite offset")
            if kind == "REFLECTANCE":
                try:
                    elevation = float(sun)
                except (TypeError, ValueError):
                    raise SourceError(f"{path}: SUN_ELEVATION {sun!r} is not a number; cannot turn {key} into "
                                      "reflectance") from None
                if not 0 < elevation <= 90:
                    raise SourceError(f"{path}: SUN_ELEVATION {elevation:g} is not between 0 and 90 degrees")
                scale, offset = scale / math.sin(math.radians(elevation)), offset / math.sin(math.radians(elevation))
            out[f"B{m.group(1).upper()}"] = (scale, offset)
    if not out:
        raise SourceError(f"{path}: no RADIOMETRIC_RESCALING values (REFLECTANCE_MULT_BAND_n, ...); cannot decode "
                          "the product's values")
    return out


def landsat_l1_scaling(group: str, scene_id: str) -> tuple[Path, dict[str, tuple[float, float]]] | None:
    """The metadata file of the Landsat Level-1 product whose band files are ``group`` + ``_B4.TIF``, ..., and
    its band scaling (:func:`landsat_mtl_scaling`); None for other products or without the file."""
    if "://" in group or "/vsi" in group or not _LANDSAT_L1.match(scene_id):
        return None
    for suffix in MTL_SUFFIXES:
        for candidate in (Path(group + suffix), Path(group + suffix.upper())):
            if candidate.is_file():
                return candidate, landsat_mtl_scaling(candidate)
    return None


def mtl_band(mtl: tuple[Path, dict[str, tuple[float, float]]] | None, band: str,
              path: str) -> tuple[float, float] | None:
    """The (scale, offset) of ``band`` (of file ``path``) in a Landsat metadata file's scaling, None without one or
    for a band of another form (a quality band); a numbered band the file does not rescale is refused."""
    m = _MTL_BAND.fullmatch(band.strip())
    if mtl is None or m is None:
        return None
    key = f"B{int(m.group(1))}{m.group(2).upper()}"
    if key not in mtl[1]:
        raise SourceError(f"{mtl[0]}: no REFLECTANCE_MULT_BAND / RADIANCE_MULT_BAND for band {band} ({path}); "
                          "cannot decode it")
    return mtl[1][key]


# ---------------------------------------------------------------- Sentinel-2


def is_granule_gml_mask(path: str) -> bool:
    """Whether ``path`` is a Sentinel-2 granule's GML cloud mask (``QI_DATA/MSK_CLOUDS_B00.gml``)."""
    return (is_vector_mask(path) and safe_root(path) is not None
            and _CLOUDS_GML.match(Path(path).stem) is not None)


def safe_root(path: str) -> str | None:
    """The Sentinel-2 SAFE product folder (``*.SAFE``) that holds ``path`` or is it, else None (a string
    operation: a ``/vsizip//abs/...`` path keeps its form)."""
    m = _IN_SAFE.match(path)
    return m.group(1) if m else None


def granule_of(path: str, root: str) -> tuple[str, str]:
    """(product, granule folder) of a file inside a SAFE product (``GRANULE/<granule>/...``; "" outside one)."""
    rel = Path(path).parts[len(Path(root).parts):]
    return root, rel[1] if len(rel) > 2 and rel[0] == "GRANULE" else ""


def granule_cloud_mask(masks: dict[str, str], bands: dict[str, BandRef], mask_band: str | None) -> BandRef | None:
    """The cloud mask of an L1C granule (it has no SCL) from its ``QI_DATA`` (``masks``: band name -> file): the
    raster ``MSK_CLASSI`` (baseline 04.00 on), else the polygons of ``MSK_CLOUDS`` (before it); the one
    ``mask_band`` names; None where the scene already has a known mask band (L2A keeps its SCL)."""
    if mask_band:
        name = mask_band.upper() if mask_band.upper() in masks else None
    elif not {b.upper() for b in bands} & {*KNOWN_MASKS, *KNOWN_BIT_MASKS}:
        name = next((n for n in ("MSK_CLASSI", "MSK_CLOUDS") if n in masks), None)
    else:
        name = None
    return None if name is None else BandRef(masks[name], 0, name)


def _safe_metadata(root: str) -> tuple[str, bytes] | None:
    """(path, content) of a SAFE product's metadata file (``MTD_MSIL2A.xml`` / ``MTD_MSIL1C.xml``), or None."""
    import zipfile

    m = VSIZIP_PATH.match(root)
    if m is None:
        hits = sorted(Path(root).glob("MTD_MSIL*.xml"))
        return (str(hits[0]), hits[0].read_bytes()) if hits else None
    archive, inner = m.group(1), m.group(2) or ""
    try:
        with zipfile.ZipFile(archive) as z:
            names = sorted(n for n in z.namelist() if re.fullmatch(re.escape(inner) + r"/MTD_MSIL\w+\.xml", n))
            return (f"{archive}/{names[0]}", z.read(names[0])) if names else None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise SourceError(f"{archive}: not a readable zip archive ({exc})") from None


def safe_scaling(root: str) -> dict[str, tuple[float, float]]:
    """Per band (``B1`` ... ``B12``, ``B8A``), the (scale, offset) that turn a Sentinel-2 SAFE product's values
    into reflectance: from its metadata (the quantification value and, from processing baseline 04.00, the
    ``BOA_ADD_OFFSET`` / ``RADIO_ADD_OFFSET`` of each band id), else from the processing baseline in the product
    name (``_N0400_``); {} when neither is there (the bands are then taken at the cube's scale). A metadata file
    that cannot be read, or that states baseline 04.00 or later without offsets, is refused (an offset is never
    assumed to be zero)."""
    from xml.etree import ElementTree

    m = _S2_BASELINE.search(Path(root).name)
    baseline = (int(m.group(1)), int(m.group(2))) if m else None
    found = _safe_metadata(root)
    if found is None:
        if baseline is None:
            return {}
        offset = S2_OFFSET if baseline >= S2_OFFSET_FROM else 0.0
        return {b: (1 / S2_QUANTIFICATION, offset / S2_QUANTIFICATION) for b in _S2_BAND_IDS}
    path, content = found
    try:
        tree = ElementTree.fromstring(content)
    except ElementTree.ParseError as exc:
        raise SourceError(f"{path}: unreadable Sentinel-2 product metadata ({exc})") from None
    quant, offsets, ids = None, {}, {}
    for el in tree.iter():
        tag, text = str(el.tag).rsplit("}", 1)[-1], (el.text or "").strip()
        try:
            if tag in ("BOA_QUANTIFICATION_VALUE", "QUANTIFICATION_VALUE", "L2A_BOA_QUANTIFICATION_VALUE"):
                quant = float(text)
            elif tag in ("BOA_ADD_OFFSET", "RADIO_ADD_OFFSET"):
                offsets[int(el.get("band_id", ""))] = float(text)
            elif tag == "Spectral_Information" and el.get("bandId") is not None:
                ids[int(el.get("bandId"))] = band_number(el.get("physicalBand", ""))
            elif tag == "PROCESSING_BASELINE":
                baseline = tuple(int(v) for v in text.split(".")[:2])
        except ValueError:
            raise SourceError(f"{path}: {tag} {text!r} (band_id {el.get('band_id')!r}) is not a number") from None
    if quant is None or not math.isfinite(quant) or quant <= 0:
        raise SourceError(f"{path}: no valid BOA_QUANTIFICATION_VALUE / QUANTIFICATION_VALUE "
                          f"({quant!r}); cannot decode reflectance")
    if not offsets and baseline is not None and baseline >= S2_OFFSET_FROM:
        raise SourceError(f"{path}: processing baseline {baseline[0]:02d}.{baseline[1]:02d} but no BOA_ADD_OFFSET / "
                          "RADIO_ADD_OFFSET values: cannot tell the offset of its bands")
    out = {b: (1 / quant, 0.0) for b in _S2_BAND_IDS}
    for band_id, offset in offsets.items():
        band = ids.get(band_id) or (_S2_BAND_IDS[band_id] if 0 <= band_id < len(_S2_BAND_IDS) else None)
        if band is None or not math.isfinite(offset):
            raise SourceError(f"{path}: offset {offset!r} of unknown band_id {band_id}")
        out[band] = (1 / quant, offset / quant)
    return out


def s2_item_scaling(item, band: str) -> tuple[float, float] | None:
    """(scale, offset) of a Sentinel-2 band of a STAC item that states its processing baseline
    (``s2:processing_baseline``, as Microsoft Planetary Computer's items do) but no ``raster:bands`` scaling."""
    baseline = str(item.properties.get("s2:processing_baseline") or "")
    m = re.fullmatch(r"0*(\d{1,2})\.(\d{1,2})", baseline.strip())
    if m is None or band_number(band) is None or sensor_of(item.id, item.properties.get("platform")) != "sentinel-2":
        return None
    offset = S2_OFFSET if (int(m.group(1)), int(m.group(2))) >= S2_OFFSET_FROM else 0.0
    return 1 / S2_QUANTIFICATION, offset / S2_QUANTIFICATION
