"""The HTTP side of the protocol every service answers with: an error as JSON, the same shape
(wire/messages.py ``ErrorBody``) from servers and from a probe fleet's leader."""

from __future__ import annotations

import asyncio

from aiohttp import web

from wire.messages import Error, ErrorBody
from wire.reasons import Code, Refused


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = ErrorBody(error=Error(code=code, message=message, field=field))  # type: ignore[arg-type]
    return web.json_response(body.to_dict(), status=status, headers=headers)


async def read_body(request: web.Request, most: int, timeout_s: float,
                    what: str = "request body") -> bytes:
    """A request's whole body: refused ``too_large`` past ``most`` bytes (by its length, or as
    it arrives) and ``request_timeout`` when it is not whole within ``timeout_s``."""
    if request.content_length is not None and request.content_length > most:
        raise Refused(Code.TOO_LARGE, f"{what} is larger than {most // 1024} KiB")
    try:
        async with asyncio.timeout(timeout_s):
            body = await request.read()
    except TimeoutError:
        raise Refused(Code.REQUEST_TIMEOUT,
                      f"the {what} did not arrive within {timeout_s:g} s") from None
    if len(body) > most:
        raise Refused(Code.TOO_LARGE, f"{what} is larger than {most // 1024} KiB")
    return body
