"""`probe soak`'s command line before any server is asked: the rate from a capacity result, and
mistakes said in one line (exit 2) without starting anything."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from probe.__main__ import build_parser, soak_rate
from wire.client import ProbeError


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["soak", *argv])


def test_durations_take_units_and_the_soak_has_its_own_defaults():
    found = args("--rate", "2", "--duration", "8h", "--warmup", "5m")
    assert found.duration == 8 * 3600 and found.warmup == 300
    assert found.window == 30 and found.scrape_interval == 2
    assert args("--rate", "1").duration == 3600
    assert build_parser().parse_args(["load", "--rate", "1", "--duration", "90s"]).duration \
        == 90


def test_the_rate_from_a_capacity_result(tmp_path: Path):
    capacity = tmp_path / "summary.json"
    capacity.write_text(json.dumps({"capacity": {"lower-a": {"rate": 8.0},
                                                 "lower-b": {"rate": 6.0},
                                                 "lower-c": {"rate": None}}}))
    assert soak_rate(args("--capacity", str(capacity), "--at", "0.5")) == 3.0
    assert soak_rate(args("--rate", "2")) == 2.0
    for wrong, says in ((("--capacity", str(capacity)), "takes --at"),
                        (("--at", "0.5", "--rate", "1"), "--at goes with --capacity"),
                        ((), "give --rate"),
                        (("--capacity", str(tmp_path / "none.json"), "--at", "1"),
                         "none.json")):
        with pytest.raises(ProbeError) as caught:
            soak_rate(args(*wrong))
        assert says in caught.value.message
    capacity.write_text(json.dumps({"capacity": {}}))
    with pytest.raises(ProbeError, match="no server has a sustainable rate"):
        soak_rate(args("--capacity", str(capacity), "--at", "0.5"))


def test_a_wrong_plan_is_one_line_and_nothing_starts(tmp_path: Path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"faults": [{"at": "1m", "kind": "stop", "server": "upper"}]}))
    # judged before any server is asked (there is none at that address)
    done = subprocess.run([sys.executable, "-m", "probe", "soak", "--rate", "1",
                           "--server", "http://127.0.0.1:9", "--faults", str(plan)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "faults[0].for: how long the stop lasts is missing" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "probe", "soak", "--rate", "1",
                           "--duration", "soon"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "'soon' is not a duration" in done.stderr
