"""A browser is a device: headless Chromium with a fake camera and microphone opens a lower
server's /device page, registers without a click (?device=), and holds a forwarded call with a
synthetic Python device under the other lower server; frames arrive on both sides, and each side
times the other's from the stamps (the page stamps what it sends and reads what it gets)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
from pathlib import Path

import pytest

from wire.client import ServerClient

from . import browser
from .conftest import make_tree

pytestmark = pytest.mark.e2e

BROWSER_DEVICE_FLAGS = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                        "--autoplay-policy=no-user-gesture-required",
                        "--allow-loopback-in-peer-connection")


@contextlib.asynccontextmanager
async def chromium_on(url: str, debug: bool = False):
    """Chromium with a fake camera on ``url``; ``debug``: yields the profile directory too,
    for browser.Page.attach (the DevTools protocol on a port of its choosing)."""
    # Chromium's helper processes (renderer, GPU, crash handler) outlive the main one for a
    # moment and write into the profile: they run in a session of their own, killed as a
    # group, so the profile can be removed.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        extra = ("--remote-debugging-port=0", "--remote-allow-origins=*") if debug else ()
        process = await asyncio.create_subprocess_exec(
            browser.chromium(), *browser.FLAGS, *BROWSER_DEVICE_FLAGS, *extra,
            f"--user-data-dir={profile}", url,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            yield (process, Path(profile)) if debug else process
        finally:
            await browser.stop(process)


async def test_a_browser_device_calls_a_python_device_across_servers():
    async with make_tree() as tree:
        await tree.add_device("lower-b", "cam-2")
        page = f"{tree.lowers['lower-a'].url}/device?device=web-1&answer=auto"
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


async def test_the_page_is_a_phone_that_dials_a_python_device_and_hangs_up():
    """A person at the page: the tree's devices are listed with their state, they type an
    address, click Call, see the call's figures, click Hang up."""
    async with make_tree() as tree:
        await tree.add_device("lower-b", "cam-2")
        lower_a = tree.lowers["lower-a"]
        async with chromium_on(f"{lower_a.url}/device?device=web-1", debug=True) as (_, profile), \
                browser.Page.attach(tree.session, profile) as page:
            await tree.until(lambda: tree.known("lower-a/web-1"), 60, "the page registered")
            book = await page.until("window.vphone.devices.length >= 2 && window.vphone.devices",
                                    20, "the tree's devices listed")
            assert {"address": "lower-b/cam-2", "state": "idle"} in book, book
            assert await page.evaluate("document.querySelector('#book').textContent"
                                       ".includes('lower-b/cam-2')")
            await page.evaluate("document.getElementById('dial-to').value = 'lower-b/cam-2';"
                                "document.getElementById('dial-button').click(); true")
            call = await page.until("window.vphone.current", 10, "the dial taken")
            client = ServerClient(tree.session, lower_a.url)
            info = await client.call(call, wait="active", timeout_s=30)
            assert info.state == "active", info
            assert info.started_by == "device" and info.caller == "lower-a/web-1"
            await page.until("window.vphone.callInfo && window.vphone.callInfo.media && "
                             "Object.keys(window.vphone.callInfo.media).length == 2", 20,
                             "the call's figures both ways on the page")
            assert "caller_to_callee" in await page.evaluate(
                "document.getElementById('call-figures').textContent")
            await asyncio.sleep(2)
            await page.evaluate("document.getElementById('hangup').click(); true")
            info = await client.call(call, wait="ended", timeout_s=10)
            await asyncio.sleep(1.5)
            info = await client.call(call)
        assert info.reason == "hangup" and info.path == ["lower-a", "upper", "lower-b"]
        for direction in ("caller_to_callee", "callee_to_caller"):
            assert info.media[direction].frames > 20, (direction, info.media)
        assert tree.devices["lower-b/cam-2"].ended[call].by == "remote"


async def test_a_python_device_dials_the_page_which_rings_and_is_answered():
    async with make_tree() as tree:
        caller = await tree.add_device("lower-b", "cam-2")
        async with chromium_on(f"{tree.lowers['lower-a'].url}/device?device=web-2",
                               debug=True) as (_, profile), \
                browser.Page.attach(tree.session, profile) as page:
            await tree.until(lambda: tree.known("lower-a/web-2"), 60, "the page registered")
            call = await caller.dial("lower-a/web-2")
            ringing = await page.until("window.vphone.ringing", 10, "the page to ring")
            assert ringing == call
            assert not await page.evaluate("document.getElementById('incoming').hidden")
            assert await page.evaluate(
                "document.getElementById('incoming-from').textContent") == "lower-b/cam-2"
            await asyncio.sleep(1.0)  # a person takes a moment
            await page.evaluate("document.getElementById('answer').click(); true")
            client = ServerClient(tree.session, tree.lowers["lower-b"].url)
            info = await client.call(call, wait="active", timeout_s=30)
            assert info.state == "active", info
            await tree.until(lambda: caller.calls[call].video.first_at is not None, 20,
                             "the page's picture at the Python device")
            await asyncio.sleep(2)
            end = await caller.hangup(call)
            await page.until("window.vphone.ended.length", 10, "the page to see the end")
            await asyncio.sleep(1.5)
            info = await client.call(call)
        t = info.timeline
        assert t["t_answered"] - t["t_callee_woken"] >= 0.9, t
        assert info.started_by == "device" and info.reason == "hangup"
        assert end.stats.media.frames > 20
        assert info.media["caller_to_callee"].frames > 20, info.media  # at the page


async def test_a_page_that_declines_ends_the_call_declined():
    async with make_tree() as tree:
        caller = await tree.add_device("lower-b", "cam-2")
        async with chromium_on(f"{tree.lowers['lower-a'].url}/device?device=web-3",
                               debug=True) as (_, profile), \
                browser.Page.attach(tree.session, profile) as page:
            await tree.until(lambda: tree.known("lower-a/web-3"), 60, "the page registered")
            call = await caller.dial("lower-a/web-3")
            await page.until("window.vphone.ringing", 10, "the page to ring")
            await page.evaluate("document.getElementById('decline').click(); true")
            end = await caller.wait_end(call, 10)
        assert end.reason == "declined" and end.by == "remote"
