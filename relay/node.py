"""What both server roles share: calls, their legs, and the signalling that drives them.

A call at a server is a :class:`Session` with two :class:`Port` s: the one toward the caller
(upstream) and the one toward the callee (downstream). A port is a signalling :class:`Channel`
(a device's WebSocket, or a trunk to another server) plus the :class:`Leg` (peer connection) that
carries the call's media over it. The role decides which channels a call uses:

- origin (the caller's lower server): caller device -> callee device, or -> parent trunk;
- transit (the upper server): child trunk -> child trunk;
- terminating (the callee's lower server): parent trunk -> callee device.

This server offers on device ports and on the downstream trunk; it answers on the upstream trunk.
Timeline events and media figures travel along the path to every server; a hang-up travels away
from whoever ended the call.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from aiortc.contrib.media import MediaRelay

from relay.call import Call, CallState, CallStateError, MediaReport, Milestone
from relay.forward import Bridge, Forwarder, ForwardingStats
from relay.leg import Leg
from relay.logs import event
from relay.messages import (
    VIDEO_CODECS,
    Answer,
    CallInfo,
    CallSetup,
    CallUpdate,
    Error,
    FirstFrame,
    Hangup,
    Message,
    Offer,
    Role,
    Stats,
    Wake,
    Woken,
)
from relay.settings import ServerSettings

log = logging.getLogger("relay.node")

ChannelKind = Literal["device", "child", "parent"]
Clock = Callable[[], float]


class Channel(abc.ABC):
    """A signalling link this server talks over: a device, a child server or the parent."""

    kind: ChannelKind
    name: str
    #: for devices: the video codecs it takes, in its order of preference
    codecs: tuple[str, ...] = VIDEO_CODECS

    @abc.abstractmethod
    async def send(self, message: Message) -> bool:
        """Send one message; False (logged, not raised) if the link is gone."""

    @property
    @abc.abstractmethod
    def open(self) -> bool: ...


@dataclass
class Port:
    channel: Channel
    leg: Leg
    #: for device ports: the device's part in the call
    device_role: Role | None = None

    @property
    def is_trunk(self) -> bool:
        return self.channel.kind != "device"


@dataclass
class Session:
    call: Call
    upstream: Port
    downstream: Port
    bridge: Bridge
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def ports(self) -> tuple[Port, Port]:
        return (self.upstream, self.downstream)

    def port_for(self, channel: Channel) -> Port | None:
        for port in self.ports:
            if port.channel is channel:
                return port
        return None

    def other(self, port: Port) -> Port:
        return self.downstream if port is self.upstream else self.upstream


#: The end reason of calls a server ends because it is stopping (SIGTERM), and the refusal
#: code of new calls while it drains.
SHUTTING_DOWN = "server_shutting_down"


class Node:
    """Calls at one server. Subclasses add the role: device registry, trunks, routing."""

    role: Literal["lower", "upper"]
    #: Ended calls stay readable (GET /v1/calls/{id}, late device reports) this long, and at
    #: most this many: a server's memory stays flat however many calls it has carried.
    ENDED_KEEP_S = 120.0
    ENDED_KEPT = 10_000

    def __init__(self, settings: ServerSettings, clock: Clock = time.time) -> None:
        self.settings = settings
        self.name = settings.name
        self.media = settings.media
        self.timeouts = settings.timeouts
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.ended: OrderedDict[str, Call] = OrderedDict()
        self._relay = MediaRelay()  # decodes, for the transcoding fallback only
        self.forwarding = ForwardingStats()
        #: calls ended here since start, by reason (for /metrics)
        self.ended_by_reason: dict[str, int] = {}
        #: requests and messages turned away by a limit, by code (for /metrics)
        self.refusals: dict[str, int] = {}
        #: set on SIGTERM: new calls and links are refused while the calls in progress end
        self.draining = False
        self.calls_started = 0
        self._changed = asyncio.Condition()
        self._background: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None
        #: Set once the server listens and knows its URL (the parent link waits for it).
        self.listening = asyncio.Event()
        self.url = settings.public_url or ""

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_loop(), name=f"{self.name}-ticker")

    async def close(self, reason: str = SHUTTING_DOWN) -> None:
        """End every call, close every leg, cancel every task this node owns."""
        for session in list(self.sessions.values()):
            self.end_session(session, reason)
        if self._ticker:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def refused(self, code: str) -> None:
        """Count a request or message turned away by a limit."""
        self.refusals[code] = self.refusals.get(code, 0) + 1

    def spawn(self, coro: Coroutine[Any, Any, Any], owner: Session | None = None,
              name: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` as a task owned by a session (cancelled with it) or by the node."""
        task = asyncio.create_task(coro, name=name)
        tasks = owner.tasks if owner is not None else self._background
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("task.failed", extra={"task": task.get_name(), "error": repr(exc)},
                      exc_info=exc)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = self.clock()
            for session in list(self.sessions.values()):
                if session.call.tick(now).ended:
                    self._after_end(session, session.call.reason or "timeout", None)

    # ------------------------------------------------------------------ sessions

    def new_call_id(self) -> str:
        return uuid.uuid4().hex[:16]

    def start_session(self, call: Call, upstream: tuple[Channel, Role | None],
                      downstream: tuple[Channel, Role | None]) -> Session:
        """Create the session's two legs and start signalling on the ports this server drives."""
        on_media_up = None
        if upstream[1] == "caller" and "t_media_up" not in call.timeline:
            def on_media_up() -> None:
                self.record(call.id, "t_media_up", self.clock())
        bridge = Bridge(call.id, self.forwarding, self._relay,
                        transcode_all=self.settings.media_mode == "transcode",
                        on_media_up=on_media_up,
                        on_transcode=lambda f: self._on_transcode(call.id, f))
        up = Port(upstream[0], self._new_leg(call.id, upstream[0], bridge, True), upstream[1])
        down = Port(downstream[0], self._new_leg(call.id, downstream[0], bridge, False),
                    downstream[1])
        session = Session(call, up, down, bridge)
        self.sessions[call.id] = session
        self.calls_started += 1
        for port in session.ports:
            if port.channel.kind == "device":
                self.spawn(self._drive_device(session, port), session, f"{call.id}-wake")
            elif port is down:
                self.spawn(self._drive_trunk(session, port), session, f"{call.id}-setup")
        event(log, "call.session", call=call.id, caller=call.caller, callee=call.callee,
              upstream=up.channel.name, downstream=down.channel.name)
        return session

    def _new_leg(self, call_id: str, channel: Channel, bridge: Bridge, upstream: bool) -> Leg:
        return Leg(call_id, f"{channel.kind}:{channel.name}", self.media,
                   on_ready=lambda transceivers: bridge.leg_ready(transceivers, upstream),
                   on_failed=lambda leg: self._on_leg_failed(call_id, leg))

    async def _drive_device(self, session: Session, port: Port) -> None:
        call = session.call
        assert port.device_role is not None
        peer = call.callee if port.device_role == "caller" else call.caller
        if not await port.channel.send(Wake(call=call.id, role=port.device_role, peer=peer,
                                            media_mode=call.media_mode)):
            self.end_session(session, f"{port.device_role}_unreachable")
            return
        if call.media_mode == "none":
            return  # signalling only: no leg is made (a Leg makes its peer connection lazily)
        # The call's codec if the device takes it; else its own, and this server transcodes.
        codecs = port.channel.codecs
        sdp = await port.leg.create_offer(call.codec if call.codec in codecs else codecs[0])
        await port.channel.send(Offer(call=call.id, leg=call.id, sdp=sdp))

    async def _drive_trunk(self, session: Session, port: Port) -> None:
        call = session.call
        setup = CallSetup(call=call.id, caller=call.caller, callee=call.callee, codec=call.codec,
                          media_mode=call.media_mode)
        if not await port.channel.send(setup):
            self.end_session(session, "server_unreachable")
            return
        if call.media_mode == "none":
            return
        sdp = await port.leg.create_offer(call.codec)
        await port.channel.send(Offer(call=call.id, leg=call.id, sdp=sdp))

    def _on_transcode(self, call_id: str, forwarder: Forwarder) -> None:
        """A direction of this call fell back to transcoding: the call's record says where."""
        session = self.sessions.get(call_id)
        if session is None:
            return
        where = f"{self.name}:{forwarder.kind}:{forwarder.direction}"
        session.call.transcoded.append(where)
        self._forward_update(session, CallUpdate(call=call_id, transcoded=[where]), None)

    def _on_leg_failed(self, call_id: str, leg: Leg) -> None:
        session = self.sessions.get(call_id)
        if session is not None:
            self.end_session(session, "media_failed")

    # ------------------------------------------------------------------ timeline

    def record(self, call_id: str, name: str, at: float,
               source: Channel | None = None) -> None:
        """Record a timeline event here and pass it to the other servers on the path."""
        session = self.sessions.get(call_id)
        if session is None:
            return
        try:
            transition = session.call.handle(Milestone(name, at))
        except CallStateError as exc:
            event(log, "call.event_refused", logging.WARNING, call=call_id, reason=exc.message)
            return
        self._forward_update(session, CallUpdate(call=call_id, events={name: at}), source)
        if transition.activated:
            event(log, "call.active", call=call_id, caller=session.call.caller,
                  callee=session.call.callee)
        self._notify()

    def _forward_update(self, session: Session, update: CallUpdate,
                        source: Channel | None) -> None:
        for port in session.ports:
            if port.is_trunk and port.channel is not source:
                self.spawn(port.channel.send(update), session)

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()
        self.spawn(notify())

    async def wait_for(self, call_id: str, states: set[CallState], timeout: float) -> None:
        """Wait until the call is in one of ``states`` (or ended), at most ``timeout`` seconds."""
        def reached() -> bool:
            call = self.find_call(call_id)
            return call is None or call.state in states or call.state is CallState.ENDED
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(reached)

    # ------------------------------------------------------------------ ending

    def end_session(self, session: Session, reason: str, source: Channel | None = None) -> None:
        """End a call here, tell the other side(s), and close its legs."""
        if session.call.end(reason, self.clock()).ended:
            self._after_end(session, reason, source)

    def _after_end(self, session: Session, reason: str, source: Channel | None) -> None:
        call = session.call
        self.sessions.pop(call.id, None)
        self.ended[call.id] = call
        self.ended_by_reason[reason] = self.ended_by_reason.get(reason, 0) + 1
        now = call.timeline.get("t_end", self.clock())
        while self.ended and (len(self.ended) > self.ENDED_KEPT or now - next(
                iter(self.ended.values())).timeline.get("t_end", now) > self.ENDED_KEEP_S):
            self.ended.popitem(last=False)
        hangup = Hangup(call=call.id, reason=reason)
        for port in session.ports:
            if port.channel is not source and port.channel.open:
                self.spawn(port.channel.send(hangup))
        self.spawn(self._close_session(session))
        event(log, "call.ended", call=call.id, caller=call.caller, callee=call.callee,
              reason=reason, state_was=call.state.value,
              duration_s=round(call.timeline["t_end"] - call.created_at, 3))
        self.session_ended(session)
        self._notify()

    async def _close_session(self, session: Session) -> None:
        current = asyncio.current_task()
        for task in list(session.tasks):
            if task is not current:
                task.cancel()
        await asyncio.gather(*[t for t in session.tasks if t is not current],
                             return_exceptions=True)
        session.bridge.close()
        await asyncio.gather(*(port.leg.close() for port in session.ports),
                             return_exceptions=True)

    def session_ended(self, session: Session) -> None:
        """Hook for the role: free devices, publish their state."""

    def channel_closed(self, channel: Channel, reason: str) -> None:
        """A link went away: every call that used it ends with ``reason``."""
        for session in list(self.sessions.values()):
            if session.port_for(channel) is not None:
                self.end_session(session, reason, source=channel)

    # ------------------------------------------------------------------ messages

    async def handle_call_message(self, channel: Channel, message: Message) -> None:
        """Offer, answer, hang-up, updates and device reports for a call on ``channel``."""
        call_id: str = getattr(message, "call")  # noqa: B009 - every call message has one
        session = self.sessions.get(call_id)
        port = session.port_for(channel) if session else None
        if session is None or port is None:
            if isinstance(message, Stats) and call_id in self.ended:
                self._media_report(self.ended[call_id], channel, message)
                return
            if isinstance(message, Hangup | CallUpdate) and call_id in self.ended:
                return  # crossed with our own end of the call: nothing left to do
            await self.refuse(channel, message, "unknown_call",
                              f"no call {call_id!r} on this link", "call")
            return
        if isinstance(message, Offer):
            if not port.is_trunk or port is session.downstream:
                await self.refuse(channel, message, "protocol_error",
                                  "this server makes the offer on this leg", "type")
                return
            self.spawn(self._negotiate(session, port, message), session, f"{call_id}-answer")
        elif isinstance(message, Answer):
            self.spawn(self._negotiate(session, port, message), session, f"{call_id}-accept")
        elif isinstance(message, Hangup):
            self.end_session(session, message.reason, source=channel)
        elif isinstance(message, CallUpdate):
            self._call_update(session, channel, message)
        elif isinstance(message, Woken) and port.device_role:
            self.record(call_id, f"t_{port.device_role}_woken", message.at)
        elif isinstance(message, FirstFrame) and port.device_role:
            self.record(call_id, f"t_first_frame_{port.device_role}", message.at)
        elif isinstance(message, Stats) and port.device_role:
            direction = self._media_report(session.call, channel, message, port.device_role)
            if direction:
                self._forward_update(
                    session, CallUpdate(call=call_id, media={direction: message.media}), None)
        else:
            await self.refuse(channel, message, "unexpected_type",
                              f"{message.TYPE!r} is not expected here", "type")

    def _media_report(self, call: Call, channel: Channel, message: Stats,
                      role: Role | None = None) -> str | None:
        if role is None:
            role = "caller" if call.caller.endswith(f"/{channel.name}") else "callee"
        direction = "callee_to_caller" if role == "caller" else "caller_to_callee"
        try:
            call.handle(MediaReport(direction, message.media))
        except CallStateError as exc:
            event(log, "call.stats_refused", logging.WARNING, call=call.id, reason=exc.message)
            return None
        return direction

    def _call_update(self, session: Session, channel: Channel, update: CallUpdate) -> None:
        call = session.call
        before = call.state
        for name, at in update.events.items():
            try:
                call.handle(Milestone(name, at))
            except CallStateError as exc:
                event(log, "call.event_refused", logging.WARNING, call=call.id,
                      reason=exc.message, source=channel.name)
        for direction, stats in update.media.items():
            call.handle(MediaReport(direction, stats))
        call.transcoded.extend(w for w in update.transcoded if w not in call.transcoded)
        self._forward_update(session, update, channel)
        if before is not call.state:
            self._notify()

    async def _negotiate(self, session: Session, port: Port, description: Offer | Answer) -> None:
        """Apply the peer's offer (and answer it) or its answer to our offer."""
        try:
            if isinstance(description, Offer):
                sdp = await port.leg.create_answer(description.sdp)
            else:
                await port.leg.accept_answer(description.sdp)
        except Exception as exc:  # a bad SDP from the peer must not take the server down
            event(log, "leg.bad_sdp", logging.WARNING, call=session.call.id,
                  leg=port.leg.name, ref=description.TYPE, error=repr(exc))
            await port.channel.send(Error(code="bad_sdp", message=f"{description.TYPE} "
                                          f"refused: {exc}", field="sdp", call=session.call.id,
                                          ref=description.TYPE))
            self.end_session(session, "bad_sdp")
            return
        if isinstance(description, Offer):
            await port.channel.send(Answer(call=session.call.id, leg=description.leg, sdp=sdp))

    async def refuse(self, channel: Channel, message: Message | None, code: str, text: str,
                     field_name: str | None = None) -> None:
        """Answer a message we will not act on; log it once."""
        call = getattr(message, "call", None)
        ref = message.TYPE if message is not None else None
        event(log, "message.refused", logging.WARNING, peer=channel.name, code=code,
              reason=text, call=call, ref=ref)
        await channel.send(Error(code=code, message=text, field=field_name, call=call, ref=ref))

    # ------------------------------------------------------------------ queries

    def find_call(self, call_id: str) -> Call | None:
        session = self.sessions.get(call_id)
        return session.call if session else self.ended.get(call_id)

    def call_info(self, call: Call) -> CallInfo:
        return CallInfo(call=call.id, state=call.state.value, caller=call.caller,
                        callee=call.callee, server=self.name, timeline=dict(call.timeline),
                        media=dict(call.media), reason=call.reason, codec=call.codec,
                        transcoded=list(call.transcoded))
