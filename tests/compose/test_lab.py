"""Integration tests across containers (docker-compose.yml), each asserting on the probe's
results: calls across servers, a lower server killed mid-call, the upper server paused, packet
loss on a trunk, a device container restarted."""

from __future__ import annotations

import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Lab

pytestmark = pytest.mark.compose

CROSS = "lower-a/cam-1:lower-b/cam-101"


def test_a_cross_server_calls_carry_media_both_ways(lab: Lab):
    status, summary, calls = lab.probe("a", "load", "--rate", "0.5", "--duration", "8",
                                       "--hold", "3", "--pairing", "every-pair")
    assert status == 0, summary
    servers = summary["figures"]["servers"]
    assert set(servers) == {"lower-a", "lower-b"}
    for name, figures in servers.items():
        assert figures["calls"] >= 2 and figures["success_rate"] == 1.0, (name, figures)
        for phase in ("response_ms", "server_time_ms", "setup_ms", "media_latency_ms"):
            assert figures["phases"][phase]["p50"] > 0, (name, phase)
    assert len(calls) == 4
    for call in calls:
        assert call["ok"], call
        for direction in ("caller_to_callee", "callee_to_caller"):
            media = call["media"][direction]
            assert media["frames"] > 20 and media["latency_ms_p50"] < 500, media
            # across containers too: the tone's marks, lip sync and the score of a clean call
            assert media["audio_marks"] >= 2 and media["mos"] >= 4.0, media
            assert abs(media["av_sync_ms"]) <= 40, media
    # the probe read each container's /metrics over the run: four calls through every server
    for name, seen in summary["server_metrics"].items():
        assert seen["failed_scrapes"] == 0, (name, seen)
        assert seen["counters"]["relay_calls_started_total"] >= 4, (name, seen)
        assert seen["counters"]["relay_forwarded_packets_total"] > 100, (name, seen)
    assert set(summary["server_metrics"]) == {"upper", "lower-a", "lower-b"}
    print("\n(a)", {n: {"response_p50": f["phases"]["response_ms"]["p50"],
                        "setup_p50": f["phases"]["setup_ms"]["p50"],
                        "media_latency_p50": f["phases"]["media_latency_ms"]["p50"],
                        "frame_loss": f["media"]["frame_loss"],
                        "audio_latency_p50": f["phases"]["audio_latency_ms"]["p50"],
                        **{k: f["quality"][k] for k in ("mos", "psnr_db", "ssim", "av_sync_ms")}}
                    for n, f in servers.items()})


def test_e_a_restarted_device_container_registers_again(lab: Lab):
    lab.compose("restart", "-t", "2", "devices-a")
    lab.wait_for(lambda: lab.devices_registered() < 6, 20, "devices-a to go")
    lab.wait_devices(timeout=60)
    status, summary, calls = lab.probe("e", "load", "--pairing", "explicit", "--pair", CROSS,
                                       "--rate", "1", "--duration", "1", "--hold", "2")
    assert status == 0 and len(calls) == 1 and calls[0]["ok"], (summary, calls)


def _active_calls(lab: Lab, server: str) -> int:
    return len(lab.get(server, "/v1/calls")["calls"])


def test_b_lower_b_killed_mid_call(lab: Lab):
    probe = lab.probe_background(
        "b", "load", "--pairing", "explicit", "--pair", CROSS,
        "--pair", "lower-a/cam-2:lower-a/cam-3", "--rate", "2", "--duration", "1",
        "--hold", "15", "--setup-timeout", "10")
    try:
        lab.wait_for(lambda: _active_calls(lab, "lower-a") == 2 and all(
            c["state"] == "active" for c in lab.get("lower-a", "/v1/calls")["calls"]), 30,
            "both calls up at lower-a")
        killed_at = time.time()
        lab.compose("kill", "lower-b")
        lab.wait_for(lambda: _active_calls(lab, "lower-a") == 1, 5,
                     "the call through lower-b to end at lower-a")
        probe.communicate(timeout=60)
    finally:
        if probe.poll() is None:
            probe.kill()
    calls = {c["callee"]: c for c in lab.calls("b")}
    cross, local = calls["lower-b/cam-101"], calls["lower-a/cam-3"]
    assert cross["failure"] == "dropped", cross
    assert cross["timeline"]["t_end"] - killed_at < 5, cross
    assert local["ok"] and local["reason"] == "hangup", local  # lower-a's own call untouched
    lab.compose("up", "-d", "lower-b")
    lab.wait_devices(timeout=60)
    status, summary, calls = lab.probe("b2", "load", "--pairing", "explicit", "--pair", CROSS,
                                       "--rate", "1", "--duration", "1", "--hold", "2")
    assert status == 0 and calls[0]["ok"], (summary, calls)


def _idle(lab: Lab) -> bool:
    """No call and no media leg left on any server."""
    for server in ("upper", "lower-a", "lower-b"):
        if lab.get(server, "/v1/calls")["calls"]:
            return False
        for family in text_string_to_metric_families(lab.get(server, "/metrics")):
            if family.name == "relay_legs" and any(s.value for s in family.samples):
                return False
    return True


def test_c_upper_paused(lab: Lab):
    # Start from a quiet tree: what the test before left (a call still ending, lower-b's
    # directory settling) must not be what the pause freezes.
    lab.wait_devices(timeout=60)
    lab.wait_for(lambda: _idle(lab), 30, "no call or leg left on any server")
    lab.compose("pause", "upper")
    try:
        paused = time.monotonic()
        status, summary, calls = lab.probe(
            "c", "load", "--server", "http://lower-a:8080", "--server", "http://lower-b:8080",
            "--pairing", "explicit", "--pair", CROSS, "--rate", "1", "--duration", "2",
            "--hold", "1", "--request-timeout", "5")
        took = time.monotonic() - paused
    finally:
        lab.compose("unpause", "upper")
    assert took < 25, took  # nothing hung
    assert status == 1 and calls, summary
    for call in calls:
        assert call["failure"] in ("timeout", "server_unreachable"), call
        assert call["failure_detail"], call
    # After the pause: no call and no leg left anywhere, and calls work again.
    lab.wait_devices(timeout=60)
    lab.wait_for(lambda: _idle(lab), 30, "no call or leg left on any server")
    status, summary, calls = lab.probe("c2", "load", "--pairing", "explicit", "--pair", CROSS,
                                       "--rate", "1", "--duration", "1", "--hold", "2")
    assert status == 0 and calls[0]["ok"], (summary, calls)


def test_d_packet_loss_on_a_trunk(lab: Lab):
    pid = lab.inspect("lower-a", "{{.State.Pid}}")
    upper_ip = lab.inspect("upper", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
    rule = ["INPUT", "-p", "udp", "-s", upper_ip, "-m", "statistic", "--mode", "random",
            "--probability", "0.05", "-j", "DROP"]
    subprocess.run(["nsenter", "-t", pid, "-n", "iptables", "-I", *rule], check=True)
    try:
        _, summary, calls = lab.probe(
            "d", "load", "--pairing", "explicit", "--pair", "lower-b/cam-102:lower-a/cam-2",
            "--rate", "0.5", "--duration", "4", "--hold", "8", "--max-loss", "none")
        dropped = subprocess.run(["nsenter", "-t", pid, "-n", "iptables", "-L", "INPUT", "-v",
                                  "-x", "-n"], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["nsenter", "-t", pid, "-n", "iptables", "-D", *rule], check=False)
    assert calls and all(c["ok"] for c in calls), calls  # video recovered: media both ways
    figures = summary["figures"]["servers"]["lower-b"]
    media = figures["media"]
    assert media["frame_loss"] is not None and media["freeze_ratio"] is not None, media
    packets_dropped = int(dropped.splitlines()[2].split()[0])
    assert packets_dropped > 20, dropped  # the rule did drop trunk packets
    metrics = {s.name: s.value for f in text_string_to_metric_families(
        lab.get("lower-a", "/metrics")) for s in f.samples}
    upper = {s.name: s.value for f in text_string_to_metric_families(
        lab.get("upper", "/metrics")) for s in f.samples}
    assert metrics["relay_nacks_sent_total"] > 0  # loss repaired hop by hop
    assert upper["relay_retransmissions_total"] > 0  # ... from the upper server's history
    for direction in ("caller_to_callee", "callee_to_caller"):
        assert calls[0]["media"][direction]["fps"] > 10, calls[0]["media"]
    # What a person in the call would notice. The drop is on what lower-a takes in from the
    # upper server: the caller's media toward the callee (lower-a/cam-2). Its video is
    # repaired hop by hop (NACK/RTX), its audio is not: frames lost, and the call score falls
    # there while the other direction keeps a clean call's.
    lossy, clean = (calls[0]["media"][d] for d in ("caller_to_callee", "callee_to_caller"))
    assert lossy["audio_frames_lost"] > 0 and clean["audio_frames_lost"] == 0, (lossy, clean)
    assert lossy["mos"] is not None and clean["mos"] is not None, (lossy, clean)
    assert clean["mos"] >= 4.0 and lossy["mos"] < clean["mos"] - 0.5, (lossy, clean)
    assert lossy["psnr_db"] is not None and lossy["psnr_db"] > 25, lossy
    quality = summary["figures"]["servers"]["lower-b"]["quality"]
    print("\n(d)", {"frame_loss": media["frame_loss"], "freeze_ratio": media["freeze_ratio"],
                    "freezes_per_minute": media["freezes_per_minute"],
                    "trunk packets dropped": packets_dropped,
                    "nacks_sent_lower_a": metrics["relay_nacks_sent_total"],
                    "retransmissions_upper": upper["relay_retransmissions_total"],
                    "quality": {k: quality[k] for k in ("mos", "psnr_db", "av_sync_ms")},
                    **{d: {k: calls[0]["media"][d].get(k) for k in (
                        "mos", "psnr_db", "ssim", "audio_frames_lost", "audio_marks_lost",
                        "audio_latency_ms_p50", "audio_latency_ms_p95", "av_sync_ms",
                        "latency_ms_p50")} for d in ("caller_to_callee", "callee_to_caller")}})


def test_the_webcam_override_is_valid_compose(lab: Lab):
    """No camera here to run it with; both files must still merge into a valid configuration
    that maps the devices and sets the capture sources."""
    merged = lab.compose("-f", "docker-compose.yml", "-f", "docker-compose.webcam.yml",
                         "config").stdout
    assert "/dev/video0:/dev/video0" in merged and "/dev/snd:/dev/snd" in merged
    assert "v4l2:/dev/video0:640x480@30" in merged and "alsa:default" in merged
