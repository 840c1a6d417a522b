"""Headless Chromium for tests: found on the PATH, or installed with apt (Debian's package, as
ENVIRONMENT.md describes); a test skips with the reason when neither works."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def installed(names: tuple[str, ...], package: str, what: str) -> str:
    """The first of ``names`` on the PATH, or ``package`` installed with apt (a test skips with
    the reason when neither works)."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{what} is not installed and cannot be installed here (needs root + apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    done = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env)
    if done.returncode != 0:  # stale or missing package lists: refresh once, then retry
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=300, env=env)
        done = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env)
    found = next((f for f in map(shutil.which, names) if f), None)
    if done.returncode != 0 or not found:
        pytest.skip(f"installing {what} failed: {done.stderr[-500:]}")
    return found


def chromium() -> str:
    return installed(("chromium", "chromium-browser"), "chromium", "Chromium")


async def stop(process: asyncio.subprocess.Process) -> None:
    """Stop a browser and every helper process of its session (started with
    ``start_new_session``): they outlive the main one for a moment and write into the
    profile, which can be removed once they are gone."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await asyncio.sleep(0.2)


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


#: Firefox as a device with no person at it: a fake camera and microphone, no permission
#: prompt, autoplay, loopback ICE allowed, host addresses not hidden behind mDNS names, and
#: getUserMedia on a plain-http origin that is not localhost (a server on a lab address).
FIREFOX_PREFS = {
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.autoplay.default": 0,
    "media.peerconnection.ice.loopback": True,
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    "media.devices.insecure.enabled": True,
    "media.getusermedia.insecure.enabled": True,
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.enabled": False,
}


def firefox() -> str:
    """Firefox ESR: found on the PATH, or installed with apt (Debian's firefox-esr)."""
    return installed(("firefox-esr", "firefox"), "firefox-esr", "Firefox ESR")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BidiPage:
    """The page of a Firefox started with ``--remote-debugging-port``, over WebDriver BiDi
    (Firefox speaks no DevTools protocol): ``evaluate`` and ``until`` as :class:`Page`'s."""

    def __init__(self, ws: Any, context: str) -> None:
        self.ws = ws
        self.context = context
        self.ids = itertools.count(10)

    @staticmethod
    async def _call(ws: Any, ident: int, method: str, params: dict[str, Any]) -> Any:
        await ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            reply = await ws.receive_json()
            if reply.get("id") == ident:
                if reply.get("type") == "error":
                    raise RuntimeError(f"{method}: {reply.get('error')}: {reply.get('message')}")
                return reply["result"]

    @classmethod
    @contextlib.asynccontextmanager
    async def attach(cls, session: aiohttp.ClientSession, port: int,
                     timeout: float = 60) -> AsyncIterator[BidiPage]:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    ws = await session.ws_connect(f"ws://127.0.0.1:{port}/session",
                                                  max_msg_size=0)
                    break
                except (aiohttp.ClientError, OSError):
                    await asyncio.sleep(0.3)
        try:
            await cls._call(ws, 1, "session.new", {"capabilities": {}})
            tree = await cls._call(ws, 2, "browsingContext.getTree", {})
            yield cls(ws, tree["contexts"][0]["context"])
        finally:
            await ws.close()

    async def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """``expression``'s value in the page, as JSON (so objects come back whole)."""
        async with asyncio.timeout(timeout):
            result = await self._call(self.ws, next(self.ids), "script.evaluate", {
                "expression": f"Promise.resolve({expression}).then((v) => JSON.stringify(v))",
                "target": {"context": self.context}, "awaitPromise": True})
        if result.get("type") == "exception":
            raise RuntimeError(f"{expression!r} threw: {result.get('exceptionDetails')}")
        value = result.get("result", {}).get("value")
        return None if value is None else json.loads(value)

    async def navigate(self, url: str) -> None:
        await self._call(self.ws, next(self.ids), "browsingContext.navigate",
                         {"context": self.context, "url": url, "wait": "complete"})

    until = Page.until


@contextlib.asynccontextmanager
async def firefox_on(session: aiohttp.ClientSession, url: str) -> AsyncIterator[BidiPage]:
    """Headless Firefox ESR on ``url`` (FIREFOX_PREFS), driven over WebDriver BiDi; the
    browser and its profile are gone at the end."""
    binary = firefox()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        (Path(profile) / "user.js").write_text("".join(
            f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in FIREFOX_PREFS.items()))
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            binary, "--headless", "--no-remote", "--profile", profile,
            "--remote-debugging-port", str(port), "about:blank",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            async with BidiPage.attach(session, port) as page:
                await page.navigate(url)
                yield page
        finally:
            await stop(process)
