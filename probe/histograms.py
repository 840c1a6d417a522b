"""Mergeable latency histograms (HdrHistogram): the probe's one way to keep percentiles, so that
two probes' figures added together are exactly one probe's that saw every call."""

from __future__ import annotations

import base64

from hdrh.histogram import HdrHistogram

#: Histogram range: 1 µs .. 1 h, values recorded in µs, 2 significant digits (1 % resolution:
#: ~3,000 buckets, so a percentile scan stays cheap when a run has hundreds of windows).
_LOWEST, _HIGHEST, _DIGITS = 1, 3_600_000_000, 2
PERCENTILES = (50, 90, 95, 99)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(_LOWEST, _HIGHEST, _DIGITS)


def record_ms(histogram: HdrHistogram, value_ms: float) -> None:
    histogram.record_value(min(_HIGHEST, max(_LOWEST, round(value_ms * 1000))))


def encode(histogram: HdrHistogram) -> str:
    return histogram.encode().decode("ascii")


def decode(text: str) -> HdrHistogram:
    histogram = new_histogram()
    if text:
        histogram.decode_and_add(text.encode("ascii"))
    return histogram


def percentiles(histogram: HdrHistogram) -> dict[str, float] | None:
    """p50/p90/p95/p99/max (ms) and the count, or None when nothing was recorded."""
    count = histogram.get_total_count()
    if not count:
        return None
    values = histogram.get_percentile_to_value_dict(list(PERCENTILES))  # one scan for all
    out: dict[str, float] = {f"p{p}": round(values[p] / 1000, 3) for p in PERCENTILES}
    out["max"] = round(histogram.get_max_value() / 1000, 3)
    out["n"] = count
    return out


def valid_b64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except ValueError:
        return False
    return True
