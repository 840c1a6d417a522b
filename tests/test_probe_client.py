"""The probe's pure choices: which token goes to which server (wire/credentials.py), and what
it says when a device is nowhere."""

from __future__ import annotations

import pytest

from wire.auth import Auth, probe_identity
from wire.client import ProbeError, Server, find_device
from wire.credentials import Credentials, origin
from wire.messages import DeviceInfo, ServerEntry

AUTH = Auth(secret=b"unit-secret")


def test_origin_names_scheme_host_and_port():
    assert origin("http://Lower-A:8080/v1/calls?x=1") == "http://lower-a:8080"
    assert origin("http://lower-a/v1") == "http://lower-a:80"
    assert origin("https://lower-a") == "https://lower-a:443"
    assert origin("http://lower-a:8081") != origin("http://lower-a:8080")


def test_the_probe_s_own_token_goes_only_to_the_servers_given():
    credentials = Credentials("the-token", Auth())
    credentials.given(["http://upper:8000"])
    credentials.found("http://lower-a:8080", "lower-a")
    assert credentials.token_for("http://upper:8000/v1/servers") == "the-token"
    assert credentials.token_for("http://lower-a:8080/v1/devices") is None
    assert credentials.withheld("http://lower-a:8080")
    assert credentials.token_for("http://evil.example:80/") is None


def test_trust_announced_extends_it_to_the_servers_found():
    credentials = Credentials("the-token", Auth(), trust_announced=True)
    credentials.given(["http://upper:8000"])
    credentials.found("http://lower-a:8080", "lower-a")
    assert credentials.token_for("http://lower-a:8080/v1/devices") == "the-token"


def test_with_the_secret_each_server_found_gets_a_token_for_itself_alone():
    credentials = Credentials(None, AUTH)
    credentials.given(["http://upper:8000"])
    credentials.found("http://lower-a:8080", "lower-a")
    credentials.found("http://upper:8000", "upper")  # given: keeps the probe's own token
    assert credentials.token_for("http://upper:8000") == AUTH.token(probe_identity())
    token = credentials.token_for("http://lower-a:8080")
    assert token == AUTH.token(probe_identity("lower-a"))
    assert AUTH.check("probe", token, probe_identity("lower-a")) is None
    assert AUTH.check("probe", token, probe_identity("lower-b")) == (
        "forbidden", "probe: the token is not valid for this identity")


def test_no_token_at_all_sends_none():
    credentials = Credentials(None, Auth(), trust_announced=True)
    credentials.given(["http://upper:8000"])
    credentials.found("http://lower-a:8080", "lower-a")
    assert not credentials.on and credentials.token_for("http://upper:8000") is None
    assert not credentials.withheld("http://lower-a:8080")


def lower(name: str, *devices: str) -> Server:
    return Server(f"http://{name}:80", ServerEntry(name=name, role="lower", url=f"http://{name}:80"),
                  [DeviceInfo(id=d, server=name) for d in devices])


def test_a_device_that_is_nowhere_names_the_servers_searched():
    servers = [lower("lower-a", "cam-1", "cam-2"), lower("lower-b")]
    with pytest.raises(ProbeError) as found:
        find_device(servers, "cam-9")
    assert found.value.code == "unknown_device"
    assert "searched lower-a (2 devices), lower-b (0 devices)" in found.value.message
    with pytest.raises(ProbeError) as found:
        find_device(servers, "lower-z/cam-1")
    assert "no lower server 'lower-z' in the tree" in found.value.message
    assert find_device(servers, "cam-2")[1].address == "lower-a/cam-2"
