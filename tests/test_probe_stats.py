"""The probe's pure logic: schedules, pairing, failure classes, mergeable figures, objective."""

from __future__ import annotations

import itertools
import random

import pytest

from probe.load import Pairing, schedule
from probe.objective import RUN, Objective
from probe.stats import FAILURE_CLASSES, Figures, Outcome, Recorder, classify, percentiles
from probe.summary import merge
from wire.messages import DIRECTIONS

GOOD = {"frames": 90, "frames_lost": 0, "fps": 30.0, "duration_s": 3.0, "gaps": 0,
        "latency_ms_p50": 40.0}


def test_fixed_schedule_is_even_and_complete():
    offsets = schedule(4, 2.5)
    assert offsets == [i * 0.25 for i in range(10)]


def test_poisson_schedule_has_the_rate_on_average():
    offsets = schedule(200, 50, poisson=True, rng=random.Random(1))
    assert 9500 < len(offsets) < 10500
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert min(gaps) < 0.0005 < 0.02 < max(gaps)  # exponential, not even
    assert offsets == sorted(offsets) and offsets[-1] < 50


@pytest.mark.parametrize(("reason", "active", "woken", "expected"), [
    ("setup_timeout", False, False, "timeout"),
    ("callee_wake_timeout", False, False, "timeout"),
    ("setup_timeout", False, True, "no_media"),
    ("media_failed", False, True, "ice_dtls_failed"),
    ("callee_busy", False, False, "busy_device"),
    ("unknown_device", False, False, "unknown_device"),
    ("server_unreachable", False, False, "server_unreachable"),
    ("callee_unreachable", False, False, "device_unreachable"),
    ("device_gone", True, True, "dropped"),
    ("server_shutting_down", True, True, "dropped"),
])
def test_end_reasons_are_classified(reason, active, woken, expected):
    outcome = classify(None, reason, active, {}, DIRECTIONS, woken)
    assert outcome == Outcome(False, expected, reason)
    assert expected in FAILURE_CLASSES


@pytest.mark.parametrize(("code", "expected"), [
    ("timeout", "timeout"), ("server_unreachable", "server_unreachable"),
    ("unknown_device", "unknown_device"), ("busy_device", "busy_device"),
    ("caller_not_here", "rejected"), ("bad_response", "rejected")])
def test_command_errors_are_classified(code, expected):
    assert classify(code, None, False, {}, DIRECTIONS).failure == expected


def test_media_outcomes():
    both = {d: dict(GOOD) for d in DIRECTIONS}
    assert classify(None, "hangup", True, both, DIRECTIONS).ok
    missing = {DIRECTIONS[0]: dict(GOOD)}
    assert classify(None, "hangup", True, missing, DIRECTIONS).failure == "no_media"
    stopped = {DIRECTIONS[0]: dict(GOOD), DIRECTIONS[1]: {**GOOD, "frames": 20}}
    assert classify(None, "hangup", True, stopped, DIRECTIONS).failure == "stalled"


def _recorder(values: list[float], server: str, seed: int) -> Recorder:
    rng = random.Random(seed)
    recorder = Recorder(window_s=1.0)
    for i, value in enumerate(values):
        ok = rng.random() > 0.1
        outcome = Outcome(True) if ok else Outcome(False, "timeout", "setup_timeout")
        recorder.add(server, i * 0.1, outcome, {"response_ms": value, "setup_ms": value * 10},
                     {d: dict(GOOD) for d in DIRECTIONS} if ok else {})
    return recorder


def test_merged_figures_equal_one_recorder_that_saw_everything():
    rng = random.Random(3)
    a_values = [rng.uniform(1, 500) for _ in range(500)]
    b_values = [rng.lognormvariate(3, 1) for _ in range(700)]
    a, b = _recorder(a_values, "lower-a", 1), _recorder(b_values, "lower-b", 2)
    both = _recorder(a_values, "lower-a", 1)
    both.merge(_recorder(b_values, "lower-b", 2))
    # through JSON, as `probe merge` does
    summaries = []
    for recorder in (a, b):
        run = {"rate": 10, "duration_s": 1, "media": "full", "valid": True, "scheduled": 5,
               "started": 5, "skipped_cap": 0, "skipped_no_devices": 0, "late_starts": 0,
               "max_concurrent_seen": 1, "offset_s": 0.0, "figures": recorder.summary()}
        summaries.append({"servers": sorted(recorder.servers), "runs": [run],
                          "figures": recorder.summary(), "objective_limits": {}})
    merged = merge(summaries)
    expected = both.summary()
    assert merged["figures"]["total"]["phases"] == expected["total"]["phases"]
    assert merged["figures"]["total"]["calls"] == 1200
    assert merged["figures"]["servers"]["lower-b"]["phases"] == \
        expected["servers"]["lower-b"]["phases"]
    assert merged["runs"][0]["scheduled"] == 10
    exact = sorted(a_values + b_values)
    p50 = merged["figures"]["total"]["phases"]["response_ms"]["p50"]
    assert abs(p50 - exact[len(exact) // 2 - 1]) / exact[len(exact) // 2 - 1] < 0.01


def test_figures_round_trip_through_json():
    recorder = _recorder([5.0, 7.0, 9.0, 200.0], "lower-a", 4)
    again = Recorder.from_summary(recorder.summary())
    assert again.summary() == recorder.summary()
    assert percentiles(again.total.histograms["response_ms"])["max"] == pytest.approx(200, 0.01)


def test_pairing_modes():
    devices = {"a": ["a/1", "a/2"], "b": ["b/1", "b/2"], "c": ["c/1"]}
    rng = random.Random(5)
    random_pairs = [Pairing("random", devices, rng=rng).pick(set()) for _ in range(50)]
    assert all(p[0].split("/")[0] != p[1].split("/")[0] for p in random_pairs)
    every = Pairing("every-pair", devices)
    routes = [tuple(x.split("/")[0] for x in every.pick(set())) for _ in range(6)]
    assert sorted(routes) == sorted([("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"),
                                     ("c", "a"), ("c", "b")])
    # a route whose devices are busy when its turn comes is served as soon as they are free,
    # not passed over for the rest of the cycle
    every = Pairing("every-pair", devices)
    first = every.pick({"c/1"})  # c has no idle device: routes from or to c wait
    served = [first] + [every.pick(set()) for _ in range(5)]
    assert sorted(tuple(x.split("/")[0] for x in p) for p in served) == sorted(
        [("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"), ("c", "a"), ("c", "b")])
    # cycle by cycle: a route is not starved by routes that keep one of its servers' devices
    # busy (4 servers, 2 devices each, each call up for 4 starts: it once never served b1->b2)
    lowers = ["a1", "a2", "b1", "b2"]
    every = Pairing("every-pair", {s: [f"{s}/0", f"{s}/1"] for s in lowers})
    up: dict[tuple[str, str], int] = {}  # call -> the start it began at
    routes = []
    for start in range(36):
        up = {pair: at for pair, at in up.items() if start - at < 4}
        pair = every.pick({d for p in up for d in p})
        if pair is not None:
            up[pair] = start
            routes.append(tuple(d.split("/")[0] for d in pair))
    assert set(routes) == {(a, b) for a in lowers for b in lowers if a != b}
    assert len(routes) >= 24  # two cycles or more: skips stay few
    same = Pairing("same-server", devices)
    for _ in range(4):
        caller, callee = same.pick(set())
        assert caller.split("/")[0] == callee.split("/")[0] and caller != callee
    explicit = Pairing("explicit", devices, pairs=[("a/1", "b/1"), ("a/2", "b/2")])
    assert explicit.pick({"a/1"}) == ("a/2", "b/2")
    assert explicit.pick({"a/2", "b/1"}) is None
    only_b = Pairing("random", devices, rng=rng, callers_on="b")
    assert all(only_b.pick(set())[0].startswith("b/") for _ in range(10))
    assert Pairing("random", devices).pick({"a/1", "a/2", "b/1", "b/2"}) is None
    with pytest.raises(ValueError):
        Pairing("same-server", {"a": ["a/1"], "b": ["b/1"]})


def test_objective():
    figures = Figures()
    for i in range(100):
        ok = i < 97
        figures.add_call(Outcome(True) if ok else Outcome(False, "timeout", "x"),
                         {"response_ms": 10.0 + i, "setup_ms": 200.0}, {}, False)
    assert Objective(min_success_rate=0.95).missed(figures) == []
    why = Objective(min_success_rate=0.99, max_response_p95_ms=50).missed(figures)
    assert len(why) == 2 and "success rate" in why[0] and "response p95" in why[1]
    assert Objective().missed(Figures()) == ["no calls"]


def test_a_run_in_which_no_call_started_misses_the_objective():
    # Every start skipped (devices busy, servers unreachable): no server has figures, and the
    # run must not pass for that. It did: `probe load` exited 0 on a run of no calls.
    assert Objective().missed_by_server({}) == {RUN: ["no call started"]}
    assert Objective().missed_by_server({"a": Figures()}) == {"a": ["no calls"]}
    empty = Recorder(10.0)
    run = {"rate": 1, "duration_s": 2, "media": "full", "valid": True, "scheduled": 2,
           "started": 0, "skipped_cap": 0, "skipped_no_devices": 2, "late_starts": 0,
           "max_concurrent_seen": 0, "offset_s": 0.0, "figures": empty.summary()}
    merged = merge([{"servers": ["a"], "runs": [run], "figures": empty.summary(),
                     "objective_limits": {}}])
    assert not merged["objective_met"] and merged["objective_missed"] == {
        RUN: ["no call started"]}


def test_picture_quality_is_summed_per_direction_merges_exactly_and_has_an_objective():
    def run(psnrs: list[float]) -> Figures:
        figures = Figures()
        for psnr in psnrs:
            media = {"caller_to_callee": {"psnr_db": psnr, "ssim": 0.96, "frames": 30},
                     "callee_to_caller": {"frames": 30}}  # a camera's picture: no PSNR
            figures.add_call(Outcome(True), {"response_ms": 5.0, "setup_ms": 200.0}, media,
                             False)
        return figures

    good, bad = run([44.0] * 19), run([21.5])
    quality = good.summary()["quality"]
    # HdrHistogram's 1 %: of the dB for PSNR, of what SSIM misses of 1 for SSIM
    assert quality["psnr_db"]["n"] == 19
    assert quality["psnr_db"]["p5"] == pytest.approx(44.0, rel=0.01)
    assert quality["psnr_db"]["min"] == pytest.approx(44.0, rel=0.01)
    assert quality["ssim"]["p5"] == pytest.approx(0.96, abs=0.04 * 0.01)
    assert "psnr_db" not in good.summary()["phases"]  # not a time
    assert Objective(min_psnr=40).missed(good) == []
    # one bad direction in twenty is the 5th percentile: it misses; merged, figure for figure
    good.merge(Figures.from_summary(bad.summary()))
    assert good.summary()["quality"]["psnr_db"]["min"] == pytest.approx(21.5, rel=0.01)
    why = Objective(min_psnr=40).missed(good)
    assert len(why) == 1 and why[0].startswith("PSNR p5 21.") and "< 40 dB" in why[0], why
    # no synthetic picture at all: the objective cannot be judged, and says so
    blind = Figures()
    blind.add_call(Outcome(True), {"response_ms": 5.0, "setup_ms": 200.0},
                   {"caller_to_callee": {"frames": 30}}, False)
    assert Objective(min_psnr=40).missed(blind) == [
        "PSNR p5: no value (no synthetic picture received)"]


def test_mos_lip_sync_and_audio_latency_per_direction_merge_and_have_objectives():
    def run(directions: list[tuple[float, float]]) -> Figures:
        figures = Figures()
        for mos, skew in directions:
            media = {"caller_to_callee": {"mos": mos, "av_sync_ms": skew, "frames": 30,
                                          "audio_latency_ms_p50": 45.0},
                     "callee_to_caller": {"frames": 30}}  # a microphone: no marks
            figures.add_call(Outcome(True), {"response_ms": 5.0, "setup_ms": 200.0}, media,
                             False)
        return figures

    # 10 directions: skews from 30 ms before the picture to 60 ms after it
    skews = [-30.0, -20.0, -10.0, 0.0, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0]
    figures = run([(4.4, s) for s in skews])
    summary = figures.summary()
    quality = summary["quality"]
    assert quality["mos"]["n"] == 10 and quality["mos"]["p5"] == pytest.approx(4.4, rel=0.01)
    sync = quality["av_sync_ms"]
    assert sync["n"] == 10
    assert sync["p5"] == pytest.approx(-30, rel=0.01)  # signed: the lead side is negative
    assert sync["p50"] == pytest.approx(5, abs=0.1)
    assert sync["p95"] == pytest.approx(60, rel=0.01)
    assert sync["size_p95"] == pytest.approx(60, rel=0.01)
    assert summary["phases"]["audio_latency_ms"]["p50"] == pytest.approx(45, rel=0.01)
    assert "mos" not in summary["phases"] and "av_sync_lag_ms" not in summary["phases"]
    assert Objective(min_mos=4.0, max_av_sync_ms=80).missed(figures) == []
    why = Objective(max_av_sync_ms=40).missed(figures)
    assert len(why) == 1 and why[0].startswith("lip sync p95 60 ms > 40 ms"), why
    # merged from JSON, figure for figure; a poor direction pulls MOS p5 down
    figures.merge(Figures.from_summary(run([(2.1, -90.0)] * 2).summary()))
    assert figures.summary()["quality"]["av_sync_ms"]["p5"] == pytest.approx(-90, rel=0.01)
    why = Objective(min_mos=4.0).missed(figures)
    assert len(why) == 1 and why[0].startswith("MOS p5 2.1"), why
    deaf = Figures()
    deaf.add_call(Outcome(True), {"response_ms": 5.0, "setup_ms": 200.0},
                  {"caller_to_callee": {"frames": 30}}, False)
    assert Objective(min_mos=4.0, max_av_sync_ms=40).missed(deaf) == [
        "MOS p5: no value (no audio timing mark received)",
        "lip sync p95: no value (no audio mark matched with video)"]
    # and the time series has them per window
    recorder = Recorder(window_s=10)
    recorder.add("lower-a", 3.0, Outcome(True), {"response_ms": 5.0},
                 {"caller_to_callee": {"frames": 30, "mos": 4.4, "av_sync_ms": -12.0,
                                       "audio_latency_ms_p50": 45.0, "psnr_db": 43.7}})
    row = recorder.timeseries()[0]
    assert row["mos_p50"] == pytest.approx(4.4, rel=0.01)
    assert row["av_sync_ms_p50"] == pytest.approx(-12, rel=0.01)
    assert row["audio_latency_ms_p50"] == pytest.approx(45, rel=0.01)
    assert row["psnr_db_p50"] == pytest.approx(43.7, rel=0.01)


def test_freezes_the_sender_made_are_counted_apart_and_merge():
    figures = Figures()
    figures.add_call(Outcome(True), {"response_ms": 5.0},
                     {"caller_to_callee": {"frames": 600, "gaps": 3, "gaps_source": 2}}, False)
    again = Figures.from_summary(figures.summary())
    again.merge(figures)
    assert again.summary()["media"]["freezes"] == 6
    assert again.summary()["media"]["freezes_source"] == 4
