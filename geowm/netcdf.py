"""NetCDF datacubes as scenes: the file an openEO back end, xarray (``Dataset.to_netcdf``) or a CF-writing tool
makes of a time series, read through GDAL's netCDF driver.

Layouts:

* **a variable per band** (openEO's NetCDF): ``B04(t, y, x)``, ``B08(t, y, x)``, ``SCL(t, y, x)``...; each band is
  named by its variable;
* **one variable with a band dimension**: ``reflectance(time, band, y, x)``; its bands are ``band1``, ``band2``...
  in the order of that dimension (``--band-names`` names them).

Each time step is one scene (``<file stem>_<YYYYMMDDTHHMMSS>``) dated by the CF time coordinate (``units`` of the
form ``days since 1970-01-01``, standard calendar); each band is a :class:`~geowm.scene.BandRef` to a band of the
GDAL subdataset ``NETCDF:"<file>":<variable>``. The CRS comes from the CF ``grid_mapping`` (or lat/lon
coordinates), scale and offset from ``scale_factor`` / ``add_offset``, nodata from ``_FillValue``.
"""

from __future__ import annotations

import re
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

from geowm.scene import NETCDF_SUFFIXES, BandRef, Scene, SourceError, netcdf_variable
from geowm.sources import scenes_by_time

_UNITS = {"day": 86400.0, "hour": 3600.0, "minute": 60.0, "second": 1.0, "millisecond": 1e-3, "microsecond": 1e-6,
          "nanosecond": 1e-9}  # xarray writes times with sub-microsecond parts in nanoseconds
_UNIT_ALIASES = {"d": "day", "h": "hour", "hr": "hour", "min": "minute", "s": "second", "sec": "second",
                 "ms": "millisecond", "us": "microsecond", "ns": "nanosecond"}
_CALENDARS = {"", "standard", "gregorian", "proleptic_gregorian"}
# the reference time of CF units: a date, optionally a time, optionally UTC (Z, UTC, +00:00)
_REF = re.compile(r"^(\d{1,4})-(\d{1,2})-(\d{1,2})(?:[ T](\d{1,2}):(\d{1,2})(?::(\d{1,2}(?:\.\d*)?))?)?"
                  r"\s*(Z|UTC|[+-]00:?00)?$", re.IGNORECASE)


def is_netcdf(path: str | Path) -> bool:
    """Whether ``path`` is a NetCDF file by its name."""
    return str(path).lower().endswith(NETCDF_SUFFIXES)


def parse_cf_time_units(units: str, calendar: str, where: str) -> tuple[float, datetime]:
    """(seconds per unit, reference time, UTC) of CF time ``units`` (``minutes since 2023-01-05 00:00:00``);
    raises :class:`SourceError` for another calendar or a form that is not ``<unit> since <date[ time]>``."""
    if calendar.strip().lower() not in _CALENDARS:
        raise SourceError(f"{where}: time calendar {calendar!r} is not supported (standard / gregorian / "
                          "proleptic_gregorian)")
    m = re.fullmatch(r"\s*(\w+)\s+since\s+(.+?)\s*", units, re.IGNORECASE)
    unit = m.group(1).lower() if m else ""
    unit = _UNIT_ALIASES.get(unit, unit.rstrip("s"))
    ref = _REF.match(m.group(2)) if m else None
    if unit not in _UNITS or ref is None:
        raise SourceError(f"{where}: time units {units!r} are not '<days|hours|minutes|seconds> since <date>'")
    y, mo, d, hh, mm, ss = (ref.group(i) for i in range(1, 7))
    sec = float(ss or 0)
    try:
        t0 = datetime(int(y), int(mo), int(d), int(hh or 0), int(mm or 0), int(sec), tzinfo=UTC)
    except ValueError as exc:
        raise SourceError(f"{where}: time units {units!r}: {exc}") from None
    return _UNITS[unit], t0 + timedelta(seconds=sec - int(sec))


def _values(text: str) -> list[float]:
    return [float(v) for v in text.strip("{} ").split(",") if v.strip()]


def _time_dim(tags: dict[str, str], where: str) -> tuple[str, float, datetime]:
    """The name of the time dimension among the extra dimensions of a subdataset, with its unit and reference."""
    extra = [d for d in tags.get("NETCDF_DIM_EXTRA", "").strip("{} ").split(",") if d]
    times = [d for d in extra if " since " in tags.get(f"{d}#units", "")]
    if len(times) != 1:
        raise SourceError(f"{where}: {'no' if not times else 'more than one'} time dimension (a coordinate with "
                          f"units '<unit> since <date>'; extra dimensions: {', '.join(extra) or 'none'})")
    d = times[0]
    return (d, *parse_cf_time_units(tags[f"{d}#units"], tags.get(f"{d}#calendar", ""), where))


def scenes_from_netcdf(path: Path, mask_band: str | None) -> list[Scene]:
    """The scenes of a NetCDF datacube, one per time step (see the module docstring)."""
    import rasterio

    path = path.resolve()
    try:
        with warnings.catch_warnings():  # the container of several variables has no georeferencing of its own
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(str(path)) as src:
                subdatasets = list(src.subdatasets) or [str(path)]
    except rasterio.errors.RasterioIOError as exc:
        raise SourceError(f"{path}: not a readable NetCDF file ({exc})") from None
    by_time: dict[datetime, dict[str, BandRef]] = {}
    for sub in subdatasets:  # a file of one variable has no subdatasets: the file is that variable
        var = sub.rsplit(":", 1)[-1] if sub != str(path) else None
        try:
            with rasterio.open(f'NETCDF:"{path}":{var}' if var else str(path)) as src:
                tags, band_tags = src.tags(), [src.tags(k) for k in range(1, src.count + 1)]
        except rasterio.errors.RasterioIOError as exc:
            raise SourceError(f"{path}: variable {var}: not readable ({exc})") from None
        var = var or (band_tags[0].get("NETCDF_VARNAME") if band_tags else None)
        if var is None or not band_tags or "NETCDF_DIM_EXTRA" not in tags:
            continue  # a coordinate or grid-mapping variable, or a map without a time dimension
        ref_path = f'NETCDF:"{path}":{var}'
        dim, unit, t0 = _time_dim(tags, f"{path} ({var})")
        others = [d for d in tags["NETCDF_DIM_EXTRA"].strip("{} ").split(",") if d and d != dim]
        if len(others) > 1:
            raise SourceError(f"{path}: variable {var} has dimensions {', '.join([dim, *others])} besides y, x; "
                              "one band dimension at most")
        order = {v: i for i, v in enumerate(_values(tags.get(f"NETCDF_DIM_{others[0]}_VALUES", "")))} if others else {}
        for k, bt in enumerate(band_tags, start=1):
            try:
                # to the millisecond: a float count of days carries rounding noise below it
                when = t0 + timedelta(seconds=round(float(bt[f"NETCDF_DIM_{dim}"]) * unit, 3))
            except (KeyError, ValueError, OverflowError):
                raise SourceError(f"{path}: variable {var} band {k}: no readable time value") from None
            name = f"band{order.get(float(bt[f'NETCDF_DIM_{others[0]}']), k - 1) + 1}" if others else var
            refs = by_time.setdefault(when, {})
            if name in refs:
                raise SourceError(f"{path}: band {name!r} twice at {when.isoformat()} (variables "
                                  f"{netcdf_variable(refs[name].path)} and {var}); a time step is one acquisition")
            refs[name] = BandRef(ref_path, k, name)
    return scenes_by_time(path, by_time, mask_band)
