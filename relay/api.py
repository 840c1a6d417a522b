"""The HTTP API a server offers the probe (``/v1/...``), and the WebSocket routes of its links.

Every error is JSON: ``{"error": {"code", "message", "field"}}`` with the status the reasons table
(wire/reasons.py) gives its code; nothing a client sends produces a 5xx.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial

import aiohttp
from aiohttp import web
from msgspec.structs import replace

from relay.asyncapi import asyncapi
from relay.call import CallState
from relay.gateway import OWN_AUTH_PREFIXES, setup_gateway_routes
from relay.lower import device_link, device_page
from relay.node import Node
from relay.openapi import openapi
from relay.switch import Placing
from relay.upper import child_link
from wire.auth import bearer, probe_identity
from wire.http import error_response, read_body
from wire.logs import event
from wire.messages import (
    PROTOCOL_VERSION,
    CallList,
    ChildInfo,
    CreateCall,
    DeviceInfo,
    DeviceList,
    MessageError,
    ServerInfo,
    ServerList,
    check_call_id,
    check_name,
)
from wire.reasons import Code, Refused

log = logging.getLogger("relay.api")

NODE = web.AppKey("node", Node)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


#: Paths open without a probe token: health, metrics, the browser page, and the WebSocket links
#: (devices and servers prove themselves in their first message).
OPEN_PATHS = ("/healthz", "/metrics", "/device", "/v1/device", "/v1/trunk", "/openapi.json",
              "/v1/asyncapi.json")


def check_probe(request: web.Request) -> None:
    """Raise Refused 401/403 unless the request carries the probe's token (when auth is on)."""
    node = request.app[NODE]
    auth = node.settings.auth
    if not auth.on or request.path in OPEN_PATHS or request.path.startswith(OWN_AUTH_PREFIXES):
        return
    token = bearer(request.headers.get("Authorization", ""))
    refusal = auth.check(probe_identity(), token, probe_identity(node.name))
    if refusal is not None:
        raise Refused(Code(refusal[0]), refusal[1] + " (send Authorization: Bearer TOKEN)")


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal as the API's JSON error, logged once and counted once by its code
    (``relay_refusals_total{code}``): a call refused at the start shows in /metrics like one
    refused on its way."""
    counters = request.app[NODE].core.counters
    try:
        check_probe(request)
        return await handler(request)
    except Refused as exc:
        counters.refused(exc.code)
        event(log, "api.refused", logging.INFO, path=request.path, method=request.method,
              status=exc.status, code=exc.code, reason=exc.message)
        headers = ({"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None
                   else None)
        return error_response(exc.status, exc.code, exc.message, exc.field, headers)
    except MessageError as exc:
        counters.refused(exc.code)
        event(log, "api.invalid", logging.INFO, path=request.path, method=request.method,
              code=exc.code, field=exc.field, reason=exc.message)
        return error_response(400, exc.code, exc.message, exc.field)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: Code.NOT_FOUND, 405: Code.METHOD_NOT_ALLOWED}.get(exc.status,
                                                                       Code.HTTP_ERROR)
        counters.refused(code)
        return error_response(exc.status, code, f"{request.method} {request.path}: {exc.reason}",
                              headers={k: v for k, v in exc.headers.items()
                                       if k.lower() == "allow"})


async def read_json(request: web.Request) -> object:
    body = await read_body(request, 64 * 1024, request.app[NODE].settings.http_body_timeout_s)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Refused(Code.BAD_JSON, f"request body is not valid JSON: {exc}") from None


def server_info(node: Node) -> ServerInfo:
    directory = node.directory
    children = [ChildInfo(name=n, role=directory.below[n].role, url=directory.below[n].url,
                          devices=directory.device_count(n)) for n in directory.children()]
    return ServerInfo(name=node.name, role=node.role, url=node.url,
                      parent=node.settings.parent, parent_name=directory.parent,
                      parent_connected=directory.parent is not None, children=children,
                      version=PROTOCOL_VERSION)


async def get_server(request: web.Request) -> web.Response:
    return web.json_response(server_info(request.app[NODE]).to_dict())


async def get_servers(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.json_response(ServerList(server=node.name,
                                        servers=node.directory.servers()).to_dict())


#: how long ``GET /v1/devices?scope=tree`` waits for the root's list
TREE_LOOKUP_S = 3.0


async def tree_devices(node: Node) -> list[DeviceInfo]:
    """Every device of the tree, with its state: the root's list (it knows them all), read by
    this server over HTTP (with a probe token of the root's own when auth is on)."""
    root = next((s for s in node.directory.servers() if s.parent is None), None)
    if root is None or root.name == node.name or node.directory.parent is None:
        return node.directory.subtree_devices()  # the root, or cut off from it
    auth = node.settings.auth
    headers = ({"Authorization": f"Bearer {auth.token(probe_identity(root.name))}"}
               if auth.on else {})
    url = f"{root.url.rstrip('/')}/v1/devices"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TREE_LOOKUP_S)
                                         ) as session, session.get(url, headers=headers) as r:
            body = await r.read()
            if r.status != 200:
                raise Refused(Code.SERVER_UNREACHABLE, f"the root {root.name} answered "
                              f"{url} with HTTP {r.status}", "scope")
            return DeviceList.from_dict(json.loads(body)).devices
    except (aiohttp.ClientError, TimeoutError, ValueError, MessageError) as exc:
        raise Refused(Code.SERVER_UNREACHABLE, f"the root {root.name} did not list the tree's "
                      f"devices at {url}: {exc!r}"[:500], "scope") from None


async def get_devices(request: web.Request) -> web.Response:
    """A lower server's devices, an upper server's subtree; ``?server=NAME``: one server's;
    ``?scope=tree``: the whole tree's (the browser page's phone book)."""
    node = request.app[NODE]
    server = request.query.get("server")
    scope = request.query.get("scope", "server")
    if scope not in ("server", "tree"):
        raise Refused(Code.BAD_QUERY, "scope must be 'server' or 'tree'", "scope")
    if server is not None:
        try:
            check_name(server, "server")
        except MessageError as exc:
            raise Refused(Code.BAD_QUERY, exc.message, "server") from None
    if scope == "tree":
        devices = await tree_devices(node)
        if server is not None:
            devices = [d for d in devices if d.server == server]
    elif server is not None:
        devices = node.directory.devices_of(server)
    else:
        devices = node.directory.subtree_devices()
    return web.json_response(DeviceList(server=node.name, devices=devices).to_dict())


async def healthz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    directory = node.directory
    body: dict[str, object] = {"status": "ok", "name": node.name, "role": node.role,
                               "calls": len(node.core.sessions),
                               "parent_connected": directory.parent is not None,
                               "forwarding": dataclasses.asdict(node.forwarding)}
    if node.role == "lower":
        body["devices"] = len(directory.own)
    else:
        body["children"] = len(directory.children())
        body["devices"] = len(directory.devices)
    return web.json_response(body)


async def post_call(request: web.Request) -> web.Response:
    started = time.perf_counter()
    node = request.app[NODE]
    command = CreateCall.from_dict(await read_json(request))
    call = node.feed(node.core.create_call, command)
    if isinstance(call, Placing):  # the caller dials it itself: the call it dialed
        call = await node.placed(call.ref, node.core.timeouts.wake + 1.0)
    if isinstance(call, Refused):
        raise call
    info = replace(node.call_info(call),
                   server_time_ms=round((time.perf_counter() - started) * 1000, 3))
    return web.json_response(info.to_dict(), status=201,
                             headers={"Location": f"/v1/calls/{call.id}"})


def _call_id(request: web.Request) -> str:
    call_id = request.match_info["call"]
    try:
        return check_call_id(call_id)
    except MessageError as exc:
        raise Refused(Code.BAD_CALL_ID, exc.message, "call") from None


async def get_call(request: web.Request) -> web.Response:
    node = request.app[NODE]
    call_id = _call_id(request)
    wait = request.query.get("wait")
    if wait is not None:
        order = list(CallState)  # waking, ringing, connecting, active, ending, ended
        if wait not in order:
            raise Refused(Code.BAD_QUERY, "wait must be a call state: "
                          f"{', '.join(s.value for s in order)}", "wait")
        # that state, or one after it (a state may be skipped: a callee that does not ring)
        states = set(order[order.index(CallState(wait)):])
        try:
            timeout = float(request.query.get("timeout", "10"))
        except ValueError:
            raise Refused(Code.BAD_QUERY, "timeout must be a number", "timeout") from None
        if not 0 <= timeout <= 120:
            raise Refused(Code.BAD_QUERY, "timeout must be between 0 and 120 s", "timeout")
        if node.find_call(call_id) is not None:
            await node.wait_for(call_id, states, timeout)
    call = node.find_call(call_id)
    if call is None:
        raise Refused(Code.UNKNOWN_CALL, f"no call {call_id!r} on {node.name}", "call")
    return web.json_response(node.call_info(call).to_dict())


async def list_calls(request: web.Request) -> web.Response:
    node = request.app[NODE]
    calls = [node.call_info(s.call) for s in node.core.sessions.values()]
    return web.json_response(CallList(server=node.name, calls=calls).to_dict())


async def delete_call(request: web.Request) -> web.Response:
    node = request.app[NODE]
    call_id = _call_id(request)
    call = node.feed(node.core.hangup, call_id)
    if call is None:
        raise Refused(Code.UNKNOWN_CALL, f"no call {call_id!r} on {node.name}", "call")
    return web.json_response(node.call_info(call).to_dict())


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /openapi.json``: this API's description (relay/openapi.py)."""
    return web.json_response(openapi(request.app[NODE].role))


async def asyncapi_json(request: web.Request) -> web.Response:
    """``GET /v1/asyncapi.json``: the WebSocket protocol's description (relay/asyncapi.py)."""
    node = request.app[NODE]
    return web.json_response(asyncapi(node.name, str(request.url.origin())))


def setup_routes(app: web.Application, node: Node) -> None:
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/v1/asyncapi.json", asyncapi_json)
    app.router.add_get("/v1/server", get_server)
    app.router.add_get("/v1/servers", get_servers)
    app.router.add_get("/v1/devices", get_devices)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/calls", list_calls)
    app.router.add_post("/v1/calls", post_call)
    app.router.add_get("/v1/calls/{call}", get_call)
    app.router.add_delete("/v1/calls/{call}", delete_call)
    if node.role == "lower":
        app.router.add_get("/v1/device", partial(device_link, node))
        app.router.add_get("/device", device_page)
        setup_gateway_routes(app, node)
    else:
        app.router.add_get("/v1/trunk", partial(child_link, node))
