"""Daily weather drivers on a coarse grid: temperature, precipitation, snow, water stress, cloudiness.

The series spans whole calendar years (1 January of the start year to 31 December of the end year)
so that growing-degree days can be accumulated from 1 January; :mod:`geowm.synth.writer` trims it
to the requested period when writing ``weather.zarr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .fields import stream

LATITUDE = 48.7  # degrees north, centre of the default UTM 33N grid


@dataclass
class Weather:
    """Daily weather.

    Attributes:
        days: datetime64[D] ``(n_days,)``.
        x, y: cell-centre coordinates, metres ``(nx,)`` and ``(ny,)`` (y decreasing).
        temperature: float32 ``(n_days, ny, nx)`` daily mean 2 m temperature, degC.
        precipitation: float32 ``(n_days, ny, nx)`` daily precipitation, mm/day.
        cell_m: cell side, metres.
        droughts: imposed dry spells, ``(first_day, last_day)`` as days since 1970-01-01.
    """

    days: np.ndarray
    x: np.ndarray
    y: np.ndarray
    temperature: np.ndarray
    precipitation: np.ndarray
    cell_m: float
    droughts: list[tuple[int, int]] = field(default_factory=list)

    @property
    def day0(self) -> int:
        """Day number (days since 1970-01-01) of ``days[0]``."""
        return int(self.days[0].astype(np.int64))

    def index(self, day: int) -> int:
        """Index into ``days`` of an absolute day number (clipped to the series)."""
        return int(np.clip(day - self.day0, 0, self.days.size - 1))

    @property
    def t_mean(self) -> np.ndarray:
        """Domain-mean temperature, degC ``(n_days,)``."""
        return self.temperature.mean(axis=(1, 2))

    @property
    def p_mean(self) -> np.ndarray:
        """Domain-mean precipitation, mm/day ``(n_days,)``."""
        return self.precipitation.mean(axis=(1, 2))

    def snow_water(self) -> np.ndarray:
        """Snow water equivalent, mm ``(n_days,)``, from a degree-day snow model on domain means."""
        t, p = self.t_mean, self.p_mean
        swe = np.zeros(t.size, np.float32)
        acc = 0.0
        for i in range(t.size):
            if t[i] < 0.5:
                acc += float(p[i])
            acc = max(0.0, acc - 3.0 * max(0.0, float(t[i]) - 0.5))
            swe[i] = acc
        return swe

    def water_stress(self) -> np.ndarray:
        """Water-stress index in [0, 1] ``(n_days,)``: 1 - (35-day mean precipitation / demand)."""
        p35 = ndimage.uniform_filter1d(self.p_mean, 35, origin=17, mode="nearest")
        demand = np.maximum(0.5, 0.2 * self.t_mean + 0.6)
        return np.clip(1.0 - p35 / demand, 0.0, 1.0).astype(np.float32)

    def cloud_latent(self, seed: int) -> np.ndarray:
        """Standard-normal-ish daily cloudiness index ``(n_days,)``, persistent and linked to rain."""
        rng = stream(seed, "weather", 99)
        n = self.days.size
        wet = (self.p_mean > 0.5).astype(np.float32)
        ar = np.zeros(n, np.float32)
        eps = rng.standard_normal(n).astype(np.float32)
        for i in range(1, n):
            ar[i] = 0.88 * ar[i - 1] + 0.475 * eps[i]
        doy = _doy(self.days)
        season = 0.5 * np.cos(2 * np.pi * (doy - 15) / 365.25)
        wet_prev = np.concatenate([[0.0], wet[:-1]])
        heat = np.clip(self.t_mean - _t_clim(doy), 0, None) * 0.1
        return (ar + 1.3 * wet + 0.5 * wet_prev + season - heat).astype(np.float32)

    def gdd(self, base: float = 0.0) -> np.ndarray:
        """Growing-degree days accumulated from 1 January of each year, degC day ``(n_days,)``."""
        t = np.maximum(self.t_mean - base, 0.0)
        years = self.days.astype("datetime64[Y]")
        out = np.empty_like(t)
        for y in np.unique(years):
            m = years == y
            out[m] = np.cumsum(t[m])
        return out


def _doy(days: np.ndarray) -> np.ndarray:
    return (days - days.astype("datetime64[Y]")).astype(np.int64) + 1


def _t_clim(doy: np.ndarray) -> np.ndarray:
    """Climatological daily temperature, degC (mid-European)."""
    return 9.0 + 10.5 * np.sin(2 * np.pi * (doy - 105) / 365.25)


def plan_droughts(seed: int, start: np.datetime64, end: np.datetime64, force: bool) -> list[tuple[int, int]]:
    """Choose late-spring dry spells as absolute day numbers ``(first, last)``, inside [start, end].

    A spell starts between 10 May and 4 June (later if the record starts later, at the latest 10
    August) and lasts 5-8 weeks; each year that fits one gets one with probability 0.4; with
    ``force`` at least one is guaranteed (when any year qualifies).
    """
    rng = stream(seed, "weather", 7)
    s, e = int(start.astype(np.int64)), int(end.astype(np.int64))
    out: list[tuple[int, int]] = []
    candidates = []
    for year in range(int(str(start)[:4]), int(str(end)[:4]) + 1):
        first = max(int(np.datetime64(f"{year}-05-10").astype(np.int64)) + int(rng.integers(0, 25)), s + 20)
        last = min(first + int(rng.integers(35, 56)), e - 20)
        if first <= int(np.datetime64(f"{year}-08-10").astype(np.int64)) and last - first >= 28:
            candidates.append((first, last))
    for c in candidates:
        if rng.random() < 0.4:
            out.append(c)
    if force and not out and candidates:
        out.append(candidates[int(rng.integers(len(candidates)))])
    return out


REGIME_DAYS = 40.0  # e-folding time of the warm/cold and wet/dry regimes, days
REGIME_T_SD = 1.0  # degC: a warm regime's temperature anomaly (one standard deviation)
REGIME_WET = 0.12  # change of the daily wet-day probability per standard deviation of the wet regime


def _regimes(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two independent standard-normal AR(1) series ``(n,)`` with an e-folding time of REGIME_DAYS."""
    rng = stream(seed, "weather", 3)
    phi = math.exp(-1.0 / REGIME_DAYS)
    eps = rng.standard_normal((2, n))
    out = np.zeros((2, n))
    out[:, 0] = eps[:, 0]
    for i in range(1, n):
        out[:, i] = phi * out[:, i - 1] + math.sqrt(1.0 - phi * phi) * eps[:, i]
    return out[0], out[1]


def make_weather(size: int, res: float, x0: float, y0: float, seed: int, first_year: int, last_year: int,
                 droughts: list[tuple[int, int]], regimes: bool = False) -> Weather:
    """Generate daily weather for whole years ``first_year .. last_year`` on >= 4 x 4 cells of <= 1 km.

    Temperature = seasonal cycle + year offset + AR(1) synoptic anomaly + static smooth cell offset;
    precipitation = Markov wet/dry occurrence x gamma amounts x smooth spatial factor. Dry spells
    (``droughts``, absolute day numbers) force zero rain and +4 degC, preceded by a drier month. With
    ``regimes``, a month-scale warm/cold regime adds to the temperature and a wet/dry one shifts the wet-day
    probability (:func:`_regimes`); without, the weather forgets in about five days.
    """
    rng = stream(seed, "weather")
    days = np.arange(np.datetime64(f"{first_year}-01-01"), np.datetime64(f"{last_year + 1}-01-01"))
    n = days.size
    ncell = max(4, math.ceil(size * res / 1000.0))
    cell = size * res / ncell
    x = (x0 + (np.arange(ncell) + 0.5) * cell).astype(np.float64)
    y = (y0 - (np.arange(ncell) + 0.5) * cell).astype(np.float64)
    doy = _doy(days)

    year_off = {yv: rng.normal(0, 0.5) for yv in range(first_year, last_year + 1)}
    yoff = np.array([year_off[int(str(d)[:4])] for d in days.astype("datetime64[Y]")])
    sd = 2.8 + 0.8 * np.cos(2 * np.pi * (doy - 15) / 365.25)
    eps = rng.standard_normal(n)
    anom = np.zeros(n)
    for i in range(1, n):
        anom[i] = 0.8 * anom[i - 1] + 0.6 * eps[i]
    ddays = days.astype(np.int64)
    block = np.zeros(n)  # blocking high during dry spells: damped anomalies, +4 degC
    for first, last in droughts:
        ramp = np.clip((ddays - first + 5) / 10.0, 0, 1) * np.clip((last + 10 - ddays) / 10.0, 0, 1)
        block = np.maximum(block, ramp)
    # Month-scale regimes (persistent circulation, soil-moisture feedback): a warm/cold and a wet/dry index,
    # each AR(1) with a REGIME_DAYS e-folding time, standard normal.
    warm, moist = _regimes(seed, n) if regimes else (np.zeros(n), np.zeros(n))
    t_dom = (_t_clim(doy) + yoff + anom * sd * (1.0 - 0.7 * block) + 4.0 * block
             + REGIME_T_SD * warm * (1.0 - block))

    wet = np.zeros(n, bool)
    u = rng.random(n)
    for i in range(1, n):
        wet[i] = u[i] < (0.65 if wet[i - 1] else 0.30) + REGIME_WET * moist[i]
    amount = rng.gamma(0.8, 5.0, n) * wet
    t_dom = t_dom - 1.2 * wet * (doy > 120) * (doy < 270)

    for first, last in droughts:
        pre = (ddays >= first - 30) & (ddays < first)
        amount[pre] *= 0.4
        amount[(ddays >= first) & (ddays <= last)] = 0.0

    offset = ndimage.gaussian_filter(rng.standard_normal((ncell, ncell)), 1.0, mode="wrap")
    offset = 0.4 * offset / max(offset.std(), 1e-6)
    t_noise = ndimage.gaussian_filter(rng.standard_normal((n, ncell, ncell)), (0, 1.0, 1.0), mode="wrap")
    temperature = t_dom[:, None, None] + offset[None] + 0.3 * t_noise
    p_noise = ndimage.gaussian_filter(rng.standard_normal((n, ncell, ncell)), (0, 1.0, 1.0), mode="wrap")
    p_noise /= max(float(p_noise.std()), 1e-6)
    precipitation = amount[:, None, None] * np.exp(0.35 * p_noise - 0.06)
    return Weather(days, x, y, temperature.astype(np.float32), precipitation.astype(np.float32), cell,
                   list(droughts))


def add_heavy_rain(weather: Weather, day: int, seed: int, n_days: int = 2) -> None:
    """Add a heavy-rain episode (25-45 mm/day over the domain) on the ``n_days`` before ``day``."""
    rng = stream(seed, "weather", 1000 + day)
    for k in range(1, n_days + 1):
        i = weather.index(day - k)
        weather.precipitation[i] = (weather.precipitation[i] + rng.uniform(25.0, 45.0)
                                    * rng.uniform(0.8, 1.2, weather.precipitation[i].shape)).astype(np.float32)
