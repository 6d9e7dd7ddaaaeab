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

# fallback by band name alone (cubes ingested before common names were recorded): blue, green, red and
# near-infrared of Sentinel-2, Landsat 8/9, and common names
NAME_CONVENTIONS = (("B02", "B03", "B04", "B08"), ("B2", "B3", "B4", "B5"), ("blue", "green", "red", "nir"),
                    ("BLUE", "GREEN", "RED", "NIR"))
RED_NIR = tuple((c[2], c[3]) for c in NAME_CONVENTIONS)

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
_BAND_NUMBER = re.compile(r"(?:SR_|ST_|TOA_)?B0*(\d{1,2})(A?)(?:_VCID_[12])?", re.I)  # Landsat 7: B6_VCID_1


# band names only Sentinel-2 products have (a Google Earth Engine export names its bands so, in any file name)
_S2_ONLY_BANDS = frozenset({"B8A", "SCL", "QA60", "MSK_CLDPRB", "MSK_SNWPRB", "MSK_CLASSI", "MSK_CLOUDS"})


def sensor_of(scene_id: str, platform: str | None = None, bands: Sequence[str] = ()) -> str | None:
    """The sensor (a key of ``SENSORS``) of a scene by its STAC ``platform``, its id / file name, else a band
    only that sensor's products have (``B8A``, ``SCL``, ``QA60``: Sentinel-2), or None."""
    for pattern, sensor in _PLATFORM_SENSOR:
        if platform and pattern.match(platform.strip()):
            return sensor
    for pattern, sensor in _ID_SENSOR:
        if pattern.search(scene_id):
            return sensor
    if {str(b).upper() for b in bands} & _S2_ONLY_BANDS:
        return "sentinel-2"
    return None


def common_name_of(band: str, sensor: str | None = None) -> str:
    """The STAC common name of ``band``: the name itself if it is one (``red``, ``NIR``), else by band number
    for ``sensor`` (``SR_B4`` of Landsat 8 -> ``red``, of Landsat 5 -> ``nir08``); "" when unknown."""
    if band.lower() in COMMON_NAMES:
        return band.lower()
    number = band_number(band)
    if number is None or sensor not in SENSORS:
        return ""
    return SENSORS[sensor].get(number, "")


def band_number(band: str) -> str | None:
    """A band name's number without zero padding, product prefix or gain suffix (``B04``, ``SR_B4`` -> ``B4``;
    ``B8A`` -> ``B8A``; ``B6_VCID_1`` -> ``B6``), the key of ``SENSORS`` and of Sentinel-2's product metadata; None
    for names of another form."""
    m = _BAND_NUMBER.fullmatch(band.strip())
    return None if m is None else f"B{int(m.group(1))}{m.group(2).upper()}"


_ROLES = {"blue": ("blue",), "green": ("green",), "red": ("red",), "nir": ("nir", "nir08")}  # in preference order


def band_roles(bands: Sequence[str], common_names: Sequence[str] | None = None,
               need: Sequence[str] = ("red", "nir")) -> dict[str, int]:
    """Indexes of the ``blue``, ``green``, ``red`` and ``nir`` bands (``nir``: the broad near-infrared, else the
    narrow ``nir08``) that the cube has, a role without a band left out: by common name; roles of ``need`` still
    missing then come from the first name convention (``NAME_CONVENTIONS``) that has all of them on bands whose
    known common name (if any) is that role, with the other roles it has."""
    bands = [str(b) for b in bands]
    known = [str(c) for c in common_names] if common_names else [""] * len(bands)
    out = {}
    for role, wanted in _ROLES.items():
        hit = next((known.index(c) for c in wanted if c in known), None)
        if hit is not None:
            out[role] = hit
    if all(r in out for r in need):
        return out
    for convention in NAME_CONVENTIONS:
        found = {role: bands.index(n) for role, n in zip(_ROLES, convention, strict=True) if n in bands}
        found = {r: i for r, i in found.items() if not known[i] or known[i] in _ROLES[r]}
        if all(r in out or r in found for r in need):
            return {**found, **out}
    return out


def ndvi_bands(bands: Sequence[str], common_names: Sequence[str] | None = None) -> tuple[int, int] | None:
    """Indexes of the red and near-infrared bands (:func:`band_roles`); None if there is no such pair."""
    roles = band_roles(bands, common_names, need=("red", "nir"))
    return (roles["red"], roles["nir"]) if "red" in roles and "nir" in roles else None


def rgb_bands(bands: Sequence[str], common_names: Sequence[str] | None = None) -> list[str] | None:
    """Red, green and blue band names (:func:`band_roles`), or None."""
    need = ("red", "green", "blue")
    roles = band_roles(bands, common_names, need=need)
    return [str(bands[roles[r]]) for r in need] if all(r in roles for r in need) else None


def common_names_of(ds) -> list[str] | None:
    """The cube's (or any Dataset / DataArray with a ``band`` dim) common names, or None if not recorded."""
    if "common_name" not in ds.coords:
        return None
    return [str(c) for c in ds["common_name"].values]
