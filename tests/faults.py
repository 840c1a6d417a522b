"""Real faults, made and removed by the tests and benchmarks/faults.py.

- :func:`namespace`: a network namespace of the test's own, joined to the host by a veth pair.
  A server (and its devices) run inside it, so one link of a call crosses the veth, where
  packets can be dropped with iptables (this kernel has no netem) without touching any other
  link. Addresses come from 198.18.0.0/15, the range set aside for benchmarking (RFC 2544).
  Everything made is removed in a ``finally``; iptables rules live in the namespace and go with
  it.
- :func:`duty_cycle`: a process stopped and continued on a duty cycle (SIGSTOP/SIGCONT): a slow
  server for real.
- :class:`Processes`: servers and devices as processes, inside the namespace or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import NoReturn

import aiohttp

from probe.client import ProbeError, Server, discover

HOST_IP, INSIDE_IP = "198.18.77.1", "198.18.77.2"


@dataclass(frozen=True)
class Namespace:
    name: str
    host_if: str
    inside_if: str
    host_ip: str = HOST_IP
    inside_ip: str = INSIDE_IP

    def prefix(self) -> list[str]:
        """Argv prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def run(self, *argv: str) -> None:
        subprocess.run([*self.prefix(), *argv], check=True, capture_output=True, timeout=30)

    def drop(self, probability: float) -> None:
        """Drop this share of UDP packets crossing the veth, each way, at random."""
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.run("iptables", "-A", chain, flag, self.inside_if, "-p", "udp", "-m",
                     "statistic", "--mode", "random", "--probability", str(probability),
                     "-j", "DROP")

    def limit_rate(self, kbit: int, latency_ms: int = 200) -> None:
        """Limit the veth to ``kbit`` kbit/s each way (tbf: a token bucket, queueing at most
        ``latency_ms`` of traffic, dropping past it), as a narrow link would."""
        for prefix, dev in (([], self.host_if), (self.prefix(), self.inside_if)):
            subprocess.run([*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                            f"{kbit}kbit", "burst", "4kb", "latency", f"{latency_ms}ms"],
                           check=True, capture_output=True, timeout=30)

    def link_stats(self) -> dict[str, dict[str, int]]:
        """The rate limit's counters each way: ``out`` (from the namespace: its veth end) and
        ``in`` (into it: the host's end): bytes and packets sent, packets dropped, and the
        bytes queued now (tc -s)."""
        out = {}
        for way, prefix, dev in (("out", self.prefix(), self.inside_if), ("in", [], self.host_if)):
            out[way] = qdisc_stats(subprocess.run(
                [*prefix, "tc", "-s", "qdisc", "show", "dev", dev], check=True,
                capture_output=True, text=True, timeout=30).stdout)
        return out

    def dropped(self) -> int:
        """Packets the drop rules took so far (both ways)."""
        out = subprocess.run([*self.prefix(), "iptables", "-L", "-v", "-n", "-x"],
                             check=True, capture_output=True, text=True, timeout=30).stdout
        return sum(int(line.split()[0]) for line in out.splitlines()
                   if "DROP" in line and "statistic" in line)


def qdisc_stats(text: str) -> dict[str, int]:
    """What ``tc -s qdisc show`` says of the first qdisc: bytes, packets, dropped, backlog."""
    words = text.replace(",", " ").replace("(", " ").replace(")", " ").split()

    def after(word: str, skip: int = 1) -> int:
        return _size(words[words.index(word) + skip]) if word in words else 0

    return {"bytes": after("Sent"), "packets": after("Sent", 3), "dropped": after("dropped"),
            "backlog": after("backlog")}


def _size(text: str) -> int:
    """A tc figure: 123, 4b, 5Kb, 6Mb (bytes)."""
    scale = {"b": 1, "Kb": 1000, "Mb": 1000_000, "Gb": 1000_000_000}
    for unit in ("Gb", "Mb", "Kb", "b"):
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * scale[unit])
    return int(text) if text.isdigit() else 0


class FaultsUnavailable(RuntimeError):
    """This machine cannot make the fault (outside pytest, where the test skips instead)."""


def _unavailable(reason: str) -> NoReturn:
    """Skip the test that wanted the fault; a benchmark (no pytest: the README's main set-up
    does not install it) gets FaultsUnavailable, saying why."""
    if "pytest" in sys.modules:
        import pytest

        pytest.skip(reason)
    raise FaultsUnavailable(reason)


def _need(tool: str, package: str) -> None:
    if shutil.which(tool):
        return
    done = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", package],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if done.returncode != 0 or not shutil.which(tool):
        _unavailable(f"{tool} is not installed and installing {package} failed: "
                     f"{done.stderr[-300:]}")


@contextlib.contextmanager
def namespace() -> Iterator[Namespace]:
    if os.geteuid() != 0:
        _unavailable("network namespaces need root")
    _need("ip", "iproute2")
    _need("iptables", "iptables")
    tag = uuid.uuid4().hex[:6]
    ns = Namespace(f"vph-{tag}", f"vph{tag}a", f"vph{tag}b")
    made: list[list[str]] = []

    def ip(*argv: str) -> None:
        subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)

    try:
        try:
            ip("netns", "add", ns.name)
        except subprocess.CalledProcessError as exc:
            _unavailable(f"cannot make a network namespace here: {exc.stderr!r}")
        made.append(["netns", "del", ns.name])
        ip("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.inside_if)
        made.append(["link", "del", ns.host_if])
        ip("link", "set", ns.inside_if, "netns", ns.name)
        ip("addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if)
        ip("link", "set", ns.host_if, "up")
        ns.run("ip", "addr", "add", f"{ns.inside_ip}/30", "dev", ns.inside_if)
        ns.run("ip", "link", "set", ns.inside_if, "up")
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        for argv in reversed(made):
            subprocess.run(["ip", *argv], capture_output=True, timeout=30)


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
