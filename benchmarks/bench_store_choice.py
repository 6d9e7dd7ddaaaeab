"""Store choice: Icechunk against plain Zarr v3 with a write-ahead manifest (wraps ``store_choice.run``).

Adds an out-of-order insert: a store holding ``n_time`` dates gets one more date in the middle of
the time axis, which (as in geowm's ingest) rewrites the time chunks from the one holding the new
date to the end: Icechunk in one transaction (resize + write + commit), plain Zarr by staging the
new tail chunks and metadata, writing the manifest and publishing by rename. The stores are built
untimed first; the result is read back and checked against ``np.insert``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import zarr

from benchmarks import store_choice
from benchmarks._util import mb, remove

PARAMS = {
    "full": {"n_time": 48, "size": 1024, "n_band": 4},
    "quick": {"n_time": 24, "size": 1024, "n_band": 4},
    "smoke": {"n_time": 4, "size": 256, "n_band": 4},
}
TIME_CHUNK = 8  # as store_choice.run


def _spliced_tail(old_tail: np.ndarray, frame: np.ndarray, at: int) -> np.ndarray:
    return np.concatenate([old_tail[:at], frame[None], old_tail[at:]])


def insert_plain(path: Path, frame: np.ndarray, at: int) -> tuple[float, int]:
    """Insert ``frame`` at time index ``at``; returns (seconds, bytes of pixels rewritten)."""
    t0 = time.perf_counter()
    arr = zarr.open_array(path, mode="r")
    ct = arr.chunks[0]
    start = (at // ct) * ct
    tail = _spliced_tail(arr[start:], frame, at - start)
    staging = path.parent / (path.name + ".staging")
    remove(staging)
    new = zarr.open_array(staging, mode="w", shape=(arr.shape[0] + 1, *arr.shape[1:]), chunks=arr.chunks,
                          dtype=arr.dtype, fill_value=0)
    new[start:] = tail
    files = sorted((str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()),
                   key=lambda rel: (rel == "zarr.json", rel))  # metadata published last
    manifest = path.parent / (path.name + ".manifest.json")
    manifest.write_text(json.dumps({"state": "committed", "files": files}))
    for rel in files:
        dst = path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, dst)
    manifest.unlink()
    shutil.rmtree(staging)
    return time.perf_counter() - t0, tail.nbytes


def insert_icechunk(path: Path, frame: np.ndarray, at: int) -> tuple[float, int]:
    import icechunk

    t0 = time.perf_counter()
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(path)))
    session = repo.writable_session("main")
    arr = zarr.open_array(session.store, path="reflectance", mode="r+")
    ct = arr.chunks[0]
    start = (at // ct) * ct
    tail = _spliced_tail(arr[start:], frame, at - start)
    arr.resize((arr.shape[0] + 1, *arr.shape[1:]))
    arr[start:] = tail
    session.commit(f"insert date at {at}")
    return time.perf_counter() - t0, tail.nbytes


def _read_back(name: str, path: Path) -> np.ndarray:
    if name == "icechunk":
        import icechunk

        repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(path)))
        return zarr.open_array(repo.readonly_session("main").store, path="reflectance", mode="r")[...]
    return zarr.open_array(path, mode="r")[...]


def out_of_order_insert(workdir: Path, n_time: int, size: int, n_band: int) -> dict:
    data = store_choice._blocks(n_time, n_band, size)
    frame = store_choice._blocks(1, n_band, size, seed=1)[0]
    at = n_time // 2
    expected = np.insert(data, at, frame, axis=0)
    chunks = (TIME_CHUNK, n_band, min(size, 256), min(size, 256))
    out = {"at_index": at}
    for name, write, insert in (("plain_zarr_wal", store_choice._write_plain, insert_plain),
                                ("icechunk", store_choice._write_icechunk, insert_icechunk)):
        path = workdir / f"insert_{name}.zarr"
        remove(path)
        try:
            write(path, data, chunks)  # untimed: the store before the insert
            seconds, rewritten = insert(path, frame, at)
            correct = bool(np.array_equal(_read_back(name, path), expected))
        finally:
            remove(path)
        out[name] = {"insert_s": round(seconds, 3), "rewritten_MB": round(mb(rewritten), 1),
                     "rewrite_MBps": round(mb(rewritten) / seconds, 1), "correct": correct}
    return out


def run(mode: str, workdir: Path) -> dict:
    p = PARAMS[mode]
    workdir.mkdir(parents=True, exist_ok=True)
    base = store_choice.run(workdir, **p)
    insert = out_of_order_insert(workdir, **p)
    ice, plain = base["icechunk"], base["plain_zarr_wal"]
    headline = {
        "icechunk_write_MBps": ice["write_MBps"],
        "icechunk_read_MBps": ice["read_MBps"],
        "plain_wal_write_MBps": plain["write_MBps"],
        "plain_wal_read_MBps": plain["read_MBps"],
        "icechunk_insert_s": insert["icechunk"]["insert_s"],
        "plain_wal_insert_s": insert["plain_zarr_wal"]["insert_s"],
    }
    notes = [f"insert: one date at index {insert['at_index']} of {p['n_time']}, rewriting "
             f"{insert['icechunk']['rewritten_MB']} MB of time chunks; read back equal to np.insert: "
             f"icechunk {'yes' if insert['icechunk']['correct'] else 'NO'}, "
             f"plain {'yes' if insert['plain_zarr_wal']['correct'] else 'NO'}"]
    return {
        "results": {
            "description": (f"{p['n_time']} dates x {p['n_band']} bands x {p['size']}^2 px uint16 "
                            f"({base['megabytes']} MB), chunks ({TIME_CHUNK}, {p['n_band']}, 256, 256), "
                            "default codecs: Icechunk vs plain Zarr v3 + write-ahead manifest."),
            "headline": headline,
            "params": p,
            "store_choice": base,
            "insert": insert,
            "notes": notes,
        },
        "targets": {},
    }


if __name__ == "__main__":
    print(json.dumps(run("smoke", Path("benchmarks/work/store_choice")), indent=1))
