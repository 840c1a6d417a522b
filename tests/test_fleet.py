"""A capacity fleet's leader and follower (probe/fleet.py), over real sockets: orders and
results go through, everything malformed, stale, duplicated or unauthorised is refused with a
reason that names what was wrong, a missing shard makes the merged step invalid, and a
follower whose leader cannot be reached gives up saying so."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest

from probe.fleet import Follower, Leader, merge_reports, settings_of, step_of
from probe.histograms import record_ms
from probe.load import LoadReport, LoadSettings, Shard
from probe.stats import Outcome, Recorder
from wire.client import ProbeError
from wire.messages import FleetStep

TOKEN = "fleet-token"


def report(shard: Shard, calls: int, lag_ms: float = 2.0) -> LoadReport:
    """A load run's report with ``calls`` successful calls on lower-a."""
    settings = LoadSettings(rate=2.0, duration_s=2.0, hold_s=1.0, shard=shard,
                            callers_on="lower-a", seed=1)
    out = LoadReport(settings, Recorder(5.0), scheduled=calls, started=calls, late=0,
                     max_concurrent_seen=calls, scheduled_total=4, started_at=1000.0)
    for n in range(calls):
        out.recorder.add("lower-a", n * 0.5, Outcome(ok=True), {"setup_ms": 100.0 + n}, {})
        record_ms(out.schedule_error, 0.5)
    out.watch = {"loop_lag_ms_p99": lag_ms}
    return out


def order_step() -> FleetStep:
    return FleetStep(server="lower-a", rate=2.0, duration_s=2.0, hold_s=1.0,
                     start_at=time.time() + 2, seed=1)


@pytest.fixture
async def leader():
    async with Leader(Shard(0, 2), "127.0.0.1", 0, TOKEN, wait_s=2.0,
                      final_wait_s=0.5) as running:
        yield running


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        yield session


def url(leader: Leader, path: str) -> str:
    return f"http://127.0.0.1:{leader.port}{path}"


async def error_of(response: aiohttp.ClientResponse) -> dict:
    return (await response.json())["error"]


async def test_a_follower_waits_for_the_order_then_gets_it(leader: Leader, http):
    async with http.get(url(leader, "/fleet/v1/orders/0"), params={"shard": "1",
                                                                  "wait": "0.2"}) as r:
        assert r.status == 204  # nothing ordered yet: the long poll ran out
    poll = asyncio.create_task(http.get(url(leader, "/fleet/v1/orders/0"),
                                        params={"shard": "1", "wait": "5"}))
    await asyncio.sleep(0.2)
    step = order_step()
    assert leader.publish(step) == 0
    async with await poll as r:
        assert r.status == 200
        order = await r.json()
    assert order["step"] == 0 and order["count"] == 2 and order["run"]["rate"] == 2.0
    async with http.get(url(leader, "/fleet/v1/orders/2"), params={"shard": "1"}) as r:
        assert r.status == 404
        assert "the leader has ordered steps 0..0" in (await error_of(r))["message"]


async def test_the_leader_waits_for_every_shard_before_the_first_step(leader: Leader, http):
    with pytest.raises(ProbeError, match=r"shards \[1\] of 2 did not come"):
        await leader.joined()
    async with http.get(url(leader, "/fleet/v1/orders/0"), params={"shard": "1"}) as r:
        assert r.status == 204
    await asyncio.wait_for(leader.joined(), 1.0)


@pytest.mark.parametrize(("headers", "status", "code"), [
    ({}, 401, "unauthorized"), ({"Authorization": "Bearer wrong"}, 403, "forbidden")])
async def test_orders_and_results_need_the_fleets_token(leader: Leader, headers, status, code):
    async with aiohttp.ClientSession() as session:
        async with session.get(url(leader, "/fleet/v1/orders/0"), params={"shard": "1"},
                               headers=headers) as r:
            assert r.status == status and (await error_of(r))["code"] == code
        async with session.post(url(leader, "/fleet/v1/results/0"), json={},
                                headers=headers) as r:
            assert r.status == status and (await error_of(r))["code"] == code
    assert leader.seen == []  # the refused polls did not count as a shard come


@pytest.mark.parametrize(("query", "field"), [({"shard": "0"}, "shard"), ({"shard": "2"}, "shard"),
                                              ({"shard": "x"}, "shard"),
                                              ({"shard": "1", "wait": "soon"}, "wait")])
async def test_a_bad_query_is_refused_naming_it(leader: Leader, http, query, field):
    async with http.get(url(leader, "/fleet/v1/orders/0"), params=query) as r:
        assert r.status == 400
        error = await error_of(r)
    assert error["code"] == "bad_query" and error["field"] == field


def body(step: int = 0, shard: int = 1, count: int = 2, run: dict | None = None) -> dict:
    return {"step": step, "shard": shard, "count": count,
            "run": run if run is not None else report(Shard(1, 2), 2).summary()}


@pytest.mark.parametrize(("sent", "code", "field", "words"), [
    (b"{not json", "bad_json", None, "not JSON"),
    ({"step": 0, "shard": 1, "count": 2}, "bad_message", "run", "missing field 'run'"),
    (body(step=1), "bad_message", "step", "posted to step 0"),
    (body(count=3), "bad_message", "count", "this fleet has 2 shards"),
    (body(shard=5), "bad_message", "shard", "one of 1..1"),
    (body(run={"figures": {}}), "bad_message", "run", "not a load run's summary"),
    (body(run=report(Shard(0, 2), 1).summary()), "bad_message", "run.shard.index",
     "shard 0's, sent as shard 1's"),
])
async def test_a_malformed_result_is_refused_and_changes_nothing(leader: Leader, http, sent,
                                                                code, field, words):
    leader.publish(order_step())
    kwargs = {"data": sent} if isinstance(sent, bytes) else {"json": sent}
    async with http.post(url(leader, "/fleet/v1/results/0"), **kwargs) as r:
        assert r.status == 400
        error = await error_of(r)
    assert error["code"] == code and error["field"] == field and words in error["message"]
    assert await leader.results(0, 0.1) == []  # nothing was taken


async def test_a_result_is_taken_once_and_only_while_its_step_is_collected(leader: Leader,
                                                                          http):
    async with http.post(url(leader, "/fleet/v1/results/0"), json=body()) as r:
        assert r.status == 409  # nothing ordered: nothing collected
        assert (await error_of(r))["code"] == "stale_step"
    leader.publish(order_step())
    async with http.post(url(leader, "/fleet/v1/results/0"), json=body()) as r:
        assert r.status == 204
    async with http.post(url(leader, "/fleet/v1/results/0"), json=body()) as r:
        assert r.status == 409
        assert "shard 1 already sent step 0" in (await error_of(r))["message"]
    parts = await leader.results(0, 1.0)
    assert [part["started"] for part in parts] == [2]
    async with http.post(url(leader, "/fleet/v1/results/0"), json=body()) as r:
        assert r.status == 409  # closed
        assert "step 0 is not being collected" in (await error_of(r))["message"]


async def test_merged_steps_add_up_and_a_missing_shard_is_a_hole():
    own, other = report(Shard(0, 2), 2, lag_ms=3.0), report(Shard(1, 2), 2, lag_ms=9.0)
    whole = merge_reports(own, [other.summary()])
    assert (whole.scheduled, whole.started, whole.max_concurrent_seen) == (4, 4, 4)
    assert whole.recorder.servers["lower-a"].calls == 4
    assert whole.schedule_error.get_total_count() == 4
    assert whole.watch["loop_lag_ms_p99"] == 9.0  # the worse probe's
    assert whole.shards == {"count": 2, "indexes": [0, 1], "scheduled_total": 4}
    assert whole.valid and whole.fleet_problem is None
    holed = merge_reports(own, [])
    assert holed.fleet_problem == "shards [1] of 2 missing" and not holed.valid
    assert holed.summary()["shard"]["indexes"] == [0]


def test_a_follower_runs_the_leaders_schedule_on_its_own_devices():
    mine = LoadSettings(rate=9.0, duration_s=99.0, shard=Shard(1, 2), pairing="random")
    step = FleetStep(server="lower-b", rate=3.0, duration_s=4.0, hold_s=2.0, start_at=1234.5,
                     via=True, poisson=True, seed=8, media="none")
    run = settings_of(mine, step)
    assert (run.rate, run.duration_s, run.hold_s, run.start_at, run.via, run.poisson,
            run.seed, run.media) == (3.0, 4.0, 2.0, 1234.5, "lower-b", True, 8, "none")
    assert run.shard == Shard(1, 2) and run.pairing == "random"
    assert step_of(run, 1234.5) == step


async def test_follower_and_leader_over_a_socket(leader: Leader):
    async with Follower(f"http://127.0.0.1:{leader.port}", Shard(1, 2), TOKEN, 2.0) as follower:
        asked = asyncio.create_task(follower.order(0))
        await asyncio.sleep(0.2)
        leader.publish(order_step())
        assert (await asyncio.wait_for(asked, 5)).run.server == "lower-a"
        await follower.send(0, report(Shard(1, 2), 2))
        assert [p["shard"]["index"] for p in await leader.results(0, 1.0)] == [1]
        leader.finish({"valid": True, "capacity": {"lower-a": {"rate": 2.0}}})
        last = await follower.order(1)
    assert last.run is None and last.verdict["capacity"]["lower-a"]["rate"] == 2.0
    async with Follower(f"http://127.0.0.1:{leader.port}", Shard(1, 2), "bad", 2.0) as wrong:
        with pytest.raises(ProbeError, match="refused: the token is not this fleet's") as err:
            await wrong.order(0)
    assert err.value.code == "forbidden"


async def test_a_follower_whose_leader_is_gone_gives_up_saying_so():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    began = time.monotonic()
    async with Follower(f"http://127.0.0.1:{port}", Shard(1, 2), None, 0.6) as follower:
        with pytest.raises(ProbeError, match=r"could not be reached for 0\.6 s") as err:
            await follower.order(0)
    assert err.value.code == "leader_unreachable"
    assert 0.5 < time.monotonic() - began < 5


async def test_a_leader_that_stops_tells_its_followers_why():
    running = await Leader(Shard(0, 2), "127.0.0.1", 0, None, wait_s=2.0).__aenter__()
    async with Follower(f"http://127.0.0.1:{running.port}", Shard(1, 2), None,
                        2.0) as follower:
        asked = asyncio.create_task(follower.order(0))
        await asyncio.sleep(0.2)
        # what `async with` does when the search raises
        await running.__aexit__(ProbeError, ProbeError("x", "the tree is gone"), None)
        last = await asyncio.wait_for(asked, 5)
    assert last.run is None and not last.verdict["valid"]
    assert "the tree is gone" in last.verdict["error"]
