"""Exceptions of the core, named for what went wrong. The API maps them to HTTP in one place."""

from __future__ import annotations

from typing import Any


class WeftError(Exception):
    """Base: `error` is the machine-readable name, `field` the offending input if any."""

    error = "Error"

    def __init__(self, message: str, *, field: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = dict(details or {})
        if field is not None:
            self.details.setdefault("field", field)


class InvalidInput(WeftError):
    error = "ValidationError"


class NotFound(WeftError):
    error = "NotFound"


class Conflict(WeftError):
    error = "Conflict"


class Unavailable(WeftError):
    """The store or the projection cannot answer now (NATS down, projection behind): retry later."""

    error = "Unavailable"


def field_of(loc: tuple[Any, ...]) -> str:
    """A validation error location as a field path: ("filter", "status") -> "filter.status"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"
