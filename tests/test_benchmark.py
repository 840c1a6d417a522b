"""The benchmarks work: benchmarks/forwarding.py runs and prints its JSON contract (forwarding
decodes nothing, media arrives whole); benchmarks/soak.py runs calls and reads every server back
to idle. These check behaviour only: how fast or how cheap is what the benchmarks print (their
default, longer runs give the figures in the notes), not something a functional test judges."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "forwarding.py"
KEYS = {"cpu_pct_per_stream", "added_latency_ms_p50", "added_latency_ms_p95", "fps",
        "frames_lost"}


def test_forwarding_benchmark_json():
    done = subprocess.run([sys.executable, str(SCRIPT), "--streams", "2", "--seconds", "4",
                           "--warmup", "2", "--scale-streams", "4", "--hop-rounds", "1",
                           "--json"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    for mode in ("direct", "transcode", "forward"):
        assert KEYS <= set(out[mode]), (mode, out[mode])
    forward, transcode = out["forward"], out["transcode"]
    assert forward["fps"] > 25 and forward["frames_lost"] <= 2
    # one call: audio and video, each way; forwarding decodes none of it, transcoding all
    assert forward["transcoded_tracks"] == 0 and transcode["transcoded_tracks"] == 4
    assert forward["cpu_pct_per_stream"] > 0 and transcode["cpu_pct_per_stream"] > 0  # measured
    scale = out["forward_at_scale"]
    assert scale["streams"] == 4
    for mode in ("direct", "forward"):
        assert KEYS <= set(scale[mode]), (mode, scale[mode])
        assert scale[mode]["fps"] > 25 and scale[mode]["frames_lost"] <= 2, scale[mode]
    assert scale["forward"]["cpu_pct_per_stream"] > 0
    cost = out["hop_figures_cost"]  # priced both ways, in the same run
    assert cost["cpu_pct_per_stream_with"] > 0 and cost["cpu_pct_per_stream_without"] > 0
    assert isinstance(cost["added_pct"], float)


def test_soak_benchmark_prints_every_server_s_verdict_and_the_probe_s_memory():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "soak.py"), "--minutes", "0.5",
                           "--window", "10", "--rate", "2", "--json"],
                          capture_output=True, text=True, timeout=300)
    # 30 s is no warm-up: memory is not judged yet; a verdict is given all the same
    assert done.returncode in (0, 1), done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["calls"] >= 50 and out["ok"] == out["calls"], out["failures"]
    assert set(out["servers"]) == {"upper", "lower-a", "lower-b"}
    for name, server in out["servers"].items():
        assert server["verdict"] in ("stable", "unstable"), (name, server)
        assert server["tasks"]["peak"] > server["tasks"]["start"], (name, server)  # mid-load
        assert server["memory_mb"]["end"] > 10
    assert out["invariants_ok"], out  # every server back to idle, every device back
    assert out["probe_memory_mb"]["peak"] > 10


def test_directory_benchmark_shows_what_a_change_costs():
    out = run_json("directory.py", "--lowers", "40", "--devices", "20", "--mids", "3")
    assert out["root"]["devices"] == 40 * 20 + 2
    assert out["root"]["servers"] == out["lower"]["servers_known"] == 1 + 3 + 40 + 2 + 1
    assert out["device_change"]["messages_to_other_lowers"] == 0  # devices never go down
    assert out["server_join"] == {**out["server_join"], "lowers_told": 40,
                                  "entries_per_lower": [1]}  # one entry at every server
    assert out["call"]["state"] == "active"
    assert out["call"]["path"] == ["real-0", "mid-0", "root", "mid-1", "real-1"]


def test_congestion_benchmark_json():
    import os

    if os.geteuid() != 0:
        pytest.skip("the benchmark makes a network namespace: needs root")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "congestion.py"), "--hold", "14",
                           "--json"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    keys = {"limit_kbps", "bitrate_kbps_after_10s", "converge_s", "frame_loss", "freeze_ratio",
            "latency_ms_p50", "latency_ms_p95"}
    for case in ("on", "off"):
        assert keys <= set(out[case]), (case, out[case])
        assert out[case]["limit_kbps"] == 400
    on = out["on"]
    assert on["ok"], on["reason"]  # with congestion control the call lasts
    assert on["converge_s"] is not None and on["converge_s"] <= 10, on
    assert on["bitrate_kbps_after_10s"] < 400, on
    assert on["series"] and all("sent_kbps" in row for row in on["series"])


def run_json(script: str, *args: str, timeout: float = 180) -> dict:
    """Run ``benchmarks/script`` with ``args`` and ``--json``; its JSON (asserting it ran)."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--json"],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_measuring_benchmark_compares_devices_with_and_without_measuring():
    out = run_json("measuring.py", "--rounds", "1", "--seconds", "2", "--warmup", "1.5")
    assert out["runs"] == 4 and len(out["cpu_pct_on_runs"]) == len(out["cpu_pct_off_runs"]) == 2
    assert out["cpu_pct_per_device_on"] > 0 and out["cpu_pct_per_device_off"] > 0
    assert isinstance(out["added_pct"], float)
    on, off = out["measured"], out["measured_off"]
    # on: every figure measured; off: nothing but counting (so the comparison is real)
    assert on["latency_ms_p50"] is not None and on["psnr_db"] is not None, on
    assert on["audio_marks"] >= 1 and on["mos"] is not None, on
    assert off["latency_ms_p50"] is None and off["quality_samples"] == 0, off
    assert off["audio_marks"] == 0 and off["mos"] is None, off
