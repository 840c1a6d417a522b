"""One server's asyncio layer: it feeds the signalling core and carries out what the core asks.

The core (relay/switch.py and relay/directory.py) decides everything and does no I/O. A
:class:`Node` gives it each message that arrives on a link, each link that opens or closes, a
media event, always with ``now``, through one entry point (:meth:`Node.feed`); then it drains
the core's outbox: messages go to the links' channels (wire/links.py), media effects to the media
layer (relay/media.py), and requests waiting on a call (``GET /v1/calls/{id}?wait=``) are woken.
The core owns time (as aioquic's ``get_timer``/``handle_timer``): after every input the node asks
it when it next needs waking, and sleeps until then; nothing polls. It owns every channel and
task it starts, and closes them once.

The roles' own routes are elsewhere: a lower server's device links (relay/lower.py), an upper
server's child links (relay/upper.py), and the link to a parent, which both roles may have
(relay/parent.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from msgspec.structs import replace

from relay.call import Call, CallState
from relay.directory import TreeDirectory
from relay.effects import (
    CallChanged,
    CloseLink,
    Effect,
    Link,
    Negotiate,
    Outbox,
    Send,
    StartMedia,
    StopMedia,
)
from relay.forward import ForwardingStats
from relay.media import MediaPlane
from relay.settings import ServerSettings
from relay.switch import Switch
from wire.links import WebSocketChannel, first_message, refuse_link, serve_messages
from wire.messages import CallInfo, FirstFrame, HopFigures, Message, ServerEntry
from wire.reasons import Code, Refused
from wire.tasks import Tasks

log = logging.getLogger("relay.node")

Clock = Callable[[], float]
M = TypeVar("M", bound=Message)


class Node:
    """One server, either role."""

    def __init__(self, settings: ServerSettings, clock: Clock = time.time) -> None:
        self.settings = settings
        self.name = settings.name
        self.role = settings.role
        self.clock = clock
        self.url = settings.public_url or f"http://{settings.host}:{settings.port}"
        me = ServerEntry(name=settings.name, role=settings.role, url=self.url)
        self.directory = TreeDirectory(me, Outbox(),
                                       max_devices=settings.limits.max_directory_devices,
                                       has_parent=settings.parent is not None)
        self.core = Switch(self.directory, settings.limits, settings.timeouts, settings.auth,
                           settings.heartbeat_s, keep_ended_s=settings.keep_ended_s)
        self.media = MediaPlane(settings.name, settings.media,
                                settings.media_mode == "transcode", self.post, _MediaEvents(self),
                                measure=settings.hop_figures,
                                congestion=settings.congestion_control)
        self.channels: dict[Link, WebSocketChannel] = {}
        #: set once the server listens and knows its URL (the parent link waits for it)
        self.listening = asyncio.Event()
        self._changed = asyncio.Event()
        self._executing = False
        #: the one timer: when the core asked to be woken (its clock), and the handle
        self._timer: tuple[float, asyncio.TimerHandle] | None = None
        self._closed = False
        self._tasks = Tasks(f"server {settings.name}")

    @property
    def forwarding(self) -> ForwardingStats:
        return self.media.stats

    def set_url(self, url: str) -> None:
        self.url = url
        self.directory.me = replace(self.directory.me, url=url)

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        self._arm()

    async def close(self, reason: Code = Code.SERVER_SHUTTING_DOWN) -> None:
        """End every call (telling every hop why), then close every leg, link and task."""
        self.feed(self.core.end_all, reason)
        await asyncio.gather(*(c.flush() for c in self.channels.values()),
                             return_exceptions=True)
        await self.media.close()
        for channel in list(self.channels.values()):
            with contextlib.suppress(Exception):
                await channel.close(aiohttp.WSCloseCode.GOING_AWAY, "server shutting down")
        self._closed = True
        if self._timer is not None:
            self._timer[1].cancel()
            self._timer = None
        await self._tasks.close()

    def spawn(self, coro: Any, name: str | None = None) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro, name)

    def _arm(self) -> None:
        """Sleep until the core's next deadline (one timer, moved when the deadline does)."""
        if self._closed:
            return
        now = self.clock()
        at = self.core.timer(now)
        if self._timer is not None:
            if self._timer[0] == at:
                return
            self._timer[1].cancel()
            self._timer = None
        if at is not None:
            handle = asyncio.get_running_loop().call_later(max(0.0, at - now), self._wake)
            self._timer = (at, handle)

    def _wake(self) -> None:
        self._timer = None
        self.feed(self.core.handle_timer)

    # ------------------------------------------------------------------ the core

    def feed(self, handler: Callable[..., Any], *args: Any, carry_out: bool = True) -> Any:
        """Call a core entry point with ``now`` last, then carry out what it asked for (not
        with ``carry_out`` False: a link's first message, whose answer waits until the link
        is attached)."""
        result = handler(*args, self.clock())
        if carry_out:
            self.execute()
        return result

    def receive(self, link: Link, message: Message) -> None:
        self.feed(self.core.receive, link, message)

    def execute(self) -> None:
        """Carry out the core's effects, and those they cause, in order; then sleep until the
        core's next deadline (directory changes wait for theirs: see Switch.timer)."""
        if self._executing:
            return  # the loop below picks up what was added
        self._executing = True
        changed = False
        outbox = self.core.outbox
        try:
            while effects := outbox.take(directory=False):
                for effect in effects:
                    changed = self._carry_out(effect) or changed
        finally:
            self._executing = False
        if changed:
            self._changed.set()
            self._changed = asyncio.Event()
        self._arm()

    def _carry_out(self, effect: Effect) -> bool:
        if isinstance(effect, Send):
            self.post(effect.link, effect.message)
        elif isinstance(effect, StartMedia):
            self.media.start(effect)
        elif isinstance(effect, Negotiate):
            self.media.negotiate(effect)
        elif isinstance(effect, StopMedia):
            self.media.stop(effect.call)
        elif isinstance(effect, CloseLink):
            channel = self.channels.get(effect.link)
            if channel is not None:
                self.spawn(channel.close(aiohttp.WSCloseCode.POLICY_VIOLATION, effect.code))
        else:
            assert isinstance(effect, CallChanged)
            return True
        return False

    def post(self, link: Link, message: Message) -> None:
        """Send over a link by name; a message for a link that is gone goes back to the core."""
        channel = self.channels.get(link)
        if channel is None:
            self.undeliverable(link, message)
        else:
            channel.post(message)

    def undeliverable(self, link: Link, message: Message) -> None:
        self.feed(self.core.undeliverable, link, message)

    def attach(self, link: Link, channel: WebSocketChannel) -> None:
        """A link is up (the core has accepted it): its queued messages go out."""
        self.channels[link] = channel
        self.execute()

    def detach(self, link: Link, channel: WebSocketChannel) -> None:
        """A link closed: the core ends what used it."""
        if self.channels.get(link) is channel:
            del self.channels[link]
            self.feed(self.core.link_lost, link)

    def channel(self, link: Link, ws: Any, peer: str) -> WebSocketChannel:
        return WebSocketChannel(ws, peer, lambda message: self.undeliverable(link, message))

    async def serve_link(self, request: web.Request, first: type[M],
                         admit: Callable[[M, float], Refused | None],
                         link_of: Callable[[M], Link], allowed: Collection[type[Message]],
                         rate: float | None = None) -> web.WebSocketResponse:
        """A link a peer opens (a device, a child server): its first message goes to the core's
        ``admit`` (which refuses it, or queues the welcome); then every message to the core,
        until the link closes."""
        ws, message = await first_message(request, first, self.settings.heartbeat_s,
                                          self.settings.first_message_s)
        if message is None:
            return ws
        refusal = self.feed(admit, message, carry_out=False)  # carried out once attached
        if refusal is not None:
            await refuse_link(ws, refusal, first.TYPE, request.remote or "peer")
            return ws
        link = link_of(message)
        channel = self.channel(link, ws, str(link))
        self.attach(link, channel)
        try:
            await serve_messages(channel, allowed, lambda m: self.receive(link, m), rate=rate,
                                 on_refused=self.core.counters.refused)
        finally:
            self.detach(link, channel)
        return ws

    # ------------------------------------------------------------------ queries

    def find_call(self, call_id: str) -> Call | None:
        return self.core.find_call(call_id)

    def call_info(self, call: Call) -> CallInfo:
        return self.core.call_info(call)

    async def placed(self, ref: int, timeout: float) -> Call | Refused:
        """What came of a call a device was asked to dial (Switch.placing): the call it
        dialed, or the refusal (``no_dial`` by the core's own deadline)."""
        core = self.core
        try:
            async with asyncio.timeout(timeout):
                while ref not in core.placed:
                    await self._changed.wait()
            return core.placed.pop(ref)
        except TimeoutError:
            return Refused(Code.NO_DIAL, f"no outcome of place_call {ref} within {timeout:g} s")
        finally:  # the request is gone (answered, timed out, or its client left)
            core.placing.pop(ref, None)
            core.placed.pop(ref, None)

    async def wait_for(self, call_id: str, states: set[CallState], timeout: float) -> None:
        """Wait until the call is in one of ``states`` (or ended), at most ``timeout`` seconds."""
        def reached() -> bool:
            call = self.find_call(call_id)
            return call is None or call.state in states or call.state is CallState.ENDED \
                or (call.over and CallState.ENDED not in states)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not reached():
                    await self._changed.wait()


class _MediaEvents:
    """The media layer's events, fed to the core with ``now``."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def media_up(self, call: str) -> None:
        self.node.feed(self.node.core.media_up, call)

    def media_failed(self, call: str, code: Code, detail: str | None = None) -> None:
        self.node.feed(self.node.core.media_failed, call, code, detail)

    def transcoded(self, call: str, where: str) -> None:
        self.node.feed(self.node.core.transcoded, call, where)

    def media_closed(self, call: str) -> None:
        self.node.feed(self.node.core.media_closed, call)

    def first_sent(self, call: str, device: str) -> None:
        """A device that cannot say it decoded a frame (a WHEP player) was sent the first
        keyframe: that stands for its first frame (docs/protocol.md)."""
        node = self.node
        node.receive(Link("device", device), FirstFrame(call=call, at=node.clock()))

    def hop_figures(self, call: str, figures: HopFigures) -> None:
        self.node.feed(self.node.core.hop_figures, call, figures)
