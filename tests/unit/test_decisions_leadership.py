"""The leadership decision (`weft.core.decisions.leadership`) on folded states, without NATS."""

from __future__ import annotations

from tests.unit.test_decisions_work import ACCEPT_BY, History
from weft.core.decisions import Draft, work
from weft.core.decisions.leadership import announce_leader, term_epoch


def test_the_first_term_takes_the_lease_revision() -> None:
    h = History(project="p")
    draft = announce_leader(h.state, "p", "replica-1", 3)
    assert draft == Draft("leader.elected", "p", {"holder": "replica-1", "leaseRevision": 3}, epoch=3)
    state = h.apply(draft)
    assert state.epoch == 3
    assert state.leader is not None and state.leader["holder"] == "replica-1"


def test_a_term_is_above_every_epoch_in_the_stream_even_when_revisions_restart() -> None:
    h = History(project="p").ev("leader.elected", "p", epoch=7, holder="old", leaseRevision=7)
    assert term_epoch(h.state, 1) == 8  # the lease bucket was recreated: revisions start at 1 again
    assert term_epoch(h.state, 20) == 20
    assert announce_leader(h.state, "p", "new", 1).epoch == 8


def test_the_new_term_fences_the_old_leaders_late_decisions() -> None:
    h = History(project="p").register("a1").submit("w1")
    old = work.assign_work(h.state, "w1", "a1", 1, ACCEPT_BY)  # decided in term 1
    h.apply(announce_leader(h.state, "p", "new", 2))
    state = h.apply(old)
    assert state.work["w1"]["status"] == "pending"  # in the stream, never applied
