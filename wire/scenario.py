"""A call scenario as data (in the manner of SIPp's): the steps of one call, with timers drawn
from distributions, kept apart from the arrivals (rate, schedule, concurrency cap: probe/load.py)
and from the recording (probe/stats.py). The same scenario runs once or at many calls a second.

A scenario file (JSON, or TOML with ``.toml``) lists steps in order::

    {"name": "ring-and-decline",
     "steps": [{"dial": {"from": "api"}},
               {"ring": {"uniform": [1, 3]}},
               {"answer": {"probability": 0.8}},
               {"hold": {"uniform": [2, 4]}},
               {"hangup": {"by": "callee"}}]}

- ``dial``: ``from`` ``api`` (``POST /v1/calls`` at the caller's server) or ``device`` (the
  caller dials itself: ``probe load`` asks the caller's server to have it dial, with
  ``dial_from: device``; ``endpoint --call --scenario`` is that device);
- ``ring``: the callee rings this long before it answers (or declines); left out: it answers
  as it wakes;
- ``answer``: with ``probability`` P it answers, else it declines (the call ends ``declined``:
  the outcome the scenario asked for, counted as ``declined``, not as a failure);
- ``hold``: how long the call is held once up;
- ``hangup``: ``by`` ``probe`` (``DELETE /v1/calls/{id}``), ``caller`` or ``callee`` (that
  device hangs up by itself after the hold).

A time is a number of seconds, ``{"uniform": [LO, HI]}``, ``{"exponential": MEAN}`` or
``{"normal": [MEAN, SD]}`` (at least 0). Each call's draws go to the devices in the call's
``script`` (wire/messages.py ``Script``); scripted devices (``endpoint``'s synthetic ones) follow
it, a person's phone does not. The default scenario is a call answered at once, held
``--hold`` seconds and hung up by the probe.
"""

from __future__ import annotations

import json
import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wire.messages import Script

STEPS = ("dial", "ring", "answer", "hold", "hangup")


@dataclass(frozen=True)
class Dist:
    """A time in seconds: fixed, or drawn from a distribution."""

    kind: str = "fixed"
    a: float = 0.0
    b: float = 0.0

    @classmethod
    def parse(cls, spec: Any, where: str) -> Dist:
        if isinstance(spec, int | float) and not isinstance(spec, bool):
            return cls._checked("fixed", float(spec), 0.0, where)
        if isinstance(spec, dict) and len(spec) == 1:
            kind, value = next(iter(spec.items()))
            if kind == "exponential" and isinstance(value, int | float):
                return cls._checked(kind, float(value), 0.0, where)
            if kind in ("uniform", "normal") and isinstance(value, list) and len(value) == 2 \
                    and all(isinstance(v, int | float) for v in value):
                return cls._checked(kind, float(value[0]), float(value[1]), where)
        raise ValueError(f"{where}: a time is seconds, {{\"uniform\": [LO, HI]}}, "
                         f"{{\"exponential\": MEAN}} or {{\"normal\": [MEAN, SD]}}, not {spec!r}")

    @classmethod
    def _checked(cls, kind: str, a: float, b: float, where: str) -> Dist:
        if a < 0 or b < 0 or (kind == "uniform" and b < a):
            raise ValueError(f"{where}: times are at least 0, and uniform's LO at most its HI")
        return cls(kind, a, b)

    def draw(self, rng: random.Random) -> float:
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "exponential":
            return rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        if self.kind == "normal":
            return max(0.0, rng.gauss(self.a, self.b))
        return self.a

    @property
    def high(self) -> float:
        """A time few draws pass (the run waits this long for its last calls)."""
        return {"fixed": self.a, "uniform": self.b, "exponential": 5 * self.a,
                "normal": self.a + 4 * self.b}[self.kind]

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a

    def to_dict(self) -> Any:
        if self.kind == "fixed":
            return self.a
        if self.kind == "exponential":
            return {"exponential": self.a}
        return {self.kind: [self.a, self.b]}


@dataclass(frozen=True)
class Scenario:
    """What every call of a run does, step by step."""

    name: str = "call"
    dial_from: str = "api"
    ring: Dist | None = None
    answer_probability: float = 1.0
    hold: Dist = field(default_factory=lambda: Dist("fixed", 3.0))
    hangup_by: str = "probe"

    @classmethod
    def default(cls, hold_s: float) -> Scenario:
        """Today's call: answered as it wakes, held ``hold_s``, hung up by the probe."""
        return cls(hold=Dist("fixed", hold_s))

    @classmethod
    def load(cls, path: str | Path,
             dialers: tuple[str, ...] = ("api", "device")) -> Scenario:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"scenario {path}: {exc.strerror or exc}") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"scenario {path}: not valid {path.suffix[1:] or 'JSON'}: "
                             f"{exc}") from None
        return cls.from_dict(data, str(path), dialers)

    @classmethod
    def from_dict(cls, data: Any, where: str = "scenario",
                  dialers: tuple[str, ...] = ("api", "device")) -> Scenario:
        """``dialers``: how the runner reading it can start calls (the first when the ``dial``
        step does not say): the probe's load both, endpoint --call ``device`` only."""
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise ValueError(f"{where}: expected {{\"name\": ..., \"steps\": [...]}}")
        unknown = set(data) - {"name", "steps"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
        found: dict[str, Any] = {}
        order = []
        for i, step in enumerate(data["steps"]):
            if not isinstance(step, dict) or len(step) != 1:
                raise ValueError(f"{where}: step {i + 1} must be one of {', '.join(STEPS)} "
                                 "with its options, e.g. {\"hold\": 3}")
            kind, options = next(iter(step.items()))
            if kind not in STEPS:
                raise ValueError(f"{where}: step {i + 1}: unknown step {kind!r} (one of "
                                 f"{', '.join(STEPS)})")
            if kind in found:
                raise ValueError(f"{where}: step {i + 1}: {kind} appears twice")
            found[kind] = options
            order.append(kind)
        if order != [s for s in STEPS if s in found]:
            raise ValueError(f"{where}: steps must come in the order {' → '.join(STEPS)}")
        for needed in ("dial", "hold", "hangup"):
            if needed not in found:
                raise ValueError(f"{where}: a scenario needs a {needed} step")
        dial = _options(found["dial"], {"from"}, f"{where}: dial")
        dial_from = dial.get("from", dialers[0])
        if dial_from not in ("api", "device"):
            raise ValueError(f"{where}: dial from {dial_from!r}: \"api\" or \"device\"")
        if dial_from not in dialers:
            raise ValueError(f"{where}: dial from {dial_from!r}: endpoint --call dials from "
                             "the device (\"device\"); probe load --scenario does either")
        answer = _options(found.get("answer", {}), {"probability"}, f"{where}: answer")
        probability = answer.get("probability", 1.0)
        if not isinstance(probability, int | float) or not 0 <= probability <= 1:
            raise ValueError(f"{where}: answer probability must be between 0 and 1")
        hangup = _options(found["hangup"], {"by"}, f"{where}: hangup")
        by = hangup.get("by", "probe")
        if by not in ("probe", "caller", "callee"):
            raise ValueError(f"{where}: hangup by must be probe, caller or callee")
        return cls(name=str(data.get("name", "scenario")), dial_from=dial_from,
                   ring=Dist.parse(found["ring"], f"{where}: ring") if "ring" in found
                   else None,
                   answer_probability=float(probability),
                   hold=Dist.parse(found["hold"], f"{where}: hold"), hangup_by=by)

    def plan(self, rng: random.Random) -> Plan:
        """One call's draws."""
        ring_s = self.ring.draw(rng) if self.ring is not None else 0.0
        declines = self.answer_probability < 1.0 and rng.random() >= self.answer_probability
        return Plan(ring_s=round(ring_s, 3), declines=declines,
                    hold_s=round(self.hold.draw(rng), 3), hangup_by=self.hangup_by,
                    dial_from=self.dial_from)

    @property
    def scripted(self) -> bool:
        """The devices need the call's script (anything but today's call)."""
        return (self.ring is not None or self.answer_probability < 1.0
                or self.hangup_by != "probe" or self.dial_from != "api")

    def to_dict(self) -> dict[str, Any]:
        steps: list[dict[str, Any]] = [{"dial": {"from": self.dial_from}}]
        if self.ring is not None:
            steps.append({"ring": self.ring.to_dict()})
        steps.append({"answer": {"probability": self.answer_probability}})
        steps.append({"hold": self.hold.to_dict()})
        steps.append({"hangup": {"by": self.hangup_by}})
        return {"name": self.name, "steps": steps}


@dataclass(frozen=True)
class Plan:
    """What one call of a scenario does (its draws)."""

    ring_s: float = 0.0
    declines: bool = False
    hold_s: float = 3.0
    hangup_by: str = "probe"
    dial_from: str = "api"

    @property
    def script(self) -> Script:
        return Script(ring_s=self.ring_s, decline=self.declines,
                      hangup_by=self.hangup_by, hold_s=self.hold_s)  # type: ignore[arg-type]

    @property
    def expected_end(self) -> str:
        """The reason the call ends with when it goes as planned."""
        return "declined" if self.declines else "hangup"


def _options(value: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if value is None or value == {}:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object of options {sorted(allowed)}")
    unknown = set(value) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {sorted(unknown)}")
    return value
