"""Trend math (probe/trend.py): Theil-Sen slopes and their range, the robust band, and the leak
rule that tells warm-up from a leak."""

from __future__ import annotations

import math
import random

import pytest

from probe.trend import band, leak, outside, theil_sen


def test_theil_sen_finds_the_slope_through_outliers():
    rng = random.Random(1)
    xs = [float(i) for i in range(200)]
    ys = [3.0 + 0.5 * x + rng.gauss(0, 1) for x in xs]
    for i in range(0, 200, 7):  # one point in seven anywhere: a least-squares fit would follow
        ys[i] += rng.choice((-1, 1)) * 500
    found = theil_sen(xs, ys)
    assert found is not None
    assert found.slope == pytest.approx(0.5, abs=0.02)
    assert found.low < 0.5 < found.high and found.high - found.low < 0.05
    assert found.n == 200 and found.span == 199


def test_theil_sen_needs_three_points_and_thins_long_series():
    assert theil_sen([1, 2], [1, 2]) is None
    assert theil_sen([1, 1, 1], [1, 2, 3]) is None  # no pair with two x
    xs = list(range(10_000))
    found = theil_sen(xs, [2 * x for x in xs], most=300)
    assert found is not None and found.n == 300 and found.slope == pytest.approx(2.0)


def test_a_steady_leak_is_a_leak_and_its_rate_is_measured():
    rng = random.Random(2)
    ts = [i * 5.0 for i in range(60)]  # 5 min of scrapes every 5 s
    mb = [130 + 0.01 * t + rng.gauss(0, 0.3) for t in ts]  # 36 MB an hour
    found = leak(ts, mb, min_growth=2.0)
    assert found is not None and found.leaking, found.why
    assert found.per_hour() == pytest.approx(36, rel=0.1)


def test_warm_up_that_flattens_is_not_a_leak():
    ts = [i * 5.0 for i in range(60)]
    mb = [130 + 6 * (1 - math.exp(-t / 60)) for t in ts]  # grows 6 MB, mostly in a minute
    found = leak(ts, mb, min_growth=2.0)
    assert found is not None and not found.leaking
    assert "flattened" in found.why


def test_noise_and_small_growth_are_not_leaks():
    rng = random.Random(3)
    ts = [i * 5.0 for i in range(60)]
    flat = [130 + rng.gauss(0, 0.5) for _ in ts]
    found = leak(ts, flat, min_growth=2.0)
    assert found is not None and not found.leaking and "range includes zero" in found.why
    small = [130 + 0.002 * t for t in ts]  # 0.6 MB in 5 minutes: an arena, not a leak
    found = leak(ts, small, min_growth=2.0)
    assert found is not None and not found.leaking and "less than" in found.why
    assert leak(ts[:5], flat[:5], 2.0) is None


def test_a_window_outside_the_band_of_the_steady_ones():
    values = [5.0, 6.0, 5.0, 5.0, 250.0, 250.0, 6.0, None, 5.0]
    found, flags = outside(values, k=5, floor=25)
    assert found is not None and found.median == 5.5
    assert flags == [False, False, False, False, True, True, False, False, False]
    # within the floor: a 2x rise of a small figure is no excursion
    assert outside([5.0, 5.0, 10.0, 5.0], k=5, floor=25)[1] == [False] * 4
    assert band([]) is None and outside([None], 5, 1)[1] == [False]
