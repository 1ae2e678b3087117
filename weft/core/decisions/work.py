"""Work-item decisions: submit, cancel, requeue, the assignment lifecycle, failure, the dead-letter
queue and retention. Pure: the state, the command's arguments and (for a failure) the time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from projections.events import format_ts
from projections.state import LIVE_ASSIGNMENT, TERMINAL_WORK, ProjectState, Record
from projections.work import ACCEPT_TIMEOUT, purgeable
from weft.core.decisions import Draft
from weft.core.errors import Conflict, NotFound


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff between attempts of a recoverable failure."""

    base_ms: int = 2_000
    max_ms: int = 300_000

    def delay(self, attempts: int) -> timedelta:
        return timedelta(milliseconds=min(self.max_ms, self.base_ms * 2 ** max(0, attempts - 1)))


# --- lookups that reject ---------------------------------------------------------------------------


def work_item(state: ProjectState, work_id: str) -> Record:
    item = state.work.get(work_id)
    if item is None:
        raise NotFound(f"work item {work_id} not found", field="id")
    return item


def held(state: ProjectState, work_id: str, guid: str, attempt: int | None) -> Record:
    """The item, if agent `guid` holds it (at `attempt`, when the agent names one)."""
    item = work_item(state, work_id)
    if item["assignedTo"] != guid:
        raise Conflict(f"work item {work_id} is not held by agent {guid}", field="guid")
    if attempt is not None and attempt != item["attempts"]:
        raise Conflict(f"work item {work_id} is at attempt {item['attempts']}, not {attempt}", field="attempt")
    return item


def dead_letter(state: ProjectState, work_id: str) -> Record:
    item = work_item(state, work_id)
    dl = item.get("deadLetter")
    if item["status"] != "failed" or not dl or dl["discarded"]:
        raise Conflict(f"work item {work_id} is not in the dead-letter queue", field="id")
    return item


def _live(item: Record, work_id: str) -> None:
    if item["status"] not in LIVE_ASSIGNMENT:
        raise Conflict(f"work item {work_id} is {item['status']}", field="workId")


# --- client commands -------------------------------------------------------------------------------


def submit_work(spec: dict[str, Any], work_id: str, task_id: str, idempotency_key: str | None = None) -> Draft:
    """A new item: `work_id` is fresh, `task_id` the one to use when the spec names none. A submit
    checks nothing against the state (a repeated Idempotency-Key is answered before deciding)."""
    data = {
        "taskId": spec.get("taskId") or task_id,
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
    return Draft("work.submitted", work_id, data, idempotency_key=idempotency_key)


def submission_differences(item: Record, spec: dict[str, Any]) -> list[str]:
    """The fields in which `spec` differs from what created `item` (a repeat of an Idempotency-Key
    must be the same request). A spec without a taskId matches the generated one."""
    again = submit_work(spec, item["id"], item["taskId"]).data
    return sorted(name for name, value in again.items() if item.get(name) != value)


def cancel_work(state: ProjectState, work_id: str, reason: str | None) -> Draft | None:
    """Idempotent: cancelling a cancelled item is a no-op; a completed or failed one is a Conflict
    (it was not cancelled, and saying so would be a lie)."""
    item = work_item(state, work_id)
    if item["status"] == "cancelled":
        return None
    if item["status"] in TERMINAL_WORK:
        raise Conflict(f"work item {work_id} is already {item['status']}", field="id")
    return Draft("work.cancelled", work_id, {"reason": reason})


def requeue_work(state: ProjectState, work_id: str, reason: str) -> Draft:
    item = work_item(state, work_id)
    if item["status"] not in LIVE_ASSIGNMENT:
        raise Conflict(f"work item {work_id} is {item['status']}, not assigned", field="id")
    return Draft("work.requeued", work_id, {"reason": reason, "retryAt": None})


BatchAction = Literal["skip", "requeue", "cancel"]


def cancel_batch_action(state: ProjectState, work_id: str, reassign: bool) -> BatchAction:
    """What a cancel-batch does to one item: a finished one is skipped, a live assignment is
    requeued when the batch reassigns, anything else (an unknown id too) is cancelled."""
    item = state.work.get(work_id)
    if item is not None and item["status"] in TERMINAL_WORK:
        return "skip"
    if reassign and item is not None and item["status"] in LIVE_ASSIGNMENT:
        return "requeue"
    return "cancel"


def matches_work_filter(w: Record, flt: dict[str, Any]) -> bool:
    if flt.get("status") and w["status"] != flt["status"]:
        return False
    if flt.get("boundary") and w["boundary"] != flt["boundary"]:
        return False
    if flt.get("capability") and w["capability"] != flt["capability"]:
        return False
    if flt.get("minPriority") is not None and w["priority"] < flt["minPriority"]:
        return False
    return not (flt.get("assignedTo") and w["assignedTo"] != flt["assignedTo"])


def select_work(state: ProjectState, flt: dict[str, Any]) -> list[str]:
    """Ids of the items a batch filter names. A named status is one walk of the status index."""
    pool = state.work_in(flt["status"]) if flt.get("status") in state.work_by_status else state.work.values()
    return [w["id"] for w in pool if matches_work_filter(w, flt)]


# --- the assignment lifecycle ----------------------------------------------------------------------


def assign_work(state: ProjectState, work_id: str, guid: str, epoch: int, accept_by: str) -> Draft | None:
    """A scheduler decision, re-checked on the newest state: a stale plan assigns nothing."""
    item = state.work.get(work_id)
    agent = state.agents.get(guid)
    if item is None or agent is None or item["status"] != "pending":
        return None
    if agent["status"] == "offline" or agent["shutdownRequested"]:
        return None
    if len(agent["currentTasks"]) >= agent["maxConcurrentTasks"]:
        return None
    data = {"agentGuid": guid, "attempt": item["attempts"] + 1, "acceptBy": accept_by}
    return Draft("work.assigned", work_id, data, epoch=epoch)


def accept_work(state: ProjectState, work_id: str, guid: str, attempt: int | None = None) -> Draft | None:
    item = held(state, work_id, guid, attempt)
    if item["status"] == "in-progress":
        return None
    if item["status"] != "assigned":
        raise Conflict(f"work item {work_id} is {item['status']}", field="workId")
    return Draft("work.started", work_id, {"agentGuid": guid})


def progress_work(
    state: ProjectState, work_id: str, guid: str, progress: int, message: str | None, attempt: int | None = None
) -> Draft:
    item = held(state, work_id, guid, attempt)
    _live(item, work_id)
    return Draft("work.progressed", work_id, {"agentGuid": guid, "progress": progress, "message": message})


def complete_work(
    state: ProjectState,
    work_id: str,
    guid: str,
    summary: str | None,
    output: Any,
    artifacts: list[Any] | None,
    attempt: int | None = None,
) -> Draft | None:
    item = held(state, work_id, guid, attempt)
    if item["status"] == "completed":
        return None
    _live(item, work_id)
    data = {"agentGuid": guid, "summary": summary, "output": output, "artifacts": artifacts}
    return Draft("work.completed", work_id, data)


def fail_work(
    state: ProjectState,
    work_id: str,
    guid: str,
    message: str,
    code: str | None,
    recoverable: bool,
    retry: RetryPolicy,
    now: datetime,
    attempt: int | None = None,
) -> Draft:
    """A failed attempt: retried after the policy's backoff from `now` while the failure is
    recoverable and attempts remain, dead-lettered otherwise (the event carries the outcome)."""
    item = held(state, work_id, guid, attempt)
    _live(item, work_id)
    again = recoverable and item["attempts"] < item["maxAttempts"]
    data = {
        "agentGuid": guid,
        "message": message,
        "code": code,
        "recoverable": recoverable,
        "outcome": "retry" if again else "dead-letter",
        "retryAt": format_ts(now + retry.delay(item["attempts"])) if again else None,
    }
    return Draft("work.failed", work_id, data)


def withdrawal_limit(item: Record, max_withdrawals: int) -> int:
    """Attempts after which a withdrawal dead-letters the item instead of requeueing it."""
    return min(max_withdrawals, int(item.get("maxAttempts") or max_withdrawals))


def withdraw_assignment(
    state: ProjectState,
    work_id: str,
    reason: str,
    epoch: int,
    max_withdrawals: int,
    *,
    guid: str | None = None,
    attempt: int | None = None,
    cause: str | None = None,
) -> Draft | None:
    """Scheduler: take a live assignment back (agent lost or offline, not accepted in time).

    A withdrawn attempt counts: an item that used its `maxAttempts` (or `max_withdrawals`, if
    lower) is dead-lettered instead of requeued. `guid` and `attempt` are what the scheduler saw:
    if the item has moved on since, nothing is withdrawn; with `cause` "accept-timeout", neither
    is an item its agent accepted meanwhile."""
    item = state.work.get(work_id)
    if item is None or item["status"] not in LIVE_ASSIGNMENT:
        return None
    if (guid is not None and item["assignedTo"] != guid) or (attempt is not None and item["attempts"] != attempt):
        return None
    if cause == ACCEPT_TIMEOUT and item["status"] != "assigned":
        return None  # accepted just in time
    data: dict[str, Any] = {"reason": reason, "cause": cause, "agentGuid": item["assignedTo"]}
    limit = withdrawal_limit(item, max_withdrawals)
    if item["attempts"] >= limit:
        data["reason"] = f"{reason}; gave up after {item['attempts']} attempts"
        return Draft("work.dead_lettered", work_id, data, epoch=epoch)
    return Draft("work.requeued", work_id, {**data, "retryAt": None}, epoch=epoch)


# --- the dead-letter queue and retention -----------------------------------------------------------


def retry_dead_letter(state: ProjectState, work_id: str, reason: str | None) -> Draft:
    item = dead_letter(state, work_id)
    return Draft("work.retried", item["id"], {"reason": reason})


def discard_dead_letter(state: ProjectState, work_id: str, reason: str | None) -> Draft:
    item = dead_letter(state, work_id)
    return Draft("work.discarded", item["id"], {"reason": reason})


def purge_work(state: ProjectState, work_id: str, finished_before: str, epoch: int) -> Draft | None:
    """Scheduler (retention): drop an item finished before `finished_before` from the projection."""
    item = state.work.get(work_id)
    if item is None or not purgeable(item) or item["updatedAt"] >= finished_before:
        return None
    return Draft("work.purged", work_id, {"reason": "retention"}, epoch=epoch)
