"""Fan-out in the media graph with real aiortc peers on 127.0.0.1: one producer (a live VP8
encoder's stream), one consumer watching it, then a second consumer attached mid-stream. The
second asks upstream for a keyframe, starts at one, and its viewer decodes video at once; the
first viewer loses nothing. (aiortc's encoder makes a keyframe only every 3,000 frames: without
the request the late viewer would decode nothing for 100 s.)"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
from collections.abc import AsyncIterator

import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription

from rtc.adapter import (
    new_peer_connection,
    prefer_video_codec,
    restrict_host_candidates,
    wrap_rtp_handler,
)
from rtc.graph import Router
from rtc.rtp import is_keyframe
from rtc.stages import ForwardingStats

from .conftest import LOOPBACK

pytestmark = pytest.mark.e2e


class MovingPicture(MediaStreamTrack):
    """320x240 at 30 fps, a bar moving across: cheap to encode, never the same twice."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._n = 0
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        at = self._start + self._n / 30
        await asyncio.sleep(max(0.0, at - loop.time()))
        picture = np.full((240, 320, 3), 40, np.uint8)
        picture[:, (self._n * 4) % 320:(self._n * 4) % 320 + 16] = 220
        frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
        frame.pts, frame.time_base = self._n * 3000, fractions.Fraction(1, 90000)
        self._n += 1
        return frame


async def _connect(offerer: RTCPeerConnection, answerer: RTCPeerConnection,
                   before_answer=None) -> None:
    restrict_host_candidates(offerer, LOOPBACK.addresses)
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    if before_answer is not None:
        before_answer()
    restrict_host_candidates(answerer, LOOPBACK.addresses)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(RTCSessionDescription(
        sdp=answerer.localDescription.sdp, type="answer"))


class Viewer:
    """A plain aiortc peer that decodes what it is sent, and notes whether the first packet it
    got began a keyframe."""

    def __init__(self) -> None:
        self.pc = new_peer_connection(LOOPBACK)
        self.frames = 0
        self.first_packet_keyframe: bool | None = None
        self._task: asyncio.Task[None] | None = None

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._task = asyncio.ensure_future(self._decode(track))

    def watch_packets(self) -> None:
        receiver = self.pc.getTransceivers()[0].receiver

        def first(handle):
            async def noted(packet, arrival_time_ms):
                if self.first_packet_keyframe is None:
                    self.first_packet_keyframe = is_keyframe("video/VP8", packet.payload)
                await handle(packet, arrival_time_ms)

            return noted

        wrap_rtp_handler(receiver, first)

    async def _decode(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(Exception):
            while True:
                await track.recv()
                self.frames += 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.pc.close()


async def _watch(router: Router, producer, name: str) -> tuple[Viewer, RTCPeerConnection]:
    """A relay-side leg offering the producer's stream to a new viewer."""
    leg = new_peer_connection(LOOPBACK)
    transceiver = leg.addTransceiver("video", direction="sendonly")
    prefer_video_codec(transceiver, "video/VP8", only=True)
    router.consume(producer, router.transport(name, {"video": transceiver}))
    viewer = Viewer()
    await _connect(leg, viewer.pc, viewer.watch_packets)
    return viewer, leg


async def _until(predicate, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - polls peers owned by aiortc
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"waited {timeout} s for {what}") from None


@contextlib.asynccontextmanager
async def _closing(*things) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for thing in things:
            await thing()


async def test_a_second_consumer_on_a_live_producer_decodes_from_a_keyframe():
    stats = ForwardingStats()
    router = Router("fan-out", stats, keyframe_interval=0.25)
    source = new_peer_connection(LOOPBACK)
    relay_in = new_peer_connection(LOOPBACK)
    prefer_video_codec(source.addTransceiver(MovingPicture(), direction="sendonly"),
                       "video/VP8", only=True)
    made: dict[str, object] = {}
    pcs: list[RTCPeerConnection] = [source, relay_in]
    viewers: list[Viewer] = []

    def take_producer() -> None:
        transceiver: RTCRtpTransceiver = relay_in.getTransceivers()[0]
        transport = router.transport("in", {"video": transceiver})
        made["producer"] = router.produce(transport, "video")

    async def close_all() -> None:
        router.close("test over")
        for viewer in viewers:
            await viewer.close()
        for pc in pcs:
            await pc.close()

    async with _closing(close_all):
        await _connect(source, relay_in, take_producer)
        producer = made["producer"]
        first, leg = await _watch(router, producer, "first")
        viewers.append(first)
        pcs.append(leg)
        await _until(lambda: first.frames >= 30, 15, "the first viewer decoding")
        assert first.first_packet_keyframe is True
        asked = stats.keyframe_requests_up

        second, leg = await _watch(router, producer, "second")  # the producer is live
        viewers.append(second)
        pcs.append(leg)
        frames_first = first.frames
        await _until(lambda: second.frames >= 15, 5, "the second viewer decoding")
        assert stats.keyframe_requests_up > asked  # it asked upstream when it joined
        assert second.first_packet_keyframe is True  # and started at the keyframe
        assert first.frames >= frames_first + 10  # the first viewer went on meanwhile
        assert len(producer.consumers) == 2
        assert producer.meter.packets > 0 and stats.packets > producer.meter.packets
