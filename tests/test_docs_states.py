"""The state diagrams in docs/relay.md are the tables' own (``python -m wire.states``)."""

from __future__ import annotations

from pathlib import Path

from wire.states import diagrams

DOCS = Path(__file__).resolve().parent.parent / "docs" / "relay.md"


def test_the_docs_draw_the_tables_as_they_are():
    text = DOCS.read_text()
    start = text.index("<!-- states: python -m wire.states -->\n") + len(
        "<!-- states: python -m wire.states -->\n")
    end = text.index("<!-- /states -->")
    assert text[start:end] == diagrams(), "regenerate with: python -m wire.states"
