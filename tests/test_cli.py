"""The commands a user runs, as real processes: the local stack, `probe call --local` and
`probe capacity --local`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TIMELINE = ("t_sent", "t_response", "t_caller_woken", "t_callee_woken", "t_first_frame_callee",
            "t_first_frame_caller", "t_end")


def marked_env() -> tuple[dict[str, str], str]:
    """An environment with a unique marker, to find every process started under it."""
    marker = uuid.uuid4().hex
    return {**os.environ, "VPHONE_TEST_MARKER": marker}, marker


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if f"VPHONE_TEST_MARKER={marker}".encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def wait_gone(marker: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def stop_clean(stack: subprocess.Popen[str], marker: str) -> None:
    """SIGTERM the stack: it exits 0 and leaves no process of its own behind."""
    try:
        stack.send_signal(signal.SIGTERM)
        assert stack.wait(timeout=20) == 0
    finally:
        if stack.poll() is None:
            stack.kill()
    assert wait_gone(marker) == []


def test_probe_call_local_json():
    env, marker = marked_env()
    done = subprocess.run(
        [sys.executable, "-m", "probe", "call", "--local", "--hold", "1.5", "--json",
         "--count", "2", "--scrape-interval", "0.5"],
        capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert len(lines) == 3  # two calls, then the summary
    summary = lines[-1]["summary"]
    assert summary["calls"] == 2 and summary["ok"] == 2
    seen = summary["server_metrics"]  # what the servers' own /metrics said over the run
    assert set(seen) == {"upper", "lower-a", "lower-b"}
    for server in seen.values():
        assert server["counters"]["relay_calls_started_total"] == 2, server
        assert server["counters"]["relay_forwarded_packets_total"] > 100
        assert server["legs"]["peak"] >= 2 and server["scrapes"] >= 4
    result = lines[0]
    assert result["ok"] is True
    for name in TIMELINE:
        assert isinstance(result["timeline"][name], float), name
    assert result["timeline"]["t_sent"] <= result["timeline"]["t_response"]
    assert result["caller"].split("/")[0] != result["callee"].split("/")[0]
    for direction in ("caller_to_callee", "callee_to_caller"):
        media = result["media"][direction]
        assert media["latency_ms_p50"] > 0 and media["latency_ms_p95"] >= media["latency_ms_p50"]
        # loopback, 1.5 s: a frame or two may be lost to the first keyframe's wait, no more
        assert media["fps"] > 5 and media["frames_lost"] <= 2, media
    assert result["path"] == ["lower-a", "upper", "lower-b"]
    assert wait_gone(marker) == []


def test_probe_capacity_local_writes_each_steps_server_metrics(tmp_path: Path):
    env, marker = marked_env()
    done = subprocess.run(
        [sys.executable, "-m", "probe", "capacity", "--local", "--devices", "4", "--media",
         "none", "--duration", "1", "--hold", "0.5", "--start-rate", "2", "--max-rate", "4",
         "--bisect", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]  # 4 calls/s is far below the limit
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {name: c["rate"] for name, c in summary["capacity"].items()} == \
        {"lower-a": 4.0, "lower-b": 4.0}  # never failed up to --max-rate
    assert [run["rate"] for run in summary["runs"]] == [2.0, 4.0, 2.0, 4.0]
    for run in summary["runs"]:
        searched = run["step"]["server"]
        seen = run["server_metrics"][searched]["counters"]
        assert seen["relay_calls_started_total"] == run["started"] > 0, run
        # read over each step (a step of a few signalling calls may stay under the 10 ms
        # that process CPU time counts in, so only the whole run must show some)
        assert isinstance(run["step"]["server_cpu_pct"][searched], float), run["step"]
    assert all(summary["server_metrics"][name]["cpu_pct"] > 0 for name in ("lower-a", "lower-b"))
    assert "CPU %" in (tmp_path / "report.html").read_text()
    assert "lower-a: sustainable 4.0 calls/s" in done.stdout
    assert "at 4 calls/s (pass): CPU lower-a" in done.stdout  # where the load went
    assert "upper /metrics: CPU" in done.stdout
    assert wait_gone(marker) == []


def test_probe_exit_status_when_no_server_answers():
    done = subprocess.run(
        [sys.executable, "-m", "probe", "call", "--server", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "server_unreachable" in done.stderr


def test_stack_prints_servers_and_stops_clean_on_sigterm():
    env, marker = marked_env()
    stack = subprocess.Popen([sys.executable, "-m", "relay", "stack", "--devices", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=env)
    try:
        line = stack.stdout.readline()
        info = json.loads(line)
        assert [s["name"] for s in info["servers"]] == ["upper", "lower-a", "lower-b"]
        assert all(s["url"].startswith("http://127.0.0.1:") for s in info["servers"])
        assert len(processes_with(marker)) == 6  # stack + 3 servers + 2 device processes
    finally:
        stop_clean(stack, marker)


def test_killed_stack_leaves_no_process_behind():
    env, marker = marked_env()
    stack = subprocess.Popen([sys.executable, "-m", "relay", "stack"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        json.loads(stack.stdout.readline())
        assert len(processes_with(marker)) == 6
        stack.kill()  # no chance to clean up: the children's parent-death signal must do it
        stack.wait(timeout=10)
    finally:
        if stack.poll() is None:
            stack.kill()
    assert wait_gone(marker) == []


TREE = {"name": "root", "children": [
    {"name": "mid-1", "children": [{"name": "lower-a1", "devices": 2}, {"name": "lower-a2"}]},
    {"name": "mid-2", "children": [{"name": "lower-b1"}, {"name": "lower-b2"}]}]}


def test_stack_takes_a_topology_and_lists_every_server_with_its_parent(tmp_path: Path):
    topology = tmp_path / "tree.json"
    topology.write_text(json.dumps(TREE))
    env, marker = marked_env()
    stack = subprocess.Popen([sys.executable, "-m", "relay", "stack", "--topology",
                              str(topology), "--video", "packets"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        info = json.loads(stack.stdout.readline())
        servers = {s["name"]: s for s in info["servers"]}
        assert {n: (s["role"], s["parent"]) for n, s in servers.items()} == {
            "root": ("upper", None), "mid-1": ("upper", "root"), "mid-2": ("upper", "root"),
            "lower-a1": ("lower", "mid-1"), "lower-a2": ("lower", "mid-1"),
            "lower-b1": ("lower", "mid-2"), "lower-b2": ("lower", "mid-2")}
        assert all(s["url"].startswith("http://127.0.0.1:") for s in servers.values())
        assert len(processes_with(marker)) == 9  # stack + 7 servers + 1 packet-device process
        import urllib.request
        with urllib.request.urlopen(servers["lower-b2"]["url"] + "/v1/servers") as r:
            known = json.loads(r.read())["servers"]
        assert {s["name"] for s in known} == set(servers)  # any server knows the whole tree
        with urllib.request.urlopen(servers["root"]["url"] + "/v1/devices") as r:
            devices = json.loads(r.read())["devices"]
        assert sorted(d["address"] for d in devices if d["server"] == "lower-a1") == [
            "lower-a1/cam-1", "lower-a1/cam-2"]  # its own count; the others the default
        assert len(devices) == 5
    finally:
        stop_clean(stack, marker)


def test_probe_call_local_topology_prints_the_path(tmp_path: Path):
    topology = tmp_path / "tree.json"
    topology.write_text(json.dumps(TREE))
    env, marker = marked_env()
    done = subprocess.run(
        [sys.executable, "-m", "probe", "call", "--local", "--topology", str(topology),
         "--video", "packets", "--hold", "1", "--via", "root", "--scrape-interval", "0"],
        capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "path: lower-a1 -> mid-1 -> root -> mid-2 -> lower-b1" in done.stdout, done.stdout
    assert wait_gone(marker) == []


@pytest.mark.parametrize("topology, error", [
    ({"name": "root"}, "needs children"),
    ({"name": "root", "children": [{"name": "a"}, {"name": "a"}]}, "used twice"),
    ({"name": "root", "children": [{"name": "bad name"}]}, "children[0].name"),
    ({"name": "root", "devices": 2, "children": [{"name": "a"}]}, "devices go on leaves"),
    ({"name": "root", "children": [{"name": "a", "colour": "red"}]}, "unknown key 'colour'"),
])
def test_a_wrong_topology_is_refused_with_where(tmp_path: Path, topology: dict, error: str):
    path = tmp_path / "tree.json"
    path.write_text(json.dumps(topology))
    done = subprocess.run([sys.executable, "-m", "relay", "stack", "--topology", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and error in done.stderr, done.stderr


def test_stack_and_probe_call_local_work_with_auth_on():
    env, marker = marked_env()
    env["VPHONE_AUTH_SECRET"] = "cli-test-secret"
    stack = subprocess.Popen([sys.executable, "-m", "relay", "stack", "--devices", "1",
                              "--video", "packets"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=env)
    try:
        info = json.loads(stack.stdout.readline())  # the launcher itself asked with a token
        lower_a = next(s["url"] for s in info["servers"] if s["name"] == "lower-a")
        with urllib.request.urlopen(f"{lower_a}/healthz") as r:
            assert r.status == 200  # open
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{lower_a}/v1/devices")
        assert refused.value.code == 401
    finally:
        stop_clean(stack, marker)
    done = subprocess.run(
        [sys.executable, "-m", "probe", "call", "--local", "--hold", "0.5", "--json",
         "--video", "packets"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[0])["ok"] is True
    assert wait_gone(marker) == []


def test_a_person_s_mistakes_get_one_line_saying_what_to_do():
    env, marker = marked_env()
    upper = subprocess.Popen([sys.executable, "-m", "relay", "upper", "--name", "up",
                              "--port", "0"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        url = json.loads(upper.stdout.readline())["url"]
        port = url.rsplit(":", 1)[1]
        # the port is taken: one line, and what to do
        taken = subprocess.run([sys.executable, "-m", "relay", "lower", "--name", "l",
                                "--port", port, "--log-level", "error"],
                               capture_output=True, text=True, env=env, timeout=30)
        assert taken.returncode == 2
        assert "address already in use" in taken.stderr and "--port 0" in taken.stderr
        assert "Traceback" not in taken.stderr
        # a device pointed at an upper server: says so, and gives up at --connect-timeout
        device = subprocess.run([sys.executable, "-m", "endpoint", "--server", url,
                                 "--connect-timeout", "2", "--log-level", "error"],
                                capture_output=True, text=True, env=env, timeout=30)
        assert device.returncode == 1
        assert "is --server a lower server?" in device.stderr, device.stderr
    finally:
        upper.terminate()
        upper.wait(timeout=10)
    nobody = subprocess.run([sys.executable, "-m", "endpoint", "--server", url,
                             "--connect-timeout", "1.5", "--log-level", "error"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert nobody.returncode == 1 and "is the server up?" in nobody.stderr, nobody.stderr
    assert wait_gone(marker) == []
