"""A device nobody here wrote: GStreamer's webrtcbin (libnice ICE, GStreamer DTLS/SRTP, its
payloaders' default MTU of 1,400 bytes), driven by tests/gst_device.py, which follows
docs/protocol.md and uses no code of this project. It is called, and calls, a synthetic device
under another lower server, VP8 and H.264; frames are counted at both ends. Installs
GStreamer from Debian when it is missing, and skips with the reason only if that fails."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from probe.calls import run_call
from wire.client import discover
from wire.messages import CallInfo

from .conftest import Tree, make_tree

pytestmark = pytest.mark.e2e

DEVICE = Path(__file__).with_name("gst_device.py")
SYSTEM_PYTHON = "/usr/bin/python3"
PACKAGES = ["python3-gst-1.0", "gir1.2-gst-plugins-bad-1.0", "gstreamer1.0-plugins-bad",
            "gstreamer1.0-nice", "gstreamer1.0-plugins-good", "gstreamer1.0-plugins-base",
            "gstreamer1.0-plugins-ugly", "gstreamer1.0-libav", "python3-websocket"]
CHECK = ("import gi, websocket; gi.require_version('Gst', '1.0'); "
         "gi.require_version('GstWebRTC', '1.0'); from gi.repository import Gst; Gst.init(None);"
         " missing = [e for e in ('webrtcbin', 'nicesrc', 'vp8enc', 'x264enc', 'avdec_h264', "
         "'opusenc') if not Gst.ElementFactory.find(e)]; assert not missing, missing")


def _usable() -> bool:
    return subprocess.run([SYSTEM_PYTHON, "-c", CHECK], capture_output=True,
                          timeout=60).returncode == 0


@pytest.fixture(scope="module")
def gstreamer() -> None:
    if Path(SYSTEM_PYTHON).exists() and _usable():
        return
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(install, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        done = subprocess.run(install, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not _usable():
        pytest.skip(f"GStreamer could not be installed: {done.stderr[-500:]}")


async def _start(tree: Tree, name: str, codec: str, *extra: str) -> asyncio.subprocess.Process:
    url = tree.lowers["lower-b"].url.replace("http://", "ws://") + "/v1/device"
    process = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, str(DEVICE), url, name, "--codec", codec, "--seconds", "40", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return process


async def _lines(process: asyncio.subprocess.Process, until: str, timeout: float
                 ) -> list[dict[str, Any]]:
    """JSON lines from the device until one holding ``until``."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            raw = await process.stdout.readline()  # type: ignore[union-attr]
            if not raw:
                raise AssertionError(f"the GStreamer device exited: {got}")
            got.append(json.loads(raw))
            if until in got[-1]:
                return got


async def _call(tree: Tree, server: str, caller: str, callee: str) -> str:
    async with tree.session.post(f"{tree.lowers[server].url}/v1/calls",
                                 json={"caller": caller, "callee": callee}) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["call"])


async def _run_call(tree: Tree, gst: asyncio.subprocess.Process, server: str, caller: str,
                    callee: str) -> tuple[CallInfo, dict[str, Any], float]:
    sent = time.monotonic()
    call = await _call(tree, server, caller, callee)
    async with tree.session.get(f"{tree.lowers[server].url}/v1/calls/{call}"
                                "?wait=active&timeout=15") as r:
        info = CallInfo.from_dict(await r.json())
    setup_s = time.monotonic() - sent
    assert info.state == "active", info
    await asyncio.sleep(3)
    async with tree.session.delete(f"{tree.lowers[server].url}/v1/calls/{call}") as r:
        info = CallInfo.from_dict(await r.json())
    ended = (await _lines(gst, "call", 10))[-1]
    assert ended["call"] == call and ended["reason"] == "hangup", ended
    return info, ended, setup_s


@pytest.mark.parametrize("codec", ["VP8", "H264"])
async def test_a_gstreamer_webrtcbin_device_calls_and_is_called(gstreamer: None,
                                                                 codec: str) -> None:
    async with make_tree() as tree:
        await tree.add_device("lower-a", "cam-1")
        gst = await _start(tree, "gst-1", codec)
        try:
            registered = await _lines(gst, "registered", 15)
            assert registered[-1]["registered"] == "lower-b/gst-1"
            await tree.until(lambda: tree.known("lower-b/gst-1"), 10, "gst-1 known")
            for caller, callee, server in (("lower-a/cam-1", "lower-b/gst-1", "lower-a"),
                                           ("lower-b/gst-1", "lower-a/cam-1", "lower-b")):
                info, gst_side, setup_s = await _run_call(tree, gst, server, caller, callee)
                gst_role = gst_side["role"]
                toward_gst = "caller_to_callee" if gst_role == "callee" else "callee_to_caller"
                from_gst = "callee_to_caller" if gst_role == "callee" else "caller_to_callee"
                assert info.codec == f"video/{codec}"
                # what GStreamer decoded of cam-1, and what cam-1 decoded of GStreamer
                assert gst_side["frames_in"] >= 30 and gst_side["audio_in"] > 50, gst_side
                cam = info.media[from_gst]
                assert cam.frames >= 30, cam
                assert cam.unreadable == cam.frames  # GStreamer's picture has no stamp
                # the GStreamer device's own stats reached the call, through the server
                assert info.media[toward_gst].frames > 0
                assert not info.transcoded
                # no abs-send-time in webrtcbin's answer: said so, not silently unsteered
                hop = next(h for h in info.hops if h.server == "lower-b")
                why = hop.streams[from_gst]["video"].cannot_adapt
                assert why and "abs-send-time" in why, hop
                print(f"\nGStreamer webrtcbin {codec} as {gst_role}: setup "
                      f"{setup_s * 1000:.0f} ms; GStreamer decoded {gst_side['frames_in']} "
                      f"frames, {gst_side['audio_in']} audio buffers; cam-1 decoded "
                      f"{cam.frames} frames at {cam.fps} fps; not adapting: {why}")
                await tree.until(lambda: tree.lowers["lower-b"].directory.own["gst-1"].state
                                 == "idle", 5, "gst-1 idle")
            # the probe's own call, judged as any: both ways, no stamp from GStreamer
            servers = await discover(tree.session, tree.urls)
            result = await run_call(tree.session, servers, "lower-a/cam-1", "lower-b/gst-1",
                                    hold_s=2.0)
            assert result.ok, result.to_dict()
            assert result.not_adapting == ["callee_to_caller"], result.not_adapting_why
            print(f"probe: ok, setup {result.intervals['setup_ms']:.0f} ms, frames "
                  f"{ {d: m['frames'] for d, m in result.media.items()} }, not adapting "
                  f"{result.not_adapting_why}")
            assert (await _lines(gst, "call", 10))[-1]["frames_in"] > 0
        finally:
            if gst.returncode is None:
                gst.terminate()
                try:
                    await asyncio.wait_for(gst.wait(), 10)
                except TimeoutError:
                    gst.kill()
                    await gst.wait()
