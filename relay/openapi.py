"""The HTTP API's OpenAPI 3.0 description, made from the message dataclasses (relay/messages.py),
so it cannot drift from what the servers accept and send. Served at ``GET /openapi.json``."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from relay import messages
from relay.messages import (
    PROTOCOL_VERSION,
    CallInfo,
    CreateCall,
    DeviceList,
    ErrorBody,
    ServerInfo,
)

NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
#: What a field's type cannot say: its pattern or choices (the checks in relay/messages.py).
CONSTRAINTS: dict[tuple[str, str], dict[str, Any]] = {
    ("CreateCall", "caller"): {"pattern": f"^({NAME}/)?{NAME}$"},
    ("CreateCall", "callee"): {"pattern": f"^({NAME}/)?{NAME}$"},
    ("CreateCall", "media_mode"): {"enum": list(messages.MEDIA_MODES)},
}
CALL_ID = "^[A-Za-z0-9-]{1,64}$"
#: Properties a body's to_dict adds beyond its fields (read-only).
EXTRA: dict[str, dict[str, Any]] = {
    "DeviceInfo": {"address": {"type": "string", "description": "SERVER/DEVICE"}},
}


def schema_of(annotation: Any, components: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema of a type hint; dataclasses become named components."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is str:
        return {"type": "string"}
    if annotation is bool:
        return {"type": "boolean"}
    if annotation is int:
        return {"type": "integer"}
    if annotation is float:
        return {"type": "number"}
    if origin is typing.Literal:
        return {"type": "string", "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = schema_of(rest[0], components) if len(rest) == 1 else {
            "oneOf": [schema_of(a, components) for a in rest]}
        return {**inner, "nullable": True} if "$ref" not in inner else {
            "allOf": [inner], "nullable": True}
    if origin is list:
        return {"type": "array", "items": schema_of(args[0], components)}
    if origin is dict:
        return {"type": "object", "additionalProperties": schema_of(args[1], components)}
    if dataclasses.is_dataclass(annotation):
        name = annotation.__name__
        if name not in components:
            components[name] = {}  # placeholder against recursion
            hints = typing.get_type_hints(annotation, vars(messages))
            props: dict[str, Any] = {}
            required: list[str] = []
            tag = getattr(annotation, "TYPE", None)
            if tag:  # a message's type tag, always sent
                props["type"] = {"type": "string", "enum": [tag]}
            props.update(EXTRA.get(name, {}))
            for f in dataclasses.fields(annotation):
                if f.name == "TYPE":
                    continue
                props[f.name] = {**schema_of(hints[f.name], components),
                                 **CONSTRAINTS.get((name, f.name), {})}
                if (f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING):
                    required.append(f.name)
            doc = (annotation.__doc__ or "").strip().splitlines()
            # Strict, as decoding is: an unknown field is an error.
            components[name] = {"type": "object", "properties": props,
                                "additionalProperties": False,
                                **({"required": required} if required else {}),
                                **({"description": doc[0]} if doc else {})}
        return {"$ref": f"#/components/schemas/{name}"}
    raise TypeError(f"no schema for {annotation!r}")


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {400: "bad request: the error names the field", 401: "no token (auth is on)",
            403: "wrong token", 404: "unknown device, server or call",
            409: "a device is busy", 421: "the caller is not on this server",
            503: "busy or shutting down (Retry-After)"}
    return {str(s): {"description": text[s], **_json({"$ref": "#/components/schemas/ErrorBody"})}
            for s in statuses}


def openapi(role: str) -> dict[str, Any]:
    components: dict[str, Any] = {}
    ref = {cls.__name__: schema_of(cls, components)
           for cls in (CreateCall, CallInfo, DeviceList, ServerInfo, ErrorBody)}
    call_id = {"name": "call", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": CALL_ID}}
    wait = [{"name": "wait", "in": "query", "schema": {"type": "string",
                                                        "enum": ["active", "ended"]}},
            {"name": "timeout", "in": "query",
             "schema": {"type": "number", "minimum": 0, "maximum": 120}}]
    paths: dict[str, Any] = {
        "/v1/server": {"get": {"summary": "This server: name, role, parent, children",
                               "responses": {"200": {"description": "ok",
                                                     **_json(ref["ServerInfo"])},
                                             **_errors(401, 403)}}},
        "/v1/devices": {"get": {"summary": "A lower server's devices; the upper's whole tree",
                                "responses": {"200": {"description": "ok",
                                                      **_json(ref["DeviceList"])},
                                              **_errors(401, 403)}}},
        "/v1/calls": {
            "get": {"summary": "Calls in progress",
                    "responses": {"200": {"description": "ok", **_json({
                        "type": "object", "properties": {"calls": {
                            "type": "array", "items": ref["CallInfo"]}}})},
                        **_errors(401, 403)}}},
        "/v1/calls/{call}": {
            "get": {"summary": "A call's state, timeline and media; ?wait holds the request",
                    "parameters": [call_id, *wait],
                    "responses": {"200": {"description": "ok", **_json(ref["CallInfo"])},
                                  **_errors(400, 401, 403, 404)}},
            "delete": {"summary": "Hang up (reason hangup); the ended call",
                       "parameters": [call_id],
                       "responses": {"200": {"description": "ok", **_json(ref["CallInfo"])},
                                     **_errors(400, 401, 403, 404)}}},
        "/healthz": {"get": {"summary": "Health and forwarding counters",
                             "responses": {"200": {"description": "ok", **_json(
                                 {"type": "object"})}}}},
    }
    if role == "lower":
        paths["/v1/calls"]["post"] = {
            "summary": "Start a call from a device of this server",
            "requestBody": {"required": True, **_json(ref["CreateCall"])},
            "responses": {"201": {"description": "created", **_json(ref["CallInfo"])},
                          **_errors(400, 401, 403, 404, 409, 421, 503)}}
    return {
        "openapi": "3.0.3",
        "info": {"title": f"vphone-relay {role} server", "version": str(PROTOCOL_VERSION),
                 "description": "Probe ↔ server HTTP API. With auth on, /v1/ needs "
                                "Authorization: Bearer TOKEN (docs/relay.md)."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"}}},
    }
