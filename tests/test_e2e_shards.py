"""A fleet of probes: two `probe load` processes, as shards 0/2 and 1/2 of one load against one
running stack, start every call of one probe's schedule exactly once between them, each on
devices of its own, with media; `probe merge` makes their outputs one report, call for call."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from pathlib import Path

import pytest

from lab.stack import LocalStack, StackSettings

pytestmark = pytest.mark.e2e

LOAD = ("--rate", "2", "--duration", "3", "--hold", "1.5", "--seed", "7", "--max-lag-ms", "1000")


async def probe(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "probe", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, out.decode(), err.decode()


async def test_two_probe_processes_share_one_load_and_merge_into_it(tmp_path: Path):
    settings = StackSettings(devices=6, video="packets", size="320x240", fps=15)
    async with LocalStack(settings) as stack:
        servers = [arg for url in stack.urls for arg in ("--server", url)]
        start_at = f"{time.time() + 3:.3f}"  # both shards: one schedule from one moment
        done = await asyncio.gather(*(
            probe("load", *servers, *LOAD, "--shard", f"{i}/2", "--start-at", start_at,
                  "--out", str(tmp_path / f"shard-{i}"), "--json") for i in range(2)))
        for code, out, err in done:
            assert code == 0, (code, out, err[-2000:])
    code, out, err = await probe("merge", str(tmp_path / "shard-0"), str(tmp_path / "shard-1"),
                                 "--out", str(tmp_path / "merged"), "--json")
    assert code == 0, (out, err[-2000:])
    merged = json.loads((tmp_path / "merged" / "summary.json").read_text())
    run = merged["runs"][0]
    # one probe's schedule at 2 calls/s for 3 s: 6 calls, started between the two shards
    assert run["shard"] == {"count": 2, "indexes": [0, 1], "scheduled_total": 6}
    assert run["scheduled"] == run["started"] == 6 and run["probes"] == 2
    assert merged["figures"]["total"]["calls"] == merged["figures"]["total"]["ok"] == 6
    assert merged["objective_met"], merged["objective_missed"]
    calls = [json.loads(line) for line in
             (tmp_path / "merged" / "calls.jsonl").read_text().splitlines()]
    assert [c["slot"] for c in calls] == list(range(6))  # each place once, in order
    assert all(c["ok"] and c["media"]["caller_to_callee"]["frames"] > 0 for c in calls)
    # the shards' calls went on every other place in the schedule, on devices of their own
    shards = [[json.loads(line) for line in (tmp_path / f"shard-{i}" / "calls.jsonl")
               .read_text().splitlines()] for i in range(2)]
    assert [sorted(c["slot"] for c in shard) for shard in shards] == [[0, 2, 4], [1, 3, 5]]
    devices = [{d for c in shard for d in (c["caller"], c["callee"])} for shard in shards]
    assert not devices[0] & devices[1], devices
    # started on one clock: the places are half a second apart across both shards
    sent = sorted(c["timeline"]["t_sent"] for c in calls)
    assert [round(b - a, 3) for a, b in itertools.pairwise(sent)] == [0.5] * 5
