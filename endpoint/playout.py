"""The receivers' buffers: audio in order, with a bounded delay and a bounded wait for a lost
packet; video complete at its last packet.

aiortc's audio receiver holds 4 frames and waits for a missing packet until its buffer is full
(16 packets, 320 ms). It then hands on one frame per packet that arrives, so it never drains:
after the first lost packet, every later frame is played about 300 ms late. On the compose
lab's 5 % loss the audio latency went from 43 ms to 282 ms (p50), and the E-model scored it
1.0. A receiver plays out on its schedule (a browser conceals what did not come). This one
holds ``depth`` frames, and it gives up on a missing packet once ``depth`` packets after it are
in: the gap counts as lost (the decoded frames' timestamps jump; nothing is concealed), and the
frames after it play with no more delay than before.
"""

from __future__ import annotations

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_add

CAPACITY = 16  #: packets held at most (aiortc's own for audio)


class PlayoutBuffer:
    """In place of aiortc's JitterBuffer for audio, where a packet is a frame (Opus in RTP):
    packets held in sequence order, one played per packet that comes in once ``depth`` are held
    beyond it, and a missing one skipped when its turn comes with ``depth`` packets after it in
    (so it waits for a late packet as long as the buffer is deep, and no longer)."""

    def __init__(self, depth: int = 1, capacity: int = CAPACITY) -> None:
        self.depth = max(1, depth)
        self.capacity = capacity
        self._held: dict[int, RtpPacket] = {}
        self._next: int | None = None  #: the sequence number to play next
        self.skipped = 0  #: packets given up on
        self.late = 0  #: packets that came after their turn (dropped)

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        """Take a packet; the frame to decode now, if any (and no keyframe request: audio)."""
        seq = packet.sequence_number
        if self._next is None:
            self._next = seq
        ahead = uint16_add(seq, -self._next)
        if ahead >= 0x8000 or seq in self._held:
            self.late += 1
            return False, None
        if ahead >= self.capacity:  # a jump (a new stream, or a long outage): start from here
            self.skipped += ahead
            self._held.clear()
            self._next = seq
        self._held[seq] = packet
        if len(self._held) <= self.depth:
            return False, None
        while self._next not in self._held:
            self._next = uint16_add(self._next, 1)
            self.skipped += 1
        out = self._held.pop(self._next)
        self._next = uint16_add(self._next, 1)
        return False, JitterFrame(data=out._data, timestamp=out.timestamp)


class MarkedFrameBuffer(JitterBuffer):
    """aiortc's video jitter buffer, but a frame is complete at its last packet (the RTP marker
    bit) rather than when the next frame's first packet comes in, as a WebRTC receiver takes it.
    aiortc's own holds every frame one frame interval more (33 ms at 30 fps, 67 ms at 15):
    video latency measured 40 ms on the local stack with 33 of them that wait, and lip sync at
    15 fps read 28 ms of sound before the picture for it. A frame whose marker is lost still
    completes when the next one starts, as before."""

    def __init__(self, capacity: int = 512) -> None:
        super().__init__(capacity=capacity, is_video=True)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        assert self._origin is not None
        packets: list[RtpPacket] = []
        for count in range(self._capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:
                return None  # a packet missing: wait (NACK, or StallGuard)
            if packets and packet.timestamp != packets[0].timestamp:
                return self._take(packets, count)  # the next frame began: this one is whole
            packets.append(packet)
            if packet.marker:
                return self._take(packets, count + 1)
        return None

    def _take(self, packets: list[RtpPacket], count: int) -> JitterFrame:
        frame = JitterFrame(data=b"".join(p._data for p in packets),  # type: ignore[attr-defined]
                            timestamp=packets[0].timestamp)
        self.remove(count)
        return frame
