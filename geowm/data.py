"""Training and inference windows from a cube: T clear-enough acquisitions x C bands x H x W pixels.

A window is a ``size`` x ``size`` px cell of the cube (cells tile the grid) and the dates of ``frames``
consecutive acquisitions *that are clear enough there* (fully cloudy dates are skipped, as a
satellite analyst would), spanning at most ``max_span_days``. Each item carries the real dates
(``days`` since the window's first date and day of year), so irregular revisits are the model's
business, not the loader's.

Normalisation: per-band mean and std over valid pixels of the training period, computed from the
cube (:func:`band_stats`) and saved with the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import zarr

from geowm.cube.store import fill_value_of, open_repo


@dataclass
class WindowConfig:
    """Window geometry and selection. Units: px, acquisitions, days, fractions."""

    frames: int = 8
    size: int = 64
    stride_frames: int = 2  # a new window every this many clear acquisitions of a cell
    min_frame_clear: float = 0.3  # an acquisition is part of a cell's series if this share of the cell is valid
    max_span_days: float = 150.0  # windows spanning longer are dropped (long cloudy gaps)
    seasonal_frames: int = 0  # + up to this many clear acquisitions a year before the window's end (see seasonal_index)

    def __post_init__(self) -> None:
        if self.frames < 2 or self.size < 8 or self.stride_frames < 1:
            raise ValueError(f"bad window config {asdict(self)}: frames >= 2, size >= 8, stride_frames >= 1")
        if not 0.0 < self.min_frame_clear <= 1.0:
            raise ValueError(f"min_frame_clear must be in (0, 1], got {self.min_frame_clear}")
        if self.seasonal_frames < 0:
            raise ValueError(f"seasonal_frames must be >= 0, got {self.seasonal_frames}")


SEASONAL_LEAD_SLOTS = 3  # training: the seasonal span covers the window's last this many dates (the forecast targets)


def seasonal_index(series: np.ndarray, day: np.ndarray, first_day: float, last_day: float, n: int, lag: float,
                   tol: float, multiple: int = 1) -> np.ndarray:
    """The seasonal memory of a window: up to ``n`` of the clear acquisitions ``series`` (sorted cube indexes,
    dated ``day[series]`` in days) that lie one ``lag`` before the forecast span [first_day, last_day],
    widened by ``tol`` on both sides, spread evenly over it. The count is cut to a multiple of ``multiple``
    (whole tubelets) and the result padded at the front with -1 (no acquisition) to length ``n``."""
    if n <= 0:
        return np.zeros(0, np.int64)
    series = np.asarray(series, np.int64)
    d = day[series]
    cand = series[(d >= first_day - lag - tol) & (d <= last_day - lag + tol)]
    if len(cand) > n:
        cand = cand[np.round(np.linspace(0, len(cand) - 1, n)).astype(int)]
    cand = cand[len(cand) - len(cand) // multiple * multiple:]
    return np.concatenate([np.full(n - len(cand), -1, np.int64), cand])


GAP_READ = 16  # dates: CubeReader.read reads separately across gaps wider than this
WINDOW_CACHE_MB = 1024.0  # default of $GEOWM_WINDOW_CACHE_MB (see window_cache_mb)


def window_cache_mb() -> float:
    """MB of memory a cube's raw arrays may take to be read once for training windows (``$GEOWM_WINDOW_CACHE_MB``,
    default ``WINDOW_CACHE_MB``; 0 turns it off). A window's dates lie in several time chunks, each decompressed
    whole for a 64 px corner: on the demo cube (285 MB + 36 MB) memory takes the loader from about 0.2 s to a few
    ms per batch of 8. Raises ValueError naming the variable when it is not a number >= 0."""
    raw = os.environ.get("GEOWM_WINDOW_CACHE_MB", str(WINDOW_CACHE_MB))
    try:
        mb = float(raw)
    except ValueError:
        mb = float("nan")
    if not mb >= 0:
        raise ValueError(f"GEOWM_WINDOW_CACHE_MB={raw!r}: give the memory for a cube's training windows in MB "
                         "(a number >= 0; 0 turns the cache off)")
    return mb


class CubeReader:
    """Reads raw blocks of a cube snapshot (pickles as its path + snapshot id: safe in loader workers).

    ``memory_mb`` > 0: when the snapshot's raw arrays (``reflectance`` and ``valid``, uncompressed) fit in that
    many MB, the first :meth:`read` loads them whole and later reads are cut from memory (each process that
    reads holds its own copy; a larger cube is read block by block as before)."""

    def __init__(self, cube: str, snapshot: str | None = None, memory_mb: float = 0.0):
        self.cube = str(cube)
        self.memory_mb = float(memory_mb)
        repo = open_repo(self.cube)
        session = repo.readonly_session(snapshot_id=snapshot) if snapshot else repo.readonly_session("main")
        self.snapshot = session.snapshot_id
        self._open(session)

    def _open(self, session) -> None:
        g = zarr.open_group(session.store, mode="r")
        self.refl, self.valid = g["reflectance"], g["valid"]
        attrs = dict(self.refl.attrs)
        self.scale = float(attrs.get("scale_factor", 1.0))
        self.offset = float(attrs.get("add_offset", 0.0))
        self.fill = fill_value_of(self.refl) if "_FillValue" in attrs else None
        self.times = g["time"][:].astype("int64").astype("datetime64[s]")
        self.bands = [str(b) for b in g["band"][:]]
        self.common_names = [str(c) for c in g["common_name"][:]] if "common_name" in g else None
        self.shape = tuple(self.refl.shape)
        self._memory: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {"cube": self.cube, "snapshot": self.snapshot, "memory_mb": self.memory_mb}

    def __setstate__(self, state: dict) -> None:
        self.cube, self.snapshot = state["cube"], state["snapshot"]
        self.memory_mb = state.get("memory_mb", 0.0)
        self._open(open_repo(self.cube).readonly_session(snapshot_id=self.snapshot))

    def _arrays(self):
        """(reflectance, valid): in memory when they fit in ``memory_mb`` (read on first use), else the Zarr arrays."""
        if self._memory is None and self.memory_mb > 0 and \
                self.refl.nbytes + self.valid.nbytes <= self.memory_mb * 1e6:
            self._memory = (self.refl[:], self.valid[:])
        return self._memory or (self.refl, self.valid)

    def read(self, t_index: Sequence[int], y: slice, x: slice) -> tuple[np.ndarray, np.ndarray]:
        """Physical values (T, C, h, w) float32 (fill -> NaN) and valid (T, h, w) bool at the given dates."""
        t_index = np.asarray(t_index)
        # one contiguous read per run of nearby dates (a window's seasonal memory lies a year before the rest)
        runs = np.split(np.arange(len(t_index)), np.flatnonzero(np.abs(np.diff(t_index)) > GAP_READ) + 1)
        refl, valid = self._arrays()
        raw, ok = [], []
        for r in runs:
            lo, hi = int(t_index[r].min()), int(t_index[r].max()) + 1
            raw.append(refl[lo:hi, :, y, x][t_index[r] - lo])
            ok.append(valid[lo:hi, y, x][t_index[r] - lo])
        raw, ok = np.concatenate(raw), np.concatenate(ok)
        vals = raw.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)
        if self.fill is not None:
            fill = raw == self.fill if not np.isnan(self.fill) else np.isnan(raw)
            vals[fill] = np.nan
            ok = ok & ~fill.any(axis=1)
        return vals, ok


def clear_table(reader: CubeReader, size: int) -> np.ndarray:
    """Share of valid pixels per (time, cell row, cell col) for cells of ``size`` px; (T, ny, nx) float32.

    Reads the ``valid`` array one time chunk at a time (bounded memory)."""
    T, _, H, W = reader.shape
    ny, nx = H // size, W // size
    out = np.zeros((T, ny, nx), np.float32)
    step = reader.valid.chunks[0]
    for t0 in range(0, T, step):
        v = reader.valid[t0: t0 + step, : ny * size, : nx * size]
        out[t0: t0 + step] = v.reshape(v.shape[0], ny, size, nx, size).mean(axis=(2, 4))
    return out


def band_stats(reader: CubeReader, time_index: Sequence[int], max_dates: int = 24,
               seed: int = 0) -> dict[str, list[float]]:
    """Per-band mean and std of valid physical values over (a sample of) ``time_index``."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(np.asarray(time_index), min(max_dates, len(time_index)), replace=False))
    C = reader.shape[1]
    s, s2, n = np.zeros(C), np.zeros(C), 0
    H, W = reader.shape[2:]
    for t in idx:
        vals, ok = reader.read([t], slice(0, H), slice(0, W))
        v = vals[0][:, ok[0]].astype(np.float64)  # (C, n)
        s += v.sum(1)
        s2 += (v**2).sum(1)
        n += v.shape[1]
    if n == 0:
        raise ValueError(f"{reader.cube}: no valid pixels in the dates sampled for normalisation statistics")
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 1e-12))
    return {"mean": mean.tolist(), "std": std.tolist()}


def day_of_year(times: np.ndarray) -> np.ndarray:
    """Day of year (1..366) of datetime64 values, float32."""
    days = times.astype("datetime64[D]")
    return (days - days.astype("datetime64[Y]")).astype(np.int64).astype(np.float32) + 1.0


class CubeWindows(torch.utils.data.Dataset):
    """Windows of a cube for training or evaluation.

    Items are dicts: ``pixels`` (T, C, H, W) float32 normalised, 0 where invalid; ``valid`` (T, H, W)
    bool; ``days`` (T,) float32 days since the window's first date; ``doy`` (T,) float32; ``t_index``
    (T,) int64 cube time indexes; ``yx`` (2,) int64 top-left pixel of the window.

    ``time_range`` = (first, last) datetime64 bounds (inclusive) that every date of a window must lie
    in (train on the past, evaluate on a held-out future). ``stats`` from :func:`band_stats`. A cube given
    by path is read whole into memory when it fits in :func:`window_cache_mb` (see :class:`CubeReader`).
    """

    def __init__(self, cube: str | CubeReader, cfg: WindowConfig, stats: dict[str, list[float]],
                 time_range: tuple[np.datetime64 | None, np.datetime64 | None] = (None, None),
                 snapshot: str | None = None, seasonal: tuple[float, float, int] = (365.0, 30.0, 1)):
        self.reader = cube if isinstance(cube, CubeReader) else CubeReader(str(cube), snapshot, window_cache_mb())
        self.cfg = cfg
        self.seasonal = seasonal  # (lag days, tolerance days, frames per tubelet) of the seasonal memory
        self.mean = np.asarray(stats["mean"], np.float32)[:, None, None]
        self.std = np.asarray(stats["std"], np.float32)[:, None, None]
        self.windows = self._index(time_range)
        if not self.windows:
            T = len(self.reader.times)
            raise ValueError(
                f"{self.reader.cube}: no window of {cfg.frames} acquisitions with >= {cfg.min_frame_clear:.0%} clear "
                f"sky within {cfg.max_span_days:g} days fits in the cube ({T} dates) and the time range "
                f"{time_range}; ingest more dates or lower --frames"
            )

    def _index(self, time_range) -> list[tuple[int, int, np.ndarray]]:
        cfg, times = self.cfg, self.reader.times
        lo, hi = time_range
        in_range = np.ones(len(times), bool)
        if hi is not None:
            in_range &= times <= np.datetime64(hi, "s")
        past = in_range.copy()  # the seasonal memory may reach before the time range (context, never a target)
        if lo is not None:
            in_range &= times >= np.datetime64(lo, "s")
        table = clear_table(self.reader, cfg.size)
        day = times.astype("datetime64[D]").astype(np.int64)
        out = []
        _, ny, nx = table.shape
        for iy in range(ny):
            for ix in range(nx):
                clear = table[:, iy, ix] >= cfg.min_frame_clear
                series = np.flatnonzero(clear & in_range)
                before = np.flatnonzero(clear & past)
                for k in range(0, len(series) - cfg.frames + 1, cfg.stride_frames):
                    t = series[k: k + cfg.frames]
                    if day[t[-1]] - day[t[0]] <= cfg.max_span_days:
                        if cfg.seasonal_frames:
                            lag, tol, mult = self.seasonal
                            first = day[t[-min(SEASONAL_LEAD_SLOTS, len(t) - 1)]]
                            t = np.concatenate([seasonal_index(before[before < t[0]], day, first, day[t[-1]],
                                                               cfg.seasonal_frames, lag, tol, mult), t])
                        out.append((iy * cfg.size, ix * cfg.size, t))
        return out

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        y0, x0, t = self.windows[i]
        s = self.cfg.size
        real = t >= 0  # -1: an empty seasonal slot (no acquisition), all invalid, dated as the first real one
        vals = np.zeros((len(t), self.reader.shape[1], s, s), np.float32)
        ok = np.zeros((len(t), s, s), bool)
        vals[real], ok[real] = self.reader.read(t[real], slice(y0, y0 + s), slice(x0, x0 + s))
        pixels = (vals - self.mean) / self.std
        pixels = np.where(ok[:, None], pixels, 0.0).astype(np.float32)
        times = self.reader.times[np.where(real, t, t[real][0])]
        days = (times - times[0]).astype("timedelta64[s]").astype(np.float64) / 86400.0
        return {
            "pixels": torch.from_numpy(pixels),
            "valid": torch.from_numpy(np.ascontiguousarray(ok)),
            "days": torch.from_numpy(days.astype(np.float32)),
            "doy": torch.from_numpy(day_of_year(times)),
            "t_index": torch.from_numpy(t.astype(np.int64)),
            "yx": torch.tensor([y0, x0], dtype=torch.int64),
        }


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches that depend only on (seed, step, rank): training resumes at any step with the same data.

    Yields ``batch_size`` indexes per step for steps ``start_step .. total_steps - 1``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, total_steps: int, rank: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.total_steps, self.rank = start_step, total_steps, rank

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            rng = np.random.default_rng([self.seed, step, self.rank])
            yield rng.integers(0, self.n, self.batch_size).tolist()

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def loader(ds: CubeWindows, sampler: torch.utils.data.Sampler, workers: int = 1,
           pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``ds`` with a batch sampler; ``workers`` processes prefetch 4 batches each."""
    kw = dict(num_workers=workers, pin_memory=pin_memory, collate_fn=collate)
    if workers > 0:  # spawn, not fork: Icechunk's I/O runtime threads do not survive a fork
        kw.update(prefetch_factor=4, persistent_workers=False, multiprocessing_context="spawn")
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, **kw)
