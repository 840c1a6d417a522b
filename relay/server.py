"""Wiring of one relay server: the app factory, its resources' lifetimes, and the process runner."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from relay.api import NODE, errors, setup_routes
from relay.httpd import GuardedRunner
from relay.metrics import setup_metrics
from relay.node import Node
from relay.parent import parent_link
from relay.settings import ServerSettings
from wire.logs import event
from wire.reasons import Code
from wire.tasks import Tasks

log = logging.getLogger("relay.server")


class ListenError(Exception):
    """The server could not take its address (a port in use, a host not on this machine)."""


def create_app(node: Node) -> web.Application:
    """The aiohttp application of ``node``; the node starts and stops with it."""
    app = web.Application(middlewares=[errors], client_max_size=64 * 1024)
    app[NODE] = node
    setup_routes(app, node)
    setup_metrics(app, node)
    app.cleanup_ctx.append(_node_lifetime)
    if node.settings.parent:
        app.cleanup_ctx.append(_parent_link)
    return app


async def _node_lifetime(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    await node.start()
    yield
    await node.close()


async def _parent_link(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    async with aiohttp.ClientSession() as session:
        tasks = Tasks(f"{node.name} parent link")
        tasks.spawn(parent_link(node, session), "parent-link")
        yield
        await tasks.close()


@contextlib.asynccontextmanager
async def running_server(settings: ServerSettings) -> AsyncIterator[Node]:
    """Start one server (listening, node started, parent link up-ing). On exit it drains:
    new calls and links are refused, every call in progress ends with server_shutting_down at
    every hop (the hang-ups are sent before the links close), then everything closes."""
    node = Node(settings)
    runner = GuardedRunner(create_app(node), refused=node.core.counters.refused,
                           head_timeout=settings.http_head_timeout_s, handle_signals=False,
                           access_log=None, shutdown_timeout=2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as exc:
            hint = ("another program (another server?) holds it: choose another --port, or "
                    "--port 0 for any free one" if exc.errno == errno.EADDRINUSE else
                    "check --host")
            raise ListenError(f"cannot listen on {settings.host}:{settings.port}: "
                              f"{exc.strerror or exc}; {hint}") from None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        node.set_url(settings.public_url or f"http://{settings.host}:{port}")
        node.listening.set()
        event(log, "server.ready", server=settings.name, role=settings.role, url=node.url,
              parent=settings.parent)
        yield node
        node.core.draining = True
        event(log, "server.stopping", server=settings.name, calls=len(node.core.sessions))
        await node.close(Code.SERVER_SHUTTING_DOWN)
    finally:
        await runner.cleanup()
        event(log, "server.stopped", server=settings.name)


async def serve(settings: ServerSettings) -> None:
    """Run one server until SIGINT/SIGTERM. Prints one JSON ready line on stdout once listening."""
    async with running_server(settings) as node:
        # Everything loaded so far (aiortc, PyAV, numpy: 68,000 objects tracked) lives as
        # long as the process: out of the collector's sight, a full collection scans only
        # what calls made (measured: 10 ms a full collection for those alone, every time the
        # loop paused for one; about 0 once frozen).
        gc.freeze()
        # The ready line is the one thing on stdout: the stack launcher reads it.
        sys.stdout.write(json.dumps({"event": "ready", "name": settings.name,
                                     "role": settings.role, "url": node.url}) + "\n")
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()  # then running_server drains
