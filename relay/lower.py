"""A lower server's own routes: the devices' WebSocket links (``GET /v1/device``) and the browser
device page (``GET /device``). Everything a device says goes to the signalling core."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from relay.effects import Link
from relay.links import first_message, refuse_link, serve_messages
from relay.messages import DEVICE_TO_SERVER, Register
from relay.node import Node

DEVICE_PAGE = Path(__file__).parent / "static" / "device.html"


async def device_link(node: Node, request: web.Request) -> web.WebSocketResponse:
    """``GET /v1/device``: a device's WebSocket. Its first message must be ``register``."""
    ws, register = await first_message(request, Register, node.settings.heartbeat_s)
    if register is None:
        return ws
    peer = request.remote or "device"
    refusal = node.core.device_register(register, node.clock())  # carried out once attached
    if refusal is not None:
        await refuse_link(ws, refusal, Register.TYPE, peer)
        return ws
    link = Link("device", register.device)
    channel = node.channel(link, ws, f"device:{register.device}")
    node.attach(link, channel)
    try:
        await serve_messages(channel, DEVICE_TO_SERVER, lambda m: node.receive(link, m),
                             rate=node.settings.limits.max_message_rate,
                             on_refused=node.core.counters.refused)
    finally:
        node.detach(link, channel)
    return ws


async def device_page(request: web.Request) -> web.FileResponse:
    """The browser device page: a person (or a kiosk, with ?device=ID) joins as a device."""
    return web.FileResponse(DEVICE_PAGE, headers={"Cache-Control": "no-cache"})
