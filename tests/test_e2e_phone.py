"""Loopback end-to-end: devices that dial, ring, answer, decline and hang up (issue 18), with
real aiortc peers, real sockets, and the probe's classification of how each call ended."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from endpoint.device import DialError
from endpoint.phone import dial_and_hold, report, ring_then
from probe.calls import run_call, summarize
from relay.call import Timeouts
from wire.client import ProbeError, ServerClient, discover
from wire.messages import DIRECTIONS

from .conftest import DEVICE_SETTINGS, Tree, make_tree

pytestmark = pytest.mark.e2e

RING = replace(DEVICE_SETTINGS, answer="ring")
DECLINE = replace(DEVICE_SETTINGS, answer="decline")


async def metric(tree: Tree, server: str, name: str, label: str) -> float:
    async with tree.session.get(f"{tree.servers[server].url}/metrics") as response:
        text = await response.text()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") and label in line]
    assert len(values) == 1, f"{name} with {label} in /metrics: {values}"
    return values[0]


async def test_a_device_dials_a_device_under_another_server(tree: Tree):
    caller = tree.devices["lower-a/cam-1"]
    result = await dial_and_hold(caller, tree.session, "lower-b/cam-2", hold_s=2.0)

    assert result.ok, report(result)
    assert result.reason == "hangup"
    info = result.info
    # the same path, timeline and figures as a probe's call, marked as the device's own
    assert info["started_by"] == "device"
    assert info["path"] == ["lower-a", "upper", "lower-b"]
    t = info["timeline"]
    assert t["t_received"] <= t["t_caller_woken"]
    assert t["t_callee_woken"] <= t["t_answered"] <= t["t_first_frame_callee"] < t["t_end"]
    for direction in DIRECTIONS:
        assert info["media"][direction]["frames"] >= 10, (direction, info["media"])
        assert 0 < info["media"][direction]["latency_ms_p50"] < 2000
    assert result.received["frames"] >= 10
    # each server of the path keeps its record of who started it
    for name in ("upper", "lower-b"):
        assert tree.servers[name].find_call(result.call).started_by == "device"
    originated = "relay_calls_originated_total"
    assert await metric(tree, "lower-a", originated, 'started_by="device"') == 1
    assert await metric(tree, "lower-a", originated, 'started_by="api"') == 0
    text = report(result)
    assert "caller_to_callee:" in text and "callee_to_caller:" in text and "no figures" not in text


async def test_a_call_dialed_is_listed_while_up_and_hung_up_by_the_callee(tree: Tree):
    caller, callee = tree.devices["lower-a/cam-3"], tree.devices["lower-b/cam-2"]
    call = await caller.dial("lower-b/cam-2")
    async with tree.session.get(f"{tree.lowers['lower-a'].url}/v1/calls") as response:
        listed = {c["call"]: c for c in (await response.json())["calls"]}
    assert listed[call]["started_by"] == "device" and listed[call]["caller"] == "lower-a/cam-3"
    await tree.until(lambda: call in callee.calls and call in caller.calls, 10,
                     "both devices in the call")
    await tree.until(lambda: callee.calls[call].video.first_at is not None, 10, "media")
    end = await callee.hangup(call)
    assert end.by == "local" and end.reason == "hangup"
    end = await caller.wait_end(call, 10)
    assert end.by == "remote" and end.reason == "hangup"


async def test_a_dial_is_refused_with_the_codes_post_calls_gives(tree: Tree):
    caller = tree.devices["lower-a/cam-1"]
    with pytest.raises(DialError) as unknown:
        await caller.dial("lower-a/nobody")
    assert unknown.value.code == "unknown_device"
    # as with POST /v1/calls, a device the caller's server cannot judge is looked for along
    # the path: the call is taken, and ends with the reason of the server that turned it away
    far = await caller.dial("lower-b/nobody")
    end = await caller.wait_end(far, 10)
    assert end.reason == "unknown_device" and end.by == "remote"
    with pytest.raises(DialError) as same:
        await caller.dial("lower-a/cam-1")
    assert same.value.code == "same_device"
    # a refused dial changes nothing: the next one goes through
    call = await caller.dial("lower-b/cam-2")
    assert call
    await caller.hangup(call)


async def test_a_ringing_callee_answers_later_and_the_timeline_shows_the_ring(tree: Tree):
    phone = await tree.add_device("lower-b", "desk", RING)
    phone.on_ring = ring_then(phone, 0.8)
    servers = await discover(tree.session, [tree.upper.url])
    result = await run_call(tree.session, servers, "lower-a/cam-1", "lower-b/desk", hold_s=1.5)

    assert result.ok, result.to_dict()
    t = result.timeline
    rang = t["t_answered"] - t["t_callee_woken"]
    assert 0.7 <= rang <= 3.0, t
    assert t["t_answered"] < t["t_first_frame_callee"]
    assert result.intervals["answered_ms"] > result.intervals["callee_woken_ms"] + 700


async def test_a_declined_call_ends_declined_and_the_probe_says_so(tree: Tree):
    await tree.add_device("lower-b", "busy-person", DECLINE)
    servers = await discover(tree.session, [tree.upper.url])
    result = await run_call(tree.session, servers, "lower-a/cam-1", "lower-b/busy-person",
                            hold_s=1.0)

    assert not result.ok and result.reason == "declined", result.to_dict()
    assert result.outcome.failure == "declined"
    assert summarize([result])["failures"] == {"declined": 1}
    assert "t_callee_woken" in result.timeline, result.timeline
    assert "t_answered" not in result.timeline, result.timeline
    # the caller's device was let go too
    caller = tree.devices["lower-a/cam-1"]
    await tree.until(lambda: result.call in caller.ended, 5, "the caller's end")
    assert caller.ended[result.call].reason == "declined"


async def test_an_unanswered_call_ends_no_answer_after_the_ring_timeout():
    async with make_tree(timeouts=Timeouts(ring=1.0)) as tree:
        await tree.add_device("lower-a", "cam-1")
        phone = await tree.add_device("lower-b", "away", RING)
        servers = await discover(tree.session, [tree.upper.url])
        result = await run_call(tree.session, servers, "lower-a/cam-1", "lower-b/away",
                                hold_s=1.0)

        assert result.reason == "no_answer", result.to_dict()
        assert result.outcome.failure == "no_answer"
        assert 0.9 <= result.timeline["t_end"] - result.timeline["t_callee_woken"] <= 3.0
        await tree.until(lambda: not phone.ringing, 5, "the phone to stop ringing")
        assert phone.ended[result.call].reason == "no_answer"


async def endpoint_call(tree: Tree, *options: str, device: str = "bench"
                        ) -> tuple[int | None, str, str]:
    """``python -m endpoint --call ...`` under lower-a, run to its end: status, out, err."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "endpoint", "--server", tree.lowers["lower-a"].url,
        "--device", device, "--size", "320x240", "--fps", "15", "--media-address",
        "127.0.0.1", "--connect-timeout", "20", *options, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, stdout.decode(), stderr.decode()


async def test_the_command_line_dials_and_prints_figures_both_ways(tree: Tree):
    """``python -m endpoint --call``: a separate process dials a device under the other lower
    server, holds, hangs up, and prints what both directions carried."""
    status, out, err = await endpoint_call(tree, "--call", "lower-b/cam-2", "--hold", "2",
                                           "--json")
    assert status == 0, (out[-2000:], err[-2000:])
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] and result["reason"] == "hangup"
    assert result["info"]["started_by"] == "device"
    assert result["info"]["caller"] == "lower-a/bench"
    for direction in DIRECTIONS:
        assert result["info"]["media"][direction]["frames"] >= 10, result["info"]["media"]


async def test_any_server_lists_the_whole_tree_s_devices_with_their_state(tree: Tree):
    """``GET /v1/devices?scope=tree``: the phone book of the browser page, from the root."""
    caller = tree.devices["lower-a/cam-1"]
    call = await caller.dial("lower-b/cam-2")
    await tree.until(lambda: call in tree.devices["lower-b/cam-2"].calls, 10, "the call up")
    for server in ("lower-a", "lower-b", "upper"):
        async with tree.session.get(f"{tree.servers[server].url}/v1/devices",
                                    params={"scope": "tree"}) as response:
            assert response.status == 200
            body = await response.json()
        states = {d["address"]: d["state"] for d in body["devices"]}
        assert states == {"lower-a/cam-1": "busy", "lower-a/cam-3": "idle",
                          "lower-b/cam-2": "busy"}, (server, states)
    async with tree.session.get(f"{tree.lowers['lower-a'].url}/v1/devices",
                                params={"scope": "everything"}) as response:
        assert response.status == 400 and (await response.json())["error"]["code"] == "bad_query"
    await caller.hangup(call)


async def test_the_command_line_runs_a_one_call_scenario(tree: Tree, tmp_path):
    """``python -m endpoint --call ADDRESS --scenario FILE``: the device dials, the callee
    (a scripted device of the tree) rings 0.6 s, answers, and hangs up itself after 1.5 s, as
    the scenario says; the command reads the same scenario format as ``probe load``."""
    scenario = tmp_path / "call.toml"
    scenario.write_text('name = "ring-then-callee-hangs-up"\n'
                        'steps = [{dial = {from = "device"}}, {ring = 0.6}, '
                        '{hold = 1.5}, {hangup = {by = "callee"}}]\n')
    status, out, err = await endpoint_call(tree, "--call", "lower-b/cam-2", "--scenario",
                                           str(scenario), "--json")
    assert status == 0, (out[-2000:], err[-2000:])
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] and result["reason"] == "hangup", result
    timeline = result["info"]["timeline"]
    assert 0.55 <= timeline["t_answered"] - timeline["t_callee_woken"] <= 1.2, timeline
    up = max(timeline["t_first_frame_callee"], timeline["t_first_frame_caller"])
    assert 1.3 <= timeline["t_end"] - up <= 2.5, timeline  # the callee hung up after its hold
    callee = tree.devices["lower-b/cam-2"]
    assert callee.ended[result["call"]].by == "local"  # it was the callee that hung up
    bad = tmp_path / "api.json"
    bad.write_text(json.dumps({"steps": [{"dial": {"from": "api"}}, {"hold": 1},
                                         {"hangup": {}}]}))
    status, _, err = await endpoint_call(tree, "--call", "lower-b/cam-2", "--scenario",
                                         str(bad), device="bench2")
    assert status == 2 and "endpoint --call dials from the device" in err


async def test_a_request_waits_for_any_state_of_the_call():
    """``GET /v1/calls/{id}?wait=STATE``: held until the call is in that state or past it."""
    async with make_tree() as tree:
        await tree.add_device("lower-a", "cam-1")
        phone = await tree.add_device("lower-b", "desk", RING)
        client = ServerClient(tree.session, tree.lowers["lower-a"].url)
        info = await client.create_call("lower-a/cam-1", "lower-b/desk")
        rung = await client.call(info.call, wait="ringing", timeout_s=10)
        assert rung.state == "ringing" and "t_callee_woken" in rung.timeline
        await phone.pickup(info.call)
        up = await client.call(info.call, wait="connecting", timeout_s=10)
        assert up.state in ("connecting", "active")  # or past it
        assert (await client.call(info.call, wait="active", timeout_s=20)).state == "active"
        await client.hangup(info.call)
        assert (await client.call(info.call, wait="ended", timeout_s=10)).state == "ended"
        with pytest.raises(ProbeError) as bad:
            await client.call(info.call, wait="asleep", timeout_s=1)
        assert bad.value.code == "bad_query" and "waking, ringing, connecting" in str(bad.value)
