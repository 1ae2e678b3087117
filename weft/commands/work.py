"""Work-item commands: submit, cancel, requeue, the assignment lifecycle, failure and the dead-letter queue."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from projections.events import Event, format_ts
from projections.state import LIVE_ASSIGNMENT, TERMINAL_WORK, ProjectState, Record
from projections.work import ACCEPT_TIMEOUT, purgeable
from weft.commands.core import BatchOutcome, CommandsBase, Ctx, Outcome
from weft.core.errors import Conflict, NotFound, Unavailable
from weft.stamps import new_uuid


class WorkCommands(CommandsBase):
    async def submit_work(self, ctx: Ctx, spec: dict[str, Any]) -> Outcome:
        view = await self.view(ctx.project, create=True)
        key, event_id, earlier = self.keyed_create(ctx, view, "work")
        if earlier is not None:
            return earlier
        work_id = new_uuid()
        data = {
            "taskId": spec.get("taskId") or new_uuid(),
            "capability": spec["capability"],
            "boundary": spec["boundary"],
            "description": spec["description"],
            "priority": spec.get("priority", 5),
            "preferredAgentType": spec.get("preferredAgentType"),
            "requiredAgentType": spec.get("requiredAgentType"),
            "deadline": spec.get("deadline"),
            "contextData": spec.get("contextData"),
            "maxAttempts": spec.get("maxAttempts", 3),
        }
        ev = self.event(
            ctx,
            "work.submitted",
            work_id,
            data,
            id=event_id,
            idempotency_key=key,
        )
        outcome = await self.execute(ctx, f"work.{work_id}", lambda s: ev)
        if key and not outcome.created:
            # The first request with this key won inside the dedupe window: answer with its item.
            original = view.state.idempotency.get(key)
            if original is None:  # its event is stored (at outcome.seq) but not folded here yet
                raise Unavailable(f"an earlier request with this Idempotency-Key is at seq {outcome.seq}, not yet "
                                  "readable here; nothing was added: repeat with the same key", field="Idempotency-Key")
            return Outcome(seq=view.state.entity_seq.get(f"work.{original}", 0), entity_id=original, created=False)
        return outcome

    async def cancel_work(self, ctx: Ctx, work_id: str, reason: str | None = None) -> Outcome:
        """Idempotent: cancelling a cancelled item is a no-op (no event); a completed or failed one
        is a Conflict (it was not cancelled, and saying so would be a lie)."""

        def decide(state: ProjectState) -> Event | None:
            item = _work(state, work_id)
            if item["status"] == "cancelled":
                return None
            if item["status"] in TERMINAL_WORK:
                raise Conflict(f"work item {work_id} is already {item['status']}", field="id")
            return self.event(ctx, "work.cancelled", work_id, {"reason": reason})

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def requeue_work(self, ctx: Ctx, work_id: str, reason: str) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            item = _work(state, work_id)
            if item["status"] not in LIVE_ASSIGNMENT:
                raise Conflict(f"work item {work_id} is {item['status']}, not assigned", field="id")
            return self.event(ctx, "work.requeued", work_id, {"reason": reason, "retryAt": None})

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def cancel_batch(
        self, ctx: Ctx, ids: list[str] | None, flt: dict[str, Any] | None, reason: str | None, reassign: bool
    ) -> BatchOutcome:
        view = await self.view(ctx.project)
        if ids is None:
            flt = flt or {}
            state = view.state
            # A named status is one walk of the status index (finished items stay encoded).
            pool = state.work_in(flt["status"]) if flt.get("status") in state.work_by_status else state.work.values()
            ids = [w["id"] for w in pool if _matches_work_filter(w, flt)]
        outcome = BatchOutcome()

        async def run(work_id: str) -> Outcome:
            item = view.state.work.get(work_id)
            if item is not None and item["status"] in TERMINAL_WORK:
                return Outcome(seq=0, entity_id=work_id, noop=True)
            if reassign and item is not None and item["status"] in LIVE_ASSIGNMENT:
                result = await self.requeue_work(ctx, work_id, reason or "reassigned by cancel-batch")
                outcome.moved.append(work_id)
                return result
            return await self.cancel_work(ctx, work_id, reason)

        return await self._batch(ids, run, outcome)

    async def assign_work(self, ctx: Ctx, work_id: str, guid: str, epoch: int, accept_by: str) -> Outcome:
        """A scheduler decision: re-checked against the newest state, so a stale plan assigns nothing."""

        def decide(state: ProjectState) -> Event | None:
            item = state.work.get(work_id)
            agent = state.agents.get(guid)
            if item is None or agent is None or item["status"] != "pending":
                return None
            if agent["status"] == "offline" or agent["shutdownRequested"]:
                return None
            if len(agent["currentTasks"]) >= agent["maxConcurrentTasks"]:
                return None
            data = {"agentGuid": guid, "attempt": item["attempts"] + 1, "acceptBy": accept_by}
            return self.event(ctx, "work.assigned", work_id, data, epoch=epoch)

        return await self.execute(ctx, f"work.{work_id}", decide)

    def _held(self, state: ProjectState, work_id: str, guid: str, attempt: int | None) -> Record:
        item = _work(state, work_id)
        if item["assignedTo"] != guid:
            raise Conflict(f"work item {work_id} is not held by agent {guid}", field="guid")
        if attempt is not None and attempt != item["attempts"]:
            raise Conflict(f"work item {work_id} is at attempt {item['attempts']}, not {attempt}", field="attempt")
        return item

    async def accept_work(self, ctx: Ctx, work_id: str, guid: str, attempt: int | None = None) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            item = self._held(state, work_id, guid, attempt)
            if item["status"] == "in-progress":
                return None
            if item["status"] != "assigned":
                raise Conflict(f"work item {work_id} is {item['status']}", field="workId")
            return self.event(ctx, "work.started", work_id, {"agentGuid": guid})

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def progress_work(
        self, ctx: Ctx, work_id: str, guid: str, progress: int, message: str | None, attempt: int | None = None
    ) -> Outcome:
        def decide(state: ProjectState) -> Event:
            item = self._held(state, work_id, guid, attempt)
            if item["status"] not in LIVE_ASSIGNMENT:
                raise Conflict(f"work item {work_id} is {item['status']}", field="workId")
            data = {"agentGuid": guid, "progress": progress, "message": message}
            return self.event(ctx, "work.progressed", work_id, data)

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
            item = self._held(state, work_id, guid, attempt)
            if item["status"] == "completed":
                return None
            if item["status"] not in LIVE_ASSIGNMENT:
                raise Conflict(f"work item {work_id} is {item['status']}", field="workId")
            data = {"agentGuid": guid, "summary": summary, "output": output, "artifacts": artifacts}
            return self.event(ctx, "work.completed", work_id, data)

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

        def decide(state: ProjectState) -> Event:
            item = self._held(state, work_id, guid, attempt)
            if item["status"] not in LIVE_ASSIGNMENT:
                raise Conflict(f"work item {work_id} is {item['status']}", field="workId")
            again = recoverable and item["attempts"] < item["maxAttempts"]
            data = {
                "agentGuid": guid,
                "message": message,
                "code": code,
                "recoverable": recoverable,
                "outcome": "retry" if again else "dead-letter",
                "retryAt": format_ts(at + retry.delay(item["attempts"])) if again else None,
            }
            return self.event(ctx, "work.failed", work_id, data)

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
        """Scheduler: take a live assignment back (agent lost or offline, not accepted in time).

        A withdrawn attempt counts: an item that used its `maxAttempts` (or `max_withdrawals`, if
        lower) is dead-lettered instead of requeued, as a failed one would be. `guid` and `attempt`
        are what the decision saw: if the item has moved on since (another holder, another
        attempt), nothing is withdrawn; with `cause` "accept-timeout", neither is an item its agent
        accepted meanwhile. The event records `cause` and the holder, so the fold can mark an agent
        that let an assignment time out as unresponsive (`projections.agents`)."""

        def decide(state: ProjectState) -> Event | None:
            item = state.work.get(work_id)
            if item is None or item["status"] not in LIVE_ASSIGNMENT:
                return None
            if (guid is not None and item["assignedTo"] != guid) or (attempt is not None and item["attempts"] != attempt):
                return None
            if cause == ACCEPT_TIMEOUT and item["status"] != "assigned":
                return None  # accepted just in time
            data: dict[str, Any] = {"reason": reason, "cause": cause, "agentGuid": item["assignedTo"]}
            limit = min(max_withdrawals, item.get("maxAttempts") or max_withdrawals)
            if item["attempts"] >= limit:
                data["reason"] = f"{reason}; gave up after {item['attempts']} attempts"
                return self.event(ctx, "work.dead_lettered", work_id, data, epoch=epoch)
            return self.event(ctx, "work.requeued", work_id, {**data, "retryAt": None}, epoch=epoch)

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def retry_dead_letter(self, ctx: Ctx, work_id: str, reason: str | None) -> Outcome:
        def decide(state: ProjectState) -> Event:
            item = _dead_letter(state, work_id)
            return self.event(ctx, "work.retried", item["id"], {"reason": reason})

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def discard_dead_letter(self, ctx: Ctx, work_id: str, reason: str | None) -> Outcome:
        def decide(state: ProjectState) -> Event:
            item = _dead_letter(state, work_id)
            return self.event(ctx, "work.discarded", item["id"], {"reason": reason})

        return await self.execute(ctx, f"work.{work_id}", decide)

    async def purge_work(self, ctx: Ctx, work_id: str, finished_before: str, epoch: int) -> Outcome:
        """Scheduler (retention): drop a finished item from the projection. Its events stay in the
        stream, so a replay still shows it; reads answer 404 from then on."""

        def decide(state: ProjectState) -> Event | None:
            item = state.work.get(work_id)
            if item is None or not purgeable(item) or item["updatedAt"] >= finished_before:
                return None
            return self.event(ctx, "work.purged", work_id, {"reason": "retention"}, epoch=epoch)

        return await self.execute(ctx, f"work.{work_id}", decide)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff between attempts of a recoverable failure."""

    base_ms: int = 2_000
    max_ms: int = 300_000

    def delay(self, attempts: int) -> timedelta:
        return timedelta(milliseconds=min(self.max_ms, self.base_ms * 2 ** max(0, attempts - 1)))


# --- pure helpers ---------------------------------------------------------------------------------

def _work(state: ProjectState, work_id: str) -> Record:
    item = state.work.get(work_id)
    if item is None:
        raise NotFound(f"work item {work_id} not found", field="id")
    return item


def _dead_letter(state: ProjectState, work_id: str) -> Record:
    item = _work(state, work_id)
    dl = item.get("deadLetter")
    if item["status"] != "failed" or not dl or dl["discarded"]:
        raise Conflict(f"work item {work_id} is not in the dead-letter queue", field="id")
    return item


def _matches_work_filter(w: Record, flt: dict[str, Any]) -> bool:
    if flt.get("status") and w["status"] != flt["status"]:
        return False
    if flt.get("boundary") and w["boundary"] != flt["boundary"]:
        return False
    if flt.get("capability") and w["capability"] != flt["capability"]:
        return False
    if flt.get("minPriority") is not None and w["priority"] < flt["minPriority"]:
        return False
    return not (flt.get("assignedTo") and w["assignedTo"] != flt["assignedTo"])
