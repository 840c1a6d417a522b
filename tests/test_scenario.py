"""Call scenarios as data (wire/scenario.py): parsing, refusals that say what is wrong, and
the draws a load gives its calls."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from probe.load import LoadSettings
from wire.scenario import Dist, Plan, Scenario

DECLINING = {"name": "ring-and-decline",
             "steps": [{"dial": {"from": "api"}}, {"ring": {"uniform": [1, 3]}},
                       {"answer": {"probability": 0.8}}, {"hold": 2},
                       {"hangup": {"by": "callee"}}]}


def test_a_scenario_file_reads_into_its_steps(tmp_path: Path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(DECLINING))
    scenario = Scenario.load(path)
    assert scenario.ring == Dist("uniform", 1.0, 3.0)
    assert scenario.answer_probability == 0.8 and scenario.hangup_by == "callee"
    assert scenario.hold == Dist("fixed", 2.0) and scenario.scripted
    assert Scenario.from_dict(scenario.to_dict()) == scenario
    toml = tmp_path / "s.toml"
    toml.write_text('name = "t"\nsteps = [{dial = {}}, {hold = {exponential = 4}}, '
                    '{hangup = {by = "caller"}}]\n')
    assert Scenario.load(toml).hold == Dist("exponential", 4.0)


def test_the_draws_follow_the_distributions():
    scenario = Scenario.from_dict(DECLINING)
    rng = random.Random(7)
    plans = [scenario.plan(rng) for _ in range(2000)]
    declined = sum(p.declines for p in plans) / len(plans)
    assert 0.17 < declined < 0.23
    rings = [p.ring_s for p in plans]
    assert min(rings) >= 1.0 and max(rings) <= 3.0 and 1.9 < sum(rings) / len(rings) < 2.1
    assert {p.hold_s for p in plans} == {2.0} and {p.hangup_by for p in plans} == {"callee"}
    assert plans[0].script.ring_s == plans[0].ring_s
    assert Plan(declines=True).expected_end == "declined"


def test_a_seeded_load_gives_each_slot_the_same_draws_in_every_shard():
    settings = LoadSettings(rate=1, duration_s=1, seed=5, scenario=Scenario.from_dict(DECLINING))
    a = [settings.plan(slot, random.Random()) for slot in range(20)]
    b = [settings.plan(slot, random.Random()) for slot in range(20)]
    assert a == b
    default = LoadSettings(rate=1, duration_s=1, hold_s=4.0)
    assert default.plan(0, random.Random()) == Plan(hold_s=4.0)
    assert not default.the_scenario.scripted


@pytest.mark.parametrize(("steps", "says"), [
    ([{"hold": 1}, {"hangup": {}}], "needs a dial step"),
    ([{"dial": {}}, {"hangup": {}}, {"hold": 1}], "order"),
    ([{"dial": {}}, {"hold": 1}, {"hold": 2}, {"hangup": {}}], "appears twice"),
    ([{"dial": {}}, {"sing": 1}, {"hold": 1}, {"hangup": {}}], "unknown step 'sing'"),
    ([{"dial": {}}, {"hold": {"uniform": [3, 1]}}, {"hangup": {}}], "LO at most its HI"),
    ([{"dial": {}}, {"hold": "long"}, {"hangup": {}}], "a time is seconds"),
    ([{"dial": {}}, {"answer": {"probability": 2}}, {"hold": 1}, {"hangup": {}}],
     "between 0 and 1"),
    ([{"dial": {}}, {"hold": 1}, {"hangup": {"by": "nobody"}}], "probe, caller or callee"),
    ([{"dial": {"from": "phone"}}, {"hold": 1}, {"hangup": {}}], "\"api\" or \"device\""),
    ([{"dial": {"form": "api"}}, {"hold": 1}, {"hangup": {}}], "unknown option"),
])
def test_a_bad_scenario_is_refused_saying_what_is_wrong(steps, says):
    with pytest.raises(ValueError, match=says):
        Scenario.from_dict({"name": "bad", "steps": steps})


def test_a_missing_or_broken_file_says_so(tmp_path: Path):
    with pytest.raises(ValueError, match="No such file"):
        Scenario.load(tmp_path / "nothing.json")
    broken = tmp_path / "b.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="not valid json"):
        Scenario.load(broken)


def test_the_shipped_scenarios_read():
    shipped = sorted((Path(__file__).resolve().parent.parent / "deploy" / "scenarios").iterdir())
    assert len(shipped) >= 2
    for path in shipped:
        scenario = Scenario.load(path)
        assert scenario.scripted, path
