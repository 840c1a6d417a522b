"""Forwarding's pure parts: sequence mapping, keyframe detection, request coalescing."""

from __future__ import annotations

import asyncio

import pytest
from aiortc.codecs import get_encoder
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from endpoint.sources import SyntheticVideoTrack
from rtc.rtp import RequestLimiter, SequenceMap, is_keyframe, same_codec

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
H264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102,
                             parameters={"packetization-mode": "1",
                                         "profile-level-id": "42e01f"})


def test_sequence_map_keeps_gaps_and_wraps():
    m = SequenceMap(seq_origin=65534, ts_origin=0xFFFFFF00)
    m.restart(seq=100, ts=5000)
    assert m.map(100, 5000) == (65534, 0xFFFFFF00)
    assert m.map(101, 8000) == (65535, (0xFFFFFF00 + 3000) & 0xFFFFFFFF)
    assert m.map(103, 8000) == (1, (0xFFFFFF00 + 3000) & 0xFFFFFFFF)  # gap kept, wrapped
    assert m.map(102, 8000) == (0, (0xFFFFFF00 + 3000) & 0xFFFFFFFF)  # late packet fills it
    assert m.map(99, 2000) is None  # from before the start


def test_sequence_map_restart_continues_after_last_packet():
    m = SequenceMap(seq_origin=10, ts_origin=1000)
    m.restart(500, 90000)
    assert m.map(501, 93000) == (11, 4000)
    m.restart(7, 123, ts_step=3000)  # a new source with its own numbering
    assert m.map(7, 123) == (12, 7000)
    assert m.map(8, 3123) == (13, 10000)


def test_request_limiter_coalesces():
    limiter = RequestLimiter(0.25)
    assert limiter.ask(10.0) == 0.0
    assert limiter.ask(10.05) == pytest.approx(0.2)
    for t in (10.06, 10.1, 10.2):
        assert limiter.ask(t) is None  # already coming
    limiter.fired(10.25)
    assert limiter.ask(10.3) == pytest.approx(0.2)
    limiter.fired(10.5)
    assert limiter.ask(10.8) == 0.0


def encoded_payloads(codec: RTCRtpCodecParameters, frames: int) -> list[list[bytes]]:
    async def run() -> list[list[bytes]]:
        track = SyntheticVideoTrack(320, 240, fps=120)
        encoder = get_encoder(codec)
        return [encoder.encode(await track.recv(), False)[0] for _ in range(frames)]
    return asyncio.run(run())


@pytest.mark.parametrize("codec", [VP8, H264], ids=["vp8", "h264"])
def test_keyframe_detected_only_at_the_start_of_a_keyframe(codec):
    frames = encoded_payloads(codec, 5)
    assert is_keyframe(codec.mimeType, frames[0][0])  # an encoder starts with a keyframe
    for payloads in frames[1:]:  # then delta frames
        assert not any(is_keyframe(codec.mimeType, p) for p in payloads)
    if codec is VP8:  # continuation packets of the keyframe do not start one
        assert not any(is_keyframe(codec.mimeType, p) for p in frames[0][1:])


def test_keyframe_edge_cases():
    assert not is_keyframe("video/VP8", b"")
    assert not is_keyframe("video/VP8", b"\x90")  # extension byte missing
    assert is_keyframe("audio/opus", b"\x01")


def test_same_codec():
    assert same_codec(VP8, RTCRtpCodecParameters(mimeType="video/vp8", clockRate=90000,
                                                 payloadType=100))
    assert not same_codec(VP8, H264)
    mode0 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=99,
                                  parameters={"packetization-mode": "0"})
    assert not same_codec(H264, mode0)
