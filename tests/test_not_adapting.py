"""The probe's word on senders that cannot follow the path's rate: from the device
(pre-encoded, packets) or from the server that read the sender's description (rtc/sdp.py)."""

from __future__ import annotations

from probe.__main__ import describe_rate
from probe.calls import CallResult


def test_the_probe_says_why_a_direction_cannot_adapt() -> None:
    """A server's cannot_adapt reaches the probe's not_adapting_why and its console line; a
    one-way call speaks only of the direction it carries."""
    hop = {"server": "lower-b", "streams": {"callee_to_caller": {"video": {
        "cannot_adapt": "the sender's description has no abs-send-time"}}}}
    result = CallResult(caller="lower-a/cam-1", callee="lower-b/gst-1", server="lower-a",
                        hops=[hop], senders={"caller_to_callee": {"adapts": False}})
    assert result.not_adapting == ["caller_to_callee", "callee_to_caller"]
    assert "pre-encoded" in result.not_adapting_why["caller_to_callee"]
    assert result.not_adapting_why["callee_to_caller"].startswith("lower-b: ")
    lines = describe_rate(result)
    assert len(lines) == 2 and "abs-send-time" in lines[1] and "cannot adapt" in lines[0]
    result.directions = ("callee_to_caller",)
    assert len(describe_rate(result)) == 1
