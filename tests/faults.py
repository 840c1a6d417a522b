"""Real faults, made and removed by the tests and benchmarks/faults.py.

- :func:`namespace`: a network namespace of the test's own, joined to the host by a veth pair
  (lab/netns.py). A server (and its devices) run inside it, so one link of a call crosses the
  veth, where packets can be dropped with iptables (this kernel has no netem) without touching
  any other link. Everything made is removed in a ``finally``; iptables rules live in the
  namespace and go with it.
- :func:`duty_cycle`: a process stopped and continued on a duty cycle (SIGSTOP/SIGCONT): a slow
  server for real.
- :class:`Processes`: servers and devices as processes, inside the namespace or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from typing import NoReturn

import aiohttp

from lab import netns
from lab.netns import Namespace, NamespaceError, need, qdisc_stats
from wire.client import ProbeError, Server, discover

__all__ = ["Namespace", "qdisc_stats"]

class FaultsUnavailable(RuntimeError):
    """This machine cannot make the fault (outside pytest, where the test skips instead)."""


def _unavailable(reason: str) -> NoReturn:
    """Skip the test that wanted the fault; a benchmark (no pytest: the README's main set-up
    does not install it) gets FaultsUnavailable, saying why."""
    if "pytest" in sys.modules:
        import pytest

        pytest.skip(reason)
    raise FaultsUnavailable(reason)


@contextlib.contextmanager
def namespace() -> Iterator[Namespace]:
    """lab/netns.py's namespace, with iptables at hand; a machine that cannot make one skips
    the test (or raises FaultsUnavailable outside pytest)."""
    try:
        need("iptables", "iptables")
        made = netns.namespace()
        ns = made.__enter__()
    except NamespaceError as exc:
        _unavailable(f"cannot make a network namespace here: {exc}")
    try:
        yield ns
    finally:
        made.__exit__(None, None, None)


@contextlib.asynccontextmanager
async def duty_cycle(pid: int, stopped_s: float, period_s: float) -> AsyncIterator[None]:
    """Stop ``pid`` for ``stopped_s`` of every ``period_s`` until the block ends; it is always
    continued at the end."""
    async def cycle() -> None:
        while True:
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(stopped_s)
            finally:
                os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(period_s - stopped_s)

    task = asyncio.create_task(cycle())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        os.kill(pid, signal.SIGCONT)


class Processes:
    """Servers and devices as processes (some inside the namespace), all stopped at the end."""

    def __init__(self) -> None:
        self.children: list[asyncio.subprocess.Process] = []

    async def start(self, argv: list[str], ready: bool) -> str | None:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE if ready else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        self.children.append(process)
        if not ready:
            return None
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        return json.loads(line)["url"]

    async def stop(self) -> None:
        for process in self.children:
            if process.returncode is None:
                process.terminate()
        for process in self.children:
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def until_devices(session: aiohttp.ClientSession, urls: list[str], count: int,
                        timeout_s: float = 30.0) -> list[Server]:
    """Discover the tree until ``count`` devices are known under its lower servers."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        with contextlib.suppress(ProbeError):
            servers = await discover(session, urls)
            if sum(len(s.devices) for s in servers) >= count:
                return servers
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"fewer than {count} devices registered in {timeout_s} s")
        await asyncio.sleep(0.2)


async def split_tree(ns: Namespace, processes: Processes, video: str = "packets",
                     size: str = "320x240", servers: tuple[str, ...] = ()) -> list[str]:
    """upper and lower-b (with device cam-b) on the host, lower-a (with cam-a) inside ``ns``:
    of a call lower-a/cam-a -> lower-b/cam-b, only the link lower-a - upper crosses the veth.
    ``servers``: more arguments for every server. The servers' URLs (upper, lower-a, lower-b)."""
    relay = [sys.executable, "-m", "relay"]
    device = [sys.executable, "-m", "endpoint", "--video", video, "--size", size]
    host, inside = ns.host_ip, ns.inside_ip
    upper = await processes.start([*relay, "upper", "--name", "upper", "--host", host,
                                   "--media-address", host, *servers], ready=True)
    assert upper is not None
    parent = upper.replace("http://", "ws://")
    lower_b = await processes.start([*relay, "lower", "--name", "lower-b", "--host", host,
                                     "--parent", parent, "--media-address", host, *servers],
                                    ready=True)
    lower_a = await processes.start([*ns.prefix(), *relay, "lower", "--name", "lower-a",
                                     "--host", inside, "--parent", parent,
                                     "--media-address", inside, *servers], ready=True)
    assert lower_a is not None and lower_b is not None
    await processes.start([*device, "--server", lower_b, "--device", "cam-b",
                           "--media-address", host], ready=False)
    await processes.start([*ns.prefix(), *device, "--server", lower_a, "--device", "cam-a",
                           "--media-address", inside], ready=False)
    return [upper, lower_a, lower_b]


@contextlib.asynccontextmanager
async def split_lab(video: str = "packets", size: str = "320x240",
                    servers: tuple[str, ...] = ()
                    ) -> AsyncIterator[tuple[Namespace, aiohttp.ClientSession, list[Server]]]:
    """The :func:`split_tree` in a namespace of its own, both devices registered: the
    namespace (to make the fault), a client session, and the servers as discovered. Every
    process and the namespace are gone at the end."""
    with namespace() as ns:
        processes = Processes()
        try:
            urls = await split_tree(ns, processes, video, size, servers)
            async with aiohttp.ClientSession() as session:
                yield ns, session, await until_devices(session, urls, 2)
        finally:
            await processes.stop()
