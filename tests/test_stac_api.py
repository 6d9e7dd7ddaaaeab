"""Ingest from a STAC API search and from STAC documents over HTTP: a real HTTP server on 127.0.0.1
(``tests/stac_api.py``) serves the search, the items and their COGs with range requests, as Earth Search does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import rasterio
from conftest import catalogued_item
from pyproj import Transformer
from stac_api import SIGNATURE, StacApi, earth_search_items
from typer.testing import CliRunner

from catalog.stac import validate_catalog
from geowm.cli import app
from geowm.cube import IngestOptions, cube_checksum, ingest, open_cube
from geowm.sources import SourceError, discover

runner = CliRunner()
N_ITEMS = 10
COLLECTION = "sentinel-2-l2a"


@pytest.fixture(scope="module")
def api_files(synth_region, tmp_path_factory):
    """(files folder, items) with hrefs to be filled in per server (``{base}``)."""
    files = tmp_path_factory.mktemp("stac_api") / "files"
    items = earth_search_items(synth_region, files, lambda rel: "{base}/files/" + rel, N_ITEMS, COLLECTION)
    return files, items


def _serve(api_files, **kw) -> StacApi:
    files, items = api_files
    api = StacApi(files, [], **kw)
    api.items = json.loads(json.dumps(items).replace("{base}", api.url))
    return api


def _bbox(synth_region) -> list[float]:
    """A box of degrees inside the synthetic region (its middle half)."""
    with rasterio.open(next((synth_region / "scenes").glob("*_SCL.tif"))) as r:
        left, bottom, right, top = r.bounds
        crs = r.crs
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    dx, dy = (right - left) / 4, (top - bottom) / 4
    w, s = to_ll.transform(left + dx, bottom + dy)
    e, n = to_ll.transform(right - dx, top - dy)
    return [round(w, 5), round(s, 5), round(e, 5), round(n, 5)]


def test_a_stac_api_search_is_ingested_like_the_files(api_files, synth_region, tmp_path):
    files, items = api_files
    bbox = _bbox(synth_region)
    times = sorted(it["properties"]["datetime"] for it in items)
    window = f"{times[2][:10]}/{times[7][:10]}"  # whole days: pystac-client widens them to the day's end
    cover = sorted(it["properties"]["eo:cloud_cover"] for it in items if times[2] <= it["properties"]["datetime"]
                   <= times[7])
    max_cloud = max(c for c in cover if c < max(cover))  # leaves out the cloudiest of the window
    kept = sorted((it["properties"]["datetime"][:19], it["id"]) for it in items
                  if window[:10] <= it["properties"]["datetime"][:10] <= window[11:]
                  and it["properties"]["eo:cloud_cover"] <= max_cloud)
    want = [t for t, _ in kept]
    assert 2 <= len(want) < 6  # the filters leave some items out
    cube, catalog = tmp_path / "cube", tmp_path / "catalog"
    with _serve(api_files) as api:
        res = runner.invoke(app, ["ingest", api.url, "--collection", COLLECTION, "--bbox", ",".join(map(str, bbox)),
                                  "--datetime", window, "--max-cloud", str(max_cloud), "--cube", str(cube),
                                  "--catalog", str(catalog), "--scheduler", "threads"])
        assert res.exit_code == 0, res.output
        assert api.searches()[0]["query"] == {"eo:cloud_cover": {"lte": max_cloud}}
        assert api.searches()[0]["bbox"] == bbox
        served = [path for method, path, _ in api.log if path.startswith("/files/")]
        # re-run: nothing new, the cube unchanged
        before = cube_checksum(cube)
        res = runner.invoke(app, ["ingest", api.url, "--collection", COLLECTION, "--bbox", ",".join(map(str, bbox)),
                                  "--datetime", window, "--max-cloud", str(max_cloud), "--cube", str(cube),
                                  "--no-catalog", "--scheduler", "threads"])
        assert res.exit_code == 0 and "nothing new" in res.output, res.output
        assert (cube_checksum(cube) if cube.exists() else None) == before
    assert not any(p.endswith(("TCI.tif", ".jp2", "quicklook.tif", "thumb.jpg")) for p in served)  # measurements
    ds = open_cube(cube)
    assert [str(t)[:19] for t in ds.time.values] == want
    assert sorted(ds.common_name.values.tolist()) == ["blue", "green", "nir", "red"]
    # the cube covers the bbox, not the scenes
    to_utm = Transformer.from_crs("EPSG:4326", ds.rio.crs, always_xy=True)
    x0, y0 = to_utm.transform(bbox[0], bbox[1])
    x1, y1 = to_utm.transform(bbox[2], bbox[3])
    assert ds.x.min() < x0 + 20 and ds.x.max() > x1 - 20 and ds.sizes["x"] < 256 * 0.6
    # the values are the files' own, masked by their SCL: the same as the synthetic region's cube on that grid
    ref = tmp_path / "ref"
    ingest(synth_region / "stac" / "catalog.json", ref, IngestOptions(scheduler="threads", bbox=tuple(bbox)))
    r = open_cube(ref).sel(time=ds.time.values)
    order = [list(r.common_name.values).index(c) for c in ds.common_name.values]
    got = ds.reflectance.values
    exp = r.reflectance.values[:, order]
    assert got.shape == exp.shape
    np.testing.assert_array_equal(ds.valid.values, r.valid.values)
    np.testing.assert_allclose(got, exp, rtol=0, atol=1e-6, equal_nan=True)
    assert np.isfinite(got).mean() > 0.3 and (~ds.valid.values).any()
    assert validate_catalog(catalog / "catalog.json") == []
    item = catalogued_item(tmp_path, kept[0][1])
    assert any(a["href"].startswith("http://127.0.0.1") for a in item["assets"].values())


def test_search_pages_are_followed_and_too_many_items_refused(api_files, tmp_path):
    with _serve(api_files, page_size=3) as api:
        scenes = discover(api.url, search=_search())
        assert len(scenes) == N_ITEMS  # 4 pages of 3
        assert len(api.searches()) == 4
        with pytest.raises(SourceError, match=f"more than 4 items match collections {COLLECTION}"):
            discover(api.url, search=_search(max_items=4))
        res = runner.invoke(app, ["ingest", api.url, "--collection", COLLECTION, "--max-items", "4",
                                  "--cube", str(tmp_path / "cube")])
    assert res.exit_code == 2 and "raise --max-items" in res.output
    assert not (tmp_path / "cube").exists()


def _search(**kw):
    from geowm.stacsource import StacSearch

    return StacSearch(collections=(COLLECTION,), **kw)


def test_an_api_without_the_query_extension_is_filtered_by_cloud_cover_here(api_files):
    files, items = api_files
    limit = sorted(it["properties"]["eo:cloud_cover"] for it in items)[N_ITEMS // 2]
    with _serve(api_files, query=False) as api:
        scenes = discover(api.url, search=_search(max_cloud=limit))
        assert "query" not in api.searches()[0] or api.searches()[0]["query"] is None
    assert {s.id for s in scenes} == {it["id"] for it in items if it["properties"]["eo:cloud_cover"] <= limit}


def test_the_bands_of_an_item_are_its_measurements(api_files):
    """visual (8-bit true colour named red, green, blue), overview and B04-jp2 (a JPEG 2000 copy of red) are not
    bands; SCL is the mask; the scale comes from raster:bands."""
    with _serve(api_files) as api:
        scene = discover(api.url, search=_search(datetime=api.items[0]["properties"]["datetime"]))[0]
    assert sorted(scene.bands) == ["blue", "green", "nir", "red"]
    assert all(ref.path.endswith(f"/{name}.tif") and ref.index == 1 for name, ref in scene.bands.items())
    assert scene.common_names == {n: n for n in ('blue', 'green', 'red', 'nir')}
    assert scene.mask.path.endswith("/SCL.tif") and scene.mask_clear
    assert {ref.scale for ref in scene.bands.values()} == {0.0001}


def test_a_saved_search_and_a_catalog_url_are_sources(api_files, tmp_path):
    """An item collection (GeoJSON FeatureCollection: what `stac-client search --save` writes) as a local file, and
    as a URL; a relative href resolved against the document."""
    files, _ = api_files
    with _serve(api_files) as api:
        saved = tmp_path / "search.json"
        saved.write_text(json.dumps({"type": "FeatureCollection", "features": api.items[:3]}))
        assert [s.id for s in discover(saved)] == [it["id"] for it in api.items[:3]]
        rel = json.loads(json.dumps(api.items[3]).replace(f"{api.url}/files/", ""))
        (files / "one.json").write_text(json.dumps({"type": "FeatureCollection", "features": [rel]}))
        scene = discover(api.file_url("one.json"))[0]
        assert scene.bands["red"].path == api.file_url(f"{rel['id']}/red.tif")
        res = runner.invoke(app, ["ingest", api.file_url("one.json"), "--cube", str(tmp_path / "c"), "--no-catalog",
                                  "--scheduler", "threads"])
        assert res.exit_code == 0, res.output
    assert open_cube(tmp_path / "c").sizes["time"] == 1


def test_a_busy_object_store_is_retried(api_files, tmp_path):
    """503 on the first request of a band file: GDAL retries (GDAL_HTTP_MAX_RETRY), the ingest succeeds."""
    with _serve(api_files) as api:
        first = api.items[0]
        api.fail_once = {f"/files/{first['id']}/nir.tif"}
        res = runner.invoke(app, ["ingest", api.url, "--collection", COLLECTION, "--datetime",
                                  first["properties"]["datetime"], "--cube", str(tmp_path / "c"), "--no-catalog",
                                  "--scheduler", "threads"])
        assert res.exit_code == 0, res.output
        assert not api.fail_once  # the 503 was served
    assert open_cube(tmp_path / "c").sizes["time"] == 1


@pytest.mark.parametrize("case", ["unreachable", "not_an_api", "no_items", "bad_datetime", "missing_asset",
                                  "bad_bbox", "local_path"])
def test_a_search_that_cannot_be_ingested_is_refused_naming_it(api_files, synth_cube, tmp_path, case):
    cube = tmp_path / "cube"  # a cube that holds other scenes (the missing asset's: none, it would skip them)
    if case != "missing_asset":
        shutil.copytree(synth_cube, cube)
    before = cube_checksum(cube) if cube.exists() else None
    with _serve(api_files, search=case != "not_an_api") as api:
        url = api.url
        args = ["--collection", COLLECTION]
        match = url
        if case == "unreachable":
            url = "http://127.0.0.1:9"  # the discard port: nothing listens
            match = "cannot open this STAC API"
        elif case == "not_an_api":
            match = "not a STAC API with item search"
        elif case == "no_items":
            args += ["--datetime", "1999-01-01/1999-12-31"]
            match = "no item matches"
        elif case == "bad_datetime":
            args += ["--datetime", "last tuesday"]
            match = "last tuesday"
        elif case == "missing_asset":
            first = api.items[0]
            first["assets"]["nir"]["href"] = api.file_url("gone/nir.tif")
            args += ["--datetime", first["properties"]["datetime"]]
            match = "gone/nir.tif"
        elif case == "bad_bbox":
            args += ["--bbox", "15.1,48.7,15.0,48.8"]
            match = "west < east"
        elif case == "local_path":
            url = str(tmp_path)
            match = "needs the API's URL"
        res = runner.invoke(app, ["ingest", url, *args, "--cube", str(cube), "--no-catalog",
                                  "--scheduler", "threads"])
    assert res.exit_code == 2, res.output
    assert match in " ".join(res.output.split()), res.output
    assert (cube_checksum(cube) if cube.exists() else None) == before


def test_the_scheduled_ingest_searches_from_the_cube_s_last_date(prefect_api, api_files, synth_region, tmp_path):
    """The ingest flow with a search (as `geowm serve --collection` deploys it): the first tick takes the items
    from ``start``, a later tick only those from the cube's last date on, and a tick with nothing new changes
    nothing."""
    from flows.pipeline import ingest_flow

    cube = tmp_path / "cube"
    bbox = _bbox(synth_region)
    with _serve(api_files) as api:
        items, api.items = api.items, api.items[:6]
        search = {"collections": [COLLECTION], "bbox": bbox, "start": items[0]["properties"]["datetime"][:10]}
        first = ingest_flow(api.url, str(cube), catalog=str(tmp_path / "cat"), scheduler="threads", search=search)
        assert len(first["added_times"]) == 6
        api.items = items  # four more items published since
        second = ingest_flow(api.url, str(cube), catalog=str(tmp_path / "cat"), scheduler="threads", search=search)
        third = ingest_flow(api.url, str(cube), catalog=str(tmp_path / "cat"), scheduler="threads", search=search)
        windows = [b["datetime"] for b in api.searches() if "token" not in b]  # the first page of each search
        # before anything is published: a tick with nothing new; an API that cannot be reached: an error
        from flows.tasks import discover_scenes
        from geowm.sources import SourceError

        later = {**search, "start": "2030-01-01"}
        assert discover_scenes(api.url, later, str(tmp_path / "empty")) == []
        with pytest.raises(SourceError, match="cannot open this STAC API"):
            discover_scenes("http://127.0.0.1:9", later, str(tmp_path / "empty"))
    assert [t[:19] for t in second["added_times"]] == [it["properties"]["datetime"][:19] for it in items[6:]]
    assert third["added_times"] == [] and third["skipped"] == 1  # the item of the cube's last date, skipped
    assert windows[0].startswith(items[0]["properties"]["datetime"][:10])
    assert windows[1].startswith(items[5]["properties"]["datetime"][:10]) and windows[1].endswith("..")
    assert len(windows) == 3
    assert open_cube(cube).sizes["time"] == N_ITEMS
    assert open_cube(cube).sizes["x"] < 256 * 0.6  # the bbox, not the scenes


def test_planetary_computer_assets_are_signed(api_files, tmp_path, monkeypatch):
    """Assets in Azure Blob Storage get a SAS token from the token service (one per account and container), as
    the Planetary Computer's do; unsigned, the store refuses them (403) and so does the ingest. GDAL reaches the
    blob host through the test server as its HTTP proxy."""
    with _serve(api_files) as api:
        blob = "http://pcstore.blob.core.windows.net/sentinel-2"
        api.items = json.loads(json.dumps(api.items[:2]).replace(f"{api.url}/files", blob))
        monkeypatch.setenv("PC_SDK_SAS_URL", f"{api.url}/api/sas/v1/token")
        monkeypatch.setenv("GDAL_HTTP_PROXY", api.url.removeprefix("http://"))
        args = ["ingest", api.url, "--collection", COLLECTION, "--no-catalog", "--scheduler", "threads"]
        res = runner.invoke(app, [*args, "--sign", "none", "--cube", str(tmp_path / "unsigned")])
        assert res.exit_code == 2 and "403" in res.output and "pcstore.blob.core.windows.net" in res.output
        assert not (tmp_path / "unsigned").exists()
        api.log.clear()
        signed = [a for a in args if a != "--no-catalog"]  # the catalog too: made from what ingest recorded
        res = runner.invoke(app, [*signed, "--sign", "planetary-computer", "--cube", str(tmp_path / "signed"),
                                  "--catalog", str(tmp_path / "catalog")])
        assert res.exit_code == 0, res.output
        tokens = [p for _, p, _ in api.log if p.startswith("/api/sas/v1/token/")]
        blobs = [p for _, p, _ in api.log if "blob.core.windows.net" in p]
        api.log.clear()
        monkeypatch.setenv("PC_SDK_SAS_URL", f"{api.url}/nothing-here")
        res = runner.invoke(app, [*args, "--sign", "planetary-computer", "--cube", str(tmp_path / "c3")])
    from geowm.stacsource import is_planetary_computer  # signed by default: the Planetary Computer's own API

    assert is_planetary_computer("https://planetarycomputer.microsoft.com/api/stac/v1")
    assert not is_planetary_computer("https://earth-search.aws.element84.com/v1")
    assert tokens == ["/api/sas/v1/token/pcstore/sentinel-2"]  # one token for the account and container
    assert blobs and all(f"sig={SIGNATURE}" in p for p in blobs)
    assert open_cube(tmp_path / "signed").sizes["time"] == 2
    # the records keep the hrefs without their tokens (which expire, and grant access): the cube's sources and
    # the catalog; the catalog's footprints come from ingest, not from opening the (unsigned) hrefs again
    from geowm.cube.store import read_state

    recorded = [f for src in read_state(tmp_path / "signed").sources for f in src["files"]]
    assert recorded and all(f.startswith(blob) and "?" not in f for f in recorded)
    assert validate_catalog(tmp_path / "catalog" / "catalog.json") == []
    hrefs = [a["href"] for p in (tmp_path / "catalog").rglob("*.json") for a in json.loads(p.read_text()).get(
        "assets", {}).values()]
    assert any(h.startswith(blob) for h in hrefs) and not any("sig=" in h for h in hrefs)
    assert res.exit_code == 2 and "no SAS token for pcstore/sentinel-2" in " ".join(res.output.split())


def test_records_keep_hrefs_without_their_signatures():
    from geowm.scene import public_href

    assert public_href("https://a.blob.core.windows.net/c/x.tif?st=1&se=2&sp=rl&sig=abc") == \
        "https://a.blob.core.windows.net/c/x.tif"
    assert public_href("https://b.s3.amazonaws.com/x.tif?X-Amz-Expires=3600&X-Amz-Signature=f00") == \
        "https://b.s3.amazonaws.com/x.tif"
    assert public_href("https://example.com/x.tif?version=2") == "https://example.com/x.tif?version=2"
    assert public_href("/data/x.tif") == "/data/x.tif"


def test_an_area_of_interest_file_in_any_crs(api_files, synth_region, tmp_path):
    """``--aoi field.gpkg`` (a polygon in UTM): the search asks for the items intersecting it (in WGS 84) and the new
    cube covers its bounds; a file that is not a vector file, or with --bbox too, is refused."""
    import geopandas as gpd
    from shapely.geometry import box

    with rasterio.open(next((synth_region / "scenes").glob("*_SCL.tif"))) as r:
        left, bottom, right, top = r.bounds
        crs = r.crs
    aoi = box(left + 500, bottom + 700, left + 1500, bottom + 1300)  # 1000 x 600 m
    gpd.GeoDataFrame(geometry=[aoi], crs=crs).to_file(tmp_path / "field.gpkg")
    with _serve(api_files) as api:
        first = api.items[0]["properties"]["datetime"]
        args = ["ingest", api.url, "--collection", COLLECTION, "--datetime", first, "--no-catalog",
                "--scheduler", "threads"]
        res = runner.invoke(app, [*args, "--aoi", str(tmp_path / "field.gpkg"), "--cube", str(tmp_path / "c")])
        assert res.exit_code == 0, res.output
        body = api.searches()[0]
        (tmp_path / "notes.txt").write_text("not a vector file")
        bad = runner.invoke(app, [*args, "--aoi", str(tmp_path / "notes.txt"), "--cube", str(tmp_path / "d")])
        both = runner.invoke(app, [*args, "--aoi", str(tmp_path / "field.gpkg"), "--bbox", "15,48.7,15.1,48.8",
                                   "--cube", str(tmp_path / "d")])
    assert body["intersects"]["type"] == "Polygon" and "bbox" not in body
    ds = open_cube(tmp_path / "c")
    assert ds.sizes["time"] == 1
    x0, x1 = float(ds.x.min()) - 5, float(ds.x.max()) + 5
    y0, y1 = float(ds.y.min()) - 5, float(ds.y.max()) + 5
    assert x0 <= aoi.bounds[0] and x1 >= aoi.bounds[2] and y0 <= aoi.bounds[1] and y1 >= aoi.bounds[3]
    assert (x1 - x0) < 1100 and (y1 - y0) < 720  # its bounds (a little more: the box in degrees, back in UTM)
    assert bad.exit_code == 2 and "notes.txt: --aoi: not a readable vector file" in " ".join(bad.output.split())
    assert both.exit_code == 2 and "give one" in both.output and not (tmp_path / "d").exists()
