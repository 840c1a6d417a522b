"""What a server measures of one stream it forwards (one kind, one direction, at one server),
from packets it already handles: packets and bytes that arrived from the previous hop, the
transit through the server (a log-bucketed histogram), keyframe requests and NACKs each way, and
the recent bitrate. Pure: times are passed in. The producer of the media graph (rtc/graph.py) owns
one; the meter stage (rtc/stages.py) feeds it. relay/hops.py makes links of the figures.
"""

from __future__ import annotations

import bisect
import math

from wire.messages import StreamHop

#: one packet in this many has its transit measured (a power of two)
TRANSIT_EVERY = 8
#: transit histogram bounds, ms: 50 µs to ~33 s in steps of 12 %
_BOUNDS: tuple[float, ...] = tuple(0.05 * 1.12 ** i for i in range(118))


class Buckets:
    """A small log-bucketed histogram (12 % wide buckets), mergeable by adding counts."""

    __slots__ = ("counts", "max", "sum", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS) + 1)
        self.total = 0
        self.sum = 0.0
        self.max = 0.0

    def record(self, ms: float) -> None:
        self.counts[bisect.bisect_left(_BOUNDS, ms)] += 1
        self.total += 1
        self.sum += ms
        if ms > self.max:
            self.max = ms

    @property
    def mean(self) -> float | None:
        return self.sum / self.total if self.total else None

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding quantile ``q`` (at most the largest value)."""
        if not self.total:
            return None
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return min(_BOUNDS[i] if i < len(_BOUNDS) else self.max, self.max)
        return self.max


class StreamMeter:
    """One kind of media in one direction at one server (see the module's docstring)."""

    __slots__ = ("_mark", "bytes", "first_at", "keyframes_in", "keyframes_out", "last_at",
                 "nacks_in", "nacks_out", "packets", "recent", "transit")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.first_at: float | None = None
        self.last_at = 0.0
        self.transit = Buckets()
        self.keyframes_in = self.keyframes_out = self.nacks_in = self.nacks_out = 0
        self._mark: tuple[float, int] | None = None  #: (time, bytes) at the last report
        self.recent: float | None = None  #: bits/s between the last two reports

    def arrived(self, size: int, now: float) -> None:
        self.packets += 1
        self.bytes += size
        self.seen(now)

    def seen(self, now: float) -> None:
        """Packets arrived up to ``now`` (the fast path counts them inline and says when only
        for the packets it samples: the bitrate's span is that close)."""
        if self.first_at is None:
            self.first_at = now
        self.last_at = now

    def figures(self, lost: int = 0, repaired: int = 0,
                jitter_ms: float | None = None, now: float | None = None) -> StreamHop:
        """The figures so far; with ``now``, also the bitrate since the last call with one."""
        if now is not None:
            if self._mark is not None and now > self._mark[0]:
                self.recent = (self.bytes - self._mark[1]) * 8 / (now - self._mark[0])
            self._mark = (now, self.bytes)
        span = self.last_at - (self.first_at or self.last_at)
        return StreamHop(
            packets=self.packets, bytes=self.bytes,
            bitrate_kbps=round(self.bytes * 8 / span / 1000, 1) if span > 0 else 0.0,
            lost=max(0, lost), repaired=repaired,
            jitter_ms=round(jitter_ms, 3) if jitter_ms is not None else None,
            transit_ms_mean=_round(self.transit.mean),
            transit_ms_p50=_round(self.transit.quantile(0.5)),
            transit_ms_p95=_round(self.transit.quantile(0.95)),
            transit_ms_p99=_round(self.transit.quantile(0.99)),
            transit_ms_max=_round(self.transit.max if self.transit.total else None),
            transit_samples=self.transit.total, keyframes_in=self.keyframes_in,
            keyframes_out=self.keyframes_out, nacks_in=self.nacks_in, nacks_out=self.nacks_out,
            recent_kbps=round(self.recent / 1000, 1) if self.recent is not None else None)


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None
