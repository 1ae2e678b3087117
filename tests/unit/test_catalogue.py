"""The catalogue's shapes, checked: `payload_errors` against hand-made payloads and generated ones."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from projections.events import CATALOGUE, Event, fields_of, payload_errors
from tests.strategies import event_sequences, payload

ASSIGNED = {"agentGuid": "a1", "attempt": 1, "acceptBy": "2026-01-01T00:00:00.000Z"}


def test_a_payload_that_fits_has_no_errors() -> None:
    assert payload_errors("work.assigned", ASSIGNED) == []


def test_a_missing_key_is_an_error() -> None:
    data = {k: v for k, v in ASSIGNED.items() if k != "acceptBy"}
    assert payload_errors("work.assigned", data) == ["acceptBy: missing"]


def test_an_unknown_key_is_an_error() -> None:
    [error] = payload_errors("work.assigned", {**ASSIGNED, "assignee": "a1"})
    assert error.startswith("assignee: not a field of work.assigned")


@pytest.mark.parametrize(
    "key, value",
    [
        ("attempt", "1"),  # a string is not an int
        ("attempt", True),  # nor is a bool
        ("attempt", 1.5),
        ("agentGuid", None),  # str, not str | None
        ("acceptBy", 5),
    ],
)
def test_a_value_of_another_type_is_an_error(key: str, value: Any) -> None:
    [error] = payload_errors("work.assigned", {**ASSIGNED, key: value})
    assert error.startswith(f"{key}: expected ")


def test_nested_values_literals_and_optional_types_are_checked() -> None:
    data = {
        "guid": "a1", "handle": None, "agentType": "dev", "capabilities": ["code", 7], "boundaries": [],
        "maxConcurrentTasks": 1, "hostname": None, "username": None, "visibility": "public",
        "labels": {"os": 1}, "source": "shuttle", "spinUpId": None, "targetId": None, "spindownAfterIdleMs": None,
    }
    assert payload_errors("agent.registered", data) == [
        "capabilities[1]: expected str, got int 7",
        "labels.os: expected str, got int 1",
        "source: expected one of 'weft', 'warp', got 'shuttle'",
    ]
    health = {"healthStatus": "healthy", "latencyMs": 3, "error": None}  # JSON: an int is a float
    assert payload_errors("target.health_changed", health) == []


def test_not_required_keys_may_be_absent_or_present() -> None:
    bare = {"reason": "agent lost", "retryAt": None}
    assert payload_errors("work.requeued", bare) == []
    withdrawn = {**bare, "cause": "accept-timeout", "agentGuid": "a1"}
    assert payload_errors("work.requeued", withdrawn) == []
    assert payload_errors("work.requeued", {**withdrawn, "cause": None}) == []  # what a withdrawal without one writes
    assert payload_errors("work.requeued", {**withdrawn, "agentGuid": None}) == ["agentGuid: expected str, got null"]


def test_an_unknown_type_and_data_that_is_no_object_are_errors() -> None:
    assert payload_errors("work.teleported", {}) == ["unknown event type 'work.teleported'"]
    assert payload_errors("work.cancelled", ["reason"]) == ["data: expected an object, got list ['reason']"]


def test_every_catalogue_type_declares_only_checkable_keys() -> None:
    """`payload_errors` knows every annotation the catalogue uses (it raises on one it does not)."""
    for name, spec in CATALOGUE.items():
        assert fields_of(spec.data), name
        payload_errors(name, {})


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_the_strategies_generate_every_type_as_the_catalogue_declares_it(data: st.DataObject) -> None:
    for name in CATALOGUE:
        assert payload_errors(name, data.draw(payload(name), label=name)) == []


@settings(max_examples=100, deadline=None)
@given(event_sequences())
def test_every_generated_event_fits_its_catalogue_shape(events: list[Event]) -> None:
    for ev in events:
        assert payload_errors(ev.type, ev.data) == [], (ev.type, ev.data)
