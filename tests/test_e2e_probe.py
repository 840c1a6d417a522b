"""The probe against a real tree (in this process): load with packet devices and signalling
only, each failure class produced for real and counted, every server's /metrics, and a capacity
search that finds a server's limit."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from endpoint.device import Device, MediaSupply
from endpoint.packets import PacketSender
from probe.capacity import CapacitySettings, search
from probe.load import LoadSettings, run_load
from probe.objective import Objective
from probe.scrape import ServerWatch
from relay.call import Timeouts
from wire.client import discover

from .conftest import DEVICE_SETTINGS, Tree, make_tree

pytestmark = pytest.mark.e2e

PACKETS = replace(DEVICE_SETTINGS, video="packets", fps=30)


async def packet_tree(tree: Tree, per_server: int) -> None:
    supply = MediaSupply.for_settings(PACKETS)  # one loop, one send log: latency is measured
    for server in ("lower-a", "lower-b"):
        for i in range(per_server):
            tree.start(server, Device(tree.lowers[server].url, f"{server[-1]}{i}", PACKETS,
                                      supply=supply))
    total = 2 * per_server
    await tree.until(lambda: len(tree.upper.directory.devices) == total, 15,
                     f"{total} devices in the upper server's directory")


async def load(tree: Tree, **kwargs):
    servers = await discover(tree.session, tree.urls)
    settings = LoadSettings(**{"rate": 4, "duration_s": 1.0, "hold_s": 1.0, "seed": 2,
                               "max_lag_ms": 500, **kwargs})
    return await run_load(tree.session, servers, settings)


async def test_load_with_packet_devices_and_metrics():
    async with make_tree() as tree:
        await packet_tree(tree, 6)
        watched = {s.name: s.url for s in (tree.upper, *tree.lowers.values())}
        watched["ghost"] = "http://127.0.0.1:9"  # nothing there: reported, not fatal
        async with ServerWatch(tree.session, watched, interval_s=0.3) as watch:
            report = await load(tree, rate=4, duration_s=1.5, hold_s=1.5)
        total = report.recorder.total
        assert report.started == 6 and total.calls == 6
        assert total.failures == {} and total.ok == 6, total.details
        assert set(report.recorder.servers) == {"lower-a", "lower-b"}
        latency = total.histograms["media_latency_ms"]
        assert 0 < latency.get_value_at_percentile(50) < 50_000  # µs: packet transit, 4 hops
        assert total.histograms["setup_ms"].get_total_count() == 6
        assert total.frame_loss is not None and total.frame_loss < 0.02
        for server in (tree.upper, *tree.lowers.values()):
            async with tree.session.get(f"{server.url}/metrics") as response:
                assert response.status == 200
                text = await response.text()
            samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                       for family in text_string_to_metric_families(text)
                       for sample in family.samples}
            me = (("role", server.role), ("server", server.name))
            ended = samples[("relay_calls_ended_total", (("reason", "hangup"), *me))]
            assert ended == 6
            assert samples[("relay_calls_started_total", me)] == 6
            assert samples[("relay_forwarded_packets_total", me)] > 100
            assert samples[("relay_fast_path_packets_total", me)] > 0
            assert "process_resident_memory_bytes" in text
            assert "relay_event_loop_lag_seconds_count" in text
        # the probe's own view of the same /metrics over the run
        seen = watch.summary()
        assert seen["ghost"]["scrapes"] == 0 and seen["ghost"]["failed_scrapes"] >= 3
        assert "127.0.0.1:9/metrics" in seen["ghost"]["last_error"]
        for name in ("upper", "lower-a", "lower-b"):
            server = seen[name]
            assert server["scrapes"] >= 5 and server["failed_scrapes"] == 0, server
            counters = server["counters"]
            assert counters["relay_calls_started_total"] == 6, counters
            assert counters["relay_calls_ended_total{reason=hangup}"] == 6
            assert counters["relay_forwarded_packets_total"] > 100
            assert server["legs"]["peak"] >= 2 and server["legs"]["end"] == 0
            assert server["memory_mb"]["peak"] >= server["memory_mb"]["start"] > 10
            assert server["loop_lag_p99_ms_at_most"] is not None
            # the servers share this test's process: it was busy carrying the calls
            assert server["cpu_pct"] is not None and server["cpu_pct"] > 0


async def test_signalling_only_calls_make_no_media_leg():
    async with make_tree() as tree:
        await packet_tree(tree, 3)
        report = await load(tree, rate=20, duration_s=1.0, hold_s=0, media="none")
        total = report.recorder.total
        assert total.ok == total.calls >= 15, total.details
        assert "media_latency_ms" not in total.histograms
        assert total.histograms["setup_ms"].get_total_count() == total.calls
        for server in (tree.upper, *tree.lowers.values()):
            assert server.forwarding.packets == 0  # no leg, no media
        for device in tree.devices.values():
            assert device.calls == {}  # woken only: no peer connection made


async def test_unknown_and_busy_devices_are_counted_as_such():
    async with make_tree() as tree:
        await packet_tree(tree, 2)
        unknown = await load(tree, pairing="explicit", pairs=(("lower-a/a0", "lower-b/zz"),),
                             rate=2, duration_s=1.0)
        assert unknown.recorder.total.failures == {"unknown_device": 2}
        # a call the probe did not make keeps b0 busy
        async with tree.session.post(f"{tree.lowers['lower-a'].url}/v1/calls", json={
                "caller": "lower-a/a1", "callee": "lower-b/b0", "media_mode": "none"}) as r:
            assert r.status == 201
        await tree.until(lambda: tree.upper.directory.devices["lower-b/b0"].state == "busy")
        busy = await load(tree, pairing="explicit", pairs=(("lower-a/a0", "lower-b/b0"),),
                          rate=2, duration_s=1.0)
        assert busy.recorder.total.failures == {"busy_device": 2}, busy.recorder.total.details


async def test_a_device_that_sends_nothing_is_no_media(monkeypatch):
    async def silent(self):  # a broken device: answers, never sends a packet
        await asyncio.Event().wait()

    monkeypatch.setattr(PacketSender, "run", silent)
    async with make_tree(Timeouts(wake=2, setup=2)) as tree:
        await packet_tree(tree, 1)
        report = await load(tree, rate=1, duration_s=1.0, hold_s=0.5)
        assert report.recorder.total.failures == {"no_media": 1}, report.recorder.total.details


async def test_a_device_lost_mid_call_is_dropped_and_media_that_stops_is_stalled(monkeypatch):
    original = PacketSender.run

    async def stops(self):  # sends for half a second, then goes quiet
        try:
            async with asyncio.timeout(0.5):
                await original(self)
        except TimeoutError:
            await asyncio.Event().wait()

    async with make_tree() as tree:
        await packet_tree(tree, 1)
        task = asyncio.create_task(load(tree, rate=1, duration_s=1.0, hold_s=3.0))
        await tree.until(lambda: any(d.calls for d in tree.devices.values()), 10)
        await asyncio.sleep(1.0)
        victim = next(d for d in tree.devices.values() if d.id == "b0")
        index = list(tree.devices.values()).index(victim)
        tree.tasks[index].cancel()  # the device's link goes away mid-call
        report = await task
        assert report.recorder.total.failures == {"dropped": 1}, report.recorder.total.details
        assert report.recorder.total.details == {"dropped:device_gone": 1}

    monkeypatch.setattr(PacketSender, "run", stops)
    async with make_tree() as tree:
        await packet_tree(tree, 1)
        report = await load(tree, rate=1, duration_s=1.0, hold_s=3.0)
        assert report.recorder.total.failures == {"stalled": 1}, report.recorder.total.details


async def test_capacity_search_finds_the_rate_where_a_server_turns_calls_away():
    # Lower servers that take 4 calls at once; 1 s calls: past ~4 calls/s they answer "busy".
    async with make_tree(max_calls=4) as tree:
        await packet_tree(tree, 10)
        servers = await discover(tree.session, tree.urls)
        load = LoadSettings(rate=1, duration_s=2.0, hold_s=1.0, media="none", seed=3,
                            max_lag_ms=500)
        steps = []
        async with ServerWatch(tree.session, {s.name: s.url for s in servers},
                               interval_s=None) as watch:
            found = await search(tree.session, servers, load, Objective(),
                                 CapacitySettings(start_rate=1, factor=2, max_rate=32,
                                                  bisect_steps=2, pause_s=0.3),
                                 steps.append, watch)
        assert set(found) == {"lower-a", "lower-b"}
        for name, capacity in found.items():
            assert capacity.rate is not None and 1 <= capacity.rate < 8, capacity.summary()
            assert capacity.failed_rate is not None and capacity.failed_rate <= 16
            assert capacity.rate < capacity.failed_rate and not capacity.invalid
            assert any("success" in why for why in capacity.failed_because), \
                capacity.failed_because
            mine = [step for step in steps if step.server == name]
            assert mine == capacity.steps and len(mine) >= 3  # steps up, then bisects
            assert [s.rate for s in mine][:2] == [1, 2]
            for step in mine:  # each step's own slice of every server's /metrics
                # either end may be the one full: the caller's server, or the callee's
                refused = sum(busy(step.server_metrics[lower]) for lower in found)
                assert (refused > 0) == (not step.passed), step.row()
                started = step.server_metrics[name]["counters"]["relay_calls_started_total"]
                assert started >= step.report.started - refused
                assert set(step.row()["server_cpu_pct"]) == {"upper", "lower-a", "lower-b"}
        whole = watch.summary()
        for lower in found:  # the steps' slices add up to the whole run
            assert busy(whole[lower]) == sum(busy(s.server_metrics[lower]) for s in steps)


def busy(server_metrics: dict) -> float:
    return server_metrics["counters"].get("relay_refusals_total{code=server_busy}", 0)
