"""Packet-level media for load devices: the pre-encoded loop sent as ready RTP packets, and what
arrives counted without decoding.

A device in ``--video packets`` mode spends per packet only a header rewrite, SRTP and a
``sendto``, and on receipt an SRTP unprotect and a few counters: no packetizer, no jitter buffer,
no decoder. That is how one 2-core machine hosts dozens of devices, or drives a relay with many
streams without the load side being the bottleneck.

The frame counter stays readable: every packet's VP8 payload descriptor carries the picture id,
which is the frame's index in the loop. A receiver takes a frame as complete at its marker packet
and, when the sender is a device of the same process, looks its send time up in the SendLog, so
latency is "first packet of the frame sent -> last packet received" (network and relays; no
encoding, decoding or jitter buffer). Across processes frames, loss and fps are still counted.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCRtpTransceiver
from aiortc.mediastreams import MediaStreamError

from endpoint.meter import AudioMeter, PartMeter, SendLog, VideoMeter
from endpoint.sources import AUDIO_PTIME, AUDIO_RATE, VIDEO_CLOCK, EncodedLoop, Pacer
from endpoint.stamp import Stamp
from rtc.adapter import RtcpDispatcher, SenderTap, ntp_now
from rtc.congestion import abs_send_time_offset, abs_send_time_value
from rtc.rtp import VP8_PAYLOAD_MAX, payload_of, vp8_payloads

AUDIO_STEP = round(AUDIO_RATE * AUDIO_PTIME)  #: RTP timestamp step of one Opus packet


@dataclass(frozen=True)
class PacketLoop:
    """The pre-encoded VP8 loop as RTP payloads (loop frame ``k`` has picture id ``k``), and one
    Opus packet of tone sent again and again."""

    fps: float
    frames: tuple[tuple[bytes, ...], ...]
    audio: bytes

    @classmethod
    def from_loop(cls, loop: EncodedLoop, payload_size: int | None = None) -> PacketLoop:
        """``payload_size``: the most bytes of an RTP payload (default: aiortc's packetizer's,
        1,300); larger ones make RTP packets as GStreamer's (MTU 1,400) or larger."""
        size = payload_size or VP8_PAYLOAD_MAX
        frames = tuple(tuple(vp8_payloads(data, k, size)) for k, data in enumerate(loop.frames))
        return cls(loop.fps, frames, opus_tone())


def opus_tone(frequency: float = 450.0) -> bytes:
    """One 20 ms Opus packet of a steady tone (450 Hz: a whole number of cycles per packet,
    so the same packet repeated plays a continuous tone)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate, codec.format, codec.layout = AUDIO_RATE, "s16", "mono"
    codec.bit_rate = 32000
    t = np.arange(AUDIO_STEP) / AUDIO_RATE
    samples = (np.sin(2 * np.pi * frequency * t) * 8000).astype(np.int16).reshape(1, -1)
    packets: list[bytes] = []
    for n in range(10):  # past the encoder's start-up
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate, frame.pts = AUDIO_RATE, n * AUDIO_STEP
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        packets += [bytes(p) for p in codec.encode(frame)]
    if not packets:
        raise RuntimeError("the Opus encoder returned no packet")
    return packets[-1]


def vp8_picture_id(payload: bytes | memoryview) -> int | None:
    """The picture id in a VP8 RTP payload descriptor (RFC 7741), if it carries one."""
    if len(payload) < 3 or not payload[0] & 0x80 or not payload[1] & 0x80:
        return None
    if payload[2] & 0x80:
        return ((payload[2] & 0x7F) << 8) | payload[3] if len(payload) > 3 else None
    return payload[2]


class IdleTrack(MediaStreamTrack):
    """What a packet sender's aiortc sender holds: it never yields a frame (packets are sent
    past it), so aiortc neither encodes nor packetizes, but still runs its RTCP."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._stopped = asyncio.Event()

    async def recv(self):  # type: ignore[override]
        await self._stopped.wait()
        raise MediaStreamError

    def stop(self) -> None:
        super().stop()
        self._stopped.set()


class PacketSender:
    """Plays the loop (video) or the tone packet (audio) on one transceiver, in real time."""

    def __init__(self, transceiver: RTCRtpTransceiver, kind: str, loop: PacketLoop,
                 rtcp: RtcpDispatcher,
                 on_sent: Callable[[int, int, float], None] | None = None,
                 clock: Callable[[], float] = time.time, part: PartMeter | None = None
                 ) -> None:
        self.kind = kind
        self.loop = loop
        self.tap = SenderTap(transceiver)
        # keyframe requests restart the loop; NACKs are answered from the tap's history
        rtcp.on(transceiver.sender, keyframe=self.request_keyframe, nack=self._retransmit)
        self._on_sent = on_sent
        self._clock = clock
        #: the sender's own part of each frame: its logged send time -> its last packet sent
        self._part = part
        self._position = 0
        self.keyframe_requests = 0
        self.packets = 0

    async def _retransmit(self, lost: list[int]) -> bool:
        await self.tap.retransmit(lost)
        return True

    def request_keyframe(self) -> bool:
        self._position = 0
        self.keyframe_requests += 1
        return True

    async def run(self) -> None:
        tap = self.tap
        await tap.started()  # aiortc starts the sender once connected
        assert tap.codec is not None
        payload_type = tap.codec.payloadType
        seq, ts = SenderTap.new_origin()
        if self.kind == "audio":
            templates: tuple[tuple[bytes, ...], ...] = (
                (tap.packet(self.loop.audio, False, payload_type),),)
            interval, step = AUDIO_PTIME, AUDIO_STEP
        else:
            # abs-send-time on video, as aiortc's own senders write it: the servers' congestion
            # control estimates from it (this source cannot adapt, but it is measured the same)
            templates = tuple(
                tuple(tap.packet(p, i == len(frame) - 1, payload_type, abs_send_time=True)
                      for i, p in enumerate(frame)) for frame in self.loop.frames)
            interval, step = 1 / self.loop.fps, round(VIDEO_CLOCK / self.loop.fps)
        ext_id = tap.abs_send_time_id()
        offset = abs_send_time_offset(templates[0][0], ext_id) if self.kind == "video" else None
        pacer = Pacer(interval)
        n = 0
        while True:
            await pacer.wait(n)
            k = self._position % len(templates)
            at = self._clock()
            if self._on_sent is not None:
                self._on_sent(k, n, at)
            stamp = (offset, abs_send_time_value(ntp_now())) if offset is not None else None
            for template in templates[k]:
                if tap.send_rewritten(template, len(template), payload_type, seq,
                                      ts, stamp):
                    self.packets += 1
                seq = (seq + 1) & 0xFFFF
            if self._part is not None:
                self._part.begin(n, at)
                self._part.end(n, self._clock())
            ts = (ts + step) & 0xFFFFFFFF
            self._position = k + 1
            n += 1


class PacketCounter:
    """Counts one received stream's packets as they come off the socket (see DatagramTap):
    video frames complete at their marker packet, read by picture id; audio packets."""

    def __init__(self, kind: str, video: VideoMeter, audio: AudioMeter, loop_frames: int,
                 send_log: SendLog, peer: str, on_first_frame: Callable[[float], None],
                 clock: Callable[[], float] = time.time,
                 arrival: Callable[[], float] | None = None) -> None:
        self.kind = kind
        #: when the kernel took in the datagram being handled (0.0: unknown): the receiver's
        #: own part of a frame is its last packet's wait from there until it is counted
        self._arrival = arrival
        self.video, self.audio = video, audio
        self.loop_frames = loop_frames
        self.send_log, self.peer = send_log, peer
        self._on_first_frame = on_first_frame
        self._clock = clock
        self.packets = 0
        self.packets_lost = 0
        self._last_seq: int | None = None
        self._last_k: int | None = None
        self._counter = 0

    def on_datagram(self, plain: memoryview, length: int) -> None:
        self.packets += 1
        seq = (plain[2] << 8) | plain[3]
        if self._last_seq is not None:
            step = (seq - self._last_seq) & 0xFFFF
            if step == 0 or step > 0x7FFF:
                return  # a repeat or a late (retransmitted) packet
            self.packets_lost += step - 1
        self._last_seq = seq
        if self.kind == "audio":
            self.audio.frames += 1
        elif plain[1] & 0x80:
            self._frame(payload_of(plain[:length]))

    def _frame(self, payload: bytes | memoryview) -> None:
        k = vp8_picture_id(payload)
        if k is None:
            self.video.unreadable += 1
            return
        now = self._clock()
        # The frame is in when its last packet reached this host (the kernel's time): with no
        # decoder there is nothing else a viewer would wait for. This device's own handling
        # after that is its receiver part, and it is kept out of the frame's time: 20 devices
        # in one process stall its loop for up to 270 ms now and then, which counted as
        # freezes of frames that had all arrived on time (49 in 19,308 frames, loss-free;
        # by arrival none: docs/endpoint.md).
        at = now
        if self._arrival is not None and (arrived := self._arrival()) > 0:
            self.video.receiver.begin(k, arrived)
            self.video.receiver.end(k, now)
            at = arrived
        logged = self.send_log.sent_at(self.peer, k)
        if logged is not None:
            found, sent_at = Stamp(logged[0], 0), logged[1]
        else:  # no send log: unwrap the loop index into a frame counter, latency unknown
            if self._last_k is not None:
                self._counter += (k - self._last_k) % self.loop_frames or self.loop_frames
            self._last_k = k
            found, sent_at = Stamp(self._counter, 0), None
        if self.video.frame(found, at, timed=sent_at is not None, sent_at=sent_at):
            self._on_first_frame(now)
