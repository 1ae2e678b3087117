"""The snapshot encoding and the work table that keeps loaded items encoded until read."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from projections import ProjectState, apply, decode_state, encode_state, fold, state_hash
from projections.events import Event
from projections.state import STATE_SCHEMA, SnapshotCut, adopt_snapshot, encode_snapshot, snapshot_cut
from projections.worktable import WorkTable
from tests.strategies import PROJECT, event_sequences
from tests.unit.test_projections import PROPERTY, Stream


def history() -> Stream:
    s = Stream()
    for i in range(5):
        s.submit(f"w{i}")
    s.register("a1", capacity=2)
    s.assign("w3", "a1")
    s.assign("w1", "a1")
    s.ev(
        "work.completed", "w3", agentGuid="a1", result={"summary": "ok", "nested": {"b": 1, "a": [1.5, None]}}
    )
    return s


def loaded() -> tuple[ProjectState, ProjectState]:
    """(the fold, the same state through a snapshot)."""
    state = history().state()
    return state, decode_state(encode_state(state))


def test_a_loaded_state_decodes_no_item_until_one_is_read() -> None:
    state, back = loaded()
    assert back.work.encoded_count() == len(back.work) == 5
    assert sorted(back.work) == [f"w{i}" for i in range(5)] and "w2" in back.work and "x" not in back.work
    assert back.work["w3"] == state.work["w3"]
    assert back.work.encoded_count() == 4
    assert back.work.get("x") is None and back.work.encoded_count() == 4


def test_a_read_item_is_kept_so_the_fold_can_change_it() -> None:
    _, back = loaded()
    item = back.work["w0"]
    item["progress"] = 50
    assert back.work.get("w0") is item and back.work["w0"]["progress"] == 50


def test_peek_leaves_the_item_encoded() -> None:
    state, back = loaded()
    assert back.work.peek("w2") == state.work["w2"]
    assert back.work.encoded_count() == 5
    with pytest.raises(KeyError):
        back.work.peek("nope")


def test_delete_and_replace_an_encoded_item() -> None:
    _, back = loaded()
    del back.work["w4"]
    assert "w4" not in back.work and len(back.work) == 4
    with pytest.raises(KeyError):
        del back.work["w4"]
    back.work["w2"] = {"id": "w2", "status": "pending"}
    assert back.work.encoded_count() == 3 and back.work["w2"] == {"id": "w2", "status": "pending"}


def test_encoding_a_partly_read_state_gives_the_same_bytes_and_hash() -> None:
    state, back = loaded()
    first = encode_state(back)
    assert back.work["w1"]  # a read decodes the item
    back.work.peek("w0")
    assert encode_state(back) == first == encode_state(state)
    assert state_hash(back) == state_hash(state)
    assert back == state and back.work == state.work


def test_the_fold_continues_on_a_loaded_state_as_on_the_original() -> None:
    s = history()
    original = s.state()
    back = decode_state(encode_state(original))
    for ev in (
        s.ev("work.cancelled", "w0", reason=None),
        s.ev("work.completed", "w1", agentGuid="a1", result=None),
        s.ev("work.purged", "w3", reason="retention"),
    ):
        apply(original, ev)
        apply(back, ev)
    assert state_hash(back) == state_hash(original)
    assert list(back.work_by_status["cancelled"]) == ["w0"] and "w3" not in back.work
    assert back.work.encoded_count() == 2, "only the items the events touched were decoded"


def test_the_status_index_keeps_its_order_through_a_snapshot_but_is_not_hashed() -> None:
    s = history()
    s.ev("work.cancelled", "w4", reason=None)
    s.ev("work.cancelled", "w0", reason=None)
    state = s.state()
    back = decode_state(encode_state(state))
    assert list(back.work_by_status["cancelled"]) == ["w4", "w0"], "finishing order, not submission order"
    state.reindex_work()
    assert list(state.work_by_status["cancelled"]) == ["w0", "w4"]
    assert state_hash(state) == state_hash(back)


def test_settling_holds_finished_items_encoded_and_changes_nothing_else() -> None:
    s = history()
    s.ev("work.cancelled", "w0", reason=None)
    state = s.state()
    pending, assigned = state.work["w2"], state.work["w1"]
    before, digest = encode_state(state), state_hash(state)
    payload = encode_state(state, settle=True)
    assert payload == before and state_hash(state) == digest
    assert state.work.encoded_count() == 2, "w3 (completed) and w0 (cancelled)"
    assert state.work.get("w2") is pending and state.work.get("w1") is assigned
    assert encode_state(state) == before
    ev = s.ev("work.purged", "w3", reason="retention")
    reference = s.state()
    apply(state, ev)
    assert state_hash(state) == state_hash(reference) and "w3" not in state.work


def test_settling_a_loaded_state_points_its_items_at_the_new_encoding() -> None:
    s = history()
    _, back = loaded()
    assert back.work["w3"]  # decodes the completed item
    ev = s.ev("work.completed", "w1", agentGuid="a1", result={"n": 1})
    apply(back, ev)
    assert back.work.encoded_count() == 3
    payload = encode_state(back, settle=True)
    assert back.work.encoded_count() == 5, "w1, w3 settled; w0, w2, w4 were never decoded"
    assert decode_state(payload) == back
    truth = s.state()
    assert back.work["w1"] == truth.work["w1"] and back.work["w1"]["status"] == "completed"
    assert back.work["w4"] == truth.work["w4"] and state_hash(back) == state_hash(truth)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda footer, items: (footer, items[:-1]),  # the items cut short
        lambda footer, items: ({**footer, "work_ids": footer["work_ids"][:-1]}, items),
        lambda footer, items: ({**footer, "work_ids": ["w0"] * len(footer["work_ids"])}, items),
        lambda footer, items: ({**footer, "work_index": {**footer["work_index"], "pending": []}}, items),
        lambda footer, items: ({**footer, "work_counts": {**footer["work_counts"], "pending": 0}}, items),
        lambda footer, items: ({**footer, "schema": STATE_SCHEMA - 1}, items),
    ],
    ids=["short-items", "ids-vs-lengths", "repeated-id", "index-vs-items", "index-vs-counts", "schema"],
)
def test_an_inconsistent_snapshot_is_refused(mangle) -> None:  # type: ignore[no-untyped-def]
    raw = encode_state(history().state())
    cut = raw.rindex(b"\n")
    footer, items = mangle(orjson.loads(raw[cut + 1 :]), bytes(raw[:cut]))
    decode_state(raw)  # as written, it loads
    with pytest.raises((ValueError, KeyError)):
        decode_state(items + b"\n" + orjson.dumps(footer))


def test_a_snapshot_without_an_item_section_is_refused() -> None:
    footer = encode_state(ProjectState(project="p")).split(b"\n")[1]
    with pytest.raises(ValueError, match="item section"):
        decode_state(footer)


def test_a_table_from_a_dict_is_all_decoded() -> None:
    item = history().state().work["w0"]
    table = WorkTable({"w0": item})
    assert table.encoded_count() == 0 and table.values() == [item] and table.items() == [("w0", item)]
    assert ProjectState(project="p", work={"w0": dict(item)}).work == table  # type: ignore[arg-type]


def test_list_keys_need_no_decoding() -> None:
    s = history()
    s.submit("w9")
    state = s.state()
    state.work["w9"]["priority"] = 9  # (a fold never changes a priority; this orders the list)
    back = decode_state(encode_state(state))
    order = sorted(back.work, key=back.work.list_key)
    assert back.work.encoded_count() == 6, "ordering decoded nothing"
    assert order[0] == "w9" and order[1:] == [f"w{i}" for i in range(5)], "priority, then oldest"
    assert [back.work.list_key(w) for w in order] == [state.work.list_key(w) for w in order]


@PROPERTY
@given(event_sequences(), st.data())
def test_reading_any_items_of_a_loaded_state_changes_nothing(
    events: list[Event], data: st.DataObject
) -> None:
    state = fold(events, project=PROJECT)
    back = decode_state(encode_state(state))
    ids = sorted(back.work)
    for wid in data.draw(st.lists(st.sampled_from(ids), unique=True) if ids else st.just([]), label="read"):
        assert back.work[wid] == state.work[wid]
    assert encode_state(back) == encode_state(state)


# --- adopting an encoding taken at an earlier point (a forked child's), while the fold went on ------


def adopt_all(state: ProjectState, encoding: tuple[bytearray, int, bytes], cut: SnapshotCut) -> int:
    payload, items_end, index = encoding
    adoption = adopt_snapshot(state, memoryview(payload), items_end, index, cut)
    while True:
        try:
            next(adoption)
        except StopIteration as done:
            return int(done.value)


def test_an_encoding_taken_earlier_is_adopted_for_what_did_not_change_since() -> None:
    s = history()
    s.ev("work.cancelled", "w0", reason=None)
    _, state = loaded()  # w0-w4 encoded
    for ev in s.events[len(history().events):]:
        apply(state, ev)  # w0 (cancelled) is decoded now
    assert state.work["w2"]  # w2 read: decoded
    cut = snapshot_cut(state)
    encoding = encode_snapshot(state)
    assert decode_state(encoding[0]) == state and encoding[0] == encode_state(state)
    # The fold goes on while the encoding is made elsewhere.
    for ev in (s.ev("work.purged", "w0", reason="retention"),  # settled at the cut, gone now
               s.ev("work.purged", "w3", reason="retention"),  # encoded at the cut, gone now
               s.ev("work.completed", "w1", agentGuid="a1", result=None)):  # finished after the cut
        apply(state, ev)
    assert state.work["w4"]["status"] == "pending"  # encoded at the cut, decoded since
    apply(state, s.submit("w9"))
    digest = state_hash(state)
    assert adopt_all(state, encoding, cut) == 0, "w0 was the only settled one, and it is gone"
    assert state.work.encoded_count() == 0, "w3 gone; w4 decoded since; w1, w2, w9 were decoded then"
    assert state_hash(state) == digest == state_hash(s.state())
    assert sorted(state.work) == ["w1", "w2", "w4", "w9"]


def test_settled_and_still_encoded_items_move_onto_the_adopted_encoding() -> None:
    s = history()
    _, state = loaded()
    assert state.work["w3"]["status"] == "completed"  # decoded, settled
    cut = snapshot_cut(state)
    encoding = encode_snapshot(state)
    apply(state, s.submit("w7"))
    assert adopt_all(state, encoding, cut) == 1
    assert state.work.encoded_count() == 5, "w0, w1, w2, w4 still encoded, w3 settled; w7 decoded"
    assert state_hash(state) == state_hash(s.state())
    assert state.work["w3"] == s.state().work["w3"] and state.work["w1"]["assignedTo"] == "a1"


def test_an_encoding_is_not_adopted_after_the_table_was_re_pointed() -> None:
    _, state = loaded()
    assert state.work["w3"]  # decodes it
    cut = snapshot_cut(state)
    encoding = encode_snapshot(state)
    encode_state(state, settle=True)  # a snapshot taken on the loop in between
    before = encode_state(state)
    assert adopt_all(state, encoding, cut) == -1
    assert encode_state(state) == before and state.work.encoded_count() == 5


@PROPERTY
@given(event_sequences(), st.data())
def test_adopting_an_encoding_from_any_earlier_point_changes_no_state(
    events: list[Event], data: st.DataObject
) -> None:
    """Cut anywhere (on a loaded state or not), fold on (purges, completions, reads, new items),
    then adopt: the state is the one a plain fold reaches, and so is a reload of the encoding."""
    at = data.draw(st.integers(0, len(events)), label="cut at")
    state = fold(events[:at], project=PROJECT)
    if data.draw(st.booleans(), label="loaded"):
        state = decode_state(encode_state(state))
    ids = sorted(state.work)
    for wid in data.draw(st.lists(st.sampled_from(ids), unique=True) if ids else st.just([]), label="read"):
        state.work.get(wid)
    cut = snapshot_cut(state)
    encoding = encode_snapshot(state)
    at_cut = state_hash(state)
    for ev in events[at:]:
        apply(state, ev)
    adopt_all(state, encoding, cut)
    assert state_hash(state) == state_hash(fold(events, project=PROJECT))
    assert encode_state(state) == encode_state(fold(events, project=PROJECT))
    assert state_hash(decode_state(encoding[0])) == at_cut
