"""JSON-lines logging shared by every role: one object per line on stderr.

Use `log.info("published", extra=fields(volume_id=vid, target=path))`. Anything whose
key looks like a secret is replaced before it is written, so a caller that passes a
request's secrets by mistake still never prints them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

SECRET_HINTS = ("secret", "token", "password", "passwd", "credential", "key")
REDACTED = "***"


def is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(hint in lowered for hint in SECRET_HINTS) and not lowered.endswith(("_id", "-id"))


def redact(value: Any) -> Any:
    """A copy of `value` with secret-looking mapping keys' values replaced."""
    if isinstance(value, Mapping):
        return {k: REDACTED if is_secret_key(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def fields(**kwargs: Any) -> dict[str, Any]:
    return {"fields": kwargs}


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": self.role,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(redact(extra))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def setup(role: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # warnings (urllib3's InsecureRequestWarning, deprecations) become JSON lines too, never
    # raw text between them
    logging.captureWarnings(True)


def active() -> bool:
    """Whether setup() ran: a role's stderr is then JSON lines only."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
