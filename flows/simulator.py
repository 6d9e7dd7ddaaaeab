"""New scenes arrive: a replay of a pre-generated, deterministic synthetic record, day by day.

The synthetic generator (:func:`geowm.synth.generate`) writes a region's whole record once into an
*archive* folder (same size/start/end/seed -> the same files). The simulator then plays "today"
forward: :func:`release` makes every archive scene acquired on or before ``until`` appear in a
*watched* folder, and :func:`advance` moves a clock (a JSON state file) by N days and releases what
became visible. A scheduled pipeline watching the folder finds new scenes on each tick.

Watched-folder layout: one folder per delivery (the simulated day it was released), one sub-folder
per scene: ``WATCHED/<YYYY-MM-DD>/<scene id>/<scene id>.tif`` (B02, B03, B04, B08) and ``<scene
id>_SCL.tif`` (the Sentinel-2 scene classification). A delivery is copied into a staging folder beside
WATCHED and moved into place with one ``rename``, so a reader sees all of it or none of it: never half
a file, a scene without its mask, or part of a delivery. With ``stac=True`` the simulator also keeps a
STAC collection of the released scenes, ``WATCHED/stac/collection.json`` (item files first, then the
collection document replaced atomically), for pipelines that watch a STAC catalog instead.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from geowm.atomic import atomic_write_text

CLOCK_FILE = "clock.json"  # written beside the watched folder: <watched>.clock.json
STAC_DIR = "stac"


class SimulatorError(ValueError):
    """The archive, watched folder or clock cannot be used; the message names the path and the problem."""


@dataclass(frozen=True)
class ArchiveScene:
    """One acquisition of the archive: id, UTC datetime and its two files (absolute paths)."""

    id: str
    datetime: datetime
    reflectance: Path
    scl: Path


def make_archive(archive: str | Path, size: int = 256, start: str = "2021-01-01", end: str = "2021-12-31",
                 seed: int = 0, crop_rotation: bool = False, weather_regimes: bool = False) -> Path:
    """Generate the synthetic record into ``archive`` once (deterministic in its parameters; see
    :func:`geowm.synth.generate`).

    An existing archive made with other parameters is refused (it would replay another region). An archive
    from before the generator's options were recorded was made with them off.
    """
    from geowm.synth import generate, recorded_parameters
    from geowm.synth.generator import VERSION

    archive = Path(archive)
    meta = archive / "synth.json"
    options = {"crop_rotation": bool(crop_rotation), "weather_regimes": bool(weather_regimes)}
    if meta.exists():
        have = recorded_parameters(json.loads(meta.read_text()))
        want = {"size": size, "start": str(date.fromisoformat(start)), "end": str(date.fromisoformat(end)),
                "seed": seed, **options, "version": VERSION}
        if have != want:
            raise SimulatorError(f"{archive}: archive was generated with {have}, not {want}; "
                                 "use another archive folder")
        return archive
    generate(archive, size=size, start=start, end=end, seed=seed, **options)
    return archive


def archive_scenes(archive: str | Path) -> list[ArchiveScene]:
    """The archive's acquisitions in time order, from its ``synth.json``."""
    archive = Path(archive)
    meta = archive / "synth.json"
    if not meta.exists():
        raise SimulatorError(f"{archive}: not a synthetic archive (no synth.json; run geowm synth or "
                             "geowm simulate with --size/--start/--end/--seed first)")
    try:
        acqs = json.loads(meta.read_text())["acquisitions"]
        scenes = [ArchiveScene(a["id"], datetime.fromisoformat(a["datetime"].replace("Z", "+00:00")).astimezone(UTC),
                               archive / a["reflectance"], archive / a["scl"]) for a in acqs]
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise SimulatorError(f"{meta}: unreadable acquisition list ({exc})") from None
    for s in scenes:
        for f in (s.reflectance, s.scl):
            if not f.is_file():
                raise SimulatorError(f"{f}: archive file missing (scene {s.id})")
    return sorted(scenes, key=lambda s: (s.datetime, s.id))


def _as_day_end(until: str | date | datetime) -> datetime:
    """``until`` as the last second of that UTC day (a date releases everything acquired that day)."""
    if isinstance(until, datetime):
        return until.astimezone(UTC) if until.tzinfo else until.replace(tzinfo=UTC)
    try:
        day = until if isinstance(until, date) else date.fromisoformat(str(until))
    except ValueError:
        raise SimulatorError(f"until {until!r}: expected a date YYYY-MM-DD") from None
    return datetime(day.year, day.month, day.day, 23, 59, 59, tzinfo=UTC)


def release(archive: str | Path, watched: str | Path, until: str | date | datetime,
            stac: bool = False) -> list[str]:
    """Make every archive scene acquired on or before ``until`` (UTC day) appear in ``watched``.

    Returns the ids released by this call (already released scenes are left alone, so calling it
    again releases nothing). They appear together, as one delivery folder named after ``until``
    (staged beside ``watched``, then renamed into it).
    """
    watched = Path(watched)
    watched.mkdir(parents=True, exist_ok=True)
    end = _as_day_end(until)
    visible = [s for s in archive_scenes(archive) if s.datetime <= end]
    have = released(watched)
    new = [s for s in visible if s.id not in have]
    if new:
        staging = watched.parent / f".{watched.name}.staging"
        tmp = staging / uuid.uuid4().hex[:12]
        target = watched / end.date().isoformat()
        while target.exists():  # a second delivery on the same simulated day
            target = watched / f"{end.date().isoformat()}-{uuid.uuid4().hex[:4]}"
        try:
            for s in new:
                (tmp / s.id).mkdir(parents=True)
                shutil.copy2(s.reflectance, tmp / s.id / f"{s.id}.tif")
                shutil.copy2(s.scl, tmp / s.id / f"{s.id}_SCL.tif")
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if staging.exists() and not any(staging.iterdir()):
                staging.rmdir()
        have.update({s.id: target / s.id for s in new})
    if stac:
        write_stac(archive, watched, [s for s in visible if s.id in have], have)
    return [s.id for s in new]


def released(watched: str | Path) -> dict[str, Path]:
    """Scene id -> its folder, for every scene already released into ``watched``."""
    watched = Path(watched)
    return {p.name: p for p in watched.glob("*/*") if p.is_dir() and p.parent.name != STAC_DIR}


def _write_json_atomic(path: Path, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=1))


def write_stac(archive: str | Path, watched: str | Path, scenes: list[ArchiveScene],
               folders: dict[str, Path]) -> Path:
    """A STAC collection ``watched/stac/collection.json`` of the released ``scenes`` (``folders``: id ->
    the folder holding its files).

    Items are the archive's STAC items with their assets pointing at the released files; item
    documents are written before the collection that links them, which is replaced atomically.
    """
    import pystac

    archive, watched = Path(archive), Path(watched)
    root = watched / STAC_DIR
    src_cat = archive / "stac" / "catalog.json"
    try:
        coll = next(iter(pystac.Catalog.from_file(str(src_cat)).get_children()))
    except (OSError, StopIteration, pystac.STACError) as exc:
        raise SimulatorError(f"{src_cat}: cannot read the archive's STAC collection ({exc})") from None
    links = [{"rel": "root", "href": "./collection.json", "type": "application/json"},
             {"rel": "self", "href": str((root / "collection.json").absolute()), "type": "application/json"}]
    for s in scenes:
        item_path = root / s.id / f"{s.id}.json"
        if not item_path.exists():
            item = coll.get_item(s.id)
            if item is None:
                raise SimulatorError(f"{src_cat}: no STAC item {s.id!r} in the archive catalog")
            d = item.to_dict(include_self_link=False, transform_hrefs=False)
            d["links"] = [{"rel": "root", "href": "../collection.json", "type": "application/json"},
                          {"rel": "parent", "href": "../collection.json", "type": "application/json"},
                          {"rel": "collection", "href": "../collection.json", "type": "application/json"}]
            d["collection"] = coll.id
            d["assets"]["reflectance"]["href"] = str((folders[s.id] / f"{s.id}.tif").absolute())
            d["assets"]["SCL"]["href"] = str((folders[s.id] / f"{s.id}_SCL.tif").absolute())
            item_path.parent.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(item_path, d)
        links.append({"rel": "item", "href": f"./{s.id}/{s.id}.json", "type": "application/geo+json"})
    doc = coll.to_dict(include_self_link=False, transform_hrefs=False)
    doc["links"] = links
    if scenes:
        doc["extent"]["temporal"]["interval"] = [[scenes[0].datetime.isoformat().replace("+00:00", "Z"),
                                                  scenes[-1].datetime.isoformat().replace("+00:00", "Z")]]
    root.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(root / "collection.json", doc)
    return root / "collection.json"


def clock_path(watched: str | Path) -> Path:
    """Where the simulated "today" of a watched folder is kept: ``<watched>.clock.json`` beside it."""
    watched = Path(watched)
    return watched.parent / f"{watched.name}.{CLOCK_FILE}"


def read_clock(watched: str | Path) -> date | None:
    """The simulated today of ``watched`` (None before the first release)."""
    path = clock_path(watched)
    if not path.exists():
        return None
    try:
        return date.fromisoformat(json.loads(path.read_text())["today"])
    except (KeyError, ValueError, json.JSONDecodeError) as exc:
        raise SimulatorError(f"{path}: unreadable simulator clock ({exc}); delete it to restart") from None


def advance(archive: str | Path, watched: str | Path, days: float | None = None, until: str | None = None,
            stac: bool = False) -> dict:
    """Move the simulated today forward and release what became visible.

    ``until`` sets today to that date; ``days`` moves it forward by that many days (from the
    clock, or from the day before the archive's first acquisition on the first call). The clock
    never moves backward. Returns ``{"today", "released", "n_visible", "n_remaining"}``.
    """
    if (days is None) == (until is None):
        raise SimulatorError("give exactly one of days (advance the clock) or until (set it)")
    scenes = archive_scenes(archive)
    if not scenes:
        raise SimulatorError(f"{archive}: the archive holds no acquisitions")
    now = read_clock(watched)
    if until is not None:
        today = _as_day_end(until).date()
    else:
        if days <= 0:
            raise SimulatorError(f"days must be > 0, got {days}")
        base = now or (scenes[0].datetime.date() - timedelta(days=1))
        today = base + timedelta(days=int(days))
    if now is not None and today < now:
        raise SimulatorError(f"{clock_path(watched)}: today is {now}; the clock does not go back to {today}")
    released = release(archive, watched, today, stac=stac)
    _write_json_atomic(clock_path(watched), {"today": today.isoformat(), "archive": str(Path(archive).absolute())})
    visible = sum(s.datetime.date() <= today for s in scenes)
    return {"today": today.isoformat(), "released": released, "n_visible": visible,
            "n_remaining": len(scenes) - visible}
