"""The HTTP server's own edge, below the app: what aiohttp does before a request reaches a route.

Two things aiohttp leaves open are closed here, in a RequestHandler of our own:

- **Errors from the HTTP parser are JSON like every other error.** A request line or header over
  8190 bytes, a malformed header or a bad method never reaches the app's middleware: aiohttp
  answers it itself in text/plain and logs a traceback. Here it gets the API's error body
  (``bad_request``, status 400, the parser's own words as the message), logged once in one line.
- **A request head must arrive within a bound** (``head_timeout``, 10 s), like nginx's
  ``client_header_timeout``: from the connection's start, or from the first byte of a later
  request, to the end of its head. aiohttp's only bound is its keep-alive timeout (75 s), so a
  client sending a byte now and then held a connection for that long. A late head closes the
  connection (nothing was asked yet, so nothing is answered) and counts as ``request_timeout``.
  Bodies are bounded where they are read (relay/api.py ``read_json``, ``http_body_timeout_s``).

The hook is aiohttp's own: ``Server.__call__`` builds the protocol of every connection; the
runner here makes a Server that builds ours. Tested against a real server in
tests/test_e2e_http.py, so an aiohttp release that moves these internals fails a test.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from wire.http import error_response
from wire.logs import event
from wire.reasons import Code

log = logging.getLogger("relay.http")

#: seconds from a request's first byte (or the connection's start) to the end of its head
HEAD_TIMEOUT_S = 10.0
#: aiohttp's default bounds on a request line and on one header line, kept explicit here
MAX_LINE = 8190


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, with JSON parser errors and a deadline on heads."""

    def __init__(self, manager: Server, *, head_timeout: float,
                 refused: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._refused = refused
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._payload_parser is not None or self._upgraded:
            self._disarm()  # a WebSocket now: its own protocol bounds it
            super().data_received(data)
            return
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:
            self._disarm()  # a whole head arrived
        elif data:
            self._arm()

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self._loop.call_later(self._head_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_late(self) -> None:
        self._head_deadline = None
        if self.transport is None:
            return
        if self._current_request is not None:
            self._arm()  # a request is being answered; a pipelined head may wait for it
            return
        peer = self.transport.get_extra_info("peername")
        event(log, "http.refused", logging.INFO, code=Code.REQUEST_TIMEOUT,
              remote=str(peer[0]) if peer else None,
              message=f"no whole request head within {self._head_timeout:g} s: closed")
        self._refused(Code.REQUEST_TIMEOUT)
        self.force_close()

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)  # a bug: keep the trace
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent: cannot send the error")
        text = message or (str(exc) if exc is not None else "malformed HTTP request")
        text = f"the HTTP request is malformed: {text}"
        event(log, "http.refused", logging.INFO, code=Code.BAD_REQUEST, status=status,
              remote=request.remote, message=text[:300])
        self._refused(Code.BAD_REQUEST)
        response = error_response(status, Code.BAD_REQUEST, text[:1000])
        response.force_close()
        return response


class GuardedServer(Server):
    """aiohttp's Server, building a GuardedRequestHandler for each connection."""

    def __init__(self, *args: Any, head_timeout: float, refused: Callable[[str], None],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout = head_timeout
        self._refused_cb = refused

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, head_timeout=self._head_timeout,
                                     refused=self._refused_cb, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server is a GuardedServer (``refused`` counts each code in metrics)."""

    def __init__(self, app: web.Application, *, refused: Callable[[str], None],
                 head_timeout: float = HEAD_TIMEOUT_S, **kwargs: Any) -> None:
        super().__init__(app, max_line_size=MAX_LINE, max_field_size=MAX_LINE, **kwargs)
        self._head_timeout = head_timeout
        self._refused_cb = refused

    async def _make_server(self) -> Server:
        plain = await super()._make_server()  # runs the app's startup and freezes it
        return GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                             handler_cancellation=plain.handler_cancellation,
                             loop=asyncio.get_running_loop(), head_timeout=self._head_timeout,
                             refused=self._refused_cb, **plain._kwargs)
