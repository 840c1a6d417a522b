"""Headless Chromium for tests: found on the PATH, or installed with apt (Debian's package, as
ENVIRONMENT.md describes); a test skips with the reason when neither works."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and cannot be installed here (needs root + apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    done = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:  # stale or missing package lists: refresh once, then retry
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=300, env=env)
        done = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
    found = shutil.which("chromium")
    if done.returncode != 0 or not found:
        pytest.skip(f"installing Chromium failed: {done.stderr[-500:]}")
    return found


def run(url: str, *args: str, timeout: float = 60) -> str:
    """Chromium on ``url`` with ``args`` (e.g. --dump-dom); its stdout."""
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        done = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args, url],
                              capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-1000:]}")
    return done.stdout


def screenshot(url: str, path: Path, size: str = "1200,2400") -> Path:
    run(url, f"--screenshot={path}", f"--window-size={size}")
    return path


class Page:
    """One page of a browser started with ``--remote-debugging-port=0``, driven over the
    DevTools protocol: read what the page shows, click what a person would click."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    @classmethod
    @contextlib.asynccontextmanager
    async def attach(cls, session: aiohttp.ClientSession, profile: Path,
                     timeout: float = 30) -> AsyncIterator[Page]:
        """The first page of the browser whose profile is ``profile``."""
        async with asyncio.timeout(timeout):
            active = profile / "DevToolsActivePort"
            while not active.exists() or not active.read_text().strip():  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            port = int(active.read_text().split()[0])
            while True:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                    pages = [t for t in await response.json() if t.get("type") == "page"]
                if pages:
                    break
                await asyncio.sleep(0.1)
        async with session.ws_connect(pages[0]["webSocketDebuggerUrl"],
                                      max_msg_size=0) as ws:
            yield cls(ws)

    async def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """The value of ``expression`` in the page (awaited when it is a promise)."""
        ident = next(self.ids)
        await self.ws.send_json({"id": ident, "method": "Runtime.evaluate", "params": {
            "expression": expression, "awaitPromise": True, "returnByValue": True}})
        async with asyncio.timeout(timeout):
            while True:
                reply = await self.ws.receive_json()
                if reply.get("id") == ident:
                    break
        result = reply.get("result", {})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    async def until(self, expression: str, timeout: float = 30, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy: its value."""
        try:
            async with asyncio.timeout(timeout):
                while not (value := await self.evaluate(expression)):  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
                return value
        except TimeoutError:
            state = await self.evaluate("JSON.stringify({state: window.vphone.state, "
                                        "errors: window.vphone.errors})")
            raise AssertionError(f"waited {timeout} s for {what or expression}; page: "
                                 f"{state}") from None
