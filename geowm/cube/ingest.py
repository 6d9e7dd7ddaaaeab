"""Ingest scenes into a cube: validate everything first, then read/warp/mosaic tiles in parallel with
dask and commit the batch as one Icechunk transaction.

Order of work (nothing is written until every source has passed the header checks):

1. discover scenes (:mod:`geowm.sources`), drop scenes already in the cube (re-runs change nothing); a
   scene or date already in the cube with other content is refused unless ``replace`` is set;
2. inspect each file's header: readable, has a CRS, not truncated, overlaps the cube, bands and dtype fit;
3. plan: the merged, sorted time axis; the first time chunk that changes (appends touch only the end,
   an older date rewrites the tail from its chunk on);
4. dask workers build (time chunk x tile) blocks: new dates from the sources, old dates from the
   base snapshot; the coordinator writes each block into one writable session and commits once. A new
   scene without a single pixel of data inside the cube (all NaN/nodata) fails the batch before the commit.
"""

from __future__ import annotations

import math
import os
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC
from pathlib import Path

import numpy as np
import rasterio
import xarray as xr
import zarr
from rasterio.enums import Resampling
from rasterio.warp import transform_bounds

from geowm.bands import COMMON_NAMES
from geowm.cube.grid import CubeGrid, Tile
from geowm.cube.reader import Encoding, ReadError, band_scaling, implicit_nodata, mosaic_date, same_scaling
from geowm.cube.store import (
    BRANCH,
    FORMAT,
    CubeError,
    CubeState,
    cube_exists,
    cube_lock,
    has_commits,
    read_state,
    storage_for,
)
from geowm.cube.vector_mask import read_vector_mask
from geowm.scene import footprint, io_map, public_href
from geowm.sources import (
    BandRef,
    Scene,
    SourceError,
    assign_band_names,
    describe_mask_rule,
    discover,
    is_auxiliary_band,
    is_unnamed,
    is_url,
    is_vector_mask,
    natural_key,
    scene_fingerprints,
    set_mask_rule,
    source_crs,
    with_mask,
)
from geowm.stacsource import StacSearch
from geowm.zarrcube import open_raster

MAX_PIXELS_DEFAULT = 2**31  # refuse absurd rasters instead of exhausting memory
MAX_MASK_BUFFER_M = 5000.0  # a cloud-mask buffer wider than this would mask whole scenes around any cloud
METRES_PER_DEGREE = 111_320.0  # at the equator: a geographic grid's pixel size in metres, for the mask buffer
# what an Icechunk repository holds on local disk (a first ingest killed early leaves some of it, no cube yet)
ICECHUNK_ENTRIES = {"snapshots", "refs", "manifests", "chunks", "transactions", "config.yaml", "repo", "overwritten"}


class IngestError(ValueError):
    """Bad input found while planning an ingest; the message names the file and the problem."""


@dataclass
class IngestOptions:
    """Options of one ingest. ``crs``/``resolution``/``bounds``/``tile_size`` apply to a new cube only."""

    crs: str | None = None
    resolution: float | None = None
    bounds: tuple[float, float, float, float] | None = None
    # west, south, east, north in degrees (WGS 84): a new cube's bounds when ``bounds`` is not given (and the
    # search's area, with ``search``)
    bbox: tuple[float, float, float, float] | None = None
    search: StacSearch | None = None  # the source is a STAC API, searched so
    tile_size: int = 256
    time_chunk: int = 8
    bands: Sequence[str] | None = None
    # the names of the bands of multi-band files, in file order (a stack without band descriptions); None: theirs,
    # or on an append, the names the cube's unnamed sources were given
    band_names: Sequence[str] | None = None
    # scale and offset of source bands that state none (no GeoTIFF tags, STAC raster:bands or product convention),
    # as GDAL's -a_scale / -a_offset assign them: physical = value * scale + offset; None: taken at the cube's
    scale: float | None = None
    offset: float | None = None
    mask_band: str | None = None
    mask_clear: Sequence[int] | None = None  # None: the cube's rule for the scenes' mask band, else its default
    mask_bits: Sequence[int] | None = None  # a bit mask's flag bits (instead of clear values); None: as mask_clear
    # metres: pixels this close to a flagged mask pixel (cloud, shadow, ...) are not clear; None: the cube's, else 0
    mask_buffer: float | None = None
    resampling: str = "bilinear"
    scheduler: str = "local"  # "local" (LocalCluster of processes), "threads", "synchronous", or an address
    max_pixels: int = MAX_PIXELS_DEFAULT  # per source file and for a new cube's grid
    replace: bool = False  # scenes of a date already in the cube replace that date instead of being refused
    dry_run: bool = False  # check and plan everything, write nothing: the plan is the report's ``plan``


@dataclass
class IngestReport:
    """What an ingest did (with ``dry_run``: would do; nothing written, ``plan`` says how)."""

    cube: str
    added_times: list[str] = field(default_factory=list)
    replaced_times: list[str] = field(default_factory=list)
    skipped_scenes: list[str] = field(default_factory=list)
    snapshot: str | None = None
    source_bytes: int = 0
    seconds: float = 0.0
    tiles_written: int = 0
    plan: dict | None = None

    @property
    def changed(self) -> bool:
        return bool(self.added_times)


@dataclass(frozen=True)
class FileInfo:
    path: str
    crs: str
    bounds_in_cube_crs: tuple[float, float, float, float]
    transform: tuple
    res: float
    dtypes: tuple[str, ...]
    nodata: float | None
    scales: tuple[float, ...]
    offsets: tuple[float, ...]
    count: int
    width: int
    height: int
    pixel_bytes: int


# ------------------------------------------------------------------------------------------- checks


def _check_not_truncated(src, path: str) -> None:
    """Every TIFF block's bytes must lie inside the file (a cut-off download fails here, not mid-write)."""
    if src.driver != "GTiff" or "://" in path:
        return
    size = os.path.getsize(path)
    by, bx = src.block_shapes[0]
    ny, nx = math.ceil(src.height / by), math.ceil(src.width / bx)
    for b in range(1, src.count + 1):
        for (r, c) in ((ny - 1, nx - 1), (0, 0)) if ny * nx > 4096 else ((r, c) for r in range(ny) for c in range(nx)):
            off = src.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=b)
            cnt = src.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=b)
            if off and cnt and int(off) + int(cnt) > size:
                raise IngestError(
                    f"{path}: truncated GeoTIFF (band {b} block {r},{c} ends at byte {int(off) + int(cnt)}, "
                    f"file has {size} bytes)"
                )


def inspect_file(path: str, cube_crs: str | None, max_pixels: int) -> FileInfo:
    """Open a raster's header and check it can be ingested; raises :class:`IngestError` naming the file."""
    try:
        src = open_raster(path)
    except rasterio.errors.RasterioIOError as exc:
        raise IngestError(f"{path}: not a readable raster ({exc})") from None
    except SourceError as exc:
        raise IngestError(str(exc)) from None
    with src:
        src_crs = source_crs(src, path)
        if src_crs is None:
            raise IngestError(f"{path}: the raster has no CRS (georeferencing missing); cannot place it on the cube")
        if src.transform.is_identity:
            raise IngestError(f"{path}: the raster has no geotransform; cannot place it on the cube")
        if src.width * src.height > max_pixels:
            raise IngestError(
                f"{path}: {src.width} x {src.height} px exceeds the limit of {max_pixels} px per file "
                "(raise --max-pixels if this is intended)"
            )
        _check_not_truncated(src, path)
        if any(np.dtype(d).kind not in "uif" for d in src.dtypes):
            kinds = sorted({d for d in src.dtypes if np.dtype(d).kind not in "uif"})
            raise IngestError(f"{path}: {', '.join(kinds)} values: geowm ingests real numbers (reflectance, "
                              "backscatter); take the intensity or amplitude of complex (SAR SLC) data first")
        crs = src_crs.to_string()
        bounds = tuple(src.bounds)
        if cube_crs is not None:
            bounds = tuple(transform_bounds(src_crs, cube_crs, *bounds, densify_pts=21))
        return FileInfo(
            path=path, crs=crs, bounds_in_cube_crs=bounds, transform=tuple(src.transform), res=abs(src.res[0]),
            dtypes=tuple(src.dtypes), nodata=src.nodata, scales=tuple(src.scales), offsets=tuple(src.offsets),
            count=src.count, width=src.width, height=src.height,
            pixel_bytes=sum(np.dtype(d).itemsize for d in src.dtypes) * src.width * src.height,
        )


def _inspect_all(paths: Sequence[str], cube_crs: str | None, max_pixels: int) -> dict[str, FileInfo]:
    """:func:`inspect_file` of every path, on threads where some are URLs (:func:`geowm.scene.io_map`: their round
    trips overlap); the first bad file in ``paths`` order raises, as one by one."""
    infos = io_map(lambda p: inspect_file(p, cube_crs, max_pixels), paths, overlap=any(is_url(p) for p in paths))
    return dict(zip(paths, infos, strict=True))


def _check_vector_mask(path: str) -> None:
    """A GML mask must be readable; raises :class:`IngestError` naming the file."""
    try:
        read_vector_mask(path)
    except SourceError as exc:
        raise IngestError(str(exc)) from None


def _overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ------------------------------------------------------------------------------------------- planning


def _group_by_date(scenes: Sequence[Scene]) -> dict[np.datetime64, list[Scene]]:
    """Scenes of one UTC calendar day form one cube time step, dated at their earliest acquisition."""
    by_day: dict[object, list[Scene]] = {}
    for s in scenes:
        by_day.setdefault(s.datetime.astimezone(UTC).date(), []).append(s)
    out = {}
    for group in by_day.values():
        group.sort(key=lambda s: s.id)  # mosaic order: scene id
        t = min(s.datetime for s in group).astimezone(UTC).replace(tzinfo=None)
        out[np.datetime64(t, "s")] = group
    return dict(sorted(out.items()))


NOT_REFLECTANCE = frozenset({"pan", "lwir", "lwir11", "lwir12", "cirrus"})  # left out of a new cube unless --bands


def _by_common_name(scenes: Sequence[Scene], wanted: Sequence[str] | None) -> None:
    """Bands asked for by a STAC common name (``--bands blue,green,red,nir08``, or a cube whose bands are so named)
    that a scene has under its own name (Sentinel-2's ``B04``, Landsat's ``SR_B4``) take the common name: one cube
    of several sensors, each band one spectral band whatever each product calls it (``nir08`` pairs Sentinel-2's
    ``B8A`` with Landsat OLI's ``B5``, as HLS does). A common name two bands of a scene share (Sentinel-2's three
    ``rededge``) is not resolved."""
    for s in scenes:
        for name in wanted or ():
            hits = [b for b, c in s.common_names.items() if c == name and b in s.bands]
            if name in COMMON_NAMES and name not in s.bands and len(hits) == 1:
                s.bands[name] = replace(s.bands.pop(hits[0]), name=name)
                s.common_names[name] = s.common_names.pop(hits[0])


def _resolve_bands(scenes: Sequence[Scene], state: CubeState | None, wanted: Sequence[str] | None) -> list[str]:
    if state is not None:
        bands = list(state.bands)
    elif wanted:
        bands = list(wanted)
    else:  # every band, but those of another kind than surface reflectance (panchromatic, thermal, cirrus) and
        # quality or auxiliary layers (QA60, MSK_CLDPRB, AOT, TCI_R... of a multi-band export)
        other = {b for s in scenes for b, c in s.common_names.items() if c in NOT_REFLECTANCE}
        other |= {b for s in scenes for b in s.bands if is_auxiliary_band(b)}
        bands = sorted({b for s in scenes for b in s.bands} - other, key=natural_key)
    for s in scenes:
        missing = [b for b in bands if b not in s.bands]
        if missing:
            where = s.origin or s.id
            raise IngestError(
                f"{where}: scene {s.id!r} is missing band(s) {', '.join(missing)} "
                f"(it has {', '.join(sorted(s.bands, key=natural_key))}; the cube needs {', '.join(bands)})"
            )
    return bands


def _common_names(scenes: Sequence[Scene], bands: Sequence[str], state: CubeState | None) -> list[str]:
    """Each cube band's STAC common name ("" unknown; :mod:`geowm.bands`): the cube's, else the scenes'.
    One band name must mean one spectral band in a cube: a band the scenes (or the cube and a scene) give
    different common names, such as Landsat 8's ``B4`` (red) beside Landsat 7's (near-infrared), is refused."""
    recorded = dict(zip(state.bands, state.common_names, strict=True)) if state and state.common_names else {}
    out = []
    for b in bands:
        seen: dict[str, Scene] = {}
        for s in scenes:
            if s.common_names.get(b):
                seen.setdefault(s.common_names[b], s)
        if recorded.get(b) and any(c != recorded[b] for c in seen):
            s = next(s for c, s in seen.items() if c != recorded[b])
            raise IngestError(
                f"{s.bands[b].path}: band {b!r} of scene {s.id!r} is {s.common_names[b]!r}, but the cube's {b!r} is "
                f"{recorded[b]!r}: one band name is one spectral band in a cube; ingest this sensor into its own cube; "
                "nothing was ingested")
        if len(seen) > 1:
            (c1, s1), (c2, s2) = list(seen.items())[:2]
            raise IngestError(
                f"{s2.bands[b].path}: band {b!r} of scene {s2.id!r} is {c2!r}, but in scene {s1.id!r} "
                f"({s1.bands[b].path}) it is {c1!r}: one band name is one spectral band in a cube; ingest each "
                "sensor into its own cube; nothing was ingested")
        out.append(recorded.get(b) or next(iter(seen), ""))
    return out


def _new_grid(infos: Sequence[FileInfo], opts: IngestOptions) -> CubeGrid:
    first = infos[0]
    crs = opts.crs or first.crs
    if opts.crs:
        from rasterio.crs import CRS

        try:
            crs = CRS.from_user_input(opts.crs).to_string()
        except Exception:
            raise IngestError(f"--crs {opts.crs!r}: not a valid CRS") from None
    same_crs = [i for i in infos if i.crs == crs]
    resolution = opts.resolution or (min(i.res for i in same_crs) if same_crs else None)
    if resolution is None:
        raise IngestError(f"no source is in {crs}; pass --resolution for the cube grid")
    if opts.bounds:
        bounds = opts.bounds
    elif opts.bbox:
        try:
            bounds = transform_bounds("EPSG:4326", crs, *opts.bbox, densify_pts=21)
        except Exception as exc:
            raise IngestError(f"--bbox {opts.bbox}: cannot express it in {crs} ({exc})") from None
    else:
        bs = [transform_bounds(i.crs, crs, *_native_bounds(i), densify_pts=21) for i in infos]
        bounds = (min(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs), max(b[3] for b in bs))
    anchor_src = same_crs[0] if same_crs else None
    anchor = (anchor_src.transform[2], anchor_src.transform[5]) if anchor_src else (0.0, 0.0)
    try:
        return CubeGrid.covering(crs, resolution, bounds, anchor, opts.tile_size)
    except ValueError as exc:
        raise IngestError(f"cannot build the cube grid: {exc}") from None


def _native_bounds(info: FileInfo) -> tuple[float, float, float, float]:
    from affine import Affine

    t = Affine(*info.transform[:6])
    xs = [t.c, t.c + t.a * info.width]
    ys = [t.f, t.f + t.e * info.height]
    return (min(xs), min(ys), max(xs), max(ys))


def _encoding(bands: Sequence[tuple[BandRef, FileInfo]], state: CubeState | None) -> Encoding:
    """How the cube stores values: the cube's (``state``), else the new cube's from its first source band (dtype
    of all the bands; float64 stored as float32), or float32 physical values where its bands come at scales no one
    integer encoding holds; every band must fit it (:func:`_check_scaling`)."""
    infos = [i for _, i in bands]
    if state is not None:
        for i in infos:
            for d in i.dtypes:
                if np.dtype(d).kind == "f" and np.dtype(state.encoding.dtype).kind == "f":
                    continue  # any float source into a float cube (float64 into float32, as a new cube stores it)
                if not np.can_cast(np.dtype(d), np.dtype(state.encoding.dtype), "same_kind") or (
                    np.dtype(d).itemsize > np.dtype(state.encoding.dtype).itemsize
                ):
                    raise IngestError(
                        f"{i.path}: unexpected dtype {d}; the cube stores {state.encoding.dtype}"
                    )
        enc = state.encoding
    else:
        dtype = np.result_type(*[np.dtype(d) for i in infos for d in i.dtypes])
        if dtype == np.float64:  # stackstac's default and some exports: float32's 7 digits hold reflectance, in half
            dtype = np.dtype(np.float32)  # the bytes (the model reads float32 anyway)
        ref, first = bands[0]
        fill = implicit_nodata(str(first.dtypes[0]), first.nodata)
        if fill is None:  # signed ints without nodata: use the dtype minimum as fill
            fill = float(np.iinfo(dtype).min)
        scale, offset = _read_scaling(ref, first) or (1.0, 0.0)
        enc = Encoding(str(dtype), float(fill), float(scale), float(offset))
        if any(r.own_scaling or not _holds(enc, _read_scaling(r, i)) for r, i in bands):
            # bands of several scales (Landsat Level-1: one per scene, and on Landsat 4-7 per band): float32
            enc = Encoding("float32", float("nan"), 1.0, 0.0)
    _check_scaling(bands, enc)
    return enc


def _assign_scaling(scenes: Sequence[Scene], bands: Sequence[str], infos: dict[str, FileInfo],
                    opts: IngestOptions) -> None:
    """Give the bands whose scale and offset nothing states (:func:`_read_scaling` None) those of ``--scale`` /
    ``--offset``; bands that state their own keep them."""
    if opts.scale is None and opts.offset is None:
        return
    scaling = (1.0 if opts.scale is None else float(opts.scale), 0.0 if opts.offset is None else float(opts.offset))
    for s in scenes:
        for b in bands:
            if _read_scaling(s.bands[b], infos[s.bands[b].path]) is None:
                s.bands[b] = replace(s.bands[b], scale=scaling[0], offset=scaling[1])


def _read_scaling(ref: BandRef, info: FileInfo) -> tuple[float, float] | None:
    """The (scale, offset) band ``ref`` is read at (:func:`band_scaling`, its file's tags from ``info``)."""
    return band_scaling(ref, info.scales[ref.index - 1], info.offsets[ref.index - 1])


def _check_scaling(bands: Sequence[tuple[BandRef, FileInfo]], enc: Encoding) -> None:
    """Every source band's values must become the cube's: a band of another scale or offset (GeoTIFF tags, STAC
    ``raster:bands``, a product's convention) is converted on ingest, which an integer cube holds exactly only
    for the same scale and an offset of whole steps (Sentinel-2's processing baseline 04.00 added -1000 to
    every value: reflectance offset -0.1 at scale 0.0001). Other mixes are refused, naming the file. A band
    whose scale and offset nothing states (a GeoTIFF without tags, no STAC or product convention) is taken at
    the cube's. (A new cube of such a mix is float32: :func:`_encoding`.)"""
    to = (enc.scale, enc.offset)
    for ref, info in bands:
        frm = _read_scaling(ref, info)
        if not _holds(enc, frm):
            raise IngestError(
                f"{ref.path}: band {ref.name!r} has scale {frm[0]:g} and offset {frm[1]:g}, but the cube stores "
                f"{enc.dtype} values at scale {to[0]:g} and offset {to[1]:g}, which cannot hold them exactly; "
                "ingest bands of another scale (such as a thermal band beside reflectance) into their own cube "
                "(--bands); nothing was ingested")


def _holds(enc: Encoding, frm: tuple[float, float] | None) -> bool:
    """Whether the cube's encoding holds values of scale/offset ``frm`` exactly (None: taken at the cube's): a float
    cube any, an integer one the same scale with an offset of whole steps."""
    to = (enc.scale, enc.offset)
    if frm is None or same_scaling(frm, to) or np.dtype(enc.dtype).kind == "f":
        return True
    steps = (frm[1] - to[1]) / to[0]
    return abs(frm[0] - to[0]) <= 1e-6 * abs(to[0]) and abs(steps - round(steps)) <= 1e-3


# ------------------------------------------------------------------------------------------- workers


def buffer_pixels(grid: CubeGrid, metres: float) -> int:
    """The cloud-mask buffer of ``metres`` in whole pixels of ``grid`` (rounded up; a geographic grid's pixel
    counted as its size at the equator, so the buffer is never narrower than asked)."""
    if metres <= 0:
        return 0
    from rasterio.crs import CRS

    size = abs(grid.resolution) * (METRES_PER_DEGREE if CRS.from_user_input(grid.crs).is_geographic else 1.0)
    return max(1, math.ceil(metres / size - 1e-9))


def _build_block(fork, cube: str, base_snapshot: str | None, grid: CubeGrid, bands: list[str], enc: Encoding,
                 region: Tile, t0: int, entries: list[tuple[str, object]], resampling: str, buffer_px: int = 0):
    """Build and write one block: time indexes ``t0 .. t0+len(entries)`` x ``region`` (whole tiles).

    ``entries`` holds ("old", index in the base snapshot) or ("new", scenes of that date). The block is
    written into ``fork`` (an Icechunk ForkSession), returned for the coordinator to merge together with
    the ids of the new scenes that have data in this region.
    """
    import icechunk

    h, w = region.shape
    n = len(entries)
    data = np.full((n, len(bands), h, w), enc.fill, enc.dtype)
    valid = np.zeros((n, h, w), bool)
    old = [(k, int(j)) for k, (kind, j) in enumerate(entries) if kind == "old"]
    if old:
        repo = icechunk.Repository.open(storage_for(cube))
        g = zarr.open_group(repo.readonly_session(snapshot_id=base_snapshot).store, mode="r")
        js = [j for _, j in old]
        lo, hi = min(js), max(js) + 1
        r = g["reflectance"][lo:hi, :, region.y, region.x]
        v = g["valid"][lo:hi, region.y, region.x]
        for k, j in old:
            data[k], valid[k] = r[j - lo], v[j - lo]
    news = [(k, scenes) for k, (kind, scenes) in enumerate(entries) if kind == "new"]

    def read(k: int, scenes) -> list[str]:  # into its own date of the block; the ids of the scenes with data
        data[k], valid[k], has_data = mosaic_date(scenes, bands, grid, region, enc, Resampling[resampling], buffer_px)
        return [s.id for s, yes in zip(scenes, has_data, strict=True) if yes]

    remote = any(is_url(p) for _, scenes in news for s in scenes for p in s.files)  # reads wait on the network
    seen = {sid for ids in io_map(lambda item: read(*item), news, overlap=remote) for sid in ids}
    out = zarr.open_group(fork.store, mode="r+")
    out["reflectance"][t0: t0 + n, :, region.y, region.x] = data
    out["valid"][t0: t0 + n, region.y, region.x] = valid
    return fork, seen


def _regions(grid: CubeGrid, n_time_chunks: int, block_bytes_per_row: int, workers: int,
             max_bytes: int = 128 * 2**20) -> list[Tile]:
    """Split the grid into bands of whole tile rows: as large as ``max_bytes`` allows (few file opens,
    big reads) yet enough of them to keep ``workers`` busy."""
    rows, _ = grid.n_tiles
    per_tile_row = block_bytes_per_row * grid.tile_size
    by_memory = max(1, max_bytes // max(per_tile_row, 1))
    by_parallelism = max(1, rows * n_time_chunks // (4 * workers))
    step = int(max(1, min(by_memory, by_parallelism, rows)))
    s = grid.tile_size
    return [Tile(r, 0, slice(r * s, min((r + step) * s, grid.height)), slice(0, grid.width))
            for r in range(0, rows, step)]


class _Executor:
    """dask.distributed client for the requested scheduler, or plain in-process calls."""

    def __init__(self, scheduler: str):
        self.client = self.cluster = None
        self.workers = 1
        if scheduler == "synchronous":
            return
        from distributed import Client, LocalCluster

        if scheduler in ("local", "threads"):
            n = max(1, os.cpu_count() or 1)
            # no dashboard; the scheduler's HTTP server (health routes) on a free loopback port, not :8787
            if scheduler == "local":  # worker processes, bound to loopback
                import dask

                saved_env = dict(os.environ)  # the nanny exports its pre-spawn variables into this process
                # distributed's default MALLOC_TRIM_THRESHOLD_=65536 halves the workers' speed here
                # (many short-lived decode buffers); keep glibc's default
                with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                    self.cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                                dashboard_address="127.0.0.1:0", silence_logs=40,
                                                scheduler_kwargs={"dashboard": False})
                os.environ.clear()
                os.environ.update(saved_env)
            else:  # one in-process worker with a thread per core
                self.cluster = LocalCluster(n_workers=1, threads_per_worker=n, processes=False,
                                            dashboard_address="127.0.0.1:0", silence_logs=40,
                                            worker_dashboard_address="127.0.0.1:0",  # else its HTTP server: 0.0.0.0
                                            scheduler_kwargs={"dashboard": False})
            self.client = Client(self.cluster)
        else:
            self.client = Client(scheduler)
        self.workers = max(1, sum(self.client.nthreads().values()))

    def map_unordered(self, fn: Callable, calls: list[tuple], window: int):
        if self.client is None:
            for args in calls:
                yield fn(*args)
            return
        from distributed import as_completed

        pending = iter(calls)
        futures = [self.client.submit(_portable, fn, *a, pure=False) for a in _take(pending, window)]
        ac = as_completed(futures)
        for fut in ac:
            result = fut.result()
            fut.release()
            for a in _take(pending, 1):
                ac.add(self.client.submit(_portable, fn, *a, pure=False))
            yield result

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _portable(fn: Callable, *args):
    """``fn(*args)`` on a dask worker. A geowm error (a file that fails while its pixels are read) is raised
    again without the library exception it was raised from: distributed pickles an exception with its chain and
    sends a bare ``Exception`` in its place when a link does not unpickle (rasterio's), which the caller would
    not recognise."""
    try:
        return fn(*args)
    except (ReadError, IngestError, SourceError) as exc:
        error = exc
    raise type(error)(*error.args)


def _take(it, n):
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


# ------------------------------------------------------------------------------------------- writing


def _create_template(store, grid: CubeGrid, bands: list[str], common_names: list[str], times: np.ndarray,
                     enc: Encoding, time_chunk: int) -> None:
    """Write the cube's metadata and coordinates (no pixel chunks) into an empty Icechunk session."""
    import dask.array as da
    from rasterio.crs import CRS

    ts = grid.tile_size
    nt, nb = len(times), len(bands)
    refl = da.zeros((nt, nb, grid.height, grid.width), dtype=enc.dtype, chunks=(time_chunk, nb, ts, ts))
    valid = da.zeros((nt, grid.height, grid.width), dtype=bool, chunks=(time_chunk, ts, ts))
    crs = CRS.from_user_input(grid.crs)
    sref = xr.DataArray(0, attrs={
        "crs_wkt": crs.to_wkt(), "spatial_ref": crs.to_wkt(),
        "GeoTransform": " ".join(str(v) for v in grid.transform.to_gdal()),
    })
    if crs.to_epsg():
        sref.attrs["epsg_code"] = f"EPSG:{crs.to_epsg()}"
    ds = xr.Dataset(
        {"reflectance": (("time", "band", "y", "x"), refl), "valid": (("time", "y", "x"), valid)},
        coords={"time": times.astype("datetime64[ns]"), "band": np.array(bands, dtype=object),
                "common_name": ("band", np.array(common_names, dtype=object)), "y": grid.y, "x": grid.x,
                "spatial_ref": sref},
    )
    units = "metre" if crs.is_projected else "degree"
    ds.x.attrs.update(standard_name="projection_x_coordinate" if crs.is_projected else "longitude", units=units,
                      axis="X", long_name="x coordinate of cell centre")
    ds.y.attrs.update(standard_name="projection_y_coordinate" if crs.is_projected else "latitude", units=units,
                      axis="Y", long_name="y coordinate of cell centre")
    ds.time.attrs.update(standard_name="time", long_name="acquisition time (UTC)", axis="T")
    ds.band.attrs.update(long_name="band name as ingested")
    ds.common_name.attrs.update(long_name="STAC eo common name of the band (empty: unknown)")
    ds.reflectance.attrs.update(long_name="band values as ingested", grid_mapping="spatial_ref",
                                coordinates="spatial_ref common_name")
    ds.valid.attrs.update(long_name="observed, not cloud, not fill", grid_mapping="spatial_ref",
                          coordinates="spatial_ref")
    ds.attrs.update({"Conventions": "CF-1.8", "geowm:format": FORMAT, "geowm:tile_size": ts, "geowm:sources": []})
    from zarr.codecs import BloscCodec

    # blosc-zstd level 1 with bit shuffling: as fast to write as plain zstd level 0, ~20 % smaller
    fast = [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")]
    refl_enc: dict = {"dtype": enc.dtype, "chunks": (time_chunk, nb, ts, ts), "_FillValue": _fill_value(enc),
                      "compressors": fast}
    if enc.scale != 1.0 or enc.offset != 0.0:
        refl_enc.update(scale_factor=np.float32(enc.scale), add_offset=np.float32(enc.offset))
    encoding = {
        "reflectance": refl_enc,
        "valid": {"chunks": (time_chunk, ts, ts), "compressors": fast},
        "time": {"units": "seconds since 1970-01-01T00:00:00", "calendar": "proleptic_gregorian", "dtype": "int64",
                 "chunks": (4096,)},
    }
    ds.to_zarr(store, mode="w", compute=False, encoding=encoding, zarr_format=3, consolidated=False)


def _fill_value(enc: Encoding):
    kind = np.dtype(enc.dtype).kind
    return np.dtype(enc.dtype).type(enc.fill) if kind != "f" else np.dtype(enc.dtype).type(enc.fill)


def _local_files(cube: str) -> set[str] | None:
    if "://" in cube:
        return None
    root = Path(cube)
    return {str(p) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _remove_new_files(cube: str, before: set[str] | None, created_cube: bool) -> None:
    """After a failed batch, remove what it wrote (uncommitted chunks) so the store is as it was."""
    if before is None:
        return
    root = Path(cube)
    if created_cube:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        return
    for p in sorted(root.rglob("*"), reverse=True):
        if p.is_file() and str(p) not in before:
            p.unlink(missing_ok=True)
    for p in sorted(root.rglob("*"), reverse=True):
        if p.is_dir() and not any(p.iterdir()) and not any(b.startswith(str(p) + os.sep) for b in before):
            p.rmdir()


def ingest(source: str | Path, cube: str | Path, opts: IngestOptions | None = None,
           progress: Callable[[int, int], None] | None = None) -> IngestReport:
    """Ingest every new scene of ``source`` (folder of GeoTIFFs or STAC JSON) into ``cube``.

    Returns an :class:`IngestReport`. Raises :class:`IngestError`/:class:`geowm.sources.SourceError`
    for bad input (the cube is then unchanged) and :class:`geowm.cube.store.CubeError` for an
    unusable cube or one another process is writing.
    """
    opts = opts or IngestOptions()
    cube = str(cube)
    t_start = _time.perf_counter()
    if opts.tile_size < 16 or opts.time_chunk < 1:
        raise IngestError(f"bad options: tile size {opts.tile_size} (>= 16) / time chunk {opts.time_chunk} (>= 1)")
    if opts.resampling not in Resampling.__members__:
        raise IngestError(f"--resampling {opts.resampling!r}: one of {', '.join(Resampling.__members__)}")
    if opts.scale is not None and not (math.isfinite(opts.scale) and opts.scale != 0):
        raise IngestError(f"--scale {opts.scale!r}: a finite, non-zero number (physical = value * scale + offset)")
    if opts.offset is not None and not math.isfinite(opts.offset):
        raise IngestError(f"--offset {opts.offset!r}: a finite number (physical = value * scale + offset)")
    if opts.mask_buffer is not None and not (math.isfinite(opts.mask_buffer) and
                                             0 <= opts.mask_buffer <= MAX_MASK_BUFFER_M):
        raise IngestError(f"--mask-buffer {opts.mask_buffer!r}: metres, 0 to {MAX_MASK_BUFFER_M:g}")
    if opts.bbox is not None and opts.bounds is not None and opts.search is None:
        raise IngestError("give the new cube's area as --bounds (cube CRS) or --bbox (degrees), not both")
    search = opts.search
    if search is not None and opts.bbox is not None and search.bbox is None:
        search = replace(search, bbox=opts.bbox)
    scenes = discover(source, opts.mask_band, opts.mask_clear, opts.mask_bits, opts.band_names, search)
    report = IngestReport(cube=cube)
    local = "://" not in cube
    existed = Path(cube).exists() if local else True
    with cube_lock(cube):  # everything below sees the cube as the previous writer left it
        if local and not cube_exists(cube) and any(p.name not in ICECHUNK_ENTRIES for p in Path(cube).iterdir()):
            raise CubeError(f"{cube}: exists and is not a geowm cube; refusing to write into it")
        created = not cube_exists(cube) or not has_commits(icechunk_repo(cube))
        state = None if created else read_state(cube)
        if opts.band_names is None and state is not None:
            opts = _adopt_band_names(scenes, state.sources, opts)
        new = _new_scenes(scenes, state, opts.replace, report)
        if opts.mask_band is None and state is not None:
            _adopt_mask_band(new, state.sources, opts)
        if not new:
            report.seconds = _time.perf_counter() - t_start
            return report
        _by_common_name(new, list(state.bands) if state else opts.bands)
        bands = _resolve_bands(new, state, opts.bands)
        common = _common_names(new, bands, state)
        cube_crs = state.grid.crs if state else opts.crs
        rasters = []
        for s in new:
            for ref in [*(s.bands[b] for b in bands), *([s.mask] if s.mask else [])]:
                if is_vector_mask(ref.path):  # polygons, no grid of their own: read them now, to fail before writing
                    _check_vector_mask(ref.path)
                else:
                    rasters.append(ref.path)
        infos = _inspect_all(list(dict.fromkeys(rasters)), cube_crs, opts.max_pixels)
        grid = state.grid if state else _new_grid(list(infos.values()), opts)
        if state is None:  # bounds were in each file's own CRS: express them in the new cube's
            if grid.width * grid.height > opts.max_pixels:
                raise IngestError(f"{cube}: the new cube grid would be {grid.width} x {grid.height} px, above the "
                                  f"limit of {opts.max_pixels} px (check --resolution/--bounds, or raise --max-pixels)")
            infos = {p: replace(i, bounds_in_cube_crs=tuple(transform_bounds(i.crs, grid.crs, *_native_bounds(i),
                                                                             densify_pts=21)))
                     for p, i in infos.items()}
        for info in infos.values():
            if not _overlaps(info.bounds_in_cube_crs, grid.bounds):
                raise IngestError(
                    f"{info.path}: does not overlap the cube "
                    f"(file bounds {tuple(round(v, 1) for v in info.bounds_in_cube_crs)}"
                    f" vs cube bounds {tuple(round(v, 1) for v in grid.bounds)} in {grid.crs})"
                )
        _assign_scaling(new, bands, infos, opts)
        enc = _encoding([(s.bands[b], infos[s.bands[b].path]) for s in new for b in bands], state)
        groups = _group_by_date(new)
        old_times = state.times if state is not None else np.array([], "datetime64[s]")
        old_day = {t.astype("datetime64[D]"): t for t in old_times}
        replaced = {old_day[t.astype("datetime64[D]")] for t in groups if t.astype("datetime64[D]") in old_day}
        if replaced and not opts.replace:
            t = min(t for t in groups if t.astype("datetime64[D]") in old_day)
            group = groups[t]
            raise IngestError(
                f"{group[0].origin or group[0].id}: date {t.astype('datetime64[D]')} is already in the cube "
                f"from other scenes ({', '.join(s.id for s in group)} not ingested); "
                "ingest all footprints of a date together, or pass --replace to overwrite that date"
            )
        kept = [t for t in old_times if t not in replaced]
        merged = np.array(sorted([*kept, *groups.keys()]), "datetime64[s]")
        first_new = int(np.searchsorted(merged, min(groups)))
        ct = state.time_chunk if state else opts.time_chunk
        start = (first_new // ct) * ct
        old_index = {t: i for i, t in enumerate(old_times) if t not in replaced}
        entries = [("old", old_index[t]) if t in old_index else ("new", groups[t]) for t in merged]
        report.source_bytes = sum(i.pixel_bytes for i in infos.values())
        replaced_days = {t.astype("datetime64[D]") for t in replaced}
        sources = [r for r in (state.sources if state else [])
                   if np.datetime64(r["datetime"][:10], "D") not in replaced_days]

        opts = _resolve_mask_rule(new, sources, opts)
        if opts.dry_run:
            report.plan = _plan(created, grid, bands, common, enc, new, infos, opts, ct)
            report.added_times = [str(t) for t in groups if t.astype("datetime64[D]") not in replaced_days]
            report.replaced_times = [str(t) for t in sorted(replaced)]
            report.seconds = _time.perf_counter() - t_start
            return report
        memo: dict[str, list] = {}  # a datacube's store is fingerprinted once for all its time steps
        records = [{"id": s.id, "datetime": s.datetime.isoformat(), "files": [public_href(f) for f in s.files],
                    "footprint": footprint([(i.crs, i.transform, i.width, i.height) for f in s.files
                                            if (i := infos.get(f)) is not None]),
                    "content": scene_fingerprints(s, memo=memo), "mask": mask_rule(s, opts),
                    **({"band_names": list(opts.band_names)} if opts.band_names else {})} for s in new]
        before = _local_files(cube)
        try:
            report.snapshot = _write(cube, created, state, grid, bands, common, merged, enc, ct, start, entries,
                                     new, sources + records, opts, progress, report)
        except BaseException:
            _remove_new_files(cube, before, created and not existed)
            raise
        report.added_times = [str(t) for t in groups]
        report.replaced_times = [str(t) for t in sorted(replaced)]
    report.seconds = _time.perf_counter() - t_start
    return report


def _plan(created: bool, grid: CubeGrid, bands: list[str], common: list[str], enc: Encoding, new: list[Scene],
          infos: dict[str, FileInfo], opts: IngestOptions, time_chunk: int) -> dict:
    """What an ingest would write (``--dry-run``): the cube's grid, bands and encoding, and per scene its date,
    files, the scale and offset each band is read at (None: taken at the cube's) and its mask rule."""
    def band(ref: BandRef) -> dict:
        info = infos[ref.path]
        scaling = _read_scaling(ref, info)
        return {"file": ref.path, "index": ref.index, "dtype": info.dtypes[ref.index - 1],
                "scale": scaling[0] if scaling else None, "offset": scaling[1] if scaling else None}

    return {
        "new_cube": created,
        "grid": {"crs": rasterio.crs.CRS.from_user_input(grid.crs).to_string(), "resolution": grid.resolution,
                 "width": grid.width, "height": grid.height, "bounds": list(grid.bounds),
                 "tile_size": grid.tile_size, "time_chunk": time_chunk},
        "bands": [{"name": b, "common_name": c} for b, c in zip(bands, common, strict=True)],
        "encoding": {"dtype": enc.dtype, "fill": enc.fill, "scale": enc.scale, "offset": enc.offset},
        "scenes": [{"id": s.id, "datetime": s.datetime.isoformat(), "files": s.files,
                    "bands": {b: band(s.bands[b]) for b in bands}, "mask": mask_rule(s, opts)} for s in new],
    }


def icechunk_repo(cube: str):
    import icechunk

    return icechunk.Repository.open(storage_for(cube))


def mask_rule(scene: Scene, opts: IngestOptions) -> dict | None:
    """How ``scene``'s clear pixels are told (recorded with every source in the cube): the mask band, its
    values taken as clear (``clear``) or, for a bit mask, the bits that flag a pixel (``bits``; ``clear`` empty),
    and the buffer around flagged pixels in metres; None without a mask band."""
    if scene.mask is None:
        return None
    rule = {"band": scene.mask.name.upper(), "clear": sorted(int(v) for v in scene.mask_clear),
            "buffer_m": float(opts.mask_buffer)}
    if scene.mask_bits:
        rule["bits"] = sorted(int(b) for b in scene.mask_bits)
    return rule


def _adopt_band_names(scenes: Sequence[Scene], kept: Sequence[dict], opts: IngestOptions) -> IngestOptions:
    """Scenes whose bands carry no names (``band1``...) take the ``--band-names`` the cube's latest sources were
    given, where their band count fits (an append by ``geowm ingest`` or the pipeline leaving the option out reads
    a stack as the cube's first delivery was read); returns the options with those names, for the record."""
    given = next((rec["band_names"] for rec in reversed(kept) if rec.get("band_names")), None)
    hits = [s for s in scenes if given and len(s.files) == 1 and is_unnamed(s)
            and len(s.bands) + (s.mask is not None) == len(given)]
    for s in hits:
        assign_band_names(s, given, opts.mask_band)
        set_mask_rule(s, opts.mask_clear, opts.mask_bits)
    return replace(opts, band_names=list(given)) if hits else opts


def _adopt_mask_band(new: Sequence[Scene], kept: Sequence[dict], opts: IngestOptions) -> None:
    """A scene without a mask band whose band of the name the cube's mask band has (a custom mask named by
    ``--mask-band`` when the cube was made) takes that band as its mask, so that an append leaving
    ``--mask-band`` out reads it as the cube's other scenes were read, not as data (with the clear values or
    bits of ``opts`` where given, else by the cube's rule: :func:`_resolve_mask_rule`)."""
    names = {rec["mask"]["band"] for rec in kept if rec.get("mask")}
    for s in new:
        hit = next((b for b in s.bands if b.upper() in names), None) if s.mask is None else None
        if hit is not None:
            with_mask(s, hit)
            set_mask_rule(s, opts.mask_clear, opts.mask_bits)


def _resolve_mask_rule(new: Sequence[Scene], kept: Sequence[dict], opts: IngestOptions) -> IngestOptions:
    """Read ``new`` scenes' mask bands by the cube's rule, and refuse another rule given explicitly.

    One cube keeps one rule per mask band (clear values or flag bits, and buffer): a model trained on it, its
    climatologies and the anomaly scores' own history compare dates, and a date masked otherwise is a change of
    the data, not of the land. Options left unset (``mask_clear``, ``mask_bits``, ``mask_buffer`` None) take the
    rule the cube's ``kept`` sources were recorded with, else the defaults; a different rule given explicitly is
    an :class:`IngestError`. Sources recorded before rules were (no ``mask`` key) are not compared; ``--replace``
    of every date that holds the old rule lifts it. Returns the options with the buffer set."""
    cube_rule: dict[str, tuple[dict, str]] = {}
    for rec in kept:
        if rec.get("mask"):
            cube_rule.setdefault(rec["mask"]["band"], (rec["mask"], rec["id"]))
    buffer = opts.mask_buffer
    for s in new:
        hit = cube_rule.get(s.mask.name.upper()) if s.mask is not None else None
        if hit is not None:
            if opts.mask_clear is None and opts.mask_bits is None:
                s.mask_clear, s.mask_bits = frozenset(hit[0]["clear"]), frozenset(hit[0].get("bits", ()))
            if buffer is None:
                buffer = hit[0]["buffer_m"]
    opts = replace(opts, mask_buffer=0.0 if buffer is None else float(buffer))

    for s in new:
        rule = mask_rule(s, opts)
        if rule is None or rule["band"] not in cube_rule:
            continue
        old, rid = cube_rule[rule["band"]]
        if (old["clear"], old.get("bits", []), old["buffer_m"]) != (rule["clear"], rule.get("bits", []),
                                                                      rule["buffer_m"]):
            raise IngestError(
                f"{s.mask.path}: mask band {s.mask.name!r} would be read with {describe_mask_rule(rule)}, but the "
                f"cube's scenes (e.g. {rid!r}) were read with {describe_mask_rule(old)}; one cube keeps one mask "
                "rule: leave --mask-clear, --mask-bits and --mask-buffer out to use the cube's, or ingest into a new "
                "cube; nothing was ingested")
    return opts


def _new_scenes(scenes: Sequence[Scene], state: CubeState | None, replace: bool, report: IngestReport) -> list[Scene]:
    """Scenes not in the cube yet, plus (with ``replace``) those whose files changed since they were ingested.

    A scene is known by (id, datetime); its files' SHA-256 (recorded at ingest) tells whether it changed.
    Raises :class:`IngestError` for a changed scene without ``replace``.
    """
    known = {(r["id"], r["datetime"]): r for r in (state.sources if state else [])}
    memo: dict[str, list] = {}  # fingerprints of the files (datacubes: stores) already checked
    new = []
    for s in scenes:
        rec = known.get((s.id, s.datetime.isoformat()))
        if rec is None:
            new.append(s)
            continue
        old = rec.get("content")  # {path: [size, mtime_ns, sha256]}; None: URLs, or a cube from before it
        now = scene_fingerprints(s, old, memo) if old else None
        old_sums = sorted(v[2] for v in (old or {}).values())
        changed = [] if now is None or sorted(v[2] for v in now.values()) == old_sums else \
            [p for p in sorted(now) if now[p][2] not in old_sums] or sorted(now)
        if not changed:
            report.skipped_scenes.append(s.id)
        elif replace:
            new.append(s)
        else:
            raise IngestError(
                f"{changed[0]}: scene {s.id!r} of {s.datetime.date()} is already in the cube with other content "
                "(the file's SHA-256 differs from the one ingested); pass --replace to overwrite that date"
            )
    return new


def _write(cube, created, state, grid, bands, common, merged, enc, ct, start, entries, new, sources, opts, progress,
           report) -> str:
    """Write the batch on a temporary branch, then move ``main`` to it in one step (compare-and-swap).

    Metadata (new cube, or resized arrays and new time values) is committed on the temporary branch
    first, because Icechunk forks (one per dask task) need a session without uncommitted changes; the
    workers write their blocks into forks that are merged and committed; ``main`` is then reset to that
    snapshot only if it still points where it pointed when the ingest began.
    """
    import uuid

    import icechunk

    repo = icechunk.Repository.open_or_create(storage_for(cube))
    for branch in repo.list_branches():  # leftovers of a killed ingest (we hold the writer lock)
        if branch.startswith("ingest-"):
            repo.delete_branch(branch)
    base = repo.lookup_branch(BRANCH)
    tmp = f"ingest-{uuid.uuid4().hex[:12]}"
    repo.create_branch(tmp, base)
    session = repo.writable_session(tmp)
    if created:
        _create_template(session.store, grid, bands, common, merged, enc, ct)
    g = zarr.open_group(session.store, mode="r+")
    if not created:
        g["reflectance"].resize((len(merged), len(bands), grid.height, grid.width))
        g["valid"].resize((len(merged), grid.height, grid.width))
        g["time"].resize((len(merged),))
        g["time"][:] = merged.astype("int64")
    g.attrs["geowm:sources"] = sorted(sources, key=lambda s: (s["datetime"], s["id"]))
    session.commit("prepare ingest (metadata)")
    session = repo.writable_session(tmp)

    executor = _Executor(opts.scheduler)
    try:
        chunk_starts = list(range(start, len(merged), ct))
        row_bytes = ct * len(bands) * grid.width * np.dtype(enc.dtype).itemsize
        regions = _regions(grid, len(chunk_starts), row_bytes, executor.workers)
        buffer_px = buffer_pixels(grid, opts.mask_buffer)
        calls = [(session.fork(), cube, state.snapshot if state else None, grid, bands, enc, region, t0,
                  entries[t0: t0 + ct], opts.resampling, buffer_px) for t0 in chunk_starts for region in regions]
        window = 2 * executor.workers
        seen: set[str] = set()
        for done, (fork, has_data) in enumerate(executor.map_unordered(_build_block, calls, window), start=1):
            session.merge(fork)
            seen |= has_data
            if progress:
                progress(done, len(calls))
    finally:
        executor.close()
    empty = [s for s in new if s.id not in seen]
    if empty:
        s = empty[0]
        raise IngestError(f"{', '.join(s.files)}: scene {s.id!r} ({s.datetime.date()}) has no data inside the cube: "
                          "every pixel is NaN or nodata in at least one band; nothing was ingested")
    report.tiles_written = len(chunk_starts) * grid.n_tiles[0] * grid.n_tiles[1]
    old = set(state.times) if state is not None else set()
    days = ", ".join(str(t.astype("datetime64[D]")) for t in merged if t not in old)
    snapshot = session.commit(f"ingest {len(new)} scene(s): {days}",
                              metadata={"geowm": "ingest", "scenes": [s.id for s in new]})
    repo.reset_branch(BRANCH, snapshot, from_snapshot_id=base)
    repo.delete_branch(tmp)
    return snapshot
