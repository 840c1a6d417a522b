"""Structured logs: one line per event, ``key=value`` pairs (logfmt), to stderr.

Use :func:`event`: ``event(log, "call.created", call=cid, caller=a, callee=b)`` prints
``ts=... level=info service=lower-a event=call.created call=... caller=... callee=...``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _quote(value: Any) -> str:
    text = f"{value:.6f}" if isinstance(value, float) else str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}",
                 f"service={_quote(self.service)}", f"event={_quote(record.getMessage())}"]
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_") and value is not None:
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(service: str, level: str = "info") -> None:
    """Send every log line of this process to stderr in logfmt, tagged with ``service``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiortc/aioice log every packet-level detail at INFO/DEBUG; keep their warnings only.
    for noisy in ("aioice", "aiortc", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def event(logger: logging.Logger, what: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log one event with its fields (call, device, server, reason, ...)."""
    if logger.isEnabledFor(level):
        extra = {(k if k not in _RESERVED else f"{k}_"): v for k, v in fields.items()}
        logger.log(level, what, extra=extra)
