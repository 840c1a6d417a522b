"""Which token the probe shows to which server (docs/relay.md, "Trust").

The probe's own token (``probe``) commands every server of the tree, so it goes only where the
person running the probe sent it: the servers given with ``--server`` (or started with
``--local``). Servers found through them, at the URLs the tree announced, get:

- with the secret in the environment (``VPHONE_AUTH_SECRET``): a token for that server alone,
  ``probe:NAME``, signed here. A URL announced by a server that should not have announced it
  receives a token no other server takes.
- with only a given token (``PROBE_TOKEN``): nothing, unless ``--trust-announced`` says the
  tree's announced URLs are trusted. Without a token such a server answers 401, and discovery
  says which server it left out and why.

The token travels in a client middleware, chosen per request by the URL's origin
(scheme, host, port), so no request can carry it anywhere else by accident.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from wire.auth import Auth, probe_identity


def origin(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


class Credentials:
    """The probe's tokens, by the origin of the server they may go to."""

    def __init__(self, token: str | None, auth: Auth, trust_announced: bool = False) -> None:
        self._token = token or (auth.token(probe_identity()) if auth.on else None)
        self._auth = auth
        self._trust_announced = trust_announced
        self._by_origin: dict[str, str] = {}

    @classmethod
    def from_env(cls, trust_announced: bool = False,
                 environ: Mapping[str, str] = os.environ) -> Credentials:
        return cls(environ.get("PROBE_TOKEN") or None, Auth.from_env(environ), trust_announced)

    @property
    def on(self) -> bool:
        return self._token is not None

    @property
    def own_token(self) -> str | None:
        """The probe's own token: what probes of one fleet show each other (probe/fleet.py)."""
        return self._token

    def given(self, urls: Iterable[str]) -> None:
        """Servers the person named: they get the probe's own token."""
        if self._token is not None:
            for url in urls:
                self._by_origin[origin(url)] = self._token

    def found(self, url: str, server: str) -> None:
        """A server found through others, at the URL the tree announced for it."""
        key = origin(url)
        if key in self._by_origin:
            return  # given: keeps the probe's own token
        if self._auth.on:
            self._by_origin[key] = self._auth.token(probe_identity(server))
        elif self._trust_announced and self._token is not None:
            self._by_origin[key] = self._token

    def token_for(self, url: str) -> str | None:
        return self._by_origin.get(origin(url))

    def withheld(self, url: str) -> bool:
        """True when the probe has a token but does not show it at ``url``."""
        return self._token is not None and origin(url) not in self._by_origin

    async def middleware(self, request: ClientRequest,
                         handler: ClientHandlerType) -> ClientResponse:
        token = self.token_for(str(request.url))
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        return await handler(request)
