"""The aiortc/aioice internals rtc/adapter.py relies on are still there, and do what we need."""

from __future__ import annotations

from rtc.adapter import (
    MediaSettings,
    check_internals,
    new_peer_connection,
    restrict_host_candidates,
)


def test_internals_present():
    assert check_internals() == []


async def test_host_candidates_only_on_given_addresses():
    pc = new_peer_connection(MediaSettings(addresses=("127.0.0.1",)))
    try:
        pc.addTransceiver("audio")
        pc.addTransceiver("video")
        restrict_host_candidates(pc, ["127.0.0.1"])
        await pc.setLocalDescription(await pc.createOffer())
        candidates = [line for line in pc.localDescription.sdp.splitlines()
                      if line.startswith("a=candidate:")]
        assert candidates, pc.localDescription.sdp
        assert all(" 127.0.0.1 " in c for c in candidates), candidates
        assert not any("srflx" in c for c in candidates)  # no STUN server asked
    finally:
        await pc.close()


async def test_instance_internals_present_on_a_live_peer_connection():
    from rtc.adapter import check_instance_internals

    pc = new_peer_connection(MediaSettings(addresses=("127.0.0.1",)))
    try:
        pc.addTransceiver("audio")
        pc.addTransceiver("video")
        assert check_instance_internals(pc) == []
    finally:
        await pc.close()
