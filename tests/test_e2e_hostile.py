"""Hostile or broken peers against a real tree (upper, lower-a, lower-b, auth on), over real
sockets: each class of misbehaviour is refused with its reason, and costs the others nothing:
the trunks stay the same links (no reconnect), and a call in progress between two other devices
goes on. The signalling core's side of it is a property test (tests/test_hostile.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from relay.admission import Limits
from relay.effects import Link
from wire.auth import Auth, probe_identity
from wire.client import discover
from wire.credentials import Credentials
from wire.links import INVALID_BURST
from wire.messages import MAX_MESSAGE_BYTES

from .conftest import Tree, make_tree

pytestmark = pytest.mark.e2e

AUTH = Auth(secret=b"hostile-test-secret")


def ws_url(url: str, path: str) -> str:
    return url.replace("http://", "ws://") + path


class Witness:
    """A call between two honest devices, and the trunks as they were when it came up."""

    def __init__(self, tree: Tree, call: str) -> None:
        self.tree, self.call = tree, call
        self.trunks = {name: tree.upper.channels[Link("child", name)] for name in tree.lowers}

    def unharmed(self) -> None:
        for name, channel in self.trunks.items():
            assert self.tree.upper.channels.get(Link("child", name)) is channel, \
                f"{name}'s trunk was replaced"
            assert channel.open
        for node in self.tree.servers.values():
            call = node.find_call(self.call)
            assert call is not None and call.state.value == "active", (node.name, call)


@pytest.fixture
async def lab(monkeypatch) -> AsyncIterator[tuple[Tree, Witness]]:
    monkeypatch.setenv("VPHONE_AUTH_SECRET", AUTH.secret.decode())  # the devices sign with it
    limits = Limits(max_directory_devices=1000, max_trunk_rate=50)
    async with make_tree(auth=AUTH, options={"first_message_s": 1.0, "limits": limits}) as tree:
        await tree.add_device("lower-a", "cam-1")
        await tree.add_device("lower-b", "cam-2")
        await tree.add_device("lower-a", "cam-3")
        await tree.add_device("lower-b", "cam-4")
        async with tree.session.post(f"{tree.lowers['lower-a'].url}/v1/calls", json={
                "caller": "lower-a/cam-1", "callee": "lower-b/cam-2",
                "media_mode": "none"}) as r:
            assert r.status == 201, await r.text()
            call = (await r.json())["call"]
        async with tree.session.get(f"{tree.lowers['lower-a'].url}/v1/calls/{call}"
                                    "?wait=active&timeout=5") as r:
            assert (await r.json())["state"] == "active"
        yield tree, Witness(tree, call)


async def refusals(tree: Tree, name: str) -> dict[str, int]:
    return dict(tree.servers[name].core.counters.refusals)


async def replies(ws: aiohttp.ClientWebSocketResponse, timeout: float = 3.0
                  ) -> tuple[list[dict[str, Any]], aiohttp.WSMessage | None]:
    """Every message until the link closes (or ``timeout``), and the close frame."""
    got: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    got.append(json.loads(msg.data))
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                  aiohttp.WSMsgType.CLOSING):
                    return got, msg
    except TimeoutError:
        return got, None


async def test_a_device_s_registers_are_bounded_and_cost_the_tree_nothing(lab):
    tree, witness = lab
    url = ws_url(tree.lowers["lower-a"].url, "/v1/device")
    token = AUTH.token("device:cam-9")
    bad = {
        "long id": {"type": "register", "device": "x" * 65, "token": token},
        "duplicate codecs": {"type": "register", "device": "cam-9", "token": token,
                             "codecs": ["video/VP8", "video/VP8"]},
        "unknown codec": {"type": "register", "device": "cam-9", "token": token,
                          "codecs": ["video/AV1"]},
        "padding field": {"type": "register", "device": "cam-9", "token": token,
                          "pad": "x" * 200_000},
        "newline id": {"type": "register", "device": "cam-9\n", "token": token},
    }
    for what, message in bad.items():
        async with tree.session.ws_connect(url, max_msg_size=0) as ws:
            await ws.send_str(json.dumps(message))
            got, _ = await replies(ws, 2.0)
        assert got and got[0]["type"] == "error" and got[0]["code"] == "bad_message", (what, got)
    # an empty token is no token
    async with tree.session.ws_connect(url) as ws:
        await ws.send_str(json.dumps({"type": "register", "device": "cam-9", "token": ""}))
        got, _ = await replies(ws, 2.0)
    assert got[0]["code"] == "unauthorized", got
    # exactly 256 KiB is "at most 256 KiB": taken; one byte more closes the link (1009)
    exact = json.dumps({"type": "register", "device": "cam-9", "token": token})
    exact = exact[:-1] + " " * (MAX_MESSAGE_BYTES - len(exact)) + "}"
    assert len(exact.encode()) == MAX_MESSAGE_BYTES
    async with tree.session.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_str(exact)
        got, _ = await replies(ws, 1.0)
        assert got and got[0]["type"] == "registered", got
    async with tree.session.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_str(exact + " ")
        got, closed = await replies(ws, 2.0)
    assert closed is not None and ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    witness.unharmed()


async def test_junk_frames_close_the_link_with_a_reason(lab):
    tree, witness = lab
    url = ws_url(tree.lowers["lower-a"].url, "/v1/device")
    before = (await refusals(tree, "lower-a")).get("too_many_invalid", 0)
    # a registered device that sends junk: one error per frame up to the burst, then closed
    async with tree.session.ws_connect(url) as ws:
        await ws.send_str(json.dumps({"type": "register", "device": "junk",
                                      "token": AUTH.token("device:junk")}))
        assert json.loads((await ws.receive(timeout=2)).data)["type"] == "registered"
        for i in range(200):
            await ws.send_str("{not json" if i % 2 else '{"type": "nonsense"}')
        got, closed = await replies(ws)
    errors = [m for m in got if m["type"] == "error"]
    assert INVALID_BURST <= len(errors) <= INVALID_BURST + 2, len(errors)
    assert errors[-1]["code"] == "too_many_invalid"
    assert closed is not None and ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    # junk before the first message: closed too, without registering
    async with tree.session.ws_connect(url) as ws:
        for _ in range(100):
            await ws.send_str("[]")
        got, closed = await replies(ws)
    assert closed is not None and len(got) == INVALID_BURST
    assert (await refusals(tree, "lower-a"))["too_many_invalid"] == before + 1
    await tree.until(lambda: "lower-a/junk" not in tree.upper.directory.devices, 5,
                     "the junk device gone from the directory")
    witness.unharmed()


async def test_a_link_that_never_registers_is_closed_though_it_answers_pings(lab):
    tree, witness = lab
    loop = asyncio.get_running_loop()
    links = []
    for name, path in (("lower-a", "/v1/device"), ("upper", "/v1/trunk")):
        started = loop.time()
        # heartbeat: the client pings and answers pings all along; that must not keep it open
        async with tree.session.ws_connect(ws_url(tree.servers[name].url, path),
                                           heartbeat=0.2) as ws:
            _, closed = await replies(ws, 5.0)
        links.append((name, closed is not None, loop.time() - started, ws.close_code))
    for name, closed, after_s, code in links:
        assert closed and 0.8 < after_s < 3.0, (name, after_s)
        assert code == aiohttp.WSCloseCode.POLICY_VIOLATION
    witness.unharmed()


async def announce(tree: Tree, name: str, url: str = "http://127.0.0.1:1") -> tuple[
        aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    ws = await tree.session.ws_connect(ws_url(tree.upper.url, "/v1/trunk"), max_msg_size=0)
    await ws.send_str(json.dumps({"type": "announce", "server": name, "url": url,
                                  "role": "lower", "version": 2,
                                  "token": AUTH.token(f"server:{name}")}))
    reply = json.loads((await ws.receive(timeout=3)).data)
    return ws, reply


async def test_a_server_speaks_only_for_its_own_subtree(lab):
    tree, witness = lab
    upper = tree.upper
    # a URL that is not one: refused before anything is kept
    for url in ("javascript:alert(1)", "", "http://x\x00y", "http://" + "a" * 3000):
        ws, reply = await announce(tree, "lower-x", url)
        await ws.close()
        assert reply["type"] == "error" and reply["code"] == "bad_message", (url, reply)
    ws, reply = await announce(tree, "lower-x")
    try:
        assert reply["type"] == "welcome"
        await tree.until(lambda: upper.directory.server("lower-x") is not None, 5, "lower-x")
        # a call for a caller under another lower server: turned away, nobody woken
        await ws.send_str(json.dumps({
            "type": "call_setup", "call": "forged-1", "caller": "lower-a/cam-3",
            "callee": "lower-b/cam-4", "path": ["lower-a", "lower-x"]}))
        got, _ = await replies(ws, 1.0)
        hangups = [m for m in got if m["type"] == "hangup"]
        assert hangups and hangups[0]["reason"] == "not_yours", got
        assert tree.lowers["lower-b"].directory.own["cam-4"].state == "idle"
        assert tree.lowers["lower-b"].find_call("forged-1") is None
        # devices and servers that are another's: each entry refused, the link stays
        await ws.send_str(json.dumps({
            "type": "directory",
            "devices": [{"id": "cam-1", "server": "lower-a"}, {"id": "cam-7", "server": "lower-x"}],
            "devices_removed": ["lower-b/cam-2"], "servers_removed": ["lower-a"]}))
        got, _ = await replies(ws, 1.0)
        assert any(m["type"] == "error" and m["code"] == "not_yours" for m in got), got
        await tree.until(lambda: "lower-x/cam-7" in upper.directory.devices, 3, "its own device")
        assert upper.directory.devices["lower-a/cam-1"].server == "lower-a"
        assert "lower-b/cam-2" in upper.directory.devices
        assert not ws.closed
    finally:
        await ws.close()
    await tree.until(lambda: upper.directory.server("lower-x") is None, 5, "lower-x gone")
    witness.unharmed()


async def test_a_flood_of_devices_from_a_fake_lower_costs_the_real_ones_nothing(lab):
    tree, witness = lab
    upper = tree.upper
    ws, reply = await announce(tree, "lower-flood")
    try:
        assert reply["type"] == "welcome"
        # 10,000 devices at once, in 500-entry messages as fast as the socket takes them
        for batch in range(20):
            await ws.send_str(json.dumps({"type": "directory", "devices": [
                {"id": f"d{batch}-{i}", "server": "lower-flood"} for i in range(500)]}))
        got, _ = await replies(ws, 2.0)
        codes = {m["code"] for m in got if m["type"] == "error"}
        assert "server_full" in codes, codes  # past max_directory_devices (1000 here)
        flood = sum(1 for i in upper.directory.devices.values() if i.server == "lower-flood")
        assert flood <= 1000
        # more messages a second than the trunk rate (50 here): the excess is dropped, said so
        for i in range(300):
            await ws.send_str(json.dumps({"type": "heartbeat", "seq": i}))
        got, _ = await replies(ws, 1.5)
        assert any(m["type"] == "error" and m["code"] == "rate_limited" for m in got)
        assert sum(1 for m in got if m["type"] == "heartbeat") < 300
        assert (await refusals(tree, "upper")).get("rate_limited", 0) > 0
        assert not ws.closed
    finally:
        await ws.close()
    # the real lower servers kept their trunks; their devices are all still known
    for address in ("lower-a/cam-1", "lower-b/cam-2", "lower-a/cam-3", "lower-b/cam-4"):
        assert address in upper.directory.devices
    await tree.until(lambda: upper.directory.server("lower-flood") is None, 5, "flood gone")
    assert not any(i.server == "lower-flood" for i in upper.directory.devices.values())
    witness.unharmed()


async def test_the_probe_shows_its_token_only_where_it_may(lab, monkeypatch):
    tree, _ = lab
    upper = tree.upper.url
    plain = aiohttp.ClientSession

    async def found(credentials: Credentials, urls: list[str]) -> set[str]:
        credentials.given(urls)
        async with plain(middlewares=(credentials.middleware,)) as session:
            return {s.name for s in await discover(session, urls, credentials)}

    everyone = {"upper", "lower-a", "lower-b"}
    token = AUTH.token(probe_identity())
    # only the all-servers token, only the upper given: the lower servers it found at the
    # URLs the tree announced are not shown the token, and are left out (saying why)
    assert await found(Credentials(token, Auth()), [upper]) == {"upper"}
    assert await found(Credentials(token, Auth(), trust_announced=True), [upper]) == everyone
    assert await found(Credentials(token, Auth()), tree.urls) == everyone
    # with the secret: each server found gets a token good for it alone
    assert await found(Credentials(None, AUTH), [upper]) == everyone
    lower_a, lower_b = tree.lowers["lower-a"].url, tree.lowers["lower-b"].url
    own = {"Authorization": f"Bearer {AUTH.token(probe_identity('lower-a'))}"}
    async with plain() as session:
        async with session.get(f"{lower_a}/v1/devices", headers=own) as r:
            assert r.status == 200
        async with session.get(f"{lower_b}/v1/devices", headers=own) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
