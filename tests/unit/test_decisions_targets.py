"""Target and spin-up decisions (`weft.core.decisions.targets`) on folded states, without NATS.

Definitions and updates reach these decisions validated (`weft.core.targets`, called by the
command handler), so the tests hand them finished dicts.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_decisions_work import History
from weft.core.decisions import Draft
from weft.core.decisions import targets as d
from weft.core.errors import Conflict, NotFound

DEFINITION: dict[str, Any] = {"name": "box", "agentType": "developer", "mechanism": "local",
                              "capabilities": ["code"], "maxConcurrentAgents": 1}


def test_target_ids_derive_from_project_and_name() -> None:
    assert d.target_id_for("p", "box") == d.target_id_for("p", "box")
    assert d.target_id_for("p", "box") != d.target_id_for("q", "box")
    assert d.target_id_for("p", "box") != d.target_id_for("p", "box2")


def test_register_a_target() -> None:
    draft = d.register_target(History().state, "t1", DEFINITION, "target:k")
    assert draft == Draft("target.registered", "t1", {"target": DEFINITION}, idempotency_key="target:k")
    state = History().apply(draft)
    assert (state.targets["t1"]["name"], state.targets["t1"]["status"]) == ("box", "available")


def test_registering_a_taken_name_is_a_conflict_whatever_the_id() -> None:
    state = History().register_target("t0", name="box").state
    with pytest.raises(Conflict) as err:
        d.register_target(state, "t1", DEFINITION)
    assert (err.value.field, err.value.message) == ("name", "a target named 'box' already exists")


def test_targets_are_found_by_id_or_name() -> None:
    state = History().register_target("t1", name="box").state
    assert d.resolve_target_id(state, "t1") == "t1"
    assert d.resolve_target_id(state, "box") == "t1"
    assert d.find_target(state, "nope") is None
    with pytest.raises(NotFound) as err:
        d.resolve_target_id(state, "nope")
    assert (err.value.field, err.value.message) == ("idOrName", "target nope not found")


def test_unknown_targets_are_not_found() -> None:
    state = History().state
    for call in (
        lambda: d.update_target(state, "t9", {"description": "x"}),
        lambda: d.remove_target(state, "t9"),
        lambda: d.set_target_enabled(state, "t9", True),
        lambda: d.record_health(state, "t9", "healthy", None, None),
        lambda: d.request_spin_up(state, "t9", "s1"),
    ):
        with pytest.raises(NotFound) as err:
            call()
        assert (err.value.field, err.value.message) == ("idOrName", "target t9 not found")


def test_update_with_changes_and_without() -> None:
    h = History().register_target("t1")
    draft = d.update_target(h.state, "t1", {"description": "new"})
    assert draft == Draft("target.updated", "t1", {"changes": {"description": "new"}})
    assert h.apply(draft).targets["t1"]["description"] == "new"
    assert d.update_target(h.state, "t1", {}) is None


def test_remove() -> None:
    h = History().register_target("t1")
    draft = d.remove_target(h.state, "t1", "gone")
    assert draft == Draft("target.removed", "t1", {"reason": "gone"})
    assert "t1" not in h.apply(draft).targets


def _tripped() -> History:
    """t1 with its breaker open (three failed spin-ups in a row)."""
    h = History().register_target("t1")
    for sid in ("s1", "s2", "s3"):
        h.spin_up("t1", sid).ev("spinup.failed", "t1", spinUpId=sid, error="no agent", durationMs=1.0)
    assert h.state.targets["t1"]["status"] == "error"
    return h


@pytest.mark.parametrize(
    ("make", "enabled", "expected"),
    [
        pytest.param(lambda: History().register_target("t1"), True, None, id="enable-available"),
        pytest.param(lambda: History().register_target("t1", status="disabled"), False, None, id="disable-disabled"),
        pytest.param(lambda: History().register_target("t1", status="disabled"), True, "target.enabled",
                     id="enable-disabled"),
        pytest.param(lambda: History().register_target("t1"), False, "target.disabled", id="disable-available"),
        pytest.param(_tripped, True, "target.enabled", id="enable-closes-the-breaker"),
        pytest.param(_tripped, False, "target.disabled", id="disable-tripped"),
    ],
)
def test_enable_and_disable(make: Any, enabled: bool, expected: str | None) -> None:
    h = make()
    draft = d.set_target_enabled(h.state, "t1", enabled, "why")
    if expected is None:
        assert draft is None
        return
    assert draft == Draft(expected, "t1", {"reason": "why"})
    assert h.apply(draft).targets["t1"]["status"] == ("available" if enabled else "disabled")


def test_health_is_recorded_only_when_it_changes() -> None:
    h = History().register_target("t1")
    draft = d.record_health(h.state, "t1", "unhealthy", 12.5, "refused")
    assert draft == Draft("target.health_changed", "t1",
                          {"healthStatus": "unhealthy", "latencyMs": 12.5, "error": "refused"})
    h.apply(draft)
    assert d.record_health(h.state, "t1", "unhealthy", 99.0, "refused") is None  # same status, same error
    assert d.record_health(h.state, "t1", "unhealthy", 1.0, "timeout") is not None  # a new error
    h.apply(d.record_health(h.state, "t1", "healthy", 1.0, None))
    assert d.record_health(h.state, "t1", "healthy", 5.0, None) is None  # healthy again: latency alone is no news


def test_a_healthy_probe_closes_an_open_breaker() -> None:
    h = _tripped()
    assert h.apply(d.record_health(h.state, "t1", "healthy", 1.0, None)).targets["t1"]["status"] == "available"


# --- spin-ups --------------------------------------------------------------------------------------


def test_request_a_spin_up_for_a_work_item() -> None:
    h = History().register_target("t1").submit("w1", capability="test", boundary="corp")
    draft = d.request_spin_up(h.state, "t1", "s1", "w1", "demand", epoch=3)
    assert draft == Draft("spinup.requested", "t1", {"spinUpId": "s1", "workId": "w1", "capability": "test",
                                                      "boundary": "corp", "reason": "demand"}, epoch=3)
    assert "s1" in h.apply(draft).targets["t1"]["activeSpinUps"]


def test_a_manual_spin_up_without_or_with_an_unknown_item() -> None:
    state = History().register_target("t1").state
    assert d.request_spin_up(state, "t1", "s1") == Draft("spinup.requested", "t1", {
        "spinUpId": "s1", "workId": None, "capability": None, "boundary": None, "reason": "manual"})
    data = d.request_spin_up(state, "t1", "s1", "w-gone").data
    assert (data["workId"], data["capability"], data["boundary"]) == ("w-gone", None, None)


@pytest.mark.parametrize("status", ["disabled", "error"])
def test_a_spin_up_on_an_unavailable_target_is_a_conflict(status: str) -> None:
    h = _tripped() if status == "error" else History().register_target("t1", status="disabled")
    for reason in ("manual", "demand"):
        with pytest.raises(Conflict) as err:
            d.request_spin_up(h.state, "t1", "s9", reason=reason)
        assert (err.value.field, err.value.message) == ("id", f"target t1 is {status}")


def test_a_manual_spin_up_respects_the_agent_limit_a_planned_one_is_not_rechecked() -> None:
    # One agent of the target alive, and one spin-up whose agent has not registered yet.
    h = History().register_target("t1", maxConcurrentAgents=2).spin_up("t1", "s1")
    state = h.register("a1", target_id="t1", spin_up_id="s0").state
    with pytest.raises(Conflict) as err:
        d.request_spin_up(state, "t1", "s2")
    assert err.value.field == "id"
    assert err.value.message == ("target t1 is at its limit of 2 agents (2 running or starting); "
                                 "retry when one has finished")
    assert d.request_spin_up(state, "t1", "s2", reason="demand") is not None
    # The agent of the pending spin-up registering does not count twice.
    state = History().register_target("t1", maxConcurrentAgents=2).spin_up("t1", "s1").register(
        "a1", target_id="t1", spin_up_id="s1").state
    assert d.request_spin_up(state, "t1", "s2") is not None


def test_spin_up_lifecycle_records() -> None:
    h = History().register_target("t1").spin_up("t1", "s1")
    started = d.record_spin_up(h.state, "t1", "s1", "spinup.started", {"mechanismResult": {"pid": 7}}, 4)
    assert started == Draft("spinup.started", "t1", {"spinUpId": "s1", "mechanismResult": {"pid": 7}}, epoch=4)
    h.apply(started)
    assert d.record_spin_up(h.state, "t1", "s1", "spinup.started", {"mechanismResult": None}, 4) is None
    h.register("a1", target_id="t1", spin_up_id="s1")
    done = d.record_spin_up(h.state, "t1", "s1", "spinup.completed", {"agentGuid": "a1", "durationMs": 5.0}, 4)
    assert done == Draft("spinup.completed", "t1", {"spinUpId": "s1", "agentGuid": "a1", "durationMs": 5.0}, epoch=4)
    state = h.apply(done)
    assert state.targets["t1"]["activeSpinUps"] == {}
    assert d.record_spin_up(state, "t1", "s1", "spinup.failed", {"error": "x", "durationMs": 1.0}, 4) is None


def test_a_spin_up_may_fail_before_it_started() -> None:
    h = History().register_target("t1").spin_up("t1", "s1")
    failed = d.record_spin_up(h.state, "t1", "s1", "spinup.failed", {"error": "no agent", "durationMs": 9.0}, 1)
    assert failed is not None and failed.data == {"spinUpId": "s1", "error": "no agent", "durationMs": 9.0}
    assert h.apply(failed).targets["t1"]["consecutiveFailures"] == 1


def test_records_of_unknown_spin_ups_or_targets_are_noops() -> None:
    state = History().register_target("t1").state
    assert d.record_spin_up(state, "t1", "s9", "spinup.started", {}, 1) is None
    assert d.record_spin_up(state, "t9", "s1", "spinup.completed", {}, 1) is None


def test_select_targets() -> None:
    h = History().register_target("t1").register_target("t2", status="disabled", mechanism="ssh")
    state = h.state
    assert d.select_targets(state, {}) == ["t1", "t2"]
    assert d.select_targets(state, {"status": "available"}) == ["t1"]
    assert d.select_targets(state, {"mechanism": "ssh"}) == ["t2"]
    assert d.select_targets(state, {"agentType": "reviewer"}) == []
