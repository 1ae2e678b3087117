"""Exceptions of the core, named for what went wrong. The API maps them to HTTP in one place."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


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


class Forbidden(WeftError):
    """The request's token may not do this (its role), or may not use the project it named."""

    error = "Forbidden"


class Conflict(WeftError):
    error = "Conflict"


class IdempotencyKeyReused(WeftError):
    """An Idempotency-Key sent again with a different request: the first request's result stands,
    and the second is refused rather than silently dropped (IETF idempotency-key draft: 422)."""

    error = "IdempotencyKeyReused"

    @classmethod
    def of(cls, key: str | None, what: str, id_field: str, entity_id: str, differs: list[str]) -> IdempotencyKeyReused:
        return cls(
            f"Idempotency-Key {key!r} was used for another request ({what} {entity_id}); this one differs in "
            f"{', '.join(differs)}: use a new key",
            field="Idempotency-Key",
            details={id_field: entity_id, "differs": differs},
        )


class Fenced(Conflict):
    """A scheduler decision of an epoch older than the stream's: its leader was deposed."""

    error = "Fenced"


class Unavailable(WeftError):
    """The store or the projection cannot answer now (NATS down, projection behind): retry later.
    Raised only when the command's event is known not to be in the stream."""

    error = "Unavailable"


class OutcomeUnknown(WeftError):
    """The event store never answered the append (every attempt timed out): the event may or may
    not be in the stream. `details` name the event and entity so the caller can find out."""

    error = "OutcomeUnknown"


def field_of(loc: tuple[Any, ...]) -> str:
    """A validation error location as a field path: ("filter", "status") -> "filter.status"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_errors(err: ValidationError) -> list[dict[str, str]]:
    """Each failure of a pydantic validation as {field, message, code}; unparseable JSON is the
    whole body's failure ("body"), whatever location pydantic gives it."""
    out = []
    for e in err.errors(include_url=False):
        name = "body" if e["type"] == "json_invalid" else field_of(tuple(e["loc"]))
        out.append({"field": name, "message": e["msg"], "code": e["type"]})
    return out


def invalid_field(err: ValidationError) -> tuple[str, str]:
    """(field, message) of a validation's first failure: what a one-line answer names."""
    first = next(iter(validation_errors(err)), {"field": "body", "message": "invalid"})
    return first["field"], first["message"]
