"""Ended calls, kept a while: ``GET /v1/calls/{id}`` still answers, and a device's last report
(sent after the hang-up) is filed under the right call and device and passed along the path.
Pure: time is an argument. Memory stays flat however many calls a server has carried."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from relay.call import Call
from relay.effects import Link
from wire.messages import Role


@dataclass
class Ended:
    """An ended call as this server carried it."""

    call: Call
    #: the trunks it crossed here (late figures are passed on over them)
    trunks: tuple[Link, ...] = ()
    #: this server's devices in the call, by id, with their part in it
    devices: dict[str, Role] = field(default_factory=dict)


class EndedCalls:
    KEEP_S = 120.0
    KEPT = 10_000

    def __init__(self, keep_s: float | None = None, kept: int | None = None) -> None:
        self.keep_s = self.KEEP_S if keep_s is None else keep_s
        self.kept = self.KEPT if kept is None else kept
        self._calls: OrderedDict[str, Ended] = OrderedDict()

    def add(self, ended: Ended, now: float) -> None:
        self._calls[ended.call.id] = ended
        self.expire(now)

    def expire(self, now: float) -> None:
        while self._calls:
            oldest = next(iter(self._calls.values()))
            if len(self._calls) <= self.kept and now - oldest.call.timeline.get(
                    "t_end", now) < self.keep_s:
                return
            self._calls.popitem(last=False)

    def next_expiry(self) -> float | None:
        """When the oldest ended call is to be forgotten (None: none is kept)."""
        if not self._calls:
            return None
        oldest = next(iter(self._calls.values())).call
        return oldest.timeline.get("t_end", oldest.created_at) + self.keep_s

    def get(self, call_id: str) -> Ended | None:
        return self._calls.get(call_id)

    def __contains__(self, call_id: str) -> bool:
        return call_id in self._calls

    def __len__(self) -> int:
        return len(self._calls)
