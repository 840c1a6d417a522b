"""Admission: may this server take a new call, device or child server now? One function for every
entry point (a probe's command, a call arriving over a trunk, a device or a server joining), so a
limit or a drain means the same wherever it is met. Pure: counts and settings in, a refusal out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from wire.reasons import Code, Refused


@dataclass(frozen=True)
class Limits:
    """Past a limit a server answers at once, says why, and changes nothing else."""

    max_devices: int = 1000  #: devices registered at a lower server
    max_calls: int = 500  #: calls in progress at this server
    max_message_rate: float = 50.0  #: WebSocket messages per second per device link
    #: messages per second per child trunk: a whole subtree's calls and directory share it
    max_trunk_rate: float = 2000.0
    #: devices an upper server keeps in its directory (its whole subtree's)
    max_directory_devices: int = 1_000_000

    def __post_init__(self) -> None:
        if min(self.max_devices, self.max_calls, self.max_directory_devices) < 1 or \
                min(self.max_message_rate, self.max_trunk_rate) <= 0:
            raise ValueError("limits must be positive")


Entry = Literal["call", "device", "server"]


def admit(entry: Entry, server: str, limits: Limits, draining: bool, calls: int,
          devices: int = 0) -> Refused | None:
    """Whether ``server`` may take one more call, device or child server; the refusal if not."""
    if draining:
        what = {"call": "no new calls", "device": "no new devices",
                "server": "no new links"}[entry]
        return Refused(Code.SERVER_SHUTTING_DOWN, f"{server} is shutting down: {what}")
    if entry == "call" and calls >= limits.max_calls:
        return Refused(Code.SERVER_BUSY, f"{server} has its maximum of {limits.max_calls} calls "
                                         "in progress")
    if entry == "device" and devices >= limits.max_devices:
        return Refused(Code.SERVER_FULL, f"{server} has its maximum of {limits.max_devices} "
                                         "devices", "device")
    return None
