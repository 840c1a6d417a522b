"""The three-level lab (docker-compose.tree.yml) across containers: calls within and across the
mid servers' subtrees carry media both ways along the tree path; a mid server killed mid-call
ends every call through it with a reason within 5 s at every server left and at the probe, while
the other subtree's calls go on; restarted, it announces again and takes calls again."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import Lab

pytestmark = pytest.mark.compose

ACROSS = "lower-a1/cam-1:lower-b1/cam-201"  # lower-a1 -> mid-1 -> root -> mid-2 -> lower-b1
BACK = "lower-b2/cam-301:lower-a2/cam-101"
WITHIN = "lower-a1/cam-2:lower-a2/cam-102"  # lower-a1 -> mid-1 -> lower-a2
OTHER_SUBTREE = "lower-b1/cam-202:lower-b2/cam-302"


def test_tree_a_calls_within_and_across_subtrees(tree_lab: Lab):
    status, summary, calls = tree_lab.probe(
        "tree-a", "load", "--pairing", "explicit", "--pair", ACROSS, "--pair", BACK,
        "--pair", WITHIN, "--rate", "1", "--duration", "3", "--hold", "3",
        # what is judged here is the tree's paths and media, not the probe's own event loop,
        # which a 2-core host running eleven containers can stall past the default 50 ms
        "--max-lag-ms", "1000")
    assert status == 0, (summary.get("valid"), [r.get("probe") for r in summary["runs"]],
                         summary.get("objective_missed"))
    paths = {c["caller"]: c["path"] for c in calls}
    assert paths == {
        "lower-a1/cam-1": ["lower-a1", "mid-1", "root", "mid-2", "lower-b1"],
        "lower-b2/cam-301": ["lower-b2", "mid-2", "root", "mid-1", "lower-a2"],
        "lower-a1/cam-2": ["lower-a1", "mid-1", "lower-a2"]}
    for call in calls:
        assert call["ok"], call
        for direction in ("caller_to_callee", "callee_to_caller"):
            media = call["media"][direction]
            assert media["frames"] > 20 and media["latency_ms_p50"] < 500, media
    crossing = summary["figures"]["crossing"]
    assert crossing["root"]["calls"] == 2 and crossing["mid-1"]["calls"] == 3
    # what each container's own /metrics says: the call within mid-1's subtree missed the root
    started = {name: seen["counters"]["relay_calls_started_total"]
               for name, seen in summary["server_metrics"].items()}
    assert started["root"] == 2 and started["mid-1"] == 3 and started["mid-2"] == 2, started


def _calls(lab: Lab, server: str) -> list[dict]:
    return lab.get(server, "/v1/calls")["calls"]


def test_tree_b_a_mid_server_killed_mid_call(tree_lab: Lab):
    probe = tree_lab.probe_background(
        "tree-b", "load", "--pairing", "explicit", "--pair", ACROSS, "--pair", OTHER_SUBTREE,
        "--rate", "2", "--duration", "1", "--hold", "15", "--setup-timeout", "10")
    try:
        tree_lab.wait_for(lambda: [c["state"] for c in _calls(tree_lab, "lower-a1")] == [
            "active"] and [c["state"] for c in _calls(tree_lab, "lower-b1")] == ["active"] * 2,
            40, "both calls up")
        through = _calls(tree_lab, "lower-a1")[0]["call"]
        inside = next(c["call"] for c in _calls(tree_lab, "lower-b1") if c["call"] != through)
        killed_at = time.time()
        tree_lab.compose("kill", "mid-1")
        ends = {}
        for server in ("lower-a1", "root", "mid-2", "lower-b1"):
            tree_lab.wait_for(lambda server=server: tree_lab.get(
                server, f"/v1/calls/{through}")["state"] == "ended", 5 - (time.time() -
                                                                         killed_at),
                f"the call through mid-1 to end at {server} within 5 s")
            ended = tree_lab.get(server, f"/v1/calls/{through}")
            ends[server] = (ended["reason"], round(ended["timeline"]["t_end"] - killed_at, 2))
        # each says why from where it stands: lower-a1 lost its parent, root its child mid-1,
        # and the far side heard it from root
        assert {s: r for s, (r, _) in ends.items()} == {
            "lower-a1": "trunk_lost", "root": "server_gone", "mid-2": "server_gone",
            "lower-b1": "server_gone"}, ends
        assert all(0 <= t < 5 for _, t in ends.values()), ends
        for server in ("lower-b1", "mid-2", "lower-b2"):  # the other subtree's call goes on
            assert tree_lab.get(server, f"/v1/calls/{inside}")["state"] == "active", server
        probe.communicate(timeout=90)
    finally:
        if probe.poll() is None:
            probe.kill()
    calls = {c["caller"]: c for c in tree_lab.calls("tree-b")}
    across, other = calls["lower-a1/cam-1"], calls["lower-b1/cam-202"]
    assert across["failure"] == "dropped" and across["failure_detail"] == "trunk_lost", across
    assert across["timeline"]["t_end"] - killed_at < 5, across
    assert other["ok"] and other["reason"] == "hangup", other
    assert "root" not in other["path"]
    print("\n(tree-b) seconds from the kill to the end at each server:", ends)
    # mid-1 back: its lower servers announce again through it, and calls cross it again
    tree_lab.compose("start", "mid-1")
    tree_lab.wait_devices(timeout=90)
    # (--max-lag-ms: the 2-core host is still busy with mid-1 and its devices coming back; this
    # one-call run came out invalid, exit 3, once in two full runs, most likely the probe's own
    # loop lag; this test is about the path back through mid-1, not the probe's own timing)
    status, summary, calls = tree_lab.probe("tree-b2", "load", "--pairing", "explicit",
                                            "--pair", ACROSS, "--rate", "1", "--duration", "1",
                                            "--hold", "2", "--max-lag-ms", "1000")
    run = {k: v for k, v in summary.items() if k not in ("figures", "server_metrics")}
    assert status == 0 and calls[0]["ok"], (status, run, calls)
    assert calls[0]["path"] == ["lower-a1", "mid-1", "root", "mid-2", "lower-b1"]


def test_tree_c_soak_with_faults_made_through_the_docker_api(tree_lab: Lab, tmp_path):
    """``probe soak --faults`` from the lab's own probe container, the Docker socket mounted:
    mid-2's container killed and started again, lower-a2's paused and unpaused through the
    Docker Engine API. Each fault is recorded and found as what it did (a restart; a server
    the probe could not read), the calls through them are charged to them, and at the end the
    tree is whole and every invariant holds."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"faults": [
        {"at": "20s", "kind": "kill", "server": "mid-2", "restart_after": "10s"},
        {"at": "60s", "kind": "stop", "server": "lower-a2", "for": "8s"}]}))
    plan.chmod(0o644)
    status, summary, calls = tree_lab.probe(
        "tree-c", "soak", "--compose-project", tree_lab.project, "--faults", "/plan.json",
        "--pairing", "every-pair", "--rate", "0.5", "--duration", "100s", "--hold", "2",
        "--window", "10", "--warmup", "60s", "--max-lag-ms", "1000", "--idle-timeout", "90s",
        timeout=420, volumes=("/var/run/docker.sock:/var/run/docker.sock",
                              f"{plan}:/plan.json:ro"))
    stability = summary["stability"]
    assert status in (0, 1) and stability["fault_errors"] == [], (status, stability)
    made = {i["kind"]: i for i in stability["incidents"] if i["made"]}
    assert set(made) == {"kill", "stop"}, stability["incidents"]
    assert "restart" in made["kill"]["seen_as"] and made["kill"]["server"] == "mid-2"
    assert "unreachable" in made["stop"]["seen_as"] and made["stop"]["server"] == "lower-a2"
    assert made["kill"]["recovery_s"] is not None, made["kill"]
    assert stability["servers"]["mid-2"]["restarts"] == 1
    # the failures went to the servers the faults were made on (a stray setup timeout on a
    # busy 2-core host may land elsewhere)
    blamed = stability["blamed"]
    assert blamed.get("mid-2", 0) > 0, blamed
    assert sum(n for s, n in blamed.items() if s not in ("mid-2", "lower-a2")) <= 2, blamed
    assert stability["invariants"]["ok"], stability["invariants"]
    assert len(calls) >= 40
    print("\n(tree-c) recovery of mid-2:", made["kill"]["recovery_s"], "s; verdicts:",
          {n: v["verdict"] for n, v in stability["servers"].items()})
