"""Every recorded stream in tests/fixtures/replay folds to the state hash recorded with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from projections.diff import diff_states
from projections.state import ProjectState
from tests.replay_fixtures import all_fixtures, check, fold_fixture, load


def test_there_are_fixtures_of_the_three_recorded_runs() -> None:
    names = {p.stem for p in all_fixtures()}
    assert {"work_loop", "spinup_scale_down", "dlq_retry"} <= names


@pytest.mark.parametrize("path", all_fixtures(), ids=lambda p: p.stem)
def test_fixture_folds_to_its_recorded_state_hash(path: Path) -> None:
    check(load(path))


@pytest.mark.parametrize("path", all_fixtures(), ids=lambda p: p.stem)
def test_diff_from_empty_to_the_end_adds_every_entity(path: Path) -> None:
    fx = load(path)
    end = fold_fixture(fx)
    diff = diff_states(ProjectState(project=end.project), end)
    assert set(diff.items.added) == set(end.work) and set(diff.agents.added) == set(end.agents)
    assert not diff.items.removed and not diff.items.changed
    assert not diff_states(end, end)


def test_work_loop_fixture_ends_completed() -> None:
    state = check(load(Path(__file__).parents[1] / "fixtures" / "replay" / "work_loop.jsonl"))
    assert state.work_counts["completed"] == 1


def test_dlq_fixture_went_through_the_dlq() -> None:
    fx = load(Path(__file__).parents[1] / "fixtures" / "replay" / "dlq_retry.jsonl")
    types = [e.type for e in fx.events]
    assert "work.retried" in types and types.count("work.failed") >= 2
    assert types.index("work.retried") < types.index("work.completed")


def test_spinup_fixture_spun_up_and_scaled_down() -> None:
    fx = load(Path(__file__).parents[1] / "fixtures" / "replay" / "spinup_scale_down.jsonl")
    types = [e.type for e in fx.events]
    for t in ("spinup.requested", "spinup.completed", "agent.registered", "work.completed",
              "agent.shutdown_requested", "agent.deregistered"):
        assert t in types, t
    shutdown = next(e for e in fx.events if e.type == "agent.shutdown_requested")
    assert shutdown.data["reason"] == "idle-timeout"


def test_diff_records_names_changed_fields_with_old_and_new() -> None:
    from projections.diff import diff_records

    old = {"a": {"id": "a", "status": "pending", "x": 1}, "b": {"id": "b"}}
    new = {"a": {"id": "a", "status": "completed", "y": None}, "c": {"id": "c"}}
    d = diff_records(old, new)
    assert list(d.added) == ["c"] and list(d.removed) == ["b"]
    assert {f: (c.old, c.new) for f, c in d.changed["a"].items()} == {
        "status": ("pending", "completed"), "x": (1, None), "y": (None, None)}
    assert d.to_dict()["changed"]["a"]["status"] == {"old": "pending", "new": "completed"}
