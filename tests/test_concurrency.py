"""Concurrency: two ingests into one cube at once (one waits its turn or fails cleanly and can be re-run; the
cube is never corrupt), and readers (geowm.open_cube, the dashboard's data layer) during ingest commits only
ever see whole committed states."""

from __future__ import annotations

import hashlib
import shutil
from datetime import date
from pathlib import Path

import _crash
import pytest
from test_ingest import days, make_scene
from typer.testing import CliRunner

from geowm.cli import app
from geowm.cube import IngestOptions, cube_checksum, ingest, open_cube
from geowm.cube.store import cube_lock, tree_digest

OPTS = dict(tile_size=32, time_chunk=2, scheduler="synchronous")
runner = CliRunner()


def batches(root: Path, n: int, per: int = 2) -> list[Path]:
    """``n`` folders of ``per`` dates each, interleaved in time (later batches insert between earlier dates)."""
    out = []
    for b in range(n):
        folder = root / f"batch{b}"
        for i in range(per):
            make_scene(folder, date(2021, 3, 1 + 2 * b + 9 * i), 100 * b + i)
        out.append(folder)
    return out


def test_ingest_while_another_holds_the_lock_fails_cleanly_and_reruns(tmp_path):
    src = tmp_path / "src"
    for i, d in enumerate(days(2, start=date(2021, 1, 1))):
        make_scene(src, d, i)
    cube = tmp_path / "cube"
    ingest(src, cube, IngestOptions(**OPTS))
    more = batches(tmp_path, 1)[0]
    before = tree_digest(cube)
    with cube_lock(cube):  # another writer
        res = runner.invoke(app, ["ingest", str(more), "--cube", str(cube), "--scheduler", "synchronous",
                                  "--no-catalog"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "another process is writing this cube; re-run when it has finished" in text, text
    assert str(cube) in text
    assert tree_digest(cube) == before
    res = runner.invoke(app, ["ingest", str(more), "--cube", str(cube), "--scheduler", "synchronous", "--no-catalog"])
    assert res.exit_code == 0, res.output
    assert open_cube(cube).sizes["time"] == 4


def test_two_ingests_at_once_never_corrupt_the_cube(ctx, tmp_path):
    """Two processes ingest different batches into one cube at the same moment, three times over (new cube,
    then existing); whoever loses the lock fails with a clear message and its re-run completes the cube."""
    groups = batches(tmp_path / "src", 6)
    ref = tmp_path / "ref"
    for g in groups:
        ingest(g, ref, IngestOptions(**OPTS))
    cube = tmp_path / "cube"
    conflicts = 0
    for r in range(3):
        pair = groups[2 * r: 2 * r + 2]
        procs, reports = [], []
        for i, g in enumerate(pair):
            report = tmp_path / f"report{r}{i}"
            p = ctx.Process(target=_crash.run_child, args=("ingests", None, None, {
                "sources": [str(g)], "cube": str(cube), "opts": OPTS, "report": str(report)}))
            procs.append(p)
            reports.append(report)
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            assert p.exitcode == 0
        for g, report in zip(pair, reports, strict=True):
            outcome = report.read_text()
            if outcome != "ok":
                assert "another process is writing this cube" in outcome or "was writing this cube" in outcome, outcome
                conflicts += 1
                open_cube(cube).load()  # the winner's cube is whole
                ingest(g, cube, IngestOptions(**OPTS))  # the re-run
    assert cube_checksum(cube) == cube_checksum(ref)
    print(f"\nconcurrency: 3 pairs of simultaneous ingests, {conflicts} refused by the lock and re-run; "
          "final cube checksum-identical to sequential ingests")


def _key(ds) -> str:
    """Identity of what a reader saw: times, values and validity, read in full."""
    h = hashlib.sha256(ds["time"].values.astype("int64").tobytes())
    h.update(ds["reflectance"].values.tobytes())
    h.update(ds["valid"].values.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("reader", ["open_cube", "dashboard"])
def test_readers_during_ingest_commits_see_only_committed_states(ctx, tmp_path, reader):
    from dashboard import data

    groups = batches(tmp_path / "src", 4)
    first, rest = groups[0], groups[1:]
    ref = tmp_path / "ref"
    ingest(first, ref, IngestOptions(**OPTS))
    states = {_key(open_cube(ref))}
    for g in rest:
        ingest(g, ref, IngestOptions(**OPTS))
        states.add(_key(open_cube(ref)))
    workdir = tmp_path / "wd"
    cube = workdir / "cube"
    ingest(first, cube, IngestOptions(**OPTS))
    read = (lambda: open_cube(cube)) if reader == "open_cube" else (lambda: data.open_sources(workdir).cube)
    p = ctx.Process(target=_crash.run_child, args=("ingests", None, None, {
        "sources": [str(g) for g in rest], "cube": str(cube), "opts": OPTS, "report": str(tmp_path / "report")}))
    p.start()
    seen, reads = set(), 0
    while p.is_alive():
        key = _key(read())
        assert key in states, f"read {reads} saw a state that was never committed"
        seen.add(key)
        reads += 1
    p.join()
    assert p.exitcode == 0 and (tmp_path / "report").read_text().split() == ["ok"] * 3
    final = _key(read())
    assert final == _key(open_cube(ref))
    seen.add(final)
    print(f"\nconcurrency: {reader}: {reads} reads during 3 ingest commits saw {len(seen)} distinct committed "
          f"states of {len(states)}, none half-written")
    shutil.rmtree(tmp_path / "src")
