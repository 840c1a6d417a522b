"""Limits: past them a server answers "busy" at once, says why, counts it, and changes nothing
else: calls (503 + Retry-After), devices (server_full), messages per second (rate_limited)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from endpoint.device import Device
from relay.admission import Limits
from relay.server import running_server
from relay.settings import ServerSettings
from wire.links import RateLimit

from .conftest import DEVICE_SETTINGS, LOOPBACK


def test_rate_limit_is_a_token_bucket():
    limit = RateLimit(rate=10, burst=20)
    assert sum(limit.allow(0.0) for _ in range(30)) == 20  # the burst, then nothing
    assert limit.allow(0.05) is False  # half a token
    assert limit.allow(0.1) is True  # one token back after 0.1 s
    assert sum(limit.allow(10.0) for _ in range(30)) == 20  # refilled, capped at the burst


def refusals(text: str, code: str) -> float:
    for line in text.splitlines():
        if line.startswith("relay_refusals_total{") and f'code="{code}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.e2e
async def test_calls_devices_and_messages_past_the_limits_are_refused_at_once():
    settings = ServerSettings(role="lower", name="lower-a", media=LOOPBACK,
                              limits=Limits(max_calls=1, max_devices=3, max_message_rate=5))
    async with running_server(settings) as server, aiohttp.ClientSession() as session:
        devices = [Device(server.url, f"cam-{i}", DEVICE_SETTINGS) for i in range(4)]
        tasks = [asyncio.create_task(d.run(session)) for d in devices[:3]]
        try:
            await asyncio.wait_for(asyncio.gather(*(d.registered.wait() for d in devices[:3])),
                                   10)
            # calls: the first is taken, the second is "busy" at once, with when to retry
            url = f"{server.url}/v1/calls"
            body = {"caller": "lower-a/cam-0", "callee": "lower-a/cam-1", "media_mode": "none"}
            async with session.post(url, json=body) as r:
                assert r.status == 201
            body = {"caller": "lower-a/cam-2", "callee": "lower-a/cam-1", "media_mode": "none"}
            async with session.post(url, json=body) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                error = (await r.json())["error"]
            assert error["code"] == "server_busy" and "maximum of 1 calls" in error["message"]
            # devices: a fourth is turned away with the reason, and the link is closed
            async with session.ws_connect(f"{server.url.replace('http', 'ws')}/v1/device") as ws:
                await ws.send_str(json.dumps({"type": "register", "device": "cam-3"}))
                reply = json.loads((await ws.receive(timeout=5)).data)
                assert reply["code"] == "server_full" and reply["ref"] == "register"
                assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE,
                                                              aiohttp.WSMsgType.CLOSED)
            assert "cam-3" not in server.directory.own
            async with session.get(f"{server.url}/metrics") as r:
                metrics = await r.text()
            assert refusals(metrics, "server_busy") == 1
            assert refusals(metrics, "server_full") >= 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(d.close() for d in devices))


@pytest.mark.e2e
async def test_a_flooding_device_is_rate_limited_and_stays_connected():
    settings = ServerSettings(role="lower", name="lower-a", media=LOOPBACK,
                              limits=Limits(max_message_rate=5))
    async with running_server(settings) as server, aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url.replace('http', 'ws')}/v1/device") as ws:
            await ws.send_str(json.dumps({"type": "register", "device": "flood"}))
            assert json.loads((await ws.receive(timeout=5)).data)["type"] == "registered"
            for seq in range(40):
                await ws.send_str(json.dumps({"type": "heartbeat", "seq": seq}))
            replies = []
            with pytest.raises(TimeoutError):
                while True:
                    replies.append(json.loads((await ws.receive(timeout=1)).data))
            limited = [r for r in replies if r.get("code") == "rate_limited"]
            echoed = [r for r in replies if r["type"] == "heartbeat"]
            assert len(limited) == 1 and limited[0]["ref"] == "heartbeat"
            assert 8 <= len(echoed) <= 14  # the burst (10) and a little refill, not all 40
            assert "flood" in server.directory.own  # still registered
        async with session.get(f"{server.url}/metrics") as r:
            assert refusals(await r.text(), "rate_limited") >= 25


@pytest.mark.e2e
async def test_a_draining_server_refuses_new_calls_and_devices_at_once():
    settings = ServerSettings(role="lower", name="lower-a", media=LOOPBACK)
    async with running_server(settings) as server, aiohttp.ClientSession() as session:
        server.core.draining = True  # what SIGTERM sets (see test_e2e_shutdown.py)
        async with session.post(f"{server.url}/v1/calls", json={
                "caller": "lower-a/cam-0", "callee": "lower-a/cam-1"}) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "5"
            assert (await r.json())["error"]["code"] == "server_shutting_down"
        async with session.ws_connect(f"{server.url.replace('http', 'ws')}/v1/device") as ws:
            await ws.send_str(json.dumps({"type": "register", "device": "late"}))
            assert json.loads((await ws.receive(timeout=5)).data)["code"] == \
                "server_shutting_down"


@pytest.mark.e2e
async def test_ended_calls_are_kept_for_a_while_then_let_go():
    settings = ServerSettings(role="lower", name="lower-a", media=LOOPBACK, keep_ended_s=0.5)
    async with running_server(settings) as server, aiohttp.ClientSession() as session:
        devices = [Device(server.url, f"cam-{i}", DEVICE_SETTINGS) for i in range(2)]
        tasks = [asyncio.create_task(d.run(session)) for d in devices]
        try:
            await asyncio.wait_for(asyncio.gather(*(d.registered.wait() for d in devices)), 10)
            async with session.post(f"{server.url}/v1/calls", json={
                    "caller": "lower-a/cam-0", "callee": "lower-a/cam-1",
                    "media_mode": "none"}) as r:
                call = (await r.json())["call"]
            async with session.delete(f"{server.url}/v1/calls/{call}") as r:
                assert (await r.json())["reason"] == "hangup"
            await asyncio.sleep(0.2)
            async with session.get(f"{server.url}/v1/calls/{call}") as r:
                assert r.status == 200 and (await r.json())["state"] == "ended"  # kept
            await asyncio.sleep(0.8)  # past keep_ended_s: the server's clock tick lets it go
            async with session.get(f"{server.url}/v1/calls/{call}") as r:
                assert r.status == 404
            assert len(server.core.ended) == 0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(d.close() for d in devices))
