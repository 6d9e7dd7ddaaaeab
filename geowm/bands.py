"""Band conventions shared by ingestion, the probes, baselines, alerts and the dashboard (no heavy imports).

A cube records each band's STAC ``eo`` common name (``red``, ``nir``, ``nir08``, ...) beside its name
(the ``common_name`` coordinate on ``band``; "" where unknown): from the STAC item's ``eo:bands``, else from
a band named by a common name, else from the band number of a sensor recognised by the scene id
(Sentinel-2, Landsat 4-9, HLS). NDVI and true-colour images take their bands by common name, so a Landsat 5
``B4`` (near-infrared) is never read as a Landsat 8 ``B4`` (red); cubes without common names fall back on the
band names below.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# fallback by band name alone (cubes ingested before common names were recorded)
RED_NIR = (("B04", "B08"), ("B4", "B5"), ("red", "nir"), ("RED", "NIR"))  # Sentinel-2, Landsat 8/9, common names
RGB_NAMES = (("B04", "B03", "B02"), ("B4", "B3", "B2"), ("red", "green", "blue"), ("RED", "GREEN", "BLUE"))

COMMON_NAMES = frozenset({"coastal", "blue", "green", "red", "yellow", "rededge", "pan", "nir", "nir08", "nir09",
                          "cirrus", "swir16", "swir22", "lwir", "lwir11", "lwir12"})

# band number -> common name, per sensor (STAC eo extension names; numbers without zero padding)
_S2 = {"B1": "coastal", "B2": "blue", "B3": "green", "B4": "red", "B5": "rededge", "B6": "rededge",
       "B7": "rededge", "B8": "nir", "B8A": "nir08", "B9": "nir09", "B10": "cirrus", "B11": "swir16",
       "B12": "swir22"}
_OLI = {"B1": "coastal", "B2": "blue", "B3": "green", "B4": "red", "B5": "nir08", "B6": "swir16", "B7": "swir22",
        "B8": "pan", "B9": "cirrus", "B10": "lwir11", "B11": "lwir12"}  # Landsat 8/9 OLI-TIRS
_TM = {"B1": "blue", "B2": "green", "B3": "red", "B4": "nir08", "B5": "swir16", "B6": "lwir", "B7": "swir22",
       "B8": "pan"}  # Landsat 4-5 TM, Landsat 7 ETM+
_HLS_L30 = {"B1": "coastal", "B2": "blue", "B3": "green", "B4": "red", "B5": "nir08", "B6": "swir16",
            "B7": "swir22", "B9": "cirrus", "B10": "lwir11", "B11": "lwir12"}
SENSORS = {"sentinel-2": _S2, "landsat-oli": _OLI, "landsat-tm": _TM, "hls-l30": _HLS_L30}

_ID_SENSOR = (  # scene id or file name -> sensor
    (re.compile(r"^HLS\.L30\.", re.I), "hls-l30"),
    (re.compile(r"^HLS\.S30\.", re.I), "sentinel-2"),
    (re.compile(r"^L[CO]0?[89]", re.I), "landsat-oli"),
    (re.compile(r"^L[TE]0?[4-7]", re.I), "landsat-tm"),
    (re.compile(r"^S2[A-D]_|_MSIL[12][AC]_|^T\d{2}[A-Z]{3}_\d{8}T", re.I), "sentinel-2"),
)
_PLATFORM_SENSOR = (  # STAC ``platform`` -> sensor
    (re.compile(r"^sentinel-?2[a-d]?$", re.I), "sentinel-2"),
    (re.compile(r"^landsat-?0?[89]$", re.I), "landsat-oli"),
    (re.compile(r"^landsat-?0?[4-7]$", re.I), "landsat-tm"),
)
_BAND_NUMBER = re.compile(r"(?:SR_|ST_|TOA_)?B0*(\d{1,2})(A?)", re.I)


def sensor_of(scene_id: str, platform: str | None = None) -> str | None:
    """The sensor (a key of ``SENSORS``) of a scene by its STAC ``platform`` or its id / file name, or None."""
    for pattern, sensor in _PLATFORM_SENSOR:
        if platform and pattern.match(platform.strip()):
            return sensor
    for pattern, sensor in _ID_SENSOR:
        if pattern.search(scene_id):
            return sensor
    return None


def common_name_of(band: str, sensor: str | None = None) -> str:
    """The STAC common name of ``band``: the name itself if it is one (``red``, ``NIR``), else by band number
    for ``sensor`` (``SR_B4`` of Landsat 8 -> ``red``, of Landsat 5 -> ``nir08``); "" when unknown."""
    if band.lower() in COMMON_NAMES:
        return band.lower()
    m = _BAND_NUMBER.fullmatch(band.strip())
    if m is None or sensor not in SENSORS:
        return ""
    return SENSORS[sensor].get(f"B{int(m.group(1))}{m.group(2).upper()}", "")


def _by_common_name(common_names: Sequence[str] | None, *roles: Sequence[str]) -> tuple[int, ...] | None:
    """Indexes of the first band with each role (a role: common names in order of preference)."""
    if not common_names:
        return None
    names = [str(c) for c in common_names]
    out = []
    for role in roles:
        hit = next((names.index(c) for c in role if c in names), None)
        if hit is None:
            return None
        out.append(hit)
    return tuple(out)


def _by_name(bands: Sequence[str], common_names: Sequence[str] | None, table, roles) -> tuple[int, ...] | None:
    """The name fallback, skipping a pair whose bands have a known common name of another role."""
    known = [str(c) for c in common_names] if common_names else [""] * len(bands)
    for names in table:
        if all(n in bands for n in names):
            idx = tuple(list(bands).index(n) for n in names)
            if all(not known[i] or known[i] in role for i, role in zip(idx, roles, strict=True)):
                return idx
    return None


_RED, _NIR = ("red",), ("nir", "nir08")


def ndvi_bands(bands: Sequence[str], common_names: Sequence[str] | None = None) -> tuple[int, int] | None:
    """Indexes of the red and near-infrared bands: by common name (``red``; ``nir``, else ``nir08``) when the
    cube records them, else by name (Sentinel-2, Landsat 8/9, common names); None if there is no such pair."""
    bands = [str(b) for b in bands]
    return _by_common_name(common_names, _RED, _NIR) or _by_name(bands, common_names, RED_NIR, (_RED, _NIR))


def rgb_bands(bands: Sequence[str], common_names: Sequence[str] | None = None) -> list[str] | None:
    """Red, green and blue band names (by common name, else by name), or None."""
    bands = [str(b) for b in bands]
    roles = (_RED, ("green",), ("blue",))
    idx = _by_common_name(common_names, *roles) or _by_name(bands, common_names, RGB_NAMES, roles)
    return None if idx is None else [bands[i] for i in idx]


_VISIBLE_NIR = (("B02", "B03", "B04", "B08"), ("B2", "B3", "B4", "B5"), ("blue", "green", "red", "nir"),
                ("BLUE", "GREEN", "RED", "NIR"))  # blue, green, red, near-infrared by name (fallback)


def band_roles(bands: Sequence[str], common_names: Sequence[str] | None = None) -> dict[str, int]:
    """Indexes of the ``blue``, ``green``, ``red`` and ``nir`` bands (``nir``: the broad near-infrared, else the
    narrow ``nir08``) that the cube has: by common name, else by name; a role without a band is left out."""
    bands = [str(b) for b in bands]
    names = [str(c) for c in common_names] if common_names else []
    out = {}
    for role, wanted in (("blue", ("blue",)), ("green", ("green",)), ("red", _RED), ("nir", _NIR)):
        hit = next((names.index(c) for c in wanted if c in names), None)
        if hit is not None:
            out[role] = hit
    if out:
        return out
    for convention in _VISIBLE_NIR:
        found = {role: bands.index(n) for role, n in zip(("blue", "green", "red", "nir"), convention, strict=True)
                 if n in bands}
        if "red" in found and "nir" in found:
            return found
    return {}


def common_names_of(ds) -> list[str] | None:
    """The cube's (or any Dataset / DataArray with a ``band`` dim) common names, or None if not recorded."""
    if "common_name" not in ds.coords:
        return None
    return [str(c) for c in ds["common_name"].values]
