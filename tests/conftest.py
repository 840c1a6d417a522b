"""Fixtures: a whole tree (upper, lower-a, lower-b) and devices, in this process, on 127.0.0.1.

In-process so the tests can look inside: every leg, peer connection and task a call made.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest

from endpoint.device import Device, DeviceSettings
from relay.auth import Auth
from relay.call import Timeouts
from relay.lower import LowerServer
from relay.rtc import MediaSettings
from relay.server import running_server
from relay.settings import ServerSettings
from relay.upper import UpperServer

LOOPBACK = MediaSettings(addresses=("127.0.0.1",))
#: Small pictures keep four transcoding hops cheap enough for one test process.
DEVICE_SETTINGS = DeviceSettings(width=320, height=240, fps=15, media=LOOPBACK,
                                 stats_interval_s=0.5)


@dataclass
class Tree:
    upper: UpperServer
    lowers: dict[str, LowerServer]
    session: aiohttp.ClientSession
    devices: dict[str, Device] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [self.upper.url, *(s.url for s in self.lowers.values())]

    def start(self, server: str, device: Device) -> Device:
        """Run ``device`` under ``server``; the tree closes it at the end."""
        self.devices[f"{server}/{device.id}"] = device
        self.tasks.append(asyncio.create_task(device.run(self.session)))
        return device

    async def add_device(self, server: str, device_id: str,
                        settings: DeviceSettings = DEVICE_SETTINGS) -> Device:
        device = self.start(server, Device(self.lowers[server].url, device_id, settings))
        await asyncio.wait_for(device.registered.wait(), 10)
        return device

    async def until(self, predicate, timeout: float = 10.0, what: str = "condition") -> None:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - polls state owned by other objects
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def make_tree(timeouts: Timeouts | None = None, auth: Auth | None = None,
                    max_calls: int = ServerSettings.max_calls) -> AsyncIterator[Tree]:
    """``max_calls``: the lower servers' limit on calls in progress."""
    timeouts = timeouts or Timeouts()
    auth = auth or Auth()
    async with contextlib.AsyncExitStack() as stack:
        upper = await stack.enter_async_context(running_server(ServerSettings(
            role="upper", name="upper", media=LOOPBACK, timeouts=timeouts, auth=auth)))
        lowers = {}
        for name in ("lower-a", "lower-b"):
            lowers[name] = await stack.enter_async_context(running_server(ServerSettings(
                role="lower", name=name, parent=upper.url, media=LOOPBACK, timeouts=timeouts,
                auth=auth, max_calls=max_calls)))
        headers = {"Authorization": f"Bearer {auth.token('probe')}"} if auth.on else None
        session = await stack.enter_async_context(aiohttp.ClientSession(headers=headers))
        tree = Tree(upper, lowers, session)  # type: ignore[arg-type]
        await tree.until(lambda: all(s.parent is not None for s in lowers.values()))
        try:
            yield tree
        finally:
            for task in tree.tasks:
                task.cancel()
            await asyncio.gather(*tree.tasks, return_exceptions=True)
            await asyncio.gather(*(d.close() for d in tree.devices.values()))


@pytest.fixture
async def tree() -> AsyncIterator[Tree]:
    async with make_tree() as t:
        await t.add_device("lower-a", "cam-1")
        await t.add_device("lower-b", "cam-2")
        await t.add_device("lower-a", "cam-3")
        await t.until(lambda: len(t.upper.directory) == 3)
        # each lower server learns the devices of the other one through the upper server
        await t.until(lambda: len(t.lowers["lower-a"].tree) == 1
                      and len(t.lowers["lower-b"].tree) == 2)
        yield t
