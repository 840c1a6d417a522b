"""WebSocket links: the Channel a server talks to a device or another server over, and the
reader loop that validates every frame before anything acts on it."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from relay.logs import event
from relay.messages import MAX_MESSAGE_BYTES, Error, Message, MessageError, decode
from relay.node import Channel, ChannelKind

log = logging.getLogger("relay.links")

WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
M = TypeVar("M", bound=Message)


class WebSocketChannel(Channel):
    """A device, child or parent link over one WebSocket. Sends are serialised."""

    def __init__(self, ws: WebSocket, kind: ChannelKind, name: str) -> None:
        self.ws = ws
        self.kind = kind
        self.name = name
        self._lock = asyncio.Lock()

    @property
    def open(self) -> bool:
        return not self.ws.closed

    async def send(self, message: Message) -> bool:
        if self.ws.closed:
            event(log, "link.send_dropped", logging.DEBUG, peer=self.name, type=message.TYPE)
            return False
        try:
            async with self._lock:
                await self.ws.send_str(message.to_json())
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            event(log, "link.send_failed", logging.WARNING, peer=self.name, type=message.TYPE,
                  error=repr(exc))
            return False
        return True

    async def close(self, code: int = aiohttp.WSCloseCode.OK, reason: str = "") -> None:
        await self.ws.close(code=code, message=reason.encode()[:120])


async def receive(ws: WebSocket, allowed: Collection[type[Message]], peer: str,
                  timeout: float | None = None) -> Message | None:
    """The next valid message, or None when the link closed. Bad frames are answered and skipped."""
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                        aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return None
        if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            continue
        try:
            return decode(msg.data, allowed)
        except MessageError as exc:
            await refuse_frame(ws, exc, peer, msg.data)


async def refuse_frame(ws: WebSocket, exc: MessageError, peer: str, raw: Any = None) -> None:
    ref = None
    if isinstance(raw, str | bytes) and len(raw) < 4096:
        try:
            data = json.loads(raw)
            if isinstance(data, dict) and isinstance(data.get("type"), str):
                ref = data["type"][:64]
        except ValueError:
            pass
    event(log, "message.invalid", logging.WARNING, peer=peer, code=exc.code, field=exc.field,
          reason=exc.message, ref=ref)
    if not ws.closed:
        await ws.send_str(Error.from_exception(exc, ref=ref).to_json())


async def accept_link(request: web.Request, first: type[M], heartbeat_s: float,
                      refuse: Callable[[M], tuple[str, str] | None],
                      ) -> tuple[web.WebSocketResponse, M | None]:
    """Open a WebSocket whose first message must be ``first``.

    ``refuse`` returns ``(code, reason)`` to turn the peer away (e.g. a name already taken), or
    None to accept; a refused peer gets an error saying why, and the link is closed.
    Returns the socket and the first message (None if the peer was turned away).
    """
    ws = web.WebSocketResponse(heartbeat=heartbeat_s, max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    peer = request.remote or "peer"
    message = await receive(ws, (first,), peer, timeout=10)
    if not isinstance(message, first):
        await ws.close()
        return ws, None
    refusal = refuse(message)
    if refusal is not None:
        code, text = refusal
        event(log, "link.refused", logging.WARNING, peer=peer, code=code, reason=text)
        await ws.send_str(Error(code=code, message=text, field=_name_field(message),
                                ref=first.TYPE).to_json())
        await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=code.encode())
        return ws, None
    return ws, message


def _name_field(message: Message) -> str:
    return "device" if hasattr(message, "device") else "server"


class RateLimit:
    """A token bucket: ``rate`` messages a second, bursts up to ``burst``. Pure: time is
    passed in."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._at: float | None = None

    def allow(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


async def serve_messages(channel: WebSocketChannel, allowed: Collection[type[Message]],
                         handle: Callable[[Message], Awaitable[None]],
                         rate: float | None = None,
                         on_refused: Callable[[str], None] | None = None) -> None:
    """Read until the link closes, handing each valid message to ``handle`` in order.

    With ``rate``, a peer sending faster than ``rate`` messages a second (bursts of two
    seconds' worth allowed) has the excess dropped: it gets one ``rate_limited`` error a second
    saying so, and nothing else changes."""
    limit = RateLimit(rate, 2 * rate) if rate else None
    loop = asyncio.get_running_loop()
    told_at = -1.0
    while True:
        message = await receive(channel.ws, allowed, channel.name)
        if message is None:
            return
        if limit is not None and not limit.allow(loop.time()):
            if on_refused is not None:
                on_refused("rate_limited")
            if loop.time() - told_at >= 1.0:
                told_at = loop.time()
                event(log, "link.rate_limited", logging.WARNING, peer=channel.name,
                      type=message.TYPE, rate=rate)
                await channel.send(Error(code="rate_limited", message=f"more than {rate:g} "
                                         "messages a second: this one was dropped",
                                         ref=message.TYPE))
            continue
        await handle(message)
