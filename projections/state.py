"""The state of one project as folded from its event stream: plain, JSON-able, deterministic.

Records are dicts in the REST shape of the original Weft (camelCase), so responses and snapshots
need no mapping layer. Field lists live in the docstrings of `new_work`, `new_agent`, `new_target`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from projections.worktable import Cut, Encoded, WorkTable, pack_index, unpack_index
from projections.worktable import Record as Record  # re-exported: the one record type

# Bump when the folded shape changes: snapshots of another schema are ignored and state is rebuilt.
# 4: the encoding (the items as a JSON array, then a footer line), same fields as 3; `updatedAt`
# no longer moves on an event the fold ignores. 5: `last_event_id` (a snapshot proves which stream
# it belongs to) and `leader` (`leader.elected`).
STATE_SCHEMA = 5

WORK_STATUSES = ("pending", "assigned", "in-progress", "completed", "failed", "cancelled")
AGENT_STATUSES = ("online", "busy", "offline")
TERMINAL_WORK = frozenset({"completed", "failed", "cancelled"})
LIVE_ASSIGNMENT = frozenset({"assigned", "in-progress"})
# Statuses no event moves an item out of, nor changes it in (only a purge removes it).
SETTLED_WORK = frozenset({"completed", "cancelled"})


def pending_key(item: Record) -> tuple[str, str, int]:
    return (str(item["capability"]), str(item["boundary"]), int(item["priority"]))


@dataclass(slots=True)
class ProjectState:
    project: str
    seq: int = 0  # last stream sequence folded in
    # The id (Nats-Msg-Id) of the event at `seq`: a snapshot is used only where the stream holds
    # that event at that sequence, not on another project's or an earlier stream's of the name.
    last_event_id: str = ""
    work: WorkTable = field(default_factory=WorkTable)
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
    # The latest `leader.elected`: {holder, epoch, leaseRevision, electedAt, seq}.
    leader: Record | None = None
    # Derived, never hashed: work ids by status, in the order they reached it, kept by the fold
    # (`projections.work.set_status`). The scheduler and filtered reads walk one status's items
    # instead of every item ever submitted. A snapshot carries it (so a restart decodes no item to
    # rebuild it, and keeps the fold's order); it is not part of `state_hash`.
    work_by_status: dict[str, dict[str, None]] = field(
        default_factory=lambda: {s: {} for s in WORK_STATUSES}, compare=False, repr=False
    )
    # Derived, never hashed nor snapshotted: pending items by (capability, boundary, priority),
    # kept by the fold once `pending_counts` computed it (None until then, e.g. after a restart), so
    # reading queue depth (a metrics scrape) costs O(keys), not O(pending items).
    pending_keys: dict[tuple[str, str, int], int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        work: object = self.work  # typed WorkTable, but callers may pass a plain dict
        if isinstance(work, dict):  # a plain dict of items (tests, a one-item routing view)
            self.work = WorkTable(work)

    def reindex_work(self) -> None:
        """Rebuild `work_by_status` from `work` after editing `work` directly (decodes every item)."""
        index: dict[str, dict[str, None]] = {s: {} for s in WORK_STATUSES}
        for wid, item in self.work.items():
            index[item["status"]][wid] = None
        self.work_by_status = index
        self.pending_keys = None

    def pending_counts(self) -> dict[tuple[str, str, int], int]:
        """Pending items by (capability, boundary, priority). The first call decodes the pending
        items once; from then on the fold keeps the counts."""
        if self.pending_keys is None:
            counts: dict[tuple[str, str, int], int] = {}
            for item in self.work_in("pending"):
                key = pending_key(item)
                counts[key] = counts.get(key, 0) + 1
            self.pending_keys = counts
        return self.pending_keys

    def work_in(self, status: str) -> list[Record]:
        """The items in `status` (a snapshot list: the caller may fold while iterating)."""
        work = self.work
        return [work[wid] for wid in self.work_by_status[status]]

    def to_dict(self) -> dict[str, Any]:
        """Everything but the work items (see `encode_state`)."""
        return {
            "schema": STATE_SCHEMA,
            "project": self.project,
            "seq": self.seq,
            "last_event_id": self.last_event_id,
            "agents": self.agents,
            "targets": self.targets,
            "entity_seq": self.entity_seq,
            "idempotency": self.idempotency,
            "work_counts": self.work_counts,
            "purged_counts": self.purged_counts,
            "events_applied": self.events_applied,
            "last_activity": self.last_activity,
            "epoch": self.epoch,
            "leader": self.leader,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], work: WorkTable) -> ProjectState:
        if d.get("schema") != STATE_SCHEMA:
            raise ValueError(f"snapshot schema {d.get('schema')} != {STATE_SCHEMA}")
        return cls(
            project=d["project"],
            seq=d["seq"],
            last_event_id=d["last_event_id"],
            work=work,
            agents=d["agents"],
            targets=d["targets"],
            entity_seq=d["entity_seq"],
            idempotency=d["idempotency"],
            work_counts=d["work_counts"],
            purged_counts=d["purged_counts"],
            events_applied=d["events_applied"],
            last_activity=d["last_activity"],
            epoch=d["epoch"],
            leader=d["leader"],
        )


# The encoding: the items as one JSON array, in id order, each with sorted keys; a newline; then
# one line of JSON, the footer: every other field, plus the items' ids and each one's length (and,
# derived, the status index and the items' list order fields).
# Compact JSON holds no raw newline, so the last one starts the footer. Items first lets the
# encoder append the footer to the array it built instead of copying both into a third buffer. A
# loaded state keeps the items encoded until read (`WorkTable`), which is what makes a restart fast.


def _footer(state: ProjectState, enc: Encoded, derived: bool) -> bytes:
    footer = state.to_dict()
    footer["work_ids"] = enc.ids
    footer["work_lengths"] = enc.lengths
    if derived:  # what a restart needs without decoding items; not part of the hash
        footer["work_index"] = {s: list(wids) for s, wids in state.work_by_status.items()}
        footer["work_priorities"] = enc.priorities
        footer["work_offered"] = enc.offered
    return b"\n" + orjson.dumps(footer, option=orjson.OPT_SORT_KEYS)


def encode_state(state: ProjectState, *, settle: bool = False) -> bytearray:
    """The snapshot encoding. `settle`: afterwards hold completed and cancelled items (which no
    event changes any more, only a purge removes) as slices of the returned buffer instead of
    dicts, so a long-lived replica's memory does not grow with every item it ever finished (the
    buffer then cannot be resized, and must not be changed)."""
    enc = state.work.encoded()
    out = enc.items  # the footer goes on the end of the items' own buffer: no copy
    items_end = len(out)
    out += _footer(state, enc, derived=True)
    if settle:
        state.work.rebase(memoryview(out)[:items_end], enc, SETTLED_WORK)
    return out


class SnapshotCut(NamedTuple):
    """A point of a project's state that an encoding taken there can later be adopted from."""

    seq: int
    work: Cut


def snapshot_cut(state: ProjectState) -> SnapshotCut:
    """Mark the state's present for `adopt_snapshot` (until it, or `release_cut`)."""
    return SnapshotCut(state.seq, state.work.cut(SETTLED_WORK))


def release_cut(state: ProjectState) -> None:
    """Give up a cut whose encoding will never be adopted."""
    state.work.release_cut()


def encode_snapshot(state: ProjectState) -> tuple[bytearray, int, bytes]:
    """`encode_state`'s payload, where its items end, and their packed index: all a process that
    did not do the encoding (the parent of a forked encoder) needs to adopt it."""
    enc = state.work.encoded()
    index = pack_index(enc, state.work.adoptable(enc.ids, SETTLED_WORK))
    out = enc.items
    items_end = len(out)
    out += _footer(state, enc, derived=True)
    return out, items_end, index


def adopt_snapshot(
    state: ProjectState, payload: memoryview, items_end: int, index: bytes | memoryview, cut: SnapshotCut
) -> Generator[None, None, int]:
    """Settle (see `encode_state`) what is unchanged since `cut` onto an encoding of the state
    taken there, which `payload` holds: a generator (`WorkTable.adoption`) returning how many
    items were settled (-1: none could be)."""
    return state.work.adoption(payload[:items_end], unpack_index(index), cut.work)


def decode_state(raw: bytes | bytearray) -> ProjectState:
    """The state a snapshot holds; its items stay encoded in `raw` (kept alive) until read."""
    buf = memoryview(raw)
    end = raw.rfind(b"\n")
    footer = orjson.loads(buf[end + 1 :])
    if not isinstance(footer, dict):
        raise ValueError("snapshot footer is not an object")
    if footer.get("schema") != STATE_SCHEMA:
        raise ValueError(f"snapshot schema {footer.get('schema')} != {STATE_SCHEMA}")
    if end < 0:
        raise ValueError("snapshot has no item section")
    work = WorkTable.from_encoded(
        buf[:end], footer["work_ids"], footer["work_lengths"], footer["work_priorities"], footer["work_offered"]
    )
    state = ProjectState.from_dict(footer, work)
    by_status = {s: dict.fromkeys(footer["work_index"].get(s, ())) for s in WORK_STATUSES}
    if sum(map(len, by_status.values())) != len(work) or any(
        len(by_status[s]) != n for s, n in state.work_counts.items()
    ):
        raise ValueError("snapshot status index disagrees with its items")
    state.work_by_status = by_status
    return state


def state_hash(state: ProjectState) -> str:
    """sha256 of the canonical encoding (without the derived status index): equal on every
    replica that folded the same sequence, whether its items are decoded or not."""
    enc = state.work.encoded()
    digest = hashlib.sha256(enc.items)
    digest.update(_footer(state, enc, derived=False))
    return digest.hexdigest()
