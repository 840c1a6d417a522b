"""The HTTP side of the protocol every service answers with: an error as JSON, the same shape
(wire/messages.py ``ErrorBody``) from servers and from a probe fleet's leader."""

from __future__ import annotations

from aiohttp import web

from wire.messages import Error, ErrorBody


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = ErrorBody(error=Error(code=code, message=message, field=field))  # type: ignore[arg-type]
    return web.json_response(body.to_dict(), status=status, headers=headers)
