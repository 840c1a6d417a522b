"""What a device measures of the media it receives: pure logic, fed frame by frame with ``now``.

Latency is stamp send time -> frame decoded here, both on this host's clock (so it is glass-to-glass
minus capture and display when sender and receiver share a host or a synchronised clock).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
from hdrh.histogram import HdrHistogram

from endpoint import audiomark, emodel
from endpoint.audiomark import Mark, MarkReader
from endpoint.quality import QualityMeter
from endpoint.stamp import Stamp, unwrap_ms
from wire.messages import DevicePart, MediaStats, MediaWindow

#: latencies are recorded in microseconds, 1 us .. 60 s, 3 significant digits
LATENCY_MAX_US = 60_000_000

#: the freeze rule's mean frame gap is over this many frames (W3C webrtc-stats), once this many
#: gaps have been seen
FREEZE_WINDOW = 30
FREEZE_MIN_HISTORY = 5

#: lip sync: a mark is matched with the video frame sent nearest its moment, within this (half
#: a frame at 10 fps: the compose lab's devices send 15); the
#: video frames kept for that (10 s at 30 fps); a mark waits for its frame at most this long
#: (of video sent after it); marks waiting, and skews kept, at most
SYNC_MATCH_S = 0.050
SYNC_RECENT = 300
SYNC_GIVE_UP_S = 1.0
SYNC_PENDING = 16
SYNC_KEEP = 3600


class VideoMeter:
    """Counts decoded frames, lost frames (from stamps) and freezes; keeps a latency
    histogram (from stamps)."""

    def __init__(self) -> None:
        self.latency_us = HdrHistogram(1, LATENCY_MAX_US, 3)
        self.frames = 0
        self.unreadable = 0
        self.lost = 0
        self.gaps = 0
        #: of the freezes, those the source made: it sent the frame late (see frame())
        self.gaps_source = 0
        self._last_sent: float | None = None
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._last_counter: int | None = None
        #: the gaps between the last FREEZE_WINDOW frames, and their sum (the freeze rule's mean)
        self._intervals: deque[float] = deque()
        self._interval_sum = 0.0
        self._latency_sum_ms = 0.0
        #: (send time, latency) of the latest timed frames, seconds: lip sync's video side
        self.recent: deque[tuple[float, float]] = deque(maxlen=SYNC_RECENT)
        #: this device's own part: first packet in -> decoded (fed by the device)
        self.receiver = PartMeter()
        #: PSNR/SSIM of sampled synthetic frames (fed by the device: it has the pictures)
        self.quality = QualityMeter()
        #: the window since the last report: latencies, and (frames, lost, gaps, time) at its start
        self._window_us = HdrHistogram(1, LATENCY_MAX_US, 3)
        self._window_start: tuple[int, int, int, float] | None = None

    def frame(self, found: Stamp | None, now: float, timed: bool = True,
              sent_at: float | None = None) -> bool:
        """Take one decoded frame (its stamp, if readable). True if it is the first frame.

        Every decoded frame counts (a real camera's frames carry no stamp); a stamp adds the
        counter (lost frames) and the send time (latency). ``timed=False``: the stamp's counter
        is known but not its send time; ``sent_at``: the send time known more finely than the
        stamp's milliseconds."""
        sent: float | None = None
        step = 0
        if found is None:
            self.unreadable += 1
        else:
            if self._last_counter is not None:
                step = (found.counter - self._last_counter) & 0xFFFFFFFF
                if step == 0 or step > 0x7FFFFFFF:
                    return False  # a repeat or a late frame: already counted
                self.lost += step - 1
            self._last_counter = found.counter
            if timed:
                sent = sent_at if sent_at is not None else \
                    unwrap_ms(found.sent_ms, int(now * 1000)) / 1000
                us = min(LATENCY_MAX_US, max(1, int((now - sent) * 1e6)))
                self.latency_us.record_value(us)
                self._window_us.record_value(us)
                self._latency_sum_ms += (now - sent) * 1000
                self.recent.append((sent, now - sent))
        first = self.first_at is None
        if first:
            self.first_at = now
        elif self.last_at is not None:
            # A freeze, by the W3C rule (webrtc-stats freezeCount): a gap of at least
            # max(3 x mean, mean + 150 ms), the mean over the last 30 frames before it.
            interval = now - self.last_at
            intervals = self._intervals
            if len(intervals) >= FREEZE_MIN_HISTORY:
                mean = self._interval_sum / len(intervals)
                if interval >= max(3 * mean, mean + 0.150):
                    self.gaps += 1
                    # the source's own part: it sent this frame, the next after the last one
                    # (none lost between), late by at least half the gap
                    if step == 1 and sent is not None and self._last_sent is not None and \
                            sent - self._last_sent >= interval / 2:
                        self.gaps_source += 1
            intervals.append(interval)
            self._interval_sum += interval
            if len(intervals) > FREEZE_WINDOW:
                self._interval_sum -= intervals.popleft()
        self.last_at = now
        self._last_sent = sent
        self.frames += 1
        return first

    def window(self, now: float) -> MediaWindow | None:
        """What arrived since the last call (None the first time: the window starts), and a new
        window from ``now``."""
        start, self._window_start = self._window_start, (self.frames, self.lost, self.gaps, now)
        histogram, self._window_us = self._window_us, HdrHistogram(1, LATENCY_MAX_US, 3)
        if start is None:
            return None
        has = histogram.get_total_count() > 0

        def pct(p: float) -> float | None:
            return round(histogram.get_value_at_percentile(p) / 1000, 2) if has else None

        return MediaWindow(seconds=round(max(0.0, now - start[3]), 3),
                           frames=self.frames - start[0], frames_lost=self.lost - start[1],
                           gaps=self.gaps - start[2], latency_ms_p50=pct(50),
                           latency_ms_p95=pct(95))

    def stats(self, now: float, audio: AudioMeter | None = None,
              window: bool = False) -> MediaStats:
        """The figures so far; with ``window``, also those since the last such call."""
        duration = (now - self.first_at) if self.first_at is not None else 0.0
        span = (self.last_at - self.first_at) if self.first_at and self.last_at else 0.0
        fps = (self.frames - 1) / span if span > 0 and self.frames > 1 else 0.0
        has = self.latency_us.get_total_count() > 0

        def pct(p: float) -> float | None:
            return round(self.latency_us.get_value_at_percentile(p) / 1000, 2) if has else None

        timed = self.latency_us.get_total_count()
        quality = self.quality
        if audio is not None:
            audio.pair(self)
        return MediaStats(
            frames=self.frames, frames_lost=self.lost, unreadable=self.unreadable,
            fps=round(fps, 2), latency_ms_p50=pct(50), latency_ms_p95=pct(95),
            latency_ms_mean=round(self._latency_sum_ms / timed, 3) if timed else None,
            receiver=self.receiver.part(),
            latency_ms_max=round(self.latency_us.get_max_value() / 1000, 2) if has else None,
            gaps=self.gaps, gaps_source=self.gaps_source, duration_s=round(duration, 3),
            **(audio.figures() if audio else {}),
            window=self.window(now) if window else None,
            psnr_db=_round(quality.psnr_db, 2), psnr_db_min=_round(quality.psnr_min, 2),
            ssim=_round(quality.ssim, 4), ssim_min=_round(quality.ssim_min, 4),
            quality_samples=quality.samples)


def _round(value: float | None, digits: int) -> float | None:
    return round(value, digits) if value is not None else None


class PartMeter:
    """A device's own part of its video's latency, per frame: from ``begin`` (captured; or the
    first packet in) to ``end`` (the last packet sent; or decoded), matched by the frame's RTP
    timestamp (its pts). Frames that never end are forgotten past ``keep``."""

    def __init__(self, keep: int = 256) -> None:
        self._open: dict[int, float] = {}
        self._keep = keep
        self.ms = HdrHistogram(1, LATENCY_MAX_US, 3)
        self._sum_ms = 0.0

    def begin(self, key: int, at: float) -> None:
        if key not in self._open:
            self._open[key] = at
            if len(self._open) > self._keep:
                del self._open[next(iter(self._open))]

    def end(self, key: int, at: float) -> None:
        started = self._open.pop(key, None)
        if started is not None:
            ms = max(0.0, (at - started) * 1000)
            self._sum_ms += ms
            self.ms.record_value(min(LATENCY_MAX_US, max(1, int(ms * 1000))))

    def part(self) -> DevicePart | None:
        frames = self.ms.get_total_count()
        if not frames:
            return None
        return DevicePart(frames=frames, mean_ms=round(self._sum_ms / frames, 3),
                          p50_ms=round(self.ms.get_value_at_percentile(50) / 1000, 3))


class SendLog:
    """When each pre-encoded frame was sent, for receivers in the same process.

    A pre-encoded loop's stamps carry the loop index, not a send time: the sending device logs
    (its address, loop index) -> (frame number, send time), and the receiving device maps the
    stamp it reads back through this log. Across processes there is no log, and latency is not
    measured (frames, loss and fps still are).
    """

    def __init__(self) -> None:
        self._sent: dict[tuple[str, int], tuple[int, float]] = {}
        self._senders: set[str] = set()

    def sent(self, address: str, k: int, n: int, at: float) -> None:
        self._sent[address, k] = (n, at)
        self._senders.add(address)

    def knows(self, address: str) -> bool:
        return address in self._senders

    def lookup(self, address: str, k: int) -> Stamp | None:
        found = self._sent.get((address, k))
        return Stamp(found[0], int(found[1] * 1000) & 0xFFFFFFFF) if found else None

    def sent_at(self, address: str, k: int) -> tuple[int, float] | None:
        """(frame number, send time) of loop frame ``k`` of ``address``'s latest pass."""
        return self._sent.get((address, k))


class AudioMeter:
    """What a device measures of the audio it receives: frames, frames lost (gaps in the RTP
    timestamps), interarrival jitter, the level, and the timing marks of a synthetic source
    (endpoint/audiomark.py): audio latency, marks lost, and the A/V skew against the video
    sent at the same moment."""

    def __init__(self) -> None:
        self.frames = 0
        self.lost = 0
        self._power = 0.0
        self._samples = 0
        self._next_pts: int | None = None
        self._transit: float | None = None
        self.jitter_s = 0.0  #: RFC 3550's estimator, on delivery times against the timestamps
        self._reader = MarkReader()
        self.latency_us = HdrHistogram(1, LATENCY_MAX_US, 3)
        self.marks = 0
        self.marks_lost = 0
        self._last_mark_ms: int | None = None
        #: marks not yet matched with the video sent at their moment: (sent, latency), seconds
        self._unpaired: deque[tuple[float, float]] = deque(maxlen=SYNC_PENDING)
        #: audio latency - video latency of the same moment, ms, one per mark matched
        self.skews_ms: deque[float] = deque(maxlen=SYNC_KEEP)

    def frame(self, samples: np.ndarray, now: float | None = None, pts: int | None = None,
              channels: int = 1, rate: int = audiomark.RATE) -> Mark | None:
        """Take one decoded frame (packed samples, ``channels`` interleaved) delivered at
        ``now`` with RTP timestamp ``pts``; the timing mark it completes, if any."""
        self.frames += 1
        data = samples.reshape(-1).astype(np.float32)
        self._power += float(data @ data) / (32768.0 * 32768.0)
        self._samples += data.size
        if now is None:
            return None
        mono = samples.reshape(-1)[::channels]
        if pts is not None:
            if self._next_pts is not None:
                step = (pts - self._next_pts) & 0xFFFFFFFF
                if 0 < step < 0x80000000:
                    self.lost += round(step / mono.size)
            self._next_pts = (pts + mono.size) & 0xFFFFFFFF
            transit = now - pts / rate
            if self._transit is not None:
                # (a timestamp's wrap, or a jump, is not jitter)
                d = abs(transit - self._transit)
                if d < 1.0:
                    self.jitter_s += (d - self.jitter_s) / 16
            self._transit = transit
        mark = self._reader.frame(mono, pts, now)
        if mark is not None:
            self._timed(mark, now)
        return mark

    def _timed(self, mark: Mark, now: float) -> None:
        sent_ms = audiomark.unwrap(mark.sent_ms, int(now * 1000))
        latency = mark.at - sent_ms / 1000
        self.marks += 1
        if self._last_mark_ms is not None:
            self.marks_lost += max(0, round((sent_ms - self._last_mark_ms)
                                            / audiomark.MARK_PERIOD_MS) - 1)
        self._last_mark_ms = sent_ms
        self.latency_us.record_value(min(LATENCY_MAX_US, max(1, int(latency * 1e6))))
        self._unpaired.append((sent_ms / 1000, latency))

    def pair(self, video: VideoMeter) -> None:
        """Match the marks read so far with the video frames sent at their moment (the nearest,
        within SYNC_MATCH_S): each match is one A/V skew. A mark whose moment the
        video has long passed without such a frame is dropped."""
        recent = video.recent
        waiting: list[tuple[float, float]] = []
        for sent, latency in self._unpaired:
            near = [(abs(v_sent - sent), v_latency) for v_sent, v_latency in recent
                    if abs(v_sent - sent) <= SYNC_MATCH_S]
            if near:
                self.skews_ms.append((latency - min(near)[1]) * 1000)
            elif not recent or recent[-1][0] < sent + SYNC_GIVE_UP_S:
                waiting.append((sent, latency))
        self._unpaired.clear()
        self._unpaired.extend(waiting)

    def level_dbfs(self) -> float | None:
        if not self._samples:
            return None
        power = self._power / self._samples
        return round(10 * math.log10(power), 1) if power > 0 else -120.0

    def figures(self) -> dict[str, float | int | None]:
        """The audio's part of a direction's MediaStats."""
        timed = self.latency_us.get_total_count()

        def pct(p: float) -> float | None:
            return round(self.latency_us.get_value_at_percentile(p) / 1000, 2) if timed else None

        sent = self.frames + self.lost
        loss_percent = 100 * self.lost / sent if sent else 0.0
        jitter_ms = self.jitter_s * 1000
        p50 = pct(50)
        return {
            "audio_frames": self.frames, "audio_level_dbfs": self.level_dbfs(),
            "audio_frames_lost": self.lost,
            "audio_jitter_ms": round(jitter_ms, 2) if self.frames > 1 else None,
            "audio_marks": self.marks, "audio_marks_lost": self.marks_lost,
            "audio_latency_ms_p50": p50, "audio_latency_ms_p95": pct(95),
            "av_sync_ms": round(float(np.median(self.skews_ms)), 1) if self.skews_ms else None,
            "av_sync_samples": len(self.skews_ms),
            "mos": round(emodel.mos(p50, jitter_ms, loss_percent), 2) if p50 is not None
            else None,
        }
