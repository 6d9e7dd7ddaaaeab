"""Training-window throughput: geowm's ``CubeWindows`` against a raw Zarr read, xbatcher and the DataLoader.

One synthetic region (``geowm.synth.generate``) is ingested into a cube (``scheduler="threads"``;
region and cube are kept under the work folder and reused while their parameters match). A fixed
list of random windows of ``CubeWindows`` (``WindowConfig`` recorded in the results) is then read,
after one untimed pass that warms the page cache, in these ways (each timed ``REPEATS`` times,
interleaved, best kept):

* (a) ``CubeWindows.__getitem__`` in this process (read, decode, normalise, tensors);
* (b) raw Zarr read of exactly the same data: ``CubeReader.refl[lo:hi, :, y, x]`` and
  ``CubeReader.valid[lo:hi, y, x]`` over each window's date span, no decoding or normalisation;
  target (a)/(b) >= 0.8;
* (c) ``xbatcher.BatchGenerator`` over the ``open_cube`` Dataset with input_dims
  {time: T, band: C, y: size, x: size} (same-size windows, but of T *consecutive* dates: xbatcher
  cannot skip cloudy dates), the same number of random patches, values pulled to numpy; a
  diagnostic repeat on the same store opened without dask (``xr.open_zarr(..., chunks=None)``);
* (d) the PyTorch DataLoader from ``geowm.data.loader`` with 0, 1 and 2 worker processes (spawn; quick: 0, 2;
  smoke: 0, 1),
  batch 8, over the same windows (the list twice in full mode), timed from ``iter()`` (worker start-up
  included) and in steady state (after the first batch).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks._util import dir_bytes, mb, remove, target

PARAMS = {  # mode -> synthetic region, windows, repeats
    "full": {"size": 512, "start": "2021-01-01", "end": "2021-12-31", "seed": 11, "frames": 8, "win": 64,
             "n_windows": 200, "repeats": 3, "loader_passes": 2, "workers": (0, 1, 2)},
    "quick": {"size": 256, "start": "2021-01-01", "end": "2021-06-30", "seed": 11, "frames": 8, "win": 64,
              "n_windows": 64, "repeats": 2, "loader_passes": 1, "workers": (0, 2)},
    "smoke": {"size": 128, "start": "2021-03-01", "end": "2021-06-30", "seed": 11, "frames": 4, "win": 32,
              "n_windows": 24, "repeats": 1, "loader_passes": 1, "workers": (0, 1)},
}
BATCH = 8
TARGET_A_VS_RAW = 0.8


# ------------------------------------------------------------------------------------------- setup


def cube_for(workdir: Path, p: dict) -> tuple[Path, Path, dict]:
    """The cube of the synthetic region for these parameters: reused if present, else generated + ingested.

    Returns (cube path, region folder, info about how it was made)."""
    from benchmarks.bench_ingest import source_region
    from geowm.cube import IngestOptions, ingest

    region_p = {k: p[k] for k in ("size", "start", "end", "seed")}
    region, gen_s = source_region(workdir, **region_p)
    cube = workdir / "cubes" / region.name
    meta = cube.parent / f"{region.name}.json"
    if cube.exists() and meta.exists():
        try:
            info = json.loads(meta.read_text())
            if info.get("parameters") == region_p:
                return cube, region, {**info, "generated_s": None, "reused": True}
        except ValueError:
            pass
    remove(cube)
    remove(meta)
    cube.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = ingest(region / "stac" / "catalog.json", cube, IngestOptions(scheduler="threads"))
    info = {"parameters": region_p, "ingest_s": round(time.perf_counter() - t0, 2),
            "n_times": len(report.added_times), "cube_MB": round(mb(dir_bytes(cube)), 1)}
    meta.write_text(json.dumps(info))
    return cube, region, {**info, "generated_s": None if gen_s is None else round(gen_s, 2), "reused": False}


# ------------------------------------------------------------------------------------------- readers


def read_windows(ds, idx: list[int]) -> int:
    """(a) ``CubeWindows.__getitem__`` for each index; returns the number of windows read."""
    n = 0
    for i in idx:
        item = ds[i]
        n += item["pixels"].shape[0] > 0
    return n


def read_raw(reader, windows: list[tuple[int, int, np.ndarray]], size: int) -> int:
    """(b) the Zarr slices ``CubeReader.read`` makes for each window, no decoding; returns bytes read."""
    total = 0
    for y0, x0, t in windows:
        lo, hi = int(t.min()), int(t.max()) + 1
        y, x = slice(y0, y0 + size), slice(x0, x0 + size)
        raw = reader.refl[lo:hi, :, y, x]
        ok = reader.valid[lo:hi, y, x]
        total += raw.nbytes + ok.nbytes
    return total


def read_xbatcher(gen, idx: list[int]) -> int:
    """(c) xbatcher patches, values pulled into numpy; returns the number of windows read."""
    n = 0
    for i in idx:
        b = gen[i]
        refl, ok = b["reflectance"].values, b["valid"].values
        n += refl.shape[0] > 0 and ok.shape[0] > 0
    return n


def _best(times: list[float]) -> float:
    return min(times)


def chunk_amplification(reader, windows: list[tuple[int, int, np.ndarray]], size: int) -> dict:
    """Decoded bytes of the chunks a window touches vs the bytes it uses (all dates / clear dates)."""
    ct, cb, cy, cx = reader.refl.chunks
    item = reader.refl.dtype.itemsize
    touched = used_span = used_frames = 0
    for y0, x0, t in windows:
        lo, hi = int(t.min()), int(t.max()) + 1
        n_t = (hi - 1) // ct - lo // ct + 1
        n_y = (y0 + size - 1) // cy - y0 // cy + 1
        n_x = (x0 + size - 1) // cx - x0 // cx + 1
        touched += n_t * n_y * n_x * ct * cb * cy * cx * item
        used_span += (hi - lo) * reader.shape[1] * size * size * item
        used_frames += len(t) * reader.shape[1] * size * size * item
    return {"refl_chunks": [ct, cb, cy, cx],
            "decoded_chunk_bytes_per_window_MB": round(mb(touched / len(windows)), 3),
            "delivered_bytes_per_window_MB": round(mb(used_frames / len(windows)), 3),
            "chunk_vs_span_bytes": round(touched / used_span, 2),
            "chunk_vs_delivered_bytes": round(touched / used_frames, 2),
            "span_dates_vs_frames": round(used_span / used_frames, 3)}


# ------------------------------------------------------------------------------------------- loader


def time_loader(ds, batches: list[list[int]], workers: int) -> dict:
    from geowm.data import loader

    t0 = time.perf_counter()
    it = iter(loader(ds, batches, workers=workers))
    first = next(it)
    t_first = time.perf_counter()
    n_batches, n_windows = 1, first["pixels"].shape[0]
    for b in it:
        n_batches += 1
        n_windows += b["pixels"].shape[0]
    t_end = time.perf_counter()
    steady_b = n_batches - 1
    steady_s = t_end - t_first
    total_s = t_end - t0
    return {"workers": workers, "batches": n_batches, "windows": n_windows, "batch_size": BATCH,
            "first_batch_s": round(t_first - t0, 3), "total_s": round(total_s, 3),
            "batches_per_s": round(n_batches / total_s, 2), "windows_per_s": round(n_windows / total_s, 1),
            "steady_batches_per_s": round(steady_b / steady_s, 2) if steady_b else None,
            "steady_windows_per_s": round(steady_b * BATCH / steady_s, 1) if steady_b else None}


# ------------------------------------------------------------------------------------------- run


def run(mode: str, workdir: Path) -> dict:
    import torch
    import xarray as xr
    import xbatcher

    from geowm.cube import open_cube
    from geowm.cube.store import open_repo
    from geowm.data import CubeReader, CubeWindows, WindowConfig, band_stats

    p = PARAMS[mode]
    workdir.mkdir(parents=True, exist_ok=True)
    cube, region, cube_info = cube_for(workdir, p)

    wcfg = WindowConfig(frames=p["frames"], size=p["win"])
    reader = CubeReader(str(cube))
    t0 = time.perf_counter()
    stats = band_stats(reader, range(len(reader.times)))
    stats_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = CubeWindows(reader, wcfg, stats)
    index_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    n = p["n_windows"]
    idx = rng.choice(len(ds), n, replace=len(ds) < n).tolist()
    windows = [ds.windows[i] for i in idx]
    s = wcfg.size

    # the same data? (a) is the decoded, normalised (b) at the window's dates
    same = True
    for i, (y0, x0, t) in zip(idx[:4], windows[:4], strict=True):
        lo, hi = int(t.min()), int(t.max()) + 1
        raw = reader.refl[lo:hi, :, y0:y0 + s, x0:x0 + s][t - lo]
        ok = reader.valid[lo:hi, y0:y0 + s, x0:x0 + s][t - lo]
        item = ds[i]
        phys = raw.astype(np.float32) * np.float32(reader.scale) + np.float32(reader.offset)
        want = np.where(ok[:, None], (phys - ds.mean) / ds.std, 0.0).astype(np.float32)
        same &= bool(np.array_equal(item["valid"].numpy(), ok)) and bool(np.allclose(item["pixels"].numpy(), want))

    # xbatcher over the open_cube Dataset (dask-backed) and over the same store without dask
    C = reader.shape[1]
    dims = {"time": wcfg.frames, "band": C, "y": s, "x": s}
    xds = open_cube(cube)[["reflectance", "valid"]]
    session = open_repo(cube).readonly_session(snapshot_id=reader.snapshot)
    xds_nodask = xr.open_zarr(session.store, consolidated=False, chunks=None)[["reflectance", "valid"]]
    t0 = time.perf_counter()
    gen = xbatcher.BatchGenerator(xds, input_dims=dims, preload_batch=True)
    gen_nodask = xbatcher.BatchGenerator(xds_nodask, input_dims=dims, preload_batch=True)
    xb_setup_s = time.perf_counter() - t0
    xb_idx = rng.choice(len(gen), n, replace=len(gen) < n).tolist()
    b0 = gen[xb_idx[0]]
    xb_shape = {k: list(b0[k].shape) for k in ("reflectance", "valid")}

    # warm the page cache (and zarr / icechunk metadata) with one untimed pass of everything
    read_windows(ds, idx)
    read_raw(reader, windows, s)
    read_xbatcher(gen, xb_idx[: max(8, n // 4)])
    read_xbatcher(gen_nodask, xb_idx[: max(8, n // 4)])

    t_a, t_b, t_c, t_c2 = [], [], [], []
    raw_bytes = 0
    for _ in range(p["repeats"]):
        t0 = time.perf_counter()
        read_windows(ds, idx)
        t_a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        raw_bytes = read_raw(reader, windows, s)
        t_b.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        read_xbatcher(gen, xb_idx)
        t_c.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        read_xbatcher(gen_nodask, xb_idx)
        t_c2.append(time.perf_counter() - t0)
    a_wps, b_wps = n / _best(t_a), n / _best(t_b)
    c_wps, c2_wps = n / _best(t_c), n / _best(t_c2)
    ratio = a_wps / b_wps

    # DataLoader, 0 / 1 / 2 workers, batches of 8 over the same windows
    order = idx * p["loader_passes"]
    batches = [order[k: k + BATCH] for k in range(0, len(order) - BATCH + 1, BATCH)]
    workers = p["workers"]  # smoke: no 2-worker run (each spawned worker costs seconds of start-up)
    loaders = {f"workers_{w}": time_loader(ds, batches, w) for w in workers}

    span = chunk_amplification(reader, windows, s)
    n_acq = len(json.loads((region / "synth.json").read_text())["acquisitions"])
    headline = {
        "cubewindows_windows_per_s": round(a_wps, 1),
        "raw_zarr_windows_per_s": round(b_wps, 1),
        "cubewindows_vs_raw": round(ratio, 3),
        "xbatcher_windows_per_s": round(c_wps, 1),
        **{f"loader_w{w}_windows_per_s": loaders[f"workers_{w}"]["windows_per_s"] for w in workers},
        **{f"loader_w{w}_batches_per_s": loaders[f"workers_{w}"]["batches_per_s"] for w in workers},
    }
    return {
        "results": {
            "description": (f"Synthetic region {p['size']} x {p['size']} px, {p['start']}..{p['end']} "
                            f"({n_acq} acquisitions, cube {cube_info['n_times']} dates, "
                            f"{cube_info['cube_MB']} MB), {n} random windows of CubeWindows "
                            f"(frames={wcfg.frames}, size={wcfg.size}; {len(ds)} windows in the cube): "
                            "(a) CubeWindows.__getitem__ vs (b) the raw Zarr slices it reads vs (c) xbatcher "
                            f"vs (d) the DataLoader (batch 8, {'/'.join(map(str, workers))} spawn workers)."),
            "headline": headline,
            "params": p,
            "window_config": {k: getattr(wcfg, k) for k in ("frames", "size", "stride_frames",
                                                             "min_frame_clear", "max_span_days")},
            "cube": {**cube_info, "shape": list(reader.shape), "dtype": str(reader.refl.dtype),
                     "n_windows_total": len(ds), "index_s": round(index_s, 3), "band_stats_s": round(stats_s, 3)},
            "cubewindows": {"seconds": [round(x, 3) for x in t_a], "windows_per_s": round(a_wps, 1)},
            "raw_zarr": {"seconds": [round(x, 3) for x in t_b], "windows_per_s": round(b_wps, 1),
                         "MB_per_window": round(mb(raw_bytes / n), 3), "MBps": round(mb(raw_bytes) / _best(t_b), 1)},
            "xbatcher": {"seconds": [round(x, 3) for x in t_c], "windows_per_s": round(c_wps, 1),
                         "no_dask_seconds": [round(x, 3) for x in t_c2], "no_dask_windows_per_s": round(c2_wps, 1),
                         "input_dims": dims, "patches": len(gen), "patch_shape": xb_shape,
                         "setup_s": round(xb_setup_s, 3), "version": xbatcher.__version__},
            "loader": loaders,
            "read_amplification": span,
            "same_data_a_b": same,
            "torch_threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "notes": [
                f"(a)/(b) = {ratio:.3f}: CubeWindows costs over the raw Zarr read it makes "
                "(decode to float32, fill -> NaN, normalise, mask, tensors)",
                f"xbatcher windows are {wcfg.frames} consecutive dates (it cannot skip cloudy dates, so its windows "
                f"can be mostly cloud); CubeWindows windows span {span['span_dates_vs_frames']}x as many dates as "
                "they keep and read them all. Compare windows/s of same-size windows only. Without dask "
                f"(open_zarr chunks=None) xbatcher reads {c2_wps:.1f} windows/s",
                f"each window decodes {span['chunk_vs_delivered_bytes']}x the bytes it delivers (cube chunks "
                f"{tuple(span['refl_chunks'])} vs {wcfg.size} px windows)",
                "DataLoader workers are started with spawn (Icechunk's threads do not survive fork): worker "
                "start-up (importing torch and geowm, reopening the cube) is in windows_per_s, not in "
                "steady_windows_per_s; first-batch latency " + ", ".join(
                    f"{w} workers {loaders[f'workers_{w}']['first_batch_s']} s" for w in workers),
                f"{os.cpu_count()} cores shared with other work: 2 workers cannot scale beyond the free cores",
            ],
        },
        "targets": {"cubewindows_vs_raw": target("cubewindows_vs_raw", round(ratio, 3), TARGET_A_VS_RAW)},
    }


if __name__ == "__main__":
    print(json.dumps(run("smoke", Path("benchmarks/work/loader")), indent=1, default=str))
