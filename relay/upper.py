"""An upper server's own route: its children's trunks (``GET /v1/trunk``). A child's first message
is ``announce``; after the welcome, both sides send directory increments (relay/directory.py)
and calls (relay/switch.py) over it."""

from __future__ import annotations

from aiohttp import web

from relay.effects import Link
from relay.node import Node
from wire.messages import CHILD_TO_PARENT, Announce


async def child_link(node: Node, request: web.Request) -> web.WebSocketResponse:
    """``GET /v1/trunk``: a child server's trunk. Past ``--max-trunk-rate`` its messages are
    dropped (wire/links.py)."""
    return await node.serve_link(request, Announce, node.core.child_announce,
                                 lambda announce: Link("child", announce.server),
                                 CHILD_TO_PARENT, node.settings.limits.max_trunk_rate)
