"""Work items by id, where items loaded from a snapshot stay encoded until something reads them.

A restart loads every item ever kept (hundreds of thousands), yet touches few of them: the
scheduler and the fold work on live items, and reads fetch a page. Decoding each item into a dict
of ~30 keys made up most of a restart (4.5 s of 6 s for 200k items on a cold machine, and 3.4 KB
of heap per item). So a table loaded from a snapshot keeps each item as its canonical JSON (a
slice of the snapshot buffer) and decodes it on first access, after which it is an ordinary
mutable dict, like the ones the fold creates.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import accumulate
from typing import Any

import orjson

Record = dict[str, Any]


class WorkTable:
    """A mapping of work id -> item (dict). `get`, `[]`, `in`, `del` and assignment behave as on
    a dict; the first read of an encoded item decodes it and keeps the dict, so the fold may
    mutate what it reads. Iteration order is not meaningful (the status index keeps order)."""

    __slots__ = ("_blob", "_ends", "_frozen", "_live", "_starts")

    def __init__(self, items: dict[str, Record] | None = None) -> None:
        self._live: dict[str, Record] = items if items is not None else {}
        # id -> position i; the item's canonical JSON is `_blob[_starts[i]:_ends[i]]`.
        self._frozen: dict[str, int] = {}
        self._blob: memoryview = memoryview(b"")
        self._starts: list[int] = []
        self._ends: list[int] = []

    @classmethod
    def from_encoded(cls, section: memoryview, ids: list[str], lengths: list[int]) -> WorkTable:
        """The items of `encoded()`: `section` is the JSON array of the items `ids`, in that order,
        the i-th `lengths[i]` bytes long."""
        if len(ids) != len(lengths) or sum(lengths) + max(1, len(ids)) + 1 != len(section):
            raise ValueError("work table: ids, lengths and items disagree")
        table = cls()
        table._point_at(section, ids, lengths)
        table._frozen = dict(zip(ids, range(len(ids)), strict=True))
        if len(table._frozen) != len(ids):
            raise ValueError("work table: repeated id")
        return table

    def _point_at(self, section: memoryview, ids: list[str], lengths: list[int]) -> None:
        self._blob = section
        # "[" item0 "," item1 ... "]": item i starts after i+1 separators and the items before it.
        self._ends = list(accumulate(n + 1 for n in lengths))
        self._starts = [end - n for end, n in zip(self._ends, lengths, strict=True)]

    def rebase(self, section: memoryview, ids: list[str], lengths: list[int], settle: Iterable[str]) -> int:
        """Hold items as slices of a newer `encoded()` of this same table (which must not have
        changed since): the items now encoded, plus the decoded items `settle` names, which
        stop being dicts. Returns how many were settled. Callers holding such a dict keep a
        correct copy only if nothing changes the item any more (finished items)."""
        position = dict(zip(ids, range(len(ids)), strict=True))
        frozen = {wid: position[wid] for wid in self._frozen}
        live, settled = self._live, 0
        for wid in settle:
            if live.pop(wid, None) is not None:
                frozen[wid] = position[wid]
                settled += 1
        self._point_at(section, ids, lengths)
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

    def encoded(self) -> tuple[list[str], list[int], bytearray]:
        """(ids in sorted order, each item's length, the JSON array of the items in that order,
        each with sorted keys): what a snapshot and `state_hash` are made of. Encoded items are
        copied, not decoded; a run of them that lies back to back in the buffer is one copy. Each
        decoded item's JSON goes straight into the array and is dropped (keeping a buffer per item
        costs 5-12 us of allocation each, against ~1)."""
        ids = sorted([*self._live, *self._frozen])
        live, frozen, starts, ends, blob = self._live, self._frozen, self._starts, self._ends, self._blob
        dumps, sort = orjson.dumps, orjson.OPT_SORT_KEYS
        lengths: list[int] = []
        out = bytearray(b"[")
        span_from = span_to = -1  # a run of encoded items not yet copied, as a range of `blob`
        for wid in ids:
            item = live.get(wid)
            if item is None:
                pos = frozen[wid]
                start, end = starts[pos], ends[pos]
                lengths.append(end - start)
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
            out += raw
            out += b","
        if span_from >= 0:
            out += blob[span_from:span_to]
        elif ids:
            del out[-1]  # the last separator
        out += b"]"
        return ids, lengths, out

    def encoded_count(self) -> int:
        """Items still held encoded (a gauge of what a restart left undecoded)."""
        return len(self._frozen)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WorkTable):
            return self.encoded() == other.encoded()
        if isinstance(other, dict):
            return len(other) == len(self) and all(
                wid in self and self.peek(wid) == v for wid, v in other.items()
            )
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"WorkTable({len(self._live)} decoded, {len(self._frozen)} encoded)"
