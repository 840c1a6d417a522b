"""The probe's HTML report opens offline in a real browser (headless Chromium) with its plots
drawn; the CSV and summary sit next to it."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import av
import numpy as np
import pytest

from probe.objective import Objective
from probe.report import FILES, write_summary
from probe.scrape import ServerTrack, parse
from probe.stats import Outcome, Recorder
from probe.summary import build
from relay.hops import links_of
from wire.messages import DIRECTIONS, HopFigures, LegHop, StreamHop

from . import browser

pytestmark = pytest.mark.e2e


def _hop(server: str, transit: float) -> HopFigures:
    video = StreamHop(packets=100, lost=3 if server == "lower-b" else 0,
                      transit_ms_mean=transit, transit_ms_p99=transit * 3)
    return HopFigures(server=server, at=1.0, streams={d: {"video": video} for d in DIRECTIONS},
                      legs=[LegHop(toward="caller", peer="x", rtt_ms=2.0, dtls_ms=60.0),
                            LegHop(toward="callee", peer="y", rtt_ms=2.0, dtls_ms=60.0)])


PATH = ["lower-a", "upper", "lower-b"]
_FIGURES = {"lower-a": _hop("lower-a", 0.4), "upper": _hop("upper", 9.0),
            "lower-b": _hop("lower-b", 0.5)}
HOPS = [_FIGURES[name].to_dict() for name in PATH]
LINKS = [link.to_dict() for link in links_of(PATH, "lower-a/cam-1", "lower-b/cam-2", _FIGURES)]


def a_summary() -> dict:
    rng = random.Random(9)
    recorder = Recorder(window_s=1.0)
    for i in range(200):
        server = ("lower-a", "lower-b")[i % 2]
        ok = rng.random() > 0.05
        media = {d: {"frames": 90, "frames_lost": 1, "fps": 30.0, "duration_s": 3.0, "gaps": 0,
                     "latency_ms_p50": rng.uniform(30, 60)} for d in DIRECTIONS}
        recorder.add(server, i * 0.05, Outcome(True) if ok else
                     Outcome(False, "timeout", "setup_timeout"),
                     {"response_ms": rng.uniform(2, 20), "setup_ms": rng.uniform(150, 400)},
                     media if ok else {}, path=PATH if ok else (),
                     hops=HOPS if ok else None, links=LINKS if ok else None)
    run = {"rate": 20, "duration_s": 10, "media": "full", "valid": True, "scheduled": 200,
           "started": 200, "skipped_cap": 0, "skipped_no_devices": 0, "late_starts": 0,
           "max_concurrent_seen": 4, "offset_s": 0.0, "figures": recorder.summary(),
           "timeseries": recorder.timeseries(), "probe": {"loop_lag_ms_p99": 2.0},
           "schedule_error_ms": {"p99": 1.0}}
    summary = build("load", [run], ["lower-a", "lower-b", "upper"], Objective(),
                    {"lower-a": [], "lower-b": []}, 1.0)
    track = ServerTrack("http://lower-a")
    for t, started in ((0.0, 0), (10.0, 100)):
        track.add(parse(f"relay_calls_started_total{{server=\"lower-a\"}} {started}\n"
                        f"process_resident_memory_bytes 9e7\n"), t)
    summary["server_metrics"] = {"lower-a": track.summary(),
                                 "ghost": ServerTrack("http://ghost", failed=2,
                                                      error="ghost: refused").summary()}
    return summary


def test_report_renders_in_chromium_with_its_plots(tmp_path: Path):
    write_summary(tmp_path, a_summary())
    assert {p.name for p in tmp_path.iterdir()} >= {FILES["summary"], FILES["timeseries"],
                                                    FILES["report"]}
    rows = list(csv.DictReader((tmp_path / FILES["timeseries"]).open()))
    assert len(rows) == 10 and int(rows[0]["calls"]) == 20
    assert json.loads((tmp_path / FILES["summary"]).read_text())["figures"]["total"]["calls"] \
        == 200
    url = (tmp_path / FILES["report"]).as_uri()
    dom = browser.run(url, "--dump-dom")
    assert dom.count('<svg class="plot"') == 4  # two bar charts, two time series
    assert dom.count("<polyline") >= 5 and dom.count('class="bar"') >= 12
    assert "no data" not in dom
    assert "What the servers said" in dom and "relay_calls_started_total: 100" in dom
    assert "unreadable: ghost: refused" in dom
    # the path drawn as a row of hops; the slow upper marked as the bottleneck by latency,
    # the link into lower-b (3 % lost) by loss
    assert "lower-a → upper → lower-b" in dom
    assert dom.count("class=\"hop bottleneck\" title=\"upper\"") == 1
    assert dom.count("class=\"link bottleneck\" title=\"lower-b - upper\"") == 1
    assert "bottleneck: lost" in dom and "loss 2.91%" in dom
    # the upper server's calls' transit p99 (27 ms) is past the give-way limit: its tail marked
    assert dom.count("transit tail") == 1
    shot = browser.screenshot(url, tmp_path / "shot.png")
    with av.open(str(shot)) as container:
        picture = next(container.decode(video=0)).to_ndarray(format="rgb24")
    colored = np.abs(picture.astype(int) - picture.mean(axis=2, keepdims=True)).sum(axis=2) > 60
    assert colored.mean() > 0.01  # the plots' colours are on screen, not a blank page


def test_probe_merge_adds_two_probes_results(tmp_path: Path):
    import subprocess
    import sys

    for name in ("p1", "p2"):
        write_summary(tmp_path / name, a_summary())
    done = subprocess.run([sys.executable, "-m", "probe", "merge", str(tmp_path / "p1"),
                           str(tmp_path / "p2"), "--out", str(tmp_path / "merged"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    out = json.loads(done.stdout)
    assert out["merged_from"] == 2
    assert out["figures"]["total"]["calls"] == 400
    one = a_summary()["figures"]["total"]["phases"]["response_ms"]
    assert out["figures"]["total"]["phases"]["response_ms"]["p50"] == one["p50"]  # same data
    assert (tmp_path / "merged" / FILES["report"]).exists()
    assert out["server_metrics"]["lower-a"]["counters"] == {"relay_calls_started_total": 100}
    bad = subprocess.run([sys.executable, "-m", "probe", "merge", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "nope" in bad.stderr
