"""Everything that reaches into aiortc and aioice internals lives here, and only here.

Checked against aiortc 1.16 / aioice 0.13 (pinned in pyproject.toml); tests/test_rtc.py fails
loudly if an internal this module relies on moves (see :func:`check_internals`).

Why internals at all:
- aioice leaves 127.0.0.1 out of its host candidates, so a call "on loopback" would really pair on
  eth0. Servers and devices take a list of media addresses (like mediasoup's listenIps) and gather
  host candidates on exactly those.
- aiortc asks a public STUN server unless told otherwise: every peer connection gets an explicit
  configuration without one (or with the servers the operator configured).
- Forwarding without transcoding: aiortc's receiver always reassembles and decodes, and its sender
  always encodes or re-packetizes. :class:`ReceiverTap` takes each decrypted RTP packet off a
  receiver (keeping aiortc's RTCP statistics, RTX unwrapping and NACK generation), and
  :class:`SenderTap` sends packets as a sender's own stream (its SSRC, payload type and MID, kept
  in its history so aiortc's NACK/RTX answering works) and hands PLI/FIR to the relay.
"""

from __future__ import annotations

import fcntl
import inspect
import logging
import struct
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiortc.rtcdtlstransport
import aiortc.rtcrtpreceiver
import pylibsrtp
from aioice import Connection
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
)
from aiortc.codecs import get_encoder, is_rtx
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtcrtpsender import RTP_HISTORY_SIZE
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    HeaderExtensionsMap,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    RtpPacket,
    pack_remb_fci,
    unpack_remb_fci,
    unwrap_rtx,
)
from aiortc.sdp import SessionDescription
from aiortc.utils import random16, random32
from pylibsrtp._binding import ffi as _srtp_ffi
from pylibsrtp._binding import lib as _srtp_lib

from rtc.congestion import Resends
from wire.logs import event
from wire.tasks import Serial, Tasks

log = logging.getLogger("rtc.adapter")


@dataclass(frozen=True)
class MediaSettings:
    """Where media may flow, for one service."""

    #: IPv4/IPv6 addresses to gather host candidates on; empty means every non-loopback address
    #: (aioice's own choice).
    addresses: tuple[str, ...] = ()
    #: STUN/TURN URLs ("stun:host:port", "turn:host:port"); empty for none.
    ice_servers: tuple[str, ...] = ()


#: bytes of each SRTP session's work buffer. pylibsrtp's is 1,500, less its largest trailer (144)
#: for protect: a 1,400-byte RTP packet (GStreamer's payloaders' default MTU) raised inside
#: aiortc's DTLS transport and closed the leg. This leaves room for any packet of a 1,500-byte
#: path; an incoming datagram longer than the buffer is dropped as an SRTP error, not raised.
SRTP_BUFFER = 2048
SRTP_TRAILER = 144  #: pylibsrtp's SRTP_MAX_TRAILER_LEN: the most protect may append


class RoomySession(pylibsrtp.Session):
    """A pylibsrtp Session with room for every RTP packet a standard peer sends."""

    def __init__(self, policy: pylibsrtp.Policy | None = None) -> None:
        super().__init__(policy)
        self._cdata = _srtp_ffi.new("char[]", SRTP_BUFFER)
        self._buffer = _srtp_ffi.buffer(self._cdata)

    def unprotect(self, packet: bytes) -> bytes:
        return super().unprotect(_fits(packet))

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        return super().unprotect_rtcp(_fits(packet))


def _fits(datagram: bytes) -> bytes:
    """``datagram``, if a RoomySession's buffer holds it: a longer one is an SRTP error (aiortc
    drops it), not pylibsrtp's ValueError, which would end aiortc's DTLS loop and the leg."""
    if len(datagram) > SRTP_BUFFER:
        raise pylibsrtp.Error(f"a datagram of {len(datagram)} bytes is longer than any packet "
                              f"({SRTP_BUFFER})")
    return datagram


def new_peer_connection(media: MediaSettings) -> RTCPeerConnection:
    """A peer connection that bundles everything on one transport and asks no public server."""
    # aiortc makes its SRTP sessions with the name its DTLS module imported: ours, roomier.
    aiortc.rtcdtlstransport.Session = RoomySession  # type: ignore[misc]
    config = RTCConfiguration(
        iceServers=[RTCIceServer(urls=url) for url in media.ice_servers],
        bundlePolicy=RTCBundlePolicy.MAX_BUNDLE,
    )
    return RTCPeerConnection(configuration=config)


def restrict_host_candidates(pc: RTCPeerConnection, addresses: Sequence[str]) -> None:
    """Gather host candidates of ``pc`` on ``addresses`` only.

    Call after the transceivers exist (offerer: after addTransceiver; answerer: after
    setRemoteDescription) and before setLocalDescription, which gathers.
    """
    if not addresses:
        return
    for connection in _ice_connections(pc):
        connection.gather_candidates = types.MethodType(_gather_on(tuple(addresses)), connection)


def _ice_connections(pc: RTCPeerConnection) -> list[Connection]:
    found: list[Connection] = []
    for transceiver in pc.getTransceivers():
        connection = transceiver.receiver.transport.transport.iceGatherer._connection
        if connection not in found:
            found.append(connection)
    return found


def _gather_on(addresses: tuple[str, ...]):
    async def gather_candidates(self: Connection) -> None:
        # Mirrors aioice.Connection.gather_candidates with the address list given, not discovered.
        if self._local_candidates_start:
            return
        self._local_candidates_start = True
        for component in sorted(self._components):
            self._local_candidates += await self.get_component_candidates(
                component=component, addresses=list(addresses))
        self._local_candidates_end = True

    return gather_candidates


def prefer_video_codec(transceiver: RTCRtpTransceiver, mime: str, only: bool = False) -> None:
    """Put ``mime`` first among the transceiver's video codecs (or offer nothing else).

    The answerer takes the offer's order, so this decides the codec wherever both sides have it.
    On the answering side it must come before setRemoteDescription.
    """
    capabilities = RTCRtpSender.getCapabilities("video").codecs
    wanted = [c for c in capabilities if c.mimeType.lower() == mime.lower()]
    if not wanted:
        raise ValueError(f"video codec {mime!r} is not supported here")
    rtx = [c for c in capabilities if c.mimeType.lower() == "video/rtx"]
    others = [c for c in capabilities if c not in wanted and c not in rtx]
    transceiver.setCodecPreferences(wanted + ([] if only else others) + rtx)


_NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900-01-01 (NTP) to 1970-01-01 (UNIX)


def ntp_now() -> int:
    """The 64-bit NTP time now, as aiortc's RTCP sender reports use it (without datetimes)."""
    now = time.time() + _NTP_EPOCH_OFFSET
    return (int(now) << 32) | int((now % 1) * (1 << 32))


#: the plain packet ``data`` (header extensions as the leg wrote them), its codec, whether it came
#: as a retransmission (RTX, unwrapped), and when aiortc read it (s, UNIX time)
PacketHandler = Callable[[bytes, RTCRtpCodecParameters, bool, float], None]


class LossCounters(Protocol):
    """Where the taps count loss repair (a server's ForwardingStats)."""

    nacks_sent: int
    retransmissions: int


class _NoCounters:
    nacks_sent = 0
    retransmissions = 0


class _Seen:
    """What aiortc's receiver statistics and NACK generator read of a packet (reused)."""

    __slots__ = ("sequence_number", "timestamp")

    def __init__(self) -> None:
        self.sequence_number = 0
        self.timestamp = 0


class ReceiverTap:
    """Takes every decrypted RTP packet off ``receiver`` that the fast path (DatagramTap) did not,
    and hands it to ``handler`` as the bytes the peer sent (RTX unwrapped): the slow path enters
    the same stages as the fast one (rtc/stages.py).

    What aiortc does per packet and a relay still needs is kept, in :meth:`account` (called by
    the accounting stage for every packet, either path): RTCP receiver statistics (so receiver
    reports stay true) and NACKs for missing packets (loss is repaired on each hop). What it does
    not need (jitter buffer, decoder, bitrate estimator) is skipped.
    """

    def __init__(self, transceiver: RTCRtpTransceiver, handler: PacketHandler,
                 counters: LossCounters | None = None) -> None:
        receiver = transceiver.receiver
        self._counters = counters or _NoCounters()
        self.transceiver = transceiver
        self.receiver = receiver
        self._handler = handler
        # The same dict objects aiortc fills in receive(): looked up once, not per packet.
        self._codecs: dict[int, RTCRtpCodecParameters] = receiver._RTCRtpReceiver__codecs
        self._streams: dict[int, StreamStatistics] = receiver._RTCRtpReceiver__remote_streams
        self._rtx_ssrc: dict[int, int] = receiver._RTCRtpReceiver__rtx_ssrc
        self._nack = receiver._RTCRtpReceiver__nack_generator
        #: how the leg writes header extensions (parses and serializes this leg's packets)
        self.extensions: HeaderExtensionsMap = receiver.transport._rtp_header_extensions_map
        self._seen = _Seen()
        #: the NACKs this receiver sends go out one after another, not a task each
        self._tasks = Tasks("receiver")
        self._rtcp = Serial(self._tasks, "nacks")
        receiver._handle_rtp_packet = self._handle  # type: ignore[method-assign]

    @property
    def receiver_mid(self) -> str | None:
        return self.transceiver.mid

    def account(self, ssrc: int, seq: int, ts: int, clock_rate: int, repair: bool = False
                ) -> None:
        """Count a packet as aiortc would: receiver statistics for RTCP reports (not for a
        retransmission: its RTX stream counted it), and a NACK for any packet found missing."""
        seen = self._seen
        seen.sequence_number, seen.timestamp = seq, ts
        if not repair:
            stats = self._streams.get(ssrc) or self._statistics(ssrc, clock_rate)
            stats.add(seen)  # type: ignore[arg-type]
        nack = self._nack
        if (nack is not None and not nack.missing and nack.max_seq is not None
                and seq == (nack.max_seq + 1) & 0xFFFF):
            nack.max_seq = seq  # in order, nothing missing: all NackGenerator.add would do
            return
        if nack is not None and nack.add(seen):  # type: ignore[arg-type]
            self._counters.nacks_sent += 1
            self._rtcp.post(self.receiver._send_rtcp_nack(ssrc, sorted(nack.missing)))

    def loss(self, ssrc: int) -> tuple[int, int, int | None]:
        """What arrived of ``ssrc`` so far, from the receiver statistics kept for RTCP:
        (lost before repair, retransmissions that arrived, jitter in RTP units)."""
        stats = self._streams.get(ssrc)
        repaired = sum(self._streams[rtx].packets_received for rtx, original in
                       self._rtx_ssrc.items() if original == ssrc and rtx in self._streams)
        if stats is None:
            return 0, repaired, None
        return stats.packets_lost, repaired, stats.jitter

    def _statistics(self, ssrc: int, clock_rate: int) -> StreamStatistics:
        stats = self._streams.get(ssrc)
        if stats is None:
            stats = self._streams[ssrc] = StreamStatistics(clock_rate)
        return stats

    async def _handle(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        codec = self._codecs.get(packet.payload_type)
        if codec is None:
            return
        repair = is_rtx(codec)
        if repair:
            self._statistics(packet.ssrc, codec.clockRate).add(packet)  # repairs, counted
            original = self._rtx_ssrc.get(packet.ssrc)
            apt = codec.parameters.get("apt")
            if original is None or len(packet.payload) < 2 or apt not in self._codecs:
                return
            packet = unwrap_rtx(packet, payload_type=apt, ssrc=original)  # type: ignore[arg-type]
            codec = self._codecs[apt]  # type: ignore[index]
        arrived = arrival_time_ms / 1000 - _NTP_EPOCH_OFFSET  # aiortc counts from 1900
        self._handler(packet.serialize(self.extensions), codec, repair, arrived)

    def release(self) -> None:
        """Give the packet path back to aiortc (it decodes again: the transcoding fallback)."""
        self.receiver.__dict__.pop("_handle_rtp_packet", None)

    def close(self) -> None:
        self._tasks.closed = True
        self._tasks.cancel()

    def stop_decoder(self) -> None:
        """Stop the decoder thread aiortc started for this receiver: nothing will be decoded."""
        self.receiver._RTCRtpReceiver__stop_decoder()

    async def request_keyframe(self, ssrc: int) -> None:
        await self.receiver._send_rtcp_pli(ssrc)

    async def send_remb(self, ssrc: int, bitrate: int) -> None:
        """Tell the hop upstream the most ``ssrc`` may send (REMB), as aiortc's own receive-side
        estimator would."""
        rtcp_ssrc = self.receiver._RTCRtpReceiver__rtcp_ssrc
        if rtcp_ssrc is None:  # not started yet
            return
        await self.receiver._send_rtcp(RtcpPsfbPacket(
            fmt=RTCP_PSFB_APP, ssrc=rtcp_ssrc, media_ssrc=0, fci=pack_remb_fci(bitrate, [ssrc])))

    def extension_ids(self) -> object:
        """The header extension ids of the leg (``abs_send_time`` among them)."""
        return self.extensions._HeaderExtensionsMap__ids

    def abs_send_time_id(self) -> int:
        """The leg's header extension id of abs-send-time; 0 if not negotiated."""
        return self.extension_ids().abs_send_time or 0


class RtcpDispatcher:
    """The one place a peer connection's RTCP feedback for its senders is taken: each sender's
    handler is replaced once, and what it receives goes, by the sender's SSRC (the stream the
    feedback names), to whoever owns that stream: keyframe requests (PLI/FIR), REMB and NACKs.
    A handler returns True when it dealt with the packet; otherwise aiortc's own handling runs.
    Receiver and sender reports always reach aiortc (its round trip and remote statistics), after
    the watchers registered for them.
    """

    def __init__(self) -> None:
        self._keyframe: dict[int, Callable[[], bool]] = {}
        self._remb: dict[int, Callable[[int], bool]] = {}
        self._nack: dict[int, Callable[[list[int]], Awaitable[bool]]] = {}
        self._reports: dict[int, list[Callable[[RTCRtpSender, object], None]]] = {}
        self._hooked: set[int] = set()
        self.malformed = 0  #: REMB reports that did not parse

    def on(self, sender: RTCRtpSender, keyframe: Callable[[], bool] | None = None,
           remb: Callable[[int], bool] | None = None,
           nack: Callable[[list[int]], Awaitable[bool]] | None = None) -> None:
        """Route ``sender``'s feedback: each given handler replaces any before it."""
        self._hook(sender)
        ssrc = sender._ssrc
        for table, handler in ((self._keyframe, keyframe), (self._remb, remb),
                               (self._nack, nack)):
            if handler is not None:
                table[ssrc] = handler  # type: ignore[index]

    def off(self, sender: RTCRtpSender) -> None:
        """Nothing of ``sender``'s feedback is routed any more (aiortc handles it)."""
        ssrc = sender._ssrc
        for table in (self._keyframe, self._remb, self._nack, self._reports):
            table.pop(ssrc, None)

    def attach(self, sender: RTCRtpSender) -> None:
        """Take ``sender``'s RTCP through this dispatcher (once; what is not routed reaches
        aiortc as before)."""
        self._hook(sender)

    def watch_reports(self, sender: RTCRtpSender,
                      watcher: Callable[[RTCRtpSender, object], None]) -> None:
        """Call ``watcher(sender, packet)`` for each receiver/sender report ``sender`` gets."""
        self._hook(sender)
        self._reports.setdefault(sender._ssrc, []).append(watcher)

    def _hook(self, sender: RTCRtpSender) -> None:
        if id(sender) in self._hooked:
            return
        self._hooked.add(id(sender))
        original = sender._handle_rtcp_packet
        ssrc = sender._ssrc

        async def handle(packet: object) -> None:
            if isinstance(packet, RtcpPsfbPacket):
                if packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
                    keyframe = self._keyframe.get(ssrc)
                    if keyframe is not None and keyframe():
                        return
                elif packet.fmt == RTCP_PSFB_APP and (remb := self._remb.get(ssrc)):
                    try:
                        bitrate, ssrcs = unpack_remb_fci(packet.fci)
                    except ValueError:
                        self.malformed += 1
                        return  # a malformed report: nothing to act on
                    if ssrc in ssrcs and remb(bitrate):
                        return
            elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
                nack = self._nack.get(ssrc)
                if nack is not None and await nack(list(packet.lost)):
                    return
            elif isinstance(packet, RtcpRrPacket | RtcpSrPacket):
                for watcher in self._reports.get(ssrc, ()):
                    watcher(sender, packet)
            await original(packet)

        sender._handle_rtcp_packet = handle  # type: ignore[method-assign]


def report_rtt(sender: RTCRtpSender, packet: object, now: float) -> float | None:
    """The round trip (s) a receiver/sender report answering ``sender``'s last sender report
    shows (RFC 3550: now - LSR sent - DLSR), as aiortc computes it; None if it answers none."""
    sent = sender._RTCRtpSender__lsr_time
    lsr = sender._RTCRtpSender__lsr
    for report in packet.reports:  # type: ignore[attr-defined]
        if report.ssrc == sender._ssrc and report.dlsr and sent is not None and \
                report.lsr == lsr:
            rtt = now - sent - report.dlsr / 65536
            if rtt >= 0:
                return rtt
    return None


def sender_rtt(sender: RTCRtpSender) -> float | None:
    """aiortc's latest round trip of ``sender``'s stream (s), from RTCP reports."""
    return sender._RTCRtpSender__rtt


def far_end_reception(sender: RTCRtpSender) -> tuple[int, float] | None:
    """What the far end last reported receiving of ``sender``'s stream: (packets lost, jitter in
    RTP units), from aiortc's remote-inbound statistics; None before any report."""
    for stat in list(sender._RTCRtpSender__stats.values()):
        if stat.type == "remote-inbound-rtp":
            return stat.packetsLost, stat.jitter
    return None


# ------------------------------------------------------------------ a device's encoders


def sender_encoder(sender: RTCRtpSender) -> Any:
    """The encoder aiortc made for ``sender`` (None until its first frame)."""
    return sender._RTCRtpSender__encoder


def octets_sent(sender: RTCRtpSender) -> int:
    """Payload bytes ``sender`` has sent (what its RTCP sender reports count)."""
    return sender._RTCRtpSender__octet_count


def set_encoder_target(encoder: Any, bps: int) -> None:
    """Set an aiortc encoder's target bitrate, below its own floor too (its private field: the
    property clamps). The encoder starts again at its next frame."""
    if isinstance(encoder, Vp8Encoder):
        encoder._Vp8Encoder__target_bitrate = bps
    elif isinstance(encoder, H264Encoder):
        encoder._H264Encoder__target_bitrate = bps
    else:
        encoder.target_bitrate = bps


NextFrame = Callable[[Any], Awaitable[Any]]


def wrap_encoded_frames(sender: RTCRtpSender, wrap: Callable[[NextFrame], NextFrame]) -> None:
    """Put ``wrap(next)`` where ``sender`` takes its next encoded frame (``next(codec)``)."""
    sender._next_encoded_frame = wrap(sender._next_encoded_frame)  # type: ignore[method-assign]


def make_encoder(sender: RTCRtpSender, configure: Callable[[Any, Any], None]) -> None:
    """Make ``sender``'s encoder here, before aiortc would at the first frame, and
    ``configure(codec, encoder)`` it."""
    original = sender._next_encoded_frame

    async def first(codec: Any) -> Any:
        sender._next_encoded_frame = original  # once (what was there: another wrapper too)
        if sender._RTCRtpSender__encoder is None:
            encoder = get_encoder(codec)
            configure(codec, encoder)
            sender._RTCRtpSender__encoder = encoder
        return await original(codec)

    sender._next_encoded_frame = first  # type: ignore[method-assign]


# ------------------------------------------------------------------ a device's receivers


def replace_jitter_buffer(receiver: RTCRtpReceiver, buffer: object) -> None:
    """Put ``buffer`` where ``receiver`` assembles frames (aiortc's JitterBuffer's methods)."""
    receiver._RTCRtpReceiver__jitter_buffer = buffer


def timestamp_mapper(receiver: RTCRtpReceiver) -> Any:
    """The object with which aiortc rebases ``receiver``'s decoded frames' pts on the first
    frame's RTP timestamp (see :func:`timestamp_origin`)."""
    return receiver._RTCRtpReceiver__timestamp_mapper


def timestamp_origin(mapper: Any) -> int | None:
    """The first RTP timestamp a receiver's mapper rebased on (None before the first frame)."""
    return mapper._origin


RtpHandler = Callable[[RtpPacket, int], Awaitable[None]]


def wrap_rtp_handler(receiver: RTCRtpReceiver, wrap: Callable[[RtpHandler], RtpHandler]
                     ) -> None:
    """Put ``wrap(handle)`` where ``receiver`` takes each RTP packet (``handle(packet,
    arrival_time_ms)``, arrival counted in ms from 1900)."""
    receiver._handle_rtp_packet = wrap(receiver._handle_rtp_packet)  # type: ignore[method-assign]


async def send_pli(receiver: RTCRtpReceiver, ssrc: int) -> None:
    """Ask the sender of ``ssrc`` for a keyframe (RTCP PLI) from ``receiver``."""
    await receiver._send_rtcp_pli(ssrc)


def decoder_running(receiver: RTCRtpReceiver) -> bool:
    """Is ``receiver``'s decoder thread up (it starts with the first frame)?"""
    return bool(receiver._RTCRtpReceiver__decoder_thread)


def queue_for_decoding(receiver: RTCRtpReceiver, codec: RTCRtpCodecParameters,
                       frame: Any) -> None:
    """Hand an assembled frame (aiortc's JitterFrame) to ``receiver``'s decoder, its timestamp
    rebased as aiortc does."""
    frame.timestamp = receiver._RTCRtpReceiver__timestamp_mapper.map(frame.timestamp)
    receiver._RTCRtpReceiver__decoder_queue.put((codec, frame))


def packet_bytes(packet: RtpPacket) -> bytes:
    """The depayloaded bytes of a packet aiortc's receiver put in its jitter buffer."""
    return packet._data


def jitter_buffer(receiver: RTCRtpReceiver) -> Any:
    """Where ``receiver`` assembles frames (aiortc's JitterBuffer, or one put there)."""
    return receiver._RTCRtpReceiver__jitter_buffer


def receiver_codecs(receiver: RTCRtpReceiver) -> dict[int, RTCRtpCodecParameters]:
    """``receiver``'s codecs by payload type (filled when it starts)."""
    return receiver._RTCRtpReceiver__codecs


def buffer_origin(buffer: JitterBuffer) -> int | None:
    """The sequence number a jitter buffer holds from (None while empty)."""
    return buffer._origin


def take_frame(buffer: JitterBuffer, sequence_number: int) -> JitterFrame | None:
    """The next whole frame a jitter buffer holds, removed from it, if there is one."""
    return buffer._remove_frame(sequence_number)


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
        frame = JitterFrame(data=b"".join(packet_bytes(p) for p in packets),
                            timestamp=packets[0].timestamp)
        self.remove(count)
        return frame


class SenderTap:
    """Sends forwarded packets as ``sender``'s own stream: its SSRC, payload type and MID, kept in
    its history so retransmissions can answer NACKs, counted in its RTCP sender reports.

    A packet too long to protect is dropped, counted in :attr:`oversize` and logged once; it
    never ends the leg.
    """

    def __init__(self, transceiver: RTCRtpTransceiver,
                 counters: LossCounters | None = None) -> None:
        sender: RTCRtpSender = transceiver.sender
        self._counted = counters or _NoCounters()
        self.sender = sender
        self.transceiver = transceiver
        self._history: dict[int, RtpPacket] = sender._RTCRtpSender__rtp_history
        #: how the leg writes header extensions
        self.extensions: HeaderExtensionsMap = sender._RTCRtpSender__rtp_header_extensions_map
        # Packets sent, as plain bytes; parsed only if a NACK asks for one.
        self._raw: dict[int, bytes] = {}
        self._srtp: InPlaceSrtp | None = None
        self._reports = 0  #: packets sent
        self._flushed = 0  #: of which handed to the sender's report counts
        self._octets = 0  #: payload bytes sent since then
        #: which NACKed packets are answered (no storm on a congested link)
        self.resends = Resends()
        self.oversize = 0  #: packets too long to protect, dropped

    @property
    def mid(self) -> str | None:
        return self.transceiver.mid

    def extension_ids(self) -> object:
        """The header extension ids of the leg's transport (all kinds: a DatagramTap's too)."""
        return self.sender.transport._rtp_header_extensions_map._HeaderExtensionsMap__ids

    def abs_send_time_id(self) -> int:
        """The leg's header extension id of abs-send-time; 0 if not negotiated."""
        return self.extension_ids().abs_send_time or 0

    async def retransmit(self, sequence_numbers: list[int]) -> None:
        """Answer a NACK from downstream from this stream's history (as RTX where negotiated),
        each packet at most as often as :attr:`resends` allows."""
        for sequence_number in sequence_numbers:
            if not self.resends.allow(sequence_number, time.monotonic(), self._reports):
                continue
            self._counted.retransmissions += 1
            raw = self._raw.get(sequence_number % RTP_HISTORY_SIZE)
            if raw is not None and int.from_bytes(raw[2:4], "big") == sequence_number:
                self._history[sequence_number % RTP_HISTORY_SIZE] = RtpPacket.parse(
                    raw, self.extensions)
            await self.sender._retransmit(sequence_number)

    def packet(self, payload: bytes, marker: bool, payload_type: int,
               abs_send_time: bool = False) -> bytes:
        """An RTP packet of this sender's stream (its SSRC and MID; with ``abs_send_time``, room
        for one), sequence number and timestamp 0: a template for :meth:`send_rewritten`."""
        packet = RtpPacket(payload_type=payload_type, marker=int(marker),
                           ssrc=self.sender._ssrc, payload=payload)
        packet.extensions.mid = self.sender._RTCRtpSender__mid
        if abs_send_time:
            packet.extensions.abs_send_time = 0
        return packet.serialize(self.extensions)

    def send_rewritten(self, source: bytes | memoryview, length: int, payload_type: int,
                       seq: int, ts: int, stamp: tuple[int, int] | None = None) -> int | None:
        """Send the plain RTP packet in ``source[:length]`` as this sender's, synchronously:
        copied into the leg's SRTP buffer, its payload type, sequence number, timestamp and SSRC
        written in place (marker bit, extensions and payload kept; ``stamp``: (offset, value)
        of an abs-send-time to write too), protected in place and sent. Its protected size;
        0 if it was too long to protect (dropped, counted); None if the leg is not connected."""
        dtls = self.sender.transport  # (all written out here: this runs for every packet)
        session = dtls._tx_srtp
        pair = dtls.transport._connection._nominated.get(1)
        if session is None or pair is None:
            return None
        srtp = self._srtp
        if srtp is None or srtp.session is not session:
            srtp = self._srtp = InPlaceSrtp(session)
        if length > srtp.room:
            return self._too_long(length, srtp.room)
        view = srtp.view
        _srtp_ffi.memmove(srtp.buffer, source, length)
        _HEADER.pack_into(view, 1, (source[1] & 0x80) | payload_type, seq, ts, self.sender._ssrc)
        if stamp is not None:
            at, value = stamp
            view[at:at + 3] = value.to_bytes(3, "big")
        self._raw[seq % RTP_HISTORY_SIZE] = bytes(view[:length])
        data = srtp.protect(length)
        if data is None:
            return 0
        transport = pair.protocol.transport
        if transport is None:  # the leg closed
            return None
        transport.sendto(data, pair.remote_addr)
        self._octets += length - 12
        self._reports += 1
        if self._reports & 7 == 1:  # the 1st, 9th, 17th ...
            self._flush_report(ts)
        return len(data)

    def send_reheadered(self, source: bytes | memoryview, length: int,
                        extensions: HeaderExtensionsMap, payload_type: int, seq: int, ts: int
                        ) -> int | None:
        """As :meth:`send_rewritten`, for a packet whose leg writes header extensions
        differently (other ids, another MID): parsed with ``extensions``, written with this
        leg's. Costs a parse and a serialize; the fast path avoids it where the legs agree."""
        try:
            packet = RtpPacket.parse(bytes(source[:length]), extensions)
        except ValueError:
            return 0
        packet.ssrc, packet.payload_type = self.sender._ssrc, payload_type
        packet.sequence_number, packet.timestamp = seq, ts
        packet.extensions.mid = self.sender._RTCRtpSender__mid
        data = packet.serialize(self.extensions)
        return self.send_rewritten(data, len(data), payload_type, seq, ts)

    def _too_long(self, length: int, room: int) -> int:
        self.oversize += 1
        if self.oversize == 1:
            event(log, "rtp.too_long", logging.WARNING, mid=self.mid, ssrc=self.sender._ssrc,
                  bytes=length, room=room)
        return 0

    def _flush_report(self, ts: int) -> None:
        """What the sender's RTCP sender reports say about the stream: counted in
        send_rewritten and handed to the sender with the (NTP time, RTP timestamp) pair every
        8th packet. A sender report needs one recent pair, and counts a few packets behind are
        still true of a second's report; the clock and the sender's name-mangled fields per
        packet cost more than the rest of sending."""
        sender = self.sender
        sender._RTCRtpSender__ntp_timestamp = ntp_now()
        sender._RTCRtpSender__rtp_timestamp = ts
        sender._RTCRtpSender__octet_count += self._octets
        sender._RTCRtpSender__packet_count += self._reports - self._flushed
        self._octets, self._flushed = 0, self._reports

    async def started(self) -> None:
        """Wait until aiortc has started the sender (the leg is connected, codec chosen)."""
        await self.sender._RTCRtpSender__rtp_started.wait()

    @property
    def codec(self) -> RTCRtpCodecParameters | None:
        """The codec this sender sends with, once negotiated and started."""
        if not self.sender._RTCRtpSender__started:
            return None
        codecs = self.transceiver._codecs
        return codecs[0] if codecs else None

    @staticmethod
    def new_origin() -> tuple[int, int]:
        """A random (sequence number, timestamp) origin for a new outgoing stream."""
        return random16(), random32()


_HEADER = struct.Struct("!BHII")  #: RTP header from byte 1: M|PT, sequence, timestamp, SSRC


class InPlaceSrtp:
    """A pylibsrtp Session used in place: packets are copied into its own buffer, protected or
    unprotected there, and read back through a memoryview, with no allocation per packet
    (pylibsrtp's protect/unprotect allocate an int and two bytes objects each time, which
    costs more than the cipher)."""

    __slots__ = ("_length", "_srtp", "buffer", "room", "session", "size", "view")

    def __init__(self, session: pylibsrtp.Session) -> None:
        self.session = session
        self.buffer = session._cdata
        self.view = memoryview(session._buffer)
        #: the buffer's bytes (a RoomySession's, or pylibsrtp's own 1,500), and the longest
        #: plain packet that protect has room for
        self.size = len(self.view)
        self.room = self.size - SRTP_TRAILER
        self._srtp = session._srtp
        self._length = _srtp_ffi.new("int *")

    def unprotect(self, data: bytes) -> int | None:
        """Decrypt ``data`` into :attr:`view`; the plain length, or None if it fails
        (a replay or a forgery: what aiortc would drop too)."""
        length = len(data)
        if length > self.size:
            return None
        _srtp_ffi.memmove(self.buffer, data, length)
        self._length[0] = length
        if _srtp_lib.srtp_unprotect(self._srtp[0], self.buffer, self._length):
            return None
        return self._length[0]

    def protect(self, length: int) -> bytes | None:
        """Encrypt the plain packet in ``view[:length]``; the datagram to send (None if it
        fails, or the packet is longer than :attr:`room`)."""
        if length > self.room:
            return None
        self._length[0] = length
        if _srtp_lib.srtp_protect(self._srtp[0], self.buffer, self._length):
            return None
        return bytes(self.view[:self._length[0]])


def remote_ssrcs(pc: RTCPeerConnection) -> dict[str, int]:
    """The media SSRC (not the RTX one) the remote side announced per kind, from its SDP."""
    found: dict[str, int] = {}
    if pc.remoteDescription is None:
        return found
    for media in SessionDescription.parse(pc.remoteDescription.sdp).media:
        rtx = {int(g.items[1]) for g in media.ssrc_group
               if g.semantic == "FID" and len(g.items) > 1}
        primary = [s.ssrc for s in media.ssrc if s.ssrc not in rtx]
        if primary and media.kind not in found:
            found[media.kind] = primary[0]
    return found


class DatagramTap:
    """Takes the SRTP datagrams of chosen SSRCs off a peer connection's ICE sockets, before aioice
    queues them for aiortc, decrypts them, and hands them to a handler: the forwarding fast path
    (no queue, no task switch, no STUN parse attempt, no RtpPacket). Everything else (STUN, DTLS,
    RTCP, RTX, unrouted SSRCs) goes on to aioice and aiortc unchanged.
    """

    def __init__(self, transceiver: RTCRtpTransceiver) -> None:
        self._dtls = transceiver.receiver.transport
        self._routes: dict[int, Callable[[memoryview, int], None]] = {}
        self._srtp: InPlaceSrtp | None = None
        self._hooked: set[int] = set()
        self._fd = -1  #: the socket of the datagram being handled
        self._stamp = bytearray(16)

    def extension_ids(self) -> object:
        """The header extension ids of the leg's transport (compared with a sink's)."""
        return self._dtls._rtp_header_extensions_map._HeaderExtensionsMap__ids

    def route(self, ssrc: int, handler: Callable[[memoryview, int], None]) -> None:
        """Hand ``ssrc``'s packets to ``handler(view, length)``: the plain packet is
        ``view[:length]``, valid only during the call (the buffer is reused)."""
        self._hook()
        self._routes[ssrc] = handler

    def unroute(self, ssrc: int) -> None:
        self._routes.pop(ssrc, None)

    def kernel_arrival(self) -> float:
        """When the kernel took in the datagram being handled (seconds, wall clock), from
        ``SIOCGSTAMP`` on its socket; 0.0 if it cannot say. One system call: sample it."""
        try:
            fcntl.ioctl(self._fd, _SIOCGSTAMP, self._stamp)
        except OSError:
            return 0.0
        seconds, micros = _TIMEVAL.unpack(self._stamp)
        return seconds + micros / 1e6

    def _hook(self) -> None:
        for protocol in self._dtls.transport._connection._protocols:
            if id(protocol) not in self._hooked:
                self._hooked.add(id(protocol))
                protocol.datagram_received = self._receiver(protocol.datagram_received,
                                                            _fileno(protocol))

    def _receiver(self, original: Callable[[bytes, tuple], None], fd: int
                  ) -> Callable[[bytes, tuple], None]:
        routes = self._routes
        dtls = self._dtls

        def datagram_received(data: bytes, addr: tuple) -> None:
            # RTP, not RTCP (RFC 5761 payload types 64-95 with the marker bit: 192-223)
            if len(data) > 12 and 127 < data[0] < 192 and not 191 < data[1] < 224:
                handler = routes.get(int.from_bytes(data[8:12], "big"))
                session = dtls._rx_srtp
                if handler is not None and session is not None:
                    srtp = self._srtp
                    if srtp is None or srtp.session is not session:
                        srtp = self._srtp = InPlaceSrtp(session)
                    length = srtp.unprotect(data)
                    if length is not None:
                        self._fd = fd
                        handler(srtp.view, length)
                    return
            original(data, addr)

        return datagram_received


_SIOCGSTAMP = 0x8906  #: Linux: the kernel receive time of a socket's last datagram
_TIMEVAL = struct.Struct("@qq")


def _fileno(protocol: object) -> int:
    transport = getattr(protocol, "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    try:
        return sock.fileno() if sock is not None else -1
    except OSError:
        return -1


def check_internals() -> list[str]:
    """Names of the aiortc/aioice/pylibsrtp internals this project relies on that are missing
    (every one this module touches: a test fails when aiortc moves one)."""
    missing: list[str] = []
    for owner, name in (
        (Connection, "get_component_candidates"),
        (Connection, "gather_candidates"),
        (RTCRtpReceiver, "_handle_rtp_packet"),
        (RTCRtpReceiver, "_send_rtcp_nack"),
        (RTCRtpReceiver, "_send_rtcp_pli"),
        (RTCRtpReceiver, "_send_rtcp"),
        (RTCRtpReceiver, "_RTCRtpReceiver__stop_decoder"),
        (RTCRtpSender, "_handle_rtcp_packet"),
        (RTCRtpSender, "_retransmit"),
        (RTCRtpSender, "_next_encoded_frame"),
        (JitterBuffer, "_remove_frame"),
        (HeaderExtensionsMap, "configure"),
        (aiortc.rtcdtlstransport.RTCDtlsTransport, "_send_rtp"),
        (aiortc.rtcdtlstransport, "Session"),
    ):
        if not hasattr(owner, name):
            missing.append(f"{getattr(owner, '__module__', owner.__name__)}."
                           f"{getattr(owner, '__qualname__', '')}.{name}")
    probe = Connection(ice_controlling=True)
    for name in ("_local_candidates_start", "_local_candidates_end", "_local_candidates",
                 "_components", "_protocols", "_nominated"):
        if not hasattr(probe, name):
            missing.append(f"aioice.Connection().{name}")
    buffer = JitterBuffer(capacity=16, is_video=True)
    for name in ("_origin", "_capacity", "_packets"):
        if not hasattr(buffer, name):
            missing.append(f"aiortc.jitterbuffer.JitterBuffer().{name}")
    if not hasattr(HeaderExtensionsMap(), "_HeaderExtensionsMap__ids"):
        missing.append("aiortc.rtp.HeaderExtensionsMap().__ids")
    # the receiver stores each packet's depayloaded bytes as ``packet._data`` for its buffer
    if "packet._data = depayload(" not in inspect.getsource(aiortc.rtcrtpreceiver):
        missing.append("aiortc.rtcrtpreceiver: RtpPacket()._data")
    session = pylibsrtp.Session()
    for name in ("_cdata", "_buffer", "_srtp"):
        if not hasattr(session, name):
            missing.append(f"pylibsrtp.Session().{name}")
    return missing


#: Instance attributes the adapter reads or writes, per class (checked on live objects by the
#: tests: tests/test_rtc.py).
INSTANCE_INTERNALS: dict[str, tuple[str, ...]] = {
    "RTCRtpReceiver": ("_RTCRtpReceiver__codecs", "_RTCRtpReceiver__remote_streams",
                       "_RTCRtpReceiver__rtx_ssrc", "_RTCRtpReceiver__nack_generator",
                       "_RTCRtpReceiver__rtcp_ssrc", "_RTCRtpReceiver__jitter_buffer",
                       "_RTCRtpReceiver__timestamp_mapper", "_RTCRtpReceiver__decoder_thread",
                       "_RTCRtpReceiver__decoder_queue"),
    "RTCRtpSender": ("_ssrc", "_RTCRtpSender__rtp_history",
                     "_RTCRtpSender__rtp_header_extensions_map", "_RTCRtpSender__encoder",
                     "_RTCRtpSender__started", "_RTCRtpSender__rtp_started", "_RTCRtpSender__mid",
                     "_RTCRtpSender__ntp_timestamp", "_RTCRtpSender__rtp_timestamp",
                     "_RTCRtpSender__octet_count", "_RTCRtpSender__packet_count",
                     "_RTCRtpSender__lsr", "_RTCRtpSender__lsr_time", "_RTCRtpSender__rtt",
                     "_RTCRtpSender__stats"),
    "RTCRtpTransceiver": ("_codecs",),
    "RTCDtlsTransport": ("_tx_srtp", "_rx_srtp", "_rtp_header_extensions_map"),
    "RTCIceTransport": ("_connection",),
}


def check_instance_internals(pc: RTCPeerConnection) -> list[str]:
    """The instance internals missing from the transceivers of a live peer connection."""
    missing = []
    for transceiver in pc.getTransceivers():
        dtls = transceiver.sender.transport
        for obj in (transceiver, transceiver.sender, transceiver.receiver, dtls,
                    dtls.transport):
            for name in INSTANCE_INTERNALS[type(obj).__name__]:
                if not hasattr(obj, name):
                    missing.append(f"{type(obj).__name__}().{name}")
    return sorted(set(missing))
