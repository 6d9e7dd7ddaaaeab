"""Read the scenes of one date into one tile of the cube grid (window read, or warp), and mosaic them.

Mosaic rule for footprints of the same date that overlap: for each pixel, the first scene (in
order of scene id) that has a *valid* observation there (not fill, mask clear) wins; where no
scene is valid, the first scene that covers the pixel at all (not fill) gives the value, with
``valid`` False. Pixels no scene covers hold the cube's fill value.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import reproject
from rasterio.windows import Window

from geowm.cube.grid import CubeGrid, Tile
from geowm.cube.vector_mask import burn_vector_mask
from geowm.scene import BandRef, Scene, SourceError, is_vector_mask
from geowm.sources import source_crs
from geowm.zarrcube import open_raster, warp_source


class ReadError(RuntimeError):
    """A source file failed while its pixels were read; the message names the file."""


@dataclass(frozen=True)
class Encoding:
    """How the cube stores band values: dtype, fill value (``nan`` for floats), and the CF ``scale_factor`` and
    ``add_offset`` that make them physical (a source band of another scale or offset is converted to these)."""

    dtype: str
    fill: float
    scale: float = 1.0
    offset: float = 0.0


def band_scaling(ref: BandRef, file_scale: float, file_offset: float) -> tuple[float, float] | None:
    """(scale, offset) of a source band: the STAC / product convention ``ref`` carries, else the file's tags;
    None when neither says (a GeoTIFF without scale/offset tags): the band is taken at the cube's."""
    if ref.scale is not None or ref.offset is not None:
        return (1.0 if ref.scale is None else ref.scale, 0.0 if ref.offset is None else ref.offset)
    if (file_scale, file_offset) != (1.0, 0.0):
        return (file_scale, file_offset)
    return None


def same_scaling(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two (scale, offset) pairs are one (to float32 rounding, as the cube stores them)."""
    return abs(a[0] - b[0]) <= 1e-6 * abs(b[0]) and abs(a[1] - b[1]) <= 1e-3 * abs(b[0])


def _rescale(vals: np.ndarray, frm: tuple[float, float], to: tuple[float, float]) -> np.ndarray:
    """Values stored with scale/offset ``frm`` as values of scale/offset ``to`` (float64)."""
    return (vals.astype(np.float64) * frm[0] + (frm[1] - to[1])) / to[0]


def implicit_nodata(dtype: str, nodata: float | None) -> float | None:
    """The fill value of a source band: its declared nodata, else 0 for unsigned ints, NaN for floats."""
    if nodata is not None:
        return nodata
    kind = np.dtype(dtype).kind
    if kind == "u":
        return 0
    if kind == "f":
        return float("nan")
    return None


def has_mask_band(src, index: int) -> bool:
    """Whether band ``index`` of ``src`` has a validity mask of its own beside any nodata value: a per-dataset
    mask (a GeoTIFF's internal mask, ``GDAL_TIFF_INTERNAL_MASK``, or a ``.msk`` side-car, as COG tools write the
    footprint of a warped scene) or an alpha band (RGBA); 0 in it is no data."""
    from rasterio.enums import MaskFlags

    flags = getattr(src, "mask_flag_enums", None)  # a Zarr datacube (ZarrRaster) has none: its _FillValue says
    if not flags:
        return False
    return bool({MaskFlags.per_dataset, MaskFlags.alpha} & set(flags[index - 1]))


def alpha_band(src) -> int:
    """The 1-based index of the alpha band of ``src`` (RGBA), 0 if none (GDAL's warper applies a per-dataset mask
    of its own accord, an alpha band only when told)."""
    from rasterio.enums import ColorInterp

    interp = getattr(src, "colorinterp", None) or ()
    return next((i for i, c in enumerate(interp, start=1) if c == ColorInterp.alpha), 0)


def _is_fill(values: np.ndarray, fill: float | None) -> np.ndarray:
    if fill is None:
        return np.zeros(values.shape, bool)
    if isinstance(fill, float) and np.isnan(fill):
        return np.isnan(values)
    out = values == fill
    if values.dtype.kind == "f":
        out |= np.isnan(values)
    return out


def _read_band(src, ref: BandRef, grid: CubeGrid, tile: Tile, out: np.ndarray, fill_out: float,
               resampling: Resampling, implicit_fill: bool = True,
               to: tuple[float, float] | None = None) -> np.ndarray:
    """Read band ``ref`` of open dataset ``src`` into ``out`` (tile shape); returns the 'covered' mask.
    ``implicit_fill`` False: only a declared nodata is fill (a bit mask's 0 means "no flag set"). ``to``: the
    cube's (scale, offset); a band of another one (:func:`band_scaling`) is converted (integers rounded)."""
    src_fill = implicit_nodata(src.dtypes[ref.index - 1], src.nodata) if implicit_fill else src.nodata
    frm = band_scaling(ref, src.scales[ref.index - 1], src.offsets[ref.index - 1])
    if to is None or frm is None or same_scaling(frm, to):
        frm = to = None
    src_crs = source_crs(src, ref.path)
    offset = grid.aligned_offset(src_crs.to_string(), src.transform)
    h, w = tile.shape
    if offset is not None:  # same lattice: a plain window read, values unchanged
        row0, col0 = offset
        r0, r1 = max(tile.y.start, row0), min(tile.y.stop, row0 + src.height)
        c0, c1 = max(tile.x.start, col0), min(tile.x.stop, col0 + src.width)
        out[...] = fill_out
        covered = np.zeros((h, w), bool)
        if r1 > r0 and c1 > c0:
            win = Window(c0 - col0, r0 - row0, c1 - c0, r1 - r0)
            vals = src.read(ref.index, window=win)
            ok = ~_is_fill(vals, src_fill)
            if has_mask_band(src, ref.index):  # GDAL's warper applies it itself on the other path
                ok &= src.read_masks(ref.index, window=win) > 0
            dst = (slice(r0 - tile.y.start, r1 - tile.y.start), slice(c0 - tile.x.start, c1 - tile.x.start))
            if frm is not None:
                vals = _fit(_rescale(vals, frm, to), out.dtype, fill_out)
            out[dst] = np.where(ok, vals, fill_out)
            covered[dst] = ok
        return covered
    tmp = np.full((h, w), np.nan, np.float64)  # NaN marks "not covered" whatever the dtypes
    dst_transform = grid.window_transform(tile.y, tile.x)
    source, src_transform = warp_source(src, ref.index, grid.crs, dst_transform, (h, w))
    reproject(
        source=source, destination=tmp,
        src_transform=src_transform, src_crs=src_crs, src_nodata=src_fill,
        dst_transform=dst_transform, dst_crs=grid.crs, dst_nodata=np.nan,
        resampling=resampling, **({"src_alpha": alpha} if (alpha := alpha_band(src)) else {}),
    )
    covered = ~np.isnan(tmp)
    if frm is not None:
        tmp = _rescale(tmp, frm, to)
    tmp = _fit(tmp, out.dtype, fill_out if frm is not None else None)
    out[...] = np.where(covered, tmp, fill_out).astype(out.dtype)
    return covered


def _fit(vals: np.ndarray, dtype, fill: float | None = None) -> np.ndarray:
    """Float values as ``dtype`` can hold them: integers rounded and clipped to its range, short of ``fill``
    where that is the range's end (a converted observation never turns into fill)."""
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = int(info.min), int(info.max)
        lo += int(fill is not None and fill == lo)
        hi -= int(fill is not None and fill == hi)
        return np.clip(np.rint(vals), lo, hi)
    return vals


def read_scene(scene: Scene, bands: Sequence[str], grid: CubeGrid, tile: Tile, enc: Encoding,
               resampling: Resampling = Resampling.bilinear,
               buffer_px: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene in one tile: ``data`` (band, y, x) in ``enc.dtype``, ``valid`` and ``covered`` (y, x) bool.

    ``covered``: every band has a non-fill value; ``valid``: covered and, if the scene has a mask,
    the mask value is one of ``scene.mask_clear`` (a bit mask: has none of ``scene.mask_bits`` set) and no
    flagged mask pixel (covered by the mask but not clear: cloud, shadow, ...) lies within ``buffer_px`` pixels
    (read across the tile's edges).
    """
    h, w = tile.shape
    data = np.empty((len(bands), h, w), enc.dtype)
    covered = np.ones((h, w), bool)
    with ExitStack() as stack:
        opened: dict[str, object] = {}

        def src_of(ref: BandRef):
            if ref.path not in opened:
                opened[ref.path] = stack.enter_context(open_raster(ref.path))
            return opened[ref.path]

        current = ""
        try:
            for i, name in enumerate(bands):
                ref = scene.bands[name]
                current = ref.path
                covered &= _read_band(src_of(ref), ref, grid, tile, data[i], enc.fill, resampling,
                                      to=(enc.scale, enc.offset))
            valid = covered.copy()
            if scene.mask is not None:
                current = scene.mask.path
                src = None if is_vector_mask(current) else src_of(scene.mask)
                valid &= _clear_with_buffer(src, scene, grid, tile, buffer_px)
        except (rasterio.errors.RasterioError, OSError) as exc:
            raise ReadError(f"{current}: failed while reading pixels ({exc})") from None
        except SourceError as exc:
            raise ReadError(str(exc)) from None
    return data, valid, covered


def _clear_with_buffer(src, scene: Scene, grid: CubeGrid, tile: Tile, buffer_px: int) -> np.ndarray:
    """Where the mask of ``scene`` says clear in ``tile`` and, with ``buffer_px`` > 0, no flagged pixel lies
    within that many pixels (a disk; the mask is read ``buffer_px`` beyond the tile so tiles agree)."""
    b = max(0, int(buffer_px))
    big = Tile(tile.row, tile.col, slice(tile.y.start - b, tile.y.stop + b), slice(tile.x.start - b, tile.x.stop + b))
    mask = np.zeros(big.shape, np.int64)
    if src is None or scene.mask.index == 0:
        if src is None:  # flag polygons (a GML mask, ``src`` None): every pixel outside them is clear
            mask = burn_vector_mask(scene.mask.path, grid, big)
            has_mask = np.ones(big.shape, bool)
        else:  # flag layers, one bit each (MSK_CLASSI): 0 is "no flag" (nodata or not)
            has_mask = _read_flag_layers(src, scene.mask, grid, big, mask)
        clear = clear_by_bits(scene.mask_bits, mask) if scene.mask_bits else _clear_lookup(scene.mask_clear, mask)
    elif scene.mask_bits:  # a bit mask: only a declared nodata is fill, and a pixel it does not cover is not clear
        has_mask = _read_band(src, scene.mask, grid, big, mask, -1, Resampling.nearest, implicit_fill=False)
        clear = has_mask & clear_by_bits(scene.mask_bits, mask)
    else:
        has_mask = _read_band(src, scene.mask, grid, big, mask, 0, Resampling.nearest)
        clear = _clear_lookup(scene.mask_clear, mask)
    if b:
        flagged = has_mask & ~clear
        if flagged.any():
            from scipy import ndimage

            clear &= ndimage.distance_transform_edt(~flagged) > b  # Euclidean distance to the nearest flagged pixel
    h, w = tile.shape
    return clear[b: b + h, b: b + w]


def _read_flag_layers(src, ref: BandRef, grid: CubeGrid, tile: Tile, out: np.ndarray) -> np.ndarray:
    """Every band of a file of 0/1 flag layers (``ref.index`` 0) into ``out`` as bits, band k as bit k - 1; returns
    where the file covers ``tile`` (a flag's 0 is "no flag" even where declared nodata: the bands' footprint
    decides what was observed)."""
    out[...] = 0
    layer = np.zeros(tile.shape, np.int64)
    covered = np.zeros(tile.shape, bool)
    for k in range(1, src.count + 1):
        covered |= _read_band(src, replace(ref, index=k), grid, tile, layer, 0, Resampling.nearest,
                              implicit_fill=False)
        out |= (layer > 0).astype(np.int64) << (k - 1)
    return covered


def clear_by_bits(bits: frozenset[int], mask: np.ndarray) -> np.ndarray:
    """``mask`` values (non-negative integers) with none of ``bits`` (0 = least significant) set."""
    flags = np.int64(sum(1 << int(b) for b in bits))
    return (mask >= 0) & ((mask & flags) == 0)


def _clear_lookup(clear: frozenset[int], mask: np.ndarray) -> np.ndarray:
    """``mask`` values that are in ``clear`` (a table lookup; values outside 0..65535 are never clear)."""
    table = np.zeros(65536, bool)
    table[[v for v in clear if 0 <= v < 65536]] = True
    inside = (mask >= 0) & (mask < 65536)
    return table[np.where(inside, mask, 0)] & inside


def mosaic_date(scenes: Sequence[Scene], bands: Sequence[str], grid: CubeGrid, tile: Tile, enc: Encoding,
                resampling: Resampling = Resampling.bilinear,
                buffer_px: int = 0) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """Mosaic the scenes of one date (already in mosaic order) into ``data`` (band, y, x) and ``valid`` (y, x);
    ``has_data`` tells, per scene, whether it covers any pixel of the tile (all its bands not fill/NaN).
    ``buffer_px``: the cloud-mask buffer of :func:`read_scene`."""
    if len(scenes) == 1:
        data, valid, covered = read_scene(scenes[0], bands, grid, tile, enc, resampling, buffer_px)
        return data, valid, [bool(covered.any())]
    h, w = tile.shape
    data = np.full((len(bands), h, w), enc.fill, enc.dtype)
    valid = np.zeros((h, w), bool)
    covered = np.zeros((h, w), bool)
    has_data = []
    for scene in scenes:
        d, v, c = read_scene(scene, bands, grid, tile, enc, resampling, buffer_px)
        take = (v & ~valid) | (c & ~covered)  # valid beats invalid; otherwise first come
        data[:, take] = d[:, take]
        valid |= v
        covered |= c
        has_data.append(bool(c.any()))
    return data, valid, has_data


@dataclass(frozen=True)
class Labels:
    """A categorical raster on the cube grid: one map for every date, or one map per year.

    ``maps`` (L, H, W); ``years`` (L,) calendar years of the maps, or None for a single map that holds at every
    date; ``classes`` ``{code: name}``. A per-year product (a crop-type map such as the USDA Cropland Data Layer,
    geowm's synthetic ``croptype.tif``) is a multi-band GeoTIFF whose band descriptions are the years: cropland
    rotates, so a field's class is a property of a place *and* a year."""

    maps: np.ndarray
    years: tuple[int, ...] | None
    classes: dict[int, str]

    def band_of(self, times) -> np.ndarray:
        """Index of the map that holds at each of ``times`` (datetime64): the map of its calendar year; -1 where
        no map covers that year."""
        t = np.asarray(times, "datetime64[s]")
        if self.years is None:
            return np.zeros(t.shape, np.int64)
        year = t.astype("datetime64[Y]").astype(np.int64) + 1970
        lookup = {y: i for i, y in enumerate(self.years)}
        return np.array([lookup.get(int(y), -1) for y in year.ravel()], np.int64).reshape(t.shape)

    def crop(self, y0: int, x0: int, height: int, width: int) -> Labels:
        return Labels(self.maps[:, y0: y0 + height, x0: x0 + width], self.years, self.classes)


def _year_of(description: str | None) -> int | None:
    d = (description or "").strip()
    return int(d) if d.isdigit() and len(d) == 4 else None


def read_labels(path: str, grid: CubeGrid) -> Labels:
    """A categorical raster read onto the cube grid (nearest neighbour): :class:`Labels`.

    One band: one map for every date. Several bands: one map per year, the band descriptions naming the years
    (``2021``, ``2022``, ...); a multi-band raster whose bands are not named by distinct years is an error, as
    geowm cannot tell which band holds when. Class names come from the GeoTIFF tag ``CLASSES`` (JSON
    ``{code: name}``) when present. Raises ``ReadError`` naming the file."""
    import json

    try:
        with rasterio.open(path) as src:
            use = list(range(1, src.count + 1))
            years = None
            if len(use) > 1:
                named = [_year_of(src.descriptions[b - 1]) for b in use]
                if None in named or len(set(named)) != len(named):
                    raise ReadError(
                        f"{path}: {len(use)} bands, but their descriptions {list(src.descriptions)} are not distinct "
                        "years; a per-year label raster names each band by its year (e.g. 2021, 2022), a "
                        "single-band raster holds at every date")
                years = tuple(int(y) for y in named)
            out = np.zeros((len(use), grid.height, grid.width), src.dtypes[use[0] - 1])
            for i, b in enumerate(use):
                reproject(source=rasterio.band(src, b), destination=out[i], dst_transform=grid.transform,
                          dst_crs=grid.crs, resampling=Resampling.nearest)
            classes = json.loads(src.tags().get("CLASSES", "{}"))
    except (rasterio.errors.RasterioError, OSError, ValueError) as exc:
        raise ReadError(f"{path}: cannot read it onto the cube grid ({exc})") from None
    return Labels(out, years, {int(k): v for k, v in classes.items()})
