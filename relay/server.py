"""Wiring of one relay server: the app factory, its resources' lifetimes, and the process runner."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from relay.api import NODE, errors, setup_routes
from relay.logs import event
from relay.lower import LowerServer
from relay.metrics import setup_metrics
from relay.node import SHUTTING_DOWN, Node
from relay.settings import ServerSettings
from relay.upper import UpperServer

log = logging.getLogger("relay.server")


def create_node(settings: ServerSettings) -> Node:
    return LowerServer(settings) if settings.role == "lower" else UpperServer(settings)


def create_app(node: Node) -> web.Application:
    """The aiohttp application of ``node``; the node starts and stops with it."""
    app = web.Application(middlewares=[errors], client_max_size=64 * 1024)
    app[NODE] = node
    setup_routes(app, node)
    setup_metrics(app, node)
    app.cleanup_ctx.append(_node_lifetime)
    if isinstance(node, LowerServer) and node.settings.parent:
        app.cleanup_ctx.append(_parent_link)
    return app


async def _node_lifetime(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    await node.start()
    yield
    await node.close()


async def _parent_link(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    assert isinstance(node, LowerServer)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(node.parent_link(session), name="parent-link")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def running_server(settings: ServerSettings) -> AsyncIterator[Node]:
    """Start one server (listening, node started, parent link up-ing); stop it on exit."""
    node = create_node(settings)
    runner = web.AppRunner(create_app(node), handle_signals=False, access_log=None,
                           shutdown_timeout=2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        node.url = settings.public_url or f"http://{settings.host}:{port}"
        node.listening.set()
        event(log, "server.ready", server=settings.name, role=settings.role, url=node.url,
              parent=settings.parent)
        yield node
    finally:
        await runner.cleanup()
        event(log, "server.stopped", server=settings.name)


async def serve(settings: ServerSettings) -> None:
    """Run one server until SIGINT/SIGTERM. Prints one JSON ready line on stdout once listening."""
    async with running_server(settings) as node:
        # The ready line is the one thing on stdout: the stack launcher reads it.
        sys.stdout.write(json.dumps({"event": "ready", "name": settings.name,
                                     "role": settings.role, "url": node.url}) + "\n")
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        # Drain: refuse what is new, end what is up (every call ends with a reason, sent to
        # its other hops), then close. The links and legs close in the cleanup.
        node.draining = True
        calls = len(node.sessions)
        event(log, "server.stopping", server=settings.name, calls=calls)
        await node.close(SHUTTING_DOWN)


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop if asked for (or 'auto' and installed), else asyncio's default."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop
