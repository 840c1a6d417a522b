"""Real capture for devices: a camera (V4L2 or OpenCV), a video file that loops, an FFmpeg lavfi
source, a microphone (ALSA) or an audio file; and the stamp drawn into real frames (``--stamp``)
so latency stays measurable with a camera.

Source specs (``--video`` / ``--audio``)::

    v4l2:/dev/video0[:640x480@30]   opencv:0   file:clip.mp4   lavfi:testsrc=size=640x480:rate=30
    alsa:default   alsa:hw:1   file:speech.wav   tone   none

A device that is missing, busy or unreadable raises :class:`CaptureError` with what was wrong
and the likely fix; it is raised when the device is first opened (at start, see
:func:`check_video`), not in the middle of a call.
"""

from __future__ import annotations

import asyncio
import fractions
import glob
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamError

from endpoint import stamp
from endpoint.sources import Pacer

#: PyAV's bundled FFmpeg looks for the ALSA configuration in its build path otherwise.
ALSA_CONFIG = "/usr/share/alsa/alsa.conf"
CAPTURE_KINDS = ("v4l2", "opencv", "file", "lavfi")


class CaptureError(Exception):
    """A capture device or file cannot be used; the message names it and the likely fix."""


@dataclass(frozen=True)
class VideoSpec:
    kind: str  #: one of CAPTURE_KINDS
    target: str  #: device path, camera index, file path or lavfi graph
    width: int | None = None
    height: int | None = None
    fps: float | None = None

    @classmethod
    def parse(cls, text: str) -> VideoSpec:
        kind, sep, rest = text.partition(":")
        if not sep or kind not in CAPTURE_KINDS or not rest:
            raise CaptureError(f"video source {text!r}: want one of "
                               + ", ".join(f"{k}:..." for k in CAPTURE_KINDS))
        if kind == "v4l2":
            found = re.fullmatch(r"(/[^:]+)(?::(\d+)x(\d+)(?:@(\d+(?:\.\d+)?))?)?", rest)
            if not found:
                raise CaptureError(f"video source {text!r}: want v4l2:/dev/videoN[:WxH[@FPS]]")
            path, w, h, fps = found.groups()
            return cls(kind, path, int(w) if w else None, int(h) if h else None,
                       float(fps) if fps else None)
        return cls(kind, rest)


def check_video(text: str) -> VideoSpec:
    """Parse a video source and check that it can be opened now (fail early, clearly)."""
    spec = VideoSpec.parse(text)
    if spec.kind == "v4l2" and not os.path.exists(spec.target):
        present = sorted(glob.glob("/dev/video*"))
        raise CaptureError(
            f"no video device {spec.target}: "
            + (f"this machine has {', '.join(present)}" if present else
               "this machine has no /dev/video* at all (is a camera plugged in? in a container, "
               "map it with --device / the compose webcam override)"))
    if spec.kind == "file" and not os.path.isfile(spec.target):
        raise CaptureError(f"no video file {spec.target}")
    if spec.kind == "opencv":
        _opencv()
    return spec


def open_video(spec: VideoSpec, width: int, height: int, fps: float) -> MediaStreamTrack:
    """A live track of the source (its own player: close it with ``track.stop()``)."""
    if spec.kind == "opencv":
        return OpenCVTrack(spec.target, width, height, fps)
    options: dict[str, str] = {}
    fmt: str | None = None
    target = spec.target
    if spec.kind == "v4l2":
        fmt = "v4l2"
        options = {"video_size": f"{spec.width or width}x{spec.height or height}",
                   "framerate": f"{spec.fps or fps:g}"}
    elif spec.kind == "lavfi":
        fmt = "lavfi"
    player = _player(target, fmt, options, loop=spec.kind == "file", what="video")
    if player.video is None:
        raise CaptureError(f"{spec.kind}:{target} has no video stream")
    return player.video


def open_audio(text: str) -> MediaStreamTrack:
    """``alsa:DEVICE`` or ``file:PATH`` as a live audio track."""
    kind, sep, target = text.partition(":")
    if kind == "alsa" and sep and target:
        os.environ.setdefault("ALSA_CONFIG_PATH", ALSA_CONFIG)
        if not glob.glob("/dev/snd/pcm*"):
            raise CaptureError(f"no sound card for alsa:{target}: /dev/snd has no PCM device "
                               "(in a container, map /dev/snd)")
        player = _player(target, "alsa", {}, loop=False, what="audio")
    elif kind == "file" and sep and target:
        if not os.path.isfile(target):
            raise CaptureError(f"no audio file {target}")
        player = _player(target, None, {}, loop=True, what="audio")
    else:
        raise CaptureError(f"audio source {text!r}: want alsa:DEVICE, file:PATH, tone or none")
    if player.audio is None:
        raise CaptureError(f"{text} has no audio stream")
    return player.audio


def _player(target: str, fmt: str | None, options: dict[str, str], loop: bool,
            what: str) -> MediaPlayer:
    try:
        return MediaPlayer(target, format=fmt, options=options or None, loop=loop)
    except av.error.FFmpegError as exc:
        hint = ""
        if "busy" in str(exc).lower() or getattr(exc, "errno", None) == 16:
            hint = " (busy: another program has it open; `fuser` shows which)"
        elif "permission" in str(exc).lower():
            hint = " (permission denied: add the user to the video/audio group)"
        raise CaptureError(f"cannot open {what} source {fmt + ':' if fmt else ''}{target}: "
                           f"{exc}{hint}") from None


def _opencv():  # type: ignore[no-untyped-def]
    try:
        import cv2
    except ImportError:
        raise CaptureError("opencv: sources need OpenCV: pip install opencv-python-headless"
                           ) from None
    return cv2


class OpenCVTrack(MediaStreamTrack):
    """Frames from ``cv2.VideoCapture(index)`` (a camera, or a file, looped), read in a worker
    thread, at most ``fps`` a second (a camera paces itself; a file would not)."""

    kind = "video"

    def __init__(self, index: str, width: int, height: int, fps: float) -> None:
        super().__init__()
        cv2 = _opencv()
        self._cv2 = cv2
        self._capture = cv2.VideoCapture(int(index) if index.isdigit() else index)
        if not self._capture.isOpened():
            raise CaptureError(f"opencv: cannot open camera {index} (missing, or busy)")
        self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self._capture.set(cv2.CAP_PROP_FPS, fps)
        self._is_file = not index.isdigit()
        self._pacer = Pacer(1 / fps)
        self._count = 0
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._pacer.wait(self._count)
        self._count += 1
        ok, image = await asyncio.get_running_loop().run_in_executor(None, self._read)
        if not ok:
            raise MediaStreamError
        now = time.monotonic()
        self._start = self._start if self._start is not None else now
        frame = av.VideoFrame.from_ndarray(image, format="bgr24")
        frame.pts = int((now - self._start) * 90_000)
        frame.time_base = fractions.Fraction(1, 90_000)
        return frame

    def _read(self) -> tuple[bool, np.ndarray]:
        ok, image = self._capture.read()
        if not ok and self._is_file:  # a file loops
            self._capture.set(self._cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self._capture.read()
        return ok, image

    def stop(self) -> None:
        super().stop()
        self._capture.release()


class StampedTrack(MediaStreamTrack):
    """Draws the stamp (frame counter, send time) into the top of every frame of ``source``:
    with a real camera, receivers still measure latency and loss. Timing is kept as it is."""

    kind = "video"

    def __init__(self, source: MediaStreamTrack,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.source = source
        self._clock = clock
        self._count = 0

    async def recv(self) -> av.VideoFrame:
        frame = await self.source.recv()
        width = frame.width - frame.width % 2
        if width < stamp.MIN_WIDTH:
            return frame  # too narrow for a stamp: sent as it is
        buffer = frame.to_ndarray(format="yuv420p")
        luma = buffer[: frame.height]
        stamp.draw(luma, stamp.Stamp(self._count, int(self._clock() * 1000)))
        out = av.VideoFrame.from_ndarray(np.ascontiguousarray(buffer), format="yuv420p")
        out.pts, out.time_base = frame.pts, frame.time_base
        self._count += 1
        return out

    def stop(self) -> None:
        super().stop()
        self.source.stop()
