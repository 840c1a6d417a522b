"""The HTTP edge (relay/httpd.py) against a real server over real sockets: what the HTTP parser
refuses is JSON like every other error, and a client that sends its request slowly is cut off
(head and body bounds) while others are served."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from urllib.parse import urlsplit

import aiohttp
import pytest

from relay.server import running_server
from relay.settings import ServerSettings

from .conftest import LOOPBACK

pytestmark = pytest.mark.e2e


def settings(**extra: float) -> ServerSettings:
    return ServerSettings(role="lower", name="lower-a", media=LOOPBACK, **extra)


async def raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    return await asyncio.open_connection(parts.hostname, parts.port)


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response: status, headers (lower-case names), body."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split(" ")[1]), headers, body


async def refusals(session: aiohttp.ClientSession, url: str, code: str) -> float:
    async with session.get(f"{url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("relay_refusals_total{") and f'code="{code}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_what_the_http_parser_refuses_is_json_and_logged_once(caplog):
    caplog.set_level(logging.INFO)
    async with running_server(settings()) as server, aiohttp.ClientSession() as session:
        cases = {
            "long request line": f"GET /v1/calls/x?timeout={'9' * 9000} HTTP/1.1\r\n"
                                 "Host: x\r\n\r\n",
            "long header": f"GET /v1/server HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 9000}\r\n\r\n",
            "bad header": "GET /v1/server HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
            "bad version": "GET /v1/server HTTP/9\r\n\r\n",
        }
        for what, request in cases.items():
            reader, writer = await raw(server.url)
            try:
                writer.write(request.encode())
                status, headers, body = await response(reader)
            finally:
                writer.close()
            assert status == 400, what
            assert headers["content-type"].startswith("application/json"), what
            error = json.loads(body)["error"]
            assert error["code"] == "bad_request", what
            assert error["message"].startswith("the HTTP request is malformed"), what
        assert await refusals(session, server.url, "bad_request") == len(cases)
        # one line each, no traceback; the server still answers
        lines = [r for r in caplog.records if "http.refused" in r.getMessage()]
        assert len(lines) == len(cases) and not any(r.exc_info for r in caplog.records)
        async with session.get(f"{server.url}/v1/server") as r:
            assert r.status == 200


async def test_a_slow_head_is_cut_off_and_others_are_served():
    async with running_server(settings(http_head_timeout_s=0.5)) as server, \
            aiohttp.ClientSession() as session:
        # nothing at all, then a head dribbled a byte at a time: both closed near the bound,
        # though the second keeps sending (the bound is not reset by traffic)
        silent_reader, silent = await raw(server.url)
        drip_reader, drip = await raw(server.url)
        started = time.monotonic()
        try:
            head = b"GET /v1/server HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
            for i in range(len(head)):
                if drip_reader.at_eof():
                    break
                drip.write(head[i:i + 1])
                await asyncio.sleep(0.05)
                # served meanwhile: a whole request on another connection
                if i == 3:
                    async with session.get(f"{server.url}/v1/server") as r:
                        assert r.status == 200
            assert await asyncio.wait_for(drip_reader.read(), 2) == b""
            dripped_s = time.monotonic() - started
            assert await asyncio.wait_for(silent_reader.read(), 2) == b""
        finally:
            silent.close()
            drip.close()
        assert 0.4 < dripped_s < 2.0
        assert await refusals(session, server.url, "request_timeout") == 2
        # a keep-alive connection that asks in time is served again and again
        for _ in range(3):
            async with session.get(f"{server.url}/v1/server") as r:
                assert r.status == 200
            await asyncio.sleep(0.3)


async def test_a_slow_body_is_refused_with_request_timeout():
    async with running_server(settings(http_body_timeout_s=0.5)) as server:
        reader, writer = await raw(server.url)
        try:
            writer.write(b"POST /v1/calls HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 100\r\n\r\n{\"caller\": ")
            started = time.monotonic()
            status, _, body = await response(reader)
        finally:
            writer.close()
        assert status == 408 and time.monotonic() - started < 2.0
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and "0.5 s" in error["message"]
