"""Trends over a long run, as pure logic: robust slopes (Theil-Sen, with Sen's confidence range),
a band of a server's own steady windows (median and MAD), and the two judgements built on them:
a leak (a resource that keeps growing under steady load) and an excursion (a window outside the
band). Nothing here knows what is measured; probe/stability.py says which series and which
floors (the noise each tolerates).

Why these estimators: a slope through the scrapes of an hours-long run must not follow a few
odd samples (a burst of calls, a garbage collection, a restart's first seconds); Theil-Sen is
the median of every pairwise slope, so up to 29 % of the points can be anywhere. A band from
the median and the median absolute deviation is as robust: half the windows can be outliers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: at most this many points go into a slope (evenly subsampled): 400 points are 80,000
#: pairs, a few milliseconds of numpy (a soak judges every server at every window)
MAX_POINTS = 400
#: the confidence of a slope's range (Sen 1968: from the distribution of Kendall's S)
Z_95 = 1.96
#: sigma of a normal sample from its median absolute deviation
MAD_SIGMA = 1.4826


@dataclass(frozen=True)
class Slope:
    """A Theil-Sen slope (units of y per unit of x) and its 95 % confidence range."""

    slope: float
    low: float
    high: float
    n: int  #: points used
    span: float  #: x covered, last - first

    @property
    def growth(self) -> float:
        """What the slope adds up to over the span."""
        return self.slope * self.span


def _thin(xs: Sequence[float], ys: Sequence[float], most: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) > most:
        pick = np.linspace(0, len(x) - 1, most).round().astype(int)
        x, y = x[pick], y[pick]
    return x, y


def theil_sen(xs: Sequence[float], ys: Sequence[float], most: int = MAX_POINTS) -> Slope | None:
    """The median of the slopes of every pair of points with different x, and Sen's 95 %
    range (the slopes at ranks (N ∓ C)/2, C = z·sqrt(Var S)); None with fewer than 3 points."""
    x, y = _thin(xs, ys, most)
    if len(x) < 3:
        return None
    i, j = np.triu_indices(len(x), 1)
    dx = x[j] - x[i]
    usable = dx != 0
    slopes = np.sort((y[j] - y[i])[usable] / dx[usable])
    count = len(slopes)
    if count == 0:
        return None
    n = len(x)
    c = Z_95 * math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    lo = max(0, math.floor((count - c) / 2))
    hi = min(count - 1, math.ceil((count + c) / 2))
    return Slope(float(np.median(slopes)), float(slopes[lo]), float(slopes[hi]), n,
                 float(x.max() - x.min()))


@dataclass(frozen=True)
class Band:
    """Where a series usually is: its median and a robust spread (MAD scaled to sigma)."""

    median: float
    sigma: float
    n: int

    def upper(self, k: float, floor: float) -> float:
        """The top of the band: the median plus ``k`` sigmas, or plus ``floor`` if more (the
        smallest excursion that counts, whatever the series' own noise)."""
        return self.median + max(k * self.sigma, floor)


def band(values: Sequence[float | None]) -> Band | None:
    """The band of the values given (None and NaN left out); None when there are none."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return None
    median = float(np.median(v))
    return Band(median, MAD_SIGMA * float(np.median(np.abs(v - median))), len(v))


@dataclass(frozen=True)
class Growth:
    """A resource's trend after warm-up, and whether it is a leak (see :func:`leak`)."""

    slope: Slope
    first_half: Slope | None
    second_half: Slope | None
    leaking: bool
    why: str  #: why it is (or is not) taken for a leak, in words

    def per_hour(self) -> float:
        return self.slope.slope * 3600


def leak(ts: Sequence[float], values: Sequence[float], min_growth: float,
         persist: float = 0.5, most: int = MAX_POINTS) -> Growth | None:
    """Is this resource (sampled at times ``ts``, seconds) leaking? A leak is growth that is

    - real: the slope's 95 % range is above zero;
    - big enough to tell from noise: over the span it adds up to ``min_growth`` at least (what
      the resource moves by anyway: an allocator's arena, a task or a socket more or less);
    - kept up: the slope of the second half of the samples is at least ``persist`` of the
      whole's (warm-up grows fast, then flattens: its second half is flat; a leak is not).

    ``most``: the points it is judged on (fewer: quicker, a wider range). None with too few
    samples (fewer than 6)."""
    whole = theil_sen(ts, values, most)
    if whole is None or whole.n < 6:
        return None
    x, y = _thin(ts, values, most)
    half = len(x) // 2
    first, second = theil_sen(x[:half], y[:half]), theil_sen(x[half:], y[half:])
    if whole.low <= 0:
        return Growth(whole, first, second, False, "no growth beyond noise (the slope's 95 % "
                      "range includes zero)")
    if whole.growth < min_growth:
        return Growth(whole, first, second, False, f"grew {whole.growth:.3g} over the span, "
                      f"less than the {min_growth:.3g} its noise allows")
    if second is None or second.slope < persist * whole.slope:
        return Growth(whole, first, second, False, "growth flattened out (warm-up: the "
                      "second half's slope is under half the whole's)")
    return Growth(whole, first, second, True, "grows steadily")


def outside(values: Sequence[float | None], k: float, floor: float,
            reference: Sequence[bool] | None = None) -> tuple[Band | None, list[bool]]:
    """Which values are above their band (k sigmas or ``floor`` over the median, whichever is
    more). The band is taken from the values that ``reference`` marks (all, by default): the
    windows that count as steady."""
    chosen = [v for v, ok in zip(values, reference or [True] * len(values), strict=True)
              if ok]
    found = band(chosen)
    if found is None:
        return None, [False] * len(values)
    top = found.upper(k, floor)
    return found, [v is not None and not math.isnan(v) and v > top for v in values]
