"""Devices built from docs/protocol.md alone (tests/outside_device.py), in a real tree: an answer
that cannot carry the call is refused at once with its reason, and a sender whose description
cannot be steered is named in the call's figures and the probe's ``not_adapting``."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import pytest

from probe.calls import CallResult
from wire.messages import CallInfo

from .conftest import Tree, make_tree
from .outside_device import OutsideDevice

pytestmark = pytest.mark.e2e


def _in_video(edit: Callable[[str], str]) -> Callable[[str], str]:
    """Apply ``edit`` to the video section of an SDP only."""
    def spoil(sdp: str) -> str:
        head, sep, video = sdp.partition("m=video")
        return head + sep + edit(video)
    return spoil


SPOILED = {
    "recvonly": (_in_video(lambda s: s.replace("a=sendrecv", "a=recvonly")), "recvonly"),
    "inactive": (_in_video(lambda s: s.replace("a=sendrecv", "a=inactive")), "inactive"),
    "rejected": (_in_video(lambda s: re.sub(r"^ \d+ ", " 0 ", s)), "rejected the m-line"),
    "no_codec": (_in_video(lambda s: s.replace("VP8/90000", "VP9/90000")
                           .replace("H264/90000", "AV1/90000")), "no codec in common"),
}


async def _outside(tree: Tree, server: str, name: str,
                   edit: Callable[[str], str] | None = None) -> OutsideDevice:
    device = OutsideDevice(tree.lowers[server].url, name, edit)
    tree.tasks.append(asyncio.create_task(device.run(tree.session)))
    await asyncio.wait_for(device.registered.wait(), 10)
    await tree.until(lambda: tree.known(f"{server}/{name}"), 10, f"{name} known")
    return device


async def _call(tree: Tree, caller: str, callee: str) -> str:
    async with tree.session.post(f"{tree.lowers['lower-a'].url}/v1/calls",
                                 json={"caller": caller, "callee": callee}) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["call"])


async def _wait(tree: Tree, call: str, state: str, timeout: float) -> CallInfo:
    url = f"{tree.lowers['lower-a'].url}/v1/calls/{call}?wait={state}&timeout={timeout}"
    async with tree.session.get(url) as r:
        return CallInfo.from_dict(await r.json())


@pytest.mark.parametrize("spoil", sorted(SPOILED))
async def test_an_answer_that_cannot_carry_the_call_ends_it_at_once(spoil: str) -> None:
    edit, words = SPOILED[spoil]
    async with make_tree() as tree:
        await tree.add_device("lower-a", "cam-1")
        odd = await _outside(tree, "lower-b", "odd", edit)
        try:
            started = time.monotonic()
            call = await _call(tree, "lower-a/cam-1", "lower-b/odd")
            info = await _wait(tree, call, "ended", 10)
            took = time.monotonic() - started
            assert info.state == "ended" and info.reason == "unusable_answer", info
            assert info.detail and words in info.detail and "lower-b" in info.detail, info.detail
            assert took < 5, f"ended after {took:.1f} s: a timeout, not a refusal"
            errors = odd.got("error")
            assert errors and errors[0]["code"] == "unusable_answer", odd.received
            assert errors[0]["ref"] == "answer" and errors[0]["call"] == call
            assert words in errors[0]["message"]
            assert odd.got("hangup")[0]["reason"] == "unusable_answer"
            for node in tree.servers.values():  # nothing left behind anywhere
                await tree.until(lambda n=node: not n.media.calls, 5, f"{node.name} idle")
        finally:
            await odd.close()


async def test_a_sender_without_abs_send_time_is_named_as_not_adapting() -> None:
    no_abs = _in_video(lambda s: re.sub(r"a=extmap:\d+ \S*abs-send-time\r\n", "", s))
    async with make_tree() as tree:
        await tree.add_device("lower-a", "cam-1")
        odd = await _outside(tree, "lower-b", "odd", no_abs)
        try:
            call = await _call(tree, "lower-a/cam-1", "lower-b/odd")
            info = await _wait(tree, call, "active", 15)
            assert info.state == "active", info
            assert odd.frames > 0
            await asyncio.sleep(2.5)  # hop figures, a second apart
            async with tree.session.get(f"{tree.lowers['lower-a'].url}/v1/calls/{call}") as r:
                info = CallInfo.from_dict(await r.json())
            by_server = {h.server: h for h in info.hops}
            video = by_server["lower-b"].streams["callee_to_caller"]["video"]
            assert video.cannot_adapt and "abs-send-time" in video.cannot_adapt
            assert by_server["lower-b"].streams["caller_to_callee"]["video"].cannot_adapt is None
            result = CallResult(call=call, caller=info.caller, callee=info.callee,
                                server="lower-a", hops=[h.to_dict() for h in info.hops])
            assert result.not_adapting == ["callee_to_caller"]
            assert "lower-b" in result.not_adapting_why["callee_to_caller"]
        finally:
            await odd.close()
