"""The HTTP API a server offers the probe (``/v1/...``), and the WebSocket routes of its links.

Every error is JSON: ``{"error": {"code", "message", "field"}}`` with a 4xx status that says whose
mistake it was; nothing a client sends produces a 5xx.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from relay.call import CallState
from relay.logs import event
from relay.lower import ApiError, LowerServer
from relay.messages import (
    CreateCall,
    DeviceList,
    Error,
    ErrorBody,
    MessageError,
    ServerInfo,
    check_call_id,
)
from relay.node import Node
from relay.openapi import openapi
from relay.upper import UpperServer

log = logging.getLogger("relay.api")

NODE = web.AppKey("node", Node)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = ErrorBody(error=Error(code=code, message=message, field=field))
    return web.json_response(body.to_dict(), status=status, headers=headers)


#: Paths open without a probe token: health, metrics, the browser page, and the WebSocket links
#: (devices and servers prove themselves in their first message).
OPEN_PATHS = ("/healthz", "/metrics", "/device", "/v1/device", "/v1/trunk", "/openapi.json")


def check_probe(request: web.Request) -> None:
    """Raise ApiError 401/403 unless the request carries the probe's token (when auth is on)."""
    node = request.app[NODE]
    auth = node.settings.auth
    if not auth.on or request.path in OPEN_PATHS:
        return
    header = request.headers.get("Authorization", "")
    token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else None
    refusal = auth.check("probe", token)
    if refusal is not None:
        node.refused(refusal[0])
        code, reason = refusal
        raise ApiError(401 if code == "unauthorized" else 403, code,
                       reason + " (send Authorization: Bearer TOKEN)")


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        check_probe(request)
        return await handler(request)
    except ApiError as exc:
        event(log, "api.refused", logging.INFO, path=request.path, method=request.method,
              status=exc.status, code=exc.code, reason=exc.message)
        headers = ({"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None
                   else None)
        return error_response(exc.status, exc.code, exc.message, exc.field, headers)
    except MessageError as exc:
        event(log, "api.invalid", logging.INFO, path=request.path, method=request.method,
              code=exc.code, field=exc.field, reason=exc.message)
        return error_response(400, exc.code, exc.message, exc.field)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        return error_response(exc.status, code, f"{request.method} {request.path}: {exc.reason}",
                              headers={k: v for k, v in exc.headers.items()
                                       if k.lower() == "allow"})


async def read_json(request: web.Request) -> object:
    if request.content_length is not None and request.content_length > 64 * 1024:
        raise ApiError(413, "too_large", "request body is larger than 64 KiB")
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"request body is not valid JSON: {exc}") from None


def server_info(node: Node) -> ServerInfo:
    if isinstance(node, LowerServer):
        return ServerInfo(name=node.name, role="lower", url=node.url,
                          parent=node.settings.parent,
                          parent_connected=node.parent is not None)
    assert isinstance(node, UpperServer)
    return ServerInfo(name=node.name, role="upper", url=node.url, children=node.child_infos())


async def get_server(request: web.Request) -> web.Response:
    return web.json_response(server_info(request.app[NODE]).to_dict())


async def get_devices(request: web.Request) -> web.Response:
    node = request.app[NODE]
    if isinstance(node, LowerServer):
        devices = node.own_devices()
    else:
        assert isinstance(node, UpperServer)
        devices = node.all_devices()
    return web.json_response(DeviceList(server=node.name, devices=devices).to_dict())


async def healthz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    body: dict[str, object] = {"status": "ok", "name": node.name, "role": node.role,
                               "calls": len(node.sessions),
                               "forwarding": dataclasses.asdict(node.forwarding)}
    if isinstance(node, LowerServer):
        body["devices"] = len(node.devices)
        body["parent_connected"] = node.parent is not None
    else:
        assert isinstance(node, UpperServer)
        body["children"] = len(node.children)
    return web.json_response(body)


async def post_call(request: web.Request) -> web.Response:
    started = time.perf_counter()
    received_at = request.app[NODE].clock()
    node = request.app[NODE]
    if not isinstance(node, LowerServer):
        raise ApiError(405, "not_a_lower_server",
                       f"{node.name} is an upper server: send call commands to the caller's "
                       "lower server")
    command = CreateCall.from_dict(await read_json(request))
    call = node.create_call(command, received_at)
    info = dataclasses.replace(node.call_info(call),
                               server_time_ms=round((time.perf_counter() - started) * 1000, 3))
    return web.json_response(info.to_dict(), status=201,
                             headers={"Location": f"/v1/calls/{call.id}"})


def _call_id(request: web.Request) -> str:
    call_id = request.match_info["call"]
    try:
        return check_call_id(call_id)
    except MessageError as exc:
        raise ApiError(400, "bad_call_id", exc.message, "call") from None


async def get_call(request: web.Request) -> web.Response:
    node = request.app[NODE]
    call_id = _call_id(request)
    wait = request.query.get("wait")
    if wait is not None:
        states = {"active": {CallState.ACTIVE}, "ended": {CallState.ENDED}}.get(wait)
        if states is None:
            raise ApiError(400, "bad_query", "wait must be 'active' or 'ended'", "wait")
        try:
            timeout = float(request.query.get("timeout", "10"))
        except ValueError:
            raise ApiError(400, "bad_query", "timeout must be a number", "timeout") from None
        if not 0 <= timeout <= 120:
            raise ApiError(400, "bad_query", "timeout must be between 0 and 120 s", "timeout")
        if node.find_call(call_id) is not None:
            await node.wait_for(call_id, states, timeout)
    call = node.find_call(call_id)
    if call is None:
        raise ApiError(404, "unknown_call", f"no call {call_id!r} on {node.name}", "call")
    return web.json_response(node.call_info(call).to_dict())


async def list_calls(request: web.Request) -> web.Response:
    node = request.app[NODE]
    calls = [node.call_info(s.call).to_dict() for s in node.sessions.values()]
    return web.json_response({"server": node.name, "calls": calls})


async def delete_call(request: web.Request) -> web.Response:
    node = request.app[NODE]
    call_id = _call_id(request)
    session = node.sessions.get(call_id)
    if session is not None:
        event(log, "call.hangup_requested", call=call_id)
        node.end_session(session, "hangup")
    call = node.find_call(call_id)
    if call is None:
        raise ApiError(404, "unknown_call", f"no call {call_id!r} on {node.name}", "call")
    return web.json_response(node.call_info(call).to_dict())


DEVICE_PAGE = Path(__file__).parent / "static" / "device.html"


async def device_page(request: web.Request) -> web.FileResponse:
    """The browser device page: a person (or a kiosk, with ?device=ID) joins as a device."""
    return web.FileResponse(DEVICE_PAGE, headers={"Cache-Control": "no-cache"})


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /openapi.json``: this API's description (relay/openapi.py)."""
    return web.json_response(openapi(request.app[NODE].role))


def setup_routes(app: web.Application, node: Node) -> None:
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/v1/server", get_server)
    app.router.add_get("/v1/devices", get_devices)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/calls", list_calls)
    app.router.add_post("/v1/calls", post_call)
    app.router.add_get("/v1/calls/{call}", get_call)
    app.router.add_delete("/v1/calls/{call}", delete_call)
    if isinstance(node, LowerServer):
        app.router.add_get("/v1/device", node.device_link)
        app.router.add_get("/device", device_page)
    elif isinstance(node, UpperServer):
        app.router.add_get("/v1/trunk", node.child_link)
