"""Real capture for devices: a camera (V4L2 or OpenCV), a video file that loops, an FFmpeg lavfi
source, a microphone (ALSA) or an audio file; and the stamp drawn into real frames (``--stamp``)
so latency stays measurable with a camera.

Source specs (``--video`` / ``--audio``)::

    v4l2:/dev/video0[:640x480@30]   opencv:0   file:clip.mp4   lavfi:testsrc=size=640x480:rate=30
    rtsp://user:pass@camera.lab:554/stream1   (an IP camera; over TCP)
    alsa:default   alsa:hw:1   file:speech.wav   tone   none

An RTSP camera's H.264 is sent as it comes, without decoding, on a call whose video is H.264
(:class:`RtspTrack` with ``passthrough``); on a VP8 call (or with ``--stamp``) it is decoded
and encoded again.

A device that is missing, busy or unreadable raises :class:`CaptureError` with what was wrong
and the likely fix; it is raised when the device is first opened (at start, see
:func:`check_video`), not in the middle of a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import glob
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamError

from endpoint import stamp
from endpoint.sources import Pacer
from wire.logs import event

log = logging.getLogger("endpoint.capture")

#: PyAV's bundled FFmpeg looks for the ALSA configuration in its build path otherwise.
ALSA_CONFIG = "/usr/share/alsa/alsa.conf"
CAPTURE_KINDS = ("v4l2", "opencv", "file", "lavfi", "rtsp")
#: the H.264 profiles a call negotiates (aiortc offers profile-level-id 42001f and 42e01f):
#: a camera's stream in one of these is forwarded as it is; the level is not checked
PASSTHROUGH_PROFILES = ("Baseline", "Constrained Baseline")
#: how long an RTSP camera may take to answer (connect, DESCRIBE, a read) before it is an error
RTSP_TIMEOUT_S = 5.0


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
        if text.startswith(("rtsp://", "rtsps://")):
            if len(text.split("://", 1)[1]) < 1:
                raise CaptureError(f"video source {text!r}: want rtsp://HOST[:PORT]/PATH")
            return cls("rtsp", text)
        kind, sep, rest = text.partition(":")
        if not sep or kind not in CAPTURE_KINDS or not rest:
            raise CaptureError(f"video source {text!r}: want one of "
                               + ", ".join(f"{k}:..." for k in CAPTURE_KINDS if k != "rtsp")
                               + ", rtsp://...")
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
    if spec.kind == "rtsp":
        probe_rtsp(spec.target)
    return spec


def open_video(spec: VideoSpec, width: int, height: int, fps: float,
               passthrough: bool = False) -> MediaStreamTrack:
    """A live track of the source (its own player: close it with ``track.stop()``).
    ``passthrough``: an RTSP camera's H.264 as it comes (av.Packet, not decoded)."""
    if spec.kind == "opencv":
        return OpenCVTrack(spec.target, width, height, fps)
    if spec.kind == "rtsp":
        return RtspTrack(spec.target, passthrough=passthrough)
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


def _open_rtsp(url: str, timeout_s: float = RTSP_TIMEOUT_S) -> Any:
    """The camera's stream, opened over TCP (interleaved RTP: through NAT and firewalls)."""
    try:
        return av.open(url, options={"rtsp_transport": "tcp", "fflags": "nobuffer",
                                     "analyzeduration": "200000", "probesize": "65536",
                                     "timeout": str(int(timeout_s * 1_000_000))},
                       timeout=timeout_s)
    except av.error.FFmpegError as exc:
        raise CaptureError(f"cannot open RTSP camera {_redact(url)}: {_redact(str(exc))} (is "
                           "the camera up, "
                           "the path right, the user and password in the URL?)") from None


def _redact(url: str) -> str:
    """An RTSP URL without its password, for messages and logs."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


def probe_rtsp(url: str) -> str:
    """Open the camera once and read what it sends: its video codec ("h264", ...)."""
    container = _open_rtsp(url)
    try:
        if not container.streams.video:
            raise CaptureError(f"RTSP camera {_redact(url)} sends no video stream")
        return str(container.streams.video[0].codec_context.name)
    finally:
        container.close()


def has_parameter_sets(data: bytes) -> bool:
    """Whether an H.264 access unit (Annex B) carries its SPS (NAL type 7)."""
    start = 0
    while (found := data.find(b"\x00\x00\x01", start)) >= 0 and found + 3 < len(data):
        if data[found + 3] & 0x1F == 7:
            return True
        start = found + 3
    return False


class RtspTrack(MediaStreamTrack):
    """An RTSP camera's video, read in a thread of its own: decoded frames, or
    (``passthrough``) its H.264 access units as they come, for aiortc to packetize without
    decoding (from the first keyframe on; SPS and PPS put in front of each keyframe that lacks
    them, from the stream's SDP). A live source: when the sender falls behind, the oldest
    frames are dropped (in passthrough, everything up to the next keyframe)."""

    kind = "video"
    QUEUE = 30

    def __init__(self, url: str, passthrough: bool = False) -> None:
        super().__init__()
        self.url = url
        self.passthrough = passthrough
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._quit = threading.Event()
        self._waiting_keyframe = True
        #: what the thread saw: packets or frames read, dropped, and why it stopped
        self.read = 0
        self.dropped = 0
        self.error: str | None = None
        self.profile: str | None = None  #: the camera's H.264 profile, once it is read
        self._thread = threading.Thread(target=self._run, name=f"rtsp {_redact(url)}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            container = _open_rtsp(self.url)
        except CaptureError as exc:
            self._finish(str(exc))
            return
        try:
            self._read(container)
        except Exception as exc:  # the camera went away mid-stream
            self._finish(f"RTSP camera {_redact(self.url)} stopped: {exc!r}")
        else:
            self._finish(None)
        finally:
            container.close()

    def _read(self, container: Any) -> None:
        stream = container.streams.video[0]
        codec, profile = stream.codec_context.name, stream.codec_context.profile
        self.profile = profile
        if self.passthrough and (codec != "h264" or profile not in PASSTHROUGH_PROFILES):
            # the call negotiated constrained baseline H.264: anything else is decoded and
            # encoded again (aiortc's sender takes frames and packets alike)
            self.passthrough = False
            event(log, "capture.rtsp_reencoded", url=_redact(self.url), codec=codec,
                  profile=profile, reason="not a profile the call negotiated")
        extradata = bytes(stream.codec_context.extradata or b"")
        origin: int | None = None
        for packet in container.demux(stream):
            if self._quit.is_set():
                return
            if packet.pts is None or not packet.size:
                continue
            origin = packet.pts if origin is None else origin
            if self.passthrough:
                data = bytes(packet)
                if packet.is_keyframe and extradata and not has_parameter_sets(data):
                    data = extradata + data
                out = av.Packet(data)
                out.pts, out.dts = packet.pts - origin, packet.pts - origin
                out.time_base = packet.time_base
                out.is_keyframe = packet.is_keyframe
                self._put(out, packet.is_keyframe)
            else:
                for frame in packet.decode():
                    frame.pts = (frame.pts or packet.pts) - origin
                    self._put(frame, True)

    def _put(self, item: Any, keyframe: bool) -> None:
        self.read += 1
        self._loop.call_soon_threadsafe(self._deliver, item, keyframe)

    def _deliver(self, item: Any, keyframe: bool) -> None:
        if self.passthrough:
            if self._queue.qsize() >= self.QUEUE:  # behind: start again at a keyframe
                self.dropped += self._queue.qsize()
                while not self._queue.empty():
                    self._queue.get_nowait()
                self._waiting_keyframe = True
            if self._waiting_keyframe and not keyframe:
                self.dropped += 1
                return
            self._waiting_keyframe = False
        elif self._queue.qsize() >= self.QUEUE:
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(item)

    def _finish(self, error: str | None) -> None:
        self.error = error
        if error is not None and not self._quit.is_set():
            event(log, "capture.rtsp_failed", logging.WARNING, url=_redact(self.url),
                  error=error)
        with contextlib.suppress(RuntimeError):  # the loop closed first
            self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        item = await self._queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        return item

    def stop(self) -> None:
        super().stop()
        self._quit.set()
