"""Leadership decision: a scheduler that won a project's lease announces its term."""

from __future__ import annotations

from projections.state import ProjectState
from weft.core.decisions import Draft


def term_epoch(state: ProjectState, lease_revision: int) -> int:
    """A new term's epoch: above every epoch the stream has seen, so it stays monotonic per project
    even when the lease bucket is recreated and its revisions start again at 1."""
    return max(lease_revision, state.epoch + 1)


def announce_leader(state: ProjectState, project: str, holder: str, lease_revision: int) -> Draft:
    """`leader.elected` with the term's epoch (the draft's `epoch`): from its sequence on, the fold
    ignores every decision of an older epoch. Whether the lease is still held is the caller's
    question (it is not in the state)."""
    data = {"holder": holder, "leaseRevision": lease_revision}
    return Draft("leader.elected", project, data, epoch=term_epoch(state, lease_revision))
