"""Command handlers: validate against the projection, decide events, append with OCC, retry on conflict.

Every handler follows one loop (`execute`): run a pure `decide(state)` against the current view,
append its event with the entity's last sequence as the expectation, and on a conflict catch up
and decide again. A command answers only after the local projection folded its event, so the
caller reads its own write on this replica and gets `seq` to read it on any other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from projections.state import ProjectState
from weft.errors import Conflict, InvalidInput, NotFound, Unavailable
from weft.events import Event, idempotent_id, new_id
from weft.eventstore import ConcurrencyConflict, EventStore
from weft.replica import ProjectView, Replica

MAX_ATTEMPTS = 8
BATCH_CONCURRENCY = 32


@dataclass(frozen=True, slots=True)
class Ctx:
    """Who asks, for which project, under which correlation id."""

    project: str
    actor: str = "api"
    correlation_id: str | None = None
    idempotency_key: str | None = None


@dataclass(slots=True)
class Outcome:
    seq: int
    entity_id: str
    created: bool = True
    noop: bool = False


@dataclass(slots=True)
class BatchOutcome:
    succeeded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    seq: int = 0


Decide = Callable[[ProjectState], Event | None]


class CommandsBase:
    """The generic command loop every resource mixin builds on."""

    def __init__(self, replica: Replica, store: EventStore, *, wait_s: float = 10.0) -> None:
        self.replica = replica
        self.store = store
        self.wait_s = wait_s

    # --- the one loop ------------------------------------------------------------------------

    async def view(self, project: str) -> ProjectView:
        return await self.replica.view(project, create=True)  # type: ignore[return-value]

    @staticmethod
    def keyed_create(ctx: Ctx, view: ProjectView, entity: str) -> tuple[str | None, str, Outcome | None]:
        """For a create with a client's Idempotency-Key: the key namespaced by entity, the event id
        it implies (same key, same id: the server dedupes a repeat), and the earlier outcome when
        this key already created its entity (outside the server's dedupe window, say)."""
        if not ctx.idempotency_key:
            return None, new_id(), None
        key = f"{entity}:{ctx.idempotency_key}"
        existing = view.state.idempotency.get(key)
        earlier = None
        if existing is not None:
            earlier = Outcome(seq=view.state.entity_seq.get(f"{entity}.{existing}", 0), entity_id=existing, created=False)
        return key, idempotent_id(ctx.project, key), earlier

    def event(self, ctx: Ctx, type_: str, entity_id: str, data: dict[str, Any], **kw: Any) -> Event:
        return Event(
            type=type_,
            entity_id=entity_id,
            data=data,
            project=ctx.project,
            actor=ctx.actor,
            correlation_id=ctx.correlation_id,
            **kw,
        )

    async def execute(self, ctx: Ctx, entity_key: str, decide: Decide) -> Outcome:
        view = await self.view(ctx.project)
        entity_id = entity_key.split(".", 1)[1]
        for _ in range(MAX_ATTEMPTS):
            ev = decide(view.state)
            if ev is None:
                return Outcome(seq=view.state.entity_seq.get(entity_key, 0), entity_id=entity_id, noop=True)
            try:
                appended = await self.store.append(ev, view.state.entity_seq.get(entity_key, 0))
            except ConcurrencyConflict:
                if not await self.replica.catch_up(ctx.project, self.wait_s):
                    raise Unavailable("projection could not catch up after a concurrent write") from None
                continue
            if not await view.wait_for(appended.seq, self.wait_s):
                raise Unavailable(f"event {appended.seq} appended but not yet folded; read with min_seq")
            return Outcome(seq=appended.seq, entity_id=entity_id, created=not appended.duplicate)
        raise Conflict(f"{entity_key} is changing too fast; retry")

    async def _batch(
        self, ids: Iterable[str], run: Callable[[str], Any], outcome: BatchOutcome
    ) -> BatchOutcome:
        sem = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def one(entity_id: str) -> None:
            async with sem:
                try:
                    result = await run(entity_id)
                except (NotFound, Conflict, InvalidInput) as err:
                    outcome.failed.append(entity_id)
                    outcome.errors[entity_id] = err.message
                    return
                if result.noop:
                    outcome.skipped.append(entity_id)
                else:
                    outcome.succeeded.append(entity_id)
                outcome.seq = max(outcome.seq, result.seq)

        await asyncio.gather(*(one(i) for i in ids))
        return outcome
