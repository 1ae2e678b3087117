"""Command handlers: validate against the projection, decide events, append with OCC, retry on conflict.

Every handler follows one loop (`execute`): run a pure `decide(state)` against the current view
(a decision of `weft.core.decisions`, its draft wrapped in the caller's envelope by `emit`),
append its event with the entity's last sequence as the expectation, and on a conflict catch up
and decide again. A command answers once the local projection folded its event, so the caller
reads its own write on this replica and gets `seq` to read it on any other. A stored event is a
success even when the fold is slow (`Outcome.folded` False): an error would invite a retry that
repeats an unkeyed create. An append whose outcome the store could not learn is `OutcomeUnknown`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from projections.events import Event, idempotent_id
from projections.state import ProjectState
from weft.core.decisions import Draft
from weft.core.errors import Conflict, Fenced, InvalidInput, NotFound, OutcomeUnknown, Unavailable
from weft.metrics import NOOP, Metrics, command_name
from weft.spinup.policy import ALLOW_ALL_FILE, PolicyFile
from weft.stamps import new_id, utc_now
from weft.store.eventstore import AppendOutcomeUnknown, ConcurrencyConflict, EventStore
from weft.store.readmodel import ProjectView, ReadModel
from weft.tracing import NOOP as NO_TRACING
from weft.tracing import SpanKind, Tracing

MAX_ATTEMPTS = 8
BATCH_CONCURRENCY = 32


@dataclass(frozen=True, slots=True)
class Ctx:
    """Who asks, for which project, under which correlation id."""

    project: str
    actor: str = "api"
    correlation_id: str | None = None
    idempotency_key: str | None = None
    # Check a no-op or a rejection against the stream's latest state first (one round trip). The
    # scheduler does not: its no-ops are re-planned on the next event anyway.
    fresh_answers: bool = True


@dataclass(slots=True)
class Outcome:
    seq: int
    entity_id: str
    created: bool = True
    noop: bool = False
    folded: bool = True  # False: stored at `seq`, but this replica's view had not reached it yet


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

    def __init__(
        self,
        readmodel: ReadModel,
        store: EventStore,
        *,
        wait_s: float = 10.0,
        metrics: Metrics = NOOP,
        spinup_policy: PolicyFile = ALLOW_ALL_FILE,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.readmodel = readmodel
        self.store = store
        self.wait_s = wait_s
        self.metrics = metrics
        self.tracing = tracing  # spans of each attempt: decide, append, fold (weft.tracing)
        self.spinup_policy = spinup_policy  # checked at registration here, at launch and probe in weft.runtime

    # --- the one loop ------------------------------------------------------------------------

    async def view(self, project: str, *, create: bool = False) -> ProjectView:
        """The project's view. Only commands that create an entity (`create`) create a project:
        anything else on an unknown project sees an empty, unattached state (and so answers
        404 or does nothing) instead of leaving a stream, a lease and a scheduler behind."""
        view = await self.readmodel.view(project, create=create)
        return view if view is not None else ProjectView(project)

    def _attached(self, view: ProjectView) -> bool:
        return self.readmodel.views.get(view.project) is view

    @staticmethod
    def keyed_create(ctx: Ctx, view: ProjectView, entity: str) -> tuple[str | None, str, Outcome | None]:
        """For a create with a client's Idempotency-Key: the key namespaced by entity, the event id
        it implies (same key, same id: the server dedupes a repeat), and the earlier outcome when
        this key already created its entity (outside the server's dedupe window, say)."""
        if not ctx.idempotency_key:
            return None, new_id(), None
        # Scoped by actor: another token's key, however alike, is another request.
        key = f"{entity}:{ctx.actor}:{ctx.idempotency_key}"
        existing = view.state.idempotency.get(key)
        earlier = None
        if existing is not None:
            earlier = Outcome(seq=view.state.entity_seq.get(f"{entity}.{existing}", 0), entity_id=existing, created=False)
        return key, idempotent_id(ctx.project, key), earlier

    @staticmethod
    def emit(ctx: Ctx, draft: Draft | None, event_id: str | None = None) -> Event | None:
        """A pure decision's draft in `ctx`'s envelope, stamped now (`None` stays a no-op). The id
        is fresh unless the command fixes it (an Idempotency-Key's, a bridge's), so the server
        dedupes a repeat of that one."""
        if draft is None:
            return None
        return Event(
            type=draft.type,
            entity_id=draft.entity_id,
            data=draft.data,
            project=ctx.project,
            id=event_id or new_id(),
            ts=utc_now(),
            actor=ctx.actor,
            correlation_id=ctx.correlation_id,
            epoch=draft.epoch,
            idempotency_key=draft.idempotency_key,
        )

    async def execute(self, ctx: Ctx, entity_key: str, decide: Decide) -> Outcome:
        """`_execute`, counted by command and outcome (weft_commands_total); traced under the
        current span (a request's, an assignment's), else under a root span of its own."""
        name = command_name(decide)
        if self.tracing.enabled and not self.tracing.in_live_span():
            with self.tracing.span(f"command {name}", self._span_attrs(ctx, name), root=True):
                return await self._counted(ctx, entity_key, decide, name)
        return await self._counted(ctx, entity_key, decide, name)

    @staticmethod
    def _span_attrs(ctx: Ctx, name: str) -> dict[str, Any]:
        return {"weft.project": ctx.project, "weft.command": name, "weft.correlation_id": ctx.correlation_id}

    async def _counted(self, ctx: Ctx, entity_key: str, decide: Decide, name: str) -> Outcome:
        outcome = "error"
        try:
            result = await self._execute(ctx, entity_key, decide, name)
            outcome = "noop" if result.noop else "duplicate" if not result.created else "appended"
            return result
        except Fenced:
            outcome = "fenced"
            raise
        except (NotFound, Conflict, InvalidInput):
            outcome = "rejected"
            raise
        except OutcomeUnknown:
            outcome = "unknown"
            raise
        except Unavailable:
            outcome = "unavailable"
            raise
        finally:
            self.metrics.command(ctx.project, name, outcome)

    async def _execute(self, ctx: Ctx, entity_key: str, decide: Decide, name: str) -> Outcome:
        view = await self.view(ctx.project)
        entity_id = entity_key.split(".", 1)[1]
        # A no-op or a rejection is an answer too: give it from the stream's latest state, not a
        # view that may lag (another replica's write). Nothing to catch up on an unknown project.
        latest = not ctx.fresh_answers or not self._attached(view)
        span = self.tracing.span
        attrs = self._span_attrs(ctx, name) if self.tracing.enabled else {}
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                self.metrics.command_retry(ctx.project, name)
            if view.halted is not None:
                raise Unavailable(f"project {ctx.project} cannot be served by this weft: {view.halted[1]}")
            try:
                with span("decide", {**attrs, "weft.attempt": attempt}) as decided:
                    ev = decide(view.state)
                    decided.set_attribute("weft.noop", ev is None)
            except (NotFound, Conflict):
                if latest:
                    raise
                latest = await self._catch_up(ctx.project)
                continue
            if ev is None:
                if latest:
                    return Outcome(seq=view.state.entity_seq.get(entity_key, 0), entity_id=entity_id, noop=True)
                latest = await self._catch_up(ctx.project)
                continue
            if not self._attached(view):
                raise RuntimeError(f"{ev.type} on unknown project {ctx.project}: its command must create it")
            if ev.epoch is not None and ev.epoch < view.state.epoch:
                # The fold would ignore it: a newer leader announced itself. Never append (or retry).
                raise Fenced(f"{ev.type} of epoch {ev.epoch} is fenced by epoch {view.state.epoch}")
            try:
                with span("append", {
                    **attrs, "weft.event_type": ev.type, "messaging.system": "nats",
                    "messaging.destination.name": ev.subject,
                }, kind=SpanKind.PRODUCER) as appending:
                    appended = await self.store.append(ev, view.state.entity_seq.get(entity_key, 0))
                    appending.set_attributes({"weft.stream_seq": appended.seq, "weft.duplicate": appended.duplicate})
            except ConcurrencyConflict:
                latest = await self._catch_up(ctx.project)  # after a concurrent write
                continue
            except AppendOutcomeUnknown as err:
                raise outcome_unknown(ctx, ev) from err
            with span("fold", {**attrs, "weft.stream_seq": appended.seq}) as folding:
                folded = await view.wait_for(appended.seq, self.wait_s)
                folding.set_attribute("weft.folded", folded)
            return Outcome(seq=appended.seq, entity_id=entity_id, created=not appended.duplicate, folded=folded)
        raise Conflict(f"{entity_key} is changing too fast; retry")

    async def _catch_up(self, project: str) -> bool:
        if not await self.readmodel.catch_up(project, self.wait_s):
            raise Unavailable(f"projection of {project} could not catch up with the stream; retry")
        return True

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


def outcome_unknown(ctx: Ctx, ev: Event) -> OutcomeUnknown:
    """What a caller needs to find out for itself whether `ev` was stored."""
    how = (
        "repeat the request with the same Idempotency-Key (answered from the stored event if it landed)"
        if ctx.idempotency_key
        else f"look up {ev.entity} {ev.entity_id} (or the correlation id); repeating the request without an "
        "Idempotency-Key may apply it twice"
    )
    return OutcomeUnknown(
        f"the event store did not confirm {ev.type} of {ev.entity} {ev.entity_id}; it may or may not have "
        f"been applied: {how}",
        details={
            "eventId": ev.id,
            "type": ev.type,
            "entity": ev.entity,
            "entityId": ev.entity_id,
            "correlationId": ctx.correlation_id,
            "idempotencyKey": ctx.idempotency_key,
        },
    )
