"""Seeing the call: the remote video in a window with live figures over it (OpenCV, when a
display exists), and recording it to a file. Both are off by default (devices are headless)."""

from __future__ import annotations

import fractions
import os
from pathlib import Path
from typing import Any

import av

from relay.messages import MediaStats


class ViewError(Exception):
    """The window cannot be shown; the message says why and what to do."""


class Viewer:
    """One window per call: the other party's picture with latency, fps and loss over it."""

    def __init__(self, title: str) -> None:
        if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
            raise ViewError("--show needs a display (DISPLAY is not set; e.g. run under Xvfb)")
        try:
            import cv2
        except ImportError:
            raise ViewError("--show needs OpenCV with a GUI: pip install opencv-python "
                            "(the -headless build has no windows)") from None
        self._cv2: Any = cv2
        self.title = title
        cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)

    def show(self, frame: av.VideoFrame, stats: MediaStats) -> None:
        cv2 = self._cv2
        image = frame.to_ndarray(format="bgr24")
        lines = [f"latency p50 {stats.latency_ms_p50:.0f} ms" if stats.latency_ms_p50
                 else "latency -", f"{stats.fps:.1f} fps  {stats.frames} frames",
                 f"lost {stats.frames_lost}  freezes {stats.gaps}"]
        for i, line in enumerate(lines):
            y = image.shape[0] - 12 - 22 * (len(lines) - 1 - i)
            cv2.putText(image, line, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3)
            cv2.putText(image, line, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
        cv2.imshow(self.title, image)
        cv2.waitKey(1)

    def close(self) -> None:
        self._cv2.destroyWindow(self.title)
        self._cv2.waitKey(1)


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
