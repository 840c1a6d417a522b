"""benchmarks/forwarding.py runs, prints its JSON contract, and shows forwarding beating
transcoding (a short run: the figures in the notes come from the default, longer one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "forwarding.py"
KEYS = {"cpu_pct_per_stream", "added_latency_ms_p50", "added_latency_ms_p95", "fps",
        "frames_lost"}


def test_forwarding_benchmark_json():
    done = subprocess.run([sys.executable, str(SCRIPT), "--streams", "2", "--seconds", "4",
                           "--warmup", "2", "--scale-streams", "4", "--json"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    for mode in ("direct", "transcode", "forward"):
        assert KEYS <= set(out[mode]), (mode, out[mode])
    forward, transcode = out["forward"], out["transcode"]
    assert forward["fps"] > 25 and forward["frames_lost"] <= 2
    # one call: audio and video, each way
    assert forward["transcoded_tracks"] == 0 and transcode["transcoded_tracks"] == 4
    assert 0 < forward["cpu_pct_per_stream"] < transcode["cpu_pct_per_stream"] / 3
    assert forward["added_latency_ms_p50"] < 10
    scale = out["forward_at_scale"]
    assert scale["streams"] == 4
    for mode in ("direct", "forward"):
        assert KEYS <= set(scale[mode]), (mode, scale[mode])
        assert scale[mode]["fps"] > 25 and scale[mode]["frames_lost"] <= 2, scale[mode]
    assert scale["forward"]["cpu_pct_per_stream"] > 0
    assert 0 <= scale["forward"]["added_latency_ms_p50"] < 5  # a packet-level hop
