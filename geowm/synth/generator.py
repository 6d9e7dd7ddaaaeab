"""The synthetic Earth generator: argument checks, orchestration, and the per-acquisition loop."""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .clouds import (
    SCL_CIRRUS,
    SCL_CLOUD_HIGH,
    SCL_CLOUD_MED,
    SCL_SHADOW,
    classify,
    composite,
    make_schedule,
    plan_cloud_fractions,
    render_clouds,
)
from .events import Event, plan_crop_failures, plan_events
from .fields import stream
from .landscape import BANDS, CLASSES, crop_map, make_landscape
from .phenology import make_phenology
from .render import SurfaceRenderer
from .weather import make_weather, plan_droughts
from .writer import (
    datetime_tags,
    write_cog,
    write_events,
    write_landcover,
    write_stac,
    write_weather,
)

MIN_SIZE, MAX_SIZE = 64, 20000
SCENE_PREFIX = "S2SYN_"
# 2: croptype.tif, options crop_rotation and weather_regimes (both off: version 1's pixels); 3: crop failures
VERSION = 3


OPTIONS = {"crop_rotation": False, "weather_regimes": False}  # generate()'s options, with their defaults


def recorded_parameters(meta: dict) -> dict:
    """The generation parameters a ``synth.json`` (loaded: ``meta``) records, with the generator ``version`` that
    made it (the same parameters give other pixels in another version). An option the record predates was off:
    those regions were made without it."""
    return {**OPTIONS, **meta.get("parameters", {}), "version": int(meta.get("version", 1))}


def _parse_date(value: str, name: str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError as exc:
        raise ValueError(f"{name} must be an ISO date (YYYY-MM-DD), got {value!r}") from exc


def _check(out_dir: str | Path, size: int, start: str, end: str, seed: int,
           progress: Callable[[int, int], None] | None) -> tuple[Path, date, date]:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise ValueError(f"size must be an integer number of pixels, got {size!r}")
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    d0, d1 = _parse_date(start, "start"), _parse_date(end, "end")
    if d1 <= d0:
        raise ValueError(f"end ({d1}) must be after start ({d0})")
    if progress is not None and not callable(progress):
        raise ValueError("progress must be a callable progress(done, total) or None")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir {str(out)!r} exists and is not an empty directory")
    return out, d0, d1


def _day(d: date | datetime) -> int:
    return int(np.datetime64(d.strftime("%Y-%m-%d"), "D").astype(np.int64))


def generate(out_dir: str | Path, size: int = 512, start: str = "2021-01-01", end: str = "2022-12-31",
             seed: int = 0, progress: Callable[[int, int], None] | None = None, crop_rotation: bool = False,
             weather_regimes: bool = False) -> dict:
    """Generate a synthetic Sentinel-2-like region with weather drivers and ground-truth events.

    Writes, under ``out_dir``: ``scenes/S2SYN_<YYYYMMDD>T<HHMMSS>.tif`` (4-band uint16 COG,
    reflectance x 10000, nodata 0) and ``..._SCL.tif`` (uint8 scene classification),
    ``stac/catalog.json``, ``landcover.tif``, ``croptype.tif`` (one band per calendar year, named by year),
    ``weather.zarr``, ``events.geojson`` and ``synth.json``. One acquisition is held in memory at a time.

    Args:
        out_dir: output directory; must not exist or be empty.
        size: region side in 10 m pixels, 64..20000.
        start, end: first and last day of the record (ISO dates, end > start).
        seed: non-negative random seed; same arguments give byte-identical pixels.
        progress: optional ``progress(done, total)`` called after each acquisition is written.
        crop_rotation: arable fields rotate winter and summer crops from year to year, as real cropland does
            (:func:`geowm.synth.phenology.rotations`); ``croptype.tif`` then differs between years, and
            ``landcover.tif`` is the last year's map. Off: every field grows the same crop every year.
        weather_regimes: month-scale warm/cold and wet/dry regimes in the weather (AR(1), 40-day e-folding
            time), which make the coming month partly predictable from the last one.

    Returns:
        summary dict: ``n_acquisitions``, ``n_fully_cloudy``, ``crs``, ``transform``, ``events``
        (count per type) and the output ``paths``.

    Raises:
        ValueError: a bad argument; the message names it.
    """
    out, d0, d1 = _check(out_dir, size, start, end, seed, progress)
    size, seed = int(size), int(seed)
    first, last = _day(d0), _day(d1)
    force = size >= 256 and (last - first) >= 360

    land = make_landscape(size, seed)
    grid = land.grid
    schedule = make_schedule(seed, datetime(d0.year, d0.month, d0.day), datetime(d1.year, d1.month, d1.day))
    acq_days = np.array([_day(w) for w in schedule], np.int64)
    droughts = plan_droughts(seed, np.datetime64(d0), np.datetime64(d1), force)
    weather = make_weather(size, grid.res, grid.x0, grid.y0, seed, d0.year, d1.year, droughts, weather_regimes)
    events, forced_clear = plan_events(land, weather, acq_days, first, last, seed, force)
    pheno = make_phenology(land, weather, seed, crop_rotation)
    events += plan_crop_failures(land, pheno, events, first, last, seed, force)
    events.sort(key=lambda e: (e.start, e.type))  # stable: ties keep the order they were planned in
    for k, e in enumerate(events, start=1):
        e.id = k
    latent = weather.cloud_latent(seed)
    lat_acq = np.array([latent[weather.index(int(d))] for d in acq_days], np.float32)
    fractions = plan_cloud_fractions(lat_acq, forced_clear, seed)
    renderer = SurfaceRenderer(land, pheno, events, seed)

    scenes_dir = out / "scenes"
    scenes_dir.mkdir(parents=True, exist_ok=True)
    scenes: list[dict[str, Any]] = []
    n_full = 0
    for i, when in enumerate(schedule):
        day = int(acq_days[i])
        refl, water, snow = renderer.surface(day)
        layer = render_clouds(size, float(fractions[i]), when, seed, i, cirrus_allowed=i not in forced_clear)
        obs = composite(refl, layer)
        scl = classify(refl, water, snow, layer)
        del refl, layer
        rng = stream(seed, "noise", i)
        obs += rng.standard_normal(obs.shape, dtype=np.float32) * (0.003 + 0.012 * obs)
        dn = np.clip(np.rint(obs * 10000.0), 1, 65535).astype(np.uint16)
        del obs
        sid = SCENE_PREFIX + when.strftime("%Y%m%dT%H%M%S")
        tags = datetime_tags(when)
        refl_path, scl_path = scenes_dir / f"{sid}.tif", scenes_dir / f"{sid}_SCL.tif"
        write_cog(refl_path, dn, grid, BANDS, tags, scale=0.0001, resampling="average")
        write_cog(scl_path, scl[None], grid, ("SCL",), tags, resampling="nearest")
        counts = np.bincount(scl.ravel(), minlength=12) / scl.size
        cloud = float(counts[[SCL_CLOUD_MED, SCL_CLOUD_HIGH, SCL_CIRRUS]].sum())
        invalid = cloud + float(counts[SCL_SHADOW])
        n_full += cloud > 0.95
        scenes.append({"id": sid, "datetime": when.replace(tzinfo=UTC), "reflectance": refl_path,
                       "scl": scl_path, "cloud_cover": round(100.0 * cloud, 3),
                       "planned_cloud_fraction": round(float(fractions[i]), 4),
                       "clear_share": round(1.0 - invalid, 4)})
        if progress is not None:
            progress(i + 1, len(schedule))

    # The land-cover map is the record's last year (crops rotate); croptype.tif has one band per year.
    write_landcover(out / "landcover.tif", crop_map(land, pheno.class_at(last)), grid)
    year_days = [(y, max(first, _day(date(y, 1, 1)))) for y in range(d0.year, d1.year + 1)]
    write_landcover(out / "croptype.tif", np.stack([crop_map(land, pheno.class_at(d)) for _, d in year_days]),
                    grid, names=tuple(str(y) for y, _ in year_days))
    write_weather(out / "weather.zarr", weather, np.datetime64(d0), np.datetime64(d1), grid.crs)
    normal = [Event(0, kind, d, d, parcel=p, land_cover=CLASSES[int(pheno.class_at(d)[p])])
              for kind, p, d in pheno.normal_change(first, last)]
    normal.sort(key=lambda e: (e.start, e.parcel))
    for k, e in enumerate(normal, start=len(events) + 1):
        e.id = k
    names = {p: CLASSES[int(c)] for p, c in enumerate(land.parcel_class)}
    event_counts = write_events(out / "events.geojson", events + normal, grid, land.parcel, land.parcel_size, names)
    write_stac(out / "stac", scenes, grid)

    paths = {"scenes": str(scenes_dir), "stac": str(out / "stac" / "catalog.json"),
             "landcover": str(out / "landcover.tif"), "croptype": str(out / "croptype.tif"),
             "weather": str(out / "weather.zarr"),
             "events": str(out / "events.geojson"), "synth": str(out / "synth.json")}
    summary: dict[str, Any] = {
        "n_acquisitions": len(scenes), "n_fully_cloudy": int(n_full), "crs": grid.crs,
        "transform": list(grid.transform)[:6], "size": size, "res": grid.res, "events": event_counts,
        "paths": paths,
    }
    meta = {
        "generator": "geowm.synth", "version": VERSION,
        "parameters": {"size": size, "start": d0.isoformat(), "end": d1.isoformat(), "seed": seed,
                       "crop_rotation": bool(crop_rotation), "weather_regimes": bool(weather_regimes)},
        "crs": grid.crs, "transform": list(grid.transform)[:6], "bounds": list(grid.bounds),
        "bands": list(BANDS), "scale": 0.0001, "nodata": 0,
        "classes": {str(k): v for k, v in CLASSES.items()},
        "scl_clear": [4, 5, 6, 7],
        "droughts": [[str(np.datetime64(a, "D")), str(np.datetime64(b, "D"))] for a, b in weather.droughts],
        "events": event_counts,
        "acquisitions": [{k: (v.isoformat().replace("+00:00", "Z") if isinstance(v, datetime)
                              else f"scenes/{v.name}" if isinstance(v, Path) else v) for k, v in s.items()}
                         for s in scenes],
    }
    (out / "synth.json").write_text(json.dumps(meta, indent=1))
    return summary
