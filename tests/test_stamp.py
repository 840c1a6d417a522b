"""The stamp survives real VP8 encode/decode and is read back exactly; damage is detected."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiortc.codecs import get_decoder, get_encoder
from aiortc.codecs.vpx import VpxPayloadDescriptor
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from endpoint import stamp
from endpoint.meter import VideoMeter
from endpoint.sources import SyntheticVideoTrack


def luma_of(frame) -> np.ndarray:
    plane = frame.planes[0]
    return np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)[:, :frame.width]


def test_codec_round_trip_in_memory():
    original = stamp.Stamp(counter=123456, sent_ms=0xDEADBEEF)
    assert stamp.Stamp.from_bytes(original.to_bytes()) == original
    damaged = bytearray(original.to_bytes())
    damaged[2] ^= 0x10
    assert stamp.Stamp.from_bytes(bytes(damaged)) is None


def test_draw_read_on_raw_plane_and_noise_rejected():
    luma = np.full((240, 320), 128, np.uint8)
    stamp.draw(luma, stamp.Stamp(7, 99))
    assert stamp.read(luma) == stamp.Stamp(7, 99)
    rng = np.random.default_rng(1)
    assert stamp.read(rng.integers(0, 255, (240, 320), dtype=np.uint8)) is None
    assert stamp.read(np.zeros((100, 200), np.uint8)) is None  # too small to carry one


def test_unwrap_picks_nearest_full_time():
    now = 1_795_000_000_123
    assert stamp.unwrap_ms((now - 40) & 0xFFFFFFFF, now) == now - 40
    assert stamp.unwrap_ms((now + 5) & 0xFFFFFFFF, now) == now + 5


@pytest.mark.parametrize("width,height", [(320, 240), (640, 480), (1280, 720)])
def test_stamp_survives_vp8(width, height):
    async def run() -> list[stamp.Stamp | None]:
        track = SyntheticVideoTrack(width, height, fps=120)
        codec = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
        encoder, decoder = get_encoder(codec), get_decoder(codec)
        found = []
        for _ in range(20):
            payloads, timestamp = encoder.encode(await track.recv(), False)
            data = b"".join(VpxPayloadDescriptor.parse(p)[1] for p in payloads)
            for frame in decoder.decode(JitterFrame(data=data, timestamp=timestamp)):
                found.append(stamp.read(luma_of(frame)))
        return found

    found = asyncio.run(run())
    assert [s.counter if s else None for s in found] == list(range(20))


def test_meter_counts_latency_loss_and_freezes():
    meter = VideoMeter()
    t0 = 1_795_000_000.0
    assert meter.frame(stamp.Stamp(0, int(t0 * 1000) & 0xFFFFFFFF), t0 + 0.030)
    for n in range(1, 10):
        now = t0 + n / 30 + 0.030
        assert not meter.frame(stamp.Stamp(n, int((t0 + n / 30) * 1000) & 0xFFFFFFFF), now)
    # frames 10..14 lost, then a freeze of 0.5 s
    meter.frame(stamp.Stamp(15, int((t0 + 1.0) * 1000) & 0xFFFFFFFF), t0 + 1.030)
    meter.frame(None, t0 + 1.04)
    stats = meter.stats(t0 + 1.1)
    assert stats.frames == 12  # every decoded frame, the unstamped one too
    assert stats.frames_lost == 5
    assert stats.unreadable == 1
    assert stats.gaps == 1
    assert 29 <= stats.latency_ms_p50 <= 31
    assert stats.fps == pytest.approx(11 / 1.01, rel=0.01)


def test_a_freeze_is_judged_against_the_last_30_frames_not_the_whole_call():
    # W3C webrtc-stats: a gap >= max(3 x mean, mean + 150 ms), the mean over the last 30 frames.
    # 10 s at 5 fps, then 30 fps: a 210 ms gap is a freeze at 30 fps (mean 33 ms: limit 183 ms),
    # but not against the whole call's mean (about 160 ms: limit 480 ms).
    meter = VideoMeter()
    now = 100.0
    for _ in range(50):
        meter.frame(None, now)
        now += 0.2
    for _ in range(60):
        meter.frame(None, now)
        now += 1 / 30
    assert meter.gaps == 0
    meter.frame(None, now + 0.210 - 1 / 30)
    assert meter.gaps == 1
    # the first gaps of a call are not judged (a mean of fewer than 5 says little)
    early = VideoMeter()
    for t in (0.0, 0.033, 0.5):
        early.frame(None, t)
    assert early.gaps == 0


def test_meter_counts_frames_without_stamps():
    """A real camera's frames carry no stamp: they still arrive, count, and start the call."""
    meter = VideoMeter()
    assert meter.frame(None, 100.0)
    for n in range(1, 30):
        assert not meter.frame(None, 100.0 + n / 30)
    stats = meter.stats(101.0)
    assert stats.frames == 30 and stats.unreadable == 30 and stats.latency_ms_p50 is None
    assert stats.fps == pytest.approx(30, rel=0.01)


def test_a_freeze_the_sender_made_is_told_from_one_the_path_made():
    def run(send_stall: float, receive_stall: float, lose: int = 0) -> VideoMeter:
        meter = VideoMeter()
        sent = received = 1_795_000_000.0
        for n in range(40):
            if n == 30:
                sent += send_stall + lose / 30  # lost frames were sent, and never came
                received += send_stall + receive_stall + lose / 30
            counter = n + (lose if n >= 30 else 0)
            meter.frame(stamp.Stamp(counter, int(sent * 1000) & 0xFFFFFFFF), received + 0.03,
                        sent_at=sent)
            sent += 1 / 30
            received += 1 / 30
        return meter

    by_sender = run(send_stall=0.3, receive_stall=0.0)  # the source sent nothing for 300 ms
    assert by_sender.gaps == 1 and by_sender.gaps_source == 1
    by_path = run(send_stall=0.0, receive_stall=0.3)  # sent on time, held on the way
    assert by_path.gaps == 1 and by_path.gaps_source == 0
    # frames lost on the way: the sender's gap to the next frame seen is not its own stall
    lost = run(send_stall=0.0, receive_stall=0.0, lose=9)
    assert lost.gaps == 1 and lost.gaps_source == 0 and lost.lost == 9
