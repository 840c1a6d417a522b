"""Forwarding encoded media between the two legs of a call, packet by packet, without decoding.

Each decrypted RTP packet a leg receives is sent straight out on the other leg as that leg's own
stream: its SSRC and payload type, the sequence numbers and timestamps moved by a fixed offset (so
losses stay visible and NACKs map back). No jitter buffer, no reassembly: a packet leaves as soon
as it arrives, so a frame leaves as soon as its last packet is in.

Keyframes: a video stream starts (and restarts, after a new source or a send failure) at a
keyframe; until one comes the forwarder drops packets and asks upstream for one. Keyframe requests
from downstream go upstream, hop by hop, coalesced and rate-limited. NACKs are answered by each hop
from its own outbound history, and each hop's receiver NACKs what it is missing.

When the two legs did not agree on the same codec, that direction alone falls back to decoding and
re-encoding (aiortc's MediaRelay), and says so.

The pure parts (SequenceMap, RequestLimiter, is_keyframe) take time as an argument and are tested
without sockets; Forwarder and Bridge are the asyncio glue.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import msgspec
from aiortc import MediaStreamTrack, RTCRtpTransceiver
from aiortc.contrib.media import MediaRelay
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from relay.congestion import Estimate, Feedback
from relay.hops import TRANSIT_EVERY, StreamMeter
from relay.leg import KINDS
from relay.logs import event
from relay.messages import StreamHop
from relay.rtc import DatagramTap, LossCounters, ReceiverTap, SenderTap

_SEQ_TS = struct.Struct("!HI")  #: sequence number and timestamp, from byte 2 of an RTP header
#: seconds between keyframe requests sent upstream while the leg downstream is narrower than
#: what arrives (a keyframe is the largest burst a stream makes)
PROTECT_KEYFRAME_S = 2.0


def _kbps(bps: int | None) -> float | None:
    return round(bps / 1000, 1) if bps is not None else None

log = logging.getLogger("relay.forward")

Direction = Literal["caller_to_callee", "callee_to_caller"]
Mode = Literal["pending", "forward", "transcode"]


# ------------------------------------------------------------------------------ pure parts


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


# ------------------------------------------------------------------------------ glue


@dataclass
class ForwardingStats:
    """A server's forwarding figures, for /healthz and metrics."""

    packets: int = 0
    bytes: int = 0
    fast_path_packets: int = 0  #: of which taken straight off the socket (DatagramTap)
    keyframe_requests_down: int = 0  #: PLI/FIR received from downstream
    keyframe_requests_up: int = 0  #: PLI sent upstream
    transcoding: int = 0  #: directions transcoding now
    transcoded_total: int = 0  #: directions that ever fell back to transcoding
    nacks_sent: int = 0  #: NACKs sent upstream for missing packets
    retransmissions: int = 0  #: packets asked for again by downstream NACKs
    rembs_received: int = 0  #: REMB (congestion control) from downstream, acted on
    rembs_sent: int = 0  #: REMB sent upstream


class _Counted:
    """The loss-repair counters of one forwarder's tap: each count goes to the forwarder's
    meter and to the server's totals."""

    def __init__(self, meter: StreamMeter, totals: ForwardingStats) -> None:
        self._meter, self._totals = meter, totals

    @property
    def nacks_sent(self) -> int:
        return self._totals.nacks_sent

    @nacks_sent.setter
    def nacks_sent(self, value: int) -> None:
        self._meter.nacks_out += value - self._totals.nacks_sent
        self._totals.nacks_sent = value

    @property
    def retransmissions(self) -> int:
        return self._totals.retransmissions

    @retransmissions.setter
    def retransmissions(self, value: int) -> None:
        self._meter.nacks_in += value - self._totals.retransmissions
        self._totals.retransmissions = value


def counted(meter: StreamMeter, totals: ForwardingStats) -> LossCounters:
    return _Counted(meter, totals)


class SwitchableTrack(MediaStreamTrack):
    """The track a relay's sender holds. While forwarding, nothing: packets are injected past it.
    For the transcoding fallback a decoded source is attached, and the sender encodes that."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._source: MediaStreamTrack | None = None
        self._attached = asyncio.Event()

    def attach(self, source: MediaStreamTrack) -> None:
        self._source = source
        self._attached.set()

    async def recv(self):
        await self._attached.wait()
        assert self._source is not None
        return await self._source.recv()

    def stop(self) -> None:
        super().stop()
        if self._source is not None:
            self._source.stop()


class Forwarder:
    """One kind of media in one direction of one call at this server."""

    def __init__(self, call: str, kind: str, direction: Direction, stats: ForwardingStats,
                 relay: MediaRelay, transcode_all: bool = False, measure: bool = True,
                 on_first_packet: Callable[[], None] | None = None,
                 on_transcode: Callable[[Forwarder], None] | None = None,
                 keyframe_interval: float = 0.25, congestion: bool = False) -> None:
        self.call, self.kind, self.direction = call, kind, direction
        self.stats = stats
        self.mode: Mode = "pending"
        self.source: ReceiverTap | None = None
        self.sink: SenderTap | None = None
        self.sink_track: SwitchableTrack | None = None
        self._relay = relay
        self._transcode_all = transcode_all
        self._on_first_packet = on_first_packet
        self._on_transcode = on_transcode
        self._limiter = RequestLimiter(keyframe_interval)
        self._map: SequenceMap | None = None
        self._ssrc: int | None = None
        self._waiting = kind == "video"  # video starts at a keyframe
        self._payload_type = 0
        self._mime = ""
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_event_loop()
        #: the source leg's datagram tap, when the fast path may be used (see _fast_ok)
        self.datagrams: DatagramTap | None = None
        self._fast_ssrc: int | None = None
        self._clock_rate = 90000
        #: this hop's figures of the stream (relay/hops.py)
        self.meter = StreamMeter()
        self.measure = measure
        self._arrivals = 0
        #: congestion control (video): this hop's estimate of the leg the stream arrives on,
        #: and the least of it and the downstream report, sent upstream (relay/congestion.py)
        self.congestion = congestion and kind == "video"
        self.estimate: Estimate | None = None
        self._frame_bytes = 0  #: of the stream since the last frame's end, for the estimate
        self.feedback = Feedback()
        self._keyframe_interval = keyframe_interval

    # The source leg's receiver calls this for every packet.
    async def on_packet(self, packet: RtpPacket, codec: RTCRtpCodecParameters) -> None:
        if self._on_first_packet is not None:
            first, self._on_first_packet = self._on_first_packet, None
            first()
        if self.mode == "pending" and not self._decide(codec):
            return
        if self.mode != "forward":
            return
        sink = self.sink
        assert sink is not None and self._map is not None
        original = self.source is not None and not self.source.repair
        if self.measure and original:
            self.meter.arrived(len(packet.payload) + 12, time.time())
        if self.estimate is not None and original:
            self._frame_bytes += len(packet.payload) + 12
            if packet.marker and (sent_at := packet.extensions.abs_send_time) is not None:
                now = time.monotonic()  # a frame's last packet: the estimate's one step a frame
                found = self.estimate.sent(sent_at, self._frame_bytes, int(now * 1000))
                self._frame_bytes = 0
                if found is not None:
                    self._estimated(found, now)
        if packet.ssrc != self._ssrc:
            self._ssrc = packet.ssrc
            self._waiting = self.kind == "video"
            if not self._waiting:
                self._map.restart(packet.sequence_number, packet.timestamp, 960)
            self._use_fast_path(packet.ssrc)
        if self._waiting and not self._start_at(packet.sequence_number, packet.timestamp,
                                                packet.payload):
            return
        mapped = self._map.map(packet.sequence_number, packet.timestamp)
        if mapped is None:
            return
        packet.sequence_number, packet.timestamp = mapped
        try:
            size: int | None = await sink.send(packet, self._payload_type)
        except ConnectionError:
            size = None
        self._sent(size, fast=False)
        arrived_ms = self.source.arrival_ms if self.source is not None and self.measure else 0
        if size is not None and arrived_ms:  # the slow path knows when aiortc read it
            self.meter.transit.record(max(0.0, time.time() * 1000 - arrived_ms))


    def _start_at(self, seq: int, ts: int, payload: bytes) -> bool:
        """While waiting for a keyframe: start the stream here if this packet begins one,
        else ask upstream for one (rate-limited) and drop it."""
        if not is_keyframe(self._mime, payload):
            self._want_keyframe()
            return False
        self._waiting = False
        assert self._map is not None
        self._map.restart(seq, ts, 3000)
        return True

    def _sent(self, size: int | None, fast: bool) -> None:
        if size is None:  # the sink leg is not connected (any more)
            self._waiting = self.kind == "video"  # start again at a keyframe
            return
        self.stats.packets += 1
        self.stats.bytes += size
        if fast:
            self.stats.fast_path_packets += 1

    def _use_fast_path(self, ssrc: int) -> None:
        """Take this SSRC's packets straight off the source's socket from now on, when both
        legs write RTP headers the same way (header extension ids and MID): then a packet only
        needs its payload type, sequence number, timestamp and SSRC rewritten."""
        tap = self.datagrams
        if tap is None or self.source is None or self.sink is None:
            return
        if self._fast_ssrc is not None:
            tap.unroute(self._fast_ssrc)
            self._fast_ssrc = None
        source_mid = self.source.receiver_mid
        if (tap.extension_ids() == self.sink.extension_ids()
                and source_mid is not None and source_mid == self.sink.mid):
            tap.route(ssrc, self.on_datagram)
            self._fast_ssrc = ssrc

    # The fast path: a decrypted RTP packet of the current source SSRC, in a reused buffer.
    def on_datagram(self, view: memoryview, length: int) -> None:
        source, sink, seq_map = self.source, self.sink, self._map
        if source is None or sink is None or seq_map is None or self.mode != "forward":
            return
        seq, ts = _SEQ_TS.unpack_from(view, 2)
        source.account(self._ssrc or 0, seq, ts, self._clock_rate)
        estimate = self.estimate
        if estimate is not None:
            self._frame_bytes += length
            if view[1] & 0x80:  # a frame's last packet: the estimate's one step a frame
                now = time.monotonic()
                found = estimate.packet(view, length, int(now * 1000), self._frame_bytes)
                self._frame_bytes = 0
                if found is not None:
                    self._estimated(found, now)
        measure = self.measure
        if measure:  # counted inline: this runs for every packet
            meter = self.meter
            meter.packets += 1
            meter.bytes += length
        if self._waiting and not self._start_at(seq, ts, payload_of(bytes(view[:length]))):
            return
        mapped = seq_map.map(seq, ts)
        if mapped is None:
            return
        size = sink.send_rewritten(view, length, self._payload_type, *mapped)
        self._sent(size, fast=True)
        if measure:
            self._arrivals += 1
            if size is not None and not self._arrivals & (TRANSIT_EVERY - 1) and self.datagrams:
                now = time.time()
                meter.seen(now)
                stamp = self.datagrams.kernel_arrival()
                if stamp:  # kernel arrival -> now, on this host's clock
                    meter.transit.record(max(0.0, (now - stamp) * 1000))

    def _decide(self, codec: RTCRtpCodecParameters) -> bool:
        """Pick forwarding or transcoding once both legs have negotiated; False until then."""
        sink_codec = self.sink.codec if self.sink is not None else None
        if sink_codec is None or self.source is None:
            return False
        if same_codec(codec, sink_codec) and not self._transcode_all:
            self.mode = "forward"
            self._payload_type = sink_codec.payloadType
            self._mime = codec.mimeType
            self._clock_rate = codec.clockRate
            self._map = SequenceMap(*SenderTap.new_origin())
            self.source.stop_decoder()
            if self.congestion:
                self.estimate = Estimate(getattr(self.source.extension_ids(),
                                                 "abs_send_time", None) or 0)
            event(log, "forward.start", call=self.call, kind=self.kind,
                  direction=self.direction, codec=codec.mimeType,
                  congestion_control=self.estimate is not None)
            return True
        self.mode = "transcode"
        self.source.release()
        assert self.sink_track is not None
        self.sink_track.attach(self._relay.subscribe(self.source.receiver.track, buffered=False))
        self.stats.transcoding += 1
        self.stats.transcoded_total += 1
        event(log, "forward.transcode", logging.WARNING if not self._transcode_all else
              logging.INFO, call=self.call, kind=self.kind, direction=self.direction,
              source_codec=codec.mimeType, sink_codec=sink_codec.mimeType)
        if self._on_transcode is not None:
            self._on_transcode(self)
        return False

    def figures(self) -> StreamHop:
        """This hop's figures of the stream so far."""
        lost = repaired = 0
        jitter_ms = None
        if self.source is not None and self._ssrc is not None:
            lost, repaired, jitter = self.source.loss(self._ssrc)
            jitter_ms = jitter * 1000 / self._clock_rate if jitter is not None else None
        figures = self.meter.figures(lost, repaired, jitter_ms, now=time.time())
        if not self.congestion:
            return figures
        feedback = self.feedback
        limit = feedback.limit(time.monotonic())
        return msgspec.structs.replace(
            figures, estimate_kbps=_kbps(feedback.own_bps),
            downstream_kbps=_kbps(feedback.downstream_bps), reported_kbps=_kbps(
                feedback.sent_bps), limited_by=limit[1] if limit is not None else None,
            overuses=self.estimate.overuses if self.estimate is not None else 0)

    # Congestion control: the server's tick (relay/media.py) works the frames noted in.
    def drain_estimate(self, now: float) -> None:
        if self.estimate is not None and (found := self.estimate.drain()) is not None:
            self._estimated(found, now)

    # This hop's estimate changed.
    def _estimated(self, bitrate: int, now: float) -> None:
        self._report_upstream(self.feedback.own(bitrate, now))

    # The sink leg's sender calls this for each REMB about the stream from downstream.
    def on_remb(self, bitrate: int) -> bool:
        if self.mode == "transcode" or not self.congestion:
            return False  # an encoder here answers it (or, off: ignored, as ever)
        now = time.monotonic()
        self.stats.rembs_received += 1
        self._report_upstream(self.feedback.downstream(bitrate, now))
        # Protect the narrow leg from the largest bursts: while downstream reports less than
        # arrives, keyframe requests go upstream at most every PROTECT_KEYFRAME_S.
        arriving = self.meter.recent
        narrow = arriving is not None and bitrate < arriving
        self._limiter.interval = PROTECT_KEYFRAME_S if narrow else self._keyframe_interval
        return True

    def _report_upstream(self, bitrate: int | None) -> None:
        if bitrate is None or self.source is None or self._ssrc is None:
            return
        self.stats.rembs_sent += 1
        task = asyncio.ensure_future(self.source.send_remb(self._ssrc, bitrate))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # The sink leg's sender calls this for each PLI/FIR from downstream.
    def on_keyframe_request(self) -> bool:
        if self.mode == "transcode":
            return False  # the encoder answers it
        self.stats.keyframe_requests_down += 1
        self.meter.keyframes_in += 1
        self._want_keyframe()
        return True

    def _want_keyframe(self) -> None:
        if self.source is None or self._ssrc is None or self.kind != "video":
            return
        delay = self._limiter.ask(self._loop.time())
        if delay == 0:
            self._send_keyframe_request()
        elif delay is not None:
            self._timer = self._loop.call_later(delay, self._deferred_request)

    def _deferred_request(self) -> None:
        self._timer = None
        self._limiter.fired(self._loop.time())
        self._send_keyframe_request()

    def _send_keyframe_request(self) -> None:
        assert self.source is not None and self._ssrc is not None
        self.stats.keyframe_requests_up += 1
        self.meter.keyframes_out += 1
        task = asyncio.ensure_future(self.source.request_keyframe(self._ssrc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        if self.datagrams is not None and self._fast_ssrc is not None:
            self.datagrams.unroute(self._fast_ssrc)
        if self.source is not None:
            self.source.close()
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()
        if self.mode == "transcode":
            self.stats.transcoding -= 1
        self.mode = "pending"
        self.source = self.sink = None


class Bridge:
    """The media of one call at this server: four forwarders joining the upstream leg (toward
    the caller) and the downstream leg (toward the callee)."""

    def __init__(self, call: str, stats: ForwardingStats, relay: MediaRelay,
                 transcode_all: bool = False, measure: bool = True,
                 on_media_up: Callable[[], None] | None = None,
                 on_transcode: Callable[[Forwarder], None] | None = None,
                 congestion: bool = True) -> None:
        self.stats = stats
        self.forwarders: dict[tuple[str, Direction], Forwarder] = {}
        for kind in KINDS:
            for direction in ("caller_to_callee", "callee_to_caller"):
                first = on_media_up if (kind, direction) == ("video", "caller_to_callee") else None
                self.forwarders[kind, direction] = Forwarder(
                    call, kind, direction, stats, relay, transcode_all, measure, first,
                    on_transcode, congestion=congestion)

    def leg_ready(self, transceivers: dict[str, RTCRtpTransceiver], upstream: bool) -> None:
        """A leg's transceivers exist: tap its receivers and take over its senders."""
        incoming: Direction = "caller_to_callee" if upstream else "callee_to_caller"
        outgoing: Direction = "callee_to_caller" if upstream else "caller_to_callee"
        datagrams = DatagramTap(next(iter(transceivers.values())))  # one bundled transport
        for kind, transceiver in transceivers.items():
            source = self.forwarders[kind, incoming]
            source.source = ReceiverTap(transceiver, source.on_packet,
                                        counted(source.meter, self.stats))
            source.datagrams = datagrams
            sink = self.forwarders[kind, outgoing]
            sink.sink = SenderTap(transceiver, sink.on_keyframe_request,
                                  counted(sink.meter, self.stats), sink.on_remb)
            sink.sink_track = SwitchableTrack(kind)
            transceiver.sender.replaceTrack(sink.sink_track)

    def drain_estimates(self, now: float) -> None:
        """Every stream's congestion estimate takes in the frames it noted."""
        for forwarder in self.forwarders.values():
            forwarder.drain_estimate(now)

    def figures(self) -> dict[str, dict[str, StreamHop]]:
        """This hop's figures of the call, by direction and kind (streams that carried any)."""
        out: dict[str, dict[str, StreamHop]] = {}
        for (kind, direction), forwarder in self.forwarders.items():
            if forwarder.meter.packets:
                out.setdefault(direction, {})[kind] = forwarder.figures()
        return out

    @property
    def transcoding(self) -> list[str]:
        return [f"{kind}:{direction}" for (kind, direction), f in self.forwarders.items()
                if f.mode == "transcode"]

    def close(self) -> None:
        for forwarder in self.forwarders.values():
            forwarder.close()

