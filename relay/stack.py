"""The local stack: upper, lower-a and lower-b, with synthetic devices under each lower server, as
separate processes on free loopback ports. Used by ``python -m relay stack`` and ``probe --local``.

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

from relay.logs import event

log = logging.getLogger("relay.stack")

LOWER_NAMES = ("lower-a", "lower-b")


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

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 500:
            raise ValueError("devices must be between 1 and 500 per lower server")


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
        upper = await self._server("upper", ["upper", "--name", "upper", *media])
        for name in LOWER_NAMES:
            await self._server(name, ["lower", "--name", name, "--parent", upper, *media])
        n = self.settings.devices
        common = ["--device", "cam", "--count", str(n), "--size", self.settings.size,
                  "--fps", str(self.settings.fps), "--video", self.settings.video, *media]
        lowers = list(self.children[1:])
        if self.settings.video == "synthetic":
            for i, child in enumerate(lowers):
                await self._spawn(f"devices-{child.name}", [
                    "-m", "endpoint", "--server", child.url or "", "--start", str(i * n + 1),
                    *common])
        else:
            servers = [a for child in lowers for a in ("--server", child.url or "")]
            await self._spawn("devices", ["-m", "endpoint", *servers, "--start", "1", *common])
        await self._wait_registered(upper, n * len(LOWER_NAMES))

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

    async def _server(self, name: str, args: list[str]) -> str:
        child = await self._spawn(name, ["-m", "relay", *args])
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
        event(log, "stack.started", process=name, url=child.url, pid=child.process.pid)
        return child.url

    async def _wait_registered(self, upper: str, expected: int) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(f"{upper}/v1/devices") as response:
                    devices = (await response.json())["devices"]
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
        servers = [{"name": c.name, "role": "upper" if c.name == "upper" else "lower",
                    "url": c.url} for c in self.children if c.url]
        return {"event": "stack_ready", "servers": servers, "logs": str(self.log_dir)}

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.children if c.url]

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
