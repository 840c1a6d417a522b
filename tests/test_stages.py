"""Each per-stream stage (rtc/stages.py) alone, against fake taps: no socket, no peer."""

from __future__ import annotations

from rtc.meter import TRANSIT_EVERY, StreamMeter
from rtc.rtp import SequenceMap
from rtc.stages import (
    Accounting,
    Estimate,
    ForwardingStats,
    KeyframeGate,
    Meter,
    Packet,
    Rewrite,
    Send,
)

from .media_fakes import DELTA, KEY, FakeReceiverTap, FakeSenderTap, header, rtp


def _packet(data: bytes, fast: bool = True, repair: bool = False, arrival: float = 0.0,
            kernel=lambda: 0.0) -> Packet:
    return Packet(kernel).load(memoryview(bytearray(data)), len(data), fast, repair, arrival)


def test_a_packet_reads_its_header_fields():
    packet = _packet(rtp(65535, 0xFFFFFFFF, KEY, marker=True))
    assert (packet.seq, packet.ts, packet.marker, packet.length) == (
        65535, 0xFFFFFFFF, True, 12 + len(KEY))
    assert not _packet(rtp(1, 2, KEY, marker=False)).marker


def test_accounting_counts_every_packet_for_rtcp_and_nacks_with_repairs_marked():
    tap = FakeReceiverTap(None)
    stage = Accounting(tap, 0xAB, 90000)
    assert stage(_packet(rtp(5, 0, KEY))) and stage(_packet(rtp(4, 0, KEY), repair=True))
    assert tap.accounted == [(0xAB, 5, False), (0xAB, 4, True)]


def test_meter_counts_originals_and_marks_one_packet_in_transit_every():
    meter = StreamMeter()
    stage = Meter(meter)
    marked = [stage(p) and p.sample for p in (_packet(rtp(i, 0, DELTA))
                                              for i in range(2 * TRANSIT_EVERY))]
    assert meter.packets == 2 * TRANSIT_EVERY and meter.bytes == 2 * TRANSIT_EVERY * (12 + 42)
    assert marked.count(True) == 3  # the first (the span's start), then one in TRANSIT_EVERY
    assert stage(_packet(rtp(99, 0, DELTA), repair=True))
    assert meter.packets == 2 * TRANSIT_EVERY  # a retransmission is not an arrival


def test_estimate_takes_one_step_a_frame_at_its_last_packet():
    steps: list[tuple[int, int]] = []

    class Estimator:
        def packet(self, view, length, now_ms, frame_bytes):
            steps.append((length, frame_bytes))
            return 500_000

    found: list[int] = []
    stage = Estimate(Estimator(), lambda bps, now: found.append(bps))  # type: ignore[arg-type]
    stage(_packet(rtp(1, 0, DELTA, marker=False)))
    stage(_packet(rtp(2, 0, DELTA, marker=False), repair=True))  # not counted
    stage(_packet(rtp(3, 0, DELTA, marker=True)))
    assert steps == [(54, 108)] and found == [500_000]


def test_the_keyframe_gate_holds_video_until_a_keyframe_and_asks_for_one():
    asked: list[int] = []
    seq_map = SequenceMap(1000, 0)
    gate = KeyframeGate("video", "video/VP8", seq_map, lambda: asked.append(1))
    assert not gate(_packet(rtp(10, 0, DELTA))) and asked == [1]
    assert not gate(_packet(rtp(11, 0, KEY), repair=True))  # an old keyframe: not a start
    assert gate(_packet(rtp(12, 3000, KEY))) and seq_map.map(12, 3000) == (1000, 0)
    assert gate(_packet(rtp(13, 3000, DELTA)))  # open from here
    gate.restart()
    assert not gate(_packet(rtp(14, 6000, DELTA)))


def test_the_gate_starts_audio_at_once():
    seq_map = SequenceMap(7, 100)
    gate = KeyframeGate("audio", "audio/opus", seq_map, lambda: None)
    assert gate(_packet(rtp(500, 48000, b"opus", pt=111)))
    assert seq_map.map(500, 48000) == (7, 100)


def test_rewrite_moves_sequence_and_timestamp_and_drops_what_came_before_the_start():
    seq_map = SequenceMap(65534, 10)
    seq_map.restart(100, 5000)
    stage = Rewrite(seq_map)
    packet = _packet(rtp(103, 8000, DELTA))
    assert stage(packet) and (packet.out_seq, packet.out_ts) == (1, 3010)  # wraps
    assert not stage(_packet(rtp(99, 4000, DELTA)))


def test_send_counts_times_transit_and_survives_an_oversize_packet():
    stats, meter = ForwardingStats(), StreamMeter()
    sink = FakeSenderTap(0x77, None)
    unsent: list[int] = []
    stage = Send(sink, 96, None, stats, meter, lambda: unsent.append(1))
    packet = _packet(rtp(1, 0, KEY), fast=True, kernel=lambda: 1.0)  # arrived long ago
    packet.sample, packet.out_seq, packet.out_ts = True, 42, 4242
    assert stage(packet)
    assert header(sink.sent[0]) == (96, 42, 4242, 0x77) and sink.sent[0][12:] == KEY
    assert stats.packets == 1 and stats.fast_path_packets == 1 and stats.bytes == 12 + 42 + 10
    assert meter.transit.total == 1 and not packet.sample
    sink.room = 20
    assert not stage(_packet(rtp(2, 0, DELTA)))
    assert stats.oversize == 1 and unsent == []  # dropped and counted; the stream goes on
    sink.room, sink.connected = 1904, False
    assert not stage(_packet(rtp(3, 0, DELTA))) and unsent == [1]


def test_send_reheaders_when_the_legs_write_extensions_differently():
    sink = FakeSenderTap(0x77, None)
    stage = Send(sink, 96, "the source leg's map", ForwardingStats(), None, lambda: None)
    assert stage(_packet(rtp(1, 0, KEY)))
    assert sink.reheadered == 1
