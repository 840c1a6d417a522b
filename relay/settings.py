"""Settings of a relay server: one frozen, typed object, checked when it is built."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from relay.admission import Limits
from relay.call import Timeouts
from rtc.adapter import MediaSettings
from wire.auth import Auth
from wire.config import SettingsError, parent_url
from wire.messages import MessageError, check_name, check_url


@dataclass(frozen=True)
class ServerSettings:
    role: Literal["lower", "upper"]
    name: str
    host: str = "127.0.0.1"
    port: int = 0  #: 0: any free port (the ready line on stdout says which)
    parent: str | None = None  #: the parent server's URL (ws:// or http://); either role
    public_url: str | None = None  #: how others reach this server, if not http://host:port
    media: MediaSettings = field(default_factory=MediaSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    heartbeat_s: float = 2.0
    #: "forward" (encoded packets, the default) or "transcode" (decode + re-encode every stream:
    #: the baseline a simple relay would be, for comparisons)
    media_mode: Literal["forward", "transcode"] = "forward"
    #: measure every hop of every call (relay/hops.py); off only to price the measuring
    hop_figures: bool = True
    #: congestion control: estimate each leg, report the path's least upstream (rtc/congestion.py)
    congestion_control: bool = True
    #: limits: past them the server answers "busy" at once (never a hang)
    limits: Limits = field(default_factory=Limits)
    #: credentials on every link (wire/auth.py); off unless a secret is configured
    auth: Auth = field(default_factory=Auth)
    #: seconds a request head may take from its first byte, and a body once its head is in
    #: (relay/httpd.py): a slow client is cut off, not held
    http_head_timeout_s: float = 10.0
    http_body_timeout_s: float = 10.0
    #: seconds a new link has to send its first message (register, announce); pings and
    #: invalid messages do not extend it
    first_message_s: float = 10.0
    #: seconds an ended call is kept (``GET /v1/calls/{id}`` answers, late reports are filed):
    #: a server's memory grows for this long under steady load, then stays flat
    keep_ended_s: float = 120.0

    def __post_init__(self) -> None:
        if self.role not in ("lower", "upper"):
            raise SettingsError(f"role must be 'lower' or 'upper', not {self.role!r}")
        try:
            check_name(self.name, "name")
        except MessageError as exc:
            raise SettingsError(str(exc)) from None
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port {self.port} is out of range")
        if self.parent is not None:
            parent_url(self.parent, "")  # raises SettingsError if malformed
        if self.media_mode not in ("forward", "transcode"):
            raise SettingsError(f"media_mode must be 'forward' or 'transcode', not "
                                f"{self.media_mode!r}")
        if self.heartbeat_s <= 0:
            raise SettingsError("heartbeat_s must be positive")
        if self.keep_ended_s < 0:
            raise SettingsError("keep_ended_s must not be negative")
        if min(self.http_head_timeout_s, self.http_body_timeout_s, self.first_message_s) <= 0:
            raise SettingsError("http_head_timeout_s, http_body_timeout_s and first_message_s "
                                "must be positive")
        if self.public_url is not None:
            try:
                check_url(self.public_url, "public_url")
            except MessageError as exc:
                raise SettingsError(str(exc)) from None


def env_defaults(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """RELAY_* variables, for containers: RELAY_NAME, RELAY_PORT, RELAY_PARENT, ..."""
    return {k[len("RELAY_"):].lower(): v for k, v in environ.items() if k.startswith("RELAY_")}
