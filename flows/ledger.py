"""The pipeline's ledger: which scenes have been fully processed (ingested, forecast from, scored).

``STATE_DIR/ledger.json`` holds::

    {"version": 1, "cube": "...", "baseline": [scene ids in the cube when the pipeline first ran],
     "processed": {scene id: run key}, "runs": [one record per run that processed scenes],
     "last_run": {the latest run, including runs that found nothing new}}

A scene is *pending* when the cube holds it and the ledger does not list it as processed or as
baseline. A run ingests, forecasts and scores, and only then records its pending scenes as
processed (one atomic file replace), so a run killed at any point leaves them pending and the next
run completes them; a run that completed never sees them again. The first run records the cube's
scenes at that moment as ``baseline`` (history, not scored) before it ingests anything.

One pipeline run at a time per state dir: :func:`state_lock` (flock) serialises overlapping ticks.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from geowm.atomic import atomic_write_text

LEDGER = "ledger.json"
VERSION = 1


class LedgerError(ValueError):
    """The ledger or state dir cannot be used; the message names the file and the problem."""


def _write_atomic(path: Path, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=1, default=str))


def load(state_dir: str | Path) -> dict | None:
    """The ledger of ``state_dir`` (None if the pipeline never ran there)."""
    path = Path(state_dir) / LEDGER
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LedgerError(f"{path}: corrupt ledger ({exc}); restore it or remove the state dir to start over") from None
    if doc.get("version") != VERSION:
        raise LedgerError(f"{path}: ledger version {doc.get('version')!r}, expected {VERSION}")
    return doc


def start(state_dir: str | Path, cube: str, cube_scene_ids: list[str]) -> dict:
    """The ledger, created with the cube's current scenes as baseline if this is the first run."""
    doc = load(state_dir)
    if doc is not None:
        if doc["cube"] != cube:
            raise LedgerError(f"{Path(state_dir) / LEDGER}: this state dir belongs to cube {doc['cube']}, not {cube}; "
                              "use one state dir per cube")
        return doc
    doc = {"version": VERSION, "cube": cube, "baseline": sorted(cube_scene_ids), "processed": {}, "runs": [],
           "last_run": None}
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    _write_atomic(Path(state_dir) / LEDGER, doc)
    return doc


def pending(doc: dict, cube_scenes: list[dict]) -> list[dict]:
    """Scenes of the cube (``{"id", "datetime"}`` records) neither processed nor baseline, by date."""
    done = set(doc["processed"]) | set(doc["baseline"])
    return sorted((s for s in cube_scenes if s["id"] not in done), key=lambda s: (s["datetime"], s["id"]))


def commit(state_dir: str | Path, doc: dict, record: dict) -> dict:
    """Record a finished run: its scenes become processed (if any) and it becomes ``last_run``."""
    doc = json.loads(json.dumps(doc, default=str))
    for sid in record.get("scenes", []):
        if sid in doc["processed"]:
            raise LedgerError(f"{Path(state_dir) / LEDGER}: scene {sid} was already processed by run "
                              f"{doc['processed'][sid]}")
        doc["processed"][sid] = record["run"]
    if record.get("scenes"):
        doc["runs"].append(record)
    doc["last_run"] = record
    _write_atomic(Path(state_dir) / LEDGER, doc)
    return doc


@contextmanager
def state_lock(state_dir: str | Path, timeout_s: float = 3600.0) -> Iterator[None]:
    """Exclusive lock on the state dir for one pipeline run; waits up to ``timeout_s`` seconds for a
    run in progress to finish, then raises :class:`LedgerError`."""
    path = Path(state_dir)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LedgerError(f"{path}: another pipeline run has held this state dir for over "
                                      f"{timeout_s:.0f} s") from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)
