"""The upper server: the relay between lower servers. It keeps the directory of which lower server
holds which device, routes call commands, and carries each call's media between two trunks."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from relay.call import Call
from relay.links import WebSocketChannel, accept_link, serve_messages
from relay.logs import event
from relay.messages import (
    CHILD_TO_PARENT,
    Announce,
    CallSetup,
    ChildInfo,
    DeviceInfo,
    Directory,
    Error,
    Hangup,
    Heartbeat,
    Message,
    Welcome,
    split_address,
)
from relay.node import SHUTTING_DOWN, Clock, Node
from relay.settings import ServerSettings

log = logging.getLogger("relay.upper")


@dataclass
class Child:
    channel: WebSocketChannel
    url: str


class UpperServer(Node):
    role = "upper"

    def __init__(self, settings: ServerSettings, clock: Clock = time.time) -> None:
        super().__init__(settings, clock)
        self.children: dict[str, Child] = {}
        self.directory: dict[str, DeviceInfo] = {}

    def all_devices(self) -> list[DeviceInfo]:
        return [self.directory[a] for a in sorted(self.directory)]

    def child_infos(self) -> list[ChildInfo]:
        counts: dict[str, int] = {}
        for info in self.directory.values():
            counts[info.server] = counts.get(info.server, 0) + 1
        return [ChildInfo(name=n, url=c.url, devices=counts.get(n, 0))
                for n, c in sorted(self.children.items())]

    def _refuse_child(self, announce: Announce) -> tuple[str, str] | None:
        refusal = self.settings.auth.check(f"server:{announce.server}", announce.token)
        if refusal is not None:
            self.refused(refusal[0])
            return refusal
        if announce.server in self.children or announce.server == self.name:
            return "duplicate_server", f"a server named {announce.server!r} is already " \
                f"connected to {self.name}"
        return None

    async def child_link(self, request: web.Request) -> web.WebSocketResponse:
        """``GET /v1/trunk``: a lower server's trunk. Its first message must be ``announce``."""
        ws, first = await accept_link(request, Announce, self.settings.heartbeat_s,
                                      self._refuse_child)
        if first is None:
            return ws
        channel = WebSocketChannel(ws, "child", first.server)
        self.children[first.server] = Child(channel, first.url)
        await channel.send(Welcome(server=self.name))
        self._replace_devices(first.server, first.devices)
        await channel.send(Directory(devices=self.all_devices(), full=True))
        event(log, "child.connected", server=first.server, url=first.url,
              devices=len(first.devices))
        try:
            await serve_messages(channel, CHILD_TO_PARENT,
                                 lambda m: self._child_message(channel, m))
        finally:
            self.children.pop(first.server, None)
            self.channel_closed(channel, "server_gone")
            self._replace_devices(first.server, [])
            event(log, "child.lost", logging.WARNING, server=first.server)
        return ws

    def _replace_devices(self, server: str, devices: list[DeviceInfo]) -> None:
        removed = [a for a, d in self.directory.items() if d.server == server]
        for address in removed:
            del self.directory[address]
        for info in devices:
            self.directory[info.address] = info
        current = {d.address for d in devices}
        self._broadcast(Directory(devices=devices,
                                  removed=[a for a in removed if a not in current]), server)

    def _broadcast(self, update: Directory, source: str | None) -> None:
        if not update.devices and not update.removed:
            return
        for name, child in self.children.items():
            if name != source:
                self.spawn(child.channel.send(update))

    async def _child_message(self, channel: WebSocketChannel, message: Message) -> None:
        if isinstance(message, Directory):
            await self._directory(channel, message)
        elif isinstance(message, CallSetup):
            if message.call in self.sessions or message.call in self.ended:
                await self.refuse(channel, message, "duplicate_call",
                                  f"call {message.call!r} already exists here", "call")
            else:
                self._route(channel, message)
        elif isinstance(message, Heartbeat):
            await channel.send(message)
        elif isinstance(message, Error):
            event(log, "child.error", logging.WARNING, server=channel.name, code=message.code,
                  reason=message.message, call=message.call)
        elif isinstance(message, Announce):
            await self.refuse(channel, message, "protocol_error", "already announced", "type")
        else:
            await self.handle_call_message(channel, message)

    async def _directory(self, channel: WebSocketChannel, update: Directory) -> None:
        for i, info in enumerate(update.devices):
            if info.server != channel.name:
                await self.refuse(channel, update, "bad_message",
                                  f"{channel.name} may not announce devices of {info.server}",
                                  f"devices[{i}].server")
                return
        for address in update.removed:
            if split_address(address)[0] != channel.name:
                await self.refuse(channel, update, "bad_message",
                                  f"{channel.name} may not remove {address}", "removed")
                return
        if update.full:
            self._replace_devices(channel.name, update.devices)
            return
        for address in update.removed:
            self.directory.pop(address, None)
        for info in update.devices:
            self.directory[info.address] = info
        self._broadcast(update, channel.name)

    def _route(self, source: WebSocketChannel, setup: CallSetup) -> None:
        server, device = split_address(setup.callee)
        if server is None:
            matches = [d for d in self.directory.values() if d.id == device]
            server = matches[0].server if len(matches) == 1 else None
        child = self.children.get(server) if server else None
        reason = None
        if child is None:
            reason = "server_unreachable" if server else "unknown_device"
        elif child.channel is source:
            reason = "misrouted"
        elif self.draining:
            reason = SHUTTING_DOWN
        elif len(self.sessions) >= self.settings.max_calls:
            reason = "server_busy"
            self.refused("server_busy")
        if reason:
            event(log, "call.refused", logging.WARNING, call=setup.call, caller=setup.caller,
                  callee=setup.callee, reason=reason)
            self.spawn(source.send(Hangup(call=setup.call, reason=reason)))
            return
        assert child is not None and server is not None
        call = Call(setup.call, setup.caller, f"{server}/{device}", self.clock(), self.timeouts,
                    codec=setup.codec, media_mode=setup.media_mode)
        self.start_session(call, (source, None), (child.channel, None))
        self.record(call.id, "t_routed", self.clock())

    async def close(self, reason: str = SHUTTING_DOWN) -> None:
        await super().close(reason)
        for child in list(self.children.values()):
            with contextlib.suppress(Exception):
                await child.channel.close(reason="server shutting down")
