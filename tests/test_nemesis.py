"""Fault plans (probe/nemesis.py): read and checked, every error naming the fault and field; the
nemesis makes each fault at its time and undoes it, on a target that records what it was asked
(the real targets are driven by tests/test_e2e_soak.py and tests/compose/test_tree.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from probe.nemesis import Fault, Nemesis, PlanError, parse_plan, seconds


def test_durations_with_and_without_units():
    assert seconds(90) == 90.0 and seconds("90s") == 90.0 and seconds("45m") == 2700.0
    assert seconds("8h") == 28800.0 and seconds("250ms") == 0.25 and seconds("1.5") == 1.5
    for bad in ("soon", "-3s", True, "3 days"):
        with pytest.raises(PlanError):
            seconds(bad)


def test_a_plan_is_read_in_time_order():
    plan = parse_plan({"faults": [
        {"at": "2m", "kind": "duty", "server": "b", "for": "2m", "stopped_ms": 250,
         "period_ms": 1000},
        {"at": 60, "kind": "kill", "server": "u", "restart_after": "20s"},
        {"at": "3m", "kind": "limit", "server": "a", "for": "1m", "kbit": 400}]},
        servers={"a", "u", "b"})
    assert [(f.at_s, f.kind) for f in plan] == [(60, "kill"), (120, "duty"), (180, "limit")]
    assert plan[0].restart_after_s == 20 and plan[1].for_s == 120
    assert plan[1].describe() == "stopped 250 ms of every 1000 ms for 120 s"


@pytest.mark.parametrize("fault, says", [
    ({"at": 1, "kind": "explode", "server": "a"}, "faults[0].kind"),
    ({"at": 1, "kind": "stop", "server": "zz", "for": 3}, "no server 'zz'"),
    ({"at": 1, "kind": "stop", "server": "a"}, "faults[0].for"),
    ({"kind": "stop", "server": "a", "for": 1}, "faults[0].at"),
    ({"at": 1, "kind": "kill", "server": "a", "for": 3}, "restart_after, not for"),
    ({"at": 1, "kind": "duty", "server": "a", "for": 3, "stopped_ms": 900,
      "period_ms": 500}, "stopped_ms < period_ms"),
    ({"at": 1, "kind": "loss", "server": "a", "for": 3, "share": 2}, "faults[0].share"),
    ({"at": 1, "kind": "limit", "server": "a", "for": 3}, "faults[0].kbit"),
    ({"at": 1, "kind": "stop", "server": "a", "for": 3, "colour": "red"}, "unknown field"),
])
def test_a_wrong_plan_says_which_fault_and_field(fault, says):
    with pytest.raises(PlanError) as caught:
        parse_plan({"faults": [fault]}, servers={"a", "b"})
    assert says in str(caught.value)
    with pytest.raises(PlanError):
        parse_plan([fault])


class Recording:
    """A target that records what it is asked, with the time."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, str]] = []
        self.t0 = time.monotonic()

    def check(self, fault: Fault) -> None:
        pass

    def _note(self, what: str, server: str) -> None:
        self.calls.append((round(time.monotonic() - self.t0, 2), what, server))

    async def kill(self, server: str) -> None:
        self._note("kill", server)

    async def start(self, server: str) -> None:
        self._note("start", server)

    async def pause(self, server: str) -> None:
        self._note("pause", server)

    async def resume(self, server: str) -> None:
        self._note("resume", server)

    async def cut(self, server: str) -> None:
        self._note("cut", server)

    async def heal(self, server: str) -> None:
        self._note("heal", server)

    async def limit(self, server: str, kbit: int) -> None:
        self._note(f"limit {kbit}", server)

    async def unlimit(self, server: str) -> None:
        self._note("unlimit", server)

    async def loss(self, server: str, share: float) -> None:
        self._note(f"loss {share}", server)


async def test_the_nemesis_makes_each_fault_at_its_time_and_undoes_it():
    plan = parse_plan({"faults": [
        {"at": 0.05, "kind": "kill", "server": "u", "restart_after": 0.1},
        {"at": 0.1, "kind": "duty", "server": "b", "for": 0.25, "stopped_ms": 40,
         "period_ms": 100},
        {"at": 0.2, "kind": "cut", "server": "a", "for": 0.1}]})
    target = Recording()
    records: list[tuple[str, bool]] = []
    async with Nemesis(plan, target, time.time(), lambda f, start, end: records.append(
            (f.kind, end is not None))) as nemesis:
        await nemesis.wait()
    done = [(what, server) for _, what, server in target.calls]
    assert done[0] == ("kill", "u") and ("start", "u") in done
    assert done.count(("pause", "b")) == 3 and done.count(("resume", "b")) == 3
    assert done.index(("cut", "a")) < done.index(("heal", "a"))
    assert sorted(records) == [("cut", False), ("cut", True), ("duty", False), ("duty", True),
                               ("kill", False), ("kill", True)]
    kill, start = (t for t, what, s in target.calls if s == "u")
    assert 0.08 <= start - kill <= 0.2  # started again after restart_after


async def test_leaving_early_undoes_what_is_on_and_makes_nothing_more():
    plan = parse_plan({"faults": [{"at": 0, "kind": "stop", "server": "b", "for": 30},
                                  {"at": 20, "kind": "kill", "server": "u"}]})
    target = Recording()
    ends = []
    async with Nemesis(plan, target, time.time(), lambda f, s, end: ends.append(end)):
        await asyncio.sleep(0.1)
    assert [what for _, what, _ in target.calls] == ["pause", "resume"]
    assert ends[0] is None and ends[1] is not None  # its end recorded when it was undone
