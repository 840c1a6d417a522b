"""IP cameras: a device whose video is an RTSP camera (a real RTSP server on loopback, started
here: tests/rtsp_camera.py, live H.264 over TCP). On an H.264 call the camera's own stream goes
out as it came, never decoded at the device or any server; on a VP8 call it is decoded and
encoded again. The camera stamps its frames with the time it sends them, so the far device
measures latency from the camera itself."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from dataclasses import replace

import pytest

from endpoint.capture import CaptureError, RtspTrack, check_video, has_parameter_sets
from endpoint.device import Device
from wire.client import ServerClient

from .conftest import DEVICE_SETTINGS, make_tree
from .rtsp_camera import Camera, nal_units, rtp_payloads, serving


def test_h264_is_cut_into_nal_units_and_fu_a_fragments():
    au = b"\x00\x00\x00\x01\x67sps" + b"\x00\x00\x01\x68pp" + b"\x00\x00\x01\x65" + bytes(3000)
    units = nal_units(au)
    assert [u[0] & 0x1F for u in units] == [7, 8, 5]
    assert has_parameter_sets(au) and not has_parameter_sets(b"\x00\x00\x01\x65" + bytes(9))
    payloads = rtp_payloads(units, mtu=1200)
    assert payloads[0] == units[0] and payloads[1] == units[1]
    fragments = payloads[2:]
    assert len(fragments) == 3 and all(p[0] & 0x1F == 28 for p in fragments)
    assert fragments[0][1] & 0x80 and fragments[-1][1] & 0x40  # start, end
    assert b"".join(p[2:] for p in fragments) == units[2][1:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_camera_is_a_clear_error_at_start():
    with pytest.raises(CaptureError, match="cannot open RTSP camera") as refused:
        check_video(f"rtsp://admin:secret@127.0.0.1:{free_port()}/stream1")
    assert "secret" not in str(refused.value)  # the password is not repeated in messages


async def test_a_camera_path_that_is_not_there_is_a_clear_error():
    async with serving() as (url, _):
        with pytest.raises(CaptureError, match="cannot open RTSP camera"):
            await asyncio.to_thread(check_video, url.replace("/stream1", "/nothing"))
        assert await asyncio.to_thread(check_video, url)


async def _camera_call(callee_codecs: tuple[str, ...], seconds: float = 3.0,
                       profile: str = "baseline"):
    async with serving(Camera(profile=profile)) as (url, camera), make_tree() as tree:
        source = replace(DEVICE_SETTINGS, video=url)
        assert source.video_codecs[0] == "video/H264"  # it would rather send its own H.264
        cam = tree.start("lower-a", Device(tree.lowers["lower-a"].url, "ipcam", source))
        await tree.add_device("lower-b", "desk", replace(DEVICE_SETTINGS, codecs=callee_codecs))
        await tree.until(lambda: tree.known("lower-a/ipcam"), 15)
        client = ServerClient(tree.session, tree.lowers["lower-a"].url)
        info = await client.create_call("lower-a/ipcam", "lower-b/desk")
        info = await client.call(info.call, wait="active", timeout_s=20)
        assert info.state == "active", info
        tracks = [s for s in cam.calls[info.call].sources if isinstance(s, RtspTrack)]
        await asyncio.sleep(seconds)
        await client.hangup(info.call)
        await asyncio.sleep(1.0)
        info = await client.call(info.call)
        forwarded = {name: node.forwarding.packets for name, node in tree.servers.items()}
        return info, tracks, camera, forwarded


@pytest.mark.e2e
async def test_an_rtsp_camera_s_h264_is_forwarded_without_decoding():
    info, tracks, camera, forwarded = await _camera_call(("video/VP8", "video/H264"))
    assert info.codec == "video/H264" and info.transcoded == [], info
    assert len(tracks) == 1 and tracks[0].passthrough and tracks[0].error is None
    assert tracks[0].profile == "Constrained Baseline"
    media = info.media["caller_to_callee"]
    assert media.frames > 25 and media.fps > 8, media
    # the camera's stamps, read back at the far device: latency from the camera itself
    assert media.latency_ms_p50 is not None and 0 < media.latency_ms_p50 < 1000, media
    assert media.unreadable <= media.frames // 10, media
    assert info.media["callee_to_caller"].frames > 25  # and the other way, as any call
    assert camera.sessions >= 1 and camera.frames_sent > 30
    assert all(count > 100 for count in forwarded.values()), forwarded


@pytest.mark.e2e
async def test_a_camera_profile_the_call_did_not_negotiate_is_encoded_again():
    info, tracks, _, _ = await _camera_call(("video/VP8", "video/H264"), profile="high")
    assert info.codec == "video/H264", info
    assert len(tracks) == 1 and tracks[0].profile == "High" and not tracks[0].passthrough
    media = info.media["caller_to_callee"]
    assert media.frames > 25 and media.latency_ms_p50 is not None, media


@pytest.mark.e2e
async def test_an_rtsp_camera_is_encoded_again_for_a_vp8_callee():
    info, tracks, _, _ = await _camera_call(("video/VP8",))
    assert info.codec == "video/VP8", info
    assert len(tracks) == 1 and not tracks[0].passthrough
    media = info.media["caller_to_callee"]
    assert media.frames > 25 and media.latency_ms_p50 is not None, media


def test_the_command_line_refuses_a_dead_camera_at_start():
    done = subprocess.run([sys.executable, "-m", "endpoint", "--server", "ws://127.0.0.1:9",
                           "--video", f"rtsp://127.0.0.1:{free_port()}/stream1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot open RTSP camera" in done.stderr, done.stderr
