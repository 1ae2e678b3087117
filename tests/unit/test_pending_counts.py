"""Queue depth by (capability, boundary, priority), kept by the fold once first computed
(`ProjectState.pending_counts`): after any history, and from any point it was first asked, it
equals a count over the pending items."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from projections import ProjectState, fold
from projections.events import Event
from projections.state import pending_key
from tests.strategies import PROJECT, event_sequences
from tests.unit.test_projections import PROPERTY


def recount(state: ProjectState) -> dict[tuple[str, str, int], int]:
    counts: dict[tuple[str, str, int], int] = {}
    for item in state.work_in("pending"):
        counts[pending_key(item)] = counts.get(pending_key(item), 0) + 1
    return counts


@PROPERTY
@given(event_sequences(), st.data())
def test_the_kept_counts_equal_a_recount_whenever_they_were_first_asked(events: list[Event], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(events)), label="cut")
    state = fold(events[:cut], project=PROJECT)
    assert state.pending_counts() == recount(state)  # computed here, kept from now on
    fold(events[cut:], state=state)
    assert state.pending_keys is not None and state.pending_counts() == recount(state)
    assert all(n > 0 for n in state.pending_counts().values())
