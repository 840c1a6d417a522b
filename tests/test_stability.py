"""The soak's checker (probe/stability.py) on histories made here: no socket, time as an argument.
A tree a - u - b (two lower servers under one upper); a call a second from a to b; every server
scraped every 2 s. Faults are written into the history as a real run would show them."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from probe.stability import CallRecord, StabilityRecorder, StabilitySettings

T0 = 1_000_000.0
BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, float("inf"))
PATH = ("a", "u", "b")
DEVICES = {"a": 2, "b": 2, "u": 4}


class Server:
    """What one server's /metrics would say, moved along by the test."""

    def __init__(self, started: float = T0 - 100) -> None:
        self.started = started
        self.rss = 100e6
        self.cpu = 0.0
        self.lag = {b: 0.0 for b in BOUNDS}
        self.tasks = 20.0
        self.servers = 3.0
        self.devices = 0.0

    def tick(self, seconds: float, stalled: bool = False) -> None:
        """``seconds`` of running: the lag task samples every 100 ms (a stalled server's a
        quarter of them late by 250 ms), a little CPU."""
        samples = int(seconds * 10)
        late = samples // 4 if stalled else 0
        for bound in BOUNDS:
            self.lag[bound] += (samples - late) if bound >= 0.002 else 0
            if bound >= 0.25:
                self.lag[bound] += late
        self.cpu += 0.05 * seconds

    def sample(self) -> dict[str, float]:
        out = {"process_start_time_seconds": self.started,
               "process_resident_memory_bytes": self.rss, "process_cpu_seconds_total": self.cpu,
               "process_open_fds": 20.0, "relay_asyncio_tasks": self.tasks,
               "relay_directory_servers": self.servers, "relay_directory_devices": self.devices}
        for bound, count in self.lag.items():
            out[f"relay_event_loop_lag_seconds_bucket{{le={bound}}}"] = count
        return out


def run(seconds: float, *, down: tuple[float, float] | None = None,
        stalled: tuple[float, float] | None = None,
        leak_mb_per_s: float = 0.0, end_at_u: Callable[[float], str] | None = None,
        settings: StabilitySettings | None = None,
        made_at_b: tuple[float, float] | None = None) -> StabilityRecorder:
    """``down``: u's process dies at the first moment and a new one answers from the second
    (calls through it fail from the death until the directories are whole again, 3 s after);
    ``stalled``: b stopped a quarter of every second; ``leak_mb_per_s``: a's memory grows;
    ``made_at_b``: a fault the probe made on b from the first moment to the second (a slow
    link, say: calls and directories untouched)."""
    settings = settings or StabilitySettings(window_s=20, close_after_s=30, warmup_s=60)
    recorder = StabilityRecorder(["a", "u", "b"], T0, settings, expected_servers=3,
                                 expected_devices=DEVICES)
    servers = {name: Server() for name in ("a", "u", "b")}
    for name, server in servers.items():
        server.devices = DEVICES[name]
    t = T0
    fault = None
    while t < T0 + seconds:
        t += 1.0
        offset = t - T0
        if made_at_b is not None and offset == made_at_b[0]:
            fault = recorder.add_fault("b", "limit", t, None, "its parent link limited")
        if fault is not None and made_at_b is not None and offset == made_at_b[1]:
            fault.end = t
        u_down = down is not None and down[0] <= offset < down[1]
        back = down is not None and down[1] <= offset < down[1] + 3
        if down is not None and offset == down[1]:
            servers["u"] = Server(started=t)  # the new process, empty at first
            servers["u"].devices = 0
        if back and offset == down[1] + 2:
            servers["u"].devices = DEVICES["u"]
        if not u_down and down is not None and offset >= down[1] + 2:
            servers["u"].devices = DEVICES["u"]
        for name, server in servers.items():
            server.tick(1.0, stalled=name == "b" and stalled is not None
                        and stalled[0] <= offset < stalled[1])
        servers["a"].rss += leak_mb_per_s * 1e6
        # a call started a second ago ends now
        failed = u_down or back
        transit = {"a": 1.0, "u": 1.0, "b": 200.0 if stalled is not None
                   and stalled[0] <= offset < stalled[1] else 1.0}
        ends = {"a": "ended:hangup", "b": "ended:hangup",
                "u": end_at_u(offset) if end_at_u else "ended:hangup"}
        record = CallRecord(
            t_sent=t - 4, t_end=t, ok=not failed, failure="dropped" if failed else None,
            detail="trunk_lost" if failed else None, caller_server="a", planned=PATH,
            reached=PATH[:1] if failed else PATH, call=f"c{int(offset)}", response_ms=2.0,
            setup_ms=100.0, media_p95_ms=8.0, transit=transit, ends=ends)
        recorder.add_call(record, t)
        if offset % 2 == 0:
            for name, server in servers.items():
                if name == "u" and u_down:
                    recorder.add_scrape(name, t, None, "connection refused")
                else:
                    recorder.add_scrape(name, t, server.sample())
            recorder.sampled(t)
        recorder.tick(t)
    recorder.finish(t + 60)
    return recorder


def test_a_quiet_run_is_stable_everywhere():
    recorder = run(300)
    verdicts = recorder.judge(T0 + 400)
    assert {n: v["verdict"] for n, v in verdicts["servers"].items()} == {
        "a": "stable", "u": "stable", "b": "stable"}, verdicts["servers"]
    assert len(recorder.rows["a"]) == 19  # 300 s and the minute after, in 20 s windows
    row = recorder.rows["u"][5]
    assert row["calls"] == 20 and row["ok"] == 20 and row["loop_lag_p95_ms"] == 2.0
    assert row["cpu_pct"] == pytest.approx(5.0)
    assert verdicts["incidents"] == []
    leaks = verdicts["servers"]["a"]["leaks"]
    assert leaks["judged"] and not leaks["rss_mb"]["leaking"]


def test_a_stalled_server_s_windows_are_found_and_its_neighbours_are_not_blamed():
    recorder = run(300, stalled=(100, 200))
    verdicts = recorder.judge(T0 + 400)["servers"]
    assert verdicts["a"]["verdict"] == verdicts["u"]["verdict"] == "stable", verdicts
    b = verdicts["b"]
    assert b["verdict"] == "unstable"
    spans = [(w["start_s"], w["end_s"]) for w in b["unstable_windows"]]
    assert spans == [(100, 120), (120, 140), (140, 160), (160, 180), (180, 200)], spans
    assert b["unstable_windows"][0]["signals"] == {"loop_lag_p95_ms": 250.0,
                                                   "transit_p99_ms": 200.0}
    assert "unstable windows" in b["reasons"][0]


def test_a_restart_is_found_charged_to_the_server_that_failed_and_timed():
    recorder = run(300, down=(120, 140))
    found = recorder.judge(T0 + 400)
    verdicts = found["servers"]
    assert verdicts["a"]["verdict"] == verdicts["b"]["verdict"] == "stable", verdicts
    u = verdicts["u"]
    assert u["verdict"] == "unstable" and u["restarts"] == 1
    assert "restarted 1 time" in u["reasons"]
    # every failure went to u, though a's calls were the ones that failed
    assert found["blamed"] == {"u": 23}
    incident = next(i for i in found["incidents"] if i["kind"] == "restart")
    assert incident["server"] == "u" and incident["start_s"] == 120
    assert incident["outcomes"]["dropped:trunk_lost"] == 23
    # calls through it succeed from 143 s on (started 4 s before they end, set up 100 ms
    # after); the directories are whole from the scrape at 142 s
    assert incident["first_ok_call_s"] == 19.1 and incident["directory_whole_s"] == 22.0
    assert incident["recovery_s"] == 22.0 and u["recovery_s"] == 22.0
    # a call up through u when it died ended within the 4 s a call lasts
    assert incident["detect_s"] is not None and 0 <= incident["detect_s"] <= 4


def test_a_leak_is_named_with_its_rate_and_warm_up_is_not():
    recorder = run(400, leak_mb_per_s=0.05)  # 180 MB an hour, from the start
    a = recorder.judge(T0 + 500)["servers"]["a"]
    assert a["verdict"] == "unstable"
    rss = a["leaks"]["rss_mb"]
    assert rss["leaking"] and rss["per_hour"] == pytest.approx(180, rel=0.05)
    assert any("rss_mb leaks" in r for r in a["reasons"])


def test_a_call_left_up_at_a_server_breaks_the_invariant_and_a_restart_excuses_unknown():
    recorder = run(200, end_at_u=lambda t: "state:active" if t == 50 else "ended:hangup")
    ends = recorder.ends(T0 + 300)
    assert not ends["ok"] and ends["broken"] == 1 and ends["by_server"] == {"u": 1}
    assert ends["examples"][0]["was"] == "state:active"
    recorder = run(300, down=(120, 140),
                   end_at_u=lambda t: "unknown" if 120 <= t < 140 else "ended:hangup")
    ends = recorder.ends(T0 + 400)
    assert ends["ok"] and ends["excused"] == 20


def test_windows_close_only_once_their_calls_are_in():
    settings = StabilitySettings(window_s=10, close_after_s=30)
    recorder = StabilityRecorder(["a"], T0, settings)
    assert recorder.tick(T0 + 39) == []
    assert recorder.tick(T0 + 40) == [0]
    late = CallRecord(t_sent=T0 + 5, t_end=T0 + 41, ok=True, failure=None, detail=None,
                      caller_server="a", planned=("a",), reached=("a",))
    recorder.add_call(late, T0 + 41)
    assert recorder.late_records == 1 and recorder.calls == 1


def test_the_soak_report_shades_the_unstable_windows_and_writes_the_trends(tmp_path):
    from probe.report import write_soak

    recorder = run(300, stalled=(100, 200))
    stability = recorder.judge(T0 + 400)
    stability["faults"] = [{"server": "b", "kind": "duty", "what": "stopped", "start_s": 100.0,
                            "end_s": 200.0}]
    summary = {"command": "soak", "stability": stability,
               "trends": {"window_s": 20, "servers": recorder.rows,
                          "probe": recorder.probe_rows}}
    write_soak(tmp_path, summary)
    rows = (tmp_path / "timeseries.csv").read_text().splitlines()
    assert rows[0].startswith("window,server,t_s") and len(rows) == 1 + 3 * 19
    page = (tmp_path / "report.html").read_text()
    # b: its fault (grey) and its five unstable windows (red), behind each of its 5 plots
    assert page.count('class="shade"') == 5 * (1 + 5)
    assert "b: unstable" in page and "a: stable" in page
    assert not list(tmp_path.glob("*.part"))


def test_a_slow_answer_the_probe_itself_was_too_busy_to_read_is_not_the_server_s():
    recorder = run(300)
    rows, probe = recorder.rows["a"], recorder.probe_rows
    rows[5]["response_p95_ms"], probe[5]["loop_lag_ms"] = 120.0, 110.0  # the probe stalled
    rows[9]["response_p95_ms"], probe[9]["loop_lag_ms"] = 120.0, 2.0  # the server was slow
    windows, _ = recorder.unstable_windows("a")
    assert [(w["start_s"], w["signals"]) for w in windows] == [
        (180, {"response_p95_ms": 118.0})]


def test_a_break_of_the_directories_is_put_down_to_the_incident_on_not_one_just_over():
    # a fault on b undone at 110 s; u dies at 120 s and breaks the directories (within the
    # 20 s a fault's end may take to show): u's, not b's, slow to recover, nor its failures
    recorder = run(300, down=(120, 140), made_at_b=(60, 110))
    found = recorder.judge(T0 + 400)
    made = next(i for i in found["incidents"] if i["kind"] == "limit")
    restart = next(i for i in found["incidents"] if i["kind"] == "restart")
    assert made["directory_whole_s"] is None and made["outcomes"] == {"ok": 59}, made
    assert made["recovery_s"] is not None and made["recovery_s"] < 1, made
    assert restart["directory_whole_s"] == 22.0 and restart["recovery_s"] == 22.0, restart
    assert found["blamed"].get("b", 0) == 0 and found["blamed"]["u"] > 0, found["blamed"]


def test_a_server_found_unreachable_is_put_down_to_its_latest_fault():
    recorder = StabilityRecorder(["a", "u", "b"], T0, StabilitySettings(window_s=20),
                                 expected_servers=3, expected_devices=DEVICES)
    for name in ("a", "u", "b"):
        recorder.add_scrape(name, T0 + 1, Server().sample())
    cut = recorder.add_fault("b", "cut", T0 + 150, None, "its parent link cut")
    cut.end = T0 + 160
    limit = recorder.add_fault("b", "limit", T0 + 170, None, "its parent link limited")
    recorder.add_scrape("b", T0 + 174, None, "TimeoutError")  # within 20 s of the cut's end
    found = next(i for i in recorder.incidents if i.kind == "unreachable")
    assert found.cause is limit and limit.seen_as == ["unreachable"] and not cut.seen_as
    assert "the fault made: limit at 170.0 s" in found.detail
