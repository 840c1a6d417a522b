"""Audio timing marks through aiortc's own Opus encoder and decoder, the audio meter (loss,
jitter, latency, lip sync), the E-model call score, and the audio playout buffer."""

from __future__ import annotations

import fractions
import math

import av
import numpy as np
import pytest
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket

from endpoint import audiomark, emodel
from endpoint.meter import AudioMeter, VideoMeter
from endpoint.playout import PlayoutBuffer
from endpoint.stamp import Stamp

AMPLITUDE = 32767 * 10 ** (-12 / 20)


def test_a_mark_carries_its_time_and_its_crc_catches_a_wrong_symbol():
    symbols = audiomark.encode(123_456_789)
    assert symbols[0] == audiomark.SYNC and len(symbols) == audiomark.MARK_FRAMES
    assert audiomark.decode(symbols[1:]) == 123_456_789 & audiomark.TIME_MASK
    for k in range(1, len(symbols)):
        wrong = list(symbols[1:])
        wrong[k - 1] ^= 0x5
        assert audiomark.decode(wrong) is None  # CRC-8 sees any one symbol wrong
    assert audiomark.decode(symbols[1:5]) is None


def test_unwrap_finds_the_send_time_nearest_now():
    now = 1_764_000_000_123
    for latency in (0, 40, 5_000, 600_000):
        sent = now - latency
        assert audiomark.unwrap(sent & audiomark.TIME_MASK, now) == sent


def opus_chain(n_frames: int, bitrate: int, drop: set[int] = frozenset(),
               sent: int = 1_000_000) -> list[tuple[np.ndarray, int, float]]:
    """The tone with marks, through aiortc's Opus encoder and decoder at ``bitrate``: the
    decoded frames (first channel, pts, a delivery time 20 ms a frame), ``drop``ped frames
    never decoded."""
    encoder, decoder = OpusEncoder(), OpusDecoder()
    encoder.codec.bit_rate = bitrate
    writer = audiomark.MarkWriter(AMPLITUDE)
    out = []
    for n in range(n_frames):
        samples = writer.frame(n, sent + 20 * n)
        if samples is None:
            t = np.arange(n * 960, (n + 1) * 960) / 48_000
            samples = (np.sin(2 * math.pi * 440 * t) * AMPLITUDE).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate, frame.pts = 48_000, n * 960
        frame.time_base = fractions.Fraction(1, 48_000)
        payloads, timestamp = encoder.encode(frame)
        for payload in payloads:
            if n in drop:
                continue
            for decoded in decoder.decode(JitterFrame(data=payload, timestamp=timestamp)):
                out.append((decoded.to_ndarray().reshape(-1)[::2], decoded.pts, n * 0.020))
    return out


@pytest.mark.parametrize("bitrate", [24_000, 32_000, 96_000])
def test_every_mark_survives_opus_at_its_time(bitrate):
    reader = audiomark.MarkReader()
    marks = [m for mono, pts, at in opus_chain(260, bitrate) if (m := reader.frame(mono, pts, at))]
    # frames 10, 60, 110, 160, 210 start a mark, sent at 1_000_000 + 20 n ms
    assert [m.sent_ms - 1_000_000 for m in marks] == [200, 1200, 2200, 3200, 4200]
    # each read back on the frame it was sent in (Opus's 6.5 ms is within the frame)
    assert [round(m.at, 3) for m in marks] == [0.2, 1.2, 2.2, 3.2, 4.2]


def test_a_lost_frame_loses_the_mark_it_was_in_and_only_that():
    reader = audiomark.MarkReader()
    frames = opus_chain(160, 32_000, drop={64})  # inside the second mark (frames 60-68)
    marks = [m for mono, pts, at in frames if (m := reader.frame(mono, pts, at))]
    assert [m.sent_ms - 1_000_000 for m in marks] == [200, 2200]


def test_the_plain_tone_and_silence_carry_no_symbol():
    detector = audiomark.SymbolDetector()
    t = np.arange(960) / 48_000
    assert detector.symbol((np.sin(2 * math.pi * 440 * t) * AMPLITUDE).astype(np.int16)) is None
    assert detector.symbol(np.zeros(960, np.int16)) is None
    assert detector.symbol(audiomark.tone(audiomark.DATA_TONES[7], AMPLITUDE)) == 7


def test_the_audio_meter_times_marks_counts_losses_and_marks_lost():
    meter = AudioMeter()
    frames = opus_chain(270, 32_000, drop={64, 100, 101})
    base = 1_000_000 / 1000  # the chain's send times are 1_000_000 ms + 20 ms a frame
    latency = 0.045
    for mono, pts, at in frames:
        meter.frame(mono.reshape(1, -1), base + at + latency, pts)
    figures = meter.figures()
    assert figures["audio_frames_lost"] == 3
    # marks start at frames 10, 60, ..., 260: the one at 60 is lost (frame 64)
    assert figures["audio_marks"] == 5 and figures["audio_marks_lost"] == 1
    assert figures["audio_latency_ms_p50"] == pytest.approx(45, abs=1)
    assert figures["audio_jitter_ms"] == pytest.approx(0, abs=0.5)
    loss = 100 * 3 / 270
    assert figures["mos"] == pytest.approx(emodel.mos(45, 0, loss), abs=0.02)


def test_lip_sync_is_audio_latency_minus_the_video_latency_of_the_same_moment():
    video, audio = VideoMeter(), AudioMeter()
    now_ms = 1_764_000_000_000
    # video frames sent every 33 ms from now_ms, each arriving 80 ms later
    for k in range(60):
        sent = now_ms + 33 * k
        video.frame(Stamp(k, sent & 0xFFFFFFFF), (sent + 80) / 1000)
    # a mark sent at now_ms + 500 arrives 30 ms later: the sound leads the picture by 50 ms
    mark = audiomark.Mark((now_ms + 500) & audiomark.TIME_MASK, (now_ms + 530) / 1000)
    audio._timed(mark, mark.at)
    audio.pair(video)
    assert audio.figures()["av_sync_ms"] == pytest.approx(-50, abs=0.5)
    # a mark whose moment has no video yet waits for it
    later = audiomark.Mark((now_ms + 2500) & audiomark.TIME_MASK, (now_ms + 2650) / 1000)
    audio._timed(later, later.at)
    audio.pair(video)
    assert audio.figures()["av_sync_samples"] == 1
    sent = now_ms + 2500
    video.frame(Stamp(99, sent & 0xFFFFFFFF), (sent + 80) / 1000)
    audio.pair(video)
    assert sorted(audio.skews_ms) == pytest.approx([-50, 70], abs=0.5)


def test_the_e_model_scores_delay_and_loss_as_g107_does():
    assert emodel.mos(0, 0, 0) == pytest.approx(4.41, abs=0.01)  # R0 = 93.2
    assert emodel.mos(50, 0, 0) >= 4.0
    assert emodel.mos(50, 0, 0) > emodel.mos(150, 0, 0) > emodel.mos(300, 0, 0)
    # past 177.3 ms the delay impairment steepens
    assert emodel.delay_impairment(277.3) - emodel.delay_impairment(177.3) == \
        pytest.approx(2.4 + 11.0)
    assert emodel.mos(50, 0, 1) == pytest.approx(3.78, abs=0.01)
    assert emodel.mos(50, 0, 5) < 2.5
    assert emodel.mos(50, 10, 0) == emodel.mos(70, 0, 0)  # jitter: twice itself in buffer
    assert emodel.r_to_mos(-5) == 1.0 and emodel.r_to_mos(120) == 4.5


def feed(buffer, sequence: list[int]) -> list[tuple[int, int | None]]:
    """(packet number, frame out or None) for each packet in ``sequence`` (one per frame)."""
    out = []
    for n in sequence:
        packet = RtpPacket(payload_type=111, sequence_number=n, timestamp=960 * n)
        packet._data = b"\x00"
        _, frame = buffer.add(packet)
        out.append((n, frame.timestamp // 960 if frame is not None else None))
    return out


def test_the_playout_buffer_gives_up_on_a_lost_packet_and_keeps_its_delay():
    sequence = [n for n in range(40) if n != 10]  # packet 10 never comes
    ours = feed(PlayoutBuffer(depth=2), sequence)
    played = [frame for _, frame in ours if frame is not None]
    assert 10 not in played and played == sorted(played)
    # before the gap and well after it, frame n plays when packet n + 2 comes in
    assert all(frame == n - 2 for n, frame in ours if frame is not None and n not in range(10, 15))
    assert [frame for n, frame in ours if n >= 20] == [n - 2 for n in range(20, 40)]
    # aiortc's own (4 frames, waits for the gap until 16 packets are in) plays late for ever
    theirs = feed(JitterBuffer(capacity=16, prefetch=4), sequence)
    assert [n - frame for n, frame in theirs[-10:]] and \
        min(n - frame for n, frame in theirs[-10:] if frame is not None) >= 14
    # a packet late by one frame is still played in its turn (depth 2 reorders it)
    reordered = PlayoutBuffer(depth=2)
    assert [f for _, f in feed(reordered, [0, 1, 2, 3, 5, 4, 6, 7, 8]) if f is not None] == \
        list(range(7))
    assert reordered.skipped == 0
