"""The STAC catalog that ingest keeps current: sources and cubes collections, validated with stac-validator."""

from __future__ import annotations

import json

import pystac
from test_ingest import OPTS, days, make_scene

from catalog.stac import update_catalog, validate_catalog
from geowm.cube import IngestOptions, ingest


def test_catalog_tracks_ingests_and_validates(tmp_path):
    src = tmp_path / "src"
    for i, d in enumerate(days(3)):
        make_scene(src, d, i)
    ingest(src, tmp_path / "cube", IngestOptions(**OPTS))
    root = update_catalog(tmp_path / "catalog", tmp_path / "cube")
    assert validate_catalog(root) == []
    cat = pystac.Catalog.from_file(str(root))
    sources, cubes = cat.get_child("sources"), cat.get_child("cubes")
    assert len(list(sources.get_items())) == 3
    (item,) = cubes.get_items()
    dims = item.properties["cube:dimensions"]
    assert dims["band"]["values"] == ["B02", "B03", "B04", "B08"]
    assert dims["x"]["step"] == 10 and dims["x"]["reference_system"] == 32633
    assert dims["time"]["extent"][0].startswith("2021-03-01T10:30:21")
    assert set(item.properties["cube:variables"]) == {"reflectance", "valid"}
    assert "https://stac-extensions.github.io/datacube/" in " ".join(item.stac_extensions)
    # a later ingest adds its scenes and moves the cube item forward
    src2 = tmp_path / "src2"
    for i, d in enumerate(days(2, start=days(3)[-1])):
        if i:
            make_scene(src2, d, 10 + i)
    ingest(src2, tmp_path / "cube", IngestOptions(**OPTS))
    update_catalog(tmp_path / "catalog", tmp_path / "cube")
    cat = pystac.Catalog.from_file(str(root))
    assert len(list(cat.get_child("sources").get_items())) == 4
    (item,) = cat.get_child("cubes").get_items()
    assert item.properties["end_datetime"].startswith("2021-03-16")
    assert validate_catalog(root) == []


def test_validator_reports_a_broken_item(tmp_path):
    src = tmp_path / "src"
    make_scene(src, days(1)[0], 0)
    ingest(src, tmp_path / "cube", IngestOptions(**OPTS))
    root = update_catalog(tmp_path / "catalog", tmp_path / "cube")
    item_path = next((tmp_path / "catalog" / "sources").glob("*/*.json"))
    doc = json.loads(item_path.read_text())
    doc["geometry"] = {"type": "Polygon", "coordinates": "nope"}
    item_path.write_text(json.dumps(doc))
    errors = validate_catalog(root)
    assert len(errors) == 1 and item_path.name in errors[0]
