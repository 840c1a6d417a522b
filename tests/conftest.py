"""Fixtures: a whole tree (by default upper, lower-a, lower-b; any topology) and devices, in this
process, on 127.0.0.1.

In-process so the tests can look inside: every leg, peer connection and task a call made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import hypothesis
import pytest

from endpoint.device import Device, DeviceSettings
from lab.topology import DEFAULT, TreeNode
from relay.admission import Limits
from relay.call import Timeouts
from relay.node import Node
from relay.server import running_server
from relay.settings import ServerSettings
from rtc.adapter import MediaSettings
from wire.auth import Auth

# Property tests explore new examples on every local run; in CI they run a fixed set, so a
# landing is judged on the same cases each time (what they found locally is fixed first).
hypothesis.settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")

LOOPBACK = MediaSettings(addresses=("127.0.0.1",))
#: Small pictures keep four transcoding hops cheap enough for one test process.
DEVICE_SETTINGS = DeviceSettings(width=320, height=240, fps=15, media=LOOPBACK,
                                 stats_interval_s=0.5)


@dataclass
class Tree:
    upper: Node  #: the root
    lowers: dict[str, Node]
    session: aiohttp.ClientSession
    devices: dict[str, Device] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    servers: dict[str, Node] = field(default_factory=dict)  #: every server, by name
    #: each server's running context, so one can stop and another start in its place
    contexts: dict[str, contextlib.AbstractAsyncContextManager[Node]] = field(
        default_factory=dict)

    async def start_server(self, settings: ServerSettings) -> Node:
        context = running_server(settings)
        node = await context.__aenter__()
        self.contexts[settings.name], self.servers[settings.name] = context, node
        if settings.role == "lower":
            self.lowers[settings.name] = node
        return node

    async def stop_server(self, name: str) -> None:
        """Stop one server as SIGTERM would (it drains, then closes every link)."""
        self.servers.pop(name)
        self.lowers.pop(name, None)
        await self.contexts.pop(name).__aexit__(None, None, None)

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
        await self.until(lambda: self.known(f"{server}/{device_id}"), 10,
                         f"{server}/{device_id} in the root's directory")
        return device

    def known(self, address: str) -> bool:
        """The root knows the device: a call to it from anywhere in the tree can be routed."""
        return address in self.upper.directory.devices

    async def until(self, predicate, timeout: float = 10.0, what: str = "condition") -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():  # noqa: ASYNC110 - polls state owned by other objects
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"waited {timeout} s for {what}") from None


@contextlib.asynccontextmanager
async def make_tree(timeouts: Timeouts | None = None, auth: Auth | None = None,
                    max_calls: int = Limits.max_calls,
                    topology: TreeNode = DEFAULT,
                    max_calls_at: dict[str, int] | None = None,
                    options: dict[str, Any] | None = None) -> AsyncIterator[Tree]:
    """``max_calls``: the lower servers' limit on calls in progress; ``max_calls_at``: the
    limit of particular servers (of either role); ``options``: more ServerSettings fields for
    every server (``limits`` among them wins over both)."""
    timeouts = timeouts or Timeouts()
    auth = auth or Auth()
    async with contextlib.AsyncExitStack() as stack:
        headers = {"Authorization": f"Bearer {auth.token('probe')}"} if auth.on else None
        session = await stack.enter_async_context(aiohttp.ClientSession(headers=headers))
        tree: Tree | None = None
        try:
            for node, parent, _ in topology.walk():
                limits = Limits(max_calls=max_calls) if node.role == "lower" else Limits()
                if max_calls_at and node.name in max_calls_at:
                    limits = Limits(max_calls=max_calls_at[node.name])
                settings = ServerSettings(
                    role=node.role, name=node.name,  # type: ignore[arg-type]
                    parent=tree.servers[parent].url if tree and parent else None,
                    media=LOOPBACK, timeouts=timeouts, auth=auth,
                    **{"limits": limits, **(options or {})})
                if tree is None:
                    root = running_server(settings)
                    tree = Tree(await root.__aenter__(), {}, session)
                    tree.servers[node.name], tree.contexts[node.name] = tree.upper, root
                else:
                    await tree.start_server(settings)
            assert tree is not None
            servers = tree.servers
            await tree.until(lambda: all(s.directory.parent is not None
                                         for n, s in servers.items() if n != topology.name),
                             10, "every server linked to its parent")
            await tree.until(lambda: all(len(s.directory.servers()) == len(servers)
                                         for s in servers.values()), 10,
                             "every server knowing the whole tree")
            yield tree
        finally:
            if tree is not None:
                for task in tree.tasks:
                    task.cancel()
                await asyncio.gather(*tree.tasks, return_exceptions=True)
                await asyncio.gather(*(d.close() for d in tree.devices.values()))
                for context in reversed(list(tree.contexts.values())):
                    await context.__aexit__(None, None, None)


@pytest.fixture
async def tree() -> AsyncIterator[Tree]:
    async with make_tree() as t:
        await t.add_device("lower-a", "cam-1")
        await t.add_device("lower-b", "cam-2")
        await t.add_device("lower-a", "cam-3")
        yield t
