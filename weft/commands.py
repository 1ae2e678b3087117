"""Command handlers: validate against the projection, decide events, append with OCC, retry on conflict.

Every handler follows one loop (`_execute`): run a pure `decide(state)` against the current view,
append its event with the entity's last sequence as the expectation, and on a conflict catch up
and decide again. A command answers only after the local projection folded its event, so the
caller reads its own write on this replica and gets `seq` to read it on any other.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from projections.state import LIVE_ASSIGNMENT, TERMINAL_WORK, ProjectState, Record
from weft import targetspec
from weft.errors import Conflict, InvalidInput, NotFound, Unavailable
from weft.events import Event, format_ts, idempotent_id, new_id, new_uuid, parse_ts
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


class Commands:
    def __init__(self, replica: Replica, store: EventStore, *, wait_s: float = 10.0) -> None:
        self.replica = replica
        self.store = store
        self.wait_s = wait_s

    # --- the one loop ------------------------------------------------------------------------

    async def view(self, project: str) -> ProjectView:
        return await self.replica.view(project, create=True)  # type: ignore[return-value]

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

    # --- work ----------------------------------------------------------------------------------

    async def submit_work(self, ctx: Ctx, spec: dict[str, Any]) -> Outcome:
        view = await self.view(ctx.project)
        key = f"work:{ctx.idempotency_key}" if ctx.idempotency_key else None
        if key and key in view.state.idempotency:
            existing = view.state.idempotency[key]
            return Outcome(seq=view.state.entity_seq.get(f"work.{existing}", 0), entity_id=existing, created=False)
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
            id=idempotent_id(ctx.project, key) if key else new_id(),
            idempotency_key=key,
        )
        outcome = await self.execute(ctx, f"work.{work_id}", lambda s: ev)
        if key and not outcome.created:
            # The first request with this key won inside the dedupe window: answer with its item.
            original = view.state.idempotency.get(key, work_id)
            return Outcome(seq=view.state.entity_seq.get(f"work.{original}", 0), entity_id=original, created=False)
        return outcome

    async def cancel_work(self, ctx: Ctx, work_id: str, reason: str | None = None) -> Outcome:
        def decide(state: ProjectState) -> Event:
            item = _work(state, work_id)
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
            ids = [w["id"] for w in view.state.work.values() if _matches_work_filter(w, flt or {})]
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

    # --- agents -------------------------------------------------------------------------------

    async def request_shutdown(
        self, ctx: Ctx, guid: str, graceful: bool, reason: str, grace_period_ms: int | None
    ) -> Outcome:
        def decide(state: ProjectState) -> Event:
            agent = state.agents.get(guid)
            if agent is None:
                raise NotFound(f"agent {guid} not found", field="guid")
            if agent["status"] == "offline":
                raise Conflict(f"agent {guid} is offline", field="guid")
            data = {"graceful": graceful, "reason": reason, "gracePeriodMs": grace_period_ms}
            return self.event(ctx, "agent.shutdown_requested", guid, data)

        return await self.execute(ctx, f"agent.{guid}", decide)

    async def shutdown_batch(
        self,
        ctx: Ctx,
        guids: list[str] | None,
        flt: dict[str, Any] | None,
        graceful: bool,
        reason: str,
        grace_period_ms: int | None,
        now: datetime | None = None,
    ) -> BatchOutcome:
        view = await self.view(ctx.project)
        if guids is None:
            at = now or datetime.now(UTC)
            guids = [a["guid"] for a in view.state.agents.values() if _matches_agent_filter(a, flt or {}, at)]
        return await self._batch(
            guids, lambda g: self.request_shutdown(ctx, g, graceful, reason, grace_period_ms), BatchOutcome()
        )

    # --- targets ------------------------------------------------------------------------------

    async def register_target(self, ctx: Ctx, body: Any) -> Outcome:
        definition = targetspec.validate_new_target(body)
        # The id derives from the name, so two replicas registering one name contend on one subject
        # and optimistic concurrency lets exactly one win: names stay unique without a lock.
        target_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"weft-target:{ctx.project}:{definition['name']}"))
        view = await self.view(ctx.project)
        key = f"target:{ctx.idempotency_key}" if ctx.idempotency_key else None
        if key and key in view.state.idempotency:
            existing = view.state.idempotency[key]
            return Outcome(seq=view.state.entity_seq.get(f"target.{existing}", 0), entity_id=existing, created=False)

        def decide(state: ProjectState) -> Event:
            if find_target(state, definition["name"]) is not None:
                raise Conflict(f"a target named {definition['name']!r} already exists", field="name")
            return self.event(
                ctx,
                "target.registered",
                target_id,
                {"target": definition},
                id=idempotent_id(ctx.project, key) if key else new_id(),
                idempotency_key=key,
            )

        return await self.execute(ctx, f"target.{target_id}", decide)

    async def update_target(self, ctx: Ctx, id_or_name: str, updates: Any) -> Outcome:
        target_id = self._target_id(await self.view(ctx.project), id_or_name)

        def decide(state: ProjectState) -> Event | None:
            current = _target(state, target_id)
            changes = targetspec.validate_update(current, updates)
            if not changes:
                return None
            return self.event(ctx, "target.updated", target_id, {"changes": changes})

        return await self.execute(ctx, f"target.{target_id}", decide)

    async def remove_target(self, ctx: Ctx, id_or_name: str, reason: str | None = None) -> Outcome:
        target_id = self._target_id(await self.view(ctx.project), id_or_name)

        def decide(state: ProjectState) -> Event:
            _target(state, target_id)
            return self.event(ctx, "target.removed", target_id, {"reason": reason})

        return await self.execute(ctx, f"target.{target_id}", decide)

    async def set_target_enabled(self, ctx: Ctx, id_or_name: str, enabled: bool, reason: str | None = None) -> Outcome:
        target_id = self._target_id(await self.view(ctx.project), id_or_name)

        def decide(state: ProjectState) -> Event | None:
            t = _target(state, target_id)
            if enabled and t["status"] == "available":
                return None
            if not enabled and t["status"] == "disabled":
                return None
            return self.event(ctx, "target.enabled" if enabled else "target.disabled", target_id, {"reason": reason})

        return await self.execute(ctx, f"target.{target_id}", decide)

    async def disable_batch(
        self, ctx: Ctx, ids: list[str] | None, flt: dict[str, Any] | None, reason: str | None
    ) -> BatchOutcome:
        view = await self.view(ctx.project)
        if ids is None:
            ids = [t["id"] for t in view.state.targets.values() if _matches_target_filter(t, flt or {})]
        return await self._batch(ids, lambda i: self.set_target_enabled(ctx, i, False, reason), BatchOutcome())

    async def record_health(
        self, ctx: Ctx, target_id: str, status: str, latency_ms: float | None, error: str | None
    ) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            t = _target(state, target_id)
            if t["healthStatus"] == status and (status == "healthy" or t.get("lastError") == error):
                return None
            data = {"healthStatus": status, "latencyMs": latency_ms, "error": error}
            return self.event(ctx, "target.health_changed", target_id, data)

        return await self.execute(ctx, f"target.{target_id}", decide)

    async def request_spin_up(
        self, ctx: Ctx, id_or_name: str, work_id: str | None = None, reason: str = "manual", epoch: int | None = None
    ) -> tuple[Outcome, str]:
        target_id = self._target_id(await self.view(ctx.project), id_or_name)
        spin_up_id = new_uuid()

        def decide(state: ProjectState) -> Event:
            t = _target(state, target_id)
            if t["status"] != "available":
                raise Conflict(f"target {t['name']} is {t['status']}", field="id")
            item = state.work.get(work_id) if work_id else None
            data = {
                "spinUpId": spin_up_id,
                "workId": work_id,
                "capability": item["capability"] if item else None,
                "boundary": item["boundary"] if item else None,
                "reason": reason,
            }
            return self.event(ctx, "spinup.requested", target_id, data, epoch=epoch)

        return await self.execute(ctx, f"target.{target_id}", decide), spin_up_id

    async def record_spin_up(
        self, ctx: Ctx, target_id: str, spin_up_id: str, type_: str, data: dict[str, Any], epoch: int
    ) -> Outcome:
        """spinup.started / .completed / .failed for a spin-up still in flight (else a no-op)."""

        def decide(state: ProjectState) -> Event | None:
            t = state.targets.get(target_id)
            if t is None or spin_up_id not in t["activeSpinUps"]:
                return None
            if type_ == "spinup.started" and t["activeSpinUps"][spin_up_id]["status"] != "requested":
                return None
            return self.event(ctx, type_, target_id, {"spinUpId": spin_up_id, **data}, epoch=epoch)

        return await self.execute(ctx, f"target.{target_id}", decide)

    async def scale_down_idle(self, ctx: Ctx, guid: str, epoch: int) -> Outcome:
        """Ask an idle agent to stop, re-checking on the newest state that it still holds nothing."""

        def decide(state: ProjectState) -> Event | None:
            agent = state.agents.get(guid)
            if agent is None or agent["status"] == "offline" or agent["currentTaskCount"] or agent["shutdownRequested"]:
                return None
            data = {"graceful": True, "reason": "idle-timeout", "gracePeriodMs": None}
            return self.event(ctx, "agent.shutdown_requested", guid, data, epoch=epoch)

        return await self.execute(ctx, f"agent.{guid}", decide)

    def _target_id(self, view: ProjectView, id_or_name: str) -> str:
        t = find_target(view.state, id_or_name)
        if t is None:
            raise NotFound(f"target {id_or_name} not found", field="idOrName")
        return str(t["id"])


    # --- agents and the work loop ---------------------------------------------------------------

    async def register_agent(self, ctx: Ctx, decl: dict[str, Any], event_id: str | None = None) -> Outcome:
        """`event_id` makes a registration idempotent across replicas (e.g. the Warp bridge derives it
        from the KV revision, so every replica that sees the entry appends the same event once)."""
        guid = decl["guid"]
        data = {
            "guid": guid,
            "handle": decl.get("handle"),
            "agentType": decl["agentType"],
            "capabilities": list(decl["capabilities"]),
            "boundaries": list(decl["boundaries"]),
            "maxConcurrentTasks": decl.get("maxConcurrentTasks", 1),
            "hostname": decl.get("hostname"),
            "username": decl.get("username"),
            "visibility": decl.get("visibility", "project-only"),
            "labels": dict(decl.get("labels") or {}),
            "source": decl.get("source", "weft"),
            "spinUpId": decl.get("spinUpId"),
            "targetId": decl.get("targetId"),
            "spindownAfterIdleMs": decl.get("spindownAfterIdleMs"),
        }
        ev_id = event_id or new_id()
        return await self.execute(
            ctx, f"agent.{guid}", lambda s: self.event(ctx, "agent.registered", guid, data, id=ev_id)
        )

    async def deregister_agent(self, ctx: Ctx, guid: str, reason: str | None) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            agent = state.agents.get(guid)
            if agent is None:
                raise NotFound(f"agent {guid} not found", field="guid")
            if agent["status"] == "offline":
                return None
            return self.event(ctx, "agent.deregistered", guid, {"reason": reason})

        return await self.execute(ctx, f"agent.{guid}", decide)

    async def mark_agent_lost(self, ctx: Ctx, guid: str, last_heartbeat: str | None, epoch: int) -> Outcome:
        def decide(state: ProjectState) -> Event | None:
            agent = state.agents.get(guid)
            if agent is None or agent["status"] == "offline":
                return None
            return self.event(ctx, "agent.lost", guid, {"lastHeartbeat": last_heartbeat}, epoch=epoch)

        return await self.execute(ctx, f"agent.{guid}", decide)

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

    async def withdraw_assignment(self, ctx: Ctx, work_id: str, reason: str, epoch: int, max_withdrawals: int) -> Outcome:
        """Scheduler: take a live assignment back (agent lost, not accepted in time). An item whose
        agents keep vanishing is dead-lettered rather than requeued forever."""

        def decide(state: ProjectState) -> Event | None:
            item = state.work.get(work_id)
            if item is None or item["status"] not in LIVE_ASSIGNMENT:
                return None
            if item["attempts"] >= max_withdrawals:
                msg = f"{reason}; gave up after {item['attempts']} attempts"
                return self.event(ctx, "work.dead_lettered", work_id, {"reason": msg}, epoch=epoch)
            return self.event(ctx, "work.requeued", work_id, {"reason": reason, "retryAt": None}, epoch=epoch)

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


def _target(state: ProjectState, target_id: str) -> Record:
    t = state.targets.get(target_id)
    if t is None:
        raise NotFound(f"target {target_id} not found", field="idOrName")
    return t


def find_target(state: ProjectState, id_or_name: str) -> Record | None:
    t = state.targets.get(id_or_name)
    if t is not None:
        return t
    for candidate in state.targets.values():
        if candidate["name"] == id_or_name:
            return candidate
    return None


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


def _matches_agent_filter(a: Record, flt: dict[str, Any], now: datetime) -> bool:
    if flt.get("status") and a["status"] != flt["status"]:
        return False
    if flt.get("agentType") and a["agentType"] != flt["agentType"]:
        return False
    if flt.get("capability") and flt["capability"] not in a["capabilities"]:
        return False
    if flt.get("boundary") and flt["boundary"] not in a["boundaries"]:
        return False
    idle = flt.get("idleTimeMs")
    if idle is not None:
        if a["currentTaskCount"] > 0:
            return False
        idle_for = (now - parse_ts(a["lastActivity"])).total_seconds() * 1000
        if idle_for < idle:
            return False
    return True


def _matches_target_filter(t: Record, flt: dict[str, Any]) -> bool:
    return all(not flt.get(k) or t.get(k) == flt[k] for k in ("agentType", "status", "mechanism"))
