"""Work items by id, where items loaded from a snapshot stay encoded until something reads them.

A restart loads every item ever kept (hundreds of thousands), yet touches few of them: the
scheduler and the fold work on live items, and reads fetch a page. Decoding each item into a dict
of ~30 keys made up most of a restart (4.5 s of 6 s for 200k items on a cold machine, and 3.4 KB
of heap per item). So a table loaded from a snapshot keeps each item as its canonical JSON (a
slice of the snapshot buffer) and decodes it on first access, after which it is an ordinary
mutable dict, like the ones the fold creates.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from itertools import accumulate, repeat
from operator import add
from typing import Any, NamedTuple

import orjson

Record = dict[str, Any]


class Encoded(NamedTuple):
    """A table's items encoded (`WorkTable.encoded`), and what a snapshot records beside them."""

    ids: list[str]  # sorted
    lengths: list[int]  # bytes of each item's JSON
    priorities: list[int]  # each item's priority and offeredAt: the list order, kept so that
    offered: list[str]  # ordering a long list decodes nothing (`WorkTable.list_key`)
    items: bytearray  # the JSON array of the items, in `ids` order


class WorkTable:
    """A mapping of work id -> item (dict). `get`, `[]`, `in`, `del` and assignment behave as on
    a dict; the first read of an encoded item decodes it and keeps the dict, so the fold may
    mutate what it reads. Iteration order is not meaningful (the status index keeps order)."""

    __slots__ = ("_blob", "_ends", "_frozen", "_live", "_offered", "_priorities", "_starts")

    def __init__(self, items: dict[str, Record] | None = None) -> None:
        self._live: dict[str, Record] = items if items is not None else {}
        # id -> position i; the item's canonical JSON is `_blob[_starts[i]:_ends[i]]`, and its
        # list order fields (which never change) are `_priorities[i]` and `_offered[i]`.
        self._frozen: dict[str, int] = {}
        self._blob: memoryview = memoryview(b"")
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._priorities: list[int] = []
        self._offered: list[str] = []

    @classmethod
    def from_encoded(
        cls, section: memoryview, ids: list[str], lengths: list[int], priorities: list[int], offered: list[str]
    ) -> WorkTable:
        """The items of an `encoded()`: `section` is the JSON array of the items `ids`, in that
        order, the i-th `lengths[i]` bytes long, with the list order fields beside them."""
        n = len(ids)
        if not n == len(lengths) == len(priorities) == len(offered):
            raise ValueError("work table: ids, lengths and list keys disagree")
        if sum(lengths) + max(1, n) + 1 != len(section):
            raise ValueError("work table: lengths and items disagree")
        table = cls()
        table._point_at(section, lengths, priorities, offered)
        table._frozen = dict(zip(ids, range(n), strict=True))
        if len(table._frozen) != n:
            raise ValueError("work table: repeated id")
        return table

    def _point_at(self, section: memoryview, lengths: list[int], priorities: list[int], offered: list[str]) -> None:
        self._blob = section
        # "[" item0 "," item1 ... "]": item i starts after i+1 separators and the items before it
        # (map/accumulate keep the per-item work in C).
        self._starts = list(accumulate(map(add, lengths, repeat(1)), initial=1))[:-1]
        self._ends = list(map(add, self._starts, lengths))
        self._priorities, self._offered = priorities, offered

    def rebase(self, section: memoryview, enc: Encoded, settle: Container[str]) -> int:
        """Hold items as slices of a newer `encoded()` of this same table (which must not have
        changed since): the items now encoded, plus the decoded items whose status is in
        `settle`, which stop being dicts. Returns how many were settled. Callers holding such a
        dict keep a correct copy only if nothing changes the item any more (finished items)."""
        frozen = dict(zip(enc.ids, range(len(enc.ids)), strict=True))
        live, settled = self._live, 0
        for wid, item in list(live.items()):
            if item["status"] in settle:
                del live[wid]
                settled += 1
            else:
                del frozen[wid]
        self._point_at(section, enc.lengths, enc.priorities, enc.offered)
        self._frozen = frozen
        return settled

    def _span(self, pos: int) -> memoryview:
        return self._blob[self._starts[pos] : self._ends[pos]]

    def _thaw(self, wid: str) -> Record | None:
        pos = self._frozen.pop(wid, None)
        if pos is None:
            return None
        item: Record = orjson.loads(self._span(pos))
        self._live[wid] = item
        return item

    def get(self, wid: str, default: Record | None = None) -> Record | None:
        item = self._live.get(wid)
        if item is None and self._frozen:
            item = self._thaw(wid)
        return item if item is not None else default

    def peek(self, wid: str) -> Record:
        """The item, read-only: an encoded item is decoded for the caller and stays encoded (a
        scan over many items then does not decode them all for good)."""
        item = self._live.get(wid)
        if item is not None:
            return item
        return orjson.loads(self._span(self._frozen[wid]))  # type: ignore[no-any-return]

    def list_key(self, wid: str) -> tuple[int, str, str]:
        """The order lists show items in (highest priority, then oldest, then id), read without
        decoding an encoded item: a page of a long list decodes only the page."""
        item = self._live.get(wid)
        if item is not None:
            return (-item["priority"], item["offeredAt"], wid)
        pos = self._frozen[wid]
        return (-self._priorities[pos], self._offered[pos], wid)

    def __getitem__(self, wid: str) -> Record:
        item = self.get(wid)
        if item is None:
            raise KeyError(wid)
        return item

    def __setitem__(self, wid: str, item: Record) -> None:
        self._frozen.pop(wid, None)
        self._live[wid] = item

    def __delitem__(self, wid: str) -> None:
        if self._live.pop(wid, None) is None and self._frozen.pop(wid, None) is None:
            raise KeyError(wid)

    def __contains__(self, wid: object) -> bool:
        return wid in self._live or wid in self._frozen

    def __len__(self) -> int:
        return len(self._live) + len(self._frozen)

    def __iter__(self) -> Iterator[str]:
        return iter([*self._live, *self._frozen])

    def values(self) -> list[Record]:
        """Every item, decoding (and keeping) the encoded ones: a full scan costs a full decode."""
        for wid in list(self._frozen):
            self._thaw(wid)
        return list(self._live.values())

    def items(self) -> list[tuple[str, Record]]:
        self.values()
        return list(self._live.items())

    def encoded(self) -> Encoded:
        """Every item as canonical JSON (sorted keys), in id order, in one JSON array: what a
        snapshot and `state_hash` are made of. Encoded items are copied, not decoded; a run of
        them that lies back to back in the buffer is one copy. Each decoded item's JSON goes
        straight into the array and is dropped (keeping a buffer per item costs 5-12 us of
        allocation each, against ~1)."""
        ids = sorted([*self._live, *self._frozen])
        live, frozen, starts, ends, blob = self._live, self._frozen, self._starts, self._ends, self._blob
        old_priorities, old_offered = self._priorities, self._offered
        dumps, sort = orjson.dumps, orjson.OPT_SORT_KEYS
        lengths: list[int] = []
        priorities: list[int] = []
        offered: list[str] = []
        out = bytearray(b"[")
        span_from = span_to = -1  # a run of encoded items not yet copied, as a range of `blob`
        for wid in ids:
            item = live.get(wid)
            if item is None:
                pos = frozen[wid]
                start, end = starts[pos], ends[pos]
                lengths.append(end - start)
                priorities.append(old_priorities[pos])
                offered.append(old_offered[pos])
                if span_to + 1 == start:  # the next item in the buffer: the run grows
                    span_to = end
                    continue
                if span_from >= 0:
                    out += blob[span_from:span_to]
                    out += b","
                span_from, span_to = start, end
                continue
            if span_from >= 0:
                out += blob[span_from:span_to]
                out += b","
                span_from = span_to = -1
            raw = dumps(item, option=sort)
            lengths.append(len(raw))
            priorities.append(item["priority"])
            offered.append(item["offeredAt"])
            out += raw
            out += b","
        if span_from >= 0:
            out += blob[span_from:span_to]
        elif ids:
            del out[-1]  # the last separator
        out += b"]"
        return Encoded(ids, lengths, priorities, offered, out)

    def encoded_count(self) -> int:
        """Items still held encoded (a gauge of what a restart left undecoded)."""
        return len(self._frozen)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WorkTable):
            return self.encoded().items == other.encoded().items
        if isinstance(other, dict):
            return len(other) == len(self) and all(
                wid in self and self.peek(wid) == v for wid, v in other.items()
            )
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"WorkTable({len(self._live)} decoded, {len(self._frozen)} encoded)"
