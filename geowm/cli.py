"""The ``geowm`` command line: synth, ingest, info.

Errors from bad input print one line naming the file and the problem on stderr and exit with
status 2; nothing already on disk is changed by a failed command.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="geowm: Earth-observation forecasting.")
err = Console(stderr=True)
out = Console()

EXIT_BAD_INPUT = 2


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err, transient=False)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _floats(text: str | None, n: int, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != n:
        _fail(ValueError(f"{name} {text!r}: expected {n} comma-separated numbers"))
    return vals


def _ints(text: str | None, name: str) -> list[int] | None:
    """Comma-separated integers and inclusive ranges (``4,5,6``; ``0-40``: a cloud probability of 40 % or less)."""
    if text is None:
        return None
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(-?\d+)\s*-\s*(-?\d+)\s*", part)
        try:
            if m is None:
                out.append(int(part))
            elif int(m.group(1)) <= int(m.group(2)) and int(m.group(2)) - int(m.group(1)) < 2**16:
                out.extend(range(int(m.group(1)), int(m.group(2)) + 1))
            else:
                raise ValueError
        except ValueError:
            _fail(ValueError(f"{name} {text!r}: expected comma-separated integers or ranges (0-40)"))
    return out


def _catalog(catalog: Path | None, no_catalog: bool, cube: str, add) -> None:
    """Keep the STAC catalog current (``--catalog``, default ``catalog`` beside a local cube) with ``add(dir)``."""
    if no_catalog:
        return
    from catalog.stac import default_catalog_dir

    cat_dir = catalog or default_catalog_dir(cube)
    if cat_dir is None:
        err.print(f"STAC catalog not updated: {cube} is on object storage; give --catalog DIR")
        return
    try:
        add(cat_dir)
    except (OSError, ValueError) as exc:
        _fail(ValueError(f"{cat_dir}: the STAC catalog could not be updated ({exc}); the outputs above are "
                         "written"))
    err.print(f"STAC catalog: {cat_dir / 'catalog.json'}")


PRECISION_HELP = ("The model's arithmetic: fp32 (the same result on every machine), bf16 (bfloat16 autocast; fast "
                  "on GPUs and on CPUs with AVX512-BF16 or AMX, slower elsewhere), tf32 (CUDA) or auto (bf16 where "
                  "the device has it, else fp32).")
CATALOG_HELP = "STAC catalog folder to keep current (default: a folder named 'catalog' beside the cube)."


def _lead_days(leads: str) -> list[float]:
    """``--leads`` as days (comma-separated numbers); a clear error and exit 2 otherwise."""
    try:
        return [float(v) for v in leads.split(",") if v.strip()]
    except ValueError:
        _fail(ValueError(f"--leads {leads!r}: expected comma-separated numbers of days"))


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write the synthetic region into (must be new or empty)."),
    size: int = typer.Option(512, help="Region width and height in pixels (10 m each)."),
    start: str = typer.Option("2021-01-01", help="First acquisition date (YYYY-MM-DD)."),
    end: str = typer.Option("2022-12-31", help="Last possible acquisition date (YYYY-MM-DD)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same region."),
    crop_rotation: bool = typer.Option(False, help="Arable fields rotate winter and summer crops between years "
                                                   "(croptype.tif has each year's map)."),
    weather_regimes: bool = typer.Option(False, help="Month-scale warm/cold and wet/dry weather regimes."),
) -> None:
    """Generate a realistic synthetic Sentinel-2-like region: COGs, SCL masks, STAC, land cover, weather, events."""
    from geowm.synth import generate

    with _progress() as bar:
        task = bar.add_task("synth", total=None)
        try:
            summary = generate(out_dir, size=size, start=start, end=end, seed=seed, crop_rotation=crop_rotation,
                               weather_regimes=weather_regimes,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
        except ValueError as exc:
            _fail(exc)
    out.print_json(json.dumps(summary, default=str))


@app.command()
def ingest(
    source: str = typer.Argument(..., help="Folder of GeoTIFF/COG/JPEG 2000 files, a Sentinel-2 SAFE product (or "
                                 "its .zip), a NetCDF or Zarr datacube (openEO, xarray, stackstac), a STAC "
                                 "catalog/collection/item/item collection JSON (a file or URL), or with "
                                 "--collection the URL of a STAC API to search."),
    cube: str = typer.Option(..., "--cube", help="Cube to create or append to (a folder, or s3://bucket/prefix)."),
    crs: str | None = typer.Option(None, help="New cube only: CRS (e.g. EPSG:32633); default: the first source's."),
    resolution: float | None = typer.Option(None, help="New cube only: pixel size in CRS units."),
    bounds: str | None = typer.Option(None, help="New cube only: left,bottom,right,top in the cube CRS."),
    bbox: str | None = typer.Option(None, help="west,south,east,north in degrees (WGS 84): the STAC API search's "
                                               "area, and a new cube's bounds (unless --bounds)."),
    aoi: Path | None = typer.Option(None, help="Instead of --bbox: a vector file of the area of interest "
                                               "(GeoJSON, GeoPackage, shapefile; any CRS): the search takes the "
                                               "items intersecting it, a new cube covers its bounds."),
    collection: str | None = typer.Option(None, "--collection", help="SOURCE is a STAC API: search these "
                                                                     "collections (comma-separated ids, e.g. "
                                                                     "sentinel-2-l2a) with --bbox/--datetime."),
    datetime_range: str | None = typer.Option(None, "--datetime", help="With --collection: an RFC 3339 date or "
                                                                        "interval (2023-01-01/2023-06-30; .. for "
                                                                        "an open end)."),
    max_cloud: float | None = typer.Option(None, help="With --collection: leave out items whose eo:cloud_cover "
                                                      "is above this percentage (the mask still decides "
                                                      "per pixel)."),
    max_items: int = typer.Option(1000, help="With --collection: refuse a search matching more items than this."),
    sign: str | None = typer.Option(None, help="With --collection: sign the assets' hrefs: planetary-computer (SAS "
                                               "tokens) or none (default: planetary-computer for its API)."),
    tile_size: int = typer.Option(256, help="New cube only: tile (spatial chunk) size in pixels."),
    time_chunk: int = typer.Option(8, help="New cube only: dates per chunk."),
    bands: str | None = typer.Option(None, help="New cube only: comma-separated bands to keep, by name or by STAC "
                                                "common name (blue,green,red,nir08: one cube of several sensors; "
                                                "default: all)."),
    band_names: str | None = typer.Option(None, help="Comma-separated names of the bands of multi-band files, in "
                                                     "file order, for stacks without band descriptions (e.g. "
                                                     "blue,green,red,nir: common names make NDVI known; default: "
                                                     "the files' own, or the names the cube's unnamed files were "
                                                     "given)."),
    scale: float | None = typer.Option(None, help="Scale of source bands that state none (no GeoTIFF scale tag, "
                                                  "STAC raster:bands or product convention), as gdal_translate "
                                                  "-a_scale: physical = value x scale + offset (e.g. 0.0001 for "
                                                  "reflectance x 10000); default: such bands are taken at the "
                                                  "cube's scale (new cube: 1)."),
    offset: float | None = typer.Option(None, help="Offset of source bands that state none (with --scale; "
                                                   "default 0)."),
    mask_band: str | None = typer.Option(None, help="Quality/cloud mask band (default: a known one "
                                                    "when present: SCL, UDM2, QA_PIXEL, Fmask, BQA, MSK_CLASSI, "
                                                    "MSK_CLOUDS, QA60)."),
    mask_clear: str | None = typer.Option(None, help="Comma-separated mask values or ranges meaning clear (0-40: a "
                                                     "cloud probability of 40 % or less; default: the "
                                                     "cube's rule; new cube, SCL: 4,5,6,7; 4,5,6 also masks "
                                                     "unclassified, add 11 to keep snow)."),
    mask_bits: str | None = typer.Option(None, help="Comma-separated bits (0 = least significant) of a bit mask "
                                                    "that flag a pixel as not clear, instead of --mask-clear "
                                                    "(default: the cube's rule; new cube, Landsat QA_PIXEL: "
                                                    "0,1,2,3,4,5; HLS Fmask: 1,2,3,4; Landsat "
                                                    "Collection 1 BQA: 0,1,4,6,8,10,12)."),
    mask_buffer: float | None = typer.Option(None, help="Metres around every flagged mask pixel (cloud, shadow, "
                                                        "...) that are not clear either (cloud edges the mask "
                                                        "missed; default: the cube's rule, new cube 0)."),
    resampling: str = typer.Option("bilinear", help="Resampling for sources not on the cube grid (masks: nearest)."),
    scheduler: str = typer.Option("local", help="local (dask LocalCluster), threads, synchronous, or a dask "
                                                "scheduler address (tcp://host:8786)."),
    catalog: Path | None = typer.Option(None, help=CATALOG_HELP),
    no_catalog: bool = typer.Option(False, "--no-catalog", help="Do not update the STAC catalog."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite dates already in the cube with the scenes "
                                                          "given (default: refuse a date or scene that differs)."),
    max_pixels: int = typer.Option(2**31, help="Refuse a source file (or a new cube grid) above this many pixels."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the sources and show what would be ingested (grid, "
                                                          "bands, scale/offset, mask, dates); write nothing."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the plan as JSON."),
) -> None:
    """Ingest new scenes into a Zarr (Icechunk) cube: one atomic commit per run; re-runs change nothing."""
    from geowm.cube.ingest import IngestError, IngestOptions
    from geowm.cube.ingest import ingest as run_ingest
    from geowm.cube.reader import ReadError
    from geowm.cube.store import CubeError
    from geowm.sources import SourceError
    from geowm.stacsource import StacSearch, check_bbox, collections_of, read_aoi

    area = _floats(bbox, 4, "--bbox")
    try:
        shape = None
        if aoi is not None:
            if area is not None:
                raise SourceError("--aoi and --bbox both give the area: give one")
            shape, area = read_aoi(aoi)
        check_bbox(area, source)
        search = None
        if collection is not None:
            search = StacSearch(collections_of(collection), area, datetime_range, max_cloud, max_items, sign, shape)
            search.check(source)
        elif datetime_range is not None or max_cloud is not None or sign is not None:
            raise SourceError("--datetime, --max-cloud and --sign belong to a STAC API search: give --collection too")
    except SourceError as exc:
        _fail(exc)
    opts = IngestOptions(
        crs=crs, resolution=resolution, bounds=_floats(bounds, 4, "--bounds"), bbox=area, search=search,
        tile_size=tile_size,
        time_chunk=time_chunk, bands=bands.split(",") if bands else None,
        band_names=band_names.split(",") if band_names is not None else None, scale=scale, offset=offset,
        mask_band=mask_band,
        mask_clear=_ints(mask_clear, "--mask-clear"), mask_bits=_ints(mask_bits, "--mask-bits"),
        mask_buffer=mask_buffer,
        resampling=resampling,
        scheduler=scheduler, replace=replace, max_pixels=max_pixels, dry_run=dry_run,
    )
    if as_json and not dry_run:
        _fail(ValueError("--json prints the plan of a --dry-run; give both"))
    with contextlib.nullcontext() if dry_run else _progress() as bar:  # a dry run reads headers only: no progress bar
        task = None if bar is None else bar.add_task("ingest", total=None)
        try:
            report = run_ingest(source, cube, opts, progress=None if bar is None else (
                lambda done, total: bar.update(task, completed=done, total=total)))
        except (SourceError, IngestError, CubeError, ReadError) as exc:
            _fail(exc)
    if dry_run:
        _print_plan(report, as_json)
        return
    mb = report.source_bytes / 1e6
    if report.changed:
        err.print(f"ingested {len(report.added_times)} date(s) into {cube} in {report.seconds:.1f} s "
                  f"({mb:.0f} MB of source pixels, {mb / max(report.seconds, 1e-9):.0f} MB/s), "
                  f"snapshot {report.snapshot}")
        if report.replaced_times:
            err.print(f"replaced {len(report.replaced_times)} date(s): {', '.join(report.replaced_times)}")
    else:
        err.print(f"nothing new: {len(report.skipped_scenes)} scene(s) already in {cube}")
    from catalog.stac import update_catalog

    _catalog(catalog, no_catalog, cube, lambda d: update_catalog(d, cube, source))


def _files_text(files: list[str]) -> str:
    """What a scene is read from, in words: ``5 variables of series.zarr`` (a datacube), ``13 files in
    S2B_...zip`` (an archive), ``5 files, URLs``, ``2 files``."""
    from geowm.scene import is_url, local_file

    holders = sorted({local_file(f) for f in files})
    if len(holders) == 1 and holders[0] not in files:  # variables of one datacube, or members of one archive
        name = Path(holders[0]).name
        return f"{len(files)} {'files in' if name.lower().endswith('.zip') else 'variables of'} {name}"
    return f"{len(files)} file(s)" + (", URLs" if all(is_url(f) for f in files) else "")


def _print_plan(report, as_json: bool) -> None:
    """The plan of ``geowm ingest --dry-run``: as JSON, or each scene's bands (dtype, scale and offset read at)
    and mask, then the cube it would make or add to."""
    plan = report.plan
    if as_json:
        out.print_json(json.dumps({"cube": report.cube, "add": report.added_times, "replace": report.replaced_times,
                                   "skip": report.skipped_scenes, "source_bytes": report.source_bytes, **(plan or {})}))
        return
    if plan is None:
        err.print(f"dry run: nothing new, {len(report.skipped_scenes)} scene(s) already in {report.cube}")
        return
    from geowm.sources import describe_mask_rule

    def scaling(b: dict) -> str:
        return "the cube's" if b["scale"] is None else f"x {b['scale']:g} {b['offset']:+g}"

    def line(text: str) -> None:
        out.print(text, markup=False, highlight=False, soft_wrap=True)

    for sc in plan["scenes"]:
        kinds: dict[str, list[str]] = {}
        for name, b in sc["bands"].items():
            kinds.setdefault(f"{b['dtype']}, {scaling(b)}", []).append(name)
        mask = sc["mask"]
        line(f"{sc['id']}  {sc['datetime'][:19]}  ({_files_text(sc['files'])})")
        for k, names in kinds.items():
            line(f"  bands {','.join(names)}: {k}")
        line(f"  mask  {mask['band']}: {describe_mask_rule(mask)}" if mask else "  mask  none: covered = clear")
    g, e = plan["grid"], plan["encoding"]
    bands = ", ".join(f"{b['name']} ({b['common_name']})" if b["common_name"] else b["name"] for b in plan["bands"])
    err.print(f"{'new cube' if plan['new_cube'] else 'cube'} {report.cube}: {g['crs']}, {g['resolution']:g} per px, "
              f"{g['width']} x {g['height']} px; bands {bands}; stored as {e['dtype']} x {e['scale']:g} "
              f"{e['offset']:+g}")
    err.print(f"would add {len(report.added_times)} date(s), replace {len(report.replaced_times)}, skip "
              f"{len(report.skipped_scenes)} scene(s) already in the cube ({report.source_bytes / 1e6:.0f} MB of "
              "source pixels); nothing was written")


@app.command()
def train(
    cube: str = typer.Option(..., "--cube", help="Cube to train on."),
    out: Path = typer.Option(..., "--out", help="Run directory to create (or continue with --resume)."),
    preset: str = typer.Option("tiny", help="Model size: tiny (CPU, minutes), small, base (GPU)."),
    steps: int | None = typer.Option(None, help="Optimizer steps."),
    minutes: float | None = typer.Option(None, help="Or a wall-clock budget in minutes."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped."),
    batch_size: int | None = typer.Option(None, help="Windows per step (default 8)."),
    train_until: str | None = typer.Option(None, help="Last date (YYYY-MM-DD) for training; later dates are "
                                                      "held out for evaluation."),
    config: Path | None = typer.Option(None, help="JSON file with training config keys (see geowm.train."
                                                  "TrainConfig); command-line options override it."),
    landcover: str | None = typer.Option(None, help="Land-cover raster for the land-cover probe: one band, or one "
                                                     "band per year named by its year (e.g. croptype.tif)."),
    seed: int | None = typer.Option(None, help="Random seed (default 0)."),
    workers: int | None = typer.Option(None, help="DataLoader worker processes (default 1)."),
    evaluate: bool = typer.Option(True, help="After training, fit the probes and score held-out forecasts."),
) -> None:
    """Train the JEPA world model on a cube (CPU or CUDA; under torchrun for DDP)."""
    from geowm.cube.store import CubeError
    from geowm.train import RunError, TrainConfig, evaluate_run
    from geowm.train import train as run_train

    try:
        base = json.loads(config.read_text()) if config else {}
    except (OSError, json.JSONDecodeError) as exc:
        _fail(ValueError(f"{config}: cannot read the training config ({exc})"))
    cli = dict(preset=preset, steps=steps, minutes=minutes, device=device, batch_size=batch_size,
               train_until=train_until, seed=seed, workers=workers)
    try:
        cfg = TrainConfig.from_dict({**base, **{k: v for k, v in cli.items() if v is not None}})
        if "preset" not in base:
            cfg.preset = preset
    except RunError as exc:
        _fail(ValueError(f"{config or 'options'}: {exc}"))
    if landcover and evaluate:  # a label raster that cannot be read fails now, not after the training
        from geowm.cube.reader import ReadError, read_labels
        from geowm.cube.store import read_state

        try:
            read_labels(landcover, read_state(cube).grid)
        except (ReadError, CubeError) as exc:
            _fail(exc)
    import os

    rank0 = int(os.environ.get("RANK", "0")) == 0
    with _progress() if rank0 else contextlib.nullcontext() as bar:
        task = bar.add_task("train", total=None) if rank0 else None

        def show(step: int, total: int, row: dict) -> None:
            desc = f"train loss {row['loss']:.4f}"
            if "health_rankme" in row:
                show.health = f" rank {row['health_rankme']:.0f} std {row['health_std_mean']:.2f}"
            bar.update(task, completed=step, total=total, description=desc + getattr(show, "health", ""))

        try:
            run = run_train(cube, out, cfg, resume=resume, progress=show if rank0 else None)
        except (RunError, CubeError, ValueError) as exc:
            _fail(exc)
    if not rank0:
        return
    if evaluate and cfg.model.get("kind", "jepa") != "jepa":
        err.print("pixel-space baseline: no latents to probe (it forecasts bands directly); evaluate with "
                  "geowm.evaluate.evaluate(..., others={'pixel': RUN})")
    elif evaluate:
        report = evaluate_run(run, landcover=landcover, device=device)
        out_console = Console(stderr=True)
        s = report["forecast_skill"]
        out_console.print(f"held-out forecast L1: model {s['l1_model']:.4f} vs copy-last {s['l1_copy_last']:.4f} "
                          f"({s['n_target_tokens']} tokens)")
        out_console.print(f"probes: {json.dumps(report['probes'])}")
    if evaluate:
        from geowm.calibrate import fit_calibration

        cal = fit_calibration(run)
        if cal["used"]:
            nd = {k: np.nan if v is None else v for k, v in cal["backtest"].get("ndvi", {}).get("all", {}).items()}
            err.print(f"climatology blend {json.dumps(cal['weights'])}; backtest NDVI RMSE (training period): "
                      f"model {nd.get('model', np.nan):.4f}, climatology {nd.get('climatology', np.nan):.4f}, "
                      f"blend {nd.get('blend', np.nan):.4f}")
        else:
            err.print(f"no climatology blend: {cal['reason']}")
    err.print(f"run: {run}")


@app.command()
def info(
    cube: str = typer.Argument(..., help="Cube folder (or s3:// URL)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Describe a cube: dims, dates, bands, CRS, resolution, tiles, clear-sky fractions."""
    from geowm.cube.info import summarize
    from geowm.cube.store import CubeError
    from geowm.sources import describe_mask_rule

    try:
        s = summarize(cube)
    except CubeError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(s))
        return
    t = Table(title=f"cube {cube}", show_header=False)
    t.add_row("snapshot", s["snapshot"])
    t.add_row("dims", ", ".join(f"{k}={v}" for k, v in s["dims"].items()))
    tm = s["time"]
    t.add_row("dates", f"{tm['count']} from {tm['first']} to {tm['last']} (median gap {tm['median_gap_days']} d)")
    names = [f"{b} ({c})" if c else b for b, c in zip(s["bands"], s["common_names"] or [""] * len(s["bands"]),
                                                        strict=True)]
    t.add_row("bands", f"{', '.join(names)}; {s['dtype']}")
    t.add_row("crs / resolution", f"{s['crs']} / {s['resolution']:g}")
    digits = max(1, math.ceil(-math.log10(s["resolution"])) + 1) if s["resolution"] > 0 else 1  # degrees: 0.0001 -> 5
    t.add_row("bounds", ", ".join(f"{v:.{digits}f}" for v in s["bounds"]))
    t.add_row("tiles", f"{s['tiles']['count']} ({s['tiles']['rows']} x {s['tiles']['cols']} of "
                       f"{s['tiles']['size_px']} px); chunks {s['chunks']}")
    c = s["clear_fraction"]
    if c["mean"] is not None:
        t.add_row("clear sky", f"mean {c['mean']:.2f}, min {c['min']:.2f}, max {c['max']:.2f}; "
                               f"{c['fully_cloudy_dates']} fully cloudy, {c['clear_dates']} clear dates")
    t.add_row("fill by band", ", ".join(f"{b}={v:.2f}" for b, v in s["band_fill_fraction"].items()))
    t.add_row("sources", str(s["sources"]))
    for r in s["mask_rules"]:
        what = (f"{r['band']} {describe_mask_rule(r)}" if "clear" in r
                else "no mask band" if r["band"] is None else "not recorded")
        t.add_row("mask rule", f"{what} ({r['scenes']} scenes)")
    out.print(t)


@app.command()
def forecast(
    cube: str = typer.Option(..., "--cube", help="Cube folder (or s3:// URL)."),
    model: Path = typer.Option(..., "--model", help="Run directory of a trained model (geowm train --out)."),
    out_store: str = typer.Option(..., "--out", help="Forecast store (created if new; new inits are added)."),
    init: str | None = typer.Option(None, help="Init date: context = clear observations up to it (default: "
                                               "the cube's last date)."),
    leads: str = typer.Option("5,10,20,30", help="Lead times in days, comma-separated (> 0)."),
    valid_times: str | None = typer.Option(None, "--valid-times", help="Explicit dates to forecast (comma-"
                                                                        "separated), instead of --leads."),
    bbox: str | None = typer.Option(None, help="minx,miny,maxx,maxy in the cube CRS (default: whole cube)."),
    members: int = typer.Option(8, help="Ensemble members (context subsamples) for p10/p50/p90 and spread."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    climatology: bool = typer.Option(True, help="Blend the decoded forecast with each pixel's climatology and "
                                                "its damped last departure from it by the run's weights (its "
                                                "calibration.json)."),
    catalog: Path | None = typer.Option(None, help=CATALOG_HELP),
    no_catalog: bool = typer.Option(False, "--no-catalog", help="Do not add the forecast to the STAC catalog."),
) -> None:
    """Forecast latents at each lead, decode them to bands/NDVI with p10/p50/p90, write the forecast store."""
    from geowm.cube.store import CubeError
    from geowm.forecast import ForecastError
    from geowm.forecast import forecast as run_forecast
    from geowm.forecast_store import ForecastStoreError, write_forecasts
    from geowm.inference import WorldModel
    from geowm.train import RunError

    lead_days = _lead_days(leads)
    try:
        vts = None
        if valid_times:
            vts = [np.datetime64(v.strip(), "s") for v in valid_times.split(",") if v.strip()]
        if init is not None:
            np.datetime64(init, "s")
    except ValueError as exc:
        _fail(ValueError(f"cannot parse a date: {exc}"))
    box = _floats(bbox, 4, "--bbox")
    try:
        wm = WorldModel(model, device, precision)
        with _progress() as bar:
            task = bar.add_task("forecast tiles", total=None)
            fc = run_forecast(cube, wm, init=init, leads=lead_days, valid_times=vts, bbox=box, members=members,
                              climatology=climatology,
                              progress=lambda done, total: bar.update(task, completed=done, total=total))
        commit = write_forecasts(fc, out_store)
    except (ForecastError, ForecastStoreError, CubeError, RunError) as exc:
        _fail(exc)
    init_t = str(fc["init_time"].values[0])[:19]
    err.print(f"forecast init {init_t}, leads {[round(d, 2) for d in lead_days] if vts is None else 'valid times'}"
              f", {fc.sizes['y']} x {fc.sizes['x']} px, {members} members -> {out_store} (commit {commit})")
    from catalog.stac import add_forecasts

    _catalog(catalog, no_catalog, cube, lambda d: add_forecasts(d, out_store))


@app.command()
def anomalies(
    cube: str = typer.Option(..., "--cube", help="Cube folder (or s3:// URL) with the new observations."),
    forecasts: str = typer.Option(..., "--forecasts", help="Forecast store (its model and grid are used)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for alerts.geojson, alerts.parquet, scores.zarr."),
    start: str | None = typer.Option(None, "--from", help="First acquisition to score (default: the store's "
                                                          "first init)."),
    end: str | None = typer.Option(None, "--to", help="Last acquisition to score (default: the cube's last)."),
    history_days: float = typer.Option(365.0, help="Days before --from scored as each patch's own history."),
    lead_days: float = typer.Option(60.0, help="Each acquisition is compared with the forecast made from the "
                                               "acquisitions this many days or more before it (90 gave fewer, more "
                                               "precise alerts on the held-out regions, at a slightly lower patch "
                                               "AUROC; see the README)."),
    threshold: float = typer.Option(5.0, help="Score that starts an alert candidate."),
    confirm_threshold: float = typer.Option(4.0, help="Score the following clear observations need to confirm it."),
    confirmations: int = typer.Option(2, help="Further clear observations at the confirm score that confirm it."),
    min_area_ha: float = typer.Option(1.0, help="Smallest alert kept (hectares; the minimum mapping unit)."),
    neighbours: bool = typer.Option(True, "--neighbours/--no-neighbours",
                                    help="A confirmation also confirms the connected neighbouring candidates one "
                                         "observation short (parts of the same change hidden by clouds)."),
    regional_residual: bool = typer.Option(False, help="Subtract each date's regional median surprise first "
                                                       "(scene-wide haze or illumination shifts)."),
    recurrence: bool = typer.Option(True, "--recurrence/--no-recurrence",
                                    help="Cap the scores of change a patch already showed in the same season a "
                                         "year or more before, in any earlier year of the cube (harvest, "
                                         "mowing)."),
    seasonal: bool = typer.Option(True, "--seasonal/--no-seasonal",
                                  help="Also score the departure from the patch's latents a year before (slow, "
                                       "widespread vegetation loss such as drought), and count only vegetation "
                                       "loss against a year before; needs a year of cube."),
    water: bool = typer.Option(True, "--water/--no-water",
                               help="Also score new open water (a spectral rule: pixels that are water now and were "
                                    "not on any clear look in the 425 to 30 days before; floods on fields, which "
                                    "the model's scores take for land use); needs a green and a near-infrared "
                                    "band."),
    rescore: bool = typer.Option(False, "--rescore", help="Encode every acquisition again instead of taking the "
                                                          "ones OUT/surprise.zarr still holds (it is replaced)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    catalog: Path | None = typer.Option(None, help=CATALOG_HELP),
    no_catalog: bool = typer.Option(False, "--no-catalog", help="Do not add the alerts to the STAC catalog."),
) -> None:
    """Score new observations against the model's forecasts and write confirmed alerts and the score raster.

    OUT/surprise.zarr records the surprise of every acquisition scored, the history included: a later run with
    the same model and settings encodes only the acquisitions that are new (or whose scenes changed) and their
    year-ago references."""
    from geowm.alerts import AlertRules, write_alerts
    from geowm.anomaly import detect, write_scores
    from geowm.cube.store import CubeError, open_cube
    from geowm.forecast_store import ForecastStoreError, open_forecasts
    from geowm.inference import WorldModel
    from geowm.train import RunError

    try:
        store = open_forecasts(forecasts)
        ds = open_cube(cube)
        wm = WorldModel(store.attrs["geowm:model_run"], device, precision)
        if store.spatial_ref.attrs.get("crs_wkt") != ds.spatial_ref.attrs.get("crs_wkt"):
            raise ForecastStoreError(f"{forecasts}: made from a cube in another CRS than {cube}")
        xs, ys = store["x"].values, store["y"].values
        if not (np.isin(xs, ds["x"].values).all() and np.isin(ys, ds["y"].values).all()):
            raise ForecastStoreError(f"{forecasts}: made from another cube grid than {cube}")
        half = abs(float(xs[1] - xs[0])) / 2 if len(xs) > 1 else 0.0
        bbox = (xs.min() - half, ys.min() - half, xs.max() + half, ys.max() + half)
        first = np.datetime64(start, "s") if start else store["init_time"].values.min().astype("datetime64[s]")
        times = ds["time"].values.astype("datetime64[s]")
        if first > times[-1]:
            raise CubeError(f"{cube}: no acquisition after {first} (last is {times[-1]})")
        rules = AlertRules(threshold=threshold, confirm_threshold=confirm_threshold, confirmations=confirmations,
                           min_area_ha=min_area_ha, neighbours=neighbours)
        with _progress() as bar:
            task = bar.add_task("score tiles", total=None)
            scores, alerts = detect(ds, wm, first, end=end, history_days=history_days, bbox=bbox, lead_days=lead_days,
                                    rules=rules, regional=regional_residual, recurrence=recurrence,
                                    seasonal=seasonal, water=water, record=out_dir / "surprise.zarr",
                                    rescore=rescore,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
    except (ForecastStoreError, CubeError, RunError, ValueError) as exc:
        _fail(exc)
    write_scores(scores, out_dir / "scores.zarr")
    paths = write_alerts(alerts, out_dir)
    err.print(f"{len(alerts)} alert(s) from {scores.sizes['time']} acquisition(s) since {first}: "
              f"{paths['geojson']}, {paths['parquet']}, {out_dir / 'scores.zarr'}")
    err.print(f"acquisitions encoded: {scores.attrs['geowm:computed_dates']}, taken from the surprise record: "
              f"{scores.attrs['geowm:reused_dates']} ({out_dir / 'surprise.zarr'}; the history and earlier "
              "seasons included, the year-ago references encoded for the departure not counted)")
    from catalog.stac import add_alerts

    _catalog(catalog, no_catalog, cube, lambda d: add_alerts(d, out_dir))


@app.command()
def evaluate(
    cube: str = typer.Option(..., "--cube", help="Cube folder (or s3:// URL)."),
    model: Path = typer.Option(..., "--model", help="Run directory of a trained model."),
    events: Path = typer.Option(..., "--events", help="Ground-truth events GeoJSON (e.g. from geowm synth)."),
    start: str = typer.Option(..., "--from", help="First date of the held-out period."),
    leads: str = typer.Option("5,10,20,30", help="Lead times in days, comma-separated."),
    init_every: float = typer.Option(10.0, help="Days between forecast inits in the held-out period."),
    history_days: float = typer.Option(365.0, help="Days before --from scored as each patch's history."),
    out_json: Path | None = typer.Option(None, "--json", help="Write the report here (JSON)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    landcover: str | None = typer.Option(None, help="Land-cover raster: also check that nearest latents "
                                                     "(geowm.similar) share the query's class."),
    calibrate_days: float = typer.Option(90.0, help="Days after --from that fit the model's blend with the "
                                                    "pixels' climatology; NDVI forecasts are scored after them "
                                                    "(0: no blend, scored from --from)."),
    block_px: int | None = typer.Option(None, "--block-px", help="Forecasts and baselines are scored this many px "
                                                                 "square at a time (memory grows with its square, "
                                                                 "not with the region); a multiple of the model's "
                                                                 "window size [default: 256, rounded up to one]."),
) -> None:
    """Model vs baselines on a held-out period: NDVI RMSE/MAE by lead, anomaly AUROC, alert scores."""
    from geowm.cube.reader import ReadError
    from geowm.cube.store import CubeError
    from geowm.evaluate import evaluate as run_evaluate
    from geowm.evaluate import table
    from geowm.forecast import ForecastError
    from geowm.inference import WorldModel
    from geowm.train import RunError

    lead_days = _lead_days(leads)
    try:
        wm = WorldModel(model, device, precision)
        with _progress() as bar:
            task = bar.add_task("evaluate", total=None)
            report = run_evaluate(cube, wm, str(events), start, leads=lead_days, init_every_days=init_every,
                                  history_days=history_days, landcover=landcover, calibrate_days=calibrate_days,
                                  block_px=block_px,
                                  progress=lambda done, total: bar.update(task, completed=done, total=total))
    except (ForecastError, CubeError, RunError, ReadError, ValueError) as exc:
        _fail(exc)
    if out_json:
        from geowm.atomic import atomic_write_text

        atomic_write_text(out_json, json.dumps(report, indent=1, default=str))
    out.print(table(report), highlight=False)


@app.command()
def calibrate(
    model: Path = typer.Option(..., "--model", help="Run directory of a trained model."),
    cube: str | None = typer.Option(None, "--cube", help="Cube to backtest on (default: the run's cube)."),
    start: str | None = typer.Option(None, "--from", help="First backtest init (default: any with a year of "
                                                          "cube before it)."),
    until: str | None = typer.Option(None, help="Last valid date of the backtest (default: the run's "
                                                "train_until)."),
    leads: str = typer.Option("5,10,20,30", help="Lead times in days, comma-separated."),
    inits: int = typer.Option(6, help="Backtest inits."),
    every: float = typer.Option(30.0, help="Days between backtest inits."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
) -> None:
    """Fit the run's blend of its forecasts with the pixels' climatology on a backtest (calibration.json).

    Best on observations the model was not trained on: --from after the run's train_until."""
    from geowm.calibrate import fit_calibration
    from geowm.cube.store import CubeError
    from geowm.forecast import ForecastError
    from geowm.inference import WorldModel
    from geowm.train import RunError

    lead_days = _lead_days(leads)
    try:
        for d in (start, until):
            if d is not None:
                np.datetime64(d, "s")
    except ValueError as exc:
        _fail(ValueError(f"cannot parse a date: {exc}"))
    try:
        report = fit_calibration(WorldModel(model, device, precision), cube, start=start, until=until, leads=lead_days,
                                 n_inits=inits, every_days=every)
    except (ForecastError, CubeError, RunError, ValueError) as exc:
        _fail(exc)
    nd = report.get("backtest", {}).get("ndvi", {})
    for ld in [f"{v:g}" for v in lead_days]:
        if ld in nd:
            r = nd[ld]
            out.print(f"lead {ld:>4} d: NDVI RMSE model {r['model']:.4f}, climatology {r['climatology']:.4f}, "
                      f"climatology + departure {r['climatology_departure']:.4f}, blend {r['blend']:.4f} "
                      f"({r['n']} px)")
    if report["used"]:
        err.print(f"blend weights {json.dumps(report['weights'])} -> {model / 'calibration.json'}")
    else:
        err.print(f"no blend: {report['reason']} ({model / 'calibration.json'})")


@app.command()
def serve(
    source: str = typer.Option(..., "--source", help="Watched folder of GeoTIFFs, JPEG 2000 files or Sentinel-2 SAFE "
                               "products (unpacked or .zip), STAC catalog/collection JSON, or with --collection "
                               "the URL of a STAC API searched each tick for the items since the cube's last "
                               "date."),
    collection: str | None = typer.Option(None, "--collection", help="--source is a STAC API: these collections "
                                                                     "(comma-separated ids)."),
    bbox: str | None = typer.Option(None, help="With --collection: the area searched (west,south,east,north in "
                                               "degrees), and a new cube's bounds."),
    start: str | None = typer.Option(None, help="With --collection: the first date searched while the cube is "
                                                "empty (YYYY-MM-DD)."),
    max_cloud: float | None = typer.Option(None, help="With --collection: leave out items above this "
                                                      "eo:cloud_cover (percent)."),
    cube: str = typer.Option(..., "--cube", help="Cube the new scenes are ingested into."),
    model: str = typer.Option(..., "--model", help="Run directory of a trained model."),
    store: str = typer.Option(..., "--forecasts", help="Forecast store."),
    alerts: str = typer.Option(..., "--alerts", help="Alerts folder (alerts.geojson/.parquet, scores.zarr)."),
    state_dir: str | None = typer.Option(None, help="Ledger and task results (default: 'pipeline' beside the cube)."),
    catalog: str | None = typer.Option(None, help="STAC catalog folder (default: 'catalog' beside the cube)."),
    interval: float | None = typer.Option(None, help="Pipeline schedule: every N seconds (default 3600)."),
    cron: str | None = typer.Option(None, help="Pipeline schedule: a cron expression instead, e.g. '0 6 * * *'."),
    leads: str = typer.Option("5,10,20,30", help="Forecast lead times in days, comma-separated."),
    members: int = typer.Option(4, help="Forecast ensemble members."),
    history_days: float = typer.Option(365.0, help="Days before the new acquisitions scored as history."),
    threshold: float = typer.Option(5.0, help="Score that starts an alert candidate."),
    confirm_threshold: float = typer.Option(4.0, help="Score the following clear observations need to confirm it."),
    confirmations: int = typer.Option(2, help="Further clear observations at the confirm score that confirm it."),
    tile_px: int | None = typer.Option(None, help="Forecast tile size in px (default: the cube's tile size)."),
    simulate_archive: str | None = typer.Option(None, help="Also serve the new-scenes simulator: replay this "
                                                             "synthetic archive into --source on the same schedule."),
    simulate_days: float = typer.Option(5.0, help="Simulated days released per simulator tick."),
    device: str = typer.Option("cpu", help="Where the pipeline's and the forecast flow's model runs: cpu, cuda "
                                           "or auto."),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
) -> None:
    """Serve the Prefect deployments (scheduled pipeline; ingest, forecast, train on demand) against
    PREFECT_API_URL (default http://127.0.0.1:4200/api: `prefect server start --host 127.0.0.1`)."""
    from flows.serve import ApiUnreachable, ServeConfig
    from flows.serve import serve as run_serve
    from geowm.inference import pick_precision
    from geowm.train import RunError, pick_device

    if interval is None and cron is None:
        interval = 3600.0
    try:  # the served runs execute on this machine: a device or precision it lacks fails now, not at each run
        pick_precision(precision, pick_device(device))
    except RunError as exc:
        _fail(exc)
    lead_days = _lead_days(leads)
    search = None
    if collection is not None:
        from geowm.sources import SourceError
        from geowm.stacsource import StacSearch, collections_of

        area = _floats(bbox, 4, "--bbox")
        try:
            StacSearch(collections_of(collection), area, f"{start}/.." if start else None, max_cloud).check(source)
        except SourceError as exc:
            _fail(exc)
        search = {"collections": list(collections_of(collection)), "bbox": list(area) if area else None,
                  "start": start, "max_cloud": max_cloud}
    elif bbox or start or max_cloud is not None:
        _fail(ValueError("--bbox, --start and --max-cloud describe a STAC API search: give --collection too"))
    cfg = ServeConfig(source=source, cube=cube, model=model, store=store, alerts=alerts, state_dir=state_dir,
                      catalog=catalog, interval_s=interval, cron=cron, simulate_archive=simulate_archive,
                      simulate_days=simulate_days,
                      pipeline=dict(leads=lead_days, members=members, history_days=history_days, threshold=threshold,
                                    confirm_threshold=confirm_threshold, confirmations=confirmations,
                                    **({"tile_px": tile_px} if tile_px else {}),
                                    **({"device": device} if device != "cpu" else {}),
                                    **({"precision": precision} if precision != "fp32" else {}),
                                    **({"search": search} if search else {})))
    try:
        run_serve(cfg)
    except (ApiUnreachable, ValueError) as exc:
        _fail(exc)


@app.command()
def simulate(
    watched: Path = typer.Argument(..., help="Watched folder the new scenes appear in."),
    archive: Path = typer.Option(..., "--archive", help="Synthetic archive to replay (generated here if new)."),
    until: str | None = typer.Option(None, help="Set the simulated today to this date (YYYY-MM-DD)."),
    days: float | None = typer.Option(None, help="Or move the simulated today forward by N days."),
    stac: bool = typer.Option(False, "--stac", help="Also keep a STAC collection (WATCHED/stac/collection.json)."),
    size: int = typer.Option(256, help="New archive: region size in px."),
    start: str = typer.Option("2021-01-01", help="New archive: first acquisition date."),
    end: str = typer.Option("2021-12-31", help="New archive: last possible acquisition date."),
    seed: int = typer.Option(0, help="New archive: random seed."),
) -> None:
    """New scenes arrive: replay a deterministic synthetic record into a watched folder, day by day."""
    from flows.simulator import SimulatorError, advance, make_archive

    try:
        make_archive(archive, size=size, start=start, end=end, seed=seed)
        report = advance(archive, watched, days=days, until=until, stac=stac)
    except (SimulatorError, ValueError) as exc:
        _fail(exc)
    out.print_json(json.dumps(report))


@app.command()
def dashboard(
    workdir: Path = typer.Option(Path("."), "--workdir", help="Folder with cube/, forecasts/, alerts/ (e.g. demo)."),
    port: int = typer.Option(8501, help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (default: this machine only)."),
) -> None:
    """Open the analysts' dashboard (Streamlit) on a workdir: map of alerts, series, table, system panel."""
    import os

    if not workdir.is_dir():
        _fail(ValueError(f"--workdir {workdir}: no such folder"))
    launch = Path(__file__).resolve().parent.parent / "dashboard" / "launch.py"  # installed beside geowm
    if not launch.is_file():
        _fail(ValueError(f"{launch}: the dashboard package is not installed beside geowm"))
    err.print(f"dashboard for {workdir.resolve()} on http://{host}:{port}  (Ctrl+C stops it)")
    cmd = [sys.executable, str(launch), "--workdir", str(workdir.resolve()), "--port", str(port), "--host", host]
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
