"""Authentication on every link: HMAC credentials checked for devices, trunks and the probe;
a refusal says why (401 no token, 403 wrong token), is counted, and changes nothing."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import aiohttp
import pytest

from endpoint.device import Device
from relay.server import running_server
from relay.settings import ServerSettings
from wire.auth import Auth, token_for

from .conftest import DEVICE_SETTINGS, LOOPBACK, make_tree

SECRET = Auth(b"lab secret")


def test_tokens_prove_one_identity_each(tmp_path):
    assert Auth().check("device:cam-1", None) is None  # off: nothing asked
    token = SECRET.token("device:cam-1")
    assert SECRET.check("device:cam-1", token) is None
    assert SECRET.check("device:cam-2", token)[0] == "forbidden"  # not that device's
    assert SECRET.check("device:cam-1", None)[0] == "unauthorized"
    assert Auth(b"other").check("device:cam-1", token)[0] == "forbidden"
    secret_file = tmp_path / "secret"
    secret_file.write_text("lab secret\n")
    assert Auth.from_env({"VPHONE_AUTH_SECRET_FILE": str(secret_file)}) == SECRET
    assert token_for("probe", None, {"VPHONE_AUTH_SECRET": "lab secret"}) == \
        SECRET.token("probe")
    assert token_for("probe", "given", {}) == "given" and token_for("probe", None, {}) is None


def test_a_rotated_secret_still_verifies_until_it_is_dropped(tmp_path):
    old_token = SECRET.token("device:cam-1")
    secret_file = tmp_path / "secret"
    secret_file.write_text("new secret\n\nlab secret\n")  # the first line signs
    rotating = Auth.from_env({"VPHONE_AUTH_SECRET_FILE": str(secret_file)})
    assert rotating == Auth(b"new secret", (b"lab secret",))
    assert rotating.check("device:cam-1", old_token) is None  # a client not yet moved over
    assert rotating.token("device:cam-1") == Auth(b"new secret").token("device:cam-1")
    assert rotating.check("device:cam-2", old_token)[0] == "forbidden"  # still per identity
    assert Auth(b"new secret").check("device:cam-1", old_token)[0] == "forbidden"  # dropped
    by_env = Auth.from_env({"VPHONE_AUTH_SECRET": "new secret",
                            "VPHONE_AUTH_SECRET_PREVIOUS": "lab secret"})
    assert by_env == rotating
    assert Auth.from_env({"VPHONE_AUTH_SECRET": " "}) == Auth()  # blank: off, not "" as a key


@pytest.mark.e2e
async def test_every_link_checks_its_credential():
    async with make_tree(auth=SECRET) as tree:
        # the trunks came up with their credentials (make_tree waited for both parents)
        good = replace(DEVICE_SETTINGS, token=SECRET.token("device:cam-1"))
        tree.start("lower-a", Device(tree.lowers["lower-a"].url, "cam-1", good))
        tree.start("lower-b", Device(tree.lowers["lower-b"].url, "cam-2", replace(
            DEVICE_SETTINGS, token=SECRET.token("device:cam-2"))))
        await tree.until(lambda: tree.known("lower-b/cam-2"), 15)
        ws_url = tree.lowers["lower-a"].url.replace("http", "ws") + "/v1/device"
        async with aiohttp.ClientSession() as anonymous:
            for token, code in ((None, "unauthorized"), (SECRET.token("device:cam-1"),
                                                         "forbidden")):
                async with anonymous.ws_connect(ws_url) as ws:
                    body = {"type": "register", "device": "intruder"}
                    if token:
                        body["token"] = token  # cam-1's token, for another id
                    await ws.send_str(json.dumps(body))
                    reply = json.loads((await ws.receive(timeout=5)).data)
                    assert reply["code"] == code, reply
            assert "intruder" not in tree.lowers["lower-a"].directory.own
            # the probe's HTTP: none, a wrong one, the right one
            calls = f"{tree.lowers['lower-a'].url}/v1/calls"
            body = {"caller": "lower-a/cam-1", "callee": "lower-b/cam-2", "media_mode": "none"}
            async with anonymous.post(calls, json=body) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
            async with anonymous.post(calls, json=body,
                                      headers={"Authorization": "Bearer nope"}) as r:
                assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
            async with anonymous.get(f"{tree.lowers['lower-a'].url}/healthz") as r:
                assert r.status == 200  # health stays open
        async with tree.session.post(calls, json=body) as r:  # the tree's session has it
            assert r.status == 201
        assert tree.lowers["lower-a"].core.counters.refusals == {"unauthorized": 2, "forbidden": 2}


@pytest.mark.e2e
async def test_a_lower_server_without_the_secret_is_refused_by_the_upper():
    upper_settings = ServerSettings(role="upper", name="upper", media=LOOPBACK, auth=SECRET)
    async with running_server(upper_settings) as upper, running_server(ServerSettings(
            role="lower", name="lower-x", parent=upper.url, media=LOOPBACK)) as lower:
        await asyncio.sleep(1.5)
        assert "lower-x" not in upper.directory.below and lower.directory.parent is None
        assert upper.core.counters.refusals.get("unauthorized", 0) >= 1
