"""The event loop every service runs on: uvloop where it is installed (its per-packet cost is
most of forwarding's), asyncio's own otherwise or when asked."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop if asked for (or 'auto' and installed), else asyncio's default."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop
