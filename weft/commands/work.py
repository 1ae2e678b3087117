"""Work-item commands: submit, cancel, requeue, the assignment lifecycle, failure and the dead-letter queue.

The decisions are `weft.core.decisions.work`; a handler mints what they need (ids, the time) and
runs one in the OCC loop.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from projections.events import Event
from projections.state import ProjectState
from weft.commands.core import BatchOutcome, CommandsBase, Ctx, Outcome
from weft.core.decisions import work as decisions
from weft.core.decisions.work import RetryPolicy
from weft.core.errors import IdempotencyKeyReused, Unavailable
from weft.stamps import new_uuid

__all__ = ["RetryPolicy", "WorkCommands"]


class WorkCommands(CommandsBase):
    async def submit_work(self, ctx: Ctx, spec: dict[str, Any]) -> Outcome:
        view = await self.view(ctx.project, create=True)
        key, event_id, earlier = self.keyed_create(ctx, view, "work")
        if earlier is not None:
            return self._same_submission(ctx, view.state, earlier, spec)
        work_id = new_uuid()
        # One event for every attempt: its id (the key's, if any) lets the server dedupe a repeat.
        ev = self.emit(ctx, decisions.submit_work(spec, work_id, new_uuid(), key), event_id)
        outcome = await self.execute(ctx, f"work.{work_id}", lambda s: ev)
        if key and not outcome.created:
            # The first request with this key won inside the dedupe window: answer with its item.
            original = view.state.idempotency.get(key)
            if original is None:  # its event is stored (at outcome.seq) but not folded here yet
                raise Unavailable(f"an earlier request with this Idempotency-Key is at seq {outcome.seq}, not yet "
                                  "readable here; nothing was added: repeat with the same key", field="Idempotency-Key")
            earlier = Outcome(seq=view.state.entity_seq.get(f"work.{original}", 0), entity_id=original, created=False)
            return self._same_submission(ctx, view.state, earlier, spec)
        return outcome

    @staticmethod
    def _same_submission(ctx: Ctx, state: ProjectState, earlier: Outcome, spec: dict[str, Any]) -> Outcome:
        """The earlier item's outcome if this request is a repeat of the one that created it; an
        item already purged from the projection cannot be compared and is answered as a repeat."""
        item = state.work.get(earlier.entity_id)
        differs = decisions.submission_differences(item, spec) if item is not None else []
        if differs:
            raise IdempotencyKeyReused.of(ctx.idempotency_key, "work item", "workItemId", earlier.entity_id, differs)
        return earlier

    async def cancel_work(self, ctx: Ctx, work_id: str, reason: str | None = None) -> Outcome:
        """Idempotent: cancelling a cancelled item is a no-op (no event); a completed or failed one
        is a Conflict (it was not cancelled, and saying so would be a lie)."""

        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.cancel_work(state, work_id, reason))

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def requeue_work(self, ctx: Ctx, work_id: str, reason: str) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.requeue_work(state, work_id, reason))

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def cancel_batch(
        self, ctx: Ctx, ids: list[str] | None, flt: dict[str, Any] | None, reason: str | None, reassign: bool
    ) -> BatchOutcome:
        view = await self.view(ctx.project)
        if ids is None:
            ids = decisions.select_work(view.state, flt or {})
        outcome = BatchOutcome()

        async def run(work_id: str) -> Outcome:
            action = decisions.cancel_batch_action(view.state, work_id, reassign)
            if action == "skip":
                return Outcome(seq=0, entity_id=work_id, noop=True)
            if action == "requeue":
                result = await self.requeue_work(ctx, work_id, reason or "reassigned by cancel-batch")
                outcome.moved.append(work_id)
                return result
            return await self.cancel_work(ctx, work_id, reason)

        return await self._batch(ids, run, outcome)

    async def assign_work(self, ctx: Ctx, work_id: str, guid: str, epoch: int, accept_by: str) -> Outcome:
        """A scheduler decision: re-checked against the newest state, so a stale plan assigns nothing."""

        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.assign_work(state, work_id, guid, epoch, accept_by))

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def accept_work(self, ctx: Ctx, work_id: str, guid: str, attempt: int | None = None) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.accept_work(state, work_id, guid, attempt))

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def progress_work(
        self, ctx: Ctx, work_id: str, guid: str, progress: int, message: str | None, attempt: int | None = None
    ) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.progress_work(state, work_id, guid, progress, message, attempt))

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def complete_work(
        self,
        ctx: Ctx,
        work_id: str,
        guid: str,
        summary: str | None,
        output: Any,
        artifacts: list[Any] | None,
        attempt: int | None = None,
    ) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            draft = decisions.complete_work(state, work_id, guid, summary, output, artifacts, attempt)
            return self.emit(ctx, draft)

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def fail_work(
        self,
        ctx: Ctx,
        work_id: str,
        guid: str,
        message: str,
        code: str | None,
        recoverable: bool,
        retry: RetryPolicy,
        now: datetime | None = None,
        attempt: int | None = None,
    ) -> Outcome:
        at = now or datetime.now(UTC)

        def decide(state: ProjectState) -> Event | None:
            draft = decisions.fail_work(state, work_id, guid, message, code, recoverable, retry, at, attempt)
            return self.emit(ctx, draft)

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def withdraw_assignment(
        self,
        ctx: Ctx,
        work_id: str,
        reason: str,
        epoch: int,
        max_withdrawals: int,
        *,
        guid: str | None = None,
        attempt: int | None = None,
        cause: str | None = None,
    ) -> Outcome:
        """Scheduler: take a live assignment back (agent lost or offline, not accepted in time);
        see `weft.core.decisions.work.withdraw_assignment`. The event records `cause` and the
        holder, so the fold can mark an agent that let an assignment time out as unresponsive."""

        def decide(state: ProjectState) -> Event | None:
            draft = decisions.withdraw_assignment(
                state, work_id, reason, epoch, max_withdrawals, guid=guid, attempt=attempt, cause=cause
            )
            return self.emit(ctx, draft)

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def retry_dead_letter(self, ctx: Ctx, work_id: str, reason: str | None) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.retry_dead_letter(state, work_id, reason))

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def discard_dead_letter(self, ctx: Ctx, work_id: str, reason: str | None) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.discard_dead_letter(state, work_id, reason))

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def purge_work(self, ctx: Ctx, work_id: str, finished_before: str, epoch: int) -> Outcome:
        """Scheduler (retention): drop a finished item from the projection. Its events stay in the
        stream, so a replay still shows it; reads answer 404 from then on."""

        def decide(state: ProjectState) -> Event | None:
            return self.emit(ctx, decisions.purge_work(state, work_id, finished_before, epoch))

        return await self.execute(ctx, f"work.{work_id}", decide)
