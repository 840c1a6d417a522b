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

import asyncio
import fcntl
import struct
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

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
from aiortc.codecs import is_rtx
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtcrtpsender import RTP_HISTORY_SIZE
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RtcpPsfbPacket,
    RtpPacket,
    pack_remb_fci,
    unpack_remb_fci,
    unwrap_rtx,
)
from aiortc.sdp import SessionDescription
from aiortc.utils import random16, random32
from pylibsrtp._binding import ffi as _srtp_ffi
from pylibsrtp._binding import lib as _srtp_lib

from relay.congestion import Resends


@dataclass(frozen=True)
class MediaSettings:
    """Where media may flow, for one service."""

    #: IPv4/IPv6 addresses to gather host candidates on; empty means every non-loopback address
    #: (aioice's own choice).
    addresses: tuple[str, ...] = ()
    #: STUN/TURN URLs ("stun:host:port", "turn:host:port"); empty for none.
    ice_servers: tuple[str, ...] = ()


def new_peer_connection(media: MediaSettings) -> RTCPeerConnection:
    """A peer connection that bundles everything on one transport and asks no public server."""
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


PacketHandler = Callable[[RtpPacket, RTCRtpCodecParameters], Awaitable[None]]


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
    """Takes every decrypted RTP packet off ``receiver`` and hands it to ``handler``.

    What aiortc does per packet and a relay still needs is kept: RTCP receiver statistics (so
    receiver reports stay true), RTX unwrapping, and NACKs for missing packets (loss is repaired on
    each hop). What it does not need (jitter buffer, decoder, bitrate estimator) is skipped.
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
        self._seen = _Seen()
        self._nacks: set[asyncio.Task[None]] = set()
        #: when aiortc read the packet being handled (ms, UNIX time; the slow path only), and
        #: whether it came as a retransmission
        self.arrival_ms = 0
        self.repair = False
        receiver._handle_rtp_packet = self._handle  # type: ignore[method-assign]

    @property
    def receiver_mid(self) -> str | None:
        return self.transceiver.mid

    def account(self, ssrc: int, seq: int, ts: int, clock_rate: int) -> None:
        """Count a packet taken on the fast path (see DatagramTap) as aiortc would: receiver
        statistics for RTCP reports, and a NACK for any packet found missing."""
        seen = self._seen
        seen.sequence_number, seen.timestamp = seq, ts
        self._statistics(ssrc, clock_rate).add(seen)  # type: ignore[arg-type]
        nack = self._nack
        if (nack is not None and not nack.missing and nack.max_seq is not None
                and seq == (nack.max_seq + 1) & 0xFFFF):
            nack.max_seq = seq  # in order, nothing missing: all NackGenerator.add would do
            return
        missing = self._missing(seen)  # type: ignore[arg-type]
        if missing:
            self._counters.nacks_sent += 1
            task = asyncio.ensure_future(self.receiver._send_rtcp_nack(ssrc, missing))
            self._nacks.add(task)
            task.add_done_callback(self._nacks.discard)

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

    def _missing(self, packet: RtpPacket) -> list[int] | None:
        """Sequence numbers to NACK now that ``packet`` arrived (video only), if any."""
        if self._nack is not None and self._nack.add(packet):
            return sorted(self._nack.missing)
        return None

    async def _handle(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        self.arrival_ms = arrival_time_ms - _NTP_EPOCH_OFFSET * 1000  # aiortc counts from 1900
        codec = self._codecs.get(packet.payload_type)
        if codec is None:
            return
        self._statistics(packet.ssrc, codec.clockRate).add(packet)
        self.repair = is_rtx(codec)
        if self.repair:
            original = self._rtx_ssrc.get(packet.ssrc)
            apt = codec.parameters.get("apt")
            if original is None or len(packet.payload) < 2 or apt not in self._codecs:
                return
            packet = unwrap_rtx(packet, payload_type=apt, ssrc=original)  # type: ignore[arg-type]
            codec = self._codecs[apt]  # type: ignore[index]
        missing = self._missing(packet)
        if missing:
            self._counters.nacks_sent += 1
            await self.receiver._send_rtcp_nack(packet.ssrc, missing)
        await self._handler(packet, codec)

    def release(self) -> None:
        """Give the packet path back to aiortc (it decodes again: the transcoding fallback)."""
        self.receiver.__dict__.pop("_handle_rtp_packet", None)

    def close(self) -> None:
        for task in self._nacks:
            task.cancel()

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
        return self.receiver.transport._rtp_header_extensions_map._HeaderExtensionsMap__ids


def watch_keyframe_requests(sender: RTCRtpSender, on_request: Callable[[], bool],
                            on_remb: Callable[[int], bool] | None = None) -> None:
    """Call ``on_request`` for each PLI/FIR the sender receives, and ``on_remb`` with the
    bitrate of each REMB naming its stream; True means it was handled (aiortc's own handling,
    which only reaches an encoder, is then skipped)."""
    original = sender._handle_rtcp_packet

    async def handle(packet: object) -> None:
        if isinstance(packet, RtcpPsfbPacket):
            if packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR) and on_request():
                return
            if packet.fmt == RTCP_PSFB_APP and on_remb is not None:
                try:
                    bitrate, ssrcs = unpack_remb_fci(packet.fci)
                except ValueError:
                    return  # a malformed report: nothing to act on
                if sender._ssrc in ssrcs and on_remb(bitrate):
                    return
        await original(packet)

    sender._handle_rtcp_packet = handle  # type: ignore[method-assign]


class SenderTap:
    """Sends forwarded packets as ``sender``'s own stream, and reports keyframe requests.

    ``on_keyframe_request`` is called for each PLI/FIR from downstream; it returns True when it
    handled the request, False to let aiortc handle it (an encoder makes a keyframe).
    """

    def __init__(self, transceiver: RTCRtpTransceiver,
                 on_keyframe_request: Callable[[], bool],
                 counters: LossCounters | None = None,
                 on_remb: Callable[[int], bool] | None = None) -> None:
        sender: RTCRtpSender = transceiver.sender
        counted = counters or _NoCounters()
        self.sender = sender
        self.transceiver = transceiver
        self._history: dict[int, RtpPacket] = sender._RTCRtpSender__rtp_history
        self._extensions = sender._RTCRtpSender__rtp_header_extensions_map
        watch_keyframe_requests(sender, on_keyframe_request, on_remb)
        # Packets sent on the fast path, as plain bytes; parsed only if a NACK asks for one.
        self._raw: dict[int, bytes] = {}
        self._srtp: InPlaceSrtp | None = None
        self._reports = 0
        #: which NACKed packets are answered (no storm on a congested link)
        self.resends = Resends()
        original_retransmit = sender._retransmit

        async def retransmit(sequence_number: int) -> None:
            if not self.resends.allow(sequence_number, time.monotonic(), self._reports):
                return
            counted.retransmissions += 1
            raw = self._raw.get(sequence_number % RTP_HISTORY_SIZE)
            if raw is not None and int.from_bytes(raw[2:4], "big") == sequence_number:
                self._history[sequence_number % RTP_HISTORY_SIZE] = RtpPacket.parse(
                    raw, self._extensions)
            await original_retransmit(sequence_number)

        sender._retransmit = retransmit  # type: ignore[method-assign]

    @property
    def mid(self) -> str | None:
        return self.transceiver.mid

    def extension_ids(self) -> object:
        """The header extension ids of the leg's transport (all kinds: a DatagramTap's too)."""
        return self.sender.transport._rtp_header_extensions_map._HeaderExtensionsMap__ids

    def packet(self, payload: bytes, marker: bool, payload_type: int,
               abs_send_time: bool = False) -> bytes:
        """An RTP packet of this sender's stream (its SSRC and MID; with ``abs_send_time``, room
        for one), sequence number and timestamp 0: a template for :meth:`send_rewritten`."""
        packet = RtpPacket(payload_type=payload_type, marker=int(marker),
                           ssrc=self.sender._ssrc, payload=payload)
        packet.extensions.mid = self.sender._RTCRtpSender__mid
        if abs_send_time:
            packet.extensions.abs_send_time = 0
        return packet.serialize(self._extensions)

    def send_rewritten(self, source: memoryview, length: int, payload_type: int, seq: int,
                       ts: int, stamp: tuple[int, int] | None = None) -> int | None:
        """Send the plain RTP packet in ``source[:length]`` as this sender's, synchronously:
        copied into the leg's SRTP buffer, its payload type, sequence number, timestamp and SSRC
        written in place (marker bit, extensions and payload kept; ``stamp``: (offset, value)
        of an abs-send-time to write too), protected in place and sent. Its protected size, or
        None if the leg is not connected."""
        dtls = self.sender.transport
        session = dtls._tx_srtp
        pair = dtls.transport._connection._nominated.get(1)
        if session is None or pair is None or length > _SRTP_ROOM:
            return None
        srtp = self._srtp
        if srtp is None or srtp.session is not session:
            srtp = self._srtp = InPlaceSrtp(session)
        view = srtp.view
        _srtp_ffi.memmove(srtp.buffer, source, length)
        _HEADER.pack_into(view, 1, (source[1] & 0x80) | payload_type, seq, ts, self.sender._ssrc)
        if stamp is not None:
            at, value = stamp
            view[at:at + 3] = value.to_bytes(3, "big")
        self._raw[seq % RTP_HISTORY_SIZE] = bytes(view[:length])
        data = srtp.protect(length)
        if data is None:
            return None
        pair.protocol.transport.sendto(data, pair.remote_addr)
        self._reported(ts, length - 12)
        return len(data)

    def _reported(self, ts: int, payload_size: int) -> None:
        """What the sender's RTCP sender reports say about the stream. The (NTP time, RTP
        timestamp) pair is taken from every 8th packet: a sender report needs one recent pair,
        and reading the clock per packet costs more than the rest of this."""
        sender = self.sender
        if not self._reports & 7:
            sender._RTCRtpSender__ntp_timestamp = ntp_now()
            sender._RTCRtpSender__rtp_timestamp = ts
        self._reports += 1
        sender._RTCRtpSender__octet_count += payload_size
        sender._RTCRtpSender__packet_count += 1

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

    async def send(self, packet: RtpPacket, payload_type: int) -> int:
        """Send ``packet`` (sequence number and timestamp already mapped); returns its size.

        Raises ConnectionError if the leg is not connected.
        """
        sender = self.sender
        packet.ssrc = sender._ssrc
        packet.payload_type = payload_type
        packet.extensions.mid = sender._RTCRtpSender__mid
        self._history[packet.sequence_number % RTP_HISTORY_SIZE] = packet
        data = packet.serialize(self._extensions)
        await sender.transport._send_rtp(data)
        self._reported(packet.timestamp, len(packet.payload))
        return len(data)

    @staticmethod
    def new_origin() -> tuple[int, int]:
        """A random (sequence number, timestamp) origin for a new outgoing stream."""
        return random16(), random32()


_SRTP_ROOM = 1500 - 16 - 4  #: pylibsrtp's buffer less the longest SRTP trailer
_HEADER = struct.Struct("!BHII")  #: RTP header from byte 1: M|PT, sequence, timestamp, SSRC


class InPlaceSrtp:
    """A pylibsrtp Session used in place: packets are copied into its own buffer, protected or
    unprotected there, and read back through a memoryview, with no allocation per packet
    (pylibsrtp's protect/unprotect allocate an int and two bytes objects each time, which
    costs more than the cipher)."""

    __slots__ = ("_length", "_srtp", "buffer", "session", "view")

    def __init__(self, session: pylibsrtp.Session) -> None:
        self.session = session
        self.buffer = session._cdata
        self.view = memoryview(session._buffer)
        self._srtp = session._srtp
        self._length = _srtp_ffi.new("int *")

    def unprotect(self, data: bytes) -> int | None:
        """Decrypt ``data`` into :attr:`view`; the plain length, or None if it fails
        (a replay or a forgery: what aiortc would drop too)."""
        length = len(data)
        if length > 1500:
            return None
        _srtp_ffi.memmove(self.buffer, data, length)
        self._length[0] = length
        if _srtp_lib.srtp_unprotect(self._srtp[0], self.buffer, self._length):
            return None
        return self._length[0]

    def protect(self, length: int) -> bytes | None:
        """Encrypt the plain packet in ``view[:length]``; the datagram to send."""
        self._length[0] = length
        if _srtp_lib.srtp_protect(self._srtp[0], self.buffer, self._length):
            return None
        return bytes(self.view[:self._length[0]])


def vp8_payloads(frame: bytes, picture_id: int) -> list[bytes]:
    """The RTP payloads of one encoded VP8 frame, packetized as aiortc's sender does (each with
    a payload descriptor carrying ``picture_id``)."""
    return Vp8Encoder._packetize(frame, picture_id & 0x7FFF)


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
    """Names of the aiortc/aioice internals this project relies on that are missing."""
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
        (Vp8Encoder, "_packetize"),
    ):
        if not hasattr(owner, name):
            missing.append(f"{owner.__module__}.{owner.__qualname__}.{name}")
    probe = Connection(ice_controlling=True)
    for name in ("_local_candidates_start", "_local_candidates_end", "_local_candidates",
                 "_components"):
        if not hasattr(probe, name):
            missing.append(f"aioice.Connection().{name}")
    return missing


#: Instance attributes the taps read, per class (checked on live objects by the tests).
INSTANCE_INTERNALS: dict[str, tuple[str, ...]] = {
    "RTCRtpReceiver": ("_RTCRtpReceiver__codecs", "_RTCRtpReceiver__remote_streams",
                       "_RTCRtpReceiver__rtx_ssrc", "_RTCRtpReceiver__nack_generator",
                       "_RTCRtpReceiver__rtcp_ssrc"),
    "RTCRtpSender": ("_RTCRtpSender__rtp_history", "_RTCRtpSender__rtp_header_extensions_map",
                     "_RTCRtpSender__encoder",
                     "_RTCRtpSender__started", "_RTCRtpSender__rtp_started", "_RTCRtpSender__mid",
                     "_RTCRtpSender__ntp_timestamp", "_RTCRtpSender__rtp_timestamp",
                     "_RTCRtpSender__octet_count", "_RTCRtpSender__packet_count"),
    "RTCRtpTransceiver": ("_codecs",),
}


def check_instance_internals(pc: RTCPeerConnection) -> list[str]:
    """The instance internals missing from the transceivers of a live peer connection."""
    missing = []
    for transceiver in pc.getTransceivers():
        for obj in (transceiver, transceiver.sender, transceiver.receiver):
            for name in INSTANCE_INTERNALS[type(obj).__name__]:
                if not hasattr(obj, name):
                    missing.append(f"{type(obj).__name__}().{name}")
    return sorted(set(missing))
