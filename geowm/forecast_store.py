"""The forecast store: forecasts of many inits in one Zarr v3 store (an Icechunk repository, like cubes).

Layout (DESIGN.md): decoded variables (one per band, and ``ndvi``) ``(init_time, lead_time, quantile,
y, x)``; ``embedding (init_time, lead_time, py, px, latent)``; ``latent_spread``; ``n_context``;
coord ``valid_time(init_time, lead_time)``; attrs the model run id and config hash, and
``geowm:cube_snapshots`` (init -> the cube snapshot it was made from) and ``geowm:climatology_blends`` (init
-> the climatology blend weights its decoded variables used, JSON; see geowm.calibrate). Chunks: one init, all leads and
quantiles, 256 x 256 px (decoded) or 32 x 32 patches (embedding).

Writes: a new init is appended (or inserted in order); re-running an init replaces it. Each write is
one Icechunk commit, so readers never see half an init and a killed writer leaves the previous store.
Plain xarray reads it::

    import icechunk, xarray as xr
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage("demo/forecasts"))
    fc = xr.open_zarr(repo.readonly_session("main").store, consolidated=False)
"""

from __future__ import annotations

from pathlib import Path

import icechunk
import numpy as np
import xarray as xr
import zarr

from geowm.cube.store import cube_exists, cube_lock, has_commits, in_order, storage_for

FORMAT = "geowm-forecast/1"
PROVENANCE = ("geowm:run_id", "geowm:config_hash")
PER_INIT = {"geowm:cube_snapshot": "geowm:cube_snapshots",  # forecast attr -> store attr (init -> value)
            "geowm:climatology_blend": "geowm:climatology_blends", "geowm:precision": "geowm:precisions"}
# fixed units: inferred ones ("days since <first init>") cannot hold a later init at another time of day
TIME_ENCODING = {name: {"units": "seconds since 1970-01-01T00:00:00", "calendar": "proleptic_gregorian",
                        "dtype": "int64"} for name in ("init_time", "valid_time")}


class ForecastStoreError(ValueError):
    """A forecast store cannot be written or read as asked; the message names the store and the problem."""



def _chunks(ds: xr.Dataset, tile: int = 256, patch_tile: int = 32) -> dict:
    enc = {}
    for name, var in ds.data_vars.items():
        sizes = {"init_time": 1, "y": tile, "x": tile, "py": patch_tile, "px": patch_tile}
        enc[name] = {"chunks": tuple(min(sizes.get(d, n), n) for d, n in zip(var.dims, var.shape, strict=True))}
    return enc


def _crs(ds: xr.Dataset) -> str:
    return str(ds["spatial_ref"].attrs.get("crs_wkt", "")) if "spatial_ref" in ds.coords else ""


def _check_compatible(store: str, old: xr.Dataset, new: xr.Dataset) -> None:
    same_grid = (old.sizes["y"] == new.sizes["y"] and old.sizes["x"] == new.sizes["x"]
                 and np.allclose(old["y"].values, new["y"].values) and np.allclose(old["x"].values, new["x"].values)
                 and _crs(old) == _crs(new))
    if not same_grid:
        raise ForecastStoreError(
            f"{store}: this store holds forecasts on another grid ({old.sizes['y']} x {old.sizes['x']} px from "
            f"x={float(old['x'][0]):.1f}, y={float(old['y'][0]):.1f}); the new forecast is {new.sizes['y']} x "
            f"{new.sizes['x']} px from x={float(new['x'][0]):.1f}, y={float(new['y'][0]):.1f} (another cube grid, "
            "bbox or CRS); write it to another store")
    if not np.array_equal(old["lead_time"].values, new["lead_time"].values):
        raise ForecastStoreError(f"{store}: the store's lead times are {_days(old)} days, the new forecast's "
                                 f"{_days(new)}; use the same --leads or another store")
    if sorted(old.data_vars) != sorted(new.data_vars):
        raise ForecastStoreError(f"{store}: variables differ (store {sorted(old.data_vars)}, "
                                 f"new {sorted(new.data_vars)})")
    for key in PROVENANCE:
        if old.attrs.get(key) != new.attrs.get(key):
            raise ForecastStoreError(f"{store}: made with model {old.attrs.get('geowm:run_id')} (config "
                                     f"{old.attrs.get('geowm:config_hash')}); the new forecast comes from "
                                     f"{new.attrs.get('geowm:run_id')}; write it to another store")


def _days(ds: xr.Dataset) -> list[float]:
    return [float(v) / 86400e9 for v in ds["lead_time"].values.astype("int64")]


def open_forecasts(store: str | Path, snapshot: str | None = None) -> xr.Dataset:
    """Open a forecast store lazily (dims ``init_time, lead_time, quantile, y, x`` and ``py, px, latent``)."""
    if not cube_exists(store):
        raise ForecastStoreError(f"{store}: no forecast store here")
    repo = icechunk.Repository.open(storage_for(store))
    if not has_commits(repo):
        raise ForecastStoreError(f"{store}: empty forecast store (its first write did not complete)")
    session = repo.readonly_session(snapshot_id=snapshot) if snapshot else repo.readonly_session("main")
    ds = xr.open_zarr(session.store, consolidated=False)
    if ds.attrs.get("geowm:format") != FORMAT:
        raise ForecastStoreError(f"{store}: not a geowm forecast store (format {ds.attrs.get('geowm:format')!r})")
    ds = in_order(ds, ("ndvi", "embedding", "latent_spread", "n_context"))  # then the bands, by name
    ds.attrs["geowm:store_snapshot"] = session.snapshot_id
    return ds


def write_forecasts(fc: xr.Dataset, store: str | Path) -> str:
    """Add one init's forecast (from :func:`geowm.forecast.forecast`) to ``store``; returns the commit id.

    New inits are appended or inserted in time order; an init already in the store is replaced. Each
    call is one atomic commit. Raises :class:`ForecastStoreError` (nothing written) when the store
    holds another grid, other lead times or another model's forecasts.
    """
    if fc.sizes.get("init_time") != 1:
        raise ForecastStoreError(f"write one init at a time (got {fc.sizes.get('init_time')})")
    if fc.attrs.get("geowm:format") != FORMAT:
        raise ForecastStoreError("not a geowm forecast dataset (made by geowm.forecast.forecast)")
    init = fc["init_time"].values[0]
    key = str(np.datetime64(init, "s"))
    per_init = {many: {key: str(fc.attrs.get(one, ""))} for one, many in PER_INIT.items()}
    fc = fc.copy()
    fc.attrs = {k: v for k, v in fc.attrs.items() if k not in PER_INIT}
    with cube_lock(store):
        if not cube_exists(store) or not has_commits(icechunk.Repository.open(storage_for(store))):
            repo = icechunk.Repository.open_or_create(storage_for(store))  # new, or left empty by a killed write
            session = repo.writable_session("main")
            fc.attrs.update(per_init)
            fc.to_zarr(session.store, mode="w", consolidated=False, encoding={**_chunks(fc), **TIME_ENCODING})
            return session.commit(f"forecast init {key}")
        old = open_forecasts(store)
        _check_compatible(str(store), old, fc)
        inits = old["init_time"].values
        repo = icechunk.Repository.open(storage_for(store))
        session = repo.writable_session("main")
        static = [v for v in fc.variables if "init_time" not in fc[v].dims]
        if init in inits:  # replace in place
            i = int(np.flatnonzero(inits == init)[0])
            fc.drop_vars(static).to_zarr(session.store, region={"init_time": slice(i, i + 1)}, consolidated=False)
            msg = f"forecast init {key} (replaced)"
        elif init > inits.max():
            fc.to_zarr(session.store, append_dim="init_time", consolidated=False)
            msg = f"forecast init {key}"
        else:  # insert in order: grow by one, then rewrite the tail from the insertion point
            i = int(np.searchsorted(inits, init))
            tail = xr.concat([old.isel(init_time=slice(i, None)).drop_vars(static, errors="ignore").load(),
                              fc.drop_vars(static)], dim="init_time").sortby("init_time")
            fc.to_zarr(session.store, append_dim="init_time", consolidated=False)
            tail.to_zarr(session.store, region={"init_time": slice(i, len(inits) + 1)}, consolidated=False)
            group = zarr.open_group(session.store, mode="r+")
            times = group["init_time"]  # region writes leave index coordinates alone: write them here
            enc, _, _ = xr.coding.times.encode_cf_datetime(tail["init_time"].values, times.attrs["units"],
                                                           times.attrs.get("calendar", "proleptic_gregorian"),
                                                           dtype=times.dtype)
            times[i:] = enc
            msg = f"forecast init {key} (inserted)"
        group = zarr.open_group(session.store, mode="r+")
        group.attrs.update({**fc.attrs, **{many: {**old.attrs.get(many, {}), **v} for many, v in per_init.items()}})
        return session.commit(msg)
