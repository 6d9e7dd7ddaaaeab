"""Crash safety: ingests, forecast-store writes and training runs are SIGKILLed at random points of their
write path; each time what is on disk opens, equals its last committed state, and a re-run (or resume) ends
exactly where an uninterrupted run ends.

A trial's child counts traced calls (see ``_crash.py``) and kills itself at a point drawn uniformly over a
calibration run's count, so kills land in planning, block writes, commits, branch moves and checkpoint files
alike. Lines starting with ``crash-safety:`` summarise each test (``pytest -s`` shows them; the README table
quotes them).
"""

from __future__ import annotations

import json
import shutil
import signal
from datetime import date
from pathlib import Path

import _crash
import numpy as np
from test_ingest import days, make_scene

from geowm.cube import CubeError, IngestOptions, cube_checksum, ingest, open_cube
from geowm.cube.store import cube_exists
from geowm.forecast_store import ForecastStoreError, open_forecasts, write_forecasts

OPTS = dict(tile_size=32, time_chunk=2, scheduler="synchronous")
NEVER = 10**12


def trial(ctx, kind: str, kwargs: dict, kill_n: int | None = None, count_file: Path | None = None) -> bool:
    """Run one write in a child killed at traced call ``kill_n`` (None: untraced); True if it was killed."""
    p = ctx.Process(target=_crash.run_child, args=(kind, kill_n, str(count_file) if count_file else None, kwargs))
    p.start()
    p.join()
    assert p.exitcode in (0, -signal.SIGKILL), f"{kind} child exited with {p.exitcode}"
    return p.exitcode == -signal.SIGKILL


def calibrate(ctx, tmp: Path, kind: str, kwargs: dict) -> int:
    """Traced calls of an uninterrupted write."""
    count = tmp / f"count-{kind}-{np.random.randint(1 << 30)}"
    assert not trial(ctx, kind, kwargs, NEVER, count)
    return int(count.read_text())


def kill_point(rng, total: int, k: int) -> int:
    """Uniform over the write's traced calls (their count varies by a few between runs); every eleventh trial
    among the last three, after the commit."""
    lo, hi = (total - 3, total) if k % 11 == 10 else (1, int(total * 0.99))
    return int(rng.integers(lo, hi))


def state_of(path: Path, open_fn, checksum=cube_checksum) -> str | None:
    """Checksum of the committed state, after opening and reading all of it; None if nothing is committed."""
    if not cube_exists(path):
        return None
    try:
        ds = open_fn(path)
    except (CubeError, ForecastStoreError) as exc:
        assert "did not complete" in str(exc), exc  # an empty repository left by a killed first write
        return None
    ds.load()
    return checksum(path)


def test_killed_ingest_keeps_the_last_commit_and_reruns_to_the_same_cube(ctx, tmp_path):
    base_src, batch = tmp_path / "base_src", tmp_path / "batch"
    for i, d in enumerate(days(3)):
        make_scene(base_src, d, i)
    for i, d in enumerate([date(2021, 2, 20), *days(3, start=date(2021, 3, 20))]):  # one older date: a tail rewrite
        make_scene(batch, d, 10 + i)
    base, ref, fresh_ref = tmp_path / "base", tmp_path / "ref", tmp_path / "fresh_ref"
    ingest(base_src, base, IngestOptions(**OPTS))
    shutil.copytree(base, ref)
    ingest(batch, ref, IngestOptions(**OPTS))
    ingest(batch, fresh_ref, IngestOptions(**OPTS))
    committed, final, fresh_final = cube_checksum(base), cube_checksum(ref), cube_checksum(fresh_ref)

    def kwargs(cube):
        return {"source": str(batch), "cube": str(cube), "opts": OPTS}

    shutil.copytree(base, tmp_path / "cal")
    total = {False: calibrate(ctx, tmp_path, "ingest", kwargs(tmp_path / "cal")),
             True: calibrate(ctx, tmp_path, "ingest", kwargs(tmp_path / "cal_fresh"))}
    rng = np.random.default_rng(8)
    killed, outcomes = 0, {"previous": 0, "new": 0, "none": 0}
    for k in range(24):
        fresh = k % 4 == 3  # every fourth trial creates the cube
        cube = tmp_path / f"trial{k}"
        if not fresh:
            shutil.copytree(base, cube)
        n = kill_point(rng, total[fresh], k)
        killed += trial(ctx, "ingest", kwargs(cube), n)
        state = state_of(cube, open_cube)
        if fresh:
            assert state in (None, fresh_final), f"trial {k} (kill at {n}): a half-made cube"
        else:
            assert state in (committed, final), f"trial {k} (kill at {n}): the cube is neither before nor after"
        outcomes["none" if state is None else "previous" if state == committed else "new"] += 1
        ingest(batch, cube, IngestOptions(**OPTS))  # the re-run
        assert cube_checksum(cube) == (fresh_final if fresh else final), f"trial {k} (kill at {n}): re-run differs"
    assert killed >= 20
    print(f"\ncrash-safety: ingest: {killed} SIGKILLs of 24 trials (calls {total}); state after kill {outcomes}; "
          "all re-runs checksum-identical to the uninterrupted run; 0 dates lost")


def test_killed_forecast_write_keeps_the_last_commit_and_reruns_to_the_same_store(ctx, tmp_path):
    base = tmp_path / "base"
    for init, seed in (("2021-07-01", 1), ("2021-09-01", 2)):
        write_forecasts(_crash.fake_forecast(init, seed), base)
    ops = {"append": (("2021-10-01", 3), True), "insert": (("2021-08-01", 4), True),
           "replace": (("2021-07-01", 5), True), "create": (("2021-07-01", 1), False)}
    refs, totals = {}, {}
    for op, (init, from_base) in ops.items():
        store = tmp_path / f"ref_{op}"
        if from_base:
            shutil.copytree(base, store)
        write_forecasts(_crash.fake_forecast(*init), store)
        refs[op] = cube_checksum(store)
        cal = tmp_path / f"cal_{op}"
        if from_base:
            shutil.copytree(base, cal)
        totals[op] = calibrate(ctx, tmp_path, "forecast", {"init": init, "store": str(cal)})
    committed = cube_checksum(base)
    rng = np.random.default_rng(9)
    killed, outcomes = 0, {"previous": 0, "new": 0, "none": 0}
    names = list(ops)
    for k in range(24):
        op = names[k % len(names)]
        init, from_base = ops[op]
        store = tmp_path / f"trial{k}"
        if from_base:
            shutil.copytree(base, store)
        n = kill_point(rng, totals[op], k)
        killed += trial(ctx, "forecast", {"init": init, "store": str(store)}, n)
        state = state_of(store, open_forecasts)
        before = committed if from_base else None
        assert state in (before, refs[op]), f"trial {k} ({op}, kill at {n}): neither before nor after"
        outcomes["none" if state is None else "previous" if state == before else "new"] += 1
        write_forecasts(_crash.fake_forecast(*init), store)  # the re-run
        assert cube_checksum(store) == refs[op], f"trial {k} ({op}, kill at {n}): re-run differs"
    assert killed >= 20
    print(f"\ncrash-safety: forecast store: {killed} SIGKILLs of 24 trials (append/insert/replace/create, calls "
          f"{totals}); state after kill {outcomes}; all re-runs checksum-identical; 0 inits lost")


TRAIN = {"steps": 6, "batch_size": 2, "log_every": 1, "health_every": 4, "checkpoint_every": 2, "workers": 0,
         "window": {"frames": 4, "size": 32},
         "model": {"dim": 48, "depth": 2, "heads": 2, "pred_dim": 24, "pred_depth": 1, "pred_heads": 2}}


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"metrics rows repeated or out of order: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def test_killed_training_resumes_to_the_same_losses(ctx, tmp_path):
    src = tmp_path / "src"
    for i, d in enumerate(days(8)):
        make_scene(src, d, i, cloud=False)
    cube = tmp_path / "cube"
    ingest(src, cube, IngestOptions(**OPTS))
    cfg = json.dumps(TRAIN)

    def kwargs(run, resume=False):
        return {"cube": str(cube), "run": str(run), "cfg": cfg, "resume": resume}

    total = calibrate(ctx, tmp_path, "train", kwargs(tmp_path / "ref"))  # also the uninterrupted reference
    ref = losses(tmp_path / "ref")
    assert sorted(ref) == list(range(1, 7))
    rng = np.random.default_rng(10)
    killed, resumed_from = 0, []
    for k in range(4):
        run = tmp_path / f"trial{k}"
        n = kill_point(rng, total, k)
        killed += trial(ctx, "train", kwargs(run), n)
        ckpt = run / "checkpoint.json"
        resumed_from.append(json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0)
        started = (run / "config.json").exists()  # else killed before the run existed: the user starts it again
        assert not trial(ctx, "train", kwargs(run, resume=started))
        got = losses(run)
        assert got == ref, f"trial {k} (kill at {n}): losses after resume differ from the uninterrupted run"
    assert killed == 4
    print(f"\ncrash-safety: training: {killed} SIGKILLs (calls {total}), resumed from steps {resumed_from}; "
          "losses of all 6 steps bit-identical to the uninterrupted run")
