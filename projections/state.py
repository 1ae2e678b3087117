"""The state of one project as folded from its event stream: plain, JSON-able, deterministic.

Records are dicts in the REST shape of the original Weft (camelCase), so responses and snapshots
need no mapping layer. Field lists live in the docstrings of `new_work`, `new_agent`, `new_target`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

Record = dict[str, Any]

# Bump when the folded shape changes: snapshots of another schema are ignored and state is rebuilt.
STATE_SCHEMA = 3

WORK_STATUSES = ("pending", "assigned", "in-progress", "completed", "failed", "cancelled")
TERMINAL_WORK = frozenset({"completed", "failed", "cancelled"})
LIVE_ASSIGNMENT = frozenset({"assigned", "in-progress"})


@dataclass(slots=True)
class ProjectState:
    project: str
    seq: int = 0  # last stream sequence folded in
    work: dict[str, Record] = field(default_factory=dict)
    agents: dict[str, Record] = field(default_factory=dict)
    targets: dict[str, Record] = field(default_factory=dict)
    # "<entity>.<id>" -> last stream sequence on that subject, for optimistic concurrency.
    entity_seq: dict[str, int] = field(default_factory=dict)
    # Client Idempotency-Key -> entity id it created: repeats outside the server's dedupe window
    # are ignored by the fold and answered with the original entity by the command layer.
    idempotency: dict[str, str] = field(default_factory=dict)
    work_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WORK_STATUSES, 0))
    # Finished items purged by retention (`work.purged`), by the status they had.
    purged_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(sorted(TERMINAL_WORK), 0))
    events_applied: int = 0
    last_activity: str | None = None
    # Highest scheduler epoch seen: decision events of an older epoch (a deposed leader) are fenced.
    epoch: int = 0
    # Derived, never encoded or hashed: work ids by status, in insertion order, kept by the fold
    # (`projections.work.set_status`). The scheduler and filtered reads walk one status's items
    # instead of every item ever submitted. Rebuilt by `from_dict` and `reindex_work`.
    work_by_status: dict[str, dict[str, None]] = field(
        default_factory=lambda: {s: {} for s in WORK_STATUSES}, compare=False, repr=False
    )

    def reindex_work(self) -> None:
        """Rebuild `work_by_status` from `work` (after decoding, or after editing `work` directly)."""
        index: dict[str, dict[str, None]] = {s: {} for s in WORK_STATUSES}
        for wid, item in self.work.items():
            index[item["status"]][wid] = None
        self.work_by_status = index

    def work_in(self, status: str) -> list[Record]:
        """The items in `status` (a snapshot list: the caller may fold while iterating)."""
        work = self.work
        return [work[wid] for wid in self.work_by_status[status]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA,
            "project": self.project,
            "seq": self.seq,
            "work": self.work,
            "agents": self.agents,
            "targets": self.targets,
            "entity_seq": self.entity_seq,
            "idempotency": self.idempotency,
            "work_counts": self.work_counts,
            "purged_counts": self.purged_counts,
            "events_applied": self.events_applied,
            "last_activity": self.last_activity,
            "epoch": self.epoch,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProjectState:
        if d.get("schema") != STATE_SCHEMA:
            raise ValueError(f"snapshot schema {d.get('schema')} != {STATE_SCHEMA}")
        state = cls(
            project=d["project"],
            seq=d["seq"],
            work=d["work"],
            agents=d["agents"],
            targets=d["targets"],
            entity_seq=d["entity_seq"],
            idempotency=d["idempotency"],
            work_counts=d["work_counts"],
            purged_counts=d["purged_counts"],
            events_applied=d["events_applied"],
            last_activity=d["last_activity"],
            epoch=d.get("epoch", 0),
        )
        state.reindex_work()
        return state


def encode_state(state: ProjectState) -> bytes:
    return orjson.dumps(state.to_dict(), option=orjson.OPT_SORT_KEYS)


def decode_state(raw: bytes | bytearray) -> ProjectState:
    d = orjson.loads(raw)
    if not isinstance(d, dict):
        raise ValueError("snapshot is not an object")
    return ProjectState.from_dict(d)


def state_hash(state: ProjectState) -> str:
    """sha256 of the canonical encoding: equal on every replica that folded the same sequence."""
    return hashlib.sha256(encode_state(state)).hexdigest()
