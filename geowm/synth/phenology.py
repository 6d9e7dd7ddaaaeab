"""Vegetation phenology: fractional green cover per parcel and date, driven by the weather.

Timing comes from growing-degree days (GDD, base 0 degC, accumulated from 1 January), so a warm
spring advances green-up and harvest; amplitude is reduced by water stress. Crops have per-parcel
sowing and harvest dates (bare soil after harvest), grassland is mown 2-3 times a year, deciduous
forest follows a leaf-out / leaf-fall cycle. Days are integers: days since 1970-01-01.

With ``rotation``, cropland rotates, as it does in real farming: most arable parcels alternate winter and
summer crops (a two-year rotation, or winter-winter-summer), a few keep one crop every year (:func:`rotations`).
A winter crop is sown in the autumn before its year, after the previous summer crop's harvest, so a
field's key dates and its green curve depend on this year's crop and the next one's; grassland is
permanent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fields import logistic, stream
from .landscape import CROP_SUMMER, CROP_WINTER, GRASSLAND, Landscape
from .weather import Weather

MAX_CUTS = 3


@dataclass
class Phenology:
    """Per-parcel, per-year key dates (days since epoch), arrays ``(n_years, n_parcels)``.

    ``klass``: land-cover code of each parcel in each year (crops rotate, :func:`rotations`);
    ``green``/``senesc``: mid-points of green-up and senescence; ``harvest`` (crops); ``sow``
    (spring sowing of summer crops); ``autumn_sow``: autumn sowing of next year's winter crop (-1 when
    next year's crop is not a winter crop); ``base``/``floor``: winter cover and the cover left at
    senescence of this year's crop; ``mow`` ``(n_years, n_parcels, MAX_CUTS)`` mowing days of
    grassland (-1 when absent). ``forest_green``/``forest_fall``
    ``(n_years,)``; ``stress`` ``(n_days,)`` water stress; ``swe`` ``(n_days,)`` snow, mm.
    """

    first_year: int
    klass: np.ndarray  # (n_years, n_parcels) land-cover code of each parcel's crop in each year
    green: np.ndarray
    senesc: np.ndarray
    harvest: np.ndarray
    sow: np.ndarray
    autumn_sow: np.ndarray
    mow: np.ndarray
    peak: np.ndarray
    base: np.ndarray
    floor: np.ndarray
    winter_base: np.ndarray  # (n_parcels,) cover a winter crop reaches before winter
    forest_green: np.ndarray
    forest_fall: np.ndarray
    stress: np.ndarray
    swe: np.ndarray
    day0: int
    seed: int

    def _year(self, day: int) -> int:
        y = int(np.datetime64(int(day), "D").astype("datetime64[Y]").astype(int)) + 1970 - self.first_year
        return int(np.clip(y, 0, self.green.shape[0] - 1))

    def leaf(self, day: int) -> float:
        """Deciduous leaf index in [0, 1] at ``day``."""
        y = self._year(day)
        return float(logistic((day - self.forest_green[y]) / 6.0) - logistic((day - self.forest_fall[y]) / 9.0))

    def stress_at(self, day: int) -> float:
        """Water-stress index in [0, 1] at ``day``."""
        return float(self.stress[int(np.clip(day - self.day0, 0, self.stress.size - 1))])

    def snow_at(self, day: int) -> float:
        """Snow water equivalent (mm) at ``day``."""
        return float(self.swe[int(np.clip(day - self.day0, 0, self.swe.size - 1))])

    def class_at(self, day: int) -> np.ndarray:
        """Land-cover code of every parcel's crop in the year of ``day``: uint8 ``(n_parcels,)``."""
        return self.klass[self._year(day)]

    def parcel_cover(self, day: int) -> np.ndarray:
        """Green cover fraction of every parcel at ``day``: float32 ``(n_parcels,)`` in [0, 1]."""
        y = self._year(day)
        t = np.float32(day)
        g, s, h, w, a = self.green[y], self.senesc[y], self.harvest[y], self.sow[y], self.autumn_sow[y]
        pk, b, fl = self.peak[y], self.base[y], self.floor[y]
        # After this year's harvest: stubble, then bare soil, or next year's winter crop sown at a.
        stubble = 0.03 + 0.08 * (1.0 - np.exp(-np.maximum(t - h, 0) / 25.0)) * (t < h + 35)
        emerg = self.winter_base * np.clip(1.0 - np.exp(-np.maximum(t - a - 10.0, 0) / 18.0), 0, 1)
        sown = (a >= 0) & (t >= a)  # next year's winter crop is in the ground
        after = np.where(sown, np.maximum(np.float32(0.03), emerg), stubble)
        # Winter crop: emerged in autumn (base), green-up, senescence, harvest.
        season = b + (pk - b) * logistic((t - g) / 7.0) - (pk - fl) * logistic((t - s) / 8.0)
        winter = np.where(t < h, season, after)
        # Summer crop: bare until sowing (w), green-up, senescence, harvest.
        grow = 0.03 + (pk - 0.03) * logistic((t - g) / 8.0) - (pk - fl) * logistic((t - s) / 9.0)
        summer = np.where(t < w, 0.03, np.where(t < h, grow, np.where(sown, after, np.float32(0.04))))
        # Grassland: seasonal curve, mown on the mow dates with regrowth over a few weeks.
        curve = b + (pk - b) * (logistic((t - g) / 10.0) - logistic((t - s) / 15.0))
        cuts = self.mow[y]
        last = np.max(np.where((cuts >= 0) & (cuts <= t), cuts, -1), axis=1)
        regrow = 0.15 + (curve - 0.15) * (1.0 - np.exp(-(t - last) / 18.0))
        grass = np.where(last >= 0, np.minimum(curve, regrow), curve)
        k = self.klass[y]
        cover = np.where(k == CROP_WINTER, winter, np.where(k == CROP_SUMMER, summer, grass))
        cover = cover * (1.0 - 0.1 * self.stress_at(day))
        rng = stream(self.seed, "phenology", day)
        cover = cover + rng.normal(0.0, 0.015, cover.size)
        return np.clip(cover, 0.0, 1.0).astype(np.float32)

    def normal_change(self, first: int, last: int) -> list[tuple[str, int, int]]:
        """Harvest and mowing events inside ``[first, last]``: ``(type, parcel, day)``."""
        out: list[tuple[str, int, int]] = []
        for y in range(self.green.shape[0]):
            k = self.klass[y]
            for p in np.nonzero((k == CROP_WINTER) | (k == CROP_SUMMER))[0]:
                if first <= self.harvest[y, p] <= last:
                    out.append(("harvest", int(p), int(self.harvest[y, p])))
            for p in np.nonzero(k == GRASSLAND)[0]:
                for d in self.mow[y, p]:
                    if d >= 0 and first <= d <= last:
                        out.append(("mowing", int(p), int(d)))
        return out


def _cross(gdd_year: np.ndarray, thr: np.ndarray, start: int) -> np.ndarray:
    """Absolute day at which the cumulative ``gdd_year`` first reaches each threshold."""
    idx = np.searchsorted(gdd_year, thr)
    return start + np.minimum(idx, gdd_year.size - 1)


def make_phenology(land: Landscape, weather: Weather, seed: int, rotation: bool = False) -> Phenology:
    """Draw per-parcel phenology parameters and derive the key dates of every year from the weather.

    ``rotation``: arable parcels rotate their crops (:func:`rotations`); without, every parcel grows the
    landscape's crop every year."""
    rng = stream(seed, "phenology")
    n = land.n_parcels
    gdd = weather.gdd()
    years = weather.days.astype("datetime64[Y]").astype(int) + 1970
    first_year = int(years[0])
    ny = int(years[-1]) - first_year + 1
    # one year more: the autumn sowing looks ahead
    crops = (rotations(land.parcel_class, ny + 1, seed) if rotation
             else np.repeat(land.parcel_class[None], ny + 1, axis=0))
    shp = (ny, n)
    green, senesc, harvest, sow, autumn_sow = (np.zeros(shp, np.int64) for _ in range(5))
    mow = np.full((ny, n, MAX_CUTS), -1, np.int64)
    peak, base, floor = (np.zeros(shp, np.float32) for _ in range(3))
    fgreen, ffall = np.zeros(ny, np.int64), np.zeros(ny, np.int64)
    winter_base = rng.uniform(0.18, 0.3, n).astype(np.float32)
    grass_base = rng.uniform(0.35, 0.5, n).astype(np.float32)
    winter_floor = rng.uniform(0.3, 0.4, n).astype(np.float32)
    other_floor = rng.uniform(0.35, 0.5, n).astype(np.float32)
    p_offset = rng.normal(0, 1, n)  # a parcel tends to be early or late every year (sowing habits)
    for yi in range(ny):
        wheat, maize, grass = crops[yi] == CROP_WINTER, crops[yi] == CROP_SUMMER, crops[yi] == GRASSLAND
        base[yi] = np.where(wheat, winter_base, np.where(maize, np.float32(0.03), grass_base))
        floor[yi] = np.where(wheat, winter_floor, other_floor)
        m = years == first_year + yi
        g = gdd[m]
        y0 = int(weather.days[m][0].astype(np.int64))
        j = rng.normal(0, 1, n) * 0.6 + p_offset * 0.8
        gr = np.where(wheat, _cross(g, 300 * (1 + 0.08 * j), y0),
                      np.where(maize, _cross(g, 1150 * (1 + 0.04 * j), y0), _cross(g, 250 * (1 + 0.1 * j), y0)))
        se = np.where(wheat, _cross(g, 1250 * (1 + 0.04 * j), y0),
                      np.where(maize, _cross(g, 2500 * (1 + 0.03 * j), y0),
                               y0 + 290 + rng.integers(0, 20, n)))
        ha = np.where(wheat, _cross(g, 1700 + 50 * j, y0), _cross(g, 3000 + 100 * j, y0))
        # Agronomic bounds on the calendar (day of year), whatever the weather.
        se = np.where(maize, np.clip(se, y0 + 228, y0 + 265), se)
        ha = np.where(maize, np.clip(ha, y0 + 255, y0 + 300 + rng.integers(0, 10, n)),
                      np.where(wheat, np.clip(ha, y0 + 182, y0 + 225), ha))
        ha = np.maximum(ha, se + np.where(wheat, 14, 20))
        so = _cross(g, 600 * (1 + 0.08 * j), y0)
        gr = np.where(maize, np.maximum(gr, so + 30), gr)
        # Next year's winter crop is sown in late September-October, after this year's harvest.
        au = np.maximum(y0 + 268 + rng.integers(0, 28, n), np.where(wheat | maize, ha + 10, 0))
        autumn_sow[yi] = np.where(crops[yi + 1] == CROP_WINTER, au, -1)
        green[yi], senesc[yi], harvest[yi], sow[yi] = gr, se, ha, so
        peak[yi] = np.clip(rng.uniform(0.85, 0.97, n) * rng.uniform(0.96, 1.02), 0, 0.98)
        first_cut = _cross(g, 850 + 70 * rng.normal(0, 1, n), y0)
        ncut = np.where(rng.random(n) < 0.5, 2, 3)
        cut = first_cut.copy()
        for k in range(MAX_CUTS):
            ok = grass & (k < ncut) & (cut < y0 + 275)
            mow[yi, :, k] = np.where(ok, cut, -1)
            cut = cut + rng.integers(38, 56, n)
        fgreen[yi] = _cross(g, np.array([450.0]), y0)[0]
        ffall[yi] = y0 + 292 + int(rng.integers(0, 10))
    return Phenology(first_year, crops[:ny], green, senesc, harvest, sow, autumn_sow, mow, peak, base, floor,
                     winter_base, fgreen, ffall, weather.water_stress(), weather.snow_water(), weather.day0, seed)


# Crop rotation: the share of arable parcels on each rotation. Most alternate a winter and a summer crop
# (e.g. wheat - maize), some grow two winter crops before a summer one (wheat - barley - maize), a few keep
# one crop every year (monoculture, common for maize).
ROTATIONS = {"monoculture": 0.15, "winter-summer": 0.55, "winter-winter-summer": 0.30}


def rotations(parcel_class: np.ndarray, n_years: int, seed: int) -> np.ndarray:
    """Crop of every parcel in each of ``n_years`` years: uint8 ``(n_years, n_parcels)`` land-cover codes.

    Year 0 is ``parcel_class`` (the landscape's map); arable parcels then follow their rotation
    (:data:`ROTATIONS`), grassland and other classes stay what they are.
    """
    rng = stream(seed, "rotation")
    n = parcel_class.size
    u = rng.random(n)
    pos = rng.integers(0, 2, n)  # where in winter-winter-summer a winter-crop parcel starts
    arable = (parcel_class == CROP_WINTER) | (parcel_class == CROP_SUMMER)
    out = np.empty((n_years, n), np.uint8)
    cycle3 = np.array([CROP_WINTER, CROP_WINTER, CROP_SUMMER], np.uint8)
    start3 = np.where(parcel_class == CROP_WINTER, pos, 2)
    other = np.where(parcel_class == CROP_WINTER, CROP_SUMMER, CROP_WINTER).astype(np.uint8)
    mono, alt = ROTATIONS["monoculture"], ROTATIONS["monoculture"] + ROTATIONS["winter-summer"]
    for y in range(n_years):
        two = parcel_class if y % 2 == 0 else other
        three = cycle3[(start3 + y) % 3]
        crop = np.where(u < mono, parcel_class, np.where(u < alt, two, three))
        out[y] = np.where(arable, crop, parcel_class)
    return out
