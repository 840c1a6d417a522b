"""Firefox ESR is a phone too, across a real link: lower-a (the page's server) runs in a network
namespace of the test's own, its media address on the veth (tests/faults.py split_tree), the
browser on the host. The page dials a Python device under lower-b, a Python device dials the
page, and when every UDP packet on the veth is dropped (iptables, made here, gone with the
namespace) the page says plainly that ICE found no candidate pair, and ends the call so."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp
import pytest

from wire.client import ServerClient

from . import browser
from .faults import Processes, namespace, split_tree, until_devices

pytestmark = pytest.mark.e2e


async def test_firefox_calls_both_ways_over_a_veth_and_says_when_ice_fails():
    with namespace() as ns:
        processes = Processes()
        try:
            upper, lower_a, lower_b = await split_tree(ns, processes, video="synthetic")
            async with aiohttp.ClientSession() as session:
                await until_devices(session, [upper], 2)
                async with browser.firefox_on(session, "about:blank") as page:
                    await _page_dials(page, session, lower_a)
                    await _python_dials_page(page, session, ns, lower_a, lower_b)
                    await _ice_fails(page, ns, lower_a)
        finally:
            await processes.stop()


async def _page_dials(page: browser.BidiPage, session: aiohttp.ClientSession,
                      lower_a: str) -> None:
    await page.navigate(f"{lower_a}/device?device=ff-1&call=lower-b/cam-b&hold=4")
    ended = await page.until("window.vphone.ended.length && window.vphone.ended", 60,
                             "the page's call to end")
    assert ended[0]["reason"] == "hangup" and ended[0]["by"] == "local", ended
    client = ServerClient(session, lower_a)
    await asyncio.sleep(1.5)  # both devices' last figures
    info = await client.call(ended[0]["call"])
    assert info.started_by == "device" and info.caller == "lower-a/ff-1", info
    assert info.path == ["lower-a", "upper", "lower-b"] and info.reason == "hangup"
    for direction in ("caller_to_callee", "callee_to_caller"):
        assert info.media[direction].frames > 20, (direction, info.media)
    # the page's own view of the link: its ICE pair used the veth, not loopback
    ice = await page.evaluate(f"window.vphone.ice[{json.dumps(info.call)}]")
    assert ice["state"] in ("connected", "completed", "closed"), ice
    assert any("198.18." in c for c in ice["server"]), ice


async def _python_dials_page(page: browser.BidiPage, session: aiohttp.ClientSession,
                             ns, lower_a: str, lower_b: str) -> None:
    await page.navigate(f"{lower_a}/device?device=ff-2&answer=auto")
    await page.until("window.vphone.state.startsWith('registered')", 30, "the page registered")
    await until_devices(session, [lower_a], 2)  # cam-a and ff-2
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "endpoint", "--server", lower_b, "--device", "dialer",
        "--size", "320x240", "--media-address", ns.host_ip, "--call", "lower-a/ff-2",
        "--hold", "3", "--json", "--connect-timeout", "20",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, (stdout.decode()[-1500:], stderr.decode()[-1500:])
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    assert result["info"]["callee"] == "lower-a/ff-2" and result["reason"] == "hangup"
    for direction in ("caller_to_callee", "callee_to_caller"):
        assert result["info"]["media"][direction]["frames"] > 20, result["info"]["media"]


async def _ice_fails(page: browser.BidiPage, ns, lower_a: str) -> None:
    await page.navigate(f"{lower_a}/device?device=ff-3&answer=auto")
    await page.until("window.vphone.state.startsWith('registered')", 30, "the page registered")
    ns.drop(1.0)  # every UDP packet on the veth, both ways: ICE cannot pair
    await page.evaluate("window.vphone.dial('lower-b/cam-b')")
    ended = await page.until("window.vphone.ended.length && window.vphone.ended", 90,
                             "the call without media to end")
    status = await page.evaluate("document.getElementById('status').textContent")
    assert ended[0]["reason"] == "media_failed" and ended[0]["by"] == "local", (ended, status)
    assert "ICE failed: no candidate pair" in status and ns.inside_ip in status, status
    assert ns.dropped() > 0
