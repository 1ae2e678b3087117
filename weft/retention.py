"""Retention: which finished work items the scheduler purges from the projection, and when.

Pure (the clock is a parameter). Finished items (completed, cancelled, dead-lettered then discarded)
whose last change is older than the retention period leave the projection through `work.purged`
events; their events stay in the stream, so `weft replay` still shows them. Without this, every item
ever submitted stays in memory and in every snapshot (a cold restart of 1,000,000 events spends most
of its time faulting in the ~1.5 GB that 200,000 finished items take).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from projections.state import ProjectState
from projections.work import purgeable
from weft.events import format_ts


def cutoff(now: datetime, retain_s: float) -> str:
    """Items last changed before this timestamp are due (timestamps compare as strings)."""
    return format_ts(now - timedelta(seconds=retain_s))


def due_for_purge(state: ProjectState, before: str, limit: int) -> list[str]:
    """Up to `limit` purgeable items last changed before `before`, oldest first per status.

    Completed and cancelled items sit in the status index in the order they finished, so the scan
    stops at the first one that is too recent: O(purged), not O(items). Failed items are scanned in
    full, since only discarded DLQ entries qualify (the DLQ is small)."""
    out: list[str] = []
    for status in ("completed", "cancelled", "failed"):
        for wid in state.work_by_status[status]:
            if len(out) >= limit:
                return out
            item = state.work[wid]
            if item["updatedAt"] >= before:
                if status == "failed":
                    continue
                break
            if purgeable(item):
                out.append(wid)
    return out
