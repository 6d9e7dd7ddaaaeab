"""Cube storage: an Icechunk repository (transactional, versioned Zarr v3) holding one cube.

Why Icechunk and not plain Zarr with a write-ahead manifest: see the README ("Storage choice") and
``benchmarks/store_choice.py``. Each ingest batch is one Icechunk commit, so readers always see a
whole committed snapshot, a killed writer leaves the previous snapshot in place, and the snapshot
id names the exact cube state a model or forecast was made from.

Plain xarray opens a cube through the Icechunk store::

    import icechunk, xarray as xr
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage("demo/cube"))
    ds = xr.open_zarr(repo.readonly_session("main").store, consolidated=False)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import icechunk
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor on what open_cube returns)
import xarray as xr
import zarr
from affine import Affine

from geowm.cube.grid import CubeGrid
from geowm.cube.reader import Encoding
from geowm.sources import natural_key

icechunk.set_logs_filter("error")  # its local-storage concurrency warning is handled by cube_lock

BRANCH = "main"
FORMAT = "geowm-cube/1"


class CubeError(ValueError):
    """A cube cannot be opened or used as asked; the message names the cube and the problem."""


def storage_for(path: str | Path) -> icechunk.Storage:
    """Icechunk storage for a local path or an object-store URL (``s3://bucket/prefix``, credentials
    from the environment)."""
    text = str(path)
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        return icechunk.s3_storage(bucket=bucket, prefix=prefix or None, from_env=True)
    if "://" in text:
        raise CubeError(f"{text}: unsupported cube URL scheme (local paths and s3:// are supported)")
    return icechunk.local_filesystem_storage(str(Path(text).absolute()))


def cube_exists(path: str | Path) -> bool:
    p = Path(str(path))
    if "://" not in str(path) and not p.exists():
        return False
    return icechunk.Repository.exists(storage_for(path))


def has_commits(repo: icechunk.Repository) -> bool:
    """Whether ``main`` moved past the repository's initial empty commit (a writer killed right after
    creating the repository leaves one without; it is then treated as new)."""
    history = repo.ancestry(branch=BRANCH)
    next(history)
    return next(history, None) is not None


def open_repo(path: str | Path) -> icechunk.Repository:
    if not cube_exists(path):
        raise CubeError(f"{path}: no geowm cube here (not an Icechunk repository)")
    repo = icechunk.Repository.open(storage_for(path))
    if not has_commits(repo):
        raise CubeError(f"{path}: empty cube (its first ingest did not complete); run the ingest again")
    return repo


def open_cube(path: str | Path, snapshot: str | None = None) -> xr.Dataset:
    """Open a cube lazily as an xarray Dataset with dims ``time, band, y, x``.

    Variables: ``reflectance`` (time, band, y, x; decoded to physical values, fill -> NaN) and
    ``valid`` (time, y, x; bool: observed, not cloud, not fill). ``spatial_ref`` holds the CRS as a
    CF grid mapping (rioxarray reads it: ``ds.rio.crs``); ``common_name`` (on ``band``) each band's STAC
    ``eo`` common name (``red``, ``nir08``, ...; "" unknown; absent in cubes made before it was recorded).
    ``attrs['geowm:snapshot']`` is the Icechunk snapshot id of what was read; pass ``snapshot`` to read an
    earlier state.
    """
    repo = open_repo(path)
    session = repo.readonly_session(snapshot_id=snapshot) if snapshot else repo.readonly_session(BRANCH)
    ds = xr.open_zarr(session.store, consolidated=False)
    if ds.attrs.get("geowm:format") != FORMAT:
        raise CubeError(f"{path}: not a geowm cube (format {ds.attrs.get('geowm:format')!r})")
    ds = in_order(ds.set_coords("spatial_ref"), ("reflectance", "valid"))
    ds.attrs["geowm:snapshot"] = session.snapshot_id
    return ds


def in_order(ds: xr.Dataset, first: tuple[str, ...]) -> xr.Dataset:
    """``ds`` with its variables in a fixed order: those of ``first``, then the others by name; dims in the order
    the variables use them, coordinates by dim then by name. Icechunk lists a store's arrays in no fixed order,
    which ``xr.open_zarr`` would pass on to the dims (``time, y, x, band`` one time, ``time, band, y, x`` the
    next) and to every repr."""
    names = [v for v in first if v in ds.data_vars]
    names += sorted((v for v in ds.data_vars if v not in first), key=natural_key)
    dims = list(dict.fromkeys(d for n in names for d in ds[n].dims))
    coords = [d for d in dims if d in ds.coords] + sorted(c for c in ds.coords if c not in dims)
    return xr.Dataset({n: ds[n].variable for n in names}, coords={c: ds[c].variable for c in coords},
                      attrs=ds.attrs)


def date_sources(ds: xr.Dataset) -> dict[str, str] | None:
    """What each cube date was made from: ``{date: fingerprint}``, the date as ISO text to the second
    (``2022-07-03T10:26:42``) and the fingerprint the SHA-256 (16 hex) of the records of the scenes ingested on
    that UTC day (their ids, files with sizes and content hashes, and mask rule; ``attrs['geowm:sources']``).

    Two cubes, or two snapshots of one, with the same fingerprint at a date hold the same pixels there; an
    ingest that adds later dates leaves the earlier fingerprints as they were. None when the cube does not
    record the sources of every date (a dataset not opened with :func:`open_cube`).
    """
    import json
    from datetime import UTC, datetime

    by_day: dict[np.datetime64, list[str]] = {}
    for rec in ds.attrs.get("geowm:sources") or []:
        try:
            t = datetime.fromisoformat(str(rec["datetime"]))
        except (KeyError, TypeError, ValueError):
            return None
        t = t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t
        by_day.setdefault(np.datetime64(t, "D"), []).append(json.dumps(rec, sort_keys=True, default=str))
    out = {}
    for t in ds["time"].values.astype("datetime64[s]"):
        recs = by_day.get(t.astype("datetime64[D]"))
        if not recs:
            return None
        out[str(t)] = hashlib.sha256("\n".join(sorted(recs)).encode()).hexdigest()[:16]
    return out


@dataclass
class CubeState:
    """What an ingest needs to know about an existing cube (read from metadata, no pixels)."""

    grid: CubeGrid
    bands: list[str]
    times: np.ndarray  # datetime64[s], sorted
    encoding: Encoding  # dtype, fill, and the CF scale_factor / add_offset
    sources: list[dict]
    time_chunk: int
    snapshot: str
    common_names: list[str] | None = None  # per band, "" unknown; None: a cube made before they were recorded


def fill_value_of(arr) -> float | None:
    """The fill value of a cube's Zarr array as a float (None: none): its CF ``_FillValue`` attribute, which xarray
    writes base64-encoded for a float NaN, so then the array's own fill value (the same)."""
    fill = arr.attrs.get("_FillValue", arr.fill_value)
    if isinstance(fill, str):
        fill = arr.fill_value
    return None if fill is None else float(fill)


def read_state(path: str | Path) -> CubeState:
    repo = open_repo(path)
    session = repo.readonly_session(BRANCH)
    g = zarr.open_group(session.store, mode="r")
    attrs = dict(g.attrs)
    if attrs.get("geowm:format") != FORMAT:
        raise CubeError(f"{path}: not a geowm cube (format {attrs.get('geowm:format')!r})")
    sref = dict(g["spatial_ref"].attrs)
    gt = [float(v) for v in sref["GeoTransform"].split()]
    refl = g["reflectance"]
    grid = CubeGrid(sref["crs_wkt"], Affine.from_gdal(*gt), int(refl.shape[3]), int(refl.shape[2]),
                    int(attrs["geowm:tile_size"]))
    ra = dict(refl.attrs)
    fill = fill_value_of(refl)
    return CubeState(
        grid=grid,
        bands=[str(b) for b in g["band"][:]],
        times=(g["time"][:].astype("int64")).astype("datetime64[s]"),
        encoding=Encoding(str(refl.dtype), float("nan") if fill is None else fill,
                          float(ra.get("scale_factor", 1.0)), float(ra.get("add_offset", 0.0))),
        sources=list(attrs.get("geowm:sources", [])),
        time_chunk=int(refl.chunks[0]),
        snapshot=session.snapshot_id,
        common_names=[str(c) for c in g["common_name"][:]] if "common_name" in g else None,
    )


@contextmanager
def cube_lock(path: str | Path, wait: bool = False) -> Iterator[None]:
    """Exclusive writer lock on a local cube (flock on its folder; nothing is written into the cube).

    A second writer fails at once with :class:`CubeError` unless ``wait`` is True. Object-store cubes
    rely on Icechunk's optimistic concurrency (a conflicting commit fails) instead.
    """
    if "://" in str(path):
        yield
        return
    p = Path(path)
    made = not p.exists()
    p.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise CubeError(f"{path}: another process is writing this cube; re-run when it has finished") from None
        if not p.is_dir() or os.stat(p).st_ino != os.fstat(fd).st_ino:  # removed by the writer before us
            raise CubeError(f"{path}: another process was writing this cube; re-run when it has finished")
        yield
    finally:
        if made and p.is_dir() and not any(p.iterdir()):  # the folder this lock made, left empty: not kept
            p.rmdir()
        os.close(fd)


def cube_checksum(path: str | Path) -> str:
    """SHA-256 over the committed cube's arrays (values, shapes, dtypes) and attributes."""
    repo = open_repo(path)
    g = zarr.open_group(repo.readonly_session(BRANCH).store, mode="r")
    h = hashlib.sha256()
    h.update(repr(sorted(dict(g.attrs).items())).encode())
    for name in sorted(g.array_keys()):
        a = g[name]
        h.update(f"{name}{a.shape}{a.dtype}{sorted(dict(a.attrs).items())}".encode())
        h.update(np.ascontiguousarray(a[...]).tobytes())
    return h.hexdigest()


def tree_digest(path: str | Path) -> str:
    """SHA-256 over every file (relative path and bytes) under a local folder: 'byte-for-byte unchanged'."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()
