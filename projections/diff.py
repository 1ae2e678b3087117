"""The difference between two folded states: which items, agents and targets appeared, went, or changed.

Pure (no I/O): `weft replay diff` folds the stream to two sequences and hands both states here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from projections.state import ProjectState, Record


@dataclass(frozen=True, slots=True)
class FieldChange:
    old: Any
    new: Any

    def to_dict(self) -> dict[str, Any]:
        return {"old": self.old, "new": self.new}


@dataclass(slots=True)
class EntityDiff:
    """One kind of entity: ids added (with their record), removed (with the record they had) and
    changed (id -> field -> old/new; a field absent on one side reads as None there)."""

    added: dict[str, Record] = field(default_factory=dict)
    removed: dict[str, Record] = field(default_factory=dict)
    changed: dict[str, dict[str, FieldChange]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "removed": self.removed,
            "changed": {eid: {f: c.to_dict() for f, c in fields.items()} for eid, fields in self.changed.items()},
        }


@dataclass(slots=True)
class StateDiff:
    from_seq: int
    to_seq: int
    items: EntityDiff
    agents: EntityDiff
    targets: EntityDiff

    def __bool__(self) -> bool:
        return bool(self.items or self.agents or self.targets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fromSeq": self.from_seq,
            "toSeq": self.to_seq,
            "items": self.items.to_dict(),
            "agents": self.agents.to_dict(),
            "targets": self.targets.to_dict(),
        }


def diff_records(old: Mapping[str, Record], new: Mapping[str, Record]) -> EntityDiff:
    """Compare two id -> record maps; ids in sorted order, fields in sorted order."""
    out = EntityDiff()
    old_ids, new_ids = set(old), set(new)
    for eid in sorted(new_ids - old_ids):
        out.added[eid] = new[eid]
    for eid in sorted(old_ids - new_ids):
        out.removed[eid] = old[eid]
    for eid in sorted(old_ids & new_ids):
        a, b = old[eid], new[eid]
        if a == b:
            continue
        changes = {
            name: FieldChange(a.get(name), b.get(name))
            for name in sorted(set(a) | set(b))
            if a.get(name) != b.get(name) or (name in a) != (name in b)
        }
        if changes:
            out.changed[eid] = changes
    return out


def diff_states(old: ProjectState, new: ProjectState) -> StateDiff:
    """What changed from `old` to `new` (normally the same project folded to two sequences)."""
    return StateDiff(
        from_seq=old.seq,
        to_seq=new.seq,
        items=diff_records(dict(old.work.items()), dict(new.work.items())),
        agents=diff_records(old.agents, new.agents),
        targets=diff_records(old.targets, new.targets),
    )
