"""Which finished items retention picks, pass by pass (pure: no clock, no I/O)."""

from __future__ import annotations

from projections import ProjectState
from tests.unit.test_projections import Stream
from weft.core.retention import Cursor, due_for_purge


def finished_out_of_order() -> ProjectState:
    """w0 is submitted first but finishes last, and the index is rebuilt in submission order, so
    it lists w0 first: a pass must look past a recent item."""
    s = Stream()
    for i in range(10):
        s.submit(f"w{i}")
    for i in range(1, 10):
        s.ev("work.cancelled", f"w{i}", reason=None)  # ts 00:00:11 .. 00:00:19
    s.ev("work.cancelled", "w0", reason=None)  # ts 00:00:20
    s.submit("live")
    state = s.state()
    state.reindex_work()
    return state


def test_a_late_finisher_first_in_the_index_does_not_hold_back_the_others() -> None:
    state = finished_out_of_order()
    due = due_for_purge(state, "2026-01-01T00:00:19.500Z", 100, Cursor())
    assert sorted(due) == sorted(f"w{i}" for i in range(1, 10)), "w0 is too recent; the rest are due"


def test_passes_are_bounded_and_together_cover_everything() -> None:
    state = finished_out_of_order()
    cursor = Cursor()
    seen: list[str] = []
    for _ in range(8):  # budget 3 = one item per status per pass
        seen += due_for_purge(state, "2026-01-01T00:00:30.000Z", 100, cursor, budget=3)
    assert len(seen) == len(set(seen)) == 8, "one per pass, none twice within a cycle"
    for _ in range(3):
        seen += due_for_purge(state, "2026-01-01T00:00:30.000Z", 100, cursor, budget=3)
    assert set(seen) == {f"w{i}" for i in range(10)} and "live" not in seen


def test_the_limit_stops_a_pass_and_the_next_one_carries_on() -> None:
    state = finished_out_of_order()
    cursor = Cursor()
    first = due_for_purge(state, "2026-01-01T00:00:30.000Z", 4, cursor)
    second = due_for_purge(state, "2026-01-01T00:00:30.000Z", 4, cursor)
    assert len(first) == len(second) == 4 and not set(first) & set(second)
