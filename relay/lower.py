"""The lower server: the devices' server. Registry of its devices, call commands from the probe,
the terminating end of calls from elsewhere, and the trunk up to its parent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

import aiohttp
from aiohttp import web

from relay.call import Call
from relay.links import WebSocketChannel, accept_link, receive, serve_messages
from relay.logs import event
from relay.messages import (
    DEVICE_TO_SERVER,
    MAX_MESSAGE_BYTES,
    PARENT_TO_CHILD,
    VIDEO_CODECS,
    Announce,
    CallSetup,
    CreateCall,
    DeviceInfo,
    Directory,
    Error,
    Hangup,
    Heartbeat,
    Message,
    Register,
    Registered,
    Welcome,
    split_address,
)
from relay.node import SHUTTING_DOWN, Channel, Clock, Node, Session
from relay.settings import ServerSettings, parent_url

log = logging.getLogger("relay.lower")


class ApiError(Exception):
    """A refused probe request: HTTP status, a code, and what was wrong."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s  #: for 503 "busy": when to try again


class LowerServer(Node):
    role = "lower"

    def __init__(self, settings: ServerSettings, clock: Clock = time.time) -> None:
        super().__init__(settings, clock)
        self.devices: dict[str, WebSocketChannel] = {}
        self.busy: set[str] = set()
        #: Devices of the rest of the tree, by address, as the parent last told us.
        self.tree: dict[str, DeviceInfo] = {}
        self.parent: WebSocketChannel | None = None

    # ------------------------------------------------------------------ devices

    def device_info(self, device: str) -> DeviceInfo:
        channel = self.devices.get(device)
        codecs = list(channel.codecs) if channel is not None else list(VIDEO_CODECS)
        return DeviceInfo(id=device, server=self.name, codecs=codecs,
                          state="busy" if device in self.busy else "idle")

    def own_devices(self) -> list[DeviceInfo]:
        return [self.device_info(d) for d in sorted(self.devices)]

    async def device_link(self, request: web.Request) -> web.WebSocketResponse:
        """``GET /v1/device``: a device's WebSocket. Its first message must be ``register``."""
        ws, first = await accept_link(
            request, Register, self.settings.heartbeat_s,
            self._refuse_device)
        if first is None:
            return ws
        peer = request.remote
        channel = WebSocketChannel(ws, "device", first.device)
        channel.codecs = tuple(first.codecs)
        self.devices[first.device] = channel
        await channel.send(Registered(server=self.name, device=first.device,
                                      address=f"{self.name}/{first.device}",
                                      heartbeat_s=self.settings.heartbeat_s))
        event(log, "device.registered", device=first.device, peer=peer)
        self.publish([first.device])
        try:
            await serve_messages(channel, DEVICE_TO_SERVER,
                                 lambda m: self._device_message(channel, m),
                                 rate=self.settings.max_message_rate, on_refused=self.refused)
        finally:
            if self.devices.get(first.device) is channel:
                del self.devices[first.device]
            self.channel_closed(channel, "device_gone")
            self.busy.discard(first.device)
            event(log, "device.gone", device=first.device)
            self.publish([], removed=[first.device])
        return ws

    async def _device_message(self, channel: WebSocketChannel, message: Message) -> None:
        if isinstance(message, Heartbeat):
            await channel.send(message)
        elif isinstance(message, Register):
            await self.refuse(channel, message, "already_registered",
                              f"this link is already registered as {channel.name!r}", "device")
        elif isinstance(message, Error):
            event(log, "device.error", logging.WARNING, device=channel.name, code=message.code,
                  reason=message.message, call=message.call)
        else:
            await self.handle_call_message(channel, message)

    def publish(self, changed: Iterable[str], removed: Iterable[str] = ()) -> None:
        """Tell the parent about devices that came, went or changed state."""
        if self.parent is None:
            return
        update = Directory(devices=[self.device_info(d) for d in changed if d in self.devices],
                           removed=[f"{self.name}/{d}" for d in removed])
        if update.devices or update.removed:
            self.spawn(self.parent.send(update))

    # ------------------------------------------------------------------ calls

    def resolve(self, address: str, what: str) -> DeviceInfo:
        """Find a device of the tree by SERVER/DEVICE, or by a bare id naming exactly one."""
        server, device = split_address(address)
        if server is None:
            matches = ([self.device_info(device)] if device in self.devices else [])
            matches += [d for d in self.tree.values() if d.id == device]
            if not matches:
                raise ApiError(404, "unknown_device", f"no device {device!r} in the tree", what)
            if len(matches) > 1:
                where = ", ".join(sorted(d.address for d in matches))
                raise ApiError(409, "ambiguous_device",
                               f"{device!r} names {len(matches)} devices ({where}): "
                               "use SERVER/DEVICE", what)
            return matches[0]
        if server == self.name:
            if device not in self.devices:
                raise ApiError(404, "unknown_device", f"no device {device!r} on {self.name}",
                               what)
            return self.device_info(device)
        if self.parent is None:
            raise ApiError(503, "server_unreachable",
                           f"{server} cannot be reached: {self.name} has no link to an upper "
                           "server", what)
        info = self.tree.get(address)
        if info is None:
            if not any(d.server == server for d in self.tree.values()):
                raise ApiError(404, "unknown_server", f"no server {server!r} in the tree", what)
            raise ApiError(404, "unknown_device", f"no device {device!r} on {server}", what)
        return info

    def _refuse_device(self, register: Register) -> tuple[str, str] | None:
        if self.draining:
            return SHUTTING_DOWN, f"{self.name} is shutting down"
        refusal = self.settings.auth.check(f"device:{register.device}", register.token)
        if refusal is not None:
            self.refused(refusal[0])
            return refusal
        if register.device in self.devices:
            return "duplicate_device", f"device {register.device!r} is already registered on " \
                f"{self.name}"
        if len(self.devices) >= self.settings.max_devices:
            self.refused("server_full")
            return "server_full", f"{self.name} has its maximum of " \
                f"{self.settings.max_devices} devices"
        return None

    def create_call(self, request: CreateCall, received_at: float) -> Call:
        """Check a call command and start the call; raises ApiError when it cannot be made."""
        if self.draining:
            self.refused(SHUTTING_DOWN)
            raise ApiError(503, SHUTTING_DOWN, f"{self.name} is shutting down: no new calls",
                           retry_after_s=5)
        if len(self.sessions) >= self.settings.max_calls:
            self.refused("server_busy")
            raise ApiError(503, "server_busy", f"{self.name} has its maximum of "
                           f"{self.settings.max_calls} calls in progress", retry_after_s=1)
        caller = self.resolve(request.caller, "caller")
        if caller.server != self.name:
            raise ApiError(421, "caller_not_here",
                           f"caller {caller.address} is on {caller.server}, not {self.name}: "
                           "send the command to the caller's server", "caller")
        callee = self.resolve(request.callee, "callee")
        if callee.address == caller.address:
            raise ApiError(400, "same_device", "caller and callee are the same device", "callee")
        for info, what in ((caller, "caller"), (callee, "callee")):
            if info.state == "busy":
                raise ApiError(409, "busy_device", f"{what} {info.address} is busy (in a call)",
                               what)
        # The trunks carry the caller's first choice that the callee takes too. With none in
        # common, the caller's choice, and the callee's server transcodes for the callee alone.
        codec = next((c for c in caller.codecs if c in callee.codecs), caller.codecs[0])
        call = Call(self.new_call_id(), caller.address, callee.address, received_at,
                    self.timeouts, codec=codec, media_mode=request.media_mode)
        call.timeline["t_received"] = received_at
        caller_link = self.devices[caller.id]
        if callee.server == self.name:
            downstream: tuple[Channel, str | None] = (self.devices[callee.id], "callee")
            self.busy.add(callee.id)
        else:
            assert self.parent is not None
            downstream = (self.parent, None)
        self.busy.add(caller.id)
        event(log, "call.created", call=call.id, caller=call.caller, callee=call.callee)
        self.start_session(call, (caller_link, "caller"), downstream)  # type: ignore[arg-type]
        self.publish([d for d in (caller.id, callee.id) if d in self.busy])
        return call

    def _call_setup(self, setup: CallSetup) -> None:
        """A call from elsewhere for one of our devices (we are its terminating server)."""
        assert self.parent is not None
        server, device = split_address(setup.callee)
        reason = None
        if server not in (None, self.name) or device not in self.devices:
            reason = "unknown_device"
        elif device in self.busy:
            reason = "callee_busy"
        elif self.draining:
            reason = SHUTTING_DOWN
        elif len(self.sessions) >= self.settings.max_calls:
            reason = "server_busy"
            self.refused("server_busy")
        if reason:
            event(log, "call.refused", logging.WARNING, call=setup.call, caller=setup.caller,
                  callee=setup.callee, reason=reason)
            self.spawn(self.parent.send(Hangup(call=setup.call, reason=reason)))
            return
        call = Call(setup.call, setup.caller, f"{self.name}/{device}", self.clock(),
                    self.timeouts, codec=setup.codec, media_mode=setup.media_mode)
        self.busy.add(device)
        event(log, "call.incoming", call=call.id, caller=call.caller, callee=call.callee)
        self.start_session(call, (self.parent, None), (self.devices[device], "callee"))
        self.publish([device])

    def session_ended(self, session: Session) -> None:
        freed = []
        for port in session.ports:
            if port.device_role is not None and port.channel.name in self.busy:
                self.busy.discard(port.channel.name)
                freed.append(port.channel.name)
        self.publish(freed)

    # ------------------------------------------------------------------ parent

    async def _parent_message(self, channel: WebSocketChannel, message: Message) -> None:
        if isinstance(message, Directory):
            if message.full:
                self.tree.clear()
            for address in message.removed:
                self.tree.pop(address, None)
            for info in message.devices:
                if info.server != self.name:
                    self.tree[info.address] = info
        elif isinstance(message, CallSetup):
            if message.call in self.sessions or message.call in self.ended:
                await self.refuse(channel, message, "duplicate_call",
                                  f"call {message.call!r} already exists here", "call")
            else:
                self._call_setup(message)
        elif isinstance(message, Heartbeat):
            await channel.send(message)
        elif isinstance(message, Error):
            event(log, "parent.error", logging.WARNING, code=message.code,
                  reason=message.message, call=message.call)
        elif isinstance(message, Welcome):
            await self.refuse(channel, message, "protocol_error", "welcome already received")
        else:
            await self.handle_call_message(channel, message)

    async def parent_link(self, session: aiohttp.ClientSession) -> None:
        """Keep the trunk to the parent up: connect, announce, serve; reconnect with backoff."""
        assert self.settings.parent is not None
        url = parent_url(self.settings.parent, "/v1/trunk")
        await self.listening.wait()  # the announce carries our URL
        backoff = 0.2
        while True:
            try:
                async with session.ws_connect(url, heartbeat=self.settings.heartbeat_s,
                                              max_msg_size=MAX_MESSAGE_BYTES) as ws:
                    channel = WebSocketChannel(ws, "parent", "parent")
                    auth = self.settings.auth
                    await channel.send(Announce(
                        server=self.name, url=self.url, devices=self.own_devices(),
                        token=auth.token(f"server:{self.name}") if auth.on else None))
                    welcome = await receive(ws, PARENT_TO_CHILD, "parent", timeout=10)
                    if not isinstance(welcome, Welcome):
                        event(log, "parent.refused", logging.ERROR, url=url,
                              reason=getattr(welcome, "message", "no welcome"))
                        raise ConnectionError("parent did not welcome us")
                    channel.name = welcome.server
                    self.parent = channel
                    backoff = 0.2
                    event(log, "parent.connected", parent=welcome.server, url=url)
                    # Devices that registered while the announce was on its way were not in it.
                    self.publish(list(self.devices))
                    try:
                        await serve_messages(
                            channel, PARENT_TO_CHILD,
                            lambda m, link=channel: self._parent_message(link, m))
                    finally:
                        self.parent = None
                        self.tree.clear()
                        self.channel_closed(channel, "trunk_lost")
                        event(log, "parent.lost", logging.WARNING, parent=channel.name)
            except (aiohttp.ClientError, ConnectionError, OSError, TimeoutError) as exc:
                event(log, "parent.unreachable", logging.WARNING, url=url, error=repr(exc),
                      retry_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def close(self, reason: str = SHUTTING_DOWN) -> None:
        await super().close(reason)
        for channel in list(self.devices.values()):
            with contextlib.suppress(Exception):
                await channel.close(reason="server shutting down")
