"""Congestion control end to end, against a real narrow link: the trunk upper - lower-a limited
to 400 kbit/s each way (tbf on the veth of a network namespace the test makes and removes, see
tests/faults.py), synthetic devices encoding live. With the servers' congestion control on, the
sender follows the narrowest link and the call carries its video without loss; with it off,
nothing is reported to the sender (the baseline)."""

from __future__ import annotations

import aiohttp
import pytest

from lab.stack import LocalStack, StackSettings
from probe.calls import run_call
from wire.client import discover, pick_pair

from .faults import split_lab

pytestmark = pytest.mark.e2e

LIMIT_KBPS = 400
CALLER, CALLEE = "lower-b/cam-b", "lower-a/cam-a"  # the probe reads lower-b: off the veth


async def test_the_sender_follows_a_narrow_trunk_and_the_call_loses_nothing():
    async with split_lab(video="synthetic", size="640x480") as (ns, session, servers):
        ns.limit_rate(LIMIT_KBPS)
        result = await run_call(session, servers, CALLER, CALLEE, 20.0, sample_s=1.0)
    assert result.ok, result.to_dict()["reason"]
    series = result.series["caller_to_callee"]
    sent = [(r["t_s"], r["sent_kbps"] + r["audio_kbps"]) for r in series
            if r["sent_kbps"] is not None and r["audio_kbps"] is not None]
    # under the limit within 10 s, and from then on
    assert sent and all(kbps < LIMIT_KBPS for t, kbps in sent if t >= 10), sent
    # after that, the video arrives whole: under 2 % of frames lost, under 2 % freezes
    after = [r for r in series if r["t_s"] >= 10 and r["frames"] is not None]
    frames = sum(r["frames"] for r in after)
    lost = sum(r["frames_lost"] for r in after)
    assert frames > 20 * len(after), after  # still about 30 fps
    assert lost / (frames + lost) < 0.02, after
    assert sum(r["gaps"] for r in after) / frames < 0.02, after
    # the sender was told, it took it, and the probe says which link held it back
    limit = result.rate["caller_to_callee"]
    assert limit is not None and limit["sender_adapts"] is True, limit
    assert limit["kbps"] < LIMIT_KBPS, limit
    # the hop past the narrow trunk found its queue growing; the hops before it did not
    assert (limit["link"], limit["by"]) == ("upper -> lower-a", "queue"), limit
    target = result.senders["caller_to_callee"]["target_kbps"]
    assert target is not None and target < LIMIT_KBPS, result.senders
    assert result.not_adapting == []


async def test_with_congestion_control_off_nothing_is_reported_upstream():
    settings = StackSettings(devices=1, size="320x240", server_args=("--congestion-control",
                                                                      "off"))
    async with LocalStack(settings) as stack, aiohttp.ClientSession() as session:
        servers = await discover(session, stack.urls)
        result = await run_call(session, servers, *pick_pair(servers), 4.0)
    assert result.ok, result.to_dict()["reason"]
    for hop in result.hops:
        video = hop["streams"]["caller_to_callee"]["video"]
        assert video["reported_kbps"] is None and video["estimate_kbps"] is None, video
    assert result.rate == {"caller_to_callee": None, "callee_to_caller": None}
    # the devices' encoders stayed where they start (endpoint/bitrate.py DEFAULT_START)
    assert {d: s["target_kbps"] for d, s in result.senders.items()} == {
        "caller_to_callee": 300.0, "callee_to_caller": 300.0}
