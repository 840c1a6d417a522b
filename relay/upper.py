"""An upper server's own route: its children's trunks (``GET /v1/trunk``). A child's first message
is ``announce``; after the welcome, both sides send directory increments (relay/directory.py)
and calls (relay/switch.py) over it."""

from __future__ import annotations

from aiohttp import web

from relay.effects import Link
from relay.links import first_message, refuse_link, serve_messages
from relay.messages import CHILD_TO_PARENT, Announce
from relay.node import Node


async def child_link(node: Node, request: web.Request) -> web.WebSocketResponse:
    """``GET /v1/trunk``: a child server's trunk."""
    ws, announce = await first_message(request, Announce, node.settings.heartbeat_s)
    if announce is None:
        return ws
    peer = request.remote or "server"
    refusal = node.core.child_announce(announce, node.clock())  # carried out once attached
    if refusal is not None:
        await refuse_link(ws, refusal, Announce.TYPE, peer)
        return ws
    link = Link("child", announce.server)
    channel = node.channel(link, ws, f"child:{announce.server}")
    node.attach(link, channel)
    try:
        await serve_messages(channel, CHILD_TO_PARENT, lambda m: node.receive(link, m))
    finally:
        node.detach(link, channel)
    return ws
