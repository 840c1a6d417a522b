"""Per-hop figures as pure logic: the transit histogram, a stream's figures, the links a call's
hops make, the bottleneck the probe names, and that a server's figures travel its call's path
and nobody may speak for another server's hop (tests/fake_tree.py)."""

from __future__ import annotations

import pytest

from endpoint.meter import PartMeter
from probe.bottleneck import bottleneck, budget, parts
from probe.capacity import GiveWay, Step, describe_gave_way, gave_way
from probe.load import LoadReport, LoadSettings
from probe.stats import Outcome, Recorder
from relay.effects import Link
from relay.hops import links_of
from rtc.meter import Buckets, StreamMeter
from wire.messages import CallUpdate, HopFigures, LegHop, StreamHop

from .fake_tree import FakeTree


def test_buckets_quantiles_are_within_one_bucket_and_never_past_the_max():
    buckets = Buckets()
    assert buckets.quantile(0.5) is None
    for ms in [0.1] * 90 + [5.0] * 9 + [40.0]:
        buckets.record(ms)
    assert 0.1 <= buckets.quantile(0.5) < 0.1 * 1.13
    assert 5.0 <= buckets.quantile(0.95) < 5.0 * 1.13
    assert buckets.quantile(1.0) == buckets.max == 40.0
    assert buckets.total == 100 and buckets.mean == pytest.approx(0.94)


def test_a_stream_s_figures():
    meter = StreamMeter()
    for i in range(11):
        meter.arrived(1000, 10.0 + i * 0.1)  # 11 kB over 1 s
    meter.transit.record(0.5)
    meter.keyframes_in += 2
    figures = meter.figures(lost=3, repaired=2, jitter_ms=1.23456)
    assert figures.packets == 11 and figures.bytes == 11000
    assert figures.bitrate_kbps == 88.0
    assert (figures.lost, figures.repaired, figures.jitter_ms) == (3, 2, 1.235)
    assert figures.transit_samples == 1 and figures.transit_ms_max == 0.5
    assert figures.keyframes_in == 2
    assert meter.figures(lost=-1).lost == 0  # a duplicate counted past the expected


def hop(server: str, transit: float, rtt_up: float | None, rtt_down: float | None,
        lost_c2c: int = 0, setup: float = 50.0, far_lost: int = 0,
        p99: float | None = None) -> HopFigures:
    stream = {"video": StreamHop(packets=100, lost=lost_c2c, transit_ms_mean=transit,
                                 transit_ms_p99=p99)}
    legs = [LegHop(toward="caller", peer="up", rtt_ms=rtt_up, dtls_ms=setup),
            LegHop(toward="callee", peer="down", rtt_ms=rtt_down, dtls_ms=setup,
                   far_lost=far_lost)]
    return HopFigures(server=server, at=1.0, legs=legs,  # type: ignore[arg-type]
                      streams={"caller_to_callee": stream,  # type: ignore[dict-item]
                               "callee_to_caller": {"video": StreamHop(
                                   packets=90, transit_ms_mean=transit)}})


def test_links_run_device_to_device_with_each_end_s_figures():
    hops = {"a": hop("a", 0.3, 1.0, 2.0), "u": hop("u", 9.0, 4.0, 6.0, lost_c2c=5),
            "b": hop("b", 0.3, 6.0, 1.0, far_lost=7)}
    links = links_of(["a", "u", "b"], "a/cam-1", "b/cam-2", hops)
    assert [(link.from_, link.to) for link in links] == [
        ("a/cam-1", "a"), ("a", "u"), ("u", "b"), ("b", "b/cam-2")]
    first, a_u, u_b, last = links
    assert u_b.rtt_ms == 6.0
    # only a's end has a leg there; the one-way estimate is half the round trip less what the
    # reports waited at a (its transit mean, 0.3 ms)
    assert first.rtt_ms == 1.0 and first.one_way_ms == 0.35
    assert a_u.rtt_ms == 3.0  # the mean of a's 2.0 and u's 4.0
    # caller_to_callee on a -> u: what arrived at u; callee_to_caller: what arrived at a
    assert a_u.directions["caller_to_callee"].lost == 5
    assert a_u.directions["callee_to_caller"].packets == 90
    # toward the callee device nothing of ours receives: the device's RTCP report says
    assert last.directions["caller_to_callee"].lost == 7
    assert links_of([], "x/1", "y/2", hops) == []


def test_a_call_cut_off_on_its_way_has_no_link_past_the_last_server_it_reached() -> None:
    hops = {"a": hop("a", 0.3, 1.0, 2.0), "u": hop("u", 9.0, 4.0, 6.0)}
    # turned away at u (or cut off there): the path ends at u, the callee's server never had it
    links = links_of(["a", "u"], "a/cam-1", "b/cam-2", hops)
    assert [(link.from_, link.to) for link in links] == [("a/cam-1", "a"), ("a", "u")]
    # a callee still a bare id was never resolved by its server
    links = links_of(["a", "u"], "a/cam-1", "cam-2", hops)
    assert [link.to for link in links] == ["a", "u"]


def test_the_bottleneck_is_the_hop_with_the_largest_share():
    hops = {"a": hop("a", 0.3, 1.0, 2.0), "u": hop("u", 9.0, 4.0, 6.0, lost_c2c=5),
            "b": hop("b", 0.3, 6.0, 1.0)}
    links = [link.to_dict() for link in links_of(["a", "u", "b"], "a/1", "b/2", hops)]
    records = [h.to_dict() for h in hops.values()]
    found = bottleneck(records, links)
    assert found["latency_ms"]["hop"] == "u"  # 9 ms each way
    assert found["latency_ms"]["value"] == 18.0
    latency = parts(records, links)["latency_ms"]
    assert found["latency_ms"]["share"] == pytest.approx(18.0 / sum(latency.values()), abs=1e-3)
    assert found["lost"]["hop"] == "a -> u"
    assert bottleneck([], [])["latency_ms"] is None


def test_hop_figures_travel_the_path_and_nobody_speaks_for_another_hop():
    tree = FakeTree({"name": "root", "children": [
        {"name": "mid-1", "children": [{"name": "a1"}, {"name": "a2"}]},
        {"name": "mid-2", "children": [{"name": "b1"}, {"name": "b2"}]}]})
    tree.register("a1", "cam-1")
    tree.register("b1", "cam-2")
    call = tree.call("a1", "a1/cam-1", "b1/cam-2")
    path = tree.servers["a1"].find_call(call).path
    for name in path:
        tree.servers[name].hop_figures(call, HopFigures(server=name, at=tree.now), tree.now)
        tree._drain(name)
    tree.pump()
    for name in path:  # every server of the path holds every hop
        info = tree.servers[name].call_info(tree.servers[name].find_call(call))
        assert [h.server for h in info.hops] == path, name
        assert len(info.links) == len(path) + 1
    # b1 (below mid-2) tries to report for mid-1, on the other side of mid-2: dropped
    mid2 = tree.servers["mid-2"]
    forged = CallUpdate(call=call, hops={"mid-1": HopFigures(server="mid-1", at=99.0),
                                         "b1": HopFigures(server="b1", at=98.0)})
    mid2.receive(Link("child", "b1"), forged, tree.now)
    tree._drain("mid-2")
    tree.pump()
    for name in path:
        hops = tree.servers[name].find_call(call).hops
        assert hops["mid-1"].at == tree.now, name
        assert hops["b1"].at == (98.0 if name != "b1" else tree.now), name
    # after the end, the last figures still travel (the ended record takes them)
    tree.hangup("a1", call)
    tree.servers["root"].hop_figures(call, HopFigures(server="root", at=500.0), tree.now)
    tree._drain("root")
    tree.pump()
    assert tree.servers["a1"].find_call(call).hops["root"].at == 500.0


def test_a_device_part_is_matched_by_frame_and_forgets_frames_that_never_end():
    meter = PartMeter(keep=2)
    assert meter.part() is None
    meter.begin(100, 1.000)
    meter.begin(100, 1.500)  # a later packet of the same frame: the first one counts
    meter.end(100, 1.010)
    meter.end(100, 1.020)  # ended already: nothing
    for key in (200, 300, 400):  # 200 is pushed out before it ends
        meter.begin(key, 2.0)
    meter.end(200, 2.5)
    meter.end(400, 2.004)
    part = meter.part()
    assert part is not None and part.frames == 2
    assert part.mean_ms == pytest.approx(7.0, abs=0.01)


def test_the_latency_budget_adds_the_parts_and_says_what_they_miss():
    hops = {"a": hop("a", 0.5, 1.0, 2.0), "b": hop("b", 1.5, 2.0, 1.0)}
    links = [link.to_dict() for link in links_of(["a", "b"], "a/1", "b/2", hops)]
    media = {"caller_to_callee": {"latency_ms_mean": 50.0,
                                  "receiver": {"frames": 9, "mean_ms": 40.0}},
             "callee_to_caller": {"latency_ms_mean": 30.0}}
    senders = {"caller_to_callee": {"frames": 9, "mean_ms": 5.0}}
    split = budget([h.to_dict() for h in hops.values()], links, media, senders)
    forward = split["caller_to_callee"]
    # 5 sender + links ((1.0 - 0.5) / 2, (2.0 - 0.5 - 1.5) / 2, 0: the waits at the ends
    # taken out) + (0.5 + 1.5) servers + 40 receiver
    assert forward["links_ms"] == 0.25 and forward["servers_ms"] == 2.0
    assert forward["sum_ms"] == 47.25 and forward["unexplained_ms"] == 2.75
    assert split["callee_to_caller"]["sender_ms"] is None
    found = bottleneck([h.to_dict() for h in hops.values()], links, media, senders)
    assert found["latency_ms"]["hop"] == "b/2"  # the receiving device's 40 ms


def test_a_run_s_hops_aggregate_by_name_and_merge_exactly():
    from probe.hopstats import HopsRecorder, run_name

    hops = {"a": hop("a", 0.5, 1.0, 2.0), "u": hop("u", 9.0, 4.0, 6.0, lost_c2c=5),
            "b": hop("b", 0.3, 6.0, 1.0)}
    links = [link.to_dict() for link in links_of(["a", "u", "b"], "a/1", "b/2", hops)]
    records = [h.to_dict() for h in hops.values()]
    one, other, both = HopsRecorder(), HopsRecorder(), HopsRecorder()
    for recorder in (one, both):
        recorder.add(records, links)
    for recorder in (other, both):
        recorder.add(records, links)
        recorder.add([], [])  # a call that carried no media adds nothing
    merged = HopsRecorder.from_summary(one.summary())
    merged.merge(HopsRecorder.from_summary(other.summary()))
    assert merged.summary() == both.summary()
    upper = both.summary()["u"]
    assert upper["calls"] == 2 and upper["bottleneck"] == {"latency_ms": 2}
    assert upper["latency_ms"]["p50"] == pytest.approx(18.0, rel=0.01)
    a_u = both.summary()["a - u"]
    assert a_u["lost"] == 10 and a_u["packets"] == 2 * (100 + 90)
    assert a_u["bottleneck"] == {"lost": 2}
    assert a_u["loss"] == pytest.approx(10 / 390, abs=1e-4)
    assert "a/* - a" not in both.summary() and "a - a/*" in both.summary()  # devices by server
    # what arrived at u: a -> u caller_to_callee (100, 5 lost), u -> b callee_to_caller (90)
    assert (upper["packets_in"], upper["lost_in"]) == (2 * 190, 2 * 5)
    assert upper["loss_in"] == pytest.approx(10 / 390, abs=1e-4)
    assert run_name("b -> a/cam-7") == run_name("a/cam-9 -> b") == "a/* - b"


def test_a_link_s_round_trip_is_the_least_seen_when_known():
    stalled = HopFigures(server="u", at=1.0, legs=[  # type: ignore[arg-type]
        LegHop(toward="caller", peer="a", rtt_ms=14.0, rtt_min_ms=0.8)])
    calm = HopFigures(server="a", at=1.0, legs=[  # type: ignore[arg-type]
        LegHop(toward="callee", peer="u", rtt_ms=12.0)])
    links = links_of(["a", "u"], "a/1", "u/2", {"a": calm, "u": stalled})
    # the stalled end's least round trip, the calm end's smoothed one (all it has)
    assert links[1].rtt_ms == pytest.approx((0.8 + 12.0) / 2)


def _step(rate: float, passed: bool, p99: dict[str, float], lag: dict[str, float] | None = None,
          cpu: dict[str, float] | None = None, lost: int = 0) -> Step:
    """A capacity step of one call a -> u -> b with these transit p99s and /metrics."""
    recorder = Recorder()
    hops = {name: hop(name, 0.5, 1.0, 1.0, p99=p99.get(name),
                      lost_c2c=lost if name == "b" else 0) for name in ("a", "u", "b")}
    links = [link.to_dict() for link in links_of(["a", "u", "b"], "a/1", "b/2", hops)]
    recorder.add("a", 0.0, Outcome(True), {}, {}, path=["a", "u", "b"],
                 hops=[h.to_dict() for h in hops.values()], links=links)
    metrics = {name: {"loop_lag_p99_ms_at_most": (lag or {}).get(name, 5.0),
                      "cpu_pct": (cpu or {}).get(name, 10.0)} for name in ("a", "u", "b")}
    report = LoadReport(LoadSettings(rate=rate, duration_s=1.0), recorder)
    return Step("u", rate, passed, [] if passed else ["success"], report, metrics, via=True)


def test_capacity_names_the_server_that_gave_way_first():
    limits = GiveWay()
    calm = {"a": 1.0, "u": 2.0, "b": 1.5}
    # b's transit p99 passes its limit at 4 calls/s, while the search still passes: b gave
    # way first, though u (the server searched) is the one that fails at 8
    steps = [_step(2, True, calm), _step(4, True, {**calm, "b": 30.0}),
             _step(8, False, {**calm, "b": 45.0}, lag={"u": 200.0})]
    found = gave_way(steps, 8, limits)
    assert found is not None
    assert (found["server"], found["by"], found["value"], found["rate"]) == \
        ("b", "transit_p99_ms", pytest.approx(30.0, rel=0.01), 4)
    assert found["past_limit"] and found["limit"] == 20.0
    assert set(found["at_failing_rate"]) == {"a", "u", "b"}
    assert found["at_failing_rate"]["u"]["loop_lag_p99_ms"] == 200.0
    assert describe_gave_way(found).startswith("gave way first: b, transit_p99_ms 30")
    # in one step, the server furthest past a limit: u's lag is 4x its limit, b's CPU 1.05x
    found = gave_way([_step(8, False, calm, lag={"u": 200.0}, cpu={"b": 95.0})], 8, limits)
    assert (found["server"], found["by"]) == ("u", "loop_lag_p99_ms")
    # as far past a limit (lag buckets are coarse): the one further past its limits in all
    found = gave_way([_step(8, False, {**calm, "a": 15.0}, lag={"u": 100.0, "a": 100.0})], 8,
                     limits)
    assert (found["server"], found["by"]) == ("a", "loop_lag_p99_ms")
    # loss on the way to b: 30 of 130 video packets sent to it
    found = gave_way([_step(8, False, calm, lost=30)], 8, limits)
    assert (found["server"], found["by"]) == ("b", "loss_in")
    assert found["value"] == pytest.approx(30 / 220, abs=1e-3)
    # nobody past a limit: the nearest is named, and says so
    found = gave_way([_step(8, False, calm, cpu={"a": 60.0})], 8, limits)
    assert (found["server"], found["by"], found["past_limit"]) == ("a", "cpu_pct", False)
    assert describe_gave_way(found).startswith("no server past a limit; nearest: a")
    # a search that never failed says nothing of giving way
    assert gave_way(steps[:2], None, limits) is None
    with pytest.raises(ValueError):
        GiveWay(cpu_pct=0)
