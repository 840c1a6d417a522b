"""Hostile input: generated messages and HTTP requests never crash anything and never get a 5xx;
each bad one is answered with an error that names the problem.

- WebSocket frames through ``decode``: a Message or a MessageError, nothing else. 10,000 seeded
  frames (every type, fields of any JSON shape, unknown types), plus hypothesis-generated ones
  (any JSON, any bytes, known types with arbitrary fields) that shrink to the smallest failure.
- HTTP: 10,000 seeded random requests against a live lower server's routes (e2e).
"""

from __future__ import annotations

import json
import random
import string

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.server import running_server
from relay.settings import ServerSettings
from wire.messages import MessageError, decode, message_types

from .conftest import LOOPBACK

TYPES = message_types()
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
JSON = st.recursive(SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=5), st.dictionaries(st.text(max_size=12), children,
                                                    max_size=5)), max_leaves=20)


def field_names(tag: str) -> list[str]:
    return list(TYPES[tag].__struct_fields__)


@st.composite
def frames(draw: st.DrawFn) -> dict:
    """A message of a known type whose fields are any JSON at all, some missing, some extra."""
    tag = draw(st.sampled_from(sorted(TYPES)))
    body = {"type": tag}
    for name in field_names(tag):
        if draw(st.booleans()):
            body[name] = draw(JSON)
    if draw(st.booleans()):
        body[draw(st.text(min_size=1, max_size=10))] = draw(JSON)
    return body


def assert_handled(raw: object) -> None:
    try:
        decode(raw if isinstance(raw, str | bytes) else json.dumps(raw, allow_nan=True))
    except MessageError as exc:
        assert exc.message and exc.code, exc  # says what was wrong
    except RecursionError:
        pytest.fail("a nested frame reached the recursion limit unhandled")


@settings(max_examples=1_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames())
def test_generated_frames_are_decoded_or_refused_with_a_reason(frame: dict) -> None:
    assert_handled(frame)


def test_ten_thousand_seeded_frames():
    """The bulk run (hypothesis above shrinks a failure; this covers the count quickly)."""
    rng = random.Random(11)
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(10_000):
        tag = rng.choice([*sorted(TYPES), "nope", ""])
        frame: dict = {"type": tag} if rng.random() < 0.95 else {"type": random_value(rng)}
        for name in field_names(tag) if tag in TYPES else []:
            if rng.random() < 0.8:
                frame[name] = random_value(rng)
        try:
            decode(json.dumps(frame))
            outcomes["decoded"] += 1
        except MessageError as exc:
            assert exc.message and exc.code
            outcomes["refused"] += 1
    assert sum(outcomes.values()) == 10_000 and outcomes["refused"] > 5_000, outcomes


@settings(max_examples=1_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(JSON, st.text(max_size=200), st.binary(max_size=200)))
def test_any_json_or_bytes_at_all(value: object) -> None:
    assert_handled(value)


def test_deep_nesting_and_huge_frames():
    assert_handled("[" * 100_000 + "]" * 100_000)
    assert_handled('{"type": "heartbeat", "seq": ' + "9" * 5000 + "}")
    assert_handled("x" * (300 * 1024))


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8 if depth < 2 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -1, 2**64, 1e308, -0.0])
    if kind == 2:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(0, 30)))
    if kind == 3:
        return rng.choice(["lower-a/cam-1", "lower-b/cam-2", "cam-1", "/", "a" * 300, "../x",
                           "lower-a/", "full", "none", "\u0000", "video/VP8"])
    if kind == 4:
        return rng.uniform(-1e9, 1e9)
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["caller", "callee", "media_mode", "x", ""]): random_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


@pytest.mark.e2e
async def test_ten_thousand_random_requests_get_no_server_error():
    rng = random.Random(7)
    paths = ["/v1/calls", "/v1/calls/{id}", "/v1/devices", "/v1/server", "/healthz",
             "/v1/calls/{id}?wait={w}&timeout={t}", "/metrics", "/v1/nothing", "/device"]
    statuses: dict[int, int] = {}
    settings_ = ServerSettings(role="lower", name="lower-a", media=LOOPBACK)
    async with running_server(settings_) as server, aiohttp.ClientSession() as session:
        for _ in range(10_000):
            path = rng.choice(paths).format(
                id=rng.choice(["0123456789abcdef", "zz", "a" * 200, "%00", "..", "1"]),
                w=rng.choice(["active", "ended", "x", ""]),
                t=rng.choice(["0", "-1", "1e9", "nan", "x", "0.01"]))
            method = rng.choice(["GET", "POST", "DELETE", "PUT", "PATCH"])
            body = random_value(rng)
            if rng.random() < 0.5 and method == "POST":
                body = {"caller": random_value(rng), "callee": random_value(rng),
                        "media_mode": rng.choice(["full", "none", 3, None])}
            data = json.dumps(body) if rng.random() < 0.9 else rng.choice(
                ["{", "null", "", "\u00ff\u00fe", "[]" * 5000])
            async with session.request(method, server.url + path, data=data,
                                       headers={"Content-Type": "application/json"}) as r:
                statuses[r.status] = statuses.get(r.status, 0) + 1
                assert r.status < 500, (method, path, data[:200], await r.text())
                if r.status >= 400 and path.startswith("/v1/") and r.status != 405:
                    error = (await r.json())["error"]
                    assert error["code"] and error["message"], error
    assert sum(statuses.values()) == 10_000
    assert statuses.get(400, 0) + statuses.get(404, 0) > 1000, statuses
