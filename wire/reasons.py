"""Every end reason and refusal code, defined once: who caused it, the HTTP status a refused request
gets, the probe's failure class, and one line of text.

The servers refuse and end calls with these codes, the probe classifies calls by them
(probe/stats.py), and the tables in docs/relay.md are printed from here
(``python -m relay reasons``; a test keeps the doc equal to it). A code not in this table is a bug.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

Cause = Literal["normal", "local", "remote", "network"]


class Code(enum.StrEnum):
    # the normal end
    HANGUP = "hangup"
    # a request or message that is malformed
    BAD_REQUEST = "bad_request"
    REQUEST_TIMEOUT = "request_timeout"
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    TOO_LARGE = "too_large"
    UNKNOWN_TYPE = "unknown_type"
    UNEXPECTED_TYPE = "unexpected_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_CALL_ID = "bad_call_id"
    BAD_QUERY = "bad_query"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HTTP_ERROR = "http_error"
    NOT_A_LOWER_SERVER = "not_a_lower_server"
    SAME_DEVICE = "same_device"
    PROTOCOL_ERROR = "protocol_error"
    ALREADY_REGISTERED = "already_registered"
    CALL_ENDED = "call_ended"
    # who is asking
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_YOURS = "not_yours"
    # what was asked for
    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_SERVER = "unknown_server"
    UNKNOWN_CALL = "unknown_call"
    AMBIGUOUS_DEVICE = "ambiguous_device"
    CALLER_NOT_HERE = "caller_not_here"
    BUSY_DEVICE = "busy_device"
    CALLEE_BUSY = "callee_busy"
    DUPLICATE_DEVICE = "duplicate_device"
    DUPLICATE_SERVER = "duplicate_server"
    DUPLICATE_CALL = "duplicate_call"
    MISROUTED = "misrouted"
    # limits and draining
    SERVER_BUSY = "server_busy"
    SERVER_FULL = "server_full"
    SERVER_SHUTTING_DOWN = "server_shutting_down"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_INVALID = "too_many_invalid"
    # peers and links that failed
    SERVER_UNREACHABLE = "server_unreachable"
    CALLER_UNREACHABLE = "caller_unreachable"
    CALLEE_UNREACHABLE = "callee_unreachable"
    DEVICE_GONE = "device_gone"
    TRUNK_LOST = "trunk_lost"
    SERVER_GONE = "server_gone"
    MEDIA_FAILED = "media_failed"
    BAD_SDP = "bad_sdp"
    UNUSABLE_ANSWER = "unusable_answer"
    NO_MEDIA_PATH = "no_media_path"
    SOURCE_ENDED = "source_ended"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNKNOWN_SESSION = "unknown_session"
    CALLER_WAKE_TIMEOUT = "caller_wake_timeout"
    CALLEE_WAKE_TIMEOUT = "callee_wake_timeout"
    SETUP_TIMEOUT = "setup_timeout"
    # the callee's answer (a device that rings: wire/messages.py Woken.ringing)
    DECLINED = "declined"
    NO_ANSWER = "no_answer"
    # a device asked to dial (POST /v1/calls with dial_from: device) that did not
    NO_DIAL = "no_dial"
    # the probe's own, when a request fails
    TIMEOUT = "timeout"
    BAD_RESPONSE = "bad_response"
    PROBE_ERROR = "probe_error"
    # a fleet of probes (probe/fleet.py): the leader's answer to a follower
    STALE_STEP = "stale_step"


@dataclass(frozen=True)
class Reason:
    code: Code
    #: who caused it: "normal" (the call was hung up), "local" (this server: a limit, a
    #: shutdown), "remote" (the peer that sent the request or message), "network" (a link or
    #: a peer that failed or went quiet)
    cause: Cause
    #: the HTTP status of a refused request (None: never an HTTP answer)
    status: int | None
    #: the probe's failure class for a call that ended or was refused with it (None: success)
    failure: str | None
    text: str
    #: for 503s: when to try again (the Retry-After header)
    retry_after_s: int | None = None
    #: sent by the probe itself (a request that failed), never by a server
    probe_only: bool = False


def _table(*reasons: Reason) -> dict[Code, Reason]:
    table = {r.code: r for r in reasons}
    missing = set(Code) - set(table)
    if missing or len(table) != len(reasons):
        raise TypeError(f"reasons table: missing {sorted(missing)} or a code listed twice")
    return table


REASONS: dict[Code, Reason] = _table(
    Reason(Code.HANGUP, "normal", None, None, "the call was hung up (the normal end)"),
    Reason(Code.BAD_REQUEST, "remote", 400, "rejected",
           "the HTTP request itself is malformed (a request line or header over 8190 bytes, "
           "a bad header): refused by the HTTP parser before any route"),
    Reason(Code.REQUEST_TIMEOUT, "remote", 408, "rejected",
           "a request head (10 s from its first byte) or body (10 s) came too slowly"),
    Reason(Code.BAD_JSON, "remote", 400, "rejected", "the request body is not valid JSON"),
    Reason(Code.BAD_MESSAGE, "remote", 400, "rejected",
           "a message or body failed validation; `field` names the part"),
    Reason(Code.TOO_LARGE, "remote", 413, "rejected",
           "over the size limit (WebSocket message 256 KiB, SDP 64 KiB, HTTP body 64 KiB)"),
    Reason(Code.UNKNOWN_TYPE, "remote", 400, "rejected", "no message has this `type`"),
    Reason(Code.UNEXPECTED_TYPE, "remote", 400, "rejected",
           "a known message, not accepted on this link or at this point"),
    Reason(Code.UNSUPPORTED_VERSION, "remote", 400, "rejected",
           "the peer speaks another protocol version"),
    Reason(Code.BAD_CALL_ID, "remote", 400, "rejected", "the call id in the path is malformed"),
    Reason(Code.BAD_QUERY, "remote", 400, "rejected", "a query parameter is malformed"),
    Reason(Code.NOT_FOUND, "remote", 404, "rejected", "no such route"),
    Reason(Code.METHOD_NOT_ALLOWED, "remote", 405, "rejected", "the route has no such method"),
    Reason(Code.HTTP_ERROR, "remote", None, "rejected",
           "another HTTP error (its own status), e.g. a body aiohttp would not read"),
    Reason(Code.NOT_A_LOWER_SERVER, "remote", 405, "rejected",
           "call commands go to the caller's lower server, not an upper server"),
    Reason(Code.SAME_DEVICE, "remote", 400, "rejected", "caller and callee are the same device"),
    Reason(Code.PROTOCOL_ERROR, "remote", None, "rejected",
           "a message out of turn (an offer on a leg this server offers on, a second welcome)"),
    Reason(Code.ALREADY_REGISTERED, "remote", None, None,
           "a second register on a device link that is registered"),
    Reason(Code.CALL_ENDED, "remote", None, None, "a message for a call that has ended"),
    Reason(Code.UNAUTHORIZED, "remote", 401, "rejected",
           "auth is on and no token was given"),
    Reason(Code.FORBIDDEN, "remote", 403, "rejected", "the token is wrong for this identity"),
    Reason(Code.NOT_YOURS, "remote", None, "rejected",
           "a server spoke for a server, device or call outside its subtree"),
    Reason(Code.UNKNOWN_DEVICE, "remote", 404, "unknown_device",
           "no such device where the call was routed"),
    Reason(Code.UNKNOWN_SERVER, "remote", 404, "unknown_device",
           "no server of that name in the tree"),
    Reason(Code.UNKNOWN_CALL, "remote", 404, "rejected", "no such call here"),
    Reason(Code.AMBIGUOUS_DEVICE, "remote", 409, "rejected",
           "a bare device id names several devices at the same distance: use SERVER/DEVICE"),
    Reason(Code.CALLER_NOT_HERE, "remote", 421, "rejected",
           "the caller belongs to another lower server: send the command there"),
    Reason(Code.BUSY_DEVICE, "remote", 409, "busy_device", "the device is in a call"),
    Reason(Code.CALLEE_BUSY, "remote", None, "busy_device",
           "the callee's server found the callee in a call"),
    Reason(Code.DUPLICATE_DEVICE, "remote", None, None,
           "a device id already registered on this server"),
    Reason(Code.DUPLICATE_SERVER, "remote", None, None,
           "a server name already in the tree"),
    Reason(Code.DUPLICATE_CALL, "remote", None, "rejected", "a call id already used here"),
    Reason(Code.MISROUTED, "remote", None, "rejected",
           "a call that would go back where it came from, or cross a server twice"),
    Reason(Code.SERVER_BUSY, "local", 503, "rejected",
           "the server has its maximum of calls in progress (--max-calls)", retry_after_s=1),
    Reason(Code.SERVER_FULL, "local", None, None,
           "the lower server has its maximum of devices (--max-devices)"),
    Reason(Code.SERVER_SHUTTING_DOWN, "local", 503, "rejected",
           "the server is draining (SIGTERM): no new calls or links; calls in progress end",
           retry_after_s=5),
    Reason(Code.RATE_LIMITED, "remote", None, None,
           "a link sent more than its rate (--max-message-rate on a device link, "
           "--max-trunk-rate on a child's trunk) a second: the excess is dropped"),
    Reason(Code.TOO_MANY_INVALID, "remote", None, None,
           "a link sent more than 20 invalid messages in a burst (or 1 a second for long): "
           "it is closed"),
    Reason(Code.SERVER_UNREACHABLE, "network", 503, "server_unreachable",
           "a server on the path has no link to the next one (or the probe could not reach it)"),
    Reason(Code.CALLER_UNREACHABLE, "network", None, "device_unreachable",
           "the caller's link was gone when it was to be woken"),
    Reason(Code.CALLEE_UNREACHABLE, "network", None, "device_unreachable",
           "the callee's link was gone when it was to be woken"),
    Reason(Code.DEVICE_GONE, "network", None, "device_unreachable",
           "a device's link closed during the call"),
    Reason(Code.TRUNK_LOST, "network", None, "server_unreachable",
           "the link to the parent server closed during the call"),
    Reason(Code.SERVER_GONE, "network", None, "server_unreachable",
           "the link to a child server closed during the call"),
    Reason(Code.MEDIA_FAILED, "network", None, "ice_dtls_failed",
           "a media leg (ICE or DTLS) failed"),
    Reason(Code.BAD_SDP, "remote", None, "ice_dtls_failed", "an offer or answer was refused"),
    Reason(Code.UNSUPPORTED_MEDIA_TYPE, "remote", 415, "rejected",
           "a WHIP or WHEP offer not sent as application/sdp"),
    Reason(Code.UNKNOWN_SESSION, "remote", 404, "rejected", "no such WHIP or WHEP session here"),
    Reason(Code.SOURCE_ENDED, "normal", None, None,
           "a viewer watched a device's stream fanned out of another call, and that call ended"),
    Reason(Code.NO_MEDIA_PATH, "remote", 409, "rejected",
           "neither party sends what the other receives (a WHIP publisher only sends, a WHEP "
           "viewer only receives)"),
    Reason(Code.UNUSABLE_ANSWER, "remote", None, "rejected",
           "an SDP answer that cannot carry the call: recvonly, inactive or sendonly where the "
           "call needs both ways, a rejected m-line, or no codec in common"),
    Reason(Code.CALLER_WAKE_TIMEOUT, "network", None, "timeout",
           "the caller did not acknowledge its wake-up in time (5 s)"),
    Reason(Code.CALLEE_WAKE_TIMEOUT, "network", None, "timeout",
           "the callee did not acknowledge its wake-up in time (5 s)"),
    Reason(Code.SETUP_TIMEOUT, "network", None, "timeout",
           "no media both ways in time (--setup-timeout, 20 s)"),
    Reason(Code.DECLINED, "remote", None, "declined",
           "the callee was rung and declined the call (a person, or `--answer decline`)"),
    Reason(Code.NO_ANSWER, "remote", None, "no_answer",
           "the callee rang and nobody answered in time (--ring-timeout, 30 s)"),
    Reason(Code.NO_DIAL, "remote", 504, "timeout",
           "the caller was asked to dial the call itself (dial_from: device) and did not within "
           "5 s: it follows no scripts (a person's phone), said why not, or is stuck"),
    Reason(Code.TIMEOUT, "network", None, "timeout",
           "the probe's request got no answer in time", probe_only=True),
    Reason(Code.BAD_RESPONSE, "remote", None, "rejected",
           "the server's answer was not what the API describes", probe_only=True),
    Reason(Code.PROBE_ERROR, "local", None, "probe_error",
           "the probe itself failed on the call (its own bug, logged once with where it was "
           "raised): the call is counted, and the run is invalid", probe_only=True),
    Reason(Code.STALE_STEP, "remote", 409, "rejected",
           "a probe fleet's leader was sent a step result it is not collecting (another step's, "
           "or a shard's second)", probe_only=True),
)


def reason(code: str) -> Reason | None:
    """The table's entry for a code, or None for a code the table does not know."""
    try:
        return REASONS[Code(code)]
    except ValueError:
        return None


def markdown() -> str:
    """The table as docs/relay.md shows it."""
    lines = ["| code | cause | HTTP | probe's class | meaning |", "|---|---|---|---|---|"]
    for r in REASONS.values():
        status = str(r.status) if r.status is not None else ""
        if r.retry_after_s is not None:
            status += f" (Retry-After: {r.retry_after_s})"
        who = r.cause + (", probe" if r.probe_only else "")
        lines.append(f"| `{r.code}` | {who} | {status} | {r.failure or ''} | {r.text} |")
    return "\n".join(lines)


class Refused(Exception):
    """A request, message or link turned away: the code (wire/reasons.py), what was wrong, and
    the field it was wrong in. Raising it changes nothing."""

    def __init__(self, code: Code, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    @property
    def status(self) -> int:
        return REASONS[self.code].status or 400

    @property
    def retry_after_s(self) -> int | None:
        return REASONS[self.code].retry_after_s
