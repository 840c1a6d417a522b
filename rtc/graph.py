"""The media graph of a server, in mediasoup's words: a leg is a :class:`Transport`; what arrives
on it for one kind is a :class:`Producer`; each place that stream goes is a :class:`Consumer` on
another transport; a :class:`Router` joins them (a call at one server is a small router).

One producer feeds any number of consumers (the other party of a call, a WHEP viewer, a
recorder). Each consumer has its own sequence and timestamp space, keyframe wait, retransmission
history (its sender's) and rate feedback; one added to a live producer asks upstream for a
keyframe and starts at one. Per-packet work is the stages of rtc/stages.py, bound once per
stream; RTCP feedback reaches a consumer through its transport's RtcpDispatcher, by SSRC.

Closing cascades, once, and says why: a router closes its transports; a transport closes its
producers (whose consumers close) and the consumers that send on it.

Where a consumer's leg did not agree on the producer's codec, that consumer falls back to
decoding and re-encoding (aiortc's MediaRelay), if it is the producer's only consumer and the
router was given a relay; otherwise it is refused and says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import msgspec
from aiortc import MediaStreamTrack, RTCRtpTransceiver
from aiortc.contrib.media import MediaRelay
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from rtc.adapter import DatagramTap, PacketHandler, ReceiverTap, RtcpDispatcher, SenderTap
from rtc.congestion import Estimate as Estimator
from rtc.congestion import Feedback
from rtc.meter import StreamMeter
from rtc.rtp import RequestLimiter, SequenceMap, same_codec
from rtc.stages import (
    SEQ_TS,
    Accounting,
    Counted,
    Estimate,
    ForwardingStats,
    KeyframeGate,
    Meter,
    Packet,
    Rewrite,
    Send,
    Stage,
)
from wire.logs import event
from wire.messages import StreamHop
from wire.tasks import Serial, Tasks

log = logging.getLogger("rtc.graph")

#: seconds between keyframe requests sent upstream while a leg downstream is narrower than what
#: arrives (a keyframe is the largest burst a stream makes)
PROTECT_KEYFRAME_S = 2.0

Mode = Literal["pending", "forward", "transcode", "refused", "closed"]


def _kbps(bps: int | None) -> float | None:
    return round(bps / 1000, 1) if bps is not None else None


class SwitchableTrack(MediaStreamTrack):
    """The track a forwarding sender holds. While forwarding, nothing: packets are sent past it.
    For the transcoding fallback a decoded source is attached, and the sender encodes that."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._source: MediaStreamTrack | None = None
        self._attached = asyncio.Event()

    def attach(self, source: MediaStreamTrack) -> None:
        self._source = source
        self._attached.set()

    async def recv(self):  # type: ignore[override]
        await self._attached.wait()
        assert self._source is not None
        return await self._source.recv()

    def stop(self) -> None:
        super().stop()
        if self._source is not None:
            self._source.stop()


class Transport:
    """One leg's media, as the graph sees it: per kind its transceiver (what it receives becomes a
    producer; its sender carries a consumer), the SRTP datagrams taken off its sockets on the
    fast path, and the dispatcher of its RTCP feedback."""

    def __init__(self, name: str, transceivers: dict[str, RTCRtpTransceiver],
                 rtcp: RtcpDispatcher | None = None) -> None:
        self.name = name
        self.transceivers = transceivers
        self.rtcp = rtcp or RtcpDispatcher()
        #: one bundled transport: the first transceiver's sockets carry every kind
        self.datagrams = DatagramTap(next(iter(transceivers.values())))
        self.producers: list[Producer] = []
        self.consumers: list[Consumer] = []
        self.tracks: dict[str, SwitchableTrack] = {}
        self.closed = False
        for kind, transceiver in transceivers.items():
            self.rtcp.attach(transceiver.sender)
            track = self.tracks[kind] = SwitchableTrack(kind)
            transceiver.sender.replaceTrack(track)

    @property
    def kinds(self) -> set[str]:
        return set(self.transceivers)

    def receiver(self, kind: str, handler: PacketHandler, counters: Counted) -> ReceiverTap:
        """Take what arrives of ``kind`` (a producer does)."""
        return ReceiverTap(self.transceivers[kind], handler, counters)

    def sender(self, kind: str, counters: Counted) -> SenderTap:
        """Send on the sender of ``kind`` (a consumer does)."""
        return SenderTap(self.transceivers[kind], counters)

    def attach_track(self, kind: str, source: MediaStreamTrack) -> None:
        """The sender of ``kind`` encodes ``source`` (the transcoding fallback)."""
        self.tracks[kind].attach(source)

    def close(self, why: str = "transport closed") -> None:
        if self.closed:
            return
        self.closed = True
        for consumer in list(self.consumers):
            consumer.close(why)
        for producer in list(self.producers):
            producer.close(why)


class Producer:
    """One stream arriving on a transport (one kind), and the consumers it feeds."""

    def __init__(self, transport: Transport, kind: str, stats: ForwardingStats, *,
                 name: str = "", measure: bool = True, congestion: bool = False,
                 keyframe_interval: float = 0.25,
                 on_first_packet: Callable[[], None] | None = None) -> None:
        self.transport, self.kind, self.stats = transport, kind, stats
        self.name = name or f"{transport.name}:{kind}"
        self.measure = measure
        self.congestion = congestion and kind == "video"
        self.consumers: list[Consumer] = []
        self.meter = StreamMeter()
        self.tap = transport.receiver(kind, self._on_packet, Counted(self.meter, stats))
        self.codec: RTCRtpCodecParameters | None = None
        self.ssrc: int | None = None
        self.released = False  #: aiortc decodes it (a consumer transcodes)
        #: why its sender cannot follow the path's rate (rtc/sdp.py rate_feedback), if known
        self.cannot_adapt: str | None = None
        self.closed = False
        self._on_first_packet = on_first_packet
        self._packet = Packet(transport.datagrams.kernel_arrival)
        self._stages: tuple[Stage, ...] = ()
        self._accounting: Accounting | None = None
        self._limiter = RequestLimiter(keyframe_interval)
        self._keyframe_interval = keyframe_interval
        self._timer: asyncio.TimerHandle | None = None
        #: its keyframe requests and rate reports go out upstream in order, one task
        self._tasks = Tasks("producer")
        self._rtcp = Serial(self._tasks, "producer-rtcp")
        self._loop = asyncio.get_event_loop()
        #: congestion control (video): this hop's estimate of the leg the stream arrives on,
        #: and the least of it and the consumers' reports, sent upstream (rtc/congestion.py)
        self.estimate: Estimator | None = None
        self.feedback = Feedback()
        #: each consumer's latest downstream report (bps, when)
        self._reports: dict[int, tuple[int, float]] = {}
        transport.producers.append(self)

    # -------------------------------------------------------------- the two ways packets come

    def _on_packet(self, data: bytes, codec: RTCRtpCodecParameters, repair: bool,
                   arrival: float) -> None:
        """The slow path: a packet aiortc parsed (RTX unwrapped), as the bytes the peer sent."""
        if self._on_first_packet is not None:
            first, self._on_first_packet = self._on_first_packet, None
            first()
        if self.closed or self.released:
            return
        if self.codec is None:
            self._bind(codec)
        ssrc = int.from_bytes(data[8:12], "big")
        if ssrc != self.ssrc and not repair:
            self._new_source(ssrc)
        self._run(self._packet.load(memoryview(data), len(data), False, repair, arrival))

    def on_datagram(self, view: memoryview, length: int) -> None:
        """The fast path: a decrypted packet of the current source, in a reused buffer.
        (``Packet.load`` and ``_run`` written out: this runs for every packet.)"""
        packet = self._packet
        packet.view, packet.length = view, length
        packet.seq, packet.ts = SEQ_TS.unpack_from(view, 2)
        packet.marker = view[1] > 127
        packet.fast, packet.repair, packet.arrival, packet.sample = True, False, 0.0, False
        for stage in self._stages:
            if not stage(packet):
                return
        for consumer in self.consumers:
            consumer.forward(packet)

    def _run(self, packet: Packet) -> None:
        for stage in self._stages:
            if not stage(packet):
                return
        for consumer in self.consumers:
            consumer.forward(packet)

    def _bind(self, codec: RTCRtpCodecParameters) -> None:
        """The stream's first packet: its codec is known; the stages are bound."""
        self.codec = codec
        self._accounting = Accounting(self.tap, 0, codec.clockRate)
        stages: list[Stage] = [self._accounting]
        if self.measure:
            stages.append(Meter(self.meter))
        if self.congestion:
            self.estimate = Estimator(self.tap.abs_send_time_id())
            stages.append(Estimate(self.estimate, self._estimated))
        # bound methods, not the objects: calling one costs a third of an instance's __call__
        self._stages = tuple(stage.__call__ for stage in stages)

    def _new_source(self, ssrc: int) -> None:
        """A new SSRC: the consumers start again (at a keyframe), and its packets are taken off
        the socket from now on."""
        datagrams = self.transport.datagrams
        if self.ssrc is not None:
            datagrams.unroute(self.ssrc)
        self.ssrc = ssrc
        assert self._accounting is not None
        self._accounting.ssrc = ssrc
        for consumer in self.consumers:
            consumer.restart()
        if self.consumers:
            datagrams.route(ssrc, self.on_datagram)

    # -------------------------------------------------------------- consumers

    def attach(self, consumer: Consumer) -> None:
        self.consumers.append(consumer)
        if self.ssrc is not None and not self.released:
            self.transport.datagrams.route(self.ssrc, self.on_datagram)
        self.want_keyframe()  # a consumer joining mid-stream starts at a keyframe

    def detach(self, consumer: Consumer) -> None:
        if consumer in self.consumers:
            self.consumers.remove(consumer)
        self._reports.pop(id(consumer), None)
        if not self.consumers and self.ssrc is not None:
            self.transport.datagrams.unroute(self.ssrc)

    def release(self) -> None:
        """Give the stream back to aiortc, which decodes it (a consumer transcodes)."""
        self.released = True
        if self.ssrc is not None:
            self.transport.datagrams.unroute(self.ssrc)
        self.tap.release()

    # -------------------------------------------------------------- feedback

    def want_keyframe(self) -> None:
        """Ask upstream for a keyframe: at once, or once when the limiter's interval ends."""
        if self.ssrc is None or self.kind != "video" or self.closed:
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
        if self.ssrc is None or self.closed:
            return
        self.stats.keyframe_requests_up += 1
        self.meter.keyframes_out += 1
        self._spawn(self.tap.request_keyframe(self.ssrc))

    def downstream_report(self, consumer: Consumer, bitrate: int) -> None:
        """A consumer's leg reported what it can take (REMB): upstream hears the least of every
        consumer's report and this hop's own estimate."""
        now = time.monotonic()
        self._reports[id(consumer)] = (bitrate, now)
        stale = now - self.feedback.stale  # a consumer that stopped reporting no longer counts
        least = min(bps for bps, at in self._reports.values() if at >= stale)
        self._report_upstream(self.feedback.downstream(least, now))
        # Protect the narrow leg from the largest bursts: while downstream reports less than
        # arrives, keyframe requests go upstream at most every PROTECT_KEYFRAME_S.
        arriving = self.meter.recent
        narrow = arriving is not None and least < arriving
        self._limiter.interval = PROTECT_KEYFRAME_S if narrow else self._keyframe_interval

    def drain_estimate(self, now: float) -> None:
        """The server's tick: the estimate takes in the frames it noted."""
        if self.estimate is not None and (found := self.estimate.drain()) is not None:
            self._estimated(found, now)

    def _estimated(self, bitrate: int, now: float) -> None:
        self._report_upstream(self.feedback.own(bitrate, now))

    def _report_upstream(self, bitrate: int | None) -> None:
        if bitrate is None or self.ssrc is None or self.closed:
            return
        self.stats.rembs_sent += 1
        self._spawn(self.tap.send_remb(self.ssrc, bitrate))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._rtcp.post(coro)

    # -------------------------------------------------------------- figures, closing

    def figures(self) -> StreamHop:
        """This hop's figures of the stream so far."""
        lost = repaired = 0
        jitter_ms = None
        clock_rate = self.codec.clockRate if self.codec is not None else 90000
        if self.ssrc is not None:
            lost, repaired, jitter = self.tap.loss(self.ssrc)
            jitter_ms = jitter * 1000 / clock_rate if jitter is not None else None
        figures = self.meter.figures(lost, repaired, jitter_ms, now=time.time())
        if self.cannot_adapt is not None:
            figures = msgspec.structs.replace(figures, cannot_adapt=self.cannot_adapt[:300])
        if not self.congestion:
            return figures
        feedback = self.feedback
        limit = feedback.limit(time.monotonic())
        return msgspec.structs.replace(
            figures, estimate_kbps=_kbps(feedback.own_bps),
            downstream_kbps=_kbps(feedback.downstream_bps), reported_kbps=_kbps(
                feedback.sent_bps), limited_by=limit[1] if limit is not None else None,
            overuses=self.estimate.overuses if self.estimate is not None else 0)

    def close(self, why: str = "producer closed") -> None:
        if self.closed:
            return
        self.closed = True
        for consumer in list(self.consumers):
            consumer.close(why)
        if self.ssrc is not None:
            self.transport.datagrams.unroute(self.ssrc)
        self.tap.close()
        if self._timer is not None:
            self._timer.cancel()
        self._tasks.closed = True
        self._tasks.cancel()
        if self in self.transport.producers:
            self.transport.producers.remove(self)


class Consumer:
    """A producer's stream sent on another transport: its own sequence and timestamp space,
    keyframe wait, retransmission history and rate feedback."""

    def __init__(self, producer: Producer, transport: Transport, *, name: str = "",
                 relay: MediaRelay | None = None, transcode_all: bool = False,
                 on_transcode: Callable[[Consumer], None] | None = None,
                 on_open: Callable[[], None] | None = None) -> None:
        kind = producer.kind
        if kind not in transport.kinds:
            raise ValueError(f"transport {transport.name} has no {kind} sender")
        self.producer, self.transport, self.kind = producer, transport, kind
        self.name = name or f"{producer.name}->{transport.name}"
        self.stats = producer.stats
        self.sink = transport.sender(kind, Counted(producer.meter, self.stats))
        self.mode: Mode = "pending"
        self._relay = relay
        self._transcode_all = transcode_all
        self._on_transcode = on_transcode
        #: called once, when the stream first starts (its first keyframe goes out)
        self._on_open = on_open
        self._stages: tuple[Stage, ...] = ()
        self._running: tuple[Stage, ...] = ()
        self._gate: KeyframeGate | None = None
        transport.rtcp.on(self.sink.sender, keyframe=self.on_keyframe_request,
                          remb=self.on_remb, nack=self.on_nack)
        transport.consumers.append(self)
        producer.attach(self)

    def forward(self, packet: Packet) -> None:
        """Take one packet of the producer's (until forwarding is decided: see _bind)."""
        if self._decide():
            self._forward(packet)

    def _forward(self, packet: Packet) -> None:
        for stage in self._stages:
            if not stage(packet):
                return

    def restart(self) -> None:
        """Start again at the next keyframe (a new source, a send that failed)."""
        if self._gate is not None and not self._gate.waiting:
            self._gate.restart()
            self._stages = (self._gate.__call__, *self._running)

    def _opened(self) -> None:
        """The gate let the stream start: it leaves the chain until the stream restarts."""
        self._stages = self._running
        if self._on_open is not None:
            on_open, self._on_open = self._on_open, None
            on_open()

    def _decide(self) -> bool:
        """Forward, or fall back, once both legs have negotiated; False until forwarding."""
        if self.mode != "pending":
            return False
        producer = self.producer
        codec, sink_codec = producer.codec, self.sink.codec
        if codec is None or sink_codec is None:
            return False
        if producer.released:  # another consumer transcodes: aiortc decodes the stream
            self._refuse(codec, sink_codec, "its source is decoded for another consumer")
            return False
        if same_codec(codec, sink_codec) and not self._transcode_all:
            self._bind(codec, sink_codec)
            return True
        self._fall_back(codec, sink_codec)
        return False

    def _bind(self, codec: RTCRtpCodecParameters, sink_codec: RTCRtpCodecParameters) -> None:
        producer = self.producer
        seq_map = SequenceMap(*SenderTap.new_origin())
        self._gate = KeyframeGate(self.kind, codec.mimeType, seq_map, producer.want_keyframe,
                                  self._opened)
        tap = producer.tap
        same = (tap.extension_ids() == self.sink.extension_ids()
                and tap.receiver_mid is not None and tap.receiver_mid == self.sink.mid)
        send = Send(self.sink, sink_codec.payloadType, None if same else tap.extensions,
                    self.stats, producer.meter if producer.measure else None, self.restart)
        # bound methods, not the objects: calling one costs a third of an instance's __call__
        self._running: tuple[Stage, ...] = (Rewrite(seq_map).__call__, send.__call__)
        self._stages = (self._gate.__call__, *self._running)
        self.mode = "forward"
        self.forward = self._forward  # type: ignore[method-assign]  # decided: per packet
        producer.tap.stop_decoder()  # nothing of it will be decoded here (once: idempotent)
        event(log, "consumer.forward", consumer=self.name, kind=self.kind,
              codec=codec.mimeType, rewrite="in place" if same else "re-header",
              congestion_control=producer.estimate is not None)

    def _fall_back(self, codec: RTCRtpCodecParameters, sink_codec: RTCRtpCodecParameters
                   ) -> None:
        producer = self.producer
        if self._relay is None or len(producer.consumers) > 1:
            self._refuse(codec, sink_codec, "codecs differ and it cannot transcode (other "
                         "consumers share the source)" if self._relay is not None
                         else "codecs differ and transcoding is off")
            return
        self.mode = "transcode"
        producer.release()
        self.transport.attach_track(
            self.kind, self._relay.subscribe(producer.tap.receiver.track, buffered=False))
        self.stats.transcoding += 1
        self.stats.transcoded_total += 1
        event(log, "consumer.transcode", logging.WARNING if not self._transcode_all else
              logging.INFO, consumer=self.name, kind=self.kind, source_codec=codec.mimeType,
              sink_codec=sink_codec.mimeType)
        if self._on_transcode is not None:
            self._on_transcode(self)

    def _refuse(self, codec: RTCRtpCodecParameters, sink_codec: RTCRtpCodecParameters,
                why: str) -> None:
        self.mode = "refused"
        event(log, "consumer.refused", logging.WARNING, consumer=self.name, kind=self.kind,
              source_codec=codec.mimeType, sink_codec=sink_codec.mimeType, why=why)

    # -------------------------------------------------------------- feedback from downstream

    def on_keyframe_request(self) -> bool:
        """PLI/FIR from downstream: upstream is asked (coalesced); an encoder here answers it
        instead when transcoding."""
        if self.mode == "transcode":
            return False
        self.stats.keyframe_requests_down += 1
        self.producer.meter.keyframes_in += 1
        self.producer.want_keyframe()
        return True

    def on_remb(self, bitrate: int) -> bool:
        """REMB from downstream: what this consumer's leg can take, passed upstream."""
        if self.mode == "transcode" or not self.producer.congestion:
            return False  # an encoder here answers it (or, off: ignored, as ever)
        self.stats.rembs_received += 1
        self.producer.downstream_report(self, bitrate)
        return True

    async def on_nack(self, lost: list[int]) -> bool:
        """NACK from downstream: answered from this consumer's own history."""
        if self.mode == "transcode":
            return False
        await self.sink.retransmit(lost)
        return True

    def close(self, why: str = "consumer closed") -> None:
        if self.mode == "closed":
            return
        if self.mode == "transcode":
            self.stats.transcoding -= 1
        self.mode = "closed"
        self._stages = self._running = ()
        self.transport.rtcp.off(self.sink.sender)
        self.producer.detach(self)
        if self in self.transport.consumers:
            self.transport.consumers.remove(self)
        event(log, "consumer.closed", logging.DEBUG, consumer=self.name, why=why)


class Router:
    """Producers and consumers joined, at one server: a call's media, or a device's stream
    watched from elsewhere. Closing it closes everything in it, once."""

    def __init__(self, name: str, stats: ForwardingStats, *, measure: bool = True,
                 congestion: bool = False, keyframe_interval: float = 0.25,
                 relay: MediaRelay | None = None, transcode_all: bool = False) -> None:
        self.name, self.stats = name, stats
        self.measure, self.congestion = measure, congestion
        self.keyframe_interval = keyframe_interval
        self.relay, self.transcode_all = relay, transcode_all
        self.transports: dict[str, Transport] = {}
        self.producers: list[Producer] = []
        self.consumers: list[Consumer] = []
        self.closed = False

    def transport(self, name: str, transceivers: dict[str, RTCRtpTransceiver],
                  rtcp: RtcpDispatcher | None = None) -> Transport:
        transport = self.transports[name] = Transport(name, transceivers, rtcp)
        return transport

    def produce(self, transport: Transport, kind: str, name: str = "",
                on_first_packet: Callable[[], None] | None = None) -> Producer:
        producer = Producer(transport, kind, self.stats, name=name, measure=self.measure,
                            congestion=self.congestion, keyframe_interval=self.keyframe_interval,
                            on_first_packet=on_first_packet)
        self.producers.append(producer)
        return producer

    def consume(self, producer: Producer, transport: Transport, name: str = "",
                on_transcode: Callable[[Consumer], None] | None = None,
                on_open: Callable[[], None] | None = None) -> Consumer:
        """Send ``producer``'s stream on ``transport`` too (live or not yet: it starts at the
        producer's next keyframe, asked for now). ``producer`` may belong to another router
        (a WHIP publisher's, which outlives the calls that consume it)."""
        consumer = Consumer(producer, transport, name=name, relay=self.relay,
                            transcode_all=self.transcode_all, on_transcode=on_transcode,
                            on_open=on_open)
        self.consumers.append(consumer)
        return consumer

    def drain_estimates(self, now: float) -> None:
        """Every stream's congestion estimate takes in the frames it noted."""
        for producer in self.producers:
            producer.drain_estimate(now)

    def close(self, why: str = "router closed") -> None:
        if self.closed:
            return
        self.closed = True
        for transport in self.transports.values():
            transport.close(why)
        for consumer in self.consumers:
            consumer.close(why)
        for producer in self.producers:
            producer.close(why)
