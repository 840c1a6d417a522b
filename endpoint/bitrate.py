"""A device's encoder follows the rate the path reports (REMB from its server: the least of every
hop's estimate, see rtc/congestion.py).

aiortc's own handling sets the encoder's target to every REMB, clamped to at least 250 kbit/s
for VP8 (500 for H.264), and its encoders start again, with a keyframe, whenever the target moves
by more than 10 %. A keyframe is several times a frame's usual size: on a narrow link, a target
that follows every report makes the very bursts that overflow it. So the device takes a target:

- on a fall of ``fall`` (10 %) or more, at once: the link is full now; but not while the path
  still carries what the encoder actually sends, less ``margin`` (5 %): an encoder often makes
  less than its target, and nothing is gained by restarting it (and a target lowered to what
  an undershooting encoder makes would make it send less again, down to the floor);
- on a rise of ``rise`` (20 %) or more, and only ``hold`` (3 s) after the last change; a rise
  that a fall follows within ``proven`` (10 s) was too much for the path, and its keyframe was
  a burst into a full link: each such rise doubles the wait before the next (up to
  ``max_hold``, 60 s), and a rise that holds brings it back to ``hold``;
- at ``headroom`` (90 %) of what the path reports: the estimate is of the video alone and
  probes above what the link carries, while the link also carries audio, headers and the
  other direction; measured on a 400 kbit/s trunk, aiming at the whole report lost 7-9 % of
  the frames in half the calls, at 90 % under 2 % in all of seven (benchmarks/congestion.py);
- never below ``floor`` (100 kbit/s: narrower paths than aiortc's floor) nor above ``ceiling``.

Before the path has said anything the encoder sends ``DEFAULT_START`` (300 kbit/s, libwebrtc's
start bitrate; aiortc's is 500): the first report comes a second or more into the call, and
on a 400 kbit/s trunk 500 kbit/s of video and the audio filled its queue for that second and
the two after (drops, then the queue draining: latency p95 of 420-480 ms in two runs of seven
of benchmarks/congestion.py). A path that carries more is found by the estimate's rise.

:class:`EncoderTarget` is the pure rule; :func:`follow_remb` wires it to an aiortc sender.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCRtpSender

from rtc.adapter import (
    RtcpDispatcher,
    make_encoder,
    octets_sent,
    sender_encoder,
    set_encoder_target,
)

DEFAULT_START = 300_000  #: libwebrtc's start bitrate (aiortc's VP8 encoder starts at 500)


@dataclass
class EncoderTarget:
    floor: int = 100_000
    ceiling: int = 1_500_000
    fall: float = 0.10
    rise: float = 0.20
    hold: float = 3.0
    margin: float = 0.05
    proven: float = 10.0
    headroom: float = 0.9
    max_hold: float = 60.0
    target: int = DEFAULT_START
    changes: int = 0  #: targets taken (each one restarts the encoder: a keyframe)
    reported: int | None = None  #: the last rate the path reported
    _changed_at: float = field(default=float("-inf"))
    _rose_at: float | None = None  #: the last rise not yet proven (or disproven)
    _wait: float | None = None  #: before a rise, after the last change (``hold`` at first)

    def offer(self, bps: int, now: float, sent_bps: float | None = None) -> int | None:
        """The path reports ``bps`` (the encoder sending ``sent_bps`` lately, if known): the new
        target to set, or None to keep the current one."""
        self.reported = bps
        wait = self.hold if self._wait is None else self._wait
        if self._rose_at is not None and now - self._rose_at >= self.proven:
            self._rose_at, wait = None, self.hold  # the last rise held
        wanted = max(self.floor, min(self.ceiling, int(bps * self.headroom)))
        roomy = sent_bps is not None and wanted >= sent_bps * (1 - self.margin)
        fell = wanted <= self.target * (1 - self.fall) and not roomy
        rose = wanted >= self.target * (1 + self.rise) and now - self._changed_at >= wait
        if fell and self._rose_at is not None:  # the last rise did not hold: back off
            self._rose_at, wait = None, min(self.max_hold, 2 * wait)
        self._wait = wait
        if not (fell or rose):
            return None
        if rose:
            self._rose_at = now
        self.target, self._changed_at = wanted, now
        self.changes += 1
        return wanted


def follow_remb(rtcp: RtcpDispatcher, sender: RTCRtpSender, target: EncoderTarget,
                clock: Callable[[], float] = time.monotonic) -> None:
    """Take REMB reports for ``sender``'s stream (through the call's RTCP dispatcher) into
    ``target``, and set its encoder's target bitrate (past aiortc's clamp) when one is taken."""
    window: list[float] = []  # [time, octets sent] at the start of the rate's window
    rate: list[float] = []  # the bits/s sent over the last whole window

    def sent_bps(now: float) -> float | None:
        octets = float(octets_sent(sender))
        if not window:
            window[:] = [now, octets]
        elif now - window[0] >= 0.5:
            rate[:] = [(octets - window[1]) * 8 / (now - window[0])]
            window[:] = [now, octets]
        return rate[0] if rate else None

    def remb(bitrate: int) -> bool:
        encoder = sender_encoder(sender)  # None until the first frame
        if encoder is not None:
            now = clock()
            chosen = target.offer(bitrate, now, sent_bps(now))
            if chosen is not None:
                set_encoder_target(encoder, chosen)
        return True  # aiortc's own handling (a clamped target) is skipped

    rtcp.on(sender, remb=remb)


def set_audio_bitrate(sender: RTCRtpSender, bps: int) -> None:
    """Make ``sender``'s Opus encoder send ``bps`` (aiortc's is fixed at 96 kbit/s, a quarter
    of a 400 kbit/s link by itself)."""
    def configure(codec: Any, encoder: Any) -> None:
        if codec.mimeType.lower() == "audio/opus":
            encoder.codec.bit_rate = bps

    make_encoder(sender, configure)


def set_start_bitrate(sender: RTCRtpSender, bps: int) -> None:
    """Make ``sender``'s video encoder start at ``bps`` (past aiortc's clamp, as
    ``set_encoder_target``): it reads its target when it opens, at the first frame."""
    make_encoder(sender, lambda codec, encoder: set_encoder_target(encoder, bps))
