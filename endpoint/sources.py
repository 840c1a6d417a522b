"""Synthetic media sources: a moving, stamped picture, the same pre-encoded, and a tone.

All pace themselves in real time from their own clock and carry ``pts``/``time_base``, so aiortc
treats them like a camera and a microphone. The pre-encoded picture is encoded once per process
and sent many times (aiortc only packetizes it): how one machine hosts dozens of devices.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from endpoint import audiomark, stamp

VIDEO_CLOCK = 90_000
AUDIO_RATE = 48_000
AUDIO_PTIME = 0.020


class Pacer:
    """Real-time pacing from the first frame: frame ``n`` is due ``n * interval`` after it."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._start: float | None = None

    async def wait(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        delay = self._start + n * self.interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)


class SyntheticPicture:
    """The test picture: a ramp with a camera's sensor noise, a moving box, and the stamp;
    frames as yuv420p arrays.

    The noise (luma ±``noise``, new each frame from a few precomputed backgrounds) makes the
    encoder spend its target bitrate as it would on a webcam's picture: on a clean ramp VP8
    makes well under its target, and a lab's narrow link would look wider than it is."""

    BACKGROUNDS = 4  #: noisy backgrounds, taken in turn

    def __init__(self, width: int, height: int, noise: int = 2) -> None:
        stamp.block_size(width)  # refuses frames too narrow for a stamp
        if width % 2 or height % 2:
            raise ValueError("width and height must be even")
        self.width, self.height = width, height
        # Still backgrounds (luma ramp, tinted chroma) that each frame copies and draws on.
        ramp = np.linspace(40, 200, width, dtype=np.float32)
        luma = np.tile(ramp, (height, 1)).astype(np.int16)
        chroma = np.full((height // 2, width), 128, dtype=np.uint8)
        chroma[: height // 4, : width // 2] = 100
        rng = np.random.default_rng(width * height)
        self._backgrounds = [
            np.vstack([np.clip(luma + rng.integers(-noise, noise + 1, luma.shape), 0, 255)
                       .astype(np.uint8), chroma])
            for _ in range(self.BACKGROUNDS if noise else 1)]
        self._box = max(16, height // 6)
        self.stamped = True  #: draw the stamp (off: a benchmark of what measuring costs)

    def draw(self, n: int, sent_ms: int) -> np.ndarray:
        buffer = self._backgrounds[n % len(self._backgrounds)].copy()
        luma = buffer[: self.height]
        top = stamp.stamp_height(self.width)
        span_x, span_y = self.width - self._box, self.height - self._box - top
        x = int((n * 7) % (2 * span_x))
        x = x if x < span_x else 2 * span_x - x
        y = top + int((math.sin(n / 15) + 1) / 2 * span_y)
        luma[y:y + self._box, x:x + self._box] = 235
        if self.stamped:
            stamp.draw(luma, stamp.Stamp(n, sent_ms, synthetic=True))
        return buffer


class SyntheticVideoTrack(MediaStreamTrack):
    """A moving test picture with the frame counter and send time stamped into every frame."""

    kind = "video"

    def __init__(self, width: int = 640, height: int = 480, fps: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.picture = SyntheticPicture(width, height)
        self.width, self.height, self.fps = width, height, fps
        self._clock = clock
        self._count = 0
        self._pacer = Pacer(1 / fps)
        #: told (pts, time) of each frame as it is captured (drawn): the sender's part starts
        self.on_captured: Callable[[int, float], None] | None = None

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._pacer.wait(self._count)
        n = self._count
        captured = self._clock()
        buffer = self.picture.draw(n, int(captured * 1000))
        frame = av.VideoFrame.from_ndarray(buffer, format="yuv420p")
        frame.pts = int(n * VIDEO_CLOCK / self.fps)
        if self.on_captured is not None:
            self.on_captured(frame.pts, captured)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self._count += 1
        return frame


@dataclass(frozen=True)
class EncodedLoop:
    """A loop of stamped VP8 frames, encoded once. Frame ``k`` carries stamp counter ``k``; the
    first frame is the only keyframe, so the loop plays from the start after any keyframe."""

    width: int
    height: int
    fps: float
    frames: tuple[bytes, ...]

    @classmethod
    def encode(cls, width: int = 640, height: int = 480, fps: float = 30.0,
               seconds: float = 2.0, bitrate: int = 1_000_000) -> EncodedLoop:
        codec = av.CodecContext.create("libvpx", "w")
        codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
        codec.bit_rate = bitrate
        codec.time_base = fractions.Fraction(1, round(fps))
        count = max(2, round(seconds * fps))
        codec.gop_size = count * 10  # one keyframe: the first frame
        codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        source = SyntheticPicture(width, height, noise=0)  # the loop as it always was
        # Light grain below the stamp makes the encoder spend a camera's bitrate (~1 Mbit/s).
        rng = np.random.default_rng(7)
        top = stamp.stamp_height(width)
        frames: list[bytes] = []
        for k in range(count):
            buffer = source.draw(k, 0)
            grain = rng.integers(-6, 7, (height - top, width), dtype=np.int16)
            luma = buffer[top:height].astype(np.int16) + grain
            buffer[top:height] = np.clip(luma, 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(buffer, format="yuv420p")
            frame.pts, frame.time_base = k, codec.time_base
            frames += [bytes(p) for p in codec.encode(frame)]
        frames += [bytes(p) for p in codec.encode(None)]
        if len(frames) != count:
            raise RuntimeError(f"encoder returned {len(frames)} frames for {count}")
        return cls(width, height, fps, tuple(frames))


class PreEncodedVideoTrack(MediaStreamTrack):
    """Plays an EncodedLoop in real time as encoded packets (aiortc sends them without encoding).

    ``on_sent(k, n, at)`` logs that loop frame ``k`` went out as the stream's frame ``n`` at
    ``at``: receivers in this process map the stamp back through it (see SendLog). A keyframe
    request restarts the loop at its keyframe.
    """

    kind = "video"

    def __init__(self, loop: EncodedLoop,
                 on_sent: Callable[[int, int, float], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.loop = loop
        self._on_sent = on_sent
        self._clock = clock
        self._count = 0
        self._position = 0
        self._pacer = Pacer(1 / loop.fps)
        self.keyframe_requests = 0
        #: told (pts, time) of each frame as it is handed out, at its logged send time: the
        #: sender's part starts there (a pre-encoded source has no capture)
        self.on_captured: Callable[[int, float], None] | None = None

    def request_keyframe(self) -> bool:
        self._position = 0
        self.keyframe_requests += 1
        return True

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        await self._pacer.wait(self._count)
        k = self._position
        packet = av.Packet(self.loop.frames[k])
        packet.pts = int(self._count * VIDEO_CLOCK / self.loop.fps)
        packet.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        at = self._clock()
        if self._on_sent is not None:
            self._on_sent(k, self._count, at)
        if self.on_captured is not None:
            self.on_captured(packet.pts, at)
        self._position = (k + 1) % len(self.loop.frames)
        self._count += 1
        return packet


class ToneTrack(MediaStreamTrack):
    """A sine tone, 20 ms per frame, mono s16 at 48 kHz; with ``marks``, once a second a timing
    mark that says when it was sent (endpoint/audiomark.py) takes the tone's place."""

    kind = "audio"

    def __init__(self, frequency: float = 440.0, level_dbfs: float = -12.0,
                 marks: bool = True, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._samples = int(AUDIO_RATE * AUDIO_PTIME)
        self._amplitude = 32767 * 10 ** (level_dbfs / 20)
        self._step = 2 * math.pi * frequency / AUDIO_RATE
        self._count = 0
        self._pacer = Pacer(AUDIO_PTIME)
        self._clock = clock
        self.marks = audiomark.MarkWriter(self._amplitude) if marks else None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._pacer.wait(self._count)
        first = self._count * self._samples
        mark = self.marks.frame(self._count, int(self._clock() * 1000)) \
            if self.marks is not None else None
        if mark is not None:
            samples = mark.reshape(1, -1)
        else:
            phase = (np.arange(first, first + self._samples) * self._step) % (2 * math.pi)
            samples = (np.sin(phase) * self._amplitude).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = first
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self._count += 1
        return frame
