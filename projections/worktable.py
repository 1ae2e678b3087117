"""Work items by id, where items loaded from a snapshot stay encoded until something reads them.

A restart loads every item ever kept (hundreds of thousands), yet touches few of them: the
scheduler and the fold work on live items, and reads fetch a page. Decoding each item into a dict
of ~30 keys made up most of a restart (4.5 s of 6 s for 200k items on a cold machine, and 3.4 KB
of heap per item). So a table loaded from a snapshot keeps each item as its canonical JSON (a
slice of the snapshot buffer) and decodes it on first access, after which it is an ordinary
mutable dict, like the ones the fold creates.
"""

from __future__ import annotations

from collections.abc import Container, Generator, Iterable, Iterator
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


class Cut(NamedTuple):
    """A point in a table's life that an encoding taken there can be adopted from (`adoption`)."""

    generation: int
    settled: dict[str, Record]  # finished items decoded at that point: the objects, not copies


class IndexChunk(NamedTuple):
    """Part of the index of an `Encoded` (`pack_index`): its items' ids, lengths and list keys,
    and the positions (within the chunk) of the items an `adoption` may hold encoded."""

    ids: list[str]
    lengths: list[int]
    priorities: list[int]
    offered: list[str]
    adopt: list[int]


INDEX_CHUNK = 4096  # items per chunk: each unpacks and is adopted in a few ms


def pack_index(enc: Encoded, adopt: list[int]) -> bytes:
    """An `Encoded`'s index without its items, in chunks that unpack one at a time (a process
    that did not encode the items adopts them by it; see `weft.store.snapshot_child`)."""
    parts: list[bytes] = []
    marks = iter(adopt)
    mark = next(marks, None)
    for lo in range(0, len(enc.ids), INDEX_CHUNK):
        hi = min(lo + INDEX_CHUNK, len(enc.ids))
        rel: list[int] = []
        while mark is not None and mark < hi:
            rel.append(mark - lo)
            mark = next(marks, None)
        raw = orjson.dumps([enc.ids[lo:hi], enc.lengths[lo:hi], enc.priorities[lo:hi], enc.offered[lo:hi], rel])
        parts += (len(raw).to_bytes(8, "little"), raw)
    return b"".join(parts)


def unpack_index(raw: bytes | memoryview) -> Iterator[IndexChunk]:
    """`pack_index`'s chunks, each decoded when it is reached."""
    view, at = memoryview(raw), 0
    while at < len(view):
        n = int.from_bytes(view[at : at + 8], "little")
        ids, lengths, priorities, offered, adopt = orjson.loads(view[at + 8 : at + 8 + n])
        if not len(ids) == len(lengths) == len(priorities) == len(offered):
            raise ValueError("work index: ids, lengths and list keys disagree")
        yield IndexChunk(ids, lengths, priorities, offered, adopt)
        at += 8 + n


class WorkTable:
    """A mapping of work id -> item (dict). `get`, `[]`, `in`, `del` and assignment behave as on
    a dict; the first read of an encoded item decodes it and keeps the dict, so the fold may
    mutate what it reads. Iteration order is not meaningful (the status index keeps order)."""

    __slots__ = ("_blob", "_ends", "_frozen", "_generation", "_live", "_offered", "_priorities", "_starts", "_unfrozen")

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
        self._generation = 0  # bumped whenever the encoded items are re-pointed (see `adoption`)
        self._unfrozen: set[str] | None = None  # ids that stopped being encoded, while tracked

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
        self._generation += 1
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

    # --- adopting an encoding made elsewhere (a forked child), while the table goes on changing ---

    def cut(self, settle: Container[str]) -> Cut:
        """Mark this point for a later `adoption` of an encoding of the table as it is now: from
        here on the table notes which encoded items stop being encoded."""
        self._unfrozen = set()
        settled = {wid: item for wid, item in self._live.items() if item["status"] in settle}
        return Cut(self._generation, settled)

    def adoptable(self, ids: list[str], settle: Container[str]) -> list[int]:
        """Positions in `ids` (this table's `encoded().ids`) of the items an `adoption` may hold
        encoded: those encoded now, and the decoded ones whose status is in `settle`."""
        frozen, live = self._frozen, self._live
        return [i for i, wid in enumerate(ids) if wid in frozen or live[wid]["status"] in settle]

    def release_cut(self) -> None:
        self._unfrozen = None

    def adoption(self, section: memoryview, chunks: Iterable[IndexChunk], cut: Cut) -> Generator[None, None, int]:
        """`rebase` onto an encoding of this table taken at `cut` (`section` is its items, `chunks`
        its `pack_index`), though the table changed since: the items encoded then and still, and
        those of `cut.settled` (finished items, which never change again) that are still the same
        objects, stop being dicts; everything else stays as it is. A generator that yields after
        each chunk, so a caller on an event loop can let others run between; it returns how many
        items were settled, or -1 (changing nothing) if the table was re-pointed since the cut."""
        frozen: dict[str, int] = {}
        starts: list[int] = []
        ends: list[int] = []
        priorities: list[int] = []
        offered: list[str] = []
        at, base = 1, 0  # the next item's offset in `section` ("[" item "," item ... "]"), its position
        for chunk in chunks:
            ids = chunk.ids
            frozen.update((ids[i], base + i) for i in chunk.adopt)
            chunk_starts = list(accumulate(map(add, chunk.lengths, repeat(1)), initial=at))
            at = chunk_starts.pop()
            starts += chunk_starts
            ends += map(add, chunk_starts, chunk.lengths)
            priorities += chunk.priorities
            offered += chunk.offered
            base += len(ids)
            yield
        if cut.generation != self._generation or self._unfrozen is None:
            self._unfrozen = None
            return -1
        for wid in self._unfrozen:
            frozen.pop(wid, None)
        live, settled = self._live, 0
        for wid, item in cut.settled.items():
            if live.get(wid) is item:
                del live[wid]
                settled += 1
            else:
                frozen.pop(wid, None)
        self._generation += 1
        self._blob, self._starts, self._ends = section, starts, ends
        self._priorities, self._offered, self._frozen, self._unfrozen = priorities, offered, frozen, None
        return settled

    def _span(self, pos: int) -> memoryview:
        return self._blob[self._starts[pos] : self._ends[pos]]

    def _unfreeze(self, wid: str) -> int | None:
        pos = self._frozen.pop(wid, None)
        if pos is not None and self._unfrozen is not None:
            self._unfrozen.add(wid)
        return pos

    def _thaw(self, wid: str) -> Record | None:
        pos = self._unfreeze(wid)
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
        self._unfreeze(wid)
        self._live[wid] = item

    def __delitem__(self, wid: str) -> None:
        if self._live.pop(wid, None) is None and self._unfreeze(wid) is None:
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
