"""A leg that closes before the call is active ends the call at once, as ``media_failed``,
saying which leg and why, at every server of the path (not after the setup timeout)."""

from __future__ import annotations

import time

import pytest

from relay.call import Timeouts
from wire.client import ServerClient

from .conftest import make_tree

pytestmark = pytest.mark.e2e


async def test_a_leg_closed_during_setup_ends_the_call_media_failed_everywhere():
    async with make_tree(timeouts=Timeouts(setup=30.0)) as tree:
        await tree.add_device("lower-a", "cam-1")
        callee = await tree.add_device("lower-b", "cam-2")
        client = ServerClient(tree.session, tree.lowers["lower-a"].url)
        info = await client.create_call("lower-a/cam-1", "lower-b/cam-2")
        closed_at: list[float] = []

        def watch(pc) -> None:
            @pc.on("connectionstatechange")
            async def changed() -> None:
                # the callee's end of its leg closes as soon as it connects: the call is in
                # setup (no frame decoded yet), and the server sees its DTLS shut down
                if pc.connectionState == "connected" and not closed_at:
                    closed_at.append(time.monotonic())
                    await pc.close()

        await tree.until(lambda: info.call in callee.calls, 10, "the callee woken")
        watch(callee.calls[info.call].pc)
        await tree.until(lambda: bool(closed_at), 10, "the callee's leg connected and closed")
        final = await client.call(info.call, wait="ended", timeout_s=10)
        ended_in = time.monotonic() - closed_at[0]
        assert final.state == "ended" and final.reason == "media_failed", final
        assert ended_in < 2.0, ended_in
        assert "t_first_frame_callee" not in final.timeline  # it never was active
        assert final.detail is not None and "lower-b" in final.detail and "closed" in final.detail
        for name, node in tree.servers.items():  # each server's own record of the call
            seen = await ServerClient(tree.session, node.url).call(info.call)
            assert seen.reason == "media_failed" and seen.detail == final.detail, (name, seen)
