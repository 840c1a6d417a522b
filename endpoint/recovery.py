"""A device's video receiver recovers from a packet lost for good.

aiortc's jitter buffer releases a frame only once every packet before it is in: one packet that
no retransmission brings back holds every later frame until 512 packets have piled up behind it
(17 s at 30 packets a second), and only then asks for a keyframe. On a congested link that is a
frozen call. :class:`StallGuard` does what a WebRTC receiver does instead: when no frame has come
out for ``stall_s`` while packets keep arriving, it asks the sender for a keyframe (PLI, at most
every ``interval_s``), and when the keyframe's first packet arrives it drops what is held before
it, so decoding starts again there.

It also drains the buffer: aiortc releases at most one frame per packet that arrives, so frames
held back once (a stall, a burst) stay behind for good when a frame is a single packet, as at a
low bitrate: a standing delay of as many frames. Every complete frame is released at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiortc.codecs import is_rtx
from aiortc.utils import uint16_add

from rtc.adapter import (
    buffer_origin,
    decoder_running,
    jitter_buffer,
    queue_for_decoding,
    receiver_codecs,
    take_frame,
)
from rtc.rtp import is_keyframe


class StallGuard:
    def __init__(self, receiver: Any, request_keyframe: Callable[[int], None],
                 stall_s: float = 0.3, interval_s: float = 1.0) -> None:
        self._receiver = receiver
        self._buffer = jitter_buffer(receiver)
        self._codecs = receiver_codecs(receiver)
        self._request = request_keyframe
        self.stall_s, self.interval_s = stall_s, interval_s
        self._origin: int | None = None
        self._progress_at: float | None = None
        self._asked_at = float("-inf")
        self.keyframes_asked = 0
        self.skipped = 0  #: packets dropped to start again at a keyframe
        self.drained = 0  #: frames released that aiortc would have held back

    def after(self, packet: Any, now: float) -> None:
        """``packet`` was just handed to the jitter buffer, at ``now``."""
        if buffer_origin(self._buffer) != self._origin:
            # aiortc released a frame: more may be complete (while it released none, none is)
            self._drain(packet)
            self._origin, self._progress_at = buffer_origin(self._buffer), now
            return
        origin = self._origin
        assert origin is not None and self._progress_at is not None
        if now - self._progress_at < self.stall_s:
            return
        codec = self._codecs.get(packet.payload_type)
        held = uint16_add(packet.sequence_number, -origin)
        if codec is not None and 0 < held < 0x8000 and is_keyframe(codec.mimeType,
                                                                     packet.payload):
            self._buffer.remove(held)  # everything before the keyframe's first packet
            self.skipped += held
            self._origin, self._progress_at = buffer_origin(self._buffer), now
        elif now - self._asked_at >= self.interval_s:
            self._asked_at = now
            self.keyframes_asked += 1
            self._request(packet.ssrc)

    def _drain(self, packet: Any) -> None:
        """Hand the decoder every complete frame still held (as aiortc does with one)."""
        receiver = self._receiver
        if not decoder_running(receiver):
            return
        codec = self._codecs.get(packet.payload_type)
        if codec is not None and is_rtx(codec):
            codec = self._codecs.get(codec.parameters.get("apt"))
        if codec is None:
            return
        while (frame := take_frame(self._buffer, packet.sequence_number)) is not None:
            queue_for_decoding(receiver, codec, frame)
            self.drained += 1
