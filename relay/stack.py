"""The local stack: a tree of servers (by default upper, lower-a and lower-b; any shape with a
topology, relay/topology.py) and devices under each lower server, as separate processes on free
loopback ports. Used by ``python -m relay stack`` and ``probe --local``.

Every child is started with a parent-death signal, so even a killed launcher leaves no process
behind; a normal stop sends SIGTERM and, after a grace period, SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

from relay.auth import token_for
from relay.logs import event
from relay.topology import DEFAULT, TreeNode

log = logging.getLogger("relay.stack")


class StackError(RuntimeError):
    """The stack could not start; the message says which process and where its log is."""


@dataclass(frozen=True)
class StackSettings:
    devices: int = 1  #: devices under each lower server
    media_addresses: tuple[str, ...] = ("127.0.0.1",)
    size: str = "640x480"
    fps: float = 30.0
    #: device video: synthetic (one process per server, encoding live), or preencoded/packets
    #: (one process for every device: cheap, and latency is measured between servers)
    video: str = "synthetic"
    log_dir: Path | None = None  #: where children's logs go (default: a new temp dir)
    start_timeout_s: float = 30.0
    topology: TreeNode = DEFAULT
    #: more arguments for every server (``--congestion-control off``, say)
    server_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 500:
            raise ValueError("devices must be between 1 and 500 per lower server")

    def devices_of(self, leaf: TreeNode) -> int:
        return self.devices if leaf.devices is None else leaf.devices


def _die_with_parent() -> None:
    """Runs in the child before exec: get SIGTERM when the launcher dies (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    log_file: IO[bytes]
    url: str | None = None
    role: str | None = None  #: a server's role; None for a devices process
    parent: str | None = None  #: a server's parent's name


@dataclass
class LocalStack:
    settings: StackSettings = field(default_factory=StackSettings)
    children: list[Child] = field(default_factory=list)
    log_dir: Path | None = None

    async def __aenter__(self) -> LocalStack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.log_dir = self.settings.log_dir or Path(tempfile.mkdtemp(prefix="vphone-stack-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        media = [a for addr in self.settings.media_addresses for a in ("--media-address", addr)]
        urls: dict[str, str] = {}
        # Level by level from the root: a level's servers start together, each told its
        # parent's URL.
        levels: dict[int, list[tuple[TreeNode, str | None]]] = {}
        for node, parent, depth in self.settings.topology.walk():
            levels.setdefault(depth, []).append((node, parent))
        for depth in sorted(levels):
            started = await asyncio.gather(*(self._server(node, parent, [
                node.role, "--name", node.name, *(["--parent", urls[parent]] if parent else []),
                *media, *self.settings.server_args]) for node, parent in levels[depth]))
            urls.update(zip((n.name for n, _ in levels[depth]), started, strict=True))
        await self._devices(urls, media)
        expected = sum(self.settings.devices_of(leaf)
                       for leaf in self.settings.topology.leaves())
        await self._wait_registered(urls[self.settings.topology.name], expected)

    async def _devices(self, urls: dict[str, str], media: list[str]) -> None:
        """Synthetic devices encode live: one process per lower server. Pre-encoded and packet
        devices are cheap and share a send log (latency between servers): one process."""
        s = self.settings
        common = ["--device", "cam", "--size", s.size, "--fps", str(s.fps), "--video", s.video,
                  *media]
        leaves = [(leaf, s.devices_of(leaf)) for leaf in s.topology.leaves()]
        leaves = [(leaf, n) for leaf, n in leaves if n > 0]
        first = 1
        if s.video == "synthetic":
            for leaf, count in leaves:
                await self._spawn(f"devices-{leaf.name}", [
                    "-m", "endpoint", "--server", urls[leaf.name], "--start", str(first),
                    "--count", str(count), *common])
                first += count
        elif leaves:
            servers = [a for leaf, _ in leaves for a in ("--server", urls[leaf.name])]
            counts = ",".join(str(n) for _, n in leaves)
            await self._spawn("devices", ["-m", "endpoint", *servers, "--counts", counts,
                                          "--start", "1", *common])

    async def _spawn(self, name: str, args: list[str]) -> Child:
        assert self.log_dir is not None
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("ab")  # closed in stop()
        process = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=asyncio.subprocess.PIPE, stderr=log_file,
            stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        child = Child(name, process, log_path, log_file)
        self.children.append(child)
        return child

    async def _server(self, node: TreeNode, parent: str | None, args: list[str]) -> str:
        name = node.name
        child = await self._spawn(name, ["-m", "relay", *args])
        child.role, child.parent = node.role, parent
        assert child.process.stdout is not None
        try:
            async with asyncio.timeout(self.settings.start_timeout_s):
                line = await child.process.stdout.readline()
        except TimeoutError:
            raise StackError(f"{name} did not start in time; see {child.log_path}") from None
        if not line:
            raise StackError(f"{name} exited with {await child.process.wait()}; "
                             f"see {child.log_path}")
        child.url = json.loads(line)["url"]
        event(log, "stack.started", process=name, role=node.role, parent=parent, url=child.url,
              pid=child.process.pid)
        return child.url

    async def _wait_registered(self, upper: str, expected: int) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        # the servers inherit our environment: with a secret in it, they want a probe token
        token = token_for("probe", os.environ.get("PROBE_TOKEN"))
        headers = {"Authorization": f"Bearer {token}"} if token else None
        async with aiohttp.ClientSession(headers=headers) as session:
            while True:
                async with session.get(f"{upper}/v1/devices") as response:
                    body = await response.json()
                if response.status != 200:
                    raise StackError(f"{upper}/v1/devices answered {response.status}: {body}")
                devices = body["devices"]
                if len(devices) >= expected:
                    return
                for child in self.children:
                    if child.process.returncode is not None:
                        raise StackError(f"{child.name} exited with {child.process.returncode};"
                                         f" see {child.log_path}")
                if time.monotonic() > deadline:
                    raise StackError(f"only {len(devices)} of {expected} devices registered in "
                                     f"{self.settings.start_timeout_s} s; logs in {self.log_dir}")
                await asyncio.sleep(0.1)

    def info(self) -> dict[str, Any]:
        return {"event": "stack_ready", "servers": [
            {"name": c.name, "role": c.role, "url": c.url, "parent": c.parent}
            for c in self.servers], "logs": str(self.log_dir)}

    @property
    def servers(self) -> list[Child]:
        return [c for c in self.children if c.role is not None]

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.servers if c.url]

    def url(self, name: str) -> str:
        for child in self.servers:
            if child.name == name and child.url:
                return child.url
        raise KeyError(f"no server {name!r} in this stack")

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every child (devices first), wait, then SIGKILL what is left."""
        for child in reversed(self.children):
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.terminate()
        for child in reversed(self.children):
            try:
                async with asyncio.timeout(grace_s):
                    await child.process.wait()
            except TimeoutError:
                event(log, "stack.kill", logging.WARNING, process=child.name)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
            child.log_file.close()
        self.children.clear()
