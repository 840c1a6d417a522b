"""Congestion control as pure logic: the abs-send-time read off a forwarded packet, the least of a
hop's own estimate and the downstream report sent upstream (coalesced and rate-limited), and the
device's rule for taking a new encoder target."""

from __future__ import annotations

import itertools

import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket

from endpoint.bitrate import EncoderTarget
from rtc.congestion import ABS_SEND_TIME_URI, Feedback, abs_send_time_of


def _packet(abs_send_time: int | None, mid: str | None = "0") -> bytes:
    extensions = HeaderExtensionsMap()
    extensions.configure(type("P", (), {"headerExtensions": [
        RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
        RTCRtpHeaderExtensionParameters(id=3, uri=ABS_SEND_TIME_URI)]})())
    packet = RtpPacket(payload_type=96, sequence_number=7, timestamp=9, ssrc=1234,
                       payload=b"\x90\x80\x05" + bytes(100))
    packet.extensions.mid = mid
    packet.extensions.abs_send_time = abs_send_time
    return packet.serialize(extensions)


def test_abs_send_time_is_read_from_the_header_extension_as_aiortc_wrote_it():
    assert abs_send_time_of(_packet(0xABCDEF), 3) == 0xABCDEF
    assert abs_send_time_of(_packet(0x000001, mid=None), 3) == 1  # the only element
    assert abs_send_time_of(_packet(None), 3) is None  # mid only
    assert abs_send_time_of(_packet(0xABCDEF), 0) is None  # not negotiated
    assert abs_send_time_of(_packet(0xABCDEF), 5) is None  # another id
    plain = bytearray(_packet(None, mid=None))
    assert abs_send_time_of(bytes(plain), 3) is None  # no extension at all
    truncated = _packet(0xABCDEF)[:16]
    assert abs_send_time_of(truncated, 3) is None


def test_feedback_sends_the_least_of_its_own_and_downstream_at_once_when_it_falls():
    feedback = Feedback()
    assert feedback.limit(0.0) is None and feedback.due(0.0) is None
    assert feedback.own(2_000_000, 0.0) == 2_000_000  # the first figure goes out at once
    assert feedback.downstream(400_000, 0.05) is None  # a fall, but inside min_gap
    assert feedback.due(0.11) == 400_000  # the narrower link downstream
    assert feedback.limit(0.11) == (400_000, "downstream")
    assert feedback.own(390_000, 0.2) is None  # under 3 % lower: waits for the refresh
    assert feedback.own(300_000, 0.25) == 300_000  # this hop's own leg is narrower still
    assert feedback.limit(0.25) == (300_000, "own")
    # rises wait for the refresh: at most one report a second
    assert feedback.own(900_000, 0.5) is None
    assert feedback.due(1.24) is None
    assert feedback.due(1.25) == 400_000  # own rose past downstream: downstream limits
    # a downstream report not renewed for 5 s no longer counts
    assert feedback.limit(5.2) == (900_000, "own")
    assert feedback.reports_sent == 4


def test_feedback_reports_are_rate_limited_however_many_estimates_come():
    feedback = Feedback()
    sent = [bps for i in range(1000)  # an estimate every 10 ms for 10 s, ever lower
            if (bps := feedback.own(2_000_000 - i * 1000, i * 0.01)) is not None]
    # every fall of 3 % goes out, no sooner than 100 ms apart: ~ one per 0.6 s here
    assert 10 <= len(sent) <= 25, len(sent)
    assert sent == sorted(sent, reverse=True)


def test_the_encoder_takes_falls_at_once_and_rises_slowly():
    target = EncoderTarget(headroom=1.0, target=500_000)
    assert target.offer(480_000, 0.0) is None  # within 10 %: no restart of the encoder
    assert target.offer(300_000, 0.5) == 300_000  # a fall: at once
    assert target.offer(50_000, 0.6) == 100_000  # never below the floor
    assert target.offer(110_000, 1.0) is None  # a rise of 10 %: not worth a keyframe
    assert target.offer(400_000, 2.0) is None  # a rise, but too soon after the last change
    assert target.offer(400_000, 3.6) == 400_000
    assert target.offer(9_000_000, 7.0) == 1_500_000  # never above the ceiling
    assert target.changes == 4 and target.reported == 9_000_000
    # an encoder making less than its target: a report of what it sends is no reason to
    # restart it; one under what it sends is
    target = EncoderTarget(headroom=1.0, target=500_000)
    assert target.offer(330_000, 0.0, sent_bps=280_000) is None
    assert target.offer(270_000, 0.2, sent_bps=280_000) is None
    assert target.offer(240_000, 0.5, sent_bps=280_000) == 240_000


def test_a_rise_the_path_could_not_carry_doubles_the_wait_before_the_next():
    # each rise restarts the encoder with a keyframe: on a path that cannot carry the rise,
    # that burst goes into a full link; the device tries again less and less often
    target = EncoderTarget(headroom=1.0, target=500_000)
    assert target.offer(300_000, 0.0) == 300_000  # converged
    assert target.offer(400_000, 3.0) == 400_000  # a rise, 3 s on
    assert target.offer(300_000, 4.0) == 300_000  # which did not hold
    assert target.offer(400_000, 9.0) is None  # so the next waits 6 s, not 3
    assert target.offer(400_000, 10.0) == 400_000
    assert target.offer(300_000, 11.0) == 300_000  # nor did that one: 12 s
    assert target.offer(400_000, 22.0) is None
    assert target.offer(400_000, 23.0) == 400_000
    # this one holds (no fall for 10 s): the wait is back to 3 s
    assert target.offer(400_000, 33.5) is None
    assert target.offer(600_000, 36.6) == 600_000
    for now in range(37, 200, 1):  # a path that never carries a rise: at most every 60 s
        target.offer(300_000 if target.target > 300_000 else 900_000, float(now))
    rises = target.changes
    for now in range(200, 320):
        target.offer(300_000 if target.target > 300_000 else 900_000, float(now))
    assert target.changes - rises <= 4  # two rises and their falls in 120 s


def test_the_encoder_aims_under_what_the_path_reports():
    # headroom 0.9: room for audio, headers and the estimate's probing
    target = EncoderTarget(target=500_000)
    assert target.offer(300_000, 0.0) == 270_000
    assert target.offer(100_000, 1.0) == 100_000  # the floor still holds


def test_the_link_that_limits_the_rate_is_the_one_into_the_first_hop_that_estimates_low():
    from probe.bottleneck import rate_limit

    def hop(server: str, c2c: dict, c2u: dict | None = None) -> dict:
        return {"server": server, "streams": {"caller_to_callee": {"video": c2c},
                                              "callee_to_caller": {"video": c2u or {}}}}

    # upper -> lower-b is narrow: upper's estimate of its own incoming link is high, lower-b's
    # (and the callee device's, which lower-b hears as its downstream report) low
    hops = [hop("lower-a", {"estimate_kbps": 900, "reported_kbps": 310},
                {"estimate_kbps": 200, "reported_kbps": 190, "limited_by": "own"}),
            hop("upper", {"estimate_kbps": 880, "reported_kbps": 310}),
            hop("lower-b", {"estimate_kbps": 320, "downstream_kbps": 310,
                            "reported_kbps": 310},
                {"estimate_kbps": 150, "reported_kbps": 150})]
    names = ["lower-a/cam-1", "lower-a", "upper", "lower-b", "lower-b/cam-2"]
    links = [{"from": a, "to": b} for a, b in itertools.pairwise(names)]
    found = rate_limit(hops, links, "caller_to_callee", {"caller_to_callee": {"adapts": True}})
    assert found == {"link": "upper -> lower-b", "by": "estimate", "kbps": 310,
                     "estimates": {"lower-a": 900, "upper": 880, "lower-b": 320,
                                   "lower-b/cam-2": 310},
                     "overuses": {"lower-a": None, "upper": None, "lower-b": None},
                     "sender_adapts": True}
    # the other way, the first hop's own estimate is already low: the link from the callee
    # device (links are named in the caller-to-callee order)
    back = rate_limit(hops, links, "callee_to_caller")
    assert back is not None and back["link"] == "lower-b -> lower-b/cam-2", back
    assert rate_limit([hop("a", {})], links[:2], "caller_to_callee") is None  # control off


def test_the_limiting_link_is_the_one_into_the_first_hop_that_found_the_queue_growing():
    """Past the narrow link every estimate reads about its rate, and which is lowest is down
    to each estimator's swings: a hop that found the queue growing is past it, one before is
    not. No hop did: the receiving device's link if its report is the limit, else none."""
    from probe.bottleneck import rate_limit

    def hops(*videos: dict) -> list[dict]:
        return [{"server": name, "streams": {"caller_to_callee": {"video": video}}}
                for name, video in zip(("lower-b", "upper", "lower-a"), videos, strict=True)]

    names = ["lower-b/cam-b", "lower-b", "upper", "lower-a", "lower-a/cam-a"]
    links = [{"from": a, "to": b} for a, b in itertools.pairwise(names)]
    # the trunk upper -> lower-a is narrow; the device behind lower-a reports lowest
    found = rate_limit(hops({"estimate_kbps": 420, "reported_kbps": 190, "overuses": 0},
                            {"estimate_kbps": 400, "reported_kbps": 190, "overuses": 0},
                            {"estimate_kbps": 286, "downstream_kbps": 190,
                             "reported_kbps": 190, "overuses": 2}),
                       links, "caller_to_callee")
    assert found is not None and (found["link"], found["by"]) == ("upper -> lower-a", "queue")
    assert found["overuses"] == {"lower-b": 0, "upper": 0, "lower-a": 2}
    # no hop saw a queue, the device's report is the limit: the device's own link
    quiet = {"estimate_kbps": 900, "reported_kbps": 300, "overuses": 0}
    found = rate_limit(hops(quiet, quiet, {**quiet, "downstream_kbps": 300}), links,
                       "caller_to_callee")
    assert found is not None and (found["link"], found["by"]) == ("lower-a -> lower-a/cam-a",
                                                                  "receiver")
    # nor that: a hop's own estimate, still rising, is all that holds the rate
    found = rate_limit(hops({**quiet, "estimate_kbps": 300}, quiet,
                            {**quiet, "downstream_kbps": 700}), links, "caller_to_callee")
    assert found is not None and (found["link"], found["by"]) == (None, "ramp")


def test_the_estimate_counts_each_time_it_finds_the_queue_growing() -> None:
    from rtc.congestion import DelayEstimator

    steady, queued = DelayEstimator(), DelayEstimator()
    for n in range(300):  # a frame every 33 ms; one path queues 5 ms more each frame
        send = n * 33.0
        steady.group(send, int(send) + 20, 1000)
        queued.group(send, int(send + 20 + (5 * (n - 100) if n > 100 else 0)), 1000)
    assert steady.overuses == 0
    assert queued.overuses >= 1


def _bottleneck(capacity_bps: int, seconds: float = 12, rate: int = 1_000_000,
                fps: int = 30, size: int = 1100) -> tuple[int | None, int | None]:
    """A stream through one queue of ``capacity_bps``: the last estimate of aiortc's estimator
    fed every packet, and of :class:`Estimate` (fed once a frame, on its last packet, as the
    relay feeds it)."""
    from aiortc.rate import RemoteBitrateEstimator

    from rtc.congestion import Estimate

    each, grouped = RemoteBitrateEstimator(), Estimate(3)
    arrive = 0.0
    last: list[int | None] = [None, None]
    packets = max(1, rate // 8 // fps // size)
    for n in range(int(seconds * fps)):
        for k in range(packets):  # a frame's packets, back to back
            send = n / fps + k * 0.0002
            arrive = max(arrive, send + 0.01) + size * 8 / capacity_bps
            sent, ms = int(send * (1 << 18)) & 0xFFFFFF, int(arrive * 1000)
            found = each.add(arrival_time_ms=ms, abs_send_time=sent, payload_size=size, ssrc=1)
            last[0] = found[0] if found else last[0]
        grouped.sent(sent, packets * size, ms)  # the frame's last packet: noted
        if n % 3 == 2:  # and worked in a tick's frames at a time, as the server does
            last[1] = grouped.drain() or last[1]
    return last[0], last[1]


def test_the_estimate_fed_per_packet_group_reads_as_the_estimator_fed_every_packet():
    # a 1 Mbit/s stream into a 400 kbit/s queue: both find the queue, to within 10 %
    each, grouped = _bottleneck(400_000)
    assert each is not None and grouped is not None
    assert each < 400_000 and abs(grouped - each) / each < 0.1, (each, grouped)
    # into a 2 Mbit/s one: no queue, both allow more than is sent
    each, grouped = _bottleneck(2_000_000)
    assert each is not None and grouped is not None and grouped > 1_000_000
    assert abs(grouped - each) / each < 0.1, (each, grouped)


def test_a_receiver_stalled_by_a_lost_packet_asks_for_a_keyframe_and_starts_again_there():
    import queue
    import types

    from aiortc.jitterbuffer import JitterBuffer
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters
    from aiortc.rtp import RtpPacket
    from aiortc.utils import uint16_add

    from endpoint.recovery import StallGuard

    buffer = JitterBuffer(capacity=512, is_video=True)
    decoded: queue.Queue = queue.Queue()
    receiver = types.SimpleNamespace(
        _RTCRtpReceiver__jitter_buffer=buffer, _RTCRtpReceiver__decoder_queue=decoded,
        _RTCRtpReceiver__decoder_thread=True,
        _RTCRtpReceiver__timestamp_mapper=types.SimpleNamespace(map=lambda ts: ts),
        _RTCRtpReceiver__codecs={96: RTCRtpCodecParameters(mimeType="video/VP8",
                                                           clockRate=90000, payloadType=96)})
    asked: list[int] = []
    guard = StallGuard(receiver, asked.append)
    keyframe = b"\x90\x80\x05" + b"\x00" + bytes(50)  # S=1, PID=0, VP8 P bit 0: a keyframe
    inter = b"\x90\x80\x05" + b"\x01" + bytes(50)

    def arrive(seq: int, frame: int, payload: bytes, now: float) -> None:
        packet = RtpPacket(payload_type=96, sequence_number=seq, timestamp=frame * 3000,
                           ssrc=7, payload=payload)
        packet._data = payload  # type: ignore[attr-defined]  (aiortc's depayloaded bytes)
        found = buffer.add(packet)[1]
        if found is not None:
            decoded.put(("codec", found))
        guard.after(packet, now)

    # frames of 2 packets each; packet 4 (frame 2's first) never arrives
    seq = 0
    for frame in range(10):
        for _ in range(2):
            if seq != 4:
                arrive(seq, frame, keyframe if seq == 0 else inter, frame / 30)
            seq += 1
    got = decoded.qsize()
    assert got == 1  # frame 0: frame 1 waits for frame 2's first packet, lost; all is held
    for frame in range(10, 30):  # 0.67 s more of P-frames: still held, a keyframe asked for
        for _ in range(2):
            arrive(seq, frame, inter, frame / 30)
            seq = uint16_add(seq, 1)
    assert decoded.qsize() == got and asked == [7]  # once: at most every second
    for frame in range(30, 33):  # the keyframe comes: decoding starts again from it
        for part in range(2):
            arrive(seq, frame, keyframe if part == 0 and frame == 30 else inter, frame / 30)
            seq = uint16_add(seq, 1)
    assert decoded.qsize() >= got + 2 and guard.skipped > 40, (decoded.qsize(), guard.skipped)
    # a hole repaired late (its retransmission comes after 8 more one-packet frames): aiortc
    # would release one frame per packet from then on, 8 frames behind for good; all go now
    buffer2 = JitterBuffer(capacity=512, is_video=True)
    receiver._RTCRtpReceiver__jitter_buffer = buffer2
    guard = StallGuard(receiver, asked.append)
    buffer, drained = buffer2, decoded.qsize()
    for seq in [0, 1, *range(3, 12), 2, 12]:  # seq 2 late
        arrive(seq, seq, keyframe if seq == 0 else inter, 100 + seq / 30)
    assert decoded.qsize() - drained == 12 and guard.drained >= 8, guard.drained


def test_the_cheaper_rate_counter_counts_as_aiortc_s():
    import random

    from aiortc import rate

    from rtc.congestion import RateCounter

    rng = random.Random(3)
    ours, theirs = RateCounter(1000, 8000), rate.RateCounter(1000, 8000)
    now = 1_000_000
    for _ in range(3000):
        now += rng.choice([0, 1, 3, 33, 34, 250, 1200])  # bursts, frames, gaps past the window
        if rng.random() < 0.01:
            ours.reset()
            theirs.reset()
        size = rng.randint(50, 1300)
        ours.add(size, now)
        theirs.add(size, now)
        probe = now + rng.choice([0, 5, 900])
        assert ours.rate(probe) == theirs.rate(probe), now


def test_a_sender_answers_a_nacked_packet_once_a_round_trip_and_within_a_budget():
    from rtc.congestion import Resends

    resends = Resends(share=0.25, burst=4, gap_s=0.25)
    # aiortc NACKs every still-missing packet at each new gap: the same ones again and again
    assert [resends.allow(seq, 0.0, 100) for seq in (1, 2, 3)] == [True, True, True]
    assert [resends.allow(seq, 0.1, 100) for seq in (1, 2, 3, 4)] == [False, False, False, True]
    assert not resends.allow(5, 0.1, 100)  # the budget (4) is spent
    assert resends.allow(1, 0.3, 104)  # a round trip later, and 4 packets sent: one token
    assert not resends.allow(6, 0.3, 104)
    assert resends.suppressed == 5


def test_the_sliding_slope_equals_a_least_squares_fit_of_the_window_however_long_it_runs():
    import random
    from collections import deque

    from rtc.congestion import TrendlineEstimator

    rng = random.Random(4)
    trend = TrendlineEstimator()
    arrival = 3_600_000.0  # an hour into a call: x is large, its square larger
    for _ in range(5000):
        arrival += rng.uniform(20, 45)
        trend.update(rng.uniform(20, 45), 33.3, arrival)
    xs, ys = deque(trend._xs), deque(trend._ys)
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    exact = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)
    assert n == trend.WINDOW and trend._sums.slope() == pytest.approx(exact, rel=1e-6, abs=1e-9)


def test_an_estimate_notes_frames_and_works_them_in_when_drained_or_when_too_many_wait():
    from rtc.congestion import MAX_PENDING_FRAMES, Estimate

    fed, batched = Estimate(3), Estimate(3)
    found_fed = found_batched = None
    for n in range(300):  # 10 s of 30 fps into a 300 kbit/s queue: estimates come
        sent, ms = int(n / 30 * (1 << 18)) & 0xFFFFFF, int(n * 41.7)
        fed.sent(sent, 4400, ms)
        found_fed = fed.drain() or found_fed  # drained every frame: as if not batched
        assert batched.sent(sent, 4400, ms) is None or (n + 1) % MAX_PENDING_FRAMES == 0
        if n % 3 == 2:
            found_batched = batched.drain() or found_batched
    assert found_fed is not None and found_fed == found_batched  # the same estimate
    # no drain ever: the estimate works them in itself, every MAX_PENDING_FRAMES frames
    alone = Estimate(3)
    results = [alone.sent(int(n / 30 * (1 << 18)), 4400, int(n * 41.7)) for n in range(300)]
    assert all(r is None for i, r in enumerate(results) if (i + 1) % MAX_PENDING_FRAMES)
    assert any(r is not None for r in results)


async def test_video_encoder_starts_at_the_start_bitrate_and_keeps_other_wrappers() -> None:
    """A live encoder opens at the device's start (300 kbit/s, under aiortc's own 500 and its
    250 floor alike), set before its first frame; a wrapper put on the sender before stays."""
    from aiortc import RTCPeerConnection
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    from endpoint.bitrate import DEFAULT_START, set_start_bitrate
    from endpoint.sources import SyntheticVideoTrack

    pc = RTCPeerConnection()
    try:
        sender = pc.addTransceiver(SyntheticVideoTrack(320, 240, 30), "sendonly").sender
        seen: list[int] = []
        inner = sender._next_encoded_frame

        async def counted(codec: RTCRtpCodecParameters) -> object:
            frame = await inner(codec)
            seen.append(frame.timestamp)
            return frame

        sender._next_encoded_frame = counted  # type: ignore[method-assign]
        set_start_bitrate(sender, DEFAULT_START)
        vp8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
        for _ in range(3):
            assert (await sender._next_encoded_frame(vp8)).payloads
        encoder = sender._RTCRtpSender__encoder
        assert DEFAULT_START == 300_000
        assert encoder.target_bitrate == 300_000 and encoder.codec.bit_rate == 300_000
        assert len(seen) == 3  # the earlier wrapper ran for every frame, the first one too
    finally:
        await pc.close()
