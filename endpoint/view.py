"""Seeing the call: the remote video in a window with live figures over it (OpenCV, when a
display exists), and recording it to a file. Both are off by default (devices are headless)."""

from __future__ import annotations

import contextlib
import fractions
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import av

from endpoint.window import HEADER
from wire.messages import MediaStats


class ViewError(Exception):
    """The window cannot be shown; the message says why and what to do."""


class Viewer:
    """One window per call: the other party's picture with latency, fps and loss over it,
    drawn by a child process (endpoint/window.py) fed through a pipe."""

    MAX_WIDTH = 960

    def __init__(self, title: str) -> None:
        if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
            raise ViewError("--show needs a display (DISPLAY is not set; e.g. run under Xvfb)")
        if importlib.util.find_spec("cv2") is None:
            raise ViewError("--show needs OpenCV with a GUI: pip install opencv-python "
                            "(the -headless build has no windows)")
        self.title = title
        self._process = subprocess.Popen([sys.executable, "-m", "endpoint.window", title],
                                         stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
        # Converting and piping a frame takes milliseconds: done in a thread, and a frame that
        # comes while the last one is still on its way is skipped (the call never waits).
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="viewer")
        self._pending: Future[None] | None = None
        self._stats: MediaStats | None = None
        self._stats_at = 0.0
        self.skipped = 0

    def show(self, frame: av.VideoFrame, figures: Callable[[], MediaStats]) -> None:
        """Draw ``frame``; ``figures`` is asked for the overlay at most twice a second (it
        reads percentiles: not a per-frame cost), and only for frames that are drawn."""
        if self._process.poll() is not None:
            return  # the window was closed: the call goes on
        if self._pending is not None and not self._pending.done():
            self.skipped += 1
            return
        now = time.monotonic()
        if self._stats is None or now - self._stats_at >= 0.5:
            self._stats, self._stats_at = figures(), now
        self._pending = self._writer.submit(self._write, frame, self._stats)

    def _write(self, frame: av.VideoFrame, stats: MediaStats) -> None:
        stdin = self._process.stdin
        if stdin is None:
            return
        if frame.width > self.MAX_WIDTH:
            frame = frame.reformat(width=self.MAX_WIDTH,
                                   height=frame.height * self.MAX_WIDTH // frame.width)
        image = frame.to_ndarray(format="bgr24")
        text = "\n".join([
            f"latency p50 {stats.latency_ms_p50:.0f} ms" if stats.latency_ms_p50
            else "latency - (no stamp)", f"{stats.fps:.1f} fps  {stats.frames} frames",
            f"lost {stats.frames_lost}  freezes {stats.gaps}"]).encode()
        try:
            stdin.write(HEADER.pack(image.shape[1], image.shape[0], len(text)) + text)
            stdin.write(image.tobytes())
            stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._process.stdin is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
        try:
            self._process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class Recorder:
    """Writes the received video to a file (the container from its name: .mp4, .mkv, .webm),
    timed by arrival so pauses and freezes stay visible in the recording."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(path), "w")
        codec = "libvpx" if path.suffix == ".webm" else "libx264"
        self._stream = self._container.add_stream(codec, rate=round(fps))
        self._stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self._stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        self._rate = round(fps)
        self._time_base = fractions.Fraction(1, self._rate)
        self._start: float | None = None
        self._last_pts = -1
        self.frames = 0

    def write(self, frame: av.VideoFrame, now: float) -> None:
        if self._start is None:
            self._stream.width, self._stream.height = frame.width, frame.height
            self._start = now
        if (frame.width, frame.height) != (self._stream.width, self._stream.height):
            frame = frame.reformat(width=self._stream.width, height=self._stream.height)
        # Arrival time, in frame slots: a freeze stays a freeze in the recording.
        pts = max(self._last_pts + 1, round((now - self._start) * self._rate))
        out = av.VideoFrame.from_ndarray(frame.to_ndarray(format="yuv420p"), format="yuv420p")
        out.pts, out.time_base = pts, self._time_base
        self._last_pts = pts
        for packet in self._stream.encode(out):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._start is not None:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        self._container.close()
