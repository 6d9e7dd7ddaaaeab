"""Run the benchmark suite: ``python -m benchmarks.run [--quick | --smoke] [--only NAME[,NAME]] [--out DIR]``.

Each benchmark is a module ``benchmarks/bench_<name>.py`` (or the one named in ``MODULES``) with
``run(mode, workdir) -> dict`` returning
``{"results": {"headline": {metric: number}, ...details}, "targets": {key: {"target", "value", "met"}}}``
and optionally ``"artifacts": [paths]`` (plots written under its work folder)
(mode is ``full``, ``quick`` or ``smoke``). This runner calls them one after the other, writes
``OUT/<name>.json`` for each, copies its artifacts into ``OUT`` (their file names listed in the JSON)
and regenerates ``OUT/README.md`` from every JSON present in ``OUT``.
A failing benchmark is recorded (``status: "failed: <error>"``) and the others still run.

Optional result keys: ``tables`` (lines of Markdown, shown under the headline table) and ``figures``
(paths of files the benchmark wrote, e.g. PNG plots: copied into ``OUT`` and listed by file name).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# run order; module benchmarks.bench_<name>
BENCHMARKS = ("ingest", "stac_api", "synth", "store_choice", "loader", "train_step", "forecast", "model", "scaling",
              "dashboard", "skill", "efficiency")
MODULES = {"train_step": "benchmarks.bench_train"}  # benchmarks whose module is not benchmarks.bench_<name>
MODES = ("full", "quick", "smoke")
PACKAGES = ("numpy", "zarr", "icechunk", "rasterio", "dask", "distributed", "torch")
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_WORK = ROOT / "benchmarks" / "work"


# ------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _gpu() -> str | None:
    """The CUDA devices nvidia-smi lists (name, memory), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return "; ".join(names) if out.returncode == 0 and names else None


def machine_info() -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "ram_gib": _ram_gib(),
        "gpu": _gpu(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": _git_commit(),
    }


def machine_line(m: dict) -> str:
    v = m.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in PACKAGES if v.get(k))
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM{gpu} "
            f"(1-min load average {m.get('load_avg_1m_at_start', 'n/a')} at start, "
            f"{m.get('load_avg_1m_at_end', 'n/a')} at end); Python {m.get('python')} on "
            f"{m.get('platform')}; {libs}; commit {m.get('git_commit') or 'n/a'}")


# ------------------------------------------------------------------------------------------- running


def run_one(name: str, mode: str, workdir: Path, machine: dict, out_dir: Path | None = None) -> dict:
    """Run one benchmark; never raises (a failure becomes ``status: "failed: ..."``).

    Its artifacts (files it lists under ``"artifacts"``) are copied into ``out_dir`` when given."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    machine = {**machine, "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}  # other work on the machine?
    t0 = time.perf_counter()
    results: dict = {}
    targets: dict = {}
    artifacts: list[str] = []
    saved_env = dict(os.environ)  # e.g. dask nannies write MALLOC_TRIM_THRESHOLD_ into os.environ
    try:
        module = importlib.import_module(MODULES.get(name, f"benchmarks.bench_{name}"))
        out = module.run(mode, workdir / name)
        results, targets = out["results"], out.get("targets", {})
        for path in out.get("artifacts", []):
            path = Path(path)
            if out_dir is not None:
                shutil.copyfile(path, out_dir / path.name)
            artifacts.append(path.name)
        status = "ok"
    except Exception as exc:  # noqa: BLE001 - one failing benchmark must not stop the others
        traceback.print_exc()
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        status = f"failed: {type(exc).__name__}: {msg}"[:500]
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    machine["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return {"name": name, "mode": mode, "machine": machine, "started": started,
            "seconds": round(time.perf_counter() - t0, 2), "results": results, "targets": targets,
            "artifacts": artifacts, "status": status}


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "—" if v is None else str(v)


def render_readme(out_dir: Path) -> str:
    """Markdown summary of every ``<name>.json`` in ``out_dir`` (known benchmarks first, in run order)."""
    docs = {}
    for p in sorted(out_dir.glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "name" in doc and "results" in doc:
            docs[doc["name"]] = doc
    order = [n for n in BENCHMARKS if n in docs] + sorted(n for n in docs if n not in BENCHMARKS)
    lines = ["# geowm benchmark results", "",
             "Generated by `python -m benchmarks.run` (`make bench`, `make bench-quick`); one JSON per benchmark "
             "in this folder holds every number. Throughputs in MB are 10^6 bytes of decoded pixels.", ""]
    for name in order:
        doc = docs[name]
        results, targets = doc.get("results") or {}, doc.get("targets") or {}
        lines += [f"## {name}", "",
                  f"Mode `{doc.get('mode')}`, status **{doc.get('status')}**, started {doc.get('started')}, "
                  f"took {_fmt(doc.get('seconds'))} s.", ""]
        if results.get("description"):
            lines += [results["description"], ""]
        by_metric = {t.get("metric"): (k, t) for k, t in targets.items()}
        lines += ["| metric | value | target | met |", "|---|---:|---|---|"]
        for metric, value in (results.get("headline") or {}).items():
            _, t = by_metric.get(metric, (None, None))
            lines.append(f"| {metric} | {_fmt(value)} | {t['target'] if t else '—'} | "
                         f"{_fmt(t.get('met')) if t else '—'} |")
        for key, t in targets.items():  # targets on numbers that are not headline rows
            if t.get("metric") not in (results.get("headline") or {}):
                lines.append(f"| {key} | {_fmt(t.get('value'))} | {t.get('target')} | {_fmt(t.get('met'))} |")
        if results.get("tables"):
            lines += ["", *results["tables"]]
        for fig in results.get("figures") or []:
            lines += ["", f"![{name}: {Path(fig).stem}]({Path(fig).name})"]
        if results.get("notes"):
            lines += ["", *[f"- {n}" for n in results["notes"]]]
        for art in doc.get("artifacts") or []:
            if art.lower().endswith(".png"):
                lines += ["", f"![{name}: {art}]({art})"]
        lines += ["", f"Machine: {machine_line(doc.get('machine') or {})}", ""]
    return "\n".join(lines)


def _collect(figures: list[str], out_dir: Path) -> list[str]:
    """Copy a benchmark's figures into the results folder; their file names (missing ones are dropped)."""
    import shutil

    names = []
    for fig in figures:
        src = Path(fig)
        if src.is_file():
            if src.resolve() != (out_dir / src.name).resolve():
                shutil.copyfile(src, out_dir / src.name)
            names.append(src.name)
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller problems (minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny problems (seconds; used by the tests)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default benchmarks/results)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder (default benchmarks/work)")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    failed = 0
    for name in names:
        print(f"[bench] {name} ({mode}) ...", flush=True)
        doc = run_one(name, mode, args.work.resolve(), machine, args.out)
        doc["results"]["figures"] = _collect(doc["results"].get("figures") or [], args.out)
        (args.out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(f"[bench] {name}: {doc['status']} in {doc['seconds']} s "
              f"{json.dumps(doc['results'].get('headline', {}))}", flush=True)
        failed += doc["status"] != "ok"
    (args.out / "README.md").write_text(render_readme(args.out))
    print(f"[bench] results in {args.out}/ ({len(names) - failed} ok, {failed} failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
