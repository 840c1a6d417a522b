"""Capture sources: specs parsed, missing devices refused with a clear message, and (e2e) a
lavfi source with the stamp drawn in and a looping file each carrying a real call."""

from __future__ import annotations

import asyncio
import fractions
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest

from endpoint.capture import CaptureError, VideoSpec, check_video, open_audio
from endpoint.device import Device, DeviceSettings
from wire.client import ServerClient

from .conftest import DEVICE_SETTINGS, make_tree


def test_specs_parse():
    assert VideoSpec.parse("v4l2:/dev/video0") == VideoSpec("v4l2", "/dev/video0")
    assert VideoSpec.parse("v4l2:/dev/video2:1280x720@30") == VideoSpec(
        "v4l2", "/dev/video2", 1280, 720, 30.0)
    assert VideoSpec.parse("lavfi:testsrc=size=320x240:rate=15").target == \
        "testsrc=size=320x240:rate=15"
    assert VideoSpec.parse("file:/tmp/a:b.mp4").target == "/tmp/a:b.mp4"
    for bad in ("webcam", "v4l2:", "v4l2:video0", "v4l2:/dev/video0:big", "http:x"):
        with pytest.raises(CaptureError):
            VideoSpec.parse(bad)
    with pytest.raises(ValueError, match="capture source"):
        DeviceSettings(video="camera")


def test_missing_devices_say_what_and_how_to_fix():
    with pytest.raises(CaptureError, match=r"no video device /dev/video99: .*plugged"):
        check_video("v4l2:/dev/video99")
    with pytest.raises(CaptureError, match=r"no video file /nonexistent\.mp4"):
        check_video("file:/nonexistent.mp4")
    with pytest.raises(CaptureError, match=r"no audio file /nonexistent\.wav"):
        open_audio("file:/nonexistent.wav")
    with pytest.raises(CaptureError, match="want alsa:DEVICE"):
        open_audio("microphone")


def test_endpoint_refuses_a_missing_camera_at_start():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "endpoint", "--server", "ws://127.0.0.1:9",
                           "--video", "v4l2:/dev/video99"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "no video device /dev/video99" in done.stderr


def write_clip(path: Path, seconds: float = 1.0, fps: int = 15) -> None:
    """A short VP8 clip (a moving box) to loop."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for n in range(int(seconds * fps)):
            image = np.full((240, 320, 3), 40, np.uint8)
            image[100:140, 10 * n % 280:10 * n % 280 + 40] = 230
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = n, fractions.Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


async def _call(source: DeviceSettings, seconds: float = 3.0):
    async with make_tree() as tree:
        tree.start("lower-a", Device(tree.lowers["lower-a"].url, "cam-1", source))
        await tree.add_device("lower-b", "cam-2")
        await tree.until(lambda: tree.known("lower-a/cam-1"), 15)
        await tree.until(lambda: tree.known("lower-b/cam-2"), 15)
        client = ServerClient(tree.session, tree.lowers["lower-a"].url)
        info = await client.create_call("lower-a/cam-1", "lower-b/cam-2")
        info = await client.call(info.call, wait="active", timeout_s=20)
        assert info.state == "active", info
        await asyncio.sleep(seconds)
        await client.hangup(info.call)
        await asyncio.sleep(0.3)
        return await client.call(info.call)


@pytest.mark.e2e
async def test_lavfi_source_with_the_stamp_measures_latency():
    source = replace(DEVICE_SETTINGS, video="lavfi:testsrc=size=320x240:rate=15", stamp=True)
    info = await _call(source)
    media = info.media["caller_to_callee"]
    # Every frame is stamped; through VP8 at 320x240 (8-px blocks) on testsrc's busy picture a
    # few may not read back: once in four full runs 5 frames in a row did not (each then counts
    # lost too: its counter is never seen), and 9 of 90 do not offline at 300 kbit/s. Most do.
    assert media.frames > 30 and media.unreadable <= media.frames // 10, media
    assert 0 < media.latency_ms_p50 < 500, media
    assert media.frames_lost <= media.unreadable + 1, media  # no frame lost but those


@pytest.mark.e2e
async def test_a_file_loops_and_is_received_without_stamps(tmp_path: Path):
    clip = tmp_path / "clip.webm"
    write_clip(clip, seconds=1.0)
    info = await _call(replace(DEVICE_SETTINGS, video=f"file:{clip}"), seconds=3.0)
    media = info.media["caller_to_callee"]
    # 15 frames in the file, about 3 s of call: it looped; no stamp, so no latency
    assert media.frames > 30 and media.unreadable == media.frames, media
    assert media.latency_ms_p50 is None


@pytest.mark.e2e
async def test_received_video_is_recorded(tmp_path: Path):
    record = tmp_path / "rec"
    async with make_tree() as tree:
        tree.start("lower-a", Device(tree.lowers["lower-a"].url, "cam-1", DEVICE_SETTINGS))
        tree.start("lower-b", Device(tree.lowers["lower-b"].url, "cam-2",
                                     replace(DEVICE_SETTINGS, record=str(record))))
        await tree.until(lambda: tree.known("lower-b/cam-2"), 15)
        await tree.until(lambda: tree.known("lower-a/cam-1"), 15)
        client = ServerClient(tree.session, tree.lowers["lower-a"].url)
        info = await client.create_call("lower-a/cam-1", "lower-b/cam-2")
        info = await client.call(info.call, wait="active", timeout_s=20)
        await asyncio.sleep(2)
        await client.hangup(info.call)
        await asyncio.sleep(0.5)
    [path] = list(record.iterdir())
    assert path.name == f"{info.call}-callee.mp4"
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) > 20 and frames[0].width == 320
    assert frames[-1].time > 1.0  # timed by arrival over the call, not packed together


@pytest.mark.e2e
async def test_the_remote_party_is_shown_in_a_window(tmp_path: Path):
    """Under Xvfb (when installed, with opencv-python): the callee's window shows the picture."""
    import importlib.util
    import os
    import shutil
    import subprocess

    if not shutil.which("Xvfb") or importlib.util.find_spec("cv2") is None:
        pytest.skip("needs Xvfb and opencv-python (a display and a GUI build of OpenCV)")
    display = ":" + str(50 + os.getpid() % 40)
    xvfb = await asyncio.create_subprocess_exec(
        "Xvfb", display, "-screen", "0", "800x600x24", stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    await asyncio.sleep(0.5)
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = display
    try:
        async with make_tree() as tree:
            tree.start("lower-a", Device(tree.lowers["lower-a"].url, "cam-1", DEVICE_SETTINGS))
            tree.start("lower-b", Device(tree.lowers["lower-b"].url, "cam-2",
                                         replace(DEVICE_SETTINGS, show=True)))
            await tree.until(lambda: tree.known("lower-b/cam-2"), 15)
            client = ServerClient(tree.session, tree.lowers["lower-a"].url)
            info = await client.create_call("lower-a/cam-1", "lower-b/cam-2")
            await client.call(info.call, wait="active", timeout_s=20)
            await asyncio.sleep(2)
            with av.open(display, format="x11grab", options={"video_size": "800x600"}) as grab:
                screen = next(grab.decode(video=0)).to_ndarray(format="rgb24")
            await client.hangup(info.call)
    finally:
        if old is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = old
        xvfb.terminate()
        await xvfb.wait()
    lit = (screen.max(axis=2) > 40).mean()
    assert lit > 0.1, lit  # a 320x240 picture (with its figures) on a black 800x600 screen


@pytest.mark.e2e
async def test_opencv_capture_carries_a_call(tmp_path: Path):
    import importlib.util

    if importlib.util.find_spec("cv2") is None:
        pytest.skip("needs OpenCV: pip install -e '.[opencv]' (no camera needed: reads a file)")
    clip = tmp_path / "clip.webm"
    write_clip(clip, seconds=2.0)
    info = await _call(replace(DEVICE_SETTINGS, video=f"opencv:{clip}", stamp=True), seconds=1.5)
    media = info.media["caller_to_callee"]
    # Stamps read back (about half of them here: at 320x240 the blocks are 8 px, and this
    # path loses more of them to the encoder than lavfi does; an open item)
    assert media.frames > 10 and media.unreadable < media.frames, media
    assert media.latency_ms_p50 > 0 and 10 < media.fps < 20, media
