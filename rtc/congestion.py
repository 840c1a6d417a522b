"""Congestion control across the hops of a call: the pure parts.

Only the sending device can change a stream's bitrate (servers forward it without decoding), so
what each hop learns of the rate its links carry travels upstream to it, hop by hop, as REMB
(RTCP "receiver estimated maximum bitrate", draft-alvestrand-rmcat-remb):

- each server estimates the bitrate of the leg each video stream arrives on, receive side and
  delay based, as the Google congestion control does (:class:`DelayEstimator`: libwebrtc's
  trendline detector, aiortc's AIMD rate control), from the packets' abs-send-time header
  extension. Forwarded packets keep the sending device's extension, so a hop's estimate covers
  the whole path from the device up to it;
- what it tells the hop upstream is the least of its own estimate and the hop downstream's last
  report (:class:`Feedback`): the sender hears the narrowest link of the path.

Transport-wide congestion control (TWCC) is not used: aiortc has no send-side estimator for it,
and every hop would have to run one; REMB needs an estimator only on the receiving side of each
leg, which aiortc has, and aiortc's senders act on it (the encoder's target bitrate).

Everything here takes time as an argument and does no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from aiortc import rate

ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"

Limiter = Literal["own", "downstream"]


def abs_send_time_of(packet: bytes | memoryview, ext_id: int) -> int | None:
    """The 24-bit abs-send-time (6.18 fixed-point seconds) of a plain RTP packet, from its
    one-byte header extension (RFC 8285) ``ext_id``; None if the packet has none."""
    at = abs_send_time_offset(packet, ext_id)
    if at is None:
        return None
    return (packet[at] << 16) | (packet[at + 1] << 8) | packet[at + 2]


def abs_send_time_value(ntp: int) -> int:
    """The abs-send-time of a 64-bit NTP time: 6.18 fixed-point seconds, 24 bits."""
    return (ntp >> 14) & 0xFFFFFF


def abs_send_time_offset(packet: bytes | memoryview, ext_id: int) -> int | None:
    """Where the 3 bytes of the abs-send-time element ``ext_id`` are in a plain RTP packet
    (one-byte header extensions, RFC 8285), or None if it has none."""
    if not ext_id or len(packet) < 12 or not packet[0] & 0x10:
        return None
    i = 12 + 4 * (packet[0] & 0x0F)
    if len(packet) < i + 4 or packet[i] != 0xBE or packet[i + 1] != 0xDE:
        return None
    end = i + 4 + 4 * ((packet[i + 2] << 8) | packet[i + 3])
    if end > len(packet):
        return None
    i += 4
    while i < end:
        byte = packet[i]
        if byte == 0:  # padding
            i += 1
            continue
        element, size = byte >> 4, (byte & 0x0F) + 1
        if element == 15:  # reserved: stop here (RFC 8285)
            return None
        if element == ext_id:
            return i + 1 if size == 3 and i + 4 <= end else None
        i += 1 + size
    return None


class RateCounter:
    """aiortc's ``rate.RateCounter`` (bits/s over a window of ms), with what it holds kept as
    (ms, bytes) entries rather than one bucket per millisecond: aiortc's walks every
    millisecond since its last call, twice per packet group (~70 steps at 30 fps), which was
    the estimator's largest cost. Same figures (tests/test_congestion.py)."""

    def __init__(self, window_size: int, scale: int = 8000) -> None:
        self._window = window_size
        self._scale = scale
        # (ms, bytes) in two deques: no tuple per entry (tuples are tracked by the garbage
        # collector, and a collection's cost falls on whatever the server is doing)
        self._times: deque[int] = deque()
        self._values: deque[int] = deque()
        self._origin_ms: int | None = None
        self._count = self._total = 0

    def add(self, value: int, now_ms: int) -> None:
        if self._origin_ms is None:
            self._origin_ms = now_ms
        else:
            self._erase_old(now_ms)
        self._times.append(now_ms)
        self._values.append(value)
        self._count += 1
        self._total += value

    def rate(self, now_ms: int) -> int | None:
        if self._origin_ms is not None:
            self._erase_old(now_ms)
            active = now_ms - self._origin_ms + 1
            if self._count > 0 and active > 1:
                return round(self._scale * self._total / active)
        return None

    def reset(self) -> None:
        self._times.clear()
        self._values.clear()
        self._origin_ms = None
        self._count = self._total = 0

    def _erase_old(self, now_ms: int) -> None:
        assert self._origin_ms is not None
        origin = now_ms - self._window + 1
        if self._origin_ms < origin:
            times, values = self._times, self._values
            while times and times[0] < origin:
                times.popleft()
                self._count -= 1
                self._total -= values.popleft()
            self._origin_ms = origin


class TrendlineEstimator:
    """The delay-based part of the Google congestion control as libwebrtc runs it today
    (``TrendlineEstimator``): per packet group, the growth of the queueing delay since the
    last group, accumulated and smoothed, and the slope of a least-squares line through the
    last ``window`` points; a slope past an adaptive threshold (one that follows the trend's
    size, so that it is not triggered by noise, nor starved by the other flows' queueing) for
    more than 10 ms is overuse. It replaces aiortc's Kalman-filter detector, for less work per
    group; the rate control is aiortc's (``AimdRateControl``)."""

    WINDOW = 20
    SMOOTHING = 0.9
    GAIN = 4.0
    K_UP, K_DOWN = 0.0087, 0.039
    MAX_ADAPT_OFFSET_MS = 15.0
    OVERUSING_TIME_MS = 10.0

    def __init__(self) -> None:
        self.deltas = 0
        self._first_ms: float | None = None
        self._accumulated = 0.0
        self._smoothed = 0.0
        self._xs: deque[float] = deque()  #: ms since the first group (no tuples: see
        self._ys: deque[float] = deque()  #: RateCounter) and the smoothed delay
        #: the window's sums for the least-squares slope, kept as points come and go, and
        #: worked out again from the points every WINDOW groups (no drift)
        self._sums = Sums()
        self.trend = self._previous_trend = 0.0
        self.threshold = 12.5
        self._threshold_at: float | None = None
        self._overusing_ms = -1.0
        self._overuse_count = 0
        self.state = rate.BandwidthUsage.NORMAL

    def update(self, arrival_delta_ms: float, send_delta_ms: float, arrival_ms: float
               ) -> rate.BandwidthUsage:
        self.deltas = min(self.deltas + 1, 1000)
        if self._first_ms is None:
            self._first_ms = arrival_ms
        self._accumulated += arrival_delta_ms - send_delta_ms
        self._smoothed = (self.SMOOTHING * self._smoothed
                          + (1 - self.SMOOTHING) * self._accumulated)
        xs, ys, sums = self._xs, self._ys, self._sums
        x, y = arrival_ms - self._first_ms, self._smoothed
        xs.append(x)
        ys.append(y)
        if len(xs) > self.WINDOW:
            sums.remove(xs.popleft(), ys.popleft())
        if sums.fresh >= self.WINDOW:
            sums.rebase(xs, ys)
        else:
            sums.add(x, y)
        trend = self.trend
        if len(xs) == self.WINDOW:
            trend = self.trend = sums.slope() or trend
        if self.deltas < 2:
            self.state = rate.BandwidthUsage.NORMAL
            return self.state
        # Detect (one method for the whole step: it runs for every frame of every stream).
        threshold = self.threshold
        modified = min(self.deltas, 60) * trend * self.GAIN
        if modified > threshold:
            self._overusing_ms = (send_delta_ms / 2 if self._overusing_ms < 0
                                  else self._overusing_ms + send_delta_ms)
            self._overuse_count += 1
            if (self._overusing_ms > self.OVERUSING_TIME_MS and self._overuse_count > 1
                    and trend >= self._previous_trend):
                self._overusing_ms, self._overuse_count = 0.0, 0
                self.state = rate.BandwidthUsage.OVERUSING
        elif modified < -threshold:
            self._overusing_ms, self._overuse_count = -1.0, 0
            self.state = rate.BandwidthUsage.UNDERUSING
        else:
            self._overusing_ms, self._overuse_count = -1.0, 0
            self.state = rate.BandwidthUsage.NORMAL
        self._previous_trend = trend
        # Adapt the threshold to the trend's size, unless it is a spike.
        if self._threshold_at is None:
            self._threshold_at = arrival_ms
        size = abs(modified)
        if size <= threshold + self.MAX_ADAPT_OFFSET_MS:
            k = self.K_DOWN if size < threshold else self.K_UP
            elapsed = min(arrival_ms - self._threshold_at, 100.0)
            self.threshold = min(600.0, max(6.0, threshold + k * (size - threshold) * elapsed))
        self._threshold_at = arrival_ms
        return self.state


class Sums:
    """The sums a least-squares slope needs, of points that come and go (a sliding window):
    O(1) a point instead of a pass over the window. x is taken from an origin (the slope does
    not depend on it) that :meth:`rebase` moves to the window's first point, working the sums
    out again from the points, so that rounding does not pile up as points are added and taken
    away."""

    __slots__ = ("fresh", "n", "sx", "sxx", "sxy", "sy", "x0")

    def __init__(self) -> None:
        self.x0 = 0.0
        self.n = self.fresh = 0  #: points, and points added since the last rebase
        self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, x: float, y: float) -> None:
        x -= self.x0
        self.n += 1
        self.fresh += 1
        self.sx += x
        self.sy += y
        self.sxx += x * x
        self.sxy += x * y

    def remove(self, x: float, y: float) -> None:
        x -= self.x0
        self.n -= 1
        self.sx -= x
        self.sy -= y
        self.sxx -= x * x
        self.sxy -= x * y

    def rebase(self, xs: deque[float], ys: deque[float]) -> None:
        """The sums of exactly these points, x from the first."""
        self.x0 = xs[0] if xs else 0.0
        self.n = self.fresh = 0
        self.sx = self.sy = self.sxx = self.sxy = 0.0
        for x, y in zip(xs, ys, strict=True):
            self.add(x, y)
        self.fresh = 0

    def slope(self) -> float | None:
        n, sx = self.n, self.sx
        denominator = n * self.sxx - sx * sx
        return (n * self.sxy - sx * self.sy) / denominator if denominator else None


class DelayEstimator:
    """The bitrate a stream's path allows, from its packet groups' send and arrival times:
    the trendline detector, aiortc's AIMD rate control and the rate the groups arrive at
    (what aiortc's ``RemoteBitrateEstimator`` does: 5.5 µs a group here against 25 µs there)."""

    FEEDBACK_MS = 500  #: an estimate at least this often, and at once on overuse

    def __init__(self) -> None:
        self.incoming = RateCounter(1000, 8000)
        self.detector = TrendlineEstimator()
        self.control = rate.AimdRateControl()
        self._updated_ms: int | None = None
        self._previous_send: float | None = None  #: the last group's send ms
        self._previous_arrival = 0
        #: times the detector found the path's queue growing (each a fall of the estimate):
        #: a hop past the narrowest link sees it, one before does not (probe/bottleneck.py)
        self.overuses = 0
        self._overusing = False

    def group(self, send_ms: float, arrival_ms: int, size: int) -> int | None:
        """One packet group's last send time (ms, unwrapped), arrival and bytes; the new
        estimate, bits/s, if one is due."""
        if self.incoming.rate(arrival_ms) is None:
            self.incoming.reset()
        self.incoming.add(size, arrival_ms)
        previous_send, previous_arrival = self._previous_send, self._previous_arrival
        self._previous_send, self._previous_arrival = send_ms, arrival_ms
        if previous_send is not None and send_ms > previous_send:  # in order: a delta
            self.detector.update(arrival_ms - previous_arrival, send_ms - previous_send,
                                 arrival_ms)
        overusing = self.detector.state == rate.BandwidthUsage.OVERUSING
        if overusing and not self._overusing:
            self.overuses += 1
        self._overusing = overusing
        if (self._updated_ms is not None and not overusing
                and arrival_ms - self._updated_ms <= self.FEEDBACK_MS):
            return None
        found = self.control.update(self.detector.state, self.incoming.rate(arrival_ms),
                                    arrival_ms)
        if found is not None:
            self._updated_ms = arrival_ms
        return found


#: abs-send-time units (2^-18 s) in the 5 ms that make one packet group for the estimator
GROUP_TICKS = (5 << 18) // 1000


#: frames an estimate holds before it works them in on its own (its server's tick, every
#: ESTIMATE_EVERY_S, is late: the event loop was busy): 2 s at 30 fps
MAX_PENDING_FRAMES = 64

#: how often a server works the frames its streams' estimates hold into them (relay/media.py)
ESTIMATE_EVERY_S = 0.1


class Estimate:
    """This hop's estimate of the bitrate one stream arrives at (:class:`DelayEstimator`).

    It is fed once a frame, on its last packet (the one with the RTP marker bit), with the
    bytes of the stream that arrived since the frame before's: the estimator works on packet
    groups (the packets sent within 5 ms of the group's first), their last packet's send and
    arrival times and the sum of their sizes, and a frame's packets leave its sender together,
    so a group is a frame (or a few, sent within 5 ms). The rest of a frame's packets cost the
    forwarding path only a byte count and a look at the marker bit.

    A frame is only noted as it arrives (its send time, arrival and size); :meth:`drain` works
    the frames noted since into the estimate, and the server calls it for all its streams at
    once every ESTIMATE_EVERY_S. Measured in the relay (32 streams), the estimator's step cost
    16 µs a frame when taken between one packet and the next, every other stream's packets
    having gone through the caches since; taken a tick's frames at a time, 7 µs. The estimate
    is at most a tick later for it. A group goes in when the next one starts.

    The abs-send-time is read where the stream's previous frame had it (the header layout of
    one sender does not change), found again if it moves; it wraps every 64 s, and is
    unwrapped here."""

    __slots__ = ("_arrived_ms", "_at", "_base", "_base_ms", "_estimator", "_first", "_last",
                 "_pending", "_size", "ext_id")

    def __init__(self, ext_id: int) -> None:
        self.ext_id = ext_id
        self._estimator = DelayEstimator()
        self._at: int | None = None  #: where the abs-send-time's 3 bytes were last
        self._first: int | None = None  #: the open group's first send time
        self._last = 0  #: its last packet's send time
        self._arrived_ms = 0  #: and arrival
        self._size = 0
        self._base: int | None = None  #: a send time, and its unwrapped ms
        self._base_ms = 0.0
        self._pending: list[int] = []  #: frames noted: send time, arrival ms, bytes, ...

    def packet(self, packet: bytes | memoryview, length: int, now_ms: int, size: int
               ) -> int | None:
        """A frame's last packet (plain RTP, ``length`` bytes) arrived at ``now_ms``, ``size``
        bytes of the stream having arrived since the frame before's last (this packet's
        included): noted (see :meth:`sent`)."""
        at = self._at
        if at is None or at + 3 > length or packet[at - 1] != (self.ext_id << 4) | 2:
            at = self._at = abs_send_time_offset(packet[:length], self.ext_id)
            if at is None:
                return None
        return self.sent((packet[at] << 16) | (packet[at + 1] << 8) | packet[at + 2], size,
                         now_ms)

    def sent(self, sent: int, size: int, now_ms: int) -> int | None:
        """A frame's last packet, sent at ``sent`` (abs-send-time), arrived at ``now_ms``,
        ``size`` bytes having arrived since the frame before's (see :meth:`packet`): noted,
        for :meth:`drain`. Only if MAX_PENDING_FRAMES are noted (no drain came) does it drain
        them itself, and return what :meth:`drain` does."""
        pending = self._pending
        pending += (sent, now_ms, size)
        if len(pending) < 3 * MAX_PENDING_FRAMES:
            return None
        return self.drain()

    @property
    def overuses(self) -> int:
        """Times the path's queue was found growing (:class:`DelayEstimator`)."""
        return self._estimator.overuses

    def drain(self) -> int | None:
        """Work the frames noted since the last drain into the estimate: the newest estimate
        (bits/s) that came of them, if any."""
        pending = self._pending
        found = None
        for i in range(0, len(pending), 3):
            found = self._frame(pending[i], pending[i + 2], pending[i + 1]) or found
        pending.clear()
        return found

    def _frame(self, sent: int, size: int, now_ms: int) -> int | None:
        first = self._first
        found = None
        if first is not None and 0x800000 > (sent - first) & 0xFFFFFF > GROUP_TICKS:
            found = self._estimator.group(self._unwrap(self._last), self._arrived_ms,
                                          self._size)
            first = None
        if first is None:
            self._first, self._size = sent, 0
        self._last, self._arrived_ms = sent, now_ms
        self._size += size
        return found

    def _unwrap(self, sent: int) -> float:
        """A 24-bit abs-send-time as ms on a line that does not wrap (from the previous one)."""
        if self._base is None:
            self._base, self._base_ms = sent, 0.0
        step = (sent - self._base) & 0xFFFFFF
        if step >= 0x800000:  # earlier than the base
            step -= 0x1000000
        ms = self._base_ms + step * 1000 / (1 << 18)
        self._base, self._base_ms = sent, ms
        return ms


class Resends:
    """Which NACKed packets a sender answers. aiortc's receivers NACK every packet still missing
    each time a new one goes missing, so on a congested link each lost packet is asked for again
    and again, and the retransmissions crowd out the stream: a NACK storm. A packet is sent
    again at most once in ``gap_s`` (a round trip, about), and retransmissions take at most
    ``share`` of what the stream sends (a token per packet sent, ``burst`` at most)."""

    def __init__(self, share: float = 0.25, burst: float = 40.0, gap_s: float = 0.25) -> None:
        self.share, self.burst, self.gap_s = share, burst, gap_s
        self._tokens = burst
        self._sent = 0
        self._last: dict[int, float] = {}  #: sequence number -> when it was sent again
        self.suppressed = 0

    def allow(self, seq: int, now: float, sent: int) -> bool:
        """May ``seq`` be sent again at ``now``, the stream having sent ``sent`` packets?"""
        self._tokens = min(self.burst, self._tokens + (sent - self._sent) * self.share)
        self._sent = sent
        last = self._last.get(seq)
        if (last is not None and now - last < self.gap_s) or self._tokens < 1:
            self.suppressed += 1
            return False
        self._tokens -= 1
        self._last[seq] = now
        if len(self._last) > 1024:  # forget what is past its gap
            self._last = {s: at for s, at in self._last.items() if now - at < self.gap_s}
        return True


@dataclass
class Feedback:
    """What this hop reports upstream of one forwarded stream: the least of its own estimate of
    the leg the stream arrives on and the last report from the hop downstream.

    A report goes out at once when the limit falls by ``drop`` or more since the last one sent
    (not sooner than ``min_gap`` after it), else at most every ``refresh`` seconds; a rise waits
    for the refresh. A downstream report not renewed for ``stale`` seconds no longer counts (the
    hop downstream went away, or stopped estimating)."""

    refresh: float = 1.0
    drop: float = 0.03
    min_gap: float = 0.1
    stale: float = 5.0
    own_bps: int | None = None
    downstream_bps: int | None = None
    sent_bps: int | None = None
    reports_sent: int = 0
    _downstream_at: float = float("-inf")
    _sent_at: float = float("-inf")

    def own(self, bps: int, now: float) -> int | None:
        """This hop's estimate changed; what to send upstream now, if anything."""
        self.own_bps = bps
        return self.due(now)

    def downstream(self, bps: int, now: float) -> int | None:
        """The hop downstream reported; what to send upstream now, if anything."""
        self.downstream_bps, self._downstream_at = bps, now
        return self.due(now)

    def limit(self, now: float) -> tuple[int, Limiter] | None:
        """The rate the stream may have, and whose figure it is; None before any estimate."""
        down = self.downstream_bps if now - self._downstream_at <= self.stale else None
        if down is not None and (self.own_bps is None or down < self.own_bps):
            return down, "downstream"
        if self.own_bps is not None:
            return self.own_bps, "own"
        return None

    def due(self, now: float) -> int | None:
        """The report to send upstream now (and taken as sent), or None."""
        found = self.limit(now)
        if found is None:
            return None
        bps, _ = found
        since = now - self._sent_at
        fell = self.sent_bps is not None and bps <= self.sent_bps * (1 - self.drop)
        if since >= self.refresh or (fell and since >= self.min_gap) or self.sent_bps is None:
            self.sent_bps, self._sent_at = bps, now
            self.reports_sent += 1
            return bps
        return None
