"""deploy/swarm/stack.yml on a single-node swarm (tests/swarm/run starts the engine and builds
the image; without VPHONE_SWARM_TESTS these tests skip): the tree comes up on the overlay
network with its devices, two probe tasks as shards of one load start every scheduled call
exactly once and carry media, `probe merge` makes them one report, and a server task killed is
rescheduled and rejoins the tree."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from wire.auth import Auth

if not os.environ.get("VPHONE_SWARM_TESTS"):
    pytest.skip("swarm tests run through tests/swarm/run (it builds the image)",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
STACK = "vphone-test"
SECRET = "swarm-test-secret"
DOCKER = os.environ.get("DOCKER", "docker")
#: per lower server: two for each of the two shards (a shard's calls overlap by one)
DEVICES_PER_SERVER = 4
DEVICES = [f"lower-{s}/{s}{k}" for s in "ab" for k in range(1, DEVICES_PER_SERVER + 1)]
RATE, DURATION = 1, 6  #: the probes' load (stack.yml's defaults): 6 calls


def docker(*args: str, timeout: float = 120, check: bool = True,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} exited {done.returncode}:\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> Any:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            found = predicate()
            if found:
                return found
        except (OSError, ValueError, RuntimeError) as exc:
            last = exc
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


@dataclass
class Swarm:
    port: int
    joined: bool  #: this test made the swarm (and leaves it)

    def get(self, path: str) -> Any:
        token = Auth(SECRET.encode()).token("probe")
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def devices(self) -> set[str]:
        return {d["address"] for d in self.get("/v1/devices")["devices"]}

    def servers(self) -> set[str]:
        return {s["name"] for s in self.get("/v1/servers")["servers"]}

    def results(self, *args: str, entrypoint: str | None = None) -> str:
        """Run the image with the stack's results volume at /results."""
        extra = ["--entrypoint", entrypoint] if entrypoint else []
        return docker("run", "--rm", "-v", f"{STACK}_results:/results", *extra,
                      os.environ["VPHONE_IMAGE"], *args).stdout

    def tasks(self, service: str) -> list[str]:
        out = docker("service", "ps", f"{STACK}_{service}", "--no-trunc",
                     "--format", "{{.DesiredState}} {{.CurrentState}}").stdout
        return [line for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    state = docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()
    joined = state != "active"
    if joined:
        docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    node = docker("info", "--format", "{{.Swarm.NodeID}}").stdout.strip()
    made_secret = False
    try:
        docker("node", "update", "--label-add", "vphone.site-a=true", "--label-add",
               "vphone.site-b=true", node)
        subprocess.run([DOCKER, "secret", "create", "vphone_auth", "-"], input=SECRET,
                       text=True, check=True, capture_output=True, timeout=60)
        made_secret = True
        port = free_port()
        docker("stack", "deploy", "-c", str(ROOT / "deploy/swarm/stack.yml"), STACK,
               env={"UPPER_PORT": str(port), "VPHONE_IMAGE": os.environ["VPHONE_IMAGE"],
                    "DEVICES_PER_SERVER": str(DEVICES_PER_SERVER),
                    "CI": os.environ.get("CI", "")}, timeout=300)
        lab = Swarm(port, joined)
        wait_for(lambda: lab.devices() >= set(DEVICES), 180,
                 f"the tree and its {len(DEVICES)} devices")
        yield lab
    finally:
        docker("stack", "rm", STACK, check=False)
        # the stack's tasks must be gone before its network and volume can be
        for _ in range(60):
            if not docker("ps", "-q", "-f", f"label=com.docker.stack.namespace={STACK}",
                          check=False).stdout.strip():
                break
            time.sleep(1)
        docker("volume", "rm", f"{STACK}_results", check=False)
        if made_secret:
            docker("secret", "rm", "vphone_auth", check=False)
        if joined:
            docker("swarm", "leave", "--force", check=False)
        else:
            with contextlib.suppress(RuntimeError):
                docker("node", "update", "--label-rm", "vphone.site-a", "--label-rm",
                       "vphone.site-b", node)


def test_a_two_probe_shards_make_one_load_and_merge(swarm: Swarm):
    started = time.monotonic()
    start_at = time.time() + 15  # both tasks scheduled and discovering by then
    docker("service", "update", "--detach", "--env-add", f"PROBE_START_AT={start_at:.3f}",
           "--replicas", "2", f"{STACK}_probe")
    wait_for(lambda: len(swarm.tasks("probe")) == 2
             and all(" Complete" in t or " Failed" in t for t in swarm.tasks("probe")),
             start_at - time.time() + DURATION + 90, "both probe tasks to finish")
    assert all(" Complete" in t for t in swarm.tasks("probe")), swarm.tasks("probe")
    took = time.monotonic() - started
    merged = json.loads(swarm.results("probe", "merge", "/results/shard-1", "/results/shard-2",
                                      "--out", "/results/merged", "--json"))
    summary = json.loads(swarm.results("/results/merged/summary.json", entrypoint="cat"))
    calls = [json.loads(line) for line in
             swarm.results("/results/merged/calls.jsonl", entrypoint="cat").splitlines()]
    run = summary["runs"][0]
    assert run["shard"] == {"count": 2, "indexes": [0, 1], "scheduled_total": RATE * DURATION}
    assert run["scheduled"] == run["started"] == RATE * DURATION and run["probes"] == 2, run
    # every place in the one schedule started exactly once, each call carried media both ways
    assert sorted(c["slot"] for c in calls) == list(range(RATE * DURATION)), calls
    for call in calls:
        assert call["ok"], call
        for direction in ("caller_to_callee", "callee_to_caller"):
            assert call["media"][direction]["frames"] > 10, call["media"]
    assert merged["objective_met"], merged["objective_missed"]
    total = summary["figures"]["total"]
    print("\n(swarm-a)", {"probe tasks done after_s": round(took, 1),
                          "calls": total["calls"], "ok": total["ok"],
                          "setup_p50_ms": total["phases"]["setup_ms"]["p50"],
                          "media_latency_p50_ms": total["phases"]["media_latency_ms"]["p50"],
                          "mos": total["quality"]["mos"], "psnr_db": total["quality"]["psnr_db"],
                          "schedule_error_ms": run["schedule_error_ms"]})


def test_b_a_killed_server_task_is_rescheduled_and_rejoins(swarm: Swarm):
    label = f"label=com.docker.swarm.service.name={STACK}_lower-b"
    old = docker("ps", "-q", "-f", label).stdout.split()
    assert len(old) == 1, old
    killed = time.monotonic()
    docker("kill", old[0])
    wait_for(lambda: "lower-b/b1" not in swarm.devices(), 30, "lower-b's devices to go")
    new = wait_for(lambda: [c for c in docker("ps", "-q", "-f", label).stdout.split()
                            if c != old[0]], 60, "a new lower-b task")
    wait_for(lambda: {d for d in DEVICES if d.startswith("lower-b/")} <= swarm.devices(), 120,
             "lower-b and its devices back in the tree")
    assert "lower-b" in swarm.servers()
    print("\n(swarm-b)", {"task": new[0][:12],
                          "rejoined_after_s": round(time.monotonic() - killed, 1)})


def test_c_a_fleet_of_two_tasks_searches_capacity_as_one(swarm: Swarm):
    """probe-capacity scaled to 2: task 1 leads (shard 0), task 2 finds it by the service's
    name and follows; each step is one load of both, judged on every call."""
    started = time.monotonic()
    docker("service", "update", "--detach", "--replicas", "2", f"{STACK}_probe-capacity")
    wait_for(lambda: len(swarm.tasks("probe-capacity")) == 2
             and all(" Complete" in t or " Failed" in t for t in swarm.tasks("probe-capacity")),
             240, "both capacity tasks to finish")
    took = time.monotonic() - started
    lead, follow = (json.loads(swarm.results(f"/results/capacity-{slot}/summary.json",
                                             entrypoint="cat")) for slot in (1, 2))
    assert all(" Complete" in t for t in swarm.tasks("probe-capacity")), (
        swarm.tasks("probe-capacity"), lead.get("objective_missed"))
    assert (lead["fleet"]["role"], follow["fleet"]["role"]) == ("leader", "follower")
    # stack.yml's search: each lower server at 0.5 then 1 call/s, 4 s a step
    assert [(r["callers_on"], r["rate"]) for r in lead["runs"]] == [
        ("lower-a", 0.5), ("lower-a", 1.0), ("lower-b", 0.5), ("lower-b", 1.0)]
    for run in lead["runs"]:
        total = round(run["rate"] * run["duration_s"])
        assert run["shard"] == {"count": 2, "indexes": [0, 1], "scheduled_total": total}, run
        assert run["scheduled"] == run["started"] == total
        assert run["figures"]["total"]["ok"] == total, run["figures"]["total"]["failures"]
    assert all(r["figures"]["total"]["media"]["frames"] > 0 for r in follow["runs"])
    assert follow["capacity"] == lead["capacity"]
    assert {c["rate"] for c in lead["capacity"].values()} == {1.0}
    print("\n(swarm-c)", {"capacity tasks done after_s": round(took, 1),
                          "steps": len(lead["runs"]),
                          "calls": lead["figures"]["total"]["calls"],
                          "follower_calls": follow["figures"]["total"]["calls"],
                          "setup_p50_ms": lead["figures"]["total"]["phases"]["setup_ms"]["p50"],
                          "capacity": {n: c["rate"] for n, c in lead["capacity"].items()}})
