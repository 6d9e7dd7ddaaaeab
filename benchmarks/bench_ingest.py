"""Ingest throughput against a raw rasterio read of the same files.

One synthetic region (``geowm.synth.generate``, kept under the work folder and reused while its
parameters match) is read three ways, all in this run and over the same files (the STAC catalog's
reflectance and SCL GeoTIFFs), after one untimed pass that puts the files in the page cache:

* raw read: open each file with rasterio and read every band fully, one process (best of two);
* ``ingest(..., IngestOptions(scheduler="synchronous"))``: the whole ingest on one core;
* ``ingest(..., scheduler="synchronous")`` of the same pixels as one Zarr datacube (format 3, a variable per band,
  chunks of one date x 512 x 512, CF scale/offset/_FillValue as the GeoTIFFs state them; read with zarr-python):
  the source a scientist saves from xarray; its cube must hold the same values as the GeoTIFFs' cube;
* ``ingest`` on a ``distributed.LocalCluster`` of k single-threaded worker processes, k = 1, 2, started
  here and passed by address (start-up, including importing geowm in the workers, is timed apart);
  diagnostic repeat of both without the ``MALLOC_TRIM_THRESHOLD_=65536`` that distributed's nanny puts
  in the workers' environment by default (it makes every large numpy allocation a fresh mmap); not in
  quick mode (time).

Throughput = decoded source bytes (``IngestReport.source_bytes``, the sum of the files' pixel
array sizes) / wall seconds of the call. Each ingest writes a fresh cube; the cubes' checksums
are compared (every scheduler must write the same cube) and the cubes deleted.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from pathlib import Path

import rasterio

from benchmarks._util import dir_bytes, mb, remove, target

PARAMS = {  # mode -> synthetic region
    "full": {"size": 1024, "start": "2021-01-01", "end": "2021-12-31", "seed": 11},
    "quick": {"size": 384, "start": "2021-01-01", "end": "2021-04-30", "seed": 11},
    "smoke": {"size": 128, "start": "2021-01-01", "end": "2021-02-28", "seed": 11},
}
DIAGNOSTICS = {"full": True, "quick": False, "smoke": True}  # the runs without MALLOC_TRIM_THRESHOLD_
WORKERS = (1, 2)
RAW_REPEATS = 2
TARGET_ONE_CORE_VS_RAW = 0.7


def source_region(workdir: Path, size: int, start: str, end: str, seed: int) -> tuple[Path, float | None]:
    """The synthetic region for these parameters: reused if already generated, else generated.

    Returns (folder, generation seconds or None when reused).
    """
    from geowm.synth import generate, recorded_parameters
    from geowm.synth.generator import OPTIONS, VERSION

    out = workdir / "source" / f"s{size}_{start}_{end}_seed{seed}"
    meta = out / "synth.json"
    want = {"size": size, "start": start, "end": end, "seed": seed, **OPTIONS,  # the options at their defaults
            "version": VERSION}
    if meta.exists() and (out / "stac" / "catalog.json").exists():
        try:
            if recorded_parameters(json.loads(meta.read_text())) == want:
                return out, None
        except ValueError:
            pass
    remove(out)  # missing, partial or different: start over
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    generate(out, size=size, start=start, end=end, seed=seed)
    return out, time.perf_counter() - t0


def source_files(catalog: Path) -> list[str]:
    """The files the ingest reads (data bands and masks of every catalog item), as geowm discovers them."""
    from geowm.sources import discover

    files: list[str] = []
    for scene in discover(catalog):
        for f in scene.files:
            if f not in files:
                files.append(f)
    return files


def raw_read(files: list[str]) -> tuple[float, int]:
    """Open each file and read all its bands (decoded), one process. Returns (seconds, decoded bytes)."""
    t0 = time.perf_counter()
    total = 0
    for path in files:
        with rasterio.open(path) as src:
            total += src.read().nbytes
    return time.perf_counter() - t0, total


def _warm_page_cache(files: list[str]) -> int:
    n = 0
    for path in files:
        n += len(Path(path).read_bytes())
    return n


def zarr_copy(files_of: list, store: Path) -> float:
    """Write the scenes ``files_of`` (geowm ``Scene`` records of one grid) as one Zarr 3 datacube at ``store``: a
    variable per band (``time, y, x``) and the mask, as the files hold them (dtype, scale, offset, nodata as
    ``_FillValue``), x/y pixel centres and a ``spatial_ref`` grid mapping. Returns the seconds it took."""
    import numpy as np
    import xarray as xr

    t0 = time.perf_counter()
    remove(store)
    refs = {**files_of[0].bands, **({files_of[0].mask.name: files_of[0].mask} if files_of[0].mask else {})}
    data, attrs, encoding = {}, {}, {}
    for name in refs:
        layers = []
        for scene in files_of:
            ref = scene.bands.get(name) or scene.mask
            with rasterio.open(ref.path) as src:
                layers.append(src.read(ref.index))
                transform, crs, nodata = src.transform, src.crs, src.nodata
                scale, offset = src.scales[ref.index - 1], src.offsets[ref.index - 1]
        data[name] = (("time", "y", "x"), np.stack(layers))
        attrs[name] = {"grid_mapping": "spatial_ref"}
        if (scale, offset) != (1.0, 0.0):
            attrs[name].update(scale_factor=scale, add_offset=offset)
        encoding[name] = {"chunks": (1, 512, 512), **({"_FillValue": nodata} if nodata is not None else {})}
    h, w = data[next(iter(data))][1].shape[1:]
    ds = xr.Dataset(data, coords={
        "time": np.array([s.datetime.replace(tzinfo=None) for s in files_of], "datetime64[ns]"),
        "y": transform.f + transform.e * (np.arange(h) + 0.5), "x": transform.c + transform.a * (np.arange(w) + 0.5),
        "spatial_ref": xr.DataArray(0, attrs={"crs_wkt": crs.to_wkt()})})
    for name, a in attrs.items():
        ds[name].attrs.update(a)
    ds.to_zarr(store, mode="w", zarr_format=3, encoding=encoding, consolidated=False)
    return time.perf_counter() - t0


def _ingest_once(catalog: Path, cube: Path, scheduler: str, keep: bool = False) -> dict:
    from geowm.cube import IngestOptions, cube_checksum, ingest

    remove(cube)
    t0 = time.perf_counter()
    report = ingest(catalog, cube, IngestOptions(scheduler=scheduler))
    wall = time.perf_counter() - t0
    out = {"wall_s": round(wall, 3), "report_seconds": round(report.seconds, 3),
           "source_MB": round(mb(report.source_bytes), 1), "MBps": round(mb(report.source_bytes) / wall, 2),
           "n_times": len(report.added_times), "tiles_written": report.tiles_written,
           "cube_MB": round(mb(dir_bytes(cube)), 1), "checksum": cube_checksum(cube),
           "source_bytes": report.source_bytes}
    if not keep:
        remove(cube)
    return out


def _ingest_on_cluster(catalog: Path, cube: Path, n_workers: int, keep_malloc_trim: bool = True) -> dict:
    """Ingest through a fresh LocalCluster. ``keep_malloc_trim=False`` starts the workers without the
    ``MALLOC_TRIM_THRESHOLD_`` that distributed's nanny sets by default (a diagnostic variant)."""
    import dask
    from distributed import Client, LocalCluster

    saved_env = dict(os.environ)  # each nanny copies its pre-spawn environment into this process's
    if not keep_malloc_trim:
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    t0 = time.perf_counter()
    override = {} if keep_malloc_trim else {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    try:
        with dask.config.set(override):
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=None, silence_logs=logging.ERROR)
        try:
            with Client(cluster) as client:
                client.wait_for_workers(n_workers)
                client.run(importlib.import_module, "geowm.cube.ingest")  # a long-lived cluster has it loaded
                trim = sorted({str(v) for v in client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()})
                start_s = time.perf_counter() - t0
                out = _ingest_once(catalog, cube, cluster.scheduler_address)
        finally:
            cluster.close()
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    out["cluster_start_s"] = round(start_s, 3)
    out["worker_MALLOC_TRIM_THRESHOLD_"] = ",".join(trim)
    return out


def _zarr_leg(catalog: Path, workdir: Path) -> dict:
    """Ingest the region's scenes from a Zarr datacube copy of them, one core; compare with the GeoTIFFs' cube
    (``cubes/synchronous``, kept by the caller's first run and removed here)."""
    import numpy as np

    from geowm.cube import open_cube
    from geowm.sources import discover

    store = workdir / "zarr_source" / "region.zarr"
    write_s = zarr_copy(discover(catalog), store)
    out = _ingest_once(store, workdir / "cubes" / "zarr_source", "synchronous", keep=True)
    a, b = open_cube(workdir / "cubes" / "zarr_source"), open_cube(workdir / "cubes" / "synchronous")
    out["values_equal"] = bool(a.sizes == b.sizes and np.array_equal(a.valid.values, b.valid.values)
                               and np.allclose(a.reflectance.values, b.reflectance.values, equal_nan=True))
    out.update(write_s=round(write_s, 2), store_MB=round(mb(dir_bytes(store)), 1))
    out.pop("checksum")
    out.pop("source_bytes")
    remove(workdir / "cubes" / "zarr_source")
    remove(workdir / "cubes" / "synchronous")
    remove(store)
    return out


def run(mode: str, workdir: Path) -> dict:
    p = PARAMS[mode]
    workdir.mkdir(parents=True, exist_ok=True)
    region, gen_s = source_region(workdir, **p)
    catalog = region / "stac" / "catalog.json"
    files = source_files(catalog)
    file_bytes = _warm_page_cache(files)

    reads = [raw_read(files) for _ in range(RAW_REPEATS)]
    raw_s, decoded = min(reads)
    raw_mbps = mb(decoded) / raw_s

    runs = {"synchronous": _ingest_once(catalog, workdir / "cubes" / "synchronous", "synchronous", keep=True)}
    zarr = _zarr_leg(catalog, workdir)
    for k in WORKERS:
        runs[f"dask_k{k}"] = _ingest_on_cluster(catalog, workdir / "cubes" / f"dask_k{k}", k)
    diag = DIAGNOSTICS[mode]
    for k in WORKERS if diag else ():  # diagnostic: the same without distributed's MALLOC_TRIM_THRESHOLD_=65536
        runs[f"dask_k{k}_no_malloc_trim"] = _ingest_on_cluster(catalog, workdir / "cubes" / f"dask_k{k}_nt", k,
                                                               keep_malloc_trim=False)
    remove(workdir / "cubes")

    checksums = {r.pop("checksum") for r in runs.values()}
    source_bytes = {r.pop("source_bytes") for r in runs.values()}
    sync, k1, k2 = runs["synchronous"], runs["dask_k1"], runs["dask_k2"]
    ratio = sync["MBps"] / raw_mbps
    scaling = k2["MBps"] / k1["MBps"]
    headline = {
        "raw_read_MBps": round(raw_mbps, 2),
        "ingest_1core_MBps": sync["MBps"],
        "ingest_1core_vs_raw": round(ratio, 3),
        "ingest_dask_k1_MBps": k1["MBps"],
        "ingest_dask_k2_MBps": k2["MBps"],
        "dask_scaling_k2_vs_k1": round(scaling, 3),
        "ingest_zarr_source_1core_MBps": zarr["MBps"],
    }
    n_acq = len(json.loads((region / "synth.json").read_text())["acquisitions"])
    return {
        "results": {
            "description": (f"Synthetic region {p['size']} x {p['size']} px, {p['start']}..{p['end']} "
                            f"({n_acq} acquisitions, {len(files)} files, {mb(decoded):,.0f} MB decoded): "
                            "raw rasterio read vs geowm ingest (one core; dask LocalCluster k=1,2 "
                            "processes, start-up excluded)."),
            "headline": headline,
            "params": p,
            "source": {"n_acquisitions": n_acq, "n_files": len(files), "decoded_MB": round(mb(decoded), 1),
                       "file_MB": round(mb(file_bytes), 1),
                       "generated_s": None if gen_s is None else round(gen_s, 2), "reused": gen_s is None},
            "raw_read": {"seconds": round(raw_s, 3), "MBps": round(raw_mbps, 2), "repeats": RAW_REPEATS,
                         "all_seconds": [round(s, 3) for s, _ in reads]},
            "ingest": runs,
            "zarr_source": zarr,
            "dask_k1_vs_synchronous": round(k1["MBps"] / sync["MBps"], 3),
            "dask_scaling_k2_vs_k1_no_malloc_trim": (round(runs["dask_k2_no_malloc_trim"]["MBps"]
                                                           / runs["dask_k1_no_malloc_trim"]["MBps"], 3)
                                                     if diag else None),
            "bytes_match": source_bytes == {decoded},
            "cubes_identical": len(checksums) == 1,
            "cores": os.cpu_count(),
            "notes": [f"dask cluster start-up: k=1 {k1['cluster_start_s']} s, k=2 {k2['cluster_start_s']} s "
                      "(not in the ingest timings)",
                      "cubes written by all schedulers identical: " + ("yes" if len(checksums) == 1 else "NO"),
                      f"the same pixels as one Zarr 3 datacube ({zarr['store_MB']} MB, written in {zarr['write_s']} s, "
                      f"not timed in the ingest): {zarr['MBps']} MB/s on one core; its cube's values equal the "
                      "GeoTIFFs' cube's: " + ("yes" if zarr["values_equal"] else "NO"),
                      "diagnostic, workers without distributed's default MALLOC_TRIM_THRESHOLD_=65536: "
                      + (f"k=1 {runs['dask_k1_no_malloc_trim']['MBps']} MB/s, "
                         f"k=2 {runs['dask_k2_no_malloc_trim']['MBps']} MB/s" if diag else "not run in quick mode")],
        },
        "targets": {"one_core_vs_raw_read": target("ingest_1core_vs_raw", round(ratio, 3),
                                                   TARGET_ONE_CORE_VS_RAW)},
    }


if __name__ == "__main__":
    print(json.dumps(run("smoke", Path("benchmarks/work/ingest")), indent=1, default=str))
