"""A tree of three levels in this process (root, two mid servers, four lower servers), real
sockets and aiortc peers: every pair of lower servers calls with media both ways along exactly
the tree path; a mid server that stops ends the calls through it, at every server left, with its
reason, while the other subtree's calls go on; back again, it takes calls again."""

from __future__ import annotations

from dataclasses import replace

import pytest

from endpoint.device import Device, MediaSupply
from lab.topology import parse
from probe.calls import run_call
from probe.capacity import CapacitySettings, search
from probe.load import LoadSettings, run_load
from probe.objective import Objective
from relay.call import CallState
from relay.settings import ServerSettings
from wire.client import ServerClient, discover, tree_path

from .conftest import DEVICE_SETTINGS, LOOPBACK, Tree, make_tree

pytestmark = pytest.mark.e2e

TOPOLOGY = parse({"name": "root", "children": [
    {"name": "mid-1", "children": [{"name": "lower-a1"}, {"name": "lower-a2"}]},
    {"name": "mid-2", "children": [{"name": "lower-b1"}, {"name": "lower-b2"}]}]})
PACKETS = replace(DEVICE_SETTINGS, video="packets", fps=30)


async def with_devices(tree: Tree, per_server: int) -> None:
    supply = MediaSupply.for_settings(PACKETS)  # one send log: latency between servers
    for name, lower in tree.lowers.items():
        for i in range(per_server):
            tree.start(name, Device(lower.url, f"{name[-2:]}-{i}", PACKETS, supply=supply))
    await tree.until(lambda: len(tree.upper.directory.devices) == 4 * per_server, 20,
                     "every device in the root's directory")


async def test_every_pair_of_lower_servers_calls_along_the_tree_path():
    async with make_tree(topology=TOPOLOGY) as tree:
        await with_devices(tree, 3)
        servers = await discover(tree.session, [tree.lowers["lower-b2"].url])  # any one
        assert {s.name for s in servers} == set(tree.servers)
        # 18 starts for 12 routes: a start or two may find a route's devices still busy
        report = await run_load(tree.session, servers, LoadSettings(
            rate=2, duration_s=9.0, hold_s=1.0, pairing="every-pair", seed=1,
            max_lag_ms=500))
        pairs = {}
        for result in report.results:
            assert result.ok, result.to_dict()
            for direction in ("caller_to_callee", "callee_to_caller"):
                assert result.media[direction]["frames"] > 10, result.to_dict()
            a, b = result.caller.split("/")[0], result.callee.split("/")[0]
            pairs[a, b] = result.path
        lowers = sorted(tree.lowers)
        assert set(pairs) == {(a, b) for a in lowers for b in lowers if a != b}
        for (a, b), path in pairs.items():
            assert path == tree_path(servers, a, b)
            if a[:-1] == b[:-1]:  # the same mid server: three servers, never the root
                assert len(path) == 3 and "root" not in path, path
            else:
                assert len(path) == 5 and path[2] == "root", path
        # every server judged on the calls that crossed it
        crossing = report.recorder.crossing
        every = [r.path for r in report.results]
        assert crossing["root"].calls == sum(1 for p in every if "root" in p)
        assert crossing["mid-1"].calls == sum(1 for p in every if "mid-1" in p)


async def test_a_mid_server_stopped_mid_call_ends_its_calls_and_no_others():
    async with make_tree(topology=TOPOLOGY) as tree:
        await with_devices(tree, 2)
        a1 = ServerClient(tree.session, tree.lowers["lower-a1"].url)
        b1 = ServerClient(tree.session, tree.lowers["lower-b1"].url)
        through = await a1.create_call("lower-a1/a1-0", "lower-b2/b2-0", media="none")
        inside = await b1.create_call("lower-b1/b1-0", "lower-b2/b2-1", media="none")
        for client, info in ((a1, through), (b1, inside)):
            assert (await client.call(info.call, wait="active", timeout_s=10)).state == "active"
        port = int(tree.servers["mid-1"].url.rsplit(":", 1)[1])
        await tree.stop_server("mid-1")  # drains, as on SIGTERM
        for name in ("lower-a1", "root", "mid-2", "lower-b2"):
            node = tree.servers[name]
            await tree.until(lambda node=node: node.find_call(through.call).state is
                             CallState.ENDED, 5, f"the call through mid-1 ended at {name}")
            assert node.find_call(through.call).reason == "server_shutting_down", name
        for name in ("lower-b1", "mid-2", "lower-b2"):
            assert tree.servers[name].find_call(inside.call).state is CallState.ACTIVE, name
        assert "root" not in tree.servers["lower-b1"].find_call(inside.call).path
        # mid-1 back on its own address: its subtree announces again and takes calls
        again = await tree.start_server(ServerSettings(
            role="upper", name="mid-1", port=port, parent=tree.upper.url, media=LOOPBACK))
        await tree.until(lambda: {"lower-a1", "lower-a2"} <= set(again.directory.below), 15,
                         "lower-a1 and lower-a2 back under mid-1")
        await tree.until(lambda: tree.known("lower-a1/a1-1"), 10, "a1-1 known at the root")
        await tree.until(lambda: tree.servers["lower-b1"].directory.server("lower-a1")
                         is not None, 5, "lower-b1 told of lower-a1 again")
        servers = await discover(tree.session, [tree.upper.url])
        result = await run_call(tree.session, servers, "lower-b1/b1-1", "lower-a1/a1-1",
                                hold_s=0.5)
        assert result.ok, result.to_dict()
        assert result.path == ["lower-b1", "mid-2", "root", "mid-1", "lower-a1"]


async def test_capacity_via_a_transit_server_finds_where_it_turns_calls_away():
    # The root takes 3 calls at once; 1 s calls across the subtrees all cross it.
    async with make_tree(topology=TOPOLOGY, max_calls_at={"root": 3}) as tree:
        await with_devices(tree, 6)
        servers = await discover(tree.session, [tree.upper.url])
        load = LoadSettings(rate=1, duration_s=2.0, hold_s=1.0, media="none", seed=4,
                            max_lag_ms=500, via="root")
        found = await search(tree.session, servers, load, Objective(),
                             CapacitySettings(start_rate=1, factor=2, max_rate=32,
                                              bisect_steps=1, pause_s=0.3))
        assert set(found) == {"root"}
        capacity = found["root"]
        summary = capacity.summary()
        assert summary["server_under_test"] == "root" and summary["as"] == "transit"
        assert capacity.rate is not None and 1 <= capacity.rate < 8, summary
        assert capacity.failed_rate is not None and capacity.rate < capacity.failed_rate
        for step in capacity.steps:
            crossed = step.report.recorder.crossing["root"]
            assert crossed.calls == step.report.started  # every call crossed the root
            if not step.passed:
                assert crossed.details.get("rejected:server_busy", 0) > 0, crossed.details
        assert tree.upper.core.counters.refusals.get("server_busy", 0) > 0
