"""Small pieces of configuration every service reads the same way: lists given as one string,
and the WebSocket URL of a parent server."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


class SettingsError(ValueError):
    """A setting is wrong; the message says which and why."""


def parent_url(url: str, path: str) -> str:
    """``http://h:p`` or ``ws://h:p`` -> ``ws://h:p{path}`` (a path already given is kept)."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise SettingsError(f"{url!r} is not a ws:// or http:// URL")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") or path, "", ""))


def split_list(value: str | None) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())
