"""Forwarding end to end: no server decodes or encodes; keyframes and NACKs work hop by hop;
H.264 negotiated end to end; a codec mismatch transcodes at one server only, and says so."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import replace

import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender
import pytest

from endpoint.device import Device
from relay.forward import ForwardingStats
from wire.client import ServerClient

from .conftest import DEVICE_SETTINGS, Tree, make_tree

pytestmark = pytest.mark.e2e


async def active_call(tree: Tree, caller: str, callee: str):
    client = ServerClient(tree.session, tree.lowers[caller.split("/")[0]].url)
    info = await client.create_call(caller, callee)
    info = await client.call(info.call, wait="active", timeout_s=20)
    assert info.state == "active", info
    return client, info


async def loop_devices_call(tree: Tree, video: str):
    """cam-1 (lower-a) calls cam-2 (lower-b), both playing the 320x240@30 loop in ``video``
    mode from one MediaSupply (encoded once, one send log: latency is measured)."""
    from endpoint.device import MediaSupply

    settings = replace(DEVICE_SETTINGS, video=video, width=320, height=240, fps=30)
    supply = MediaSupply.for_settings(settings)
    devices = [tree.start(server, Device(tree.lowers[server].url, name, settings,
                                         supply=supply))
               for server, name in (("lower-a", "cam-1"), ("lower-b", "cam-2"))]
    await tree.until(lambda: tree.known("lower-b/cam-2"))
    await tree.until(lambda: "cam-1" in tree.lowers["lower-a"].directory.own)
    client, info = await active_call(tree, "lower-a/cam-1", "lower-b/cam-2")
    return supply, devices, client, info


async def media_after(client: ServerClient, call: str, seconds: float):
    await asyncio.sleep(seconds)
    info = await client.call(call)
    await client.hangup(call)
    return info


def servers(tree: Tree):
    return [tree.lowers["lower-a"], tree.upper, tree.lowers["lower-b"]]


async def test_servers_create_no_decoder_or_encoder(monkeypatch):
    """Devices run in their own processes, so every codec made in this process is a server's."""
    made = {"decoders": 0, "encoders": 0}

    def counting(name, original):
        def make(codec):
            made[name] += 1
            return original(codec)
        return make

    monkeypatch.setattr(aiortc.rtcrtpreceiver, "get_decoder",
                        counting("decoders", aiortc.rtcrtpreceiver.get_decoder))
    monkeypatch.setattr(aiortc.rtcrtpsender, "get_encoder",
                        counting("encoders", aiortc.rtcrtpsender.get_encoder))
    async with make_tree() as tree, contextlib.AsyncExitStack() as stack:
        for server, device in (("lower-a", "cam-1"), ("lower-b", "cam-2")):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "endpoint", "--server", tree.lowers[server].url,
                "--device", device, "--size", "320x240", "--fps", "15",
                "--media-address", "127.0.0.1",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            stack.push_async_callback(process.wait)
            stack.callback(process.terminate)
        await tree.until(lambda: tree.known("lower-b/cam-2"), 20)
        await tree.until(lambda: "cam-1" in tree.lowers["lower-a"].directory.own, 20)
        client, info = await active_call(tree, "lower-a/cam-1", "lower-b/cam-2")
        info = await media_after(client, info.call, 2.0)
        for direction in ("caller_to_callee", "callee_to_caller"):
            assert info.media[direction].frames > 10, info.media
            assert info.media[direction].audio_frames > 10
        assert made == {"decoders": 0, "encoders": 0}
        assert info.transcoded == []
        for node in servers(tree):
            assert node.forwarding.packets > 100, node.name
            # all but the first packets of each stream go straight from socket to socket
            assert node.forwarding.fast_path_packets > 0.9 * node.forwarding.packets
            assert node.forwarding.transcoded_total == 0


async def test_device_preferring_vp8_follows_a_h264_call(tree: Tree):
    """A device that takes both codecs sends what the call carries: no transcoding."""
    tree.start("lower-b", Device(tree.lowers["lower-b"].url, "h264-only",
                                 replace(DEVICE_SETTINGS, codecs=("video/H264",))))
    await tree.until(lambda: tree.known("lower-b/h264-only"))
    client, info = await active_call(tree, "lower-a/cam-1", "lower-b/h264-only")
    info = await media_after(client, info.call, 1.0)
    assert info.codec == "video/H264"
    assert info.transcoded == []


async def test_h264_negotiated_end_to_end():
    async with make_tree() as tree:
        h264 = replace(DEVICE_SETTINGS, codecs=("video/H264",))
        for server, name in (("lower-a", "cam-1"), ("lower-b", "cam-2")):
            tree.start(server, Device(tree.lowers[server].url, name, h264))
        await tree.until(lambda: tree.known("lower-b/cam-2"))
        await tree.until(lambda: "cam-1" in tree.lowers["lower-a"].directory.own)
        client, info = await active_call(tree, "lower-a/cam-1", "lower-b/cam-2")
        info = await media_after(client, info.call, 1.5)
        assert info.codec == "video/H264"
        assert info.transcoded == []
        assert info.media["caller_to_callee"].frames > 5
        assert info.media["callee_to_caller"].frames > 5
        assert all(n.forwarding.transcoded_total == 0 for n in servers(tree))


async def test_codec_mismatch_transcodes_at_the_callee_server_only():
    async with make_tree() as tree:
        tree.start("lower-a", Device(tree.lowers["lower-a"].url, "vp8-only",
                                     replace(DEVICE_SETTINGS, codecs=("video/VP8",))))
        tree.start("lower-b", Device(tree.lowers["lower-b"].url, "h264-only",
                                     replace(DEVICE_SETTINGS, codecs=("video/H264",))))
        await tree.until(lambda: tree.known("lower-b/h264-only"))
        await tree.until(lambda: "vp8-only" in tree.lowers["lower-a"].directory.own)
        client, info = await active_call(tree, "lower-a/vp8-only", "lower-b/h264-only")
        info = await media_after(client, info.call, 1.5)
        assert info.codec == "video/VP8"
        assert sorted(info.transcoded) == ["lower-b:video:callee_to_caller",
                                           "lower-b:video:caller_to_callee"]
        assert info.media["caller_to_callee"].frames > 5
        assert info.media["callee_to_caller"].frames > 5
        assert tree.lowers["lower-b"].forwarding.transcoded_total == 2
        assert tree.lowers["lower-a"].forwarding.transcoded_total == 0
        assert tree.upper.forwarding.transcoded_total == 0


def video_receiver(pc):
    return next(t.receiver for t in pc.getTransceivers() if t.kind == "video")


async def test_keyframe_requests_travel_upstream_coalesced(tree: Tree):
    client, info = await active_call(tree, "lower-a/cam-1", "lower-b/cam-2")
    await asyncio.sleep(1.0)  # start-up keyframe requests are over
    before = {n.name: ForwardingStats(**vars(n.forwarding)) for n in servers(tree)}
    callee = tree.devices["lower-b/cam-2"].calls[info.call]
    receiver = video_receiver(callee.pc)
    ssrc = next(iter(receiver._RTCRtpReceiver__remote_streams))
    for _ in range(20):  # a burst of picture-loss reports from the callee
        await receiver._send_rtcp_pli(ssrc)
    await asyncio.sleep(0.8)
    delta = {n.name: (n.forwarding.keyframe_requests_down - before[n.name].keyframe_requests_down,
                      n.forwarding.keyframe_requests_up - before[n.name].keyframe_requests_up)
             for n in servers(tree)}
    down_b, up_b = delta["lower-b"]
    assert down_b >= 20  # every request reached the callee's server
    assert 1 <= up_b <= 3  # ... and went upstream coalesced (one per 250 ms)
    for name in ("upper", "lower-a"):  # hop by hop, all the way to the caller's server
        assert delta[name][0] >= 1 and 1 <= delta[name][1] <= 3, (name, delta)
    await client.hangup(info.call)


async def test_loss_on_a_trunk_is_repaired_by_nack(tree: Tree, monkeypatch):
    retransmitted = []
    original_retransmit = aiortc.rtcrtpsender.RTCRtpSender._retransmit

    async def counting(self, sequence_number):
        retransmitted.append(sequence_number)
        await original_retransmit(self, sequence_number)

    monkeypatch.setattr(aiortc.rtcrtpsender.RTCRtpSender, "_retransmit", counting)
    client, info = await active_call(tree, "lower-a/cam-1", "lower-b/cam-2")
    # Drop every 6th video packet the upper server receives from lower-a. They arrive on the
    # fast path (straight off the socket); retransmissions come on their own SSRC (RTX), which
    # takes aiortc's path and is not dropped.
    producer = tree.upper.media.calls[info.call].bridge.producers["video", "caller_to_callee"]
    ssrc = producer.ssrc
    routes = producer.transport.datagrams._routes
    assert ssrc is not None and ssrc in routes, "the fast path should carry this stream"
    handler = routes[ssrc]
    seen = [0]

    def lossy(view: memoryview, length: int) -> None:
        seen[0] += 1
        if seen[0] % 6:
            handler(view, length)

    routes[ssrc] = lossy
    start = tree.devices["lower-b/cam-2"].calls[info.call].video.stats(0)
    info = await media_after(client, info.call, 3.0)
    media = info.media["caller_to_callee"]
    assert seen[0] > 40  # at 15 fps a small frame is one packet: each drop loses a frame
    assert len(retransmitted) >= seen[0] // 6 * 0.8  # lower-a answered the NACKs
    assert media.frames - start.frames > 30
    assert media.frames_lost - start.frames_lost <= 1, media


async def test_preencoded_devices_measure_latency_through_the_send_log():
    async with make_tree() as tree:
        supply, _, client, info = await loop_devices_call(tree, "preencoded")
        assert len(supply.loop.frames) == 60
        info = await media_after(client, info.call, 2.5)  # past one 2 s loop
        for direction in ("caller_to_callee", "callee_to_caller"):
            media = info.media[direction]
            assert media.frames > 60, media  # more than one loop, counted on
            assert media.frames_lost <= 2, media
            assert 0 < media.latency_ms_p50 < 200, media
            assert media.fps > 25


async def test_packet_devices_call_across_servers_without_decoding():
    """Packet-mode devices (ready RTP in, counted without decoding) hold a cross-server call:
    frames read by picture id both ways, latency from the shared send log, all on the fast
    path at every server, and no decoder anywhere in this process."""
    async with make_tree() as tree:
        _, devices, client, info = await loop_devices_call(tree, "packets")
        calls = [c for d in devices for c in d.calls.values()]
        info = await media_after(client, info.call, 2.5)
        for direction in ("caller_to_callee", "callee_to_caller"):
            media = info.media[direction]
            assert media.frames > 60 and media.frames_lost <= 2, media
            assert media.fps > 25, media
            assert 0 < media.latency_ms_p50 < 50, media  # no decoder, no jitter buffer
            assert media.audio_frames > 100, media
        for call in calls:
            assert call.counters["video"].packets_lost == 0
            assert all(sender.packets > 0 for sender in call.senders)
        for node in servers(tree):
            stats = node.forwarding
            assert stats.fast_path_packets > 0.9 * stats.packets > 100, (node.name, stats)
