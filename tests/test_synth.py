"""Tests of the synthetic Earth generator (geowm.synth): files, metadata, statistics, ground truth."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.features
from shapely.geometry import shape

from geowm.synth import generate

CLEAR = (4, 5, 6, 7)  # SCL 11 (snow) is masked by default
CLOUD = (8, 9, 10)
SURFACE = (4, 5, 6)  # clear and not snow / unclassified


def _scene_files(region: Path) -> list[Path]:
    return sorted(p for p in (region / "scenes").glob("S2SYN_*.tif") if not p.name.endswith("_SCL.tif"))


def _when(path: Path) -> datetime:
    return datetime.strptime(path.stem[len("S2SYN_"):len("S2SYN_") + 15], "%Y%m%dT%H%M%S")


@pytest.fixture(scope="module")
def stack(synth_region: Path) -> dict:
    """All acquisitions of the session region in memory: dates, NDVI (t, y, x), SCL (t, y, x), blue."""
    files = _scene_files(synth_region)
    ndvi, scl, blue = [], [], []
    for f in files:
        with rasterio.open(f) as src:
            a = src.read().astype(np.float32) * 1e-4
        ndvi.append((a[3] - a[2]) / (a[3] + a[2]))
        blue.append(a[0])
        with rasterio.open(f.with_name(f.stem + "_SCL.tif")) as src:
            scl.append(src.read(1))
    with rasterio.open(synth_region / "landcover.tif") as src:
        lc = src.read(1)
        transform = src.transform
    days = np.array([np.datetime64(_when(f).date()) for f in files])
    return {"files": files, "days": days, "ndvi": np.stack(ndvi), "scl": np.stack(scl), "blue": np.stack(blue),
            "lc": lc, "transform": transform}


@pytest.fixture(scope="module")
def events(synth_region: Path) -> dict:
    return json.loads((synth_region / "events.geojson").read_text())


def _mask(feature: dict, st: dict) -> np.ndarray:
    """Pixel mask of an event, rasterised from its native bbox-checked polygon (EPSG:4326 -> UTM)."""
    from pyproj import Transformer
    from shapely import transform as stransform

    tr = Transformer.from_crs("EPSG:4326", "EPSG:32633", always_xy=True)
    geom = stransform(shape(feature["geometry"]), lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    return rasterio.features.geometry_mask([geom], st["lc"].shape, st["transform"], invert=True)


def _series(st: dict, mask: np.ndarray, min_clear: float = 0.7, window: tuple | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Dates and mean NDVI inside ``mask`` on acquisitions (optionally within ``window`` = (first, last)
    dates) where >= ``min_clear`` of the mask is clear surface."""
    days, vals = [], []
    sel = np.arange(st["days"].size)
    if window is not None:
        sel = sel[(st["days"] >= window[0]) & (st["days"] <= window[1])]
    for t in sel:
        ok = mask & np.isin(st["scl"][t], SURFACE)
        if ok.sum() >= max(min_clear * mask.sum(), 1):
            days.append(st["days"][t])
            vals.append(float(st["ndvi"][t][ok].mean()))
    return np.array(days, dtype="datetime64[D]"), np.array(vals)


# --------------------------------------------------------------------------------------------- files


def test_files_and_cog_metadata(synth_region: Path) -> None:
    for name in ("stac/catalog.json", "landcover.tif", "weather.zarr", "events.geojson", "synth.json"):
        assert (synth_region / name).exists(), name
    files = _scene_files(synth_region)
    assert len(files) > 50
    with rasterio.open(files[0]) as src:
        assert src.count == 4 and src.dtypes == ("uint16",) * 4
        assert src.descriptions == ("B02", "B03", "B04", "B08")
        assert src.crs.to_epsg() == 32633 and src.res == (10.0, 10.0) and src.nodata == 0
        assert src.width == src.height == 256
        assert src.transform.c % 10 == 0 and src.transform.f % 10 == 0
        assert src.scales == (0.0001,) * 4 and src.offsets == (0.0,) * 4
        assert src.block_shapes[0] == (256, 256)
        assert src.compression is not None
        tags = src.tags()
        when = _when(files[0])
        assert tags["TIFFTAG_DATETIME"] == when.strftime("%Y:%m:%d %H:%M:%S")
        assert tags["ACQUISITION_DATETIME"] == when.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert src.read().min() >= 1
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    with rasterio.open(files[0].with_name(files[0].stem + "_SCL.tif")) as src:
        assert src.count == 1 and src.dtypes == ("uint8",) and src.descriptions == ("SCL",)
        assert src.nodata == 0 and src.crs.to_epsg() == 32633
        assert src.tags()["TIFFTAG_DATETIME"] == _when(files[0]).strftime("%Y:%m:%d %H:%M:%S")
        assert set(np.unique(src.read(1))) <= {0, 3, 4, 5, 6, 7, 8, 9, 10, 11}
    meta = json.loads((synth_region / "synth.json").read_text())
    assert meta["parameters"]["seed"] == 3 and meta["crs"] == "EPSG:32633"
    assert len(meta["acquisitions"]) == len(files)


def test_landcover(stack: dict, synth_region: Path) -> None:
    with rasterio.open(synth_region / "landcover.tif") as src:
        classes = json.loads(src.tags()["CLASSES"])
        assert src.dtypes == ("uint8",)
    assert classes["1"] == "forest" and classes["6"] == "water" and len(classes) == 7
    lc = stack["lc"]
    share = np.bincount(lc.ravel(), minlength=8)[1:] / lc.size
    assert share.min() > 0.003 and share.max() < 0.6, share
    # Coherent patches: the right neighbour mostly shares the class.
    assert (lc[:, 1:] == lc[:, :-1]).mean() > 0.85


def test_stac_catalog(synth_region: Path) -> None:
    import pystac

    cat = pystac.Catalog.from_file(str(synth_region / "stac" / "catalog.json"))
    coll = cat.get_child("s2syn")
    assert coll is not None
    items = list(coll.get_items())
    files = _scene_files(synth_region)
    assert len(items) == len(files)
    assert coll.extent.temporal.intervals[0][0] is not None
    for item in items[:10]:
        refl = Path(item.assets["reflectance"].get_absolute_href())
        assert refl.exists() and refl.parent.name == "scenes"
        assert Path(item.assets["SCL"].get_absolute_href()).exists()
        assert not item.assets["reflectance"].href.startswith("/")
        with rasterio.open(refl) as src:
            tag = src.tags()["ACQUISITION_DATETIME"]
        assert item.datetime.strftime("%Y-%m-%dT%H:%M:%SZ") == tag
        assert 0 <= item.properties["eo:cloud_cover"] <= 100
        assert item.properties.get("proj:code") == "EPSG:32633" or item.properties.get("proj:epsg") == 32633
        assert item.properties["proj:shape"] == [256, 256]
        lon0, lat0, lon1, lat1 = item.bbox
        assert 14 < lon0 < lon1 < 16 and 47 < lat0 < lat1 < 50
        d = item.assets["reflectance"].to_dict()
        assert [b["name"] for b in d["eo:bands"]] == ["B02", "B03", "B04", "B08"]
        assert [b["common_name"] for b in d["eo:bands"]] == ["blue", "green", "red", "nir"]
        assert d["raster:bands"][0]["scale"] == 0.0001 and d["raster:bands"][0]["nodata"] == 0
        assert "cloud-mask" in item.assets["SCL"].roles


# --------------------------------------------------------------------------------------- statistics


def test_revisit(stack: dict) -> None:
    files = stack["files"]
    times = [_when(f) for f in files]
    gaps = np.diff(stack["days"]).astype(int)
    assert (gaps % 5 == 0).all() and np.median(gaps) == 5 and (gaps > 5).any()
    assert 0.03 < (gaps > 5).sum() / gaps.size < 0.2
    minutes = np.array([t.hour * 60 + t.minute for t in times])
    assert (np.abs(minutes - 630) <= 6).all() and minutes.std() > 0.5


def test_cloud_statistics(stack: dict) -> None:
    scl = stack["scl"]
    cloud = np.isin(scl, CLOUD)
    frac = cloud.mean(axis=(1, 2))
    full = frac > 0.95
    partly = (frac >= 0.05) & (frac <= 0.95)
    assert 0.25 <= full.mean() <= 0.42, full.mean()
    assert partly.mean() >= 0.2, partly.mean()
    assert (frac < 0.05).mean() >= 0.1
    # Spatial coherence: a partly cloudy scene's cloud pixels have cloudy right neighbours far more
    # often than the cloud fraction.
    for t in np.nonzero((frac > 0.1) & (frac < 0.6))[0][:8]:
        c = cloud[t]
        p_neighbour = (c[:, :-1] & c[:, 1:]).sum() / c[:, :-1].sum()
        assert p_neighbour > frac[t] + 0.3, (p_neighbour, frac[t])
    # Persistence: consecutive acquisitions are more alike than random pairs.
    assert np.corrcoef(frac[:-1], frac[1:])[0, 1] > 0.05
    # Shadows, cirrus and some unclassified edge pixels exist.
    for code in (3, 10, 7):
        assert (scl == code).any(), code


def test_cloud_mask_agrees_with_pixels(stack: dict) -> None:
    scl, blue = stack["scl"], stack["blue"]
    assert blue[scl == 9].mean() > 0.25
    assert blue[np.isin(scl, (4, 5))].mean() < 0.12
    nd = stack["ndvi"]
    assert abs(nd[scl == 9].mean()) < 0.1


def test_class_ndvi_amplitude(stack: dict) -> None:
    lc, scl, nd = stack["lc"], stack["scl"], stack["ndvi"]
    amp = {}
    for code in range(1, 8):
        means = []
        for t in range(scl.shape[0]):
            ok = (lc == code) & np.isin(scl[t], SURFACE)
            if ok.sum() > 0.3 * (lc == code).sum():
                means.append(float(nd[t][ok].mean()))
        m = np.array(means)
        assert m.size >= 8, code
        amp[code] = np.percentile(m, 95) - np.percentile(m, 5)
        if code == 6:
            assert m.max() < 0.0
    assert amp[2] > 0.4 and amp[3] > 0.4, amp
    assert 0.1 < amp[1] < 0.5, amp
    assert amp[4] > 0.1, amp
    assert amp[5] < 0.15 and amp[6] < 0.15 and amp[7] < 0.15, amp


# --------------------------------------------------------------------------------------- ground truth


def test_events_geojson(events: dict, stack: dict) -> None:
    assert events["type"] == "FeatureCollection" and events["geowm:crs"] == "EPSG:32633"
    feats = events["features"]
    types = {f["properties"]["type"] for f in feats}
    assert types == {"clearcut", "fire", "flood", "drought", "crop_failure", "harvest", "mowing"}
    ids = [f["properties"]["id"] for f in feats]
    assert len(set(ids)) == len(ids)
    img_ha = 256 * 256 * 0.01
    for f in feats:
        p = f["properties"]
        assert p["anomaly"] == (p["type"] in ("clearcut", "fire", "flood", "drought", "crop_failure"))
        assert p["start"] <= p["end"] and p["start"] >= "2021-01-01"
        g = shape(f["geometry"])
        assert g.is_valid and f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        assert 14 < g.centroid.x < 16 and 47 < g.centroid.y < 50
        assert 0 < p["area_ha"] < 0.6 * img_ha
        x0, y0, x1, y1 = p["bbox_native"]
        assert 500000 <= x0 < x1 <= 502560 and 5397440 <= y0 < y1 <= 5400000
        assert p["land_cover"] in ("forest", "crop_winter", "crop_summer", "grassland", "urban", "water", "bare")
    for f in feats[:30]:  # polygon area matches area_ha (within pixel-edge simplification)
        m = _mask(f, stack)
        assert abs(m.sum() * 0.01 - f["properties"]["area_ha"]) < 0.25 * f["properties"]["area_ha"] + 0.2


def _by_type(events: dict, kind: str) -> list[dict]:
    return [f for f in events["features"] if f["properties"]["type"] == kind]


@pytest.mark.parametrize("kind", ["clearcut", "fire"])
def test_abrupt_disturbance_visible(events: dict, stack: dict, kind: str) -> None:
    for f in _by_type(events, kind):
        start = np.datetime64(f["properties"]["start"])
        days, vals = _series(stack, _mask(f, stack), min_clear=0.5)
        before = vals[(days < start) & (days >= start - 150)]
        after = vals[(days > start) & (days <= start + 150)]
        assert before.size and after.size, f["properties"]
        assert before.mean() - after.mean() > 0.25, (f["properties"], before, after)


def test_flood_visible(events: dict, stack: dict) -> None:
    for f in _by_type(events, "flood"):
        p = f["properties"]
        days, vals = _series(stack, _mask(f, stack), min_clear=0.5)
        inside = vals[(days >= np.datetime64(p["start"])) & (days <= np.datetime64(p["end"]))]
        assert inside.size and inside.min() < 0.0, (p, inside)
        later = vals[days > np.datetime64(p["end"]) + 60]
        if later.size:
            assert later.mean() > 0.1


def test_crop_failure_visible(events: dict, stack: dict) -> None:
    """A failed field is as green as the fields of its crop before the failure and far below them once it has
    collapsed, until its harvest."""
    lc, scl, nd = stack["lc"], stack["scl"], stack["ndvi"]
    failures = _by_type(events, "crop_failure")
    assert failures
    for f in failures:
        p = f["properties"]
        code = {"crop_winter": 2, "crop_summer": 3}[p["land_cover"]]
        s, e = np.datetime64(p["start"]), np.datetime64(p["end"])
        inside = _mask(f, stack)
        assert (lc[inside] == code).mean() > 0.9
        gaps = {"before": [], "after": []}
        for t in range(stack["days"].size):
            d = stack["days"][t]
            phase = "before" if s - 60 <= d < s else "after" if s + 15 <= d <= e - 5 else None
            clear = np.isin(scl[t], SURFACE)
            a, b = inside & clear, ~inside & clear & (lc == code)
            if phase and a.sum() > 0.6 * inside.sum() and b.sum() > 100:
                gaps[phase].append(nd[t][a].mean() - nd[t][b].mean())
        assert gaps["after"] and np.mean(gaps["after"]) < -0.2, (p, gaps)
        assert not gaps["before"] or abs(np.mean(gaps["before"])) < 0.1, (p, gaps)


def test_crop_failures_leave_the_rest_of_the_record_as_it_was(tmp_path, monkeypatch) -> None:
    """Crop failures come from their own random stream: the same region without them has the same other events
    and the same pixels outside the failed fields."""
    import geowm.synth.generator as generator
    from geowm.synth import generate

    args = {"size": 256, "start": "2021-01-01", "end": "2021-12-31", "seed": 3}
    generate(tmp_path / "with", **args)
    monkeypatch.setattr(generator, "plan_crop_failures", lambda *a, **k: [])
    generate(tmp_path / "without", **args)
    ev = {k: json.loads((tmp_path / k / "events.geojson").read_text())["features"] for k in ("with", "without")}
    key = lambda f: (f["properties"]["type"], f["properties"]["start"], f["properties"]["end"],  # noqa: E731
                     f["properties"]["area_ha"])
    failed = [f for f in ev["with"] if f["properties"]["type"] == "crop_failure"]
    assert failed and sorted(map(key, ev["without"])) == sorted(key(f) for f in ev["with"] if f not in failed)
    with rasterio.open(tmp_path / "with" / "landcover.tif") as src:
        st = {"lc": src.read(1), "transform": src.transform}
    inside = np.any([_mask(f, st) for f in failed], axis=0)
    changed = 0
    for a in sorted((tmp_path / "with" / "scenes").glob("S2SYN_*T??????.tif")):
        with rasterio.open(a) as x, rasterio.open(tmp_path / "without" / "scenes" / a.name) as y:
            da, db = x.read(), y.read()
        assert np.array_equal(da[:, ~inside], db[:, ~inside]), a.name
        changed += int((da[:, inside] != db[:, inside]).any())
    assert changed >= 5


def test_drought_visible_and_in_weather(events: dict, stack: dict, synth_region: Path) -> None:
    import xarray as xr

    lc, scl, nd = stack["lc"], stack["scl"], stack["ndvi"]
    ds = xr.open_zarr(synth_region / "weather.zarr")
    for f in _by_type(events, "drought"):
        p = f["properties"]
        s, e = np.datetime64(p["start"]), np.datetime64(p["end"])
        inside = _mask(f, stack)
        diffs = []
        for t in np.nonzero((stack["days"] >= s + (e - s) // 2) & (stack["days"] <= e + 5))[0]:
            clear = np.isin(scl[t], SURFACE)
            for code in (2, 3, 4):
                a, b = inside & clear & (lc == code), ~inside & clear & (lc == code)
                if a.sum() > 100 and b.sum() > 100:
                    diffs.append(nd[t][a].mean() - nd[t][b].mean())
        assert len(diffs) >= 2 and np.mean(diffs) < -0.06, diffs
        # The dry spell is in the weather: no rain, warmer than the seasonal cycle.
        t = ds.temperature.mean(("y", "x")).to_numpy()
        doy = ds.time.dt.dayofyear.to_numpy()
        w = 2 * np.pi * doy / 365.25
        design = np.column_stack([np.ones_like(w), np.sin(w), np.cos(w)])
        resid = t - design @ np.linalg.lstsq(design, t, rcond=None)[0]
        spell = (ds.time >= s).to_numpy() & (ds.time <= e).to_numpy()
        assert float(ds.precipitation.mean(("y", "x")).to_numpy()[spell].mean()) < 0.2
        assert resid[spell].mean() > 0.5, resid[spell].mean()


@pytest.mark.parametrize("kind", ["harvest", "mowing"])
def test_normal_change_visible(events: dict, stack: dict, kind: str) -> None:
    drops = []
    for f in _by_type(events, kind):
        start = np.datetime64(f["properties"]["start"])
        days, vals = _series(stack, _mask(f, stack), min_clear=0.6, window=(start - 25, start + 12))
        before = vals[days < start]
        after = vals[(days >= start) & (days <= start + 12)]
        if before.size and after.size:
            drops.append(before[-1] - after[0])
    assert len(drops) >= 3, len(drops)
    assert np.median(drops) > 0.15, drops
    assert all(not f["properties"]["anomaly"] for f in _by_type(events, kind))


def test_weather_zarr(synth_region: Path) -> None:
    import rioxarray  # noqa: F401
    import xarray as xr

    ds = xr.open_zarr(synth_region / "weather.zarr", decode_coords="all")
    assert set(ds.data_vars) >= {"temperature", "precipitation"}
    assert ds.temperature.dims == ("time", "y", "x") and ds.sizes["y"] >= 4 and ds.sizes["x"] >= 4
    assert "spatial_ref" in ds.coords and ds.temperature.encoding.get("grid_mapping") == "spatial_ref"
    assert ds.rio.crs.to_epsg() == 32633
    assert str(ds.time.values[0])[:10] == "2021-01-01" and str(ds.time.values[-1])[:10] == "2021-12-31"
    t = ds.temperature.mean(("y", "x")).to_numpy()
    p = ds.precipitation.mean(("y", "x")).to_numpy()
    assert t[180:220].mean() - t[:40].mean() > 10  # seasonal cycle
    assert (p < 0.1).mean() > 0.3 and p.max() > 10 and (ds.precipitation >= 0).all()
    assert ds.temperature.std(("y", "x")).mean() < 2.0  # spatially smooth


def _three_years(seed: int = 11):
    from geowm.synth.landscape import make_landscape
    from geowm.synth.phenology import make_phenology
    from geowm.synth.weather import make_weather

    land = make_landscape(256, seed)
    weather = make_weather(256, 10.0, land.grid.x0, land.grid.y0, seed, 2021, 2023, [], regimes=True)
    return land, weather, make_phenology(land, weather, seed, rotation=True)


def test_crops_rotate_between_years() -> None:
    """Arable parcels alternate winter and summer crops (a few stay in monoculture), grassland is permanent,
    a winter crop is sown after the summer crop before it, and a field's cover runs on across the new year."""
    from geowm.synth.landscape import CROP_SUMMER, CROP_WINTER, GRASSLAND

    land, _, ph = _three_years()
    k = ph.klass
    assert k.shape == (3, land.n_parcels)
    assert np.array_equal(k[0], land.parcel_class)
    arable = (k[0] == CROP_WINTER) | (k[0] == CROP_SUMMER)
    assert arable.sum() > 50
    changed = (k[1] != k[0])[arable].mean(), (k[2] != k[1])[arable].mean()
    assert all(0.5 < c < 0.9 for c in changed), changed
    assert 0.05 < (k == k[0]).all(axis=0)[arable].mean() < 0.3  # monoculture
    assert np.isin(k[:, arable], (CROP_WINTER, CROP_SUMMER)).all()
    assert (k[:, k[0] == GRASSLAND] == GRASSLAND).all()
    for y in (0, 1):
        day = int(np.datetime64(f"{2022 + y}-01-01").astype(np.int64))
        to_winter = (k[y] == CROP_SUMMER) & (k[y + 1] == CROP_WINTER)
        to_summer = (k[y] == CROP_WINTER) & (k[y + 1] == CROP_SUMMER)
        assert to_winter.sum() > 5 and to_summer.sum() > 5
        # next year's winter crop is sown after this year's summer harvest; no sowing before a summer crop
        assert (ph.autumn_sow[y][to_winter] >= ph.harvest[y][to_winter] + 10).all()
        assert (ph.autumn_sow[y][k[y + 1] != CROP_WINTER] == -1).all()
        # in December, a field that becomes a winter crop is green, one that becomes a summer crop is bare
        dec = ph.parcel_cover(day - 20)
        assert np.median(dec[to_winter]) > 0.12 and np.median(dec[to_summer]) < 0.08
        jump = np.abs(ph.parcel_cover(day) - ph.parcel_cover(day - 1))[arable]
        assert np.percentile(jump, 99) < 0.1, np.percentile(jump, 99)


def test_without_rotation_every_field_keeps_its_crop(synth_region: Path) -> None:
    """The default: no rotation and no weather regimes (version 1's landscape and weather); croptype.tif is
    still written, one band per year, equal to landcover.tif."""
    from geowm.synth.landscape import CROP_WINTER, make_landscape
    from geowm.synth.phenology import make_phenology
    from geowm.synth.weather import make_weather

    land = make_landscape(128, 5)
    weather = make_weather(128, 10.0, land.grid.x0, land.grid.y0, 5, 2021, 2023, [])
    ph = make_phenology(land, weather, 5)
    assert (ph.klass == land.parcel_class[None]).all()
    wheat = land.parcel_class == CROP_WINTER
    assert (ph.autumn_sow[:, wheat] >= 0).all() and (ph.autumn_sow[:, ~wheat] == -1).all()
    regimes = make_weather(128, 10.0, land.grid.x0, land.grid.y0, 5, 2021, 2023, [], regimes=True)
    assert not np.allclose(regimes.t_mean, weather.t_mean)
    meta = json.loads((synth_region / "synth.json").read_text())
    assert meta["parameters"]["crop_rotation"] is False and meta["parameters"]["weather_regimes"] is False
    with rasterio.open(synth_region / "croptype.tif") as ct, rasterio.open(synth_region / "landcover.tif") as lc:
        assert ct.descriptions == ("2021",) and np.array_equal(ct.read(1), lc.read(1))


def test_crop_rotation_in_ground_truth(tmp_path: Path) -> None:
    """croptype.tif has each year's crops, landcover.tif is the last year's, and every harvest event names the
    crop harvested that year."""
    from geowm.synth.landscape import CLASSES

    generate(tmp_path / "r", size=128, start="2021-03-01", end="2022-11-30", seed=4, crop_rotation=True)
    with rasterio.open(tmp_path / "r" / "croptype.tif") as src:
        assert src.descriptions == ("2021", "2022")
        crops = src.read()
        assert json.loads(src.tags()["CLASSES"])["2"] == "crop_winter"
    with rasterio.open(tmp_path / "r" / "landcover.tif") as src:
        assert np.array_equal(src.read(1), crops[1])
    assert (crops[0] != crops[1]).mean() > 0.1
    fc = json.loads((tmp_path / "r" / "events.geojson").read_text())
    harvests = [f for f in _by_type(fc, "harvest")]
    assert len(harvests) > 10
    st = {"lc": crops[0], "transform": rasterio.open(tmp_path / "r" / "croptype.tif").transform}
    agree = []
    for f in harvests:
        band = int(f["properties"]["start"][:4]) - 2021
        m = _mask(f, st)
        codes = np.bincount(crops[band][m], minlength=8)
        agree.append(CLASSES[int(codes.argmax())] == f["properties"]["land_cover"])
    assert np.mean(agree) > 0.95, np.mean(agree)
    assert {f["properties"]["land_cover"] for f in harvests} == {"crop_winter", "crop_summer"}


def test_weather_has_month_scale_regimes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wet and dry months: the 30-day wet-day share varies more than day-to-day rain persistence alone makes it,
    and the temperature anomaly keeps a memory a month on."""
    from geowm.synth import weather as W

    def series(**patch):
        for k, v in patch.items():
            monkeypatch.setattr(W, k, v)
        w = W.make_weather(64, 10.0, 500000.0, 5400000.0, 9, 2000, 2019, [], regimes=True)
        wet = (w.p_mean > 0.5).astype(float)
        share = np.convolve(wet, np.ones(30) / 30, "valid")[::30]
        anom = w.t_mean - W._t_clim(W._doy(w.days))
        month = anom[: anom.size // 30 * 30].reshape(-1, 30).mean(axis=1)
        return share.std(), np.corrcoef(month[:-1], month[1:])[0, 1]

    sd, r = series()
    sd0, r0 = series(REGIME_WET=0.0, REGIME_T_SD=0.0)
    assert sd > 1.2 * sd0, (sd, sd0)
    assert r > r0 + 0.07, (r, r0)  # lag-one-month correlation of monthly mean temperature anomalies


# ------------------------------------------------------------------------------------ API behaviour


def _pixels(region: Path) -> list[np.ndarray]:
    out = []
    for f in sorted((region / "scenes").glob("*.tif")):
        with rasterio.open(f) as src:
            out.append(src.read())
    return out


def test_determinism_and_progress(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    kw = dict(size=96, start="2021-05-01", end="2021-06-30")
    s1 = generate(tmp_path / "a", seed=5, progress=lambda d, t: calls.append((d, t)), **kw)
    generate(tmp_path / "b", seed=5, **kw)
    generate(tmp_path / "c", seed=6, **kw)
    assert calls and calls[-1][0] == calls[-1][1] == s1["n_acquisitions"] == len(calls)
    assert s1["crs"] == "EPSG:32633" and "n_fully_cloudy" in s1
    a, b, c = _pixels(tmp_path / "a"), _pixels(tmp_path / "b"), _pixels(tmp_path / "c")
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c, strict=False))
    with rasterio.open(tmp_path / "a" / "landcover.tif") as la, rasterio.open(tmp_path / "c" / "landcover.tif") as lc:
        assert not np.array_equal(la.read(), lc.read())
    assert (tmp_path / "a" / "events.geojson").read_text() == (tmp_path / "b" / "events.geojson").read_text()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"size": 32}, "size"),
        ({"size": 30000}, "size"),
        ({"size": 100.5}, "size"),
        ({"start": "2021-03-01", "end": "2021-02-01"}, "end"),
        ({"start": "2021-03-01", "end": "2021-03-01"}, "end"),
        ({"start": "not-a-date"}, "start"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate(tmp_path / "out", **{"size": 64, "start": "2021-01-01", "end": "2021-01-20", **kwargs})


def test_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="out_dir"):
        generate(tmp_path, size=64, start="2021-01-01", end="2021-01-20")
