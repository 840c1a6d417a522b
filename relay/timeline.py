"""The timeline relay: every server of a call's path keeps the call's timeline events and media
figures, and passes each one it learns to the other servers of the path (never back where it
came from). A device's last figures, sent after the hang-up, are kept under the right call and
device and passed on too. An event the call's table does not take is the sending peer's mistake:
it gets an ``error`` naming it, and nothing changes. Pure: the outbox is the only way out."""

from __future__ import annotations

import logging
from collections.abc import Collection

from msgspec.structs import replace

from relay.call import Call, CallStateError, MediaReport, Milestone
from relay.effects import CallChanged, Link, Outbox
from relay.ended import Ended
from relay.session import Session
from wire.logs import event
from wire.messages import CallUpdate, Error, HopFigures, Message, Role, Stats

log = logging.getLogger("relay.timeline")


class Timeline:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def refused(self, peer: Link | None, exc: CallStateError, ref: str) -> None:
        """``peer`` sent what the call cannot take: tell it (once), log it, change nothing."""
        event(log, "call.event_refused", logging.WARNING, call=exc.call, reason=exc.message,
              peer=str(peer) if peer else None, ref=ref)
        if peer is not None:
            self.outbox.send(peer, Error(code=exc.code, message=exc.message[:1024],
                                         call=exc.call, ref=ref))

    def record(self, session: Session, name: str, at: float,
               source: Link | None = None, now: float | None = None,
               peer: Link | None = None, ref: str = "call_update") -> bool:
        """A timeline event here (learned at ``now``, from ``peer`` in its message ``ref``):
        keep it and pass it to the other servers on the path. False: refused (``peer`` told)."""
        call = session.call
        try:
            transition = call.handle(Milestone(name, at, now))
        except CallStateError as exc:
            self.refused(peer, exc, ref)
            return False
        self.relay(session.links, CallUpdate(call=call.id, events={name: at}),  # type: ignore[dict-item]
                   source)
        if transition.activated:
            event(log, "call.active", call=call.id, caller=call.caller, callee=call.callee)
        self.outbox.add(CallChanged(call.id))
        return True

    def update(self, session: Session, link: Link, update: CallUpdate,
               beyond: Collection[str] = (), now: float | None = None) -> None:
        """What another server of the path learned: keep it, pass it on. Hop figures are
        taken only of the servers ``beyond`` the link it came over (each server speaks for its
        own part)."""
        call = session.call
        before = call.state
        for name, at in update.events.items():
            try:
                transition = call.handle(Milestone(name, at, now))
            except CallStateError as exc:
                self.refused(link, exc, update.TYPE)
                continue
            if transition.activated:
                event(log, "call.active", call=call.id, caller=call.caller, callee=call.callee)
        for direction, stats in update.media.items():
            call.handle(MediaReport(direction, stats))
        call.senders.update(update.senders)
        call.transcoded.extend(w for w in update.transcoded if w not in call.transcoded)
        update = self._own_hops(call, update, link, beyond)
        self.relay(session.links, update, link)
        if before is not call.state:
            self.outbox.add(CallChanged(call.id))

    def report(self, call: Call, role: Role, stats: Stats, links: list[Link],
               peer: Link | None = None) -> None:
        """A device's (``peer``'s) figures for what it receives (the direction toward it), and
        its own part of what it sends (the direction away)."""
        direction = "callee_to_caller" if role == "caller" else "caller_to_callee"
        away = "caller_to_callee" if role == "caller" else "callee_to_caller"
        try:
            call.handle(MediaReport(direction, stats.media))
        except CallStateError as exc:
            self.refused(peer, exc, stats.TYPE)
            return
        senders = {away: stats.sender} if stats.sender is not None else {}
        call.senders.update(senders)
        self.relay(links, CallUpdate(call=call.id, media={direction: stats.media},  # type: ignore[dict-item]
                                     senders=senders), None)  # type: ignore[arg-type]

    def late(self, ended: Ended, link: Link, message: Message,
             beyond: Collection[str] = ()) -> bool:
        """A message over ``link`` for a call that ended here. A device's last figures and the
        servers' last hop figures are kept and passed on; what crossed with the end is
        dropped. False: the call never crossed ``link`` here (an unknown call on it)."""
        if not (link in ended.trunks if link.is_trunk else link.name in ended.devices):
            return False
        if isinstance(message, Stats) and link.kind == "device":
            self.report(ended.call, ended.devices[link.name], message, list(ended.trunks),
                        link)
        elif isinstance(message, CallUpdate) and (message.media or message.hops
                                                  or message.senders):
            for direction, stats in message.media.items():
                ended.call.handle(MediaReport(direction, stats))
            ended.call.senders.update(message.senders)
            update = self._own_hops(ended.call, CallUpdate(
                call=ended.call.id, media=message.media, hops=message.hops,
                senders=message.senders), link, beyond)
            if update.media or update.hops or update.senders:
                self.relay(list(ended.trunks), update, link)
        return True

    def hops(self, call: Call, figures: HopFigures, links: list[Link]) -> None:
        """This server's own figures of a call: keep them, pass them to the path."""
        call.hops[figures.server] = figures
        self.relay(links, CallUpdate(call=call.id, hops={figures.server: figures}), None)
        self.outbox.add(CallChanged(call.id))

    def _own_hops(self, call: Call, update: CallUpdate, link: Link,
                  beyond: Collection[str]) -> CallUpdate:
        """``update`` with only the hop figures its sender may give (those of servers beyond
        ``link``), which are kept; one for another server is dropped, and said so."""
        if not update.hops:
            return update
        taken = {name: hop for name, hop in update.hops.items()
                 if name in beyond and hop.server == name}
        if len(taken) != len(update.hops):
            event(log, "call.hops_refused", logging.WARNING, call=call.id, peer=str(link),
                  servers=",".join(sorted(set(update.hops) - set(taken))))
        call.hops.update(taken)
        if taken:
            self.outbox.add(CallChanged(call.id))
        return replace(update, hops=taken)

    def transcoded(self, session: Session, where: str) -> None:
        """A direction of this call fell back to transcoding here: every server hears where."""
        session.call.transcoded.append(where)
        self.relay(session.links, CallUpdate(call=session.call.id, transcoded=[where]), None)

    def relay(self, links: list[Link], update: CallUpdate, source: Link | None) -> None:
        for link in links:
            if link.is_trunk and link != source:
                self.outbox.send(link, update)
