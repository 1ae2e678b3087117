"""Retention: which finished work items the scheduler purges from the projection, and when.

Pure: the clock is a parameter and the scan position is the caller's `Cursor`. Finished items
(completed, cancelled, dead-lettered then discarded) whose last change is older than the retention
period leave the projection through `work.purged` events; their events stay in the stream, so
`weft replay` still shows them. Without this, every item ever submitted stays in memory and in
every snapshot (a cold restart of 1,000,000 events spends most of its time faulting in the ~1.5 GB
that 200,000 finished items take).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from projections.events import format_ts
from projections.state import ProjectState
from projections.work import purgeable


def cutoff(now: datetime, retain_s: float) -> str:
    """Items last changed before this timestamp are due (timestamps compare as strings)."""
    return format_ts(now - timedelta(seconds=retain_s))


FINISHED = ("completed", "cancelled", "failed")


@dataclass
class Cursor:
    """Where the next pass resumes in each finished status (positions in the status index)."""

    at: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISHED, 0))

    def copy(self) -> Cursor:
        return Cursor(dict(self.at))


def due_for_purge(
    state: ProjectState, before: str, limit: int, cursor: Cursor, *, budget: int = 20_000
) -> list[str]:
    """Up to `limit` purgeable items last changed before `before`, looking at no more than
    `budget` items per pass (a pass runs on the event loop); `cursor` carries on from there next
    time, wrapping around. A pass scans rather than stopping at the first recent item: the index
    is in the order items reached their status, and a dead letter becomes purgeable only when it
    is discarded, long after it failed."""
    out: list[str] = []
    work = state.work
    per_status = max(1, budget // len(FINISHED))
    for status in FINISHED:
        ids = list(state.work_by_status[status])
        start = cursor.at[status] if cursor.at[status] < len(ids) else 0
        end = min(len(ids), start + per_status)
        for i in range(start, end):
            item = work.peek(ids[i])  # a scan must not decode every finished item for good
            if item["updatedAt"] < before and purgeable(item):
                out.append(ids[i])
                if len(out) >= limit:
                    cursor.at[status] = i + 1
                    return out
        cursor.at[status] = end  # the next pass wraps to 0 once past the end
    return out


@dataclass(frozen=True, slots=True)
class PurgePass:
    """One tick's retention decision: purge `work_ids` (last changed before `before`), look again
    at `next_at`, resuming from `cursor`. `before` is None when no pass was due."""

    before: str | None
    work_ids: tuple[str, ...]
    next_at: datetime | None
    cursor: Cursor


def plan_purges(
    state: ProjectState,
    now: datetime,
    retain_s: float,
    every_s: float,
    batch: int,
    next_at: datetime | None,
    cursor: Cursor,
) -> PurgePass:
    """The purges due at `now` (none if retention is off (`retain_s` <= 0) or before `next_at`;
    None: look at once). `cursor` is not changed: the pass carries on from its own copy."""
    if retain_s <= 0 or (next_at is not None and now < next_at):
        return PurgePass(None, (), next_at, cursor)
    before = cutoff(now, retain_s)
    moved = cursor.copy()
    due = due_for_purge(state, before, batch, moved)
    # Found some: more may be due further on, so look again soon (not at once: if the purges
    # cannot be appended, NATS down say, the next pass must not spin).
    every = min(every_s, retain_s / 2)  # a short retention is checked as often
    return PurgePass(before, tuple(due), now + timedelta(seconds=min(1.0, every) if due else every), moved)
