"""The WebSocket protocol's AsyncAPI description (relay/asyncapi.py) against the msgspec types
it is generated from, and against the AsyncAPI 3.0 schema published by the AsyncAPI initiative
(npm's @asyncapi/specs, fetched with npm)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from relay.asyncapi import EXAMPLES, asyncapi
from wire.messages import (
    CHILD_TO_PARENT,
    DEVICE_TO_SERVER,
    PARENT_TO_CHILD,
    SERVER_TO_DEVICE,
    MessageError,
    decode,
    message_types,
)

DOC = json.loads(json.dumps(asyncapi("lower-a", "http://127.0.0.1:8080")))
SPECS_CACHE = Path.home() / ".cache" / "vphone-tests" / "asyncapi-specs"


def _message_schema(tag: str) -> dict[str, Any]:
    """One message's payload schema, standing alone (its references resolved in the document's
    components)."""
    ref = DOC["components"]["messages"][tag]["payload"]["$ref"]
    return {"$ref": ref, "components": DOC["components"]}


def _validator(tag: str) -> jsonschema.Validator:
    schema = _message_schema(tag)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_every_message_type_is_described_once() -> None:
    assert set(DOC["components"]["messages"]) == set(message_types())
    for tag, cls in message_types().items():
        assert DOC["components"]["messages"][tag]["title"] == cls.__name__


@pytest.mark.parametrize(("operation", "kinds"), [
    ("receiveFromDevice", DEVICE_TO_SERVER), ("sendToDevice", SERVER_TO_DEVICE),
    ("receiveFromChild", CHILD_TO_PARENT), ("sendToChild", PARENT_TO_CHILD)])
def test_operations_list_exactly_what_each_link_accepts(operation: str,
                                                         kinds: tuple[type, ...]) -> None:
    listed = {m["$ref"].rsplit("/", 1)[1] for m in DOC["operations"][operation]["messages"]}
    assert listed == {k.TYPE for k in kinds}  # type: ignore[attr-defined]
    channel = DOC["operations"][operation]["channel"]["$ref"].rsplit("/", 1)[1]
    assert listed <= set(DOC["channels"][channel]["messages"])


@pytest.mark.parametrize("tag", sorted(message_types()))
def test_schema_and_decoder_agree(tag: str) -> None:
    """The example validates against the schema and decodes; the same message with an unknown
    field, without its type, or with a field of the wrong type fails both."""
    validator = _validator(tag)
    example = DOC["components"]["messages"][tag]["examples"][0]["payload"]
    assert example == EXAMPLES[tag].to_dict()
    validator.validate(example)
    assert decode(json.dumps(example)) == EXAMPLES[tag]
    spoiled = [{**example, "bogus_field": 1}, {k: v for k, v in example.items() if k != "type"}]
    required = [f for f in DOC["components"]["schemas"][message_types()[tag].__name__]
                .get("required", []) if f != "type"]
    if required:
        spoiled.append({k: v for k, v in example.items() if k != required[0]})
        spoiled.append({**example, required[0]: {"not": "this"}})
    for bad in spoiled:
        assert list(validator.iter_errors(bad)), f"schema took {bad}"
        with pytest.raises(MessageError):
            decode(json.dumps(bad))


def test_patterns_mean_the_same_to_both() -> None:
    validator = _validator("register")
    for device, ok in (("cam-1", True), ("-cam", False), ("cam\n", False), ("c" * 65, False)):
        payload = {"type": "register", "device": device}
        assert (not list(validator.iter_errors(payload))) is ok, device
        if ok:
            decode(json.dumps(payload))
        else:
            with pytest.raises(MessageError):
                decode(json.dumps(payload))


def _official_schema() -> dict[str, Any]:
    """AsyncAPI 3.0.0's JSON Schema from npm's @asyncapi/specs (cached between runs)."""
    target = SPECS_CACHE / "package" / "schemas" / "3.0.0-without-$id.json"
    if not target.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed: cannot fetch @asyncapi/specs")
        SPECS_CACHE.mkdir(parents=True, exist_ok=True)
        try:
            out = subprocess.run([npm, "pack", "@asyncapi/specs@6", "--silent"], cwd=SPECS_CACHE,
                                 capture_output=True, text=True, timeout=180, check=True)
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"npm pack @asyncapi/specs failed: {exc}")
        with tarfile.open(SPECS_CACHE / out.stdout.strip().splitlines()[-1]) as tar:
            tar.extractall(SPECS_CACHE, filter="data")
    return json.loads(target.read_text())  # type: ignore[no-any-return]


def test_document_is_valid_asyncapi_3() -> None:
    schema = _official_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.path)}: {e.message[:200]}" for e in validator.iter_errors(DOC)]
    assert not errors, errors[:5]
    broken = json.loads(json.dumps(DOC))
    broken["operations"]["sendToDevice"]["action"] = "push"
    assert list(validator.iter_errors(broken))


def test_every_example_in_the_protocol_guide_is_a_valid_message() -> None:
    """docs/protocol.md's examples decode, so the guide an outside implementer follows is true."""
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    blocks = re.findall(r"```json\n(.*?)\n```", doc, re.S)
    assert len(blocks) >= 10
    seen = set()
    for block in blocks:
        message = decode(block)
        seen.add(message.TYPE)
    assert {"register", "registered", "wake", "woken", "offer", "answer", "first_frame",
            "stats", "hangup", "error", "heartbeat"} <= seen
