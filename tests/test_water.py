"""New open water: the spectral rule that scores floods on fields (geowm.water)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from geowm.water import is_water, new_water, new_water_score

SOIL = (0.08, 0.10, 0.12, 0.25)  # B02, B03, B04, B08: bare soil (NDWI < 0)
WATER = (0.05, 0.06, 0.04, 0.02)  # open water: NDWI 0.5, dark in the near infrared
SNOW = (0.72, 0.71, 0.70, 0.65)  # NDWI > 0 but bright in the near infrared: not water
P = 4  # patch side (px)


def _cube(n_dates: int = 12, step: int = 20) -> xr.Dataset:
    """Six 4 x 4 px patches side by side (4 x 24 px), bare soil on every date, all clear."""
    times = np.datetime64("2021-01-01") + (np.arange(n_dates) * step).astype("timedelta64[D]")
    refl = np.broadcast_to(np.array(SOIL, np.float32)[None, :, None, None], (n_dates, 4, P, 6 * P)).copy()
    return xr.Dataset(
        {"reflectance": (("time", "band", "y", "x"), refl),
         "valid": (("time", "y", "x"), np.ones((n_dates, P, 6 * P), bool))},
        coords={"time": times, "band": ["B02", "B03", "B04", "B08"],
                "common_name": ("band", ["blue", "green", "red", "nir"]),
                "y": 1000.0 - 10 * np.arange(P), "x": 10 * np.arange(6 * P) + 5.0})


def _paint(ds: xr.Dataset, dates, patch: int, spectrum, cols=slice(None)) -> None:
    x = slice(patch * P, (patch + 1) * P)
    sub = ds["reflectance"].values[dates, :, :, x]
    sub[..., cols] = np.array(spectrum, np.float32)[None, :, None, None]
    ds["reflectance"].values[dates, :, :, x] = sub


def test_is_water_needs_a_positive_ndwi_and_a_dark_near_infrared():
    g = np.array([0.06, 0.10, 0.71, np.nan])
    n = np.array([0.02, 0.25, 0.65, 0.02])
    np.testing.assert_array_equal(is_water(g, n), [True, False, False, False])


def test_new_water_is_water_where_the_reference_looks_had_none():
    ds = _cube()
    k = 10  # the look scored (day 200); its reference window: days -225..170, looks 0..8
    _paint(ds, [k], 0, WATER)  # patch 0: a flood on bare soil
    _paint(ds, range(12), 1, WATER)  # patch 1: a lake
    _paint(ds, [3], 2, WATER)
    _paint(ds, [k], 2, WATER)  # patch 2: wet on look 3 (a seasonal wetland): not new
    _paint(ds, [k], 3, SNOW)  # patch 3: snow, unmasked: not water
    _paint(ds, range(12), 4, WATER, cols=slice(0, 2))  # patch 4: a lake shore, half water...
    ds["valid"].values[k, :, 4 * P + 2: 5 * P] = False  # ...and only the water half clear now: nothing new
    ds["valid"].values[:k, :, 5 * P:] = False  # patch 5: never clear before, nothing says it was dry
    _paint(ds, [k], 5, WATER)
    t = ds["time"].values[[k]]
    out = new_water(ds, t, P)
    assert out.dims == ("time", "py", "px") and out.shape == (1, 1, 6)
    np.testing.assert_allclose(out.values[0, 0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(out["px"].values, ds["x"].values.reshape(-1, P).mean(axis=1))

    # the flood half seen (8 of 16 px clear: the model's token rule) still counts; under half: no look
    ds["valid"].values[k, :2, 0:P] = False
    np.testing.assert_allclose(new_water(ds, t, P).values[0, 0, 0], 1.0)
    ds["valid"].values[k, 2, 0:P] = False
    assert np.isnan(new_water(ds, t, P).values[0, 0, 0])
    ds["valid"].values[k, :, 0:P] = True

    # a flood that began 20 days before the look (inside the 30 days excluded) is still new at the look
    _paint(ds, [k - 1], 0, WATER)
    np.testing.assert_allclose(new_water(ds, t, P).values[0, 0, 0], 1.0)
    # but one 40 days before is its own reference: not new any more
    _paint(ds, [k - 2], 0, WATER)
    np.testing.assert_allclose(new_water(ds, t, P).values[0, 0, 0], 0.0)
    # the same in blocks of one patch (tiling does not change the result), for every date at once, one by one
    # and with dates repeated; the first date has no look before it: nothing is new
    every = ds["time"].values
    whole = new_water(ds, every, P).values
    np.testing.assert_array_equal(new_water(ds, every, P, tile_px=P).values, whole)
    for size in (1, 3):  # the history read a time chunk at a time, newest first: the same
        np.testing.assert_array_equal(new_water(ds.chunk({"time": size}), every, P).values, whole)
    for i in (0, 4, k):
        np.testing.assert_array_equal(new_water(ds, every[[i, i]], P).values, whole[[i, i]])
    np.testing.assert_array_equal(whole[0, 0, :5], 0.0)
    assert whole[k, 0, 1] == 0.0 and np.isnan(whole[k - 1, 0, 5])  # the lake; patch 5 unseen before the look


def test_new_water_refuses_a_cube_without_green_or_near_infrared_and_dates_it_lacks():
    ds = _cube()
    with pytest.raises(ValueError, match="green and a near-infrared"):
        new_water(ds.isel(band=[0, 2, 3]).drop_vars("common_name").assign_coords(band=["B02", "B04", "B08"]),
                  ds["time"].values[-1:], P)
    with pytest.raises(ValueError, match="date of the cube"):
        new_water(ds, [np.datetime64("2021-01-02")], P)


def test_new_water_score_scales_the_share_from_a_tenth():
    frac = xr.DataArray(np.array([[[0.05, 0.1, 0.25, np.nan, 1.0]]], np.float32), dims=("time", "py", "px"))
    s = new_water_score(frac).values[0, 0]
    np.testing.assert_allclose(s[[1, 2, 4]], [2.0, 5.0, 20.0])
    assert np.isnan(s[[0, 3]]).all()


def test_new_water_finds_the_synthetic_flood(synth_region, synth_cube):
    """The generator's flood (seed 3: grassland, 2021-10-02 to 10-11) is new water on its clear look; other
    patches almost never are."""
    import geowm
    from geowm.metrics import load_events, patch_labels

    ds = geowm.open_cube(synth_cube)
    t = ds["time"].values
    t = t[t >= np.datetime64("2021-08-01")]
    share = new_water(ds, t, 8)
    ev = load_events(synth_region / "events.geojson")
    floods = ev[ev["type"] == "flood"]
    assert len(floods)
    flooded = patch_labels(floods, t, share["py"].values, share["px"].values, ev.attrs["crs"]).values == 1
    v = share.values
    seen = flooded & np.isfinite(v)
    assert seen.sum() >= 5
    assert np.median(v[seen]) >= 0.5
    off = ~flooded & np.isfinite(v)
    assert off.sum() > 5000 and (v[off] >= 0.25).mean() < 0.001  # a score of 5 or more: the alert threshold
