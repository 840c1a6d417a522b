"""The HTTP API's OpenAPI 3.1 description. The schemas are msgspec's JSON Schema of the bodies in
wire/messages.py, so they cannot drift from what the servers accept and send; the statuses of
each route's refusals come from the reasons table. Served at ``GET /openapi.json``."""

from __future__ import annotations

from typing import Any

import msgspec

from wire.messages import (
    CALL_ID_PATTERN,
    NAME_PATTERN,
    PROTOCOL_VERSION,
    CallInfo,
    CallList,
    CreateCall,
    DeviceList,
    ErrorBody,
    ServerInfo,
    ServerList,
)
from wire.reasons import REASONS
from wire.states import CallState

REF = "#/components/schemas/{name}"
BODIES = (CreateCall, CallInfo, CallList, DeviceList, ServerInfo, ServerList, ErrorBody)


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _ref(cls: type) -> dict[str, Any]:
    return {"$ref": REF.format(name=cls.__name__)}


def _errors(*statuses: int) -> dict[str, Any]:
    out = {}
    for status in statuses:
        codes = sorted(r.code.value for r in REASONS.values() if r.status == status)
        out[str(status)] = {"description": ", ".join(codes) or "error",
                            **_json(_ref(ErrorBody))}
    return out


def _gateways() -> dict[str, Any]:
    """WHIP and WHEP (relay/gateway.py): an SDP offer in, the answer out, the session's
    Location."""
    sdp = {"content": {"application/sdp": {"schema": {"type": "string"}}}}
    created = {"201": {"description": "the SDP answer; Location names the session",
                       "headers": {"Location": {"schema": {"type": "string"}}}, **sdp}}
    session = [{"name": "session", "in": "path", "required": True,
                "schema": {"type": "string", "maxLength": 64}}]
    return {
        "/v1/whip/{device}": {"post": {
            "summary": "WHIP (RFC 9725): publish as device {device} (kind whip)",
            "parameters": [{"name": "device", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": NAME_PATTERN}}],
            "requestBody": {"required": True, **sdp},
            "responses": {**created, **_errors(400, 401, 403, 408, 413, 415, 503)}}},
        "/v1/whep/{address}": {"post": {
            "summary": "WHEP: watch a device of the tree (SERVER/DEVICE)",
            "parameters": [{"name": "address", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "requestBody": {"required": True, **sdp},
            "responses": {**created,
                          **_errors(400, 401, 403, 404, 408, 409, 413, 415, 421, 503)}}},
        "/v1/sessions/{session}": {
            "delete": {"summary": "End a WHIP or WHEP session", "parameters": session,
                       "responses": {"200": {"description": "ended"},
                                     **_errors(400, 401, 403, 404)}},
            "patch": {"summary": "Trickle ICE and ICE restarts: not supported (405)",
                      "parameters": session,
                      "requestBody": {"content": {"application/trickle-ice-sdpfrag": {
                          "schema": {"type": "string"}}}},
                      "responses": {**_errors(400, 401, 403, 404, 405)}}},
    }


def openapi(role: str) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(BODIES, ref_template=REF)
    call_id = {"name": "call", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": CALL_ID_PATTERN}}
    wait = [{"name": "wait", "in": "query", "schema": {"type": "string",
                                                        "enum": [s.value for s in CallState]}},
            {"name": "timeout", "in": "query",
             "schema": {"type": "number", "minimum": 0, "maximum": 120}}]

    def ok(cls: type, status: str = "200") -> dict[str, Any]:
        return {status: {"description": "ok", **_json(_ref(cls))}}

    paths: dict[str, Any] = {
        "/v1/server": {"get": {"summary": "This server: name, role, parent, children",
                               "responses": {**ok(ServerInfo), **_errors(400, 401, 403)}}},
        "/v1/servers": {"get": {"summary": "Every server of the tree this server knows",
                                "responses": {**ok(ServerList), **_errors(400, 401, 403)}}},
        "/v1/devices": {"get": {"summary": "A lower server's devices; an upper server's "
                                           "whole subtree; ?server=NAME: one server's; "
                                           "?scope=tree: the whole tree's, from its root",
                                "parameters": [{"name": "server", "in": "query", "schema": {
                                    "type": "string", "pattern": NAME_PATTERN}},
                                    {"name": "scope", "in": "query", "schema": {
                                        "type": "string", "enum": ["server", "tree"]}}],
                                "responses": {**ok(DeviceList),
                                              **_errors(400, 401, 403, 503)}}},
        "/v1/calls": {"get": {"summary": "Calls in progress",
                              "responses": {**ok(CallList), **_errors(400, 401, 403)}}},
        "/v1/calls/{call}": {
            "get": {"summary": "A call's state, path, timeline and media; ?wait holds the "
                               "request", "parameters": [call_id, *wait],
                    "responses": {**ok(CallInfo), **_errors(400, 401, 403, 404)}},
            "delete": {"summary": "Hang up (reason hangup); the ended call",
                       "parameters": [call_id],
                       "responses": {**ok(CallInfo), **_errors(400, 401, 403, 404)}}},
        "/healthz": {"get": {"summary": "Health and forwarding counters",
                             "responses": {"200": {"description": "ok",
                                                   **_json({"type": "object"})},
                                           **_errors(400)}}},
    }
    paths["/v1/asyncapi.json"] = {"get": {
        "summary": "The WebSocket protocol (device and trunk links) as AsyncAPI 3.0",
        "responses": {"200": {"description": "ok", **_json({"type": "object"})},
                      **_errors(400)}}}
    if role == "lower":
        paths["/v1/calls"]["post"] = {
            "summary": "Start a call from a device of this server",
            "requestBody": {"required": True, **_json(_ref(CreateCall))},
            "responses": {**ok(CallInfo, "201"),
                          **_errors(400, 401, 403, 404, 408, 409, 413, 421, 503)}}
        paths.update(_gateways())
    return {
        "openapi": "3.1.0",
        "info": {"title": f"vphone-relay {role} server", "version": str(PROTOCOL_VERSION),
                 "description": "Probe ↔ server HTTP API. With auth on, /v1/ needs "
                                "Authorization: Bearer TOKEN (docs/relay.md)."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"}}},
    }
