"""A lower server's own routes: the devices' WebSocket links (``GET /v1/device``) and the browser
device page (``GET /device``). Everything a device says goes to the signalling core."""

from __future__ import annotations

from aiohttp import web

from relay.effects import Link
from relay.node import Node
from webdevice import PAGE
from wire.messages import DEVICE_TO_SERVER, Register

DEVICE_PAGE = PAGE


async def device_link(node: Node, request: web.Request) -> web.WebSocketResponse:
    """``GET /v1/device``: a device's WebSocket. Its first message must be ``register``; past
    ``--max-message-rate`` its messages are dropped (wire/links.py)."""
    return await node.serve_link(request, Register, node.core.device_register,
                                 lambda register: Link("device", register.device),
                                 DEVICE_TO_SERVER, node.settings.limits.max_message_rate)


async def device_page(request: web.Request) -> web.FileResponse:
    """The browser device page: a person (or a kiosk, with ?device=ID) joins as a device."""
    return web.FileResponse(DEVICE_PAGE, headers={"Cache-Control": "no-cache"})
