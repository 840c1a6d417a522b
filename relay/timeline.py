"""The timeline relay: every server of a call's path keeps the call's timeline events and media
figures, and passes each one it learns to the other servers of the path (never back where it
came from). A device's last figures, sent after the hang-up, are kept under the right call and
device and passed on too. Pure: the outbox is the only way out."""

from __future__ import annotations

import logging

from relay.call import Call, CallStateError, MediaReport, Milestone
from relay.effects import CallChanged, Link, Outbox
from relay.ended import Ended
from relay.logs import event
from relay.messages import CallUpdate, Message, Role, Stats
from relay.session import Session

log = logging.getLogger("relay.timeline")


class Timeline:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def record(self, session: Session, name: str, at: float,
               source: Link | None = None) -> None:
        """A timeline event here: keep it and pass it to the other servers on the path."""
        call = session.call
        try:
            transition = call.handle(Milestone(name, at))
        except CallStateError as exc:
            event(log, "call.event_refused", logging.WARNING, call=call.id, reason=exc.message)
            return
        self.relay(session.links, CallUpdate(call=call.id, events={name: at}),  # type: ignore[dict-item]
                   source)
        if transition.activated:
            event(log, "call.active", call=call.id, caller=call.caller, callee=call.callee)
        self.outbox.add(CallChanged(call.id))

    def update(self, session: Session, link: Link, update: CallUpdate) -> None:
        """What another server of the path learned: keep it, pass it on."""
        call = session.call
        before = call.state
        for name, at in update.events.items():
            try:
                transition = call.handle(Milestone(name, at))
            except CallStateError as exc:
                event(log, "call.event_refused", logging.WARNING, call=call.id,
                      reason=exc.message, peer=str(link))
                continue
            if transition.activated:
                event(log, "call.active", call=call.id, caller=call.caller, callee=call.callee)
        for direction, stats in update.media.items():
            call.handle(MediaReport(direction, stats))
        call.transcoded.extend(w for w in update.transcoded if w not in call.transcoded)
        self.relay(session.links, update, link)
        if before is not call.state:
            self.outbox.add(CallChanged(call.id))

    def report(self, call: Call, role: Role, stats: Stats, links: list[Link]) -> None:
        """A device's figures for what it receives: the direction toward it."""
        direction = "callee_to_caller" if role == "caller" else "caller_to_callee"
        try:
            call.handle(MediaReport(direction, stats.media))
        except CallStateError as exc:
            event(log, "call.stats_refused", logging.WARNING, call=call.id, reason=exc.message)
            return
        self.relay(links, CallUpdate(call=call.id, media={direction: stats.media}), None)

    def late(self, ended: Ended, link: Link, message: Message) -> bool:
        """A message over ``link`` for a call that ended here. A device's last figures are kept
        and passed on; what crossed with the end is dropped. False: the call never crossed
        ``link`` here (an unknown call on it)."""
        if not (link in ended.trunks if link.is_trunk else link.name in ended.devices):
            return False
        if isinstance(message, Stats) and link.kind == "device":
            self.report(ended.call, ended.devices[link.name], message, list(ended.trunks))
        elif isinstance(message, CallUpdate) and message.media:
            for direction, stats in message.media.items():
                ended.call.handle(MediaReport(direction, stats))
            self.relay(list(ended.trunks), CallUpdate(call=ended.call.id, media=message.media),
                       link)
        return True

    def transcoded(self, session: Session, where: str) -> None:
        """A direction of this call fell back to transcoding here: every server hears where."""
        session.call.transcoded.append(where)
        self.relay(session.links, CallUpdate(call=session.call.id, transcoded=[where]), None)

    def relay(self, links: list[Link], update: CallUpdate, source: Link | None) -> None:
        for link in links:
            if link.is_trunk and link != source:
                self.outbox.send(link, update)
