"""The ``geowm`` command line: synth, ingest, info.

Errors from bad input print one line naming the file and the problem on stderr and exit with
status 2; nothing already on disk is changed by a failed command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write the synthetic region into (must be new or empty)."),
    size: int = typer.Option(512, help="Region width and height in pixels (10 m each)."),
    start: str = typer.Option("2021-01-01", help="First acquisition date (YYYY-MM-DD)."),
    end: str = typer.Option("2022-12-31", help="Last possible acquisition date (YYYY-MM-DD)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same region."),
) -> None:
    """Generate a realistic synthetic Sentinel-2-like region: COGs, SCL masks, STAC, land cover, weather, events."""
    from geowm.synth import generate

    with _progress() as bar:
        task = bar.add_task("synth", total=None)
        try:
            summary = generate(out_dir, size=size, start=start, end=end, seed=seed,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
        except ValueError as exc:
            _fail(exc)
    out.print_json(json.dumps(summary, default=str))


@app.command()
def ingest(
    source: str = typer.Argument(..., help="Folder of GeoTIFF/COG files, or a STAC catalog/collection/item JSON."),
    cube: str = typer.Option(..., "--cube", help="Cube to create or append to (a folder, or s3://bucket/prefix)."),
    crs: str | None = typer.Option(None, help="New cube only: CRS (e.g. EPSG:32633); default: the first source's."),
    resolution: float | None = typer.Option(None, help="New cube only: pixel size in CRS units."),
    bounds: str | None = typer.Option(None, help="New cube only: left,bottom,right,top in the cube CRS."),
    tile_size: int = typer.Option(256, help="New cube only: tile (spatial chunk) size in pixels."),
    time_chunk: int = typer.Option(8, help="New cube only: dates per chunk."),
    bands: str | None = typer.Option(None, help="New cube only: comma-separated bands to keep (default: all)."),
    mask_band: str | None = typer.Option(None, help="Quality/cloud mask band (default: SCL when present)."),
    mask_clear: str | None = typer.Option(None, help="Comma-separated mask values meaning clear (SCL default: "
                                                     "4,5,6,7,11)."),
    resampling: str = typer.Option("bilinear", help="Resampling for sources not on the cube grid (masks: nearest)."),
    scheduler: str = typer.Option("local", help="local (dask LocalCluster), threads, synchronous, or a dask "
                                                "scheduler address (tcp://host:8786)."),
    catalog: Path | None = typer.Option(None, help="STAC catalog folder to keep current (default: a folder "
                                                   "named 'catalog' beside the cube)."),
    no_catalog: bool = typer.Option(False, "--no-catalog", help="Do not update the STAC catalog."),
) -> None:
    """Ingest new scenes into a Zarr (Icechunk) cube: one atomic commit per run; re-runs change nothing."""
    from geowm.cube.ingest import IngestError, IngestOptions
    from geowm.cube.ingest import ingest as run_ingest
    from geowm.cube.reader import ReadError
    from geowm.cube.store import CubeError
    from geowm.sources import SourceError

    opts = IngestOptions(
        crs=crs, resolution=resolution, bounds=_floats(bounds, 4, "--bounds"), tile_size=tile_size,
        time_chunk=time_chunk, bands=bands.split(",") if bands else None, mask_band=mask_band,
        mask_clear=[int(v) for v in mask_clear.split(",")] if mask_clear else None, resampling=resampling,
        scheduler=scheduler,
    )
    with _progress() as bar:
        task = bar.add_task("ingest", total=None)
        try:
            report = run_ingest(source, cube, opts,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
        except (SourceError, IngestError, CubeError, ReadError) as exc:
            _fail(exc)
    mb = report.source_bytes / 1e6
    if report.changed:
        err.print(f"ingested {len(report.added_times)} date(s) into {cube} in {report.seconds:.1f} s "
                  f"({mb:.0f} MB of source pixels, {mb / max(report.seconds, 1e-9):.0f} MB/s), "
                  f"snapshot {report.snapshot}")
    else:
        err.print(f"nothing new: {len(report.skipped_scenes)} scene(s) already in {cube}")
    if not no_catalog:
        from catalog.stac import update_catalog

        cat_dir = catalog or Path(cube).parent / "catalog"
        update_catalog(cat_dir, cube, source)
        err.print(f"STAC catalog: {cat_dir / 'catalog.json'}")


@app.command()
def info(
    cube: str = typer.Argument(..., help="Cube folder (or s3:// URL)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Describe a cube: dims, dates, bands, CRS, resolution, tiles, clear-sky fractions."""
    from geowm.cube.info import summarize
    from geowm.cube.store import CubeError

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
    t.add_row("bands", f"{', '.join(s['bands'])} ({s['dtype']})")
    t.add_row("crs / resolution", f"{s['crs']} / {s['resolution']:g}")
    t.add_row("bounds", ", ".join(f"{v:.1f}" for v in s["bounds"]))
    t.add_row("tiles", f"{s['tiles']['count']} ({s['tiles']['rows']} x {s['tiles']['cols']} of "
                       f"{s['tiles']['size_px']} px); chunks {s['chunks']}")
    c = s["clear_fraction"]
    if c["mean"] is not None:
        t.add_row("clear sky", f"mean {c['mean']:.2f}, min {c['min']:.2f}, max {c['max']:.2f}; "
                               f"{c['fully_cloudy_dates']} fully cloudy, {c['clear_dates']} clear dates")
    t.add_row("fill by band", ", ".join(f"{b}={v:.2f}" for b, v in s["band_fill_fraction"].items()))
    t.add_row("sources", str(s["sources"]))
    out.print(t)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
