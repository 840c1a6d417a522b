"""Fake taps and transports for the media graph's unit tests: no sockets, no aiortc peers (in the
way pion tests an interceptor against a mock stream). They record what the graph asked of them."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from aiortc.rtcrtpparameters import RTCRtpCodecParameters

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
H264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102,
                             parameters={"packetization-mode": "1"})

KEY = b"\x10\x00" + b"k" * 40  #: a VP8 payload that starts a keyframe (S=1, PID=0, P=0)
DELTA = b"\x10\x01" + b"d" * 40  #: one that starts an inter frame (P=1)
MORE = b"\x00" + b"m" * 40  #: a later packet of a frame


def rtp(seq: int, ts: int, payload: bytes, ssrc: int = 0x1234, marker: bool = True,
        pt: int = 96) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF,
                       ts & 0xFFFFFFFF, ssrc) + payload


def header(packet: bytes) -> tuple[int, int, int, int]:
    """(payload type, sequence number, timestamp, SSRC) of a plain RTP packet."""
    _, m_pt, seq, ts, ssrc = struct.unpack_from("!BBHII", packet)
    return m_pt & 0x7F, seq, ts, ssrc


class FakeReceiverTap:
    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.accounted: list[tuple[int, int, bool]] = []
        self.keyframe_requests: list[int] = []
        self.rembs: list[int] = []
        self.released = self.closed = self.decoder_stopped = False
        self.receiver_mid = "0"
        self.extensions = "source-map"
        self.receiver = SimpleNamespace(track="the remote track")

    def account(self, ssrc: int, seq: int, ts: int, clock_rate: int, repair: bool = False
                ) -> None:
        self.accounted.append((ssrc, seq, repair))

    def loss(self, ssrc: int) -> tuple[int, int, int | None]:
        return 0, 0, None

    def extension_ids(self) -> object:
        return ("mid", 1)

    def abs_send_time_id(self) -> int:
        return 0

    def stop_decoder(self) -> None:
        self.decoder_stopped = True

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True

    async def request_keyframe(self, ssrc: int) -> None:
        self.keyframe_requests.append(ssrc)

    async def send_remb(self, ssrc: int, bitrate: int) -> None:
        self.rembs.append(bitrate)


@dataclass
class FakeSender:
    _ssrc: int


class FakeSenderTap:
    def __init__(self, ssrc: int, codec: RTCRtpCodecParameters | None, mid: str = "0") -> None:
        self.sender = FakeSender(ssrc)
        self.codec = codec
        self.mid = mid
        self.oversize = 0
        self.connected = True
        self.room = 1904
        self.sent: list[bytes] = []
        self.reheadered = 0
        self.retransmitted: list[int] = []

    def extension_ids(self) -> object:
        return ("mid", 1)

    def send_rewritten(self, source: Any, length: int, payload_type: int, seq: int, ts: int,
                       stamp: Any = None) -> int | None:
        if not self.connected:
            return None
        if length > self.room:
            self.oversize += 1
            return 0
        out = bytearray(source[:length])
        struct.pack_into("!BHII", out, 1, (out[1] & 0x80) | payload_type, seq, ts,
                         self.sender._ssrc)
        self.sent.append(bytes(out))
        return length + 10

    def send_reheadered(self, source: Any, length: int, extensions: object, payload_type: int,
                        seq: int, ts: int) -> int | None:
        self.reheadered += 1
        return self.send_rewritten(source, length, payload_type, seq, ts)

    async def retransmit(self, lost: list[int]) -> None:
        self.retransmitted += lost


class FakeDatagrams:
    def __init__(self) -> None:
        self.routes: dict[int, Any] = {}

    def route(self, ssrc: int, handler: Any) -> None:
        self.routes[ssrc] = handler

    def unroute(self, ssrc: int) -> None:
        self.routes.pop(ssrc, None)

    def kernel_arrival(self) -> float:
        return 0.0


class FakeRtcp:
    def __init__(self) -> None:
        self.handlers: dict[int, dict[str, Any]] = {}

    def on(self, sender: FakeSender, **handlers: Any) -> None:
        self.handlers[sender._ssrc] = handlers

    def off(self, sender: FakeSender) -> None:
        self.handlers.pop(sender._ssrc, None)


@dataclass
class FakeTransport:
    """A transport of the graph with fake taps: ``codec`` is what its senders negotiated."""

    name: str
    codec: dict[str, RTCRtpCodecParameters | None] = field(
        default_factory=lambda: {"video": VP8, "audio": OPUS})
    ssrc_base: int = 0x5000
    producers: list[Any] = field(default_factory=list)
    consumers: list[Any] = field(default_factory=list)
    datagrams: FakeDatagrams = field(default_factory=FakeDatagrams)
    rtcp: FakeRtcp = field(default_factory=FakeRtcp)
    receivers: dict[str, FakeReceiverTap] = field(default_factory=dict)
    senders: dict[str, FakeSenderTap] = field(default_factory=dict)
    attached: dict[str, Any] = field(default_factory=dict)
    closed: bool = False

    @property
    def kinds(self) -> set[str]:
        return set(self.codec)

    def receiver(self, kind: str, handler: Any, counters: Any) -> FakeReceiverTap:
        tap = self.receivers[kind] = FakeReceiverTap(handler)
        return tap

    def sender(self, kind: str, counters: Any) -> FakeSenderTap:
        tap = self.senders[kind] = FakeSenderTap(self.ssrc_base + len(self.senders),
                                                 self.codec[kind])
        return tap

    def attach_track(self, kind: str, source: Any) -> None:
        self.attached[kind] = source

    def close(self, why: str = "transport closed") -> None:
        from rtc.graph import Transport

        Transport.close(self, why)  # type: ignore[arg-type]
