"""The event catalogue and envelope: encoding, naming, ids and validation."""

from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import UTC, datetime

import orjson
import pytest

from projections.events import (
    CATALOGUE,
    Event,
    UnknownEventType,
    decode,
    format_ts,
    idempotent_id,
    is_valid_entity_id,
    is_valid_project_id,
    parse_ts,
    stream_name,
    subject_for,
)
from weft.stamps import new_id, new_uuid, stamp, utc_now


def full_event() -> Event:
    return Event(
        type="work.assigned",
        entity_id="w-1",
        data={"agentGuid": "a1", "attempt": 2, "acceptBy": "2026-01-01T00:00:00.000Z"},
        project="proj_1",
        actor="scheduler",
        correlation_id="corr",
        causation_id="cause",
        epoch=7,
        idempotency_key="key",
    )


def test_encode_decode_round_trip_keeps_every_envelope_field() -> None:
    ev = full_event()
    back = decode(ev.encode(), seq=42)
    assert back.seq == 42
    for name in (
        "type",
        "entity_id",
        "data",
        "project",
        "id",
        "v",
        "ts",
        "actor",
        "correlation_id",
        "causation_id",
        "epoch",
        "idempotency_key",
    ):
        assert getattr(back, name) == getattr(ev, name), name


def test_encode_omits_absent_optional_fields() -> None:
    body = orjson.loads(
        Event(type="work.cancelled", entity_id="w1", data={"reason": None}, project="p").encode()
    )
    assert set(body) == {"id", "type", "v", "ts", "actor", "project", "entityId", "data"}
    back = decode(orjson.dumps(body))
    assert back.epoch is None and back.correlation_id is None and back.idempotency_key is None


def test_epoch_zero_survives_the_round_trip() -> None:
    ev = Event(
        type="work.requeued", entity_id="w1", data={"reason": "r", "retryAt": None}, project="p", epoch=0
    )
    assert decode(ev.encode()).epoch == 0


def test_to_dict_is_the_encoded_body_plus_seq() -> None:
    ev = full_event()
    ev.seq = 5
    d = ev.to_dict()
    assert d["seq"] == 5 and d["entityId"] == "w-1" and d["epoch"] == 7


def test_unknown_type_raises_on_construction_and_on_decode() -> None:
    with pytest.raises(UnknownEventType):
        Event(type="work.exploded", entity_id="w1", data={})
    raw = full_event().encode().replace(b"work.assigned", b"work.exploded")
    with pytest.raises(UnknownEventType):
        decode(raw)


def test_unknown_type_is_a_value_error() -> None:
    assert issubclass(UnknownEventType, ValueError)


def test_the_catalogue_sets_the_version_and_the_edge_stamps_id_and_time() -> None:
    """An event is pure data: the version comes from the catalogue, the id and time only from
    `weft.stamps` (the store stamps what its maker left empty), so a fold never sees a clock."""
    ev = Event(type="agent.lost", entity_id="a1", data={"lastHeartbeat": None})
    assert ev.v == CATALOGUE["agent.lost"].version
    assert ev.entity == "agent"
    assert ev.id == "" and ev.ts == ""
    stamp(ev)
    assert parse_ts(ev.ts).tzinfo is not None
    other = stamp(Event(type="agent.lost", entity_id="a1", data={}))
    assert len(ev.id) == 32 and ev.id != other.id
    kept = stamp(Event(type="agent.lost", entity_id="a1", data={}, id="given", ts="2026-01-01T00:00:00.000Z"))
    assert (kept.id, kept.ts) == ("given", "2026-01-01T00:00:00.000Z")


def test_every_catalogued_type_is_past_tense_and_names_its_entity() -> None:
    for name, spec in CATALOGUE.items():
        assert spec.name == name
        assert spec.entity in ("work", "agent", "target", "project")
        assert spec.version >= 1
        prefix = name.split(".", 1)[0]
        assert prefix == spec.entity or (prefix, spec.entity) in {("spinup", "target"), ("leader", "project")}
        assert spec.doc


def test_idempotent_id_is_stable_and_scoped_by_project() -> None:
    assert idempotent_id("p", "k") == idempotent_id("p", "k")
    assert idempotent_id("p", "k") != idempotent_id("p", "k2")
    assert idempotent_id("p", "k") != idempotent_id("q", "k")
    # Stable across processes and releases: a retry after a restart must hit the same Nats-Msg-Id.
    assert idempotent_id("p", "k") == "6e28f3e134415579a837ad3216a61da8"


def test_subject_and_stream_naming() -> None:
    ev = full_event()
    assert ev.subject == "weft.proj_1.ev.work.w-1"
    assert subject_for("p", "agent", "a1") == "weft.p.ev.agent.a1"
    assert stream_name("proj_1") == "WEFT_proj_1"
    spin = Event(type="spinup.failed", entity_id="t1", data={}, project="p")
    assert spin.subject == "weft.p.ev.target.t1"


@pytest.mark.parametrize("project", ["a", "A-b_9", "x" * 64, "default", "0"])
def test_valid_project_ids(project: str) -> None:
    assert is_valid_project_id(project)


@pytest.mark.parametrize(
    "project", ["", "x" * 65, "a.b", "a b", "a*", "a>", "é", "a/b", "abc\n", "\nabc", "a\tb"]
)
def test_invalid_project_ids(project: str) -> None:
    assert not is_valid_project_id(project)


@pytest.mark.parametrize("entity_id", ["w1", "3f2a-9c", "agent:1", "a@b", "a+b=c", "x" * 128])
def test_valid_entity_ids(entity_id: str) -> None:
    assert is_valid_entity_id(entity_id)


@pytest.mark.parametrize("entity_id", ["", "x" * 129, "a.b", "a b", "*", ">", "a\n"])
def test_invalid_entity_ids(entity_id: str) -> None:
    assert not is_valid_entity_id(entity_id)


@pytest.mark.parametrize(
    ("project", "entity", "entity_id"),
    [("", "work", "w1"), ("a.b", "work", "w1"), ("p", "work", "a.b"), ("p", "work", "*"), ("p", "job", "w1")],
)
def test_a_subject_is_never_built_from_an_invalid_token(project: str, entity: str, entity_id: str) -> None:
    """A dot or wildcard would put the event on another subject and so outside its entity's OCC."""
    with pytest.raises(ValueError):
        subject_for(project, entity, entity_id)


def test_timestamps_are_utc_millisecond_iso() -> None:
    dt = datetime(2026, 3, 4, 5, 6, 7, 891234, tzinfo=UTC)
    assert format_ts(dt) == "2026-03-04T05:06:07.891Z"
    assert parse_ts(format_ts(dt)) == dt.replace(microsecond=891000)


def test_utc_now_matches_the_clock_across_second_boundaries() -> None:
    """utc_now caches the formatted second; every value must still be the clock's own reading."""
    seen = set()
    for _ in range(2_000):
        before = datetime.now(UTC).replace(microsecond=0)
        text = utc_now()
        after = datetime.now(UTC)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text)
        assert before <= parse_ts(text) <= after
        seen.add(text[:19])
    assert seen


def test_ids_are_unique_and_well_formed() -> None:
    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    uuids = {new_uuid() for _ in range(10_000)}
    assert len(uuids) == 10_000
    for u in list(uuids)[:500]:
        parsed = uuid.UUID(u)
        assert str(parsed) == u and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_decode_rebuilds_exactly_what_the_constructor_built() -> None:
    """decode builds events field by field (a rebuild's hot path): it must equal Event(...)."""
    for ev in (full_event(), Event(type="work.cancelled", entity_id="w-2", data={}, project="p")):
        assert decode(ev.encode(), 9) == dataclasses.replace(ev, seq=9)
