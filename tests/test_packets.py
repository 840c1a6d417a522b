"""Packet-level media pieces: the picture id read back from VP8 payloads, the packetized loop,
the Opus tone, and SRTP in place matching pylibsrtp's own protect/unprotect."""

from __future__ import annotations

import os

from pylibsrtp import Policy, Session

from endpoint.packets import PacketLoop, opus_tone, vp8_picture_id
from endpoint.sources import EncodedLoop
from rtc.adapter import InPlaceSrtp
from rtc.rtp import vp8_payloads


def test_picture_id_of_a_vp8_descriptor():
    assert vp8_picture_id(bytes([0x90, 0x80, 0x05, 0xAA])) == 5  # 7-bit picture id
    assert vp8_picture_id(bytes([0x90, 0x80, 0x81, 0x23, 0xAA])) == 0x123  # 15-bit
    assert vp8_picture_id(bytes([0x10, 0x00, 0xAA])) is None  # no extension: no id
    assert vp8_picture_id(bytes([0x90, 0x00, 0xAA])) is None  # extension without I bit
    assert vp8_picture_id(b"\x90") is None


def test_loop_payloads_carry_the_loop_index():
    loop = EncodedLoop.encode(320, 240, 15, seconds=1.0, bitrate=300_000)
    packets = PacketLoop.from_loop(loop)
    assert len(packets.frames) == len(loop.frames) == 15
    for k, payloads in enumerate(packets.frames):
        assert payloads and all(vp8_picture_id(p) == k for p in payloads)
        assert payloads[0][0] & 0x10  # the first packet starts the partition
    assert all(len(p) <= 1300 for frame in packets.frames for p in frame)
    assert vp8_payloads(b"\x00" * 3000, 1 << 15 | 7)[0][2:4] == bytes([0x80, 0x07])


def test_opus_tone_is_one_packet():
    packet = opus_tone()
    assert 10 < len(packet) < 400


def _rtp(seq: int, size: int = 1000) -> bytes:
    return (bytes([0x80, 0x60]) + seq.to_bytes(2, "big") + (seq * 3000).to_bytes(4, "big")
            + (4321).to_bytes(4, "big") + os.urandom(size))


def test_srtp_in_place_round_trip_and_refusals():
    key = os.urandom(30)
    sender = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    receiver = InPlaceSrtp(Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND)))
    for seq in range(5):
        plain = _rtp(seq)
        length = receiver.unprotect(sender.protect(plain))
        assert length == len(plain) and bytes(receiver.view[:length]) == plain
    forged = bytearray(sender.protect(_rtp(9)))
    forged[40] ^= 1
    assert receiver.unprotect(bytes(forged)) is None  # authentication fails
    replayed = sender.protect(_rtp(10))
    assert receiver.unprotect(replayed) is not None
    assert receiver.unprotect(replayed) is None  # a replay
    assert receiver.unprotect(b"\x80" * 1600) is None  # longer than the buffer


def test_srtp_in_place_protect_is_what_pylibsrtp_decrypts():
    key = os.urandom(30)
    out = InPlaceSrtp(Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND)))
    back = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND))
    plain = _rtp(1, 1200)
    out.view[:len(plain)] = plain
    datagram = out.protect(len(plain))
    assert datagram is not None and len(datagram) > len(plain)
    assert back.unprotect(datagram) == plain


def test_a_packet_receiver_s_part_is_its_last_packet_s_wait_after_the_kernel():
    from endpoint.meter import AudioMeter, SendLog, VideoMeter
    from endpoint.packets import PacketCounter

    video = VideoMeter()
    now = [100.0]
    counter = PacketCounter("video", video, AudioMeter(), 15, SendLog(), "x/1", lambda at: None,
                            clock=lambda: now[0], arrival=lambda: now[0] - 0.002)
    for seq, (k, marker) in enumerate([(0, False), (0, True), (1, True)]):
        payload = bytes([0x90, 0x80, k, 0xAA])
        packet = bytes([0x80, 0xE0 if marker else 0x60]) + seq.to_bytes(2, "big") + \
            bytes(8) + payload
        counter.on_datagram(memoryview(packet), len(packet))
        now[0] += 0.033
    part = video.receiver.part()
    # one part per frame, at its marker packet: 2 ms in the socket before it was counted
    assert part is not None and part.frames == 2 and part.mean_ms == 2.0
    counter = PacketCounter("video", VideoMeter(), AudioMeter(), 15, SendLog(), "x/1",
                            lambda at: None, arrival=lambda: 0.0)  # the kernel cannot say
    counter.on_datagram(memoryview(packet), len(packet))
    assert counter.video.receiver.part() is None
