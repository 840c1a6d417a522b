"""The media of one call at this server: a Router of the media graph (rtc/graph.py) joining the
call's two legs, without decoding.

The leg toward the caller (upstream) and the leg toward the callee (downstream) are transports.
What arrives on each, per kind, is a producer; each producer has a consumer on the other leg:
four streams, each sent on as the other leg's own stream, packet by packet (rtc/stages.py), a
frame leaving as soon as its last packet is in. Keyframe requests go upstream hop by hop,
coalesced; NACKs are answered by each hop from its own history; congestion feedback goes
upstream as the least of this hop's estimate and what downstream reported.

When the two legs did not agree on the same codec, that direction alone falls back to decoding
and re-encoding (aiortc's MediaRelay), and says so. Others may watch a producer from elsewhere
(a second consumer): :meth:`Bridge.watch`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import msgspec
from aiortc import RTCRtpTransceiver
from aiortc.contrib.media import MediaRelay

from rtc.adapter import RtcpDispatcher
from rtc.graph import Consumer, Producer, Router, Transport
from rtc.stages import ForwardingStats
from wire.messages import StreamHop

Direction = Literal["caller_to_callee", "callee_to_caller"]
KINDS = ("audio", "video")

__all__ = ["Bridge", "Direction", "ForwardingStats"]


class Bridge:
    """The media of one call at this server: the upstream leg (toward the caller) and the
    downstream leg (toward the callee), a producer on each per kind, a consumer of it on the
    other."""

    def __init__(self, call: str, stats: ForwardingStats, relay: MediaRelay,
                 transcode_all: bool = False, measure: bool = True,
                 on_media_up: Callable[[], None] | None = None,
                 on_transcode: Callable[[Consumer], None] | None = None,
                 congestion: bool = True,
                 directions: tuple[str, ...] = ("caller_to_callee", "callee_to_caller"),
                 ) -> None:
        self.call = call
        #: the directions the call carries (one only with a WHIP or WHEP party)
        self.directions = directions
        self.stats = stats
        self.router = Router(call, stats, measure=measure, congestion=congestion,
                             relay=relay, transcode_all=transcode_all)
        self.producers: dict[tuple[str, Direction], Producer] = {}
        self.consumers: dict[tuple[str, Direction], Consumer] = {}
        self._on_media_up = on_media_up
        self._on_transcode = on_transcode
        self._legs: dict[bool, Transport] = {}
        #: sides that only send, with producers of their own (a WHIP publisher's session)
        self._sources: set[bool] = set()
        #: sides whose receiver cannot say it decoded a frame (a WHEP player): the first
        #: keyframe sent to it is called for instead
        self._on_open: dict[bool, Callable[[], None]] = {}
        #: a live source's figures when this call took it, and when
        self._since: dict[tuple[str, Direction], tuple[float, StreamHop]] = {}

    def leg_ready(self, transceivers: dict[str, RTCRtpTransceiver], upstream: bool,
                  rtcp: RtcpDispatcher | None = None) -> None:
        """A leg's transceivers exist: it becomes a transport, what it receives producers, and
        once both legs are here each producer gets its consumer on the other."""
        incoming: Direction = "caller_to_callee" if upstream else "callee_to_caller"
        name = f"{self.call}:{'up' if upstream else 'down'}"
        transport = self._legs[upstream] = self.router.transport(name, transceivers, rtcp)
        for kind in KINDS:
            first = self._on_media_up if (kind, incoming) == ("video", "caller_to_callee") \
                else None
            self.producers[kind, incoming] = self.router.produce(
                transport, kind, f"{name}:{kind}", on_first_packet=first)
        self._join()

    def source_ready(self, producers: dict[str, Producer], upstream: bool) -> None:
        """A side that only sends, with live producers of its own (a WHIP publisher's, which
        outlive the call): the other side consumes them; nothing is sent to it."""
        incoming: Direction = "caller_to_callee" if upstream else "callee_to_caller"
        for kind, producer in producers.items():
            self.producers[kind, incoming] = producer
            # its figures before this call are not this call's (see figures)
            self._since[kind, incoming] = (time.time(), producer.figures())
        self._sources.add(upstream)
        self._join()

    def on_first_sent(self, upstream: bool, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the video sent to that side first starts (its keyframe)."""
        self._on_open[upstream] = callback

    def _join(self) -> None:
        """Once both sides are here, each producer of a direction the call carries gets its
        consumer on the other side's transport."""
        if len(self._sources | set(self._legs)) < 2:
            return
        for (kind, direction), producer in self.producers.items():
            toward_caller = direction == "callee_to_caller"
            sink = self._legs.get(toward_caller)
            if direction not in self.directions or sink is None or kind not in sink.kinds \
                    or (kind, direction) in self.consumers:
                continue
            on_open = self._on_open.get(toward_caller) if kind == "video" else None
            self.consumers[kind, direction] = self.router.consume(
                producer, sink, on_transcode=self._on_transcode, on_open=on_open)

    def watch(self, kind: str, direction: Direction, transport: Transport) -> Consumer:
        """Send one of the call's streams on another transport too (fan-out): it starts at the
        producer's next keyframe."""
        return self.router.consume(self.producers[kind, direction], transport)

    def direction_of(self, consumer: Consumer) -> str:
        for (kind, direction), found in self.consumers.items():
            if found is consumer:
                return f"{kind}:{direction}"
        return consumer.name

    def drain_estimates(self, now: float) -> None:
        """Every stream's congestion estimate takes in the frames it noted."""
        self.router.drain_estimates(now)

    def figures(self) -> dict[str, dict[str, StreamHop]]:
        """This hop's figures of the call, by direction and kind (streams that carried any)."""
        out: dict[str, dict[str, StreamHop]] = {}
        for (kind, direction), producer in self.producers.items():
            if producer.meter.packets:
                figures = producer.figures()
                since = self._since.get((kind, direction))
                if since is not None:
                    figures = _since(figures, *since)
                out.setdefault(direction, {})[kind] = figures
        return out

    @property
    def transcoding(self) -> list[str]:
        return [f"{kind}:{direction}" for (kind, direction), c in self.consumers.items()
                if c.mode == "transcode"]

    def close(self) -> None:
        self.router.close("call ended")


def _since(now: StreamHop, at: float, then: StreamHop) -> StreamHop:
    """A live source's figures counted from when a call took it (a WHIP publisher's stream
    arrives before and between calls): what arrived, its bitrate and its losses since then.
    Transit counts only what was forwarded, so it is this call's (and its other consumers')."""
    span = max(1e-6, time.time() - at)
    grown = now.bytes - then.bytes
    return msgspec.structs.replace(
        now, packets=now.packets - then.packets, bytes=grown,
        bitrate_kbps=round(grown * 8 / span / 1000, 1),
        lost=max(0, now.lost - then.lost), repaired=max(0, now.repaired - then.repaired),
        keyframes_in=now.keyframes_in - then.keyframes_in,
        keyframes_out=now.keyframes_out - then.keyframes_out,
        nacks_in=now.nacks_in - then.nacks_in, nacks_out=now.nacks_out - then.nacks_out)
