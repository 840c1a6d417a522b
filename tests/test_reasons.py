"""The reasons table (wire/reasons.py): complete, used by the probe's classifier, and the same
as the table in docs/relay.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from probe.stats import FAILURE_CLASSES, classify, failure_class
from wire.reasons import REASONS, Code, markdown, reason

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("relay", "probe", "endpoint") for p in (ROOT / d).rglob("*.py")]


def test_every_code_has_one_entry_and_a_known_failure_class():
    assert set(REASONS) == set(Code)
    for entry in REASONS.values():
        assert entry.failure is None or entry.failure in FAILURE_CLASSES, entry
        assert entry.text and entry.cause in ("normal", "local", "remote", "network")
        if entry.retry_after_s is not None:
            assert entry.status == 503
    assert reason("nonsense") is None


def test_the_doc_table_is_the_table():
    doc = (ROOT / "docs" / "relay.md").read_text()
    found = re.search(r"<!-- reasons:begin -->\n(.*?)\n<!-- reasons:end -->", doc, re.S)
    assert found, "docs/relay.md lost its reasons markers"
    assert found.group(1) == markdown(), "regenerate: python -m relay reasons"


@pytest.mark.parametrize("code", [c.value for c in Code if REASONS[c].failure])
def test_the_probe_classifies_each_code_by_the_table(code: str):
    expected = REASONS[Code(code)].failure
    assert failure_class(code) == expected
    assert classify(code, None, False, {}, ()).failure == expected  # refused at once
    if code != "setup_timeout":
        assert classify(None, code, False, {}, ()).failure == expected  # ended before up
    assert classify(None, code, True, {}, ()).failure == "dropped"  # ended after up


def test_every_reason_the_code_names_is_in_the_table():
    """No free strings: every reason= or code= literal in the sources is a code of the table."""
    literal = re.compile(r"\b(?:reason|code)=[\"']([a-z_]+)[\"']")
    found = {m for p in SOURCES for m in literal.findall(p.read_text())}
    assert found and found <= {c.value for c in Code}, found - {c.value for c in Code}
