"""A probe load with a scenario (wire/scenario.py) over real servers and devices: callees
ring 1-3 s, one in five declines, the callee hangs up after the hold. The run reports what was
configured: ``declined`` for the declines it drew, ``answered_ms`` spread over the ring times,
and every call ended as its plan said (none counted as a failure)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from probe.load import LoadReport, LoadSettings, run_load
from wire.client import ProbeError, ServerClient, discover
from wire.scenario import Scenario

from .conftest import DEVICE_SETTINGS, Tree, make_tree
from .test_e2e_probe import packet_tree

pytestmark = pytest.mark.e2e

RING = replace(DEVICE_SETTINGS, answer="ring")

SCENARIO = {"name": "ring-decline-callee-hangs-up",
            "steps": [{"dial": {"from": "api"}}, {"ring": {"uniform": [1, 3]}},
                      {"answer": {"probability": 0.8}}, {"hold": 1.0},
                      {"hangup": {"by": "callee"}}]}


async def load(tree: Tree, per_server: int, scenario: dict, **settings: Any) -> LoadReport:
    """Packet devices under both lower servers, and a seeded load running ``scenario``."""
    await packet_tree(tree, per_server)
    servers = await discover(tree.session, tree.urls)
    return await run_load(tree.session, servers, LoadSettings(
        max_lag_ms=500, scenario=Scenario.from_dict(scenario), **settings))


async def test_a_load_rings_declines_and_hangs_up_as_its_scenario_says():
    async with make_tree() as tree:
        report = await load(tree, 8, SCENARIO, rate=3, duration_s=4.0, seed=11)
    results = [r for r in report.results if r.plan is not None]
    assert len(results) == report.started >= 8
    planned_declines = sum(r.plan["declines"] for r in results)
    assert planned_declines >= 1, [r.plan for r in results]  # seed 11 draws some
    total = report.recorder.total
    assert total.declined == planned_declines
    assert total.ok == total.calls == len(results), total.details
    summary = report.summary()
    assert summary["figures"]["total"]["declined"] == planned_declines
    assert summary["scenario"]["steps"][1] == {"ring": {"uniform": [1.0, 3.0]}}
    for r in results:
        rang = r.timeline.get("t_answered", r.timeline["t_end"]) - r.timeline["t_callee_woken"]
        assert r.plan["ring_s"] - 0.05 <= rang <= r.plan["ring_s"] + 0.5, (r.plan, r.timeline)
        if r.plan["declines"]:
            assert r.reason == "declined" and "t_answered" not in r.timeline
        else:
            assert r.reason == "hangup" and r.active
            assert 1000 <= r.intervals["answered_ms"] <= 3600
            held = r.timeline["t_end"] - max(r.timeline["t_first_frame_callee"],
                                             r.timeline["t_first_frame_caller"])
            assert 0.9 <= held <= 2.0, r.timeline  # the callee hung up after its hold
            # the callee's server offered its leg to a ringing device: the ring is the far
            # end's time (answer_ms), not the leg's setup
            leg = next(leg for leg in r.hops[-1]["legs"] if leg["toward"] == "callee")
            assert leg["answer_ms"] >= r.plan["ring_s"] * 1000 - 100, leg
            assert leg["dtls_ms"] < 1000, leg
    answered = summary["figures"]["total"]["phases"]["answered_ms"]
    assert 1000 <= answered["p50"] <= 3600, answered


async def test_a_load_whose_calls_are_dialled_by_the_devices():
    """``{"dial": {"from": "device"}}``: the probe asks the caller's server (``dial_from:
    device``), which asks the caller to dial (``place_call``); the command answers with the call
    the device dialled. A device that rings for a person will not: ``no_dial`` at once."""
    scenario = {"name": "devices-dial", "steps": [{"dial": {"from": "device"}}, {"hold": 1.0},
                                                  {"hangup": {"by": "caller"}}]}
    async with make_tree() as tree:
        report = await load(tree, 4, scenario, rate=2, duration_s=2.0, seed=3)
        results = report.results
        assert len(results) == report.started >= 3
        for r in results:
            assert r.ok and r.reason == "hangup", r.to_dict()
            assert r.plan["dial_from"] == "device"
        infos = [await ServerClient(tree.session, tree.lowers[r.server].url).call(r.call)
                 for r in results]
        assert {info.started_by for info in infos} == {"device"}
        person = await tree.add_device("lower-a", "desk", RING)
        client = ServerClient(tree.session, tree.lowers["lower-a"].url)
        with pytest.raises(ProbeError) as refused:
            await client.create_call("lower-a/desk", "lower-b/b0", dial_from="device")
        assert refused.value.code == "no_dial" and "dials only when a person does" in str(
            refused.value)
        assert not person.phones
