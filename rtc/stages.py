"""Per-stream stages of the data plane, in the manner of pion/interceptor: each feature of the
per-packet path is one small object, bound once when a stream starts, and a stream's path is the
list of them. The fast path (a datagram decrypted in place, rtc/adapter.py DatagramTap) and the
slow path (a packet aiortc parsed, turned back into the bytes the peer sent) enter the same list.

A producer (rtc/graph.py) runs its stages once per packet:
  :class:`Accounting` (receiver statistics for RTCP, NACKs for what is missing),
  :class:`Meter` (this hop's figures: packets, bytes, a transit sample),
  :class:`Estimate` (the congestion estimate of the leg the stream arrives on);
then each of its consumers runs its own:
  :class:`KeyframeGate` (start, and restart, at a keyframe),
  :class:`Rewrite` (the consumer's own sequence and timestamp space),
  :class:`Send` (protect and send on the consumer's leg; count; time the transit).

A stage takes the :class:`Packet` and returns False to stop it there. A feature left out is a
stage not bound (``--no-hop-figures`` binds no Meter, ``--congestion-control off`` no Estimate),
which is how benchmarks/forwarding.py prices each. Feedback (RTCP) reaches a stage through its
consumer, routed by SSRC (rtc/adapter.py RtcpDispatcher). Each stage is tested alone with fake
taps (tests/test_stages.py).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from rtc.congestion import Estimate as Estimator
from rtc.meter import TRANSIT_EVERY, StreamMeter
from rtc.rtp import SequenceMap, is_keyframe, payload_of

SEQ_TS = struct.Struct("!HI")  #: sequence number and timestamp, from byte 2 of an RTP header


class Packet:
    """The packet a stream's stages work on: the plain RTP packet in ``view[:length]`` (valid only
    during the call: the fast path's buffer is reused), its header fields, and what stages note
    for the ones after them. One per producer, reused for every packet."""

    __slots__ = ("arrival", "fast", "kernel", "length", "marker", "out_seq", "out_ts",
                 "repair", "sample", "seq", "ts", "view")

    def __init__(self, kernel: Callable[[], float] = lambda: 0.0) -> None:
        self.view: memoryview = memoryview(b"")
        self.length = 0
        self.seq = self.ts = 0
        self.marker = False
        self.repair = False  #: it came again, as a retransmission
        self.fast = False  #: taken straight off the socket
        #: when it arrived (s, UNIX time), if the path knows; else :attr:`kernel` says
        self.arrival = 0.0
        #: the kernel's arrival time of the datagram being handled (one system call: sampled)
        self.kernel = kernel
        self.sample = False  #: its transit is to be timed when it leaves
        self.out_seq = self.out_ts = 0

    def load(self, view: memoryview, length: int, fast: bool, repair: bool = False,
             arrival: float = 0.0) -> Packet:
        """Take the plain packet in ``view[:length]``."""
        self.view, self.length = view, length
        self.seq, self.ts = SEQ_TS.unpack_from(view, 2)
        self.marker = view[1] > 127
        self.fast, self.repair, self.arrival = fast, repair, arrival
        self.sample = False
        return self


#: a stage: True to pass the packet on, False to stop it here
Stage = Callable[[Packet], bool]


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
    oversize: int = 0  #: packets too long to protect, dropped (never a leg)


class Counted:
    """The loss-repair counters of one stream's taps: each count goes to the stream's meter and to
    the server's totals."""

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


# ------------------------------------------------------------------ what the stages talk to


class Accountant(Protocol):
    """Where arrivals are counted for RTCP and NACKs (rtc/adapter.py ReceiverTap)."""

    def account(self, ssrc: int, seq: int, ts: int, clock_rate: int, repair: bool = False
                ) -> None: ...


class Sink(Protocol):
    """Where a consumer's packets leave (rtc/adapter.py SenderTap)."""

    oversize: int

    def send_rewritten(self, source: bytes | memoryview, length: int, payload_type: int,
                       seq: int, ts: int, stamp: tuple[int, int] | None = None
                       ) -> int | None: ...

    def send_reheadered(self, source: bytes | memoryview, length: int, extensions: object,
                        payload_type: int, seq: int, ts: int) -> int | None: ...


# ------------------------------------------------------------------ a producer's stages


class Accounting:
    """Receiver statistics (RTCP reports stay true) and NACKs for missing packets, for every
    packet of either path."""

    __slots__ = ("_account", "clock_rate", "ssrc", "tap")

    def __init__(self, tap: Accountant, ssrc: int, clock_rate: int) -> None:
        self.tap, self.ssrc, self.clock_rate = tap, ssrc, clock_rate
        self._account = tap.account

    def __call__(self, packet: Packet) -> bool:
        self._account(self.ssrc, packet.seq, packet.ts, self.clock_rate, packet.repair)
        return True


class Meter:
    """This hop's figures of the stream: packets and bytes that arrived (not retransmissions),
    and one packet in TRANSIT_EVERY marked to have its transit timed when it leaves."""

    __slots__ = ("_count", "meter")

    def __init__(self, meter: StreamMeter) -> None:
        self.meter = meter
        self._count = 0

    def __call__(self, packet: Packet) -> bool:
        if packet.repair:
            return True
        meter = self.meter
        meter.packets += 1
        meter.bytes += packet.length
        self._count += 1
        if not self._count & (TRANSIT_EVERY - 1) or meter.first_at is None:
            meter.seen(time.time())
            packet.sample = True
        return True


class Estimate:
    """The congestion estimate of the leg the stream arrives on (rtc/congestion.py): a step at
    each frame's last packet; ``found(bitrate, now)`` when it changes."""

    __slots__ = ("_frame_bytes", "estimate", "found")

    def __init__(self, estimate: Estimator, found: Callable[[int, float], None]) -> None:
        self.estimate, self.found = estimate, found
        self._frame_bytes = 0

    def __call__(self, packet: Packet) -> bool:
        if packet.repair:
            return True
        self._frame_bytes += packet.length
        if packet.marker:
            now = time.monotonic()
            found = self.estimate.packet(packet.view, packet.length, int(now * 1000),
                                         self._frame_bytes)
            self._frame_bytes = 0
            if found is not None:
                self.found(found, now)
        return True


# ------------------------------------------------------------------ a consumer's stages


class KeyframeGate:
    """A consumer's stream starts, and starts again (a new source, a send that failed), at a
    keyframe (video; until one comes, packets are dropped and one is asked for, rate-limited
    upstream) or at the next packet (audio). Dropping a P-frame would corrupt video until the
    next keyframe; starting at one gives a decodable picture at once."""

    __slots__ = ("_step", "_video", "mime", "opened", "seq_map", "waiting", "want_keyframe")

    def __init__(self, kind: str, mime: str, seq_map: SequenceMap,
                 want_keyframe: Callable[[], None],
                 opened: Callable[[], None] = lambda: None) -> None:
        self.mime, self.seq_map, self.want_keyframe = mime, seq_map, want_keyframe
        #: called when the stream starts: a consumer takes the gate out of its chain then
        self.opened = opened
        self._video = kind == "video"
        self._step = 3000 if self._video else 960  #: the timestamp gap left at a restart
        self.waiting = True

    def restart(self) -> None:
        self.waiting = True

    def __call__(self, packet: Packet) -> bool:
        if not self.waiting:
            return True
        if self._video and (packet.repair or not is_keyframe(
                self.mime, payload_of(packet.view[:packet.length]))):
            self.want_keyframe()
            return False
        self.seq_map.restart(packet.seq, packet.ts, self._step)
        self.waiting = False
        self.opened()
        return True


class Rewrite:
    """The consumer's own sequence and timestamp space: moved by a fixed offset, so a loss stays
    a gap and a NACK maps back; a packet from before the stream's (re)start is dropped."""

    __slots__ = ("seq_map",)

    def __init__(self, seq_map: SequenceMap) -> None:
        self.seq_map = seq_map

    def __call__(self, packet: Packet) -> bool:
        mapped = self.seq_map.map(packet.seq, packet.ts)
        if mapped is None:
            return False
        packet.out_seq, packet.out_ts = mapped
        return True


class Send:
    """Protect and send on the consumer's leg, as its sender's stream (payload type, SSRC, MID):
    rewritten in place where both legs write header extensions alike, else re-headered. Counts
    what left; times the transit of the packets the meter marked (arrival to departure, this
    server's own clock). A leg not connected (any more) makes ``unsent()`` (the gate restarts);
    a packet too long to protect is dropped and counted by the sink."""

    __slots__ = ("_oversize", "extensions", "meter", "payload_type", "sink", "stats", "unsent")

    def __init__(self, sink: Sink, payload_type: int, extensions: object | None,
                 stats: ForwardingStats, meter: StreamMeter | None,
                 unsent: Callable[[], None]) -> None:
        self.sink, self.payload_type = sink, payload_type
        #: None: the legs agree on header extensions (ids and MID), rewrite in place; else the
        #: source leg's map, to re-header each packet
        self.extensions = extensions
        self.stats, self.meter, self.unsent = stats, meter, unsent
        self._oversize = sink.oversize

    def __call__(self, packet: Packet) -> bool:
        sink = self.sink
        if self.extensions is None:
            size = sink.send_rewritten(packet.view, packet.length, self.payload_type,
                                       packet.out_seq, packet.out_ts)
        else:
            size = sink.send_reheadered(packet.view, packet.length, self.extensions,
                                        self.payload_type, packet.out_seq, packet.out_ts)
        if size is None:
            self.unsent()
            return False
        stats = self.stats
        if not size:  # too long to protect: the sink counted and logged it
            stats.oversize += sink.oversize - self._oversize
            self._oversize = sink.oversize
            return False
        stats.packets += 1
        stats.bytes += size
        if packet.fast:
            stats.fast_path_packets += 1
        if packet.sample and self.meter is not None:
            packet.sample = False  # timed once, by the first consumer it left on
            arrival = packet.arrival or packet.kernel()
            if arrival:
                self.meter.transit.record(max(0.0, (time.time() - arrival) * 1000))
        return True
