"""Pure pieces of RTP that servers and devices both use: where a packet's payload is, whether it
starts a keyframe, and how a forwarded stream's sequence numbers and timestamps are mapped and
its keyframe requests coalesced. No I/O; time is an argument."""

from __future__ import annotations

from aiortc.rtcrtpparameters import RTCRtpCodecParameters


class SequenceMap:
    """Maps an incoming stream's sequence numbers and timestamps onto an outgoing stream.

    The offsets are fixed when a stream (re)starts, so a gap stays a gap; after a restart the
    outgoing numbers continue from where the previous stream stopped.
    """

    def __init__(self, seq_origin: int, ts_origin: int) -> None:
        self._seq_delta = 0
        self._ts_delta = 0
        self._start: int | None = None
        self._next_seq = seq_origin & 0xFFFF
        self._last_ts = ts_origin & 0xFFFFFFFF
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    def restart(self, seq: int, ts: int, ts_step: int = 0) -> None:
        """Begin mapping at incoming (seq, ts); ``ts_step`` is the timestamp gap to leave."""
        out_ts = (self._last_ts + ts_step) & 0xFFFFFFFF if self._started else self._last_ts
        self._seq_delta = (self._next_seq - seq) & 0xFFFF
        self._ts_delta = (out_ts - ts) & 0xFFFFFFFF
        self._start = seq
        self._started = True

    def map(self, seq: int, ts: int) -> tuple[int, int] | None:
        """The outgoing (seq, ts), or None for a packet from before the restart."""
        assert self._start is not None, "map() before restart()"
        if (seq - self._start) & 0xFFFF >= 0x8000:
            return None
        out_seq = (seq + self._seq_delta) & 0xFFFF
        out_ts = (ts + self._ts_delta) & 0xFFFFFFFF
        if (out_seq - self._next_seq) & 0xFFFF < 0x8000:
            self._next_seq = (out_seq + 1) & 0xFFFF
            self._last_ts = out_ts
        return out_seq, out_ts


class RequestLimiter:
    """Coalesces keyframe requests: at most one per ``interval``; one asked for inside the
    interval is sent once when it ends, however many were asked for."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = float("-inf")
        self.pending = False

    def ask(self, now: float) -> float | None:
        """0 to send now; a delay to send later (schedule it once); None: already coming."""
        if self.pending:
            return None
        wait = self._last + self.interval - now
        if wait <= 0:
            self._last = now
            return 0.0
        self.pending = True
        return wait

    def fired(self, now: float) -> None:
        """The delayed request went out."""
        self.pending = False
        self._last = now


def is_keyframe(codec: str, payload: bytes) -> bool:
    """Does this RTP payload start a keyframe? ``codec`` is a mime type (video/VP8, video/H264)."""
    if not payload:
        return False
    name = codec.lower()
    if name == "video/vp8":
        # RFC 7741: payload descriptor, then the VP8 payload header whose P bit is 0 for a
        # keyframe; only the packet that starts partition 0 (S=1, PID=0) carries that header.
        first = payload[0]
        if not first & 0x10 or first & 0x0F:
            return False
        i = 1
        if first & 0x80:
            if len(payload) < 2:
                return False
            ext = payload[1]
            i = 2
            if ext & 0x80:  # picture id, 7 or 15 bits
                if len(payload) <= i:
                    return False
                i += 2 if payload[i] & 0x80 else 1
            if ext & 0x40:  # TL0PICIDX
                i += 1
            if ext & 0x30:  # TID / KEYIDX
                i += 1
        return len(payload) > i and not payload[i] & 0x01
    if name == "video/h264":
        # RFC 6184: an IDR slice or SPS, alone, in a STAP-A, or at the start of a FU-A.
        nal = payload[0] & 0x1F
        if nal in (5, 7):
            return True
        if nal == 24:
            i = 1
            while i + 2 < len(payload):
                size = int.from_bytes(payload[i:i + 2], "big")
                if payload[i + 2] & 0x1F in (5, 7):
                    return True
                i += 2 + size
            return False
        if nal == 28 and len(payload) > 1:
            return bool(payload[1] & 0x80) and payload[1] & 0x1F in (5, 7)
        return False
    return True  # audio and codecs without keyframes: any packet will do


def payload_of(packet: bytes | memoryview) -> bytes | memoryview:
    """The payload of a plain RTP packet (after CSRCs, header extension and before padding)."""
    offset = 12 + 4 * (packet[0] & 0x0F)
    if packet[0] & 0x10 and len(packet) >= offset + 4:
        offset += 4 + 4 * int.from_bytes(packet[offset + 2:offset + 4], "big")
    end = len(packet) - (packet[-1] if packet[0] & 0x20 and len(packet) > offset else 0)
    return packet[offset:end]


def same_codec(a: RTCRtpCodecParameters, b: RTCRtpCodecParameters) -> bool:
    if a.mimeType.lower() != b.mimeType.lower() or a.clockRate != b.clockRate:
        return False
    if a.mimeType.lower() == "video/h264":
        return (a.parameters.get("packetization-mode", 0)
                == b.parameters.get("packetization-mode", 0))
    return True


#: bytes of the VP8 payload descriptor :func:`vp8_payloads` writes (X, I, a 15-bit picture id)
VP8_DESCRIPTOR = 4
#: the most bytes of an RTP payload aiortc's own VP8 packetizer makes (its PACKET_MAX)
VP8_PAYLOAD_MAX = 1300


def vp8_payloads(frame: bytes, picture_id: int, payload_size: int = VP8_PAYLOAD_MAX
                 ) -> list[bytes]:
    """The RTP payloads of one encoded VP8 frame (RFC 7741), each at most ``payload_size``
    bytes, the descriptor carrying ``picture_id``. At the default, the same bytes aiortc's
    sender makes; larger for a sender that fills a larger MTU, as GStreamer (1,400) or a
    browser may."""
    if payload_size <= VP8_DESCRIPTOR:
        raise ValueError(f"an RTP payload of {payload_size} bytes has no room for VP8 data")
    chunk = payload_size - VP8_DESCRIPTOR
    pid = picture_id & 0x7FFF
    payloads = []
    for at in range(0, len(frame), chunk):
        first = 0x90 if at == 0 else 0x80  # X=1, S on the frame's first packet, PID 0
        payloads.append(bytes((first, 0x80, 0x80 | pid >> 8, pid & 0xFF))
                        + frame[at:at + chunk])
    return payloads
