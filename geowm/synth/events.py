"""Disturbances with ground truth: clear-cut, fire, flood, drought, crop failure; plus normal change records.

An :class:`Event` holds the flat pixel indices it affects and its timing (days since 1970-01-01);
:func:`apply_cover` and :func:`apply_reflectance` alter one acquisition's surface in place.
Counts scale with area and duration; ``force`` guarantees at least one of each anomaly type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .fields import smooth_field, stream
from .landscape import (
    CHAR,
    CLASSES,
    CROP_SUMMER,
    CROP_WINTER,
    FOREST,
    GRASSLAND,
    SLASH,
    SOIL,
    TURBID_WATER,
    VEG_GRASS,
    WET_SOIL,
    Landscape,
)
from .weather import Weather, add_heavy_rain

ANOMALY_TYPES = ("clearcut", "fire", "flood", "drought", "crop_failure")
# Crop failure (hail, pests, waterlogging, a failed emergence): one field's crop collapses in its growing season
# to (1 - severity) of its green cover over CROP_FAILURE_RAMP_DAYS, while the fields around it grow normally,
# and stays so until the field's harvest. CROP_FAILURE_RATE: failures per crop field and year.
CROP_FAILURE_RATE = 0.01
CROP_FAILURE_RAMP_DAYS = 10
CROP_FAILURE_MIN_PX = 150  # fields smaller than 1.5 ha are not drawn (below what an alert can map)


@dataclass
class Event:
    """One disturbance or normal-change event.

    Attributes:
        id: unique integer id.
        type: one of clearcut, fire, flood, drought, crop_failure, harvest, mowing.
        start, end: first and last day of the abrupt/anomalous phase (days since 1970-01-01).
        idx: int64 flat indices of the affected pixels (empty for harvest/mowing: see ``parcel``).
        severity: float32 per-pixel severity in [0, 1] (same length as ``idx``).
        land_cover: dominant land-cover name before the event.
        parcel: parcel index for harvest/mowing, -1 otherwise.
    """

    id: int
    type: str
    start: int
    end: int
    idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    severity: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    land_cover: str = ""
    parcel: int = -1

    @property
    def anomaly(self) -> bool:
        return self.type in ANOMALY_TYPES


def _dominant(land: Landscape, idx: np.ndarray) -> str:
    codes = np.bincount(land.landcover.ravel()[idx], minlength=8)
    return CLASSES.get(int(codes.argmax()), "unknown")


def _count(rng: np.random.Generator, rate: float, force: bool) -> int:
    n = int(rng.poisson(rate))
    return max(n, 1) if force else n


def _pick(rng: np.random.Generator, mask: np.ndarray, weight: np.ndarray | None = None) -> tuple[int, int] | None:
    cand = np.flatnonzero(mask)
    if cand.size == 0:
        return None
    p = None
    if weight is not None:
        w = weight.ravel()[cand].astype(np.float64)
        p = w / w.sum() if w.sum() > 0 else None
    k = int(rng.choice(cand, p=p))
    return divmod(k, mask.shape[1])


def _window(c: tuple[int, int], rad: int, size: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Slices of a square window of half-side ``rad`` around pixel ``c`` and its local row/col offsets."""
    y0, y1 = max(0, c[0] - rad), min(size, c[0] + rad + 1)
    x0, x1 = max(0, c[1] - rad), min(size, c[1] + rad + 1)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    return (slice(y0, y1), slice(x0, x1)), yy - c[0], xx - c[1]


def _flat(win: tuple[slice, slice], local: np.ndarray, size: int) -> np.ndarray:
    """Flat (row-major, ascending) image indices of the True pixels of a window mask."""
    ly, lx = np.nonzero(local)
    return ((ly + win[0].start) * size + (lx + win[1].start)).astype(np.int64)


def plan_events(land: Landscape, weather: Weather, acq_days: np.ndarray, first: int, last: int, seed: int,
                force: bool) -> tuple[list[Event], list[int]]:
    """Place disturbances in space and time.

    Args:
        land: the landscape.
        weather: daily weather; heavy rain is added before each flood (modified in place).
        acq_days: acquisition days (days since epoch), sorted.
        first, last: record period, days since epoch.
        seed: random seed.
        force: guarantee at least one event of each anomaly type placed here (crop failures:
            :func:`plan_crop_failures`).

    Returns:
        ``(events, clear_acquisitions)``: the events (ids 0: the caller orders and numbers all events) and
        indices of acquisitions that must be (nearly) cloud-free so that a flood is observable.
    """
    rng = stream(seed, "events")
    size = land.grid.size
    shape = (size, size)
    lc = land.landcover
    years = max((last - first + 1) / 365.25, 0.05)
    area = land.grid.area_km2
    occupied = np.zeros(shape, bool)
    events: list[Event] = []
    span = last - first

    def when(lo_frac: float = 0.15, hi_frac: float = 0.85, summer: bool = False) -> int:
        lo, hi = first + int(lo_frac * span), first + max(int(hi_frac * span), int(lo_frac * span) + 1)
        if summer:
            days = np.arange(lo, hi)
            month = (days.astype("datetime64[D]").astype("datetime64[M]").astype(int) % 12) + 1
            days = days[(month >= 6) & (month <= 9)]
            if days.size:
                return int(rng.choice(days))
        return int(rng.integers(lo, hi))

    forest = lc == FOREST
    interior = ndimage.distance_transform_edt(forest) >= 4 if forest.any() else forest
    for _ in range(_count(rng, 0.35 * area * forest.mean() * years, force)):
        for _try in range(20):
            c = _pick(rng, interior & ~occupied, (1.0 - land.decid) ** 2 + 0.02)
            if c is None:
                break
            a, b, th = rng.uniform(6, 16), rng.uniform(4, 10), rng.uniform(0, np.pi)
            win, dy, dx = _window(c, int(np.hypot(a, b)) + 2, size)
            u = dx * np.cos(th) + dy * np.sin(th)
            v = -dx * np.sin(th) + dy * np.cos(th)
            local = (np.abs(u) <= a) & (np.abs(v) <= b) & forest[win] & ~occupied[win]
            if local.sum() >= 40:
                occupied[win] |= ndimage.binary_dilation(local, iterations=3)
                idx = _flat(win, local, size)
                events.append(Event(0, "clearcut", when(), last, idx, np.ones(idx.size, np.float32),
                                    "forest"))
                break

    burnable = forest | (lc == GRASSLAND)
    for _ in range(_count(rng, 0.02 * area * years, force)):
        for _try in range(20):
            c = _pick(rng, forest & ~occupied) or _pick(rng, burnable & ~occupied)
            if c is None:
                break
            r = rng.uniform(8, 28)
            win, dy, dx = _window(c, int(1.5 * r) + 2, size)
            sub = smooth_field(rng, (dy.shape[0], dx.shape[1]), r / 3.0)
            local = (np.hypot(dy, dx) / r + 0.3 * sub < 1.0) & burnable[win] & ~occupied[win]
            lab, _ = ndimage.label(local)
            centre = lab[c[0] - win[0].start, c[1] - win[1].start]
            if centre > 0:
                local = lab == centre
            if local.sum() >= 30:
                occupied[win] |= ndimage.binary_dilation(local, iterations=3)
                idx = _flat(win, local, size)
                sev = np.clip(0.9 + 0.1 * sub[local], 0.7, 1.0).astype(np.float32)
                events.append(Event(0, "fire", when(summer=True), last, idx, sev, _dominant(land, idx)))
                break

    clear: list[int] = []
    agri = (lc == CROP_WINTER) | (lc == CROP_SUMMER) | (lc == GRASSLAND)
    droughts = weather.droughts
    for _ in range(_count(rng, 0.02 * area * years, force)):
        for _try in range(15):
            ev = _flood(rng, land, weather, acq_days, first, last, agri & ~occupied, clear, seed)
            if ev is not None:
                occupied.ravel()[ev[0].idx] = True
                events.append(ev[0])
                clear.append(ev[1])
                break

    for a, b in droughts:
        blob = smooth_field(rng, shape, max(size / 6.0, 16.0)) + 0.5 * land.dry_soil
        region = blob > np.quantile(blob, 0.7)
        lab, nlab = ndimage.label(region)
        if nlab:
            region = lab == (np.bincount(lab.ravel())[1:].argmax() + 1)
        mask = region & agri
        if mask.sum() < 50:
            continue
        idx = np.flatnonzero(mask)
        sev = np.clip(0.62 + 0.08 * land.dry_soil.ravel()[idx], 0.45, 0.8).astype(np.float32)
        events.append(Event(0, "drought", a, b, idx, sev, _dominant(land, idx)))
    return events, clear


def _flood(rng: np.random.Generator, land: Landscape, weather: Weather, acq_days: np.ndarray, first: int,
           last: int, free: np.ndarray, taken: list[int], seed: int) -> tuple[Event, int] | None:
    """Try to place one flood: farmland next to water, after a heavy-rain episode."""
    size = land.grid.size
    c = _pick(rng, free & (land.dist_water <= 2))
    if c is None:
        return None
    radius = rng.uniform(30, 80)
    win, dy, dx = _window(c, int(radius) + 1, size)
    sub = smooth_field(rng, (dy.shape[0], dx.shape[1]), 6.0)
    local = free[win] & (land.dist_water[win] + 5.0 * sub < rng.uniform(8, 20)) & (np.hypot(dy, dx) < radius)
    if local.sum() < 20:
        return None
    span = last - first
    cands = [i for i, d in enumerate(acq_days) if first + 0.1 * span <= d <= last - 0.1 * span
             and not any(a - 20 <= d <= b + 20 for a, b in weather.droughts) and i not in taken]
    if not cands:
        return None
    pmean = weather.p_mean
    wgt = np.array([pmean[max(weather.index(int(acq_days[i])) - 10, 0):weather.index(int(acq_days[i]))].sum()
                    + 5.0 for i in cands])
    i = int(rng.choice(cands, p=wgt / wgt.sum()))
    start = int(acq_days[i]) - int(rng.integers(1, 4))
    end = start + int(rng.integers(7, 29))
    add_heavy_rain(weather, start, seed)
    idx = _flat(win, local, size)
    return Event(0, "flood", start, end, idx, np.ones(idx.size, np.float32), _dominant(land, idx)), i


def plan_crop_failures(land: Landscape, pheno, events: list[Event], first: int, last: int, seed: int,
                       force: bool) -> list[Event]:
    """Place crop failures: whole crop fields, in one growing season each, away from the other events.

    A failure starts between 20 days before the field's green-up and 15 days before its senescence (a failed
    emergence or a collapse of the grown crop), in the middle 70 % of the record like the other disturbances,
    and ends at the field's harvest (or the record's end). Drawn from their own random stream, so the other
    events and the fields around them are those of a record without crop failures.

    Args:
        land: the landscape.
        pheno: the fields' phenology (:class:`geowm.synth.phenology.Phenology`): crop and key dates per year.
        events: the other events; their pixels are not used.
        first, last: record period, days since epoch.
        seed: random seed.
        force: guarantee at least one crop failure where a field allows it.

    Returns:
        The crop failures (ids 0: the caller numbers all events).
    """
    rng = stream(seed, "crop_failure")
    size = land.grid.size
    taken = np.zeros(size * size, bool)
    for e in events:
        taken[e.idx] = True
    parcel = land.parcel.ravel()
    hit = np.zeros(land.n_parcels, bool)
    hit[np.unique(parcel[taken & (parcel >= 0)])] = True
    span = last - first
    lo, hi = first + int(0.15 * span), first + int(0.85 * span)
    cands = []  # (year index, parcel, earliest start, latest start)
    for y in range(pheno.green.shape[0]):
        k = pheno.klass[y]
        crop = ((k == CROP_WINTER) | (k == CROP_SUMMER)) & (land.parcel_size >= CROP_FAILURE_MIN_PX) & ~hit
        for p in np.flatnonzero(crop):
            a, b = int(pheno.green[y, p]) - 20, int(pheno.senesc[y, p]) - 15
            if b > a and lo <= a and b <= hi:
                cands.append((y, int(p), a, b))
    if not cands:
        return []
    n = min(_count(rng, CROP_FAILURE_RATE * len(cands), force), len(cands))  # a rate per field and season
    out: list[Event] = []
    used: set[int] = set()
    for j in rng.permutation(len(cands)):
        if len(out) == n:
            break
        y, p, a, b = cands[j]
        if p in used:  # one failure per field
            continue
        used.add(p)
        idx = np.flatnonzero(parcel == p)
        start = int(rng.integers(a, b))
        end = min(int(pheno.harvest[y, p]), last)
        sev = np.full(idx.size, rng.uniform(0.6, 0.85), np.float32)
        out.append(Event(0, "crop_failure", start, end, idx, sev, CLASSES[int(pheno.klass[y, p])]))
    return out


def apply_cover(events: list[Event], day: int, cover: np.ndarray) -> None:
    """Scale the green cover (flat float32 ``(H*W,)``) of drought, failed-crop and post-flood pixels at ``day``."""
    for e in events:
        if day < e.start:
            continue
        if e.type == "drought":
            if day <= e.end:
                r = (day - e.start) / max(e.end - e.start, 1)
            else:
                r = float(np.exp(-(day - e.end) / 25.0))
            cover[e.idx] *= 1.0 - e.severity * np.float32(r)
        elif e.type == "crop_failure" and day <= e.end:
            r = min(1.0, (day - e.start) / CROP_FAILURE_RAMP_DAYS)
            cover[e.idx] *= 1.0 - e.severity * np.float32(r)
        elif e.type == "flood" and day > e.end:
            cover[e.idx] *= 1.0 - 0.5 * np.float32(np.exp(-(day - e.end) / 30.0))


def apply_reflectance(events: list[Event], day: int, leaf: float, cover: np.ndarray, soil: np.ndarray,
                      veg: np.ndarray, refl: np.ndarray, water: np.ndarray) -> None:
    """Overwrite the surface reflectance of clear-cut, burnt and flooded pixels at ``day``.

    Args:
        events: the events.
        day: days since epoch.
        leaf: herbaceous/deciduous leaf index in [0, 1] at ``day``.
        cover: flat float32 ``(H*W,)`` green cover before the event.
        soil, veg: flat float32 ``(4, H*W)`` endmember spectra of the pixels.
        refl: flat float32 ``(4, H*W)`` surface reflectance, modified in place.
        water: flat bool ``(H*W,)`` set True where the surface is open water (flood).
    """
    for e in events:
        if day < e.start or e.type in ("drought", "crop_failure", "harvest", "mowing"):
            continue
        dt = float(day - e.start)
        i = e.idx
        if e.type == "clearcut":
            fc = np.float32(min(0.55, 0.04 + 0.2 * dt / 365.0) * (0.4 + 0.6 * leaf))
            refl[:, i] = (SLASH + fc * (VEG_GRASS - SLASH))[:, None]
        elif e.type == "fire":
            a = np.float32(min(1.0, dt / 540.0))
            s = (CHAR * (1 - a) + SOIL * a)[:, None]
            regrow = np.float32(min(0.5, 0.15 * dt / 365.0) * (0.4 + 0.6 * leaf))
            fc = cover[i] * (1.0 - e.severity) * 0.5 + e.severity * regrow
            v = veg[:, i] * 0.5 + VEG_GRASS[:, None] * 0.5
            refl[:, i] = s + fc * (v - s)
        elif e.type == "flood":
            if day <= e.end:
                refl[:, i] = TURBID_WATER[:, None] * (0.9 + 0.2 * e.severity)
                water[i] = True
            else:
                w = np.float32(np.exp(-(day - e.end) / 30.0))
                s = soil[:, i] * (1 - w) + WET_SOIL[:, None] * w
                refl[:, i] = s + cover[i] * (veg[:, i] - s)

