"""Recovery: when the upper server goes away, the calls through it end with its reason
(server_shutting_down: it drained) at the lower servers, and one killed outright ends them with
trunk_lost; when it comes back on the same address, each lower server reconnects (with
backoff), announces its devices again, and calls across servers work again."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import aiohttp
import pytest

from endpoint.device import Device
from relay.server import running_server
from relay.settings import ServerSettings

from .conftest import DEVICE_SETTINGS, LOOPBACK

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(predicate, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polls servers' own state
            await asyncio.sleep(0.05)


async def test_lower_servers_reconnect_to_a_restarted_upper_and_announce_again():
    port = free_port()
    upper_settings = ServerSettings(role="upper", name="upper", port=port, media=LOOPBACK)
    async with contextlib.AsyncExitStack() as stack:
        upper_ctx = running_server(upper_settings)
        upper = await upper_ctx.__aenter__()
        lowers = {}
        for name in ("lower-a", "lower-b"):
            lowers[name] = await stack.enter_async_context(running_server(ServerSettings(
                role="lower", name=name, parent=upper.url, media=LOOPBACK)))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        devices = [Device(lowers["lower-a"].url, "cam-1", DEVICE_SETTINGS),
                   Device(lowers["lower-b"].url, "cam-2", DEVICE_SETTINGS)]
        tasks = [asyncio.create_task(d.run(session)) for d in devices]
        try:
            await until(lambda: len(upper.directory.devices) == 2, 10)
            async with session.post(f"{lowers['lower-a'].url}/v1/calls", json={
                    "caller": "lower-a/cam-1", "callee": "lower-b/cam-2",
                    "media_mode": "none"}) as r:
                call = (await r.json())["call"]
            await until(lambda: lowers["lower-a"].find_call(call) is not None and
                        lowers["lower-a"].find_call(call).state.value == "active", 10)
            await upper_ctx.__aexit__(None, None, None)  # the upper server goes away
            for lower in lowers.values():
                await until(lambda lower=lower: lower.find_call(call) is None
                            or lower.find_call(call).state.value == "ended", 5)
                ended = lower.find_call(call)
                # the upper server drained: it ended the call at both ends, saying why
                assert ended is not None and ended.reason == "server_shutting_down", (
                    lower.name, ended)
            upper = await stack.enter_async_context(running_server(upper_settings))
            await until(lambda: len(upper.directory.devices) == 2, 15)  # both announced again
            assert set(upper.directory.below) == {"lower-a", "lower-b"}
            await until(lambda: lowers["lower-a"].directory.server("lower-b") is not None, 10)
            async with session.post(f"{lowers['lower-a'].url}/v1/calls", json={
                    "caller": "lower-a/cam-1", "callee": "lower-b/cam-2",
                    "media_mode": "none"}) as r:
                assert r.status == 201
                again = (await r.json())["call"]
            async with session.get(f"{lowers['lower-a'].url}/v1/calls/{again}"
                                   "?wait=active&timeout=10") as r:
                assert (await r.json())["state"] == "active"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(d.close() for d in devices))
