"""Packets of every size a standard peer sends are forwarded: RTP payloads of 1,400 bytes
(GStreamer's payloaders' default MTU) and 1,450 (about the most a 1,500-byte path carries) from a
device, through three servers, both ways. Before rtc/adapter.py's RoomySession a 1,400-byte
packet made a server's SRTP protect raise inside aiortc and closed the leg."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from endpoint.device import Device, MediaSupply
from wire.client import ServerClient

from .conftest import DEVICE_SETTINGS, make_tree

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("payload", [1400, 1450])
async def test_large_rtp_payloads_cross_three_servers_both_ways(payload: int):
    settings = replace(DEVICE_SETTINGS, video="packets", width=320, height=240, fps=30,
                       rtp_payload=payload)
    supply = MediaSupply.for_settings(settings)
    assert supply.packets is not None
    sizes = [len(p) for frame in supply.packets.frames for p in frame]
    assert max(sizes) == payload and sum(s == payload for s in sizes) > 50, "full packets"
    async with make_tree() as tree:
        devices = [tree.start(server, Device(tree.lowers[server].url, name, settings,
                                             supply=supply))
                   for server, name in (("lower-a", "cam-1"), ("lower-b", "cam-2"))]
        await tree.until(lambda: tree.known("lower-b/cam-2") and tree.known("lower-a/cam-1"))
        client = ServerClient(tree.session, tree.lowers["lower-a"].url)
        info = await client.create_call("lower-a/cam-1", "lower-b/cam-2")
        info = await client.call(info.call, wait="active", timeout_s=20)
        assert info.state == "active", info
        await asyncio.sleep(2.5)
        info = await client.call(info.call)
        await client.hangup(info.call)
        assert info.path == ["lower-a", "upper", "lower-b"]
        for direction in ("caller_to_callee", "callee_to_caller"):
            media = info.media[direction]
            assert media.frames > 50 and media.frames_lost <= 2, (direction, media)
        for device in devices:
            for call in device.calls.values():
                assert call.counters["video"].packets_lost == 0
        for node in (tree.lowers["lower-a"], tree.upper, tree.lowers["lower-b"]):
            stats = node.forwarding
            assert stats.oversize == 0, node.name
            # the large packets went through: bytes per packet well above aiortc's 1,300
            video = info.hops[info.path.index(node.name)].streams["caller_to_callee"]["video"]
            assert video.packets > 100 and video.bytes / video.packets > 1000, (node.name, video)
