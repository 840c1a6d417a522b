"""The probe's reading of a server's /metrics: the Prometheus text parsed, counters differenced
over a run, gauge peaks kept, and the event-loop lag p99 bound read from histogram buckets."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from probe.scrape import ServerTrack, counter_deltas, describe, lag_bound_ms, parse, total

BUCKETS = (0.001, 0.005, 0.05)


class FakeServer:
    """A real prometheus_client registry shaped like a relay's (names, labels, buckets)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        me = ["server", "role"]
        self.started = Counter("relay_calls_started", "", me, registry=self.registry)
        self.refusals = Counter("relay_refusals", "", [*me, "code"], registry=self.registry)
        self.legs = Gauge("relay_legs", "", [*me, "state"], registry=self.registry)
        self.memory = Gauge("process_resident_memory_bytes", "", registry=self.registry)
        self.cpu = Counter("process_cpu_seconds", "", registry=self.registry)
        self.lag = Histogram("relay_event_loop_lag_seconds", "", buckets=BUCKETS,
                             registry=self.registry)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def test_parse_keys_leave_the_servers_own_labels_out():
    server = FakeServer()
    server.started.labels("lower-a", "lower").inc(3)
    server.refusals.labels("lower-a", "lower", "server_busy").inc(2)
    server.legs.labels("lower-a", "lower", "connected").set(4)
    server.legs.labels("lower-a", "lower", "connecting").set(1)
    sample = parse(server.text())
    assert sample["relay_calls_started_total"] == 3
    assert sample["relay_refusals_total{code=server_busy}"] == 2
    assert total(sample, "relay_legs") == 5
    assert total(sample, "relay_calls") == 0  # a relay's empty gauge: nothing in progress
    assert total(sample, "relay_asyncio_tasks") is None  # not exposed: unknown, not zero
    with pytest.raises(ValueError):
        parse("this is { not the exposition format")


def test_a_run_is_the_difference_between_its_first_and_last_scrape():
    server = FakeServer()
    server.started.labels("lower-a", "lower").inc(10)  # before the run: not ours
    server.memory.set(100e6)
    for _ in range(100):
        server.lag.observe(0.0002)
    track = ServerTrack("http://lower-a")
    track.add(parse(server.text()), now=0.0)
    server.started.labels("lower-a", "lower").inc(7)
    server.refusals.labels("lower-a", "lower", "server_busy").inc(2)
    server.legs.labels("lower-a", "lower", "connected").set(12)  # the peak, gone by the end
    server.memory.set(130e6)
    server.cpu.inc(1.5)
    for _ in range(98):
        server.lag.observe(0.0002)
    server.lag.observe(0.003)
    server.lag.observe(0.004)  # 2 of 100 in (1, 5] ms: p99 ≤ 5 ms
    track.add(parse(server.text()), now=5.0)
    server.legs.labels("lower-a", "lower", "connected").set(0)
    server.memory.set(110e6)
    track.add(parse(server.text()), now=10.0)
    s = track.summary()
    assert s["counters"] == {"relay_calls_started_total": 7,
                             "relay_refusals_total{code=server_busy}": 2}
    assert s["legs"] == {"start": 0, "end": 0, "peak": 12}
    assert s["memory_mb"] == {"start": 100.0, "end": 110.0, "peak": 130.0}
    assert s["cpu_pct"] == 15.0  # 1.5 CPU-seconds in 10 s
    assert s["loop_lag_p99_ms_at_most"] == 5.0
    assert s["scrapes"] == 3 and s["elapsed_s"] == 10.0
    line = "\n".join(describe({"lower-a": s}))
    assert "CPU 15.0 %" in line and "legs peak 12" in line and "server_busy': 2" in line


def test_lag_bound_edges():
    server = FakeServer()
    empty = parse(server.text())
    assert lag_bound_ms(empty, empty) is None  # no sample in the run
    server.lag.observe(0.2)  # past the last finite bucket
    assert lag_bound_ms(empty, parse(server.text())) == float("inf")
    assert counter_deltas(empty, empty) == {}


def test_a_server_restarted_mid_run_sums_each_process_s_part():
    before = parse("process_start_time_seconds 100\nprocess_cpu_seconds_total 50\n"
                   'relay_calls_started_total{server="a"} 40\n')
    dying = parse("process_start_time_seconds 100\nprocess_cpu_seconds_total 53\n"
                  'relay_calls_started_total{server="a"} 47\n')
    after = parse("process_start_time_seconds 200\nprocess_cpu_seconds_total 1\n"
                  'relay_calls_started_total{server="a"} 3\n')
    track = ServerTrack("http://a")
    track.add(before, 0.0)
    track.add(dying, 5.0)
    track.add(after, 10.0)
    s = track.summary()
    assert s["restarted"] is True and s["restarts"] == 1
    # 7 by the first process while watched, 3 by the second since it started: not -37, and
    # not the second's 3 alone
    assert s["counters"] == {"relay_calls_started_total": 10}
    assert s["cpu_pct"] == 40.0  # 3 + 1 CPU-seconds over the 10 s
    assert "restarted 1 time during the run" in next(iter(describe({"a": s})))


def test_an_unreadable_server_is_described_not_fatal():
    track = ServerTrack("http://127.0.0.1:9")
    track.failed, track.error = 3, "http://127.0.0.1:9/metrics: ClientConnectorError"
    s = track.summary()
    assert "counters" not in s and s["failed_scrapes"] == 3
    assert "unreadable" in "\n".join(describe({"ghost": s}))
