"""The media graph (rtc/graph.py) with fake transports: producers, consumers, fan-out, feedback
and closing, with no socket and no aiortc peer."""

from __future__ import annotations

import asyncio
import time

import pytest

from rtc.graph import Consumer, Producer, Router
from rtc.stages import ForwardingStats

from .media_fakes import DELTA, H264, KEY, MORE, OPUS, VP8, FakeTransport, header, rtp


def _router(congestion: bool = False) -> Router:
    return Router("call-1", ForwardingStats(), congestion=congestion, keyframe_interval=0.05)


def _first(producer: Producer, packet: bytes, codec=VP8) -> None:
    """A packet by the slow path (what aiortc parsed): the first binds the stream."""
    producer.tap.handler(packet, codec, False, 0.0)


def _fast(producer: Producer, packet: bytes) -> None:
    """A packet by the fast path (straight off the socket), as the datagram tap hands it."""
    producer.transport.datagrams.routes[producer.ssrc](memoryview(bytearray(packet)),
                                                       len(packet))


def _seqs(sent: list[bytes]) -> list[int]:
    return [header(p)[1] for p in sent]


async def test_one_producer_feeds_two_consumers_each_in_its_own_sequence_space():
    router = _router()
    source, a, b = FakeTransport("source"), FakeTransport("a"), FakeTransport("b")
    producer = router.produce(source, "video")
    first = router.consume(producer, a)
    second = router.consume(producer, b)
    _first(producer, rtp(100, 9000, KEY))
    for i in range(1, 6):
        _fast(producer, rtp(100 + i, 9000 + 3000 * i, DELTA))
    for consumer, transport in ((first, a), (second, b)):
        sent = transport.senders["video"].sent
        assert len(sent) == 6, consumer.name
        seqs = _seqs(sent)
        assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(6)]  # continuous, own origin
        assert {header(p)[3] for p in sent} == {transport.senders["video"].sender._ssrc}
        assert sent[0][12:] == KEY and sent[-1][12:] == DELTA  # the payload untouched
    # each its own random origin (2^-16 chance to collide)
    assert _seqs(a.senders["video"].sent)[0] != _seqs(b.senders["video"].sent)[0]
    assert router.stats.packets == 12 and router.stats.fast_path_packets == 10
    assert producer.meter.packets == 6  # counted once, however many consumers


async def test_a_consumer_added_mid_stream_asks_for_a_keyframe_and_starts_at_one():
    router = _router()
    source, a, late = FakeTransport("source"), FakeTransport("a"), FakeTransport("late")
    producer = router.produce(source, "video")
    router.consume(producer, a)
    _first(producer, rtp(1, 0, KEY))
    for i in range(2, 5):
        _fast(producer, rtp(i, 3000 * i, DELTA))
    asked_before = len(source.receivers["video"].keyframe_requests)
    consumer = router.consume(producer, late)
    await asyncio.sleep(0)  # the request is sent by a task
    assert len(source.receivers["video"].keyframe_requests) > asked_before
    for i in range(5, 8):  # inter frames: nothing decodable for the new consumer yet
        _fast(producer, rtp(i, 3000 * i, DELTA))
    assert late.senders["video"].sent == []
    _fast(producer, rtp(8, 24000, KEY))
    _fast(producer, rtp(9, 24000, MORE, marker=False))
    sent = late.senders["video"].sent
    assert [p[12:] for p in sent] == [KEY, MORE]  # starts at the keyframe
    assert _seqs(sent)[1] == (_seqs(sent)[0] + 1) & 0xFFFF
    assert len(a.senders["video"].sent) == 9  # the first consumer missed nothing
    assert consumer.mode == "forward"


async def test_audio_starts_at_the_first_packet_and_fan_out_works_for_it_too():
    router = _router()
    source, a, b = FakeTransport("source"), FakeTransport("a"), FakeTransport("b")
    producer = router.produce(source, "audio")
    router.consume(producer, a)
    router.consume(producer, b)
    _first(producer, rtp(7, 960, b"opus", pt=111), OPUS)
    _fast(producer, rtp(8, 1920, b"opus", pt=111))
    assert len(a.senders["audio"].sent) == len(b.senders["audio"].sent) == 2
    assert header(a.senders["audio"].sent[0])[0] == OPUS.payloadType
    assert source.receivers["audio"].keyframe_requests == []  # never for audio


async def test_keyframe_requests_from_downstream_are_coalesced_upstream():
    router = _router()
    source, a, b = FakeTransport("source"), FakeTransport("a"), FakeTransport("b")
    producer = router.produce(source, "video")
    first = router.consume(producer, a)
    second = router.consume(producer, b)
    _first(producer, rtp(1, 0, KEY))
    await asyncio.sleep(0.06)  # past the interval the consumers' joining used
    asked = len(source.receivers["video"].keyframe_requests)
    # both consumers' legs ask at once: one request now, one when the interval ends
    handlers = [a.rtcp.handlers[a.senders["video"].sender._ssrc]["keyframe"],
                b.rtcp.handlers[b.senders["video"].sender._ssrc]["keyframe"]]
    assert all(handler() for handler in handlers for _ in range(3))
    await asyncio.sleep(0)
    assert len(source.receivers["video"].keyframe_requests) == asked + 1
    await asyncio.sleep(0.08)
    assert len(source.receivers["video"].keyframe_requests) == asked + 2
    assert router.stats.keyframe_requests_down == 6
    assert producer.meter.keyframes_in == 6
    assert first.mode == second.mode == "forward"


async def test_upstream_hears_the_least_of_the_consumers_rate_reports():
    router = _router(congestion=True)
    source, a, b = FakeTransport("source"), FakeTransport("a"), FakeTransport("b")
    producer = router.produce(source, "video")
    router.consume(producer, a)
    router.consume(producer, b)
    _first(producer, rtp(1, 0, KEY))
    remb_a = a.rtcp.handlers[a.senders["video"].sender._ssrc]["remb"]
    remb_b = b.rtcp.handlers[b.senders["video"].sender._ssrc]["remb"]
    assert remb_a(900_000)
    await asyncio.sleep(0.11)  # reports upstream are at least 0.1 s apart (a fall: at once)
    assert remb_b(300_000)
    await asyncio.sleep(0)
    assert source.receivers["video"].rembs == [900_000, 300_000]  # the narrowest leg
    assert producer.feedback.limit(time.monotonic()) == (300_000, "downstream")
    assert router.stats.rembs_received == 2


async def test_nacks_from_downstream_are_answered_from_the_consumer_s_own_history():
    router = _router()
    source, a = FakeTransport("source"), FakeTransport("a")
    producer = router.produce(source, "video")
    router.consume(producer, a)
    _first(producer, rtp(1, 0, KEY))
    nack = a.rtcp.handlers[a.senders["video"].sender._ssrc]["nack"]
    assert await nack([5, 6])
    assert a.senders["video"].retransmitted == [5, 6]
    assert source.receivers["video"].accounted[0] == (0x1234, 1, False)


async def test_a_new_source_ssrc_restarts_every_consumer_at_a_keyframe():
    router = _router()
    source, a = FakeTransport("source"), FakeTransport("a")
    producer = router.produce(source, "video")
    router.consume(producer, a)
    _first(producer, rtp(1, 0, KEY))
    _fast(producer, rtp(2, 3000, DELTA))
    # the device restarted its stream: a new SSRC, from the slow path
    _first(producer, rtp(500, 77, DELTA, ssrc=0x9999))
    assert len(a.senders["video"].sent) == 2
    assert 0x9999 in source.datagrams.routes and 0x1234 not in source.datagrams.routes
    _fast(producer, rtp(501, 3077, KEY, ssrc=0x9999))
    sent = a.senders["video"].sent
    assert len(sent) == 3 and sent[-1][12:] == KEY
    assert _seqs(sent)[2] == (_seqs(sent)[1] + 1) & 0xFFFF  # the outgoing stream continues


async def test_a_packet_too_long_is_dropped_and_counted_and_the_stream_goes_on():
    router = _router()
    source, a = FakeTransport("source"), FakeTransport("a")
    producer = router.produce(source, "video")
    router.consume(producer, a)
    _first(producer, rtp(1, 0, KEY))
    a.senders["video"].room = 100
    _fast(producer, rtp(2, 3000, DELTA + b"x" * 200))
    a.senders["video"].room = 1904
    _fast(producer, rtp(3, 6000, DELTA))
    assert router.stats.oversize == 1
    assert [p[12:] for p in a.senders["video"].sent] == [KEY, DELTA]


async def test_a_sink_not_connected_makes_video_wait_for_a_keyframe_again():
    router = _router()
    source, a = FakeTransport("source"), FakeTransport("a")
    producer = router.produce(source, "video")
    router.consume(producer, a)
    _first(producer, rtp(1, 0, KEY))
    a.senders["video"].connected = False
    _fast(producer, rtp(2, 3000, DELTA))
    a.senders["video"].connected = True
    _fast(producer, rtp(3, 6000, DELTA))  # held: the picture would be corrupt
    _fast(producer, rtp(4, 9000, KEY))
    assert [p[12:] for p in a.senders["video"].sent] == [KEY, KEY]


async def test_legs_that_write_header_extensions_differently_are_reheadered():
    router = _router()
    source, a = FakeTransport("source"), FakeTransport("a")
    producer = router.produce(source, "video")
    consumer = router.consume(producer, a)
    a.senders["video"].mid = "1"  # another MID on the sink's leg
    _first(producer, rtp(1, 0, KEY))
    assert a.senders["video"].reheadered == 1 and consumer.mode == "forward"


async def test_codecs_that_differ_fall_back_to_transcoding_or_are_refused_when_shared():
    transcoded: list[Consumer] = []
    router = Router("call", ForwardingStats(), relay=_Relay())
    source = FakeTransport("source")
    h264 = FakeTransport("h264", codec={"video": H264, "audio": OPUS})
    producer = router.produce(source, "video")
    consumer = router.consume(producer, h264, on_transcode=transcoded.append)
    _first(producer, rtp(1, 0, KEY))
    assert consumer.mode == "transcode" and transcoded == [consumer]
    assert source.receivers["video"].released and "video" in h264.attached
    assert router.stats.transcoding == 1

    shared = Router("call-2", ForwardingStats(), relay=_Relay())
    source2, vp8 = FakeTransport("s2"), FakeTransport("vp8")
    h264b = FakeTransport("h264b", codec={"video": H264, "audio": OPUS})
    producer2 = shared.produce(source2, "video")
    forwarding = shared.consume(producer2, vp8)
    refused = shared.consume(producer2, h264b)
    _first(producer2, rtp(1, 0, KEY))
    assert forwarding.mode == "forward" and refused.mode == "refused"
    assert not source2.receivers["video"].released  # the other consumer keeps its stream
    assert len(vp8.senders["video"].sent) == 1 and h264b.senders["video"].sent == []


async def test_closing_a_transport_cascades_once_to_its_producers_and_their_consumers():
    router = _router()
    source, a, b = FakeTransport("source"), FakeTransport("a"), FakeTransport("b")
    producer = router.produce(source, "video")
    back = router.produce(a, "video")  # a's own stream, consumed on the source transport
    to_a = router.consume(producer, a)
    to_b = router.consume(producer, b)
    to_source = router.consume(back, source)
    _first(producer, rtp(1, 0, KEY))
    assert source.datagrams.routes
    a.close("leg a closed")
    assert to_a.mode == "closed" and back.closed and to_source.mode == "closed"
    assert to_b.mode == "forward" and not producer.closed  # b still watches the source
    assert a.rtcp.handlers == {} and source.rtcp.handlers == {}
    router.close("call ended")
    assert producer.closed and to_b.mode == "closed" and not source.datagrams.routes
    assert source.receivers["video"].closed
    router.close("again")  # once
    assert producer.consumers == [] and router.stats.transcoding == 0


async def test_a_consumer_needs_a_sender_of_its_kind():
    router = _router()
    source, audio_only = FakeTransport("source"), FakeTransport("ears", codec={"audio": OPUS})
    producer = router.produce(source, "video")
    with pytest.raises(ValueError, match="no video sender"):
        router.consume(producer, audio_only)


class _Relay:
    """Stands in for aiortc's MediaRelay: what a consumer subscribes to when it transcodes."""

    def subscribe(self, track, buffered: bool = True):
        return ("decoded", track)
