"""Loopback end-to-end: real aiortc peers on 127.0.0.1, real sockets, stamped media both ways."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from probe.calls import run_call, summarize
from relay.call import CallState, Timeouts
from wire.client import ProbeError, ServerClient, discover, pick_pair
from wire.messages import DIRECTIONS

from .conftest import Tree, make_tree

pytestmark = pytest.mark.e2e


def server_legs(tree: Tree, call_id: str):
    legs = []
    for node in tree.servers.values():
        media = node.media.calls.get(call_id)
        if media is not None:
            legs += list(media.legs.values())
    return legs


async def test_cross_server_call_media_both_ways(tree: Tree):
    servers = await discover(tree.session, [tree.upper.url])
    assert {s.name for s in servers} == {"upper", "lower-a", "lower-b"}
    caller, callee = pick_pair(servers)
    assert caller.startswith("lower-a/") and callee == "lower-b/cam-2"

    result = await run_call(tree.session, servers, caller, callee, hold_s=2.5)

    assert result.ok, result.to_dict()
    assert result.reason == "hangup"
    t = result.timeline
    assert t["t_sent"] <= t["t_response"]
    for name in ("t_caller_woken", "t_routed", "t_callee_woken", "t_media_up",
                 "t_first_frame_callee", "t_first_frame_caller", "t_end"):
        assert name in t, name
    assert t["t_routed"] < t["t_first_frame_callee"] < t["t_end"]
    for direction in DIRECTIONS:
        media = result.media[direction]
        assert media["frames"] >= 10, (direction, media)
        assert 0 < media["latency_ms_p50"] < 2000, (direction, media)
        assert media["audio_frames"] > 0
        # the picture against its source, drawn again from the stamp (synthetic devices)
        assert media["quality_samples"] >= 1, (direction, media)
        assert media["psnr_db"] > 30 and media["ssim"] > 0.9, (direction, media)
        # the tone's timing marks (one a second) read back after Opus: audio latency, lip
        # sync against the video of the same moment, and the E-model's score of a clean call
        assert media["audio_marks"] >= 2 and media["audio_marks_lost"] == 0, (direction, media)
        assert 0 < media["audio_latency_ms_p50"] < 2000, (direction, media)
        assert media["av_sync_samples"] >= 1 and abs(media["av_sync_ms"]) <= 40, \
            (direction, media)
        assert media["mos"] >= 4.0, (direction, media)
    assert result.intervals["response_ms"] < 1000
    # the call went through every tier: each server kept its own record
    for node in (tree.upper, tree.lowers["lower-b"]):
        assert node.find_call(result.call).reason == "hangup"
    summary = summarize([result])
    assert summary["ok"] == 1 and "latency_ms_caller_to_callee" in summary["figures"]
    for name in ("audio_latency_ms", "av_sync_ms", "mos", "psnr_db"):
        figure = summary["figures"][f"{name}_callee_to_caller"]
        assert figure["n"] == 1 and figure["min"] == figure["p50"] == figure["max"], figure


async def test_discovery_from_one_lower_server_finds_the_tree(tree: Tree):
    servers = await discover(tree.session, [tree.lowers["lower-b"].url])
    assert [s.name for s in servers] == ["lower-a", "lower-b", "upper"]
    assert {d.address for s in servers for d in s.devices} == {
        "lower-a/cam-1", "lower-a/cam-3", "lower-b/cam-2"}


async def test_device_heartbeat_is_echoed(tree: Tree):
    device = tree.devices["lower-a/cam-1"]
    await tree.until(lambda: device.last_heartbeat is not None, 5, "a first echo")
    first = device.last_heartbeat
    # the device beats every heartbeat_s: the server echoes each seq back
    await tree.until(lambda: device.last_heartbeat != first, 5, "a second, different echo")
    assert device.last_heartbeat > first


async def test_same_server_call_is_bridged_locally(tree: Tree):
    servers = await discover(tree.session, [tree.lowers["lower-a"].url])
    result = await run_call(tree.session, servers, "lower-a/cam-1", "cam-3", hold_s=1.0)
    assert result.ok, result.to_dict()
    assert "t_routed" not in result.timeline
    assert result.path == ["lower-a"]
    assert tree.upper.find_call(result.call) is None and not tree.upper.core.sessions
    assert result.media["caller_to_callee"]["frames"] > 0
    assert result.media["callee_to_caller"]["frames"] > 0


async def test_unknown_and_busy_devices_are_refused(tree: Tree):
    """What the caller's server knows (its own devices, the tree's servers) is refused at once;
    what only the callee's server knows ends the call with its reason."""
    a = ServerClient(tree.session, tree.lowers["lower-a"].url)
    for caller, callee, status, code, field in (
        ("lower-a/cam-1", "lower-a/nope", 404, "unknown_device", "callee"),
        ("lower-a/cam-1", "lower-z/cam-9", 404, "unknown_server", "callee"),
        ("lower-a/cam-1", "upper/cam-9", 404, "unknown_device", "callee"),
        ("lower-a/ghost", "lower-b/cam-2", 404, "unknown_device", "caller"),
        ("lower-b/cam-2", "lower-a/cam-1", 421, "caller_not_here", "caller"),
    ):
        async with tree.session.post(f"{a.url}/v1/calls",
                                     json={"caller": caller, "callee": callee}) as response:
            body = await response.json()
        assert response.status == status, body
        assert body["error"]["code"] == code and body["error"]["field"] == field
        assert body["error"]["message"]

    nobody = await a.create_call("lower-a/cam-1", "lower-b/nope")
    ended = await a.call(nobody.call, wait="ended", timeout_s=5)
    assert ended.reason == "unknown_device"
    assert ended.path == ["lower-a", "upper", "lower-b"]  # refused where it was known

    info = await a.create_call("lower-a/cam-1", "lower-b/cam-2")
    await tree.until(lambda: tree.upper.directory.devices["lower-b/cam-2"].state == "busy")
    busy = await a.create_call("lower-a/cam-3", "lower-b/cam-2")
    ended = await a.call(busy.call, wait="ended", timeout_s=5)
    assert ended.reason == "callee_busy"
    with pytest.raises(ProbeError) as caught:
        await a.create_call("lower-a/cam-1", "lower-a/cam-3")
    assert (caught.value.status, caught.value.code) == (409, "busy_device")
    assert "busy" in caught.value.message
    # nothing changed because of the refusals: one call, still going
    assert list(tree.lowers["lower-a"].core.sessions) == [info.call]
    await a.hangup(info.call)


async def test_bad_requests_get_4xx_with_reason(tree: Tree):
    url = tree.lowers["lower-a"].url
    cases = [("POST", "/v1/calls", b"{not json", 400, "bad_json"),
             ("POST", "/v1/calls", json.dumps({"caller": "x"}).encode(), 400, "bad_message"),
             ("POST", "/v1/calls", json.dumps([1]).encode(), 400, "bad_message"),
             ("GET", "/v1/calls/nope", None, 404, "unknown_call"),
             ("GET", "/v1/calls/bad%20id", None, 400, "bad_call_id"),
             ("DELETE", "/v1/calls/nope", None, 404, "unknown_call"),
             ("GET", "/v1/nothing", None, 404, "not_found"),
             ("PUT", "/v1/calls", None, 405, "method_not_allowed")]
    for method, path, body, status, code in cases:
        async with tree.session.request(method, url + path, data=body) as response:
            data = await response.json()
        assert (response.status, data["error"]["code"]) == (status, code), (path, data)
    async with tree.session.post(f"{tree.upper.url}/v1/calls",
                                 json={"caller": "cam-1", "callee": "cam-2"}) as response:
        assert response.status == 405


def call_tasks() -> set[asyncio.Task]:
    """Running tasks, less the HTTP server's keep-alive connection handlers."""
    return {t for t in asyncio.all_tasks()
            if t.get_coro().__qualname__ != "RequestHandler.start"}


async def test_hangup_closes_all_four_legs(tree: Tree):
    baseline = call_tasks()
    a = ServerClient(tree.session, tree.lowers["lower-a"].url)
    info = await a.create_call("lower-a/cam-1", "lower-b/cam-2")
    info = await a.call(info.call, wait="active", timeout_s=20)
    assert info.state == "active"
    legs = server_legs(tree, info.call)
    # caller<->A, A<->upper, upper<->B, B<->callee: two servers' ends of each of four hops
    assert len(legs) == 6
    assert all(leg.connection_state == "connected" for leg in legs)
    device_pcs = [d.calls[info.call].pc for d in tree.devices.values() if info.call in d.calls]
    assert len(device_pcs) == 2
    assert len(call_tasks() - baseline) >= 10  # the call's own tasks and aiortc's

    a_legs = list(tree.lowers["lower-a"].media.calls[info.call].legs.values())
    ended = await a.hangup(info.call)
    assert ended.state in ("ending", "ended") and ended.reason == "hangup"
    # ENDED is when this server's legs are closed (wire/states.py): they are, then
    ended = await a.call(info.call, wait="ended", timeout_s=10)
    assert ended.state == "ended"
    assert a_legs and all(leg.connection_state == "closed" for leg in a_legs)

    await tree.until(lambda: all(leg.connection_state == "closed" for leg in legs), 10)
    await tree.until(lambda: all(pc.connectionState == "closed" for pc in device_pcs), 10)
    for node in tree.servers.values():
        assert not node.core.sessions and not node.media.calls, node.name
    await tree.until(lambda: all(node.find_call(info.call).state is CallState.ENDED
                                 for node in tree.servers.values()), 5, "every server ENDED")
    await tree.until(lambda: all(not d.calls for d in tree.devices.values()), 5)
    # every task the call started is gone (aiortc's included)
    await tree.until(lambda: call_tasks() <= baseline, 10)
    # and both devices are free again, everywhere
    await tree.until(lambda: all(d.state == "idle" for d in tree.upper.directory.devices.values()))


async def test_device_gone_ends_its_call_with_reason(tree: Tree):
    a = ServerClient(tree.session, tree.lowers["lower-a"].url)
    info = await a.create_call("lower-a/cam-1", "lower-b/cam-2")
    await a.call(info.call, wait="active", timeout_s=20)
    callee_task = tree.tasks[1]  # lower-b/cam-2
    callee_task.cancel()
    ended = await a.call(info.call, wait="ended", timeout_s=5)
    assert ended.state == "ended" and ended.reason == "device_gone"
    assert not tree.lowers["lower-a"].core.sessions
    await tree.until(lambda: "lower-b/cam-2" not in tree.upper.directory.devices)


async def test_duplicate_device_and_malformed_messages(tree: Tree):
    url = tree.lowers["lower-a"].url.replace("http", "ws") + "/v1/device"
    async with tree.session.ws_connect(url) as ws:
        await ws.send_str("{oops")
        error = json.loads((await ws.receive()).data)
        assert error["type"] == "error" and error["code"] == "bad_message"
        await ws.send_json({"type": "register", "device": "cam-1"})
        error = json.loads((await ws.receive()).data)
        assert error["code"] == "duplicate_device" and error["field"] == "device"
        assert (await ws.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    # the registered cam-1 is untouched
    assert "cam-1" in tree.lowers["lower-a"].directory.own
    async with tree.session.ws_connect(url) as ws:
        await ws.send_json({"type": "register", "device": "cam-9"})
        assert json.loads((await ws.receive()).data)["type"] == "registered"
        await ws.send_json({"type": "answer", "call": "nosuch", "leg": "x", "sdp": "v=0\r\n"})
        error = json.loads((await ws.receive()).data)
        assert error["code"] == "unknown_call" and error["call"] == "nosuch"
        await ws.send_json({"type": "heartbeat", "seq": 4})
        assert json.loads((await ws.receive()).data) == {"type": "heartbeat", "seq": 4}


async def test_wake_timeout_when_device_never_answers():
    async with make_tree(Timeouts(wake=1.0, setup=5.0)) as tree:
        await tree.add_device("lower-a", "cam-1")
        url = tree.lowers["lower-b"].url.replace("http", "ws") + "/v1/device"
        async with tree.session.ws_connect(url) as ws:  # registers, then ignores everything
            await ws.send_json({"type": "register", "device": "mute"})
            await ws.receive()
            await tree.until(lambda: tree.known("lower-b/mute"))
            a = ServerClient(tree.session, tree.lowers["lower-a"].url)
            info = await a.create_call("lower-a/cam-1", "lower-b/mute")
            ended = await a.call(info.call, wait="ended", timeout_s=5)
            assert ended.reason == "callee_wake_timeout"
            assert "t_caller_woken" in ended.timeline and "t_callee_woken" not in ended.timeline
