"""Every command's decision as a pure function: `(state, command args..., now) -> Draft | None`.

A decision reads the project's folded state and answers with the event it wants appended (a
`Draft`: type, entity, data and what the event needs beyond the envelope), `None` for a no-op, or
raises one of `weft.core.errors` (NotFound, Conflict, InvalidInput) to reject the command. It
mints nothing: ids that must be fresh (a new work item's, a spin-up's) and the time it decides at
are arguments, so a decision replays the same way every time and is tested without NATS.
`weft.commands` runs them inside its OCC loop and wraps a draft in the caller's envelope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Draft:
    """An event as decided, before the envelope (id, time, actor, correlation) is put around it.

    `epoch` is the scheduler term a decision was taken in (the fold ignores older ones);
    `idempotency_key` the client's key a create records (the fold answers a repeat with its entity).
    """

    type: str
    entity_id: str
    data: dict[str, Any]
    epoch: int | None = None
    idempotency_key: str | None = None


__all__ = ["Draft"]
