"""The media layer of one server: carries out the core's media effects (relay/effects.py).

For each call it makes the two legs (relay/leg.py: one aiortc peer connection each) and the bridge
that forwards encoded packets between them (relay/forward.py), makes the offers this server owes,
applies the offers and answers the core hands it, and closes it all once when the call ends. It
owns every task it starts, per call and for itself; what happens to the media (the caller's
first packet, a leg that failed, a direction that fell back to transcoding) goes back to the core
through :class:`MediaEvents`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiortc.contrib.media import MediaRelay

from relay.effects import Link, Negotiate, PortPlan, StartMedia
from relay.forward import Bridge, Direction, ForwardingStats
from relay.leg import Leg
from rtc.adapter import MediaSettings
from rtc.congestion import ESTIMATE_EVERY_S
from rtc.graph import Consumer, Producer
from rtc.sdp import answer_problems, rate_feedback, section
from wire.logs import event
from wire.messages import Answer, Error, HopFigures, Message, Offer, Role
from wire.reasons import Code
from wire.tasks import Tasks

log = logging.getLogger("relay.media")


class MediaEvents(Protocol):
    """What the media layer tells the core (the server feeds these in with ``now``)."""

    def media_up(self, call: str) -> None: ...
    def media_failed(self, call: str, code: Code, detail: str | None = None) -> None: ...
    def transcoded(self, call: str, where: str) -> None: ...
    def hop_figures(self, call: str, figures: HopFigures) -> None: ...
    def first_sent(self, call: str, device: str) -> None: ...
    def media_closed(self, call: str) -> None: ...


@dataclass
class CallMedia:
    """One call's legs, by the link each runs over, its bridge, and its tasks."""

    call: str
    bridge: Bridge
    legs: dict[Link, Leg]
    tasks: Tasks = field(default_factory=lambda: Tasks("call media"))
    #: each leg's side of the call (the leg toward the caller, the one toward the callee)
    toward: dict[Link, Role] = field(default_factory=dict)


#: what every leg's far end must do with each kind: a call carries audio and video both ways
BOTH_WAYS = {"audio": "sendrecv", "video": "sendrecv"}

#: seconds between a call's hop figures while it is up (and once more when it ends)
HOP_REPORT_S = 1.0


class MediaPlane:
    def __init__(self, server: str, settings: MediaSettings, transcode_all: bool,
                 send: Callable[[Link, Message], None], events: MediaEvents,
                 measure: bool = True, congestion: bool = True) -> None:
        self.server = server
        self.measure = measure
        self.congestion = congestion
        self.settings = settings
        self.transcode_all = transcode_all
        self.stats = ForwardingStats()
        self._send = send
        self._events = events
        self._relay = MediaRelay()  # decodes, for the transcoding fallback only
        self.calls: dict[str, CallMedia] = {}
        #: devices whose media is a live session's producers, by device id (WHIP publishers:
        #: relay/gateway.py); a call consumes them and makes no leg to the device
        self.sources: dict[str, dict[str, Producer]] = {}
        #: devices whose leg is a session's, made already (WHEP players), by device id
        self.sinks: dict[str, Leg] = {}
        #: the plane's own tasks (figures, estimates) and the calls' closings
        self._tasks = Tasks(f"media {server}")
        self._closing = Tasks(f"media {server} closings")
        self._reporter: asyncio.Task[None] | None = None
        self._estimator: asyncio.Task[None] | None = None

    def legs(self) -> list[Leg]:
        return [leg for media in self.calls.values() for leg in media.legs.values()]

    def start(self, effect: StartMedia) -> None:
        call = effect.call
        on_media_up = (lambda: self._events.media_up(call)) if effect.up.role == "caller" \
            else None
        bridge = Bridge(call, self.stats, self._relay, transcode_all=self.transcode_all,
                        measure=self.measure, on_media_up=on_media_up,
                        on_transcode=lambda c: self._transcoded(call, bridge, c),
                        congestion=self.congestion, directions=effect.directions)
        media = CallMedia(call, bridge, {}, toward={effect.up.link: "caller",
                                                    effect.down.link: "callee"})
        gateways = []
        for plan, upstream in ((effect.up, True), (effect.down, False)):
            device = plan.link.name if plan.link.kind == "device" else None
            if plan.tap is not None:
                producers = self._tapped(plan.tap, plan.link)
                gateways.append(lambda up=upstream, p=producers: bridge.source_ready(p, up))
                continue
            if device in self.sources:
                gateways.append(lambda up=upstream, d=device: bridge.source_ready(
                    self.sources[d], up))
                continue
            if device in self.sinks:
                bridge.on_first_sent(upstream, lambda d=device: self._events.first_sent(call, d))
                leg = self.sinks[device]
                gateways.append(lambda up=upstream, leg=leg: bridge.leg_ready(
                    leg.transceivers, up, leg.rtcp))
                continue
            media.legs[plan.link] = Leg(
                call, str(plan.link), self.settings,
                on_ready=lambda transceivers, rtcp, up=upstream: bridge.leg_ready(
                    transceivers, up, rtcp),
                on_failed=lambda leg, why: self._events.media_failed(
                    call, Code.MEDIA_FAILED, f"leg {leg.name} {why}"))
        self.calls[call] = media
        if self.measure and (self._reporter is None or self._reporter.done()):
            self._reporter = self._tasks.spawn(self._report(), "hop-figures")
        if self.congestion and (self._estimator is None or self._estimator.done()):
            self._estimator = self._tasks.spawn(self._estimate(), "estimates")
        for ready in gateways:  # a session's leg or producers: live already
            ready()
        for plan in (effect.up, effect.down):
            if plan.offer and plan.link in media.legs:
                self._spawn(media, self._offer(media, plan), f"{call}-offer-{plan.link}")

    def _tapped(self, call: str, link: Link) -> dict[str, Producer]:
        """What the device on ``link`` sends in call ``call`` here: its producers, to fan out
        to another call (none if that call's media is gone)."""
        source = self.calls.get(call)
        if source is None or link not in source.toward:
            return {}
        direction = "caller_to_callee" if source.toward[link] == "caller" \
            else "callee_to_caller"
        return {kind: producer for (kind, way), producer in source.bridge.producers.items()
                if way == direction}

    async def _offer(self, media: CallMedia, plan: PortPlan) -> None:
        sdp = await media.legs[plan.link].create_offer(plan.codec)
        self._send(plan.link, Offer(call=media.call, leg=media.call, sdp=sdp))

    def negotiate(self, effect: Negotiate) -> None:
        media = self.calls.get(effect.call)
        if media is None or effect.link not in media.legs:
            return  # the call ended meanwhile
        self._spawn(media, self._negotiate(media, effect), f"{effect.call}-sdp-{effect.link}")

    async def _negotiate(self, media: CallMedia, effect: Negotiate) -> None:
        leg = media.legs[effect.link]
        description = effect.description
        if isinstance(description, Answer) and leg.offer_sdp is not None:
            problems = answer_problems(leg.offer_sdp, description.sdp, BOTH_WAYS)
            if problems:
                self._unusable(media, effect.link, leg, "; ".join(problems))
                return
        try:
            if isinstance(description, Offer):
                sdp = await leg.create_answer(description.sdp)
            else:
                await leg.accept_answer(description.sdp)
        except Exception as exc:  # a bad SDP from the peer must not take the server down
            event(log, "leg.bad_sdp", logging.WARNING, call=media.call, leg=leg.name,
                  ref=description.TYPE, error=repr(exc))
            self._send(effect.link, Error(code=Code.BAD_SDP, message=f"{description.TYPE} "
                                          f"refused: {exc}"[:1024], field="sdp",
                                          call=media.call, ref=description.TYPE))
            self._events.media_failed(media.call, Code.BAD_SDP,
                                      f"leg {leg.name}: {description.TYPE} refused: {exc}")
            return
        incoming: Direction = "caller_to_callee" if media.toward[effect.link] == "caller" \
            else "callee_to_caller"
        producer = media.bridge.producers.get(("video", incoming))
        if producer is not None:
            producer.cannot_adapt = rate_feedback(section(description.sdp, "video"))
        if isinstance(description, Offer):
            self._send(effect.link, Answer(call=media.call, leg=description.leg, sdp=sdp))

    def _unusable(self, media: CallMedia, link: Link, leg: Leg, why: str) -> None:
        """An answer that cannot carry the call: refused, and the call ends saying why."""
        event(log, "leg.unusable_answer", logging.WARNING, call=media.call, leg=leg.name,
              why=why)
        self._send(link, Error(code=Code.UNUSABLE_ANSWER, message=f"answer refused: {why}"[
            :1024], field="sdp", call=media.call, ref="answer"))
        self._events.media_failed(media.call, Code.UNUSABLE_ANSWER, f"leg {leg.name}: {why}")

    def _transcoded(self, call: str, bridge: Bridge, consumer: Consumer) -> None:
        self._events.transcoded(call, f"{self.server}:{bridge.direction_of(consumer)}")

    def figures(self, media: CallMedia) -> HopFigures:
        """This server's own part of the call (relay/hops.py)."""
        return HopFigures(
            server=self.server, at=time.time(), streams=media.bridge.figures(),  # type: ignore[arg-type]
            legs=[leg.figures(media.toward[link], str(link))
                  for link, leg in media.legs.items()])

    async def _report(self) -> None:
        """Every call's hop figures, every HOP_REPORT_S, to the core (which passes them on)."""
        while self.calls:
            await asyncio.sleep(HOP_REPORT_S)
            for call, media in list(self.calls.items()):
                self._events.hop_figures(call, self.figures(media))

    async def _estimate(self) -> None:
        """Every ESTIMATE_EVERY_S, every stream's congestion estimate takes in the frames it
        noted: all streams' at once, which costs less than half of taking each frame as it
        comes (rtc/congestion.py, Estimate)."""
        while self.calls:
            await asyncio.sleep(ESTIMATE_EVERY_S)
            now = time.monotonic()
            for media in list(self.calls.values()):
                media.bridge.drain_estimates(now)
            for producers in self.sources.values():
                for producer in producers.values():
                    producer.drain_estimate(now)

    def stop(self, call: str) -> None:
        """Close a call's legs, once; its tasks are cancelled first. The call's last hop
        figures go to the core first; the core hears when the legs are closed."""
        media = self.calls.pop(call, None)
        if media is None:
            self._events.media_closed(call)
            return
        if self.measure:
            self._events.hop_figures(call, self.figures(media))
        self._closing.spawn(self._close(media), f"{call}-close")

    async def _close(self, media: CallMedia) -> None:
        try:
            await media.tasks.close()
            media.bridge.close()
            await asyncio.gather(*(leg.close() for leg in media.legs.values()),
                                 return_exceptions=True)
        finally:
            self._events.media_closed(media.call)

    async def close(self) -> None:
        for call in list(self.calls):
            self.stop(call)
        await self._tasks.close()
        while len(self._closing):
            await self._closing.wait()

    def _spawn(self, media: CallMedia, coro: Coroutine[Any, Any, None], name: str) -> None:
        media.tasks.spawn(coro, name)
