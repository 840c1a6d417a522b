"""The link to a parent server, which a server of either role may have (``--parent URL``): connect,
announce, serve; reconnect with backoff when it drops. While it is down, calls that need it end
with ``trunk_lost`` and new ones are refused with ``server_unreachable``."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from relay.effects import PARENT
from relay.node import Node
from wire.config import parent_url
from wire.links import receive, serve_messages
from wire.logs import event
from wire.messages import PARENT_TO_CHILD, WS_MAX_MSG_SIZE, Announce, Error, Welcome

log = logging.getLogger("relay.parent")
WELCOME_S = 10.0


async def parent_link(node: Node, session: aiohttp.ClientSession) -> None:
    """Keep the trunk to the parent up for as long as the server runs."""
    assert node.settings.parent is not None
    url = parent_url(node.settings.parent, "/v1/trunk")
    await node.listening.wait()  # the announce carries our URL
    backoff = 0.2
    while True:
        try:
            async with session.ws_connect(url, heartbeat=node.settings.heartbeat_s,
                                          max_msg_size=WS_MAX_MSG_SIZE) as ws:
                auth = node.settings.auth
                await ws.send_str(Announce(
                    server=node.name, url=node.url, role=node.role,
                    token=auth.token(f"server:{node.name}") if auth.on else None).to_json())
                async with asyncio.timeout(WELCOME_S):
                    welcome = await receive(ws, PARENT_TO_CHILD, "parent")
                if not isinstance(welcome, Welcome):
                    why = welcome.message if isinstance(welcome, Error) else "no welcome"
                    event(log, "parent.refused", logging.ERROR, url=url, reason=why,
                          code=getattr(welcome, "code", None))
                    raise ConnectionError(why)
                backoff = 0.2
                channel = node.channel(PARENT, ws, f"parent:{welcome.server}")
                node.feed(node.core.parent_welcomed, welcome, carry_out=False)
                node.attach(PARENT, channel)
                try:
                    await serve_messages(channel, PARENT_TO_CHILD,
                                         lambda m: node.receive(PARENT, m))
                finally:
                    node.detach(PARENT, channel)
        except (aiohttp.ClientError, ConnectionError, OSError, TimeoutError) as exc:
            event(log, "parent.unreachable", logging.WARNING, url=url, error=repr(exc),
                  retry_s=backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)
