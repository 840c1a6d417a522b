"""A capacity search shared by a fleet of probes (probe/fleet.py): two `probe capacity`
processes, shard 0 leading and shard 1 following, against one running stack. Every step is one
load split between them and judged on the merged calls; the follower ends with the leader's
verdict. A follower killed mid-search leaves a hole the leader reports (the run is invalid, the
servers are not blamed); a leader killed leaves the follower to give up with a clear error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from lab.stack import LocalStack, StackSettings

pytestmark = pytest.mark.e2e

SEARCH = ("--start-rate", "1", "--max-rate", "2", "--factor", "2", "--bisect", "0",
          "--duration", "3", "--hold", "1.5", "--seed", "5", "--max-lag-ms", "1000")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Probe:
    """A `probe capacity` process; its stderr (info logs) read as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.err: list[str] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str) -> Probe:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "probe", "capacity", *args, "--log-level", "info",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "CI": "true"})
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.err.append(line.decode())

    async def seen(self, text: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.err):
            assert time.monotonic() < deadline, f"never logged {text!r}: {self.stderr[-3000:]}"
            assert self.process.returncode is None, f"ended first: {self.stderr[-3000:]}"
            await asyncio.sleep(0.1)

    async def done(self, timeout_s: float = 120.0) -> tuple[int, str]:
        assert self.process.stdout is not None
        out = await asyncio.wait_for(self.process.stdout.read(), timeout_s)
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        await self._reader
        return code, out.decode()

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def fleet(servers: list[str], tmp: Path, *extra: str):
    port = free_port()
    leader = await Probe.start(*servers, *SEARCH, *extra, "--shard", "0/2", "--fleet-listen",
                               f"127.0.0.1:{port}", "--out", str(tmp / "lead"))
    follower = await Probe.start(*servers, *SEARCH, *extra, "--shard", "1/2", "--leader",
                                 f"http://127.0.0.1:{port}", "--out", str(tmp / "follow"))
    try:
        yield leader, follower
    finally:
        await leader.close()
        await follower.close()


def stack() -> LocalStack:
    return LocalStack(StackSettings(devices=6, video="packets", size="320x240", fps=15))


async def test_two_probes_search_as_one_and_agree_on_the_verdict(tmp_path: Path):
    async with stack() as running:
        servers = [arg for url in running.urls[:1] for arg in ("--server", url)]
        async with fleet(servers, tmp_path) as (leader, follower):
            (lead_code, lead_out), (follow_code, follow_out) = await asyncio.gather(
                leader.done(), follower.done())
            assert lead_code == 0, (lead_out, leader.stderr[-3000:])
            assert follow_code == 0, (follow_out, follower.stderr[-3000:])
    lead = json.loads((tmp_path / "lead" / "summary.json").read_text())
    follow = json.loads((tmp_path / "follow" / "summary.json").read_text())
    # each lower server searched at 1 then 2 calls/s: four steps, each one load of both shards
    steps = [(run["callers_on"], run["rate"]) for run in lead["runs"]]
    assert steps == [("lower-a", 1.0), ("lower-a", 2.0), ("lower-b", 1.0), ("lower-b", 2.0)]
    for run in lead["runs"]:
        total = round(run["rate"] * run["duration_s"])
        assert run["shard"] == {"count": 2, "indexes": [0, 1], "scheduled_total": total}, run
        assert run["scheduled"] == run["started"] == total  # every call, once, between two
        assert run["figures"]["total"]["calls"] == run["figures"]["total"]["ok"] == total
        assert run["valid"]
    # the follower ran its half of each step, from the moment the leader gave
    assert [run["fleet_step"] for run in follow["runs"]] == [0, 1, 2, 3]
    assert [run["schedule_started_at"] for run in follow["runs"]] == [
        run["schedule_started_at"] for run in lead["runs"]]
    assert [run["shard"]["index"] for run in follow["runs"]] == [1] * 4
    for part, whole in zip(follow["runs"], lead["runs"], strict=True):
        assert 0 < part["started"] < whole["started"]
        media = part["figures"]["total"]["media"]
        assert media["frames"] > 0, media  # its calls carried video
    # one verdict: the leader's, judged on every call
    assert lead["capacity"]["lower-a"]["rate"] == lead["capacity"]["lower-b"]["rate"] == 2.0
    assert follow["capacity"] == lead["capacity"]
    assert follow["capacity_steps"] == lead["capacity_steps"]
    assert lead["fleet"]["role"] == "leader" and follow["fleet"]["role"] == "follower"
    assert "sustainable 2.0 calls/s" in follow_out


async def test_a_lost_follower_makes_the_step_invalid_and_a_lost_leader_ends_the_follower(
        tmp_path: Path):
    async with stack() as running:
        servers = ["--server", running.urls[0]]
        # the follower dies while it runs step 1: the leader waits out its grace and stops
        async with fleet(servers, tmp_path / "a", "--fleet-grace", "4") as (leader, follower):
            await leader.seen("event=fleet_order step=1")
            follower.process.send_signal(signal.SIGKILL)
            began = time.monotonic()
            code, out = await leader.done()
            assert code == 3, (out, leader.stderr[-3000:])  # invalid: the probes' fault
            assert time.monotonic() - began < 40
        lead = json.loads((tmp_path / "a" / "lead" / "summary.json").read_text())
        assert [run["rate"] for run in lead["runs"]] == [1.0, 2.0]  # it went no further
        assert lead["runs"][0]["shard"] == {"count": 2, "indexes": [0, 1],
                                            "scheduled_total": 3}
        hole = lead["runs"][1]["shard"]
        assert hole["indexes"] == [0] and hole["problem"] == "shards [1] of 2 missing", hole
        assert not lead["valid"] and lead["capacity"]["lower-a"]["invalid"]
        assert "shards [1] of 2 missing" in " ".join(lead["capacity"]["lower-a"]
                                                     ["failed_because"])
        assert "event=fleet_shard_missing" in leader.stderr
        # the leader dies during step 1: the follower finishes its part, cannot hand it in,
        # and gives up after --leader-wait, saying why
        async with fleet(servers, tmp_path / "b", "--leader-wait", "3") as (leader, follower):
            await leader.seen("event=fleet_order step=1")
            leader.process.send_signal(signal.SIGKILL)
            code, out = await follower.done()
            assert code == 2, (out, follower.stderr[-3000:])
            assert "leader_unreachable" in follower.stderr
            assert "could not be reached for 3 s, asking for the result of step 1" in \
                follower.stderr, follower.stderr[-3000:]
