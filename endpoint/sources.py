"""Synthetic media sources: a moving, stamped picture and a tone.

Both pace themselves in real time from their own clock and carry ``pts``/``time_base``, so aiortc
encodes them like a camera and a microphone.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from collections.abc import Callable

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from endpoint import stamp

VIDEO_CLOCK = 90_000
AUDIO_RATE = 48_000
AUDIO_PTIME = 0.020


class SyntheticVideoTrack(MediaStreamTrack):
    """A moving test picture with the frame counter and send time stamped into every frame."""

    kind = "video"

    def __init__(self, width: int = 640, height: int = 480, fps: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        stamp.block_size(width)  # refuses frames too narrow for a stamp
        if width % 2 or height % 2:
            raise ValueError("width and height must be even")
        self.width, self.height, self.fps = width, height, fps
        self._clock = clock
        self._count = 0
        self._start: float | None = None
        # A still background (luma ramp, tinted chroma) that each frame copies and draws on.
        ramp = np.linspace(40, 200, width, dtype=np.float32)
        luma = np.tile(ramp, (height, 1)).astype(np.uint8)
        chroma = np.full((height // 2, width), 128, dtype=np.uint8)
        chroma[: height // 4, : width // 2] = 100
        self._background = np.vstack([luma, chroma])
        self._box = max(16, height // 6)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        due = self._start + self._count / self.fps
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        buffer = self._background.copy()
        luma = buffer[: self.height]
        n = self._count
        span_x, span_y = self.width - self._box, self.height - self._box - stamp.stamp_height(
            self.width)
        x = int((n * 7) % (2 * span_x))
        x = x if x < span_x else 2 * span_x - x
        y = stamp.stamp_height(self.width) + int((math.sin(n / 15) + 1) / 2 * span_y)
        luma[y:y + self._box, x:x + self._box] = 235
        stamp.draw(luma, stamp.Stamp(n, int(self._clock() * 1000)))
        frame = av.VideoFrame.from_ndarray(buffer, format="yuv420p")
        frame.pts = int(n * VIDEO_CLOCK / self.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self._count += 1
        return frame


class ToneTrack(MediaStreamTrack):
    """A continuous sine tone, 20 ms per frame, mono s16 at 48 kHz."""

    kind = "audio"

    def __init__(self, frequency: float = 440.0, level_dbfs: float = -12.0) -> None:
        super().__init__()
        self._samples = int(AUDIO_RATE * AUDIO_PTIME)
        self._amplitude = 32767 * 10 ** (level_dbfs / 20)
        self._step = 2 * math.pi * frequency / AUDIO_RATE
        self._count = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        delay = self._start + self._count * AUDIO_PTIME - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        first = self._count * self._samples
        phase = (np.arange(first, first + self._samples) * self._step) % (2 * math.pi)
        samples = (np.sin(phase) * self._amplitude).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = first
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self._count += 1
        return frame
