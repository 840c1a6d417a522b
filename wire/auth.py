"""Authentication on every link: HMAC-signed credentials from one lab secret.

With a secret configured (``VPHONE_AUTH_SECRET``, or a file named by
``VPHONE_AUTH_SECRET_FILE``), every party proves who it is with a token: the HMAC-SHA256 of its
identity under the secret. Identities: ``device:ID`` (in ``register``), ``server:NAME`` (a lower
server's ``announce`` to its parent), ``probe`` (``Authorization: Bearer TOKEN`` on /v1/ HTTP).
A party can be given just its own token (``python -m relay token device:cam-1``) rather than the
secret: it can then be that device and nothing else. Without a secret, auth is off.
Media stays DTLS-SRTP on every hop either way.

Rotation without a flag day: the secret file may hold more lines, and
``VPHONE_AUTH_SECRET_PREVIOUS`` one more secret. The first line signs; every one of them still
verifies, so servers take the new secret first, clients follow, then the old one is dropped.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_SECRET = "VPHONE_AUTH_SECRET"
ENV_SECRET_FILE = "VPHONE_AUTH_SECRET_FILE"
ENV_SECRET_PREVIOUS = "VPHONE_AUTH_SECRET_PREVIOUS"


@dataclass(frozen=True)
class Auth:
    secret: bytes | None = None  #: None: auth is off; else it signs our own tokens
    previous: tuple[bytes, ...] = ()  #: secrets being rotated out: they still verify

    @property
    def on(self) -> bool:
        return self.secret is not None

    def token(self, identity: str) -> str:
        if self.secret is None:
            raise ValueError("auth is off: no secret to sign with")
        return _sign(self.secret, identity)

    def check(self, identity: str, token: str | None, *also: str) -> tuple[str, str] | None:
        """None if ``token`` proves ``identity`` or one of ``also`` (or auth is off); else
        (code, reason): ``unauthorized`` when no token came (or an empty one), ``forbidden``
        when it is wrong."""
        if self.secret is None:
            return None
        if not token:
            return "unauthorized", f"{identity}: a token is required (auth is on)"
        for secret in (self.secret, *self.previous):
            for name in (identity, *also):
                if hmac.compare_digest(token, _sign(secret, name)):
                    return None
        return "forbidden", f"{identity}: the token is not valid for this identity"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Auth:
        secrets = [environ.get(ENV_SECRET, "").strip()]
        path = environ.get(ENV_SECRET_FILE)
        if path:
            secrets = [line.strip() for line in Path(path).read_text().splitlines()]
        secrets.append(environ.get(ENV_SECRET_PREVIOUS, "").strip())
        secrets = [secret for secret in secrets if secret]
        if not secrets:
            return cls()
        return cls(secrets[0].encode(), tuple(secret.encode() for secret in secrets[1:]))


def bearer(header: str) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header; None when none was given."""
    return (header[len("Bearer "):].strip() or None) if header.startswith("Bearer ") else None


def probe_identity(server: str | None = None) -> str:
    """The probe's identity: ``probe`` commands every server; ``probe:NAME`` only server NAME.
    A probe that holds the secret shows each server found through others its own
    ``probe:NAME`` token, so a server that announced a URL it should not have learns nothing
    it could use elsewhere (docs/relay.md, "Trust")."""
    return "probe" if server is None else f"probe:{server}"


def _sign(secret: bytes, identity: str) -> str:
    return hmac.new(secret, identity.encode(), hashlib.sha256).hexdigest()


def token_for(identity: str, given: str | None, environ: Mapping[str, str] = os.environ
              ) -> str | None:
    """The token a client presents: the one it was given, else one signed with the secret in
    its environment (a lab where every service shares it), else none."""
    if given:
        return given
    auth = Auth.from_env(environ)
    return auth.token(identity) if auth.on else None
