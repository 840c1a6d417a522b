"""A browser is a device: headless Chromium with a fake camera and microphone opens a lower
server's /device page, registers without a click (?device=), and holds a forwarded call with a
synthetic Python device under the other lower server; frames arrive on both sides, and each side
times the other's from the stamps (the page stamps what it sends and reads what it gets)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile

import pytest

from probe.client import ServerClient

from . import browser
from .conftest import make_tree

pytestmark = pytest.mark.e2e

BROWSER_DEVICE_FLAGS = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                        "--autoplay-policy=no-user-gesture-required",
                        "--allow-loopback-in-peer-connection")


@contextlib.asynccontextmanager
async def chromium_on(url: str):
    # Chromium's helper processes (renderer, GPU, crash handler) outlive the main one for a
    # moment and write into the profile: they run in a session of their own, killed as a
    # group, so the profile can be removed.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        process = await asyncio.create_subprocess_exec(
            browser.chromium(), *browser.FLAGS, *BROWSER_DEVICE_FLAGS,
            f"--user-data-dir={profile}", url,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            yield process
        finally:
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


async def test_a_browser_device_calls_a_python_device_across_servers():
    async with make_tree() as tree:
        await tree.add_device("lower-b", "cam-2")
        page = f"{tree.lowers['lower-a'].url}/device?device=web-1"
        async with chromium_on(page):
            await tree.until(lambda: "web-1" in tree.lowers["lower-a"].directory.own, 60,
                             "the browser device to register")
            await tree.until(lambda: tree.known("lower-a/web-1"), 10)
            client = ServerClient(tree.session, tree.lowers["lower-a"].url)
            info = await client.create_call("lower-a/web-1", "lower-b/cam-2")
            info = await client.call(info.call, wait="active", timeout_s=30)
            assert info.state == "active", info
            await asyncio.sleep(3)
            info = await client.hangup(info.call)
            await asyncio.sleep(1.5)  # the browser's last stats
            info = await client.call(info.call)
        assert info.reason == "hangup" and info.transcoded == []
        to_python = info.media["caller_to_callee"]  # the browser's camera, decoded in Python
        to_browser = info.media["callee_to_caller"]  # the Python picture, from getStats
        assert to_python.frames > 30 and to_python.fps > 10, to_python
        assert to_browser.frames > 30 and to_browser.fps > 10, to_browser
        assert to_browser.audio_frames > 50 and to_python.audio_frames > 50
        # glass-to-glass both ways from the stamps: the page stamps the camera's picture it
        # sends (read back in Python) and reads the Python picture's stamps it receives
        assert to_python.unreadable < to_python.frames * 0.1, to_python
        assert to_python.latency_ms_p50 is not None and 0 < to_python.latency_ms_p50 < 1000, \
            to_python
        assert to_browser.latency_ms_p50 is not None and 0 < to_browser.latency_ms_p50 < 1000, \
            to_browser
        assert to_browser.latency_ms_p95 >= to_browser.latency_ms_p50
        assert to_browser.frames_lost < 0.05 * to_browser.frames, to_browser
        assert to_python.frames_lost < 0.05 * to_python.frames, to_python
        # the browser's audio from its getStats: jitter known, nothing lost on loopback
        assert to_browser.audio_jitter_ms is not None and to_browser.audio_frames_lost == 0
        for server in (tree.lowers["lower-a"], tree.upper, tree.lowers["lower-b"]):
            assert server.forwarding.packets > 100, server.name  # forwarded like any call
