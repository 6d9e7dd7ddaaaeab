"""Sentinel-2 SAFE products as ESA delivers them: JPEG 2000 band files at 10, 20 and 60 m in ``IMG_DATA``, the
SCL mask at 20 m, product metadata with the quantification value and (from processing baseline 04.00) an
offset of -1000 on every band; unpacked, or in the .zip they are downloaded in."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from geowm.cube import IngestError, IngestOptions, cube_checksum, ingest, open_cube
from geowm.cube.reader import ReadError
from geowm.sources import SourceError, discover

OPTS = dict(tile_size=32, time_chunk=2, scheduler="synchronous")
SIZE = 48  # px at 10 m
CRS = "EPSG:32721"
X0, Y0 = 600000, 7100000
BANDS = ("B02", "B03", "B04", "B08")
OLD = ("S2B_MSIL2A_20211220T133839_N0301_R124_T21JUN_20211220T161541", "T21JUN_20211220T133839")
NEW = ("S2A_MSIL2A_20220208T133841_N0400_R124_T21JUN_20220208T171544", "T21JUN_20220208T133841")

_MTD = """<?xml version="1.0" encoding="UTF-8"?>
<n1:Level-2A_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd">
 <n1:General_Info>
  <Product_Info><PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE></Product_Info>
  <Product_Image_Characteristics>
   <Special_Values><SPECIAL_VALUE_TEXT>NODATA</SPECIAL_VALUE_TEXT><SPECIAL_VALUE_INDEX>0</SPECIAL_VALUE_INDEX>
   </Special_Values>
   <QUANTIFICATION_VALUES_LIST>
    <BOA_QUANTIFICATION_VALUE unit="none">10000</BOA_QUANTIFICATION_VALUE>
    <AOT_QUANTIFICATION_VALUE unit="none">1000.0</AOT_QUANTIFICATION_VALUE>
    <WVP_QUANTIFICATION_VALUE unit="cm">1000.0</WVP_QUANTIFICATION_VALUE>
   </QUANTIFICATION_VALUES_LIST>
   {offsets}
   <Spectral_Information_List>{spectral}</Spectral_Information_List>
  </Product_Image_Characteristics>
 </n1:General_Info>
</n1:Level-2A_User_Product>
"""
_IDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")


def _jp2(path: Path, data: np.ndarray, res: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data[None] if data.ndim == 2 else data
    with rasterio.open(path, "w", driver="JP2OpenJPEG", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype, crs=CRS, transform=Affine(res, 0, X0, 0, -res, Y0),
                       QUALITY=100, REVERSIBLE="YES") as dst:
        dst.write(data)


def _reflectance(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {b: rng.uniform(0.02, 0.5, (SIZE, SIZE)) for b in BANDS}


def _scl() -> np.ndarray:  # at 20 m
    scl = np.full((SIZE // 2, SIZE // 2), 4, np.uint8)  # vegetation
    scl[:3] = 6  # water: clear
    scl[5:9, 4:15] = 9  # cloud, high probability
    scl[12:14] = 3  # cloud shadow
    scl[18:, 18:] = 0  # no data
    return scl


def make_safe(folder: Path, names: tuple[str, str], rho: dict[str, np.ndarray], offset: int, *,
              metadata: str | None = "auto") -> Path:
    """A Sentinel-2 L2A SAFE product: ``rho`` (reflectance at 10 m) stored as ``rho * 10000 - offset`` (offset
    -1000 from baseline 04.00), at 10 m (R10m), block means at 20 m and 60 m, SCL at 20 and 60 m, aerosol and
    water-vapour layers, a true-colour image, QI_DATA masks and the product metadata."""
    product, stem = names
    safe = folder / f"{product}.SAFE"
    img = safe / "GRANULE" / f"L2A_T21JUN_A034567_{stem[7:]}" / "IMG_DATA"

    def dn(a: np.ndarray) -> np.ndarray:
        return np.round(a * 10000 - offset).astype(np.uint16)

    def coarse(a: np.ndarray, k: int) -> np.ndarray:
        return a.reshape(a.shape[0] // k, k, a.shape[1] // k, k).mean(axis=(1, 3))

    for b in BANDS:
        _jp2(img / "R10m" / f"{stem}_{b}_10m.jp2", dn(rho[b]), 10)
        if b != "B08":
            _jp2(img / "R20m" / f"{stem}_{b}_20m.jp2", dn(coarse(rho[b], 2)), 20)
            _jp2(img / "R60m" / f"{stem}_{b}_60m.jp2", dn(coarse(rho[b], 6)), 60)
    _jp2(img / "R20m" / f"{stem}_B8A_20m.jp2", dn(coarse(rho["B08"], 2)), 20)
    _jp2(img / "R60m" / f"{stem}_B01_60m.jp2", dn(coarse(rho["B02"], 6)), 60)
    _jp2(img / "R20m" / f"{stem}_SCL_20m.jp2", _scl(), 20)
    _jp2(img / "R60m" / f"{stem}_SCL_60m.jp2", _scl()[::3, ::3].copy(), 60)
    for layer in ("AOT", "WVP"):
        _jp2(img / "R10m" / f"{stem}_{layer}_10m.jp2", np.full((SIZE, SIZE), 150, np.uint16), 10)
    _jp2(img / "R10m" / f"{stem}_TCI_10m.jp2", np.full((SIZE, SIZE), 90, np.uint8), 10)
    qi = img.parent / "QI_DATA"
    _jp2(qi / "MSK_CLDPRB_20m.jp2", np.zeros((SIZE // 2, SIZE // 2), np.uint8), 20)
    # L2A products carry the L1C cloud layers too (opaque, cirrus, snow at 60 m); SCL is their mask, not this
    _jp2(qi / "MSK_CLASSI_B00.jp2", np.ones((3, SIZE // 6, SIZE // 6), np.uint8), 60)
    _jp2(qi / f"{stem}_PVI.jp2", np.zeros((8, 8), np.uint8), 60)
    (safe / "DATASTRIP").mkdir(parents=True)
    (safe / "manifest.safe").write_text("<xfdu/>")
    if metadata == "auto":
        offsets = "".join(f'<BOA_ADD_OFFSET band_id="{i}">{offset}</BOA_ADD_OFFSET>' for i in range(13))
        metadata = _MTD.format(
            baseline="04.00" if offset else "03.01",
            offsets=f"<BOA_ADD_OFFSET_VALUES_LIST>{offsets}</BOA_ADD_OFFSET_VALUES_LIST>" if offset else "",
            spectral="".join(f'<Spectral_Information bandId="{i}" physicalBand="{b}"/>' for i, b in enumerate(_IDS)))
    if metadata is not None:
        (safe / "MTD_MSIL2A.xml").write_text(metadata)
    return safe


def zip_safe(safe: Path, archive: Path) -> Path:
    """The product as the Copernicus Data Space delivers it: ``<product>.SAFE/...`` in a zip."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(safe.rglob("*")):
            z.write(f, f.relative_to(safe.parent).as_posix())
    return archive


def _clear_at_10m() -> np.ndarray:
    return np.isin(np.repeat(np.repeat(_scl(), 2, 0), 2, 1), [4, 5, 6, 7])


def test_safe_products_across_processing_baseline_0400_ingest_to_one_reflectance(tmp_path):
    from geowm.baselines import ndvi

    old, new = _reflectance(0), _reflectance(1)
    make_safe(tmp_path / "src", OLD, old, 0)
    make_safe(tmp_path / "src", NEW, new, -1000)
    scenes = discover(tmp_path / "src")
    assert [s.id for s in scenes] == [OLD[0], NEW[0]]
    s = scenes[1]
    assert sorted(s.bands) == ["B01", "B02", "B03", "B04", "B08", "B8A"]  # no AOT, WVP, TCI, QI_DATA masks
    assert s.bands["B02"].path.endswith("_B02_10m.jp2") and s.bands["B8A"].path.endswith("_B8A_20m.jp2")
    assert s.mask.path.endswith("_SCL_20m.jp2") and s.mask_clear == {4, 5, 6, 7}
    assert (s.bands["B04"].scale, s.bands["B04"].offset) == (1e-4, -0.1)
    assert (scenes[0].bands["B04"].scale, scenes[0].bands["B04"].offset) == (1e-4, 0.0)
    assert s.common_names == {"B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B08": "nir",
                              "B8A": "nir08"}

    ingest(tmp_path / "src", tmp_path / "cube", IngestOptions(**OPTS, bands=list(BANDS)))
    ds = open_cube(tmp_path / "cube")
    # dims time, band, y, x on every open (the store lists its arrays in no fixed order)
    assert {(tuple(open_cube(tmp_path / "cube").sizes), tuple(open_cube(tmp_path / "cube").data_vars))
            for _ in range(12)} == {(("time", "band", "y", "x"), ("reflectance", "valid"))}
    assert ds.sizes["y"] == ds.sizes["x"] == SIZE and float(ds.x[1] - ds.x[0]) == 10.0
    assert list(ds.common_name.values) == ["blue", "green", "red", "nir"]
    assert ds.reflectance.encoding["scale_factor"] == np.float32(1e-4)
    valid = ds.valid.values
    clear = _clear_at_10m()
    np.testing.assert_array_equal(valid[0], clear)
    np.testing.assert_array_equal(valid[1], clear)
    # one reflectance across the baseline change: the later product's values are 1000 higher for the same surface
    for t, rho in enumerate((old, new)):
        for b in BANDS:
            got = ds.reflectance.sel(band=b).isel(time=t).values
            np.testing.assert_allclose(got[clear], rho[b][clear], atol=0.6e-4, err_msg=f"{b} at time {t}")
    red, nir = new["B04"], new["B08"]
    np.testing.assert_allclose(ndvi(ds).isel(time=1).values[clear], ((nir - red) / (nir + red))[clear], atol=1e-3)

    # the same products in the other order: the cube takes the first one's offset, the older product is converted
    make_safe(tmp_path / "first", NEW, new, -1000)
    ingest(tmp_path / "first", tmp_path / "cube2", IngestOptions(**OPTS, bands=list(BANDS)))
    make_safe(tmp_path / "then", OLD, old, 0)
    ingest(tmp_path / "then", tmp_path / "cube2", IngestOptions(**OPTS))
    ds2 = open_cube(tmp_path / "cube2")
    assert ds2.reflectance.encoding["add_offset"] == np.float32(-0.1)
    np.testing.assert_allclose(ds2.reflectance.values[:, :, clear], ds.reflectance.values[:, :, clear], atol=1e-6)


def test_a_zipped_safe_is_read_in_place_and_recorded_by_its_archive(tmp_path):
    from catalog.stac import update_catalog, validate_catalog

    rho = _reflectance(2)
    safe = make_safe(tmp_path / "unpacked", NEW, rho, -1000)
    archive = zip_safe(safe, tmp_path / "downloads" / f"{NEW[0]}.zip")
    with zipfile.ZipFile(tmp_path / "downloads" / "other.zip", "w") as z:  # an archive without a product
        z.writestr("readme.txt", "not imagery")
    scenes = discover(archive)
    assert [s.id for s in scenes] == [NEW[0]]
    assert scenes[0].bands["B04"].path == f"/vsizip/{archive.resolve()}/{NEW[0]}.SAFE/GRANULE/" \
                                         f"L2A_T21JUN_A034567_{NEW[1][7:]}/IMG_DATA/R10m/{NEW[1]}_B04_10m.jp2"
    assert (scenes[0].bands["B04"].scale, scenes[0].bands["B04"].offset) == (1e-4, -0.1)

    report = ingest(archive, tmp_path / "cube", IngestOptions(**OPTS, bands=list(BANDS)))
    assert report.added_times
    ingest(safe.parent, tmp_path / "ref", IngestOptions(**OPTS, bands=list(BANDS)))
    a, b = open_cube(tmp_path / "cube"), open_cube(tmp_path / "ref")
    np.testing.assert_array_equal(a.reflectance.values, b.reflectance.values)
    np.testing.assert_array_equal(a.valid.values, b.valid.values)
    from geowm.cube.store import read_state

    (rec,) = read_state(tmp_path / "cube").sources
    assert {v[2] for v in rec["content"].values()} == {__import__("hashlib").sha256(archive.read_bytes()).hexdigest()}
    before = cube_checksum(tmp_path / "cube")
    again = ingest(archive, tmp_path / "cube", IngestOptions(**OPTS))
    assert not again.added_times and again.skipped_scenes == [NEW[0]]
    assert cube_checksum(tmp_path / "cube") == before
    # the catalog lists the archive, and which file inside it each band came from
    validate = validate_catalog(update_catalog(tmp_path / "catalog", tmp_path / "cube"))
    assert validate == []
    import json

    items = [json.loads(p.read_text()) for p in (tmp_path / "catalog").rglob("*.json")]
    (item,) = [i for i in items if i.get("id") == NEW[0]]
    asset = item["assets"][f"{NEW[1]}_B04_10m"]
    assert asset["type"] == "application/zip" and asset["href"].endswith(f"downloads/{NEW[0]}.zip")
    assert asset["geowm:archive_member"].endswith(f"IMG_DATA/R10m/{NEW[1]}_B04_10m.jp2")
    (cube_item,) = [i for i in items if i.get("id") == "cube"]  # the cube's bands, and what each one is
    assert cube_item["assets"]["cube"]["eo:bands"] == [{"name": b, "common_name": c} for b, c in
                                                       zip(BANDS, ("blue", "green", "red", "nir"), strict=True)]
    assert any("/eo/" in e for e in cube_item["stac_extensions"])
    # a folder of downloads: the product zips are scenes, the archive without a product is left alone
    assert [s.id for s in discover(tmp_path / "downloads")] == [NEW[0]]
    # a product unpacked beside its zip is one scene, read from the folder
    zip_safe(safe, tmp_path / "unpacked" / f"{NEW[0]}.zip")
    (scene,) = discover(tmp_path / "unpacked")
    assert scene.bands["B04"].path == str(next(safe.rglob("*_B04_10m.jp2")))
    with pytest.raises(SourceError, match="no Sentinel-2 SAFE product"):
        discover(tmp_path / "downloads" / "other.zip")


def test_product_name_gives_the_offset_when_the_metadata_is_missing_and_l1c_metadata_is_read(tmp_path):
    make_safe(tmp_path / "src", NEW, _reflectance(3), -1000, metadata=None)
    make_safe(tmp_path / "src", OLD, _reflectance(4), 0, metadata=None)
    old, new = discover(tmp_path / "src")
    assert (new.bands["B02"].scale, new.bands["B02"].offset) == (1e-4, -0.1)
    assert (old.bands["B02"].scale, old.bands["B02"].offset) == (1e-4, 0.0)
    # Level-1C: top-of-atmosphere QUANTIFICATION_VALUE and RADIO_ADD_OFFSET, by band id (B8A is id 8)
    l1c = """<n1:Level-1C_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-1C.xsd">
     <n1:General_Info><Product_Info><PROCESSING_BASELINE>04.00</PROCESSING_BASELINE></Product_Info>
     <Product_Image_Characteristics><QUANTIFICATION_VALUE unit="none">10000</QUANTIFICATION_VALUE>
     <Radiometric_Offset_List><RADIO_ADD_OFFSET band_id="3">-1000</RADIO_ADD_OFFSET>
     <RADIO_ADD_OFFSET band_id="8">-2000</RADIO_ADD_OFFSET></Radiometric_Offset_List>
     </Product_Image_Characteristics></n1:General_Info></n1:Level-1C_User_Product>"""
    names = (NEW[0].replace("MSIL2A", "MSIL1C"), NEW[1])
    safe = make_safe(tmp_path / "l1c", names, _reflectance(5), -1000, metadata=None)
    (safe / "MTD_MSIL1C.xml").write_text(l1c)
    (scene,) = discover(tmp_path / "l1c")
    assert scene.id == names[0]
    assert {b: (r.scale, r.offset) for b, r in scene.bands.items() if b in ("B02", "B04", "B8A")} == \
        {"B02": (1e-4, 0.0), "B04": (1e-4, -0.1), "B8A": (1e-4, -0.2)}


@pytest.mark.parametrize("metadata, problem", [
    ("<n1:Level-2A_User_Product", "unreadable Sentinel-2 product metadata"),
    (_MTD.format(baseline="04.00", offsets="", spectral=""), r"processing baseline 04\.00 but no BOA_ADD_OFFSET"),
    (_MTD.format(baseline="04.00", spectral="", offsets='<BOA_ADD_OFFSET band_id="3">-1e3x</BOA_ADD_OFFSET>'),
     r"BOA_ADD_OFFSET '-1e3x' \(band_id '3'\) is not a number"),
    (_MTD.format(baseline="03.01", offsets="", spectral="").replace(">10000<", ">0<"),
     "no valid BOA_QUANTIFICATION_VALUE"),
])
def test_bad_product_metadata_or_archive_is_refused_and_the_cube_kept(tmp_path, metadata, problem):
    make_safe(tmp_path / "good", OLD, _reflectance(5), 0)
    ingest(tmp_path / "good", tmp_path / "cube", IngestOptions(**OPTS, bands=list(BANDS)))
    before = cube_checksum(tmp_path / "cube")
    safe = make_safe(tmp_path / "bad", NEW, _reflectance(6), -1000, metadata=metadata)
    with pytest.raises(SourceError, match=problem) as err:
        ingest(tmp_path / "bad", tmp_path / "cube", IngestOptions(**OPTS))
    assert str(safe / "MTD_MSIL2A.xml") in str(err.value)
    assert cube_checksum(tmp_path / "cube") == before


def test_a_zip_cut_short_is_refused_and_the_cube_kept(tmp_path):
    make_safe(tmp_path / "good", OLD, _reflectance(5), 0)
    ingest(tmp_path / "good", tmp_path / "cube", IngestOptions(**OPTS, bands=list(BANDS)))
    before = cube_checksum(tmp_path / "cube")
    whole = zip_safe(make_safe(tmp_path / "ok", NEW, _reflectance(6), -1000), tmp_path / "whole.zip").read_bytes()
    cut = tmp_path / "cut" / f"{NEW[0]}.zip"
    cut.parent.mkdir()
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(SourceError, match="not a readable zip archive") as err:
        ingest(cut, tmp_path / "cube", IngestOptions(**OPTS))
    assert str(cut) in str(err.value)
    # an unpacked product with a band file cut short: found while its pixels are read, on a dask worker
    band = next(make_safe(tmp_path / "partial", NEW, _reflectance(6), -1000).rglob("*_B04_10m.jp2"))
    band.write_bytes(band.read_bytes()[: band.stat().st_size // 2])
    with pytest.raises(ReadError, match="failed while reading pixels") as err:
        ingest(tmp_path / "partial", tmp_path / "cube", IngestOptions(**{**OPTS, "scheduler": "threads"}))
    assert str(band) in str(err.value)
    assert cube_checksum(tmp_path / "cube") == before


def test_dry_run_shows_the_plan_and_writes_nothing(tmp_path):
    """``geowm ingest --dry-run``: the grid, bands, scale and offset each band would be read at, the mask rule
    and the dates, from headers alone; no cube, no catalog, an existing cube unchanged."""
    import json

    from typer.testing import CliRunner

    from geowm.cli import app

    runner = CliRunner()
    make_safe(tmp_path / "src", OLD, _reflectance(7), 0)
    make_safe(tmp_path / "src", NEW, _reflectance(8), -1000)
    cube = tmp_path / "cube"
    args = ["ingest", str(tmp_path / "src"), "--cube", str(cube), "--scheduler", "synchronous", "--dry-run"]
    res = runner.invoke(app, [*args, "--json", "--bands", "B02,B03,B04,B08"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert not cube.exists() and not (tmp_path / "catalog").exists()
    assert plan["new_cube"] and plan["add"] == ["2021-12-20T13:38:39", "2022-02-08T13:38:41"]
    assert {k: plan["grid"][k] for k in ("crs", "resolution", "width", "height")} == \
        {"crs": "EPSG:32721", "resolution": 10.0, "width": SIZE, "height": SIZE}
    assert plan["bands"] == [{"name": b, "common_name": c} for b, c in
                             zip(BANDS, ("blue", "green", "red", "nir"), strict=True)]
    assert plan["encoding"] == {"dtype": "uint16", "fill": 0.0, "scale": 1e-4, "offset": 0.0}
    old, new = plan["scenes"]
    assert (old["id"], new["id"]) == (OLD[0], NEW[0])
    assert (old["bands"]["B04"]["offset"], new["bands"]["B04"]["offset"]) == (0.0, -0.1)
    assert new["bands"]["B04"]["file"].endswith(f"R10m/{NEW[1]}_B04_10m.jp2")
    assert new["mask"] == {"band": "SCL", "clear": [4, 5, 6, 7], "buffer_m": 0.0}
    res = runner.invoke(app, args)
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert f"{NEW[0]} 2022-02-08T13:38:41" in text and "uint16, x 0.0001 -0.1" in text
    assert "mask SCL: clear values 4,5,6,7, buffer 0 m" in text
    assert "would add 2 date(s), replace 0, skip 0 scene(s)" in text and "nothing was written" in text
    assert not cube.exists()
    # into an existing cube: the scene already there is skipped, the other would be added
    ingest(tmp_path / "src" / f"{OLD[0]}.SAFE", cube, IngestOptions(**OPTS, bands=list(BANDS)))
    before = cube_checksum(cube)
    plan = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert not plan["new_cube"] and plan["add"] == ["2022-02-08T13:38:41"] and plan["skip"] == [OLD[0]]
    assert plan["grid"]["crs"] == "EPSG:32721" and [b["name"] for b in plan["bands"]] == list(BANDS)
    assert cube_checksum(cube) == before
    # a scene of a date the cube has (acquired at another time of day) would replace that date, not add one
    later = (OLD[0].replace("T133839", "T140012"), OLD[1].replace("T133839", "T140012"))
    make_safe(tmp_path / "again", later, _reflectance(9), 0)
    plan = json.loads(runner.invoke(app, ["ingest", str(tmp_path / "again"), "--cube", str(cube), "--scheduler",
                                          "synchronous", "--dry-run", "--json", "--replace"]).stdout)
    assert (plan["add"], plan["replace"]) == ([], ["2021-12-20T13:38:39"])
    assert cube_checksum(cube) == before
    assert runner.invoke(app, ["ingest", str(tmp_path / "src"), "--cube", str(cube), "--json"]).exit_code == 2


_L1C_MTD = """<?xml version="1.0" encoding="UTF-8"?>
<n1:Level-1C_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-1C.xsd">
 <n1:General_Info><Product_Info><PROCESSING_BASELINE>05.09</PROCESSING_BASELINE></Product_Info>
 <Product_Image_Characteristics><QUANTIFICATION_VALUE unit="none">10000</QUANTIFICATION_VALUE>
 <Radiometric_Offset_List>{offsets}</Radiometric_Offset_List>
 </Product_Image_Characteristics></n1:General_Info></n1:Level-1C_User_Product>"""
L1C = ("S2B_MSIL1C_20230601T133839_N0509_R124_T21JUN_20230601T152014", "T21JUN_20230601T133839")


def _classi() -> np.ndarray:
    """MSK_CLASSI_B00 at 60 m (8 x 8 px): layers opaque cloud, cirrus, snow/ice."""
    flags = np.zeros((3, SIZE // 6, SIZE // 6), np.uint8)
    flags[0, 1:3, 1:5] = 1
    flags[1, 4, :] = 1
    flags[2, 6:, 6:] = 1
    flags[:, 7, 0] = 1  # all three at once
    return flags


def make_l1c(folder: Path, rho: dict[str, np.ndarray]) -> Path:
    """A Sentinel-2 L1C SAFE product (baseline 05.09): band files directly in IMG_DATA (B02, B03, B04, B08 at
    10 m, B8A at 20 m, B01 at 60 m, a true-colour image) and, in QI_DATA, the cloud layers MSK_CLASSI_B00 and
    per-band detector-footprint and quality masks."""
    product, stem = L1C
    safe = folder / f"{product}.SAFE"
    granule = safe / "GRANULE" / f"L1C_T21JUN_A032567_{stem[7:]}"
    for b in BANDS:
        _jp2(granule / "IMG_DATA" / f"{stem}_{b}.jp2", np.round(rho[b] * 10000 + 1000).astype(np.uint16), 10)
    _jp2(granule / "IMG_DATA" / f"{stem}_B8A.jp2", np.full((SIZE // 2, SIZE // 2), 3000, np.uint16), 20)
    _jp2(granule / "IMG_DATA" / f"{stem}_B01.jp2", np.full((SIZE // 6, SIZE // 6), 2000, np.uint16), 60)
    _jp2(granule / "IMG_DATA" / f"{stem}_TCI.jp2", np.full((3, SIZE, SIZE), 90, np.uint8), 10)
    qi = granule / "QI_DATA"
    _jp2(qi / "MSK_CLASSI_B00.jp2", _classi(), 60)
    for b in ("B02", "B04"):
        _jp2(qi / f"MSK_DETFOO_{b}.jp2", np.ones((SIZE // 2, SIZE // 2), np.uint8), 20)
        _jp2(qi / f"MSK_QUALIT_{b}.jp2", np.zeros((8, SIZE // 6, SIZE // 6), np.uint8), 60)
    offsets = "".join(f'<RADIO_ADD_OFFSET band_id="{i}">-1000</RADIO_ADD_OFFSET>' for i in range(13))
    (safe / "MTD_MSIL1C.xml").write_text(_L1C_MTD.format(offsets=offsets))
    return safe


def test_l1c_products_are_masked_by_their_msk_classi_cloud_layers(tmp_path):
    """L1C has no SCL: from processing baseline 04.00 its cloud mask is QI_DATA/MSK_CLASSI_B00.jp2, three 0/1
    layers at 60 m (opaque cloud, cirrus, snow/ice), read as bits 0, 1 and 2."""
    rho = _reflectance(7)
    safe = make_l1c(tmp_path / "src", rho)
    (scene,) = discover(tmp_path / "src")
    assert scene.id == L1C[0] and sorted(scene.bands) == ["B01", "B02", "B03", "B04", "B08", "B8A"]
    assert scene.mask.name == "MSK_CLASSI" and scene.mask.index == 0 and scene.mask.path.endswith("MSK_CLASSI_B00.jp2")
    assert scene.mask_bits == {0, 1, 2} and (scene.bands["B04"].scale, scene.bands["B04"].offset) == (1e-4, -0.1)
    flagged = np.repeat(np.repeat(_classi().any(axis=0), 6, 0), 6, 1)  # any layer, at 10 m
    ingest(tmp_path / "src", tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    np.testing.assert_array_equal(ds.valid.isel(time=0).values, ~flagged)
    np.testing.assert_allclose(ds.reflectance.sel(band="B04").isel(time=0).values, rho["B04"], atol=1e-4)
    from geowm.cube.info import summarize

    assert summarize(tmp_path / "cube")["mask_rules"] == [
        {"band": "MSK_CLASSI", "clear": [], "bits": [0, 1, 2], "buffer_m": 0.0, "scenes": 1}]
    # --mask-bits 0,1 keeps snow; the zipped product is read the same way
    ingest(zip_safe(safe, tmp_path / "zip" / f"{L1C[0]}.zip"), tmp_path / "snow",
           IngestOptions(**OPTS, mask_bits=[0, 1]))
    cloud = np.repeat(np.repeat(_classi()[:2].any(axis=0), 6, 0), 6, 1)
    np.testing.assert_array_equal(open_cube(tmp_path / "snow").valid.isel(time=0).values, ~cloud)
    # a product whose mask is unreadable fails naming it, and the cube is kept
    before = cube_checksum(tmp_path / "cube")
    other = make_l1c(tmp_path / "bad", _reflectance(8))
    mask = next(other.rglob("MSK_CLASSI_B00.jp2"))
    mask.write_bytes(mask.read_bytes()[:200])
    other.rename(other.with_name(other.name.replace("T152014", "T170000")))  # another product id: not skipped
    with pytest.raises(IngestError, match=r"QI_DATA/MSK_CLASSI_B00.jp2: not a readable raster"):
        ingest(tmp_path / "bad", tmp_path / "cube", IngestOptions(**OPTS, replace=True))
    assert cube_checksum(tmp_path / "cube") == before


OLD_L1C = ("S2A_MSIL1C_20190705T133841_N0207_R124_T21JUN_20190705T151832", "T21JUN_20190705T133841")
_GML = """<?xml version="1.0" encoding="UTF-8"?>
<eop:Mask xmlns:eop="http://www.opengis.net/eop/2.0" xmlns:gml="http://www.opengis.net/gml/3.2" gml:id="{id}">
  <gml:name>MSK_CLOUDS pixels mask from data-strip {id}</gml:name>
  <gml:boundedBy>{bounded}</gml:boundedBy>
  <eop:maskMembers>{members}</eop:maskMembers>
</eop:Mask>"""
# pixel rectangles (rows r0:r1, cols c0:c1 at 10 m) of each feature, and holes in them
_CLOUDS = [("OPAQUE", (2, 10, 4, 20), [(4, 6, 8, 12)]), ("OPAQUE", (30, 40, 0, 8), []),
           ("CIRRUS", (8, 24, 16, 30), [])]


def _ring(r0: int, r1: int, c0: int, c1: int) -> str:
    """A closed ring around pixel rows r0:r1, cols c0:c1 of the test grid, as a gml:posList (x y, in the CRS)."""
    x0, x1, y0, y1 = X0 + 10 * c0, X0 + 10 * c1, Y0 - 10 * r0, Y0 - 10 * r1
    return " ".join(f"{x} {y}" for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)))


def _clouds_gml(features=_CLOUDS, srs: str = "urn:ogc:def:crs:EPSG:8.7:32721", id_: str = "MSK_CLOUDS_B00") -> str:
    """A Sentinel-2 MSK_CLOUDS GML mask as L1C products before baseline 04.00 carry it ([]: a cloudless one)."""
    members = ""
    for i, (kind, outer, holes) in enumerate(features):
        inner = "".join(f"<gml:interior><gml:LinearRing><gml:posList srsDimension=\"2\">{_ring(*h)}</gml:posList>"
                        "</gml:LinearRing></gml:interior>" for h in holes)
        members += (f'<eop:MaskFeature gml:id="{kind}.{i}"><eop:maskType codeSpace="urn:gs2:S2PDGS:maskType">{kind}'
                    f'</eop:maskType><eop:extentOf><gml:Polygon gml:id="{kind}.{i}_Polygon"><gml:exterior>'
                    f'<gml:LinearRing><gml:posList srsDimension="2">{_ring(*outer)}</gml:posList></gml:LinearRing>'
                    f"</gml:exterior>{inner}</gml:Polygon></eop:extentOf></eop:MaskFeature>")
    bounded = (f'<gml:Envelope srsName="{srs}"><gml:lowerCorner>{X0} {Y0 - 480}</gml:lowerCorner>'
               f"<gml:upperCorner>{X0 + 480} {Y0}</gml:upperCorner></gml:Envelope>" if features
               else "<gml:Null>Inapplicable</gml:Null>")
    return _GML.format(id=id_, bounded=bounded, members=members)


def _flagged(kinds=("OPAQUE", "CIRRUS")) -> np.ndarray:
    out = np.zeros((SIZE, SIZE), bool)
    for kind, (r0, r1, c0, c1), holes in _CLOUDS:
        if kind in kinds:
            part = np.zeros_like(out)
            part[r0:r1, c0:c1] = True
            for h0, h1, k0, k1 in holes:
                part[h0:h1, k0:k1] = False
            out |= part
    return out


def make_old_l1c(folder: Path, rho: dict[str, np.ndarray], gml: str, *, names=OLD_L1C, psd13: bool = False) -> Path:
    """An L1C product of processing baseline 02.07 (no offset), with its cloud mask as GML polygons in
    ``QI_DATA/MSK_CLOUDS_B00.gml``; ``psd13``: the file names of 2015-2016 products (``S2A_OPER_MSI_L1C_TL_...``,
    ``S2A_OPER_MSK_CLOUDS_..._B00_MSIL1C.gml``), with the other GML masks beside it."""
    product, stem = names
    safe = folder / f"{product}.SAFE"
    tile = "S2A_OPER_MSI_L1C_TL_SGS__20160929T154211_A006640_T21JUN" if psd13 else stem
    granule = safe / "GRANULE" / (f"{tile}_N02.04" if psd13 else f"L1C_T21JUN_A021234_{stem[7:]}")
    for b in BANDS:
        _jp2(granule / "IMG_DATA" / f"{tile}_{b}.jp2", np.round(rho[b] * 10000).astype(np.uint16), 10)
    qi = granule / "QI_DATA"
    qi.mkdir(parents=True)
    if psd13:
        (qi / "S2A_OPER_MSK_CLOUDS_SGS__20160929T154211_A006640_T21JUN_B00_MSIL1C.gml").write_text(gml)
        (qi / "S2A_OPER_MSK_NODATA_SGS__20160929T154211_A006640_T21JUN_B02_MSIL1C.gml").write_text("<not-a-mask/>")
    else:
        (qi / "MSK_CLOUDS_B00.gml").write_text(gml)
        (qi / "MSK_DETFOO_B02.gml").write_text("<not-a-mask/>")
    (safe / "MTD_MSIL1C.xml").write_text(_L1C_MTD.replace("05.09", "02.07").format(offsets=""))
    return safe


def test_older_l1c_products_are_masked_by_their_gml_cloud_polygons(tmp_path):
    """Before processing baseline 04.00 (January 2022) an L1C granule's cloud mask is vector: QI_DATA/
    MSK_CLOUDS_B00.gml, OPAQUE and CIRRUS polygons (with holes) in the tile's UTM zone. They flag bits 0 and 1."""
    from catalog.stac import update_catalog, validate_catalog
    from geowm.cube.info import summarize

    rho = _reflectance(9)
    make_old_l1c(tmp_path / "src", rho, _clouds_gml())
    (scene,) = discover(tmp_path / "src")
    assert scene.id == OLD_L1C[0] and sorted(scene.bands) == list(BANDS)
    assert scene.mask.name == "MSK_CLOUDS" and scene.mask.path.endswith("QI_DATA/MSK_CLOUDS_B00.gml")
    assert scene.mask_bits == {0, 1} and (scene.bands["B04"].scale, scene.bands["B04"].offset) == (1e-4, 0.0)
    ingest(tmp_path / "src", tmp_path / "cube", IngestOptions(**OPTS))
    ds = open_cube(tmp_path / "cube")
    np.testing.assert_array_equal(ds.valid.isel(time=0).values, ~_flagged())  # holes are clear
    np.testing.assert_allclose(ds.reflectance.sel(band="B04").isel(time=0).values, rho["B04"], atol=1e-4)
    assert summarize(tmp_path / "cube")["mask_rules"] == [
        {"band": "MSK_CLOUDS", "clear": [], "bits": [0, 1], "buffer_m": 0.0, "scenes": 1}]
    assert validate_catalog(update_catalog(tmp_path / "catalog", tmp_path / "cube")) == []
    (item,) = [json.loads(p.read_text()) for p in (tmp_path / "catalog").rglob("*.json")
               if OLD_L1C[0] in p.name and '"Feature"' in p.read_text()]
    assert {a["type"] for a in item["assets"].values()} == {"image/jp2", "application/gml+xml"}

    # the products of 2015-2016, zipped, and --mask-bits 0 (cirrus kept): only the opaque polygons mask
    names = ("S2A_OPER_PRD_MSIL1C_PDMC_20160929T185902_R124_V20160929T133842_20160929T133842",) * 2
    safe = make_old_l1c(tmp_path / "psd13", rho, _clouds_gml(id_="S2A_OPER_MSK_CLOUDS_SGS__2016"), names=names,
                        psd13=True)
    ingest(zip_safe(safe, tmp_path / "zip" / f"{names[0]}.zip"), tmp_path / "opaque",
           IngestOptions(**OPTS, mask_bits=[0]))
    np.testing.assert_array_equal(open_cube(tmp_path / "opaque").valid.isel(time=0).values,
                                  ~_flagged(("OPAQUE",)))

    # a cube on another grid (the next UTM zone): the polygons are reprojected with the bands
    ingest(tmp_path / "src", tmp_path / "utm22", IngestOptions(**OPTS, crs="EPSG:32722", resolution=10))
    other = open_cube(tmp_path / "utm22")
    from rasterio.warp import Resampling, reproject

    expected = np.zeros(other.valid.shape[1:], np.uint8)
    x, y = other.x.values, other.y.values
    reproject(_flagged().astype(np.uint8), expected, src_transform=Affine(10, 0, X0, 0, -10, Y0), src_crs=CRS,
              dst_transform=Affine(10, 0, x[0] - 5, 0, -10, y[0] + 5), dst_crs="EPSG:32722",
              resampling=Resampling.nearest)
    covered = other.reflectance.sel(band="B04").isel(time=0).notnull().values
    agree = (other.valid.isel(time=0).values == (covered & (expected == 0)))[covered].mean()
    assert agree > 0.97, agree

    # a cloudless granule's GML (no polygons, no srsName) masks nothing
    make_old_l1c(tmp_path / "clear", rho, _clouds_gml([]))
    ingest(tmp_path / "clear", tmp_path / "cube3", IngestOptions(**OPTS))
    assert open_cube(tmp_path / "cube3").valid.all()

    # a truncated or malformed mask fails naming it, and the cube is kept
    before = cube_checksum(tmp_path / "cube")
    for bad, why in ((_clouds_gml()[:300], "not a readable GML mask"),
                     (_clouds_gml().replace(">OPAQUE<", ">SHADOW<", 1), "type 'SHADOW'"),
                     (_clouds_gml().replace("srsDimension=\"2\">600040", "srsDimension=\"2\">6x0040", 1),
                      "not a number"),
                     (_clouds_gml(srs=""), "without a coordinate reference system")):
        other = make_old_l1c(tmp_path / "bad", _reflectance(8), bad,
                             names=(OLD_L1C[0].replace("T151832", "T170000"), OLD_L1C[1]))
        with pytest.raises(IngestError, match=rf"QI_DATA/MSK_CLOUDS_B00.gml: .*{why}"):
            ingest(tmp_path / "bad", tmp_path / "cube", IngestOptions(**OPTS))
        assert cube_checksum(tmp_path / "cube") == before
        shutil.rmtree(other)
