"""WebSocket links: the channel a server talks to a device or another server over, and the reader
loop that validates every frame before anything acts on it.

A channel sends in order from one queue, drained by a task that lives only while there is
something to send; a peer too slow to take what it is sent (the queue past MAX_QUEUE) is cut off
rather than allowed to grow the server's memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Collection
from typing import TypeVar

import aiohttp
from aiohttp import web

from wire.logs import event
from wire.messages import WS_MAX_MSG_SIZE, Error, Message, MessageError, decode
from wire.reasons import Refused
from wire.tasks import Tasks

log = logging.getLogger("wire.links")

WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
M = TypeVar("M", bound=Message)
#: messages waiting to be sent on one link, at most
MAX_QUEUE = 10_000
#: a link must send its first message (register, announce) within this many seconds
FIRST_MESSAGE_S = 10.0


class WebSocketChannel:
    """A device, child or parent link over one WebSocket. Sends are queued and kept in order."""

    def __init__(self, ws: WebSocket, peer: str,
                 undeliverable: Callable[[Message], None] | None = None) -> None:
        self.ws = ws
        self.peer = peer
        self._undeliverable = undeliverable
        self._queue: deque[Message] = deque()
        self._writer: asyncio.Task[None] | None = None
        #: the link's own tasks: its writer, and a close for being too slow
        self._tasks = Tasks(f"link {peer}")

    @property
    def open(self) -> bool:
        return not self.ws.closed

    def post(self, message: Message) -> None:
        """Queue a message; it goes out after everything posted before it."""
        if self.ws.closed:
            self._lost(message, "closed")
            return
        if len(self._queue) >= MAX_QUEUE:
            event(log, "link.too_slow", logging.WARNING, peer=self.peer, queued=len(self._queue))
            self._lost(message, "queue full")
            self._tasks.spawn(self.close(aiohttp.WSCloseCode.TRY_AGAIN_LATER, "too slow"),
                              f"close-{self.peer}")
            return
        self._queue.append(message)
        if self._writer is None or self._writer.done():
            self._writer = self._tasks.spawn(self._drain(), f"send-{self.peer}")

    async def _drain(self) -> None:
        while self._queue:
            message = self._queue.popleft()
            try:
                await self.ws.send_str(message.to_json())
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                event(log, "link.send_failed", logging.WARNING, peer=self.peer,
                      type=message.TYPE, error=repr(exc))
                self._lost(message, "send failed")
                while self._queue:
                    self._lost(self._queue.popleft(), "send failed")

    def _lost(self, message: Message, why: str) -> None:
        event(log, "link.send_dropped", logging.DEBUG, peer=self.peer, type=message.TYPE,
              why=why)
        if self._undeliverable is not None:
            self._undeliverable(message)

    async def send(self, message: Message) -> bool:
        """Send now, after what is queued; False (logged, not raised) if the link is gone."""
        self.post(message)
        await self.flush()
        return not self.ws.closed

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait (a bounded time) until everything queued has been written. Cancelling the wait
        cancels only the wait: the writer goes on (shielded)."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the writer finishes, and the cancelled task would then run on.
        if self._writer is not None and not self._writer.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._writer)

    async def close(self, code: int = aiohttp.WSCloseCode.OK, reason: str = "") -> None:
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        self._queue.clear()
        await self.ws.close(code=code, message=reason.encode()[:120])


class TooManyInvalid(Exception):
    """A link kept sending messages that failed validation: it is closed."""


#: Invalid messages a link may send: bursts of INVALID_BURST, then INVALID_RATE a second. Past
#: that it is closed with ``too_many_invalid``: a peer that keeps getting its messages wrong is
#: broken or hostile, and each error answered costs the server.
INVALID_BURST = 20
INVALID_RATE = 1.0


async def receive(ws: WebSocket, allowed: Collection[type[Message]], peer: str,
                  on_invalid: Callable[[], bool] | None = None) -> Message | None:
    """The next valid message, or None when the link closed. Bad frames are answered and skipped
    (``on_invalid`` returns False to skip answering: the peer sends too many)."""
    while True:
        msg = await ws.receive()
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                        aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return None
        if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            continue
        try:
            return decode(msg.data, allowed)
        except MessageError as exc:
            if on_invalid is None or on_invalid():
                await refuse_frame(ws, exc, peer)


async def refuse_frame(ws: WebSocket, exc: MessageError, peer: str) -> None:
    event(log, "message.invalid", logging.WARNING, peer=peer, code=exc.code, field=exc.field,
          reason=exc.message, ref=exc.ref)
    if not ws.closed:
        await ws.send_str(Error.from_exception(exc).to_json())


async def first_message(request: web.Request, first: type[M], heartbeat_s: float,
                        within_s: float = FIRST_MESSAGE_S,
                        ) -> tuple[web.WebSocketResponse, M | None]:
    """Open a WebSocket whose first message must be ``first``, sent within ``within_s``
    (pings and invalid messages do not extend it; more than INVALID_BURST invalid ones close
    the link). Returns the socket and the message (None: closed, too late, or too wrong)."""
    ws = web.WebSocketResponse(heartbeat=heartbeat_s, max_msg_size=WS_MAX_MSG_SIZE)
    await ws.prepare(request)
    peer = request.remote or "peer"
    message = None
    wrong = 0

    def on_invalid() -> bool:
        nonlocal wrong
        wrong += 1
        if wrong > INVALID_BURST:
            raise TooManyInvalid
        return True

    why = b"no " + first.TYPE.encode()
    try:
        async with asyncio.timeout(within_s):
            message = await receive(ws, (first,), peer, on_invalid)
    except TimeoutError:
        event(log, "link.silent", logging.WARNING, peer=peer, expected=first.TYPE,
              waited_s=within_s)
    except TooManyInvalid:
        event(log, "link.closed", logging.WARNING, peer=peer, code="too_many_invalid",
              reason=f"{wrong} invalid messages before {first.TYPE}")
        why = b"too_many_invalid"
    if not isinstance(message, first):
        await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=why)
        return ws, None
    return ws, message


async def refuse_link(ws: web.WebSocketResponse, refusal: Refused, ref: str, peer: str) -> None:
    """Turn a peer away: an error saying why, then close."""
    event(log, "link.refused", logging.WARNING, peer=peer, code=refusal.code,
          reason=refusal.message)
    await ws.send_str(Error(code=refusal.code, message=refusal.message, field=refusal.field,
                            ref=ref).to_json())
    await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=refusal.code.encode())


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
                         handle: Callable[[Message], None], rate: float | None = None,
                         on_refused: Callable[[str], None] | None = None) -> None:
    """Read until the link closes, handing each valid message to ``handle`` in order.

    With ``rate``, a peer sending faster than ``rate`` messages a second (bursts of two
    seconds' worth allowed), valid or not, has the excess dropped: it gets one
    ``rate_limited`` error a second saying so, and nothing else changes. Invalid messages are
    answered with an error each, and a link that sends more than INVALID_BURST of them at once
    (or more than INVALID_RATE a second for long) is closed with ``too_many_invalid``."""
    limit = RateLimit(rate, 2 * rate) if rate else None
    invalid = RateLimit(INVALID_RATE, INVALID_BURST)
    loop = asyncio.get_running_loop()
    told_at = -1.0

    def refused(code: str) -> None:
        if on_refused is not None:
            on_refused(code)

    def over(what: str) -> bool:
        nonlocal told_at
        if limit is None or limit.allow(loop.time()):
            return False
        refused("rate_limited")
        if loop.time() - told_at >= 1.0:
            told_at = loop.time()
            event(log, "link.rate_limited", logging.WARNING, peer=channel.peer, type=what,
                  rate=rate)
            channel.post(Error(code="rate_limited", message=f"more than {rate:g} messages a "
                               "second: this one was dropped", ref=what))  # type: ignore[arg-type]
        return True

    def on_invalid() -> bool:
        if not invalid.allow(loop.time()):
            raise TooManyInvalid
        return not over("invalid")

    while True:
        try:
            message = await receive(channel.ws, allowed, channel.peer, on_invalid=on_invalid)
        except TooManyInvalid:
            refused("too_many_invalid")
            why = (f"more than {INVALID_BURST} invalid messages (or {INVALID_RATE:g} a second "
                   "for long): closed")
            event(log, "link.closed", logging.WARNING, peer=channel.peer,
                  code="too_many_invalid", reason=why)
            channel.post(Error(code="too_many_invalid", message=why))  # type: ignore[arg-type]
            await channel.flush()
            await channel.close(aiohttp.WSCloseCode.POLICY_VIOLATION, "too_many_invalid")
            return
        if message is None:
            return
        if over(message.TYPE):
            continue
        handle(message)
